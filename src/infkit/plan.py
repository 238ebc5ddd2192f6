"""The plan of a run before it starts: passes over the data, bytes per stage, time.

:meth:`infkit.Influence.plan` asks the method for its :class:`Stage` list for a :class:`RunShape`
(how many training and query examples, their length in tokens, the batch size, how many
processes share the work) and, when the model is real (not on PyTorch's meta device), times one
forward and backward pass of a batch to estimate the time. A model built on the meta device from
a configuration (``with torch.device("meta"): AutoModelForCausalLM.from_config(config)``) gets the
same plan without any weight allocated: how large a run would be on machines you do not have
(docs/methods/language_models.md §6).

Bytes are per process; the layout they assume is the method's, as a run under ``torchrun`` holds
it (the Kronecker methods: every pass over the data split by batches across processes; the
factors, eigenbases, EK-FAC's eigenvalues, the preconditioned queries and the scores whole on every
process; docs/distributed.md §1). The time counts the passes of the fit's own checks too: the
training-gradient cache when it fits and the post-fit checks' curvature products; and the
arithmetic beyond the passes that a method counts from the shapes (:attr:`Stage.flops`: the
Kronecker methods' covariance, rotation and score products and their eigendecompositions) at
the rate of a timed matrix product.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from infkit.errors import Notice, warn
from infkit.memory import batch_output_bytes, default_memory_limit, human_bytes, output_rows

if TYPE_CHECKING:
    import torch


def sized_outputs(model: Any, tokens: int, language_model: bool = True) -> int:
    """C, the outputs of one example of ``tokens`` positions, from sizes alone (a model on the
    meta device): for a language model, ``tokens`` x the configuration's ``vocab_size`` where
    the model has one (a ``transformers`` model); for another task, the configuration's
    ``num_labels`` where it has one (a sequence classifier, whose vocabulary is its inputs');
    else ``tokens``."""
    config = getattr(model, "config", None)
    if language_model:
        vocabulary = getattr(config, "vocab_size", None)
        return tokens * vocabulary if isinstance(vocabulary, int) else tokens
    labels = getattr(config, "num_labels", None)
    return labels if isinstance(labels, int) and labels > 0 else tokens


def has_sizes(model: Any) -> bool:
    """Whether ``model``'s configuration gives :func:`sized_outputs` a size of its own
    (``num_labels`` or ``vocab_size``), not the positions alone."""
    config = getattr(model, "config", None)
    return any(isinstance(getattr(config, k, None), int) for k in ("num_labels", "vocab_size"))


def dealt_examples(n: int, batch_size: int, rank: int, size: int) -> int:
    """How many of ``n`` examples in batches of ``batch_size`` process ``rank`` of ``size``
    holds when the batches are dealt in turn (batch b to process b mod size, as
    :func:`infkit.distributed.shard_batches` deals them), in closed form: a plan of a
    pretraining's N looped over every batch (1e12 examples, over 100 s)."""
    total = -(-n // batch_size)
    if rank >= total:
        return 0
    held = -(-(total - rank) // size) * batch_size
    if (total - 1) % size == rank:  # the data's last batch, short, is this process's
        held -= total * batch_size - n
    return held


def counted(count: int, unit: str) -> str:
    """``count`` and its plural ``unit`` (``"tokens"``, ``"positions"``), singular for 1."""
    return f"{count:,} {unit.removesuffix('s') if count == 1 else unit}"


@dataclass(frozen=True)
class RunShape:
    """The size of a run.

    Attributes:
        n_train: training examples N.
        n_queries: query examples Q.
        tokens: positions per example T (1 for non-sequence models), as the data's shape
            gives them (:meth:`infkit.data.ExampleSet.positions`).
        outputs: flattened outputs per example C (T x V for a language model).
        batch_size: examples per batch.
        world_size: processes sharing the work.
        parameters: P, the attributed parameters.
        itemsize: bytes of one number in the model's precision.
        model_bytes: bytes of the model's parameters and buffers.
        memory_limit: the budget of one process in bytes (None: not bounded).
        sample_inputs: one training example's model inputs, for methods that learn the model's
            structure from a forward pass (None: a model on the meta device, or sizes only).
        gradient_cache: whether fit keeps the [N, P] training gradients in memory
            (:func:`infkit.fitted.gradient_cache_fits`, for methods that use them).
        workdir: whether the run commits its artifacts to a workdir (the Kronecker methods
            then score in committed shards, layer by layer, even with the gradient cache).
        committed: what the fit would read back from its store instead of computing
            (:meth:`infkit.methods.Method.committed_fit`: the Kronecker methods' ``"factors"``
            or EK-FAC's ``"first stage"``); None: nothing, or not known (no training data).
        precision: the attributed parameters' dtype and, where the passes run under
            ``torch.autocast``, its dtype, as the plan prints them (``"float32"``,
            ``"float32, passes under autocast bfloat16"``).
        parameter_dtype: the attributed parameters' dtype, that of the curvature products of
            the iterative solvers (None: not known).
        autocast: whether the passes run under ``torch.autocast`` (``dtype=``): the fit then
            takes grad L(theta*) by a pass of its own, in the model's precision.
        unit: what the ``tokens`` positions are, as the plan prints them: ``"tokens"`` for
            token ids (and sizes alone), ``"positions"`` for other data (a sequence of
            vectors, an image's pixels, a signal's first axis after its batch).
    """

    n_train: int
    n_queries: int
    tokens: int
    outputs: int
    batch_size: int
    world_size: int
    parameters: int
    itemsize: int
    model_bytes: int
    memory_limit: int | None = None
    sample_inputs: Any = None
    gradient_cache: bool = False
    workdir: bool = False
    committed: str | None = None
    precision: str = ""
    parameter_dtype: torch.dtype | None = None
    autocast: bool = False
    unit: str = "tokens"

    @property
    def snapshot_bytes(self) -> int:
        """Bytes of the run's copy of theta* (the attributed parameters, in their dtype)."""
        return self.parameters * self.itemsize

    @property
    def batch_output_bytes(self) -> int:
        """A batch's outputs and their gradients while a pass runs the model on it
        (:func:`~infkit.memory.batch_output_bytes`). The model's own activations beside them
        are not counted (the tracked layers' inputs and output gradients are, in the stages
        that take them)."""
        return batch_output_bytes(self.batch_size, self.outputs, self.itemsize)

    @property
    def pass_batch_size(self) -> int:
        """Examples a batch of the passes whose batches infkit chooses (the post-fit checks,
        the objective's pass, the per-example gradients' batches), as the run takes them
        (:attr:`infkit.fitted.Fitted.pass_batch_size`): :attr:`batch_size`, lowered so that a
        batch's outputs take at most a quarter of the memory limit."""
        limit = self.memory_limit or default_memory_limit()
        return output_rows(self.batch_size, self.outputs, self.itemsize, limit)

    @property
    def batches(self) -> int:
        """Batches of training data per process per pass."""
        return -(-self.examples_per_process // self.batch_size)

    @property
    def whole_passes(self) -> float:
        """What a pass over the whole training set costs one process, in its own passes (work
        every process repeats: the gradient cache, the checks): ``world_size`` where each
        process has batches of its own, fewer where processes outnumber the batches (a
        tester's 1,000 processes over 8 batches were planned 10,002 passes)."""
        return -(-self.n_train // self.batch_size) / self.batches

    @property
    def query_batches(self) -> int:
        """Batches of queries, every process computing all of them (their gradients)."""
        return -(-self.n_queries // self.batch_size)

    @property
    def examples_per_process(self) -> int:
        """Training examples the most loaded process (rank 0) reads per pass: torchrun deals
        whole batches in turn (a reviewer's: N / K counted 16 examples where rank 0 of 4 held
        one batch of all 64)."""
        return dealt_examples(self.n_train, self.batch_size, 0, self.world_size)


@dataclass(frozen=True)
class Stage:
    """One step of a run.

    Attributes:
        name: what it does.
        passes: passes over the training data (0 for work without data).
        bytes: the stage's own objects per process, beyond the model, the run's copy of
            theta* (:attr:`RunShape.snapshot_bytes`) and what earlier stages hold (``held``).
        largest: the largest object, and its bytes.
        note: how it is laid out across processes, or what would reduce it.
        refused: the stage cannot meet ``memory_limit`` whatever its bytes say (the run would
            stop there with :class:`~infkit.errors.ProblemTooLargeError`).
        held: of its bytes, those it leaves in memory for every later stage (the [N, P]
            gradient cache, the fitted factors): :meth:`Plan.stage_bytes` adds them to theirs.
        flops: floating-point operations per process beyond its passes' forward and backward
            work (the hooks' covariance and rotation products, the eigendecompositions, the
            score products), counted from the shapes; :attr:`Plan.seconds` prices them at the
            machine's timed product rate.
        float64_flops: floating-point operations taken in float64 whatever the model's
            precision, apart from ``flops`` (the solves of the queries and of the checks on the
            generic path), priced at a timed float64 product's rate (about half float32's on a
            CPU).
        at_most_passes: passes' worth of curvature products an iterative solve may add, up
            to its iteration cap (CG's and ASTRA's ``maxiter``, LiSSA's depth): how many it
            takes depends on the curvature's conditioning, known only as it runs.
        done: run already (the fit's stages, in the plan of more queries after ``fit``): its
            passes, operations and own bytes are not the plan's; what it holds (``held``: the
            factors, the gradient cache) stays for the stages after it.
    """

    name: str
    passes: float
    bytes: int
    largest: tuple[str, int]
    note: str = ""
    refused: bool = False
    held: int = 0
    flops: float = 0.0
    float64_flops: float = 0.0
    at_most_passes: float = 0.0
    done: bool = False


#: the stage of the checks at the end of fit (``checks=False`` skips it)
CHECKS_STAGE = "post-fit checks"
#: the stages that a ``scores()`` call runs, by the names the methods give them; the stages
#: before the first of them are the fit's (:func:`mark_fitted`)
SCORING_STAGES = ("queries' check", "queries", "scores", "reverse passes")


def mark_fitted(stages: list[Stage]) -> list[Stage]:
    """``stages`` with the fit's (those before the first of :data:`SCORING_STAGES`) marked
    :attr:`Stage.done`: the plan of scoring more queries after ``fit``."""
    names = [stage.name for stage in stages]
    first = min((names.index(name) for name in SCORING_STAGES if name in names), default=None)
    if first is None:  # (a method registered elsewhere, its stages named otherwise)
        warn(
            f"the plan's stages ({', '.join(names)}) name none that scoring runs "
            f"({', '.join(SCORING_STAGES)}): the whole run is planned, the fit's stages too",
            Notice,
        )
        return stages
    return [replace(stage, done=True) if k < first else stage for k, stage in enumerate(stages)]


@dataclass
class Plan:
    """The stages of a run, its passes, its peak and (for a real model) an estimate of its time.

    Attributes:
        method: the method's name.
        shape: the run's size.
        stages: in order.
        seconds_per_batch: a timed forward and backward pass of one batch (None: not timed).
        flops_per_second: the rate of a timed matrix product in the model's precision on
            this machine (None: not timed).
        float64_flops_per_second: the same in float64, where stages take float64 operations
            (None: not timed, or none taken).
    """

    method: str
    shape: RunShape
    stages: list[Stage] = field(default_factory=list)
    seconds_per_batch: float | None = None
    flops_per_second: float | None = None
    float64_flops_per_second: float | None = None
    #: what to change when the peak exceeds ``memory_limit`` (the method's levers)
    remedy: str = "attribute fewer parameters or score fewer queries per call"

    @property
    def to_run(self) -> list[Stage]:
        """The stages this plan runs: those not :attr:`Stage.done`."""
        return [s for s in self.stages if not s.done]

    @property
    def passes(self) -> float:
        """Passes over the training data in all."""
        return sum(s.passes for s in self.to_run)

    @property
    def stage_bytes(self) -> list[int]:
        """What the process holds in each stage beyond the model and theta*: the stage's own
        bytes and what the stages before it hold (:attr:`Stage.held`; a stage
        :attr:`Stage.done` holds those alone)."""
        out, held = [], 0
        for stage in self.stages:
            out.append(held + (stage.held if stage.done else stage.bytes))
            held += stage.held
        return out

    @property
    def peak_bytes(self) -> int:
        """The model, the copy of theta*, the largest stage and a batch's outputs with their
        gradients (:attr:`RunShape.batch_output_bytes`: every stage that holds much runs
        batches through the model), per process."""
        largest = max(
            (b for s, b in zip(self.stages, self.stage_bytes, strict=True) if not s.done),
            default=0,
        )
        shape = self.shape
        return shape.model_bytes + shape.snapshot_bytes + largest + shape.batch_output_bytes

    @property
    def peak_stage(self) -> str | None:
        """The name of the stage that holds the most (:attr:`stage_bytes`) of those it runs."""
        running = [
            (b, s.name) for s, b in zip(self.stages, self.stage_bytes, strict=True) if not s.done
        ]
        return max(running, default=(0, None))[1]

    @property
    def within_limit(self) -> bool:
        """Whether the run keeps to ``memory_limit`` (beyond the model): no stage refuses and
        the peak less the model is under the limit (True when there is no limit)."""
        limit = self.shape.memory_limit
        if limit is None:
            return True
        # (a batch's outputs are the model's passes', which the limit does not bound: said
        # apart by __str__)
        shape = self.shape
        over = self.peak_bytes - shape.model_bytes - shape.batch_output_bytes > limit
        return not over and not any(stage.refused for stage in self.to_run)

    @property
    def largest(self) -> tuple[str, int]:
        """The largest single object of the run: of the stages it runs, or kept from one run
        already (a fitted kernel, the factors: at most what that stage holds)."""
        kept = [(s.largest[0], min(s.largest[1], s.held)) for s in self.stages if s.done and s.held]
        candidates = [s.largest for s in self.to_run] + kept
        return max(candidates, key=lambda item: item[1], default=("", 0))

    @property
    def flops(self) -> float:
        """Floating-point operations per process beyond the passes' forward and backward work
        in the model's precision (:attr:`float64_flops` apart)."""
        return sum(s.flops for s in self.to_run)

    @property
    def float64_flops(self) -> float:
        """Floating-point operations per process taken in float64 (:attr:`Stage.float64_flops`)."""
        return sum(s.float64_flops for s in self.to_run)

    @property
    def seconds(self) -> float | None:
        """Estimated time per process: the passes over the training data and the queries'
        batches at the timed batch's pace, :attr:`flops` at the timed product rate and
        :attr:`float64_flops` at the timed float64 rate."""
        if self.seconds_per_batch is None:
            return None
        batches = self.passes * self.shape.batches + self.shape.query_batches
        products = self.flops / self.flops_per_second if self.flops_per_second else 0.0
        rate64 = self.float64_flops_per_second
        solves = self.float64_flops / rate64 if rate64 else 0.0
        return batches * self.seconds_per_batch + products + solves

    @property
    def at_most_passes(self) -> float:
        """Passes' worth of curvature products the iterative solves may add, at most."""
        return sum(s.at_most_passes for s in self.to_run)

    @property
    def at_most_seconds(self) -> float | None:
        """:attr:`seconds` with every iterative solve run to its iteration cap (None: not
        timed)."""
        if self.seconds is None or self.seconds_per_batch is None:
            return None
        return self.seconds + self.at_most_passes * self.shape.batches * self.seconds_per_batch

    def record(self) -> dict[str, Any]:
        """The plan as plain data."""
        return {
            "method": self.method,
            "shape": self.shape.__dict__,
            "stages": [
                {**s.__dict__, "total_bytes": total}
                for s, total in zip(self.stages, self.stage_bytes, strict=True)
            ],
            "passes": self.passes,
            "batch_output_bytes": self.shape.batch_output_bytes,
            "peak_bytes": self.peak_bytes,
            "within_limit": self.within_limit,
            "largest": self.largest,
            "flops": self.flops,
            "float64_flops": self.float64_flops,
            "seconds": self.seconds,
            "at_most_passes": self.at_most_passes,
            "at_most_seconds": self.at_most_seconds,
        }

    def __str__(self) -> str:
        s = self.shape
        head = (
            f"plan of method {self.method!r}: N = {s.n_train:,} examples x {counted(s.tokens, s.unit)}, "
            f"{s.n_queries:,} queries, P = {s.parameters:,}, batch {s.batch_size}, "
            f"{s.world_size} process{'es' if s.world_size > 1 else ''}"
            + (f", {s.precision}" if s.precision else "")
        )
        rows = [head]
        done = [stage for stage in self.stages if stage.done]
        if done:
            kept = sum(stage.held for stage in done)
            rows.append(
                f"  fitted already, not run again: {', '.join(stage.name for stage in done)}"
                + (f" (they hold {human_bytes(kept)} through the stages below)" if kept else "")
            )
        rows.append(f"  {'stage':<28} {'passes':>6} {'bytes/process':>14}  largest object")
        for stage, total in zip(self.stages, self.stage_bytes, strict=True):
            if stage.done:
                continue
            name, size = stage.largest
            rows.append(
                f"  {stage.name:<28} {stage.passes:>6g} {human_bytes(total):>14}  "
                f"{name} ({human_bytes(size)})" + (f"; {stage.note}" if stage.note else "")
            )
        rows.append(
            f"  model {human_bytes(s.model_bytes)}, theta* copy {human_bytes(s.snapshot_bytes)}, "
            f"a batch's outputs and their gradients {human_bytes(s.batch_output_bytes)} "
            f"({s.batch_size} x {s.outputs:,} outputs); peak per process about "
            f"{human_bytes(self.peak_bytes)}; {self.passes:g} passes of {s.batches:,} batches"
        )
        limit = s.memory_limit
        outputs = human_bytes(s.batch_output_bytes)
        # (at batch_size=1 only shorter sequences lower them: the docs' own 1B plan said so)
        lower = (
            "a smaller batch_size lowers them"
            if s.batch_size > 1
            else "at batch_size=1, shorter sequences lower them"
        )
        if not self.within_limit:
            remedy = self.remedy
            if self.peak_stage == CHECKS_STAGE:  # (a tester's: the levers named could not help)
                remedy = f"the {CHECKS_STAGE} hold the peak: checks=False skips them; or {remedy}"
            if s.batch_output_bytes > (limit or 0) // 4:
                remedy += f"; a batch's outputs and their gradients take {outputs}: {lower}"
            rows.append(f"  above memory_limit ({human_bytes(limit or 0)} per process): {remedy}")
        elif limit is not None and self.peak_bytes - s.model_bytes > limit:
            rows.append(
                f"  a batch's outputs and their gradients ({outputs}) take the peak past "
                f"memory_limit ({human_bytes(limit)} per process), which bounds infkit's own "
                f"objects, not the model's forward and backward passes: {lower}"
            )
        if self.seconds is not None:
            seconds = self.seconds
            took = _duration(seconds)
            how = f"{self.seconds_per_batch:.3g} s per batch"
            if self.flops and self.flops_per_second:
                how += (
                    f" and {self.flops / 1e9:,.0f} GFLOP of products at "
                    f"{self.flops_per_second / 1e9:.3g} GFLOP/s"
                )
            if self.float64_flops and self.float64_flops_per_second:
                how += (
                    f" and {self.float64_flops / 1e9:,.0f} GFLOP of float64 solves at "
                    f"{self.float64_flops_per_second / 1e9:.3g} GFLOP/s"
                )
            besides = " besides the iterative solves" if self.at_most_passes else ""
            rows.append(f"  time: about {took}{besides} ({how}, timed)")
        if self.at_most_passes:
            most = self.at_most_seconds
            bound = "" if most is None else f", up to {_duration(most)} in all"
            rows.append(
                f"  iterative solves: up to {self.at_most_passes:,.3g} more passes' worth of "
                f"curvature products{bound} (estimator 'if': 'rif' and 'newton' solve again for "
                "each batch of training examples); how many depends on the curvature's "
                "conditioning (a larger damping or a preconditioner takes fewer)"
            )
        return "\n".join(rows)


def _duration(seconds: float) -> str:
    """Seconds as the plan writes them: ``"42.0 s"``, ``"3.5 min"``, ``"2.1 h"``."""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"
