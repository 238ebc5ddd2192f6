"""method="ekfac": eigenvalues against the explicit per-example GGN (docs/testing.md §5, docs/methods/kfac.md §6)."""

from __future__ import annotations

import shutil
import warnings
from functools import partial

import pytest
import torch
from kfac_helpers import (
    TinySequenceModel,
    conv_problem,
    explicit_ggn,
    linear_block_index,
    sequence_data,
    sequence_loss,
    shared_input_problem,
    signal_problem,
)

import infkit
from infkit.errors import ArtifactError, ArtifactRemovedError, Notice
from infkit.evaluate import relative_error
from infkit.memory import default_memory_limit
from infkit.store import TensorFile
from infkit.task import _cross_entropy

pytestmark = pytest.mark.filterwarnings("ignore:the model is not at a stationary point")


def kfe_diagonal(G: torch.Tensor, QS: torch.Tensor, QA: torch.Tensor) -> torch.Tensor:
    """diag((Q_S (x) Q_A)^T G (Q_S (x) Q_A)), the GGN block's diagonal in the eigenbasis."""
    K = torch.kron(QS, QA)
    return torch.diagonal(K.T @ G @ K).reshape(QS.shape[0], QA.shape[0])


def sequence_problem(conv1d: bool = True) -> dict:
    torch.manual_seed(5)
    model = TinySequenceModel(conv1d=conv1d).double()
    task = infkit.Task(model, sequence_loss, name="tokens")
    return {"model": model, "task": task, "train": sequence_data(n=20)}


def _layers(model: torch.nn.Module) -> list[tuple[str, bool]]:
    out = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d)):
            out.append((name, False))
        elif type(module).__name__ == "Conv1D":
            out.append((name, True))
    return out


def dense_ekfac(
    model: torch.nn.Module, inf: infkit.Influence, X: torch.Tensor, y: torch.Tensor, ridge: float
) -> torch.Tensor:
    """The dense EK-FAC curvature [P, P] of a classifier: per layer block, the fitted
    eigenbasis ``Q_S (x) Q_A`` with the explicit GGN's diagonal in it, plus ``ridge I``."""
    method = inf.method.kronecker()
    G = explicit_ggn(model, _cross_entropy, X, y, len(y))
    H = ridge * torch.eye(G.shape[0], dtype=torch.float64)
    for name, transposed in _layers(model):
        idx = linear_block_index(model, name, transposed)
        f = method.factors.modules[name]
        K = torch.kron(f.QS, f.QA)
        lam = kfe_diagonal(G[idx][:, idx], f.QS, f.QA).reshape(-1)
        H[idx[:, None], idx[None, :]] += K @ torch.diag(lam) @ K.T
    return H


def per_example_gradients(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """[N, P] cross-entropy gradients, one backward per example (autograd, no hooks)."""
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        _cross_entropy(model(X[i : i + 1]), y[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


@pytest.mark.parametrize("fisher", ["ggn", "empirical"])
@pytest.mark.parametrize(
    "which", ["one_layer", "mlp", "conv", "signal", "sequence", "shared_input"]
)
def test_ekfac_eigenvalues_are_the_ggn_diagonal_in_the_eigenbasis(
    which: str, fisher: str, wine_logreg: dict, mlp_problem: dict
) -> None:
    problem = {
        "one_layer": wine_logreg,
        "mlp": mlp_problem,
        "conv": conv_problem(),
        "signal": signal_problem(),
        "sequence": sequence_problem(),
        "shared_input": shared_input_problem(),
    }[which]
    model, task, (X, y) = problem["model"], problem["task"], problem["train"]
    loss = sequence_loss if which == "sequence" else _cross_entropy
    n = len(y)
    inf = infkit.Influence(task, "ekfac", l2=1e-3, fisher=fisher, batch_size=16).fit((X, y))
    method = inf.method.kronecker()
    G = explicit_ggn(model, loss, X, y, n, empirical=fisher == "empirical")
    layers = _layers(model)
    assert [t.name for t in method.tracked] == [name for name, _ in layers]
    for name, transposed in layers:
        idx = linear_block_index(model, name, transposed)
        block = G[idx][:, idx]
        f = method.factors.modules[name]
        expected = kfe_diagonal(block, f.QS, f.QA)
        assert relative_error(f.Lambda, expected) < 1e-10, name
        # The eigenvalues carry the GGN's scale: their sum is the block's trace.
        assert float(f.Lambda.sum()) == pytest.approx(float(torch.trace(block)), rel=1e-10)


def test_layers_reading_one_input_share_its_factor_and_eigenbasis(tmp_path) -> None:
    """q, k (same input, both with a bias) share A and its eigenbasis; v (no bias: other
    augmented activations) and the gated MLP's gate and up have theirs; the shared factor is
    the hand-written mean of a a^T; saved and reloaded factors score the same."""
    problem = shared_input_problem()
    task, (X, y) = problem["task"], problem["train"]
    options = {"l2": 1e-3, "damping": 1e-3, "fisher": "ggn", "batch_size": 8}
    inf = infkit.Influence(task, "ekfac", factors_dir=tmp_path, **options).fit((X, y))
    f = inf.method.kronecker().factors.modules
    ones = torch.ones(len(y), 1, dtype=torch.float64)
    a = torch.cat([X, ones], 1)
    assert relative_error(f["q"].A, a.T @ a / len(y)) < 1e-12
    assert relative_error(f["v"].A, X.T @ X / len(y)) < 1e-12
    assert f["q"].QA is f["k"].QA and f["q"].eig_a is f["k"].eig_a
    assert f["gate"].QA is f["up"].QA
    assert f["v"].QA is not f["q"].QA and f["v"].QA.shape != f["q"].QA.shape
    assert not torch.equal(f["q"].S, f["k"].S)  # the output sides stay their own
    S1 = inf.scores((X[:4], y[:4]))
    again = infkit.Influence(task, "ekfac", factors_dir=tmp_path, **options).fit((X, y))
    assert again.method.kronecker().loaded
    assert relative_error(again.scores((X[:4], y[:4])), S1) < 1e-12


def test_a_bounded_fit_reads_its_eigenbases_back_from_the_committed_stage(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a memory_limit, with a store, the eigenvalue pass reads each layer's eigenbases
    back from the K-FAC stage it has just committed instead of holding them all: the factors
    and scores of the fit that holds them, layers sharing an input sharing their eigenbasis
    again afterwards, a shared input's basis read once per batch."""
    problem = shared_input_problem()
    task, (X, y) = problem["task"], problem["train"]
    options = {"l2": 1e-3, "damping": 1e-3, "fisher": "sampled", "batch_size": 8}
    reads: list[str] = []
    real = TensorFile.get

    def counted(file: TensorFile, name: str) -> torch.Tensor:
        reads.append(name)
        return real(file, name)

    monkeypatch.setattr(TensorFile, "get", counted)
    held = infkit.Influence(task, "ekfac", factors_dir=tmp_path / "held", **options).fit((X, y))
    assert reads == []  # without a limit: in memory
    limit = default_memory_limit() // 2
    bounded = infkit.Influence(
        task, "ekfac", factors_dir=tmp_path / "bounded", memory_limit=limit, **options
    ).fit((X, y))
    batches = -(-len(y) // 8)
    # each batch: every layer's Q_S, and Q_A once per input (q for q and k, gate for gate and
    # up); then once more each, to put them back
    assert reads.count("q::QS") == reads.count("k::QS") == batches + 1
    assert reads.count("q::QA") == reads.count("gate::QA") == batches + 1
    assert reads.count("k::QA") == reads.count("up::QA") == 0
    f, g = (i.method.kronecker().factors.modules for i in (held, bounded))
    for name in f:
        for key in ("QA", "QS", "Lambda"):
            torch.testing.assert_close(getattr(g[name], key), getattr(f[name], key))
    assert g["q"].QA is g["k"].QA and g["gate"].QA is g["up"].QA
    S = held.scores((X[:4], y[:4]))
    assert relative_error(bounded.scores((X[:4], y[:4])), S) < 1e-10
    # the plan foresees it: the pass holds the largest layer's eigenbases, not every layer's
    plans = [
        infkit.Influence(task, "ekfac", factors_dir=tmp_path / "plan", **extra, **options).plan(
            (X, y), timed=False
        )
        for extra in ({}, {"memory_limit": limit})
    ]
    free, tight = ({s.name: s for s in plan.stages}["eigenvalue correction"] for plan in plans)
    assert "read back from the committed K-FAC stage" in tight.note
    assert "read back" not in free.note and tight.bytes < free.bytes


def test_a_stage_another_run_replaces_mid_pass_gives_way_to_its_final_factors(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two runs sharing a workdir under a memory_limit: the faster one committed the final
    factors and removed the K-FAC stage the other's eigenvalue pass was reading its eigenbases
    from, which then failed telling the user to delete an intact file (a tester's, both of two
    tries). The slower run uses the committed factors (the store's rule: the first commit
    wins), and scores as the faster one did."""
    problem = shared_input_problem()
    task, (X, y) = problem["task"], problem["train"]
    options = {"l2": 1e-3, "damping": 1e-3, "fisher": "sampled", "batch_size": 8}
    limit = default_memory_limit() // 2
    first = infkit.Influence(
        task, "ekfac", factors_dir=tmp_path / "first", memory_limit=limit, **options
    ).fit((X, y))
    (committed,) = [p for p in (tmp_path / "first").iterdir() if not p.name.startswith(".")]
    shared = tmp_path / "shared"
    real = TensorFile.get
    raced: list[str] = []

    def meanwhile(file: TensorFile, name: str) -> torch.Tensor:
        if not raced:  # the other run finishes now: its final factors in, the stage out
            raced.append(name)
            shutil.copytree(committed, shared / committed.name)
            shutil.rmtree(file.path.parent)
        return real(file, name)

    monkeypatch.setattr(TensorFile, "get", meanwhile)
    second = infkit.Influence(task, "ekfac", factors_dir=shared, memory_limit=limit, **options).fit(
        (X, y)
    )
    assert raced and second.describe()["factors_loaded"]
    test = (X[:4], y[:4])
    assert torch.equal(second.scores(test), first.scores(test))
    # a file that was never there is not taken for one another run removed
    with pytest.raises(ArtifactError, match="it does not exist") as missing:
        TensorFile(tmp_path / "nowhere.safetensors")
    assert not isinstance(missing.value, ArtifactRemovedError)


@pytest.mark.parametrize("which", ["mlp", "signal"])
def test_ekfac_scores_equal_the_dense_ekfac_curvature(which: str, mlp_problem: dict) -> None:
    """The whole pipeline against a dense matrix built from the explicit GGN's KFE diagonal: a
    tanh MLP, and a 1-D convolutional network (``nn.Conv1d`` with padding, dilation, stride)."""
    problem = mlp_problem if which == "mlp" else signal_problem()
    model, task, train, test = (problem[k] for k in ("model", "task", "train", "test"))
    l2, damping = problem["l2"], 1e-3
    X, y = train
    inf = infkit.Influence(task, "ekfac", l2=l2, damping=damping).fit(train)
    H = dense_ekfac(model, inf, X, y, l2 + damping)
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    grads = partial(per_example_gradients, model)
    Q, V = grads(*test), grads(X, y) + l2 * theta
    expected = torch.linalg.solve(H, Q.T).T @ V.T / len(y)
    assert relative_error(inf.scores(test), expected) < 1e-10


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_damping_heuristic_is_a_tenth_of_the_mean_eigenvalue_per_module(
    mlp_problem: dict, method: str
) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    damping = 1e-4
    inf = infkit.Influence(task, method, l2=l2, damping=damping, damping_scale="auto").fit(train)
    m = inf.method.kronecker()
    assert m.options.module_damping_scale == 0.1
    V = torch.randn(4, inf.n_params, dtype=torch.float64)
    out = m.solve(V)
    for t in m.tracked:
        f = m.factors.modules[t.name]
        lam = f.Lambda if method == "ekfac" else torch.outer(f.eig_s, f.eig_a)
        assert m.module_damping[t.name] == pytest.approx(0.1 * float(lam.mean()), rel=1e-12)
        K = torch.kron(f.QS, f.QA)
        ridge = l2 + damping + 0.1 * float(lam.mean())
        dense = K @ torch.diag(lam.reshape(-1) + ridge) @ K.T
        idx = m.layers.layout.flat_index(t)
        expected = torch.linalg.solve(dense, V[:, idx].T).T
        assert relative_error(out[:, idx], expected) < 1e-10
    # Each module gets its own damping: the two layers' differ.
    values = list(m.module_damping.values())
    assert values[0] != pytest.approx(values[1])
    assert m.describe()["module_damping"] == m.module_damping


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_facade_damping_auto_is_the_per_module_heuristic(mlp_problem: dict, method: str) -> None:
    task, train, l2 = mlp_problem["task"], mlp_problem["train"], mlp_problem["l2"]
    auto = infkit.Influence(task, method, l2=l2, damping="auto").fit(train)
    explicit = infkit.Influence(task, method, l2=l2, damping_scale=0.1).fit(train)
    assert auto.method.options.module_damping_scale == 0.1
    assert auto.describe()["damping"] == "auto"
    test = (train[0][:5], train[1][:5])
    assert relative_error(auto.scores(test), explicit.scores(test)) < 1e-12


def test_damping_auto_is_refused_where_there_is_no_heuristic(mlp_problem: dict) -> None:
    task, train = mlp_problem["task"], mlp_problem["train"]
    for method in ("exact", "astra"):
        with pytest.raises(infkit.errors.UnsupportedError, match="ekfac, kfac"):
            infkit.Influence(task, method, l2=1e-3, damping="auto").fit(train)
    with pytest.raises(infkit.errors.InvalidInputError, match="one or the other"):
        infkit.Influence(task, "ekfac", damping="auto", damping_scale=0.2)
    with pytest.raises(infkit.errors.InvalidInputError, match="or 'auto'"):
        infkit.Influence(task, "ekfac", damping="heuristic")


def test_sampled_fisher_agrees_with_the_exact_ggn_factors(wine_logreg: dict) -> None:
    task, train = wine_logreg["task"], wine_logreg["train"]
    exact = infkit.Influence(task, "ekfac", fisher="ggn", damping=1e-3).fit(train)
    sampled = infkit.Influence(
        task, "ekfac", fisher="sampled", samples=300, seed=1, damping=1e-3
    ).fit(train)
    fe = exact.method.kronecker().factors.modules[""]
    fs = sampled.method.kronecker().factors.modules[""]
    assert relative_error(fs.S, fe.S) < 0.05
    assert relative_error(fs.A, fe.A) < 1e-12  # activations do not depend on labels
    assert exact.method.kronecker().factors.meta["fisher"] == "ggn"
    assert sampled.method.kronecker().factors.meta["fisher"] == "sampled"


def test_fitted_factors_hold_eigendecompositions_only_and_read_format_1(tmp_path) -> None:
    """Each covariance is freed once decomposed: the layers hold Q and eigenvalues (shared
    eigenbases once), A and S are rebuilt from them, a saved file has no covariances, and
    factors written in format 1 (with the covariances) still load and score the same."""
    from infkit.kfac.factors import FORMAT, KroneckerFactors

    problem = shared_input_problem()
    task, (X, y) = problem["task"], problem["train"]
    inf = infkit.Influence(task, "ekfac", l2=1e-3, damping=1e-3, fisher="ggn", batch_size=8)
    inf.fit((X, y))
    factors = inf.method.kronecker().factors
    a = torch.cat([X, torch.ones(len(y), 1, dtype=torch.float64)], 1)
    f = factors.modules["q"]
    assert len(f.stored()) == 5 and f.QA is factors.modules["k"].QA
    assert relative_error(f.A, a.T @ a / len(y)) < 1e-12  # rebuilt from Q_A diag(lambda_A) Q_A^T
    tensors, document = factors.payload()
    assert not [k for k in tensors if k.endswith(("::A", "::S"))] and document["format"] == FORMAT
    # a format-1 file: the same factors and their covariances
    old = dict(tensors)
    for name, m in factors.modules.items():
        old[f"{name}::A"], old[f"{name}::S"] = m.A, m.S
    read = KroneckerFactors.from_payload(old, {**document, "format": 1}, "old.safetensors")
    for name, m in factors.modules.items():
        assert torch.equal(read.modules[name].QS, m.QS)
        assert torch.equal(read.modules[name].Lambda, m.Lambda)
    with pytest.raises(infkit.errors.ArtifactError, match=r"format 3.*reads formats 1, 2"):
        KroneckerFactors.from_payload(tensors, {**document, "format": 3}, "new.safetensors")


def test_theta_snapshot_keeps_the_parameters_dtype() -> None:
    """theta* of a float32 model is kept in float32 (exact: the parameters' own values); what
    is computed from it is float64, and the edited model is theta* + Delta theta."""
    torch.manual_seed(0)
    model = TinySequenceModel()  # float32
    X, y = sequence_data(n=12)
    X = {k: v.float() if v.is_floating_point() else v for k, v in X.items()}
    task = infkit.Task(model, sequence_loss, name="tokens")
    inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2, fisher="empirical").fit((X, y))
    fitted = inf.fitted
    assert fitted.theta.dtype == torch.float32
    assert torch.equal(fitted.theta, fitted.space.flat())
    assert fitted.regularised_theta.dtype == torch.float64
    assert torch.equal(fitted.regularised_theta, fitted.theta.double())
    effect = inf.remove([0, 1])  # results in the model's dtype, as every result
    shift = infkit.parameters.ParameterSpace(effect.model()).flat().double() - fitted.theta.double()
    assert relative_error(shift, effect.params.to(shift)) < 1e-6  # float32 model edit


def test_the_plan_foresees_the_query_groups_of_layers_sharing_an_input() -> None:
    """Layers that read one input (q, k; gate, up) share its eigenbasis in a run; the plan of a
    real model learns which from one forward pass, so over a sweep of memory limits through the
    group boundaries it foresees exactly the scoring passes the run takes, with the same scores."""
    from infkit.kfac.streaming import query_budget

    problem = shared_input_problem(n=24)
    task, (X, y) = problem["task"], problem["train"]
    test = (X[:3], y[:3])
    options = {"l2": 1e-3, "damping": 1e-3, "fisher": "ggn", "batch_size": 4}
    big = 10**9
    ref = infkit.Influence(task, "ekfac", memory_limit=big, **options).fit((X, y))
    # bytes besides the queries (the factors, a pass's working memory, the [3, N] scores)
    base = big - query_budget(ref.fitted, ref.method.kronecker(), 3 * len(X) * 8)
    per_query = ref.fitted.space.size * 8  # float64 model: one query's preconditioned gradient
    S = ref.scores(test)
    seen = set()
    for share in torch.linspace(0.3, 3.3, 11).tolist():
        limit = base + int(share * per_query)
        inf = infkit.Influence(task, "ekfac", memory_limit=limit, **options)
        planned = {s.name: s.passes for s in inf.plan((X, y), test, timed=False).stages}
        inf.fit((X, y))
        assert relative_error(inf.scores(test), S) < 1e-10
        groups = inf.describe()["query_groups"]
        assert groups == planned["scores"]
        seen.add(groups)
    assert len(seen) >= 3  # the sweep crossed group boundaries


class ViewLinear(torch.nn.Linear):
    """A linear layer whose output is a view of the product (a subclass that slices it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[:, :]


class InPlaceModel(torch.nn.Module):
    """Tracked layers whose outputs the model changes in place (VGG's ``ReLU(inplace=True)``
    right after a convolution; a scaling written into a linear layer's output, here a view) and
    a layer called twice. ``in_place=False`` is the same function written without in-place
    operations."""

    def __init__(self, in_place: bool = True) -> None:
        super().__init__()
        self.in_place = in_place
        self.conv = torch.nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.relu = torch.nn.ReLU(inplace=in_place)
        self.inp = torch.nn.Linear(27, 6)
        self.mix = ViewLinear(6, 6)  # its output is a view, changed in place below
        self.out = torch.nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(self.relu(self.conv(x)).flatten(1)))
        h = self.mix(h)
        h = h.mul_(0.5) if self.in_place else h * 0.5
        return self.out(torch.tanh(self.mix(torch.tanh(h))))


def _in_place_problem(in_place: bool = True) -> dict:
    torch.manual_seed(11)
    model = InPlaceModel(in_place).double()
    gen = torch.Generator().manual_seed(12)
    X = torch.randn(24, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (24,), generator=gen)
    return {"model": model, "task": infkit.Task.classification(model), "train": (X, y)}


@pytest.mark.parametrize("streamed", [False, True])
def test_scores_of_layers_changed_in_place_or_called_twice_equal_the_dense_ekfac(
    streamed: bool, tmp_path
) -> None:
    """A tracked layer's output changed in place by the model (an in-place ReLU after a
    convolution, an in-place scaling of a view) must be differentiated at the values the layer
    gave, not at the changed ones; a layer called twice sums its two calls. Against the dense
    EK-FAC curvature built from the explicit GGN and per-example gradients from autograd, for
    the scores and the self-scores (before the fix, the gradients with respect to the ReLU'd and
    halved outputs were taken). Both scoring paths: the training gradients cached (this small
    problem's default) and the streamed passes (a workdir), whose hooks take each layer's
    gradient as the backward reaches it."""
    problem = _in_place_problem()
    model, task, (X, y) = problem["model"], problem["task"], problem["train"]
    damping = 1e-3
    workdir = tmp_path if streamed else None
    inf = infkit.Influence(task, "ekfac", damping=damping, workdir=workdir).fit((X, y))
    H = dense_ekfac(model, inf, X, y, damping)
    grads = partial(per_example_gradients, model)
    test, train = (X[:3], y[:3]), grads(X, y)
    expected = torch.linalg.solve(H, grads(*test).T).T @ train.T / len(y)
    assert relative_error(inf.scores(test), expected) < 1e-10
    expected_self = (torch.linalg.solve(H, train.T).T * train).sum(1) / len(y)
    assert relative_error(inf.self_scores(), expected_self) < 1e-10
    assert (inf.describe().get("query_groups", 0) > 0) == streamed  # the path taken


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_a_model_changing_outputs_in_place_scores_as_its_out_of_place_twin(
    method: str, streamed: bool, tmp_path
) -> None:
    """The same function with and without in-place operations: the same factors, scores and
    self-scores (the factor passes, the scoring pass and the self-score pass all read the
    layers' outputs), with the training gradients cached and streamed (a workdir)."""
    results = []
    for in_place in (True, False):
        problem = _in_place_problem(in_place)
        workdir = tmp_path / str(in_place) if streamed else None
        inf = infkit.Influence(problem["task"], method, damping=1e-3, workdir=workdir)
        inf.fit(problem["train"])
        X, y = problem["train"]
        results.append((inf.scores((X[:4], y[:4])), inf.self_scores()))
        assert (inf.describe().get("query_groups", 0) > 0) == streamed  # the path taken
    assert relative_error(results[0][0], results[1][0]) < 1e-10
    assert relative_error(results[0][1], results[1][1]) < 1e-10


def test_committed_factors_are_set_aside_for_the_scoring_pass_and_read_back_verified(
    tmp_path,
) -> None:
    """With the factors committed (a workdir, or ``factors_dir``) the scoring pass drops the
    in-memory factors (it reads only the preconditioned queries): the scores are those of a run
    without a workdir, the next question reads them back, and factors removed or damaged
    meanwhile are refused, naming the directory, never silently refitted or used."""
    from infkit.errors import ArtifactError
    from infkit.kfac.streaming import factor_bytes

    problem = shared_input_problem()
    task, (X, y) = problem["task"], problem["train"]
    kept = infkit.Influence(task, "ekfac", damping=1e-3).fit((X, y))
    inf = infkit.Influence(task, "ekfac", damping=1e-3, workdir=tmp_path / "f").fit((X, y))
    curvature = inf.method.kronecker()
    assert curvature.sets_aside and not kept.method.kronecker().sets_aside
    test = (X[:4], y[:4])
    expected = kept.scores(test)
    held = factor_bytes(curvature)
    assert relative_error(inf.scores(test), expected) < 1e-10
    assert curvature._factors is None  # set aside after the pass
    assert inf.describe()["fisher"] == kept.describe()["fisher"]  # without reading them back
    assert curvature._factors is None
    assert relative_error(inf.self_scores(), kept.self_scores()) < 1e-10  # read back
    assert curvature._factors is not None
    assert factor_bytes(curvature) == held  # the layers sharing an input share again
    other = (X[4:9], y[4:9])  # a pass of its own (the first call's result is committed)
    assert relative_error(inf.scores(other), kept.scores(other)) < 1e-10
    # damaged on disk while set aside: refused at the next use
    curvature.set_aside()
    [payload] = (tmp_path / "f").glob("kronecker-factors-*/tensors.safetensors")
    data = bytearray(payload.read_bytes())
    data[-8:] = bytes(8)
    payload.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=str(tmp_path / "f")):
        inf.self_scores()
    import shutil

    shutil.rmtree(tmp_path / "f")
    with pytest.raises(ArtifactError, match="removed"):
        inf.self_scores()


def test_kfac_factors_set_aside_are_read_back_after_an_ekfac_fit_replaced_them(tmp_path) -> None:
    """An EK-FAC fit in the same directory resumes from K-FAC's committed factors (its first
    stage) and replaces them by its own, which hold the same eigenbases: a K-FAC run whose
    factors were set aside reads them back from there, with the same scores."""
    problem = shared_input_problem()
    task, (X, y) = problem["task"], problem["train"]
    kfac = infkit.Influence(task, "kfac", damping=1e-3, workdir=tmp_path).fit((X, y))
    first = kfac.scores((X[:3], y[:3]))
    assert kfac.method.kronecker()._factors is None
    ekfac = infkit.Influence(task, "ekfac", damping=1e-3, workdir=tmp_path).fit((X, y))
    assert ekfac.method.kronecker().resumed
    again = kfac.scores((X[3:6], y[3:6]))  # reads the factors back: K-FAC's are gone
    reference = infkit.Influence(task, "kfac", damping=1e-3).fit((X, y))
    assert relative_error(again, reference.scores((X[3:6], y[3:6]))) < 1e-10
    assert relative_error(first, reference.scores((X[:3], y[:3]))) < 1e-10


def test_a_splits_larger_result_is_named_when_it_lowers_the_queries_rank() -> None:
    """A tester's CNN at memory_limit=610,000: the scores kept the queries at full rank in
    groups, the module scores (a [Q, N] result per module, held beside the queries) only at rank
    1, 18% from the scores; said, and the notice that sets the rank names the result."""
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X[:85] / 16.0).reshape(-1, 1, 8, 8), torch.tensor(y[:85])
    train, test = (X[:80], y[:80]), (X[80:], y[80:])

    class CNN(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.fc = torch.nn.Conv2d(1, 3, 3, padding=1), torch.nn.Linear(48, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(F.avg_pool2d(torch.tanh(self.conv(x)), 2).flatten(1))

    task = infkit.Task.classification(CNN().double())
    infkit.train_to_optimum(task, train, 1e-2)
    options = {"l2": 1e-2, "damping": 0.01, "batch_size": 7, "memory_limit": 610_000}
    inf = infkit.Influence(task, "ekfac", **options).fit(train)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        inf.scores(test)  # full rank, in groups
    assert not [w for w in said if "kept at rank" in str(w.message)]
    with pytest.warns(Notice, match=r"and less the call's result: module_scores' 2 float64 \["):
        inf.module_scores(test)


def test_the_plan_counts_no_pass_for_an_eigenvalue_correction_from_the_kept_first_pass(
    mlp_problem: dict,
) -> None:
    """A tester's: where the first pass's activations and gradients fit EK-FAC's cache, the
    eigenvalue correction reads no data, yet the plan counted a pass for it. The examples the
    model reads, counted: without the cache the fit reads one pass more."""
    X, y = mlp_problem["train"]
    model = mlp_problem["model"]
    seen = [0]

    def count(module: torch.nn.Module, args: tuple) -> None:
        seen[0] += args[0].shape[0]

    options = {"l2": mlp_problem["l2"], "fisher": "ggn", "checks": False, "progress": False}
    read, stages = {}, {}
    for cache in (1 << 30, 0):
        handle = model.register_forward_pre_hook(count)
        try:
            seen[0] = 0
            inf = infkit.Influence(mlp_problem["task"], "ekfac", cache_bytes=cache, **options)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                inf.fit((X, y))
            read[cache] = seen[0]
        finally:
            handle.remove()
        plan = infkit.Influence(mlp_problem["task"], "ekfac", cache_bytes=cache, **options).plan(
            (X, y), timed=False
        )
        stages[cache] = {s.name: s for s in plan.stages}["eigenvalue correction"]
    assert read[0] - read[1 << 30] == len(X)  # one pass more without the cache
    assert stages[1 << 30].passes == 0 and "no data read" in stages[1 << 30].note
    assert stages[0].passes == 1
