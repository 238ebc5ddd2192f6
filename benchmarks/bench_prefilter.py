"""Benchmark: TF-IDF two-stage scoring against full scoring on a few thousand real documents.

Corpus: the paragraphs of the docstrings of Python's standard library (real English technical
text, offline, the same on every machine with the same Python), split at random into N training
documents and Q queries, each cut to 48 word tokens (a vocabulary of the 2,000 most frequent
words). A Llama-style causal LM (``transformers`` config, float32) is trained on the training
documents for a few epochs, then EK-FAC (sampled Fisher, ``damping="auto"``) is fitted and the
queries' scores are computed two ways, one after the other in this process:

* full: ``inf.scores(queries)``, a pass over all N documents;
* two-stage (``infkit.analyses.prefilter``): the M most TF-IDF-similar training documents per
  query, then the exact scores of the union of the candidates (a pass over the union only).

Reported per M: recall@10 of the prefiltered top 10 (proponents: the largest scores) against the
full top 10, the same for the opponents, the union's size, and the two-stage time (TF-IDF and
scoring) against the full scoring time. Run: .venv/bin/python benchmarks/bench_prefilter.py
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import inspect
import pkgutil
import random
import re
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, append_section, provenance

import infkit
from infkit import language_modeling as lm
from infkit.analyses.prefilter import prefiltered_scores, recall_at_k

RESULTS = ROOT / "benchmarks" / "results" / "prefilter.md"
LENGTH, VOCAB = 48, 2000
#: modules that open windows, print or change the interpreter when imported
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "pydoc"}
WORD = re.compile(r"[a-z]+")


def _modules() -> list[str]:
    """The standard library's modules and the submodules of its packages, sorted."""
    names = set()
    for name in sys.stdlib_module_names:
        if name.startswith("_") or name in SKIP:
            continue
        names.add(name)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            for info in pkgutil.walk_packages(spec.submodule_search_locations, f"{name}."):
                parts = info.name.split(".")
                if not any(p.startswith("_") or p in SKIP or p == "test" for p in parts):
                    names.add(info.name)
    return sorted(names)


def corpus() -> list[str]:
    """Every paragraph of at least 12 words in the docstrings of the standard library's
    modules, their public classes and functions and the classes' methods, deduplicated,
    sorted."""
    paragraphs = set()
    for name in _modules():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                module = importlib.import_module(name)
            except Exception:
                continue
        docs = [inspect.getdoc(module)]
        for attr, value in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(value, "__module__", None) != name:
                continue
            if inspect.isfunction(value):
                docs.append(inspect.getdoc(value))
            elif inspect.isclass(value):
                docs.append(inspect.getdoc(value))
                for method_name, method in sorted(vars(value).items()):
                    if not method_name.startswith("_") and inspect.isfunction(method):
                        docs.append(method.__doc__ and inspect.cleandoc(method.__doc__))
        for doc in docs:
            for paragraph in (doc or "").split("\n\n"):
                text = " ".join(paragraph.split())
                if len(WORD.findall(text.lower())) >= 12:
                    paragraphs.add(text)
    return sorted(paragraphs)


def tokenise(texts: list[str], vocabulary: dict[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Word ids [n, LENGTH] (0: padding, 1: unknown) and the attention mask."""
    ids = torch.zeros(len(texts), LENGTH, dtype=torch.long)
    mask = torch.zeros(len(texts), LENGTH, dtype=torch.long)
    for i, text in enumerate(texts):
        words = [vocabulary.get(w, 1) for w in WORD.findall(text.lower())][:LENGTH]
        ids[i, : len(words)] = torch.tensor(words)
        mask[i, : len(words)] = 1
    return ids, mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--m", type=int, nargs="+", default=[25, 50, 100, 200, 400, 800])
    args = parser.parse_args()
    torch.set_num_threads(2)
    texts = corpus()
    available = len(texts)
    random.Random(0).shuffle(texts)
    texts = texts[: args.train + args.queries]
    train_texts, query_texts = texts[: args.train], texts[args.train :]
    counts = collections.Counter(w for t in train_texts for w in WORD.findall(t.lower()))
    vocabulary = {w: i + 2 for i, (w, _) in enumerate(counts.most_common(VOCAB - 2))}
    ids, mask = tokenise(texts, vocabulary)
    train = lm.examples(ids[: args.train], mask[: args.train])
    queries = lm.examples(ids[args.train :], mask[args.train :])

    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=LENGTH,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(config)
    task = infkit.Task.language_modeling(model)
    start = time.perf_counter()
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    (inputs, labels) = train
    for _ in range(args.epochs):
        for batch in torch.randperm(args.train).split(32):
            optimiser.zero_grad()
            out = model(
                input_ids=inputs["input_ids"][batch], attention_mask=inputs["attention_mask"][batch]
            ).logits
            loss = task.loss(out, labels[batch]).sum() / int(inputs["attention_mask"][batch].sum())
            loss.backward()
            optimiser.step()
    model.eval()
    train_seconds = time.perf_counter() - start

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "ekfac", damping="auto", batch_size=32, progress=False)
        start = time.perf_counter()
        inf.fit(train)
        fit_seconds = time.perf_counter() - start
        start = time.perf_counter()
        full = inf.scores(queries).double()
        full_seconds = time.perf_counter() - start
        rows = []
        for m in args.m:
            start = time.perf_counter()
            pre = prefiltered_scores(inf, queries, train_texts, query_texts, m)
            seconds = time.perf_counter() - start
            opponents = recall_at_k(pre, full, 10, largest=False)
            rows.append((m, pre.scored, recall_at_k(pre, full, 10), opponents, seconds))
            print(rows[-1], flush=True)

    tracked = sum(t.d_out * t.cols for t in inf.method.kronecker().tracked)
    lines = [
        f"## N = {args.train:,} documents, {args.queries} queries, {LENGTH} word tokens, "
        f"{tracked / 1e6:.2f}M tracked parameters",
        "",
        provenance(),
        "",
        f"Corpus: {len(texts):,} of the {available:,} docstring paragraphs of the standard "
        f"library (Python "
        f"{sys.version.split()[0]}); model trained {args.epochs} epochs in {train_seconds:.0f} s; "
        f"EK-FAC fit {fit_seconds:.1f} s; full scores {full_seconds:.1f} s.",
        "",
        "| M per query | documents scored (union) | recall@10 proponents | recall@10 opponents "
        "| two-stage time (s) | time / full scoring |",
        "|---|---|---|---|---|---|",
    ]
    for m, scored, recall, opponents, seconds in rows:
        lines.append(
            f"| {m} | {scored:,} ({scored / args.train:.0%}) | {recall:.3f} | {opponents:.3f} "
            f"| {seconds:.1f} | {seconds / full_seconds:.2f} |"
        )
    append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
