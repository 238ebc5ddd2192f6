"""Benchmark: KAIROS data valuation against self-influence and the training loss, on digits.

scikit-learn's digits (1,797 real 8x8 images) are split into a clean reference set (300) and a
training set (1,200) in which 10% of the examples are corrupted, one way per experiment:

* ``labels``: their labels replaced by another class, drawn at random;
* ``features``: Gaussian noise (standard deviation 0.5 of the pixel range) added to the image;
* ``poison``: a 2x2 bright patch in a corner (a trigger) and the label 0.

Each corrupted example is then to be found by a ranking of the training set: KAIROS
(``infkit.valuation.kairos`` on the raw pixels, with and without the labels, default bandwidth,
ranking by minus the value),
the self-influence of a softmax regression trained on the corrupted training set (infkit,
``method="exact"``, l2 = 1e-3), and that model's training loss. Reported: the detection ROC AUC
of each ranking, the share of the corrupted examples in the top 10% and the time of each method
(KAIROS against fit plus self-influence; training is not counted).

Run: .venv/bin/python benchmarks/bench_kairos.py
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, append_section, provenance

import infkit
from infkit.evaluate import detection_auc, fraction_found
from infkit.valuation import kairos

RESULTS = ROOT / "benchmarks" / "results" / "kairos.md"
L2 = 1e-3


def corrupt(kind: str, X: torch.Tensor, y: torch.Tensor, gen: torch.Generator):  # type: ignore[no-untyped-def]
    """A copy of (X, y) with 10% of the examples corrupted, and the mask of those."""
    n = len(y)
    flagged = torch.zeros(n, dtype=torch.bool)
    flagged[torch.randperm(n, generator=gen)[: n // 10]] = True
    X, y = X.clone(), y.clone()
    if kind == "labels":
        shift = torch.randint(1, 10, (int(flagged.sum()),), generator=gen)
        y[flagged] = (y[flagged] + shift) % 10
    elif kind == "features":
        X[flagged] += 0.5 * torch.randn(
            int(flagged.sum()), X.shape[1], generator=gen, dtype=X.dtype
        )
    else:  # poison: a trigger patch and the target label 0
        images = X[flagged].reshape(-1, 8, 8)
        images[:, :2, :2] = 1.0
        X[flagged] = images.reshape(-1, 64)
        y[flagged] = 0
    return X, y, flagged


def main() -> None:
    torch.set_num_threads(2)
    data = load_digits()
    X = torch.tensor(data.data / 16.0, dtype=torch.float64)
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    reference, train = order[:300], order[300:1500]
    rows = []
    for kind in ("labels", "features", "poison"):
        gen = torch.Generator().manual_seed(1)
        Xt, yt, flagged = corrupt(kind, X[train], y[train], gen)

        start = time.perf_counter()
        values = kairos(Xt, X[reference], train_labels=yt, reference_labels=y[reference])
        kairos_seconds = time.perf_counter() - start
        start = time.perf_counter()
        unlabelled = kairos(Xt, X[reference])
        unlabelled_seconds = time.perf_counter() - start

        model = torch.nn.Linear(64, 10).double()
        task = infkit.Task.classification(model)
        infkit.train_to_optimum(task, (Xt, yt), L2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = time.perf_counter()
            inf = infkit.Influence(task, "exact", l2=L2, progress=False).fit((Xt, yt))
            self_influence = inf.self_scores()
            influence_seconds = time.perf_counter() - start
        with torch.no_grad():
            loss = task.loss(model(Xt), yt)
        for name, score, seconds in (
            ("KAIROS (pixels, labels)", -values, kairos_seconds),
            ("KAIROS (pixels)", -unlabelled, unlabelled_seconds),
            ("self-influence (exact IF)", self_influence, influence_seconds),
            ("training loss", loss, None),
        ):
            rows.append(
                (
                    kind,
                    name,
                    detection_auc(score, flagged),
                    fraction_found(score, flagged, 0.1),
                    seconds,
                )
            )
            print(rows[-1], flush=True)
    lines = [
        "## digits: 1,200 training images (10% corrupted), 300 clean reference images",
        "",
        provenance(),
        "",
        "| corruption | ranking | detection AUC | found in the top 10% | time (s) |",
        "|---|---|---|---|---|",
    ]
    for kind, name, auc, found, seconds in rows:
        shown = "" if seconds is None else f"{seconds:.2f}"
        lines.append(f"| {kind} | {name} | {auc:.3f} | {found:.2f} | {shown} |")
    append_section(RESULTS, lines)


if __name__ == "__main__":
    main()
