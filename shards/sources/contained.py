"""Run a file reader in a child process, so a reader that crashes costs one file, not the build.

Some readers are native code: MNE's ANT reader goes through libeep (C), which segfaults
or calls exit() on a file it does not expect. Whatever process called it dies with it --
a Ray worker (Ray re-runs the task three times, then the whole build fails) or, with
`--workers 0`, the build itself. Called through `call_contained`, a reader can only kill
a child process: the caller gets `ReaderCrashed` ("reader crashed: signal 11 (SIGSEGV)")
and rejects that one file.

Cost: one long-lived child per process, started on first use and replaced after a crash,
so one interpreter start per build process, then only moving each result back through a
socket. Measured with `--workers 0` on the 49 EEGMMIDB EDF runs: 31.0 s of CPU against
30.5 s reading in-process (one file: +0.8 s), byte-identical shards. Arrays travel as
out-of-band pickle buffers received straight into one writable bytearray each: the parent
holds one copy of the data, as it would reading in-process.

The child is a plain `python -c` subprocess rather than a multiprocessing "spawn" child:
spawn re-imports the parent's `__main__` (Ray's worker script, or a user's unguarded
script, which would then start building again), and daemonic processes may not use it.
"""

from __future__ import annotations

import atexit
import json
import pickle
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

_CHILD = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from shards.sources.contained import serve; serve(int(sys.argv[1]))"
)


class ReaderCrashed(RuntimeError):
    """The child died (signal or exit) or hung past its limit; str() is the whole reason."""


class ReaderFailed(RuntimeError):
    """The reader raised in the child; str() is 'ExceptionType: message'."""


class _Child:
    def __init__(self) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            self.process = subprocess.Popen(
                [sys.executable, "-c", _CHILD, str(theirs.fileno()), json.dumps(sys.path)],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
            )
        self.conn = Connection(ours.detach())

    def call(self, func: Callable, args: tuple, timeout_s: float | None) -> Any:
        try:
            self.conn.send((func, args))
        except OSError:
            raise self._died() from None
        kind, payload = self._recv()  # ("started", None) once func and args are unpickled
        if kind == "error":
            raise ReaderFailed(payload)
        if timeout_s and not self.conn.poll(timeout_s):
            self.stop(kill=True)
            raise ReaderCrashed(f"reader timed out: no result after {timeout_s:g} s (killed)")
        kind, payload = self._recv()
        if kind == "error":
            raise ReaderFailed(payload)
        main = self._recv_bytes()
        buffers = []
        for size in payload:
            buf = bytearray(size)
            if size:
                self._recv_bytes(buf)
            buffers.append(buf)
        return pickle.loads(main, buffers=buffers)

    def _recv(self) -> tuple[str, Any]:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise self._died() from None

    def _recv_bytes(self, into: bytearray | None = None) -> bytes:
        try:
            if into is None:
                return self.conn.recv_bytes()
            self.conn.recv_bytes_into(into)
            return b""
        except (EOFError, OSError):
            raise self._died() from None

    def _died(self) -> ReaderCrashed:
        self.conn.close()
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if code < 0:
            try:
                name = f" ({signal.Signals(-code).name})"
            except ValueError:
                name = ""
            return ReaderCrashed(f"reader crashed: signal {-code}{name}")
        return ReaderCrashed(f"reader crashed: exit code {code}")

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        self.conn.close()  # an idle child reads EOF and exits
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    @property
    def alive(self) -> bool:
        return not self.conn.closed and self.process.poll() is None


_child: _Child | None = None
_lock = threading.Lock()


def call_contained(func: Callable, *args: Any, timeout_s: float | None = None) -> Any:
    """`func(*args)` run in this process' reader child; returns its result.

    func and args are pickled, func by reference: a module-level function of an importable
    module (not of the script being run: the child does not import `__main__`). Raises
    ReaderFailed if func raised, ReaderCrashed if the child died or ran past timeout_s
    seconds (the time func itself runs; None or 0: no limit). The next call after a crash
    starts a new child.
    """
    global _child
    with _lock:
        if _child is None or not _child.alive:
            _child = _Child()
        try:
            return _child.call(func, args, timeout_s)
        except ReaderCrashed:
            _child = None
            raise


@atexit.register
def _stop_child() -> None:
    if _child is not None and _child.alive:
        _child.stop()


def serve(fd: int) -> None:
    """The child: run requests until the parent goes away (EOF on the socket)."""
    # Ctrl-C reaches the whole process group; the parent decides, the child just ends with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    while True:
        try:
            func, args = conn.recv()
        except EOFError:
            return
        except Exception as err:  # func's module failed to import, say
            conn.send(("error", f"{type(err).__name__}: {err}"))
            continue
        try:
            conn.send(("started", None))
            try:
                result = func(*args)
                buffers: list[pickle.PickleBuffer] = []
                main = pickle.dumps(result, protocol=5, buffer_callback=buffers.append)
            except Exception as err:
                conn.send(("error", f"{type(err).__name__}: {err}"))
                continue
            raws = [b.raw() for b in buffers]
            conn.send(("ok", [r.nbytes for r in raws]))
            conn.send_bytes(main)
            for raw in raws:
                if raw.nbytes:
                    conn.send_bytes(raw)
            del result, buffers, raws, main
        except OSError:  # the parent is gone
            return
