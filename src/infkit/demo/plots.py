"""The demo's figures (matplotlib): explanations, predicted vs actual, detection curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from infkit.demo.data import DigitsData
from infkit.demo.faithfulness import Faithfulness


def plot_explanations(
    path: Path, data: DigitsData, rows: list[dict[str, Any]], predicted: dict[int, int], title: str
) -> Path:
    """Each explained test image, then its proponents and opponents; flipped labels in red."""
    tests = list(dict.fromkeys(r["test_index"] for r in rows))
    k = max(r["rank"] for r in rows)
    n_cols = 1 + 2 * k
    fig = Figure(figsize=(1.25 * n_cols, 1.75 * len(tests) + 0.6))
    axes = fig.subplots(len(tests), n_cols, squeeze=False)
    for q, t in enumerate(tests):
        _digit(
            axes[q, 0],
            data.images_test[t],
            f"TEST {t}\ny={int(data.y_test[t])} pred={predicted[t]}",
        )
        axes[q, 0].set_title(axes[q, 0].get_title(), fontsize=8, fontweight="bold")
        for r in (r for r in rows if r["test_index"] == t):
            col = r["rank"] if r["kind"] == "proponent" else k + r["rank"]
            tag = "pro" if r["kind"] == "proponent" else "opp"
            label = f"y={r['given_label']}"
            if r["flipped"]:
                label += f" (true {r['true_label']})"
            text = f"{tag} #{r['train_index']}\n{label}\n{r['score']:+.1e}"
            _digit(axes[q, col], data.images_train[r["train_index"]], text, flag=r["flipped"])
    fig.suptitle(
        f"{title}: test image, {k} proponents (removal raises its loss), {k} opponents; "
        "red = flipped label",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _digit(ax: Any, image: np.ndarray, text: str, flag: bool = False) -> None:
    ax.imshow(image, cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    color = "red" if flag else "black"
    ax.set_title(text, fontsize=7, color=color)
    if flag:
        for spine in ax.spines.values():
            spine.set_edgecolor("red")
            spine.set_linewidth(2.5)


def plot_loo(path: Path, results: dict[str, Faithfulness]) -> Path:
    """Predicted vs actual leave-one-out change of the test loss, one panel per model x estimator."""
    names = list(results)
    estimators = list(next(iter(results.values())).predicted)
    fig = Figure(figsize=(4.2 * len(estimators), 4.0 * len(names)))
    axes = fig.subplots(len(names), len(estimators), squeeze=False)
    for r, name in enumerate(names):
        res = results[name]
        actual = res.actual.numpy()
        for c, est in enumerate(estimators):
            ax = axes[r, c]
            pred = res.predicted[est].numpy()
            lo = float(min(pred.min(), actual.min()))
            hi = float(max(pred.max(), actual.max()))
            pad = 0.05 * (hi - lo)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="gray", lw=1, label="y = x")
            ax.scatter(pred, actual, s=18, color="tab:blue")
            corr = res.correlations[est]
            ax.set_title(
                f"{name}, test image {res.test_index}, {est.upper()}\n"
                f"Pearson {corr.pearson:.3f}, Spearman {corr.spearman:.3f}",
                fontsize=9,
            )
            ax.set_xlabel("predicted change of test loss")
            ax.set_ylabel("actual change (retrained)")
            ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(
        "Predicted vs actual (retrained) leave-one-out change of one test image's loss,\n"
        "for the training examples with the largest |IF| scores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_detection(path: Path, curves: dict[str, Tensor], flipped: Tensor, inspect: float) -> Path:
    """Share of flipped labels found vs share of training data inspected, per ranking.

    Rankings named ``"... loss"`` (the baselines) are drawn dotted.
    """
    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    n = len(flipped)
    xs = np.arange(1, n + 1) / n
    flags = flipped.numpy().astype(float)
    for name, scores in curves.items():
        order = np.argsort(-scores.numpy(), kind="stable")
        style = ":" if name.endswith(" loss") else "-"
        ax.plot(xs, np.cumsum(flags[order]) / flags.sum(), style, label=name)
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="random")
    ax.axvline(inspect, color="gray", lw=0.8, ls=":")
    ax.set_xlim(0, 0.5)
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title("Mislabel detection by ranking", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
