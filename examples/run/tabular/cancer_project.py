"""A tabular problem for ``infkit run``: scikit-learn's breast cancer data (30 features),
binary logistic regression on standardised features."""

from __future__ import annotations

import functools

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer

import infkit

L2 = 1e-3


@functools.lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    X, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(1).permutation(len(y))
    X = (X - X.mean(0)) / X.std(0)
    X, y = torch.tensor(X[order]), torch.tensor(y[order], dtype=torch.float64)
    return X[:400], y[:400], X[400:], y[400:]


def splits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test): standardised features, float64, and 0/1 targets (1 = benign)."""
    X, y, X_test, y_test = _data()
    return (X, y), (X_test, y_test)


def trained_logreg() -> torch.nn.Module:
    """Logistic regression trained to its optimum."""
    torch.manual_seed(0)
    model = torch.nn.Linear(30, 1).double()
    infkit.train_to_optimum(
        infkit.Task.binary_classification(model), splits()[0], L2, progress=False
    )
    return model
