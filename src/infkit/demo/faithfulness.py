"""The demo's faithfulness check: predicted against actual leave-one-out retraining."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from infkit import evaluate, retrain
from infkit.demo.data import DigitsData
from infkit.demo.models import ModelSpec
from infkit.task import Task


@dataclass
class Faithfulness:
    """Predicted vs actual leave-one-out change of one test image's loss."""

    test_index: int
    train_indices: Tensor  # [k]
    predicted: dict[str, Tensor]  # estimator -> [k]
    actual: Tensor  # [k]
    retrain_gradient_norms: Tensor  # [k]
    correlations: dict[str, evaluate.Correlation] = field(default_factory=dict)


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
