"""Messages for the input mistakes of a causal-language-model script written from the docs.

Each mistake gets an InfkitError (or one warning) that names the set, the example or the
option, and says what to do: queries in another form than the training set, a missing
attention mask, token ids outside the vocabulary, a misspelt ``Influence`` keyword, and the
warnings of ``torch.func.vmap`` on Hugging Face attention.
"""

from __future__ import annotations

import inspect
import re
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lm_helpers import LENGTH, VOCAB, TinyLM, llama_config
from torch import nn

import infkit
from infkit import language_modeling as lm
from infkit.data import ExampleSet
from infkit.errors import InvalidInputError, Notice, UnsupportedError
from infkit.gradients import (
    BATCHING_RULE_WARNING,
    PerExample,
    batching_rule_notice,
    error_summary,
    vmap_fallback_message,
)
from infkit.options import FACADE_KEYWORDS
from infkit.parameters import ParameterSpace

pytestmark = pytest.mark.filterwarnings(
    "ignore:the model is not at a stationary point", "ignore:method 'ekfac' attributes through"
)

N = 6


@pytest.fixture(scope="module")
def lm_problem() -> dict:
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    ids = torch.randint(0, VOCAB, (N, LENGTH))
    mask = torch.ones_like(ids)
    task = infkit.Task.language_modeling(model)
    inf = infkit.Influence(task, "identity", progress=False).fit(lm.examples(ids, mask))
    return {"model": model, "task": task, "ids": ids, "mask": mask, "inf": inf}


# ============================================================================ query forms
def test_a_set_of_dicts_without_labels_names_the_keys_it_has(lm_problem: dict) -> None:
    """Training data and queries of dicts with no label key: refused naming the keys found,
    by the fit and by a question (the task reads labels for its loss)."""
    rows = [
        {"input_ids": i, "attention_mask": m} for i, m in zip(lm_problem["ids"], lm_problem["mask"])
    ]
    found = "has no labels: a dataset of dicts needs a label key .*keys found: attention_mask, input_ids"
    with pytest.raises(InvalidInputError, match="training set " + found):
        infkit.Influence(lm_problem["task"], "identity").fit(rows)
    with pytest.raises(InvalidInputError, match="test set " + found):
        lm_problem["inf"].scores(rows[:3])


def test_queries_as_a_tensor_pair_name_both_forms(lm_problem: dict) -> None:
    ids, labels = lm_problem["ids"][:2], lm_problem["ids"][:2]
    with pytest.raises(
        InvalidInputError,
        match=r"the test set's inputs are a tensor \[n, 7\] of integers, but the training "
        r"set's are a dict with keys attention_mask, input_ids: give both in the same form "
        r"\(infkit\.language_modeling\.examples\(input_ids, attention_mask\) builds",
    ):
        lm_problem["inf"].scores((ids, labels))


def test_queries_as_bare_token_ids_ask_for_labels(lm_problem: dict) -> None:
    with pytest.raises(
        InvalidInputError,
        match=r"test set is a single Tensor of shape \(2, 7\): give the inputs together with "
        r"their labels.*infkit\.language_modeling\.examples\(input_ids, attention_mask\)",
    ):
        lm_problem["inf"].scores(lm_problem["ids"][:2])


def test_queries_with_other_keys_say_which_are_missing_and_extra(lm_problem: dict) -> None:
    ids, mask = lm_problem["ids"][:2], lm_problem["mask"][:2]
    with pytest.raises(
        InvalidInputError,
        match=r"the test set's inputs lack the key 'attention_mask' that the training set's "
        r"have and have the key 'token_type_ids' that the training set's do not",
    ):
        lm_problem["inf"].scores(({"input_ids": ids, "token_type_ids": mask}, ids))


def test_per_key_shapes_name_the_key() -> None:
    train = ExampleSet(({"x": torch.zeros(3, 4), "m": torch.ones(3, 2)}, torch.zeros(3)))
    test = ExampleSet(({"x": torch.zeros(2, 5), "m": torch.ones(2, 2)}, torch.zeros(2)))
    train.name, test.name = "training set", "test set"
    with pytest.raises(
        InvalidInputError,
        match=r"test set input 'x' has per-example shape \(5,\), but training set input 'x' "
        r"has \(4,\)",
    ):
        infkit.data.check_compatible(train, test)


# ============================================================================ attention mask
def test_queries_without_the_attention_mask_say_so(lm_problem: dict) -> None:
    with pytest.raises(
        InvalidInputError,
        match=r"the test set's inputs lack the key 'attention_mask' that the training set's "
        r"have: give both sets the same input keys; .*attention_mask=torch\.ones_like\(input_ids\)",
    ):
        lm_problem["inf"].scores(lm.examples(lm_problem["ids"][:2]))


def test_queries_with_an_attention_mask_the_training_set_lacks_say_so(lm_problem: dict) -> None:
    ids = lm_problem["ids"]
    inf = infkit.Influence(lm_problem["task"], "identity", progress=False).fit(lm.examples(ids))
    with pytest.raises(
        InvalidInputError,
        match=r"the test set's inputs have the key 'attention_mask' that the training set's do "
        r"not: give both sets the same input keys; give the training set one too .*"
        r"ones_like\(input_ids\) where nothing in it is padded\)\. Drop the test set's "
        r"attention_mask only where nothing in it is padded either",
    ):
        inf.scores(lm.examples(ids[:2], torch.ones_like(ids[:2])))


# ============================================================================ token ids
def test_token_id_beyond_the_vocabulary_in_example_0(lm_problem: dict) -> None:
    ids = lm_problem["ids"].clone()
    ids[0, 0] = VOCAB
    with pytest.raises(
        InvalidInputError,
        match=rf"training set example 0: token id {VOCAB} at position 0 of input_ids is outside "
        rf"the vocabulary: the model embeds {VOCAB} tokens .*\[0, {VOCAB}\); check that the "
        "tokenizer is the model's own",
    ):
        infkit.Influence(lm_problem["task"], "identity").fit(lm.examples(ids, lm_problem["mask"]))


def test_token_id_beyond_the_vocabulary_in_a_later_unscored_position(lm_problem: dict) -> None:
    ids = lm_problem["ids"].clone()
    ids[4, 0] = 40  # position 0 is no label (the loss shifts): only the input check sees it
    with pytest.raises(
        InvalidInputError, match=r"training set example 4: token id 40 at position 0"
    ):
        infkit.Influence(lm_problem["task"], "ekfac", progress=False).fit(
            lm.examples(ids, lm_problem["mask"])
        )


def test_a_subset_names_its_examples_as_the_user_numbers_them(lm_problem: dict) -> None:
    """Messages about an example of a subset (the report's chosen queries, a group of them)
    give its number in the set the user gave, not its place in the subset."""
    ids = lm_problem["ids"].clone()
    ids[4, 0] = VOCAB
    queries = ExampleSet(lm.examples(ids, lm_problem["mask"]), name="test set")
    # and its position there, which the results' indices take
    said = rf"test set example 4 \(position 1 of the subset given\): token id {VOCAB} at"
    with pytest.raises(InvalidInputError, match=said):
        lm_problem["inf"].scores(queries.subset([2, 4]))
    nested = queries.subset([5, 3, 4]).subset([2, 0])  # a subset of a subset: example 4 again
    assert [nested.number(i) for i in range(2)] == [4, 5]
    assert nested.take([0]).example(0) == "example 4 (position 0 of the subset given)"
    # infkit's own splits of a set (groups of queries) name examples as in the set given
    assert queries.part([2, 4]).example(1) == "example 4"
    assert queries.part([2, 4]).take([1]).example(0) == "example 4"
    assert (
        queries.subset([2, 4]).part([1]).example(0) == "example 4 (position 1 of the subset given)"
    )
    with pytest.raises(InvalidInputError, match=r"subset index -1 is out of range \[0, 6\)"):
        queries.subset([-1])
    unnamed = ExampleSet(lm.examples(ids, lm_problem["mask"]))  # named by its role
    with pytest.raises(InvalidInputError, match=r"test set example 4 \(position 0 of the"):
        lm_problem["inf"].scores(unnamed.subset([4]))
    features = torch.zeros(8, 3)
    features[6, 1] = float("nan")
    with pytest.raises(
        InvalidInputError, match=r"data example 6 \(position 1 of the subset given\) contains NaN"
    ):
        ExampleSet((features, torch.zeros(8))).subset([1, 6]).check_finite()


def test_negative_padding_id_in_a_query(lm_problem: dict) -> None:
    ids = lm_problem["ids"][:3].clone()
    mask = torch.ones_like(ids)
    ids[1, 5:], mask[1, 5:] = lm.IGNORE_INDEX, 0  # padded with -100, the ignored label
    with pytest.raises(
        InvalidInputError,
        match=r"test set example 1: token id -100 at position 5 of input_ids is outside the "
        r"vocabulary.*-100 marks a label that is not scored, never an input: pad input_ids with "
        r"a real token",
    ):
        lm_problem["inf"].scores(lm.examples(ids, mask))


def test_plain_token_id_inputs_are_checked(lm_problem: dict) -> None:
    ids = lm_problem["ids"].clone()
    task = lm_problem["task"]
    inf = infkit.Influence(task, "identity", progress=False).fit((ids, ids.clone()))
    bad = ids[:2].clone()
    bad[1, 3] = 99
    with pytest.raises(
        InvalidInputError, match=r"test set example 1: token id 99 at position 3 of the token ids"
    ):
        inf.scores((bad, ids[:2].clone()))


def test_vocabulary_is_the_input_embedding_not_the_first_embedding() -> None:
    class Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.positions = nn.Embedding(64, 3)  # the first nn.Embedding, not the vocabulary
            self.tokens = nn.Embedding(5, 3)

        def get_input_embeddings(self) -> nn.Module:
            return self.tokens

    class NoGetter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.positions = nn.Embedding(7, 3)  # first, but smaller than the token embedding
            self.tokens = nn.Embedding(50, 3)

    assert lm.vocabulary_size(Positions()) == 5
    assert lm.vocabulary_size(NoGetter()) == 50  # no id that some embedding takes is refused
    assert lm.vocabulary_size(TinyLM()) == VOCAB
    assert lm.vocabulary_size(nn.Linear(2, 2)) is None
    ids = torch.tensor([[0, 1, 5], [0, 1, 2]])
    assert lm.check_token_ids({"input_ids": ids}, Positions()) is not None
    assert lm.check_token_ids({"input_ids": ids}, TinyLM()) is None
    assert lm.check_token_ids({"input_ids": ids.float()}, TinyLM()) is None  # not token ids


# ============================================================================ option typos
def test_facade_keywords_are_the_influence_signature() -> None:
    parameters = inspect.signature(infkit.Influence.__init__).parameters
    named = [
        name
        for name, p in parameters.items()
        if name != "self" and p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    assert sorted(FACADE_KEYWORDS) == sorted(named)
    # A method option named as a keyword of Influence's could never be given (the dual
    # method's `dtype` was taken by Influence's own).
    for name, info in infkit.methods().items():
        taken = sorted(set(info["options"]) & set(FACADE_KEYWORDS))
        assert not taken, f"method {name!r}'s option(s) {taken} are Influence keywords"


def test_misspelt_influence_keyword_is_suggested_first(lm_problem: dict) -> None:
    task = lm_problem["task"]
    with pytest.raises(
        UnsupportedError,
        match=r"'dampng' \(did you mean infkit\.Influence\(\.\.\., damping=\.\.\.\), a keyword "
        r"of Influence itself, or the option 'damping_scale'\?\)",
    ):
        infkit.Influence(task, "ekfac", dampng=1e-3)
    with pytest.raises(
        UnsupportedError, match=r"'batchsize' \(did you mean infkit\.Influence\(\.\.\., batch_size"
    ):
        infkit.Influence(task, "exact", batchsize=8)


def test_an_options_table_is_told_to_be_keywords(lm_problem: dict) -> None:
    """``options={...}`` (the config file's form) is not taken for a misspelt option."""
    with pytest.raises(UnsupportedError, match=r"'options' \(give the options as keywords") as e:
        infkit.Influence(lm_problem["task"], "astra", options={"maxiter": 5})
    assert "did you mean" not in str(e.value)


def test_misspelt_method_option_is_still_suggested(lm_problem: dict) -> None:
    with pytest.raises(UnsupportedError, match=r"'fishr' \(did you mean 'fisher'\?\)"):
        infkit.Influence(lm_problem["task"], "ekfac", fishr="empirical")


# ============================================================================ vmap warnings
VMAP_ERROR = (
    "vmap: It looks like you're either (1) calling .item() on a Tensor or (2) attempting to use "
    "a Tensor in some data-dependent control flow or (3) encountering this error in PyTorch "
    "internals. For (1): we don't support vmap over calling .item() on a Tensor, please try to "
    "rewrite what you're doing with other operations. For (2): we don't support data-dependent "
    "control flow in vmap yet, please file an issue at https://github.com/pytorch/pytorch/issues ."
)


def test_quoted_errors_end_at_a_sentence_or_clause() -> None:
    summary = error_summary(RuntimeError(VMAP_ERROR))
    assert summary == "RuntimeError: " + VMAP_ERROR.split(" For (1)")[0]
    long_clause = "a very long clause " * 20 + ", and more"
    cut = error_summary(ValueError(long_clause + "\nsecond line"), limit=100)
    assert cut.endswith(" ...") and "second line" not in cut
    kept = cut[len("ValueError: ") : -len(" ...")]
    assert long_clause.startswith(kept) and long_clause[len(kept)] == " "  # whole words
    assert error_summary(RuntimeError("short\nmore")) == "RuntimeError: short"
    message = vmap_fallback_message(RuntimeError(VMAP_ERROR))
    assert "PyTorch internals. Hugging Face" in message and "For (1)" not in message
    assert 'per_example="loop"' in message


def test_batching_rule_warnings_become_one_notice_per_model() -> None:
    model = nn.Linear(2, 2)
    torch_warning = (
        f"{BATCHING_RULE_WARNING} aten::_fused_attention_backward. Please file an issue."
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with batching_rule_notice(model):
                warnings.warn(torch_warning, UserWarning, stacklevel=1)
                warnings.warn(torch_warning, UserWarning, stacklevel=1)
                warnings.warn("something else", UserWarning, stacklevel=1)
    texts = [str(w.message) for w in caught]
    assert not any(t.startswith(BATCHING_RULE_WARNING) for t in texts)
    assert texts.count("something else") == 2  # other warnings pass as before
    notices = [w for w in caught if issubclass(w.category, Notice)]
    assert len(notices) == 1
    assert "no batching rule for aten::_fused_attention_backward" in str(notices[0].message)
    assert 'attn_implementation="eager"' in str(notices[0].message)


def _tiny_bert(transformers, attention: str) -> nn.Module:  # type: ignore[no-untyped-def]
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        is_decoder=True,
        attn_implementation=attention,
    )
    return transformers.BertLMHeadModel(config).eval()


def _engine_and_batch(model: nn.Module, n: int, length: int):  # type: ignore[no-untyped-def]
    """The per-example engine of a 40-token language model and a batch of n random sequences."""
    ids = torch.randint(0, 40, (n, length))
    engine = PerExample(infkit.Task.language_modeling(model), ParameterSpace(model))
    return engine, ExampleSet(lm.examples(ids, torch.ones_like(ids))).take(range(n))


def test_the_vmap_fallback_is_said_once_a_model() -> None:
    """A tester's: every fit on an SDPA model warned again (the docs promise once a model);
    its later engines now take the loop at once, with the same gradients."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = _tiny_bert(transformers, "sdpa")
    engine, batch = _engine_and_batch(model, 3, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = engine.grads(batch)
        again = PerExample(engine.task, ParameterSpace(model)).grads(batch)
    fallbacks = [w for w in caught if "could not batch the model" in str(w.message)]
    assert len(fallbacks) == 1
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_bert_vmap_fallback_warning_quotes_whole_sentences() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    engine, batch = _engine_and_batch(_tiny_bert(transformers, "sdpa"), 3, 6)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.grads(batch)
    [fallback] = [w for w in caught if issubclass(w.category, RuntimeWarning)]
    text = str(fallback.message)
    assert "could not batch the model over examples; falling back to an exact" in text
    summary = text.split("The error: ")[1].split(" Hugging Face")[0]
    assert summary.endswith("."), summary  # a whole sentence, not cut mid-word
    assert 'attn_implementation="eager"' in text and 'per_example="loop"' in text


def test_llama_sdpa_batching_rule_warning_once() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(llama_config(attn_implementation="sdpa")).eval()
    engine, batch = _engine_and_batch(model, 2, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.jacobians(batch)  # jacrev's vmap over the outputs meets the fused attention
        engine.jacobians(batch)
        engine.vjp(batch, torch.ones(3, 2, 5 * 40))
    texts = [str(w.message) for w in caught]
    assert not any(t.startswith(BATCHING_RULE_WARNING) for t in texts)
    notices = [t for t, w in zip(texts, caught) if issubclass(w.category, Notice)]
    assert len(notices) == 1, texts
    assert "scaled_dot_product" in notices[0]


def test_out_of_vocabulary_ids_for_a_llama(lm_problem: dict) -> None:
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM(llama_config()).eval()
    ids = torch.randint(0, 40, (2, 5))
    ids[1, 0] = 40  # position 0 is no label: the input check finds it
    with pytest.raises(
        InvalidInputError, match=r"training set example 1: token id 40 .*the model embeds 40 tokens"
    ):
        infkit.Influence(infkit.Task.language_modeling(model), "identity").fit(lm.examples(ids))


# ============================================================================ lm.examples
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda ids: lm.examples(ids.float()), r"integer token ids, got dtype torch\.float32"),
        (
            lambda ids: lm.examples(ids, torch.ones(4, 3)),
            rf"attention_mask must have the shape of input_ids, \[4, {LENGTH}\], got \[4, 3\]",
        ),
        (lambda ids: lm.examples(ids, prompt_lengths=[2] * 3), "must be 4 integers, one per"),
        (
            lambda ids: lm.examples(ids, prompt_lengths=[2, 2, LENGTH, 2]),
            rf"prompt_lengths\[2\] = {LENGTH} is not in \[0, {LENGTH - 1}\]",
        ),
        (lambda ids: lm.examples(ids, prompt_lengths=[-3] * 4), r"prompt_lengths\[0\] = -3"),
        (lambda ids: lm.examples(ids, prompt_lengths=True), r"got 4 of dtype torch\.bool"),
        (lambda ids: lm.examples(ids, prompt_lengths=[2]), r"4 integers, one per sequence \(or"),
        (
            lambda ids: lm.examples(ids, torch.tensor([[1] * LENGTH] * 3 + [[1] + [0] * 6])),
            "sequence 3 has no token to score",
        ),
    ],
)
def test_examples_refuse_what_would_score_nothing_or_fail_later(call, message: str) -> None:  # type: ignore[no-untyped-def]
    """lm.examples names each mistake instead of a bare IndexError or labels that are all
    -100 (a query scoring exactly 0 against every training example)."""
    ids = torch.randint(0, VOCAB, (4, LENGTH))
    with pytest.raises(InvalidInputError, match=message):
        call(ids)
    _, labels = lm.examples(ids, prompt_lengths=[LENGTH - 1] * 4)  # the last token scored
    assert bool((labels[:, -1] == ids[:, -1]).all()) and bool((labels[:, :-1] == -100).all())
    # one integer is every sequence's prompt length (a tester's natural reading; refused before)
    for one in (2, torch.tensor(2), np.int64(2)):
        _, same = lm.examples(ids, prompt_lengths=one)  # type: ignore[arg-type]
        assert torch.equal(same, lm.examples(ids, prompt_lengths=[2] * 4)[1])


def test_one_token_sequences_given_as_they_are_are_refused(lm_problem: dict) -> None:
    """(ids, labels) of one token each, not through lm.examples: no next token, a loss of 0,
    every score 0 (accepted before: only lm.examples refused it)."""
    ids = torch.randint(0, VOCAB, (4, 1))
    task = infkit.Task.language_modeling(lm_problem["model"])
    with pytest.raises(InvalidInputError, match="one token long, so they have no token to score"):
        infkit.Influence(task, "identity").fit(({"input_ids": ids}, ids.clone()))


def test_parameters_that_take_no_part_in_the_outputs_are_refused() -> None:
    """A model whose only trainable parameters the forward pass never uses (a layer built and
    not called): every gradient and score would be 0 (exact returned zeros, identity raised
    PyTorch's own error); refused, naming them, before any pass."""

    class Unused(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = torch.nn.Linear(3, 2).requires_grad_(False)
            self.spare = torch.nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.used(x)

    X, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    task = infkit.Task.classification(Unused())
    for method in ("identity", "exact", "ekfac"):
        with pytest.raises(
            InvalidInputError,
            match=r"none of the 2 parameters attributed through \('spare.weight', 'spare.bias'\)"
            r" takes part in the model's outputs for training set example 0",
        ):
            infkit.Influence(task, method, damping=1e-2).fit((X, y))
    # other trainable parameters in the outputs do not hide it: the Kronecker methods attribute
    # through the named layers only (PyTorch's "`inputs` argument to grad() cannot be empty")
    model = Unused()
    model.used.requires_grad_(True)
    with pytest.raises(InvalidInputError, match=r"none of the 2 parameters .*'spare.weight'"):
        infkit.Influence(infkit.Task.classification(model), "ekfac", modules=["spare"]).fit((X, y))


class EncoderClassifier(nn.Module):
    """Token and token-type embeddings, a mean over positions, a head: a Hugging Face encoder's
    inputs (``input_ids``, ``token_type_ids``) and its configuration's ``type_vocab_size``."""

    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(type_vocab_size=2)
        self.tokens = nn.Embedding(VOCAB, 4)
        self.types = nn.Embedding(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        return self.head((self.tokens(input_ids) + self.types(token_type_ids)).mean(1))


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "input_ids",
            VOCAB + 3,
            "token id 14 at position 2 of input_ids is outside the vocabulary",
        ),
        (
            "token_type_ids",
            2,
            "token type id 2 at position 2 of token_type_ids is outside the "
            "model's token types: the model has 2",
        ),
    ],
)
def test_a_classifiers_ids_outside_its_embeddings_name_the_example(
    key: str, value: int, message: str
) -> None:
    """A classifier's token (or token type) id beyond its embedding: refused naming the example
    and position, where nn.Embedding raised a bare IndexError (a tester's BERT)."""
    torch.manual_seed(0)
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (6, 5)),
        "token_type_ids": torch.zeros(6, 5, dtype=torch.long),
    }
    inputs[key][4, 2] = value
    task = infkit.Task.classification(EncoderClassifier().double())
    with pytest.raises(InvalidInputError, match=f"training set example 4: {message}"):
        infkit.Influence(task, "identity").fit((inputs, torch.randint(0, 3, (6,))))


def test_token_types_of_a_model_without_a_type_embedding_are_its_own() -> None:
    """A configuration with type_vocab_size = 0 (DeBERTa's: no token type embedding, its
    tokenizer returns token_type_ids all the same) takes them: not refused as outside."""
    torch.manual_seed(0)
    model = EncoderClassifier().double()
    model.config = SimpleNamespace(type_vocab_size=0)
    inputs = {
        "input_ids": torch.randint(0, VOCAB, (6, 5)),
        "token_type_ids": torch.zeros(6, 5, dtype=torch.long),
    }
    fitted = infkit.Influence(infkit.Task.classification(model), "identity")
    data = (inputs, torch.randint(0, 3, (6,)))
    assert fitted.fit(data).scores(data).isfinite().all()


class _KeywordLM(TinyLM):
    """TinyLM taking its ids as Hugging Face models do: optional keywords, a ValueError when
    none is given, and the main input's name on the model."""

    main_input_name = "input_ids"

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if input_ids is None:
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        return super().forward(input_ids, attention_mask)


def test_a_misspelt_main_input_is_named_with_the_key_given(lm_problem: dict) -> None:
    # a tester's `input_id` got transformers' bare "You must specify exactly one of input_ids
    # or inputs_embeds", naming neither the set nor its keys
    torch.manual_seed(0)
    task = infkit.Task.language_modeling(_KeywordLM().double())
    ids = lm_problem["ids"]
    inputs, labels = lm.examples(ids, torch.ones_like(ids))
    misspelt = {"input_id": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with pytest.raises(
        InvalidInputError,
        match=r"the model could not be called on training set example 0 \(input keys: "
        r"attention_mask, input_id\): ValueError: You must specify .* The model reads its main "
        r"input as 'input_ids' \(its main_input_name\), a key the training set's inputs lack: "
        r"name it so \(given: 'input_id'\)",
    ):
        infkit.Influence(task, "identity", progress=False).fit((misspelt, labels))


class _EmbedsLM(_KeywordLM):
    """_KeywordLM that also takes ``inputs_embeds`` (as Hugging Face models do), of a width it
    checks."""

    def forward(  # type: ignore[override]
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        if inputs_embeds is not None:
            raise ValueError(f"inputs_embeds must be {self.embed.embedding_dim} wide")
        return super().forward(input_ids, attention_mask)


def test_the_main_input_hint_is_given_only_for_a_key_the_model_does_not_name(
    lm_problem: dict,
) -> None:
    """A reviewer's cases: a model's own error with a key it names (inputs_embeds of the wrong
    width) was told to rename that key to input_ids; an unrelated key (a cutoff of 0) too."""
    torch.manual_seed(0)
    ids = lm_problem["ids"]
    _, labels = lm.examples(ids)
    for given in (
        {"inputs_embeds": torch.zeros(*ids.shape, 3, dtype=torch.float64)},  # named by forward
        {"tokens_of_the_text": ids},  # named by nothing, and nothing like input_ids
    ):
        task = infkit.Task.language_modeling(_EmbedsLM().double())
        with pytest.raises(InvalidInputError, match="could not be called") as caught:
            infkit.Influence(task, "identity", progress=False).fit((given, labels))
        assert "main_input_name" not in str(caught.value), given


def test_a_misspelt_key_that_forward_absorbs_is_named(lm_problem: dict) -> None:
    """`attention_masks` went into a Hugging Face model's **kwargs and was ignored: a padded
    set's padding read as tokens, the scores 9% off, without a word (a reviewer's Llama). It is
    named with the parameter meant; the correct key draws no such warning."""
    torch.manual_seed(0)
    task = infkit.Task.language_modeling(_KeywordLM().double())
    ids = lm_problem["ids"]
    mask = torch.ones_like(ids)
    mask[::2, -2:] = 0
    inputs, labels = lm.examples(ids, mask)
    misspelt = {"input_ids": inputs["input_ids"], "attention_masks": inputs["attention_mask"]}
    said = {}
    for name, given in (("misspelt", misspelt), ("right", inputs)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            infkit.Influence(task, "identity", progress=False).fit((given, labels))
        said[name] = [str(w.message) for w in caught if "**kwargs" in str(w.message)]
    assert said["right"] == []
    assert len(said["misspelt"]) == 1
    assert (
        "the training set's input key 'attention_masks' is not a parameter of "
        "_KeywordLM.forward, which takes it into its **kwargs and most likely ignores it: the "
        "model names 'attention_mask'" in said["misspelt"][0]
    )


def test_inputs_under_keys_that_are_not_strings_are_refused_by_name(lm_problem: dict) -> None:
    torch.manual_seed(0)
    task = infkit.Task.language_modeling(_KeywordLM().double())
    ids = lm_problem["ids"]
    _, labels = lm.examples(ids)
    with pytest.raises(InvalidInputError, match=r"could not be called .*\(input keys: 0\)"):
        infkit.Influence(task, "identity", progress=False).fit(({0: ids}, labels))


class _AlwaysDropout(nn.Module):
    """Dropout on in evaluation mode too: every call a new draw."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.dropout(x, 0.5, training=True))


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(2, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.a(a) + self.b(b)


def test_a_testers_data_and_models_that_gave_random_scores_or_raw_errors() -> None:
    """Functional dropout in evaluation mode gave scores 3.1 apart between two runs (largest
    0.63), or torch's vmap RuntimeError; an IterableDataset a TypeError; outputs [B, 4, 1] were
    called one output per example and [B, 2, 2] a label problem; ((a, b), y) was read as a
    list of two examples; a custom measurement given [N, 1] labels was told to use
    reduction='none'."""
    torch.manual_seed(0)
    X, X2 = torch.randn(20, 5, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    task = infkit.Task.classification(_AlwaysDropout().double())
    for checks in (True, False):
        with pytest.raises(InvalidInputError, match=r"differ between two calls.*random numbers"):
            infkit.Influence(task, "exact", l2=0.1, checks=checks).fit((X, y))

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return iter(zip(X, y))

    for given in (Stream(), torch.utils.data.DataLoader(Stream(), batch_size=4)):
        with pytest.raises(InvalidInputError, match=r"iterable-style dataset \(Stream\)"):
            ExampleSet(given)
    for shape in ((3, 1), (1, 3)):
        model = nn.Sequential(nn.Linear(5, 3), nn.Unflatten(1, shape)).double()
        with pytest.raises(InvalidInputError, match=re.escape(f"per-example shape {shape}; ")):
            infkit.Influence(infkit.Task.classification(model), "exact", l2=0.1).fit((X, y))
    for inputs in ((X, X2), [X, X2]):
        with pytest.raises(InvalidInputError, match=r"X is a (tuple|list) of 2 inputs.*dict"):
            ExampleSet((inputs, y))
    both = infkit.Task.classification(_TwoInputs().double())
    infkit.train_to_optimum(both, ({"a": X, "b": X2}, y), 0.1)
    assert infkit.Influence(both, "exact", l2=0.1).fit(({"a": X, "b": X2}, y)).n_params == 27

    def probability(outputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return torch.softmax(outputs, -1)[torch.arange(len(labels)), labels]

    custom = infkit.Task.classification(
        nn.Linear(5, 3).double(), measurement=probability, higher_is_better=True
    )
    inf = infkit.Influence(custom, "exact", l2=0.1).fit((X, y))
    with pytest.raises(
        InvalidInputError, match=r"labels as they are .*, 1\).*targets\.reshape\(-1\)"
    ):
        inf.scores((X[:4], y[:4, None]))


def test_a_dataset_that_reads_an_example_differently_each_time_is_refused() -> None:
    """Random augmentation in __getitem__: every pass over the data would see other examples
    (a tester's scores moved by 0.24 between two runs, without a word)."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=gen)

    class Augmented(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 20

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return X[i] + 0.1 * torch.randn(5, dtype=torch.float64), y[i]

    class Plain(Augmented):
        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return X[i], y[i]

    task = infkit.Task.classification(nn.Linear(5, 3).double())
    with pytest.raises(InvalidInputError, match="example 0 reads differently each time"):
        infkit.Influence(task, "exact", l2=0.1).fit(Augmented())
    plain = infkit.Influence(task, "exact", l2=0.1).fit(Plain()).scores((X[:3], y[:3]))
    pair = infkit.Influence(task, "exact", l2=0.1).fit((X, y)).scores((X[:3], y[:3]))
    torch.testing.assert_close(plain, pair)

    class Flipped(Augmented):
        """A flip half the time (a tester's, like a random horizontal flip): example 0 read
        once more let it through for two seeds in six, with scores 5-9x off."""

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            sign = -1.0 if torch.rand(()) < 0.5 else 1.0
            return X[i] * sign, y[i]

    for seed in range(12):
        torch.manual_seed(seed)
        with pytest.raises(InvalidInputError, match="reads differently each time"):
            infkit.Influence(task, "exact", l2=0.1).fit(Flipped())


# ------------------------------------------------ a tester of the Task: models and losses
def _regression_data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return (
        torch.randn(n, 4, generator=gen, dtype=torch.float64),
        torch.randn(n, generator=gen, dtype=torch.float64),
    )


def test_a_loss_that_mixes_the_examples_of_a_batch_is_refused_where_it_trains() -> None:
    """A tester's: ((outputs - targets) ** 2).mean(1) on outputs [B, 1] and targets [B]
    broadcasts to [B, B]; per example it is right, so scores were the per-example losses',
    while train_to_optimum and retraining (whole batches) optimised another objective and
    the fit blamed the optimisation. Refused by train_to_optimum and fit, naming the loss; a
    loss that fails on the labels (cross-entropy on float labels) raised PyTorch's own error."""
    X, y = _regression_data()
    model = nn.Linear(4, 1).double()

    def mixing(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((outputs - targets) ** 2).mean(1)

    def per_example(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return (outputs.reshape(-1) - targets) ** 2

    said = r"the task's loss of training set example 0 is .* in a batch beside example \d+ and "
    said += r".* beside a copy of itself"
    with pytest.raises(InvalidInputError, match=said):
        infkit.train_to_optimum(infkit.Task(model, mixing), (X, y), 1e-2)
    with pytest.raises(InvalidInputError, match=said):
        infkit.Influence(infkit.Task(model, mixing), "exact", l2=1e-2).fit((X, y))
    # a third reviewer's: targets near 1e-2 (losses of 3e-5) and a bfloat16 model passed, the
    # tolerance floored at a loss of 1, or taken at the model's precision, not the loss's
    for small in (nn.Linear(4, 1), nn.Linear(4, 1).to(torch.bfloat16)):
        with torch.no_grad():
            small.weight.mul_(1e-2)
        with pytest.raises(InvalidInputError, match=said):
            infkit.Influence(infkit.Task(small, mixing), "identity").fit(
                (X.float(), 1e-2 * y.float())
            )
    task = infkit.Task(model, per_example)
    infkit.train_to_optimum(task, (X, y), 1e-2)
    infkit.Influence(task, "exact", l2=1e-2).fit((X, y))
    # a reviewer's: a float32 model of outputs near 2e5 rounds its outputs alone and in a batch
    # 0.016 apart, which the residuals of 30 made a loss gap: the same outputs are compared
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 1))
    inputs = torch.randn(64, 256)
    with torch.no_grad():
        wide[2].weight.mul_(1e5)
        wide[2].bias.fill_(2e5)
        prices = wide(inputs).squeeze(1) + 30 * torch.randn(64).sign()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (far from an optimum: not the point)
        infkit.Influence(infkit.Task.regression(wide), "identity").fit((inputs, prices))
    # a fourth reviewer's: a float32 projection inside the loss rounds one row alone otherwise
    # than in a batch of two (MKL), near interpolation 4e-4 apart: example 0 beside a copy of
    # itself is compared, the same shapes; and a loss cast down to bfloat16 that mixes
    basis = torch.randn(1024, 16) / 4
    coded = nn.Linear(8, 16)
    codes = torch.randn(24, 8)
    with torch.no_grad():
        images = nn.functional.linear(coded(codes), basis) + 1e-5 * torch.randn(24, 1024)

    def reconstruction(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((nn.functional.linear(outputs, basis) - targets) ** 2).sum(1)

    def coarse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        low = outputs.to(torch.bfloat16) - targets.to(torch.bfloat16)
        return (low**2).mean(1).float()

    def by_size(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # (a sixth's)
        return (outputs.reshape(-1) - targets) ** 2 * 32 / outputs.shape[0]

    with pytest.raises(InvalidInputError, match=r"in a batch of three: the loss depends on the"):
        infkit.Influence(infkit.Task(nn.Linear(4, 1).double(), by_size), "identity").fit((X, y))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        infkit.Influence(infkit.Task(coded, reconstruction), "identity").fit((codes, images))
        with pytest.raises(InvalidInputError, match=said):
            infkit.Influence(infkit.Task(nn.Linear(4, 1), coarse), "identity").fit(
                (X.float(), 30 * y.float())
            )
    classes = (y > 0).double()  # float labels, which F.cross_entropy refuses

    def cross_entropy(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(outputs, targets, reduction="none")

    with pytest.raises(
        InvalidInputError,
        match=r"the task's loss failed on training set example 0: RuntimeError: expected "
        r"target dtype .*a tensor of torch\.float64, per example \(\)",
    ):
        infkit.Influence(infkit.Task(nn.Linear(4, 2).double(), cross_entropy), "exact").fit(
            (X, classes)
        )


def test_the_loss_check_gives_the_loss_its_targets_on_the_models_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reviewer's: the check handed the loss the data's targets, not those moved to the
    model's device as every other loss call has them; on a GPU every built-in loss would
    have mixed devices and every fit been refused. The move is marked here (no GPU needed):
    moved labels become int32, and a loss refuses others, as a device mismatch would."""
    from infkit.gradients import PerExample

    cast = PerExample._cast_state

    def marked(self: PerExample, t: torch.Tensor) -> torch.Tensor:
        out = cast(self, t)
        return out.int() if out.dtype == torch.int64 else out

    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.dtype != torch.int32:
            raise RuntimeError("Expected all tensors to be on the same device")
        return nn.functional.cross_entropy(outputs, targets.long(), reduction="none")

    monkeypatch.setattr(PerExample, "_cast_state", marked)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        infkit.Influence(infkit.Task(nn.Linear(4, 3).double(), loss), "identity").fit((X, y))


def test_a_forward_pass_that_updates_a_buffer_is_named() -> None:
    """A tester's: a forward pass adding to a counter buffer in evaluation mode met PyTorch's
    'mutate a captured Tensor' (identity ran, moving the user's buffer), and one rescaling by
    a running buffer was blamed on random numbers: each names what the forward pass does."""
    X, y = _regression_data()

    class Counting(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.out = nn.Linear(4, 1)
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls.add_(1)
            return self.out(x)

    class Rescaling(Counting):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.out(x) / (1 + self.calls)
            with torch.no_grad():
                self.calls.add_(0.1)
            return out

    for method in ("exact", "identity"):
        task = infkit.Task.regression(Counting().double())
        with pytest.raises(InvalidInputError, match=r"writes into a tensor of its own in place"):
            infkit.Influence(task, method, l2=1e-2).fit((X, y))
    task = infkit.Task.regression(Rescaling().double())
    with pytest.raises(InvalidInputError, match=r"updates its buffer\(s\) calls"):
        infkit.Influence(task, "exact", l2=1e-2).fit((X, y))


def test_outputs_the_default_picker_cannot_take_are_named_and_output_fn_is_taken() -> None:
    """A tester's: a model returning (aux_loss, logits) met an IndexError (the first item, a
    scalar, taken as the outputs), a dict of logits was advised out.<field>, which a dict
    has not, and the ready-made tasks took no output_fn; a binary classifier ending in a
    Sigmoid was scored on its probabilities as logits, 0.84 off, without a word; a custom
    Task took measurement='margin' and failed at scores()."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(20, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=gen)
    plain = nn.Linear(4, 3).double()

    class Auxiliary(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = plain

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.body(x)
            return logits.square().mean(), logits

    class Keyed(Auxiliary):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
            return {"logits": self.body(x)}

    class Scores(Auxiliary):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # type: ignore[override]
            return {"scores": self.body(x)}

    expected = infkit.Influence(infkit.Task.classification(plain), "exact", l2=1e-2).fit((X, y))
    with pytest.raises(InvalidInputError, match=r"first item, .* is a scalar \(items: \[0\] \(\)"):
        infkit.Influence(infkit.Task.classification(Auxiliary()), "exact", l2=1e-2).fit((X, y))
    with pytest.raises(InvalidInputError, match=r"a dict with keys 'scores': pass output_fn="):
        infkit.Influence(infkit.Task.classification(Scores()), "exact", l2=1e-2).fit((X, y))
    for task in (
        infkit.Task.classification(Auxiliary(), output_fn=lambda out: out[1]),
        infkit.Task.classification(Keyed()),
        infkit.Task.classification(Scores(), output_fn=lambda out: out["scores"]),
    ):
        got = infkit.Influence(task, "exact", l2=1e-2).fit((X, y))
        torch.testing.assert_close(got.scores((X[:3], y[:3])), expected.scores((X[:3], y[:3])))

    class HiddenFirst(Auxiliary):  # (a tester's: scored as a 3-class classifier, no word)
        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = self.body(x)
            return logits.tanh(), logits

    hidden = HiddenFirst()
    hidden.body = nn.Linear(4, 3)  # float32 (autocast lowers float32), plain left as it is
    task = infkit.Task.classification(hidden)
    copied = task.with_autocast(torch.bfloat16)  # (as each fit with dtype= makes, before use)
    with pytest.warns(Notice, match=r"returns a tuple of 2 items \(\[0\] \(20, 3\), \[1\]"):
        copied.call_model(task.model, X.float())
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)  # once a task, for its copies too
        task.call_model(task.model, X.float())
        copied.call_model(task.model, X.float())
    sigmoid = nn.Sequential(nn.Linear(4, 1), nn.Sequential(nn.Sigmoid())).double()
    with pytest.raises(InvalidInputError, match=r"ends in Sigmoid: .*needs the logit"):
        infkit.Task.binary_classification(sigmoid)

    class Classifier(nn.Sequential):  # (a reviewer's: forward returns the logit)
        def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return self[0](x)

        def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
            return self[1](self(x))

    infkit.Task.binary_classification(Classifier(nn.Linear(4, 1), nn.Sigmoid()).double())
    with pytest.raises(InvalidInputError, match=r"measurement must be a callable .* got 'margin'"):
        infkit.Task(
            plain, lambda o, t: nn.functional.cross_entropy(o, t, reduction="none"), "margin"
        )  # type: ignore[arg-type]
