"""How the report shows an example: an image thumbnail, a text (token by token), a table row.

:class:`Display` decides once per run what the data is (``[data] kind``, or from the inputs'
shape and the task) and turns an example into a *view*: a small JSON record the HTML renderer
draws without the model or the data (so ``infkit report`` rebuilds the page from the workdir):

* ``{"kind": "image", "png": "data:image/png;base64,..."}``;
* ``{"kind": "text", "tokens": [...], "scored": [...], "positions": [...]}`` (the tokens that
  are not padding, wherever the padding is; ``scored``: whether each enters the loss;
  ``positions``: where each is in the padded sequence), to which the run adds per-token
  scores where the method gives them;
* ``{"kind": "tabular", "names": [...], "values": [...]}``.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infkit.data import ExampleSet
from infkit.errors import ConfigError
from infkit.language_modeling import IGNORE_INDEX

#: at most this many features of a tabular example are shown
MAX_FEATURES = 40


def image_uri(image: np.ndarray) -> str:
    """A PNG data URI of an image array ([H, W] grey, [H, W, 3] colour, values in [0, 1])."""
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, image, cmap="gray_r" if image.ndim == 2 else None, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _first(inputs: Any) -> Any:
    """The first (only) example of a one-example batch, without its batch dimension."""
    if isinstance(inputs, Tensor):
        return inputs[0]
    if isinstance(inputs, dict):
        return {k: _first(v) for k, v in inputs.items()}
    return inputs


def _token_ids(inputs: Any) -> tuple[Tensor, Tensor | None]:
    """Token ids [T] and the attention mask [T] (or None) of one example."""
    if isinstance(inputs, dict):
        if "input_ids" not in inputs:
            raise ConfigError(
                f"[data] kind = 'text' needs inputs with 'input_ids', got keys {sorted(inputs)}; "
                "or give [data] display to show texts"
            )
        return inputs["input_ids"].reshape(-1), inputs.get("attention_mask")
    return torch.as_tensor(inputs).reshape(-1), None


def guess_kind(sample: Any, task_kind: str, image_shape: Sequence[int]) -> str:
    """``[data] kind = "auto"``: text for language models and token ids, images for inputs
    [H, W] or [C, H, W] (or flat ones with ``image_shape``), tabular otherwise."""
    if task_kind == "language_modeling" or (isinstance(sample, dict) and "input_ids" in sample):
        return "text"
    if isinstance(sample, Tensor):
        if not sample.is_floating_point() and sample.dim() == 1:
            return "text"
        if sample.dim() == 2 or (sample.dim() == 3 and sample.shape[0] in (1, 3)):
            return "image"
        if image_shape and sample.numel() == int(np.prod(image_shape)):
            return "image"
    return "tabular"


def shortest_text(values: Tensor) -> list[str]:
    """Each value as the shortest text that reads back as the same number in its own precision
    (NumPy's float16, float32 and float64 texts; bfloat16 through float32, which holds it)."""
    if not values.is_floating_point():
        return [str(v) for v in values.tolist()]
    if values.dtype not in (torch.float16, torch.float64):
        values = values.float()
    return [str(v) for v in values.cpu().numpy()]


@dataclass
class Display:
    """What the data is and how its examples are shown.

    Attributes:
        kind: ``"image"``, ``"text"`` or ``"tabular"``.
        train: the training examples; test: the test examples.
        items: optional per-split items to show instead of the inputs (``[data] display``).
        image_shape: (H, W) or (C, H, W) for flat image inputs.
        decode: token ids -> strings (text), or None to show the ids.
        class_names: a name per class (labels shown as names).
        feature_names: a name per feature (tabular).
    """

    kind: str
    train: ExampleSet
    test: ExampleSet
    items: dict[str, Sequence[Any]] | None = None
    image_shape: Sequence[int] = ()
    decode: Callable[[list[int]], Sequence[str]] | None = None
    class_names: Sequence[str] = ()
    feature_names: Sequence[str] = ()
    _cache: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    def _examples(self, split: str) -> ExampleSet:
        return self.train if split == "train" else self.test

    def target(self, split: str, index: int) -> Any:
        """The label (or target) of one example, as the data gives it."""
        return self._examples(split).take([index]).targets

    def label(self, split: str, index: int, exact: bool = False) -> str:
        """The label of one example as text: a class name, a class number or target values.

        Target values show 4 significant digits on the page; ``exact`` writes each in full
        (the shortest text that reads back as the same number in the target's precision: a
        float32 1.66048 as 1.66048), as the CSV tables keep them."""
        y = self.target(split, index)
        if isinstance(y, Tensor) and y.numel() == 1 and not y.is_floating_point():
            c = int(y)
            return self.class_names[c] if 0 <= c < len(self.class_names) else str(c)
        if (  # a binary classifier's float label 0.0 or 1.0 (two names, checked by the run)
            isinstance(y, Tensor)
            and y.numel() == 1
            and len(self.class_names) == 2
            and float(y) in (0.0, 1.0)
        ):
            return self.class_names[int(y)]
        if isinstance(y, Tensor) and y.numel() <= 4 and self.kind != "text":
            if exact:
                return ", ".join(shortest_text(y.reshape(-1)))
            return ", ".join(f"{v:.4g}" for v in y.reshape(-1).tolist())
        return ""

    def view(self, split: str, index: int) -> dict[str, Any]:
        """The JSON view of example ``index`` of ``split`` (``"train"`` or ``"test"``)."""
        key = (split, index)
        if key not in self._cache:
            self._cache[key] = self._view(split, index)
        return dict(self._cache[key])

    def _view(self, split: str, index: int) -> dict[str, Any]:
        if self.items is not None:
            item = self.items[split][index]
            if isinstance(item, str):
                return {"kind": "text", "text": item}
            return self._image(item)
        batch = self._examples(split).take([index])
        inputs = _first(batch.inputs)
        if self.kind == "image":
            return self._image(inputs)
        if self.kind == "text":
            ids, mask = _token_ids(inputs)
            targets = batch.targets
            scored = [True] * len(ids)
            if isinstance(targets, Tensor) and targets.dim() == 2 and targets.shape[1] == len(ids):
                scored = (targets[0] != IGNORE_INDEX).tolist()
            # the tokens that are not padding, wherever the padding is (left or right)
            kept = torch.arange(len(ids)) if mask is None else mask.reshape(-1).nonzero()[:, 0]
            positions = kept.tolist()
            return {
                "kind": "text",
                "tokens": self._decode(ids[kept].tolist()),
                "scored": [scored[i] for i in positions],
                "positions": positions,
            }
        values = (
            torch.as_tensor(inputs).reshape(-1).tolist()
            if isinstance(inputs, Tensor)
            else [str(inputs)]
        )
        names = list(self.feature_names) or [f"x{i}" for i in range(len(values))]
        return {
            "kind": "tabular",
            "names": names[:MAX_FEATURES],
            "values": values[:MAX_FEATURES],
            "more": max(0, len(values) - MAX_FEATURES),
        }

    def _image(self, inputs: Any) -> dict[str, Any]:
        from infkit.plot import as_image

        if isinstance(inputs, dict):
            raise ConfigError(
                f"[data] kind = 'image', but an example's inputs are a dict of "
                f"{sorted(map(str, inputs))}: token ids are shown "
                "with kind = 'text' (or 'auto'), images need pixel values [H, W], [C, H, W] or "
                "flat ones with image_shape"
            )
        try:
            image = as_image(torch.as_tensor(np.asarray(inputs)), self.image_shape or None)
        except (ValueError, TypeError, RuntimeError) as error:
            raise ConfigError(f"[data] kind = 'image': {error}") from error
        return {"kind": "image", "png": image_uri(image)}

    def _decode(self, ids: list[int]) -> list[str]:
        if self.decode is None:
            return [str(i) for i in ids]
        try:
            decoded = self.decode(ids)
        except Exception as error:  # the user's function: named, with what it was given
            raise ConfigError(
                f"[data] decode raised {type(error).__name__}: {error} (given the token ids "
                f"{ids[:8]}{' ...' if len(ids) > 8 else ''})"
            ) from error
        if isinstance(decoded, str):  # a tokenizer's decode: one string for the whole sequence
            raise ConfigError(
                "[data] decode returned one string for the whole sequence; it must map a list of "
                "ids to one string per id (with a Hugging Face tokenizer: "
                "tokenizer.convert_ids_to_tokens)"
            )
        tokens = [str(t) for t in decoded]
        if len(tokens) != len(ids):
            raise ConfigError(
                f"[data] decode returned {len(tokens)} strings for {len(ids)} token ids; it must "
                "map a list of ids to one string per id"
            )
        return tokens


def value_range(values: list[float], spec: str) -> str:
    """``"lo-hi"`` of ``values`` in the format ``spec``, or the one value where both read
    alike (a range of one retraining read "4.4-4.4")."""
    low, high = format(min(values), spec), format(max(values), spec)
    return low if low == high else f"{low}-{high}"


def retraining_name(row: dict[str, Any]) -> str:
    """A leave-one-out retraining as the messages name it: ``#7``, ``#7 (not converged)``."""
    return f"#{row['index']}" + ("" if row.get("converged", True) else " (not converged)")


def unfinished_cause(far: list[dict[str, Any]]) -> str:
    """The cause the moved-far warning adds where some of its retrainings did not converge."""
    if all(row.get("converged", True) for row in far):
        return ""
    return "; or, for those marked not converged, a retraining stopped short of its optimum"


#: retrainings that moved far at cosines of at least this to the estimator's step all went
#: its way, further: the first-order estimate's own error (:func:`far_reading`)
ALONG_COSINE = 0.9


def far_reading(far: list[dict[str, Any]], record: dict[str, Any]) -> str:
    """What retrainings that moved far beyond the estimator's step mean for the check, as the
    warning and the page say it; ``record`` is the check's (its ``estimator`` and ``damping``,
    where a run recorded them). Along the step (every cosine at least :data:`ALONG_COSINE`)
    the gap is the estimate's own: a damped step, shortened (a reviewer's Newton run with
    damping 0.003 moved 2.6-3.4x, 0.97-1.02x undamped), or first order's on high-leverage
    removals (a tester's convex softmax regression, two examples of leverage 1.22 and 1.34
    moving 3.2x and 3.4x at cosines 0.96 and 0.99, was told of another optimum of a
    non-convex objective; ``estimator="newton"`` predicted them at 1.00-1.18x). Off the step the
    retrained models may be elsewhere altogether."""
    if min(row["cosine"] for row in far) >= ALONG_COSINE:
        causes = []
        damping = record.get("damping")
        if damping:
            shown = damping if isinstance(damping, str) else format(damping, "g")
            causes.append(
                f"a step that the damping ({shown}) shortens: the step solves with the "
                "damped curvature, the retraining does not"
            )
        estimator = record.get("estimator", "if")
        if estimator == "if":
            causes.append(
                "a removal too large for first order: an example of high leverage "
                "(inf.leverages()), whose removal the influence function underestimates and "
                "estimator='newton' takes into account"
            )
        elif not damping:
            causes.append(f"a removal beyond what the {estimator} step reaches")
        return (
            "The retrained models lie along the estimator's step, further: "
            + "; or ".join(causes)
            + f"{unfinished_cause(far)}. Their gap is the estimate's own error."
        )
    return (
        "The retrained models are not where the estimator's step leads (another optimum of a "
        "non-convex objective, a removal too large for first order, or a step that damping "
        f"shortens or an approximate curvature turns{unfinished_cause(far)}), so where their "
        "predicted and actual changes differ, the comparison does not measure the estimate "
        "alone."
    )


def worst_norm(late: list[dict[str, Any]]) -> tuple[dict[str, Any], str]:
    """The unconverged retraining with the largest final gradient norm, and which it is (the
    page's own figure counts the removals alone)."""
    worst = max(late, key=lambda r: r["gradient_norm"])
    which = "on all the data" if worst["index"] is None else f"without #{worst['index']}"
    return worst, which
