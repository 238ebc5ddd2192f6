"""Independent references for the Kronecker-factored methods: explicit per-example GGNs.

Nothing here uses infkit's gradient or factor code: Jacobians and output Hessians come from
``torch.autograd.functional`` one example at a time, and block positions are computed by hand.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import infkit


def flat_params(model: nn.Module) -> tuple[list[str], list[torch.Size], Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return (
        [n for n, _ in named],
        [p.shape for _, p in named],
        torch.cat([p.detach().reshape(-1) for _, p in named]),
    )


def functional(model: nn.Module, flat: Tensor, x, names, shapes):
    params, offset = {}, 0
    for n, s in zip(names, shapes):
        k = s.numel()
        params[n] = flat[offset : offset + k].reshape(s)
        offset += k
    frozen = {n: p for n, p in model.named_parameters() if n not in params}
    state = {**params, **frozen, **dict(model.named_buffers())}
    if isinstance(x, dict):
        return torch.func.functional_call(model, state, (), x)
    return torch.func.functional_call(model, state, (x,))


def _one(x, i):
    if isinstance(x, dict):
        return {k: v[i : i + 1] for k, v in x.items()}
    return x[i : i + 1]


def explicit_ggn(model: nn.Module, loss_fn, X, y, n: int, empirical: bool = False) -> Tensor:
    """(1/N) sum_i J_i^T Lambda_i J_i (or the empirical Fisher (1/N) sum_i g_i g_i^T), dense."""
    names, shapes, theta = flat_params(model)
    total = torch.zeros(theta.numel(), theta.numel(), dtype=torch.float64)
    for i in range(n):
        xi, yi = _one(X, i), y[i : i + 1]
        if empirical:

            def loss_of(flat, xi=xi, yi=yi):
                return loss_fn(functional(model, flat, xi, names, shapes), yi).sum()

            g = torch.autograd.functional.jacobian(loss_of, theta)
            total += torch.outer(g, g)
            continue
        out = functional(model, theta, xi, names, shapes)
        shape = out.shape

        def outputs_of(flat, xi=xi):
            return functional(model, flat, xi, names, shapes).reshape(-1)

        def loss_at(f, yi=yi, shape=shape):
            return loss_fn(f.reshape(shape), yi).sum()

        J = torch.autograd.functional.jacobian(outputs_of, theta)  # [C, P]
        lam = torch.autograd.functional.hessian(loss_at, out.detach().reshape(-1))
        total += J.T @ lam @ J
    return total / n


def linear_block_index(model: nn.Module, layer: str, transposed: bool = False) -> Tensor:
    """Flat positions of the augmented block [W | b] of ``layer``, row-major, by hand."""
    names, shapes, _ = flat_params(model)
    offsets, pos = {}, 0
    for n, s in zip(names, shapes):
        offsets[n] = pos
        pos += s.numel()
    w = dict(model.named_parameters())[f"{layer}.weight" if layer else "weight"]
    d_out, d_in = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w[0].numel())
    wname = f"{layer}.weight" if layer else "weight"
    bname = f"{layer}.bias" if layer else "bias"
    rows = []
    for o in range(d_out):
        if transposed:
            row = [offsets[wname] + i * d_out + o for i in range(d_in)]
        else:
            row = [offsets[wname] + o * d_in + i for i in range(d_in)]
        if bname in offsets:
            row.append(offsets[bname] + o)
        rows.append(row)
    return torch.tensor(rows).reshape(-1)


def conv_problem() -> dict:
    torch.manual_seed(3)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, stride=2, padding=1),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(3 * 3 * 3, 4),
    ).double()
    gen = torch.Generator().manual_seed(4)
    X = torch.randn(30, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (30,), generator=gen)
    return {"model": model, "task": infkit.Task.classification(model), "train": (X, y)}


def signal_problem() -> dict:
    """A 1-D convolutional classifier of signals (``nn.Conv1d``: reflect padding with dilation,
    then a strided one without bias), trained to an optimum (||grad L|| 1e-8 of its start),
    with 6 test signals."""
    torch.manual_seed(13)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(2, 3, 3, padding=2, dilation=2, padding_mode="reflect"),
        torch.nn.Tanh(),
        torch.nn.Conv1d(3, 2, 2, stride=2, bias=False),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * 4, 3),
    ).double()
    gen = torch.Generator().manual_seed(14)
    X = torch.randn(36, 2, 9, generator=gen, dtype=torch.float64)
    y = (X[:, 0, :3].sum(1) > 0).long() + (X[:, 1, 4:].mean(1) > 0.3).long()
    task = infkit.Task.classification(model)
    l2 = 1e-2
    assert infkit.train_to_optimum(task, (X, y), l2, tolerance=1e-8).converged
    Xt = torch.randn(6, 2, 9, generator=gen, dtype=torch.float64)
    yt = torch.randint(0, 3, (6,), generator=gen)
    return {"model": model, "task": task, "l2": l2, "train": (X, y), "test": (Xt, yt)}


class Conv1D(nn.Module):
    """The layout of Hugging Face's GPT-2 ``Conv1D`` (weight [d_in, d_out]), without transformers."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class TinySequenceModel(nn.Module):
    """Per-token logits for [B, T, d] features with an attention mask; mixes tokens by a masked mean."""

    def __init__(self, d: int = 4, hidden: int = 6, vocab: int = 3, conv1d: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(d, hidden)
        self.mix = Conv1D(hidden, hidden) if conv1d else nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: Tensor, attention_mask: Tensor) -> Tensor:
        h = torch.tanh(self.inp(x))
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        pooled = (h * m).sum(1, keepdim=True) / m.sum(1, keepdim=True)
        h = torch.tanh(self.mix(h + pooled))
        return self.out(h)


def sequence_loss(outputs: Tensor, labels: Tensor) -> Tensor:
    """Sum over real tokens (label >= 0) of the cross-entropy: [B]."""
    logp = torch.log_softmax(outputs, dim=-1)
    valid = (labels >= 0).to(outputs.dtype)
    picked = logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * valid).sum(-1)


def sequence_data(n: int = 24, t: int = 5, d: int = 4, vocab: int = 3, seed: int = 0):
    """Features, a right-padded attention mask and labels (-100 on padding)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, t, d, generator=gen, dtype=torch.float64)
    lengths = torch.randint(2, t + 1, (n,), generator=gen)
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)).long()
    labels = torch.randint(0, vocab, (n, t), generator=gen)
    labels[mask == 0] = -100
    return {"x": x, "attention_mask": mask}, labels


class SharedInputModel(nn.Module):
    """Layers that read one input tensor, as an attention's q, k, v projections and a gated
    MLP's gate and up do (``v`` has no bias, so its augmented activations differ from q's)."""

    def __init__(self, d: int = 4, hidden: int = 5, classes: int = 3) -> None:
        super().__init__()
        self.q = nn.Linear(d, hidden)
        self.k = nn.Linear(d, hidden)
        self.v = nn.Linear(d, hidden, bias=False)
        self.gate = nn.Linear(hidden, hidden)
        self.up = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.q(x)) * torch.sigmoid(self.k(x)) + self.v(x)
        return self.out(torch.nn.functional.silu(self.gate(h)) * self.up(h))


def shared_input_problem(n: int = 30, seed: int = 4) -> dict:
    torch.manual_seed(seed)
    model = SharedInputModel().double()
    X = torch.randn(n, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (n,))
    return {"model": model, "task": infkit.Task.classification(model), "train": (X, y)}
