"""The empirical neural tangent kernel (NTK) with full C x C blocks, and tangent-space products.

For examples i, j with outputs f in R^C, the empirical NTK block is ``K_ij = J_i J_j^T`` (C x C),
J_i = df(x_i)/dtheta evaluated at a chosen point (the trained parameters, or the initial ones for
the linearised setting of methods.md §1.2). The Gram matrix ``K`` is stored as an
``[N1*C, N2*C]`` matrix whose row ``i*C + c`` is output c of example i, so block (i, j) is
``K[i*C:(i+1)*C, j*C:(j+1)*C]``.

Three ways to compute it (``strategy``), all exact:

* ``"structured"``: for every ``nn.Linear`` whose input is one vector per example, the Jacobian
  of output c with respect to its weight is the outer product delta_i^c a_i^T (delta: the
  derivative of f^c with respect to the layer's output, a: the layer's input), so that
  ``J_i^c . J_j^d = (delta_i^c . delta_j^d)(a_i . a_j + 1)`` (the 1 for the bias). This needs
  C backward passes per batch and costs (N C)^2 * width flops per layer instead of
  (N C)^2 * P: the trick neural-tangents calls structured derivatives. Parameters outside such
  layers (convolutions, norms, embeddings, shared weights) fall back to explicit Jacobians.
* ``"jacobian"``: explicit per-example Jacobians [B, C, P] (``vmap(jacrev)``), contracted.
* ``"jvp"``: one block column's Jacobian J_b, then ``J_a J_b^T`` as forward-mode products
  (one JVP per row of J_b), cheaper than the contraction when C is large.

``"auto"`` takes ``"structured"`` when the model has such linear layers, else ``"jacobian"``.
Everything is evaluated in float64 by default (parameters, buffers and float inputs are cast;
the model itself is not modified). The Gram matrix is computed blockwise; the per-example
factors of the column set are kept in memory when they fit and recomputed otherwise, and the
(N1 C) x (N2 C) result is checked against the memory limit before it is allocated.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from infkit.data import Batch, ExampleSet, map_tensors
from infkit.errors import InvalidInputError, ProblemTooLargeError, UnsupportedError
from infkit.gradients import evaluation_mode
from infkit.parameters import ParameterSpace, human_bytes
from infkit.task import Task, default_output_fn

STRATEGIES = ("auto", "structured", "jacobian", "jvp")
#: tangents pushed through the model at once by ``jvp`` / ``vjp`` with several directions
TANGENT_CHUNK = 64


def _unsqueeze(obj: Any) -> Any:
    return map_tensors(obj, lambda t: t.unsqueeze(0))


def _cast(obj: Any, dtype: torch.dtype, device: torch.device) -> Any:
    def cast(t: Tensor) -> Tensor:
        t = t.to(device)
        return t.to(dtype) if t.is_floating_point() else t

    return map_tensors(obj, cast)


def scalable_alternatives(exclude: str = "dual") -> str:
    """The registered methods that scale, as text for error messages."""
    from infkit.methods import scalable_methods

    names = [repr(m) for m in scalable_methods() if m != exclude]
    return ", ".join(names) if names else "none registered"


def check_kernel_memory(rows: int, cols: int, limit: int, what: str, copies: int = 1) -> None:
    """Raise ProblemTooLargeError when ``copies`` float64 [rows, cols] matrices exceed ``limit``."""
    need = rows * cols * 8 * copies
    if need > limit:
        raise ProblemTooLargeError(
            f"the {what} is a dense {rows:,} x {cols:,} matrix (N*C rows and columns); with its "
            f"working copies it needs {human_bytes(need)}, above the memory limit of "
            f"{human_bytes(limit)}. The dual method's memory grows as (N*C)^2: use a method that "
            f"scales with N instead: {scalable_alternatives()}; or attribute a subset of the "
            "training data, or raise memory_limit."
        )


@dataclass
class _Layer:
    """A linear layer handled by the structured rule."""

    module: nn.Linear
    weight: str | None  # flat-parameter name of the weight when trainable
    bias: str | None


@dataclass
class Features:
    """Per-example factors of the Jacobians of a batch, enough to form any kernel block."""

    size: int
    deltas: list[Tensor] = field(default_factory=list)  # per linear layer [B, C, out]
    acts: list[Tensor | None] = field(default_factory=list)  # per linear layer [B, in]
    rest: Tensor | None = None  # explicit Jacobian of the remaining parameters [B, C, P_rest]
    inputs: Any = None  # the prepared inputs (strategy "jvp")

    def nbytes(self) -> int:
        total = sum(t.numel() for t in self.deltas) + sum(
            t.numel() for t in self.acts if t is not None
        )
        total += 0 if self.rest is None else self.rest.numel()
        return 8 * total


class TangentModel:
    """A task's outputs at the trained parameters and its tangent map at a chosen point.

    Outputs, the loss derivatives g = dl/df and Lambda = d^2 l/df^2, and measurement gradients
    are evaluated at the model's current (trained) parameters theta*. The Jacobian J, its
    products ``J w`` / ``J^T u`` and the NTK are evaluated at ``at`` (default theta*). For an
    :class:`infkit.linearize.LinearizedModel` the Jacobian is that of the wrapped network at its
    expansion point, the same at every theta, and it is computed on the wrapped network directly.

    Args:
        task: the task; its model is never modified.
        space: the trainable parameters of ``task.model``.
        at: where to evaluate J: None (theta*), a flat [P] tensor or a dict by parameter name.
        dtype: the working dtype (float64 by default).
        strategy: how kernels are formed (see the module docstring).
    """

    def __init__(
        self,
        task: Task,
        space: ParameterSpace,
        *,
        at: Tensor | dict[str, Tensor] | None = None,
        dtype: torch.dtype = torch.float64,
        strategy: str = "auto",
    ) -> None:
        if strategy not in STRATEGIES:
            raise UnsupportedError(f"unknown NTK strategy {strategy!r}; use one of {STRATEGIES}")
        from infkit.linearize import LinearizedModel

        self.task = task
        self.space = space
        self.dtype = dtype
        self.device = space.device
        self.strategy = strategy
        self.size = space.size
        model = task.model
        if isinstance(model, LinearizedModel):
            self.jac_module: nn.Module = model.base
            self.jac_names: list[str] = list(model.base_names)
            self.jac_output_fn: Callable[[Any], Tensor] = model.output_fn
            point = model.params0()
            consts = model.base_constants()
        else:
            self.jac_module = model
            self.jac_names = list(space.names)
            self.jac_output_fn = task.output_fn
            if at is None:
                point = space.params()
            elif isinstance(at, Tensor):
                point = space.unflatten(at.reshape(-1).to(space.device))
            else:
                missing = [n for n in space.names if n not in at]
                if missing:
                    raise InvalidInputError(
                        f"the expansion point has no value for the trainable parameter(s) "
                        f"{missing[:5]}; pass a flat [P] tensor or a dict by parameter name"
                    )
                point = {n: at[n] for n in space.names}
            consts = space.constants()
        if sum(point[n].numel() for n in self.jac_names) != self.size:
            raise InvalidInputError("the expansion point does not match the model's parameters")
        self.jac_params = {n: point[n].detach().to(self.device, dtype) for n in self.jac_names}
        self.jac_consts = {n: _cast(t.detach(), dtype, self.device) for n, t in consts.items()}
        self.out_params = {n: t.to(dtype) for n, t in space.params().items()}
        self.out_consts = {n: _cast(t, dtype, self.device) for n, t in space.constants().items()}
        self._layers: list[_Layer] | None = None
        self._rest: list[str] | None = None

    # ------------------------------------------------------------------ evaluation
    def prepare(self, batch: Batch) -> tuple[Any, Any]:
        inputs = _cast(batch.inputs, self.dtype, self.device)
        targets = map_tensors(batch.targets, lambda t: t.to(self.device))
        return inputs, targets

    def _call(self, module: nn.Module, state: dict[str, Tensor], inputs: Any, out_fn) -> Tensor:
        def fn(*args: Any, **kwargs: Any) -> Any:
            return functional_call(module, state, args, kwargs)

        raw = fn(**inputs) if isinstance(inputs, dict) else fn(inputs)
        return out_fn(raw)

    def _jac_call(self, params: dict[str, Tensor], inputs: Any) -> Tensor:
        out = self._call(self.jac_module, {**params, **self.jac_consts}, inputs, self.jac_output_fn)
        return out.reshape(out.shape[0], -1)

    def _flat(self, tensors: dict[str, Tensor], batch_dims: int) -> Tensor:
        parts = [tensors[n].reshape(*tensors[n].shape[:batch_dims], -1) for n in self.jac_names]
        return torch.cat(parts, dim=-1)

    def _unflat(self, vector: Tensor) -> dict[str, Tensor]:
        out, start = {}, 0
        lead = vector.shape[:-1]
        for n in self.jac_names:
            shape = self.jac_params[n].shape
            k = int(torch.Size(shape).numel())
            out[n] = vector[..., start : start + k].reshape(*lead, *shape)
            start += k
        return out

    @torch.no_grad()
    def outputs(self, batch: Batch) -> Tensor:
        """Flattened outputs [B, C] at theta*."""
        inputs, _ = self.prepare(batch)
        with evaluation_mode(self.task.model):
            out = self.task.call_model(
                lambda *a, **k: functional_call(
                    self.task.model, {**self.out_params, **self.out_consts}, a, k
                ),
                inputs,
            )
        return out.reshape(out.shape[0], -1)

    def _raw_outputs(self, batch: Batch) -> tuple[Tensor, Any]:
        inputs, targets = self.prepare(batch)
        with torch.no_grad(), evaluation_mode(self.task.model):
            out = self.task.call_model(
                lambda *a, **k: functional_call(
                    self.task.model, {**self.out_params, **self.out_consts}, a, k
                ),
                inputs,
            )
        if isinstance(targets, Tensor) and targets.is_floating_point():
            targets = targets.to(self.dtype)
        return out, targets

    def output_derivatives(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        """f [B, C], g = dl/df [B, C] and Lambda = d^2 l/df^2 [B, C, C] at theta*."""
        out, targets = self._raw_outputs(batch)
        g = self._output_gradient(out, targets, self.task.checked_loss)
        lam = self.task.lambda_blocks(out, targets).to(self.dtype)
        return out.reshape(out.shape[0], -1), g, lam

    def measurement_gradients(self, batch: Batch) -> Tensor:
        """h = dm/df [B, C] at theta* (the measurement's output-space gradient)."""
        out, targets = self._raw_outputs(batch)
        return self._output_gradient(out, targets, self.task.checked_measurement)

    def _output_gradient(self, out: Tensor, targets: Any, fn) -> Tensor:
        b, shape = out.shape[0], out.shape[1:]
        with torch.enable_grad():
            f = out.reshape(b, -1).detach().requires_grad_(True)
            (g,) = torch.autograd.grad(fn(f.reshape(b, *shape), targets).sum(), f)
        if not torch.isfinite(g).all():
            raise InvalidInputError("the output-space loss/measurement gradient is not finite")
        return g.detach()

    # ------------------------------------------------------------------ tangent products
    def jvp(self, batch: Batch, directions: Tensor) -> Tensor:
        """J w at the expansion point: [B, C] for w [P], or [k, B, C] for w [k, P]."""
        inputs, _ = self.prepare(batch)
        W = directions.to(self.device, self.dtype)
        single = W.dim() == 1
        W = W.reshape(-1, self.size)

        def push(t: dict[str, Tensor]) -> Tensor:
            return jvp(lambda p: self._jac_call(p, inputs), (self.jac_params,), (t,))[1]

        with evaluation_mode(self.task.model), evaluation_mode(self.jac_module):
            parts = []
            for start in range(0, W.shape[0], TANGENT_CHUNK):
                chunk = self._unflat(W[start : start + TANGENT_CHUNK])
                if chunk[self.jac_names[0]].shape[0] == 1:
                    parts.append(push({n: t[0] for n, t in chunk.items()}).unsqueeze(0))
                else:
                    parts.append(vmap(push)(chunk))
            out = torch.cat(parts).detach()
        return out[0] if single else out

    def vjp(self, batch: Batch, cotangents: Tensor) -> Tensor:
        """J^T u at the expansion point: [P] for u [B, C], or [k, P] for u [k, B, C]."""
        inputs, _ = self.prepare(batch)
        U = cotangents.to(self.device, self.dtype)
        single = U.dim() == 2
        U = U.reshape(-1, *U.shape[-2:])
        with evaluation_mode(self.task.model), evaluation_mode(self.jac_module):
            _, pull = vjp(lambda p: self._jac_call(p, inputs), self.jac_params)
            parts = []
            for start in range(0, U.shape[0], TANGENT_CHUNK):
                chunk = U[start : start + TANGENT_CHUNK]
                if chunk.shape[0] == 1:
                    parts.append(self._flat(pull(chunk[0])[0], 0).unsqueeze(0))
                else:
                    parts.append(self._flat(vmap(pull)(chunk)[0], 1))
            out = torch.cat(parts).detach()
        return out[0] if single else out

    def jacobians(self, batch: Batch, names: list[str] | None = None) -> Tensor:
        """Per-example Jacobians [B, C, P] at the expansion point (or of the ``names`` subset)."""
        inputs, _ = self.prepare(batch)
        names = self.jac_names if names is None else names
        sub = {n: self.jac_params[n] for n in names}
        fixed = {n: t for n, t in self.jac_params.items() if n not in sub}

        def single(p: dict[str, Tensor], x: Any) -> Tensor:
            return self._jac_call({**fixed, **p}, _unsqueeze(x)).reshape(-1)

        with evaluation_mode(self.task.model), evaluation_mode(self.jac_module):
            try:
                jac = vmap(jacrev(single), in_dims=(None, 0))(sub, inputs)
            except Exception:  # modules vmap cannot trace: one example at a time, exactly
                rows = []
                for i in range(len(batch)):
                    x = map_tensors(inputs, lambda t, i=i: t[i])
                    rows.append(jacrev(single)(sub, x))
                jac = {n: torch.stack([r[n] for r in rows]) for n in names}
        return torch.cat([jac[n].reshape(*jac[n].shape[:2], -1) for n in names], dim=-1).detach()

    # ------------------------------------------------------------------ structured layers
    def _discover(self, batch: Batch) -> None:
        """Find the linear layers the structured rule covers exactly (one call, 2-D input)."""
        owners: dict[int, int] = {}
        for mod in self.jac_module.modules():
            for p in mod.parameters(recurse=False):
                owners[id(p)] = owners.get(id(p), 0) + 1
        trainable = set(self.jac_names)
        candidates: dict[str, _Layer] = {}
        for prefix, mod in self.jac_module.named_modules():
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
            candidates[prefix] = _Layer(mod, w, b)
        calls: dict[str, list[tuple[int, int]]] = {k: [] for k in candidates}
        handles = []
        for key, layer in candidates.items():

            def hook(mod, args, out, key=key) -> None:
                x = args[0] if args else None
                dims = (x.dim(), x.shape[0]) if isinstance(x, Tensor) else (0, -1)
                calls[key].append((dims[0], dims[1], out.dim() if isinstance(out, Tensor) else 0))

            handles.append(layer.module.register_forward_hook(hook))
        try:
            inputs, _ = self.prepare(batch)
            with torch.no_grad(), evaluation_mode(self.jac_module):
                self._jac_call(self.jac_params, inputs)
        finally:
            for h in handles:
                h.remove()
        b = len(batch)
        self._layers = [
            layer
            for key, layer in candidates.items()
            if len(calls[key]) == 1 and calls[key][0] == (2, b, 2)
        ]
        covered = {n for layer in self._layers for n in (layer.weight, layer.bias) if n}
        self._rest = [n for n in self.jac_names if n not in covered]

    def resolved_strategy(self, batch: Batch) -> str:
        if self.strategy == "structured" or self.strategy == "auto":
            if self._layers is None:
                self._discover(batch)
            if self._layers:
                return "structured"
            if self.strategy == "structured":
                return "structured"  # nothing structured: every parameter is in the rest
        return "jacobian" if self.strategy == "auto" else self.strategy

    def _structured(self, batch: Batch) -> Features:
        inputs, _ = self.prepare(batch)
        captured: dict[int, tuple[Tensor, Tensor]] = {}
        handles = []
        for k, layer in enumerate(self._layers):

            def hook(mod, args, out, k=k) -> None:
                captured[k] = (args[0].detach(), out)

            handles.append(layer.module.register_forward_hook(hook))
        covered = {n for layer in self._layers for n in (layer.weight, layer.bias) if n}
        params = {
            n: t.detach().clone().requires_grad_(n in covered) for n, t in self.jac_params.items()
        }
        try:
            with torch.enable_grad(), evaluation_mode(self.jac_module):
                out = self._jac_call(params, inputs)
        finally:
            for h in handles:
                h.remove()
        bsz, c = out.shape
        zs = [captured[k][1] for k in range(len(self._layers))]
        deltas = [
            torch.zeros(bsz, c, z.shape[-1], dtype=self.dtype, device=self.device) for z in zs
        ]
        for ci in range(c):
            grads = torch.autograd.grad(
                out[:, ci].sum(), zs, retain_graph=ci < c - 1, allow_unused=True
            )
            for d, g in zip(deltas, grads):
                if g is not None:
                    d[:, ci] = g
        acts = [
            captured[k][0].to(self.dtype) if layer.weight is not None else None
            for k, layer in enumerate(self._layers)
        ]
        rest = self.jacobians(batch, self._rest) if self._rest else None
        return Features(len(batch), deltas, acts, rest)

    def features(self, batch: Batch) -> Features:
        """The factors of the batch's Jacobians that the chosen strategy contracts."""
        strategy = self.resolved_strategy(batch)
        if strategy == "structured":
            return self._structured(batch)
        if strategy == "jvp":
            return Features(len(batch), rest=self.jacobians(batch), inputs=batch)
        return Features(len(batch), rest=self.jacobians(batch))

    def kernel(self, a: Features, b: Features) -> Tensor:
        """The kernel block [B_a*C, B_b*C] between two batches' features."""
        if a.inputs is not None and b.rest is not None and self.strategy == "jvp":
            # J_a J_b^T by forward-mode products of the rows of J_b
            nb, c, p = b.rest.shape
            prod = self.jvp(a.inputs, b.rest.reshape(nb * c, p))  # [nb*c, na, c]
            return prod.permute(1, 2, 0).reshape(a.size * prod.shape[2], nb * c)
        K = None
        for Da, Aa, Db, Ab, layer in zip(a.deltas, a.acts, b.deltas, b.acts, self._layers or []):
            na, c, _ = Da.shape
            nb = Db.shape[0]
            DD = Da.reshape(na * c, -1) @ Db.reshape(nb * c, -1).T
            if layer.weight is not None:
                AA = Aa @ Ab.T
                if layer.bias is not None:
                    AA = AA + 1.0
            else:
                AA = torch.ones(na, nb, dtype=self.dtype, device=self.device)
            block = (DD.reshape(na, c, nb, c) * AA[:, None, :, None]).reshape(na * c, nb * c)
            K = block if K is None else K + block
        if a.rest is not None:
            na, c, _ = a.rest.shape
            nb = b.rest.shape[0]
            block = a.rest.reshape(na * c, -1) @ b.rest.reshape(nb * c, -1).T
            K = block if K is None else K + block
        if K is None:
            raise UnsupportedError("the model has no trainable parameters to form a kernel from")
        return K


def column_features(
    model: TangentModel, cols: ExampleSet, batch_size: int, budget: int
) -> list[Features] | None:
    """The per-batch features of ``cols`` when they fit in ``budget`` bytes, else None."""
    out: list[Features] = []
    used = 0
    for batch in cols.batches(batch_size):
        f = model.features(batch)
        used += f.nbytes()
        if used > budget:
            return None
        out.append(f)
    return out


def kernel_rows(
    model: TangentModel,
    batch: Batch,
    cols: ExampleSet,
    *,
    batch_size: int = 256,
    col_features: list[Features] | None = None,
    features: Features | None = None,
) -> Tensor:
    """The kernel between one batch and a whole example set, [B*C, N_cols*C]."""
    fa = model.features(batch) if features is None else features
    parts = []
    if col_features is not None:
        for fb in col_features:
            parts.append(model.kernel(fa, fb))
    else:
        for bb in cols.batches(batch_size):
            parts.append(model.kernel(fa, model.features(bb)))
    return torch.cat(parts, dim=1)


def kernel_matrix(
    model: TangentModel,
    rows: ExampleSet,
    cols: ExampleSet | None = None,
    *,
    batch_size: int = 256,
    memory_limit: int | None = None,
    cache_bytes: int | None = None,
    col_features: list[Features] | None = None,
    progress: bool = False,
) -> Tensor:
    """The empirical NTK between two example sets, [N_rows*C, N_cols*C] in the working dtype.

    ``cols=None`` computes the symmetric Gram matrix of ``rows`` (upper blocks, mirrored). The
    per-example factors of the columns are kept when they fit in ``cache_bytes`` (default a
    quarter of ``memory_limit``), else recomputed for every row block; ``col_features`` (from
    :func:`column_features` with the same ``batch_size``) reuses factors computed before.
    """
    from tqdm.auto import tqdm

    from infkit.influence import default_memory_limit

    limit = memory_limit or default_memory_limit()
    symmetric = cols is None
    cols = rows if cols is None else cols
    c = model.outputs(rows.take([0])).shape[1]
    n_r, n_c = len(rows), len(cols)
    check_kernel_memory(n_r * c, n_c * c, limit, "empirical NTK")
    K = torch.empty(n_r * c, n_c * c, dtype=model.dtype, device=model.device)
    budget = limit // 4 if cache_bytes is None else cache_bytes
    cached = col_features
    if cached is None:
        cached = column_features(model, cols, batch_size, budget)
    col_batches = list(cols.batches(batch_size))
    row_batches = col_batches if symmetric else list(rows.batches(batch_size))
    for ia, ba in enumerate(tqdm(row_batches, desc="NTK", disable=not progress)):
        fa = cached[ia] if (symmetric and cached is not None) else model.features(ba)
        ra = _span(ba, c)
        for ib, bb in enumerate(col_batches):
            if symmetric and ib < ia:
                continue
            fb = cached[ib] if cached is not None else model.features(bb)
            block = model.kernel(fa, fb)
            cb = _span(bb, c)
            if symmetric and ib == ia:
                block = 0.5 * (block + block.T)
            K[ra, cb] = block
            if symmetric and ib > ia:
                K[cb, ra] = block.T
    return K


def _span(batch: Batch, c: int) -> slice:
    # batches come in order over a contiguous range
    start = int(batch.indices[0]) * c
    return slice(start, start + len(batch) * c)


def empirical_ntk(
    model: nn.Module | Task,
    x1: Any,
    x2: Any = None,
    *,
    params: Tensor | dict[str, Tensor] | None = None,
    dtype: torch.dtype = torch.float64,
    strategy: str = "auto",
    batch_size: int = 256,
    memory_limit: int | None = None,
    output_fn: Callable[[Any], Tensor] = default_output_fn,
) -> Tensor:
    """The empirical NTK ``J(x1) J(x2)^T`` with full C x C blocks, [N1*C, N2*C].

    Args:
        model: a module (or a Task); its trainable parameters are theta.
        x1, x2: inputs (a tensor [N, ...] or a dict of them); ``x2=None`` means ``x2 = x1``.
        params: where to evaluate J (flat [P] or a dict by name); default the current values.
        dtype: working dtype; strategy: ``"auto"``, ``"structured"``, ``"jacobian"``, ``"jvp"``.

    Block (i, j) is ``K[i*C:(i+1)*C, j*C:(j+1)*C] = J(x1_i) J(x2_j)^T``.
    """
    task = model if isinstance(model, Task) else Task(model, _no_loss, output_fn=output_fn)
    space = ParameterSpace(task.model)
    tm = TangentModel(task, space, at=params, dtype=dtype, strategy=strategy)
    a = ExampleSet((x1, _dummy_targets(x1)), name="x1")
    b = None if x2 is None else ExampleSet((x2, _dummy_targets(x2)), name="x2")
    return kernel_matrix(tm, a, b, batch_size=batch_size, memory_limit=memory_limit)


def _no_loss(outputs: Tensor, targets: Any) -> Tensor:
    return outputs.reshape(outputs.shape[0], -1).sum(1) * 0


def _dummy_targets(x: Any) -> Tensor:
    lead = x if isinstance(x, Tensor) else next(iter(x.values()))
    return torch.zeros(lead.shape[0])
