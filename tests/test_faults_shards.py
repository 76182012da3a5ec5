"""Issue 11, "nothing lost, nothing hangs", for the shard builder: each fault reproduced for real.

A Neuroscan `.cnt` sent to the ANT reader (whose C library segfaults on it), a reader that
dies by a signal, a unit whose build raised, two builds into one folder, a `.nedf` without
defusedxml, and a local Ray listening on every interface. Builds that could kill the test
process run as real subprocesses; crashing readers are real children killed by SIGSEGV.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tomllib

from cluster.cli import main as brainmoe
from shards.build import BuildConfig, build
from shards.config import load_config
from shards.manifest import load_manifest, verify
from shards.sources.contained import ReaderCrashed, call_contained
from shards.sources.files import is_riff, read_raw
from tests.conftest import REPO
from tests.eeg_files import CHANNELS, eeg_array, write_raw

# ------------------------------------------------------------------ small real files, written here


def write_neuroscan_cnt(path: Path, data_uv: np.ndarray, sfreq: float, ch_names: list[str]) -> Path:
    """A Neuroscan CNT (SETUP header, 75-byte ELECTLOC per channel, int16 multiplexed samples,
    empty event table), as Neuroscan's acquisition writes it: ContinousType 1."""
    n_ch, n_samples = data_uv.shape
    counts = np.round(data_uv).astype("<i2")  # calibration 1 uV per count, below
    setup = bytearray(900)
    setup[0:12] = b"Version 3.0\x00"
    setup[225:233], setup[235:243] = b"01/02/24", b"10:00:00"
    struct.pack_into("<H", setup, 370, n_ch)
    struct.pack_into("<H", setup, 376, int(sfreq))
    struct.pack_into("<i", setup, 864, n_samples)
    setup[885] = 1  # ContinousType: the field libeep reads as a Neuroscan file's type
    struct.pack_into("<i", setup, 886, 900 + 75 * n_ch + counts.size * 2)  # event table
    struct.pack_into("<f", setup, 890, n_samples / sfreq)
    electrodes = bytearray()
    for i, name in enumerate(ch_names):
        entry = bytearray(75)
        entry[0:10] = name.encode().ljust(10, b"\x00")
        struct.pack_into("<ff", entry, 19, np.cos(i), np.sin(i))  # x, y on the layout
        struct.pack_into("<f", entry, 59, 204.8)  # sensitivity
        struct.pack_into("<f", entry, 71, 1.0)  # calibration
        electrodes += entry
    teeg = struct.pack("<Bll", 1, 0, 0)  # event table of type 1, no events
    path.write_bytes(bytes(setup) + bytes(electrodes) + counts.T.tobytes() + teeg)
    return path


def write_nedf(path: Path, data_v: np.ndarray, sfreq: int, ch_names: list[str]) -> Path:
    """A NeuroElectrics NEDF 1.4: 10240-byte XML header, then blocks of one 3-axis
    accelerometer sample (16-bit) and five EEG samples, each one big-endian 24-bit count per
    channel and a 32-bit trigger."""
    n_ch, n_samples = data_v.shape
    assert n_samples % 5 == 0
    counts = np.round(data_v / (2.4 / (6.0 * 8388607))).astype(np.int64)  # MNE's scaling
    montage = "".join(f"<C{i}>{name}</C{i}>" for i, name in enumerate(ch_names))
    xml = (
        "<Neuroelectrics><NEDFversion>1.4</NEDFversion>"
        "<NumberOfChannelsOfAccelerometer>3</NumberOfChannelsOfAccelerometer>"
        f"<EEGSettings><TotalNumberOfChannels>{n_ch}</TotalNumberOfChannels>"
        f"<EEGSamplingRate>{sfreq}</EEGSamplingRate>"
        f"<NumberOfRecordsOfEEG>{n_samples}</NumberOfRecordsOfEEG>"
        f"<EEGMontage>{montage}</EEGMontage></EEGSettings>"
        "<StepDetails><StartDate_firstEEGTimestamp>1700000000000</StartDate_firstEEGTimestamp>"
        "</StepDetails></Neuroelectrics>"
    )
    be = np.ascontiguousarray((counts & 0xFFFFFF).astype(">u4").T)  # [T, C]
    eeg = be.view(np.uint8).reshape(n_samples, n_ch, 4)[:, :, 1:].reshape(n_samples, -1)
    samples = np.concatenate([eeg, np.zeros((n_samples, 4), np.uint8)], axis=1)  # + trigger
    blocks = samples.reshape(n_samples // 5, -1)
    body = np.concatenate([np.zeros((len(blocks), 6), np.uint8), blocks], axis=1)  # + acc
    path.write_bytes(xml.encode().ljust(10240, b"\x00") + body.tobytes())
    return path


# Installed in every Python process started with this folder on PYTHONPATH (the build, its
# reader children, Ray's workers): a reader that dies by SIGSEGV on files named crash*, and
# preprocessing that is SIGKILLed (as by the OOM killer) on recordings of files named die*.
CRASH_HOOK = """
import os, signal
from pathlib import Path
import shards.preprocess
import shards.sources.files as files
_real_read_raw, _real_preprocess = files.read_raw, shards.preprocess.preprocess
def read_raw(path):
    if path.name.startswith("crash"):
        os.kill(os.getpid(), signal.SIGSEGV)
    return _real_read_raw(path)
def preprocess(rec, cfg):
    if Path(rec.provenance.file).name.startswith("die"):
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_preprocess(rec, cfg)
files.read_raw, shards.preprocess.preprocess = read_raw, preprocess
"""


def crash_env(tmp_path: Path) -> dict[str, str]:
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(CRASH_HOOK)
    path = [str(hook), str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}


def build_cmd(out: Path, *sources: str, workers: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "shards.build", "--out", str(out), "--workers", str(workers)]
    for spec in sources:
        cmd += ["--source", spec]
    return cmd


def by_file(manifest: dict) -> dict[str, dict]:
    return {Path(r["provenance"]["file"]).name: r for r in manifest["recordings"]}


def _segfault() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _array(n: int) -> np.ndarray:
    return np.arange(n, dtype=np.float64).reshape(4, -1)


# ----------------------------------------------------------------------- 1. .cnt, reader crashes


def test_neuroscan_cnt_goes_to_the_neuroscan_reader(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    sfreq = 250.0
    data = eeg_array(12, 20, sfreq) * 1e6
    cnt = write_neuroscan_cnt(folder / "neuroscan.cnt", data, sfreq, CHANNELS)
    write_raw(folder / "good.fif", eeg_array(12, 20, sfreq, seed=1), sfreq, CHANNELS)
    assert not is_riff(cnt)
    raw = read_raw(cnt)  # in-process: the ANT reader would take the test down with it
    assert type(raw).__name__ == "RawCNT" and raw.ch_names == CHANNELS
    assert np.abs(raw.get_data() * 1e6 - np.round(data)).max() < 1e-3

    # The build as a real process: before the fix it died by SIGSEGV (exit -11) in libeep.
    out = tmp_path / "out"
    result = subprocess.run(
        build_cmd(out, f"files:{folder}?dataset=cnt"), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    rec = by_file(load_manifest(out))
    assert rec["neuroscan.cnt"]["status"] == "ok", rec["neuroscan.cnt"]
    assert rec["neuroscan.cnt"]["n_channels"] == 12 and rec["neuroscan.cnt"]["windows"] == 5
    assert rec["good.fif"]["windows"] == 5
    assert verify(out) == []


def test_ant_cnt_still_goes_to_the_ant_reader(mne_testing):
    ant = mne_testing / "antio" / "CA_208" / "test_CA_208.cnt"
    assert is_riff(ant)
    assert type(read_raw(ant)).__name__ == "RawANT"


def test_reader_killed_by_a_signal_rejects_only_its_file(tmp_path):
    folder = tmp_path / "in"
    sfreq = 200.0
    for seed, name in enumerate(["a.fif", "crash.fif", "z.fif"]):
        write_raw(folder / name, eeg_array(12, 12, sfreq, seed=seed), sfreq, CHANNELS)
    out = tmp_path / "out"
    # Before the fix the reader ran in the build process: it died by SIGSEGV, no manifest.
    result = subprocess.run(
        build_cmd(out, f"files:{folder}?dataset=crashy"),
        env=crash_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    manifest = load_manifest(out)
    rec = by_file(manifest)
    assert rec["crash.fif"]["status"] == "rejected"
    assert rec["crash.fif"]["reason"] == "reader crashed: signal 11 (SIGSEGV)"
    assert rec["a.fif"]["windows"] == 3 and rec["z.fif"]["windows"] == 3
    assert manifest["totals"]["units_failed"] == 0 and verify(out) == []


def test_contained_call_survives_crashes_and_hangs():
    with pytest.raises(ReaderCrashed, match=r"^reader crashed: signal 11 \(SIGSEGV\)$"):
        call_contained(_segfault)
    with pytest.raises(ReaderCrashed, match="timed out: no result after 2 s"):
        call_contained(time.sleep, 600, timeout_s=2)
    result = call_contained(_array, 4000)  # a fresh child after each death
    assert result.shape == (4, 1000) and result.flags.writeable and result[3, 999] == 3999


# ---------------------------------------------------------------------- 2. a failed unit is redone


def _things_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for subject in (1, 2):
        sub = root / f"sub-{subject:02d}"
        sub.mkdir(parents=True)
        eeg = {
            "preprocessed_eeg_data": rng.standard_normal((3, 2, 17, 100)),
            "ch_names": CHANNELS[:12] + ["T7", "T8", "F7", "F8", "Oz"],
            "times": np.linspace(-0.2, 0.79, 100),
        }
        np.save(sub / "preprocessed_eeg_test.npy", eeg)
    return root


def test_failed_unit_is_retried_and_fails_verify(tmp_path, capsys):
    things = _things_folder(tmp_path / "things")
    victim = things / "sub-02" / "preprocessed_eeg_test.npy"
    good = victim.read_bytes()
    broken = bytearray(good)
    body = good.index(b"\n") + 1  # the .npy header ends with a newline; the pickle follows
    broken[body : body + 64] = b"\xff" * 64  # same size, same fingerprint, unreadable
    victim.write_bytes(bytes(broken))
    out = tmp_path / "out"
    args = ["shards", "build", "--source", f"things-eeg2:{things}?splits=test"]
    args += ["--out", str(out), "--workers", "0"]

    assert brainmoe(args) == 1  # a build that lost a unit says so
    manifest = load_manifest(out)
    failed = [u for u in manifest["units"] if u["status"] != "ok"]
    assert [u["unit"] for u in failed] == ["things-eeg2-sub-02-test"]
    assert "ValueError" in failed[0]["reason"] and manifest["totals"]["units_failed"] == 1
    assert brainmoe(["shards", "verify", str(out)]) == 1
    assert "unit things-eeg2-sub-02-test failed" in capsys.readouterr().err

    # Same inputs: the failed unit is tried again, not "up to date".
    assert brainmoe(args) == 1
    err = capsys.readouterr().err
    assert "nothing to do" not in err and "1 already done, 1 to build" in err

    victim.write_bytes(good)  # the download repaired: same size, same fingerprint
    assert brainmoe(args) == 0
    assert load_manifest(out)["totals"]["units_failed"] == 0
    assert brainmoe(["shards", "verify", str(out)]) == 0
    assert brainmoe(args) == 0 and "nothing to do" in capsys.readouterr().err


# ------------------------------------------------------------------- 3. one build per output folder


def test_second_build_into_one_folder_is_refused_and_a_killed_ones_lock_taken_over(tmp_path):
    out = tmp_path / "out"
    big = build_cmd(out, "synthetic?subjects=40&runs=2&duration_s=60")
    first = subprocess.Popen(
        big, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        lock = out / ".lock" / "build.lock"
        deadline = time.monotonic() + 300
        while not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
            assert first.poll() is None, "the first build ended before it held the lock"
            assert time.monotonic() < deadline, "the first build never took the lock"
            time.sleep(0.1)

        second = subprocess.run(big, capture_output=True, text=True, timeout=300)
        assert first.poll() is None, "the first build finished: nothing was contended"
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"host {socket.gethostname()}, pid {first.pid}" in second.stderr
        assert "being built by another build" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # killed mid-build: its lock file stays behind
        first.wait()
    assert json.loads(lock.read_text())["pid"] == first.pid

    small = "synthetic?subjects=2&runs=1&duration_s=40"
    third = subprocess.run(build_cmd(out, small), capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert f"left by a build that is gone (host {socket.gethostname()}, pid {first.pid}" in (
        third.stderr
    )
    assert verify(out) == [] and not list(out.glob("*.partial"))
    assert load_manifest(out)["totals"]["samples"] == 20
    assert lock.read_text() == "", "a finished build leaves the lock free"


def test_a_shard_no_unit_report_names_is_removed_by_the_next_build(tmp_path):
    """A build killed between a shard's rename and its unit report leaves a finished `.tar`
    that no report names (seen in CI: the killed build above left `synthetic-sub-007-00000.tar`
    behind and the next build's folder failed verify). Any next build removes it."""
    out = tmp_path / "out"
    spec = "synthetic?subjects=2&runs=1&duration_s=40"
    config = load_config(BuildConfig, sources=[spec], out=str(out), workers=0)
    build(config)
    shard = sorted(out.glob("*.tar"))[0]
    orphan = out / shard.name.replace("sub-001", "sub-007")
    orphan.write_bytes(shard.read_bytes())
    assert verify(out) == [f"{orphan.name}: not in the manifest"]

    build(config)  # up to date otherwise: only the orphan goes
    assert not orphan.exists() and verify(out) == []
    assert load_manifest(out)["totals"]["samples"] == 20


# ------------------------------------------------------------------------------ 4. .nedf files


def test_nedf_is_read(tmp_path):
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("defusedxml") for d in deps), "MNE's NEDF reader needs defusedxml"
    folder = tmp_path / "in"
    folder.mkdir()
    data = eeg_array(8, 20, 500.0)
    write_nedf(folder / "rec.nedf", data, 500, CHANNELS[:8])
    raw = read_raw(folder / "rec.nedf")
    assert raw.ch_names[:8] == CHANNELS[:8]
    assert np.abs(raw.get_data()[:8] - data).max() < 1e-7  # one count is 0.05 uV

    out = str(tmp_path / "o")
    rec = by_file(build(load_config(BuildConfig, sources=[f"files:{folder}"], out=out, workers=0)))
    rec = rec["rec.nedf"]
    assert rec["status"] == "ok", rec["reason"]
    assert rec["n_channels"] == 8 and rec["windows"] == 5


# --------------------------------------------------------------------------- 5. Ray on loopback


def _listening(procs: list[psutil.Process]) -> list[tuple[str, str, int]]:
    found = []
    for proc in procs:
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    found.append((proc.name(), conn.laddr.ip, conn.laddr.port))
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
def test_local_ray_of_a_build_listens_on_loopback_only(tmp_path, monkeypatch):
    ray = pytest.importorskip("ray")
    assert not ray.is_initialized()
    # Ray's workers inherit the hooks: a reader dies in its child (the task lives), and a
    # worker is killed outright on die.fif, on both of its tries.
    monkeypatch.setenv("PYTHONPATH", crash_env(tmp_path)["PYTHONPATH"])
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    folder = tmp_path / "in"
    for seed, name in enumerate(["a.fif", "crash.fif", "die.fif"]):
        write_raw(folder / name, eeg_array(12, 12, 200.0, seed=seed), 200.0, CHANNELS)
    out = tmp_path / "o"
    config = load_config(
        BuildConfig, sources=[f"files:{folder}"], out=str(out), workers=1, task_retries=1
    )
    try:
        manifest = build(config)  # starts the local Ray (init_local_ray) and leaves it up
        assert ray.is_initialized()
        me = psutil.Process()
        listeners = _listening([me, *me.children(recursive=True)])
    finally:
        ray.shutdown()
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners
    loopback = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    exposed = [entry for entry in listeners if entry[1] not in loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"

    rec = by_file(manifest)
    assert rec["crash.fif"]["reason"] == "reader crashed: signal 11 (SIGSEGV)"
    assert rec["a.fif"]["windows"] == 3
    # Before: WorkerCrashedError out of build(), no manifest. Now: that unit failed, named.
    (lost,) = [u for u in manifest["units"] if u["status"] != "ok"]
    assert lost["unit"] == "files-in-die-fif" and "WorkerCrashedError" in lost["reason"]
    assert (out / "manifest.json").exists() and any("failed" in p for p in verify(out))
