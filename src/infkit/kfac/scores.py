"""Scores split by layer and by position (methods.md §4.4).

Both splits are exact decompositions of the facade's IF scores
``scores[t, j] = (1/N) u_t^T v_j`` (``u_t = H^{-1} grad m_t``, ``v_j = grad l_j + l2 theta``):

* **per module**: ``u_t^T v_j`` is a sum over parameters, grouped by layer, so the per-layer
  scores sum to the score. With a block-diagonal curvature (``kfac``, ``ekfac``) a layer's score
  is that layer's influence in isolation, ``grad_l m^T (G_l + r)^{-1} grad_l l_j / N``; with a
  full curvature (``exact``, ``cg``, ``astra``) it is the layer's share of the full score.
* **per token**: a tracked layer's gradient is ``sum_t Ds_t a_t^T`` over the positions t of the
  training example, so ``score_t = (1/N) sum_l <U_l(q), Ds_lt a_lt^T>`` (U_l: the layer's block
  of u). The positions' terms plus the part that is not per position (the l2 share
  ``l2 u^T theta``, layers with another number of positions such as a pooled head, parameters
  outside tracked layers) sum to the score. It is a decomposition of the gradient, not a
  leave-one-token-out counterfactual.

Any primal method works (the preconditioned query comes from ``method.solve``); per-token scores
need the layers to be ones :mod:`infkit.kfac.modules` can track.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from infkit.errors import UnsupportedError
from infkit.kfac.capture import layer_terms
from infkit.kfac.modules import BlockLayout, TrackedModule, find_modules
from infkit.methods.base import DirectMethod

if TYPE_CHECKING:
    from infkit.influence import Influence


def _check(inf: Influence, what: str) -> None:
    state = inf.state
    if isinstance(state.method, DirectMethod):
        raise UnsupportedError(
            f"{what} need a method that applies H^-1 to vectors in R^P; method "
            f"{state.method.name!r} works in N*C space: use 'exact', 'cg', 'kfac', 'ekfac' or "
            "'astra'"
        )
    if inf.estimator != "if":
        raise UnsupportedError(
            f"{what} decompose the IF score (linear in the training gradient); estimator "
            f"{inf.estimator!r} is not: use inf.with_estimator('if')"
        )


def preconditioned_queries(inf: Influence, test: Any) -> Tensor:
    """u_t = H^{-1} grad m_t for every test example, [n_test, P] float64."""
    examples = inf._examples(test, "test set")
    return inf.state.method.solve(inf._query_gradients(examples))


def tracked_layers(inf: Influence) -> tuple[list[TrackedModule], list[str], BlockLayout]:
    """The fitted method's tracked layers, or the supported layers of the model."""
    method = inf.state.method
    if getattr(method, "layout", None) is not None:
        return method.tracked, method.others, method.layout
    space = inf.state.engine.space
    tracked, others = find_modules(inf.task.model, space)
    return tracked, others, BlockLayout(space, tracked, others)


def module_groups(inf: Influence) -> dict[str, Tensor]:
    """Flat parameter positions of each layer: tracked layers by name, the rest by module."""
    space = inf.state.engine.space
    slices = space.module_slices()
    groups: dict[str, list[Tensor]] = {}
    tracked, _, layout = tracked_layers(inf)
    covered = set()
    for t in tracked:
        groups[t.name] = [layout.flat_index(t)]
        covered.update({t.weight, t.bias})
    for name in space.names:
        if name in covered:
            continue
        module = name.rsplit(".", 1)[0] if "." in name else ""
        sl = slices[name]
        groups.setdefault(module, []).append(torch.arange(sl.start, sl.stop, device=space.device))
    return {k: torch.cat(v) for k, v in groups.items()}


def module_scores_for(inf: Influence, U: Tensor) -> dict[str, Tensor]:
    """Per-layer scores [k, N] for preconditioned queries U [k, P]."""
    state = inf.state
    groups = module_groups(inf)
    out = {g: torch.empty(U.shape[0], state.n, dtype=torch.float64) for g in groups}
    for batch in state.train.batches(inf.batch_size):
        V = state.attributed_grads(batch)
        for g, idx in groups.items():
            out[g][:, batch.indices] = (U[:, idx] @ V[:, idx].T).cpu() / state.n
    return out


def per_module_scores(inf: Influence, test: Any) -> dict[str, Tensor]:
    """IF scores split by layer: name -> [n_test, N]; they sum to ``inf.scores(test)``.

    Layers are the tracked layers of a Kronecker method (weight and bias together) or, for other
    methods, the modules owning the parameters.
    """
    _check(inf, "per-module scores")
    return module_scores_for(inf, preconditioned_queries(inf, test))


@dataclass
class TokenScores:
    """Per-position contributions of training examples to IF scores.

    Attributes:
        tokens: [n_test, n, T], the contribution of each position of each training example.
        rest: [n_test, n], the part that is not per position (l2 share, pooled layers, ...).
        indices: [n], the training indices scored.
        layers: the layers whose terms are per position.
    """

    tokens: Tensor
    rest: Tensor
    indices: Tensor
    layers: list[str]

    @property
    def total(self) -> Tensor:
        """The sequence scores, [n_test, n]: equal to ``inf.scores(test)[:, indices]``."""
        return self.tokens.sum(-1) + self.rest


def per_token_scores(
    inf: Influence,
    test: Any,
    indices: Sequence[int] | Tensor | None = None,
    positions: int | None = None,
) -> TokenScores:
    """Per-position contributions of training sequences to the IF scores (methods.md §4.4).

    Args:
        inf: a fitted ``Influence`` with estimator ``"if"`` and a primal method.
        test: the queries.
        indices: training examples to decompose (default: all).
        positions: the number of positions T of a training sequence (default: the largest
            position count among the tracked layers); layers with another count go to ``rest``.
    """
    _check(inf, "per-token scores")
    state = inf.state
    tracked, others, layout = tracked_layers(inf)
    if not tracked:
        raise UnsupportedError("per-token scores need nn.Linear / Conv2d / Conv1D layers")
    U = preconditioned_queries(inf, test)
    blocks = {t.name: layout.block(U, t) for t in tracked}  # [q, d_out, cols]
    idx = torch.arange(state.n) if indices is None else torch.as_tensor(indices).reshape(-1)
    n, q = state.n, U.shape[0]
    mask_key = getattr(state.method, "mask_key", "attention_mask")
    token_parts, rest_parts = [], []
    layers: set[str] = set()
    theta_term = state.l2 * (U @ state.regularised_theta)  # [q]
    for batch in state.train.batches(inf.batch_size, idx):
        terms = layer_terms(state.engine, tracked, batch, "loss", mask_key)
        counts = {name: a.shape[1] for name, (a, _) in terms.items()}
        T = positions or max(counts.values())
        tok = torch.zeros(q, len(batch), T, dtype=torch.float64)
        rest = theta_term.unsqueeze(1).expand(q, len(batch)).clone().cpu()
        for name, (a, ds) in terms.items():
            dsU = torch.einsum("bto,qoi->qbti", ds.to(torch.float64), blocks[name])
            contrib = (dsU * a.to(torch.float64).unsqueeze(0)).sum(-1)  # [q, B, T_l]
            if counts[name] == T:
                tok += contrib.cpu()
                layers.add(name)
            else:
                rest += contrib.sum(-1).cpu()
        if others:
            G = state.loss_grads(batch)
            oi = layout.other_index
            rest += (U[:, oi] @ G[:, oi].T).cpu()
        token_parts.append(tok / n)
        rest_parts.append(rest / n)
    width = max(t.shape[-1] for t in token_parts)
    tokens = torch.cat(
        [torch.nn.functional.pad(t, (0, width - t.shape[-1])) for t in token_parts], dim=1
    )
    return TokenScores(tokens, torch.cat(rest_parts, dim=1), idx, sorted(layers))
