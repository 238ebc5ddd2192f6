"""The method registry: what infkit.methods() lists, refused pairs, and one orientation check."""

from __future__ import annotations

import pytest
import torch

import infkit
from infkit.errors import UnsupportedError

MATRIX_FREE = {
    "cg": {"if", "rif", "newton", "relatif"},
    "lissa": {"if", "rif", "newton", "relatif"},
    "arnoldi": {"if", "relatif"},
    "datainf": {"if", "relatif"},
    "identity": {"if", "relatif"},
    "trak": {"if"},
}
FAST_OPTIONS = {
    "cg": {},
    "lissa": {"tol": 1e-2},
    "arnoldi": {"rank": 10, "krylov_dim": 30},
    "datainf": {},
    "identity": {},
    "trak": {"proj_dim": 30},
}


def test_methods_lists_each_method_with_its_estimators() -> None:
    listed = infkit.methods()
    for name, estimators in MATRIX_FREE.items():
        assert name in listed, name
        assert set(listed[name]["estimators"]) == estimators
        assert listed[name]["scales"] is True
        assert listed[name]["summary"]


@pytest.mark.parametrize(
    ("method", "estimator"),
    [("arnoldi", "newton"), ("datainf", "rif"), ("trak", "relatif"), ("identity", "newton")],
)
def test_unsupported_pairs_raise_naming_the_pairs_that_work(
    mlp_problem: dict, method: str, estimator: str
) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    with pytest.raises(
        UnsupportedError, match=rf"'{method}' cannot compute estimator '{estimator}'.*exact\+"
    ):
        infkit.Influence(task, method, estimator, l2=l2).fit(train)


def test_unknown_options_are_refused(mlp_problem: dict) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    for method, option in [("lissa", "recursion_depth"), ("arnoldi", "arnoldi_dim")]:
        with pytest.raises(UnsupportedError, match="does not take the option"):
            infkit.Influence(task, method, l2=l2, **{option: 10}).fit(train)


@pytest.mark.parametrize("method", sorted(MATRIX_FREE))
def test_self_influence_is_a_positive_removal_effect(mlp_problem: dict, method: str) -> None:
    """Removing an example raises its own loss, for every method (infkit's orientation)."""
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    inf = infkit.Influence(task, method, l2=l2, **FAST_OPTIONS[method]).fit(train)
    s = inf.self_scores()
    assert s.shape == (60,) and torch.isfinite(s).all()
    assert float((s > 0).double().mean()) > 0.9
    assert inf.describe()["method"] == method


def test_cli_lists_the_methods(capsys) -> None:
    import json

    from infkit.cli import main

    assert main(["methods", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == infkit.methods()
    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["method", "estimators", "quantities", "scales"]
    assert [line.split()[0] for line in lines[1:]] == sorted(infkit.methods())
