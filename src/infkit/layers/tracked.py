"""Which layers Kronecker-factored curvature covers, and how their parameters are laid out.

A *tracked* layer computes ``s = W a (+ b)`` at every position t of its input (a token, a pixel
patch, or a single position for a plain [B, d] input):

* ``nn.Linear``: weight [d_out, d_in], input [B, ..., d_in];
* ``nn.Conv2d`` (``groups=1``): weight [C_out, C_in, kh, kw] as a [C_out, C_in*kh*kw] matrix
  acting on unfolded patches, one position per output pixel;
* ``nn.Conv1d`` (``groups=1``): weight [C_out, C_in, k] as a [C_out, C_in*k] matrix acting on
  unfolded windows, one position per output step (a signal's or a sequence's);
* Hugging Face ``Conv1D`` (GPT-2 style, detected by class name, transformers is never imported):
  weight [d_in, d_out], ``s = a W + b``.

Each layer's trainable weight and bias are viewed together as one *block*, the augmented matrix
``[W | b]`` of shape [d_out, d_in (+1)], matching the augmented activation ``[a, 1]``. A flat
vector in R^P (``model.parameters()`` order, trainable parameters only) maps to one block per
tracked layer plus the *other* trainable parameters, which Kronecker factors do not cover.
"""

from __future__ import annotations

import difflib
import functools
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from infkit.errors import UnsupportedError
from infkit.parameters import ParameterSpace

#: what infkit can factor, for error messages
SUPPORTED = "nn.Linear, nn.Conv2d and nn.Conv1d (groups=1), and Hugging Face Conv1D"

#: the kinds of tracked convolutions: their inputs are unfolded into patches (windows), one
#: position per output pixel (step)
CONVOLUTIONS = ("conv2d", "nn_conv1d")


@dataclass
class TrackedModule:
    """One layer covered by Kronecker factors.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        module: the module itself.
        kind: ``"linear"``, ``"conv2d"``, ``"nn_conv1d"`` (``nn.Conv1d``) or ``"conv1d"``
            (Hugging Face Conv1D).
        weight: the weight's name in the parameter space.
        bias: the bias's name when the bias is trainable, else None (no ones-column).
        d_out, d_in: the block's rows and its columns before the bias column.
    """

    name: str
    module: nn.Module
    kind: str
    weight: str
    bias: str | None
    d_out: int
    d_in: int

    @property
    def cols(self) -> int:
        """Columns of the augmented block: d_in, plus one for a trainable bias."""
        return self.d_in + (1 if self.bias is not None else 0)

    @property
    def size(self) -> int:
        return self.d_out * self.cols

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "d_out": self.d_out,
            "d_in": self.d_in,
            "bias": self.bias is not None,
        }


#: how each kind of tracked layer is named in messages
KIND_NAMES = {
    "linear": "nn.Linear",
    "conv2d": "nn.Conv2d",
    "nn_conv1d": "nn.Conv1d",
    "conv1d": "Hugging Face Conv1D",
}


def kinds_of(tracked: list[TrackedModule]) -> str:
    """The kinds of layers in ``tracked`` for a message: ``"nn.Linear"``, ``"nn.Linear and
    nn.Conv2d"``."""
    names = [KIND_NAMES[k] for k in KIND_NAMES if any(t.kind == k for t in tracked)]
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def layer_kind(module: nn.Module) -> str | None:
    """The kind the Kronecker methods factor ``module`` as (``"linear"``, ``"conv2d"``,
    ``"nn_conv1d"``, Hugging Face's ``"conv1d"``), or None for a module of another kind."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "nn_conv1d"
    if type(module).__name__ == "Conv1D" and hasattr(module, "weight") and hasattr(module, "nf"):
        return "conv1d"
    return None


def _dims(module: nn.Module, kind: str) -> tuple[int, int]:
    w = module.weight
    assert isinstance(w, Tensor)
    if kind == "linear":
        return int(w.shape[0]), int(w.shape[1])
    if kind == "conv1d":
        return int(w.shape[1]), int(w.shape[0])
    return int(w.shape[0]), int(w[0].numel())  # convolutions: C_out, C_in * kh * kw (C_in * k)


def find_modules(
    model: nn.Module, space: ParameterSpace, modules: list[str] | None = None
) -> tuple[list[TrackedModule], list[str]]:
    """The tracked layers of ``model`` and the names of the trainable parameters left over.

    Args:
        model: the model.
        space: its parameter space (the trainable parameters).
        modules: restrict tracking to these module names (default: every supported layer whose
            weight is trainable).

    Returns:
        the tracked layers in ``named_modules`` order, and the trainable parameter names that no
        tracked layer covers.
    """
    trainable = set(space.names)
    param_names = {id(p): n for n, p in model.named_parameters()}
    tied_with = tied_layers(model)
    tracked: list[TrackedModule] = []
    wanted = None if modules is None else set(modules)
    dora = dora_adapters(model)
    for name, module in model.named_modules():
        kind = layer_kind(module)
        if kind is None or (wanted is not None and name not in wanted):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or param_names.get(id(weight)) not in trainable:
            continue
        if name in dora:
            layer = repr(dora[name]) if dora[name] else "(the model itself)"
            raise UnsupportedError(
                f"module {name!r} is an adapter matrix of the DoRA layer {layer} (peft's "
                "use_dora=True), which calls its lora_A and lora_B on an identity matrix as well "
                "as on the examples (to take its weight's norm), so the layers' hooks cannot "
                "tell the examples' rows and the Kronecker methods cannot attribute through "
                "it, nor can per-token scores with any method. Use LoRA without DoRA, or, for "
                "scores, module scores and self-scores, a method that takes its gradients by "
                "autograd (identity, exact, cg, arnoldi)"
            )
        if kind in CONVOLUTIONS and module.groups != 1:
            if wanted is not None:
                raise UnsupportedError(
                    f"module {name!r} is a grouped convolution (groups={module.groups}); Kronecker "
                    "factors support groups=1 only: freeze it (requires_grad=False)"
                )
            continue
        w_name = param_names[id(weight)]
        tied = tied_with.get(name)
        if tied:
            if wanted is None:  # left out: its parameter joins the others of the notice
                continue
            raise UnsupportedError(
                f"module {name!r} uses the weight {w_name!r}, which module(s) "
                f"{', '.join(map(repr, tied))} use too (tied weights, as a language model's "
                "output head and its token embedding, or a parent that applies it "
                "functionally, as nn.MultiheadAttention its out_proj): the layer's hooks see "
                "only its own calls, so its Kronecker factors and gradients would be wrong. "
                "Leave it out of modules, untie the weights, or freeze them "
                "(requires_grad=False)"
            )
        bias = getattr(module, "bias", None)
        b_name = None
        if isinstance(bias, nn.Parameter) and param_names.get(id(bias)) in trainable:
            b_name = param_names[id(bias)]
        d_out, d_in = _dims(module, kind)
        tracked.append(TrackedModule(name, module, kind, w_name, b_name, d_out, d_in))
    if wanted is not None:
        missing = sorted(wanted - {t.name for t in tracked})
        if missing:
            raise UnsupportedError(_why_not_tracked(model, missing, trainable, param_names))
    covered = {t.weight for t in tracked} | {t.bias for t in tracked if t.bias}
    others = [n for n in space.names if n not in covered]
    return tracked, others


def dora_adapters(model: nn.Module) -> dict[str, str]:
    """The adapter matrices (``lora_A`` and ``lora_B``) of peft's DoRA layers, each with its
    layer's name: a layer whose ``lora_magnitude_vector`` holds the adapter is DoRA."""
    found = {}
    for name, module in model.named_modules():
        magnitudes = getattr(module, "lora_magnitude_vector", None)
        if not isinstance(magnitudes, nn.ModuleDict):
            continue
        for adapter in magnitudes:
            for matrix in ("lora_A", "lora_B"):
                found[f"{name}.{matrix}.{adapter}" if name else f"{matrix}.{adapter}"] = name
    return found


def _why_not_tracked(
    model: nn.Module, missing: list[str], trainable: set[str], param_names: dict[int, str]
) -> str:
    """What is wrong with each name of ``modules=`` that no tracked layer answers."""
    modules = dict(model.named_modules())
    reasons = []
    for name in missing:
        module = modules.get(name)
        if module is None:
            close = difflib.get_close_matches(name, list(modules), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            reasons.append(f"{name!r} is no module of the model{hint}")
        elif layer_kind(module) is None:
            reasons.append(f"{name!r} is a {type(module).__name__}, not a supported layer")
        else:
            weight = getattr(module, "weight", None)
            if param_names.get(id(weight)) not in trainable:
                reasons.append(f"{name!r} has a frozen weight (requires_grad=False)")
            else:
                reasons.append(f"{name!r} cannot be factored")
    return (
        f"modules= names layers the Kronecker methods cannot track: {'; '.join(reasons)}. They "
        f"factor trainable {SUPPORTED} layers (model.named_modules() lists the names)"
    )


def tied_layers(model: nn.Module) -> dict[str, list[str]]:
    """Layers of a supported kind whose weight other modules use too, each with those modules'
    names: tied weights, and the output projection of ``nn.MultiheadAttention``, which its
    parent applies functionally (the layer's own forward, so its hooks, never run). Left out of
    tracking by default (:func:`find_modules`)."""
    owners = _owners(model)
    out = {}
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if layer_kind(module) is not None and isinstance(weight, nn.Parameter):
            tied = [other for other in owners[id(weight)] if other != name]
            if tied:
                out[name] = tied
        if isinstance(module, nn.MultiheadAttention):
            out[f"{name}.out_proj" if name else "out_proj"] = [name or "(the model)"]
    return out


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """id(parameter) -> the names of the distinct modules holding it directly (more than one:
    tied weights). A module reachable under two names counts once, by its first name."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        for parameter in module.parameters(recurse=False):
            owners.setdefault(id(parameter), []).append(name)
    return owners


def augmented_block(t: TrackedModule, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Layer ``t``'s augmented blocks ``[W | b]``, [k, d_out, cols], from its weight's entries
    [k, weight.numel()] (in the parameter's own order) and its bias's [k, d_out] (None: no
    bias)."""
    k = weight.shape[0]
    if t.kind == "conv1d":  # Hugging Face's Conv1D keeps W transposed, [d_in, d_out]
        W = weight.reshape(k, t.d_in, t.d_out).transpose(1, 2)
    else:
        W = weight.reshape(k, t.d_out, t.d_in)
    if bias is None:
        return W
    return torch.cat([W, bias.unsqueeze(-1)], dim=-1)


class BlockLayout:
    """Flat vectors [k, P] <-> one [k, d_out, cols] block per tracked layer (and the rest).

    Args:
        space: the parameter space.
        tracked: the tracked layers.
        others: trainable parameter names outside tracked layers.
    """

    def __init__(
        self, space: ParameterSpace, tracked: list[TrackedModule], others: list[str]
    ) -> None:
        self.space = space
        self.tracked = tracked
        self.others = others
        self.slices = space.module_slices()

    @functools.cached_property
    def other_index(self) -> Tensor:
        """Flat indices of the parameters outside tracked layers (built on first use)."""
        other_idx = [torch.arange(self.slices[n].start, self.slices[n].stop) for n in self.others]
        if not other_idx:
            return torch.zeros(0, dtype=torch.long, device=self.space.device)
        return torch.cat(other_idx).to(self.space.device)

    def block(self, V: Tensor, t: TrackedModule) -> Tensor:
        """The augmented block [k, d_out, cols] of layer ``t`` in V [k, P]."""
        bias = None if t.bias is None else V[:, self.slices[t.bias]]
        return augmented_block(t, V[:, self.slices[t.weight]], bias)

    def put(self, out: Tensor, t: TrackedModule, block: Tensor) -> None:
        """Write the augmented block [k, d_out, cols] of layer ``t`` into ``out`` [k, P]."""
        k = out.shape[0]
        W = block[..., : t.d_in]
        if t.kind == "conv1d":
            W = W.transpose(1, 2)
        out[:, self.slices[t.weight]] = W.reshape(k, -1)
        if t.bias is not None:
            out[:, self.slices[t.bias]] = block[..., t.d_in]

    def blocks(self, V: Tensor) -> dict[str, Tensor]:
        return {t.name: self.block(V, t) for t in self.tracked}

    def flat_index(self, t: TrackedModule) -> Tensor:
        """Positions in R^P of the augmented block's entries, row-major, [d_out * cols]."""
        idx = torch.arange(self.space.size, device=self.space.device).unsqueeze(0)
        return self.block(idx, t).reshape(-1)


@dataclass
class TrackedLayers:
    """The layers a fitted method attributes through, and how flat vectors map onto them.

    Attributes:
        tracked: the tracked layers, in ``named_modules`` order.
        others: trainable parameter names outside tracked layers.
        layout: flat [k, P] vectors <-> per-layer [k, d_out, cols] blocks.
        mask_key: key of the attention mask in dict inputs ([B, T], 1 = real token), or None.
    """

    tracked: list[TrackedModule]
    others: list[str]
    layout: BlockLayout
    mask_key: str | None = "attention_mask"

    @classmethod
    def of(
        cls,
        model: nn.Module,
        space: ParameterSpace,
        modules: list[str] | None = None,
        mask_key: str | None = "attention_mask",
    ) -> TrackedLayers:
        """The supported layers of ``model`` (or the named ``modules``) and the rest."""
        tracked, others = find_modules(model, space, modules)
        return cls(tracked, others, BlockLayout(space, tracked, others), mask_key)
