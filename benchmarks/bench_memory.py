"""Peak memory of ``scores()`` as a ratio to the size of its output (issue: bounded memory).

For each method (exact, ekfac, trak) a fresh process fits ``infkit.Influence`` on N = 50,000
synthetic training examples (64 Gaussian features, 10 random classes, a float32 64-32-10 tanh
MLP, P = 2,410) and computes ``scores`` for T = 2,000 test examples: a float32 [2,000, 50,000]
output of 400 MB. The process runs under ``/usr/bin/time -v``; the worker also reads its own
``VmRSS`` / ``VmHWM`` from /proc before and after ``scores()``.

Reported per method and code version:

* ``peak (time -v)``: the process's maximum resident set (fit included);
* ``before scores``: resident memory after ``fit``, the method's state (cached training gradients,
  factors, projected features) plus torch itself;
* ``scores peak - before``: what ``scores()`` added at its peak (VmHWM after minus VmRSS before;
  when fit's peak was higher, the figure is a lower bound and is marked ``<=``);
* ``ratio``: that increment over the output size. The target is 1.25 (the output plus chunk
  temporaries of at most a tenth of it, with room for the allocator).

The baseline is the same worker on the library at ``--baseline`` (default: 3dfce89, before the
change), exported with ``git archive`` into a temporary folder, in the same run.

Run:  .venv/bin/python benchmarks/bench_memory.py [--methods exact ekfac trak] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, export_source, measured_worker, provenance

N_TRAIN, N_TEST, FEATURES, HIDDEN, CLASSES = 50_000, 2_000, 64, 32, 10
RESULTS = ROOT / "benchmarks" / "results" / "memory.md"


def _status_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else 0


def worker(method: str) -> None:
    """Fit and score in this process; print one JSON line with the memory figures."""
    import warnings

    import torch

    import infkit

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    X = torch.randn(N_TRAIN + N_TEST, FEATURES)
    y = torch.randint(0, CLASSES, (N_TRAIN + N_TEST,))
    model = torch.nn.Sequential(
        torch.nn.Linear(FEATURES, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, CLASSES)
    )
    task = infkit.Task.classification(model)
    train, test = (X[:N_TRAIN], y[:N_TRAIN]), (X[N_TRAIN:], y[N_TRAIN:])
    options = {"damping": 1e-3} if method != "trak" else {}
    start = time.perf_counter()
    inf = infkit.Influence(task, method=method, l2=1e-3, progress=False, **options).fit(train)
    fit_seconds = time.perf_counter() - start
    before, hwm_fit = _status_kib("VmRSS"), _status_kib("VmHWM")
    start = time.perf_counter()
    S = inf.scores(test)
    score_seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "rss_before": before * 1024,
                "hwm_fit": hwm_fit * 1024,
                "hwm_after": _status_kib("VmHWM") * 1024,
                "output": S.numel() * S.element_size(),
                "dtype": str(S.dtype),
                "fit_s": fit_seconds,
                "scores_s": score_seconds,
            }
        ),
        flush=True,
    )


def measure(method: str, src: Path) -> dict:
    """Run the worker under /usr/bin/time -v with ``src`` on the path."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, __file__, "--worker", method]
    figures, peak = measured_worker(cmd, env, f"{method} worker")
    figures["peak_time_v"] = peak
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker")
    parser.add_argument("--methods", nargs="+", default=["exact", "ekfac", "trak"])
    parser.add_argument("--baseline", default="3dfce89")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    mib = 1 << 20
    versions = {
        "this tree": ROOT / "src",
        f"baseline {args.baseline}": export_source(args.baseline),
    }
    rows = []
    for method in args.methods:
        for label, src in versions.items():
            f = measure(method, src)
            added = f["hwm_after"] - f["rss_before"]
            bound = "<=" if f["hwm_after"] <= f["hwm_fit"] else ""
            ratio = added / f["output"]
            rows.append(
                f"| {method} | {label} | {f['output'] / mib:.0f} MiB {f['dtype']} | "
                f"{f['peak_time_v'] / mib:.0f} | {f['rss_before'] / mib:.0f} | "
                f"{bound}{added / mib:.0f} | {bound}{ratio:.2f} | {f['scores_s']:.1f} |"
            )
            print(rows[-1], flush=True)
    table = "\n".join(
        [
            "| method | code | output | peak, time -v (MiB) | before scores (MiB) | "
            "scores peak - before (MiB) | ratio to output | scores (s) |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    text = (
        "# Peak memory of scores() against its output\n\n"
        f"{provenance()}\n\n"
        f"N = {N_TRAIN:,} training and T = {N_TEST:,} test examples, float32 MLP "
        f"{FEATURES}-{HIDDEN}-{CLASSES}, 2 threads; `benchmarks/bench_memory.py`.\n\n"
        f"{table}\n"
    )
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
