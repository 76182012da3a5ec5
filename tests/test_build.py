"""The corpus builder end to end: real sources in, verified shards out, resumable."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.cli import main as brainmoe
from shards.build import BuildConfig, build
from shards.config import load_config
from shards.manifest import load_manifest, verify

SYNTH = "synthetic?subjects=2&runs=1&duration_s=40"
FAKE = "moabb:FakeDataset?n_subjects=2&n_sessions=1&n_runs=1&duration=60&seed=7"


def digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.tar"))}


def run_build(out: Path, *sources: str, workers: int = 0, overrides=()) -> dict:
    return build(
        load_config(
            BuildConfig, None, list(overrides), sources=list(sources), out=str(out), workers=workers
        )
    )


def test_build_every_kind_of_source(tmp_path, physionet, mne_testing, capsys):
    out = tmp_path / "corpus"
    sources = [SYNTH, FAKE, "moabb:PhysionetMI?subjects=1", f"files:{mne_testing}"]
    args = ["shards", "build", "--out", str(out), "--workers", "0"]
    for spec in sources:
        args += ["--source", spec]
    assert brainmoe(args) == 0
    manifest = load_manifest(out)
    datasets = {r["provenance"]["dataset"] for r in manifest["recordings"] if r["windows"]}
    assert datasets == {"synthetic", "FakeDataset", "PhysionetMI", "mne-testing"}, datasets
    physio = [r for r in manifest["recordings"] if r["provenance"]["dataset"] == "PhysionetMI"]
    assert len(physio) == 6 and all(r["n_channels"] == 64 for r in physio), physio[0]
    # 6 runs of ~125 s at 4 s windows: nearly every window of real clean EEG survives.
    assert sum(r["windows"] for r in physio) >= 6 * 28
    channel_counts = {r["n_channels"] for r in manifest["recordings"] if r["windows"]}
    assert len(channel_counts) >= 4, f"montages must survive unpadded: {channel_counts}"
    assert brainmoe(["shards", "verify", str(out)]) == 0
    assert brainmoe(["shards", "stats", str(out)]) == 0
    assert "PhysionetMI" in capsys.readouterr().out

    # A second run is a no-op: nothing rewritten, same manifest.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert brainmoe(args) == 0
    assert "nothing to do" in capsys.readouterr().err
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    assert before == after

    # verify fails loudly on a changed shard
    victim = out / manifest["shards"][0]["name"]
    blob = bytearray(victim.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte inside a sample
    victim.write_bytes(bytes(blob))
    assert brainmoe(["shards", "verify", str(out)]) == 1
    assert any("sha256" in p for p in verify(out))


def test_sigkill_midway_then_resume_is_byte_identical(tmp_path):
    spec = "synthetic?subjects=6&runs=2&duration_s=60"
    reference = tmp_path / "reference"
    run_build(reference, spec)

    killed = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "shards.build",
        "--source",
        spec,
        "--out",
        str(killed),
        "--workers",
        "0",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 120
    while not list((killed / "units").glob("*.json")) if (killed / "units").exists() else True:
        assert proc.poll() is None, "the build finished before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_at_kill = len(list((killed / "units").glob("*.json")))
    assert 1 <= done_at_kill < 6, done_at_kill
    assert not (killed / "manifest.json").exists()

    run_build(killed, spec)
    assert digests(killed) == digests(reference)
    assert not list(killed.glob("*.partial")), "no temporary files may survive"
    assert verify(killed) == []
    strip = lambda m: {k: v for k, v in m.items()}  # noqa: E731
    assert strip(load_manifest(killed)) == strip(load_manifest(reference))


def test_bad_config_and_specs_fail_before_work(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        run_build(tmp_path / "a", "nosuchsource")
    with pytest.raises(ValueError, match="not a folder"):
        run_build(tmp_path / "a", f"files:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="h_freq"):
        run_build(tmp_path / "a", SYNTH, overrides=["preprocess.h_freq=150"])
    with pytest.raises(ValueError, match="bogus"):
        run_build(tmp_path / "a", SYNTH, overrides=["preprocess.bogus=1"])
    with pytest.raises(ValueError, match="subjects"):
        run_build(tmp_path / "a", "moabb:FakeDataset?n_subjects=2&subjects=5")
    assert not (tmp_path / "a" / "units").exists(), "nothing may be processed after a bad config"
    # an output folder built with other settings is refused rather than mixed
    run_build(tmp_path / "b", SYNTH)
    with pytest.raises(ValueError, match="other preprocessing"):
        run_build(
            tmp_path / "b", SYNTH, overrides=["preprocess.sfreq=250", "preprocess.h_freq=100"]
        )
    assert brainmoe(["shards", "build", "--out", str(tmp_path / "c")]) == 2


def test_ray_build_gives_the_same_bytes_as_in_process(tmp_path):
    ray = pytest.importorskip("ray")
    run_build(tmp_path / "local", SYNTH, FAKE, workers=0)
    try:
        run_build(tmp_path / "ray", SYNTH, FAKE, workers=2)
    finally:
        ray.shutdown()
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")
    report = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert report["totals"]["units_failed"] == 0
