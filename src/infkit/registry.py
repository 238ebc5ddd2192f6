"""The registry of methods: the built-in ones, the listing, creation and ``method="auto"``.

Importing this module imports every module of :mod:`infkit.methods`; each registers its method
with :func:`infkit.methods.register`, so a new built-in method is one new file. Methods defined
outside infkit register the same way and appear here as soon as their module is imported.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import infkit.methods as package
from infkit.errors import UnsupportedError
from infkit.methods.base import Method, Problem, method_class, registered


def _import_builtin() -> None:
    """Import every module of :mod:`infkit.methods`: each registers its method."""
    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base":
            importlib.import_module(f"{package.__name__}.{info.name}")


_import_builtin()


def methods() -> dict[str, dict[str, Any]]:
    """Every registered method: its estimators, the questions it answers, its options.

    Returns:
        name -> {"estimators": [...], "quantities": [...] (the facade questions it answers),
        "scales": bool, "summary": str, "options": {option: one-line doc}}.
    """
    return {
        name: {
            "estimators": list(cls.estimators),
            "quantities": [q for q in package.QUESTIONS if q in cls.questions],
            "scales": cls.scales,
            "exact_curvature": cls.exact_example_curvature,
            "summary": cls.summary,
            "options": {option: doc for option, _, _, doc in cls.Options.documentation()},
        }
        for name, cls in sorted(registered().items())
    }


def create(name: str, options: Mapping[str, Any]) -> Method:
    """An instance of method ``name`` with its options (validated now, with clear errors)."""
    return method_class(name)(**dict(options))


@dataclass(frozen=True)
class Choice:
    """What ``method="auto"`` picked and why (logged, and in ``describe()["auto"]``).

    Attributes:
        method: the chosen method's name.
        reason: why it suits the problem.
        passed_over: the methods preferred to it, each with why it does not suit.
    """

    method: str
    reason: str
    passed_over: dict[str, str]

    def __str__(self) -> str:
        skipped = "; ".join(f"not {name}: {why}" for name, why in self.passed_over.items())
        return f"method='auto' chose {self.method!r}: {self.reason}" + (
            f" ({skipped})" if skipped else ""
        )

    def record(self) -> dict[str, Any]:
        """The choice as a plain dict."""
        return {"method": self.method, "reason": self.reason, "passed_over": self.passed_over}


def explain_choice(problem: Problem, candidates: list[str] | None = None) -> Choice:
    """:func:`choose`, with the reasons for the choice and for each method passed over."""
    method = choose(problem, candidates)
    names = auto_candidates() if candidates is None else candidates
    passed = {
        name: registered()[name].suitability(problem) for name in names[: names.index(method)]
    }
    return Choice(method, registered()[method].suitability(problem), passed)


def choose(problem: Problem, candidates: list[str] | None = None) -> str:
    """The method ``method="auto"`` picks: the first candidate by ``auto_priority`` that suits the
    problem (``candidates``: a subset of :func:`auto_candidates`, e.g. those taking some options).

    With the built-in methods: ``exact`` when the P x P curvature fits in memory (and P is at
    most 20,000), ``dual`` when 20 N C <= P and the (N C)^2 kernel fits, ``ekfac`` when the
    layers it can factor hold at least half of the trainable parameters (the rest left out of
    the attribution with a notice, as a language model's embeddings and norms) and its factors
    fit the memory limit, ``cg`` otherwise.
    """
    names = auto_candidates() if candidates is None else candidates
    for name in names:
        if registered()[name].suits(problem):
            return name
    raise UnsupportedError(
        f"method='auto' found no registered method for P={problem.p:,}, N={problem.n:,}, "
        f"C={problem.c}; registered methods: {', '.join(sorted(registered()))}"
    )


def auto_candidates() -> list[str]:
    """The methods ``method="auto"`` may choose, in order of preference."""
    return [
        name
        for _, name in sorted(
            (cls.auto_priority, name)
            for name, cls in registered().items()
            if cls.auto_priority is not None
        )
    ]
