"""The arithmetic of the Kronecker methods' stages, counted from the shapes, for the plan's time.

:meth:`infkit.Influence.plan` prices the passes over the data at a timed batch's pace; what a
stage computes beyond its forward and backward passes it counts here, in floating-point
operations (a multiply-add is 2), and prices at a timed matrix product's rate
(:class:`infkit.plan.Stage`). The counts follow the code: per layer ``l`` with ``d_out x cols``
blocks and ``T_l`` positions per example, and ``K`` vectors backpropagated per example (1 for the
empirical Fisher, ``samples`` for the sampled one, every output for the exact GGN):

* covariances (:meth:`~infkit.kfac.factors.FactorFitter.fit`): a Gram product's symmetric half,
  ``T_l cols^2`` once per shared input and ``K T_l d_out^2``, and ``K - 1`` more backward passes;
* eigendecompositions: :data:`EIGH_PRODUCT_FLOPS` ``d^3`` per distinct factor;
* EK-FAC's correction: each example's terms rotated (``2 T_l cols^2`` once per shared input,
  ``2 K T_l d_out^2``) and multiplied (``2 K T_l d_out cols``);
* the queries' preconditioning (:meth:`~infkit.kfac.curvature.KroneckerCurvature.precondition`):
  the rotation in, in the cheaper order, and back (``2 d_out cols (d_out + cols)``), and a
  truncated SVD per query and layer kept at rank r;
* the scores: each example's blocks (``2 T_l d_out cols`` per pass that reads the layer) and one
  product per query (``2 d_out cols``), or at rank r ``2 T_l r (d_out + cols)`` per query.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from infkit.kfac.streaming import Group, kept_at_rank
from infkit.layers.tracked import TrackedModule

#: a float64 symmetric eigendecomposition of a d x d matrix (or an SVD of that size) costs
#: about this many d^3 operations of float32 matrix products (17-26, d from 256 to 2048, on
#: one CPU core; not measured on a GPU)
EIGH_PRODUCT_FLOPS = 20.0


def backward_flops(model: nn.Module, tokens: int) -> float:
    """Operations of one backward pass of one example of ``tokens`` positions through
    ``model``'s matrices (every parameter of two or more dimensions but an embedding's: the
    gradients of their inputs, 2 per weight and position)."""
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    weights = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in lookups)
    return 2.0 * weights * tokens


def rotation_flops(t: TrackedModule, tokens: int) -> float:
    """Operations of ``Q_S^T G Q_A`` for one example of layer ``t`` from its per-position terms,
    in the cheaper order :func:`~infkit.kfac.curvature.rotated_blocks` picks: the block
    ``sum_t Ds_t a_t^T`` and two rotations, of the terms or of the block."""
    d, c = t.d_out, t.cols
    return 2 * tokens * d * c + 2 * min(tokens * (d * d + c * c), d * c * (d + c))


def block_rotation_flops(t: TrackedModule) -> float:
    """Operations of rotating one ``d_out x cols`` block of layer ``t`` into its Kronecker
    eigenbasis, ``Q_S^T U Q_A``, or back: ``2 d_out cols (d_out + cols)``."""
    return 2.0 * t.d_out * t.cols * (t.d_out + t.cols)


@dataclass(frozen=True)
class KroneckerWork:
    """The operations of each Kronecker stage beyond its passes' forward and backward work.

    Attributes:
        tracked: the tracked layers.
        followers: layers that read an earlier tracked layer's input (its covariance, its
            eigenbasis and its rotation are that layer's).
        positions: each layer's positions per example ``T_l``.
        vectors: ``K``, the vectors backpropagated per example in the factor passes.
        backward: operations of one backward pass of one example (the price of each vector
            beyond the first).
    """

    tracked: list[TrackedModule]
    followers: frozenset[str]
    positions: dict[str, int]
    vectors: int
    backward: float

    def _inputs(self) -> list[TrackedModule]:
        return [t for t in self.tracked if t.name not in self.followers]

    def covariances(self, n: int) -> float:
        """Of the covariance pass over ``n`` examples."""
        a = sum(self.positions[t.name] * t.cols**2 for t in self._inputs())
        s = sum(self.positions[t.name] * t.d_out**2 for t in self.tracked)
        return n * (a + self.vectors * s + (self.vectors - 1) * self.backward)

    def eigendecompositions(self) -> float:
        """Of every factor's eigendecomposition."""
        cubes = sum(t.cols**3 for t in self._inputs()) + sum(t.d_out**3 for t in self.tracked)
        return EIGH_PRODUCT_FLOPS * cubes

    def correction(self, n: int) -> float:
        """Of EK-FAC's eigenvalue correction over ``n`` examples."""
        a = sum(2 * self.positions[t.name] * t.cols**2 for t in self._inputs())
        ds = sum(2 * self.positions[t.name] * t.d_out * (t.d_out + t.cols) for t in self.tracked)
        return n * (a + self.vectors * ds + (self.vectors - 1) * self.backward)

    def queries(self, q: int, rank: int | None) -> float:
        """Of preconditioning ``q`` queries (and their SVDs for layers kept at ``rank``)."""
        total = 0.0
        for t in self.tracked:
            d, c = t.d_out, t.cols
            total += rotation_flops(t, self.positions[t.name]) + block_rotation_flops(t)
            if kept_at_rank(t, rank):
                total += EIGH_PRODUCT_FLOPS * d * c * min(d, c)
        return q * total

    def scores(self, n: int, q: int, groups: list[Group] | None, rank: int | None) -> float:
        """Of scoring ``q`` queries against ``n`` examples, in one pass per query group of
        ``groups`` (None: one pass over every layer), layers kept at ``rank`` low."""
        passes = {t.name: 0 for t in self.tracked}
        for _, _, layers in groups if groups is not None else [(0, q, range(len(self.tracked)))]:
            for i in layers:
                passes[self.tracked[i].name] += 1
        total = 0.0
        for t in self.tracked:
            d, c, positions = t.d_out, t.cols, self.positions[t.name]
            if kept_at_rank(t, rank):
                assert rank is not None
                total += 2 * q * positions * rank * (d + c)
            else:
                total += passes[t.name] * 2 * positions * d * c + 2 * q * d * c
        return n * total
