"""Causal language modelling: the next-token loss of a sequence and what the methods need of it.

The conventions are Hugging Face's: a model maps token ids ``input_ids`` [B, T] (and an
``attention_mask``) to logits [B, T, V]; ``labels`` [B, T] are aligned with the inputs and
shifted inside the loss, so the logits at position t are scored against label t + 1; a label
of -100 (PyTorch's ``ignore_index``) is not scored. The per-example loss is the *summed*
next-token loss of the sequence (docs/methods/language_models.md §1),

    l_i = sum_{t : y_{i,t+1} != -100} CE(z_{i,t}, y_{i,t+1}),

so that a sequence weighs by its scored tokens, as in the mean-over-tokens training loss up to
the constant number of tokens. A completion given a prompt is scored by the same loss with the
prompt's labels set to -100 (:func:`examples` with ``prompt_lengths``).

The output Hessian of position t is the softmax block ``diag(p_t) - p_t p_t^T`` of the scored
positions, applied as a product (:func:`hessian_product`; a dense [TV, TV] block is never
formed), and :func:`sample_labels` draws next tokens from the model for the true Fisher.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from infkit.data import WHOLE_BATCH
from infkit.errors import InvalidInputError, Notice, Suspicion, warn
from infkit.parameters import coarsest_dtype

#: PyTorch's ignore_index, Hugging Face's label for positions that are not scored
IGNORE_INDEX = -100
#: :func:`check_causal` calls a model causal when changing a token moves the earlier logits by
#: at most this much, relative to their largest (a causal model's move by exactly 0 in
#: deterministic kernels; a thousand float32 roundings for others). Relative to the logits
#: however small: with a floor of 1, a fresh BERT's logits of 0.22 moving 9.7e-5 passed
CAUSAL_TOLERANCE = 1e-4
#: :func:`check_padding` calls a left-padded sequence's logits moved when they differ from the
#: unpadded ones by more than this many times as much as the same tokens padded on the right do
#: (the model's own rounding: bfloat16 weights with float32 logits round far above the logits')
NOISE_MARGIN = 10.0


def _shifted(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Logits [B, T-1, V] of positions 0..T-2, at least in float32, and the labels they predict
    [B, T-1]. (infkit's passes hand the loss float32 logits already; a user's call with a
    bfloat16 model's logits would otherwise take its log-softmax in bfloat16, to its 4e-3.)"""
    if outputs.dim() != 3:
        raise InvalidInputError(
            f"a language model returns logits [B, T, V]; got shape {tuple(outputs.shape)}"
        )
    labels = targets.reshape(outputs.shape[:2]).long()
    logits = outputs[:, :-1]
    return logits.to(torch.promote_types(logits.dtype, torch.float32)), labels[:, 1:]


def next_token_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """``l_i``: the summed next-token cross-entropy of each sequence, [B]."""
    logits, labels = _shifted(outputs, targets)
    losses = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    )
    return losses.reshape(labels.shape).sum(dim=1)


#: bytes of float64 logits :func:`next_token_gradient_gap` takes at a time (its peak is a few
#: times this: the chunk's float64 probabilities and their float32 twin)
GAP_CHUNK_BYTES = 4 << 20


def next_token_gradient_gap(outputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(||g~_i - g_i||, ||g_i||)`` [B] float64: the gradient g_i of each sequence's summed
    next-token loss in its logits, ``p_t - onehot(y_t)`` at each scored position t, as
    :func:`next_token_loss`'s backward takes it (``exp(log_softmax) - onehot`` in the logits'
    dtype, at least float32: g~_i) and in float64 (g_i), a few positions at a time (a
    ``[B, T, V]`` float64 copy of a large vocabulary's logits would be a run's largest
    object). In float32 a probability within 6e-8 of 1 rounds to 1, and ``p - onehot`` loses
    its true token's entry: a sequence every token of which is predicted that surely has g~_i
    mostly rounding. The labels are the task's, checked (:func:`check_labels`): token ids,
    or -100 where a position is not scored."""
    logits, labels = _shifted(outputs.detach(), targets)
    batch, steps, words = logits.shape
    chunk = max(1, GAP_CHUNK_BYTES // max(batch * words * 8, 1))
    gap = torch.zeros(batch, dtype=torch.float64, device=logits.device)
    size = torch.zeros_like(gap)
    for start in range(0, steps, chunk):
        part, scored = logits[:, start : start + chunk], labels[:, start : start + chunk]
        picked = scored.clamp_min(0).unsqueeze(-1)
        kept = (scored != IGNORE_INDEX).unsqueeze(-1)
        grads = []
        for dtype in (logits.dtype, torch.float64):
            grad = torch.log_softmax(part.to(dtype), -1).exp_()
            grad.scatter_add_(-1, picked, torch.full(picked.shape, -1.0, dtype=dtype))
            grads.append(grad.mul_(kept))
        low, exact = grads
        gap += (low.to(torch.float64) - exact).square_().sum(dim=(1, 2))
        size += exact.square_().sum(dim=(1, 2))
    return gap.sqrt(), size.sqrt()


def hessian_product(outputs: Tensor, targets: Tensor, vectors: Tensor) -> Tensor:
    """``Lambda_i v`` for vectors [K, B, T, V]: ``p_t * v_t - p_t (p_t . v_t)`` at each scored
    position t (its label t + 1 is not -100), zero elsewhere; in the vectors' dtype."""
    logits, labels = _shifted(outputs, targets)
    p = torch.softmax(logits.detach().to(torch.promote_types(logits.dtype, torch.float32)), -1)
    v = vectors[:, :, :-1].to(p.dtype)
    product = p * v - p * (p * v).sum(-1, keepdim=True)
    product = product * (labels != IGNORE_INDEX).unsqueeze(-1).to(p.dtype)
    out = torch.zeros_like(vectors)
    out[:, :, :-1] = product.to(vectors.dtype)
    return out


def margin(outputs: Tensor, targets: Tensor) -> Tensor:
    """TRAK's model output for a sequence: ``sum_t log(p_t / (1 - p_t))`` over scored positions,
    p_t the probability of token t + 1 (the multi-class margin of each position), [B]."""
    logits, labels = _shifted(outputs, targets)
    scored = labels != IGNORE_INDEX
    picked = labels.clamp_min(0).unsqueeze(-1)
    true = logits.gather(-1, picked).squeeze(-1)
    others = logits.scatter(-1, picked, float("-inf")).logsumexp(-1)
    return ((true - others) * scored.to(logits.dtype)).sum(dim=1)


def margin_to_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """TRAK's weight Q for a sequence: the mean of ``1 - p_t`` over its scored positions, [B]."""
    logits, labels = _shifted(outputs, targets)
    scored = (labels != IGNORE_INDEX).to(logits.dtype)
    p = torch.softmax(logits, -1).gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return ((1 - p) * scored).sum(dim=1) / scored.sum(dim=1).clamp_min(1)


def sample_labels(outputs: Tensor, targets: Any, generator: torch.Generator) -> Tensor:
    """Labels drawn from the model: position t + 1 from ``softmax(z_t)`` where it is scored."""
    logits, labels = _shifted(outputs, targets)
    probs = torch.softmax(logits.detach().to(torch.float32), dim=-1)
    cdf = probs.reshape(-1, probs.shape[-1]).cumsum(-1)
    # inverse-CDF sampling: torch.multinomial is several times slower on CPU for large V
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1).reshape(labels.shape)
    sampled = targets.reshape(outputs.shape[:2]).long().clone()
    sampled[:, 1:] = torch.where(labels == IGNORE_INDEX, labels, drawn)
    return sampled


def check_logits(outputs: Tensor, vocabulary: int | None = None) -> str | None:
    """Why a language model's outputs [B, T, V] cannot be its logits, or None.

    Probabilities (non-negative, summing to 1 at every position) are refused: the loss applies
    the softmax itself. Logits over another number of tokens than the model's input embedding
    holds (``vocabulary``) get a notice: the labels are the inputs shifted, so the two are one
    vocabulary, and the usual cause is a model returning a tuple whose first item is not the
    logits (hidden states first), which the default ``output_fn`` takes.
    """
    if outputs.dim() != 3 or outputs.shape[-1] < 2:
        return None  # check_labels names the shape
    rows = outputs.detach().to(torch.float64)
    if bool((rows >= 0).all()) and float((rows.sum(-1) - 1).abs().max()) <= 1e-4:
        return (
            "the model's outputs are probabilities (non-negative, summing to 1 at every "
            "position): it ends in a softmax. Task.language_modeling applies the softmax in "
            "its loss and needs the logits: remove the final softmax, or pick the logits with "
            "output_fn="
        )
    if vocabulary is not None and outputs.shape[-1] != vocabulary:
        warn(
            f"the model's outputs have {outputs.shape[-1]} entries per position, its input "
            f"embedding {vocabulary} tokens, and the labels are the inputs shifted: if the "
            "model returns a tuple whose first item is not the logits (hidden states first), "
            "the loss is taken of the wrong tensor. Pick the logits with "
            "Task.language_modeling(model, output_fn=lambda out: out[k])",
            Notice,
        )
    return None


def check_causal(
    call: Callable[[Any], Tensor], inputs: Any, outputs: Tensor, vocabulary: int | None = None
) -> str | None:
    """Why the model is not a causal language model, from one sequence's model inputs and
    outputs [1, T, V] (``call`` runs the model as the outputs were computed), or None.

    The sequence's last token (its last real one, under an ``attention_mask``) is replaced and
    the model run again: a causal model's logits at the earlier real positions do not move. A
    bidirectional model (a masked LM such as BERT) sees token t + 1 at position t, so its
    next-token loss, and every score built on it, measures nothing.
    """
    ids = _token_ids(inputs)
    if ids is None or ids.dim() != 2 or ids.shape[0] != 1 or outputs.dim() != 3:
        return None
    mask = _mask(inputs)
    if mask is None or mask.shape != ids.shape:
        real = torch.arange(ids.shape[1], device=ids.device)
    else:
        real = (mask[0] != 0).nonzero()[:, 0]
    if len(real) < 2:
        return None
    last = int(real[-1])
    changed = ids.clone()
    # another token of the vocabulary: the input embedding's, else the logits' (the labels are
    # the inputs shifted, so the two are one vocabulary)
    changed[0, last] = (changed[0, last] + 1) % (vocabulary or int(outputs.shape[-1]))
    probe = {**inputs, "input_ids": changed} if isinstance(inputs, dict) else changed
    with torch.no_grad():
        again = call(probe).detach()
    if again.shape != outputs.shape:
        return None
    earlier = real[:-1]  # the real positions only: a fully masked (padding) row may attend
    # anywhere in some implementations (uniformly, eager attention), but nothing scores it
    before = outputs[0, earlier].detach().to(torch.float64)
    if not (bool(torch.isfinite(before).all()) and bool(torch.isfinite(again[0, earlier]).all())):
        return None  # non-finite logits are refused by the finite check, which names the cause
    moved = float((again[0, earlier].to(torch.float64) - before).abs().max())
    scale = float(before.abs().max())
    if moved <= CAUSAL_TOLERANCE * scale:
        return None
    return (
        f"the model is not causal: changing the token at position {last} of the sequence "
        f"moved the logits of earlier positions by up to {moved:.3g} (the largest logit's size "
        f"{scale:.3g}). "
        "Task.language_modeling scores each position's logits against the next token, which "
        "a bidirectional model (a masked LM such as BERT) already sees: its scores measure "
        "nothing. Use a causal LM (...ForCausalLM), or pass a task of your own"
    )


def first_left_padded(inputs: Any) -> int | None:
    """The first sequence of a batch with padding before a token (``attention_mask`` 0 before
    a 1), or None."""
    mask = _mask(inputs)
    if mask is None or mask.dim() != 2 or mask.shape[1] < 2:
        return None
    real = mask != 0
    # padding before a token: a 0 followed, anywhere later, by a 1
    later = real.flip(1).cumsum(1).flip(1) > 0  # a token at or after each position
    before = (~real[:, :-1]) & later[:, 1:]
    rows = before.any(dim=1).nonzero()
    return int(rows[0, 0]) if len(rows) else None


def check_padding(
    call: Callable[[Any], Tensor],
    inputs: Any,
    outputs: Tensor,
    precision: torch.dtype | None = None,
    computed_positions: bool = False,
) -> str | None:
    """Why the padding of a left-padded sequence changes the logits of its tokens, from the
    sequence's model inputs and outputs [1, T, V] (``call`` runs the model as they were
    computed), or None; for outputs [1, C] or [1] (a classifier's or regressor's of the
    sequence), why it changes them. A model that cannot run the sequence unpadded (one of a
    fixed length) is not probed.

    The sequence is run again with its padding removed (its tokens only, mask all ones); a
    model that respects its mask gives its tokens the same logits, up to its rounding, which
    the same tokens padded on the right instead measure (a third run: the logits move when they
    differ by :data:`NOISE_MARGIN` times that, and by more than rounding in the outputs' dtype
    or ``precision``, the model's own: a bfloat16 model whose logits are cast to float32 rounds
    its positions' rotations as a bfloat16 one does). With ``computed_positions`` (a model
    without a learned position table: rotary positions, whose shift changes nothing in exact
    arithmetic), the unpadded sequence run at the padded one's positions measures the rounding
    of the shift too (a fourth run). One that counts positions
    from the first padding token (absolute position embeddings, GPT-2, unless the inputs carry
    ``position_ids``), or that reads the padding, does not: every loss and score of the
    sequence then depends on how much padding it has. Inputs with keys other than
    ``input_ids``, ``attention_mask``, ``position_ids`` and ``token_type_ids`` are not
    probed (what removing the padding means for them is not known).
    """
    ids, mask = _token_ids(inputs), _mask(inputs)
    if ids is None or mask is None or not isinstance(inputs, dict) or outputs.dim() > 3:
        return None
    # a language model's logits [1, T, V]; else the sequence's outputs, [1, C] or [1]
    per_position = outputs.dim() == 3
    if ids.dim() != 2 or ids.shape[0] != 1 or mask.shape != ids.shape:
        return None
    known = {"input_ids", "attention_mask", "position_ids", "token_type_ids"}
    if set(inputs) - known or first_left_padded(inputs) != 0:
        return None
    real = (mask[0] != 0).nonzero()[:, 0]
    if len(real) == 0:
        return None
    alone: dict[str, Any] = {}
    for key, value in inputs.items():
        if not isinstance(value, Tensor) or tuple(value.shape[:2]) != tuple(ids.shape):
            return None
        alone[key] = value[:, real]
    alone["attention_mask"] = torch.ones_like(alone["attention_mask"])
    # the same tokens padded on the right, as wide as the sequence: its logits differ from the
    # unpadded ones by the model's rounding only (in its own precision, whatever the logits')
    order = torch.cat([real, (mask[0] == 0).nonzero()[:, 0]])
    right = {key: value[:, order] for key, value in inputs.items()}
    if "position_ids" in inputs:  # the positions the inputs give, counted from the first token
        alone["position_ids"] = alone["position_ids"] - alone["position_ids"][:, :1]
        right["position_ids"] = (right["attention_mask"].cumsum(1) - 1).clamp_min(0)
    try:
        with torch.no_grad():
            again, shifted = call(alone).detach(), call(right).detach()
    except (RuntimeError, TypeError, ValueError, IndexError):  # a model of one length only
        return None
    if shifted.shape != outputs.shape or again.shape != (
        (1, len(real), outputs.shape[2]) if per_position else outputs.shape
    ):
        return None
    padded = (outputs[0, real] if per_position else outputs[0]).detach().to(torch.float64)
    unpadded = again[0].to(torch.float64)
    references = [(shifted[0, : len(real)] if per_position else shifted[0]).to(torch.float64)]
    if computed_positions:  # the padded sequence's positions, without its padding
        moved_on = {**alone, "position_ids": real.unsqueeze(0)}
        if "position_ids" in inputs:
            moved_on["position_ids"] = inputs["position_ids"][:, real]
        try:
            with torch.no_grad():
                references.append(call(moved_on).detach()[0].to(torch.float64))
        except (TypeError, RuntimeError, ValueError):  # a model that takes no position_ids
            pass
    if not all(bool(x.isfinite().all()) for x in (padded, unpadded, *references)):
        return None  # the outputs' own check names non-finite logits
    moved = float((padded - unpadded).abs().max())
    noise = max(float((r - unpadded).abs().max()) for r in references if r.shape == unpadded.shape)
    scale = float(unpadded.abs().max())
    dtypes = [d for d in (outputs.dtype, precision) if d is not None and d.is_floating_point]
    rounding = max((8 * torch.finfo(d).eps for d in dtypes), default=0.0)
    if moved <= max(max(CAUSAL_TOLERANCE, rounding) * max(scale, 1.0), NOISE_MARGIN * noise):
        return None
    pad = int(real[0])
    if not per_position:
        return (
            f"its {pad} padding positions before the first token change its outputs by up to "
            f"{moved:.3g} (the largest output's size {scale:.3g}) against the same sequence "
            "unpadded, so its loss and "
            "every score of it depend on how much padding it has: the model reads its padding "
            "(a BERT-style classifier pools its first position, a pad token under left "
            "padding) or counts absolute positions from the padding (GPT-2, unless the inputs "
            "carry position_ids counted from each sequence's first token). Pad on the right "
            "(tokenizer.padding_side = 'right')"
        )
    return (
        f"its {pad} padding positions before the first token change the logits of its tokens "
        f"by up to {moved:.3g} (the largest logit's size {scale:.3g}) against the same sequence "
        "unpadded, so its "
        "loss and every score of it depend on how much padding it has. A model with absolute "
        "position embeddings (GPT-2) counts positions from the first padding token unless the "
        "inputs carry position_ids: build the set with infkit.language_modeling.examples(ids, "
        "mask, position_ids=True); a model that reads its padding (one without attention-mask "
        "support) needs padding on the right (tokenizer.padding_side = 'right')"
    )


def check_model(
    call: Callable[[Any], Tensor],
    inputs: Any,
    outputs: Tensor,
    vocabulary: int | None = None,
    model: nn.Module | None = None,
) -> str | None:
    """Why a model is not a causal language model whose logits ignore padding
    (:func:`check_causal`, :func:`check_padding` at ``model``'s precision), from one sequence,
    or None."""
    precision = None if model is None else coarsest_dtype(model)
    # one embedding table, the tokens': positions are computed (rotary), not looked up
    computed = model is not None and sum(isinstance(m, nn.Embedding) for m in model.modules()) <= 1
    problems = [
        problem
        for problem in (
            check_causal(call, inputs, outputs, vocabulary),
            check_padding(call, inputs, outputs, precision, computed),
        )
        if problem is not None
    ]
    return "; and ".join(problems) or None


def check_labels(targets: Any, output_shape: tuple[int, ...]) -> tuple[int, str] | None:
    """Why a batch of token labels is unusable (the first bad sequence), or None: labels that
    are not integer ids [N, T] aligned with the logits, or a scored label outside the
    vocabulary. Whether the loss has a token to score is :func:`check_scored_labels`."""
    if len(output_shape) != 2:
        return 0, (
            f"a language model must return logits [B, T, V]; its outputs have per-example "
            f"shape {output_shape}"
        )
    length, vocabulary = output_shape
    if not isinstance(targets, Tensor):
        return 0, (
            f"labels must be a tensor of token ids [N, T], got {type(targets).__name__}; "
            "infkit.language_modeling.examples(input_ids) builds them"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        return 0, f"labels must be integer token ids, got dtype {targets.dtype}"
    if tuple(targets.shape[1:]) != (length,):
        return 0, (
            f"labels have per-example shape {tuple(targets.shape[1:])}, the logits {length} "
            "positions: labels are aligned with input_ids (the loss shifts them)"
        )
    y = targets.long()
    scored = y[:, 1:] != IGNORE_INDEX
    outside = scored & ((y[:, 1:] < 0) | (y[:, 1:] >= vocabulary))
    if bool(outside.any()):
        k = int(outside.any(dim=1).nonzero()[0, 0])
        bad = int(y[k, 1:][outside[k]][0])
        return k, (
            f"label {bad} is outside the vocabulary of {vocabulary} tokens, the last dimension "
            "of the model's outputs (and is not -100, the ignored label); if the model returns "
            "hidden states rather than logits (a Hugging Face ...Model without its head), use "
            "its ...ForCausalLM"
        )
    return None


def check_scored_labels(targets: Tensor) -> tuple[int, str] | None:
    """Why the next-token loss of a batch of (usable, :func:`check_labels`) labels [N, T] has
    nothing to score in some sequence (the first such), or None: a one-token sequence, or every
    label after position 0 -100. Its loss, and every score read through it, would be 0. A set
    read only through a custom measurement (queries of ``Task.with_measurement``) needs no
    scored label."""
    if targets.shape[1] == 1:
        return 0, (
            "the sequences are one token long, so they have no token to score: the loss "
            "predicts token t + 1 from the logits at position t, and a one-token sequence's "
            "loss and every score against it would be 0. Pass sequences of two tokens or more"
        )
    scored = targets[:, 1:] != IGNORE_INDEX
    if not bool(scored.any(dim=1).all()):
        k = int((~scored.any(dim=1)).nonzero()[0, 0])
        return k, (
            "the sequence has no token to score: every label after position 0 is -100, so its "
            "loss is 0 and every score against it would be 0. Drop it (or unmask its labels)"
        )
    return None


def vocabulary_size(model: nn.Module) -> int | None:
    """The number of token ids ``model`` embeds, or None when it has no ``nn.Embedding``.

    A Hugging Face model's input embedding (``get_input_embeddings()``) when it is an
    ``nn.Embedding``; otherwise the largest ``num_embeddings`` among the model's embeddings, so
    that an id is refused only when no embedding of the model could take it (a position
    embedding that comes first is not mistaken for the vocabulary).
    """
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            embedding = getter()
        except (AttributeError, NotImplementedError):  # a model without one
            embedding = None
        if isinstance(embedding, nn.Embedding):
            return int(embedding.num_embeddings)
    sizes = [int(m.num_embeddings) for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


def learned_positions(model: nn.Module) -> int | None:
    """How many positions a model with a learned position embedding takes (GPT-2's
    ``n_positions``, OPT's ``max_position_embeddings``), or None: its configuration's limit,
    when an ``nn.Embedding`` other than the input embedding has that many rows (OPT adds 2).
    Rotary and other computed positions have no such table and no hard limit."""
    config = getattr(model, "config", None)
    limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
    if not isinstance(limit, int) or getattr(config, "position_biased_input", True) is False:
        return None  # no absolute table (DeBERTa's relative positions: its table is theirs)
    getter = getattr(model, "get_input_embeddings", None)
    try:
        tokens = getter() if callable(getter) else None
    except (AttributeError, NotImplementedError):
        tokens = None
    tables = [
        m
        for name, m in model.named_modules()
        if isinstance(m, nn.Embedding) and m is not tokens and "rel_embeddings" not in name
    ]
    return limit if any(limit <= m.num_embeddings <= limit + 2 for m in tables) else None


def _token_ids(inputs: Any) -> Tensor | None:
    """The token ids of a batch of inputs: ``inputs["input_ids"]`` of dict inputs, or the
    inputs themselves when they are one integer tensor; None otherwise."""
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex():
        return None
    if ids.dtype == torch.bool or ids.dim() < 1:
        return None
    return ids


def _first_outside(ids: Tensor, size: int | None) -> tuple[int, int, int] | None:
    """The first id of a batch [B, ...] outside [0, size) (below 0 when ``size`` is None), as
    ``(example, position, id)`` with the position counted over the example's flattened ids, or
    None."""
    flat = ids.reshape(ids.shape[0], -1)
    outside = flat < 0 if size is None else (flat < 0) | (flat >= size)
    if not bool(outside.any()):
        return None
    k = int(outside.any(dim=1).nonzero()[0, 0])
    position = int(outside[k].nonzero()[0, 0])
    return k, position, int(flat[k, position])


def check_token_ids(inputs: Any, model: nn.Module) -> tuple[int, str] | None:
    """Why a batch's token ids cannot be embedded (the first bad sequence), or None.

    A token id must lie in [0, V), V the model's vocabulary (:func:`vocabulary_size`); beyond
    it an ``nn.Embedding`` fails with a bare ``IndexError`` on the CPU and a device-side assert
    on a GPU. Negative ids are refused even when V is unknown.
    """
    ids = _token_ids(inputs)
    if ids is None or ids.numel() == 0:
        return None
    vocabulary = vocabulary_size(model)
    found = _first_outside(ids, vocabulary)
    if found is None:
        return None
    k, position, bad = found
    where = "input_ids" if isinstance(inputs, dict) else "the token ids"
    if vocabulary is None:
        size = "token ids index an embedding and cannot be negative"
    else:
        size = (
            f"the model embeds {vocabulary} tokens (its input embedding's num_embeddings), "
            f"so ids must lie in [0, {vocabulary})"
        )
    if bad == IGNORE_INDEX:
        advice = (
            "-100 marks a label that is not scored, never an input: pad input_ids with a real "
            "token (the tokenizer's pad_token_id) and mark padding with attention_mask = 0"
        )
    else:
        advice = (
            "check that the tokenizer is the model's own (or resize the model's embeddings "
            "after adding tokens: model.resize_token_embeddings(len(tokenizer)))"
        )
    return (
        k,
        f"token id {bad} at position {position} of {where} is outside the vocabulary: {size}; {advice}",
    )


def _mask(inputs: Any) -> Tensor | None:
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    return mask if isinstance(mask, Tensor) else None


def check_inputs(
    inputs: Any, model: nn.Module, positions: int | None = None
) -> tuple[int, str] | None:
    """Why a batch of inputs cannot be fed to a language model (the first bad sequence), or
    None: token ids outside the vocabulary (:func:`check_token_ids`), sequences longer than
    the ``positions`` of a learned position embedding (:func:`learned_positions`), or an
    ``attention_mask`` whose shape is not that of ``input_ids`` (the model would broadcast or
    cut it silently) or that holds other values than 0 and 1 (:func:`_check_mask_values`)."""
    found = check_token_ids(inputs, model)
    if found is not None:
        return found
    ids, mask = _token_ids(inputs), _mask(inputs)
    if positions is not None and ids is not None and ids.dim() == 2:
        given = inputs.get("position_ids") if isinstance(inputs, dict) else None
        if isinstance(given, Tensor) and given.numel():  # the positions the model will read
            needed = given.reshape(given.shape[0], -1).amax(dim=1) + 1
        else:  # counted over every column, padding included
            needed = torch.full((ids.shape[0],), ids.shape[1], device=ids.device)
        if bool((needed > positions).any()):
            k = int((needed > positions).nonzero()[0, 0])
            return k, (
                f"it reads {int(needed[k])} positions, more than the {positions} the model's "
                "position embedding holds (its configuration's n_positions / "
                f"max_position_embeddings): truncate the sequences to {positions} tokens, e.g. "
                f"tokenizer(texts, truncation=True, max_length={positions}); when the padding "
                "makes them wider than that, give each its own positions "
                "(examples(..., position_ids=True))"
            )
    if ids is not None and mask is not None and tuple(mask.shape) != tuple(ids.shape):
        return WHOLE_BATCH, (
            f"attention_mask has shape {list(mask.shape)}, input_ids {list(ids.shape)}: the mask "
            "marks each position of input_ids (1 a token, 0 padding) and must have its shape"
        )
    if mask is not None and mask.numel():
        return _check_mask_values(mask)
    return None


def _check_mask_values(mask: Tensor) -> tuple[int, str] | None:
    """The first sequence of a [B, T] ``attention_mask`` holding a value other than 0 and 1
    (a weight, a count, or an additive mask of 0 and -inf), or None. Models read such values
    each their own way (as padding, as a token, or added to the attention scores), and infkit
    reads 0 as padding: the two would disagree without an error."""
    flat = mask.reshape(mask.shape[0], -1)
    other = (flat != 0) & (flat != 1)
    if not bool(other.any()):
        return None
    k = int(other.any(dim=1).nonzero()[0, 0])
    position = int(other[k].nonzero()[0, 0])
    return k, (
        f"attention_mask holds {flat[k, position].item()!r} at position {position}: it must "
        "hold 1 at a token and 0 at padding, as a tokenizer returns it (an additive mask of 0 "
        "and -inf, or weights, are the model's own business: give the tokenizer's 0/1 mask)"
    )


def check_encoder_inputs(
    inputs: Any, model: nn.Module, positions: int | None = None
) -> tuple[int, str] | None:
    """Why a batch of a classifier's (or regressor's) dict inputs holding ``input_ids``, as a
    Hugging Face encoder takes them, cannot be fed to it (the first bad example), or None:
    token ids outside the vocabulary (:func:`check_token_ids`), sequences beyond a learned
    position table of ``positions`` (:func:`learned_positions`), a [B, T] attention mask of
    another shape than the ids, and token type ids outside the model's ``type_vocab_size``,
    where the model would fail with a bare ``IndexError`` or a size mismatch. Inputs without
    ``input_ids`` are the model's own to read, and so are its other masks (a 4-D extended
    one)."""
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        return None
    mask = inputs.get("attention_mask")
    if isinstance(mask, Tensor) and (mask.dim() != 2 or _check_mask_values(mask) is not None):
        # the model's own kind of mask (4-D extended, or additive): not padding marks, as the
        # Kronecker methods say with a Notice (capture._padding_marks)
        inputs = {key: value for key, value in inputs.items() if key != "attention_mask"}
    return check_inputs(inputs, model, positions) or _check_token_types(inputs, model)


def _check_token_types(inputs: dict[str, Any], model: nn.Module) -> tuple[int, str] | None:
    """The first example whose ``token_type_ids`` lie outside [0, type_vocab_size) of the
    model's configuration (of it or of a module inside it), or None."""
    types = inputs.get("token_type_ids")
    if not isinstance(types, Tensor) or types.is_floating_point() or types.numel() == 0:
        return None
    limits = (getattr(getattr(m, "config", None), "type_vocab_size", None) for m in model.modules())
    limit = next((n for n in limits if isinstance(n, int)), None)
    if limit == 0:  # no token type embedding (DeBERTa's): the model ignores them
        return None
    found = _first_outside(types, limit)
    if found is None:
        return None
    k, position, bad = found
    size = "" if limit is None else f": the model has {limit} (its type_vocab_size)"
    return k, (
        f"token type id {bad} at position {position} of token_type_ids is "
        f"outside the model's token types{size}; pass the token_type_ids of the model's own tokenizer "
        "(0 for a single sentence), or leave them out"
    )


def check_label_pairs(
    inputs: Any, targets: Any, special: SpecialTokens | None = None
) -> tuple[int, str] | None:
    """Why a batch's labels disagree with its inputs (the first bad sequence), or None: labels
    scored at padding (:func:`check_masked_labels`), labels shifted already
    (:func:`check_shifted_labels`), or, a :class:`~infkit.errors.Suspicion` to warn of,
    padding without a mask (:func:`check_unmasked_padding`, the model's ``special`` tokens)."""
    return (
        check_masked_labels(inputs, targets)
        or check_shifted_labels(inputs, targets)
        or (None if special is None else check_unmasked_padding(inputs, targets, special))
    )


class SpecialTokens(NamedTuple):
    """The token ids of a model's configuration that mark padding and a sequence's ends:
    ``config.pad_token_id`` (or, where it names none, its one ``eos_token_id``, which
    ``named`` False says), and the ``bos_token_id`` and ``eos_token_id`` (empty when unset)."""

    pad: int
    bos: frozenset[int]
    eos: frozenset[int]
    named: bool = True

    def said(self) -> str:
        """The padding token as a message names it."""
        if self.named:
            return f"the model's pad token (config.pad_token_id = {self.pad})"
        return (
            f"the model's end token (config.eos_token_id = {self.pad}; its configuration names "
            "no pad token, and tokenizers pad with this one when tokenizer.pad_token = "
            "tokenizer.eos_token, GPT-2's and Llama's usual setting)"
        )


def _ids(value: Any) -> frozenset[int]:
    values = value if isinstance(value, (list, tuple)) else [value]
    return frozenset(int(v) for v in values if isinstance(v, int) and not isinstance(v, bool))


def special_tokens(model: nn.Module) -> SpecialTokens | None:
    """The padding and end tokens of a Hugging Face model's ``config``, or None when it names
    neither one ``pad_token_id`` nor one ``eos_token_id`` (a model that is not a Hugging Face
    one). GPT-2 and Llama name no pad token and are usually padded with their end token
    (``tokenizer.pad_token = tokenizer.eos_token``): that token then stands for the padding,
    counted from two on at either end (:func:`check_unmasked_padding`)."""
    config = getattr(model, "config", None)
    pad = _ids(getattr(config, "pad_token_id", None))
    bos = _ids(getattr(config, "bos_token_id", None))
    eos = _ids(getattr(config, "eos_token_id", None))
    if len(pad) == 1:
        return SpecialTokens(next(iter(pad)), bos, eos)
    if not pad and len(eos) == 1:
        return SpecialTokens(next(iter(eos)), bos, eos, named=False)
    return None


def check_unmasked_padding(
    inputs: Any, targets: Any, special: SpecialTokens
) -> tuple[int, Suspicion] | None:
    """The first sequence of a batch without an ``attention_mask`` that its model's pad token
    (``special.pad``) seems to pad, or None; a :class:`~infkit.errors.Suspicion` (a warning,
    as the pad token may be a real one: a configuration's ``pad_token_id = 0`` that is a
    word of GPT-2's vocabulary).

    Without a mask the model reads padding as tokens: left padding (the sequence starts with
    the pad token, a token other than it after) changes the logits of every token after it, and
    right padding whose labels are scored adds the prediction of the pad token to the loss;
    both move the loss and every score, silently (Hugging Face's models warn of the first).
    Right padding with labels of -100 changes nothing in a causal model and passes. A pad token
    that is also the model's first token (``bos``) is not read as left padding, and one that is
    also its last (``eos``, as when padding with it, or where the configuration names no pad
    token, :func:`special_tokens`) counts as padding from two on at either end, the first of a
    trailing run being the sequence's own end (scored or not).
    """
    ids = _token_ids(inputs)
    if _mask(inputs) is not None or ids is None or ids.dim() != 2 or ids.shape[1] < 2:
        return None
    labels = targets.long() if isinstance(targets, Tensor) else None
    if labels is not None and labels.shape != ids.shape:
        return None
    pad: Tensor = ids.eq(special.pad)
    # the leading and trailing runs of the pad token (a row of padding alone is neither)
    leading = pad.long().cumprod(dim=1).bool()
    trailing = pad.flip(1).long().cumprod(dim=1).flip(1).bool()
    has_token = ~pad.all(dim=1)
    # a pad token that is also an end token counts from two at either end: a sequence ends
    # with its own end token, and a packed one may start with the end of the document before
    ends = special.pad in special.eos
    left = (
        leading[:, 0]
        & has_token
        & (special.pad not in special.bos)
        & (leading.sum(dim=1) >= (2 if ends else 1))
    )
    scored = trailing & (labels != IGNORE_INDEX) if labels is not None else trailing.clone()
    if ends:  # the first of the trailing run is the sequence's own end, which it scores
        width = ids.shape[1]
        own = (width - trailing.sum(dim=1)).clamp(max=width - 1)
        scored[torch.arange(len(ids)), own] = False
    scored[:, 0] = False  # the first position is never a label
    enough = trailing.sum(dim=1) >= (2 if ends else 1)
    right = scored.any(dim=1) & enough & has_token
    bad = left | right
    if not bool(bad.any()):
        return None
    k = int(bad.nonzero()[0, 0])
    if bool(left[k]):
        n = int(leading[k].sum())
        what = (
            f"its first {n} tokens are {special.said()} and there is no attention_mask, so the "
            "model reads them as tokens and every logit after them changes"
        )
    else:
        n = int(trailing[k].sum())
        what = (
            f"its last {n} tokens are {special.said()}, scored, with no attention_mask, so its "
            "loss predicts the padding"
        )
    where = "its inputs" if isinstance(inputs, dict) else "the token ids"
    return k, Suspicion(
        f"{what}. Pass the tokenizer's attention_mask with {where} (1 a token, 0 padding: "
        "tokenizer(texts, padding=True, return_tensors='pt') returns it) and build the labels "
        "with infkit.language_modeling.examples(input_ids, attention_mask); if they are real "
        "tokens, pass inputs {'input_ids': ids, 'attention_mask': torch.ones_like(ids)}"
    )


def check_shifted_labels(inputs: Any, targets: Any) -> tuple[int, str] | None:
    """The first sequence of a batch whose labels are its ``input_ids`` shifted left by one
    (label t is token t + 1), when every sequence with two or more such labels has them so, or
    None.

    The loss shifts the labels itself (Hugging Face's convention), so pre-shifted labels would
    score each position against the token two ahead, silently. A sequence counts when it has
    at least two scored labels among its first T - 1, all equal to the next input token and
    not all equal to their own: a run of one repeated token is aligned either way.
    """
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else inputs
    if not isinstance(ids, Tensor) or not isinstance(targets, Tensor) or ids.dim() != 2:
        return None
    if targets.shape != ids.shape or ids.shape[1] < 3:
        return None
    labels = targets.long()
    scored = labels[:, :-1] != IGNORE_INDEX
    ahead = ((labels[:, :-1] == ids[:, 1:]) | ~scored).all(dim=1)
    own = ((labels[:, :-1] == ids[:, :-1]) | ~scored).all(dim=1)
    counted = scored.sum(dim=1) >= 2
    shifted = counted & ahead & ~own
    if not bool(shifted.any()) or bool((counted & ~shifted).any()):
        return None
    k = int(shifted.nonzero()[0, 0])
    return k, (
        "its labels are its input_ids shifted left by one (label t is token t + 1), but the "
        "language-modelling loss shifts them itself (Hugging Face's convention): pass labels "
        "aligned with input_ids (labels = input_ids, -100 where a token is not scored); "
        "infkit.language_modeling.examples(input_ids, attention_mask) builds them"
    )


def check_masked_labels(inputs: Any, targets: Any) -> tuple[int, str] | None:
    """Why a batch's labels disagree with its ``attention_mask`` (the first bad sequence), or
    None.

    Label ``t + 1`` is predicted from the logits of position ``t``; it may be scored (not -100)
    only when both positions are tokens. A scored label at padding predicts the pad token, and
    one right after padding (the first token of a left-padded sequence) is predicted from the
    logits of a padding position: both change the loss, silently, by what the padding is.
    """
    mask = _mask(inputs)
    if mask is None or not isinstance(targets, Tensor) or mask.dim() != 2:
        return None
    if targets.shape != mask.shape or mask.shape[1] < 2:
        return None
    scored = targets[:, 1:].long() != IGNORE_INDEX
    token = mask != 0
    bad = scored & ~(token[:, 1:] & token[:, :-1])
    if not bool(bad.any()):
        return None
    k = int(bad.any(dim=1).nonzero()[0, 0])
    t = int(bad[k].nonzero()[0, 0]) + 1
    where = (
        "attention_mask is 0 there (padding)"
        if not bool(token[k, t])
        else f"it follows padding (attention_mask is 0 at position {t - 1}, as in left padding), "
        "so it would be predicted from the logits of a padding position"
    )
    return k, (
        f"the label at position {t} is scored (not -100) but {where}. Set labels to -100 at "
        "padding and at the first token after it; infkit.language_modeling.examples(input_ids, "
        "attention_mask) builds such labels"
    )


def _stacked(rows: Any, name: str) -> Any:
    """A list of sequences (tensors or lists) of one length as an [N, T] tensor; sequences of
    several lengths are refused with what to do. Anything else is returned as it is."""
    if not isinstance(rows, (list, tuple)) or not rows:
        return rows
    if not all(isinstance(x, (Tensor, list, tuple)) for x in rows):
        return rows
    lengths = sorted({len(x) for x in rows})
    if len(lengths) > 1:
        raise InvalidInputError(
            f"{name} holds sequences of {len(lengths)} lengths ({lengths[0]} to "
            f"{lengths[-1]} tokens): pad them to one length [N, T] and pass attention_mask "
            "(1 for a token, 0 for padding), e.g. tokenizer(texts, padding=True, "
            "return_tensors='pt')"
        )
    return torch.stack([torch.as_tensor(x) for x in rows])


def examples(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    prompt_lengths: Tensor | list[int] | int | None = None,
    position_ids: bool = False,
    allow_unscored: bool = False,
) -> tuple[dict[str, Tensor], Tensor]:
    """An ``(inputs, labels)`` pair for :meth:`infkit.Task.language_modeling`.

    Labels are the input ids, with -100 at padding (``attention_mask == 0``) and at a token
    that follows padding (the first token of a left-padded sequence: nothing but padding
    predicts it, as nothing predicts the first token of an unpadded one), and, for completions,
    at the first ``prompt_lengths[i]`` tokens of sequence i (one integer: the same prompt
    length for every sequence), counted from its first token (after any left padding), so that
    only the completion's tokens are scored. A sequence padded on
    either side then has the loss and scores of the same sequence unpadded, with a model that
    respects its mask and, under left padding, positions counted from each sequence's first
    token: with ``position_ids=True`` the inputs carry them (``attention_mask.cumsum(1) - 1``,
    0 at padding), which models with absolute position embeddings (GPT-2) need under left
    padding; rotary ones (Llama) do not, and take them too. ``allow_unscored=True`` keeps
    sequences with no scored token (labels all -100, a sequence of one token): queries read only
    through a custom measurement (``task.with_measurement(fn, higher_is_better=True)``, the
    logit of a chosen token at the last position say) need none; read through the loss they are refused when scored.

    Raises:
        InvalidInputError: ids that are not an integer [N, T] tensor (or a list of sequences
            of several lengths), a mask of another shape, prompt lengths that are not N
            integers that leave each sequence at least one position after its prompt, or a
            sequence left with no scored token after its first (the first token is never a
            label: nothing predicts it).
    """
    input_ids = _stacked(input_ids, "input_ids")
    if attention_mask is not None:
        attention_mask = _stacked(attention_mask, "attention_mask")
    ids = torch.as_tensor(input_ids)
    if ids.dim() != 2:
        raise InvalidInputError(f"input_ids must be [N, T], got shape {tuple(ids.shape)}")
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise InvalidInputError(
            f"input_ids must hold integer token ids, got dtype {ids.dtype}: pass the "
            "tokenizer's ids (e.g. ids.long())"
        )
    n, t = ids.shape
    labels = ids.clone().long()
    inputs = {"input_ids": ids}
    start = torch.zeros(n, dtype=torch.long)  # each sequence's first token
    if attention_mask is not None:
        mask = torch.as_tensor(attention_mask)
        if tuple(mask.shape) != (n, t):
            raise InvalidInputError(
                f"attention_mask must have the shape of input_ids, [{n}, {t}], got "
                f"{list(mask.shape)}"
            )
        found = _check_mask_values(mask)
        if found is not None:
            raise InvalidInputError(f"example {found[0]}: {found[1]}")
        padding = mask == 0
        labels[padding] = IGNORE_INDEX
        labels[:, 1:][padding[:, :-1]] = IGNORE_INDEX  # predicted from a padding position
        inputs["attention_mask"] = mask
        start = (~padding).long().argmax(dim=1)  # after the left padding, if any
        if position_ids:
            inputs["position_ids"] = ((~padding).long().cumsum(1) - 1).clamp_min(0)
    elif position_ids:
        inputs["position_ids"] = torch.arange(t).expand(n, t).clone()
    if prompt_lengths is not None:
        given = torch.as_tensor(prompt_lengths)
        # (one integer, not in a list: the one prompt length of every sequence)
        lengths = given.expand(n) if given.dim() == 0 else given.reshape(-1)
        if len(lengths) != n or lengths.is_floating_point() or lengths.dtype == torch.bool:
            raise InvalidInputError(
                f"prompt_lengths must be {n} integers, one per sequence (or one integer for "
                f"all), got {len(lengths)} of dtype {lengths.dtype}"
            )
        # a prompt leaves the sequence's last scored position (a label after position 0; a
        # tester's 6 tokens padded to 16 were told [0, 15], where 6 to 15 then failed as "no
        # token to score"); a sequence with none is refused below
        scored = labels != IGNORE_INDEX
        scored[:, 0] = False
        last = torch.where(scored, torch.arange(t), -1).amax(dim=1)
        room = last - start
        outside = (last >= 0) & ((lengths < 0) | (lengths > room))
        if bool(outside.any()):
            i = int(outside.nonzero()[0, 0])
            raise InvalidInputError(
                f"prompt_lengths[{i}] = {int(lengths[i])} is not in [0, {int(room[i])}]: a "
                f"prompt must leave the sequence's last scored token (position {int(last[i])}, "
                f"{int(room[i])} after its first) to score as the completion"
            )
        positions = torch.arange(t).unsqueeze(0)
        labels[positions < (start + lengths).unsqueeze(1)] = IGNORE_INDEX
    unscored = (
        (labels[:, 1:] == IGNORE_INDEX).all(dim=1) if t > 1 else torch.ones(n, dtype=torch.bool)
    )
    if bool(unscored.any()) and not allow_unscored:
        i = int(unscored.nonzero()[0, 0])
        masks = [
            name
            for name, given in (
                ("attention_mask", attention_mask),
                ("prompt length", prompt_lengths),
            )
            if given is not None
        ]
        cause = (
            "it has one token, which nothing predicts"
            if t == 1
            else f"every label after position 0 is masked (by its {' or '.join(masks)})"
        )
        raise InvalidInputError(
            f"sequence {i} has no token to score: {cause}, so its loss is 0 and every score "
            "against it would be 0. Drop it"
            + (", or shorten its prompt" if prompt_lengths is not None else "")
            + "; a query read only through a custom measurement (task.with_measurement(fn, "
            "higher_is_better=True) for a logit) needs no scored token: pass allow_unscored=True"
        )
    return inputs, labels
