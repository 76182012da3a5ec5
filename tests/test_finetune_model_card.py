"""The README.md model card of a finetune output (finetune/model_card.py), offline: it parses as
Hub metadata with the heads, their base models, the encoder, the training corpus (from a real
shard build's manifest) and the held-out figures beside their controls; the text says plainly
which figures do not beat their controls; and the card is one of the files finetune.json
signs, so a saved folder with it still verifies and reloads."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.metrics import report
from finetune.model_card import build_model_card, evaluation, write_model_card
from pretrain.artifacts import ArtifactError, verify_checksums, write_checksums
from pretrain.config import load_run_config
from shards.build import BuildConfig, build
from shards.config import load_config
from tests.conftest import REPO

SYNTH = "synthetic?subjects=2&runs=1&duration_s=40"
ENCODER_URI = "models:/tiny-encoder@current"
IMAGE_BASE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
TEXT_BASE = "meta-llama/Llama-3.2-1B-Instruct"
SECRET = "sqlite:////srv/private/mlflow.db"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("card") / "corpus"
    build(load_config(BuildConfig, sources=[SYNTH], out=str(folder), workers=0))
    return folder, json.loads((folder / "manifest.json").read_text())


def run_meta(corpus: Path, tmp_path: Path) -> dict:
    """finetune.json as `FinetuneTrainer.meta` writes it (configs/finetune/tiny.yaml, hub
    bases, a registry encoder, a tracking server that must not reach the card)."""
    overrides = [
        f"data.shards=[{corpus}]",
        f"encoder.model={ENCODER_URI}",
        f"tracking.tracking_uri={SECRET}",
        f"image.base={IMAGE_BASE}",
        f"text.base={TEXT_BASE}",
        f"train.run_dir={tmp_path / 'finetune-tiny'}",
    ]
    cfg = load_run_config(FinetuneConfig, REPO / "configs/finetune/tiny.yaml", overrides)
    config = json.loads(json.dumps(asdict(cfg), default=str))
    manifest = (corpus / "manifest.json").read_bytes()
    return {
        "encoder_uri": ENCODER_URI,
        "encoder_fingerprint": "0123456789abcdef",
        "encoder_config": {"dim": 64, "depth": 2},
        "encoder_train": asdict(cfg.encoder),
        "tasks": list(cfg.tasks),
        "base_models": {"image.unet": IMAGE_BASE, "image.vae": IMAGE_BASE, "text.lm": TEXT_BASE},
        "clip": {"model": "ViT-H-14", "pretrained": "laion2b_s32b_b79k"},
        "clip_dim": 1024,
        "config": config,
        "lineage": {
            "shard_manifests": {str(corpus): hashlib.sha256(manifest).hexdigest()},
            "config": config,
            "git_commit": "645fe22",
            "step": 40,
            "mlflow_run_id": "abc123",
            "tracking_uri": SECRET,
            "world_size": 2,
            "launcher": "deepspeed",
        },
    }


def eval_json() -> dict:
    """eval.json as finetune/evaluate.py writes it: retrieval top-1 above its control, top-5
    not, zero-shot above its control but only at chance; captions no better than the most
    frequent training caption."""
    caption = {"bleu1": 0.42, "bleu4": 0.11, "rougeL": 0.40}
    controls = {
        "shuffled": {"bleu1": 0.30, "bleu4": 0.05, "rougeL": 0.31},
        "noise": {"bleu1": 0.35, "bleu4": 0.08, "rougeL": 0.36},
        "prior": {"bleu1": 0.45, "bleu4": 0.12, "rougeL": 0.43},
    }
    return {
        "windows": 48,
        "retrieval": {
            "stimuli": 8,
            "chance_top1": 0.125,
            "chance_zero_shot": 0.125,
            "report": report(
                {"top1": 0.5, "top5": 0.625, "window_top1": 0.3, "zero_shot": 0.125},
                {"top1": 0.125, "top5": 0.75, "window_top1": 0.08, "zero_shot": 0.1},
            ),
        },
        "image": {
            "images": 8,
            "n_way": 8,
            "report": report(
                {"clip_similarity": 0.61, "semantic_top1": 0.25},
                {"clip_similarity": 0.58, "semantic_top1": 0.125},
            ),
        },
        "text": {
            "windows": 48,
            "decoding": "free-running greedy, up to 32 tokens",
            "concepts": 8,
            "distinct_captions": 3,
            "distinct_noise_captions": 2,
            "prior_caption": "a red circle",
            "report": report(caption, controls["shuffled"]),
            "controls": controls,
        },
    }


def test_card_metadata_has_heads_bases_data_and_evals_with_controls(corpus, tmp_path):
    from huggingface_hub import ModelCard

    folder, manifest = corpus
    meta = run_meta(folder, tmp_path)
    path = tmp_path / "README.md"
    build_model_card(meta, eval_json(), license="apache-2.0").save(path)
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["library_name"] == "brainmoe" and data["license"] == "apache-2.0"
    assert {"eeg", "lora", "retrieval", "image", "text"} <= set(data["tags"])
    # Hub ids only (the registry URI of the encoder is no Hub model); all under brainmoe:
    assert data["base_model"] == [IMAGE_BASE, TEXT_BASE]
    bm = data["brainmoe"]
    assert bm["tasks"] == ["retrieval", "image", "text"]
    assert bm["heads"]["image"]["base_models"] == {"unet": IMAGE_BASE, "vae": IMAGE_BASE}
    assert bm["heads"]["text"]["base_models"] == {"lm": TEXT_BASE}
    assert bm["heads"]["text"]["lora"]["rank"] == meta["config"]["text"]["lora_rank"]
    assert bm["heads"]["image"]["lora"]["targets"] == meta["config"]["image"]["lora_targets"]
    assert bm["heads"]["retrieval"] == {"base_models": {}, "lora": None}
    assert bm["encoder"] == {
        "uri": ENCODER_URI,
        "fingerprint": "0123456789abcdef",
        "train": "lora",
        "lora": {"rank": 8, "alpha": 16, "targets": ["qkv", "out"]},
    }
    # the corpus as its manifest has it
    recs = [r for r in manifest["recordings"] if r["windows"]]
    train = bm["training_data"]["datasets"]["synthetic"]
    assert train["subjects"] == len({r["provenance"]["subject"] for r in recs}) == 2
    assert train["windows"] == sum(r["windows"] for r in recs) > 0
    assert data["datasets"] == ["synthetic"] and bm["step"] == 40

    # held-out figures, each beside its controls and chance
    ev = bm["evaluation"]
    assert ev["windows"] == 48
    top1, top5 = ev["retrieval"]["metrics"]["top1"], ev["retrieval"]["metrics"]["top5"]
    assert top1 == {"model": 0.5, "controls": {"shuffled": 0.125}, "chance": 0.125,
                    "beats_controls": True, "beats_chance": True}  # fmt: skip
    assert top5["beats_controls"] is False and top5["chance"] == 0.625
    zero_shot = ev["retrieval"]["metrics"]["zero_shot"]
    assert zero_shot["beats_controls"] is True and zero_shot["beats_chance"] is False
    bleu = ev["text"]["metrics"]["bleu1"]
    assert bleu["controls"] == {"shuffled": 0.30, "noise": 0.35, "prior": 0.45}
    assert bleu["beats_controls"] is False and bleu["chance"] is None
    assert ev["text"]["prior_caption"] == "a red circle"
    assert ev["image"]["metrics"]["semantic_top1"]["chance"] == 0.125
    # model-index: the model's figure and each control's
    scores = {(r.task_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert scores[("eeg-to-image-retrieval", "top1")] == 0.5
    assert scores[("eeg-to-image-retrieval", "top1_shuffled_control")] == 0.125
    assert scores[("eeg-to-text", "bleu1_prior_control")] == 0.45

    text = card.text
    for phrase in ("shuffled", "noise", "prior", "chance", "0123456789abcdef", ENCODER_URI):
        assert phrase in text, phrase
    assert "LoRA rank 8 (alpha 16)" in text and TEXT_BASE in text and IMAGE_BASE in text
    assert "**Not above its controls or chance**" in text
    assert "- retrieval top-5: model 0.625 vs shuffled 0.750, chance 0.625" in text
    assert "- retrieval zero-shot concept accuracy: model 0.125 vs shuffled 0.100, chance" in text
    assert "- text BLEU-1: model 0.420 vs shuffled 0.300, noise 0.350, prior 0.450" in text
    assert "- retrieval top-1:" not in text  # it is above its control and chance
    assert "4 of 9 metrics are above every control" in text
    assert "| retrieval top-1 (8 held-out stimuli)" in text  # finetune/report.py's table
    assert "lora_rank: 8" in text and "tracking:" not in text and SECRET not in text


def test_nothing_beating_its_controls_is_said_plainly(corpus, tmp_path):
    scores = eval_json()
    rows = scores["retrieval"]["report"]
    for row in rows.values():
        row["value"] = row["control"]  # level with the control is not above it
    scores = {"windows": 48, "retrieval": scores["retrieval"]}
    text = build_model_card(run_meta(corpus[0], tmp_path), scores).text
    assert "beats its controls on none of these metrics" in text
    assert evaluation(scores)["retrieval"]["metrics"]["top1"]["beats_controls"] is False


def test_card_without_eval_or_readable_corpus_says_so(corpus, tmp_path):
    meta = run_meta(corpus[0], tmp_path)
    meta["lineage"]["shard_manifests"] = {str(corpus[0]): "0" * 64}  # rebuilt since
    card = build_model_card(meta)
    assert "None recorded" in card.text and "changed since training" in card.text
    assert card.data.eval_results is None and card.data.to_dict()["brainmoe"]["evaluation"] is None
    # no digests recorded: the shard folders of the config as they are now, said to be unchecked
    del meta["lineage"]["shard_manifests"]
    card = build_model_card(meta)
    assert card.data.datasets == ["synthetic"] and "not checked against the run" in card.text


def test_card_is_signed_by_finetune_json_and_the_folder_reloads(corpus, tmp_path):
    """A real save_adapters folder (retrieval head on a tiny encoder): README.md joins the
    checksums, the folder verifies and reloads, and a changed card is refused."""
    from huggingface_hub import ModelCard

    from finetune.model import build_model, encoder_fingerprint
    from pretrain.encoder import Encoder
    from pretrain.encoder_config import get_config

    torch.manual_seed(0)
    encoder_dir = Encoder(get_config("tiny")).save_pretrained(tmp_path / "encoder")
    meta = run_meta(corpus[0], tmp_path)
    cfg = load_config(FinetuneConfig, None, [], tasks=["retrieval"], retrieval={"hidden": 16})
    meta.update(
        encoder_uri=str(encoder_dir),
        encoder_fingerprint=encoder_fingerprint(encoder_dir),
        tasks=["retrieval"],
        base_models={},
        clip_dim=8,
        config={**meta["config"], "tasks": ["retrieval"]},
    )
    model = build_model(cfg, encoder_dir, 8)
    folder = model.save_adapters(tmp_path / "adapters", meta)
    before = json.loads((folder / "finetune.json").read_text())["checksums"]
    scores = {"windows": 48, "retrieval": eval_json()["retrieval"]}
    path = write_model_card(folder, scores)
    after = json.loads((folder / "finetune.json").read_text())["checksums"]
    assert set(after) == {*before, "README.md"}
    assert all(after[k] == v for k, v in before.items())  # recorded digests kept, not redone
    assert verify_checksums(folder, "finetune.json") is True
    card = ModelCard.load(path)
    assert card.data.base_model is None  # a local encoder folder is no Hub base model
    assert card.data.to_dict()["brainmoe"]["encoder"]["uri"] == str(encoder_dir)
    fresh = build_model(cfg, encoder_dir, 8)
    fresh.load_adapters(folder)
    saved = model.heads["retrieval"].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in fresh.heads["retrieval"].state_dict().items())
    # writing it again (e.g. with a license) re-signs only the card
    write_model_card(folder, scores, license="apache-2.0")
    assert verify_checksums(folder, "finetune.json") is True
    path.write_text(path.read_text().replace("0.500", "0.900"))
    with pytest.raises(ArtifactError, match="README.md"):
        verify_checksums(folder, "finetune.json")


def test_what_a_push_shows_of_finetune_json_and_a_late_file_signed(corpus, tmp_path):
    """The pushed finetune.json leaves out the run's lineage (tracking server, storage
    paths) and the config's tracking section; it still builds the heads, and a file written
    after saving (stimuli.json) joins the checksums without re-signing the others."""
    from finetune.generate import _config_values
    from pretrain.artifacts import add_checksums
    from pretrain.hub import public_finetune_meta

    meta = run_meta(corpus[0], tmp_path)
    meta["lineage"] = {"tracking_uri": "http://10.0.0.5:5000", "step": 3}
    meta["config"]["tracking"] = {"tracking_uri": "http://10.0.0.5:5000"}
    public = public_finetune_meta(meta)
    assert "lineage" not in public and "tracking" not in public["config"]
    assert "10.0.0.5" not in json.dumps(public, default=str)
    assert meta["lineage"] and meta["config"]["tracking"]  # the local copy keeps them
    assert _config_values(public["config"]) == _config_values(meta["config"])

    folder = tmp_path / "signed"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"weights")
    (folder / "finetune.json").write_text("{}")
    write_checksums(folder, ["a.bin"], "finetune.json")
    (folder / "stimuli.json").write_text('{"stimuli": []}')
    assert add_checksums(folder, ["stimuli.json"], "finetune.json") is True
    sums = json.loads((folder / "finetune.json").read_text())["checksums"]
    assert set(sums) == {"a.bin", "stimuli.json"} and verify_checksums(folder, "finetune.json")
    (folder / "unsigned.json").write_text("{}")
    assert add_checksums(folder, [], "unsigned.json") is False  # never signed: stays so
