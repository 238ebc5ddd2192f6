"""method="kfac": Kronecker-factored GGN, block-diagonal over layers (methods.md §4.2-§4.3).

Each tracked layer (``nn.Linear``, ``nn.Conv2d``, Hugging Face ``Conv1D``; weight and bias as one
augmented block ``[W | b]``) gets the curvature ``S (x) A`` of :mod:`infkit.kfac.factors`, which
approximates that layer's block of the mean-form GGN ``(1/N) sum_i J_i^T Lambda_i J_i``. Blocks
are independent. ``solve`` rotates each block of a flat vector into the Kronecker eigenbasis,
divides by the eigenvalues plus the ridge and rotates back:

    (G_l + r I)^{-1} V = Q_S [ (Q_S^T V Q_A) / (Lambda + r) ] Q_A^T,   r = l2 + damping + shift
                                                                          (+ the module damping)

with ``Lambda = lambda_S lambda_A^T`` (K-FAC) or the EK-FAC eigenvalues (``method="ekfac"``).

Damping: ``damping`` (the facade's) is absolute and shared by all blocks. ``damping_scale=0.1``
(or ``"auto"``) adds kronfluence's heuristic per-module damping ``0.1 x mean(Lambda_l)``
(methods.md §4.3, §7.6) on top.

Trainable parameters outside tracked layers (LayerNorm, embeddings, ...): ``unsupported="error"``
(default) refuses with their names; ``unsupported="identity"`` gives them no data curvature, so
their block is ``(l2 + damping) I`` (it needs l2 + damping > 0). Freezing them
(``requires_grad=False``) restricts the attribution to the tracked layers, as kronfluence does.

Factors can be saved and reloaded (``factors_dir=...``): scoring later skips the two passes over
the training data. The directory holds ``factors.safetensors`` and ``factors.json`` with the
arguments and fingerprints of the model and the data; a mismatch raises rather than silently
reusing stale factors (``overwrite=True`` refits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from infkit.errors import CurvatureError, InvalidInputError, UnsupportedError
from infkit.kfac.factors import (
    FISHER,
    FactorFitter,
    KroneckerFactors,
    SampleFn,
    data_fingerprint,
    fingerprint,
)
from infkit.kfac.modules import SUPPORTED, BlockLayout, TrackedModule, find_modules
from infkit.methods import register
from infkit.methods.base import FitContext, InverseCurvature

#: kronfluence's HEURISTIC_DAMPING_SCALE (methods.md §4.3)
HEURISTIC_DAMPING_SCALE = 0.1
UNSUPPORTED = ("error", "identity")


@register
class KFAC(InverseCurvature):
    """K-FAC: layerwise Kronecker-factored GGN ``S (x) A``, inverted in its eigenbasis.

    Args:
        fisher: where the gradient factor comes from: ``"ggn"`` (exact expected GGN, pulling back
            the C columns of ``Lambda_i^{1/2}``: deterministic), ``"sampled"`` (true Fisher with
            labels drawn from the model), ``"empirical"`` (true labels) or ``"auto"`` (``"ggn"``
            when the model has at most ``max_exact_outputs`` outputs per example, else
            ``"sampled"``).
        samples: labels drawn per example for ``"sampled"``.
        seed: seed of the label sampler.
        sample_targets: ``fn(outputs, targets, generator) -> targets`` drawing labels from the
            model, for ``"sampled"`` on a custom task.
        max_exact_outputs: see ``fisher="auto"``.
        damping_scale: per-module heuristic damping ``damping_scale x mean(Lambda_l)`` added to
            the ridge (``"auto"`` = 0.1, kronfluence's heuristic); None for none.
        modules: names of the layers to track (default: every supported trainable layer).
        unsupported: ``"error"`` or ``"identity"`` for trainable parameters outside tracked
            layers (see the module docstring).
        mask_key: key of the attention mask in dict inputs ([B, T], 1 = real token).
        batch_size: examples per factor pass (default: the facade's batch size).
        factors_dir: directory to save the factors to, or to load them from when it already
            holds factors fitted with the same arguments on the same model and data.
        overwrite: refit and overwrite factors in ``factors_dir`` even when they exist.
        cache_bytes: memory for keeping the first pass's activations for the EK-FAC pass.
    """

    name = "kfac"
    estimators = ("if", "rif", "newton", "relatif")
    summary = "layerwise Kronecker-factored GGN (K-FAC), Linear/Conv2d/Conv1D; scales to LLMs"
    scales = True
    #: accepts the per-module heuristic damping (``damping_scale``; the facade's damping="auto")
    supports_auto_damping = True
    #: whether the eigenvalues are EK-FAC's corrected ones
    corrected = False

    def __init__(
        self,
        fisher: str = "auto",
        samples: int = 1,
        seed: int = 0,
        sample_targets: SampleFn | None = None,
        max_exact_outputs: int = 64,
        damping_scale: float | str | None = None,
        modules: list[str] | None = None,
        unsupported: str = "error",
        mask_key: str | None = "attention_mask",
        batch_size: int | None = None,
        factors_dir: str | Path | None = None,
        overwrite: bool = False,
        cache_bytes: int = 1 << 30,
    ) -> None:
        super().__init__()
        if fisher not in FISHER:
            raise UnsupportedError(f"unknown fisher {fisher!r}; valid values: {', '.join(FISHER)}")
        if unsupported not in UNSUPPORTED:
            raise UnsupportedError(
                f"unknown unsupported={unsupported!r}; use one of {', '.join(UNSUPPORTED)}"
            )
        if damping_scale == "auto":
            damping_scale = HEURISTIC_DAMPING_SCALE
        if damping_scale is not None and (
            not isinstance(damping_scale, (int, float)) or not damping_scale >= 0
        ):
            raise InvalidInputError(
                f"damping_scale must be a number >= 0, 'auto' or None, got {damping_scale!r}"
            )
        self.fisher = fisher
        self.samples = samples
        self.seed = seed
        self.sample_targets = sample_targets
        self.max_exact_outputs = max_exact_outputs
        self.damping_scale = damping_scale
        self.modules = modules
        self.unsupported = unsupported
        self.mask_key = mask_key
        self.batch_size = batch_size
        self.factors_dir = None if factors_dir is None else Path(factors_dir)
        self.overwrite = overwrite
        self.cache_bytes = cache_bytes
        self.tracked: list[TrackedModule] = []
        self.others: list[str] = []
        self.layout: BlockLayout | None = None
        self.factors: KroneckerFactors | None = None
        self.module_damping: dict[str, float] = {}
        self.loaded = False

    # ------------------------------------------------------------------ fit
    def fit(self, context: FitContext) -> None:
        self.context = context
        model = context.task.model
        self.tracked, self.others = find_modules(model, context.space, self.modules)
        if not self.tracked:
            raise UnsupportedError(
                f"method {self.name!r} found no trainable layer it can factor ({SUPPORTED}); "
                "use another method (e.g. 'cg')"
            )
        if self.others and self.unsupported == "error":
            shown = ", ".join(self.others[:8]) + (" ..." if len(self.others) > 8 else "")
            raise UnsupportedError(
                f"method {self.name!r} factors {SUPPORTED} layers only; these trainable "
                f"parameters are outside them: {shown}. Freeze them (requires_grad=False) to "
                "attribute through the supported layers only, or pass unsupported='identity' to "
                "give them no data curvature (only the l2 + damping ridge)"
            )
        self.layout = BlockLayout(context.space, self.tracked, self.others)
        self.factors = self._load_or_fit(context)
        self.module_damping = {}
        for t in self.tracked:
            lam = self.eigenvalues(t.name)
            scale = self.damping_scale or 0.0
            self.module_damping[t.name] = float(scale * lam.mean())

    def _arguments(self, context: FitContext) -> dict[str, Any]:
        return {
            "fingerprint": fingerprint(context.task.model, context.space.names),
            "data": data_fingerprint(context.train),
        }

    def _load_or_fit(self, context: FitContext) -> KroneckerFactors:
        ids = self._arguments(context)
        wanted_modules = [t.describe() for t in self.tracked]
        directory = self.factors_dir
        if directory is not None and (directory / "factors.json").exists() and not self.overwrite:
            factors = KroneckerFactors.load(directory, context.space.device)
            meta = factors.meta
            problems = []
            if meta.get("fingerprint") != ids["fingerprint"]:
                problems.append("the model's parameters differ")
            if meta.get("data") != ids["data"]:
                problems.append("the training data differ")
            if meta.get("modules") != wanted_modules:
                problems.append("the tracked layers differ")
            if self.fisher != "auto" and meta.get("fisher") != self.fisher:
                problems.append(f"they were fitted with fisher={meta.get('fisher')!r}")
            if self.corrected and not factors.corrected:
                problems.append("they have no EK-FAC eigenvalue correction")
            if meta.get("fisher") == "sampled" and (
                meta.get("samples") != self.samples or meta.get("seed") != self.seed
            ):
                problems.append("they were sampled with other samples/seed")
            if problems:
                raise InvalidInputError(
                    f"the factors in {directory} do not match this fit: {'; '.join(problems)}. "
                    "Pass overwrite=True to refit them, or another factors_dir"
                )
            self.loaded = True
            return factors
        fitter = FactorFitter(
            context.per_example,
            self.tracked,
            fisher=self.fisher,
            samples=self.samples,
            seed=self.seed,
            sample_targets=self.sample_targets,
            max_exact_outputs=self.max_exact_outputs,
            mask_key=self.mask_key,
            batch_size=self.batch_size or context.batch_size,
            progress=context.progress,
            cache_bytes=self.cache_bytes,
        )
        factors = fitter.fit(context.train, corrected=self.corrected)
        factors.meta.update(ids, method=self.name)
        if directory is not None:
            factors.save(directory)
        self.loaded = False
        return factors

    # ------------------------------------------------------------------ the curvature
    def eigenvalues(self, name: str) -> Tensor:
        """The eigenvalues [d_out, cols] of layer ``name``'s block in its Kronecker eigenbasis."""
        return self.factors.modules[name].eigenvalues(self.corrected)

    def ridges(self, shift: float = 0.0) -> dict[str, float]:
        """The ridge added to each layer's eigenvalues: l2 + damping + shift + module damping."""
        ctx = self.context
        base = ctx.l2 + ctx.damping + shift
        return {t.name: base + self.module_damping.get(t.name, 0.0) for t in self.tracked}

    def to_eigenbasis(self, V: Tensor) -> dict[str, Tensor]:
        """Coordinates of V [k, P] in each layer's Kronecker eigenbasis: name -> [k, d_out, cols]."""
        V = V.to(torch.float64)
        out = {}
        for t in self.tracked:
            f = self.factors.modules[t.name]
            out[t.name] = f.QS.T @ self.layout.block(V, t) @ f.QA
        return out

    def from_eigenbasis(self, coords: dict[str, Tensor], k: int) -> Tensor:
        """Flat [k, P] vector from eigenbasis coordinates (0 outside tracked layers)."""
        space = self.context.space
        out = torch.zeros(k, space.size, dtype=torch.float64, device=space.device)
        for t in self.tracked:
            f = self.factors.modules[t.name]
            self.layout.put(out, t, f.QS @ coords[t.name] @ f.QA.T)
        return out

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        V = V.to(torch.float64)
        ridges = self.ridges(shift)
        coords = self.to_eigenbasis(V)
        for t in self.tracked:
            denom = self.eigenvalues(t.name) + ridges[t.name]
            if float(denom.min()) <= 0:
                raise CurvatureError(
                    f"layer {t.name!r} has a zero (or negative) damped eigenvalue "
                    f"({float(denom.min()):.2e}): its Kronecker-factored curvature is singular. "
                    "Add damping (e.g. damping=1e-3 or damping_scale='auto') or l2"
                )
            coords[t.name] = coords[t.name] / denom
        out = self.from_eigenbasis(coords, V.shape[0])
        if self.others:
            ridge = self.context.l2 + self.context.damping + shift
            if ridge <= 0:
                raise CurvatureError(
                    "unsupported='identity' gives the parameters outside tracked layers only "
                    f"the ridge l2 + damping + shift = {ridge:g}, which must be > 0: add damping"
                )
            idx = self.layout.other_index
            out[:, idx] = V[:, idx] / ridge
        return out

    def describe(self) -> dict[str, object]:
        out = super().describe()
        if self.factors is not None:
            out.update(
                fisher=self.factors.meta.get("fisher"),
                modules=[t.name for t in self.tracked],
                unsupported=list(self.others),
                damping_scale=self.damping_scale,
                module_damping=dict(self.module_damping),
                factors_loaded=self.loaded,
            )
        return out
