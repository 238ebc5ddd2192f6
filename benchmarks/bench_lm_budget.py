"""Benchmark: a scoring run under a memory budget, at the 50M size of bench_lm.py.

The Llama-style LM of ``bench_lm.py --size large`` (about 50M tracked parameters), EK-FAC with
the true Fisher and heuristic damping, factors fitted once and saved (``factors_dir``). Then
three fresh processes, each under ``/usr/bin/time -v``:

* ``baseline``: imports, loads the model and the data, nothing else (the runtime and the model);
* ``unbounded``: reloads the factors and scores the queries with a generous ``memory_limit``
  (every preconditioned query held at once: the largest object of the run);
* ``bounded``: the same with ``memory_limit`` = a quarter of the unbounded run's peak. The
  queries that do not fit the limit less the factors and a pass's working memory are kept on
  disk (in a scratch directory of ``factors_dir``) and read back layer by layer for every
  batch of one scoring pass (``queries_on_disk``, the default on CPU);
* ``grouped``: the same limit with ``queries_on_disk=False``: the queries scored in
  groups that fit, one pass over the training data each.

With ``--split modules`` or ``--split tokens`` each scoring run asks for the per-module or
per-token scores (``module_scores``, ``token_scores`` of every training sequence) instead, which
take the scoring passes of ``scores`` within a budget that counts their larger results; the
runs' splits are compared with the unbounded run's.

A run that cannot meet the limit in its way (the groups need the factors in memory beside
each group of queries) is reported as refused, with infkit's message.

Targets (issue): the bounded run finishes, its peak stays under the limit plus the model (read:
plus the baseline process, the runtime with the model loaded), and its scores equal the
unbounded run's.

Run:  .venv/bin/python benchmarks/bench_lm_budget.py [--train 16] [--queries 32] [--split modules]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_lm import BATCH, VOCAB, load_problem, run, tracked_modules, write_problem
from harness import ROOT, provenance

RESULTS = ROOT / "benchmarks" / "results" / "lm_budget.md"
GENEROUS = 20 << 30


def _influence(  # type: ignore[no-untyped-def]
    model: torch.nn.Module, directory: Path, limit: int, on_disk: bool | None = None
):
    import infkit

    return infkit.Influence(
        infkit.Task.language_modeling(model),
        "ekfac",
        damping="auto",
        batch_size=BATCH,
        modules=tracked_modules(model),
        fisher="sampled",
        factors_dir=str(directory / "factors"),
        memory_limit=limit,
        queries_on_disk=on_disk,
        progress=False,
    )


def factors_worker(directory: Path) -> dict:
    import infkit

    model, train, _, _ = load_problem(directory)
    start = time.perf_counter()
    _influence(model, directory, GENEROUS).fit(infkit.language_modeling.examples(train))
    return {"seconds": time.perf_counter() - start}


def baseline_worker(directory: Path) -> dict:
    import infkit  # noqa: F401  (the runtime a scoring run has)

    model, *_ = load_problem(directory)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"seconds": 0.0, "model_bytes": model_bytes}


def score_worker(directory: Path) -> dict:
    import infkit

    limit = int(os.environ["BUDGET_LIMIT"])
    on_disk = {"default": None, "no": False}[os.environ.get("BUDGET_ON_DISK", "default")]
    model, train, queries, _ = load_problem(directory)
    start = time.perf_counter()
    inf = _influence(model, directory, limit, on_disk)
    inf.fit(infkit.language_modeling.examples(train))
    split = os.environ.get("BUDGET_SPLIT", "scores")
    examples = infkit.language_modeling.examples(queries)
    try:
        if split == "modules":
            parts = inf.module_scores(examples)
            scores = torch.stack([parts[name] for name in sorted(parts)])
        elif split == "tokens":
            tokens = inf.token_scores(examples)
            scores = torch.cat([tokens.tokens, tokens.rest.unsqueeze(-1)], dim=-1)
        else:
            scores = inf.scores(examples)
    except infkit.errors.ProblemTooLargeError as error:  # the limit cannot be met this way
        return {"seconds": time.perf_counter() - start, "limit": limit, "refused": str(error)}
    seconds = time.perf_counter() - start
    name = f"scores-{limit}-{os.environ.get('BUDGET_ON_DISK', 'default')}.pt"
    torch.save(scores, directory / name)
    describe = inf.describe()
    return {
        "seconds": seconds,
        "limit": limit,
        "scores": name,
        "query_groups": describe["query_groups"],
        "query_rank": describe["query_rank"],
        "queries_on_disk": describe["queries_on_disk"],
    }


WORKERS = {
    "factors": factors_worker,
    "baseline": baseline_worker,
    "unbounded": score_worker,
    "bounded": score_worker,
    "grouped": score_worker,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "DIR"))
    parser.add_argument("--size", choices=["tiny", "small", "large"], default="large")
    parser.add_argument("--train", type=int, default=16)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--split", choices=["scores", "modules", "tokens"], default="scores")
    parser.add_argument(
        "--vocab", type=int, default=VOCAB, help="the vocabulary (default bench_lm.py's)"
    )
    args = parser.parse_args()
    if args.worker:
        kind, directory = args.worker
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(WORKERS[kind](Path(directory))), flush=True)
        return
    os.environ["BUDGET_SPLIT"] = args.split
    directory = Path(tempfile.mkdtemp(prefix="bench-lm-budget-"))
    write_problem(directory, args.size, args.train, args.queries, args.vocab)
    model, *_ = load_problem(directory)
    tracked = sum(m.weight.numel() for n, m in model.named_modules() if n in tracked_modules(model))
    results = {}
    for kind in ("factors", "baseline", "unbounded", "bounded", "grouped"):
        if kind == "unbounded":
            os.environ["BUDGET_LIMIT"] = str(GENEROUS)
        if kind == "bounded":
            os.environ["BUDGET_LIMIT"] = str(results["unbounded"]["peak_bytes"] // 4)
        if kind == "grouped":
            os.environ["BUDGET_ON_DISK"] = "no"
        results[kind] = run(kind, directory, args.threads, script=__file__)
        print(kind, json.dumps(results[kind]), flush=True)
    report(args, tracked, results, directory)


def report(args: argparse.Namespace, tracked: int, results: dict, directory: Path) -> None:
    gib = 1 << 30
    free, base = results["unbounded"], results["baseline"]
    S0 = torch.load(directory / free["scores"]).double()
    allowed = results["bounded"]["limit"] + base["peak_bytes"]
    lines = [
        f"## {args.size}: {tracked / 1e6:.1f}M tracked parameters, N = {args.train} sequences of 128 tokens, "
        f"{args.queries} queries, batch {BATCH}, {args.threads} threads"
        + ("" if args.vocab == VOCAB else f", vocabulary {args.vocab:,}")
        + ("" if args.split == "scores" else f", {args.split[:-1]} scores"),
        "",
        provenance(),
        "",
        "| run | memory_limit (GiB) | peak RSS (GiB) | time (s) | query groups | query rank "
        "| queries on disk (GiB) |",
        "|---|---|---|---|---|---|---|",
        f"| factors (fit once, saved) | | {results['factors']['peak_bytes'] / gib:.2f} | "
        f"{results['factors']['seconds']:.1f} | | | |",
        f"| baseline (runtime + model) | | {base['peak_bytes'] / gib:.2f} | | | | |",
    ]
    for kind in ("unbounded", "bounded", "grouped"):
        r = results[kind]
        if "refused" in r:
            lines.append(
                f"| {kind} | {r['limit'] / gib:.2f} | {r['peak_bytes'] / gib:.2f} | "
                f"{r['seconds']:.1f} | refused | | |"
            )
            continue
        lines.append(
            f"| {kind} | {r['limit'] / gib:.2f} | {r['peak_bytes'] / gib:.2f} | "
            f"{r['seconds']:.1f} | {r['query_groups']} | {r['query_rank']} | "
            f"{r['queries_on_disk'] / gib:.2f} |"
        )
    lines.append("")
    for kind in ("bounded", "grouped"):
        r = results[kind]
        if "refused" in r:
            lines.append(f"{kind}: refused (ProblemTooLargeError): {r['refused']}")
            continue
        S1 = torch.load(directory / r["scores"]).double()
        error = float((S1 - S0).norm() / S0.norm())
        lines.append(
            f"{kind}: peak {r['peak_bytes'] / gib:.2f} GiB against limit + baseline "
            f"{allowed / gib:.2f} GiB ({'within' if r['peak_bytes'] <= allowed else 'ABOVE'}); "
            f"{r['seconds'] / free['seconds']:.2f}x the unbounded run's time; "
            f"{args.split if args.split != 'scores' else 'scores'}' relative difference to the "
            f"unbounded run {error:.1e}."
        )
    lines.append(f"The model's parameters take {base['model_bytes'] / gib:.2f} GiB.")
    text = "\n".join(lines) + "\n"
    print(text)
    with RESULTS.open("a") as out:
        out.write("\n" + text)


if __name__ == "__main__":
    main()
