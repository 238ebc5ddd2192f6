"""method="lissa": the fixed point on an explicit matrix (docs/testing.md §5) and scores against exact."""

from __future__ import annotations

import pytest
import torch

import infkit
from infkit.errors import CurvatureError
from infkit.evaluate import correlation, relative_error
from infkit.methods.lissa import lissa, power_iteration


def spd(size: int = 20, lo: float = 0.05, hi: float = 2.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=torch.float64))
    return Q @ torch.diag(torch.linspace(lo, hi, size, dtype=torch.float64)) @ Q.T


def test_fixed_point_is_the_damped_inverse() -> None:
    H = spd()
    V = torch.randn(3, 20, dtype=torch.float64)
    d, s = 0.01, 2.5
    out = lissa(lambda X: X @ H, V, scale=s, damping=d, depth=6000).X
    expected = torch.linalg.solve(H + d * s * torch.eye(20, dtype=torch.float64), V.T).T
    assert relative_error(out, expected) < 1e-10


def test_small_depth_is_the_truncated_series() -> None:
    H = spd()
    V = torch.randn(3, 20, dtype=torch.float64)
    d, s, depth = 0.01, 2.5, 7
    out = lissa(lambda X: X @ H, V, scale=s, damping=d, depth=depth).X
    M = (1 - d) * torch.eye(20, dtype=torch.float64) - H / s
    series = sum(torch.linalg.matrix_power(M, k) for k in range(depth + 1)) / s
    assert relative_error(out, V @ series) < 1e-13
    # Truncation under-inverts the low-curvature directions (implicit damping about s/J):
    exact = torch.linalg.solve(H + d * s * torch.eye(20, dtype=torch.float64), V.T).T
    assert out.norm() < exact.norm()


def test_divergence_raises_a_clear_error() -> None:
    H = spd(hi=2.0)
    V = torch.randn(2, 20, dtype=torch.float64)
    assert power_iteration(lambda X: X @ H, 20, iterations=200, rtol=1e-10) == pytest.approx(
        2.0, rel=1e-4
    )
    with pytest.raises(CurvatureError, match=r"LiSSA diverged.*raise the scale"):
        lissa(lambda X: X @ H, V, scale=0.8, damping=0.0, depth=500)


def test_lissa_scores_match_exact(mlp_problem: dict) -> None:
    task, train, test, l2 = (mlp_problem[k] for k in ("task", "train", "test", "l2"))
    reference = infkit.Influence(task, "exact", l2=l2).fit(train)
    R = reference.scores(test)
    # Full-batch (deterministic) recursion: the truncation error is what tol says.
    full = infkit.Influence(task, "lissa", l2=l2, tol=1e-3).fit(train)
    assert relative_error(full.scores(test), R) < 2e-3
    info = full.describe()
    lam_max = float(torch.linalg.eigvalsh(reference.method.data_curvature)[-1])
    assert info["effective_damping"] == pytest.approx(l2)
    assert info["scale"] >= lam_max + l2
    assert info["lissa_damping"] * info["scale"] == pytest.approx(l2)
    # Stochastic minibatches of 30 out of 60 examples, two repeats.
    noisy = infkit.Influence(task, "lissa", l2=l2, minibatch_size=30, repeats=2, seed=1).fit(train)
    S = noisy.scores(test)
    assert correlation(S, R).pearson >= 0.99
    # One draw of minibatches per fit: the same question gets the same answer, and the modules
    # split that solve (a tester's: two calls 0.10-0.14 apart, the modules' sum 0.136 off)
    assert relative_error(noisy.scores(test), S) < 1e-12
    assert relative_error(sum(noisy.module_scores(test).values()), S) < 1e-12
    other = infkit.Influence(task, "lissa", l2=l2, minibatch_size=30, repeats=2, seed=2).fit(train)
    assert relative_error(other.scores(test), S) > 1e-4  # another seed, another draw


def test_lissa_newton_group_removal(mlp_problem: dict) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    group = [2, 8, 40]
    reference = infkit.Influence(task, "exact", "newton", l2=l2).fit(train).remove(group)
    inf = infkit.Influence(task, "lissa", "newton", l2=l2, tol=1e-3).fit(train)
    assert relative_error(inf.remove(group).params, reference.params) < 1e-3


def test_layer_blocks_invert_the_block_diagonal_curvature(mlp_problem: dict) -> None:
    task, train, test, l2 = (mlp_problem[k] for k in ("task", "train", "test", "l2"))
    exact = infkit.Influence(task, "exact", l2=l2).fit(train)
    H = exact.method.data_curvature
    blocks = torch.zeros_like(H)
    for sl in exact.fitted.space.module_slices().values():
        blocks[sl, sl] = H[sl, sl]
    inf = infkit.Influence(task, "lissa", l2=l2, blocks="tensor", tol=1e-3).fit(train)
    V = exact.fitted.query_gradients(infkit.data.ExampleSet(test))
    expected = torch.linalg.solve(blocks + l2 * torch.eye(H.shape[0], dtype=H.dtype), V.T).T
    assert relative_error(inf.method.solve(V), expected) < 1e-3
