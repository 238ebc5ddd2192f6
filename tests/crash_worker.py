"""A worker for tests/test_crash_resume.py: a retraining or a factor fit that may be killed.

    python tests/crash_worker.py JOB DIRECTORY OUT KILL

JOB is ``retrain`` (leave-one-out for six examples with ``cache_dir=DIRECTORY``), ``factors``
(EK-FAC with ``factors_dir=DIRECTORY``, then scores) or ``lmscores`` (EK-FAC on a small causal
LM with ``workdir=DIRECTORY``: factors, preconditioned queries and score shards). KILL says where
the process SIGKILLs itself: ``none``; ``save:N`` in the N-th artifact save, after its payload
is written and before the commit (the manifest's write); ``train:N`` inside the N-th
retraining; ``fit`` in the middle of the factor fit's pass over the data (``eigen``: of its
eigenvalue-correction pass); ``score:N`` inside the N-th batch of the scoring pass. Without a kill the results go to OUT (torch.save).
"""

from __future__ import annotations

import os
import signal
import sys
import warnings

import torch
from torch import nn

import infkit
import infkit.retrain
import infkit.store


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _kill_on_call(module: object, name: str, count: int, when: object = None) -> None:
    original = getattr(module, name)
    calls = {"n": 0}

    def wrapper(*args: object, **kwargs: object) -> object:
        if when is None or when(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == count:
                _die()
        return original(*args, **kwargs)

    setattr(module, name, wrapper)


def _problem() -> tuple:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = torch.tensor(X[:200] / 16.0), torch.tensor(y[:200])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 10)).double()
    task = infkit.Task.classification(model)
    infkit.train_to_optimum(task, (X[:150], y[:150]), 1e-2)
    return task, (X[:150], y[:150]), (X[150:160], y[150:160])


def _kill_in_fit(second_pass: bool = False) -> None:
    """SIGKILL after the second batch of the factor fit's covariance pass (``second_pass``:
    of its eigenvalue-correction pass)."""
    from infkit.kfac.factors import FactorFitter

    original = FactorFitter.pass_over
    passes = {"n": 0}

    def dying(self: FactorFitter, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        passes["n"] += 1
        for count, item in enumerate(original(self, *args, **kwargs)):
            if count == 2 and passes["n"] == (2 if second_pass else 1):
                _die()
            yield item

    FactorFitter.pass_over = dying  # type: ignore[method-assign]


def _language_model_problem() -> tuple:
    """A small causal LM (tests/lm_helpers.py), 40 training sequences and 3 queries."""
    from lm_helpers import LENGTH, VOCAB, TinyLM, rows

    from infkit import language_modeling as lm

    torch.manual_seed(0)
    model = TinyLM().double().eval()
    ids = torch.randint(0, VOCAB, (43, LENGTH))
    inputs, labels = lm.examples(ids)
    task = infkit.Task.language_modeling(model)
    return task, rows(inputs, labels, 0, 40), rows(inputs, labels, 40, 43)


def main() -> None:
    job, directory, out, kill = sys.argv[1:5]
    warnings.simplefilter("ignore")
    if job != "lmscores":  # the digits problem (about 6 s of training), before any patch
        task, train, test = _problem()
    if kill.startswith("save:"):
        _kill_on_call(
            infkit.store,
            "_write_json",
            int(kill[5:]),
            when=lambda path, obj: str(path).endswith("manifest.json"),
        )
    elif kill.startswith("train:"):
        _kill_on_call(infkit.retrain, "train_to_optimum", int(kill[6:]))
    if job == "retrain":
        result = infkit.retrain.leave_one_out(
            task, train, test, [0, 3, 7, 11, 20, 42], 1e-2, cache_dir=directory
        )
        torch.save({"params": result.params, "measurement": result.measurement}, out)
    elif job == "lmscores":
        if kill.startswith("score:"):  # inside the N-th batch of the scoring pass
            from infkit.kfac.streaming import StreamingScorer

            _kill_on_call(StreamingScorer, "_batch_scores", int(kill[6:]))
        if kill == "fit":
            _kill_in_fit()
        if kill == "eigen":
            _kill_in_fit(second_pass=True)
        task, train, test = _language_model_problem()
        inf = infkit.Influence(
            task, "ekfac", l2=1e-2, damping=1e-2, batch_size=2, workdir=directory, shard_batches=3
        )
        scores = inf.fit(train).scores(test)
        described = inf.describe()
        tally = described["score_shards"]
        resumed = int(described["factors_resumed"])
        torch.save({"scores": scores, "tally": [tally["computed"], tally["reused"], resumed]}, out)
    else:
        if kill == "fit":  # after the second batch of the covariance pass
            _kill_in_fit()
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-3, factors_dir=directory)
        scores = inf.fit(train).scores(test)
        torch.save({"scores": scores}, out)


if __name__ == "__main__":
    main()
