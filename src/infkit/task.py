"""What the model computes and what is measured.

A :class:`Task` bundles a model with

* ``loss(outputs, targets) -> [B]``: the per-example training loss l_i; the model was trained on
  ``mean_i l_i + (l2/2) * ||theta||^2`` (the ``l2`` lives on :class:`infkit.Influence`);
* ``measurement(outputs, targets) -> [B]``: the test quantity m whose change is predicted
  (default: the loss);
* optionally ``output_hessian(outputs, targets) -> [B, C, C]``: Lambda_i, the Hessian of the loss
  with respect to the flattened outputs (computed by autodiff when not given).

Outputs are whatever the model returns (a tensor, a tuple whose first item is the output, or an
object with ``.logits`` as Hugging Face models return); C is the number of output entries per
example.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infkit import language_modeling as lm
from infkit.autodiff import quiet_forward_mode
from infkit.data import map_tensors
from infkit.errors import InvalidInputError, Notice, UnsupportedError, warn
from infkit.parameters import coarsest_dtype, dtype_name

AUTOCAST_DTYPES = (None, torch.bfloat16, torch.float16)
"""Precisions of ``Task(autocast=...)``: off, bfloat16, float16."""

PerExampleFn = Callable[[Tensor, Any], Tensor]


def default_output_fn(raw: Any) -> Tensor:
    """The output tensor of a model call: itself, ``.logits``, or the first item of a tuple."""
    if isinstance(raw, Tensor):
        return raw
    logits = getattr(raw, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], Tensor):
        return raw[0]
    raise InvalidInputError(
        f"cannot find the output tensor in a model output of type {type(raw).__name__}; "
        "pass Task(..., output_fn=lambda out: out.<field>)"
    )


def pick_outputs(output_fn: Callable[[Any], Tensor], raw: Any) -> Tensor:
    """``output_fn(raw)``, the default's choice with what it cannot read named
    (:func:`_default_outputs`)."""
    return _default_outputs(raw) if output_fn is default_output_fn else output_fn(raw)


def _default_outputs(raw: Any) -> Tensor:
    """:func:`default_output_fn`'s choice (its code, saved in every artifact's identity, kept
    as it was), with what it cannot read named: a dict's ``"logits"`` is taken, a dict without
    them and a tuple whose first item is a scalar (an auxiliary loss: a tester's
    ``(aux, logits)`` model met an IndexError) are refused, naming their items."""
    if isinstance(raw, Mapping) and not isinstance(getattr(raw, "logits", None), Tensor):
        if isinstance(raw.get("logits"), Tensor):
            return raw["logits"]
        keys = ", ".join(repr(k) for k in list(raw)[:6])
        raise InvalidInputError(
            f"cannot find the output tensor in the model's output, a dict with keys {keys}: "
            "pass output_fn= picking it, e.g. Task.classification(model, output_fn=lambda out: "
            "out['<key>']) (or Task(..., output_fn=...))"
        )
    if isinstance(raw, (tuple, list)) and raw and isinstance(raw[0], Tensor) and not raw[0].dim():
        raise InvalidInputError(
            f"the model returns a {type(raw).__name__} whose first item, the output infkit "
            f"takes by default, is a scalar (items: {_items(raw)}): pass output_fn= picking the "
            "outputs, e.g. Task.classification(model, output_fn=lambda out: out[1])"
        )
    return default_output_fn(raw)


def _items(raw: tuple[Any, ...] | list[Any]) -> str:
    """The first items of a model's tuple output, for a message: ``[0] (), [1] (20, 3)``."""
    return ", ".join(
        f"[{k}] {tuple(item.shape)}"
        if isinstance(item, Tensor)
        else f"[{k}] a {type(item).__name__}"
        for k, item in enumerate(raw[:4])
    )


def at_least_float32(outputs: Tensor) -> Tensor:
    """``outputs`` in float32 when they come in a lower floating precision (a bfloat16 or
    float16 model's logits), else as they are: the loss, its output Hessian and the label
    sampler then work in float32, as under autocast. In bfloat16 a softmax near 1 is
    resolved to 2^-8, so a confident model's ``p - onehot`` (about 1e-3) would be rounding."""
    if outputs.is_floating_point() and torch.finfo(outputs.dtype).bits < 32:
        return outputs.float()
    return outputs


#: PyTorch's ignore_index: a label that cross-entropy skips
IGNORE_INDEX = -100

#: a problem with one example's target: (position in the batch, what is wrong and what to do)
TargetProblem = tuple[int, str]


def class_indices(outputs: Tensor, targets: Tensor) -> Tensor:
    """Class labels as a long tensor shaped like ``outputs`` without its class dimension.

    Labels given as [N, 1] are accepted (a trailing singleton dimension is dropped).
    """
    shape = outputs.shape[:-1]
    if targets.shape != shape and targets.numel() == shape.numel():
        targets = targets.reshape(shape)
    return targets.long()


def _cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy in float64, returned in the outputs' dtype: its gradient ``p - onehot``
    keeps the true class's ``p_y - 1`` of a confident example, which float32 rounds to 0 once
    ``1 - p_y`` is below 6e-8 (a tester's confident queries of a float32 softmax regression,
    21 of 30, scored 57-89% off an exact solve: the gradient's largest entry gone)."""
    loss = F.cross_entropy(outputs.double(), class_indices(outputs, targets), reduction="none")
    return loss.to(outputs.dtype)


def _first(mask: Tensor) -> int:
    return int(mask.reshape(mask.shape[0], -1).any(dim=1).nonzero()[0, 0])


def check_class_labels(targets: Any, output_shape: tuple[int, ...]) -> TargetProblem | None:
    """Why a batch of classification labels is unusable (the first bad example), or None."""
    c = output_shape[-1] if output_shape else 1
    per_position = (
        isinstance(targets, Tensor)
        and targets.dim() > 1
        and tuple(targets.shape[1:]) == tuple(output_shape[:-1])
    )
    if len(output_shape) > 1 and not per_position:
        return 0, (
            f"the model's outputs have per-example shape {tuple(output_shape)}; "
            "Task.classification takes one logit per class, [B, C]: give the model a last "
            "layer (or an output_fn) that returns [B, C], e.g. outputs.flatten(1) or "
            "outputs[:, 0]"
        )
    if c == 1:
        return 0, (
            "the model has one output per example: a softmax over one class is 1 whatever the "
            "logit, so the loss and every score would be 0. For one logit of two classes use "
            "Task.binary_classification, for a real-valued output Task.regression"
        )
    if not isinstance(targets, Tensor):
        texts = isinstance(targets, (list, tuple)) and any(isinstance(t, str) for t in targets)
        return 0, (
            f"labels must be a tensor of class indices, got {type(targets).__name__}"
            + (
                " of strings; encode the classes as integers 0..C-1 (classes, y = "
                "np.unique(labels, return_inverse=True)); in infkit run, [data] class_names "
                "shows them by name"
                if texts
                else "; pass (X, y) with y = torch.tensor(labels)"
            )
        )
    y = targets
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() == 2 and y.shape[1] == c and c > 1:
        return 0, (
            f"labels have shape [N, {c}]: one-hot or soft labels; Task.classification takes one "
            "class index per example: pass y.argmax(1)"
        )
    if y.dim() != 1 and tuple(y.shape[1:]) == tuple(output_shape[:-1]):
        return 0, (
            f"labels have one class index per position (per-example shape {tuple(y.shape[1:])}, "
            "as the outputs have): a label per token, which Task.classification does not "
            "score (it takes one per example). A causal language model's next-token loss "
            "(labels shifted inside it) is Task.language_modeling (infkit run: kind = "
            '"language_modeling"); a label per token without the shift (token classification) '
            "is a task of your own: infkit.Task(model, loss) with loss(logits, labels) = "
            "F.cross_entropy(logits.transpose(1, 2), labels, reduction='none').sum(1) (-100 not "
            "scored; README, the tasks)"
        )
    if y.dim() != 1:
        return 0, (
            f"labels must hold one class index per example (shape [N]), got per-example shape "
            f"{tuple(y.shape[1:])}"
        )
    if y.is_floating_point():
        fractional = y != y.round()
        if bool(fractional.any()):
            k = _first(fractional)
            return k, (
                f"label {y[k].item()!r} is not a class index; Task.classification needs integer "
                f"labels in [0, {c})"
            )
    elif y.dtype == torch.bool or y.is_complex():
        return 0, f"labels must be integer class indices, got dtype {y.dtype}"
    yi = y.long()
    ignored = yi == IGNORE_INDEX
    if bool(ignored.any()):
        return _first(ignored), (
            f"label {IGNORE_INDEX} is PyTorch's ignore_index; Task.classification scores every "
            "example on its own label: drop such examples, or give them a label"
        )
    outside = (yi < 0) | (yi >= c)
    if bool(outside.any()):
        k = _first(outside)
        return k, f"label {int(yi[k])} is outside the model's {c} classes [0, {c})"
    return None


#: wrappers for data-parallel training, whose ``module`` is the model they run
_PARALLEL_WRAPPERS = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrapped(model: Any) -> Any:
    """``model``, or the module inside its data-parallel wrappers (``nn.DataParallel``,
    ``DistributedDataParallel``), which a task runs on (:func:`_checked_model`); a compiled
    wrapper (``torch.compile(DDP(model))``, PyTorch's documented order) likewise."""
    while True:
        inner = getattr(model, "_orig_mod", None)  # (torch.compile's OptimizedModule)
        if isinstance(inner, _PARALLEL_WRAPPERS):
            model = inner
        if not isinstance(model, _PARALLEL_WRAPPERS):
            return model
        model = model.module


def _checked_model(model: Any) -> nn.Module:
    """The model a task runs on: ``model``, or the module inside a data-parallel wrapper
    (``nn.DataParallel``, ``DistributedDataParallel``: the same function, whose forward refuses
    ``functional_call`` or writes its own flags on every call; infkit's runs across processes
    need no wrapper). Refused: anything but an ``nn.Module``, and a model scripted whole by
    TorchScript (torch.func and hooks do not reach inside it)."""
    model = unwrapped(model)
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise UnsupportedError(
            f"the model is a TorchScript module ({type(model).__name__}, from torch.jit.script "
            "or torch.jit.trace): infkit calls the model with its parameters swapped in "
            "(torch.func.functional_call), trains it for ground truth and reads its layers by "
            "hooks, none of which TorchScript allows; give the task the nn.Module it was "
            "scripted from (a TorchScript part inside a Python model works)"
        )
    return model


def _encoder_checks(model: nn.Module) -> dict[str, Any]:
    """The checks of a classifier's or regressor's task that read a Hugging Face encoder's
    inputs: dict inputs holding ``input_ids`` checked against its embeddings
    (:func:`lm.check_encoder_inputs`), and a left-padded sequence's outputs, which must not move
    when its padding is removed (:func:`lm.check_padding`)."""
    return {
        "check_inputs": partial(lm.check_encoder_inputs, positions=lm.learned_positions(model)),
        "check_model": partial(lm.check_padding, precision=coarsest_dtype(model)),
        "probe_example": lm.first_left_padded,
    }


def check_class_outputs(outputs: Tensor) -> str | None:
    """Why classification outputs [B, ...] cannot be logits (rows that are probabilities), or
    None."""
    rows = outputs.detach().reshape(outputs.shape[0], -1).to(torch.float64)
    if rows.shape[1] < 2:
        return None
    sums_to_one = (rows.sum(1) - 1).abs().max() <= 1e-5
    if bool((rows >= 0).all()) and bool(sums_to_one):
        return (
            "the model's outputs are probabilities (non-negative, each row sums to 1): it ends "
            "in a Softmax. Task.classification applies the softmax itself and needs the logits: "
            "remove the final Softmax (a LogSoftmax is fine)"
        )
    return None


def _check_measurement(measurement: Any) -> None:
    """Refuse a measurement that is not a function (``Task`` and :meth:`Task.with_measurement`
    take the ready-made ones' names nowhere)."""
    if not callable(measurement):
        raise InvalidInputError(
            f"measurement must be a callable fn(outputs, targets) -> [B], got {measurement!r}; "
            "the names 'loss' and 'margin' are the ready-made tasks' "
            "(Task.classification(model, measurement='margin'))"
        )


def _refuse_final_sigmoid(model: nn.Module) -> None:
    """Refuse a binary classifier whose last layer, as an ``nn.Sequential`` (nested) runs
    them, is a Sigmoid: the task applies it itself, and a tester's Sigmoid model was scored
    as if its probabilities were logits, 0.84 off, with no word (a probability inside (0, 1)
    is a valid logit; the values cannot tell)."""
    last: nn.Module = model
    # (a Sequential whose forward is its own runs its layers otherwise: a reviewer's returned
    # the logit and kept the Sigmoid for predict_proba)
    while (
        isinstance(last, nn.Sequential)
        and type(last).forward is nn.Sequential.forward
        and len(last)
    ):
        last = last[-1]
    if isinstance(last, nn.Sigmoid):
        raise InvalidInputError(
            "the model ends in Sigmoid: Task.binary_classification applies it itself and needs "
            "the logit; remove the final Sigmoid (train with BCEWithLogitsLoss on the logit)"
        )


def check_binary_labels(targets: Any, output_shape: tuple[int, ...]) -> TargetProblem | None:
    """Why a batch of binary labels (0 or 1, one per example) is unusable, or None."""
    if not isinstance(targets, Tensor):
        return 0, f"labels must be a tensor of 0s and 1s, got {type(targets).__name__}"
    if targets.numel() != targets.shape[0]:
        return 0, (
            f"binary labels must be one 0/1 value per example, got per-example shape "
            f"{tuple(targets.shape[1:])}; for several 0/1 labels an example (multi-label), "
            "give a Task of your own whose loss sums them, e.g. "
            "F.binary_cross_entropy_with_logits(outputs, targets.float(), "
            "reduction='none').sum(1) (README.md, \"Any other loss\")"
        )
    bad = (targets != 0) & (targets != 1)
    if bool(bad.any()):
        k = _first(bad)
        return k, f"label {targets.reshape(-1)[k].item()!r} is not 0 or 1"
    return None


def check_regression_targets(targets: Any, output_shape: tuple[int, ...]) -> TargetProblem | None:
    """Why a batch of regression targets does not match the outputs, or None."""
    if not isinstance(targets, Tensor):
        return 0, f"targets must be a tensor, got {type(targets).__name__}"
    per_example = int(torch.Size(output_shape).numel())
    got = targets[0].numel() if targets.dim() else 1
    if got != per_example:
        return 0, (
            f"targets have {got} values per example but the model has {per_example} outputs; "
            "pass targets shaped like the outputs"
        )
    if not (targets.is_floating_point() or targets.dtype in (torch.int32, torch.int64)):
        return 0, f"regression targets must be numbers, got dtype {targets.dtype}"
    return None


def _softmax_hessian(outputs: Tensor, targets: Tensor) -> Tensor:
    """Lambda_i = diag(p_i) - p_i p_i^T for softmax cross-entropy."""
    p = torch.softmax(outputs, dim=-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def classification_margin(outputs: Tensor, targets: Tensor) -> Tensor:
    """logit_y - logsumexp_{c != y} logit_c = log(p_y / (1 - p_y)) (higher is better)."""
    y = class_indices(outputs, targets)
    correct = outputs.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    others = outputs.scatter(-1, y.unsqueeze(-1), float("-inf"))
    return correct - torch.logsumexp(others, dim=-1)


def _binary_logits(outputs: Tensor) -> Tensor:
    if outputs.dim() == 2 and outputs.shape[1] == 1:
        return outputs[:, 0]
    if outputs.dim() == 1:
        return outputs
    raise InvalidInputError(
        f"binary classification expects one logit per example (shape [B] or [B, 1]); got "
        f"{tuple(outputs.shape)}; for several classes use Task.classification"
    )


def _binary_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy in float64 (as :func:`_cross_entropy`: ``sigmoid(z) - y`` of a
    confident float32 example rounds to 0), returned in the outputs' dtype."""
    z = _binary_logits(outputs)
    loss = F.binary_cross_entropy_with_logits(
        z.double(), targets.to(torch.float64).reshape(z.shape), reduction="none"
    )
    return loss.to(z.dtype)


def _binary_margin(outputs: Tensor, targets: Tensor) -> Tensor:
    z = _binary_logits(outputs)
    return (2 * targets.to(z.dtype).reshape(z.shape) - 1) * z


#: the ready-made tasks' margins (``measurement="margin"``), as a report names them
MARGINS = (classification_margin, _binary_margin)


def _binary_hessian(outputs: Tensor, targets: Tensor) -> Tensor:
    p = torch.sigmoid(outputs.reshape(outputs.shape[0], -1))
    return torch.diag_embed(p * (1 - p))


def _squared_error(outputs: Tensor, targets: Tensor) -> Tensor:
    y = targets.to(outputs.dtype).reshape(outputs.shape)
    return 0.5 * (outputs - y).reshape(outputs.shape[0], -1).pow(2).sum(dim=1)


def _identity_hessian(outputs: Tensor, targets: Tensor) -> Tensor:
    b = outputs.shape[0]
    c = outputs[0].numel()
    return torch.eye(c, dtype=outputs.dtype, device=outputs.device).expand(b, c, c)


def _softmax_factor(outputs: Tensor, targets: Tensor) -> Tensor:
    """L_i = diag(sqrt p) - p sqrt(p)^T, so that L_i L_i^T = diag(p) - p p^T (as sum p = 1)."""
    p = torch.softmax(outputs.to(torch.float64), dim=-1)
    r = p.sqrt()
    return torch.diag_embed(r) - p.unsqueeze(2) * r.unsqueeze(1)


def _binary_factor(outputs: Tensor, targets: Tensor) -> Tensor:
    p = torch.sigmoid(outputs.to(torch.float64).reshape(outputs.shape[0], -1))
    return torch.diag_embed((p * (1 - p)).sqrt())


def _identity_factor(outputs: Tensor, targets: Tensor) -> Tensor:
    b, c = outputs.shape[0], outputs[0].numel()
    return torch.eye(c, dtype=torch.float64, device=outputs.device).expand(b, c, c)


class Task:
    """A model, its per-example training loss, and the measured test quantity.

    Args:
        model: the trained model; its trainable parameters (``requires_grad=True``) are theta.
        loss: ``fn(outputs [B, ...], targets) -> [B]``, the per-example training loss l_i. For
            a float32 model take it on ``outputs.double()`` and return it in the outputs'
            dtype, as the built-in tasks do: in float32 a confident example's probability
            rounds to 1 and cross-entropy's gradient ``p - onehot`` loses its true class's
            entry. Each set's check compares the loss's gradient in the outputs with its
            gradient on the outputs in float64, on examples spread over the set, and warns
            where it is more than 1% off (outputs up to 256 numbers an example).
        measurement: ``fn(outputs, targets) -> [B]``, the quantity m whose change scores predict
            (default: ``loss``).
        output_hessian: ``fn(outputs, targets) -> [B, C, C]``, Lambda_i = d^2 l_i / d f^2 over
            the flattened outputs; computed by autodiff when omitted. Checked at fit against
            the loss's by autodiff on 64 training examples spread over the set (where autodiff
            takes the loss and C <= 256): more than 1% off is refused, naming the example.
        output_hessian_factor: ``fn(outputs, targets) -> [B, C, K]``, a factor L_i with
            ``L_i L_i^T = Lambda_i`` (Kronecker factors pull its K columns back through the
            network); from an eigendecomposition of Lambda_i when omitted. Checked the same
            way, ``L_i L_i^T`` against Lambda_i.
        output_fn: extracts the output tensor from what ``model(...)`` returns.
        higher_is_better: whether a larger measurement is a better prediction (a margin, a
            probability of the true class); it only decides which examples ``top_k`` calls
            proponents. None (not said): False, the loss's orientation, with a notice when a
            ``measurement`` is given.
        check_targets: ``fn(targets, output_shape) -> (position, message) | None``: why a batch
            of targets is unusable (the ready-made tasks check their labels; None: no check).
        check_scored: ``fn(targets) -> (position, message) | None``: why the loss of a batch of
            (usable) targets has nothing to score, so that its loss and every score read
            through it would be 0 (a language model: a one-token sequence, every label -100);
            checked on the sets read through the loss; queries read only through a custom
            measurement pass where the measurement's gradient in the outputs is not 0 on
            the examples it names (None: no check).
        check_outputs: ``fn(outputs) -> message | None``: why the model's outputs [B, ...] do
            not fit the loss (classification, language modelling: probabilities instead of
            logits).
        check_inputs: ``fn(inputs, model) -> (position, message) | None``: why a batch of
            inputs cannot be fed to the model (a language model: token ids outside its
            vocabulary); every pass over the data checks its batches with it (None: no check).
            The position is the batch's example the message is about, or
            :data:`infkit.data.WHOLE_BATCH` (-1, not Python's last) for the batch's tensors as a
            whole (a mask of another shape than the token ids).
        check_pairs: ``fn(inputs, targets) -> (position, message) | None``: why a batch's
            targets disagree with its inputs (a language model: a label scored at padding);
            checked once per set, with the targets; a message that is an
            :class:`~infkit.errors.Suspicion` is warned of, once a set, not raised (a language
            model: its pad token without an attention mask) (None: no check).
        check_model: ``fn(call, inputs, outputs) -> message | None``: why the model does not
            behave as the task assumes, from one example of a set (its model inputs and
            outputs, and ``call(inputs)`` to run the model as they were computed); a warning (a
            language model: later tokens change earlier logits, so it is not causal; the
            padding changes the logits of a left-padded sequence's tokens).
        probe_example: ``fn(inputs) -> position | None``: the example of a batch of inputs
            that ``check_model`` should look at, the first one found in the set (a language
            model: the first left-padded sequence); None, or none found: the set's first.
        output_hessian_product: ``fn(outputs, targets, V [K, *outputs.shape]) -> Lambda V``,
            for outputs too large for a dense Lambda_i (language models); when given, curvature
            products use it instead of :meth:`lambda_blocks`.
        autocast: run the model's forward and backward passes in this lower precision
            (``torch.bfloat16`` or ``torch.float16``, ``torch.autocast``) with the outputs and
            every statistic in float32 (mixed precision); None: the model's own dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        loss: PerExampleFn,
        measurement: PerExampleFn | None = None,
        *,
        output_hessian: PerExampleFn | None = None,
        output_hessian_factor: PerExampleFn | None = None,
        output_fn: Callable[[Any], Tensor] = default_output_fn,
        higher_is_better: bool | None = None,
        name: str = "custom",
        check_targets: Callable[[Any, tuple[int, ...]], TargetProblem | None] | None = None,
        check_scored: Callable[[Any], TargetProblem | None] | None = None,
        check_outputs: Callable[[Tensor], str | None] | None = None,
        output_hessian_product: Callable[[Tensor, Any, Tensor], Tensor] | None = None,
        autocast: torch.dtype | None = None,
        check_inputs: Callable[[Any, nn.Module], TargetProblem | None] | None = None,
        check_pairs: Callable[[Any, Any], TargetProblem | None] | None = None,
        check_model: Callable[[Callable[[Any], Tensor], Any, Tensor], str | None] | None = None,
        probe_example: Callable[[Any], int | None] | None = None,
    ) -> None:
        model = _checked_model(model)
        if not callable(loss):
            raise InvalidInputError("loss must be a callable fn(outputs, targets) -> [B]")
        if measurement is not None:  # (a tester's "margin" failed at scores())
            _check_measurement(measurement)
            # (told as Task.classification tells it: a probability measured without it had
            # top_k's proponents and opponents swapped, silently; a tester's)
            higher_is_better = _callable_orientation(higher_is_better)
        self.model = model
        self.loss = loss
        self.measurement = measurement if measurement is not None else loss
        self.output_hessian = output_hessian
        self.output_hessian_factor = output_hessian_factor
        self.output_fn = output_fn
        self.higher_is_better = bool(higher_is_better)
        self.measures_loss = measurement is None
        self.name = name
        self.check_targets = check_targets
        self.check_scored = check_scored
        self.check_outputs = check_outputs
        self.check_inputs = check_inputs
        self.check_pairs = check_pairs
        self.check_model = check_model
        self.probe_example = probe_example
        self.output_hessian_product = output_hessian_product
        if autocast not in AUTOCAST_DTYPES:
            raise InvalidInputError(
                f"autocast must be torch.bfloat16, torch.float16 or None, got {autocast!r}"
            )
        _check_autocast_lowers(model, autocast, "autocast")
        self.autocast = autocast
        self._mixed = False
        # (the default took a tuple's first of several: said once, for the copies too, which
        # share the cell: with_autocast's, made by every fit with dtype=; a reviewer's)
        self._told_first = [False]

    # ----------------------------------------------------------------- constructors
    @classmethod
    def classification(
        cls,
        model: nn.Module,
        measurement: str | PerExampleFn = "loss",
        higher_is_better: bool | None = None,
        *,
        output_fn: Callable[[Any], Tensor] = default_output_fn,
    ) -> Task:
        """Softmax cross-entropy on logits [B, C]; measurement ``"loss"``, ``"margin"`` or a
        callable ``fn(outputs, targets) -> [B]``, with ``higher_is_better`` its orientation
        (which examples ``top_k`` calls proponents; :func:`_pick_measurement`). ``output_fn``
        picks the logits out of what the model returns (default: itself, its ``.logits``, or
        the first item of a tuple)."""
        model = _checked_model(model)
        meas, higher = _pick_measurement(measurement, classification_margin, higher_is_better)
        return cls(
            model,
            _cross_entropy,
            meas,
            output_fn=output_fn,
            output_hessian=_softmax_hessian,
            output_hessian_factor=_softmax_factor,
            higher_is_better=higher,
            name="classification",
            check_targets=check_class_labels,
            check_outputs=check_class_outputs,
            **_encoder_checks(model),
        )

    @classmethod
    def binary_classification(
        cls,
        model: nn.Module,
        measurement: str | PerExampleFn = "loss",
        higher_is_better: bool | None = None,
        *,
        output_fn: Callable[[Any], Tensor] = default_output_fn,
    ) -> Task:
        """Sigmoid cross-entropy on one logit per example, targets in {0, 1}; measurement and
        ``output_fn`` as :meth:`classification` takes them. A model ending in ``nn.Sigmoid``
        (probabilities, not the logit) is refused."""
        model = _checked_model(model)
        _refuse_final_sigmoid(model)
        meas, higher = _pick_measurement(measurement, _binary_margin, higher_is_better)
        return cls(
            model,
            _binary_cross_entropy,
            meas,
            output_fn=output_fn,
            output_hessian=_binary_hessian,
            output_hessian_factor=_binary_factor,
            higher_is_better=higher,
            name="binary_classification",
            check_targets=check_binary_labels,
            **_encoder_checks(model),
        )

    @classmethod
    def language_modeling(
        cls, model: nn.Module, *, output_fn: Callable[[Any], Tensor] = default_output_fn
    ) -> Task:
        """Causal language modelling: logits [B, T, V], labels [B, T] aligned with the inputs.

        The per-example loss (and measurement) is the summed next-token cross-entropy of the
        sequence, labels shifted inside the loss and -100 not scored (Hugging Face's
        convention; :mod:`infkit.language_modeling`). Inputs are token ids [N, T] or dicts with
        ``input_ids`` and ``attention_mask``; ``infkit.language_modeling.examples(input_ids,
        attention_mask, prompt_lengths)`` builds the labels, masking padding and prompts (the
        loss of a completion given its prompt). ``output_fn`` picks the logits out of what the
        model returns (default: itself, its ``.logits``, or the first item of a tuple).
        """
        model = _checked_model(model)
        return cls(
            model,
            lm.next_token_loss,
            output_hessian_product=lm.hessian_product,
            output_fn=output_fn,
            name="language_modeling",
            check_targets=lm.check_labels,
            check_scored=lm.check_scored_labels,
            check_outputs=partial(lm.check_logits, vocabulary=lm.vocabulary_size(model)),
            check_inputs=partial(lm.check_inputs, positions=lm.learned_positions(model)),
            check_pairs=partial(lm.check_label_pairs, special=lm.special_tokens(model)),
            check_model=partial(lm.check_model, vocabulary=lm.vocabulary_size(model), model=model),
            probe_example=lm.first_left_padded,
        )

    @classmethod
    def regression(
        cls, model: nn.Module, *, output_fn: Callable[[Any], Tensor] = default_output_fn
    ) -> Task:
        """Per-example loss 0.5 * ||f(x) - y||^2 (Lambda_i = I); ``output_fn`` as
        :meth:`classification` takes it."""
        model = _checked_model(model)
        return cls(
            model,
            _squared_error,
            output_fn=output_fn,
            output_hessian=_identity_hessian,
            output_hessian_factor=_identity_factor,
            name="regression",
            check_targets=check_regression_targets,
            **_encoder_checks(model),
        )

    # ----------------------------------------------------------------- evaluation
    def input_problem(self, inputs: Any) -> TargetProblem | None:
        """Why a batch of inputs cannot be fed to the model (``check_inputs``), or None."""
        return None if self.check_inputs is None else self.check_inputs(inputs, self.model)

    def call_model(self, model_or_fn: Callable[..., Any], inputs: Any) -> Tensor:
        """Outputs [B, ...] for a batch of inputs (a tensor, or a dict of keyword tensors), at
        least in float32 (:func:`at_least_float32`)."""
        if self.autocast is None or not self._mixed:
            raw = model_or_fn(**inputs) if isinstance(inputs, dict) else model_or_fn(inputs)
            return at_least_float32(self._outputs(raw))
        device = next(iter(self.model.parameters()), torch.empty(0)).device.type
        with torch.autocast(device, dtype=self.autocast):
            raw = model_or_fn(**inputs) if isinstance(inputs, dict) else model_or_fn(inputs)
            out = self._outputs(raw)
        return out.float()

    def _outputs(self, raw: Any) -> Tensor:
        """``output_fn(raw)``; a model body's hidden states (a Hugging Face ``...Model``
        without its head) refused by the default with the head to use."""
        try:
            out = pick_outputs(self.output_fn, raw)
        except (KeyError, IndexError, AttributeError, TypeError) as error:
            if self.output_fn is default_output_fn:
                raise
            # (a tester's: the model's call was blamed, and the data's)
            raise InvalidInputError(
                f"the task's output_fn failed on the model's output, a {type(raw).__name__}: "
                f"{type(error).__name__}: {str(error)[:200]}; it takes what the model returns "
                "and returns the output tensor [B, ...] the loss reads"
            ) from error
        except InvalidInputError as error:
            if self.output_fn is not default_output_fn or not hasattr(raw, "last_hidden_state"):
                raise
            head = (
                "its ...ForCausalLM (AutoModelForCausalLM), whose logits [B, T, V] the "
                "language-modelling loss reads"
                if self.name == "language_modeling"
                else "a head that maps them to the outputs the loss reads (e.g. its "
                "...ForSequenceClassification)"
            )
            raise InvalidInputError(
                f"the model returns {type(raw).__name__}: hidden states, with no .logits (a "
                f"Hugging Face ...Model is a model's body, without its head). Use {head}, or "
                "pass Task(..., output_fn=lambda out: ...) returning the outputs"
            ) from error
        if not isinstance(out, Tensor):
            raise InvalidInputError(
                f"the task's output_fn returned a {type(out).__name__}, not the output tensor "
                "[B, ...] the loss reads (for a model returning several, pick the one the loss "
                "takes: output_fn=lambda out: out[0])"
            )
        if (
            self.output_fn is default_output_fn
            and not self._told_first[0]
            and isinstance(raw, (tuple, list))
            and sum(isinstance(t, Tensor) and t.dim() > 0 for t in raw) > 1
        ):
            self._told_first[0] = True  # (a tester's (hidden, logits): a 3-class classifier)
            warn(
                f"the model returns a {type(raw).__name__} of {len(raw)} items ({_items(raw)}); "
                f"infkit takes the first, {tuple(out.shape)}, as the outputs the loss reads: "
                "where another holds them, pass output_fn= (e.g. Task.classification(model, "
                "output_fn=lambda out: out[1]))",
                Notice,
            )
        return out

    @contextlib.contextmanager
    def mixed_precision(self) -> Iterator[None]:
        """Within: model calls run under ``torch.autocast(self.autocast)`` (when set).

        The passes over the data that take gradients by backpropagation (the Kronecker methods'
        hooked passes, per-example gradients) enter it; curvature products by forward-mode
        differentiation run in the model's own dtype, where autocast's casts do not compose
        with ``torch.func``'s transforms.
        """
        was, self._mixed = self._mixed, True
        try:
            yield
        finally:
            self._mixed = was

    def with_model(self, model: nn.Module) -> Task:
        """A copy of this task on another model (a retrained copy): the same loss,
        measurement, outputs and checks."""
        model = _checked_model(model)
        twin = copy.copy(self)
        twin.model = model
        return twin

    @property
    def helpful_sign(self) -> float:
        """+1, or -1 for a measurement where higher is better: a removal effect times it is
        the example's help (removing a helpful example raises a loss and lowers a margin)."""
        return -1.0 if self.higher_is_better else 1.0

    def with_measurement(
        self, measurement: PerExampleFn, higher_is_better: bool | None = None
    ) -> Task:
        """A copy of this task measuring ``measurement`` (``fn(outputs, targets) -> [B]``)
        instead: the same model, loss, curvature and checks. ``higher_is_better`` as for
        :class:`Task` (None: lower is better, with a notice)."""
        _check_measurement(measurement)
        higher = _callable_orientation(higher_is_better)
        twin = copy.copy(self)
        twin.measurement = measurement
        twin.higher_is_better = higher
        twin.measures_loss = False
        return twin

    def with_autocast(self, dtype: torch.dtype | None) -> Task:
        """A copy of this task whose passes run under ``torch.autocast(dtype)`` (None: off)."""
        if dtype not in AUTOCAST_DTYPES:
            floating = [p.dtype for p in self.model.parameters() if p.is_floating_point()]
            raise_to = (
                f"; to compute a {dtype_name(floating[0])} model in {dtype_name(dtype)}, give a "
                f"{dtype_name(dtype)} copy of it (e.g. model.to(torch.{dtype_name(dtype)})) "
                "with dtype=None"
                if isinstance(dtype, torch.dtype)
                and dtype.is_floating_point
                and floating
                and dtype != floating[0]
                else ""
            )
            raise InvalidInputError(
                f"dtype must be torch.bfloat16, torch.float16 or None (the model's own), got "
                f"{dtype!r}: it runs the passes under torch.autocast, which lowers a float32 "
                f"model's precision and cannot raise it{raise_to}"
            )
        _check_autocast_lowers(self.model, dtype, "dtype")
        twin = copy.copy(self)
        twin.autocast = dtype
        return twin

    def checked_loss(self, outputs: Tensor, targets: Any) -> Tensor:
        return _checked(self.loss, "loss", outputs, targets)

    def checked_measurement(self, outputs: Tensor, targets: Any) -> Tensor:
        return _checked(self.measurement, "measurement", outputs, targets)

    def lambda_blocks(self, outputs: Tensor, targets: Any) -> Tensor:
        """Lambda_i for each example of the batch: [B, C, C] (C = flattened output size), the
        task's ``output_hessian`` (at least in the outputs' precision) or the loss's by
        autodiff (:meth:`loss_hessians`)."""
        b = outputs.shape[0]
        c = outputs[0].numel()
        if self.output_hessian is None:
            return self.loss_hessians(outputs, targets)
        lam = self.output_hessian(outputs, targets)
        if not isinstance(lam, Tensor) or lam.numel() != b * c * c or lam.shape[:1] != (b,):
            got = tuple(lam.shape) if isinstance(lam, Tensor) else type(lam).__name__
            raise InvalidInputError(
                f"the task's output_hessian returned {got} for a batch of {b} outputs of "
                f"{c} numbers each: it must return each example's Hessian of the loss in "
                f"its outputs, [{b}, {c}, {c}]"
            )
        # (a float32 torch.eye of a float64 model's Hessian: dual's kernel met a raw "expected
        # scalar type Double", where the other methods took it; a tester's)
        return lam.reshape(b, c, c).to(torch.promote_types(lam.dtype, outputs.dtype))

    def loss_hessians(self, outputs: Tensor, targets: Any) -> Tensor:
        """Each example's Hessian of the loss in its outputs by autodiff, [B, C, C], whatever
        ``output_hessian`` the task was given (what a given one is checked against)."""
        b = outputs.shape[0]
        c = outputs[0].numel()
        shape = outputs.shape[1:]

        def single(f: Tensor, y: Any) -> Tensor:
            return self.loss(f.reshape(1, *shape), _unsqueeze(y))[0]

        flat = outputs.reshape(b, -1)
        # forward over grad: torch.func.hessian's forward over jacrev gets layer_norm's
        # double backward wrong (:meth:`infkit.gradients.PerExample.hessian_sum`)
        try:
            with quiet_forward_mode():  # (PyTorch's deprecation warnings, 18 of them, leaked)
                lam = torch.func.vmap(torch.func.jacfwd(torch.func.grad(single)))(flat, targets)
        except NotImplementedError:
            # a loss PyTorch has no forward-mode derivative of (a tester's F.huber_loss:
            # "Trying to use forward AD with huber_loss_backward"): reverse over reverse
            lam = torch.func.vmap(torch.func.jacrev(torch.func.grad(single)))(flat, targets)
        return lam.reshape(b, c, c)

    def hessian_product(self, outputs: Tensor, targets: Any, vectors: Tensor) -> Tensor:
        """``Lambda_i v`` for vectors [K, *outputs.shape] (each example's own block)."""
        if self.output_hessian_product is not None:
            return self.output_hessian_product(outputs, targets, vectors)
        lam = self.lambda_blocks(outputs, targets)  # [B, C, C]
        flat = vectors.reshape(vectors.shape[0], outputs.shape[0], -1)
        return torch.einsum("bcd,kbd->kbc", lam.to(flat.dtype), flat).reshape(vectors.shape)

    def lambda_factor(self, outputs: Tensor, targets: Any) -> Tensor:
        """L_i [B, C, K] (float64) with ``L_i L_i^T = Lambda_i``, the output-space loss Hessian.

        The task's closed form when it has one (softmax, sigmoid, squared error); otherwise an
        eigendecomposition of :meth:`lambda_blocks`, dropping the directions with zero curvature
        in every example of the batch.
        """
        if self.output_hessian_factor is not None and outputs.dim() == 2:
            factor = self.output_hessian_factor(outputs, targets)
            b, c = outputs.shape
            if not isinstance(factor, Tensor) or factor.dim() != 3 or factor.shape[:2] != (b, c):
                got = tuple(factor.shape) if isinstance(factor, Tensor) else type(factor).__name__
                raise InvalidInputError(
                    f"the task's output_hessian_factor returned {got} for a batch of {b} outputs "
                    f"of {c} numbers each: it must return each example's factor L_i of the loss's "
                    f"Hessian in its outputs (L_i L_i^T = Lambda_i), [{b}, {c}, K] for any K"
                )
            return factor
        lam = self.lambda_blocks(outputs, targets).to(torch.float64)
        lam = 0.5 * (lam + lam.transpose(1, 2))
        ev, U = torch.linalg.eigh(lam)  # ascending
        L = U * ev.clamp_min(0).sqrt().unsqueeze(1)  # columns = vectors
        keep = (ev.max(dim=0).values > 0).nonzero().squeeze(1)
        if keep.numel() == 0:  # zero curvature everywhere: one zero vector
            keep = torch.tensor([ev.shape[1] - 1], device=ev.device)
        return L[:, :, keep]

    def __repr__(self) -> str:
        return f"Task({self.name}, model={type(self.model).__name__})"


def _check_autocast_lowers(model: nn.Module, dtype: torch.dtype | None, option: str) -> None:
    """Refuse autocast to ``dtype`` (given as ``option``) for a model whose every parameter is
    float64: autocast lowers float32 operations only, and nothing would run in ``dtype`` (a
    tester's Task(autocast=torch.bfloat16) on a float64 model said bfloat16 in describe() and
    ran in float64, its outputs cast to float32)."""
    floating = [p.dtype for p in model.parameters() if p.is_floating_point()]
    if dtype is None or not floating or any(d != torch.float64 for d in floating):
        return
    precision = dtype_name(dtype)
    raise InvalidInputError(
        f"{option}=torch.{precision} runs the passes under torch.autocast, which lowers float32 "
        f"operations only, and every parameter of this model is float64: nothing would run in "
        f"{precision}. Cast the model to float32 first (model.float()), or to {precision} "
        f"itself (model.to(torch.{precision})) to run it in that precision throughout, or leave "
        f"{option} out"
    )


def _unsqueeze(y: Any) -> Any:
    """One example's targets as a batch of one: every tensor of a dict, tuple or list of them
    (a tuple of labels and weights met a raw "target batch_size (0)" inside the loss)."""
    return map_tensors(y, lambda t: t.unsqueeze(0))


def _callable_orientation(higher_is_better: bool | None) -> bool:
    """A measurement callable's orientation: ``higher_is_better``, which it needs; not said
    (None), lower-is-better, loss-like, with a notice (a probability of the true class was
    taken so, silently, and ``top_k`` listed the examples that lowered it as proponents)."""
    if higher_is_better is None:
        warn(
            "the measurement callable is taken as lower-is-better (like a loss): top_k's "
            "proponents are the examples whose removal would raise it. Pass "
            "higher_is_better=True for a probability, a margin or a log-likelihood (or "
            "False to say it is loss-like and silence this)",
            Notice,
        )
        return False
    return bool(higher_is_better)


def _pick_measurement(
    measurement: str | PerExampleFn, margin: PerExampleFn, higher_is_better: bool | None = None
) -> tuple[PerExampleFn | None, bool]:
    """The measurement function (None: the loss) and its orientation: the loss is
    lower-is-better and the margin higher-is-better (``higher_is_better`` may only confirm
    them); a callable's is ``higher_is_better``, which it needs: without it a callable is taken
    as lower-is-better, loss-like, with a notice (a probability of the true class was, silently,
    and ``top_k`` listed the examples that lowered it as proponents)."""
    if callable(measurement):
        return measurement, _callable_orientation(higher_is_better)
    fixed = {"loss": (None, False), "margin": (margin, True)}.get(str(measurement))
    if fixed is not None:
        if higher_is_better is not None and bool(higher_is_better) != fixed[1]:
            raise InvalidInputError(
                f"measurement {measurement!r} is {'higher' if fixed[1] else 'lower'}-is-better; "
                f"higher_is_better={higher_is_better} contradicts it (leave it out)"
            )
        return fixed
    raise UnsupportedError(
        f"unknown measurement {measurement!r}; use 'loss', 'margin' or a callable "
        "fn(outputs, targets) -> [B]"
    )


def _checked(fn: PerExampleFn, what: str, outputs: Tensor, targets: Any) -> Tensor:
    values = fn(outputs, targets)
    if not isinstance(values, Tensor) or values.shape != (outputs.shape[0],):
        got = tuple(values.shape) if isinstance(values, Tensor) else type(values).__name__
        column = isinstance(targets, Tensor) and targets.dim() == 2 and targets.shape[1] == 1
        hint = (
            f" It was given the labels as they are in the data, shape {tuple(targets.shape)}: "
            "a column of labels that built-in tasks flatten and a function of yours receives as "
            "it is; flatten them in it (targets.reshape(-1)) or give y as [N]"
            if column
            else ""
        )
        raise InvalidInputError(
            f"the task's {what} must return one value per example, shape [{outputs.shape[0]}]; "
            f"got {got}. Use reduction='none' and sum any extra dimensions per example.{hint}"
        )
    return values
