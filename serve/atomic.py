"""Atomic file writes: a reader (or a crash) never sees a half-written file.

Everything densekit writes for a user goes through :func:`atomic_path`: the data is written to a
temporary file in the destination folder and renamed over the destination only when complete.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` if the block succeeds.

    The temporary name keeps ``dest``'s suffix (or ``suffix``) because some writers (OpenCV, PIL)
    choose the format from it. On error the temporary file is removed and ``dest`` is untouched.
    The result gets the permissions of the file it replaces, or those a plain ``open()`` would give a
    new file (0666 minus the umask) - not ``mkstemp``'s private 0600.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or dest.suffix, dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, dest.stat().st_mode & 0o7777 if dest.exists() else _new_file_mode())
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _new_file_mode() -> int:
    try:  # Linux reports the umask without changing it
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        umask = os.umask(0o022)  # the only portable way to read it is to set it
        os.umask(umask)
    return 0o666 & ~umask


def write_bytes_atomic(dest: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(dest: str | os.PathLike[str], text: str) -> None:
    write_bytes_atomic(dest, text.encode("utf-8"))
