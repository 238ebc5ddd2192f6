"""method="ekfac": K-FAC eigenbases with the exact diagonal in them (docs/methods/kfac.md §5).

Grosse et al. (2023) and George et al. (2018): keep the Kronecker eigenbases ``Q_S``, ``Q_A`` of
K-FAC and replace the eigenvalues ``lambda_S lambda_A^T`` by

    Lambda_oi = (1/N) sum_i E[(Q_S^T DW_i Q_A)_oi^2],

the exact diagonal of the layer's mean-form GGN block in that basis (one more pass over the
training data; with ``fisher="ggn"`` exact and deterministic). This corrects K-FAC's mis-scaled
eigenvalues and the correlation between positions of a sequence. Options, damping and saved
factors are those of ``"kfac"`` (:class:`infkit.kfac.curvature.KroneckerOptions`).
"""

from __future__ import annotations

from infkit.errors import ProblemTooLargeError
from infkit.methods.base import Fidelity, Problem, register
from infkit.methods.kfac import AUTO_TRACKED_SHARE, KFAC, tracked_share


@register
class EKFAC(KFAC):
    """EK-FAC: the K-FAC eigenbasis with the GGN's exact diagonal in it as eigenvalues."""

    name = "ekfac"
    summary = "eigenvalue-corrected K-FAC (Grosse et al. 2023); Linear/Conv1d/Conv2d/Conv1D; scales"
    corrected = True
    fidelity = Fidelity(
        rtol=None, min_correlation=0.8, removal_correlation=0.5, scale=(0.8, 4.0), damping=0.1
    )
    auto_priority = 2

    @classmethod
    def suits(cls, problem: Problem) -> bool:
        return tracked_share(problem) >= AUTO_TRACKED_SHARE and cls._too_large(problem) is None

    @classmethod
    def _too_large(cls, problem: Problem) -> str | None:
        """Why the factors do not fit ``memory_limit`` (None when they do)."""
        try:
            cls().check_memory(problem)
        except ProblemTooLargeError as error:
            return str(error)
        return None

    @classmethod
    def suitability(cls, problem: Problem) -> str:
        share = tracked_share(problem)
        too_large = cls._too_large(problem) if share >= AUTO_TRACKED_SHARE else None
        if too_large is not None:
            return f"its factors do not fit: {too_large}"
        if share == 1.0:
            return "every trainable parameter is in a layer it factors (Linear, Conv2d, Conv1d, Conv1D)"
        if share >= AUTO_TRACKED_SHARE:
            return (
                f"the layers it factors (Linear, Conv2d, Conv1d, Conv1D) hold {share:.0%} of the "
                "trainable parameters; the rest are left out of the attribution with a notice"
            )
        return (
            f"the layers it factors hold only {share:.0%} of the trainable parameters (it "
            f"takes at least {AUTO_TRACKED_SHARE:.0%})"
        )
