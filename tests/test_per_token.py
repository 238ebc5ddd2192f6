"""Per-token and per-module scores are exact decompositions of the sequence scores (§4.4)."""

from __future__ import annotations

import pytest
import torch
from kfac_helpers import TinySequenceModel, sequence_data, sequence_loss

import infkit
from infkit.errors import UnsupportedError
from infkit.evaluate import relative_error

pytestmark = pytest.mark.filterwarnings("ignore:the model is not at a stationary point")


class PooledClassifier(torch.nn.Module):
    """Token layers, then a mean-pooled linear head (a layer with one position)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = TinySequenceModel(vocab=4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.body(x, attention_mask)
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.head((h * m).sum(1) / m.sum(1))


@pytest.fixture(scope="module")
def sequences() -> dict:
    torch.manual_seed(11)
    model = TinySequenceModel(conv1d=True).double()
    task = infkit.Task(model, sequence_loss, name="tokens")
    train = sequence_data(n=16, seed=1)
    test = sequence_data(n=3, seed=2)
    return {"model": model, "task": task, "train": train, "test": test}


@pytest.mark.parametrize("method", ["ekfac", "exact"])
def test_per_token_scores_sum_to_the_sequence_scores(sequences: dict, method: str) -> None:
    task, train, test = sequences["task"], sequences["train"], sequences["test"]
    inf = infkit.Influence(task, method, l2=1e-2, damping=1e-3, batch_size=5).fit(train)
    S = inf.scores(test)
    tokens = inf.token_scores(test)
    assert tokens.tokens.shape == (3, 16, 5)
    assert relative_error(tokens.total, S) < 1e-10
    # Padding positions contribute nothing; the l2 share is the only non-token part here.
    pad = train[0]["attention_mask"] == 0
    assert float(tokens.tokens[:, pad].abs().max()) < 1e-14
    assert tokens.layers == ["inp", "mix", "out"]
    U = inf.method.precondition_queries(inf.fitted.query_gradients(infkit.data.ExampleSet(test)))
    l2_share = 1e-2 * (U @ inf.fitted.theta) / 16
    assert relative_error(tokens.rest, l2_share.unsqueeze(1).expand(3, 16)) < 1e-10
    # A subset of training sequences.
    part = inf.token_scores(test, indices=[3, 7])
    assert relative_error(part.total, S[:, [3, 7]]) < 1e-10
    assert relative_error(part.tokens, tokens.tokens[:, [3, 7]]) < 1e-12


@pytest.mark.parametrize("streamed", [False, True])
def test_pooled_head_goes_to_the_rest(streamed: bool, tmp_path) -> None:
    """Both ways of splitting: from the preconditioned queries and the cached gradients, and in
    the Kronecker scorer's pass (with a workdir), which hands each layer's terms over as the
    backward reaches it."""
    torch.manual_seed(3)
    model = PooledClassifier().double()
    task = infkit.Task.classification(model)
    x, _ = sequence_data(n=12, seed=4)
    y = torch.randint(0, 2, (12,))
    place = {"workdir": tmp_path} if streamed else {}
    inf = infkit.Influence(task, "kfac", damping=1e-2, **place).fit((x, y))
    tokens = inf.token_scores((x, y))
    assert inf.describe()["query_groups"] == int(streamed)  # the scorer's pass, or none
    assert "head" not in tokens.layers
    assert relative_error(tokens.total, inf.scores((x, y))) < 1e-10
    # positions=1 decomposes the head instead (it sees one position); a count that no layer
    # has would leave every token score 0, and is refused naming the counts there are
    head = inf.token_scores((x, y), positions=1)
    assert head.layers == ["head"] and head.tokens.shape[-1] == 1
    assert relative_error(head.total, tokens.total) < 1e-10
    with pytest.raises(infkit.errors.InvalidInputError, match=r"positions=3 .*theirs: 1, 5"):
        inf.token_scores((x, y), positions=3)


def test_per_module_scores_sum_to_the_scores(sequences: dict) -> None:
    task, train, test = sequences["task"], sequences["train"], sequences["test"]
    inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-3).fit(train)
    parts = inf.module_scores(test)
    assert list(parts) == ["inp", "mix", "out"]
    assert relative_error(sum(parts.values()), inf.scores(test)) < 1e-10
    # With a block-diagonal curvature a layer's score is its influence in isolation.
    m = inf.method
    t = m.tracked_layers().tracked[1]
    idx = m.tracked_layers().layout.flat_index(t)
    Q = inf.fitted.query_gradients(infkit.data.ExampleSet(test))
    V = inf.fitted.train_gradients + 1e-2 * inf.fitted.theta
    Qm = torch.zeros_like(Q)
    Qm[:, idx] = Q[:, idx]
    alone = m.solve(Qm) @ V.T / 16
    assert relative_error(parts["mix"], alone) < 1e-10
    # Any primal method: the layer shares of the exact scores; other parameters by module.
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 3))
    task = infkit.Task.classification(model.double())
    X, y = torch.randn(20, 5, dtype=torch.float64), torch.randint(0, 3, (20,))
    exact = infkit.Influence(task, "exact", l2=1e-2).fit((X, y))
    shares = exact.module_scores((X[:4], y[:4]))
    assert list(shares) == ["0", "1", "2"]
    assert relative_error(sum(shares.values()), exact.scores((X[:4], y[:4]))) < 1e-10
    with pytest.raises(UnsupportedError, match="with_estimator"):
        exact.with_estimator("rif").module_scores((X[:4], y[:4]))
