"""Benchmark: the plan's time estimate against the run's time (issue: "an estimate of the time
from a timed first batch").

Llama-style causal LMs of ``bench_lm.py`` (random initialisation, float32, every decoder
``nn.Linear`` tracked, sequences of 128 tokens, Q = 16 queries, batch 8), EK-FAC with the
sampled Fisher and ``damping="auto"``:

* ``tiny`` (0.1M tracked parameters, N = 64): small enough for the [N, P] gradient cache, so
  the post-fit checks run on it (their curvature products of single examples are most of it);
* ``small`` (10.6M, N = 96): the streamed path of every real-sized model: three hooked passes,
  the eigendecompositions, the queries' preconditioning;
* ``small`` with N = 16: the same model on the cached path (its [N, P] cache fits), where the
  queries and the energy ratio's 16 probes are solved in float64 on the generic path.

Each setting is a fresh process: it builds the model and data, asks ``plan()`` (which times one
batch and, for the arithmetic beyond the passes, one matrix product), then fits and scores,
and reports the run's time over the estimate. The same settings run on the library at
``--baseline`` (exported with ``git archive``) in the same run, for the change's before and
after.

Run:  .venv/bin/python benchmarks/bench_plan_time.py [--baseline REV] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lm import BATCH, LENGTH, VOCAB, benchmark_influence, make_config
from harness import ROOT, append_section, export_source, library_worker, provenance

RESULTS = ROOT / "benchmarks" / "results" / "plan_time.md"
Q = 16
#: (size of bench_lm.py, training sequences)
SETTINGS = [("tiny", 64), ("small", 16), ("small", 96)]


def worker(size: str, n: int) -> dict:
    from transformers import LlamaForCausalLM

    from infkit import language_modeling as lm

    torch.manual_seed(0)
    model = LlamaForCausalLM(make_config(size)).eval()
    ids = torch.randint(0, VOCAB, (n + Q, LENGTH), generator=torch.Generator().manual_seed(0))
    train, test = lm.examples(ids[:n]), lm.examples(ids[n:])
    warnings.simplefilter("ignore")  # not at an optimum; embeddings and norms left out
    inf = benchmark_influence(model, progress=False)
    plan = inf.plan(train, test)
    start = time.perf_counter()
    inf.fit(train).scores(test)
    seconds = time.perf_counter() - start
    cached = inf.fitted.train_gradients is not None
    return {"plan": plan.seconds, "seconds": seconds, "passes": plan.passes, "cached": cached}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("SIZE", "N"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", default="dd9aed5")
    parser.add_argument(
        "--only-cached", action="store_true", help="leave out the streamed setting (small, 96)"
    )
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        size, n = args.worker
        print(json.dumps(worker(size, int(n))), flush=True)
        return
    versions = {"this tree": ROOT / "src", f"at {args.baseline}": export_source(args.baseline)}
    rows = []
    streamed = ("small", 96)
    for size, n in [s for s in SETTINGS if not (args.only_cached and s == streamed)]:
        for version, src in versions.items():
            result = library_worker(
                __file__, [size, str(n)], src, args.threads, f"{size} ({version})"
            )
            print(size, version, result, flush=True)
            rows.append((size, n, version, result))
    lines = [
        f"## EK-FAC on Llama-style LMs, Q = {Q} queries of {LENGTH} tokens, batch {BATCH}, "
        f"{args.threads} threads",
        "",
        provenance(),
        "",
        "| size | N | path | library | plan (s) | run (s) | run / plan |",
        "|---|---|---|---|---|---|---|",
    ]
    for size, n, version, r in rows:
        path = "cached" if r.get("cached") else "streamed"
        lines.append(
            f"| {size} | {n} | {path} | {version} | {r['plan']:.1f} | {r['seconds']:.1f} | "
            f"{r['seconds'] / r['plan']:.2f} |"
        )
    lines += ["", "Run: fit and scores, after the plan (which is not counted)."]
    append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
