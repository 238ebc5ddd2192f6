"""Koh & Liang's input-perturbation influence against finite differences of actual retraining."""

from __future__ import annotations

import torch

import infkit


def test_input_influence_matches_retraining_with_a_moved_input() -> None:
    gen = torch.Generator().manual_seed(3)
    X = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    y = (X[:, 0] + 0.7 * torch.randn(40, generator=gen, dtype=torch.float64) > 0).long()
    model = torch.nn.Linear(3, 2).double()
    task = infkit.Task.classification(model)
    l2 = 1e-2
    infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-13)
    test = (torch.tensor([[0.3, -1.0, 0.5]], dtype=torch.float64), torch.tensor([1]))
    inf = infkit.Influence(task, l2=l2).fit((X, y))
    j = 5
    grad = inf.input_influence(test, [j])  # [1, 1, 3]
    assert grad.shape == (1, 1, 3)

    def test_loss_after_moving(delta: torch.Tensor) -> float:
        import copy

        moved = X.clone()
        moved[j] += delta
        clone = copy.deepcopy(model)
        clone_task = infkit.Task.classification(clone)
        infkit.train_to_optimum(clone_task, (moved, y), l2, tolerance=1e-13)
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(clone(test[0]), test[1]))

    h = 1e-4
    for k in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[k] = h
        fd = (test_loss_after_moving(e) - test_loss_after_moving(-e)) / (2 * h)
        assert abs(fd - float(grad[0, 0, k])) <= 1e-4 * abs(fd) + 1e-9
