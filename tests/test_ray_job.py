"""A local Ray head on 127.0.0.1, and a shard build submitted to it with `ray job submit`.

This is the cluster path users take (`ray job submit --working-dir . -- python -m
shards.build ...`), run for real on one machine. The head is started with `--block` in its
own process group and stopped by that group's id, so nothing is left running.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from shards.build import BuildConfig, build
from shards.config import load_config
from shards.manifest import load_manifest, verify
from tests.conftest import REPO, free_port
from tests.test_build import digests

BIN = Path(sys.executable).parent
SPEC = "synthetic?subjects=2&runs=1&duration_s=40"


@pytest.fixture
def ray_head(tmp_path_factory):
    ray = BIN / "ray"
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "token",
        "RAY_USAGE_STATS_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    env.pop("RAY_ADDRESS", None)
    subprocess.run([ray, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    temp_dir = tmp_path_factory.mktemp("ray", numbered=True)
    port, dash = free_port(), free_port()
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            "--include-dashboard=true",
            "--num-cpus=2",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, "ray start exited early"
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 without the token): it is up
                break
            except OSError:
                assert time.monotonic() < deadline, "Ray dashboard did not come up in 120 s"
                time.sleep(1)
        yield address, env
    finally:
        # Every process the head started (workers run in process groups of their own).
        started = psutil.Process(head.pid).children(recursive=True)
        os.killpg(head.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            head.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        _, alive = psutil.wait_procs(started, timeout=20)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()


@pytest.mark.slow
def test_build_through_ray_job_submit(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "corpus"
    cmd = [
        BIN / "ray",
        "job",
        "submit",
        f"--address={address}",
        f"--working-dir={REPO}",
        "--",
        sys.executable,
        "-m",
        "shards.build",
        "--source",
        SPEC,
        "--out",
        str(out),
    ]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "succeeded" in (result.stdout + result.stderr)
    manifest = load_manifest(out)
    assert manifest["totals"]["samples"] == 20 and manifest["totals"]["units_failed"] == 0
    assert verify(out) == []
    # the cluster build wrote exactly the bytes a local in-process build writes
    local = tmp_path / "local"
    build(load_config(BuildConfig, sources=[SPEC], out=str(local), workers=0))
    assert digests(out) == digests(local)
