"""Progress of long passes: a bar where someone watches, a line every few seconds in a log.

``Influence(progress=None)`` (the default) decides per environment: in a terminal or a notebook a
tqdm bar; anywhere else (a log file, a batch job) a plain line every :data:`LOG_EVERY` seconds for
passes that last longer than :data:`LOG_AFTER` seconds, so short passes stay silent.
A step that outlasts :data:`LOG_EVERY` (one post-fit check, one large batch) gets a line of its
own from a watcher thread, so that a log never falls silent for long.
``progress=True`` forces bars, ``False`` silences everything. Under ``torchrun`` (or any
launcher that sets ``RANK``) only rank 0 shows progress.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Literal, TypeVar

from tqdm.auto import tqdm

#: how progress is shown
Mode = Literal["bar", "log", "off"]
#: a non-interactive pass reports after this many seconds ...
LOG_AFTER = 5.0
#: ... and then every this many seconds
LOG_EVERY = 10.0

T = TypeVar("T")


def interactive() -> bool:
    """Whether someone is watching: a terminal on stderr, or a Jupyter kernel."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def resolve(progress: bool | None) -> Mode:
    """The mode for a user's ``progress`` setting (None: by environment); off on ranks > 0."""
    if os.environ.get("RANK", "0") != "0":
        return "off"
    if progress is None:
        return "bar" if interactive() else "log"
    return "bar" if progress else "off"


class Progress:
    """Counts the steps of one pass and shows them in the resolved mode.

    Args:
        mode: ``"bar"``, ``"log"`` or ``"off"``.
        total: the number of steps, when known.
        desc: what the pass does, e.g. ``"gradients"``.
    """

    def __init__(self, mode: Mode, total: int | None, desc: str) -> None:
        self.mode, self.total, self.desc = mode, total, desc
        self.done = 0
        self.start = time.monotonic()
        self.last = self.start
        self.bar = tqdm(total=total, desc=desc) if mode == "bar" else None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if mode == "log":  # a line for a step that outlasts LOG_EVERY, from a watcher
            threading.Thread(target=self._watch, name=f"infkit {desc}", daemon=True).start()

    def update(self, steps: int = 1, note: str = "") -> None:
        """Advance by ``steps``; ``note`` (e.g. a residual) is shown with the count."""
        self.done += steps
        if self.bar is not None:
            self.bar.update(steps)
            if note:
                self.bar.set_postfix_str(note, refresh=False)
            return
        if self.mode != "log":
            return
        with self._lock:
            now = time.monotonic()
            if now - self.start < LOG_AFTER or now - self.last < LOG_EVERY:
                return
            self.last = now
            elapsed = now - self.start
            if self.total:
                left = elapsed * (self.total - self.done) / max(self.done, 1)
                count = (
                    f"{self.done}/{self.total} ({self.done / self.total:.0%}), ~{left:.0f} s left"
                )
            else:
                count = f"{self.done} steps"
            extra = f", {note}" if note else ""
            self._say(f"{count}{extra}, {elapsed:.0f} s")

    def _watch(self) -> None:
        """Until :meth:`close`: a line when no step has ended for :data:`LOG_EVERY` seconds
        (checked twice a period, at least 0.5 s apart)."""
        while not self._closed.wait(max(LOG_EVERY, 1.0) / 2):
            with self._lock:
                now = time.monotonic()
                if self._closed.is_set() or now - self.start < LOG_AFTER:
                    continue
                if now - self.last < LOG_EVERY:
                    continue
                self.last = now
                of = f" of {self.total}" if self.total else ""
                self._say(f"step {self.done + 1}{of} still running, {now - self.start:.0f} s")

    def _say(self, text: str) -> None:
        print(f"[infkit] {self.desc}: {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._closed.set()
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "log" and time.monotonic() - self.start >= LOG_AFTER:
            print(
                f"[infkit] {self.desc}: done, {time.monotonic() - self.start:.0f} s",
                file=sys.stderr,
                flush=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(iterable: Iterable[T], mode: Mode, desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``iterable``, showing progress in ``mode``."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(mode, total, desc) as progress:
        for item in iterable:
            yield item
            progress.update()


class Stopwatch:
    """Wall-clock seconds per named step of a run (the demo's and ``infkit run``'s timings)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        """Record the time since the previous lap under ``name``."""
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now
