"""Bad channels are flagged per recording at the build, recorded, and masked by the reader."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

import numpy as np
import pytest
import scipy.signal

from shards.bad_channels import flag_bad_channels
from shards.build import BuildConfig, build
from shards.config import load_config
from shards.preprocess import PreprocessConfig, preprocess
from shards.reader import ReaderConfig, make_loader
from shards.recording import Provenance, Recording, Rejected
from shards.sample import collate_eeg, decode_sample
from shards.sources import get_source
from shards.writer import encode_sample

SFREQ = 200.0
EEGMMIDB = "MNE-eegbci-data/files/eegmmidb/1.0.0"
NAMES = [f"E{i:02d}" for i in range(32)]


def synthetic_eeg(seconds: float = 60.0, seed: int = 0) -> np.ndarray:
    """`[C, T]` uV: 4 smooth sources mixed into 32 channels plus a little sensor noise, so the
    channels correlate as scalp EEG does."""
    rng = np.random.default_rng(seed)
    n_t = int(seconds * SFREQ)
    b, a = scipy.signal.butter(4, [1.0, 30.0], btype="bandpass", fs=SFREQ)
    sources = scipy.signal.filtfilt(b, a, rng.standard_normal((4, n_t)), axis=-1)
    mixing = rng.uniform(0.5, 1.5, (len(NAMES), 4))
    x = mixing @ sources
    x = 20.0 * x / x.std(axis=1, keepdims=True)
    return x + 3.0 * rng.standard_normal(x.shape)


def test_clean_recording_flags_nothing_and_broken_channels_are_flagged():
    cfg = PreprocessConfig()
    x = synthetic_eeg()
    assert flag_bad_channels(x, SFREQ, NAMES, cfg) == {}

    broken = x.copy()
    broken[5] = 10 * broken[5].std() * np.random.default_rng(1).standard_normal(x.shape[1])
    broken[9] *= 0.02  # flat-ish: a real signal, but 50x too small (std still > flat_uv)
    assert broken[9].std() > cfg.flat_uv
    assert flag_bad_channels(broken, SFREQ, NAMES, cfg) == {
        "E05": "uncorrelated",
        "E09": "low-amplitude",
    }
    assert flag_bad_channels(broken, SFREQ, NAMES, replace(cfg, bad_channels="keep")) == {}


def test_flag_bad_channels_checks_its_input():
    with pytest.raises(ValueError, match="32 names"):
        flag_bad_channels(synthetic_eeg()[:5], SFREQ, NAMES, PreprocessConfig())
    with pytest.raises(ValueError, match="bad_channels"):
        PreprocessConfig(bad_channels="drop").validate()


def test_preprocess_records_flags_and_a_flagged_channel_costs_no_windows():
    x = synthetic_eeg(seed=2)
    # A channel whose noise peaks past max_abs_uv: unflagged it would reject every window.
    x[3] = 500.0 * np.random.default_rng(3).standard_normal(x.shape[1])
    rec = Recording(x, SFREQ, NAMES, "uV", Provenance("synthetic", "1"))
    flagged = preprocess(rec, PreprocessConfig())
    kept = preprocess(rec, PreprocessConfig(bad_channels="keep"))
    assert flagged.bad_channels == {"E03": "uncorrelated"}
    assert kept.bad_channels == {}
    assert len(flagged.windows) == 15 and not flagged.rejected
    assert kept.windows == [] and kept.rejected == {"amplitude": 15}
    # The flagged channel's data are still in the windows.
    assert flagged.windows[0].data.shape[0] == len(NAMES)
    assert flagged.windows[0].data[3].std() > 100


def _sample(key: str, n_ch: int, bad: list[str] | None) -> dict:
    names = NAMES[:n_ch]
    meta = {"ch_names": names, "sfreq": SFREQ, "n_samples": 400}
    if bad is not None:
        meta["bad_channels"] = bad
    eeg = np.arange(n_ch * 400, dtype=np.float32).reshape(n_ch, 400) % 97
    return decode_sample(encode_sample(key, eeg, meta))


def test_reader_masks_flagged_channels_but_keeps_their_data():
    batch = collate_eeg([_sample("a", 6, ["E01", "E04"]), _sample("b", 4, None)])
    assert batch["channel_mask"].tolist() == [
        [True, False, True, True, False, True],
        [True, True, True, True, False, False],
    ]
    assert batch["bad_channels"] == [["E01", "E04"], []]
    assert float(batch["eeg"][0, 4].abs().sum()) > 0  # flagged, not zeroed
    with pytest.raises(ValueError, match="bad_channels"):
        _sample("c", 4, ["FT8"])


def test_ft8_flagged_in_every_s004_run_and_few_flags_elsewhere(physionet):
    cfg = PreprocessConfig()
    flags: dict[str, list[dict[str, str]]] = defaultdict(list)
    for subject in ("S001", "S002", "S003", "S004", "S005"):
        source = get_source(f"files:{physionet / EEGMMIDB / subject}")
        for unit in source.units():
            for rec in source.load(unit):
                assert not isinstance(rec, Rejected), rec.reason
                flags[subject].append(preprocess(rec, cfg).bad_channels)
    counts = {
        s: f"{sum(map(len, f))} flags / {len(f)} recordings ({sum(map(len, f)) / len(f):.2f})"
        for s, f in flags.items()
    }
    print("bad channels per subject:", counts)
    assert len(flags["S004"]) == 7
    assert all("FT8" in f for f in flags["S004"]), (flags["S004"], counts)
    others = [f for s in ("S001", "S002", "S003", "S005") for f in flags[s]]
    assert len(others) == 42
    assert sum(map(len, others)) / len(others) <= 3, counts
    assert all(sum(map(len, flags[s])) / len(flags[s]) <= 3 for s in flags), counts


def test_build_records_flags_in_manifest_and_samples(tmp_path, physionet):
    spec = f"files:{physionet / EEGMMIDB / 'S004'}?pattern=S004R03.edf"
    out = tmp_path / "corpus"
    manifest = build(load_config(BuildConfig, None, [], sources=[spec], out=str(out), workers=0))
    (rec,) = manifest["recordings"]
    assert rec["bad_channels"] == {"FT8": "uncorrelated"}
    batch = next(iter(make_loader(str(out), ReaderConfig(batch_size=4, num_workers=0))))
    ft8 = batch["ch_names"][0].index("FT8")
    assert batch["bad_channels"] == [["FT8"]] * 4
    assert batch["meta"][0]["bad_channels"] == ["FT8"]
    assert not batch["channel_mask"][:, ft8].any()
    assert int(batch["channel_mask"][0].sum()) == len(batch["ch_names"][0]) - 1


def test_inference_windows_of_a_file_mask_its_flagged_channels(physionet):
    """`brainmoe generate --eeg FILE` builds the same sample type as the reader, flags included."""
    from finetune.inputs import windows_from_file

    samples = windows_from_file(physionet / EEGMMIDB / "S004" / "S004R04.edf", max_windows=3)
    assert [s["bad_channels"] for s in samples] == [["FT8"]] * 3
    batch = collate_eeg(samples)
    ft8 = samples[0]["ch_names"].index("FT8")
    assert not batch["channel_mask"][:, ft8].any()
    assert batch["channel_mask"].sum(1).tolist() == [63, 63, 63]
