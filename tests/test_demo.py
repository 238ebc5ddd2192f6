"""Smoke test of the digits demo (``infkit demo --quick``) and its label flipping."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np

from infkit.cli import main
from infkit.demo.data import flip_labels
from infkit.store import load_json

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_flip_labels_changes_exactly_the_recorded_labels() -> None:
    y = np.arange(1000) % 10
    noisy, flipped = flip_labels(y, 0.05, np.random.default_rng(0))
    assert flipped.sum() == 50
    assert (noisy[flipped] != y[flipped]).all()
    assert (noisy[~flipped] == y[~flipped]).all()
    assert ((noisy >= 0) & (noisy < 10)).all()


def test_quick_demo_writes_a_sane_run_directory(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out), "--seed", "0"]) == 0

    expected = [
        "summary.json",
        "logreg_self_influence.csv",
        "logreg_top_k.csv",
        "logreg_loo.csv",
        "logreg_explanations.png",
        "loo_scatter.png",
        "detection.png",
    ]
    for name in expected:
        assert (out / name).is_file(), name
    for name in expected:
        if name.endswith(".png"):
            assert (out / name).read_bytes()[:8] == PNG_MAGIC, name

    summary = load_json(out / "summary.json")
    settings = summary["settings"]
    assert settings["quick"] is True and settings["models"] == ["logreg"]
    assert settings["n_train"] + settings["n_test"] == 1797
    assert settings["n_flipped"] == round(0.05 * settings["n_train"])

    logreg = summary["models"]["logreg"]
    assert logreg["test_accuracy"] > 0.85
    assert logreg["training"]["stationarity"] < 1e-6
    det = logreg["detection"]
    assert det["self_influence_auc"] > 0.9  # flipped labels have high self-influence
    assert det["self_influence_fraction_found"] > 0.5
    faith = logreg["faithfulness"]
    assert faith["n_retrained"] == 10
    assert faith["max_retrain_gradient_norm"] <= faith["retrain_tolerance"]
    assert faith["if"]["pearson"] > 0.7
    assert faith["newton"]["pearson"] > 0.7

    # The self-influence table covers every training example and records the same flips.
    table = _rows(out / "logreg_self_influence.csv")
    assert len(table) == settings["n_train"]
    flipped = sorted(int(r["train_index"]) for r in table if r["flipped"] == "True")
    assert flipped == sorted(settings["flipped_indices"])
    scores = [float(r["self_influence"]) for r in table]
    assert scores == sorted(scores, reverse=True)

    # Proponents of a loss have positive scores, opponents negative (removal effects).
    top = _rows(out / "logreg_top_k.csv")
    assert len(top) == 2 * 2 * 5  # 2 test images x (5 proponents + 5 opponents)
    assert all(float(r["score"]) > 0 for r in top if r["kind"] == "proponent")
    assert all(float(r["score"]) < 0 for r in top if r["kind"] == "opponent")

    # Predicted and actual leave-one-out changes mostly agree in sign.
    loo = _rows(out / "logreg_loo.csv")
    assert len(loo) == 10
    agree = [np.sign(float(r["predicted_if"])) == np.sign(float(r["actual"])) for r in loo]
    assert sum(agree) >= 8

    # The report: a config the user can rerun, and its page, of the same model and settings.
    assert summary["report"] == str(out / "report" / "report.html")
    assert (out / "report.toml").is_file()
    page = (out / "report" / "report.html").read_text()
    assert 'id="explanations"' in page and "ROC AUC" in page
    from infkit.report import load_results

    data, tensors = load_results(out / "report")
    assert data["summary"]["n_train"] == settings["n_train"]
    assert sorted(tensors["flagged"].nonzero().squeeze(1).tolist()) == settings["flipped_indices"]
    # the same model retrained by the report's factory: the same ranking up to rounding
    auc = data["self_influence"]["detection"]["self_influence_auc"]
    assert abs(auc - det["self_influence_auc"]) < 1e-3


def test_import_infkit_needs_no_plotting_or_sklearn() -> None:
    """The core imports torch, numpy, scipy, safetensors and tqdm only (lazily for scipy)."""
    code = (
        "import sys, infkit\n"
        "print('matplotlib' in sys.modules, 'sklearn' in sys.modules, 'pandas' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "False"]


def test_demo_without_its_extra_says_how_to_install_it(monkeypatch, capsys) -> None:
    for name in [m for m in sys.modules if m == "infkit.demo" or m.startswith("infkit.demo.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # importing it raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert main(["demo", "--quick"]) == 2
    assert 'pip install "infkit[demo]"' in capsys.readouterr().err
