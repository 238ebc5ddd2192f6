"""Benchmark: AirRep's learned attribution against influence functions, by LDS on held-out subsets.

scikit-learn's digits (real 8x8 images; ``problems.digits_split``: stratified 80/20, seed 0,
standardised): the first 1,000 training images train an L2 multinomial logistic regression
(``l2 = 1e-3``, float64, to the optimum). Two query sets of 100 test images each: the *bank
queries*, whose measurements train AirRep, and *new queries*, never seen in training. Two
retraining banks (``infkit.analyses.airrep.retraining_bank``: random subsets of alpha = 0.5,
each retrained, the test loss of all 200 queries recorded): a training bank (seed 0) and a
held-out bank (seed 1) on which every method is judged.

AirRep's encoder is the default MLP (64 hidden, 32 dimensions) over fixed features: the
standardised pixels placed in their label's block (pixels x one-hot label, 640 values); it is
trained on the training bank, on the bank
queries only, with the paper's attention pooling and, as an ablation, with mean pooling (an
additive group score), and compared with the same encoder untrained (its random
initialisation). The LDS (``infkit.evaluate.lds``, per-example scores summed over the left-out
examples) on the held-out bank is reported for both query sets, next to exact IF
(``method="exact"``), TRAK (``method="trak"``, default projection) and the gradient dot product
(``method="identity"``), all oriented as removal effects; for AirRep also the LDS of its group
scores (``group_lds``: the attention-pooled score of each held-out subset against its measured
loss). Costs: the one-off cost (retraining the bank, training the encoder; fitting an
influence method) and the time to score all 200 x 1,000 query-training pairs. A last table
trains AirRep on the first m subsets of the training bank.

The same is then done, with smaller banks (100 and 50 subsets) and no sweep, for a tanh MLP
64-16-10 (``l2 = 1e-2``; exact IF with damping 1e-3); ``--no-mlp`` skips it.

Run: .venv/bin/python benchmarks/bench_airrep.py [--train-subsets 200] [--heldout-subsets 100]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, append_section, provenance
from problems import digits_split, tanh_mlp

import infkit
from infkit.analyses.airrep import AirRep, MLPEncoder, group_lds, retraining_bank
from infkit.evaluate import lds
from infkit.retrain import SubsetRetraining

RESULTS = ROOT / "benchmarks" / "results" / "airrep.md"
N_TRAIN = 1000
N_QUERIES = 100
ALPHA = 0.5


def features(X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """AirRep's input: the standardised pixels placed in their label's block (the outer product
    of the pixels and the one-hot label), [n, 640]."""
    onehot = torch.nn.functional.one_hot(y, 10).to(X.dtype)
    return (X[:, :, None] * onehot[:, None, :]).reshape(len(X), -1)


def columns(bank: SubsetRetraining, cols: slice) -> SubsetRetraining:
    return SubsetRetraining(bank.masks, bank.measurements[:, cols])


def run_model(name: str, model: torch.nn.Module, l2: float, damping: float, args: Any) -> dict:
    data = digits_split()
    Xtr, ytr = data["X_train"][:N_TRAIN], data["y_train"][:N_TRAIN]
    Xq, yq = data["X_test"][: 2 * N_QUERIES], data["y_test"][: 2 * N_QUERIES]
    train, queries = (Xtr, ytr), (Xq, yq)
    seen, new = slice(0, N_QUERIES), slice(N_QUERIES, 2 * N_QUERIES)
    task = infkit.Task.classification(model)
    infkit.train_to_optimum(task, train, l2)
    with torch.no_grad():
        accuracy = float((model(Xq).argmax(1) == yq).double().mean())

    banks, bank_seconds = {}, {}
    for label, n, seed in (("train", args.train_subsets, 0), ("held-out", args.heldout_subsets, 1)):
        start = time.perf_counter()
        banks[label] = retraining_bank(
            task,
            train,
            queries,
            l2,
            n_subsets=n,
            alpha=ALPHA,
            seed=seed,
            tolerance=args.tolerance,
            cache_dir=None if args.cache_dir is None else args.cache_dir / name,
        )
        bank_seconds[label] = time.perf_counter() - start
        print(f"{name}: {label} bank of {n} subsets in {bank_seconds[label]:.0f} s", flush=True)
    held = banks["held-out"]

    def judged(S: torch.Tensor) -> tuple[float, float]:
        return (
            lds(S[seen], held.masks, held.measurements[:, seen]),
            lds(S[new], held.masks, held.measurements[:, new]),
        )

    Ftr, Fq = features(Xtr, ytr), features(Xq, yq)
    rows = []
    for pooling in ("attention", "mean"):
        airrep = AirRep(hidden=64, dim=32, pooling=pooling)
        airrep.fit(
            Fq[seen],
            Ftr,
            columns(banks["train"], seen),
            epochs=args.epochs,
            lr=args.lr,
            batch_size=32,
            subsets_per_step=32,
            seed=0,
        )
        assert airrep.record is not None
        start = time.perf_counter()
        S = airrep.scores(Fq, Ftr)
        score_seconds = time.perf_counter() - start
        G = airrep.group_scores(Fq, Ftr, held.masks)
        rows.append(
            {
                "method": f"AirRep ({pooling} pooling)",
                "lds": judged(S),
                "group": (
                    group_lds(G[:, seen], held.measurements[:, seen]),
                    group_lds(G[:, new], held.measurements[:, new]),
                ),
                "one_off": bank_seconds["train"] + airrep.record.seconds,
                "one_off_note": f"bank {bank_seconds['train']:.0f} + training "
                f"{airrep.record.seconds:.1f}",
                "score": score_seconds,
            }
        )
        print(rows[-1], flush=True)
    untrained = AirRep(MLPEncoder(Ftr.shape[1], 64, 32, seed=0))
    start = time.perf_counter()
    S = untrained.scores(Fq, Ftr)
    score_seconds = time.perf_counter() - start
    G = untrained.group_scores(Fq, Ftr, held.masks)
    rows.append(
        {
            "method": "untrained encoder (random init.)",
            "lds": judged(S),
            "group": (
                group_lds(G[:, seen], held.measurements[:, seen]),
                group_lds(G[:, new], held.measurements[:, new]),
            ),
            "one_off": 0.0,
            "one_off_note": "none",
            "score": score_seconds,
        }
    )
    for method, options in (("exact", {}), ("trak", {}), ("identity", {})):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            inf = infkit.Influence(
                task,
                method,
                l2=l2,
                damping=damping if method == "exact" else 0.0,
                progress=False,
                **options,
            ).fit(train)
            fit_seconds = time.perf_counter() - start
            start = time.perf_counter()
            S = inf.scores(queries)
            score_seconds = time.perf_counter() - start
        label = {"exact": "exact IF", "trak": "TRAK", "identity": "gradient dot product"}[method]
        rows.append(
            {
                "method": f'{label} (`method="{method}"`)',
                "lds": judged(S),
                "group": None,
                "one_off": fit_seconds,
                "one_off_note": f"fit {fit_seconds:.2f}",
                "score": score_seconds,
            }
        )
        print(rows[-1], flush=True)

    sweep = []
    for m in args.sweep:
        if m > args.train_subsets:
            continue
        bank = SubsetRetraining(
            banks["train"].masks[:m], banks["train"].measurements[:m, seen].clone()
        )
        airrep = AirRep(hidden=64, dim=32).fit(
            Fq[seen],
            Ftr,
            bank,
            epochs=args.epochs,
            lr=args.lr,
            batch_size=32,
            subsets_per_step=min(32, m),
            seed=0,
        )
        S = airrep.scores(Fq, Ftr)
        G = airrep.group_scores(Fq, Ftr, held.masks)
        sweep.append((m, *judged(S), group_lds(G[:, new], held.measurements[:, new])))
        print(sweep[-1], flush=True)
    return {
        "name": name,
        "accuracy": accuracy,
        "rows": rows,
        "sweep": sweep,
        "bank_seconds": bank_seconds,
        "l2": l2,
    }


def section(result: dict, args: Any) -> list[str]:
    lines = [
        f"## digits, {result['name']}: {N_TRAIN} training images, {N_QUERIES} bank queries + "
        f"{N_QUERIES} new queries, alpha = {ALPHA}, training bank {args.train_subsets} subsets, "
        f"held-out bank {args.heldout_subsets}",
        "",
        provenance(),
        "",
        f"l2 = {result['l2']}, test accuracy of the 200 queries {result['accuracy']:.3f}; "
        f"retraining tolerance {args.tolerance}; AirRep: {args.epochs} epochs, lr {args.lr}, "
        "32 queries x 32 subsets per step, seed 0. Banks: training "
        f"{result['bank_seconds']['train']:.0f} s, held-out "
        f"{result['bank_seconds']['held-out']:.0f} s. Scoring time: all 200 x {N_TRAIN} pairs.",
        "",
        "| method | LDS, bank queries | LDS, new queries | group-score LDS (bank / new) | "
        "one-off cost (s) | scoring (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        group = "" if row["group"] is None else f"{row['group'][0]:.3f} / {row['group'][1]:.3f}"
        lines.append(
            f"| {row['method']} | {row['lds'][0]:.3f} | {row['lds'][1]:.3f} | {group} | "
            f"{row['one_off']:.1f} ({row['one_off_note']}) | {row['score']:.3f} |"
        )
    if result["sweep"]:
        lines += [
            "",
            "AirRep (attention pooling) trained on the first m subsets of the training bank:",
            "",
            "| m | LDS, bank queries | LDS, new queries | group-score LDS, new queries |",
            "|---|---|---|---|",
        ]
        for m, a, b, g in result["sweep"]:
            lines.append(f"| {m} | {a:.3f} | {b:.3f} | {g:.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-subsets", type=int, default=200)
    parser.add_argument("--heldout-subsets", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--tolerance", type=float, default=1e-8)
    parser.add_argument("--sweep", type=int, nargs="*", default=[50, 100])
    parser.add_argument("--no-mlp", action="store_true", help="the logistic regression only")
    parser.add_argument("--mlp-train-subsets", type=int, default=100)
    parser.add_argument("--mlp-heldout-subsets", type=int, default=50)
    parser.add_argument("--cache-dir", type=Path, default=None, help="keep retrained models")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="print, do not append")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 10).double()
    results = [(run_model("logistic regression", model, 1e-3, 0.0, args), args)]
    if not args.no_mlp:
        torch.manual_seed(0)
        mlp_args = argparse.Namespace(**vars(args))
        mlp_args.train_subsets = args.mlp_train_subsets
        mlp_args.heldout_subsets = args.mlp_heldout_subsets
        mlp_args.sweep = []
        mlp = tanh_mlp([64, 16, 10]).double()
        results.append((run_model("MLP 64-16-10 (tanh)", mlp, 1e-2, 1e-3, mlp_args), mlp_args))
    for result, settings in results:
        lines = section(result, settings)
        if args.no_write:
            print("\n".join(lines))
        else:
            append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
