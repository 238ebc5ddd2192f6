"""A worker for tests/test_distributed.py: the same script on one process or under torchrun.

    python tests/distributed_worker.py OUT
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_worker.py OUT
    python -m torch.distributed.run ... tests/distributed_worker.py OUT WHAT

With WHAT (``data``, ``damping``, ``batch_size``, ``memory_limit`` or ``estimator``) process 1
is given other training data (one token), another damping, batch size, memory limit or
estimator (RelatIF) than process 0; each
process fits and scores once and writes the error it got, if any, to ``OUT/rank<r>.err``.

As a user's script would, it initialises the default process group (gloo, CPU) when torchrun's
variables are set and otherwise uses the public API unchanged: EK-FAC on a small causal LM in
float64, fitted with sampled and with empirical Fisher labels, then the scores of the queries,
their per-module and per-token splits and the self-influence of every training example,
streamed layer by layer (a memory limit below the training-gradient cache). Each process writes what it got, with the number of training
sequences its model saw, to ``OUT/rank<r>.pt``.
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lm_helpers import LENGTH, VOCAB, TinyLM, rows

import infkit
from infkit import language_modeling as lm

N, Q, BATCH = 22, 3, 3  # 8 batches, the last of one sequence
#: below the [N, P] training-gradient cache, holding the queries: the scores stream
MEMORY_LIMIT = 60_000
#: the settings every process fits EK-FAC with (the streamed path)
STREAMED = {"l2": 1e-2, "damping": 1e-2, "batch_size": BATCH, "memory_limit": MEMORY_LIMIT}


class Counting(TinyLM):
    """TinyLM that counts the sequences it reads."""

    seen = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        Counting.seen += input_ids.shape[0]
        return super().forward(input_ids, attention_mask)


def main() -> None:
    out = Path(sys.argv[1])
    if "RANK" in os.environ:  # (a process left waiting by the other's error stops in a minute)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = Counting().double().eval()
    ids = torch.randint(0, VOCAB, (N + Q, LENGTH))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0  # a padded training sequence
    inputs, labels = lm.examples(ids, mask)
    train, queries = rows(inputs, labels, 0, N), rows(inputs, labels, N, N + Q)
    task = infkit.Task.language_modeling(model)
    if len(sys.argv) > 2 and sys.argv[2] == "alone":
        alone(out, task, train, queries)
    if len(sys.argv) > 2 and sys.argv[2] == "overwrite":
        refit(out, task, train, queries)
        return
    if len(sys.argv) > 2 and sys.argv[2] == "saves":  # (a plain TinyLM: a test loads it)
        torch.manual_seed(0)
        task = infkit.Task.language_modeling(TinyLM().double().eval())
        inf = infkit.Influence(task, "kfac", l2=1e-2, damping=1e-2, batch_size=BATCH).fit(train)
        path = inf.save(out / "saved")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{dist.get_rank()}.path").write_text(str(path))
        torch.save(inf.scores(queries), out / f"rank{dist.get_rank()}.pt")
        leave()
        return
    if len(sys.argv) > 2 and sys.argv[2] == "overflows":
        overflows(out, inputs, labels)
        return
    if len(sys.argv) > 2:
        mismatch(out, sys.argv[2], task, inputs, labels)
        return
    result: dict[str, object] = {}
    for fisher in ("sampled", "empirical"):
        inf = infkit.Influence(task, "ekfac", **STREAMED, fisher=fisher, seed=5).fit(train)
        assert inf.fitted.train_gradients is None  # the streamed path
        factors = inf.method.kronecker().factors.modules
        split = inf.token_scores(queries, [0, 2, 5, 21])  # the padded sequence among them
        result[fisher] = {
            "scores": inf.scores(queries),
            "self_scores": inf.self_scores(),
            "modules": inf.module_scores(queries),
            "tokens": split.tokens,
            "rest": split.rest,
            "factors": {
                name: {"A": f.A, "S": f.S, "Lambda": f.Lambda} for name, f in factors.items()
            },
        }
    result["seen"] = Counting.seen
    rank = dist.get_rank() if dist.is_initialized() else 0
    out.mkdir(parents=True, exist_ok=True)
    torch.save(result, out / f"rank{rank}.pt")
    leave()


def mismatch(out: Path, what: str, task: infkit.Task, inputs: dict, labels: torch.Tensor) -> None:
    """Process 1 differs from process 0 in ``what``; each writes the error it got."""
    rank = dist.get_rank()
    damping = 2e-2 if what == "damping" and rank == 1 else 1e-2
    batch = BATCH + 1 if what == "batch_size" and rank == 1 else BATCH
    # a limit that holds the [N, P] gradient cache: process 1 would score from it, no sums
    limit = 10**9 if what == "memory_limit" and rank == 1 else MEMORY_LIMIT
    if what == "data" and rank == 1:
        inputs = {k: v.clone() for k, v in inputs.items()}
        inputs["input_ids"][7, 3] = (inputs["input_ids"][7, 3] + 1) % VOCAB
    train, queries = rows(inputs, labels, 0, N), rows(inputs, labels, N, N + Q)
    if what == "measurement" and rank == 1:  # the log-probability, as IF-Guide measures it
        task = task.with_measurement(
            lambda out, t: -lm.next_token_loss(out, t), higher_is_better=True
        )
    message = ""
    try:
        estimator = "relatif" if what == "estimator" and rank == 1 else "if"
        # a store on process 1 alone sets its factors aside as it scores, grouping the queries
        # otherwise (a tester's run aborted in gloo, sums of two sizes)
        store = {"factors_dir": str(out / "store1")} if what == "store" and rank == 1 else {}
        inf = infkit.Influence(
            task,
            "ekfac",
            estimator,
            l2=1e-2,
            damping=damping,
            batch_size=batch,
            memory_limit=limit,
            **store,
        ).fit(train)
        inf.scores(queries)
    except infkit.errors.InvalidInputError as error:
        message = str(error)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.err").write_text(message)
    leave()


def refit(out: Path, task: infkit.Task, train: Any, queries: Any) -> None:
    """Every process fits and scores three times in one shared workdir with overwrite=True, the
    factors set aside as they score (the memory limit); each writes its scores, or its error,
    and stops at the first."""
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    scores, message = [], ""
    for _ in range(3):
        try:
            inf = infkit.Influence(
                task, "ekfac", **STREAMED, workdir=out / "work", overwrite=True
            ).fit(train)
            scores.append(inf.scores(queries))
        except infkit.errors.InfkitError as error:
            message = f"{type(error).__name__}: {error}"
            break
    torch.save(scores, out / f"rank{rank}.pt")
    (out / f"rank{rank}.err").write_text(message)
    if message:  # the other process may wait in a sum: leave without the barrier
        sys.stdout.flush()
        os._exit(0)
    leave()


class Overflowing(TinyLM):
    """TinyLM whose logits are infinite on the sequence ``marked`` (and only there)."""

    marked: torch.Tensor | None = None

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        logits = super().forward(input_ids, attention_mask)
        assert self.marked is not None
        hit = (input_ids == self.marked).all(dim=1)
        return logits.masked_fill(hit[:, None, None], float("inf"))


def overflows(out: Path, inputs: dict, labels: torch.Tensor) -> None:
    """A model that overflows on training sequence 13 only, past the checks of the first
    examples: the process whose batch holds it stops there, naming it; each process writes its
    error and leaves without waiting for the other."""
    torch.manual_seed(0)
    model = Overflowing().double().eval()
    model.marked = inputs["input_ids"][13]
    train = rows(inputs, labels, 0, N)
    task = infkit.Task.language_modeling(model)
    message = ""
    try:
        infkit.Influence(task, "ekfac", **STREAMED).fit(train)
    except infkit.errors.InfkitError as error:
        message = f"{type(error).__name__}: {error}"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{dist.get_rank()}.err").write_text(message)
    sys.stdout.flush()
    os._exit(0)


def alone(out: Path, task: infkit.Task, train: Any, queries: Any) -> None:
    """Every process fits and scores; then process 1 exits and process 0 asks again, alone."""
    inf = infkit.Influence(task, "ekfac", **STREAMED).fit(train)
    inf.scores(queries)
    rank = dist.get_rank()
    out.mkdir(parents=True, exist_ok=True)
    message = ""
    if rank == 0:
        try:
            inf.top_k(queries, k=2)
        except infkit.errors.InfkitError as error:
            message = f"{type(error).__name__}: {error}"
    (out / f"rank{rank}.err").write_text(message)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def leave() -> None:
    if dist.is_initialized():
        dist.barrier()  # every process done before the group goes
        dist.destroy_process_group()
        # Gloo's worker threads can abort the interpreter's own teardown ("terminate called
        # without an active exception", pytorch/pytorch#179291); the results are written and
        # the group is gone, so leave without it
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
