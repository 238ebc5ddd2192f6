"""The factors of per-example Jacobians from which kernel blocks ``J_a J_b^T`` are contracted.

For examples i, j with outputs f in R^C, the empirical NTK block is ``K_ij = J_i J_j^T`` (C x C),
with J taken at the engine's tangent point (docs/methods/dual.md §3). Three ways to form it
(``strategy``), all exact:

* ``"structured"``: for an ``nn.Linear`` whose input is one vector per example, the Jacobian of
  output c with respect to its weight is the outer product ``delta_i^c a_i^T`` (delta: the
  derivative of f^c with respect to the layer's output, a: the layer's input), so
  ``J_i^c . J_j^d = (delta_i^c . delta_j^d)(a_i . a_j + 1)`` (the 1 for the bias). It needs C
  backward passes per batch and costs (N C)^2 x width per layer instead of (N C)^2 x P: the rule
  neural-tangents calls structured derivatives. Parameters outside such layers (convolutions,
  norms, embeddings, shared weights, and a weight the forward pass also reads outside the
  layer's call: a tied decoder's, checked on the first batch) fall back to explicit Jacobians.
* ``"jacobian"``: explicit per-example Jacobians [B, C, P], contracted.
* ``"jvp"``: one block column's explicit Jacobian, then ``J_a J_b^T`` by forward-mode products
  (one JVP per row of J_b), cheaper than the contraction when C is large.

``"auto"`` takes ``"structured"`` when the model has such linear layers, else ``"jacobian"``.
The Jacobians themselves come from the one per-example engine, :class:`infkit.gradients.PerExample`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from infkit.data import Batch
from infkit.errors import UnsupportedError
from infkit.gradients import PerExample
from infkit.parameters import evaluation_mode

Strategy = Literal["auto", "structured", "jacobian", "jvp"]
STRATEGIES: tuple[Strategy, ...] = ("auto", "structured", "jacobian", "jvp")


@dataclass
class StructuredLayer:
    """A linear layer the structured rule covers: its module and trainable parameter names."""

    module: nn.Linear
    weight: str | None  # tangent-parameter name of the weight, when trainable
    bias: str | None


@dataclass
class Features:
    """Per-example factors of the Jacobians of a batch, enough to form any kernel block."""

    size: int
    deltas: list[Tensor] = field(default_factory=list)  # per structured layer [B, C, out]
    acts: list[Tensor | None] = field(default_factory=list)  # per structured layer [B, in]
    rest: Tensor | None = None  # explicit Jacobian of the remaining parameters [B, C, P_rest]
    inputs: Any = None  # the batch itself (strategy "jvp")

    def nbytes(self) -> int:
        tensors = [*self.deltas, *(a for a in self.acts if a is not None)]
        if self.rest is not None:
            tensors.append(self.rest)
        return sum(t.numel() * t.element_size() for t in tensors)


class TangentFeatures:
    """Jacobian factors and kernel blocks of a task at its engine's tangent point.

    Args:
        engine: the per-example engine (its tangent point and working dtype are used).
        strategy: how kernel blocks are formed (see the module docstring).
    """

    def __init__(self, engine: PerExample, strategy: str = "auto") -> None:
        if strategy not in STRATEGIES:
            raise UnsupportedError(f"unknown NTK strategy {strategy!r}; use one of {STRATEGIES}")
        self.engine = engine
        self.strategy = strategy
        self.layers: list[StructuredLayer] | None = None
        self.rest: list[str] | None = None

    # ------------------------------------------------------------------ structured layers
    def discover(self, batch: Batch) -> None:
        """Find the linear layers the structured rule covers exactly (one call, 2-D input)."""
        engine = self.engine
        module = engine.tangent_module
        owners: dict[int, int] = {}
        for mod in module.modules():
            for p in mod.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        trainable = set(engine.tangent_names)
        candidates: dict[str, StructuredLayer] = {}
        for prefix, mod in module.named_modules():
            if type(mod) is not nn.Linear:
                continue
            own = dict(mod.named_parameters(recurse=False))
            if any(owners[id(p)] > 1 for p in own.values()):
                continue  # tied weights: the Jacobian sums over uses
            full = {k: f"{prefix}.{k}" if prefix else k for k in own}
            w = full.get("weight") if full.get("weight") in trainable else None
            b = full.get("bias") if full.get("bias") in trainable else None
            if w is None and b is None:
                continue
            candidates[prefix] = StructuredLayer(mod, w, b)
        calls: dict[str, list[tuple[int, int, int]]] = {k: [] for k in candidates}
        handles = []
        for key, layer in candidates.items():

            def hook(mod: nn.Module, args: tuple[Any, ...], out: Any, key: str = key) -> None:
                x = args[0] if args else None
                dims = (x.dim(), x.shape[0]) if isinstance(x, Tensor) else (0, -1)
                calls[key].append((dims[0], dims[1], out.dim() if isinstance(out, Tensor) else 0))

            handles.append(layer.module.register_forward_hook(hook))
        try:
            inputs, _ = engine.prepare(batch)
            with torch.no_grad(), evaluation_mode(module):
                engine.tangent_call(engine.tangent_params(), inputs)
        finally:
            for h in handles:
                h.remove()
        n_examples = len(batch)
        called_once = [
            layer
            for key, layer in candidates.items()
            if len(calls[key]) == 1 and calls[key][0] == (2, n_examples, 2)
        ]
        self.layers = self._read_by_their_call_alone(called_once, batch) if called_once else []
        covered = {n for layer in self.layers for n in (layer.weight, layer.bias) if n}
        self.rest = [n for n in engine.tangent_names if n not in covered]

    def _read_by_their_call_alone(
        self, layers: list[StructuredLayer], batch: Batch
    ) -> list[StructuredLayer]:
        """The layers whose parameters the forward pass reads through the layer's one call
        alone: the gradient of a random projection of the outputs with respect to the weight
        is ``delta^T a`` (and the bias's ``sum delta``) of that call, to rounding. A weight the
        forward also reads itself (a tied decoder's ``F.linear(h, enc.weight.t())``, a slice
        ``h @ layer.weight[:, :3]``) gets more than the call's share: a tester's tied
        autoencoder's kernel was 0.32 off, its dual scores 0.95, with nothing said. Those are
        left to the explicit Jacobians."""
        names = [n for layer in layers for n in (layer.weight, layer.bias) if n]
        out, params, captured = self._hooked_pass(layers, batch)
        projection = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64
        ).to(out)
        zs = [captured[k][1] for k in range(len(layers))]
        grads = torch.autograd.grad(
            (out * projection).sum(), [params[n] for n in names] + zs, allow_unused=True
        )
        by_name = dict(zip(names, grads[: len(names)]))
        tolerance = torch.finfo(out.dtype).eps ** 0.5
        kept = []
        for k, layer in enumerate(layers):
            delta = grads[len(names) + k]
            if delta is None:
                continue
            expected = {layer.bias: delta.sum(0)} if layer.bias else {}
            if layer.weight:
                expected[layer.weight] = delta.T @ captured[k][0].to(delta)
            close = True
            for name, want in expected.items():
                got = by_name[name]
                got = torch.zeros_like(want) if got is None else got
                scale = float(got.norm()) + float(want.norm())
                close &= float((got - want).norm()) <= tolerance * max(scale, 1e-300)
            if close:
                kept.append(layer)
        return kept

    def _hooked_pass(
        self, layers: list[StructuredLayer], batch: Batch
    ) -> tuple[Tensor, dict[str, Tensor], dict[int, tuple[Tensor, Tensor]]]:
        """One forward pass of the batch with the layers' weights and biases requiring grad:
        the outputs, the parameters it ran at, and each layer k's (input, output)."""
        engine = self.engine
        inputs, _ = engine.prepare(batch)
        captured: dict[int, tuple[Tensor, Tensor]] = {}
        handles = []
        for k, layer in enumerate(layers):

            def hook(mod: nn.Module, args: tuple[Any, ...], out: Tensor, k: int = k) -> None:
                captured[k] = (args[0].detach(), out)

            handles.append(layer.module.register_forward_hook(hook))
        covered = {n for layer in layers for n in (layer.weight, layer.bias) if n}
        params = {
            n: t.detach().clone().requires_grad_(n in covered)
            for n, t in engine.tangent_params().items()
        }
        try:
            with torch.enable_grad(), evaluation_mode(engine.tangent_module):
                out = engine.tangent_call(params, inputs)
        finally:
            for h in handles:
                h.remove()
        return out, params, captured

    def resolved_strategy(self, batch: Batch) -> str:
        """The strategy actually used: ``"auto"`` resolved on the first batch."""
        if self.strategy in ("structured", "auto"):
            if self.layers is None:
                self.discover(batch)
            if self.layers or self.strategy == "structured":
                return "structured"
        return "jacobian" if self.strategy == "auto" else self.strategy

    def _structured(self, batch: Batch) -> Features:
        engine = self.engine
        layers = self.layers or []
        if not layers:  # (none the rule covers: every parameter's explicit Jacobian)
            return Features(len(batch), rest=engine.jacobians(batch, self.rest))
        out, _, captured = self._hooked_pass(layers, batch)
        bsz, c = out.shape
        zs = [captured[k][1] for k in range(len(layers))]
        deltas = [
            torch.zeros(bsz, c, z.shape[-1], dtype=engine.dtype, device=engine.device) for z in zs
        ]
        for ci in range(c):
            grads = torch.autograd.grad(
                out[:, ci].sum(), zs, retain_graph=ci < c - 1, allow_unused=True
            )
            for d, g in zip(deltas, grads):
                if g is not None:
                    d[:, ci] = g
        acts: list[Tensor | None] = [
            captured[k][0].to(engine.dtype) if layer.weight is not None else None
            for k, layer in enumerate(layers)
        ]
        rest = engine.jacobians(batch, self.rest) if self.rest else None
        return Features(len(batch), deltas, acts, rest)

    def features(self, batch: Batch) -> Features:
        """The factors of the batch's Jacobians that the chosen strategy contracts."""
        strategy = self.resolved_strategy(batch)
        if strategy == "structured":
            return self._structured(batch)
        if strategy == "jvp":
            return Features(len(batch), rest=self.engine.jacobians(batch), inputs=batch)
        return Features(len(batch), rest=self.engine.jacobians(batch))

    def kernel(self, a: Features, b: Features) -> Tensor:
        """The kernel block [B_a*C, B_b*C] between two batches' features."""
        engine = self.engine
        if a.inputs is not None and b.rest is not None and self.strategy == "jvp":
            # J_a J_b^T by forward-mode products of the rows of J_b
            nb, c, p = b.rest.shape
            prod = engine.jvp(a.inputs, b.rest.reshape(nb * c, p))  # [nb*c, na, c]
            return prod.permute(1, 2, 0).reshape(a.size * prod.shape[2], nb * c)
        K: Tensor | None = None
        for Da, Aa, Db, Ab, layer in zip(a.deltas, a.acts, b.deltas, b.acts, self.layers or []):
            na, c, _ = Da.shape
            nb = Db.shape[0]
            DD = Da.reshape(na * c, -1) @ Db.reshape(nb * c, -1).T
            if layer.weight is not None and Aa is not None and Ab is not None:
                AA = Aa @ Ab.T
                if layer.bias is not None:
                    AA = AA + 1.0
            else:
                AA = torch.ones(na, nb, dtype=engine.dtype, device=engine.device)
            block = (DD.reshape(na, c, nb, c) * AA[:, None, :, None]).reshape(na * c, nb * c)
            K = block if K is None else K + block
        if a.rest is not None and b.rest is not None:
            na, c, _ = a.rest.shape
            nb = b.rest.shape[0]
            block = a.rest.reshape(na * c, -1) @ b.rest.reshape(nb * c, -1).T
            K = block if K is None else K + block
        if K is None:
            raise UnsupportedError("the model has no trainable parameters to form a kernel from")
        return K
