"""A long score computation on disk in pieces: column shards of the [Q, N] scores and the
preconditioned queries, each an artifact, so that a run killed at any point starts again where it
stopped (docs/distributed.md §3).

With ``Influence(..., workdir=PATH)`` the streamed Kronecker scores are computed shard by shard:
shard s holds the score columns of training examples ``[s w, (s + 1) w)``, ``w`` =
``batch_size x shard_batches``, and is committed through the :class:`~infkit.store.ArtifactStore`
(identity, checksums, atomic rename) as soon as it is done. A new run of the same call finds the
committed shards, verifies and reuses them, and computes only the rest; since each shard is the
same computation on the same batches either way, the resumed scores are bit-identical to an
uninterrupted run's. Under torchrun, shard s belongs to process ``s mod K``
(:mod:`infkit.distributed`); without torchrun, ``part=(i, K)`` gives one job of an array (e.g.
SLURM's) the same share.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from infkit.distributed import world
from infkit.errors import InvalidInputError
from infkit.store import Artifact, ArtifactStore, canonical

#: artifact kinds
SCORE_SHARD = "score-shard"
QUERIES = "preconditioned-queries"
SCORES = "scores"
#: batches of training examples per shard
SHARD_BATCHES = 16


@dataclass(frozen=True)
class QueryRows:
    """Where a chunk of queries sits in its ``scores()`` call: ``Influence`` takes a call's
    queries in chunks under its memory budget, and each chunk's scores are committed alone.

    Attributes:
        call: the fingerprint of the call's queries, all of them.
        start, stop: the chunk's rows ``[start, stop)`` of the call's result.
        total: the call's queries.
    """

    call: str
    start: int
    stop: int
    total: int

    def record(self) -> dict[str, Any]:
        return {"call": self.call, "rows": [self.start, self.stop], "of": self.total}


@dataclass(frozen=True)
class SavedScores:
    """Scores committed to a workdir by a finished run (:func:`read_scores`).

    Attributes:
        scores: [n_queries, n_train] removal effects in float64, as they were accumulated
            (``Influence.scores`` returned them in the model's precision, at least float32).
        info: the method, the numbers of queries and training examples.
        identity: everything they depend on (model, data, task, method options, queries).
        path: the artifact's directory (of a call committed in chunks of queries, the first's).
        parts: the directories of a call's chunks, in row order (one: ``path``).
    """

    scores: Tensor
    info: dict[str, Any]
    identity: dict[str, Any]
    path: Path
    parts: tuple[Path, ...] = ()


def read_scores(workdir: str | Path) -> list[SavedScores]:
    """The scores of every finished scoring run in ``workdir``, verified (checksums), without
    the model or a refit; oldest first. A call whose queries were scored in chunks (under its
    memory budget) is one run, its chunks' rows together, once every chunk is committed (a
    call stopped between them is not finished). A damaged artifact raises ArtifactError
    naming it."""
    if not Path(workdir).is_dir():
        raise InvalidInputError(f"workdir {workdir} does not exist or is not a directory")
    store = ArtifactStore(workdir)
    whole: list[SavedScores] = []
    chunks: dict[str, list[SavedScores]] = {}
    for path in store.committed(SCORES):
        remedy = (
            f"Delete {path} and run the scores() call that made it again: it reads the "
            "committed shards back, with no pass over the data where they are intact"
        )
        artifact = store.verify(path, SCORES, remedy=remedy)
        saved = SavedScores(
            artifact.tensors()["scores"], artifact.json("meta"), artifact.identity, path, (path,)
        )
        if "call" not in saved.info:
            whole.append(saved)
            continue
        # the chunks of one call: the same call and everything else alike but their queries
        rest = {k: v for k, v in saved.identity.items() if k not in ("queries", "rows")}
        chunks.setdefault(canonical(rest), []).append(saved)
    out = [(max(_committed_at(p) for p in s.parts), s) for s in whole]
    for parts in chunks.values():
        call = _one_call(parts)
        if call is not None:
            out.append((max(_committed_at(p) for p in call.parts), call))
    return [s for _, s in sorted(out, key=lambda pair: pair[0])]


def _committed_at(path: Path) -> float:
    return (path / "manifest.json").stat().st_mtime


def _one_call(parts: list[SavedScores]) -> SavedScores | None:
    """The chunks of one scores() call as one run (None: a chunk is missing)."""
    parts = sorted(parts, key=lambda s: s.info["rows"][0])
    total, row = parts[0].info["of"], 0
    for part in parts:
        if part.info["rows"][0] != row:
            return None
        row = part.info["rows"][1]
    if row != total:
        return None
    first = parts[0]
    info = {k: v for k, v in first.info.items() if k not in ("call", "rows", "of")}
    identity = {k: v for k, v in first.identity.items() if k not in ("rows", "call")}
    identity["queries"] = first.info["call"]
    return SavedScores(
        torch.cat([s.scores for s in parts]),
        {**info, "n_queries": total, "chunks": len(parts)},
        identity,
        first.path,
        tuple(s.path for s in parts),
    )


@dataclass
class ScoreShards:
    """The shards of one score computation in a store.

    Args:
        store: where they are committed.
        identity: everything the scores depend on (model, data, task, method and its options,
            the queries, the batch size), the columns aside.
        n: training examples (columns).
        batch_size: examples per batch.
        shard_batches: batches per shard.
        part: ``(i, K)``: this process computes shards ``s`` with ``s mod K == i``; default:
            its rank and the world size under torchrun, else every shard.
    """

    store: ArtifactStore
    identity: dict[str, Any]
    n: int
    batch_size: int
    shard_batches: int = SHARD_BATCHES
    part: tuple[int, int] | None = None
    #: recompute every shard and piece and replace the committed ones (damaged ones too)
    overwrite: bool = False
    #: shards computed and shards reused, counted (shared by :meth:`of_group`'s copies)
    tally: dict[str, int] = field(default_factory=lambda: {"computed": 0, "reused": 0})

    def __post_init__(self) -> None:
        if self.part is not None:
            pair = self.part if isinstance(self.part, (tuple, list)) else ()
            i, k = pair if len(pair) == 2 else (None, None)
            if not (isinstance(i, int) and isinstance(k, int) and 0 <= i < k):
                raise InvalidInputError(
                    f"part must be (i, K) with 0 <= i < K, e.g. (SLURM_ARRAY_TASK_ID, "
                    f"SLURM_ARRAY_TASK_COUNT), got {self.part!r}"
                )

    @property
    def width(self) -> int:
        """Training examples per shard."""
        return self.batch_size * self.shard_batches

    def ranges(self) -> list[tuple[int, int]]:
        """Every shard's columns ``[start, stop)``, in order."""
        return [(s, min(s + self.width, self.n)) for s in range(0, self.n, self.width)]

    def mine(self) -> list[tuple[int, int]]:
        """The shards this process computes (``part``, or its rank under torchrun)."""
        i, k = self.part if self.part is not None else world()
        return self.ranges()[i::k]

    # ------------------------------------------------------------------ score columns
    def _shard_identity(self, start: int, stop: int) -> dict[str, Any]:
        return {**self.identity, "columns": [start, stop]}

    def columns(self, start: int, stop: int, compute: Callable[[], Tensor]) -> Tensor:
        """The committed scores of columns ``[start, stop)``, or ``compute()``'s, committed."""
        identity = self._shard_identity(start, stop)
        artifact = self._replaced_or_loaded(SCORE_SHARD, identity)
        if artifact is not None:
            self.tally["reused"] += 1
            return artifact.tensors()["scores"]
        block = compute()
        self.store.save(
            SCORE_SHARD,
            identity,
            tensors={"tensors": {"scores": block}},
            info={"columns": [start, stop], "shape": list(block.shape)},
        )
        self.tally["computed"] += 1
        return block

    def of_group(self, group: Any) -> ScoreShards:
        """The shards of one group of queries and layers (:func:`~infkit.kfac.streaming.plan_groups`)
        of this computation: the same columns, the group in the identity."""
        return replace(self, identity={**self.identity, "group": group})

    # ------------------------------------------------------------------ other pieces
    def piece(
        self,
        kind: str,
        extra: dict[str, Any],
        compute: Callable[[], tuple[dict[str, Tensor], dict[str, Any]]],
    ) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """A committed piece of this computation (tensors and a JSON document) named by
        ``kind`` and ``extra``, or ``compute()``'s, committed."""
        identity = {**self.identity, **extra}
        artifact = self._replaced_or_loaded(kind, identity)
        if artifact is not None:
            self.store.mark_used(artifact.path)  # (read_scores lists this run as the latest)
            return artifact.tensors(), artifact.json("meta")
        tensors, document = compute()
        self.store.save(
            kind,
            identity,
            tensors={"tensors": tensors},
            documents={"meta": document},
        )
        return tensors, document

    def _replaced_or_loaded(self, kind: str, identity: dict[str, Any]) -> Artifact | None:
        """The committed piece to reuse, or None to compute it; with ``overwrite`` none, and
        what was there is removed before the computation, whose sum across processes waits for
        every process's removal, so that their commits then stand as one (each replacing the
        other's as it committed had one read back a piece another was replacing: a torchrun
        under CI, as the Kronecker factors before)."""
        if not self.overwrite:
            return self.store.load(kind, identity)
        self.store.remove(self.store.path(kind, identity))
        return None
