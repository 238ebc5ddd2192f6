"""AirRep: attribution learned from a retraining bank (Sun et al. 2025), docs/analyses.md §13.

An encoder ``f`` maps each example's features to an embedding, ``e = f(x)``. The attribution of
training example j to test example t is a dot product,

    s_tj = <f(x_t), f(x_j)>,

and the score of a training *subset* S (a group) for test example t pools its members by
attention, as in AirRep's released code: the weights are a softmax, over the members only, of
the magnitudes of their scores,

    a_tj(S) = exp(|s_tj| / temperature) / sum_{i in S} exp(|s_ti| / temperature),   j in S,
    G_t(S)  = sum_{j in S} a_tj(S) s_tj = <f(x_t), r_t(S)>,  r_t(S) = sum_{j in S} a_tj(S) f(x_j),

so the subset's representation ``r_t(S)`` is an attention-weighted sum of its members'
embeddings, with the test example as the query; with a large temperature the weights are
uniform and ``G_t(S)`` is the members' mean score (an additive datamodel, scaled by 1/|S|).

The encoder is trained on a *retraining bank*: m random subsets ``S_k`` of the training set,
each retrained (:func:`retraining_bank`, :func:`infkit.retrain.subsets`), with the measurement
``m_k(t)`` of every test example t under each retrained model. The targets are standardised per
test example and negated, ``y_k(t) = -(m_k(t) - mean_k m(t)) / std_k m(t)`` (clipped to
[-10, 10]): a subset whose model has the lower test loss is the better one. The loss is RankNet's
pairwise logistic loss over all ordered pairs of subsets (k, l) with ``y_k(t) > y_l(t)``,
weighted by the size of the difference:

    loss = (1 / #pairs) sum_{t} sum_{k, l: y_k(t) > y_l(t)} w_kl(t) log(1 + exp(-(G_t(S_k) - G_t(S_l)))),
    w_kl(t) = min(y_k(t) - y_l(t), max_weight)   (or 1 with ``weighted=False``).

Orientation and units. Read additively (as :func:`infkit.evaluate.lds` reads any scores),
``s_tj > 0`` predicts that keeping j lowers t's measurement, so that removing j raises it: the
sign of infkit's scores (a proponent of a test loss is positive), and ``evaluate.lds`` takes
``scores`` as they are. The units are not infkit's: the ranking loss fixes no scale, so
``s_tj`` ranks training examples (and ``G`` ranks subsets of equal size) without predicting a
change of the measurement. The group score is a weighted *mean* of its members' scores, not a
sum; with attention pooling it is not additive, and the LDS of the per-example scores can be
well below that of the group scores (:func:`group_lds`); ``pooling="mean"`` trains the
additive reading directly.

The encoder runs in eval mode (no dropout) during training and inference, as in AirRep's code.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from infkit.data import kept_masks
from infkit.errors import InvalidInputError, NotFittedError
from infkit.evaluate import (
    MIN_PAIRS,
    NON_FINITE_ACTUAL,
    NON_FINITE_SCORE,
    defined_values,
    require_finite,
)
from infkit.options import integer_argument
from infkit.parameters import evaluation_mode
from infkit.retrain import SubsetRetraining, subsets
from infkit.task import Task

Pooling = Literal["attention", "mean"]
POOLINGS: tuple[str, ...] = ("attention", "mean")
#: targets are clipped to [-TARGET_CLIP, TARGET_CLIP] standard deviations (as in AirRep's code)
TARGET_CLIP = 10.0
#: rows embedded at once at inference
EMBED_ROWS = 4096
#: elements of the [m, T, N] attention weights formed at once by :meth:`AirRep.group_scores`
POOL_ELEMENTS = 1 << 24
#: where masks of subsets come from, told beside a mask that is not boolean or 0/1
MASKS_HINT = "True or 1 marks a member of the subset, as retrain.subsets(...).masks does"


def retraining_bank(
    task: Task,
    train: Any,
    test: Any,
    l2: float,
    *,
    n_subsets: int = 100,
    alpha: float = 0.5,
    seed: int = 0,
    tolerance: float = 1e-10,
    max_iter: int = 2000,
    cache_dir: str | Path | None = None,
    progress: bool | None = False,
) -> SubsetRetraining:
    """A bank of random subsets, each retrained, for training AirRep or evaluating it.

    A thin front to :func:`infkit.retrain.subsets` (docs/evaluation.md §2): ``n_subsets``
    random subsets of ``floor(alpha N)`` training examples (:func:`infkit.retrain.random_masks`
    with ``seed``), the model retrained on each (warm start, the training objective) and every
    test example's measurement recorded. Draw the held-out bank with another ``seed``.

    Args:
        task: the trained model, its loss and measurement.
        train: the training set (any form :class:`infkit.Influence` accepts).
        test: the examples whose measurements are recorded (the queries).
        l2: the training objective's L2 coefficient, mean form.
        n_subsets: the number of subsets m.
        alpha: the fraction of the training set in each subset, in (0, 1).
        seed: seeds the subsets.
        tolerance: the retraining's relative gradient-norm target (docs/evaluation.md §1).
        max_iter: the retraining's L-BFGS iteration limit.
        cache_dir: a directory that keeps each retrained model, so a second call resumes.
        progress: show progress (None: by environment; True: bars; False: nothing).

    Returns:
        ``masks`` [m, N] (True = kept) and ``measurements`` [m, T].
    """
    if not isinstance(n_subsets, int) or isinstance(n_subsets, bool) or n_subsets < 2:
        raise InvalidInputError(f"a bank needs n_subsets >= 2 subsets, got {n_subsets!r}")
    return subsets(
        task,
        train,
        test,
        l2,
        n_subsets=n_subsets,
        alpha=alpha,
        seed=seed,
        tolerance=tolerance,
        max_iter=max_iter,
        cache_dir=cache_dir,
        progress=progress,
    )


class MLPEncoder(nn.Module):
    """The default encoder: ``Linear(in_features, hidden) -> tanh -> Linear(hidden, dim)``.

    Args:
        in_features: features per example (the input is flattened beyond the first dimension).
        hidden: width of the hidden layer.
        dim: dimension of the embedding.
        seed: seeds the initial weights (the global random state is left untouched).
        dtype: the parameters' dtype.
    """

    def __init__(
        self,
        in_features: int,
        hidden: int = 64,
        dim: int = 32,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float64,
    ) -> None:
        super().__init__()
        in_features = integer_argument("in_features", in_features, 1)
        hidden = integer_argument("hidden", hidden, 1)
        dim = integer_argument("dim", dim, 1)
        self.in_features = in_features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear(in_features, hidden, dtype=dtype),
                nn.Tanh(),
                nn.Linear(hidden, dim, dtype=dtype),
            )

    def forward(self, x: Tensor) -> Tensor:
        """Embeddings [n, dim] of the features ``x`` [n, ...]."""
        flat = x.reshape(len(x), -1)
        if flat.shape[1] != self.in_features:
            raise InvalidInputError(
                f"this encoder takes {self.in_features} features per example, got {flat.shape[1]}"
            )
        return self.net(flat)


def attention_weights(scores: Tensor, masks: Tensor, temperature: float = 1.0) -> Tensor:
    """AirRep's pooling weights of each subset's members, [m, T, N] (zero outside the subset).

    ``weights[k, t, j] = exp(|s_tj| / temperature) / sum_{i in S_k} exp(|s_ti| / temperature)``
    for j in ``S_k`` (module docstring).

    Args:
        scores: [T, N] per-example scores ``s_tj``.
        masks: [m, N] bool, True for the members of each subset.
        temperature: divides the magnitudes before the softmax (> 0).
    """
    masks = kept_masks(masks, MASKS_HINT)
    _check_pooling(scores, masks, temperature)
    logits = (scores.abs() / temperature).unsqueeze(0).expand(len(masks), -1, -1)
    logits = logits.masked_fill(~masks.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, dim=-1)


def pooled_scores(
    scores: Tensor, masks: Tensor, temperature: float = 1.0, pooling: Pooling = "attention"
) -> Tensor:
    """Group scores ``G_t(S_k)``, [m, T]: AirRep's attention pooling (module docstring),
    ``sum_{j in S_k} a_tj(S_k) s_tj``, or with ``pooling="mean"`` the members' mean score
    ``(1/|S_k|) sum_{j in S_k} s_tj`` (the limit of a large temperature: an additive model).

    Args:
        scores: [T, N] per-example scores ``s_tj``.
        masks: [m, N] bool, True for the members of each subset.
        temperature: the attention's temperature (> 0).
        pooling: ``"attention"`` or ``"mean"``.
    """
    masks = kept_masks(masks, MASKS_HINT)
    if pooling == "mean":
        _check_pooling(scores, masks, temperature)
        member = masks.to(scores.dtype)
        return (member @ scores.T) / member.sum(1, keepdim=True)
    if pooling != "attention":
        raise InvalidInputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    return (attention_weights(scores, masks, temperature) * scores.unsqueeze(0)).sum(-1)


def ranking_targets(measurements: Tensor) -> Tensor:
    """The training targets of each subset, [m, T]: ``-(m_k(t) - mean_k) / std_k``, clipped.

    Standardised per test example over the subsets (population standard deviation; 1 where the
    measurements do not vary) and negated, so that a lower test measurement is a larger target;
    clipped to ``[-10, 10]``.

    Args:
        measurements: [m, T] measurements of the models retrained on each subset.
    """
    Y = torch.as_tensor(measurements, dtype=torch.float64)
    if Y.dim() != 2 or len(Y) < 2:
        raise InvalidInputError(
            f"measurements must be [m, T] with m >= 2 subsets, got {tuple(Y.shape)}"
        )
    # (one NaN would make its test example's whole column NaN, and the loss skip its pairs)
    require_finite("measurements (subset, test example)", Y.cpu().numpy(), NON_FINITE_ACTUAL)
    std = Y.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return (-(Y - Y.mean(0)) / std).clamp(-TARGET_CLIP, TARGET_CLIP)


def ranking_loss(
    group_scores: Tensor,
    targets: Tensor,
    *,
    weighted: bool = True,
    max_weight: float = 5.0,
) -> Tensor:
    """RankNet's weighted pairwise logistic loss of group scores against targets.

    Over every test example t and ordered pair of subsets (k, l) with ``targets[k, t] >
    targets[l, t]``: ``w log(1 + exp(-(G[k, t] - G[l, t])))``, ``w = min(targets[k, t] -
    targets[l, t], max_weight)`` (1 if not ``weighted``), averaged over those pairs. Pairs with
    equal targets are not counted. Differentiable in ``group_scores``.

    Args:
        group_scores: [m, T] predicted group scores ``G_t(S_k)``.
        targets: [m, T] targets (:func:`ranking_targets`).
        weighted: weight each pair by its target difference.
        max_weight: the largest weight of a pair (> 0).
    """
    if group_scores.shape != targets.shape or group_scores.dim() != 2:
        raise InvalidInputError(
            f"group_scores {tuple(group_scores.shape)} and targets {tuple(targets.shape)} must "
            "both be [m, T]"
        )
    if not max_weight > 0:
        raise InvalidInputError(f"max_weight must be > 0, got {max_weight!r}")
    # (a NaN target compares false with every other: its pairs would drop out unsaid)
    require_finite(
        "targets (subset, test example)", targets.detach().double().cpu().numpy(), NON_FINITE_ACTUAL
    )
    t = targets.to(group_scores.dtype)
    gap = t.unsqueeze(1) - t.unsqueeze(0)  # [m, m, T]: targets[k] - targets[l]
    better = gap > 0
    n_pairs = int(better.sum())
    if n_pairs == 0:
        raise InvalidInputError(
            "no pair of subsets has different targets: the measurements do not vary across the bank"
        )
    margin = group_scores.unsqueeze(1) - group_scores.unsqueeze(0)  # G[k] - G[l]
    weight = gap.clamp(max=max_weight) if weighted else torch.ones_like(gap)
    losses = nn.functional.softplus(-margin) * weight
    return losses[better].sum() / n_pairs


def group_lds(group_scores: Tensor, measurements: Tensor) -> float:
    """The LDS of group scores: mean over test examples of the Spearman correlation, across
    subsets, of ``G_t(S_k)`` with minus the measured ``m_k(t)`` (a higher group score predicts
    a lower measurement); test examples with an undefined correlation (constant across the
    subsets) are left out of the mean, with a :class:`~infkit.errors.Notice` saying how many, as
    :func:`infkit.evaluate.lds` does; where none is defined, an InvalidInputError. NaN or
    infinite values are refused, naming their place.

    Args:
        group_scores: [m, T] group scores (:meth:`AirRep.group_scores`).
        measurements: [m, T] measurements of the models retrained on each subset.
    """
    import numpy as np
    from scipy import stats

    G = torch.as_tensor(group_scores).detach().double().cpu().numpy()
    Y = torch.as_tensor(measurements).detach().double().cpu().numpy()
    if G.shape != Y.shape or G.ndim != 2:
        raise InvalidInputError(
            f"group_scores {G.shape} and measurements {Y.shape} must both be [m, T]"
        )
    if G.shape[0] < MIN_PAIRS:
        raise InvalidInputError(
            f"the LDS correlates across subsets and needs at least {MIN_PAIRS} of them, got "
            f"{G.shape[0]} (with 2 every correlation is +1 or -1)"
        )
    require_finite("group_scores (subset, test example)", G, NON_FINITE_SCORE)
    require_finite("measurements (subset, test example)", Y, NON_FINITE_ACTUAL)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)  # NaN says it, per query
        rhos = np.array([stats.spearmanr(G[:, t], -Y[:, t])[0] for t in range(G.shape[1])])
    values = defined_values("group LDS", rhos, "across the subsets")
    return float(np.mean(values[~np.isnan(values)]))


@dataclass
class TrainingRecord:
    """What :meth:`AirRep.fit` did.

    Attributes:
        losses: the mean ranking loss of each epoch.
        seconds: the wall-clock time of the training.
        steps: the number of optimiser steps.
    """

    losses: list[float]
    seconds: float
    steps: int


class AirRep:
    """An encoder trained to rank retrained subsets (Sun et al. 2025), module docstring.

    Args:
        encoder: any ``nn.Module`` mapping a batch of examples' features [n, ...] to embeddings
            [n, d] (a sentence-embedding model over token ids, an MLP over fixed features); the
            same encoder embeds test and training examples. Default: :class:`MLPEncoder`, built
            by :meth:`fit` from the width of the features (``hidden``, ``dim``, seeded).
        hidden: the default encoder's hidden width.
        dim: the default encoder's embedding dimension.
        temperature: the attention pooling's temperature (> 0; 1 in the paper).
        pooling: ``"attention"`` (the paper's) or ``"mean"`` (an additive group score, an
            ablation: per-example scores then form a linear datamodel).

    Attributes:
        encoder: the encoder (None until :meth:`fit` when the default is used).
        record: the last :meth:`fit`'s losses and time (None before).
    """

    def __init__(
        self,
        encoder: nn.Module | None = None,
        *,
        hidden: int = 64,
        dim: int = 32,
        temperature: float = 1.0,
        pooling: Pooling = "attention",
    ) -> None:
        if encoder is not None and not isinstance(encoder, nn.Module):
            raise InvalidInputError(
                f"encoder must be a torch.nn.Module (or None for the default MLP), got "
                f"{type(encoder).__name__}"
            )
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise InvalidInputError(f"temperature must be > 0, got {temperature!r}")
        self.encoder = encoder
        self.hidden = hidden
        self.dim = dim
        if pooling not in POOLINGS:
            raise InvalidInputError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.temperature = float(temperature)
        self.pooling = pooling
        self.record: TrainingRecord | None = None

    # ------------------------------------------------------------------ training
    def fit(
        self,
        test_features: Tensor,
        train_features: Tensor,
        bank: SubsetRetraining,
        *,
        epochs: int = 100,
        lr: float = 3e-3,
        batch_size: int = 32,
        subsets_per_step: int | None = 32,
        weighted: bool = True,
        max_weight: float = 5.0,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 1.0,
        seed: int = 0,
    ) -> AirRep:
        """Train the encoder on a retraining bank with the pairwise ranking loss.

        An epoch passes once over the bank's test examples in shuffled batches of
        ``batch_size``; each step draws ``subsets_per_step`` of the bank's subsets and
        takes the loss over every pair of them for every test example of the batch (a batch of
        ``batch_size x subsets_per_step x (subsets_per_step - 1) / 2`` pairs), then one Adam
        step. Each step embeds the whole training set: the cost of a step is one forward and
        backward pass of the encoder over N + ``batch_size`` examples. A second call continues
        training the same encoder.

        Args:
            test_features: [T, ...] features of the bank's test examples (the queries whose
                measurements the bank recorded, in its order).
            train_features: [N, ...] features of the training examples (the bank's columns).
            bank: the retraining bank (:func:`retraining_bank`): ``masks`` [m, N],
                ``measurements`` [m, T].
            epochs: passes over the test examples.
            lr: Adam's learning rate.
            batch_size: test examples per step.
            subsets_per_step: subsets per step (None: all m).
            weighted: weight each pair by its target difference (:func:`ranking_loss`).
            max_weight: the largest weight of a pair.
            weight_decay: Adam's (L2) weight decay on the encoder's parameters.
            max_grad_norm: clip the gradient's norm to this (None: no clipping).
            seed: seeds the default encoder's initial weights and the batches.

        Returns:
            ``self``, trained.
        """
        masks, Y = _bank(bank)
        test_x, train_x = (
            _tensor(test_features, "test_features"),
            _tensor(train_features, "train_features"),
        )
        if masks.shape[1] != len(train_x):
            raise InvalidInputError(
                f"the bank's masks cover {masks.shape[1]} training examples but train_features "
                f"has {len(train_x)} rows"
            )
        if Y.shape[1] != len(test_x):
            raise InvalidInputError(
                f"the bank measured {Y.shape[1]} test examples but test_features has "
                f"{len(test_x)} rows"
            )
        epochs = integer_argument("epochs", epochs, 1)
        batch_size = integer_argument("batch_size", batch_size, 1)
        if subsets_per_step is not None and (
            not isinstance(subsets_per_step, int)
            or isinstance(subsets_per_step, bool)
            or subsets_per_step < 2
        ):
            raise InvalidInputError(
                f"subsets_per_step must be an integer >= 2 or None, got {subsets_per_step!r}"
            )
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise InvalidInputError(f"lr must be > 0, got {lr!r}")
        targets = ranking_targets(Y)
        if not bool((targets.max(0).values > targets.min(0).values).any()):
            raise InvalidInputError(
                "the bank's measurements do not vary across subsets for any test example: "
                "nothing to rank"
            )
        if self.encoder is None:
            if test_x.shape[1:] != train_x.shape[1:]:
                raise InvalidInputError(
                    f"test_features {tuple(test_x.shape[1:])} and train_features "
                    f"{tuple(train_x.shape[1:])} must have the same shape per example"
                )
            width = math.prod(train_x.shape[1:])
            self.encoder = MLPEncoder(width, self.hidden, self.dim, seed=seed)
        encoder = self.encoder
        params = [p for p in encoder.parameters() if p.requires_grad]
        if not params:
            raise InvalidInputError("the encoder has no trainable parameters")
        optimiser = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        m, T = Y.shape
        per_step = m if subsets_per_step is None else min(subsets_per_step, m)
        losses: list[float] = []
        steps = 0
        start = time.perf_counter()
        with evaluation_mode(encoder):
            for _ in range(epochs):
                total, count = 0.0, 0
                for rows in torch.randperm(T, generator=gen).split(batch_size):
                    chosen = torch.randperm(m, generator=gen)[:per_step]
                    batch_targets = targets[chosen][:, rows]
                    if not bool((batch_targets.max(0).values > batch_targets.min(0).values).any()):
                        continue  # nothing to rank in this batch
                    emb_train = self._embed(train_x, grad=True)
                    emb_test = self._embed(test_x[rows], grad=True)
                    s = emb_test @ emb_train.T  # [b, N]
                    G = pooled_scores(s, masks[chosen].to(s.device), self.temperature, self.pooling)
                    loss = ranking_loss(
                        G,
                        batch_targets.to(G.device),
                        weighted=weighted,
                        max_weight=max_weight,
                    )
                    optimiser.zero_grad()
                    loss.backward()
                    if max_grad_norm is not None:
                        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                    optimiser.step()
                    total += float(loss.detach())
                    count += 1
                    steps += 1
                losses.append(total / max(count, 1))
        self.record = TrainingRecord(losses, time.perf_counter() - start, steps)
        return self

    # ------------------------------------------------------------------ inference
    def embed(self, features: Tensor) -> Tensor:
        """Embeddings [n, d] of examples' features [n, ...] (no gradient, in chunks).

        Args:
            features: [n, ...] features (the encoder's input).
        """
        return self._embed(_tensor(features, "features"), grad=False)

    def scores(self, test_features: Tensor, train_features: Tensor) -> Tensor:
        """Per-example attribution scores ``s_tj = <f(x_t), f(x_j)>``, [T, N].

        In infkit's sign (positive: a proponent, whose removal would raise the test
        measurement), without units: a ranking (module docstring).

        Args:
            test_features: [T, ...] features of the test examples.
            train_features: [N, ...] features of the training examples.
        """
        test_e = self._embed(_tensor(test_features, "test_features"), grad=False)
        train_e = self._embed(_tensor(train_features, "train_features"), grad=False)
        if test_e.shape[1] != train_e.shape[1]:
            raise InvalidInputError(
                f"the encoder gave test embeddings of dimension {test_e.shape[1]} and training "
                f"embeddings of dimension {train_e.shape[1]}"
            )
        return test_e @ train_e.T

    def group_scores(self, test_features: Tensor, train_features: Tensor, masks: Tensor) -> Tensor:
        """Attention-pooled scores of training subsets, ``G_t(S_k)``, [m, T].

        Higher means the model retrained on ``S_k`` is predicted to have a lower measurement on
        test example t (:func:`group_lds` evaluates them against a bank).

        Args:
            test_features: [T, ...] features of the test examples.
            train_features: [N, ...] features of the training examples.
            masks: [m, N] bool, True for the members of each subset (a bank's ``masks``).
        """
        masks = _masks(masks)
        s = self.scores(test_features, train_features)
        if masks.shape[1] != s.shape[1]:
            raise InvalidInputError(
                f"masks cover {masks.shape[1]} training examples but train_features has "
                f"{s.shape[1]} rows"
            )
        rows = max(1, POOL_ELEMENTS // max(s.numel(), 1))
        return torch.cat(
            [pooled_scores(s, part, self.temperature, self.pooling) for part in masks.split(rows)]
        )

    def _embed(self, x: Tensor, *, grad: bool) -> Tensor:
        if self.encoder is None:
            raise NotFittedError(
                "this AirRep has no encoder yet: call fit(...) first, or pass encoder=..."
            )
        encoder = self.encoder
        param = next(iter(encoder.parameters()), None)
        if param is not None:
            x = x.to(param.device)
            if x.is_floating_point():
                x = x.to(param.dtype)
        if grad:
            out = encoder(x)
        else:
            with evaluation_mode(encoder), torch.no_grad():
                out = torch.cat([encoder(part) for part in x.split(EMBED_ROWS)])
        if not isinstance(out, Tensor) or out.dim() != 2 or len(out) != len(x):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InvalidInputError(
                f"the encoder must map [n, ...] features to [n, d] embeddings; for {len(x)} "
                f"examples it gave {shape}"
            )
        if not grad and not bool(torch.isfinite(out).all()):
            raise InvalidInputError("the encoder gave NaN or Inf embeddings")
        return out


def _tensor(x: Any, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        try:
            x = torch.as_tensor(x)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise InvalidInputError(f"{name} must be a tensor [n, ...], got {type(x)}") from exc
    if x.dim() < 1 or len(x) == 0:
        raise InvalidInputError(f"{name} must have at least one row, got shape {tuple(x.shape)}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).nonzero()[0])
        raise InvalidInputError(f"{name}: example {bad} has NaN or Inf features")
    return x


def _check_pooling(scores: Tensor, masks: Tensor, temperature: float) -> None:
    if scores.dim() != 2:
        raise InvalidInputError(f"scores must be [T, N], got shape {tuple(scores.shape)}")
    if masks.dim() != 2 or masks.shape[1] != scores.shape[1]:
        raise InvalidInputError(
            f"masks must be [m, N] with N = {scores.shape[1]} (the scores' columns), got shape "
            f"{tuple(masks.shape)}"
        )
    if not bool(masks.any(1).all()):
        raise InvalidInputError(f"subset {int((~masks.any(1)).nonzero()[0])} has no members")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise InvalidInputError(f"temperature must be > 0, got {temperature!r}")


def _masks(masks: Any) -> Tensor:
    M = kept_masks(masks, MASKS_HINT)
    if M.dim() != 2 or len(M) == 0:
        raise InvalidInputError(
            f"masks must be [m, N] (True or 1 = member) with m >= 1, got shape {tuple(M.shape)}"
        )
    empty = (~M.any(1)).nonzero()
    if len(empty):
        raise InvalidInputError(f"subset {int(empty[0])} has no members")
    return M


def _bank(bank: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(bank, SubsetRetraining):
        raise InvalidInputError(
            "bank must be an infkit.retrain.SubsetRetraining (retraining_bank(...) or "
            f"infkit.retrain.subsets(...)), got {type(bank).__name__}"
        )
    if bank.masks.dim() != 2 or len(bank.masks) < 2:
        raise InvalidInputError(
            f"the bank is empty or too small: AirRep ranks subsets against each other and needs "
            f"at least 2, got masks of shape {tuple(bank.masks.shape)}"
        )
    masks = _masks(bank.masks)
    Y = torch.as_tensor(bank.measurements, dtype=torch.float64)
    if Y.dim() != 2 or len(Y) != len(masks):
        raise InvalidInputError(
            f"the bank's measurements {tuple(Y.shape)} must be [m, T] with m = {len(masks)} subsets"
        )
    if Y.shape[1] == 0:
        raise InvalidInputError("the bank measured no test example")
    if not bool(torch.isfinite(Y).all()):
        raise InvalidInputError("the bank's measurements contain NaN or Inf")
    return masks, Y
