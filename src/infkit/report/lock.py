"""One ``infkit run`` at a time in a workdir (:func:`held`).

Two runs at once in one workdir would each treat the other's work in progress as a stopped
run's: one's end removes ``infkit-partial/`` under the other, and their results replace each
other file by file. The run holds an exclusive lock on ``.infkit-run.lock`` in the workdir while
it works; a second run is refused at once, naming the workdir and the process that holds it.
The lock is the operating system's (``flock``), released when its process ends however it ends,
so a killed run leaves nothing to clear by hand. Where ``flock`` does not exist (Windows) or
the file system refuses it (NFS mounted ``nolock``) runs are not guarded (the latter with a
notice); on a network file system it guards the runs of one machine only.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infkit.errors import ConfigError, Notice, warn

LOCK_NAME = ".infkit-run.lock"


@contextmanager
def held(workdir: Path) -> Iterator[None]:
    """Hold ``workdir``'s run lock for the ``with`` block (``workdir`` exists). On a file
    system without locks (NFS mounted ``nolock``, some FUSE mounts) the run goes unguarded,
    with a notice.

    Raises:
        ConfigError: another process holds it, naming the workdir and that process.
    """
    try:
        import fcntl
    except ImportError:  # (no POSIX locks: not guarded, as the module says)
        yield
        return
    with open(workdir / LOCK_NAME, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not yet written its id"
            raise ConfigError(
                f"another infkit run is using the workdir {workdir} ({holder}): two runs at once "
                "in one workdir remove each other's work in progress and replace each other's "
                "results. Wait for it to finish, or give this run another workdir (--out)"
            ) from None
        except OSError as error:
            warn(
                f"the workdir {workdir} is on a file system without locks ({error.strerror}): "
                "this run is not guarded against another started in the same workdir",
                Notice,
            )
            yield
            return
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
