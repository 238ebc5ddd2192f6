"""Checks of a set of examples against a task and its model, before any pass over them.

:func:`check_examples` is what ``fit``, ``scores`` and ``train_to_optimum`` run first on the data
they are given: the inputs the model refuses, the labels the task cannot read (their shape,
their values, none at all), a dataset that reads differently each time, keys a model ignores;
each problem an :class:`~infkit.errors.InvalidInputError` naming the example and what to do.
:func:`deterministic_outputs` refuses a model whose outputs are random in evaluation mode.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from infkit import language_modeling as lm
from infkit.data import Batch, ExampleSet, leaves, map_tensors
from infkit.data_forms import LABEL_KEYS
from infkit.errors import InfkitError, InvalidInputError, Notice, Suspicion, warn
from infkit.failures import CALL_ERRORS, clause, naming_failures
from infkit.gradients import PerExample, error_summary
from infkit.parameters import coarsest_dtype, dtype_name, evaluation_mode
from infkit.task import Task

#: the queries with no scored label whose measurement's output gradient one forward pass
#: takes at a time, in the check that the measurement has something to read on them
MEASUREMENT_PROBE_BATCH = 8


def _call_at_theta(engine: PerExample, inputs: Any) -> Tensor:
    """The model's outputs for prepared ``inputs`` at theta*, as :meth:`PerExample.outputs`
    computes them."""
    with evaluation_mode(engine.task.model):
        return engine.call(engine.params(), inputs)


def _forward_keywords(model: nn.Module) -> tuple[set[str], bool] | None:
    """The keyword parameters ``model.forward`` names, and whether it also takes ``**kwargs``
    (a Hugging Face model's, which absorbs any key); None where its signature cannot be read."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = {p.name for p in parameters if p.kind in kinds}
    return named, any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _misspelt(model: nn.Module, keys: list[str], cutoff: float) -> list[tuple[str, str]]:
    """The input ``keys`` that ``model.forward`` does not name, each with the parameter it names
    and the inputs lack that is closest to it (:func:`difflib.get_close_matches` at
    ``cutoff``); none where the signature cannot be read."""
    found = _forward_keywords(model)
    if found is None:
        return []
    named, _ = found
    missing = sorted(named - set(keys))
    out = []
    for key in keys:
        if isinstance(key, str) and key not in named:
            close = difflib.get_close_matches(key, missing, n=1, cutoff=cutoff)
            if close:
                out.append((key, close[0]))
    return out


def _warn_absorbed_keys(model: nn.Module, examples: ExampleSet, inputs: Any) -> None:
    """Warn about input keys a ``forward(..., **kwargs)`` takes without naming them, where each
    is one letter or two from a parameter it names (``attention_masks``): the model ran, and
    most likely ignored it (a Hugging Face model reads its mask from ``attention_mask`` only,
    so the padding would count as tokens)."""
    found = _forward_keywords(model)
    if not isinstance(inputs, dict) or found is None or not found[1]:
        return
    for key, meant in _misspelt(model, list(inputs), cutoff=0.8):
        warn(
            f"the {examples.name}'s input key {key!r} is not a parameter of "
            f"{type(model).__name__}.forward, which takes it into its **kwargs and most likely "
            f"ignores it: the model names {meant!r}, which the inputs lack. Rename the key if "
            "that is what it is (a mask under another name leaves the padding read as tokens)",
            UserWarning,
        )


def _scale_and_gap(a: Tensor, b: Tensor) -> tuple[float, float]:
    """The largest magnitude of either of two outputs of one shape, and their largest
    difference (0 and 0 for empty outputs)."""
    if not a.numel():
        return 0.0, 0.0
    a, b = a.detach(), b.detach()
    return max(float(a.abs().max()), float(b.abs().max())), float((a - b).abs().max())


def _same_leaves(ours: list[Tensor], theirs: list[Tensor], *, leading: bool = False) -> bool:
    """Whether two examples' input tensors are the same, exactly: each pair of one shape and
    values, or with ``leading``, each of ``ours`` the first row of its batch in ``theirs``."""
    if len(ours) != len(theirs):
        return False
    if leading:
        return all(
            b.shape[1:] == a.shape[1:] and torch.equal(b[:1], a) for a, b in zip(ours, theirs)
        )
    return all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(ours, theirs))


def deterministic_outputs(
    once: Tensor, again: Tensor, examples: ExampleSet, updated: Sequence[str] = ()
) -> None:
    """Refuse a model whose two outputs on the first example, ``once`` and ``again``, differ
    beyond rounding. A model that draws random numbers in evaluation mode (``F.dropout(x, p,
    training=True)``, added noise) makes every gradient, curvature and score one random draw:
    a tester's scores changed by 3.1 between two runs, their largest being 0.63, with no
    word. ``updated``: the buffers the second call changed, where the forward pass updates
    its own state (a running scale: a tester's was blamed on random numbers)."""
    scale, gap = _scale_and_gap(once, again)
    if not gap > 1e3 * torch.finfo(once.dtype).eps * max(scale, 1e-30):
        return
    if updated:
        raise InvalidInputError(
            f"the model's outputs on {examples.name} {examples.example(0)} differ between two "
            f"calls (by up to {gap:.3g}, the outputs being up to {scale:.3g}) in evaluation "
            f"mode: its forward pass updates its buffer(s) {', '.join(updated[:5])} (a running "
            "scale or statistic), so each pass would see another model. Update them only while "
            "self.training (infkit evaluates in evaluation mode), or keep them out of forward"
        )
    raise InvalidInputError(
        f"the model's outputs on {examples.name} {examples.example(0)} differ between two "
        f"calls (by up to {gap:.3g}, the outputs being up to {scale:.3g}) in evaluation "
        "mode: its forward pass draws random numbers (F.dropout(x, p, training=True), "
        "added noise), so every gradient and score would be one random draw. Make it "
        "deterministic in evaluation mode, e.g. F.dropout(x, p, training=self.training)"
    )


def warn_batch_mixing(engine: PerExample, examples: ExampleSet, alone: Tensor) -> None:
    """Warn where the first example's output ``alone`` differs from its output in a batch of
    two beyond rounding (beside the first example whose inputs differ from its; a batch of two
    is enough to see a mean taken over the batch, and little memory beside a language model's
    [B, T, V] outputs), its inputs being the same there (no padding added): a forward pass
    that mixes a batch's examples (``h - h.mean(0)``, batch statistics of its own) has no
    per-example loss, and infkit differentiates each example alone. A tester's model scored 0
    everywhere, with warnings that blamed the measurement and the curvature products."""
    if len(examples) < 2:
        return
    first = examples.take([0])
    ours = leaves(first.inputs)
    other = _partner(examples, first)
    batch = examples.take([0, other])
    if not _same_leaves(ours, leaves(batch.inputs), leading=True):
        return  # (padded otherwise: the padding's own effect is checked elsewhere)
    both = engine.outputs(batch)
    together = both[:1]
    if together.shape != alone.shape or not alone.numel():
        return
    scale, gap = _scale_and_gap(alone, together)
    # (a hundredth of the batch's outputs sets a floor: example 0 fitted exactly, its output
    # 1e-16, read a rounding difference of 8.9e-16 as mixing, a tester's plain nn.Linear; the
    # whole of them hid a mixing that moved a small output 32 times its size, a reviewer's)
    floor = max(scale, 1e-2 * float(both.detach().abs().max()))
    eps = _output_eps(engine, alone)
    if gap > min(0.1, 1e3 * eps) * max(floor, 1e-30):
        warn(
            f"the model's output on {examples.name} {examples.example(0)} alone differs from "
            f"its output in a batch of {len(batch)} (by up to {gap:.3g}, the outputs being up "
            f"to {scale:.3g}): its forward pass mixes the examples of a batch (batch "
            "statistics, h - h.mean(0)), while infkit differentiates each example alone, so "
            "every gradient and score is that of a batch of one (0 where the mixing cancels "
            "it). Make the forward pass act on each example alone in evaluation mode",
            UserWarning,
        )


def _partner(examples: ExampleSet, first: Batch, labels: bool = False) -> int:
    """The example a batch-mixing check pairs with example 0 (read as ``first``): the first
    whose inputs differ from its (a copy of it would hide a batch's mean: a reviewer's
    duplicated first example), and with ``labels`` whose targets differ too where one does
    (a loss weighting classes by their counts in the batch mixed nothing beside a partner of
    example 0's class: a tester's), among the first 15 and 48 spread over the set; else the
    last."""
    ours = leaves(first.inputs)
    theirs = leaves(first.targets) if labels and first.targets is not None else None
    found = None
    # the first examples, then examples spread over the set (data sorted by class, as
    # ImageFolder gives it, holds example 0's class first: a reviewer's 100 of them)
    n = len(examples)
    candidates = [*range(1, min(n, 16)), *(j for j in _spread(n, 48) if j >= 16)]
    for j in candidates:
        other = examples.take([j])
        if _same_leaves(ours, leaves(other.inputs)):
            continue
        if theirs is None or not _same_leaves(theirs, leaves(other.targets)):
            return j
        found = j if found is None else found
    return len(examples) - 1 if found is None else found


def _output_eps(engine: PerExample, outputs: Tensor) -> float:
    """The rounding of the coarsest precision ``outputs`` were computed in: the model's
    parameters and buffers (a float32 body under a float64 head: 3.6e-8 apart on a scale of
    0.12), autocast's, and TensorFloat-32 where CUDA's matrix products may take it."""
    model = engine.task.model
    dtypes = {outputs.dtype, engine.dtype, coarsest_dtype(model), engine.task.autocast}
    eps = max(torch.finfo(d).eps for d in dtypes if d is not None and d.is_floating_point)
    if any(t.is_cuda for t in (*model.parameters(), *model.buffers())):
        eps = max(eps, 2.0**-10)  # TF32's 10 bits of mantissa, which CUDA may take (cuDNN's
        # convolutions by default; matrix products by a setting of one of two APIs)
    return eps


def check_loss_alone(engine: PerExample, examples: ExampleSet) -> None:
    """Refuse a task loss that mixes the examples of a batch: on the outputs of a batch of
    example 0 and its partner (:func:`_partner`), example 0's loss beside its partner against
    its loss beside a copy of itself (the same shapes, its own row unchanged: a per-example
    loss gives it bit for bit, whatever rounding a batch of another size would take; a
    reviewer's float32 projection inside the loss rounded a row alone otherwise). A tester's
    regression loss ``((outputs - targets) ** 2).mean(1)`` on outputs [B, 1] and targets [B]
    broadcast to [B, B]: per example it was right, so scores were the per-example losses',
    while training and retraining, which take the loss of whole batches, optimised another
    objective, and the fit's only word blamed the optimisation (not at a stationary point). A
    loss that fails on the labels is named here too."""
    task = engine.task
    # (infkit's own losses are per example by construction; a language model's batch of 2
    # and its copies of 2 and 3 with their graphs rose by 882 MiB over 32,000 words)
    if len(examples) < 2 or _builtin(task.loss):
        return
    first = examples.take([0])
    other = _partner(examples, first, labels=True)
    batch = examples.take([0, other])
    if batch.targets is None or not _same_leaves(
        leaves(first.inputs), leaves(batch.inputs), leading=True
    ):
        return  # (no labels, or padded otherwise: a padding's own effect is checked elsewhere)
    with torch.no_grad():  # (the outputs' values: no graph of the model's)
        both = engine.outputs(batch)
    targets = engine.prepare(batch)[1]  # (on the model's device, as every loss call has them)
    # (outputs that carry a graph of their own, as the passes give them: a loss that
    # differentiates in them, a gradient penalty, was refused here, its labels blamed)
    both = both.detach().requires_grad_()
    copies = [
        (torch.cat([both[:1]] * k), map_tensors(targets, lambda t, k=k: torch.cat([t[:1]] * k)))
        for k in (2, 3)
    ]
    try:
        with torch.enable_grad():
            losses = [task.loss(both, targets), *(task.loss(o, t) for o, t in copies)]
    except InfkitError:  # a built-in task's own words (a binary task given two logits)
        raise
    except (RuntimeError, TypeError, ValueError, IndexError) as error:
        labels = batch.targets
        described = (
            f"a tensor of {labels.dtype}, per example {tuple(labels.shape[1:])}"
            if isinstance(labels, Tensor)
            else type(labels).__name__
        )
        raise InvalidInputError(
            f"the task's loss failed on {examples.name} {examples.example(0)}: "
            f"{clause(error_summary(error))}. It is given the model's outputs and the labels as they "
            f"are in the data ({described}): convert them in the loss (e.g. targets.long(), "
            "targets.reshape(-1)) or give them so"
        ) from error
    if [tuple(v.shape) if isinstance(v, Tensor) else None for v in losses] != [(2,), (2,), (3,)]:
        return  # (a loss of another shape, a batch's mean: named by the checks that follow)
    losses = [v.detach() for v in losses]  # (their values)
    # (the same computation on the same row: equal, whatever the loss's precision; 1e-5 of
    # room for kernels that reduce in another order from call to call, atomics on a GPU)
    beside, alone = float(losses[0][0]), float(losses[1][0])
    in_three = float(losses[2][0])
    # (a batch of three against one of two: another shape, so rounding may differ, by far less
    # than 1%; a loss scaled by the batch's size, a reviewer's 32 / B, moves by a third)
    if abs(in_three - alone) > 1e-2 * max(abs(in_three), abs(alone)):
        raise InvalidInputError(
            f"the task's loss of {examples.name} {examples.example(0)} is {alone:.6g} in a batch "
            f"of two copies of it and {in_three:.6g} in a batch of three: the loss depends on "
            "the batch's size (a division by it, a mean over the batch), so each example's loss "
            "is not its own and training on batches optimises another objective than the "
            "per-example losses infkit attributes. Make it return each example's own loss, "
            "with reduction='none' and no division by the batch's size"
        )
    if abs(beside - alone) > 1e-5 * max(abs(beside), abs(alone)):
        raise InvalidInputError(
            f"the task's loss of {examples.name} {examples.example(0)} is {beside:.6g} in a batch "
            f"beside {examples.example(other)} and {alone:.6g} beside a copy of itself (its own "
            "outputs and labels the same): the loss mixes the examples of a batch (a "
            "broadcast: outputs [B, 1] against targets [B] make [B, B]; a mean over the batch), "
            "so training and retraining, which take it on whole batches, optimise another "
            "objective than the per-example losses infkit attributes. Make it return each "
            "example's own loss (e.g. ((outputs.reshape(-1) - targets) ** 2))"
        )


#: examples :func:`_check_reads_alike` reads again, spread over the set, and how many times
READ_AGAIN_EXAMPLES, READ_AGAIN_TIMES = 8, 2


def _check_reads_alike(examples: ExampleSet, first: Batch) -> None:
    """Refuse a dataset whose examples read differently on another read (random augmentation
    in ``__getitem__``): infkit reads each example in several passes, which would each see
    another example (a tester's scores moved by 0.24 between runs, without a word).

    Up to :data:`READ_AGAIN_EXAMPLES` examples spread over the set (the first, ``first``,
    among them) are read :data:`READ_AGAIN_TIMES` times more: an augmentation applied half
    the time (a random flip) passes all 16 reads with probability 0.5^16, where the first
    example read once more let a tester's through for two seeds in six."""
    if examples._tensors is not None:  # tensors read the same every time
        return
    positions = _spread(len(examples), READ_AGAIN_EXAMPLES)

    def same(a: Tensor, b: Tensor) -> bool:  # NaN as NaN: a non-finite value is named later
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if torch.equal(a, b):
            return True
        # (features computed by kernels that sum in any order differ in the last bits)
        close = torch.isclose(a, b, rtol=1e-5, atol=0, equal_nan=True)
        return a.is_floating_point() and bool(close.all())

    for position in positions:
        read = first if position == 0 else examples.take([position], checked=False)
        for _ in range(READ_AGAIN_TIMES):
            again = examples.take([position], checked=False)
            before = leaves(read.inputs) + leaves(read.targets)
            after = leaves(again.inputs) + leaves(again.targets)
            if len(before) != len(after) or not all(map(same, before, after)):
                raise InvalidInputError(
                    f"{examples.name} {examples.example(position)} reads differently each "
                    "time it is read (random augmentation or sampling in the dataset's "
                    "__getitem__?): infkit reads every example in several passes, and each "
                    "would see another example. Give the examples as they are meant to be "
                    "attributed, without the randomness (e.g. the evaluation transforms), or fix "
                    "them once into tensors"
                )


def check_examples(engine: PerExample, examples: ExampleSet, measured: bool = False) -> None:
    """Check that the data is finite, the model accepts the inputs and the task's targets are
    usable.

    NaN or Inf in a float input or target first (:meth:`~infkit.data.ExampleSet.check_finite`,
    naming the example), then the inputs batch by batch against the task's ``check_inputs`` (token ids outside a language
    model's vocabulary), one forward pass on the first example (integer inputs to a float
    model, an index out of an embedding's range, probabilities where logits are expected), the
    task's ``check_model`` on the example its ``probe_example`` picks (a language model's first
    left-padded sequence: one more forward pass or two), then the targets batch by batch
    against the task's ``check_targets`` and ``check_scored``; every problem names the example
    and what to do. An ExampleSet is checked once.

    ``measured``: the set is read through the measurement only (queries). Under a custom
    measurement the loss's ``check_scored`` does not refuse it then (a one-token prompt whose
    measurement reads one logit), unless the measurement reads the labels too (its gradient in
    the outputs is 0 on one of the examples ``check_scored`` names: a completion's
    log-likelihood); a set let through so is not marked checked, so that a use of the same
    ExampleSet through the loss checks it again.
    """
    if examples._checked:
        return
    with naming_failures(engine, examples, measured):  # (a later example the model cannot take)
        _check_examples(engine, examples, measured)


def _check_examples(engine: PerExample, examples: ExampleSet, measured: bool) -> None:
    """:func:`check_examples`'s checks."""
    # (whether the set reads alike first, on reads it keeps no note of: the notes of its first
    # reads, check_finite's, then check every later read, a pass's)
    _check_reads_alike(examples, examples.take([0], checked=False))
    examples.check_finite()
    task = engine.task
    first = examples.take([0])
    label_checks = (task.check_targets, task.check_scored)
    labelled = any(check is not None for check in label_checks)  # the task reads labels
    if first.targets is None and labelled:
        raise _unlabelled(examples, first.inputs)
    probe: int | None = None  # the example check_model looks at (None: the first)
    if task.check_inputs is not None or task.probe_example is not None:
        for batch in examples.batches(4096):  # all of them, before the model sees any
            found = task.input_problem(batch.inputs)
            if found is not None:
                k, message = found
                raise InvalidInputError(f"{examples.name} {batch.example(k)}: {message}")
            if probe is None and task.probe_example is not None:
                picked = task.probe_example(batch.inputs)
                probe = None if picked is None else int(batch.indices[picked])
    try:
        outputs = engine.outputs(first)
    except InfkitError:  # infkit's own (an output it cannot read) say what they mean
        raise
    except (RuntimeError, TypeError, IndexError, ValueError, KeyError) as error:
        integer = [
            str(t.dtype)
            for t in leaves(first.inputs)
            if not (t.is_floating_point() or t.is_complex())
        ]
        message = str(error).splitlines()[0][:200]
        if integer and ("dtype" in message or "Long" in message or "Int" in message):
            raise InvalidInputError(
                f"{examples.name}: the model refused its inputs ({message}); they are integer "
                f"tensors ({', '.join(sorted(set(integer)))}): pass floating-point inputs, e.g. "
                "X.float(), or, where the model embeds token ids, int64 ones (ids.long(): "
                "an embedding takes int32 or int64 indices only)"
            ) from error
        given, lacking = "", ""
        if isinstance(first.inputs, dict):
            given = f" (input keys: {', '.join(sorted(map(str, first.inputs)))})"
            main = getattr(task.model, "main_input_name", None)  # a Hugging Face model's
            # named only where a given key is not a parameter of forward and is close to it
            # (an inputs_embeds the model takes, or its own lookup's KeyError, are not this)
            near = [
                key
                for key, meant in _misspelt(task.model, list(first.inputs), cutoff=0.6)
                if meant == main
            ]
            if isinstance(main, str) and main not in first.inputs and near:
                lacking = (
                    f" The model reads its main input as {main!r} (its main_input_name), a key "
                    f"the {examples.name}'s inputs lack: name it so (given: {near[0]!r})."
                )
        if isinstance(first.inputs, (tuple, list)) and "argument" in message:
            # (a Dataset of ((a, b), y) items for forward(self, a, b): a tester's)
            lacking += (
                f" An example's inputs are a {type(first.inputs).__name__} of "
                f"{len(first.inputs)}, which the model takes as one argument: for a model of "
                "several inputs give a dict of them, ({'a': a, 'b': b}, y) items for "
                "forward(self, a, b)."
            )
        raise InvalidInputError(
            f"the model could not be called on {examples.name} {examples.example(0)}{given}: "
            f"{type(error).__name__}: {message}.{lacking} Check that the data holds the model's "
            "inputs (a dict of inputs is passed as keyword arguments)"
        ) from error
    _warn_absorbed_keys(task.model, examples, first.inputs)
    if task.check_outputs is not None:
        problem = task.check_outputs(outputs)
        if problem is not None:
            raise InvalidInputError(f"{examples.name}: {problem}")
    if task.check_model is not None:
        probe = probe or 0
        probed = first if probe == 0 else examples.take([probe])
        problem = task.check_model(
            partial(_call_at_theta, engine),
            engine.prepare(probed)[0],
            outputs if probe == 0 else engine.outputs(probed),  # the first's: computed above
        )
        if problem is not None:
            warn(f"{examples.name} {examples.example(probe)}: {problem}", UserWarning)
    lenient = measured and not task.measures_loss  # the loss never reads this set
    unscored = False  # a problem check_scored found and, for this use, let pass
    suspected = False  # a Suspicion of check_pairs warned of (once a set)
    if labelled or task.check_pairs is not None:
        output_shape = tuple(outputs.shape[1:])
        for batch in examples.batches(4096):
            found = None
            if labelled and batch.targets is None:
                raise _unlabelled(examples, batch.inputs)
            if task.check_targets is not None:
                found = task.check_targets(batch.targets, output_shape)
            if found is None and task.check_scored is not None:
                found = task.check_scored(batch.targets)
                if found is not None and lenient:
                    _check_measured_rows(engine, batch, _unscored_rows(task, batch, found[0]))
                    found, unscored = None, True
            if found is None and task.check_pairs is not None:  # once the targets are usable
                found = task.check_pairs(batch.inputs, batch.targets)
                if found is not None and isinstance(found[1], Suspicion):  # may be meant so
                    if not suspected:
                        warn(f"{examples.name} {batch.example(found[0])}: {found[1]}")
                    found, suspected = None, True
            if found is not None:
                k, message = found
                raise InvalidInputError(f"{examples.name} {batch.example(k)}: {message}")
    targets = engine.prepare(first)[1]  # example 0's, as the loss reads them (on its device)
    _check_differentiable(engine, examples, outputs, targets, measured)
    if not measured:  # (a training set: its loss trains the model and is attributed)
        check_loss_alone(engine, examples)
        _check_output_curvature(engine, examples, outputs)
    _check_loss_precision(engine, examples, measured, outputs)
    examples._checked = not unscored


#: outputs per example up to which :func:`_check_output_curvature` forms the loss's Hessians
#: and :func:`_check_loss_precision` its gradients in float64 (a reviewer's 4,096 cost 5 s and
#: 650 MB a call, paid by every fit and retraining)
FACTOR_CHECK_OUTPUTS = 256

#: the relative gap of a task's ``output_hessian``, its product or ``L L^T`` from the loss's
#: Hessian above which it is refused: far above rounding (a reviewer's right factor of a
#: confident float32 prediction read 5.4e-5, the Hessian's own cancellation), far below the
#: mistakes it is for (Lambda itself 0.66, 2 L 3, a Hessian without the examples' weight 0.26)
FACTOR_TOLERANCE = 1e-2

#: the gap, relative to the largest block among the examples checked (and absolute: 1e-9 of
#: curvature weighs nothing beside any damping), below which a block is taken as the loss's
#: whatever its own size: near-certain examples' Hessians are near 0, where
#: PyTorch's own autodiff rounds (binary cross-entropy on sigmoid probabilities clamps its
#: division: 8.7e-15 for 9.4e-14), and such curvature weighs nothing beside the set's (a
#: reviewer's right Hessians were refused at gaps of 1e-15; an absolute floor of 1e-9 let
#: another's wrong one through where the 8 examples checked were all near certain)
CURVATURE_FLOOR = 1e-9

#: training examples, spread over the set, on which a task's own ``output_hessian``,
#: ``output_hessian_product`` and ``output_hessian_factor`` are checked (a factor right on
#: example 0 and wrong on the examples of another class, a tester's class-weighted loss, put
#: K-FAC 11% off, EK-FAC 32%; 64, so that some carry curvature where most are near certain)
CURVATURE_CHECK_EXAMPLES = 64

#: examples, spread over a set, whose loss (or measurement) gradients in the outputs are
#: compared with the same function's on the outputs in float64 (:func:`_check_loss_precision`)
PRECISION_CHECK_EXAMPLES = 64

#: sequences of a language-modelling set whose loss's precision is checked, one at a time
#: (a [T, V] gradient each, in float64 a few positions at a time)
LM_PRECISION_EXAMPLES = 8

#: the relative gap of those gradients above which the loss is said to lose its precision:
#: float32's rounding is 1e-7, the error it is for 0.5-0.9 (a probability within 6e-8 of 1
#: rounded to 1: cross-entropy's ``p - onehot`` lost its true class's entry)
PRECISION_TOLERANCE = 1e-2

#: examples a check's forward pass takes at a time (without gradients): a language model's
#: [B, T, V] logits of 64 examples at once were a reviewer's 12 GiB
CHECK_BATCH = 8


def _spread(n: int, k: int) -> list[int]:
    """Up to ``k`` positions spread evenly over ``n`` examples, the first and the last among
    them (data sorted by class meets every class); all of them when ``n <= k``."""
    count = min(n, k)
    return sorted({round(i * (n - 1) / max(count - 1, 1)) for i in range(count)})


def _builtin(fn: Any) -> bool:
    """Whether ``fn`` is one of infkit's own (tested against autodiff in the suite)."""
    return getattr(fn, "__module__", None) in (Task.__module__, lm.__name__)


def _spread_outputs(engine: PerExample, examples: ExampleSet, k: int) -> tuple[Tensor, Any, Batch]:
    """The outputs (detached) and targets of ``k`` examples spread over the set, forwarded
    :data:`CHECK_BATCH` at a time without gradients, and their batch (for naming them)."""
    batch = examples.take(_spread(len(examples), k))
    parts = []
    with torch.no_grad():
        for start in range(0, len(batch), CHECK_BATCH):
            rows = batch.rows(range(start, min(start + CHECK_BATCH, len(batch))))
            parts.append(engine.outputs(rows).detach())
    return torch.cat(parts), engine.prepare(batch)[1], batch


def _float64_or_own(fn: Any, outputs: Tensor, *args: Any) -> tuple[Tensor, torch.dtype]:
    """``fn(outputs, *args)`` on the outputs in float64 where ``fn`` takes them (a confident
    float32 prediction's Hessian loses its digits to cancellation), else in their own dtype;
    with the dtype it ran in."""
    try:
        return fn(outputs.to(torch.float64), *args).to(torch.float64), torch.float64
    except CALL_ERRORS:  # (a loss holding float32 weights of its own)
        return fn(outputs, *args).to(torch.float64), outputs.dtype


def _check_output_curvature(engine: PerExample, examples: ExampleSet, first: Tensor) -> None:
    """Refuse a task's own ``output_hessian`` that is not its loss's Hessian in the outputs, an
    ``output_hessian_product`` that does not multiply by it, and an ``output_hessian_factor``
    L_i whose ``L_i L_i^T`` is not that Hessian's non-negative part (what infkit's own factor
    keeps of an indefinite one), on :data:`CURVATURE_CHECK_EXAMPLES` training examples spread
    over the set, against autodiff (or the task's checked ``output_hessian``). Reviewers' and
    testers' mistakes went through with only their shapes checked: a factor returning Lambda_i
    (K-FAC 142% off), 2 L_i (69%), one right on example 0 only (11%, EK-FAC 32%); a Hessian
    without the examples' weights (25.7% off; as a product, cg 61.6%), doubled (44%),
    asymmetric (dual 2.8x). None above :data:`FACTOR_CHECK_OUTPUTS` outputs an example
    (``first``: example 0's)."""
    task = engine.task
    hessian_fn, factor_fn = task.output_hessian, task.output_hessian_factor
    product_fn = task.output_hessian_product
    own_hessian = hessian_fn is not None and not _builtin(hessian_fn)
    own_factor = factor_fn is not None and not _builtin(factor_fn)
    own_product = product_fn is not None and not _builtin(product_fn)
    if not (own_hessian or own_factor or own_product) or first[0].numel() > FACTOR_CHECK_OUTPUTS:
        return
    outputs, targets, batch = _spread_outputs(engine, examples, CURVATURE_CHECK_EXAMPLES)
    try:  # the loss's own, by autodiff
        autodiff, ran_in = _float64_or_own(task.loss_hessians, outputs, targets)
    except CALL_ERRORS:  # a loss torch.func cannot take: what the given curvature spares
        autodiff, ran_in = None, outputs.dtype
    reference, source = autodiff, "the loss, by autodiff"
    if hessian_fn is not None:  # (the task's own, or a built-in's: what the rest is held to)
        given, given_in = _float64_or_own(task.lambda_blocks, outputs, targets)
    if own_hessian and autodiff is not None:
        _refuse_gap(
            examples,
            batch,
            given,
            autodiff,
            (ran_in, given_in),
            "output_hessian",
            ". It must return each example's Hessian of its loss in the outputs, Lambda_i = "
            "d^2 l_i / d f^2 [B, C, C], symmetric (the examples' weights, class weights, a "
            "temperature as the loss has them), or be left out: infkit then takes it from the "
            "loss by autodiff",
        )
    if hessian_fn is not None:
        reference, source = given, "its output_hessian"
    if reference is None:
        return
    b, c = outputs.shape[0], outputs[0].numel()
    if own_product and product_fn is not None:
        vectors = torch.randn(2, *outputs.shape, generator=torch.Generator().manual_seed(0))
        done, done_in = _float64_or_own(
            lambda o, t: product_fn(o, t, vectors.to(o.dtype)), outputs, targets
        )
        flat = vectors.to(torch.float64).reshape(2, b, c)
        expected = torch.einsum("bcd,kbd->bkc", reference, flat)
        _refuse_gap(
            examples,
            batch,
            done.reshape(2, b, c).transpose(0, 1),
            expected,
            (ran_in, done_in),
            "output_hessian_product",
            f" (Lambda from {source}). It must return Lambda_i v for each example's block of "
            "the vectors V [K, *outputs.shape], in V's shape",
            what="the products",
        )
    if not own_factor or outputs.dim() != 2:
        return  # (the factor serves outputs [B, C] only: Task.lambda_factor)
    factor = task.lambda_factor(outputs, targets).to(torch.float64)
    values, vectors_ = torch.linalg.eigh(0.5 * (reference + reference.mT))
    kept = (vectors_ * values.clamp_min(0).unsqueeze(1)) @ vectors_.mT  # its non-negative part
    indefinite = bool((values.min(dim=1).values < -FACTOR_TOLERANCE * values.abs().amax(1)).any())
    _refuse_gap(
        examples,
        batch,
        factor @ factor.transpose(1, 2),
        kept,
        (ran_in, outputs.dtype),
        "output_hessian_factor",
        f" (Lambda from {source}"
        + (
            "; indefinite there, so its non-negative part, as infkit's own factor keeps"
            if indefinite
            else ""
        )
        + "). It must return L_i with L_i L_i^T = Lambda_i, [B, C, K] (not Lambda_i itself), "
        "e.g. the eigenvectors of Lambda_i scaled by the square roots of its eigenvalues, or be "
        "left out: infkit then factors Lambda_i itself",
        what="L L^T",
    )


def _refuse_gap(
    examples: ExampleSet,
    batch: Batch,
    given: Tensor,
    reference: Tensor,
    dtypes: tuple[torch.dtype, torch.dtype],
    option: str,
    remedy: str,
    what: str = "it",
) -> None:
    """Refuse ``given`` [K, ...] where an example's block is further from ``reference``'s than
    :data:`FACTOR_TOLERANCE` of their size, beyond the rounding of the coarser of ``dtypes``
    (on the scale of the examples' largest block: a confident example's Hessian is near 0, its
    float32 cancellation as large as it) and :data:`CURVATURE_FLOOR` of it."""
    gap = (given - reference).flatten(1).norm(dim=1)
    size = torch.maximum(given.flatten(1).norm(dim=1), reference.flatten(1).norm(dim=1))
    eps = max(torch.finfo(d).eps for d in dtypes)
    # (relative to the largest block checked, and absolute: curvature of 1e-9 weighs nothing
    # beside any damping, where autodiff's own rounding of near-certain examples is larger than
    # them: a reviewer's right Hessian was refused at 2e-16 against blocks of 5e-20)
    floor = max(100 * eps, CURVATURE_FLOOR) * float(size.max()) + CURVATURE_FLOOR
    bad = (gap > FACTOR_TOLERANCE * size + floor).nonzero().flatten().tolist()
    if not bad:
        return
    k = bad[0]
    raise InvalidInputError(
        f"the task's {option} does not give the loss's Hessian in the outputs on "
        f"{examples.name} {batch.example(k)} ({len(bad)} of the {len(gap)} examples checked, "
        f"spread over the set): ||{what} - Lambda|| is {float(gap[k]):.3g} against ||Lambda|| "
        f"= {float(reference[k].norm()):.3g}{remedy}"
    )


def _check_loss_precision(
    engine: PerExample, examples: ExampleSet, measured: bool, first: Tensor
) -> None:
    """Warn where a task's own loss (its measurement, for queries) loses its precision in the
    outputs' dtype: its gradient in the outputs of :data:`PRECISION_CHECK_EXAMPLES` examples
    spread over the set against the same function's on the outputs in float64 (a query's
    against its own gradient, which its scores scale with; a training example's against the
    set's typical one, as its share of the curvature and the scores is: a reviewer's confident
    training examples, 75% off their own tiny gradients, moved no score). A tester's float32
    softmax regression with a plain ``F.cross_entropy``: its confident queries (``1 - p_y <
    6e-8``, ``p_y`` rounded to 1) scored 64-72% off a float64 solve, with no word. A function
    that takes no float64 outputs (float32 class weights of its own) is told of, once, as not
    checked. The built-in tasks take their loss in float64, but for the language-modelling
    loss (its ``[B, T, V]`` logits too large to copy, docs/methods/language_models.md §7),
    which is checked on :data:`LM_PRECISION_EXAMPLES` sequences, a few positions at a time
    (:func:`~infkit.language_modeling.next_token_gradient_gap`): a tester's float32 Llama
    scored memorised one-token completions 13-91% off float64 with no word. Other functions
    are checked up to :data:`FACTOR_CHECK_OUTPUTS` outputs an example (``first``: example
    0's)."""
    task = engine.task
    fn = task.measurement if measured else task.loss
    if first.dtype == torch.float64:
        return
    name = "measurement" if measured and not task.measures_loss else "loss"
    low = first.dtype  # the dtype the loss takes its gradient in
    if fn is lm.next_token_loss:
        low = torch.promote_types(first.dtype, torch.float32)
        distance, size, batch = _next_token_gaps(engine, examples)
        remedy = (
            "score such sequences with the model in float64 (model.double()): the "
            "language-modelling loss keeps the logits' float32, a [B, T, V] copy in float64 "
            "being too large (docs/methods/language_models.md §7)"
        )
    elif _builtin(fn) or first[0].numel() > FACTOR_CHECK_OUTPUTS:
        return
    else:
        found = _own_loss_gaps(engine, examples, fn, name)
        if found is None:
            return
        distance, size, batch = found
        remedy = (
            f"compute the {name} in float64 and return it in the outputs' dtype, e.g. "
            "F.cross_entropy(outputs.double(), y, reduction='none').to(outputs.dtype), as the "
            "built-in tasks do"
        )
    # (a training set's typical gradient among its scored examples: a set of mostly unscored
    # sequences would otherwise have a typical gradient of 0 and no example named)
    scored = size[size > 0]
    typical = scored.median() if len(scored) else size.new_zeros(())
    scale = size if measured else typical.expand_as(size)
    gap = distance / scale.clamp_min(1e-300)
    tolerance = max(PRECISION_TOLERANCE, 100 * torch.finfo(low).eps)
    bad = ((gap > tolerance) & (scale > 0)).nonzero().flatten().tolist()
    if not bad:
        return
    k = max(bad, key=lambda i: float(gap[i]))
    against = "its own gradient" if measured else "the set's typical gradient"
    warn(
        f"the task's {name} loses its precision in {dtype_name(low)} on "
        f"{examples.name} {batch.example(k)}: its gradient in the outputs is "
        f"{float(gap[k]):.{0 if gap[k] >= 0.1 else 1}%} "
        f"({against}) off the same {name}'s on the outputs in float64 ({len(bad)} of the "
        f"{len(gap)} examples checked, spread over the set, more than 1% off), and every score "
        "and curvature reads that gradient. A confident prediction rounds its probability to 1 "
        "(1 - p < 6e-8 in float32), and cross-entropy's p - onehot loses its true class's "
        f"entry. To score them, {remedy}",
        UserWarning,
    )


def _next_token_gaps(engine: PerExample, examples: ExampleSet) -> tuple[Tensor, Tensor, Batch]:
    """``(||g~_i - g_i||, ||g_i||, batch)`` of the language-modelling loss on
    :data:`LM_PRECISION_EXAMPLES` sequences spread over the set, forwarded one at a time
    (:func:`~infkit.language_modeling.next_token_gradient_gap`; :func:`_check_loss_precision`)."""
    batch = examples.take(_spread(len(examples), LM_PRECISION_EXAMPLES))
    gaps, sizes = [], []
    with torch.no_grad():
        for i in range(len(batch)):
            rows = batch.rows(range(i, i + 1))
            gap, size = lm.next_token_gradient_gap(engine.outputs(rows), engine.prepare(rows)[1])
            gaps.append(gap)
            sizes.append(size)
    return torch.cat(gaps), torch.cat(sizes), batch


def _own_loss_gaps(
    engine: PerExample, examples: ExampleSet, fn: Any, name: str
) -> tuple[Tensor, Tensor, Batch] | None:
    """``(||g~_i - g_i||, ||g_i||, batch)`` of a task's own loss (or measurement) ``fn`` on
    :data:`PRECISION_CHECK_EXAMPLES` examples spread over the set: its gradient in the outputs
    in their dtype (g~_i) and in float64 (g_i); None, with a Notice, where ``fn`` takes no
    float64 outputs (:func:`_check_loss_precision`)."""
    outputs, targets, batch = _spread_outputs(engine, examples, PRECISION_CHECK_EXAMPLES)
    grads = []
    for dtype in (outputs.dtype, torch.float64):
        at = outputs.to(dtype).requires_grad_()
        try:
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(fn(at, targets).sum(), at)
        except CALL_ERRORS as error:
            if dtype == torch.float64:  # (the outputs' own dtype worked: the loss's own tensors)
                warn(
                    f"the task's {name} takes no float64 outputs ({clause(error_summary(error))}), "
                    f"so its precision in {dtype_name(outputs.dtype)} is not checked: a confident "
                    "example's probability rounds to 1 there (1 - p < 6e-8 in float32), and "
                    "cross-entropy's p - onehot loses its true class's entry. Take it in "
                    "float64, its own tensors too (class weights: w.double()), and return it in "
                    "the outputs' dtype",
                    Notice,
                )
            return None
        grads.append(grad.to(torch.float64).flatten(1))
    low, exact = grads
    return (low - exact).norm(dim=1), exact.norm(dim=1), batch


def _check_differentiable(
    engine: PerExample, examples: ExampleSet, outputs: Tensor, targets: Any, measured: bool
) -> None:
    """Refuse a loss (or, for a set read through it, a measurement) with no gradient in the
    model's outputs on example 0: computed from detached outputs, integers or booleans (an
    accuracy, a ``.detach()``), it carries no autograd graph. A tester's detached loss met
    PyTorch's "element 0 of tensors does not require grad" somewhere else in each method, and
    a boolean measurement gave zeros with one method and that error with another. One call of
    the function on example 0's outputs (no pass over the model)."""
    task = engine.task
    fn, what = (task.measurement, "measurement") if measured else (task.loss, "loss")
    # (out of inference mode, on copies that are ordinary tensors: under a caller's
    # torch.inference_mode() no tensor could require grad, and a reviewer's graphless accuracy
    # then gave zeros)
    with torch.inference_mode(False), torch.enable_grad():
        targets = map_tensors(targets, lambda t: t.clone())
        probe = outputs.detach().clone().requires_grad_(True)
        try:
            value = fn(probe, targets)
        except (RuntimeError, TypeError, ValueError, IndexError):
            return  # (a loss that fails on the labels is named by check_loss_alone)
    if not isinstance(value, Tensor) or value.shape != (outputs.shape[0],):
        return  # (a value of another shape is named where the answers call it)
    if value.requires_grad:
        return
    raise InvalidInputError(
        f"the task's {what} of {examples.name} {examples.example(0)} carries no gradient in the "
        f"model's outputs (a {value.dtype} tensor outside autograd's graph: the outputs were "
        "detached, or it is computed from integers or booleans, such as an accuracy), so no "
        f"removal effect can be taken through it. Compute it from the outputs by differentiable "
        "operations (a cross-entropy rather than a 0/1 error, a margin rather than an accuracy)"
    )


def _unscored_rows(task: Task, batch: Batch, first: int) -> list[int]:
    """The rows of ``batch`` whose targets the task's ``check_scored`` refuses, from ``first``
    (the row it named) on: it names one row at a time, so it is asked again after each."""
    assert task.check_scored is not None
    rows, start = [first], first + 1
    while start < len(batch):
        rest = map_tensors(batch.targets, lambda t, start=start: t[start:])
        found = task.check_scored(rest)
        if found is None:
            break
        rows.append(start + found[0])
        start = rows[-1] + 1
    return rows


def _check_measured_rows(engine: PerExample, batch: Batch, rows: list[int]) -> None:
    """Refuse the first of ``rows`` (examples of ``batch`` with no label the loss would score)
    on which the measurement's gradient in the model's outputs, dm/df, is 0: a measurement that
    reads the labels has nothing to read there, and every score against it would be 0. A forward
    pass over these rows, :data:`MEASUREMENT_PROBE_BATCH` at a time."""
    for start in range(0, len(rows), MEASUREMENT_PROBE_BATCH):
        chunk = rows[start : start + MEASUREMENT_PROBE_BATCH]
        part = batch.rows(chunk)
        moves = (engine.output_gradients(part, "measurement") != 0).reshape(len(chunk), -1)
        still = (~moves.any(dim=1)).nonzero()
        if len(still):
            k = chunk[int(still[0, 0])]
            raise InvalidInputError(
                f"{batch.source} {batch.example(k)}: the measurement's gradient in the model's "
                "outputs is 0 on this example, which has no label the loss would score (a "
                "measurement that reads the labels has nothing to read here), so every score "
                "against it would be 0. Drop it, unmask its labels, or measure what needs no "
                "label"
            )


def _unlabelled(examples: ExampleSet, inputs: Any) -> InvalidInputError:
    """The error for a set without the labels its task reads (``inputs``: a batch's)."""
    if not isinstance(inputs, dict):  # (an (X, None) pair: it spoke of dicts' keys)
        return InvalidInputError(
            f"{examples.name} has no labels, which the task reads: give them as (X, y), or "
            f"in each dict example under a label key ({', '.join(LABEL_KEYS)})"
        )
    return InvalidInputError(
        f"{examples.name} has no labels: a dataset of dicts needs a label key "
        f"({', '.join(LABEL_KEYS)}); keys found: {', '.join(sorted(inputs)) or 'none'}"
    )
