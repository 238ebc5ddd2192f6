"""Scores against chosen training examples (``scores(test, among=...)``) and the TF-IDF
two-stage prefilter: against full scoring, on the streamed and the cached paths
(docs/analyses.md §8)."""

from __future__ import annotations

import warnings

import pytest
import torch
from lm_helpers import LENGTH, VOCAB, TinyLM, rows

import infkit
from infkit import language_modeling as lm
from infkit.analyses.prefilter import prefiltered_scores, recall_at_k, tfidf_candidates
from infkit.errors import InvalidInputError
from infkit.evaluate import relative_error

N, Q = 24, 3


@pytest.fixture(scope="module")
def problem() -> dict:
    torch.manual_seed(11)
    model = TinyLM().double().eval()
    ids = torch.randint(0, VOCAB, (N + Q, LENGTH))
    inputs, labels = lm.examples(ids)
    # each text: its tokens as words, and a word shared only by training doc 5 t + 1 and query t
    texts = [" ".join(f"tok{int(i)}" for i in row) for row in ids]
    for t in range(Q):
        texts[5 * t + 1] += f" rare{t} rare{t}"
        texts[N + t] += f" rare{t}"
    return {
        "task": infkit.Task.language_modeling(model),
        "train": rows(inputs, labels, 0, N),
        "test": rows(inputs, labels, N, N + Q),
        "train_texts": texts[:N],
        "query_texts": texts[N:],
    }


def _fit(problem: dict, method: str, **options: object) -> infkit.Influence:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(
            problem["task"], method, l2=1e-2, damping=1e-2, batch_size=4, **options
        )
        return inf.fit(problem["train"])


@pytest.mark.parametrize(
    ("method", "options"),
    [("ekfac", {"memory_limit": 60_000}), ("ekfac", {}), ("exact", {})],
    ids=["ekfac-streamed", "ekfac-cached", "exact"],
)
def test_scores_among_chosen_examples_are_the_full_scores_columns(
    problem: dict, method: str, options: dict
) -> None:
    inf = _fit(problem, method, **options)
    assert (inf.fitted.train_gradients is None) == ("memory_limit" in options)
    full = inf.scores(problem["test"])
    among = [17, 3, 9, 22, 0]  # any order: column c is training example among[c]
    assert relative_error(inf.scores(problem["test"], among=among), full[:, among]) < 1e-12
    with pytest.raises(InvalidInputError, match="training index"):
        inf.scores(problem["test"], among=[N])


def test_tfidf_candidates_find_the_document_sharing_a_rare_word(problem: dict) -> None:
    indices, similarity = tfidf_candidates(problem["train_texts"], problem["query_texts"], 4)
    assert indices.shape == similarity.shape == (Q, 4)
    assert indices[:, 0].tolist() == [5 * t + 1 for t in range(Q)]
    assert bool((similarity[:, :-1] >= similarity[:, 1:]).all())  # most similar first
    assert bool((similarity <= 1 + 1e-12).all())  # cosines of L2-normalised rows
    # a query of stop words only matches nothing: its candidates are arbitrary, and said so
    with pytest.warns(UserWarning, match=r"query text\(s\) 1 share no term"):
        tfidf_candidates(problem["train_texts"], [problem["query_texts"][0], "the of and"], 4)


def test_two_stage_scores_are_the_candidates_full_scores_and_recall_counts_hits(
    problem: dict,
) -> None:
    inf = _fit(problem, "ekfac", memory_limit=60_000)
    full = inf.scores(problem["test"])
    pre = prefiltered_scores(
        inf, problem["test"], problem["train_texts"], problem["query_texts"], 6
    )
    assert relative_error(pre.scores, full.gather(1, pre.candidates)) < 1e-12
    assert pre.scored == len(torch.unique(pre.candidates)) <= Q * 6
    # every candidate kept (m = N): the prefiltered top k is the full top k
    whole = prefiltered_scores(
        inf, problem["test"], problem["train_texts"], problem["query_texts"], N
    )
    assert recall_at_k(whole, full, 5) == 1.0
    # recall by hand: the share of the full top 3 among the prefiltered top 3
    top, _ = pre.top_k(3)
    truth = full.topk(3, dim=1).indices
    expected = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(top, truth)) / (3 * Q)
    assert recall_at_k(pre, full, 3) == pytest.approx(expected)
    with pytest.raises(InvalidInputError, match="one text per training example"):
        prefiltered_scores(
            inf, problem["test"], problem["train_texts"][:-1], problem["query_texts"], 3
        )
    with pytest.raises(InvalidInputError, match=r"m \(the candidates per query.*between 1 and"):
        tfidf_candidates(problem["train_texts"], problem["query_texts"], N + 1)
    with pytest.raises(InvalidInputError, match="sequence of strings"):
        tfidf_candidates("one text", problem["query_texts"], 2)
    # a tester's: raw scikit-learn and torch errors, and a recall of another matrix
    with pytest.raises(InvalidInputError, match="query_texts is empty"):
        tfidf_candidates(problem["train_texts"], [], 2)
    with pytest.raises(InvalidInputError, match=r"m \(the candidates.*got 5\.0"):
        tfidf_candidates(problem["train_texts"], problem["query_texts"], 5.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"k \(at most the candidates.*got 2\.5"):
        pre.top_k(2.5)  # type: ignore[arg-type]
    for wrong in (full[:, : N // 2], full.T, full[:1]):  # columns cut, transposed, a query
        with pytest.raises(InvalidInputError, match=rf"full_scores must be \[{Q}, {N}\]"):
            recall_at_k(pre, wrong, 3)
    # a NaN column ranked first in the truth's top k (topk takes NaN as the largest): the
    # recall read 0.767 for 0.933 without a word
    broken = full.clone()
    broken[1, 4] = float("nan")
    with pytest.raises(InvalidInputError, match=r"full_scores\[1, 4\] is nan"):
        recall_at_k(pre, broken, 3)
    # (a reviewer's: the check read the scores through NumPy, which has no bfloat16, and an
    # entry of -inf, which a top k of the largest never reaches, is no NaN)
    assert recall_at_k(pre, full.to(torch.bfloat16), 3) == pytest.approx(
        recall_at_k(pre, full.to(torch.bfloat16).double(), 3)
    )
    low = full.clone()
    low[0, int(full[0].argmin())] = float("-inf")
    assert recall_at_k(pre, low, 3) == pytest.approx(expected)
    # but the infinity a top k takes first fills the truth as NaN did (a reviewer's: 0.1667
    # for 0.333)
    with pytest.raises(InvalidInputError, match=r"full_scores\[0, \d+\] is -inf.*smallest"):
        recall_at_k(pre, low, 3, largest=False)
    high = full.clone()
    high[0, 2] = float("inf")
    with pytest.raises(InvalidInputError, match=r"full_scores\[0, 2\] is inf.*largest"):
        recall_at_k(pre, high, 3)


def test_the_vectorizers_refusals_are_named() -> None:
    """An unknown vectorizer option and a corpus of stop words alone came through as
    scikit-learn's TypeError and ValueError (a tester's)."""
    texts = ["the cat sat", "a dog ran far", "birds sing at dawn"]
    with pytest.raises(InvalidInputError, match="Check the TfidfVectorizer options given as"):
        tfidf_candidates(texts, ["cat"], 1, no_such_option=1)
    with pytest.raises(InvalidInputError, match=r"its stop words \(stop_words=None keeps them"):
        tfidf_candidates(["the", "a", "and"], ["the"], 1)
    # one-letter words: the token pattern drops them, not the stop words (a reviewer's)
    with pytest.raises(InvalidInputError, match=r"set by its token_pattern \(by default"):
        tfidf_candidates(["x y", "z w"], ["x"], 1, stop_words=None)
    (found,), _ = tfidf_candidates(["x y", "z w"], ["x"], 1, token_pattern=r"(?u)\b\w+\b")
    assert found.tolist() == [0]
    (found,), _ = tfidf_candidates(["the", "a", "and"], ["the"], 1, stop_words=None)
    assert found.tolist() == [0]
