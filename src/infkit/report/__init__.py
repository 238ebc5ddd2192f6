"""``infkit run`` and ``infkit report``: an analysis from one config file, and its HTML report.

* :func:`parse` reads and checks a TOML configuration (:mod:`infkit.report.config` documents
  every key);
* :func:`run` runs the analysis it describes and writes the workdir and ``report.html``
  (:mod:`infkit.report.analysis`);
* :func:`write_report` rebuilds ``report.html`` from a workdir without recomputing, and
  :func:`load_results` reads a run's results back (:mod:`infkit.report.html`).

The figures need matplotlib (``pip install "infkit[report]"``); the configuration alone does
not. See docs/report.md.
"""

from typing import Any

from infkit.report.analysis import run
from infkit.report.config import RunConfig, help_text, parse

__all__ = ["RunConfig", "help_text", "load_results", "parse", "run", "write_report"]


def __getattr__(name: str) -> Any:
    """``write_report`` and ``load_results`` import matplotlib only when asked for."""
    if name in ("write_report", "load_results"):
        from infkit.report import html

        return getattr(html, name)
    raise AttributeError(f"module 'infkit.report' has no attribute {name!r}")
