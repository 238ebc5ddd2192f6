"""What every results file records next to its tables: the machine, the infkit commit, versions.

:func:`provenance` gives one Markdown line: the infkit git commit (``git rev-parse --short
HEAD``, and whether the working tree was dirty, naming the top-level folders with uncommitted
changes), the versions of infkit and torch in this process, and those of the peer libraries
read from each peer venv's installed metadata (``importlib.metadata`` in a subprocess of that
venv's python, which imports nothing else), and the machine.

Imports only the standard library at module level, so the peer workers, which run the
benchmark scripts in the separate peer venvs, can import the scripts that use it.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = ROOT) -> str:
    """``<short hash>``, plus ``(dirty: ...)`` naming the folders with uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=all"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not status:
        return f"{head} (clean tree)"
    folders = sorted({_folder(line[3:]) for line in status})
    return f"{head} (dirty tree: uncommitted changes in {', '.join(folders)})"


def _folder(path: str) -> str:
    path = path.split(" -> ")[-1].strip('"')
    parts = path.split("/")
    if parts[0] == "benchmarks" and len(parts) > 2:
        return "/".join(parts[:2]) + "/"  # benchmarks/ vs benchmarks/results/
    return parts[0] + ("/" if len(parts) > 1 else "")


def installed_versions(python: Path | str, packages: Sequence[str]) -> dict[str, str]:
    """The installed versions of ``packages`` in the venv of ``python`` ("missing" if absent)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        out[p] = m.version(p)\n"
        "    except m.PackageNotFoundError:\n"
        "        out[p] = 'missing'\n"
        "print(json.dumps(out))\n"
    )
    try:
        proc = subprocess.run(
            [str(python), "-c", code, *packages], capture_output=True, text=True, timeout=120
        )
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return dict.fromkeys(packages, "unknown")


def machine() -> str:
    """Architecture, OS, core count, Python version."""
    return (
        f"{platform.machine()}, {platform.system()} {platform.release()}, "
        f"{os.cpu_count()} CPU cores, Python {platform.python_version()}"
    )


def provenance(peers: Mapping[str, tuple[Path | str, Sequence[str]]] | None = None) -> str:
    """One Markdown line: machine, infkit commit and version, torch, and each peer's versions.

    Args:
        peers: label -> (python of the peer venv, the packages to report), e.g.
            ``{"peer venv .venv-peers": (path, ["kronfluence", "torch"])}``. A missing python
            is reported as such.
    """
    ours = installed_versions(sys.executable, ["infkit", "torch"])
    parts = [
        f"infkit {ours['infkit']} at git {git_commit()}",
        f"torch {ours['torch']}",
    ]
    for label, (python, packages) in (peers or {}).items():
        if not Path(python).exists():
            parts.append(f"{label}: not found at {python}")
            continue
        versions = installed_versions(python, packages)
        parts.append(f"{label}: " + ", ".join(f"{p} {v}" for p, v in versions.items()))
    return "Provenance: " + "; ".join(parts) + f". Machine: {machine()}."


def measured_worker(cmd: Sequence[str], env: Mapping[str, str], label: str) -> tuple[dict, int]:
    """Run ``cmd`` (a worker printing one JSON line last) under ``/usr/bin/time -v``: its result
    and its peak resident memory in bytes (0 when time did not report it)."""
    proc = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=dict(env), check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    return result, int(peak.group(1)) * 1024 if peak else 0


def append_section(path: Path, lines: Sequence[str]) -> str:
    """Print a result section (its lines) and append it to the results file ``path``, after a
    blank line when the file has content; returns the text."""
    text = "\n".join(lines) + "\n"
    print(text)
    separator = "\n" if path.exists() and path.stat().st_size else ""
    with path.open("a") as out:
        out.write(separator + text)
    return text


def export_source(revision: str) -> Path:
    """The library's src/ at ``revision``, exported into a temporary folder (put it first on
    ``PYTHONPATH`` to run a worker on that version of the library)."""
    folder = Path(tempfile.mkdtemp(prefix="infkit-baseline-"))
    archive = folder / "src.tar"
    subprocess.run(
        ["git", "-C", str(ROOT), "archive", "-o", str(archive), revision, "src"], check=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(folder, filter="data")
    return folder / "src"


def library_worker(
    script: str, arguments: Sequence[str], src: Path, threads: int, label: str
) -> dict:
    """Run ``script --worker ARGUMENTS`` in a fresh process on the library at ``src`` (first on
    ``PYTHONPATH``; :func:`export_source` for another revision) with ``threads`` threads: the
    JSON object it prints last."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(src)}
    cmd = [sys.executable, script, "--worker", *arguments]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ============================================================================ kronfluence
# Run in the peer venv only (kronfluence is never a dependency of infkit).
def kronfluence_analyzer(model, task, output_dir: Path, name: str):  # type: ignore[no-untyped-def]
    """kronfluence's ``Analyzer`` for a model already passed through ``prepare_model``: on CPU,
    without progress bars, its factors and scores under ``output_dir``."""
    from kronfluence.analyzer import Analyzer

    return Analyzer(
        analysis_name=name,
        model=model,
        task=task,
        cpu=True,
        disable_tqdm=True,
        output_dir=str(output_dir),
    )


def kronfluence_pairwise(  # type: ignore[no-untyped-def]
    analyzer, scores_name: str, train, queries, batch_size: int, damping: float | None
) -> None:
    """kronfluence's pairwise scores of all ``queries`` (one batch) against ``train`` from the
    factors named "ekfac", at the scalar ``damping`` (None: its per-module heuristic), saved
    as ``scores_name`` (``analyzer.load_pairwise_scores`` reads them back)."""
    from kronfluence.arguments import ScoreArguments

    analyzer.compute_pairwise_scores(
        scores_name=scores_name,
        factors_name="ekfac",
        query_dataset=queries,
        train_dataset=train,
        per_device_query_batch_size=len(queries),
        per_device_train_batch_size=batch_size,
        score_args=ScoreArguments(damping_factor=damping),
        overwrite_output_dir=True,
    )
