"""Per-example gradients by plain autograd, one example at a time: a reference that uses none of
infkit's gradient code."""

from __future__ import annotations

import torch


def autograd_gradients(model, X, y, loss=torch.nn.functional.cross_entropy) -> torch.Tensor:
    """Per-example gradients [n, P] of the loss with respect to the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(y)):
        value = loss(model(X[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(value, params, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params)
                ]
            )
        )
    return torch.stack(rows).detach()
