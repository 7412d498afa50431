"""Write a file so that readers see either the old or the new content, never a torn one."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data``: a flushed temporary file beside it, then one rename.

    ``mode`` is set before any byte is written, so a private key is never readable by others
    even for an instant; without it the file keeps mkstemp's owner-only 0600. An OSError names
    ``path``, not the temporary file, so the one-line error points at what the user asked for.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as err:
        raise type(err)(err.errno, err.strerror, os.fspath(path)) from None
    try:
        if mode is not None:
            os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException as err:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise type(err)(err.errno, err.strerror, os.fspath(path)) from None
        raise


def atomic_write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))
