"""Training and test inputs as index-aware batches.

Accepted forms (indices always refer to positions in the given data):

* a pair of tensors ``(X, y)`` with a shared first dimension;
* a ``torch.utils.data.Dataset`` whose items are ``(x, y)`` pairs;
* a ``Dataset`` (or list) of dicts, Hugging Face style: the ``labels`` key holds the target and
  the other keys are passed to the model as keyword arguments;
* a dict of batched inputs holding the labels under a label key (a collated batch, or a
  tokenizer's ``BatchEncoding`` with ``labels`` added): the ``(X, y)`` pair of its other keys and
  its labels.

and the other forms of :mod:`infkit.data_forms` (a tokenizer's output, a ``datasets.Dataset``,
rows of lists of numbers), read as these.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset, default_collate

from infkit import content
from infkit.data_forms import (
    LABEL_KEYS,
    LM_EXAMPLES,
    is_array,
    is_map_style,
    is_ragged,
    is_tokenizer_pair,
    label_key,
    mapping_pair,
    not_a_set,
    numbers_as_tensor,
    plain_mapping,
    unbatched_input,
    warn_unused_loader_parts,
)
from infkit.errors import InfkitError, InvalidInputError, NonFiniteError

#: the position a check gives for a problem of a whole batch, not of one of its examples
WHOLE_BATCH = -1


@dataclass
class Batch:
    """A batch of examples: ``inputs`` (a tensor or a dict of tensors) and ``targets``.

    ``indices`` are the examples' positions in their set, and ``source`` is the set's name
    (``"training set"``, ``"test set"``), for messages that name an example; ``numbers`` and
    ``given_at`` are their numbers in the user's data and their positions in the set the
    user gave (:attr:`ExampleSet.numbers`, :attr:`ExampleSet.given_at`; None: ``indices``).
    """

    indices: Tensor
    inputs: Any
    targets: Any
    source: str = "data"
    numbers: Tensor | None = None
    given_at: Tensor | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def number(self, k: int) -> int:
        """The number by which messages name the batch's ``k``-th example."""
        return int((self.indices if self.numbers is None else self.numbers)[k])

    def example(self, k: int) -> str:
        """The batch's ``k``-th example as messages name it (:func:`example_name`): its
        position is in the set the user gave (:attr:`ExampleSet.given_at`); ``k`` =
        :data:`WHOLE_BATCH` names the batch's examples as a range (a problem of the batch's
        tensors as a whole, such as a mask of another shape than its token ids)."""
        if k == WHOLE_BATCH:
            numbers = [self.number(i) for i in range(len(self))]
            first, last = numbers[0], numbers[-1]
            if len(numbers) == 1:
                return f"example {first}"
            if numbers == list(range(first, last + 1)):
                return f"examples {first}-{last}"
            return f"its {len(numbers)} examples ({first}, ..., {last})"
        at = self.indices if self.given_at is None else self.given_at
        return example_name(self.number(k), int(at[k]))

    def rows(self, rows: Sequence[int]) -> Batch:
        """The batch of its examples at positions ``rows``, in that order."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        pick = lambda t: t[idx]  # noqa: E731
        return Batch(
            self.indices[idx],
            _map_tensors(self.inputs, pick),
            _map_tensors(self.targets, pick),
            self.source,
            None if self.numbers is None else self.numbers[idx],
            None if self.given_at is None else self.given_at[idx],
        )


def _map_tensors(obj: Any, fn) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


def leaves(obj: Any) -> list[Tensor]:
    """The tensors of a nested structure of dicts, lists and tuples, in order."""
    if isinstance(obj, Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in leaves(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in leaves(v)]
    return []


def map_tensors(obj: Any, fn) -> Any:
    """Apply ``fn`` to every tensor in a nested structure of dicts, lists and tuples."""
    return _map_tensors(obj, fn)


def arrays_as_tensors(obj: Any, what: str) -> Any:
    """numpy arrays (also inside dicts) as tensors; everything else unchanged. An array of
    strings or Python objects (``what`` names it) is refused, saying how to give numbers."""
    if is_array(obj):
        if obj.dtype.kind in "USO":  # str, bytes, object: no tensor of them
            if obj.dtype.kind not in "US":
                hint = (
                    "convert it to numbers, e.g. np.asarray(values, dtype=np.float64) (a "
                    "pandas frame of mixed columns gives objects: encode its text columns first)"
                )
            elif "labels" in what:
                hint = (
                    "encode the classes as integers 0..C-1, e.g. classes, y = np.unique(y, "
                    "return_inverse=True) (in infkit run, [data] class_names shows them by name)"
                )
            else:  # (strings as features: a tester's were told to encode classes)
                hint = (
                    "encode text features as numbers the model reads, e.g. categories by "
                    "sklearn.preprocessing.OneHotEncoder or OrdinalEncoder, text by a tokenizer "
                    "into integer ids"
                )
            verb = "are" if what.endswith("s") else "is"  # ("the labels are": a tester's)
            raise InvalidInputError(
                f"{what} {verb} a NumPy array of {obj.dtype} ({obj.dtype.kind!r} kind), and "
                f"infkit reads numbers: {hint}"
            )
        if any(stride < 0 for stride in obj.strides):  # a reversed view (X[::-1], np.flip)
            obj = obj.copy()  # (C order: torch takes no negative stride)
        try:
            return torch.as_tensor(obj)
        except TypeError as error:  # a dtype torch has not: float128 (longdouble), ...
            raise InvalidInputError(
                f"{what} is a NumPy array of {obj.dtype}, which PyTorch does not take: convert "
                "it, e.g. X.astype(np.float64)"
            ) from error
    if isinstance(obj, dict):
        return {k: arrays_as_tensors(v, f"{what}[{k!r}]") for k, v in obj.items()}
    return obj


def _columns_as_tensors(inputs: Any, n: int) -> Any:
    """The lists of ``n`` numbers (or of rows of numbers) among a dict of a pair's inputs, a
    row per example, as tensors; other values (constants) unchanged."""
    if not isinstance(inputs, dict):
        return inputs
    return {
        key: numbers_as_tensor(value)
        if isinstance(value, (list, tuple)) and len(value) == n
        else value
        for key, value in inputs.items()
    }


def _is_pair(data: Any) -> bool:
    """Whether ``data`` is an (X, y) pair of batched tensors rather than a list of examples.

    A dict holding a label key is one example (a list of two such dicts is two examples), while
    a dict of input tensors without labels is the X of an (X, y) pair. numpy arrays count as
    tensors.
    """
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    first = data[0]
    if isinstance(first, Tensor) or is_array(first):
        return True
    return isinstance(first, dict) and not any(key in first for key in LABEL_KEYS)


def _two_lists(data: Any) -> tuple[Sequence[Any], Sequence[Any]] | None:
    """``(X, y)`` when ``data`` is two Python lists (or tuples) of one length, not 0; else
    None. With 2 the data reads as two examples, an example being an (x, y) pair, unless
    their inputs ``X[0]`` and ``y[0]`` would be of two shapes (a row and a label: two rows and
    their labels, which a tester's training set of two was, refused by a TypeError)."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return None
    inputs, labels = data
    if not (isinstance(inputs, (list, tuple)) and isinstance(labels, (list, tuple))):
        return None
    if len(inputs) != len(labels) or not inputs:
        return None
    if len(inputs) == 2:
        first_input, second_input = (_number_shape(part[0]) for part in (inputs, labels))
        if first_input is None or second_input is None or first_input == second_input:
            return None
    return inputs, labels


def _number_shape(value: Any) -> tuple[int, ...] | None:
    """The shape of a Python number (``()``), a rectangular list of them or a tensor, else
    None."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return ()
    tensor = numbers_as_tensor(value)
    return tuple(tensor.shape) if isinstance(tensor, Tensor) else None


def _is_list_pair(data: Any) -> bool:
    """Whether ``data`` is ``(X, y)`` as Python lists (:func:`_two_lists`), X rows of numbers
    and y numbers."""
    pair = _two_lists(data)
    return pair is not None and all(isinstance(numbers_as_tensor(part), Tensor) for part in pair)


def _is_text_labelled_pair(data: Any) -> bool:
    """Whether ``data`` is ``(X, y)`` as Python lists (:func:`_two_lists`) whose labels are
    strings (class names), which a tester's pair was: read as two examples, "got list"."""
    pair = _two_lists(data) or (
        (data[0], data[1])
        if isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[1], (list, tuple))
        and hasattr(data[0], "__len__")
        and len(data[0]) == len(data[1]) > 0
        else None
    )
    return pair is not None and all(isinstance(label, str) for label in pair[1])


def _is_tensor_lists_pair(data: Any) -> bool:
    """Whether ``data`` is ``([x_0, x_1, ...], [y_0, y_1, ...])`` (:func:`_two_lists`) of tensor
    inputs and of tensor or number labels, which no form reads. (Two examples of that many
    items each look the same.)"""
    pair = _two_lists(data)
    if pair is None or not all(isinstance(t, Tensor) for t in pair[0]):
        return False
    labels = pair[1]
    return all(isinstance(t, Tensor) for t in labels) or isinstance(
        numbers_as_tensor(list(labels)), Tensor
    )


def _is_inputs_tuple_pair(data: Any) -> bool:
    """Whether ``data`` is ``((A, B, ...), y)``: an (X, y) pair whose X is a tuple or list of
    batched tensors with y's example count (a model of several positional inputs), which
    would otherwise read as a list of two examples."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        return False
    inputs, labels = data
    if not (isinstance(inputs, (tuple, list)) and len(inputs) >= 1):
        return False
    if not all(isinstance(x, Tensor) or is_array(x) for x in inputs):
        return False
    if not (isinstance(labels, Tensor) or is_array(labels)) or len(labels.shape) == 0:
        return False
    if len(inputs) == labels.shape[0]:  # as many as the examples: maybe one row each
        return False
    return all(len(x.shape) > 0 and x.shape[0] == labels.shape[0] for x in inputs)


def _item_form(value: Any) -> str:
    """The structure of an item's inputs or labels, in words: ``"a tensor or number"`` (they
    collate alike), ``"a list of numbers"``, ``"a dict"``, ``"a tuple of 2"``, else the type's
    name."""
    if isinstance(value, (Tensor, int, float)) or is_array(value):
        return "a tensor or number"
    if isinstance(value, Mapping):
        return "a dict"
    if isinstance(value, (tuple, list)):
        if is_ragged(value) or isinstance(numbers_as_tensor(value), Tensor):
            return "a list of numbers"  # (of several lengths: a shape, named after collation)
        return f"a {type(value).__name__} of {len(value)}"
    return f"a {type(value).__name__}"


def _keyed_leaves(obj: Any) -> list[Tensor]:
    """The tensors of a nested structure, a dict's in the order of its keys."""
    if isinstance(obj, Mapping):
        return [t for key in sorted(obj, key=str) for t in _keyed_leaves(obj[key])]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in _keyed_leaves(item)]
    return [obj] if isinstance(obj, Tensor) else []


def _unreadable(t: Tensor) -> bool:
    """Whether a batch's tensor has no values to note: on the meta device (refused by name
    where it is read), or a torch.func transform's (the data weights a training run's
    metagradients differentiate)."""
    return t.is_meta or torch._C._functorch.is_functorch_wrapped_tensor(t)


def _numbers_in_dataset(data: Any) -> Tensor | None:
    """The numbers of a torch ``Subset``'s examples in the dataset it was taken from (through
    Subsets of Subsets, to the first that is none); None for any other set, or indices that
    are not whole numbers in range."""
    if not isinstance(data, Subset):
        return None
    try:
        numbers = torch.as_tensor(list(data.indices), dtype=torch.long).reshape(-1)
        inner = _numbers_in_dataset(data.dataset)
        if inner is not None:
            numbers = inner[numbers]
    except (TypeError, ValueError, IndexError, RuntimeError):
        return None
    return numbers if len(numbers) == len(data) else None


def example_name(number: int, position: int) -> str:
    """``"example 25"``, and where the example's number in the user's data differs from its
    position in the set at hand (a subset), that position too, which is what indices into
    the set's results (score columns, ``remove``) take."""
    if number == position:
        return f"example {number}"
    return f"example {number} (position {position} of the subset given)"


#: the name of an :class:`ExampleSet` made without one (messages say "data example k")
DEFAULT_NAME = "data"


def _is_ragged_pair(data: Any) -> bool:
    """Whether ``data`` is an ``(X, y)`` pair of Python lists whose rows of X are lists of
    numbers of several lengths."""
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and is_ragged(data[0])):
        return False
    labels = data[1]
    # (labels as a list, a tensor or an array: one per row)
    return (
        hasattr(labels, "__len__")
        and not isinstance(labels, (str, bytes))
        and len(labels) == len(data[0])
    )


class ExampleSet:
    """A finite, indexable collection of (inputs, targets) examples."""

    def __init__(self, data: Any, *, name: str = DEFAULT_NAME) -> None:
        self.name = name
        #: each example's number in the data the user gave, when this set was taken from it
        #: (:meth:`subset`, :meth:`part`), by which messages name it; None: its position here
        self.numbers: Tensor | None = None
        #: each example's position in the set the user passed, when infkit split that set
        #: (:meth:`part`: groups of queries); None: its position here
        self.given_at: Tensor | None = None
        #: whether the examples were checked (check_examples): a set is checked once
        self._checked = False
        self._tensors: tuple[Any, Any] | None = None
        self._dataset: Any = None
        #: what each example's first read noted of its content (:mod:`infkit.content`), which
        #: every later read is checked against: whether noted, the notes, how many tensors
        #: (NumPy arrays: a read inside a torch.func transform, a training run's replay, may
        #: not write into a tensor it did not make)
        self._noted: np.ndarray | None = None
        self._exact: np.ndarray = np.empty(0, np.int64)
        self._rough: np.ndarray | None = None
        self._width = 0
        iterable = data.dataset if isinstance(data, DataLoader) else data
        if isinstance(iterable, IterableDataset):
            raise InvalidInputError(
                f"{name} is an iterable-style dataset ({type(iterable).__name__}), which can only be read in its own order and has no length: infkit reads "
                "examples by position (scores[:, j] is example j) and more than once. Collect "
                "its examples into a map-style Dataset, a list of (x, y) pairs or an (X, y) pair "
                "of tensors"
            )
        if isinstance(data, DataLoader):
            warn_unused_loader_parts(data, name)
            data = data.dataset  # its examples, in order (its batching and shuffling do not apply)
        if isinstance(data, Mapping):
            data = mapping_pair(data, name)  # a collated batch, a BatchEncoding with its labels
        elif is_tokenizer_pair(data):
            data = (plain_mapping(data[0]), data[1])  # (tokenizer(texts), labels)
        if isinstance(data, ExampleSet):
            self._tensors, self._dataset = data._tensors, data._dataset
            # a set given without a name of its own takes the role it is given for
            self.name = name if data.name == DEFAULT_NAME else data.name
            self.numbers = data.numbers
            self.given_at = data.given_at
            self._checked = data._checked  # the same examples
        elif _is_pair(data):
            self._tensors = self._pair(data[0], data[1])
        elif _is_text_labelled_pair(data):  # (rows, ["barolo", ...]): a list of class names
            arrays_as_tensors(np.asarray(data[1]), f"{name}: the labels")  # (says how to encode)
        elif _is_list_pair(data):  # (X.tolist(), y.tolist())
            self._tensors = self._pair(numbers_as_tensor(data[0]), data[1])
        elif _is_tensor_lists_pair(data):
            shapes = {tuple(t.shape) for t in data[0]}
            remedy = (
                "stack each: (torch.stack(X), torch.stack(y)), or torch.tensor(y) for numbers"
                if len(shapes) == 1
                else f"the inputs have {len(shapes)} shapes: pad them to one shape and stack (for "
                "token ids of texts, tokenizer(texts, padding=True, return_tensors='pt'), then "
                f"{LM_EXAMPLES} labels them)"
            )
            count = len(data[0])
            tensors, items = ("tensor", "item") if count == 1 else ("tensors", "items")
            raise InvalidInputError(
                f"{name} looks like an (X, y) pair of Python lists of {count} {tensors} "
                f"each, which infkit does not read as examples: {remedy}; or give a list of "
                f"(x, y) pairs (were these two examples of {count} {items} each: an "
                "example is an (x, y) pair)"
            )
        elif _is_inputs_tuple_pair(data):
            kinds = ", ".join(type(x).__name__ for x in data[0])
            raise InvalidInputError(
                f"{name} looks like an (X, y) pair whose X is a {type(data[0]).__name__} of "
                f"{len(data[0])} inputs ({kinds}): X goes to the model as one argument, a tensor "
                "or a dict of tensors (called as model(**X)). Give a model of several inputs a "
                "dict, e.g. ({'a': A, 'b': B}, y) for forward(self, a, b), or a Dataset whose "
                "items are pairs ({'a': a, 'b': b}, y)"
            )
        elif isinstance(data, Tensor) or is_array(data):
            raise InvalidInputError(
                f"{name} is a single {type(data).__name__} of shape {tuple(data.shape)}: give "
                "the inputs together with their labels, as a pair (X, y); for a language model, "
                f"{LM_EXAMPLES} builds the pair from the token ids"
            )
        elif _is_ragged_pair(data):
            lengths = [len(row) for row in data[0]]
            odd = next(k for k, length in enumerate(lengths) if length != lengths[0])
            raise InvalidInputError(
                f"{name} looks like an (X, y) pair of Python lists whose rows of X differ in "
                f"length: row 0 has {lengths[0]} numbers, row {odd} has {lengths[odd]}. Every "
                "example's input needs one shape: fix that row, or pad the rows to one length "
                "(token ids of texts: tokenizer(texts, padding=True))"
            )
        elif isinstance(data, (Dataset, Sequence)) and hasattr(data, "__getitem__"):
            self._dataset = data
            # a torch Subset's examples are named by their numbers in the dataset it was taken
            # from too (a tester's bad label at index 40 was "example 10" alone)
            self.numbers = _numbers_in_dataset(data)
        elif is_map_style(data):
            self._dataset = data  # a Hugging Face datasets.Dataset, or any sized, indexable set
        else:
            raise not_a_set(data, name)
        if len(self) == 0:
            raise InvalidInputError(f"{name} is empty: at least one example is needed")

    def __len__(self) -> int:
        if self._tensors is not None:
            return leaves(self._tensors[0])[0].shape[0]
        return len(self._dataset)

    def _pair(self, inputs: Any, labels: Any) -> tuple[Any, Any]:
        """An ``(X, y)`` pair's tensors: numpy arrays as tensors, and lists with a row per
        example (a list of labels, a dict's column of token ids) too; refused when a tensor
        has no example dimension, when the first dimensions differ, or when an input is a list
        that cannot be batched (texts)."""
        x = arrays_as_tensors(inputs, f"{self.name}: the inputs")
        y = arrays_as_tensors(numbers_as_tensor(labels), f"{self.name}: the labels")
        sparse = [t for t in leaves(x) + leaves(y) if t.layout != torch.strided]
        if sparse:
            raise InvalidInputError(
                f"{self.name}: a tensor of the (X, y) pair is {sparse[0].layout} (sparse), which "
                "infkit does not index by example: give it dense (X.to_dense())"
            )
        if any(t.dim() == 0 for t in leaves(x) + leaves(y)):
            raise InvalidInputError(
                f"{self.name}: the tensors of an (X, y) pair need a first (example) dimension; "
                "for a list of examples, give each as a dict with a 'labels' key or an "
                "(x, y) tuple"
            )
        sizes = {t.shape[0] for t in leaves(x) + leaves(y)}
        if len(sizes) > 1:
            raise InvalidInputError(
                f"{self.name}: the tensors of an (X, y) pair must share their first dimension, "
                f"got sizes {sorted(sizes)}"
            )
        if not sizes:
            lists = [v for v in (x.values() if isinstance(x, dict) else []) if isinstance(v, list)]
            reason = unbatched_input(x, len(lists[0])) if lists else None  # ragged token lists
            raise InvalidInputError(
                f"{self.name}: {reason or 'an (X, y) pair must contain tensors'}"
            )
        n = sizes.pop()
        x = _columns_as_tensors(x, n)
        reason = unbatched_input(x, n)
        if reason is not None:
            raise InvalidInputError(f"{self.name}: {reason}")
        return x, y

    def _item_pair(self, item: Any, i: int) -> tuple[Any, Any]:
        """Item ``i`` of a dataset as ``(inputs, labels)``: a dict's label key holds its labels
        (None without one), and its lists of numbers are tensors (a Hugging Face dataset's row;
        default_collate would read a batch of token lists position by position); an ``(x, y)``
        pair as it is, a mapping x as a dict, as torch's DataLoader reads them."""
        if isinstance(item, Mapping):
            row = plain_mapping(item)
            key = label_key(row, lambda: f"{self.name} {self.example(i)}")
            if key is None:
                return row, None
            return {k: v for k, v in row.items() if k != key}, row[key]
        if isinstance(item, (tuple, list)) and len(item) == 2:
            x = plain_mapping(item[0]) if isinstance(item[0], Mapping) else item[0]
            return x, item[1]
        got = type(item).__name__
        several = ""
        if isinstance(item, (tuple, list)):
            got = f"a {got} of {len(item)}"
            if len(item) > 2:  # (TensorDataset(A, B, y): a tester's model of two inputs)
                several = (
                    ". For a model of several inputs (forward(self, a, b)) make each item a pair "
                    "of a dict of them and the label, ({'a': a, 'b': b}, y), or give the pair "
                    "({'a': A, 'b': B}, y) of the whole set"
                )
        raise InvalidInputError(
            f"{self.name}: each item must be an (x, y) pair or a dict with a 'labels' key; "
            f"got {got}{several}"
        )

    def take(self, indices: Tensor | Sequence[int], *, checked: bool = True) -> Batch:
        """The examples at ``indices``, collated into one batch; each checked against what its
        first read noted of it (:meth:`_check_content`; ``checked=False``: neither checked nor
        noted, for a check of its own that reads again)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if self._tensors is not None:
            x, y = self._tensors
            batch = Batch(
                idx,
                _map_tensors(x, lambda t: t[idx]),
                _map_tensors(y, lambda t: t[idx]),
                self.name,
                *self._numbers_of(idx),
            )
        else:
            pairs = [self._item_pair(self._read(int(i)), int(i)) for i in idx]
            inputs = self._collate([p[0] for p in pairs], idx, "inputs")
            targets = (
                None if pairs[0][1] is None else self._collate([p[1] for p in pairs], idx, "labels")
            )
            batch = Batch(idx, inputs, targets, self.name, *self._numbers_of(idx))
        if checked:
            self._check_content(batch)
        return batch

    def _check_content(self, batch: Batch) -> None:
        """Note the content of the batch's examples read for the first time, and refuse one
        that reads otherwise than its first read (:mod:`infkit.content`): the data changed
        while this set was in use (after fit, a tester's reordered rows scored 87% off, and a
        workdir kept those scores for the restored data)."""
        # (a dict's tensors by key: default_collate orders a batch's dict by its first item's
        # keys, and items of another key order read alike otherwise: a reviewer's)
        tensors = _keyed_leaves(batch.inputs) + _keyed_leaves(batch.targets)
        if not tensors or not len(batch) or any(_unreadable(t) for t in tensors):
            return
        exactly = self._tensors is not None
        exact, rough = content.notes(tensors, exactly)
        if self._noted is None:
            n = len(self)
            self._noted = np.zeros(n, dtype=bool)
            self._exact = np.zeros(n, np.int64)
            self._rough = None if rough is None else np.zeros((n, *rough.shape[1:]), np.float64)
            self._width = len(tensors)
        idx = batch.indices.cpu().numpy()
        if (
            len(tensors) != self._width
            or (rough is None) != (self._rough is None)
            or (
                rough is not None
                and self._rough is not None
                and rough.shape[1:] != self._rough.shape[1:]
            )
        ):
            raise self._changed(batch, 0)
        seen = self._noted[idx]
        if seen.any():
            rows = seen.nonzero()[0]
            kept = None if self._rough is None else torch.from_numpy(self._rough[idx[rows]])
            first = (torch.from_numpy(self._exact[idx[rows]]), kept)
            again = (exact[rows], None if rough is None else rough[rows])
            moved = content.differ(first, again)
            if bool(moved.any()):
                raise self._changed(batch, int(rows[int(moved.nonzero()[0, 0])]))
        fresh = (~seen).nonzero()[0]
        self._exact[idx[fresh]] = exact.numpy()[fresh]
        if self._rough is not None and rough is not None:
            self._rough[idx[fresh]] = rough.numpy()[fresh]
        self._noted[idx[fresh]] = True

    def _changed(self, batch: Batch, k: int) -> InvalidInputError:
        how = (
            "its tensors were changed in place since"
            if self._tensors is not None
            else "the data the dataset reads changed since (a file replaced or rewritten), or "
            "its __getitem__ reads otherwise from one read to the next"
        )
        return InvalidInputError(
            f"{self.name} {batch.example(k)} reads otherwise than at its first read in this "
            f"run: {how}. What was computed from it (at fit: the curvature, cached gradients, "
            "a workdir's factors and scores) is of the data as it was read first, so the "
            "answers would mix two sets of data. Restore the data as it was, or fit again on "
            "it as it is now (a new Influence, or fit() again)"
        )

    def _read(self, i: int) -> Any:
        """Item ``i`` of the dataset; what reading it raised (an ``IndexError`` where
        ``__len__`` counts more items than ``__getitem__`` reads, a transform's error) names
        the item, with the error chained."""
        try:
            return self._dataset[i]
        except InfkitError:
            raise
        except Exception as error:  # (the user's __getitem__: what it raised is the news)
            hint = (
                f"; its __len__ gives {len(self._dataset)}: does it count more items than "
                "__getitem__ reads?"
                if isinstance(error, IndexError)
                else ""
            )
            raise InvalidInputError(
                f"{self.name}: reading {self.example(i)} raised {type(error).__name__}: "
                f"{str(error)[:200]}{hint}"
            ) from error

    def _numbers_of(self, idx: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The numbers and positions (as messages give them) of the examples at ``idx``."""
        return (
            None if self.numbers is None else self.numbers[idx],
            None if self.given_at is None else self.given_at[idx],
        )

    def number(self, i: int) -> int:
        """The number by which messages name example ``i``: its number in the set it was taken
        from (:meth:`subset`), else ``i``."""
        return i if self.numbers is None else int(self.numbers[i])

    def example(self, i: int) -> str:
        """Example ``i`` as messages name it (:func:`example_name`)."""
        at = i if self.given_at is None else int(self.given_at[i])
        return example_name(self.number(i), at)

    def _collate(self, values: list[Any], idx: Tensor, what: str) -> Any:
        """``default_collate`` of items' inputs or labels; items whose dicts have other keys
        (an ``attention_mask`` on some items only) or whose tensors differ in shape (sequences
        of several lengths) are named."""
        if all(isinstance(v, dict) for v in values):
            keys = [sorted(v) for v in values]
            other = next((k for k in range(1, len(values)) if keys[k] != keys[0]), None)
            if other is not None:
                raise InvalidInputError(
                    f"{self.name} examples {self.number(int(idx[0]))} and "
                    f"{self.number(int(idx[other]))} have {what} with "
                    f"other keys ({', '.join(keys[0])} against {', '.join(keys[other])}): every "
                    "example of a set needs the same keys (give each an attention_mask, all "
                    "ones where nothing is padded)"
                )
        forms = [_item_form(v) for v in values]
        other = next((k for k in range(1, len(values)) if forms[k] != forms[0]), None)
        if other is not None:  # (default_collate's TypeError named no example, torch's index)
            raise InvalidInputError(
                f"{self.name} examples {self.number(int(idx[0]))} and "
                f"{self.number(int(idx[other]))} have {what} of different forms ({forms[0]} "
                f"against {forms[other]}): every example of a set needs one form (its __getitem__ "
                "returning an (x, y) pair for each, or a dict with the same keys for each)"
            )
        try:
            return default_collate(values)
        except RuntimeError as error:
            shapes = [[tuple(t.shape) for t in leaves(v)] for v in values]
            differs = [k for k in range(1, len(values)) if shapes[k] != shapes[0]]
            if not differs:
                raise
            k = differs[0]
            raise InvalidInputError(
                f"{self.name} examples {self.number(int(idx[0]))} and {self.number(int(idx[k]))} "
                f"have {what} of different "
                f"shapes ({', '.join(map(str, shapes[0]))} and {', '.join(map(str, shapes[k]))}):"
                " examples are batched together, so their tensors need one shape. Pad sequences "
                "to one length and mark the padding with attention_mask = 0 (for token ids, "
                "infkit.language_modeling.examples(ids, attention_mask) masks it out of the "
                "labels), or resize images to one size"
            ) from error

    def collated(self) -> tuple[Any, Any]:
        """Every example as one batch, ``(inputs, targets)``: an (X, y) pair as given (numpy
        arrays as tensors), or the items of a dataset collated like the batches of
        :meth:`take`, so that ``ExampleSet(set.collated())`` gives the same batches when the
        items collate to tensors."""
        if self._tensors is not None:  # (checked as read: a save after an in-place edit
            # kept no data and gave a wrong reason, a tester's)
            x, y = self._tensors
            every = torch.arange(len(self))
            self._check_content(Batch(every, x, y, self.name, *self._numbers_of(every)))
            return self._tensors
        batch = self.take(torch.arange(len(self)))
        return batch.inputs, batch.targets

    def positions(self) -> int:
        """Positions per example: the length of the first example's token ids (``input_ids``
        of dict inputs, or integer inputs [B, T]), the second axis of float sequences
        [B, T, d], the pixels of images [B, C, H, W]; 1 for feature vectors [B, d]."""
        return self.positions_and_unit()[0]

    def positions_and_unit(self) -> tuple[int, str]:
        """:meth:`positions` and what they count, as a plan prints it: ``"tokens"`` for token
        ids, ``"positions"`` for the rest (the second axis of ``[B, T, d]`` can as well be a
        signal's channels ``[B, C, L]``, which the shape alone does not tell apart)."""
        inputs = self.take([0]).inputs
        if isinstance(inputs, dict):
            inputs = inputs.get("input_ids", next(iter(inputs.values())))
        shape = tuple(inputs.shape)
        if len(shape) == 2 and not inputs.is_floating_point():
            return int(shape[1]), "tokens"
        if len(shape) == 3:
            return int(shape[1]), "positions"
        if len(shape) == 4:
            return int(shape[2] * shape[3]), "positions"
        return 1, "positions"

    def batches(
        self, batch_size: int, indices: Tensor | Sequence[int] | None = None
    ) -> Iterator[Batch]:
        """Batches in order over ``indices`` (default: all examples)."""
        idx = torch.arange(len(self)) if indices is None else torch.as_tensor(indices).reshape(-1)
        for start in range(0, len(idx), batch_size):
            yield self.take(idx[start : start + batch_size])

    def subset(self, indices: Tensor | Sequence[int]) -> ExampleSet:
        """A new ExampleSet of the examples at ``indices`` (in range, not negative): positions
        are renumbered from 0, and messages name each example by its number in the data it
        was taken from (:attr:`numbers`) with its position here."""
        idx = checked_indices(indices, len(self), what="subset index", allow_empty=True)
        return self._taken(idx)  # positions here: given_at stays None

    def part(self, indices: Tensor | Sequence[int]) -> ExampleSet:
        """:meth:`subset` for infkit's own splits of a set the user gave (groups of queries,
        the examples a removal retains): messages name each example as in the whole set, by
        its number and its position there (:attr:`given_at`)."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        out = self._taken(idx)
        out.given_at = idx if self.given_at is None else self.given_at[idx]
        return out

    def _taken(self, idx: Tensor) -> ExampleSet:
        """The examples at ``idx`` as a new set, with their numbers and checked state."""
        if self._tensors is not None:
            b = self.take(idx)
            out = ExampleSet((b.inputs, b.targets), name=self.name)
        else:
            out = ExampleSet(torch.utils.data.Subset(self._dataset, idx.tolist()), name=self.name)
        out.numbers = idx if self.numbers is None else self.numbers[idx]
        out._checked = self._checked
        if self._noted is not None and out._tensors is None:  # (a dataset's examples, read
            # anew through a Subset, are checked against the notes of their first read: a
            # reviewer's remove(steps=3) took labels changed after fit, 140x off)
            at = idx.cpu().numpy()
            out._noted, out._exact, out._width = self._noted[at], self._exact[at], self._width
            out._rough = None if self._rough is None else self._rough[at]
        return out

    def example_shape(self) -> Any:
        """Per-example shapes of the inputs (a torch.Size or a dict of them), from example 0."""
        first = self.take([0]).inputs
        return _map_tensors(first, lambda t: tuple(t.shape[1:]))

    def check_finite(self, batch_size: int = 1024, targets: bool = True) -> None:
        """Raise NonFiniteError naming the first example with NaN or Inf in a float input (or
        target, unless ``targets`` is False: a use that reads none); an additive attention
        mask (0 and -inf, a dict input whose key names a mask) is told as such: a mask holds 1
        at a token and 0 at padding."""
        for b in self.batches(batch_size):
            named_inputs = b.inputs.items() if isinstance(b.inputs, dict) else [("", b.inputs)]
            parts = [(key, t) for key, value in named_inputs for t in leaves(value)]
            read = leaves(b.targets) if targets else []
            for key, t in parts + [("", t) for t in read]:
                if t.is_meta:  # (isfinite's answer on it has no value to read)
                    where = f" in its {key!r}" if key else ""
                    raise InvalidInputError(
                        f"{self.name} {b.example(0)} has a tensor on PyTorch's meta device"
                        f"{where} (a shape without values): give the data itself; a plan of "
                        "a model on the meta device takes sizes instead (Influence.plan(n_train=..., "
                        "n_queries=..., sequence_length=...))"
                    )
                if t.is_floating_point() or t.is_complex():
                    bad = ~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1)
                    if bad.any():
                        row = int(bad.nonzero()[0, 0])
                        named = b.example(row)
                        kind = "NaN" if torch.isnan(t[row]).any() else "Inf"
                        if "mask" in key:
                            raise NonFiniteError(
                                f"{self.name} {named} has {kind} in its {key!r}: give the "
                                "tokenizer's 0/1 mask (1 a token, 0 padding), which infkit "
                                "reads; an additive mask of 0 and -inf is not finite (a "
                                "classifier whose model adds its mask to the attention scores "
                                "may take torch.finfo(dtype).min for -inf; the language-"
                                "modelling task reads only the 0/1 form)"
                            )
                        raise NonFiniteError(
                            f"{self.name} {named} contains {kind} in its inputs or targets; "
                            "remove or repair it before computing influence"
                        )


@dataclass(frozen=True)
class _Leaf:
    """One input tensor of an example: its per-example shape and whether it holds floats."""

    shape: tuple[int, ...]
    floating: bool


def _signature(examples: ExampleSet) -> Any:
    """The inputs of example 0 with every tensor replaced by its :class:`_Leaf`."""
    first = examples.take([0]).inputs
    return _map_tensors(
        first, lambda t: _Leaf(tuple(t.shape[1:]), t.is_floating_point() or t.is_complex())
    )


def _shapes_match(ref: _Leaf, got: _Leaf) -> bool:
    if len(ref.shape) != len(got.shape):
        return False
    if ref.floating:
        return ref.shape == got.shape
    # Integer inputs (token ids) may differ in sequence length: an example's first dimension
    # ([T]), or its last (a multiple-choice model's [C, T])
    return ref.shape[1:] == got.shape[1:] or ref.shape[:-1] == got.shape[:-1]


def _form(signature: Any) -> str:
    """How a set's inputs are given, in words: ``a tensor [n, 7] of integers``."""
    if isinstance(signature, _Leaf):
        dims = ", ".join(["n", *map(str, signature.shape)])
        return f"a tensor [{dims}] of {'floats' if signature.floating else 'integers'}"
    if isinstance(signature, dict):
        return f"a dict with keys {', '.join(sorted(map(str, signature)))}"
    if isinstance(signature, (tuple, list)):
        return f"a {type(signature).__name__} of {len(signature)} items"
    return f"a {type(signature).__name__}"


def _owner(name: str) -> str:
    """The possessive of a set's name: ``the test set's``, ``the behaviour queries'``."""
    return f"the {name}'" if name.endswith("s") else f"the {name}'s"


def _mismatch(ref: Any, got: Any, reference: str, other: str, where: str = "") -> str | None:
    """Why inputs of signature ``got`` (set ``other``) cannot stand in for ``ref``'s, or None.

    ``where`` names the part being compared (``" input 'input_ids'"``) inside nested inputs.
    """
    if isinstance(ref, _Leaf) and isinstance(got, _Leaf):
        if _shapes_match(ref, got):
            return None
        if not where:
            shape = ", ".join(map(str, ref.shape))
            return (
                f"{other} inputs have per-example shape {got.shape}, but {reference} inputs "
                f"have per-example shape {ref.shape}; pass a batch shaped [n, {shape}]"
            )
        return (
            f"{other}{where} has per-example shape {got.shape}, but {reference}{where} has "
            f"{ref.shape}"
        )
    if isinstance(ref, dict) and isinstance(got, dict):
        if set(ref) != set(got):
            return _key_mismatch(set(ref), set(got), reference, other, where)
        for key in ref:
            found = _mismatch(ref[key], got[key], reference, other, f"{where} input {key!r}")
            if found is not None:
                return found
        return None
    if isinstance(ref, (tuple, list)) and isinstance(got, (tuple, list)) and len(ref) == len(got):
        for i, (r, g) in enumerate(zip(ref, got)):
            found = _mismatch(r, g, reference, other, f"{where} input {i}")
            if found is not None:
                return found
        return None
    if isinstance(ref, (_Leaf, dict, tuple, list)) or isinstance(got, (_Leaf, dict, tuple, list)):
        if where:
            message = f"{other}{where} is {_form(got)}, but {reference}{where} is {_form(ref)}"
        else:
            message = (
                f"{_owner(other)} inputs are {_form(got)}, but {_owner(reference)} are {_form(ref)}"
            )
        message += ": give both in the same form"
        if any(isinstance(s, dict) and "input_ids" in s for s in (ref, got)):
            message += f" ({LM_EXAMPLES} builds the dict inputs and labels of a language model)"
        return message
    return None


def _key_mismatch(ref: set[Any], got: set[Any], reference: str, other: str, where: str) -> str:
    """The message for dict inputs whose keys differ: which set lacks which key."""
    lacking, extra = sorted(map(str, ref - got)), sorted(map(str, got - ref))
    if where:  # a dict inside the inputs: "test set input 'x' lacks ..."
        subject, lack, have, owner = f"{other}{where}", "lacks", "has", f"{reference}{where}"
        do_not = "does not"
    else:
        subject, lack, have = f"{_owner(other)} inputs", "lack", "have"
        owner, do_not = _owner(reference), "do not"
    clauses = []
    if lacking:
        keys = ", ".join(map(repr, lacking))
        clauses.append(
            f"{lack} the key{'s' if len(lacking) > 1 else ''} {keys} that {owner} {have}"
        )
    if extra:
        keys = ", ".join(map(repr, extra))
        clauses.append(
            f"{have} the key{'s' if len(extra) > 1 else ''} {keys} that {owner} {do_not}"
        )
    message = f"{subject} {' and '.join(clauses)}: give both sets the same input keys"
    if "attention_mask" in lacking:
        message += (
            f"; {LM_EXAMPLES} includes the mask, and attention_mask=torch.ones_like(input_ids) "
            "marks every token as real when nothing is padded"
        )
    elif "attention_mask" in extra:
        message += (
            f"; give the {reference} one too ({LM_EXAMPLES}, with "
            "attention_mask=torch.ones_like(input_ids) where nothing in it is padded). Drop "
            f"{_owner(other)} "
            "attention_mask only where nothing in it is padded either: a padded set without its "
            "mask reads the padding as tokens, and every score of it is then wrong"
        )
    return message


def check_compatible(reference: ExampleSet, other: ExampleSet) -> None:
    """Raise InvalidInputError when ``other``'s per-example inputs differ from ``reference``'s.

    The message names both forms (a tensor, a dict and its keys, a tuple), which set lacks
    which dict key, or which input has another per-example shape.
    """
    problem = _mismatch(_signature(reference), _signature(other), reference.name, other.name)
    if problem is not None:
        raise InvalidInputError(problem)


def kept_masks(masks: Any, hint: str) -> Tensor:
    """``masks`` ([m, N], True or 1 where an example is kept) as a boolean tensor, or a clear
    error naming the values that are neither; ``hint`` says where such masks come from."""
    try:
        if (
            isinstance(masks, (list, tuple))
            and masks
            and all(isinstance(row, Tensor) for row in masks)
        ):
            raw = torch.stack([row.detach() for row in masks])  # (a list of per-subset rows)
        else:
            raw = torch.as_tensor(masks)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidInputError(
            "masks must be a boolean or 0/1 array or tensor [m, N] (or a list of m rows of one "
            f"length), got {type(masks).__name__}"
        ) from error
    if raw.dtype != torch.bool and not bool(((raw == 0) | (raw == 1)).all()):
        values = torch.unique(raw.reshape(-1))[:5].tolist()
        raise InvalidInputError(
            f"masks must be boolean (True for a kept training example) or 0/1, got values "
            f"{values}: {hint}"
        )
    return raw.to(torch.bool)


def checked_indices(
    indices: Any,
    n: int,
    *,
    what: str = "training index",
    unique: bool = False,
    allow_empty: bool = False,
) -> Tensor:
    """``indices`` as a 1-D long tensor, each an integer in [0, n), or a clear error.

    Floats that are not whole numbers (``1.7``), negative indices (no wrapping to the end),
    out-of-range ones and, with ``unique``, repeated ones are refused, naming the first offender.
    """
    try:
        raw = torch.as_tensor(indices)
    except (TypeError, ValueError, RuntimeError) as error:
        raise InvalidInputError(
            f"{what}es must be integers (a list, array or tensor), got {type(indices).__name__}"
        ) from error
    if sum(size > 1 for size in raw.shape) > 1:  # (a tester's [2, 2] was flattened silently)
        raise InvalidInputError(
            f"{what}es must be one list of positions, got a tensor of shape "
            f"{tuple(raw.shape)}; pass them flat (a [k] or [k, 1] tensor, a list)"
        )
    raw = raw.reshape(-1)
    if raw.dtype == torch.bool:
        raise InvalidInputError(
            f"{what}es are a boolean mask; pass positions, e.g. mask.nonzero().squeeze(1)"
        )
    if raw.is_floating_point() or raw.is_complex():
        whole = raw.is_floating_point() and bool((raw == raw.round()).all())
        if not whole:
            bad = raw[raw != raw.round()][0] if raw.is_floating_point() else raw[0]
            raise InvalidInputError(f"{what} {bad.item()!r} is not a whole number")
    idx = raw.to(torch.long)
    if idx.numel() == 0 and not allow_empty:
        raise InvalidInputError(f"no {what}es given; pass at least one")
    outside = (idx < 0) | (idx >= n)
    if bool(outside.any()):
        raise InvalidInputError(
            f"{what} {int(idx[outside][0])} is out of range [0, {n}) (negative indices do not "
            "count from the end)"
        )
    if unique and len(torch.unique(idx)) != len(idx):
        values, counts = torch.unique(idx, return_counts=True)
        # (a 0/1 mask of the examples, which a boolean one is told to be)
        mask = len(idx) == n and bool(((idx == 0) | (idx == 1)).all())
        hint = "; a 0/1 mask of the examples? pass positions, e.g. mask.nonzero().squeeze(1)"
        raise InvalidInputError(
            f"{what} {int(values[counts > 1][0])} is given twice; pass each index once"
            + (hint if mask else "")
        )
    return idx
