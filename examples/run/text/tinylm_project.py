"""A text problem for ``infkit run``: a small next-token model on a synthetic corpus.

Sentences come from a few templates over a small vocabulary; the model predicts each next word
from the current one (an embedding, a tanh layer, a linear read-out: logits [B, T, V], so the
language-modelling task and per-token scores apply). ``decode`` shows token ids as words.
"""

from __future__ import annotations

import functools

import torch

import infkit
from infkit import language_modeling as lm

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a child"]
VERBS = ["sees", "likes", "finds", "follows", "helps", "watches"]
OBJECTS = ["the ball", "a tree", "the river", "a book", "the garden", "the house"]
PLACES = ["today", "at night", "in spring", "every day"]
VOCAB = sorted({w for phrase in SUBJECTS + VERBS + OBJECTS + PLACES for w in phrase.split()})
VOCAB = ["<pad>", *VOCAB, "."]
LENGTH = 10


def _sentence(generator: torch.Generator) -> list[int]:
    def pick(options: list[str]) -> list[str]:
        return options[int(torch.randint(len(options), (1,), generator=generator))].split()

    words = pick(SUBJECTS) + pick(VERBS) + pick(OBJECTS) + pick(PLACES) + ["."]
    ids = [VOCAB.index(w) for w in words][:LENGTH]
    return ids + [0] * (LENGTH - len(ids))


@functools.lru_cache(maxsize=1)
def _ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.tensor([_sentence(generator) for _ in range(260)])


def splits() -> tuple[tuple[dict[str, torch.Tensor], torch.Tensor], ...]:
    """(train, test): 240 and 20 sentences as (inputs, labels), padding masked."""
    ids = _ids()
    mask = (ids != 0).long()
    return lm.examples(ids[:240], mask[:240]), lm.examples(ids[240:], mask[240:])


def decode(ids: list[int]) -> list[str]:
    """One word per token id."""
    return [VOCAB[i] for i in ids]


class NextWord(torch.nn.Module):
    """Logits of the next word from the current one: [B, T] ids -> [B, T, V]."""

    def __init__(self, vocab: int, width: int = 24) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.hidden = torch.nn.Linear(width, width)
        self.out = torch.nn.Linear(width, vocab)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(self.embed(input_ids))))


def trained_model(steps: int = 300) -> torch.nn.Module:
    """The model trained with Adam on the summed next-token loss (float64)."""
    torch.manual_seed(0)
    model = NextWord(len(VOCAB)).double()
    task = infkit.Task.language_modeling(model)
    inputs, labels = splits()[0]
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        optimiser.zero_grad()
        # (call_model takes the logits out of what the model returns: a Hugging Face model's
        # output object too)
        loss = task.loss(task.call_model(model, inputs), labels).mean()
        loss.backward()
        optimiser.step()
    return model.eval()
