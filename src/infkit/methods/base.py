"""The one method interface: fit once, then answer the facade's questions.

Every method has the same life (docs/architecture.md §3): ``fit(fitted)`` once on the
:class:`~infkit.fitted.Fitted` record, then it answers questions through the same interface:

* ``scores(queries, estimator)`` [T, N], ``self_scores(estimator)`` [N] and
  ``removal(indices, estimator)`` [P] (every method);
* ``removal_change(data, indices, estimator, which)``: a method may compute the change of the
  outputs or the loss its own way (None: the facade uses ``J Delta theta``);
* ``leverages()`` and ``precondition_queries(V)`` (``H^{-1} V``, what the decompositions and the input
  influence are built on), for methods that have them.

Which of these a method answers is *declared* (:attr:`Method.questions`,
:attr:`Method.estimators`), so an unanswerable question is refused up front, naming the methods
that can answer it. :class:`PrimalMethod` is the base of parameter-space methods: they supply
only ``solve`` (apply the inverse damped curvature to vectors) and get the IF / RIF / Newton /
RelatIF algebra of :mod:`infkit.estimators` for every answer. Methods that work another way (the
dual method in N*C space, TracInCP, TRAK) override the answers they compute differently.

Options are a frozen dataclass per method (:mod:`infkit.options`), parsed when the method is
created, so a misspelled option fails at ``Influence(...)``, not at ``fit``.

Registration: decorate the class with :func:`register`. Adding a method is one file; the
registry-wide contract test (tests/test_method_contract.py) then checks it against a dense
float64 reference at the :class:`Fidelity` it declares.
"""

from __future__ import annotations

import math
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar, get_args

import torch
from torch import Tensor, nn

from infkit import diagnostics, estimators
from infkit.autodiff import untaken
from infkit.data import ExampleSet
from infkit.errors import (
    CurvatureError,
    InvalidInputError,
    NotFittedError,
    ProblemTooLargeError,
    UnsupportedError,
    listed,
    warn,
)
from infkit.estimators import ESTIMATORS, Estimator, EstimatorName, RelatifNorm, SolveCall
from infkit.fingerprint import tensor_digest
from infkit.fitted import STATIONARITY_TOLERANCE, Fitted, gradient_cache_bytes
from infkit.gradients import PerExample, gradient_row_bytes, gradient_rows
from infkit.kfac.curvature import KroneckerCurvature
from infkit.layers.tracked import TrackedLayers
from infkit.memory import FLOAT64_BYTES, bounded, default_memory_limit, human_bytes, row_chunks
from infkit.options import NoOptions
from infkit.options import Options as BaseOptions
from infkit.parameters import ParameterSpace, dtype_name
from infkit.plan import RunShape, Stage
from infkit.progress import Progress
from infkit.shards import QueryRows
from infkit.task import Task

#: passes' worth of work one curvature product of one vector over the training data takes (a
#: per-example JVP and VJP; measured 1.3-2.5 a CG or ASTRA iteration of 3 vectors on a small
#: Llama, 3.2 for one vector on a float64 toy, and growing with the vectors): prices the
#: iterative solves' cap in the plan (:meth:`Method.solve_passes_at_most`), per vector
PRODUCT_PASSES = 4.0

#: the questions of the facade a method may answer
Question = Literal[
    "scores",
    "self_scores",
    "remove",
    "leverages",
    "input_influence",
    "module_scores",
    "token_scores",
    "query_batching",
    "kronecker",
]
QUESTIONS: tuple[Question, ...] = get_args(Question)
#: how error messages name each question
QUESTION_TEXT: dict[str, str] = {
    "scores": "scores",
    "self_scores": "self-scores",
    "remove": "group removals",
    "leverages": "leverages",
    "input_influence": "input influence",
    "module_scores": "per-module scores",
    "token_scores": "per-token scores",
    "query_batching": "query batching (batched_scores)",
    "kronecker": "a Kronecker-factored curvature (the analyses in its eigenbasis)",
}
#: curvatures a damping competes with (TRAK's feature Gram and the identity have no ridge)
DAMPED_CURVATURES = frozenset({"ggn", "hessian", "empirical-fisher"})
#: fit warns when the damping exceeds this multiple of the curvature scale plus l2
DAMPING_WARNING = 1e6
#: fit warns when the step to the optimum would change the training residuals this much
DRIFT_WARNING = 0.25
#: a step to the optimum below this many epsilons of the model's dtype, relative to theta, is
#: the parameters' rounding: no drift is warned of, whatever the residuals' shift reads (an
#: interpolant's step, 3 epsilons; a float32 model 1e-4 off, 1000 of them, is drift)
STEP_ROUNDINGS = 10.0
#: :meth:`Method.check_queries` warns when the queries' energy ratio is beyond this: their
#: scores that many times too large
QUERY_SCALE_WARNING = 4.0

#: what every method answers
BASIC: frozenset[Question] = frozenset({"scores", "self_scores", "remove"})
#: what needs ``precondition_queries`` (H^{-1} applied to vectors in R^P)
PRECONDITIONED: frozenset[Question] = frozenset(
    {"input_influence", "module_scores", "token_scores", "query_batching"}
)
#: what a parameter-space method answers
PRIMAL: frozenset[Question] = BASIC | PRECONDITIONED | frozenset({"leverages"})
#: a parameter-space method whose curvature is Kronecker-factored (its eigenbasis is exposed)
KRONECKER: frozenset[Question] = PRIMAL | frozenset({"kronecker"})


@dataclass(frozen=True)
class Fidelity:
    """How a method's answers relate to the dense float64 reference on small problems.

    It is what the registry-wide contract test checks (docs/architecture.md §6), and what a
    user may expect of the method.

    Attributes:
        reference: the dense curvature the method targets: ``"ggn"`` (the damped GGN) or
            ``"identity"`` (no curvature); ``"trajectory"``: the method differentiates a recorded
            training run, not a curvature at an optimum, and its own tests check it against
            finite differences of reweighted retraining (tests/test_unrolled.py).
        rtol: exact-class methods: relative error bound of every answer (None: approximate).
        min_correlation: approximate methods: Pearson floor of scores, self-scores, leverages
            and per-module scores against the reference of the same estimator.
        removal_correlation: approximate methods: Pearson floor of a group removal's parameter
            change (default: ``min_correlation``).
        scale: approximate methods: the band ``(low, high)`` of the least-squares slope of the
            answers against the reference (a correlation cannot see a wrong scale, such as a
            missing 1/N).
        damping: the extra damping of the contract problems (approximate curvatures may need
            it for RIF and the Newton step, whose downdates need H to dominate an example's
            own curvature block).
        test_options: method options for the small contract problems, over the defaults.
    """

    reference: Literal["ggn", "identity", "trajectory"] = "ggn"
    rtol: float | None = 1e-8
    min_correlation: float | None = None
    removal_correlation: float | None = None
    scale: tuple[float, float] | None = None
    damping: float = 0.0
    test_options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Problem:
    """What ``method="auto"`` knows about a problem when it picks a method.

    Attributes:
        n: training examples; p: trainable parameters; c: outputs per example.
        memory_limit: bytes dense objects may take.
        model: the model; space: its trainable parameters.
    """

    n: int
    p: int
    c: int
    memory_limit: int
    model: nn.Module
    space: ParameterSpace


_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound="Method")


def register(cls: type[M]) -> type[M]:
    """Class decorator: make a method available by its ``name`` (checks its declarations)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise InvalidInputError(f"{cls.__name__} needs a class attribute name = '...'")
    if name == "auto":
        raise InvalidInputError("'auto' is reserved for the automatic choice of a method")
    bad = [e for e in cls.estimators if e not in ESTIMATORS]
    if bad or not cls.estimators:
        raise InvalidInputError(
            f"method {name!r} declares estimators {list(cls.estimators)}; choose from {ESTIMATORS}"
        )
    unknown = sorted(set(cls.questions) - set(QUESTIONS))
    if unknown or not cls.questions >= BASIC:
        raise InvalidInputError(
            f"method {name!r} declares questions {sorted(cls.questions)}: it must answer "
            f"{sorted(BASIC)} and may add {sorted(set(QUESTIONS) - BASIC)}"
        )
    if not (isinstance(cls.Options, type) and issubclass(cls.Options, BaseOptions)):
        raise InvalidInputError(f"method {name!r}: Options must derive from infkit.options.Options")
    if not isinstance(getattr(cls, "summary", None), str):
        raise InvalidInputError(
            f"method {name!r} needs a class attribute summary = '...' (its line in "
            "infkit.methods())"
        )
    if "leverages" in cls.questions and "rif" not in cls.estimators:
        # leverages are the example's own block's share of H, as RIF downdates it: a method
        # whose curvature does not contain that block (no RIF) has none to give (a tester's
        # DataInf read 2.96, a reviewer's method of their own 2.98, exact's below 0.46)
        cls.questions = cls.questions - {"leverages"}
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise InvalidInputError(
            f"method {name!r} ({cls.__qualname__}) does not implement {', '.join(missing)}: a "
            "PrimalMethod implements solve(V, shift) (and fit, calling super().fit(fitted), "
            "where it builds what solve needs from the data); CONTRIBUTING.md walks through one"
        )
    taken = _REGISTRY.get(name)
    if taken is not None and not _same_definition(taken, cls):
        # (the same class again, its module reloaded in a notebook, takes its place)
        raise InvalidInputError(
            f"method name {name!r} is taken by {_class_path(taken)}; {_class_path(cls)} would "
            "replace it for every Influence(..., method) in this process: give it another name"
        )
    _REGISTRY[name] = cls
    return cls


def _class_path(cls: type) -> str:
    """``module.QualifiedName`` of a class, as messages name it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def _same_definition(a: type, b: type) -> bool:
    """Whether two classes are one definition: the same qualified name in the same source
    file (a module reloaded, or one file imported under two names: run as ``__main__`` and
    imported by name, or by ``--method-file`` and by its package, as a reviewer's were), or in
    the same module where there is no file (a notebook's cell run again)."""
    if a.__qualname__ != b.__qualname__:
        return False
    files = [getattr(sys.modules.get(c.__module__), "__file__", None) for c in (a, b)]
    if all(files):
        return os.path.realpath(str(files[0])) == os.path.realpath(str(files[1]))
    return a.__module__ == b.__module__


def registered() -> dict[str, type[Method]]:
    """Every registered method class, by name."""
    return dict(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The registered class of method ``name``, or an error listing the valid names."""
    if name not in _REGISTRY:
        raise UnsupportedError(
            f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))} (or 'auto')"
        )
    return _REGISTRY[name]


def methods_answering(question: str) -> list[str]:
    """The registered methods that declare ``question``."""
    return sorted(n for n, cls in _REGISTRY.items() if question in cls.questions)


def scalable_methods() -> list[str]:
    """The registered methods that stay usable when P is large."""
    return sorted(n for n, cls in _REGISTRY.items() if cls.scales)


def methods_with_estimator(estimator: str) -> list[str]:
    """The registered methods that declare ``estimator``."""
    return sorted(n for n, cls in _REGISTRY.items() if estimator in cls.estimators)


def _warn_of_checks_beyond_the_limit(fitted: Fitted, energy: bool) -> None:
    """Warn, before they run, where the post-fit checks' own objects (their probe directions,
    answers and products in float64 and a batch product's working memory,
    :func:`~infkit.diagnostics.check_bytes`, as the plan prices them) exceed ``memory_limit``:
    a tester's DataInf fit of a 1M-parameter language model under 64 MiB rose by 583 MiB in
    its checks with no word at the fit (51 MiB with ``checks=False``)."""
    if not bounded(fitted.memory_limit):
        return
    held = diagnostics.check_bytes(
        fitted.space.size,
        math.prod(fitted.output_shape),
        fitted.pass_batch_size,
        fitted.space.dtype.itemsize,
        fitted.memory_limit,
        energy=energy,
    )
    if held <= fitted.memory_limit:
        return
    warn(
        f"the post-fit checks (docs/conventions.md §9) hold about {human_bytes(held)} (their "
        f"probe directions of {fitted.space.size:,} parameters, answers and curvature products "
        f"in float64), beyond memory_limit ({human_bytes(fitted.memory_limit)}): they run, "
        "past the limit. checks=False skips them (the answers do not depend on them; their "
        "warnings are then not given), as plan() says",
        UserWarning,
    )


def gradient_batch_rows(shape: RunShape) -> int:
    """B of a batch's per-example gradients [B, P] in the run of ``shape``
    (:func:`~infkit.gradients.gradient_rows`: the batch size, lowered under the memory limit,
    of :attr:`~infkit.plan.RunShape.pass_batch_size`)."""
    limit = shape.memory_limit or default_memory_limit()
    return gradient_rows(shape.pass_batch_size, shape.parameters, shape.itemsize, limit)


def objective_gradient_stage(shape: RunShape, note: str) -> Stage:
    """The pass that takes grad L(theta*) [P] by itself: the parameters' gradients and a
    float64 sum."""
    p = shape.parameters
    mean = p * FLOAT64_BYTES
    return Stage(
        "objective gradient",
        1,
        mean + 2 * p * shape.itemsize,
        ("grad L(theta*) [P], float64", mean),
        note,
    )


def autocast_gradient_stage(shape: RunShape) -> list[Stage]:
    """Under ``dtype=`` beside a gradient cache: grad L(theta*) by a pass of its own in the
    model's precision (the cache's sum carries autocast's rounding), none otherwise."""
    if not shape.autocast:
        return []
    return [
        objective_gradient_stage(
            shape, "in the model's own precision: the cache's gradients are under dtype="
        )
    ]


def batch_gradient_bytes(shape: RunShape) -> int:
    """A batch's per-example gradients (vmap over the model) with their working memory and
    float64 copies, as the plan counts them: B of :func:`gradient_batch_rows` rows of
    :func:`~infkit.gradients.gradient_row_bytes`."""
    return gradient_batch_rows(shape) * gradient_row_bytes(shape.parameters, shape.itemsize)


class Method(ABC):
    """A way of answering the facade's questions; see the module docstring.

    Args:
        options: an instance of the method's :attr:`Options`, or none and keyword arguments
            (validated by :meth:`Options.parse`).
    """

    #: registry name, e.g. ``"exact"``
    name: ClassVar[str]
    #: one line for ``infkit.methods()``
    summary: ClassVar[str]
    #: the method's options: a frozen dataclass of documented fields
    Options: ClassVar[type[BaseOptions]] = NoOptions
    #: the estimators the method supplies
    estimators: ClassVar[tuple[EstimatorName, ...]] = ("if",)
    #: the facade questions the method answers
    questions: ClassVar[frozenset[Question]] = BASIC
    #: whether the method stays usable when P is large (error messages, ``auto``)
    scales: ClassVar[bool] = False
    #: whether ``damping="auto"`` (a per-module heuristic) applies to this method
    supports_auto_damping: ClassVar[bool] = False
    #: whether ``fit`` should cache the [N, P] training gradients for this method
    uses_training_gradients: ClassVar[bool] = True
    #: whether ``fit`` may spend a pass over the data on the stationarity check when the training
    #: gradients are not cached (the Kronecker methods, damped and built for large models, skip
    #: it: describe() then reports stationarity None)
    stationarity_pass: ClassVar[bool] = True
    #: whether H contains each example's exact curvature block (RIF / Newton downdates exact)
    exact_example_curvature: ClassVar[bool] = False
    #: whether the method commits its scores to a workdir in shards (:mod:`infkit.shards`),
    #: with ``shard_part`` (one part of an array job) and ``shard_tally`` (counts)
    shards_scores: ClassVar[bool] = False
    #: whether the method's gradients come from passes under the task's autocast precision
    #: (``Influence(dtype=...)``); a method whose products all run by forward-mode
    #: differentiation in the model's own dtype (dual), which autocast does not reach, refuses it
    takes_autocast: ClassVar[bool] = True
    shard_part: tuple[int, int] | None = None
    shard_tally: dict[str, int]
    #: where the queries of a scores() call taken in chunks sit in the call, set by the facade
    #: around each chunk (None: the call's queries whole), for what it commits
    query_rows: QueryRows | None = None
    #: the passes of solves per training example of one scores() call taken in chunks (a pass
    #: a chunk), set by the facade around the call, for the pace it tells
    #: (:class:`~infkit.estimators.SolvePace`)
    solve_call: SolveCall | None = None
    #: what the contract test checks and a user may expect
    fidelity: ClassVar[Fidelity] = Fidelity()
    #: priority for ``method="auto"`` (lower first; None: never chosen automatically)
    auto_priority: ClassVar[int | None] = None
    #: what :meth:`infkit.Influence.plan` suggests when the plan exceeds ``memory_limit``
    plan_remedy: ClassVar[str] = (
        "attribute fewer parameters (freeze some: requires_grad=False), score fewer queries "
        "per call, or use a method that scales (ekfac, trak)"
    )
    #: whether scoring many queries at once costs little more than one (an iterative solve,
    #: each step a pass over the training data shared by all right-hand sides, or scores formed
    #: in a pass over the training data): the facade then scores queries in chunks up to a
    #: quarter of ``memory_limit`` instead of a tenth of the result, so that a 10M-parameter
    #: model does not pass over its data once per query
    solves_together: ClassVar[bool] = False
    #: whether :meth:`diagnose` measures the answers' scale against the GGN (approximations)
    checks_scale: ClassVar[bool] = False
    #: :meth:`diagnose` warns when the answers come out this many times too large (None: never)
    scale_warning: ClassVar[float | None] = None
    #: the attributes :meth:`fit` sets that the answers need: what the default :meth:`state`
    #: saves and :meth:`restore` sets back (``inf.save`` / ``Influence.load``). ``()``: fit keeps
    #: nothing beyond the record; None (the default): not declared, and the method cannot be
    #: saved
    fitted_state: ClassVar[tuple[str, ...] | None] = None

    def __init__(self, options: BaseOptions | None = None, /, **values: Any) -> None:
        owner = f"method {self.name!r}"
        if options is None:
            options = self.Options.parse(values, owner)
        elif values or not isinstance(options, self.Options):
            raise InvalidInputError(
                f"{owner}: pass either an {self.Options.__name__} instance or keyword options"
            )
        self.options = options
        self._fitted: Fitted | None = None
        #: figures of :meth:`diagnose`, reported by :meth:`describe`
        self.checks: dict[str, Any] = {}
        #: figures of :meth:`check_queries` for the last ``scores()`` call (not saved)
        self.query_checks: dict[str, float] = {}
        #: the queries' energy ratios of this fit by their direction's digest
        self._query_ratios: dict[str, float] = {}
        #: ``dtype=``'s rounding figures of this fit by their queries' hash (infkit.rounding)
        self.roundings: dict[str, float | None] = {}
        #: whether the queries' check failed on this fit's model (torch.func cannot take it)
        self._queries_unchecked = False

    # ------------------------------------------------------------------ declarations
    #: which curvature the method's answers represent (``"ggn"``, ``"hessian"``, ...)
    curvature: str = "ggn"

    @property
    def assumes_optimum(self) -> bool:
        """Whether the answers assume theta is a trained optimum (the facade then checks)."""
        return True

    def answers(self, question: str) -> bool:
        """Whether this (configured) method answers ``question``."""
        return question in type(self).questions

    def supplies(self, estimator: str) -> bool:
        """Whether this (configured) method supplies ``estimator``.

        RIF needs leverages, which a positive semidefinite curvature defines: not the Hessian.
        """
        if estimator == "rif" and self.curvature == "hessian":
            return False
        return estimator in type(self).estimators

    def require_estimator(self, estimator: str) -> None:
        """Raise UnsupportedError for an estimator this method cannot compute, naming those that can."""
        if self.supplies(estimator):
            return
        if estimator in type(self).estimators:  # declared, but not with this configuration
            raise UnsupportedError(
                f"estimator {estimator!r} needs a positive semidefinite curvature to define "
                "leverages; the true Hessian can give leverages below 0 or above 1. Use "
                "curvature='ggn' with rif, or estimator='newton' with the Hessian"
            )
        pairs = [f"{name}+{estimator}" for name in methods_with_estimator(estimator)]
        raise UnsupportedError(
            f"method {self.name!r} cannot compute estimator {estimator!r}; it supports "
            f"{', '.join(type(self).estimators)}. Methods that support {estimator!r}: "
            f"{', '.join(pairs) or 'none'}"
        )

    def scores_in_shards(self, estimator: Estimator) -> bool:
        """Whether this fitted method's scores for ``estimator`` are computed (and committed
        to a workdir) shard by shard (:attr:`shards_scores`, and the path it takes)."""
        return type(self).shards_scores

    def require(self, question: str) -> None:
        """Raise UnsupportedError naming the methods that answer ``question``, if this one can't."""
        if not self.answers(question):
            # (this method may answer it with other options: its _why_not says which)
            others = [m for m in methods_answering(question) if m != self.name]
            able = ", ".join(map(repr, others)) or "none"
            raise UnsupportedError(
                f"method {self.name!r} does not give {QUESTION_TEXT.get(question, question)}"
                f"{self._why_not(question)}; methods that do: {able}"
            )

    def _why_not(self, question: str) -> str:
        """Extra words for :meth:`require`'s message (e.g. which option disables it)."""
        primal = hasattr(self, "solve")  # (a method of no inverse curvature has no leverages)
        if question == "leverages" and primal and "rif" not in type(self).estimators:
            return (
                " (its curvature does not contain each example's own block, so "
                "tr(Lambda_j J_j H^-1 J_j^T)/N is no leverage of it: DataInf's read 2.96 on a "
                "logistic regression whose leverages are below 0.46)"
            )
        return ""

    def stages(self, shape: RunShape, task: Task, space: ParameterSpace) -> list[Stage]:
        """The run's stages for :meth:`infkit.Influence.plan` (a generic outline by default:
        the gradient cache, the method's dense objects, the queries and the scores)."""
        n, p = shape.n_train, shape.parameters
        out = []
        if shape.gradient_cache:
            cache = gradient_cache_bytes(n, p, space.dtype)
            out.append(
                Stage(
                    "training gradients",
                    1,
                    cache + batch_gradient_bytes(shape),
                    ("[N, P] gradients", cache),
                    "held to the end of the run",
                    held=cache,
                )
            )
            if self.assumes_optimum:
                out += autocast_gradient_stage(shape)
        elif self.assumes_optimum and type(self).stationarity_pass:
            # grad L(theta*) by its own pass: the parameters' gradients, a float64 sum, and one
            # example's gradient at a time for the typical size
            out.append(
                objective_gradient_stage(
                    shape,
                    "the stationarity check ("
                    + (
                        "no [N, P] gradient cache: it does not fit)"
                        if type(self).uses_training_gradients
                        else "this method keeps no [N, P] gradient cache)"
                    ),
                )
            )
        label, dense, held = self.fit_objects(shape)
        passes = self.fit_passes()
        if passes or dense:
            out.append(Stage(f"fit {self.name}", passes, dense, (label, dense), held=held))
        out += self.generic_query_stages(shape)
        return out

    def fit_objects(self, shape: RunShape) -> tuple[str, int, int]:
        """What :meth:`fit` forms beyond a batch, as the plan's generic outline counts it: its
        name, its bytes at the fit's peak and those it keeps for the later stages (default:
        :meth:`memory_estimate`'s dense curvature or kernel, kept; or nothing but products
        over batches)."""
        dense = self.memory_estimate(shape.n_train, shape.parameters, shape.outputs)
        if not dense:
            return "nothing held beyond a batch", 0, 0
        return "dense curvature or kernel", dense, dense

    def fit_passes(self) -> float:
        """Passes over the training data :meth:`fit` makes beyond the stationarity pass and
        the gradient cache (the plan's generic outline; default 1)."""
        return 1.0

    def committed_fit(self, engine: PerExample, train: ExampleSet, batch_size: int) -> str | None:
        """What :meth:`fit` on ``train`` would read back from a store instead of computing, for
        :meth:`infkit.Influence.plan` (:attr:`RunShape.committed`; None by default: nothing)."""
        return None

    def plan_advice(self, stages: list[Stage]) -> str:
        """What :meth:`infkit.Influence.plan` suggests when the plan of ``stages`` exceeds
        ``memory_limit`` (default: :attr:`plan_remedy`)."""
        return self.plan_remedy

    def solve_flops(self, task: Task, space: ParameterSpace) -> float:
        """Floating-point operations of one solve ``(H + ridge)^{-1} v`` [P] in float64, for
        the plan's time of the solves on the generic path (the queries' and the checks'); 0
        where it is not counted."""
        return 0.0

    def solve_passes_at_most(self, shape: RunShape, chunks: list[int]) -> float:
        """Passes' worth of curvature products the queries' iterative solves may take, at most,
        for chunks of ``chunks`` queries each solved together, :data:`PRODUCT_PASSES` per vector
        and product (0: a direct solve, priced by :meth:`solve_flops`)."""
        return 0.0

    def solve_note(self, shape: RunShape) -> str:
        """What the plan's queries stage says of the solve's iterations ("" for none)."""
        return ""

    def generic_query_stages(self, shape: RunShape, solve: float = 0.0) -> list[Stage]:
        """The queries and scores of :func:`infkit.estimators.scores` as the facade runs them:
        the queries in chunks (:meth:`query_row_bytes`, :func:`~infkit.memory.row_chunks`),
        each chunk's query gradients and solves in float64 (``solve`` operations a query,
        :meth:`solve_flops`), the scores in one product with the gradient cache (else one pass
        over the training data)."""
        n, q, p = shape.n_train, shape.n_queries, shape.parameters
        limit = shape.memory_limit or default_memory_limit()
        row = self.query_row_bytes(n, p)
        chunks = row_chunks(q, row, q * n * FLOAT64_BYTES, limit, together=self.solves_together)
        # the solves' products run whole on every process (docs/distributed.md §1)
        at_most = shape.whole_passes * self.solve_passes_at_most(
            shape, [stop - start for start, stop in chunks]
        )
        rows = max(stop - start for start, stop in chunks)
        chunk = rows * row
        note = f"{len(chunks)} chunks of {rows} queries" if len(chunks) > 1 else ""
        scores = q * n * FLOAT64_BYTES
        return [
            Stage(
                "queries",
                0,
                chunk + batch_gradient_bytes(shape),
                ("a chunk's query gradients and solves, float64", chunk),
                "; ".join(x for x in (note, self.solve_note(shape)) if x),
                float64_flops=q * solve,
                at_most_passes=at_most,
            ),
            Stage(
                "scores",
                0 if shape.gradient_cache else len(chunks),
                scores + chunk,
                ("[Q, N] scores, float64", scores),
                "one product with the gradient cache" if shape.gradient_cache else "",
                flops=2.0 * q * n * p,
            ),
        ]

    def query_row_bytes(self, n: int, p: int, estimator: Estimator | None = None) -> int:
        """Bytes ``scores`` needs per query with ``estimator`` (the facade chunks the queries
        by it; None: the generic path of :func:`infkit.estimators.scores`): the query
        gradient, its solve and the score row, in float64."""
        return 3 * (n + p) * 8

    @classmethod
    def memory_estimate(cls, n: int, p: int, c: int) -> int:
        """Bytes the method's dense objects need (0 when it forms none)."""
        return 0

    def check_memory(self, problem: Problem) -> None:
        """Refuse ``problem`` before any pass over the data when the method's dense objects
        (:meth:`memory_estimate`) exceed ``memory_limit``, with :meth:`memory_message`."""
        need = self.memory_estimate(problem.n, problem.p, problem.c)
        if need > problem.memory_limit:
            raise ProblemTooLargeError(self.memory_message(problem, need))

    @classmethod
    def memory_message(cls, problem: Problem, need: int) -> str:
        """What :meth:`check_memory` says when ``need`` bytes exceed the limit."""
        others = ", ".join(repr(m) for m in scalable_methods() if m != cls.name)
        return (
            f"method {cls.name!r} needs {human_bytes(need)} for its dense objects here (N = "
            f"{problem.n:,}, P = {problem.p:,}, C = {problem.c}), above the memory limit of "
            f"{human_bytes(problem.memory_limit)}. Use a method that scales: {others}; or "
            "raise memory_limit"
        )

    @classmethod
    def suits(cls, problem: Problem) -> bool:
        """Whether ``method="auto"`` may pick this method for ``problem``."""
        return True

    @classmethod
    def suitability(cls, problem: Problem) -> str:
        """Why :meth:`suits` says what it says for ``problem``, in a few words (``auto``'s log)."""
        return "suits any problem" if cls.suits(problem) else "does not suit this problem"

    def check(self, task: Task, space: ParameterSpace) -> None:
        """Check the options against the model before any pass over the data (at construction).

        Subclasses raise an InfkitError naming the option for what the model makes invalid
        (a missing module, a checkpoint of the wrong shape, ...). The base has nothing to check.
        """
        return None

    # ------------------------------------------------------------------ fit
    @property
    def fitted(self) -> Fitted:
        """The record the method was fitted on."""
        if self._fitted is None:
            raise NotFittedError(f"method {self.name!r} is not fitted: call fit(fitted) first")
        return self._fitted

    @abstractmethod
    def fit(self, fitted: Fitted) -> None:
        """Build whatever the method needs from the training data (subclasses call super)."""
        self._fitted = fitted

    # ------------------------------------------------------------------ saved state
    def state(self) -> dict[str, Any]:
        """The fitted state: everything :meth:`fit` computed that the answers need, by name.

        Values are tensors, JSON values (None, booleans, numbers, strings) and lists, tuples
        and dicts of them; ``inf.save`` writes the tensors as safetensors and the rest as JSON
        (docs/architecture.md §7). The default returns the attributes named by
        :attr:`fitted_state`; a method holding structured objects (an operator, a projector, a
        Kronecker curvature) overrides this and :meth:`restore`, and gives their tensors.

        Raises:
            UnsupportedError: the method does not declare its fitted state.
            NotFittedError: the method is not fitted.
        """
        names = type(self).fitted_state
        if names is None:
            raise UnsupportedError(
                f"method {self.name!r} does not declare its fitted state, so it cannot be saved: "
                "its class should name the attributes fit sets (fitted_state = ('...',)) or "
                "override state() and restore() (CONTRIBUTING.md)"
            )
        self.fitted  # noqa: B018 - raises NotFittedError before fit
        unset = [name for name in names if not hasattr(self, name)]
        if unset:
            raise UnsupportedError(
                f"method {self.name!r} names {', '.join(map(repr, unset))} in its fitted_state, "
                f"but its fit set no such attribute: fitted_state must name the attributes fit "
                f"sets (it names {list(names)})"
            )
        return {name: getattr(self, name) for name in names}

    def restore(self, fitted: Fitted, state: Mapping[str, Any]) -> None:
        """Take up a fitted state from :meth:`state` instead of fitting: no pass over the data.

        The default keeps the record and sets the attributes named by :attr:`fitted_state`;
        methods that override :meth:`state` rebuild their objects here (and call this).

        Args:
            fitted: the record rebuilt from the saved one (the same training set, theta*,
                objective and cached gradients as at fit).
            state: what :meth:`state` returned, read back (tensors on the device they were on:
                the CPU, or the model's).
        """
        self._fitted = fitted
        for name in type(self).fitted_state or ():
            setattr(self, name, state[name])

    def diagnose(self) -> None:
        """Check the fitted answer where it can be off without failing (docs/conventions.md §9).

        Run by the facade after :meth:`fit`; the figures go to :attr:`checks` (and
        ``describe()``), and a warning says what to do when an answer is unreliable:

        * ``curvature_scale`` (with ``damping > 0``): the GGN's Rayleigh quotient along gradient
          directions; a damping :data:`DAMPING_WARNING` times larger than it plus l2 makes every
          score vanish next to its undamped size;
        * ``energy_ratio`` (methods with :attr:`checks_scale`): how many times too large the
          answers are along gradient directions (1 for an exact solve);
        * ``drift`` (methods that assume an optimum with a curvature of the model, theta* not
          stationary): how much the step to the optimum would change the training residuals,
          hence the scores.
        """
        checks: dict[str, Any] = {}
        try:
            self._run_checks(checks)
        except UnsupportedError as error:  # a model no torch.func transform takes
            what = untaken(error.__cause__)
            if what is None:
                raise
            warn(
                f"the post-fit checks (docs/conventions.md §9) were not run: their curvature "
                f"products need torch.func's transforms, which cannot take {what}. The answers "
                "of identity, trak, datainf, kfac, ekfac and exact do not depend on them (exact "
                "with curvature='hessian' where the model has a custom function); the methods "
                "whose answers need the transforms refuse at their first question",
                UserWarning,
            )
        self.checks = checks

    def clear_checks(self) -> None:
        """Forget the figures of a previous fit (the facade calls it before every fit, with or
        without checks): the post-fit checks', the queries' and their measured directions."""
        self.checks, self.query_checks, self._query_ratios, self.roundings = {}, {}, {}, {}
        self._queries_unchecked = False

    def _run_checks(self, checks: dict[str, Any]) -> None:
        """The checks of :meth:`diagnose`, their figures recorded in ``checks``."""
        fitted = self.fitted
        scale_check, energy_check = self.runs_checks(
            fitted.damping, fitted.n, fitted.train_gradients is not None
        )
        stationarity = fitted.stationarity or 0.0
        # the step to the optimum is a Newton step only with a curvature of the model's (with
        # H = I it would be one gradient step, of no particular length)
        drift_check = (
            self.assumes_optimum
            and self.curvature in DAMPED_CURVATURES
            and stationarity > STATIONARITY_TOLERANCE
        )
        steps = int(scale_check) + int(energy_check > 0) + int(drift_check)
        if scale_check or energy_check:
            _warn_of_checks_beyond_the_limit(fitted, bool(energy_check))
        with Progress(fitted.progress if steps else "off", steps, "checks") as shown:
            if scale_check:
                scale = diagnostics.curvature_scale(fitted)
                checks["curvature_scale"] = scale
                shown.update(note="curvature scale")
                if scale + fitted.l2 <= 0:
                    warn(
                        "the curvature along output directions is 0 at every probe (and l2 = 0): "
                        "the scored outputs of the probed examples do not depend on the attributed "
                        "parameters, whose gradients, and the scores they give, are then 0 too. "
                        "Check that the labels score some positions (not all -100) and that the "
                        "attributed layers have gradients (a fresh LoRA adapter, B = 0, gives its "
                        "A matrices none: attribute through B, or after training)",
                        UserWarning,
                    )
                    energy_check = 0  # nothing to measure: 0 / 0
                elif fitted.damping > DAMPING_WARNING * (scale + fitted.l2):
                    warn(
                        f"damping={fitted.damping:g} is {fitted.damping / (scale + fitted.l2):.1e} "
                        f"times the curvature (about {scale:.3g} along gradient directions, plus "
                        f"l2={fitted.l2:g}): every score is that many times smaller than without "
                        "it, and their order is the plain gradient similarity's. Pass a damping "
                        "of the order of the curvature or smaller (describe()['curvature_scale'])",
                        UserWarning,
                    )
            if energy_check:
                ratio = diagnostics.energy_ratio(fitted, self.inverse(), sample=energy_check)
                checks["energy_ratio"] = ratio
                shown.update(note="energy ratio")
                limit = type(self).scale_warning
                if not math.isfinite(ratio) or ratio <= 0:
                    warn(energy_failure_message(ratio, fitted.engine.dtype), UserWarning)
                elif limit is not None and ratio > limit:
                    warn(self.scale_message(ratio), UserWarning)
            if drift_check:
                try:
                    drift = diagnostics.drift(fitted, self.drift_solve())
                except CurvatureError:  # no ridge and a singular sample curvature: no step
                    drift = None
                shown.update(note="drift")
                if drift is not None:
                    checks["drift"] = drift.record()
                    # a step at the parameters' rounding is no step, whatever the ratio of
                    # the residuals' roundings (an interpolant's: 7e-16 of theta, "100%")
                    eps = torch.finfo(fitted.engine.dtype).eps
                    # (not in bfloat16 or float16, where a few epsilons are a real step: 2.4%)
                    rounding = STEP_ROUNDINGS * eps if eps < 1e-6 else 0.0
                    if drift.residual_shift > DRIFT_WARNING and drift.relative_step > rounding:
                        warn(drift_message(fitted, drift), UserWarning)

    def check_queries(self, queries: ExampleSet, always: bool = False) -> None:
        """The energy ratio along the queries' own gradients (docs/conventions.md §9).

        The post-fit ratio probes directions in the range of the training examples' gradients;
        a query can lie along others, which the approximation gets wrong (a tester's
        prompt-masked language-model queries: EK-FAC's scores 13x the exact method's, the
        ratio 0.67 along the probes and 11.9 along the queries). Where
        :meth:`query_check_sample` says so (``always``: ``Influence(checks="queries")``), it is
        measured along one direction (:meth:`_query_direction`), on the mean GGN of all the
        training examples up to :data:`~infkit.diagnostics.CURVATURE_SAMPLE` (a rare direction
        needs the few examples that carry it; in a larger set a sample estimates it, noisily
        where few carry it). It is recorded as ``describe()["query_energy_ratio"]`` (the last
        call's on this fit: not saved) and warned beyond :data:`QUERY_SCALE_WARNING`, or the
        method's own :attr:`scale_warning` where that is larger (too large; a ratio below 1 is
        also what a sample missing those examples reads), or where it is not a positive number
        (the inverse is not positive along the queries). A direction measured once is not
        measured again until the next fit: the same queries cost their gradients only. A model
        that torch.func's transforms cannot take is not checked (one warning a fit).
        """
        self.query_checks = {}
        fitted = self.fitted
        cached = fitted.train_gradients is not None
        sample = self.query_check_sample(fitted.damping, fitted.n, cached, always)
        if not sample or not (always or "energy_ratio" in self.checks):
            return
        if self._queries_unchecked:  # a model no transform takes: said once a fit
            return
        direction = self._query_direction(queries)
        if direction is None:  # every query is still: the scores warn
            return
        key = tensor_digest(direction)
        if key not in self._query_ratios:
            try:
                self._query_ratios[key] = diagnostics.energy_ratio(
                    fitted, self.inverse(), directions=direction[None], sample=sample
                )
            except UnsupportedError as error:
                what = untaken(error.__cause__)
                if what is None:
                    raise
                self._queries_unchecked = True
                warn(
                    "the queries' energy ratio (docs/conventions.md §9) is not measured: its "
                    f"curvature products need torch.func's transforms, which cannot take "
                    f"{what}; the scores do not depend on it",
                    UserWarning,
                )
                return
        ratio = self._query_ratios[key]
        self.query_checks = {"query_energy_ratio": ratio}
        limit = max(QUERY_SCALE_WARNING, type(self).scale_warning or 0.0)
        if not math.isfinite(ratio) or ratio <= 0:
            warn(
                f"method {self.name!r}: along the gradients of {_queries_named(queries)} the "
                "energy ratio is "
                f"{ratio:.3g} (1 for an exact solve), so its inverse curvature is not positive "
                "there (or its products overflowed) and these scores are not reliable: add "
                "damping (damping='auto' for the Kronecker methods, or e.g. damping=1e-3) or l2, "
                "or use a method that solves (cg, exact)",
                UserWarning,
            )
        elif ratio > limit:
            probes = self.checks.get("energy_ratio")
            beside = (
                f"; {probes:.2g} along the training examples' gradients"
                if probes is not None
                else ""
            )
            warn(
                f"method {self.name!r} gives the scores of {_queries_named(queries)} about "
                f"{ratio:.1f}x too large "
                "along their own gradient directions (energy ratio u^T (H + ridge) u / u^T v on "
                f"a curvature sample, 1 for an exact solve{beside}; the order of magnitude: the "
                "scores' own excess can be a few times smaller): the queries lie where the "
                "approximation is poor. Rank with them if you must; for removal effects use a "
                "method that solves (cg, exact), or check them against retraining "
                "(infkit.retrain)",
                UserWarning,
            )

    def _query_direction(self, queries: ExampleSet) -> Tensor | None:
        """``v = sum_k s_k g_k / ||g_k||`` [P] float64 over the first
        :data:`~infkit.diagnostics.QUERY_DIRECTIONS` queries whose measurement's gradient g_k is
        not 0 (None where none is), a batch of gradients at a time. Each query counts alike,
        whatever its gradient's size; the signs ``s_k = sign(v_{<k}^T g_k)`` (+1 at 0) add each
        to the ones before without cancelling them (the ratio along a direction does not depend
        on its sign; two queries with opposite gradients would sum to 0), so ``||v||^2 >= k``."""
        fitted = self.fitted
        first = queries.part(torch.arange(min(len(queries), diagnostics.QUERY_DIRECTIONS)))
        direction = torch.zeros(fitted.space.size, dtype=torch.float64, device=fitted.space.device)
        moved = False
        for batch in first.batches(fitted.gradient_batch_size):
            for g in fitted.engine.grads(batch, "measurement").to(torch.float64):
                size = g.norm()
                if not bool(size > 0):
                    continue
                sign = -1.0 if float(direction @ g) < 0 else 1.0
                direction.add_(g, alpha=sign / float(size))
                moved = True
        return direction if moved else None

    def query_check_sample(self, damping: float, n: int, cached: bool, always: bool = False) -> int:
        """The curvature sample of :meth:`check_queries` for a fit like those of
        :meth:`runs_checks` (0: it does not run): all N up to
        :data:`~infkit.diagnostics.CURVATURE_SAMPLE` where the post-fit energy ratio runs (or
        ``always``) and the method solves in parameter space, else 0. One curvature product of
        a single example each, a ``scores()`` call (:meth:`infkit.Influence.plan` counts
        them)."""
        if not type(self).checks_scale or type(self).inverse is Method.inverse:
            return 0
        _, post_fit = self.runs_checks(damping, n, cached)
        return min(n, diagnostics.CURVATURE_SAMPLE) if post_fit or always else 0

    def runs_checks(self, damping: float, n: int, cached: bool) -> tuple[bool, int]:
        """Which costly checks :meth:`diagnose` runs for a fit on ``n`` examples with this
        ``damping`` and with (``cached``) or without the training-gradient cache: whether
        ``curvature_scale`` runs, and the curvature sample of ``energy_ratio`` (0: not run).

        The energy ratio costs 16 curvature products per sampled example. Where a warning
        hangs on it (:attr:`scale_warning`) it takes the full sample; where it only reports,
        it runs on problems small enough for the cache, on a sample of about one pass's cost
        (:func:`~infkit.diagnostics.report_sample`)."""
        scale = self.curvature in DAMPED_CURVATURES and damping > 0
        energy = 0
        if type(self).checks_scale:
            if type(self).scale_warning is not None:
                energy = diagnostics.CURVATURE_SAMPLE
            elif cached:
                energy = diagnostics.report_sample(n)
        return scale, energy

    def inverse(self) -> Callable[[Tensor], Tensor]:
        """An (approximate) ``(H + ridge)^{-1}`` on [k, P] blocks for :meth:`diagnose`; methods
        that do not solve in parameter space get CG on the GGN of a sample."""
        return diagnostics.sample_solve(self.fitted)

    def drift_solve(self) -> Callable[[Tensor], Tensor]:
        """``(H + ridge)^{-1}`` for the drift check's one vector, ``grad L(theta*)``: the method's
        own inverse (:meth:`inverse`; a primal method's solve itself, whatever it costs, for one
        vector). A sample's curvature misses the directions outside its span, and its inverse
        stretches the gradient's share there by 1/ridge (a tester's cg step 19x too long, and a
        false warning of 7348%)."""
        return self.inverse()

    def scale_message(self, ratio: float) -> str:
        """The warning of :meth:`diagnose` when the answers are ``ratio`` times too large."""
        return (
            f"method {self.name!r} gives answers about {ratio:.0f}x too large here along gradient "
            "directions (energy ratio u^T (H + ridge) u / u^T v on a sample, 1 for an exact "
            "solve): use a method that solves (cg, ekfac, exact) for removal effects"
        )

    def attributed_parameters(self, task: Task, space: ParameterSpace) -> list[str] | None:
        """The trainable parameters the method attributes through, before ``fit`` (None: all).

        The facade restricts theta to them; the others are held fixed, as if frozen.
        """
        return None

    def regulariser_anchor(self, task: Task, space: ParameterSpace) -> Tensor | None:
        """theta' [P] of the objective ``(l2/2)||theta - theta'||^2`` (None: 0), before ``fit``."""
        return None

    # ------------------------------------------------------------------ answers
    @abstractmethod
    def scores(self, queries: ExampleSet, estimator: Estimator) -> Tensor:
        """Removal effects on the query measurements, [T, N] float64."""

    def scores_among(self, queries: ExampleSet, estimator: Estimator, among: Tensor) -> Tensor:
        """Removal effects of the training examples ``among`` only, [T, len(among)] float64.

        By default the columns of :meth:`scores`; methods that pass over the training data
        (the streamed Kronecker scores) pass over ``among`` alone.
        """
        return self.scores(queries, estimator)[:, among.to(self.fitted.space.device)]

    @abstractmethod
    def self_scores(self, estimator: Estimator) -> Tensor:
        """Removal effect of each training example on its own loss, [N] float64."""

    @abstractmethod
    def removal(self, indices: Tensor, estimator: Estimator) -> Tensor:
        """Parameter change [P] float64 for removing the training examples ``indices`` jointly."""

    def removal_change(
        self, data: ExampleSet, indices: Tensor, estimator: Estimator, which: str
    ) -> Tensor | None:
        """The change of ``which`` (``"outputs"``, ``"loss"``, ``"measurement"``) on ``data`` when
        ``indices`` are removed, if the method computes it its own way; None otherwise (the
        facade then uses ``J(theta*) Delta theta``)."""
        return None

    def leverages(self) -> Tensor:
        """Generalised leverages ``h_j = tr(Lambda_j J_j H^{-1} J_j^T) / N``, [N] float64."""
        self.require("leverages")
        raise NotImplementedError  # pragma: no cover - a method declaring it overrides this

    def precondition_queries(self, V: Tensor) -> Tensor:
        """``H^{-1} V`` for V [k, P] (float64): the preconditioned queries of the decompositions."""
        self.require("module_scores")
        raise NotImplementedError  # pragma: no cover - a method declaring it overrides this

    def as_scored(self, U: Tensor) -> Tensor:
        """Preconditioned queries U [k, P] as :meth:`scores` uses them (the decompositions split
        these, so that their parts add up to the scores): U itself unless the method
        approximates its queries (K-FAC's ``query_rank``)."""
        return U

    def streamed_module_scores(
        self, queries: ExampleSet, estimator: Estimator
    ) -> dict[str, Tensor] | None:
        """The per-module IF scores (module name -> [T, N] float64) from the method's own
        passes over the training data, or None where the decompositions form them from
        :meth:`precondition_queries` (:func:`infkit.decompositions.per_module_scores`)."""
        return None

    def streamed_token_scores(
        self, queries: ExampleSet, estimator: Estimator, indices: Tensor, positions: int | None
    ) -> tuple[Tensor, Tensor, set[str]] | None:
        """The per-token IF scores of the training examples ``indices``, ``(tokens [T, n, S],
        rest [T, n], layers decomposed by position)`` float64, from the method's own passes
        over the training data, or None where the decompositions form them from
        :meth:`precondition_queries` (:func:`infkit.decompositions.per_token_scores`)."""
        return None

    # ------------------------------------------------------------------ structure
    def tracked_layers(self) -> TrackedLayers:
        """The layers the method attributes through (default: every supported layer)."""
        fitted = self.fitted
        return TrackedLayers.of(fitted.task.model, fitted.space)

    def kronecker(self) -> KroneckerCurvature:
        """The fitted Kronecker-factored curvature (question ``"kronecker"``), for the analyses
        that work in its eigenbasis."""
        self.require("kronecker")
        raise NotImplementedError  # pragma: no cover - a method declaring it overrides this

    def describe(self) -> dict[str, Any]:
        """Settings and diagnostics worth recording next to results."""
        return {
            "method": self.name,
            "curvature": self.curvature,
            "options": self.options.record(),
            **self.checks,
            **self.query_checks,
        }


def energy_failure_message(ratio: float, dtype: torch.dtype) -> str:
    """The warning of :meth:`Method.diagnose` when the energy ratio is not a positive number:
    the method's inverse is not positive along gradient directions (or the check overflowed)."""
    if math.isfinite(ratio):
        return (
            f"the answers are not reliable: along gradient directions the method's inverse "
            f"curvature is not positive (energy ratio {ratio:.3g}, 1 for an exact solve), so "
            "the curvature it solves with is singular or indefinite in this precision. Add "
            "damping (damping='auto' for the Kronecker methods, or e.g. damping=1e-3) or l2"
        )
    name = dtype_name(dtype)
    return (
        f"the fit-time check of the answers' scale gave {ratio} (energy ratio): the curvature "
        f"products overflowed or lost all precision in {name}, so nothing checks the answers. "
        "Fit in float32 or bfloat16 (a float16 model overflows easily), or add damping"
    )


def drift_message(fitted: Fitted, drift: diagnostics.Drift) -> str:
    """The warning of :meth:`Method.diagnose` when theta* is too far from its optimum."""
    if drift.kinked:
        return (
            "the loss has no curvature in the model's outputs on any training example checked "
            "(Lambda_i = 0: a loss piecewise linear in the outputs, as a hinge or an absolute "
            f"error), and ||grad L|| is {fitted.stationarity:.2g} of the typical per-example "
            "gradient (not 0 at a kink, even at the optimum): the step to the optimum the "
            f"curvature gives ({drift.relative_step:.2g} of ||theta*||) changes the training "
            f"residuals dl/df by {drift.residual_shift:.0%}, across the loss's kinks, which the "
            "influence function, a first-order expansion, does not see (a tester's SVM at its "
            "optimum: scores 10x the leave-one-out changes, r = 0.47). Check that the model is "
            "at its optimum (trained to it, with the l2 it was trained with passed), and for "
            "attribution train with a smooth loss (squared hinge, logistic, Huber), or compare "
            "with retraining (infkit.retrain.leave_one_out)"
        )
    return (
        f"the model is not at a stationary point of mean_i l_i + (l2/2)||theta||^2 with "
        f"l2={fitted.l2:g} "
        f"(||grad L|| is {fitted.stationarity:.2g} of the typical per-example gradient), and it "
        f"matters here: the step to the optimum (with this curvature and damping) would change "
        f"the training residuals dl/df, on which every score depends, by "
        f"{drift.residual_shift:.0%}, the scores by about twice that. What helps: a larger "
        "damping (it keeps the answer local to theta*: the proximal reading of the influence "
        "function, docs/conventions.md §9), training closer to the optimum "
        "(infkit.train_to_optimum, more epochs or a decaying learning rate), passing the l2 the "
        "model was trained with (mean-form weight decay), and for removal predictions "
        "estimator='newton', which takes the step into account"
    )


class PrimalMethod(Method):
    """A parameter-space method: it applies the inverse damped curvature, the estimators do the rest.

    Subclasses implement :meth:`solve` (and :meth:`solve_retained` when they can form the
    retained curvature of the Newton step more directly than by the Woodbury downdate).
    """

    estimators: ClassVar[tuple[EstimatorName, ...]] = ("if", "rif", "newton", "relatif")
    questions: ClassVar[frozenset[Question]] = PRIMAL

    def fit(self, fitted: Fitted) -> None:
        """Keep the record; a method that builds something from the training data (a
        curvature, factors) overrides this and calls ``super().fit(fitted)`` first."""
        super().fit(fitted)

    @abstractmethod
    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        """``(H + (l2 + damping + shift) I)^{-1} V`` for V of shape [k, P], in float64.

        ``H = (1/N) sum_i C_i`` is the method's mean-form data curvature; ``shift`` lets
        estimators remove a share of the regulariser (the Newton step uses
        ``shift = -(N_F/N) l2``).
        """

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor | None:
        """``H_R^{-1} V`` with ``H_R = (1/N) sum_{i not in F} C_i + ((N_R/N) l2 + damping) I``.

        None (the default) lets the estimators downdate F's curvature from ``solve`` (Woodbury).
        """
        return None

    def scores(self, queries: ExampleSet, estimator: Estimator) -> Tensor:
        return estimators.scores(self, self.fitted, queries, estimator)

    def self_scores(self, estimator: Estimator) -> Tensor:
        return estimators.self_scores(self, self.fitted, estimator)

    def relatif_and_self_scores(
        self, queries: ExampleSet, norm: RelatifNorm
    ) -> tuple[Tensor, Tensor]:
        """RelatIF scores [T, N] and IF self-scores [N] from one solve per training example
        (:func:`infkit.estimators.relatif_and_self_scores`)."""
        return estimators.relatif_and_self_scores(self, self.fitted, queries, norm)

    def removal(self, indices: Tensor, estimator: Estimator) -> Tensor:
        return estimators.group_delta(self, self.fitted, estimator, indices)

    def leverages(self) -> Tensor:
        return estimators.leverages(self, self.fitted)

    def precondition_queries(self, V: Tensor) -> Tensor:
        return self.solve(V)

    #: whether :meth:`solve` is cheap enough for the fit-time checks (iterative solvers are not:
    #: the checks then use CG on the GGN of a sample, to a loose tolerance)
    cheap_solve: ClassVar[bool] = True

    def inverse(self) -> Callable[[Tensor], Tensor]:
        return self.solve if type(self).cheap_solve else super().inverse()

    def drift_solve(self) -> Callable[[Tensor], Tensor]:
        return self.solve


def _queries_named(queries: ExampleSet) -> str:
    """``"test set queries 0, 1, 2, 3 and 4 more"``, ``"behaviour queries 0, 1"``: a set of
    queries by its name and the numbers of its first queries, as a warning names them."""
    numbers = listed([str(queries.number(i)) for i in range(len(queries))], 4)
    if queries.name.endswith(("queries", "query")):
        return f"{queries.name} {numbers}"
    return f"{queries.name} {'query' if len(queries) == 1 else 'queries'} {numbers}"
