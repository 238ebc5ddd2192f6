"""method="datainf": the layer-wise closed form of DataInf (Kwon et al., ICLR 2024; docs/methods/datainf.md).

The curvature is the layer-wise (block-diagonal) empirical Fisher ``G_l = (1/N) sum_i g_il g_il^T``
of the per-example loss gradients g_i = grad l_i restricted to layer l (one block per parameter
tensor, as in the authors' code, or per module with ``blocks="module"``). DataInf swaps the
inverse and the average,

    (G_l + lambda_l I)^{-1}  ~  (1/N) sum_i (g_il g_il^T + lambda_l I)^{-1},

and Sherman-Morrison makes every term closed form:

    (G_l + lambda_l I)^{-1} v_l  ~  (1 / lambda_l) [ v_l - (1/N) sum_i (v_l . g_il) g_il / (lambda_l + ||g_il||^2) ].

``lambda_l = layer_damping_l + l2 + damping + shift``: the objective's own l2 and the user's damping
are curvature the damped objective has, so they add to DataInf's per-layer damping, whose default
(``layer_damping="auto"``) is the authors' heuristic ``0.1 * mean_i ||g_il||^2 / d_l``
(``damping_scale`` = 0.1; d_l = the layer's parameter count). With ``layer_damping=0`` the
approximation targets ``(G + (l2 + damping) I)^{-1}`` per layer.

Sign and units are infkit's: ``scores[t, j] = (1/N) grad m_t^T A^{-1} (grad l_j + l2 theta)``, the
removal effect (the DataInf paper's IF_i is the upweighting derivative, ``-N x`` this for the
validation loss). It approximates the GGN-based ``exact`` answer only loosely: empirical Fisher,
no cross-layer curvature, and an inverse-of-average swap whose error grows with the layer width.

Training gradients are kept in memory (in the model's dtype) when they fit in
``min(1 GiB, memory_limit / 4)``; otherwise every solve streams them again.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from infkit.blocks import BlockMode, layer_slices
from infkit.errors import CurvatureError, InvalidInputError, NotFittedError
from infkit.fitted import Fitted
from infkit.methods.base import Fidelity, PrimalMethod, register
from infkit.options import Options, option

#: gradients are cached up to this many bytes (and at most a quarter of the memory limit)
CACHE_BYTES = 1 << 30


@dataclasses.dataclass(frozen=True)
class DataInfOptions(Options):
    """Options of ``method="datainf"``."""

    aliases: ClassVar[Mapping[str, str]] = {"lambda_factor": "damping_scale"}

    layer_damping: Literal["auto"] | float | Sequence[float] | Mapping[str, float] = option(
        "auto",
        "'auto' (damping_scale x mean_i ||g_il||^2 / d_l per block), one number, or one per block",
        minimum=0,
    )
    damping_scale: float = option(
        0.1, "the constant of the automatic layer damping (the authors' 0.1)", minimum=0
    )
    blocks: BlockMode = option(
        "tensor", "one block per parameter 'tensor' (the authors' code), or per 'module'"
    )

    def unread(self, given: frozenset[str]) -> dict[str, str]:
        """``damping_scale`` beside a ``layer_damping`` of one's own."""
        found = super().unread(given)
        if self.layer_damping != "auto" and "damping_scale" in given:
            found["damping_scale"] = (
                "option 'damping_scale' scales layer_damping='auto', not a layer_damping of "
                "one's own"
            )
        return found


@register
class DataInf(PrimalMethod):
    """Layer-wise Sherman-Morrison closed form of the inverse empirical Fisher (no iterations).

    See docs/methods/datainf.md.
    """

    name = "datainf"
    estimators = ("if", "relatif")
    summary = "DataInf: layer-wise empirical Fisher, closed-form inverse-of-average (no solver)"
    Options = DataInfOptions
    scales = True
    curvature = "empirical-fisher"
    checks_scale = True
    scale_warning = 10.0
    # the inverse-of-average swap overestimates scores by 5-25x on the small problems
    fidelity = Fidelity(
        rtol=None, min_correlation=0.45, removal_correlation=0.3, scale=(1.0, 100.0)
    )
    #: the blocks' names, dampings and squared gradient norms; :meth:`state` adds the gradient
    #: cache when it is the method's own (the facade's cache is saved with the record)
    fitted_state = ("names", "layer_damping", "sq_norms")
    options: DataInfOptions

    def __init__(self, options: DataInfOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.names: list[str] = []
        self.slices: list[slice] = []
        self.layer_damping: Tensor | None = None  # [L], without l2 + damping
        self.sq_norms: Tensor | None = None  # [N, L] ||g_il||^2
        self._cache: Tensor | None = None  # [N, P] loss gradients, model dtype

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        blocks = layer_slices(fitted.space, self.options.blocks)
        self.names = [n for n, _ in blocks]
        self.slices = [sl for _, sl in blocks]
        n, p = fitted.n, fitted.space.size
        shared = fitted.train_gradients  # the facade's cache, when it has one
        if shared is not None:
            self._cache = shared
            self.sq_norms = self._block_norms(shared).cpu()
        else:
            keep = n * p * fitted.space.bytes_per_float() <= min(
                CACHE_BYTES, fitted.memory_limit // 4
            )
            self._cache = (
                torch.empty(n, p, dtype=fitted.space.dtype, device=fitted.space.device)
                if keep
                else None
            )
            norms = torch.empty(n, len(self.slices), dtype=torch.float64)
            for batch in fitted.train.batches(fitted.gradient_batch_size):
                G = fitted.engine.grads(batch, "loss")
                if self._cache is not None:
                    self._cache[batch.indices] = G
                norms[batch.indices] = self._block_norms(G).cpu()
            self.sq_norms = norms
        sizes = torch.tensor([sl.stop - sl.start for sl in self.slices], dtype=torch.float64)
        self.layer_damping = self._layer_damping(self.sq_norms.mean(0) / sizes)

    def state(self) -> dict[str, Any]:
        out = super().state()
        shared = self._cache is not None and self._cache is self.fitted.train_gradients
        out["cache"] = None if shared else self._cache
        out["cache_shared"] = shared
        return out

    def restore(self, fitted: Fitted, state: Mapping[str, Any]) -> None:
        super().restore(fitted, state)
        self.slices = [sl for _, sl in layer_slices(fitted.space, self.options.blocks)]
        self._cache = fitted.train_gradients if state["cache_shared"] else state["cache"]

    def scale_message(self, ratio: float) -> str:
        return (
            f"DataInf's scores come out about {ratio:.0f}x too large here: its inverse-of-average "
            "swap and empirical Fisher leave the curvature that much too small along gradient "
            "directions (energy ratio u^T (H + ridge) u / u^T v on a sample, 1 for an exact "
            "solve; docs/methods/datainf.md). Its order can be off too. Use it for rankings at "
            "most, raise the damping (damping, or l2 if the model was trained with it), or use "
            "a method that solves (cg, ekfac, exact)"
        )

    def _block_norms(self, G: Tensor) -> Tensor:
        """||g_il||^2 per example and block, [n, L], accumulated in float64 whatever G's dtype."""
        norms = [
            torch.linalg.vector_norm(G[:, sl], dim=1, dtype=torch.float64) for sl in self.slices
        ]
        return torch.stack(norms, dim=1).square()

    def _layer_damping(self, mean_square: Tensor) -> Tensor:
        option = self.options.layer_damping
        count = len(self.slices)
        if option == "auto":
            return self.options.damping_scale * mean_square
        if isinstance(option, (int, float)):
            values = [float(option)] * count
        elif isinstance(option, Mapping):
            missing = [n for n in self.names if n not in option]
            if missing:
                raise InvalidInputError(
                    f"layer_damping has no value for the block(s) {missing}; blocks: {self.names}"
                )
            model = self.fitted.task.model  # (a frozen parameter's value is moot, a typo's not)
            known = {name for name, _ in model.named_parameters()} | {
                name for name, _ in model.named_modules()
            }
            unknown = [n for n in option if n not in self.names and n not in known]
            if unknown:  # (a misspelt block's value was ignored)
                raise InvalidInputError(
                    f"layer_damping names block(s) {unknown} that the model does not have; "
                    f"blocks: {self.names}"
                )
            values = [float(option[n]) for n in self.names]
        else:
            values = [float(v) for v in option]
            if len(values) != count:
                raise InvalidInputError(
                    f"layer_damping has {len(values)} values but there are {count} blocks "
                    f"({self.names})"
                )
        if not all(0 <= v < math.inf for v in values):  # (NaN and infinity too)
            raise InvalidInputError(
                f"method 'datainf': layer_damping must be finite numbers >= 0, got {values}"
            )
        return torch.tensor(values, dtype=torch.float64)

    def _fitted_norms(self) -> tuple[Tensor, Tensor]:
        if self.layer_damping is None or self.sq_norms is None:
            raise NotFittedError("method 'datainf' is not fitted")
        return self.layer_damping, self.sq_norms

    def lambdas(self, shift: float = 0.0) -> Tensor:
        """lambda_l = layer damping + l2 + damping + shift, per block [L]."""
        layer_damping, _ = self._fitted_norms()
        lam = layer_damping + (self.fitted.ridge + shift)
        if bool((lam <= 0).any()):
            k = int((lam <= 0).nonzero()[0, 0])
            raise CurvatureError(
                f"DataInf's damping of block {self.names[k]!r} is {float(lam[k]):.3e} <= 0; the "
                "closed form divides by it: use layer_damping='auto' or pass damping > 0"
            )
        return lam

    def _gradient_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """(indices, loss gradients [B, P] in the model's dtype) over the training set."""
        fitted = self.fitted
        if self._cache is not None:
            for batch in fitted.train.batches(max(fitted.batch_size, 256)):
                yield batch.indices, self._cache[batch.indices].to(fitted.space.dtype)
            return
        for batch in fitted.train.batches(fitted.gradient_batch_size):
            yield batch.indices, fitted.engine.grads(batch, "loss")

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        V = V.to(torch.float64)
        lam = self.lambdas(shift).to(V.device)
        _, sq_norms = self._fitted_norms()
        # float32 products for float32 models, and for lower precisions too: the weights
        # 1 / (lambda_l + ||g_il||^2) reach 1e10 where a confident model's gradients are small,
        # past float16's range (65504: all-NaN scores on a tester's float16 classifier)
        dtype = torch.promote_types(self.fitted.space.dtype, torch.float32)
        V_low = V.to(dtype)
        correction = torch.zeros_like(V)
        for idx, G in self._gradient_batches():
            weights = (1.0 / (lam.unsqueeze(0) + sq_norms[idx].to(V.device))).to(dtype)
            for b, sl in enumerate(self.slices):
                Gl = G[:, sl].to(dtype)
                coef = (V_low[:, sl] @ Gl.T) * weights[:, b]  # [k, B]
                correction[:, sl] += (coef @ Gl).to(torch.float64)
        out = V - correction / self.fitted.n
        for b, sl in enumerate(self.slices):
            out[:, sl] /= lam[b]
        return out

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = super().describe()
        out.update(
            layer_damping=(
                None
                if self.layer_damping is None
                else dict(zip(self.names, self.layer_damping.tolist()))
            ),
            gradients_cached=self._cache is not None,
        )
        return out
