"""Typed options: each method declares its options once, one validator checks them all.

A method's options are a frozen dataclass deriving from :class:`Options`. Each field is declared
with :func:`option`, which carries its one-line documentation and, where needed, its bounds;
choices are ``Literal`` types. :meth:`Options.parse` turns user keyword arguments into an
instance, and every problem is reported the same way, naming the owner (``method 'cg'``), the
option, what it accepts and what was given:

* an unknown option (with the closest valid names and the full list);
* a value of the wrong type, or outside its ``Literal`` choices;
* a number outside its bounds, or not finite (NaN, infinity).

Renamed options keep working for a while through ``aliases`` (old name -> new name), with a
``DeprecationWarning``. ``Options.record()`` gives a JSON-friendly dict for ``describe()`` and for
every saved artifact.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import numbers
import types
import typing
from collections.abc import Mapping
from pathlib import PurePath
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

import torch

from infkit.errors import InvalidInputError, UnsupportedError, warn
from infkit.parameters import dtype_name

OptionsT = TypeVar("OptionsT", bound="Options")

#: the keyword arguments of ``infkit.Influence(...)`` other than the method's options. A
#: misspelt one arrives among the method's options, so an unknown option is matched against
#: these too, and a close one is suggested first (a test keeps this list equal to the
#: signature of ``Influence.__init__``; options.py cannot import influence.py)
FACADE_KEYWORDS = (
    "task",
    "method",
    "estimator",
    "l2",
    "damping",
    "relatif",
    "batch_size",
    "per_example",
    "progress",
    "memory_limit",
    "device",
    "dtype",
    "workdir",
    "checks",
)
#: how close (difflib's ratio) a misspelt name must be to an Influence keyword to suggest it
FACADE_CUTOFF = 0.75


def suggest_option(name: str, known: list[str]) -> str:
    """`` (did you mean ...?)`` for an unknown option ``name``, or ``""`` when nothing is close.

    An ``Influence(...)`` keyword (:data:`FACADE_KEYWORDS`) that is close comes first unless a
    method option is closer: ``dampng`` is ``damping``, not ``damping_scale``.
    """

    def ratio(candidate: str) -> float:
        return difflib.SequenceMatcher(None, name, candidate).ratio()

    facade = [
        k
        for k in difflib.get_close_matches(name, FACADE_KEYWORDS, n=1, cutoff=FACADE_CUTOFF)
        if k not in known
    ]
    close = (
        difflib.get_close_matches(name, known, n=2, cutoff=0.5)
        or [k for k in known if name.startswith(k) or k.startswith(name)][:2]
    )
    options = f"the option {' or '.join(map(repr, close))}" if close else ""
    if not facade:
        return f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    keyword = f"infkit.Influence(..., {facade[0]}=...), a keyword of Influence itself"
    if not close:
        return f" (did you mean {keyword}?)"
    if ratio(facade[0]) >= ratio(close[0]):
        return f" (did you mean {keyword}, or {options}?)"
    return f" (did you mean {options}, or {keyword}?)"


def option(
    default: Any,
    doc: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
    below: float | None = None,
) -> Any:
    """A documented option field. A number given for it must be finite (NaN and infinity are
    refused whatever the bounds).

    Args:
        default: the default value (immutable; lists are given as tuples).
        doc: one line saying what the option does.
        minimum: numbers must be ``>= minimum``.
        above: numbers must be ``> above``.
        below: numbers must be ``< below``.
    """
    return dataclasses.field(
        default=default,
        metadata={"doc": doc, "minimum": minimum, "above": above, "below": below},
    )


@dataclasses.dataclass(frozen=True)
class Options:
    """Base class of a method's options (a frozen dataclass of :func:`option` fields)."""

    #: old option name -> current name, accepted with a DeprecationWarning
    aliases: ClassVar[Mapping[str, str]] = {}
    #: option -> {old value: current value}, accepted with a DeprecationWarning
    value_aliases: ClassVar[Mapping[str, Mapping[Any, Any]]] = {}

    @classmethod
    def fields(cls) -> list[dataclasses.Field[Any]]:
        return list(dataclasses.fields(cls))

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in cls.fields()]

    @classmethod
    def parse(
        cls: type[OptionsT], values: Mapping[str, Any], owner: str, refuse_unread: bool = True
    ) -> OptionsT:
        """An instance from keyword arguments, or an error naming ``owner`` and the option.

        ``refuse_unread=False`` takes options that the others leave unread (:meth:`unread`):
        a saved fit's, whose answers they did not change.

        Raises:
            UnsupportedError: an unknown option, or a value outside an option's choices.
            InvalidInputError: a value of the wrong type or out of range, or an option the
                others leave unread.
        """
        given = dict(values)
        for old, new in cls.aliases.items():
            if old in given:
                if new in given:
                    raise InvalidInputError(
                        f"{owner}: options {old!r} and {new!r} are the same option ({old!r} is "
                        f"the old name); pass {new!r} only"
                    )
                warn(f"{owner}: option {old!r} is now called {new!r}", DeprecationWarning)
                given[new] = given.pop(old)
        known = cls.names()
        unknown = [k for k in given if k not in known]
        if unknown:
            hints = [
                f"{k!r} (give the options as keywords: Influence(task, method, maxiter=...); "
                "an options table is the [influence] options of an infkit run config)"
                if k == "options"
                else f"{k!r}{suggest_option(k, known)}"
                for k in unknown
            ]
            raise UnsupportedError(
                f"{owner} does not take the option(s) {', '.join(hints)}; its options are: "
                f"{', '.join(known) or 'none'} (see infkit.methods() or the method's docstring)"
            )
        for name, renamed in cls.value_aliases.items():
            value = given.get(name)
            if isinstance(value, str) and value in renamed:
                new_value = renamed[value]
                warn(
                    f"{owner}: option {name}={value!r} is now {name}={new_value!r}",
                    DeprecationWarning,
                )
                given[name] = new_value
        hints_by_name = typing.get_type_hints(cls)
        for f in cls.fields():
            if f.name in given:
                given[f.name] = coerce(given[f.name], hints_by_name[f.name])
                _check_value(owner, f, hints_by_name[f.name], given[f.name])
        options = cls(**given)
        if refuse_unread:
            unread = options.unread_of(given)
            if unread:
                raise InvalidInputError(
                    f"{owner}: "
                    + "; ".join(unread.values())
                    + ": the method would ignore it, which reads as a setting it honoured. "
                    "Leave it out, or set the option that reads it"
                )
        return options

    def unread_of(self, given: Mapping[str, Any]) -> dict[str, str]:
        """:meth:`unread` of the options in ``given`` set to other than their defaults."""
        defaults = {f.name: f.default for f in self.fields()}
        return self.unread(  # (a name that is no field, an old alias, is none of them)
            frozenset(k for k in given if k in defaults and _differs(given[k], defaults[k]))
        )

    def unread(self, given: frozenset[str]) -> dict[str, str]:
        """Of the options ``given`` (set to other than their defaults), each that these
        options' other values leave unread, with the reason: :meth:`parse` refuses them (a
        default given is taken: a fit's own options given back, a shared dict of options).
        The base leaves none unread; subclasses add theirs (``samples`` with
        ``fisher='ggn'``)."""
        return {}

    def record(self) -> dict[str, Any]:
        """The options as JSON-friendly values (tensors and callables summarised)."""
        return {f.name: _recordable(getattr(self, f.name)) for f in self.fields()}

    @classmethod
    def documentation(cls) -> list[tuple[str, str, str, str]]:
        """(name, accepted values, default, one-line doc) of every option."""
        hints = typing.get_type_hints(cls)
        return [
            (f.name, describe_type(hints[f.name]), repr(f.default), f.metadata.get("doc", ""))
            for f in cls.fields()
        ]


@dataclasses.dataclass(frozen=True)
class NoOptions(Options):
    """A method without options."""


# ------------------------------------------------------------------------------ validation
def _differs(value: Any, default: Any) -> bool:
    """Whether an option's value is other than its default (what cannot be compared, a
    tensor against a number, is)."""
    try:
        return bool(value != default)
    except (TypeError, ValueError, RuntimeError):
        return True


def _check_value(owner: str, f: dataclasses.Field[Any], hint: Any, value: Any) -> None:
    doc = f.metadata.get("doc", "")
    where = f"{owner}: option {f.name!r}"
    choices = literal_choices(hint)
    if not conforms(value, hint):
        accepted = describe_type(hint)
        error = UnsupportedError if choices and isinstance(value, str) else InvalidInputError
        raise error(
            f"{where} must be {accepted}, got {_shown(value)}{_bad_item(value, hint)}"
            + (f" ({f.name}: {doc})" if doc else "")
        )
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # (an infinite tol or scale_factor passed the bounds and reached a ZeroDivisionError
        # or a run of 0 iterations)
        if not math.isfinite(value):
            raise InvalidInputError(
                f"{where} must be a finite number, got {value!r} ({f.name}: {doc})"
            )
        low, above = f.metadata.get("minimum"), f.metadata.get("above")
        below = f.metadata.get("below")
        if low is not None and not value >= low:
            raise InvalidInputError(f"{where} must be >= {low}, got {value!r} ({f.name}: {doc})")
        if above is not None and not value > above:
            raise InvalidInputError(f"{where} must be > {above}, got {value!r} ({f.name}: {doc})")
        if below is not None and not value < below:
            raise InvalidInputError(f"{where} must be < {below}, got {value!r} ({f.name}: {doc})")


def _shown(value: Any, limit: int = 120) -> str:
    """``repr(value)`` for a message, cut at ``limit`` characters (a list of tensors runs on)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + " ...]"


def _bad_item(value: Any, hint: Any) -> str:
    """Where a list given for an option that takes a list goes wrong: its first item that is
    not of the item type (``''`` when ``value`` is no list or ``hint`` takes none)."""
    if not isinstance(value, (list, tuple)):
        return ""
    item = _sequence_item(hint)
    if item is None:
        return ""
    for k, v in enumerate(value):
        if not conforms(v, item):
            return f": item {k} is a {type(v).__name__}, and each must be {describe_type(item)}"
    return ""


def _accepts(hint: Any, kind: Any) -> bool:
    """Whether ``hint`` (possibly a union) admits the plain type ``kind``."""
    if hint is kind:
        return True
    if get_origin(hint) in (Union, types.UnionType):
        return any(_accepts(arg, kind) for arg in get_args(hint))
    return False


def _sequence_item(hint: Any) -> Any | None:
    """The item type of a ``Sequence[...]`` (or list/tuple) in ``hint``, or None."""
    origin = get_origin(hint)
    if origin in (list, tuple, collections.abc.Sequence):
        args = get_args(hint)
        return args[0] if args else Any
    if origin in (Union, types.UnionType):
        for arg in get_args(hint):
            item = _sequence_item(arg)
            if item is not None:
                return item
    return None


def coerce(value: Any, hint: Any) -> Any:
    """Plain Python values for what a user naturally passes.

    numpy / torch scalars become ``int`` or ``float`` where the option takes one; an array, a
    tensor or any other iterable (a generator) becomes a tuple where the option takes a
    sequence; a dtype's name (``"float32"``, as :meth:`Options.record` writes it) the dtype
    where the option takes one. Everything else is returned unchanged, for the type check to
    judge.
    """
    if isinstance(value, str) and hint is torch.dtype:  # a dtype's name, as record() writes it
        named = getattr(torch, value.removeprefix("torch."), None)
        return named if isinstance(named, torch.dtype) else value
    if isinstance(value, (bool, str, bytes)) or value is None:
        return value
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()
    elif type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        value = value.item()  # a numpy scalar
    if isinstance(value, numbers.Integral) and not isinstance(value, int) and _accepts(hint, int):
        return int(value)
    if (
        isinstance(value, numbers.Real)
        and not isinstance(value, (int, float))
        and _accepts(hint, float)
    ):
        return float(value)
    item = _sequence_item(hint)
    if item is not None and not isinstance(value, (list, tuple, Mapping, torch.Tensor)):
        if hasattr(value, "tolist") and callable(value.tolist):  # a numpy array
            return tuple(value.tolist())
        if isinstance(value, collections.abc.Iterable):
            return tuple(value)
    if item is not None and isinstance(value, torch.Tensor):
        if item in (float, int) or _accepts(item, float):
            return tuple(value.reshape(-1).tolist())
        return tuple(value)
    return value


def _one_number(value: Any) -> Any:
    """A one-number tensor or numpy array as a 0-d one (for :func:`coerce`); a tensor without
    data (on the meta device) as None; anything else as it is."""
    if isinstance(value, torch.Tensor):
        if value.is_meta:
            return None
        return value.reshape(()) if value.numel() == 1 else value
    if type(value).__module__ == "numpy" and getattr(value, "size", None) == 1:
        return value.reshape(())
    return value


def real_number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (Python's or numpy's, or a one-number
    tensor; not a bool), else None: for arguments checked outside an :class:`Options`."""
    value = _one_number(value)
    value = coerce(value, float)
    return float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else None


def nonnegative_number(name: str, value: Any, why: str = "", alternative: str = "") -> float:
    """``value`` as a float when it is a finite real number >= 0 (:func:`real_number`: numpy's
    and one-number tensors too; not a bool nor a string), or an InvalidInputError naming
    ``name`` (``alternative``: what else it may be, e.g. " or 'auto'"; ``why``: a reason added)."""
    found = real_number(value)
    if found is None or not 0 <= found < math.inf:
        reason = f": {why}" if why else ""
        raise InvalidInputError(
            f"{name} must be a finite number >= 0{alternative}, got {value!r}{reason}"
        )
    return found


def whole_number(value: Any) -> int | None:
    """``value`` as an int when it is an integer (Python's or numpy's, or a one-number integer
    tensor; not a bool, nor a float such as 1.0), else None."""
    value = _one_number(value)
    value = coerce(value, int)
    return (
        int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None
    )


def integer_argument(name: str, value: Any, low: int, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (:func:`whole_number`: not a bool nor a float such
    as 2.5), or an InvalidInputError naming ``name``: for arguments checked outside an
    :class:`Options`."""
    found = whole_number(value)
    if found is None or found < low or (high is not None and found > high):
        span = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidInputError(f"{name} must be an integer {span}, got {value!r}")
    return found


def literal_choices(hint: Any) -> list[Any]:
    """The ``Literal`` values a type accepts (inside unions too)."""
    origin = get_origin(hint)
    if origin is Literal:
        return list(get_args(hint))
    if origin in (Union, types.UnionType):
        return [c for arg in get_args(hint) for c in literal_choices(arg)]
    return []


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the annotated type (the subset of typing that options use)."""
    if hint is Any:
        return True
    origin = get_origin(hint)
    if origin is Literal:
        return any(value == c and type(value) is type(c) for c in get_args(hint))
    if origin in (Union, types.UnionType):
        return any(conforms(value, arg) for arg in get_args(hint))
    if hint is type(None) or hint is None:
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value)
    if origin in (list, tuple, collections.abc.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return False
        args = get_args(hint)
        item = args[0] if args else Any
        return all(conforms(v, item) for v in value)
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, collections.abc.Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True


def describe_type(hint: Any) -> str:
    """Human-readable text for an option type, e.g. ``'ggn' or 'hessian'``."""
    origin = get_origin(hint)
    if origin is Literal:
        return " or ".join(repr(c) for c in get_args(hint))
    if origin in (Union, types.UnionType):
        return " or ".join(dict.fromkeys(describe_type(a) for a in get_args(hint)))
    if hint is type(None) or hint is None:
        return "None"
    if hint is bool:
        return "True or False"
    if hint is int:
        return "an integer"
    if hint is float:
        return "a number"
    if hint is str:
        return "a string"
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return "a callable"
    if origin in (list, tuple, collections.abc.Sequence):
        return "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a mapping"
    if hint is torch.Tensor:
        return "a tensor"
    if isinstance(hint, type):
        return f"a {hint.__name__}"
    return str(hint)


def _recordable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        return f"<tensor {list(value.shape)} {dtype_name(value.dtype)}>"
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, Mapping):
        if value and all(isinstance(v, torch.Tensor) for v in value.values()):
            return f"<state dict of {len(value)} tensors>"
        return {str(k): _recordable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_recordable(v) for v in value]
    if callable(value):
        return f"<callable {getattr(value, '__qualname__', type(value).__name__)}>"
    return repr(value)
