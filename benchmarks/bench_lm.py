"""Benchmark: EK-FAC on a causal language model, infkit against kronfluence 1.0.1, one run.

A Llama-style causal LM from a ``transformers`` config (random initialisation, float32) reads
token sequences of length 128 drawn from a fixed random bigram chain (so that the text has
structure the model's gradients can tell apart). Both libraries fit EK-FAC factors with the true
Fisher (labels sampled from the model), track the same modules (every ``nn.Linear`` of the
decoder layers; embeddings, norms and the output head are left out), use kronfluence's heuristic
damping (0.1 x the mean eigenvalue of each module; infkit ``damping="auto"``, ``l2=0``) and the
same batch size, and compute the pairwise scores of Q queries against N training sequences.

Each measurement is a fresh process under ``/usr/bin/time -v`` (its peak resident memory), one
after the other on the same model and data (written once by this script):

* ``pass``: one forward and backward pass of the summed loss over the training data (batch by
  batch, ``torch.func``-free): the physical unit of this work;
* ``infkit``: ``Influence(task, "ekfac", ...).fit(train)`` then ``scores(queries)``;
* ``kronfluence``: ``fit_all_factors`` then ``compute_pairwise_scores`` (its own venv,
  ``Analyzer(cpu=True)``).

* ``astra`` (opt-in: name it in ``--only``): the reference both EK-FACs approximate, infkit's
  ``method="astra"`` (EK-FAC-preconditioned block CG towards the exact damped GGN solve) on the
  first ``--astra-queries`` queries with ``maxiter=--astra-iterations``. ASTRA takes no
  ``damping="auto"`` (its answer has one ridge for every parameter, not kronfluence's per-module
  heuristic), so the worker first fits EK-FAC with ``damping="auto"`` (the same factors as
  ``infkit``, kept in the problem directory and then reused by ASTRA, no refit) and gives ASTRA
  the scalar damping ``0.1 x`` the mean of all the EK-FAC eigenvalues of the tracked
  parameters (the per-module heuristic's values averaged over the parameters); the preconditioner
  is EK-FAC with that same scalar damping. It also scores the queries with that EK-FAC (ASTRA's
  first iterate), which separates the approximation's error from the damping convention's.
  Each iteration is one GGN-product pass over the training data for all the queries (plus one
  for the first residual and one for the last). The worker leaves out infkit's stationarity
  pass and drift check for ASTRA: diagnostics that do not change the scores and, on this
  untrained model, would cost more than the iteration (up to 100 CG iterations on the GGN of
  256 training sequences). It scores the queries in one block (as the facade does for the
  iterative solvers, ``Method.solves_together``) and multiplies by the GGN ``BATCH`` sequences
  at a time (ASTRA's default is 4 x that; the products take a few directions at a time, see
  ``infkit.curvature.PRODUCT_WORK_BYTES``).
* ``kronfluence-scalar`` (opt-in, after ``kronfluence``): kronfluence's scores from the factors it
  fitted at one scalar damping, computed by the rule ASTRA's worker uses from kronfluence's own
  eigenvalues, so that both EK-FACs meet ASTRA at the same damping convention.

Targets (issue): infkit / kronfluence total time <= 0.5 and peak memory <= 1.0; infkit total
time <= 4 passes and peak memory <= 2x a pass's; the two libraries' scores correlate >= 0.95.
ASTRA has no target: the report gives the Pearson r of its scores with each library's (all the
scores of its queries, and the mean over the queries of each query's r) and the relative
residual it reached.

Run:  .venv/bin/python benchmarks/bench_lm.py --size small|large [--train 1000] [--queries 16]
      [--only pass infkit kronfluence astra kronfluence-scalar] [--astra-queries 4]
      [--astra-iterations 2]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, kronfluence_analyzer, kronfluence_pairwise, measured_worker, provenance

PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
RESULTS = ROOT / "benchmarks" / "results" / "lm.md"
SIZES = {
    # hidden, intermediate, layers, heads: about 10M and 50M tracked parameters
    "tiny": (64, 128, 2, 4),
    "small": (384, 1024, 6, 6),
    "large": (768, 2048, 7, 12),
}
VOCAB, LENGTH, BATCH = 2048, 128, 8


# ============================================================================ problem
def make_config(size: str, vocab: int = VOCAB):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads = SIZES[size]
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=LENGTH,
        attn_implementation="eager",
    )


def tracked_modules(model: torch.nn.Module) -> list[str]:
    """Every nn.Linear of the decoder layers (not the output head)."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and ".layers." in name
    ]


def benchmark_influence(model: torch.nn.Module, **options: Any):  # type: ignore[no-untyped-def]
    """infkit's side of the comparison: EK-FAC over ``tracked_modules``, the sampled Fisher,
    kronfluence's per-module damping heuristic, batch ``BATCH``, no weight decay."""
    import infkit

    return infkit.Influence(
        infkit.Task.language_modeling(model),
        "ekfac",
        l2=0.0,
        damping="auto",
        batch_size=BATCH,
        modules=tracked_modules(model),
        fisher="sampled",
        **options,
    )


def write_problem(
    directory: Path, size: str, n_train: int, n_query: int, vocab: int = VOCAB
) -> None:
    """Model weights and token data, written once for every worker."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(make_config(size, vocab))
    gen = torch.Generator().manual_seed(0)
    # a random bigram chain: each token has 8 likely successors
    successors = torch.randint(0, vocab, (vocab, 8), generator=gen)
    total = n_train + n_query
    ids = torch.empty(total, LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (total,), generator=gen)
    for t in range(1, LENGTH):
        pick = torch.randint(0, 8, (total,), generator=gen)
        ids[:, t] = successors[ids[:, t - 1], pick]
    torch.save({"state": model.state_dict(), "ids": ids}, directory / "problem.pt")
    config = {"size": size, "n_train": n_train, "n_query": n_query, "vocab": vocab}
    (directory / "config.json").write_text(json.dumps(config))


def load_problem(directory: Path):  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    config = json.loads((directory / "config.json").read_text())
    data = torch.load(directory / "problem.pt")
    model = LlamaForCausalLM(make_config(config["size"], config.get("vocab", VOCAB)))
    model.load_state_dict(data["state"])
    model.eval()
    ids = data["ids"]
    return model, ids[: config["n_train"]], ids[config["n_train"] :], config


# ============================================================================ workers
def _next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


def pass_worker(directory: Path) -> dict:
    """One forward and backward pass of the summed loss over the training data."""
    model, train, _, _ = load_problem(directory)
    start = time.perf_counter()
    for batch in train.split(BATCH):
        model.zero_grad(set_to_none=True)
        _next_token_loss(model(input_ids=batch).logits, batch).backward()
    return {"seconds": time.perf_counter() - start}


def infkit_worker(directory: Path) -> dict:
    import infkit

    model, train, queries, _ = load_problem(directory)
    settings = json.loads((directory / "infkit.json").read_text())
    start = time.perf_counter()
    # the factors committed to disk, as kronfluence keeps them: the scoring pass sets them aside
    # (and, under a memory_limit that the queries exceed, keeps the queries beside them)
    inf = benchmark_influence(
        model, factors_dir=directory / "infkit-factors", memory_limit=settings["memory_limit"]
    )
    inf.fit(infkit.language_modeling.examples(train))
    fit_seconds = time.perf_counter() - start
    scores = inf.scores(infkit.language_modeling.examples(queries))
    total = time.perf_counter() - start
    torch.save(scores, directory / "infkit_scores.pt")
    return {"seconds": total, "fit_seconds": fit_seconds, "describe": _plain(inf.describe())}


def kronfluence_problem(directory: Path):  # type: ignore[no-untyped-def]
    """The model, kronfluence's task and the training and query datasets (peer venv only)."""
    from kronfluence.task import Task

    model, train, queries, _ = load_problem(directory)
    modules = tracked_modules(model)

    class LanguageModeling(Task):
        def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
            logits = model(input_ids=batch["input_ids"]).logits
            labels = batch["labels"]
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits[:, :-1].detach(), dim=-1)
                    drawn = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1)
                    labels = labels.clone()
                    labels[:, 1:] = drawn.reshape(labels[:, 1:].shape)
            return _next_token_loss(logits, labels)

        def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
            return _next_token_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"])

        def get_influence_tracked_modules(self):  # type: ignore[no-untyped-def]
            return modules

    class Sequences(torch.utils.data.Dataset):
        def __init__(self, ids: torch.Tensor) -> None:
            self.ids = ids

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    return model, LanguageModeling(), Sequences(train), Sequences(queries)


def kronfluence_worker(directory: Path) -> dict:
    model, task, train, queries = kronfluence_problem(directory)
    return kronfluence_ekfac(model, task, train, queries, directory, "lm", BATCH)


def kronfluence_scalar_worker(directory: Path) -> dict:
    """kronfluence's scores at one scalar damping, from the factors ``kronfluence`` fitted (no
    refit): the damping ASTRA's worker takes, computed the same way from kronfluence's own
    eigenvalues (each module's heuristic, 0.1 x its mean corrected eigenvalue, averaged over the
    parameters), so that the two EK-FACs are compared with ASTRA at one convention each."""
    from kronfluence.analyzer import prepare_model

    model, task, train, queries = kronfluence_problem(directory)
    modules = tracked_modules(model)  # before prepare_model wraps each of them
    model = prepare_model(model, task)
    analyzer = kronfluence_analyzer(model, task, directory / "kronfluence", "lm")
    factors = analyzer.load_all_factors("ekfac")
    # stored as sums over the examples; kronfluence divides them by the count before damping
    eigenvalues = {
        name: factors["lambda_matrix"][name].double() / factors["num_lambda_processed"][name]
        for name in modules
    }
    sizes = {name: eigenvalues[name].numel() for name in modules}
    heuristic = {name: 0.1 * float(eigenvalues[name].mean()) for name in modules}
    damping = sum(sizes[m] * heuristic[m] for m in modules) / sum(sizes.values())
    start = time.perf_counter()
    kronfluence_pairwise(analyzer, "scalar", train, queries, BATCH, damping)
    seconds = time.perf_counter() - start
    scores = analyzer.load_pairwise_scores("scalar")["all_modules"]
    torch.save(scores.double(), directory / "kronfluence_scalar_scores.pt")
    return {"seconds": seconds, "damping": damping}


def kronfluence_ekfac(  # type: ignore[no-untyped-def]
    model, task, train, queries, directory: Path, name: str, batch_size: int
) -> dict:
    """kronfluence's EK-FAC factors (``fit_all_factors``) and pairwise scores of ``queries``
    against ``train`` on CPU, timed; the scores saved as ``kronfluence_scores.pt``."""
    from kronfluence.analyzer import prepare_model
    from kronfluence.arguments import FactorArguments

    model = prepare_model(model, task)
    analyzer = kronfluence_analyzer(model, task, directory / "kronfluence", name)
    start = time.perf_counter()
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=train,
        per_device_batch_size=batch_size,
        factor_args=FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )
    fit_seconds = time.perf_counter() - start
    kronfluence_pairwise(analyzer, "scores", train, queries, batch_size, None)
    total = time.perf_counter() - start
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    torch.save(scores.double(), directory / "kronfluence_scores.pt")
    return {"seconds": total, "fit_seconds": fit_seconds}


def astra_worker(directory: Path) -> dict:
    """ASTRA's scores of the first queries (settings in ``astra.json``): EK-FAC with
    ``damping="auto"`` for the heuristic's per-module values, then ASTRA with their
    parameter-weighted mean as its scalar damping, on the same factors (loaded, not refitted)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _astra(directory)
    texts = list(dict.fromkeys(str(w.message) for w in caught))  # each once, in order
    # ASTRA reports the residual it stopped at only in its warning (none: converged to tol)
    found = [re.search(r"ASTRA stopped .* relative residual of ([0-9.e+-]+)", t) for t in texts]
    residuals = [float(f.group(1)) for f in found if f is not None]
    return {**result, "relative_residual": max(residuals) if residuals else None, "warnings": texts}


def _astra(directory: Path) -> dict:
    import infkit
    from infkit import diagnostics
    from infkit.methods.astra import ASTRA

    settings = json.loads((directory / "astra.json").read_text())
    model, train, queries, _ = load_problem(directory)
    queries = infkit.language_modeling.examples(queries[: settings["queries"]])
    train = infkit.language_modeling.examples(train)
    task = infkit.Task.language_modeling(model)
    modules = tracked_modules(model)
    common: dict[str, Any] = {
        "l2": 0.0,
        "batch_size": BATCH,
        "modules": modules,
        "fisher": "sampled",
        "factors_dir": str(directory / "astra-factors"),
    }
    start, cpu = time.perf_counter(), time.process_time()
    ekfac = infkit.Influence(task, "ekfac", damping="auto", **common).fit(train)
    fit_seconds = time.perf_counter() - start
    module_damping = ekfac.describe()["module_damping"]
    sizes = {
        name: sum(p.numel() for p in model.get_submodule(name).parameters()) for name in modules
    }
    damping = sum(sizes[m] * module_damping[m] for m in modules) / sum(sizes.values())
    # EK-FAC at that scalar damping: ASTRA's first iterate (and its preconditioner)
    scalar = infkit.Influence(task, "ekfac", damping=damping, **common).fit(train)
    torch.save(scalar.scores(queries), directory / "ekfac_scalar_scores.pt")
    # Not part of the answer, and left out: the stationarity pass (a pass over the data) and the
    # drift check that follows it on this untrained model (up to 100 CG iterations on the GGN of
    # 256 examples, for a method without a cheap solve): neither changes the IF scores.
    ASTRA.stationarity_pass = False
    diagnostics.drift = lambda *args, **kwargs: None
    # One block CG for all the queries (one GGN pass per iteration for all of them): the facade
    # sizes its chunks of queries by 24 bytes per parameter a query, above its 32 MiB budget
    # here, and would solve (and score) them one by one, each its own CG.
    ASTRA.query_row_bytes = lambda self, n, p, estimator=None: 3 * n * 8  # type: ignore[method-assign]
    mark = time.perf_counter()
    # GGN products BATCH sequences at a time: the default, 4 x batch_size, takes about 3.7 GiB
    # per query on the small model (a 19-22 GiB peak at 4 queries, 6.4 GiB with BATCH), no faster
    astra = infkit.Influence(
        task,
        "astra",
        damping=damping,
        maxiter=settings["iterations"],
        product_batch_size=BATCH,
        **common,
    ).fit(train)
    astra_fit = time.perf_counter()
    scores = astra.scores(queries)
    end = time.perf_counter()
    torch.save(scores, directory / "astra_scores.pt")
    described = astra.describe()
    return {
        "seconds": end - start,
        "cpu_seconds": time.process_time() - cpu,  # all threads: a check on a busy machine
        "fit_seconds": fit_seconds,
        "ekfac_scalar_seconds": mark - start - fit_seconds,
        "astra_fit_seconds": astra_fit - mark,
        "astra_scores_seconds": end - astra_fit,
        "queries": settings["queries"],
        "maxiter": settings["iterations"],
        "damping": damping,
        "module_damping_range": [min(module_damping.values()), max(module_damping.values())],
        "iterations": described.get("iterations"),
        "factors_loaded": described.get("preconditioner", {}).get("factors_loaded"),
        "checks": _plain({k: described[k] for k in ("curvature_scale", "drift") if k in described}),
        "stationarity": described.get("stationarity"),
    }


def _plain(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


WORKERS = {"pass": pass_worker, "infkit": infkit_worker, "kronfluence": kronfluence_worker}
#: run only when named in --only (bench_minilm.py takes its default --only from WORKERS)
OPT_IN_WORKERS = {"astra": astra_worker, "kronfluence-scalar": kronfluence_scalar_worker}


# ============================================================================ driver
def run(kind: str, directory: Path, threads: int, script: str = __file__) -> dict:
    """Run ``script --worker kind directory`` in a fresh process under ``/usr/bin/time -v``:
    its JSON result with its peak resident memory."""
    python = PEER_PYTHON if kind.startswith("kronfluence") else Path(sys.executable)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    cmd = [str(python), script, "--worker", kind, str(directory)]
    result, peak = measured_worker(cmd, env, kind)
    result["peak_bytes"] = peak
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "DIR"))
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--only",
        nargs="+",
        default=list(WORKERS),
        choices=[*WORKERS, *OPT_IN_WORKERS],
        help="the workers to run, in order (astra only when named)",
    )
    parser.add_argument(
        "--memory-limit",
        type=float,
        default=None,
        help="infkit's memory_limit in GiB (default: none, every query held in memory)",
    )
    parser.add_argument("--astra-queries", type=int, default=4, help="queries ASTRA scores")
    parser.add_argument("--astra-iterations", type=int, default=2, help="ASTRA's maxiter")
    args = parser.parse_args()
    if args.worker:
        kind, directory = args.worker
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps({**WORKERS, **OPT_IN_WORKERS}[kind](Path(directory))), flush=True)
        return
    directory = Path(tempfile.mkdtemp(prefix="bench-lm-"))
    write_problem(directory, args.size, args.train, args.queries)
    astra = {"queries": min(args.astra_queries, args.queries), "iterations": args.astra_iterations}
    (directory / "astra.json").write_text(json.dumps(astra))
    limit = None if args.memory_limit is None else int(args.memory_limit * (1 << 30))
    (directory / "infkit.json").write_text(json.dumps({"memory_limit": limit}))
    model, *_ = load_problem(directory)
    tracked = sum(m.weight.numel() for n, m in model.named_modules() if n in tracked_modules(model))
    results = {}
    for kind in args.only:
        results[kind] = run(kind, directory, args.threads)
        shown = {k: v for k, v in results[kind].items() if k not in ("describe", "warnings")}
        print(kind, json.dumps(shown))
    report(args, tracked, results, directory)


def report(args: argparse.Namespace, tracked: int, results: dict, directory: Path) -> None:
    title = (
        f"## {args.size}: {tracked / 1e6:.1f}M tracked parameters, N = {args.train:,} sequences "
        f"of {LENGTH} tokens, {args.queries} queries, batch {BATCH}, {args.threads} threads"
    )
    if args.memory_limit is not None:
        title += f", infkit's memory_limit {args.memory_limit:g} GiB"
    write_report(title, results, directory, RESULTS)


def write_report(title: str, results: dict, directory: Path, path: Path) -> None:
    """The table and the ratios against the targets, printed and appended to ``path``."""
    gib = 1 << 30
    lines = [
        title,
        "",
        provenance(
            {"peer venv .venv-peers": (PEER_PYTHON, ["kronfluence", "torch", "transformers"])}
        ),
        "",
        "| run | total (s) | factors (s) | peak RSS (GiB) |",
        "|---|---|---|---|",
    ]
    for kind, r in results.items():
        fit = r.get("fit_seconds")
        lines.append(
            f"| {kind} | {r['seconds']:.1f} | {'' if fit is None else f'{fit:.1f}'} | "
            f"{r['peak_bytes'] / gib:.2f} |"
        )
    lines.append("")  # the ratios below the table, not rows of it
    if {"infkit", "kronfluence"} <= set(results):
        ours, peer = results["infkit"], results["kronfluence"]
        S = torch.load(directory / "infkit_scores.pt").double().flatten()
        K = torch.load(directory / "kronfluence_scores.pt").double().flatten()
        r = float(torch.corrcoef(torch.stack([S, K]))[0, 1])
        lines += [
            f"infkit / kronfluence: time {ours['seconds'] / peer['seconds']:.2f} (target <= 0.5), "
            f"peak memory {ours['peak_bytes'] / peer['peak_bytes']:.2f} (target <= 1.0); "
            f"scores' Pearson r = {r:.4f} (target >= 0.95).",
        ]
    if {"infkit", "pass"} <= set(results):
        ours, unit = results["infkit"], results["pass"]
        lines.append(
            f"infkit / one forward+backward pass: time {ours['seconds'] / unit['seconds']:.2f} "
            f"(target <= 4), peak memory {ours['peak_bytes'] / unit['peak_bytes']:.2f} "
            "(target <= 2)."
        )
    if "infkit" in results and "describe" in results["infkit"]:
        described = results["infkit"]["describe"]
        on_disk = described.get("queries_on_disk", 0)
        lines.append(
            f"infkit's scoring: {described.get('query_groups')} pass(es) over the training data, "
            f"query rank {described.get('query_rank')}, "
            f"{on_disk / (1 << 30):.2f} GiB of preconditioned queries kept on disk."
        )
    if "astra" in results:
        lines.append(astra_line(results["astra"], results, directory))
    text = "\n".join(lines) + "\n"
    print(text)
    with path.open("a") as out:
        out.write("\n" + text)


def astra_line(astra: dict, results: dict, directory: Path) -> str:
    """ASTRA's settings and residual, and the Pearson r of its scores [Q, N] with each EK-FAC's
    on the same queries: over all the scores, and the mean of the per-query r."""
    A = torch.load(directory / "astra_scores.pt").double()
    compared = [("EK-FAC at ASTRA's scalar damping", "ekfac_scalar_scores.pt")]
    if "kronfluence-scalar" in results:
        damping = results["kronfluence-scalar"]["damping"]
        label = f"kronfluence at its own scalar damping ({damping:.3g}, the same rule)"
        compared.append((label, "kronfluence_scalar_scores.pt"))
    compared += [
        (f"{kind} (per-module damping)", f"{kind}_scores.pt")
        for kind in ("infkit", "kronfluence")
        if kind in results
    ]
    parts = []
    for label, name in compared:
        B = torch.load(directory / name).double()[: len(A)]
        assert B.shape == A.shape, (name, B.shape, A.shape)
        overall = float(torch.corrcoef(torch.stack([A.flatten(), B.flatten()]))[0, 1])
        rows = [float(torch.corrcoef(torch.stack([a, b]))[0, 1]) for a, b in zip(A, B)]
        parts.append(f"{label} {overall:.4f} (per-query mean {sum(rows) / len(rows):.4f})")
    residual = astra.get("relative_residual")
    if astra["maxiter"] == 0:
        reached = "not computed (maxiter 0 is EK-FAC's answer)"
    else:
        reached = "below tol" if residual is None else f"{residual:.2e}"
    return (
        f"ASTRA (block CG, maxiter {astra['maxiter']}, first {astra['queries']} queries, scalar "
        f"damping {astra['damping']:.3g} = the heuristic's per-module values "
        f"{astra['module_damping_range'][0]:.3g} to {astra['module_damping_range'][1]:.3g} "
        f"averaged over the parameters): relative residual {reached}; scores' Pearson r with "
        + ", ".join(parts)
        + "."
    )


if __name__ == "__main__":
    main()
