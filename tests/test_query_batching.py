"""Query batching: rank-R preconditioned queries and the two-stage refinement."""

from __future__ import annotations

import pytest
import torch
from kfac_helpers import TinySequenceModel, sequence_data, sequence_loss

import infkit
from infkit.data import ExampleSet
from infkit.decompositions import low_rank_queries
from infkit.errors import InvalidInputError, UnsupportedError
from infkit.estimators import Estimator
from infkit.evaluate import correlation, relative_error

pytestmark = pytest.mark.filterwarnings("ignore:the model is not at a stationary point")


@pytest.fixture(scope="module")
def wide() -> dict:
    """A token model whose layers are wider than rank 32 (blocks 48 x 41 and 48 x 49)."""
    torch.manual_seed(21)
    model = TinySequenceModel(d=40, hidden=48, vocab=5).double()
    task = infkit.Task(model, sequence_loss, name="tokens")
    train = sequence_data(n=40, t=6, d=40, vocab=5, seed=5)
    test = sequence_data(n=6, t=6, d=40, vocab=5, seed=6)
    inf = infkit.Influence(task, "ekfac", l2=1e-3, damping=1e-3, batch_size=20).fit(train)
    return {"inf": inf, "test": test, "full": inf.scores(test)}


def test_rank_32_query_batching_correlates_with_full_rank(wide: dict) -> None:
    inf, test, full = wide["inf"], wide["test"], wide["full"]
    S = inf.batched_scores(test, rank=32)
    assert S.shape == full.shape
    pearson = correlation(S, full).pearson
    assert pearson >= 0.95
    assert pearson < 1 - 1e-9  # the truncation did something
    queries = low_rank_queries(inf.method, inf.fitted, ExampleSet(test), Estimator(), rank=32)
    assert queries.left["inp"].shape == (6, 48, 32) and queries.right["mix"].shape == (6, 49, 32)
    assert queries.left["out"].shape == (6, 5, 49)  # min(d_out, cols) <= 32: kept exactly
    # Randomized SVD: same ballpark.
    assert correlation(inf.batched_scores(test, rank=32, svd="randomized"), full).pearson >= 0.9


def test_full_rank_and_refinement_are_exact(wide: dict) -> None:
    inf, test, full = wide["inf"], wide["test"], wide["full"]
    assert relative_error(inf.batched_scores(test, rank=64), full) < 1e-10
    coarse = inf.batched_scores(test, rank=4)
    refined = inf.batched_scores(test, rank=4, refine=5)
    changed = refined != coarse
    # Each query's 5 strongest proponents and opponents (by the rank-4 ranking) are now exact.
    top = coarse.topk(5, dim=1).indices
    bottom = (-coarse).topk(5, dim=1).indices
    chosen = torch.cat([top, bottom], dim=1)
    assert relative_error(refined.gather(1, chosen), full.gather(1, chosen)) < 1e-10
    assert int(changed.sum()) <= chosen.numel()
    keep = torch.ones_like(changed)
    keep.scatter_(1, chosen, False)
    assert torch.equal(refined[keep], coarse[keep])
    # ranks and refinements that are not counts are refused by name (a tester's: refine=-1
    # passed as 0, rank=True as 1, 2.5 and 1.5 raised Python's and torch's TypeErrors)
    for bad in ({"rank": 2.5}, {"rank": True}, {"rank": 0}, {"refine": -1}, {"refine": 1.5}):
        name = next(iter(bad))
        with pytest.raises(InvalidInputError, match=rf"{name} must be an integer >= "):
            inf.batched_scores(test, **({"rank": 4} | bad))  # type: ignore[arg-type]


def test_query_batching_needs_tracked_layers_only() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3)
    ).double()
    task = infkit.Task.classification(model)
    X, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    inf = infkit.Influence(task, "exact", l2=1e-2).fit((X, y))
    with pytest.raises(UnsupportedError, match="freeze"):
        inf.batched_scores((X[:3], y[:3]))


def test_query_rank_truncates_a_float64_models_queries_in_float64() -> None:
    """query_rank=1 and batched_scores(rank=1) keep the same rank-1 part of each layer's
    preconditioned query (both layers here are wider than 1 + 1 / min side), by an SVD each:
    query_rank's ran in float32 whatever the model, 1e-7 from batched_scores' float64 one
    (a tester's); now both are the float64 model's to rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 5)
    ).double()
    X, y = torch.randn(60, 6, dtype=torch.float64), torch.randint(0, 5, (60,))
    task = infkit.Task.classification(model)
    options = {"l2": 1e-2, "damping": 1e-3, "fisher": "ggn", "progress": False}
    full = infkit.Influence(task, "kfac", **options).fit((X, y))
    ranked = infkit.Influence(task, "kfac", query_rank=1, **options).fit((X, y))
    queries = (X[:4] + 0.1, y[:4])
    S = ranked.scores(queries)
    assert ranked.describe()["query_rank"] == 1
    assert relative_error(S, full.scores(queries)) > 1e-3  # the truncation matters
    assert relative_error(S, full.batched_scores(queries, rank=1)) < 1e-12
