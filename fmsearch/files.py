"""Writing a file so that a reader, a crash or a second writer never sees half of it.

Every file fmsearch writes goes through `write_atomic`: the weights, the teacher cache, the study
records, the figures, the speed choice, the bench JSON and the decompressed data.
"""

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomic(path: Path, write: Callable[[Path], Any]) -> Path:
    """Have `write` fill a new temporary file beside `path`, flush it to disk, and rename it into place.

    A reader sees the old file or the new one, never half of one. Each call gets its own temporary
    name (two writers of one path never share one, and nothing planted at a fixed name is followed),
    and a failed write leaves no debris.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(handle)
    partial = Path(name)
    try:
        write(partial)
        with open(partial, "rb") as written:
            os.fsync(written.fileno())  # on disk before the rename makes it the real file
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    _sync_folder(path.parent)
    return path


def write_bytes(path: Path, body: bytes) -> Path:
    return write_atomic(path, lambda partial: partial.write_bytes(body))


def write_json(path: Path, record: Any) -> Path:
    return write_bytes(path, json.dumps(record, indent=1).encode())


def _sync_folder(folder: Path) -> None:
    """Make the rename itself survive a power cut, where the system lets a folder be opened."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
