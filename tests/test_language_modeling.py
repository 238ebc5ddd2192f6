"""Causal language modelling: the task, its output Hessian and sampler, and EK-FAC streamed
layer by layer from hooks, against autodiff, dense solves and the cached path.

A small causal LM written here (embedding, a causal running mean, a tanh MLP, an output head)
keeps the default run free of transformers; the Llama case at the end needs it (skipped
otherwise, run by ``make test-slow``).
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from lm_helpers import LENGTH, VOCAB, TinyLM, llama_config
from torch import nn

import infkit
import infkit.layers.capture
from infkit import diagnostics
from infkit import language_modeling as lm
from infkit.data import ExampleSet
from infkit.errors import (
    CurvatureError,
    InvalidInputError,
    NonFiniteError,
    Notice,
    ProblemTooLargeError,
    UnsupportedError,
)
from infkit.evaluate import relative_error
from infkit.kfac.streaming import (
    KEPT_ENERGY,
    CallResult,
    StreamingScorer,
    factor_bytes,
    kept_at_rank,
    low_rank_groups,
    plan_groups,
    query_budget,
)
from infkit.memory import human_bytes
from infkit.methods.kfac import EIGH_MATRICES
from infkit.plan import SCORING_STAGES

N, Q = 20, 4


@pytest.fixture(scope="module")
def problem() -> dict:
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    ids = torch.randint(0, VOCAB, (N + Q, LENGTH))
    mask = torch.ones_like(ids)
    mask[2, 5:] = 0  # a padded training sequence
    inputs, labels = lm.examples(ids, mask, prompt_lengths=[0] * N + [3] * Q)
    split = lambda lo, hi: ({k: v[lo:hi] for k, v in inputs.items()}, labels[lo:hi])  # noqa: E731
    return {"model": model, "train": split(0, N), "test": split(N, N + Q)}


# ============================================================================ the task
def test_loss_is_the_summed_next_token_loss(problem: dict) -> None:
    inputs, labels = problem["train"]
    logits = problem["model"](**inputs)
    losses = lm.next_token_loss(logits, labels)
    for i in (0, 2):
        scored = [
            nn.functional.cross_entropy(logits[i, t], labels[i, t + 1])
            for t in range(LENGTH - 1)
            if labels[i, t + 1] != lm.IGNORE_INDEX
        ]
        torch.testing.assert_close(losses[i], torch.stack(scored).sum())
    assert int((labels[2] == lm.IGNORE_INDEX).sum()) == 2  # the padding is not scored


def test_trak_margin_and_weight_by_hand(problem: dict) -> None:
    inputs, labels = problem["test"]
    logits = problem["model"](**inputs).detach()
    margins, weights = [], []
    for b in range(len(labels)):
        total, ones, count = 0.0, 0.0, 0
        for t in range(LENGTH - 1):
            y = int(labels[b, t + 1])
            if y == -100:
                continue
            p = torch.softmax(logits[b, t], -1)[y]
            total += float(torch.log(p / (1 - p)))
            ones, count = ones + float(1 - p), count + 1
        margins.append(total)
        weights.append(ones / count)
    torch.testing.assert_close(lm.margin(logits, labels), torch.tensor(margins).double())
    torch.testing.assert_close(lm.margin_to_loss(logits, labels), torch.tensor(weights).double())


def test_completion_labels_mask_the_prompt(problem: dict) -> None:
    _, labels = problem["test"]
    assert bool((labels[:, :3] == lm.IGNORE_INDEX).all())
    assert bool((labels[:, 3:] != lm.IGNORE_INDEX).all())


def test_hessian_product_equals_autodiff(problem: dict) -> None:
    inputs, labels = problem["train"]
    logits = problem["model"](**inputs).detach()
    V = torch.randn(3, *logits.shape, dtype=logits.dtype)
    got = lm.hessian_product(logits, labels, V)
    for k in range(3):
        f = logits.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(lm.next_token_loss(f, labels).sum(), f, create_graph=True)
        (hv,) = torch.autograd.grad((g * V[k]).sum(), f)
        torch.testing.assert_close(got[k], hv, rtol=1e-5, atol=1e-7)


def test_sampled_labels_follow_the_model_and_keep_the_mask() -> None:
    logits = torch.zeros(4000, 3, 2)
    logits[..., 0] = torch.log(torch.tensor(0.7 / 0.3))  # p = (0.7, 0.3) at every position
    labels = torch.zeros(4000, 3, dtype=torch.long)
    labels[:, 2] = lm.IGNORE_INDEX
    drawn = lm.sample_labels(logits, labels, torch.Generator().manual_seed(0))
    assert bool((drawn[:, 2] == lm.IGNORE_INDEX).all())
    share = float((drawn[:, 1] == 0).double().mean())
    assert abs(share - 0.7) < 0.03  # 4,000 draws: the standard error is 0.007


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        (torch.full((2, LENGTH), 40), ["sequence 0", "outside the vocabulary"]),
        (torch.zeros(2, LENGTH).double(), ["integer token ids"]),
        (torch.zeros(2, LENGTH + 1, dtype=torch.long), ["aligned with input_ids"]),
    ],
    ids=["out-of-vocabulary", "float", "misaligned"],
)
def test_bad_token_labels_are_named(problem: dict, labels: torch.Tensor, words: list[str]) -> None:
    task = infkit.Task.language_modeling(problem["model"])
    inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
    inputs = {k: v[:2] for k, v in problem["test"][0].items()}
    with pytest.raises(InvalidInputError) as info:
        inf.scores((inputs, labels))
    message = str(info.value).replace("test set example", "sequence")
    for word in words:
        assert word in message, message


def test_labels_shifted_by_the_user_are_refused_and_aligned_ones_kept(problem: dict) -> None:
    """Labels already shifted (label t = token t + 1, the last -100) would be scored against the
    token two ahead; they are refused, naming the sequence. Aligned labels, a completion's, and
    a sequence of one repeated token (aligned either way) pass."""
    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
    inputs, labels = problem["test"]
    ids = inputs["input_ids"]
    shifted = torch.full_like(ids, lm.IGNORE_INDEX)
    shifted[:, :-1] = ids[:, 1:]
    with pytest.raises(InvalidInputError, match="test set example 0: its labels are its input_ids"):
        inf.scores((inputs, shifted))
    assert lm.check_shifted_labels(inputs, labels) is None  # the prompts' labels, aligned
    repeated = torch.full((2, LENGTH), 7)
    assert lm.check_shifted_labels(repeated, repeated.clone()) is None
    # one sequence aligned beside shifted ones: not the user's convention, left to the loss
    mixed = shifted.clone()
    mixed[1] = ids[1]
    assert lm.check_shifted_labels(inputs, mixed) is None


def _with_config(model: nn.Module, pad: int | None, bos: object = None, eos: object = None):  # type: ignore[no-untyped-def]
    """A copy of ``model`` carrying a Hugging Face-style ``config`` naming its special tokens."""
    copied = copy.deepcopy(model)
    copied.config = SimpleNamespace(pad_token_id=pad, bos_token_id=bos, eos_token_id=eos)
    return copied


def _padding_warnings(model: nn.Module, train: tuple) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit_identity(infkit.Task.language_modeling(model), train)
    return [str(w.message) for w in caught if "pad token" in str(w.message)]


def test_padding_without_an_attention_mask_is_warned_of(problem: dict) -> None:
    """A sequence that starts with the model's pad token (its configuration's pad_token_id), or
    ends with it scored, and comes without an attention_mask: the model reads the padding as
    tokens (left) or the loss predicts it (right), so the scores move with the padding. Both
    are warned of, naming the sequence, once a set; a mask, labels of -100 at right padding, a
    pad token that is also the first (bos) or, once, the last (eos) token, and a model whose
    configuration names no pad token, pass in silence."""
    pad = 5
    model = _with_config(problem["model"], pad, bos=1, eos=[2, 3])
    ids = problem["train"][0]["input_ids"].clone()
    ids[ids == pad] = 6
    right, left = ids.clone(), ids.clone()
    right[3, -4:] = pad
    right[7, -2:] = pad  # a second one: warned once
    left[4, :3] = pad
    (found,) = _padding_warnings(model, (right, right))
    assert found.startswith("training set example 3: its last 4 tokens are the model's pad token")
    assert "config.pad_token_id = 5" in found and "attention_mask" in found
    (found,) = _padding_warnings(model, ({"input_ids": left}, left))
    assert found.startswith("training set example 4: its first 3 tokens are the model's pad")
    # the padding is truly read: with its labels unscored, the padded sequence's loss is still
    # not the unpadded one's (the first token after the padding is unscored in both)
    task = infkit.Task.language_modeling(model)
    unscored_padding = left[4:5].clone()
    unscored_padding[:, :4] = lm.IGNORE_INDEX
    with torch.no_grad():
        padded = float(task.loss(model(left[4:5]), unscored_padding))
        unpadded = float(task.loss(model(left[4:5, 3:]), left[4:5, 3:]))
    assert abs(padded - unpadded) > 1e-3 * abs(unpadded)
    masked, masked_labels = lm.examples(right, (right != pad).long())
    unscored = right.clone()
    unscored[3, -4:] = lm.IGNORE_INDEX
    unscored[7, -2:] = lm.IGNORE_INDEX
    assert _padding_warnings(model, (masked, masked_labels)) == []
    assert _padding_warnings(model, ({"input_ids": right}, unscored)) == []
    assert _padding_warnings(_with_config(problem["model"], pad, bos=pad), (left, left)) == []
    one_eos = ids.clone()
    one_eos[3, -1] = pad
    assert _padding_warnings(_with_config(problem["model"], pad, eos=pad), (one_eos, one_eos)) == []
    assert _padding_warnings(_with_config(problem["model"], pad, eos=pad), (right, right)) != []
    assert _padding_warnings(_with_config(problem["model"], None), (right, right)) == []
    # no pad token named, but one end token: GPT-2 and Llama are padded with it (tokenizer.
    # pad_token = tokenizer.eos_token), counted as right padding from two on, as above
    eos_only = _with_config(problem["model"], None, bos=1, eos=pad)
    (found,) = _padding_warnings(eos_only, (right, right))
    assert found.startswith("training set example 3: its last 4 tokens are the model's end token")
    assert "config.eos_token_id = 5" in found and "tokenizer.eos_token" in found
    assert _padding_warnings(eos_only, (one_eos, one_eos)) == []
    (found,) = _padding_warnings(eos_only, ({"input_ids": left}, left))
    assert found.startswith("training set example 4: its first 3 tokens are the model's end")
    starts = ids.clone()
    starts[4, 0] = pad  # one end token first: a packed document's end, not padding
    assert _padding_warnings(eos_only, ({"input_ids": starts}, starts)) == []
    # a sequence ending with its own end token, then one pad (the same token) whose label is
    # -100, as examples() builds it: nothing scored at the padding (a reviewer's false warning)
    own_end = ids.clone()
    own_end[3, -2:] = pad
    unscored_pad = own_end.clone()
    unscored_pad[3, -1] = lm.IGNORE_INDEX
    for config in (eos_only, _with_config(problem["model"], pad, eos=pad)):
        assert _padding_warnings(config, ({"input_ids": own_end}, unscored_pad)) == []
        assert _padding_warnings(config, ({"input_ids": starts}, starts)) == []


class WrappedLM(nn.Module):
    """TinyLM's outputs turned into another form: ``"probabilities"`` (a final softmax),
    ``"tuple"`` (hidden states first, then the logits) or ``"bidirectional"`` (the logits of
    every position read the mean of the whole sequence: not causal)."""

    def __init__(self, base: nn.Module, form: str) -> None:
        super().__init__()
        self.base, self.form = base, form

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        logits = self.base(input_ids, attention_mask)
        if self.form == "probabilities":
            return logits.softmax(-1)
        if self.form == "tuple":
            return torch.cat([logits, logits], dim=-1), logits  # 2V "hidden" entries first
        whole = self.base.embed(input_ids).mean(1, keepdim=True)  # every position sees all
        return logits + self.base.head(whole)


def _fit_identity(task: infkit.Task, train: tuple) -> infkit.Influence:
    return infkit.Influence(task, "identity", l2=1e-2, checks=False).fit(train)


def _fit_quietly(task: infkit.Task, train: tuple) -> infkit.Influence:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        return _fit_identity(task, train)


def test_probabilities_are_refused_as_logits(problem: dict) -> None:
    task = infkit.Task.language_modeling(WrappedLM(problem["model"], "probabilities"))
    with pytest.raises(InvalidInputError, match=r"outputs are probabilities .* softmax"):
        _fit_quietly(task, problem["train"])


def test_a_tuple_with_the_logits_second_is_named_and_output_fn_picks_them(problem: dict) -> None:
    wrapped = WrappedLM(problem["model"], "tuple")
    with pytest.warns(Notice, match=rf"{2 * VOCAB} entries per position, its input embedding "):
        _fit_identity(infkit.Task.language_modeling(wrapped), problem["train"])
    picked = infkit.Task.language_modeling(wrapped, output_fn=lambda out: out[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no notice: the logits have the embedding's width
        S = _fit_identity(picked, problem["train"]).scores(problem["test"])
    expected = _fit_quietly(infkit.Task.language_modeling(problem["model"]), problem["train"])
    torch.testing.assert_close(S, expected.scores(problem["test"]), rtol=1e-12, atol=1e-15)


def test_a_model_that_is_not_causal_is_named(problem: dict) -> None:
    wrapped = WrappedLM(problem["model"], "bidirectional")
    with pytest.warns(
        UserWarning, match=r"training set example 0: the model is not causal: changing the "
    ):
        _fit_quietly(infkit.Task.language_modeling(wrapped), problem["train"])
    with warnings.catch_warnings():  # the causal model itself passes the probe
        warnings.simplefilter("error")
        _fit_quietly(infkit.Task.language_modeling(problem["model"]), problem["train"])


def test_the_causality_probe_stays_in_the_vocabulary_of_a_model_without_an_embedding() -> None:
    # a one-hot model has no nn.Embedding to read the vocabulary from: the probe took
    # max(ids) + 2 and fed the id V to a first sequence ending in V - 1 (a tester's crash,
    # "Class values must be smaller than num_classes"); it takes the logits' V now
    class OneHotLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mix, self.head = nn.Linear(VOCAB, 6), nn.Linear(6, VOCAB)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = nn.functional.one_hot(input_ids, VOCAB).double().cumsum(1)
            return self.head(torch.tanh(self.mix(x)))

    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (12, LENGTH))
    ids[0, -1] = VOCAB - 1
    task = infkit.Task.language_modeling(OneHotLM().double().eval())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        inf = infkit.Influence(task, "exact", l2=1e-2, checks=False).fit(lm.examples(ids[:8]))
        assert inf.scores(lm.examples(ids[[0, 9]])).shape == (2, 8)


def test_the_causality_probe_is_relative_to_small_logits() -> None:
    """A fresh model's logits of 0.22 moving 9.7e-5 at earlier positions (a tiny BERT's, a
    tester's) passed a tolerance of 1e-4 x max(largest logit, 1); relative to the logits it is
    named, and a causal model's exactly unmoved logits still pass, however small."""
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    logits = 0.22 * torch.rand(1, 5, VOCAB, generator=torch.Generator().manual_seed(0))

    def moved_by(amount: float):  # the earlier positions move by `amount` when a token changes
        return lambda inputs: logits + amount

    assert "not causal" in (lm.check_causal(moved_by(9.7e-5), ids, logits) or "")
    assert lm.check_causal(moved_by(0.0), ids, logits) is None
    assert lm.check_causal(moved_by(1e-6), ids, logits) is None  # rounding's size
    small = 1e-6 * logits
    assert lm.check_causal(lambda inputs: small.clone(), ids, small) is None


def test_the_causality_probe_leaves_non_finite_logits_to_the_finite_check() -> None:
    """A model whose logits are NaN (a tester's left-padded float64 Llama with eager attention)
    got "not causal ... moved by up to nan" before the finite check named the cause; the probe
    now says nothing about such logits, and a bidirectional model is still named."""
    ids = torch.tensor([[1, 2, 3, 4]])
    nan = torch.full((1, 4, VOCAB), float("nan"))
    assert lm.check_causal(lambda inputs: nan, ids, nan) is None
    logits = torch.randn(1, 4, VOCAB)
    moved = lm.check_causal(lambda inputs: logits + 1.0, ids, logits)
    assert moved is not None and "not causal" in moved


def test_the_exact_ggn_factors_of_many_outputs_warn_of_their_cost(problem: dict) -> None:
    task = infkit.Task.language_modeling(problem["model"])
    c = LENGTH * VOCAB  # 77 outputs per sequence, above max_exact_outputs=64
    with pytest.warns(UserWarning) as caught:
        _fit_kfac(task, problem["train"], fisher="ggn")
    said = [str(w.message) for w in caught if "fisher='ggn' pulls back" in str(w.message)]
    assert len(said) == 1  # once per fit
    assert said[0].startswith(f"fisher='ggn' pulls back every one of the {c} outputs")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _fit_kfac(task, problem["train"], fisher="ggn", max_exact_outputs=c)


def _fit_kfac(task: infkit.Task, train: tuple, **options: object) -> infkit.Influence:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        return infkit.Influence(task, "kfac", damping=1e-2, checks=False, **options).fit(train)


# ============================================================================ curvature
def test_cg_with_the_token_hessian_product_equals_exact(problem: dict) -> None:
    # exact forms Lambda densely by autodiff; cg uses lm.hessian_product: the same GGN
    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = infkit.Influence(task, "exact", l2=1e-2, damping=1e-2).fit(problem["train"])
        cg = infkit.Influence(task, "cg", l2=1e-2, damping=1e-2, tol=1e-11).fit(problem["train"])
    S = exact.scores(problem["test"])
    assert float((cg.scores(problem["test"]) - S).norm() / S.norm()) < 1e-7


def test_ggn_products_in_chunks_of_directions_equal_all_at_once(problem: dict) -> None:
    """A language model's output products are [k, B, T x V]: taken two directions at a time
    when ``work_bytes`` holds two, with the same result as all k at once."""
    from infkit import curvature
    from infkit.gradients import PerExample
    from infkit.parameters import ParameterSpace

    task = infkit.Task.language_modeling(problem["model"])
    space = ParameterSpace(task.model)
    engine, train = PerExample(task, space), ExampleSet(problem["train"])
    V = torch.randn(5, space.size, dtype=torch.float64)
    whole = curvature.CurvatureOperator(engine, train, "ggn", batch_size=8).matmat(V)
    two = 2 * curvature.product_direction_bytes(8 * LENGTH * VOCAB, space.size, 4)
    assert curvature.product_chunk(5, 8 * LENGTH * VOCAB, space.size, 4, two) == 2
    chunked = curvature.CurvatureOperator(engine, train, "ggn", batch_size=8, work_bytes=two)
    torch.testing.assert_close(chunked.matmat(V), whole, rtol=1e-12, atol=1e-14)


class _AdaptedLM(nn.Module):
    """TinyLM's head with a low-rank adapter beside it, as peft's LoRA layers hold one: the
    attributes peft's layers carry (active_adapters, disable_adapters, merged), the adapter
    called only while active and not disabled, the base frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 4)
        self.head = nn.Linear(4, VOCAB)
        self.lora = nn.ModuleDict({"default": nn.Linear(4, VOCAB), "other": nn.Linear(4, VOCAB)})
        self.active_adapters = ["default"]
        self.disable_adapters = False
        self.merged = False
        for p in [*self.embed.parameters(), *self.head.parameters()]:
            p.requires_grad_(False)
        for p in self.lora["other"].parameters():
            p.requires_grad_(False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = torch.tanh(self.embed(input_ids))
        out = self.head(h)
        if not self.disable_adapters:
            for name in self.active_adapters:
                out = out + self.lora[name](h)
        return out


def test_adapters_switched_after_fit_are_refused_by_every_question(problem: dict) -> None:
    """A tester's peft model: set_adapter('other') or disable_adapter() after fit left every
    attributed weight as it was, and every score became exactly 0 with a warning about the
    queries. Each question now names the adapters' change; set back, the answers return."""
    torch.manual_seed(0)
    model = _AdaptedLM().double().eval()
    task = infkit.Task.language_modeling(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "identity").fit(problem["train"])
    before = inf.scores(problem["test"])
    assert bool((before != 0).any())
    questions = [
        lambda: inf.scores(problem["test"]),
        inf.self_scores,
        lambda: inf.top_k(problem["test"], 3),
        lambda: inf.remove([0, 1]),
    ]
    for change, said in (
        (lambda: setattr(model, "disable_adapters", True), r"disabled \(disable_adapter\(\)\)"),
        (lambda: setattr(model, "active_adapters", ["other"]), r"adapter\(s\) 'other' active now"),
    ):
        change()
        for ask in questions:
            with pytest.raises(InvalidInputError, match=r"the model's adapters changed since fit"):
                ask()
        with pytest.raises(InvalidInputError, match=said):
            inf.scores(problem["test"])
        model.disable_adapters, model.active_adapters = False, ["default"]
    assert torch.equal(inf.scores(problem["test"]), before)


def test_a_model_changed_after_fit_is_refused_by_every_question(problem: dict) -> None:
    """A weight edited after fit (attributed, or left out of the attribution like the
    embeddings under EK-FAC) is named by every question; restored, the answers come back
    unchanged."""
    model = TinyLM().double().eval()
    model.load_state_dict(problem["model"].state_dict())
    task = infkit.Task.language_modeling(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
    before = inf.scores(problem["test"])
    questions = [
        lambda: inf.scores(problem["test"]),
        inf.self_scores,
        lambda: inf.top_k(problem["test"], 3),
        lambda: inf.remove([0, 1]),
        lambda: inf.module_scores(problem["test"]),
        lambda: inf.token_scores(problem["test"]),
    ]
    for parameter in (model.head.weight, model.embed.weight):  # attributed, left out
        saved = parameter.detach().clone()
        with torch.no_grad():
            parameter.mul_(1.5)
        name = "head.weight" if parameter is model.head.weight else "embed.weight"
        for ask in questions:
            with pytest.raises(InvalidInputError, match=rf"'{name}' changed since fit"):
                ask()
        with torch.no_grad():
            parameter.copy_(saved)
    assert torch.equal(inf.scores(problem["test"]), before)


class _NanWherePadded(TinyLM):
    """TinyLM whose logits are NaN for every sequence with padding (as Hugging Face's eager
    attention gives in float64 with left padding)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        logits = super().forward(input_ids, attention_mask)
        if attention_mask is None:
            return logits
        padded = (attention_mask == 0).any(dim=1).reshape(-1, 1, 1)
        return torch.where(padded, torch.full_like(logits, float("nan")), logits)


def test_non_finite_outputs_on_the_streamed_kronecker_path_name_the_example(
    problem: dict,
) -> None:
    """Without the gradient cache (a large model's path) a NaN output is named before any
    covariance is formed, as on the cached path: the example and the padding hint."""
    from infkit.kfac import factors

    model = _NanWherePadded().double().eval()
    model.load_state_dict(problem["model"].state_dict())
    task = infkit.Task.language_modeling(model)
    limit = _limit_for_queries(problem, 2, batch_size=2)  # below the gradient cache
    for method in ("ekfac", "kfac"):
        inf = infkit.Influence(task, method, l2=1e-2, damping=1e-2, memory_limit=limit)
        with pytest.raises(NonFiniteError, match=r"example 2 of the training set.*attention_mask"):
            inf.fit(problem["train"])  # example 2 is the padded one
    with pytest.raises(NonFiniteError, match="Kronecker factor"):  # a backward that overflowed
        factors._eigh(torch.tensor([[1.0, float("inf")], [float("inf"), 1.0]]))


def test_ekfac_leaves_unsupported_parameters_out_with_a_notice(problem: dict) -> None:
    task = infkit.Task.language_modeling(problem["model"])
    with pytest.warns(Notice, match="embed.weight") as record:
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
    assert "norm.weight" in str(record[0].message)
    assert inf.n_params == sum(
        p.numel() for m in (task.model.mix, task.model.head) for p in m.parameters()
    )
    with pytest.raises(UnsupportedError, match="not in a layer it tracks"):
        infkit.Influence(task, "ekfac", l2=1e-2, unsupported="error")


def test_rif_and_newton_refuse_output_jacobians_beyond_the_memory_limit(
    problem: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rif and newton hold each example's output Jacobian J_j [C = T x V, P]: within the
    memory limit rif runs; beyond it rif is refused at fit, before the method's own fit, and
    rif/newton answers of an IF fit at their first use, naming C, P and 'if'."""
    task = infkit.Task.language_modeling(problem["model"])
    settings = {"l2": 1e-2, "damping": 1e-2, "batch_size": 4}
    tight = {"memory_limit": 512 << 10, **settings}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roomy = infkit.Influence(task, "cg", estimator="rif", **settings).fit(problem["train"])
        plain = infkit.Influence(task, "cg", **tight).fit(problem["train"])
    assert roomy.scores(problem["test"]).isfinite().all()
    c, p = LENGTH * VOCAB, plain.n_params
    # beyond JACOBIAN_WARNING_OUTPUTS outputs an example, the cost is said before it is paid
    monkeypatch.setattr("infkit.fitted.JACOBIAN_WARNING_OUTPUTS", c - 1)
    with pytest.warns(UserWarning, match=rf"{c} backward passes each, {N * c:,} in all"):
        roomy.self_scores()
    assert 4 * 2 * c * p * 8 > 512 << 10  # four examples' J and H^-1 J^T overflow the limit
    shapes = rf"C = {LENGTH} x {VOCAB} = {c} outputs and P = {p}.*estimator 'if'"
    with pytest.raises(UnsupportedError, match=shapes) as refused:
        infkit.Influence(task, "cg", estimator="rif", **tight).fit(problem["train"])
    # the bytes named are those of what it names (a tester read 29.6 GiB for J_j alone: 14.5)
    assert "J_j [C, P], its solve H^-1 J_j^T [P, C] and Lambda_j [C, C]" in str(refused.value)
    assert f"{human_bytes(4 * (2 * c * p + c * c) * 8)} for 4 example(s)" in str(refused.value)
    with pytest.raises(UnsupportedError, match=shapes):
        plain.with_estimator("rif").scores(problem["test"])
    with pytest.raises(UnsupportedError, match="estimator 'newton' needs"):
        plain.with_estimator("newton").self_scores()
    assert plain.scores(problem["test"]).isfinite().all()  # IF needs no Jacobian


# ============================================================================ streaming
@pytest.mark.parametrize(
    ("method", "dtype", "slabs"),
    [
        ("ekfac", torch.float64, True),
        ("ekfac", torch.float32, True),
        ("ekfac", torch.float32, False),  # blocks made whole, as for long sequences
        ("kfac", torch.float64, True),
    ],
)
def test_streamed_scores_equal_the_cached_path(
    problem: dict, method: str, dtype: torch.dtype, slabs: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scores streamed from the layers' hooks (per-example blocks made a slab of rows at a
    time for these short sequences, or whole) equal those of the cached [N, P] gradients."""
    if slabs:  # (the products in slabs on any number of threads)
        assert LENGTH <= infkit.layers.capture.SLAB_MAX_POSITIONS
        monkeypatch.setattr(infkit.layers.capture, "INNER_SLAB_MAX_THREADS", 1 << 10)
    else:
        monkeypatch.setattr(infkit.layers.capture, "SLAB_MAX_POSITIONS", 0)
    model = TinyLM().to(dtype).eval()
    model.load_state_dict(problem["model"].state_dict())
    task = infkit.Task.language_modeling(model)
    options = {"l2": 1e-2, "damping": 1e-2, "batch_size": 2}
    # a memory limit below the [N, P] gradient cache, holding the Q queries: scores stream
    limit = _limit_for_queries({**problem, "model": model}, Q, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        cached = infkit.Influence(task, method, **options).fit(problem["train"])
        streamed = infkit.Influence(task, method, memory_limit=limit, **options)
        streamed.fit(problem["train"])
    assert cached.fitted.train_gradients is not None
    assert streamed.fitted.train_gradients is None
    tol = {"rtol": 1e-9, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(
        streamed.scores(problem["test"]).double(), cached.scores(problem["test"]).double(), **tol
    )
    torch.testing.assert_close(
        streamed.self_scores().double(), cached.self_scores().double(), **tol
    )
    assert streamed.describe()["query_rank"] is None


def test_queries_read_only_through_a_custom_measurement_need_no_scored_token(
    problem: dict,
) -> None:
    """A measurement that reads no label (a logit at the last position) scores one-token
    queries and queries whose labels are all -100, which the loss refuses: identity against
    autograd's (1/N) grad m_t . grad l_j, EK-FAC streamed under a memory limit against its
    cached path. The same sets read through the loss (a training set, the loss's queries), or
    through a measurement that reads the labels, stay refused."""
    model = problem["model"]

    def last_logit(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs[:, -1, 3]

    task = infkit.Task.language_modeling(model).with_measurement(last_logit, higher_is_better=True)
    ids = torch.randint(0, VOCAB, (3, 1), generator=torch.Generator().manual_seed(1))
    one_token = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, ids.clone())
    # the builder the docs recommend refused them, blaming a mask or prompt never given (a
    # tester's): it names the one token and takes allow_unscored=True
    with pytest.raises(
        InvalidInputError,
        match=r"it has one token, which nothing predicts.*"
        "allow_unscored=True",
    ):
        lm.examples(ids)
    built = lm.examples(ids, torch.ones_like(ids), allow_unscored=True)
    assert torch.equal(built[1], ids)  # a first token is never scored: nothing predicts it
    inputs, labels = problem["test"]
    masked = (inputs, torch.full_like(labels, lm.IGNORE_INDEX))

    params = [p for p in model.parameters() if p.requires_grad]

    def flat_gradient(value: torch.Tensor) -> torch.Tensor:
        grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
        return torch.cat(
            [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]
        )

    train_inputs, train_labels = problem["train"]
    logits = model(**train_inputs)
    losses = lm.next_token_loss(logits, train_labels)
    G = torch.stack([flat_gradient(losses[j]) for j in range(N)])
    inf = infkit.Influence(task, "identity", l2=0.0).fit(problem["train"])
    for queries in (one_token, masked, built):
        m = last_logit(model(**queries[0]), queries[1])
        expected = torch.stack([flat_gradient(m[t]) for t in range(len(m))]) @ G.T / N
        torch.testing.assert_close(inf.scores(queries), expected, rtol=1e-10, atol=1e-12)

    options = {"l2": 1e-2, "damping": 1e-2, "batch_size": 2}
    limit = _limit_for_queries(problem, Q, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        cached = infkit.Influence(task, "ekfac", **options).fit(problem["train"])
        streamed = infkit.Influence(task, "ekfac", memory_limit=limit, **options)
        streamed.fit(problem["train"])
    assert streamed.fitted.train_gradients is None
    for queries in (one_token, masked):
        scores = streamed.scores(queries)
        assert bool(scores.abs().max() > 0)
        torch.testing.assert_close(scores, cached.scores(queries), rtol=1e-9, atol=1e-12)

    with pytest.raises(InvalidInputError, match="one token long, so they have no token to score"):
        infkit.Influence(task, "identity").fit(one_token)
    loss_read = infkit.Influence(infkit.Task.language_modeling(model), "identity").fit(
        problem["train"]
    )
    with pytest.raises(InvalidInputError, match="test set example 0: the sequence has no token"):
        loss_read.scores(masked)
    # a measurement that reads the labels (a completion's log-likelihood, the margin) has
    # nothing to measure on them either: refused, where its scores would all be 0
    nothing_to_read = "the measurement's gradient in the model's outputs is 0 on this example"
    for reads_labels in (lambda out, y: -lm.next_token_loss(out, y), lm.margin):
        measured = infkit.Influence(
            infkit.Task.language_modeling(model).with_measurement(reads_labels), "identity"
        ).fit(problem["train"])
        for queries in (one_token, masked):
            with pytest.raises(InvalidInputError, match=nothing_to_read):
                measured.scores(queries)

    # each such query is probed, not the first only: here query 0 carries a token in label 0,
    # which this measurement reads; query 2 carries none, and is named
    def answer_or_completion(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        answer = targets[:, 0].clamp_min(0)
        kept = (targets[:, 0] != lm.IGNORE_INDEX).to(outputs.dtype)
        last = outputs[:, -1].log_softmax(-1).gather(1, answer[:, None])[:, 0]
        return kept * last - lm.next_token_loss(outputs, targets)

    mixed = masked[1].clone()
    mixed[0, 0] = 5
    measured = infkit.Influence(
        infkit.Task.language_modeling(model).with_measurement(answer_or_completion), "identity"
    ).fit(problem["train"])
    with pytest.raises(InvalidInputError, match="test set example 1: " + nothing_to_read):
        measured.scores((inputs, mixed))
    mixed[:, 0] = 5
    assert bool(measured.scores((inputs, mixed)).abs().amax(dim=1).gt(0).all())
    # a measurement that does not depend on the outputs at all: named, not PyTorch's error
    detached = infkit.Task.language_modeling(model).with_measurement(
        lambda out, y: out.detach()[:, -1, 3]
    )
    with pytest.raises(InvalidInputError, match="test set example 0: " + nothing_to_read):
        infkit.Influence(detached, "identity").fit(problem["train"]).scores(one_token)


def test_a_query_whose_measurement_does_not_move_is_named(problem: dict) -> None:
    """A query with scored labels whose measurement is flat in the parameters (it reads a label
    that is -100 there) scores a row of exact zeros: a warning names it, on the cached path
    (identity), at each checkpoint of TracInCP, from TRAK's projected gradients and on the
    streamed Kronecker path (EK-FAC under a memory limit)."""
    model = problem["model"]

    def last_label_logit(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        kept = (targets[:, -1] != lm.IGNORE_INDEX).to(outputs.dtype)
        return kept * outputs[:, -2].gather(1, targets[:, -1:].clamp_min(0))[:, 0]

    task = infkit.Task.language_modeling(model).with_measurement(last_label_logit)
    inputs, labels = problem["test"]
    labels = labels.clone()
    labels[1, -1] = lm.IGNORE_INDEX  # query 1 keeps its other scored labels
    limit = _limit_for_queries(problem, Q, batch_size=2)
    options = {"l2": 1e-2, "damping": 1e-2, "batch_size": 2}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    tracin = {"checkpoints": [state, state], "learning_rates": [0.1, 0.2]}
    for method, extra in (
        ("identity", {}),
        ("identity", tracin),  # the gradients at each checkpoint
        ("trak", {}),
        ("ekfac", {"memory_limit": limit}),
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf = infkit.Influence(task, method, **options, **extra).fit(problem["train"])
        with pytest.warns(
            UserWarning,
            match=r"test set example 1: the gradient of the measurement .* every score of it is 0",
        ) as caught:
            scores = inf.scores((inputs, labels))
        assert not any("example 0" in str(w.message) for w in caught), method
        assert bool((scores[1] == 0).all()) and bool((scores[[0, 2, 3]] != 0).any(dim=1).all())
        if method == "ekfac":
            assert inf.fitted.train_gradients is None  # the streamed path


def test_low_rank_queries(problem: dict) -> None:
    task = infkit.Task.language_modeling(problem["model"])
    options = {"l2": 1e-2, "damping": 1e-2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        full = infkit.Influence(task, "ekfac", **options).fit(problem["train"])
        S = full.scores(problem["test"])
        errors, kept = [], []
        for rank in (1, 3, 6):  # 6 = the smallest block dimension: exact
            inf = infkit.Influence(task, "ekfac", query_rank=rank, **options).fit(problem["train"])
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                errors.append(float((inf.scores(problem["test"]) - S).norm() / S.norm()))
            # rank 6 stores no layer at low rank: its factors would be larger than the blocks
            assert inf.describe()["query_rank"] == (rank if rank < 6 else None)
            kept.append(inf.describe()["query_kept_energy"])
            warned = [
                str(w.message) for w in said if "of a layer's preconditioned" in str(w.message)
            ]
            assert bool(warned) == (kept[-1] is not None and kept[-1] < KEPT_ENERGY), warned
            # (a rank asked for: memory played no part, so its remedy is the rank; a tester's
            # was told to raise memory_limit)
            assert all("raise query_rank" in w and "memory_limit to" not in w for w in warned)
        # the share of each query's preconditioned block its top singular values hold, by numpy
        scorer = full.method._scorer(CallResult(Q * N * 8))
        blocks = scorer.queries(ExampleSet(problem["test"])).full
    assert errors[-1] < 1e-10
    assert errors[0] > errors[1] > errors[2]
    for rank, figure in zip((1, 3), kept[:2], strict=True):
        least = 1.0
        for t in scorer.tracked:
            if kept_at_rank(t, rank):
                values = np.linalg.svd(blocks[t.name].double().numpy(), compute_uv=False) ** 2
                least = min(least, float((values[:, :rank].sum(1) / values.sum(1)).min()))
        assert figure == pytest.approx(least, rel=1e-5), (rank, figure, least)
    assert kept[0] < 0.99 and kept[2] is None  # (rank 1 warned: a tester's was 55% off)


def _limit_for_queries(problem: dict, k: float, batch_size: int = 64) -> int:
    """A memory_limit whose query budget (the limit less the factors, a pass's working memory
    and the [Q, N] float64 scores of the test set) holds k preconditioned queries of the tiny
    LM (119 numbers each)."""
    model = problem["model"]
    task = infkit.Task.language_modeling(model)
    big = 10**9
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(
            task, "ekfac", l2=1e-2, damping=1e-2, memory_limit=big, batch_size=batch_size
        ).fit(problem["train"])
    overhead = big - query_budget(inf.fitted, inf.method.kronecker(), Q * N * 8)
    item = next(model.parameters()).element_size()
    return overhead + int(k * 119 * item) + 4


def _unbounded_scores(task: infkit.Task, problem: dict, opts: dict) -> torch.Tensor:
    """The test set's scores of an EK-FAC fit without a memory_limit, every query held."""
    free = infkit.Influence(task, "ekfac", **opts).fit(problem["train"])
    return free.method.scores(ExampleSet(problem["test"]), free.estimator_spec)


def _read_buffer(room: int) -> int:
    """The read buffer of the tiny LM's queries kept on disk within ``room`` bytes: as many
    queries of a layer (77 and 42 float64 numbers) as fit, for the layer whose chunk is
    largest."""
    return max(min(Q, room // (size * 8)) * size * 8 for size in (77, 42))


def test_plan_groups_by_hand() -> None:
    # layer blocks of 3, 5 and 4 bytes per query
    assert plan_groups(4, [3, 5, 4], None) == [(0, 4, (0, 1, 2))]
    assert plan_groups(4, [3, 5, 4], 48) == [(0, 4, (0, 1, 2))]
    assert plan_groups(4, [3, 5, 4], 24) == [(0, 2, (0, 1, 2)), (2, 4, (0, 1, 2))]
    # one query (12 bytes) does not fit 9: layers packed in order, as many queries as fit
    assert plan_groups(3, [3, 5, 4], 9) == [
        (0, 1, (0, 1)),
        (1, 2, (0, 1)),
        (2, 3, (0, 1)),
        (0, 2, (2,)),
        (2, 3, (2,)),
    ]
    assert plan_groups(3, [3, 5, 4], 4) is None  # the 5-byte layer alone does not fit


def test_low_rank_groups_by_hand() -> None:
    # rank-1 factors of 10 bytes a query: 4 queries at rank 1 in 35 bytes do not fit, 3 do
    assert low_rank_groups(4, 10, 2, 45) == ([(0, 4, (0, 1))], 1)
    assert low_rank_groups(4, 10, 2, 80) == ([(0, 4, (0, 1))], 2)
    assert low_rank_groups(4, 10, 2, 35) == ([(0, 3, (0, 1)), (3, 4, (0, 1))], 1)
    assert low_rank_groups(4, 10, 2, 9) == ([(i, i + 1, (0, 1)) for i in range(4)], 0)


def test_an_asked_query_rank_keeps_memory_limit_in_groups_of_queries(
    problem: dict, tmp_path
) -> None:
    """query_rank=1 under a limit whose budget holds one query at rank 1, not all: a pass per
    query, the scores query_rank=1 gives unbounded, the plan foreseeing the passes (a tester's
    query_rank=2 scored every query in one pass at a limit that refused them without it); a
    limit that holds not even one query at rank 1 is warned of at fit and refused by scores()."""
    task = infkit.Task.language_modeling(problem["model"])
    opts = {"l2": 1e-2, "damping": 1e-2, "batch_size": 64, "query_rank": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = infkit.Influence(task, "ekfac", **opts).fit(problem["train"])
        expected = expected.scores(problem["test"])
        limit = _limit_for_queries(problem, 0.39)  # 46 numbers; rank 1 of a query: 31
        bounded = infkit.Influence(task, "ekfac", memory_limit=limit, **opts)
        plan = bounded.plan(problem["train"], problem["test"], timed=False)
        S = bounded.fit(problem["train"]).scores(problem["test"])
    assert bounded.describe()["query_groups"] == Q and bounded.describe()["query_rank"] == 1
    assert relative_error(S, expected) < 1e-6
    # the figures are kept with a save, the share kept too (a reviewer's came back None)
    kept = bounded.describe()["query_kept_energy"]
    assert kept is not None and 0 < kept < 1
    bounded.save(tmp_path / "saved")
    loaded = infkit.Influence.load(tmp_path / "saved", task)
    assert loaded.describe()["query_kept_energy"] == kept
    scores = next(stage for stage in plan.stages if stage.name == "scores")
    assert scores.passes == Q and not any(stage.refused for stage in plan.stages)

    # a call of one query holds 3 x N = 60 numbers fewer scores: 24 numbers left for it, even
    # beside a scoring pass over batches of one (which smaller batches would otherwise take)
    tight = _limit_for_queries(problem, -0.3, batch_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        refused = infkit.Influence(task, "ekfac", memory_limit=tight, **opts)
        plan = refused.plan(problem["train"], problem["test"], timed=False)
        with pytest.warns(UserWarning, match="at query_rank=1"):
            refused.fit(problem["train"])
        with pytest.raises(ProblemTooLargeError, match="at query_rank=1"):
            refused.scores(problem["test"])
    assert any(stage.refused for stage in plan.stages if stage.name == "queries")


def test_queries_beyond_rank_one_are_scored_in_groups_at_low_rank(problem: dict) -> None:
    """A budget below one layer of one query and below rank 1 of every query, above rank 1 of
    one: each query at rank 1 in its own pass (a tester's 8 queries were refused there, while
    one at a time scored), each row what query_rank=1 gives that query."""
    task = infkit.Task.language_modeling(problem["model"])
    opts = {"l2": 1e-2, "damping": 1e-2, "batch_size": 64}
    limit = _limit_for_queries(problem, 0.39)  # 46 of a query's 119 numbers
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bounded = infkit.Influence(task, "ekfac", memory_limit=limit, **opts).fit(problem["train"])
        scorer = bounded.method._scorer(CallResult(Q * N * 8))
        rank_one = scorer._rank_one_bytes(scorer.tracked)
        # the case: no layer of a query fits, rank 1 of one query does, of all queries not
        assert max(scorer._layer_bytes(scorer.tracked)) > scorer.query_bytes
        assert rank_one <= scorer.query_bytes < Q * rank_one
        plan = bounded.plan(problem["train"], problem["test"])
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            S = bounded.scores(problem["test"])
        ranked = infkit.Influence(task, "ekfac", query_rank=1, **opts).fit(problem["train"])
        expected = ranked.scores(problem["test"])
    assert bounded.describe()["query_rank"] == 1
    assert bounded.describe()["query_groups"] == Q
    # the share of the gradients rank 1 keeps, as query_rank=1 measures it (said in a warning)
    kept = bounded.describe()["query_kept_energy"]
    assert kept == pytest.approx(ranked.describe()["query_kept_energy"], rel=1e-6) and kept < 1
    told = [w for w in said if "of a layer's preconditioned gradient" in str(w.message)]
    assert len(told) == (1 if kept < KEPT_ENERGY else 0)  # once for the call's Q groups
    assert all("raise memory_limit to hold" in str(w.message) for w in told)
    # (float64; the top singular vector of a block amplifies the rounding of a query batch of
    # one against one of four by 1 / its singular gap: 4e-8 measured, where rank 1 against
    # full rank differs by about 1e-1, test_low_rank_queries)
    assert relative_error(S, expected) < 1e-6
    queries = next(stage for stage in plan.stages if stage.name == "queries")
    scores = next(stage for stage in plan.stages if stage.name == "scores")
    assert not queries.refused and scores.passes == Q
    # three queries in groups of two and one: the last, smaller group at the same rank 1
    three = ExampleSet(problem["test"]).subset([0, 1, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # 520 bytes for the queries of three (the [3, N] scores take N * 8 fewer than Q's)
        limit = _limit_for_queries(problem, (520 - 4 - N * 8) / (119 * 8))
        bounded = infkit.Influence(task, "ekfac", memory_limit=limit, **opts).fit(problem["train"])
        scorer = bounded.method._scorer(CallResult(3 * N * 8))
        assert scorer.groups(3) == [(0, 2, (0, 1)), (2, 3, (0, 1))], scorer.query_bytes
        S3 = bounded.scores(three)
    assert bounded.describe()["query_rank"] == 1
    assert relative_error(S3, expected[:3]) < 1e-6


def test_queries_beyond_the_budget_are_scored_in_groups_with_the_same_scores(
    problem: dict,
) -> None:
    task = infkit.Task.language_modeling(problem["model"])
    opts = {"l2": 1e-2, "damping": 1e-2, "batch_size": 2}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        limit = _limit_for_queries(problem, 2, batch_size=2)  # below the gradient cache
        bounded = infkit.Influence(task, "ekfac", memory_limit=limit, **opts)
        bounded.fit(problem["train"])
        expected = _unbounded_scores(task, problem, opts)
    torch.testing.assert_close(bounded.scores(problem["test"]), expected, rtol=1e-10, atol=1e-13)
    assert bounded.describe()["query_groups"] == 2
    assert bounded.describe()["query_rank"] is None
    # 0.75 of one query: layer by layer (mix: 42 numbers, two queries a pass; head: 77, one)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        limit = _limit_for_queries(problem, 0.75, batch_size=2)
        layered = infkit.Influence(task, "ekfac", memory_limit=limit, **opts)
        S = layered.fit(problem["train"]).scores(problem["test"])
    torch.testing.assert_close(S, expected, rtol=1e-10, atol=1e-13)
    assert layered.describe()["query_groups"] == 2 + 4
    assert layered.describe()["query_rank"] is None


@pytest.mark.parametrize("fraction", [2, 0.75])  # two queries a chunk; one, layer by layer
def test_queries_beyond_the_budget_are_kept_on_disk_with_the_same_scores(
    problem: dict, tmp_path, fraction: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CPU with a factors_dir, queries beyond their budget are written to a scratch directory
    of its store and read back a chunk at a time for every batch: one pass instead of a pass per
    group, the scores of the queries held in memory, the scratch files gone afterwards, and the
    plan foreseeing it; queries_on_disk=False keeps the groups."""
    task = infkit.Task.language_modeling(problem["model"])
    opts = {"l2": 1e-2, "damping": 1e-2, "batch_size": 2}
    factors = tmp_path / "factors"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        expected = _unbounded_scores(task, problem, opts)
        limit = _limit_for_queries(problem, fraction, batch_size=2)
        spilled = infkit.Influence(task, "ekfac", memory_limit=limit, factors_dir=factors, **opts)
        plan = spilled.plan(problem["train"], problem["test"], timed=False)
        S = spilled.fit(problem["train"]).scores(problem["test"])
        grouped = infkit.Influence(
            task, "ekfac", memory_limit=limit, factors_dir=factors, queries_on_disk=False, **opts
        )
        grouped_scores = grouped.fit(problem["train"]).scores(problem["test"])
    torch.testing.assert_close(S, expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(grouped_scores, expected, rtol=1e-10, atol=1e-13)
    described = spilled.describe()
    assert described["query_groups"] == 1 and described["query_rank"] is None
    assert described["queries_on_disk"] == Q * 119 * 8  # every query's 119 float64 numbers
    assert grouped.describe()["query_groups"] == (2 if fraction == 2 else 2 + 4)
    assert grouped.describe()["queries_on_disk"] == 0
    assert not [p.name for p in factors.iterdir() if "queries" in p.name]  # scratch removed
    stages = {stage.name: stage for stage in plan.stages}
    assert stages["scores"].passes == 1
    assert "kept on disk and read back layer by layer" in stages["queries"].note
    if fraction == 2:  # forced, without a workdir or factors_dir: the system's temporary dir
        system = tmp_path / "system"
        system.mkdir()
        monkeypatch.setattr(tempfile, "tempdir", str(system))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Notice)
            forced = infkit.Influence(
                task, "ekfac", memory_limit=limit, queries_on_disk=True, **opts
            )
            forced_scores = forced.fit(problem["train"]).scores(problem["test"])
        torch.testing.assert_close(forced_scores, expected, rtol=1e-10, atol=1e-13)
        assert forced.describe()["queries_on_disk"] == Q * 119 * 8
        assert list(system.iterdir()) == []  # removed after the scores
    # the read buffer: as many queries of a layer (77 and 42 numbers) as fit the budget, for
    # the layer whose chunk is largest; with the factors set aside during the scoring pass
    # (committed in factors_dir) their room is the buffer's too
    room = int(fraction * 119 * 8) + 4 + factor_bytes(spilled.method.kronecker())
    assert stages["queries"].largest == ("queries' read buffer", _read_buffer(room))
    assert _read_buffer(room) <= room


def test_factors_set_aside_leave_their_room_to_the_queries_on_disk(problem: dict, tmp_path) -> None:
    """A limit whose query budget, after the factors, holds not even rank 1 of every query: kept
    in memory the queries are scored at rank 1, one group of queries a pass, and the plan says
    so. With the factors committed in
    factors_dir, the scoring pass sets them aside, so the queries are kept on disk and read back
    in a buffer that takes the factors' room: the exact scores, in one pass."""
    task = infkit.Task.language_modeling(problem["model"])
    opts = {"l2": 1e-2, "damping": 1e-2, "batch_size": 2}
    # 289 bytes: under one query's head block (77 x 8) and every query at rank 1 (4 x 31 x 8)
    limit = _limit_for_queries(problem, 0.3, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        expected = _unbounded_scores(task, problem, opts)
        held = infkit.Influence(task, "ekfac", memory_limit=limit, **opts)
        held_plan = held.plan(problem["train"], problem["test"], timed=False)
        held.fit(problem["train"])
        held.scores(problem["test"])
        spilled = infkit.Influence(
            task, "ekfac", memory_limit=limit, factors_dir=tmp_path / "factors", **opts
        )
        plan = spilled.plan(problem["train"], problem["test"], timed=False)
        S = spilled.fit(problem["train"]).scores(problem["test"])
    assert not any(stage.refused for stage in held_plan.stages)
    assert held.describe()["query_rank"] == 1 and held.describe()["query_groups"] == Q
    assert [s.passes for s in held_plan.stages if s.name == "scores"] == [Q]
    torch.testing.assert_close(S, expected, rtol=1e-10, atol=1e-13)
    described = spilled.describe()
    assert described["queries_on_disk"] == Q * 119 * 8
    assert described["query_groups"] == 1 and described["query_rank"] is None
    stages = {stage.name: stage for stage in plan.stages}
    assert not any(stage.refused for stage in plan.stages)
    assert "kept on disk" in stages["queries"].note and stages["scores"].passes == 1
    # the buffer holds what the factors' room and the 289 bytes fit (the head's 77 numbers a
    # query: every query of the head at once needs 2,464 bytes)
    room = int(0.3 * 119 * 8) + 4 + factor_bytes(spilled.method.kronecker())
    assert stages["queries"].largest[1] == _read_buffer(room)
    # the scoring pass, its read buffer included, within the limit (the plan's other stages,
    # the fit's post-fit checks among them, are not the scoring run's)
    scoring = plan.stage_bytes[[stage.name for stage in plan.stages].index("scores")]
    assert scoring + plan.shape.snapshot_bytes <= limit


def test_a_limit_without_room_for_one_query_is_told_at_the_fit(problem: dict, tmp_path) -> None:
    """A limit whose query budget holds not even rank 1 of one query (31 numbers) warns at the
    fit that the scores will refuse (a tester's run fitted, then refused at scores()); with room
    for it, or with a factors_dir whose scoring pass reads the queries back from disk, the fit
    says nothing and one query is scored. (Batches of one: no smaller scoring batch makes room.)"""
    task = infkit.Task.language_modeling(problem["model"])
    opts = {"l2": 1e-2, "damping": 1e-2, "batch_size": 1}
    # the query budget at the fit counts one query's [1, N] scores; 4 bytes are left beside them
    tight = _limit_for_queries(problem, 0, batch_size=1) - (Q - 1) * N * 8
    one = ExampleSet(problem["test"]).subset([0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        held = infkit.Influence(task, "ekfac", memory_limit=tight, **opts)
        with pytest.warns(
            UserWarning, match=r"at rank 1.*leaves 4.0 B.*scores\(\).* will refuse"
        ) as w:
            held.fit(problem["train"])
        with pytest.raises(ProblemTooLargeError, match=r"at rank 1.*workdir"):
            held.scores(one)
        # the limits the warning names (a tester bisected for one), exactly: first the one that
        # holds the largest layer (the head's 77 numbers) at full rank, then rank 1 of every
        # layer (31 numbers), an approximation (another tester's was 55% off)
        said = " ".join(str(x.message) for x in w if "will refuse" in str(x.message))
        told = [int(n) for n in re.findall(r"memory_limit=(\d+) \(", said)]
        assert told == [tight + 77 * 8 - 4, tight + 31 * 8 - 4], said
        assert "at full rank" in said and "at rank 1, an approximation" in said
        # they are one query's: each more of a call takes its score row (a tester scored 16
        # queries a call at the full-rank figure, at rank 1 and 30% off)
        assert f"for one query a call: each more query of a call adds its {N} float64 " in said
        assert f"scores, {human_bytes(N * 8)}, and may lower the rank" in said
        for limit, place in (
            (told[0], {}),
            (told[1], {}),
            (tight, {"factors_dir": tmp_path / "f"}),
        ):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                inf = infkit.Influence(task, "ekfac", memory_limit=limit, **place, **opts)
                inf.fit(problem["train"])
            assert not [w for w in caught if "will refuse" in str(w.message)]
            assert inf.scores(one).shape == (1, N)


def test_queries_on_disk_in_a_workdir_commit_their_shards_and_leave_no_files(
    problem: dict, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a workdir the spilled run commits its score shards as the in-memory run does (a run
    again reuses every one); a pass that fails removes its scratch files."""
    task = infkit.Task.language_modeling(problem["model"])
    opts = {"l2": 1e-2, "damping": 1e-2, "batch_size": 2}
    limit = _limit_for_queries(problem, 2, batch_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        expected = _unbounded_scores(task, problem, opts)
        first = infkit.Influence(task, "ekfac", memory_limit=limit, workdir=tmp_path, **opts)
        S = first.fit(problem["train"]).scores(problem["test"])
        again = infkit.Influence(task, "ekfac", memory_limit=limit, workdir=tmp_path, **opts)
        S_again = again.fit(problem["train"]).scores(problem["test"])
    torch.testing.assert_close(S, expected, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(S_again, S, rtol=0, atol=0)  # read back from the store
    assert first.describe()["queries_on_disk"] > 0
    assert first.describe()["score_shards"]["computed"] > 0
    leftovers = lambda: [p for p in tmp_path.rglob("*") if "queries-" in p.name]  # noqa: E731
    assert not leftovers()

    def broken(*args: object, **kwargs: object) -> None:
        assert leftovers(), "the queries are on disk while the pass runs"
        raise RuntimeError("the pass failed")

    monkeypatch.setattr(StreamingScorer, "_columns", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        fresh = infkit.Influence(task, "ekfac", memory_limit=limit, workdir=tmp_path, **opts)
        fresh.fit(problem["train"])
        with pytest.raises(RuntimeError, match="the pass failed"):
            fresh.scores(ExampleSet(problem["test"]).subset([0, 1, 2]))
    assert not leftovers()


def test_a_query_beyond_the_budget_goes_low_rank_with_a_notice(problem: dict) -> None:
    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
    scorer = StreamingScorer(inf.fitted, inf.method.kronecker(), query_bytes=500)
    assert scorer.groups(1) == [(0, 1, (0, 1))]  # the 77-number head does not fit 500 bytes
    one = ExampleSet(problem["test"]).subset([0])
    with pytest.warns(Notice, match="rank 2"):  # rank 1 of both layers: (13 + 18) x 8 bytes
        prepared = scorer.queries(one)
    assert prepared.rank == 2 and set(prepared.low_rank) == {"mix", "head"}
    L, R = prepared.low_rank["head"]
    exact = StreamingScorer(inf.fitted, inf.method.kronecker(), query_bytes=10**9).queries(one)
    U = exact.full["head"]
    expected = torch.linalg.svdvals(U[0])[2:].square().sum().sqrt()  # the best rank-2 error
    torch.testing.assert_close((U - L @ R.transpose(1, 2)).norm(), expected)
    # not even rank 1 of every query fits: memory_limit cannot be met, so the scores refuse
    with pytest.raises(ProblemTooLargeError, match=r"rank 1.*raise memory_limit"):
        scorer.queries(ExampleSet(problem["test"]))


def test_module_and_token_scores_of_a_language_model(problem: dict) -> None:
    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
    S = inf.scores(problem["test"])
    parts = inf.module_scores(problem["test"])
    torch.testing.assert_close(sum(parts.values()), S, rtol=1e-8, atol=1e-12)
    tokens = inf.token_scores(problem["test"], [0, 2, 5])
    torch.testing.assert_close(tokens.total, S[:, [0, 2, 5]], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("where", ["groups", "layers", "disk", "rank"])
def test_module_and_token_scores_under_a_limit_take_the_passes_of_the_scores(
    problem: dict, tmp_path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a memory_limit the per-module and per-token scores of EK-FAC come from the passes
    of its scores: one with the queries kept on disk, one per group of queries (and of layers,
    when one query does not fit) otherwise, at a low rank too; a tester measured 39 to 54 passes,
    a pass per small chunk of float64 queries, where the scores took one. They equal the
    decompositions of the unbounded fit's float64 preconditioned queries."""
    task = infkit.Task.language_modeling(problem["model"])
    opts: dict = {"l2": 1e-2, "damping": 1e-2, "batch_size": 2}
    if where == "rank":
        opts["query_rank"] = 2
    test, some = problem["test"], [0, 2, 5]
    place = {"factors_dir": tmp_path / "factors"} if where == "disk" else {}
    passes: list[str] = []
    each_batch = StreamingScorer._each_batch

    def counted(self: StreamingScorer, *args: object) -> None:
        passes.append(str(args[-1]))
        each_batch(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(StreamingScorer, "_each_batch", counted)
    # the groups fill one result: the storage of the tokens each pass adds into
    add_tokens = StreamingScorer.add_token_scores
    filled: set[int] = set()

    def recorded(self: StreamingScorer, prepared: object, tokens: torch.Tensor, *args: object):  # type: ignore[no-untyped-def]
        filled.add(tokens.untyped_storage().data_ptr())
        return add_tokens(self, prepared, tokens, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(StreamingScorer, "add_token_scores", recorded)
    # each call under a limit with room for `fraction` queries beside its result ([Q, N] for
    # the scores, one per module, [Q, 3, LENGTH + 1] for the tokens and their rest): the same
    # passes, two queries a pass, or with 0.75 of one by layer (mix: two queries a pass, 42
    # numbers each; head: one, 77); one on disk; at rank 2, as many queries a pass as fit
    fraction = 0.75 if where == "layers" else 2
    answers: list = []
    counts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        free = infkit.Influence(task, "ekfac", **opts).fit(problem["train"])
        for result, call in (
            (Q * N * 8, lambda inf: inf.scores(test)),
            (2 * Q * N * 8, lambda inf: inf.module_scores(test)),
            (Q * len(some) * (LENGTH + 1) * 8, lambda inf: inf.token_scores(test, some)),
        ):
            limit = _limit_for_queries(problem, fraction, batch_size=2) + result - Q * N * 8
            bounded = infkit.Influence(task, "ekfac", memory_limit=limit, **place, **opts)
            bounded.fit(problem["train"])
            assert bounded.fitted.train_gradients is None
            passes[:] = []
            answers.append(call(bounded))
            counts.append(len(passes))
    S, parts, tokens = answers
    # (at rank 2 a query takes 62 numbers, 26 + 36: three fit the room of two at full rank)
    assert counts == {"groups": [2, 2, 2], "layers": [6, 6, 6], "rank": [2, 2, 2]}.get(
        where, [1, 1, 1]
    )
    assert len(filled) == 1
    # the reference: the decompositions of the float64 preconditioned queries, a pass each
    for name in ("streamed_module_scores", "streamed_token_scores"):
        monkeypatch.setattr(free.method, name, lambda *args: None)
    reference = free.module_scores(test)
    # (at rank 2 both truncate their queries by a float64 SVD, of float64 blocks that differ in
    # their last digits; in float32 the truncations agreed to about 1e-6 only)
    tol = {"rtol": 1e-9, "atol": 1e-12}
    assert list(parts) == list(reference) == ["mix", "head"]
    for name, part in parts.items():
        torch.testing.assert_close(part, reference[name], **tol)
    torch.testing.assert_close(sum(parts.values()), S, rtol=1e-9, atol=1e-12)
    whole = free.token_scores(test, some)
    assert tokens.layers == whole.layers == ["head", "mix"]
    torch.testing.assert_close(tokens.tokens, whole.tokens, **tol)
    torch.testing.assert_close(tokens.rest, whole.rest, **tol)
    torch.testing.assert_close(tokens.total, S[:, some], rtol=1e-9, atol=1e-12)
    assert float(tokens.tokens[:, 1, 5:].abs().max()) == 0.0  # training sequence 2's padding


def test_the_removed_model_of_a_kronecker_method_edits_the_tracked_layers_only(
    problem: dict,
) -> None:
    """remove(...).model() adds Delta theta, which covers the tracked layers, to those layers;
    the embedding and norm left out of the attribution keep their values."""
    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
    effect = inf.remove([0, 1, 2])
    edited = dict(effect.model().named_parameters())
    original = dict(task.model.named_parameters())
    offsets = inf.fitted.space.module_slices()
    for name, before in original.items():
        if name in offsets:
            delta = effect.params[offsets[name]].reshape(before.shape).to(before)
            torch.testing.assert_close(edited[name], before + delta, rtol=0, atol=1e-15)
        else:
            assert torch.equal(edited[name], before), name
    assert set(offsets) < set(original)  # the embedding and the norm are left out


# ============================================================================ a real model class
@pytest.mark.slow
def test_llama_from_transformers() -> None:
    transformers = pytest.importorskip("transformers")
    config = llama_config(attn_implementation=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    ids = torch.randint(0, 40, (28, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    inputs, labels = lm.examples(ids, mask)
    train = ({k: v[:24] for k, v in inputs.items()}, labels[:24])
    test = ({k: v[24:] for k, v in inputs.items()}, labels[24:])
    task = infkit.Task.language_modeling(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opts = {"l2": 1e-2, "damping": 1e-2, "batch_size": 4}
        cached = infkit.Influence(task, "ekfac", **opts).fit(train)
        # below the gradient cache (24 x 20 kB > a quarter of the limit), above the queries
        streamed = infkit.Influence(task, "ekfac", memory_limit=800_000, **opts)
        streamed.fit(train)
        assert streamed.fitted.train_gradients is None
    torch.testing.assert_close(streamed.scores(test), cached.scores(test), rtol=1e-9, atol=1e-12)
    assert streamed.describe()["query_groups"] == 1 and streamed.describe()["query_rank"] is None
    # the loss is Hugging Face's own, summed over the scored tokens
    out = model(input_ids=ids[:1], attention_mask=mask[:1], labels=labels[:1])
    ours = task.loss(out.logits, labels[:1])
    expected = out.loss.double() * int((labels[0, 1:] != -100).sum())
    torch.testing.assert_close(ours[0], expected, rtol=1e-6, atol=1e-7)


# ============================================================================ the plan
def _factor_bytes(model: nn.Module, itemsize: int) -> int:
    """sum over the model's Linear layers of (cols^2 + d_out^2) items, cols = d_in (+1 bias)."""
    out = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            cols = m.in_features + (m.bias is not None)
            out += (cols**2 + m.out_features**2) * itemsize
    return out


def test_plan_counts_passes_and_factor_bytes_and_times_a_batch(problem: dict) -> None:
    model = TinyLM().float().eval()
    task = infkit.Task.language_modeling(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        plan = infkit.Influence(task, "ekfac", damping="auto", batch_size=4).plan(
            problem["train"], problem["test"]
        )
        kfac = infkit.Influence(task, "kfac", damping="auto").plan(n_train=N, sequence_length=7)
    stages = {s.name: s for s in plan.stages}
    # the N x P gradient cache fits here: a pass for it, the energy-ratio check runs on it,
    # and it answers the scores in one product (no pass)
    data_passes = ["training gradients", "covariances A, S", "eigenvalue correction", "scores"]
    assert [stages[name].passes for name in data_passes] == [1, 1, 1, 0]
    # 16 probes + 16 directions x N / 16 examples (the report-only check's sample); with
    # damping="auto" the facade's damping is 0, so no damping-scale check
    # (each priced at PRODUCT_PASS_COST of an example's share of a batch's pass)
    checks = stages["post-fit checks"].passes
    products = checks * N / diagnostics.PRODUCT_PASS_COST
    assert products == pytest.approx(16 + 16 * (N // 16))
    # and each scores() call measures the queries' energy ratio: a product of every
    # training example (N <= 256) along one direction
    queried = stages["queries' check"].passes
    assert queried * N / diagnostics.PRODUCT_PASS_COST == pytest.approx(N, abs=0.01 * N)
    assert kfac.passes == pytest.approx(2 + checks + queried)  # cache, covariances, checks
    assert plan.passes == pytest.approx(3 + checks + queried)
    assert plan.shape.tokens == LENGTH and plan.shape.n_queries == Q
    assert plan.shape.batches == -(-N // 4)
    assert stages["covariances A, S"].bytes >= _factor_bytes(model, 4)
    # the decompositions' largest object is the float64 decomposition of the widest factor
    # (head's 11 x 11 S), where a tester found the plan naming its float32 factors instead
    eigh = stages["eigendecompositions"].largest
    decomposition = int(EIGH_MATRICES * 11**2 * 8)  # the float64 matrices eigh holds
    assert eigh == ("float64 eigendecomposition of a 11 x 11 factor ('head')", decomposition)
    # the hooks' products: a Gram product's half (d^2 per position) for each covariance
    assert stages["covariances A, S"].flops == pytest.approx(N * LENGTH * _factor_bytes(model, 1))
    # the cached scores: one [Q, P] x [P, N] product
    assert stages["scores"].flops == pytest.approx(2 * Q * N * plan.shape.parameters)
    # the float64 solves of the cached path: the queries' and the energy ratio's 16 probes,
    # each layer's block rotated into the eigenbasis and back, 4 d_out cols (d_out + cols):
    # mix 6 x 7 (its bias a column), head 11 x 7 (a tester found the time 2.6-3.8x short)
    solve = 4 * 6 * 7 * 13 + 4 * 11 * 7 * 18
    assert stages["queries"].float64_flops == Q * solve
    assert stages["post-fit checks"].float64_flops == 16 * solve
    assert stages["queries' check"].float64_flops == solve  # one direction
    assert plan.seconds_per_batch is not None and plan.seconds_per_batch > 0
    assert plan.flops_per_second is not None and plan.flops_per_second > 0
    assert plan.float64_flops_per_second is not None and plan.float64_flops_per_second > 0
    batches = plan.passes * plan.shape.batches + -(-Q // 4)  # the queries' batches too
    assert plan.seconds == pytest.approx(
        batches * plan.seconds_per_batch
        + plan.flops / plan.flops_per_second
        + (Q + 16 + 1) * solve / plan.float64_flops_per_second
    )
    assert "GFLOP/s" in str(plan) and "float64 solves" in str(plan)
    assert str(plan).splitlines()[0].endswith(", 1 process, float32")
    # the precision of the passes is in the plan's first line (a tester found it nowhere)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        half = infkit.Influence(task, "ekfac", dtype=torch.bfloat16).plan(
            problem["train"], problem["test"], timed=False
        )
    assert str(half).splitlines()[0].endswith(", float32, passes under autocast bfloat16")
    assert f"{plan.passes:g} passes" in str(plan)


def test_the_plan_bounds_the_iterative_solves(problem: dict) -> None:
    """ASTRA, CG and LiSSA solve their queries by iterations, each a curvature product over the
    data: the plan priced none (0.1 s planned where a run took 6 s, LiSSA 73 s). It bounds them
    by each method's cap, about two passes a product; direct solves add nothing."""
    from infkit.methods.base import PRODUCT_PASSES

    task = infkit.Task.language_modeling(TinyLM().double().eval())
    train, test = problem["train"], problem["test"]
    n = len(train[1])
    # vector products: each of a chunk's Q vectors in every product (a reviewer found a bound
    # of one vector a product exceeded 6-14 times with 16 queries)
    expected = {
        ("cg", ()): 500 * Q,  # block CG: Q vectors a product
        ("cg", (("block", False),)): 500 * Q,  # a column at a time
        ("lissa", (("depth", 40), ("minibatch_size", 4))): Q * 40 * 4 / n,
        ("astra", (("maxiter", 30),)): (30 + 2) * Q,  # CG: and the first and last residuals
        # the Neumann iteration: and the automatic step's power iterations
        ("astra", (("maxiter", 30), ("solver", "neumann"))): 30 * Q + 12,
        ("astra", (("maxiter", 0),)): 0,  # EK-FAC's answer
        ("ekfac", ()): 0,
        ("exact", ()): 0,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for (method, options), products in expected.items():
            inf = infkit.Influence(task, method, damping=1e-2, **dict(options))
            plan = inf.plan(train, test)
            assert plan.at_most_passes == pytest.approx(products * PRODUCT_PASSES), method
            assert ("iterative solves: up to" in str(plan)) == bool(products), method
            if products:
                assert plan.at_most_seconds is not None and plan.seconds is not None
                assert plan.at_most_seconds > plan.seconds
                record = plan.record()
                assert record["at_most_passes"] == plan.at_most_passes
        # the run's own iterations stay within the bound; processes each run the products whole
        run = infkit.Influence(task, "cg", damping=1e-2).fit(train)
        run.scores(test)
        assert sum(run.describe()["iterations"]) <= 500
        # on two processes each runs the solves whole: two passes of its share of 10 batches
        # (one batch of all N, which torchrun deals whole to one process, is one pass of it)
        two = infkit.Influence(task, "cg", damping=1e-2, batch_size=2).plan(
            train, test, world_size=2
        )
        assert two.at_most_passes == pytest.approx(2 * 500 * Q * PRODUCT_PASSES)
        one_batch = infkit.Influence(task, "cg", damping=1e-2, batch_size=N).plan(
            train, test, world_size=2
        )
        assert one_batch.at_most_passes == pytest.approx(500 * Q * PRODUCT_PASSES)
        # the tolerance the solve runs to: a float32 model's products raise 1e-8 to what they
        # certify, which the plan said nothing of (a tester: "CG to tol=1e-08", the run 1e-05)
        assert "CG to tol=1e-08, at most" in str(plan_of(task, "cg"))
        single = infkit.Task.language_modeling(TinyLM().float().eval())
        said = str(plan_of(single, "cg"))
        effective = infkit.Influence(single, "cg", damping=1e-2).fit(train)
        effective.scores(test)
        tol = effective.describe()["effective_tol"]
        assert f"CG to tol={tol:.2g} (1e-08 asked: float32 products certify no less)" in said
        assert f"cg to tol={tol:.2g} (1e-08 asked" in str(plan_of(single, "astra"))  # ASTRA's


def plan_of(task: infkit.Task, method: str):  # type: ignore[no-untyped-def]
    """The plan of ``method`` on the tiny LM problem's first sequences."""
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (10, LENGTH))
    return infkit.Influence(task, method, damping=1e-2).plan(
        lm.examples(ids[:8]), lm.examples(ids[8:])
    )


def test_a_layer_the_loss_never_reaches_is_planned_and_scored(problem: dict) -> None:
    """A tracked layer outside the loss's graph (a BERT pooler under a mean-pooled head):
    timing the plan's batch raised autograd's bare RuntimeError on it; the layer has no
    gradient, so the scores are those of the model without it (1e-10)."""

    class WithPooler(TinyLM):
        def __init__(self) -> None:
            super().__init__()
            self.pooler = nn.Linear(6, 6)

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
            self.pooler(self.embed(input_ids)[:, 0])  # run, its output not used (as BERT's)
            return super().forward(input_ids, attention_mask)

    torch.manual_seed(0)
    model = WithPooler().double().eval()
    plain = TinyLM().double().eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    train, test = problem["train"], problem["test"]
    scores = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in (model, plain):
            inf = infkit.Influence(infkit.Task.language_modeling(m), "ekfac", damping=1e-2)
            plan = inf.plan(train, test)
            assert plan.seconds is not None and plan.seconds > 0
            scores.append(inf.fit(train).scores(test))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-10, atol=1e-12)


def test_plan_on_the_meta_device_equals_the_real_model_and_splits_across_processes() -> None:
    torch.manual_seed(0)
    real = TinyLM(vocab=50, width=16)
    with torch.device("meta"):
        meta = TinyLM(vocab=50, width=16)
    plans = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        for name, model in (("real", real), ("meta", meta)):
            inf = infkit.Influence(infkit.Task.language_modeling(model), "ekfac", damping="auto")
            plans[name] = [
                inf.plan(n_train=1000, n_queries=8, sequence_length=32, world_size=w)
                for w in (1, 4)
            ]
    for a, b in zip(plans["real"], plans["meta"], strict=True):
        assert [s.bytes for s in a.stages] == [s.bytes for s in b.stages]
    one, four = plans["meta"]
    assert one.shape.batches == 4 * four.shape.batches  # 1000 / 32 per process
    by_name = lambda p: {s.name: s.bytes for s in p.stages}  # noqa: E731
    # the queries and the [Q, N] scores are whole on every process (docs/distributed.md §1)
    assert by_name(four)["queries"] == by_name(one)["queries"]
    assert by_name(four)["scores"] == by_name(one)["scores"]
    with pytest.raises(InvalidInputError, match="world_size"):
        infkit.Influence(infkit.Task.language_modeling(meta), "ekfac").plan(
            n_train=10, sequence_length=4, world_size=0
        )
    for bad in ({"n_train": 0}, {"sequence_length": -3}, {"n_queries": 2.5}):
        sizes = {"n_train": 10, "sequence_length": 4, **bad}
        with pytest.raises(InvalidInputError, match=f"{next(iter(bad))} must be an integer >= 1"):
            infkit.Influence(infkit.Task.language_modeling(meta), "ekfac").plan(**sizes)
    # fitting it is refused before any pass (a pass would fail deep in PyTorch: ".item()
    # cannot be called on meta tensors"), and so is loading a saved Influence onto it
    ids = torch.randint(0, 50, (4, 6))
    with pytest.raises(InvalidInputError, match=r"7 tensors on the meta device .*'embed.weight'"):
        infkit.Influence(infkit.Task.language_modeling(meta), "ekfac").fit(lm.examples(ids))
    with pytest.raises(InvalidInputError, match="plan\\(\\) works on it as it is"):
        infkit.Influence.load(tempfile.gettempdir(), infkit.Task.language_modeling(meta))
    # a learned position embedding of 12 rows (GPT-2's n_positions): a planned sequence longer
    # than that is refused, as fit refuses the sequences themselves; 12 is planned

    with torch.device("meta"):
        meta.positions = nn.Embedding(12, 16)
    meta.config = SimpleNamespace(n_positions=12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        inf = infkit.Influence(infkit.Task.language_modeling(meta), "ekfac", damping="auto")
        assert inf.plan(n_train=10, sequence_length=12).shape.tokens == 12
        with pytest.raises(InvalidInputError, match=r"sequence_length=13\): .* holds 12 pos"):
            inf.plan(n_train=10, sequence_length=13)
        assert inf.plan(n_train=np.int64(10), sequence_length=np.int64(12)).shape.n_train == 10


def test_the_plan_holds_batches_and_processes_to_the_data_and_takes_data_or_sizes(
    problem: dict,
) -> None:
    """A tester's: batch_size=1000 on N sequences was planned (and budgeted by the scoring
    pass) as 1000-sequence batches, 15x over, and refused at scores() after the fit; 1,000
    processes over 8 batches were planned 10,002 passes (each repeats the whole cache, 8
    batches); the data and sizes given together were mixed (N of the data, T of the argument)."""
    from infkit.kfac.streaming import pass_working_bytes

    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        plans = {
            b: infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2, batch_size=b).plan(
                problem["train"], problem["test"], timed=False
            )
            for b in (N, 1000)
        }
        fitted = {
            b: infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2, batch_size=b).fit(
                problem["train"]
            )
            for b in (N, 1000)
        }
    assert plans[1000].peak_bytes == plans[N].peak_bytes
    assert plans[1000].stage_bytes == plans[N].stage_bytes
    working = {b: pass_working_bytes(f.fitted, f.method.kronecker()) for b, f in fitted.items()}
    assert working[1000] == working[N]
    identity = infkit.Influence(task, "identity", l2=1e-2, batch_size=2)
    passes = {
        w: identity.plan(n_train=16, n_queries=2, sequence_length=LENGTH, world_size=w, timed=False)
        for w in (8, 16, 1000)
    }
    assert passes[8].passes == passes[16].passes == passes[1000].passes  # 8 batches, each once
    # torchrun deals whole batches: a batch_size the data fill is planned whole whatever the
    # processes (a reviewer's: planned N / K, 4x under, where rank 0 holds all 64)
    whole = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2, batch_size=N)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        shards = {
            w: whole.plan(problem["train"], problem["test"], world_size=w, timed=False)
            for w in (1, 4)
        }
    assert shards[4].shape.batch_size == shards[1].shape.batch_size == N
    # a process's share, in closed form (the plan looped over every batch: minutes at a
    # pretraining's N), equals the batches torchrun deals it (batch i to process i mod K),
    # counted one by one here, for every split and rank
    from infkit.distributed import examples_in_batches

    base = shards[1].shape
    for n, b, k in itertools.product(range(1, 40), range(1, 45), range(1, 9)):
        dealt = [sum(min(b, n - i * b) for i in range(r, -(-n // b), k)) for r in range(k)]
        shape = dataclasses.replace(base, n_train=n, batch_size=b, world_size=k)
        assert shape.examples_per_process == dealt[0], (n, b, k)
        assert [examples_in_batches(n, b, r, k) for r in range(k)] == dealt, (n, b, k)
    with pytest.raises(InvalidInputError, match=r"the data or their sizes, not both: n_train"):
        identity.plan(problem["train"], problem["test"], n_train=10**5, sequence_length=4)
    identity.fit(problem["train"])
    with pytest.raises(InvalidInputError, match=r"sequence_length beside the fitted training"):
        identity.plan(test=problem["test"], sequence_length=4)
    with pytest.raises(InvalidInputError, match=r"not both: n_queries beside the test set given"):
        identity.plan(test=problem["test"], n_queries=5)


def test_the_plan_counts_a_batchs_outputs_and_their_gradients(problem: dict) -> None:
    """A tester's: a 32,000-word model's run rose 1.0 GiB while its plan counted 46 MiB: the
    [B, T, V] logits of a batch, kept with their float32 log-probabilities and both gradients
    through the backward pass, were in no stage. The peak counts them (four float32 copies of
    the logits a forward pass returns), and a limit they alone crowd says what lowers them."""
    model = TinyLM().float().eval()
    task = infkit.Task.language_modeling(model)
    inputs = {key: value[:4] for key, value in problem["train"][0].items()}
    logits = task.call_model(model, inputs)  # [B, T, V], as the passes compute them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        plan = infkit.Influence(task, "ekfac", damping="auto", batch_size=4).plan(
            problem["train"], problem["test"], timed=False
        )
    assert plan.shape.batch_output_bytes == 4 * logits.numel() * logits.element_size()
    shape = plan.shape
    beside = shape.model_bytes + shape.snapshot_bytes + max(plan.stage_bytes)
    assert plan.peak_bytes == beside + shape.batch_output_bytes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        tight = infkit.Influence(
            task, "ekfac", damping="auto", batch_size=4, memory_limit=shape.batch_output_bytes
        ).plan(problem["train"], problem["test"], timed=False)
    assert not tight.within_limit and "a smaller batch_size lowers them" in str(tight)
    # the limit bounds infkit's own objects: where they fit and the batch's outputs take the
    # peak past it, the plan is within it and says so on a line of its own
    own = plan.peak_bytes - shape.model_bytes - shape.batch_output_bytes
    between = dataclasses.replace(shape, memory_limit=own + shape.batch_output_bytes // 2)
    crowded = dataclasses.replace(plan, shape=between)
    assert crowded.within_limit and "take the peak past memory_limit" in str(crowded)
    assert "take the peak past" not in str(plan)


def test_the_plan_sizes_a_language_models_outputs_from_its_configuration() -> None:
    """Without data (a model on the meta device) C = T x the configuration's vocab_size, which
    the checks' product memory depends on; with data, a forward pass tells."""

    from infkit.plan import sized_outputs

    model = TinyLM()
    assert sized_outputs(model, LENGTH) == LENGTH  # no configuration: positions only
    model.config = SimpleNamespace(vocab_size=VOCAB)  # as a transformers model carries it
    assert sized_outputs(model, LENGTH) == LENGTH * VOCAB
    # a sequence classifier's vocabulary is its inputs': its outputs are its labels (a
    # reviewer's meta BERT classifier was planned 1.9 GiB of outputs a batch for 2 labels)
    model.config = SimpleNamespace(vocab_size=VOCAB, num_labels=2)
    assert sized_outputs(model, LENGTH, language_model=False) == 2


def test_the_plan_sizes_a_meta_models_outputs_by_a_pass_on_the_meta_device() -> None:
    """A reviewer's: every Hugging Face configuration has num_labels (2 by default), so a
    causal LM on the meta device under a task of the user's was planned 2 outputs an example
    (a Llama's 4 MB of logits a batch as 256 bytes), and a token classifier its labels, not
    T x its labels. A pass of token ids on the meta device computes the shapes alone; a model
    of feature vectors by a pass of zeros its first Linear takes, else from its configuration."""

    def planned_outputs(model: nn.Module, task: infkit.Task | None = None) -> int:
        task = task or infkit.Task(model, custom_loss)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Notice)
            plan = infkit.Influence(task, "ekfac", damping=1e-3).plan(
                n_train=64, n_queries=2, sequence_length=LENGTH
            )
        return plan.shape.outputs

    def custom_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")

    class TokenClassifier(nn.Module):
        def __init__(self, labels: int) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.head = nn.Linear(8, labels)
            self.config = SimpleNamespace(vocab_size=VOCAB, num_labels=labels)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.embed(input_ids))  # [B, T, labels]

    with torch.device("meta"):
        lm_model = TinyLM()  # (its forward makes a tensor without naming a device)
        lm_model.config = SimpleNamespace(vocab_size=VOCAB, num_labels=2)
        tagger = TokenClassifier(5)
        features = nn.Sequential(nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3))
        plain = nn.Sequential(nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 5))
    features.config = SimpleNamespace(num_labels=3)  # takes no token ids: sized from this
    assert planned_outputs(lm_model, infkit.Task(lm_model, custom_loss)) == LENGTH * VOCAB
    assert planned_outputs(lm_model, infkit.Task.language_modeling(lm_model)) == LENGTH * VOCAB
    assert planned_outputs(tagger) == LENGTH * 5
    assert planned_outputs(features) == 3
    # without a configuration, by a pass of [1, 7] zeros, its first Linear's inputs (a tester's
    # meta MLP of 3 classes was planned 1 output an example)
    assert planned_outputs(plain, infkit.Task.classification(plain)) == 5
    # a model neither pass goes through, without a configuration: counted as its positions,
    # said (a reviewer's meta CNN of 100 classes was planned 1 output an example, unsaid)
    with torch.device("meta"):
        cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 100))
    with pytest.warns(Notice, match="could not size one example's outputs"):
        infkit.Influence(infkit.Task.classification(cnn), "exact").plan(
            n_train=8, n_queries=2, sequence_length=1
        )
    with pytest.raises(InvalidInputError, match=r"here without sequence_length: .*\(1 for a model"):
        infkit.Influence(infkit.Task.classification(plain), "exact").plan(n_train=8, n_queries=2)


def test_gradient_checkpointing_is_refused_by_name() -> None:
    """A reviewer's: after Hugging Face's gradient_checkpointing_enable(), whose hook on the
    input embeddings calls requires_grad_() in every forward pass, fit and scores stopped on
    PyTorch's raw error from inside torch.func; the refusal says what to call."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    ids = torch.randint(0, 40, (4, 6))
    model.gradient_checkpointing_enable()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InvalidInputError, match=r"gradient_checkpointing_disable\(\)"):
            infkit.Influence(infkit.Task.language_modeling(model), "ekfac", damping=1e-3).fit(
                lm.examples(ids)
            )


def test_a_plan_from_sizes_counts_a_real_models_outputs_without_a_pass_of_every_position() -> None:
    """A reviewer's: a plan from sizes alone passed a model with weights all T positions to
    count its outputs (GPT-2 at T = 40,000: 1.2 GB of logits, the memory the plan foresees).
    Short passes give C where it is affine in T, checked on a third; a model whose outputs are
    not so (padded to a multiple of 8, a T x T map) takes the pass, not a plan 10-19 times low."""
    from infkit.influence import _outputs_per_example

    class Padded(TinyLM):
        def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
            tail = (-input_ids.shape[1]) % 8
            return super().forward(nn.functional.pad(input_ids, (0, tail)))

    class Mapped(TinyLM):
        def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
            h = self.embed(input_ids)
            return torch.cat([super().forward(input_ids).flatten(1), (h @ h.mT).flatten(1)], 1)

    for model in (TinyLM(), Padded(), Mapped()):
        task = infkit.Task(model, lambda outputs, targets: outputs.flatten(1).sum(1))
        for tokens in (30, 100, 333):
            real = model(torch.zeros(1, tokens, dtype=torch.long)).numel()
            assert _outputs_per_example(task, None, tokens) == real, (type(model), tokens)


def test_a_plan_after_fit_takes_the_fitted_training_set(problem: dict) -> None:
    """A reviewer's: after fit, plan(test=queries) asked for the training data again; the
    fitted set is its default. A tester's: that plan then listed the whole fit again (12
    passes, 4.3 s, the post-fit checks' peak) for scores that took 1.4 s: the fit's stages
    are marked run, what they hold still counted, their passes and time not."""
    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2)
        with pytest.raises(InvalidInputError, match=r"inf\.plan\(test=queries\)"):
            inf.plan(test=problem["test"], timed=False)
        inf.fit(problem["train"])
        given = inf.plan(problem["train"], problem["test"], timed=False)
        fitted = inf.plan(test=problem["test"], timed=False)
    sizes = [dataclasses.replace(p.shape, sample_inputs=None) for p in (fitted, given)]
    assert sizes[0] == sizes[1] and fitted.shape.n_train == len(problem["train"][1])
    # the data given after fit plans a fit of it anew: every stage; the default, scoring
    names = [s.name for s in given.stages]
    assert [s.name for s in fitted.stages] == names and not any(s.done for s in given.stages)
    first = min(names.index(name) for name in SCORING_STAGES if name in names)
    assert "eigenvalue correction" in names[:first] and "post-fit checks" in names[:first]
    assert [s.done for s in fitted.stages] == [k < first for k in range(len(names))]
    assert fitted.passes == sum(s.passes for s in given.stages[first:]) < given.passes
    assert fitted.flops == sum(s.flops for s in given.stages[first:]) < given.flops
    # the factors the fit holds are held through the scoring stages: the same bytes there
    assert fitted.stage_bytes[first:] == given.stage_bytes[first:]
    assert sum(s.held for s in fitted.stages[:first]) > 0
    scoring = max(given.stage_bytes[first:])
    assert fitted.peak_bytes == given.peak_bytes - max(given.stage_bytes) + scoring
    assert f"fitted already, not run again: {', '.join(names[:first])} (they hold" in str(fitted)


def test_the_plan_lists_the_checks_the_fit_runs(problem: dict) -> None:
    """The post-fit checks are in the plan exactly when fit runs them; checks=False skips
    both (and their figures in describe())."""
    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for checks in (True, False):
            for damping, limit in ((1e-2, None), (0.0, None), (1e-2, 200_000)):
                inf = infkit.Influence(
                    task, "ekfac", l2=1e-2, damping=damping, memory_limit=limit, checks=checks
                )
                planned = {s.name for s in inf.plan(problem["train"], timed=False).stages}
                ran = set(inf.fit(problem["train"]).method.checks) & {
                    "curvature_scale",
                    "energy_ratio",
                }
                assert ("post-fit checks" in planned) == bool(ran)
                # the queries' check runs on every scores() call where the energy ratio ran
                # (200 kB does not hold the queries: the plan's check is all there is)
                if limit is None:
                    inf.scores(problem["test"])
                    queried = "query_energy_ratio" in inf.describe()
                    assert ("queries' check" in planned) == queried == ("energy_ratio" in ran)
                assert ("queries' check" in planned) == ("energy_ratio" in ran)
                assert ("training gradients" in planned) == (inf.fitted.train_gradients is not None)
                if not checks:
                    assert not ran and "energy_ratio" not in inf.describe()
    for bad in ("no", "all", 1):
        with pytest.raises(
            InvalidInputError, match=r"checks must be True .*, False .* or 'queries'"
        ):
            infkit.Influence(task, "ekfac", checks=bad)  # type: ignore[arg-type]


def test_checks_queries_measures_the_queries_where_the_fit_checks_do_not(problem: dict) -> None:
    """On the streamed path (language-model scale) the post-fit ratio does not run, nor the
    queries' check with it; checks="queries" runs the latter at any size, planned: the same
    figure as the cached run's (the same solve, direction and curvature of all N)."""
    task = infkit.Task.language_modeling(problem["model"])
    options = {"l2": 1e-2, "damping": 1e-2, "batch_size": 2}
    limit = _limit_for_queries(problem, Q, batch_size=2)
    train, test = problem["train"], problem["test"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        cached = infkit.Influence(task, "ekfac", **options).fit(train)
        cached.scores(test)
        for checks in (True, "queries"):
            streamed = infkit.Influence(task, "ekfac", memory_limit=limit, checks=checks, **options)
            planned = {s.name for s in streamed.plan(train, test, timed=False).stages}
            streamed.fit(train)
            assert streamed.fitted.train_gradients is None
            assert "energy_ratio" not in streamed.describe()
            streamed.scores(test)
            measured = "query_energy_ratio" in streamed.describe()
            assert ("queries' check" in planned) == measured == (checks == "queries")
    figure = streamed.describe()["query_energy_ratio"]
    assert figure == pytest.approx(cached.describe()["query_energy_ratio"], rel=1e-6)
    # the per-module, per-token and query-batched scores measure their queries too
    part = ({k: v[:2] for k, v in test[0].items()}, test[1][:2])
    streamed.scores(part)
    of_part = streamed.describe()["query_energy_ratio"]
    assert of_part != pytest.approx(figure, rel=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        for ask in (streamed.module_scores, streamed.token_scores, streamed.batched_scores):
            streamed.scores(test)
            ask(part)
            assert streamed.describe()["query_energy_ratio"] == of_part, ask
    # a solve 10x too large warns, without the probes' figure it does not have
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        scaled = infkit.Influence(task, "ekfac", memory_limit=limit, checks="queries", **options)
        scaled.fit(train)
    solve = scaled.method.inverse()
    scaled.method.inverse = lambda: lambda V: 10 * solve(V)  # type: ignore[method-assign]
    with pytest.warns(
        UserWarning, match=r"too large along .* 1 for an exact solve; the order of magnitude"
    ):
        scaled.scores(test)
    assert scaled.describe()["query_energy_ratio"] == pytest.approx(10 * figure, rel=1e-6)


def test_the_plan_holds_the_gradient_cache_through_the_checks_and_the_queries(
    problem: dict,
) -> None:
    """With the [N, P] cache, every later stage counts it (it is held to the end of the run);
    the post-fit checks come before the queries and count their probe arrays and a curvature
    product's working memory; the cached path answers the scores without a pass, its queries
    in the facade's chunks."""
    from infkit import curvature, diagnostics

    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2, batch_size=4)
        plan = inf.plan(problem["train"], problem["test"], timed=False)
    names = [s.name for s in plan.stages]
    totals = dict(zip(names, plan.stage_bytes, strict=True))
    p, item = plan.shape.parameters, 8  # a float64 model
    cache = N * p * item
    assert plan.stages[0].name == "training gradients" and plan.stages[0].held == cache
    assert all(totals[name] >= cache for name in names)
    assert names.index("post-fit checks") == names.index("queries' check") - 1
    assert names.index("queries' check") == names.index("queries") - 1
    probes = diagnostics.PROBE_DIRECTIONS * p * (3 * 8 + item)
    outputs = LENGTH * VOCAB  # T x V of one sequence
    assert plan.shape.outputs == outputs
    product = curvature.product_direction_bytes(4 * outputs, p, item)
    assert totals["post-fit checks"] >= cache + probes + product
    first = min(Q, diagnostics.QUERY_DIRECTIONS) * p * 8  # the queries' gradients, float64
    assert totals["queries' check"] >= cache + first + 3 * p * 8 + product
    assert plan.peak_bytes >= plan.shape.model_bytes + totals["post-fit checks"]
    stages = {s.name: s for s in plan.stages}
    assert stages["scores"].passes == 0
    record = plan.record()
    assert [s["total_bytes"] for s in record["stages"]] == plan.stage_bytes
    # the run's chunks of queries are the plan's (the generic path's row bytes)
    fitted = inf.fit(problem["train"])
    estimator = inf._estimator
    assert fitted.method.query_row_bytes(N, p, estimator) == 3 * (N + p) * 8


def test_the_checks_curvature_products_keep_to_the_memory_limit(problem: dict) -> None:
    """Under a small memory_limit the energy ratio's products take a few directions at a time
    (1/8 of the limit) and give the same ratio as all at once."""
    from infkit import curvature, diagnostics

    task = infkit.Task.language_modeling(problem["model"])
    ratios = {}
    for limit in (None, 2_000_000):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2, memory_limit=limit)
            inf.fit(problem["train"])
        fitted = inf.fitted
        operator = diagnostics._sample_curvature(fitted, 8)
        assert operator.work_bytes == curvature.product_work_bytes(fitted.memory_limit)
        chunk = curvature.product_chunk(
            diagnostics.PROBE_DIRECTIONS,
            fitted.batch_size * LENGTH * VOCAB,
            fitted.space.size,
            8,
            operator.work_bytes,
        )
        ratios[limit] = (chunk, diagnostics.energy_ratio(fitted, inf.method.inverse(), sample=8))
    (all_at_once, whole), (few, chunked) = ratios[None], ratios[2_000_000]
    assert all_at_once == diagnostics.PROBE_DIRECTIONS and few < all_at_once
    assert chunked == pytest.approx(whole, rel=1e-10)


def test_plan_foresees_the_query_groups_that_scoring_takes(problem: dict) -> None:
    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        limit = _limit_for_queries(problem, 2, batch_size=2)
        inf = infkit.Influence(
            task, "ekfac", l2=1e-2, damping=1e-2, memory_limit=limit, batch_size=2
        )
        plan = inf.plan(problem["train"], problem["test"], timed=False)
        inf.fit(problem["train"])
        inf.scores(problem["test"])
    groups = inf.describe()["query_groups"]
    queries = next(s for s in plan.stages if s.name == "queries")
    assert queries.note.startswith(f"full rank, {groups} passes over groups of queries and")
    passes = {s.name: s.passes for s in plan.stages}
    assert groups == 2 and passes["scores"] == groups
    assert "training gradients" not in passes  # the cache does not fit this limit


def test_the_plan_sets_the_factors_aside_only_where_the_scoring_pass_will(
    problem: dict, tmp_path
) -> None:
    """The scoring pass sets the factors aside when they are committed in a store. Fitted with
    a factors_dir, the plan's scoring stage leaves them out; restored from a saved Influence
    (the factors in its file, no store behind them, though factors_dir is still among the
    options) it counts them, by exactly their bytes."""
    task = infkit.Task.language_modeling(problem["model"])
    options = {"damping": 1e-2, "batch_size": 4, "workdir": tmp_path / "work"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        inf = infkit.Influence(task, "ekfac", factors_dir=tmp_path / "factors", **options)
        inf.fit(problem["train"])
        inf.save(tmp_path / "saved")
        restored = infkit.Influence.load(tmp_path / "saved", task)
        stages = [
            {s.name: s for s in i.plan(problem["train"], problem["test"], timed=False).stages}
            for i in (inf, restored)
        ]
    fitted, loaded = (s["scores"] for s in stages)
    assert "the factors set aside on disk" in fitted.note
    assert "set aside" not in loaded.note
    resident = stages[0]["factors"].held  # the factors read back, as the plan counts them
    assert resident > 0 and loaded.bytes - fitted.bytes == resident


def test_the_plan_reads_back_the_factors_a_fit_would_reuse(problem: dict, tmp_path) -> None:
    """With the factors of this model, data and settings committed in factors_dir, the fit
    reads them back: the plan shows no pass for them and its time counts only the scoring pass;
    EK-FAC over a K-FAC fit's factors (its own first stage) plans the eigenvalue pass only; other
    data, or overwrite=True, plan the whole fit."""
    task = infkit.Task.language_modeling(problem["model"])
    options = {"damping": 1e-2, "batch_size": 4}
    train, test = problem["train"], problem["test"]

    def planned(method: str, data: object = train, **extra: object) -> dict:
        inf = infkit.Influence(task, method, factors_dir=tmp_path / "f", **options, **extra)
        plan = inf.plan(data, test, timed=False)
        # (the tiny LM's [N, P] gradient cache is a pass of every plan's, as its checks are)
        names = [s.name for s in plan.stages if s.name != "training gradients"]
        return {"passes": plan.passes, "stages": names, "plan": plan}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        fresh = planned("ekfac")
        infkit.Influence(task, "kfac", factors_dir=tmp_path / "f", **options).fit(train)
        resumed = planned("ekfac")
        infkit.Influence(task, "ekfac", factors_dir=tmp_path / "f", **options).fit(train)
        reused = planned("ekfac")
        kfac = planned("kfac")  # K-FAC reads EK-FAC's factors too
        overwritten = planned("ekfac", overwrite=True)
        inputs, labels = train
        other = planned("ekfac", ({k: v[:-1] for k, v in inputs.items()}, labels[:-1]))
    whole = ["covariances A, S", "eigendecompositions", "eigenvalue correction"]
    assert fresh["stages"][:3] == whole and overwritten["stages"][:3] == whole
    assert other["stages"][:3] == whole
    assert resumed["stages"][:2] == ["K-FAC factors", "eigenvalue correction"]
    assert reused["stages"][0] == "factors" and kfac["stages"][0] == "factors"
    others = fresh["passes"] - 3  # the gradient cache's pass and the checks', in every plan
    assert reused["passes"] == pytest.approx(1 + others)  # the scoring pass only
    assert resumed["passes"] == pytest.approx(2 + others)
    factors = next(s for s in reused["plan"].stages if s.name == "factors")
    assert "read back from factors_dir" in factors.note


# ============================================================================ precision
def test_bfloat16_autocast_runs_the_layers_in_bfloat16_and_keeps_the_scores(problem: dict) -> None:
    model = TinyLM().float().eval()
    model.load_state_dict(problem["model"].state_dict())
    seen: list[torch.dtype] = []
    model.mix.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    train = problem["train"]
    test = problem["test"]
    scores = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in (None, torch.bfloat16):
            task = infkit.Task.language_modeling(model)
            for method in ("ekfac", "identity"):
                inf = infkit.Influence(task, method, l2=1e-2, damping=1e-2, dtype=dtype).fit(train)
                scores[dtype, method] = inf.scores(test).double()
                assert inf.describe()["autocast"] == (None if dtype is None else "bfloat16")
            # the gradient passes run in bfloat16 (curvature products stay in float32)
            assert (torch.bfloat16 in seen) == (dtype is not None)
            seen.clear()
    for method in ("ekfac", "identity"):
        full, half = scores[None, method].flatten(), scores[torch.bfloat16, method].flatten()
        assert torch.corrcoef(torch.stack([full, half]))[0, 1] > 0.99
        assert float((half - full).norm() / full.norm()) < 0.1  # bfloat16: 3 significant digits
    with pytest.raises(InvalidInputError, match="dtype"):
        infkit.Influence(infkit.Task.language_modeling(model), "ekfac", dtype=torch.int8)
    # a bfloat16 model asked for float32 passes is told how to get them (a tester's)
    low = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(
        InvalidInputError,
        match=r"cannot raise it; to compute a bfloat16 model in float32, give a float32 copy",
    ):
        infkit.Influence(infkit.Task.language_modeling(low), "ekfac", dtype=torch.float32)
    with pytest.raises(InvalidInputError, match="device"):
        infkit.Influence(infkit.Task.language_modeling(model), "ekfac", device="nowhere")
    if not torch.cuda.is_available():  # PyTorch asserts; the error names the option
        with pytest.raises(InvalidInputError, match="device='cuda' is not usable here"):
            infkit.Influence(infkit.Task.language_modeling(model), "ekfac", device="cuda")


# ============================================================================ every method
def _gradients(
    model: nn.Module, data: tuple, names: list[str], fn=lm.next_token_loss
) -> torch.Tensor:
    """Per-example gradients [N, P] of ``fn`` (the loss) in the named parameters, by autograd."""
    inputs, labels = data
    params = [dict(model.named_parameters())[n] for n in names]
    rows = []
    for i in range(len(labels)):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        loss = fn(model(**one), labels[i : i + 1])[0]
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def test_trak_identity_and_astra_on_a_language_model(problem: dict) -> None:
    model = problem["model"]
    task = infkit.Task.language_modeling(model)
    train, test = problem["train"], problem["test"]
    names = [n for n, _ in model.named_parameters()]
    G, Gt = _gradients(model, train, names), _gradients(model, test, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        identity = infkit.Influence(task, "identity").fit(train).scores(test)
        # identity: the raw gradient dot product / N
        torch.testing.assert_close(identity, Gt @ G.T / N, rtol=1e-8, atol=1e-12)
        # ASTRA converges to the exact damped solve over the layers EK-FAC tracks
        opts = {"l2": 1e-2, "damping": 1e-2}
        astra = infkit.Influence(task, "astra", **opts).fit(train).scores(test)
        linear_only = copy.deepcopy(model)  # the parameters EK-FAC tracks, the rest frozen
        for name, p in linear_only.named_parameters():
            p.requires_grad_(name.startswith(("mix.", "head.")))
        exact_task = infkit.Task.language_modeling(linear_only)
        exact = infkit.Influence(exact_task, "exact", **opts).fit(train).scores(test)
        assert float((astra - exact).norm() / exact.norm()) < 1e-3
        # TRAK: the one-step Newton surrogate on the sequence margin sum_t log(p_t / (1 - p_t))
        lam = 1e-2
        trak = infkit.Influence(task, "trak", projection="identity", lambda_reg=lam)
        S = trak.fit(train).scores(test)
    Phi = _gradients(model, train, names, lm.margin)
    inputs, labels = train
    q = lm.margin_to_loss(model(**inputs), labels).detach()
    gram = Phi.T @ Phi + lam * torch.eye(Phi.shape[1], dtype=torch.float64)
    tau = Gt @ torch.linalg.solve(gram, Phi.T) * q
    torch.testing.assert_close(S, -tau, rtol=1e-7, atol=1e-10)


# ============================================================================ the documented code
def _python_block(path: str, heading: str) -> str:
    """The first ```python block after ``heading`` in a Markdown file of the repository."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / path).read_text()
    after = text[text.index(heading) :]
    start = after.index("```python\n") + len("```python\n")
    return after[start : after.index("```\n", start)]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "heading"),
    [("README.md", "## Language models"), ("docs/methods/language_models.md", "## 6.")],
)
def test_the_documented_language_model_code_runs(path: str, heading: str, capsys) -> None:
    pytest.importorskip("transformers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        exec(compile(_python_block(path, heading), path, "exec"), {})
    assert "plan of method 'ekfac'" in capsys.readouterr().out


def test_undamped_kronecker_curvature_singular_in_its_precision_is_refused(problem: dict) -> None:
    """The output head's softmax-shift direction has an EK-FAC eigenvalue near 0: undamped, the
    solve divides rounding noise by it. Refused at fit, naming the layer; damping='auto' fits."""
    model = TinyLM().float().eval()
    model.load_state_dict(problem["model"].state_dict())
    task = infkit.Task.language_modeling(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for method in ("ekfac", "kfac"):
            inf = infkit.Influence(task, method, l2=0.0, damping=0.0, fisher="ggn")
            with pytest.raises(CurvatureError, match=r"layer 'head' .*damped eigenvalue"):
                inf.fit(problem["train"])
        damped = infkit.Influence(task, "ekfac", l2=0.0, damping="auto", fisher="ggn")
        assert torch.isfinite(damped.fit(problem["train"]).scores(problem["test"])).all()


@pytest.mark.parametrize("ratio", [-3.8, float("nan")])
def test_an_energy_ratio_that_is_not_positive_warns(
    problem: dict, ratio: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A negative energy ratio (an inverse that is not positive along gradient directions) or
    a non-finite one (overflow) is not a scale to report quietly."""
    monkeypatch.setattr(infkit.diagnostics, "energy_ratio", lambda *a, **k: ratio)
    task = infkit.Task.language_modeling(problem["model"])
    expected = "not reliable" if ratio < 0 else "overflowed or lost all precision"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        with pytest.warns(UserWarning, match=expected):
            infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])


def test_a_bfloat16_model_gets_float32_results_and_cg_says_it_cannot_converge(
    problem: dict,
) -> None:
    """Scores accumulated in float32 come back in float32 for a bfloat16 model (not rounded to
    3 digits); CG, whose products run in bfloat16, says that it can certify 0.78 at best."""
    model = TinyLM().to(torch.bfloat16).eval()
    model.load_state_dict(problem["model"].state_dict())
    task = infkit.Task.language_modeling(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        warnings.filterwarnings("ignore", "the model is not at a stationary point")
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
        assert inf.scores(problem["test"]).dtype == torch.float32
        assert inf.top_k(problem["test"], k=2).proponent_scores.dtype == torch.float32
        with pytest.warns(UserWarning, match=r"bfloat16, whose products certify .* 0\.78"):
            infkit.Influence(task, "cg", l2=1e-2, damping=1e-2, maxiter=3).fit(problem["train"])


class Bigram(nn.Module):
    """Each token's embedding, a tanh layer and a head: next-token logits from the token alone."""

    def __init__(self, vocab: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)
        self.mix = nn.Linear(vocab, vocab)
        self.head = nn.Linear(vocab, vocab)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        return self.head(torch.tanh(self.mix(self.embed(input_ids))))


def test_a_bfloat16_models_scores_follow_its_float64_copy_when_it_is_confident() -> None:
    """A bfloat16 model's logits go to the loss in float32: in bfloat16 a softmax near 1 is
    resolved to 2^-8, so a confident model's ``p - onehot`` (here about 1e-4 at most positions)
    was rounding. EK-FAC with the exact GGN (deterministic) on a bfloat16 model that predicts
    ``v -> v + 1`` with a margin of about 12 nats, against the same weights in float64: 0.02
    relative difference (0.34 when the loss ran on bfloat16 logits)."""
    vocab, length, n, q = 8, 10, 24, 4
    gen = torch.Generator().manual_seed(0)
    half = Bigram(vocab)
    with torch.no_grad():
        noise = lambda: torch.randn(vocab, vocab, generator=gen)  # noqa: E731
        half.embed.weight.copy_(3 * torch.eye(vocab) + 0.05 * noise())
        half.mix.weight.copy_(torch.eye(vocab) + 0.05 * noise())
        half.head.weight.copy_(12 * torch.roll(torch.eye(vocab), 1, 0) + 0.3 * noise())
        half.mix.bias.zero_()
        half.head.bias.zero_()
    half = half.to(torch.bfloat16).eval()
    exact = Bigram(vocab).double().eval()  # the bfloat16 weights, exactly
    exact.load_state_dict({k: v.double() for k, v in half.state_dict().items()})
    ids = (torch.randint(0, vocab, (n + q, 1), generator=gen) + torch.arange(length)) % vocab
    flip = torch.rand(n + q, length, generator=gen) < 0.05  # a few surprises
    ids = torch.where(flip, torch.randint(0, vocab, ids.shape, generator=gen), ids)
    train, test = lm.examples(ids[:n]), lm.examples(ids[n:])
    losses = nn.functional.cross_entropy(
        exact(**train[0])[:, :-1].reshape(-1, vocab), train[1][:, 1:].reshape(-1), reduction="none"
    )
    assert float(losses.median()) < 1e-3  # confident: p of the label above 0.999
    scores = {}
    for model in (half, exact):
        task = infkit.Task.language_modeling(model)
        inf = infkit.Influence(task, "ekfac", damping=1e-3, fisher="ggn", progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scores[model] = inf.fit(train).scores(test).double()
    assert scores[half].dtype == torch.float64 and scores[exact].abs().max() > 0
    relative = float((scores[half] - scores[exact]).norm() / scores[exact].norm())
    assert relative < 0.1


def test_the_next_token_gradient_gap_is_autograds_in_two_precisions() -> None:
    """``next_token_gradient_gap`` in closed form, a few positions at a time: ||g_i|| is the
    float64 autograd gradient's norm of the summed next-token loss in the logits, and the gap
    the distance of float32 autograd's from it (labels -100 not scored), on logits of one
    ordinary and one confident sequence, in chunks of 3 positions."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 50, generator=gen)
    labels = torch.randint(0, 50, (2, 9), generator=gen)
    labels[0, 4:6] = -100
    logits[1, :-1].scatter_(-1, labels[1, 1:].unsqueeze(-1), 24.0)  # 1 - p about 1e-9
    grads = []
    for dtype in (torch.float32, torch.float64):
        at = logits.to(dtype).requires_grad_()
        (grad,) = torch.autograd.grad(lm.next_token_loss(at, labels).sum(), at)
        grads.append(grad.to(torch.float64).flatten(1))
    size, gap = grads[1].norm(dim=1), (grads[0] - grads[1]).norm(dim=1)
    with mock.patch.object(lm, "GAP_CHUNK_BYTES", 2 * 50 * 8 * 3):
        got_gap, got_size = lm.next_token_gradient_gap(logits, labels)
    torch.testing.assert_close(got_size, size, rtol=1e-12, atol=0)
    assert float(got_gap[0]) < 1e-6 * float(size[0])  # float32's rounding
    # the confident sequence: its true tokens' entries lost in float32, by both ways alike
    assert float(got_gap[1]) > 0.5 * float(got_size[1])
    torch.testing.assert_close(got_gap[1], gap[1], rtol=1e-3, atol=0)


def test_float32_queries_predicted_beyond_float32s_resolution_are_warned_of() -> None:
    """The language-modelling loss keeps the logits' float32 (a [B, T, V] copy in float64 is
    too large), where a probability within 6e-8 of 1 rounds to 1 and ``p - onehot`` loses its
    true token's entry. A tester's float32 Llama scored memorised one-token completions 13-91%
    off float64, with no word (a task's own loss had the check; the built-in one skipped it).
    Queries whose every scored token is predicted at a margin of about 25 nats (1 - p about
    1e-10, which float64 resolves): warned of,
    naming the set and the remedy, with identity's scores indeed moved (beyond float32's
    rounding) from the float64 model's;
    a training set of ordinary sequences, and the same queries on the float64 model, are not."""
    vocab, n = 8, 16
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Bigram(vocab).eval()
    with torch.no_grad():
        model.embed.weight.copy_(3 * torch.eye(vocab))
        model.mix.weight.copy_(torch.eye(vocab))
        model.mix.bias.zero_()
        model.head.weight.copy_(25 * torch.roll(torch.eye(vocab), 1, 0))
        model.head.bias.zero_()
    train = lm.examples(torch.randint(0, vocab, (n, 6), generator=gen))
    start = torch.randint(0, vocab, (4, 1), generator=gen)
    queries = lm.examples((start + torch.arange(4)) % vocab, prompt_lengths=[2] * 4)
    scores, said = {}, {}
    for dtype in (torch.float32, torch.float64):
        task = infkit.Task.language_modeling(model.to(dtype))
        inf = infkit.Influence(task, "identity", progress=False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            inf.fit(train)
            fitted = [str(w.message) for w in caught if "loses its precision" in str(w.message)]
            scores[dtype] = inf.scores(queries).double()
        said[dtype] = [str(w.message) for w in caught if "loses its precision" in str(w.message)]
        assert not fitted, fitted  # (the training set's gradients are not rounding)
    assert not said[torch.float64]
    assert len(said[torch.float32]) == 1, said
    message = said[torch.float32][0]
    assert "the task's loss loses its precision in float32 on test set example" in message
    assert "(4 of the 4 examples checked" in message and "model.double()" in message
    # (the scores move by far more than float32's rounding: 0.7% here, the tester's 13-91%)
    relative = (scores[torch.float32] - scores[torch.float64]).norm(dim=1)
    assert float((relative / scores[torch.float64].norm(dim=1)).max()) > 1e-3


def test_auto_passes_over_ekfac_when_its_factors_do_not_fit(problem: dict) -> None:
    """method='auto' takes EK-FAC for a language model only when its factors fit memory_limit
    (the reason is recorded); below that it takes the matrix-free cg instead of failing."""
    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roomy = infkit.Influence(task, "auto", l2=1e-2, damping=1e-2, memory_limit=20_000)
        assert roomy.fit(problem["train"]).method.name == "ekfac"
        tight = infkit.Influence(task, "auto", l2=1e-2, damping=1e-2, memory_limit=4_000)
        assert tight.fit(problem["train"]).method.name == "cg"
    reason = tight.describe()["auto"]["passed_over"]["ekfac"]
    assert reason.startswith("its factors do not fit") and "memory limit of 3.9 KiB" in reason


def test_output_fn_picks_the_logits_and_their_absence_names_the_fields(problem: dict) -> None:
    class Hidden(nn.Module):  # returns a dict, as a ...Model without an output head does
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):  # type: ignore[no-untyped-def]
            return {"scores": self.inner(input_ids), "hidden": torch.zeros(1)}

    wrapped = Hidden(problem["model"])
    with pytest.raises(InvalidInputError, match=r"cannot find the output tensor.*output_fn="):
        infkit.Influence(infkit.Task.language_modeling(wrapped), "identity").fit(problem["train"])

    class Body(nn.Module):  # hidden states only, as a Hugging Face ...Model returns them
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None):  # type: ignore[no-untyped-def]
            return SimpleNamespace(last_hidden_state=self.inner(input_ids))

    body = Body(problem["model"])
    with pytest.raises(InvalidInputError, match=r"returns SimpleNamespace: hidden states.*ForCaus"):
        infkit.Influence(infkit.Task.language_modeling(body), "identity").fit(problem["train"])
    classifier = infkit.Task.classification(body)
    with pytest.raises(InvalidInputError, match=r"hidden states.*ForSequenceClassification"):
        infkit.Influence(classifier, "identity").fit((problem["train"][0], torch.zeros(N).long()))
    direct = infkit.Influence(infkit.Task.language_modeling(problem["model"]), "identity")
    picked = infkit.Influence(
        infkit.Task.language_modeling(wrapped, output_fn=lambda out: out["scores"]), "identity"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = direct.fit(problem["train"]).scores(problem["test"])
        got = picked.fit(problem["train"]).scores(problem["test"])
    assert torch.equal(got, expected)


def _identity_plan(task: infkit.Task) -> infkit.plan.Plan:
    inf = infkit.Influence(task, "identity")
    return inf.plan(n_train=N, n_queries=Q, sequence_length=LENGTH, timed=False)


def test_a_plan_above_the_limit_suggests_the_methods_own_levers(problem: dict) -> None:
    task = infkit.Task.language_modeling(problem["model"])
    shown = {}
    for method in ("ekfac", "identity"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Notice)
            inf = infkit.Influence(task, method, damping=1e-2, memory_limit=1)
            shown[method] = str(inf.plan(n_train=N, n_queries=Q, sequence_length=LENGTH))
    assert "above memory_limit (1.0 B per process): track fewer layers (modules=)" in shown["ekfac"]
    assert "query_rank" not in shown["identity"] and "modules=" not in shown["identity"]
    assert "requires_grad=False" in shown["identity"]
    # TRAK's advice names the lever of its largest object: the projected features [M, N, k]
    # (proj_dim), the [Q, N] scores (fewer queries a call) or a batch's per-example gradients
    # [B, P] (batch_size); identity's fit makes no pass and holds nothing: no stage for it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        gradients = "attribute fewer parameters (freeze some: requires_grad=False)"
        for n, q, proj_dim, models, batch, expected in (
            (10_000, 1, 32, 3, 8, "lower proj_dim"),
            (10_000, 100_000, 8, 1, 8, "score fewer queries per call"),
            # under this limit a batch of 8 forms one example's gradients at a time, as a
            # batch of 1 does: no smaller batch to suggest for either
            (100, 1, 1, 1, 8, f"{gradients}: each batch's"),
            (100, 1, 1, 1, 1, f"{gradients}: each batch's"),
            (100, 1, 8, 1, 1, "lower proj_dim (R is already regenerated"),  # R's chunk
        ):
            checkpoints = [copy.deepcopy(problem["model"].state_dict())] * models
            inf = infkit.Influence(
                task,
                "trak",
                proj_dim=proj_dim,
                memory_limit=1,
                checkpoints=checkpoints,
                batch_size=batch,
            )
            plan = inf.plan(n_train=n, n_queries=q, sequence_length=LENGTH)
            assert f"above memory_limit (1.0 B per process): {expected}" in str(plan)
        names = [stage.name for stage in _identity_plan(task).stages]
    assert "fit identity" not in names and names[-2:] == ["queries", "scores"]
    # factors beyond the limit: the fit refuses before any pass, and the plan says so and
    # blames them (a tester's plan blamed the queries), with the fit's own count
    assert "alone exceed it, so the fit refuses before any pass" in shown["ekfac"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        inf = infkit.Influence(task, "ekfac", damping=1e-2, memory_limit=1)
        plan = inf.plan(problem["train"], problem["test"], timed=False)
        with pytest.raises(ProblemTooLargeError, match="keeps two Kronecker factors"):
            inf.fit(problem["train"])
    stages = {stage.name: stage for stage in plan.stages}
    assert stages["eigendecompositions"].refused
    assert "the fit refuses before any pass" in stages["eigendecompositions"].note


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("trak", {}),
        ("identity", {"checkpoints": "two"}),  # TracInCP: gradients at each checkpoint
        ("datainf", {}),
        ("cg", {}),
    ],
)
def test_per_example_gradients_keep_to_a_quarter_of_the_limit(
    problem: dict, monkeypatch: pytest.MonkeyPatch, method: str, options: dict
) -> None:
    # a batch's per-example gradients [B, P], their working memory (GRADIENT_WORK_FACTOR x) and
    # float64 copies are formed a few rows at a time under a limit whose quarter does not hold B of them (a
    # tester's TRAK went 359 MiB past its limit on a batch of 64): the same scores, and the
    # plan counts the rows the run forms
    from infkit.gradients import PerExample, gradient_row_bytes

    model = problem["model"]
    task = infkit.Task.language_modeling(model)
    p = sum(x.numel() for x in model.parameters())
    limit = 4 * 3 * gradient_row_bytes(p, 8)  # a quarter holds 3 rows of float64
    if options.get("checkpoints") == "two":
        state = {k: v.clone() for k, v in model.state_dict().items()}
        moved = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
        options = {"checkpoints": [moved, state], "learning_rates": [0.1, 0.1]}
    rows: list[int] = []
    grads = PerExample.grads

    def counted(self: PerExample, batch, which="loss"):  # type: ignore[no-untyped-def]
        rows.append(len(batch))
        return grads(self, batch, which)

    monkeypatch.setattr(PerExample, "grads", counted)
    scores = {}
    for memory_limit in (10**9, limit):
        rows.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf = infkit.Influence(
                task,
                method,
                l2=1e-2,
                damping=1e-2,
                batch_size=8,
                memory_limit=memory_limit,
                checks=False,
                **options,
            )
            plan = inf.plan(problem["train"], problem["test"], timed=False)
            inf.fit(problem["train"])
            scores[memory_limit] = inf.scores(problem["test"])
        assert rows, "the run formed no per-example gradients"
        largest = max(rows)
        if memory_limit == limit:
            assert largest == 3  # not the batch of 8
            if method == "trak":
                assert "a batch's per-example gradients [3, P]" in str(plan)
        else:
            assert largest == 8
    torch.testing.assert_close(scores[limit], scores[10**9], rtol=1e-9, atol=1e-12)


def test_the_plan_of_a_method_without_the_gradient_cache_shows_its_objective_pass(
    problem: dict,
) -> None:
    # cg keeps the [N, P] training gradients when they fit; where they do not, fit spends a
    # pass on grad L(theta*) instead (the stationarity check), and the plan says which
    task = infkit.Task.language_modeling(problem["model"])
    params = list(problem["model"].parameters())
    cache = N * sum(x.numel() for x in params) * max(params[0].element_size(), 4)
    stages = {}
    for limit in (64 * cache, 2 * cache):  # a quarter of the limit holds the cache, or not
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Notice)
            inf = infkit.Influence(task, "cg", damping=1e-2, memory_limit=limit)
            plan = inf.plan(n_train=N, n_queries=Q, sequence_length=LENGTH)
        stages[limit] = {s.name: s for s in plan.stages}
    assert stages[64 * cache]["training gradients"].held == cache  # held to the end
    assert "objective gradient" not in stages[64 * cache]
    assert "training gradients" not in stages[2 * cache]
    objective = stages[2 * cache]["objective gradient"]
    assert objective.passes == 1 and objective.bytes <= 3 * cache / N  # a few [P] vectors


def test_the_plan_says_above_the_limit_where_scoring_would_refuse(problem: dict) -> None:
    # the plan's verdict against the run's: at a limit that leaves the queries no room the
    # scoring refuses, and the plan says so even where its peak is under the limit; with room
    # for the queries in two groups both go through (the post-fit checks, whose probe
    # directions would be this tiny run's largest object, are left out; batches of one, which
    # no smaller scoring batch relieves)
    task = infkit.Task.language_modeling(problem["model"])
    opts = {"l2": 1e-2, "damping": 1e-2, "batch_size": 1, "checks": False}
    for k, refuses in ((0.0, True), (2.5, False)):
        limit = _limit_for_queries(problem, k, batch_size=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Notice)
            inf = infkit.Influence(task, "ekfac", memory_limit=limit, **opts)
            plan = inf.plan(problem["train"], problem["test"], timed=False)
            inf.fit(problem["train"])
        assert plan.within_limit is not refuses
        assert ("above memory_limit" in str(plan)) is refuses
        # where not even rank-1 queries fit, query_rank is not offered as the remedy
        assert ("query_rank cannot help" in str(plan)) is refuses
        if refuses:
            with pytest.raises(ProblemTooLargeError):
                inf.scores(problem["test"])
        else:
            assert inf.scores(problem["test"]).shape == (Q, N)


def test_decompositions_refused_for_their_larger_results_name_them_and_the_limit_that_holds_them(
    problem: dict,
) -> None:
    # a tester's case: at a limit that scores the queries, the per-module and per-token
    # results (2 layers of [Q, N]; [Q, N, T] and [Q, N]) leave the queries no room. The
    # refusal names the result as the cause and a memory_limit that holds them: that limit
    # scores, 8 bytes less refuses (batches of one, which no smaller scoring batch relieves)
    task = infkit.Task.language_modeling(problem["model"])
    opts = {"l2": 1e-2, "damping": 1e-2, "batch_size": 1, "checks": False}

    def ask(call: str, limit: int) -> str | None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Notice)
            inf = infkit.Influence(task, "ekfac", memory_limit=limit, **opts)
            inf.fit(problem["train"])
            if call == "module_scores":
                assert inf.scores(problem["test"]).shape == (Q, N)  # the scores fit
            try:
                getattr(inf, call)(problem["test"])
            except ProblemTooLargeError as error:
                return str(error)
        return None

    limit = _limit_for_queries(problem, 0.5, batch_size=1)  # half a query at full rank
    for call, result in (
        ("module_scores", f"module_scores' 2 float64 [{Q}, {N}] results"),
        ("token_scores", f"token_scores' float64 [{Q}, {N}, {LENGTH}] tokens"),
    ):
        refused = ask(call, limit)
        assert refused is not None and result in refused, refused
        assert "ask for fewer queries" in refused
        # the limits named: the least that scores (rank 1 of the queries, an approximation),
        # exactly, and before it one that holds the queries' layers at full rank
        named = [int(n) for n in re.findall(r"memory_limit=(\d+) \(", refused)]
        assert named, refused
        assert ask(call, named[-1]) is None
        assert ask(call, named[-1] - 8) is not None
        assert ask(call, named[0]) is None


def test_decompositions_add_up_to_the_scores_of_low_rank_queries(problem: dict) -> None:
    """With query_rank=r the scores are those of rank-r queries: the per-module and per-token
    splits decompose the same numbers (the regulariser's share at full rank, as the scores)."""
    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        full = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
        low = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2, query_rank=1)
        low.fit(problem["train"])
    test = problem["test"]
    S = low.scores(test)
    assert float((S - full.scores(test)).norm() / S.norm()) > 1e-3  # the truncation matters
    torch.testing.assert_close(sum(low.module_scores(test).values()), S, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(low.token_scores(test).total, S, rtol=1e-9, atol=1e-12)


def test_decompositions_split_their_queries_by_the_memory_limit(
    problem: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infkit import decompositions

    task = infkit.Task.language_modeling(problem["model"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
    test = problem["test"]
    whole, tokens = inf.module_scores(test), inf.token_scores(test)
    rows = decompositions.row_chunks
    monkeypatch.setattr(  # as a limit that holds one query's gradients at a time would give
        decompositions, "row_chunks", lambda n, *args, **kwargs: rows(n, 1, 0, 4)
    )
    assert len(decompositions.query_chunks(inf.fitted, ExampleSet(test))) == Q
    split = inf.module_scores(test)
    for name in whole:
        torch.testing.assert_close(split[name], whole[name], rtol=1e-12, atol=0)
    torch.testing.assert_close(inf.token_scores(test).tokens, tokens.tokens, rtol=1e-12, atol=0)


def test_progress_names_the_query_group_of_each_scoring_pass(
    problem: dict, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    from infkit import progress

    monkeypatch.setattr(progress, "LOG_AFTER", 0.0)  # log even these short passes
    task = infkit.Task.language_modeling(problem["model"])
    limit = _limit_for_queries(problem, 2, batch_size=2)  # two groups of queries
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        inf = infkit.Influence(
            task, "ekfac", l2=1e-2, damping=1e-2, batch_size=2, memory_limit=limit, progress=None
        )
        inf.fit(problem["train"])
        capsys.readouterr()
        inf.scores(problem["test"])
    printed = capsys.readouterr().err
    assert "[infkit] scores, group 1/2: done" in printed, printed
    assert "[infkit] scores, group 2/2: done" in printed, printed


# ============================================================================ the queries' scale
def _bigram_with_a_rare_trigger() -> tuple[infkit.Task, tuple, tuple]:
    """A tester's case: a one-hot bigram LM (no embedding: both layers tracked) trained to its
    optimum on 100 walks of 16 tokens, 20 of which pass a rare trigger token; queries are
    prompts ending in the trigger, their completion scored."""
    rng = np.random.default_rng(0)
    vocab, length, n, trigger = 41, 16, 100, 1
    succ = {t: rng.choice(np.arange(2, 37), 3, replace=False) for t in range(2, 40)}
    succ[trigger] = np.array([5, 9, 12])

    def walk(start: int, count: int) -> list[int]:
        out = [start]
        while len(out) < count:
            out.append(int(rng.choice(succ[out[-1]])))
        return out

    docs = []
    for j in range(n):
        d = walk(int(rng.integers(2, 37)), length)
        if j < 20:
            p = int(rng.integers(3, length - 5))
            d = [*d[:p], trigger, *walk(int(rng.choice(succ[trigger])), length - p - 1)]
        docs.append(d[:length])

    class Bigram(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.out = nn.Linear(vocab, 24), nn.Linear(24, vocab)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = nn.functional.one_hot(input_ids, vocab).double()
            return self.out(torch.tanh(self.inp(x)))

    torch.manual_seed(0)
    task = infkit.Task.language_modeling(Bigram().double())
    train = lm.examples(torch.tensor(docs))
    infkit.train_to_optimum(task, train, 1e-3)
    prompts = [[*walk(int(rng.integers(2, 37)), 5), trigger, 5, 9, 12] for _ in range(8)]
    return task, train, lm.examples(torch.tensor(prompts), prompt_lengths=[6] * 8)


@pytest.mark.slow
def test_queries_where_the_kronecker_factors_are_poor_are_named() -> None:
    # EK-FAC's scores of the trigger's completions came out 13x the exact GGN solve's, K-FAC's
    # 38x, while the post-fit ratio along the training gradients read 0.67 and 1.3 (a
    # tester's): the ratio along the queries' own gradients reads the error and warns
    task, train, queries = _bigram_with_a_rare_trigger()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exact = infkit.Influence(task, "cg", l2=1e-3, checks=False).fit(train).scores(queries)
    for method in ("ekfac", "kfac"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf = infkit.Influence(task, method, l2=1e-3, damping=1e-3).fit(train)
        with pytest.warns(
            UserWarning,
            match=f"method '{method}' gives the scores of .*queries 0, 1, 2, 3 and 4 more about",
        ):
            S = inf.scores(queries)
        actual = float(S.norm() / exact.norm())
        figure = inf.describe()["query_energy_ratio"]
        # the order of magnitude, not the factor: the ratio weighs the directions otherwise
        # than the scores' norm, on a sample of the training examples (ekfac: 6.8 and 6.0 read
        # against 18.8 in two runs; the tester's queries 11.9 and 13)
        assert actual > 4 and figure > 4 and 1 / 4 < figure / actual < 4, (method, actual, figure)
        assert inf.describe()["energy_ratio"] < 2  # the post-fit probes do not see it


def test_the_queries_energy_ratio_reads_the_methods_own_scale(problem: dict) -> None:
    # on the tiny LM the EK-FAC answers are right along the queries (no warning); the same
    # solve made 10x too large (in a second fit: a fit measures a direction once) reads 10
    # and warns
    task = infkit.Task.language_modeling(problem["model"])
    fits = []
    for _ in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits.append(
                infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-2).fit(problem["train"])
            )
    inf, scaled = fits
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        inf.scores(problem["test"])
    honest = inf.describe()["query_energy_ratio"]
    assert 0.25 < honest < 4
    solve = scaled.method.inverse()
    scaled.method.inverse = lambda: lambda V: 10 * solve(V)  # type: ignore[method-assign]
    with pytest.warns(UserWarning, match=r"about \d+\.\dx too large along their own"):
        scaled.scores(problem["test"])
    assert scaled.describe()["query_energy_ratio"] == pytest.approx(10 * honest, rel=1e-6)


# ============================================================================ the first pass kept
class _SharedInputLM(nn.Module):
    """Two layers reading one input tensor (as q and k do), a head: [B, T, V]."""

    def __init__(self, width: int = 5) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.head = nn.Linear(width, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        h = self.embed(input_ids)
        return self.head(torch.tanh(self.q(h)) * self.k(h))


@pytest.mark.parametrize("fisher", ["empirical", "ggn"])
def test_ekfac_keeps_the_first_pass_for_its_eigenvalues_as_its_plan_counts(
    problem: dict, fisher: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EK-FAC's eigenvalue pass reuses the first pass's activations and output gradients when
    the whole pass fits ``cache_bytes``: the same eigenvalues as a second pass, and the plan
    counts exactly the bytes held (the input q and k share counted once). A pass that will not
    fit is dropped at its first batch, not held up to ``cache_bytes`` first."""
    from infkit.kfac import factors as kf

    torch.manual_seed(0)
    task = infkit.Task.language_modeling(_SharedInputLM().double())
    kept: list[int | None] = []
    counted: list[int] = []
    covariances, held_bytes = kf.FactorFitter._covariances, kf.held_bytes

    def spy_covariances(self: Any, *args: Any, **kwargs: Any) -> Any:
        factors, cache = covariances(self, *args, **kwargs)
        tensors = [x for entry in cache or [] for pair in entry.values() for x in pair]
        kept.append(None if cache is None else held_bytes(tensors))
        return factors, cache

    def spy_held_bytes(tensors: Any) -> int:
        counted.append(held_bytes(tensors))
        return counted[-1]

    monkeypatch.setattr(kf.FactorFitter, "_covariances", spy_covariances)
    monkeypatch.setattr(kf, "held_bytes", spy_held_bytes)
    opts = {"fisher": fisher, "damping": 1e-2, "batch_size": 6, "checks": False}

    def fit(cache: int) -> tuple[infkit.Influence, int]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Notice)
            inf = infkit.Influence(task, "ekfac", cache_bytes=cache, **opts)
            plan = inf.plan(problem["train"], timed=False)
            inf.fit(problem["train"])
        stage = next(s for s in plan.stages if s.name == "covariances A, S")
        return inf, stage.bytes

    cached, cached_plan = fit(1 << 30)
    whole = kept[-1]
    assert whole is not None and len(counted) == -(-N // 6)  # every batch kept
    passed, passed_plan = fit(0)
    assert kept[-1] is None
    if fisher == "empirical":  # the plan counts the bytes held, to the byte
        assert cached_plan - passed_plan == whole
    else:  # it counts the GGN's vectors at the outputs' number, more than the LM pulls back
        assert whole < cached_plan - passed_plan < 1.3 * whole
    layers = cached.method.kronecker().factors.modules
    for name, module in passed.method.kronecker().factors.modules.items():
        assert module.Lambda is not None and layers[name].Lambda is not None
        torch.testing.assert_close(layers[name].Lambda, module.Lambda, rtol=1e-10, atol=0)
    counted.clear()
    fit(whole // 2)  # clearly too large: let go at the first batch, nothing held beyond it
    assert kept[-1] is None and len(counted) == 1
    fit(whole - 1)  # one byte short: not kept
    assert kept[-1] is None
    # the GGN's batches pull back 63 to 66 vectors, so the first batch projects the pass above
    # its size: a cache of exactly that size still keeps it (a reviewer's case)
    fit(whole)
    assert kept[-1] == whole


def test_a_resumed_ekfac_plan_counts_no_first_pass_cache(problem: dict, tmp_path: Path) -> None:
    """EK-FAC resumed from its committed first stage (K-FAC's factors in factors_dir) has no
    first pass, so no cache: its plan's eigenvalue stage is the same whatever cache_bytes."""
    torch.manual_seed(0)
    task = infkit.Task.language_modeling(_SharedInputLM().double())
    opts = {"fisher": "empirical", "damping": 1e-2, "batch_size": 6, "checks": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        infkit.Influence(task, "kfac", factors_dir=tmp_path, **opts).fit(problem["train"])
        stages = []
        for cache in (1 << 30, 0):
            inf = infkit.Influence(task, "ekfac", factors_dir=tmp_path, cache_bytes=cache, **opts)
            plan = inf.plan(problem["train"], timed=False)
            stages.append({s.name: s.bytes for s in plan.stages})
    assert "covariances A, S" not in stages[0]  # read back
    assert stages[0]["eigenvalue correction"] == stages[1]["eigenvalue correction"]


def test_each_process_counts_the_examples_of_its_batches() -> None:
    from infkit.distributed import examples_in_batches

    # 20 examples in batches of 6 over 2 processes: rank 0 takes batches 0 and 2 (12
    # examples), rank 1 batches 1 and 3 (6 + 2)
    assert [examples_in_batches(20, 6, rank, 2) for rank in (0, 1)] == [12, 8]
    assert examples_in_batches(20, 6) == 20  # alone: all of them


def test_a_plan_whose_checks_hold_the_peak_names_checks_false(problem: dict) -> None:
    """A tester's EK-FAC plan above memory_limit because of the post-fit checks advised
    fewer layers, query_rank or a smaller batch, none of which touch them; checks=False does.
    (Batches of 2: the checks' batches take the outputs' share of the limit, so at the fit's
    batches of 8 the eigenvalue pass holds the peak.)"""
    task = infkit.Task.language_modeling(problem["model"])
    options = {"damping": 1e-2, "fisher": "empirical", "batch_size": 2, "memory_limit": 16384}
    shape = {"n_train": N, "n_queries": Q, "sequence_length": LENGTH, "timed": False}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Notice)
        plan = infkit.Influence(task, "ekfac", **options).plan(**shape)
        skipped = infkit.Influence(task, "ekfac", checks=False, **options).plan(**shape)
    held = dict(zip([s.name for s in plan.stages], plan.stage_bytes, strict=True))
    assert plan.peak_stage == "post-fit checks" == max(held, key=held.__getitem__)
    assert not plan.within_limit
    assert "the post-fit checks hold the peak: checks=False skips them; or track" in str(plan)
    assert skipped.peak_stage != "post-fit checks" and "checks=False skips them;" not in str(
        skipped
    )
