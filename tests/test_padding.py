"""Padded sequences: a set padded on the left or on the right scores as the sequences unpadded,
and labels that disagree with the attention mask are refused (docs/methods/language_models.md
§1).

The model here respects its attention mask (a masked causal running mean), so that the logits
of a real position do not depend on the padding; the ground truth is each sequence's loss
computed alone, without padding.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lm_helpers import LENGTH, VOCAB
from torch import nn

import infkit
from infkit import language_modeling as lm
from infkit.errors import InvalidInputError, NonFiniteError, Notice

LENGTHS = [7, 3, 5, 4, 6, 2, 7, 5, 3, 6]
N = 7  # the first N sequences train, the rest are queries
PAD = 0


class MaskedLM(nn.Module):
    """Embedding, a causal running mean over the positions the mask keeps, a tanh layer and a
    head: [B, T, V]; a real position's logits do not depend on padding."""

    def __init__(self, vocab: int = VOCAB, width: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.logits(self.embed(input_ids), attention_mask)

    def logits(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The logits of the embedded tokens h [B, T, width]."""
        return self.head(self.states(h, attention_mask))

    def states(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The hidden states the head reads, from the embedded tokens h [B, T, width]."""
        m = (
            torch.ones_like(h[..., :1])
            if attention_mask is None
            else attention_mask.to(h.dtype).unsqueeze(-1)
        )
        mean = (h * m).cumsum(1) / m.cumsum(1).clamp_min(1.0)
        return torch.tanh(self.mix(mean))


@pytest.fixture(scope="module")
def padded() -> dict:
    torch.manual_seed(3)
    model = MaskedLM().double().eval()
    sequences = [torch.randint(1, VOCAB, (n,)) for n in LENGTHS]
    sides = {}
    for side in ("left", "right"):
        ids = torch.full((len(LENGTHS), LENGTH), PAD)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            cols = slice(LENGTH - len(s), LENGTH) if side == "left" else slice(0, len(s))
            ids[i, cols], mask[i, cols] = s, 1
        sides[side] = (ids, mask)
    return {"model": model, "sequences": sequences, "sides": sides}


def _split(padded: dict, side: str, prompt: int = 0) -> tuple:
    ids, mask = padded["sides"][side]
    prompts = [0] * N + [prompt] * (len(LENGTHS) - N)
    inputs, labels = lm.examples(ids, mask, prompt_lengths=prompts)
    rows = lambda lo, hi: ({k: v[lo:hi] for k, v in inputs.items()}, labels[lo:hi])  # noqa: E731
    return rows(0, N), rows(N, len(LENGTHS))


@pytest.mark.parametrize("side", ["left", "right"])
def test_the_loss_of_a_padded_sequence_is_its_loss_unpadded(padded: dict, side: str) -> None:
    model = padded["model"]
    ids, mask = padded["sides"][side]
    inputs, labels = lm.examples(ids, mask)
    losses = lm.next_token_loss(model(**inputs), labels)
    for i, s in enumerate(padded["sequences"]):
        alone = lm.next_token_loss(model(s.unsqueeze(0)), s.unsqueeze(0))
        torch.testing.assert_close(losses[i], alone[0], rtol=1e-12, atol=0)
    # each sequence scores its tokens after the first, wherever the padding is
    scored = (labels[:, 1:] != lm.IGNORE_INDEX).sum(1)
    assert scored.tolist() == [n - 1 for n in LENGTHS]


@pytest.mark.parametrize("method", ["exact", "ekfac"])
def test_left_and_right_padding_give_the_same_scores(padded: dict, method: str) -> None:
    task = infkit.Task.language_modeling(padded["model"])
    options = {"fisher": "ggn"} if method == "ekfac" else {}
    results = {}
    for side in ("left", "right"):
        train, test = _split(padded, side, prompt=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # not at an optimum; layers left out
            inf = infkit.Influence(task, method, l2=1e-2, damping=1e-2, **options).fit(train)
            results[side] = (inf.scores(test), inf.token_scores(test))
    (left, left_tokens), (right, right_tokens) = results["left"], results["right"]
    torch.testing.assert_close(left, right, rtol=1e-9, atol=1e-12 * float(right.abs().max()))
    # per position: the same contributions, shifted by the padding; exactly 0 at padding
    for j in range(N):
        n = LENGTHS[j]
        torch.testing.assert_close(
            left_tokens.tokens[:, j, LENGTH - n :],
            right_tokens.tokens[:, j, :n],
            rtol=1e-9,
            atol=1e-12 * float(right.abs().max()),
        )
        assert not bool(left_tokens.tokens[:, j, : LENGTH - n].any())
        assert not bool(right_tokens.tokens[:, j, n:].any())


def test_a_prompt_counts_from_the_first_token_after_left_padding(padded: dict) -> None:
    ids, mask = padded["sides"]["left"]
    prompts = [2 if n > 2 else 1 for n in LENGTHS]
    _, labels = lm.examples(ids, mask, prompt_lengths=prompts)
    for i, (n, k) in enumerate(zip(LENGTHS, prompts)):
        start = LENGTH - n
        assert bool((labels[i, : start + k] == lm.IGNORE_INDEX).all())
        assert bool((labels[i, start + k :] != lm.IGNORE_INDEX).all())
    with pytest.raises(InvalidInputError, match=r"prompt_lengths\[5\] = 2 is not in \[0, 1\]"):
        lm.examples(ids, mask, prompt_lengths=[2] * len(LENGTHS))  # sequence 5 has 2 tokens
    # right padding: the range is the sequence's own tokens, not the padded width (a tester's
    # 6 tokens padded to 16 were told [0, 15], and 6 to 15 then failed as "no token to score")
    ids, mask = padded["sides"]["right"]
    i = min(range(len(LENGTHS)), key=lambda j: LENGTHS[j])
    n = LENGTHS[i]
    assert n < LENGTH - 1  # (padded on the right)
    for too_long in (n, LENGTH - 1):
        prompts = [0] * len(LENGTHS)
        prompts[i] = too_long
        with pytest.raises(
            InvalidInputError,
            match=rf"prompt_lengths\[{i}\] = {too_long} is not in \[0, {n - 1}\]: .* last "
            rf"scored token \(position {n - 1}, {n - 1} after its first\)",
        ):
            lm.examples(ids, mask, prompt_lengths=prompts)
    prompts[i] = n - 1  # the last token alone is the completion
    _, labels = lm.examples(ids, mask, prompt_lengths=prompts)
    assert (labels[i] != lm.IGNORE_INDEX).nonzero().flatten().tolist() == [n - 1]
    # a mask with a hole: the token after it is no label, so the room ends before it (a
    # reviewer's [1, 1, 1, 0, 0, 1] was told [0, 3] where 3 left nothing to score)
    holed = torch.tensor([[1, 1, 1, 0, 0, 1]])
    with pytest.raises(InvalidInputError, match=r"= 3 is not in \[0, 2\]: .*position 2"):
        lm.examples(torch.arange(6)[None], holed, prompt_lengths=[3])
    # a sequence of padding alone has no token to score, whatever its prompt
    with pytest.raises(InvalidInputError, match="sequence 1 has no token to score"):
        lm.examples(torch.arange(12).reshape(2, 6), [[1] * 6, [0] * 6], prompt_lengths=[0, 0])


def _fit(model: nn.Module, train: tuple) -> infkit.Influence:
    task = infkit.Task.language_modeling(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        return infkit.Influence(task, "identity").fit(train)


def _scores(model: nn.Module, train: tuple) -> torch.Tensor:
    """K-FAC's self-scores of the training set (the method that reads the mask's padding)."""
    task = infkit.Task.language_modeling(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return infkit.Influence(task, "kfac", damping=1e-2, batch_size=4).fit(train).self_scores()


def test_labels_scored_at_padding_are_refused(padded: dict) -> None:
    ids, mask = padded["sides"]["right"]
    inputs = {"input_ids": ids, "attention_mask": mask}
    with pytest.raises(InvalidInputError, match="example 1: the label at position 3 is scored"):
        _fit(padded["model"], (inputs, ids.clone()))  # Hugging Face's labels = input_ids


def test_the_first_token_after_left_padding_is_refused_as_a_label(padded: dict) -> None:
    ids, mask = padded["sides"]["left"]
    labels = ids.clone()
    labels[mask == 0] = lm.IGNORE_INDEX  # padding masked, but not the token after it
    with pytest.raises(InvalidInputError, match=r"example 1: .* it follows padding"):
        _fit(padded["model"], ({"input_ids": ids, "attention_mask": mask}, labels))


def test_a_mask_of_another_shape_is_refused(padded: dict) -> None:
    ids, mask = padded["sides"]["right"]
    inputs, labels = lm.examples(ids, mask)
    inputs["attention_mask"] = mask[:, :-1]
    # a problem of the whole set's tensors, not of its example 0
    with pytest.raises(
        InvalidInputError, match=r"examples 0-9: attention_mask has shape \[10, 6\], input_ids"
    ):
        _fit(padded["model"], (inputs, labels))


def test_a_mask_of_other_values_than_0_and_1_is_refused(padded: dict) -> None:
    """A weight or count in the mask would be read as a token by infkit and otherwise by the
    model; bool and float masks of 0 and 1 are the tokenizer's mask and pass."""
    ids, mask = padded["sides"]["right"]
    inputs, labels = lm.examples(ids, mask)
    weighted = mask.clone().float()
    weighted[3, 1] = 2.0
    inputs["attention_mask"] = weighted
    with pytest.raises(
        InvalidInputError, match=r"example 3: attention_mask holds 2.0 at position 1"
    ):
        _fit(padded["model"], (inputs, labels))
    with pytest.raises(
        InvalidInputError, match=r"example 3: attention_mask holds 2.0 at position 1"
    ):
        lm.examples(ids, weighted)
    # an additive mask of 0 and -inf (a tester's): told as a mask, not as a broken input
    additive = torch.zeros_like(weighted).masked_fill(mask == 0, float("-inf"))
    inputs["attention_mask"] = additive
    told = r"example \d+ has Inf in its 'attention_mask': give the tokenizer's 0/1 mask"
    with pytest.raises(NonFiniteError, match=told):
        _fit(padded["model"], (inputs, labels))
    reference = _scores(padded["model"], lm.examples(ids, mask))
    for kind in (torch.bool, torch.float32):
        scores = _scores(padded["model"], lm.examples(ids, mask.to(kind)))
        torch.testing.assert_close(scores, reference, rtol=1e-9, atol=1e-12)


def test_a_sequence_with_no_scored_token_is_refused(padded: dict) -> None:
    ids, mask = padded["sides"]["right"]
    inputs, labels = lm.examples(ids, mask)
    labels[4, 1:] = lm.IGNORE_INDEX
    with pytest.raises(InvalidInputError, match="example 4: the sequence has no token to score"):
        _fit(padded["model"], (inputs, labels))


def test_sequences_of_several_lengths_without_padding_are_refused(padded: dict) -> None:
    sequences = padded["sequences"]
    items = [{"input_ids": s, "labels": s} for s in sequences]
    with pytest.raises(InvalidInputError, match=r"examples 0 and 1 have inputs of different"):
        _fit(padded["model"], items)
    with pytest.raises(InvalidInputError, match=r"sequences of 6 lengths \(2 to 7 tokens\): pad"):
        lm.examples(sequences)
    same = [s for s in sequences if len(s) == LENGTH]
    inputs, labels = lm.examples(same)  # one length: stacked
    assert inputs["input_ids"].shape == (len(same), LENGTH)
    assert torch.equal(labels, torch.stack(same))


def test_items_with_other_keys_are_named(padded: dict) -> None:
    ids, mask = padded["sides"]["right"]
    items = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": ids[i]} for i in range(4)]
    del items[2]["attention_mask"]
    with pytest.raises(InvalidInputError, match=r"examples 0 and 2 have inputs with other keys"):
        _fit(padded["model"], items)


class NaNAtPaddingLM(MaskedLM):
    """A model whose outputs are NaN on every position of a padded sequence (as Hugging Face's
    eager attention in float64 gives at a fully masked row, which then spreads)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        logits = super().forward(input_ids, attention_mask)
        if attention_mask is None:
            return logits
        poison = attention_mask.to(logits.dtype).log().sum(1) * 0.0  # -inf x 0: NaN if padded
        return logits + poison[:, None, None]


def test_outputs_that_are_not_finite_at_padding_name_the_cause(padded: dict) -> None:
    torch.manual_seed(0)
    model = NaNAtPaddingLM().double().eval()
    (inputs, labels), _ = _split(padded, "left")
    first = next(i for i, n in enumerate(LENGTHS[:N]) if n < LENGTH)  # the first padded one
    with pytest.raises(InvalidInputError, match=rf"example {first} of the training set .* NaN"):
        _fit(model, (inputs, labels))
    with pytest.raises(InvalidInputError, match="with left padding does\\): pad on the right"):
        _fit(model, (inputs, labels))
    # padded on the right already: the sliding window's case, and no advice to pad on the right
    with pytest.raises(InvalidInputError, match="sliding window") as refused:
        _fit(model, _split(padded, "right")[0])
    assert "pad on the right" not in str(refused.value)
    # the sequences without padding fit: the same model is finite on them
    clean = [i for i, n in enumerate(LENGTHS[:N]) if n == LENGTH]
    assert len(clean) >= 2
    _fit(model, ({k: v[clean] for k, v in inputs.items()}, labels[clean]))


def test_the_padding_hint_reads_the_side_from_the_whole_mask() -> None:
    """Left padding, right padding (a sliding window's case) and a mask with a hole each get
    their own cause and remedy when a padded example's values are not finite."""
    from infkit.data import Batch
    from infkit.errors import NonFiniteError
    from infkit.gradients import check_finite_rows

    hints = {}
    for side, mask in {
        "left": [0, 0, 1, 1, 1, 1],
        "right": [1, 1, 1, 1, 0, 0],
        "hole": [1, 1, 0, 0, 1, 1],
    }.items():
        batch = Batch(torch.tensor([0]), {"attention_mask": torch.tensor([mask])}, None, "test set")
        with pytest.raises(NonFiniteError) as refused:
            check_finite_rows(torch.tensor([[float("nan")]]), batch, "loss gradient")
        hints[side] = str(refused.value)
    assert "with left padding does): pad on the right" in hints["left"]
    assert "sliding window" in hints["right"] and "pad on the right" not in hints["right"]
    assert "sliding window" not in hints["hole"] and "pad on the right" not in hints["hole"]
    assert "attn_implementation='sdpa'" in hints["hole"]


class PaddingReadsAllLM(MaskedLM):
    """Causal at real positions; a padding position's logits read the whole sequence (as a
    fully masked row of eager attention attends uniformly everywhere)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        logits = super().forward(input_ids, attention_mask)
        if attention_mask is None:
            return logits
        everything = self.head(self.embed(input_ids).mean(1, keepdim=True))
        return torch.where(attention_mask.unsqueeze(-1) == 0, everything, logits)


def test_the_causality_probe_looks_at_real_positions_only(padded: dict) -> None:
    (inputs, labels), _ = _split(padded, "left")
    first = 1  # make the set's first sequence a padded one too
    assert LENGTHS[first] < LENGTH
    inputs, labels = {k: v[first:] for k, v in inputs.items()}, labels[first:]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # "not causal" would be a UserWarning
        warnings.simplefilter("ignore", Notice)
        infkit.Influence(
            infkit.Task.language_modeling(PaddingReadsAllLM().double().eval()),
            "identity",
            checks=False,
        ).fit((inputs, labels))


class PositionalLM(MaskedLM):
    """MaskedLM with absolute position embeddings, as GPT-2 has: positions count from the first
    column unless ``position_ids`` say otherwise, so left padding moves every token's."""

    def __init__(self, vocab: int = VOCAB, width: int = 6) -> None:
        super().__init__(vocab, width)
        self.position = nn.Embedding(LENGTH, width)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ):
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
        return self.logits(self.embed(input_ids) + self.position(position_ids), attention_mask)


def test_the_first_left_padded_sequence_is_found() -> None:
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [0, 0, 1]])
    assert lm.first_left_padded({"attention_mask": mask}) == 2  # a gap counts too
    assert lm.first_left_padded({"attention_mask": mask[:2]}) is None  # right padding only
    assert lm.first_left_padded({"attention_mask": torch.zeros(2, 3)}) is None  # no token
    assert lm.first_left_padded(torch.ones(2, 3, dtype=torch.long)) is None  # no mask


def test_left_padding_that_moves_absolute_positions_is_named(padded: dict) -> None:
    """Without position_ids, left padding shifts the position embeddings of a sequence's tokens:
    the probe (the first left-padded sequence, run again unpadded) names it and the remedy;
    with ``examples(position_ids=True)`` the scores are those of the sequences padded on the
    right, where the positions are right without any."""
    torch.manual_seed(5)
    task = infkit.Task.language_modeling(PositionalLM().double().eval())
    ids, mask = padded["sides"]["left"]
    first = next(i for i, n in enumerate(LENGTHS) if n < LENGTH)
    assert first > 0  # the probe looks past the set's first sequence
    train = lm.examples(ids[:N], mask[:N])
    with pytest.warns(UserWarning) as caught:
        infkit.Influence(task, "identity", checks=False).fit(train)
    messages = [str(w.message) for w in caught if "padding positions" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith(f"training set example {first}: its {LENGTH - LENGTHS[first]} ")
    assert "position_ids=True" in messages[0]

    scores = {}
    for side, positions in (("left", True), ("right", False)):
        ids, mask = padded["sides"][side]
        prompts = [0] * N + [2] * (len(LENGTHS) - N)
        inputs, labels = lm.examples(ids, mask, prompt_lengths=prompts, position_ids=positions)
        train = ({k: v[:N] for k, v in inputs.items()}, labels[:N])
        test = ({k: v[N:] for k, v in inputs.items()}, labels[N:])
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # the probe is satisfied
            warnings.simplefilter("ignore", Notice)
            inf = infkit.Influence(task, "exact", l2=1e-2, damping=1e-2, checks=False)
            scores[side] = inf.fit(train).scores(test)
    right = scores["right"]
    torch.testing.assert_close(
        scores["left"], right, rtol=1e-9, atol=1e-12 * float(right.abs().max())
    )


def test_sequences_longer_than_a_learned_position_table_are_refused(padded: dict) -> None:
    torch.manual_seed(0)
    model = PositionalLM().double().eval()
    model.config = SimpleNamespace(n_positions=LENGTH)  # as transformers' GPT-2 has
    task = infkit.Task.language_modeling(model)
    ids, mask = padded["sides"]["right"]
    wider = lm.examples(torch.cat([ids, ids[:, :1]], 1), torch.cat([mask, mask[:, :1] * 0], 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        with pytest.raises(
            InvalidInputError,
            match=rf"example 0: it reads {LENGTH + 1} positions, more than the {LENGTH} the",
        ):
            infkit.Influence(task, "identity", checks=False).fit(wider)
        infkit.Influence(task, "identity", checks=False).fit(lm.examples(ids, mask))
        # wider only by padding, with positions counted from each sequence's first token
        wider_ids = torch.cat([ids, ids[:, :1]], 1)
        wider_mask = torch.cat([mask, mask[:, :1] * 0], 1)
        infkit.Influence(task, "identity", checks=False).fit(
            lm.examples(wider_ids, wider_mask, position_ids=True)
        )


def test_gpt2_left_padded_without_position_ids_is_named() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=LENGTH, n_embd=8, n_layer=1, n_head=2
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(1, VOCAB, (4, LENGTH))
    mask = torch.ones_like(ids)
    mask[2, :3] = 0  # the third sequence is left-padded
    task = infkit.Task.language_modeling(model)
    with pytest.warns(UserWarning, match=r"training set example 2: its 3 padding positions"):
        infkit.Influence(task, "identity", checks=False).fit(lm.examples(ids, mask))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", Notice)
        infkit.Influence(task, "identity", checks=False).fit(
            lm.examples(ids, mask, position_ids=True)
        )


class NaNOnlyAtPaddingLM(MaskedLM):
    """NaN hidden states, so logits, at padding positions only (as a fully masked row of eager
    attention gives): the loss, which skips them, is finite, and its gradient is not (the head's
    weight gradient multiplies their zero output gradients by the NaN states)."""

    def states(self, h: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        z = super().states(h, attention_mask)
        if attention_mask is None:
            return z
        return torch.where(attention_mask[..., None] == 0, float("nan"), z)


def test_training_names_an_example_whose_outputs_are_not_finite(padded: dict) -> None:
    torch.manual_seed(0)
    task = infkit.Task.language_modeling(NaNOnlyAtPaddingLM().double().eval())
    (inputs, labels), _ = _split(padded, "left")
    assert bool(lm.next_token_loss(task.model(**inputs), labels).isfinite().all())
    first = next(i for i, n in enumerate(LENGTHS[:N]) if n < LENGTH)
    with pytest.raises(
        NonFiniteError, match=rf"model output of example {first} of the training set .*sdpa"
    ):
        infkit.train_to_optimum(task, (inputs, labels), 1e-2)


def test_no_padding_warning_for_rounding_of_a_bfloat16_model_with_float32_logits() -> None:
    """Left padding shifts a rotary model's absolute positions: nothing in exact arithmetic, a
    bfloat16 model's rounding in practice (about a tenth of logits of 10 at 4 layers), which
    float32 logits carry: not a warning."""
    transformers = pytest.importorskip("transformers")
    from lm_helpers import llama_config

    torch.manual_seed(1)
    config = llama_config(hidden_size=64, num_hidden_layers=4, initializer_range=0.3)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()  # logits about 10
    ids = torch.randint(1, 40, (4, 24))
    mask = torch.ones_like(ids)
    mask[0, :10] = 0
    task = infkit.Task.language_modeling(model, output_fn=lambda out: out.logits.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.simplefilter("ignore", Notice)
        infkit.Influence(task, "identity", checks=False).fit(lm.examples(ids, mask))


# ============================================================ classifiers of padded sequences
class ChoiceModel(nn.Module):
    """A multiple-choice model: ids and mask [B, C, T], the choices folded into the batch, a
    tanh layer over each position, a mean over the positions the mask keeps (``pool=2``: then
    over pairs of positions, the sequence halved inside as Funnel's pooling does), a score per
    choice: [B, C]. Its scores do not depend on padding."""

    def __init__(self, pool: int = 1, width: int = 5) -> None:
        super().__init__()
        self.pool = pool
        self.embed = nn.Embedding(VOCAB, width)
        self.mix = nn.Linear(width, width)
        self.after_pooling = nn.Linear(width, width) if pool > 1 else None
        self.score = nn.Linear(width, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        b, c, t = input_ids.shape
        mask = attention_mask.reshape(b * c, t, 1).to(self.embed.weight.dtype)
        h = torch.tanh(self.mix(self.embed(input_ids.reshape(b * c, t))))
        if self.pool > 1:  # pairs of positions: a pair of padding only is padding
            h = (h * mask).reshape(b * c, t // 2, 2, -1).sum(2)
            mask = mask.reshape(b * c, t // 2, 2, 1).amax(2)
            assert self.after_pooling is not None
            h = torch.tanh(self.after_pooling(h))
        pooled = (h * mask).sum(1) / mask.sum(1)
        return self.score(pooled).reshape(b, c)


def _choices(n: int, pad: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """n questions of 3 choices of 4 to 6 tokens, padded on the right to 6 + pad positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, 3, 6), generator=gen)
    ids = torch.cat([ids, torch.zeros(n, 3, pad, dtype=ids.dtype)], dim=-1)
    lengths = torch.randint(4, 7, (n, 3), generator=gen)
    mask = (torch.arange(6 + pad) < lengths.unsqueeze(-1)).long()
    labels = torch.randint(0, 3, (n,), generator=gen)
    return {"input_ids": ids * mask, "attention_mask": mask}, labels


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_a_multiple_choice_mask_keeps_padding_out_of_the_factors(method: str) -> None:
    """A mask [B, C, T] applies to the layers that see the choices folded into the batch, as a
    [B, T] mask does to a sequence classifier's: padding the choices by 4 more positions leaves
    the Kronecker scores as they are (1e-10), where the padding entered the activation
    statistics (a tester's BERT: scores moved 7.5-9.3%)."""
    torch.manual_seed(0)
    model = ChoiceModel().double().eval()
    task = infkit.Task.classification(model)
    scores = []
    for pad in (0, 4):
        train, test = _choices(10, pad, seed=1), _choices(3, pad, seed=2)
        fitted = infkit.Influence(task, method, l2=1e-2, damping=1e-2, batch_size=4).fit(train)
        scores.append(fitted.scores(test))
    assert (scores[1] - scores[0]).abs().max() < 1e-10 * scores[0].abs().max()
    # queries padded to another length than the training choices (refused before: their
    # per-example shape [3, 6] against [3, 10])
    shorter = fitted.scores(_choices(3, 0, seed=2))
    assert (shorter - scores[0]).abs().max() < 1e-10 * scores[0].abs().max()


def test_a_layer_seeing_the_sequence_shortened_is_named() -> None:
    """A layer after the sequence is halved inside the model sees 3 positions a choice (9 an
    example) where the mask has 6 (18): which are padding cannot be told, so it is named, in one
    warning for the pass (its factors take the padding as tokens); the layers the mask fits,
    and the head, which sees the choices, are not."""
    torch.manual_seed(0)
    model = ChoiceModel(pool=2).double().eval()
    task = infkit.Task.classification(model)
    with pytest.warns(UserWarning, match=r"tracked layers 'after_pooling' \(9\) see other") as seen:
        infkit.Influence(task, "kfac", l2=1e-2, damping=1e-2).fit(_choices(10, 0, seed=1))
    named = [str(w.message) for w in seen if "see other positions" in str(w.message)]
    assert all("'mix'" not in message and "'score'" not in message for message in named)


class ExtendedMaskClassifier(nn.Module):
    """A classifier taking a model's own extended mask [B, 1, 1, T], additive (0 at tokens,
    -1e4 at padding), under ``attention_mask`` or another name."""

    def __init__(self, key: str = "attention_mask") -> None:
        super().__init__()
        self.key = key
        self.embed = nn.Embedding(VOCAB, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, **masks: torch.Tensor) -> torch.Tensor:
        keep = (masks[self.key][:, 0, 0] == 0).unsqueeze(-1).to(self.embed.weight.dtype)
        h = torch.tanh(self.mix(self.embed(input_ids)))
        return self.head((h * keep).sum(1) / keep.sum(1))


def _under_each_key(
    make: type[ExtendedMaskClassifier], ids: torch.Tensor, mask: torch.Tensor, **options: Any
) -> list[tuple[torch.Tensor, list[str]]]:
    """K-FAC's scores, and the warnings of its fit, with ``mask`` given as the attention mask
    infkit reads and under a name it does not read, the model reading it either way."""
    labels = torch.randint(0, 2, (len(ids),))
    out = []
    for key in ("attention_mask", "extended_mask"):
        torch.manual_seed(1)
        task = infkit.Task.classification(make(key).double())
        data = ({"input_ids": ids, key: mask}, labels)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            fitted = infkit.Influence(task, "kfac", l2=1e-2, damping=1e-2, **options).fit(data)
        out.append((fitted.scores(data), [str(w.message) for w in seen]))
    return out


def test_a_mask_that_marks_no_padding_is_not_read_as_weights() -> None:
    """A model's own additive 4-D mask is no padding mark: read as the weights of K-FAC's
    statistics (0 at every token, -1e4 at padding) it put the scores off by 300%. It is not
    read: the scores are those of the same mask under a name infkit does not read (1e-12)."""
    torch.manual_seed(0)
    ids = torch.randint(1, VOCAB, (8, 6))
    mask = torch.ones_like(ids)
    mask[:3, -2:] = 0
    extended = ((1 - mask) * -1e4).double().reshape(8, 1, 1, 6)
    (read, _), (unread, _) = _under_each_key(ExtendedMaskClassifier, ids, extended)
    assert (read - unread).abs().max() < 1e-12 * unread.abs().max()


def test_an_additive_mask_is_not_read_with_or_without_padding() -> None:
    """An additive [B, T] mask is all 0 in a batch without padding, which read as 0/1 marks made
    every position padding (K-FAC 40% off); it is not read in any batch, a Notice says so, and
    the scores are those of the same mask under a name infkit does not read (1e-12)."""

    class Additive2D(ExtendedMaskClassifier):
        def forward(self, input_ids: torch.Tensor, **masks: torch.Tensor) -> torch.Tensor:
            return super().forward(input_ids, **{self.key: masks[self.key][:, None, None]})

    ids = torch.randint(1, VOCAB, (8, 6))
    additive = torch.zeros(8, 6, dtype=torch.float64)
    additive[:2, -2:] = -1e4  # the first batch of 4 padded, the second not
    (read, seen), (unread, unseen) = _under_each_key(Additive2D, ids, additive, batch_size=4)
    told = "is not read as padding marks"
    assert any(told in m for m in seen) and not any(told in m for m in unseen)
    assert (read - unread).abs().max() < 1e-12 * unread.abs().max()


def test_a_classifier_with_one_output_is_refused() -> None:
    """One logit under Task.classification: the softmax over one class is 1, every score 0
    (a tester's num_labels=1 model scored exactly 0 without a word); refused with the tasks
    that fit."""
    model = nn.Linear(3, 1).double()
    X, y = torch.randn(8, 3, dtype=torch.float64), torch.zeros(8, dtype=torch.long)
    with pytest.raises(
        InvalidInputError, match=r"one output per example.*Task.binary_classification"
    ):
        infkit.Influence(infkit.Task.classification(model), "identity").fit((X, y))


def test_token_classification_is_a_task_of_ones_own() -> None:
    """A label per token: Task.classification refuses it, naming the task that scores it; the
    README's task of one's own (summed token cross-entropy, -100 not scored) gives identity's
    scores as autograd's (1/N) grad l_t . grad l_j to 1e-12."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(VOCAB, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    ids = torch.randint(0, VOCAB, (6, 5))
    labels = torch.randint(0, 3, (6, 5))
    labels[:2, -2:] = -100
    with pytest.raises(InvalidInputError, match=r"one class index per position.*infkit.Task") as e:
        infkit.Influence(infkit.Task.classification(model), "identity").fit((ids, labels))
    # a causal LM given kind = "classification" (a tester) is pointed at its own task first
    assert 'Task.language_modeling (infkit run: kind = "language_modeling")' in str(e.value)

    def token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none").sum(1)

    scores = infkit.Influence(infkit.Task(model, token_loss), "identity").fit((ids, labels))
    S = scores.scores((ids[:2], labels[:2]))
    params = list(model.parameters())

    def gradient(i: int) -> torch.Tensor:
        loss = token_loss(model(ids[i : i + 1]), labels[i : i + 1])[0]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    G = torch.stack([gradient(i) for i in range(6)])
    torch.testing.assert_close(S, G[:2] @ G.T / 6, rtol=1e-12, atol=1e-14)


class PoolingClassifier(nn.Module):
    """Token embeddings, a tanh layer and a head on a pooled position: the first position
    (``first=True``, as BERT's pooler reads its [CLS] token) or the mean of the positions the
    mask keeps."""

    def __init__(self, first: bool) -> None:
        super().__init__()
        self.first = first
        self.embed = nn.Embedding(VOCAB, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(input_ids)))
        if self.first:
            return self.head(h[:, 0])
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * mask).sum(1) / mask.sum(1))


@pytest.mark.parametrize("first", [True, False])
def test_a_classifier_reading_its_left_padding_is_named(first: bool) -> None:
    """A left-padded sequence is run again without its padding: a classifier that pools its
    first position (a pad token there) moves and is named in a warning with the remedy; one
    that pools the positions its mask keeps does not (a tester's BERT moved 36%, no word)."""
    torch.manual_seed(0)
    task = infkit.Task.classification(PoolingClassifier(first).double())
    ids = torch.randint(1, VOCAB, (6, 5))
    mask = torch.ones_like(ids)
    mask[2, :2] = 0  # example 2 padded on the left
    data = ({"input_ids": ids * mask, "attention_mask": mask}, torch.randint(0, 2, (6,)))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        infkit.Influence(task, "identity").fit(data)
    named = [
        str(w.message) for w in seen if "padding positions before the first token" in str(w.message)
    ]
    if first:
        assert named and "training set example 2: its 2 padding positions" in named[0]
        assert "Pad on the right" in named[0]
    else:
        assert not named


class FixedLengthRegressor(nn.Module):
    """Embeddings flattened into one linear layer: a model of one sequence length only."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 2)
        self.head = nn.Linear(2 * 5, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(h.flatten(1))


def test_a_model_of_one_sequence_length_is_not_probed() -> None:
    """A model that cannot run a left-padded sequence unpadded (one of a fixed length) is not
    probed: it is scored (the probe raised PyTorch's error before)."""
    torch.manual_seed(0)
    task = infkit.Task.regression(FixedLengthRegressor().double())
    ids = torch.randint(1, VOCAB, (6, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    data = (
        {"input_ids": ids * mask, "attention_mask": mask},
        torch.randn(6, 1, dtype=torch.float64),
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fitted = infkit.Influence(task, "identity").fit(data)
    assert fitted.scores(data).isfinite().all()
    assert not [w for w in seen if "padding positions before the first token" in str(w.message)]


class FirstPositionRegressor(PoolingClassifier):
    """:class:`PoolingClassifier` reading its first position, with one output per example, [B]."""

    def __init__(self) -> None:
        super().__init__(first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids, attention_mask)[:, 0]


def test_a_regressor_with_outputs_of_one_dimension_is_probed() -> None:
    """Outputs [B] (a regressor's, squeezed) are probed as [B, 1] are: the first position read
    under left padding is named."""
    torch.manual_seed(0)
    task = infkit.Task.regression(FirstPositionRegressor().double())
    ids = torch.randint(1, VOCAB, (6, 5))
    mask = torch.ones_like(ids)
    mask[3, :1] = 0
    data = ({"input_ids": ids * mask, "attention_mask": mask}, torch.randn(6, dtype=torch.float64))
    with pytest.warns(UserWarning, match="training set example 3: its 1 padding positions"):
        infkit.Influence(task, "identity").fit(data)
