"""A worker for tests/test_crash_resume.py: a retraining or a factor fit that may be killed.

    python tests/crash_worker.py JOB DIRECTORY OUT KILL

JOB is ``retrain`` (leave-one-out for six examples with ``cache_dir=DIRECTORY``) or ``factors``
(EK-FAC with ``factors_dir=DIRECTORY``, then scores). KILL says where the process SIGKILLs
itself: ``none``; ``save:N`` in the N-th artifact save, after its payload is written and before
the commit (the manifest's write); ``train:N`` inside the N-th retraining; ``fit`` in the middle
of the factor fit's pass over the data. Without a kill the results go to OUT (torch.save).
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


def main() -> None:
    job, directory, out, kill = sys.argv[1:5]
    warnings.simplefilter("ignore")
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
    else:
        if kill == "fit":  # after the second batch of the covariance pass
            from infkit.kfac.factors import FactorFitter

            original = FactorFitter.pass_over

            def dying(self: FactorFitter, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
                for count, item in enumerate(original(self, *args, **kwargs)):
                    if count == 2:
                        _die()
                    yield item

            FactorFitter.pass_over = dying  # type: ignore[method-assign]
        inf = infkit.Influence(task, "ekfac", l2=1e-2, damping=1e-3, factors_dir=directory)
        scores = inf.fit(train).scores(test)
        torch.save({"scores": scores}, out)


if __name__ == "__main__":
    main()
