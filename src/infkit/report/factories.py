"""The user's code a run configuration names: ``"module:callable"`` factories.

A factory is imported with the config's folder first on ``sys.path`` and called there (the
working directory is the config's folder while it runs, so relative paths in it start at the
config). A module of the config's folder is that folder's, even when a module of the same name
was imported from elsewhere before in the same process (another project's ``project.py``). An
import that fails, a name that is missing or not callable, and a factory that raises each give
a :class:`~infkit.errors.ConfigError` naming the config key and the factory (docs/report.md §2).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from infkit.errors import ConfigError, Notice, warn


@contextlib.contextmanager
def on_path(folder: Path) -> Iterator[None]:
    """For the duration: ``folder`` first on ``sys.path`` (the config's own modules) and the
    working directory, so that relative paths in the user's code start at the config."""
    entry, before = str(folder), os.getcwd()
    sys.path.insert(0, entry)
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


#: top-level modules imported from config folders: name -> file (so that another config's
#: module of the same name replaces it without a word)
_FROM_CONFIGS: dict[str, Path] = {}


def forget_other_copy(module_name: str, folder: Path) -> None:
    """Drop from ``sys.modules`` a module (and its submodules) that ``folder`` holds but that
    was imported from another place, so that importing it gives the folder's own: two projects'
    configs run in one process would otherwise share the first one's factories. A module the
    user imported (not infkit for another config) is replaced with a notice naming both."""
    top = module_name.split(".")[0]
    here = next(
        (p for p in (folder / f"{top}.py", folder / top / "__init__.py") if p.exists()), None
    )
    if here is None:
        return
    here = here.resolve()
    cached = sys.modules.get(top)
    origin = getattr(cached, "__file__", None)
    if cached is not None and (origin is None or Path(origin).resolve() != here):
        if _FROM_CONFIGS.get(top) != (Path(origin).resolve() if origin else None):
            warn(
                f"the config's folder holds its own {top!r} ({here}); the module of that name "
                f"imported before from {origin or 'elsewhere'} is replaced in sys.modules, so a "
                f"later `import {top}` gives the config's",
                Notice,
            )
        for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
            del sys.modules[name]
    _FROM_CONFIGS[top] = here


def resolve(spec: str, key: str, folder: Path, *, first_only: bool = False) -> Any:
    """The callable named by ``spec`` (``"module:attribute"``, dots allowed in both parts).

    Args:
        spec: ``"module:callable"``.
        key: the config key that named it, e.g. ``"[model] factory"`` (for the message).
        folder: the config's folder, searched first for the module.
        first_only: find the module and the attribute's first name only, whatever it holds
            (before the factories run: ``tokenizer.decode`` of a ``tokenizer = None`` that the
            data factory sets).
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f'{key} = {spec!r} must have the form "module:callable"')
    forget_other_copy(module_name, folder)
    with on_path(folder):
        try:
            target: Any = importlib.import_module(module_name)
        except Exception as error:
            raise ConfigError(
                f"{key} = {spec!r}: module {module_name!r} cannot be imported "
                f"({type(error).__name__}: {error}); it is looked for in {folder} and on "
                "sys.path"
            ) from error
    for part in attribute.split(".")[:1] if first_only else attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key} = {spec!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    if first_only:
        return target
    if not callable(target):
        raise ConfigError(f"{key} = {spec!r} is not callable ({type(target).__name__})")
    return target


def call(spec: str, key: str, folder: Path, *args: Any, **kwargs: Any) -> Any:
    """Resolve ``spec`` and call it; an exception inside it becomes a ConfigError naming it,
    with the last line of its traceback in the user's code."""
    fn = resolve(spec, key, folder)
    _check_arguments(fn, spec, key, args, kwargs)
    with on_path(folder):
        try:
            return fn(*args, **kwargs)
        except Exception as error:
            where = _user_line(traceback.extract_tb(error.__traceback__), folder)
            raise ConfigError(
                f"{key} = {spec!r} raised {type(error).__name__}: {error}{where}"
            ) from error


def _check_arguments(
    fn: Any, spec: str, key: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Refuse, naming them, the ``args`` of a section that ``fn`` does not take (a misspelt
    keyword raised TypeError from the call, placed at infkit's line)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C function: let the call say it
        return
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        section = key.split("]")[0] + "]" if key.startswith("[") else key
        raise ConfigError(
            f"{key} = {spec!r} cannot be called with {section} args "
            f"{sorted(kwargs) or '(none)'}: {error} (its parameters: {signature})"
        ) from error


def _user_line(frames: traceback.StackSummary, folder: Path) -> str:
    """ " at file:line" of the last frame of ``frames`` in a file under ``folder`` (the user's
    project: an error numpy raises reading a file names the user's call, not numpy's line),
    else of the last frame; "" when there is none."""
    root = folder.resolve()
    mine = [f for f in frames if Path(f.filename).resolve().is_relative_to(root)]
    if not (mine or frames):
        return ""
    frame = (mine or frames)[-1]
    return f" at {frame.filename}:{frame.lineno}"
