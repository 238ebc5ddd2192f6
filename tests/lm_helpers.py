"""A small causal language model for the tests, free of transformers."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, LENGTH = 11, 7


class TinyLM(nn.Module):
    """Token embedding, a causal running mean over positions, a tanh MLP and a head: [B, T, V]."""

    def __init__(self, vocab: int = VOCAB, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).reshape(1, -1, 1)
        h = torch.tanh(self.mix(h.cumsum(1) / steps))
        return self.head(self.norm(h))


def rows(inputs: dict[str, torch.Tensor], labels: torch.Tensor, lo: int, hi: int):  # type: ignore[no-untyped-def]
    """Examples ``lo:hi`` of a language-modelling set: (inputs dict, labels)."""
    return {k: v[lo:hi] for k, v in inputs.items()}, labels[lo:hi]


def llama_config(**values: object):  # type: ignore[no-untyped-def]
    """A small transformers LlamaConfig (eager attention), with ``values`` overriding."""
    import transformers

    small = {
        "vocab_size": 40,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32,
        "attn_implementation": "eager",
    }
    return transformers.LlamaConfig(**{**small, **values})
