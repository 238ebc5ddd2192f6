"""method="ekfac": K-FAC eigenbases with the exact diagonal in them (methods.md §4.3).

Grosse et al. (2023, Eq. 20) and George et al. (2018): keep the Kronecker eigenbases
``Q_S``, ``Q_A`` of :mod:`infkit.methods.kfac` and replace the eigenvalues by

    Lambda_oi = (1/N) sum_i E[(Q_S^T DW_i Q_A)_oi^2],

the exact diagonal of the layer's mean-form GGN block in that basis (one more pass over the
training data with per-example pseudo-gradients; with ``fisher="ggn"`` it is exact and
deterministic). This corrects K-FAC's mis-scaled eigenvalues and the correlation between
positions of a sequence. Everything else (options, damping, saved factors) is as for ``"kfac"``.
"""

from __future__ import annotations

from infkit.methods import register
from infkit.methods.kfac import KFAC


@register
class EKFAC(KFAC):
    __doc__ = KFAC.__doc__.replace(
        "K-FAC: layerwise Kronecker-factored GGN ``S (x) A``, inverted in its eigenbasis.",
        "EK-FAC: the K-FAC eigenbasis with the GGN's exact diagonal in it as eigenvalues.",
    )

    name = "ekfac"
    summary = "eigenvalue-corrected K-FAC (Grosse et al. 2023); Linear/Conv2d/Conv1D; scales"
    corrected = True
