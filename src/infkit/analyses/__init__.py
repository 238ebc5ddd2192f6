"""Applications built on influence scores, one module per analysis.

* :mod:`~infkit.analyses.layer_quality`: LayerIF, per-layer influence on a validation set;
* :mod:`~infkit.analyses.similarity`: Fisher-kernel (KFE) features and dataset similarity;
* :mod:`~infkit.analyses.memorisation`: memorisation scores from low-curvature gradient energy
  and the low-curvature weight edit;
* :mod:`~infkit.analyses.prefilter`: two-stage text attribution, TF-IDF candidates then exact
  influence on them;
* :mod:`~infkit.analyses.attacks`: training-set attacks from input influence, checked by
  retraining;
* :mod:`~infkit.analyses.behaviour`: IF-Guide, the training tokens that teach a language model a
  behaviour (differential per-token influence) and training that suppresses them;
* :mod:`~infkit.analyses.poisoning`: high-leverage poison that the influence function underrates
  and RIF does not, detected by ranking and checked by retraining;
* :mod:`~infkit.analyses.airrep`: AirRep, attribution by a learned encoder (dot products of
  embeddings, attention pooling over groups) trained to rank retrained subsets.
"""

import importlib as _importlib
from types import ModuleType
from typing import TYPE_CHECKING

#: the analyses, each read as an attribute (``infkit.analyses.poisoning``) and imported then
_SUBMODULES = (
    "airrep",
    "attacks",
    "behaviour",
    "layer_quality",
    "memorisation",
    "poisoning",
    "prefilter",
    "similarity",
)

if TYPE_CHECKING:  # type checkers and IDEs see the analyses and their signatures
    from infkit.analyses import (  # noqa: F401
        airrep,
        attacks,
        behaviour,
        layer_quality,
        memorisation,
        poisoning,
        prefilter,
        similarity,
    )
else:

    def __getattr__(name: str) -> ModuleType:
        """``infkit.analyses.poisoning`` and the others, imported when first read."""
        if name in _SUBMODULES:
            return _importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES})
