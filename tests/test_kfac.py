"""method="kfac": layer capture, factors against hand-written formulas, unsupported layers, and
saved factors (docs/methods/kfac.md §2)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from kfac_helpers import (
    TinySequenceModel,
    conv_problem,
    sequence_data,
    sequence_loss,
    signal_problem,
)

import infkit
from infkit.data import ExampleSet
from infkit.errors import ArtifactError, CurvatureError, Notice, UnsupportedError
from infkit.evaluate import relative_error
from infkit.kfac.streaming import pass_working_bytes
from infkit.layers.capture import block_gradients, layer_terms, stream_block_gradients
from infkit.task import _cross_entropy

pytestmark = pytest.mark.filterwarnings("ignore:the model is not at a stationary point")


def per_example_grads(model: torch.nn.Module, loss, X, y) -> torch.Tensor:
    """Plain autograd, one example at a time: [N, P]."""
    rows = []
    for i in range(len(y)):
        model.zero_grad()
        xi = {k: v[i : i + 1] for k, v in X.items()} if isinstance(X, dict) else X[i : i + 1]
        out = model(**xi) if isinstance(xi, dict) else model(xi)
        loss(out, y[i : i + 1]).sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    return torch.stack(rows)


def padded_conv_problem() -> dict:
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        torch.nn.ReLU(),
        torch.nn.Conv2d(3, 2, 2, stride=2, dilation=1, padding="valid", bias=False),
        torch.nn.Conv2d(2, 2, 2, padding="same", dilation=2),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 3 * 3, 3),
    ).double()
    X = torch.randn(9, 2, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (9,))
    return {"model": model, "task": infkit.Task.classification(model), "train": (X, y)}


@pytest.mark.parametrize("which", ["mlp", "conv", "padded_conv", "signal", "sequence", "conv1d"])
def test_layer_terms_sum_to_the_per_example_gradients(which: str, mlp_problem: dict) -> None:
    if which == "mlp":
        problem, loss = mlp_problem, _cross_entropy
    elif which == "conv":
        problem, loss = conv_problem(), _cross_entropy
    elif which == "padded_conv":
        problem, loss = padded_conv_problem(), _cross_entropy
    elif which == "signal":  # nn.Conv1d
        problem, loss = signal_problem(), _cross_entropy
    else:
        model = TinySequenceModel(conv1d=which == "conv1d").double()
        problem = {
            "model": model,
            "task": infkit.Task(model, sequence_loss),
            "train": sequence_data(n=6),
        }
        loss = sequence_loss
    model, task, (X, y) = problem["model"], problem["task"], problem["train"]
    inf = infkit.Influence(task, "kfac", damping=1e-3).fit((X, y))
    method = inf.method.kronecker()
    batch = ExampleSet((X, y)).take(range(len(y)))
    blocks = block_gradients(layer_terms(inf.fitted.engine, method.tracked, batch))
    flat = torch.zeros(len(y), inf.n_params, dtype=torch.float64)
    for t in method.tracked:
        method.layers.layout.put(flat, t, blocks[t.name])
    assert relative_error(flat, per_example_grads(model, loss, X, y)) < 1e-12


class CheckpointedMLP(torch.nn.Module):
    """A two-layer MLP whose first layer runs inside ``torch.utils.checkpoint`` (``mode``
    "reentrant" or "non-reentrant") or plainly ("none"); the mode can change between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.mode = "none"
        self.first = torch.nn.Linear(5, 8)
        self.second = torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def block(z: torch.Tensor) -> torch.Tensor:
            return torch.tanh(self.first(z))

        if self.mode == "none":
            return self.second(block(x))
        reentrant = self.mode == "reentrant"
        return self.second(torch.utils.checkpoint.checkpoint(block, x, use_reentrant=reentrant))


def test_activation_checkpointing_recomputation_is_left_alone_and_reentrant_refused() -> None:
    """Non-reentrant checkpointing recomputes the first layer during the backward: the hooks
    must not record that second call (it would read as the layer called twice). The per-example
    block gradients, recorded and streamed, equal the unchecked model's (1e-12). Reentrant
    checkpointing runs the layer under no_grad: refused, naming the layer and the remedy."""
    torch.manual_seed(0)
    model = CheckpointedMLP().double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    task = infkit.Task.classification(model)
    inf = infkit.Influence(task, "kfac", damping=1e-3).fit((X, y))
    tracked, engine = inf.method.kronecker().tracked, inf.fitted.engine
    batch = ExampleSet((X, y)).take(range(len(y)))

    def both() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        recorded = block_gradients(layer_terms(engine, tracked, batch))
        streamed: dict[str, torch.Tensor] = {}
        stream_block_gradients(engine, tracked, batch, streamed.__setitem__)
        return recorded, streamed

    expected, _ = both()
    model.mode = "non-reentrant"
    for got in both():
        for name, G in expected.items():
            assert relative_error(got[name], G) < 1e-12, name
    model.mode = "reentrant"
    with pytest.raises(UnsupportedError, match=r"'first'.*use_reentrant=False"):
        layer_terms(engine, tracked, batch)
    with pytest.raises(UnsupportedError, match=r"'first'.*use_reentrant=False"):
        infkit.Influence(task, "kfac", damping=1e-3).fit((X, y))


class SlicedLinear(torch.nn.Linear):
    """A linear layer subclass that returns half of its output: not ``s = W a + b``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)[..., : self.out_features // 2]


def test_a_tracked_layer_returning_other_than_its_product_is_refused_by_name() -> None:
    """A subclass of a supported layer that slices its output would break the hooks' algebra
    (a shape error deep in the fit, or wrong terms): refused at the first forward pass, naming
    the layer, both shapes and modules=."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(SlicedLinear(5, 8), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(1)
    X, y = torch.randn(12, 5, generator=gen), torch.randint(0, 3, (12,), generator=gen)
    with pytest.raises(
        UnsupportedError, match=r"'0' returned \[\d+, 4\] where .*\[\d+, 8\].*modules="
    ):
        infkit.Influence(infkit.Task.classification(model), "kfac", damping=1e-3).fit((X, y))


def test_kfac_factors_match_hand_written_formulas(mlp_problem: dict) -> None:
    """A = mean [a, 1][a, 1]^T; S = (1/N) sum_i J_s,i^T Lambda_i J_s,i (exact GGN factors)."""
    model, task, (X, y) = mlp_problem["model"], mlp_problem["task"], mlp_problem["train"]
    inf = infkit.Influence(task, "kfac", l2=mlp_problem["l2"], fisher="ggn").fit((X, y))
    factors = inf.method.kronecker().factors.modules
    lin1, lin2 = model[0], model[2]
    with torch.no_grad():
        s1 = X @ lin1.weight.T + lin1.bias
        h = torch.tanh(s1)
        p = torch.softmax(h @ lin2.weight.T + lin2.bias, dim=1)
    ones = torch.ones(len(y), 1, dtype=torch.float64)
    a1, a2 = torch.cat([X, ones], 1), torch.cat([h, ones], 1)
    lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)  # softmax Hessian
    J1 = lin2.weight.detach().unsqueeze(0) * (1 - h**2).unsqueeze(1)  # df/ds1 = W2 diag(tanh')
    n = len(y)
    assert relative_error(factors["0"].A, a1.T @ a1 / n) < 1e-12
    assert relative_error(factors["2"].A, a2.T @ a2 / n) < 1e-12
    assert relative_error(factors["2"].S, lam.sum(0) / n) < 1e-12
    S1 = torch.einsum("bco,bcd,bdp->op", J1, lam, J1) / n
    assert relative_error(factors["0"].S, S1) < 1e-12
    # solve = block-diagonal (S (x) A + ridge I)^{-1}
    m = inf.method.kronecker()
    V = torch.randn(3, inf.n_params, dtype=torch.float64)
    out = m.solve(V)
    for t, S, A in (
        (m.tracked[0], S1, a1.T @ a1 / n),
        (m.tracked[1], lam.sum(0) / n, a2.T @ a2 / n),
    ):
        idx = m.layers.layout.flat_index(t)
        dense = torch.kron(S, A) + mlp_problem["l2"] * torch.eye(len(idx), dtype=torch.float64)
        assert relative_error(out[:, idx], torch.linalg.solve(dense, V[:, idx].T).T) < 1e-10


def test_attention_mask_leaves_padding_out_of_the_activation_factor() -> None:
    torch.manual_seed(2)
    model = TinySequenceModel().double()
    X, y = sequence_data(n=8)
    task = infkit.Task(model, sequence_loss)
    inf = infkit.Influence(task, "kfac", fisher="empirical", damping=1e-3).fit((X, y))
    f = inf.method.kronecker().factors.modules["inp"]
    mask = X["attention_mask"].bool()
    a = torch.cat([X["x"][mask], torch.ones(int(mask.sum()), 1, dtype=torch.float64)], 1)
    assert f.tokens == int(mask.sum())
    assert relative_error(f.A, a.T @ a / len(a)) < 1e-12
    # Without masking, the padded positions' activations count too.
    plain = infkit.Influence(task, "kfac", fisher="empirical", damping=1e-3, mask_key=None)
    assert plain.fit((X, y)).method.kronecker().factors.modules["inp"].tokens == mask.numel()


def test_parameters_outside_supported_layers(mlp_problem: dict) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(5, 6), torch.nn.LayerNorm(6), torch.nn.Tanh(), torch.nn.Linear(6, 3)
    ).double()
    task = infkit.Task.classification(model)
    train = mlp_problem["train"]
    with pytest.raises(UnsupportedError, match=r"1\.weight, 1\.bias.*requires_grad=False"):
        infkit.Influence(task, "kfac", damping=1e-3, unsupported="error").fit(train)
    # The default leaves them out, with a notice: the same as freezing them (below). It says
    # why: their layer's kind (a tester's ConvTranspose2d was named without a reason)
    with pytest.warns(
        Notice, match=r"1\.weight, 1\.bias; layers of kinds they do not factor: '1' \(LayerNorm\)"
    ):
        skipped = infkit.Influence(task, "kfac", damping=1e-3).fit(train)
    skipped_scores = skipped.scores(mlp_problem["test"])
    inf = infkit.Influence(task, "ekfac", damping=1e-3, l2=1e-2, unsupported="identity").fit(train)
    m = inf.method.kronecker()
    assert m.layers.others == ["1.weight", "1.bias"]
    V = torch.randn(2, inf.n_params, dtype=torch.float64)
    idx = m.layers.layout.other_index
    assert torch.allclose(m.solve(V)[:, idx], V[:, idx] / (1e-3 + 1e-2), rtol=1e-14)
    with pytest.raises(CurvatureError, match="ridge"):
        infkit.Influence(task, "kfac", unsupported="identity", damping_scale="auto").fit(
            train
        ).method.solve(V)
    # Freezing them restricts the attribution to the supported layers.
    for p in model[1].parameters():
        p.requires_grad_(False)
    frozen = infkit.Influence(task, "kfac", damping=1e-3).fit(train)
    assert [t.name for t in frozen.method.kronecker().tracked] == ["0", "3"]
    assert frozen.method.kronecker().layers.others == []
    torch.testing.assert_close(skipped_scores, frozen.scores(mlp_problem["test"]))


class TiedLM(torch.nn.Module):
    """An output head that reads the token embedding's matrix (GPT-2's tied weights)."""

    def __init__(self, vocab: int = 9, width: int = 5) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids: torch.Tensor, attention_mask=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
        return self.head(torch.tanh(self.mix(self.embed(input_ids))))


def test_tied_weights_are_left_out_by_default_and_refused_by_name() -> None:
    """The head's hooks see only its own use of the shared matrix, not the embedding's: it is
    not tracked (the notice names it), which attributes exactly as freezing the matrix does."""
    from infkit import language_modeling as lm

    torch.manual_seed(0)
    model = TiedLM().double().eval()
    ids = torch.randint(0, 9, (14, 6))
    train, test = lm.examples(ids[:10]), lm.examples(ids[10:])
    task = infkit.Task.language_modeling(model)
    with pytest.warns(Notice, match=r"embed\.weight.*'head' \(with 'embed'\)"):
        tied = infkit.Influence(task, "ekfac", damping=1e-2).fit(train)
    assert [t.name for t in tied.method.kronecker().tracked] == ["mix"]
    assert tied.n_params == sum(p.numel() for p in model.mix.parameters())
    scores = tied.scores(test)
    with pytest.raises(UnsupportedError, match=r"'head'.*'embed' use too \(tied weights"):
        infkit.Influence(task, "ekfac", damping=1e-2, modules=["mix", "head"])
    with pytest.raises(
        UnsupportedError, match=r"'mixx' is no module of the model \(did you mean 'mix'"
    ):
        infkit.Influence(task, "ekfac", damping=1e-2, modules=["mixx"])
    model.embed.weight.requires_grad_(False)
    frozen = infkit.Influence(task, "ekfac", damping=1e-2).fit(train)
    torch.testing.assert_close(frozen.scores(test), scores, rtol=1e-10, atol=1e-12)


class FunctionallyTied(torch.nn.Module):
    """A layer whose weight the forward pass also applies itself, transposed: no other module
    holds it, so only the gradients can tell."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a, self.out = (
            torch.nn.Linear(5, 6),
            torch.nn.Linear(6, 6),
            torch.nn.Linear(6, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(torch.tanh(self.inp(x))))
        return self.out(torch.tanh(torch.nn.functional.linear(h, self.a.weight.t())))


def test_a_weight_used_outside_its_layer_is_refused_for_the_kronecker_answers() -> None:
    """A tester's: kfac and ekfac tracked such a layer without a word, and their scores with a
    workdir (gradients from the hooks) and without (by autograd) differed by 0.23 and 0.27.
    The forward pass is watched: refused, naming the layer and the function that took its
    weight outside it (test_outside_uses: a use the first examples leave at zero); left out by modules=, the rest is attributed; astra, which solves with
    autograd's gradients, answers the exact solve."""
    torch.manual_seed(0)
    X = torch.randn(40, 5, dtype=torch.float64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()
    model = FunctionallyTied().double()
    task = infkit.Task.classification(model)
    for method in ("kfac", "ekfac"):
        with pytest.raises(
            UnsupportedError,
            match=r"layer\(s\) 'a' \(1 use in the loss's graph beside 1 call: \w+",
        ):
            infkit.Influence(task, method, l2=1e-2, damping=1e-2).fit((X, y))
    with pytest.warns(Notice, match=r"a\.weight, a\.bias"):
        kept = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2, modules=["inp", "out"])
        kept.fit((X, y))
    assert [t.name for t in kept.method.kronecker().tracked] == ["inp", "out"]
    exact = infkit.Influence(task, "exact", l2=1e-2, damping=1e-2, curvature="ggn").fit((X, y))
    astra = infkit.Influence(task, "astra", l2=1e-2, damping=1e-2).fit((X, y))
    assert relative_error(astra.scores((X[:4], y[:4])), exact.scores((X[:4], y[:4]))) < 1e-6


@pytest.mark.parametrize("method", ["kfac", "ekfac"])
def test_the_check_of_every_use_compares_passes_of_one_precision(method: str) -> None:
    """Under bfloat16 autocast the hooks' terms come from bfloat16 passes; autograd's gradient
    they are checked against ran in float32, and the two passes' rounding read as a use outside
    the layers' calls (a tester's trained Llama, 0.38 and 0.42; this regression MLP, 1 for both
    layers). The check's pass now runs under the task's autocast: the MLP fits, and a weight
    applied outside its layer is still refused under it."""
    from sklearn.datasets import load_diabetes

    X, y = load_diabetes(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32)
    y = torch.tensor((y - y.mean()) / y.std(), dtype=torch.float32).unsqueeze(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    task = infkit.Task.regression(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (float32 stops short of the float64 target)
        infkit.train_to_optimum(task, (X, y), 0.0, tolerance=1e-7)
        inf = infkit.Influence(task, method, damping=1e-3, dtype=torch.bfloat16).fit((X, y))
    assert inf.describe()["autocast"] == "bfloat16"
    torch.manual_seed(0)
    Xt = torch.randn(40, 5)
    yt = (Xt[:, 0] > 0).long() + (Xt[:, 1] > 0.5).long()
    tied = infkit.Task.classification(FunctionallyTied())
    with pytest.raises(
        UnsupportedError, match=r"layer\(s\) 'a' \(1 use in the loss's graph beside 1 call: \w+"
    ):
        infkit.Influence(tied, method, l2=1e-2, damping=1e-2, dtype=torch.bfloat16).fit((Xt, yt))


def test_torchscript_layers_are_named_as_left_out_and_a_scripted_model_refused() -> None:
    """A TorchScript part's layers take no hooks: the Kronecker methods leave them out, as if
    frozen (the scores equal those of the Python model with that part frozen), and the notice
    names the scripted module. A model scripted whole is refused by the task, naming
    TorchScript, where every method failed with another's message (no layer found; "check the
    data")."""
    torch.manual_seed(0)
    X = torch.randn(30, 5, dtype=torch.float64)
    y = (X[:, 0] > 0).long()
    inner = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh()).double()
    head = torch.nn.Linear(8, 3).double()
    part = torch.nn.Sequential(torch.jit.script(copy.deepcopy(inner)), copy.deepcopy(head))
    task = infkit.Task.classification(part)
    with pytest.warns(Notice, match=r"0\.0\.weight.*inside TorchScript modules.*: '0' \(give"):
        scores = infkit.Influence(task, "ekfac", l2=1e-2).fit((X, y)).scores((X[:3], y[:3]))
    inner.requires_grad_(False)
    python = infkit.Task.classification(torch.nn.Sequential(inner, head))
    frozen = infkit.Influence(python, "ekfac", l2=1e-2).fit((X, y)).scores((X[:3], y[:3]))
    torch.testing.assert_close(scores, frozen, rtol=1e-9, atol=1e-12)
    for scripted in (
        torch.jit.script(torch.nn.Sequential(inner, head)),
        torch.jit.trace(torch.nn.Sequential(inner, head), X[:2]),
    ):
        with pytest.raises(UnsupportedError, match="the model is a TorchScript module"):
            infkit.Task.classification(scripted)


class AttentionLM(torch.nn.Module):
    """A causal LM on PyTorch's nn.TransformerEncoderLayer, whose nn.MultiheadAttention applies
    its out_proj's weight itself (F.multi_head_attention_forward), never calling the layer."""

    def __init__(self, vocab: int = 9, width: int = 8) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.block = torch.nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1]
        causal = torch.triu(torch.full((t, t), float("-inf"), dtype=torch.float64), 1)
        return self.head(self.block(self.embed(input_ids), src_mask=causal))


def test_a_layer_whose_weight_its_parent_applies_is_left_out_and_refused_by_name() -> None:
    """Its hooks never run: left out with a notice naming it and its parent, as tied weights
    are, refused by name; the layers that remain track as they do with it frozen."""
    from infkit import language_modeling as lm

    torch.manual_seed(0)
    model = AttentionLM().double().eval()
    ids = torch.randint(0, 9, (14, 6))
    train, test = lm.examples(ids[:10]), lm.examples(ids[10:])
    task = infkit.Task.language_modeling(model)
    options = {"damping": 1e-2, "fisher": "ggn", "checks": False}
    with pytest.warns(Notice, match=r"'block\.self_attn\.out_proj' \(with 'block\.self_attn'\)"):
        left_out = infkit.Influence(task, "ekfac", **options).fit(train)
    tracked = [t.name for t in left_out.method.kronecker().tracked]
    assert tracked == ["block.linear1", "block.linear2", "head"]
    with pytest.raises(UnsupportedError, match=r"'block\.self_attn\.out_proj'.*functionally"):
        infkit.Influence(task, "ekfac", modules=["block.self_attn.out_proj"], **options)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in tracked:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    frozen = infkit.Influence(task, "ekfac", **options).fit(train)
    torch.testing.assert_close(left_out.scores(test), frozen.scores(test), rtol=1e-10, atol=1e-12)


def test_bad_options_are_refused(mlp_problem: dict) -> None:
    task, train = mlp_problem["task"], mlp_problem["train"]
    # option errors come at construction, before any pass over the data
    with pytest.raises(UnsupportedError, match=r"option 'fisher' must be 'auto' or 'ggn'"):
        infkit.Influence(task, "kfac", fisher="true")
    with pytest.raises(UnsupportedError, match="does not take"):
        infkit.Influence(task, "ekfac", rank=3)
    with pytest.raises(UnsupportedError, match=r"'1' is a \w+, not a supported layer"):
        infkit.Influence(task, "kfac", modules=["1"]).fit(train)
    custom = infkit.Task(task.model, _cross_entropy)
    with pytest.raises(UnsupportedError, match="sample_targets"):
        infkit.Influence(custom, "kfac", fisher="sampled").fit(train)


def test_factors_saved_reloaded_and_rescored_give_identical_scores(
    mlp_problem: dict, tmp_path
) -> None:
    task, train, test, l2 = (mlp_problem[k] for k in ("task", "train", "test", "l2"))
    options = {"l2": l2, "damping": 1e-3, "fisher": "sampled", "seed": 3}
    first = infkit.Influence(task, "ekfac", factors_dir=tmp_path, **options).fit(train)
    S1 = first.scores(test)
    (artifact,) = list(tmp_path.glob("kronecker-factors-*"))
    assert {p.name for p in artifact.iterdir()} == {
        "manifest.json",
        "meta.json",
        "tensors.safetensors",
    }
    assert not first.method.kronecker().loaded
    again = infkit.Influence(task, "ekfac", factors_dir=tmp_path, **options).fit(train)
    assert again.method.kronecker().loaded
    assert torch.equal(again.scores(test), S1)  # the same computation path: bit-identical
    assert again.method.kronecker().factors.meta["fisher"] == "sampled"
    # K-FAC can use EK-FAC's saved factors (same eigenbasis); a changed seed cannot.
    assert (
        infkit.Influence(task, "kfac", factors_dir=tmp_path, **options)
        .fit(train)
        .method.kronecker()
        .loaded
    )
    with pytest.raises(
        ArtifactError,
        match=r"another computation \(differs in: seed\)\. .*Influence\(\.\.\., overwrite=True\)",
    ):
        infkit.Influence(task, "ekfac", factors_dir=tmp_path, **{**options, "seed": 4}).fit(train)
    # A changed model is detected, and overwrite=True refits.
    model = task.model
    with torch.no_grad():
        model[0].bias.add_(1e-3)
    try:
        with pytest.raises(ArtifactError, match=r"differs in: model.parameters.*overwrite=True"):
            infkit.Influence(task, "ekfac", factors_dir=tmp_path, **options).fit(train)
        refit = infkit.Influence(task, "ekfac", factors_dir=tmp_path, overwrite=True, **options)
        assert not refit.fit(train).method.kronecker().loaded
        assert len(list(tmp_path.glob("kronecker-factors-*"))) == 1  # the stale one is gone
    finally:
        with torch.no_grad():
            model[0].bias.sub_(1e-3)


def test_auto_fisher_is_exact_for_small_outputs(mlp_problem: dict) -> None:
    task, train = mlp_problem["task"], mlp_problem["train"]
    inf = infkit.Influence(task, "kfac", damping=1e-3).fit(train)
    assert inf.describe()["fisher"] == "ggn"
    sampled = infkit.Influence(task, "kfac", damping=1e-3, max_exact_outputs=2).fit(train)
    assert sampled.describe()["fisher"] == "sampled"


def test_output_factors_reproduce_the_output_hessians() -> None:
    """L_i L_i^T = Lambda_i for the closed forms (softmax, sigmoid, squared error) and eigh."""
    model = torch.nn.Linear(2, 4).double()
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (6,), generator=gen)
    cases = [
        (infkit.Task.classification(model), out, y),
        (infkit.Task.binary_classification(model), out[:, :1], (y > 1).double()),
        (infkit.Task.regression(model), out, out + 1),
        (infkit.Task(model, _cross_entropy), out, y),  # autodiff Lambda, eigendecomposed
    ]
    for task, f, target in cases:
        L = task.lambda_factor(f, target)
        lam = task.lambda_blocks(f, target)
        assert relative_error(L @ L.transpose(1, 2), lam) < 1e-12, task


@pytest.mark.parametrize("d", [5, 96, 200, 385])
@pytest.mark.parametrize("weighted", [False, True])
def test_gram_equals_the_dense_weighted_product(d: int, weighted: bool) -> None:
    """linalg.gram computes the upper block triangle only; the whole matrix must equal
    X^T diag(w) X (float64) and be exactly symmetric."""
    from infkit.linalg import gram

    gen = torch.Generator().manual_seed(d)
    X = torch.randn(50, d, generator=gen, dtype=torch.float64)
    w = torch.randint(0, 2, (50,), generator=gen).to(torch.float64) if weighted else None
    expected = X.T @ (X if w is None else X * w[:, None])
    G = gram(X, w)
    assert relative_error(G, expected) < 1e-13
    assert relative_error(G, G.T) < 1e-14  # mirrored blocks, and diagonal blocks to rounding


@pytest.mark.parametrize("d", [7, 64, 65, 200])
def test_wide_inner_sums_its_column_chunks_to_the_product(
    d: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """linalg.wide_inner adds X Y^T over chunks of columns (16 here, so one product, two, a
    short last chunk and many): the float64 product X Y^T to rounding."""
    import infkit.linalg
    from infkit.linalg import wide_inner

    monkeypatch.setattr(infkit.linalg, "WIDE_INNER_COLUMNS", 16)
    gen = torch.Generator().manual_seed(d)
    X = torch.randn(5, d, generator=gen, dtype=torch.float64)
    Y = torch.randn(3, d, generator=gen, dtype=torch.float64)
    assert relative_error(wide_inner(X, Y), X @ Y.T) < 1e-14


@pytest.mark.parametrize(
    ("examples", "slab_rows"),
    [(1, None), (3, None), (None, 3), (None, 4)],  # chunks of examples; slabs of rows (3 + 1)
)
def test_squares_in_eigenbasis_sums_the_squared_rotated_blocks(
    examples: int | None, slab_rows: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """kfac.factors.squares_in_eigenbasis: sum over vectors and examples of the squared blocks
    (sum_t dr_t ar_t^T)^2, whole blocks in chunks of one example (CHUNK_ELEMENTS small) or all
    at once, or with few positions in slabs of rows of every block (the last one shorter), against
    the dense float64 sum."""
    import infkit.kfac.factors
    import infkit.layers.capture
    from infkit.kfac.factors import squares_in_eigenbasis
    from infkit.scratch import ScratchSpace

    gen = torch.Generator().manual_seed(examples or slab_rows or 0)
    dr = torch.randn(2, 3, 5, 4, generator=gen)  # [K, B, T, d_out]
    ar = torch.randn(3, 5, 6, generator=gen)  # [B, T, cols]
    blocks = dr.double().transpose(-1, -2) @ ar.double().unsqueeze(0)
    expected = blocks.square().sum((0, 1))
    if slab_rows is None:  # whole blocks: T = 5 above the slabs' positions
        monkeypatch.setattr(infkit.layers.capture, "SLAB_MAX_POSITIONS", 4)
        monkeypatch.setattr(infkit.kfac.factors, "CHUNK_ELEMENTS", 2 * 4 * 6 * examples)
    else:  # a row of the slab holds K x B x cols float32 numbers
        monkeypatch.setattr(infkit.kfac.factors, "SQUARES_SLAB_BYTES", slab_rows * 2 * 3 * 6 * 4)
    assert relative_error(squares_in_eigenbasis(dr, ar), expected) < 1e-6  # float32 products
    # the blocks made in one reused buffer: the same sums, call after call (the second call's
    # blocks overwrite the first's), and the buffer is not grown for a call that fits it
    scratch = ScratchSpace()
    first = squares_in_eigenbasis(dr, ar, scratch)
    buffer = scratch.view((1,), dr).data_ptr()
    other = torch.randn(1, 3, 5, 4, generator=gen)  # K = 1: smaller blocks, the same buffer
    expected_other = (other.double().transpose(-1, -2) @ ar.double().unsqueeze(0)).square()
    assert (
        relative_error(squares_in_eigenbasis(other, ar, scratch), expected_other.sum((0, 1))) < 1e-6
    )
    assert scratch.view((1,), dr).data_ptr() == buffer
    assert relative_error(first, expected) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_inner_products_in_slabs_equal_the_dense_sums(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """layers.capture.block_inner: <U_k, G_j> with G_j = sum_t Ds_jt a_jt^T made a slab of rows
    at a time (slabs of 2 rows of 5, the last one shorter; one slab of all 5) equals the float64
    sums over whole blocks."""
    import infkit.layers.capture
    from infkit.layers.capture import block_inner

    gen = torch.Generator().manual_seed(1)
    a, ds = torch.randn(4, 6, 3, generator=gen), torch.randn(4, 6, 5, generator=gen)
    U = torch.randn(7, 5, 3, generator=gen)  # [k, d_out, cols]
    G = torch.einsum("bto,bti->boi", ds.double(), a.double())
    expected = U.double().flatten(1) @ G.flatten(1).T
    for rows in (2, 5):  # a row of the slab holds B x cols numbers
        size = torch.finfo(dtype).bits // 8
        monkeypatch.setattr(infkit.layers.capture, "INNER_SLAB_BYTES", rows * 4 * 3 * size)
        got = block_inner(U, a, ds, dtype)
        assert got.shape == (7, 4) and got.dtype == dtype
        assert relative_error(got, expected) < (1e-6 if dtype == torch.float32 else 1e-14)


def test_block_gradients_made_in_a_reused_buffer_equal_the_dense_sums() -> None:
    """layers.capture.block_gradient with a ScratchSpace (the scoring pass's, one for every
    layer of every batch): G_j = sum_t Ds_jt a_jt^T as the float64 sums, two layers of other
    shapes one after the other in the same storage, each valid until the next."""
    from infkit.layers.capture import block_gradient
    from infkit.scratch import ScratchSpace

    gen = torch.Generator().manual_seed(0)
    scratch = ScratchSpace()
    pointers = []
    for d_out, cols in ((7, 5), (3, 9)):
        a, ds = torch.randn(4, 6, cols, generator=gen), torch.randn(4, 6, d_out, generator=gen)
        expected = torch.einsum("bto,bti->boi", ds.double(), a.double())
        G = block_gradient(a, ds, torch.float32, scratch)
        assert G.shape == (4, d_out, cols) and G.dtype == torch.float32
        assert relative_error(G, expected) < 1e-6
        assert relative_error(block_gradient(a, ds), expected) < 1e-12  # float64, no buffer
        pointers.append(G.untyped_storage().data_ptr())
    assert pointers[0] == pointers[1]


@pytest.mark.parametrize("positions", [2, 40])
def test_blocks_rotated_into_the_eigenbasis_by_either_order(positions: int) -> None:
    """kfac.curvature.rotated_blocks rotates each position's terms first for short sequences
    (2 positions here) and forms the block first for long ones (40): both give Q_S^T G Q_A of
    G = sum_t Ds_t a_t^T, computed here densely per example in float64."""
    from infkit.kfac.curvature import rotated_blocks

    gen = torch.Generator().manual_seed(positions)
    b, d_out, cols = 3, 12, 9
    a = torch.randn(b, positions, cols, generator=gen, dtype=torch.float64)
    ds = torch.randn(b, positions, d_out, generator=gen, dtype=torch.float64)
    QS = torch.linalg.qr(torch.randn(d_out, d_out, generator=gen, dtype=torch.float64))[0]
    QA = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))[0]
    expected = torch.stack(
        [
            QS.T @ sum(torch.outer(ds[j, t], a[j, t]) for t in range(positions)) @ QA
            for j in range(b)
        ]
    )
    assert relative_error(rotated_blocks(a, ds, QS, QA, torch.float64), expected) < 1e-13


def test_one_dimensional_convolutions_are_factored_and_their_positions_sized() -> None:
    """``nn.Conv1d`` layers are tracked, one position per output step (the per-example
    gradients and EK-FAC against dense references: test_layer_terms_sum_to_the_per_example_
    gradients, tests/test_ekfac.py). A signal [B, 1, 32] has 1 position by its shape (its
    channels), but the layers see 28 and 13: a scoring pass's hook terms are sized by those,
    counted here by hand (at 1 position they were 9x under)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 5),
        torch.nn.Tanh(),
        torch.nn.Conv1d(4, 2, 3, stride=2),
        torch.nn.Flatten(),
        torch.nn.Linear(26, 3),
    ).double()
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(10, 1, 32, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    inf = infkit.Influence(infkit.Task.classification(model), "ekfac", damping=1e-2)
    inf.fit((X, y))
    curvature = inf.method.kronecker()
    assert [(t.name, t.kind, t.d_out, t.cols) for t in curvature.tracked] == [
        ("0", "nn_conv1d", 4, 6),
        ("2", "nn_conv1d", 2, 13),
        ("4", "linear", 3, 27),
    ]
    assert curvature.positions == {"0": 28.0, "2": 13.0, "4": 1.0}
    by_hand = 10 * (28 * (4 + 6) + 13 * (2 + 13) + 1 * (3 + 27)) * 8
    assert pass_working_bytes(inf.fitted, curvature)[0] == by_hand
    # the plan says what the data's shape gives (1 position: the channels) and what the
    # layers see (its header had said "x 1 tokens" alone)
    plan = str(inf.plan((X, y)))
    assert "N = 10 examples x 1 position," in plan
    assert "its layers see 1 to 28 positions an example (the data's shape: 1 position)" in plan
    # per-token scores split the first convolution's 28 steps; they sum to the scores
    split = inf.token_scores((X[:2], y[:2]), range(4))
    assert split.tokens.shape == (2, 4, 28)
    assert relative_error(split.total, inf.scores((X[:2], y[:2]))[:, :4]) < 1e-10
    # a batch whose hook terms alone pass memory_limit is said, with a batch size that fits (a
    # reviewer's signals of 6,000 steps peaked far above the limit without a word)
    pooled = torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 5),
        torch.nn.Tanh(),
        torch.nn.Conv1d(4, 2, 3, stride=2),
        torch.nn.AdaptiveAvgPool1d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(2, 3),
    ).double()
    long = torch.randn(10, 1, 256, generator=gen, dtype=torch.float64)  # 252 and 125 steps
    small = infkit.Influence(
        infkit.Task.classification(pooled), "ekfac", damping=1e-2, memory_limit=100_000
    )
    with pytest.warns(UserWarning, match=r"one batch of 10 examples holds [\d.]+ KiB .*about 1 "):
        small.fit((long, y))


class TokenConv(torch.nn.Module):
    """Token embeddings, a middle layer over the tokens (an ``nn.Linear``, or the same map as an
    ``nn.Conv1d`` of width 1 over [B, d, T], SqueezeBERT's way), a masked mean and a head."""

    def __init__(self, conv: bool) -> None:
        super().__init__()
        self.conv = conv
        self.emb = torch.nn.Embedding(20, 4)
        self.mid = torch.nn.Conv1d(4, 4, 1) if conv else torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.emb(input_ids)
        h = torch.tanh(self.mid(h.transpose(1, 2)).transpose(1, 2) if self.conv else self.mid(h))
        m = attention_mask[..., None].to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def test_a_convolution_over_tokens_leaves_the_padding_out_as_a_linear_layer_does() -> None:
    """A reviewer's: an ``nn.Conv1d`` over a sequence's tokens counted the padding in its A
    factor and positions (scores 16% apart with 5 more pads; SqueezeBERT 47%), where the same
    map as an ``nn.Linear`` left it out. Both now score alike, whatever the padding; an unbatched
    call of a tracked convolution is refused, saying so (it met "returns [2, 6]")."""
    gen = torch.Generator().manual_seed(0)
    n, t = 12, 5
    ids = torch.randint(1, 20, (n, t), generator=gen)
    mask = (torch.arange(t)[None] < torch.randint(2, t + 1, (n,), generator=gen)[:, None]).long()
    y = torch.randint(0, 2, (n,), generator=gen)

    def data(extra: int) -> tuple[dict, torch.Tensor]:
        pad = torch.zeros(n, extra, dtype=torch.long)
        return {
            "input_ids": torch.cat([ids * mask, pad], 1),
            "attention_mask": torch.cat([mask, pad], 1),
        }, y

    torch.manual_seed(1)
    linear = TokenConv(conv=False).double()
    conv = TokenConv(conv=True).double()
    conv.load_state_dict({**linear.state_dict(), "mid.weight": linear.mid.weight[:, :, None]})
    scores = {}
    for model in (linear, conv):
        model.emb.weight.requires_grad_(False)
        for extra in (0, 5):
            train = data(extra)
            task = infkit.Task.classification(model)
            inf = infkit.Influence(task, "ekfac", damping=1e-6).fit(train)
            scores[model.conv, extra] = inf.scores(({k: v[:3] for k, v in train[0].items()}, y[:3]))
    for got in scores.values():
        assert relative_error(got, scores[False, 0]) < 1e-10

    class Unbatched(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.h = torch.nn.Conv1d(4, 2, 3), torch.nn.Linear(12, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.h(torch.stack([torch.tanh(self.c(xi)).flatten() for xi in x]))

    X = torch.randn(10, 4, 8, generator=gen, dtype=torch.float64)
    task = infkit.Task.classification(Unbatched().double())
    with pytest.raises(UnsupportedError, match=r"'c' \(Conv1d\) is called on one unbatched input"):
        infkit.Influence(task, "kfac", damping=1e-2).fit((X, torch.randint(0, 3, (10,))))


class Clips(torch.nn.Module):
    """An audio classifier as Wav2Vec2 builds one: strided 1-D convolutions over a clip's
    samples make frames, a Linear acts on each frame, and the frames a clip's length leaves
    whole (by its samples' attention mask, the lengths formula of Hugging Face's feature
    encoder) are averaged: the logits do not depend on the padding."""

    def __init__(self, padding: int = 0) -> None:
        super().__init__()
        self.padding = padding
        self.conv1 = torch.nn.Conv1d(1, 4, 10, stride=5, padding=padding)
        self.conv2 = torch.nn.Conv1d(4, 4, 3, stride=2)
        self.frame = torch.nn.Linear(4, 4)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv2(torch.tanh(self.conv1(input_values[:, None]))))
        h = torch.tanh(self.frame(h.transpose(1, 2)))
        lengths = attention_mask.sum(1)
        for k, s, p in ((10, 5, self.padding), (3, 2, 0)):
            lengths = torch.div(lengths + 2 * p - k, s, rounding_mode="floor") + 1
        valid = (torch.arange(h.shape[1])[None] < lengths[:, None]).to(h.dtype)[..., None]
        return self.head((h * valid).sum(1) / valid.sum(1))


@pytest.mark.parametrize("padding", [0, 3])
def test_the_frames_of_padded_clips_are_left_out_as_the_model_leaves_them(padding: int) -> None:
    """A tester's Wav2Vec2 classifier: its clips' mask marks samples, which no tracked layer
    sees (the strided convolutions make frames), so the padded frames entered the factors and
    padding 40 or 200 samples moved EK-FAC's scores by 1.8e-2 and 0.10, with no word (and an
    unpadded set was warned of padding). A convolution's output mask is now derived from its
    input's (the frames whose window lies within the data, stretched by the convolution's own
    padding: a reviewer's padded convolutions moved by 9e-3 where the edge frames were
    dropped), for it and the layers after it."""
    gen = torch.Generator().manual_seed(3)
    n = 12
    samples = torch.randn(n, 120, generator=gen, dtype=torch.float64)
    lengths = torch.randint(60, 121, (n,), generator=gen)
    mask = (torch.arange(120)[None] < lengths[:, None]).long()
    y = torch.randint(0, 2, (n,), generator=gen)
    torch.manual_seed(4)
    model = Clips(padding).double()
    task = infkit.Task.classification(model)

    def clips(extra: int) -> tuple[dict, torch.Tensor]:
        pad = torch.zeros(n, extra, dtype=torch.float64)
        values = torch.cat([samples * mask, pad], 1)
        return {"input_values": values, "attention_mask": torch.cat([mask, pad.long()], 1)}, y

    for method in ("kfac", "ekfac"):
        got = {}
        for extra in (0, 40):
            train = clips(extra)
            with warnings.catch_warnings():
                warnings.simplefilter("error", UserWarning)  # no word of padding: none enters
                warnings.filterwarnings("ignore", "the model is not at a stationary point")
                inf = infkit.Influence(task, method, damping=1e-3, l2=1e-2).fit(train)
            got[extra] = inf.scores(({k: v[:3] for k, v in train[0].items()}, y[:3]))
        assert relative_error(got[40], got[0]) < 1e-10, method


def test_scoring_takes_smaller_batches_where_the_limit_leaves_no_room_for_a_query() -> None:
    """A tester's 32,000-word Llama at a quarter of the unbounded peak was refused at scores():
    a scoring pass's working memory (twice a batch's hook terms and gradient block) over the
    fit's batches of 8 left no room for one query, where batches of 4 scored the same numbers
    within the limit. The scoring passes take the largest smaller batch (halved) that scores
    the queries at full rank, said once (a Notice), and the plan foresees it; the scores are
    the unbounded run's. Here a batch's largest gradient block (64 x 32 x 65 float64, 1 MiB,
    counted twice) alone passes the limit, where a query's largest block is 16.6 KiB."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10)
    ).double()
    task = infkit.Task.classification(model)
    test = (X[:5], y[:5])
    options = {"l2": 1e-2, "damping": 1e-3, "batch_size": 64, "checks": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (not trained: the stationarity warning)
        unbounded = infkit.Influence(task, "ekfac", **options).fit((X, y)).scores(test)
    for limit, size in ((1_000_000, 16), (300_000, 4)):
        bounded = infkit.Influence(task, "ekfac", memory_limit=limit, **options)
        plan = {stage.name: stage for stage in bounded.plan((X, y), test).stages}
        assert not plan["queries"].refused
        assert plan["scores"].note.endswith(
            f"in batches of {size}: memory_limit leaves no room for the queries beside a pass "
            "over batches of 64"
        )
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            bounded.fit((X, y))
            scores = bounded.scores(test)
            bounded.scores(test)
        told = [w for w in said if "leaves no room for the queries" in str(w.message)]
        assert len(told) == 1 and told[0].category is Notice
        assert f"the scoring passes take batches of {size}, the same scores" in str(told[0].message)
        assert bounded.describe()["query_rank"] is None  # full rank
        assert relative_error(scores, unbounded) < 1e-12
