"""Benchmark: infkit's matrix-free and sketched methods against the peer that has each, one run.

Methods and peers (same model, same data, same damped curvature, one process per peer):

    cg        pyDVL 0.10 CgInfluence              lissa    pyDVL LissaInfluence
    arnoldi   pyDVL ArnoldiInfluence               datainf  pyDVL InverseHarmonicMeanInfluence
    identity  captum 0.9 TracInCP (checkpoints)    trak     traker 0.3.2 TRAKer

Problems: the digits MLP (sklearn load_digits, 64-32-10 tanh, 1,437 train x 360 test) and a
larger MNIST MLP (784-h-10 tanh on a seeded split of the real MNIST test set, read from
``--mnist-dir``; the data is never copied). Models are trained in float64 to the optimum of
``mean_i CE_i + (l2/2)||theta||^2`` (l2 = 0.01) and then evaluated in **float32** by every
library. Every library is given the same damped curvature ``H + ridge I`` (ridge = 0.01 on
digits, i.e. the training l2; 0.1 on MNIST, i.e. l2 + 0.09 damping, so that LiSSA's
O(lambda_max / ridge) steps stay affordable for both libraries) and the raw training loss
gradients (peers do not attribute the regulariser share), so infkit runs with ``l2=0,
damping=ridge``. The reference is the exact damped GGN (infkit ``method="exact"``, float64) on
digits and infkit CG at tol 1e-10 in float64 on MNIST (exact to its tolerance; a dense P x P
curvature is too slow to form there); the exact damped Hessian is reported as well, because
pyDVL's CG/LiSSA/Arnoldi use the Hessian (its "Gauss-Newton" mode is the empirical Fisher).

Timings cover the influence step only (fit + all test x train scores), with
``torch.set_num_threads(--threads)`` (default 1: on a loaded 2-core machine a second intra-op
thread mostly adds synchronisation) in every process. Peers run in the separate venv built by
``bash ../shared/bench/peers-venv.sh benchmarks/.peers-venv`` as subprocesses of this script
(``--peer`` mode, which imports only torch and the peer library). The table is printed and
written to ``benchmarks/results/matrix_free.md``.

Run:  .venv/bin/python benchmarks/bench_matrix_free.py [--problems digits mnist] [--methods ...]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from harness import provenance
from problems import MNIST_DIR, digits_split, mnist_test_set, pearson, random_split, tanh_mlp

ROOT = Path(__file__).resolve().parents[1]
PEERS_PYTHON = ROOT / "benchmarks" / ".peers-venv" / "bin" / "python"
L2 = 1e-2  # weight decay of training (mean form)
#: infkit's batch size (examples per per-example-gradient batch; Arnoldi products use 4x):
#: 512, as captum gets, except CG: the facade's default 64, whose products run in CG's default
#: passes of 8 x 64 = 512 examples (fastest on both MLPs). pyDVL gets full-batch loaders (LiSSA:
#: the minibatch shown).
BATCH = 512
BATCH_OF = {"cg": 64}
#: runs shorter than this many seconds are timed twice (best of two), for infkit and peers alike
SHORT = 10.0
ALL_METHODS = ("cg", "lissa", "arnoldi", "datainf", "identity", "trak")
PEER_OF = {
    "cg": "pydvl-cg",
    "lissa": "pydvl-lissa",
    "arnoldi": "pydvl-arnoldi",
    "datainf": "pydvl-datainf",
    "identity": "captum-tracincp",
    "trak": "traker",
}
PEER_LABEL = {
    "pydvl-cg": "pyDVL CgInfluence",
    "pydvl-lissa": "pyDVL LissaInfluence (infkit's s, J, batch)",
    "pydvl-lissa-defaults": "pyDVL LissaInfluence (its defaults: s=10, 1000 it, batch 256)",
    "pydvl-arnoldi": "pyDVL ArnoldiInfluence",
    "pydvl-datainf": "pyDVL InverseHarmonicMeanInfluence",
    "captum-tracincp": "captum TracInCP",
    "traker": "traker TRAKer",
}


# ============================================================================ peer mode
def run_peer(peer: str, workdir: Path, threads: int) -> None:
    """Runs one peer on the saved problem; writes scores [n_test, n_train] and the time."""
    torch.set_num_threads(threads)
    problem = torch.load(workdir / "problem.pt")
    settings = json.loads((workdir / "settings.json").read_text())
    Xtr, ytr, Xte, yte = (problem[k] for k in ("X_train", "y_train", "X_test", "y_test"))
    settings["ridge"] = problem["ridge"]
    model = tanh_mlp(problem["sizes"])
    model.load_state_dict(problem["state"])
    model.eval()
    info: dict = {}
    if peer == "captum-tracincp":  # captum loads checkpoints from files: write them untimed
        for k, (state, lr) in enumerate(zip(problem["checkpoints"], problem["learning_rates"])):
            torch.save({"state": state, "lr": lr}, workdir / f"checkpoint_{k}.pt")
    elapsed = float("inf")
    for _ in range(2):  # best of two when a run is short (the machine is shared)
        start = time.perf_counter()
        if peer.startswith("pydvl"):
            scores = _pydvl(peer, model, Xtr, ytr, Xte, yte, settings, info)
        elif peer == "captum-tracincp":
            scores = _captum_tracincp(model, Xtr, ytr, Xte, yte, problem, workdir)
        elif peer == "traker":
            scores = _traker(model, Xtr, ytr, Xte, yte, settings, workdir)
        else:
            raise SystemExit(f"unknown peer {peer}")
        elapsed = min(elapsed, time.perf_counter() - start)
        if elapsed > SHORT:
            break
    torch.save(torch.as_tensor(scores).double(), workdir / f"{peer}.pt")
    matrix_file = workdir / "trak_matrix.pt"
    if peer == "traker" and matrix_file.exists():  # untimed: infkit's projection, agreement
        R = torch.load(matrix_file)
        same = _traker_scores(model, Xtr, ytr, Xte, yte, R.shape[1], workdir / "trak_b", R)
        torch.save(same.double(), workdir / "traker-same-projection.pt")
    print(json.dumps({"peer": peer, "seconds": elapsed, **info}))


def _pydvl(peer, model, Xtr, ytr, Xte, yte, settings, info):
    import logging

    from pydvl.influence import InfluenceMode
    from pydvl.influence.torch import (
        ArnoldiInfluence,
        BlockMode,
        CgInfluence,
        InverseHarmonicMeanInfluence,
        LissaInfluence,
    )
    from torch.utils.data import DataLoader, TensorDataset

    logging.getLogger("pydvl").setLevel(logging.ERROR)  # LiSSA's misleading "nan %" warning
    loss = torch.nn.functional.cross_entropy  # mean over the batch, as pyDVL expects
    s, ridge = settings[peer], settings["ridge"]
    if peer == "pydvl-lissa-defaults":
        peer = "pydvl-lissa"
    loader = DataLoader(TensorDataset(Xtr, ytr), batch_size=s.get("batch_size", len(ytr)))
    if peer == "pydvl-cg":
        model_if = CgInfluence(
            model,
            loss,
            regularization=ridge,
            rtol=s["rtol"],
            atol=s["atol"],
            solve_simultaneously=s["block"],
        )
    elif peer == "pydvl-lissa":
        model_if = LissaInfluence(
            model,
            loss,
            regularization=ridge,
            maxiter=s["maxiter"],
            scale=s["scale"],
            dampen=0.0,
            rtol=s["rtol"],
            warn_on_max_iteration=False,
        )
    elif peer == "pydvl-arnoldi":
        model_if = ArnoldiInfluence(
            model, loss, regularization=ridge, rank=s["rank"], krylov_dimension=s["krylov"]
        )
    else:
        model_if = InverseHarmonicMeanInfluence(
            model, loss, regularization=ridge, block_structure=BlockMode.PARAMETER_WISE
        )
    model_if = model_if.fit(loader)
    if peer == "pydvl-datainf":
        # pyDVL 0.10 inverts its own key check and refuses every valid per-block dict
        # (base.py _build_regularization_dict); set the per-block values as
        # with_regularization would.
        for name, reg in s["regularization"].items():
            model_if.block_mapper.composable_block_dict[name].op.regularization = reg
    chunk = s.get("test_chunk", len(yte))
    parts = [
        model_if.influences(Xte[i : i + chunk], yte[i : i + chunk], Xtr, ytr, InfluenceMode.Up)
        for i in range(0, len(yte), chunk)
    ]
    return torch.cat(parts).detach()


def _captum_tracincp(model, Xtr, ytr, Xte, yte, problem, workdir):
    from captum.influence import TracInCP
    from torch.utils.data import TensorDataset

    paths = sorted(str(p) for p in workdir.glob("checkpoint_*.pt"))  # saved before timing

    def load(m, path):
        saved = torch.load(path)
        m.load_state_dict(saved["state"])
        return saved["lr"]

    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    tracin = TracInCP(
        model,
        TensorDataset(Xtr, ytr),
        paths,
        checkpoints_load_func=load,
        loss_fn=loss_fn,
        batch_size=512,
        sample_wise_grads_per_batch=True,
    )
    return tracin.influence((Xte, yte), show_progress=False).detach()


def _traker(model, Xtr, ytr, Xte, yte, settings, workdir):
    s = settings["traker"]
    save_dir = Path(tempfile.mkdtemp(prefix="trak_", dir=workdir))
    return _traker_scores(model, Xtr, ytr, Xte, yte, s["proj_dim"], save_dir, None)


def _traker_scores(model, Xtr, ytr, Xte, yte, proj_dim, save_dir, matrix):
    from trak import TRAKer
    from trak.projectors import AbstractProjector, BasicProjector, ProjectionType
    from trak.utils import vectorize

    class MatrixProjector(AbstractProjector):
        def __init__(self, R: torch.Tensor) -> None:
            self.R, self.proj_dim, self.device, self.dtype = R, R.shape[1], "cpu", R.dtype
            self.seed, self.proj_type, self.model_id = 0, ProjectionType.normal, 0

        def project(self, grads, model_id: int) -> torch.Tensor:
            if isinstance(grads, dict):
                grads = vectorize(grads, device="cpu")
            return grads.to(self.dtype) @ self.R

        def free_memory(self) -> None:
            pass

    params = sum(p.numel() for p in model.parameters())
    projector = (
        BasicProjector(
            grad_dim=params,
            proj_dim=proj_dim,
            seed=0,
            proj_type=ProjectionType.rademacher,
            device="cpu",
            dtype=torch.float32,
        )
        if matrix is None
        else MatrixProjector(matrix.float())
    )
    traker = TRAKer(
        model=model,
        task="image_classification",
        train_set_size=len(ytr),
        save_dir=str(save_dir),
        device="cpu",
        projector=projector,
        proj_dim=proj_dim,
        use_half_precision=False,
        logging_level=40,
    )
    state = model.state_dict()
    batch = 256
    traker.load_checkpoint(state, model_id=0)
    for i in range(0, len(ytr), batch):
        xb, yb = Xtr[i : i + batch], ytr[i : i + batch]
        traker.featurize(batch=(xb, yb), num_samples=len(yb))
    traker.finalize_features()
    traker.start_scoring_checkpoint(
        exp_name="bench", checkpoint=state, model_id=0, num_targets=len(yte)
    )
    for i in range(0, len(yte), batch):
        xb, yb = Xte[i : i + batch], yte[i : i + batch]
        traker.score(batch=(xb, yb), num_samples=len(yb))
    scores = traker.finalize_scores(exp_name="bench")  # [n_train, n_test]
    return torch.as_tensor(np.asarray(scores)).T


# ============================================================================ problems
def load_digits_problem() -> dict:
    return {
        "name": "digits MLP 64-32-10",
        "sizes": [64, 32, 10],
        **digits_split(),
        "reference": "exact",
        "ridge": 1e-2,  # damped curvature H + ridge I (= the training l2: no extra damping)
    }


def load_mnist_problem(directory: Path, n_train: int, n_test: int, hidden: int) -> dict:
    images, labels = mnist_test_set(directory)
    tr, te = random_split(len(labels), n_train, n_test)
    mean, std = images[tr].mean(), images[tr].std()
    X = torch.tensor((images - mean) / std)
    return {
        "name": f"MNIST MLP 784-{hidden}-10",
        "sizes": [784, hidden, 10],
        "X_train": X[tr],
        "y_train": torch.tensor(labels[tr]),
        "X_test": X[te],
        "y_test": torch.tensor(labels[te]),
        "reference": "cg",
        "ridge": 1e-1,  # l2 0.01 + damping 0.09: LiSSA needs O(lambda_max / ridge) steps
    }


def train(problem: dict, cache: Path | None = None) -> None:
    """float64: 300 full-batch SGD steps (checkpoints at 100, 200) then L-BFGS to the optimum.

    With ``cache`` (a directory), the trained parameters are kept there and reused.
    """
    import infkit

    torch.manual_seed(0)
    model = tanh_mlp(problem["sizes"]).double()
    key = f"{problem['name']}-{len(problem['y_train'])}".replace(" ", "_")
    path = None if cache is None else cache / f"{key}.pt"
    if path is not None and path.exists():
        saved = torch.load(path)
        model.load_state_dict(saved["model64"])
        problem.update(saved["problem"], model64=model)
        return
    task = infkit.Task.classification(model)
    X, y = problem["X_train"], problem["y_train"]
    lr, checkpoints = 0.5, []
    optimiser = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(1, 301):
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        reg = 0.5 * L2 * sum(p.pow(2).sum() for p in model.parameters())
        (loss + reg).backward()
        optimiser.step()
        if step in (100, 200):
            checkpoints.append({k: v.clone().float() for k, v in model.state_dict().items()})
    result = infkit.train_to_optimum(task, (X, y), L2, tolerance=1e-10, max_iter=5000)
    problem["model64"] = model
    problem["converged"] = f"{result.converged}, ||grad L|| = {result.gradient_norm:.1e}"
    final = {k: v.clone().float() for k, v in model.state_dict().items()}
    problem["state"] = final
    problem["checkpoints"] = [*checkpoints, final]
    problem["learning_rates"] = [lr * 100, lr * 100, lr * 100]  # 100 steps between checkpoints
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = ("converged", "state", "checkpoints", "learning_rates")
        torch.save({"model64": model.state_dict(), "problem": {k: problem[k] for k in keys}}, path)


# ============================================================================ infkit side
def infkit_run(problem: dict, method: str, options: dict, measurement: str = "loss") -> dict:
    import infkit

    model = tanh_mlp(problem["sizes"])
    model.load_state_dict(problem["state"])
    task = infkit.Task.classification(model, measurement=measurement)
    train_set = (problem["X_train"].float(), problem["y_train"])
    test_set = (problem["X_test"].float(), problem["y_test"])
    best, scores, inf = float("inf"), None, None
    for _ in range(2):  # best of two when a run is short (the machine is shared)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # l2=0 on a weight-decayed model
            inf = infkit.Influence(
                task,
                method,
                l2=0.0,
                damping=problem["ridge"],
                batch_size=BATCH_OF.get(method, BATCH),
                **options,
            ).fit(train_set)
            scores = inf.scores(test_set)
        best = min(best, time.perf_counter() - start)
        if best > SHORT:
            break
    return {"seconds": best, "scores": scores.double(), "describe": flat_describe(inf), "inf": inf}


def flat_describe(inf) -> dict:
    """``inf.describe()`` with the method options (nested under "options") at the top level;
    a diagnostic of the same name (e.g. LiSSA's resolved ``scale``, ``depth``,
    ``product_batch_size``; TRAK's ``proj_dim``) wins over the option it resolves."""
    described = inf.describe()
    return {**described.get("options", {}), **described}


def references(problem: dict) -> dict[str, torch.Tensor]:
    import infkit

    task = infkit.Task.classification(problem["model64"])
    train_set = (problem["X_train"], problem["y_train"])
    test_set = (problem["X_test"], problem["y_test"])
    out = {}
    for curvature in ("ggn", "hessian"):
        start = time.perf_counter()
        with warnings.catch_warnings(), contextlib.suppress(infkit.CurvatureError):
            out[curvature] = None  # stays None when the damped Hessian is not positive definite
            warnings.simplefilter("ignore", UserWarning)
            if problem["reference"] == "exact":
                inf = infkit.Influence(
                    task, "exact", l2=0.0, damping=problem["ridge"], curvature=curvature
                ).fit(train_set)
            else:
                inf = infkit.Influence(
                    task,
                    "cg",
                    l2=0.0,
                    damping=problem["ridge"],
                    curvature=curvature,
                    tol=1e-10,
                    maxiter=2000,
                    block=False,  # the per-column recursion, independent of block CG
                ).fit(train_set)
            out[curvature] = inf.scores(test_set).double()
        print(
            f"  reference {problem['reference']} {curvature}: {time.perf_counter() - start:.1f} s"
        )
    return out


# ============================================================================ orchestration
def call_peer(peer: str, workdir: Path, threads: int, python: Path, timeout: float) -> dict:
    cmd = [
        str(python),
        str(Path(__file__).resolve()),
        "--peer",
        peer,
        "--workdir",
        str(workdir),
        "--threads",
        str(threads),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(threads)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail)[:300]}
    result = json.loads(lines[-1])
    result["scores"] = torch.load(workdir / f"{peer}.pt")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=["digits", "mnist"])
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mnist-dir", type=Path, default=MNIST_DIR)
    parser.add_argument("--mnist-train", type=int, default=3000)
    parser.add_argument("--mnist-test", type=int, default=100)
    parser.add_argument("--mnist-hidden", type=int, default=16)
    parser.add_argument("--peers-python", type=Path, default=PEERS_PYTHON)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--cache", type=Path, help="directory keeping the trained models")
    parser.add_argument("--peer-timeout", type=float, default=1800.0)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "matrix_free.md"
    )
    # peer mode (run by the peers' venv)
    parser.add_argument("--peer", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer:
        run_peer(args.peer, args.workdir, args.threads)
        return

    torch.set_num_threads(args.threads)
    peers = not args.no_peers and args.peers_python.exists()
    if not args.no_peers and not peers:
        print(
            f"no peers venv at {args.peers_python}: build it with bash ../shared/bench/peers-venv.sh"
        )
    sections = []
    for name in args.problems:
        problem = (
            load_digits_problem()
            if name == "digits"
            else load_mnist_problem(
                args.mnist_dir, args.mnist_train, args.mnist_test, args.mnist_hidden
            )
        )
        rows = bench_problem(problem, args, peers)
        sections.append((problem, rows))
    write_table(sections, args)


def variants(problem: dict, method: str) -> list[tuple[dict, str]]:
    """(infkit options, peer) pairs per method; the first pair's settings go to the peers."""
    n = len(problem["y_train"])
    if method == "cg":
        # default (block CG), pyDVL's rtol, the Hessian pyDVL uses, and the per-column recursion
        return [
            ({}, "pydvl-cg"),
            ({"tol": 1e-4}, "pydvl-cg"),
            ({"curvature": "hessian"}, "pydvl-cg"),
            ({"curvature": "hessian", "tol": 1e-4}, "pydvl-cg"),
            ({"block": False}, "pydvl-cg"),
            ({"block": False, "tol": 1e-4}, "pydvl-cg"),
        ]
    if method == "lissa":
        return [
            ({}, "pydvl-lissa"),
            ({}, "pydvl-lissa-defaults"),
            ({"curvature": "hessian"}, "pydvl-lissa"),  # the curvature pyDVL uses
        ]
    if method == "arnoldi":
        options = {"rank": 50, "krylov_dim": 150}
        return [(options, "pydvl-arnoldi"), ({**options, "block": 1}, "pydvl-arnoldi")]
    if method == "datainf":
        return [({}, "pydvl-datainf")]
    if method == "identity":
        tracin = {
            "checkpoints": problem["checkpoints"],
            "learning_rates": problem["learning_rates"],
        }
        return [(tracin, "captum-tracincp")]
    if method == "trak":
        return [({"proj_dim": min(1024, n // 2)}, "traker")]
    raise ValueError(method)


def bench_problem(problem: dict, args, peers: bool) -> list[dict]:
    print(f"== {problem['name']}: {len(problem['y_train'])} train x {len(problem['y_test'])} test")
    start = time.perf_counter()
    train(problem, args.cache)
    print(f"  trained in {time.perf_counter() - start:.1f} s (converged: {problem['converged']})")
    refs = references(problem)
    rows = []
    with tempfile.TemporaryDirectory(prefix="infkit-bench-") as tmp:
        workdir = Path(tmp)
        saved = {
            k: problem[k] for k in ("sizes", "state", "checkpoints", "learning_rates", "ridge")
        }
        saved.update(
            {
                k: problem[k].float() if problem[k].is_floating_point() else problem[k]
                for k in ("X_train", "y_train", "X_test", "y_test")
            }
        )
        torch.save(saved, workdir / "problem.pt")
        settings: dict = {}
        for method in args.methods:
            results: dict[str, dict] = {}
            same_projection = None
            for k, (options, peer) in enumerate(variants(problem, method)):
                ours = infkit_run(problem, method, options)
                desc = ours["describe"]
                if k == 0:
                    if method == "trak":  # same projection, margin measurement: agreement check
                        R = ours["inf"].method.projector.matrix
                        torch.save(R.detach().float(), workdir / "trak_matrix.pt")
                        margin = infkit_run(problem, method, options, measurement="margin")
                        same_projection = -margin["scores"]  # contribution to the margin
                    settings.update(peer_settings(problem, method, desc))
                    (workdir / "settings.json").write_text(json.dumps(settings))
                if peers and peer not in results:
                    results[peer] = call_peer(
                        peer, workdir, args.threads, args.peers_python, args.peer_timeout
                    )
                result = results.get(peer)
                row = {
                    "method": method,
                    "options": summarise(method, options, desc),
                    "ours_s": ours["seconds"],
                    "ours_ggn": pearson(ours["scores"], refs["ggn"]),
                    "ours_hess": pearson(ours["scores"], refs["hessian"]),
                    "peer": PEER_LABEL[peer],
                }
                if result is not None and "error" in result:
                    row["peer_error"] = result["error"]
                elif result is not None:
                    row["peer_s"] = result["seconds"]
                    row["peer_ggn"] = pearson(result["scores"], refs["ggn"])
                    row["peer_hess"] = pearson(result["scores"], refs["hessian"])
                    row["agreement"] = pearson(result["scores"], ours["scores"])
                    if same_projection is not None:
                        twin = torch.load(workdir / "traker-same-projection.pt")
                        row["agreement"] = pearson(twin, same_projection)
                rows.append(row)
                print("  " + format_row(row), flush=True)
    return rows


def peer_settings(problem: dict, method: str, desc: dict) -> dict:
    n = len(problem["y_train"])
    if method == "cg":
        return {"pydvl-cg": {"rtol": 1e-4, "atol": 1e-6, "block": True}}
    if method == "lissa":
        return {
            "pydvl-lissa": {
                "maxiter": desc["depth"],
                "scale": desc["scale"],
                "batch_size": desc["product_batch_size"],
                "rtol": 1e-4,
            },
            "pydvl-lissa-defaults": {
                "maxiter": 1000,
                "scale": 10.0,
                "batch_size": 256,
                "rtol": 1e-4,
            },
        }
    if method == "arnoldi":
        return {"pydvl-arnoldi": {"rank": desc["rank"], "krylov": desc["krylov_dim"]}}
    if method == "datainf":
        reg = {name: value + problem["ridge"] for name, value in desc["layer_damping"].items()}
        return {"pydvl-datainf": {"regularization": reg, "batch_size": n}}
    if method == "identity":
        return {"captum-tracincp": {}}
    if method == "trak":
        return {"traker": {"proj_dim": desc["proj_dim"]}}
    return {}


def summarise(method: str, options: dict, desc: dict) -> str:
    if method == "cg":
        solver = "block" if desc["solvers"][-1] == "block" else "per-column"
        curvature = desc["curvature"].upper()
        return f"{curvature}, {solver}, tol {desc['tol']:g}, {desc['iterations'][-1]} it"
    if method == "lissa":
        return (
            f"{desc['curvature'].upper()}, s={desc['scale']:.3g} (auto), J={desc['depth']} "
            f"(auto), batch {desc['product_batch_size']}"
        )
    if method == "arnoldi":
        return f"GGN, p={desc['rank']}, n={desc['krylov_dim']}, block {desc['block']}"
    if method == "datainf":
        return "per tensor, lambda_l auto + ridge"
    if method == "identity":
        return f"TracInCP, {desc.get('checkpoints', 1)} checkpoints"
    if method == "trak":
        return f"k={desc['proj_dim']}, M=1"
    return ""


def format_row(row: dict) -> str:
    text = (
        f"{row['method']:<9} {row['options']:<38} infkit {row['ours_s']:7.2f} s "
        f"r_ggn {row['ours_ggn']:.4f} r_hess {row['ours_hess']:.4f}"
    )
    if "peer_s" in row:
        text += (
            f" | {row['peer']} {row['peer_s']:7.2f} s r_ggn {row['peer_ggn']:.4f} "
            f"r_hess {row['peer_hess']:.4f} | r(infkit, peer) {row['agreement']:.4f} | ratio "
            f"{row['ours_s'] / row['peer_s']:.2f}"
        )
    elif "peer_error" in row:
        text += f" | {row['peer']}: {row['peer_error']}"
    return text


def write_table(sections, args) -> None:
    lines = [
        "# Matrix-free and sketched methods against their peers",
        "",
        f"`benchmarks/bench_matrix_free.py`, one run; {platform.machine()}, "
        f"{os.cpu_count()} cores (shared with other jobs), torch {torch.__version__}, torch "
        f"threads = {args.threads} in every process. float32 models, float64 references; every "
        "library gets the same damped mean-form curvature H + ridge I (ridge per problem below) "
        "and the raw training-loss gradients (infkit: l2=0, damping=ridge). Time = fit + all "
        f"test x train scores in seconds, best of two when a run takes under {SHORT:g} s (the "
        "first run in a process pays one-off warm-up costs), for infkit and peers alike. "
        f"infkit batch_size={BATCH} (cg: 64, the default, with product passes of 512); pyDVL full-batch loaders (LiSSA: the minibatch shown); "
        "captum batch 512, sample-wise gradients; traker batch 256, BasicProjector, fp32.",
        "",
        "r_ggn / r_hess: Pearson correlation over all test x train scores with the exact "
        "damped GGN / Hessian scores. r(infkit, peer): correlation between the two libraries "
        "(TRAK: with infkit's projection matrix handed to traker and the margin measurement, "
        "an implementation check; the timed traker run uses its own projector). "
        "ratio = infkit time / peer time (target <= 0.5 at equal or better correlation).",
        "",
        provenance(
            {
                "peer venv": (
                    args.peers_python,
                    ["pydvl", "captum", "traker", "torch"],
                )
            }
        ),
        "",
    ]
    for problem, rows in sections:
        ref = (
            "exact dense float64"
            if problem["reference"] == "exact"
            else "infkit CG float64, tol 1e-10 (dense P x P too slow here)"
        )
        lines += [
            f"## {problem['name']}: {len(problem['y_train']):,} train x "
            f"{len(problem['y_test']):,} test, ridge {problem['ridge']:g}, reference {ref}",
            "",
            "| method | infkit settings | infkit s | r_ggn | r_hess | peer | peer s | r_ggn | "
            "r_hess | r(infkit, peer) | ratio |",
            "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in rows:
            peer = (
                f"{r['peer_s']:.2f} | {r['peer_ggn']:.4f} | {r['peer_hess']:.4f} | "
                f"{r['agreement']:.4f} | {r['ours_s'] / r['peer_s']:.2f}"
                if "peer_s" in r
                else f"{r.get('peer_error', 'not run')} | | | | "
            )
            lines.append(
                f"| {r['method']} | {r['options']} | {r['ours_s']:.2f} | {r['ours_ggn']:.4f} | "
                f"{r['ours_hess']:.4f} | {r['peer']} | {peer} |"
            )
        lines.append("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
