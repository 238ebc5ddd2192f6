"""The ``infkit`` command line (also ``python -m infkit``).

Subcommands:

* ``infkit demo [--out DIR] [--quick] [--seed N] [--threads N]``: the digits analysis of
  :mod:`infkit.demo`, written to a run directory (default ``runs/demo-<timestamp>``); it needs
  the ``demo`` extra (``pip install "infkit[demo]"``: matplotlib and scikit-learn).
* ``infkit methods [--json]``: the registered methods, the estimators and quantities each
  supports, whether it scales to large models, and a one-line summary.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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
    return parser


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
        run_demo(config)
    elif args.command == "methods":
        print_methods(args.json)
    return 0
