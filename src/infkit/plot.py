"""Figures of an attribution, as matplotlib figures a notebook shows and a report embeds.

Every function returns a :class:`matplotlib.figure.Figure` built without pyplot (no global
state, no window): display it in a notebook, ``fig.savefig(path)``, or :func:`png` for the bytes.
Scores follow the project's units and sign (docs/conventions.md §5): the predicted change of the
measured quantity when a training example is removed, so a proponent of a loss has a positive
score.

* :func:`proponent_grid`: each query image beside its proponents and opponents;
* :func:`score_distribution`: the histogram of scores and ``|score|`` against rank on log-log
  axes (influence is sparse: a few examples carry most of it);
* :func:`loo_scatter`: predicted against actual (retrained) change, with the line y = x;
* :func:`detection_curve`: the share of flagged examples found against the share inspected;
* :func:`layer_bars`: one bar per layer (e.g. the share of the scores' mass per module).

Needs matplotlib (``pip install "infkit[report]"``).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infkit.evaluate import detection_inputs, found_curve

try:
    from matplotlib.figure import Figure
except ImportError as error:  # pragma: no cover - the message is the point
    raise ImportError('infkit.plot needs matplotlib: pip install "infkit[report]"') from error

__all__ = [
    "as_image",
    "detection_curve",
    "layer_bars",
    "loo_scatter",
    "png",
    "proponent_grid",
    "score_distribution",
]

#: colour of flagged examples (flipped labels, planted poison)
FLAG_COLOR = "tab:red"


def _numpy(values: Tensor | np.ndarray | Sequence[float]) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().to("cpu", torch.float64).numpy()
    return np.asarray(values, dtype=np.float64)


def as_image(x: Tensor | np.ndarray, shape: Sequence[int] | None = None) -> np.ndarray:
    """One example as an image array for ``imshow``: [H, W] (grey) or [H, W, 3] in [0, 1].

    Args:
        x: [H, W], [1, H, W], [3, H, W], [H, W, 3] or, with ``shape``, a flat vector.
        shape: (H, W) or (C, H, W) to reshape a flat input into.
    """
    a = _numpy(x)
    if shape is not None:
        a = a.reshape(tuple(shape))
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)  # channels first -> last
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(
            f"cannot show an example of shape {tuple(_numpy(x).shape)} as an image; give "
            "image_shape (H, W) for flat inputs"
        )
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    return (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)


def png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _show(ax: Any, image: np.ndarray, text: str, flag: bool) -> None:
    ax.imshow(image, cmap=None if image.ndim == 3 else "gray_r", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(text, fontsize=7, color=FLAG_COLOR if flag else "black")
    if flag:
        for spine in ax.spines.values():
            spine.set_edgecolor(FLAG_COLOR)
            spine.set_linewidth(2.5)


def proponent_grid(
    query_images: Sequence[Any],
    train_images: Any,
    proponents: Tensor,
    opponents: Tensor,
    *,
    proponent_scores: Tensor | None = None,
    opponent_scores: Tensor | None = None,
    query_titles: Sequence[str] | None = None,
    train_labels: Sequence[str] | None = None,
    flagged: Tensor | Sequence[bool] | None = None,
    image_shape: Sequence[int] | None = None,
    title: str | None = None,
) -> Figure:
    """One row per query: the query image, its k proponents, then its k opponents.

    Args:
        query_images: the queries' inputs, one image each.
        train_images: the training inputs, indexable by training index (a tensor [N, ...]).
        proponents: [Q, k] training indices (``TopK.proponent_indices``).
        opponents: [Q, k] training indices (``TopK.opponent_indices``).
        proponent_scores: [Q, k] scores printed under each proponent.
        opponent_scores: [Q, k] scores printed under each opponent.
        query_titles: a caption per query (default: ``query q``).
        train_labels: a caption per training example, e.g. its label (indexed by training index).
        flagged: [N] training examples to mark in red (a flipped label, a planted poison).
        image_shape: (H, W) or (C, H, W) for flat inputs.
        title: the figure's title.
    """
    q, k = proponents.shape
    flags = None if flagged is None else [bool(f) for f in flagged]
    fig = Figure(figsize=(1.25 * (1 + 2 * k), 1.8 * q + 0.6))
    axes = fig.subplots(q, 1 + 2 * k, squeeze=False)
    for row in range(q):
        caption = query_titles[row] if query_titles is not None else f"query {row}"
        _show(axes[row, 0], as_image(query_images[row], image_shape), caption, False)
        axes[row, 0].set_title(caption, fontsize=7, fontweight="bold")
        for col, (kind, indices, scores) in enumerate(
            (("pro", proponents, proponent_scores), ("opp", opponents, opponent_scores))
        ):
            for r in range(k):
                j = int(indices[row, r])
                text = f"{kind} #{j}"
                if train_labels is not None:
                    text += f"\n{train_labels[j]}"
                if scores is not None:
                    text += f"\n{float(scores[row, r]):+.1e}"
                flag = flags is not None and flags[j]
                ax = axes[row, 1 + col * k + r]
                _show(ax, as_image(train_images[j], image_shape), text, flag)
    fig.suptitle(
        title
        or f"each query, its {k} proponents (they helped it), then {k} opponents (they hurt it)"
        + ("; red = flagged" if flags is not None else ""),
        fontsize=9,
    )
    fig.tight_layout()
    return fig


def score_distribution(
    scores: Tensor | np.ndarray,
    *,
    bins: int = 60,
    title: str = "",
    query_names: list[str] | None = None,
) -> Figure:
    """Two panels: the histogram of all scores, and ``|score|`` against rank on log-log axes.

    Args:
        scores: [Q, N] (one rank curve per query) or [N].
        bins: histogram bins.
        title: the figure's title.
        query_names: the legend's name of each query (default: ``query q``, its row).
    """
    s = _numpy(scores)
    s = s.reshape(1, -1) if s.ndim == 1 else s
    fig = Figure(figsize=(9.0, 3.6))
    hist, rank = fig.subplots(1, 2)
    hist.hist(s.ravel(), bins=bins, color="tab:blue", alpha=0.85)
    hist.set_yscale("log")
    hist.axvline(0.0, color="gray", lw=0.8)
    hist.set_xlabel("score (predicted change when removed)")
    hist.set_ylabel("count")
    hist.set_title("distribution of scores", fontsize=9)
    ranks = np.arange(1, s.shape[1] + 1)
    for q, row in enumerate(s[:12]):
        magnitude = np.sort(np.abs(row))[::-1]
        keep = magnitude > 0
        label = query_names[q] if query_names is not None else f"query {q}"
        rank.loglog(ranks[keep], magnitude[keep], lw=1.2, label=label)
    rank.set_xlabel("rank")
    rank.set_ylabel("|score|")
    rank.set_title("|score| against rank (log-log)", fontsize=9)
    if 1 < len(s) <= 6:
        rank.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def loo_scatter(
    predicted: Tensor | np.ndarray,
    actual: Tensor | np.ndarray,
    *,
    title: str = "",
    xlabel: str = "predicted change",
    ylabel: str = "actual change (retrained)",
    ax: Any = None,
) -> Figure:
    """Predicted against actual change, the line y = x, Pearson and Spearman in the title.

    Args:
        predicted: [k] predicted changes (scores of the removed examples).
        actual: [k] the changes measured after retraining.
        title: first line of the panel's title.
        xlabel: the x axis label.
        ylabel: the y axis label.
        ax: an existing matplotlib axes to draw into (its figure is returned).
    """
    from infkit.evaluate import correlation

    p, a = _numpy(predicted), _numpy(actual)
    if ax is None:
        fig = Figure(figsize=(4.6, 4.2))
        ax = fig.subplots()
    else:
        fig = ax.figure
    lo, hi = float(min(p.min(), a.min())), float(max(p.max(), a.max()))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="gray", lw=1, label="y = x")
    ax.scatter(p, a, s=18, color="tab:blue")
    stats = correlation(p, a) if len(p) > 2 else None
    line = "" if stats is None else f"Pearson {stats.pearson:.3f}, Spearman {stats.spearman:.3f}"
    ax.set_title("\n".join(t for t in (title, line) if t), fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def detection_curve(
    rankings: Mapping[str, Tensor | np.ndarray],
    flagged: Tensor | np.ndarray | Sequence[bool],
    *,
    inspect: float | None = None,
    max_fraction: float = 1.0,
    title: str = "Detection by ranking",
) -> Figure:
    """Share of flagged examples found against the share of the training set inspected.

    Args:
        rankings: name -> [N] scores, inspected from the highest (tied scores counted as a
            random order among them would on average, as
            :func:`infkit.evaluate.fraction_found` does); names ending in
            ``" loss"`` (baselines) are drawn dotted.
        flagged: [N] the examples to find, a mask (e.g. the flipped labels): True or 1 for
            each; a list of indices is refused, naming how to make the mask.
        inspect: a fraction to mark with a vertical line.
        max_fraction: the x axis ends here.
        title: the figure's title.
    """
    # (a list of indices, the form [self_influence] flagged takes, raised numpy's IndexError)
    truth = flagged if isinstance(flagged, (Tensor, np.ndarray)) else np.asarray(flagged)
    checked = {name: detection_inputs(scores, truth) for name, scores in rankings.items()}
    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    for name, (scores, flags) in checked.items():
        n = len(flags)
        xs = np.arange(1, n + 1) / n
        style = ":" if name.endswith(" loss") else "-"
        ax.plot(xs, found_curve(scores, flags) / max(int(flags.sum()), 1), style, label=name)
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="random")
    if inspect is not None:
        ax.axvline(inspect, color="gray", lw=0.8, ls=":")
    ax.set_xlim(0, max_fraction)
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of flagged examples found")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def layer_bars(
    values: Mapping[str, float], *, xlabel: str = "share of |score| mass", title: str = ""
) -> Figure:
    """One horizontal bar per layer, in the given order (the model's, input to output).

    Args:
        values: layer name -> value.
        xlabel: what the value is.
        title: the figure's title.
    """
    names = list(values)
    fig = Figure(figsize=(6.5, 0.32 * len(names) + 1.2))
    ax = fig.subplots()
    ys = np.arange(len(names))
    ax.barh(ys, [float(values[n]) for n in names], color="tab:blue")
    ax.set_yticks(ys, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig
