"""Layers that read a sequence's positions flattened into the batch ([B T, width], as Hugging
Face's OPT feeds its MLP and a mixture-of-experts its shared expert), and other dimensions of
the inputs folded into the batch (points of a point set, the choices of a multiple-choice
model): their rows count for their example, under its attention mask, as if the layer read
[B, T, width] (docs/methods/kfac.md §1); a layer whose rows cannot be assigned to examples is
refused.

The ground truth is the same model and weights with the MLP applied to [B, T, width], which the
hooks see batch-first.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from lm_helpers import LENGTH, VOCAB, rows
from torch import nn
from torch.utils.checkpoint import checkpoint

import infkit
from infkit import language_modeling as lm
from infkit.errors import Notice, UnsupportedError
from infkit.evaluate import relative_error

LENGTHS = [7, 3, 5, 4, 6, 2, 7, 5, 3, 6]
N = 7  # the first N sequences train, the rest are queries


class FlatMLPLM(nn.Module):
    """Embedding, a causal running mean over the positions its mask keeps, and a residual MLP
    that reads the positions flattened into the batch (``flatten``) or batch-first."""

    def __init__(self, flatten: bool, vocab: int = VOCAB, width: int = 5) -> None:
        super().__init__()
        self.flatten = flatten
        self.embed = nn.Embedding(vocab, width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embed(input_ids)
        m = torch.ones_like(h[..., :1]) if attention_mask is None else attention_mask[..., None]
        h = (h * m).cumsum(1) / m.cumsum(1).clamp_min(1.0)
        x = h.reshape(-1, h.shape[-1]) if self.flatten else h
        x = self.fc2(torch.tanh(self.fc1(x)))
        return self.head(x.reshape(h.shape) + h)


class RoutedLM(FlatMLPLM):
    """The MLP applied only to the positions whose token id is even (a router's choice)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embed(input_ids)
        chosen = input_ids % 2 == 0
        routed = torch.zeros_like(h)
        routed[chosen] = self.fc2(torch.tanh(self.fc1(h[chosen])))
        return self.head(h + routed)


@pytest.fixture(scope="module")
def sets() -> dict:
    torch.manual_seed(4)
    ids = torch.zeros(len(LENGTHS), LENGTH, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(LENGTHS):  # padded on the left
        ids[i, LENGTH - n :] = torch.randint(1, VOCAB, (n,))
        mask[i, LENGTH - n :] = 1
    inputs, labels = lm.examples(ids, mask, prompt_lengths=[0] * N + [1] * (len(LENGTHS) - N))
    return {"train": rows(inputs, labels, 0, N), "test": rows(inputs, labels, N, len(LENGTHS))}


def _answers(model: nn.Module, sets: dict, **options) -> tuple:
    task = infkit.Task.language_modeling(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not at an optimum; the embedding left out
        inf = infkit.Influence(task, "ekfac", fisher="ggn", damping=1e-2, **options)
        inf.fit(sets["train"])
        return inf, inf.scores(sets["test"]), inf.token_scores(sets["test"]).tokens


@pytest.mark.parametrize("streamed", [False, True])
def test_flattened_positions_count_for_their_sequence(sets: dict, streamed: bool, tmp_path) -> None:
    torch.manual_seed(0)
    batch_first = FlatMLPLM(flatten=False).double().eval()
    flattened = FlatMLPLM(flatten=True).double().eval()
    flattened.load_state_dict(batch_first.state_dict())
    # a workdir scores in committed shards layer by layer: the streamed path
    options = lambda name: {"workdir": tmp_path / name} if streamed else {}  # noqa: E731
    inf, S, tokens = _answers(flattened, sets, **options("flat"))
    ref, S_ref, tokens_ref = _answers(batch_first, sets, **options("first"))
    scale = float(S_ref.abs().max())
    torch.testing.assert_close(S, S_ref, rtol=1e-9, atol=1e-12 * scale)
    torch.testing.assert_close(tokens, tokens_ref, rtol=1e-9, atol=1e-12 * scale)
    # the factors count the real tokens only (padding masked), and EK-FAC's eigenvalues are
    # per-sequence squares, as for the batch-first layer
    real = float(sum(LENGTHS[:N]))
    for name in ("fc1", "fc2"):
        mine = inf.method.kronecker().factors.modules[name]
        theirs = ref.method.kronecker().factors.modules[name]
        assert float(mine.tokens) == real
        torch.testing.assert_close(mine.A, theirs.A, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(
            mine.eigenvalues(True), theirs.eigenvalues(True), rtol=1e-8, atol=1e-14
        )


class PointsModel(nn.Module):
    """A classifier of point sets [B, N, 3]: a layer per point, then the mean over points;
    ``flatten`` feeds the layer the points folded into the batch, [B N, 3]."""

    def __init__(self, flatten: bool) -> None:
        super().__init__()
        self.flatten = flatten
        self.f1, self.f2 = nn.Linear(3, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.f1(x.reshape(b * n, 3)).reshape(b, n, 8) if self.flatten else self.f1(x)
        return self.f2(torch.tanh(h).mean(1))


class ChoicesModel(nn.Module):
    """Multiple choice: ids [B, C, T], a score per choice; ``flatten`` feeds the layer the
    choices folded into the batch, [B C, T, width], as Hugging Face's ...ForMultipleChoice."""

    def __init__(self, flatten: bool) -> None:
        super().__init__()
        self.flatten = flatten
        self.embed, self.f1, self.f2 = nn.Embedding(VOCAB, 4), nn.Linear(4, 6), nn.Linear(6, 1)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b, c, t = input_ids.shape
        e = self.embed(input_ids)
        h = self.f1(e.reshape(b * c, t, 4)).reshape(b, c, t, 6) if self.flatten else self.f1(e)
        return self.f2(torch.tanh(h).mean(2)).reshape(b, c)


@pytest.mark.parametrize("kind", ["points", "choices"])
def test_other_dimensions_folded_into_the_batch_count_for_their_example(kind: str) -> None:
    torch.manual_seed(0)
    if kind == "points":
        cls, x = PointsModel, torch.randn(40, 5, 3, dtype=torch.float64)
    else:
        cls, x = ChoicesModel, {"input_ids": torch.randint(0, VOCAB, (40, 3, 4))}
    y = torch.randint(0, 3, (40,))

    def part(lo: int, hi: int) -> tuple:
        inputs = {k: v[lo:hi] for k, v in x.items()} if isinstance(x, dict) else x[lo:hi]
        return inputs, y[lo:hi]

    scores = []
    for flatten in (False, True):
        torch.manual_seed(1)
        task = infkit.Task.classification(cls(flatten).double().eval())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # not at an optimum; the embedding left out
            inf = infkit.Influence(task, "ekfac", damping=1e-2, checks=False)
            scores.append(inf.fit(part(0, 30)).scores(part(30, 40)))
    scale = float(scores[0].abs().max())
    torch.testing.assert_close(scores[1], scores[0], rtol=1e-10, atol=1e-13 * scale)


class SequenceFirstLM(FlatMLPLM):
    """The MLP reads the positions first: ``[T, B, width]`` (``"first"``), or flattened
    sequence-major ``[T B, width]`` (``"major"``), rows that a batch-major reading would give
    to the wrong examples (with T equal to the batch, or always)."""

    def __init__(self, layout: str) -> None:
        super().__init__(flatten=False)
        self.layout = layout

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embed(input_ids)
        x = h.transpose(0, 1)
        if self.layout == "major":
            x = x.reshape(-1, x.shape[-1])
        x = self.fc2(torch.tanh(self.fc1(x))).reshape(h.shape[1], h.shape[0], -1)
        return self.head(x.transpose(0, 1) + h)


@pytest.mark.parametrize("layout", ["first", "major"])
def test_rows_in_another_order_than_the_examples_are_refused(layout: str) -> None:
    torch.manual_seed(0)
    task = infkit.Task.language_modeling(SequenceFirstLM(layout).double().eval())
    # T = 3 = the probe's examples: a sequence-first input has a batch-major shape
    ids = torch.randint(0, VOCAB, (8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedding left out
        inf = infkit.Influence(task, "ekfac", fisher="ggn", damping=1e-2, modules=["fc1"])
        with pytest.raises(UnsupportedError, match=r"'fc1' reads its input's rows in another"):
            inf.fit(lm.examples(ids))


def test_a_layer_whose_rows_are_not_the_examples_is_refused(sets: dict) -> None:
    torch.manual_seed(0)
    task = infkit.Task.language_modeling(RoutedLM(flatten=False).double().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedding left out; not at an optimum
        inf = infkit.Influence(task, "ekfac", fisher="ggn", damping=1e-2, per_example="loop")
        with pytest.raises(
            UnsupportedError,
            match=r"tracked layers 'fc1' \(\d+ rows\), 'fc2' \(\d+ rows\) received inputs whose "
            r"rows cannot be "
            r"assigned to the batch's \d+ examples",
        ):
            inf.fit(sets["train"])
        # left out, the rest is attributed
        inf = infkit.Influence(
            task, "ekfac", fisher="ggn", damping=1e-2, modules=["head"], per_example="loop"
        )
        assert inf.fit(sets["train"]).scores(sets["test"]).isfinite().all()


def test_hugging_face_opt_scores_as_the_same_model_padded_otherwise() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=8,
        ffn_dim=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        word_embed_proj_dim=8,
    )
    model = transformers.OPTForCausalLM(config).double().eval()
    base = torch.randint(1, VOCAB, (len(LENGTHS), LENGTH))
    scores = []
    for width in (LENGTH, LENGTH + 3):  # padded on the right to two widths
        ids = torch.zeros(len(LENGTHS), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, n in enumerate(LENGTHS):
            ids[i, :n], mask[i, :n] = base[i, :n], 1
        inputs, labels = lm.examples(ids, mask)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf = infkit.Influence(
                infkit.Task.language_modeling(model), "ekfac", fisher="ggn", damping=1e-2
            )
            inf.fit(rows(inputs, labels, 0, N))
            scores.append(inf.scores(rows(inputs, labels, N, len(LENGTHS))))
    torch.testing.assert_close(
        scores[1], scores[0], rtol=1e-7, atol=1e-10 * float(scores[0].abs().max())
    )


class SharedPositionsClassifier(nn.Module):
    """Two projections of a table shared by the whole batch ([1, T, d], as DeBERTa's
    relative-position projections read), added to every example's tokens."""

    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.table = nn.Parameter(torch.randn(1, 5, width), requires_grad=False)
        self.pos_key = nn.Linear(width, width)
        self.pos_query = nn.Linear(width, width)
        self.head = nn.Linear(width, 2)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) + self.pos_key(self.table) * self.pos_query(self.table)
        return self.head(h.mean(1))


def test_every_layer_reading_a_tensor_shared_by_the_batch_is_named() -> None:
    """Each tracked layer whose rows belong to no example is named in one refusal (the first
    alone before: a tester's DeBERTa had four), with what one row in a batch means."""
    torch.manual_seed(0)
    task = infkit.Task.classification(SharedPositionsClassifier().double())
    X, y = {"input_ids": torch.randint(0, VOCAB, (6, 5))}, torch.randint(0, 2, (6,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedding left out
        inf = infkit.Influence(task, "kfac", damping=1e-2)
        with pytest.raises(
            UnsupportedError,
            match=r"tracked layers 'pos_key' \(1 row\), 'pos_query' \(1 row\) received .*"
            r"a tensor shared by every example",
        ):
            inf.fit((X, y))
        inf = infkit.Influence(task, "kfac", damping=1e-2, modules=["head"])
        assert inf.fit((X, y)).scores((X, y)).isfinite().all()


def test_method_auto_takes_the_next_method_when_its_choice_refuses_the_model() -> None:
    """method="auto" (here with a memory limit that leaves out exact) chose EK-FAC, which
    refuses layers whose rows are no example's; it takes CG instead, saying why, and answers as
    CG named does (a tester's DeBERTa stopped at the refusal)."""
    torch.manual_seed(0)
    model = SharedPositionsClassifier().double()
    model.dropout = torch.nn.Dropout(0.1)  # in training mode: the data's checks warn, once
    task = infkit.Task.classification(model)
    X, y = {"input_ids": torch.randint(0, VOCAB, (6, 5))}, torch.randint(0, 2, (6,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = infkit.Influence(task, "auto", l2=1e-2, memory_limit=60_000).fit((X, y))
    messages = [str(w.message) for w in caught if "torch.jit" not in str(w.message)]
    refusals = [
        w for w in caught if "'ekfac', which refused" in str(w.message) and w.category is Notice
    ]
    assert len(refusals) == 1, messages
    # The data's checks run once: the second method fits the checked set, saying nothing twice.
    assert len(set(messages)) == len(messages), messages
    assert any("the model has modules in training mode" in m for m in messages), messages
    assert auto.method.name == "cg"
    assert auto.describe()["auto"]["passed_over"]["ekfac"].startswith("refused this model")
    named = infkit.Influence(task, "cg", l2=1e-2).fit((X, y))
    assert relative_error(auto.scores((X, y)), named.scores((X, y))) < 1e-8


class ReentrantCheckpointed(nn.Module):
    """A block under reentrant activation checkpointing, which EK-FAC refuses with its remedy
    (use_reentrant=False)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.b(torch.tanh(self.a(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, x, use_reentrant=True))


def test_method_auto_keeps_a_refusal_that_is_not_of_rows() -> None:
    """Only a refusal of rows that are no example's makes method="auto" take another method:
    EK-FAC's refusal of reentrant checkpointing, whose remedy is the user's, stands (auto took
    CG, which then refused at scores, pointing back to EK-FAC)."""
    torch.manual_seed(0)
    X, y = torch.randn(400, 6, dtype=torch.float64), torch.randint(0, 3, (400,))
    task = infkit.Task.classification(ReentrantCheckpointed().double())
    auto = infkit.Influence(task, "auto", l2=1e-2, damping=1e-3, memory_limit=200_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(UnsupportedError, match="use_reentrant=True"):
            auto.fit((X, y))
