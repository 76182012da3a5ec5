"""The bids: source: datasets written by MNE-BIDS' own writer, read back with their sidecars.

On real EEG (EEGMMIDB runs turned into a BIDS dataset) a `bids:` build must give the windows
of a `files:` build of the same EDF files, minus the channel channels.tsv marks bad, plus the
events and the participants.tsv row; on small synthetic datasets, the filters, the errors, the
fingerprints and `derivative=`.
"""

from __future__ import annotations

import datetime
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shards.recording import Recording
from shards.sources import get_source
from tests.eeg_files import CHANNELS, eeg_array
from tests.test_build import run_build

EEGMMIDB = "MNE-eegbci-data/files/eegmmidb/1.0.0"
# (EEGMMIDB folder, run, sex, hand, birthday): two subjects, one left/right-fist run each.
RUNS = [
    ("S001", 3, 1, 1, datetime.date(1980, 1, 1)),  # male, right-handed -> age 29 in 2009
    ("S002", 4, 2, 2, datetime.date(1990, 1, 1)),  # female, left-handed -> age 19
]
BAD = "Cz.."  # marked bad in S001's channels.tsv; "Cz" in the shards


def write_eegmmidb_bids(root: Path, folder: Path) -> Path:
    """The RUNS as a BIDS dataset: the EDF files copied as they are by write_raw_bids, their
    T0/T1/T2 annotations as events.tsv, subject info as participants.tsv, BAD marked bad."""
    import mne
    import mne_bids

    for subject, run, sex, hand, birthday in RUNS:
        raw = mne.io.read_raw_edf(folder / subject / f"{subject}R{run:02d}.edf", verbose="error")
        raw.info["line_freq"] = 60.0  # recorded in the USA
        raw.info["subject_info"] = {"sex": sex, "hand": hand, "birthday": birthday}
        path = mne_bids.BIDSPath(
            subject=subject[1:], task="lrfist", run=run, root=root, datatype="eeg"
        )
        mne_bids.write_raw_bids(raw, path, overwrite=True, verbose="error")
    first = mne_bids.BIDSPath(
        subject="001",
        task="lrfist",
        run=3,
        root=root,
        datatype="eeg",
        suffix="eeg",
        extension=".edf",
    )
    mne_bids.mark_channels(
        first, ch_names=[BAD], status="bad", descriptions=["bridged"], verbose="error"
    )
    return root


def write_synthetic_bids(
    root: Path, subjects=("01", "02"), runs=("1", "2"), seconds: float = 24.0, **kw
) -> Path:
    """A small BIDS dataset of 12-channel synthetic EEG (BrainVision) with left/right events
    every 4 s; `kw` go to BIDSPath (e.g. description= for a derivative)."""
    import mne
    import mne_bids

    sfreq = 200.0
    for i, subject in enumerate(subjects):
        for j, run in enumerate(runs):
            info = mne.create_info(CHANNELS, sfreq, ch_types="eeg")
            raw = mne.io.RawArray(eeg_array(len(CHANNELS), seconds, sfreq, seed=10 * i + j), info)
            raw.set_meas_date(datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC))
            raw.info["line_freq"] = 50.0
            raw.info["subject_info"] = {"sex": 1 + i % 2, "birthday": datetime.date(1990 - i, 1, 1)}
            onsets = np.arange(1.0, seconds - 3, 4.0)
            labels = ["left" if k % 2 == 0 else "right" for k in range(len(onsets))]
            raw.set_annotations(mne.Annotations(onsets, 2.0, labels))
            path = mne_bids.BIDSPath(
                subject=subject, task="imagery", run=run, root=root, datatype="eeg", **kw
            )
            mne_bids.write_raw_bids(
                raw,
                path,
                format="BrainVision",
                allow_preload=True,
                overwrite=True,
                verbose="error",
            )
    return root


def _samples(out: Path) -> list[tuple[np.ndarray, dict]]:
    samples = []
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(members):
                if name.endswith(".json"):
                    key = name[: -len(".json")]
                    meta = json.loads(tar.extractfile(members[name]).read())
                    raw = tar.extractfile(members[f"{key}.eeg.npy"]).read()
                    samples.append((np.load(io.BytesIO(raw), allow_pickle=False), meta))
    return samples


def _by_run(samples, name_of) -> dict[tuple[str, int], tuple[np.ndarray, dict]]:
    return {
        (name_of(meta["provenance"]), meta["window"]["index"]): (x, meta) for x, meta in samples
    }


@pytest.mark.shared_data
def test_bids_build_gives_the_files_windows_with_the_sidecars(tmp_path, physionet):
    folder = physionet / EEGMMIDB
    root = write_eegmmidb_bids(tmp_path / "eegmmidb-bids", folder)
    # the BIDS sidecar says 60 Hz, files: knows no line frequency: one notch for both builds
    same = ["preprocess.notch=[60.0]"]
    bids = run_build(tmp_path / "from-bids", f"bids:{root}", overrides=same)
    files = run_build(
        tmp_path / "from-files",
        *(f"files:{folder / s}?pattern={s}R{r:02d}.edf" for s, r, *_ in RUNS),
        overrides=same,
    )
    assert bids["totals"]["units_failed"] == 0 and files["totals"]["units_failed"] == 0

    # participants.tsv and channels.tsv are in the manifest's provenance of each recording
    recs = {r["provenance"]["subject"]: r for r in bids["recordings"]}
    assert sorted(recs) == ["001", "002"] and all(r["status"] == "ok" for r in recs.values())
    first, second = recs["001"]["provenance"], recs["002"]["provenance"]
    assert (first["session"], first["run"]) == ("0", "lrfist-3")
    assert first["entities"] == {"subject": "001", "task": "lrfist", "run": "3"}
    assert {k: first["participant"][k] for k in ("age", "sex", "hand")} == {
        "age": 29,
        "sex": "M",
        "hand": "R",
    }
    assert {k: second["participant"][k] for k in ("age", "sex", "hand")} == {
        "age": 19,
        "sex": "F",
        "hand": "L",
    }
    assert first["excluded_channels"] == {BAD: "bridged"} and second["excluded_channels"] == {}
    assert (recs["001"]["n_channels"], recs["002"]["n_channels"]) == (63, 64)

    from_bids = _by_run(
        _samples(tmp_path / "from-bids"),
        lambda p: f"S{p['subject']}R{int(p['entities']['run']):02d}",
    )
    from_files = _by_run(_samples(tmp_path / "from-files"), lambda p: Path(p["file"]).stem)
    common = sorted(set(from_bids) & set(from_files))
    # ~31 windows per run; a window rejected for the bad channel's amplitude may differ
    assert len(common) >= 0.9 * max(len(from_bids), len(from_files)) >= 0.9 * 60, (
        len(from_bids),
        len(from_files),
    )
    labelled = 0
    for key in common:
        x_bids, m_bids = from_bids[key]
        x_files, m_files = from_files[key]
        keep = [i for i, n in enumerate(m_files["ch_names"]) if n in m_bids["ch_names"]]
        assert [m_files["ch_names"][i] for i in keep] == m_bids["ch_names"]
        dropped = set(m_files["ch_names"]) - set(m_bids["ch_names"])
        assert dropped == ({"Cz"} if key[0] == "S001R03" else set()), (key, dropped)
        excluded = m_bids["provenance"]["excluded_channels"]
        assert excluded == ({BAD: "bridged"} if key[0] == "S001R03" else {})
        np.testing.assert_allclose(
            x_bids.astype(np.float32), x_files[keep].astype(np.float32), rtol=1e-3, atol=1e-2
        )
        # events.tsv's trial_type, onset and duration: the events the EDF annotations gave
        assert m_bids["events"] == m_files["events"] and m_bids["label"] == m_files["label"]
        assert m_bids["provenance"]["participant"]["sex"] in ("M", "F")
        labelled += m_bids["label"] in ("T1", "T2")
    assert labelled >= len(common) // 3  # about half the time is a left/right fist trial


def test_units_filters_and_fingerprints(tmp_path):
    import mne_bids

    root = write_synthetic_bids(tmp_path / "ds")
    source = get_source(f"bids:{root}")
    units = source.units()
    assert [u.id for u in units] == [
        f"bids-ds-sub-{s}_task-imagery_run-{r}_eeg-vhdr" for s in ("01", "02") for r in ("1", "2")
    ]
    assert [u.fingerprint for u in units] == [
        u.fingerprint for u in get_source(f"bids:{root}").units()
    ]
    picked = get_source(f"bids:{root}?subjects=sub-02&runs=2&tasks=imagery").units()
    assert [u.id for u in picked] == [units[3].id]

    # Marking a channel bad changes that recording's fingerprint only, and excludes it;
    path = mne_bids.BIDSPath(
        subject="01",
        task="imagery",
        run="1",
        root=root,
        datatype="eeg",
        suffix="eeg",
        extension=".vhdr",
    )
    mne_bids.mark_channels(
        path, ch_names=["O1"], status="bad", descriptions=["n/a"], verbose="error"
    )
    # ... and editing events.tsv changes that one's, and its labels.
    events = root / "sub-01" / "eeg" / "sub-01_task-imagery_run-2_events.tsv"
    events.write_text(events.read_text().replace("left", "tongue"))
    again = source.units()
    changed = [u.fingerprint != v.fingerprint for u, v in zip(units, again, strict=True)]
    assert changed == [True, True, False, False]
    (edited,) = source.load(again[1])
    assert [e.label for e in edited.events[:2]] == ["tongue", "right"]
    (rec,) = source.load(again[0])
    assert isinstance(rec, Recording)
    assert "O1" not in rec.ch_names and rec.data.shape == (len(CHANNELS) - 1, 24 * 200)
    assert rec.provenance.excluded_channels == {"O1": "status=bad"}
    assert rec.line_freq == 50.0
    assert [e.label for e in rec.events[:3]] == ["left", "right", "left"]
    assert [(e.onset, e.duration) for e in rec.events[:2]] == [(1.0, 2.0), (5.0, 2.0)]
    assert rec.provenance.participant["age"] == 30 and rec.provenance.participant["sex"] == "M"


def test_derivative_reads_the_preprocessed_files(tmp_path):
    root = write_synthetic_bids(tmp_path / "ds", subjects=("01",), runs=("1",))
    write_synthetic_bids(
        root / "derivatives" / "clean",
        subjects=("01",),
        runs=("1",),
        seconds=12.0,
        description="clean",
    )
    # without a participants.tsv of its own, the raw dataset's is read
    (root / "derivatives" / "clean" / "participants.tsv").unlink()
    (raw_unit,) = get_source(f"bids:{root}").units()  # derivatives/ is not raw data
    assert raw_unit.id == "bids-ds-sub-01_task-imagery_run-1_eeg-vhdr"
    source = get_source(f"bids:{root}?derivative=clean")
    (unit,) = source.units()
    assert unit.id == "bids-ds-clean-sub-01_task-imagery_run-1_desc-clean_eeg-vhdr"
    (rec,) = source.load(unit)
    assert rec.data.shape == (len(CHANNELS), 12 * 200)  # the derivative, not the 24 s raw run
    assert rec.provenance.dataset == "ds-clean"
    assert rec.provenance.entities["description"] == "clean"
    assert rec.provenance.participant["sex"] == "M"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("?subjects=07", r"subjects \['07'\] not in .* \(it has 01, 02\)"),
        ("?tasks=rest", r"tasks \['rest'\] not in .* \(it has imagery\)"),
        ("?runs=3", r"runs \['3'\] not in .* \(it has 1, 2\)"),
        ("?sessions=1", "it has no session entity"),
        ("?derivative=clean", "no derivative 'clean'.* has: no derivatives"),
        ("?bogus=1", r"unknown parameter\(s\) \['bogus'\]"),
        ("?subjects=,", "subjects= in source spec .* is empty"),
    ],
)
def test_bad_specs_fail_before_loading(tmp_path, query, message):
    root = write_synthetic_bids(tmp_path / "ds", runs=("1", "2"), seconds=8.0)
    with pytest.raises(ValueError, match=message):
        get_source(f"bids:{root}{query}").units()


def test_not_a_bids_dataset(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a BIDS dataset .*files:"):
        get_source(f"bids:{tmp_path / 'plain'}")
    with pytest.raises(ValueError, match="is not a folder"):
        get_source(f"bids:{tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="needs a dataset folder"):
        get_source("bids")
