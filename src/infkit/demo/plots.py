"""The demo's figures, drawn with :mod:`infkit.plot`: explanations, predicted vs actual,
detection curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from infkit import plot
from infkit.demo.data import DigitsData
from infkit.demo.faithfulness import Faithfulness


def plot_explanations(
    path: Path, data: DigitsData, rows: list[dict[str, Any]], predicted: dict[int, int], title: str
) -> Path:
    """Each explained test image, then its proponents and opponents; flipped labels in red."""
    tests = list(dict.fromkeys(r["test_index"] for r in rows))

    def table(t: int, kind: str, key: str) -> list[Any]:
        return [r[key] for r in rows if r["test_index"] == t and r["kind"] == kind]

    labels = [
        f"y={int(y)}" + (f" (true {int(t)})" if f else "")
        for y, t, f in zip(data.y_train, data.y_train_true, data.flipped)
    ]
    fig = plot.proponent_grid(
        [data.images_test[t] for t in tests],
        data.images_train,
        torch.tensor([table(t, "proponent", "train_index") for t in tests]),
        torch.tensor([table(t, "opponent", "train_index") for t in tests]),
        proponent_scores=torch.tensor([table(t, "proponent", "score") for t in tests]),
        opponent_scores=torch.tensor([table(t, "opponent", "score") for t in tests]),
        query_titles=[f"TEST {t}\ny={int(data.y_test[t])} pred={predicted[t]}" for t in tests],
        train_labels=labels,
        flagged=data.flipped,
        title=f"{title}: test image, proponents (removal raises its loss), opponents; "
        "red = flipped label",
    )
    fig.savefig(path, dpi=110)
    return path


def plot_loo(path: Path, results: dict[str, Faithfulness]) -> Path:
    """Predicted vs actual leave-one-out change of the test loss, one panel per model x estimator."""
    names = list(results)
    estimators = list(next(iter(results.values())).predicted)
    fig = Figure(figsize=(4.2 * len(estimators), 4.0 * len(names)))
    axes = fig.subplots(len(names), len(estimators), squeeze=False)
    for r, name in enumerate(names):
        res = results[name]
        for c, est in enumerate(estimators):
            plot.loo_scatter(
                res.predicted[est],
                res.actual,
                title=f"{name}, test image {res.test_index}, {est.upper()}",
                xlabel="predicted change of test loss",
                ax=axes[r, c],
            )
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
    fig = plot.detection_curve(
        curves, flipped, inspect=inspect, max_fraction=0.5, title="Mislabel detection by ranking"
    )
    fig.savefig(path, dpi=110)
    return path
