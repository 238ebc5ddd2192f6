"""A float16 model at the edges of float16's range (6e-8 to 65504), against the same model in
float64 (docs/methods/language_models.md §7).

A confident classifier has loss gradients and output curvature ``Lambda = diag(p) - p p^T``
near 1e-7 where ``p`` is near 1: below float16's smallest numbers. A tester's float16 copy of
one gave all-NaN DataInf scores (its weights ``1 / (lambda + ||g||^2)`` reached 1e10) and
Arnoldi scores 5.9x off (its curvature products rounded to 0), each with no word on why; a
regression whose outputs pass 65504 was refused with advice about the inputs and labels.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import infkit
from infkit.errors import NonFiniteError, Notice
from infkit.evaluate import relative_error

N, T, D, C = 200, 20, 10, 3


@pytest.fixture(scope="module")
def confident() -> dict:
    """A tanh MLP trained to the optimum at l2 = 1e-6 on separable data: median loss ~1e-6."""
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(N + T, D, generator=gen, dtype=torch.float64) * 3
    y = (X @ torch.randn(D, C, generator=gen, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, C)
    ).double()
    l2 = 1e-6
    infkit.train_to_optimum(infkit.Task.classification(model), (X[:N], y[:N]), l2)
    return {"model": model, "train": (X[:N], y[:N]), "test": (X[N:], y[N:]), "l2": l2}


def _scores(problem: dict, method: str, dtype: torch.dtype) -> torch.Tensor:
    model = copy.deepcopy(problem["model"]).to(dtype)
    (X, y), (Xt, yt) = problem["train"], problem["test"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stationarity, DataInf's scale, still queries
        inf = infkit.Influence(infkit.Task.classification(model), method, l2=problem["l2"])
        return inf.fit((X.to(dtype), y)).scores((Xt.to(dtype), yt)).to(torch.float64)


@pytest.mark.parametrize("method", ["datainf", "arnoldi"])
def test_float16_scores_of_a_confident_model_are_float16_close(
    confident: dict, method: str
) -> None:
    """DataInf forms its weights in float32; curvature products scale each direction into
    float16's range and back. Measured: 1.2e-2 for both (exact's own float16 error: 3.8e-2)."""
    reference = _scores(confident, method, torch.float64)
    half = _scores(confident, method, torch.float16)
    assert torch.isfinite(half).all()
    assert relative_error(half, reference) < 0.05


def test_float16_underflow_and_overflow_are_named(confident: dict) -> None:
    model = copy.deepcopy(confident["model"]).half()
    (X, y), (Xt, yt) = confident["train"], confident["test"]
    inf = infkit.Influence(infkit.Task.classification(model), "exact", l2=confident["l2"])
    with pytest.warns(UserWarning, match=r"gradient of the measurement .* is 0 .*in float16"):
        inf.fit((X.half(), y)).scores((Xt.half(), yt))
    gen = torch.Generator().manual_seed(1)
    Xr = torch.randn(50, 4, generator=gen, dtype=torch.float64)
    Yr = 1e5 * Xr.sum(1, keepdim=True)  # outputs past 65504
    regressor = torch.nn.Linear(4, 1).double()
    infkit.train_to_optimum(infkit.Task.regression(regressor), (Xr, Yr), 1e-3)
    task = infkit.Task.regression(regressor.half())
    with pytest.raises(NonFiniteError, match=r"float16, whose largest number is 65504"):
        infkit.Influence(task, "identity", l2=1e-3).fit((Xr.half(), Yr))


def test_an_edited_copy_too_coarse_for_the_step_says_so() -> None:
    """A removal's step of 1e-4 of each weight rounds away in bfloat16 (resolution 2^-8): the
    copy warns (a tester's copy left 83% of its parameters unmoved without a word), and
    ``model(dtype=torch.float32)`` holds the step."""
    from infkit.removal import RemovalEffect

    torch.manual_seed(0)
    model = torch.nn.Linear(8, 3).bfloat16()
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).double()
    step = 1e-4 * theta

    def predict(data, quantity):  # not asked here
        raise AssertionError

    effect = RemovalEffect(torch.tensor([0]), step, "if", predict, model)
    with pytest.warns(UserWarning, match=r"did not move.*model\(dtype=torch\.float32\)"):
        effect.model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        edited = effect.model(dtype=torch.float32)
    moved = torch.cat([p.detach().reshape(-1) for p in edited.parameters()]).double() - theta
    assert relative_error(moved, step) < 1e-2  # float32 rounding of theta + step
    assert next(model.parameters()).dtype == torch.bfloat16  # the trained model is untouched
    # a float32 copy too coarse for its step is pointed to float64, which holds it exactly
    tiny = RemovalEffect(torch.tensor([0]), 1e-9 * theta, "if", predict, model)
    with pytest.warns(UserWarning, match=r"in float32.*model\(dtype=torch\.float64\)"):
        tiny.model(dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exact = tiny.model(dtype=torch.float64)
    moved = torch.cat([p.detach().reshape(-1) for p in exact.parameters()]) - theta
    assert relative_error(moved, 1e-9 * theta) < 1e-6  # float64 rounding of theta + step


def test_lissa_on_a_bfloat16_model_is_as_close_as_its_products() -> None:
    """LiSSA's recursion runs in float32 at least: a bfloat16 iterate's rounding summed over its
    J steps took a tester's scores to 6.7e-2 from float64's, against 1.4e-2 for exact (the
    products' and weights' own bfloat16 error); now 1.4e-2 for both."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(120, 6, generator=gen, dtype=torch.float64)
    y = (X @ torch.randn(6, 3, generator=gen, dtype=torch.float64)).argmax(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = model.double()
    train, test = (X[:100], y[:100]), (X[100:], y[100:])
    infkit.train_to_optimum(infkit.Task.classification(model), train, 1e-2)
    problem = {"model": model, "train": train, "test": test, "l2": 1e-2}
    reference = _scores(problem, "exact", torch.float64)
    exact = relative_error(_scores(problem, "exact", torch.bfloat16), reference)
    lissa = relative_error(_scores(problem, "lissa", torch.bfloat16), reference)
    # measured: lissa 1.6e-2, exact 1.6e-2 (lissa 3.7e-2 with a bfloat16 iterate); LiSSA's own
    # truncation and sampling error against exact in float64 is ~1e-3
    assert lissa < 1.3 * exact + 2e-3, (lissa, exact)


def test_the_language_modelling_loss_of_bfloat16_logits_is_taken_in_float32() -> None:
    """``lm.next_token_loss`` called on a bfloat16 model's logits: its log-softmax in float32,
    as infkit's own passes take it, not in bfloat16 (a tester's losses were 5.5e-2 off)."""
    from infkit import language_modeling as lm

    gen = torch.Generator().manual_seed(0)
    logits = (4 * torch.randn(3, 9, 50, generator=gen)).bfloat16()
    ids = torch.randint(0, 50, (3, 9), generator=gen)
    loss = lm.next_token_loss(logits, ids)
    assert loss.dtype == torch.float32
    reference = lm.next_token_loss(logits.double(), ids)  # the same rounded logits
    assert relative_error(loss.double(), reference) < 1e-6


def test_token_scores_come_in_the_scores_dtype() -> None:
    """Every result is in the model's dtype, at least float32 (docs/methods/language_models.md
    §7): the per-token scores of a float32 model came back in float64."""
    from lm_helpers import LENGTH, VOCAB, TinyLM

    from infkit import language_modeling as lm

    torch.manual_seed(0)
    model = TinyLM().float().eval()
    ids = torch.randint(0, VOCAB, (10, LENGTH))
    train, test = lm.examples(ids[:8]), lm.examples(ids[8:])
    task = infkit.Task.language_modeling(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "ekfac", damping=1e-3).fit(train)
        parts, scores = inf.token_scores(test), inf.scores(test)
    assert parts.tokens.dtype == parts.rest.dtype == scores.dtype == torch.float32
    assert relative_error(parts.total, scores) < 1e-5


@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_float16_curvature_products_hold_directions_of_any_norm(kind: str) -> None:
    """Directions of norm 1e-6, 1 and 1e4 (and 0), given in float64 or in float16 (whose norm
    of 1.8e5 is Inf there), against the same float16 model's products taken in float64."""
    from infkit.curvature import CurvatureOperator
    from infkit.data import ExampleSet
    from infkit.gradients import PerExample
    from infkit.parameters import ParameterSpace

    torch.manual_seed(0)
    X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))

    def operator(dtype: torch.dtype) -> CurvatureOperator:
        m = copy.deepcopy(model).half().to(dtype)  # the float16 model's weights, in dtype
        task = infkit.Task.classification(m)
        data = ExampleSet((X.half().to(dtype), y))
        return CurvatureOperator(PerExample(task, ParameterSpace(m)), data, kind, batch_size=40)

    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(4, P, dtype=torch.float64)
    V[0] *= 1e-6
    V[2] *= 1e4
    V[3] = 0
    reference = operator(torch.float64).matmat(V)
    half = operator(torch.float16)
    for directions in (V, V.half().double()):
        products = half.matmat(directions if directions is V else directions.half())
        expected = reference if directions is V else operator(torch.float64).matmat(directions)
        for row in range(3):
            assert relative_error(products[row], expected[row]) < 5e-3, row
        assert bool((products[3] == 0).all())


# ============================================================================ autocast's rounding
def _trained_tiny_lm() -> tuple[torch.nn.Module, tuple, tuple, torch.Tensor]:
    """A tiny LM trained to a training loss near 1.9 a sequence (small residuals), its
    training set and queries (prompts of 3 tokens masked), and the token ids."""
    from lm_helpers import VOCAB, TinyLM

    from infkit import language_modeling as lm

    torch.manual_seed(0)
    model = TinyLM(width=16)
    ids = torch.randint(0, VOCAB, (40, 8))
    train, queries = lm.examples(ids[:32]), lm.examples(ids[32:], prompt_lengths=[3] * 8)
    optimiser = torch.optim.Adam(model.parameters(), 3e-2)
    for _ in range(1500):
        loss = lm.next_token_loss(model(train[0]["input_ids"]), train[1]).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval(), train, queries, ids


def test_the_rounding_a_solve_magnifies_under_autocast_is_measured_and_warned() -> None:
    """A tester's trained Llama under dtype=torch.bfloat16: exact's scores correlated 0.56
    with float32's, without a word. The figure (describe()["autocast_rounding"], a block of
    4 queries x 16 training examples scored from bfloat16 and from float32 gradients) is
    compared with the actual relative change of all the scores, a float32 run beside: within
    3x, warned above 0.2 (exact at a small damping), quiet below (the gradients alone)."""
    from infkit import language_modeling as lm

    model, train, queries, ids = _trained_tiny_lm()
    task = infkit.Task.language_modeling(model)
    # (exact at a large damping: a small change; a tester's figure read 1.36-1.53 there, the
    # block's training examples read from the gradient cache at a part's positions, 0-15)
    cases = (
        ("exact", {"damping": 1e-2}, True),
        ("exact", {"damping": 100.0}, False),
        ("identity", {}, False),
    )
    for method, options, warned in cases:
        full = infkit.Influence(task, method, progress=False, checks=False, **options)
        reference = full.fit(train).scores(queries)
        assert "autocast_rounding" not in full.describe()  # nothing to measure in float32
        low = infkit.Influence(task, method, progress=False, dtype=torch.bfloat16, **options)
        low.fit(train)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = low.scores(queries)
        actual = float((scores - reference).norm() / reference.norm())
        figure = low.describe()["autocast_rounding"]
        assert actual / 3 < figure < 3 * actual, (method, figure, actual)
        said = [str(w.message) for w in caught if "magnified" in str(w.message)]
        assert len(said) == int(warned), method
        assert (actual > 0.2) == warned, (method, actual)
        # the same queries again are not measured again (a reviewer: a loop of calls paid
        # the check every time); other queries are
        calls: list[int] = []
        real = infkit.rounding.autocast_rounding

        def counted(*args: object, calls: list = calls, real: object = real) -> object:
            calls.append(1)
            return real(*args)  # type: ignore[operator]

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(infkit.rounding, "autocast_rounding", counted)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                low.scores(queries)
                assert calls == [] and low.describe()["autocast_rounding"] == figure
                low.scores(lm.examples(ids[36:], prompt_lengths=[2] * 4))
                assert calls == [1]


def test_the_rounding_of_a_bfloat16_model_is_measured_against_a_float32_copy() -> None:
    """A tester's trained Llama loaded in bfloat16: every method's scores 2.24 off (r 0.49)
    the float64 answer on the same rounded weights, where dtype= on the float32 model warned.
    The model's own rounding is measured as autocast's is, against a float32 copy of the
    model (the same weights): describe()["model_rounding"] within 3x of the actual change
    against that copy's scores, warned above 0.2 (exact at a small damping), quiet below."""
    model, train, queries, _ = _trained_tiny_lm()
    low_model = copy.deepcopy(model).to(torch.bfloat16)
    # the reference: the same rounded weights in float32
    same_weights = copy.deepcopy(low_model).float()
    for method, options, warned in (("exact", {"damping": 1e-2}, True), ("identity", {}, False)):
        full = infkit.Influence(
            infkit.Task.language_modeling(same_weights), method, progress=False, **options
        )
        reference = full.fit(train).scores(queries)
        assert "model_rounding" not in full.describe()  # a float32 model: nothing to measure
        low = infkit.Influence(
            infkit.Task.language_modeling(low_model), method, progress=False, **options
        )
        low.fit(train)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            scores = low.scores(queries)
        actual = float((scores.double() - reference.double()).norm() / reference.norm())
        figure = low.describe()["model_rounding"]
        assert actual / 3 < figure < 3 * actual, (method, figure, actual)
        said = [str(w.message) for w in caught if "a float32 copy of the model" in str(w.message)]
        assert len(said) == int(warned), (method, said)
        assert (actual > 0.2) == warned, (method, actual)
        assert "autocast_rounding" not in low.describe()


def _wine_model(binary: bool, l2: float) -> tuple[torch.nn.Module, infkit.Task, tuple, tuple]:
    """Wine, softmax regression (or class 0 against the rest) trained to its float64 optimum."""
    from conftest import wine_split

    Xtr, ytr, Xte, yte = wine_split()
    if binary:
        ytr, yte = (ytr == 0).double(), (yte == 0).double()
    torch.manual_seed(0)
    model = torch.nn.Linear(13, 1 if binary else 3).double()
    kind = infkit.Task.binary_classification if binary else infkit.Task.classification
    infkit.train_to_optimum(kind(model), (Xtr, ytr), l2, tolerance=1e-12)
    return model, kind, (Xtr, ytr), (Xte, yte)


@pytest.mark.parametrize("binary", [False, True])
def test_a_float32_model_scores_its_confident_queries_as_float64_does(binary: bool) -> None:
    """A tester's float32 softmax regression at l2 = 1e-5: 21 of 30 queries had a loss below
    1e-7, where float32 rounds p_y to 1 and the gradient's true-class entry p_y - 1 to 0; their
    rows were 57-89% off an exact float64 solve at the same weights, no word. The built-in
    losses are taken in float64: the rows hold to float32's precision. Ground truth: `exact`
    in float64 on the float32 weights."""
    l2 = 1e-5
    model, kind, (X, y), (Xt, yt) = _wine_model(binary, l2)
    model32 = copy.deepcopy(model).float()
    reference_model = copy.deepcopy(model32).double()  # the float32 weights, in float64
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # stationarity at the float32 weights
        S32 = (
            infkit.Influence(kind(model32), "exact", l2=l2)
            .fit((X.float(), y))
            .scores((Xt.float(), yt))
        )
        S = infkit.Influence(kind(reference_model), "exact", l2=l2).fit((X, y)).scores((Xt, yt))
        losses = kind(reference_model).loss(reference_model(Xt), yt)
    confident = losses < 1e-7
    assert int(confident.sum()) >= 5, losses  # the case: queries float32 rounds to certainty
    rows = (S32.double() - S).norm(dim=1) / S.norm(dim=1)
    assert float(rows[confident].max()) < 1e-3, rows[confident]


def test_newton_under_autocast_takes_the_optimum_from_the_models_own_precision() -> None:
    """A tester's: under dtype=torch.bfloat16, grad L(theta*) was summed from the gradients
    under autocast, their rounding (2.3e-3 against 2.9e-7), and the Newton step took it for a
    step to the optimum: group removals 40% off. It is taken in the model's precision: the
    removal within bfloat16's reach of the float64 Newton step, the stationarity figure that of
    the model without dtype=."""
    l2 = 1e-3
    model, kind, (X, y), (Xt, yt) = _wine_model(False, l2)
    model32 = copy.deepcopy(model).float()
    removed = [0, 1, 2, 3, 4]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the rounding check's figure under bfloat16
        exact = infkit.Influence(kind(model), "exact", "newton", l2=l2).fit((X, y))
        expected = exact.remove(removed).loss((Xt, yt))
        plain = infkit.Influence(kind(model32), "exact", "newton", l2=l2).fit((X.float(), y))
        under = infkit.Influence(kind(model32), "exact", "newton", l2=l2, dtype=torch.bfloat16).fit(
            (X.float(), y)
        )
        got = under.remove(removed).loss((Xt.float(), yt))
    assert relative_error(got.double(), expected) < 0.1
    assert under.describe()["stationarity"] < 3 * plain.describe()["stationarity"] + 1e-6
    # that pass is planned (a reviewer's plan under dtype= said one pass fewer than the fit ran)
    stages = [s.name for s in under.plan((X.float(), y), timed=False).stages]
    assert "objective gradient" in stages
    assert "objective gradient" not in [
        s.name for s in plain.plan((X.float(), y), timed=False).stages
    ]


def test_a_dtype_that_is_the_models_own_is_said_to_change_nothing() -> None:
    """A tester's bfloat16 model given ``dtype=torch.bfloat16``: the option was dropped without a
    word (``describe()['autocast']`` None). Said by a Notice; a float32 model's is taken."""
    model = torch.nn.Linear(3, 2).to(torch.bfloat16)
    task = infkit.Task.classification(model)
    with pytest.warns(Notice, match=r"dtype=torch.bfloat16 is the model's own precision"):
        inf = infkit.Influence(task, "identity", dtype=torch.bfloat16)
    assert inf.task.autocast is None
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)
        lowered = infkit.Influence(
            infkit.Task.classification(torch.nn.Linear(3, 2)), "identity", dtype=torch.bfloat16
        )
    assert lowered.task.autocast == torch.bfloat16
