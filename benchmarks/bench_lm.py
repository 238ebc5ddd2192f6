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

Targets (issue): infkit / kronfluence total time <= 0.5 and peak memory <= 1.0; infkit total
time <= 4 passes and peak memory <= 2x a pass's; the two libraries' scores correlate >= 0.95.

Run:  .venv/bin/python benchmarks/bench_lm.py --size small|large [--train 1000] [--queries 16]
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
from harness import ROOT, measured_worker, provenance

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
def make_config(size: str):  # type: ignore[no-untyped-def]
    from transformers import LlamaConfig

    hidden, intermediate, layers, heads = SIZES[size]
    return LlamaConfig(
        vocab_size=VOCAB,
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


def write_problem(directory: Path, size: str, n_train: int, n_query: int) -> None:
    """Model weights and token data, written once for every worker."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(make_config(size))
    gen = torch.Generator().manual_seed(0)
    # a random bigram chain: each token has 8 likely successors
    successors = torch.randint(0, VOCAB, (VOCAB, 8), generator=gen)
    total = n_train + n_query
    ids = torch.empty(total, LENGTH, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (total,), generator=gen)
    for t in range(1, LENGTH):
        pick = torch.randint(0, 8, (total,), generator=gen)
        ids[:, t] = successors[ids[:, t - 1], pick]
    torch.save({"state": model.state_dict(), "ids": ids}, directory / "problem.pt")
    config = {"size": size, "n_train": n_train, "n_query": n_query}
    (directory / "config.json").write_text(json.dumps(config))


def load_problem(directory: Path):  # type: ignore[no-untyped-def]
    from transformers import LlamaForCausalLM

    config = json.loads((directory / "config.json").read_text())
    data = torch.load(directory / "problem.pt")
    model = LlamaForCausalLM(make_config(config["size"]))
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
    task = infkit.Task.language_modeling(model)
    start = time.perf_counter()
    inf = infkit.Influence(
        task,
        "ekfac",
        l2=0.0,
        damping="auto",
        batch_size=BATCH,
        modules=tracked_modules(model),
        fisher="sampled",
    )
    inf.fit(infkit.language_modeling.examples(train))
    fit_seconds = time.perf_counter() - start
    scores = inf.scores(infkit.language_modeling.examples(queries))
    total = time.perf_counter() - start
    torch.save(scores, directory / "infkit_scores.pt")
    return {"seconds": total, "fit_seconds": fit_seconds, "describe": _plain(inf.describe())}


def kronfluence_worker(directory: Path) -> dict:
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

    return kronfluence_ekfac(
        model, LanguageModeling(), Sequences(train), Sequences(queries), directory, "lm", BATCH
    )


def kronfluence_ekfac(  # type: ignore[no-untyped-def]
    model, task, train, queries, directory: Path, name: str, batch_size: int
) -> dict:
    """kronfluence's EK-FAC factors (``fit_all_factors``) and pairwise scores of ``queries``
    against ``train`` on CPU, timed; the scores saved as ``kronfluence_scores.pt``."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments

    model = prepare_model(model, task)
    analyzer = Analyzer(
        analysis_name=name,
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(directory / "kronfluence"),
    )
    start = time.perf_counter()
    analyzer.fit_all_factors(
        factors_name="ekfac",
        dataset=train,
        per_device_batch_size=batch_size,
        factor_args=FactorArguments(strategy="ekfac"),
        overwrite_output_dir=True,
    )
    fit_seconds = time.perf_counter() - start
    analyzer.compute_pairwise_scores(
        scores_name="scores",
        factors_name="ekfac",
        query_dataset=queries,
        train_dataset=train,
        per_device_query_batch_size=len(queries),
        per_device_train_batch_size=batch_size,
        score_args=ScoreArguments(damping_factor=None),
        overwrite_output_dir=True,
    )
    total = time.perf_counter() - start
    scores = analyzer.load_pairwise_scores("scores")["all_modules"]
    torch.save(scores.double(), directory / "kronfluence_scores.pt")
    return {"seconds": total, "fit_seconds": fit_seconds}


def _plain(obj: object) -> object:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


WORKERS = {"pass": pass_worker, "infkit": infkit_worker, "kronfluence": kronfluence_worker}


# ============================================================================ driver
def run(kind: str, directory: Path, threads: int, script: str = __file__) -> dict:
    """Run ``script --worker kind directory`` in a fresh process under ``/usr/bin/time -v``:
    its JSON result with its peak resident memory."""
    python = PEER_PYTHON if kind == "kronfluence" else Path(sys.executable)
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
    parser.add_argument("--only", nargs="+", default=["pass", "infkit", "kronfluence"])
    args = parser.parse_args()
    if args.worker:
        kind, directory = args.worker
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(WORKERS[kind](Path(directory))), flush=True)
        return
    directory = Path(tempfile.mkdtemp(prefix="bench-lm-"))
    write_problem(directory, args.size, args.train, args.queries)
    model, *_ = load_problem(directory)
    tracked = sum(m.weight.numel() for n, m in model.named_modules() if n in tracked_modules(model))
    results = {}
    for kind in args.only:
        results[kind] = run(kind, directory, args.threads)
        print(kind, json.dumps({k: v for k, v in results[kind].items() if k != "describe"}))
    report(args, tracked, results, directory)


def report(args: argparse.Namespace, tracked: int, results: dict, directory: Path) -> None:
    title = (
        f"## {args.size}: {tracked / 1e6:.1f}M tracked parameters, N = {args.train:,} sequences "
        f"of {LENGTH} tokens, {args.queries} queries, batch {BATCH}, {args.threads} threads"
    )
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
    if {"infkit", "kronfluence"} <= set(results):
        ours, peer = results["infkit"], results["kronfluence"]
        S = torch.load(directory / "infkit_scores.pt").double().flatten()
        K = torch.load(directory / "kronfluence_scores.pt").double().flatten()
        r = float(torch.corrcoef(torch.stack([S, K]))[0, 1])
        lines += [
            "",
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
    text = "\n".join(lines) + "\n"
    print(text)
    with path.open("a") as out:
        out.write("\n" + text)


if __name__ == "__main__":
    main()
