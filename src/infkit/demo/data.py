"""The demo's data: scikit-learn's bundled 8x8 digits, split, standardised, 5% of labels flipped."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor

N_CLASSES = 10
N_PIXELS = 64


@dataclass
class DigitsData:
    """The split digits with flipped training labels.

    Attributes:
        X_train, X_test: standardised pixels [n, 64], float64.
        y_train: the training labels as given to the model (5% flipped), int64.
        y_train_true: the original training labels.
        flipped: [n_train] bool, True where the label was flipped.
        y_test: test labels (never flipped).
        images_train, images_test: raw pixels [n, 8, 8] (0..16) for plotting.
        ids_train, ids_test: positions in ``load_digits()``.
    """

    X_train: Tensor
    y_train: Tensor
    y_train_true: Tensor
    flipped: Tensor
    X_test: Tensor
    y_test: Tensor
    images_train: np.ndarray
    images_test: np.ndarray
    ids_train: np.ndarray
    ids_test: np.ndarray

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.X_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.X_test, self.y_test


def flip_labels(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``fraction`` of the labels, each to a different class chosen at random.

    Returns:
        the noisy labels and a boolean mask of the flipped positions.
    """
    n = len(y)
    chosen = rng.choice(n, size=round(fraction * n), replace=False)
    noisy = y.copy()
    noisy[chosen] = (y[chosen] + rng.integers(1, N_CLASSES, size=len(chosen))) % N_CLASSES
    flipped = np.zeros(n, dtype=bool)
    flipped[chosen] = True
    return noisy, flipped


def load_data(seed: int, test_fraction: float, flip_fraction: float) -> DigitsData:
    """Digits split (stratified), standardised on the training split, with flipped labels."""
    digits = load_digits()
    ids = np.arange(len(digits.target))
    ids_train, ids_test = train_test_split(
        ids, test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    scaler = StandardScaler().fit(digits.data[ids_train])
    y_true = digits.target[ids_train]
    y_noisy, flipped = flip_labels(y_true, flip_fraction, np.random.default_rng(seed))
    return DigitsData(
        X_train=torch.tensor(scaler.transform(digits.data[ids_train]), dtype=torch.float64),
        y_train=torch.tensor(y_noisy, dtype=torch.long),
        y_train_true=torch.tensor(y_true, dtype=torch.long),
        flipped=torch.tensor(flipped),
        X_test=torch.tensor(scaler.transform(digits.data[ids_test]), dtype=torch.float64),
        y_test=torch.tensor(digits.target[ids_test], dtype=torch.long),
        images_train=digits.images[ids_train],
        images_test=digits.images[ids_test],
        ids_train=ids_train,
        ids_test=ids_test,
    )
