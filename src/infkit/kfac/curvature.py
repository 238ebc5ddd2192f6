"""The fitted Kronecker-factored curvature: K-FAC or EK-FAC blocks, inverted in their eigenbasis.

Each tracked layer (``nn.Linear``, ``nn.Conv2d``, ``nn.Conv1d``, Hugging Face ``Conv1D``; weight
and bias as one augmented block ``[W | b]``) gets the curvature ``S (x) A`` of :mod:`infkit.kfac.factors`, which
approximates that layer's block of the mean-form GGN ``(1/N) sum_i J_i^T Lambda_i J_i``. Blocks
are independent. :meth:`KroneckerCurvature.solve` rotates each block of a flat vector into the
Kronecker eigenbasis, divides by the eigenvalues plus the ridge and rotates back
(docs/methods/kfac.md):

    (G_l + r I)^{-1} V = Q_S [ (Q_S^T V Q_A) / (Lambda + r) ] Q_A^T,   r = l2 + damping + shift
                                                                          (+ the module damping)

with ``Lambda = lambda_S lambda_A^T`` (K-FAC) or the EK-FAC eigenvalues (``corrected``).

The methods ``kfac`` and ``ekfac`` are this curvature; ``astra`` uses it (EK-FAC) as the
preconditioner of an iteration; the Kronecker analyses (:mod:`infkit.analyses`) read its
eigenbases. Factors can be saved and reloaded (``factors_dir``): they are an artifact
(:mod:`infkit.store`) keyed by everything they depend on (model, task, full data content, tracked
layers, the Fisher mode and its sampling, dtype), checksummed and committed atomically; a
directory holding factors for another computation raises rather than serving stale factors.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from infkit.data import ExampleSet
from infkit.distributed import STORE_HINT, agree
from infkit.errors import (
    ArtifactError,
    ArtifactRemovedError,
    CurvatureError,
    Notice,
    UnsupportedError,
    listed,
    warn,
)
from infkit.fingerprint import (
    callable_identity,
    data_fingerprint,
    model_fingerprint,
    task_fingerprint,
)
from infkit.fitted import Fitted
from infkit.gradients import PerExample
from infkit.kfac.factors import FactorFitter, Fisher, KroneckerFactors
from infkit.layers.capture import (
    ROW_PROBE_EXAMPLES,
    block_gradient,
    check_rows_follow_examples,
    layer_terms,
)
from infkit.layers.outside import uses_outside_calls
from infkit.layers.tracked import (
    SUPPORTED,
    TrackedLayers,
    TrackedModule,
    augmented_block,
    kinds_of,
    layer_kind,
    tied_layers,
)
from infkit.memory import bounded, release_freed_memory
from infkit.options import Options, option
from infkit.parameters import ParameterSpace, dtype_name, evaluation_mode
from infkit.progress import Mode
from infkit.store import Artifact, ArtifactStore, differences, tensors_file

#: the artifact kind of saved factors
FACTORS = "kronecker-factors"

logger = logging.getLogger("infkit")

#: kronfluence's HEURISTIC_DAMPING_SCALE (docs/methods/kfac.md)
HEURISTIC_DAMPING_SCALE = 0.1


@dataclasses.dataclass(frozen=True)
class KroneckerOptions(Options):
    """Options of the Kronecker-factored curvature (methods ``kfac``, ``ekfac``, ``astra``)."""

    fisher: Fisher = option(
        "auto",
        "source of the gradient factor: 'ggn' (exact, deterministic), 'sampled' (true Fisher), "
        "'empirical' (true labels), 'auto' ('ggn' up to max_exact_outputs outputs)",
    )
    samples: int = option(1, "labels drawn per example for fisher='sampled'", minimum=1)
    seed: int = option(0, "seed of the label sampler")
    sample_targets: Callable[..., Any] | None = option(
        None, "fn(outputs, targets, generator) -> targets drawing labels from the model"
    )
    max_exact_outputs: int = option(
        64, "fisher='auto' uses the exact GGN up to this many outputs per example", minimum=1
    )
    damping_scale: float | Literal["auto"] | None = option(
        None,
        "per-module heuristic damping damping_scale x mean(eigenvalues) added to the ridge "
        "('auto' = 0.1, kronfluence's)",
        minimum=0,
    )
    modules: Sequence[str] | None = option(None, "names of the layers to track (default: all)")
    unsupported: Literal["skip", "error", "identity"] = option(
        "skip",
        "trainable parameters outside tracked layers: leave them out of the attribution (with "
        "a notice naming them), refuse, or keep them with only the l2 + damping ridge",
    )
    mask_key: str | None = option(
        "attention_mask", "key of the attention mask in dict inputs ([B, T], 1 = real token)"
    )
    factors_dir: str | Path | None = option(
        None, "directory to save the factors to, or to load them from when they match this fit"
    )
    overwrite: bool = option(
        False,
        "refit and overwrite the factors in factors_dir (in a workdir: the preconditioned "
        "queries and score shards too, damaged ones included; for one run: drop it to resume "
        "or to assemble an array job's shards)",
    )
    query_rank: int | None = option(
        None,
        "rank per layer of the preconditioned query gradients (None: full rank, in groups of "
        "queries and layers that fit memory_limit, a pass each; the largest rank that fits when "
        "one layer of one query does not, in groups of queries at rank 1 when not all fit)",
        minimum=1,
    )
    queries_on_disk: bool | None = option(
        None,
        "keep the preconditioned queries that do not fit memory_limit on disk and read them "
        "back layer by layer in one scoring pass, instead of a pass over the data per group of "
        "queries (None: on CPU with a workdir or factors_dir, where a pass costs more than the "
        "reads; True: also on GPUs, in the system's temporary directory without either; False: "
        "never)",
    )
    shard_batches: int = option(
        16,
        "batches of training examples per score shard committed to the facade's workdir (a "
        "resumed run recomputes at most one shard's worth per process)",
        minimum=1,
    )
    cache_bytes: int = option(
        1 << 30,
        "memory for keeping the first pass's activations for the EK-FAC pass (at most a "
        "quarter of memory_limit)",
        minimum=0,
    )

    @property
    def module_damping_scale(self) -> float:
        """The per-module heuristic scale as a number (0 for none)."""
        if self.damping_scale == "auto":
            return HEURISTIC_DAMPING_SCALE
        return float(self.damping_scale or 0.0)

    def unread(self, given: frozenset[str]) -> dict[str, str]:
        """The label sampler's ``samples`` and ``sample_targets`` with a ``fisher`` that draws
        no labels (not ``seed``, a reproducibility setting a script passes whatever it runs:
        one options dict for a sweep over ``fisher``, a test's)."""
        found = super().unread(given)
        if self.fisher in ("ggn", "empirical"):
            found |= {
                name: f"option {name!r} is read by fisher='sampled' (or 'auto' where it "
                f"samples), not by fisher={self.fisher!r}"
                for name in ("samples", "sample_targets")
                if name in given
            }
        return found

    def shared_record(self) -> dict[str, Any]:
        """:meth:`record` less where each process keeps its factors (``factors_dir``): the
        options every process of a run must share (:func:`infkit.distributed.agree`)."""
        return {k: v for k, v in self.record().items() if k != "factors_dir"}


#: the fields of :class:`KroneckerOptions`, for methods whose options extend it
KRONECKER_FIELDS = tuple(f.name for f in dataclasses.fields(KroneckerOptions))


def kronecker_layers(
    model: nn.Module, space: ParameterSpace, options: KroneckerOptions, owner: str
) -> TrackedLayers:
    """The layers the options track in ``model``, or an error naming what cannot be factored.

    Needs no data: it runs when ``Influence(...)`` is constructed.
    """
    modules = None if options.modules is None else list(options.modules)
    layers = TrackedLayers.of(model, space, modules, options.mask_key)
    if not layers.tracked:
        raise UnsupportedError(
            f"method {owner!r} found no trainable layer it can factor ({SUPPORTED}); "
            "use another method (e.g. 'cg')"
        )
    others = layers.others
    if others and options.unsupported == "error":
        shown = _left_out(model, others)
        raise UnsupportedError(
            f"method {owner!r} factors {SUPPORTED} layers only, each applied by its own "
            f"calls; these trainable parameters are not in a layer it tracks: {shown}. Freeze "
            "them (requires_grad=False) to attribute through the supported layers only, or pass "
            "unsupported='identity' to give them no data curvature (only the l2 + damping "
            "ridge)"
        )
    return layers


def attributed_parameters(
    model: nn.Module, space: ParameterSpace, options: KroneckerOptions, owner: str
) -> list[str] | None:
    """With ``unsupported="skip"``: the parameters of the tracked layers, after a notice naming
    the trainable parameters left out of the attribution (None when nothing is left out)."""
    layers = kronecker_layers(model, space, options, owner)
    if options.unsupported != "skip" or not layers.others:
        return None
    others = layers.others
    shown = _left_out(model, others)
    warn(
        f"method {owner!r} attributes through the {len(layers.tracked)} "
        f"{kinds_of(layers.tracked)} layers it factors and leaves {len(others)} trainable parameter tensors out of the attribution, "
        f"as if frozen: {shown} (unsupported='error' refuses instead, 'identity' keeps them "
        "with only the ridge)",
        Notice,
    )
    names = []
    for t in layers.tracked:
        names.append(t.weight)
        if t.bias is not None:
            names.append(t.bias)
    return names


#: training examples of :func:`check_hooks_see_every_use` (those of the rows' check)
HOOK_CHECK_EXAMPLES = ROW_PROBE_EXAMPLES


def check_hooks_see_every_use(fitted: Fitted, layers: TrackedLayers, owner: str) -> None:
    """Refuse tracked layers whose weight the forward pass also uses outside the layer's own
    calls (``F.linear(h, layer.weight.t())``, a parent module applying it): their hooks see only
    their own calls, so their factors and per-example gradients miss the rest, and the scores
    of a pass that takes gradients from the hooks differ from one that takes them by autograd
    (a tester's tied MLP: 0.23 apart, with and without a workdir). Static checks find weights
    that two modules hold (:func:`~infkit.layers.tracked.tied_layers`), not a use in code.

    On the first :data:`HOOK_CHECK_EXAMPLES` training examples, each layer's gradient of their
    summed loss from its hooks (``sum_j sum_t Ds_jt a_jt^T``) is compared with autograd's, from
    a pass in the same precision (under the task's autocast, as the terms'); a relative
    difference above ``min(0.3, 10 sqrt(eps))`` of the terms' precision is refused. That pass's
    graph is read too (:func:`~infkit.layers.outside.uses_outside_calls`): a tracked weight
    taken in the loss's graph by a node none of its layer's calls made is refused, whatever
    values flow through that use there (a use the first examples' data leave at zero shows in no
    gradient).
    """
    engine = fitted.engine
    batch = fitted.train.take(range(min(HOOK_CHECK_EXAMPLES, fitted.n)))
    # rows that do not follow the examples are refused first, by name: the terms below would
    # fail on them with a vaguer message
    check_rows_follow_examples(engine, layers.tracked, batch, layers.mask_key)
    terms = layer_terms(engine, layers.tracked, batch, "loss", layers.mask_key)
    task = engine.task
    params = dict(task.model.named_parameters())
    names = [n for t in layers.tracked for n in (t.weight, t.bias) if n is not None]
    # (under autocast, as the terms' passes ran: a float32 pass beside the terms' bfloat16
    # ones differed by the whole passes' rounding, 0.38 and 0.42 of a trained Llama's query
    # and key projections, refused as a use outside their calls)
    losses: list[Tensor] = []

    def loss_of_batch() -> Tensor:
        losses.append(task.checked_loss(task.call_model(task.model, inputs), targets).sum())
        return losses[-1]

    # the uses themselves, read from a pass's graph: a use the first examples' values leave at
    # zero shows in no gradient (a tester's gated F.linear, 34% off); outside autocast, whose
    # cached cast of a weight is one node for the layer's call and a use beside it (a
    # reviewer's, unseen under dtype=torch.bfloat16: 0.52 off)
    with evaluation_mode(task.model), torch.enable_grad():
        inputs, targets = engine.prepare(batch)
        outside = uses_outside_calls(task.model, layers.tracked, loss_of_batch)
        if task.autocast is not None:
            with task.mixed_precision():  # (the terms' precision, for the gradients below)
                loss_of_batch()
        grads = torch.autograd.grad(losses[-1], [params[n] for n in names], allow_unused=True)

    by_name = dict(zip(names, grads))
    _warn_unreached(fitted, layers, by_name, len(batch), owner)

    def grad_of(name: str) -> Tensor:  # [1, numel], zeros where the loss does not reach it
        g = by_name[name]
        return (g if g is not None else torch.zeros_like(params[name])).detach().reshape(1, -1)

    missed = [f"{name!r} ({uses})" for name, uses in outside.items()]
    for t in layers.tracked:
        if t.name in outside:
            continue
        a, ds = terms[t.name]
        hooks = block_gradient(a, ds).sum(0)
        # layer by layer: no [P] vector of the whole model (a float64 one is 8 GB at 1B)
        bias = None if t.bias is None else grad_of(t.bias)
        autograd = augmented_block(t, grad_of(t.weight), bias)[0].to(hooks)
        coarsest = max(torch.finfo(a.dtype).eps, torch.finfo(ds.dtype).eps)
        # (passes of one precision read 0.003 at most by rounding, bfloat16 LoRA included; a
        # bfloat16 pass beside a float32 one 0.06 to 1)
        tolerance = min(0.3, 10 * coarsest**0.5)
        gap = float((hooks - autograd).norm())
        if gap > tolerance * float(autograd.norm()) and gap > 0:
            missed.append(f"{t.name!r} ({gap / max(float(autograd.norm()), 1e-300):.2g})")
    if missed:
        raise UnsupportedError(
            f"method {owner!r}: the weights of the tracked layer(s) {listed(missed, 5)} take part "
            "in the forward pass outside the layers' own calls (in brackets, their uses in the "
            "autograd graph of the first training examples' loss that no call of the layer made, "
            "or the relative gap between the gradient their hooks see and autograd's there), as "
            "with F.linear(h, layer.weight.t()) or a parent module applying the "
            "weight itself: the hooks see only the layer's calls, so its Kronecker factors and "
            "gradients would be wrong. Leave those layers out (modules= the others), freeze "
            "them (requires_grad=False), or use a method that takes gradients by autograd "
            "(astra, cg, exact)"
        )


def _warn_unreached(
    fitted: Fitted,
    layers: TrackedLayers,
    grads: Mapping[str, Tensor | None],
    examples: int,
    owner: str,
) -> None:
    """Warn, before any pass, of tracked layers whose output the loss does not reach on the
    first examples (autograd finds no path: a pooler whose output the head does not read) where
    nothing damps them: if no example reaches them, their factors are 0 and the fit ends in
    :meth:`KroneckerCurvature._check_conditioning`'s refusal (a tester's MiniLM pooler, after
    21 s of passes). A warning, not a refusal: a layer that only some examples reach (an
    expert a router did not pick) has curvature from those."""
    if fitted.ridge > 0:
        return
    unreached = [
        repr(t.name)
        for t in layers.tracked
        if all(grads[n] is None for n in (t.weight, t.bias) if n is not None)
    ]
    if unreached:
        warn(
            f"method {owner!r}: the output of the tracked layer(s) {listed(unreached, 5)} does "
            f"not reach the loss on the first {examples} training examples (a pooler or head "
            "whose output the model's outputs do not read). If no example reaches them, their "
            "curvature is 0 and, with l2 + damping = 0 (damping='auto' scales with each "
            "layer's own curvature), the fit will stop at its end with a CurvatureError: leave "
            "them out (modules=...) or freeze them (requires_grad=False) before fitting, or "
            "give a number (damping=1e-3)"
        )


def _left_out(model: nn.Module, others: list[str]) -> str:
    """The trainable parameters outside the tracked layers, named, and why layers of a kind the
    Kronecker methods factor are among them (a weight another module uses, a frozen weight
    beside a trainable bias, groups, TorchScript): for the notice of ``unsupported="skip"`` and
    the refusal of ``"error"`` alike (a tester's refusal named an nn.Linear's tied weight as
    outside the nn.Linear layers it factors, the reason told by the notice only)."""
    shown = listed(others, 6)
    tied = tied_layers(model)
    if tied:
        shown += "; not tracked because another module uses their weights: " + ", ".join(
            f"{name!r} (with {', '.join(map(repr, users))})" for name, users in tied.items()
        )
    reasons = _why_left_out(model, others)
    if reasons:
        shown += "; " + "; ".join(reasons)
    scripted = [
        name
        for name, module in model.named_modules()
        if name
        and isinstance(module, torch.jit.ScriptModule)
        and any(other.startswith(name + ".") for other in others)
    ]
    outermost = [n for n in scripted if not any(n.startswith(m + ".") for m in scripted)]
    if outermost:
        shown += (
            "; inside TorchScript modules, whose layers take no hooks: "
            f"{listed([repr(n) for n in outermost], 3)} "
            "(give the model the Python modules they were scripted from to factor them)"
        )
    return shown


def _why_left_out(model: nn.Module, others: list[str]) -> list[str]:
    """Why the layers holding ``others`` are left out: of a kind the Kronecker methods factor, a
    frozen weight beside a trainable bias (a layer's factors cover its weight and bias
    together) or grouped convolutions; else their kind, which they do not factor (a tester's
    ConvTranspose2d and Conv3d were named without a reason). Each with the layers' names."""
    left = set(others)
    frozen, grouped, kinds, parametrized = [], [], [], []
    for name, module in model.named_modules():
        own = {f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)}
        if not own & left:
            continue
        if isinstance(module, parametrize.ParametrizationList):  # (a reviewer's read its kind)
            parametrized.append(repr(name.rsplit(".parametrizations.", 1)[0]))
            continue
        if layer_kind(module) is None:
            kinds.append(f"{name!r} ({type(module).__name__})")
            continue
        if isinstance(module, (nn.Conv2d, nn.Conv1d)) and module.groups != 1:
            grouped.append(repr(name))
        elif not module.weight.requires_grad:
            frozen.append(repr(name))
    reasons = []
    if frozen:
        reasons.append(
            f"with a frozen weight, the trainable bias of {listed(frozen, 3)} (a layer's "
            "factors cover its weight and bias together)"
        )
    if grouped:
        reasons.append(f"grouped convolutions (groups > 1): {listed(grouped, 3)}")
    if kinds:
        reasons.append(f"layers of kinds they do not factor: {listed(kinds, 4)}")
    if parametrized:
        reasons.append(
            "weights computed by torch.nn.utils.parametrize (their layers' hooks see the "
            f"computed weight, not the parameters): {listed(parametrized, 3)}"
        )
    return reasons


def rotated_blocks(a: Tensor, ds: Tensor, QS: Tensor, QA: Tensor, dtype: torch.dtype) -> Tensor:
    """``Q_S^T G_j Q_A`` [B, d_out, cols] of the blocks ``G_j = sum_t Ds_jt a_jt^T``, in the
    cheaper order: each position's terms rotated first (``T (d_out^2 + cols^2)`` products per
    example, fewer for short sequences) or the block formed first (``d_out cols (d_out + cols)``).
    """
    t, d_out, cols = a.shape[1], ds.shape[-1], a.shape[-1]
    if t * (d_out**2 + cols**2) < d_out * cols * (d_out + cols):
        return (ds.to(dtype) @ QS).transpose(-1, -2) @ (a.to(dtype) @ QA)
    return QS.T @ block_gradient(a, ds, dtype) @ QA


class KroneckerCurvature:
    """Layerwise ``S (x) A`` blocks of the damped GGN, fitted (or loaded) on a training set.

    Args:
        fitted: the fitted record (training data, objective, engine).
        options: the Kronecker options.
        corrected: use the EK-FAC eigenvalues (an extra pass over the data) instead of K-FAC's.
        owner: the method's name, for messages and saved metadata.
        factors: factors fitted before (:meth:`restored`): taken as they are, with no pass over
            the data and no access to ``factors_dir``.
    """

    def __init__(
        self,
        fitted: Fitted,
        options: KroneckerOptions,
        *,
        corrected: bool,
        owner: str,
        factors: KroneckerFactors | None = None,
    ) -> None:
        self.fitted = fitted
        self.options = options
        self.corrected = corrected
        self.owner = owner
        self.layers = kronecker_layers(fitted.task.model, fitted.space, options, owner)
        self.loaded = False
        #: whether an interrupted EK-FAC fit resumed from its committed K-FAC stage
        self.resumed = False
        #: where the factors are committed (the store, and the identities whose artifact holds
        #: them, in order): they can be set aside (:meth:`set_aside`) and read back from there
        self._source: tuple[ArtifactStore, list[dict[str, Any]]] | None = None
        self._factors: KroneckerFactors | None = self._load_or_fit() if factors is None else factors
        #: the Fisher the factors were fitted with (kept: describe() need not read them back)
        self.fisher: Fisher = self.factors.meta["fisher"]
        #: positions per example each layer's factor A counted (kept: a scoring pass's memory
        #: is sized by them, and the data's shape need not tell them: a signal [B, C, L])
        self.positions = {
            name: f.tokens / max(fitted.n, 1) for name, f in self.factors.modules.items()
        }
        scale = options.module_damping_scale
        self.module_damping = {
            t.name: float(scale * self.eigenvalues(t.name).mean()) for t in self.tracked
        }
        self._check_conditioning()

    @property
    def factors(self) -> KroneckerFactors:
        """The fitted (or loaded) factors; read back from their store, verified, when they
        were set aside (:meth:`set_aside`).

        Raises:
            ArtifactError: set-aside factors were removed or damaged meanwhile.
        """
        if self._factors is None:
            assert self._source is not None
            store, identities = self._source
            for identity in identities:
                artifact = store.load(FACTORS, identity)
                if artifact is not None:
                    self._factors = self._from_artifact(artifact)
                    break
            else:
                raise ArtifactError(
                    f"the Kronecker factors committed in {store.root} were removed after they "
                    "were set aside for a scoring pass (a later fit with overwrite=True in this "
                    "workdir, another run's or this Influence's own refit when this one was made "
                    "by with_estimator or is a removal effect's, or the directory deleted): fit "
                    "again, and keep the directory for the run's length"
                )
        return self._factors

    @property
    def sets_aside(self) -> bool:
        """Whether :meth:`set_aside` drops the factors (they are committed in a store)."""
        return self._source is not None

    def set_aside(self) -> None:
        """Leave the factors on disk only, until they are next read (:attr:`factors`).

        For a pass that does not read them: the scoring pass reads the preconditioned queries
        and the model, not the factors (two eigenbases and the eigenvalues of every tracked
        layer: 137 MiB on bench_lm's small model, a sixth of a plain training step's peak).
        When they are committed in ``factors_dir`` (or the workdir), the in-memory copy is
        dropped; the next use reads it back, after the pass has let the queries go, verified
        against its checksums as any reuse is. Without a store this does nothing.
        """
        if self._source is not None and self._factors is not None:
            self._factors = None
            release_freed_memory()

    def _check_conditioning(self) -> None:
        """Refuse a damped curvature that is singular in the precision of its products.

        A layer whose smallest damped eigenvalue is at most the product dtype's epsilon times
        its largest (an output layer's softmax-shift direction has an EK-FAC eigenvalue near 0)
        divides rounding noise by that eigenvalue: without damping its scores come out
        several times too large and uncorrelated with the damped ones, with nothing to show it.

        Raises:
            CurvatureError: naming the layer, its eigenvalues and what to add.
        """
        ridges = self.ridges()
        for t in self.tracked:
            values = self.eigenvalues(t.name)
            eps = torch.finfo(values.dtype).eps
            damped = values + ridges[t.name]
            low, high = float(damped.min()), float(damped.max())
            if float(values.abs().max()) == 0 and low <= 0:
                auto = (
                    "damping='auto' scales with each layer's mean eigenvalue, 0 here: "
                    if self.options.module_damping_scale > 0
                    else ""
                )
                raise CurvatureError(
                    f"layer {t.name!r} has no curvature at all (every eigenvalue of its factors is "
                    "0): its output does not change the scored outputs, so its gradients are 0 "
                    "(a fresh LoRA adapter's lora_A while lora_B = 0; a layer whose every label "
                    f"is ignored). {auto}leave the layer out (modules=...), attribute after "
                    "training, or give a number (damping=1e-3) or l2"
                )
            if low <= 0 or low <= eps * high:
                kind = "zero (or negative)" if low <= 0 else "numerically zero"
                raise CurvatureError(
                    f"layer {t.name!r} has a {kind} damped eigenvalue ({low:.2e}, against a "
                    f"largest of {high:.2e}, ratio below {dtype_name(values.dtype)}"
                    f"'s epsilon {eps:.1e}): its Kronecker-factored curvature is singular, "
                    "and solving with it would divide rounding noise by that eigenvalue. Add "
                    "damping (damping='auto': a tenth of each layer's mean eigenvalue, or e.g. "
                    "damping=1e-3) or l2; factors saved in factors_dir or a workdir are reused"
                )

    # ------------------------------------------------------------------ saved state
    def state(self) -> dict[str, Any]:
        """The fitted curvature as tensors and JSON (for a saved ``Influence``): the factors'
        own payload (:meth:`KroneckerFactors.payload`, as in ``factors_dir``) and how they were
        obtained."""
        tensors, document = self.factors.payload()
        return {
            "factors": tensors,
            "document": document,
            "loaded": self.loaded,
            "resumed": self.resumed,
        }

    @classmethod
    def restored(
        cls,
        fitted: Fitted,
        options: KroneckerOptions,
        state: dict[str, Any],
        *,
        corrected: bool,
        owner: str,
        where: str = "the saved Influence",
    ) -> KroneckerCurvature:
        """The curvature :meth:`state` describes, on ``fitted``, with no pass over the data.

        Args:
            fitted: the fitted record.
            options: the Kronecker options it was fitted with.
            state: what :meth:`state` returned, read back.
            corrected: use the EK-FAC eigenvalues.
            owner: the method's name.
            where: names the saved copy in errors.
        """
        factors = KroneckerFactors.from_payload(
            state["factors"], state["document"], where, fitted.space.device
        )
        out = cls(fitted, options, corrected=corrected, owner=owner, factors=factors)
        out.loaded, out.resumed = bool(state["loaded"]), bool(state["resumed"])
        return out

    @property
    def tracked(self) -> list[Any]:
        """The tracked layers (:class:`infkit.layers.TrackedModule`)."""
        return self.layers.tracked

    # ------------------------------------------------------------------ factors on disk
    def _fitter(self) -> FactorFitter:
        options, fitted = self.options, self.fitted
        return factor_fitter(
            fitted.engine,
            self.tracked,
            options,
            fitted.batch_size,
            progress=fitted.progress,
            cache_bytes=min(options.cache_bytes, fitted.memory_limit // 4),
            memory_limit=fitted.memory_limit,
        )

    def factors_identity(self) -> dict[str, Any]:
        """The identity of these factors' artifact (what they depend on)."""
        return self.identity(self._fitter(), self.corrected)

    def identity(self, fitter: FactorFitter, corrected: bool) -> dict[str, Any]:
        """Everything the factors depend on (their artifact's identity)."""
        return factors_identity(fitter, self.options, self.fitted.train, corrected)

    def _load_or_fit(self) -> KroneckerFactors:
        options, fitted = self.options, self.fitted
        fitter = self._fitter()
        identity = self.identity(fitter, self.corrected)
        stage = first_stage_identity(identity)
        store = None if options.factors_dir is None else ArtifactStore(options.factors_dir)
        found, resume = None, None
        if store is not None and not options.overwrite:
            # K-FAC can reuse EK-FAC factors (the same eigenbases, and the correction on top)
            wanted = reusable_identities(identity, self.corrected)
            found = next(
                (a for a in (store.load(FACTORS, c) for c in wanted) if a is not None), None
            )
            if found is None and self.corrected:
                artifact = store.load(FACTORS, stage)
                if artifact is not None:
                    self.resumed = True
                    logger.info(
                        "EK-FAC fit resumed from its committed K-FAC stage in %s (the "
                        "eigenvalue pass only)",
                        artifact.path,
                    )
                    resume = self._from_artifact(artifact)
        if store is not None and options.overwrite:
            # what overwrite=True replaces is what was there before this fit: removed now, by
            # every process before any of them fits (the agreement below waits for them all),
            # and the fit's factors then committed as any are, the first commit standing. (Each
            # process replacing the others' commits as it committed its own had one read its
            # set-aside factors while another replaced them: a tester's torchrun raised on one
            # rank and hung the other)
            for path, _ in store.others(FACTORS, identity):
                store.remove(path)
            store.remove(store.path(FACTORS, identity))
        # under torchrun: the same fit on every process, whose passes split by batch_size, and
        # the same memory limit and [N, P] gradient cache, which choose the scoring path (a
        # process that scores from its cache makes no sum the others would wait in); a store
        # or none on every process (one sets its factors aside as it scores, which groups the
        # queries otherwise), holding the same committed factors (a process that loads them
        # makes none of the fit's sums: a tester's torchrun hung, rank 0 resuming, rank 1 not)
        agree(
            f"the fit of method {self.owner!r}",
            {
                **identity,
                "method": self.owner,
                "batch_size": fitter.batch_size,
                "memory_limit": fitted.memory_limit,
                "gradient_cache": fitted.train_gradients is not None,
                "factors_store": store is not None,
                "committed_factors": (
                    "final"
                    if found is not None
                    else "first stage"
                    if resume is not None
                    else "none"
                ),
            },
            fitted.space.device,
            hints={
                "factors_store": STORE_HINT,
                "committed_factors": "give every process the same workdir (a shared one), or "
                "each its own factors_dir in the same state, or pass overwrite=True to fit again",
            },
        )
        if found is not None:
            self.loaded = True
            assert store is not None
            self._source = (store, [dict(c) for c in reusable_identities(identity, self.corrected)])
            logger.info("Kronecker factors reused from %s (no pass over the data)", found.path)
            if self.corrected:  # a stage a killed run left beside the final factors
                self._remove_stage(store, stage)
            return self._from_artifact(found)
        if store is not None and not options.overwrite:
            others = [
                (p, theirs) for p, theirs in store.others(FACTORS, identity) if theirs != stage
            ]
            if others:
                path, theirs = others[0]
                changed = ", ".join(_changed_settings(identity, theirs))
                raise ArtifactError(
                    f"{path} holds Kronecker factors fitted for another computation (differs "
                    f"in: {changed}). Pass overwrite=True (a method option: "
                    "Influence(..., overwrite=True)) to refit them there, or use another "
                    "factors_dir (or workdir)"
                )

        if store is not None:  # (before the pass whose factors it commits)
            store.check_writable()

        def commit(factors: KroneckerFactors, identity: dict[str, Any]) -> None:
            if store is None:
                return
            factors.meta.update(method=self.owner, options=options.record())
            tensors, document = factors.payload()
            store.save(
                FACTORS,
                identity,
                tensors={"tensors": tensors},
                documents={"meta": document},
                info={"method": self.owner, "options": options.record()},
            )

        # under a memory_limit the eigenvalue pass reads the eigenbases back from the committed
        # K-FAC stage, a layer's at a time, rather than hold them all beside its own terms
        stage_file = None
        if store is not None and self.corrected and reads_bases_back(options, fitted.memory_limit):
            stage_file = tensors_file(store.path(FACTORS, stage))
        try:
            factors = fitter.fit(
                fitted.train,
                corrected=self.corrected,
                resume=resume,
                on_stage=lambda first: commit(first, stage),
                stage_file=stage_file,
            )
        except ArtifactRemovedError:
            # another run sharing the directory finished this fit first: its final factors
            # replaced the K-FAC stage this pass read its eigenbases from; the same computation
            # (the store's rule: the first commit wins and the others use it)
            assert store is not None  # only a store's files are read back
            artifact = store.load(FACTORS, identity)
            if artifact is None:
                raise
            logger.info("Kronecker factors committed meanwhile by another run: %s", artifact.path)
            self.loaded = True
            self._source = (store, [dict(identity)])
            return self._from_artifact(artifact)
        factors.meta.update(method=self.owner, options=options.record())
        commit(factors, identity)
        if store is not None:
            # K-FAC's factors are also EK-FAC's first stage, which an EK-FAC fit in the same
            # directory resumes from and then replaces by its own (the same eigenbases)
            also = [] if self.corrected else [{**identity, "corrected": True}]
            self._source = (store, [dict(identity), *also])
        if store is not None and self.corrected:  # the final factors hold the stage's too
            self._remove_stage(store, stage)
        return factors

    @staticmethod
    def _remove_stage(store: ArtifactStore, stage: dict[str, Any]) -> None:
        """Remove EK-FAC's committed K-FAC stage, if there: the final factors hold its
        eigenbases (a run killed between committing them and this leaves it behind)."""
        store.remove(store.path(FACTORS, stage))

    def _from_artifact(self, artifact: Artifact) -> KroneckerFactors:
        return KroneckerFactors.from_payload(
            artifact.tensors(), artifact.json("meta"), str(artifact.path), self.fitted.space.device
        )

    # ------------------------------------------------------------------ the curvature
    def eigenvalues(self, name: str) -> Tensor:
        """The eigenvalues [d_out, cols] of layer ``name``'s block in its Kronecker eigenbasis."""
        return self.factors.modules[name].eigenvalues(self.corrected)

    def ridges(self, shift: float = 0.0) -> dict[str, float]:
        """The ridge added to each layer's eigenvalues: l2 + damping + shift + module damping."""
        base = self.fitted.ridge + shift
        return {t.name: base + self.module_damping.get(t.name, 0.0) for t in self.tracked}

    def to_eigenbasis(self, V: Tensor) -> dict[str, Tensor]:
        """Coordinates of V [k, P] in each layer's Kronecker eigenbasis: name -> [k, d_out, cols]."""
        V = V.to(torch.float64)
        out = {}
        for t in self.tracked:
            f = self.factors.modules[t.name]
            out[t.name] = f.QS.T.to(V.dtype) @ self.layers.layout.block(V, t) @ f.QA.to(V.dtype)
        return out

    def from_eigenbasis(self, coords: dict[str, Tensor], k: int) -> Tensor:
        """Flat [k, P] vector from eigenbasis coordinates (0 outside tracked layers)."""
        space = self.fitted.space
        out = torch.zeros(k, space.size, dtype=torch.float64, device=space.device)
        for t in self.tracked:
            f = self.factors.modules[t.name]
            QS, QA = f.QS.to(out.dtype), f.QA.to(out.dtype)
            self.layers.layout.put(out, t, QS @ coords[t.name] @ QA.T)
        return out

    def precondition(
        self, name: str, G: Tensor | tuple[Tensor, Tensor], ridge: float, dtype: torch.dtype
    ) -> Tensor:
        """``Q_S ((Q_S^T G Q_A) / (Lambda + ridge)) Q_A^T`` for layer ``name``'s blocks
        [k, d_out, cols] in ``dtype``, given as the blocks ``G`` or as their per-position terms
        ``(a, Ds)`` (:func:`rotated_blocks`)."""
        f = self.factors.modules[name]
        QS, QA = f.QS.to(dtype), f.QA.to(dtype)
        if isinstance(G, tuple):
            rotated = rotated_blocks(*G, QS, QA, dtype)
        else:
            rotated = QS.T @ G.to(dtype) @ QA
        rotated /= (self.eigenvalues(name) + ridge).to(dtype)
        return QS @ rotated @ QA.T

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        """``(G + (l2 + damping + shift) I)^{-1} V`` blockwise, for V [k, P], float64."""
        V = V.to(torch.float64)
        ridges = self.ridges(shift)
        layout = self.layers.layout
        # layer by layer (rotate, divide, rotate back into out): beside V and the answer only
        # one layer's block is held, never a second [k, P] of eigenbasis coordinates
        out = torch.zeros(V.shape, dtype=torch.float64, device=V.device)
        for t in self.tracked:
            denom = self.eigenvalues(t.name) + ridges[t.name]
            if float(denom.min()) <= 0:
                raise CurvatureError(
                    f"layer {t.name!r} has a zero (or negative) damped eigenvalue "
                    f"({float(denom.min()):.2e}): its Kronecker-factored curvature is singular. "
                    "Add damping (e.g. damping=1e-3 or damping='auto') or l2"
                )
            layout.put(
                out, t, self.precondition(t.name, layout.block(V, t), ridges[t.name], V.dtype)
            )
        if self.layers.others:
            ridge = self.fitted.ridge + shift
            if ridge <= 0:
                raise CurvatureError(
                    "unsupported='identity' gives the parameters outside tracked layers only "
                    f"the ridge l2 + damping + shift = {ridge:g}, which must be > 0: add damping"
                )
            idx = self.layers.layout.other_index
            out[:, idx] = V[:, idx] / ridge
        return out

    def describe(self) -> dict[str, Any]:
        """Settings and diagnostics worth recording next to results."""
        return {
            "fisher": self.fisher,
            "modules": [t.name for t in self.tracked],
            "unsupported": list(self.layers.others),
            "module_damping": dict(self.module_damping),
            "factors_loaded": self.loaded,
            "factors_resumed": self.resumed,
        }


def factor_fitter(
    engine: PerExample,
    tracked: list[TrackedModule],
    options: KroneckerOptions,
    batch_size: int,
    progress: Mode = "off",
    cache_bytes: int = 0,
    memory_limit: int | None = None,
) -> FactorFitter:
    """The :class:`FactorFitter` of a Kronecker method with these options."""
    return FactorFitter(
        engine,
        tracked,
        fisher=options.fisher,
        samples=options.samples,
        seed=options.seed,
        sample_targets=options.sample_targets,
        max_exact_outputs=options.max_exact_outputs,
        mask_key=options.mask_key,
        batch_size=batch_size,
        progress=progress,
        cache_bytes=cache_bytes,
        memory_limit=memory_limit,
    )


def factors_identity(
    fitter: FactorFitter, options: KroneckerOptions, train: ExampleSet, corrected: bool
) -> dict[str, Any]:
    """Everything the factors ``fitter`` fits on ``train`` depend on: their artifact's identity
    (the model, task and data fingerprints, the tracked layers, the Fisher and its labels' seeds,
    the precision, and whether the eigenvalues are corrected)."""
    mode = fitter.resolve(train)
    sampled = mode == "sampled"
    # the factors read the loss and the outputs, not the measurement the scores take
    task = {
        key: value
        for key, value in task_fingerprint(fitter.task).items()
        if key not in ("measurement", "higher_is_better")
    }
    return {
        "model": model_fingerprint(fitter.task.model),
        "task": task,
        "data": data_fingerprint(train),
        "modules": [t.describe() for t in fitter.tracked],
        "fisher": mode,
        "samples": options.samples if sampled else None,
        "seed": options.seed if sampled else None,
        "sample_targets": callable_identity(options.sample_targets) if sampled else None,
        "batch_size": fitter.batch_size if sampled else None,
        # labels seeded per batch (distributed.batch_seed), not by one running stream
        "label_seeds": "per-batch" if sampled else None,
        "mask_key": options.mask_key,
        "dtype": str(fitter.engine.dtype),
        "corrected": corrected,
    }


#: the identity's keys that only a sampled Fisher sets (None otherwise)
SAMPLED_ONLY = ("samples", "seed", "sample_targets", "batch_size", "label_seeds")


def _changed_settings(identity: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Where two factors' identities differ, as a refusal names it: with the Fisher changed,
    not the sampled Fisher's own settings that only one of them has (the user changed the
    Fisher, not the batch size)."""
    changed = differences(identity, found)
    if "fisher" not in changed:
        return changed
    one_sided = {
        key for key in SAMPLED_ONLY if (identity.get(key) is None) != (found.get(key) is None)
    }
    return [key for key in changed if key not in one_sided]


def reads_bases_back(options: KroneckerOptions, memory_limit: int) -> bool:
    """Whether EK-FAC's eigenvalue pass reads each layer's eigenbases back from the committed
    K-FAC stage instead of holding them all: under a bounded ``memory_limit``
    (:func:`~infkit.memory.bounded`), with a store for the factors (when the first pass's cache
    serves the eigenvalues instead, no pass reads them)."""
    return options.factors_dir is not None and bounded(memory_limit)


def reusable_identities(identity: dict[str, Any], corrected: bool) -> list[dict[str, Any]]:
    """The identities of committed factors a fit of ``identity`` reads back instead of fitting:
    its own, and for K-FAC also EK-FAC's (the same eigenbases, the correction on top)."""
    return [identity] if corrected else [identity, {**identity, "corrected": True}]


def first_stage_identity(identity: dict[str, Any]) -> dict[str, Any]:
    """The identity of EK-FAC's first stage, its K-FAC factors (covariances and eigenbases),
    committed before the eigenvalue pass so that an interrupted fit resumes there."""
    return {**identity, "corrected": False}


def committed_factors(
    fitter: FactorFitter, options: KroneckerOptions, train: ExampleSet, corrected: bool
) -> Literal["factors", "first stage"] | None:
    """What a fit with ``fitter`` on ``train`` would read back from ``options.factors_dir``
    instead of computing, as :meth:`KroneckerCurvature._load_or_fit` decides (for a plan; the
    fit verifies them): ``"factors"`` (no pass), ``"first stage"`` (EK-FAC's K-FAC factors: the
    eigenvalue pass only) or None (everything, also with ``overwrite``)."""
    if options.factors_dir is None or options.overwrite or not Path(options.factors_dir).is_dir():
        return None
    store = ArtifactStore(options.factors_dir)
    identity = factors_identity(fitter, options, train, corrected)
    wanted = reusable_identities(identity, corrected)
    if any(store.path(FACTORS, candidate).exists() for candidate in wanted):
        return "factors"
    if corrected and store.path(FACTORS, first_stage_identity(identity)).exists():
        return "first stage"
    return None
