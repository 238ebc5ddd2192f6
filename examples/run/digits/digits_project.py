"""An image problem for ``infkit run``: scikit-learn's 8x8 digits with 5% flipped labels.

The factories the config names: ``splits`` (train, test), ``trained_mlp`` (a 64-16-10 tanh MLP
trained to its optimum) and ``flipped`` (the training examples whose label was changed).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from sklearn.datasets import load_digits

import infkit

L2 = 1e-2
N_TRAIN = 600


@functools.lru_cache(maxsize=1)
def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    X, y = torch.tensor(X[order] / 16.0), torch.tensor(y[order])
    flipped = rng.choice(N_TRAIN, size=N_TRAIN // 20, replace=False)
    y_train = y[:N_TRAIN].clone()
    y_train[flipped] = (y_train[flipped] + torch.tensor(rng.integers(1, 10, len(flipped)))) % 10
    return X[:N_TRAIN], y_train, X[N_TRAIN : N_TRAIN + 200], y[N_TRAIN : N_TRAIN + 200], flipped


def splits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train, test): flat 64-pixel images in [0, 1], float64, and integer labels."""
    X, y, X_test, y_test, _ = _data()
    return (X, y), (X_test, y_test)


def flipped() -> list[int]:
    """The training examples whose label was flipped."""
    return sorted(int(i) for i in _data()[4])


def trained_mlp(hidden: int = 16) -> torch.nn.Module:
    """A tanh MLP trained to a tight optimum of mean cross-entropy + (L2/2)||theta||^2."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
    ).double()
    infkit.train_to_optimum(infkit.Task.classification(model), splits()[0], L2, progress=False)
    return model
