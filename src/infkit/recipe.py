"""A deterministic training recipe that infkit can replay, reweight and differentiate through.

Influence functions assume an optimum; networks trained by SGD are not at one. Attribution
through the training run itself (``method="unrolled"``, docs/methods/unrolled.md) needs the run to be a
pure function of the data weights ``w`` (one per training example, 1 when trained normally):

    theta_{t+1}, b_{t+1} = U(theta_t, b_t, g_t(w), eta_t, t),
    g_t(w) = grad_theta [ sum_{i in B_t} w_i l_i(theta_t) / nu_t(w) + (l2/2) ||theta_t||^2 ]

with ``B_t`` the batch of step t (fixed by ``seed``; every example in full-batch training),
``nu_t`` the normaliser (``"retained"``: ``sum_{i in B_t} w_i``, so a removed example leaves the
batch mean of the others; ``"nominal"``: ``|B_t|``), ``eta_t`` the schedule and ``U`` the
optimiser's update with its buffers ``b`` (momentum, Adam's moments). A :class:`Recipe` says all
of this; :meth:`Recipe.train` runs it on a model and returns a :class:`TrainingRun` that records
the initial parameters, so the same run can be replayed with other weights: retraining without
a set F is the same recipe with ``w_F = 0`` from the same initial parameters
(``infkit.retrain`` accepts the run), and its derivative in ``w`` is what ``unrolled`` computes.

The model runs in evaluation mode (no dropout), so every replay is deterministic. A user's own
optimiser stands in for the built-in ones by the :class:`Optimizer` contract: pure tensor
functions ``init`` and ``update`` with no in-place operation, so ``torch.func`` can
differentiate through them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import DataLoader

from infkit.data import ExampleSet
from infkit.errors import InvalidInputError, NonFiniteError, warn
from infkit.example_checks import check_examples
from infkit.fingerprint import object_identity
from infkit.gradients import PerExample
from infkit.options import integer_argument, real_number
from infkit.parameters import ParameterSpace, evaluation_mode, warn_about_training_mode
from infkit.task import Task

#: optimiser buffers (momentum, moments): a tuple of [P] tensors
Buffers = tuple[Tensor, ...]


@runtime_checkable
class Optimizer(Protocol):
    """The contract of an optimiser a :class:`Recipe` can replay and differentiate through.

    Both functions must be pure (no in-place operation, no state outside their arguments) and
    built from differentiable tensor operations: the unrolled method runs them under
    ``torch.func.vjp``, ``jvp`` and ``vmap``.
    """

    def init(self, theta: Tensor) -> Buffers:
        """The buffers at step 0 for flat parameters ``theta`` [P]."""
        ...

    def update(
        self, theta: Tensor, buffers: Buffers, gradient: Tensor, lr: float, t: int
    ) -> tuple[Tensor, Buffers]:
        """One step: the new parameters and buffers from the gradient [P] at step ``t``."""
        ...


@dataclass(frozen=True)
class SGD:
    """Plain gradient descent: theta <- theta - eta g."""

    def init(self, theta: Tensor) -> Buffers:
        return ()

    def update(
        self, theta: Tensor, buffers: Buffers, gradient: Tensor, lr: float, t: int
    ) -> tuple[Tensor, Buffers]:
        return theta - lr * gradient, ()


@dataclass(frozen=True)
class Momentum:
    """Heavy-ball momentum as ``torch.optim.SGD`` does it: m <- mu m + g; theta <- theta - eta m."""

    momentum: float = 0.9

    def init(self, theta: Tensor) -> Buffers:
        return (torch.zeros_like(theta),)

    def update(
        self, theta: Tensor, buffers: Buffers, gradient: Tensor, lr: float, t: int
    ) -> tuple[Tensor, Buffers]:
        m = self.momentum * buffers[0] + gradient
        return theta - lr * m, (m,)


@dataclass(frozen=True)
class Adam:
    """Adam with bias correction and the epsilon inside the square root.

    ``theta <- theta - eta m_hat / sqrt(v_hat + eps^2)``: smooth everywhere (``sqrt(v) + eps`` has
    an infinite derivative where a gradient coordinate is exactly 0), and within eps of Adam.
    """

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def init(self, theta: Tensor) -> Buffers:
        return torch.zeros_like(theta), torch.zeros_like(theta)

    def update(
        self, theta: Tensor, buffers: Buffers, gradient: Tensor, lr: float, t: int
    ) -> tuple[Tensor, Buffers]:
        m = self.beta1 * buffers[0] + (1 - self.beta1) * gradient
        v = self.beta2 * buffers[1] + (1 - self.beta2) * gradient * gradient
        m_hat = m / (1 - self.beta1 ** (t + 1))
        v_hat = v / (1 - self.beta2 ** (t + 1))
        return theta - lr * m_hat / torch.sqrt(v_hat + self.eps**2), (m, v)


#: the built-in optimisers, by name
OPTIMIZERS = ("sgd", "momentum", "adam")
#: the defaults of the settings that one built-in optimiser reads (:class:`Recipe`)
DEFAULT_MOMENTUM, DEFAULT_BETAS, DEFAULT_EPS = 0.9, (0.9, 0.999), 1e-8


def _real(name: str, value: Any) -> float:
    """``value`` as a float: a real number (numpy's too) or a one-number tensor, else an error
    naming the setting."""
    number = real_number(value)
    if number is None:
        raise InvalidInputError(f"Recipe: {name} must be a number, got {value!r}")
    return number


Schedule = Literal["constant", "cosine", "linear"]


@dataclass(frozen=True)
class Recipe:
    """How a model is trained, exactly: replayable with any data weights (module docstring).

    Args:
        steps: optimiser steps.
        lr: the peak learning rate eta.
        optimizer: ``"sgd"``, ``"momentum"``, ``"adam"``, or an object with the
            :class:`Optimizer` contract.
        batch_size: examples per step; None: full batch.
        l2: the objective's own L2 coefficient (mean form, as everywhere in infkit).
        momentum: mu of ``"momentum"``.
        betas: Adam's (beta1, beta2).
        eps: Adam's epsilon (inside the square root, see :class:`Adam`).
        schedule: ``"constant"``, ``"cosine"`` or ``"linear"``, after ``warmup`` steps of linear
            warm-up: the decaying ones reach 0 at step ``steps``, one past the last step taken
            (eta_t = eta (1 + cos(pi p)) / 2 or eta (1 - p), p = (t - warmup) / (steps - warmup)).
        warmup: steps of linear warm-up from eta / warmup.
        seed: the data order of minibatches (a new permutation each epoch).
        normalise: ``"retained"`` (a batch's loss is the weighted mean over its examples: removing
            an example leaves the mean of the others) or ``"nominal"`` (divided by the batch size).
    """

    steps: int
    lr: float
    optimizer: str | Optimizer = "sgd"
    batch_size: int | None = None
    l2: float = 0.0
    momentum: float = DEFAULT_MOMENTUM
    betas: tuple[float, float] = DEFAULT_BETAS
    eps: float = DEFAULT_EPS
    schedule: Schedule = "constant"
    warmup: int = 0
    seed: int = 0
    normalise: Literal["retained", "nominal"] = "retained"
    _update: Optimizer = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 1:
            raise InvalidInputError(f"Recipe: steps must be an integer >= 1, got {self.steps!r}")
        for name in ("lr", "l2"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
                raise InvalidInputError(f"Recipe: {name} must be a number >= 0, got {value!r}")
        self._check_optimizer_settings()
        if self.batch_size is not None and (
            not isinstance(self.batch_size, int) or self.batch_size < 1
        ):
            raise InvalidInputError(
                f"Recipe: batch_size must be an integer >= 1 or None (full batch), got "
                f"{self.batch_size!r}"
            )
        if self.schedule not in ("constant", "cosine", "linear"):
            raise InvalidInputError(
                f"Recipe: schedule must be 'constant', 'cosine' or 'linear', got {self.schedule!r}"
            )
        if self.normalise not in ("retained", "nominal"):
            raise InvalidInputError(
                f"Recipe: normalise must be 'retained' or 'nominal', got {self.normalise!r}"
            )
        if not isinstance(self.warmup, int) or not 0 <= self.warmup < self.steps:
            raise InvalidInputError(
                f"Recipe: warmup must be an integer in [0, steps), got {self.warmup!r}"
            )
        object.__setattr__(self, "_update", self._make_optimizer())

    def _check_optimizer_settings(self) -> None:
        """Refuse settings outside their range (a momentum or beta of 1 or more diverges or never
        forgets; Adam's eps of 0 makes ``sqrt(v + eps^2)`` non-differentiable where a gradient
        coordinate is 0) and settings the chosen optimiser does not read."""
        mu = _real("momentum", self.momentum)
        betas = self.betas
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise InvalidInputError(f"Recipe: betas must be two numbers in [0, 1), got {betas!r}")
        b1, b2 = _real("betas[0]", betas[0]), _real("betas[1]", betas[1])
        eps = _real("eps", self.eps)
        if not 0 <= mu < 1:
            raise InvalidInputError(f"Recipe: momentum must be in [0, 1), got {mu!r}")
        if not (0 <= b1 < 1 and 0 <= b2 < 1):
            raise InvalidInputError(f"Recipe: betas must be two numbers in [0, 1), got {betas!r}")
        if not eps > 0:
            raise InvalidInputError(
                f"Recipe: eps must be a number > 0 (Adam's sqrt(v + eps^2) has no derivative "
                f"where v = 0 with eps = 0), got {eps!r}"
            )
        unread = {
            "momentum": (mu != DEFAULT_MOMENTUM, "momentum"),
            "betas": ((b1, b2) != DEFAULT_BETAS, "adam"),
            "eps": (eps != DEFAULT_EPS, "adam"),
        }
        for name, (given, reader) in unread.items():
            if given and self.optimizer != reader:
                chosen = (
                    f"optimizer={self.optimizer!r}"
                    if isinstance(self.optimizer, str)
                    else f"your optimizer {type(self.optimizer).__name__}"
                )
                raise InvalidInputError(
                    f"Recipe: {name}={getattr(self, name)!r} is read by optimizer={reader!r} "
                    f"only, and {chosen} would ignore it: use optimizer={reader!r}, or leave "
                    f"{name} out"
                )

    def _make_optimizer(self) -> Optimizer:
        if isinstance(self.optimizer, str):
            if self.optimizer == "sgd":
                return SGD()
            if self.optimizer == "momentum":
                return Momentum(self.momentum)
            if self.optimizer == "adam":
                return Adam(self.betas[0], self.betas[1], self.eps)
            raise InvalidInputError(
                f"Recipe: unknown optimizer {self.optimizer!r}; use one of "
                f"{', '.join(OPTIMIZERS)} or an object with init() and update() "
                "(infkit.recipe.Optimizer)"
            )
        if not isinstance(self.optimizer, Optimizer):
            raise InvalidInputError(
                "Recipe: optimizer must be 'sgd', 'momentum', 'adam' or an object with pure "
                f"init(theta) and update(theta, buffers, gradient, lr, t); got "
                f"{type(self.optimizer).__name__}"
            )
        return self.optimizer

    @property
    def update(self) -> Optimizer:
        """The optimiser's pure update functions."""
        return self._update

    def _diverged(self, what: str, losses: list[float]) -> NonFiniteError:
        """The error of a run that diverged (the model is left as it was)."""
        start = f" ({losses[0]:.4g} at step 0)" if losses and math.isfinite(losses[0]) else ""
        return NonFiniteError(
            f"Recipe.train: the run diverged: {what}{start}; the model is left as it was before "
            f"the call. Lower lr (now {self.lr}), add warm-up steps, or check that the loss "
            "and the data are finite at the initial parameters"
        )

    def learning_rate(self, t: int) -> float:
        """eta_t: warm-up, then the schedule."""
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        if self.schedule == "constant":
            return self.lr
        progress = (t - self.warmup) / max(1, self.steps - self.warmup)
        if self.schedule == "linear":
            return self.lr * (1.0 - progress)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    def batches_per_epoch(self, n: int) -> int:
        return 1 if self.batch_size is None else math.ceil(n / self.batch_size)

    def batch(self, n: int, t: int) -> Tensor | None:
        """The training indices of step t (None: all of them, full batch)."""
        if self.batch_size is None or self.batch_size >= n:
            return None
        epoch, k = divmod(t, self.batches_per_epoch(n))
        return self.epoch_order(n, epoch)[k * self.batch_size : (k + 1) * self.batch_size]

    def epoch_order(self, n: int, epoch: int) -> Tensor:
        """The order in which epoch ``epoch`` visits the ``n`` training examples (its batches
        are consecutive slices of ``batch_size``)."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=gen)

    def record(self) -> dict[str, Any]:
        """The recipe as JSON values (fingerprints, describe())."""
        optimizer = self.optimizer
        return {
            "steps": self.steps,
            "lr": float(self.lr),
            "optimizer": optimizer if isinstance(optimizer, str) else object_identity(optimizer),
            "batch_size": self.batch_size,
            "l2": float(self.l2),
            "momentum": float(self.momentum),
            "betas": [float(b) for b in self.betas],
            "eps": float(self.eps),
            "schedule": self.schedule,
            "warmup": self.warmup,
            "seed": self.seed,
            "normalise": self.normalise,
        }

    def _warn_loader_batching(self, train: Any) -> None:
        """Warn where ``train`` is a DataLoader whose batch size is not the recipe's: the recipe
        trains by its own (a tester's loader of 16 trained full-batch, without a word; for
        attribution a loader's batching changes nothing, for training it changes the run)."""
        if not isinstance(train, DataLoader) or train.batch_size == self.batch_size:
            return
        if train.batch_size is None:  # (a batch_sampler of one's own: its batches are its)
            return
        mine = "full batch" if self.batch_size is None else f"batch_size={self.batch_size}"
        warn(
            f"Recipe.train trains by the recipe's batches ({mine}), not by the DataLoader's "
            f"(batch_size={train.batch_size}): it reads the loader's dataset, in its order, and "
            "draws its own minibatches (seed=). Give Recipe(batch_size="
            f"{train.batch_size}) to train on batches of that size",
            UserWarning,
        )

    def train(
        self,
        task: Task,
        train: Any,
        *,
        weights: Tensor | None = None,
        initial: Tensor | None = None,
        record_every: int | None = None,
    ) -> TrainingRun:
        """Train ``task.model`` in place by this recipe and return the recorded run.

        Args:
            task: the model (its current parameters are theta_0 unless ``initial``) and its loss.
            train: the training set (any form :class:`~infkit.data.ExampleSet` accepts).
            weights: the data weights w [N] (default: all 1).
            initial: theta_0 as a flat [P] vector (default: the model's current parameters).
            record_every: keep the parameters every this many steps (an integer >= 1) in
                ``run.checkpoints`` (TracInCP); None: only theta_0 and the final parameters.
        """
        every = None if record_every is None else integer_argument("record_every", record_every, 1)
        self._warn_loader_batching(train)
        examples = ExampleSet(train, name="training set")
        warn_about_training_mode(task.model)
        replay = Replay(self, task, examples)
        check_examples(replay.engine, examples)  # the data as fit checks it, before any step
        theta0 = replay.space.flat().detach().clone() if initial is None else initial
        theta0 = replay.check_vector(theta0, "initial")
        w = replay.weights(weights)
        kept: list[tuple[int, Tensor]] = []
        losses: list[float] = []
        theta = theta0
        for t, theta, _buffers, loss in replay.trajectory(theta0, w):
            # (None kept the final parameters alone, where this docstring says theta_0 too:
            # the TracInCP rates of docs/methods/identity.md §3 then had no checkpoint)
            if t == 0 if every is None else t % every == 0:
                kept.append((t, theta))
            if loss is not None:
                losses.append(loss)
                if not math.isfinite(loss):
                    raise self._diverged(
                        f"the training objective is {loss} before step {t}", losses
                    )
        if not bool(torch.isfinite(theta).all()):
            raise self._diverged("the final parameters hold NaN or Inf", losses)
        replay.space.assign_(theta)
        if not kept or kept[-1][0] != self.steps:
            kept.append((self.steps, theta))
        return TrainingRun(
            recipe=self,
            initial=theta0,
            final=theta.detach().clone(),
            weights=w,
            n=len(examples),
            losses=torch.tensor(losses, dtype=torch.float64),
            checkpoints=kept,
        )


def replay_tolerance(dtype: torch.dtype) -> float:
    """How far (relative to their norm) a replay of a run may end from the run's final
    parameters and still be that run: 1e-6 in float64, a thousand roundings in a lower
    precision (1.2e-4 in float32, at most 1e-2), where a full batch's sums in another order
    round otherwise at every step (a float32 Adam run of 300 steps on a reordered set ended
    2.2e-6 away). Further is other data, another model or recipe, or a training that is not
    deterministic (a sixth of the labels changed: 0.33)."""
    return min(1e-2, max(1e-6, 1000 * torch.finfo(dtype).eps))


def relative_drift(theta: Tensor, reference: Tensor) -> float:
    """``||theta - reference|| / ||reference||`` (the plain norm where ``reference`` is 0)."""
    theta = theta.detach().to(reference.dtype)
    drift = float((theta - reference).norm()) / (float(reference.norm()) or 1.0)
    return drift if math.isfinite(drift) else math.inf  # NaN parameters are not the run's


@dataclass
class TrainingRun:
    """A model trained by a :class:`Recipe`: what is needed to replay and differentiate it.

    Attributes:
        recipe: the recipe.
        initial: theta_0, flat [P] (model dtype).
        final: theta_T, flat [P]: the trained model's parameters.
        weights: the data weights it was trained with [N] (all 1 normally).
        n: N, the number of training examples.
        losses: the training objective before each step [steps].
        checkpoints: (step, theta_step) pairs kept by ``record_every`` (and the final one;
            theta_0 and the final one without it).
    """

    recipe: Recipe
    initial: Tensor
    final: Tensor
    weights: Tensor
    n: int
    losses: Tensor
    checkpoints: list[tuple[int, Tensor]]

    def require_model(self, owner: str, n: int, l2: float, theta: Tensor) -> None:
        """Refuse, naming ``owner``, a training set of ``n`` examples, an ``l2`` or a model's
        flat parameters ``theta`` [P] that are not this run's: its N, the recipe's l2, its P
        and, within :func:`replay_tolerance`, its final parameters."""
        if self.n != n:
            raise InvalidInputError(
                f"{owner}: the run trained on {self.n} examples, the training set has {n}: pass "
                "the data the run was trained on"
            )
        if float(l2) != float(self.recipe.l2):
            raise InvalidInputError(
                f"{owner}: l2={l2} differs from the recipe's l2={self.recipe.l2}: the run's "
                f"objective is the recipe's; pass l2={self.recipe.l2}"
            )
        if theta.numel() != self.final.numel():
            raise InvalidInputError(
                f"{owner}: the run covers {self.final.numel()} parameters, the model attributes "
                f"{theta.numel()}: pass the model the run trained, attributed through all of it"
            )
        if relative_drift(theta, self.final) > replay_tolerance(theta.dtype):
            raise InvalidInputError(
                f"{owner}: the model's parameters are not the run's final parameters: pass the "
                "model the run trained, as Recipe.train left it"
            )

    def require_replayed(self, owner: str, final: Tensor) -> None:
        """Refuse, naming ``owner``, a replay of the recipe that ended at ``final`` [P] further
        than :func:`replay_tolerance` from the run's final parameters: other examples or labels
        (or another order), another model with the same parameters, or a training that is not
        deterministic."""
        drift = relative_drift(final, self.final)
        if drift > replay_tolerance(final.dtype):
            raise InvalidInputError(
                f"{owner}: replaying the run on this training set ends {drift:.2e} (relative) "
                "from the run's final parameters: these are not the examples and labels it was "
                "trained on (or not in its order), the model is not the one it trained (another "
                "architecture holding its parameters), or training is not deterministic (an "
                "optimiser of your own that keeps state outside its arguments: buffers go "
                "through init() and update(), docs/methods/unrolled.md §5); pass the run's own "
                "data and model"
            )

    def __repr__(self) -> str:
        return (
            f"TrainingRun({self.recipe!r}, N={self.n}, P={self.final.numel()}, "
            f"final objective {float(self.losses[-1]) if len(self.losses) else float('nan'):.4g})"
        )


class Replay:
    """The recipe as pure functions of (theta, buffers, w) on one training set and model.

    ``step`` is one optimiser step (``torch.func``-differentiable in all three arguments);
    ``trajectory`` runs the recipe; ``checkpoints`` keeps every k-th state for the reverse pass.
    """

    def __init__(self, recipe: Recipe, task: Task, examples: ExampleSet) -> None:
        self.recipe = recipe
        self.task = task
        self.examples = examples
        self.n = len(examples)
        self.space = ParameterSpace(task.model)
        self.engine = PerExample(task, self.space)
        self._full: tuple[Any, Any] | None = None

    def check_vector(self, theta: Tensor, what: str) -> Tensor:
        theta = torch.as_tensor(theta)
        if theta.shape != (self.space.size,):
            raise InvalidInputError(
                f"{what} parameters must be a flat vector of length P = {self.space.size}, got "
                f"shape {tuple(theta.shape)}"
            )
        return theta.detach().to(self.space.dtype).clone()

    def weights(self, weights: Tensor | None) -> Tensor:
        """w [N] in the model's dtype (default all 1), checked."""
        if weights is None:
            return torch.ones(self.n, dtype=self.space.dtype)
        w = torch.as_tensor(weights).detach().to(self.space.dtype)
        if w.shape != (self.n,) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise InvalidInputError(
                f"weights must be {self.n} finite numbers >= 0 (one per training example), got "
                f"shape {tuple(w.shape)}"
            )
        if not bool((w > 0).any()):  # (trained on the ridge alone, without a word)
            raise InvalidInputError(
                f"weights are all 0: the run would train on none of the {self.n} training "
                "examples; give the examples to train on weights > 0"
            )
        return w

    def _batch(self, t: int) -> tuple[Tensor | None, Any, Any]:
        idx = self.recipe.batch(self.n, t)
        if idx is None:
            if self._full is None:
                self._full = self.engine.prepare(self.examples.take(torch.arange(self.n)))
            return None, *self._full
        inputs, targets = self.engine.prepare(self.examples.take(idx))
        return idx, inputs, targets

    def objective(self, theta: Tensor, w: Tensor, t: int) -> Tensor:
        """The step-t objective at theta: the weighted batch loss over nu_t(w) plus the ridge."""
        idx, inputs, targets = self._batch(t)
        outputs = self.engine.call(self.space.unflatten(theta), inputs)
        losses = self.task.checked_loss(outputs, targets)
        wb = w if idx is None else w[idx]
        if self.recipe.normalise == "retained":
            data = (wb * losses).sum() / wb.sum().clamp_min(torch.finfo(wb.dtype).tiny)
        else:
            data = (wb * losses).sum() / len(wb)
        return data + 0.5 * self.recipe.l2 * (theta * theta).sum()

    def step(self, theta: Tensor, buffers: Buffers, w: Tensor, t: int) -> tuple[Tensor, Buffers]:
        """One optimiser step from (theta_t, b_t) with data weights w: pure."""
        gradient = torch.func.grad(self.objective)(theta, w, t)
        return self._update(theta, buffers, gradient, t)

    def _update(
        self, theta: Tensor, buffers: Buffers, gradient: Tensor, t: int
    ) -> tuple[Tensor, Buffers]:
        """The optimiser's update at step t, its contract's breach named: an in-place operation
        works while training and fails only under ``torch.func``'s transforms."""
        update = self.recipe.update
        try:
            return update.update(theta, buffers, gradient, self.recipe.learning_rate(t), t)
        except RuntimeError as error:
            if "in-place" not in str(error) and "inplace" not in str(error):
                raise
            raise InvalidInputError(
                f"the optimiser {type(update).__name__}'s update() changes a tensor in place "
                f"({error}): infkit differentiates through it with torch.func, so init() and "
                "update() must be pure, returning new tensors (m = mu * m + g, not "
                "m.mul_(mu).add_(g)); see infkit.recipe.Optimizer"
            ) from error

    def _step_and_objective(
        self, theta: Tensor, buffers: Buffers, w: Tensor, t: int
    ) -> tuple[Tensor, Buffers, float]:
        """:meth:`step` and the objective before it, from one forward and backward pass."""
        gradient, value = torch.func.grad_and_value(self.objective)(theta, w, t)
        theta, buffers = self._update(theta, buffers, gradient, t)
        return theta, buffers, float(value)

    def trajectory(
        self,
        theta0: Tensor,
        w: Tensor,
        start: int = 0,
        stop: int | None = None,
        buffers: Buffers | None = None,
    ) -> Iterator[tuple[int, Tensor, Buffers, float | None]]:
        """(t, theta_t, b_t, objective before step t) for t = start .. stop, no graph kept.

        The last item is the state after the final step, with objective None.
        """
        stop = self.recipe.steps if stop is None else stop
        theta = theta0
        state = self.recipe.update.init(theta0) if buffers is None else buffers
        with evaluation_mode(self.task.model), torch.no_grad():
            for t in range(start, stop):
                with torch.enable_grad():
                    new_theta, new_state, loss = self._step_and_objective(theta, state, w, t)
                yield t, theta, state, loss
                theta, state = new_theta.detach(), tuple(b.detach() for b in new_state)
            yield stop, theta, state, None

    def final(self, theta0: Tensor, w: Tensor) -> tuple[Tensor, Buffers]:
        """theta_T and b_T of a replay from theta0 with weights w."""
        *_, (_, theta, buffers, _loss) = self.trajectory(theta0, w)
        return theta, buffers
