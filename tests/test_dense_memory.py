"""The dense method's memory under ``memory_limit``, measured: ``exact`` forms the P x P
curvature, a damped and symmetrised copy, its Cholesky factor and LAPACK's working copy at the
factorisation's peak (4.4 copies measured), which its refusal check and its plan count at 5 (a
tester's run under the limit its plan named rose 1.72x past it: it held 6.4 copies where 3
were counted). Peak
resident memory read in a fresh process, as ``tests/test_store_memory.py`` reads it."""

from __future__ import annotations

import pytest
from resident_memory import READS_PROC, run_child

pytestmark = pytest.mark.skipif(not READS_PROC, reason="reads resident memory from /proc")

#: the child: an exact fit of an MLP on digits (P = 3,010: 69 MiB a P x P float64 copy) under
#: the limit its own plan names, after the same run on a tiny model; prints the peak's rise
#: above the resident memory before the measured run, and the limit
CHILD = """
import json, warnings
import torch
import infkit
from resident_memory import high_water, resident
from sklearn.datasets import load_digits
torch.set_num_threads(1)
X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X / 16.0)[:300], torch.tensor(y)[:300]
train, test = (X[:280], y[:280]), (X[280:], y[280:])
def influence(hidden, limit):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 10)
    ).double()
    task = infkit.Task.classification(model)
    return infkit.Influence(task, "exact", l2=1e-2, damping=1e-2, progress=False, memory_limit=limit)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    influence(4, None).fit(train).scores(test)
    limit = int(influence(40, 1 << 34).plan(train, test).peak_bytes)
    before = resident()
    influence(40, limit).fit(train).scores(test)
print(json.dumps({"rise": high_water() - before, "limit": limit}))
"""


def test_an_exact_fit_stays_within_the_limit_its_plan_names() -> None:
    measured = run_child(CHILD)
    # (before: 428 MiB against a plan of 226; 290 against 283 at 4 copies counted)
    assert measured["rise"] < measured["limit"], measured
