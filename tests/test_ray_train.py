"""Multi-node pretraining and finetuning under Ray Train, for real, on one machine.

A two-node Ray cluster (two `ray start` raylets on 127.0.0.1) and an `mlflow server` are
started here; `ray job submit` runs `brainmoe pretrain --launcher ray` with one worker per
node (STRICT_SPREAD), ZeRO-2 on CPU (gloo), checkpoints reported to Ray under
`ray.storage_path`, the model logged and registered over HTTP. A second job has a worker
killed with SIGKILL after its first checkpoint: Ray restarts the group, the run resumes from
the newest reported checkpoint and its losses retrace the uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from shards.build import BuildConfig, build
from shards.config import load_config
from tests.conftest import REPO
from tests.servers import BIN, mlflow_server, ray_cluster

pytestmark = pytest.mark.slow

CORPUS = "synthetic?subjects=4&runs=1&duration_s=120"
STEPS, CKPT = 40, 10
NAME, ALIAS = "brainmoe-ray-ci", "ci"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-train")
    corpus = root / "corpus"
    build(load_config(BuildConfig, sources=[CORPUS], out=str(corpus), workers=0))
    with mlflow_server(root / "mlflow") as uri, ray_cluster(nodes=2) as ray:
        address, env = ray
        yield {"root": root, "corpus": corpus, "address": address, "env": env, "mlflow": uri}


def pretrain_args(world: dict, name: str, *extra: str) -> list[str]:
    root = world["root"]
    return [
        *("pretrain", "--launcher", "ray", "--num-workers", "2"),
        *("--config", "configs/pretrain/tiny.yaml"),
        f"data.shards=[{world['corpus']}]",
        f"train.run_dir={root / name}",
        f"train.steps={STEPS}",
        "train.log_every=5",
        f"train.ckpt_every={CKPT}",
        "train.keep_checkpoints=10",
        "train.plots=false",
        f"ray.storage_path={root / 'store'}",
        "ray.placement_strategy=STRICT_SPREAD",
        "ray.resources_per_worker={CPU: 1}",
        f"tracking.tracking_uri={world['mlflow']}",
        *extra,
    ]


def submit(world: dict, args: list[str], *flags: str, timeout: int = 900):
    cmd = [BIN / "ray", "job", "submit", f"--address={world['address']}", *flags]
    cmd += [f"--working-dir={REPO}", "--", sys.executable, "-m", "cluster.cli", *args]
    return subprocess.run(
        cmd, env=world["env"], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(cluster) -> dict:
    args = pretrain_args(cluster, "full", f"register.name={NAME}", f"register.alias={ALIAS}")
    result = submit(cluster, args, "--submission-id=brainmoe-ci-full")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert f"registered {NAME} version 1 as @{ALIAS}" in log, log[-3000:]
    return {"run_dir": cluster["root"] / "full", "log": log, "job": "brainmoe-ci-full"}


def test_two_node_pretraining_learns_checkpoints_and_registers(cluster, uninterrupted):
    history = metrics(uninterrupted["run_dir"])
    assert [h["step"] for h in history] == list(range(5, STEPS + 1, 5))
    first, last = history[0]["loss"], float(np.mean([h["loss"] for h in history[-3:]]))
    assert last < 0.8 * first, f"loss {first:.4f} -> {last:.4f}: the model did not learn"

    store = cluster["root"] / "store" / "full"
    tags = sorted(p.name for p in store.glob("step*"))
    assert tags == [f"step{s:07d}" for s in range(CKPT, STEPS + 1, CKPT)], tags
    marker = json.loads((store / tags[-1] / "complete.json").read_text())
    ranks = {Path(n).name for n in marker["files"] if "rng" in n}
    assert len(ranks) == 2, f"the marker lists both ranks' files: {sorted(marker['files'])}"
    for name, meta in marker["files"].items():  # Ray merged every rank's files, intact
        assert (store / tags[-1] / name).stat().st_size == meta["size"], name

    workers = [json.loads((store / "workers" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert workers[0]["node_id"] != workers[1]["node_id"], "STRICT_SPREAD: one worker per node"

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cluster["mlflow"], registry_uri=cluster["mlflow"])
    version = client.get_model_version_by_alias(NAME, ALIAS)
    assert version.tags["launcher"] == "ray" and version.tags["world_size"] == "2"
    assert version.tags["ray_job_id"] == uninterrupted["job"]
    assert version.tags["step"] == str(STEPS)
    run = client.get_run(version.run_id)
    assert run.data.params["dist.zero_stage"] == "2" and run.data.tags["launcher"] == "ray"


def test_probe_reads_the_registered_version_through_the_server(cluster, uninterrupted, tmp_path):
    out = tmp_path / "probe.json"
    cmd = [sys.executable, "-m", "cluster.cli", "probe", "--model", f"models:/{NAME}@{ALIAS}"]
    cmd += ["--tracking-uri", cluster["mlflow"], "--source", "synthetic?subjects=4&runs=1"]
    cmd += ["--max-windows", "48", "--random-seeds", "1", "--json", str(out)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert 0.0 <= report["pretrained"] <= 1.0 and report["windows"] > 0, report


def test_a_killed_worker_is_restarted_and_the_run_retraces_its_losses(cluster, uninterrupted):
    args = pretrain_args(cluster, "killed", "ray.max_failures=1")
    kill_and_resume(cluster, "brainmoe-ci-killed", args, "killed", uninterrupted["run_dir"])


def kill_and_resume(world: dict, job: str, args: list[str], name: str, full_run: Path) -> None:
    """Submit `args`, SIGKILL rank 1 once Ray holds a checkpoint, and check the contract: Ray
    restarts the group, it resumes from the newest checkpoint, the job succeeds, and every loss
    logged after the resume equals the uninterrupted run's (`full_run`)."""
    started = submit(world, args, f"--submission-id={job}", "--no-wait", timeout=120)
    assert started.returncode == 0, started.stdout + started.stderr
    store = world["root"] / "store" / name
    rank1 = store / "workers" / "rank1.json"
    deadline = time.monotonic() + 600
    # kill once Ray has registered a checkpoint (its controller records it a moment after the
    # ranks report; a kill before that restarts from scratch, which is Ray's contract too)
    while not (rank1.exists() and registered(store)):
        assert time.monotonic() < deadline, "no checkpoint registered in 10 min"
        assert job_status(world, job) in ("PENDING", "RUNNING"), logs(world, job)
        time.sleep(0.2)
    os.kill(json.loads(rank1.read_text())["pid"], signal.SIGKILL)

    while (status := job_status(world, job)) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, "the restarted run did not finish in 10 min"
        time.sleep(2)
    log = logs(world, job)
    assert status == "SUCCEEDED", log[-6000:]

    attempts = [json.loads(line) for line in (store / "attempts.jsonl").read_text().splitlines()]
    assert len(attempts) == 2 and attempts[0]["resumed_from"] is None, attempts
    assert attempts[1]["resumed_from"], f"the restarted group did not resume: {attempts}"
    resumed_at = int(Path(attempts[1]["resumed_from"]).name.removeprefix("step"))
    assert f"resumed at step {resumed_at}" in log, log[-3000:]

    full, resumed = metrics(full_run), metrics(world["root"] / name)
    assert [h["step"] for h in resumed] == [h["step"] for h in full]
    assert resumed_at < full[-1]["step"], attempts
    keys = [k for k in full[-1] if k.endswith("loss") or k in ("grad_norm", "lr")]
    for before, after in zip(full, resumed, strict=True):
        if before["step"] <= resumed_at:
            continue
        for key in keys:
            assert after[key] == pytest.approx(before[key], rel=1e-5, abs=1e-7), (
                f"step {before['step']} {key}: after the restart {after[key]} vs {before[key]}"
            )


# ---- finetuning: the same launcher, the same contract ---------------------------------------
FT_STEPS = 30


@pytest.fixture(scope="module")
def finetune_world(cluster) -> list[str]:
    """Tiny bases, the pretrained encoder from the registry server, labelled shards."""
    from finetune.tiny.__main__ import build_all

    root = cluster["root"] / "finetune"
    shards = root / "shards"
    spec = "synthetic?subjects=4&runs=1&duration_s=120&classes=4&instances=2&effect=3"
    build(load_config(BuildConfig, sources=[spec], out=str(shards), workers=0))
    return [
        *("--config", "configs/finetune/tiny.yaml"),
        "tasks=[retrieval,text]",
        f"data.shards=[{shards}]",
        f"encoder.model=models:/{NAME}@{ALIAS}",
        f"tracking.tracking_uri={cluster['mlflow']}",
        *build_all(root / "bases"),
        f"train.steps={FT_STEPS}",
        "train.log_every=5",
        f"train.ckpt_every={CKPT}",
        "train.keep_checkpoints=10",
        f"ray.storage_path={cluster['root'] / 'store'}",
        "ray.placement_strategy=STRICT_SPREAD",
        "ray.resources_per_worker={CPU: 1}",
    ]


def finetune_args(world: dict, common: list[str], name: str, *extra: str) -> list[str]:
    run_dir = f"train.run_dir={world['root'] / name}"
    return ["finetune", "--launcher", "ray", "--num-workers", "2", *common, run_dir, *extra]


@pytest.fixture(scope="module")
def finetuned(cluster, uninterrupted, finetune_world) -> Path:
    args = finetune_args(cluster, finetune_world, "ft-full", "register.name=brainmoe-heads-ray")
    result = submit(cluster, args, "--submission-id=brainmoe-ci-ft-full")
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "registered brainmoe-heads-ray version 1" in log, log[-3000:]
    return cluster["root"] / "ft-full"


def test_two_node_finetuning_trains_and_registers(cluster, finetuned):
    rows = metrics(finetuned)
    assert rows[-1]["step"] == FT_STEPS
    for task in ("retrieval", "text"):
        assert rows[-1][f"{task}_loss"] < rows[0][f"{task}_loss"], (task, rows[0], rows[-1])
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cluster["mlflow"], registry_uri=cluster["mlflow"])
    version = client.get_model_version_by_alias("brainmoe-heads-ray", "current")
    assert version.tags["launcher"] == "ray" and version.tags["world_size"] == "2"
    assert version.tags["encoder_version"] == f"{NAME}/1", version.tags
    store = cluster["root"] / "store" / "ft-full"
    assert registered(store) == [f"step{s:07d}" for s in range(CKPT, FT_STEPS + 1, CKPT)]


def test_a_killed_finetuning_worker_resumes_and_retraces(cluster, finetuned, finetune_world):
    args = finetune_args(cluster, finetune_world, "ft-killed", "ray.max_failures=1")
    kill_and_resume(cluster, "brainmoe-ci-ft-killed", args, "ft-killed", finetuned)


def registered(store: Path) -> list[str]:
    try:
        snapshot = json.loads((store / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return []
    return [c["checkpoint_dir_name"] for c in snapshot.get("checkpoint_results", [])]


def ray_job(world: dict, *args: str) -> subprocess.CompletedProcess:
    """`ray job <args>` against the test cluster."""
    cmd = [BIN / "ray", "job", *args[:1], f"--address={world['address']}", *args[1:]]
    return subprocess.run(cmd, env=world["env"], capture_output=True, text=True, timeout=60)


def job_status(world: dict, job: str) -> str:
    out = ray_job(world, "status", job)
    # "Status for job 'X': RUNNING" while it runs; "Job 'X' succeeded" (failed, stopped) after
    name = re.escape(job)
    found = re.search(rf"Status for job '{name}': (\w+)|Job '{name}' (\w+)", out.stdout)
    assert found, f"`ray job status` said: {out.stdout}{out.stderr}"
    return (found.group(1) or found.group(2)).upper()


def logs(world: dict, job: str) -> str:
    out = ray_job(world, "logs", job)
    return out.stdout + out.stderr


def test_folders_of_dead_ranks_are_swept_and_live_ones_kept(tmp_path):
    """A killed rank never runs `close`: the next rank set up on the node removes its
    checkpoint copy, and leaves those of ranks still running (and anything else) alone."""
    from cluster.ray_train import RANK_PREFIX, sweep_dead_rank_folders

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f"{RANK_PREFIX}0-pid{dead.pid}-abc"
    live = tmp_path / f"{RANK_PREFIX}1-pid{os.getpid()}-def"
    other = tmp_path / f"{RANK_PREFIX}0-unrelated"
    for folder in (gone, live, other):
        (folder / "checkpoints").mkdir(parents=True)
    assert sweep_dead_rank_folders(tmp_path) == [gone]
    assert not gone.exists() and live.exists() and other.exists()
