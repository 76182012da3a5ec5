"""One build per output folder at a time: an exclusive lock on DIR/.lock/build.lock.

Two builds into one `--out` delete each other's `.partial` files and overwrite each
other's reports, and neither notices. So a build takes `fcntl.flock` on a lock file in the
folder first, and a second build is refused at once, told who holds it (host, pid).

The kernel drops a flock when its holder dies, however it dies (SIGKILL, OOM, power), so a
lock left by a killed build is simply free: the next build takes it and says whose it was.
The lock file also records the holder, for that message; it is never deleted (that would
let two builds lock two different files), and it sits in a folder of its own so that the
folder's files proper stay untouched by a build that has nothing to do. Where the filesystem has no
flock (some network mounts), the record is the lock: a holder on this host whose pid is
gone is stale and taken over, one on another host is respected.

An object store (s3://...) has no flock either, so there the record object alone is the
lock, with the same rule, and it is deleted on release. Checking and writing it are two
requests, so two builds started within the same instant could both get it: the lock
catches the common mistake (a second build into a running one), not a deliberate race.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from shards import storage

LOCK_PATH = Path(".lock") / "build.lock"
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class BuildLocked(ValueError):
    """Another build holds the folder (a user error: exit 2, no traceback)."""


def _parse_holder(blob: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(blob) if blob.strip() else None
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _read_holder(fd: int) -> dict[str, Any] | None:
    return _parse_holder(os.pread(fd, 4096, 0))


def _describe(holder: dict[str, Any] | None) -> str:
    if not holder:
        return "holder unknown"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("since", 0)))
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {since}"


def _alive_here(holder: dict[str, Any]) -> bool:
    """Whether the recorded holder may still run (one on another host: assume it does)."""
    if holder.get("host") != socket.gethostname():
        return True
    import psutil

    try:
        return psutil.pid_exists(int(holder["pid"]))  # another user's process counts as alive
    except (KeyError, TypeError, ValueError):  # a record without a readable pid: be careful
        return True


def _refuse(folder: Path, holder: dict[str, Any] | None) -> BuildLocked:
    return BuildLocked(
        f"{folder} is being built by another build ({_describe(holder)}); two builds into "
        "one folder delete each other's files. Wait for it, stop it, or use another --out"
    )


def _me() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}


@contextlib.contextmanager
def _remote_lock(folder: str) -> Iterator[None]:
    """The record-is-the-lock rule, on an object (see the module docstring)."""
    target = storage.join(folder, *LOCK_PATH.parts)
    previous = _parse_holder(storage.read_bytes(target)) if storage.exists(target) else None
    if previous and _alive_here(previous):
        raise _refuse(folder, previous)
    if previous:
        print(
            f"note: {target} was left by a build that is gone ({_describe(previous)}); "
            "taking it over",
            file=sys.stderr,
        )
    storage.write_text(target, json.dumps(_me()))
    try:
        yield
    finally:
        storage.remove(target)


@contextlib.contextmanager
def build_lock(folder: storage.Target) -> Iterator[None]:
    """Hold the folder's build lock for the body; raises BuildLocked if another build has it."""
    if storage.is_uri(folder):
        with _remote_lock(folder):
            yield
        return
    folder = Path(folder)
    path = folder / LOCK_PATH
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            previous = _read_holder(fd)
        except BlockingIOError:
            raise _refuse(folder, _read_holder(fd)) from None
        except OSError as err:
            if err.errno not in _NO_FLOCK:
                raise
            previous = _read_holder(fd)  # no flock here: the record is the lock
            if previous and _alive_here(previous):
                raise _refuse(folder, previous) from None
        if previous:  # a build that ended without releasing: killed, or its machine died
            print(
                f"note: {path} was left by a build that is gone ({_describe(previous)}); "
                "taking it over",
                file=sys.stderr,
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_me()).encode(), 0)
        os.fsync(fd)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # released cleanly: nothing stale left to report
    finally:
        os.close(fd)  # closing drops the flock
