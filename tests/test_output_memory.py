"""A batch's outputs under ``memory_limit``: a language model's logits over a large vocabulary
(and the loss's float32 copies of them) are the largest objects of the passes whose batches
infkit chooses. The scoring passes count them in their working memory and take smaller
batches; the post-fit checks and the objective's pass take batches whose outputs fit a quarter
of the limit (``Fitted.pass_batch_size``). Measured: a scoring run's peak resident memory
against its limit, in a fresh process (as ``tests/test_store_memory.py`` reads it)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from lm_helpers import TinyLM
from resident_memory import READS_PROC, run_child

import infkit
from infkit import language_modeling as lm
from infkit.errors import Notice
from infkit.evaluate import relative_error
from infkit.kfac.streaming import pass_output_bytes, query_room
from infkit.memory import batch_output_bytes, output_rows

#: a vocabulary large beside the model: the logits dominate every pass's memory
WORDS, LENGTH, N, Q, BATCH = 4000, 16, 16, 3, 8


def _problem(words: int = WORDS, length: int = LENGTH):  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = TinyLM(vocab=words, width=8).eval()
    ids = torch.randint(0, words, (N + Q, length), generator=torch.Generator().manual_seed(1))
    inputs, labels = lm.examples(ids, torch.ones_like(ids))
    part = lambda lo, hi: ({k: v[lo:hi] for k, v in inputs.items()}, labels[lo:hi])  # noqa: E731
    return model, part(0, N), part(N, N + Q)


def test_output_rows_by_hand() -> None:
    # 16 bytes an output in float32 (the outputs and three float32 copies), 12 + 8 in float64
    assert batch_output_bytes(8, 1000, 4) == 8 * 1000 * 16
    assert batch_output_bytes(2, 10, 8) == 2 * 10 * 20
    # a quarter of the limit: 4,000 outputs a float32 example take 64,000 bytes
    assert output_rows(8, 4000, 4, 4 * 64_000 * 3) == 3
    assert output_rows(8, 4000, 4, 4 * 64_000 * 100) == 8  # never above the batch size
    assert output_rows(8, 4000, 4, 1000) == 1  # never below one example


def test_scoring_counts_a_batch_of_outputs_and_takes_smaller_batches(tmp_path: Path) -> None:
    """A limit that holds the queries beside a scoring pass's hook terms at the fit's batches
    of 8, but not beside the batch's logits and their float32 copies (8 x 16 x 4,000 outputs,
    20 bytes each in float64: 10 MiB): the scoring passes take smaller batches, said once,
    foreseen by the plan, with the unbounded run's scores. Before, the outputs were left out
    of the budget: a tester's 32,000-word Llama scored 0.8% past its limit plus the model.
    (A workdir: the layer-by-layer scorer, which a cached problem this small would not take.)"""
    model, train, test = _problem()
    model = model.double()
    task = infkit.Task.language_modeling(model)
    # the head left out: its [4,000, 4,000] factor would take the limit's room instead
    options = {
        "l2": 1e-2,
        "damping": 1e-2,
        "batch_size": BATCH,
        "checks": False,
        "modules": ["mix"],
    }
    big = 1 << 34
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        free = infkit.Influence(
            task, "ekfac", memory_limit=big, workdir=tmp_path / "free", **options
        ).fit(train)
        unbounded = free.scores(test)
    fitted, curvature = free.fitted, free.method.kronecker()
    outputs = pass_output_bytes(fitted)
    assert outputs == batch_output_bytes(BATCH, LENGTH * WORDS, 8)
    # the limit less what the budget took before the outputs counted, and half the outputs
    taken = big - (query_room(fitted, curvature, Q * N * 8) + outputs)
    limit = taken + outputs // 2
    bounded = infkit.Influence(
        task, "ekfac", memory_limit=limit, workdir=tmp_path / "bounded", **options
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)  # (the layers left out)
        plan = {stage.name: stage for stage in bounded.plan(train, test).stages}
    planned = plan["scores"].note
    assert "in batches of " in planned and not plan["queries"].refused, planned
    size = int(planned.split("in batches of ")[1].split(":")[0])
    assert size < BATCH
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        bounded.fit(train)
        scores = bounded.scores(test)
    told = [w for w in said if "leaves no room for the queries" in str(w.message)]
    assert len(told) == 1 and told[0].category is Notice
    assert f"the scoring passes take batches of {size}, the same scores" in str(told[0].message)
    assert relative_error(scores, unbounded) < 1e-12


#: the child: fits (factors read back from ``factors_dir``), checks and scores a tiny model over
#: a large vocabulary under ``memory_limit``, after the same run on a small vocabulary (which
#: imports every module the run takes), and prints how far its peak resident memory rose above
#: the resident memory before the measured run, in MiB
CHILD = """
import json, sys, warnings
import torch
import infkit
from resident_memory import high_water, resident
from test_output_memory import _problem
torch.set_num_threads(1)
def run(words, limit, factors):
    model, train, test = _problem(words, int(sys.argv[3]))
    inf = infkit.Influence(
        infkit.Task.language_modeling(model), "ekfac", damping=1e-3, batch_size=8,
        memory_limit=limit, factors_dir=factors, progress=False, modules=["mix"],
    )
    inf.fit(train)
    return inf.scores(test)
limit = int(sys.argv[2])
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    run(50, limit, None)
    before = resident()
    scores = run(int(sys.argv[4]), limit, sys.argv[1])
rise = high_water() - before
print(json.dumps({"rise_mib": rise / (1 << 20), "finite": bool(torch.isfinite(scores).all())}))
"""


@pytest.mark.skipif(not READS_PROC, reason="reads resident memory from /proc")
def test_a_scoring_run_over_a_large_vocabulary_stays_within_its_limit(tmp_path: Path) -> None:
    """A tiny model over 16,000 words (the logits of a batch of 8 sequences of 32 tokens and
    their float32 copies: 62.5 MiB) under a limit of 48 MiB: the fit (its factors read back),
    its checks and the scores of 3 queries rise by less than the limit (30 MiB measured).
    Before, the checks and the scoring passes ran at the fit's batches of 8: 186 MiB, 3.9x the
    limit (a 32,000-word model of 64 tokens under 150 MiB: 744 MiB, the drift check's)."""
    words, length, limit = 16_000, 32, 48 << 20
    model, train, _ = _problem(words, length)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # the factors, fitted once at a generous limit (the statistics passes keep batch_size)
        infkit.Influence(
            infkit.Task.language_modeling(model),
            "ekfac",
            damping=1e-3,
            batch_size=8,
            factors_dir=tmp_path / "factors",
            progress=False,
            modules=["mix"],  # (the head's [16,000, 16,000] factor: the run would be its)
        ).fit(train)
    measured = run_child(CHILD, str(tmp_path / "factors"), str(limit), str(length), str(words))
    assert measured["finite"]
    assert measured["rise_mib"] < limit / (1 << 20), measured


def _scoring_batches(said: list[str], planned: str) -> tuple[int | None, int | None]:
    """The scoring batch size the plan's note and the run's last Notice name (None: the fit's)."""
    plan = (
        int(planned.split("in batches of ")[1].split(":")[0])
        if "in batches of" in planned
        else None
    )
    told = [m for m in said if "the scoring passes take batches of" in m]
    run = int(told[-1].split("take batches of ")[1].split(",")[0]) if told else None
    return plan, run


@pytest.mark.parametrize(
    ("dtype", "n", "q", "share"),
    [
        (torch.float64, 4, 12, 1.0),  # more queries than training examples
        (torch.float64, 4, 12, 0.5),
        (torch.bfloat16, 16, 3, 0.25),  # hook terms in float32, outputs in bfloat16 and float32
        (torch.float64, 16, 3, 0.6),
    ],
)
def test_the_plan_and_the_run_take_the_same_scoring_batches(
    tmp_path: Path, dtype: torch.dtype, n: int, q: int, share: float
) -> None:
    """The plan foresees the scoring passes' batches as the run takes them, at a share of the
    room the unbounded run's budget takes. A reviewer's: with more queries than training
    examples the plan counted a batch of 8 (the queries') where the run's is the training
    set's 4, and said batches of 2 where the run scored at 4; a bfloat16 model's hook terms
    were planned at 2 bytes where the run counts them at float32's 4 (plan 2, run 1)."""
    torch.manual_seed(0)
    model = TinyLM(vocab=WORDS, width=8).eval().to(dtype)
    ids = torch.randint(0, WORDS, (n + q, LENGTH), generator=torch.Generator().manual_seed(1))
    inputs, labels = lm.examples(ids, torch.ones_like(ids))
    part = lambda lo, hi: ({k: v[lo:hi] for k, v in inputs.items()}, labels[lo:hi])  # noqa: E731
    train, test = part(0, n), part(n, n + q)
    task = infkit.Task.language_modeling(model)
    options = {"l2": 1e-2, "damping": 1e-2, "batch_size": BATCH, "checks": False}
    options |= {"progress": False, "modules": ["mix"]}
    big = 1 << 36
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        free = infkit.Influence(task, "ekfac", memory_limit=big, workdir=tmp_path / "f", **options)
        free.fit(train)
        taken = big - query_room(free.fitted, free.method.kronecker(), q * n * 8)
        bounded = infkit.Influence(
            task, "ekfac", memory_limit=int(taken * share), workdir=tmp_path / "b", **options
        )
        planned = {stage.name: stage for stage in bounded.plan(train, test).stages}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bounded.fit(train)
        bounded.scores(test)
    plan, run = _scoring_batches([str(w.message) for w in caught], planned["scores"].note)
    assert plan == run, planned["scores"].note


#: the child: one of a language model's checks on sequences of 256 tokens over 32,000 words
#: (32 MiB of float32 logits a sequence), and how far the peak rose above the resident memory
#: before it (the logits made first)
CHECK_CHILD = """
import json, sys
import torch
import infkit
from infkit import language_modeling as lm
from infkit.data import ExampleSet
from infkit.example_checks import check_loss_alone
from infkit.gradients import PerExample
from infkit.parameters import ParameterSpace
from lm_helpers import TinyLM
from resident_memory import high_water, resident
torch.set_num_threads(1)
torch.manual_seed(0)
words, length = 32_000, 256
ids = torch.randint(0, words, (4, length), generator=torch.Generator().manual_seed(1))
if sys.argv[1] == "gap":
    logits, labels = torch.randn(1, length, words) * 3, ids[:1]
    before = resident()
    lm.next_token_gradient_gap(logits, labels)
else:
    model = TinyLM(vocab=words, width=8).eval()
    task = infkit.Task.language_modeling(model)
    examples = ExampleSet(lm.examples(ids))
    engine = PerExample(task, ParameterSpace(model))
    before = resident()
    check_loss_alone(engine, examples)
print(json.dumps({"rise_mib": (high_water() - before) / (1 << 20)}))
"""


@pytest.mark.skipif(not READS_PROC, reason="reads resident memory from /proc")
@pytest.mark.parametrize("check", ["gap", "loss alone"])
def test_a_language_models_checks_take_no_float64_copy_of_its_logits(check: str) -> None:
    """The precision check's gradient gap of a sequence of 256 tokens over 32,000 words, and
    the check that a loss keeps each example's own, rise by less than a float64 copy of one
    sequence's logits (62.5 MiB). A reviewer's: the gap in 64 MiB chunks through autograd rose
    by 595 MiB for one sequence of 512 tokens (42 MiB now), and the loss check ran the built-in
    loss on a batch of 2 and copies of 2 and 3 with their graphs: 882 MiB in a whole run."""
    measured = run_child(CHECK_CHILD, check.split()[0])
    assert measured["rise_mib"] < 62.5, measured
