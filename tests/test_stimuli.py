"""Stimulus catalog: rendered synthetic stimuli, real-dataset resolvers, captions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from finetune.stimuli import (
    Stimulus,
    StimulusSet,
    imagenet_eeg_stimuli,
    load_captions,
    stimuli_for,
    things_eeg2_stimuli,
)
from finetune.synthetic_stimuli import render_synthetic

IDS = [f"synthetic:c{k:02d}:i{i:02d}" for k in range(4) for i in range(4)]


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_render_is_deterministic_and_untouched_on_rerun(tmp_path):
    a = render_synthetic(IDS, tmp_path / "a", size=48, seed=3)
    b = render_synthetic(reversed(IDS), tmp_path / "b", size=48, seed=3)
    assert a.ids == sorted(IDS) and len(a) == len(IDS)
    for sid in IDS:
        assert a[sid].image.read_bytes() == b[sid].image.read_bytes(), sid
        assert Image.open(a[sid].image).size == (48, 48)
    mtimes = {sid: a[sid].image.stat().st_mtime_ns for sid in IDS}
    again = render_synthetic(IDS, tmp_path / "a", size=48, seed=3)
    assert {sid: again[sid].image.stat().st_mtime_ns for sid in IDS} == mtimes
    other_seed = render_synthetic(IDS[:1], tmp_path / "c", size=48, seed=4)
    assert other_seed[IDS[0]].image.read_bytes() != a[IDS[0]].image.read_bytes()


def test_classes_and_instances_look_and_read_different(tmp_path):
    stimuli = render_synthetic(IDS, tmp_path, size=64)
    pixels = {sid: _pixels(stimuli[sid].image) for sid in IDS}
    for n, x in enumerate(IDS):
        for y in IDS[n + 1 :]:
            changed = float((np.abs(pixels[x] - pixels[y]).sum(-1) > 30).mean())
            assert changed > 0.01, f"{x} and {y} differ in only {changed:.3%} of pixels"
    # Every image shows something on a plain background: neither blank nor all shape.
    for sid, p in pixels.items():
        covered = float((np.abs(p - p[0, 0]).sum(-1) > 30).mean())
        assert 0.01 < covered < 0.5, f"{sid}: shape covers {covered:.3f} of the image"

    captions = {sid: stimuli[sid].captions for sid in IDS}
    assert all(len(c) >= 2 for c in captions.values())
    assert captions["synthetic:c00:i00"][0] == "a small red circle on the left"
    by_class = {
        k: {c for sid in IDS if sid[11:13] == f"{k:02d}" for c in captions[sid]} for k in range(4)
    }
    for k in range(4):
        for j in range(k + 1, 4):
            assert not by_class[k] & by_class[j], f"classes {k} and {j} share captions"
    concepts = [stimuli[f"synthetic:c{k:02d}:i00"].concept for k in range(4)]
    assert concepts == ["circle", "square", "triangle", "star"]
    assert all(stimuli[sid].concept in stimuli[sid].captions[0] for sid in IDS)
    first_captions = [captions[sid][0] for sid in IDS]
    assert len(set(first_captions)) == len(IDS), "each instance needs its own description"


def test_unrenderable_ids_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="tells apart 24 classes"):
        render_synthetic(["synthetic:c30:i00"], tmp_path)
    with pytest.raises(ValueError, match="not a synthetic stimulus id"):
        render_synthetic(["things-eeg2:test:00001"], tmp_path)


def _jpeg(path: Path, colour=(10, 200, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


@pytest.fixture
def things_root(tmp_path) -> Path:
    root = tmp_path / "things"
    for c, concept in enumerate(["aardvark", "ice_cream"]):
        for i in range(2):
            _jpeg(root / "training_images" / f"{c + 1:05d}_{concept}" / f"{concept}_{i:02d}b.jpg")
    _jpeg(root / "test_images" / "00001_aircraft_carrier" / "aircraft_carrier_01s.jpg")
    return root


def test_things_eeg2_ids_of_both_forms(things_root):
    stimuli = things_eeg2_stimuli(
        ["ice_cream_01b.jpg", "things-eeg2:training:00001", "things-eeg2:test:00000"], things_root
    )
    got = {sid: (s.image.name, s.concept) for sid, s in stimuli.items()}
    assert got == {
        "ice_cream_01b.jpg": ("ice_cream_01b.jpg", "ice cream"),
        "things-eeg2:training:00001": ("aardvark_01b.jpg", "aardvark"),
        "things-eeg2:test:00000": ("aircraft_carrier_01s.jpg", "aircraft carrier"),
    }
    assert stimuli["ice_cream_01b.jpg"].captions == ["an image of an ice cream"]


def test_missing_images_name_ids_and_folder(things_root, tmp_path):
    with pytest.raises(ValueError) as err:
        things_eeg2_stimuli(
            ["aardvark_00b.jpg", "zebra_01b.jpg", "things-eeg2:test:00007"], things_root
        )
    message = str(err.value)
    assert "2 stimulus image(s)" in message and "'zebra_01b.jpg'" in message
    assert "'things-eeg2:test:00007'" in message and str(things_root) in message
    assert "aardvark_00b" not in message

    many = [f"n02951358_{n}" for n in range(15)]
    _jpeg(tmp_path / "imagenet" / "n02951358" / "n02951358_3.JPEG")
    with pytest.raises(ValueError, match=r"14 stimulus image\(s\).*and 4 more") as err:
        imagenet_eeg_stimuli(many, tmp_path / "imagenet")
    assert str(tmp_path / "imagenet") in str(err.value)


def test_imagenet_layouts_and_class_names(tmp_path):
    root = tmp_path / "imagenet"
    _jpeg(root / "n02951358" / "n02951358_31190.JPEG")
    _jpeg(root / "n03063599_1.JPEG")  # flat layout
    stimuli = imagenet_eeg_stimuli(["n02951358_31190", "n03063599_1"], root)
    assert (
        stimuli["n02951358_31190"].image == (root / "n02951358" / "n02951358_31190.JPEG").resolve()
    )
    assert stimuli["n03063599_1"].image == (root / "n03063599_1.JPEG").resolve()
    assert [stimuli[i].concept for i in stimuli] == ["canoe", "coffee mug"]


def test_captions_json_and_csv(tmp_path, things_root):
    as_json = tmp_path / "captions.json"
    as_json.write_text(json.dumps({"aardvark_00b.jpg": "an aardvark digging", "x.jpg": ["a", "b"]}))
    as_csv = tmp_path / "captions.csv"
    as_csv.write_text(
        'id,caption\naardvark_00b.jpg,an aardvark digging\naardvark_00b.jpg,"a burrowing, animal"\n'
    )
    assert load_captions(as_json) == {
        "aardvark_00b.jpg": ["an aardvark digging"],
        "x.jpg": ["a", "b"],
    }
    assert load_captions(as_csv) == {
        "aardvark_00b.jpg": ["an aardvark digging", "a burrowing, animal"]
    }

    stimuli = stimuli_for(
        ["aardvark_00b.jpg", "aardvark_01b.jpg"], image_root=things_root, captions=as_csv
    )
    assert stimuli["aardvark_00b.jpg"].captions == ["an aardvark digging", "a burrowing, animal"]
    assert stimuli["aardvark_01b.jpg"].captions == ["an image of an aardvark"]  # the default

    bad = tmp_path / "bad.csv"
    bad.write_text("stimulus,text\na,b\n")
    with pytest.raises(ValueError, match="id,caption"):
        load_captions(bad)
    with pytest.raises(ValueError, match="name none of the 2 stimuli"):
        stimuli.with_captions({"other.jpg": "x"})


def test_save_load_round_trip(tmp_path):
    stimuli = StimulusSet(
        [Stimulus("b", tmp_path / "b.png", "cat", ["a cat"]), Stimulus("a", None, "dog", [])]
    )
    path = stimuli.save(tmp_path / "set.json")
    back = StimulusSet.load(path)
    assert list(back) == ["a", "b"]
    assert back["a"] == Stimulus("a", None, "dog", ["an image of a dog"])
    assert back["b"] == stimuli["b"]
    with pytest.raises(ValueError, match="given twice"):
        StimulusSet([Stimulus("a", None, "x"), Stimulus("a", None, "y")])


def test_dispatch_by_id_form(tmp_path, things_root):
    synthetic = stimuli_for(IDS[:2], render_dir=tmp_path / "render")
    assert [s.image.parent for s in synthetic.values()] == [(tmp_path / "render").resolve()] * 2
    with pytest.raises(ValueError, match="mix sources"):
        stimuli_for([IDS[0], "aardvark_00b.jpg"], image_root=things_root)
    with pytest.raises(ValueError, match="give render_dir"):
        stimuli_for(IDS[:1])
    with pytest.raises(ValueError, match="need the dataset's images"):
        stimuli_for(["n02951358_1"])
    with pytest.raises(ValueError, match="look like things-eeg2"):
        stimuli_for(["aardvark_00b.jpg"], "imagenet-eeg", image_root=things_root)
    with pytest.raises(ValueError, match="match no known source"):
        stimuli_for(["trial-7"])
