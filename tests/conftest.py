"""Shared fixtures: small float64 problems with independent ground truth."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from sklearn.datasets import load_wine
from sklearn.preprocessing import StandardScaler

import infkit

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _import_method_file(path: Path) -> None:
    """Import a file that registers a method (under its stem's module name): the contract test,
    collected from infkit.methods(), then covers that method too."""
    if not path.is_file():
        raise pytest.UsageError(f"--method-file {path}: no such file")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)


# examples/diagonal_ggn.py, a method defined outside the package, is covered in every run
_import_method_file(EXAMPLES / "diagonal_ggn.py")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--method-file",
        action="append",
        default=[],
        metavar="PATH",
        help="a Python file that registers a method of your own: the contract test "
        "(tests/test_method_contract.py) covers it beside the built-in ones (CONTRIBUTING.md)",
    )


def pytest_configure(config: pytest.Config) -> None:
    for path in config.getoption("--method-file"):
        _import_method_file(Path(path).resolve())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: these problems are small, and the CI machines have two shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def wine_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled wine data (178 x 13, 3 classes), standardised, fixed split."""
    X, y = load_wine(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=gen)
    X = torch.as_tensor(X, dtype=torch.float64)[perm]
    y = torch.as_tensor(y, dtype=torch.long)[perm]
    return X[:140], y[:140], X[140:], y[140:]


@pytest.fixture(scope="module")
def wine_logreg() -> dict:
    """L2 multinomial logistic regression on wine, trained to a tight optimum."""
    torch.manual_seed(0)
    Xtr, ytr, Xte, yte = wine_split()
    model = torch.nn.Linear(13, 3).double()
    task = infkit.Task.classification(model)
    l2 = 1e-2
    result = infkit.train_to_optimum(task, (Xtr, ytr), l2, tolerance=1e-12)
    assert result.converged
    return {"model": model, "task": task, "l2": l2, "train": (Xtr, ytr), "test": (Xte, yte)}


def small_mlp(d_in: int = 5, hidden: int = 8, d_out: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out)
    ).double()


def fit_registered(problem: dict, name: str, **settings: Any) -> infkit.Influence:
    """Fit method ``name`` on ``problem`` (an ``mlp_problem``) with its contract settings.

    A method that differentiates a training run (``Fidelity(reference="trajectory")``) needs a
    model trained by a recipe: a fresh copy of the architecture is trained by full-batch gradient
    descent on the same data (same l2) and fitted with its run.
    """
    from infkit.methods import method_class

    fidelity = method_class(name).fidelity
    options = {"damping": fidelity.damping, **dict(fidelity.test_options), **settings}
    task, train, l2 = problem["task"], problem["train"], problem["l2"]
    if fidelity.reference == "trajectory":
        model = small_mlp()
        task = infkit.Task.classification(model)
        options["run"] = infkit.Recipe(steps=300, lr=0.5, l2=l2).train(task, train)
    return infkit.Influence(task, name, l2=l2, **options).fit(train)


@pytest.fixture(scope="module")
def mlp_problem() -> dict:
    """A tanh MLP classifier on synthetic data, trained to a tight optimum."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(60, 5, generator=gen, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 0.8).long()
    Xt = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    yt = (Xt[:, 0] + 0.5 * Xt[:, 1] > 0).long()
    model = small_mlp()
    task = infkit.Task.classification(model)
    l2 = 1e-2
    result = infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-12)
    assert result.converged
    return {"model": model, "task": task, "l2": l2, "train": (X, y), "test": (Xt, yt)}
