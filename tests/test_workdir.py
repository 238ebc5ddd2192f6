"""A resumable run in a workdir: factors, preconditioned queries and score shards committed as
artifacts, a finished run's scores read back without the model, and one array job's share of the
shards (docs/distributed.md §3). The kill -9 cases are in tests/test_crash_resume.py."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from lm_helpers import LENGTH, VOCAB, TinyLM, rows

import infkit
from infkit import language_modeling as lm
from infkit.data import ExampleSet
from infkit.errors import InvalidInputError, Notice, UnsupportedError
from infkit.evaluate import relative_error
from infkit.fingerprint import data_fingerprint

N, Q, BATCH, SHARD = 26, 3, 2, 3  # 13 batches: shards of 3 batches, the last of one
OPTIONS = {"l2": 1e-2, "damping": 1e-2, "batch_size": BATCH, "shard_batches": SHARD}


@pytest.fixture(scope="module")
def problem() -> dict:
    torch.manual_seed(3)
    model = TinyLM().double().eval()
    inputs, labels = lm.examples(torch.randint(0, VOCAB, (N + Q, LENGTH)))
    return {
        "task": infkit.Task.language_modeling(model),
        "train": rows(inputs, labels, 0, N),
        "test": rows(inputs, labels, N, N + Q),
    }


def _influence(problem: dict, **extra: object) -> infkit.Influence:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return infkit.Influence(problem["task"], "ekfac", **OPTIONS, **extra).fit(problem["train"])


def test_a_finished_run_is_read_back_and_not_recomputed(
    problem: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reference = _influence(problem, memory_limit=60_000)  # streamed, no workdir
    assert reference.fitted.train_gradients is None
    expected = reference.scores(problem["test"])
    first = _influence(problem, workdir=tmp_path)
    scores = first.scores(problem["test"])
    assert relative_error(scores, expected) < 1e-12
    assert first.describe()["score_shards"] == {"computed": 5, "reused": 0}
    with caplog.at_level("INFO", logger="infkit"):
        again = _influence(problem, workdir=tmp_path)
    assert again.method.kronecker().loaded  # the factors come from the workdir, and it says so
    assert f"Kronecker factors reused from {tmp_path}" in caplog.text
    assert torch.equal(again.scores(problem["test"]), scores)  # read back: the same bytes
    assert again.describe()["score_shards"] == {"computed": 0, "reused": 5}
    (saved,) = infkit.read_scores(tmp_path)
    assert torch.equal(saved.scores, scores.double())
    assert saved.info == {"method": "ekfac", "n_queries": Q, "n_train": N}
    # other queries are another computation: their own shards, nothing reused
    other = again.scores((problem["test"][0], problem["test"][1].flip(0)))
    assert again.describe()["score_shards"] == {"computed": 5, "reused": 0}
    assert not torch.equal(other, scores)
    # top_k's call is counted afresh too (a tester read 10 reused after scores then top_k)
    again.top_k(problem["test"], k=2)
    assert again.describe()["score_shards"] == {"computed": 0, "reused": 5}


def test_array_jobs_commit_their_parts_and_a_last_call_assembles_them(
    problem: dict, tmp_path: Path
) -> None:
    expected = _influence(problem).scores(problem["test"])
    counts = [
        _influence(problem, workdir=tmp_path).score_shards(problem["test"], (i, 2)) for i in (0, 1)
    ]
    assert counts == [{"computed": 3, "reused": 0}, {"computed": 2, "reused": 0}]
    final = _influence(problem, workdir=tmp_path)
    assert relative_error(final.scores(problem["test"]), expected) < 1e-12
    assert final.describe()["score_shards"] == {"computed": 0, "reused": 5}


def test_shards_need_a_workdir_a_valid_part_and_a_sharding_method(
    problem: dict, tmp_path: Path
) -> None:
    with pytest.raises(InvalidInputError, match="workdir=PATH"):
        _influence(problem).score_shards(problem["test"], (0, 2))
    for part in ((2, 2), "0/2", (0,), (0, 1, 2)):
        with pytest.raises(InvalidInputError, match=r"part must be \(i, K\)"):
            _influence(problem, workdir=tmp_path).score_shards(problem["test"], part)  # type: ignore[arg-type]
    with pytest.warns(Notice, match="keeps nothing in workdir"):
        exact = infkit.Influence(problem["task"], "identity", l2=1e-2, workdir=tmp_path)
        exact.fit(problem["train"])
    with pytest.raises(UnsupportedError, match="does not compute scores in shards"):
        exact.score_shards(problem["test"], (0, 2))
    # a Kronecker method whose scores take the generic path: every job would compute them all
    # and commit nothing
    whole = _influence(problem, workdir=tmp_path / "whole", unsupported="identity")
    with pytest.raises(UnsupportedError, match="computes these scores whole"):
        whole.score_shards(problem["test"], (0, 2))
    with pytest.raises(InvalidInputError, match="is a file"):
        (tmp_path / "file").write_text("")
        infkit.Influence(problem["task"], "ekfac", workdir=tmp_path / "file")


def test_damaged_scores_are_named_and_overwrite_recomputes_them(
    problem: dict, tmp_path: Path
) -> None:
    first = _influence(problem, workdir=tmp_path)
    scores = first.scores(problem["test"])
    # damage one committed shard and the whole scores: named, never read
    shard = next(tmp_path.glob("score-shard-*/*.safetensors"))
    whole = next(tmp_path.glob("scores-*/*.safetensors"))
    for file in (shard, whole):
        data = bytearray(file.read_bytes())
        data[-1] ^= 0xFF
        file.write_bytes(bytes(data))
    with pytest.raises(infkit.errors.ArtifactError, match="run the scores") as caught:
        infkit.read_scores(tmp_path)
    assert str(whole.parent) in str(caught.value)
    with pytest.raises(infkit.errors.ArtifactError, match=str(whole.parent)):
        _influence(problem, workdir=tmp_path).scores(problem["test"])
    # the remedy the message gives: overwrite=True recomputes and replaces what it would read
    again = _influence(problem, workdir=tmp_path, overwrite=True)
    assert relative_error(again.scores(problem["test"]), scores) < 1e-12
    assert again.describe()["score_shards"] == {"computed": 5, "reused": 0}
    (saved,) = infkit.read_scores(tmp_path)
    assert relative_error(saved.scores, scores) < 1e-12
    # describe() counts each call's shards, not the object's total: a computing call, then a
    # read-back on the same object
    last = _influence(problem, workdir=tmp_path)
    last.scores((problem["test"][0], problem["test"][1].flip(0)))
    assert last.describe()["score_shards"] == {"computed": 5, "reused": 0}
    last.scores(problem["test"])
    assert last.describe()["score_shards"] == {"computed": 0, "reused": 5}


def test_the_shards_of_every_chunk_of_queries_are_counted(problem: dict, tmp_path: Path) -> None:
    # a small memory_limit makes the facade score the queries in chunks, each its own
    # computation with its own shards: a call counts them all (the first, per-chunk, reset
    # counted the last chunk's only)
    many = rows(*lm.examples(torch.randint(0, VOCAB, (50, LENGTH))), 0, 50)
    inf = _influence(problem, workdir=tmp_path, memory_limit=120_000)
    assert inf.score_shards(many, (0, 2)) == {"computed": 6, "reused": 0}
    inf.scores(many)
    assert inf.describe()["score_shards"] == {"computed": 4, "reused": 6}
    assert len(list(tmp_path.glob("score-shard-*"))) == 10


def test_a_call_scored_in_chunks_of_queries_is_read_back_as_one_run(
    problem: dict, tmp_path: Path
) -> None:
    """Under a memory limit the facade scores a call's queries in chunks, each committed alone;
    read_scores gives the call as one run, its rows in order (a tester's 7 queries read as two
    runs of 4 and 3, the latest the last 3 queries alone), and a call missing a chunk as no
    finished run."""
    many = rows(*lm.examples(torch.randint(0, VOCAB, (50, LENGTH))), 0, 50)
    inf = _influence(problem, workdir=tmp_path, memory_limit=120_000)
    scores = inf.scores(many)
    first = inf.scores(rows(*many, 0, 7))  # a call of its own, not one of the chunks
    (call, alone) = infkit.read_scores(tmp_path)
    assert len(call.parts) > 1 and call.path == call.parts[0]
    assert call.info == {"method": "ekfac", "n_queries": 50, "n_train": N, "chunks": 2}
    assert torch.equal(call.scores, scores.double())
    # the call's identity names all its queries, as an unchunked call's does
    assert call.identity["queries"] == data_fingerprint(ExampleSet(many))
    assert "rows" not in call.identity and "call" not in call.identity
    assert alone.info == {"method": "ekfac", "n_queries": 7, "n_train": N}
    assert torch.equal(alone.scores, first.double()) and alone.parts == (alone.path,)
    shutil.rmtree(call.parts[-1])  # the call's last chunk never committed
    (left,) = infkit.read_scores(tmp_path)
    assert left.info["n_queries"] == 7
    again = inf.scores(many)  # the missing chunk from its shards: the call is finished again
    assert torch.equal(again, scores)
    assert [s.info["n_queries"] for s in infkit.read_scores(tmp_path)] == [7, 50]
    # a call that reads its committed scores back is the latest run (a tester's: queries A,
    # then B, then A again, read B last; read_scores(wd)[-1] is documented as the latest)
    assert torch.equal(inf.scores(rows(*many, 0, 7)), first)
    latest = infkit.read_scores(tmp_path)[-1]
    assert latest.info["n_queries"] == 7 and torch.equal(latest.scores, first.double())


def test_a_stage_left_beside_the_final_factors_is_removed(problem: dict, tmp_path: Path) -> None:
    # EK-FAC's K-FAC stage is K-FAC's factors: one fitted in another directory, copied in,
    # is what a run killed after committing its final factors leaves behind
    _influence(problem, workdir=tmp_path / "run")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infkit.Influence(problem["task"], "kfac", **OPTIONS, workdir=tmp_path / "kfac").fit(
            problem["train"]
        )
    (stage,) = (tmp_path / "kfac").glob("kronecker-factors-*")
    shutil.copytree(stage, tmp_path / "run" / stage.name)
    assert len(list((tmp_path / "run").glob("kronecker-factors-*"))) == 2
    again = _influence(problem, workdir=tmp_path / "run")
    assert again.method.kronecker().loaded
    assert [p.name for p in (tmp_path / "run").glob("kronecker-factors-*")] != [stage.name]
    assert len(list((tmp_path / "run").glob("kronecker-factors-*"))) == 1


def test_the_scoring_progress_counts_batches_in_shards_computed_and_reused(
    problem: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a tester's bar counted shards: 1/1 with 16 batches in one shard, no progress within it
    from infkit.kfac import streaming

    seen: list[tuple[str, int | None, list[int]]] = []

    class Recorded(streaming.Progress):
        def __init__(self, mode: Any, total: int | None, desc: str) -> None:
            super().__init__(mode, total, desc)
            seen.append((desc, total, []))

        def update(self, steps: int = 1, note: str = "") -> None:
            super().update(steps, note)
            seen[-1][2].append(self.done)

    monkeypatch.setattr(streaming, "Progress", Recorded)
    _influence(problem, workdir=tmp_path).score_shards(problem["test"], (0, 2))  # shards 0, 2, 4
    seen.clear()
    _influence(problem, workdir=tmp_path).scores(problem["test"])
    ((desc, total, counts),) = seen
    # 13 batches: shards of 3, 3, 3, 3 and 1 batches; shards 0, 2 and 4 reused (one step each)
    assert (desc, total) == ("scores", 13)
    assert counts == [3, 4, 5, 6, 9, 10, 11, 12, 13]


def test_a_save_keeps_its_workdir_unless_told_not_to(problem: dict, tmp_path: Path) -> None:
    """``save`` records the workdir a load commits into next; ``keep_workdir=False`` records none
    (``infkit run``'s, whose scratch place is removed at the end), and ``load(workdir=)`` still
    names one."""
    inf = _influence(problem, workdir=tmp_path / "run")
    inf.save(tmp_path / "kept")
    inf.save(tmp_path / "bare", keep_workdir=False)
    assert inf.workdir == tmp_path / "run"  # the Influence itself keeps it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = infkit.Influence.load(tmp_path / "kept", problem["task"])
        bare = infkit.Influence.load(tmp_path / "bare", problem["task"])
        placed = infkit.Influence.load(tmp_path / "bare", problem["task"], workdir=tmp_path / "b")
    assert kept.workdir == tmp_path / "run"
    assert placed.workdir == tmp_path / "b"
    expected = inf.scores(problem["test"])
    assert relative_error(bare.scores(problem["test"]), expected) < 1e-12
    assert bare.workdir is None and "score_shards" not in bare.describe()  # nothing committed
    placed.scores(problem["test"])
    assert placed.describe()["score_shards"] == {"computed": 5, "reused": 0}


def test_data_changed_after_fit_is_refused_and_never_committed(
    problem: dict, tmp_path: Path
) -> None:
    """A tester's training rows reordered after fit: the scores, read in a pass over the data,
    were 87% off with no word, and committed to the workdir under the fit's data key, so a
    later run on the restored data got the same wrong scores. Every read of an example is now
    checked against what its first read noted: the changed data is refused, nothing is
    committed, and the restored data's run equals a fresh one. A save after such an edit is
    refused the same way (it kept no data and gave another reason)."""
    inputs, labels = problem["train"]
    ids = inputs["input_ids"].clone()
    train = ({**inputs, "input_ids": ids}, labels.clone())
    expected = _influence(problem, memory_limit=60_000).scores(problem["test"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(problem["task"], "ekfac", **OPTIONS, workdir=tmp_path).fit(train)
    ids[[3, 4]] = ids[[4, 3]].clone()  # two sequences swapped, in place
    with pytest.raises(InvalidInputError, match=r"training set example 3 reads otherwise than"):
        inf.scores(problem["test"])
    with pytest.raises(InvalidInputError, match="changed in place since"):
        inf.save(tmp_path / "saved")
    ids[[3, 4]] = ids[[4, 3]].clone()  # restored
    again = _influence(problem, workdir=tmp_path)
    assert relative_error(again.scores(problem["test"]), expected) < 1e-12


def test_sign_flips_and_small_target_changes_are_refused() -> None:
    """A reviewer's: two sign bits flipped in one example cancelled in the notes' weighted sum
    (each added 2^63: scores 18% off, no word); a dataset's float targets changed by 0.01 hid in
    its large features' tolerance (8.7% off). Both refused."""
    gen = torch.Generator().manual_seed(7)
    X = torch.randn(40, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=gen)
    task = infkit.Task.classification(torch.nn.Linear(8, 3).double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "cg", l2=1e-2, memory_limit=10_000).fit((X, y))
    X[7, :2] = -X[7, :2]
    with pytest.raises(InvalidInputError, match="example 7 reads otherwise"):
        inf.scores((X[:2], y[:2]))

    class Targets(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.X = 255 * torch.rand(40, 64, generator=gen, dtype=torch.float64)
            self.t = torch.randn(40, 1, generator=gen, dtype=torch.float64)

        def __len__(self) -> int:
            return 40

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.X[i].clone(), self.t[i].clone()

    data = Targets()
    squared = infkit.Task.regression(torch.nn.Linear(64, 1).double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(squared, "cg", l2=1e-2, memory_limit=10_000).fit(data)
    data.t[10:] += 0.01
    with pytest.raises(InvalidInputError, match="example 10 reads otherwise"):
        inf.scores((data.X[:2], data.t[:2]))


def test_a_dataset_whose_file_is_replaced_is_refused() -> None:
    """The same for a Dataset reading a file replaced between fit and a later pass."""

    class FromArray(torch.utils.data.Dataset):
        def __init__(self, store: dict) -> None:
            self.store = store

        def __len__(self) -> int:
            return len(self.store["y"])

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            return self.store["X"][i].clone(), self.store["y"][i].clone()

    gen = torch.Generator().manual_seed(0)
    store = {"X": torch.randn(30, 4, generator=gen, dtype=torch.float64)}
    store["y"] = torch.randint(0, 3, (30,), generator=gen)
    task = infkit.Task.classification(torch.nn.Linear(4, 3).double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "cg", l2=1e-2, memory_limit=10_000).fit(FromArray(store))
        assert inf.fitted.train_gradients is None  # the data is read again to score
        store["X"] = torch.randn(30, 4, generator=gen, dtype=torch.float64)  # "replaced"
        with pytest.raises(InvalidInputError, match=r"the data the dataset reads changed since"):
            inf.scores((store["X"][:2], store["y"][:2]))


def test_unwritable_folders_and_a_moved_workdir_are_told(problem: dict, tmp_path: Path) -> None:
    """A workdir or save path under a file met raw OSErrors (an unwritable one a
    PermissionError after the whole factor pass); a load of a save whose recorded workdir moved
    made that folder again, without a word, and committed there: said now, and a workdir given
    to the load is taken."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(infkit.ArtifactError, match=r"cannot write in .*file/sub .*Give a dir"):
        _influence(problem, workdir=tmp_path / "file" / "sub")  # (before any pass)
    inf = _influence(problem, workdir=tmp_path / "run")
    with pytest.raises(infkit.ArtifactError, match=r"cannot write in .*file/sub"):
        inf.save(tmp_path / "file" / "sub")
    inf.save(tmp_path / "run" / "saved")
    shutil.move(tmp_path / "run", tmp_path / "moved")
    with pytest.warns(Notice, match=r"saved with the workdir .*run, which is not there"):
        infkit.Influence.load(tmp_path / "moved" / "saved", problem["task"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", Notice)  # the folder it moved to, named: no word
        moved = infkit.Influence.load(
            tmp_path / "moved" / "saved", problem["task"], workdir=tmp_path / "moved"
        )
    moved.scores(problem["test"])
    assert not (tmp_path / "run").exists()


def test_a_dataset_rounding_its_features_otherwise_each_read_is_taken() -> None:
    """A dataset computing float features on the fly may round their last bits otherwise from
    read to read (the check that a dataset reads alike allows a relative 1e-5): its later reads
    are taken, where one moved beyond that is refused."""

    class Rounding(torch.utils.data.Dataset):
        def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
            self.X, self.y, self.reads, self.moved = X, y, 0, 0.0

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
            self.reads += 1
            noise = 1 + 1e-9 * (-1) ** self.reads  # the last bits, otherwise each read
            return self.X[i] * noise + self.moved, self.y[i]

    gen = torch.Generator().manual_seed(2)
    data = Rounding(
        torch.randn(30, 4, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (30,), generator=gen),
    )
    task = infkit.Task.classification(torch.nn.Linear(4, 3).double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inf = infkit.Influence(task, "cg", l2=1e-2, memory_limit=10_000).fit(data)
        inf.scores((data.X[:2], data.y[:2]))  # read again, rounded otherwise: taken
        data.moved = 1e-3
        with pytest.raises(InvalidInputError, match="reads otherwise than at its first read"):
            inf.scores((data.X[:2], data.y[:2]))


def test_a_datasets_examples_read_through_a_part_and_in_any_key_order_are_checked() -> None:
    """A reviewer's: a Newton removal in steps reads the kept examples through a part of the
    set, which kept no notes for a Dataset (labels changed after fit: 140x off, no word); and a
    Dataset of dict items in two key orders (records merged from two sources) was refused as
    read otherwise, default_collate ordering a batch by its first item's keys."""

    class Rows(torch.utils.data.Dataset):
        def __init__(self, X: torch.Tensor, y: torch.Tensor) -> None:
            self.X, self.y = X, y

        def __len__(self) -> int:
            return len(self.y)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            row = {"x": self.X[i].clone(), "labels": self.y[i].clone()}
            return row if i % 2 else dict(reversed(row.items()))  # two key orders

    gen = torch.Generator().manual_seed(5)
    data = Rows(
        torch.randn(40, 4, generator=gen, dtype=torch.float64),
        torch.randint(0, 3, (40,), generator=gen),
    )

    class Keyed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    task = infkit.Task.classification(Keyed().double())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infkit.train_to_optimum(task, data, 1e-2)
        inf = infkit.Influence(task, "exact", l2=1e-2).fit(data)  # both key orders: taken
        assert inf.remove([1, 2, 3], steps=3).params.isfinite().all()
        data.y[20:30] = (data.y[20:30] + 1) % 3  # labels changed after fit
        with pytest.raises(InvalidInputError, match=r"example 2\d reads otherwise than"):
            _ = inf.remove([1, 2, 3], steps=3).params
