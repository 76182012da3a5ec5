"""Contract tests for every head in finetune/heads/registry.py, as tests/test_encoder_contract.py
is for every encoder config: a head added to the registry is run through all of these.

Each head is built the way a run builds it -- `finetune.model.build_model` from a FinetuneConfig
whose section is the head's tiny config -- on a tiny random-weight encoder exported to a
folder and tiny random-weight bases (finetune/tiny: CLIP, Stable Diffusion, a Llama), and fed
real paired batches: synthetic shards, their rendered stimuli and real CLIP embeddings of them.
"""

from __future__ import annotations

import math
from dataclasses import fields

import pytest
import torch

from finetune.clip_cache import ClipCache, Embedder
from finetune.config import TASKS, FinetuneConfig
from finetune.evaluate import EvalContext
from finetune.heads.registry import HEADS, head_spec
from finetune.inputs import windows_from_shards
from finetune.model import build_model
from finetune.pairs import Pairing
from finetune.prepare import Prepared
from finetune.splits import SplitConfig, index_shards, make_split
from finetune.stimuli import concept_prompt, stimuli_for
from finetune.synthetic_stimuli import synthetic_captions
from finetune.tiny.clip import build_tiny_clip
from finetune.tiny.diffusion import build_tiny_sd
from finetune.tiny.llm import build_tiny_llm
from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from shards.build import BuildConfig, build
from shards.config import load_config
from shards.sample import collate_eeg

SPEC = "synthetic?subjects=2&runs=1&duration_s=40&classes=2&instances=3&artifacts=false"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards, split and stimuli, a CLIP cache, a tiny exported encoder and tiny bases."""
    root = tmp_path_factory.mktemp("heads")
    shards = root / "shards"
    build(load_config(BuildConfig, sources=[SPEC], out=str(shards), workers=0))
    rows = index_shards([str(shards)])
    split = make_split(rows, SplitConfig(test_fraction=0.34))
    stimuli = stimuli_for(sorted({r.stimulus_id for r in rows}), render_dir=root / "stimuli")
    clip_model = build_tiny_clip(root / "clip", fit_steps=0)
    embedder = Embedder(clip_model, None, "cpu", 16)
    ids = stimuli.ids
    concepts = stimuli.concepts()
    index = {
        "ids": ids,
        "stimulus_concepts": [stimuli[i].concept for i in ids],
        "concepts": concepts,
        "model": clip_model,
        "pretrained": None,
    }
    clip = ClipCache(
        root / "clip-cache",
        index,
        torch.from_numpy(embedder.images([str(stimuli[i].image) for i in ids])),
        torch.from_numpy(embedder.texts([stimuli[i].captions[0] for i in ids])),
        torch.from_numpy(embedder.texts([concept_prompt(c) for c in concepts])),
    )
    torch.manual_seed(0)
    Encoder(get_config("tiny")).save_pretrained(root / "encoder")
    corpus = [c for k in range(2) for i in range(3) for c in synthetic_captions(k, i)]
    bases = {
        "retrieval": {"hidden": 32},
        "image": {
            "base": build_tiny_sd(root / "sd", cross_attention_dim=32),
            "context_len": 8,
            "projector_heads": 4,
            "num_inference_steps": 2,
            "guidance_scale": 1.0,
        },
        "text": {
            "base": build_tiny_llm(root / "llm", corpus=corpus),
            "prefix_tokens": 2,
            "max_caption_tokens": 8,
            "max_new_tokens": 4,
        },
    }
    prep = Prepared(split, stimuli, root / "encoder", "-", str(root / "encoder"))
    return {"root": root, "shards": [str(shards)], "prep": prep, "clip": clip, "tiny": bases}


def tiny_config(world, task: str, heads_read: str = "tokens", **dist) -> FinetuneConfig:
    """A one-head FinetuneConfig as a run would load it: the head's tiny section set."""
    if task not in world["tiny"]:
        pytest.fail(f"the {task!r} head has no tiny config in tests/test_head_contract.py")
    cfg = load_config(
        FinetuneConfig,
        None,
        [],
        tasks=[task],
        **{task: world["tiny"][task]},
        dist=dist,
        data={
            "shards": world["shards"],
            "clip": {"model": world["clip"].index["model"], "pretrained": None},
        },
        train={"eval_windows": 8, "eval_images": 2},
        encoder={"heads_read": heads_read},
    )
    return cfg


def build_heads(world, task: str, seed: int = 0, heads_read: str = "tokens", **dist):
    cfg = tiny_config(world, task, heads_read, **dist)
    torch.manual_seed(seed)
    model = build_model(cfg, world["prep"].encoder_dir, world["clip"].dim)
    fields_ = {}
    for head in model.heads.values():
        fields_.update(head.stimulus_tensors(world["prep"].stimuli, world["root"]))
    return cfg, model, Pairing(world["prep"].stimuli, world["clip"], fields_)


def batch_of(world, pairing, n: int = 4) -> dict:
    keys = world["prep"].split.train_keys[:n]
    return pairing(collate_eeg(windows_from_shards(world["shards"], keys)))


def test_every_task_has_a_head_and_a_config_section():
    sections = {f.name: f for f in fields(FinetuneConfig)}
    assert tuple(HEADS) == TASKS
    for name, spec in HEADS.items():
        assert name in sections, f"FinetuneConfig has no section {name!r} for its head"
        assert isinstance(getattr(FinetuneConfig(), name), spec.config_class), name
        for method in ("from_config", "reference", "decode", "stimulus_tensors", "check_saved"):
            assert callable(getattr(spec.head_class, method, None)), (name, method)
    with pytest.raises(ValueError, match="unknown task 'eeg2music'"):
        head_spec("eeg2music")


@pytest.mark.parametrize("task", list(HEADS))
def test_loss_is_finite_and_trains_only_what_is_saved(world, task):
    _, model, pairing = build_heads(world, task)
    model.train()
    out = model(batch_of(world, pairing), generator=torch.Generator().manual_seed(0))
    loss = out["losses"][task]
    assert loss.ndim == 0 and math.isfinite(loss.item()), out["losses"]
    out["loss"].backward()
    head = model.heads[task]
    trained = {n for n, p in head.named_parameters() if p.requires_grad}
    assert trained, f"the {task} head trains nothing"
    with_grad = {n for n, p in head.named_parameters() if p.grad is not None}
    assert with_grad <= trained and with_grad, f"{task}: gradients reach {with_grad - trained}"
    assert any(float(head.get_parameter(n).grad.abs().sum()) > 0 for n in with_grad), task
    frozen = sum(p.numel() for p in head.parameters() if not p.requires_grad)
    saved = sum(v.numel() for v in head.trainable_state_dict().values())
    count = sum(head.get_parameter(n).numel() for n in trained)
    assert count <= saved < count + frozen or not frozen, (task, count, saved, frozen)


@pytest.mark.parametrize("task", list(HEADS))
def test_every_head_reads_region_tokens(world, task):
    """encoder.heads_read=regions (finetune/head_inputs.py): every head takes the 20 site
    tokens in place of the C x P ones, and its loss is finite and reaches the adapters."""
    from pretrain.features import REGION_SITES

    _, model, pairing = build_heads(world, task, heads_read="regions")
    model.train()
    batch = batch_of(world, pairing)
    _, tokens, valid = model.read(batch)
    assert tokens.shape[1] == len(REGION_SITES) + 1 and valid.shape == tokens.shape[:2]
    assert valid.all()  # every synthetic montage has the 19 electrodes of the 10-20 system
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert math.isfinite(out["losses"][task].item()), out["losses"]
    out["loss"].backward()
    grads = [p.grad for p in model.heads[task].parameters() if p.requires_grad]
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads), task


def test_an_unknown_heads_read_is_refused_before_training(world):
    from finetune.prepare import validate_finetune

    cfg = tiny_config(world, "retrieval", heads_read="channels")
    cfg.encoder.model = str(world["prep"].encoder_dir)
    with pytest.raises(ValueError, match="encoder.heads_read must be one of"):
        validate_finetune(cfg, None)


@pytest.mark.parametrize("task", list(HEADS))
def test_save_load_round_trip_gives_identical_outputs(world, task, tmp_path):
    cfg, model, pairing = build_heads(world, task, seed=0)
    batch = batch_of(world, pairing)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(2):  # move the trained parts (and BatchNorm statistics) off their init
        out = model(batch, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    model.eval()
    reference = model.reference_outputs(batch)
    model.save_adapters(tmp_path / "adapters", {"tasks": [task]})
    head_spec(task).head_class.check_saved(getattr(cfg, task), tmp_path / "adapters" / task)

    _, fresh, _ = build_heads(world, task, seed=1)
    fresh.eval()
    before = fresh.reference_outputs(batch)
    assert not torch.equal(before[task], reference[task]), f"{task}: the seeds build one head"
    fresh.load_adapters(tmp_path / "adapters")
    again = fresh.reference_outputs(batch)
    assert set(again) == {"tokens", task}
    for name in again:
        torch.testing.assert_close(again[name], reference[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("task", list(HEADS))
def test_evaluation_scores_are_computed(world, task):
    cfg, model, pairing = build_heads(world, task)
    model.eval()
    spec = head_spec(task)
    context = EvalContext(
        model, cfg, world["prep"], pairing, torch.device("cpu"), torch.float32, []
    )
    context.encoded = context.encode(cfg.train.eval_windows)
    assert context.encoded, "no held-out windows were encoded"
    scores = spec.score(model.heads[task], context)
    assert scores is not None and scores["report"], scores
    for metric, row in scores["report"].items():
        assert set(row) == {"value", "control", "margin"}, (metric, row)
        assert all(math.isfinite(v) for v in row.values()), (metric, row)
    rows = spec.report_rows(scores)
    assert rows and all(len(r) == 4 for r in rows), rows

    batch = context.encoded[0]
    decoded = model.heads[task].decode(batch[1], batch[2], num_images=1, steps=2, seed=0)
    b = len(batch[0]["key"])
    assert all(len(v) == b for v in decoded.values()), {k: len(v) for k, v in decoded.items()}


def test_activation_checkpointing_keeps_the_gradients(world):
    grads = []
    for checkpointing in (False, True):
        _, model, pairing = build_heads(world, "retrieval", activation_checkpointing=checkpointing)
        assert model.encoder.config.activation_checkpointing is checkpointing
        model.train()
        out = model(batch_of(world, pairing), generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert any("lora_" in n for n in grads[0]), "the encoder's LoRA trains (encoder.train=lora)"
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
