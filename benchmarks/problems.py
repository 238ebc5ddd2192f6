"""Data and models shared by the benchmarks: the digits split, the real MNIST test set, MLPs.

Imports only numpy and torch at module level (scikit-learn lazily), so the peer workers, which
run these scripts in the separate peer venv, can use it too.
"""

from __future__ import annotations

import gzip
import itertools
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
#: the real MNIST test set (10,000 images, idx gzip files); read in place, never copied
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"


def tanh_mlp(sizes: list[int]) -> torch.nn.Sequential:
    """Linear layers of the given widths with tanh between them (none after the last)."""
    layers: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.Tanh())
    return torch.nn.Sequential(*layers)


def digits_split() -> dict[str, torch.Tensor]:
    """sklearn's digits, stratified 80/20 split (seed 0), standardised on the training part:
    1,437 train and 360 test examples, float64."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=0, stratify=y)
    scaler = StandardScaler().fit(Xtr)
    return {
        "X_train": torch.tensor(scaler.transform(Xtr)),
        "y_train": torch.tensor(ytr),
        "X_test": torch.tensor(scaler.transform(Xte)),
        "y_test": torch.tensor(yte),
    }


def _read_idx(path: Path, offset: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=offset)


def mnist_test_set(directory: Path = MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """Images [10000, 784] in [0, 1] (float64) and labels [10000] (int64)."""
    images = _read_idx(directory / "t10k-images-idx3-ubyte.gz", 16).reshape(-1, 784)
    labels = _read_idx(directory / "t10k-labels-idx1-ubyte.gz", 8)
    return images.astype(np.float64) / 255.0, labels.astype(np.int64)


def random_split(n: int, n_train: int, n_test: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Disjoint random train and test indices into n examples (numpy generator ``seed``)."""
    perm = np.random.default_rng(seed).permutation(n)
    return perm[:n_train], perm[n_train : n_train + n_test]


def pearson(a, b) -> float:
    """Pearson correlation of two arrays/tensors of scores, flattened (nan when one is None)."""
    if a is None or b is None:
        return float("nan")
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    return float(np.corrcoef(a, b)[0, 1])
