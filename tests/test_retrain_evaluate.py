"""The retraining ground truth, the faithfulness metrics and atomic artifacts."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import infkit
import infkit.errors
from infkit import evaluate, retrain, store
from infkit.errors import InvalidInputError


def _ridge_problem(n: int = 60, d: int = 4, l2: float = 0.1, seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    model = torch.nn.Linear(d, 1, bias=False).double()
    task = infkit.Task.regression(model)
    data = (torch.as_tensor(X), torch.as_tensor(y).reshape(n, 1))
    infkit.train_to_optimum(task, data, l2, tolerance=1e-13)
    return X, y, task, data, l2


def _closed_form(X: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
    n = len(X)
    return np.linalg.solve(X.T @ X / n + l2 * np.eye(X.shape[1]), X.T @ y / n)


def test_training_and_retraining_reach_the_closed_form_optimum() -> None:
    X, y, task, data, l2 = _ridge_problem()
    theta = task.model.weight.detach().reshape(-1).numpy()
    np.testing.assert_allclose(theta, _closed_form(X, y, l2), rtol=1e-10)
    removed = [2, 9, 33]
    r = retrain.without(task, data, removed, l2, tolerance=1e-13)
    keep = np.setdiff1d(np.arange(len(X)), removed)
    np.testing.assert_allclose(r.theta.numpy(), _closed_form(X[keep], y[keep], l2), rtol=1e-10)
    np.testing.assert_allclose(r.delta.numpy(), r.theta.numpy() - theta, atol=1e-15)
    with pytest.raises(InvalidInputError, match="is given twice"):  # a duplicated column
        retrain.leave_one_out(task, data, data, [3, 3], l2)
    with pytest.raises(InvalidInputError, match="l2 must be a finite number >= 0"):
        infkit.train_to_optimum(task, data, -1.0)  # no minimum: it trained to inf
    with pytest.raises(InvalidInputError, match=r"got nan: the objective's weight decay") as nan:
        retrain.without(task, data, [3], float("nan"))
    assert "negative" not in str(nan.value)  # (it said a negative one rewards large parameters)
    # the target is tolerance x the starting gradient norm (at least 1): 1 or more is met before
    # the first step (a reviewer's untrained model read converged=True), NaN never
    for tolerance in (1.0, 2.0, float("inf"), float("nan"), -1e-3, "0.1", bytearray(b"0.1")):
        with pytest.raises(InvalidInputError, match="tolerance must be >= 0 and below 1"):
            infkit.train_to_optimum(task, data, l2, tolerance=tolerance)
        with pytest.raises(InvalidInputError, match="tolerance must be >= 0 and below 1"):
            retrain.without(task, data, [3], l2, tolerance=tolerance)
    # The model passed in is left untouched.
    np.testing.assert_allclose(task.model.weight.detach().reshape(-1).numpy(), theta)
    np.testing.assert_allclose(r.outputs(data).numpy()[:, 0], X @ r.theta.numpy(), rtol=1e-12)


def test_the_test_set_is_checked_before_any_retraining(monkeypatch) -> None:
    """A NaN query came back as a NaN measurement of every retraining (converged, no word), a
    label outside the classes or inputs of another width as PyTorch's own tracebacks after the
    retrainings: each is named as scores names it, before anything is retrained."""
    rng = np.random.default_rng(1)
    X = torch.as_tensor(rng.normal(size=(30, 3)))
    y = torch.as_tensor((rng.normal(size=30) > 0).astype(np.int64))
    task = infkit.Task.classification(torch.nn.Linear(3, 2).double())
    data, l2 = (X, y), 1e-2
    infkit.train_to_optimum(task, data, l2)
    nan_query = (torch.full((1, 3), float("nan"), dtype=torch.float64), y[:1])
    narrow = (X[:2, :2], y[:2])
    outside = (X[:2], torch.tensor([0, 5]))
    with_model = retrain.without(task, data, [1], l2)

    def must_not_retrain(*args, **kwargs):
        raise AssertionError("retrained before the test set was checked")

    monkeypatch.setattr(retrain, "train_to_optimum", must_not_retrain)
    calls = {
        "leave_one_out": lambda t: retrain.leave_one_out(task, data, t, [1], l2),
        "subsets": lambda t: retrain.subsets(task, data, t, l2, n_subsets=3, alpha=0.9),
        "losses": with_model.losses,
        "measurements": with_model.measurements,
    }
    for name, call in calls.items():
        source = "data" if name in ("losses", "measurements") else "test set"
        with pytest.raises(infkit.errors.NonFiniteError, match=f"{source} example 0 contains NaN"):
            call(nan_query)
        with pytest.raises(InvalidInputError, match=f"could not be called on {source} example 0"):
            call(narrow)
        with pytest.raises(InvalidInputError, match=f"{source} example 1: label 5 is outside"):
            call(outside)
    with pytest.raises(infkit.errors.NonFiniteError, match="data example 0 contains NaN"):
        with_model.outputs(nan_query)  # the outputs read no label: the inputs are checked
    placeholder = (X[:3], torch.full((3,), float("nan"), dtype=torch.float64))
    assert with_model.outputs(placeholder).shape == (3, 2)  # NaN labels it never reads
    # a query the retrained model itself gives NaN on is named with the retraining
    diverged = retrain.Retrained(
        task,
        torch.tensor([1]),
        torch.full((8,), float("nan"), dtype=torch.float64),
        torch.zeros(8, dtype=torch.float64),
        0.0,
        0,
    )
    with pytest.raises(
        infkit.errors.NonFiniteError, match="loss by the model retrained without example 1"
    ):
        diverged.losses(data)


def test_queries_scores_accepts_are_measured_once_checked(monkeypatch) -> None:
    """A language model's one-token prompts under a measurement reading one logit: scores
    takes them (no label is read), and leave_one_out refused them through the loss's check (a
    reviewer's); the test set is checked once for a whole bank, not once per retraining."""
    from lm_helpers import VOCAB, TinyLM

    from infkit import example_checks

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (12, 7), generator=gen)
    train = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone())
    prompts = torch.randint(0, VOCAB, (3, 1), generator=gen)
    queries = ({"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}, prompts)

    def last_logit(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs[:, -1, 3]

    task = infkit.Task.language_modeling(TinyLM().double())
    task = task.with_measurement(last_logit, higher_is_better=True)
    run = infkit.Recipe(steps=5, lr=0.1).train(task, train)
    calls = []
    original = example_checks.check_examples
    monkeypatch.setattr(
        retrain, "check_examples", lambda *a, **k: calls.append(a[1].name) or original(*a, **k)
    )
    loo = retrain.leave_one_out(task, train, queries, [0, 1], 0.0, run=run)
    assert loo.measurement.shape == (3, 2) and bool((loo.loss == 0).all())
    for j in (0, 1):  # the recipe replayed without example j against the run's model, by hand
        without = retrain.without(task, train, [j], 0.0, run=run).model().eval()
        full = task.model.eval()
        with torch.no_grad():
            expected = [
                float(m(input_ids=prompts, attention_mask=torch.ones_like(prompts))[q, -1, 3])
                for m in (without, full)
                for q in range(3)
            ]
        change = torch.tensor(expected[:3], dtype=torch.float64) - torch.tensor(
            expected[3:], dtype=torch.float64
        )
        torch.testing.assert_close(loo.measurement[:, j], change, rtol=1e-10, atol=1e-12)
    calls.clear()
    bank = retrain.subsets(task, train, queries, 0.0, n_subsets=6, run=run)
    assert bank.measurements.shape == (6, 3)
    assert calls.count("test set") == 1, calls


def test_leave_one_out_resumes_from_its_artifacts(tmp_path, monkeypatch) -> None:
    X, y, task, data, l2 = _ridge_problem()
    test = (data[0][:5], data[1][:5])
    first = retrain.leave_one_out(task, data, test, [0, 4, 7], l2, cache_dir=tmp_path)
    # the three and the retraining on all the data (the optimum the changes are measured from)
    assert len(list(tmp_path.glob("retrain-*/manifest.json"))) == 4
    assert not list(tmp_path.glob(".*"))

    def must_not_retrain(*args, **kwargs):
        raise AssertionError("a cached result was retrained")

    monkeypatch.setattr(retrain, "train_to_optimum", must_not_retrain)
    second = retrain.leave_one_out(task, data, test, [0, 4, 7], l2, cache_dir=tmp_path)
    torch.testing.assert_close(first.measurement, second.measurement, rtol=0, atol=0)
    # Actual LOO loss change: 0.5 (x^T theta_-j - y)^2 - 0.5 (x^T theta - y)^2.
    theta = _closed_form(X, y, l2)
    keep = np.delete(np.arange(len(X)), 4)
    theta_4 = _closed_form(X[keep], y[keep], l2)
    expected = 0.5 * (X[:5] @ theta_4 - y[:5]) ** 2 - 0.5 * (X[:5] @ theta - y[:5]) ** 2
    np.testing.assert_allclose(first.loss[:, 1].numpy(), expected, rtol=1e-8, atol=1e-14)


def test_retrainings_short_of_their_optimum_are_flagged_and_named(tmp_path, monkeypatch) -> None:
    X, y, task, data, l2 = _ridge_problem()
    test = (data[0][:5], data[1][:5])
    tight = {"tolerance": 1e-30, "max_iter": 2}  # a target no float64 retraining reaches
    with pytest.warns(infkit.errors.NotConvergedWarning, match="without example 4") as seen:
        loo = retrain.leave_one_out(task, data, test, [0, 4], l2, cache_dir=tmp_path, **tight)
    # the two and the retraining on all the data the changes are measured from
    assert "3 leave-one-out retraining(s) stopped short of the optimum, at max_iter=2" in str(
        seen[0].message
    )
    assert loo.converged.tolist() == [False, False]
    # the target is the stopping rule: tolerance x ||grad L_R|| at the warm start (here > 1)
    theta = _closed_form(X, y, l2)
    for k, j in enumerate([0, 4]):
        keep = np.delete(np.arange(len(X)), j)
        start = X[keep].T @ (X[keep] @ theta - y[keep]) / len(keep) + l2 * theta
        expected = 1e-30 * max(float(np.linalg.norm(start)), 1.0)
        assert float(loo.targets[k]) == pytest.approx(expected, rel=1e-6)
        assert float(loo.gradient_norms[k]) > float(loo.targets[k])
    # the flag travels with the cached result
    monkeypatch.setattr(retrain, "train_to_optimum", None)  # a retraining would fail
    with pytest.warns(infkit.errors.NotConvergedWarning):
        again = retrain.leave_one_out(task, data, test, [0, 4], l2, cache_dir=tmp_path, **tight)
    assert again.converged.tolist() == [False, False]
    torch.testing.assert_close(again.targets, loo.targets, rtol=0, atol=0)
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", infkit.errors.NotConvergedWarning)
        done = retrain.leave_one_out(task, data, test, [0, 4], l2, tolerance=1e-12)
        bank = retrain.subsets(task, data, test, l2, n_subsets=2, alpha=0.9, tolerance=1e-12)
    assert done.converged.all() and bool((done.gradient_norms <= done.targets).all())
    assert bank.converged is not None and bank.converged.all()
    with pytest.warns(infkit.errors.NotConvergedWarning, match="2 subset retraining"):
        short = retrain.subsets(task, data, test, l2, n_subsets=2, alpha=0.9, **tight)
    assert short.converged is not None and not short.converged.any()
    with pytest.warns(
        infkit.errors.NotConvergedWarning, match="2 group-removal .*, on all the data"
    ):
        r = retrain.without(task, data, [3], l2, **tight)
    assert not r.converged and r.gradient_norm > r.target > 0


def test_lds_is_high_for_newton_on_ridge_and_near_zero_for_noise() -> None:
    _, _, task, data, l2 = _ridge_problem(n=80)
    test = (data[0][:6], data[1][:6])
    sub = retrain.subsets(task, data, test, l2, n_subsets=30, alpha=0.95, seed=1)
    assert sub.masks.shape == (30, 80) and int(sub.masks[0].sum()) == 76
    inf = infkit.Influence(task, "exact", "newton", l2=l2).fit(data)
    score = evaluate.lds(inf.scores(test), sub.masks, sub.measurements)
    # Removing 5% of a ridge regression is nearly linear in the mask (docs/evaluation.md §7).
    assert score > 0.8
    noise = torch.randn(6, 80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(evaluate.lds(noise, sub.masks, sub.measurements)) < 0.3
    # Sign matters: flipping the removal effects flips the LDS.
    assert evaluate.lds(-inf.scores(test), sub.masks, sub.measurements) == pytest.approx(-score)
    # masks are kept/removed flags: 0/1 numbers read as such, fractions refused (0.3 read True)
    ones = sub.masks.to(torch.float64)
    assert evaluate.lds(inf.scores(test), ones, sub.measurements) == pytest.approx(score)
    with pytest.raises(InvalidInputError, match="masks must be boolean"):
        evaluate.lds(inf.scores(test), ones * 0.3, sub.measurements)


def test_changes_are_measured_from_the_optimum_and_a_model_off_it_is_said() -> None:
    """A tester's untrained softmax regression read leave-one-out changes of 0.67 where the
    true ones (the optimum without the example minus the optimum) were 1e-4: each retraining
    carried the model's own step to the optimum. A reviewer's ill-conditioned ridge showed a
    gradient criterion missing that by its condition number (no warning, 67% off). Measured
    from the model retrained on all the data the changes are the closed form's, and the move is
    said."""
    X, y, task, data, l2 = _ridge_problem()
    off = infkit.Task.regression(torch.nn.Linear(4, 1, bias=False).double())
    with torch.no_grad():  # a tenth of the way from the optimum towards 0: far off for N = 60
        off.model.weight.copy_(0.9 * task.model.weight)
    test = (data[0][:3], data[1][:3])
    full = _closed_form(X, y, l2)
    truth = []
    for removed in ([2], [9], [2, 9, 33]):
        keep = np.setdiff1d(np.arange(len(X)), removed)
        truth.append(_closed_form(X[keep], y[keep], l2) - full)
    with pytest.warns(infkit.errors.NotConvergedWarning, match=r"not at the optimum.*moved"):
        moved = retrain.leave_one_out(off, data, test, [2, 9], l2, tolerance=1e-13)
    np.testing.assert_allclose(moved.params.numpy(), np.stack(truth[:2]), rtol=1e-7, atol=1e-13)
    start = full - off.model.weight.detach().reshape(-1).numpy()
    assert moved.start_move == pytest.approx(np.linalg.norm(start), rel=1e-8)
    outputs = test[0].numpy() @ np.stack(truth[:2]).T  # the test outputs' changes, [3, 2]
    residual = (test[0].numpy() @ full - test[1].numpy()[:, 0])[:, None]  # 0.5 r^2 per example
    expected = residual * outputs + 0.5 * outputs**2
    np.testing.assert_allclose(moved.measurement.numpy(), expected, rtol=1e-6, atol=1e-13)
    with pytest.warns(infkit.errors.NotConvergedWarning, match="group-removal"):
        group = retrain.without(off, data, [2, 9, 33], l2, tolerance=1e-13)
    np.testing.assert_allclose(group.delta.numpy(), truth[2], rtol=1e-7, atol=1e-13)
    # at the optimum: no warning, nothing moved, the same changes
    with warnings.catch_warnings():
        warnings.simplefilter("error", infkit.errors.NotConvergedWarning)
        at = retrain.leave_one_out(task, data, test, [2, 9], l2, tolerance=1e-13)
        at_group = retrain.without(task, data, [2, 9, 33], l2, tolerance=1e-13)
        step = retrain.without(off, data, [], l2, tolerance=1e-13)  # the step itself, asked for
    np.testing.assert_allclose(at.params.numpy(), np.stack(truth[:2]), rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(at_group.delta.numpy(), truth[2], rtol=1e-8, atol=1e-14)
    assert at.start_move < 1e-12 and at_group.start_move < 1e-12
    np.testing.assert_allclose(step.delta.numpy(), start, rtol=1e-8)


def test_metrics_refuse_what_would_give_a_figure_of_something_else() -> None:
    """A tester's findings: NaN measurements (a diverged retraining) left the LDS over 1 of 20
    queries without a word, 2 subsets gave +-1 correlations read as a figure, indices out of
    range raised IndexError (negative ones wrapped), a zero reference gave 1.7e300."""
    gen = torch.Generator().manual_seed(0)
    S = torch.randn(20, 30, generator=gen, dtype=torch.float64)
    M = retrain.random_masks(30, 10, 0.5)
    Y = torch.randn(10, 20, generator=gen, dtype=torch.float64)
    expected = np.mean(evaluate.lds_per_query(S, M, Y))
    assert evaluate.lds(S, M, Y) == pytest.approx(expected)
    bad = Y.clone()
    bad[3, 1:] = float("nan")
    with pytest.raises(InvalidInputError, match=r"actual \(subset, query\)\[3, 1\] is nan"):
        evaluate.lds(S, M, bad)
    bad_scores = S.clone()
    bad_scores[0, 5] = float("inf")
    with pytest.raises(InvalidInputError, match=r"scores\[0, 5\] is inf"):
        evaluate.lds_interval(bad_scores, M, Y)
    with pytest.raises(InvalidInputError, match="at least 3 of them, got 2"):
        evaluate.lds(S, M[:2], Y[:2])
    constant = Y.clone()
    constant[:, 4] = 1.0  # query 4 is undefined: the mean over the other 19, said
    with pytest.warns(infkit.errors.Notice, match="mean over 19 of 20 queries"):
        partial = evaluate.lds(S, M, constant)
    assert partial == pytest.approx(np.delete(evaluate.lds_per_query(S, M, Y), 4).mean())
    with pytest.raises(InvalidInputError, match="undefined for each of the 20 queries"):
        evaluate.lds(S, M, torch.ones(10, 20))
    actual = torch.randn(20, 3, generator=gen, dtype=torch.float64)
    for indices, message in (
        ([1, 2, 30], "training index 30 is out of range"),
        ([1, 2, -1], "training index -1 is out of range"),
    ):
        with pytest.raises(InvalidInputError, match=message):
            evaluate.loo_correlation(S, actual, indices)
        with pytest.raises(InvalidInputError, match=message):
            evaluate.loo_interval(S, actual, indices)
    nan_actual = actual.clone()
    nan_actual[2, 1] = float("nan")
    with pytest.raises(InvalidInputError, match="diverged"):
        evaluate.loo_correlation(S, nan_actual, [1, 2, 3])
    with pytest.raises(InvalidInputError, match=r"\[2, 1\] is nan"):
        evaluate.loo_interval(S, nan_actual, [1, 2, 3])
    with pytest.raises(InvalidInputError, match="actual is zero"):
        evaluate.relative_error(torch.ones(3), torch.zeros(3))
    with pytest.raises(InvalidInputError, match=r"\(3, 2\) and actual \(2,\) differ in size"):
        evaluate.relative_error(torch.ones(3, 2), torch.ones(2))
    assert evaluate.relative_error(torch.ones(1, 2), torch.tensor([1.0, 0.0])) == 1.0
    with pytest.raises(InvalidInputError, match="at least one flagged"):
        evaluate.fraction_found(torch.randn(5), torch.zeros(5, dtype=torch.bool), 0.4)
    with pytest.raises(InvalidInputError, match=r"keeps none.*at least 0\.1"):
        retrain.random_masks(10, 3, 0.05)
    for bad in (0, 2.0, True):
        with pytest.raises(InvalidInputError, match="n_subsets must be an integer >= 1"):
            retrain.random_masks(10, bad, 0.5)
    # numpy's integers are integers (the check written out beside integer_argument refused them)
    assert retrain.random_masks(10, np.int64(3), 0.5).shape == (3, 10)
    _, _, task, data, l2 = _ridge_problem(n=12)
    empty_row = torch.ones(3, 12, dtype=torch.bool)
    empty_row[1] = False
    with pytest.raises(InvalidInputError, match="mask 1 keeps no training example"):
        retrain.subsets(task, data, data, l2, masks=empty_row)


def test_correlation_auc_and_fraction_found() -> None:
    a = torch.arange(10.0)
    c = evaluate.correlation(a, 2 * a + 1)
    assert c.pearson == pytest.approx(1.0) and c.spearman == pytest.approx(1.0) and c.n == 10
    # a constant vector: NaN with scipy's warning only; infkit says which is constant
    with pytest.warns(infkit.errors.Notice, match=r"actual is constant \(3\): the correlation"):
        undefined = evaluate.correlation(a, torch.full((10,), 3.0))
    assert np.isnan(undefined.pearson) and np.isnan(undefined.spearman) and undefined.n == 10
    flags = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, 0, 1], dtype=torch.bool)
    scores = torch.tensor([0.1, 0.2, 0.0, 0.9, 0.8, 0.3, 0.1, 0.2, 0.05, 0.7])
    assert evaluate.detection_auc(scores, flags) == pytest.approx(1.0)
    assert evaluate.detection_auc(-scores, flags) == pytest.approx(0.0)
    assert evaluate.fraction_found(scores, flags, 0.2) == pytest.approx(2 / 3)
    # ties at the cut count as a random choice among them would on average: by enumerating
    # every order of the tied examples (a tester's: index order gave 1/3 for 0.44)
    import itertools

    tied = torch.tensor([0.9, 0.5, 0.5, 0.5, 0.5, 0.5, 0.1, 0.1, 0.1])
    marks = torch.tensor([0, 1, 0, 0, 1, 0, 1, 0, 0], dtype=torch.bool)
    group = [1, 2, 3, 4, 5]
    orders = list(itertools.permutations(group))
    average = sum(int(marks[[0, *order[:2]]].sum()) for order in orders) / len(orders) / 3
    assert average == pytest.approx((0 + 2 * 2 / 5) / 3)  # 0.267: the top one is unflagged
    assert evaluate.fraction_found(tied, marks, 3 / 9) == pytest.approx(average, abs=1e-12)
    assert evaluate.relative_error(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 0.0])) == 1.0
    with pytest.raises(InvalidInputError, match="both flagged and unflagged"):
        evaluate.detection_auc(scores, torch.ones(10, dtype=torch.bool))
    assert evaluate.detection_auc(scores, flags.long()) == pytest.approx(1.0)  # 0 and 1
    with pytest.raises(InvalidInputError, match="example 3 is 2"):
        evaluate.detection_auc(scores, flags.long() * 2)
    with pytest.raises(InvalidInputError, match="scores of example 1 is nan"):
        evaluate.fraction_found(torch.tensor([0.1, float("nan")] + [0.0] * 8), flags, 0.2)
    for bad in (float("inf"), -float("inf")):  # an overflow is not a rank
        with pytest.raises(InvalidInputError, match=r"scores of example 1 is .*inf.* overflow"):
            evaluate.detection_auc(torch.tensor([0.1, bad] + [0.0] * 8), flags)
    for number in (np.float32(0.2), torch.tensor(0.2), torch.tensor([0.2]), np.array([0.2])):
        assert evaluate.fraction_found(scores, flags, number) == pytest.approx(2 / 3)
    with pytest.raises(InvalidInputError, match="inspected is the fraction"):
        evaluate.fraction_found(scores, flags, torch.empty((), device="meta"))
    # one number per example: a matrix was flattened, an empty set gave 0.0, strings a
    # ValueError (a reviewer's)
    for bad, name in (
        (scores.reshape(2, 5), "scores"),
        (torch.zeros(0), "scores"),
    ):
        with pytest.raises(InvalidInputError, match=f"{name} must hold one number per example"):
            evaluate.detection_auc(bad, flags if bad.numel() else flags[:0])
    with pytest.raises(InvalidInputError, match="is_flagged must be numbers"):
        evaluate.fraction_found(scores, np.array(["yes"] * 10), 0.2)
    for inspected in (0, -0.1, 1.5, True, torch.tensor(True)):  # 0.033 at 0% inspected before
        with pytest.raises(InvalidInputError, match=r"inspected is the fraction"):
            evaluate.fraction_found(scores, flags, inspected)
    with pytest.raises(InvalidInputError, match="predicted has 3 values but actual has 4"):
        evaluate.correlation(torch.ones(3), torch.ones(4))
    # indices of another length: named, where the pooled sizes were compared ("predicted has
    # 50 values but actual has 800", a tester's)
    S, actual = torch.randn(16, 100), torch.randn(16, 50)
    for compare in (evaluate.loo_correlation, evaluate.loo_interval):
        with pytest.raises(InvalidInputError, match="indices= names 40 training examples, but"):
            compare(S, actual, list(range(40)))
        with pytest.raises(InvalidInputError, match="no indices= say which 50 of them"):
            compare(S, actual)


def test_store_writes_atomically_and_round_trips(tmp_path) -> None:
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([1, 2])}
    store.save_tensors(tmp_path / "x.safetensors", t)
    loaded = store.load_tensors(tmp_path / "x.safetensors")
    torch.testing.assert_close(loaded["a"], t["a"])
    # tensors whose offsets in the file are not multiples of 64 bytes come back in memory of
    # PyTorch's allocator (aligned), where BLAS rounds as it did on the saved run's tensors
    odd = {"a": torch.randn(3, 3, dtype=torch.float64), "b": torch.randn(5), "c": torch.randn(7)}
    store.save_tensors(tmp_path / "odd.safetensors", odd)
    for name, value in store.load_tensors(tmp_path / "odd.safetensors").items():
        assert value.data_ptr() % 64 == 0, name
        assert torch.equal(value, odd[name])
    (tmp_path / "odd.safetensors").unlink()
    store.save_json(tmp_path / "s.json", {"auc": 0.9, "n": 3})
    assert store.load_json(tmp_path / "s.json") == {"auc": 0.9, "n": 3}
    # A failed write leaves neither a partial file nor a temporary behind.
    circular: list = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular"):
        store.save_json(tmp_path / "bad.json", {"x": circular})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json", "x.safetensors"]


class _Float32Inside(torch.nn.Module):
    """A float64 MLP whose tanh computes in float32, as Hugging Face's RMSNorm does."""

    def __init__(self, coarse: bool) -> None:
        super().__init__()
        self.hidden, self.head, self.coarse = torch.nn.Linear(5, 8), torch.nn.Linear(8, 3), coarse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.hidden(x)
        return self.head(torch.tanh(h.float()).to(h.dtype) if self.coarse else torch.tanh(h))


def test_a_float64_model_that_rounds_in_float32_inside_is_named_when_training_stalls() -> None:
    # a tester's float64 Llama stopped at ||grad L|| 2e-3, unconverged, without a word: its
    # RMSNorm computes in float32, and the optimiser cannot go on below float32's rounding
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(80, 5, generator=gen, dtype=torch.float64)
    y = (X[:, 0] + X[:, 1] > 0).long() + (X[:, 2] > 0.5).long()
    results = {}
    for coarse in (False, True):
        torch.manual_seed(0)
        task = infkit.Task.classification(_Float32Inside(coarse).double())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            results[coarse] = infkit.train_to_optimum(task, (X, y), 1e-2, tolerance=1e-10)
        said = [w for w in caught if "computes part of its loss in a coarser" in str(w.message)]
        assert len(said) == int(coarse), coarse
        assert all(w.category is infkit.errors.NotConvergedWarning for w in said)
    assert results[False].converged and not results[False].coarse_objective
    assert not results[True].converged and results[True].coarse_objective
    # the warning names the value and the module that make it
    assert "float(...) makes a float32 value in module 'the model (_Float32Inside)'" in str(
        said[0].message
    )
    # a float64 model is not blamed where it stops for other reasons: max_iter, or a target
    # below float64's own resolution
    # below float64's own resolution; it says it stopped short, and why (a tester's run ended
    # unconverged without a word)
    for settings, why in (
        ({"max_iter": 3}, "max_iter=3 reached"),
        ({"tolerance": 1e-17}, "could not progress"),
    ):
        torch.manual_seed(0)
        task = infkit.Task.classification(_Float32Inside(False).double())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            short = infkit.train_to_optimum(task, (X, y), 1e-2, **settings)
        assert not short.converged and not short.coarse_objective, settings
        said = [str(w.message) for w in caught if w.category is infkit.errors.NotConvergedWarning]
        assert len(said) == 1 and "stopped short of its target" in said[0], settings
        assert why in said[0] and "coarser" not in said[0], settings
    # a float32 model stopped at its own precision's floor is not warned (a reviewer: every
    # float32 run at the default tolerance was); a TorchScript part, which takes no hooks, is
    # looked through without failing the run
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        floor = infkit.train_to_optimum(infkit.Task.classification(small), (X.float(), y), 1e-2)
    assert not floor.converged and floor.gradient_norm < 1e-5
    scripted = torch.nn.Sequential(
        torch.jit.script(torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU())),
        torch.nn.Linear(8, 3),
    ).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stalled = infkit.train_to_optimum(
            infkit.Task.classification(scripted), (X, y), 1e-4, max_iter=1500
        )
    assert stalled.evaluations < 1500 and not stalled.coarse_objective  # stalled: looked at
    assert any("stopped short of its target" in str(w.message) for w in caught)
    # nor a float64 ReLU network that stalls at its kinks: a reviewer's three seeds, which a
    # probe of the objective's slope along the gradient blamed on float32 (two of three)
    for seed in range(3):
        torch.manual_seed(seed)
        relu = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        task = infkit.Task.classification(relu.double())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            stalled = infkit.train_to_optimum(task, (X, y), 1e-4, max_iter=1500)
        assert not stalled.converged and stalled.evaluations < 1500, seed  # stalled: probed
        assert not stalled.coarse_objective, seed
        assert not any("coarser precision" in str(w.message) for w in caught), seed


def test_the_detection_curve_draws_the_fraction_found_and_refuses_a_list_of_indices() -> None:
    """plot.detection_curve's line at each inspected fraction is evaluate.fraction_found's
    there, ties included: the curve took a tie in index order (constant scores with the
    flagged examples first in the data drew all found at the first places, where a random
    order among the tied finds them along the diagonal), the fraction averaged it; a list of
    indices (the form [self_influence] flagged takes) raised numpy's IndexError: refused,
    saying how to make the mask."""
    import matplotlib

    matplotlib.use("Agg")
    from infkit import plot

    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(40, generator=gen, dtype=torch.float64)
    scores[20:30] = scores[20]  # a tie group of 10, one of them flagged
    flagged = torch.zeros(40, dtype=torch.bool)
    flagged[[1, 5, 9, 25]] = True
    figure = plot.detection_curve({"self-influence": scores}, flagged)
    xs, ys = figure.axes[0].lines[0].get_data()
    for k in range(1, 41):
        assert abs(ys[k - 1] - evaluate.fraction_found(scores, flagged, xs[k - 1])) < 1e-12
    # constant scores, the flagged first: the diagonal (k / N found), not all at once
    constant = plot.detection_curve({"constant": torch.zeros(40)}, flagged.sort(descending=True)[0])
    xs, ys = constant.axes[0].lines[0].get_data()
    assert np.abs(ys - xs).max() < 1e-12
    with pytest.raises(InvalidInputError, match=r"is_flagged has 4: is_flagged is a mask"):
        plot.detection_curve({"self-influence": scores}, [1, 5, 9, 30])


def test_the_proponent_grid_title_holds_for_any_measurement() -> None:
    """The grid shows top_k's proponents, the examples that helped each query whatever its
    measurement (top_k reads higher_is_better); its default title said removal raises the
    query's loss, false for a margin, where removing a proponent lowers the margin."""
    import matplotlib

    matplotlib.use("Agg")
    from infkit import plot

    images = torch.rand(6, 4, 4, generator=torch.Generator().manual_seed(0))
    figure = plot.proponent_grid(
        images[:2], images, torch.tensor([[0, 1], [2, 3]]), torch.tensor([[4, 5], [5, 4]])
    )
    title = figure.get_suptitle()
    assert "proponents (they helped it)" in title and "opponents (they hurt it)" in title
    assert "loss" not in title


def test_float32_retrainings_at_their_precision_are_ground_truth() -> None:
    """A tester's: float32 leave-one-out retrainings stopped at float32's precision (1.4e-8
    against a target of 1e-8, within train_to_optimum's precision floor, where it does not
    warn) were flagged "not ground truth", on `infkit run`'s page too, though they equal
    float64 retrainings to 2e-5. They count as converged, as train_to_optimum counts them."""
    import copy

    from sklearn.datasets import load_wine

    torch.manual_seed(0)
    X, y = load_wine(return_X_y=True)
    perm = torch.randperm(178)
    X, y = torch.tensor(X, dtype=torch.float32)[perm], torch.tensor(y)[perm]
    X = (X - X[:130].mean(0)) / X[:130].std(0)
    train, query = (X[:130], y[:130]), (X[130:131], y[130:131])
    model = torch.nn.Sequential(torch.nn.Linear(13, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    task = infkit.Task.classification(model)
    infkit.train_to_optimum(task, train, 1e-2)
    indices = [3, 17, 40, 99]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        single = infkit.retrain.leave_one_out(task, train, query, indices, 1e-2, tolerance=1e-8)
    assert not [w for w in said if "not ground truth" in str(w.message)], said
    assert bool(single.converged.all())
    double = infkit.Task.classification(copy.deepcopy(model).double())
    reference = infkit.retrain.leave_one_out(
        double,
        (train[0].double(), train[1]),
        (query[0].double(), query[1]),
        indices,
        1e-2,
        tolerance=1e-12,
    )
    assert evaluate.relative_error(single.measurement.double(), reference.measurement) < 1e-3


def test_a_float32_run_cut_by_max_iter_is_not_at_its_precision() -> None:
    """A reviewer's: a float32 run stopped by max_iter with a gradient norm under the precision
    floor (100 eps of its large starting norm: raw pixels) counted as at its precision, so a
    retraining 71% from the full one was 'converged' without a word. Only a run that stalled
    there is; one cut by max_iter warns and is not converged."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X[:300] * 16, dtype=torch.float32), torch.tensor(y[:300])
    torch.manual_seed(0)
    task = infkit.Task.classification(torch.nn.Linear(64, 10))
    with pytest.warns(infkit.errors.NotConvergedWarning, match="max_iter=40 reached"):
        cut = infkit.train_to_optimum(task, (X, y), 1e-3, tolerance=1e-10, max_iter=40)
    assert not cut.at_precision and not cut.done
    # a sixth reviewer's: one that stalled under the floor of its starting norm (pixels x 256)
    # was 88x the optimum's norm from it: not at its precision, whatever it warns
    torch.manual_seed(0)
    stalled = infkit.train_to_optimum(
        infkit.Task.classification(torch.nn.Linear(64, 10)), (X * 16, y), 1e-3
    )
    assert stalled.gradient_norm > 1e-3 and not stalled.at_precision and not stalled.done


def test_subsets_take_masks_of_zeros_and_ones_as_lds_does() -> None:
    """A tester's 0/1 integer masks, taken by evaluate.lds, were refused by retrain.subsets
    ("must be a boolean [m, N] tensor"): the same masks now give the same retrainings as their
    boolean form, and values other than 0 and 1 are refused by name in both."""
    _, _, task, data, l2 = _ridge_problem(n=12)
    test = (data[0][:3], data[1][:3])
    flags = retrain.random_masks(12, 4, 0.75, seed=2)
    by_bool = retrain.subsets(task, data, test, l2, masks=flags)
    # (a list of per-subset rows too, which evaluate.lds read before: a reviewer's)
    rows = list(flags.int())
    for form in (flags.to(torch.int64), flags.to(torch.float32), flags.int().numpy(), rows):
        got = retrain.subsets(task, data, test, l2, masks=form)
        assert got.masks.dtype == torch.bool and torch.equal(got.masks, flags)
        torch.testing.assert_close(got.measurements, by_bool.measurements, rtol=1e-9, atol=1e-12)
    for bad in (flags.to(torch.int64) * 2, flags.double() * 0.5):
        with pytest.raises(InvalidInputError, match=r"0/1, got values \[0"):
            retrain.subsets(task, data, test, l2, masks=bad)
