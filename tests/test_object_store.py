"""A corpus in S3-compatible storage: built, verified and read there as it is on disk.

A real S3 server (moto's standalone one) on 127.0.0.1, reached only through the variables
a user sets for MinIO or AWS (endpoint, keys, region), so the test covers what botocore and
s3fs pick up by themselves, not a client configured by the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from cluster.cli import main as brainmoe
from shards import storage
from shards.build import BuildConfig, build
from shards.config import load_config
from shards.lock import BuildLocked
from shards.manifest import verify
from shards.reader import ReaderConfig, make_loader
from tests.conftest import REPO, free_port

s3fs = pytest.importorskip("s3fs")
MOTO = Path(sys.executable).with_name("moto_server")
if not MOTO.exists():
    pytest.skip("moto_server not installed: pip install 'moto[server]'", allow_module_level=True)

SPEC = "synthetic?subjects=2&runs=1&duration_s=40"
BUCKET = "bucket"
CORPUS = f"s3://{BUCKET}/corpus"


def _start_moto(port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [str(MOTO), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.2)
    _stop(proc)
    raise RuntimeError("moto_server did not answer within 60 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and nothing else
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _s3fs():
    fs, _ = storage.filesystem(CORPUS)
    fs.invalidate_cache()
    return fs


def digests(folder: str | Path) -> dict[str, str]:
    """sha256 of every file of a build folder (shards, reports, manifest), lock excluded."""
    if storage.is_uri(folder):
        fs = _s3fs()
        root = folder.removeprefix("s3://").rstrip("/")
        names = [p[len(root) + 1 :] for p in fs.find(root)]
        read = lambda name: fs.cat_file(f"{root}/{name}")  # noqa: E731
    else:
        root_path = Path(folder)
        names = [str(p.relative_to(root_path)) for p in root_path.rglob("*") if p.is_file()]
        read = lambda name: (root_path / name).read_bytes()  # noqa: E731
    return {
        name: hashlib.sha256(read(name)).hexdigest()
        for name in sorted(names)
        if not name.startswith(".lock")
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """Server, environment and bucket; then a local and an S3 build of the same spec."""
    port = free_port()
    proc = _start_moto(port)
    home = tmp_path_factory.mktemp("home")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
                mp.delenv(name, raising=False)
            mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
            mp.setenv("AWS_ACCESS_KEY_ID", "testing")
            mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
            mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
            mp.setenv("AWS_CONFIG_FILE", str(home / "config"))  # keep ~/.aws out
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "credentials"))
            # fsspec keeps one S3FileSystem per set of arguments, whatever the environment was
            # when it was made: one cached by an earlier test, without these variables, would
            # be handed back here
            s3fs.S3FileSystem.clear_instance_cache()
            _s3fs().mkdir(BUCKET)
            local = tmp_path_factory.mktemp("local") / "corpus"
            build(load_config(BuildConfig, sources=[SPEC], out=str(local), workers=0))
            build(load_config(BuildConfig, sources=[SPEC], out=CORPUS, workers=0))
            yield {"local": local, "port": port}
    finally:
        s3fs.S3FileSystem.clear_instance_cache()  # nor hand this server's client to later tests
        _stop(proc)


def test_s3_build_is_byte_identical_to_a_local_one_and_resumes(s3):
    reference = digests(s3["local"])
    assert any(name.endswith(".tar") for name in reference)
    assert {"manifest.json", "sizes.json", "build.json"} <= set(reference)
    assert digests(CORPUS) == reference
    assert not storage.exists(f"{CORPUS}/.lock/build.lock"), "the lock is released"

    # A unit whose report is gone (a build killed before it) is rebuilt; the rest is kept.
    fs = _s3fs()
    reports = sorted(fs.ls(f"{BUCKET}/corpus/units"))
    fs.rm_file(reports[0])
    fs.rm_file(f"{BUCKET}/corpus/manifest.json")
    kept = reports[1]
    before = fs.info(kept)["LastModified"]
    build(load_config(BuildConfig, sources=[SPEC], out=CORPUS, workers=0))
    assert digests(CORPUS) == reference
    assert _s3fs().info(kept)["LastModified"] == before, "a finished unit is not rebuilt"


def test_s3_lock_refuses_a_second_build_and_takes_over_a_dead_one(s3, capsys):
    lock = f"{CORPUS}/.lock/build.lock"
    cfg = load_config(BuildConfig, sources=[SPEC], out=CORPUS, workers=0)
    storage.write_text(lock, json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    with pytest.raises(BuildLocked, match="being built by another build"):
        build(cfg)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    storage.write_text(lock, json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    build(cfg)
    assert "taking it over" in capsys.readouterr().err
    assert not storage.exists(lock)


def test_reader_streams_the_same_samples_from_s3(s3):
    cfg = ReaderConfig(batch_size=8, num_workers=0, shuffle=False)
    local = next(iter(make_loader(str(s3["local"]), cfg)))
    remote = next(iter(make_loader(CORPUS, cfg)))
    assert remote["key"] == local["key"]
    for name in ("eeg", "channel_mask", "time_mask", "ch_pos", "pos_known", "ch_known", "sfreq"):
        assert remote[name].equal(local[name]), name
    assert all(url.startswith(CORPUS + "/") for url in remote["shard"])

    # A whole shuffled epoch through forked DataLoader workers, as pretraining reads it.
    cfg = ReaderConfig(batch_size=8, num_workers=2, shuffle=True, seed=3)
    epoch = lambda source: sorted(k for b in make_loader(source, cfg) for k in b["key"])  # noqa: E731
    assert epoch(CORPUS) == epoch(str(s3["local"]))


def test_pretrain_config_accepts_s3_shards(s3, tmp_path):
    from pretrain.config import PretrainConfig
    from pretrain.model import validate_config

    cfg = load_config(
        PretrainConfig,
        str(REPO / "configs" / "pretrain" / "tiny.yaml"),
        [f"data.shards=[{CORPUS}]", f"train.run_dir={tmp_path / 'run'}"],
    )
    validate_config(cfg, world_size=None)
    cfg.data.shards = [f"s3://{BUCKET}/nothing-here"]
    with pytest.raises(ValueError, match="is not a folder"):
        validate_config(cfg, world_size=None)


@pytest.mark.slow
def test_pretraining_reads_the_s3_corpus(s3, tmp_path):
    """`brainmoe pretrain` (2 CPU ranks under DeepSpeed) streams its shards from the bucket,
    and the run's lineage names the corpus's manifest by its hash."""
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    cmd = [sys.executable, "-m", "cluster.cli", "pretrain", "--num-gpus", "2"]
    cmd += ["--master-port", str(free_port())]
    cmd += ["--config", str(REPO / "configs" / "pretrain" / "tiny.yaml"), f"data.shards=[{CORPUS}]"]
    cmd += [f"train.run_dir={run_dir}", "train.steps=10", "train.log_every=5"]
    cmd += ["train.ckpt_every=10", "optim.warmup_steps=2", "train.plots=false"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [5, 10]
    lineage = json.loads((run_dir / "checkpoints" / "step0000010" / "lineage.json").read_text())
    manifest = storage.read_bytes(f"{CORPUS}/manifest.json")
    assert lineage["shard_manifests"] == {CORPUS: hashlib.sha256(manifest).hexdigest()}


def test_cli_build_and_verify_on_s3_find_a_corrupted_shard(s3):
    url = f"s3://{BUCKET}/cli"
    cli = [sys.executable, "-m", "cluster.cli", "shards"]
    run = lambda *args: subprocess.run(  # noqa: E731
        [*cli, *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    built = run("build", "--source", SPEC, "--out", url, "--workers", "0")
    assert built.returncode == 0, built.stderr
    ok = run("verify", url)
    assert ok.returncode == 0, ok.stderr
    assert "OK:" in ok.stdout
    assert verify(url) == []

    fs = _s3fs()
    shard = sorted(p for p in fs.ls(f"{BUCKET}/cli") if p.endswith(".tar"))[0]
    blob = bytearray(fs.cat_file(shard))
    blob[len(blob) // 2] ^= 0xFF  # same size, other bytes: only the hash can tell
    fs.pipe_file(shard, bytes(blob))
    fs.pipe_file(f"{BUCKET}/cli/stray-00000.tar", b"x")
    bad = run("verify", url)
    assert bad.returncode == 1
    name = shard.rsplit("/", 1)[1]
    assert f"FAIL {name}: sha256 differs from the manifest" in bad.stderr
    assert "stray-00000.tar: not in the manifest" in bad.stderr
    assert brainmoe(["shards", "stats", url]) == 0


def test_unsupported_scheme_and_missing_s3fs_are_clear_errors(monkeypatch):
    import importlib

    registry = importlib.import_module("fsspec.registry")  # the module; fsspec.registry is a dict
    with pytest.raises(ValueError, match="unsupported URL scheme nosuch://"):
        build(load_config(BuildConfig, sources=[SPEC], out="nosuch://b/c", workers=0))
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        make_loader("nosuch://b/c")
    monkeypatch.setitem(
        registry.known_implementations,
        "s3",
        {"class": "no_such_s3fs_module.S3FileSystem", "err": "Install s3fs to access S3"},
    )
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    with pytest.raises(ValueError, match="pip install s3fs"):
        build(load_config(BuildConfig, sources=[SPEC], out=CORPUS, workers=0))


# ---- the finetuning layer and Ray Train on the bucket ------------------------------------
STIM_SPEC = "synthetic?subjects=2&runs=1&duration_s=60&classes=2&instances=3&artifacts=false"
STIM = f"s3://{BUCKET}/stim"


@pytest.fixture(scope="module")
def stim(s3, tmp_path_factory):
    """A stimulus corpus built locally and in the bucket, and a tiny random-weight CLIP."""
    from finetune.tiny.clip import build_tiny_clip

    root = tmp_path_factory.mktemp("stim")
    build(load_config(BuildConfig, sources=[STIM_SPEC], out=str(root / "corpus"), workers=0))
    build(load_config(BuildConfig, sources=[STIM_SPEC], out=STIM, workers=0))
    return {
        "root": root,
        "local": root / "corpus",
        "clip": build_tiny_clip(root / "clip", fit_steps=0),
    }


def _cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """`brainmoe ARGS` with the bucket's variables inherited."""
    from tests.servers import ray_env

    env = ray_env()  # this venv on PATH, no RAY_ADDRESS: a private Ray on 127.0.0.1
    env["DS_ACCELERATOR"] = "cpu"
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_embed_stimuli_on_s3_writes_the_local_cache(stim):
    """embed-stimuli with --shards s3://... renders the stimuli into the bucket, reads them
    from there (in the Ray actors too), and writes the same cache bytes as a local run.

    `brainmoe embed-stimuli` runs in this process on one Ray both calls share (a Ray start is
    the expensive part); the actors get the bucket's variables from the environment, as a
    user's would."""
    import ray
    import torch

    from cluster.cli import main as brainmoe
    from cluster.local_ray import init_local_ray
    from finetune.clip_cache import ClipCache
    from finetune.stimuli import StimulusSet

    flags = ["--model", stim["clip"], "--workers", "1", "--batch-size", "4"]
    init_local_ray(num_cpus=1)
    try:
        assert brainmoe(["embed-stimuli", "--shards", str(stim["local"]), *flags]) == 0
        assert brainmoe(["embed-stimuli", "--shards", STIM, *flags]) == 0
    finally:
        ray.shutdown()
    (local,) = (stim["local"] / "clip").iterdir()
    remote = f"{STIM}/clip/{local.name}"
    fs = _s3fs()
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(remote.removeprefix("s3://")))
    assert names == sorted(p.name for p in local.iterdir())
    for name in ("image.safetensors", "text.safetensors", "concepts.safetensors", "index.json"):
        assert storage.read_bytes(f"{remote}/{name}") == (local / name).read_bytes(), name
    renders = sorted((stim["local"] / "stimuli" / "synthetic").iterdir())
    assert len(renders) == 6
    for png in renders:  # the images embedded were the bucket's
        assert storage.read_bytes(f"{STIM}/stimuli/synthetic/{png.name}") == png.read_bytes()
    stimuli = StimulusSet.load(f"{remote}/stimuli.json")
    assert [stimuli[i].image for i in stimuli] == [
        f"{STIM}/stimuli/synthetic/{p.name}" for p in renders
    ]
    a, b = ClipCache.load(remote), ClipCache.load(local)
    assert a.ids == b.ids and len(a.ids) == 6
    assert torch.equal(a.image(a.ids), b.image(b.ids)) and torch.equal(a.text(a.ids), b.text(b.ids))

    # Up to date: a second run answers from the bucket without Ray (the index is untouched).
    before = fs.info(f"{remote.removeprefix('s3://')}/index.json")["LastModified"]
    assert brainmoe(["embed-stimuli", "--shards", STIM, *flags]) == 0
    assert not ray.is_initialized()
    assert _s3fs().info(f"{remote.removeprefix('s3://')}/index.json")["LastModified"] == before


def test_generate_copies_a_stimulus_rendered_into_the_bucket(s3, tmp_path):
    """`brainmoe generate` copies each window's stimulus beside its images and draws the
    contact sheet from that copy; a stimulus rendered beside s3:// shards is a URL (it was
    opened as a local path before, and failed)."""
    import numpy as np
    from PIL import Image

    from finetune.generate import contact_sheet, copy_stimulus

    png = tmp_path / "render.png"
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(png)
    url = f"s3://{BUCKET}/stim-copy/stimuli/synthetic/class_0.png"
    storage.write_bytes(url, png.read_bytes())
    out = tmp_path / "generated"
    (out / "win").mkdir(parents=True)
    copy = copy_stimulus(url, out / "win")
    assert copy == out / "win" / "stimulus.png" and copy.read_bytes() == png.read_bytes()
    assert copy_stimulus(png, tmp_path).read_bytes() == png.read_bytes()  # a local file too

    record = {"key": "win", "caption": "a class 0", "images": [], "channels": 2,
              "eeg": np.zeros((2, 10)), "stimulus_image": url,
              "stimulus_copy": "win/stimulus.png"}  # fmt: skip
    contact_sheet([record], out)
    assert (out / "contact_sheet.png").stat().st_size > 0
    assert 'src="win/stimulus.png"' in (out / "index.html").read_text()


@pytest.mark.slow
def test_finetuning_reads_s3_shards(stim, tmp_path):
    """`brainmoe finetune` (one CPU rank) with data.shards=[s3://...]: split, stimulus renders,
    CLIP cache and training all come from the bucket."""
    from pretrain.encoder import Encoder
    from pretrain.encoder_config import get_config

    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    Encoder(get_config("tiny", spectral_bands=16)).save_pretrained(tmp_path / "encoder")
    run_dir = tmp_path / "run"
    result = _cli(
        *("finetune", "--num-gpus", "1", "--master-port", str(free_port())),
        *("--config", str(REPO / "configs" / "finetune" / "tiny.yaml")),
        f"data.shards=[{STIM}]",
        f"encoder.model={tmp_path / 'encoder'}",
        f"data.clip.model={stim['clip']}",
        "data.clip.pretrained=null",
        "tasks=[retrieval]",
        f"train.run_dir={run_dir}",
        *("train.steps=4", "train.log_every=2", "train.ckpt_every=4", "optim.warmup_steps=1"),
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert f"CLIP embeddings: {STIM}/clip/" in log
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").open()]
    assert steps == [2, 4]
    split = json.loads((run_dir / "split.json").read_text())
    assert split["train_keys"] and split["test_keys"]
    rendered = _s3fs().ls(f"{BUCKET}/stim/stimuli/synthetic")
    assert len(rendered) == 6, rendered


@pytest.mark.slow
def test_ray_train_checkpoints_land_in_the_bucket(s3, tmp_path):
    """`brainmoe pretrain --launcher ray` with ray.storage_path=s3://...: Ray Train uploads
    every reported checkpoint into the bucket through the same client the shards use."""
    run_dir = tmp_path / "ray-run"
    result = _cli(
        *("pretrain", "--launcher", "ray", "--num-workers", "1"),
        *("--config", str(REPO / "configs" / "pretrain" / "tiny.yaml")),
        f"data.shards=[{CORPUS}]",
        f"train.run_dir={run_dir}",
        *("train.steps=4", "train.log_every=2", "train.ckpt_every=2", "optim.warmup_steps=1"),
        *("train.plots=false", "train.keep_checkpoints=2"),
        f"ray.storage_path=s3://{BUCKET}/ray",
        "ray.resources_per_worker={CPU: 1}",
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert "finished at step 4" in log, log[-3000:]
    files = [
        p.removeprefix(f"{BUCKET}/ray/ray-run/") for p in _s3fs().find(f"{BUCKET}/ray/ray-run")
    ]
    tags = sorted({p.split("/")[0] for p in files if p.startswith("step")})
    assert tags == ["step0000002", "step0000004"], files
    in_newest = {p.split("/", 1)[1] for p in files if p.startswith("step0000004/")}
    assert any(name.endswith(".json") for name in in_newest), in_newest
    assert len(in_newest) >= 3, in_newest  # model/optimizer state and the completion marker
    # Ray would resume from the bucket whatever the config says: a fresh run there is refused
    # before Ray starts, as a local run folder with checkpoints is
    again = _cli(
        *("pretrain", "--launcher", "ray", "--num-workers", "1"),
        *("--config", str(REPO / "configs" / "pretrain" / "tiny.yaml")),
        f"data.shards=[{CORPUS}]",
        f"train.run_dir={run_dir}",
        f"ray.storage_path=s3://{BUCKET}/ray",
        timeout=120,
    )
    assert again.returncode != 0, again.stdout[-2000:]
    assert "already holds checkpoints of a Ray run" in again.stderr, again.stderr[-2000:]
