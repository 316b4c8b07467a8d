from __future__ import annotations

import os

import pytest

from densekit.serve.atomic import atomic_path, write_text_atomic
from densekit.serve.contract import ModelMeta
from densekit.serve.errors import DensekitError


def test_meta_round_trips_through_json() -> None:
    meta = ModelMeta(name="resnet18", stride=8, dim=256, arch={"decoder": True}, objective="poodle")
    back = ModelMeta.from_json(meta.to_json())
    assert back == meta
    assert isinstance(back.mean, tuple) and back.arch == {"decoder": True}


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"name": "x", "dim": 3}'])
def test_bad_meta_is_a_clear_error(text: str) -> None:
    with pytest.raises(DensekitError):
        ModelMeta.from_json(text)


def test_atomic_write_keeps_old_file_on_failure(tmp_path) -> None:
    dest = tmp_path / "out.txt"
    write_text_atomic(dest, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(dest) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_atomic_write_gives_normal_permissions(tmp_path) -> None:
    # mkstemp makes 0600 files; a written report or model must be readable as a plain open() makes it.
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "new.txt", "x")
        assert (tmp_path / "new.txt").stat().st_mode & 0o777 == 0o640
        existing = tmp_path / "kept.txt"
        existing.write_text("old")
        existing.chmod(0o604)
        write_text_atomic(existing, "new")  # a replaced file keeps its own permissions
        assert existing.stat().st_mode & 0o777 == 0o604 and existing.read_text() == "new"
    finally:
        os.umask(old)
