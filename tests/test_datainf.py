"""method="datainf" against a dense float64 evaluation of the same formula (docs/methods/datainf.md)."""

from __future__ import annotations

import itertools

import pytest
import torch
from autograd_reference import autograd_gradients

import infkit
from infkit.errors import InvalidInputError
from infkit.evaluate import relative_error


def dense_datainf(G, Q, V, slices, lambdas):
    """(1/N) Q A^{-1} V^T with A^{-1}_l = (1/N) sum_i (g_il g_il^T + lambda_l I)^{-1}, explicitly."""
    n, p = G.shape
    A_inv = torch.zeros(p, p, dtype=torch.float64)
    for sl, lam in zip(slices, lambdas):
        d = sl.stop - sl.start
        for i in range(n):
            g = G[i, sl].unsqueeze(1)
            A_inv[sl, sl] += torch.linalg.inv(g @ g.T + lam * torch.eye(d, dtype=torch.float64)) / n
    return Q @ A_inv @ V.T / n


@pytest.mark.parametrize(
    ("blocks", "layer_damping"), [("tensor", "auto"), ("module", "auto"), ("tensor", 0.05)]
)
def test_datainf_equals_the_dense_formula(mlp_problem: dict, blocks, layer_damping) -> None:
    model, task, l2 = mlp_problem["model"], mlp_problem["task"], mlp_problem["l2"]
    (X, y), (Xt, yt) = mlp_problem["train"], mlp_problem["test"]
    inf = infkit.Influence(
        task, "datainf", l2=l2, damping=1e-3, blocks=blocks, layer_damping=layer_damping
    ).fit((X, y))
    G = autograd_gradients(model, X, y)
    Q = autograd_gradients(model, Xt, yt)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    sizes = [p.numel() for p in model.parameters()]
    if blocks == "module":  # (weight, bias) of each Linear together
        sizes = [sizes[0] + sizes[1], sizes[2] + sizes[3]]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    slices = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    if layer_damping == "auto":
        base = [0.1 * float(G[:, sl].pow(2).sum(1).mean()) / (sl.stop - sl.start) for sl in slices]
    else:
        base = [layer_damping] * len(slices)
    lambdas = [b + l2 + 1e-3 for b in base]
    expected = dense_datainf(G, Q, G + l2 * theta, slices, lambdas)
    assert relative_error(inf.scores((Xt, yt)), expected) < 1e-10
    assert inf.describe()["layer_damping"] == pytest.approx(
        dict(zip(inf.describe()["layer_damping"], base))
    )


def test_datainf_streams_gradients_when_they_do_not_fit(mlp_problem: dict) -> None:
    task, train, test, l2 = (mlp_problem[k] for k in ("task", "train", "test", "l2"))
    cached = infkit.Influence(task, "datainf", l2=l2).fit(train)
    streamed = infkit.Influence(task, "datainf", l2=l2, memory_limit=60 * 75 * 8 * 2).fit(train)
    assert not streamed.describe()["gradients_cached"]
    assert relative_error(streamed.scores(test), cached.scores(test)) < 1e-12
    with pytest.raises(InvalidInputError, match="2 values but there are 4 blocks"):
        infkit.Influence(task, "datainf", l2=l2, layer_damping=[0.1, 0.2]).fit(train)
