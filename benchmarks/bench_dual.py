"""Benchmark: method="dual" against method="exact" (and "cg" when registered), one run.

An MLP classifier with P >= 20 x N*C (the regime the dual method is for), softmax
cross-entropy, l2 = 1e-2, trained with ``infkit.train_to_optimum``. For scores (all test x train
pairs, estimators if / rif / newton), self-scores and a group removal (newton), it times the
fit plus the question for each method, checks that the dual answer agrees with the exact one
(relative error <= 1e-6) and prints time ratios (exact / dual: above 1 means dual is faster).
It also times the three NTK strategies against each other on the same model.

Run:  .venv/bin/python benchmarks/bench_dual.py [--n 100 --classes 4 --hidden 80]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from problems import tanh_mlp

import infkit
from infkit.evaluate import relative_error
from infkit.ntk import empirical_ntk

ROOT = Path(__file__).resolve().parents[1]


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def best_of(k: int, fn):
    times, out = [], None
    for _ in range(k):
        out, t = timed(fn)
        times.append(t)
    return out, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100, help="training examples")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=80)
    parser.add_argument("--n-test", type=int, default=50)
    parser.add_argument("--group", type=int, default=20, help="size of the removed group")
    parser.add_argument("--l2", type=float, default=1e-2)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "bench_dual.md"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gen = torch.Generator().manual_seed(0)
    n, c, d, h = args.n, args.classes, args.inputs, args.hidden
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    Xt = torch.randn(args.n_test, d, generator=gen, dtype=torch.float64)
    proj = torch.randn(d, c, generator=gen, dtype=torch.float64)
    y = (X @ proj + 0.5 * torch.randn(n, c, generator=gen, dtype=torch.float64)).argmax(1)
    yt = (Xt @ proj).argmax(1)
    torch.manual_seed(0)
    model = tanh_mlp([d, h, h, c]).double()
    p = sum(t.numel() for t in model.parameters())
    print(
        f"MLP {d}-{h}-{h}-{c}: P = {p:,}, N = {n}, C = {c}, N*C = {n * c}, P / (N*C) = "
        f"{p / (n * c):.1f}; {args.n_test} test points; torch threads {torch.get_num_threads()}"
    )
    task = infkit.Task.classification(model)
    train, test = (X, y), (Xt, yt)
    fit = infkit.train_to_optimum(task, train, args.l2, tolerance=1e-6)
    print(f"trained: {fit.evaluations} evaluations, ||grad L|| = {fit.gradient_norm:.1e}")
    group = torch.randperm(n, generator=gen)[: args.group]

    methods = ["exact", "dual"] + (["cg"] if "cg" in infkit.methods() else [])
    questions = {
        "scores": lambda inf: inf.scores(test),
        "self-scores": lambda inf: inf.self_scores(),
        "group removal": lambda inf: inf.remove(group).params,
    }
    times: dict[tuple[str, str, str], float] = {}
    answers: dict[tuple[str, str, str], torch.Tensor] = {}
    for estimator in ("if", "rif", "newton"):
        for name in methods:
            if estimator not in infkit.methods()[name]["estimators"]:
                continue
            for label, question in questions.items():
                # a fresh fit every time: nothing is reused between questions or repeats
                def run(name=name, estimator=estimator, question=question):
                    return question(infkit.Influence(task, name, estimator, l2=args.l2).fit(train))

                out, t = best_of(1 if name == "exact" else 3, run)
                times[(estimator, name, label)] = t
                answers[(estimator, name, label)] = out
                print(f"{estimator:6s} {name:6s} {label:14s} fit + question {t:8.3f} s")

    others = [m for m in methods if m != "dual"]
    head = " | ".join(f"{m} (s) | {m} / dual | {m} rel. error" for m in others)
    lines = [
        "# method='dual' vs " + " and ".join(f"method='{m}'" for m in others) + " (one run)",
        "",
        f"Produced by `benchmarks/bench_dual.py` on {platform.machine()}, "
        f"{torch.get_num_threads()} torch threads, torch {torch.__version__}.",
        "",
        f"MLP {d}-{h}-{h}-{c} (tanh), P = {p:,}; N = {n} training points, C = {c} classes, "
        f"N*C = {n * c} (P / N*C = {p / (n * c):.1f}); {args.n_test} test points; softmax "
        f"cross-entropy, l2 = {args.l2:g}; removed group of {args.group}. Each time is a fresh "
        "fit plus one question (best of 3; exact: 1 run), in seconds. Ratios are other / dual "
        "(above 1: dual is faster); errors are relative to method='exact'.",
        "",
        f"| estimator | question | dual (s) | {head} |",
        "|---|---|---|" + "---|" * (3 * len(others)),
    ]
    worst = 0.0
    for estimator in ("if", "rif", "newton"):
        for label in questions:
            t_du = times[(estimator, "dual", label)]
            ref = answers[(estimator, "exact", label)]
            worst = max(worst, relative_error(answers[(estimator, "dual", label)], ref))
            cells = [f"{t_du:.3f}"]
            for m in others:
                if (estimator, m, label) not in times:
                    cells += ["-", "-", "-"]
                    continue
                t = times[(estimator, m, label)]
                err = relative_error(answers[(estimator, m, label)], ref)
                cells += [f"{t:.3f}", f"{t / t_du:.1f}x", f"{err:.1e}" if m != "exact" else "ref"]
            lines.append(f"| {estimator} | {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Largest relative error dual vs exact: {worst:.1e} (target <= 1e-6).", ""]
    if "cg" not in methods:
        lines += ["No method='cg' is registered in this build, so there is no CG column.", ""]

    # NTK strategies on the same model and data
    strategies = {}
    for strategy in ("structured", "jacobian", "jvp"):
        K, t = best_of(3, lambda strategy=strategy: empirical_ntk(model, X, strategy=strategy))
        strategies[strategy] = (K, t)
    ref = strategies["jacobian"][0]
    lines += [
        f"Empirical NTK ({n * c} x {n * c}, float64), best of 3:",
        "",
        "| strategy | time (s) | vs jacobian | max abs diff |",
        "|---|---|---|---|",
    ]
    for strategy, (K, t) in strategies.items():
        ratio = strategies["jacobian"][1] / t
        lines.append(
            f"| {strategy} | {t:.4f} | {ratio:.1f}x | {float((K - ref).abs().max()):.1e} |"
        )
    lines += [
        "",
        "neural-tangents was not compared: it needs a separate JAX venv (jax==0.4.38), not "
        "built on this machine.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
