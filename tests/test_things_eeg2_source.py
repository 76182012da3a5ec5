"""THINGS-EEG2 source on tiny files of the released layout (np.save of dicts)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from shards.recording import Recording
from shards.sources import Spec, get_source
from shards.sources.things_eeg2 import ThingsEEG2Source, load_pickled_npy

N_TRAIN, TRAIN_REPS = 30, 4  # the real release: 16540 x 4
N_TEST, TEST_REPS = 3, 6  # the real release: 200 x 80
C, T = 63, 100
CH_NAMES = [f"Ch{i}" for i in range(C)]
TIMES = np.linspace(-0.2, 0.79, T)  # 100 Hz


def _eeg_dict(n_images: int, reps: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "preprocessed_eeg_data": rng.standard_normal((n_images, reps, C, T)),
        "ch_names": list(CH_NAMES),
        "times": TIMES.copy(),
    }


def _metadata() -> dict:
    # Concepts are "NNNNN_name", 10 images per training concept, one per test concept.
    train_concepts = [f"{i // 10 + 1:05d}_thing_{i // 10}" for i in range(N_TRAIN)]
    train_files = [f"thing_{i // 10}_{i % 10:02d}b.jpg" for i in range(N_TRAIN)]
    test_concepts = [f"{1000 + i:05d}_probe_{i}" for i in range(N_TEST)]
    test_files = [f"probe_{i}_01s.jpg" for i in range(N_TEST)]
    return {
        "train_img_concepts": np.array(train_concepts),
        "train_img_files": np.array(train_files),
        "test_img_concepts": test_concepts,
        "test_img_files": test_files,
    }


def _make(root: Path, subjects=(1, 2), metadata: bool = True) -> Path:
    for s in subjects:
        sub = root / f"sub-{s:02d}"
        sub.mkdir(parents=True)
        np.save(sub / "preprocessed_eeg_training.npy", _eeg_dict(N_TRAIN, TRAIN_REPS, s))
        np.save(sub / "preprocessed_eeg_test.npy", _eeg_dict(N_TEST, TEST_REPS, 100 + s))
    if metadata:
        (root / "image_set").mkdir()
        np.save(root / "image_set" / "image_metadata.npy", _metadata())
    return root


def _source(spec: str) -> ThingsEEG2Source:
    source = get_source(spec)
    assert isinstance(source, ThingsEEG2Source)
    return source


def _unit(source: ThingsEEG2Source, unit_id: str):
    return next(u for u in source.units() if u.id == unit_id)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return _make(tmp_path / "things")


def test_units_ids_and_fingerprints(folder: Path) -> None:
    units = _source(f"things-eeg2:{folder}").units()
    assert [u.id for u in units] == [
        "things-eeg2-sub-01-training",
        "things-eeg2-sub-01-test",
        "things-eeg2-sub-02-training",
        "things-eeg2-sub-02-test",
    ]
    assert len({u.fingerprint for u in units}) == 4
    again = _source(f"things-eeg2:{folder}").units()
    assert [u.fingerprint for u in again] == [u.fingerprint for u in units]
    # A parameter that changes the output changes the fingerprint; the ids stay.
    chunked = _source(f"things-eeg2:{folder}?chunk=7").units()
    assert [u.id for u in chunked] == [u.id for u in units]
    assert all(a.fingerprint != b.fingerprint for a, b in zip(chunked, units, strict=True))
    assert units[0].payload["metadata"] == str(folder / "image_set" / "image_metadata.npy")


def test_subject_and_split_filtering(folder: Path) -> None:
    units = _source(f"things-eeg2:{folder}?subjects=2&splits=test").units()
    assert [u.id for u in units] == ["things-eeg2-sub-02-test"]
    # Selecting units does not invalidate the work already done for them.
    everything = {u.id: u.fingerprint for u in _source(f"things-eeg2:{folder}").units()}
    assert units[0].fingerprint == everything["things-eeg2-sub-02-test"]
    with pytest.raises(ValueError, match=r"subject\(s\) \[3\].*available: \[1, 2\]"):
        _source(f"things-eeg2:{folder}?subjects=1,3").units()


def test_training_chunks_trials_and_labels(folder: Path) -> None:
    source = _source(f"things-eeg2:{folder}?subjects=1&chunk=8")
    out = list(source.load(_unit(source, "things-eeg2-sub-01-training")))
    assert all(isinstance(r, Recording) for r in out)
    # 30 images in chunks of 8 images, each image with all 4 repetitions.
    assert [r.data.shape for r in out] == [(32, C, T)] * 3 + [(24, C, T)]
    assert [r.provenance.run for r in out] == ["chunk000", "chunk001", "chunk002", "chunk003"]
    rec = out[1]
    assert rec.data.dtype == np.float32
    assert rec.epoched and rec.unit == "auto" and rec.extra["whitened"] is True
    assert rec.sfreq == pytest.approx(100.0)
    assert rec.ch_names == CH_NAMES
    prov = rec.provenance
    assert (prov.dataset, prov.subject, prov.session) == ("things-eeg2", "01", "training")
    assert prov.file == str(folder / "sub-01" / "preprocessed_eeg_training.npy")

    raw = _eeg_dict(N_TRAIN, TRAIN_REPS, 1)["preprocessed_eeg_data"]
    # Epoch 5 of chunk 1 is image 8 + 5 // 4 = 9, repetition 1.
    np.testing.assert_allclose(rec.data[5], raw[9, 1].astype(np.float32))
    trial = rec.trials[5]
    assert trial.label == "thing_0"
    assert trial.stimulus_id == "thing_0_09b.jpg"
    assert trial.extra == {
        "split": "training",
        "image_index": 9,
        "concept_index": 0,
        "repetition": 1,
        "tmin": pytest.approx(-0.2),
    }
    assert out[2].trials[0].extra["image_index"] == 16
    assert out[2].trials[0].label == "thing_1"
    all_trials = [t for r in out for t in r.trials]
    assert len(all_trials) == N_TRAIN * TRAIN_REPS
    assert [t.extra["image_index"] for t in all_trials[::TRAIN_REPS]] == list(range(N_TRAIN))


def test_test_split_concepts(folder: Path) -> None:
    source = _source(f"things-eeg2:{folder}?subjects=2&splits=test")
    (rec,) = list(source.load(source.units()[0]))
    assert rec.data.shape == (N_TEST * TEST_REPS, C, T)
    assert rec.provenance.session == "test"
    assert [t.label for t in rec.trials[::TEST_REPS]] == ["probe_0", "probe_1", "probe_2"]
    last = rec.trials[-1]
    assert last.stimulus_id == "probe_2_01s.jpg"
    assert last.extra["concept_index"] == 2 and last.extra["repetition"] == TEST_REPS - 1


def test_without_metadata_labels_are_indices(tmp_path: Path) -> None:
    folder = _make(tmp_path / "things", subjects=(1,), metadata=False)
    source = _source(f"things-eeg2:{folder}?chunk=100")
    units = source.units()
    assert all(u.payload["metadata"] is None for u in units)
    (train,) = list(source.load(units[0]))
    trial = train.trials[4 * 23 + 2]  # image 23, repetition 2
    assert trial.label == "concept_0002"
    assert trial.stimulus_id == "things-eeg2:training:00023"
    assert trial.extra["concept_index"] == 2
    (test,) = list(source.load(units[1]))
    assert test.trials[-1].label == "concept_0002"
    assert test.trials[-1].stimulus_id == "things-eeg2:test:00002"


def test_metadata_param_and_root_location(tmp_path: Path, folder: Path) -> None:
    meta = _metadata()
    meta["train_img_files"] = [f"other_{i}.jpg" for i in range(N_TRAIN)]
    np.save(tmp_path / "elsewhere.npy", meta)
    source = _source(
        f"things-eeg2:{folder}?subjects=1&splits=training&metadata={tmp_path}/elsewhere.npy"
    )
    (unit,) = source.units()
    assert next(source.load(unit)).trials[0].stimulus_id == "other_0.jpg"
    # <folder>/image_metadata.npy wins over <folder>/image_set/.
    np.save(folder / "image_metadata.npy", meta)
    (unit,) = _source(f"things-eeg2:{folder}?subjects=1&splits=training").units()
    assert unit.payload["metadata"] == str(folder / "image_metadata.npy")


def test_loading_is_deterministic(folder: Path) -> None:
    source = _source(f"things-eeg2:{folder}?subjects=1&splits=test&chunk=2")
    unit = source.units()[0]
    first, second = list(source.load(unit)), list(source.load(unit))
    assert len(first) == len(second) == 2
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a.data, b.data)
        assert a.trials == b.trials and a.provenance == b.provenance


# ------------------------------------------------------------------------- safety and errors


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _write_npy_object(path: Path, obj: object) -> None:
    """A .npy header claiming one pickled object, followed by an arbitrary pickle."""
    from numpy.lib import format as npy_format

    with path.open("wb") as fp:
        npy_format.write_array_header_1_0(fp, {"descr": "|O", "fortran_order": False, "shape": ()})
        pickle.dump(obj, fp, protocol=4)


def test_malicious_pickle_is_refused(tmp_path: Path, folder: Path) -> None:
    pwned = tmp_path / "pwned"
    bad = folder / "sub-01" / "preprocessed_eeg_training.npy"
    _write_npy_object(bad, {"preprocessed_eeg_data": _Exploit(pwned)})
    with pytest.raises(ValueError, match=r"refusing to load global (posix|os|nt)\.system"):
        load_pickled_npy(bad)
    # units() only reads the header; the worker's load() refuses before anything runs.
    source = _source(f"things-eeg2:{folder}?subjects=1&splits=training")
    (unit,) = source.units()
    with pytest.raises(ValueError, match=str(bad)):
        list(source.load(unit))
    assert not pwned.exists()


def test_malicious_metadata_is_refused_early(tmp_path: Path, folder: Path) -> None:
    pwned = tmp_path / "pwned"
    _write_npy_object(folder / "image_set" / "image_metadata.npy", [_Exploit(pwned)])
    with pytest.raises(ValueError, match="refusing to load global"):
        _source(f"things-eeg2:{folder}").units()
    assert not pwned.exists()


def test_safe_loader_reads_numpy_scalars_and_arrays(tmp_path: Path) -> None:
    obj = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "s": np.float64(2.5), "l": ["x"]}
    np.save(tmp_path / "ok.npy", obj)
    back = load_pickled_npy(tmp_path / "ok.npy")
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert back["s"] == 2.5 and back["l"] == ["x"]


def test_missing_folder_and_no_subjects(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        get_source(f"things-eeg2:{tmp_path / 'nope'}")
    with pytest.raises(ValueError, match="names no folder"):
        get_source("things-eeg2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no sub-XX folders"):
        get_source(f"things-eeg2:{tmp_path / 'empty'}").units()


def test_bad_params(folder: Path) -> None:
    with pytest.raises(ValueError, match="splits=train.*training, test"):
        get_source(f"things-eeg2:{folder}?splits=train")
    with pytest.raises(ValueError, match="chunk=0"):
        get_source(f"things-eeg2:{folder}?chunk=0")
    with pytest.raises(ValueError, match="metadata="):
        get_source(f"things-eeg2:{folder}?metadata=/no/such/file.npy")
    with pytest.raises(ValueError, match="unknown parameter"):
        get_source(f"things-eeg2:{folder}?subject=1")


def test_missing_split_file(folder: Path) -> None:
    (folder / "sub-02" / "preprocessed_eeg_test.npy").unlink()
    with pytest.raises(ValueError, match=r"preprocessed_eeg_test\.npy is missing.*splits="):
        _source(f"things-eeg2:{folder}").units()
    assert len(_source(f"things-eeg2:{folder}?splits=training").units()) == 2


def test_plain_array_file_is_rejected_in_units(folder: Path) -> None:
    path = folder / "sub-01" / "preprocessed_eeg_training.npy"
    np.save(path, np.zeros((N_TRAIN, TRAIN_REPS, C, T), np.float32))
    with pytest.raises(ValueError, match=r"plain float32 array of shape \(30, 4, 63, 100\)"):
        _source(f"things-eeg2:{folder}").units()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.pop("times"), r"lacks key\(s\) \['times'\]"),
        (lambda d: d.update(ch_names=CH_NAMES[:-1]), "62 ch_names for 63 channels"),
        (lambda d: d.update(times=TIMES[:50]), r"times is float64 of shape \(50,\)"),
        (
            lambda d: d.update(preprocessed_eeg_data=np.zeros((5, C, T))),
            "expected a 4-D array",
        ),
        (lambda d: d.update(times=TIMES[::-1].copy()), "not evenly spaced and increasing"),
    ],
)
def test_wrong_structure_is_a_clear_error(folder: Path, mutate, message: str) -> None:
    path = folder / "sub-01" / "preprocessed_eeg_test.npy"
    content = _eeg_dict(N_TEST, TEST_REPS, 0)
    mutate(content)
    np.save(path, content)
    source = _source(f"things-eeg2:{folder}?subjects=1&splits=test")
    with pytest.raises(ValueError, match=message) as info:
        list(source.load(source.units()[0]))
    assert str(path) in str(info.value)


def test_not_a_dict(folder: Path) -> None:
    path = folder / "sub-01" / "preprocessed_eeg_test.npy"
    np.save(path, np.array([1, 2], dtype=object))  # object array, but not 0-d
    with pytest.raises(ValueError, match="plain object array"):
        _source(f"things-eeg2:{folder}?subjects=1").units()
    _write_npy_object(path, [1, 2])
    source = _source(f"things-eeg2:{folder}?subjects=1&splits=test")
    with pytest.raises(ValueError, match="holds a list, expected the dict"):
        list(source.load(source.units()[0]))


def test_metadata_of_wrong_size_or_keys(tmp_path: Path, folder: Path) -> None:
    meta = _metadata()
    meta["train_img_concepts"] = meta["train_img_concepts"][:20]
    meta["train_img_files"] = meta["train_img_files"][:20]
    np.save(folder / "image_set" / "image_metadata.npy", meta)
    source = _source(f"things-eeg2:{folder}?subjects=1&splits=training")
    with pytest.raises(ValueError, match="lists 20 training images but .* holds 30"):
        list(source.load(source.units()[0]))
    del meta["test_img_files"]
    np.save(folder / "image_set" / "image_metadata.npy", meta)
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['test_img_files'\]"):
        _source(f"things-eeg2:{folder}").units()


def test_spec_parses_to_source(folder: Path) -> None:
    spec = f"things-eeg2:{folder}?subjects=1"
    source = ThingsEEG2Source.from_spec(spec, Spec.parse(spec))
    assert source.spec == spec and source.params.subjects == [1]


def test_files_written_by_numpy_1_load(tmp_path: Path) -> None:
    # The released files predate numpy 2, so their pickles name numpy.core.multiarray; numpy
    # 1.x's np.save wrote pickle protocol 3 (GLOBAL opcodes, module and name as text).
    obj = {"a": np.arange(4.0), "s": np.float32(1.5), "u": np.array(["x", "yz"])}
    blob = pickle.dumps(np.asanyarray(obj), protocol=3)
    assert b"numpy._core.multiarray\n" in blob
    blob = blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    path = tmp_path / "old.npy"
    _write_npy_object(path, None)
    with path.open("r+b") as fp:
        from numpy.lib import format as npy_format

        npy_format.read_magic(fp)
        npy_format.read_array_header_1_0(fp)
        fp.truncate(fp.tell())
        fp.write(blob)
    back = load_pickled_npy(path)
    np.testing.assert_array_equal(back["a"], obj["a"])
    assert back["s"] == np.float32(1.5) and back["u"].tolist() == ["x", "yz"]
