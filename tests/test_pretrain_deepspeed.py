"""Pretraining for real: `brainmoe pretrain` launches DeepSpeed with 2 ranks on CPU (gloo).

One ZeRO-2 run over shards the data plane built is shared by several tests (loss falls,
experts stay balanced, plots and the registry entry exist, export reproduces the engine,
the linear probe runs beside a random-init twin); a second launch resumes its mid-run checkpoint
and must retrace the same losses; a short ZeRO-3 run must export too; and a corpus of NaN
windows must stop a run with the NaN message. Each launch costs ~20 s of start-up, so the
runs are few and shared (module-scoped fixtures).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pretrain.encoder import Encoder
from shards.build import BuildConfig, build
from shards.config import load_config
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow

BRAINMOE = [sys.executable, "-m", "cluster.cli"]
TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")
CORPUS = "synthetic?subjects=8&runs=2&duration_s=120"
PROBE = "synthetic?subjects=8&runs=1&duration_s=120&artifacts=false"
STEPS = 300
NAME, ALIAS = "brainmoe-tiny-ci", "ci"
SCHEDULE = (f"train.steps={STEPS}", "train.log_every=10", f"train.ckpt_every={STEPS // 2}")


def launch(run_dir: Path, corpus: Path, *overrides: str, gpus: int = 2, timeout: int = 900):
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK")}
    env["DS_ACCELERATOR"] = "cpu"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    port = free_port()
    cmd = [*BRAINMOE, "pretrain", "--num-gpus", str(gpus), "--master-port", str(port)]
    cmd += ["--config", TINY, f"data.shards=[{corpus}]", f"train.run_dir={run_dir}", *overrides]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    result.port = port
    return result


def must_succeed(result) -> str:
    """The command exited 0, and a launch left none of DeepSpeed's CPU all-reduce segments in
    /dev/shm (each ~69 MB of RAM until reboot: pretrain/cpu_comm.py)."""
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    if hasattr(result, "port"):
        left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{result.port}_*"))
        assert not left, f"shared memory left behind: {left}"
    return log


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    build(load_config(BuildConfig, sources=[CORPUS], out=str(out), workers=0))
    return out


@pytest.fixture(scope="module")
def zero2(corpus, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    result = launch(
        run_dir,
        corpus,
        *SCHEDULE,
        f"register.name={NAME}",
        f"register.alias={ALIAS}",
    )
    log = must_succeed(result)
    assert f"registered {NAME} version 1 as @{ALIAS}" in log, log[-3000:]
    return run_dir


def test_zero2_loss_falls(zero2):
    history = metrics(zero2)
    assert [h["step"] for h in history] == list(range(10, STEPS + 1, 10))
    first = history[0]["loss"]
    last = float(np.mean([h["loss"] for h in history[-5:]]))
    assert last < 0.5 * first, f"loss {first:.4f} -> {last:.4f}: the model did not learn"
    assert all(np.isfinite(h["loss"]) and h["nan_skipped"] == 0 for h in history)
    for key in ("grad_norm", "lr", "samples_per_s", "tokens_per_s"):
        assert all(h[key] > 0 for h in history), key
    saved = json.loads((zero2 / "deepspeed.json").read_text())
    assert saved["zero_optimization"]["stage"] == 2 and saved["bf16"]["enabled"] is True


def test_no_expert_collapse(zero2):
    """Every expert of every layer gets tokens, and max/min load stays bounded."""
    history = metrics(zero2)
    assert all(h["experts_unused"] == 0 for h in history), history
    after_warmup = [h["expert_load_max_min"] for h in history if h["step"] > 20]
    assert max(after_warmup) < 2.0, f"max/min tokens-per-expert ratios {after_warmup}"
    layers = {k for k in history[-1] if k.startswith("expert_load_max_min/layer")}
    assert len(layers) == 2  # tiny: 2 MoE layers, each logged


def test_run_artifacts_in_mlflow(zero2):
    from mlflow import MlflowClient

    lineage = json.loads((zero2 / "encoder" / "lineage.json").read_text())
    client = MlflowClient(tracking_uri=lineage["tracking_uri"])
    run = client.get_run(lineage["mlflow_run_id"])
    assert run.data.params["dist.zero_stage"] == "2"
    assert run.data.params["msm.target"] == "both"
    assert run.data.metrics["loss"] > 0 and "expert_load_max_min" in run.data.metrics
    plots = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"loss.png", "expert_load.png", "reconstructions.png"} <= plots, plots
    assert (zero2 / "config.yaml").read_text().startswith("data:")


def reference_tokens(run_dir: Path, folder: Path, dtype: torch.dtype) -> tuple[float, float]:
    ref = torch.load(run_dir / "reference_output.pt", weights_only=False)
    encoder = Encoder.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        tokens = encoder(ref["batch"]).tokens.float()
    return float((tokens - ref["tokens"]).abs().max()), float(ref["tokens"].abs().max())


def test_export_reproduces_the_engine(zero2, tmp_path):
    out = tmp_path / "exported"
    result = subprocess.run(
        [*BRAINMOE, "export", str(zero2 / "checkpoints"), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    must_succeed(result)
    # The engine ran in bf16 from the fp32 master weights export consolidates: the same
    # weights cast to bf16 give the engine's tokens bit for bit.
    diff, scale = reference_tokens(zero2, out, torch.bfloat16)
    assert diff == 0.0, f"exported encoder differs from the engine by {diff} (scale {scale})"
    loaded = Encoder.from_pretrained(out)
    assert loaded.moe_layers()[0].router_bias.abs().sum() > 0  # balancing state came along


def test_registry_version_under_alias_with_lineage(zero2, corpus, tmp_path):
    from mlflow import MlflowClient

    from pretrain.tracking import resolve_model

    uri = json.loads((zero2 / "encoder" / "lineage.json").read_text())["tracking_uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(NAME, ALIAS)
    manifest_sha = hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest()
    assert version.tags["shard_manifest_sha256"] == manifest_sha
    assert len(version.tags["git_commit"]) >= 40 or version.tags["git_commit"] == "unknown"
    assert version.tags["step"] == str(STEPS)
    config = json.loads(version.tags["resolved_config"])
    assert config["dist"]["zero_stage"] == 2 and config["model"]["name"] == "tiny"
    folder = resolve_model(f"models:/{NAME}@{ALIAS}", uri, tmp_path / "dl")
    diff, _ = reference_tokens(zero2, folder, torch.bfloat16)
    assert diff == 0.0

    # `brainmoe register` of the same folder adds version 2 and moves the alias.
    result = subprocess.run(
        [*BRAINMOE, "register", str(zero2 / "encoder"), "--name", NAME, "--alias", "again"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert f"models:/{NAME}@again" in must_succeed(result)
    assert str(client.get_model_version_by_alias(NAME, "again").version) == "2"


def test_linear_probe_reports_pretrained_random_init_and_chance(zero2, tmp_path):
    """`brainmoe probe` on the exported encoder: frozen features, logistic regression
    cross-validated across subjects, beside a random-init twin and chance.

    This checks the probe end to end; that pretraining wins is the next test's business (at
    the simulator's default strength a 300-step tiny run does not, see the README).
    """
    out = tmp_path / "probe.json"
    result = subprocess.run(
        [*BRAINMOE, "probe", "--model", str(zero2 / "encoder"), "--source", PROBE]
        + ["--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    log = must_succeed(result)
    r = json.loads(out.read_text())
    assert "balanced accuracy  pretrained" in log and "random-init" in log
    assert r["classes"] == 4 and r["chance"] == 0.25 and r["groups"] == 8
    assert r["windows"] == 8 * 30  # 8 subjects x 120 s / 4 s trials
    assert 0.0 <= r["pretrained"] <= 1.0 and 0.0 <= r["random_init"] <= 1.0
    assert r["pretrained"] != r["random_init"]  # two different encoders were probed
    assert len(r["random_init_each"]) == 3


# The probe-margin run: patterns 3x the default strength (`effect=3`), no artifacts, and the
# scale-free spectral target (`msm.spectrum_norm`) on visible and hidden patches, which a
# pre-norm encoder can learn from raw patches -- and a random one cannot read linearly.
SHAPE_CORPUS = "synthetic?subjects=8&runs=2&duration_s=120&effect=3&artifacts=false"
SHAPE_STEPS = 2000
SHAPE = (
    "msm.target=spectrum",
    "msm.spectrum_bands=16",
    "msm.spectrum_norm=true",
    "msm.visible_weight=1.0",
    "optim.lr=0.001",
    "dist.precision=fp32",
    f"train.steps={SHAPE_STEPS}",
    "train.log_every=100",
    f"train.ckpt_every={SHAPE_STEPS}",
    "train.plots=false",
    "register.name=brainmoe-shape-ci",
)


def test_pretrained_encoder_beats_random_init_in_a_linear_probe(tmp_path_factory):
    root = tmp_path_factory.mktemp("shape")
    corpus = root / "corpus"
    build(load_config(BuildConfig, sources=[SHAPE_CORPUS], out=str(corpus), workers=0))
    run_dir = root / "run"
    must_succeed(launch(run_dir, corpus, *SHAPE, timeout=1500))
    out = root / "probe.json"
    result = subprocess.run(
        [*BRAINMOE, "probe", "--model", str(run_dir / "encoder"), "--source", SHAPE_CORPUS]
        + ["--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    must_succeed(result)
    r = json.loads(out.read_text())
    message = (
        f"linear probe (mean pooling) on {r['source']}, {r['windows']} windows, "
        f"leave-subjects-out: pretrained {r['pretrained']:.3f}, random-init "
        f"{r['random_init']:.3f} (seeds {[round(x, 3) for x in r['random_init_each']]}), "
        f"chance {r['chance']:.3f}, after {SHAPE_STEPS} steps"
    )
    print(message)
    assert r["pretrained"] >= r["random_init"] + 0.1, message
    assert r["pretrained"] >= max(r["random_init_each"]) + 0.05, message


def test_resume_retraces_the_uninterrupted_losses(zero2, corpus, tmp_path):
    """A fresh launch from the mid-run checkpoint logs the same losses as the uninterrupted
    run: model, optimizer, scheduler, data position and RNG state all came back."""
    run_dir = tmp_path / "resumed"
    shutil.copytree(zero2, run_dir, ignore=shutil.ignore_patterns("encoder", "plots"))
    half = f"step{STEPS // 2:07d}"
    shutil.rmtree(run_dir / "checkpoints" / f"step{STEPS:07d}")
    (run_dir / "checkpoints" / "latest").write_text(half)
    result = launch(
        run_dir,
        corpus,
        *SCHEDULE,
        "train.resume=true",
        "train.plots=false",
    )
    log = must_succeed(result)
    assert f"resumed at step {STEPS // 2}" in log
    full, resumed = metrics(zero2), metrics(run_dir)
    assert [h["step"] for h in resumed] == [h["step"] for h in full]
    after = [i for i, h in enumerate(full) if h["step"] > STEPS // 2]
    for i in after:
        for key in ("loss", "aux_loss", "grad_norm", "lr", "expert_load_max_min"):
            assert resumed[i][key] == pytest.approx(full[i][key], rel=1e-5, abs=1e-7), (
                f"step {full[i]['step']} {key}: resumed {resumed[i][key]} vs {full[i][key]}"
            )


def test_zero3_short_run_exports(corpus, tmp_path):
    run_dir = tmp_path / "zero3"
    result = launch(
        run_dir,
        corpus,
        "dist.zero_stage=3",
        "train.steps=8",
        "train.log_every=4",
        "train.ckpt_every=8",
        "optim.warmup_steps=2",
        "train.plots=false",
    )
    must_succeed(result)
    history = metrics(run_dir)
    assert len(history) == 2 and all(np.isfinite(h["loss"]) for h in history)
    assert history[1]["loss"] < history[0]["loss"]
    out = tmp_path / "exported"
    must_succeed(
        subprocess.run(
            [*BRAINMOE, "export", str(run_dir / "checkpoints"), str(out)],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
    )
    # ZeRO-3 gathers bf16 shards and runs its own linear autograd function: the same weights,
    # summed in another order, so agreement is to bf16 precision, not bitwise.
    diff, scale = reference_tokens(run_dir, out, torch.bfloat16)
    assert diff <= 0.02 * scale, f"ZeRO-3 export differs by {diff} (scale {scale})"


def test_nan_losses_stop_the_run_with_a_clear_message(corpus, tmp_path):
    """A diverging run (lr 1e30: the first update sends the weights to ~1e30 and the loss to
    inf/NaN): every such step is skipped and counted, and max_nan_streak in a row stop the
    run with exit code 3 and what to do about it. (NaN *data* never gets this far: the
    reader drops such samples, see tests/test_reader.py.)"""
    result = launch(
        tmp_path / "diverging",
        corpus,
        "optim.lr=1e30",
        "optim.warmup_steps=1",
        "train.steps=20",
        "train.max_nan_streak=3",
        "train.plots=false",
        gpus=1,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 3, log[-3000:]
    assert re.search(r"3 non-finite losses in a row at step \d+: the run diverged", log), log[
        -3000:
    ]
    assert "(3 in a row, 3 in all)" in log and "Lower optim.lr" in log
