"""The demo's tables: printed explanations and the CSV files of a run."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from infkit.demo.data import DigitsData
from infkit.demo.faithfulness import Faithfulness
from infkit.influence import TopK


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
