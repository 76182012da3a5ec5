"""Faults of issue 11 in the training layer, each reproduced through the real component.

5  damaged newest checkpoints: resume falls back to the newest intact one (one 2-rank run)
6  config errors: one line and exit 2 from the launcher, before DeepSpeed starts
7  an unreachable MLflow server: exit 2 in seconds, not minutes in MLflow's retries
10 checkpoints that would run code when unpickled are refused
11b a single-node launch keeps its rendezvous on the loopback interface
"""

from __future__ import annotations

import builtins
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch

from cluster.cli import main as brainmoe
from pretrain import checkpoint
from pretrain.tracking import TrackingConfig, check_tracking_store
from shards.build import BuildConfig, build
from shards.config import load_config
from tests.conftest import REPO, free_port

BRAINMOE = [sys.executable, "-m", "cluster.cli"]
TINY = str(REPO / "configs" / "pretrain" / "tiny.yaml")
TINY_FINETUNE = str(REPO / "configs" / "finetune" / "tiny.yaml")


def run_cli(*args: str, timeout: int = 300) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK")}
    env["DS_ACCELERATOR"] = "cpu"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    started = time.perf_counter()
    result = subprocess.run(
        [*BRAINMOE, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    return result, time.perf_counter() - started


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """Exit 2, no launch, and stderr is exactly one `error: ...` line."""
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    assert "$ " not in result.stdout, "the deepspeed launcher was started"
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    source = "synthetic?subjects=1&runs=1&duration_s=16"
    build(load_config(BuildConfig, sources=[source], out=str(out), workers=0))
    return out


# ---- 5: checkpoints that are incomplete or damaged ------------------------------------------
def fake_checkpoint(ckpt_dir: Path, step: int, files: dict[str, bytes], marker: bool = True):
    folder = ckpt_dir / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    if marker:
        checkpoint.write_marker(folder, step)
    return folder


def test_marker_catches_missing_truncated_and_altered_files(tmp_path):
    files = {"model.pt": b"m" * 100, "optim.pt": b"o" * 50, "rng_rank0.json": b"{}"}
    good = fake_checkpoint(tmp_path, 2, files)
    assert checkpoint.problem(good) is None
    unfinished = fake_checkpoint(tmp_path, 4, files, marker=False)
    assert "no complete.json" in checkpoint.problem(unfinished)
    missing = fake_checkpoint(tmp_path, 6, files)
    (missing / "optim.pt").unlink()
    assert checkpoint.problem(missing) == "optim.pt is missing"
    truncated = fake_checkpoint(tmp_path, 8, files)
    (truncated / "model.pt").write_bytes(b"m" * 10)
    assert checkpoint.problem(truncated) == "model.pt is 10 bytes, complete.json says 100"
    altered = fake_checkpoint(tmp_path, 10, files)
    (altered / "model.pt").write_bytes(b"x" * 100)  # same size: only the hash can tell
    assert checkpoint.problem(altered, hashes=False) is None
    assert "does not match its sha256" in checkpoint.problem(altered)
    # step 100 sorts after step 10 by number, not by name
    tag, skipped = checkpoint.choose(tmp_path)
    assert tag == "step0000002"
    assert [t for t, _ in skipped] == [f"step{s:07d}" for s in (10, 8, 6, 4)]


def test_prune_counts_only_complete_checkpoints(tmp_path):
    for step in (2, 4, 6):
        fake_checkpoint(tmp_path, step, {"f": b"1"})
    fake_checkpoint(tmp_path, 8, {"f": b"1"}, marker=False)  # a save that did not finish
    checkpoint.prune(tmp_path, keep=2)
    assert checkpoint.step_tags(tmp_path) == ["step0000004", "step0000006", "step0000008"]


def test_rng_state_round_trips_through_json(tmp_path):
    path = tmp_path / "rng_rank0.json"
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    checkpoint.write_rng_state(path)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    checkpoint.read_rng_state(path)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    json.loads(path.read_text())  # plain JSON: nothing to unpickle


def test_resume_without_an_intact_checkpoint_stops_before_launch(corpus, tmp_path, capsys):
    """Every checkpoint damaged: an error naming what is wrong, not a fresh start that would
    write over them (and not tracebacks from every rank)."""
    ckpt_dir = tmp_path / "run" / "checkpoints"
    fake_checkpoint(ckpt_dir, 100, {"mp_rank_00_model_states.pt": b"x"}, marker=False)
    args = ["pretrain", "--config", TINY, f"data.shards=[{corpus}]"]
    args += [f"train.run_dir={tmp_path / 'run'}", "train.resume=true"]
    assert brainmoe(args) == 2
    err = capsys.readouterr().err
    assert "no checkpoint in" in err and "step0000100: no complete.json" in err, err
    assert f"remove {ckpt_dir} to start from scratch" in err


@pytest.mark.slow
def test_resume_skips_damaged_checkpoints_and_finishes(corpus, tmp_path):
    """A 2-rank run saves at steps 2, 4, 6, 8; then the newest is truncated, the next loses an
    optimizer file, the next an RNG file. resume=true warns about each, resumes at step 2,
    trains to the end and exits 0 -- where it used to end in a traceback on every rank."""
    run_dir = tmp_path / "run"
    schedule = [f"data.shards=[{corpus}]", f"train.run_dir={run_dir}", "train.steps=8"]
    schedule += ["train.ckpt_every=2", "train.log_every=2", "train.keep_checkpoints=4"]
    schedule += ["optim.warmup_steps=1", "train.plots=false", "tracking.enabled=false"]
    schedule += ["data.reader.num_workers=0"]

    def launch(*overrides: str) -> subprocess.CompletedProcess:
        args = ["pretrain", "--num-gpus", "2", "--master-port", str(free_port())]
        return run_cli(*args, "--config", TINY, *schedule, *overrides, timeout=900)[0]

    first = launch()
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-4000:]
    assert "--master_addr 127.0.0.1" in first.stdout  # 11b: the single-node rendezvous
    ckpt = run_dir / "checkpoints"
    tags = checkpoint.step_tags(ckpt)
    assert tags == [checkpoint.tag_for(s) for s in (2, 4, 6, 8)]
    for tag in tags:
        listed = json.loads((ckpt / tag / checkpoint.MARKER).read_text())["files"]
        assert {"rng_rank0.json", "rng_rank1.json", "train_state.json"} <= set(listed)
        assert not list((ckpt / tag).glob("rng_rank*.pt"))  # no pickles of brainmoe's own
    model = ckpt / "step0000008" / "mp_rank_00_model_states.pt"
    size = model.stat().st_size
    model.write_bytes(model.read_bytes()[: size // 2])
    optim = sorted((ckpt / "step0000006").glob("*optim_states.pt"))
    assert len(optim) == 2  # one per rank (ZeRO-2)
    optim[1].unlink()
    (ckpt / "step0000004" / "rng_rank1.json").unlink()

    resumed = launch("train.resume=true")
    log = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, log[-6000:]
    assert "Traceback" not in log, log[-6000:]
    assert (
        f"checkpoint {ckpt / 'step0000008'} is damaged (mp_rank_00_model_states.pt is "
        f"{size // 2} bytes, complete.json says {size})"
    ) in resumed.stderr
    assert f"checkpoint {ckpt / 'step0000006'} is damaged ({optim[1].name} is missing)" in (
        resumed.stderr
    )
    assert "step0000004 is damaged (rng_rank1.json is missing)" in resumed.stderr
    assert "resuming from step0000002, the newest intact checkpoint (step 2)" in resumed.stderr
    assert resumed.stderr.count("is damaged") == 3  # said once (rank 0), not once per rank
    assert "resumed at step 2 " in resumed.stdout
    # trained on to the end; the damaged folders are kept aside, the new ones are intact
    assert checkpoint.step_tags(ckpt) == tags
    assert all(checkpoint.problem(ckpt / t) is None for t in tags)
    assert sorted(p.name for p in ckpt.glob("*.damaged")) == [f"{t}.damaged" for t in tags[1:]]
    assert (ckpt / "latest").read_text().strip() == "step0000008"
    metrics = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [2, 4, 6, 8]


# ---- 6: config errors stop the launcher with one line ---------------------------------------
@pytest.mark.parametrize(
    "command, config", [("pretrain", TINY), ("finetune", TINY_FINETUNE)], ids=["pre", "fine"]
)
def test_negative_lr_stops_the_cli_in_one_line(command, config, corpus, tmp_path):
    run_dir = tmp_path / "run"
    paths = [f"data.shards=[{corpus}]", f"train.run_dir={run_dir}"]
    result, elapsed = run_cli(command, "--num-gpus", "2", "--config", config, *paths, "optim.lr=-1")
    assert one_error_line(result) == "error: optim.lr must be > 0, got -1.0"
    assert not run_dir.exists(), "a rank started"
    assert elapsed < 60, f"{elapsed:.0f} s: the check should cost the imports, no launch"


def test_broken_yaml_is_named_by_file_and_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  name: tiny\n  overrides: {top_k: 2\ntrain:\n  steps: 10\n")
    result, elapsed = run_cli("pretrain", "--config", str(config))
    line = one_error_line(result)
    assert line.startswith(f"error: {config}:4:"), line
    assert "YAML syntax error" in line
    assert elapsed < 60


RANGE_CASES = [
    ("optim.lr=nan", "optim.lr must be > 0, got nan"),
    ("optim.betas=[0.9,1.0]", "optim.betas.1 must be in [0, 1), got 1.0"),
    ("optim.weight_decay=-0.01", "optim.weight_decay must be >= 0"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be in [0, 1]"),
    ("dist.grad_accum=0", "dist.grad_accum must be >= 1"),
    ("train.keep_checkpoints=0", "train.keep_checkpoints must be >= 1"),
    ("train.seed=-1", "train.seed must be in [0, 4294967295]"),
    ("msm.mask_ratio=0", "msm.mask_ratio must be in (0, 1), got 0"),
    ("msm.decoder_heads=0", "msm.decoder_heads must be >= 1"),
    ("msm.mask_ratio=half", "msm.mask_ratio must be a number in (0, 1), got 'half'"),
]


@pytest.mark.parametrize("override, message", RANGE_CASES, ids=[c[0] for c in RANGE_CASES])
def test_every_number_is_range_checked(override, message, corpus, tmp_path, capsys):
    run_dir = tmp_path / "run"
    args = ["pretrain", "--num-gpus", "2", "--config", TINY, f"data.shards=[{corpus}]"]
    assert brainmoe([*args, f"train.run_dir={run_dir}", override]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not run_dir.exists()


def test_finetune_head_numbers_are_range_checked(capsys):
    args = ["finetune", "--config", TINY_FINETUNE, "text.lora_dropout=1.5"]
    assert brainmoe(args) == 2
    assert "text.lora_dropout must be in [0, 1), got 1.5" in capsys.readouterr().err


# ---- 7: the tracking server is checked by the launcher --------------------------------------
def test_unreachable_tracking_server_stops_the_cli_in_seconds(corpus, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    paths = [f"data.shards=[{corpus}]", f"train.run_dir={tmp_path / 'run'}"]
    tracking = f"tracking.tracking_uri={uri}"
    result, elapsed = run_cli("pretrain", "--num-gpus", "2", "--config", TINY, *paths, tracking)
    line = one_error_line(result)
    assert f"tracking.tracking_uri={uri}: no MLflow server answers there" in line, line
    assert "tracking.enabled=false" in line
    assert not (tmp_path / "run").exists()
    assert elapsed < 60  # the check itself: see the next test
    started = time.perf_counter()
    with pytest.raises(ValueError, match="Connection refused"):
        check_tracking_store(TrackingConfig(tracking_uri=uri))
    assert time.perf_counter() - started < 15


class NotMLflow(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_a_server_that_is_not_mlflow_is_refused():
    server = HTTPServer(("127.0.0.1", 0), NotMLflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        uri = f"http://127.0.0.1:{server.server_port}"
        with pytest.raises(ValueError, match="HTTP 404 on /health and 404 on the REST API"):
            check_tracking_store(TrackingConfig(tracking_uri=uri))
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_real_mlflow_server_passes_the_check(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    cmd += ["--default-artifact-root", str(tmp_path / "artifacts")]
    server = subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers share its process group: stopped together
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "no mlflow server"
                time.sleep(1)
        check_tracking_store(TrackingConfig(tracking_uri=uri))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# ---- 10: checkpoints are data, not code ------------------------------------------------------
class RunsCode:
    """Unpickling this calls exec: what a malicious checkpoint file does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def crafted_checkpoint(root: Path, marker: Path) -> Path:
    """A checkpoints folder that looks like brainmoe's, whose DeepSpeed pickles run code."""
    from pretrain.encoder_config import get_config

    folder = root / "checkpoints" / "step0000010"
    folder.mkdir(parents=True)
    (root / "checkpoints" / "latest").write_text(folder.name)
    (folder / "encoder_config.json").write_text(json.dumps(asdict(get_config("tiny"))))
    payload = {"module": RunsCode(marker), "buffer_names": [], "param_shapes": RunsCode(marker)}
    torch.save(payload, folder / "mp_rank_00_model_states.pt")
    torch.save(
        {"optimizer_state_dict": RunsCode(marker)},
        folder / "zero_pp_rank_0_mp_rank_00_optim_states.pt",
    )
    return folder


def test_export_refuses_a_checkpoint_that_would_run_code(tmp_path):
    marker = tmp_path / "code-ran"
    crafted_checkpoint(tmp_path, marker)
    result, _ = run_cli("export", str(tmp_path / "checkpoints"), str(tmp_path / "out"))
    log = result.stdout + result.stderr
    assert result.returncode == 2, log[-3000:]
    assert "error: refused to load" in result.stderr and "names exec" in result.stderr, log
    assert "Traceback" not in log
    assert not marker.exists(), "unpickling ran the crafted code"
    assert not (tmp_path / "out").exists()


def test_deepspeed_checkpoint_engine_loads_weights_only(tmp_path):
    """What `engine.load_checkpoint` (resume) calls for every file: DeepSpeed's own
    TorchCheckpointEngine.load, which passes weights_only=False to torch.load."""
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    marker = tmp_path / "code-ran"
    folder = crafted_checkpoint(tmp_path, marker)
    engine = TorchCheckpointEngine()
    original = torch.load
    with (
        checkpoint.weights_only_loads(),
        pytest.raises(checkpoint.UnsafeCheckpointError, match="names exec"),
    ):
        engine.load(str(folder / "mp_rank_00_model_states.pt"), map_location="cpu")
    assert not marker.exists()
    assert torch.load is original  # restored after the block
    # the control: the same file, loaded the way DeepSpeed does by default, runs the code
    engine.load(str(folder / "mp_rank_00_model_states.pt"), map_location="cpu")
    assert marker.read_text() == "ran"


# ---- 11b: a single node keeps its rendezvous on loopback -------------------------------------
def test_single_node_launch_uses_loopback(tmp_path):
    from cluster.cli import build_parser
    from cluster.deepspeed_launch import launch_command, launch_env
    from pretrain.cli import RUN_PY

    parser = build_parser()
    one = parser.parse_args(["pretrain", "--num-gpus", "2", "--master-port", "29500"])
    cmd = launch_command(one, RUN_PY)
    assert cmd[cmd.index("--master_addr") + 1] == "127.0.0.1"
    if Path("/sys/class/net/lo").exists() and "GLOO_SOCKET_IFNAME" not in os.environ:
        assert launch_env(one)["GLOO_SOCKET_IFNAME"] == "lo"
    hosts = tmp_path / "hostfile"
    hosts.write_text("node1 slots=8\nnode2 slots=8\n")
    multi = parser.parse_args(["pretrain", "--hostfile", str(hosts), "--num-nodes", "2"])
    assert "--master_addr" not in launch_command(multi, RUN_PY)  # DeepSpeed finds the first host's
    if "GLOO_SOCKET_IFNAME" not in os.environ:
        assert "GLOO_SOCKET_IFNAME" not in launch_env(multi)
