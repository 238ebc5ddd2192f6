"""The layers Kronecker factors, factored gradient products and per-token scores work through.

* :mod:`~infkit.layers.tracked`: which layers are tracked (``nn.Linear``, ``nn.Conv2d``,
  ``nn.Conv1d``, Hugging Face ``Conv1D``) and the [W | b] block layout of their parameters in
  flat vectors;
* :mod:`~infkit.layers.capture`: their input activations and pre-activation gradients, through
  forward hooks on the real model.
"""

from infkit.layers.capture import Capture, block_gradients, layer_terms
from infkit.layers.tracked import SUPPORTED, BlockLayout, TrackedLayers, TrackedModule, find_modules

__all__ = [
    "SUPPORTED",
    "BlockLayout",
    "Capture",
    "TrackedLayers",
    "TrackedModule",
    "block_gradients",
    "find_modules",
    "layer_terms",
]
