"""Real servers for the tests that need them: Ray nodes and an MLflow tracking server.

Each is started in a process group of its own, bound to 127.0.0.1, and stopped by that
group's id together with every process it started, so a test leaves nothing running.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil

from tests.conftest import free_port

BIN = Path(sys.executable).parent


def ray_env() -> dict[str, str]:
    """Token auth on (Ray's default), this venv first on PATH, no inherited RAY_ADDRESS."""
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RANK"):
        env.pop(key, None)
    subprocess.run(
        [BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True
    )
    return env


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever of it (and its children) is left."""
    try:
        started = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _, alive = psutil.wait_procs(started, timeout=20)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, f"{what} exited early (status {proc.returncode})"
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except urllib.error.HTTPError:  # it answers (e.g. 401 without Ray's token): it is up
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} did not come up in {timeout:.0f} s"
            time.sleep(1)


@contextlib.contextmanager
def ray_cluster(nodes: int = 1, cpus_per_node: int = 2) -> Iterator[tuple[str, dict[str, str]]]:
    """A Ray cluster of `nodes` raylets on 127.0.0.1 (`ray start` processes, head first); node
    i also has the custom resource ``node<i>`` = 1. Yields (dashboard address, env)."""
    env = ray_env()
    # Ray's unix sockets live under its temp dir: keep the path short (108-byte limit)
    temp_dir = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    log = open(temp_dir / "ray-start.log", "ab")  # noqa: SIM115 (closed in finally)
    ray = BIN / "ray"
    port, dash = free_port(), free_port()
    common = ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}"]
    procs: list[subprocess.Popen] = []

    def start(args: list[str], node: int) -> subprocess.Popen:
        resources = json.dumps({f"node{node}": 1})
        proc = subprocess.Popen(
            [
                *(ray, "start", *args, *common, f"--resources={resources}"),
                # one port per node: two raylets on one machine must not share the default
                f"--dashboard-agent-listen-port={free_port()}",
                "--disable-usage-stats",
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        procs.append(proc)
        return proc

    try:
        head = start(
            [
                "--head",
                f"--port={port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dash}",
                "--include-dashboard=true",
                f"--temp-dir={temp_dir}",
            ],
            0,
        )
        address = f"http://127.0.0.1:{dash}"
        _wait_http(f"{address}/api/version", head, "the Ray head")
        for node in range(1, nodes):
            start([f"--address=127.0.0.1:{port}"], node)
        _wait_for_nodes(env, f"127.0.0.1:{port}", nodes, procs)
        yield address, env
    except AssertionError as err:
        log.flush()
        tail = (temp_dir / "ray-start.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{err}\n`ray start` said:\n{tail}") from None
    finally:
        for proc in reversed(procs):  # workers first, the head last
            stop(proc)
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _wait_for_nodes(env: dict[str, str], gcs: str, nodes: int, procs, timeout: float = 120):
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    deadline = time.monotonic() + timeout
    while True:
        for proc in procs:
            assert proc.poll() is None, f"a `ray start` exited early (status {proc.returncode})"
        out = subprocess.run(
            [sys.executable, "-c", probe, gcs], env=env, capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(nodes)]:
            return
        assert time.monotonic() < deadline, f"{nodes} Ray nodes not alive in {timeout:.0f} s"
        time.sleep(2)


@contextlib.contextmanager
def mlflow_server(folder: Path) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 (sqlite backend, artifacts served by the server, one
    worker). Yields its http URI."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", str(folder / "artifacts")]
    server = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{uri}/health", server, "mlflow server")
        yield uri
    finally:
        stop(server)
