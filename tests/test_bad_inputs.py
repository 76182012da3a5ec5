"""Bad inputs are cleaned or rejected with a reason in the manifest; the build goes on."""

from __future__ import annotations

import shutil

import numpy as np

from shards.build import BuildConfig, build
from shards.config import load_config
from shards.preprocess import PreprocessConfig, preprocess
from shards.recording import Provenance, Recording
from tests.eeg_files import CHANNELS, eeg_array, write_raw


def build_folder(folder, out):
    config = load_config(
        BuildConfig, sources=[f"files:{folder}?dataset=bad"], out=str(out), workers=0
    )
    manifest = build(config)
    by_file = {r["provenance"]["file"]: r for r in manifest["recordings"]}
    return manifest, by_file


def test_every_bad_recording_is_accounted_for(tmp_path, mne_testing):
    folder = tmp_path / "in"
    sfreq = 250.0
    write_raw(folder / "good.fif", eeg_array(12, 60, sfreq), sfreq, CHANNELS)

    with_nan = eeg_array(12, 60, sfreq, seed=1)
    with_nan[3, int(10 * sfreq) : int(11 * sfreq)] = np.nan  # one second inside window 2
    write_raw(folder / "nan.fif", with_nan, sfreq, CHANNELS)

    flat = eeg_array(12, 60, sfreq, seed=2)
    flat[5] = 0.0  # a disconnected electrode
    write_raw(folder / "flat.fif", flat, sfreq, CHANNELS)

    odd_names = CHANNELS[:8] + ["Foo1", "LeftThing", "xyz", "Q9"]
    write_raw(folder / "unknown.fif", eeg_array(12, 60, sfreq, seed=3), sfreq, odd_names)

    write_raw(folder / "short.fif", eeg_array(12, 2.5, sfreq, seed=4), sfreq, CHANNELS)

    # a real EDF cut in half, and a file of garbage with an EDF name
    real_edf = mne_testing / "EDF" / "test_reduced.edf"
    blob = real_edf.read_bytes()
    (folder / "truncated.edf").write_bytes(blob[: len(blob) // 2])
    (folder / "garbage.edf").write_bytes(b"not an edf at all" * 100)
    shutil.copy(mne_testing / "BDF" / "multiple_annotation_chans.bdf", folder / "real.bdf")

    manifest, rec = build_folder(folder, tmp_path / "out")

    assert rec["good.fif"]["status"] == "ok" and rec["good.fif"]["windows"] == 15
    assert rec["real.bdf"]["status"] == "ok" and rec["real.bdf"]["windows"] > 50

    assert rec["nan.fif"]["status"] == "ok"
    assert rec["nan.fif"]["rejected_windows"] == {"nonfinite": 1}, rec["nan.fif"]
    assert rec["nan.fif"]["windows"] == 14

    assert rec["flat.fif"]["dropped_channels"] == {"C4": "flat"}
    assert rec["flat.fif"]["n_channels"] == 11 and rec["flat.fif"]["windows"] == 15

    assert rec["unknown.fif"]["status"] == "ok" and rec["unknown.fif"]["n_channels"] == 12
    assert sorted(rec["unknown.fif"]["notes"]["unknown_channels"]) == sorted(odd_names[8:])

    assert rec["short.fif"]["status"] == "rejected"
    assert "shorter than one window" in rec["short.fif"]["reason"]

    assert rec["garbage.edf"]["status"] == "rejected"
    assert rec["garbage.edf"]["reason"].startswith("unreadable")
    # MNE reads the 2 s of whole records the truncated 6 s EDF still holds: too short to use.
    assert rec["truncated.edf"]["status"] == "rejected", rec["truncated.edf"]
    assert "shorter than one window" in rec["truncated.edf"]["reason"]
    assert manifest["totals"]["units_failed"] == 0
    assert manifest["totals"]["recordings"] == 8

    # unknown channels reach the shard flagged, without positions
    from shards.inspect import read_sample

    key = next(k for k in _keys(tmp_path / "out") if k.startswith("files-bad-unknown"))
    _, meta = read_sample(tmp_path / "out", key)
    flags = dict(zip(meta["ch_names"], meta["ch_known"], strict=True))
    assert flags["Foo1"] is False and flags["Fp1"] is True
    assert meta["ch_pos"][meta["ch_names"].index("Foo1")] is None


def _keys(out):
    import tarfile

    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for name in tar.getnames():
                if name.endswith(".json"):
                    yield name[: -len(".json")]


def test_volts_declared_as_microvolts_are_detected():
    volts = eeg_array(12, 20, 200.0)  # values ~1e-5
    rec = Recording(volts, 200.0, CHANNELS, "uV", Provenance("t", "1"))
    processed = preprocess(rec, PreprocessConfig())
    assert processed.notes["unit_detected"] == "V"
    assert "amplitude says V" in processed.notes["unit_warning"]
    amplitude = np.median([w.data.std() for w in processed.windows])
    assert 3 < amplitude < 100, f"expected tens of uV after conversion, got {amplitude}"
    # and the same numbers declared correctly give the same windows
    same = preprocess(
        Recording(volts, 200.0, CHANNELS, "V", Provenance("t", "1")), PreprocessConfig()
    )
    assert np.array_equal(same.windows[0].data, processed.windows[0].data)


def test_clipped_and_extreme_windows_are_rejected_with_reasons():
    data = eeg_array(12, 40, 200.0) * 1e6  # uV
    data[2, 200:1200] = data[2].max()  # amplifier saturation in window 0..1
    data[7, 4200:4210] += 5000.0  # a 5 mV spike in window 5
    rec = Recording(data, 200.0, CHANNELS, "uV", Provenance("t", "1"))
    processed = preprocess(rec, PreprocessConfig())
    assert processed.rejected["clipped"] >= 1
    assert processed.rejected["amplitude"] >= 1
    assert len(processed.windows) + sum(processed.rejected.values()) == 10
