"""The trainable parameters theta of a model as one flat vector of length P, and its eval mode.

Only parameters with ``requires_grad=True`` are parameters; frozen parameters and buffers are
constants. The flat order is ``model.parameters()`` order, which is the order of every ``[P]``
tensor infkit returns. Every quantity infkit computes from a model is computed in evaluation
mode (:func:`evaluation_mode`: deterministic dropout and batch normalisation).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

from infkit.errors import InvalidInputError, warn


def product_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """dtype of gradient products and caches: float64 for float64 models, else float32.

    A float32 cache takes half the memory and makes score products twice as fast; the gradients
    of a float32 (or lower-precision) model carry no more precision than that.
    """
    return torch.float64 if model_dtype == torch.float64 else torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    """A dtype's name without the module, as records and messages write it: ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def coarsest_dtype(model: nn.Module) -> torch.dtype | None:
    """The floating-point dtype of ``model``'s parameters and buffers with the largest rounding
    (bfloat16 before float16 before float32), or None when it has none: the precision its
    outputs are computed in at best (a float32 body under a float64 head rounds as float32)."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    return max(dtypes, key=lambda d: torch.finfo(d).eps, default=None)


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Run with ``model.eval()`` (deterministic dropout / batch-norm), restoring the mode after
    (:func:`in_mode`)."""
    with in_mode(model, training=False):
        yield


def _every_module(model: nn.Module) -> list[nn.Module]:
    """``model.modules()``, and those of a module one of them holds outside its submodules
    (a ``LinearizedModel``'s base network: a reviewer's evaluation-mode submodule came back in
    training mode)."""
    found: dict[int, nn.Module] = {}
    stack = [model]
    while stack:
        module = stack.pop()
        if id(module) in found:
            continue
        found[id(module)] = module
        stack += list(module.children())
        stack += [v for v in vars(module).values() if isinstance(v, nn.Module)]
    return list(found.values())


@contextlib.contextmanager
def in_mode(model: nn.Module, training: bool) -> Iterator[None]:
    """Run with every module of ``model`` in training mode or evaluation mode, restoring each
    module's own mode after: ``model.train(was)`` sets every submodule alike, and a frozen
    backbone the user had put in evaluation mode inside a model in training mode came back
    in training mode, its dropout on (a tester's)."""
    was = model.training
    modes = [(module, module.training) for module in _every_module(model)]
    model.train(training)
    try:
        yield
    finally:
        # the model's own mode first: a module its forward made meanwhile (one per shape) takes
        # it, as model.train(was) gave it (a reviewer's, left in training mode, drew dropout)
        model.train(was)
        for module, mode in modes:
            module.training = mode


class ParameterSpace:
    """Maps between a model's trainable parameters and flat vectors in R^P.

    ``names`` restricts theta to those trainable parameters (the others are held fixed, like
    frozen ones): how a method attributes through part of a model.
    """

    def __init__(self, model: nn.Module, names: Sequence[str] | None = None) -> None:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if names is not None:
            wanted = set(names)
            unknown = sorted(wanted - {n for n, _ in named})
            if unknown:
                raise InvalidInputError(
                    f"{unknown[:5]} are not trainable parameters of the model; "
                    "attributed parameters must have requires_grad=True"
                )
            named = [(n, p) for n, p in named if n in wanted]
        if not named:
            raise InvalidInputError(
                "the model has no trainable parameters (every parameter has requires_grad=False); "
                "mark the parameters to attribute with requires_grad=True"
            )
        self.model = model
        self.names: list[str] = [n for n, _ in named]
        self.shapes: list[torch.Size] = [p.shape for _, p in named]
        self.numels: list[int] = [p.numel() for _, p in named]
        self.offsets: list[int] = [0]
        for k in self.numels:
            self.offsets.append(self.offsets[-1] + k)
        self.size: int = self.offsets[-1]
        dtypes = {p.dtype for _, p in named}
        if len(dtypes) != 1:
            raise InvalidInputError(
                f"trainable parameters have mixed dtypes {sorted(map(str, dtypes))}; "
                "cast the model to one dtype (e.g. model.double())"
            )
        self.dtype: torch.dtype = named[0][1].dtype
        self.device: torch.device = named[0][1].device

    def params(self) -> dict[str, Tensor]:
        """Detached current values of the trainable parameters, by name."""
        current = dict(self.model.named_parameters())
        return {n: current[n].detach() for n in self.names}

    def constants(self) -> dict[str, Tensor]:
        """Frozen parameters and buffers: everything functional_call needs besides theta."""
        consts = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}
        consts.update(dict(self.model.named_buffers()))
        return consts

    def flat(self) -> Tensor:
        """theta as a flat vector [P]."""
        return torch.cat([t.reshape(-1) for t in self.params().values()])

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """A flat vector [P] as a dict of parameter-shaped views."""
        if vector.shape[-1] != self.size:
            raise InvalidInputError(
                f"expected a vector of length P={self.size}, got {tuple(vector.shape)}"
            )
        lead = vector.shape[:-1]
        return {
            n: vector[..., a:b].reshape((*lead, *s))
            for n, s, a, b in zip(self.names, self.shapes, self.offsets[:-1], self.offsets[1:])
        }

    def flatten(self, tensors: Mapping[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Parameter-shaped tensors (with ``batch_dims`` leading dims) as [..., P]."""
        parts = []
        for n in self.names:
            t = tensors[n]
            lead = t.shape[:batch_dims]
            parts.append(t.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    def module_slices(self) -> dict[str, slice]:
        """Slices of the flat vector belonging to each parameter name."""
        return {n: slice(a, b) for n, a, b in zip(self.names, self.offsets[:-1], self.offsets[1:])}

    @torch.no_grad()
    def add_(self, delta: Tensor) -> None:
        """theta <- theta + delta, in place on the model."""
        current = dict(self.model.named_parameters())
        for n, v in self.unflatten(delta.to(self.dtype)).items():
            current[n].add_(v)

    @torch.no_grad()
    def assign_(self, vector: Tensor) -> None:
        """theta <- vector, in place on the model."""
        current = dict(self.model.named_parameters())
        for n, v in self.unflatten(vector.to(self.dtype)).items():
            current[n].copy_(v)

    def bytes_per_float(self) -> int:
        return torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 8

    def __repr__(self) -> str:
        return f"ParameterSpace(P={self.size}, tensors={len(self.names)}, dtype={self.dtype})"


#: modules that compute something else in training mode than in evaluation mode
MODE_DEPENDENT = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def _mode_dependent(module: nn.Module) -> bool:
    """Whether ``module`` computes otherwise in training mode: batch norms, dropouts, instance
    norms that track statistics, attention with dropout, and modules named for dropping
    (DropPath, DropBlock: a reviewer's timm-style DropPath and attention dropout went unnamed).
    A dropout that drops nothing (``p`` or ``drop_prob`` 0: a tester's ``nn.Dropout(0.0)``,
    as configs switch dropout off) computes the same in both modes."""
    dropping = isinstance(module, nn.modules.dropout._DropoutNd) or type(
        module
    ).__name__.startswith("Drop")
    if dropping:
        rate = getattr(module, "p", getattr(module, "drop_prob", None))
        numeric = isinstance(rate, (int, float)) and not isinstance(rate, bool)
        return not (numeric and rate == 0)
    if isinstance(module, MODE_DEPENDENT):
        return True
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return bool(module.track_running_stats)
    if isinstance(module, nn.MultiheadAttention):
        return module.dropout > 0
    return False


def warn_about_training_mode(model: nn.Module) -> None:
    """Warn (once per fit or training run) when mode-dependent modules of the model are in
    training mode, naming them (a model in evaluation mode holding one in training mode too).

    infkit evaluates every quantity, and replays every recipe, in evaluation mode: dropout off,
    batch normalisation on its running statistics, which is the deterministic function the
    scores describe.
    """
    names = [  # (those in training mode: a backbone the user put in evaluation mode is not)
        f"{name!r} ({type(module).__name__})" if name else type(module).__name__
        for name, module in model.named_modules()
        if module.training and _mode_dependent(module)
    ]
    if names:
        shown = ", ".join(names[:6]) + (" ..." if len(names) > 6 else "")
        warn(
            f"the model has modules in training mode that behave differently in evaluation "
            f"mode ({shown}); infkit runs it in evaluation mode (dropout off, batch norm on its "
            "running statistics). Call model.eval() first to make that explicit (and silence "
            "this warning)",
            UserWarning,
        )
