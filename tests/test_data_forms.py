"""The forms in which a Hugging Face user holds data give the scores of the ``(X, y)`` pair.

A tokenizer returns a ``BatchEncoding`` (a mapping that is not a dict), a collated batch is a
dict of batched tensors holding its ``labels``, a ``datasets`` row holds lists of numbers, and a
``datasets.Dataset`` is indexable and sized without being a torch ``Dataset`` or a ``Sequence``.
Each is read as the pair it stands for; ``collections.UserDict`` (what ``BatchEncoding``
derives from) and a plain indexable class stand in for them here, so that the tests run
without transformers. The reference is the same examples given as an ``(inputs, labels)``
pair of tensors, and identity's scores, which these tests compare, are a closed form of the
examples' gradients (``tests/test_language_modeling.py`` checks them against autograd).
"""

from __future__ import annotations

import functools
import warnings
from collections import UserDict
from typing import Any

import numpy as np
import pytest
import torch
from lm_helpers import LENGTH, VOCAB, TinyLM
from torch.utils.data import DataLoader, default_collate

import infkit
from infkit import language_modeling as lm
from infkit.data import ExampleSet
from infkit.errors import ArtifactError, InvalidInputError, Notice

N = 6


class Rows:
    """A sized, indexable set of rows that is neither a torch Dataset nor a Sequence, as a
    Hugging Face ``datasets.Dataset`` is: ``rows[i]`` is a dict of lists of numbers."""

    def __init__(self, columns: dict[str, torch.Tensor]) -> None:
        self.columns = {key: value.tolist() for key, value in columns.items()}

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {key: values[i] for key, values in self.columns.items()}


class Columns(Rows):
    """Indexable by column name only, as a pandas DataFrame is."""

    def __getitem__(self, key: Any) -> Any:
        return self.columns[key]


class LabelIndexed(Rows):
    """Rows indexed by a label of their own, shuffled, with ``iloc`` for positions: a pandas
    Series of rows after ``sample()``, whose ``[i]`` is the row labelled i."""

    def __init__(self, columns: dict[str, torch.Tensor], labels: list[int]) -> None:
        super().__init__(columns)
        self.labels = labels
        self.iloc = self  # what marks a pandas object

    def __getitem__(self, label: int) -> dict[str, Any]:
        return super().__getitem__(self.labels.index(label))


@pytest.fixture(scope="module")
def problem() -> dict:
    torch.manual_seed(0)
    model = TinyLM().double().eval()
    ids = torch.randint(0, VOCAB, (N, LENGTH))
    mask = torch.ones_like(ids)
    mask[:2, -2:] = 0  # two sequences padded on the right
    inputs, labels = lm.examples(ids, mask)
    task = infkit.Task.language_modeling(model)
    queries = ({k: v[:3] for k, v in inputs.items()}, labels[:3])
    scores = infkit.Influence(task, "identity", progress=False).fit((inputs, labels))
    return {
        "task": task,
        "inputs": inputs,
        "labels": labels,
        "queries": queries,
        "scores": scores.scores(queries),
    }


def _forms(inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, Any]:
    """The examples ``(inputs, labels)`` in each form a Hugging Face user may hold them."""
    columns = {**inputs, "labels": labels}
    return {
        "a dict of batched tensors with its labels": dict(columns),
        "a BatchEncoding with its labels": UserDict(columns),
        "a pair (BatchEncoding, labels)": (UserDict(inputs), labels),
        "a BatchEncoding of lists": UserDict({k: v.tolist() for k, v in columns.items()}),
        "a list of BatchEncoding rows of lists": [
            UserDict({k: v[i].tolist() for k, v in columns.items()}) for i in range(len(labels))
        ],
        "a datasets-style set of rows": Rows(columns),
        "a DataLoader over it": DataLoader(Rows(columns), batch_size=4),
    }


@pytest.mark.parametrize("form", list(_forms({"x": torch.zeros(1)}, torch.zeros(1))))
def test_each_form_scores_as_the_tensor_pair(problem: dict, form: str) -> None:
    """Identity's scores of every training-set form, and of the queries in the same form, equal
    those of the tensor pair (1e-12 relative; the same examples, collated another way). Before,
    each of these forms was refused, and a row's lists were read position by position."""
    train = _forms(problem["inputs"], problem["labels"])[form]
    queries = _forms(*problem["queries"])[form]
    fitted = infkit.Influence(problem["task"], "identity", progress=False).fit(train)
    torch.testing.assert_close(
        fitted.scores(queries),
        problem["scores"],
        rtol=1e-12,
        atol=1e-12 * problem["scores"].abs().max(),
    )


def test_a_mapping_without_labels_says_how_to_give_them(problem: dict) -> None:
    """A tokenizer's output as it comes holds no labels: refused naming its keys and the two
    ways to give them, the language-modelling helper among them."""
    encoding = UserDict(problem["inputs"])
    with pytest.raises(
        InvalidInputError,
        match=r"training set is a UserDict of inputs \('input_ids', 'attention_mask'\) without "
        r"labels: give them with it, as a pair \(inputs, labels\) or under the key 'labels'.*"
        r"language_modeling.examples\(input_ids, attention_mask\)",
    ):
        infkit.Influence(problem["task"], "identity").fit(encoding)
    fitted = infkit.Influence(problem["task"], "identity", progress=False)
    fitted.fit((problem["inputs"], problem["labels"]))
    with pytest.raises(InvalidInputError, match="test set is a dict of inputs"):
        fitted.scores(dict(problem["inputs"]))


def test_a_set_indexed_by_column_is_refused_by_its_type(problem: dict) -> None:
    """A table indexed by column names (a DataFrame) is not taken for a set of rows: refused
    with the forms accepted, not a KeyError from its first item."""
    with pytest.raises(InvalidInputError, match=r"expected a pair .* got Columns"):
        infkit.Influence(problem["task"], "identity").fit(
            Columns({**problem["inputs"], "labels": problem["labels"]})
        )


def test_a_dataloaders_own_collate_fn_is_named_and_its_remedy_works(problem: dict) -> None:
    """A DataLoader is read through its dataset, so a collate_fn of its own is not used: one
    that makes the labels (here: the ids with the first two tokens masked, as a completion-only
    collator does) would have made other examples than infkit reads, so a warning names it. The
    remedy it gives, every example collated in one batch, scores the examples it makes."""
    columns = {**problem["inputs"], "labels": problem["labels"]}
    rows = [{k: v[i] for k, v in problem["inputs"].items()} for i in range(N)]

    def completion_only(batch: list[dict]) -> dict:
        collated = default_collate(batch)
        labels = torch.where(collated["attention_mask"] == 1, collated["input_ids"], -100)
        labels[:, :2] = -100
        return {**collated, "labels": labels}

    with (
        pytest.warns(
            UserWarning,
            match=r"training set: the DataLoader's collate_fn \(.*completion_only\) is not used",
        ),
        pytest.raises(InvalidInputError, match="has no labels"),
    ):
        infkit.Influence(problem["task"], "identity").fit(
            DataLoader(rows, collate_fn=completion_only)
        )
    masked = completion_only(rows)
    fitted = infkit.Influence(problem["task"], "identity", progress=False).fit(masked)
    expected = columns["labels"].clone()
    expected[:, :2] = -100
    reference = infkit.Influence(problem["task"], "identity", progress=False)
    reference.fit((problem["inputs"], expected))
    torch.testing.assert_close(
        fitted.scores(problem["queries"]), reference.scores(problem["queries"]), rtol=1e-12, atol=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a DataLoader collating as infkit does
        infkit.Influence(problem["task"], "identity", progress=False).fit(
            DataLoader(Rows(columns), batch_size=2)
        )


def test_texts_beside_a_pairs_inputs_are_refused_by_key(problem: dict) -> None:
    """A column of texts among a pair's inputs (a dataset's ``sentence`` beside its ids) was
    passed whole with every batch; it is refused naming its key, and a column of numbers is
    read as a tensor."""
    inputs = {**problem["inputs"], "sentence": ["some text"] * N}
    with pytest.raises(
        InvalidInputError, match="training set: input 'sentence' is a list of 6 str, not a tensor"
    ):
        infkit.Influence(problem["task"], "identity").fit((inputs, problem["labels"]))
    lists = {k: v.tolist() for k, v in problem["inputs"].items()}
    fitted = infkit.Influence(problem["task"], "identity", progress=False)
    scores = fitted.fit((lists, problem["labels"])).scores(problem["queries"])
    torch.testing.assert_close(scores, problem["scores"], rtol=1e-12, atol=0)


def test_rows_read_as_torchs_dataloader_reads_them() -> None:
    """Rows of Python numbers: floats as float64 and ints as int64, as default_collate makes
    them (float32 lost 1e-7 of a float64 model's precision); an (x, y) row's tuple x as the
    DataLoader gives it to the model (a list of tensors), not one tensor."""
    rows = [{"x": [0.1 * i, 1.0 / 3.0], "labels": i % 2} for i in range(4)]
    batch = ExampleSet(rows).take([0, 1, 2])
    assert batch.inputs["x"].dtype == torch.float64 and batch.targets.dtype == torch.int64
    torch.testing.assert_close(
        batch.inputs["x"][:, 1],
        torch.full((3,), 1.0 / 3.0, dtype=torch.float64),
        rtol=1e-15,
        atol=0,
    )
    pairs = [((0.5 * i, float(i)), i % 2) for i in range(4)]
    loader = next(iter(DataLoader(pairs, batch_size=3)))
    batch = ExampleSet(pairs).take([0, 1, 2])
    assert isinstance(batch.inputs, list) and len(batch.inputs) == len(loader[0]) == 2
    for ours, torchs in zip(batch.inputs, loader[0]):
        assert ours.dtype == torchs.dtype and torch.equal(ours, torchs)


def test_a_pairs_labels_may_be_a_list(problem: dict) -> None:
    """(tokenizer(texts), labels) with the labels a Python list scores as with a tensor."""
    labels = problem["labels"].tolist()
    fitted = infkit.Influence(problem["task"], "identity", progress=False)
    scores = fitted.fit((UserDict(problem["inputs"]), labels)).scores(problem["queries"])
    torch.testing.assert_close(scores, problem["scores"], rtol=1e-12, atol=0)


def _refusal(problem: dict, data: Any) -> str:
    with pytest.raises(InvalidInputError) as refused:
        infkit.Influence(problem["task"], "identity").fit(data)
    return str(refused.value)


def test_what_looks_like_data_but_is_not_says_what_it_looks_like(problem: dict) -> None:
    """Each refused with what it looks like and what to give: two tokenizer rows without
    labels (not a pair of X and y), token lists of several lengths, a dict of splits, one row,
    a row holding two label keys, rows indexed by label (pandas), a set whose item 0 raises."""
    inputs, labels = problem["inputs"], problem["labels"]
    rows = [UserDict({k: v[i] for k, v in inputs.items()}) for i in range(2)]
    assert "has no labels" in _refusal(problem, rows)
    ragged = {"input_ids": [[1, 2, 3], [4, 5]] + [[1, 2]] * (N - 2)}
    assert "holds sequences of several lengths: pad them" in _refusal(problem, (ragged, labels))
    splits = {"train": Rows({**inputs, "labels": labels}), "test": Rows(inputs)}
    assert "give one of them, data['train']" in _refusal(problem, splits)
    one = {"input_ids": inputs["input_ids"][0], "labels": 3}
    assert "is one example" in _refusal(problem, one)
    both = [
        {"input_ids": inputs["input_ids"][i], "labels": labels[i], "label": 1} for i in range(N)
    ]
    assert "training set example 0 holds labels under 'labels' and 'label'" in _refusal(
        problem, both
    )
    assert "training set (dict) holds labels under 'labels' and 'label'" in _refusal(
        problem, {**inputs, "labels": labels, "label": labels}
    )
    shuffled = LabelIndexed({**inputs, "labels": labels}, [5, 2, 1, 3, 0, 4])
    assert "a pandas object, whose [i] reads by label" in _refusal(problem, shuffled)

    class Broken(Rows):
        def __getitem__(self, i: int) -> dict[str, Any]:
            raise KeyError("'text' (a transform reading a missing column)")

    assert "reading its item 0 raised KeyError" in _refusal(problem, Broken(inputs))


def test_a_dataloaders_sampler_and_partial_collate_are_named(problem: dict) -> None:
    """A sampler drawing some examples is named (infkit reads all of them), and a partial's
    function; a shuffling loader is not warned about."""
    rows = Rows({**problem["inputs"], "labels": problem["labels"]})
    subset = DataLoader(rows, sampler=torch.utils.data.SubsetRandomSampler([0, 1, 2]))
    with pytest.warns(UserWarning, match=r"sampler \(SubsetRandomSampler\) draws \d+ of the"):
        infkit.Influence(problem["task"], "identity", progress=False).fit(subset)
    partial = DataLoader(rows, collate_fn=functools.partial(default_collate))
    with pytest.warns(UserWarning, match=r"collate_fn \(a partial of default_collate\)"):
        infkit.Influence(problem["task"], "identity", progress=False).fit(partial)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        infkit.Influence(problem["task"], "identity", progress=False).fit(
            DataLoader(rows, shuffle=True, batch_size=2)
        )
    # a tester's: a batch_sampler of one's own over some examples, and drop_last, went unsaid
    # (loader.sampler is then the default: the batch sampler holds the one it uses)
    n = len(rows)
    some = torch.utils.data.BatchSampler(
        torch.utils.data.SubsetRandomSampler(range(n - 1)), 2, drop_last=False
    )
    with pytest.warns(UserWarning, match=r"sampler \(SubsetRandomSampler\) draws \d+ of the"):
        infkit.Influence(problem["task"], "identity", progress=False).fit(
            DataLoader(rows, batch_sampler=some)
        )
    with pytest.warns(UserWarning, match=rf"batch_sampler \(list\) draws 3 of the {n} examples"):
        infkit.Influence(problem["task"], "identity", progress=False).fit(
            DataLoader(rows, batch_sampler=[[0, 1], [2]])
        )
    assert n > 2
    with pytest.warns(UserWarning, match=rf"drops its last 1 of {n} examples"):
        infkit.Influence(problem["task"], "identity", progress=False).fit(
            DataLoader(rows, batch_size=n - 1, drop_last=True)
        )
    # (a reviewer's: shuffled, drop_last drops another few each epoch, every example trained
    # on; a batch sampler of one's own over every example, length bucketing: nothing to say)
    buckets = [list(range(n))[::-1][k : k + 2] for k in range(0, n, 2)]

    class Shuffled(torch.utils.data.Sampler[list[int]]):  # draws from the global generator
        def __iter__(self) -> Any:
            return iter(torch.randperm(n).split(2))

        def __len__(self) -> int:
            return -(-n // 2)

    torch.manual_seed(5)
    expected = torch.rand(())
    torch.manual_seed(5)
    infkit.Influence(problem["task"], "identity", progress=False).fit(
        DataLoader(rows, batch_sampler=Shuffled())
    )
    assert torch.equal(torch.rand(()), expected)  # (a reviewer's: drawing moved it)

    class Seeded(Shuffled):  # its own generator (a third reviewer's: drawing moved it too)
        def __init__(self) -> None:
            self.generator = torch.Generator().manual_seed(0)

        def __iter__(self) -> Any:
            return iter(torch.randperm(n, generator=self.generator).split(2))

    # (a sixth reviewer's: a sampler of lists with batching off raised int()'s TypeError, and
    # one holding NumPy's legacy RandomState was moved)
    lists = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(rows), 2, False)
    with pytest.warns(UserWarning, match=r"sampler \(BatchSampler\) draws items that are not"):
        infkit.Influence(problem["task"], "identity", progress=False).fit(
            DataLoader(rows, sampler=lists, batch_size=None)
        )

    class Legacy(torch.utils.data.Sampler[int]):
        def __init__(self) -> None:
            self.state = np.random.RandomState(0)

        def __iter__(self) -> Any:
            return iter(self.state.permutation(n)[: n - 1].tolist())

        def __len__(self) -> int:
            return n - 1

    legacy = Legacy()
    expected_order = list(Legacy())
    with pytest.warns(UserWarning, match=r"sampler \(.*Legacy\) draws"):
        infkit.Influence(problem["task"], "identity", progress=False).fit(
            DataLoader(rows, sampler=legacy)
        )
    assert list(legacy) == expected_order
    first = [b.tolist() for b in Seeded()]
    seeded = Seeded()
    infkit.Influence(problem["task"], "identity", progress=False).fit(
        DataLoader(rows, batch_sampler=seeded)
    )
    assert [b.tolist() for b in seeded] == first
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for loader in (
            DataLoader(rows, batch_size=n - 1, shuffle=True, drop_last=True),
            DataLoader(rows, batch_sampler=buckets),
            DataLoader(rows, sampler=list(range(n))[::-1]),  # (one's own, every example once)
        ):
            infkit.Influence(problem["task"], "identity", progress=False).fit(loader)


def test_a_pair_of_python_lists_reads_as_the_pair_of_tensors() -> None:
    """(X.tolist(), y.tolist()) was read as a list of two examples and refused ("each item
    must be an (x, y) pair ... got list"): it scores as the tensors do. Two rows stay two
    examples, as before (an example is an (x, y) pair)."""
    import numpy as np

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(12, 3)), np.arange(12) % 2
    task = infkit.Task.classification(torch.nn.Linear(3, 2).double())
    infkit.train_to_optimum(task, (X, y), 1e-2)
    expected = infkit.Influence(task, "exact", l2=1e-2).fit((X, y)).scores((X[:2], y[:2]))
    for form in (tuple, list):
        listed = infkit.Influence(task, "exact", l2=1e-2).fit(form([X.tolist(), y.tolist()]))
        torch.testing.assert_close(listed.scores((X[:2], y[:2])), expected, rtol=1e-12, atol=0)
    two = ExampleSet([[X[0].tolist(), 0], [X[1].tolist(), 1]])
    assert len(two) == 2 and two.take([1]).targets.tolist() == [1]
    # two rows and their labels: read as two examples, the second's input a label, a raw
    # TypeError refused a tester's training set; the pair it is, as training data and queries
    pair = ExampleSet((X[:2].tolist(), y[:2].tolist()))
    assert len(pair) == 2 and pair.take([1]).targets.tolist() == [int(y[1])]
    two_rows = infkit.Influence(task, "exact", l2=1e-2).fit((X, y))
    torch.testing.assert_close(
        two_rows.scores((X[:2].tolist(), y[:2].tolist())), expected, rtol=1e-12, atol=0
    )


def test_arrays_of_strings_or_objects_are_refused_saying_how_to_give_numbers() -> None:
    """Labels as class names (a NumPy array of str, a list of them, a dataset's items) and a
    NumPy array of objects (a pandas frame of mixed columns) raised torch's TypeError ("can't
    convert np.ndarray of type numpy.str_"); each is refused naming the set and the part."""
    import numpy as np

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(12, 3)), np.arange(12) % 2
    task = infkit.Task.classification(torch.nn.Linear(3, 2).double())

    class Named(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 12

        def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
            return torch.tensor(X[i]), "ab"[y[i]]

    cases = {
        "training set: the labels are a NumPy array of <U1": (X, np.array(["a", "b"])[y]),
        "training set: the inputs are a NumPy array of object": (X.astype(object), y),
        # (features as strings were told to encode classes, a tester's)
        r"the inputs are a NumPy array of <U1 .* encode text features as numbers .*"
        r"OneHotEncoder": (np.array(["a", "b"])[(X > 0).astype(int)], y),
        r"training set: the inputs\['x'\] is a NumPy array of object": (
            {"x": X.astype(object)},
            y,
        ),
        "example 0: labels must be a tensor of class indices, got list of strings": (
            X,
            ["a", "b"] * 6,
        ),
    }
    for message, data in cases.items():
        with pytest.raises(InvalidInputError, match=message):
            infkit.Influence(task, "exact", l2=1e-2).fit(data)
    with pytest.raises(InvalidInputError, match="got list of strings; encode the classes"):
        infkit.Influence(task, "exact", l2=1e-2).fit(Named())
    # numbers in any NumPy dtype still read as before
    expected = infkit.Influence(task, "exact", l2=1e-2).fit((X, y)).scores((X[:2], y[:2]))
    as_int32 = infkit.Influence(task, "exact", l2=1e-2).fit((X, y.astype(np.int32)))
    torch.testing.assert_close(as_int32.scores((X[:2], y[:2])), expected, rtol=1e-12, atol=0)


def test_a_pair_of_lists_of_tensors_is_refused_saying_how_to_stack_them() -> None:
    """([x_0, ...], [y_0, ...]) read as a list of two examples: "each item must be an (x, y)
    pair ... got list" for what is an (x, y) pair (a tester's), with no word of stacking or,
    for sequences of several lengths, of padding."""
    rows = [torch.randint(0, 9, (5,)) for _ in range(4)]
    with pytest.raises(InvalidInputError, match=r"lists of 4 tensors each.*torch\.stack\(X\)"):
        ExampleSet((rows, list(rows)), name="training set")
    ragged = [torch.randint(0, 9, (k,)) for k in (3, 5, 4)]
    with pytest.raises(
        InvalidInputError, match=r"3 shapes.*padding=True.*language_modeling\.examples"
    ):
        ExampleSet([ragged, list(ragged)], name="training set")
    with pytest.raises(InvalidInputError, match=r"lists of 4 tensors.*torch\.tensor\(y\)"):
        ExampleSet((rows, [0, 1, 0, 1]), name="training set")  # the labels as numbers
    with pytest.raises(InvalidInputError, match=r"lists of 1 tensor each.*of 1 item each"):
        ExampleSet(([rows[0]], [rows[1]]), name="training set")  # (it said "1 tensors")
    triples = [tuple(rows[:3]), tuple(rows[1:])]  # two examples of three items each
    with pytest.raises(InvalidInputError, match="two examples of 3 items each"):
        ExampleSet(triples, name="training set")
    pairs = ExampleSet([(x, x) for x in rows])  # a list of (x, y) pairs: four examples
    assert len(pairs) == 4


def test_items_of_several_forms_and_a_len_beyond_the_items_name_the_item() -> None:
    """A tester's: a dataset whose item 50 is a dict among (x, y) pairs raised
    default_collate's TypeError, one whose __len__ counts 5 items more than it has a bare
    IndexError; each names the items. Queries given as (X, None) were told about dicts' label
    keys, and a float64 model asked for float32 passes was told of raising a float32 model's
    precision: each names its own case."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=gen)

    class Mixed(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 60

        def __getitem__(self, i: int) -> Any:
            return {"x": X[i], "labels": y[i]} if i == 50 else (X[i], y[i])

    class TooLong(Mixed):
        def __len__(self) -> int:
            return 65

        def __getitem__(self, i: int) -> Any:
            return X[i], y[i]

    task = infkit.Task.classification(torch.nn.Linear(4, 3).double())
    with pytest.raises(
        InvalidInputError,
        match=r"examples 0 and 50 have inputs of different forms \(a tensor or number against "
        r"a dict\)",
    ):
        infkit.Influence(task, "exact", l2=1e-2).fit(Mixed())
    with pytest.raises(
        InvalidInputError,
        match=r"reading example 6[04] raised IndexError: .*its __len__ gives 65: does it count "
        "more items",
    ):
        infkit.Influence(task, "exact", l2=1e-2).fit(TooLong())
    inf = infkit.Influence(task, "exact", l2=1e-2).fit((X, y))
    with pytest.raises(InvalidInputError, match=r"test set has no labels, which the task reads"):
        inf.scores((X[:3], None))
    with pytest.raises(
        InvalidInputError, match=r"to compute a float64 model in float32, give a float32 copy"
    ):
        infkit.Influence(task, "exact", l2=1e-2, dtype=torch.float32)


def test_data_on_the_meta_device_is_refused_naming_the_set_and_key() -> None:
    """Examples on PyTorch's meta device (shapes without values) raised PyTorch's own
    "Tensor.item() cannot be called on meta tensors" from the finiteness check: refused as an
    InfkitError naming the set and the key, pointing at plan's sizes."""
    torch.manual_seed(0)
    X, y = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 2, (12,))
    task = infkit.Task.classification(torch.nn.Linear(3, 2).double())
    infkit.train_to_optimum(task, (X, y), 0.1)
    inf = infkit.Influence(task, method="exact", l2=0.1).fit((X, y))
    meta = (X[:2].to("meta"), y[:2].to("meta"))
    with pytest.raises(
        InvalidInputError, match=r"test set example 0 has a tensor on PyTorch's meta"
    ):
        inf.scores(meta)
    with pytest.raises(InvalidInputError, match=r"meta device.*plan\(n_train="):
        infkit.Influence(task, method="exact", l2=0.1).fit(meta)
    tokens = {"input_ids": torch.zeros(2, 4, dtype=torch.long)}
    tokens["attention_mask"] = torch.ones(2, 4, device="meta")
    with pytest.raises(InvalidInputError, match=r"in its 'attention_mask'"):
        ExampleSet((tokens, torch.zeros(2, dtype=torch.long)), name="queries").check_finite()


def _wine() -> tuple[torch.Tensor, torch.Tensor, infkit.Task]:
    from sklearn.datasets import load_wine

    X, y = load_wine(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0))[:100]
    torch.manual_seed(0)
    return X, torch.tensor(y)[:100], infkit.Task.classification(torch.nn.Linear(13, 3).double())


def test_loaders_drawing_by_weight_or_with_replacement_and_query_loaders_are_told_apart() -> None:
    """A tester's: a WeightedRandomSampler (oversampling) was told to give a Subset, with a
    count drawn anew at every call; a sampler with replacement the same, though it trains the
    plain mean in expectation; a test set's loader dropping its last batch was told of queries
    "never trained on". Each is told what fits it."""
    X, y, task = _wine()
    data = torch.utils.data.TensorDataset(X, y)
    inf = infkit.Influence(task, "identity", progress=False)
    weighted = torch.utils.data.WeightedRandomSampler(torch.rand(100, dtype=torch.float64), 100)
    with pytest.warns(UserWarning, match=r"draws examples by weight.*weight the loss by it"):
        inf.fit(DataLoader(data, sampler=weighted))
    with pytest.warns(Notice, match="draws with replacement.*in expectation"):
        inf.fit(DataLoader(data, sampler=torch.utils.data.RandomSampler(data, replacement=True)))
    inf.fit(data)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inf.scores(DataLoader(data, batch_size=30, drop_last=True))
    said = [str(w.message) for w in caught if "drops its last" in str(w.message)]
    assert len(said) == 1 and "To score the others" in said[0], said
    assert "never trained on" not in said[0]


def test_the_forms_of_several_inputs_and_of_class_names_say_what_to_give() -> None:
    """A tester's model of two inputs: a Dataset of ((a, b), y) items met the model's "missing 1
    required positional argument", TensorDataset(A, B, y) "got tuple"; class names in a
    Python list read as two examples, "got list". Each says what to give."""
    X, y, task = _wine()

    class Two(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(5, 3), torch.nn.Linear(8, 3, bias=False)

        def forward(self, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
            return self.a(xa) + self.b(xb)

    two = infkit.Task.classification(Two().double())
    A, B = X[:, :5], X[:, 5:]
    items = [((A[i], B[i]), y[i]) for i in range(len(y))]
    with pytest.raises(InvalidInputError, match=r"inputs are a \w+ of 2, .*give a dict of them"):
        infkit.Influence(two, "exact", l2=1e-2).fit(items)
    stacked = torch.utils.data.TensorDataset(A, B, y)
    with pytest.raises(InvalidInputError, match=r"got a tuple of 3\. For a model of several"):
        infkit.Influence(two, "exact", l2=1e-2).fit(stacked)
    names = [["barolo", "grignolino", "barbera"][int(c)] for c in y]
    with pytest.raises(InvalidInputError, match=r"the labels are .*encode the classes"):
        infkit.Influence(task, "exact", l2=1e-2).fit((X.tolist(), names))


def test_a_subsets_example_is_named_by_its_number_in_the_dataset_too() -> None:
    """The README says an example of a subset is named by its number in the data it was taken
    from and its position in the subset; a torch Subset's was named by its position alone
    (a tester's bad label at index 40 of the dataset was "example 10")."""
    X, y, task = _wine()
    bad = y.clone()
    bad[40] = 5
    inner = torch.utils.data.Subset(torch.utils.data.TensorDataset(X, bad), range(20, 100))
    subset = torch.utils.data.Subset(inner, list(range(10, 80)))
    with pytest.raises(InvalidInputError, match=r"example 40 \(position 10 of the subset given\)"):
        infkit.Influence(task, "exact", l2=1e-2).fit(subset)


def test_a_load_given_labels_of_another_dtype_says_so(tmp_path) -> None:
    """A tester's int32 labels (which fit takes as the int64 ones) given to load were refused as
    "other content or order": the message now names the dtype and shape that differ."""
    X, y, task = _wine()
    infkit.Influence(task, "exact", l2=1e-2).fit((X, y)).save(tmp_path / "saved")
    for labels, said in (
        (y.int(), r"labels int32 \[100\] given, int64 \[100\] saved"),
        (y[:, None], r"labels int64 \[100, 1\] given, int64 \[100\] saved"),
    ):
        with pytest.raises(ArtifactError, match=rf"the same values in other dtypes.*{said}"):
            infkit.Influence.load(tmp_path / "saved", task, train=(X, labels))


def test_a_recipe_given_a_loader_of_another_batch_size_says_whose_batches_it_trains_by() -> None:
    """A tester's loader of 16 given to a full-batch recipe trained full-batch, without a word
    (for attribution a loader's batching changes nothing; for training it is the run)."""
    X, y, task = _wine()
    loader = DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=16, shuffle=True)
    with pytest.warns(UserWarning, match=r"recipe's batches \(full batch\).*batch_size=16"):
        infkit.Recipe(steps=2, lr=0.1).train(task, loader)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        infkit.Recipe(steps=2, lr=0.1, batch_size=16).train(task, loader)
