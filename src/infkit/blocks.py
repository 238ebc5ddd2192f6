"""Block-diagonal (per-layer) views of the parameter vector and of curvature operators.

Methods with a per-layer option (``blocks="layer"``) use these: the flat parameter vector is cut
into one slice per parameter tensor (or per module), and an operator H becomes its block-diagonal
part ``sum_l P_l H P_l``, i.e. the cross-layer curvature is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from infkit.errors import UnsupportedError
from infkit.parameters import ParameterSpace

BlockMode = Literal["tensor", "module"]
MODES: tuple[BlockMode, ...] = ("tensor", "module")


def layer_slices(space: ParameterSpace, mode: BlockMode = "tensor") -> list[tuple[str, slice]]:
    """(name, slice) of the flat parameter vector: one per parameter tensor, or one per module.

    With ``mode="module"`` consecutive tensors of the same module (``0.weight``, ``0.bias``) share
    one block named after the module.
    """
    if mode not in MODES:
        raise UnsupportedError(f"unknown block mode {mode!r}; use one of {MODES}")
    out: list[tuple[str, slice]] = []
    previous = None
    for name, sl in space.module_slices().items():
        if mode == "tensor":
            out.append((name, sl))
            continue
        module = name.rsplit(".", 1)[0] if "." in name else name
        if out and module == previous and out[-1][1].stop == sl.start:
            out[-1] = (module, slice(out[-1][1].start, sl.stop))
        else:
            out.append((module, sl))
        previous = module
    return out


def block_diagonal(
    matmat: Callable[[Tensor], Tensor], slices: list[slice]
) -> Callable[[Tensor], Tensor]:
    """The block-diagonal part of an operator, ``X -> sum_l P_l H P_l X`` for X of shape [k, P].

    Each row is split into its per-block pieces, all L*k pieces go through ``matmat`` in one call
    and each product keeps only its own block: L times the cost of one product.
    """

    def apply(X: Tensor) -> Tensor:
        k, p = X.shape
        masked = torch.zeros(len(slices), k, p, dtype=X.dtype, device=X.device)
        for b, sl in enumerate(slices):
            masked[b, :, sl] = X[:, sl]
        products = matmat(masked.reshape(-1, p)).reshape(len(slices), k, p)
        out = torch.zeros_like(products[0])
        for b, sl in enumerate(slices):
            out[:, sl] = products[b, :, sl]
        return out

    return apply
