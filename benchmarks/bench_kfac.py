"""Benchmark: infkit EK-FAC against kronfluence 1.0.1 EK-FAC, same model and data, one run.

For each problem (digits MLP 64-32-10 on sklearn's load_digits, 1,437 train / 360 test; and an
MNIST MLP 196-32-10 on 2x2-average-pooled images of the real MNIST test set, 8,000 train / 500
queries drawn with seed 0 from /work/shared/data/mnist, never copied), a tanh MLP is trained in
float64 to the optimum of mean cross-entropy + (1e-3/2)||theta||^2. Both libraries then score
every (query, train) pair of the float32 copy of that model, at the same explicit damping
lambda (kronfluence's ``damping_factor``; infkit ``l2=0, damping=lambda``), and are compared with
the dense damped GGN reference ``(1/N) u^T g``, ``u = (G + lambda I)^{-1} grad l(query)``, G the
dense mean-form GGN of infkit ``method="exact"`` (float64 model) and g the training gradients.

Reported: per damping, the Pearson correlation of all pairs with the reference; per library,
the wall time of factors + pairwise scores, best and median over ``--repeats`` x dampings (the
work does not depend on the damping; runs of the two libraries interleaved, each after an
untimed warm-up; the machine is shared, so the best is the least-disturbed run; one thread each
by default, the steadiest setting under contention). kronfluence runs in its own venv
(/work/main/.venv-peers, built by ../shared/bench/peers-venv.sh) as a worker process of this
script, with ``Analyzer(cpu=True)``, its default true Fisher (sampled labels), EK-FAC strategy
and the same batch sizes; losses passed to it are summed (its convention).

Run:  .venv/bin/python benchmarks/bench_kfac.py [--problems digits mnist] [--repeats 5]
      [--threads 1] [--cache-dir /tmp/bench_kfac]   (7-25 minutes without a cache,
      depending on the load)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from harness import kronfluence_analyzer, kronfluence_pairwise, provenance
from problems import MNIST_DIR, digits_split, mnist_test_set, pearson, random_split, tanh_mlp

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-peers" / "bin" / "python"
L2_TRAIN = 1e-3


# ============================================================================ kronfluence worker
def peer_worker(directory: Path) -> None:
    """Runs inside the peer venv (torch + kronfluence only): factors + pairwise scores."""
    from kronfluence.analyzer import prepare_model
    from kronfluence.arguments import FactorArguments
    from kronfluence.task import Task

    config = json.loads((directory / "config.json").read_text())
    torch.set_num_threads(config["threads"])
    data = torch.load(directory / "data.pt")
    model = tanh_mlp(config["sizes"])
    model.load_state_dict(data["state"])
    model.eval()

    class Classification(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:
                with torch.no_grad():
                    probs = torch.softmax(logits.detach(), dim=-1)
                    y = torch.multinomial(probs, 1).flatten()
            return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return torch.nn.functional.cross_entropy(model(x), y, reduction="sum")

    train = torch.utils.data.TensorDataset(data["X_train"], data["y_train"])
    test = torch.utils.data.TensorDataset(data["X_test"], data["y_test"])
    task = Classification()
    model = prepare_model(model, task)
    out = {}
    warm = config["batch_size"]
    warm_train = torch.utils.data.Subset(train, range(min(warm, len(train))))
    warm_test = torch.utils.data.Subset(test, range(min(8, len(test))))
    for run in range(-1, config["repeats"]):  # run -1: an untimed warm-up on a small subset
        torch.manual_seed(max(run, 0))
        run_train, run_test = (warm_train, warm_test) if run < 0 else (train, test)
        analyzer = kronfluence_analyzer(model, task, directory / f"kf{run + 1}", "bench")
        start = time.perf_counter()
        analyzer.fit_all_factors(
            factors_name="ekfac",
            dataset=run_train,
            per_device_batch_size=config["batch_size"],
            factor_args=FactorArguments(strategy="ekfac"),
            overwrite_output_dir=True,
        )
        factors_time = time.perf_counter() - start
        for damping in config["dampings"]:
            start = time.perf_counter()
            scalar = None if damping == "auto" else damping
            kronfluence_pairwise(
                analyzer, f"s{damping}", run_train, run_test, config["batch_size"], scalar
            )
            score_time = time.perf_counter() - start
            if run < 0:
                continue
            scores = analyzer.load_pairwise_scores(f"s{damping}")["all_modules"]
            key = str(damping)
            entry = out.setdefault(key, {"times": [], "scores": None})
            entry["times"].append(factors_time + score_time)
            entry.setdefault("factors", []).append(factors_time)
            if entry["scores"] is None:
                entry["scores"] = scores.double().numpy()
    np.savez(
        directory / "kronfluence.npz",
        **{f"scores_{k}": v["scores"] for k, v in out.items()},
    )
    (directory / "kronfluence.json").write_text(
        json.dumps({k: {"times": v["times"], "factors": v["factors"]} for k, v in out.items()})
    )


# ============================================================================ problems
def load_digits_problem() -> dict:
    return {"name": "digits MLP 64-32-10", "sizes": [64, 32, 10], **digits_split()}


def load_mnist_problem(directory: Path, n_train: int, n_test: int, hidden: int) -> dict:
    images, labels = mnist_test_set(directory)
    pooled = images.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(images), 196)
    tr, te = random_split(len(labels), n_train, n_test)
    mean, std = pooled[tr].mean(0), pooled[tr].std(0) + 1e-2
    X = torch.tensor((pooled - mean) / std)
    return {
        "name": f"MNIST MLP 196-{hidden}-10 (14x14)",
        "sizes": [196, hidden, 10],
        "X_train": X[tr],
        "y_train": torch.tensor(labels[tr]),
        "X_test": X[te],
        "y_test": torch.tensor(labels[te]),
    }


def train(problem: dict, cache: Path | None = None) -> None:
    import infkit

    torch.manual_seed(0)
    model = tanh_mlp(problem["sizes"]).double()
    task = infkit.Task.classification(model)
    X, y = problem["X_train"], problem["y_train"]
    key = f"{problem['name']}-{len(y)}".replace(" ", "_").replace("/", "_")
    path = None if cache is None else cache / f"{key}.pt"
    if path is not None and path.exists():
        saved = torch.load(path)
        model.load_state_dict(saved["state"])
        problem.update(train_time=0.0, converged=saved["converged"] + " (cached)")
    else:
        start = time.perf_counter()
        result = infkit.train_to_optimum(task, (X, y), L2_TRAIN, tolerance=1e-9, max_iter=3000)
        problem["train_time"] = time.perf_counter() - start
        problem["converged"] = f"{result.converged}, ||grad L|| = {result.gradient_norm:.1e}"
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state": model.state_dict(), "converged": problem["converged"]}, path)
    problem["cache_key"] = path
    problem["model64"] = model
    with torch.no_grad():
        problem["accuracy"] = float(
            (model(problem["X_test"]).argmax(1) == problem["y_test"]).double().mean()
        )


def reference(problem: dict) -> dict:
    """Dense GGN (infkit exact, float64): H, its eigendecomposition, query and train gradients."""
    import infkit

    task = infkit.Task.classification(problem["model64"])
    train = (problem["X_train"], problem["y_train"])
    test = (problem["X_test"], problem["y_test"])
    path = problem.get("cache_key")
    path = None if path is None else path.with_suffix(".reference2.pt")
    if path is not None and path.exists():
        problem["reference_time"] = 0.0
        return torch.load(path)
    start = time.perf_counter()
    exact = infkit.Influence(task, "exact", l2=0.0, damping=1e-3, batch_size=256).fit(train)
    H = exact.method.data_curvature
    ev, U = torch.linalg.eigh(H)
    Q = exact.fitted.query_gradients(infkit.data.ExampleSet(test))
    G = exact.fitted.train_gradients
    if G is None:
        G = exact.fitted.query_gradients(infkit.data.ExampleSet(train))  # measurement = loss
    problem["reference_time"] = time.perf_counter() - start
    out = {"H": H, "Q": Q, "G": G, "ev": ev, "QU": Q @ U, "GU": G @ U, "n": len(G)}
    if path is not None:
        torch.save(out, path)
    return out


def reference_scores(ref: dict, damping: float | torch.Tensor) -> torch.Tensor:
    """Dense scores Q (H + D)^-1 G^T / N, D = damping I or diag(damping) (per parameter)."""
    if not isinstance(damping, torch.Tensor):
        return (ref["QU"] / (ref["ev"] + damping)) @ ref["GU"].T / ref["n"]
    A = ref["H"] + torch.diag(damping.to(ref["H"]))
    return torch.linalg.solve(A, ref["Q"].T).T @ ref["G"].T / ref["n"]


def heuristic_damping(inf) -> torch.Tensor:
    """infkit's damping="auto" as a per-parameter vector: 0.1 x mean(Lambda_l) on layer l."""
    curvature = inf.method.kronecker()
    d = torch.zeros(inf.n_params, dtype=torch.float64)
    for t in curvature.tracked:
        d[curvature.layers.layout.flat_index(t)] = curvature.module_damping[t.name]
    return d


# ============================================================================ infkit side
def infkit_run(
    problem: dict, damping: float, fisher: str, batch_size: int, warm_up: bool = False
) -> tuple:
    import infkit

    model = tanh_mlp(problem["sizes"])
    model.load_state_dict(problem["state32"])
    task = infkit.Task.classification(model)
    train = (problem["X_train"].float(), problem["y_train"])
    test = (problem["X_test"].float(), problem["y_test"])
    if warm_up:  # untimed, on a small subset, as for kronfluence
        train = (train[0][:batch_size], train[1][:batch_size])
        test = (test[0][:8], test[1][:8])
    start = time.perf_counter()
    inf = infkit.Influence(
        task, "ekfac", l2=0.0, damping=damping, batch_size=batch_size, fisher=fisher
    ).fit(train)
    fitted = time.perf_counter()
    S = inf.scores(test)
    end = time.perf_counter()
    if damping == "auto" and not warm_up:
        problem.setdefault("auto_damping", {})[fisher] = heuristic_damping(inf)
    return S.double(), (end - start, fitted - start)


def run_problem(problem: dict, args: argparse.Namespace) -> list[dict]:
    train(problem, args.cache_dir)
    print(
        f"\n== {problem['name']}: N={len(problem['y_train'])}, queries={len(problem['y_test'])}, "
        f"trained in {problem['train_time']:.1f}s (converged {problem['converged']}), "
        f"test accuracy {problem['accuracy']:.3f}",
        flush=True,
    )
    problem["state32"] = {k: v.float() for k, v in problem["model64"].state_dict().items()}
    ref = reference(problem)
    print(f"   dense GGN reference (P={ref['H'].shape[0]:,}) in {problem['reference_time']:.1f}s")
    with tempfile.TemporaryDirectory(prefix="bench_kfac_") as tmp:
        directory = Path(tmp)
        torch.save(
            {
                "state": problem["state32"],
                "X_train": problem["X_train"].float(),
                "y_train": problem["y_train"],
                "X_test": problem["X_test"].float(),
                "y_test": problem["y_test"],
            },
            directory / "data.pt",
        )
        # Interleave: one kronfluence worker run (all dampings) per infkit round.
        for fisher in args.fishers:
            infkit_run(problem, args.dampings[0], fisher, args.batch_size, warm_up=True)
        ours: dict[tuple[float, str], dict] = {}
        peer_times: list[tuple[float, float]] = []  # (factors + scores, factors)
        peer_scores: dict[str, np.ndarray] = {}
        for round_ in range(args.repeats):
            config = {
                "sizes": problem["sizes"],
                "dampings": args.dampings,
                "batch_size": args.batch_size,
                "repeats": 1,
                "threads": args.threads,
            }
            (directory / "config.json").write_text(json.dumps(config))
            subprocess.run(
                [str(args.peer_python), __file__, "--peer-worker", str(directory)],
                check=True,
                env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            timing = json.loads((directory / "kronfluence.json").read_text())
            saved = np.load(directory / "kronfluence.npz")
            for d in args.dampings:
                entry = timing[str(d)]
                peer_times += list(zip(entry["times"], entry["factors"]))
                peer_scores.setdefault(str(d), saved[f"scores_{d}"])
            for d in args.dampings:
                for fisher in args.fishers:
                    S, t = infkit_run(problem, d, fisher, args.batch_size)
                    ours.setdefault((d, fisher), {"times": [], "scores": S})["times"].append(t)
            print(f"   round {round_ + 1}/{args.repeats} done", flush=True)
    # The work does not depend on the damping: each library's time is its best (and median)
    # over all repeats x dampings, the least disturbed runs on a shared machine.
    result = {"problem": problem["name"], "n": len(problem["y_train"]), "q": len(problem["y_test"])}
    result["params"] = int(ref["H"].shape[0])
    result["time"] = {"kronfluence": _summary(peer_times)}
    for fisher in args.fishers:
        runs = [t for d in args.dampings for t in ours[(d, fisher)]["times"]]
        result["time"][f"infkit {fisher}"] = _summary(runs)
    result["corr"] = []
    for d in args.dampings:
        # damping "auto": the reference gets infkit's (exact-GGN) per-module heuristic damping
        R = reference_scores(ref, problem["auto_damping"][args.fishers[0]] if d == "auto" else d)
        row = {"damping": d, "kronfluence": pearson(torch.as_tensor(peer_scores[str(d)]), R)}
        for fisher in args.fishers:
            row[f"infkit {fisher}"] = pearson(ours[(d, fisher)]["scores"], R)
        result["corr"].append(row)
        print(
            f"   damping {_damping(d)}: pearson "
            + ", ".join(f"{k} {v:.4f}" for k, v in row.items() if k != "damping"),
            flush=True,
        )
    peer = result["time"]["kronfluence"]
    for name, summary in result["time"].items():
        print(
            f"   {name}: factors + scores {summary['best']:.2f}s best, {summary['median']:.2f}s "
            f"median (fit/factors part {summary['fit']:.2f}s); ratio to kronfluence "
            f"{summary['best'] / peer['best']:.2f} (best), {summary['median'] / peer['median']:.2f}"
            " (median)",
            flush=True,
        )
    return [result]


def _damping(d: float | str) -> str:
    return d if isinstance(d, str) else f"{d:g}"


def _summary(runs: list[tuple[float, float]]) -> dict:
    totals = sorted(r[0] for r in runs)
    best = min(runs)
    return {"best": best[0], "fit": best[1], "median": float(np.median(totals)), "runs": len(runs)}


def write_table(results: list[dict], args: argparse.Namespace, path: Path) -> None:
    fishers = [f"infkit {f}" for f in args.fishers]
    lines = [
        "# EK-FAC: infkit against kronfluence 1.0.1 (benchmarks/bench_kfac.py)",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores shared with other jobs (load "
        "varied during the runs), "
        f"torch {torch.__version__}, {args.threads} threads each, float32 models, batch size "
        f"{args.batch_size}. Same trained model and data for both libraries in one run.",
        "",
        provenance({"kronfluence venv": (args.peer_python, ["kronfluence", "torch"])}),
        "",
        "Correlation: Pearson over all (query, train) pairs with the dense damped GGN reference "
        '(infkit `method="exact"` on the float64 model, same damping, l2 = 0). kronfluence: '
        "EK-FAC, true Fisher with sampled labels (its default), explicit `damping_factor`. "
        'infkit: `method="ekfac"` with `fisher="ggn"` (exact expected GGN factors, the default '
        'when the model has <= 64 outputs) and `fisher="sampled"` (kronfluence\'s estimator). '
        'Damping "auto": each library\'s default heuristic, 0.1 x the mean eigenvalue of each '
        'module (kronfluence `damping_factor=None`, infkit `damping="auto"`); the reference then '
        "gets infkit's (exact-GGN) per-module values as a per-parameter damping.",
        "",
        "| problem | damping | "
        + " | ".join(f"{f} Pearson" for f in fishers)
        + " | kronfluence Pearson |",
        "|---|---|" + "---|" * (len(fishers) + 1),
    ]
    for r in results:
        for row in r["corr"]:
            lines.append(
                f"| {r['problem']} | {_damping(row['damping'])} | "
                + " | ".join(f"{row[f]:.4f}" for f in fishers)
                + f" | {row['kronfluence']:.4f} |"
            )
    lines += [
        "",
        "Wall time of factors + pairwise scores (all queries x all train). The work does not "
        "depend on the damping, so each entry is over all repeats x dampings: best (least "
        "disturbed) and median. For infkit, `Influence(...).fit` (training-gradient cache, "
        "stationarity check, factors) + `.scores`; the fit part is shown separately (kronfluence: "
        "its `fit_all_factors` part).",
        "",
        "| problem | N x queries, P | library | best s (fit part) | median s | ratio best | "
        "ratio median |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        peer = r["time"]["kronfluence"]
        for name, t in r["time"].items():
            lines.append(
                f"| {r['problem']} | {r['n']:,} x {r['q']}, {r['params']:,} | {name} | "
                f"{t['best']:.2f} ({t['fit']:.2f}) | {t['median']:.2f} | "
                f"{t['best'] / peer['best']:.2f} | {t['median'] / peer['median']:.2f} |"
            )
    lines += ["", "Targets: Pearson >= 0.9 and above kronfluence's; time ratio <= 0.5.", ""]
    lines += ["Summary of this run:", ""]
    for r in results:
        for f in fishers:
            above = sum(row[f] > row["kronfluence"] for row in r["corr"])
            reach = [_damping(row["damping"]) for row in r["corr"] if row[f] >= 0.9]
            t, peer = r["time"][f], r["time"]["kronfluence"]
            lines.append(
                f"* {r['problem']}, {f}: Pearson above kronfluence's at {above} of "
                f"{len(r['corr'])} dampings; >= 0.9 "
                + (f"at damping {', '.join(reach)}" if reach else "at none of them")
                + f"; time ratio {t['best'] / peer['best']:.2f} (best), "
                f"{t['median'] / peer['median']:.2f} (median)."
            )
    lines += [
        "",
        "EK-FAC's agreement with the dense GGN depends on the damping for every implementation: "
        "the smaller the damping, the more the small eigenvalues (where the Kronecker "
        "approximation is worst) matter. Timings on this shared 2-core machine swing by several "
        "times with the other jobs' load; with 2 threads OpenMP barriers under contention made "
        "single runs up to 8x slower, so `--threads 1` gives the steadier comparison.",
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=["digits", "mnist"])
    parser.add_argument(
        "--dampings",
        nargs="+",
        type=lambda v: v if v == "auto" else float(v),
        default=[1e-3, 1e-2, 3e-2, 1e-1, "auto"],
        help='numbers, or "auto": both libraries\' heuristic 0.1 x mean eigenvalue per module',
    )
    parser.add_argument("--fishers", nargs="+", default=["ggn", "sampled"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mnist-dir", type=Path, default=MNIST_DIR)
    parser.add_argument("--mnist-train", type=int, default=8000)
    parser.add_argument("--mnist-test", type=int, default=500)
    parser.add_argument("--mnist-hidden", type=int, default=32)
    parser.add_argument("--peer-python", type=Path, default=PEER_PYTHON)
    parser.add_argument(
        "--cache-dir", type=Path, default=None, help="reuse trained models and references"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kfac.md")
    args = parser.parse_args()
    if not args.peer_python.exists():
        sys.exit(
            f"kronfluence venv not found at {args.peer_python}: run ../shared/bench/peers-venv.sh"
        )
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.problems:
        problem = (
            load_digits_problem()
            if name == "digits"
            else load_mnist_problem(
                args.mnist_dir, args.mnist_train, args.mnist_test, args.mnist_hidden
            )
        )
        rows += run_problem(problem, args)
    write_table(rows, args, args.out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peer-worker":
        warnings.simplefilter("ignore")
        peer_worker(Path(sys.argv[2]))
    else:
        main()
