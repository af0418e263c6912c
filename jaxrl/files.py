"""Files written whole or not at all."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w"):
    """Opens a temporary file beside `path` and renames it into place when the block succeeds, so a crash
    or an error leaves the old file (or none), never half a new one. Creates the directory."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
