"""Memorisation and loss curvature: the bottom of the Kronecker spectrum (Merullo et al.,
Goodfire 2025; docs/analyses.md §4-§5).

For a tracked layer with K-FAC eigenbases ``U`` (of S) and ``V`` (of A), the weight's component
``C_ij = (U^T [W | b] V)_ij`` has curvature ``pi_ij = lambda_S,i lambda_A,j`` (or the EK-FAC
eigenvalue with ``eigenvalues="ekfac"``). The *kept* set S holds the largest ``pi_ij`` until their
sum reaches ``keep_mass x sum(pi)`` (Goodfire's keep-mass rho, 0.8 in their README).

* :func:`curvature_edit` returns a copy of the model with ``[W | b]' = U (C (.) 1_S) V^T`` in every
  tracked layer: the low-curvature components, where memorised content sits, removed.
* :func:`memorisation_scores` gives ``m(z) = sum_{(i,j) not in S} c_ij(z)^2 / sum c_ij(z)^2``
  with ``c(z) = U^T DW(z) V``: the share of an example's gradient energy in the low-curvature
  complement (high = likely memorised) [derived, not from the paper].

* :func:`memorisation_loss_change` is the direct counterfactual ``l(z; edited) - l(z; model)``:
  an example the model only fits through low-curvature components loses the most.

A check on digits (64-32-10 tanh MLP, 400 training examples, 20 with flipped labels, pixels
standardised, EK-FAC, keep_mass 0.8): the loss change flags the flipped examples with AUC 0.95
(the edited model keeps 0.88 test accuracy); the gradient-energy share does not (AUC 0.30:
flipped examples have *less* of their gradient in the low-curvature complement). With the pixels
divided by 16 instead, a tester read AUC 0.28-0.65 and accuracy 0.37-0.45: the figures belong to
that setup. On a small causal language model the loss
change ran the other way (AUC 0.05 for planted noise sequences: the edit removed the shared
grammar, not the noise), so neither score is a detector before it is checked against ground truth
on the model at hand (docs/analyses.md §5).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from infkit.analyses.similarity import kfe_coordinates, kronecker_curvature
from infkit.errors import InvalidInputError
from infkit.gradients import PerExample
from infkit.influence import Influence
from infkit.options import real_number
from infkit.parameters import ParameterSpace

EIGENVALUES = ("kfac", "ekfac")


def _check_edit(keep_mass: Any, eigenvalues: Any) -> float:
    """``keep_mass`` as a number in [0, 1], and ``eigenvalues`` one of :data:`EIGENVALUES`,
    checked before any pass over the data."""
    rho = real_number(keep_mass)
    if rho is None or not 0 <= rho <= 1:
        raise InvalidInputError(
            f"keep_mass must be a number in [0, 1] (the share of each layer's curvature mass "
            f"kept), got {keep_mass!r}"
        )
    if eigenvalues not in EIGENVALUES:
        raise InvalidInputError(f"eigenvalues must be one of {EIGENVALUES}, got {eigenvalues!r}")
    return rho


def curvature_mask(
    inf: Influence, layer: str, keep_mass: float = 0.8, eigenvalues: str = "kfac"
) -> Tensor:
    """The kept (high-curvature) components of ``layer``: bool [d_out, cols].

    The smallest set of the largest ``pi_ij`` whose sum reaches ``keep_mass x sum(pi)``.
    """
    keep_mass = _check_edit(keep_mass, eigenvalues)
    method = kronecker_curvature(inf)
    if not isinstance(layer, str) or layer not in method.factors.modules:
        tracked = sorted(t.name for t in method.tracked)
        raise InvalidInputError(f"layer {layer!r} is not tracked; tracked: {tracked}")
    f = method.factors.modules[layer]
    pi = f.eigenvalues(eigenvalues == "ekfac")
    flat = pi.reshape(-1)
    order = flat.argsort(descending=True)
    cumulative = flat[order].cumsum(0)
    target = keep_mass * float(flat.sum())
    if keep_mass >= 1:
        count = flat.numel()  # everything, zero-curvature components included
    elif keep_mass <= 0:
        count = 0
    else:
        count = min(int((cumulative < target).sum()) + 1, flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:count]] = True
    return mask.reshape(pi.shape)


def memorisation_scores(
    inf: Influence,
    data: Any,
    keep_mass: float = 0.8,
    eigenvalues: str = "kfac",
    per_layer: bool = False,
) -> Tensor | dict[str, Tensor]:
    """Share of each example's gradient energy in the low-curvature complement, [n] in [0, 1].

    With ``per_layer=True``, name -> [n] for each tracked layer instead of the pooled share.
    """
    _check_edit(keep_mass, eigenvalues)
    method = kronecker_curvature(inf)
    coords = kfe_coordinates(inf, data)
    low = torch.zeros((), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64)
    layers: dict[str, Tensor] = {}
    for t in method.tracked:
        keep = curvature_mask(inf, t.name, keep_mass, eigenvalues)
        energy = coords[t.name].square()
        out = (energy * (~keep)).sum(dim=(1, 2))
        all_ = energy.sum(dim=(1, 2))
        layers[t.name] = out / all_.clamp_min(torch.finfo(all_.dtype).tiny)
        low = low + out
        total = total + all_
    if per_layer:
        return layers
    return low / total.clamp_min(torch.finfo(torch.float64).tiny)


def _layer_names(layers: Any) -> list[str]:
    """``layers`` as a list of names: one name, or any collection of them (a list, a set,
    ``memorisation_scores(..., per_layer=True)``'s dictionary or its keys)."""
    if hasattr(layers, "tolist") and not isinstance(layers, str):  # an array (0-d: one name)
        layers = layers.tolist()
    if isinstance(layers, str):  # one layer's name (a string is no list of names)
        return [layers]
    if isinstance(layers, Iterable) and not isinstance(layers, bytes):
        names = list(layers)
        if names and all(isinstance(n, str) for n in names):
            return names
    raise InvalidInputError(
        f"layers must be a tracked layer's name or a collection of them (None: every tracked "
        f"layer), got {layers!r}"
    )


def curvature_edit(
    inf: Influence,
    keep_mass: float = 0.8,
    eigenvalues: str = "kfac",
    layers: str | Iterable[str] | None = None,
) -> nn.Module:
    """A copy of the model with the low-curvature weight components of tracked layers removed.

    Args:
        inf: an ``Influence`` fitted with ``kfac``, ``ekfac`` or ``astra``.
        keep_mass: rho, the share of the curvature mass kept (1 keeps the model unchanged).
        eigenvalues: ``"kfac"`` (Goodfire's ``lambda_i mu_j``) or ``"ekfac"``.
        layers: edit only these tracked layers, or this one (default: all).
    """
    _check_edit(keep_mass, eigenvalues)
    method = kronecker_curvature(inf)
    by_name = {t.name: t for t in method.tracked}
    names = list(by_name) if layers is None else _layer_names(layers)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise InvalidInputError(f"layers {unknown} are not tracked; tracked: {sorted(by_name)}")
    model = copy.deepcopy(inf.task.model)
    modules = dict(model.named_modules())
    theta = inf.fitted.theta.to(torch.float64).unsqueeze(0)
    with torch.no_grad():
        for name in names:
            t = by_name[name]
            f = method.factors.modules[name]
            W = method.layers.layout.block(theta, t)[0]  # [d_out, cols]
            QS, QA = f.QS.to(W.dtype), f.QA.to(W.dtype)
            C = QS.T @ W @ QA
            keep = curvature_mask(inf, name, keep_mass, eigenvalues)
            edited = QS @ (C * keep) @ QA.T
            module = modules[name]
            weight = edited[:, : t.d_in]
            if t.kind == "conv1d":
                weight = weight.T
            module.weight.copy_(weight.reshape(module.weight.shape).to(module.weight.dtype))
            if t.bias is not None:
                module.bias.copy_(edited[:, t.d_in].to(module.bias.dtype))
    return model


def memorisation_loss_change(
    inf: Influence, data: Any, keep_mass: float = 0.8, eigenvalues: str = "kfac"
) -> Tensor:
    """l(z; edited model) - l(z; model) for every example, [n]: high = fitted by low curvature."""
    _check_edit(keep_mass, eigenvalues)
    examples = inf.fitted.examples(data, "data")
    edited = curvature_edit(inf, keep_mass, eigenvalues)
    task = copy.copy(inf.task)
    task.model = edited
    engine = inf.fitted.engine
    other = PerExample(task, ParameterSpace(edited), engine.mode)
    parts = [
        (other.losses(b) - engine.losses(b)).to(torch.float64)
        for b in examples.batches(inf.batch_size)
    ]
    return torch.cat(parts)
