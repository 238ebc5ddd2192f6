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


def test_register_refuses_a_taken_name_and_an_unfinished_class(mlp_problem: dict) -> None:
    """A tester's: a class registered as "exact" silently replaced the built-in for every
    Influence in the process (scores 0.95 off), and a class with no solve registered and then
    failed with Python's "Can't instantiate abstract class". Both are refused at register; the
    same class again (a module reloaded) takes its place; a method with solve alone (no fit)
    is complete, and answers as its solve says."""
    from infkit.methods import PrimalMethod, register
    from infkit.methods.base import _REGISTRY

    exact = method_class("exact")

    class Impostor(exact):  # type: ignore[misc, valid-type]
        name = "exact"

    with pytest.raises(
        InvalidInputError, match=r"'exact' is taken by infkit\.methods\.exact\.Exact"
    ):
        register(Impostor)
    assert method_class("exact") is exact

    class Unfinished(PrimalMethod):
        name = "unfinished-test-method"
        summary = "no solve"

    with pytest.raises(InvalidInputError, match="does not implement solve"):
        register(Unfinished)
    assert "unfinished-test-method" not in infkit.methods()

    def damped_identity() -> type:
        class DampedIdentity(PrimalMethod):
            name = "damped-identity-test-method"
            summary = "(H replaced by 0): V / ridge"

            def solve(self, V: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
                return V.to(torch.float64) / (self.fitted.ridge + shift)

        return DampedIdentity

    try:
        first = register(damped_identity())
        again = register(damped_identity())  # another class object, the same path
        assert method_class("damped-identity-test-method") is again is not first
        p = mlp_problem
        ours = infkit.Influence(p["task"], "damped-identity-test-method", l2=p["l2"]).fit(
            p["train"]
        )
        reference = infkit.Influence(p["task"], "identity", l2=p["l2"]).fit(p["train"])
        # identity's scores are (1/N) g_t^T (g_j + l2 theta): the damped identity's times ridge = l2
        got = ours.scores(p["test"]) * p["l2"]
        assert torch.allclose(
            got.double(), reference.scores(p["test"]).double(), rtol=1e-10, atol=1e-14
        )
    finally:
        _REGISTRY.pop("damped-identity-test-method", None)


DENSE_METHOD = """
import torch
from infkit.curvature import CurvatureOperator
from infkit.methods import Fidelity, PrimalMethod, register


@register
class DenseOfMine(PrimalMethod):
    name = "dense-of-mine"
    summary = "the dense GGN, solved (a method of a user's own)"
    exact_example_curvature = True
    fidelity = Fidelity(rtol=1e-8)
    fitted_state = ("H",)

    def fit(self, fitted):
        super().fit(fitted)
        P = fitted.space.size
        op = CurvatureOperator(fitted.engine, fitted.train, "ggn", fitted.batch_size)
        H = op.matmat(torch.eye(P, dtype=torch.float64)).to(torch.float64)
        self.H = 0.5 * (H + H.T)

    def solve(self, V, shift=0.0):
        A = self.H + (self.fitted.ridge + shift) * torch.eye(len(self.H), dtype=torch.float64)
        return FACTOR * torch.linalg.solve(A, V.to(torch.float64).T).T
"""


@pytest.mark.parametrize("factor", [1.0, 2.0])
def test_the_contract_test_takes_a_method_file_of_ones_own(tmp_path, factor: float) -> None:
    """A tester's wish: the contract test covered only the package's methods and the example's.
    ``--method-file`` imports a file of one's own, whose method the contract then holds to its
    fidelity: a right dense solve passes, the same solve times 2 fails."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "dense_of_mine.py"
    path.write_text(DENSE_METHOD.replace("FACTOR", repr(factor)))
    tests = Path(__file__).resolve().parent
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:xdist",
            str(tests / "test_method_contract.py"),
            "--method-file",
            str(path),
            "-k",
            "dense-of-mine",
        ],
        capture_output=True,
        text=True,
        cwd=tests.parent,
        timeout=600,
    )
    summary = run.stdout.strip().splitlines()[-1]
    if factor == 1.0:
        assert run.returncode == 0 and " passed" in summary and "failed" not in summary, run.stdout[
            -2000:
        ]
    else:
        assert run.returncode == 1 and " failed" in summary, run.stdout[-2000:]


def test_a_fitted_state_naming_an_attribute_fit_never_set_is_named(
    mlp_problem: dict, tmp_path
) -> None:
    """A tester's: fitted_state = ("HH",) where fit sets H met a raw AttributeError at save."""
    from infkit.methods import PrimalMethod, register
    from infkit.methods.base import _REGISTRY

    @register
    class Misnamed(PrimalMethod):
        name = "misnamed-state-test-method"
        summary = "V / (1 + ridge)"
        fitted_state = ("HH",)

        def fit(self, fitted):  # type: ignore[no-untyped-def]
            super().fit(fitted)
            self.H = torch.ones(fitted.space.size, dtype=torch.float64)

        def solve(self, V: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
            return V.to(torch.float64) / (self.H + self.fitted.ridge + shift)

    try:
        p = mlp_problem
        inf = infkit.Influence(p["task"], Misnamed.name, l2=p["l2"]).fit(p["train"])
        with pytest.raises(
            UnsupportedError, match="names 'HH' in its fitted_state, but its fit set no such"
        ):
            inf.save(tmp_path / "saved")
    finally:
        _REGISTRY.pop(Misnamed.name, None)


@pytest.mark.parametrize("method", ["datainf", "arnoldi", "identity"])
def test_methods_without_each_examples_block_give_no_leverages(
    mlp_problem: dict, method: str
) -> None:
    """A tester's: datainf's "leverages" read up to 2.96 on a logistic regression (exact's were
    below 0.46; a leverage lies in [0, 1)), identity's were gradient norms. A curvature that does
    not contain each example's block, refused for RIF and Newton, is refused for leverages too,
    naming the methods that give them; exact's lie in [0, 1)."""
    inf = fit_registered(mlp_problem, method)
    with pytest.raises(
        UnsupportedError, match=r"does not contain each example's own block.*'exact'"
    ):
        inf.leverages()
    assert "leverages" not in infkit.methods()[method]["quantities"]
    h = fit_registered(mlp_problem, "exact").leverages()
    assert float(h.min()) >= 0 and float(h.max()) < 1


def test_one_file_imported_under_two_names_registers_once(tmp_path) -> None:
    """A reviewer's: the taken-name check compared module names, so a file run as __main__ and
    imported by name, or given to --method-file and imported by its package, was refused as
    another class. The same file's class takes its place; another file's is refused."""
    import importlib.util
    import sys

    from infkit.methods.base import _REGISTRY

    source = (
        "import torch\nfrom infkit.methods import PrimalMethod, register\n\n\n@register\n"
        "class Twice(PrimalMethod):\n    name = 'twice-test-method'\n    summary = 'V / ridge'\n\n"
        "    def solve(self, V, shift=0.0):\n"
        "        return V.to(torch.float64) / (self.fitted.ridge + shift)\n"
    )
    path = tmp_path / "twice.py"
    path.write_text(source)
    other = tmp_path / "elsewhere" / "twice.py"
    other.parent.mkdir()
    other.write_text(source)

    def load(name: str, file) -> type:  # type: ignore[no-untyped-def]
        spec = importlib.util.spec_from_file_location(name, file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module.Twice

    try:
        load("twice", path)
        again = load("package.twice", path)  # the same file, by another name
        assert method_class("twice-test-method") is again
        with pytest.raises(
            InvalidInputError, match=r"'twice-test-method' is taken by package\.twice"
        ):
            load("elsewhere_twice", other)
    finally:
        _REGISTRY.pop("twice-test-method", None)
        for name in ("twice", "package.twice", "elsewhere_twice"):
            sys.modules.pop(name, None)


def test_a_method_without_rif_gets_no_leverages_and_a_summary_is_required(
    mlp_problem: dict,
) -> None:
    """A reviewer's: a method of one's own written from the earlier CONTRIBUTING (no RIF, no
    questions line) still gave "leverages" up to 2.98; register now drops them wherever RIF is
    not declared (one rule, not a line in each method). A class without a summary registered
    and then broke infkit.methods() for every caller: refused."""
    from infkit.methods import PrimalMethod, register
    from infkit.methods.base import _REGISTRY

    @register
    class NoBlock(PrimalMethod):
        name = "no-block-test-method"
        summary = "V / ridge"
        estimators = ("if", "relatif")

        def solve(self, V: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
            return V.to(torch.float64) / (self.fitted.ridge + shift)

    try:
        assert "leverages" not in infkit.methods()["no-block-test-method"]["quantities"]
        p = mlp_problem
        inf = infkit.Influence(p["task"], NoBlock.name, l2=p["l2"]).fit(p["train"])
        with pytest.raises(UnsupportedError, match="does not contain each example's own block"):
            inf.leverages()
    finally:
        _REGISTRY.pop(NoBlock.name, None)

    class Unsaid(PrimalMethod):
        name = "unsaid-test-method"

        def solve(self, V: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
            return V

    with pytest.raises(InvalidInputError, match="needs a class attribute summary"):
        register(Unsaid)
    assert "unsaid-test-method" not in _REGISTRY
