"""Preconditioned query blocks kept on disk and read back a chunk of queries at a time.

When the preconditioned queries ``U_t`` [T, d_out, cols] per tracked layer do not fit the
query budget (:func:`~infkit.kfac.streaming.query_budget`), a scoring pass over the training
data per group of queries multiplies the forward and backward passes. On a CPU that pass costs
far more than reading the queries back: a small language model's batch of 8 sequences takes
seconds to run and its 16 queries (0.7 GB) a tenth of a second to read from the page cache. So
the blocks can instead be written once to raw files in a scratch directory of the run's store
(:meth:`~infkit.store.ArtifactStore.scratch`) and read back layer by layer, a chunk of queries
at a time into one reused buffer, for every training batch of one scoring pass.

The files are working files of one call, never artifacts: written and read by this process,
removed when the scores are done (:meth:`DiskBlocks.close`), and removed by the next store
opened on that directory after a crash. Reads go through ``os.preadv`` into the buffer (no
memory map, whose pages would count in the process's resident memory while mapped).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from infkit.errors import InfkitError


class DiskBlocks:
    """Blocks ``[T, *shape]`` per layer name in raw files under ``directory``.

    Args:
        directory: a scratch directory this object owns (removed by :meth:`close`).
        shapes: layer name -> the shape of one query's block.
        count: T, the queries.
        dtype: the blocks' dtype.
        buffer_bytes: the most bytes one chunk may take (at least one query's largest block).
        device: where the chunks are handed out.
    """

    def __init__(
        self,
        directory: Path,
        shapes: dict[str, tuple[int, ...]],
        count: int,
        dtype: torch.dtype,
        buffer_bytes: int,
        device: torch.device,
    ) -> None:
        self.directory = directory
        self.shapes = shapes
        self.count = count
        self.dtype = dtype
        self.device = device
        item = torch.empty(0, dtype=dtype).element_size()
        self.row_bytes = {name: item * math.prod(shape) for name, shape in shapes.items()}
        largest = max(self.row_bytes.values())
        if buffer_bytes < largest:
            raise ValueError(f"buffer of {buffer_bytes} bytes below one query's {largest}")
        #: queries per chunk of each layer, as many as the buffer holds
        self.rows = {name: min(count, buffer_bytes // b) for name, b in self.row_bytes.items()}
        # made at the first read: the blocks are written while the factors are in memory, and
        # read while they are set aside, whose room the buffer may take
        self._buffer: Tensor | None = None
        self._files: dict[str, int] = {}
        for index, name in enumerate(shapes):
            path = directory / f"layer-{index}.bin"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            self._files[name] = fd
            os.ftruncate(fd, count * self.row_bytes[name])

    @property
    def nbytes(self) -> int:
        """Bytes on disk: every query's block of every layer."""
        return self.count * sum(self.row_bytes.values())

    @property
    def buffer_bytes(self) -> int:
        """Bytes of the one reused read buffer (the memory these blocks take while read)."""
        return max(self.rows[name] * size for name, size in self.row_bytes.items())

    def write(self, name: str, rows: Tensor, blocks: Tensor) -> None:
        """Store ``blocks`` [len(rows), *shape] as the queries ``rows`` of layer ``name``."""
        data = blocks.detach().to("cpu", self.dtype).contiguous().reshape(len(rows), -1)
        raw = data.view(torch.uint8).numpy()
        size = self.row_bytes[name]
        for i, row in enumerate(rows.tolist()):
            written = os.pwrite(self._files[name], raw[i], row * size)
            if written != size:
                raise InfkitError(
                    f"could not write the preconditioned queries to {self.directory} "
                    f"({written} of {size} bytes of query {row}, layer {name!r}): free disk "
                    "space there, or set queries_on_disk=False"
                )

    def chunks(self, name: str) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, U)`` over layer ``name``'s queries, ``U`` [stop - start, *shape] a
        view of the reused buffer (valid until the next chunk is read)."""
        size, step, fd = self.row_bytes[name], self.rows[name], self._files[name]
        if self._buffer is None:
            self._buffer = torch.empty(self.buffer_bytes, dtype=torch.uint8)
        for start in range(0, self.count, step):
            stop = min(start + step, self.count)
            want = (stop - start) * size
            view = self._buffer[:want]
            _read_exactly(fd, view, start * size, self.directory, name)
            block = view.view(self.dtype).view(stop - start, *self.shapes[name])
            yield start, stop, block.to(self.device)

    def close(self) -> None:
        """Close the files and remove the scratch directory (idempotent)."""
        for fd in self._files.values():
            os.close(fd)
        self._files = {}
        self._buffer = None
        shutil.rmtree(self.directory, ignore_errors=True)


def _read_exactly(fd: int, out: Tensor, offset: int, directory: Path, name: str) -> None:
    """Fill the uint8 tensor ``out`` from ``fd`` at ``offset`` (reads may return short)."""
    view = out.numpy().data
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise InfkitError(
                f"the preconditioned queries of layer {name!r} in {directory} ended after "
                f"{done} of {len(view)} bytes: the scratch files were changed or removed "
                "during the scoring pass; run the scores again (or set queries_on_disk=False)"
            )
        done += got
