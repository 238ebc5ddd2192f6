"""KAIROS data valuation against brute force: the closed-form values equal leave-one-out MMD^2
differences computed from whole kernel matrices, the online update equals recomputation, and the
median heuristic equals its definition (docs/analyses.md §9)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infkit.errors import InvalidInputError, NonFiniteError
from infkit.evaluate import relative_error
from infkit.valuation import Kairos, kairos, median_bandwidth


def _kernel(A, B, ya, yb, kernel, bandwidth):  # type: ignore[no-untyped-def]
    if kernel == "linear":
        K = A @ B.T
    else:
        diff = A[:, None, :] - B[None, :, :]
        K = torch.exp(-(diff**2).sum(-1) / (2 * bandwidth**2))
    if ya is not None:
        K = K * (ya[:, None] == yb[None, :]).double()
    return K


def _mmd2(X, R, y, ry, kernel, bandwidth):  # type: ignore[no-untyped-def]
    return (
        _kernel(X, X, y, y, kernel, bandwidth).mean()
        - 2 * _kernel(X, R, y, ry, kernel, bandwidth).mean()
        + _kernel(R, R, ry, ry, kernel, bandwidth).mean()
    )


@pytest.fixture
def data() -> dict:
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(30, 5, generator=gen, dtype=torch.float64)
    R = torch.randn(20, 5, generator=gen, dtype=torch.float64) + 0.3
    y = torch.randint(0, 3, (30,), generator=gen)
    ry = torch.randint(0, 3, (20,), generator=gen)
    return {"X": X, "R": R, "y": y, "ry": ry}


@pytest.mark.parametrize("kernel", ["rbf", "linear"])
@pytest.mark.parametrize("labelled", [False, True])
def test_values_are_leave_one_out_mmd_differences(data: dict, kernel: str, labelled: bool) -> None:
    X, R = data["X"], data["R"]
    y, ry = (data["y"], data["ry"]) if labelled else (None, None)
    bandwidth = 1.7 if kernel == "rbf" else None
    valuation = Kairos(
        X, R, train_labels=y, reference_labels=ry, kernel=kernel, bandwidth=bandwidth
    )
    full = _mmd2(X, R, y, ry, kernel, bandwidth)
    expected = torch.stack(
        [
            _mmd2(
                torch.cat([X[:i], X[i + 1 :]]),
                R,
                None if y is None else torch.cat([y[:i], y[i + 1 :]]),
                ry,
                kernel,
                bandwidth,
            )
            - full
            for i in range(len(X))
        ]
    )
    assert valuation.mmd2 == pytest.approx(float(full), rel=1e-12)
    assert relative_error(valuation.values, expected) < 1e-10
    assert torch.equal(
        kairos(X, R, train_labels=y, reference_labels=ry, kernel=kernel, bandwidth=bandwidth),
        valuation.values,
    )


@pytest.mark.parametrize("labelled", [False, True])
def test_online_update_equals_recomputation(data: dict, labelled: bool) -> None:
    X, R = data["X"], data["R"]
    y, ry = (data["y"], data["ry"]) if labelled else (None, None)
    whole = Kairos(X, R, train_labels=y, reference_labels=ry, bandwidth=1.3)
    online = Kairos(
        X[:22], R, train_labels=None if y is None else y[:22], reference_labels=ry, bandwidth=1.3
    )
    online.update(X[22:27], None if y is None else y[22:27])
    values = online.update(X[27:], None if y is None else y[27:])
    assert relative_error(values, whole.values) < 1e-12
    assert online.mmd2 == pytest.approx(whole.mmd2, rel=1e-12)


def test_label_noise_gets_the_most_negative_values() -> None:
    """Two well-separated classes in equal proportions in both sets (a difference in class
    proportions moves the values too, docs/analyses.md §9); three labels flipped each way in
    the training set are the six most negative values, and negative."""
    gen = torch.Generator().manual_seed(1)
    centres = torch.tensor([[0.0, 0.0], [4.0, 4.0]], dtype=torch.float64)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % 2
        return centres[y] + torch.randn(n, 2, generator=gen, dtype=torch.float64), y

    X, y = sample(100)
    R, ry = sample(100)
    flipped = torch.arange(6)
    y = y.clone()
    y[flipped] = 1 - y[flipped]
    values = kairos(X, R, train_labels=y, reference_labels=ry)
    assert set(values.argsort()[:6].tolist()) == set(flipped.tolist())
    assert bool((values[flipped] < 0).all())


def test_median_heuristic_and_bad_input(data: dict) -> None:
    X, R = data["X"], data["R"]
    points = torch.cat([X, R])
    d = torch.cdist(points, points)
    expected = d[torch.triu_indices(50, 50, offset=1).unbind()].median()
    assert median_bandwidth(points) == pytest.approx(float(expected))
    assert Kairos(X, R).bandwidth == pytest.approx(float(expected))
    # a median of 0 from duplicates is said as such (a tester's 50 copies of one row among 59
    # were told the features were all identical), and from identical rows as that
    copies = torch.cat([torch.zeros(50, 3, dtype=X.dtype), X[:9, :3]])
    with pytest.raises(InvalidInputError, match=r"1,\d+ of the 1,711 pairs of rows are identical"):
        median_bandwidth(copies)
    with pytest.raises(InvalidInputError, match="the features are all identical, so the median"):
        median_bandwidth(torch.ones(5, 3, dtype=X.dtype))
    with pytest.raises(InvalidInputError, match="together"):
        Kairos(X, R, train_labels=data["y"])
    with pytest.raises(InvalidInputError, match="same encoder"):
        Kairos(X, R[:, :3])
    with pytest.raises(NonFiniteError, match="example 4 has NaN"):  # (README's Errors)
        Kairos(torch.where(torch.arange(30)[:, None] == 4, float("nan"), X), R)
    for bad in (float("inf"), 0.0, float("nan")):  # inf: every value 0 without a word
        with pytest.raises(InvalidInputError, match="bandwidth must be a finite number > 0"):
            Kairos(X, R, bandwidth=bad)
    with pytest.raises(InvalidInputError, match="kernel must be one of"):
        Kairos(X, R, kernel="cosine")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="pass the new examples' labels"):
        Kairos(X, R, train_labels=data["y"], reference_labels=data["ry"]).update(X[:2])
    # labels are class indices: whole floats pass, others are refused (they matched nothing)
    y, ry = data["y"], data["ry"]
    whole = Kairos(X, R, train_labels=y.double(), reference_labels=ry.double()).values
    ints = Kairos(X, R, train_labels=y, reference_labels=ry).values
    torch.testing.assert_close(whole, ints, rtol=1e-12, atol=1e-15)
    with pytest.raises(InvalidInputError, match=r"train_labels\[0\] is .*class indices"):
        Kairos(X, R, train_labels=y.double() + 0.5, reference_labels=ry)
    # class names and one-hot rows (a raw TypeError from torch, and "90 labels for 30 examples")
    names = np.array(["abc"[int(k) % 3] for k in y])
    for given in (names, names.tolist()):
        with pytest.raises(InvalidInputError, match=r"train_labels cannot be read.*np\.unique"):
            Kairos(X, R, train_labels=given, reference_labels=ry)  # type: ignore[arg-type]
    one_hot = torch.nn.functional.one_hot(y.long(), 3)
    with pytest.raises(
        InvalidInputError, match=r"\[n\] class indices, got shape \(30, 3\).*argmax"
    ):
        Kairos(X, R, train_labels=one_hot, reference_labels=ry)
    with pytest.raises(InvalidInputError, match="reference_features cannot be read as numbers"):
        Kairos(X, [["a", "b"]] * 20)  # type: ignore[arg-type]
