"""Fingerprints: short hashes of what a result depends on, for the identity of artifacts.

* :func:`model_fingerprint`: the architecture (module classes and their configuration) and
  every parameter, buffer and tensor attribute (names, shapes, dtypes, trainability and
  values), those of modules held outside the module tree, and the hooks of the user's code;
* :func:`data_fingerprint`: the full content of an example set, inputs and targets, in order;
* :func:`callable_identity` and :func:`task_fingerprint`: which loss, measurement and output
  functions a task uses (their qualified name and the hash of their code, so two lambdas or two
  versions of a function differ).

Hashes are SHA-256 over the raw bytes of contiguous CPU copies, so they do not depend on the
device or on memory layout, and any changed value changes them (docs/architecture.md §7).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import dis
import enum
import functools
import hashlib
import inspect
import itertools
import os
import re
import site
import sys
import sysconfig
import types
import weakref
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from infkit.data import ExampleSet
from infkit.parameters import dtype_name
from infkit.task import Task

#: examples hashed per batch
BATCH = 4096


def stable_repr(value: Any) -> str:
    """``repr`` without memory addresses (``<object at 0x7f...>``), stable across processes."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))


def _tensor(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)};".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def _structure(h: Any, obj: Any) -> None:
    """Hash a nested structure of tensors, dicts, lists and plain values, keys sorted."""
    if isinstance(obj, Tensor):
        _tensor(h, obj)
    elif isinstance(obj, Mapping):
        for key in sorted(obj, key=str):
            h.update(f"<{key}>".encode())
            _structure(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"[{len(obj)}".encode())
        for item in obj:
            _structure(h, item)
    elif isinstance(obj, (str, torch.device)):  # (a device's index aside: canonical_text)
        h.update(canonical_text(obj).encode())
    else:
        h.update(stable_repr(obj).encode())


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    """``{"architecture": ..., "parameters": ...}``: hashes of the module tree and its state;
    ``"code"``, of the code of its module classes outside PyTorch (:func:`code_identities`),
    where it has any; ``"attributes"``, of its tensor attributes (:func:`tensor_attributes`),
    ``"held"``, of the tensors of modules it holds unregistered (:func:`held_module_tensors`),
    and ``"hooks"``, of the hooks of the user's code on its modules (:func:`user_hooks`), each
    where it has any (so the identities of models without them are those of earlier versions).

    The architecture counts each module's class and its plain attributes (numbers, strings and
    their lists and dicts, and those a settings object it holds keeps: :func:`plain_attributes`),
    which set what the module computes where no parameter does: a LoRA layer's ``scaling``
    (``lora_alpha / r``), an attention's number of heads, a configuration's logit cap."""
    arch = hashlib.sha256(stable_repr(model).encode())
    seen: set[int] = set()
    written, reads = frozenset(_WRITTEN.get(model, ())), names_read(model)
    for name, module in model.named_modules():
        arch.update(f"{name}:{type(module).__module__}.{type(module).__qualname__};".encode())
        _structure(arch, plain_attributes(module, seen, written, name, reads))
    state = hashlib.sha256()
    for name, p in model.named_parameters():
        state.update(f"{name}:{p.requires_grad};".encode())
        _tensor(state, p)
    for name, b in model.named_buffers():
        state.update(f"{name};".encode())
        _tensor(state, b)
    found = {"architecture": arch.hexdigest()[:32], "parameters": state.hexdigest()[:32]}
    code = code_identities(model)
    if code:
        found["code"] = hashlib.sha256(stable_repr(sorted(code.items())).encode()).hexdigest()[:32]
    for key, tensors in (
        ("attributes", tensor_attributes(model)),
        ("held", held_module_tensors(model)),
    ):
        if tensors:
            kept = hashlib.sha256()
            for name in sorted(tensors):
                kept.update(f"{name};".encode())
                _tensor(kept, tensors[name])
            found[key] = kept.hexdigest()[:32]
    hooks = user_hooks(model)
    if hooks:
        found["hooks"] = hashlib.sha256(stable_repr(sorted(hooks.items())).encode()).hexdigest()[
            :32
        ]
    return found


#: the hooks a module runs around its forward and backward passes, by the attribute that holds
#: them (torch.nn.Module's)
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def user_hooks(model: nn.Module) -> dict[str, str]:
    """The hooks of the user's own code registered on ``model``'s modules, by
    ``module name:kind[position]`` (numbered among the user's own), as :func:`hook_identity`
    reads them: a forward hook that scales an output (``lambda m, i, o: o * 0.5``) changes what
    the model computes under the same parameters. Hooks of installed packages, of the packages
    in :data:`_HOOK_LIBRARIES` wherever installed from, and of infkit are left out:
    transformers installs its output-capturing hooks at a pass asking for hidden states
    (present in one process, not yet in another), infkit its own while it runs, and PyTorch's
    (``weight_norm``'s) go with parameters the fingerprint counts."""
    found: dict[str, str] = {}
    for name, module in model.named_modules():
        for kind in _HOOK_DICTS:
            # numbered among the user's own hooks of that kind (a library's installed before
            # one of the user's, as transformers does at a first pass, moves no number)
            own = [h for h in getattr(module, kind, {}).values() if _is_users_callable(h)]
            for position, hook in enumerate(own):
                found[f"{name or '(root)'}:{kind.strip('_')}[{position}]"] = hook_identity(hook)
    return found


def _held_text(obj: Any, assigned: frozenset[str], plain: bool) -> str:
    """The values ``obj`` holds that its call never assigns (``assigned``), as text (empty
    when none): :func:`_value_text`'s; ``plain`` numbers and strings too
    (:func:`callable_identity` reads a callable object's plain values itself)."""
    parts = []
    for key, value in sorted((getattr(obj, "__dict__", None) or {}).items()):
        if key in assigned or (not plain and _is_plain(value) and not _empty_container(value)):
            continue
        text = _value_text(value, assigned)
        if text is not None:
            parts.append(f"{key}={text}")
    return ";".join(parts)


def _assigned_by(function: Any) -> frozenset[str]:
    """The attribute names a call of ``function`` (a method, with its wrapped bodies and nested
    code) assigns, on whatever object (``self.last = ...``, ``self.state.last = ...``): what
    the object records as it runs. A setter that another method is (``to()``,
    ``set_alpha()``) sets a setting, read."""
    functions = _functions_of(function) if isinstance(function, types.FunctionType) else []
    return frozenset(_attributes_used(functions)[1])


def _value_text(value: Any, assigned: frozenset[str], depth: int = 0) -> str | None:
    """One held value as :func:`_held_text` reads it, or None (not read: a module, a tensor of
    a computation, another library's object): a tensor or NumPy array by its values, a
    settings object by its attributes that the call does not assign (two objects deep, each
    object once), a tuple by its items, a list, dict or set of anything but plain values by its
    type (what the object appends to: a log), a function by its name."""
    if isinstance(value, Tensor):
        return f"tensor({tensor_digest(value)})" if _holds_values(value) else None
    if isinstance(value, np.ndarray) and value.dtype != object:
        return canonical_text(value)
    if _is_plain(value) and not _empty_container(value):
        return ordered_repr(value)
    if isinstance(value, (list, dict, set)):  # (of tensors or objects: what it logs, appended)
        return f"<{type(value).__name__}>"
    if isinstance(value, tuple) and depth < 2:
        return "(" + ",".join(str(_value_text(v, assigned, depth + 1)) for v in value) + ")"
    if isinstance(value, (types.FunctionType, functools.partial)):
        inner = value.func if isinstance(value, functools.partial) else value
        return f"{getattr(inner, '__module__', '?')}.{getattr(inner, '__qualname__', '?')}"
    if _is_settings(value) and depth < 2:
        held = getattr(value, "__dict__", None) or {}
        fields = [
            f"{k}={_value_text(v, assigned, depth + 1)}"
            for k, v in sorted(held.items())
            if k not in assigned and not isinstance(v, nn.Module)
        ]
        return f"{type(value).__qualname__}({','.join(fields)})"
    return None


def hook_identity(hook: Any) -> str:
    """What a hook computes, the same in every process and after every pass:
    :func:`callable_identity` read as a hook's (:data:`_AS_HOOK`): its code, the helpers it
    calls and the module-level values it reads, the settings its closure and its object hold,
    and not what it records: a closure cell its code assigns (``nonlocal calls; calls += 1``),
    an attribute its call assigns (``self.last = o``), and the lists, dicts and sets it holds
    or reads (a log of activations), read by their type; a tensor by its values where it holds
    values (an ablation mask, a steering vector), by its type where it is a piece of a
    computation; another object by its type (a recorder). A hook that watches the model is the
    same hook after each pass."""
    token = _AS_HOOK.set(True)
    try:
        return str(callable_identity(hook))
    finally:
        _AS_HOOK.reset(token)


#: while set, :func:`callable_identity` reads a hook (:func:`hook_identity`)
_AS_HOOK: contextvars.ContextVar[bool] = contextvars.ContextVar("as_hook", default=False)


def _empty_container(value: Any) -> bool:
    """An empty list, dict or set: a log not yet written (read by type, as a full one of
    tensors is), not a setting."""
    return isinstance(value, (list, dict, set)) and not value


@functools.lru_cache(maxsize=4096)  # (code objects are immutable)
def _cells_assigned(code: Any) -> frozenset[str]:
    """The closure cells ``code`` assigns (``nonlocal calls; calls += 1``)."""
    return frozenset(
        str(i.argval) for i in dis.get_instructions(code) if i.opname in ("STORE_DEREF",)
    )


def _kept_by_type(value: Any) -> bool:
    """Whether a hook's (:data:`_AS_HOOK`) ``value`` is read by its type alone: a list, dict,
    set or bytearray (what it records), or an object that is no plain value, tensor, function
    or settings structure."""
    if not _AS_HOOK.get():
        return False
    if isinstance(value, (list, dict, set, bytearray)):
        return True
    if isinstance(value, (Tensor, functools.partial, types.FunctionType)) or _is_plain(value):
        return False
    return not (isinstance(value, tuple) and _is_structure(value))


#: the packages whose hooks are theirs wherever they are installed from (a source checkout is
#: outside site-packages): they install and remove hooks of their own as a model runs
_HOOK_LIBRARIES = frozenset(
    {"transformers", "peft", "accelerate", "deepspeed", "bitsandbytes", "optimum", "diffusers",
     "timm", "torchvision", "lightning", "pytorch_lightning", "captum", "kronfluence", "traker",
     "dattri", "trak"}
)  # fmt: skip


def _is_users_callable(fn: Any) -> bool:
    """Whether ``fn`` (a function, a bound method, a partial, a callable object) is the user's
    own code (:func:`_is_user_code`)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    target = getattr(fn, "__func__", fn)
    code = getattr(target, "__code__", None)
    module: str | None = getattr(target, "__module__", None)
    if code is None:  # a callable object: its class's __call__
        call = _class_call(type(target))
        code = getattr(call, "__code__", None)
        module = type(target).__module__
    if module is not None and module.split(".")[0] in _HOOK_LIBRARIES:
        return False
    return code is not None and _is_user_code(module, code.co_filename)


def _class_call(cls: type) -> Any:
    """The ``__call__`` a callable object of class ``cls`` runs (the first in its MRO), or
    None."""
    return next((vars(k)["__call__"] for k in cls.__mro__ if "__call__" in vars(k)), None)


def held_module_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The parameters and buffers of modules that ``model``'s modules hold without registering
    them (``self.frozen = [backbone]``, a dict or tuple of modules, or one set past
    ``nn.Module.__setattr__``), by dotted name (``frozen[0].weight``): their forward passes
    read them, though ``named_parameters`` does not list them."""
    registered = {id(m) for m in model.modules()}
    found: dict[str, Tensor] = {}
    for where, held in _held_modules(model):
        if id(held) in registered:
            continue
        for name, t in itertools.chain(held.named_parameters(), held.named_buffers()):
            found[f"{where}.{name}"] = t
    return found


def _held_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """The modules ``model``'s modules hold in their public attributes, directly or in lists,
    tuples and dicts two deep (:func:`_modules_in`), by dotted place; registered ones too."""
    for prefix, module in model.named_modules():
        for key, value in vars(module).items():
            if not key.startswith("_"):
                yield from _modules_in(value, _dotted(prefix, key), 2)


def _modules_in(value: Any, where: str, levels: int) -> list[tuple[str, nn.Module]]:
    """The modules ``value`` is or holds in lists, tuples and dicts, ``levels`` deep (a dict
    of lists of modules: ``parts['enc'][0]``), by their place."""
    if isinstance(value, nn.Module):
        return [(where, value)]
    if levels == 0:
        return []
    if isinstance(value, (list, tuple)):
        items: list[tuple[str, Any]] = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    elif isinstance(value, dict):
        items = [(f"{where}[{k!r}]", v) for k, v in value.items()]
    else:
        return []
    return [found for place, item in items for found in _modules_in(item, place, levels - 1)]


def holds_module(outer: nn.Module, inner: nn.Module) -> bool:
    """Whether ``outer`` is ``inner``, has it among its modules, or holds it outside the
    module tree (:func:`held_module_tensors`' places)."""
    if any(module is inner for module in outer.modules()):
        return True
    return any(held is inner for _, held in _held_modules(outer))


#: modules whose classes' code :func:`code_identities` leaves out: PyTorch's own (its modules'
#: computation is their class and settings) and infkit's
_LIBRARY_CODE = ("torch.", "infkit.")


def code_identities(model: nn.Module) -> dict[str, str]:
    """What the code of each module class of ``model`` computes, by ``module.qualname``: the
    :func:`callable_identity` of every function the class and its bases (up to PyTorch's)
    define (methods, properties, the bodies decorators wrap), with their signatures' shape, its
    ``forward`` among them, so the code, the module-level values it reads (``logits /
    TEMPERATURE``) and the helpers of its own module it calls; and the class constants that
    code reads and never writes (``self.SCALE``, immutable values only: a counter the forward
    pass increments, ``Net.calls += 1``, or a registry list it appends to is state, not code).
    An edit of a model's code under the same parameters is another model: a saved fit,
    factors or retrainings of the old code are not reused. The helpers and values of the
    user's other modules that the code reads (``helpers.act``, ``from helpers import act``) count
    too; those of installed packages do not. Not seen: functions kept on the instance (a lambda
    set in ``__init__``). PyTorch's and infkit's classes are left out (their computation is
    their class and settings, in the architecture)."""
    found: dict[str, str] = {}
    for module in model.modules():
        cls = type(module)
        name = f"{cls.__module__}.{cls.__qualname__}"
        if name in found or cls.__module__.startswith(_LIBRARY_CODE):
            continue
        h = hashlib.sha256()
        own = [
            k for k in cls.__mro__ if not k.__module__.startswith(_LIBRARY_CODE) and k is not object
        ]
        functions = {
            (klass.__qualname__, key): _functions_of(value)
            for klass in own
            for key, value in sorted(vars(klass).items())
        }
        read, written = _attributes_used([f for fs in functions.values() for f in fs])
        for klass in own:
            for key, value in sorted(vars(klass).items()):
                where = f"{klass.__qualname__}.{key}="
                if _is_constant(value):
                    if key in read and key not in written:  # a class constant (self.SCALE)
                        h.update(where.encode())
                        _structure(h, value)
                    continue
                for function in functions[(klass.__qualname__, key)]:
                    code = function.__code__
                    shape = (code.co_argcount, code.co_kwonlyargcount, code.co_flags)
                    h.update(f"{where}{callable_identity(function)}{shape};".encode())
        found[name] = h.hexdigest()[:16]
    return found


def _is_constant(value: Any) -> bool:
    """An immutable plain value: a number, a string, None, or a tuple of them."""
    if isinstance(value, tuple):
        return all(_is_constant(v) for v in value)
    return isinstance(value, _PLAIN)


def _attributes_used(functions: list[types.FunctionType]) -> tuple[set[str], set[str]]:
    """The attribute names ``functions`` read (``self.SCALE``) and those they write or delete
    (``Net.calls += 1``), their nested code included."""
    read: set[str] = set()
    written: set[str] = set()
    for function in functions:
        loads, stores = _attribute_names(function.__code__)
        read |= loads
        written |= stores
    return read, written


@functools.lru_cache(maxsize=4096)  # (code objects are immutable)
def _attribute_names(code: Any) -> tuple[frozenset[str], frozenset[str]]:
    loads: set[str] = set()
    stores: set[str] = set()
    for ins in dis.get_instructions(code):
        if ins.opname in ("LOAD_ATTR", "LOAD_METHOD"):
            loads.add(str(ins.argval))
        elif ins.opname in ("STORE_ATTR", "DELETE_ATTR"):
            stores.add(str(ins.argval))
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            inner_loads, inner_stores = _attribute_names(const)
            loads |= inner_loads
            stores |= inner_stores
    return frozenset(loads), frozenset(stores)


def _functions_of(value: Any) -> list[types.FunctionType]:
    """The Python functions a class attribute runs: a method, a static or class method's
    function, a property's getter, setter and deleter, each with the functions it wraps
    (``functools.wraps``'s ``__wrapped__``: a decorated ``forward``'s own body)."""
    if isinstance(value, (staticmethod, classmethod)):
        value = value.__func__
    candidates = [value.fget, value.fset, value.fdel] if isinstance(value, property) else [value]
    found = []
    for function in candidates:
        seen = 0
        while isinstance(function, types.FunctionType) and seen < 8:  # (a chain of wrappers)
            found.append(function)
            function, seen = getattr(function, "__wrapped__", None), seen + 1
    return found


#: the tensor attributes, plain attributes and settings a forward pass of the model was seen to
#: write, by model and dotted name (:func:`note_forward_writes`): the activations it keeps, a
#: counter it moves, a size it notes, which identify nothing
_WRITTEN: weakref.WeakKeyDictionary[nn.Module, set[str]] = weakref.WeakKeyDictionary()


def attribute_objects(model: nn.Module) -> dict[str, Tensor]:
    """Each tensor attribute of ``model`` (all of them, before :func:`note_forward_writes`
    leaves any out), by name: held, so that a tensor put in place since is told by identity
    (an ``id`` alone may be a freed tensor's, reused: a reviewer saw 7 probes in 20 miss)."""
    return dict(_value_attributes(model))


def module_classes(model: nn.Module) -> dict[str, str]:
    """Each module's class by name (``""`` the model's own): a module replaced by one of
    another class, which a parameter-free one (an activation) changes nothing else of."""
    return {name: type(module).__qualname__ for name, module in model.named_modules()}


def settings_values(model: nn.Module) -> dict[str, str]:
    """Each plain attribute and setting of ``model``'s modules (:func:`plain_attributes`, none
    left out), by dotted name (``cfg.scale``, ``layers.0.calls``), as text: what
    :func:`note_forward_writes` compares after a pass."""
    seen: set[int] = set()
    reads = names_read(model)
    return {
        _dotted(prefix, key): ordered_repr(value)
        for prefix, module in model.named_modules()
        for key, value in plain_attributes(module, seen, frozenset(), prefix, reads).items()
    }


#: what :func:`forward_snapshot` takes: the tensor attributes (by object) and the settings (as
#: text), by dotted name
Snapshot = tuple[dict[str, Tensor], dict[str, str]]


def forward_snapshot(model: nn.Module) -> Snapshot:
    """The model's tensor attributes (:func:`attribute_objects`) and settings
    (:func:`settings_values`) as they are now, for :func:`note_forward_writes` after a pass."""
    return attribute_objects(model), settings_values(model)


def note_forward_writes(model: nn.Module, before: Snapshot) -> None:
    """Record what the forward passes run since the snapshot ``before`` wrote: tensor
    attributes put in place (new names or other tensor objects: a cache of what the pass
    computed, ``self.last = h.detach()``), and plain attributes and settings whose values they
    changed (a counter, ``self.stats.calls += 1``, wherever the pass moves it: a method it
    calls, a child's pass, a helper of another module, ``setattr``; a size it notes). They are
    state, no part of the model's identity (:func:`tensor_attributes`,
    :func:`plain_attributes`) from then on. Taken after a first pass (the probe's: ``fit``,
    ``load`` where the identity differs, the retrainings' cache and the plan probe one), so a
    value a first pass fills and none changes later (``if cfg.scale is None: cfg.scale = ...``)
    is a setting, the same in every process whatever ran before."""
    tensors, settings = before
    now = _value_attributes(model)
    written = {name for name, t in now.items() if tensors.get(name) is not t}
    after = settings_values(model)
    written.update(changed_keys(settings, after))
    if written:
        _WRITTEN.setdefault(model, set()).update(written)


def changed_keys(before: Mapping[str, Any], after: Mapping[str, Any]) -> list[str]:
    """The keys, sorted, whose values differ between two flat records of one model (or that
    one of them lacks): what changed between a snapshot and now."""
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


def _dotted(prefix: str, key: str) -> str:
    """The dotted name of attribute ``key`` of the module named ``prefix`` ("" the root)."""
    return f"{prefix}.{key}" if prefix else key


def forward_written(model: nn.Module) -> list[str]:
    """The attributes a forward pass of ``model`` was seen to write
    (:func:`note_forward_writes`), by dotted name, sorted."""
    return sorted(_WRITTEN.get(model, set()))


def tensor_attributes(model: nn.Module) -> dict[str, Tensor]:
    """The tensors modules keep as plain public attributes (``self.mask = torch.ones(d)``,
    neither parameter nor buffer), by dotted name, that hold values: not a piece of a
    computation (a tensor that requires grad or has a graph, as legacy ``weight_norm``'s
    ``weight`` recomputed from the parameters), nor one captured inside torch.func's transforms,
    nor one without data (meta), nor one a forward pass was seen to write
    (:func:`note_forward_writes`: ``fit`` and the retrainings probe a pass first).

    A forward pass may read them as it reads a buffer, so they are part of the model's
    identity (:func:`model_fingerprint`) and of the fitted state's check for changes."""
    written = _WRITTEN.get(model, set())
    return {n: t for n, t in _value_attributes(model).items() if n not in written}


def _value_attributes(model: nn.Module) -> dict[str, Tensor]:
    found: dict[str, Tensor] = {}
    for prefix, module in model.named_modules():
        for key, value in vars(module).items():
            if isinstance(value, Tensor) and not key.startswith("_") and _holds_values(value):
                found[_dotted(prefix, key)] = value
    return found


def _holds_values(t: Tensor) -> bool:
    """Whether ``t`` is a plain tensor of values (:func:`tensor_attributes`)."""
    if t.requires_grad or t.grad_fn is not None or t.is_meta:
        return False
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return not (wrapped is not None and wrapped(t))


#: plain values: what :func:`plain_attributes` and the values a function reads are hashed as
_PLAIN = (bool, int, float, complex, str, bytes, type(None))


def _is_plain(value: Any) -> bool:
    """A number, string or None, or a list, tuple or dict of them (two levels deep)."""
    return _nested(value, _PLAIN, 2)


def _nested(value: Any, leaves: tuple[type, ...], levels: int) -> bool:
    """Whether ``value`` is one of ``leaves``, or a list, tuple or dict (of string keys) of
    them, ``levels`` of containers deep at most."""
    if isinstance(value, leaves):
        return True
    if levels <= 0:
        return False
    if isinstance(value, (list, tuple)):
        return all(_nested(v, leaves, levels - 1) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _nested(v, leaves, levels - 1) for k, v in value.items())
    return False


#: plain attributes that do not change what a module computes: the mode the passes set, where a
#: Hugging Face model was loaded from, whether its backward recomputes activations; and in a
#: settings object, the library version that wrote a Hugging Face configuration, whether its
#: model keeps a cache for generation, and the loss kind its classifier writes there at its
#: first call with labels (infkit's task takes the loss)
UNCOMPUTED_ATTRIBUTES = frozenset(
    {
        "training",
        "name_or_path",
        "gradient_checkpointing",
        "transformers_version",
        "use_cache",
        "problem_type",
    }
)

#: what a Hugging Face configuration records of its model and not of what it computes: the
#: model's classes, type and dtype (its class and its parameters' dtype are in the identity),
#: which ``from_pretrained`` and ``.to(dtype)`` write there (a model saved with
#: ``save_pretrained`` and loaded again was refused for ``config.dtype``, ``model_type``); and
#: what it asks the model to return beside its outputs (features taken with
#: ``output_hidden_states=True`` refused every answer after)
CONFIGURATION_RECORDS = frozenset(
    {
        "architectures",
        "dtype",
        "model_type",
        "torch_dtype",
        "output_attentions",
        "output_hidden_states",
    }
)


def plain_attributes(
    module: nn.Module,
    seen: set[int] | None = None,
    written: frozenset[str] = frozenset(),
    prefix: str = "",
    reads: frozenset[str] | None = None,
) -> dict[str, Any]:
    """A module's own attributes with plain values (:func:`_is_plain`), by name: its public
    ones, and in a class of the project's the private ones the project's code reads
    (``self._temp``, ``reads``: :func:`names_read`, by default the module's class's; not a
    ``self._global_step`` a training loop keeps, nor PyTorch's or another library's
    bookkeeping); not :data:`UNCOMPUTED_ATTRIBUTES`. The settings held
    by a settings object (:func:`_is_settings`: ``self.cfg = Config()``, a Hugging Face
    model's ``config``), alone or in a list or tuple (``self.heads = [Cfg(), Cfg()]``), which
    its forward pass may read as it reads a plain attribute, count too, by dotted name
    (``cfg.scale``, ``heads.0.scale``, ``config.final_logit_softcapping``). Not those a
    forward pass was seen to write (:func:`note_forward_writes`: ``self.calls += 1``, state),
    ``written``, by their dotted names in the model, the module being named ``prefix``; where
    ``seen`` (the ids of the objects met so far in the model) is given, each settings object
    at its first module only (every layer of a Hugging Face model holds its one ``config``)."""
    found: dict[str, Any] = {}
    cls = type(module)
    if reads is None:
        reads = _class_reads(cls)
    private = reads if _is_user_class(cls) else frozenset()  # (a class of the project's)
    for key, value in vars(module).items():
        if key in UNCOMPUTED_ATTRIBUTES or not _counted_name(key, private):
            continue
        if _is_plain(value):
            found[key] = value
            continue
        # a settings object, or a list, tuple or dict of them (self.heads = [Cfg(), Cfg()])
        for name, item in _held(key, value):
            if _is_settings(item) and (seen is None or id(item) not in seen):
                if seen is not None:
                    seen.add(id(item))
                found.update(_settings(item, name, reads))
    return {key: value for key, value in found.items() if _dotted(prefix, key) not in written}


def _held(key: str, value: Any) -> list[tuple[str, Any]]:
    """What attribute ``key`` holding ``value`` may hold settings objects in, by dotted name:
    ``value`` itself, or the items of a list, tuple or dict (of string keys) of them, all of
    them where the first is one (a long list of no settings is not walked)."""
    if isinstance(value, (list, tuple)):
        items = [(f"{key}.{index}", item) for index, item in enumerate(value)]
    elif isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = [(f"{key}.{name}", item) for name, item in value.items()]
    else:
        return [(key, value)]
    if len(items) > _HELD_SETTINGS and not (items and _is_settings(items[0][1])):
        return []
    return items


#: the longest list, tuple or dict a module's attribute is searched for settings objects in,
#: where its first item is none
_HELD_SETTINGS = 64


def _counted_name(key: str, private: frozenset[str]) -> bool:
    """Whether attribute ``key`` may hold a setting: a public name, or a private one among
    ``private`` (those the project's code reads, in an object of a class of its own) that is
    no special name (``__dict__``)."""
    if not key.startswith("_"):
        return True
    return key in private and not key.startswith("__")


#: :func:`_class_reads` by class (a class's code does not change while it lives)
_CLASS_READS: weakref.WeakKeyDictionary[type, frozenset[str]] = weakref.WeakKeyDictionary()


def _class_reads(cls: type) -> frozenset[str]:
    """The attribute names the code of ``cls`` and of its bases of the project's own reads
    (``self._temp``; its methods, properties and the bodies decorators wrap)."""
    found = _CLASS_READS.get(cls)
    if found is None:
        own = [k for k in cls.__mro__ if _is_user_class(k)]
        functions = [f for k in own for value in vars(k).values() for f in _functions_of(value)]
        found = _CLASS_READS[cls] = frozenset(_attributes_used(functions)[0])
    return found


def names_read(model: nn.Module) -> frozenset[str]:
    """The attribute names the code of the model's module classes of the project's own reads
    (:func:`_class_reads`): a private attribute is a setting where that code reads it, a
    parent's ``self.child._temp`` too."""
    return frozenset().union(*(_class_reads(cls) for cls in {type(m) for m in model.modules()}))


def _is_settings(value: Any) -> bool:
    """Whether ``value`` is an object that holds settings as attributes: an instance of a class
    of the user's own code (a dataclass of theirs among them), a namespace
    (``types.SimpleNamespace``, ``argparse.Namespace``) or a Hugging Face configuration
    (``PretrainedConfig``); not a module, tensor, function or class, nor another library's
    object (a tokenizer, a model's output dataclass a forward pass kept)."""
    try:
        if isinstance(value, (nn.Module, Tensor, type, types.ModuleType)) or callable(value):
            return False
        cls = type(value)
        if isinstance(value, types.SimpleNamespace) or (
            cls.__name__ == "Namespace" and cls.__module__ == "argparse"
        ):
            return True
        if _is_configuration(cls):
            return True
        return _is_user_class(cls) and isinstance(vars(value), dict)
    except Exception:  # (an object whose attributes raise: a proxy, __getattr__ on __slots__)
        return False


def _is_configuration(cls: type) -> bool:
    """Whether ``cls`` is a Hugging Face configuration class (``PreTrainedConfig``, as
    transformers 5 names it, or ``PretrainedConfig``), a subclass of the project's included."""
    return any(k.__name__ in ("PretrainedConfig", "PreTrainedConfig") for k in cls.__mro__)


def _is_user_class(cls: type) -> bool:
    """Whether ``cls`` is defined by the user's own code (:func:`_is_user_code`), a script's or
    a notebook's (``__main__``, which has no file) included."""
    if cls.__module__ == "__main__":
        return True
    module = sys.modules.get(cls.__module__)
    return _is_user_code(cls.__module__, getattr(module, "__file__", None))


def _settings(
    value: Any, prefix: str, reads: frozenset[str] = frozenset(), depth: int = 0
) -> dict[str, Any]:
    """The plain settings a settings object holds, by dotted name under ``prefix``: its plain
    attributes (:func:`_is_plain`: what a forward pass fills or moves there is left out by
    :func:`note_forward_writes`), for a class of the user's the private ones its code or the
    model's reads (``reads``) too; the immutable
    constants its class (the user's own) defines; and those of the settings objects it holds
    (a composite configuration's ``text_config``), two deep."""
    found: dict[str, Any] = {}
    cls = type(value)
    users = _is_user_class(cls)
    if users:
        for klass in reversed(cls.__mro__[:-1]):  # (a subclass's constant wins)
            for key, member in vars(klass).items():
                if not key.startswith("_") and _is_constant(member):
                    found[f"{prefix}.{key}"] = member
    private = reads | _class_reads(cls) if users else frozenset()
    left_out = UNCOMPUTED_ATTRIBUTES
    if _is_configuration(cls):
        left_out = left_out | CONFIGURATION_RECORDS
    for key, member in sorted(vars(value).items()):
        if key in left_out or not _counted_name(key, private):
            continue
        if _is_plain(member):
            found[f"{prefix}.{key}"] = member
        elif depth < 1 and _is_settings(member):
            found.update(_settings(member, f"{prefix}.{key}", reads, depth + 1))
    return found


def tensor_digest(t: Tensor) -> str:
    """A hash of a tensor's dtype, shape and values."""
    h = hashlib.sha256()
    _tensor(h, t)
    return h.hexdigest()[:32]


def data_fingerprint(examples: ExampleSet) -> str:
    """A hash of every example's inputs and targets, in order (one pass over the data)."""
    cached = getattr(examples, "_fingerprint", None)
    if isinstance(cached, str):
        return cached
    h = hashlib.sha256(f"n={len(examples)};".encode())
    for batch in examples.batches(BATCH):
        _structure(h, batch.inputs)
        h.update(b"|")
        _structure(h, batch.targets)
    digest = h.hexdigest()[:32]
    examples._fingerprint = digest  # type: ignore[attr-defined]  # a set's content is fixed
    return digest


#: how deep :func:`callable_identity` follows the functions a function calls from its module
CALL_DEPTH = 4


def callable_identity(
    fn: Callable[..., Any] | None, _depth: int = 0, *, _foreign: bool = False
) -> str | None:
    """``module.qualname`` plus a hash of the code of a function and of what it reads: its
    closure, its defaults, the module-level numbers, strings and tensors its code names, and
    the functions of its own module and of the user's other modules that it calls, and the
    values it reads from those modules (to :data:`CALL_DEPTH`), each hashed the same way; not
    the globals the code writes (state). A callable object: its class's ``__call__``, its
    plain attributes and the tensors it holds (a module's parameters and buffers among them:
    ``nn.CrossEntropyLoss(weight=w)``)."""
    if fn is None:
        return None
    if isinstance(fn, functools.partial):
        inner = callable_identity(fn.func, _depth, _foreign=_foreign)
        bound = canonical_text((fn.args, sorted(fn.keywords.items())))
        return f"partial({inner})#{hashlib.sha256(bound.encode()).hexdigest()[:12]}"
    target = getattr(fn, "__func__", fn)  # bound methods: the function
    qualname = getattr(target, "__qualname__", type(fn).__name__)
    name = f"{getattr(target, '__module__', '?')}.{qualname}"
    code = getattr(target, "__code__", None)
    holder = getattr(fn, "__self__", None)
    if (
        code is not None
        and holder is not None
        and not isinstance(holder, (nn.Module, types.ModuleType, type))
        and _is_user_class(type(holder))
        and _depth < CALL_DEPTH
    ):
        # a bound method of an object of the user's (Task(model, Weighted(w).loss)): its
        # function, and the values the object holds (plain ones and tensors; none: the
        # function's identity, as before they were read)
        held = _held_text(holder, _assigned_by(target), plain=True)
        if held:
            inner = str(callable_identity(target, _depth + 1, _foreign=_foreign))
            h = hashlib.sha256(f"{inner};{held}".encode())
            return f"{name}#{h.hexdigest()[:12]}"
    if code is None:  # a callable object: its class and its repr
        cls = type(fn)
        # (a hook's repr can show what it records: a dataclass's log)
        shown = f"{cls.__module__}.{cls.__qualname__}" if _AS_HOOK.get() else stable_repr(fn)
        h = hashlib.sha256(shown.encode())
        if not cls.__module__.startswith("infkit.") and _depth < CALL_DEPTH:
            # (what it computes: its __call__'s code and the settings it holds)
            call = _class_call(cls)
            if isinstance(call, types.FunctionType) and not (call.__module__ or "").startswith(
                "torch"
            ):
                h.update(str(callable_identity(call, _depth + 1)).encode())
            if hasattr(fn, "__dict__"):
                # its settings: the plain values its call never assigns (self.calls += 1,
                # self.last = None then a tensor, are what it records)
                assigned = _assigned_by(call)
                _structure(
                    h,
                    {
                        k: v
                        for k, v in vars(fn).items()
                        if _is_plain(v)
                        and not _empty_container(v)
                        and k not in assigned
                        and not _kept_by_type(v)
                    },
                )
                # the tensors and objects it holds (class weights: self.w = w), not what its
                # call assigns (self.last = losses.detach()); none: as before they were read
                held = _held_text(fn, assigned, plain=False)
                if held:
                    h.update(held.encode())
        if isinstance(fn, nn.Module):  # (a loss module: its weight is a buffer, not in repr)
            _structure(h, {k: v for k, v in fn.named_parameters() if _holds_values(v.detach())})
            _structure(h, {k: v for k, v in fn.named_buffers() if _holds_values(v)})
        return f"{cls.__module__}.{cls.__qualname__}#{h.hexdigest()[:12]}"
    h = hashlib.sha256(code.co_code)
    h.update(constants_repr(code.co_consts).encode())
    h.update(repr(code.co_names).encode())
    # (a hook's: the cells its code assigns are what it counts, not settings)
    assigned = _cells_assigned(code) if _AS_HOOK.get() else frozenset()
    for cell_name, cell in zip(code.co_freevars, getattr(target, "__closure__", None) or ()):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if cell_name in assigned:
            continue
        if _kept_by_type(value):
            h.update(f"<{type(value).__name__}>".encode())
        elif isinstance(value, Tensor) and not _holds_values(value):
            h.update(b"<Tensor>")
        elif isinstance(value, functools.partial):  # (its bound values, in one order)
            h.update(str(callable_identity(value, _depth + 1, _foreign=_foreign)).encode())
        elif _is_structure(value):  # tensors and plain values in lists, tuples and dicts
            _structure(h, value)
        else:  # (a set, an object: its values, the same in every process)
            h.update(canonical_text(value).encode())
    if name.startswith("infkit."):  # infkit's own: its constants are the version's, and the
        return f"{name}#{h.hexdigest()[:12]}"  # saved identities of its tasks stay as they were
    # the values it reads: its defaults, and the module-level plain values and tensors its code
    # names (a measurement reading a token id, an output function a temperature)
    for defaults in (
        getattr(target, "__defaults__", None),
        getattr(target, "__kwdefaults__", None),
    ):
        if defaults:
            _structure(h, ordered_repr(defaults))
    scope = getattr(target, "__globals__", {})
    # a counter the code keeps (global CALLS) is state; in another module of the user's, so is
    # every global that any of its functions writes (a STEP one function moves, another reads)
    written = _globals_written(code) | (_module_state(scope) if _foreign else frozenset())
    for key in sorted(_names_read(code) - written):
        value = scope.get(key)
        if _kept_by_type(value) and isinstance(value, (list, dict, set, bytearray)):
            continue  # (a hook's log kept at module level: ACTS.append(o))
        if isinstance(value, Tensor) or (_is_plain(value) and key in scope):
            if _foreign and not (_is_constant(value) or isinstance(value, Tensor)):
                continue  # another module's state (a run's log dict), not what it computes
            h.update(f"{key}=".encode())
            _structure(h, value)
        elif _depth >= CALL_DEPTH:
            continue
        elif isinstance(value, functools.partial):
            # a function with settings bound (ACT = partial(F.leaky_relu, negative_slope=0.01)),
            # of another module: what that module keeps is state there too
            foreign = _foreign or getattr(value.func, "__globals__", scope) is not scope
            h.update(f"{key}={callable_identity(value, _depth + 1, _foreign=foreign)}".encode())
        elif _called_helper(value, scope, target):
            # a helper of its own module: what it reads counts too (a token id read there)
            h.update(f"{key}={callable_identity(value, _depth + 1, _foreign=_foreign)}".encode())
        elif (
            isinstance(value, types.FunctionType)
            and value is not target
            and _is_user_code(value.__module__, value.__code__.co_filename)
        ):
            # a function of another module of the user's (from helpers import act): its code and
            # the constants it reads (a tester's edit of helpers.act reused the old code's fit)
            h.update(f"{key}={callable_identity(value, _depth + 1, _foreign=True)}".encode())
        elif isinstance(value, types.ModuleType) and _is_user_code(
            value.__name__, getattr(value, "__file__", None)
        ):
            # a module of the user's: the functions and constants the code reads from it
            # (helpers.act, helpers.SCALE), not those it writes (helpers.CALLS += 1)
            members = vars(value)
            state = _module_state(members)
            for attribute in sorted((_module_attributes(code, key) & set(members)) - state):
                member = members[attribute]
                if _is_constant(member) or isinstance(member, Tensor):
                    h.update(f"{key}.{attribute}=".encode())
                    _structure(h, member)
                elif isinstance(member, functools.partial) or (  # (helpers.LEAK: bound)
                    isinstance(member, types.FunctionType)
                    and member is not target
                    and _is_user_code(member.__module__, member.__code__.co_filename)
                ):
                    identity = callable_identity(member, _depth + 1, _foreign=True)
                    h.update(f"{key}.{attribute}={identity}".encode())
    return f"{name}#{h.hexdigest()[:12]}"


def object_identity(value: Any, _depth: int = 0, _seen: dict[int, int] | None = None) -> str:
    """An object of the user's own class (a custom optimiser) as text that is the same in every
    process and changes with what it computes: its class's name, the members its own classes
    define (functions and ``__call__`` by :func:`callable_identity`, through their decorators:
    the code, and what it reads; properties by their getters; values, partials and objects as
    its attributes are) and its attributes, in ``__dict__`` or ``__slots__``: functions by
    their identity, objects of the user's classes the same way (to :data:`CALL_DEPTH`, each
    once at the shallowest depth the walk meets it, where its children are read furthest; an
    enum member by its name and value), the rest by
    :func:`canonical_text`. (A class attribute or helper method ``update`` reads, a held
    lambda, a slotted setting are part of it: reviewers changed each without changing the
    identity.)"""
    # one record for the whole walk: the depth each object was read at (once, or again where
    # met shallower: one first read at the cap left its children out, a reviewer's)
    seen = {} if _seen is None else _seen
    seen[id(value)] = _depth
    cls = type(value)
    parts = []
    for klass in cls.__mro__:
        if not _is_user_class(klass):
            continue
        for name, member in sorted(vars(klass).items()):
            if name.startswith("__") and name.endswith("__") and name != "__call__":
                continue
            if isinstance(member, property):
                member = member.fget
            parts.append(f"{klass.__qualname__}.{name}={_member_text(member, _depth, seen)}")
    held = dict(getattr(value, "__dict__", {}) or {})
    for klass in cls.__mro__:
        for name in _slot_names(klass):
            if name.startswith("__") and name.endswith("__"):
                continue  # (__dict__, __weakref__)
            if name.startswith("__"):  # a private slot, stored under its mangled name
                name = f"_{klass.__name__.lstrip('_')}{name}"
            try:
                held[name] = getattr(value, name)
            except AttributeError:  # (a slot not set)
                continue
    for name, member in sorted(held.items()):
        parts.append(f"{name}={_member_text(member, _depth, seen)}")
    if isinstance(value, (Mapping, list, tuple, set, frozenset)):  # (an attribute dict's values)
        parts.append(f"<contents>={canonical_text(value)}")  # (sets and keys sorted)
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return f"{cls.__module__}.{cls.__qualname__}#{digest}"


def _member_text(member: Any, depth: int, seen: dict[int, int]) -> str:
    """One member or attribute of :func:`object_identity`'s object, as text."""
    methods = (staticmethod, classmethod, types.MethodType)
    function = member.__func__ if isinstance(member, methods) else member
    # through decorators (functools.wraps, lru_cache) to the body; an object answering every
    # attribute (a loop), or one whose __getattr__ raises other than AttributeError (an
    # attribute dict's KeyError), is left as it is
    with contextlib.suppress(Exception):
        function = inspect.unwrap(function)
    if isinstance(function, (types.FunctionType, functools.partial)):
        return str(callable_identity(function))
    if isinstance(member, type):
        return f"{member.__module__}.{member.__qualname__}"
    if isinstance(member, enum.Enum):  # (each member lists every other: expanded, n^4 ways)
        return f"{type(member).__qualname__}.{member.name}={canonical_text(member.value)}"
    read_at = seen.get(id(member))
    if (
        _is_user_class(type(member))
        and depth < CALL_DEPTH
        and (read_at is None or read_at > depth + 1)
    ):
        return object_identity(member, depth + 1, seen)
    if read_at is not None:  # (read elsewhere in the walk, as deep or deeper: named only)
        return f"<{type(member).__qualname__} above>"
    if _is_user_class(type(member)):  # at the depth cap: its plain values, not its objects
        # (canonical_text would walk its objects six levels deep, each anew: mutually
        # referencing objects took 14 s, a reviewer's)
        held = getattr(member, "__dict__", None) or {}
        plain = ", ".join(
            f"{k}={canonical_text(v)}" for k, v in sorted(held.items()) if _is_plain(v)
        )
        return f"{type(member).__qualname__}({plain})"
    return canonical_text(member)


@functools.lru_cache(maxsize=1)
def _library_roots() -> tuple[str, ...]:
    """The folders installed code lives in: the standard library and the site-packages."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    roots.add(site.getusersitepackages())
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


def _is_user_code(module: str | None, path: str | None) -> bool:
    """Whether the code of module ``module``, in file ``path``, is the user's own (a file
    outside the standard library and the installed packages, not infkit's nor PyTorch's): its
    functions and values are part of what a model's or a task's code computes."""
    if not module or not path or path.startswith("<"):  # (exec'd code: sympy's lambdify)
        return False
    if module.split(".")[0] in ("infkit", "torch", "numpy", "builtins"):
        return False
    return not _real_path(path).startswith(_library_roots())


@functools.lru_cache(maxsize=4096)
def _real_path(path: str) -> str:
    return os.path.realpath(path)


def _is_structure(value: Any) -> bool:
    """Whether ``value`` is what :func:`_structure` hashes by value alone: a tensor, a plain
    value (:data:`_PLAIN`), or a list, tuple or dict (of string keys) of them."""
    return _nested(value, (Tensor, *_PLAIN), 5)


#: a device named with its index ("cuda:1"): counted by its kind (:func:`canonical_text`)
_DEVICE_NAME = re.compile(r"(cuda|xpu|mps|npu|hpu|xla|meta|cpu):\d+")


def canonical_text(value: Any, depth: int = 0) -> str:
    """``value`` as text that is the same in every process and changes with any of its values:
    a tensor by its digest (its repr elides values and follows the print options), sets and
    dict keys in sorted order (a set prints in the order of the process's string hashing),
    a ``torch.device`` or a device's name by its kind (``cuda``, not ``cuda:1``: each process
    of a run keeps its own), a dataclass by all its fields (``repr=False`` ones too), a
    namespace or another settings object (:func:`_is_settings`) by its public attributes;
    other objects by :func:`stable_repr` (a module, a function: their repr, as they were always
    taken)."""
    if isinstance(value, Tensor):
        return f"tensor({tensor_digest(value)})"
    if isinstance(value, torch.device):
        # its kind, not its index: a closure that moves targets to each process's own GPU
        # computes the same on every process (a reviewer's was refused under torchrun)
        return f"device({value.type})"
    if isinstance(value, str) and _DEVICE_NAME.fullmatch(value):  # "cuda:1", as often held
        return f"device({value.split(':')[0]})"
    if isinstance(value, np.ndarray) and value.dtype != object:  # (its repr elides values too)
        digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()[:32]
        return f"ndarray({value.dtype}, {value.shape}, {digest})"
    if isinstance(value, _PLAIN) or depth > 6:
        return stable_repr(value)
    inner = depth + 1
    if isinstance(value, (set, frozenset)):
        items = sorted(canonical_text(v, inner) for v in value)
        return f"{type(value).__name__}({', '.join(items)})"
    if isinstance(value, (list, tuple)):
        items = [canonical_text(v, inner) for v in value]
        return f"{type(value).__name__}({', '.join(items)})"
    if isinstance(value, Mapping):
        pairs = sorted(
            f"{canonical_text(k, inner)}: {canonical_text(v, inner)}" for k, v in value.items()
        )
        return f"{type(value).__name__}{{{', '.join(pairs)}}}"
    cls = type(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = _fields(value)
    elif _is_user_class(cls) and not hasattr(value, "__dict__") and not callable(value):
        # (a class of the project's with __slots__: its repr holds no values)
        slots = [n for k in cls.__mro__ for n in _slot_names(k) if not n.startswith("_")]
        fields = {n: getattr(value, n, "<unset>") for n in sorted(set(slots))}
    elif _is_settings(value):
        try:
            fields = {k: v for k, v in sorted(vars(value).items()) if not k.startswith("_")}
        except Exception:  # (attributes that raise: its repr)
            return stable_repr(value)
    else:
        return stable_repr(value)
    parts = [f"{k}={canonical_text(v, inner)}" for k, v in fields.items()]
    return f"{cls.__module__}.{cls.__qualname__}({', '.join(parts)})"


def _slot_names(cls: type) -> tuple[str, ...]:
    """The attribute names class ``cls`` itself declares in ``__slots__``."""
    slots = vars(cls).get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


def _holds_set(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` is a set or holds one in its tuples, lists, dicts and dataclasses."""
    if isinstance(value, (set, frozenset)):
        return True
    if depth > 4:
        return False
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return any(_holds_set(v, depth + 1) for v in _fields(value).values())
    if isinstance(value, (tuple, list)):
        return any(_holds_set(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_holds_set(v, depth + 1) for v in value.values())
    return False


def ordered_repr(value: Any) -> str:
    """``stable_repr(value)``, but with its sets in sorted order (a set prints in the order of
    the process's string hashing): the same text in every process for a value that holds a
    set, and ``stable_repr``'s for one that holds none (as identities were always taken)."""
    if not _holds_set(value):
        return stable_repr(value)
    if isinstance(value, (set, frozenset)):
        return f"{type(value).__name__}({sorted(ordered_repr(v) for v in value)!r})"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(ordered_repr(v) for v in value)
        return f"({inner},)" if isinstance(value, tuple) else f"[{inner}]"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = ", ".join(f"{k}={ordered_repr(v)}" for k, v in _fields(value).items())
        return f"{type(value).__qualname__}({fields})"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{k!r}: {ordered_repr(v)}" for k, v in value.items()) + "}"


def _fields(value: Any) -> dict[str, Any]:
    """A dataclass instance's fields, by name."""
    return {f.name: getattr(value, f.name, None) for f in dataclasses.fields(value)}


def constants_repr(constants: tuple[Any, ...]) -> str:
    """A code object's constants as text that is the same in every process and place:
    ``stable_repr`` of them where they hold no nested code and no set (as identities were
    always taken), else each nested code object by its own code, constants and names (not its
    file, line numbers or address: a comprehension or lambda names them) and each set in sorted
    order (a frozenset prints in the order of the process's string hashing)."""
    if not any(isinstance(c, (types.CodeType, frozenset, set)) for c in constants):
        return stable_repr(constants)
    parts = []
    for c in constants:
        if isinstance(c, types.CodeType):
            parts.append(
                f"<code {c.co_name} {c.co_code.hex()} {constants_repr(c.co_consts)} "
                f"{c.co_names!r} {c.co_varnames!r} {c.co_argcount} {c.co_kwonlyargcount} "
                f"{c.co_flags}>"
            )
        else:
            parts.append(ordered_repr(c))
    return "(" + ", ".join(parts) + ")"


def _called_helper(value: Any, scope: dict[str, Any], caller: Any) -> bool:
    """Whether ``value`` is another Python function defined in the module of ``caller``
    (``scope``, its globals): a helper it calls, hashed with it."""
    return (
        isinstance(value, types.FunctionType) and value is not caller and value.__globals__ is scope
    )


@functools.lru_cache(maxsize=4096)
def _globals_written(code: Any) -> frozenset[str]:
    """The global names a code object (and the code nested in it) stores or deletes
    (``global CALLS; CALLS += 1``): state it keeps, not a value that defines it."""
    names = {
        str(ins.argval)
        for ins in dis.get_instructions(code)
        if ins.opname in ("STORE_GLOBAL", "DELETE_GLOBAL")
    }
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _globals_written(const)
    return frozenset(names)


def _module_state(scope: Mapping[str, Any]) -> frozenset[str]:
    """The globals of a module (its ``scope``) that any of its own functions writes (``global
    STEP; STEP += 1``): state the module keeps, whichever function reads it."""
    written: set[str] = set()
    for value in list(scope.values()):
        if isinstance(value, types.FunctionType) and value.__globals__ is scope:
            written |= _globals_written(value.__code__)
    return frozenset(written)


@functools.lru_cache(maxsize=4096)
def _module_attributes(code: Any, module: str) -> frozenset[str]:
    """The attributes a code object (and the code nested in it) reads from the global
    ``module`` (``helpers.act``: a LOAD_GLOBAL of it, then LOAD_ATTR or LOAD_METHOD), less
    those it writes there (``helpers.CALLS += 1``)."""
    read: set[str] = set()
    previous = None
    for ins in dis.get_instructions(code):
        if (
            previous is not None
            and previous.opname in ("LOAD_GLOBAL", "LOAD_NAME")
            and previous.argval == module
            and ins.opname in ("LOAD_ATTR", "LOAD_METHOD")
        ):
            read.add(str(ins.argval))
        previous = ins
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            read |= _module_attributes(const, module)
    return frozenset(read - _attribute_names(code)[1])


@functools.lru_cache(maxsize=4096)  # (code objects are immutable: the same code, the same names)
def _names_read(code: Any) -> frozenset[str]:
    """The global names a code object and the code nested in it (lambdas, comprehensions)
    load (not attribute names: ``self.tok`` reads no global ``tok``)."""
    names = {
        str(ins.argval)
        for ins in dis.get_instructions(code)
        if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME")
    }
    for const in code.co_consts:
        if hasattr(const, "co_names"):
            names |= _names_read(const)
    return frozenset(names)


def task_fingerprint(task: Task) -> dict[str, Any]:
    """Which loss, measurement and output functions the task uses, the precision of its
    passes when it runs them under autocast, and, for a model whose parameters are in a lower
    precision than float32, that its outputs reach the loss in float32
    (:func:`~infkit.task.at_least_float32`; before, in the model's precision, so artifacts of
    such a model fitted then are not taken for today's). Both are keys only then: the
    identities of the other tasks are those of earlier versions."""
    out = {
        "name": task.name,
        "loss": callable_identity(task.loss),
        "measurement": callable_identity(task.measurement),
        "output_hessian": callable_identity(task.output_hessian),
        "output_fn": callable_identity(task.output_fn),
        "higher_is_better": task.higher_is_better,
    }
    if task.autocast is not None:
        out["autocast"] = dtype_name(task.autocast)
    elif _below_float32(task.model):
        out["outputs"] = "float32"
    return out


def _below_float32(model: nn.Module) -> bool:
    """Whether ``model``'s first floating-point parameter is in a lower precision than float32
    (bfloat16, float16)."""
    for p in model.parameters():
        if p.is_floating_point():
            return torch.finfo(p.dtype).bits < 32
    return False
