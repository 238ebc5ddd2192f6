"""A method in one file, outside the package: the diagonal of the GGN as the curvature.

This is the worked example of CONTRIBUTING.md. It approximates the damped mean-form GGN by its
diagonal,

    H ~ diag(H),    (diag(H) + (l2 + damping + shift) I)^{-1} V = V / (diag(H) + ridge),

a crude but cheap curvature (one pass of per-example Jacobians at fit, elementwise solves).
Everything else, the estimators, the facade's questions and the contract test, comes from
infkit: importing this module registers the method, and ``infkit.Influence(task,
"diagonal_ggn", l2=...)`` uses it.

Run it as a script for a small demonstration on scikit-learn's wine data.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from infkit.curvature import ggn_diagonal
from infkit.errors import CurvatureError, NotFittedError
from infkit.fitted import Fitted
from infkit.methods import Fidelity, PrimalMethod, register
from infkit.options import Options, option


@dataclasses.dataclass(frozen=True)
class DiagonalGGNOptions(Options):
    """Options of ``method="diagonal_ggn"``."""

    floor: float = option(0.0, "added to every diagonal entry before inverting", minimum=0)


@register
class DiagonalGGN(PrimalMethod):
    """The diagonal of the mean-form GGN, inverted elementwise."""

    name = "diagonal_ggn"
    summary = "diagonal of the GGN (an example method defined outside infkit)"
    Options = DiagonalGGNOptions
    # The diagonal does not contain each example's own curvature block, so the RIF and Newton
    # downdates would mix exact and approximate curvature: supply the IF and RelatIF only.
    estimators = ("if", "relatif")
    scales = True
    fidelity = Fidelity(rtol=None, min_correlation=0.45, removal_correlation=0.3, scale=(0.5, 10.0))
    # What fit computes and the answers need: saved by inf.save, set back by Influence.load.
    fitted_state = ("diagonal",)
    options: DiagonalGGNOptions

    def __init__(self, options: DiagonalGGNOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.diagonal: Tensor | None = None

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        self.diagonal = ggn_diagonal(fitted.engine, fitted.train, fitted.batch_size)

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        if self.diagonal is None:
            raise NotFittedError("method 'diagonal_ggn' is not fitted")
        denominator = self.diagonal + self.options.floor + self.fitted.ridge + shift
        if float(denominator.min()) <= 0:
            raise CurvatureError(
                "the damped GGN diagonal has an entry <= 0; pass damping > 0 or floor > 0"
            )
        return V.to(torch.float64) / denominator


def main() -> None:  # pragma: no cover - a demonstration
    from sklearn.datasets import load_wine
    from sklearn.preprocessing import StandardScaler

    import infkit

    X, y = load_wine(return_X_y=True)
    X = torch.tensor(StandardScaler().fit_transform(X))
    y = torch.tensor(y)
    model = torch.nn.Linear(13, 3).double()
    task = infkit.Task.classification(model)
    l2 = 1e-2
    infkit.train_to_optimum(task, (X, y), l2)
    diagonal = infkit.Influence(task, "diagonal_ggn", l2=l2).fit((X, y))
    exact = infkit.Influence(task, "exact", l2=l2).fit((X, y))
    agreement = infkit.evaluate.correlation(diagonal.self_scores(), exact.self_scores())
    print(f"self-influence, diagonal GGN vs exact: Pearson {agreement.pearson:.3f}")


if __name__ == "__main__":
    main()
