"""method="trak": random projections and the one-step-Newton logistic surrogate (docs/methods/trak.md).

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
form, default 0 as in trak; the default ``proj_dim="auto"`` stays below N / 4). The global scale is that of a
surrogate model: use TRAK for ranking and LDS rather than to predict absolute changes.

``checkpoints`` (state dicts or flat vectors of the same architecture: checkpoints of one run, or
independently trained models) make the ensemble; by default the fitted model alone (M = 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from infkit import language_modeling
from infkit.checkpoints import Checkpoint, checkpoint_vector, parameters_at
from infkit.data import ExampleSet
from infkit.errors import (
    CurvatureError,
    InvalidInputError,
    NotFittedError,
    Notice,
    ProblemTooLargeError,
    UnsupportedError,
    warn,
)
from infkit.estimators import Estimator
from infkit.fitted import Fitted, warn_about_still_queries
from infkit.gradients import PerExample, Which, directional_derivatives
from infkit.memory import FLOAT64_BYTES, default_memory_limit, human_bytes, row_chunks
from infkit.methods.base import (
    Fidelity,
    Method,
    Problem,
    batch_gradient_bytes,
    gradient_batch_rows,
    register,
)
from infkit.options import Options, option
from infkit.parameters import ParameterSpace
from infkit.plan import RunShape, Stage
from infkit.task import Task, classification_margin

Projection = Literal["rademacher", "gaussian", "identity"]
#: rows of R generated per seeded chunk (fixes R independently of how it is used)
CHUNK_ROWS = 1024
#: floating-point operations one entry of R costs to draw, as the plan prices it (torch's
#: generator and the conversion to float: about 300 times a matrix product's operation on a
#: CPU core), for a projection regenerated chunk by chunk at every batch
RANDOM_COST = 300.0
#: the largest automatic projection dimension (trak's default proj_dim)
TRAK_DEFAULT_DIM = 2048
#: a Gram matrix's direction is null (:meth:`Trak._span_factor`) below this many epsilons
#: squared of the model's dtype times the largest eigenvalue (float32 3.6e-16-1.9e-15 measured)
NULL_ROUNDINGS = 10.0
#: a Cholesky factor whose smallest pivot, squared, is this small against its largest is
#: looked at for null directions (repeated examples) whatever k
SUSPECT = 1e-8
#: ``proj_dim="auto"`` stays at or below N / this
AUTO_DIM_DIVISOR = 4
#: an automatic projection narrower than this (and than P) is told as a Notice: few examples
FEW_DIMENSIONS = 64


def _softmax_out_to_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """``1 - p_y``, in float64 (in float32 it is 0 once ``1 - p_y < 6e-8``: a reviewer's 84 of
    140 training weights of a confident float32 model), returned in the outputs' dtype."""
    p = torch.softmax(outputs.double(), dim=-1)
    return (1.0 - p.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)).to(outputs.dtype)


def _binary_margin(outputs: Tensor, targets: Tensor) -> Tensor:
    z = outputs.reshape(outputs.shape[0])  # one logit per example
    return (2 * targets.to(z.dtype).reshape(z.shape) - 1) * z


def _binary_out_to_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """``1 - sigmoid(m)`` as ``sigmoid(-m)``: exact where the difference rounds to 0."""
    return torch.sigmoid(-_binary_margin(outputs, targets))


def keeps_projection(size: int, dim: int, itemsize: int, memory: int) -> bool:
    """Whether :class:`Projector` keeps R [``size``, ``dim``] whole within ``memory`` bytes
    (else it regenerates it a chunk of :data:`CHUNK_ROWS` rows at a time from its seed)."""
    return size * dim * itemsize <= memory


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
        if kind != "identity" and keeps_projection(size, self.dim, itemsize, memory):
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


@dataclasses.dataclass(frozen=True)
class TrakOptions(Options):
    """Options of ``method="trak"``."""

    proj_dim: int | Literal["auto"] = option(
        "auto",
        "k, the projection dimension; 'auto' = min(2048, P, N // 4), safely below N",
        minimum=1,
    )
    projection: Projection = option(
        "rademacher", "'rademacher', 'gaussian' (entries scaled by 1/sqrt(k)) or 'identity' (k = P)"
    )
    lambda_reg: float = option(0.0, "ridge added to Phi^T Phi (sum form; 0 as in trak)", minimum=0)
    checkpoints: Sequence[Checkpoint] | None = option(
        None, "models of the ensemble (state dicts or flat [P] vectors); default: the fitted one"
    )
    normalise: bool = option(
        False, "divide each model's (Phi^T Phi + lambda I)^-1 by its mean |entry| (trak's option)"
    )
    output: Callable[..., Tensor] | None = option(
        None, "fn(outputs, targets) -> [B], the model output function f (default: the margin)"
    )
    out_to_loss: Callable[..., Tensor] | None = option(
        None, "fn(outputs, targets) -> [B], the weights Q (default: 1 - p_y)"
    )
    seed: int = option(0, "seeds the projection")
    projection_memory: int = option(
        512 << 20, "bytes R may take in memory before it is streamed chunk by chunk", minimum=0
    )

    def __post_init__(self) -> None:
        if (self.output is None) != (self.out_to_loss is None):
            raise InvalidInputError("method 'trak': pass both output and out_to_loss, or neither")
        if self.checkpoints is not None and not list(self.checkpoints):
            raise InvalidInputError(
                "method 'trak': checkpoints is empty; pass at least one, or None"
            )


def default_projection_dim(n: int, p: int) -> int:
    """``proj_dim="auto"``: min(2048, P, N // 4), at least 1 (docs/methods/trak.md §5)."""
    return max(1, min(TRAK_DEFAULT_DIM, p, n // AUTO_DIM_DIVISOR))


@register
class Trak(Method):
    """TRAK: projected output gradients, logistic one-step Newton, ensembled over checkpoints.

    See the module docstring and docs/methods/trak.md. With ``proj_dim="auto"`` the projection
    stays well below the number of training examples (the Gram matrix ``Phi^T Phi`` is then
    invertible without a ridge); a projection wider than N / 2 with ``lambda_reg=0`` triggers a
    warning, because ``(Phi^T Phi)^{-1}`` inflates by about ``N / (N - k)`` there.
    """

    name = "trak"
    summary = "TRAK: random projections of gradients, one-step-Newton logistic surrogate, ensembles"
    Options = TrakOptions
    scales = True
    curvature = "feature-gram"
    uses_training_gradients = False
    # a surrogate of its own scale: about a tenth of the IF on the small problems
    fidelity = Fidelity(
        rtol=None, min_correlation=0.45, removal_correlation=0.25, scale=(0.02, 0.5)
    )
    #: the out-to-loss weights; :meth:`state` adds each model's features and Cholesky factor
    #: and the projection's size (R itself is regenerated from its seed on restore)
    fitted_state = ("weights",)
    options: TrakOptions

    def __init__(self, options: TrakOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self.projector: Projector | None = None
        self.weights: Tensor | None = None  # Qbar [N]
        #: per model: Phi_m [N, k], the Cholesky factor of Phi_m^T Phi_m + lambda I, and the
        #: divisor of its inverse (1, or its mean absolute entry with normalise=True)
        self._models_data: list[tuple[Tensor, Tensor, float]] = []
        self._output_engine: PerExample | None = None

    @property
    def assumes_optimum(self) -> bool:
        # a surrogate of its own, not a counterfactual at an optimum: no stationarity check
        return False

    # ------------------------------------------------------------------ fit
    def _functions(self, task: Task) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
        options = self.options
        if options.output is not None and options.out_to_loss is not None:
            return options.output, options.out_to_loss
        if task.name == "classification":
            return classification_margin, _softmax_out_to_loss
        if task.name == "binary_classification":
            return _binary_margin, _binary_out_to_loss
        if task.name == "language_modeling":
            return language_modeling.margin, language_modeling.margin_to_loss
        raise UnsupportedError(
            f"TRAK's default output (the margin) and out-to-loss weights are defined for "
            f"Task.classification, binary_classification and language_modeling; this task is {task.name!r}: "
            "pass output=fn(outputs, targets) and out_to_loss=fn(outputs, targets)"
        )

    def _models(self) -> list[contextlib.AbstractContextManager[Any]]:
        """Context managers placing the model at each ensemble member in turn."""
        space = self.fitted.space
        if self.options.checkpoints is None:
            return [contextlib.nullcontext()]
        return [parameters_at(space, w, k) for k, w in enumerate(self.options.checkpoints)]

    def projection_dim(self, n: int, p: int) -> int:
        """k for N = ``n`` training examples and P = ``p`` parameters, as the options say."""
        options = self.options
        if options.projection == "identity":
            return p
        if options.proj_dim == "auto":
            return default_projection_dim(n, p)
        return min(int(options.proj_dim), p)

    def check_memory(self, problem: Problem) -> None:
        """The projected features TRAK keeps, before any pass (and at a load under a smaller
        limit, which restores them without a fit: a reviewer's load at a limit a fit refuses
        answered)."""
        super().check_memory(problem)
        self._check_features(
            problem.n, self.projection_dim(problem.n, problem.p), problem.memory_limit
        )

    def _check_features(self, n: int, k: int, limit: int) -> None:
        """Refuse features [M, N, k] (with the Gram) beyond ``limit``."""
        need = self._feature_bytes(n, k)
        if need > limit:
            raise ProblemTooLargeError(
                f"method='trak' keeps {self._model_count()} x {n:,} x {k:,} projected features "
                f"({human_bytes(need)}), above the memory limit of {human_bytes(limit)}; lower "
                "proj_dim"
            )

    def _model_count(self) -> int:
        return 1 if self.options.checkpoints is None else len(self.options.checkpoints)

    def _feature_bytes(self, n: int, k: int) -> int:
        """The fit's projected features [M, N, k] and a k x k Gram and factor, float64."""
        return (self._model_count() * n * k + 2 * k * k) * FLOAT64_BYTES

    def _projection_bytes(self, p: int, k: int, itemsize: int, limit: int) -> tuple[int, bool]:
        """Bytes of R [P, k] as :class:`Projector` holds it, and whether it is kept whole (else
        a chunk of :data:`CHUNK_ROWS` rows at a time, regenerated from its seed)."""
        if self.options.projection == "identity":
            return 0, False
        if keeps_projection(p, k, itemsize, self._projection_budget(limit)):
            return p * k * itemsize, True
        return min(CHUNK_ROWS, p) * k * itemsize, False

    def _projection_budget(self, limit: int) -> int:
        """The bytes R may take whole under a ``memory_limit`` of ``limit``."""
        return min(self.options.projection_memory, limit // 4)

    def query_row_bytes(self, n: int, p: int, estimator: Estimator | None = None) -> int:
        """A query's projected gradient [k] and its solve, its score row against each model's
        features and their sum [N], float64 (the P-sized gradients come a batch at a time)."""
        k = self.projection_dim(n, p)
        return (2 * k + 3 * n) * FLOAT64_BYTES

    def stages(self, shape: RunShape, task: Task, space: ParameterSpace) -> list[Stage]:
        """One pass a model (checkpoint) projecting the training gradients, then the queries
        projected a batch at a time and scored against the kept features: no pass over the
        training data after the fit."""
        n, q, p = shape.n_train, shape.n_queries, shape.parameters
        limit = shape.memory_limit or default_memory_limit()
        k, models = self.projection_dim(n, p), self._model_count()
        features = self._feature_bytes(n, k)
        factors = models * k * k * FLOAT64_BYTES  # each model's Cholesky factor, kept
        projection, kept = self._projection_bytes(p, k, shape.itemsize, limit)
        gradients, rows = batch_gradient_bytes(shape), gradient_batch_rows(shape)
        objects = [
            (f"projected features [{models}, N, {k}] and the Gram, float64", features),
            (f"R [P, {k}]" + (", kept" if kept else ", a chunk at a time"), projection),
            (f"a batch's per-example gradients [{rows}, P]", gradients),
        ]
        # the projections (2 P k a gradient), R drawn once when kept, else at every batch (a
        # tester's streamed fit took 615 times a plan that counted neither), the Gram matrices
        identity = self.options.projection == "identity"  # (no product, no draw: a cast)
        span = 2 * k >= p and self.options.lambda_reg == 0
        draw = 0.0 if identity else p * k * RANDOM_COST
        project = 0.0 if identity else 2.0 * p * k * models
        train_batches = -(-n // shape.batch_size) * models
        query_batches = -(-q // shape.batch_size) * models
        fit = Stage(
            "fit trak",
            models,
            features + factors + projection + gradients,
            max(objects, key=lambda o: o[1]),
            "one pass per model (checkpoint)",
            held=features - 2 * k * k * FLOAT64_BYTES + factors + (projection if kept else 0),
            flops=n * project + (draw if kept else draw * train_batches),
            # the Gram, its Cholesky factor and, where k is near P without a ridge (the
            # identity's k = P), the eigendecomposition that looks for the features' span (about
            # 9 k^3; _factorise's "suspect", a pivot at rounding's level aside)
            float64_flops=(n * k * k + k**3 / 3 + (9.0 * k**3 if span else 0.0)) * models,
        )
        row = self.query_row_bytes(n, p)
        chunks = row_chunks(q, row, q * n * FLOAT64_BYTES, limit)
        chunk = max(stop - start for start, stop in chunks) * row
        result = q * n * FLOAT64_BYTES
        queries = Stage(
            "queries",
            0,
            gradients + chunk + (0 if kept else projection),
            (f"a batch's per-example gradients [{rows}, P]", gradients),
            f"{len(chunks)} chunks of queries" if len(chunks) > 1 else "",
            flops=q * project + (0 if kept else draw * query_batches),
        )
        scores = Stage(
            "scores",
            0,
            result + chunk,
            ("[Q, N] scores, float64", result),
            "against the kept features: no pass over the training data",
            flops=2.0 * q * n * k * models,
        )
        return [fit, queries, scores]

    def plan_advice(self, stages: list[Stage]) -> str:
        """The lever of the largest object of the largest stage."""
        largest = max(stages, key=lambda stage: stage.bytes).largest[0]
        if largest.startswith("projected features"):
            return "lower proj_dim, use fewer checkpoints, or attribute fewer training examples"
        if largest.startswith("R ") and largest.endswith("kept"):
            return "lower projection_memory (R is then regenerated from its seed) or proj_dim"
        if largest.startswith("R "):
            return "lower proj_dim (R is already regenerated from its seed a chunk at a time)"
        if largest.startswith("a batch's"):
            smaller = "" if largest.endswith("[1, P]") else ", or use a smaller batch_size"
            return (
                f"attribute fewer parameters (freeze some: requires_grad=False){smaller}: each "
                "batch's per-example gradients are [B, P]"
            )
        return "score fewer queries per call: the [Q, N] scores are float64"

    def _dimension(self, n: int, p: int) -> int:
        """:meth:`projection_dim`, told when "auto" leaves few dimensions and refused when a
        given one leaves ``Phi^T Phi`` singular without a ridge."""
        options = self.options
        k = self.projection_dim(n, p)
        if options.projection == "identity":
            return k  # its features' span is held to N once known (:meth:`_check_span`)
        if options.proj_dim == "auto":
            if k < min(FEW_DIMENSIONS, p):
                warn(
                    f"TRAK's proj_dim='auto' projects the {p:,} gradient coordinates to k = {k} "
                    f"(N // {AUTO_DIM_DIVISOR}, at least 1, with N = {n} training examples, which "
                    "keeps Phi^T Phi well conditioned without a ridge): so few dimensions keep "
                    "little of the gradients, and the scores rank coarsely. With this few "
                    "examples a method without projection (identity, ekfac, cg) costs little; "
                    "or pass a larger proj_dim with lambda_reg > 0 (docs/methods/trak.md §5)",
                    Notice,
                )
            return k
        if int(options.proj_dim) > p:  # (capped without a word: describe() alone said k)
            warn(
                f"TRAK's proj_dim={options.proj_dim} exceeds the {p:,} attributed parameters: "
                f"projected to k = {p}, the gradients whole (projection='identity' says so "
                "without a random projection)",
                Notice,
            )
        if options.lambda_reg == 0 and k > n:
            raise CurvatureError(
                f"with lambda_reg=0, Phi^T Phi ({k} x {k}) is singular because proj_dim {k} "
                f"exceeds the {n} training examples: lower proj_dim below N (proj_dim='auto' "
                "picks N // 4) or set lambda_reg > 0"
            )
        if options.lambda_reg == 0 and k > n / 2:
            inflation = f"{n / (n - k):.1f}" if k < n else "an unbounded factor"
            warn(
                f"TRAK's proj_dim {k} is close to the {n} training examples: with lambda_reg=0 "
                f"(Phi^T Phi)^-1 inflates by about N / (N - k) = {inflation} and the scores "
                "become noisy; use proj_dim='auto' (N // 4), a smaller proj_dim or lambda_reg > 0",
                UserWarning,
            )
        return k

    def _check_span(self, rank: int, n: int, m: int) -> None:
        """Hold the features without a ridge to N by the directions they span (``rank``, known
        once factorised): refused where they span as many as there are training examples, for
        the pseudo-inverse (or inverse) then attributes every training example to itself alone
        (a tester's identity projection, train x train scores diagonal to 2.6e-16; a reviewer's
        proj_dim = N). k alone says nothing of it: a softmax regression's margin gradients span
        10 of its 15 parameters, and 12 examples invert them exactly. The identity projection is
        warned of above N / 2 by its span too (a projection is, by k: :meth:`_dimension`)."""
        if self.options.lambda_reg != 0:
            return
        identity = self.options.projection == "identity"
        if rank >= n:
            remedy = (
                "project them (projection='rademacher' with proj_dim='auto' picks N // 4)"
                if identity
                else "lower proj_dim below N (proj_dim='auto' picks N // 4)"
            )
            raise CurvatureError(
                f"with lambda_reg=0, the features of model {m} span {rank} directions, as many "
                f"as the {n} training examples: their inverse attributes every training example "
                f"to itself alone. {remedy[0].upper()}{remedy[1:]} or set lambda_reg > 0"
            )
        if identity and rank > n / 2:
            warn(
                f"TRAK's projection='identity': the gradients of model {m} span {rank} "
                f"directions, close to the {n} training examples: with lambda_reg=0 the inverse "
                f"inflates by about N / (N - rank) = {n / (n - rank):.1f} and the scores become "
                "noisy; project them (proj_dim='auto' picks N // 4) or set lambda_reg > 0",
                UserWarning,
            )

    def check(self, task: Task, space: ParameterSpace) -> None:
        self._functions(task)
        for k, w in enumerate(self.options.checkpoints or []):
            checkpoint_vector(space, w, k)

    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        options = self.options
        task, space, n = fitted.task, fitted.space, fitted.n
        _, out_to_loss = self._functions(task)
        self._output_engine = self._output_gradients(fitted)
        for k, w in enumerate(options.checkpoints or []):
            checkpoint_vector(space, w, k)
        k = self._dimension(n, space.size)
        self._check_features(n, k, fitted.memory_limit)
        self.projector = Projector(
            space.size,
            k,
            options.projection,
            options.seed,
            space.dtype,
            space.device,
            self._projection_budget(fitted.memory_limit),
        )
        weights = torch.zeros(n, dtype=torch.float64)
        self._models_data = []
        for m, at in enumerate(self._models()):
            with at:
                Phi = torch.empty(n, k, dtype=torch.float64, device=space.device)
                for batch in fitted.train.batches(fitted.gradient_batch_size):
                    G = self._output_engine.grads(batch, "measurement")
                    Phi[batch.indices] = self.projector.project(G)
                    outputs = fitted.engine.outputs(batch)
                    _, targets = fitted.engine.prepare(batch)
                    weights[batch.indices] += out_to_loss(outputs, targets).to(torch.float64).cpu()
            self._models_data.append(self._factorise(Phi, m))
        self.weights = weights / len(self._models_data)

    def _output_gradients(self, fitted: Fitted) -> PerExample:
        """The engine of the output function's gradients (the features)."""
        task = fitted.task
        output, _ = self._functions(task)
        output_task = Task(
            task.model, task.loss, output, output_fn=task.output_fn, higher_is_better=True
        )
        return PerExample(output_task, fitted.space, fitted.engine.mode)

    def state(self) -> dict[str, Any]:
        out = super().state()
        projector, _ = self._fitted_parts()
        out["models"] = [list(model) for model in self._models_data]
        out["projection"] = {"dim": projector.dim, "kept": projector.matrix is not None}
        return out

    def restore(self, fitted: Fitted, state: Mapping[str, Any]) -> None:
        super().restore(fitted, state)
        space, options = fitted.space, self.options
        projection = state["projection"]
        self.projector = Projector(
            space.size,
            int(projection["dim"]),
            options.projection,
            options.seed,
            space.dtype,
            space.device,
            1 << 62 if projection["kept"] else -1,  # kept (or streamed) as at fit
        )
        self._models_data = [(Phi, L, float(divisor)) for Phi, L, divisor in state["models"]]
        self._output_engine = self._output_gradients(fitted)

    def _factorise(self, Phi: Tensor, m: int) -> tuple[Tensor, Tensor, float]:
        k = Phi.shape[1]
        lam = self.options.lambda_reg
        gram = Phi.T @ Phi + lam * torch.eye(k, dtype=Phi.dtype, device=Phi.device)
        L, info = torch.linalg.cholesky_ex(gram)
        pivots = L.diagonal().abs()
        # a small model (k near P: a margin's null directions), a singular Gram, or a pivot
        # at rounding's level (repeated examples): the span is looked for
        suspect = 2 * k >= self.fitted.space.size or int(info) != 0
        suspect = suspect or float(pivots.min() / pivots.max().clamp_min(1e-300)) ** 2 < SUSPECT
        found = self._span_factor(gram, m) if lam == 0 and suspect else None
        if found is None and int(info) != 0:
            raise CurvatureError(
                f"TRAK's feature Gram matrix Phi^T Phi + lambda I of model {m} is singular or "
                f"numerically indefinite (lambda_reg={lam:g}, proj_dim={k}, "
                f"N={Phi.shape[0]}): raise lambda_reg or lower proj_dim"
            )
        if found is not None:  # (its span held to N there)
            L, inverse = found
        else:  # every direction spanned
            self._check_span(k, Phi.shape[0], m)
            inverse = torch.cholesky_inverse(L)
        divisor = float(inverse.abs().mean()) if self.options.normalise else 1.0
        return Phi, L, divisor

    def _span_factor(self, gram: Tensor, m: int) -> tuple[Tensor, Tensor] | None:
        """For a Gram matrix ``Phi^T Phi`` whose features span fewer directions than k: the
        Cholesky factor of ``Phi^T Phi + top * P_null`` and its pseudo-inverse, the span held
        to N first (:meth:`_check_span`); None where every direction is spanned.

        A softmax classifier's margin does not change when every logit moves together, so its
        gradients are orthogonal to those moves, the queries' as the training examples' (a
        softmax regression of 4 inputs and 3 classes spans 10 of its 15 parameters); repeated
        examples span fewer directions than k too. A direction is null where its eigenvalue is
        at rounding's level: :data:`NULL_ROUNDINGS` epsilons squared of the model's dtype (the
        features' own rounding: a float32 model's null directions read 4e-16 to 2e-15 of the
        largest, which an exact inverse would amplify to the scores' size), or ten epsilons of
        the Gram's (a float64 softmax's null directions read up to 2.3e-16 of the largest, and a
        float64 direction above it amplifies its own rounding by at most 1e-7), times the
        largest; a small but spanned direction (two inputs 3e-6 apart in float32: 1.9e-12 of
        the largest; 3e-5 apart in float64: 2.4e-15) is kept. The null directions get the
        largest eigenvalue as their own, so what rounding leaves along them is not amplified,
        and the solves are the pseudo-inverse's on the span.
        """
        values, vectors = torch.linalg.eigh(gram)
        top = float(values[-1])
        features = torch.finfo(self.fitted.space.dtype).eps  # the gradients' precision
        gram_rounding = 10 * torch.finfo(gram.dtype).eps  # float64's nulls read <= 2.3e-16
        floor = max(gram_rounding, NULL_ROUNDINGS * features**2)
        null = values <= floor * top
        if not top > 0 or not bool(null.any()):
            return None
        rank = int((~null).sum())
        self._check_span(rank, self.fitted.n, m)  # (before the notice: it blamed the margin)
        avoid = (
            ""
            if self.options.projection == "identity"
            else f"; proj_dim <= {rank} avoids the null directions"
        )
        warn(
            f"TRAK's projected features of model {m} span {rank} of their {gram.shape[0]} "
            "dimensions (their gradients have null directions: a softmax margin does not change "
            "when every logit moves together, and repeated inputs or examples leave others): "
            f"the Gram matrix is inverted on the features' span (its pseudo-inverse){avoid}",
            Notice,
        )
        spanned = vectors[:, ~null]
        lifted = torch.where(null, torch.full_like(values, top), values)
        L = torch.linalg.cholesky((vectors * lifted) @ vectors.T)
        inverse = (spanned / values[~null]) @ spanned.T
        return L, inverse

    @staticmethod
    def _inverse_times(X: Tensor, L: Tensor, divisor: float) -> Tensor:
        """X (Phi^T Phi + lambda I)^{-1} / divisor for rows X [r, k]."""
        return torch.cholesky_solve(X.T, L).T / divisor

    def _fitted_parts(self) -> tuple[Projector, Tensor]:
        if self.projector is None or self.weights is None:
            raise NotFittedError("method 'trak' is not fitted")
        return self.projector, self.weights

    # ------------------------------------------------------------------ answers
    def scores(self, queries: ExampleSet, estimator: Estimator) -> Tensor:
        fitted = self.fitted
        projector, weights = self._fitted_parts()
        S = torch.zeros(len(queries), fitted.n, dtype=torch.float64)
        moved = torch.zeros(len(queries), dtype=torch.bool)  # a gradient not 0 in some model
        for (Phi, L, divisor), at in zip(self._models_data, self._models()):
            features = []
            with at:
                for batch in queries.batches(fitted.gradient_batch_size):
                    G = fitted.engine.grads(batch, "measurement")
                    features.append(projector.project(G))
                    moved[batch.indices] |= (G != 0).any(dim=1).cpu()
            S += (self._inverse_times(torch.cat(features), L, divisor) @ Phi.T).cpu()
        warn_about_still_queries(queries, moved, fitted.engine.precision)
        return -(S / len(self._models_data)) * weights.unsqueeze(0)

    def self_scores(self, estimator: Estimator) -> Tensor:
        fitted = self.fitted
        projector, weights = self._fitted_parts()
        out = torch.zeros(fitted.n, dtype=torch.float64)
        for (Phi, L, divisor), at in zip(self._models_data, self._models()):
            with at:
                for batch in fitted.train.batches(fitted.gradient_batch_size):
                    F = projector.project(fitted.engine.grads(batch, "loss"))
                    W = self._inverse_times(F, L, divisor)
                    out[batch.indices] += (W * Phi[batch.indices]).sum(1).cpu()
        return -(out / len(self._models_data)) * weights

    def removal(self, indices: Tensor, estimator: Estimator) -> Tensor:
        estimator.require_counterfactual()
        return torch.stack(self._model_steps(indices)).mean(0)

    def _model_steps(self, indices: Tensor) -> list[Tensor]:
        """Each model's parameter change for removing ``indices``, ``Delta theta_{m,F} = -R
        (Phi_m^T Phi_m + lambda I)^-1 Phi_{m,F}^T Q_bar_F`` [P] float64, one per model."""
        projector, weights = self._fitted_parts()
        steps = []
        for Phi, L, divisor in self._models_data:
            q = weights[indices].to(Phi.device)
            part = self._inverse_times((Phi[indices].T @ q).unsqueeze(0), L, divisor)[0]
            steps.append(-projector.back(part))
        return steps

    def removal_change(
        self, data: ExampleSet, indices: Tensor, estimator: Estimator, which: str
    ) -> Tensor | None:
        """With checkpoints, the change of ``which`` averaged over the models as the scores
        average: ``(1/M) sum_m J(theta_m) Delta theta_{m,F}``, each model's change met at its own
        parameters (docs/methods/trak.md §3), so that a group's change of the measurement is the
        sum of its scores. ``J(theta*)`` times the models' mean change would meet each with
        another model's gradient (independently trained models share no coordinates)."""
        if self.options.checkpoints is None:
            return None
        estimator.require_counterfactual()
        fitted = self.fitted
        parts = []
        for step, at in zip(self._model_steps(indices), self._models()):
            with at:
                batches = data.batches(fitted.gradient_batch_size)
                parts.append(
                    torch.cat(
                        [directional_derivatives(fitted.engine, b, step, which) for b in batches]
                    )
                )
        return torch.stack(parts).mean(0)

    def features(self, data: Any, which: str = "measurement", model: int = 0) -> Tensor:
        """Projected gradients R^T grad [n, k] of ``which`` ("measurement", "loss" or "output")."""
        fitted = self.fitted
        projector, _ = self._fitted_parts()
        examples = fitted.examples(data, "data")
        engine = self._output_engine if which == "output" else fitted.engine
        if engine is None:
            raise NotFittedError("method 'trak' is not fitted")
        kind: Which = "loss" if which == "loss" else "measurement"
        with self._models()[model]:
            return torch.cat(
                [
                    projector.project(engine.grads(b, kind))
                    for b in examples.batches(fitted.gradient_batch_size)
                ]
            )

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = super().describe()
        out.update(
            proj_dim=None if self.projector is None else self.projector.dim,
            models=len(self._models_data),
            projection_kept=None if self.projector is None else self.projector.matrix is not None,
        )
        return out
