"""kill -9 at any point of a retraining, a factor fit or a sharded scoring run, then the same call
again.

Each case runs tests/crash_worker.py in a subprocess that SIGKILLs itself at a chosen point (in
an artifact save between payload and manifest, inside a retraining, in the middle of a factor
fit), then reruns the same call to completion, and compares with an uninterrupted run in a
fresh directory: the results must be bit-identical (the same computation, reused or redone),
and no temporary or half-written file may be left behind.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("crash_worker.py")


def _run(job: str, directory: Path, out: Path, kill: str = "none") -> int:
    proc = subprocess.run(
        [sys.executable, str(WORKER), job, str(directory), str(out), kill],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if kill == "none" and proc.returncode != 0:
        raise AssertionError(proc.stderr[-3000:])
    return proc.returncode


def _stray(directory: Path) -> list[str]:
    """Files or folders no complete artifact accounts for: temporaries, trash, lone files."""
    stray = [p.name for p in directory.iterdir() if p.name.startswith(".")]
    for artifact in directory.iterdir():
        if artifact.is_dir() and not (artifact / "manifest.json").exists():
            stray.append(artifact.name)
    return stray


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("uninterrupted")
    out = {}
    for job in ("retrain", "factors", "lmscores"):
        _run(job, root / job, root / f"{job}.pt")
        out[job] = torch.load(root / f"{job}.pt")
    return out


@pytest.mark.parametrize(
    ("job", "kill"),
    # one kill point per job by default (each case is two worker processes, about 20 s on a
    # 2-core machine); the others behind the slow marker (make test-slow)
    [
        ("retrain", "save:3"),
        pytest.param("retrain", "train:4", marks=pytest.mark.slow),
        pytest.param("factors", "save:1", marks=pytest.mark.slow),
        ("factors", "fit"),
        # a causal LM with a workdir, 20 scoring batches in shards of 3: killed in the fit's
        # first pass (about 30% of the run's time) and in its second (the committed K-FAC
        # stage is reused), in the commit of the second score shard, and at 70% of the
        # scoring pass
        pytest.param("lmscores", "fit", marks=pytest.mark.slow),
        ("lmscores", "eigen"),
        pytest.param("lmscores", "save:5", marks=pytest.mark.slow),
        ("lmscores", "score:14"),
    ],
)
def test_killed_run_resumes_bit_identically(
    uninterrupted: dict, tmp_path: Path, job: str, kill: str
) -> None:
    directory = tmp_path / "store"
    code = _run(job, directory, tmp_path / "killed.pt", kill)
    assert code == -signal.SIGKILL, f"the worker was not killed ({code})"
    assert not (tmp_path / "killed.pt").exists()
    _run(job, directory, tmp_path / "resumed.pt")
    resumed = torch.load(tmp_path / "resumed.pt")
    tally = resumed.pop("tally", None)
    for name, expected in uninterrupted[job].items():
        if name != "tally":
            assert torch.equal(resumed[name], expected), name
    if tally is not None:  # [computed, reused] score shards, and a resumed fit, of the rerun
        finished = {"fit": 0, "eigen": 0, "save:5": 1, "score:14": 4}[kill]  # shards committed
        assert tally == [7 - finished, finished, int(kill == "eigen")]
    assert _stray(directory) == []


@pytest.mark.slow  # two retraining workers at once: about 50 s on a 2-core machine
def test_concurrent_writers_share_a_directory(uninterrupted: dict, tmp_path: Path) -> None:
    directory = tmp_path / "store"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                "retrain",
                str(directory),
                str(tmp_path / f"{k}.pt"),
                "none",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    for k in range(2):
        result = torch.load(tmp_path / f"{k}.pt")
        for name, expected in uninterrupted["retrain"].items():
            assert torch.equal(result[name], expected), (k, name)
    assert _stray(directory) == []
    # one per removed example, and the retraining on all the data the changes are measured from
    assert len([p for p in directory.iterdir() if p.is_dir()]) == 7
