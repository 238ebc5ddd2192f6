"""Benchmark: training-set attacks from input influence, predicted against actual (retraining).

scikit-learn's digits, ones against sevens (real 8x8 images, pixels in [0, 1]): 150 training
and 30 test images. A softmax regression (l2 = 1e-2, trained to the optimum) and an MLP (64-16-2,
tanh, the same objective) are attacked: for one target, the correctly classified test image
with the smallest margin, ``infkit.analyses.attacks.training_set_attack`` moves the k training
images with the largest input influence by epsilon (L2 norm, in pixel units) to raise the
target's loss; the model is retrained on the perturbed set (warm start) and the target's actual
loss change is set beside the first-order prediction, with whether its prediction flipped.
The methods: ``exact`` (the dense Hessian solve, damping 1e-3 for the MLP).

Run: .venv/bin/python benchmarks/bench_attack.py
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, append_section, provenance

import infkit
from infkit.analyses.attacks import measurement_change, retrain_attacked, training_set_attack

RESULTS = ROOT / "benchmarks" / "results" / "attack.md"
L2 = 1e-2


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "softmax regression": torch.nn.Linear(64, 2).double(),
        "MLP 64-16-2": torch.nn.Sequential(
            torch.nn.Linear(64, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)
        ).double(),
    }


def main() -> None:
    torch.set_num_threads(2)
    X, y = load_digits(return_X_y=True)
    keep = (y == 1) | (y == 7)
    X = torch.tensor(X[keep] / 16.0)
    y = torch.tensor(y[keep] == 7).long()
    train, test = (X[:150], y[:150]), (X[150:180], y[150:180])
    rows = []
    for name, model in models().items():
        task = infkit.Task.classification(model)
        infkit.train_to_optimum(task, train, L2)
        with torch.no_grad():
            out = model(test[0])
        margin = out.gather(1, test[1][:, None]).squeeze(1) - out.gather(
            1, 1 - test[1][:, None]
        ).squeeze(1)
        correct = (margin > 0).nonzero().squeeze(1)
        target = int(correct[margin[correct].argmin()])
        query = (test[0][target : target + 1], test[1][target : target + 1])
        damping = 0.0 if name.startswith("softmax") else 1e-3
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inf = infkit.Influence(task, "exact", l2=L2, damping=damping, progress=False)
            inf.fit(train)
        for k in (1, 5):
            for epsilon in (0.1, 0.5, 1.0, 2.0):
                attack = training_set_attack(inf, query, k, epsilon)
                retrained = retrain_attacked(task, train, attack, L2)
                actual = float(measurement_change(task, retrained, query)[0])
                predicted = float(attack.predicted[0])
                with torch.no_grad():
                    flipped = bool(retrained.model(query[0]).argmax(1) != query[1])
                rows.append((name, k, epsilon, predicted, actual, flipped))
                print(rows[-1], flush=True)
    lines = [
        "## digits 1 vs 7: 150 training, one target test image (smallest correct margin)",
        "",
        provenance(),
        "",
        "| model | k | epsilon (L2) | predicted loss change | actual (retrained) | actual / "
        "predicted | target flipped |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, k, epsilon, predicted, actual, flipped in rows:
        lines.append(
            f"| {name} | {k} | {epsilon} | {predicted:.4f} | {actual:.4f} | "
            f"{actual / predicted:.2f} | {'yes' if flipped else 'no'} |"
        )
    append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
