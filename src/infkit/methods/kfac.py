"""method="kfac": the layerwise Kronecker-factored GGN, inverted in its eigenbasis.

The curvature itself, its factors, damping and storage are
:class:`infkit.kfac.curvature.KroneckerCurvature` (docs/methods/kfac.md); this method applies its
inverse and gets the estimators from :class:`~infkit.methods.base.PrimalMethod`. Damping:
``damping`` (the facade's) is absolute and shared by all blocks; ``damping_scale=0.1`` (or the
facade's ``damping="auto"``) adds kronfluence's per-module heuristic ``0.1 x mean(Lambda_l)``.
Trainable parameters outside tracked layers (LayerNorm, embeddings, ...): ``unsupported="skip"``
(default) leaves them out of the attribution with a notice naming them, as kronfluence does (as
if frozen); ``"error"`` refuses with their names; ``"identity"`` gives them only the
``l2 + damping`` ridge.

With the facade's ``workdir``, streamed scores are committed shard by shard and resume after a
crash (:mod:`infkit.shards`); :attr:`KFAC.shard_part` restricts a run to one part of an array
job.

RIF and the Newton step downdate each example's exact curvature block from K-FAC's approximate
one: an approximation on top of an approximation (docs/estimators.md §10).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from infkit.data import ExampleSet
from infkit.distributed import STORE_HINT, agree, sum_across, world
from infkit.errors import NotFittedError, Notice, ProblemTooLargeError, warn
from infkit.estimators import Estimator
from infkit.fingerprint import data_fingerprint, task_fingerprint, tensor_digest
from infkit.fitted import Fitted, gradient_cache_bytes
from infkit.gradients import PerExample
from infkit.kfac.curvature import (
    KroneckerCurvature,
    KroneckerOptions,
    attributed_parameters,
    check_hooks_see_every_use,
    committed_factors,
    factor_fitter,
    kronecker_layers,
    reads_bases_back,
)
from infkit.kfac.factors import auto_fisher
from infkit.kfac.streaming import (
    WORKING_FACTOR,
    CallResult,
    LayerQueries,
    StreamingScorer,
    budget_after,
    fixed_rank_groups,
    kept_at_rank,
    low_rank_groups,
    plan_groups,
    preferred_batch,
    query_budget,
    rank_bytes,
    read_budget,
    smaller_batches,
    truncated_svd,
)
from infkit.kfac.work import KroneckerWork, backward_flops, block_rotation_flops
from infkit.layers.capture import input_layout, position_count
from infkit.layers.tracked import TrackedLayers, TrackedModule, find_modules
from infkit.memory import FLOAT64_BYTES, batch_output_bytes, default_memory_limit, human_bytes
from infkit.methods.base import (
    KRONECKER,
    Fidelity,
    PrimalMethod,
    Problem,
    autocast_gradient_stage,
    batch_gradient_bytes,
    register,
)
from infkit.parameters import ParameterSpace, product_dtype
from infkit.plan import RunShape, Stage, counted
from infkit.shards import QUERIES, SCORES, ScoreShards
from infkit.store import ArtifactStore
from infkit.task import Task

logger = logging.getLogger("infkit")


@register
class KFAC(PrimalMethod):
    """K-FAC: layerwise Kronecker-factored GGN ``S (x) A``, inverted in its eigenbasis."""

    name = "kfac"
    summary = (
        "layerwise Kronecker-factored GGN (K-FAC), Linear/Conv1d/Conv2d/Conv1D; scales to LLMs"
    )
    Options = KroneckerOptions
    questions = KRONECKER
    scales = True
    supports_auto_damping = True
    stationarity_pass = False
    shards_scores = True
    checks_scale = True  # describe() reports energy_ratio
    plan_remedy = (
        "track fewer layers (modules=), set query_rank, or use a smaller batch_size (more "
        "processes split the passes, not these bytes)"
    )
    fidelity = Fidelity(
        rtol=None, min_correlation=0.75, removal_correlation=0.5, scale=(0.8, 4.0), damping=0.1
    )
    #: whether the eigenvalues are EK-FAC's corrected ones
    corrected: ClassVar[bool] = False
    #: the counters describe() reports; :meth:`state` adds the Kronecker curvature
    fitted_state = (
        "query_rank",
        "query_kept_energy",
        "query_groups",
        "queries_on_disk",
        "shard_tally",
    )
    options: KroneckerOptions

    def __init__(self, options: KroneckerOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.curvature_: KroneckerCurvature | None = None
        #: the lowest rank of the preconditioned query gradients so far (None: always full)
        self.query_rank: int | None = None
        #: the least share of a query's preconditioned gradient (in a low-rank layer) the rank
        #: kept in this process's calls (None: none at low rank; not saved)
        self.query_kept_energy: float | None = None
        #: the most passes over the training data one scores() call (or a split of its
        #: scores: module_scores, token_scores) took (query groups)
        self.query_groups = 0
        #: the most bytes of preconditioned queries one scores() call kept on disk
        self.queries_on_disk = 0
        #: ``(i, K)``: with a workdir, compute only the score shards of part i of K (an array
        #: job's share; :meth:`infkit.Influence.score_shards`); None: this process's share
        self.shard_part = None
        #: score shards computed and reused from the workdir by the last scores() call
        self.shard_tally = {"computed": 0, "reused": 0}
        #: the smaller scoring batch sizes said so far (:meth:`_scorer`)
        self._smaller_batches_said: set[int] = set()

    def check(self, task: Task, space: ParameterSpace) -> None:
        kronecker_layers(task.model, space, self.options, self.name)

    def attributed_parameters(self, task: Task, space: ParameterSpace) -> list[str] | None:
        return attributed_parameters(task.model, space, self.options, self.name)

    def check_memory(self, problem: Problem) -> None:
        # per layer: A and S (the covariance pass), then their eigenbases in their place (each
        # covariance is freed once decomposed), in the product precision (EK-FAC: + corrected
        # eigenvalues), and the largest layer's float64 eigendecomposition
        modules = None if self.options.modules is None else list(self.options.modules)
        tracked, _ = find_modules(problem.model, problem.space, modules)
        if not tracked:
            return
        item = product_dtype(problem.space.dtype).itemsize
        factor = factor_bytes(tracked, item)
        need = self._fit_bytes(tracked, item)
        if need > problem.memory_limit:
            raise ProblemTooLargeError(
                f"method {self.name!r} keeps two Kronecker factors (then their eigenbases) per layer "
                f"and decomposes each in float64: {human_bytes(need)} for the {len(tracked)} "
                f"tracked layers (the largest: {max(tracked, key=lambda t: factor[t.name]).name!r}"
                f"; the largest eigendecomposition alone {human_bytes(eigh_bytes(tracked))}), above the "
                f"memory limit of {human_bytes(problem.memory_limit)}: track fewer layers "
                "(modules=...), freeze the largest (requires_grad=False), or raise memory_limit"
            )

    def _fit_bytes(self, tracked: list[TrackedModule], item: int) -> int:
        """What the fit must hold whatever the limit, as :meth:`check_memory` counts it before
        any pass: every layer's two factors (then their eigenbases), the largest float64
        eigendecomposition, and EK-FAC's eigenvalues, one per parameter."""
        need = sum(factor_bytes(tracked, item).values()) + eigh_bytes(tracked)
        if self.corrected:
            need += sum(t.cols * t.d_out for t in tracked) * item
        return need

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        layers = kronecker_layers(fitted.task.model, fitted.space, self.options, self.name)
        check_hooks_see_every_use(fitted, layers, self.name)
        self.curvature_ = KroneckerCurvature(
            fitted, self.options, corrected=self.corrected, owner=self.name
        )
        self._check_room_for_queries()

    def _check_room_for_queries(self) -> None:
        """Warn, as soon as the factors are fitted, when the streamed IF scores of even one
        query would refuse under ``memory_limit`` (:meth:`StreamingScorer.room_for_one_query`)
        rather than after the fit, at the first scoring call; the plan foresees it too."""
        if not self._scores_stream():
            return
        n = self.fitted.n
        one = CallResult(n * FLOAT64_BYTES, f"one query's {n} float64 scores")
        reason = self._scorer(one).room_for_one_query()
        if reason is not None:
            # (a tester fitted at the full-rank figure and scored 16 queries a call at rank 1,
            # 30% off: the figures are for one query a call)
            reason += (
                f" (for one query a call: each more query of a call adds its {n} float64 "
                f"scores, {human_bytes(n * FLOAT64_BYTES)}, and may lower the rank; scores() "
                "names the limit for its own call)"
            )
            warn(
                f"{reason}: scores() will refuse (ProblemTooLargeError) even for one query, "
                "and module_scores() and token_scores(), whose results are larger, as plan() "
                "foresees; self_scores() and the removal effects need no queries. Raise "
                "memory_limit (the limits named are those of scoring batches of one example: "
                "with more room the passes take larger ones) or track fewer layers (modules=); "
                "on CPU a factors_dir or workdir lets the scoring pass set the factors aside and "
                "read the queries back from disk"
            )

    def state(self) -> dict[str, Any]:
        return {**super().state(), "curvature": self.kronecker().state()}

    def restore(self, fitted: Fitted, state: Mapping[str, Any]) -> None:
        # (counters that saves written before they were kept lack)
        super().restore(fitted, {"queries_on_disk": 0, "query_kept_energy": None, **state})
        self.curvature_ = KroneckerCurvature.restored(
            fitted, self.options, state["curvature"], corrected=self.corrected, owner=self.name
        )

    def kronecker(self) -> KroneckerCurvature:
        if self.curvature_ is None:
            raise NotFittedError(f"method {self.name!r} is not fitted")
        return self.curvature_

    def tracked_layers(self) -> TrackedLayers:
        return self.kronecker().layers

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        return self.kronecker().solve(V, shift)

    # ------------------------------------------------------------------ streaming answers
    def _generic_scores(self, cached: bool, workdir: bool, others: bool) -> bool:
        """Whether IF scores take the generic path (:func:`infkit.estimators.scores`) rather
        than the layer-by-layer scorer: parameters outside the tracked layers (``others``), or
        the training gradients cached (a small problem: they answer in one product) with no
        query rank and no workdir (whose shards the scorer commits). The run and its plan
        both decide by it."""
        return others or (cached and self.options.query_rank is None and not workdir)

    def _scores_stream(self) -> bool:
        """Whether the IF scores take the layer-by-layer scorer (not the generic path)."""
        fitted = self.fitted
        generic = self._generic_scores(
            fitted.train_gradients is not None,
            fitted.workdir is not None,
            bool(self.kronecker().layers.others),
        )
        return not generic

    def _streams(self, estimator: Estimator) -> bool:
        """Whether the layer-by-layer scorer answers for ``estimator`` (the IF's scores)."""
        return estimator.name == "if" and self._scores_stream()

    def scores_in_shards(self, estimator: Estimator) -> bool:
        return self._streams(estimator)

    def _streaming(
        self, estimator: Estimator, result: CallResult | None = None
    ) -> StreamingScorer | None:
        """The layer-by-layer scorer, when it applies (:meth:`_streams`), with the query budget
        left beside the call's ``result``."""
        if not self._streams(estimator):
            return None
        return self._scorer(CallResult() if result is None else result)

    def _same_call(self, call: str, estimator: Estimator) -> None:
        """Under torchrun, refuse a call whose processes ask for different estimators (or make
        different calls) before any of them takes a path the others do not: the IF's scores
        stream, with sums across processes, and the other estimators' are computed whole by
        each process (a process asking for RelatIF beside one asking for IF finished alone and
        left the other in its sum, then a raw gloo error)."""
        if world()[1] == 1:
            return
        agree(
            f"the {call} of method {self.name!r}",
            {"call": call, "estimator": estimator.name, "relatif": estimator.relatif},
            self.fitted.space.device,
        )

    def _agree(self, call: str, queries: ExampleSet | None, **extra: Any) -> None:
        """Under torchrun, refuse a streamed call whose processes differ in what their sums
        combine (:func:`~infkit.distributed.agree`): the queries, the task (its measurement and
        loss), the settings the scoring pass reads (damping, l2, the memory limit that sets
        the queries' rank and groups, the options) and the call's own arguments (``extra``);
        the factors agreed at fit."""
        if world()[1] == 1:
            return
        fitted = self.fitted
        # (not the ridges: with damping_scale each process computes them from its own
        # eigendecomposition, equal to rounding; the damping and options they come from are
        # compared, and the factors at fit; nor where each process keeps its factors)
        agree(
            f"the {call} of method {self.name!r}",
            {
                "call": call,
                "queries": None if queries is None else data_fingerprint(queries),
                # the measurement the queries' gradients take (a process measuring the margin
                # beside one measuring the loss summed their columns: 2.37 off, no word)
                "task": task_fingerprint(fitted.task),
                "n_train": fitted.n,
                "batch_size": fitted.batch_size,
                "l2": fitted.l2,
                "damping": fitted.damping,
                "memory_limit": fitted.memory_limit,
                "gradient_cache": fitted.train_gradients is not None,
                "options": self.options.shared_record(),
                # (where each keeps them may differ, not whether: a store groups the queries)
                "factors_store": self.options.factors_dir is not None,
                "workdir": fitted.workdir is not None,
                **extra,
            },
            fitted.space.device,
            hints={
                "factors_store": STORE_HINT,
                "workdir": STORE_HINT,
                "part": "under torchrun call scores(), whose processes share the shards; "
                "score_shards(part=) is for arrays of jobs without a process group",
            },
        )

    def _scorer(self, result: CallResult) -> StreamingScorer:
        """The layer-by-layer scorer with the query budget left beside the call's ``result``.

        Where ``memory_limit`` leaves no room for one query beside a scoring pass at the fit's
        batch size (:meth:`StreamingScorer.room_for_one_query`), the scoring passes take
        smaller batches (:func:`smaller_batches`; a pass's working memory grows with its
        batch): the largest that scores the queries at full rank, else the largest that scores
        them at all. A tester's 32,000-word Llama at a quarter of the unbounded peak was
        refused at the fit's 8 sequences a batch, where 4 scored the same numbers within the
        limit. The scores do not depend on the batches (but for rounding); where no batch
        makes room the refusal stands, as the fit's warning says."""
        curvature, fitted = self.kronecker(), self.fitted
        scratch = self._scratch()

        def scorer(batch_size: int) -> StreamingScorer:
            return StreamingScorer(
                fitted,
                curvature,
                query_budget(fitted, curvature, result.nbytes, batch_size),
                self.options.query_rank,
                scratch,
                read_budget(fitted, curvature, result.nbytes, batch_size),
                result,
                batch_size,
            )

        given = min(fitted.batch_size, fitted.n)
        first = scorer(given)
        if fitted.memory_limit is None or first.room_for_one_query() is None:
            return first
        chosen = preferred_batch(
            map(scorer, smaller_batches(given)),
            lambda s: s.room_for_one_query() is None,
            StreamingScorer.at_full_rank,
        )
        if chosen is None:
            # it refuses, naming the limits that hold one query at batches of one example (a
            # reviewer's named those of the fit's batches: 9.8 MiB, where 2.0 MiB scored)
            return scorer(1) if given > 1 else first
        if chosen.batch_size not in self._smaller_batches_said:  # (the fit's check, then a call)
            self._smaller_batches_said.add(chosen.batch_size)
            warn(
                f"memory_limit ({human_bytes(fitted.memory_limit)}) leaves no room for the "
                f"queries beside a scoring pass over batches of {given} (its working memory, "
                "the layers' hook terms and the batch's outputs, grows with the batch): the "
                f"scoring passes take batches of "
                f"{chosen.batch_size}, the same scores at more batches"
                + ("" if chosen.at_full_rank() else ", the queries kept at low rank (SVD)"),
                Notice,
            )
        return chosen

    def _scratch(self) -> Callable[[], Path] | None:
        """Where queries beyond their budget are kept on disk (``queries_on_disk``): a scratch
        directory of the workdir's or factors_dir's store, or of the system's temporary
        directory when forced without either; None: scored in groups instead."""
        choice = self.options.queries_on_disk
        fitted = self.fitted
        place = fitted.workdir if fitted.workdir is not None else self.options.factors_dir
        if not _keeps_queries_on_disk(choice, place is not None, fitted.space.device.type):
            return None
        if place is None:
            return lambda: Path(tempfile.mkdtemp(prefix="infkit-queries-"))
        return lambda: ArtifactStore(place).scratch("queries")

    def scores(self, queries: ExampleSet, estimator: Estimator) -> Tensor:
        self._same_call("scores", estimator)
        scorer = self._streaming(estimator, _scores_result(len(queries), self.fitted.n))
        if scorer is None:
            return super().scores(queries, estimator)
        self._agree("scores", queries, part=self.shard_part)
        shards = self._shards(queries)
        if shards is None or self.shard_part is not None:  # (a part's columns are no result)
            return self._grouped_scores(queries, scorer, shards)
        # the whole result is committed too: the same call again reads it back, no pass. A
        # chunk of a call's queries says where it sits, so that read_scores puts the call's
        # chunks together (a tester read the last 3 of 7 queries as the latest finished run)
        rows = {} if self.query_rows is None else self.query_rows.record()
        info = {"method": self.name, "n_queries": len(queries), "n_train": self.fitted.n, **rows}
        computed = False

        def compute() -> tuple[dict[str, Tensor], dict[str, Any]]:
            nonlocal computed
            computed = True
            return {"scores": self._grouped_scores(queries, scorer, shards)}, info

        tensors, _ = shards.piece(SCORES, rows, compute)
        if not computed:  # read back whole: this process's shards count as reused
            self.shard_tally["reused"] += len(shards.mine()) * len(scorer.groups(len(queries)))
        return tensors["scores"].to(self.fitted.space.device)

    def scores_among(self, queries: ExampleSet, estimator: Estimator, among: Tensor) -> Tensor:
        self._same_call("scores", estimator)
        scorer = self._streaming(estimator, _scores_result(len(queries), len(among)))
        if scorer is None:
            return super().scores_among(queries, estimator, among)
        self._agree("scores", queries, among=among.tolist())
        return self._grouped_scores(queries, scorer, None, among)

    def _grouped_scores(
        self,
        queries: ExampleSet,
        scorer: StreamingScorer,
        shards: ScoreShards | None,
        among: Tensor | None = None,
    ) -> Tensor:
        """The streamed scores, one pass per group of queries and layers (exact) beyond the
        queries' budget; with ``shards``, the queries and score columns are committed; with
        ``among``, the columns of those training examples only."""
        columns = self.fitted.n if among is None else len(among)
        out = torch.zeros(
            len(queries), columns, dtype=torch.float64, device=self.fitted.space.device
        )

        def add(prepared: LayerQueries, start: int, stop: int, group: Any, label: str) -> None:
            out[start:stop] += scorer.scores(prepared, group, among, label)

        self._each_group(queries, scorer, shards, add, "scores")
        if shards is not None and shards.tally["reused"]:
            logger.info(
                "score shards: %d reused from %s, %d computed",
                shards.tally["reused"],
                shards.store.root,
                shards.tally["computed"],
            )
        return out

    def _each_group(
        self,
        queries: ExampleSet,
        scorer: StreamingScorer,
        shards: ScoreShards | None,
        visit: Callable[[LayerQueries, int, int, Any, str], None],
        label: str,
    ) -> None:
        """``visit(prepared, start, stop, group, label)`` for each group of queries and layers
        (:meth:`StreamingScorer.groups`), ``prepared`` the preconditioned queries
        ``start:stop`` of the group's layers and ``group`` its shards (None without
        ``shards``); ``label`` names the passes in the progress display. Each group's queries
        are removed from disk after its visit; ``describe()`` counts the passes and ranks."""
        groups = scorer.groups(len(queries))
        size = groups[0][1] - groups[0][0]  # the largest group: every group at its rank
        device = self.fitted.space.device
        worst: tuple[float, int, int] | None = None  # the least share kept, its rank and query
        for number, (start, stop, layers) in enumerate(groups):
            named = label if len(groups) == 1 else f"{label}, group {number + 1}/{len(groups)}"
            whole = stop - start == len(queries)
            part = queries if whole else queries.part(torch.arange(start, stop))
            group = None if shards is None else shards.of_group([start, stop, list(layers)])
            if group is None or scorer.spills(stop - start, layers):
                # (queries kept on disk are this call's working files: recomputed on resume)
                prepared = scorer.queries(part, layers, size)
            else:  # committed once, reused by a resumed run
                compute = partial(_query_payload, scorer, part, layers, size)
                tensors, document = group.piece(QUERIES, {}, compute)
                prepared = LayerQueries.from_payload(tensors, document, device)
            try:
                if number == 0 and len(groups) > 1:  # (once its queries fit: not refused)
                    disk = self.options.queries_on_disk is not False
                    low = prepared.rank is not None
                    warn(_passes_notice(scorer, label, len(groups), low, disk), Notice)
                if prepared.rank is not None:
                    ranks = [r for r in (self.query_rank, prepared.rank) if r is not None]
                    self.query_rank = min(ranks)
                if prepared.kept is not None and prepared.rank is not None:
                    least = float(prepared.kept.min())
                    if worst is None or least < worst[0]:
                        worst = (least, prepared.rank, start + int(prepared.kept.argmin()))
                    kept = self.query_kept_energy
                    self.query_kept_energy = least if kept is None else min(kept, least)
                if prepared.on_disk is not None:
                    self.queries_on_disk = max(self.queries_on_disk, prepared.on_disk.nbytes)
                scorer.curvature.set_aside()  # the pass reads the queries, not the factors
                visit(prepared, start, stop, group, named)
            finally:
                prepared.close()
            del prepared
        self.query_groups = max(self.query_groups, len(groups))
        if worst is not None:  # said once for the call, whatever its groups
            scorer.warn_if_rank_loses_much(worst[0], worst[1], queries, worst[2])

    def streamed_module_scores(
        self, queries: ExampleSet, estimator: Estimator
    ) -> dict[str, Tensor] | None:
        """The per-module scores in the passes of :meth:`scores` (one, with the queries kept
        on disk; one per group of queries and layers otherwise), where the scores stream; the
        groups fill their blocks of the one result (:meth:`StreamingScorer.add_module_scores`)."""
        self._same_call("module_scores", estimator)
        fitted = self.fitted
        tracked = self.kronecker().tracked
        layers, rows, n = len(tracked), len(queries), fitted.n
        result = CallResult(
            layers * rows * n * FLOAT64_BYTES,
            f"module_scores' {layers} float64 [{rows}, {n}] results, one a tracked layer",
        )
        scorer = self._streaming(estimator, result)
        if scorer is None:
            return None
        self._agree("module_scores", queries)
        shape, device = (len(queries), fitted.n), fitted.space.device
        out = {t.name: torch.zeros(shape, dtype=torch.float64, device=device) for t in tracked}

        def add(prepared: LayerQueries, start: int, stop: int, group: Any, label: str) -> None:
            views = {name: out[name][start:stop] for name in prepared.layers()}
            scorer.add_module_scores(prepared, views, label=label)

        self._each_group(queries, scorer, None, add, "module scores")
        sum_across(*out.values())
        for S in out.values():
            S /= fitted.n
        return out

    def streamed_token_scores(
        self, queries: ExampleSet, estimator: Estimator, indices: Tensor, positions: int | None
    ) -> tuple[Tensor, Tensor, set[str]] | None:
        """The per-token scores in the passes of :meth:`scores` over ``indices``, where the
        scores stream (:meth:`StreamingScorer.add_token_scores`), their positions those of the
        first training example's layers (``positions`` is checked against them before any
        pass)."""
        self._same_call("token_scores", estimator)
        if not self._streams(estimator):
            return None
        fitted, tracked = self.fitted, self.kronecker().tracked
        sample = fitted.engine.prepare(fitted.train.take([0]))[0]
        layout = input_layout(fitted.task, tracked, sample, self.options.mask_key)
        width = position_count(positions, set(layout.positions.values()))
        shape, device = (len(queries), len(indices)), fitted.space.device
        scorer = self._scorer(
            CallResult(
                shape[0] * shape[1] * (width + 1) * FLOAT64_BYTES,
                f"token_scores' float64 [{shape[0]}, {shape[1]}, {width}] tokens and "
                f"[{shape[0]}, {shape[1]}] rest",
                "ask for fewer queries or training indices a call",
            )
        )
        self._agree("token_scores", queries, indices=indices.tolist(), positions=positions)
        tokens = torch.zeros(*shape, width, dtype=torch.float64, device=device)
        rest = torch.zeros(shape, dtype=torch.float64, device=device)
        layers: set[str] = set()

        def add(prepared: LayerQueries, start: int, stop: int, group: Any, label: str) -> None:
            named = scorer.add_token_scores(
                prepared,
                tokens[start:stop],
                rest[start:stop],
                width,
                positions is None,
                indices,
                label,
            )
            layers.update(named)

        self._each_group(queries, scorer, None, add, "token scores")
        sum_across(tokens, rest)
        tokens /= fitted.n
        rest /= fitted.n
        return tokens, rest, layers

    def _shards(self, queries: ExampleSet) -> ScoreShards | None:
        """The score shards of these queries in the workdir (None without one)."""
        fitted = self.fitted
        if fitted.workdir is None:
            return None
        curvature = self.kronecker()
        # where the factors and the queries live and whether to refit the factors do not
        # change the scores
        unchanged = ("factors_dir", "overwrite", "queries_on_disk")
        options = {k: v for k, v in self.options.record().items() if k not in unchanged}
        identity = {
            "factors": curvature.factors_identity(),
            # the measurement and the rest of the task (the factors' identity leaves the
            # measurement out: they do not read it)
            "task": task_fingerprint(fitted.task),
            "method": self.name,
            "options": options,
            "l2": fitted.l2,
            "damping": fitted.damping,
            "anchor": None if fitted.anchor is None else tensor_digest(fitted.anchor),
            "memory_limit": fitted.memory_limit,  # the query budget: groups and ranks
            "batch_size": fitted.batch_size,  # the batches the products run over
            "queries": data_fingerprint(queries),
        }
        store = ArtifactStore(fitted.workdir)
        return ScoreShards(
            store,
            identity,
            fitted.n,
            fitted.batch_size,
            self.options.shard_batches,
            part=self.shard_part,
            overwrite=self.options.overwrite,
            tally=self.shard_tally,
        )

    def self_scores(self, estimator: Estimator) -> Tensor:
        self._same_call("self_scores", estimator)
        scorer = self._streaming(estimator)
        if scorer is None:
            return super().self_scores(estimator)
        self._agree("self_scores", None)
        return scorer.self_scores()

    def stages(self, shape: RunShape, task: Task, space: ParameterSpace) -> list[Stage]:
        # as a distributed run holds them (docs/distributed.md §1): every pass over the data
        # split by batches across processes; the factors, eigenbases, EK-FAC's eigenvalues,
        # the preconditioned queries and the [Q, N] scores whole on every process
        layers = kronecker_layers(task.model, space, self.options, self.name)
        tracked = layers.tracked
        item, b, t = shape.itemsize, shape.batch_size, shape.tokens
        work = product_dtype(space.dtype).itemsize
        # layers that read one input share its eigenbasis (known from a forward pass of a real
        # model; on the meta device each layer is counted alone, an upper bound)
        followers: set[str] = set()
        positions = {x.name: t for x in tracked}  # each layer's, known from a forward pass
        if shape.sample_inputs is not None:
            layout = input_layout(task, tracked, shape.sample_inputs, self.options.mask_key)
            followers = {name for names in layout.shared for name in names[1:]}
            positions.update(layout.positions)
        cols = {x.name: 0 if x.name in followers else x.cols for x in tracked}
        factor = factor_bytes(tracked, work, followers)
        factors = sum(factor.values())
        biggest = max(tracked, key=lambda x: factor[x.name])
        eigh = eigh_bytes(tracked)
        widest = max(tracked, key=lambda x: max(x.cols, x.d_out))
        side = max(widest.cols, widest.d_out)
        decomposed = (  # the stage's largest object: the decomposition, or the factors
            (f"float64 eigendecomposition of a {side} x {side} factor ({widest.name!r})", eigh)
            if eigh > factor[biggest.name]
            else (f"A, S of {biggest.name!r}", factor[biggest.name])
        )
        # (a layer may see more positions than the data's shape tells: a signal's length)
        hooks = b * sum(max(t, positions[x.name]) * (x.cols + x.d_out) for x in tracked) * item
        block = max(tracked, key=lambda x: x.cols * x.d_out)
        block_bytes = b * block.cols * block.d_out * work
        out = []
        limit = shape.memory_limit
        if shape.gradient_cache:
            # small enough for the [N, P] cache: one more pass, held to the end of the run
            cache = gradient_cache_bytes(shape.n_train, shape.parameters, space.dtype)
            out.append(
                Stage(
                    "training gradients",
                    shape.whole_passes,  # every process computes the whole cache
                    cache + batch_gradient_bytes(shape),
                    ("[N, P] gradient cache", cache),
                    "repeated on every process, held to the end of the run; the energy-ratio "
                    "check runs on it",
                    held=cache,
                )
            )
            out += autocast_gradient_stage(shape)
        options, n = self.options, shape.examples_per_process
        fisher = options.fisher
        if fisher == "auto":
            fisher = auto_fisher(shape.outputs, options.max_exact_outputs)
        vectors = {"ggn": shape.outputs, "sampled": options.samples}.get(fisher, 1)
        ops = KroneckerWork(
            tracked, frozenset(followers), positions, vectors, backward_flops(task.model, t)
        )
        # EK-FAC keeps the first pass's activations and output gradients for the eigenvalue
        # pass when all of them fit its cache (FactorFitter._covariances), from that pass to
        # the correction's end; not with sampled labels, which the eigenvalue pass draws afresh,
        # nor when the first stage is read back. Counted for rank 0, whose batches hold the
        # most examples. The GGN's vectors are counted at the outputs' number, an upper bound
        # (a language model pulls back fewer, the scored positions' nonzero directions): the
        # run may keep a pass this count finds larger than the cache, so its size is counted
        per_example = sum(positions[x.name] * (cols[x.name] + vectors * x.d_out) for x in tracked)
        first = shape.examples_per_process  # (examples_in_batches in closed form: no loop)
        first_pass = first * item * per_example
        room = min(options.cache_bytes, (limit or default_memory_limit()) // 4)
        cached = 0
        if self.corrected and fisher != "sampled" and shape.committed is None:
            cached = first_pass if first_pass <= room else (room if fisher == "ggn" else 0)
        lam = shape.parameters * work if self.corrected else 0
        eigenvalues = sum(cols[x.name] + x.d_out for x in tracked) * work
        resident = factors + eigenvalues + lam  # held from the fit to the end of the run
        read_back = f"read back from factors_dir ({self.options.factors_dir}), verified"
        if shape.committed == "factors":  # the whole fit reused: no pass, no decomposition
            out.append(
                Stage(
                    "factors",
                    0,
                    resident,
                    (f"A, S of {biggest.name!r}", factor[biggest.name]),
                    read_back + "; no pass over the data",
                    held=resident,
                )
            )
        elif shape.committed == "first stage":  # EK-FAC resumes at the eigenvalue pass
            out.append(
                Stage(
                    "K-FAC factors",
                    0,
                    factors,
                    (f"A, S of {biggest.name!r}", factor[biggest.name]),
                    read_back + " (EK-FAC's first stage); the eigenvalue pass follows",
                )
            )
        else:
            # the fit refuses before any pass when the factors alone exceed the limit
            # (check_memory), whatever query_rank, a place on disk or more processes would do
            too_large = limit is not None and self._fit_bytes(tracked, work) > limit
            out += [
                Stage(
                    "covariances A, S",
                    1,
                    factors + cached + WORKING_FACTOR * hooks,
                    (f"A, S of {biggest.name!r}", factor[biggest.name]),
                    "data split across processes, factors summed"
                    + (
                        f"; its activations and gradients ({human_bytes(cached)}) kept for "
                        "the eigenvalue pass"
                        if cached
                        else ""
                    )
                    + _seen_positions(positions, t, shape.unit),
                    flops=ops.covariances(n),
                ),
                Stage(
                    "eigendecompositions",
                    0,
                    factors + cached + eigh,
                    decomposed,
                    "repeated on every process; float64 one layer at a time, each covariance "
                    "freed once decomposed"
                    + (
                        "; above memory_limit, so the fit refuses before any pass"
                        if too_large
                        else ""
                    ),
                    too_large,
                    held=0 if self.corrected else resident,
                    flops=ops.eigendecompositions(),
                ),
            ]
        if self.corrected and shape.committed != "factors":
            # under a memory_limit, with a store, the pass reads each layer's eigenbases back
            # from the committed K-FAC stage where no cache of the first pass serves it (sampled
            # labels, a pass larger than the cache, the first stage read back)
            reread = limit is not None and reads_bases_back(self.options, limit) and not cached
            bases = factor[biggest.name] if reread else factors
            note = "data split across processes, eigenvalues summed"
            if reread:
                note += (
                    "; the eigenbases read back from the committed K-FAC stage, a layer's at a time"
                )
            # (the first pass kept whole, the pass reads no data: a tester's run read none)
            whole = bool(cached) and cached >= first_pass
            if whole:
                note += "; from the first pass's kept activations and gradients, no data read"
            out.append(
                Stage(
                    "eigenvalue correction",
                    0 if whole else 1,
                    bases + eigenvalues + lam + cached + WORKING_FACTOR * (block_bytes + hooks),
                    (f"a batch's gradients of {block.name!r}", block_bytes),
                    note,
                    held=resident,
                    flops=ops.correction(n),
                )
            )
        if self._generic_scores(shape.gradient_cache, shape.workdir, bool(layers.others)):
            return out + self.generic_query_stages(shape, self.solve_flops(task, space))

        def scoring(size: int) -> tuple[list[Stage], bool, bool]:
            """The queries' and scores' stages with scoring batches of ``size`` examples, whether
            scoring would refuse, and whether it scores at full rank (or the rank asked for)."""
            # (the run counts the hook terms in the product precision, as the blocks)
            hooks_at, block_at = hooks // item * work * size // b, block_bytes * size // b
            outputs_at = batch_output_bytes(size, shape.outputs, shape.itemsize)
            made: list[Stage] = []
            # the preconditioned queries (all of them on every process): full rank in groups of
            # queries and layers that fit memory_limit less the factors and a pass's working memory
            # (query_budget, plan_groups), one pass over the data each; rank r per layer when one
            # layer of one query does not fit or query_rank is set (as StreamingScorer decides)
            local = shape.n_queries
            sizes = [x.d_out * x.cols * work for x in tracked]
            per_rank = sum(x.d_out + x.cols for x in tracked) * work
            scores = shape.n_queries * shape.n_train * FLOAT64_BYTES
            # factors committed to a store are set aside during the scoring pass (set_aside): a
            # fitted curvature knows whether it has one (factors restored with a saved Influence
            # have none, whatever factors_dir says); before the fit, factors_dir decides
            fitted = self.curvature_
            sets_aside = (
                self.options.factors_dir is not None if fitted is None else fitted.sets_aside
            )
            aside = resident if sets_aside else 0
            kept = resident + shape.snapshot_bytes + scores  # as query_budget counts them
            budget = (
                None if limit is None else budget_after(limit, kept, hooks_at, block_at, outputs_at)
            )
            rank = self.options.query_rank
            groups = None if rank is not None else plan_groups(local, sizes, budget)
            refused = False
            # kept on disk instead of groups or a low rank (as StreamingScorer.spills decides),
            # read back in a buffer that may take the room of the factors set aside (read_budget)
            place = shape.workdir or self.options.factors_dir is not None
            read = (
                None
                if limit is None
                else budget_after(limit, kept - aside, hooks_at, block_at, outputs_at)
            )
            spilled = (
                rank is None
                and budget is not None
                and read is not None
                and local * sum(sizes) > budget
                and max(sizes) <= read
                and _keeps_queries_on_disk(self.options.queries_on_disk, place, space.device.type)
            )
            buffer = 0  # the read buffer of queries kept on disk, in the scoring pass only
            low_rank = None  # the rank of queries kept at low rank
            if spilled:
                assert read is not None
                groups = [(0, local, tuple(range(len(tracked))))]
                buffer = max(min(local, read // size) * size for size in sizes)
                queries = min(size, local) * max(sizes)  # a query batch's block, written once made
                passes = 1
                note = (
                    f"full rank, {human_bytes(local * sum(sizes))} kept on disk and read back "
                    f"layer by layer for every batch (a read buffer of {human_bytes(buffer)})"
                )
            elif groups is None:  # low rank: every query and layer in one pass, or query groups
                note = ""
                if rank is not None:  # asked for: as many queries a pass as fit at that rank
                    asked = rank_bytes(tracked, rank, work)
                    groups = fixed_rank_groups(local, asked, len(tracked), budget or 0)
                    if budget is None or len(groups) == 1:
                        groups = None
                    elif not groups:  # StreamingScorer.queries refuses: the limit cannot be met
                        refused, groups = True, None
                        note = (
                            f"no room for one query at rank {rank} after the factors and a pass's "
                            "working memory: scoring would refuse (ProblemTooLargeError); "
                        )
                else:
                    groups, rank = low_rank_groups(local, per_rank, len(tracked), budget or 0)
                    if len(groups) == 1:
                        groups = None
                    if rank < 1:  # StreamingScorer.queries refuses: the limit cannot be met
                        refused, groups = True, None
                        rank, note = (
                            1,
                            (
                                "no room even at rank 1 after the factors and a pass's working memory: "
                                "scoring would refuse (ProblemTooLargeError); "
                            ),
                        )
                held = local if groups is None else groups[0][1]  # the queries of a pass
                queries = held * sum(
                    min(b, rank * (x.d_out + x.cols) * work)
                    for b, x in zip(sizes, tracked, strict=True)
                )
                low_rank = rank
                passes, note = 1, note + f"rank {rank} per layer (SVD)"
                if groups is not None:
                    passes = len(groups)
                    note += f", {passes} passes over groups of {held} queries"
            else:
                queries = max(
                    (stop - start) * sum(sizes[i] for i in ls) for start, stop, ls in groups
                )
                passes = len(groups)
                note = "full rank"
                if passes > 1:
                    note = f"full rank, {passes} passes over groups of queries and layers"
            largest = (
                ("queries' read buffer", buffer) if spilled else ("preconditioned queries", queries)
            )
            made.append(
                Stage(
                    "queries",
                    0,
                    queries,
                    largest,
                    note + "; repeated on every process",
                    refused,
                    flops=ops.queries(local, low_rank),
                )
            )
            made.append(
                Stage(
                    "scores",
                    passes,
                    (buffer if spilled else queries)
                    + scores
                    + WORKING_FACTOR * (block_at + hooks_at)
                    - aside,
                    ("[Q, N] scores", scores),
                    "data split across processes, score columns summed"
                    + ("; the factors set aside on disk" if aside else ""),
                    flops=ops.scores(n, local, groups, low_rank),
                )
            )
            full = low_rank is None or (self.options.query_rank is not None and not refused)
            return made, refused, full

        # the scoring passes' batches: at most the training set (b may be the queries')
        given = min(b, shape.n_train)
        made, refused, _ = scoring(given)
        if refused:  # as KFAC._scorer: smaller scoring batches, where they make room
            chosen = preferred_batch(
                ((size, *scoring(size)) for size in smaller_batches(given)),
                lambda t: not t[2],
                lambda t: t[3],
            )
            if chosen is not None:
                size, made = chosen[0], chosen[1]
                made[-1] = replace(
                    made[-1],
                    note=made[-1].note + f"; in batches of {size}: memory_limit leaves no room "
                    f"for the queries beside a pass over batches of {given}",
                )
        return out + made

    def solve_flops(self, task: Task, space: ParameterSpace) -> float:
        """Each tracked layer's block rotated into the Kronecker eigenbasis and back,
        ``4 d_out cols (d_out + cols)`` (:meth:`KroneckerCurvature.solve`)."""
        tracked = kronecker_layers(task.model, space, self.options, self.name).tracked
        return sum(2 * block_rotation_flops(t) for t in tracked)

    def committed_fit(self, engine: PerExample, train: ExampleSet, batch_size: int) -> str | None:
        """What the fit would read back from ``factors_dir`` (:func:`committed_factors`)."""
        if self.options.factors_dir is None:
            return None
        model = engine.task.model
        tracked = kronecker_layers(model, engine.space, self.options, self.name).tracked
        fitter = factor_fitter(engine, tracked, self.options, batch_size)
        return committed_factors(fitter, self.options, train, self.corrected)

    def plan_advice(self, stages: list[Stage]) -> str:
        """:attr:`plan_remedy`; without ``query_rank`` when not even rank-1 queries fit; the
        factors' own levers when they alone exceed the limit."""
        if any(stage.refused and stage.name == "eigendecompositions" for stage in stages):
            return (
                "track fewer layers (modules=), freeze the largest (requires_grad=False) or raise "
                "memory_limit: the factors and their largest eigendecomposition alone exceed it, "
                "so the fit refuses before any pass (query_rank, queries on disk and more "
                "processes cannot help)"
            )
        if any(stage.refused for stage in stages):
            return (
                "track fewer layers (modules=) or use a smaller batch_size: not even rank-1 "
                "queries fit beside the factors, so query_rank cannot help (more processes "
                "split the passes, not these bytes)"
            )
        return self.plan_remedy

    def as_scored(self, U: Tensor) -> Tensor:
        """With ``query_rank=r``, each tracked layer's block of U at rank r (truncated SVD), as
        the streamed scores keep them (:func:`~infkit.kfac.streaming.kept_at_rank`)."""
        rank = self.options.query_rank
        if rank is None:
            return U
        layers = self.tracked_layers()
        layout = layers.layout
        out = U.clone()
        for t in layers.tracked:
            if kept_at_rank(t, rank):
                L, R, _ = truncated_svd(layout.block(U, t), rank)
                layout.put(out, t, L @ R.transpose(-1, -2))
        return out

    def query_row_bytes(self, n: int, p: int, estimator: Estimator | None = None) -> int:
        if estimator is not None and self._streams(estimator):
            # streaming keeps the preconditioned queries within their own budget (query groups)
            return 3 * n * FLOAT64_BYTES
        return super().query_row_bytes(n, p, estimator)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = super().describe()
        out["query_rank"] = self.query_rank
        out["query_kept_energy"] = self.query_kept_energy
        out["query_groups"] = self.query_groups
        out["queries_on_disk"] = self.queries_on_disk
        if self._fitted is not None and self._fitted.workdir is not None:
            out["score_shards"] = dict(self.shard_tally)
        if self.curvature_ is not None:
            out.update(self.curvature_.describe())
        return out


def _scores_result(queries: int, columns: int) -> CallResult:
    """The [queries, columns] float64 scores a scoring call fills."""
    return CallResult(
        queries * columns * FLOAT64_BYTES, f"the [{queries}, {columns}] float64 scores"
    )


def _passes_notice(scorer: StreamingScorer, label: str, passes: int, low: bool, disk: bool) -> str:
    """What a call that takes ``passes`` passes over the training data for its queries (more
    than one, :meth:`StreamingScorer.groups`; ``low``: at low rank) says, with the levers that
    would help it (the queries on disk where they could be and ``disk``: not refused by
    ``queries_on_disk``)."""
    if scorer.rank is not None:  # asked for: groups of as many queries as fit at that rank
        # (a reviewer's: the notice offered queries on disk, which an asked rank never takes,
        # and said memory had chosen the rank)
        levers = (
            "raise memory_limit, score fewer queries a call or ask for a lower query_rank "
            "(queries kept at a rank stay in memory)"
        )
        return (
            f"{label}: the queries at query_rank={scorer.rank} exceed memory_limit's budget for "
            f"them all at once, so they are scored in groups of queries, in {passes} passes "
            f"over the training data (plan() foresees them): {levers}"
        )
    if low:  # one layer of one query exceeds the budget
        levers = "raise memory_limit, track fewer layers (modules=) or use a smaller batch_size"
        why = "at low rank, in groups of queries"
    else:
        levers = "raise memory_limit or score fewer queries a call"
        if scorer.scratch is None and disk:
            levers += (
                "; with a workdir or factors_dir (on a GPU also queries_on_disk=True) the "
                "queries are kept on disk and scored in one pass"
            )
        why = "in groups of queries and layers"
    return (
        f"{label}: the preconditioned queries exceed memory_limit's budget for them, so they "
        f"are scored {why}, in {passes} passes over the training data (plan() foresees "
        f"them): {levers}"
    )


def _keeps_queries_on_disk(choice: bool | None, place: bool, device_type: str) -> bool:
    """Whether queries beyond their budget are kept on disk rather than scored in groups:
    ``queries_on_disk`` when set, else on CPU with a place for them (a workdir or factors_dir).
    On a GPU a pass over the data costs less than reading the queries back for every batch."""
    if choice is not None:
        return choice
    return place and device_type == "cpu"


def _query_payload(
    scorer: StreamingScorer, queries: ExampleSet, layers: tuple[int, ...], group_size: int
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The preconditioned ``queries`` of ``layers`` (at the rank of ``group_size`` queries,
    :meth:`StreamingScorer.queries`) as tensors and a document."""
    return scorer.queries(queries, layers, group_size).payload()


#: ``method="auto"`` takes EK-FAC for a model whose factored layers hold at least this share
#: of the trainable parameters (the rest left out with a notice, as for a language model's
#: embeddings and norms)
AUTO_TRACKED_SHARE = 0.5


def factor_bytes(
    tracked: list[TrackedModule], itemsize: int, followers: Collection[str] = ()
) -> dict[str, int]:
    """Bytes of each layer's two Kronecker factors ``A`` [cols, cols] and ``S`` [d_out, d_out]
    (then of their eigenbases, which take their place), at ``itemsize`` bytes an entry.

    ``followers`` are layers that read the input of an earlier tracked layer (an attention's
    k and v after q): they share its ``A`` and are counted with ``S`` alone."""
    return {
        t.name: ((0 if t.name in followers else t.cols**2) + t.d_out**2) * itemsize for t in tracked
    }


#: the peak of one factor's eigendecomposition (:func:`~infkit.kfac.factors._eigh`), in float64
#: matrices of its size: the symmetrised float64 copy, LAPACK's eigenvectors and workspace and
#: the results in the factor's precision (measured by VmHWM: 4.4 to 5.5 for d = 2,000 and
#: 1,000; 6.2 before the copy was made in one matrix; a tester found the fit of a
#: 2,000-token vocabulary's head above a small memory_limit when this counted 2)
EIGH_MATRICES = 5.5


def eigh_bytes(tracked: list[TrackedModule]) -> int:
    """The float64 eigendecomposition of the largest factor, :data:`EIGH_MATRICES` matrices of
    its size (one layer is decomposed at a time)."""
    largest = max(max(t.cols, t.d_out) ** 2 for t in tracked)
    return int(EIGH_MATRICES * largest * FLOAT64_BYTES)


def tracked_share(problem: Problem) -> float:
    """The share of the trainable parameters that sit in layers the Kronecker methods factor."""
    tracked, _ = find_modules(problem.model, problem.space)
    covered = {t.weight for t in tracked} | {t.bias for t in tracked if t.bias}
    space = problem.space
    inside = sum(k for name, k in zip(space.names, space.numels, strict=True) if name in covered)
    return inside / max(space.size, 1)


def _seen_positions(positions: dict[str, int], given: int, unit: str) -> str:
    """The positions an example the tracked layers see, where they are not the ``given`` count
    the plan's header reads from the data's shape (a signal ``[B, C, L]``, whose layers see
    L or fewer steps; a strided layer fewer than the data): "" where they all see ``given``."""
    seen = sorted(set(positions.values()))
    if seen == [given]:
        return ""
    span = f"{seen[0]:,}" if len(seen) == 1 else f"{seen[0]:,} to {seen[-1]:,}"
    return (
        f"; its layers see {span} positions an example (the data's shape: {counted(given, unit)})"
    )
