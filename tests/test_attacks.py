"""Training-set attacks from input influence, judged by retraining: the predicted change of the
test loss has the actual change's sign and size (docs/analyses.md §10)."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits

import infkit
from infkit.analyses.attacks import Attack, retrained_change, training_set_attack
from infkit.errors import InvalidInputError

L2 = 1e-2


@pytest.fixture(scope="module")
def problem() -> dict:
    X, y = load_digits(return_X_y=True)
    keep = (y == 1) | (y == 7)
    X = torch.tensor(X[keep] / 16.0)
    y = torch.tensor(y[keep] == 7).long()
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 2).double()
    task = infkit.Task.classification(model)
    train, test = (X[:150], y[:150]), (X[150:156], y[150:156])
    infkit.train_to_optimum(task, train, L2)
    inf = infkit.Influence(task, "exact", l2=L2).fit(train)
    return {"task": task, "train": train, "test": test, "inf": inf}


@pytest.mark.parametrize(("norm", "epsilon"), [("l2", 0.05), ("linf", 0.01)])
def test_small_attacks_are_predicted_to_first_order(
    problem: dict, norm: str, epsilon: float
) -> None:
    attack = training_set_attack(problem["inf"], problem["test"], k=3, epsilon=epsilon, norm=norm)
    actual = retrained_change(problem["task"], problem["train"], attack, problem["test"], L2)
    predicted = attack.predicted
    assert float(predicted.sum()) > 0  # it raises the summed test loss
    assert float(actual.sum()) == pytest.approx(float(predicted.sum()), rel=0.1)
    size = (
        attack.delta.reshape(3, -1).norm(dim=1) if norm == "l2" else attack.delta.abs().amax((1,))
    )
    assert torch.allclose(size, torch.full((3,), epsilon, dtype=torch.float64))


def test_a_large_attack_keeps_the_sign_within_a_factor_two(problem: dict) -> None:
    attack = training_set_attack(problem["inf"], problem["test"], k=5, epsilon=0.5)
    actual = float(
        retrained_change(problem["task"], problem["train"], attack, problem["test"], L2).sum()
    )
    predicted = float(attack.predicted.sum())
    assert actual > 0 and 0.5 <= actual / predicted <= 2.0, (actual, predicted)


def test_the_attacked_examples_have_the_largest_input_influence(problem: dict) -> None:
    inf = problem["inf"]
    g = (
        inf.input_influence(problem["test"], torch.arange(inf.n_train))
        .sum(0)
        .reshape(inf.n_train, -1)
    )
    attack = training_set_attack(inf, problem["test"], k=4, epsilon=0.1)
    assert set(attack.indices.tolist()) == set(g.norm(dim=1).topk(4).indices.tolist())
    linf = training_set_attack(inf, problem["test"], k=4, epsilon=0.1, norm="linf")
    assert set(linf.indices.tolist()) == set(g.abs().sum(1).topk(4).indices.tolist())


def test_bad_attacks_are_refused(problem: dict) -> None:
    inf = problem["inf"]
    with pytest.raises(InvalidInputError, match="norm must be"):
        training_set_attack(inf, problem["test"], k=1, epsilon=0.1, norm="l1")  # type: ignore[arg-type]
    for epsilon in (0.0, float("inf"), float("nan"), "0.1"):  # inf gave infinite inputs
        with pytest.raises(InvalidInputError, match="epsilon must be a finite number > 0"):
            training_set_attack(inf, problem["test"], k=1, epsilon=epsilon)  # type: ignore[arg-type]
    for k in (151, 2.5, 0):  # 2.5 reached torch.topk's TypeError
        with pytest.raises(InvalidInputError, match="k must be an integer between 1 and 150"):
            training_set_attack(inf, problem["test"], k=k, epsilon=0.1)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="candidate indexes"):  # said "between 1 and 0"
        training_set_attack(inf, problem["test"], k=1, epsilon=0.1, candidates=[])
    with pytest.raises(InvalidInputError, match="is given twice"):
        training_set_attack(inf, problem["test"], k=1, epsilon=0.1, candidates=[3, 3])
    attack = training_set_attack(inf, problem["test"], k=1, epsilon=0.1)
    with pytest.raises(InvalidInputError, match="shaped like the perturbations"):
        attack.apply(torch.zeros(3, 8))
    # a training set other than the attack's (a tester's bare IndexError)
    width = attack.delta.shape[1:]
    with pytest.raises(InvalidInputError, match="the training set the attack was computed on"):
        attack.apply(torch.zeros(int(attack.indices.max()), *width))
    # one as long as the attack's, or longer, with other inputs: taken before (a reviewer's)
    X = problem["train"][0]
    assert torch.equal(attack.apply(X)[attack.indices], X[attack.indices] + attack.delta)
    for other in (X.flip(0), torch.cat([X, X[:5]]), X + 1e-3):
        with pytest.raises(InvalidInputError, match="the training set the attack was computed on"):
            attack.apply(other)
    # the same data in float32 is the same training set, values that float32 rounds included
    # (it was refused as another set)
    standard = (X - X.mean(0)) / (X.std(0) + 1e-3)
    plain = Attack(attack.indices, attack.delta, attack.predicted, len(X), standard[attack.indices])
    moved = plain.apply(standard.float())
    assert moved.dtype == torch.float32 and not torch.equal(standard.float().double(), standard)


def test_the_attacked_retraining_takes_a_dataset(problem: dict) -> None:
    """A TensorDataset (the README's data forms) raised "too many values to unpack" (a
    tester's): the same retraining as the pair's."""
    attack = training_set_attack(problem["inf"], problem["test"], k=3, epsilon=0.05)
    pair = retrained_change(problem["task"], problem["train"], attack, problem["test"], L2)
    dataset = torch.utils.data.TensorDataset(*problem["train"])
    given = retrained_change(problem["task"], dataset, attack, problem["test"], L2)
    assert torch.equal(given, pair)
    X, y = problem["train"]  # numpy arrays (a reviewer's: refused as "not one tensor")
    arrays = retrained_change(problem["task"], (X.numpy(), y.numpy()), attack, problem["test"], L2)
    assert torch.equal(arrays, pair)


def test_an_attack_on_a_margin_lowers_it(problem: dict) -> None:
    """A tester's: on a measurement where higher is better the attack raised the summed test
    margin (+1.59 retrained, "attacking" towards confidence). It now worsens it: the margin
    falls, predicted and retrained alike, and the attack is the loss attack's counterpart (the
    same examples as attacking minus the margin, the opposite of the margin's ascent)."""
    task = problem["task"]
    margin = infkit.Task.classification(task.model, measurement="margin")
    inf = infkit.Influence(margin, "exact", l2=L2).fit(problem["train"])
    attack = training_set_attack(inf, problem["test"], k=3, epsilon=0.05)
    actual = retrained_change(margin, problem["train"], attack, problem["test"], L2)
    assert float(attack.predicted.sum()) < 0
    assert float(actual.sum()) == pytest.approx(float(attack.predicted.sum()), rel=0.1)
    g = inf.input_influence(problem["test"], torch.arange(inf.n_train)).sum(0).reshape(150, -1)
    expected = g.norm(dim=1).topk(3).indices
    assert sorted(attack.indices.tolist()) == sorted(expected.tolist())
    step = -0.05 * g[attack.indices] / g[attack.indices].norm(dim=1, keepdim=True)
    assert torch.allclose(attack.delta.reshape(3, -1), step, atol=1e-14)
