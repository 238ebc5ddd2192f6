"""The ``infkit`` command line (also ``python -m infkit``).

Subcommands:

* ``infkit demo [--out DIR] [--quick] [--seed N] [--threads N]``: the digits analysis of
  :mod:`infkit.demo`, written to a run directory (default ``runs/demo-<timestamp>``).
"""

from __future__ import annotations

import argparse
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``infkit`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from infkit.demo import DemoConfig, run_demo

        config = DemoConfig.create(args.out, seed=args.seed, quick=args.quick, threads=args.threads)
        run_demo(config)
    return 0
