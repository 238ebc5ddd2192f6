"""The demo's driver: train each model, explain, detect mislabels, check against retraining."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from infkit import evaluate
from infkit.demo.data import DigitsData, load_data
from infkit.demo.faithfulness import Faithfulness, faithfulness
from infkit.demo.models import LOGREG, MLP, ModelSpec, accuracy, build_model, losses, predict
from infkit.demo.plots import plot_detection, plot_explanations, plot_loo
from infkit.demo.tables import (
    explanation_rows,
    loo_rows,
    print_explanations,
    self_influence_rows,
)
from infkit.influence import Influence
from infkit.progress import Stopwatch
from infkit.store import save_csv, save_json
from infkit.task import Task
from infkit.training import TrainResult, train_to_optimum


@dataclass
class DemoConfig:
    """Settings of one demo run (all of them are written to ``summary.json``)."""

    out: Path | None = None
    seed: int = 0
    quick: bool = False
    test_fraction: float = 0.2
    flip_fraction: float = 0.05
    models: tuple[ModelSpec, ...] = (LOGREG, MLP)
    n_loo: int = 30
    n_show: int = 3
    k: int = 5
    inspect_fraction: float = 0.1
    train_tolerance: float = 1e-10
    threads: int = 1

    @classmethod
    def create(
        cls, out: str | Path | None = None, seed: int = 0, quick: bool = False, threads: int = 1
    ) -> DemoConfig:
        """The standard run, or with ``quick`` a smoke test: logistic regression, 10 retrains."""
        config = cls(out=Path(out) if out is not None else None, seed=seed, threads=threads)
        if quick:
            config = replace(config, quick=True, models=(LOGREG,), n_loo=10, n_show=2)
        return config


def influence(task: Task, data: DigitsData, spec: ModelSpec, estimator: str) -> Influence:
    """An exact-GGN Influence with the model's own objective, fitted on the training split."""
    return Influence(
        task,
        method="exact",
        estimator=estimator,
        l2=spec.l2,
        damping=spec.damping,
        progress=False,
    ).fit(data.train)


def choose_shown(task: Task, data: DigitsData, n_show: int, seed: int) -> list[int]:
    """Test images to explain: the one with the highest loss, then random others."""
    worst = int(losses(task, *data.test).argmax())
    rng = np.random.default_rng(seed + 1)
    others = [int(i) for i in rng.permutation(len(data.y_test)) if i != worst]
    return [worst, *others[: n_show - 1]]


def detection(
    self_scores: Tensor, train_losses: Tensor, flipped: Tensor, inspect: float
) -> dict[str, float]:
    """Mislabel detection by self-influence, with the training loss as a baseline."""
    return {
        "self_influence_auc": evaluate.detection_auc(self_scores, flipped),
        "self_influence_fraction_found": evaluate.fraction_found(self_scores, flipped, inspect),
        "loss_auc": evaluate.detection_auc(train_losses, flipped),
        "loss_fraction_found": evaluate.fraction_found(train_losses, flipped, inspect),
        "inspected_fraction": inspect,
    }


def train_model(spec: ModelSpec, data: DigitsData, config: DemoConfig) -> tuple[Task, TrainResult]:
    """Build and train the model of ``spec`` to a tight optimum of its objective."""
    task = Task.classification(build_model(spec, config.seed))
    trained = train_to_optimum(
        task, data.train, spec.l2, tolerance=config.train_tolerance, progress=False
    )
    n_params = sum(p.numel() for p in task.model.parameters())
    print(
        f"\n== {spec.name}: {n_params} parameters, l2={spec.l2:g}, damping={spec.damping:g}; "
        f"trained to ||grad L||={trained.gradient_norm:.1e} in {trained.evaluations} evaluations"
    )
    print(f"  test accuracy {accuracy(task.model, *data.test):.4f}")
    return task, trained


def explain(
    inf: Influence, data: DigitsData, spec: ModelSpec, config: DemoConfig
) -> tuple[list[dict[str, Any]], dict[int, int]]:
    """Top proponents and opponents of a few test images, printed and returned as table rows.

    Returns:
        the table rows and the model's predicted class of each explained test image.
    """
    shown = choose_shown(inf.task, data, config.n_show, config.seed)
    top = inf.top_k((data.X_test[shown], data.y_test[shown]), k=config.k)
    rows = explanation_rows(spec.name, data, shown, top)
    predicted = predict(inf.task.model, data.X_test[shown]).tolist()
    pred_shown = dict(zip(shown, predicted))
    print("  top proponents/opponents (IF; score = change of the test loss if removed):")
    print_explanations(rows, pred_shown)
    return rows, pred_shown


def detect_mislabels(
    inf: Influence, data: DigitsData, config: DemoConfig
) -> tuple[dict[str, float], Tensor, Tensor]:
    """Rank training examples by self-influence (and by loss) against the flipped labels.

    Returns:
        the detection metrics, the self-influence scores [n_train] and the losses [n_train].
    """
    self_scores = inf.self_scores()
    train_losses = losses(inf.task, *data.train)
    det = detection(self_scores, train_losses, data.flipped, config.inspect_fraction)
    pct = round(100 * config.inspect_fraction)
    print(
        f"  mislabel detection: self-influence AUC {det['self_influence_auc']:.4f}, "
        f"{det['self_influence_fraction_found']:.1%} of flipped labels in the top {pct}% "
        f"(training-loss baseline: AUC {det['loss_auc']:.4f}, "
        f"{det['loss_fraction_found']:.1%})"
    )
    return det, self_scores, train_losses


def check_faithfulness(
    influences: dict[str, Influence],
    data: DigitsData,
    spec: ModelSpec,
    test_index: int,
    n_loo: int,
) -> Faithfulness:
    """Leave-one-out retraining on one test image against each estimator's prediction."""
    one = (data.X_test[test_index : test_index + 1], data.y_test[test_index : test_index + 1])
    scores = {name: inf.scores(one)[0] for name, inf in influences.items()}
    result = faithfulness(influences["if"].task, data, spec, test_index, scores, n_loo)
    for est, corr in result.correlations.items():
        print(
            f"  leave-one-out on test image {test_index} ({n_loo} retrains), {est:>6}: "
            f"Pearson {corr.pearson:.4f}, Spearman {corr.spearman:.4f}"
        )
    return result


def model_section(
    spec: ModelSpec,
    data: DigitsData,
    inf: Influence,
    trained: TrainResult,
    shown: list[int],
    det: dict[str, float],
    faith: Faithfulness,
) -> dict[str, Any]:
    """The model's part of ``summary.json``: settings, accuracy, detection and faithfulness."""
    model, t = inf.task.model, faith.test_index
    return {
        "spec": asdict(spec),
        "n_params": inf.n_params,
        "training": {
            "objective": trained.objective,
            "gradient_norm": trained.gradient_norm,
            "evaluations": trained.evaluations,
            "converged": trained.converged,
            "stationarity": inf.stationarity,
        },
        "test_accuracy": accuracy(model, *data.test),
        "train_accuracy_given_labels": accuracy(model, *data.train),
        "train_accuracy_true_labels": accuracy(model, data.X_train, data.y_train_true),
        "explained_test_indices": shown,
        "detection": det,
        "faithfulness": {
            "test_index": t,
            "test_loss": float(losses(inf.task, data.X_test[t : t + 1], data.y_test[t : t + 1])[0]),
            "n_retrained": len(faith.train_indices),
            "retrain_tolerance": spec.retrain_tolerance,
            "max_retrain_gradient_norm": float(faith.retrain_gradient_norms.max()),
            **{
                est: {"pearson": c.pearson, "spearman": c.spearman}
                for est, c in faith.correlations.items()
            },
        },
        "influence": inf.describe(),
    }


def analyse_model(
    spec: ModelSpec, data: DigitsData, config: DemoConfig, out: Path
) -> tuple[dict[str, Any], Faithfulness, dict[str, Tensor]]:
    """Train one model and run every analysis on it; write its tables and explanation plot.

    Returns:
        the model's section of the summary, its faithfulness result, and its detection
        rankings (name -> [n_train] scores) for the combined detection plot.
    """
    watch = Stopwatch()
    task, trained = train_model(spec, data, config)
    watch.lap("train")
    influences = {est: influence(task, data, spec, est) for est in ("if", "newton")}
    watch.lap("fit")
    rows, predicted = explain(influences["if"], data, spec, config)
    watch.lap("explain")
    det, self_scores, train_losses = detect_mislabels(influences["if"], data, config)
    watch.lap("detect")
    shown = list(predicted)
    faith = check_faithfulness(influences, data, spec, shown[0], config.n_loo)
    watch.lap("leave_one_out")

    name = spec.name
    save_csv(
        out / f"{name}_self_influence.csv", self_influence_rows(data, self_scores, train_losses)
    )
    save_csv(out / f"{name}_top_k.csv", rows)
    save_csv(out / f"{name}_loo.csv", loo_rows(data, faith))
    plot_explanations(out / f"{name}_explanations.png", data, rows, predicted, name)
    watch.lap("write")

    section = model_section(spec, data, influences["if"], trained, shown, det, faith)
    section["seconds"] = watch.seconds
    rankings = {f"{spec.name} self-influence": self_scores, f"{spec.name} loss": train_losses}
    return section, faith, rankings


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, restoring the previous setting afterwards.

    The demo's matrices are small; one thread avoids oversubscription on a shared CPU.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_out() -> Path:
    """``runs/demo-<timestamp>`` under the current directory."""
    return Path("runs") / f"demo-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the whole demo; write the run directory; return the summary (also ``summary.json``)."""
    start = time.perf_counter()
    out = config.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    with torch_threads(config.threads):
        data = load_data(config.seed, config.test_fraction, config.flip_fraction)
        n_flipped = int(data.flipped.sum())
        print(
            f"digits: {len(data.y_train)} training / {len(data.y_test)} test images; "
            f"{n_flipped} training labels flipped ({config.flip_fraction:.0%}); seed {config.seed}"
        )
        sections, faiths, curves = {}, {}, {}
        for spec in config.models:
            sections[spec.name], faiths[spec.name], ranking = analyse_model(spec, data, config, out)
            curves.update(ranking)
        plot_loo(out / "loo_scatter.png", faiths)
        plot_detection(out / "detection.png", curves, data.flipped, config.inspect_fraction)
    summary = {
        "settings": {
            **{k: v for k, v in asdict(config).items() if k not in ("models", "out")},
            "out": str(out),
            "models": [spec.name for spec in config.models],
            "n_train": len(data.y_train),
            "n_test": len(data.y_test),
            "n_flipped": n_flipped,
            "flipped_indices": data.flipped.nonzero().squeeze(1).tolist(),
            "method": "exact (GGN)",
            "score_units": "change of the test loss when the training example is removed, 1/N "
            "included; > 0: the example helped (proponent)",
        },
        "models": sections,
        "wall_seconds": round(time.perf_counter() - start, 2),
    }
    summary["report"] = str(write_report(config, data, out))
    summary["wall_seconds"] = round(time.perf_counter() - start, 2)
    save_json(out / "summary.json", summary)
    print(f"\ndone in {summary['wall_seconds']:.1f} s; results in {out}")
    print(f"report: {summary['report']}")
    return summary


def write_report(config: DemoConfig, data: DigitsData, out: Path) -> Path:
    """Write ``report.toml`` (the analysis of the last model, the MLP unless ``quick``, as an
    ``infkit run`` config) and run it: ``out/report/report.html``."""
    from infkit.demo.project import report_config
    from infkit.report import parse, run

    flipped = data.flipped.nonzero().squeeze(1).tolist()
    path = out / "report.toml"
    spec = config.models[-1]
    path.write_text(report_config(spec, config.seed, flipped, config.n_loo // 3, "report"))
    print(f"\n== report: the {spec.name} analysis as `infkit run {path}`")
    with torch_threads(config.threads):
        return run(parse(path), progress=False)
