"""method="trak": random projections and the one-step-Newton logistic surrogate (methods.md §6.5).

TRAK (Park et al., ICML 2023) linearises each model m around its parameters and replaces the loss
curvature by the Gram matrix of projected output gradients:

    phi_m(z) = R^T grad_theta f(z; theta_m)  in R^k,     Phi_m = [phi_m(z_i)]_i  (N x k),
    tau(z)   = [ (1/M) sum_m phi_m(z)^T (Phi_m^T Phi_m + lambda I)^{-1} Phi_m^T ]  (.)  Qbar,

with f the model output function (classification: the margin ``logit_y - logsumexp_{c!=y}
logit_c``), ``Q_m = diag(1 - p_y)`` the out-to-loss weights and ``Qbar`` their average over the
M models; the two averages are taken separately and multiplied, as in the authors'
``finalize_scores``. R is a seeded Gaussian or Rademacher matrix scaled by 1/sqrt(k)
(``projection="identity"`` uses the raw gradients, k = P). Per-example gradients are projected
batch by batch, so N x P is never formed; R itself (P x k) is kept only when it fits in
``projection_memory`` bytes and is otherwise regenerated chunk by chunk from its seed.
``tau_i(z) > 0`` means that including training example i raises z's output.

infkit's units and sign: scores are removal effects on the task's measurement m, predicted
through the surrogate: removing i changes the surrogate parameters by
``-(Phi^T Phi + lambda I)^{-1} phi_i Qbar_i``, hence

    scores[t, j] = -(1/M) sum_m (R^T grad m_t(theta_m))^T (Phi_m^T Phi_m + lambda I)^{-1} phi_m(z_j) Qbar_j.

For a margin measurement this is ``-tau_j(z_t)``; for the loss it is about ``(1 - p_t) tau_j(z_t)``
(> 0: j is a proponent). Phi^T Phi is a sum over examples, so the 1/N of a mean-form curvature is
built in. infkit's ``l2`` and ``damping`` are not used: TRAK's own ridge is ``lambda_reg`` (sum
form, default 0 as in trak; then proj_dim must be below N). The global scale is that of a
surrogate model: use TRAK for ranking and LDS rather than to predict absolute changes.

``checkpoints`` (state dicts or flat vectors of the same architecture: checkpoints of one run, or
independently trained models) make the ensemble; by default the fitted model alone (M = 1).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from infkit.checkpoints import Checkpoint, checkpoint_vector, parameters_at
from infkit.data import ExampleSet
from infkit.errors import CurvatureError, InvalidInputError, ProblemTooLargeError, UnsupportedError
from infkit.gradients import PerExample
from infkit.methods import register
from infkit.methods.base import DirectMethod, FitContext
from infkit.parameters import human_bytes
from infkit.task import Task, classification_margin

PROJECTIONS = ("rademacher", "gaussian", "identity")
#: rows of R generated per seeded chunk (fixes R independently of how it is used)
CHUNK_ROWS = 1024


def _softmax_out_to_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    p = torch.softmax(outputs, dim=-1)
    return 1.0 - p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def _binary_margin(outputs: Tensor, targets: Tensor) -> Tensor:
    z = outputs.reshape(outputs.shape[0])  # one logit per example
    return (2 * targets.to(z.dtype).reshape(z.shape) - 1) * z


def _binary_out_to_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    return 1.0 - torch.sigmoid(_binary_margin(outputs, targets))


class Projector:
    """The seeded P x k projection R (entries +-1/sqrt(k) or N(0, 1/k)), kept or streamed."""

    def __init__(
        self,
        size: int,
        dim: int,
        kind: str,
        seed: int,
        dtype: torch.dtype,
        device: torch.device,
        memory: int,
    ) -> None:
        self.size, self.kind, self.seed = size, kind, seed
        self.dim = size if kind == "identity" else dim
        self.dtype, self.device = dtype, device
        itemsize = torch.finfo(dtype).bits // 8
        self.matrix: Tensor | None = None
        if kind != "identity" and size * self.dim * itemsize <= memory:
            self.matrix = torch.cat([self._chunk(c) for c in range(self._chunks())])

    def _chunks(self) -> int:
        return -(-self.size // CHUNK_ROWS)

    def _chunk(self, c: int) -> Tensor:
        rows = min(CHUNK_ROWS, self.size - c * CHUNK_ROWS)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + c)
        if self.kind == "gaussian":
            block = torch.randn(rows, self.dim, generator=gen, dtype=torch.float64)
        else:
            block = torch.randint(0, 2, (rows, self.dim), generator=gen).to(torch.float64) * 2 - 1
        return (block / self.dim**0.5).to(self.dtype).to(self.device)

    def project(self, G: Tensor) -> Tensor:
        """G R for gradients G [B, P]; returns float64 [B, k]."""
        if self.kind == "identity":
            return G.to(torch.float64)
        G = G.to(self.dtype)
        if self.matrix is not None:
            return (G @ self.matrix).to(torch.float64)
        out = torch.zeros(G.shape[0], self.dim, dtype=self.dtype, device=G.device)
        for c in range(self._chunks()):
            out += G[:, c * CHUNK_ROWS : (c + 1) * CHUNK_ROWS] @ self._chunk(c)
        return out.to(torch.float64)

    def back(self, w: Tensor) -> Tensor:
        """R w for w [k]; returns float64 [P]."""
        if self.kind == "identity":
            return w.to(torch.float64)
        if self.matrix is not None:
            return self.matrix.to(torch.float64) @ w.to(torch.float64)
        return torch.cat(
            [self._chunk(c).to(torch.float64) @ w.to(torch.float64) for c in range(self._chunks())]
        )


@register
class Trak(DirectMethod):
    """TRAK: projected output gradients, logistic one-step Newton, ensembled over checkpoints.

    Args:
        proj_dim: k, the projection dimension (default 2048, as in trak; capped at P).
        projection: ``"rademacher"`` (default), ``"gaussian"`` or ``"identity"`` (k = P).
        lambda_reg: ridge added to Phi^T Phi (sum form; default 0, as in trak).
        checkpoints: models of the ensemble (state dicts or flat [P] vectors); default: the
            fitted model only.
        normalise: divide each model's (Phi^T Phi + lambda I)^{-1} by its mean absolute entry
            before averaging, as trak's ``get_x_xtx_inv`` does (changes the scale, not M = 1
            rankings).
        output: ``fn(outputs, targets) -> [B]``, the model output function f (default: the
            margin for ``Task.classification`` / ``Task.binary_classification``).
        out_to_loss: ``fn(outputs, targets) -> [B]``, the weights Q (default: 1 - p_y).
        seed: seeds the projection.
        projection_memory: bytes R may take in memory before it is streamed (default 512 MiB).
    """

    name = "trak"
    estimators = ("if",)
    summary = "TRAK: random projections of gradients, one-step-Newton logistic surrogate, ensembles"
    scales = True
    curvature = "feature-gram"
    #: a surrogate of its own, not a counterfactual at an optimum: no stationarity warning
    assumes_optimum = False

    def __init__(
        self,
        proj_dim: int = 2048,
        projection: str = "rademacher",
        lambda_reg: float = 0.0,
        checkpoints: Sequence[Checkpoint] | None = None,
        normalise: bool = False,
        output: Callable[[Tensor, Any], Tensor] | None = None,
        out_to_loss: Callable[[Tensor, Any], Tensor] | None = None,
        seed: int = 0,
        projection_memory: int = 512 << 20,
    ) -> None:
        super().__init__()
        if projection not in PROJECTIONS:
            raise UnsupportedError(f"unknown projection {projection!r}; use one of {PROJECTIONS}")
        if proj_dim < 1:
            raise InvalidInputError(f"proj_dim must be >= 1, got {proj_dim}")
        if not lambda_reg >= 0:
            raise InvalidInputError(f"lambda_reg must be >= 0, got {lambda_reg}")
        if (output is None) != (out_to_loss is None):
            raise InvalidInputError("pass both output and out_to_loss, or neither")
        if checkpoints is not None and not list(checkpoints):
            raise InvalidInputError("checkpoints is empty; pass at least one, or None")
        self.proj_dim = proj_dim
        self.projection = projection
        self.lambda_reg = float(lambda_reg)
        self.checkpoints = None if checkpoints is None else list(checkpoints)
        self.normalise = normalise
        self.output = output
        self.out_to_loss = out_to_loss
        self.seed = seed
        self.projection_memory = projection_memory
        self.projector: Projector | None = None
        self.weights: Tensor | None = None  # Qbar [N]
        #: per model: Phi_m [N, k], the Cholesky factor of Phi_m^T Phi_m + lambda I, and the
        #: divisor of its inverse (1, or its mean absolute entry with normalise=True)
        self._models_data: list[tuple[Tensor, Tensor, float]] = []
        self._output_engine: PerExample | None = None

    # ------------------------------------------------------------------ fit
    def _functions(self, task: Task):
        if self.output is not None:
            return self.output, self.out_to_loss
        if task.name == "classification":
            return classification_margin, _softmax_out_to_loss
        if task.name == "binary_classification":
            return _binary_margin, _binary_out_to_loss
        raise UnsupportedError(
            f"TRAK's default output (the margin) and out-to-loss weights are defined for "
            f"Task.classification and Task.binary_classification; this task is {task.name!r}: "
            "pass output=fn(outputs, targets) and out_to_loss=fn(outputs, targets)"
        )

    def _models(self):
        """Context managers placing the model at each ensemble member in turn."""
        space = self.context.space
        if self.checkpoints is None:
            return [contextlib.nullcontext()]
        return [parameters_at(space, w, k) for k, w in enumerate(self.checkpoints)]

    def fit(self, context: FitContext) -> None:
        self.context = context
        task, space, n = context.task, context.space, context.n
        output, out_to_loss = self._functions(task)
        output_task = Task(task.model, task.loss, output, output_fn=task.output_fn)
        self._output_engine = PerExample(output_task, space, context.per_example.mode)
        self._out_to_loss = out_to_loss
        for k, w in enumerate(self.checkpoints or []):
            checkpoint_vector(space, w, k)
        k = space.size if self.projection == "identity" else min(self.proj_dim, space.size)
        models = 1 if self.checkpoints is None else len(self.checkpoints)
        need = (models * n * k + 2 * k * k) * 8
        if need > context.memory_limit:
            raise ProblemTooLargeError(
                f"method='trak' keeps {models} x {n:,} x {k:,} projected features "
                f"({human_bytes(need)}), above the memory limit of "
                f"{human_bytes(context.memory_limit)}; lower proj_dim"
            )
        if self.lambda_reg == 0 and k > n:
            raise CurvatureError(
                f"with lambda_reg=0, Phi^T Phi ({k} x {k}) is singular because proj_dim {k} "
                f"exceeds the {n} training examples: lower proj_dim below N or set lambda_reg > 0"
            )
        self.projector = Projector(
            space.size,
            k,
            self.projection,
            self.seed,
            space.dtype,
            space.device,
            self.projection_memory,
        )
        weights = torch.zeros(n, dtype=torch.float64)
        self._models_data = []
        for m, at in enumerate(self._models()):
            with at:
                Phi = torch.empty(n, k, dtype=torch.float64, device=space.device)
                for batch in context.train.batches(context.batch_size):
                    G = self._output_engine.grads(batch, "measurement")
                    Phi[batch.indices] = self.projector.project(G)
                    outputs = context.per_example.outputs(batch)
                    _, targets = context.per_example.prepare(batch)
                    weights[batch.indices] += out_to_loss(outputs, targets).to(torch.float64).cpu()
            self._models_data.append(self._factorise(Phi, m))
        self.weights = weights / len(self._models_data)

    def _factorise(self, Phi: Tensor, m: int) -> tuple[Tensor, Tensor, float]:
        k = Phi.shape[1]
        gram = Phi.T @ Phi + self.lambda_reg * torch.eye(k, dtype=Phi.dtype, device=Phi.device)
        L, info = torch.linalg.cholesky_ex(gram)
        if int(info) != 0:
            raise CurvatureError(
                f"TRAK's feature Gram matrix Phi^T Phi + lambda I of model {m} is singular or "
                f"numerically indefinite (lambda_reg={self.lambda_reg:g}, proj_dim={k}, "
                f"N={Phi.shape[0]}): raise lambda_reg or lower proj_dim"
            )
        divisor = float(torch.cholesky_inverse(L).abs().mean()) if self.normalise else 1.0
        return Phi, L, divisor

    @staticmethod
    def _inverse_times(X: Tensor, L: Tensor, divisor: float) -> Tensor:
        """X (Phi^T Phi + lambda I)^{-1} / divisor for rows X [r, k]."""
        return torch.cholesky_solve(X.T, L).T / divisor

    # ------------------------------------------------------------------ questions
    def _check(self, estimator: str) -> None:
        if estimator != "if":  # pragma: no cover - guarded by check_estimator
            raise UnsupportedError(f"method 'trak' supports estimator 'if' only, not {estimator!r}")

    def scores(self, state, test: ExampleSet, estimator: str, relatif: str) -> Tensor:
        self._check(estimator)
        S = torch.zeros(len(test), state.n, dtype=torch.float64)
        for (Phi, L, divisor), at in zip(self._models_data, self._models()):
            with at:
                F = torch.cat(
                    [
                        self.projector.project(state.engine.grads(b, "measurement"))
                        for b in test.batches(state.batch_size)
                    ]
                )
            S += (self._inverse_times(F, L, divisor) @ Phi.T).cpu()
        return -(S / len(self._models_data)) * self.weights.unsqueeze(0)

    def self_scores(self, state, estimator: str, relatif: str) -> Tensor:
        self._check(estimator)
        out = torch.zeros(state.n, dtype=torch.float64)
        for (Phi, L, divisor), at in zip(self._models_data, self._models()):
            with at:
                for batch in state.train.batches(state.batch_size):
                    F = self.projector.project(state.engine.grads(batch, "loss"))
                    W = self._inverse_times(F, L, divisor)
                    out[batch.indices] += (W * Phi[batch.indices]).sum(1).cpu()
        return -(out / len(self._models_data)) * self.weights

    def group_delta(self, state, indices: Tensor, estimator: str) -> Tensor:
        self._check(estimator)
        total = 0.0
        for Phi, L, divisor in self._models_data:
            q = self.weights[indices].to(Phi.device)
            total = total + self._inverse_times((Phi[indices].T @ q).unsqueeze(0), L, divisor)[0]
        return -self.projector.back(total / len(self._models_data))

    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        raise UnsupportedError(
            "method 'trak' answers scores, self_scores and remove directly from its projected "
            "features; it has no inverse curvature to apply (input_influence is not available)"
        )

    def features(self, data: Any, which: str = "measurement", model: int = 0) -> Tensor:
        """Projected gradients R^T grad [n, k] of ``which`` ("measurement", "loss" or "output")."""
        examples = ExampleSet(data, name="data")
        ctx = self.context
        engine = self._output_engine if which == "output" else ctx.per_example
        kind = "measurement" if which == "output" else which
        with self._models()[model]:
            return torch.cat(
                [
                    self.projector.project(engine.grads(b, kind))
                    for b in examples.batches(ctx.batch_size)
                ]
            )

    def describe(self) -> dict[str, object]:
        out = super().describe()
        out.update(
            proj_dim=None if self.projector is None else self.projector.dim,
            projection=self.projection,
            lambda_reg=self.lambda_reg,
            models=1 if self.checkpoints is None else len(self.checkpoints),
            normalise=self.normalise,
            projection_kept=None if self.projector is None else self.projector.matrix is not None,
        )
        return out
