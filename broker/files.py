"""Writing files that must never be seen half-written or briefly readable by others."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


PRIVATE_DIR_MODE = 0o700


def make_private_dir(directory: Path) -> None:
    """Create ``directory`` and each missing parent 0700: they hold the audit log, state and
    credentials, and their names alone (families, profiles) are nobody else's business.
    Directories that exist already are left as their owner made them."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for new in reversed(missing):
        try:
            new.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # made by someone else in the meantime: theirs, not ours to chmod
        os.chmod(new, PRIVATE_DIR_MODE)  # mkdir's mode is filtered by the umask; make it exact


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Temp file in the same directory (created 0600, then ``mode``), fsync, rename, fsync the
    directory: readers and a crash see the old file or the new one, never part of one."""
    make_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
