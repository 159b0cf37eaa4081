"""Atomic file writes: render to a temp file beside the target, fsync, then rename onto it, so an
interrupted write never leaves a truncated file under the final name."""

import io
import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Calls write(file) on a temp file in path's directory, then renames it onto path."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp"
    )
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the result the permissions an ordinary open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text(path: str, text: str) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda f: f.write(text.encode()))
