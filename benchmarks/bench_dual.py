"""Benchmark: method="dual" against method="exact" (and "cg" when registered), one run.

An MLP classifier with P >= 20 x N*C (the regime the dual method is for), softmax
cross-entropy, l2 = 1e-2, trained with ``infkit.train_to_optimum``. For scores (all test x train
pairs, estimators if / rif / newton), self-scores and a group removal (newton), it times the
fit plus the question for each method, checks that the dual answer agrees with the exact one
(relative error <= 1e-6) and prints time ratios (exact / dual: above 1 means dual is faster).

It also times the three NTK strategies of ``infkit.ntk.empirical_ntk`` on the trained model
(N*C x N*C, float64, full C x C blocks, one torch thread) against neural-tangents'
``empirical_ntk_fn`` (``trace_axes=()``, ``vmap_axes=0``, every ``NtkImplementation``), on the
same weights and inputs. neural-tangents runs in a separate venv (jax==0.4.38, built by
``WITH_JAX=1 bash ../shared/bench/peers-venv.sh``; default ``.venv-peers-jax``) as a
subprocess of this script (``--peer-ntk`` mode, which imports only jax, numpy and
neural-tangents), jit-compiled (compile timed separately), float64 (``jax_enable_x64``), one
XLA CPU thread, ``block_until_ready``, best of 3 after a warm-up run, like infkit. The same
MLP is written in plain JAX twice: with the torch weight layout (``x @ W.T + b``) and with the
JAX one (``x @ W + b``, W stored transposed); the fastest configuration is the peer. Without
that venv the NTK section says that neural-tangents was not compared.

Run:  .venv/bin/python benchmarks/bench_dual.py [--n 100 --classes 4 --hidden 80]
      [--jax-python .venv-peers-jax/bin/python] [--out benchmarks/results/bench_dual.md]
      (results/bench_dual.md: ``--threads 1``, about 5 minutes)
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JAX_PYTHON = ROOT / ".venv-peers-jax" / "bin" / "python"
#: one XLA CPU thread for the neural-tangents peer (infkit runs with torch.set_num_threads(1))
PEER_ENV = {
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "OMP_NUM_THREADS": "1",
    "JAX_PLATFORMS": "cpu",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}
NTK_REPEATS = 3


def peer_versions(args) -> dict:
    """The peer venv and the packages whose versions the results file records."""
    return {"JAX venv": (args.jax_python, ["neural-tangents", "jax", "jaxlib"])}


def pin_to_one_core() -> set[int] | None:
    """Restricts this process (and threads it starts later) to one core; the old affinity."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(old)})
    return old


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
    import torch
    from harness import provenance
    from problems import tanh_mlp

    import infkit
    from infkit.evaluate import relative_error

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
        "--jax-python",
        type=Path,
        default=JAX_PYTHON,
        help="python of the venv with jax==0.4.38 and neural-tangents (the NTK peer)",
    )
    parser.add_argument(
        "--ntk-only", action="store_true", help="only the NTK section (a quick check)"
    )
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
    if args.ntk_only:
        title = f"# Empirical NTK: infkit vs neural-tangents, MLP {d}-{h}-{h}-{c} (tanh)"
        text = "\n".join(
            [title, "", provenance(peer_versions(args)), "", *ntk_section(model, X, args)]
        )
        print(text)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        return

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
        provenance(peer_versions(args)),
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

    lines += ntk_section(model, X, args)
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


# ============================================================================ NTK vs neural-tangents
def ntk_section(model, X, args) -> list[str]:
    """Times infkit's NTK strategies and neural-tangents' implementations; the table's lines."""
    import torch

    from infkit.ntk import empirical_ntk

    n, c = X.shape[0], model(X[:1]).shape[1]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    affinity = pin_to_one_core()
    try:
        ours: dict[str, tuple[torch.Tensor, float]] = {}
        for strategy in ("structured", "jacobian", "jvp"):
            run = lambda strategy=strategy: empirical_ntk(model, X, strategy=strategy)  # noqa: E731
            run()  # warm-up, untimed
            ours[strategy] = best_of(NTK_REPEATS, run)
    finally:
        torch.set_num_threads(threads)
        if affinity is not None:
            os.sched_setaffinity(0, affinity)
    ref = ours["jacobian"][0]
    best_ours = min(ours, key=lambda k: ours[k][1])
    for strategy, (_, t) in ours.items():
        print(f"infkit {strategy:10s} NTK {t:.4f} s")

    peer, reason = run_ntk_peer(model, X, args)
    lines = [
        f"Empirical NTK ({n * c} x {n * c}, float64, full {c} x {c} blocks) of the trained model "
        f"on the {n} training inputs, best of {NTK_REPEATS} after an untimed warm-up run, one "
        "thread, the process pinned to a single core (`os.sched_setaffinity`) while it times.",
        "",
    ]
    if peer is None:
        lines += [
            "| strategy | time (s) | vs jacobian | max abs diff |",
            "|---|---|---|---|",
        ]
        for strategy, (K, t) in ours.items():
            ratio = ours["jacobian"][1] / t
            lines.append(
                f"| {strategy} | {t:.4f} | {ratio:.1f}x | {float((K - ref).abs().max()):.1e} |"
            )
        return [*lines, "", f"neural-tangents was not compared: {reason}", ""]

    nt_rows = peer["rows"]
    ok = [r for r in nt_rows if "seconds" in r]
    best_nt = min(ok, key=lambda r: r["seconds"]) if ok else None
    lines += [
        f"infkit {peer['infkit']}: `infkit.ntk.empirical_ntk(model, X, strategy=...)`, eager "
        "PyTorch, `torch.set_num_threads(1)`, one core. neural-tangents "
        f"{peer['neural_tangents']} (jax {peer['jax']}): `jax.jit(empirical_ntk_fn(f, "
        "trace_axes=(), vmap_axes=0, implementation=...))`, compiled once ahead of the timed "
        "calls (compile time shown separately), `jax_enable_x64`, XLA_FLAGS "
        f"`{PEER_ENV['XLA_FLAGS']}` and, as for infkit, pinned to one core (with the flags "
        "alone the JAX process still kept a second core partly busy, about 1.6 CPU s per wall "
        "s when this benchmark was written), `block_until_ready`, in a subprocess of the JAX "
        "venv; its "
        "[N, N, C, C] kernel is reordered to infkit's [N*C, N*C] rows (i*C + c). Same "
        "weights and inputs (exported from the torch model); f is the same MLP in plain JAX, "
        "once with torch's weight layout (`x @ W.T + b`) and once with JAX's (`x @ W + b`, "
        f"W stored [in, out]). max |K| = {float(ref.abs().max()):.1f}.",
        "",
        "| library | strategy / implementation | time (s) | jit compile (s) | time / "
        "neural-tangents best | max abs diff vs infkit jacobian |",
        "|---|---|---|---|---|---|",
    ]
    for strategy, (K, t) in ours.items():
        rel = f"{t / best_nt['seconds']:.2f}x" if best_nt else "-"
        lines.append(
            f"| infkit | {strategy} | {t:.4f} | - (eager) | {rel} | "
            f"{float((K - ref).abs().max()):.1e} |"
        )
    for r in nt_rows:
        name = f"{r['implementation']}, {r['layout']}"
        if "seconds" not in r:
            lines.append(f"| neural-tangents | {name} | failed: {r['error']} | - | - | - |")
            continue
        K = torch.as_tensor(peer["kernels"][r["key"]])
        lines.append(
            f"| neural-tangents | {name} | {r['seconds']:.4f} | {r['compile']:.2f} | "
            f"{r['seconds'] / best_nt['seconds']:.2f}x | {float((K - ref).abs().max()):.1e} |"
        )
    lines.append("")
    if best_nt is None:
        return [*lines, "Every neural-tangents implementation failed (see the table).", ""]
    t_ours = ours[best_ours][1]
    ratio = t_ours / best_nt["seconds"]
    with_compile = t_ours / (best_nt["seconds"] + best_nt["compile"])
    lines += [
        f"Fastest: infkit `{best_ours}` {t_ours:.4f} s; neural-tangents "
        f"`{best_nt['implementation']}` ({best_nt['layout']}) {best_nt['seconds']:.4f} s "
        f"once compiled. Ratio infkit / neural-tangents = {ratio:.2f}x excluding compilation "
        f"(target <= 0.1x: {'met' if ratio <= 0.1 else 'not met'}); counting neural-tangents' "
        f"one-off jit compile of {best_nt['compile']:.2f} s (a new compile for every new input "
        f"shape), {with_compile:.3f}x.",
    ]
    per_layout = {}
    for r in ok:
        if r["layout"] not in per_layout or r["seconds"] < per_layout[r["layout"]]["seconds"]:
            per_layout[r["layout"]] = r
    if len(per_layout) > 1:
        lines += [
            "",
            "Best per weight layout: "
            + "; ".join(
                f"`{layout}` {r['seconds']:.4f} s ({r['implementation']})"
                for layout, r in per_layout.items()
            )
            + ". neural-tangents' structured-derivative rules pay off only with the JAX layout; "
            "with the transposed torch layout every implementation costs about as much as an "
            "explicit Jacobian contraction.",
        ]
    if peer.get("shim"):
        lines += [
            "",
            "neural-tangents 0.6.5's STRUCTURED_DERIVATIVES (and AUTO, which estimates the cost "
            "of all three) read `jax.interpreters.ad.source_info_util` and `ad.config`, which "
            "jax 0.4.38 no longer exports; the peer mode puts the two aliases back "
            "(`jax._src.source_info_util`, `jax.config`) before importing neural-tangents, "
            "without which those two fail with an AttributeError. Nothing else is changed.",
        ]
    return [*lines, ""]


def run_ntk_peer(model, X, args) -> tuple[dict | None, str]:
    """Exports the weights and inputs, runs ``--peer-ntk`` in the JAX venv; (results, reason)."""
    import numpy as np
    import torch

    import infkit

    if not args.jax_python.exists():
        return None, (
            f"it needs a separate JAX venv (jax==0.4.38) at {args.jax_python}, not built on "
            "this machine (WITH_JAX=1 bash ../shared/bench/peers-venv.sh)."
        )
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    arrays = {"X": X.detach().double().numpy()}
    for k, m in enumerate(linears):
        arrays[f"W{k}"] = m.weight.detach().double().numpy()
        arrays[f"b{k}"] = m.bias.detach().double().numpy()
    with tempfile.TemporaryDirectory(prefix="bench_dual_nt_") as tmp:
        work = Path(tmp)
        np.savez(work / "problem.npz", layers=len(linears), repeats=NTK_REPEATS, **arrays)
        env = {**os.environ, **PEER_ENV}
        cmd = [str(args.jax_python), str(Path(__file__).resolve()), "--peer-ntk", str(work)]
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return None, "the neural-tangents subprocess ran past 900 s."
        if proc.returncode != 0 or not (work / "result.json").exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            return None, f"the neural-tangents subprocess failed ({proc.returncode}): {tail[0]}"
        result = json.loads((work / "result.json").read_text())
        with np.load(work / "kernels.npz") as kernels:
            result["kernels"] = {key: kernels[key] for key in kernels.files}
    result["infkit"] = infkit.__version__
    for r in result["rows"]:
        if "seconds" in r:
            print(
                f"neural-tangents {r['implementation']:24s} {r['layout']:14s} NTK "
                f"{r['seconds']:.4f} s (compile {r['compile']:.2f} s)"
            )
        else:
            print(f"neural-tangents {r['implementation']:24s} {r['layout']:14s} {r['error']}")
    return result, ""


def peer_ntk(directory: Path) -> None:
    """Runs in the JAX venv (imports jax, numpy and neural-tangents only): times neural-tangents'
    empirical NTK on the exported MLP and writes result.json and kernels.npz to ``directory``."""
    for key, value in PEER_ENV.items():
        os.environ.setdefault(key, value)
    pinned = pin_to_one_core() is not None  # before jax starts its threads
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.interpreters.ad as public_ad
    import jax.numpy as jnp
    import numpy as np
    from jax._src import source_info_util

    # neural-tangents 0.6.5's structured derivatives read two names jax 0.4.38 no longer exports
    shim = not hasattr(public_ad, "source_info_util")
    if shim:
        public_ad.source_info_util = source_info_util
        public_ad.config = jax.config
    import neural_tangents as nt

    data = np.load(directory / "problem.npz")
    layers, repeats = int(data["layers"]), int(data["repeats"])
    X = jnp.asarray(data["X"])
    torch_params = [(jnp.asarray(data[f"W{k}"]), jnp.asarray(data[f"b{k}"])) for k in range(layers)]
    jax_params = [
        (jnp.asarray(np.ascontiguousarray(data[f"W{k}"].T)), jnp.asarray(data[f"b{k}"]))
        for k in range(layers)
    ]

    def mlp_torch_layout(params, x):
        for k, (W, b) in enumerate(params):
            x = x @ W.T + b
            if k < len(params) - 1:
                x = jnp.tanh(x)
        return x

    def mlp_jax_layout(params, x):
        for k, (W, b) in enumerate(params):
            x = x @ W + b
            if k < len(params) - 1:
                x = jnp.tanh(x)
        return x

    configs = [
        ("x @ W.T + b", mlp_torch_layout, torch_params),
        ("x @ W + b", mlp_jax_layout, jax_params),
    ]
    rows, kernels = [], {}
    for layout, f, params in configs:
        for impl in nt.NtkImplementation:
            key = f"{impl.name}|{layout}"
            row = {"implementation": impl.name, "layout": layout, "key": key}
            try:
                kernel_fn = nt.empirical_ntk_fn(f, trace_axes=(), vmap_axes=0, implementation=impl)
                start = time.perf_counter()
                compiled = jax.jit(kernel_fn).lower(X, None, params).compile()
                row["compile"] = time.perf_counter() - start
                compiled(X, None, params).block_until_ready()  # warm-up, untimed
                K, row["seconds"] = best_of(
                    repeats, lambda c=compiled, p=params: c(X, None, p).block_until_ready()
                )
            except Exception as error:  # a failing implementation is reported, not fatal
                row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
                rows.append(row)
                continue
            n, _, c, _ = K.shape
            kernels[key] = np.asarray(K).transpose(0, 2, 1, 3).reshape(n * c, n * c)
            rows.append(row)
    np.savez(directory / "kernels.npz", **kernels)
    result = {
        "rows": rows,
        "shim": shim,
        "pinned": pinned,
        "jax": jax.__version__,
        "neural_tangents": getattr(nt, "__version__", "?"),
        "devices": [str(d) for d in jax.devices()],
    }
    (directory / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--peer-ntk":
        peer_ntk(Path(sys.argv[2]))
    else:
        main()
