"""Builds a dataset directory in a private staging directory and renames it into place.

Readers never see a half-written dataset, and a crash leaves only a hidden staging directory
(removed on the way out) instead of a directory that looks complete.
"""

import os
import shutil
import tempfile
from collections.abc import Callable


def publish_directory(directory: str, build: Callable[[str], None]) -> bool:
    """Runs build(staging) and renames staging to `directory`; False if another process won.

    `directory` must not exist yet. When another process publishes it first, this one's copy is
    discarded and the caller checks the winner's (same settings built the same bytes).
    """
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.", dir=parent)
    try:
        build(staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; the dataset is not
        try:
            os.rename(staging, directory)
        except OSError:
            if not os.path.isdir(directory):
                raise
            return False
        return True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
