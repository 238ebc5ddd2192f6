"""LayerIF: which layers the training data shape for the better (Askari et al., NeurIPS 2025;
docs/analyses.md §1).

For every layer l and training example i, ``influence[l, i]`` is the per-layer IF removal effect
of i on the mean validation measurement (default: the validation loss),

    I_l(z_i) = (1/N) grad_l m_val^T (H_l + r)^{-1} grad_l (l_i + l2 share),   m_val = mean_v m_v,

computed with the block-diagonal curvature of ``kfac`` / ``ekfac`` (a layer's influence in
isolation), or as the layer's share of the full score for other methods (:mod:`infkit.decompositions`).
Units and sign are infkit's: ``> 0`` means removing i would raise the validation loss (i helps).
A measurement where higher is better (a margin, ``task.higher_is_better``) turns the reading
round: there ``> 0`` means removing i would raise the margin (i hurt).

Aggregates per layer, with ``h_i = I_l(z_i)`` for a loss and ``-I_l(z_i)`` for a measurement
where higher is better (each example's help):

* ``helpful[l] = sum_i max(h_i, 0)``: total help the layer's training signal gives;
* ``harmful[l] = sum_i max(-h_i, 0)``: total harm. LayerIF's ``S^(l)`` (Koh-Liang sign,
  "aggregated positives", on the validation loss) is ``N x harmful[l]`` in these units.

``allocate(total, by=...)`` turns one of them into integer per-layer budgets (LoRA experts,
pruning sparsity) by largest remainders. The paper's exact mapping from S^(l) to budgets and its
direction were not verified (docs/analyses.md §1), so the direction is the caller's explicit choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from infkit.decompositions import module_scores_for, require_if
from infkit.errors import InvalidInputError
from infkit.influence import Influence
from infkit.options import integer_argument

#: the most :func:`net_noise` reads as rounding: beyond it a net effect is a signal, whatever
#: the precision (10 sqrt(eps) is 0.88 in bfloat16)
NET_NOISE_CAP = 1e-3


def net_noise(dtype: torch.dtype) -> float:
    """The share of the helpful and harmful sums up to which the layers' net effects are the
    training's rounding (0 at the optimum): 10 sqrt(eps) of the parameters' dtype, the
    precision to which a model in it reaches its optimum, at most :data:`NET_NOISE_CAP`
    (float64 1.5e-7; float32 and lower 1e-3: a reviewer's float32 MLP trained by
    train_to_optimum read 3.4e-4)."""
    return min(10 * torch.finfo(dtype).eps ** 0.5, NET_NOISE_CAP)


@dataclass
class LayerQuality:
    """Per-layer influence of the training set on a validation set.

    Attributes:
        layers: layer names, in model order.
        influence: [L, N], per-layer removal effect of each training example on the mean
            validation measurement (in its units and sign).
        helpful: [L], sum over examples of the help (the positive parts of ``influence`` for
            a loss, the negative parts for a measurement where higher is better).
        harmful: [L], sum over examples of the harm (as positive numbers).
    """

    layers: list[str]
    influence: Tensor
    helpful: Tensor
    harmful: Tensor
    #: net effects up to this share of the helpful and harmful sums are rounding
    #: (:func:`net_noise`), not a ranking of the layers
    noise: float = net_noise(torch.float64)

    @property
    def net(self) -> Tensor:
        """[L], the layer's net help of the whole training set: helpful - harmful (for a
        loss, the removal effect of the whole set through the layer)."""
        return self.helpful - self.harmful

    def shares(self, by: str) -> Tensor:
        """[L] normalised to sum to 1: ``"helpful"``, ``"harmful"`` or ``"net"`` (clamped at 0)."""
        values = {"helpful": self.helpful, "harmful": self.harmful, "net": self.net.clamp_min(0)}
        if by not in values:
            raise InvalidInputError(f"by must be 'helpful', 'harmful' or 'net', got {by!r}")
        v = values[by]
        total = float(v.sum())
        if by == "net":
            self._check_net(total)
        if total <= 0:
            return torch.full_like(v, 1.0 / len(v))
        return v / total

    def _check_net(self, positive: float) -> None:
        """Refuse shares by 'net' where the net effects are rounding (:attr:`noise`) or none
        is positive (``positive``, the sum of their positive parts, is 0)."""
        net = self.net
        scale = float(torch.maximum(self.helpful, self.harmful).sum())
        said = [f"{x:.2g}" for x in net.tolist()]
        if float(net.abs().max()) <= self.noise * scale:
            raise InvalidInputError(
                f"the layers' net effects ({said}) are at rounding level against their helpful "
                f"and harmful sums ({scale:.3g}): at the training optimum the whole training "
                "set's net effect is 0 in every layer (docs/analyses.md §1), so shares by 'net' "
                "would split noise; use by='helpful' or 'harmful'"
            )
        if positive <= 0:
            raise InvalidInputError(
                f"no layer has a positive net effect ({said}): shares by 'net' (its positive "
                "parts) are not defined; use by='helpful' or 'harmful'"
            )

    def allocate(self, total: int, by: str, minimum: int = 0) -> dict[str, int]:
        """Integer budgets per layer summing to ``total``: ``minimum`` each, and the rest,
        ``total - L minimum``, in proportion to ``shares(by)`` by largest remainders (so a
        ``minimum`` moves the budgets even where no share would fall below it: shares
        0.6/0.3/0.1 of 10 give 6/3/1, and 5/3/2 with ``minimum=1``).

        Args:
            total: the budget to distribute (e.g. the number of LoRA experts).
            by: ``"helpful"``, ``"harmful"`` or ``"net"``: what the budget follows.
            minimum: what every layer gets before the proportional share.
        """
        n = len(self.layers)
        total = integer_argument("total", total, 0)
        minimum = integer_argument("minimum", minimum, 0)
        if total < minimum * n:
            raise InvalidInputError(
                f"total={total} cannot give {n} layers at least minimum={minimum} each"
            )
        spare = total - minimum * n
        raw = self.shares(by).double() * spare
        base = raw.floor()
        left = int(spare - base.sum())
        order = (raw - base).argsort(descending=True)
        base[order[:left]] += 1
        return {name: minimum + int(b) for name, b in zip(self.layers, base)}


def layer_quality(inf: Influence, validation: Any) -> LayerQuality:
    """LayerIF per-layer influences of every training example on ``validation``.

    Args:
        inf: a fitted ``Influence`` (estimator ``"if"``; ``"ekfac"`` or ``"kfac"`` give isolated
            per-layer influence, other primal methods the layer shares of the full score).
        validation: the validation set; its measurements are averaged into one query.
    """
    method, fitted = inf.method, inf.fitted
    require_if(method, inf.estimator_spec, "module_scores", "layer quality scores")
    examples = fitted.examples(validation, "validation set", measured=True)
    Q = fitted.query_gradients(examples).mean(0, keepdim=True)
    parts = module_scores_for(fitted, method.precondition_queries(Q))
    layers = list(parts)
    influence = torch.stack([parts[name][0] for name in layers])
    # (removing a helpful example raises a loss and lowers a margin: the help is the score's
    # sign for the loss, minus it for a measurement where higher is better, as top_k reads it)
    help_of_each = inf.task.helpful_sign * influence
    return LayerQuality(
        layers=layers,
        influence=influence,
        helpful=help_of_each.clamp_min(0).sum(1),
        harmful=(-help_of_each).clamp_min(0).sum(1),
        noise=net_noise(fitted.space.dtype),
    )
