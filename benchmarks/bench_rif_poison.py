"""Benchmark: poisoning that the influence function underrates and RIF does not, on real data.

Logistic regression on fixed features in the high-dimensional regime (docs/analyses.md §11):

* digits: scikit-learn's bundled 8x8 digits, threes against eights, the 64 pixels standardised
  (``problems.digits_split``); 150 training images, so P = 65 parameters for N = 150 (0.43);
* MNIST: the real MNIST test set (``/work/shared/data/mnist``, read in place, never copied),
  fours against nines, 300 training and 100 test images drawn with seed 0, features the top 100
  principal components of the training images, whitened; P = 101 for N = 300 (0.34).

Two experiments, each with l2 1e-2 and 1e-3 (float64, trained to the optimum).

Knowing the target (``--part logit``). For each of ``--targets`` test images (the first ones of
the test split) ``infkit.analyses.poisoning.plant_poison`` plants a label-flipped copy of the
image (epsilon 0: the paper's label-flip poison), the same moved by epsilon ||x|| to raise its
leverage, or three identical copies, and retrains. ``detect_poison`` then ranks the poisoned
training set by |score| of the target's logit for IF, RIF and the Newton step, and compares each
one's predicted change of that logit when the poison is removed with retraining without it.
Reported per setting: the planted points' leverage (median) against the 95th percentile of the
clean points', the detection AUC and top-1 / top-10 hit rates, predicted / actual (median and
quartiles), the share of targets whose predicted class the poison flips and, among those, how
often each estimator predicts that removing the poison flips it back. Every actual change is
checked against the clean model trained from scratch (the largest relative difference is
printed).

Not knowing the targets (``--part self``). ``plant_poisons`` poisons ``--poisoned`` test images
at once in one training set (targets ``d k .. (d + 1) k - 1`` of the test split for draw d, so the
``--draws`` draws are disjoint), for each attack variant (epsilon, copies), and retrains once;
``detect_by_self_influence`` ranks the poisoned training set by the self-influence of IF, RIF and
the Newton step, by the training loss and by the leverage. Reported per setting, averaged over the
draws: the ROC AUC of each ranking, in how many draws RIF's AUC is above the IF's, the top-k
recall for k the number of planted points, the planted points' leverage (median) against the
clean 95th percentile, and the share of targets whose predicted class the poison flips. Checks
against independent computations: RIF's self-score against the IF's divided by 1 - h (exact for
one logit) and, for the first three planted points of each setting's first draw, each
estimator's self-score against the actual first-order change of the point's own loss after
retraining without it, ``r_j (f_j(theta_-j) - f_j(theta))`` (``infkit.retrain.without``).

Timings are rough: the machine is shared.

Run: .venv/bin/python benchmarks/bench_rif_poison.py [--part logit self] [--targets 30]
[--poisoned 20] [--draws 3] [--l2 1e-2 1e-3]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, append_section, provenance
from problems import MNIST_DIR, digits_split, mnist_test_set, random_split

import infkit
from infkit.analyses.poisoning import (
    BASELINES,
    DEFAULT_EPSILON,
    ESTIMATORS,
    detect_by_self_influence,
    detect_poison,
    plant_poison,
    plant_poisons,
    summarise,
)
from infkit.retrain import without

RESULTS = ROOT / "benchmarks" / "results" / "rif_poison.md"
#: (epsilon, copies) of each attack, knowing the target
ATTACKS = ((0.0, 1), (1.0, 1), (2.0, 1), (0.0, 3))
#: (epsilon, copies) of each attack on several targets at once (DEFAULT_EPSILON is plant_poisons')
SELF_ATTACKS = ((0.0, 1), (0.5, 1), (DEFAULT_EPSILON, 1), (2.0, 1), (0.0, 3))
#: the rankings of the self-influence detection, in the order they are reported
RANKINGS = (*ESTIMATORS, *BASELINES)

Split = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def digits_problem() -> Split:
    """Threes (0) against eights (1): the first 150 training images, every test image."""
    s = digits_split()
    keep_tr = (s["y_train"] == 3) | (s["y_train"] == 8)
    keep_te = (s["y_test"] == 3) | (s["y_test"] == 8)
    X, y = s["X_train"][keep_tr][:150], (s["y_train"][keep_tr][:150] == 8).double()
    return (X, y), (s["X_test"][keep_te], (s["y_test"][keep_te] == 8).double())


def mnist_problem(directory: Path) -> Split:
    """Fours (0) against nines (1), 300 + 100 images, the top 100 whitened principal
    components of the training images."""
    images, labels = mnist_test_set(directory)
    keep = np.nonzero((labels == 4) | (labels == 9))[0]
    tr, te = random_split(len(keep), 300, 100, seed=0)
    X, y = images[keep], (labels[keep] == 9).astype(np.float64)
    mean = X[tr].mean(0)
    _, s, vt = np.linalg.svd(X[tr] - mean, full_matrices=False)
    scale = s[:100] / np.sqrt(len(tr))

    def features(rows: np.ndarray) -> torch.Tensor:
        return torch.tensor((X[rows] - mean) @ vt[:100].T / scale)

    return (features(tr), torch.tensor(y[tr])), (features(te), torch.tensor(y[te]))


def clean_task(train: tuple[torch.Tensor, torch.Tensor], l2: float) -> infkit.Task:
    """A logistic regression trained to the optimum on ``train`` (seed 0)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(train[0].shape[1], 1).double()
    task = infkit.Task.binary_classification(model)
    infkit.train_to_optimum(task, train, l2)
    return task


def run_logit(name: str, split: Split, l2: float, n_targets: int) -> list[dict]:
    train, test = split
    task = clean_task(train, l2)
    model = task.model
    with torch.no_grad():
        clean_logits = model(test[0][:n_targets])[:, 0]
    rows = []
    for epsilon, copies in ATTACKS:
        start = time.perf_counter()
        detections, leverages, shares, check = [], [], [], 0.0
        for t in range(n_targets):
            poisoning = plant_poison(
                task, train, (test[0][t], test[1][t]), l2, epsilon=epsilon, copies=copies
            )
            detection = detect_poison(poisoning)
            detections.append(detection)
            leverages.append(float(poisoning.planted_leverages.mean()))
            shares.append(float(poisoning.leverage_share.mean()))
            # Retraining without the poison must land on the clean model (a convex objective).
            truth = float(clean_logits[t]) - detection.logit
            actual = detection.actual
            assert actual is not None
            check = max(check, abs(actual - truth) / max(abs(truth), 1e-12))
        clean = poisoning.leverages[: len(train[0])]
        row: dict[str, Any] = {
            "data": name,
            "N": len(train[0]),
            "P": train[0].shape[1] + 1,
            "l2": l2,
            "epsilon": epsilon,
            "copies": copies,
            "h_poison": float(np.median(leverages)),
            "h_clean_p95": float(clean.quantile(0.95)),
            "share_above": float(np.mean(shares)),
            "check": check,
            "summary": summarise(detections),
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(
            name,
            l2,
            epsilon,
            copies,
            {e: {k: round(v, 3) for k, v in r.items()} for e, r in row["summary"].items()},
            f"{row['seconds']:.0f}s",
            flush=True,
        )
    return rows


def run_self(name: str, split: Split, l2: float, per_draw: int, draws: int) -> list[dict]:
    """The self-influence detection of ``per_draw`` targets poisoned at once, per attack."""
    train, test = split
    if draws * per_draw > len(test[0]):
        raise SystemExit(f"{name}: {draws} draws of {per_draw} targets need more test images")
    task = clean_task(train, l2)
    with torch.no_grad():
        clean_logits = task.model(test[0])[:, 0]
    rows = []
    for epsilon, copies in SELF_ATTACKS:
        start = time.perf_counter()
        detections, h_poison, h_clean, flipped = [], [], [], []
        identity, loo = 0.0, {e: [] for e in ESTIMATORS}
        for d in range(draws):
            picked = slice(d * per_draw, (d + 1) * per_draw)
            targets = (test[0][picked], test[1][picked])
            poisoning = plant_poisons(task, train, targets, l2, epsilon=epsilon, copies=copies)
            detection = detect_by_self_influence(poisoning)
            detections.append(detection)
            h = poisoning.leverages
            h_poison.append(float(poisoning.planted_leverages.median()))
            h_clean.append(float(h[: len(train[0])].quantile(0.95)))
            with torch.no_grad():
                after = poisoning.task.model(targets[0])[:, 0]
            flipped.append(float(((after > 0) != (clean_logits[picked] > 0)).double().mean()))
            s = detection.scores
            identity = max(identity, float(((s["rif"] - s["if"] / (1 - h)) / s["rif"]).abs().max()))
            if d == 0:
                X, y = poisoning.train
                with torch.no_grad():
                    f = poisoning.task.model(X)[:, 0]
                for j in poisoning.planted[:3].tolist():
                    retrained = without(poisoning.task, poisoning.train, [j], l2).model()
                    with torch.no_grad():
                        f_j = retrained(X[j : j + 1])[0, 0]
                    actual = float((torch.sigmoid(f[j]) - y[j]) * (f_j - f[j]))
                    for e in ESTIMATORS:
                        loo[e].append(float(s[e][j]) / actual)
        row: dict[str, Any] = {
            "data": name,
            "N": len(train[0]),
            "P": train[0].shape[1] + 1,
            "l2": l2,
            "epsilon": epsilon,
            "copies": copies,
            "planted": per_draw * copies,
            "draws": draws,
            "h_poison": float(np.median(h_poison)),
            "h_clean_p95": float(np.median(h_clean)),
            "flipped": float(np.mean(flipped)),
            "auc": {r: float(np.mean([x.auc[r] for x in detections])) for r in RANKINGS},
            "recall": {r: float(np.mean([x.recall[r] for x in detections])) for r in RANKINGS},
            "rif_wins": sum(x.auc["rif"] > x.auc["if"] for x in detections),
            "identity": identity,
            "loo": loo,
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(
            name,
            l2,
            epsilon,
            copies,
            {r: round(v, 3) for r, v in row["auc"].items()},
            f"RIF > IF in {row['rif_wins']}/{draws}",
            f"{row['seconds']:.0f}s",
            flush=True,
        )
    return rows


def logit_lines(rows: list[dict], n_targets: int) -> list[str]:
    lines = [
        f"### Knowing the target: {n_targets} targets per setting, one at a time",
        "",
        "Detection: ranking the poisoned training set by |score| of the target's logit "
        "(AUC of the planted points against the clean ones, share of planted points in the "
        "top 1 / top 10, averaged over targets).",
        "",
        "| data | N | P | l2 | epsilon | copies | h poison (median) | h clean p95 | "
        "AUC IF / RIF / Newton | top-1 IF / RIF / Newton | top-10 IF / RIF / Newton |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["summary"]
        lines.append(
            f"| {r['data']} | {r['N']} | {r['P']} | {r['l2']:g} | {r['epsilon']:g} | "
            f"{r['copies']} | {r['h_poison']:.2f} | {r['h_clean_p95']:.2f} | "
            + " | ".join(
                " / ".join(f"{s[e][key]:.2f}" for e in ESTIMATORS)
                for key in ("auc", "top1", "top10")
            )
            + " |"
        )
    lines += [
        "",
        "Removal effect: predicted / actual change of the target's logit when the planted "
        "points are removed (actual: retraining), median [first quartile, third quartile]; "
        "flipped: the share of targets whose predicted class the poison changed; recovered: "
        "among those, the share for which the estimator predicts that removing the poison "
        "changes it back.",
        "",
        "| data | l2 | epsilon | copies | IF | RIF | Newton | flipped | "
        "recovered IF / RIF / Newton | seconds (rough) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s = r["summary"]
        cells = [
            f"{s[e]['ratio_median']:.3f} [{s[e]['ratio_q1']:.3f}, {s[e]['ratio_q3']:.3f}]"
            for e in ESTIMATORS
        ]
        recovered = " / ".join(
            f"{s[e]['recovered']:.2f}" if "recovered" in s[e] else "-" for e in ESTIMATORS
        )
        lines.append(
            f"| {r['data']} | {r['l2']:g} | {r['epsilon']:g} | {r['copies']} | "
            + " | ".join(cells)
            + f" | {s['if']['flipped']:.2f} | {recovered} | {r['seconds']:.0f} |"
        )
    check = max(r["check"] for r in rows)
    lines += [
        "",
        f"Actual changes against the clean model trained from scratch: largest relative "
        f"difference {check:.1e}.",
    ]
    return lines


def self_lines(rows: list[dict], per_draw: int, draws: int) -> list[str]:
    names = " / ".join(["IF", "RIF", "Newton", "loss", "leverage"])
    lines = [
        f"### Not knowing the targets: {per_draw} targets poisoned at once, {draws} disjoint "
        "draws, ranked by self-influence",
        "",
        "Detection: ranking the poisoned training set by each estimator's self-influence "
        "(``detect_by_self_influence``), by the training loss and by the leverage; AUC of the "
        "planted points against the clean ones and top-k recall for k the number of planted "
        "points, averaged over the draws; RIF > IF: the draws in which RIF's AUC is the "
        "higher; flipped: the share of targets whose predicted class the poison changed. "
        f"epsilon {DEFAULT_EPSILON:g}, copies 1 is plant_poisons' default.",
        "",
        f"| data | N | P | l2 | epsilon | copies | planted | h poison (median) | h clean p95 | "
        f"flipped | AUC {names} | RIF > IF | top-k recall {names} | seconds (rough) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['data']} | {r['N']} | {r['P']} | {r['l2']:g} | {r['epsilon']:g} | "
            f"{r['copies']} | {r['planted']} | {r['h_poison']:.2f} | {r['h_clean_p95']:.2f} | "
            f"{r['flipped']:.2f} | "
            + " / ".join(f"{r['auc'][n]:.3f}" for n in RANKINGS)
            + f" | {r['rif_wins']}/{r['draws']} | "
            + " / ".join(f"{r['recall'][n]:.2f}" for n in RANKINGS)
            + f" | {r['seconds']:.0f} |"
        )
    identity = max(r["identity"] for r in rows)
    ratios = {e: [v for r in rows for v in r["loo"][e]] for e in ESTIMATORS}
    spread = "; ".join(
        f"{e.upper() if e != 'newton' else 'Newton'} {np.median(v):.3f} "
        f"[{min(v):.3f}, {max(v):.3f}]"
        for e, v in ratios.items()
    )
    lines += [
        "",
        f"RIF's self-score against the IF's divided by 1 - h: largest relative difference "
        f"{identity:.1e}. Self-score over the actual first-order change of the point's own "
        f"loss after retraining without it, {len(ratios['if'])} planted points (median "
        f"[min, max]): {spread}.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", nargs="+", choices=("logit", "self"), default=["logit", "self"])
    parser.add_argument("--targets", type=int, default=30)
    parser.add_argument("--poisoned", type=int, default=20)
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--l2", type=float, nargs="+", default=[1e-2, 1e-3])
    parser.add_argument("--mnist-dir", type=Path, default=MNIST_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machine is shared: one thread is the faster here
    warnings.simplefilter("ignore")  # fit-time notices; the numbers are the result
    problems = {
        "digits 3 vs 8": digits_problem(),
        "MNIST 4 vs 9, PCA-100": mnist_problem(args.mnist_dir),
    }
    start = time.perf_counter()
    lines = [
        "## digits 3 vs 8 and MNIST 4 vs 9 (PCA-100)",
        "",
        provenance(),
    ]
    if "logit" in args.part:
        rows = [
            row
            for name, split in problems.items()
            for l2 in args.l2
            for row in run_logit(name, split, l2, args.targets)
        ]
        lines += ["", *logit_lines(rows, args.targets)]
    if "self" in args.part:
        rows = [
            row
            for name, split in problems.items()
            for l2 in args.l2
            for row in run_self(name, split, l2, args.poisoned, args.draws)
        ]
        lines += ["", *self_lines(rows, args.poisoned, args.draws)]
    total = time.perf_counter() - start
    lines += ["", f"Total {total:.0f} s on 1 thread (shared machine: rough)."]
    append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
