"""Dense float64 references for every estimator and question, by plain autograd.

Nothing here uses infkit's gradient, curvature or estimator code. Per-example gradients,
Jacobians and output Hessians come from ``torch.autograd.functional`` one example at a time; the
curvature is assembled densely and every estimator is its textbook formula written out with a
direct solve (docs/estimators.md):

* IF:     Delta theta_j = (1/N) A^{-1} v_j,                      A = H + (l2 + damping) I
* RIF:    Delta theta_j = (1/N) (A - C_j / N)^{-1} v_j,           C_j = J_j^T Lambda_j J_j
* Newton: Delta theta_F = (A - C_F / N - (N_F/N) l2 I)^{-1} ((1/N) sum_F v_j - grad L(theta))
* RelatIF (theta): u_j / ||u_j||,  u_j = A^{-1} v_j

with ``v_j = grad l_j + l2 theta`` and H the mean-form GGN (or 0 for the identity reference).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Loss = Callable[[Tensor, Tensor], Tensor]  # (outputs [B, C], targets [B]) -> [B]


def _functional(model: nn.Module) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor, list]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    shapes = [p.shape for _, p in named]
    sizes = [p.numel() for _, p in named]
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = dict(model.named_buffers())

    def call(theta: Tensor, x: Tensor) -> Tensor:
        parts = torch.split(theta, sizes)
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return torch.func.functional_call(model, {**params, **frozen, **buffers}, (x,))

    theta = torch.cat([p.detach().reshape(-1) for _, p in named]).to(torch.float64)
    return call, theta, list(zip(names, sizes))


@dataclass
class DenseReference:
    """Per-example quantities of a model on a training and a query set, densely, in float64.

    Attributes:
        G: [N, P] training-loss gradients; Q: [T, P] query-measurement gradients.
        J: [N, C, P] Jacobians; lam: [N, C, C] output Hessians; C_ggn: [N, P, P] blocks.
        theta: [P]; l2, damping: the objective's ridge and the extra damping.
        groups: name -> parameter positions of each module (``"0.weight"``, ``"0.bias"`` -> "0").
    """

    G: Tensor
    Q: Tensor
    Qloss: Tensor
    J: Tensor
    lam: Tensor
    C_ggn: Tensor
    theta: Tensor
    l2: float
    damping: float
    groups: dict[str, Tensor] = field(default_factory=dict)
    call: Callable[[Tensor, Tensor], Tensor] | None = None
    loss: Loss | None = None
    train: tuple[Tensor, Tensor] | None = None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        loss: Loss,
        train: tuple[Tensor, Tensor],
        queries: tuple[Tensor, Tensor],
        l2: float,
        damping: float = 0.0,
        measurement: Loss | None = None,
    ) -> DenseReference:
        """The reference of ``model`` (taken in float64) trained on ``train`` with ``loss``;
        query gradients of ``measurement`` (default: the loss)."""
        model = copy.deepcopy(model).double()
        call, theta, sizes = _functional(model)
        X, y = train[0].double(), train[1]
        Xq, yq = queries[0].double(), queries[1]

        def grad_of(x: Tensor, t: Tensor, fn: Loss = loss) -> Tensor:
            return torch.autograd.functional.jacobian(
                lambda th: fn(call(th, x[None]), t[None]).sum(), theta
            )

        G = torch.stack([grad_of(X[i], y[i]) for i in range(len(X))])
        measure = measurement or loss
        Q = torch.stack([grad_of(Xq[i], yq[i], measure) for i in range(len(Xq))])
        Qloss = torch.stack([grad_of(Xq[i], yq[i]) for i in range(len(Xq))])
        J = torch.stack(
            [
                torch.autograd.functional.jacobian(
                    lambda th, x=X[i : i + 1]: call(th, x)[0], theta, vectorize=True
                )
                for i in range(len(X))
            ]
        )
        outputs = call(theta, X).detach()
        lam = torch.stack(
            [
                torch.autograd.functional.hessian(
                    lambda f, t=y[i : i + 1]: loss(f[None], t).sum(), outputs[i]
                )
                for i in range(len(X))
            ]
        )
        C_ggn = torch.einsum("ncp,ncd,ndq->npq", J, lam, J)
        groups: dict[str, list[int]] = {}
        start = 0
        for name, size in sizes:
            module = name.rsplit(".", 1)[0] if "." in name else ""
            groups.setdefault(module, []).extend(range(start, start + size))
            start += size
        return cls(
            G=G,
            Q=Q,
            Qloss=Qloss,
            J=J,
            lam=lam,
            C_ggn=C_ggn,
            theta=theta,
            l2=l2,
            damping=damping,
            groups={k: torch.tensor(v) for k, v in groups.items()},
            call=call,
            loss=loss,
            train=(X, y),
        )

    # ------------------------------------------------------------------ basics
    @property
    def n(self) -> int:
        return self.G.shape[0]

    @property
    def attributed(self) -> Tensor:
        """Attributed gradients v_j = grad l_j + l2 theta, [N, P]."""
        return self.G + self.l2 * self.theta

    @property
    def gradient(self) -> Tensor:
        """grad L(theta) = mean_j grad l_j + l2 theta (about 0 at the trained optimum)."""
        return self.G.mean(0) + self.l2 * self.theta

    def damped_curvature(self, reference: str) -> Tensor:
        """The damped curvature the method targets: GGN + ridge, or the identity."""
        p = self.theta.numel()
        eye = torch.eye(p, dtype=torch.float64)
        if reference == "identity":
            return eye
        return self.C_ggn.mean(0) + (self.l2 + self.damping) * eye

    def blocks(self, reference: str) -> Tensor:
        """Each example's own curvature block C_j (0 for the identity reference), [N, P, P]."""
        if reference == "identity":
            return torch.zeros_like(self.C_ggn)
        return self.C_ggn

    # ------------------------------------------------------------------ estimators
    def deltas(self, estimator: str, reference: str) -> Tensor:
        """Per-example removal parameter changes (RelatIF: directions), [N, P]."""
        A, C, n, V = (
            self.damped_curvature(reference),
            self.blocks(reference),
            self.n,
            self.attributed,
        )
        if estimator == "if":
            return torch.linalg.solve(A, V.T).T / n
        if estimator == "relatif":
            U = torch.linalg.solve(A, V.T).T
            return U / U.norm(dim=1, keepdim=True)
        rows = []
        for j in range(n):
            if estimator == "rif":
                rows.append(torch.linalg.solve(A - C[j] / n, V[j]) / n)
            else:  # newton
                eye = torch.eye(A.shape[0], dtype=torch.float64)
                shift = self.l2 / n if reference != "identity" else 0.0
                rhs = V[j] / n - self.gradient
                rows.append(torch.linalg.solve(A - C[j] / n - shift * eye, rhs))
        return torch.stack(rows)

    def scores(self, estimator: str, reference: str) -> Tensor:
        return self.Q @ self.deltas(estimator, reference).T

    def self_scores(self, estimator: str, reference: str) -> Tensor:
        return (self.G * self.deltas(estimator, reference)).sum(1)

    def removal(self, group: list[int], estimator: str, reference: str) -> Tensor:
        """Delta theta [P] for removing ``group`` jointly."""
        if estimator in ("if", "rif"):
            return self.deltas(estimator, reference)[group].sum(0)
        A, C, n = self.damped_curvature(reference), self.blocks(reference), self.n
        eye = torch.eye(A.shape[0], dtype=torch.float64)
        shift = len(group) * self.l2 / n if reference != "identity" else 0.0
        H_R = A - C[group].sum(0) / n - shift * eye
        return torch.linalg.solve(H_R, self.attributed[group].sum(0) / n - self.gradient)

    def loss_change(self, delta: Tensor) -> Tensor:
        """First-order change of each query's loss, [T]."""
        return self.Qloss @ delta

    def leverages(self, reference: str) -> Tensor:
        """tr(Lambda_j J_j A^{-1} J_j^T) / N, [N]."""
        A = self.damped_curvature(reference)
        W = torch.linalg.solve(A, self.J.reshape(-1, A.shape[0]).T).T.reshape(self.J.shape)
        M = torch.einsum("ncp,ndp->ncd", self.J, W)
        return torch.diagonal(self.lam @ M, dim1=1, dim2=2).sum(-1) / self.n

    def preconditioned(self, reference: str) -> Tensor:
        """u_t = A^{-1} q_t for every query, [T, P]."""
        return torch.linalg.solve(self.damped_curvature(reference), self.Q.T).T

    def module_scores(self, U: Tensor) -> dict[str, Tensor]:
        """IF scores restricted to each module's parameters for queries U, name -> [T, N]."""
        return {g: U[:, idx] @ self.attributed[:, idx].T / self.n for g, idx in self.groups.items()}

    def input_influence(self, U: Tensor, indices: list[int]) -> Tensor:
        """-(1/N) d/dx_j u_t^T grad_theta l_j(x_j) for queries U, [T, len(indices), *x_shape]."""
        assert self.call is not None and self.loss is not None and self.train is not None
        X, y = self.train
        out = torch.zeros(U.shape[0], len(indices), *X.shape[1:], dtype=torch.float64)
        for k, j in enumerate(indices):
            for t in range(U.shape[0]):
                x = X[j : j + 1].clone().requires_grad_(True)
                theta = self.theta.clone().requires_grad_(True)
                value = self.loss(self.call(theta, x), y[j : j + 1]).sum()
                (g,) = torch.autograd.grad(value, theta, create_graph=True)
                (gx,) = torch.autograd.grad(g @ U[t], x)
                out[t, k] = -gx[0] / self.n
        return out
