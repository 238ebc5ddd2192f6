"""Checkpoints (state dicts or flat parameter vectors) and evaluating a model at one of them.

Methods that look at several parameter vectors of one architecture (TracInCP over a training
trajectory, TRAK over an ensemble) take ``checkpoints``: ``model.state_dict()`` copies or flat [P]
vectors in ``model.parameters()`` order. :func:`parameters_at` loads one into the model for the
duration of a ``with`` block and always restores the model's own parameters afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from infkit.errors import InvalidInputError, NonFiniteError
from infkit.parameters import ParameterSpace

Checkpoint = Mapping[str, Tensor] | Tensor


def checkpoint_vector(space: ParameterSpace, checkpoint: Checkpoint, k: int = 0) -> Tensor:
    """A checkpoint (a state dict or a flat [P] vector) as a flat parameter vector [P]."""
    if isinstance(checkpoint, Tensor):
        if checkpoint.shape != (space.size,):
            raise InvalidInputError(
                f"checkpoint {k} is a tensor of shape {tuple(checkpoint.shape)}; a flat "
                f"checkpoint must have shape [P] = [{space.size}]"
            )
        return _finite(checkpoint.detach().to(space.dtype), k, space)
    if isinstance(checkpoint, Mapping):
        model = space.model
        known = {*model.state_dict(), *dict(model.named_parameters()), *dict(model.named_buffers())}
        extra = [str(n) for n in checkpoint if n not in known]
        if extra:
            raise InvalidInputError(
                f"checkpoint {k} has entries the model has no tensor for: {extra[:5]}; is it "
                "another architecture's state dict? Pass model.state_dict() copies of this model"
            )
        missing = [n for n in space.names if n not in checkpoint]
        if missing:
            raise InvalidInputError(
                f"checkpoint {k} has no entry for the parameter(s) {missing[:5]}; pass "
                "model.state_dict() copies (or flat [P] vectors)"
            )
        parts = []
        for n, shape in zip(space.names, space.shapes):
            t = torch.as_tensor(checkpoint[n])
            if t.shape != shape:
                raise InvalidInputError(
                    f"checkpoint {k}: parameter {n!r} has shape {tuple(t.shape)}, the model's "
                    f"has {tuple(shape)}"
                )
            parts.append(t.detach().reshape(-1).to(space.dtype))
        for n, t in _carried(space).items():  # running statistics, frozen parameters
            value = torch.as_tensor(checkpoint[n]) if n in checkpoint else None
            if value is not None and tuple(value.shape) != tuple(t.shape):
                raise InvalidInputError(
                    f"checkpoint {k}: {n!r} has shape {tuple(value.shape)}, the model's has "
                    f"{tuple(t.shape)}"
                )
            if value is not None and value.is_floating_point() and not value.isfinite().all():
                kind = "buffer" if n in dict(model.named_buffers()) else "frozen parameter"
                raise NonFiniteError(
                    f"checkpoint {k} holds NaN or Inf ({kind} {n!r}): the model had diverged, "
                    "or the checkpoint was saved from a failed run; leave it out of checkpoints"
                )
        return _finite(torch.cat(parts), k, space)
    raise InvalidInputError(
        f"checkpoint {k} must be a state dict or a flat [P] tensor, got {type(checkpoint).__name__}"
    )


def _finite(vector: Tensor, k: int, space: ParameterSpace) -> Tensor:
    """``vector``, or a NonFiniteError naming checkpoint ``k`` and its first parameter holding
    NaN or Inf: every score computed at it would be NaN, and the error would name a query or a
    training example instead."""
    if bool(torch.isfinite(vector).all()):
        return vector
    first = int((~torch.isfinite(vector)).nonzero()[0, 0])
    named = next(n for n, end in zip(space.names, space.offsets[1:]) if first < end)
    raise NonFiniteError(
        f"checkpoint {k} holds NaN or Inf (parameter {named!r}): the model had diverged, or "
        "the checkpoint was saved from a failed run; leave it out of checkpoints (and, for "
        "TracInCP, its rate out of learning_rates)"
    )


def is_the_models(space: ParameterSpace, checkpoint: Checkpoint, vector: Tensor) -> bool:
    """Whether ``checkpoint`` (as the flat ``vector``) is the model as it is: its parameters,
    and the buffers and frozen parameters a state dict carries (running statistics or a
    frozen layer that differ make it another model whatever its attributed parameters)."""
    if not torch.equal(vector, space.flat().to(vector)):
        return False
    if not isinstance(checkpoint, Mapping):
        return True
    return all(
        torch.equal(torch.as_tensor(checkpoint[n]).to(t), t.detach())
        for n, t in _carried(space).items()
        if n in checkpoint
    )


@contextlib.contextmanager
def parameters_at(space: ParameterSpace, checkpoint: Checkpoint, k: int = 0) -> Iterator[Tensor]:
    """Temporarily load a checkpoint's parameters (and the buffers and frozen parameters it
    carries) into the model.

    Yields the checkpoint as a float64 [P] vector.
    """
    vector = checkpoint_vector(space, checkpoint, k)
    saved = space.flat().clone()
    carried = _carried(space)
    saved_carried = {}
    if isinstance(checkpoint, Mapping):
        saved_carried = {n: t.detach().clone() for n, t in carried.items() if n in checkpoint}
    try:
        space.assign_(vector.to(space.device))
        with torch.no_grad():
            for n in saved_carried:
                assert isinstance(checkpoint, Mapping)
                carried[n].copy_(torch.as_tensor(checkpoint[n]))
        yield vector.to(torch.float64)
    finally:
        space.assign_(saved)
        with torch.no_grad():
            for n, t in saved_carried.items():
                carried[n].copy_(t)


def _carried(space: ParameterSpace) -> dict[str, Tensor]:
    """The model's tensors outside the attributed parameters that a state dict checkpoint
    carries and the model at it computes with: buffers (a BatchNorm's running statistics) and
    frozen parameters (a tester's checkpoints of independently initialised models, each with its
    own frozen random first layer, were scored with the task model's: 0.75 off TRAK's formula)."""
    attributed = set(space.names)
    carried: dict[str, Tensor] = {
        n: p for n, p in space.model.named_parameters() if n not in attributed
    }
    carried.update(space.model.named_buffers())
    return carried
