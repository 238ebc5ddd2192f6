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

from torch import Tensor

from infkit.distributed import world
from infkit.errors import InvalidInputError
from infkit.store import ArtifactStore

#: artifact kinds
SCORE_SHARD = "score-shard"
QUERIES = "preconditioned-queries"
SCORES = "scores"
#: batches of training examples per shard
SHARD_BATCHES = 16


@dataclass(frozen=True)
class SavedScores:
    """Scores committed to a workdir by a finished run (:func:`read_scores`).

    Attributes:
        scores: [n_queries, n_train] removal effects in float64, as they were accumulated
            (``Influence.scores`` returned them in the model's precision, at least float32).
        info: the method, the numbers of queries and training examples.
        identity: everything they depend on (model, data, task, method options, queries).
        path: the artifact's directory.
    """

    scores: Tensor
    info: dict[str, Any]
    identity: dict[str, Any]
    path: Path


def read_scores(workdir: str | Path) -> list[SavedScores]:
    """The scores of every finished scoring run in ``workdir``, verified (checksums), without
    the model or a refit; oldest first. A damaged artifact raises ArtifactError naming it."""
    if not Path(workdir).is_dir():
        raise InvalidInputError(f"workdir {workdir} does not exist or is not a directory")
    store = ArtifactStore(workdir)
    out = []
    for path in store.committed(SCORES):
        remedy = (
            f"Delete {path} and run the scores() call that made it again: it reads the "
            "committed shards back, with no pass over the data where they are intact"
        )
        artifact = store.verify(path, SCORES, remedy=remedy)
        out.append(
            SavedScores(
                artifact.tensors()["scores"], artifact.json("meta"), artifact.identity, path
            )
        )
    return sorted(out, key=lambda s: (s.path / "manifest.json").stat().st_mtime)


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
        artifact = None if self.overwrite else self.store.load(SCORE_SHARD, identity)
        if artifact is not None:
            self.tally["reused"] += 1
            return artifact.tensors()["scores"]
        block = compute()
        self.store.save(
            SCORE_SHARD,
            identity,
            tensors={"tensors": {"scores": block}},
            info={"columns": [start, stop], "shape": list(block.shape)},
            overwrite=self.overwrite,
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
        artifact = None if self.overwrite else self.store.load(kind, identity)
        if artifact is not None:
            return artifact.tensors(), artifact.json("meta")
        tensors, document = compute()
        self.store.save(
            kind,
            identity,
            tensors={"tensors": tensors},
            documents={"meta": document},
            overwrite=self.overwrite,
        )
        return tensors, document
