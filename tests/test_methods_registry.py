"""The method registry: what infkit.methods() lists, refused pairs, and one orientation check."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import fit_registered

import infkit
from infkit.errors import InvalidInputError, UnsupportedError
from infkit.methods import method_class


def test_methods_lists_each_method_with_its_declarations() -> None:
    listed = infkit.methods()
    assert {"exact", "dual", "cg", "lissa", "arnoldi", "datainf", "kfac", "ekfac", "astra"} <= set(
        listed
    ) and {"identity", "trak"} <= set(listed)
    for name, info in listed.items():
        cls = method_class(name)
        assert info["estimators"] == list(cls.estimators)
        assert set(info["quantities"]) == set(cls.questions)
        assert info["summary"] and info["scales"] is cls.scales
        assert set(info["options"]) == set(cls.Options.names())
        assert all(info["options"].values()), f"{name}: every option has a one-line doc"


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


def test_unknown_options_are_refused_at_construction(mlp_problem: dict) -> None:
    task, l2 = mlp_problem["task"], mlp_problem["l2"]
    for method, option in [("lissa", "recursion_depth"), ("arnoldi", "arnoldi_dim")]:
        with pytest.raises(UnsupportedError, match="does not take the option"):
            infkit.Influence(task, method, l2=l2, **{option: 10})
    with pytest.raises(UnsupportedError, match=r"'tolerance' \(did you mean 'tol'\?\)"):
        infkit.Influence(task, "cg", l2=l2, tolerance=1e-6)


def test_option_values_are_checked_at_construction(mlp_problem: dict) -> None:
    task = mlp_problem["task"]
    with pytest.raises(UnsupportedError, match=r"option 'curvature' must be 'ggn' or 'hessian'"):
        infkit.Influence(task, "cg", curvature="fisher")
    with pytest.raises(InvalidInputError, match=r"option 'tol' must be > 0, got -1"):
        infkit.Influence(task, "cg", tol=-1)
    with pytest.raises(InvalidInputError, match=r"option 'maxiter' must be an integer"):
        infkit.Influence(task, "cg", maxiter=2.5)
    with pytest.raises(InvalidInputError, match=r"krylov_dim \(5\) must be >= rank \(10\)"):
        infkit.Influence(task, "arnoldi", rank=10, krylov_dim=5)


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        # a residual tolerance of 1 or more: the zero vector meets it, 0 iterations and every
        # score 0 without a word (a tester's cg with tol=1.0: |S| 0 for 0.147)
        ("cg", {"tol": 1.0}, r"option 'tol' must be < 1, got 1\.0"),
        ("astra", {"tol": 2.0}, r"option 'tol' must be < 1, got 2\.0"),
        ("dual", {"solver": "cg", "tol": 1}, r"option 'tol' must be < 1, got 1"),
        # an infinite bound passed the bounds: scale_factor=inf fitted and reached a
        # ZeroDivisionError at the first scores()
        ("lissa", {"scale_factor": math.inf}, r"option 'scale_factor' must be a finite number"),
        ("trak", {"lambda_reg": math.inf}, r"option 'lambda_reg' must be a finite number"),
        ("ekfac", {"damping_scale": math.inf}, r"option 'damping_scale' must be a finite number"),
        ("datainf", {"layer_damping": math.inf}, r"option 'layer_damping' must be a finite"),
    ],
)
def test_numbers_outside_an_options_range_or_not_finite_are_refused(
    mlp_problem: dict, method: str, options: dict, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        infkit.Influence(mlp_problem["task"], method, l2=mlp_problem["l2"], **options)


@pytest.mark.parametrize("values", [[math.nan, 0.0], [math.inf, 0.0]])
def test_datainf_refuses_a_layer_damping_not_finite_by_block(
    mlp_problem: dict, values: list[float]
) -> None:
    """Per-block values are read at fit, where the blocks are known; NaN and infinity are
    refused there as a negative value is."""
    blocks = len(list(mlp_problem["task"].model.parameters()))  # a block per tensor
    given = (values * blocks)[:blocks]
    bad = infkit.Influence(
        mlp_problem["task"], "datainf", l2=mlp_problem["l2"], layer_damping=given
    )
    with pytest.raises(InvalidInputError, match="layer_damping must be finite numbers >= 0"):
        bad.fit(mlp_problem["train"])


def test_renamed_options_still_work_with_a_warning(mlp_problem: dict) -> None:
    task = mlp_problem["task"]
    with pytest.warns(DeprecationWarning, match="'target' is now called 'curvature'"):
        inf = infkit.Influence(task, "astra", target="hessian", l2=mlp_problem["l2"])
    assert inf.fit(mlp_problem["train"]).method.curvature == "hessian"
    with pytest.raises(InvalidInputError, match="same option"):
        infkit.Influence(task, "astra", target="ggn", curvature="ggn")


@pytest.mark.parametrize("method", sorted(infkit.methods()))
def test_self_influence_is_a_positive_removal_effect(mlp_problem: dict, method: str) -> None:
    """Removing an example raises its own loss, for every method (infkit's orientation)."""
    inf = fit_registered(mlp_problem, method)
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


def test_options_are_checked_against_the_model_at_construction(mlp_problem: dict) -> None:
    task = mlp_problem["task"]
    with pytest.raises(UnsupportedError, match=r"'nope' is no module of the model"):
        infkit.Influence(task, "kfac", modules=["nope"])
    with pytest.raises(InvalidInputError, match=r"checkpoint 0 is a tensor of shape \(3,\)"):
        infkit.Influence(task, "identity", checkpoints=[torch.zeros(3)], learning_rates=0.1)
    with pytest.raises(InvalidInputError, match="checkpoint 1"):
        infkit.Influence(task, "trak", checkpoints=[task.model.state_dict(), {"0.weight": 1}])


@pytest.mark.filterwarnings("ignore:the model is not at a stationary point")
@pytest.mark.parametrize(("vocabulary", "expected"), [(50, "ekfac"), (20_000, "cg")])
def test_auto_takes_ekfac_when_the_factored_layers_hold_most_parameters(
    vocabulary: int, expected: str
) -> None:
    """Beyond exact and dual: EK-FAC when its layers hold at least half of the parameters
    (a language model's embedding and norm are left out with a notice), else CG."""
    from infkit import registry
    from infkit.methods.base import Problem
    from infkit.parameters import ParameterSpace

    model = torch.nn.Sequential(
        torch.nn.Embedding(vocabulary, 8),
        torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 2000),
        torch.nn.Linear(2000, 8),
    )
    space = ParameterSpace(model)
    factored = sum(p.numel() for m in (model[2], model[3]) for p in m.parameters())
    problem = Problem(1000, space.size, 10, 1 << 30, model, space)  # 20 N C > P: not dual
    choice = registry.explain_choice(problem)
    assert choice.method == expected
    share = f"{factored / space.size:.0%}"
    assert share in registry.registered()["ekfac"].suitability(problem)
    assert (factored / space.size >= 0.5) == (expected == "ekfac")


def test_auto_chooses_among_the_methods_that_take_the_options(mlp_problem: dict) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    assert infkit.Influence(task, "auto", l2=l2).fit(train).method.name == "exact"
    # exact takes no tol: among those that do (dual, cg), cg suits a model with P < 20 N C
    assert infkit.Influence(task, "auto", l2=l2, tol=1e-6).fit(train).method.name == "cg"
    assert infkit.Influence(task, "auto", l2=l2, damping="auto").fit(train).method.name == "ekfac"
    with pytest.raises(UnsupportedError, match=r"none of them takes the option\(s\) 'banana' "):
        infkit.Influence(task, "auto", l2=l2, banana=1)
    with pytest.raises(UnsupportedError, match=r"'tool' \(did you mean 'tol'\?\)"):
        infkit.Influence(task, "auto", l2=l2, tool=1e-6)


def test_a_dtype_option_takes_the_name_its_record_writes() -> None:
    """describe()["options"] records a dtype option as its name ("float32"), which the option
    refused ("must be a dtype"): a record could not be passed back (a tester's). The name is
    taken as the dtype; another string is refused as before."""
    cls = method_class("dual")
    options = cls.Options.parse({"kernel_dtype": "float32"}, "method 'dual'")
    assert options.kernel_dtype is torch.float32
    assert cls.Options.parse(options.record(), "method 'dual'").kernel_dtype is torch.float32
    with pytest.raises(InvalidInputError, match="option 'kernel_dtype' must be a dtype"):
        cls.Options.parse({"kernel_dtype": "float33"}, "method 'dual'")
