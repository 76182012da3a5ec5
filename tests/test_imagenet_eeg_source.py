"""ImageNet-EEG source on a tiny eeg_*.pth of the published layout (torch.save of a dict)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.recording import Recording, Rejected
from shards.sources import get_source
from shards.sources.imagenet_eeg import ImageNetEEGSource

C = 128
N_PER_SUBJECT = 20
WNIDS = ["n02389026", "n03888257", "n02607072", "n03297495"]
IMAGES = [f"{WNIDS[i % 4]}_{1000 + i}" for i in range(12)]
SHORT = {5: 450, 31: 455}  # dataset index -> a length below the default crop end of 460


def _content(seed: int = 0) -> dict:
    """40 trials: subjects 1 and 2 alternate, lengths 470..500 except the SHORT ones."""
    gen = torch.Generator().manual_seed(seed)
    dataset = []
    for i in range(2 * N_PER_SUBJECT):
        length = SHORT.get(i, 470 + (i * 7) % 31)
        dataset.append(
            {
                "eeg": torch.randn(C, length, generator=gen),
                "label": i % 4,
                "image": i % 12,
                "subject": 1 + i % 2,
            }
        )
    return {"dataset": dataset, "labels": list(WNIDS), "images": list(IMAGES)}


def _splits(n: int = 2 * N_PER_SUBJECT) -> list[dict]:
    first = {"train": list(range(0, 30)), "val": list(range(30, 35)), "test": list(range(35, n))}
    second = {"train": list(range(10, n)), "val": [], "test": list(range(0, 10))}
    return [first, second]


@pytest.fixture
def eeg_file(tmp_path: Path) -> Path:
    path = tmp_path / "eeg_5_95_std.pth"
    torch.save(_content(), path)
    return path


@pytest.fixture
def splits_file(tmp_path: Path) -> Path:
    path = tmp_path / "block_splits_by_image_all.pth"
    torch.save({"splits": _splits()}, path)
    return path


def _source(spec: str) -> ImageNetEEGSource:
    source = get_source(spec)
    assert isinstance(source, ImageNetEEGSource)
    return source


def test_units(eeg_file: Path, splits_file: Path) -> None:
    units = _source(f"imagenet-eeg:{eeg_file}").units()
    assert [u.id for u in units] == [f"imagenet-eeg-sub-{s}" for s in range(1, 7)]
    assert len({u.fingerprint for u in units}) == 6
    picked = _source(f"imagenet-eeg:{eeg_file}?subjects=2,1").units()
    assert [u.id for u in picked] == ["imagenet-eeg-sub-1", "imagenet-eeg-sub-2"]
    assert picked[0].fingerprint == units[0].fingerprint
    again = _source(f"imagenet-eeg:{eeg_file}?subjects=1,2").units()
    assert [u.fingerprint for u in again] == [u.fingerprint for u in picked]
    # Parameters and side files that change the output change the fingerprint.
    for extra in ("crop=0,400", "chunk=3", f"splits={splits_file}"):
        other = _source(f"imagenet-eeg:{eeg_file}?subjects=1&{extra}").units()
        assert other[0].id == picked[0].id and other[0].fingerprint != picked[0].fingerprint


def test_fingerprint_follows_file_size(eeg_file: Path) -> None:
    before = _source(f"imagenet-eeg:{eeg_file}?subjects=1").units()[0].fingerprint
    content = _content()
    content["dataset"] = content["dataset"][:-2]
    torch.save(content, eeg_file)
    assert _source(f"imagenet-eeg:{eeg_file}?subjects=1").units()[0].fingerprint != before


def test_load_trials_labels_and_crop(eeg_file: Path, splits_file: Path) -> None:
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=1&splits={splits_file}")
    out = list(source.load(source.units()[0]))
    # Subject 1 has the even dataset indices, none of them short: one chunk, no Rejected.
    (rec,) = out
    assert isinstance(rec, Recording)
    expected = list(range(0, 40, 2))
    assert [t.extra["dataset_index"] for t in rec.trials] == expected
    assert rec.data.shape == (len(expected), C, 440) and rec.data.dtype == np.float32
    assert rec.sfreq == 1000.0 and rec.unit == "auto"
    assert rec.ch_names == [f"E{i:03d}" for i in range(1, 129)]
    prov = rec.provenance
    assert (prov.dataset, prov.subject, prov.session, prov.run) == (
        "imagenet-eeg",
        "1",
        "0",
        "chunk000",
    )
    assert prov.file == str(eeg_file)

    content = _content()
    np.testing.assert_array_equal(rec.data[3], content["dataset"][6]["eeg"][:, 20:460].numpy())
    trial = rec.trials[3]  # dataset index 6
    assert trial.label == WNIDS[6 % 4]
    assert trial.stimulus_id == IMAGES[6]
    assert trial.extra == {"class_index": 2, "image_index": 6, "split": "train", "dataset_index": 6}
    assert rec.trials[16].extra["split"] == "val"  # index 32
    assert rec.trials[19].extra["split"] == "test"  # index 38


def test_short_trials_are_one_rejected(eeg_file: Path) -> None:
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=2&chunk=4")
    out = list(source.load(source.units()[0]))
    recs = [r for r in out if isinstance(r, Recording)]
    rejected = [r for r in out if isinstance(r, Rejected)]
    # Subject 2: 20 odd indices, 5 and 31 too short -> 18 good trials in chunks of 4.
    assert [r.data.shape[0] for r in recs] == [4, 4, 4, 4, 2]
    assert [r.provenance.run for r in recs] == [f"chunk{k:03d}" for k in range(5)]
    kept = [t.extra["dataset_index"] for r in recs for t in r.trials]
    assert kept == [i for i in range(1, 40, 2) if i not in SHORT]
    assert all(t.extra["split"] is None for r in recs for t in r.trials)
    (rej,) = rejected
    assert rej.provenance.subject == "2"
    assert "2 trial(s)" in rej.reason and "460" in rej.reason and "[5, 31]" in rej.reason


def test_crop_param(eeg_file: Path) -> None:
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=2&crop=0,440")
    out = list(source.load(source.units()[0]))
    assert not any(isinstance(r, Rejected) for r in out)
    assert out[0].data.shape == (N_PER_SUBJECT, C, 440)
    np.testing.assert_array_equal(out[0].data[0], _content()["dataset"][1]["eeg"][:, :440].numpy())
    assert out[0].extra["tmin"] == 0.0


def test_subject_absent_from_file(eeg_file: Path) -> None:
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=6")
    (only,) = list(source.load(source.units()[0]))
    assert isinstance(only, Rejected)
    assert "no trials of subject 6" in only.reason and "[1, 2]" in only.reason


def test_bare_list_splits_and_split_index(tmp_path: Path, eeg_file: Path) -> None:
    path = tmp_path / "splits_list.pth"
    torch.save(_splits(), path)
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=1&splits={path}&split_index=1")
    rec = next(source.load(source.units()[0]))
    splits = {t.extra["dataset_index"]: t.extra["split"] for t in rec.trials}
    assert splits[0] == "test" and splits[8] == "test" and splits[10] == "train"
    with pytest.raises(ValueError, match="split_index=2 but .* holds 2 split"):
        _source(f"imagenet-eeg:{eeg_file}?splits={path}&split_index=2").units()


def test_channels_file(tmp_path: Path, eeg_file: Path) -> None:
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"Ch{i}" for i in range(C)) + "\n")
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=1&channels={names}")
    assert next(source.load(source.units()[0])).ch_names[:2] == ["Ch0", "Ch1"]
    names.write_text("\n".join(f"Ch{i}" for i in range(C - 1)))
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=1&channels={names}")
    with pytest.raises(ValueError, match="lists 127 names but .* 128 channels"):
        list(source.load(source.units()[0]))
    names.write_text("A\nB\nA\n")
    with pytest.raises(ValueError, match=r"repeats channel name\(s\) \['A'\]"):
        _source(f"imagenet-eeg:{eeg_file}?channels={names}").units()


def test_loading_is_deterministic(eeg_file: Path, splits_file: Path) -> None:
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=2&chunk=7&splits={splits_file}")
    unit = source.units()[0]
    first, second = list(source.load(unit)), list(source.load(unit))
    assert len(first) == len(second) == 4  # 3 chunks + 1 Rejected
    for a, b in zip(first, second, strict=True):
        if isinstance(a, Recording):
            np.testing.assert_array_equal(a.data, b.data)
            assert a.trials == b.trials and a.provenance == b.provenance
        else:
            assert a == b


# --------------------------------------------------------------------------------- errors


def test_bad_spec(tmp_path: Path, eeg_file: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        get_source(f"imagenet-eeg:{tmp_path / 'missing.pth'}")
    with pytest.raises(ValueError, match="names no file"):
        get_source("imagenet-eeg")
    with pytest.raises(ValueError, match="crop=460,20 .* 0 <= start < stop"):
        get_source(f"imagenet-eeg:{eeg_file}?crop=460,20")
    with pytest.raises(ValueError, match="split_index .* needs splits="):
        get_source(f"imagenet-eeg:{eeg_file}?split_index=1")
    with pytest.raises(ValueError, match="splits='/nope' .* is not a file"):
        get_source(f"imagenet-eeg:{eeg_file}?splits=/nope")


def test_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "eeg.pth"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a torch.save file"):
        get_source(f"imagenet-eeg:{path}").units()


class _Exploit:
    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def test_pickled_code_is_refused(tmp_path: Path, eeg_file: Path) -> None:
    pwned = tmp_path / "pwned"
    bad_splits = tmp_path / "splits.pth"
    torch.save({"splits": [_Exploit(pwned)]}, bad_splits)
    with pytest.raises(ValueError, match="weights_only=True"):
        get_source(f"imagenet-eeg:{eeg_file}?splits={bad_splits}").units()
    content = _content()
    content["labels"] = _Exploit(pwned)
    torch.save(content, eeg_file)
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=1")
    with pytest.raises(ValueError, match=str(eeg_file)):
        list(source.load(source.units()[0]))
    assert not pwned.exists()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c.pop("images"), r"lacks key\(s\) \['images'\]"),
        (lambda c: c.update(dataset={"a": 1}), "dataset is a dict, expected a list"),
        (lambda c: c["dataset"][3].pop("subject"), r"dataset\[3\] lacks key\(s\) \['subject'\]"),
        (lambda c: c["dataset"][4].update(label=40), r"dataset\[4\]\['label'\] is 40"),
        (
            lambda c: c["dataset"][2].update(eeg=torch.zeros(C)),
            r"dataset\[2\]\['eeg'\] is \(128,\), expected a 2-D float tensor",
        ),
        (
            lambda c: c["dataset"][7].update(eeg=torch.zeros(64, 480)),
            r"dataset\[7\]\['eeg'\] has 64 channels",
        ),
        (lambda c: c.update(labels=[1, 2]), "labels must be a list of strings"),
    ],
)
def test_wrong_structure_is_a_clear_error(eeg_file: Path, mutate, message: str) -> None:
    content = _content()
    mutate(content)
    torch.save(content, eeg_file)
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=1")
    with pytest.raises(ValueError, match=message) as info:
        list(source.load(source.units()[0]))
    assert str(eeg_file) in str(info.value)


def test_wrong_splits_structure(tmp_path: Path, eeg_file: Path) -> None:
    path = tmp_path / "splits.pth"
    cases = [
        ({"folds": []}, r"expected a non-empty list of splits.*keys \['folds'\]"),
        ([{"train": [0], "holdout": [1]}], r"split 0 is \['holdout', 'train'\]"),
        ([{"train": [0, 1], "test": [1]}], "trial 1 is in both 'train' and 'test'"),
        ([{"train": [0.5]}], "must be a list of non-negative trial indices"),
    ]
    for content, message in cases:
        torch.save(content, path)
        with pytest.raises(ValueError, match=message):
            get_source(f"imagenet-eeg:{eeg_file}?splits={path}").units()
    torch.save([{"train": [0, 99]}], path)
    source = _source(f"imagenet-eeg:{eeg_file}?subjects=1&splits={path}")
    with pytest.raises(ValueError, match="refers to trial 99 but .* has 40 trials"):
        list(source.load(source.units()[0]))


def test_legacy_torch_format(tmp_path: Path) -> None:
    # The published file predates torch's zip format; it cannot be memory-mapped.
    path = tmp_path / "eeg_legacy.pth"
    torch.save(_content(), path, _use_new_zipfile_serialization=False)
    source = _source(f"imagenet-eeg:{path}?subjects=1")
    (rec,) = list(source.load(source.units()[0]))
    assert rec.data.shape == (N_PER_SUBJECT, C, 440)
    np.testing.assert_array_equal(rec.data[0], _content()["dataset"][0]["eeg"][:, 20:460].numpy())
