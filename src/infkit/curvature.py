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

from infkit.autodiff import Pushforward
from infkit.data import Batch, ExampleSet
from infkit.errors import UnsupportedError
from infkit.gradients import PerExample, batching_rule_notice
from infkit.parameters import evaluation_mode

Curvature = Literal["ggn", "hessian"]
#: output-space elements (directions x examples x outputs) a GGN batch product holds at once;
#: the directions are taken in chunks below it (at least one direction at a time)
PRODUCT_OUTPUT_ELEMENTS = 1 << 25
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
    """

    def __init__(
        self,
        engine: PerExample,
        examples: ExampleSet,
        kind: Curvature = "ggn",
        batch_size: int = 256,
        indices: Sequence[int] | Tensor | None = None,
        normaliser: int | None = None,
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
        self.products = 0  # number of vectors multiplied so far (a cost counter)
        self.pushforward = Pushforward()  # forward mode, or reverse mode where it is refused

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
        )

    def matmat(self, V: Tensor) -> Tensor:
        """H V for V of shape [k, P]; returns float64 [k, P]."""
        V = V.to(self.engine.dtype)
        out = torch.zeros(V.shape, dtype=torch.float64, device=V.device)
        for batch in self.examples.batches(self.batch_size, self.indices):
            out += self.batch_product(batch, V).to(torch.float64)
        self.products += V.shape[0]
        return out / self.normaliser

    def batch_product(self, batch: Batch, V: Tensor) -> Tensor:
        """sum over the batch of C_i V, [k, P] in the model's dtype."""
        engine, space = self.engine, self.engine.space
        inputs, targets = engine.prepare(batch)
        params = engine.params()
        tangents = space.unflatten(V)  # dict of [k, ...]

        def outputs_of(p: dict[str, Tensor]) -> Tensor:
            out = engine.call(p, inputs)
            return out.reshape(out.shape[0], -1)

        with evaluation_mode(engine.task.model), batching_rule_notice(engine.task.model):
            if self.kind == "ggn":
                with torch.no_grad():
                    out = engine.call(params, inputs)  # [B, ...]
                pullback = vjp(outputs_of, params)[1]
                # [k, B, C] output-space products, a few directions at a time: a language
                # model's C is T x V, so all k at once can take tens of GB
                step = max(1, PRODUCT_OUTPUT_ELEMENTS // max(out.numel(), 1))
                parts = [V.new_zeros(0, space.size)]
                for start in range(0, V.shape[0], step):
                    chunk = {n: t[start : start + step] for n, t in tangents.items()}
                    jv = self.pushforward(outputs_of, params, chunk)  # [k', B, C]
                    weighted = engine.task.hessian_product(
                        out, targets, jv.reshape(jv.shape[0], *out.shape)
                    ).reshape(jv.shape)
                    del jv
                    parts.append(space.flatten(vmap(lambda u: pullback(u)[0])(weighted), 1))
                    del weighted
                return torch.cat(parts).detach()
            else:

                def total_loss(p: dict[str, Tensor]) -> Tensor:
                    out = engine.call(p, inputs)
                    return engine.task.checked_loss(out, targets).sum()

                gradient = grad(total_loss)
                products = self.pushforward.hessian(gradient, params, tangents)
        return space.flatten(products, batch_dims=1).detach()


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
