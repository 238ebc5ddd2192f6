"""Kronecker factors of the mean-form GGN, their eigenbases and the EK-FAC eigenvalues.

For a tracked layer with augmented activations ``a`` [cols] and pre-activation gradients ``Ds``
[d_out] at positions t of example i, the per-example pseudo-gradient is
``DW_i = sum_t Ds_it a_it^T`` and the layer's block of the mean-form GGN is
``G = (1/N) sum_i E[vec(DW_i) vec(DW_i)^T]`` (row-major vec). The factors are (docs/methods/kfac.md §2)

    A = sum_{i,t} m_it a_it a_it^T / sum_{i,t} m_it      (per-position mean, m = attention mask)
    S = (1/N) sum_i sum_t E[Ds_it Ds_it^T]                 (per-example sum over positions)

so that ``S (x) A`` approximates G itself: it is exact up to the Kronecker (independence)
approximation and the cross-position terms, on the same scale as the EK-FAC eigenvalues below.
(kronfluence averages S over positions as well, which makes its K-FAC eigenvalues smaller by about
the number of positions than its EK-FAC ones; docs/methods/kfac.md §2 on the scale.)

Where ``E[Ds Ds^T]`` comes from (``fisher``):

* ``"ggn"``: exact and deterministic. With ``Lambda_i = L_i L_i^T`` (eigendecomposition of the
  output-space loss Hessian), the C columns of ``L_i`` are pulled back through the network, and
  ``sum_c Ds_c Ds_c^T`` is exactly the GGN's expectation, with no sampling noise;
* ``"sampled"``: the true Fisher, one (or ``samples``) label(s) drawn from the model's predictive
  distribution per example (kronfluence's default);
* ``"empirical"``: the empirical Fisher, with the true labels.

EK-FAC (George et al. 2018; Grosse et al. 2023, Eq. 20) keeps the eigenbases ``Q_S``, ``Q_A`` and
replaces the eigenvalues ``lambda_S,o lambda_A,i`` by the exact diagonal of G in that basis,
``Lambda_oi = (1/N) sum_i E[(Q_S^T DW_i Q_A)_oi^2]``. Sums and products run in the model's
precision (float32 for float32 and bfloat16 models), the eigendecompositions in float64.

Only the eigendecompositions are kept: each covariance is freed as soon as it is decomposed
(``A = Q_A diag(lambda_A) Q_A^T`` gives it back when asked), so the factors take one square per
side of a layer, not two, from the decomposition on.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from infkit import language_modeling as lm
from infkit.data import Batch, ExampleSet, leaves, map_tensors
from infkit.distributed import (
    batch_count,
    batch_seed,
    examples_in_batches,
    shard_batches,
    sum_across,
)
from infkit.errors import (
    ArtifactError,
    InvalidInputError,
    NonFiniteError,
    UnsupportedError,
    warn,
)
from infkit.gradients import PerExample, check_finite_rows
from infkit.layers.capture import (
    ROW_PROBE_EXAMPLES,
    Capture,
    check_rows_follow_examples,
    made_in_slabs,
)
from infkit.layers.tracked import TrackedModule
from infkit.linalg import gram
from infkit.memory import human_bytes, release_freed_memory
from infkit.parameters import evaluation_mode, product_dtype
from infkit.progress import Mode, track
from infkit.scratch import ScratchSpace
from infkit.store import TensorFile

Fisher = Literal["auto", "ggn", "sampled", "empirical"]
FISHER: tuple[Fisher, ...] = get_args(Fisher)
#: format of saved factors (2: eigendecompositions only; 1 also held the covariances A and S)
FORMAT = 2
#: formats this infkit reads
READABLE_FORMATS = (1, 2)
#: elements of the [K, b, d_out, cols] rotated-gradient tensor built at once for EK-FAC
CHUNK_ELEMENTS = 1 << 24
#: bytes of the slab of rotated blocks made at a time with few positions (:func:`made_in_slabs`;
#: the fastest of 0.5-8 MiB at T = 16 on one core: 9 against 14 ms for 16 blocks of 1536 x 384)
SQUARES_SLAB_BYTES = 1 << 22

SampleFn = Callable[[Tensor, Any, torch.Generator], Any]


@dataclass
class ModuleFactors:
    """The factors of one tracked layer as their eigendecompositions, in the model's precision
    (float32 for float32 and bfloat16 models)."""

    QA: Tensor  # eigenvectors of A (columns) [cols, cols]
    eig_a: Tensor  # eigenvalues of A, clamped at 0
    QS: Tensor  # eigenvectors of S [d_out, d_out]
    eig_s: Tensor
    Lambda: Tensor | None = None  # [d_out, cols] EK-FAC eigenvalues
    tokens: float = 0.0  # positions counted in A

    @property
    def A(self) -> Tensor:  # noqa: N802 - the symbol of docs/methods/kfac.md
        """The activation covariance ``Q_A diag(lambda_A) Q_A^T`` [cols, cols] (rebuilt)."""
        return (self.QA * self.eig_a) @ self.QA.T

    @property
    def S(self) -> Tensor:  # noqa: N802 - the symbol of docs/methods/kfac.md
        """The output-gradient covariance ``Q_S diag(lambda_S) Q_S^T`` [d_out, d_out], rebuilt."""
        return (self.QS * self.eig_s) @ self.QS.T

    def stored(self) -> list[Tensor]:
        """The tensors this layer holds (eigenbases shared with other layers among them)."""
        return [t for t in (self.QA, self.eig_a, self.QS, self.eig_s, self.Lambda) if t is not None]

    def eigenvalues(self, corrected: bool) -> Tensor:
        """EK-FAC eigenvalues when ``corrected`` (and available), else K-FAC's ``eig_s x eig_a``."""
        if corrected:
            if self.Lambda is None:
                raise UnsupportedError(
                    "these factors have no EK-FAC eigenvalue correction; fit them with "
                    "method='ekfac'"
                )
            return self.Lambda
        return torch.outer(self.eig_s, self.eig_a)


@dataclass
class KroneckerFactors:
    """Kronecker factors of every tracked layer, with the arguments they were fitted with."""

    modules: dict[str, ModuleFactors]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def corrected(self) -> bool:
        return all(f.Lambda is not None for f in self.modules.values())

    def payload(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """The factors as tensors (``<module>::<factor>``) and a JSON document (meta, tokens)."""
        tensors = {}
        written: set[int] = set()
        for name, f in self.modules.items():
            for key in ("QA", "eig_a", "QS", "eig_s", "Lambda"):
                value = getattr(f, key)
                if value is not None:
                    # layers with a shared input share their eigenbasis in memory; a file
                    # holds one copy per name (safetensors refuses shared storage)
                    address = value.untyped_storage().data_ptr()
                    tensors[f"{name}::{key}"] = value.clone() if address in written else value
                    written.add(address)
        tokens = {name: f.tokens for name, f in self.modules.items()}
        return tensors, {**self.meta, "tokens": tokens, "format": FORMAT}

    @classmethod
    def from_payload(
        cls,
        tensors: dict[str, Tensor],
        document: dict[str, Any],
        where: str,
        device: torch.device | str = "cpu",
    ) -> KroneckerFactors:
        """Factors from :meth:`payload`'s two parts (``where`` names the file for errors)."""
        meta = dict(document)
        if meta.get("format") not in READABLE_FORMATS:
            raise ArtifactError(
                f"{where} holds factors of format {meta.get('format')!r}; this infkit reads "
                f"formats {', '.join(map(str, READABLE_FORMATS))}: refit them (overwrite=True)"
            )
        tokens = meta.pop("tokens", {})
        meta.pop("format", None)
        modules = {}
        # layers with a shared input share their eigenbasis in memory, as after a fit; the
        # file holds a copy per layer: equal ones are shared again
        seen: dict[tuple[Any, ...], list[Tensor]] = {}

        def shared(value: Tensor) -> Tensor:
            same = seen.setdefault((tuple(value.shape), value.dtype), [])
            for kept in same:
                if torch.equal(kept, value):
                    return kept
            same.append(value)
            return value

        for m in meta.get("modules", []):
            name = m["name"]

            def required(key: str, name: str = name) -> Tensor:
                value = tensors.get(f"{name}::{key}")
                if value is None:
                    raise ArtifactError(
                        f"{where} has no {key!r} for module {name!r}: the factors are "
                        "incomplete; refit them (overwrite=True)"
                    )
                return shared(value.to(device).contiguous())

            # format 1 also holds the covariances "A" and "S": not needed, not read
            Lambda = tensors.get(f"{name}::Lambda")
            modules[name] = ModuleFactors(
                QA=required("QA"),
                eig_a=required("eig_a"),
                QS=required("QS"),
                eig_s=required("eig_s"),
                Lambda=None if Lambda is None else Lambda.to(device).contiguous(),
                tokens=float(tokens.get(name, 0.0)),
            )
        return cls(modules, meta)


# ---------------------------------------------------------------------------------- sampling
def auto_fisher(outputs: int, max_exact_outputs: int) -> Literal["ggn", "sampled"]:
    """What ``fisher="auto"`` takes for ``outputs`` per example: the exact GGN up to
    ``max_exact_outputs`` (its cost grows with their square), else the sampled Fisher."""
    return "ggn" if outputs <= max_exact_outputs else "sampled"


def default_sampler(task_name: str) -> SampleFn | None:
    """Labels drawn from the model's predictive distribution, for the ready-made tasks."""
    if task_name == "classification":

        def categorical(out: Tensor, targets: Any, gen: torch.Generator) -> Tensor:
            probs = torch.softmax(out.detach().double(), dim=-1)
            flat = probs.reshape(-1, probs.shape[-1])
            return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1])

        return categorical
    if task_name == "binary_classification":

        def bernoulli(out: Tensor, targets: Any, gen: torch.Generator) -> Tensor:
            p = torch.sigmoid(out.detach().double())
            return torch.bernoulli(p, generator=gen).to(out.dtype).reshape(p.shape[0], -1)

        return bernoulli
    if task_name == "language_modeling":
        return lm.sample_labels
    if task_name == "regression":

        def gaussian(out: Tensor, targets: Any, gen: torch.Generator) -> Tensor:
            noise = torch.randn(out.shape, generator=gen, dtype=out.dtype, device=out.device)
            return out.detach() + noise

        return gaussian
    return None


def _joined(rows: list[Any]) -> Any:
    """One batch's targets from each example's (tensors concatenated along the batch, in the
    same nesting of dicts, tuples and lists; other values, as constants, taken from the first)."""
    first = rows[0]
    if isinstance(first, Tensor):
        return torch.cat(rows)
    if isinstance(first, dict):
        return {k: _joined([r[k] for r in rows]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_joined([r[k] for r in rows]) for k in range(len(first)))
    return first


def _row(t: Tensor, i: int) -> Tensor:
    """Example ``i`` of a batched tensor, keeping the batch dimension."""
    return t[i : i + 1]


def example_seeds(batch: Batch, seed: int, stream: int = 0) -> list[int]:
    """A seed of sampled labels for each example of ``batch``, a function of the example's
    inputs (their dtypes, shapes and values), ``seed`` and ``stream`` alone: the same example
    draws the same labels in any set, order or batch."""
    out = []
    for i in range(len(batch)):
        digest = hashlib.blake2b(f"{seed}/{stream}".encode(), digest_size=8)
        for t in leaves(batch.inputs):
            row = t[i].detach().cpu().contiguous()
            digest.update(f"{row.dtype}{tuple(row.shape)}".encode())
            digest.update(row.reshape(-1).view(torch.uint8).numpy().tobytes())
        out.append(int.from_bytes(digest.digest(), "little") >> 1)
    return out


# ---------------------------------------------------------------------------------- fitting
class FactorFitter:
    """Fits :class:`KroneckerFactors` on a training set, batch by batch.

    Args:
        engine: per-example machinery of the task (prepare, model, loss).
        tracked: the tracked layers.
        fisher: ``"auto"``, ``"ggn"``, ``"sampled"`` or ``"empirical"`` (see module docstring).
        samples: labels drawn per example for ``"sampled"``.
        seed: seed of the label sampler.
        sample_targets: ``fn(outputs, targets, generator) -> targets`` drawing labels from the
            model's predictive distribution (needed by ``"sampled"`` for custom tasks).
        max_exact_outputs: ``"auto"`` uses ``"ggn"`` when the flattened output has at most this
            many entries (one pulled-back vector each), else ``"sampled"``.
        mask_key: attention-mask key of dict inputs.
        batch_size: examples per batch.
        progress: how progress is shown (:mod:`infkit.progress`).
        cache_bytes: keep activations and gradients of the first pass in memory for the
            eigenvalue-correction pass when they fit in this many bytes (0: never).
        per_example_draws: draw each example's labels (``"sampled"``) from a generator seeded
            by the example's own inputs (:func:`example_seeds`), so that a set's draws do not
            depend on its order or its batches (dataset embeddings); else per batch.
    """

    def __init__(
        self,
        engine: PerExample,
        tracked: list[TrackedModule],
        *,
        fisher: str = "auto",
        samples: int = 1,
        seed: int = 0,
        sample_targets: SampleFn | None = None,
        max_exact_outputs: int = 64,
        mask_key: str | None = "attention_mask",
        batch_size: int = 64,
        progress: Mode = "off",
        cache_bytes: int = 1 << 30,
        per_example_draws: bool = False,
        memory_limit: int | None = None,
    ) -> None:
        if fisher not in FISHER:
            raise UnsupportedError(f"unknown fisher {fisher!r}; valid values: {', '.join(FISHER)}")
        if samples < 1:
            raise InvalidInputError(f"samples must be >= 1, got {samples}")
        self.engine = engine
        self.task = engine.task
        self.tracked = tracked
        self.fisher = fisher
        self.samples = samples
        self.seed = seed
        self.sampler = sample_targets or default_sampler(self.task.name)
        self.max_exact_outputs = max_exact_outputs
        self.mask_key = mask_key
        self.batch_size = batch_size
        self.progress = progress
        self.cache_bytes = cache_bytes
        self.per_example_draws = per_example_draws
        self.memory_limit = memory_limit
        self._resolved: tuple[ExampleSet, str] | None = None  # the last set and its mode

    def resolve(self, examples: ExampleSet) -> str:
        """The fisher mode actually used (``"auto"`` decided by the output size); a warning
        when ``"ggn"`` is asked for outputs beyond ``max_exact_outputs`` (its cost grows with
        their square), once per set (the factors' identity and their fit both ask)."""
        if self._resolved is not None and self._resolved[0] is examples:
            return self._resolved[1]
        mode = self._resolve(examples)
        self._resolved = (examples, mode)
        return mode

    def _resolve(self, examples: ExampleSet) -> str:
        c = 0  # outputs per example, where the mode depends on them
        if self.fisher in ("auto", "ggn"):
            c = self.engine.outputs(examples.take([0]))[0].numel()
        if self.fisher != "auto":
            mode = self.fisher
            if mode == "ggn" and c > self.max_exact_outputs:
                block = c * c * self.batch_size * self.engine.space.dtype.itemsize
                warn(
                    f"fisher='ggn' pulls back every one of the {c:,} outputs of an example"
                    + (" (a language model's positions x vocabulary)" if c > 1024 else "")
                    + f": {c:,} backward directions per "
                    f"example and a [{c:,}, B, {c:,}] block of output vectors per batch "
                    f"({human_bytes(block)} at batch_size={self.batch_size}), where "
                    "fisher='sampled' takes one per sample. Use fisher='sampled' (more samples= "
                    "for less noise) unless the outputs are few (max_exact_outputs="
                    f"{self.max_exact_outputs})",
                    UserWarning,
                )
        else:
            mode = auto_fisher(c, self.max_exact_outputs)
            if mode == "sampled" and self.sampler is None:
                raise UnsupportedError(
                    f"the model has {c} outputs per example, more than max_exact_outputs="
                    f"{self.max_exact_outputs} for the exact GGN factors, and task "
                    f"{self.task.name!r} has no label sampler for the true Fisher: pass "
                    "sample_targets=fn(outputs, targets, generator) -> targets, "
                    "fisher='empirical', or raise max_exact_outputs"
                )
        if mode == "sampled" and self.sampler is None:
            raise UnsupportedError(
                f"fisher='sampled' draws labels from the model, and task {self.task.name!r} has "
                "no sampler: pass sample_targets=fn(outputs, targets, generator) -> targets, or "
                "use fisher='ggn' (exact) or 'empirical'"
            )
        return mode

    # -------------------------------------------------------------- output-space vectors
    def output_vectors(
        self,
        mode: str,
        out: Tensor,
        targets: Any,
        gen: torch.Generator | list[torch.Generator] | None,
    ) -> Tensor:
        """[K, *out.shape] vectors u with sum_k u_k u_k^T = E[g g^T] (the curvature's S-part);
        ``gen``: the batch's generator of sampled labels, or one per example."""
        task = self.task
        if mode == "ggn":
            with torch.no_grad():
                L = task.lambda_factor(out.detach(), targets)  # [B, C, K]
            return L.permute(2, 0, 1).reshape(-1, *out.shape).to(out.dtype)
        with torch.enable_grad():
            f = out.detach().requires_grad_(True)
            if mode == "empirical":
                vectors = [torch.autograd.grad(task.checked_loss(f, targets).sum(), f)[0]]
            else:
                vectors = []
                assert self.sampler is not None and gen is not None  # checked by resolve()
                for _ in range(self.samples):
                    y = self._draw(f.detach(), targets, gen)
                    vectors.append(torch.autograd.grad(task.checked_loss(f, y).sum(), f)[0])
        scale = 1.0 / math.sqrt(len(vectors))
        return torch.stack(vectors) * scale

    def _draw(self, out: Tensor, targets: Any, gen: torch.Generator | list[torch.Generator]) -> Any:
        """Labels drawn by the sampler for the batch, from its generator or one per example."""
        assert self.sampler is not None  # checked by resolve()
        if isinstance(gen, torch.Generator):
            return self.sampler(out, targets, gen)
        rows = [
            self.sampler(out[i : i + 1], map_tensors(targets, functools.partial(_row, i=i)), g)
            for i, g in enumerate(gen)
        ]
        return _joined(rows)

    def pass_over(self, examples: ExampleSet, mode: str, desc: str, stream: int = 0):
        """Yield (batch size, {name: (a, mask, Ds)}) for every batch of this process
        (:func:`~infkit.distributed.shard_batches`: all of them without a process group).

        ``stream`` selects an independent stream of sampled labels (``"sampled"`` only); each
        batch's labels are seeded by the seed, the stream and the batch's number.
        """
        gen = None
        if mode == "sampled":
            gen = torch.Generator(device=self.engine.space.device)
        total = batch_count(len(examples), self.batch_size)
        model = self.task.model
        batches = shard_batches(examples, self.batch_size)  # this process's share
        with Capture(self.tracked, self.mask_key) as cap, evaluation_mode(model):
            for number, batch in track(batches, self.progress, desc, total):
                draws: torch.Generator | list[torch.Generator] | None = gen
                if gen is not None and self.per_example_draws:  # by each example's inputs
                    draws = [
                        torch.Generator(device=gen.device).manual_seed(s)
                        for s in example_seeds(batch, self.seed, stream)
                    ]
                elif gen is not None:  # labels drawn per batch: the same on any process
                    gen.manual_seed(batch_seed(self.seed, stream, number))
                inputs, targets = self.engine.prepare(batch)
                with torch.enable_grad():
                    out = cap.forward(self.task, inputs)
                    check_finite_rows(out.detach(), batch, "model output", self.engine.precision)
                    U = self.output_vectors(mode, out, targets, draws)
                    Ds = cap.backprop(out, U)
                items = {}
                for t in self.tracked:
                    a, mask = cap.activations(t.name)
                    items[t.name] = (a, mask, Ds[t.name].detach())
                # free this batch's graph before the next forward pass builds its own
                del out, U, Ds
                cap.release()
                yield len(batch), items
                del items  # the consumer is done with it

    def fit(
        self,
        examples: ExampleSet,
        corrected: bool,
        *,
        resume: KroneckerFactors | None = None,
        on_stage: Callable[[KroneckerFactors], None] | None = None,
        stage_file: Path | None = None,
    ) -> KroneckerFactors:
        """Covariances, eigendecompositions and (when ``corrected``) the EK-FAC eigenvalues.

        Args:
            resume: K-FAC factors of this fit committed by an earlier, interrupted run: only
                the eigenvalue correction is computed (the same numbers as without the
                interruption).
            on_stage: called with the K-FAC factors (covariances and eigenbases) before the
                eigenvalue-correction pass, e.g. to commit them.
            stage_file: where those K-FAC factors are committed (a safetensors file of
                :meth:`KroneckerFactors.payload`), for an eigenvalue pass that reads each
                layer's eigenbases back as it needs them instead of holding them all
                (:class:`EigenbasesOnDisk`); None: held in memory.
        """
        mode = self.resolve(examples)
        cache = None
        if resume is not None:
            factors = resume
        else:
            probe = examples.take(torch.arange(min(len(examples), ROW_PROBE_EXAMPLES)))
            check_rows_follow_examples(self.engine, self.tracked, probe, self.mask_key)
            factors, cache = self._covariances(examples, mode, keep=corrected)
            if corrected and on_stage is not None:
                on_stage(factors)
        if corrected:
            release_freed_memory()  # the covariance pass's leftovers
            # (a process of a torchrun group may find the file not yet committed: then held)
            if stage_file is not None and cache is None and stage_file.exists():
                bases = EigenbasesOnDisk(stage_file, factors.modules)
                self._correct(factors, examples, mode, None, bases)
                bases.restore()
            else:
                self._correct(factors, examples, mode, cache)
        release_freed_memory()
        return factors

    def _warn_batch_beyond_limit(
        self, items: dict[str, tuple[Tensor, Tensor | None, Tensor]], examples: int
    ) -> None:
        """Warn where one batch's activations and output gradients, as the layers' hooks hold
        them, pass ``memory_limit`` alone: the batch is the user's to size (a reviewer's
        convolutions over signals of 6,000 steps, 32 a batch, peaked at 611 MiB under a limit
        of 128 MiB, with no word)."""
        if self.memory_limit is None:
            return
        # (each tensor whole, a shared input once: the first pass's own count is its cache's)
        tensors = {id(x): x for a, _, d in items.values() for x in (a, d)}.values()
        held = sum(x.numel() * x.element_size() for x in tensors)
        if held <= self.memory_limit:
            return
        fits = max(1, examples * self.memory_limit // (2 * held))
        warn(
            f"one batch of {examples} examples holds {human_bytes(held)} of the tracked layers' "
            "activations and output gradients (their positions: a sequence's tokens, a "
            "convolution's unfolded patches), above memory_limit "
            f"({human_bytes(self.memory_limit)}) alone, so the passes over the data go beyond "
            f"it: give a smaller batch_size (about {fits} holds half the limit)",
            UserWarning,
        )

    def _covariances(
        self, examples: ExampleSet, mode: str, keep: bool
    ) -> tuple[KroneckerFactors, list[dict[str, tuple[Tensor, Tensor]]] | None]:
        """The first pass (A, S) and the eigendecompositions: K-FAC's factors, with the pass's
        activations and gradients when ``keep`` and they fit in ``cache_bytes``."""
        n = len(examples)
        dev = self.engine.space.device
        # products and sums in the model's precision (float32 for float32 and bfloat16 models,
        # as kronfluence keeps them), eigendecompositions in float64 (:func:`_eigh`)
        work = product_dtype(self.engine.space.dtype)
        A = {t.name: torch.zeros(t.cols, t.cols, dtype=work, device=dev) for t in self.tracked}
        S = {t.name: torch.zeros(t.d_out, t.d_out, dtype=work, device=dev) for t in self.tracked}
        tokens = dict.fromkeys(A, 0.0)
        # The eigenvalue pass reuses the first pass's activations and gradients when they fit in
        # memory, except with sampled labels: there it draws fresh labels, so that the
        # eigenvalues are an unbiased estimate of the curvature's diagonal in an eigenbasis that
        # was fitted to other samples (reusing the samples measured the basis on its own noise
        # and scored visibly worse against the dense GGN).
        reuse = keep and mode != "sampled"
        cache: list[dict[str, tuple[Tensor, Tensor]]] | None = [] if reuse else None
        cached, seen, local = 0, 0, examples_in_batches(n, self.batch_size)  # this process's
        passed = self.pass_over(examples, mode, "kfac covariances")
        for number, (batch_examples, items) in enumerate(passed):
            if number == 0:
                self._warn_batch_beyond_limit(items, batch_examples)
            # layers sharing an input tensor (q, k, v; gate, up) share its covariance
            shared: dict[tuple[int, int], tuple[Tensor, float]] = {}
            for name, (a, mask, ds) in items.items():
                key = (id(a), id(mask))
                if key not in shared:
                    flat = a.to(work).reshape(-1, a.shape[-1])
                    if mask is not None:
                        m = mask.to(work).reshape(-1)
                        shared[key] = (gram(flat, m), float(m.sum()))
                    else:
                        shared[key] = (gram(flat), float(flat.shape[0]))
                covariance, count = shared[key]
                A[name] += covariance
                tokens[name] += count
                S[name] += gram(ds.to(work).reshape(-1, ds.shape[-1]))
            del shared
            if cache is not None:
                cached += held_bytes(x for a, _, d in items.values() for x in (a, d))
                seen += batch_examples
                # kept while it fits, and let go as soon as the whole pass, at the examples'
                # mean so far, clearly will not (CACHE_PROJECTION_MARGIN: batches vary, a
                # language model's GGN pulls back more vectors in some): such a pass is not
                # held up to cache_bytes first, beside its own working memory
                projected = cached / seen * local
                if cached <= self.cache_bytes and projected <= (
                    CACHE_PROJECTION_MARGIN * self.cache_bytes
                ):
                    cache.append({k: (a, d) for k, (a, _, d) in items.items()})
                else:
                    cache = None
            del items  # before the next batch's forward pass
        sum_across(*A.values(), *S.values())  # the other processes' batches
        counted = torch.tensor(list(tokens.values()), dtype=torch.float64)
        sum_across(counted)
        tokens = dict(zip(tokens, counted.tolist(), strict=True))
        # each covariance is freed once decomposed: the accumulators give way to the eigenbases
        decomposed_a = _decompose_shared(A, tokens)
        modules = {}
        for t in self.tracked:
            eig_s, QS = _eigh(S.pop(t.name) / n)
            eig_a, QA = decomposed_a[t.name]
            modules[t.name] = ModuleFactors(QA, eig_a, QS, eig_s, tokens=tokens[t.name])
        meta = {
            "fisher": mode,
            "samples": self.samples if mode == "sampled" else None,
            "seed": self.seed if mode == "sampled" else None,
            "n_train": n,
            "modules": [t.describe() for t in self.tracked],
            "mask_key": self.mask_key,
        }
        return KroneckerFactors(modules, meta), cache

    def _correct(
        self,
        factors: KroneckerFactors,
        examples: ExampleSet,
        mode: str,
        cache: list[dict[str, tuple[Tensor, Tensor]]] | None,
        bases: Eigenbases | None = None,
    ) -> None:
        """The EK-FAC eigenvalues ``Lambda`` of ``factors``, in place: from the first pass's
        ``cache``, or a pass of their own (fresh labels when sampled); the eigenbases from
        ``bases`` (default: the factors' own, in memory)."""
        modules = factors.modules
        bases = bases if bases is not None else Eigenbases(modules)
        dev = self.engine.space.device
        work = product_dtype(self.engine.space.dtype)
        Lam = {t.name: torch.zeros(t.d_out, t.cols, dtype=work, device=dev) for t in self.tracked}
        source = (
            ({k: (a, None, d) for k, (a, d) in c.items()} for c in cache)
            if cache is not None
            else (
                items for _, items in self.pass_over(examples, mode, "ekfac eigenvalues", stream=1)
            )
        )
        for items in source:
            # Q_A^T a once per shared input and shared basis
            turned: dict[tuple[int, str], Tensor] = {}
            scratch = ScratchSpace()  # the batch's per-example blocks, layer after layer
            for name, (a, _, ds) in items.items():
                key = (id(a), bases.key(name))
                if key not in turned:
                    turned[key] = a.to(work) @ bases.QA(name).to(work)
                dr = ds.to(work) @ bases.QS(name).to(work)
                Lam[name] += squares_in_eigenbasis(dr, turned[key], scratch).to(work)
            del items, turned, scratch
        sum_across(*Lam.values())
        for name, f in modules.items():
            f.Lambda = Lam[name] / len(examples)


class Eigenbases:
    """The eigenbases of ``modules`` as they hold them (layers sharing an input share one)."""

    def __init__(self, modules: dict[str, ModuleFactors]) -> None:
        self.modules = modules
        first: dict[int, str] = {}
        #: the first layer with each layer's Q_A: one rotation of a shared input per batch
        self.shared = {name: first.setdefault(id(f.QA), name) for name, f in modules.items()}

    def key(self, name: str) -> str:
        """The layer whose ``Q_A`` layer ``name`` uses (itself unless it shares its input)."""
        return self.shared[name]

    def QA(self, name: str) -> Tensor:  # noqa: N802 - the symbol of docs/methods/kfac.md
        return self.modules[name].QA

    def QS(self, name: str) -> Tensor:  # noqa: N802 - the symbol of docs/methods/kfac.md
        return self.modules[name].QS


class EigenbasesOnDisk(Eigenbases):
    """The eigenbases read back, a layer's at a time, from a committed file of the factors.

    Made from factors that hold them, it drops their ``Q_A`` and ``Q_S`` (the largest part of
    the factors: 0.48 of 0.68 GiB on bench_lm's 50M model), so that the eigenvalue pass holds
    its eigenvalue sums, a batch's terms and one layer's eigenbases rather than all of them;
    :meth:`restore` reads them back after the pass, eigenbases of layers that share an input
    shared again. The file is the fit's own, just committed and verified by its store; one
    replaced meanwhile is refused (:class:`~infkit.store.TensorFile`).
    """

    def __init__(self, path: Path, modules: dict[str, ModuleFactors]) -> None:
        super().__init__(modules)
        self.file = TensorFile(path)
        self.device = next(iter(modules.values())).QA.device  # where they were, and go back
        for f in modules.values():
            f.QA = f.QS = _SET_ASIDE

    def QA(self, name: str) -> Tensor:  # noqa: N802 - the symbol of docs/methods/kfac.md
        return self.file.get(f"{self.shared[name]}::QA").to(self.device)

    def QS(self, name: str) -> Tensor:  # noqa: N802 - the symbol of docs/methods/kfac.md
        return self.file.get(f"{name}::QS").to(self.device)

    def restore(self) -> None:
        """Put every layer's eigenbases back into its factors, from the file."""
        read: dict[str, Tensor] = {}
        for name, f in self.modules.items():
            first = self.shared[name]
            if first not in read:
                read[first] = self.QA(name)
            f.QA, f.QS = read[first], self.QS(name)


#: how far beyond ``cache_bytes`` the first pass's projected size may be before its cache is let
#: go early (:meth:`FactorFitter._covariances`); below it, the cache is kept while it fits
CACHE_PROJECTION_MARGIN = 1.25


def held_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the storages that ``tensors`` hold, each counted once (layers that read one
    input share its activations)."""
    storages = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in tensors}
    return sum(storages.values())


#: what a layer holds in place of its eigenbases while :class:`EigenbasesOnDisk` reads them
_SET_ASIDE = torch.empty(0)


def _decompose_shared(
    sums: dict[str, Tensor], tokens: dict[str, float]
) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`_eigh` of every layer's mean activation covariance ``sums[name] / tokens[name]``,
    emptying ``sums`` as it goes (each sum is freed once decomposed).

    Layers that share their input (q, k, v; gate, up) have equal sums: they get one
    decomposition, the same tensors, so that the eigenvalue pass rotates a shared input once.
    """
    out: dict[str, tuple[Tensor, Tensor]] = {}
    while sums:
        name, total = next(iter(sums.items()))
        del sums[name]
        count = tokens[name]
        decomposition = _eigh(total / max(count, 1.0))
        out[name] = decomposition
        twins = [
            other
            for other, m in sums.items()
            if tokens[other] == count and m.shape == total.shape and torch.equal(m, total)
        ]
        for other in twins:
            del sums[other]
            out[other] = decomposition
        del total
    return out


def _eigh(M: Tensor) -> tuple[Tensor, Tensor]:
    """Eigendecomposition of a symmetric PSD matrix in float64, eigenvalues clamped at 0, returned
    in M's dtype.

    The eigenvectors are made contiguous: ``eigh`` returns a transposed (column-major) view, and
    factors reloaded from disk are contiguous, so without this a fitted and a reloaded
    curvature would multiply along different BLAS paths and differ in the last bits.
    """
    if not bool(torch.isfinite(M).all()):
        raise NonFiniteError(
            "a Kronecker factor (a covariance of layer inputs or output gradients) has NaN or "
            "Inf: the model's outputs were finite, so a backward pass overflowed. Run the model "
            "in float32 (or dtype=None instead of bfloat16 autocast), or check the loss of "
            "extreme examples"
        )
    # (M + M^T) / 2 in float64 made in one new matrix, without a float64 copy of M beside it:
    # the eigendecomposition's peak, with LAPACK's eigenvectors and workspace, is about
    # EIGH_WORK of these matrices (eigh_bytes)
    symmetric = M.T.to(torch.float64, copy=True)
    symmetric.add_(M).mul_(0.5)
    ev, Q = torch.linalg.eigh(symmetric)
    del symmetric
    return ev.clamp_min(0.0).to(M.dtype).contiguous(), Q.to(M.dtype).contiguous()


def rotated(
    ds: Tensor, a: Tensor, QS: Tensor, QA: Tensor, dtype: torch.dtype = torch.float64
) -> Tensor:
    """Per-example gradients in the Kronecker eigenbasis: Q_S^T (sum_t Ds_t a_t^T) Q_A.

    ``ds`` [K, B, T, d_out], ``a`` [B, T, cols] -> [K, B, d_out, cols] in ``dtype``.
    """
    dr = ds.to(dtype) @ QS.to(dtype)
    ar = a.to(dtype) @ QA.to(dtype)
    return dr.transpose(-1, -2) @ ar.unsqueeze(0)


def squares_in_eigenbasis(dr: Tensor, ar: Tensor, scratch: ScratchSpace | None = None) -> Tensor:
    """``sum_{k,b} (sum_t dr_kbt ar_bt^T)^2`` [d_out, cols] float64 of rotated gradients
    ``dr = Ds Q_S`` [K, B, T, d_out] and activations ``ar = a Q_A`` [B, T, cols], in chunks of
    examples (:data:`CHUNK_ELEMENTS`), or with few positions in slabs of rows of every
    example's block (:data:`SQUARES_SLAB_BYTES`), each made in ``scratch`` (a buffer of this
    call's own when None)."""
    if ar.shape[1] == 1:  # one position: the square of an outer product is an outer product
        outer = dr[:, :, 0].square().sum(0).T @ ar[:, 0].square()
        return outer.to(torch.float64)
    k, b, _, d_out = dr.shape
    cols = ar.shape[-1]
    out = torch.zeros(d_out, cols, dtype=torch.float64, device=dr.device)
    scratch = ScratchSpace() if scratch is None else scratch
    if made_in_slabs(ar):  # few positions: each slab of rows squared while in the cache
        rows = max(1, SQUARES_SLAB_BYTES // (k * b * cols * dr.element_size()))
        left, right = dr.transpose(-1, -2), ar.unsqueeze(0)
        for lo in range(0, d_out, rows):
            hi = min(lo + rows, d_out)
            with torch.no_grad():
                c = torch.matmul(
                    left[:, :, lo:hi], right, out=scratch.view((k, b, hi - lo, cols), dr)
                )
            out[lo:hi] += c.square_().sum((0, 1))
        return out
    step = max(1, CHUNK_ELEMENTS // max(1, k * d_out * cols))
    chunk_sum = torch.empty(d_out, cols, dtype=dr.dtype, device=dr.device)
    for s in range(0, b, step):
        left, right = dr[:, s : s + step].transpose(-1, -2), ar[s : s + step].unsqueeze(0)
        with torch.no_grad():  # out= takes no part in autograd, and nothing here needs it
            c = torch.matmul(left, right, out=scratch.view((k, left.shape[1], d_out, cols), dr))
        # each example's square added in place: one pass over c, where square_() then sum()
        # took 1.8 times as long on a CPU (3.3 against 1.8 ms for 8 blocks of 1024 x 384)
        chunk_sum.zero_()
        for block in c.flatten(0, 1):
            chunk_sum.addcmul_(block, block)
        out += chunk_sum
    return out
