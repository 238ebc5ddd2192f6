"""Reading an artifact's tensors costs their bytes, not twice them (``infkit.store.load_tensors``):
the safetensors file is memory-mapped, and the pages a copy reads stay resident until the file
is closed, so it is opened for one tensor at a time. Measured in a fresh process: its peak
resident memory while loading 64 MiB of tensors. A file replaced between those opens is
refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from resident_memory import READS_PROC, run_child

from infkit import store
from infkit.errors import ArtifactError
from infkit.store import load_tensors, save_tensors

pytestmark = pytest.mark.skipif(not READS_PROC, reason="reads resident memory from /proc")

#: the child: loads the file and prints how far its peak resident memory rose above the resident
#: memory before the load, in MiB (:mod:`resident_memory`)
CHILD = """
import json, sys
from infkit.store import load_tensors
from resident_memory import high_water, resident
before = resident()
tensors = load_tensors(sys.argv[1])
peak = high_water()
loaded = sum(t.numel() * t.element_size() for t in tensors.values())
print(json.dumps({"rise_mib": (peak - before) / (1 << 20), "loaded_mib": loaded / (1 << 20)}))
"""


def test_loading_tensors_takes_their_bytes_once(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(1 << 21, generator=gen) for i in range(8)}  # 8 x 8 MiB
    path = save_tensors(tmp_path / "tensors.safetensors", tensors)
    measured = run_child(CHILD, str(path), timeout=120)
    assert measured["loaded_mib"] == 64.0
    # the tensors' 64 MiB and a tensor's mapped pages (8 MiB), with room for the allocator; a
    # load that kept every mapped page until the end rose by 128 MiB
    assert measured["rise_mib"] < 96.0
    # and the values are the saved ones
    for name, value in load_tensors(path).items():
        torch.testing.assert_close(value, tensors[name], rtol=0, atol=0)


def test_a_file_replaced_while_read_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened once per tensor, a load could take tensors from two files if another run replaced
    the file meanwhile: that is refused, naming the file, rather than mixed."""
    path = save_tensors(tmp_path / "tensors.safetensors", {"a": torch.zeros(4), "b": torch.ones(4)})
    other = save_tensors(tmp_path / "other.safetensors", {"a": torch.ones(4), "b": torch.zeros(4)})
    opened = []
    real = store.safe_open

    def replaced_after_the_first_tensor(file: str, framework: str) -> object:
        opened.append(file)
        if len(opened) == 3:  # the names, the first tensor, then another run replaces the file
            os.replace(other, path)
        return real(file, framework=framework)

    monkeypatch.setattr(store, "safe_open", replaced_after_the_first_tensor)
    with pytest.raises(ArtifactError, match="replaced while its tensors were read"):
        load_tensors(path)
    monkeypatch.setattr(store, "safe_open", real)
    assert load_tensors(path)["a"].sum() == 4  # the new file, read whole


def test_a_table_without_rows_still_replaces_an_earlier_one(tmp_path: Path) -> None:
    """save_csv with no rows writes the header of its columns (a report whose lists are all
    empty left an earlier run's top_k.csv beside its page), and without columns nothing."""
    from infkit.store import save_csv

    path = tmp_path / "t.csv"
    save_csv(path, [{"a": 1, "b": 0.5}])
    save_csv(path, [], ("a", "b"))
    assert path.read_text().splitlines() == ["a,b"]
    save_csv(tmp_path / "none.csv", [])
    assert not (tmp_path / "none.csv").exists()


def test_a_problem_of_a_whole_batch_names_its_examples() -> None:
    """A check's position WHOLE_BATCH names the batch's examples: as a range where they are
    consecutive, else by count, first and last (a subset [30, 2] read 'examples 30-2')."""
    from infkit.data import WHOLE_BATCH, ExampleSet

    data = ExampleSet((torch.randn(40, 3), torch.zeros(40)), name="test set")
    (whole,) = data.batches(64)
    assert whole.example(WHOLE_BATCH) == "examples 0-39"
    (picked,) = data.part([30, 2]).batches(64)
    assert picked.example(WHOLE_BATCH) == "its 2 examples (30, ..., 2)"
    assert picked.example(0) != picked.example(WHOLE_BATCH)
