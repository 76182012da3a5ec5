"""The CLIP-embedding Ray job on real synthetic shards and a tiny local open_clip model."""

from __future__ import annotations

import json
import time

import open_clip
import pytest
import ray
import torch
from PIL import Image

from cluster.cli import main as brainmoe
from finetune.clip_cache import ClipCache, ClipConfig, cache_folder
from finetune.stimuli import StimulusSet, concept_prompt
from finetune.tiny.clip import build_tiny_clip
from shards.build import BuildConfig, build

SPEC = "synthetic?subjects=1&runs=1&duration_s=40&classes=2&instances=3&artifacts=false"


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """Shards of 6 synthetic stimuli, embedded once by `brainmoe embed-stimuli` (Ray, one
    worker, 3 chunks)."""
    root = tmp_path_factory.mktemp("clip_cache")
    shards = root / "shards"
    build(BuildConfig(sources=[SPEC], out=str(shards), workers=0))
    model = build_tiny_clip(root / "tiny_clip")
    assert not ray.is_initialized()
    flags = ["--model", model, "--workers", "1", "--batch-size", "4"]
    args = ["embed-stimuli", "--shards", str(shards), *flags]
    assert brainmoe(args) == 0
    assert not ray.is_initialized(), "the job must shut down the Ray it started"
    folders = list((shards / "clip").iterdir())
    assert folders == [cache_folder(shards, ClipConfig(model=model))], folders
    return shards, model, args, folders[0]


def _direct(model_name: str, stimuli: StimulusSet) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference embeddings straight from open_clip, one stimulus at a time."""
    model, _, preprocess = open_clip.create_model_and_transforms(model_name)
    tokenizer = open_clip.get_tokenizer(model_name)
    model.eval()
    images, texts = [], []
    with torch.no_grad():
        for sid in stimuli:
            s = stimuli[sid]
            x = preprocess(Image.open(s.image).convert("RGB"))[None]  # [1, 3, H, W]
            images.append(torch.nn.functional.normalize(model.encode_image(x), dim=-1)[0])
            t = torch.nn.functional.normalize(model.encode_text(tokenizer(s.captions)), dim=-1)
            texts.append(torch.nn.functional.normalize(t.mean(0), dim=-1))
    return torch.stack(images), torch.stack(texts)


def test_cache_matches_open_clip(embedded):
    shards, model, _, folder = embedded
    cache = ClipCache.load(folder)
    stimuli = StimulusSet.load(folder / "stimuli.json")
    ids = [f"synthetic:c{k:02d}:i{i:02d}" for k in range(2) for i in range(3)]
    assert cache.ids == ids == stimuli.ids
    assert cache.dim == 32
    image, text = _direct(model, stimuli)
    for name, got, want in (("image", cache.image(ids), image), ("text", cache.text(ids), text)):
        assert got.shape == (6, 32) and got.dtype == torch.float32
        err = float((got - want).abs().max())
        assert err < 1e-5, f"{name} embeddings differ from open_clip by {err:.2e}"
        norms = got.norm(dim=-1)
        assert torch.allclose(norms, torch.ones(6), atol=1e-5), f"{name} row norms {norms}"
    # Rows follow the ids asked for, not the cache's order.
    assert torch.equal(cache.image(ids[::-1]), cache.image(ids).flip(0))

    names, concepts = cache.concepts
    assert names == ["circle", "square"] and concepts.shape == (2, 32)
    net = open_clip.create_model(model).eval()
    with torch.no_grad():
        prompts = open_clip.get_tokenizer(model)([concept_prompt(n) for n in names])
        want = torch.nn.functional.normalize(net.encode_text(prompts), dim=-1)
    err = float((concepts - want).abs().max())
    assert err < 1e-5, f"concept embeddings differ from open_clip by {err:.2e}"
    assert cache.concept_of(ids[2:4]) == ["circle", "square"]
    index = json.loads((folder / "index.json").read_text())
    assert (
        index["model"] == model and index["pretrained"] is None and len(index["fingerprint"]) == 64
    )


def test_rerun_is_a_no_op_and_changed_captions_recompute(embedded, tmp_path):
    shards, _, args, folder = embedded
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    start = time.perf_counter()
    assert brainmoe(args) == 0
    seconds = time.perf_counter() - start
    after = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir()}
    assert after == before, "a re-run with the same inputs rewrote files"
    assert not ray.is_initialized() and seconds < 15, f"no-op re-run took {seconds:.1f} s"

    old = ClipCache.load(folder)
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps({"synthetic:c00:i00": "a photo of a tomato"}))
    assert brainmoe([*args, "--captions", str(captions)]) == 0
    new = ClipCache.load(folder)
    assert new.index["fingerprint"] != old.index["fingerprint"]
    ids = new.ids
    assert torch.equal(new.image(ids), old.image(ids)), "images did not change"
    changed = (new.text(ids) - old.text(ids)).abs().amax(dim=-1)
    assert changed[0] > 1e-3 and float(changed[1:].max()) < 1e-6, f"text change per row {changed}"
    assert StimulusSet.load(folder / "stimuli.json")[ids[0]].captions == ["a photo of a tomato"]


def test_unknown_ids_and_bad_inputs(embedded, tmp_path):
    _, model, _, folder = embedded
    cache = ClipCache.load(folder)
    with pytest.raises(ValueError, match="2 stimulus id") as err:
        cache.text(["synthetic:c00:i00", "synthetic:c09:i00", "not-a-stimulus"])
    assert "'synthetic:c09:i00', 'not-a-stimulus'" in str(err.value)
    assert "c00:i00" not in str(err.value)
    with pytest.raises(ValueError, match="no CLIP cache"):
        ClipCache.load(tmp_path)
    with pytest.raises(ValueError, match="not an open_clip architecture"):
        ClipConfig(model="ViT-Nope").resolved()
    with pytest.raises(ValueError, match="neither a file nor a tag of ViT-B-32"):
        ClipConfig(model="ViT-B-32", pretrained="imaginary_tag").resolved()
