"""Atomic writes: the old file or the new one, never half, and no temporary left behind."""

import numpy as np
import pytest

from mpq.files import atomic_path, write_atomic


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "sub" / "state.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]


def test_a_write_that_ends_replaces_the_file_even_for_writers_that_add_a_suffix(tmp_path):
    path = tmp_path / "cache.npz"
    write_atomic(path, b"old")
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez(tmp, x=np.arange(3))
    assert np.load(path)["x"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["cache.npz"]
