"""method="dual": influence in N*C space through the empirical NTK (docs/methods/dual.md).

Every GGN-based influence quantity has a kernel form (the push-through identity
``(J^T B J + mu I)^{-1} J^T = J^T (B K + mu I)^{-1}``, B = Lambda/N, K = J J^T), so the cost grows
with the data (N examples x C outputs), not with the parameter count P. The answers equal the
primal GGN answers of ``method="exact"`` (same objective, same estimator) to rounding whenever J
and Lambda are evaluated at the same point; no P x P or N x P object is ever formed.

Conventions (the core's, docs/conventions.md): the model was trained on
``L = mean_i l_i + (l2/2)||theta - theta'||^2`` (anchor theta' = 0 by default), the attributed
training gradient is ``v_j = grad l_j + l2 (theta* - theta')`` and every answer is a removal effect
with 1/N included. The regulariser term is carried exactly through the representer split

    theta* - theta' = J^T alpha* + r,     alpha* = -g / (l2 N)   (g stacks g_i = dl_i/df),

where r = grad L(theta*) / l2 vanishes at an exact optimum (docs/methods/dual.md §2, §8). r is computed (one
VJP) when J is taken at theta*, so the dual stays equal to the primal at a loose optimum; with
``linearize_at`` the representer is assumed (r = 0), as in the paper. Any vector
``J^T e + s r`` then maps through the inverse retained curvature
``H_R = (1/N) sum_{i in R} J_i^T Lambda_i J_i + mu I`` as

    H_R^{-1}(J^T e + s r) = J^T Delta-alpha + (s/mu) r,
    Delta-alpha_F = e_F / mu,
    (B_R K_RR + mu I) Delta-alpha_R = e_R - B_R (K_RF e_F + s (J r)_R) / mu,

which is the push-through form for the plain IF (R = all, mu = l2 + damping) and the simplified
dual Newton system of §1.4 for group removal (R = retained set, mu = (N_R/N) l2 + damping;
``Delta-alpha_F = -alpha*_F``). RIF and the per-example Newton step downdate one example's own
curvature with its C x C leverage block ``M_j = J_j G^{-1} J_j^T = [K (B K + mu I)^{-1}]_jj``.
Parameters come back by one VJP (``Delta theta = J^T Delta alpha``), outputs as
``K(X_t, X) Delta alpha``.

The dual systems are :class:`infkit.kernel_linalg.KernelSystem` (``form`` and ``solver`` choose
the factorisation); the kernel is :mod:`infkit.ntk`, the tangent products are the one
per-example engine's (:class:`infkit.gradients.PerExample` at the expansion point).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from infkit.data import Batch, ExampleSet
from infkit.errors import (
    CurvatureError,
    InvalidInputError,
    NonFiniteError,
    NotFittedError,
    UnsupportedError,
)
from infkit.estimators import Estimator, EstimatorName, check_leverage
from infkit.fitted import Fitted, warn_about_still_queries
from infkit.gradients import PerExample, Which
from infkit.kernel_linalg import Form, KernelSystem, Solver
from infkit.linearize import LinearizedModel
from infkit.memory import FLOAT64_BYTES, human_bytes
from infkit.methods.base import (
    PRECONDITIONED,
    Fidelity,
    PrimalMethod,
    Problem,
    register,
    registered,
    scalable_methods,
)
from infkit.ntk.kernel import column_features, kernel_matrix, kernel_rows
from infkit.ntk.structured import Features, Strategy, TangentFeatures
from infkit.options import Options, option
from infkit.parameters import ParameterSpace, dtype_name
from infkit.task import Task

#: ``method="auto"`` picks ``dual`` when P is at least this many times N*C
AUTO_RATIO = 20


@dataclass
class DualRemoval:
    """A removal in dual coordinates: ``Delta theta = J^T delta_alpha + residual_coef * r``.

    Attributes:
        indices: the removed training examples; estimator: how the change was estimated.
        delta_alpha: [N, C] change of the dual variables (removed rows: -alpha*_F for newton).
        residual_coef: coefficient of the representer residual r (0 when r is not used).
    """

    indices: Tensor
    estimator: str
    delta_alpha: Tensor
    residual_coef: float


@dataclass
class _PerExampleSetup:
    """What scores and self-scores need for one estimator (docs/methods/dual.md §4, §6)."""

    system: KernelSystem
    z0: Tensor  # [m] common part of Delta alpha_j
    c_r: float  # coefficient of r in Delta theta_j
    gamma: Tensor | None = None  # [N, C] example-specific coefficients
    leverage: Tensor | None = None  # [N, C, C]


@dataclasses.dataclass(frozen=True)
class DualOptions(Options):
    """Options of ``method="dual"``."""

    aliases: ClassVar[Mapping[str, str]] = {
        "cg_tol": "tol",
        "cg_maxiter": "maxiter",
        "dtype": "kernel_dtype",  # Influence's own dtype= (autocast) took the keyword
    }

    linearize_at: Tensor | Mapping[str, Tensor] | None = option(
        None, "evaluate J (and the NTK) at these parameters instead of theta* (flat [P] or dict)"
    )
    anchor: Literal["init", "zero"] | Tensor | None = option(
        None,
        "the regulariser anchor theta': None/'zero' (0), 'init' (linearize_at), or a [P] tensor",
    )
    form: Form | None = option(
        None,
        "'push-through' (LU of B K + mu I) or 'woodbury' (Cholesky or CG on mu I + L^T K L); "
        "default: push-through, or woodbury with solver='cg'",
    )
    solver: Solver = option("direct", "'direct' or 'cg' (conjugate gradients on the woodbury form)")
    tol: float = option(1e-10, "relative residual of solver='cg' (below 1)", above=0, below=1)
    maxiter: int | None = option(
        None, "iteration cap of solver='cg' (default max(10 N C, 100))", minimum=1
    )
    ntk: Strategy = option("auto", "NTK strategy: 'auto', 'structured', 'jacobian' or 'jvp'")
    representer_residual: bool | None = option(
        None, "carry r = theta* - theta' - J^T alpha* (None: yes at theta*, no with linearize_at)"
    )
    product_batch_size: int | None = option(
        None, "examples per kernel block and tangent-product batch (default 256)", minimum=1
    )
    kernel_dtype: torch.dtype = option(torch.float64, "working dtype of the kernel algebra")

    def __post_init__(self) -> None:
        if self.solver == "cg" and self.form == "push-through":
            raise InvalidInputError(
                "method 'dual': solver='cg' works on the symmetric woodbury form; pass "
                "form='woodbury' or leave form unset"
            )

    @property
    def effective_form(self) -> Form:
        """The form in use: ``form``, or its default for the solver."""
        if self.form is not None:
            return self.form
        return "woodbury" if self.solver == "cg" else "push-through"


@register
class Dual(PrimalMethod):
    """Kernel-trick (empirical NTK) influence: exact GGN answers at a cost set by N*C, not P.

    For a model made by :func:`infkit.linearize` the Jacobian is the same everywhere and
    ``linearize_at`` is not needed. The facade's stationarity check assumes the anchor the
    method reports (:meth:`regulariser_anchor`).
    """

    name = "dual"
    estimators = ("if", "rif", "newton")
    summary = "empirical NTK (kernel trick) in N*C space; equals exact GGN; for P >> N*C"
    Options = DualOptions
    scales = True
    curvature = "ggn"
    exact_example_curvature = True
    uses_training_gradients = False
    takes_autocast = False
    fidelity = Fidelity(reference="ggn", rtol=1e-8)
    auto_priority = 1
    #: the kernel, the output derivatives and the representer split; :meth:`state` adds the
    #: training set's Jacobian factors when they were kept (the engine at the tangent point and
    #: the factorised dual systems are rebuilt on restore and on demand)
    fitted_state = (
        "g",
        "lam",
        "c",
        "n",
        "m",
        "l2",
        "damping",
        "ridge",
        "K",
        "alpha",
        "r",
        "Jr",
        "residual_norm",
        "representer_error",
    )
    options: DualOptions

    def __init__(self, options: DualOptions | None = None, /, **values: object) -> None:
        super().__init__(options, **values)
        self._systems: dict[float, KernelSystem] = {}
        self._per_example: dict[str, _PerExampleSetup] = {}
        self.engine: PerExample | None = None
        self.tangents: TangentFeatures | None = None
        self._train_features: list[Features] | None = None

    @classmethod
    def memory_estimate(cls, n: int, p: int, c: int) -> int:
        # K, one factorised system (or a retained one) and a working copy, float64
        m = n * c
        return 3 * m * m * FLOAT64_BYTES

    @classmethod
    def suits(cls, problem: Problem) -> bool:
        fits = cls.memory_estimate(problem.n, problem.p, problem.c) <= problem.memory_limit
        return fits and AUTO_RATIO * problem.n * problem.c <= problem.p

    @classmethod
    def memory_message(cls, problem: Problem, need: int) -> str:
        others = ", ".join(repr(m) for m in scalable_methods() if m != cls.name)
        m = problem.n * problem.c
        return (
            f"method='dual' works with the {m:,} x {m:,} empirical NTK (N*C = {problem.n:,} x "
            f"{problem.c}), which with its factorisation needs {human_bytes(need)}, above the "
            f"memory limit of {human_bytes(problem.memory_limit)}. Its memory grows as "
            f"(N*C)^2: use a method that scales with N instead: {others}; "
            "or attribute a subset of the training data, or raise memory_limit."
        )

    @classmethod
    def suitability(cls, problem: Problem) -> str:
        need = cls.memory_estimate(problem.n, problem.p, problem.c)
        fits = "fits within" if need <= problem.memory_limit else "exceeds"
        m = AUTO_RATIO * problem.n * problem.c
        return (
            f"{AUTO_RATIO} N C = {m:,} {'<=' if m <= problem.p else '>'} P = {problem.p:,}, and "
            f"the NC x NC kernel ({human_bytes(need)}) {fits} the memory limit "
            f"({human_bytes(problem.memory_limit)})"
        )

    @property
    def batch_size(self) -> int:
        """Examples per kernel block and tangent-product batch."""
        return self.options.product_batch_size or 256

    # ------------------------------------------------------------------ fit
    def fit(self, fitted: Fitted) -> None:
        super().fit(fitted)
        options = self.options
        space, train, n = fitted.space, fitted.train, fitted.n
        engine = self._tangent_machinery(fitted)
        assert self.tangents is not None
        gs, lams = [], []
        for batch in train.batches(self.batch_size):
            _, g, lam = engine.output_derivatives(batch)
            gs.append(g)
            lams.append(lam)
        self.g = torch.cat(gs)  # [N, C]
        lam_all = torch.cat(lams)  # [N, C, C]
        self.lam = 0.5 * (lam_all + lam_all.transpose(1, 2))
        c = self.g.shape[1]
        self.c, self.n, self.m = c, n, n * c
        self.l2, self.damping = fitted.l2, fitted.damping
        self.ridge = fitted.ridge
        if self.ridge <= 0:
            raise CurvatureError(
                "method='dual' needs l2 + damping > 0: its kernel system (B K + mu I, "
                "mu = l2 + damping) has no inverse without it, whatever P and N*C. Pass the "
                "model's l2, or damping > 0; where P is small and N*C larger, method='exact' "
                "inverts the Gauss-Newton curvature without either"
            )
        theta = space.flat().to(engine.device, options.kernel_dtype)
        anchor = self._anchor_vector(fitted.task, space)
        self._train_features = column_features(
            self.tangents, train, self.batch_size, fitted.memory_limit // 8
        )
        self.K = kernel_matrix(
            self.tangents,
            train,
            batch_size=self.batch_size,
            memory_limit=fitted.memory_limit,
            col_features=self._train_features,
            progress=fitted.progress,
        )
        self.alpha = -self.g / (self.l2 * n) if self.l2 > 0 else torch.zeros_like(self.g)  # [N, C]
        use_r = options.representer_residual
        if use_r is None:
            use_r = options.linearize_at is None
        self.r: Tensor | None = None
        self.Jr: Tensor | None = None
        if use_r and self.l2 > 0:
            r = theta - anchor - self.jt(self.alpha)
            if float(r.abs().max()) > 0:
                self.r = r
                self.Jr = self.jmul(r)  # [N, C]
        self.residual_norm = 0.0 if self.r is None else float(self.r.norm())
        self.representer_error = self.residual_norm / max(float((theta - anchor).norm()), 1e-300)

    def _tangent_machinery(self, fitted: Fitted) -> PerExample:
        """The engine at the tangent point and the NTK's features on it (no pass over data)."""
        options = self.options
        self._systems.clear()
        self._per_example.clear()
        engine = PerExample(
            fitted.task,
            fitted.space,
            fitted.engine.mode,
            at=options.linearize_at,
            dtype=options.kernel_dtype,
        )
        self.engine = engine
        self.tangents = TangentFeatures(engine, options.ntk)
        return engine

    def state(self) -> dict[str, Any]:
        out = super().state()
        features = None
        if self._train_features is not None:
            features = [
                {
                    "size": f.size,
                    "deltas": list(f.deltas),
                    "acts": list(f.acts),
                    "rest": f.rest,
                    "indices": None if f.inputs is None else f.inputs.indices,
                }
                for f in self._train_features
            ]
        return {**out, "train_features": features}

    def restore(self, fitted: Fitted, state: Mapping[str, Any]) -> None:
        super().restore(fitted, state)
        self._tangent_machinery(fitted)
        saved = state["train_features"]
        self._train_features = None
        if saved is not None:
            self._train_features = [
                Features(
                    int(f["size"]),
                    list(f["deltas"]),
                    list(f["acts"]),
                    f["rest"],
                    None if f["indices"] is None else fitted.train.take(f["indices"]),
                )
                for f in saved
            ]

    def _engine(self) -> PerExample:
        if self.engine is None:
            raise NotFittedError("method 'dual' is not fitted")
        return self.engine

    def regulariser_anchor(self, task: Task, space: ParameterSpace) -> Tensor | None:
        anchor = self._anchor_vector(task, space)
        return anchor.to(torch.float64) if bool(anchor.any()) else None

    def answers(self, question: str) -> bool:
        # With linearize_at the answers live at the expansion point theta_0, while the
        # decompositions use gradients at theta*: they would not add up to the scores.
        if self.options.linearize_at is not None and question in PRECONDITIONED:
            return False
        return super().answers(question)

    def _why_not(self, question: str) -> str:
        if self.options.linearize_at is not None:
            return (
                " with linearize_at (its answers use the Jacobian at the expansion point; "
                "without it, it does)"
            )
        return ""

    def check(self, task: Task, space: ParameterSpace) -> None:
        if task.autocast is not None:
            precision = dtype_name(task.autocast)
            able = [n for n, cls in sorted(registered().items()) if cls.takes_autocast]
            raise UnsupportedError(
                f"method 'dual' runs its kernel and every product by forward-mode "
                f"differentiation in the model's own dtype, which torch.autocast does not reach: "
                f"dtype=torch.{precision} would change nothing. Cast the model itself "
                f"(model.to(torch.{precision})) to run it in that precision, or name a method "
                f"whose passes run under autocast ({', '.join(able)})"
            )
        options = self.options
        for label, value in (("linearize_at", options.linearize_at), ("anchor", options.anchor)):
            if isinstance(value, Tensor) and value.numel() != space.size:
                raise InvalidInputError(
                    f"method 'dual': option {label!r} has {value.numel()} values, but the model "
                    f"has P = {space.size} trainable parameters; pass a flat [P] tensor (or a "
                    "dict by parameter name)"
                )
            if isinstance(value, Mapping):
                missing = [n for n in space.names if n not in value]
                if missing:
                    raise InvalidInputError(
                        f"method 'dual': option {label!r} has no value for the trainable "
                        f"parameter(s) {missing[:5]}"
                    )
            parts = (
                [(f" ({n})", value[n]) for n in space.names]
                if isinstance(value, Mapping)
                else [("", value)]
            )
            for name, part in parts:
                if isinstance(part, Tensor) and not bool(torch.isfinite(part).all()):
                    # (a NaN anchor dropped out of the representer's residual without a word)
                    raise NonFiniteError(
                        f"method 'dual': option {label!r}{name} holds NaN or Inf; pass the "
                        "finite parameters it stands for"
                    )
        self._anchor_vector(task, space)  # anchor="init" needs an expansion point

    def _anchor_vector(self, task: Task, space: ParameterSpace) -> Tensor:
        options = self.options
        zeros = torch.zeros(space.size, dtype=options.kernel_dtype, device=space.device)
        anchor = options.anchor
        if anchor is None or (isinstance(anchor, str) and anchor == "zero"):
            return zeros
        if isinstance(anchor, str):  # "init"
            model = task.model
            if isinstance(model, LinearizedModel):
                if model.offset:
                    return zeros  # its parameters are theta - theta_0 already
                return torch.cat([t.reshape(-1) for t in model.params0().values()]).to(zeros)
            at = options.linearize_at
            if at is None:
                raise InvalidInputError(
                    "anchor='init' needs linearize_at (the initial parameters) or a model made by "
                    "infkit.linearize"
                )
            flat = at if isinstance(at, Tensor) else space.flatten({n: at[n] for n in space.names})
            return flat.reshape(-1).to(zeros)
        return anchor.reshape(-1).to(zeros)

    # ------------------------------------------------------------------ tangent maps
    def jt(self, U: Tensor) -> Tensor:
        """J^T U over the training set: [P] for U [N, C], or [k, P] for U [k, N, C]."""
        engine = self._engine()
        single = U.dim() == 2
        U = U.reshape(-1, self.n, self.c)
        out = torch.zeros(U.shape[0], engine.space.size, dtype=engine.dtype, device=engine.device)
        for batch in self.fitted.train.batches(self.batch_size):
            out += engine.vjp(batch, U[:, batch.indices])
        return out[0] if single else out

    def jmul(self, W: Tensor) -> Tensor:
        """J W for W [P] ([N, C]) or [k, P] ([k, N, C]) over the training set."""
        engine = self._engine()
        single = W.dim() == 1
        W = W.reshape(-1, engine.space.size)
        parts = [engine.jvp(b, W) for b in self.fitted.train.batches(self.batch_size)]
        out = torch.cat(parts, dim=1)
        return out[0] if single else out

    # ------------------------------------------------------------------ systems
    def system(self, mu: float, retained: Tensor | None = None) -> KernelSystem:
        """The dual system for ridge mu on the retained examples R (None: all).

        One full-set system is kept (with the per-example quantities built on it); asking for
        another ridge replaces it, so that at most K, one kept and one temporary (N*C)^2 factor
        exist at a time (``memory_estimate``).
        """
        if retained is None and mu in self._systems:
            return self._systems[mu]
        if retained is None and self._systems:
            self._systems.clear()
            self._per_example.clear()
        options = self.options
        system = KernelSystem(
            self.K,
            self.lam,
            self.n,
            mu,
            retained,
            form=options.effective_form,
            solver=options.solver,
            tol=options.tol,
            maxiter=options.maxiter,
        )
        if retained is None:
            self._systems[mu] = system
        return system

    def _residual_moved(
        self, system: KernelSystem, e: Tensor, s: float, mu: float
    ) -> tuple[Tensor, float]:
        """The flat right-hand side e - c_r B (J r) of a full-set dual solve, and c_r = s / mu.

        The l2 residual r (theta* = J^T alpha* + r) contributes s (J r) to the right-hand side;
        moving it over leaves c_r r in Delta theta (c_r = 0 when there is no residual).
        """
        rhs = e.reshape(-1)
        if self.Jr is None:
            return rhs, 0.0
        c_r = s / mu
        return rhs - c_r * system.bmul(self.Jr.reshape(-1, 1)).reshape(-1), c_r

    def _per_example_setup(self, estimator: str, leverage: bool) -> _PerExampleSetup:
        """The common part z0, the coefficients gamma_j and the leverage blocks of one estimator.

        Delta theta_j = J^T (A^{-1} E_j gamma_j + z0) + c_r r for every example j.
        """
        setup = self._per_example.get(estimator)
        ready = setup is not None and setup.gamma is not None
        if setup is not None and ready and (setup.leverage is not None or not leverage):
            return setup
        n, l2 = self.n, self.l2
        if setup is None:
            if estimator in ("if", "rif"):
                mu, s = self.ridge, l2 / n
                e0 = (l2 / n) * self.alpha
            else:  # newton: the retained objective without j (its curvature and l2 share)
                mu, s = self.ridge - l2 / n, l2 / n - l2
                e0 = -self.g / n + (l2 / n - l2) * self.alpha
            system = self.system(mu)
            rhs, c_r = self._residual_moved(system, e0, s, mu)
            setup = _PerExampleSetup(system=system, z0=system.solve(rhs), c_r=c_r)
            if estimator == "if":
                setup.gamma = self.g / n
            self._per_example[estimator] = setup
        if leverage and setup.leverage is None:
            setup.leverage = setup.system.leverage_blocks()
        if setup.gamma is None:
            M = setup.leverage
            assert M is not None  # rif / newton always ask for the leverage blocks
            gamma0 = self.g / n
            q = (M @ gamma0.unsqueeze(-1)).squeeze(-1) + (self.K @ setup.z0).reshape(n, self.c)
            if self.Jr is not None:
                q = q + setup.c_r * self.Jr
            setup.gamma = gamma0 + self._downdate(M, q, torch.arange(n))
        return setup

    def _downdate(self, M: Tensor, q: Tensor, indices: Tensor) -> Tensor:
        """(I - Lambda_j M_j / N)^{-1} (Lambda_j / N) q_j for each j: [k, C]."""
        lam = self.lam[indices]
        LM = lam @ M / self.n
        check_leverage(LM, indices, self)
        eye = torch.eye(self.c, dtype=M.dtype, device=M.device).expand_as(LM)
        rhs = (lam @ q.unsqueeze(-1)) / self.n
        return torch.linalg.solve(eye - LM, rhs).squeeze(-1)

    # ------------------------------------------------------------------ answers
    def scores(self, queries: ExampleSet, estimator: Estimator) -> Tensor:
        engine = self._engine()
        setup = self._per_example_setup(estimator.name, leverage=estimator.name != "if")
        assert setup.gamma is not None
        n, c, m = self.n, self.c, self.m
        S = torch.empty(len(queries), n, dtype=torch.float64)
        per_query = c * m * FLOAT64_BYTES * 3
        chunk = max(1, min(len(queries), self.fitted.memory_limit // 8 // per_query))
        # queries whose measurement's gradient in the outputs is not 0 (a 0 one is 0 in the
        # parameters too: said, as the other methods say it; dual's zeros went unsaid)
        moved = torch.zeros(len(queries), dtype=torch.bool)
        for batch in queries.batches(chunk):
            t = len(batch)
            Ktx = self._kernel_to_train(batch)  # [t*C, m]
            h = engine.output_gradients(batch, "measurement")  # [t, C]
            moved[batch.indices] = (h != 0).any(dim=1).cpu()
            W = torch.einsum("tc,tcm->tm", h, Ktx.reshape(t, c, m))
            del Ktx
            U = setup.system.solve_t(W.T)  # [m, t]
            block = torch.einsum("nct,nc->tn", U.reshape(n, c, t), setup.gamma)
            const = W @ setup.z0
            if self.r is not None:
                const = const + setup.c_r * (h * engine.jvp(batch, self.r)).sum(1)
            S[batch.indices] = (block + const.unsqueeze(1)).cpu().to(torch.float64)
        warn_about_still_queries(queries, moved, self.fitted.engine.precision)
        return S

    def self_scores(self, estimator: Estimator) -> Tensor:
        setup = self._per_example_setup(estimator.name, leverage=True)
        assert setup.leverage is not None and setup.gamma is not None
        n, c = self.n, self.c
        own = (setup.leverage @ setup.gamma.unsqueeze(-1)).squeeze(-1)
        own = own + (self.K @ setup.z0).reshape(n, c)
        if self.Jr is not None:
            own = own + setup.c_r * self.Jr
        return (self.g * own).sum(1).cpu().to(torch.float64)

    def removal(self, indices: Tensor, estimator: Estimator) -> Tensor:
        estimator.require_counterfactual()
        return self.params(self.dual_removal(indices, estimator.name)).cpu().to(torch.float64)

    def removal_change(
        self, data: ExampleSet, indices: Tensor, estimator: Estimator, which: str
    ) -> Tensor | None:
        """With ``linearize_at`` the answer lives at theta_0: K0(X_t, X) Delta alpha."""
        if self.options.linearize_at is None:
            return None  # J(theta*) Delta theta is the same at theta*
        removal = self.dual_removal(indices, estimator.name)
        if which == "outputs":
            return self.output_change(data, removal)
        return self.loss_change(
            data, removal, which="measurement" if which == "measurement" else "loss"
        )

    def leverages(self) -> Tensor:
        """Generalised leverages ``h_j = tr(Lambda_j M_j) / N`` from the kernel's leverage blocks."""
        setup = self._per_example_setup("if", leverage=True)
        assert setup.leverage is not None
        LM = self.lam @ setup.leverage
        return torch.diagonal(LM, dim1=1, dim2=2).sum(-1).cpu().to(torch.float64) / self.n

    # ------------------------------------------------------------------ dual answers
    def dual_removal(self, indices: Tensor, estimator: EstimatorName = "newton") -> DualRemoval:
        """Delta alpha for removing ``indices`` jointly (the dual form of ``remove``)."""
        Estimator(estimator).require_counterfactual()
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        n, c, l2 = self.n, self.c, self.l2
        n_f = len(idx)
        if estimator == "if":
            mu, s = self.ridge, n_f * l2 / n
            e = (n_f * l2 / n) * self.alpha.clone()
            e[idx] += self.g[idx] / n
            system = self.system(mu)
            rhs, c_r = self._residual_moved(system, e, s, mu)
            delta = system.solve(rhs).reshape(n, c)
            return DualRemoval(idx, estimator, delta, c_r)
        if estimator == "rif":
            setup = self._per_example_setup("if", leverage=False)
            system = setup.system
            M = system.leverage_blocks(idx)
            gamma0 = self.g[idx] / n
            q = (M @ gamma0.unsqueeze(-1)).squeeze(-1)
            q = q + (self.K @ setup.z0).reshape(n, c)[idx]
            if self.Jr is not None:
                q = q + setup.c_r * self.Jr[idx]
            gamma = gamma0 + self._downdate(M, q, idx)
            E = torch.zeros(n, c, dtype=self.K.dtype, device=self.K.device)
            E[idx] = gamma
            delta = system.solve(E.reshape(-1)).reshape(n, c) + n_f * setup.z0.reshape(n, c)
            return DualRemoval(idx, estimator, delta, n_f * setup.c_r)
        # newton: one Newton step on the retained objective (docs/methods/dual.md §5)
        keep = torch.ones(n, dtype=torch.bool)
        keep[idx] = False
        retained = keep.nonzero().squeeze(1)
        n_r = len(retained)
        mu = (n_r / n) * l2 + self.damping
        s = -(n_r / n) * l2
        e = -(n_r / n) * l2 * self.alpha.clone()
        e[retained] -= self.g[retained] / n
        c_r = s / mu if self.r is not None else 0.0
        delta = torch.zeros(n, c, dtype=self.K.dtype, device=self.K.device)
        delta[idx] = e[idx] / mu
        system = self.system(mu, retained)
        # right-hand side: e_R - B_R (K_RF e_F + s (J r)_R) / mu
        e_forget = torch.zeros_like(e)
        e_forget[idx] = e[idx]
        coupling = (self.K @ e_forget.reshape(-1)).reshape(n, c)[retained].reshape(-1)  # K_RF e_F
        if self.Jr is not None:
            coupling = coupling + s * self.Jr[retained].reshape(-1)
        rhs = e[retained].reshape(-1) - system.bmul(coupling.unsqueeze(1)).reshape(-1) / mu
        delta[retained] = system.solve(rhs).reshape(n_r, c)
        return DualRemoval(idx, estimator, delta, c_r)

    def params(self, removal: DualRemoval) -> Tensor:
        """Delta theta [P] = J^T Delta alpha (+ the residual term): one VJP over the data."""
        out = self.jt(removal.delta_alpha)
        if self.r is not None and removal.residual_coef:
            out = out + removal.residual_coef * self.r
        return out

    def _kernel_to_train(self, batch: Batch) -> Tensor:
        """K(X_batch, X) [B*C, N*C]: the kernel between a batch and the training set."""
        if self.tangents is None:
            raise NotFittedError("method 'dual' is not fitted")
        return kernel_rows(
            self.tangents,
            batch,
            self.fitted.train,
            batch_size=self.batch_size,
            col_features=self._train_features,
        )

    def output_change(self, data: Any, removal: DualRemoval) -> Tensor:
        """Delta f = K(X_t, X) Delta alpha (+ residual term), [n, C], at the J point."""
        engine = self._engine()
        examples = data if isinstance(data, ExampleSet) else ExampleSet(data, name="data")
        parts = []
        for batch in examples.batches(self.batch_size):
            Ktx = self._kernel_to_train(batch)
            df = (Ktx @ removal.delta_alpha.reshape(-1)).reshape(len(batch), self.c)
            if self.r is not None and removal.residual_coef:
                df = df + removal.residual_coef * engine.jvp(batch, self.r)
            parts.append(df)
        return torch.cat(parts)

    def loss_change(
        self,
        data: Any,
        removal: DualRemoval,
        reg_share: bool = False,
        which: Which = "loss",
    ) -> Tensor:
        """First-order change of the per-example loss g_t^T Delta f_t, [n] (docs/methods/dual.md §7).

        With ``which="measurement"`` the measurement's h_t^T Delta f_t instead. With
        ``reg_share`` the regulariser's share ``l2 (theta* - theta')^T Delta theta`` (the same
        for every point) is added, as the paper's code does.
        """
        engine = self._engine()
        examples = data if isinstance(data, ExampleSet) else ExampleSet(data, name="data")
        df = self.output_change(examples, removal)
        g = torch.cat(
            [engine.output_gradients(b, which) for b in examples.batches(self.batch_size)]
        )
        out = (g * df).sum(1)
        if reg_share and self.l2 > 0:
            da = removal.delta_alpha.reshape(-1)
            a = self.alpha.reshape(-1)
            reg = a @ (self.K @ da)
            if self.r is not None and self.Jr is not None:
                jr = self.Jr.reshape(-1)
                reg = reg + jr @ da + removal.residual_coef * (a @ jr + self.r @ self.r)
            out = out + self.l2 * reg
        return out

    # ------------------------------------------------------------------ generic solves
    def solve(self, V: Tensor, shift: float = 0.0) -> Tensor:
        """(G + shift I)^{-1} V through the kernel: (1/mu)[V - J^T A^{-1} B J V], V [k, P]."""
        engine = self._engine()
        mu = self.ridge + shift
        V = V.to(engine.device, engine.dtype).reshape(-1, engine.space.size)
        system = self.system(mu)
        JV = self.jmul(V)  # [k, N, C]
        Y = JV.reshape(V.shape[0], -1).T
        X = system.solve(system.bmul(Y))  # [m, k]
        back = self.jt(X.T.reshape(V.shape[0], self.n, self.c))
        return ((V - back) / mu).to(torch.float64)

    def solve_retained(self, V: Tensor, group: Tensor) -> Tensor:
        """H_R^{-1} V with H_R the retained curvature (drops the group's data and l2 share)."""
        engine = self._engine()
        idx = torch.as_tensor(group, dtype=torch.long).reshape(-1)
        keep = torch.ones(self.n, dtype=torch.bool)
        keep[idx] = False
        retained = keep.nonzero().squeeze(1)
        mu = self.fitted.retained_ridge(len(idx))
        V = V.to(engine.device, engine.dtype).reshape(-1, engine.space.size)
        k = V.shape[0]
        system = self.system(mu, retained)
        JV = self.jmul(V)[:, retained]  # [k, N_R, C]
        X = system.solve(system.bmul(JV.reshape(k, -1).T))
        U = torch.zeros(k, self.n, self.c, dtype=engine.dtype, device=engine.device)
        U[:, retained] = X.T.reshape(k, len(retained), self.c)
        return ((V - self.jt(U)) / mu).to(torch.float64)

    # ------------------------------------------------------------------ misc
    def describe(self) -> dict[str, object]:
        out: dict[str, object] = super().describe()
        out.update(
            form=self.options.effective_form,
            linearized=self.options.linearize_at is not None,
            n_c=getattr(self, "m", None),
            representer_error=getattr(self, "representer_error", None),
            ntk_strategy=(
                None
                if self.tangents is None or self._fitted is None
                else self.tangents.resolved_strategy(self.fitted.train.take([0]))
            ),
        )
        return out
