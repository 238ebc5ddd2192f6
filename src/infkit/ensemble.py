"""Ensembles: the answers of any method averaged over independently trained models.

The scores of one trained non-convex network depend on its random initialisation: models
trained from different seeds reach different optima, and their influence scores differ by more
than any method's approximation error. An :class:`Ensemble` holds one fitted
:class:`~infkit.influence.Influence` per model (all trained on the same training set, with the
same estimator) and answers the facade's questions with the mean over its M members
(docs/ensembles.md §2):

    scores[t, j] = (1/M) sum_m scores_m[t, j]

in the units and sign of every score (docs/conventions.md §5): the predicted change of test
measurement t when training example j is removed and the models retrained, averaged over the
models. :meth:`Ensemble.spread` gives the standard error of that mean across members, the seed
noise that remains in it.

Means are accumulated in float64 with one running sum (or Welford's running mean and squared
deviations for the spread), so at most one member's [T, N] answer is held next to the
accumulators, never M of them.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from infkit.data import ExampleSet, checked_indices, leaves
from infkit.errors import (
    InvalidInputError,
    NotFittedError,
    ProblemTooLargeError,
    UnsupportedError,
    listed,
    warn,
)
from infkit.fingerprint import callable_identity, data_fingerprint
from infkit.influence import Influence, TopK
from infkit.memory import FLOAT64_BYTES, human_bytes, row_chunks
from infkit.options import integer_argument
from infkit.parameters import dtype_name
from infkit.removal import Quantity, RemovalEffect
from infkit.task import Task

logger = logging.getLogger("infkit")

__all__ = ["Ensemble", "EnsembleRemoval"]

#: the options of ``Influence`` that name a directory; each member gets its own subdirectory
_DIRECTORY_OPTIONS = ("workdir", "factors_dir")


class _Running:
    """The running mean (and, when asked, the sum of squared deviations) of equally shaped
    tensors, in float64: Welford's update, one tensor at a time."""

    def __init__(self, spread: bool) -> None:
        self.count = 0
        self.total: Tensor | None = None  # the sum (spread=False) or the running mean
        self.squares: Tensor | None = None  # the sum of squared deviations from the mean
        self.spread = spread

    def add(self, x: Tensor) -> None:
        x = x.detach().to("cpu", torch.float64)  # the facade answers on the CPU
        self.count += 1
        if self.total is None:
            self.total = x.clone()
            if self.spread:
                self.squares = torch.zeros_like(x)
            return
        if self.total.shape != x.shape:
            raise InvalidInputError(
                f"member {self.count - 1} answered with shape {tuple(x.shape)}, the members "
                f"before it with {tuple(self.total.shape)}: the members must share the training "
                "set and the model's output size"
            )
        if not self.spread:
            self.total += x
            return
        assert self.squares is not None
        delta = x - self.total
        self.total += delta / self.count
        self.squares += delta * (x - self.total)

    def mean(self) -> Tensor:
        assert self.total is not None
        return self.total if self.spread else self.total / self.count

    def standard_error(self) -> Tensor:
        """sqrt(sample variance / M), the sample variance with M - 1 in the denominator."""
        assert self.squares is not None
        return (self.squares / ((self.count - 1) * self.count)).sqrt()


class EnsembleRemoval:
    """The predicted effect of removing the training examples ``indices``, averaged over the
    members of an :class:`Ensemble`.

    Each member predicts the change of its own model; the ensemble's prediction is their mean,
    in the units of the quantity asked for. Parameter changes are not comparable across models
    (each model has its own parameters, up to permutations of hidden units), so there is no
    averaged ``params``: each member's :class:`~infkit.removal.RemovalEffect` is in
    :attr:`members`.

    Attributes:
        indices: the removed training indices.
        estimator: the estimator that predicted it.
        members: one :class:`~infkit.removal.RemovalEffect` per member, in the ensemble's order.
    """

    def __init__(
        self, indices: Tensor, estimator: str, members: Sequence[RemovalEffect], dtype: torch.dtype
    ) -> None:
        self.indices = indices
        self.estimator = estimator
        self.members: tuple[RemovalEffect, ...] = tuple(members)
        self._dtype = dtype

    def _average(self, data: Any, which: Quantity, spread: bool) -> _Running:
        running = _Running(spread)
        for effect in self.members:
            predict = {
                "outputs": effect.outputs,
                "loss": effect.loss,
                "measurement": effect.measurement,
            }[which]
            running.add(predict(data))
        return running

    def outputs(self, data: Any) -> Tensor:
        """Mean over the members of the predicted change of the model outputs, [n, C]."""
        return self._average(data, "outputs", False).mean().to(self._dtype)

    def loss(self, data: Any) -> Tensor:
        """Mean over the members of the predicted change of the per-example loss, [n]."""
        return self._average(data, "loss", False).mean().to(self._dtype)

    def measurement(self, data: Any) -> Tensor:
        """Mean over the members of the predicted change of the task's measurement, [n]."""
        return self._average(data, "measurement", False).mean().to(self._dtype)

    def spread(self, data: Any, quantity: Quantity = "measurement") -> Tensor:
        """Standard error of the mean predicted change of ``quantity`` on ``data`` across the
        members: ``sqrt(var_m / M)`` with the sample variance (M - 1); needs two members.

        Args:
            data: the examples whose change is predicted.
            quantity: ``"measurement"``, ``"loss"`` or ``"outputs"``.
        """
        if quantity not in ("outputs", "loss", "measurement"):
            raise InvalidInputError(
                f"quantity must be 'outputs', 'loss' or 'measurement', got {quantity!r}"
            )
        _need_two(len(self.members), "spread")
        return self._average(data, quantity, True).standard_error().to(self._dtype)

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return (
            f"EnsembleRemoval(n_removed={len(self.indices)}, estimator={self.estimator!r}, "
            f"members={len(self.members)})"
        )


class Ensemble:
    """The answers of M fitted ``Influence`` objects, one per independently trained model,
    averaged (docs/ensembles.md).

    Every member must be fitted on the same training set (same examples in the same order:
    training index j is the same example for every member) with the same estimator; the models
    are typically one architecture trained from M random seeds. The methods may differ (their
    scores share units), but one method for all is the usual choice.

    Args:
        members: the fitted ``Influence`` objects, at least one.
        check_data: compare the members' training sets by content (a hash of every input and
            target, one pass over each member's data; :func:`infkit.fingerprint.data_fingerprint`).
            False skips it for very large data sets; the number of examples is always compared.

    Raises:
        InvalidInputError: no member, a member that is not an ``Influence``, members fitted on
            different training sets (count or content), or with measurements that disagree on
            which direction is better.
        NotFittedError: a member that was not fitted.
        UnsupportedError: members with different estimators.

    Example:
        ```python
        tasks = [infkit.Task.classification(model) for model in models]  # one per seed
        ens = Ensemble.fit(tasks, train, method="exact", l2=1e-2)
        S = ens.scores(test)  # [T, N], the mean of the members' scores
        noise = ens.spread(test)  # [T, N], its standard error across the members
        ```
    """

    def __init__(self, members: Sequence[Influence], *, check_data: bool = True) -> None:
        if isinstance(members, Influence):
            raise InvalidInputError(
                "members must be a sequence of fitted Influence objects, got one Influence; "
                "pass [inf] for an ensemble of one"
            )
        if not isinstance(members, Sequence) or isinstance(members, (str, bytes)):
            raise InvalidInputError(
                f"members must be a sequence (a list or tuple) of fitted Influence objects, got "
                f"{type(members).__name__}"
            )
        if len(members) == 0:
            raise InvalidInputError(
                "an ensemble needs at least one member: pass a list of fitted Influence objects, "
                "one per independently trained model, or use Ensemble.fit(tasks, train, ...)"
            )
        for m, member in enumerate(members):
            if not isinstance(member, Influence):
                raise InvalidInputError(
                    f"member {m} is a {type(member).__name__}, not an infkit.Influence; pass "
                    "fitted Influence objects"
                )
            try:
                member.fitted  # noqa: B018  # raises NotFittedError when not fitted
                member.method  # noqa: B018
            except NotFittedError:
                raise NotFittedError(
                    f"member {m} ({member!r}) is not fitted: call .fit(train) on it with the "
                    "ensemble's training set, or build the ensemble with "
                    "Ensemble.fit(tasks, train, ...)"
                ) from None
        self._members: tuple[Influence, ...] = tuple(members)
        self._check(check_data)
        self._dtype = self._members[0].fitted.result_dtype
        for member in self._members[1:]:
            self._dtype = torch.promote_types(self._dtype, member.fitted.result_dtype)

    def _check(self, check_data: bool) -> None:
        """The members answer the same questions about the same training set, in one sign."""
        first = self._members[0]
        n = first.n_train
        estimator = _estimator_label(first)
        identity = callable_identity(first.task.measurement)
        for m, member in enumerate(self._members[1:], start=1):
            if member.n_train != n:
                raise InvalidInputError(
                    f"member {m} was fitted on {member.n_train} training examples, member 0 on "
                    f"{n}: every member must be fitted on the same training set (training index "
                    "j must be the same example for all of them)"
                )
            if _estimator_label(member) != estimator:
                raise UnsupportedError(
                    f"member {m} uses estimator {_estimator_label(member)}, member 0 "
                    f"{estimator}: an ensemble averages one estimator; use "
                    f"member.with_estimator({first.estimator!r}) (no refit) to align them"
                )
            if member.task.higher_is_better != first.task.higher_is_better:
                raise InvalidInputError(
                    f"member {m}'s measurement has higher_is_better="
                    f"{member.task.higher_is_better}, member 0's "
                    f"{first.task.higher_is_better}: the members measure different quantities "
                    "(e.g. a loss and a margin), whose changes cannot be averaged; give every "
                    "member the same measurement"
                )
            if not math.isclose(member.l2, first.l2, rel_tol=1e-9, abs_tol=0.0):
                warn(
                    f"member {m} was fitted with l2={member.l2!r}, member 0 with "
                    f"l2={first.l2!r}: each answers for its own objective, and the ensemble "
                    "averages them as one; fit every member with the l2 its model was trained with "
                    "(one for all, when the models differ only in their seeds)"
                )
            if callable_identity(member.task.measurement) != identity:
                warn(
                    f"member {m} measures {callable_identity(member.task.measurement)}, member "
                    f"0 {identity}: the ensemble averages their changes as one quantity; give "
                    "every member the same measurement unless they are the same function"
                )
        models: dict[int, int] = {}
        for m, member in enumerate(self._members):
            seen = models.setdefault(id(member.task.model), m)
            if seen != m:
                warn(
                    f"members {seen} and {m} attribute the same model object: an ensemble "
                    "averages independently trained models (one per seed), and a repeated model "
                    "counts twice in the mean"
                )
        if not check_data:
            return
        reference = data_fingerprint(first.fitted.train)
        for m, member in enumerate(self._members[1:], start=1):
            if data_fingerprint(member.fitted.train) != reference:
                raise InvalidInputError(
                    f"member {m} was fitted on other training data than member 0 (same number "
                    f"of examples, {n}, but different inputs, targets or order"
                    f"{_precisions(first.fitted.train, member.fitted.train)}): fit every "
                    "member on the same training set, in the same order"
                )

    # ------------------------------------------------------------------ construction
    @classmethod
    def fit(
        cls,
        tasks: Sequence[Task],
        train: Any,
        *,
        check_data: bool = True,
        **influence_kwargs: Any,
    ) -> Ensemble:
        """Fit one ``Influence`` per task (one per independently trained model) on ``train``.

        Args:
            tasks: one task per model, the models trained by you (e.g. from different seeds,
                each with :func:`infkit.train_to_optimum`), at least one.
            train: the training set every model was trained on (any form ``Influence.fit``
                accepts).
            check_data: as for :class:`Ensemble`.
            **influence_kwargs: the arguments of :class:`~infkit.influence.Influence` after
                ``task`` (``method``, ``estimator``, ``l2``, ``damping``, method options, ...),
                the same for every member. A ``workdir`` or ``factors_dir`` is given to the
                members as its subdirectories ``member-0``, ``member-1``, ...: one directory
                holds the artifacts of one fit.

        Returns:
            The ensemble of the fitted members, in the order of ``tasks``.
        """
        if isinstance(tasks, Task):
            raise InvalidInputError(
                "tasks must be a sequence of Task objects, one per trained model; got one Task: "
                "pass [task] for an ensemble of one"
            )
        if not isinstance(tasks, Sequence) or len(tasks) == 0:
            raise InvalidInputError(
                "tasks must be a non-empty sequence of Task objects, one per independently "
                "trained model"
            )
        for m, task in enumerate(tasks):
            if not isinstance(task, Task):
                raise InvalidInputError(
                    f"task {m} is a {type(task).__name__}, not an infkit.Task (e.g. "
                    "Task.classification(model))"
                )
        members = []
        for m, task in enumerate(tasks):
            kwargs = dict(influence_kwargs)
            for key in _DIRECTORY_OPTIONS:
                if kwargs.get(key) is not None:
                    kwargs[key] = str(Path(kwargs[key]) / f"member-{m}")
            logger.info("ensemble: fitting member %d of %d", m + 1, len(tasks))
            members.append(Influence(task, **kwargs).fit(train))
        return cls(members, check_data=check_data)

    # ------------------------------------------------------------------ state
    @property
    def members(self) -> tuple[Influence, ...]:
        """The fitted members, in order."""
        return self._members

    @property
    def n_train(self) -> int:
        """N, the number of training examples (the same for every member)."""
        return self._members[0].n_train

    @property
    def estimator(self) -> str:
        """The members' estimator."""
        return self._members[0].estimator

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the answers: the widest of the members' model dtypes."""
        return self._dtype

    @property
    def memory_limit(self) -> int:
        """The smallest of the members' memory limits, in bytes."""
        return min(member.memory_limit for member in self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        names = sorted({member.method.name for member in self._members})
        method = repr(names[0]) if len(names) == 1 else repr(names)
        return (
            f"Ensemble({len(self)} members, method={method}, estimator={self.estimator!r}, "
            f"n_train={self.n_train})"
        )

    # ------------------------------------------------------------------ questions
    def _average(self, answer: Callable[[Influence], Tensor], spread: bool) -> _Running:
        running = _Running(spread)
        for member in self._members:
            part = answer(member)
            running.add(part)
            del part  # before the next member computes its own
        return running

    def _scores(self, test: Any, among: Sequence[int] | Tensor | None, spread: bool) -> _Running:
        return self._average(lambda member: member.scores(test, among), spread)

    def _check_size(self, test: Any, among: Sequence[int] | Tensor | None, what: str) -> None:
        """Refuse a [T, N] answer whose float64 accumulators would not fit in memory."""
        t = len(ExampleSet(test, name="test set"))
        n = self.n_train
        if among is not None:
            n = len(checked_indices(among, n, what="training index", unique=True))
        # the accumulators, one member's answer and, for the spread, Welford's temporaries
        copies = 4 if what == "spread" else 2
        need = copies * t * n * FLOAT64_BYTES
        if need > self.memory_limit:
            raise ProblemTooLargeError(
                f"the ensemble's {what} for {t:,} test x {n:,} training examples take "
                f"{human_bytes(need)} in float64, above the memory limit of "
                f"{human_bytes(self.memory_limit)}: use top_k (it keeps only the strongest k "
                "per test example), pass fewer test examples at a time, or raise memory_limit"
            )

    def scores(self, test: Any, among: Sequence[int] | Tensor | None = None) -> Tensor:
        """Mean over the members of their removal effects, [n_test, n_train].

        ``scores[t, j]`` predicts the change of test measurement t when training example j is
        removed and every model retrained, averaged over the models.

        Args:
            test: the test examples (any form ``Influence.scores`` accepts).
            among: training indices to score instead of all of them (as for
                ``Influence.scores``): the result is ``[n_test, len(among)]``.
        """
        self._check_size(test, among, "scores")
        return self._scores(test, among, False).mean().to(self._dtype)

    def spread(self, test: Any, among: Sequence[int] | Tensor | None = None) -> Tensor:
        """Standard error of :meth:`scores` across the members, [n_test, n_train].

        ``sqrt(var_m / M)``, the sample variance over the M members (M - 1 in the
        denominator): how far the mean score may be from the mean over many more seeds. A score
        a few standard errors from zero is signal; one within a standard error of zero is seed
        noise. Needs at least two members; computes every member's scores again (use
        :meth:`scores_and_spread` for both).
        """
        return self.scores_and_spread(test, among)[1]

    def scores_and_spread(
        self, test: Any, among: Sequence[int] | Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """:meth:`scores` and :meth:`spread` from one pass over the members."""
        _need_two(len(self), "spread")
        self._check_size(test, among, "spread")
        running = self._scores(test, among, True)
        return running.mean().to(self._dtype), running.standard_error().to(self._dtype)

    def self_scores(self) -> Tensor:
        """Mean over the members of each training example's removal effect on its own loss,
        [n_train]."""
        return self._average(lambda member: member.self_scores(), False).mean().to(self._dtype)

    def self_spread(self) -> Tensor:
        """Standard error of :meth:`self_scores` across the members, [n_train]; needs two."""
        _need_two(len(self), "self_spread")
        running = self._average(lambda member: member.self_scores(), True)
        return running.standard_error().to(self._dtype)

    def top_k(self, test: Any, k: int = 10) -> TopK:
        """The k strongest proponents and opponents of each test example by the mean scores.

        The same conventions as :meth:`infkit.Influence.top_k`: proponents are the helpful
        examples, those with the largest positive scores for a loss measurement and the most
        negative ones for a measurement where higher is better (a margin). The test examples
        are taken in chunks, so the [T, N] mean is never held whole when it is large.
        """
        k = integer_argument("k", k, 1)
        queries = ExampleSet(test, name="test set")
        t, n = len(queries), self.n_train
        k = min(k, n)
        helpful_sign = self._members[0].task.helpful_sign
        row_bytes = 2 * n * FLOAT64_BYTES  # the running sum and one member's rows
        chunks = row_chunks(t, row_bytes, t * n * FLOAT64_BYTES, self.memory_limit)
        parts: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        for start, stop in chunks:
            part = queries if stop - start == t else queries.part(torch.arange(start, stop))
            S = self._scores(part, None, False).mean()
            helpful = helpful_sign * S
            pro = helpful.topk(k, dim=1).indices
            con = (-helpful).topk(k, dim=1).indices
            parts.append((pro, S.gather(1, pro), con, S.gather(1, con)))
            del S, helpful  # before the next chunk is computed
        return TopK(
            proponent_indices=torch.cat([p[0] for p in parts]),
            proponent_scores=torch.cat([p[1] for p in parts]).to(self._dtype),
            opponent_indices=torch.cat([p[2] for p in parts]),
            opponent_scores=torch.cat([p[3] for p in parts]).to(self._dtype),
        )

    def module_scores(self, test: Any) -> dict[str, Tensor]:
        """Mean over the members of their per-module scores (:meth:`Influence.module_scores`),
        module name -> [n_test, n_train]: they sum to :meth:`scores` as each member's do.

        Raises:
            InvalidInputError: members whose scores split into different modules (other
                architectures, other tracked layers): their shares have no common key.
        """
        sums: dict[str, Tensor] = {}
        first: list[str] = []
        for m, member in enumerate(self._members):
            with _naming_member(m):
                parts = member.module_scores(test)
            if m == 0:
                first = list(parts)
            elif set(parts) != set(first):
                missing, extra = sorted(set(first) - set(parts)), sorted(set(parts) - set(first))
                raise InvalidInputError(
                    f"member {m}'s scores split into other modules than member 0's (missing: "
                    f"{listed([repr(x) for x in missing], 4) or 'none'}; not in member 0's: "
                    f"{listed([repr(x) for x in extra], 4) or 'none'}): the mean of per-module "
                    "scores needs members of one architecture tracking the same layers; "
                    "average each member's module_scores yourself over the modules they share"
                )
            for name, part in parts.items():
                part64 = part.to(torch.float64)
                sums[name] = part64 if name not in sums else sums[name].add_(part64)
            del parts
        return {name: (sums[name] / len(self)).to(self._dtype) for name in first}

    def with_estimator(self, estimator: str, relatif: str | None = None) -> Ensemble:
        """The same members answering with another estimator (each member's
        :meth:`Influence.with_estimator`: its fit reused, no pass over the data)."""
        members = []
        for m, member in enumerate(self._members):
            with _naming_member(m):
                members.append(member.with_estimator(estimator, relatif))
        return Ensemble(members, check_data=False)  # (the same training sets, checked once)

    def remove(self, indices: Sequence[int] | Tensor, *, steps: int = 1) -> EnsembleRemoval:
        """Predicted effect of removing the training examples ``indices`` jointly, averaged
        over the members: ``.loss(data)``, ``.outputs(data)``, ``.measurement(data)``, and
        each member's :class:`~infkit.removal.RemovalEffect` in ``.members``. ``steps``
        is :meth:`Influence.remove`'s, taken by each member (``steps=K > 1``: K - 1 Newton
        steps on each member's retained objective after its one-step answer)."""
        effects = [member.remove(indices, steps=steps) for member in self._members]
        return EnsembleRemoval(effects[0].indices, self.estimator, effects, self._dtype)

    def describe(self) -> dict[str, Any]:
        """The ensemble's size and settings, and each member's ``describe()``."""
        methods = sorted({member.method.name for member in self._members})
        return {
            "n_members": len(self),
            "method": methods[0] if len(methods) == 1 else methods,
            "estimator": self.estimator,
            "n_train": self.n_train,
            "dtype": dtype_name(self._dtype),
            "members": [member.describe() for member in self._members],
        }


@contextlib.contextmanager
def _naming_member(m: int) -> Iterator[None]:
    """A member's refusal (an error of its method's) raised as the ensemble's, naming member
    ``m`` (a reviewer's read as the member's alone, naming neither)."""
    kinds = (InvalidInputError, UnsupportedError, ProblemTooLargeError)
    try:
        yield
    except kinds as error:
        message = f"ensemble member {m}: {error}"
        try:
            named = type(error)(message)
        except TypeError:  # (a subclass that takes more than a message: its base's kind)
            named = next(kind for kind in kinds if isinstance(error, kind))(message)
        raise named from error


def _need_two(m: int, what: str) -> None:
    if m < 2:
        raise InvalidInputError(
            f"{what} is the standard error across the members and needs at least two; this "
            f"ensemble has {m}"
        )


def _estimator_label(member: Influence) -> str:
    if member.estimator == "relatif":
        return f"'relatif' ({member.relatif!r})"
    return repr(member.estimator)


def _precisions(reference: ExampleSet, other: ExampleSet) -> str:
    """Where two sets' first examples hold tensors of other dtypes, saying so: the fingerprint
    reads the dtypes, and a set cast to another precision holds other numbers (a tester's
    float32 copy of a float64 set, for a float32 member beside a float64 one, which takes the
    float64 set as it is)."""
    ours, theirs = (
        [dtype_name(t.dtype) for t in leaves(examples.take([0]).inputs)]
        + [dtype_name(t.dtype) for t in leaves(examples.take([0]).targets)]
        for examples in (reference, other)
    )
    if ours == theirs:
        return ""
    return (
        f"; its tensors are {', '.join(theirs)} where member 0's are {', '.join(ours)}: give "
        "every member the same tensors (a float32 model takes float64 data as it is)"
    )
