"""Analyses on the Kronecker eigenbasis: LayerIF, KFE features / dataset similarity, and the
memorisation score and curvature edit (docs/analyses.md §1, §4-§5)."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

import infkit
from infkit.analyses.layer_quality import layer_quality
from infkit.analyses.memorisation import (
    curvature_edit,
    curvature_mask,
    memorisation_loss_change,
    memorisation_scores,
)
from infkit.analyses.similarity import (
    dataset_embedding,
    dataset_similarity,
    fisher_kernel,
    kfe_features,
)
from infkit.errors import InvalidInputError, UnsupportedError
from infkit.evaluate import relative_error
from infkit.influence import TopK

pytestmark = pytest.mark.filterwarnings("ignore:the model is not at a stationary point")


@pytest.fixture(scope="module")
def problem() -> dict:
    torch.manual_seed(4)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 10), torch.nn.Tanh(), torch.nn.Linear(10, 4)
    ).double()
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(80, 6, generator=gen, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + 2 * (X[:, 1] > 0.3).long()
    task = infkit.Task.classification(model)
    infkit.train_to_optimum(task, (X[:60], y[:60]), 1e-2, max_iter=60, newton_polish=0)
    inf = infkit.Influence(task, "ekfac", l2=0.0, damping=1e-2).fit((X[:60], y[:60]))
    return {"inf": inf, "train": (X[:60], y[:60]), "val": (X[60:], y[60:]), "model": model}


def test_layer_quality_decomposes_the_validation_influence(problem: dict) -> None:
    inf, val = problem["inf"], problem["val"]
    quality = layer_quality(inf, val)
    assert quality.layers == ["0", "2"]
    assert quality.influence.shape == (2, 60)
    # Per-layer influences sum to the removal effect on the mean validation loss.
    total = inf.scores(val).mean(0)
    assert relative_error(quality.influence.sum(0), total) < 1e-10
    assert torch.allclose(quality.helpful - quality.harmful, quality.influence.sum(1))
    assert bool((quality.helpful >= 0).all() and (quality.harmful >= 0).all())
    budget = quality.allocate(10, by="helpful", minimum=1)
    assert sum(budget.values()) == 10 and min(budget.values()) >= 1
    shares = quality.shares("helpful")
    assert float(shares.sum()) == pytest.approx(1.0)
    heavier = int(shares.argmax())
    assert budget[quality.layers[heavier]] >= budget[quality.layers[1 - heavier]]
    with pytest.raises(InvalidInputError, match="by must be"):
        quality.allocate(4, by="quality")
    # a tester's: a negative minimum gave a layer -4, a total of 7.5 budgets summing to 7
    with pytest.raises(InvalidInputError, match=r"minimum must be an integer >= 0, got -5"):
        quality.allocate(0, by="helpful", minimum=-5)
    with pytest.raises(InvalidInputError, match=r"total must be an integer >= 0, got 7\.5"):
        quality.allocate(7.5, by="helpful")  # type: ignore[arg-type]
    assert sum(quality.allocate(np.int64(7), by="helpful").values()) == 7  # type: ignore[arg-type]


def test_layer_quality_reads_a_margin_as_higher_is_better(problem: dict) -> None:
    """For a margin (higher is better) a positive removal effect means the example hurt: the
    helpful sum is over the negative parts (the model is away from its optimum: the fixture's
    l2 differs from the influence's, so help and harm differ). It summed the positive parts,
    the harm, as help."""
    inf = problem["inf"]
    margin_task = infkit.Task.classification(problem["model"], measurement="margin")
    margin = infkit.Influence(margin_task, "ekfac", l2=0.0, damping=1e-2).fit(problem["train"])
    quality = layer_quality(margin, problem["val"])
    assert relative_error(quality.influence.sum(0), margin.scores(problem["val"]).mean(0)) < 1e-10
    # independent reading: each example's help is minus its removal effect on the margin
    helped = -quality.influence
    assert torch.allclose(quality.helpful, helped.clamp_min(0).sum(1))
    assert torch.allclose(quality.harmful, (-helped).clamp_min(0).sum(1))
    assert torch.allclose(quality.net, -quality.influence.sum(1))
    # the example with the most help is top_k's first proponent of the mean validation margin
    mean_margin = margin.scores(problem["val"]).mean(0, keepdim=True)
    top = TopK.of(mean_margin, 1, margin_task.higher_is_better)
    assert int(helped.sum(0).argmax()) == int(top.proponent_indices[0, 0])
    # and for the loss the helpful sum is that of the positive parts, as before
    loss_quality = layer_quality(inf, problem["val"])
    assert torch.allclose(loss_quality.helpful, loss_quality.influence.clamp_min(0).sum(1))


def test_shares_by_net_refuse_the_rounding_an_optimum_leaves(problem: dict) -> None:
    """At the optimum of the objective the influence is fitted with, every layer's net effect
    is 0 to rounding (helpful = harmful): shares by 'net' would split noise, and refuse."""
    X, y = problem["train"]
    model = copy.deepcopy(problem["model"])
    task = infkit.Task.classification(model)
    assert infkit.train_to_optimum(task, (X, y), 1e-2, tolerance=1e-12).converged
    quality = layer_quality(infkit.Influence(task, "exact", l2=1e-2).fit((X, y)), problem["val"])
    assert float(quality.net.abs().max()) < 1e-10 * float(quality.helpful.sum())
    for call in (lambda: quality.shares("net"), lambda: quality.allocate(10, by="net")):
        with pytest.raises(InvalidInputError, match="at rounding level"):
            call()
    # in float32 the optimum is reached to float32's precision: a net effect of about 1e-4 of
    # the sums is that rounding too (the 1e-8 of float64 read it as a ranking)
    model32 = copy.deepcopy(problem["model"]).float()
    task32 = infkit.Task.classification(model32)
    infkit.train_to_optimum(task32, (X.float(), y), 1e-2, warn_unconverged=False)
    quality32 = layer_quality(
        infkit.Influence(task32, "exact", l2=1e-2).fit((X.float(), y)),
        (problem["val"][0].float(), problem["val"][1]),
    )
    share = float(quality32.net.abs().max()) / float(quality32.helpful.sum())
    assert 1e-8 < share < quality32.noise, share
    with pytest.raises(InvalidInputError, match="at rounding level"):
        quality32.shares("net")
    assert sum(quality.allocate(10, by="helpful").values()) == 10
    # away from it (the fixture's model fitted with another l2) every layer's net effect is
    # negative here: no shares either (they were an even split), said as such
    away = layer_quality(problem["inf"], problem["val"])
    assert bool((away.net < -1e-3 * away.helpful.sum()).all())
    with pytest.raises(InvalidInputError, match="no layer has a positive net effect"):
        away.shares("net")


def test_kfe_features_reproduce_the_ekfac_scores(problem: dict) -> None:
    inf, train, val = problem["inf"], problem["train"], problem["val"]
    phi_val, phi_train = kfe_features(inf, val), kfe_features(inf, train)
    assert relative_error(phi_val @ phi_train.T / 60, inf.scores(val)) < 1e-10
    assert relative_error(fisher_kernel(inf, val, train), phi_val @ phi_train.T) < 1e-12
    sparse = kfe_features(inf, val, top_k=5)
    assert bool(((sparse != 0).sum(1) == 5).all())
    kept = sparse != 0
    assert torch.equal(sparse[kept], phi_val[kept])
    with pytest.raises(InvalidInputError, match=r"top_k must be an integer >= 1, got 2\.5"):
        kfe_features(inf, val, top_k=2.5)  # type: ignore[arg-type]


def test_dataset_similarity(problem: dict) -> None:
    inf, (X, y) = problem["inf"], problem["train"]
    method = inf.method.kronecker()
    # The second moment of the training set in the fit's own curvature is the EK-FAC Lambda.
    nu = dataset_embedding(inf, (X, y), kind="second_moment")
    lam = torch.cat([method.factors.modules[t.name].Lambda.reshape(-1) for t in method.tracked])
    assert relative_error(nu, lam) < 1e-10
    a, b = (X[:30], y[:30]), (X[30:], y[30:])
    for kind in ("profile", "second_moment", "gradient_second_moment", "mean"):
        assert dataset_similarity(inf, a, a, kind) == pytest.approx(1.0, abs=1e-12)
        ab, ba = dataset_similarity(inf, a, b, kind), dataset_similarity(inf, b, a, kind)
        assert ab == pytest.approx(ba, abs=1e-12) and -1 <= ab <= 1
    # A dataset and itself twice have the same profile.
    doubled = (torch.cat([X[:30], X[:30]]), torch.cat([y[:30], y[:30]]))
    assert dataset_similarity(inf, a, doubled) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(InvalidInputError, match="kind"):
        dataset_embedding(inf, a, kind="task2vec")


def test_sampled_fisher_similarity_does_not_depend_on_order_or_batches(problem: dict) -> None:
    # each example draws its labels by its own inputs: a set against itself reordered, doubled
    # or in other batches is 1, and a set's second moment is the mean of its members' (a
    # tester's shuffled copy of a set scored 0.96, below random tokens at 0.975)
    (X, y), model = problem["train"], problem["model"]
    inf = infkit.Influence(
        infkit.Task.classification(model), "ekfac", damping=1e-2, fisher="sampled", batch_size=7
    ).fit((X, y))
    a = (X[:30], y[:30])
    order = torch.randperm(30, generator=torch.Generator().manual_seed(0))
    shuffled = (X[:30][order], y[:30][order])
    doubled = (torch.cat([X[:30], X[:30]]), torch.cat([y[:30], y[:30]]))
    for kind in ("profile", "second_moment"):
        for other in (shuffled, doubled):
            assert dataset_similarity(inf, a, other, kind) == pytest.approx(1.0, abs=1e-12)
    single = torch.stack(
        [dataset_embedding(inf, (X[i : i + 1], y[i : i + 1]), "second_moment") for i in range(30)]
    )
    assert relative_error(dataset_embedding(inf, a, "second_moment"), single.mean(0)) < 1e-12


def test_curvature_mask_and_edit_against_a_direct_construction(problem: dict) -> None:
    inf, train = problem["inf"], problem["train"]
    method = inf.method.kronecker()
    t = method.tracked[0]
    f = method.factors.modules[t.name]
    pi = torch.outer(f.eig_s, f.eig_a)
    keep = curvature_mask(inf, t.name, keep_mass=0.8)
    # Minimal and sufficient: the kept products are the largest, reach 80%, and one fewer does not.
    assert float(pi[keep].sum()) >= 0.8 * float(pi.sum())
    assert float(pi[keep].min()) >= float(pi[~keep].max())
    assert float(pi[keep].sum() - pi[keep].min()) < 0.8 * float(pi.sum())
    edited = curvature_edit(inf, keep_mass=0.8)
    W = torch.cat([problem["model"][0].weight, problem["model"][0].bias.unsqueeze(1)], 1).detach()
    expected = f.QS @ ((f.QS.T @ W @ f.QA) * keep) @ f.QA.T
    got = torch.cat([edited[0].weight, edited[0].bias.unsqueeze(1)], 1).detach()
    assert relative_error(got, expected) < 1e-12
    assert not torch.equal(problem["model"][0].weight, edited[0].weight)  # a copy was edited
    # one layer's name: that layer alone (a tester's "0" was read as a list of characters, so
    # "02" edited both layers)
    one = curvature_edit(inf, keep_mass=0.8, layers="0")
    assert torch.equal(one[0].weight, edited[0].weight)
    assert torch.equal(one[2].weight, problem["model"][2].weight)
    with pytest.raises(InvalidInputError, match=r"layers \['02'\] are not tracked"):
        curvature_edit(inf, keep_mass=0.8, layers="02")
    # keep_mass = 1 keeps everything; memorisation shares are 0, the loss does not change.
    same = curvature_edit(inf, keep_mass=1.0)
    assert relative_error(same[2].weight.detach(), problem["model"][2].weight.detach()) < 1e-12
    assert float(memorisation_scores(inf, train, keep_mass=1.0).abs().max()) < 1e-12
    assert float(memorisation_loss_change(inf, train, keep_mass=1.0).abs().max()) < 1e-10
    m = memorisation_scores(inf, train, keep_mass=0.5)
    assert m.shape == (60,) and bool(((m >= 0) & (m <= 1)).all())
    per_layer = memorisation_scores(inf, train, keep_mass=0.5, per_layer=True)
    assert set(per_layer) == {"0", "2"}
    assert memorisation_loss_change(inf, train, keep_mass=0.3).shape == (60,)
    # a tester's: a keep_mass not a number and an unknown layer were raw TypeError / KeyError
    for rho in ("0.8", None, 1.5, float("nan"), True):
        message = rf"keep_mass must be a number in \[0, 1\].*got {re.escape(repr(rho))}"
        for function, args in (
            (curvature_mask, (inf, t.name, rho)),
            (curvature_edit, (inf, rho)),
            (memorisation_scores, (inf, train, rho)),
            (memorisation_loss_change, (inf, train, rho)),
        ):
            with pytest.raises(InvalidInputError, match=message):
                function(*args)
    assert torch.equal(curvature_mask(inf, t.name, np.float32(0.8)), keep)
    with pytest.raises(
        InvalidInputError, match=r"layer 'zz' is not tracked; tracked: \['0', '2'\]"
    ):
        curvature_mask(inf, "zz", 0.5)
    with pytest.raises(InvalidInputError, match=r"layer \['0'\] is not tracked; tracked"):
        curvature_mask(inf, ["0"], 0.5)  # type: ignore[arg-type]
    for wrong in (0, ["0", 2], b"0", [], set(), np.array([])):
        with pytest.raises(InvalidInputError, match=r"layers must be a tracked layer's name or"):
            curvature_edit(inf, 0.5, layers=wrong)  # type: ignore[arg-type]
    # (a reviewer's: any collection of names, as the list before; the per-layer shares' keys)
    for names in (
        per_layer,
        per_layer.keys(),
        {"0", "2"},
        (n for n in ("0", "2")),
        np.array(["0", "2"]),
    ):
        assert torch.equal(curvature_edit(inf, 0.8, layers=names)[2].weight, edited[2].weight)
    assert torch.equal(curvature_edit(inf, 0.8, layers=np.array("0"))[0].weight, one[0].weight)
    # refused before the data are read (a reviewer's: the data's own error came first)
    with pytest.raises(InvalidInputError, match=r"keep_mass must be a number"):
        memorisation_scores(inf, "not data", "0.8")
    for function in (memorisation_scores, memorisation_loss_change):
        with pytest.raises(InvalidInputError, match=r"eigenvalues must be one of"):
            function(inf, "not data", 0.8, "kfc")


def test_analyses_need_a_kronecker_method(problem: dict) -> None:
    task = infkit.Task.classification(problem["model"])
    exact = infkit.Influence(task, "exact", damping=1e-2).fit(problem["train"])
    with pytest.raises(
        UnsupportedError,
        match=r"Kronecker-factored curvature.*methods that do: 'astra', 'ekfac', 'kfac'",
    ):
        kfe_features(exact, problem["val"])
    assert layer_quality(exact, problem["val"]).layers == ["0", "2"]  # any primal method
