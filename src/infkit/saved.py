"""A fitted ``Influence`` on disk: saved once, loaded back without refitting (docs/saving.md).

``inf.save(path)`` commits one artifact of kind :data:`KIND` to the artifact store at ``path``
(:mod:`infkit.store`: payload files written in a private directory, checksummed, the manifest
last, renamed into place). Its *identity* is everything the fit depends on: the model's
fingerprint (architecture and every parameter and buffer value), the task's (loss, measurement
and output functions), the training data's, the method and its options, the estimator and
RelatIF's norm, ``l2``, ``damping`` (and whether it was ``"auto"``), ``batch_size``, the
per-example mode, the dtype and autocast, the memory limit, infkit's version and the layout
:data:`SAVE_FORMAT`, plus an id of the save itself. Its payload:

* ``state``: the method's fitted state (:meth:`infkit.methods.Method.state`), its ``checks``
  and the record's results (stationarity, ``method="auto"``'s choice); tensors in
  ``state.safetensors``, the rest in ``state.json``;
* ``fitted``: what the record's passes computed: theta*, the regulariser anchor, the cached
  [N, P] training gradients, ``grad L(theta*)``;
* ``data``: the training set itself, when it is made of tensors (an (X, y) pair, dicts of
  tensors, a dataset whose items collate to tensors), collated so that the example set rebuilt
  from it gives the same batches (checked at save by its fingerprint); otherwise ``data.json``
  says why, and loading needs ``train=``;
* ``options``: tensor-valued method options (expansion points, checkpoints); functions cannot
  be saved, only their identity (name and code hash): they are given again at load;
* ``model`` (per-tensor digests and the module tree, to say what differs) and ``describe``.

Tensors are encoded with their layout (the strides of a transposed one) and device (the CPU, or
the model's), so that every answer after a load runs the same arithmetic as before it and is
bit-identical. Values are encoded as JSON with markers for tensors (``{"__tensor__": key}``),
tuples, dicts (their order kept), dtypes, paths and functions.
"""

from __future__ import annotations

import contextlib
import datetime
import numbers
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from infkit._version import __version__
from infkit.data import ExampleSet, leaves
from infkit.distributed import world
from infkit.errors import (
    ArtifactError,
    InfkitError,
    InvalidInputError,
    Notice,
    ProblemTooLargeError,
    UnsupportedError,
    listed,
    warn,
)
from infkit.fingerprint import (
    attribute_objects,
    callable_identity,
    changed_keys,
    code_identities,
    data_fingerprint,
    forward_written,
    held_module_tensors,
    model_fingerprint,
    names_read,
    plain_attributes,
    stable_repr,
    task_fingerprint,
    tensor_attributes,
    tensor_digest,
    user_hooks,
)
from infkit.fitted import Fitted, changed_message, gradient_cache_fits, probe_forward_writes
from infkit.gradients import PerExample
from infkit.memory import human_bytes
from infkit.methods.base import Method, Problem, method_class, registered
from infkit.options import Options
from infkit.parameters import ParameterSpace, dtype_name
from infkit.progress import Mode
from infkit.registry import Choice
from infkit.store import (
    MANIFEST,
    Artifact,
    ArtifactStore,
    differences,
    load_json,
    tensors_file,
)
from infkit.task import Task

#: the artifact kind of a saved Influence
KIND = "influence"
#: the layout of a saved Influence; another one is refused at load
SAVE_FORMAT = 1
#: the record's tensors that fit computed
FITTED_TENSORS = ("theta", "anchor", "train_gradients", "objective_gradient")
#: how messages name the parts of a task's fingerprint
TASK_PARTS = {
    "name": "the kind of task",
    "loss": "the loss function",
    "measurement": "the measurement function",
    "output_hessian": "the output-Hessian function",
    "output_fn": "the output function",
    "higher_is_better": "higher_is_better",
}


@dataclass(frozen=True)
class Settings:
    """The facade's settings: what ``Influence(...)`` is rebuilt with.

    Attributes:
        method: the fitted method's name (the one ``"auto"`` chose).
        requested: the method asked for (``"auto"`` or ``method``).
        estimator: the estimator's name.
        relatif: RelatIF's normalisation.
        l2: the objective's L2 coefficient.
        damping: the numerical damping (0 with ``auto_damping``).
        auto_damping: whether ``damping="auto"`` was asked.
        batch_size: examples per batch of every pass over the data.
        per_example: the per-example mode.
        memory_limit: bytes dense objects may take.
        autocast: the autocast dtype of the passes, or None.
        workdir: the resumable run's directory, or None.
        method_options: the method options as given (aliases renamed).
        choice: what ``method="auto"`` chose and why, or None.
    """

    method: str
    requested: str
    estimator: str
    relatif: str
    l2: float
    damping: float
    auto_damping: bool
    batch_size: int
    per_example: str
    memory_limit: int
    autocast: torch.dtype | None
    workdir: Path | None
    method_options: dict[str, Any]
    choice: Choice | None


# ---------------------------------------------------------------------------- encoding
class _Writer:
    """The tensors met while encoding values, by key, each in storage of its own."""

    def __init__(self, model_device: torch.device, digests: bool = False) -> None:
        self.model_device = model_device
        self.digests = digests  # a hash of each tensor in its reference (for identities)
        self.tensors: dict[str, Tensor] = {}
        self._storages: set[int] = set()

    def tensor(self, t: Tensor, where: str) -> dict[str, Any]:
        key, n = where, 1
        while key in self.tensors:
            key, n = f"{where}#{n}", n + 1
        t = t.detach()
        ref: dict[str, Any] = {
            "__tensor__": key,
            "device": "model" if t.device == self.model_device or t.device.type != "cpu" else "cpu",
        }
        if self.digests:
            ref["digest"] = tensor_digest(t)
        if not t.is_contiguous() and _dense(t):
            ref["stride"] = list(t.stride())  # restored: the same arithmetic after a load
        cpu = t.cpu()
        storage = cpu.untyped_storage()
        whole = (
            cpu.is_contiguous()
            and cpu.storage_offset() == 0
            and storage.nbytes() == cpu.numel() * cpu.element_size()
        )
        if not whole or storage.data_ptr() in self._storages:  # safetensors refuses sharing
            cpu = cpu.clone(memory_format=torch.contiguous_format)
        self._storages.add(cpu.untyped_storage().data_ptr())
        self.tensors[key] = cpu
        return ref


def _dense(t: Tensor) -> bool:
    """Whether ``t`` covers its memory without gaps or overlaps (a permuted contiguous tensor)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def encode(value: Any, writer: _Writer, where: str, what: str, functions: bool = False) -> Any:
    """``value`` as JSON, its tensors handed to ``writer`` (see the module docstring).

    Args:
        value: tensors, JSON values and lists, tuples and dicts of them (and dtypes, paths,
            and with ``functions`` callables, recorded by their identity).
        writer: collects the tensors.
        where: the value's name, for tensor keys and messages.
        what: what the value is, for messages (``"method 'exact''s fitted state"``).
        functions: record callables by :func:`~infkit.fingerprint.callable_identity`.

    Raises:
        UnsupportedError: a value of another kind, naming where it is.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Tensor):
        return writer.tensor(value, where)
    if isinstance(value, torch.dtype):
        return {"__dtype__": dtype_name(value)}
    if isinstance(value, PurePath):
        return {"__path__": str(value)}
    if isinstance(value, (list, tuple)):
        items = [encode(v, writer, f"{where}.{i}", what, functions) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if isinstance(value, Mapping):
        return {
            "__dict__": [
                [
                    encode(k, writer, f"{where}.key", what, functions),
                    encode(v, writer, f"{where}.{k}", what, functions),
                ]
                for k, v in value.items()
            ]
        }
    if functions and callable(value):
        return {"__callable__": callable_identity(value)}
    raise UnsupportedError(
        f"{what} holds a {type(value).__name__} at {where!r}, which cannot be saved: tensors, "
        "numbers, strings, None and lists, tuples and dicts of them can. A method holding other "
        "objects overrides state() and restore() (CONTRIBUTING.md)"
    )


def decode(
    obj: Any,
    tensors: Mapping[str, Tensor],
    device: torch.device,
    where: str = "",
    function: Callable[[str, str], Any] | None = None,
) -> Any:
    """The value :func:`encode` wrote, with its tensors (on the CPU, or on ``device`` for those
    that were on the model's device) in their saved layout.

    Args:
        obj: the JSON.
        tensors: the tensors by key.
        device: the model's device now.
        where: the value's name, for messages.
        function: ``(where, identity) -> callable`` for recorded functions.
    """
    if isinstance(obj, list):
        return [decode(v, tensors, device, f"{where}.{i}", function) for i, v in enumerate(obj)]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        key = obj["__tensor__"]
        if key not in tensors:
            raise ArtifactError(f"the saved tensor {key!r} is missing from its payload file")
        t = tensors[key]
        target = torch.device("cpu") if obj.get("device") == "cpu" else device
        stride = obj.get("stride")
        if stride is None:
            return t.to(target)
        out = torch.empty_strided(tuple(t.shape), tuple(stride), dtype=t.dtype, device=target)
        return out.copy_(t)
    if "__tuple__" in obj:
        return tuple(
            decode(v, tensors, device, f"{where}.{i}", function)
            for i, v in enumerate(obj["__tuple__"])
        )
    if "__dict__" in obj:
        out_dict = {}
        for k, v in obj["__dict__"]:
            key = decode(k, tensors, device, where, function)
            out_dict[key] = decode(v, tensors, device, f"{where}.{key}", function)
        return out_dict
    if "__dtype__" in obj:
        return getattr(torch, obj["__dtype__"])
    if "__path__" in obj:
        return Path(obj["__path__"])
    if "__callable__" in obj:
        if function is None:
            raise ArtifactError(f"{where!r} is a function, which was not saved")
        return function(where, obj["__callable__"])
    raise ArtifactError(f"unknown encoded value at {where!r}: {sorted(obj)}")


# ---------------------------------------------------------------------------- the model
def model_details(model: nn.Module) -> dict[str, Any]:
    """The module tree and a digest of every parameter and buffer, to name what differs, and of
    every tensor attribute (:func:`~infkit.fingerprint.tensor_attributes`)."""
    tensors: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        tensors[name] = _tensor_details(p, p.requires_grad)
    for name, b in model.named_buffers():
        tensors[name] = _tensor_details(b, None)
    seen: set[int] = set()  # (a settings object at the first module that holds it)
    written, reads = frozenset(forward_written(model)), names_read(model)
    return {
        "tensor_attributes": {
            name: _tensor_details(t, None) for name, t in tensor_attributes(model).items()
        },
        "modules": {
            name or "(root)": f"{type(m).__module__}.{type(m).__qualname__}"
            for name, m in model.named_modules()
        },
        "tensors": tensors,
        "repr": stable_repr(model),
        "attributes": {
            name or "(root)": {
                k: stable_repr(v)
                for k, v in plain_attributes(m, seen, written, name, reads).items()
            }
            for name, m in model.named_modules()
        },
        # (a fresh model holds None where these are written: _architecture_difference)
        "forward_written": forward_written(model),
        "code": code_identities(model),
        "hooks": user_hooks(model),
        "held": {name: _tensor_details(t, None) for name, t in held_module_tensors(model).items()},
    }


def _tensor_details(t: Tensor, trainable: bool | None) -> dict[str, Any]:
    return {
        "shape": list(t.shape),
        "dtype": dtype_name(t.dtype),
        "trainable": trainable,
        "digest": tensor_digest(t),
    }


def _architecture_difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs between the saved model's architecture and ``now``'s, as a message says it,
    or "" where their details differ only in attributes a forward pass of either was seen to
    write: a fresh model holds its placeholder there (``self.last = None`` until the first
    pass, a plain value, where the saved one held a tensor, which is not), or the value a
    pass of the saved fit's larger batches noted."""
    parts = []
    m0, m1 = saved["modules"], now["modules"]
    missing = [repr(n) for n in m0 if n not in m1]
    extra = [repr(n) for n in m1 if n not in m0]
    changed = [f"{n!r} is a {m1[n]}, saved a {m0[n]}" for n in m0 if n in m1 and m0[n] != m1[n]]
    if missing:
        parts.append(f"modules missing: {listed(missing)}")
    if extra:
        parts.append(f"modules not in the saved model: {listed(extra)}")
    if changed:
        parts.append(listed(changed, 3))
    t0, t1 = saved["tensors"], now["tensors"]
    shapes = [
        f"{n} has shape {t1[n]['shape']}, saved {t0[n]['shape']}"
        for n in t0
        if n in t1 and t0[n]["shape"] != t1[n]["shape"]
    ]
    if shapes:
        parts.append(listed(shapes, 3))
    if not parts and "attributes" in saved:  # (saves before 0.2.0 have none)
        # (what either side's passes were seen to write: the saved fit's passes may have
        # shown more, a size noted only of its batches)
        written = sorted(set(saved.get("forward_written", [])) | set(now["forward_written"]))
        a0 = _without(saved["attributes"], written)
        a1 = _without(now["attributes"], written)
        for name in a0:
            if name in a1 and a0[name] != a1[name]:
                keys = sorted(set(a0[name]) | set(a1[name]))
                key = next(k for k in keys if a0[name].get(k) != a1[name].get(k))
                parts.append(
                    f"module {name!r}'s {key} is {a1[name].get(key, _NOT_PLAIN)}, saved "
                    f"{a0[name].get(key, _NOT_PLAIN)}"
                )
                break
        else:
            if saved["repr"] == now["repr"]:
                # the same modules, shapes, settings and repr but for attributes the saved
                # model's forward pass wrote: a placeholder not yet filled (self.last = None)
                return ""
    if not parts:
        lines0, lines1 = saved["repr"].splitlines(), now["repr"].splitlines()
        for a, b in zip(lines0 + [""] * len(lines1), lines1 + [""] * len(lines0)):
            if a != b:
                parts.append(f"a module's configuration: {b.strip()!r}, saved {a.strip()!r}")
                break
        else:
            parts.append("the module classes")
    return "the architecture differs (" + "; ".join(parts) + ")"


#: how a message says an attribute that is not among a module's plain ones
_NOT_PLAIN = "not set or not a plain value (a function, an object)"


def _without(
    attributes: dict[str, dict[str, str]], written: list[str]
) -> dict[str, dict[str, str]]:
    """Each module's plain attributes (as :func:`model_details` records them) without those
    named in ``written``, dotted names of attributes a forward pass writes
    (:func:`~infkit.fingerprint.forward_written`)."""
    left_out: dict[str, set[str]] = {}
    for name in written:
        # (the module whose name is the longest prefix: a setting's key has dots, cfg.scale)
        holders = [m for m in attributes if m != "(root)" and name.startswith(m + ".")]
        module = max(holders, key=len, default="(root)")
        key = name if module == "(root)" else name[len(module) + 1 :]
        left_out.setdefault(module, set()).add(key)
    return {
        name: {k: v for k, v in values.items() if k not in left_out.get(name, ())}
        for name, values in attributes.items()
    }


def _code_difference(saved: dict[str, str], now: dict[str, str]) -> str:
    """Which module classes' code differs from the saved model's, as a message says it."""
    changed = [name for name in now if name in saved and saved[name] != now[name]]
    other = sorted(set(saved) ^ set(now))
    named = listed(changed or other or ["its module classes"], 3)
    return (
        f"the model's code differs: {named} (the code of its methods, forward among them, or "
        "a module-level value they read, such as a constant: an edit, or another version of "
        "the library that defines it), so the saved answers are another computation's"
    )


def _held_difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """Which tensors of the modules the model holds outside its module tree differ."""
    changed = changed_keys(saved, now)
    return (
        f"the tensors of modules the model holds outside its module tree differ: "
        f"{listed(changed or ['their values'], 3)} (a module kept in a list or dict attribute, "
        "not registered: its forward pass reads them, so the saved answers are another model's)"
    )


def _hook_difference(saved: dict[str, str], now: dict[str, str]) -> str:
    """Which hooks of the user's code on the model's modules differ from the saved model's."""
    changed = changed_keys(saved, now)
    said = [
        f"{name} ({'added' if name not in saved else 'removed' if name not in now else 'changed'})"
        for name in changed
    ]
    return (
        f"the model's hooks differ: {listed(said or ['its hooks'], 3)} (a forward or backward "
        "hook of your code can change what the model computes under the same parameters): "
        "register the same hooks as at save, or fit again"
    )


def _parameter_difference(saved: dict[str, Any], now: dict[str, Any]) -> str:
    t0, t1 = saved["tensors"], now["tensors"]
    items = []
    for name in t0:
        if name not in t1:
            items.append(f"{name} (missing)")
            continue
        a, b = t0[name], t1[name]
        if a == b:
            continue
        if a["shape"] != b["shape"]:
            items.append(f"{name} (shape {b['shape']}, saved {a['shape']})")
        elif a["dtype"] != b["dtype"]:
            items.append(f"{name} (dtype {b['dtype']}, saved {a['dtype']})")
        elif a["trainable"] != b["trainable"]:
            items.append(f"{name} (requires_grad={b['trainable']}, saved {a['trainable']})")
        else:
            items.append(f"{name} (values)")
    items += [f"{name} (not in the saved model)" for name in t1 if name not in t0]
    return f"the model's parameters and buffers differ from the saved ones: {listed(items)}"


# ---------------------------------------------------------------------------- saving
def save(
    path: str | Path,
    settings: Settings,
    method: Method,
    fitted: Fitted,
    *,
    describe: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    data: bool = True,
) -> Path:
    """Commit a fitted Influence to the artifact store at ``path``; return its directory.

    Args:
        path: the store's directory (created when missing).
        settings: the facade's settings.
        method: the fitted method.
        fitted: its record.
        describe: the facade's ``describe()``, kept for reading (default: the method's).
        overwrite: replace a save already in ``path`` (the new one is committed first, then the
            old one removed: a reader sees one or the other, never neither or a mix).
        data: save the training data when it is made of tensors (False: never; loading then
            needs ``train=``).

    Raises:
        ArtifactError: ``path`` holds a save and ``overwrite`` is False, or the model's
            parameters changed since ``fit``.
        UnsupportedError: the method's fitted state (or an option) cannot be saved.
    """
    root = Path(path)
    state = method.state()
    # (the folder is made at the commit: a save refused below, a method's state or an option
    # that cannot be saved included, leaves none)
    if root.exists() and not root.is_dir():  # (refused before the encodes, as it was)
        raise InvalidInputError(f"{root} is a file, not a directory to save the Influence in")
    existing = ArtifactStore(root).committed(KIND) if root.is_dir() else []
    # under torchrun every process holds the same fit, and a script saving from each of them
    # commits one save, the first (the others' are the same artifact: a tester's run left two
    # saves, and every later load warned of them)
    processes = world()[1]
    if existing and not overwrite and processes == 1:
        raise _already_saved(root, existing)
    space, task = fitted.space, fitted.task
    adapters = fitted.adapters_changed_since_fit()
    if adapters is not None:
        raise ArtifactError(
            f"the model's adapters changed since fit: {adapters}. Set them back as they were "
            "at fit (or fit again) before saving"
        )
    changed = fitted.changed_since_fit()
    if changed is not None:
        raise ArtifactError(changed_message(changed, " (or fit again) before saving"))
    owner = f"method {method.name!r}'s fitted state"
    state_writer = _Writer(space.device)
    state_doc = {
        "method": encode(state, state_writer, "state", owner),
        "checks": encode(method.checks, state_writer, "checks", f"method {method.name!r}'s checks"),
        "stationarity": fitted.stationarity,
        "choice": None if settings.choice is None else settings.choice.record(),
    }
    fitted_writer = _Writer(space.device)
    fitted_doc = {
        name: encode(getattr(fitted, name), fitted_writer, name, "the fitted record")
        for name in FITTED_TENSORS
    }
    options_writer = _Writer(space.device, digests=True)
    options_doc = encode(
        _normalised_options(settings.method, settings.method_options),
        options_writer,
        "options",
        f"method {method.name!r}'s options",
        functions=True,
    )
    data_writer = _Writer(space.device)
    data_doc = _data_document(fitted.train, data, data_writer)
    identity = {
        "format": SAVE_FORMAT,
        "infkit": __version__,
        "model": model_fingerprint(task.model),
        "task": task_fingerprint(task),
        "data": data_fingerprint(fitted.train),
        "n_train": fitted.n,
        "dtype": dtype_name(space.dtype),
        "autocast": None if settings.autocast is None else dtype_name(settings.autocast),
        "parameters": list(space.names),
        "method": settings.method,
        "requested": settings.requested,
        "options": options_doc,
        "estimator": settings.estimator,
        "relatif": settings.relatif,
        "l2": settings.l2,
        "damping": settings.damping,
        "auto_damping": settings.auto_damping,
        "batch_size": settings.batch_size,
        "per_example": settings.per_example,
        "memory_limit": settings.memory_limit,
        # (absolute: a relative one was resolved against the loading process's directory, a
        # tester's load from elsewhere made a new folder there)
        "workdir": None if settings.workdir is None else str(Path(settings.workdir).absolute()),
        # each save is an artifact of its own: a new one is committed by one rename; under
        # torchrun the processes' saves of their one fit are one artifact (the same key)
        "save": (
            {"id": uuid.uuid4().hex, "time_ns": time.time_ns()}
            if processes == 1
            else {"processes": processes}
        ),
    }
    store = ArtifactStore(root)
    if existing and not overwrite:  # (a process of a torchrun: its fit saved already?)
        if store.path(KIND, identity) not in existing:
            raise _already_saved(root, existing)
        return store.verify(store.path(KIND, identity), KIND, identity).path
    tensors = {
        name: writer.tensors
        for name, writer in (
            ("state", state_writer),
            ("fitted", fitted_writer),
            ("options", options_writer),
            ("data", data_writer),
        )
        if writer.tensors
    }
    artifact = store.save(
        KIND,
        identity,
        tensors=tensors,
        documents={
            "state": state_doc,
            "fitted": fitted_doc,
            "data": data_doc,
            "model": model_details(task.model),
            "describe": dict(describe or method.describe()),
        },
        info={
            "method": settings.method,
            "estimator": settings.estimator,
            "n_train": fitted.n,
            "n_params": space.size,
            "data_saved": data_doc["saved"],
            # (a load says so where a workdir that was there is not: moved with its save)
            "workdir_made": settings.workdir is not None and Path(settings.workdir).is_dir(),
        },
    )
    for old in existing:
        if old != artifact.path:
            store.remove(old)
    return artifact.path


def _already_saved(root: Path, existing: list[Path]) -> ArtifactError:
    return ArtifactError(
        f"{root} already holds a saved Influence ({existing[0].name}): pass overwrite=True "
        "to replace it, or save to another directory"
    )


def _normalised_options(name: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """The method options with renamed ones under their current names (no warning at load)."""
    cls = method_class(name).Options
    out = {cls.aliases.get(k, k): v for k, v in options.items()}
    for option, renamed in cls.value_aliases.items():
        value = out.get(option)
        if isinstance(value, str) and value in renamed:
            out[option] = renamed[value]
    return out


def _data_document(examples: ExampleSet, wanted: bool, writer: _Writer) -> dict[str, Any]:
    """The training set collated into tensors, or why it is not saved."""
    n = len(examples)
    if not wanted:
        return {"saved": False, "reason": "save(..., data=False) was asked", "n": n}
    inputs, targets = examples.collated()
    try:
        structure = encode(
            {"inputs": inputs, "targets": targets}, writer, "data", "the training set"
        )
    except UnsupportedError as error:
        writer.tensors.clear()
        return {"saved": False, "reason": f"its examples are not all tensors ({error})", "n": n}
    rebuilt = _rebuilt(structure, writer.tensors)
    if rebuilt is None or data_fingerprint(rebuilt) != data_fingerprint(examples):
        writer.tensors.clear()
        return {
            "saved": False,
            "reason": "its collated tensors do not rebuild the same batches (a structure "
            "other than an (X, y) pair, a dict of tensors or a dataset of (x, y) or dicts)",
            "n": n,
        }
    return {"saved": True, "reason": None, "n": n, "structure": structure, "name": examples.name}


def _functions_in(obj: Any, where: str = "") -> list[tuple[str, str]]:
    """(top-level option, identity) of every function recorded in encoded options."""
    if isinstance(obj, list):
        return [f for v in obj for f in _functions_in(v, where)]
    if not isinstance(obj, dict):
        return []
    if "__callable__" in obj:
        return [(where, str(obj["__callable__"]))]
    if "__dict__" in obj:
        found = []
        for k, v in obj["__dict__"]:
            found += _functions_in(v, where or str(k))
        return found
    return _functions_in(obj.get("__tuple__"), where)


def _rebuilt(structure: Any, tensors: Mapping[str, Tensor]) -> ExampleSet | None:
    """The example set of saved training data (None when the structure does not make one)."""
    value = decode(structure, tensors, torch.device("cpu"), "data")
    try:
        return ExampleSet((value["inputs"], value["targets"]), name="training set")
    except InfkitError:
        return None


# ---------------------------------------------------------------------------- loading
class SavedInfluence:
    """A verified saved Influence (:func:`read`), before it is restored on a task.

    Args:
        artifact: the verified artifact.
        requested_path: the path the user gave, for messages.
    """

    def __init__(self, artifact: Artifact, requested_path: Path) -> None:
        self.artifact = artifact
        self.path = artifact.path
        self.requested_path = requested_path
        identity = artifact.identity
        found = identity.get("format")
        if found != SAVE_FORMAT:
            raise ArtifactError(
                f"{self.path} is a saved Influence of layout {found!r} (infkit "
                f"{identity.get('infkit')}); this infkit reads layout {SAVE_FORMAT}: fit and save "
                "it again"
            )
        self.identity = identity
        self._tensors: dict[str, dict[str, Tensor]] = {}
        version = identity.get("infkit")
        if version != __version__:
            # the layout reads the same; the answers are the saved fit's, those of its version
            warn(
                f"{self.path} was saved by infkit {version}, and this is infkit "
                f"{__version__}: its fit is loaded as it was computed then (the layout is "
                "the same), so its answers are that version's. Where the method changed since "
                "(CHANGELOG.md), a fit with this version may differ: fit and save anew to "
                "have this version's",
                Notice,
            )

    # ------------------------------------------------------------------ parts
    def tensors(self, name: str) -> dict[str, Tensor]:
        """The tensors of payload ``name`` (none when it had none)."""
        if name not in self._tensors:
            file = tensors_file(self.path, name)
            self._tensors[name] = self.artifact.tensors(name) if file.exists() else {}
        return self._tensors[name]

    def document(self, name: str) -> Any:
        """The JSON of payload ``name``."""
        return self.artifact.json(name)

    @property
    def method(self) -> str:
        """The fitted method's name."""
        return str(self.identity["method"])

    @property
    def autocast(self) -> torch.dtype | None:
        """The lower precision the fit's passes ran in (``Influence(dtype=...)``), or None."""
        autocast = self.identity.get("autocast")
        return None if autocast is None else getattr(torch, autocast)

    def task_as_fitted(self, task: Task) -> Task:
        """``task`` with the saved run's autocast precision when it names none of its own: the
        precision is a setting of the run (``Influence(dtype=...)``), saved with it, which a
        task built as at fit time does not carry."""
        if task.autocast is None and self.autocast is not None:
            return task.with_autocast(self.autocast)
        return task

    def settings(
        self, functions: Mapping[str, Any] | None = None, *, workdir_given: bool = False
    ) -> Settings:
        """The facade's settings, the method options decoded (``functions``: the callable
        options, given again); a recorded workdir that was there at the save and is not now is
        said (unless ``workdir_given``: the load names another).

        Raises:
            UnsupportedError: the method is not registered in this process.
            InvalidInputError: a function option is missing from ``functions`` or is another.
        """
        ident = self.identity
        if self.method not in registered():
            raise UnsupportedError(
                f"{self.path} holds an Influence fitted with method {self.method!r}, which is not "
                "registered in this process: import the module that defines it before loading "
                f"(registered: {', '.join(sorted(registered()))})"
            )
        given = dict(functions or {})
        needed = dict(_functions_in(ident["options"]))
        missing = [name for name in needed if name not in given]
        if missing:
            shown = ", ".join(f"{name!r} ({needed[name]})" for name in missing)
            keys = ", ".join(f"{name!r}: ..." for name in missing)
            raise InvalidInputError(
                f"the saved Influence's option(s) {shown} are functions, which cannot be saved: "
                f"pass them again, Influence.load(path, task, options={{{keys}}})"
            )
        for name, identity in needed.items():
            found = callable_identity(given[name])
            if found != identity:
                raise InvalidInputError(
                    f"option {name!r} given to load is {found}, but the Influence was fitted with "
                    f"{identity}: pass the same function (its name and code are compared)"
                )

        def function(where: str, identity: str) -> Any:
            return given[where.removeprefix("options.").split(".")[0]]

        options = decode(
            ident["options"], self.tensors("options"), torch.device("cpu"), "options", function
        )
        unknown = sorted(set(given) - set(options))
        if unknown:
            raise InvalidInputError(
                f"options {unknown} given to load were not options of the saved Influence "
                f"(method {self.method!r} was fitted with {sorted(options) or 'none'}); load "
                "takes only its function options again"
            )
        for name in self._check_options(options).unread_of(options):
            del options[name]  # (left unread: they changed nothing, and construction refuses them)
        choice = self.document("state").get("choice")
        workdir = ident.get("workdir")
        made = bool(self.artifact.info.get("workdir_made", True))
        if workdir is not None and made and not workdir_given and not Path(workdir).is_dir():
            # (a tester's save moved with its run's folder: the load made the old folder again
            # and committed there, without a word)
            warn(
                f"{self.requested_path} was saved with the workdir {workdir}, which is not there "
                "now (moved or removed since the save): this load makes it again when it "
                "commits what it computes. Pass Influence.load(..., workdir=PATH) to commit "
                "elsewhere (the folder the workdir moved to), or save with keep_workdir=False "
                "for none",
                Notice,
            )
        return Settings(
            method=self.method,
            requested=str(ident["requested"]),
            estimator=str(ident["estimator"]),
            relatif=str(ident["relatif"]),
            l2=float(ident["l2"]),
            damping=float(ident["damping"]),
            auto_damping=bool(ident["auto_damping"]),
            batch_size=int(ident["batch_size"]),
            per_example=str(ident["per_example"]),
            memory_limit=int(ident["memory_limit"]),
            autocast=self.autocast,
            workdir=None if workdir is None else Path(workdir),
            method_options=options,
            choice=None if choice is None else Choice(**choice),
        )

    def _check_options(self, options: dict[str, Any]) -> Options:
        """The saved method options, parsed; refuse a fit whose options this version refuses
        (a ``cg`` saved with ``tol=1.0``, whose every score was 0), naming the file and the
        remedy rather than reading as an argument given to load. Options the others leave
        unread (``samples`` saved beside ``fisher='ggn'`` before they were refused) are taken."""
        try:
            return method_class(self.method).Options.parse(
                options, f"method {self.method!r}", False
            )
        except InvalidInputError as error:
            raise ArtifactError(
                f"{self.path} was fitted with an option value this version of infkit refuses "
                f"({error}); the answers of such a fit are not to be trusted. Fit it again with "
                "a valid value and save it in a new place"
            ) from error

    # ------------------------------------------------------------------ checks
    def check_task(self, task: Task, examples: ExampleSet | None = None) -> None:
        """Raise ArtifactError naming what differs when ``task`` is not the saved one's (its
        model's architecture or parameter values, its loss or measurement functions). Where
        the architecture differs, a forward pass of ``examples`` is probed first, as fit
        probes one (:func:`~infkit.fitted.probe_forward_writes`): a counter its passes move
        is state, no setting (a fresh process's model holds its initial value)."""
        ident = self.identity
        problems = []

        def fingerprint() -> dict[str, str]:
            # the tensor attributes are compared by name below, and said, not refused: one that
            # a forward pass writes and no pass of this process has yet shown to be so is no mask
            return {k: v for k, v in model_fingerprint(task.model).items() if k != "attributes"}

        found = fingerprint()
        saved = {k: v for k, v in ident["model"].items() if k != "attributes"}
        if examples is not None and found["architecture"] != saved["architecture"]:
            # (a model that cannot take them: the difference says why)
            with contextlib.suppress(Exception):
                probe_forward_writes(PerExample(task, ParameterSpace(task.model)), examples)
            found = fingerprint()
        if found != saved:
            details, now = self.document("model"), model_details(task.model)
            # (a placeholder a forward pass fills is None in a fresh model: its details then show
            # the same architecture)
            architecture = (
                _architecture_difference(details, now)
                if found["architecture"] != saved["architecture"]
                else ""
            )
            if architecture:
                problems.append(architecture)
            elif found["parameters"] != saved["parameters"]:
                problems.append(_parameter_difference(details, now))
            # (saves before the code was recorded have none: it cannot be compared)
            elif "code" in saved and found.get("code") != saved["code"]:
                problems.append(_code_difference(details.get("code", {}), now["code"]))
            elif found.get("held") != saved.get("held"):
                problems.append(_held_difference(details.get("held", {}), now["held"]))
            elif found.get("hooks") != saved.get("hooks"):
                problems.append(_hook_difference(details.get("hooks", {}), now["hooks"]))
        saved_task, task_now = ident["task"], task_fingerprint(task)
        changed = differences(saved_task, task_now)
        ours: list[str] = []
        if changed:
            parts = [
                f"{TASK_PARTS.get(k, k)} (given {task_now.get(k)!r}, saved {saved_task.get(k)!r})"
                for k in changed
            ]
            # (a reviewer's: a save of Task.classification from before its loss was taken in
            # float64 was refused as if another task were given)
            ours = [
                k
                for k in changed
                if str(saved_task.get(k)).split("#")[0] == str(task_now.get(k)).split("#")[0]
                and str(task_now.get(k)).startswith("infkit.")
            ]
            if ours:
                parts.append(
                    f"{listed([repr(TASK_PARTS.get(k, k)) for k in ours])}: infkit's own function "
                    f"of that name changed since the save (infkit {self.identity.get('infkit')} "
                    "then): the same task now computes otherwise"
                )
            problems.append("the task differs: " + "; ".join(parts))
        if not problems:
            self._compare_tensor_attributes(task.model)
        if problems:
            cause = f"{self.requested_path} was saved for another model or task: " + "; ".join(
                problems
            )
            remedy = (
                ". Fit and save anew"
                if ours and len(problems) == 1 and len(ours) == len(changed)
                else ". Load it with the model and task it was fitted with (the same "
                "architecture, code, parameter values, loss and measurement), or fit and save anew"
            )
            raise ArtifactError(cause + remedy, cause=cause)

    def _compare_tensor_attributes(self, model: nn.Module) -> None:
        """Warn when a tensor the model keeps as a plain attribute differs from the saved
        model's of that name: a forward pass may read it (a mask: the loaded answers are then
        the saved model's) or write it (kept activations: nothing is wrong), so it is said,
        not refused; names on one side only are a cache not yet written."""
        saved = self.document("model").get("tensor_attributes", {})
        now = {n: _tensor_details(t, None) for n, t in tensor_attributes(model).items()}
        differ = [n for n in sorted(saved.keys() & now.keys()) if saved[n] != now[n]]
        if differ:
            warn(
                f"the model's tensor attributes {listed(differ)} differ from those of the model "
                f"{self.requested_path} was saved with (they are neither parameters nor buffers, "
                "so no part of its identity): if its forward pass reads them (a mask), the "
                "loaded answers mix the saved model's fit (its curvature) with this model's "
                "gradients, and are neither model's; register them as "
                "buffers (module.register_buffer) to have them checked. If the forward pass "
                "writes them (activations it keeps), nothing is wrong",
                UserWarning,
            )

    def examples(self, train: Any) -> ExampleSet:
        """The training set: ``train`` (checked against the saved fingerprint) or the saved copy.

        Raises:
            ArtifactError: ``train`` is not the saved training data, or it is None and the
                data was not saved.
        """
        data_doc = self.document("data")
        saved_fp, n = self.identity["data"], int(self.identity["n_train"])
        if train is None:
            if not data_doc.get("saved"):
                raise ArtifactError(
                    f"{self.requested_path} holds no copy of its training data "
                    f"({data_doc.get('reason')}): pass it again, Influence.load(path, task, "
                    f"train=...), the same {n} examples in the same order (their content is "
                    "checked)"
                )
            examples = _rebuilt(data_doc["structure"], self.tensors("data"))
            if examples is None:
                raise ArtifactError(f"{self.path}: the saved training data cannot be rebuilt")
            examples.name = str(data_doc.get("name") or "training set")
            # its content is the saved one (checksummed): the fingerprint need not be recomputed
            examples._fingerprint = saved_fp  # type: ignore[attr-defined]
        else:
            examples = ExampleSet(train, name="training set")
            found = data_fingerprint(examples)
            if found != saved_fp:
                kinds = None if len(examples) != n else self._kinds_differ(examples, data_doc)
                size = (
                    f"{len(examples)} examples given, {n} saved"
                    if len(examples) != n
                    else f"the same values in other dtypes or shapes, {kinds}: convert them as "
                    "they were at fit"
                    if kinds
                    else f"the same number of examples ({n}) but other content or order (a "
                    "tensor's dtype and shape count: int32 labels are not int64 ones)"
                )
                keep = ", or leave train out to use the saved copy" if data_doc.get("saved") else ""
                differs = (
                    f"differs from the data {self.requested_path} was fitted on ({size}; "
                    f"content fingerprint {found}, saved {saved_fp})"
                )
                raise ArtifactError(
                    f"the training data given as train= {differs}: pass the same examples in "
                    f"the same order{keep}",
                    cause=f"the training data {differs}",
                )
        examples._checked = True  # checked at fit
        return examples

    def _kinds_differ(self, given: ExampleSet, data_doc: dict[str, Any]) -> str | None:
        """Where the saved copy of the training data is there, how the given set's tensors
        differ from it in dtype or shape alone, their values the same (a tester's int32 labels,
        which fit takes as the int64 ones, read as "other content or order"); else None."""
        if not data_doc.get("saved"):
            return None
        saved = _rebuilt(data_doc["structure"], self.tensors("data"))
        if saved is None or len(saved) != len(given):
            return None
        ours, theirs = given.take(range(len(given))), saved.take(range(len(saved)))
        told = []
        for what, a, b in (
            ("inputs", ours.inputs, theirs.inputs),
            ("labels", ours.targets, theirs.targets),
        ):
            mine, kept = leaves(a), leaves(b)
            if len(mine) != len(kept):
                return None
            for x, z in zip(mine, kept, strict=True):
                if (x.dtype, x.shape) == (z.dtype, z.shape):
                    continue
                if x.numel() != z.numel() or not torch.equal(
                    x.reshape(-1).to(torch.float64), z.reshape(-1).to(torch.float64)
                ):
                    return None
                told.append(
                    f"{what} {dtype_name(x.dtype)} {list(x.shape)} given, "
                    f"{dtype_name(z.dtype)} {list(z.shape)} saved"
                )
        return "; ".join(told) or None

    # ------------------------------------------------------------------ restoring
    def restore(
        self,
        method: Method,
        task: Task,
        examples: ExampleSet,
        *,
        progress: Mode,
        memory_limit: int,
        workdir: Path | None,
    ) -> Fitted:
        """The fitted record rebuilt on ``task``, with ``method`` restored on it (no pass over the
        data, no fit).

        Args:
            method: the unfitted method, created with the saved options.
            task: the task (checked by :meth:`check_task`).
            examples: the training set (:meth:`examples`).
            progress: how progress is shown.
            memory_limit: bytes dense objects may take.
            workdir: the resumable run's directory, or None.
        """
        ident = self.identity
        space = ParameterSpace(task.model, list(ident["parameters"]))
        engine = PerExample(task, space, ident["per_example"])
        device = space.device
        saved_limit = int(ident["memory_limit"])
        probed = memory_limit < saved_limit  # (the saved limit held at fit)
        if probed:
            self._check_memory(method, engine, examples, memory_limit, saved_limit)
        # the [N, P] gradient cache is read when it fits this memory_limit (as fit decides);
        # otherwise it stays on disk and the gradients are computed again batch by batch
        fits = gradient_cache_fits(
            len(examples), space.size, space.dtype, memory_limit, int(ident["batch_size"])
        )
        document = dict(self.document("fitted"))
        skip: set[str] = set()
        cache = document.get("train_gradients")
        if not fits and isinstance(cache, dict) and "__tensor__" in cache:
            skip.add(cache["__tensor__"])
            document["train_gradients"] = None
        tensors = self.artifact.tensors("fitted", skip) if skip else self.tensors("fitted")
        values: dict[str, Any] = {
            name: decode(value, tensors, device, name) for name, value in document.items()
        }
        state_doc = self.document("state")
        # as fit does: the attributes a forward pass writes are no part of the fitted state's
        # check (a kept activation refused the loaded fit's second answer); a model without
        # tensor attributes is not run here (nor again after the memory check's probe)
        if attribute_objects(task.model) and not probed:
            probe_forward_writes(engine, examples)
        fitted = Fitted(
            task=task,
            space=space,
            engine=engine,
            train=examples,
            theta=values["theta"],
            l2=float(ident["l2"]),
            damping=float(ident["damping"]),
            batch_size=int(ident["batch_size"]),
            progress=progress,
            memory_limit=memory_limit,
            train_gradients=values["train_gradients"],
            anchor=values["anchor"],
            objective_gradient=values["objective_gradient"],
            stationarity=state_doc["stationarity"],
            workdir=workdir,
        )
        tensors = self.tensors("state")
        state = decode(state_doc["method"], tensors, device, "state")
        try:
            method.restore(fitted, state)
        except KeyError as error:
            raise ArtifactError(
                f"{self.path}: the saved state of method {method.name!r} has no {error}; it was "
                f"saved by infkit {ident.get('infkit')} with another version of the method. Fit "
                "and save it again"
            ) from error
        method.checks = decode(state_doc["checks"], tensors, device, "checks")
        return fitted

    def _check_memory(
        self,
        method: Method,
        engine: PerExample,
        examples: ExampleSet,
        memory_limit: int,
        saved_limit: int,
    ) -> None:
        """Refuse a ``memory_limit`` below the saved one that a fresh fit would refuse
        (:meth:`~infkit.methods.base.Method.check_memory`): a tester's ``exact`` save loaded
        at a fifth of its curvature's bytes answered, holding them. Its probe of example 0
        (:func:`~infkit.fitted.probe_forward_writes`, for the outputs' size) is the one a
        restore notes the forward pass's writes by."""
        c = probe_forward_writes(engine, examples)[0].numel()
        space = engine.space
        problem = Problem(len(examples), space.size, c, memory_limit, engine.task.model, space)
        try:
            method.check_memory(problem)
        except ProblemTooLargeError as error:
            # (not "a fresh fit refuses": method="auto" would choose another that fits, a
            # reviewer's; the saved method's own objects do not fit, as its fit would be refused)
            raise ProblemTooLargeError(
                f"{self.path} loaded with memory_limit={memory_limit} "
                f"({human_bytes(memory_limit)}), below the {human_bytes(saved_limit)} it was "
                f"fitted under: the saved method {method.name!r} does not hold within it, as its "
                f"fit would be refused there ({error}). Load with memory_limit=None (the saved "
                "limit) or a limit that holds it; the advice in brackets is for a new fit"
            ) from error


#: how many times :func:`read_again_if_replaced` reads a save another process replaces meanwhile
READ_ATTEMPTS = 3

_T = TypeVar("_T")


def read_again_if_replaced(path: str | Path, reading: Callable[[], _T]) -> _T:
    """``reading()`` of the save in the directory ``path``, once more (up to
    :data:`READ_ATTEMPTS` in all) where it failed because another process's ``overwrite=True``
    replaced the save meanwhile (it commits the new save, then removes the old one): "a reader
    at any moment finds the old save or the new one" (a tester's concurrent loads failed 24
    times in 82, the messages calling the save damaged). A failure with the saves unchanged (a
    damaged file), or of a save named by its own directory, is raised at once."""
    for attempt in range(READ_ATTEMPTS):
        before = _committed_saves(path)
        try:
            return reading()
        except (ArtifactError, OSError, RuntimeError):
            replaced = bool(before) and _committed_saves(path) != before
            if not replaced or attempt + 1 == READ_ATTEMPTS:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def _committed_saves(path: str | Path) -> list[str]:
    """The names of the saved Influences committed in the directory ``path`` (empty for an
    artifact directory itself, or a path that is none): what a concurrent overwrite changes."""
    given = Path(path)
    if not given.is_dir() or (given / MANIFEST).exists():
        return []
    try:
        return sorted(p.name for p in ArtifactStore(given).committed(KIND))
    except OSError:  # (listed while another process removes a save)
        return []


def read(path: str | Path) -> SavedInfluence:
    """The saved Influence at ``path`` (the directory given to ``save``, or the artifact
    directory it returned), verified: manifest, kind and every checksum.

    Raises:
        ArtifactError: ``path`` holds no saved Influence, or it is damaged.
    """
    given = Path(path)
    if not given.is_dir():
        state = "is a file" if given.exists() else "does not exist"
        raise ArtifactError(
            f"{given} {state}: it is not a saved Influence. Save one with inf.save(path) and "
            "load that directory"
        )
    # a saved Influence is not recomputed by loading it: what to do when it is damaged
    remedy = (
        "The saved Influence cannot be used: save it again from the fitted Influence "
        f"(inf.save({str(given)!r}, overwrite=True)), or fit again"
    )
    if (given / MANIFEST).exists():  # the artifact directory itself
        artifact = ArtifactStore(given.parent).verify(given, KIND, remedy=remedy)
        return SavedInfluence(artifact, given)
    store = ArtifactStore(given)
    candidates = store.committed(KIND)
    if not candidates:
        others = sorted({p.name.rsplit("-", 1)[0] for p in store if p.is_dir()})
        found = f" (it holds: {', '.join(others)})" if others else ""
        raise ArtifactError(
            f"{given} holds no saved Influence: no {KIND}-* artifact in it{found}. Save one with "
            "inf.save(path) and load that directory"
        )
    newest = max(candidates, key=_saved_at)  # an interrupted overwrite: the new save
    older = [p for p in candidates if p != newest]
    if older:  # (an overwrite interrupted between its two steps, or saves copied in)
        shown = listed([f"{p.name} ({_saved_when(p)})" for p in older], 3)
        warn(
            f"{given} holds {len(candidates)} saved Influences: loading the newest, "
            f"{newest.name} ({_saved_when(newest)}); also there: {shown}. To load another, "
            f"give its own directory (Influence.load({str(older[0])!r}, task)); delete the "
            "saves you do not want (an overwrite=True save interrupted between writing the new "
            "save and removing the old one leaves both)",
            UserWarning,
        )
    return SavedInfluence(store.verify(newest, KIND, remedy=remedy), given)


def _saved_when(path: Path) -> str:
    """When the save at ``path`` was written, as a message says it (UTC), or that it is not
    known (a save without its time, or one whose manifest does not read)."""
    stamp = _saved_at(path)[0]
    if stamp < 0:
        return "saved at an unknown time"
    moment = datetime.datetime.fromtimestamp(stamp / 1e9, tz=datetime.timezone.utc)
    return f"saved {moment:%Y-%m-%d %H:%M:%S} UTC"


def _saved_at(path: Path) -> tuple[int, str]:
    try:
        manifest = load_json(path / MANIFEST)
        stamp = int(manifest["identity"]["save"]["time_ns"])
    except (ArtifactError, KeyError, TypeError, ValueError):
        stamp = -1
    return stamp, path.name
