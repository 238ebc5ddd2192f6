"""Data in the forms users hold it, read as the pairs and rows :mod:`infkit.data` batches.

Beside an ``(X, y)`` pair of tensors and a torch ``Dataset`` of ``(x, y)`` pairs or dicts,
a user of Hugging Face libraries holds:

* a tokenizer's output, a ``BatchEncoding``: a mapping that is not a dict, given as the X of a
  pair ``(tokenizer(texts), labels)`` or holding its labels under a label key, as a collated
  batch does (:func:`mapping_pair`); its values may be lists of numbers (no
  ``return_tensors``), read as tensors (:func:`numbers_as_tensor`);
* rows whose values are lists of numbers (a ``datasets`` row; :func:`plain_mapping`);
* a ``datasets.Dataset``: sized and indexable, neither a torch ``Dataset`` nor a ``Sequence``
  (:func:`is_map_style`);
* a ``DataLoader``, read through its dataset: what of it is not used is named
  (:func:`warn_unused_loader_parts`).

What cannot be read so is refused, saying what it looks like and what to give instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    WeightedRandomSampler,
    default_collate,
    default_convert,
)

from infkit.errors import InvalidInputError, Notice, warn

#: the keys under which a dict example (or a dict of batched inputs) holds its labels
LABEL_KEYS = ("labels", "label", "targets", "target", "y")

#: how a language model's (inputs, labels) pair is built, for messages about dict inputs
LM_EXAMPLES = "infkit.language_modeling.examples(input_ids, attention_mask)"


def is_array(obj: Any) -> bool:
    """Whether ``obj`` is a numpy array (without importing numpy)."""
    return type(obj).__module__ == "numpy" and hasattr(obj, "__array__") and hasattr(obj, "shape")


def _numbers_only(value: Any) -> bool:
    """Whether ``value`` is a Python number or a list (or tuple) of them, nested."""
    if isinstance(value, (list, tuple)):
        return all(_numbers_only(item) for item in value)
    return isinstance(value, (bool, int, float))


def numbers_as_tensor(value: Any) -> Any:
    """A list (or tuple) of Python numbers, nested, as a tensor of the dtype ``default_collate``
    gives them (int64 for ints, float64 for floats, bool); anything else, and a list that is
    not rectangular, unchanged."""
    if not isinstance(value, (list, tuple)) or not value or not _numbers_only(value):
        return value
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):  # not rectangular
        return value
    # float64 from the Python floats themselves (a float32 tensor made first has rounded them)
    return torch.as_tensor(value, dtype=torch.float64) if tensor.is_floating_point() else tensor


def is_ragged(value: Any) -> bool:
    """Whether ``value`` is a list of lists of numbers of several lengths (token ids of texts
    tokenized without padding)."""
    return (
        isinstance(value, (list, tuple))
        and all(isinstance(item, (list, tuple)) and _numbers_only(item) for item in value)
        and len({len(item) for item in value}) > 1
    )


def plain_mapping(data: Mapping) -> dict[Any, Any]:
    """A mapping (a ``BatchEncoding``, a dataset's row) as a dict, its lists of numbers as
    tensors."""
    return {key: numbers_as_tensor(value) for key, value in data.items()}


def label_key(data: Mapping, where: Callable[[], str]) -> Any:
    """The label key of a mapping, or None; two of them are refused (which would be scored and
    which passed to the model as an input is not for infkit to guess). ``where()`` names it
    (made only then: a dataset's rows ask for every item of every batch)."""
    found = [key for key in LABEL_KEYS if key in data]
    if len(found) > 1:
        named = " and ".join(f"'{key}'" for key in found)
        raise InvalidInputError(
            f"{where()} holds labels under {named}: keep only the one to score (infkit reads "
            f"the first of {', '.join(LABEL_KEYS)} as the labels and would pass the other to "
            "the model as an input)"
        )
    return found[0] if found else None


def is_tokenizer_pair(data: Any) -> bool:
    """Whether ``data`` is ``(mapping, labels)`` with a mapping that is not a dict (a
    tokenizer's ``BatchEncoding``) and labels that are not one: two such mappings are two
    examples."""
    return (
        isinstance(data, (tuple, list))
        and len(data) == 2
        and isinstance(data[0], Mapping)
        and not isinstance(data[0], dict)
        and not isinstance(data[1], Mapping)
    )


def mapping_pair(data: Mapping, name: str) -> tuple[dict[Any, Any], Any]:
    """A mapping of batched inputs that holds its labels under a label key, as the ``(X, y)``
    pair of its other keys and its labels. Refused, saying what it looks like: one without
    labels, one that is one example (a dataset's row, its label a single value), one holding no
    batched inputs (a ``DatasetDict`` of splits)."""
    plain = plain_mapping(data)
    kind = type(data).__name__
    keys = ", ".join(f"'{key}'" for key in plain)
    batched = [v for v in plain.values() if isinstance(v, (Tensor, list, tuple)) or is_array(v)]
    if not batched:
        first = next(iter(plain), "train")
        raise InvalidInputError(
            f"{name} is a {kind} of {keys}, none of them a batch of inputs: if these are the "
            f"splits of a dataset (a DatasetDict), give one of them, data['{first}']"
        )
    key = label_key(plain, lambda: f"{name} ({kind})")
    if key is None:
        raise InvalidInputError(
            f"{name} is a {kind} of inputs ({keys}) without labels: give them with it, as a "
            "pair (inputs, labels) or under the key 'labels'; for a language model, "
            f"{LM_EXAMPLES} makes the labels from the ids (the ids, with -100 at padding)"
        )
    labels = plain[key]
    if isinstance(labels, (bool, int, float)) or (isinstance(labels, Tensor) and labels.dim() == 0):
        raise InvalidInputError(
            f"{name} is one example (a {kind} whose '{key}' is a single value): give a list of "
            "examples, [row], or a dataset's selection (dataset.select([i]) of a Hugging Face "
            "dataset)"
        )
    return {k: v for k, v in plain.items() if k != key}, labels


def unbatched_input(inputs: Any, n: int) -> str | None:
    """Why an input of a pair's dict of inputs cannot be batched, or None: a list (or tuple) of
    ``n`` items that are not tensors (a column of texts, token lists of several lengths), which
    batches would pass whole rather than a row per example."""
    if not isinstance(inputs, dict):
        return None
    for key, value in inputs.items():
        if not isinstance(value, (list, tuple)) or len(value) != n:
            continue
        if all(isinstance(item, Tensor) for item in value):
            continue
        if is_ragged(value):
            return (
                f"input '{key}' holds sequences of several lengths: pad them to one "
                "(tokenizer(texts, padding=True, return_tensors='pt')) and give the padding "
                "as attention_mask = 0"
            )
        return (
            f"input '{key}' is a {type(value).__name__} of {n} {type(value[0]).__name__}, not a "
            "tensor: each input of a pair is batched along its first dimension, so it must be "
            "a tensor or numpy array with a row per example (tokenize texts first, or leave the "
            "key out if the model does not read it)"
        )
    return None


def _callable_name(fn: Any) -> str:
    """A function's qualified name, a partial's function's, or an object's class name."""
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None:
        return f"a partial of {_callable_name(inner)}"
    return getattr(fn, "__qualname__", None) or type(fn).__qualname__


def warn_unused_loader_parts(loader: DataLoader, name: str) -> None:
    """Warn about what of a DataLoader infkit does not use, beyond its batching and order: a
    ``collate_fn`` of its own (one that pads the examples, or makes or masks their labels, makes
    other examples than infkit reads), a sampler or batch sampler that draws other than every
    example once (a subset, weights, draws with replacement: infkit reads every example of the
    dataset; one of one's own is drawn, a copy of it, to see) and a ``drop_last`` that drops
    examples of a loader that does not shuffle (shuffled, every example is trained on)."""
    collate = loader.collate_fn
    if collate not in (default_collate, default_convert):
        warn(
            f"{name}: the DataLoader's collate_fn ({_callable_name(collate)}) is not used: infkit "
            "reads the items of its dataset and batches them itself. If the collate_fn changes "
            "the examples (pads them, makes or masks their labels), give them as it makes them, "
            "every example in one batch: collate_fn([dataset[i] for i in range(len(dataset))]) "
            "(a dict holding the labels, or an (inputs, labels) pair)"
        )
    batches = loader.batch_sampler
    own_batches = batches is not None and not isinstance(batches, BatchSampler)
    # (a batch_sampler of one's own holds the sampler; loader.sampler is then the default)
    sampler = batches.sampler if isinstance(batches, BatchSampler) else loader.sampler
    whole = isinstance(sampler, SequentialSampler) or (
        isinstance(sampler, RandomSampler)
        and not sampler.replacement
        and sampler.num_samples == len(sampler.data_source)
    )
    drawing, what = (batches, "batch_sampler") if own_batches else (sampler, "sampler")
    trained = name.startswith("training")  # (a test set's loader is told of queries)
    if not own_batches and isinstance(sampler, WeightedRandomSampler):
        # (a tester's oversampling sampler was told to use a Subset, with a count drawn anew
        # at every call: the objective it trains is a weighted one)
        remedy = (
            ", and attributes the plain mean of their losses. A model trained with it minimises "
            "the weighted mean: give each example's weight beside its label and weight the loss "
            "by it (README, Quick start: examples weighted in training), so that infkit's "
            "objective is the one trained"
            if trained
            else ". To ask about some of them, give those: torch.utils.data.Subset(dataset, "
            "indices)"
        )
        warn(
            f"{name}: the DataLoader's sampler (WeightedRandomSampler) draws examples by weight, "
            "and is not used: infkit reads every example of its dataset once, in the dataset's "
            f"order{remedy}"
        )
    elif not own_batches and isinstance(sampler, RandomSampler) and sampler.replacement:
        warn(
            f"{name}: the DataLoader's sampler draws with replacement, and is not used: "
            "infkit reads every example of its dataset once, whose mean loss is the "
            "objective such draws train in expectation",
            Notice,
        )
    elif own_batches or not whole:
        drawn = _drawn_indices(drawing, loader.dataset, batched=own_batches)
        if drawn is not None:
            warn(
                f"{name}: the DataLoader's {what} ({_callable_name(drawing)}) draws {drawn}, "
                "and is not used: infkit reads every example of its dataset once, in the "
                "dataset's order. To attribute to some of them, give those: "
                "torch.utils.data.Subset(dataset, indices)"
            )
    elif (
        isinstance(sampler, SequentialSampler)  # (shuffled, another few each epoch: all trained)
        and isinstance(batches, BatchSampler)
        and batches.drop_last
    ):
        n = len(sampler)
        dropped = n % batches.batch_size
        # (a test set's loader was told of examples "never trained on": a tester's)
        if dropped:
            warn(
                f"{name}: the DataLoader drops its last {dropped} of {n} examples (drop_last="
                f"True, batch_size={batches.batch_size}, not shuffled"
                + (", so never trained on" if trained else "")
                + "); infkit reads every example of its dataset, those too. To "
                + ("attribute to" if trained else "score")
                + f" the others, give them: torch.utils.data.Subset(dataset, range({n - dropped}))"
            )


@contextlib.contextmanager
def _random_states_kept(owner: Any) -> Iterator[None]:
    """Draw within, leaving torch's, Python's and NumPy's global random states as they were,
    and those of the generators ``owner`` holds (in its attributes, two levels down: a batch
    sampler's sampler's), which a sampler of one's own draws from."""
    import random

    accessors: list[StateAccess] = [
        (random.getstate, random.setstate),
        (np.random.get_state, np.random.set_state),
        *_generator_states(owner),
    ]
    kept = [(put, get()) for get, put in accessors]
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            for put, state in kept:
                put(state)


#: how to read and set back a generator's state
StateAccess = tuple[Callable[[], Any], Callable[[Any], Any]]


def _generator_states(owner: Any, depth: int = 2) -> list[StateAccess]:
    """How to read and set back the state of each generator ``owner`` holds in its
    attributes, ``depth`` levels down: torch's, ``random.Random``, NumPy's ``Generator``
    (its ``bit_generator``'s) and its legacy ``RandomState`` (a reviewer's)."""
    import random

    found: list[StateAccess] = []
    try:
        values = list(vars(owner).values())
    except TypeError:  # (no __dict__)
        return found
    for value in values:
        if isinstance(value, (torch.Generator, np.random.RandomState)):
            found.append((value.get_state, value.set_state))
        elif isinstance(value, random.Random):
            found.append((value.getstate, value.setstate))
        elif isinstance(value, np.random.Generator):
            bits = value.bit_generator
            found.append((partial(getattr, bits, "state"), partial(setattr, bits, "state")))
        elif depth > 1 and not isinstance(value, (Tensor, np.ndarray, str, bytes, int, float)):
            found += _generator_states(value, depth - 1)
    return found


def _drawn_indices(drawing: Any, dataset: Any, batched: bool) -> str | None:
    """What a sampler (``batched``: a batch sampler) draws of ``dataset``'s n examples, in
    words (how many of them, and whether it repeats any), or None for every example once; its
    first 2n indices at most (a sampler may never end). It is drawn with the global random
    states and its own generators kept (:func:`_random_states_kept`; not copied: a reviewer's
    sampler held a memory-mapped corpus), a counter of its own (an epoch) excepted."""
    n = len(dataset)
    seen: list[int] = []
    with _random_states_kept(drawing):
        try:
            for item in drawing:
                if batched:
                    seen.extend(int(i) for i in item)
                else:
                    seen.append(int(item))
                if len(seen) > 2 * n:
                    return "more than twice as many indices as examples"
        except (TypeError, ValueError):  # (a sampler of lists with batching off, keys: a
            return "items that are not single indices"  # reviewer's BatchSampler as sampler)
    distinct = set(seen)
    if len(seen) == n and distinct == set(range(n)):
        return None
    repeated = " and repeats some" if len(distinct) < len(seen) else ""
    return f"{len(distinct & set(range(n)))} of the {n} examples{repeated}"


def is_map_style(data: Any) -> bool:
    """Whether ``data`` is a sized, indexable set of examples that is neither a torch Dataset
    nor a Sequence (a Hugging Face ``datasets.Dataset``): ``len`` works and its item 0 is a
    mapping or an ``(x, y)`` pair, as rows are read. pandas objects are not (``[i]`` reads
    them by label, not position)."""
    if isinstance(data, (str, bytes)) or hasattr(data, "iloc"):
        return False
    if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        return False
    try:
        if len(data) == 0:
            return True  # refused as empty
        first = data[0]
    except Exception:  # indexable by other keys (a dict's): said by not_a_set
        return False
    return isinstance(first, Mapping) or (isinstance(first, (tuple, list)) and len(first) == 2)


def not_a_set(data: Any, name: str) -> InvalidInputError:
    """The refusal of data read as none of the forms, with what it looks like."""
    message = (
        f"{name}: expected a pair (X, y) of tensors or numpy arrays, a Dataset (or a "
        f"DataLoader over one) of (x, y) pairs or of dicts; got {type(data).__name__}"
    )
    if hasattr(data, "iloc"):
        message += (
            " (a pandas object, whose [i] reads by label, not by position: give its columns as "
            "tensors, (torch.tensor(frame[inputs].to_numpy()), torch.tensor(frame[label]."
            "to_numpy())), or its rows as a list)"
        )
    elif hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        try:
            first = data[0]
            message += (
                f" (its item 0 is a {type(first).__name__}, where an (x, y) pair or a dict of "
                "one example's inputs and labels was expected)"
            )
        except Exception as error:  # what reading it raised is the news
            message += f" (reading its item 0 raised {type(error).__name__}: {error})"
    return InvalidInputError(message)
