"""Matrix-free curvature-vector products over streamed batches (torch.func).

``CurvatureOperator.matmat(V)`` applies the mean-form data curvature

    H V = (1/N) sum_i C_i V,   C_i = J_i^T Lambda_i J_i (GGN) or d^2 l_i / d theta^2 (Hessian),

to many vectors at once (V is [k, P]) without forming H: the GGN product is a JVP (J_i v), a
C x C multiplication by Lambda_i and a VJP; the Hessian product is reverse-over-reverse (the
pullback of the gradient). Both are vmapped over the k vectors, one pass over the data for all of
them, and survive kernels without forward-mode derivatives (:mod:`infkit.autodiff`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

from infkit.autodiff import Pushforward, transforms_only, untransformable_refused
from infkit.data import Batch, ExampleSet
from infkit.errors import NonFiniteError, UnsupportedError
from infkit.gradients import PerExample, batching_rule_notice
from infkit.parameters import evaluation_mode

Curvature = Literal["ggn", "hessian"]
#: bytes a GGN batch product may take for its directions at once (the default of
#: ``work_bytes``); the directions are taken in chunks below it, at least one at a time
PRODUCT_WORK_BYTES = 256 << 20
#: a GGN batch product's working memory per direction, in multiples of one direction's outputs
#: of the batch plus its P parameters, in the model's precision (the forward-mode tangents, the
#: weighted outputs and the vmapped pullback): measured as growth of a fresh process's resident
#: memory, 4.4-4.6x on causal LMs of 0.5M-3.7M parameters, attributed whole or only their
#: linear layers (:func:`~infkit.autodiff.transforms_only`), counted with a margin
PRODUCT_WORK_FACTOR = 6
#: the share of ``memory_limit`` a run's GGN products may take for their directions at once
PRODUCT_LIMIT_SHARE = 8


def product_work_bytes(memory_limit: int) -> int:
    """``work_bytes`` of a run's curvature operators: :data:`PRODUCT_WORK_BYTES`, and at most
    1 / :data:`PRODUCT_LIMIT_SHARE` of ``memory_limit``."""
    return min(PRODUCT_WORK_BYTES, memory_limit // PRODUCT_LIMIT_SHARE)


def product_direction_bytes(outputs: int, parameters: int, itemsize: int) -> int:
    """Working memory of one direction of a GGN batch product (:data:`PRODUCT_WORK_FACTOR`)
    whose batch has ``outputs`` output elements in all (B x C), for P = ``parameters`` of
    ``itemsize`` bytes; outputs at least in float32 (:func:`~infkit.task.at_least_float32`)."""
    return PRODUCT_WORK_FACTOR * (outputs * max(itemsize, 4) + parameters * itemsize)


def product_chunk(directions: int, outputs: int, parameters: int, itemsize: int, work: int) -> int:
    """How many of ``directions`` a GGN batch product takes at once within ``work`` bytes
    (:func:`product_direction_bytes` each; at least 1)."""
    each = product_direction_bytes(outputs, parameters, itemsize)
    return max(1, min(directions, work // max(each, 1)))


KINDS: tuple[Curvature, ...] = ("ggn", "hessian")


class CurvatureOperator:
    """The data curvature H of a training set as a linear operator on [k, P] blocks.

    Args:
        engine: per-example machinery of the task (model, loss, parameter space).
        examples: the training set (or a subset with ``indices``).
        kind: ``"ggn"`` or ``"hessian"``.
        batch_size: examples per pass.
        indices: restrict the sum to these examples; the mean still divides by ``normaliser``.
        normaliser: N in (1/N) sum_i (default: the number of examples summed).
        work_bytes: the working memory of a GGN batch product (:func:`product_chunk`).
    """

    def __init__(
        self,
        engine: PerExample,
        examples: ExampleSet,
        kind: Curvature = "ggn",
        batch_size: int = 256,
        indices: Sequence[int] | Tensor | None = None,
        normaliser: int | None = None,
        work_bytes: int = PRODUCT_WORK_BYTES,
    ) -> None:
        if kind not in KINDS:
            raise UnsupportedError(f"unknown curvature {kind!r}; valid curvatures: {KINDS}")
        self.engine = engine
        self.examples = examples
        self.kind = kind
        self.batch_size = batch_size
        self.indices = None if indices is None else torch.as_tensor(indices).reshape(-1)
        count = len(examples) if self.indices is None else len(self.indices)
        self.normaliser = normaliser or count
        self.size = engine.space.size
        self.work_bytes = work_bytes
        self.products = 0  # number of vectors multiplied so far (a cost counter)
        # forward mode, or reverse mode where it is refused
        self.pushforward = Pushforward(engine.task.model)

    def retained(self, group: Tensor) -> CurvatureOperator:
        """The curvature of the retained examples (all but ``group``), still divided by N.

        With the ridge ``(N_R/N) l2 + damping`` this is H_R, the curvature of the Newton step on
        the retained objective.
        """
        keep = torch.ones(len(self.examples), dtype=torch.bool)
        if self.indices is not None:
            keep[:] = False
            keep[self.indices] = True
        keep[torch.as_tensor(group, dtype=torch.long)] = False
        return CurvatureOperator(
            self.engine,
            self.examples,
            self.kind,
            batch_size=self.batch_size,
            indices=keep.nonzero().squeeze(1),
            normaliser=self.normaliser,
            work_bytes=self.work_bytes,
        )

    def matmat(self, V: Tensor) -> Tensor:
        """H V for V of shape [k, P]; returns float64 [k, P]."""
        low, norms = self._directions(V)
        out = torch.zeros(V.shape, dtype=torch.float64, device=V.device)
        for batch in self.examples.batches(self.batch_size, self.indices):
            self.add_batch_product(batch, low, out, norms)
        self.products += V.shape[0]
        return out.div_(self.normaliser)

    def batch_product(self, batch: Batch, V: Tensor) -> Tensor:
        """sum over the batch of C_i V, [k, P] in V's dtype, at least float32."""
        dtype = torch.promote_types(V.dtype, torch.float32)
        low, norms = self._directions(V)
        out = torch.zeros(V.shape, dtype=dtype, device=V.device)
        return self.add_batch_product(batch, low, out, norms)

    def _directions(self, V: Tensor) -> tuple[Tensor, Tensor | None]:
        """V [k, P] in the model's dtype, each row at unit norm in float16 (with the norms,
        [k, 1] float64, to scale the products back by; None in any other dtype)."""
        V, norms = _float16_unit(V, self.engine.space.dtype)
        return V.to(self.engine.dtype), norms

    @untransformable_refused()
    def add_batch_product(
        self, batch: Batch, V: Tensor, out: Tensor, norms: Tensor | None = None
    ) -> Tensor:
        """``out += sum over the batch of C_i V`` in place ([k, P], any float dtype; V in the
        model's dtype; the products are formed in it, a chunk of directions at a time, and
        added as they come, so that no second [k, P] block is held); returns ``out``.

        In float16 (:meth:`_directions`) each direction comes at unit norm, with its ``norms``,
        and each output-space product ``Lambda J v`` is scaled to unit norm before its pullback;
        the products are scaled back in ``out``'s dtype (they are linear). They would otherwise
        leave float16's range (6e-8 to 65504) and round to 0 or Inf, a confident classifier's
        ``Lambda`` being 1e-7 where ``p`` is near 1. A product that is not finite even so is
        refused, naming float16's range.
        """
        engine, space = self.engine, self.engine.space
        inputs, targets = engine.prepare(batch)
        params = engine.params()
        tangents = space.unflatten(V)  # dict of [k, ...]

        def back(flat: Tensor, scale: Tensor | None) -> Tensor:
            """A chunk's products, [k', P], in ``out``'s dtype at their true scale."""
            if scale is None:
                return flat
            flat = flat.to(out.dtype) * scale.to(flat.device, out.dtype)
            if not bool(torch.isfinite(flat).all()):
                what = "overflowed" if bool(torch.isinf(flat).any()) else "came out NaN in"
                raise NonFiniteError(
                    f"a curvature product {what} float16's range (its largest number is 65504) "
                    "on a unit-norm direction, summed over a batch: run the model in float32 or "
                    "bfloat16 (float32's range), pass a smaller batch_size, or take a method "
                    "without curvature products (ekfac, kfac, identity) with checks=False (the "
                    "post-fit checks take such products; a tester's ekfac fit met this in them)"
                )
            return flat

        def outputs_of(p: dict[str, Tensor]) -> Tensor:
            out = engine.call(p, inputs)
            return out.reshape(out.shape[0], -1)

        with (
            transforms_only(),
            evaluation_mode(engine.task.model),
            batching_rule_notice(engine.task.model),
        ):
            if self.kind == "ggn":
                outputs = engine.call(params, inputs)  # [B, ...]
                pullback = vjp(outputs_of, params)[1]
                # a few directions at a time: each holds [B, C] output-space products (a
                # language model's C is T x V) and its pullback, so all k at once can take GBs
                step = product_chunk(
                    V.shape[0], outputs.numel(), space.size, V.element_size(), self.work_bytes
                )
                for start in range(0, V.shape[0], step):
                    chunk = {n: t[start : start + step] for n, t in tangents.items()}
                    jv = self.pushforward(outputs_of, params, chunk)  # [k', B, C]
                    weighted = engine.task.hessian_product(
                        outputs, targets, jv.reshape(jv.shape[0], *outputs.shape)
                    ).reshape(jv.shape)
                    del jv
                    # pulled back in the model's dtype: in float16, at unit norm
                    weighted, scale = _float16_unit(weighted, space.dtype)
                    if scale is not None and norms is not None:
                        scale = scale * norms[start : start + step]
                    product = vmap(lambda u: pullback(u)[0])(weighted)
                    del weighted
                    out[start : start + step] += back(space.flatten(product, 1).detach(), scale)
                    del product
                return out
            else:

                def total_loss(p: dict[str, Tensor]) -> Tensor:
                    out = engine.call(p, inputs)
                    return engine.task.checked_loss(out, targets).sum()

                gradient = grad(total_loss)
                products = self.pushforward.hessian(gradient, params, tangents)
        return out.add_(back(space.flatten(products, batch_dims=1).detach(), norms))


def _float16_unit(rows: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``rows`` [k, ...] each at unit norm, divided in float32 at least (a float16 norm may be
    Inf or 0), with their Euclidean norms ([k, 1] float64, 1 for a zero row), when they are to
    be cast to ``dtype`` float16, whose range they may leave; ``(rows, None)`` for any other
    dtype."""
    if dtype != torch.float16:
        return rows, None
    flat = rows.detach().reshape(rows.shape[0], -1)
    norms = torch.linalg.vector_norm(flat, dim=1, keepdim=True, dtype=torch.float64)
    norms = torch.where(norms > 0, norms, torch.ones_like(norms))
    wide = rows.to(torch.promote_types(rows.dtype, torch.float32))
    shape = (-1, *[1] * (rows.dim() - 1))
    return wide / norms.to(wide.device, wide.dtype).reshape(shape), norms


def ggn_diagonal(engine: PerExample, examples: ExampleSet, batch_size: int) -> Tensor:
    """diag(H) of the mean-form GGN, ``(1/N) sum_i sum_{c,d} J_icp Lambda_icd J_idp``, [P] float64.

    From per-example Jacobians, one batch at a time: the Jacobi preconditioner of ``cg`` and the
    curvature of a diagonal method.
    """
    diag = torch.zeros(engine.space.size, dtype=torch.float64, device=engine.device)
    for batch in examples.batches(batch_size):
        J = engine.jacobians(batch).to(torch.float64)
        _, _, lam = engine.output_derivatives(batch)
        diag += torch.einsum("bcp,bcd,bdp->p", J, lam.to(torch.float64), J)
    return diag / len(examples)
