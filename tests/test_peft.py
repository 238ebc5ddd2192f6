"""PEFT LoRA adapters on a transformers causal LM: attributed through the adapter matrices only,
with K-FAC factors per adapter matrix, against a dense reference built here with torch.func
(needs ``transformers`` and ``peft``: ``make test-slow``)."""

from __future__ import annotations

import warnings

import pytest
import torch
from lm_helpers import llama_config
from test_ekfac import kfe_diagonal

import infkit
from infkit import language_modeling as lm
from infkit.errors import InvalidInputError, UnsupportedError
from infkit.evaluate import relative_error

pytestmark = pytest.mark.slow


def _lora_model() -> torch.nn.Module:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = llama_config(
        vocab_size=11, hidden_size=8, intermediate_size=16, max_position_embeddings=16
    )
    base = transformers.LlamaForCausalLM(config).double().eval()
    adapters = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    return peft.get_peft_model(base, adapters).eval()


def _dense_reference(model, task, inputs, labels):  # type: ignore[no-untyped-def]
    """Per-example loss gradients [n, P] and GGN blocks J^T Lambda J [n, P, P] over the
    trainable (adapter) parameters, by torch.func on the whole model."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    theta = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    grads, blocks = [], []
    for i in range(len(labels)):
        x = {k: v[i : i + 1] for k, v in inputs.items()}

        def logits(params, x=x):  # type: ignore[no-untyped-def]
            return torch.func.functional_call(model, params, kwargs=x, strict=False).logits

        def loss(z, i=i):  # type: ignore[no-untyped-def]
            return task.loss(z, labels[i : i + 1]).sum()

        out = logits(theta)
        J = torch.func.jacrev(logits)(theta)
        J = torch.cat([J[n].reshape(out.numel(), -1) for n in names], dim=1)  # [C, P]
        g_out = torch.func.grad(loss)(out).reshape(-1)
        H_out = torch.func.hessian(loss)(out).reshape(out.numel(), out.numel())
        grads.append(J.T @ g_out)
        blocks.append(J.T @ H_out @ J)
    return names, torch.stack(grads), torch.stack(blocks)


def test_lora_adapters_are_attributed_through_their_matrices() -> None:
    model = _lora_model()
    ids = torch.randint(0, 11, (14, 5), generator=torch.Generator().manual_seed(1))
    inputs, labels = lm.examples(ids)
    n = 10
    train = ({k: v[:n] for k, v in inputs.items()}, labels[:n])
    test = ({k: v[n:] for k, v in inputs.items()}, labels[n:])
    task = infkit.Task.language_modeling(model)
    names, G, blocks = _dense_reference(model, task, inputs, labels)
    ggn = blocks[:n].mean(0)
    damping = 1e-2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ekfac = infkit.Influence(task, "ekfac", damping=damping, fisher="ggn").fit(train)
        exact = infkit.Influence(task, "exact", damping=damping).fit(train)
    # only the adapters are attributed: lora_A and lora_B of q_proj and v_proj
    tracked = [t.name for t in ekfac.method.kronecker().tracked]
    assert tracked == [name.removesuffix(".weight") for name in names]
    assert all(".lora_A." in t or ".lora_B." in t for t in tracked) and len(tracked) == 4
    assert ekfac.n_params == exact.n_params == G.shape[1]
    # the exact method equals the dense damped-GGN influence over the adapter parameters (to
    # float32 rounding: Llama's RMSNorm computes in float32 even in a float64 model, so two
    # differentiation paths through it agree to about 1e-7)
    dense = G[n:] @ torch.linalg.solve(ggn + damping * torch.eye(len(ggn)), G[:n].T) / n
    assert relative_error(exact.scores(test), dense) < 1e-5
    # EK-FAC: per adapter matrix, its eigenvalues are the dense GGN block's diagonal in the
    # Kronecker eigenbasis (a matrix [d_out, d_in], row-major within the flat vector)
    offset = 0
    factors = ekfac.method.kronecker().factors.modules
    for name in tracked:
        f = factors[name]
        size = f.QS.shape[0] * f.QA.shape[0]
        block = ggn[offset : offset + size, offset : offset + size]
        assert relative_error(f.Lambda, kfe_diagonal(block, f.QS, f.QA)) < 1e-6, name
        offset += size
    # and its scores correlate with the exact ones (it drops the cross-layer blocks)
    pair = torch.stack([ekfac.scores(test).flatten(), dense.flatten()])
    assert float(torch.corrcoef(pair)[0, 1]) > 0.9


def test_a_merged_adapter_is_refused_with_the_remedy() -> None:
    """peft's merge_adapter() leaves lora_A and lora_B trainable but uncalled: every gradient
    would be 0 (identity and the Kronecker methods raised PyTorch's own errors, exact and cg
    returned zeros); refused before any pass, naming the merge and what to do."""
    model = _lora_model()
    model.merge_adapter()
    train = lm.examples(torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(2)))
    task = infkit.Task.language_modeling(model)
    for method in ("identity", "ekfac", "exact"):
        with pytest.raises(InvalidInputError, match=r"none of the 4 parameters.*unmerge_adapter"):
            infkit.Influence(task, method, damping=1e-2).fit(train)
    model.unmerge_adapter()  # the adapters called again: attributed as usual
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert infkit.Influence(task, "identity").fit(train).n_params == 4 * 16


def test_dora_adapters_are_refused_by_the_kronecker_methods_and_named() -> None:
    """peft's DoRA calls lora_A and lora_B on an identity matrix besides the examples (its
    weight's norm): the Kronecker methods name DoRA and the methods that take its gradients by
    autograd; identity attributes through it."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = llama_config(
        vocab_size=11, hidden_size=8, intermediate_size=16, max_position_embeddings=16
    )
    base = transformers.LlamaForCausalLM(config).double().eval()
    adapters = peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    model = peft.get_peft_model(base, adapters).eval()
    train = lm.examples(torch.randint(0, 11, (6, 5), generator=torch.Generator().manual_seed(3)))
    task = infkit.Task.language_modeling(model)
    for method in ("kfac", "ekfac"):
        with pytest.raises(UnsupportedError, match=r"DoRA layer .*q_proj.*identity, exact"):
            infkit.Influence(task, method, damping=1e-2).fit(train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infkit.Influence(task, "identity").fit(train)
