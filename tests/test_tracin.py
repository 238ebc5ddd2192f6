"""method="identity": the gradient dot product / N, and TracInCP against a hand-computed sum."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from autograd_reference import autograd_gradients

import infkit
from infkit.errors import InvalidInputError, NonFiniteError, UnsupportedError
from infkit.evaluate import relative_error


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_identity_is_the_raw_gradient_dot_product_over_n(mlp_problem: dict) -> None:
    model, task = mlp_problem["model"], mlp_problem["task"]
    (X, y), (Xt, yt) = mlp_problem["train"], mlp_problem["test"]
    G, Q = autograd_gradients(model, X, y), autograd_gradients(model, Xt, yt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # l2 = 0 is not this model's optimum
        plain = infkit.Influence(task, "identity", l2=0.0).fit((X, y))
    assert relative_error(plain.scores((Xt, yt)), Q @ G.T / 60) < 1e-12
    assert relative_error(plain.self_scores(), (G * G).sum(1) / 60) < 1e-12
    # With l2 > 0 the regulariser share l2 * theta is part of the attributed training gradient.
    l2 = mlp_problem["l2"]
    inf = infkit.Influence(task, "identity", l2=l2).fit((X, y))
    V = G + l2 * flat(model)
    assert relative_error(inf.scores((Xt, yt)), Q @ V.T / 60) < 1e-12
    assert relative_error(inf.remove([1, 5]).params, V[[1, 5]].sum(0) / 60) < 1e-12
    # relatif: the training side is normalised (gradient cosine up to the query's norm).
    rel = infkit.Influence(task, "identity", "relatif", l2=l2).fit((X, y))
    assert relative_error(rel.scores((Xt, yt)), Q @ (V / V.norm(dim=1, keepdim=True)).T) < 1e-12


def test_tracincp_equals_the_hand_computed_sum(mlp_problem: dict) -> None:
    model, task, l2 = mlp_problem["model"], mlp_problem["task"], mlp_problem["l2"]
    (X, y), (Xt, yt) = mlp_problem["train"], mlp_problem["test"]
    final = flat(model).clone()
    # Checkpoints along a made-up trajectory: state dicts and a flat vector.
    gen = torch.Generator().manual_seed(3)
    trajectory = []
    for k in range(3):
        m = copy.deepcopy(model)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * (3 - k) * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        trajectory.append(m)
    trajectory.append(model)  # the fitted model itself can be a checkpoint too
    checkpoints = [
        trajectory[0].state_dict(),
        trajectory[1].state_dict(),
        flat(trajectory[2]),
        model.state_dict(),
    ]
    rates = [0.5, 0.2, 0.05, 0.01]
    inf = infkit.Influence(
        task, "identity", l2=l2, checkpoints=checkpoints, learning_rates=rates
    ).fit((X, y))
    S, self_s, removal = inf.scores((Xt, yt)), inf.self_scores(), inf.remove([0, 7, 9])
    expected = torch.zeros(7, 60, dtype=torch.float64)
    expected_self = torch.zeros(60, dtype=torch.float64)
    expected_delta = torch.zeros_like(final)
    expected_loss = torch.zeros(7, dtype=torch.float64)
    for m, eta in zip(trajectory, rates):
        G, Q = autograd_gradients(m, X, y), autograd_gradients(m, Xt, yt)
        V = G + l2 * flat(m)
        expected += eta * Q @ V.T / 60
        expected_self += eta * (G * V).sum(1) / 60
        expected_delta += eta * V[[0, 7, 9]].sum(0) / 60
        # each step's change meets the test gradient at its own checkpoint (a tester's: the
        # summed step against the final model's gradient was 0.26 off the group's scores)
        expected_loss += eta * Q @ V[[0, 7, 9]].sum(0) / 60
    assert relative_error(S, expected) < 1e-12
    assert relative_error(self_s, expected_self) < 1e-12
    assert relative_error(removal.params, expected_delta) < 1e-12
    assert relative_error(removal.loss((Xt, yt)), expected_loss) < 1e-12
    assert relative_error(removal.measurement((Xt, yt)), S[:, [0, 7, 9]].sum(1)) < 1e-12
    assert removal.outputs((Xt, yt)).shape == (7, 3)
    assert torch.equal(flat(model), final)  # the model is left at its own parameters
    assert inf.describe()["checkpoints"] == 4
    # a sum over checkpoints has no inverse curvature to split: refused, pointing elsewhere
    # (identity without checkpoints answers it, so it is not listed as a method that does)
    with pytest.raises(UnsupportedError, match="with checkpoints") as refused:
        inf.module_scores((Xt, yt))
    assert "without them it does" in str(refused.value)
    assert "'identity'" not in str(refused.value).split("methods that do:")[1]


def test_a_checkpoint_differing_in_its_frozen_layer_alone_is_another_model() -> None:
    """A reviewer's checkpoint with the task model's trainable head and its own frozen first
    layer was taken for the model itself (its cached gradients used): scores 0.51 off those at
    the checkpoint. Its frozen parameters count: the scores are those computed at it by hand."""
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=gen)
    Xt, yt = X[:3] + 0.1, y[:3]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    model = model.double()
    model[0].requires_grad_(False)
    other = copy.deepcopy(model)
    with torch.no_grad():
        other[0].weight.mul_(-1.5)  # its own frozen layer, the same trainable head
    task = infkit.Task.classification(model)
    inf = infkit.Influence(
        task, "identity", checkpoints=[other.state_dict()], learning_rates=[1.0]
    ).fit((X, y))

    def grads(m: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        head = list(m[2].parameters())
        rows = []
        for i in range(len(labels)):
            loss = torch.nn.functional.cross_entropy(m(inputs[i : i + 1]), labels[i : i + 1])
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, head)]))
        return torch.stack(rows)

    expected = grads(other, Xt, yt) @ grads(other, X, y).T / 20
    assert relative_error(inf.scores((Xt, yt)), expected) < 1e-12


def test_tracincp_checks_its_inputs(mlp_problem: dict) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    with pytest.raises(InvalidInputError, match="learning_rates"):
        infkit.Influence(task, "identity", l2=l2, checkpoints=[torch.zeros(75)]).fit(train)
    with pytest.raises(InvalidInputError, match="2 checkpoints but 1 learning rates"):
        infkit.Influence(
            task, "identity", l2=l2, checkpoints=[torch.zeros(75)] * 2, learning_rates=[1.0]
        ).fit(train)
    with pytest.raises(InvalidInputError, match=r"shape \[P\] = \[75\]"):
        infkit.Influence(
            task, "identity", l2=l2, checkpoints=[torch.zeros(7)], learning_rates=1.0
        ).fit(train)
    # a TrainingRun's (step, theta) pairs: the message says which item and what each must be
    # (it printed the whole list and "must be a list"); NaN rates gave NaN scores; a state dict
    # with a tensor the model lacks was taken
    state = mlp_problem["model"].state_dict()
    with pytest.raises(InvalidInputError, match="item 0 is a tuple, and each must be a mapping"):
        infkit.Influence(task, "identity", checkpoints=[(0, torch.zeros(75))], learning_rates=1.0)
    for bad in (float("nan"), -0.1, float("inf")):
        with pytest.raises(InvalidInputError, match="learning rate of checkpoint 1 is"):
            infkit.Influence(
                task, "identity", checkpoints=[state, state], learning_rates=[0.1, bad]
            )
    with pytest.raises(InvalidInputError, match=r"checkpoint 0 has entries .*\['extra'\]"):
        infkit.Influence(
            task,
            "identity",
            l2=l2,
            checkpoints=[{**state, "extra": torch.zeros(1)}],
            learning_rates=1.0,
        ).fit(train)


def test_a_checkpoint_holding_nan_is_named_not_the_query(mlp_problem: dict) -> None:
    """A checkpoint saved after the run diverged made every score NaN, and the error blamed
    example 0 of the test set; it names the checkpoint and its parameter (a state dict or a
    flat vector alike)."""
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    state = {k: v.clone() for k, v in mlp_problem["model"].state_dict().items()}
    name = next(n for n, p in mlp_problem["model"].named_parameters() if p.dim() == 1)
    broken = {**state, name: state[name].clone()}
    broken[name][0] = float("nan")
    flat = torch.cat([v.reshape(-1) for v in broken.values()])
    assert flat.shape == (75,) and list(broken) == [n for n, _ in task.model.named_parameters()]
    for bad in (broken, flat):
        with pytest.raises(NonFiniteError, match=f"checkpoint 1 holds NaN or Inf .*{name!r}"):
            infkit.Influence(
                task, "identity", l2=l2, checkpoints=[state, bad], learning_rates=0.1
            ).fit(train)


def test_a_checkpoint_buffer_holding_nan_is_named() -> None:
    """A BatchNorm's running variance NaN in a checkpoint (parameters finite) is named."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)
    ).double()
    X, y = torch.randn(20, 3, dtype=torch.float64), torch.arange(20) % 2
    model.eval()
    task = infkit.Task.classification(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    broken = {**state, "1.running_var": torch.full((4,), float("nan"), dtype=torch.float64)}
    with pytest.raises(
        NonFiniteError, match=r"checkpoint 1 holds NaN or Inf \(buffer '1\.running_var'"
    ):
        infkit.Influence(task, "identity", checkpoints=[state, broken], learning_rates=0.1).fit(
            (X, y)
        )
    # the model's parameters under other running statistics are another model (they were
    # taken as the fitted one, its statistics and gradient cache): each term as alone
    other = {**state, "1.running_var": 4 * state["1.running_var"] + 1}
    terms = []
    for checkpoint in (state, other):
        alone = copy.deepcopy(model)
        alone.load_state_dict(checkpoint)
        single = infkit.Influence(
            infkit.Task.classification(alone.eval()),
            "identity",
            checkpoints=[checkpoint],
            learning_rates=0.1,
        )
        terms.append(single.fit((X, y)).scores((X[:2], y[:2])))
    both = infkit.Influence(task, "identity", checkpoints=[state, other], learning_rates=0.1)
    combined = both.fit((X, y)).scores((X[:2], y[:2]))
    assert relative_error(terms[1], terms[0]) > 0.1
    assert relative_error(combined, terms[0] + terms[1]) < 1e-12


def test_tracincp_over_a_recorded_run_as_the_docs_pass_it(mlp_problem: dict) -> None:
    """docs/methods/identity.md §3: a run's checkpoints but the last, each with the summed
    learning rates of the steps it stands for, against the sum over the run's steps computed
    here from the recorded parameters (every step kept: record_every=1)."""
    (X, y), (Xt, yt), l2 = mlp_problem["train"], mlp_problem["test"], mlp_problem["l2"]
    model = copy.deepcopy(mlp_problem["model"])
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # away from the optimum, so that the run moves
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    task = infkit.Task.classification(model)
    recipe = infkit.Recipe(steps=12, lr=0.3, l2=l2, schedule="cosine", warmup=3)
    every = recipe.train(task, (X, y), record_every=1)
    steps = dict(every.checkpoints)  # theta at every step, and the gradients there

    def term(t: int) -> torch.Tensor:
        at = copy.deepcopy(model)
        torch.nn.utils.vector_to_parameters(steps[t].clone(), at.parameters())
        G, Q = autograd_gradients(at, X, y), autograd_gradients(at, Xt, yt)
        return Q @ (G + l2 * steps[t]).T / 60

    terms = {t: term(t) for t in range(12)}
    # every step, then one checkpoint for several (T = 12: 0, 5, 10, 12), then None: theta_0
    # and the final parameters, as Recipe.train says (it kept the final alone, and the docs'
    # rates had no checkpoint to pair with: "checkpoints is empty")
    for c in (1, 4, 5, None):
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(every.initial.clone(), model.parameters())
        run = recipe.train(task, (X, y), record_every=c)
        pairs = run.checkpoints
        checkpoints = [theta for _, theta in pairs[:-1]]
        rates = [
            sum(run.recipe.learning_rate(t) for t in range(s, s_next))
            for (s, _), (s_next, _) in zip(pairs, pairs[1:])  # noqa: RUF007 (the docs' code)
        ]
        inf = infkit.Influence(
            task, "identity", l2=l2, checkpoints=checkpoints, learning_rates=rates
        )
        S = inf.fit((X, y)).scores((Xt, yt))
        span = 12 if c is None else c
        starts = list(range(0, 12, span))
        assert [s for s, _ in pairs] == [*starts, 12]
        expected = sum(
            sum(recipe.learning_rate(t) for t in range(s, min(s + span, 12))) * terms[s]
            for s in starts
        )
        assert relative_error(S, expected) < 1e-12
    for bad in (0, -2, 2.5):  # (0: a raw ZeroDivisionError; -2 a schedule of no meaning)
        with pytest.raises(
            InvalidInputError, match=f"record_every must be an integer >= 1, got {bad}"
        ):
            recipe.train(task, (X, y), record_every=bad)
