"""Threads asking one Influence at once get the answers one thread gets (infkit.serial).

Before the lock, four threads asking one fitted Influence for `cg` scores at once gave wrong
scores in about half the answers, with no error, and `identity` raised PyTorch's errors from
inside its hooks: a pass changes the model while it reads it."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import torch
from torch import Tensor, nn

import infkit
from infkit import serial

N_THREADS = 4
ROUNDS = 3


def _problem() -> tuple[infkit.Task, tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A 12-8-3 tanh MLP on random data, float64; 60 training examples, 6 queries."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(66, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (66,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return infkit.Task.classification(model), (x[:60], y[:60]), (x[60:], y[60:])


def _at_once(ask: Callable[[], Tensor]) -> tuple[list[Tensor], list[BaseException]]:
    """``ask`` called by N_THREADS threads started together, ROUNDS times: the answers and the
    errors raised."""
    answers: list[Tensor] = []
    errors: list[BaseException] = []
    for _ in range(ROUNDS):
        start = threading.Barrier(N_THREADS)

        def work(start: threading.Barrier = start) -> None:
            start.wait()
            try:
                answers.append(ask())
            except BaseException as error:  # collected for the assertion
                errors.append(error)

        threads = [threading.Thread(target=work) for _ in range(N_THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return answers, errors


@pytest.mark.parametrize("method", ["cg", "exact", "identity"])
def test_threads_asking_one_influence_get_one_threads_scores(method: str) -> None:
    task, train, test = _problem()
    inf = infkit.Influence(task, method, l2=0.1, progress=False).fit(train)
    alone = inf.scores(test)
    answers, errors = _at_once(lambda: inf.scores(test))
    assert not errors, errors[:2]
    assert len(answers) == N_THREADS * ROUNDS
    worst = max(float((a - alone).abs().max()) for a in answers)
    assert worst <= 1e-10 * float(alone.abs().max()), worst


def test_a_thread_refitting_while_others_answer_gives_whole_fits() -> None:
    """Answers asked during another thread's refit come from one fit or the other, whole: here
    the refit is of the same model and data, so from the same scores."""
    task, train, test = _problem()
    inf = infkit.Influence(task, "cg", l2=0.1, progress=False).fit(train)
    alone = inf.scores(test)
    calls = iter(range(N_THREADS * ROUNDS))

    def ask() -> Tensor:
        if next(calls) % N_THREADS == 0:
            inf.fit(train)
            return alone
        return inf.scores(test)

    answers, errors = _at_once(ask)
    assert not errors, errors[:2]
    worst = max(float((a - alone).abs().max()) for a in answers)
    assert worst <= 1e-8 * float(alone.abs().max()), worst


def test_a_child_forked_while_a_thread_holds_the_lock_takes_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reviewer's: a process forked while another thread ran a fit inherited the lock held,
    and its first infkit call waited for ever. The child's hook (serial._fresh_lock) gives it a
    lock it can take at once; where the platform forks, a forked child fits."""
    import multiprocessing

    task, train, _ = _problem()
    started, release = threading.Event(), threading.Event()

    def hold() -> None:
        with serial.PROCESS_LOCK:
            started.set()
            release.wait(30)

    holder = threading.Thread(target=hold)
    holder.start()
    started.wait(10)
    alive, exitcode = False, 0
    try:
        held = serial.PROCESS_LOCK
        assert not held.acquire(blocking=False)  # another thread holds it
        monkeypatch.setattr(serial, "PROCESS_LOCK", held)  # restored after the test
        serial._fresh_lock()  # what register_at_fork runs in a child
        assert serial.PROCESS_LOCK is not held and serial.PROCESS_LOCK.acquire(blocking=False)
        serial.PROCESS_LOCK.release()
        monkeypatch.setattr(serial, "PROCESS_LOCK", held)
        if "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
            child = context.Process(target=_fit_quietly, args=(task, train))
            child.start()
            child.join(60)
            alive, exitcode = child.is_alive(), child.exitcode
            if alive:
                child.kill()
    finally:
        release.set()
        holder.join()
    assert not alive and exitcode == 0


def _fit_quietly(task: infkit.Task, train: tuple[Tensor, Tensor]) -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infkit.Influence(task, "exact", l2=0.1, progress=False).fit(train)
