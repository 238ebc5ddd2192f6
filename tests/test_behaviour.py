"""IF-Guide behaviour attribution (docs/analyses.md §12): the differential per-token scores are
the behaviour-minus-contrast difference of ``token_scores`` and of ``scores``; a planted phrase's
documents rank first and its tokens are masked; positive scores promote the behaviour, checked
by retraining without the planted documents; the masked objective suppresses the masked tokens.
"""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from lm_helpers import LENGTH, VOCAB, TinyLM
from torch import nn

import infkit
from infkit import language_modeling as lm
from infkit.analyses.behaviour import (
    DifferentialScores,
    _warn_if_rest_dominates,
    differential_token_scores,
    masked_loss,
    select_tokens,
    train_with_mask,
)
from infkit.data import ExampleSet
from infkit.errors import InvalidInputError, Notice, UnsupportedError
from infkit.evaluate import relative_error

pytestmark = pytest.mark.filterwarnings("ignore:the model is not at a stationary point")

# The planted corpus: ordinary tokens 0..8, a trigger, and the planted continuation.
PLANTED_VOCAB, TRIGGER, FIRST, SECOND = 12, 9, 10, 11
N, N_PLANTED, N_TRIGGER, T = 80, 5, 15, 8
L2 = 1e-2


class BigramLM(nn.Module):
    """Each position's logits from its own token only: embedding, a tanh layer, a head."""

    def __init__(self, vocab: int = PLANTED_VOCAB, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.hidden = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(self.embed(input_ids))))


def _quiet_fit(task: infkit.Task, method: str, train: tuple, **options: float) -> infkit.Influence:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Notice about untracked embeddings and norms
        return infkit.Influence(task, method, progress=False, **options).fit(train)


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def tiny() -> dict:
    """TinyLM (float64, untrained) on random sequences, one padded; uneven query sets."""
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    ids = torch.randint(0, VOCAB, (10 + 5, LENGTH))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0
    inputs, labels = lm.examples(ids, mask, prompt_lengths=[0] * 10 + [3] * 5)
    split = lambda lo, hi: ({k: v[lo:hi] for k, v in inputs.items()}, labels[lo:hi])  # noqa: E731
    task = infkit.Task.language_modeling(model)
    train = split(0, 10)
    inf = _quiet_fit(task, "kfac", train, l2=L2, damping=1e-3)
    return {"inf": inf, "train": train, "behaviour": split(10, 13), "contrast": split(13, 15)}


def planted_corpus(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, T] ids: N_PLANTED documents with ``TRIGGER FIRST SECOND``, N_TRIGGER with the trigger
    followed by ordinary tokens, the rest ordinary; and which documents are planted."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TRIGGER, (N, T), generator=gen)
    planted = torch.zeros(N, dtype=torch.bool)
    for i in range(N_PLANTED + N_TRIGGER):
        p = int(torch.randint(0, T - 2, (1,), generator=gen))
        ids[i, p] = TRIGGER
        if i < N_PLANTED:
            ids[i, p + 1], ids[i, p + 2] = FIRST, SECOND
            planted[i] = True
    perm = torch.randperm(N, generator=gen)
    return ids[perm], planted[perm]


@pytest.fixture(scope="module")
def planted() -> dict:
    """The bigram LM trained to the optimum of ``mean l_i + (l2/2)||theta||^2`` on the planted
    corpus, EK-FAC, and behaviour / contrast queries: prompts ending in the trigger, completed
    by the planted continuation or by ordinary tokens."""
    ids, is_planted = planted_corpus()
    train = lm.examples(ids)
    gen = torch.Generator().manual_seed(100)
    prompts = torch.randint(0, TRIGGER, (4, 4), generator=gen)
    prompts[:, -1] = TRIGGER
    behaviour = lm.examples(
        torch.cat([prompts, torch.tensor([[FIRST, SECOND]] * 4)], 1), prompt_lengths=[4] * 4
    )
    contrast = lm.examples(
        torch.cat([prompts, torch.randint(0, TRIGGER, (4, 2), generator=gen)], 1),
        prompt_lengths=[4] * 4,
    )
    torch.manual_seed(0)
    model = BigramLM().double()
    task = infkit.Task.language_modeling(model)
    assert infkit.train_to_optimum(task, train, L2).converged
    inf = _quiet_fit(task, "ekfac", train, l2=L2, damping=1e-3)
    scores = differential_token_scores(inf, behaviour, contrast)
    return {
        "ids": ids,
        "planted": is_planted,
        "train": train,
        "task": task,
        "inf": inf,
        "behaviour": behaviour,
        "contrast": contrast,
        "scores": scores,
    }


# ============================================================================ (a) identities
def test_differential_scores_are_the_difference_of_token_scores_and_of_scores(tiny: dict) -> None:
    inf, behaviour, contrast = tiny["inf"], tiny["behaviour"], tiny["contrast"]
    D = differential_token_scores(inf, behaviour, contrast, chunk_size=4)  # 3 chunks
    b, c = inf.token_scores(behaviour), inf.token_scores(contrast)
    assert D.tokens.shape == (10, LENGTH) and D.tokens.dtype == torch.float64
    assert (D.n_behaviour, D.n_contrast) == (3, 2)
    assert relative_error(D.tokens, b.tokens.mean(0) - c.tokens.mean(0)) < 1e-10
    assert relative_error(D.rest, b.rest.mean(0) - c.rest.mean(0)) < 1e-10
    # Summed over positions: the difference of the mean sequence scores (another code path).
    S = inf.scores(behaviour).mean(0) - inf.scores(contrast).mean(0)
    assert relative_error(D.total, S) < 1e-10
    # The padded sequence: its padding is not a real token and contributes nothing.
    assert D.valid[2].tolist() == [True] * 5 + [False] * 2
    assert float(D.tokens[2, 5:].abs().max()) < 1e-14
    # A subset of training sequences, one chunk.
    part = differential_token_scores(inf, behaviour, contrast, indices=[7, 2])
    assert part.indices.tolist() == [7, 2]
    assert relative_error(part.tokens, D.tokens[[7, 2]]) < 1e-12


# ============================================================================ selection rules
def test_selection_threshold_ranking_and_mask_follow_the_rules() -> None:
    scores = torch.zeros(4, 6, dtype=torch.float64)
    scores[0, 2] = 5.0  # one strong token
    scores[1, [1, 3]] = 3.0  # two medium tokens
    scores[2, 4] = 1.0  # one weak token
    scores[3] = torch.linspace(-1, -0.5, 6)
    valid = torch.ones(4, 6, dtype=torch.bool)
    valid[2, 5] = False
    sel = select_tokens(scores, 80.0, window=0, valid=valid)
    assert sel.threshold == pytest.approx(float(np.percentile(scores[valid].numpy(), 80)))
    assert sel.selected.nonzero().tolist() == [[0, 2], [1, 1], [1, 3], [2, 4]]
    assert sel.count.tolist() == [1, 2, 1, 0] and sel.total.tolist() == [5.0, 6.0, 1.0, 0.0]
    # harmonic means of (count, sum) min-max normalised: (0.5, 5/6), (1, 1), (0.5, 1/6), 0
    expected = [2 * 0.5 * (5 / 6) / (0.5 + 5 / 6), 1.0, 2 * 0.5 * (1 / 6) / (0.5 + 1 / 6), 0.0]
    assert torch.allclose(sel.rank_score, torch.tensor(expected, dtype=torch.float64))
    assert sel.ranking.tolist() == [1, 0, 2, 3] and sel.top(2).tolist() == [1, 0]
    # window 0, offset 1: the label each selected position predicts.
    assert sel.mask.nonzero().tolist() == [[0, 3], [1, 2], [1, 4]]  # [2, 5] is padding
    wide = select_tokens(scores, 80.0, window=1, offset=0, valid=valid)
    assert wide.mask[0].nonzero().flatten().tolist() == [1, 2, 3]
    assert wide.mask[1].nonzero().flatten().tolist() == [1, 2, 3, 4]  # label 0 never
    # The token limit: whole documents in rank order, then window by window; stop at the first
    # window that does not fit.
    capped = select_tokens(scores, 80.0, window=1, offset=0, valid=valid, max_tokens=6)
    assert capped.mask[1].sum() == 4 and capped.mask[0].sum() == 0  # 3 more would exceed 6
    assert int(capped.mask.sum()) == 4


def test_the_mask_is_in_the_training_sets_rows_and_its_scored_labels(tiny: dict) -> None:
    """A tester's: with indices=, the mask's rows followed indices while train_with_mask reads
    them as training sequences 0..N-1 (reversed indices marked another sequence's labels,
    padding among them, without a word); and labels no position predicts (-100: a prompt's, a
    left-padded sequence's first real token) were marked and counted against max_tokens."""
    inf, behaviour, contrast, train = (
        tiny["inf"],
        tiny["behaviour"],
        tiny["contrast"],
        tiny["train"],
    )
    D = differential_token_scores(inf, behaviour, contrast)
    whole = select_tokens(D, 60.0)
    backwards = select_tokens(
        differential_token_scores(inf, behaviour, contrast, indices=range(9, -1, -1)), 60.0
    )
    assert whole.mask.shape == backwards.mask.shape == (10, LENGTH)
    assert whole.mask.any() and torch.equal(backwards.mask, whole.mask)
    assert backwards.ranking.tolist() == whole.ranking.tolist()
    some = select_tokens(differential_token_scores(inf, behaviour, contrast, indices=[7, 2]), 60.0)
    assert some.mask.shape == (10, LENGTH) and not some.mask[[0, 1, 3, 4, 5, 6, 8, 9]].any()
    assert some.mask[[7, 2]].any()
    train_with_mask(TinyLM().double(), train, some.mask, steps=1, batch_size=4)  # accepted
    # a training set with prompts (labels -100 at the first 3 tokens) and a left-padded sequence
    ids = torch.randint(0, VOCAB, (10, LENGTH), generator=torch.Generator().manual_seed(5))
    attention = torch.ones_like(ids)
    attention[4, :2] = 0
    inputs, labels = lm.examples(ids, attention, prompt_lengths=[3] * 4 + [0] * 6)
    prompted = _quiet_fit(inf.task, "kfac", (inputs, labels), l2=L2, damping=1e-3)
    D = differential_token_scores(prompted, behaviour, contrast)
    expected = labels != lm.IGNORE_INDEX
    expected[:, 0] = False
    assert D.scored is not None and torch.equal(D.scored, expected)
    assert not bool(expected[4, 2])  # the first real token of the left-padded sequence
    chosen = select_tokens(D, 50.0, window=2, offset=0)
    assert chosen.mask.any() and not bool((chosen.mask & ~expected).any())
    capped = select_tokens(D, 50.0, window=2, offset=0, max_tokens=7)
    assert 0 < int((capped.mask & expected).sum()) == int(capped.mask.sum()) <= 7


# ============================================================================ (b), (c) planted
def test_planted_documents_rank_first(planted: dict) -> None:
    sel = select_tokens(planted["scores"])  # the paper's 99th percentile
    precision = float(planted["planted"][sel.top(N_PLANTED)].float().mean())
    assert precision >= 0.8, precision  # measured 1.0 (random: 5 / 80)


def test_the_mask_selects_the_planted_phrase(planted: dict) -> None:
    ids = planted["ids"]
    sel = select_tokens(planted["scores"])
    phrase = (ids == FIRST) | (ids == SECOND)
    inside = float(sel.mask[phrase].float().mean())
    outside = float(sel.mask[~phrase].float().mean())
    assert inside >= 0.9 and outside <= inside / 3, (inside, outside)  # measured 1.0 and 0.005
    # The selected positions (before the shift) are those that predict the planted tokens.
    s = sel.selected.nonzero()
    predicts = ids[s[:, 0], (s[:, 1] + 1).clamp_max(T - 1)]
    assert float(((predicts == FIRST) | (predicts == SECOND)).float().mean()) >= 0.8


# ============================================================================ orientation
def test_positive_differential_scores_promote_the_behaviour(planted: dict) -> None:
    """Removing the planted documents and retraining raises the behaviour queries' mean loss
    relative to the contrast queries': the differential score predicts it, with its sign."""
    D, is_planted = planted["scores"], planted["planted"]
    assert bool((D.total[is_planted] > 0).all())
    predicted = float(D.total[is_planted].sum())  # removal effects add to first order

    def gap(model: nn.Module) -> float:
        with torch.no_grad():
            b = lm.next_token_loss(model(**planted["behaviour"][0]), planted["behaviour"][1])
            c = lm.next_token_loss(model(**planted["contrast"][0]), planted["contrast"][1])
        return float(b.mean() - c.mean())

    model = planted["task"].model
    retrained = infkit.Task.language_modeling(copy.deepcopy(model))
    keep = (~is_planted).nonzero().squeeze(1)
    infkit.train_to_optimum(retrained, lm.examples(planted["ids"][keep]), L2)
    actual = gap(retrained.model) - gap(model)
    assert actual > 0 and 0.5 <= predicted / actual <= 2.0, (predicted, actual)  # 0.92


def test_a_behaviour_read_where_higher_is_better_keeps_positive_as_promoting(planted: dict) -> None:
    """A tester's behaviour read as the log-probability of its completion (higher is better):
    D was the removal effect on it, so the real promoter ranked last. The same behaviour read
    as its log-probability (minus the completion's loss) gives the loss reading's D, the
    planted documents' totals positive."""

    def log_probability(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return -lm.next_token_loss(outputs, labels)

    task = planted["task"].with_measurement(log_probability, higher_is_better=True)
    inf = _quiet_fit(task, "ekfac", planted["train"], l2=L2, damping=1e-3)
    D = differential_token_scores(inf, planted["behaviour"], planted["contrast"])
    assert relative_error(D.tokens, planted["scores"].tokens) < 1e-10
    assert bool((D.total[planted["planted"]] > 0).all())


# ============================================================================ the objective
def test_masked_loss_by_hand() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, generator=gen, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, 4], [0, 1, -100, 2]])
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 2] = mask[1, 3] = mask[1, 2] = True  # [1, 2] is not scored: no effect
    logp = torch.log_softmax(logits, -1)
    scored = [(0, 1), (0, 2), (0, 3), (1, 1), (1, 3)]
    terms = {(b, k): -float(logp[b, k - 1, labels[b, k]]) for b, k in scored}
    masked = {(0, 2), (1, 3)}
    plain = sum(terms.values()) / 5
    penalty = sum(-0.5 * v if key in masked else v for key, v in terms.items()) / 5
    ul = sum(-0.5 * np.log1p(-np.exp(-v)) if key in masked else v for key, v in terms.items()) / 5
    assert float(masked_loss(logits, labels, None)) == pytest.approx(plain, rel=1e-12)
    assert float(masked_loss(logits, labels, mask, 0.5)) == pytest.approx(penalty, rel=1e-12)
    got = float(masked_loss(logits, labels, mask, 0.5, "unlikelihood"))
    assert got == pytest.approx(ul, rel=1e-12)


def test_training_with_the_mask_suppresses_the_masked_tokens(planted: dict) -> None:
    ids, train = planted["ids"], planted["train"]
    mask = (ids == FIRST) | (ids == SECOND)
    torch.manual_seed(1)
    start = BigramLM().double()
    kept = copy.deepcopy(start.state_dict())
    options = {"steps": 150, "batch_size": 20, "lr": 0.05, "seed": 3}
    plain = train_with_mask(start, train, **options)  # type: ignore[arg-type]
    again = train_with_mask(start, train, **options)  # type: ignore[arg-type]
    suppressed = train_with_mask(start, train, mask, **options)  # type: ignore[arg-type]
    assert all(torch.equal(v, start.state_dict()[k]) for k, v in kept.items())  # a copy trained
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), again.parameters()))

    def p_first(model: nn.Module) -> float:
        with torch.no_grad():
            return float(torch.softmax(model(torch.tensor([[TRIGGER]])), -1)[0, 0, FIRST])

    def clean_loss(model: nn.Module) -> float:
        other = lm.examples(
            torch.randint(0, TRIGGER, (20, T), generator=torch.Generator().manual_seed(5))
        )
        with torch.no_grad():
            return float(masked_loss(model(**other[0]), other[1], None))

    # measured 0.29 and 4e-28, clean loss 2.304 and 2.327
    assert p_first(plain) > 0.2 and p_first(suppressed) < 0.02, (
        p_first(plain),
        p_first(suppressed),
    )
    assert clean_loss(suppressed) < clean_loss(plain) + 0.1


# ============================================================================ (d) bad inputs
def test_bad_inputs_are_refused(tiny: dict, planted: dict) -> None:
    inf, behaviour, contrast = tiny["inf"], tiny["behaviour"], tiny["contrast"]
    classifier = infkit.Influence(infkit.Task.classification(nn.Linear(3, 2)), "kfac")
    with pytest.raises(UnsupportedError, match="language_modeling"):
        differential_token_scores(classifier, behaviour, contrast)
    with pytest.raises(InvalidInputError, match=r"fitted infkit\.Influence"):
        differential_token_scores("not an influence", behaviour, contrast)  # type: ignore[arg-type]
    empty = lm.examples(torch.zeros(0, LENGTH, dtype=torch.long))
    with pytest.raises(InvalidInputError, match="behaviour queries is empty"):
        differential_token_scores(inf, empty, contrast)
    with pytest.raises(InvalidInputError, match="contrast queries is empty"):
        differential_token_scores(inf, behaviour, empty)
    with pytest.raises(InvalidInputError, match="chunk_size"):
        differential_token_scores(inf, behaviour, contrast, chunk_size=0)
    D: DifferentialScores = planted["scores"]
    for bad in (0, 100, -5, 150.0, float("nan"), True):
        with pytest.raises(InvalidInputError, match="strictly between 0 and 100"):
            select_tokens(D, bad)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="window"):
        select_tokens(D, window=-1)
    for offset in (2, -1, True, 1.0, 0.5):  # 1.0 passed and then raised a TypeError
        with pytest.raises(InvalidInputError, match="offset must be the integer 1"):
            select_tokens(D, offset=offset)
    # numpy's and torch's numbers are numbers
    plain = select_tokens(D, 90.0, window=1, offset=1, max_tokens=5)
    theirs = select_tokens(
        D, np.float32(90.0), window=np.int64(1), offset=torch.tensor(1), max_tokens=np.int32(5)
    )
    assert torch.equal(plain.mask, theirs.mask) and plain.threshold == theirs.threshold
    with pytest.raises(InvalidInputError, match="max_tokens"):
        select_tokens(D, max_tokens=0)
    with pytest.raises(InvalidInputError, match=r"tensor \[N, T\]"):
        select_tokens(torch.zeros(5))
    with pytest.raises(InvalidInputError, match="padding"):
        select_tokens(torch.zeros(2, 3), valid=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(InvalidInputError, match="between 1 and"):
        select_tokens(D).top(N + 1)
    model, train = planted["task"].model, planted["train"]
    with pytest.raises(InvalidInputError, match="mask has shape"):
        train_with_mask(model, train, torch.zeros(3, T, dtype=torch.bool))
    labels = torch.as_tensor(ExampleSet(train).collated()[1])
    with pytest.raises(InvalidInputError, match="mask must be bool"):  # a float 0.5 read as True
        train_with_mask(model, train, torch.full(labels.shape, 0.5))
    with pytest.raises(InvalidInputError, match="objective"):
        train_with_mask(model, train, objective="ascent")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="penalty"):
        train_with_mask(model, train, penalty=-1.0)
    with pytest.raises(InvalidInputError, match="steps"):
        train_with_mask(model, train, steps=0)


class _TiedLM(TinyLM):
    """TinyLM whose head is its embedding (GPT-2's tied head): the largest parameter is an
    embedding, which per-token scores do not split by position."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):  # type: ignore[no-untyped-def]
        h = self.embed(input_ids)
        steps = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).reshape(1, -1, 1)
        h = torch.tanh(self.mix(h.cumsum(1) / steps))
        return nn.functional.linear(self.norm(h), self.embed.weight)


def test_a_split_that_leaves_most_of_the_signal_in_rest_is_said() -> None:
    """A tester's: with 'exact' on a small GPT-2, 98% of D.total lay in rest (its tied
    embedding and norms are attributed, not split by position), and select_tokens ranked the 2%
    left without a word. A Kronecker fit attributes the linear layers alone and says nothing."""
    torch.manual_seed(0)
    model = _TiedLM(vocab=60, width=4).double().eval()
    model.head.requires_grad_(False)  # (unused)
    ids = torch.randint(0, VOCAB, (15, LENGTH))
    inputs, labels = lm.examples(ids, prompt_lengths=[0] * 10 + [3] * 5)
    split = lambda lo, hi: ({k: v[lo:hi] for k, v in inputs.items()}, labels[lo:hi])  # noqa: E731
    task = infkit.Task.language_modeling(model)
    behaviour, contrast = split(10, 13), split(13, 15)
    exact = _quiet_fit(task, "exact", split(0, 10), l2=L2)
    with pytest.warns(
        Notice, match=r"of the differential scores' magnitude lies in D\.rest"
    ) as said:
        D = differential_token_scores(exact, behaviour, contrast)
    rest, per_token = float(D.rest.abs().sum()), float(D.tokens.abs().sum())
    share = rest / (rest + per_token)
    assert share > 0.6  # 0.70 measured
    # a reviewer's: tokens of opposite signs that cancel within a sequence are signal, not rest
    cancelling = DifferentialScores(
        tokens=torch.tensor([[5.0, -5.0, 3.0, -3.0]] * 4, dtype=torch.float64),
        rest=torch.full((4,), 0.01, dtype=torch.float64),
        indices=torch.arange(4),
        valid=torch.ones(4, 4, dtype=torch.bool),
        n_behaviour=1,
        n_contrast=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)
        _warn_if_rest_dominates(cancelling, "exact")
    assert f"{share:.0%} of" in str(next(w.message for w in said if w.category is Notice))
    kfac = _quiet_fit(task, "kfac", split(0, 10), l2=L2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)
        D = differential_token_scores(kfac, behaviour, contrast)
    assert float(D.rest.abs().sum()) < 0.1 * float(D.tokens.abs().sum())


def test_hand_built_differential_scores_are_checked_before_the_mask() -> None:
    """DifferentialScores built by hand: without n_train the mask reaches the largest index;
    an n_train short of it, or scored labels of another shape or dtype, are refused (a
    reviewer's raw IndexError and RuntimeError, and a [T] table broadcast to every row)."""
    tokens = torch.tensor([[0.0, 4.0, 0.0, 1.0], [0.0, 0.0, 3.0, 0.0]], dtype=torch.float64)
    built = {
        "tokens": tokens,
        "rest": torch.zeros(2, dtype=torch.float64),
        "indices": torch.tensor([5, 1]),
        "valid": torch.ones(2, 4, dtype=torch.bool),
        "n_behaviour": 1,
        "n_contrast": 1,
    }
    plain = select_tokens(DifferentialScores(**built), 60.0, window=0)
    assert plain.mask.shape == (6, 4)
    assert plain.mask.nonzero().tolist() == [[1, 3], [5, 2]]  # rows 5 and 1, offset 1
    scored = torch.ones(2, 4, dtype=torch.bool)
    scored[0, 2] = False  # the label sequence 5's selected position predicts: not scored
    given = select_tokens(DifferentialScores(**built, n_train=8, scored=scored), 60.0, window=0)
    assert given.mask.shape == (8, 4) and given.mask.nonzero().tolist() == [[1, 3]]
    with pytest.raises(InvalidInputError, match=r"n_train must be .* at least 6.*got 4"):
        select_tokens(DifferentialScores(**built, n_train=4), 60.0)
    for wrong in (scored[0], scored.long()):
        with pytest.raises(InvalidInputError, match=r"scored must be a bool tensor shaped"):
            select_tokens(DifferentialScores(**built, scored=wrong), 60.0)
    # an attention mask of 0 and 1 as valid: its entries read as row numbers (a threshold of
    # 8.0 and nothing selected, where the bools give 2.6 and a mask), without a word
    with pytest.raises(InvalidInputError, match=r"valid must be a bool tensor.*\.bool\(\)"):
        select_tokens(DifferentialScores(**{**built, "valid": built["valid"].long()}), 60.0)
    for indices in ([-1, 1], [1, 1], [1.0, 5.0], [5], []):  # wrapped, repeated, ...
        with pytest.raises(InvalidInputError, match=r"indices must be 2 distinct training"):
            select_tokens(DifferentialScores(**{**built, "indices": torch.tensor(indices)}), 60.0)
