"""EK-FAC plans for Llama-style models too large for this machine, on PyTorch's meta device.

Builds 1B, 8B and 70B-parameter Llama configurations (the shapes of Llama 3.2 1B, Llama 3.1 8B
and 70B) with ``transformers`` on the meta device (no weight allocated), in bfloat16, tracks every
``nn.Linear`` of the decoder layers, and prints ``Influence(...).plan(...)`` for N = 100,000
training sequences of 2,048 tokens, 64 queries, batch 1 per process (2,048-token sequences), on 1, 8 and 64 processes,
with a budget of 64 GiB per process (an 80 GB GPU less the model and working room).
The table goes to benchmarks/results/plan_llama.md (and docs/methods/language_models.md §6).

Run:  .venv/bin/python benchmarks/plan_llama.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, provenance

import infkit
from infkit.memory import human_bytes

CONFIGS = {
    # hidden, intermediate, layers, heads, kv heads, vocabulary, tied embeddings (Llama 3.2 1B
    # ties its output layer to the token embeddings; without it the model is 1.50B, 2.8 GiB)
    "1B": (2048, 8192, 16, 32, 8, 128256, True),
    "8B": (4096, 14336, 32, 32, 8, 128256, False),
    "70B": (8192, 28672, 80, 64, 8, 128256, False),
}
N_TRAIN, N_QUERIES, LENGTH, BATCH = 100_000, 64, 2048, 1
LIMIT = 64 * 2**30  # per process: an 80 GB GPU, less the bf16 model of the 8B and room to work


def meta_model(name: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, layers, heads, kv, vocab, tied = CONFIGS[name]
    config = LlamaConfig(
        tie_word_embeddings=tied,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
    )
    with torch.device("meta"):
        return LlamaForCausalLM(config).to(torch.bfloat16)


def main() -> None:
    rows = []
    for name in CONFIGS:
        model = meta_model(name)
        modules = [
            n
            for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and ".layers." in n
        ]
        task = infkit.Task.language_modeling(model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", infkit.errors.Notice)
            inf = infkit.Influence(
                task,
                "ekfac",
                damping="auto",
                batch_size=BATCH,
                modules=modules,
                memory_limit=LIMIT,
            )
            for world in (1, 8, 64):
                plan = inf.plan(
                    n_train=N_TRAIN, n_queries=N_QUERIES, sequence_length=LENGTH, world_size=world
                )
                # what a process holds in each stage (its own objects and those held before)
                stages = dict(zip([s.name for s in plan.stages], plan.stage_bytes, strict=True))
                largest, size = plan.largest
                rows.append(
                    f"| {name} | {plan.shape.parameters / 1e9:.2f}B | {world} | "
                    f"{human_bytes(plan.shape.model_bytes)} | "
                    f"{human_bytes(stages['covariances A, S'])} | "
                    f"{human_bytes(stages['eigenvalue correction'])} | "
                    f"{human_bytes(stages['queries'])} | {human_bytes(stages['scores'])} | "
                    f"{human_bytes(plan.shape.batch_output_bytes)} | {human_bytes(plan.peak_bytes)} | "
                    f"{plan.passes:g} x {plan.shape.batches:,} | "
                    f"{largest} ({human_bytes(size)}) |"
                )
    table = "\n".join(
        [
            "| model | tracked P | processes | model (bf16) | covariances | eigenvalue "
            "correction | queries | scores | a batch's outputs | peak per process | passes x "
            "batches | largest object |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    text = (
        "# EK-FAC plans for Llama-style models (meta device, no weights)\n\n"
        f"{provenance()}\n\n"
        f"N = {N_TRAIN:,} sequences of {LENGTH:,} tokens, {N_QUERIES} queries, batch {BATCH} per "
        "process, every nn.Linear of the decoder layers tracked; bytes per process beyond the "
        "model (the stages: its own objects and those held before it; the peak adds the model, "
        "theta*'s copy and a batch's outputs with their gradients, which the logits of 2,048 "
        "tokens over 128,256 words make 3.4 GiB); `benchmarks/plan_llama.py`.\n\n"
        f"{table}\n"
    )
    (ROOT / "benchmarks" / "results" / "plan_llama.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
