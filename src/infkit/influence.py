"""The facade: ``Influence(task, method, estimator, l2, damping).fit(train)`` and its questions.

The facade validates its inputs, builds the :class:`~infkit.fitted.Fitted` record in ``fit`` and
delegates every question to the fitted method (:class:`infkit.methods.Method`); it never asks what
kind of method it holds. A question the method does not answer is refused with the list of
methods that do.

Units and sign (docs/conventions.md §5): every score is the predicted change of a measured
quantity when a training example is removed and the model retrained, in that quantity's own
units, 1/N included. ``scores[t, j] > 0`` means removing j would raise test example t's loss:
j helped t.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import numbers
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import torch
from torch import Tensor, nn

from infkit import decompositions, diagnostics, registry, rounding, saved
from infkit import language_modeling as lm
from infkit.data import ExampleSet, checked_indices
from infkit.decompositions import Svd, TokenScores
from infkit.errors import (
    InfkitError,
    InvalidInputError,
    NonFiniteError,
    NotFittedError,
    Notice,
    ProblemTooLargeError,
    UnsupportedError,
    listed,
    warn,
)
from infkit.estimators import ESTIMATORS, RELATIF_NORMS, Estimator, SolveCall
from infkit.example_checks import check_examples
from infkit.failures import CALL_ERRORS, from_an_example, located_failure, naming_failures
from infkit.fingerprint import data_fingerprint, forward_snapshot, note_forward_writes
from infkit.fitted import (
    Fitted,
    check_parameters_take_part,
    check_weights_present,
    gradient_cache_fits,
    mean_gradient_by_pass,
    objective_gradient,
    probe_forward_writes,
    training_gradients,
)
from infkit.gradients import MODES, PerExample, directional_derivatives
from infkit.layers.capture import UnassignedRowsError
from infkit.memory import (
    CHUNK_LIMIT_SHARE,
    FLOAT64_BYTES,
    bounded,
    default_memory_limit,
    human_bytes,
    map_large_allocations,
    row_chunks,
)
from infkit.methods.base import (
    Method,
    PrimalMethod,
    Problem,
    batch_gradient_bytes,
    method_class,
    methods_answering,
    registered,
)
from infkit.options import integer_argument, nonnegative_number, suggest_option
from infkit.parameters import (
    ParameterSpace,
    dtype_name,
    evaluation_mode,
    product_dtype,
    warn_about_training_mode,
)
from infkit.plan import (
    CHECKS_STAGE,
    Plan,
    RunShape,
    Stage,
    has_sizes,
    mark_fitted,
    sized_outputs,
)
from infkit.progress import Mode, track
from infkit.progress import resolve as resolve_progress
from infkit.removal import Quantity, RemovalEffect
from infkit.serial import one_at_a_time
from infkit.shards import QueryRows
from infkit.task import Task
from infkit.training import objective_and_gradient

#: ``method="auto"`` logs its choice here (INFO)
logger = logging.getLogger("infkit")

#: machine epsilons of the typical per-example gradient below which the retained objective's
#: gradient norm is rounding: :meth:`Influence.remove` with ``steps > 1`` does not call Newton
#: iterates there diverging (a ridge model solved exactly by the first step read 2.45e-16,
#: then 2.47e-16)
ROUNDING_GRADIENTS = 1000

__all__ = ["Influence", "TopK", "default_memory_limit"]


@dataclass
class TopK:
    """The k most helpful (proponents) and most harmful (opponents) training examples per query.

    ``*_indices`` and ``*_scores`` are [n_test, k]; scores are removal effects on the measurement,
    so a proponent of a loss measurement has a positive score (removing it raises the loss).
    """

    proponent_indices: Tensor
    proponent_scores: Tensor
    opponent_indices: Tensor
    opponent_scores: Tensor

    @classmethod
    def of(cls, scores: Tensor, k: int, higher_is_better: bool) -> TopK:
        """The ranking of a block of scores [n_test, N] that are at hand (their dtype kept)."""
        helpful = -scores if higher_is_better else scores
        pro = helpful.topk(k, dim=1).indices
        con = (-helpful).topk(k, dim=1).indices
        return cls(pro, scores.gather(1, pro), con, scores.gather(1, con))

    @classmethod
    def joined(cls, parts: list[TopK], dtype: torch.dtype) -> TopK:
        """The rankings of consecutive blocks of queries as one, scores in ``dtype``."""
        return cls(
            proponent_indices=torch.cat([part.proponent_indices for part in parts]),
            proponent_scores=torch.cat([part.proponent_scores for part in parts]).to(dtype),
            opponent_indices=torch.cat([part.opponent_indices for part in parts]),
            opponent_scores=torch.cat([part.opponent_scores for part in parts]).to(dtype),
        )


def solves_by_iterations(method: Method) -> bool:
    """Whether ``method`` applies its inverse curvature by iterations (``cg``, ``lissa``,
    ``astra``: not ``cheap_solve``), so that a question solving for every training example
    (RelatIF, self-influence) costs a system each."""
    return isinstance(method, PrimalMethod) and not type(method).cheap_solve


def _count(option: str, value: object) -> int:
    """``value`` as a plan size (an integer >= 1, NumPy's included), or a refusal naming it."""
    return integer_argument(option, value, 1)


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _noting_writes(answer: Callable[_P, _R]) -> Callable[_P, _R]:
    """An answer of a fitted :class:`Influence` whose forward passes' writes to the model (a
    statistic its forward pass keeps over the queries, a rotary cache grown for longer ones) are
    noted as state (:func:`~infkit.fingerprint.note_forward_writes`), not taken at the next
    answer for a setting edited since fit (:meth:`~infkit.fitted.Fitted.changed_since_fit`)."""

    @functools.wraps(answer)
    @one_at_a_time
    def noted(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        inf: Influence = args[0]  # type: ignore[assignment]
        outermost = inf._answering == 0  # (an answer asks others: top_k, the report's)
        if outermost:
            inf._asked = []
        inf._answering += 1
        try:
            # (out of a caller's torch.inference_mode(): the answers differentiate; a reviewer's
            # identity and dual met PyTorch's "Inference tensors do not track version counter")
            with torch.inference_mode(False), _writes_noted(inf.task.model):
                return answer(*args, **kwargs)
        except (InfkitError, *CALL_ERRORS) as error:
            # the query a pass failed on, named where one fails alone (the queries read: fit
            # passed over the training set already, and a call that failed before reading any,
            # a mistyped argument, costs no pass)
            if not from_an_example(error):
                raise
            if inf._fitted is None or not inf._asked:
                raise
            sets = [(queries, True) for queries in inf._asked]
            named = located_failure(inf.fitted.engine, error, sets, inf.fitted.batch_size)
            if named is None:
                raise
            raise named from error
        finally:
            inf._answering -= 1
            if outermost:
                inf._asked = []

    return noted


@contextlib.contextmanager
def _writes_noted(model: nn.Module) -> Iterator[None]:
    """Note what the model's forward passes in the block write as state
    (:func:`~infkit.fingerprint.note_forward_writes`)."""
    before = forward_snapshot(model)
    try:
        yield
    finally:
        note_forward_writes(model, before)


def _check_directory(path: Any) -> None:
    """Refuse a ``path`` of :meth:`Influence.save` / :meth:`Influence.load` that is no path."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise InvalidInputError(
            f"path must be a directory's path (a str or pathlib.Path), got {path!r}"
        )


class Influence:
    """Influence of training examples on a trained model, by one method and one estimator.

    Args:
        task: the model, its per-example loss and the measured quantity.
        method: a registered method (``infkit.methods()`` lists them) or ``"auto"``.
        estimator: ``"if"``, ``"rif"``, ``"newton"`` or ``"relatif"``.
        l2: the training objective's own L2 coefficient, mean form: the model was trained on
            ``mean_i l_i + (l2/2) ||theta||^2``.
        damping: extra, purely numerical, added to the curvature; ``"auto"`` for the methods
            with a heuristic (``kfac``, ``ekfac``: 0.1 x the mean eigenvalue of each module's
            curvature, docs/methods/kfac.md).
        relatif: ``"theta"`` or ``"loss"`` normalisation for ``estimator="relatif"``.
        batch_size: examples per batch of every pass over the data.
        per_example: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :class:`infkit.gradients.PerExample`).
        progress: show progress: None (default) a bar in a terminal or notebook and a line
            every few seconds in a log; True bars; False nothing (:mod:`infkit.progress`).
        memory_limit: bytes dense objects may take (default: half the machine's memory). A
            tighter limit also fixes glibc's mmap threshold for the process
            (:func:`infkit.memory.map_large_allocations`), so that each batch's freed blocks
            leave it instead of staying as heap holes, at the cost of page faults.
        device: where the model runs: it is moved there (``model.to(device)``) and every batch
            follows it (default: where the model is; CUDA when the model is on it).
        dtype: the precision of the forward and backward passes: ``torch.bfloat16`` (or
            ``torch.float16``) runs them under ``torch.autocast`` with the outputs, products and
            statistics in float32 (mixed precision); None (default): the model's own dtype.
        workdir: a directory for a resumable run: the Kronecker methods keep their factors
            there (unless ``factors_dir`` says otherwise) and commit streamed scores shard by
            shard with the queries they precondition, so that the same call after a crash
            reuses everything finished and gives bit-identical scores (docs/distributed.md).
        checks: run the post-fit checks of the answer (docs/conventions.md §9; their figures
            go to ``describe()``, a warning when an answer is unreliable), and where they run,
            the queries' energy ratio of every call that scores queries. They cost a few
            passes' worth of curvature products on a sample, which ``plan()`` counts; False
            skips them, and with them those warnings; ``"queries"`` measures the queries' ratio
            at any size, where the fit's checks do not run (language models).
        **method_options: the method's options (``infkit.methods()[name]["options"]``), e.g.
            ``curvature="hessian"`` for ``"exact"``; checked here, at construction.
    """

    def __init__(
        self,
        task: Task,
        method: str = "exact",
        estimator: str = "if",
        l2: float = 0.0,
        damping: float | str = 0.0,
        *,
        relatif: str = "theta",
        batch_size: int = 64,
        per_example: str = "auto",
        progress: bool | None = None,
        memory_limit: int | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        workdir: str | Path | None = None,
        checks: bool | Literal["queries"] = True,
        **method_options: Any,
    ) -> None:
        if not isinstance(task, Task):
            raise InvalidInputError(
                f"task must be an infkit.Task (e.g. Task.classification(model)), got "
                f"{type(task).__name__}"
            )
        if device is not None:
            try:
                place = torch.device(device)
            except (RuntimeError, TypeError) as exc:
                raise InvalidInputError(
                    f"device={device!r} is not a device; use 'cpu', 'cuda' or 'cuda:N'"
                ) from exc
            if place.type == "meta":  # (moving there would drop the caller's weights for good)
                raise InvalidInputError(
                    "device='meta' holds shapes without values, and moving the model there "
                    "would drop its weights: to plan a run for a model too large for this "
                    "machine, build it on the meta device (with torch.device('meta'): ...) and "
                    "call plan() on an Influence of it without device= (docs/methods/"
                    "language_models.md)"
                )
            try:
                task.model.to(place)
            except (RuntimeError, TypeError, AssertionError) as exc:  # no CUDA: an assertion
                raise InvalidInputError(
                    f"device={device!r} is not usable here ({exc}); use 'cpu', 'cuda' or "
                    "'cuda:N' on a machine that has it"
                ) from exc
        if dtype is not None:
            trainable = [p for p in task.model.parameters() if p.requires_grad]
            model_dtype = next(iter(trainable or task.model.parameters()), torch.empty(0)).dtype
            if dtype != model_dtype:
                task = task.with_autocast(dtype)
            else:  # (a tester's bfloat16 model given dtype=torch.bfloat16: dropped unsaid)
                warn(
                    f"dtype=torch.{dtype_name(dtype)} is the model's own precision: its passes "
                    "run in it as they are, without torch.autocast (describe()['autocast'] is "
                    "None); dtype= lowers a float32 model's passes",
                    Notice,
                )
        self._estimator = _estimator(estimator, relatif)
        self.auto_damping = damping == "auto"
        if self.auto_damping:
            damping = 0.0
            if "damping_scale" in method_options:
                raise InvalidInputError(
                    "damping='auto' sets the method's damping_scale; pass one or the other"
                )
        l2 = nonnegative_number("l2", l2)
        damping = nonnegative_number("damping", damping, alternative=" or 'auto'")
        batch_size = integer_argument("batch_size", batch_size, 1)
        if per_example not in MODES:
            raise UnsupportedError(
                f"unknown per_example mode {per_example!r}; use one of {', '.join(MODES)}"
            )
        self.task = task
        self.method_name = method
        self.l2 = float(l2)
        self.damping = float(damping)
        self.batch_size = batch_size
        self.per_example_mode = per_example
        if progress not in (None, True, False):
            raise InvalidInputError(
                f"progress must be None (by environment), True (bars) or False (nothing), got "
                f"{progress!r}"
            )
        self.progress = progress
        if not isinstance(checks, bool) and checks != "queries":
            raise InvalidInputError(
                "checks must be True (the checks a fit affords), False (none) or 'queries' (those "
                "and the queries' energy ratio on every scores() call, at any size; plan() prices "
                f"it), got {checks!r}"
            )
        self.checks: bool | Literal["queries"] = checks
        self.workdir = None if workdir is None else Path(workdir)
        if self.workdir is not None and self.workdir.exists() and not self.workdir.is_dir():
            raise InvalidInputError(f"workdir {self.workdir} is a file, not a directory")
        if memory_limit is not None and (
            not isinstance(memory_limit, numbers.Integral)  # numpy's integers too
            or isinstance(memory_limit, bool)
            or memory_limit < 1
        ):
            raise InvalidInputError(
                f"memory_limit must be an int number of bytes >= 1 (or None for half the "
                f"machine's memory), got {memory_limit!r}: e.g. int(2.5 * 2**30) for 2.5 GiB"
            )
        self.memory_limit = int(memory_limit) if memory_limit else default_memory_limit()
        if bounded(self.memory_limit):
            # freed blocks go back to the system, so that the peak is the live objects' that
            # the budget counts (at some time per pass)
            map_large_allocations()
        self.method_options = dict(method_options)
        self._method: Method | None = None
        self._choice: registry.Choice | None = None  # what method="auto" picked, and why
        self._fitted: Fitted | None = None
        self._asked: list[ExampleSet] = []  # the query sets of the answer being computed
        self._answering = 0  # answers under way (one may ask others)
        self._told: set[str] = set()  # methods whose attributed-parameters notice was given
        self._candidates: list[str] = []
        #: methods method="auto" chose that refused the model in their fit, with why
        self._refused: dict[str, str] = {}
        self._loaded_from: Path | None = None  # the saved Influence this one was loaded from
        if method == "auto":
            self._candidates = self._auto_candidates()
        else:
            self._method = self._create(method)
            self._method.check(task, ParameterSpace(task.model))

    # ------------------------------------------------------------------ construction helpers
    def _options_for(self, name: str) -> dict[str, Any]:
        """The method options, with ``damping_scale="auto"`` when damping="auto" was asked and
        ``factors_dir`` in the workdir for the methods that keep factors."""
        options = dict(self.method_options)
        if (
            self.workdir is not None
            and "factors_dir" in method_class(name).Options.names()
            and options.get("factors_dir") is None
        ):
            options["factors_dir"] = str(self.workdir)
        if not self.auto_damping:
            return options
        if not method_class(name).supports_auto_damping:
            able = [n for n, cls in sorted(registered().items()) if cls.supports_auto_damping]
            raise UnsupportedError(
                f"damping='auto' is a heuristic of the Kronecker-factored methods "
                f"({', '.join(able)}); method {name!r} needs a number: try l2 + damping around "
                "1e-3 x the mean curvature eigenvalue, or damping=0 when l2 > 0"
            )
        return {**options, "damping_scale": "auto"}

    def _create(self, name: str) -> Method:
        method = registry.create(name, self._options_for(name))
        method.require_estimator(self._estimator.name)
        return method

    def _auto_candidates(self) -> list[str]:
        """The methods ``method="auto"`` may choose: those that take the given options, supply
        the estimator and, with ``damping="auto"``, have the heuristic."""
        suiting = [
            name
            for name in registry.auto_candidates()
            if set(self.method_options) <= set(method_class(name).Options.names())
            and self._estimator.name in method_class(name).estimators
            and (not self.auto_damping or method_class(name).supports_auto_damping)
        ]
        autocast = self.task.autocast
        names = [n for n in suiting if autocast is None or method_class(n).takes_autocast]
        if autocast is not None and suiting and not names:  # dtype= left out the only ones
            precision = dtype_name(autocast)  # that take the options
            raise UnsupportedError(
                f"method='auto' with dtype=torch.{precision}: the methods that take the "
                f"option(s) {sorted(self.method_options)} ({', '.join(suiting)}) run no pass "
                "under autocast; leave dtype out, or name a method"
            )
        if not names:
            known = sorted(
                {
                    option
                    for name in registry.auto_candidates()
                    for option in method_class(name).Options.names()
                }
            )
            given = ", ".join(
                f"{k!r}{suggest_option(k, known)}" for k in sorted(self.method_options)
            )
            raise UnsupportedError(
                f"method='auto' chooses among {', '.join(registry.auto_candidates())}, and none "
                f"of them takes the option(s) {given}"
                + (" with damping='auto'" if self.auto_damping else "")
                + f" and estimator {self.estimator!r}; name the method to pass its options"
            )
        return names

    # ------------------------------------------------------------------ fit
    @one_at_a_time
    def fit(self, train: Any) -> Influence:
        """Fit the method on the training set (the curvature, factors or kernel); returns ``self``.

        A refit fits a method object of its own. One refused before it begins (by the checks
        of its data or of its memory) leaves the previous fit answering; once it begins, the
        previous fit is let go (so that the peak is the new fit's), and a refit that then fails
        leaves the Influence unfitted (fit again). An Influence made by :meth:`with_estimator`,
        or a :meth:`remove` effect, keeps the fit it was made from.
        """
        with torch.inference_mode(False):  # (a fit differentiates, whatever the caller's mode)
            examples = ExampleSet(train, name="training set")
            check_weights_present(self.task.model)
            space = ParameterSpace(self.task.model)
            engine = PerExample(self.task, space, self.per_example_mode)
            warn_about_training_mode(self.task.model)
            check_examples(engine, examples)
            with naming_failures(
                engine, examples, batch_size=self.batch_size
            ):  # (a later example the model cannot take)
                return self._fit_checked(examples, space, engine)

    def _fit_checked(
        self, examples: ExampleSet, space: ParameterSpace, engine: PerExample
    ) -> Influence:
        """``fit`` after its checks of the data: the method's (``"auto"``'s choice's) fit."""
        show = resolve_progress(self.progress)
        c = probe_forward_writes(engine, examples)[0].numel()
        problem = Problem(len(examples), space.size, c, self.memory_limit, self.task.model, space)
        # what the fit's own passes change beyond the probe's (a size noted only of batches
        # larger than its) is state too, as a save records it
        settled = forward_snapshot(self.task.model)
        try:
            if self._method is not None:
                # a refit fits a method of its own (those with_estimator made from this one keep
                # theirs), and lets the previous fit go once the new one passes its checks
                # (_fit_method): a refit that fails then leaves this Influence unfitted, not
                # answering from half of each (a tester's scores were 1.3 off)
                method = self._method if self._fitted is None else self._create(self._method.name)
                return self._fit_method(method, examples, engine, problem, show)
            while True:  # method="auto": its choice, or the next when a Kronecker method refuses
                method = self._auto(problem)
                try:
                    return self._fit_method(method, examples, engine, problem, show)
                except UnassignedRowsError as error:
                    self._pass_over(method.name, problem, error)
        finally:
            note_forward_writes(self.task.model, settled)

    def _fit_method(
        self,
        method: Method,
        examples: ExampleSet,
        engine: PerExample,
        problem: Problem,
        show: Mode,
    ) -> Influence:
        """Fit ``method`` on the checked training set (``fit`` after its checks of the data)."""
        space = problem.space
        attributed = self._attributed_space(method, space)
        if attributed is not space:  # the method attributes through part of the model
            space = attributed
            engine = PerExample(self.task, space, self.per_example_mode)
            problem = replace(problem, p=space.size, space=space)
        check_parameters_take_part(engine, examples)
        method.check_memory(problem)  # before any pass over the data
        if self._fitted is not None:  # a refit that begins: its memory is the new fit's alone
            self._method, self._fitted = method, None  # (a reviewer's exact refit: +2 P^2)
        kind = type(method)
        keeps = kind.shards_scores or "factors_dir" in kind.Options.names()
        if self.workdir is not None and not keeps:
            instead = (
                "inf.save(PATH) keeps a fitted run to load again"
                if kind.fitted_state is not None  # what inf.save keeps of it
                else "nor does inf.save: fit again"
                + (
                    " from the TrainingRun you keep, which replays it once"
                    if "run" in kind.Options.names()
                    else ""
                )
            )
            warn(
                f"method {method.name!r} keeps nothing in workdir {self.workdir}: its fit and "
                "scores are not resumable there (the Kronecker methods and ASTRA's factors "
                f"are); {instead}",
                Notice,
            )
        cache, summary = (None, None)
        if type(method).uses_training_gradients:
            cache, summary = training_gradients(
                engine, examples, self.batch_size, self.memory_limit, show
            )
        theta = space.flat()  # theta*, an exact snapshot in the parameters' dtype
        anchor = method.regulariser_anchor(self.task, space)
        fitted = Fitted(
            task=self.task,
            space=space,
            engine=engine,
            train=examples,
            theta=theta,
            l2=self.l2,
            damping=self.damping,
            batch_size=self.batch_size,
            progress=show,
            memory_limit=self.memory_limit,
            train_gradients=cache,
            workdir=self.workdir,
            anchor=None if anchor is None else anchor.to(theta.device, torch.float64),
        )
        if self.estimator == "rif":  # its downdates need every example's output Jacobian
            fitted.require_jacobian_room(min(self.batch_size, fitted.n), "rif")
        # Trajectory and surrogate methods (TracInCP, TRAK) neither assume an optimum nor use
        # grad L(theta*): no pass over the data for them.
        if method.assumes_optimum and (summary is not None or type(method).stationarity_pass):
            if self.task.autocast is not None and summary is not None:
                # grad L(theta*) by a pass in the model's own precision: summed from gradients
                # under dtype=, it is their rounding (a tester's bfloat16 figure 2.3e-3 for a
                # float32 optimum at 2.9e-7), which the Newton step took for a step to the
                # optimum (group removals 40% off) and the drift check for a distance to it;
                # the typical gradient's size, a scale, stays the cache's (a reviewer's)
                summary = replace(summary, mean_gradient=mean_gradient_by_pass(fitted))
            gradient, stationarity = objective_gradient(fitted, summary)
            fitted = replace(fitted, objective_gradient=gradient, stationarity=stationarity)
        method.clear_checks()  # a refit's figures are its own, with or without checks
        method.fit(fitted)
        if self.checks:
            method.diagnose()
        self._method, self._fitted = method, fitted
        return self

    def _pass_over(self, refused: str, problem: Problem, error: UnassignedRowsError) -> None:
        """Record that the Kronecker method ``method="auto"`` chose refused the model's layers
        (rows that are no example's), saying that the next method that suits is taken; raise
        the refusal itself when none other suits (with ``damping="auto"``, which only they
        take, saying so)."""
        self._refused[refused] = f"refused this model: {error}"
        remaining = [name for name in self._candidates if name not in self._refused]
        try:
            registry.choose(problem, remaining)
        except UnsupportedError:
            if self.auto_damping:
                raise UnsupportedError(
                    f"{error}. With damping='auto', method='auto' chooses among the methods with "
                    "a damping heuristic only: give damping a number (e.g. 1e-3) for it to "
                    "choose another"
                ) from error
            raise error from None
        layers = listed([repr(name) for name in error.layers], 3)
        warn(
            f"method='auto' chose {refused!r}, which refused this model: the rows of its "
            f"tracked layers {layers} are no example's (describe()['auto'] says why). It "
            "takes the next method that suits instead",
            Notice,
        )

    def _auto(self, problem: Problem) -> Method:
        remaining = [name for name in self._candidates if name not in self._refused]
        choice = registry.explain_choice(problem, remaining)
        if self._refused:  # the methods that refused this model in their fit, and why
            choice = replace(choice, passed_over={**self._refused, **choice.passed_over})
        logger.info("%s", choice)
        self._choice = choice
        method = self._create(choice.method)
        method.check(self.task, problem.space)
        return method

    def _attributed_space(self, method: Method, space: ParameterSpace) -> ParameterSpace:
        """The parameters ``method`` attributes through: ``space`` itself, or the part of it the
        method names (:meth:`Method.attributed_parameters`). Its notice of what is left out is
        given once per method, whether ``plan`` or ``fit`` asks first."""
        with warnings.catch_warnings():
            if method.name in self._told:
                warnings.simplefilter("ignore", Notice)
            names = method.attributed_parameters(self.task, space)
        self._told.add(method.name)
        return space if names is None else ParameterSpace(self.task.model, names)

    @one_at_a_time
    def with_estimator(self, estimator: str, relatif: str | None = None) -> Influence:
        """The same fitted method with another estimator (no refit).

        ``inf.with_estimator("newton").scores(test)`` reuses the factorisation, the cached
        training gradients and everything else ``fit`` computed. The two share that fit: a
        later ``fit`` of either fits a method of its own and leaves the other as it was (but
        for what a workdir holds: a refit with ``overwrite=True`` replaces the factors on disk
        there, and the other then refuses to score from them).
        """
        method = self.method
        choice = _estimator(estimator, relatif or self._estimator.relatif)
        method.require_estimator(choice.name)
        other = copy.copy(self)
        other._estimator = choice
        return other

    # ------------------------------------------------------------------ save and load
    @one_at_a_time
    def save(
        self,
        path: str | Path,
        *,
        overwrite: bool = False,
        data: bool = True,
        keep_workdir: bool = True,
    ) -> Path:
        """Save the fitted Influence to the directory ``path``, to reload it without refitting.

        One artifact of the artifact store (docs/saving.md): the fit's identity (model, task and
        training-data fingerprints, method, options and settings), the method's fitted state,
        the record's tensors (theta*, cached training gradients, ...), the checks and, when it
        is made of tensors, the training data. It is committed atomically: a reader sees the
        whole save or none of it.

        Args:
            path: a directory (created when missing); it may hold other artifacts, e.g. a
                ``workdir``'s, but one saved Influence.
            overwrite: replace the Influence saved in ``path`` before (the new one is committed
                first, then the old one removed); without it a second save there is refused.
            data: save the training data when it is made of tensors; with False (or data of
                other objects) :meth:`load` needs ``train=``.
            keep_workdir: save this Influence's ``workdir`` with it, where a load commits what
                it computes next unless its own ``workdir=`` says otherwise; False saves none
                (for a workdir that will not outlive this run, or that is this machine's only).

        Returns:
            The artifact's directory inside ``path``.

        Raises:
            ArtifactError: ``path`` already holds a saved Influence (and not ``overwrite``), or
                the model's parameters changed since ``fit``.
            UnsupportedError: the method (or a method option) cannot be saved.
        """
        _check_directory(path)
        method, fitted = self.method, self.fitted
        settings = saved.Settings(
            method=method.name,
            requested=self.method_name,
            estimator=self.estimator,
            relatif=self.relatif,
            l2=self.l2,
            damping=self.damping,
            auto_damping=self.auto_damping,
            batch_size=self.batch_size,
            per_example=self.per_example_mode,
            memory_limit=self.memory_limit,
            autocast=self.task.autocast,
            workdir=self.workdir if keep_workdir else None,
            method_options=self.method_options,
            choice=self._choice,
        )
        return saved.save(
            path,
            settings,
            method,
            fitted,
            describe=self.describe(),
            overwrite=overwrite,
            data=data,
        )

    @classmethod
    @one_at_a_time
    def load(
        cls,
        path: str | Path,
        task: Task,
        train: Any = None,
        *,
        options: dict[str, Any] | None = None,
        progress: bool | None = None,
        memory_limit: int | None = None,
        device: str | torch.device | None = None,
        checks: bool | Literal["queries"] = True,
        workdir: str | Path | None = None,
    ) -> Influence:
        """An Influence saved by :meth:`save`, fitted again without any pass over the data.

        The manifest and every checksum are verified, then ``task``'s model and task
        fingerprints against the saved ones; the method's state, the fitted record and the
        settings are restored as they were, so every answer equals the original's bit for bit
        (docs/saving.md).

        Args:
            path: the directory given to :meth:`save` (or the artifact directory it returned).
            task: the task the Influence was fitted with: the same model (architecture and
                parameter values) and the same loss and measurement functions. The fit's
                ``dtype=`` precision is a saved setting: a task without one of its own runs in it.
            train: the training data, needed when it was not saved (its content and order are
                checked against the saved fingerprint); None: the saved copy.
            options: the method options that are functions (they cannot be saved), given
                again; each is checked against the saved name and code hash.
            progress: how progress is shown (as for ``Influence``).
            memory_limit: bytes dense objects may take (None: the saved limit, which keeps the
                chunking, and so the answers, as they were). A saved [N, P] gradient cache that
                this limit does not hold (a quarter of it) is not loaded: the gradients are
                computed again when needed.
            device: where the model runs (as for ``Influence``; default: where it is). The
                saved tensors that were on the model's device go there, the others to the CPU.
            checks: the checks of the ``scores()`` calls (as for ``Influence``: ``"queries"``
                measures the queries' energy ratio at any size, False none); the fit's own
                checks are not run again, their saved figures are restored.
            workdir: where the loaded Influence commits what it computes next (a Kronecker
                method's score shards), so that a call after a crash reuses them (None: the
                saved ``workdir``).

        Returns:
            The fitted Influence; ``describe()`` adds ``"loaded_from"``.

        Raises:
            ArtifactError: no saved Influence at ``path``, a damaged one (a file that fails its
                checksum), another model or task (the message names what differs), or a
                ``train`` that is not the saved training data.
            UnsupportedError: the saved method is not registered in this process.
        """
        if not isinstance(task, Task):
            raise InvalidInputError(
                f"task must be an infkit.Task (the one the Influence was fitted with), got "
                f"{type(task).__name__}"
            )
        check_weights_present(task.model)
        _check_directory(path)
        if options is not None and not isinstance(options, Mapping):
            raise InvalidInputError(
                f"options must be a dict of the method options that are functions (by name), "
                f"got {type(options).__name__}"
            )

        def reading() -> Influence:
            """One reading of the save, which another process may replace meanwhile."""
            record = saved.read(path)
            as_fitted = record.task_as_fitted(task)
            examples = record.examples(train)
            record.check_task(as_fitted, examples)
            settings = record.settings(options, workdir_given=workdir is not None)
            autocast = settings.autocast
            if autocast is not None and not method_class(settings.method).takes_autocast:
                # saved before such a run was refused: the precision changed none of its answers
                warn(
                    f"{record.requested_path} was fitted with dtype=torch."
                    f"{dtype_name(autocast)}, which method {settings.method!r} "
                    "does not take (its products run in the model's own dtype, so the answers are "
                    "those without it): loaded without it",
                    Notice,
                )
                as_fitted, autocast = as_fitted.with_autocast(None), None
            inf = cls(
                as_fitted,
                settings.method,
                settings.estimator,
                settings.l2,
                "auto" if settings.auto_damping else settings.damping,
                relatif=settings.relatif,
                batch_size=settings.batch_size,
                per_example=settings.per_example,
                progress=progress,
                memory_limit=memory_limit or settings.memory_limit,
                device=device,
                dtype=autocast,
                workdir=settings.workdir if workdir is None else workdir,
                checks=checks,
                **settings.method_options,
            )
            inf.method_name, inf._choice = settings.requested, settings.choice
            method = inf._method
            assert method is not None  # a named method is created at construction
            inf._fitted = record.restore(
                method,
                inf.task,
                examples,
                progress=resolve_progress(progress),
                memory_limit=inf.memory_limit,
                workdir=inf.workdir,
            )
            inf._loaded_from = record.path
            return inf

        # a save replaced while it was read (another process's overwrite=True commits the new
        # save, then removes the old one) is read again, from the save that replaced it
        return saved.read_again_if_replaced(path, reading)

    # ------------------------------------------------------------------ state
    @property
    def estimator(self) -> str:
        """The estimator's name: ``"if"``, ``"rif"``, ``"newton"`` or ``"relatif"``."""
        return self._estimator.name

    @property
    def estimator_spec(self) -> Estimator:
        """The estimator and RelatIF's normalisation, as the methods receive them."""
        return self._estimator

    @property
    def relatif(self) -> str:
        """RelatIF's normalisation, ``"theta"`` or ``"loss"``."""
        return self._estimator.relatif

    @property
    def method(self) -> Method:
        """The fitted method (its own diagnostics and answers; see :class:`infkit.methods.Method`)."""
        if self._fitted is None or self._method is None:
            raise NotFittedError("call .fit(train) before asking for scores")
        return self._method

    @property
    def fitted(self) -> Fitted:
        """The fitted record: training data, theta*, objective, engine (see :class:`Fitted`)."""
        if self._fitted is None:
            raise NotFittedError("call .fit(train) before asking for scores")
        return self._fitted

    @property
    def stationarity(self) -> float | None:
        """``||grad L(theta*)||`` relative to the typical per-example gradient (None: unchecked)."""
        return None if self._fitted is None else self._fitted.stationarity

    @property
    def n_train(self) -> int:
        return self.fitted.n

    @property
    def n_params(self) -> int:
        return self.fitted.theta.numel()

    def _indices(self, indices: Sequence[int] | Tensor) -> Tensor:
        n = self.n_train
        idx = checked_indices(indices, n, what="training index", unique=True)
        if len(idx) >= n:
            raise InvalidInputError(
                "cannot remove every training example: the retained objective would be empty"
            )
        return idx

    def _queries(self, test: Any) -> ExampleSet:
        """The test set, checked as a set read through the measurement only (noted for the
        answer's account of a failed pass: :func:`_noting_writes`)."""
        queries = self.fitted.examples(test, "test set", measured=True)
        self._asked.append(queries)
        return queries

    def _check_queries(self, queries: ExampleSet) -> None:
        """The queries' energy ratio (``Method.check_queries``) as ``checks`` says: where the
        fit's own checks ran, or at any size with ``checks="queries"``; none with False."""
        if self.checks:
            self.method.check_queries(queries, always=self.checks == "queries")
            self._check_rounding(queries)

    def _check_rounding(self, queries: ExampleSet) -> None:
        """How far a lower precision's rounding of the gradients moves a block of scores:
        ``dtype=``'s (autocast, :func:`infkit.rounding.autocast_rounding`), recorded as
        ``describe()["autocast_rounding"]``, or a bfloat16 or float16 model's own against a
        float32 copy of it (:func:`infkit.rounding.model_rounding`), recorded as
        ``describe()["model_rounding"]``; warned above :data:`~infkit.rounding.ROUNDING_WARNING`,
        and a set of queries measured once a fit. Methods that do not precondition queries in
        parameter space, and blocks (with the copy) above a quarter of ``memory_limit``, are not
        measured."""
        method, fitted = self.method, self.fitted
        if not method.answers("module_scores"):
            return
        autocast = self.task.autocast
        if autocast is not None:
            measure, name, figure = rounding.autocast_rounding, dtype_name(autocast), "autocast"
            if not rounding.measurable(fitted):
                return
        elif fitted.space.dtype in rounding.LOW_PRECISION:
            measure, name, figure = rounding.model_rounding, dtype_name(fitted.space.dtype), "model"
            if not rounding.measurable(fitted, rounding.float32_copy_bytes(fitted)):
                return
        else:
            return
        key = rounding.queries_key(queries)
        if key not in method.roundings:
            method.roundings[key] = measure(fitted, method.precondition_queries, queries)
        change = method.roundings[key]
        if change is None:
            return
        method.query_checks[f"{figure}_rounding"] = change
        if change <= rounding.ROUNDING_WARNING:
            return
        curved = method.curvature != "identity"  # (identity has no curvature to magnify it)
        magnified = f", magnified by method {method.name!r}'s inverse curvature" if curved else ""
        block = (
            f"a block of {rounding.QUERIES} queries x {rounding.TRAINING} training examples moved "
            f"by {change:.0%} of its size against the same scores from"
        )
        why = (
            " (the inverse weighs the directions of small curvature, where a trained "
            "model's gradients are small and their rounding is not)"
            if curved
            else ""
        )
        if autocast is not None:
            said = (
                f"under dtype=torch.{name} the scores carry {name}'s rounding of the "
                f"gradients{magnified}: {block} the model's own "
                f"{dtype_name(fitted.space.dtype)} gradients{why}. Where the scores must hold, "
                "run without dtype="
            )
        else:
            said = (
                f"the model's parameters are {name}, so the scores carry {name}'s rounding of "
                f"the gradients{magnified}: {block} a float32 copy of the model (the same "
                f"weights){why}. Where the scores must hold, attribute a float32 copy "
                f"(model.float(); dtype=torch.{name} then computes in {name} and measures it "
                "too)"
            )
        remedy = " or with a larger damping" if curved else ""
        warn(f"{said}{remedy} (docs/methods/language_models.md §7)", UserWarning)

    def _checked_queries(self, test: Any) -> ExampleSet:
        """:meth:`_queries`, their energy ratio measured (:meth:`_check_queries`)."""
        queries = self._queries(test)
        self._check_queries(queries)
        return queries

    # ------------------------------------------------------------------ questions
    @_noting_writes
    def scores(self, test: Any, among: Sequence[int] | Tensor | None = None) -> Tensor:
        """Removal effect of each training example on each test measurement, [n_test, n_train].

        ``scores[t, j]`` predicts ``m_t(theta without j) - m_t(theta)``. Computed in chunks of
        test examples written into the result (in the model's dtype), so the peak memory stays
        near the result's size plus the method's own state; a result larger than
        ``memory_limit`` is refused before anything is computed (use :meth:`top_k`).

        ``among``: training indices to score instead of all of them; the result is then
        ``[n_test, len(among)]``, column c for training example ``among[c]``. The streamed
        Kronecker scores pass over those examples only (a prefilter's candidates,
        :mod:`infkit.analyses.prefilter`).
        """
        self.fitted.require_unchanged()
        self.method.require("scores")
        queries = self._queries(test)
        fitted = self.fitted
        columns = None
        if among is not None:
            columns = checked_indices(among, fitted.n, what="training index", unique=True)
        t = len(queries)
        n = fitted.n if columns is None else len(columns)
        need = t * n * fitted.space.bytes_per_float()
        if need > fitted.memory_limit:
            raise ProblemTooLargeError(
                f"scores for {t:,} test x {n:,} training examples take {human_bytes(need)}, above "
                f"the memory limit of {human_bytes(fitted.memory_limit)}: use top_k (it keeps "
                "only the strongest k per test example), pass fewer test examples at a time, or "
                "raise memory_limit"
            )
        out = torch.empty(t, n, dtype=fitted.result_dtype)
        for start, stop, S in self._score_chunks(queries, columns):  # finite in out's dtype
            out[start:stop] = S
            del S  # before the next chunk is computed
        return out

    @_noting_writes
    def score_shards(self, test: Any, part: tuple[int, int]) -> dict[str, int]:
        """Compute and commit only part ``i`` of ``K`` of the score shards of ``test`` in the
        workdir, returning nothing but a count: the share of one job of an array (a SLURM array
        task: ``part=(SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT)``). A later ``scores(test)``
        with the same settings reads every committed shard and computes only what is missing.

        Returns:
            ``{"computed": ..., "reused": ...}``: this call's shards, by how they were got.
        """
        method = self.method  # scores() refuses a model changed since fit
        if self.workdir is None:
            raise InvalidInputError(
                "score_shards commits shards to a workdir: pass workdir=PATH to Influence"
            )
        if not type(method).shards_scores:
            raise UnsupportedError(
                f"method {method.name!r} does not compute scores in shards; the Kronecker "
                "methods (kfac, ekfac) do"
            )
        if not method.scores_in_shards(self._estimator):
            # every job would compute the whole scores and commit nothing
            raise UnsupportedError(
                f"method {method.name!r} computes these scores whole, not in shards: the "
                f"estimator {self._estimator.name!r} or parameters outside its tracked layers "
                "(unsupported='identity') take the generic path. Shards need the IF estimator "
                "and the tracked layers only (the default unsupported='skip')"
            )
        method.shard_part = part
        try:
            self.scores(test)  # this part's columns only: not a result, never returned
        finally:
            method.shard_part = None
        return dict(method.shard_tally)  # counted afresh by each call

    def _score_chunks(
        self, queries: ExampleSet, among: Tensor | None = None
    ) -> Iterator[tuple[int, int, Tensor]]:
        """(start, stop, scores [stop - start, N] float64) over chunks of the queries.

        A chunk's temporaries (query gradients, solved queries and score rows in float64, about
        ``8 (3 N + 3 P)`` bytes a query) stay within a tenth of the [T, N] result, or a quarter
        of ``memory_limit`` for a method whose solves pass over the data once for all the
        queries of a chunk (``Method.solves_together``; :func:`infkit.memory.row_chunks`).
        """
        method, fitted = self.method, self.fitted
        if type(method).shards_scores:  # describe() counts this call's shards (top_k's too)
            method.shard_tally.update(computed=0, reused=0)
        t = len(queries)
        chunks, row_bytes = self._query_chunks(t, self._estimator)
        if row_bytes > int(CHUNK_LIMIT_SHARE * fitted.memory_limit):
            # a chunk of one query is over its share: said, not silent
            warn(
                f"method {method.name!r} scores one query at a time with "
                f"{human_bytes(row_bytes)} of temporaries, more than the quarter of memory_limit "
                f"({human_bytes(fitted.memory_limit)}) a chunk of queries may take, so this call "
                f"runs past the limit (inf.plan(train, test) gives its peak): "
                f"{type(method).plan_remedy}",
                UserWarning,
            )
        self._check_queries(queries)
        shown = track(chunks, fitted.progress, "scores", len(chunks)) if len(chunks) > 1 else chunks
        # where a chunk sits in the call, for what the method commits to a workdir
        call = data_fingerprint(queries) if len(chunks) > 1 and fitted.workdir else None
        solves = SolveCall(len(chunks))  # (a chunk's pass of solves per example: one pace told)
        for start, stop in shown:
            part = queries if stop - start == t else queries.part(torch.arange(start, stop))
            method.query_rows = None if call is None else QueryRows(call, start, stop, t)
            method.solve_call = solves
            try:
                if among is None:
                    S = method.scores(part, self._estimator)
                else:
                    S = method.scores_among(part, self._estimator, among)
            finally:
                method.query_rows = method.solve_call = None
            named = lambda r: f"{queries.name} {queries.example(start + r)}"  # noqa: E731, B023
            _require_finite_scores(S, method.name, named, fitted.result_dtype)
            yield start, stop, S

    def _query_chunks(self, t: int, estimator: Estimator) -> tuple[list[tuple[int, int]], int]:
        """The chunks ``[start, stop)`` of ``t`` queries that ``estimator``'s scores are taken
        in (:func:`infkit.memory.row_chunks`), and one query's bytes of temporaries."""
        method, fitted = self.method, self.fitted
        row_bytes = method.query_row_bytes(fitted.n, fitted.space.size, estimator)
        output_bytes = t * fitted.n * fitted.space.bytes_per_float()
        chunks = row_chunks(
            t, row_bytes, output_bytes, fitted.memory_limit, together=method.solves_together
        )
        return chunks, row_bytes

    @_noting_writes
    def self_scores(self) -> Tensor:
        """Removal effect of each training example on its own loss, [n_train].

        Large values flag examples the model needs to fit them: mislabelled points and outliers.
        """
        self.fitted.require_unchanged()
        method = self.method
        method.require("self_scores")
        out = self.fitted.output(method.self_scores(self._estimator))
        _require_finite_scores(out[None], method.name, lambda _: "the training set's self-scores")
        return out

    @_noting_writes
    def relatif_and_self_scores(self, test: Any) -> tuple[Tensor, Tensor] | None:
        """``with_estimator("relatif").scores(test)`` and ``self_scores()`` together, from one
        solve per training example where the method solves by iterations (``cg``, ``lissa``,
        ``astra``: each call alone would solve for every ``H^{-1} v_j``); None where nothing is
        shared (:meth:`_shares_solves`), then ask the two apart.

        Ask it of the IF Influence (``estimator="if"``, the default; RelatIF's normalisation
        is its ``relatif=`` setting): IF's self-scores are what these solves give, so on an
        Influence of another estimator, ``estimator="relatif"`` included, it returns None.
        """
        queries = self._queries(test)
        if not self._shares_solves(queries):
            return None
        self.fitted.require_unchanged()
        self.method.require("self_scores")
        self._check_queries(queries)
        assert isinstance(self.method, PrimalMethod)  # (_shares_solves)
        S, own = self.method.relatif_and_self_scores(queries, self._estimator.relatif)
        S, own = self.fitted.output(S), self.fitted.output(own)
        name = self.method.name
        _require_finite_scores(S, name, lambda r: f"{queries.name} {queries.example(r)}")
        _require_finite_scores(own[None], name, lambda _: "the training set's self-scores")
        return S, own

    def _shares_solves(self, queries: ExampleSet) -> bool:
        """Whether :meth:`relatif_and_self_scores` answers ``queries`` from shared solves: not
        with an estimator other than ``"if"`` (its self-scores are not these solves), a method
        with its own answers or cheap solves, or queries the memory limit splits into chunks
        (each chunk would solve for every training example again)."""
        fitted = self.fitted
        if self._estimator.name != "if" or not solves_by_iterations(self.method):
            return False
        t = len(queries)
        relatif = Estimator("relatif", self._estimator.relatif)
        chunks, row_bytes = self._query_chunks(t, relatif)
        # (a query whose temporaries exceed a chunk's share: the scores' path warns of it)
        within = row_bytes <= int(CHUNK_LIMIT_SHARE * fitted.memory_limit)
        output_bytes = t * fitted.n * fitted.space.bytes_per_float()
        return len(chunks) == 1 and within and output_bytes <= fitted.memory_limit

    @_noting_writes
    def remove(self, indices: Sequence[int] | Tensor, *, steps: int = 1) -> RemovalEffect:
        """Predicted effect of removing the training examples ``indices`` jointly.

        With ``steps=1`` (the default) ``Delta theta`` is the estimator's one-step answer
        (docs/estimators.md §6), and the changes of outputs, losses and measurements are first
        order in it (``J(x) Delta theta``, or the method's own prediction).

        With ``steps=K > 1`` the estimator's answer is the first iterate
        ``theta_1 = theta* + Delta theta_1``, and K - 1 Newton steps on the retained objective
        ``L_R(theta) = mean_{i not in F} l_i(theta) + (l2/2) ||theta - theta'||^2`` follow:

            theta_{k+1} = theta_k - H_R(theta_k)^{-1} grad L_R(theta_k)

        ``H_R(theta_k)`` is this method's curvature fitted again, with the same options, ``l2``
        and damping, on the retained examples at ``theta_k`` (one refit of the method per step,
        on a copy of the model: the model and the workdir are left alone), and
        ``grad L_R(theta_k)`` is exact. The fixed point is the retained optimum, whatever the
        damping, so for a convex loss and an exact curvature (``exact``, ``cg``)
        ``theta_K`` approaches retraining (:func:`infkit.retrain.without`) quadratically
        (docs/estimators.md §12). An approximate curvature (the Kronecker methods, a sampled
        Fisher) only converges where it is close enough to the Hessian, and plain Newton
        steps with it can move away even on a convex loss: ``gradient_norms`` shows the
        iterates, and a warning says when the last is no better than the first. The result's ``params`` is ``theta_K - theta*``, its
        ``gradient_norms`` the ``||grad L_R(theta_k)||`` of the iterates, and its ``outputs``,
        ``loss`` and ``measurement`` are the actual changes of the model at ``theta_K`` against
        the model at ``theta*`` (not first-order ones: ``theta_K`` stands for the retrained
        model). Needs a method that applies its inverse curvature to vectors
        (``precondition_queries``).

        Args:
            indices: the training examples removed together (distinct, not all of them).
            steps: the number of Newton steps, the estimator's own first (an integer >= 1).

        Returns:
            The removal's :class:`~infkit.removal.RemovalEffect`.

        Raises:
            InvalidInputError: ``steps`` is not an integer >= 1, or bad ``indices``.
            UnsupportedError: ``steps > 1`` with a method that cannot solve with its curvature
                at a new point (the message names those that can), or estimator ``"relatif"``.
        """
        self.fitted.require_unchanged()
        _check_steps(steps)
        idx = self._indices(indices)
        self._estimator.require_counterfactual()
        method = self.method
        method.require("remove")
        if steps > 1:
            return self._remove_in_steps(idx, steps)
        delta = self.fitted.output(method.removal(idx, self._estimator))
        # (this fit's method and record, whatever a later refit of this Influence does)
        snapshot = copy.copy(self)

        def predict(data: Any, which: Quantity) -> Tensor:
            with _writes_noted(self.task.model):  # (passes run later, as an answer's do)
                return snapshot._predicted_change(data, delta, which, idx)

        fitted = self.fitted  # (the record Delta theta belongs to, whatever a refit does)
        return RemovalEffect(
            idx,
            delta,
            self.estimator,
            predict,
            self.task.model,
            names=fitted.space.names,
            unchanged=fitted.require_unchanged,
        )

    def _remove_in_steps(self, idx: Tensor, steps: int) -> RemovalEffect:
        """:meth:`remove` with ``steps > 1``: the estimator's step, then ``steps - 1`` Newton
        steps on the retained objective, each with the method refitted at the iterate."""
        method, fitted = self.method, self.fitted
        _require_newton_iteration(method, steps)
        first = method.removal(idx, self._estimator).to(fitted.theta.device, torch.float64)
        keep = torch.ones(fitted.n, dtype=torch.bool)
        keep[idx.cpu()] = False
        retained = fitted.train.part(keep.nonzero().squeeze(1))
        clone = copy.deepcopy(self.task.model)
        task = self.task.with_model(clone)
        space = ParameterSpace(clone, fitted.space.names)
        theta = fitted.theta + first  # theta_1, float64
        norms: list[float] = []
        floor = 0.0  # the gradient norm that is rounding: no iterate can be told from another
        for _ in track(range(steps - 1), fitted.progress, "newton steps", steps - 1):
            space.assign_(theta)
            refit = self._refit_at(task, retained)
            # the refit's fit already measured grad L_R(theta_k) (its stationarity check)
            gradient = refit.fitted.objective_gradient
            stationarity = refit.fitted.stationarity
            if gradient is not None and stationarity:  # ||g|| / (mean ||grad l_i|| + l2||theta||)
                scale = float(gradient.norm()) / stationarity
                floor = max(floor, ROUNDING_GRADIENTS * torch.finfo(space.dtype).eps * scale)
            if gradient is None:
                gradient = _retained_gradient(
                    refit.fitted.engine, retained, self.l2, fitted.anchor, self.batch_size
                )
            gradient = gradient.to(torch.float64)  # the refit keeps it in product precision
            norms.append(float(gradient.norm()))
            step = refit.method.precondition_queries(gradient.unsqueeze(0))[0]
            theta = theta - step.to(theta)
        space.assign_(theta)
        engine = PerExample(task, space, self.per_example_mode)
        final = _retained_gradient(engine, retained, self.l2, fitted.anchor, self.batch_size)
        norms.append(float(final.norm()))
        if not norms[-1] < norms[0] and norms[-1] > floor:
            warn(
                f"{steps} Newton steps on the retained objective did not converge: "
                f"||grad L_R|| went from {norms[0]:.3g} at the first iterate to {norms[-1]:.3g} "
                "(gradient_norms has every iterate). A non-convex loss or an approximate "
                "curvature can make plain Newton steps diverge; use fewer steps, a larger "
                "damping, or retrain (infkit.retrain.without)",
                UserWarning,
            )
        delta = fitted.output(theta - fitted.theta)

        def predict(data: Any, which: Quantity) -> Tensor:
            return self._actual_change(data, engine, which)

        return RemovalEffect(
            idx,
            delta,
            self.estimator,
            predict,
            self.task.model,
            steps=steps,
            gradient_norms=norms,
            names=fitted.space.names,
            unchanged=fitted.require_unchanged,
        )

    def _refit_at(self, task: Task, retained: ExampleSet) -> Influence:
        """This Influence's method and settings fitted again on ``retained`` with ``task``'s
        model (a copy at a Newton iterate): no progress, no workdir, no saved factors."""
        method = self.method
        options = dict(self.method_options)
        if "factors_dir" in type(method).Options.names():
            options["factors_dir"] = None  # the user's factors are theta*'s, not the iterate's
        refit = Influence(
            task,
            method.name,
            "if",
            self.l2,
            "auto" if self.auto_damping else self.damping,
            batch_size=self.batch_size,
            per_example=self.per_example_mode,
            progress=False,
            memory_limit=self.memory_limit,
            **options,
        )
        # The iterate is not the retained optimum (the fit's drift check would say so at every
        # step), and the other fit-time warnings repeat this Influence's own fit.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return refit.fit(retained)

    def _actual_change(self, data: Any, engine: PerExample, which: Quantity) -> Tensor:
        """Change of ``which`` on ``data`` from the model at theta* to ``engine``'s model."""
        examples = self.fitted.examples(data, "data")
        before, after = self.fitted.engine, engine
        parts = []
        for batch in examples.batches(self.batch_size):
            if which == "outputs":
                change = after.outputs(batch) - before.outputs(batch)
                parts.append(change.reshape(change.shape[0], -1))
            elif which == "loss":
                parts.append(after.losses(batch) - before.losses(batch))
            else:
                parts.append(after.measurements(batch) - before.measurements(batch))
        return self.fitted.output(torch.cat(parts))

    def _predicted_change(self, data: Any, delta: Tensor, which: Quantity, idx: Tensor) -> Tensor:
        """Change of ``which`` on ``data`` under the removal: the method's own, or J Delta theta."""
        examples = self.fitted.examples(data, "data")
        fitted = self.fitted
        own = self.method.removal_change(examples, idx, self._estimator, which)
        if own is not None:
            return fitted.output(own)
        parts = [
            directional_derivatives(fitted.engine, b, delta, which)
            for b in examples.batches(self.batch_size)
        ]
        return torch.cat(parts).to(fitted.result_dtype)

    @_noting_writes
    def top_k(self, test: Any, k: int = 10) -> TopK:
        """The k strongest proponents and opponents of each test example.

        Proponents are the k most helpful training examples by score and opponents the k most
        harmful, whatever their sign: when fewer than k examples help a query, its last
        proponents have scores of the other sign. ``k`` above the number of training examples
        is taken as that number (both lists then rank the whole training set).
        """
        self.fitted.require_unchanged()
        k = integer_argument("k", k, 1)
        self.method.require("scores")
        queries = self._queries(test)
        k = min(k, self.fitted.n)
        parts: list[TopK] = []
        for _, _, S in self._score_chunks(queries):  # never the whole [T, N] matrix
            parts.append(TopK.of(S, k, self.task.higher_is_better))
            del S  # before the next chunk is computed
        return TopK.joined(parts, self.fitted.result_dtype)

    @_noting_writes
    def leverages(self) -> Tensor:
        """Generalised leverages h_j = tr(Lambda_j J_j H^{-1} J_j^T) / N, [n_train].

        For C outputs an example, h_j is the sum of the eigenvalues of its leverage block
        ``Lambda_j J_j H^{-1} J_j^T / N``; rif and newton need each eigenvalue below 1 (their
        CurvatureError reports the largest), not the sum. With ``curvature="hessian"`` H is the
        Hessian but the example's block stays its GGN part ``J_j^T Lambda_j J_j`` (its own
        Hessian can be indefinite: a leverage of it could be negative, which is why ``rif``
        refuses the Hessian; docs/estimators.md §4).
        """
        self.fitted.require_unchanged()
        method = self.method
        method.require("leverages")
        return self.fitted.output(method.leverages())

    @_noting_writes
    def input_influence(self, test: Any, indices: Sequence[int] | Tensor) -> Tensor:
        """Koh & Liang's input-perturbation influence, [n_test, len(indices), *x_shape].

        Entry [t, j] is the gradient of test measurement m_t, after retraining, with respect to
        training input x_j: ``-(1/N) d/dx_j (H^{-1} grad m_t)^T grad_theta l_j(x_j)``. Moving x_j
        by a small delta changes m_t by about ``<entry, delta>``: the basis of training-set
        attacks. It is the first-order (IF) derivative, whatever the estimator.
        """
        self.fitted.require_unchanged()
        result = decompositions.input_influence(
            self.method, self.fitted, self._queries(test), indices
        )
        return self.fitted.output(result)

    @_noting_writes
    def module_scores(self, test: Any) -> dict[str, Tensor]:
        """IF scores split by module: module name -> [n_test, n_train], summing to ``scores``.

        See :func:`infkit.decompositions.per_module_scores` (docs/decompositions.md §1).
        """
        self.fitted.require_unchanged()
        queries = self._checked_queries(test)
        parts = decompositions.per_module_scores(self.method, self.fitted, queries, self._estimator)
        return {name: self.fitted.output(s) for name, s in parts.items()}

    @_noting_writes
    def token_scores(
        self,
        test: Any,
        indices: Sequence[int] | Tensor | None = None,
        positions: int | None = None,
    ) -> TokenScores:
        """Per-position contributions of training sequences to the IF scores.

        ``result.tokens[t, j, s]`` is position s of training sequence ``indices[j]``;
        ``result.total`` equals ``scores(test)[:, indices]`` (docs/decompositions.md §2).
        ``positions`` picks the layers decomposed by position: those that see that many
        positions per example (default: the largest count, a language model's sequence
        length); the others' share is ``result.rest``. The count is of a layer's positions over
        all its calls in a forward pass: a layer applied k times to sequences of T positions (the
        shared layers of ALBERT) sees k T, and its axis s runs call by call (s = call T +
        position); pass ``positions=T`` to decompose the layers that see the sequence once.
        """
        self.fitted.require_unchanged()
        return decompositions.per_token_scores(
            self.method,
            self.fitted,
            self._checked_queries(test),
            self._estimator,
            indices,
            positions,
        )

    @_noting_writes
    def batched_scores(
        self,
        test: Any,
        rank: int = 32,
        refine: int = 0,
        svd: Svd = "exact",
        indices: Sequence[int] | Tensor | None = None,
    ) -> Tensor:
        """IF scores [n_test, n] from rank-``rank`` preconditioned queries (query batching).

        ``refine`` rescores the ``refine`` strongest proponents and opponents of each query at
        full rank (docs/decompositions.md §4).
        """
        self.fitted.require_unchanged()
        scores = decompositions.batched_scores(
            self.method,
            self.fitted,
            self._checked_queries(test),
            self._estimator,
            rank,
            refine,
            svd,
            indices,
        )
        return self.fitted.output(scores)

    # ------------------------------------------------------------------ plan
    def _check_sequence_length(self, sequence_length: int | None) -> None:
        """Refuse a planned ``sequence_length`` that the model's learned position embedding
        cannot read, as ``fit`` refuses such sequences (the data's own are checked there)."""
        if sequence_length is None or self.task.name != "language_modeling":
            return
        positions = lm.learned_positions(self.task.model)
        if positions is not None and sequence_length > positions:
            raise InvalidInputError(
                f"plan(sequence_length={sequence_length}): the model's position embedding holds "
                f"{positions} positions (its configuration's n_positions / "
                "max_position_embeddings) and a sequence reads one a token, so fit would refuse "
                f"such sequences: plan at most {positions} tokens (truncate the data to them); "
                "for sequences padded wider that carry their own positions "
                "(examples(..., position_ids=True)), give plan the data itself"
            )

    @one_at_a_time
    def plan(
        self,
        train: Any = None,
        test: Any = None,
        *,
        n_train: int | None = None,
        n_queries: int | None = None,
        sequence_length: int | None = None,
        world_size: int = 1,
        timed: bool = True,
    ) -> Plan:
        """What ``fit`` and ``scores`` will do, before they run (docs/methods/language_models.md §6).

        Passes over the data, bytes per stage and process, the largest object and, when the model
        is real and ``timed``, the time from one timed forward and backward pass of a batch.
        Give the data, or for a model on the meta device (no weights) its size: ``n_train``,
        ``n_queries`` and ``sequence_length``. After ``fit``, the fitted training set is the
        default, and ``inf.plan(test=queries)`` plans scoring them: the fit's stages are listed
        as run already (:attr:`~infkit.plan.Stage.done`), what they hold counted, their passes
        and time not. Needs a named method (not ``"auto"``).
        """
        if self._method is None:
            raise UnsupportedError("plan needs a named method; method='auto' chooses at fit")
        world_size = _count("world_size", world_size)
        n_train = None if n_train is None else _count("n_train", n_train)
        n_queries = None if n_queries is None else _count("n_queries", n_queries)
        sequence_length = (
            None if sequence_length is None else _count("sequence_length", sequence_length)
        )
        method = self._method
        model = self.task.model
        space = self._attributed_space(method, ParameterSpace(model))
        more_queries = train is None and n_train is None and self._fitted is not None
        if more_queries:
            train = self.fitted.train  # (what fit took: its plan for more queries)
        examples = None if train is None else ExampleSet(train, name="training set")
        training = (
            "the fitted training set (plan() after fit plans it)"
            if more_queries
            else ("the training data given")
        )
        clashes = [
            f"{name} beside {where}"
            for name, value, where, data in (
                ("n_train", n_train, training, examples),
                ("sequence_length", sequence_length, training, examples),
                ("n_queries", n_queries, "the test set given", test),
            )
            if value is not None and data is not None
        ]
        if clashes:  # (data and sizes together were mixed: N of the data, T of the argument)
            raise InvalidInputError(
                f"plan takes the data or their sizes, not both: {'; '.join(clashes)}. Leave "
                "the sizes out to plan those data, or the data out to plan these sizes (after "
                "fit, n_train= with sequence_length= plans other training sizes)"
            )
        if examples is None and (n_train is None or sequence_length is None):
            given = {"n_train": n_train, "sequence_length": sequence_length}
            missing = ", ".join(name for name, value in given.items() if value is None)
            raise InvalidInputError(
                "plan needs the training data, inf.plan(train, test) (after fit, the fitted "
                "set: inf.plan(test=queries)); or, for a model on the meta device (no weights: "
                "a size to plan before renting the machines), inf.plan(n_train=..., "
                "n_queries=..., sequence_length=...), here without "
                f"{missing}: sequence_length is the positions of one example, the tokens of a "
                "sequence (1 for a model of vectors, an MLP or a CNN)"
            )
        n = len(examples) if examples is not None else int(n_train or 0)
        q = len(ExampleSet(test, name="test set")) if test is not None else int(n_queries or 1)
        tokens, unit = (
            (sequence_length or 1, "tokens")
            if sequence_length or examples is None
            else examples.positions_and_unit()
        )
        self._check_sequence_length(sequence_length)
        # the largest batch a pass holds: a batch_size beyond the data fills none (a tester's
        # batch_size=1000 on 64 sequences was planned, and budgeted, 15x over)
        batch = min(self.batch_size, max(n, q))  # (torchrun deals whole batches: not N / K)
        itemsize = torch.empty(0, dtype=space.dtype).element_size()
        model_bytes = sum(t.numel() * t.element_size() for t in model.parameters()) + sum(
            t.numel() * t.element_size() for t in model.buffers()
        )
        if more_queries:  # (whether fit kept the cache, not whether it would)
            cached = self.fitted.train_gradients is not None
        else:
            cached = type(method).uses_training_gradients and gradient_cache_fits(
                n, space.size, space.dtype, self.memory_limit, batch
            )
        sample = _sample_inputs(self.task, space, examples)
        committed = None
        if examples is not None and space.device.type != "meta" and not more_queries:
            engine = PerExample(self.task, space, self.per_example_mode)
            # as fit probes a pass first: what it writes is no part of the factors' identity
            probe_forward_writes(engine, examples)
            committed = method.committed_fit(engine, examples, self.batch_size)
        shape = RunShape(
            n_train=n,
            n_queries=q,
            tokens=tokens,
            outputs=_outputs_per_example(self.task, sample, tokens),
            batch_size=batch,
            world_size=world_size,
            parameters=space.size,
            itemsize=itemsize,
            model_bytes=model_bytes,
            memory_limit=self.memory_limit,
            sample_inputs=sample,
            gradient_cache=cached,
            workdir=self.workdir is not None,
            committed=committed,
            precision=dtype_name(space.dtype)
            + (
                ""
                if self.task.autocast is None
                else f", passes under autocast {dtype_name(self.task.autocast)}"
            ),
            parameter_dtype=space.dtype,
            autocast=self.task.autocast is not None,
            unit=unit,
        )
        stages = method.stages(shape, self.task, space)
        if self.checks:
            scale, energy = method.runs_checks(self.damping, n, cached)
            products = diagnostics.check_products(n, scale, energy)
            if products:
                # the energy ratio's directions, answers, products and a batch product's
                # working memory; else the scale check's
                held = diagnostics.check_bytes(
                    space.size,
                    shape.outputs,
                    shape.pass_batch_size,
                    itemsize,
                    self.memory_limit,
                    energy=bool(energy),
                )
                directions = (
                    diagnostics.PROBE_DIRECTIONS if energy else diagnostics.SCALE_DIRECTIONS
                )
                probes = directions * space.size * FLOAT64_BYTES
                checks = Stage(
                    CHECKS_STAGE,
                    # every process runs them whole: passes of its share of the batches
                    round(
                        products * diagnostics.PRODUCT_PASS_COST * shape.whole_passes / max(n, 1), 2
                    ),
                    held,
                    ("probe directions, float64", probes),
                    f"{products:,} curvature products of single examples (checks=False skips them)",
                    # the energy ratio solves its probe directions with the method
                    float64_flops=diagnostics.PROBE_DIRECTIONS
                    * method.solve_flops(self.task, space)
                    if energy
                    else 0.0,
                )
                _before_queries(stages, checks)  # they run at the end of fit
            query_sample = method.query_check_sample(
                self.damping, n, cached, always=self.checks == "queries"
            )
            if query_sample:
                first = min(q, diagnostics.QUERY_DIRECTIONS)
                # every scores() call, before its queries (once a direction: the same queries
                # again cost their gradients only)
                _before_queries(
                    stages,
                    Stage(
                        "queries' check",
                        round(
                            query_sample * diagnostics.PRODUCT_PASS_COST * shape.whole_passes / n, 2
                        ),
                        diagnostics.query_check_bytes(
                            space.size,
                            shape.outputs,
                            shape.pass_batch_size,
                            itemsize,
                            self.memory_limit,
                        )
                        + batch_gradient_bytes(shape),
                        ("the direction, its answer and product, float64", 3 * space.size * 8),
                        f"{query_sample:,} curvature products of single examples a scores() "
                        f"call, along the first {first} queries' gradients (checks=False skips "
                        "them)",
                        float64_flops=method.solve_flops(self.task, space),
                    ),
                )
        if more_queries:  # the fit's stages ran: what they hold stays, their passes do not
            stages = mark_fitted(stages)
        out = Plan(method.name, shape, stages, remedy=method.plan_advice(stages))
        if timed and examples is not None and space.device.type != "meta":
            out.seconds_per_batch = _time_batch(self.task, space, examples, self.batch_size)
            if out.flops:
                out.flops_per_second = _product_rate(product_dtype(space.dtype), space.device)
            if out.float64_flops:
                out.float64_flops_per_second = _product_rate(torch.float64, space.device)
        return out

    def describe(self) -> dict[str, Any]:
        """The settings and diagnostics of this fit, for reports."""
        fitted = self.fitted
        return {
            **self.method.describe(),
            "estimator": self.estimator,
            "l2": self.l2,
            "damping": "auto" if self.auto_damping else self.damping,
            "batch_size": self.batch_size,
            "device": str(fitted.space.device),
            "dtype": dtype_name(fitted.space.dtype),
            "autocast": None if self.task.autocast is None else dtype_name(self.task.autocast),
            "n_train": fitted.n,
            "n_params": self.n_params,
            "stationarity": fitted.stationarity,
            **({"auto": self._choice.record()} if self._choice is not None else {}),
            **({"loaded_from": str(self._loaded_from)} if self._loaded_from is not None else {}),
        }

    def __repr__(self) -> str:
        state = "fitted" if self._fitted is not None else "not fitted"
        name = self._method.name if self._method is not None else self.method_name
        return f"Influence(method={name!r}, estimator={self.estimator!r}, l2={self.l2:g}, {state})"


def _before_queries(stages: list[Stage], stage: Stage) -> None:
    """Insert ``stage`` before the plan's "queries" stage (at the end where there is none)."""
    names = [s.name for s in stages]
    stages.insert(names.index("queries") if "queries" in names else len(stages), stage)


def _estimator(name: str, relatif: str) -> Estimator:
    if name not in ESTIMATORS:
        raise UnsupportedError(
            f"unknown estimator {name!r}; valid estimators: {', '.join(ESTIMATORS)}"
        )
    if relatif not in RELATIF_NORMS:
        raise UnsupportedError(
            f"unknown relatif norm {relatif!r}; use one of {', '.join(RELATIF_NORMS)}"
        )
    return Estimator(name, relatif)  # both checked above


def _require_finite_scores(
    scores: Tensor, method: str, named: Callable[[int], str], returned: torch.dtype | None = None
) -> None:
    """Refuse scores [rows, N] holding NaN or Inf, or beyond the range of the dtype they are
    returned in (``returned``, checked by the rows' extremes, not a cast copy), naming the
    first such row (``named``): the method's curvature or kernel overflowed at the model's
    parameters (a weight of 1e306 gave NaN from dual and Inf from exact without a word)."""
    bad = ~torch.isfinite(scores).all(dim=1)
    if returned is not None and torch.finfo(returned).max < torch.finfo(scores.dtype).max:
        largest = torch.finfo(returned).max
        bad |= (scores.amax(dim=1) > largest) | (scores.amin(dim=1) < -largest)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise NonFiniteError(
            f"the scores of {named(row)} hold NaN or Inf: method {method!r}'s solve, curvature "
            "or kernel overflowed at the model's parameters, or the model's outputs or "
            "gradients are not finite there. Check the parameters' size (and the model's "
            "precision), or pass more damping"
        )


def _check_steps(steps: Any) -> None:
    """Refuse a ``steps`` of :meth:`Influence.remove` that is not an integer >= 1."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InvalidInputError(
            f"remove(..., steps=...) must be an integer >= 1 (1: the estimator's step; K > 1: "
            f"K - 1 more Newton steps on the retained objective), got steps={steps!r}"
        )


def _iterating_methods() -> list[str]:
    """The registered methods that can take further Newton steps: those that apply their
    inverse curvature to vectors (``precondition_queries``) and have a curvature."""
    return [
        name
        for name in methods_answering("query_batching")
        if method_class(name).curvature != "identity"
    ]


def _require_newton_iteration(method: Method, steps: int) -> None:
    """Raise UnsupportedError when ``method`` cannot take the Newton steps of ``steps > 1``."""
    if method.answers("query_batching") and method.curvature != "identity":
        return
    why = (
        "has no curvature (H = I): its steps would be plain gradient steps"
        if method.curvature == "identity"
        else f"does not apply its inverse curvature to vectors{method._why_not('query_batching')}"
    )
    able = ", ".join(repr(m) for m in _iterating_methods()) or "none"
    raise UnsupportedError(
        f"remove(..., steps={steps}) takes Newton steps with the method's curvature refitted at "
        f"each iterate, and method {method.name!r} {why}; methods that can: {able}. Or use "
        "steps=1"
    )


def _retained_gradient(
    engine: PerExample, retained: ExampleSet, l2: float, anchor: Tensor | None, batch_size: int
) -> Tensor:
    """``grad L_R(theta)`` [P] float64 at the parameters of ``engine``'s model: the mean loss
    gradient over the ``retained`` examples plus ``l2 (theta - theta')``, theta' = ``anchor``."""
    task, space = engine.task, engine.space
    with evaluation_mode(task.model):
        _, mean = objective_and_gradient(
            task, space, retained, 0.0, chunk=batch_size, engine=engine
        )
    theta = space.flat().to(torch.float64)
    shift = theta if anchor is None else theta - anchor.to(theta)
    return mean.to(torch.float64) + l2 * shift


def _sample_inputs(task: Task, space: ParameterSpace, examples: ExampleSet | None) -> Any:
    """The model inputs of the first training example, for a plan on a real model (None for a
    model on the meta device or a plan from sizes only)."""
    if examples is None or space.device.type == "meta":
        return None
    return PerExample(task, space).prepare(examples.take([0]))[0]


def _outputs_per_example(task: Task, inputs: Any, tokens: int) -> int:
    """C, the outputs of one example (T x V for a language model): from a forward pass of
    the sample ``inputs`` when there are some; else of one sequence of ``tokens`` token ids
    (zeros) where the model takes them (on the meta device a pass computes shapes alone: a
    causal LM under a task of the user's, a token classifier's T x labels; a model with weights
    is passed a few short sequences, and C extrapolated where it is affine in T); else from its
    configuration's sizes (:func:`~infkit.plan.sized_outputs`)."""
    model = task.model
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def outputs(given: Any) -> int:
        # (on the meta device, so is what the pass creates without naming one: arange)
        where = torch.device("meta") if device.type == "meta" else contextlib.nullcontext()
        with torch.no_grad(), evaluation_mode(model), where:
            return task.call_model(model, given).numel()

    if inputs is not None:
        return outputs(inputs)

    def of_length(length: int) -> int:
        return outputs(torch.zeros(1, length, dtype=torch.long, device=device))

    try:
        if device.type == "meta" or tokens <= 64:  # (shapes alone, or a short pass)
            try:
                return of_length(tokens)
            except Exception:
                vector = _vector_input(model, device)
                if vector is None:
                    raise
                # (a tester's meta MLP of 8 features, 3 classes, was sized 1 output an example)
                return outputs(vector)
        # a model with weights: C = a + b T (per position, b; pooled, a) from two short
        # passes, checked on a third, not T positions' outputs allocated to count them; a
        # model whose outputs are not so (padded to a multiple, a T x T map) takes the pass
        lengths = (17, 33, 50)
        c1, c2, c3 = (of_length(length) for length in lengths)
        slope = (c2 - c1) / (lengths[1] - lengths[0])
        if c1 + slope * (lengths[2] - lengths[0]) == c3 and slope == int(slope):
            return int(c1 + slope * (tokens - lengths[0]))
        return of_length(tokens)
    except Exception:  # (inputs of another kind: the sizes tell)
        if not has_sizes(model):
            # (a reviewer's meta CNN of 100 classes was planned 1 output an example, unsaid)
            warn(
                f"plan could not size one example's outputs from sizes alone (a pass of token "
                f"ids or of vectors did not go through the model, and it has no configuration's "
                f"num_labels or vocab_size): it counts {tokens} (sequence_length), which may be "
                "low; a plan of the data itself, or of the model with its weights, sizes them "
                "by a pass",
                Notice,
            )
        return sized_outputs(model, tokens, task.name == "language_modeling")


def _vector_input(model: nn.Module, device: torch.device) -> Tensor | None:
    """One example for a model of feature vectors, ``[1, d]`` zeros with d the first
    ``nn.Linear``'s inputs (an MLP's), or None without one: the plan sizes its outputs by a pass
    of it where token ids do not go through."""
    first = next((m for m in model.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        return None
    return torch.zeros(1, first.in_features, dtype=first.weight.dtype, device=device)


def _product_rate(dtype: torch.dtype, device: torch.device, size: int = 512) -> float:
    """Floating-point operations per second of a [size, size] matrix product in ``dtype`` on
    ``device`` (the best of a few, the first warming up), for the plan's product time."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        (a @ a).sum().item()  # item(): wait for an asynchronous device
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / max(best, 1e-9)


def _time_batch(task: Task, space: ParameterSpace, examples: ExampleSet, batch_size: int) -> float:
    """Seconds of one forward and backward pass of the summed loss over one batch (the second
    of two, the first warming up)."""
    engine = PerExample(task, space)
    batch = examples.take(torch.arange(min(batch_size, len(examples))))
    params = dict(task.model.named_parameters())
    seconds = 0.0
    for _ in range(2):
        start = time.perf_counter()
        inputs, targets = engine.prepare(batch)
        with torch.enable_grad():
            loss = task.checked_loss(task.call_model(task.model, inputs), targets).sum()
            # a parameter the loss does not reach (a pooler the head never reads) has no gradient
            torch.autograd.grad(loss, [params[n] for n in space.names], allow_unused=True)
        seconds = time.perf_counter() - start
    return seconds
