"""The ``infkit`` command line (also ``python -m infkit``).

Subcommands:

* ``infkit demo [--out DIR] [--quick] [--seed N] [--threads N]``: the digits analysis of
  :mod:`infkit.demo`, written to a run directory (default ``runs/demo-<timestamp>``); it needs
  the ``demo`` extra (``pip install "infkit[demo]"``: matplotlib and scikit-learn).
* ``infkit methods [--json]``: the registered methods, the estimators and quantities each
  supports, whether it scales to large models, and a one-line summary.
* ``infkit run CONFIG.toml [--out DIR] [--threads N] [--quiet]``: the analysis a config file
  describes, written to a workdir with ``report.html`` (:mod:`infkit.report`; ``--help`` lists
  every key).
* ``infkit report WORKDIR [--out FILE]``: rebuild ``report.html`` from a run's workdir.

Bad input (an unknown config key, a factory that fails, data the task cannot use) exits with
status 2 and a message saying what to change.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator, Sequence
from typing import Any


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one sub-parser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="infkit",
        description="Influence functions and training-data attribution for PyTorch models.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="attribution, mislabel detection and a retraining check on the digits dataset",
        description="Train a logistic regression and an MLP on scikit-learn's digits with 5% "
        "flipped labels; explain predictions, detect the flipped labels by self-influence and "
        "check predicted against actual leave-one-out retraining.",
    )
    demo.add_argument("--out", default=None, help="run directory (default: runs/demo-<timestamp>)")
    demo.add_argument(
        "--quick", action="store_true", help="smoke test: logistic regression only, 10 retrains"
    )
    demo.add_argument("--seed", type=int, default=0, help="seed of split, label flips and init")
    demo.add_argument(
        "--threads", type=_positive_int, default=1, help="torch intra-op threads (default: 1)"
    )
    methods = sub.add_parser(
        "methods",
        help="list the methods with their estimators and quantities",
        description="The registered methods (infkit.methods()): estimators, quantities, "
        "whether they scale to large models, and a summary.",
    )
    methods.add_argument("--json", action="store_true", help="print JSON instead of a table")
    run = sub.add_parser(
        "run",
        help="run the analysis a TOML config describes and write an HTML report",
        description="Fit an influence on your own model and data (factories named in the "
        "config), explain test examples, rank self-influence, predict group removals, check "
        "against retraining; write a workdir with the scores, CSV tables and report.html. "
        "Paths in the config are relative to the config file (--out, to the current "
        "directory); its folder is on sys.path.",
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("config", help="the TOML configuration file")
    run.add_argument(
        "--out",
        default=None,
        help="the workdir, relative to the current directory (default: [output] workdir)",
    )
    run.add_argument("--threads", type=_positive_int, default=None, help="torch intra-op threads")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    report = sub.add_parser(
        "report",
        help="rebuild report.html from a run's workdir (no recomputation)",
        description="Rebuild the HTML report of an `infkit run` from the results in its "
        "workdir (verified against their checksums); the model and data are not needed.",
    )
    report.add_argument("workdir", help="the workdir of an infkit run")
    report.add_argument("--out", default=None, help="the HTML file (default: WORKDIR/report.html)")
    return parser


def _config_help() -> str:
    from infkit.report.config import help_text

    return help_text()


def print_methods(as_json: bool = False) -> None:
    """Print :func:`infkit.methods` as an aligned table, or as JSON."""
    import json

    from infkit.registry import methods

    table = methods()
    if as_json:
        print(json.dumps(table, indent=2))
        return
    rows = [
        (
            name,
            ", ".join(info["estimators"]),
            ", ".join(info["quantities"]),
            "yes" if info["scales"] else "no",
            info["summary"],
        )
        for name, info in table.items()
    ]
    header = ("method", "estimators", "quantities", "scales", "summary")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths)) + "  " + row[4])


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infkit`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        try:
            from infkit.demo import DemoConfig, run_demo
        except ImportError as error:
            print(
                f"infkit demo needs the 'demo' extra ({error.name or error}): "
                'pip install "infkit[demo]" (matplotlib and scikit-learn)',
                file=sys.stderr,
            )
            return 2
        config = DemoConfig.create(args.out, seed=args.seed, quick=args.quick, threads=args.threads)
        with _plain_warnings("infkit demo"):
            run_demo(config)
    elif args.command == "methods":
        print_methods(args.json)
    elif args.command in ("run", "report"):
        return _run_or_report(args)
    return 0


def _run_or_report(args: argparse.Namespace) -> int:
    """``infkit run`` / ``infkit report``: InfkitErrors exit with status 2 and their message."""
    import torch

    from infkit.errors import InfkitError

    try:
        import matplotlib  # noqa: F401  (the report's figures)

        from infkit import report
    except ImportError as error:
        print(
            f'infkit {args.command} needs matplotlib ({error}): pip install "infkit[report]"',
            file=sys.stderr,
        )
        return 2
    try:
        with _plain_warnings(f"infkit {args.command}"):
            if args.command == "report":
                path = report.write_report(args.workdir, args.out)
            else:
                config = report.parse(args.config)
                if args.threads is not None:
                    torch.set_num_threads(args.threads)
                path = report.run(config, args.out, progress=False if args.quiet else None)
    except InfkitError as error:
        print(f"infkit {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


@contextlib.contextmanager
def _plain_warnings(command: str) -> Iterator[None]:
    """Warnings shown as ``infkit run: warning: ...`` (a Notice as ``notice``) while a command
    runs: Python's form names the first frame outside infkit, which under ``python -m`` is
    runpy's (``<frozen runpy>:88: UserWarning: ...``). Filters (``-W``, ``PYTHONWARNINGS``)
    apply as before."""
    from infkit.errors import Notice

    def plain(message: Any, category: type[Warning], *_: Any, **__: Any) -> str:
        kind = "notice" if issubclass(category, Notice) else "warning"
        return f"{command}: {kind}: {message}\n"

    python_form = warnings.formatwarning  # (catch_warnings does not restore this one)
    warnings.formatwarning = plain  # the form only: a recorder (pytest's) still records
    try:
        yield
    finally:
        warnings.formatwarning = python_form
