"""Data valuation without a model: KAIROS, each example's share of the MMD to a clean reference.

KAIROS values a training example by how much the training set's distribution moves away from a
clean reference set's when the example is in it. With a kernel k, the squared maximum mean
discrepancy between the training set X (N examples) and the reference set R (M examples) is
(docs/analyses.md §9)

    MMD^2(X, R) = (1/N^2) sum_{a,b} k(x_a, x_b) - (2/(N M)) sum_{a,r} k(x_a, r)
                  + (1/M^2) sum_{r,s} k(r, s),

and the value of example i is the change when it is removed,

    values[i] = MMD^2(X without i, R) - MMD^2(X, R),

in closed form from three sums: ``T = sum_{a,b} k(x_a, x_b)``, the row sums
``s_i = sum_b k(x_i, x_b)`` and the cross sums ``c_i = sum_r k(x_i, r)``:

    MMD^2(X without i, R) = (T - 2 s_i + k(x_i, x_i)) / (N-1)^2 - 2 (C - c_i) / ((N-1) M) + U,

``C = sum_i c_i``, ``U`` the reference term. A negative value marks an example whose removal
brings the training set closer to the clean reference (a mislabelled, noisy or poisoned
example); a positive value one that the reference needs. With labels, the kernel is
``k_x(x, x') [y == y']``: an example whose label disagrees with the reference's examples near
it then adds to the discrepancy. New examples are valued by :meth:`Kairos.update` in
O(m (N + M)) for m of them, the sums updated rather than recomputed.

The default kernel is the Gaussian ``exp(-||x - x'||^2 / (2 bandwidth^2))`` with the median
heuristic: the bandwidth is the median distance between distinct pairs of up to 1,000 points
drawn (seeded) from the training and reference features together.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from infkit.errors import InvalidInputError, NonFiniteError
from infkit.options import real_number

Kernel = Literal["rbf", "linear"]
KERNELS: tuple[str, ...] = ("rbf", "linear")
#: rows of a kernel matrix computed at once
BLOCK_ROWS = 1024
#: points drawn for the median heuristic
MEDIAN_POINTS = 1000


class Kairos:
    """KAIROS values of a training set against a clean reference set, updatable online.

    Args:
        train_features: [N, D] features of the training examples (raw inputs, a model's
            penultimate layer, a sentence embedding; flattened beyond the first dimension).
        reference_features: [M, D] features of the clean reference examples.
        train_labels: class labels [N] (with ``reference_labels``, or neither): the kernel
            becomes ``k(x, x') [y == y']``.
        reference_labels: class labels [M].
        kernel: ``"rbf"`` (Gaussian) or ``"linear"`` (``<x, x'>``, the difference of means).
        bandwidth: the Gaussian's bandwidth (default: the median heuristic, module docstring).

    Attributes:
        values: [N] float64, ``MMD^2(X without i, R) - MMD^2(X, R)``.
        mmd2: ``MMD^2(X, R)``.
    """

    def __init__(
        self,
        train_features: Tensor,
        reference_features: Tensor,
        *,
        train_labels: Tensor | None = None,
        reference_labels: Tensor | None = None,
        kernel: Kernel = "rbf",
        bandwidth: float | None = None,
    ) -> None:
        if kernel not in KERNELS:
            raise InvalidInputError(f"kernel must be one of {KERNELS}, got {kernel!r}")
        if (train_labels is None) != (reference_labels is None):
            raise InvalidInputError(
                "give train_labels and reference_labels together (a kernel on (features, "
                "label) pairs), or neither"
            )
        self.kernel = kernel
        X = _features(train_features, "train_features")
        R = _features(reference_features, "reference_features")
        if X.shape[1] != R.shape[1]:
            raise InvalidInputError(
                f"train_features have {X.shape[1]} features per example and "
                f"reference_features {R.shape[1]}: use the same encoder for both"
            )
        if len(X) < 2:
            raise InvalidInputError("KAIROS values need at least 2 training examples")
        self._labelled = train_labels is not None
        self.y = _labels(train_labels, len(X), "train_labels")
        self.ry = _labels(reference_labels, len(R), "reference_labels")
        if bandwidth is None and kernel == "rbf":
            bandwidth = median_bandwidth(torch.cat([X, R]))
        if bandwidth is not None:
            width = real_number(bandwidth)
            if width is None or not 0 < width < math.inf:
                raise InvalidInputError(
                    f"bandwidth must be a finite number > 0, got {bandwidth!r} (an infinite one "
                    "makes every kernel value 1 and every example's value 0)"
                )
            bandwidth = width
        self.bandwidth = bandwidth
        self.X, self.R = X, R
        self._row = self._sums(X, self.y, X, self.y)  # s_i
        self._cross = self._sums(X, self.y, R, self.ry)  # c_i
        self._diag = self._diagonal(X, self.y)  # k(x_i, x_i)
        self._total = float(self._row.sum())  # T
        self._reference = float(self._sums(R, self.ry, R, self.ry).sum()) / len(R) ** 2  # U
        self.values = self._values()

    # ------------------------------------------------------------------ kernel sums
    def _gram(self, A: Tensor, ya: Tensor | None, B: Tensor, yb: Tensor | None) -> Tensor:
        if self.kernel == "linear":
            K = A @ B.T
        else:
            assert self.bandwidth is not None
            K = torch.exp(-torch.cdist(A, B).square() / (2 * self.bandwidth**2))
        if ya is not None and yb is not None:
            K = K * (ya.unsqueeze(1) == yb.unsqueeze(0))
        return K

    def _sums(self, A: Tensor, ya: Tensor | None, B: Tensor, yb: Tensor | None) -> Tensor:
        """Row sums of k(A, B), [len(A)], a block of rows at a time."""
        out = torch.empty(len(A), dtype=torch.float64)
        for s in range(0, len(A), BLOCK_ROWS):
            rows = slice(s, s + BLOCK_ROWS)
            out[rows] = self._gram(A[rows], None if ya is None else ya[rows], B, yb).sum(1)
        return out

    def _diagonal(self, A: Tensor, ya: Tensor | None) -> Tensor:
        if self.kernel == "linear":
            return A.square().sum(1)
        return torch.ones(len(A), dtype=torch.float64)  # exp(0), and y == y

    # ------------------------------------------------------------------ values
    def _values(self) -> Tensor:
        n, m = len(self.X), len(self.R)
        C = float(self._cross.sum())
        self.mmd2 = self._total / n**2 - 2 * C / (n * m) + self._reference
        without = (self._total - 2 * self._row + self._diag) / (n - 1) ** 2
        without = without - 2 * (C - self._cross) / ((n - 1) * m) + self._reference
        return without - self.mmd2

    def update(self, features: Tensor, labels: Tensor | None = None) -> Tensor:
        """Add m training examples and return the values of all N + m (the new ones last),
        in O(m (N + M)) kernel evaluations: the sums are updated, not recomputed."""
        B = _features(features, "features")
        if B.shape[1] != self.X.shape[1]:
            raise InvalidInputError(
                f"the new examples have {B.shape[1]} features per example, the training set "
                f"{self.X.shape[1]}"
            )
        if self._labelled and labels is None:
            raise InvalidInputError("this valuation uses labels: pass the new examples' labels")
        if not self._labelled and labels is not None:
            raise InvalidInputError("this valuation was made without labels; pass none")
        yb = _labels(labels, len(B), "labels")
        to_old = self._sums(self.X, self.y, B, yb)  # sum_b k(x_j, b), [N]
        new_rows = self._sums(B, yb, torch.cat([self.X, B]), _cat(self.y, yb))  # [m]
        self._row = torch.cat([self._row + to_old, new_rows])
        self._total += 2 * float(to_old.sum()) + float(self._sums(B, yb, B, yb).sum())
        self._cross = torch.cat([self._cross, self._sums(B, yb, self.R, self.ry)])
        self._diag = torch.cat([self._diag, self._diagonal(B, yb)])
        self.X, self.y = torch.cat([self.X, B]), _cat(self.y, yb)
        self.values = self._values()
        return self.values


def kairos(
    train_features: Tensor,
    reference_features: Tensor,
    *,
    train_labels: Tensor | None = None,
    reference_labels: Tensor | None = None,
    kernel: Kernel = "rbf",
    bandwidth: float | None = None,
) -> Tensor:
    """KAIROS values [N] (:class:`Kairos`; keep the object to value new examples online)."""
    return Kairos(
        train_features,
        reference_features,
        train_labels=train_labels,
        reference_labels=reference_labels,
        kernel=kernel,
        bandwidth=bandwidth,
    ).values


def median_bandwidth(points: Tensor, seed: int = 0) -> float:
    """The median distance between distinct pairs of up to :data:`MEDIAN_POINTS` of
    ``points`` (drawn with ``seed``)."""
    if len(points) > MEDIAN_POINTS:
        gen = torch.Generator().manual_seed(seed)
        points = points[torch.randperm(len(points), generator=gen)[:MEDIAN_POINTS]]
    d = torch.cdist(points, points)
    upper = d[torch.triu_indices(len(points), len(points), offset=1).unbind()]
    median = float(upper.median()) if len(upper) else 0.0
    if not median > 0:
        same = int((upper == 0).sum())
        what = (  # (a tester's 50 copies of one row among 59 were told all were identical)
            "the features are all identical"
            if same == len(upper)
            else f"{same:,} of the {len(upper):,} pairs of rows are identical (duplicates), "
            "half or more"
        )
        raise InvalidInputError(
            f"{what}, so the median pairwise distance, the default bandwidth, is 0: pass "
            "bandwidth=..., or remove the duplicates"
        )
    return median


def _as_numbers(x: Tensor, name: str, hint: str) -> Tensor:
    """``x`` as a tensor, or an InvalidInputError naming ``name`` (strings, objects, ragged
    rows) with ``hint``."""
    if isinstance(x, Tensor):
        return x
    try:
        return torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidInputError(f"{name} cannot be read as numbers ({error}): {hint}") from None


def _features(x: Tensor, name: str) -> Tensor:
    x = _as_numbers(x, name, "give a tensor or array of numbers, one row per example")
    if x.dim() < 2 or len(x) == 0:
        raise InvalidInputError(
            f"{name} must be [n, d] (one row per example), got {tuple(x.shape)}"
        )
    x = x.reshape(len(x), -1).to(torch.float64)
    bad = (~torch.isfinite(x)).any(1).nonzero()
    if len(bad):
        raise NonFiniteError(
            f"{name}: example {int(bad[0])} has NaN or Inf features; drop or impute them"
        )
    return x


def _labels(y: Tensor | None, n: int, name: str) -> Tensor | None:
    if y is None:
        return None
    hint = (
        "labels are class indices; encode class names as integers 0..C-1, e.g. classes, y = "
        "np.unique(labels, return_inverse=True)"
    )
    y = _as_numbers(y, name, hint)
    if y.dim() > 1 and math.prod(y.shape[1:]) > 1:
        raise InvalidInputError(
            f"{name} must be [n] class indices, got shape {tuple(y.shape)}; for one-hot rows "
            "give y.argmax(1)"
        )
    y = y.reshape(-1)
    if len(y) != n:
        raise InvalidInputError(f"{name} has {len(y)} labels for {n} examples")
    if y.is_complex():
        raise InvalidInputError(f"{name} are complex numbers: labels are class indices")
    if y.is_floating_point():
        whole = bool(torch.isfinite(y).all()) and bool((y == y.round()).all())
        if not whole:
            k = int((~torch.isfinite(y) | (y != y.round())).nonzero()[0, 0])
            raise InvalidInputError(
                f"{name}[{k}] is {y[k].item()!r}: labels are class indices (the kernel compares "
                "them for equality), not a regression target or a probability"
            )
    return y


def _cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    return None if a is None or b is None else torch.cat([a, b])
