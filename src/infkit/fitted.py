"""The fitted record: everything ``fit`` establishes, handed to every method and estimator.

:class:`Fitted` holds the task, the training data, theta*, the objective (``l2``, ``damping``,
the regulariser anchor), the per-example engine, the settings of the run and, when it fits in
memory, the [N, P] cache of training-loss gradients. It is built once by
:meth:`infkit.Influence.fit`; methods read it in their own ``fit`` and keep it to answer
questions. The helpers below are the fit-time passes over the data: the gradient cache and the
stationarity check (docs/conventions.md §2).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from infkit.data import Batch, ExampleSet, check_compatible
from infkit.errors import (
    InvalidInputError,
    UnsupportedError,
    listed,
    warn,
)
from infkit.example_checks import check_examples, deterministic_outputs, warn_batch_mixing
from infkit.failures import naming_failures
from infkit.fingerprint import (
    changed_keys,
    forward_snapshot,
    forward_written,
    held_module_tensors,
    module_classes,
    note_forward_writes,
    settings_values,
    tensor_attributes,
    tensor_digest,
    user_hooks,
)
from infkit.gradients import GRADIENT_WORK_FACTOR, PerExample, Which, gradient_rows
from infkit.memory import human_bytes, output_rows
from infkit.parameters import ParameterSpace, evaluation_mode, product_dtype
from infkit.progress import Mode, track
from infkit.task import Task
from infkit.training import objective_and_gradient

#: above this ||grad L(theta)|| / typical per-example gradient, fit measures the drift
STATIONARITY_TOLERANCE = 1e-3
#: rif and newton warn of their cost when an example has more outputs than this (each output
#: of each example is one backward pass of its Jacobian)
JACOBIAN_WARNING_OUTPUTS = 256
#: training gradients are cached in memory up to this many bytes (and a quarter of the limit)
GRADIENT_CACHE_BYTES = 1 << 30


@dataclass
class GradientSummary:
    """What the stationarity check needs from a pass over the training gradients.

    Attributes:
        mean_gradient: ``(1/N) sum_i grad l_i`` [P] float64.
        mean_norm: ``(1/N) sum_i ||grad l_i||``, the typical per-example gradient size.
    """

    mean_gradient: Tensor
    mean_norm: float


@dataclass(frozen=True)
class Fitted:
    """The training set, theta*, the objective and the machinery, as ``fit`` established them.

    Attributes:
        task: the model, its per-example loss and the measurement.
        space: the trainable parameters theta.
        engine: per-example gradients, Jacobians and tangent products at theta*.
        train: the training set.
        theta: theta* as a flat [P] vector in the parameters' own dtype: an exact snapshot
            that takes no more room than the parameters (a float64 copy would double a float32
            model's and quadruple a bfloat16 one's); arithmetic takes it to float64
            (:meth:`zeros`, :attr:`regularised_theta`).
        l2: the objective's own L2 coefficient (mean form).
        damping: extra, purely numerical ridge of the curvature.
        batch_size: examples per batch of every pass over data.
        progress: how progress is shown (:mod:`infkit.progress`).
        memory_limit: bytes dense objects may take.
        train_gradients: the [N, P] training-loss gradients in :func:`~infkit.parameters.product_dtype`, or None when
            they are not cached (too large, or the method does not use them).
        anchor: theta' of the regulariser ``(l2/2)||theta - theta'||^2`` (None: 0).
        objective_gradient: ``grad L(theta*)`` [P] in :func:`~infkit.parameters.product_dtype`
            (0 at an exact optimum), when the method assumes an optimum; the Newton step uses it
            to stay exact at a loose one.
        stationarity: ``||grad L(theta*)||`` relative to the typical per-example gradient.
        workdir: the directory of a resumable run's artifacts (factors, score shards), or None
            (:mod:`infkit.shards`).
    """

    task: Task
    space: ParameterSpace
    engine: PerExample
    train: ExampleSet
    theta: Tensor
    l2: float
    damping: float
    batch_size: int
    progress: Mode
    memory_limit: int
    train_gradients: Tensor | None = None
    anchor: Tensor | None = None
    objective_gradient: Tensor | None = None
    stationarity: float | None = None
    workdir: Path | None = None

    def __post_init__(self) -> None:
        # digests of the model's tensors outside theta, as fit found them (changed_since_fit)
        object.__setattr__(self, "_outside", _outside_digests(self.task.model, self.space))
        # the tensors kept as plain attributes, to tell one edited in place (changed_since_fit)
        object.__setattr__(self, "_attributes", _attribute_snapshot(self.task.model))
        # the plain attributes and settings (changed_since_fit)
        object.__setattr__(self, "_settings", settings_values(self.task.model))
        # which adapters were active (adapters_changed_since_fit)
        object.__setattr__(self, "_adapters", adapter_state(self.task.model))
        # each module's class, to tell a parameter-free module replaced (changed_since_fit)
        object.__setattr__(self, "_classes", module_classes(self.task.model))
        # the hooks of the user's code and the modules held outside the tree (changed_since_fit)
        object.__setattr__(self, "_hooks", user_hooks(self.task.model))
        object.__setattr__(self, "_held", _held_snapshot(self.task.model))

    def changed_since_fit(self) -> str | None:
        """The name of the first parameter or buffer of the model that differs from fit time
        (theta against the snapshot :attr:`theta`, the others against their digests), or of a
        tensor attribute edited in place since (:func:`~infkit.fingerprint.tensor_attributes`),
        or of a plain attribute or setting (:func:`~infkit.fingerprint.settings_values`: a
        LoRA layer's ``scaling``, ``cfg.scale``) set anew, what a forward pass writes left out,
        of a parameter of theta frozen since, of a module replaced by one of another class
        (an activation, which has no parameter), of a module whose hooks of the user's code
        changed (:func:`~infkit.fingerprint.user_hooks`), or of a tensor of a module held
        outside the module tree (:func:`~infkit.fingerprint.held_module_tensors`), or None.

        Every answer combines the fitted state (curvature, cached gradients, theta*) with the
        model as it is when asked; a model trained further or edited after ``fit`` would give
        answers that describe neither.
        """
        model = self.task.model
        current = dict(model.named_parameters())
        snapshot = self.space.unflatten(self.theta)
        for name in self.space.names:
            now = current.get(name)
            if now is None or not torch.equal(now.detach(), snapshot[name]):
                return name
            if not now.requires_grad:  # (its gradients, and so the queries', are left out)
                return f"{name} (frozen since fit)"
        classes: dict[str, str] = self._classes  # type: ignore[attr-defined]
        found_classes = module_classes(model)
        for name in sorted(classes):  # (a module a forward pass makes, a reviewer's per batch
            if found_classes.get(name) != classes[name]:  # size, is none of fit's: left out)
                now_class = found_classes.get(name, "nothing")
                return f"{name or 'model'} (module: {classes[name]} at fit, {now_class} now)"
        hooks: dict[str, str] = self._hooks  # type: ignore[attr-defined]
        found_hooks = user_hooks(model)
        changed = changed_keys(hooks, found_hooks)
        if changed:
            module, kind = changed[0].split(":", 1)
            return f"{module or 'model'} (hook: {kind.split('[')[0]})"
        held: dict[str, str] = self._held  # type: ignore[attr-defined]
        found_held = _held_snapshot(model)
        changed = changed_keys(held, found_held)
        if changed:
            return f"{changed[0]} (held outside the module tree)"
        found = _outside_digests(model, self.space)
        expected: dict[str, str] = self._outside  # type: ignore[attr-defined]
        changed = changed_keys(expected, found)
        if changed:
            return changed[0]
        kept: dict[str, str] = self._attributes  # type: ignore[attr-defined]
        for name, value in tensor_attributes(model).items():  # a forward pass's writes left out
            if name in kept and tensor_digest(value) != kept[name]:
                return f"{name} (attribute)"
        settings: dict[str, str] = self._settings  # type: ignore[attr-defined]
        values, written = settings_values(model), set(forward_written(model))
        changed = [n for n in changed_keys(settings, values) if n not in written]
        if changed:
            return f"{changed[0]} (setting)"
        return None

    def adapters_changed_since_fit(self) -> str | None:
        """What changed in the model's adapter layers since fit (peft's: which adapters are
        active, whether disabled or merged), or None. Their weights are unchanged when
        another adapter is set or ``disable_adapter()`` entered, but the forward pass no
        longer calls the attributed ones: every gradient in them, and so every score, is 0."""
        now = adapter_state(self.task.model)
        then: dict[str, AdapterState] = self._adapters  # type: ignore[attr-defined]
        changed = changed_keys(then, now)
        if changed:
            name = changed[0]
            return (
                f"layer {name!r} had {_adapter_words(then.get(name))} at fit and has "
                f"{_adapter_words(now.get(name))} now"
            )
        return None

    def require_unchanged(self) -> None:
        """Raise InvalidInputError when the model changed since fit (:meth:`changed_since_fit`,
        :meth:`adapters_changed_since_fit`)."""
        adapters = self.adapters_changed_since_fit()
        if adapters is not None:
            raise InvalidInputError(
                f"the model's adapters changed since fit: {adapters}. The attributed adapter "
                "parameters take part in the forward pass only while their adapter is active, "
                "so every score would be 0: set the adapters back as they were at fit "
                "(set_adapter(...), outside disable_adapter(), unmerged), or fit again"
            )
        name = self.changed_since_fit()
        if name is not None:
            raise InvalidInputError(changed_message(name, ", or fit again"))

    # ------------------------------------------------------------------ sizes and ridges
    @property
    def n(self) -> int:
        """N, the number of training examples."""
        return len(self.train)

    @property
    def ridge(self) -> float:
        """l2 + damping: the ridge of the damped mean-form curvature."""
        return self.l2 + self.damping

    def retained_ridge(self, n_removed: int) -> float:
        """(N_R/N) l2 + damping: the ridge of the retained objective's curvature H_R."""
        return (self.n - n_removed) / self.n * self.l2 + self.damping

    @property
    def regularised_theta(self) -> Tensor:
        """theta* - theta' [P] float64 (theta' the regulariser's anchor, 0 by default)."""
        theta = self.theta.to(torch.float64)
        return theta if self.anchor is None else theta - self.anchor

    def zeros(self) -> Tensor:
        """A [P] float64 vector of zeros on the parameters' device (an accumulator)."""
        return torch.zeros(self.theta.shape, dtype=torch.float64, device=self.theta.device)

    # ------------------------------------------------------------------ data
    def examples(self, data: Any, name: str, measured: bool = False) -> ExampleSet:
        """``data`` as an ExampleSet, checked: finite, shaped like the training inputs, and
        with targets the task can use (:func:`check_examples`; ``measured``: a set read
        through the measurement only, the queries)."""
        examples = ExampleSet(data, name=name)
        with naming_failures(self.engine, examples, measured, self.batch_size):
            check_beside(self.engine, self.train, examples, measured)
        return examples

    def query_gradients(self, examples: ExampleSet, which: Which = "measurement") -> Tensor:
        """grad m_t (or grad l_t) of every example, [n, P] float64."""
        space = self.space
        out = torch.empty(len(examples), space.size, dtype=torch.float64, device=space.device)
        start = 0
        for batch in examples.batches(self.gradient_batch_size):  # in order
            grads = self.engine.grads(batch, which)
            out[start : start + grads.shape[0]] = grads
            start += grads.shape[0]
        if which == "measurement":
            warn_about_still_queries(examples, (out != 0).any(dim=1), self.engine.precision)
        return out

    def train_batches(
        self, desc: str, indices: Tensor | None = None, size: int | None = None
    ) -> Iterator[Batch]:
        """The training batches (of ``indices``: default all) of ``size`` examples (default
        :attr:`batch_size`), with progress named ``desc``."""
        size = size or self.batch_size
        count = self.n if indices is None else len(indices)
        batches = self.train.batches(size, indices)
        return track(batches, self.progress, desc, -(-count // size))

    @property
    def pass_batch_size(self) -> int:
        """Examples a batch of the passes whose batches infkit chooses (the post-fit checks,
        the objective's pass, the per-example gradients' batches): :attr:`batch_size`, lowered
        so that a batch's outputs and their gradients take at most a quarter of
        :attr:`memory_limit` (:func:`~infkit.memory.output_rows`). A language model's logits
        over a large vocabulary make them the largest objects of such a pass: a tiny model over
        32,000 words rose by 744 MiB under a limit of 150 MiB in its checks at batches of 8
        sequences of 64 tokens (92 MiB now). The fit's statistics passes keep
        :attr:`batch_size` (a sampled Fisher draws its labels per batch); the scoring passes
        count the outputs in their own budget
        (:func:`~infkit.kfac.streaming.pass_output_bytes`)."""
        return output_rows(
            self.batch_size,
            math.prod(self.output_shape),
            self.space.dtype.itemsize,
            self.memory_limit,
        )

    @property
    def gradient_batch_size(self) -> int:
        """Examples a batch where per-example gradients [B, P] are formed by vmap over the model:
        :attr:`pass_batch_size`, lowered to keep them within a quarter of :attr:`memory_limit`
        (:func:`~infkit.gradients.gradient_rows`)."""
        return gradient_rows(
            self.pass_batch_size, self.space.size, self.space.bytes_per_float(), self.memory_limit
        )

    @property
    def training_gradient_batch_size(self) -> int:
        """Examples a batch of training-loss gradients (:meth:`loss_grads`): :attr:`batch_size`
        where they are read from the cache, else :attr:`gradient_batch_size`."""
        return self.batch_size if self.train_gradients is not None else self.gradient_batch_size

    def gradient_batches(self, desc: str, indices: Tensor | None = None) -> Iterator[Batch]:
        """:meth:`train_batches` of :attr:`training_gradient_batch_size` examples, for passes
        that take the training examples' loss gradients."""
        return self.train_batches(desc, indices, self.training_gradient_batch_size)

    # ------------------------------------------------------------------ training gradients
    def loss_grads(self, batch: Batch) -> Tensor:
        """grad l_j for a training batch, [B, P] float64 (no regulariser share)."""
        if self.train_gradients is not None:
            return self.train_gradients[batch.indices].to(torch.float64)
        return self.engine.grads(batch, "loss").to(torch.float64)

    def attributed_grads(self, batch: Batch) -> Tensor:
        """v_j = grad l_j + l2 (theta* - theta'), [B, P] float64."""
        return self.loss_grads(batch) + self.l2 * self.regularised_theta

    def attributed_grads_and_terms(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """:meth:`attributed_grads` and the size of its two terms, ``||grad l_j|| + l2
        ||theta* - theta'||`` [B] float64: a v_j far below them is their cancellation, zero
        to rounding (an example the model fits exactly)."""
        g = self.loss_grads(batch)
        reg = self.l2 * self.regularised_theta
        return g + reg, g.norm(dim=1) + float(reg.norm())

    def attributed_products(self, U: Tensor) -> Tensor:
        """U v_j^T for every training example j: [k, N] float64, for U of shape [k, P].

        With the gradient cache this is one matrix product in the cache's dtype, plus the
        regulariser share ``l2 U (theta - theta')`` added in float64; otherwise it streams the
        gradients.
        """
        U = U.to(torch.float64)
        shared = self.l2 * (U @ self.regularised_theta.to(U)) if self.l2 else None
        if self.train_gradients is not None:
            G = self.train_gradients
            S = (U.to(G.dtype) @ G.T).to(torch.float64)
        else:
            S = torch.empty(U.shape[0], self.n, dtype=torch.float64, device=U.device)
            for batch in self.gradient_batches("scores"):
                S[:, batch.indices] = U @ self.loss_grads(batch).T
        return S if shared is None else S.add_(shared.unsqueeze(1))

    @cached_property
    def output_shape(self) -> tuple[int, ...]:
        """The shape of one training example's output f(x) (C = its product)."""
        with torch.no_grad():
            return tuple(self.engine.outputs(self.train.take([0])).shape[1:])

    def require_jacobian_room(self, rows: int, estimator: str, *, joint: bool = False) -> None:
        """Raise UnsupportedError before ``rows`` examples' output Jacobians would overflow.

        ``joint``: the rows are one removed group, whose Lambda is one [rows C, rows C] block.

        rif and newton downdate each example's own curvature block ``J_j^T Lambda_j J_j``: they
        hold ``J_j`` [C, P] and ``H^{-1} J_j^T`` in float64 and ``Lambda_j`` [C, C]. For a
        language model C is the sequence length times the vocabulary, so these are out of reach
        beyond toy sizes; the check names the sizes and the way out instead of running for hours.
        """
        c, p = math.prod(self.output_shape), self.space.size
        need = (rows * 2 * c * p + (rows * c) ** 2 if joint else rows * (2 * c * p + c * c)) * 8
        if need <= self.memory_limit:
            return
        lam = f"the group's joint Lambda [{rows} C, {rows} C]" if joint else "Lambda_j [C, C]"
        raise UnsupportedError(
            f"estimator {estimator!r} needs each training example's output Jacobian J_j "
            f"[C, P], its solve H^-1 J_j^T [P, C] and {lam} in float64, with C = "
            f"{self._outputs_text()} outputs and P = {p} parameters: "
            f"{human_bytes(need)} for {rows} example(s), more than memory_limit "
            f"({human_bytes(self.memory_limit)}). Use estimator 'if' (its scores, self-influence "
            "and group removals need no Jacobian; a group's joint effect under 'if' is the sum "
            "of its members' scores), or raise memory_limit if the machine has the room"
        )

    def _outputs_text(self) -> str:
        """C for a message: ``"7 x 11 = 77"`` for sequence outputs, ``"10"`` for flat ones."""
        shape = self.output_shape
        c = math.prod(shape)
        return f"{' x '.join(str(d) for d in shape)} = {c}" if len(shape) > 1 else str(c)

    def warn_jacobian_cost(self, estimator: str, examples: int) -> None:
        """Warn before ``examples`` output Jacobians of more than :data:`JACOBIAN_WARNING_OUTPUTS`
        outputs each: one backward pass per output, where IF needs one gradient per example."""
        c = math.prod(self.output_shape)
        if c <= JACOBIAN_WARNING_OUTPUTS:
            return
        warn(
            f"estimator {estimator!r} forms the output Jacobian of each of {examples:,} "
            f"training examples: C = {self._outputs_text()} backward passes each, "
            f"{examples * c:,} in all, "
            "where estimator 'if' needs one gradient per example. For a language model (C = "
            "sequence length x vocabulary) this takes hours beyond toy sizes: use 'if'",
            UserWarning,
        )

    def jacobians_and_lambdas(
        self, batch: Batch, estimator: str, *, checked: bool = False
    ) -> tuple[Tensor, Tensor]:
        """J_j [B, C, P] and Lambda_j [B, C, C] of a training batch, float64, for ``estimator``
        (``checked``: the caller has already verified the room)."""
        if not checked:
            self.require_jacobian_room(len(batch), estimator)
        J = self.engine.jacobians(batch).to(torch.float64)
        _, _, lam = self.engine.output_derivatives(batch)
        computed_in = lam.dtype
        lam = lam.to(torch.float64)
        _warn_if_indefinite(lam, computed_in)
        return J, lam

    @property
    def result_dtype(self) -> torch.dtype:
        """The dtype of the facade's results: the model's, at least float32 (a bfloat16 score
        would keep 3 significant digits of what was accumulated in float32 or float64)."""
        return torch.promote_types(self.space.dtype, torch.float32)

    def output(self, x: Tensor) -> Tensor:
        """A result in :attr:`result_dtype`, on the CPU (what the facade returns)."""
        return x.to(self.result_dtype).cpu()


#: Lambda_j's smallest eigenvalue below minus this many machine epsilons (of the dtype it was
#: computed in) times the batch's largest entry, and at least 1, is negative beyond rounding
#: (:func:`_warn_if_indefinite`)
INDEFINITE_EPSILONS = 1000


def _warn_if_indefinite(lam: Tensor, computed_in: torch.dtype) -> None:
    """Warn when a training example's ``Lambda_j`` [C, C], the loss's curvature in its outputs,
    has a negative eigenvalue beyond rounding (a non-convex loss, a Cauchy loss past its
    inflection): its leverage can then be negative (a tester's -0.014), and the downdates of
    ``rif`` and ``newton`` lose the reading docs/estimators.md §3-4 give them. The message is
    the same for every batch, so a warnings filter shows it once.

    Rounding is measured on the scale of the numbers Lambda is computed from, not of its own
    eigenvalues: a softmax's ``diag(p) - p p^T`` has a null eigenvalue whose float32 rounding
    reads -2.4e-6 of its largest at C = 3, and a saturated one (p near 1) has entries of
    ``p (1 - p)``, far below the rounding of p itself (a reviewer's false alarms)."""
    values = torch.linalg.eigvalsh(0.5 * (lam + lam.transpose(1, 2)))
    scale = max(float(lam.abs().max()), 1.0) if lam.numel() else 1.0
    tolerance = INDEFINITE_EPSILONS * torch.finfo(computed_in).eps * scale
    if bool((values[:, 0] < -tolerance).any()):
        warn(
            "the loss's curvature in the outputs, Lambda_j, is not positive semidefinite at some "
            "training examples (a non-convex loss, such as a Cauchy or Tukey loss past its "
            "inflection): the GGN is then no Gauss-Newton matrix there, leverages can be "
            "negative, and rif's and newton's downdates lose their reading as leave-one-out "
            "corrections (docs/estimators.md §3-4); their numbers are the formulas'. Use "
            "estimator 'if' or a convex loss, and check against retraining (infkit.retrain)",
            UserWarning,
        )


# ---------------------------------------------------------------------------- checks
def check_weights_present(model: nn.Module) -> None:
    """Refuse a model with tensors on PyTorch's meta device (built from a configuration under
    ``torch.device("meta")``): it has shapes and no values, so nothing can be run on it."""
    empty = [
        name
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers())
        if t.is_meta
    ]
    if empty:
        raise InvalidInputError(
            f"the model has {len(empty)} tensors on the meta device (shapes without values, "
            f"e.g. {empty[0]!r}): load its weights first (from_pretrained, or to_empty() and "
            "load_state_dict); plan() works on it as it is"
        )


def check_beside(
    engine: PerExample, train: ExampleSet, examples: ExampleSet, measured: bool = False
) -> None:
    """Check a set to be asked about beside the training set ``train``: finite, shaped like
    its inputs, and usable by the task (:func:`check_examples`; ``measured``: read through
    the measurement only)."""
    check_compatible(train, examples)
    check_examples(engine, examples, measured)


def check_parameters_take_part(engine: PerExample, examples: ExampleSet) -> None:
    """Refuse a parameter space none of whose parameters the model's outputs depend on: every
    gradient, and so every score, would be 0. One forward and backward pass of the first
    example, with the parameters of ``engine``'s space requiring gradients.

    Raises:
        InvalidInputError: the outputs of ``examples``' first example do not depend on them (a
            peft adapter merged into its base weights is the usual cause: its matrices stay
            trainable, but the forward pass no longer calls them).
    """
    first = examples.take([0])
    inputs, _ = engine.prepare(first)
    params = {name: p.requires_grad_() for name, p in engine.params().items()}
    with torch.enable_grad(), evaluation_mode(engine.task.model):
        outputs = engine.call(params, inputs)
        # (trainable parameters outside the space, left out by a method, stay in the graph)
        if isinstance(outputs, Tensor) and outputs.requires_grad:
            grads = torch.autograd.grad(outputs.sum(), list(params.values()), allow_unused=True)
            if any(g is not None for g in grads):
                return
    names = list(params)
    shown = listed([repr(name) for name in names], 3)
    merged = [
        name
        for name, module in engine.task.model.named_modules()
        if getattr(module, "merged", False) is True and hasattr(module, "lora_A")
    ]
    remedy = (
        "Mark the parameters the forward pass uses as trainable (requires_grad=True) and "
        "freeze the others, or name layers it calls with modules=[...]"
    )
    if merged:
        others = " and others" if len(merged) > 1 else ""
        remedy = (
            f"The peft adapter of {merged[0]!r}{others} is merged into its base weights "
            "(merge_adapter()): its lora_A and lora_B stay trainable but are no longer called. "
            "Call unmerge_adapter() to attribute through the adapter, or merge_and_unload() "
            "and mark the parameters to attribute with requires_grad=True"
        )
    raise InvalidInputError(
        f"none of the {len(names)} parameters attributed through ({shown}) takes part in the "
        f"model's outputs for {examples.name} {examples.example(0)}: every gradient, and so "
        f"every score, would be 0. {remedy}"
    )


def warn_about_still_queries(examples: ExampleSet, moved: Tensor, dtype: torch.dtype) -> None:
    """Warn, naming the first, of the examples whose measurement's gradient in the attributed
    parameters is 0 (``moved[k]`` False): every score of theirs is 0. In float16 (``dtype``, the
    passes' precision: the autocast one, else the model's), the likelier cause is named first:
    gradients below its range round to 0."""
    still = (~moved.cpu()).nonzero()
    if not len(still):
        return
    k, count = int(still[0, 0]), len(still)
    named = examples.example(k) + (f" and {count - 1} more" if count > 1 else "")
    causes = (
        "a measurement that does not depend on them there, or reads labels that score nothing there"
    )
    if dtype == torch.float16:  # the smallest float16 is 6e-8 (subnormal): a confident model's
        causes = (  # gradients fall below it
            "in float16, whose smallest number is 6e-8, smaller gradients round to 0, as a "
            "confident model's often are: score a float32 copy of the model, or use "
            "dtype=torch.bfloat16 on it, whose range is float32's; else " + causes
        )
    warn(
        f"{examples.name} {named}: the gradient of the measurement in the attributed "
        f"parameters is 0 there, so {'every score of it is' if count == 1 else 'their scores are'}"
        f" 0 ({causes})",
        UserWarning,
    )


# ---------------------------------------------------------------------------- fit-time passes
#: an adapter layer's state: its active adapters, whether disabled, whether merged
AdapterState = tuple[tuple[str, ...], bool, bool]


def adapter_state(model: nn.Module) -> dict[str, AdapterState]:
    """The state of every adapter layer of ``model`` (a module with peft's ``active_adapters``,
    ``disable_adapters`` and ``merged``), by name; empty for a model without adapters."""
    out: dict[str, AdapterState] = {}
    for name, module in model.named_modules():
        if all(hasattr(module, a) for a in ("active_adapters", "disable_adapters", "merged")):
            active = module.active_adapters
            names = (active,) if isinstance(active, str) else tuple(active)
            out[name] = (names, bool(module.disable_adapters), bool(module.merged))
    return out


def _adapter_words(state: AdapterState | None) -> str:
    """An adapter layer's state as a message says it."""
    if state is None:
        return "no adapter"
    active, disabled, merged = state
    words = f"adapter(s) {', '.join(repr(a) for a in active)} active"
    if disabled:
        words += ", disabled (disable_adapter())"
    if merged:
        words += ", merged"
    return words


def _outside_digests(model: nn.Module, space: ParameterSpace) -> dict[str, str]:
    """``tensor_digest`` of every parameter and buffer of ``model`` outside ``space``, by name
    (the frozen and unattributed parameters and the buffers the answers also depend on)."""
    attributed = set(space.names)
    tensors: dict[str, Tensor] = {n: p for n, p in model.named_parameters() if n not in attributed}
    tensors.update(model.named_buffers())
    return {name: tensor_digest(t) for name, t in tensors.items()}


def _held_snapshot(model: nn.Module) -> dict[str, str]:
    """The digest of each tensor of the modules ``model`` holds unregistered
    (:func:`~infkit.fingerprint.held_module_tensors`)."""
    return {name: tensor_digest(t) for name, t in held_module_tensors(model).items()}


def _attribute_snapshot(model: nn.Module) -> dict[str, str]:
    """The digest of each of ``model``'s tensor attributes
    (:func:`~infkit.fingerprint.tensor_attributes`: those a forward pass writes left out)."""
    return {name: tensor_digest(t) for name, t in tensor_attributes(model).items()}


def changed_message(name: str, then: str) -> str:
    """What to say of ``name``, as :meth:`Fitted.changed_since_fit` found it changed, and what
    to do (``then``: ``", or fit again"``, ``" (or fit again) before saving"``)."""
    if name.endswith(" (frozen since fit)"):
        parameter = name.removesuffix(" (frozen since fit)")
        return (
            f"the model's parameter {parameter!r} was frozen since fit (requires_grad=False): "
            "the fitted state attributes through it, the queries' gradients would leave it out. "
            f"Set it trainable again (model.get_parameter({parameter!r}).requires_grad_(True))"
            f"{then}"
        )
    kept = (
        " (if the forward pass keeps that value itself, a statistic that a pass of yours moved "
        "since, set it back as it was)"
        if name.endswith("(setting)")
        else ""
    )
    return (
        f"the model's {name!r} changed since fit: the fitted state (curvature, training "
        "gradients, theta*) describes the model as it was, and answers would mix it with the new "
        f"values. Restore the model's parameters, modules, hooks and settings{then}{kept}"
    )


def probe_forward_writes(engine: PerExample, examples: ExampleSet) -> Tensor:
    """The model's outputs on the first example, computed twice, and the tensor attributes
    the second pass and the batch-mixing check's put in place, and the plain attributes and
    settings they changed, noted as a forward pass's writes
    (:func:`~infkit.fingerprint.note_forward_writes`), so that they are no part of the
    model's identity; refused when the two outputs differ beyond rounding
    (:func:`deterministic_outputs`), warned of when the first example's output in a batch is
    not its output alone (:func:`warn_batch_mixing`)."""
    model = engine.task.model
    first = examples.take([0])
    once = engine.outputs(first)
    # (after a first pass: what it fills once, and no pass changes again, is a setting)
    settled = forward_snapshot(model)
    between = {name: b.detach().clone() for name, b in model.named_buffers()}
    again = engine.outputs(first)
    updated = [
        name
        for name, b in model.named_buffers()
        if name in between and not torch.equal(b.detach(), between[name])
    ]
    deterministic_outputs(once, again, examples, updated)
    warn_batch_mixing(engine, examples, once)
    note_forward_writes(model, settled)
    return once


def gradient_cache_bytes(n: int, p: int, dtype: torch.dtype) -> int:
    """Bytes of the [N, P] training-gradient cache of a model in ``dtype``, as fit keeps it
    (in :func:`~infkit.parameters.product_dtype`)."""
    return n * p * product_dtype(dtype).itemsize


def gradient_cache_fits(
    n: int, p: int, dtype: torch.dtype, memory_limit: int, batch_size: int = 1
) -> bool:
    """Whether fit keeps the [N, P] training gradients of a model in ``dtype`` in memory: up
    to :data:`GRADIENT_CACHE_BYTES` and a quarter of ``memory_limit``, and with the pass that
    fills it (a batch's per-example gradients and their working memory,
    :data:`~infkit.gradients.GRADIENT_WORK_FACTOR` x [``batch_size``, P], counted whole though
    the pass takes them :func:`~infkit.gradients.gradient_rows` at a time) within half of it: a
    larger limit never makes a run cache what a smaller one would not."""
    cache = gradient_cache_bytes(n, p, dtype)
    work = GRADIENT_WORK_FACTOR * batch_size * p * dtype.itemsize
    return cache <= min(GRADIENT_CACHE_BYTES, memory_limit // 4) and (
        cache + work <= memory_limit // 2
    )


def training_gradients(
    engine: PerExample, train: ExampleSet, batch_size: int, memory_limit: int, progress: Mode
) -> tuple[Tensor | None, GradientSummary | None]:
    """The [N, P] training-loss gradients when they fit in memory (else None), and a summary.

    The cache is kept in :func:`~infkit.parameters.product_dtype` of the model; the summary for the stationarity
    check is accumulated in float64 on the way.
    """
    n, p = len(train), engine.space.size
    dtype = product_dtype(engine.space.dtype)
    if not gradient_cache_fits(n, p, engine.space.dtype, memory_limit, batch_size):
        return None, None
    # batches whose outputs take at most a quarter of the limit (Fitted.pass_batch_size)
    with torch.no_grad():
        outputs = math.prod(engine.outputs(train.take([0])).shape[1:])
    itemsize = engine.space.dtype.itemsize
    rows = gradient_rows(
        output_rows(batch_size, outputs, itemsize, memory_limit), p, itemsize, memory_limit
    )
    out = torch.empty(n, p, dtype=dtype, device=engine.device)
    total_gradient = torch.zeros(p, dtype=torch.float64, device=engine.device)
    total_norm = 0.0
    for batch in track(train.batches(rows), progress, "gradients", -(-n // rows)):
        g = engine.grads(batch, "loss")
        out[batch.indices] = g.to(dtype)
        total_gradient += g.sum(0).to(torch.float64)
        total_norm += float(g.norm(dim=1).sum())
    return out, GradientSummary(total_gradient / n, total_norm / n)


def _summary_by_pass(fitted: Fitted) -> GradientSummary:
    """The gradient summary without a cache: one objective pass over the data in batches, and
    the per-example gradients of the first batch's examples (their mean norm)."""
    mean_gradient = mean_gradient_by_pass(fitted)
    # the typical per-example gradient from the first batch's examples, one at a time (a
    # [B, P] block of a language model's gradients would be the run's largest object)
    first = range(min(fitted.batch_size, fitted.n))
    norms = [float(fitted.engine.grads(fitted.train.take([i])).norm()) for i in first]
    return GradientSummary(mean_gradient, sum(norms) / len(norms))


def mean_gradient_by_pass(fitted: Fitted) -> Tensor:
    """``(1/N) sum_i grad l_i`` [P] float64 by one objective pass over the data in batches, in
    the model's own precision (outside any ``dtype=`` autocast); a non-finite one names its
    example."""
    with evaluation_mode(fitted.task.model):
        _, full = objective_and_gradient(
            fitted.task,
            fitted.space,
            fitted.train,
            0.0,
            chunk=fitted.pass_batch_size,
            engine=fitted.engine,
            progress=fitted.progress,
        )
    mean_gradient = full.to(torch.float64)
    if not bool(torch.isfinite(mean_gradient).all()):
        for batch in fitted.train.batches(fitted.pass_batch_size):
            fitted.engine.grads(batch)  # raises NonFiniteError naming the example
    return mean_gradient


def objective_gradient(fitted: Fitted, summary: GradientSummary | None) -> tuple[Tensor, float]:
    """grad L(theta*) [P] and its size relative to the typical per-example gradient.

    The gradient is summed in float64 and kept in :func:`~infkit.parameters.product_dtype`
    (float32 for a float32 or bfloat16 model: the per-example gradients it averages carry no
    more precision, and it is one more [P] vector held for the whole run).

    Influence estimates assume a trained optimum of ``mean_i l_i + (l2/2)||theta - theta'||^2``;
    above :data:`STATIONARITY_TOLERANCE` the methods measure whether the distance to it changes
    their answer (:meth:`infkit.methods.Method.diagnose`) and warn only then.
    """
    summary = summary or _summary_by_pass(fitted)
    reg_theta = fitted.regularised_theta
    gradient = summary.mean_gradient + fitted.l2 * reg_theta
    scale = summary.mean_norm + fitted.l2 * float(reg_theta.norm())
    size = float(gradient.norm())
    if not (math.isfinite(size) and math.isfinite(scale)):
        # a tester's target of 1e160: the squares overflowed to a NaN figure no comparison
        # warned of, while every score was 1e157
        warn(
            "the training objective's gradient at theta* overflows (its norm or the per-example "
            "gradients' is not finite in float64): the losses are too large for the optimum to "
            "be checked or the scores to be trusted; rescale the targets or inputs",
            UserWarning,
        )
        return gradient.to(product_dtype(fitted.space.dtype)), math.inf
    stationarity = size / max(scale, 1e-300)
    return gradient.to(product_dtype(fitted.space.dtype)), stationarity
