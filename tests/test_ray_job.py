"""A local Ray head on 127.0.0.1, and a shard build submitted to it with `ray job submit`.

This is the cluster path users take (`ray job submit --working-dir . -- python -m
shards.build ...`), run for real on one machine. The head is started with `--block` in its
own process group and stopped by that group's id, so nothing is left running.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from shards.build import BuildConfig, build
from shards.config import load_config
from shards.manifest import load_manifest, verify
from tests.conftest import REPO
from tests.servers import BIN, ray_cluster
from tests.test_build import digests

SPEC = "synthetic?subjects=2&runs=1&duration_s=40"


@pytest.fixture
def ray_head():
    with ray_cluster(nodes=1) as head:  # (dashboard address, env with Ray's token auth)
        yield head


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
