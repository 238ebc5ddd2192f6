"""Per-example gradients and Jacobians against plain autograd, data forms, frozen parameters."""

from __future__ import annotations

import pytest
import torch
from conftest import small_mlp
from torch.utils.data import Dataset

import infkit
from infkit.data import ExampleSet
from infkit.gradients import PerExample
from infkit.parameters import ParameterSpace


def _autograd_rows(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(X)):
        loss = torch.nn.functional.cross_entropy(model(X[i : i + 1]), y[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_vmap_gradients_and_jacobians_match_autograd() -> None:
    model = small_mlp()
    X = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    task = infkit.Task.classification(model)
    engine = PerExample(task, ParameterSpace(model), mode="vmap")
    batch = ExampleSet((X, y)).take(range(9))
    torch.testing.assert_close(
        engine.grads(batch), _autograd_rows(model, X, y), rtol=1e-12, atol=1e-14
    )
    J = engine.jacobians(batch)
    for i in range(3):
        ref = torch.autograd.functional.jacobian(
            lambda *ps, x=X[i : i + 1]: torch.func.functional_call(
                model, dict(zip([n for n, _ in model.named_parameters()], ps)), (x,)
            )[0],
            tuple(model.parameters()),
        )
        torch.testing.assert_close(J[i], torch.cat([r.reshape(3, -1) for r in ref], dim=1))
    _, g, lam = engine.output_derivatives(batch)
    p = torch.softmax(model(X), dim=1).detach()
    torch.testing.assert_close(g, p - torch.nn.functional.one_hot(y, 3).double())
    torch.testing.assert_close(lam, torch.diag_embed(p) - p[:, :, None] * p[:, None, :])


class ItemInForward(torch.nn.Module):
    """Data-dependent Python control flow (per-example consistent): vmap cannot trace ``.item()``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = small_mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 2.0 if bool((x.abs() < 1e6).all().item()) else 1.0
        return self.net(x * scale)


def test_untraceable_module_falls_back_to_an_exact_loop() -> None:
    model = ItemInForward()
    X = torch.randn(6, 5, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    task = infkit.Task.classification(model)
    engine = PerExample(task, ParameterSpace(model))
    batch = ExampleSet((X, y)).take(range(6))
    with pytest.warns(RuntimeWarning, match="falling back to an exact per-example loop"):
        G = engine.grads(batch)
    torch.testing.assert_close(G, _autograd_rows(model, X, y), rtol=1e-12, atol=1e-14)
    J = engine.jacobians(batch)
    assert J.shape == (6, 3, ParameterSpace(model).size)
    torch.testing.assert_close(
        torch.einsum("bcp,bc->bp", J, engine.output_derivatives(batch)[1]), G
    )


class DictDataset(Dataset):
    """Hugging Face style items: a dict with the model's keyword inputs and ``labels``."""

    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"features": self.X[i], "labels": self.y[i]}


class KeywordModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = small_mlp()

    def forward(self, features: torch.Tensor):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.net(features))  # like a transformers ModelOutput


class PairDataset(Dataset):
    def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.X[i], self.y[i]


def test_every_data_form_gives_the_same_scores(mlp_problem: dict) -> None:
    (X, y), (Xt, yt), l2 = mlp_problem["train"], mlp_problem["test"], mlp_problem["l2"]
    reference = (
        infkit.Influence(mlp_problem["task"], l2=l2, batch_size=16).fit((X, y)).scores((Xt, yt))
    )
    pairs = infkit.Influence(mlp_problem["task"], l2=l2, batch_size=16).fit(PairDataset(X, y))
    torch.testing.assert_close(pairs.scores(PairDataset(Xt, yt)), reference, rtol=1e-10, atol=1e-14)
    keyword = KeywordModel()
    keyword.net.load_state_dict(mlp_problem["model"].state_dict())
    task = infkit.Task.classification(keyword)
    dicts = infkit.Influence(task, l2=l2, batch_size=16).fit(DictDataset(X, y))
    S = dicts.scores(DictDataset(Xt, yt))
    assert S.dtype == torch.float64
    torch.testing.assert_close(S, reference, rtol=1e-10, atol=1e-14)
    # A plain list of two examples is two examples, not an (X, y) pair.
    two = [{"features": Xt[i], "labels": yt[i]} for i in range(2)]
    torch.testing.assert_close(dicts.scores(two), reference[:2], rtol=1e-10, atol=1e-14)
    keyword_pair = ({"features": Xt[:2]}, yt[:2])
    torch.testing.assert_close(dicts.scores(keyword_pair), reference[:2], rtol=1e-10, atol=1e-14)


def test_frozen_parameters_are_constants(mlp_problem: dict) -> None:
    """Freezing the first layer: P counts the head only, and scores equal a head-only model."""
    (X, y), (Xt, yt), l2 = mlp_problem["train"], mlp_problem["test"], mlp_problem["l2"]
    import copy

    model = copy.deepcopy(mlp_problem["model"])
    for p in model[0].parameters():
        p.requires_grad_(False)
    task = infkit.Task.classification(model)
    infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-12)
    inf = infkit.Influence(task, l2=l2).fit((X, y))
    assert inf.n_params == 8 * 3 + 3
    assert inf.remove([0]).params.shape == (27,)
    # The same model as a linear head on fixed features.
    with torch.no_grad():
        H, Ht = model[1](model[0](X)), model[1](model[0](Xt))
    head = torch.nn.Linear(8, 3).double()
    head.load_state_dict(model[2].state_dict())
    ref = infkit.Influence(infkit.Task.classification(head), l2=l2).fit((H, y)).scores((Ht, yt))
    torch.testing.assert_close(inf.scores((Xt, yt)), ref, rtol=1e-9, atol=1e-13)


def test_float32_model_computes_in_float32_and_returns_float32() -> None:
    model = small_mlp().float()
    X, y = torch.randn(20, 5), torch.randint(0, 3, (20,))
    task = infkit.Task.classification(model)
    infkit.train_to_optimum(task, (X, y), 1e-1, tolerance=1e-6)
    engine = PerExample(task, ParameterSpace(model))
    assert engine.grads(ExampleSet((X, y)).take([0, 1])).dtype == torch.float32
    S = infkit.Influence(task, l2=1e-1).fit((X, y)).scores((X[:3], y[:3]))
    assert S.dtype == torch.float32 and S.shape == (3, 20)
