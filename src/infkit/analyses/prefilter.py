"""Two-stage attribution for text: TF-IDF candidates first, influence on the survivors only.

Scoring every query against every training document costs a pass over the whole corpus, and for
a given query most documents are irrelevant. Grosse et al. (2023) score a query only against the
training sequences that share its rarer words: the top M by TF-IDF cosine similarity. Here

1. stage 1 ranks the corpus for each query by the cosine similarity of TF-IDF vectors
   (scikit-learn's ``TfidfVectorizer``, fitted on the training texts; optional dependency,
   ``pip install infkit[text]``) and keeps the top M, ``candidates [Q, M]``;
2. stage 2 computes the influence of the union of all queries' candidates on the queries,
   exactly and at full rank (``Influence.scores(queries, among=union)``: the streamed Kronecker
   scores pass over the union only), and keeps each query's own candidates.

The prefiltered top k misses an influential document that shares no vocabulary with the query;
:func:`recall_at_k` measures how often, against full scoring (docs/analyses.md §8).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from infkit.errors import InvalidInputError, UnsupportedError, warn
from infkit.evaluate import NON_FINITE_SCORE
from infkit.influence import Influence
from infkit.options import integer_argument


@dataclass(frozen=True)
class Prefiltered:
    """Scores of each query's TF-IDF candidates.

    Attributes:
        candidates: [Q, M] training indices, the most similar by TF-IDF first.
        scores: [Q, M] float64 influence scores (removal effects) of those candidates.
        similarity: [Q, M] their TF-IDF cosine similarities to the query.
        scored: how many distinct training examples stage 2 scored (the union).
        n_train: N, the training examples the candidates were drawn from (None: not
            recorded, as in objects built before it was).
    """

    candidates: Tensor
    scores: Tensor
    similarity: Tensor
    scored: int
    n_train: int | None = None

    def top_k(self, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
        """The k candidates with the largest (``largest=False``: smallest) scores per query:
        training indices [Q, k] and their scores [Q, k]."""
        k = integer_argument("k (at most the candidates per query)", k, 1, self.candidates.shape[1])
        values, order = self.scores.topk(k, dim=1, largest=largest)
        return self.candidates.gather(1, order), values


def tfidf_candidates(
    train_texts: Sequence[str], query_texts: Sequence[str], m: int, **vectorizer: Any
) -> tuple[Tensor, Tensor]:
    """The ``m`` training texts most similar to each query by TF-IDF cosine similarity:
    indices [Q, m] (most similar first) and similarities [Q, m] float64.

    ``vectorizer``: options of scikit-learn's ``TfidfVectorizer`` (default: English stop words
    removed, sublinear term frequency), fitted on the training texts.
    """
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
    except ImportError as exc:  # pragma: no cover - sklearn is in the test environment
        raise UnsupportedError(
            "the TF-IDF prefilter needs scikit-learn: pip install infkit[text] (or scikit-learn)"
        ) from exc
    _check_texts(train_texts, "train_texts")
    _check_texts(query_texts, "query_texts")
    m = integer_argument(
        "m (the candidates per query, at most the training texts)", m, 1, len(train_texts)
    )
    options = {"stop_words": "english", "sublinear_tf": True, **vectorizer}
    try:  # (an unknown option, or a corpus of stop words alone, came through raw)
        tfidf = TfidfVectorizer(**options)
        train = tfidf.fit_transform(train_texts)  # rows L2-normalised: products are cosines
    except (TypeError, ValueError) as error:
        remedy = "Check the TfidfVectorizer options given as keywords"
        if "empty vocabulary" in str(error):  # (stop words, or words the pattern drops)
            keeps = (
                "its token_pattern (by default words of two characters or more; "
                "r'(?u)\\b\\w+\\b' keeps one-letter words)"
            )
            if options.get("stop_words") is not None:
                keeps = f"its stop words (stop_words=None keeps them) and {keeps}"
            remedy = f"The texts hold no word the vectorizer keeps; what it keeps is set by {keeps}"
        raise InvalidInputError(
            f"the TF-IDF prefilter's vectorizer (scikit-learn's TfidfVectorizer with "
            f"{sorted(options)}) refused the training texts or its options: {error}. {remedy}"
        ) from error
    queries = tfidf.transform(query_texts)
    similarity = torch.from_numpy((queries @ train.T).toarray()).to(torch.float64)
    unmatched = (similarity.amax(dim=1) <= 0).nonzero().reshape(-1).tolist()
    if unmatched:
        shown = ", ".join(map(str, unmatched[:8])) + (", ..." if len(unmatched) > 8 else "")
        warn(
            f"query text(s) {shown} share no term with any training text after the "
            "vectorizer's stop words are removed (every TF-IDF similarity is 0): their m "
            "candidates are arbitrary, so a true proponent may be left out. Score such queries "
            "without the prefilter, or pass vectorizer options (stop_words=None)"
        )
    values, indices = similarity.topk(m, dim=1)
    return indices, values


def prefiltered_scores(
    inf: Influence,
    queries: Any,
    train_texts: Sequence[str],
    query_texts: Sequence[str],
    m: int,
    **vectorizer: Any,
) -> Prefiltered:
    """Stage 1 (:func:`tfidf_candidates`) and stage 2 (the influence of every query's
    candidates) for a fitted ``inf``; ``train_texts[j]`` is training example j's text and
    ``query_texts[t]`` query t's."""
    if len(train_texts) != inf.n_train:
        raise InvalidInputError(
            f"train_texts has {len(train_texts)} texts for {inf.n_train} training examples: "
            "give one text per training example, in the same order"
        )
    candidates, similarity = tfidf_candidates(train_texts, query_texts, m, **vectorizer)
    union, position = torch.unique(candidates, return_inverse=True)  # sorted training indices
    scores = inf.scores(queries, among=union).to(torch.float64)  # [Q, |union|]
    if scores.shape[0] != len(query_texts):
        raise InvalidInputError(
            f"query_texts has {len(query_texts)} texts for {scores.shape[0]} queries"
        )
    return Prefiltered(candidates, scores.gather(1, position), similarity, len(union), inf.n_train)


def recall_at_k(
    prefiltered: Prefiltered, full_scores: Tensor, k: int, largest: bool = True
) -> float:
    """Mean over queries of the share of the full scores' top k that the prefiltered top k
    finds: ``|top_k(prefiltered) & top_k(full)| / k``.

    ``full_scores``: [Q, N] the scores of the same queries against the whole training set
    (``inf.scores(queries)``), whose column j is training example j."""
    found, _ = prefiltered.top_k(k, largest)
    queries = prefiltered.candidates.shape[0]
    full = torch.as_tensor(full_scores)
    n = getattr(prefiltered, "n_train", None)  # (not recorded: at least past every candidate)
    columns_fit = (
        full.shape[-1] == n if n is not None else full.shape[-1] > int(prefiltered.candidates.max())
    )
    if full.dim() != 2 or full.shape[0] != queries or not columns_fit:
        raise InvalidInputError(
            f"full_scores must be [{queries}, {n if n is not None else 'N'}] (the prefiltered "
            f"queries against every training example), got {tuple(full.shape)}: a slice of the "
            "columns or another set of queries would make the recall another's"
        )
    # topk ranks NaN first, and the infinity of the side it takes: the truth would fill with
    # the broken entries (the other infinity, last in that order, is never among them)
    first = float("inf") if largest else float("-inf")
    broken = (torch.isnan(full) | (full == first)).nonzero()
    if len(broken):
        q, j = broken[0].tolist()
        raise InvalidInputError(
            f"full_scores[{q}, {j}] is {float(full[q, j])} ({len(broken)} entries are NaN or "
            f"{first}, which a top k of the {'largest' if largest else 'smallest'} ranks "
            f"first): {NON_FINITE_SCORE}"
        )
    truth = full.topk(k, dim=1, largest=largest).indices
    hits = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth, strict=True)]
    return sum(hits) / (k * len(hits))


def _check_texts(texts: Sequence[str], name: str) -> None:
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise InvalidInputError(f"{name} must be a sequence of strings, one per example")
    if len(texts) == 0:
        raise InvalidInputError(f"{name} is empty: give one string per example")
