"""<workdir>/run.lock holding the pid and host of the run writing there; stale locks are replaced."""

import contextlib
import json
import os
import socket
import time
from typing import Any, Iterator, Optional

from absl import logging

from detcon import errors

LOCK_FILE = "run.lock"


def _holder(path: str) -> Optional[dict[str, Any]]:
    """The lock's {pid, host, started}, or None when it vanished or is unreadable."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def is_stale(holder: Optional[dict[str, Any]], host: str) -> bool:
    """A lock is stale when unreadable or held by a dead process on this host.

    A holder on another host cannot be checked from here, so it is never called stale.
    """
    if holder is None:
        return True
    return holder.get("host") == host and not _alive(int(holder.get("pid", -1)))


def acquire(workdir: str) -> str:
    """Creates the lock atomically; raises WorkdirLockedError if a live run holds it."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(workdir), LOCK_FILE)
    host = socket.gethostname()
    staging = f"{path}.{os.getpid()}.tmp"
    with open(staging, "w") as f:
        json.dump({"pid": os.getpid(), "host": host, "started": time.time()}, f)
    try:
        for _ in range(3):
            try:
                os.link(staging, path)  # atomic create-if-absent, with the content already there
                return path
            except FileExistsError:
                holder = _holder(path)
                if not is_stale(holder, host):
                    since = time.strftime("%Y-%m-%d %H:%M", time.localtime(holder["started"]))
                    raise errors.WorkdirLockedError(
                        f"{workdir} is in use by pid {holder['pid']} on {holder['host']} (since "
                        f"{since}); use another --workdir, or if that run is gone delete {path}."
                    ) from None
                logging.warning("Removing a stale lock %s (%s).", path, holder)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
        raise errors.WorkdirLockedError(
            f"Could not take the lock {path}; another run keeps taking it. Use another --workdir."
        )
    finally:
        os.remove(staging)


def release(path: str) -> None:
    """Removes the lock if this process still holds it."""
    holder = _holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        os.remove(path)


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[None]:
    """Holds the workdir lock for the block (only process 0 of a multi-host run takes it)."""
    if not enabled:
        yield
        return
    path = acquire(workdir)
    try:
        yield
    finally:
        release(path)
