"""Registry of methods: how the inverse curvature is applied. One module per method."""

from __future__ import annotations

from typing import Any

from infkit.errors import UnsupportedError
from infkit.methods.base import FitContext, InverseCurvature

_REGISTRY: dict[str, type[InverseCurvature]] = {}


def register(cls: type[InverseCurvature]) -> type[InverseCurvature]:
    """Class decorator: make a method available by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def method_class(name: str) -> type[InverseCurvature]:
    if name not in _REGISTRY:
        raise UnsupportedError(
            f"unknown method {name!r}; valid methods: {', '.join(sorted(_REGISTRY))} (or 'auto')"
        )
    return _REGISTRY[name]


def create(name: str, options: dict[str, Any]) -> InverseCurvature:
    """An instance of method ``name`` with its options, with a clear error for unknown options."""
    cls = method_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        import inspect

        params = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
        raise UnsupportedError(
            f"method {name!r} does not take the option(s) {sorted(options)}; its options are: "
            f"{', '.join(params) or 'none'}"
        ) from exc


def registered() -> dict[str, type[InverseCurvature]]:
    return dict(_REGISTRY)


def scalable_methods() -> list[str]:
    return sorted(n for n, c in _REGISTRY.items() if c.scales)


def methods() -> dict[str, dict[str, Any]]:
    """Every registered method with the estimators it supports and a one-line summary."""
    return {
        name: {
            "estimators": list(cls.estimators),
            "quantities": list(cls.quantities),
            "scales": cls.scales,
            "summary": cls.summary,
        }
        for name, cls in sorted(_REGISTRY.items())
    }


def _import_all() -> None:
    """Import every module of this package: each registers its method (one file per method)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


_import_all()

__all__ = [
    "FitContext",
    "InverseCurvature",
    "create",
    "method_class",
    "methods",
    "register",
    "registered",
    "scalable_methods",
]
