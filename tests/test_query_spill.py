"""Preconditioned query blocks kept on disk (infkit.kfac.spill): what is written comes back, by
chunks that fit the buffer, in any dtype; damaged scratch files are an error, not a wrong score;
the scratch directory is the store's and goes with its writer."""

from __future__ import annotations

import os

import pytest
import torch

from infkit.errors import InfkitError
from infkit.kfac.spill import DiskBlocks
from infkit.store import ArtifactStore


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_blocks_written_in_any_order_come_back_by_chunks(tmp_path, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    shapes = {"a": (3, 5), "b": (4, 2)}
    count = 7
    U = {name: torch.randn(count, *shape).to(dtype) for name, shape in shapes.items()}
    item = torch.empty(0, dtype=dtype).element_size()
    # the buffer holds two queries of "a" (15 numbers) and three of "b" (8)
    (tmp_path / "s").mkdir()
    budget = 2 * 15 * item + item
    blocks = DiskBlocks(tmp_path / "s", shapes, count, dtype, budget, torch.device("cpu"))
    assert blocks.rows == {"a": 2, "b": 3}
    assert blocks.buffer_bytes == 30 * item  # the larger chunk: two queries of "a"
    order = torch.tensor([5, 0, 3, 6, 1, 4, 2])
    for rows in order.split(3):  # batches of queries in a shuffled order
        for name in shapes:
            blocks.write(name, rows, U[name][rows])
    for name in shapes:
        got = [(start, stop, chunk.clone()) for start, stop, chunk in blocks.chunks(name)]
        step = blocks.rows[name]
        assert [(a, b) for a, b, _ in got] == [
            (s, min(s + step, count)) for s in range(0, count, step)
        ]
        assert torch.equal(torch.cat([c for _, _, c in got]), U[name])
    assert blocks.nbytes == count * (15 + 8) * item
    blocks.close()
    assert not (tmp_path / "s").exists()
    blocks.close()  # twice is harmless


def test_a_truncated_scratch_file_is_an_error(tmp_path) -> None:
    (tmp_path / "s").mkdir()
    blocks = DiskBlocks(tmp_path / "s", {"a": (2, 2)}, 4, torch.float32, 64, torch.device("cpu"))
    blocks.write("a", torch.arange(4), torch.ones(4, 2, 2))
    os.truncate(tmp_path / "s" / "layer-0.bin", 40)  # 2.5 of 4 queries' 16 bytes
    with pytest.raises(InfkitError, match=r"layer 'a' .* ended after 40 of 64 bytes"):
        list(blocks.chunks("a"))
    blocks.close()


def test_a_buffer_below_one_query_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="below one query"):
        DiskBlocks(tmp_path, {"a": (2, 2)}, 4, torch.float32, 15, torch.device("cpu"))


def test_scratch_directories_of_a_writer_that_is_gone_are_removed(tmp_path) -> None:
    store = ArtifactStore(tmp_path)
    mine = store.scratch("queries")
    assert mine.is_dir() and mine.name.startswith(".tmp-queries-")
    assert list(store) == []  # not an artifact
    ArtifactStore(tmp_path)  # this writer is alive: kept
    assert mine.is_dir()
    gone = tmp_path / mine.name.replace(f"-{os.getpid()}-", "-999999999-")
    os.rename(mine, gone)  # as a crashed process would leave it
    ArtifactStore(tmp_path)
    assert not gone.exists()
