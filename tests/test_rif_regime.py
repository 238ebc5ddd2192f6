"""RIF in the high-dimensional regime (docs/testing.md §3): IF underestimates, RIF does not."""

from __future__ import annotations

import torch

import infkit
from infkit.evaluate import relative_error


def test_rif_fixes_if_underestimation_against_leave_one_out() -> None:
    n, d, l2 = 300, 150, 1e-3
    gen = torch.Generator().manual_seed(0)
    # Feature scale chosen so that the mean leverage is about 0.36 (docs/testing.md §3).
    X = torch.randn(n, d, generator=gen, dtype=torch.float64) * 2.5 / d**0.5
    w = 3 * torch.randn(d, generator=gen, dtype=torch.float64)
    y = torch.bernoulli(torch.sigmoid(X @ w), generator=gen)
    model = torch.nn.Linear(d, 1, bias=False).double()
    task = infkit.Task.binary_classification(model)
    assert infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-12).converged

    fitted = {
        e: infkit.Influence(task, "exact", e, l2=l2).fit((X, y)) for e in ("if", "rif", "newton")
    }
    mean_leverage = float(fitted["if"].leverages().mean())
    assert 0.3 < mean_leverage < 0.42

    sample = torch.randperm(n, generator=gen)[:20].tolist()
    errors: dict[str, list[float]] = {e: [] for e in fitted}
    shrink = []
    for j in sample:
        truth = infkit.retrain.without(task, (X, y), [j], l2, tolerance=1e-12)
        assert truth.gradient_norm < 1e-9
        for e, inf in fitted.items():
            errors[e].append(relative_error(inf.remove([j]).params, truth.delta))
        # IF is systematically too small: its norm is a fraction of the true change.
        shrink.append(float(fitted["if"].remove([j]).params.norm() / truth.delta.norm()))
    mean = {e: sum(v) / len(v) for e, v in errors.items()}
    # Measured: IF 0.34, RIF 0.012, Newton 0.012 (the RIF paper setup reports 0.40, 0.029, 0.018).
    assert mean["if"] > 0.2, mean
    assert mean["rif"] < 0.1, mean
    assert mean["newton"] < 0.1, mean
    assert sum(shrink) / len(shrink) < 0.85
