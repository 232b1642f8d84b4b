"""Atomic writes: all or nothing, with the modes a plain write would give."""

from __future__ import annotations

import os
import stat

import pytest

from fedrec.atomic import atomic_dir, atomic_path, current_umask, write_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the umask for one test and restore it after."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_and_folders_get_the_umasks_modes_not_mkstemps(tmp_path, umask, mask):
    """mkstemp makes 0600 and mkdtemp 0700: an export written that way could not be read by a
    serving process of another user (index.faiss and model_card.json were 0600, each version 0700)."""
    umask(mask)
    assert current_umask() == mask
    write_text(tmp_path / "card.json", "{}")
    assert mode(tmp_path / "card.json") == 0o666 & ~mask
    with atomic_dir(tmp_path / "v0001") as tmp:
        (tmp / "inside.txt").write_text("x")
    assert mode(tmp_path / "v0001") == 0o777 & ~mask


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("disk full")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "v0001") as tmp:
        (tmp / "a").write_text("x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
