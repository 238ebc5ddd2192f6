"""A real analysis on scikit-learn's bundled digits: attribution, mislabel detection, faithfulness.

``python -m infkit demo`` (or ``make demo``) runs it end to end on a laptop CPU in about a minute:

1. load the 8x8 digits (1,797 images, no download), stratified 80/20 split, standardise the
   pixels on the training split, and flip 5% of the training labels to a different class;
2. train an L2 multinomial logistic regression and a small tanh MLP in float64 with
   :func:`infkit.train_to_optimum` (a tight optimum of ``mean_i l_i + (l2/2)||theta||^2``);
3. for each model: the top proponents and opponents of a few test images; mislabel detection
   by self-influence (ROC AUC and the share of flipped labels found in the top 10%, next to
   the training loss as a baseline); and a faithfulness check against actual retraining: for
   one test image, the 30 training examples with the largest |IF| score on its loss are each
   left out and the model retrained, and the predicted changes of the test loss (IF and
   Newton step) are compared with the actual ones.

Everything lands in a run directory: ``summary.json`` (numbers and settings), CSV tables and
PNG plots. Indices are positions in the training split; CSVs also give the index in
``sklearn.datasets.load_digits()`` so each image can be found again.
"""

from __future__ import annotations

import contextlib
import csv
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn

from infkit import evaluate, retrain
from infkit.influence import Influence, TopK
from infkit.store import save_json
from infkit.task import Task
from infkit.training import TrainResult, train_to_optimum

N_CLASSES = 10
N_PIXELS = 64


@dataclass(frozen=True)
class ModelSpec:
    """One model of the demo and the objective it is trained on.

    Attributes:
        name: short name used in file names (``logreg``, ``mlp``).
        hidden: width of the tanh hidden layer; ``None`` for logistic regression.
        l2: the mean-form L2 coefficient of the training objective.
        damping: extra numerical damping of the curvature (0: none needed).
        retrain_tolerance: ``||grad L||`` at which a leave-one-out retraining stops (the
            retrained parameters are then within ``tolerance / l2`` of the exact optimum);
            ``1e-8`` for the MLP changes its measured losses by under 1e-6 relative to
            ``1e-10`` and saves a third of the time.
    """

    name: str
    hidden: int | None
    l2: float
    damping: float = 0.0
    retrain_tolerance: float = 1e-10


LOGREG = ModelSpec("logreg", hidden=None, l2=1e-3, retrain_tolerance=1e-10)
MLP = ModelSpec("mlp", hidden=16, l2=1e-2, retrain_tolerance=1e-8)


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


@dataclass
class DigitsData:
    """The split digits with flipped training labels.

    Attributes:
        X_train, X_test: standardised pixels [n, 64], float64.
        y_train: the training labels as given to the model (5% flipped), int64.
        y_train_true: the original training labels.
        flipped: [n_train] bool, True where the label was flipped.
        y_test: test labels (never flipped).
        images_train, images_test: raw pixels [n, 8, 8] (0..16) for plotting.
        ids_train, ids_test: positions in ``load_digits()``.
    """

    X_train: Tensor
    y_train: Tensor
    y_train_true: Tensor
    flipped: Tensor
    X_test: Tensor
    y_test: Tensor
    images_train: np.ndarray
    images_test: np.ndarray
    ids_train: np.ndarray
    ids_test: np.ndarray

    @property
    def train(self) -> tuple[Tensor, Tensor]:
        return self.X_train, self.y_train

    @property
    def test(self) -> tuple[Tensor, Tensor]:
        return self.X_test, self.y_test


@dataclass
class Faithfulness:
    """Predicted vs actual leave-one-out change of one test image's loss."""

    test_index: int
    train_indices: Tensor  # [k]
    predicted: dict[str, Tensor]  # estimator -> [k]
    actual: Tensor  # [k]
    retrain_gradient_norms: Tensor  # [k]
    correlations: dict[str, evaluate.Correlation] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------- data
def flip_labels(
    y: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Flip ``fraction`` of the labels, each to a different class chosen at random.

    Returns:
        the noisy labels and a boolean mask of the flipped positions.
    """
    n = len(y)
    chosen = rng.choice(n, size=round(fraction * n), replace=False)
    noisy = y.copy()
    noisy[chosen] = (y[chosen] + rng.integers(1, N_CLASSES, size=len(chosen))) % N_CLASSES
    flipped = np.zeros(n, dtype=bool)
    flipped[chosen] = True
    return noisy, flipped


def load_data(seed: int, test_fraction: float, flip_fraction: float) -> DigitsData:
    """Digits split (stratified), standardised on the training split, with flipped labels."""
    digits = load_digits()
    ids = np.arange(len(digits.target))
    ids_train, ids_test = train_test_split(
        ids, test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    scaler = StandardScaler().fit(digits.data[ids_train])
    y_true = digits.target[ids_train]
    y_noisy, flipped = flip_labels(y_true, flip_fraction, np.random.default_rng(seed))
    return DigitsData(
        X_train=torch.tensor(scaler.transform(digits.data[ids_train]), dtype=torch.float64),
        y_train=torch.tensor(y_noisy, dtype=torch.long),
        y_train_true=torch.tensor(y_true, dtype=torch.long),
        flipped=torch.tensor(flipped),
        X_test=torch.tensor(scaler.transform(digits.data[ids_test]), dtype=torch.float64),
        y_test=torch.tensor(digits.target[ids_test], dtype=torch.long),
        images_train=digits.images[ids_train],
        images_test=digits.images[ids_test],
        ids_train=ids_train,
        ids_test=ids_test,
    )


# ---------------------------------------------------------------------------------------- model
def build_model(spec: ModelSpec, seed: int) -> nn.Module:
    """A float64 model for ``spec``, initialised from ``seed`` (the global RNG is untouched)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if spec.hidden is None:
            model: nn.Module = nn.Linear(N_PIXELS, N_CLASSES)
        else:
            model = nn.Sequential(
                nn.Linear(N_PIXELS, spec.hidden), nn.Tanh(), nn.Linear(spec.hidden, N_CLASSES)
            )
    return model.double()


@torch.no_grad()
def predict(model: nn.Module, X: Tensor) -> Tensor:
    """Predicted classes [n]."""
    return model(X).argmax(dim=1)


@torch.no_grad()
def losses(task: Task, X: Tensor, y: Tensor) -> Tensor:
    """Per-example losses [n] of the task's model."""
    return task.loss(task.model(X), y)


def accuracy(model: nn.Module, X: Tensor, y: Tensor) -> float:
    """Share of correctly classified examples."""
    return float((predict(model, X) == y).double().mean())


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


# ---------------------------------------------------------------------------------------- analyses
def choose_shown(task: Task, data: DigitsData, n_show: int, seed: int) -> list[int]:
    """Test images to explain: the one with the highest loss, then random others."""
    worst = int(losses(task, *data.test).argmax())
    rng = np.random.default_rng(seed + 1)
    others = [int(i) for i in rng.permutation(len(data.y_test)) if i != worst]
    return [worst, *others[: n_show - 1]]


def explanation_rows(
    model_name: str, data: DigitsData, test_indices: Sequence[int], top: TopK
) -> list[dict[str, Any]]:
    """One table row per (test image, proponent/opponent rank)."""
    rows = []
    for q, t in enumerate(test_indices):
        for kind in ("proponent", "opponent"):
            indices = getattr(top, f"{kind}_indices")[q].tolist()
            scores = getattr(top, f"{kind}_scores")[q].tolist()
            for rank, (j, score) in enumerate(zip(indices, scores), start=1):
                rows.append(
                    {
                        "model": model_name,
                        "test_index": t,
                        "test_digits_id": int(data.ids_test[t]),
                        "test_label": int(data.y_test[t]),
                        "kind": kind,
                        "rank": rank,
                        "train_index": j,
                        "train_digits_id": int(data.ids_train[j]),
                        "given_label": int(data.y_train[j]),
                        "true_label": int(data.y_train_true[j]),
                        "flipped": bool(data.flipped[j]),
                        "score": score,
                    }
                )
    return rows


def print_explanations(rows: list[dict[str, Any]], predicted: dict[int, int]) -> None:
    """Print the proponent/opponent table of each explained test image."""
    for t in dict.fromkeys(r["test_index"] for r in rows):
        mine = [r for r in rows if r["test_index"] == t]
        print(f"  test image {t}: label {mine[0]['test_label']}, predicted {predicted[t]}")
        for kind in ("proponent", "opponent"):
            cells = []
            for r in (r for r in mine if r["kind"] == kind):
                mark = f" FLIPPED (true {r['true_label']})" if r["flipped"] else ""
                cells.append(f"#{r['train_index']} y={r['given_label']}{mark} {r['score']:+.2e}")
            print(f"    {kind}s: " + "; ".join(cells))


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


def faithfulness(
    task: Task,
    data: DigitsData,
    spec: ModelSpec,
    test_index: int,
    scores_by_estimator: dict[str, Tensor],
    n_loo: int,
) -> Faithfulness:
    """Retrain without each of the ``n_loo`` largest-|IF| examples; compare with predictions.

    Args:
        scores_by_estimator: estimator -> that estimator's scores [n_train] on the test image.
    """
    one = (data.X_test[test_index : test_index + 1], data.y_test[test_index : test_index + 1])
    chosen = scores_by_estimator["if"].abs().topk(n_loo).indices
    loo = retrain.leave_one_out(
        task, data.train, one, chosen, spec.l2, tolerance=spec.retrain_tolerance
    )
    actual = loo.measurement[0]
    predicted = {name: s[chosen] for name, s in scores_by_estimator.items()}
    return Faithfulness(
        test_index=test_index,
        train_indices=chosen,
        predicted=predicted,
        actual=actual,
        retrain_gradient_norms=loo.gradient_norms,
        correlations={name: evaluate.correlation(p, actual) for name, p in predicted.items()},
    )


# ---------------------------------------------------------------------------------------- files
def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write ``rows`` (dicts with the same keys) as CSV; floats with full precision."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(
            {k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows
        )
    return path


def self_influence_rows(
    data: DigitsData, self_scores: Tensor, train_losses: Tensor
) -> list[dict[str, Any]]:
    """One row per training example, most suspicious (highest self-influence) first."""
    order = self_scores.argsort(descending=True).tolist()
    return [
        {
            "train_index": j,
            "digits_id": int(data.ids_train[j]),
            "given_label": int(data.y_train[j]),
            "true_label": int(data.y_train_true[j]),
            "flipped": bool(data.flipped[j]),
            "self_influence": float(self_scores[j]),
            "train_loss": float(train_losses[j]),
        }
        for j in order
    ]


def loo_rows(data: DigitsData, result: Faithfulness) -> list[dict[str, Any]]:
    """One row per left-out training example: predicted (each estimator) and actual change."""
    rows = []
    for k, j in enumerate(result.train_indices.tolist()):
        row: dict[str, Any] = {
            "test_index": result.test_index,
            "train_index": j,
            "given_label": int(data.y_train[j]),
            "flipped": bool(data.flipped[j]),
        }
        row.update({f"predicted_{name}": float(p[k]) for name, p in result.predicted.items()})
        row["actual"] = float(result.actual[k])
        row["retrain_gradient_norm"] = float(result.retrain_gradient_norms[k])
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- plots
def plot_explanations(
    path: Path, data: DigitsData, rows: list[dict[str, Any]], predicted: dict[int, int], title: str
) -> Path:
    """Each explained test image, then its proponents and opponents; flipped labels in red."""
    tests = list(dict.fromkeys(r["test_index"] for r in rows))
    k = max(r["rank"] for r in rows)
    n_cols = 1 + 2 * k
    fig = Figure(figsize=(1.25 * n_cols, 1.75 * len(tests) + 0.6))
    axes = fig.subplots(len(tests), n_cols, squeeze=False)
    for q, t in enumerate(tests):
        _digit(
            axes[q, 0],
            data.images_test[t],
            f"TEST {t}\ny={int(data.y_test[t])} pred={predicted[t]}",
        )
        axes[q, 0].set_title(axes[q, 0].get_title(), fontsize=8, fontweight="bold")
        for r in (r for r in rows if r["test_index"] == t):
            col = r["rank"] if r["kind"] == "proponent" else k + r["rank"]
            tag = "pro" if r["kind"] == "proponent" else "opp"
            label = f"y={r['given_label']}"
            if r["flipped"]:
                label += f" (true {r['true_label']})"
            text = f"{tag} #{r['train_index']}\n{label}\n{r['score']:+.1e}"
            _digit(axes[q, col], data.images_train[r["train_index"]], text, flag=r["flipped"])
    fig.suptitle(
        f"{title}: test image, {k} proponents (removal raises its loss), {k} opponents; "
        "red = flipped label",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _digit(ax: Any, image: np.ndarray, text: str, flag: bool = False) -> None:
    ax.imshow(image, cmap="gray_r", vmin=0, vmax=16, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    color = "red" if flag else "black"
    ax.set_title(text, fontsize=7, color=color)
    if flag:
        for spine in ax.spines.values():
            spine.set_edgecolor("red")
            spine.set_linewidth(2.5)


def plot_loo(path: Path, results: dict[str, Faithfulness]) -> Path:
    """Predicted vs actual leave-one-out change of the test loss, one panel per model x estimator."""
    names = list(results)
    estimators = list(next(iter(results.values())).predicted)
    fig = Figure(figsize=(4.2 * len(estimators), 4.0 * len(names)))
    axes = fig.subplots(len(names), len(estimators), squeeze=False)
    for r, name in enumerate(names):
        res = results[name]
        actual = res.actual.numpy()
        for c, est in enumerate(estimators):
            ax = axes[r, c]
            pred = res.predicted[est].numpy()
            lo = float(min(pred.min(), actual.min()))
            hi = float(max(pred.max(), actual.max()))
            pad = 0.05 * (hi - lo)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="gray", lw=1, label="y = x")
            ax.scatter(pred, actual, s=18, color="tab:blue")
            corr = res.correlations[est]
            ax.set_title(
                f"{name}, test image {res.test_index}, {est.upper()}\n"
                f"Pearson {corr.pearson:.3f}, Spearman {corr.spearman:.3f}",
                fontsize=9,
            )
            ax.set_xlabel("predicted change of test loss")
            ax.set_ylabel("actual change (retrained)")
            ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(
        "Predicted vs actual (retrained) leave-one-out change of one test image's loss,\n"
        "for the training examples with the largest |IF| scores",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_detection(path: Path, curves: dict[str, Tensor], flipped: Tensor, inspect: float) -> Path:
    """Share of flipped labels found vs share of training data inspected, per ranking.

    Rankings named ``"... loss"`` (the baselines) are drawn dotted.
    """
    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    n = len(flipped)
    xs = np.arange(1, n + 1) / n
    flags = flipped.numpy().astype(float)
    for name, scores in curves.items():
        order = np.argsort(-scores.numpy(), kind="stable")
        style = ":" if name.endswith(" loss") else "-"
        ax.plot(xs, np.cumsum(flags[order]) / flags.sum(), style, label=name)
    ax.plot([0, 1], [0, 1], color="gray", ls="--", lw=1, label="random")
    ax.axvline(inspect, color="gray", lw=0.8, ls=":")
    ax.set_xlim(0, 0.5)
    ax.set_xlabel("fraction of training set inspected")
    ax.set_ylabel("fraction of flipped labels found")
    ax.set_title("Mislabel detection by ranking", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------- driver
class Stopwatch:
    """Wall-clock seconds per named step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the time since the previous lap under ``name``."""
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now


def train_model(spec: ModelSpec, data: DigitsData, config: DemoConfig) -> tuple[Task, TrainResult]:
    """Build and train the model of ``spec`` to a tight optimum of its objective."""
    task = Task.classification(build_model(spec, config.seed))
    trained = train_to_optimum(task, data.train, spec.l2, tolerance=config.train_tolerance)
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
    write_csv(
        out / f"{name}_self_influence.csv", self_influence_rows(data, self_scores, train_losses)
    )
    write_csv(out / f"{name}_top_k.csv", rows)
    write_csv(out / f"{name}_loo.csv", loo_rows(data, faith))
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
    save_json(out / "summary.json", summary)
    print(f"\ndone in {summary['wall_seconds']:.1f} s; results in {out}")
    return summary
