"""Benchmark: the plan's peak against the measured one, and ``memory_limit`` kept, on a run
small enough for the [N, P] gradient cache (issue: "``memory_limit`` bounds the peak"; the
plan tells "bytes per stage").

A Llama-style causal LM from a ``transformers`` config (vocabulary 1,000, hidden 128, 2 layers,
random initialisation, float32; every supported layer attributed: P = 455,680), N = 64
training sequences and Q = 16 queries of 64 tokens, EK-FAC with ``damping="auto"``, batch 8.
At this size the training gradients are cached (111 MiB) and the post-fit energy-ratio check
runs on them; under a small ``memory_limit`` they are not, and the scores stream layer by layer.

Each setting is a fresh process: it builds the model and data, runs one forward and backward
pass (the runtime's one-time allocations), reads its resident memory (``before``), asks
``plan()`` for its peak, then fits and scores, and reads the process's high-water mark
(``VmHWM``). Reported: the measured peak above ``before`` (what the run added), the plan's
peak less the model, their ratio, and for the bounded settings whether the measured peak
stayed under ``memory_limit`` (which bounds what a run adds beyond the runtime and the model).
The same settings run on the library at ``--baseline`` (exported with ``git archive``) in the
same run, for the change's before and after.

Run:  .venv/bin/python benchmarks/bench_plan_peak.py [--baseline REV] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, append_section, export_source, library_worker, provenance

RESULTS = ROOT / "benchmarks" / "results" / "plan_peak.md"
VOCAB, HIDDEN, LAYERS, LENGTH, N, Q, BATCH = 1000, 128, 2, 64, 64, 16, 8
MIB = 1 << 20
#: (label, checks, memory_limit in MiB or None, fisher): the language model's default fisher
#: draws labels ("sampled"); with "empirical" the eigenvalue pass may reuse the first pass's
#: activations (the cache, at most a quarter of memory_limit)
SETTINGS = [
    ("default", True, None, "auto"),
    ("checks=False", False, None, "auto"),
    ("memory_limit 800 MiB", True, 800, "auto"),
    ("memory_limit 600 MiB", True, 600, "auto"),
    ("memory_limit 400 MiB", True, 400, "auto"),
    ("memory_limit 200 MiB", True, 200, "auto"),
    ("empirical, memory_limit 200 MiB", True, 200, "empirical"),
    ("empirical, memory_limit 400 MiB", True, 400, "empirical"),
]


def _status(field: str) -> int:
    """A ``VmRSS`` / ``VmHWM`` line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker(checks: bool, limit_mib: int | None, fisher: str = "auto") -> dict:
    import transformers

    import infkit
    from infkit import language_modeling as lm

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=LENGTH,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(0, VOCAB, (N + Q, LENGTH), generator=torch.Generator().manual_seed(0))
    train, test = lm.examples(ids[:N]), lm.examples(ids[N:], prompt_lengths=[8] * Q)
    model(input_ids=ids[:BATCH]).logits.sum().backward()  # the runtime's one-time allocations
    model.zero_grad(set_to_none=True)
    options = {} if limit_mib is None else {"memory_limit": limit_mib * MIB}
    inf = infkit.Influence(
        infkit.Task.language_modeling(model),
        "ekfac",
        damping="auto",
        batch_size=BATCH,
        checks=checks,
        fisher=fisher,
        progress=False,
        **options,
    )
    plan = inf.plan(train, test)
    infkit.memory.release_freed_memory()
    before = _status("VmRSS")
    start = time.perf_counter()
    inf.fit(train).scores(test)
    seconds = time.perf_counter() - start
    described = inf.describe()
    return {
        "before": before,
        "peak": _status("VmHWM") - before,
        "plan": plan.peak_bytes - plan.shape.model_bytes,
        "within_limit": plan.within_limit,
        "seconds": seconds,
        "query_groups": described.get("query_groups"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("CHECKS", "LIMIT", "FISHER"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--baseline", default="949665f")
    args = parser.parse_args()
    if args.worker:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        checks, limit, fisher = args.worker
        result = worker(checks == "1", None if limit == "none" else int(limit), fisher)
        print(json.dumps(result), flush=True)
        return
    versions = {"this tree": ROOT / "src", f"at {args.baseline}": export_source(args.baseline)}
    rows = []
    for label, checks, limit, fisher in SETTINGS:
        for version, src in versions.items():
            arguments = [str(int(checks)), str(limit or "none"), fisher]
            result = library_worker(__file__, arguments, src, args.threads, f"{label} ({version})")
            print(label, version, result, flush=True)
            rows.append((label, version, limit, result))
    lines = [
        f"## Llama-style LM, vocabulary {VOCAB}, hidden {HIDDEN}, {LAYERS} layers; N = {N}, "
        f"Q = {Q} sequences of {LENGTH} tokens; EK-FAC, batch {BATCH}, {args.threads} threads",
        "",
        provenance(),
        "",
        "| setting | library | plan peak (MiB) | measured peak (MiB) | measured / plan | "
        "under the limit | time (s) | query groups |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, version, limit, r in rows:
        under = "" if limit is None else ("yes" if r["peak"] <= limit * MIB else "NO")
        lines.append(
            f"| {label} | {version} | {r['plan'] / MIB:.0f} | {r['peak'] / MIB:.0f} | "
            f"{r['peak'] / max(r['plan'], 1):.2f} | {under} | {r['seconds']:.1f} | "
            f"{r['query_groups']} |"
        )
    lines += [
        "",
        "Peaks are above the process's resident memory before the fit (the runtime, the model "
        "and one warm-up pass).",
    ]
    append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
