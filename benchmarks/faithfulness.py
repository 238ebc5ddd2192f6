"""Benchmark: how well each method predicts retraining (LDS with intervals, LOO, time).

The protocol of dattri's MNIST benchmarks on the real MNIST test set (``../shared/data/mnist``,
read in place; split into train and test with seed 0):

* ``--problem lr``: softmax regression (784 -> 10, float64) trained to its optimum of the
  mean-form objective with ``--l2``; the bank: ``--subsets`` random halves retrained to their
  optima (``infkit.retrain.subsets``, warm-started L-BFGS), and ``--loo`` examples each left out.
  Every registered method with its defaults (and RIF / Newton of ``exact``), and the multi-step
  Newton step for the removal of half the training set against retraining without it.
* ``--problem mlp``: dattri's MLP shape (784 -> 128 -> 64 -> 10, ReLU; no dropout: training is
  deterministic) trained by a recorded recipe (``infkit.Recipe``: full-batch gradient descent with
  momentum 0.9, ``--steps`` steps, a cosine schedule from ``--lr``, from one initialisation; with
  a constant learning rate the end of the run oscillates and every method loses: LDS 0.56-0.59
  for ``unrolled`` against 0.83 / 0.75 with the cosine schedule at N = 1,000); the banks: the recipe replayed from the
  same initialisation on random halves (dattri's protocol) and on subsets holding out 1%
  (EleutherAI's protocol for MAGIC) (``retrain.subsets(..., run=run)``). Methods: ``unrolled``
  (metagradients through the run), ``source`` (``--segments`` segments, curvature by Krylov
  products of the GGN),
  EK-FAC, damped IF by CG on the GGN, TRAK and the gradient dot
  product, each at the final parameters.

LDS: Spearman correlation over the subsets of predicted against actual test measurements (the
loss; a rank correlation per query, so the unretrained model's value needs no subtracting), per
test example, mean with a 95% bootstrap interval over test examples
(``infkit.evaluate.lds_interval``). Times are wall-clock on the machine named in the table
(noisy when shared); every method's fit and scores, the bank excluded.

* ``--problem mlp-seeds``: dattri's own protocol, where retraining is not a replay: minibatch
  SGD with momentum, every subset retrained from a new initialisation and data order; ``unrolled``
  and EK-FAC each on ``--models`` models of other seeds, one model against their ``Ensemble``.

Run: .venv/bin/python benchmarks/faithfulness.py --problem lr mlp [--n-train 5000]
[--n-test 500] [--queries 100] [--subsets 50] [--steps 300] [--out benchmarks/results/...]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_section, provenance
from problems import mnist_test_set, random_split

import infkit
from infkit.evaluate import Interval, lds_interval, loo_interval

RESULTS = Path(__file__).resolve().parent / "results" / "faithfulness.md"


def split(n_train: int, n_test: int, dtype: torch.dtype) -> tuple[tuple, tuple]:
    images, labels = mnist_test_set()
    train_idx, test_idx = random_split(len(labels), n_train, n_test, seed=0)
    X = torch.tensor(images, dtype=dtype)
    y = torch.tensor(labels)
    return (X[train_idx], y[train_idx]), (X[test_idx], y[test_idx])


def timed(fn):  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def row(name: str, lds: Interval, seconds: float, extra: str = "") -> str:
    return f"| {name} | {lds.mean:.3f} [{lds.low:.3f}, {lds.high:.3f}] | {extra} | {seconds:.1f} |"


# ---------------------------------------------------------------------------- MNIST-LR
LR_METHODS: list[tuple[str, str, dict]] = [
    ("exact", "if", {}),
    ("exact", "rif", {}),
    ("exact", "newton", {}),
    ("cg", "if", {}),
    ("lissa", "if", {}),
    ("arnoldi", "if", {}),
    ("datainf", "if", {}),
    ("kfac", "if", {}),
    ("ekfac", "if", {}),
    ("astra", "if", {}),
    ("identity", "if", {}),
    ("trak", "if", {}),
]


def mnist_lr(args: argparse.Namespace) -> list[str]:
    train, test = split(args.n_train, args.n_test, torch.float64)
    queries = (test[0][: args.queries], test[1][: args.queries])
    torch.manual_seed(0)
    model = torch.nn.Linear(784, 10).double()
    task = infkit.Task.classification(model)
    infkit.train_to_optimum(task, train, args.l2)
    cache = Path(args.cache) / "lr"
    bank, bank_time = timed(
        lambda: infkit.retrain.subsets(
            task,
            train,
            queries,
            args.l2,
            n_subsets=args.subsets,
            alpha=0.5,
            cache_dir=cache,
            progress=True,
        )
    )
    gen = torch.Generator().manual_seed(1)
    loo_idx = torch.randperm(args.n_train, generator=gen)[: args.loo]
    loo = infkit.retrain.leave_one_out(
        task, train, queries, loo_idx, args.l2, cache_dir=cache, progress=True
    )
    lines = [
        f"### MNIST-LR: N = {args.n_train}, {args.queries} test queries, l2 = {args.l2}, "
        f"{args.subsets} half subsets (bank {bank_time:.0f} s), LOO over {args.loo} examples",
        "",
        "| method | LDS [95% interval] | LOO Spearman [95%] | seconds |",
        "|---|---|---|---|",
    ]
    for method, estimator, options in LR_METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf = infkit.Influence(task, method, estimator, l2=args.l2, progress=False, **options)
            scores, seconds = timed(lambda inf=inf: inf.fit(train).scores(queries))
        lds = lds_interval(scores, bank.masks, bank.measurements)
        loo_ci = loo_interval(scores[:, loo_idx], loo.measurement)
        name = f"{method}" + ("" if estimator == "if" else f" + {estimator}")
        lines.append(
            row(name, lds, seconds, f"{loo_ci.mean:.3f} [{loo_ci.low:.3f}, {loo_ci.high:.3f}]")
        )
        print(lines[-1], flush=True)
    lines += ["", *half_removal(task, train, test, args)]
    return lines


def half_removal(
    task: infkit.Task, train: tuple, test: tuple, args: argparse.Namespace
) -> list[str]:
    """Multi-step Newton: removing a random half, predicted test-loss changes vs retraining."""
    gen = torch.Generator().manual_seed(2)
    removed = torch.randperm(args.n_train, generator=gen)[: args.n_train // 2]
    actual = infkit.retrain.without(task, train, removed, args.l2)
    with torch.no_grad():
        base = torch.nn.functional.cross_entropy(task.model(test[0]), test[1], reduction="none")
    change = actual.losses(test) - base
    inf = infkit.Influence(task, "exact", "newton", l2=args.l2, progress=False).fit(train)
    lines = ["| Newton steps (half removed) | Pearson with retraining | seconds |", "|---|---|---|"]
    for steps in (1, 2, 3, 5):
        try:
            effect, seconds = timed(lambda steps=steps: inf.remove(removed, steps=steps))
        except TypeError:  # remove() without steps
            lines.append(f"| {steps} | (not available) | |")
            continue
        r = infkit.evaluate.correlation(effect.loss(test), change).pearson
        lines.append(f"| {steps} | {r:.3f} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    return lines


# ---------------------------------------------------------------------------- MNIST-MLP
def mlp_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(784, 128),
        torch.nn.ReLU(),
        torch.nn.Linear(128, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def mnist_mlp(args: argparse.Namespace) -> list[str]:
    train, test = split(args.n_train, args.n_test, torch.float32)
    queries = (test[0][: args.queries], test[1][: args.queries])
    recipe = infkit.Recipe(
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=0.9,
        l2=args.l2,
        schedule=args.schedule,
    )
    task = infkit.Task.classification(mlp_model(args.seed))
    run, train_time = timed(lambda: recipe.train(task, train))
    with torch.no_grad():
        accuracy = float((task.model(test[0]).argmax(1) == test[1]).double().mean())
    banks = {}
    for label, alpha in (("50% subsets", 0.5), ("1% held out", 0.99)):
        bank, seconds = timed(
            lambda alpha=alpha: infkit.retrain.subsets(
                task,
                train,
                queries,
                args.l2,
                n_subsets=args.subsets,
                alpha=alpha,
                run=run,
                cache_dir=Path(args.cache) / f"mlp-{args.seed}",
                progress=True,
            )
        )
        banks[label] = bank
        print(f"bank {label}: {seconds:.0f} s", flush=True)
    methods: list[tuple[str, dict]] = [
        ("unrolled", {"run": run, "query_batch": args.query_batch}),
        ("source", {"run": run, "segments": args.segments, "krylov_steps": args.krylov_steps}),
        ("ekfac", {}),
        ("cg", {"maxiter": 100, "tol": 1e-6}),
        ("trak", {}),
        ("identity", {}),
    ]
    lines = [
        f"### MNIST-MLP: 784-128-64-10 ReLU, N = {args.n_train}, {args.queries} test queries, "
        f"recipe full-batch {args.optimizer}, lr {args.lr} ({args.schedule}), {args.steps} steps, "
        f"l2 {args.l2} "
        f"(train {train_time:.0f} s, test accuracy {accuracy:.3f}), {args.subsets} subsets per "
        "bank",
        "",
        "| method | LDS, 50% subsets [95%] | LDS, 1% held out [95%] | seconds |",
        "|---|---|---|---|",
    ]
    for method, options in methods:
        if args.methods and method not in args.methods:
            continue
        damping = args.damping if method in ("cg",) else 0.0
        l2 = args.l2
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf = infkit.Influence(task, method, l2=l2, damping=damping, progress=False, **options)
            scores, seconds = timed(lambda inf=inf: inf.fit(train).scores(queries))
        cells = []
        for bank in banks.values():
            ci = lds_interval(scores, bank.masks, bank.measurements)
            cells.append(f"{ci.mean:.3f} [{ci.low:.3f}, {ci.high:.3f}]")
        name = method if method != "cg" else f"cg (damped IF, damping {damping})"
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    return lines


def mnist_mlp_seeds(args: argparse.Namespace) -> list[str]:
    """dattri's own protocol: minibatch SGD, and every retraining with a new seed (init and data
    order). No single run's trajectory is the ground truth any more; an ensemble over seeds
    estimates the expected change."""
    train, test = split(args.n_train, args.n_test, torch.float32)
    queries = (test[0][: args.queries], test[1][: args.queries])
    n = args.n_train
    steps = args.epochs * -(-n // args.batch_size)

    def recipe(seed: int) -> infkit.Recipe:
        return infkit.Recipe(
            steps=steps,
            lr=args.lr,
            optimizer="momentum",
            batch_size=args.batch_size,
            l2=args.l2,
            schedule="cosine",
            seed=seed,
        )

    masks = infkit.retrain.random_masks(n, args.subsets, 0.5, seed=7)
    actual = []
    start = time.perf_counter()
    for k, mask in enumerate(masks):
        task = infkit.Task.classification(mlp_model(1000 + k))
        recipe(1000 + k).train(task, train, weights=mask.float())
        with torch.no_grad():
            out = task.model(queries[0])
        actual.append(torch.nn.functional.cross_entropy(out, queries[1], reduction="none"))
    bank = torch.stack(actual).double()
    bank_time = time.perf_counter() - start
    members: dict[str, list[infkit.Influence]] = {"unrolled": [], "ekfac": []}
    member_scores: dict[str, list[torch.Tensor]] = {"unrolled": [], "ekfac": []}
    seconds: dict[str, float] = {"unrolled": 0.0, "ekfac": 0.0}
    for seed in range(args.models):
        task = infkit.Task.classification(mlp_model(seed))
        run = recipe(seed).train(task, train)
        for method, options in (
            ("unrolled", {"run": run, "query_batch": args.query_batch}),
            ("ekfac", {}),
        ):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                inf = infkit.Influence(task, method, l2=args.l2, progress=False, **options)
                scores, spent = timed(lambda inf=inf: inf.fit(train).scores(queries))
            members[method].append(inf)
            member_scores[method].append(scores)
            seconds[method] += spent
    lines = [
        f"### dattri's protocol: MNIST-MLP, minibatch SGD (momentum 0.9, batch {args.batch_size}, "
        f"{args.epochs} epochs = {steps} steps, cosine from {args.lr}), N = {n}, "
        f"{args.queries} queries, {args.subsets} half subsets each retrained with a new seed "
        f"(init and data order; bank {bank_time:.0f} s)",
        "",
        "| method | one model: LDS (mean over models) | ensemble of all: LDS [95%] | seconds (all) |",
        "|---|---|---|---|",
    ]
    for method, fitted in members.items():
        single = [lds_interval(s, masks, bank).mean for s in member_scores[method]]
        ensemble = infkit.Ensemble(fitted).scores(queries)
        ci = lds_interval(ensemble, masks, bank)
        lines.append(
            f"| {method} x {len(fitted)} | {sum(single) / len(single):.3f} | "
            f"{ci.mean:.3f} [{ci.low:.3f}, {ci.high:.3f}] | {seconds[method]:.0f} |"
        )
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--problem", nargs="+", default=["lr", "mlp"], choices=["lr", "mlp", "mlp-seeds"]
    )
    parser.add_argument("--n-train", type=int, default=5000)
    parser.add_argument("--n-test", type=int, default=500)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--subsets", type=int, default=50)
    parser.add_argument("--loo", type=int, default=40)
    parser.add_argument("--l2", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--damping", type=float, default=1e-3)
    parser.add_argument("--optimizer", default="momentum", choices=["sgd", "momentum", "adam"])
    parser.add_argument("--schedule", default="cosine", choices=["constant", "cosine", "linear"])
    parser.add_argument("--query-batch", type=int, default=25)
    parser.add_argument("--segments", type=int, default=4)
    parser.add_argument("--models", type=int, default=4, help="mlp-seeds: models per ensemble")
    parser.add_argument("--epochs", type=int, default=10, help="mlp-seeds: epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="mlp-seeds: minibatch size")
    parser.add_argument("--krylov-steps", type=int, default=20)
    parser.add_argument("--methods", nargs="*", help="MNIST-MLP: only these methods")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default="runs/faithfulness-cache")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["## Faithfulness: LDS with intervals against retraining", "", provenance(), ""]
    for problem in args.problem:
        run = {"lr": mnist_lr, "mlp": mnist_mlp, "mlp-seeds": mnist_mlp_seeds}[problem]
        lines += [*run(args), ""]
    print(append_section(args.out, lines))


if __name__ == "__main__":
    main()
