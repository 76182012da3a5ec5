"""A finetuning run is prepared once, into its run folder, and the ranks read that record:
without opening a shard, resuming with the same split, refusing one whose split or encoder
changed, and re-resolving (and fingerprint-checking) an encoder folder they cannot see."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from finetune.config import FinetuneConfig
from finetune.prepared import RECORD, load_prepared, prepare_run, prepared_dir
from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from shards.build import BuildConfig, build
from shards.config import load_config

SPEC = "synthetic?subjects=2&runs=1&duration_s=40&classes=2&instances=3&artifacts=false"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    build(load_config(BuildConfig, sources=[SPEC], out=str(root / "shards"), workers=0))
    torch.manual_seed(0)
    Encoder(get_config("tiny")).save_pretrained(root / "encoder")
    return root


def config(tmp_path, shards, encoder, *overrides: str) -> FinetuneConfig:
    return load_config(
        FinetuneConfig,
        None,
        [
            f"data.shards=[{shards}]",
            f"encoder.model={encoder}",
            f"train.run_dir={tmp_path / 'run'}",
            "tasks=[retrieval]",
            *overrides,
        ],
    )


def test_ranks_read_the_record_without_opening_a_shard(built, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(built / "shards", shards)
    cfg = config(tmp_path, shards, built / "encoder")
    record = prepare_run(cfg, 2)
    assert json.loads((prepared_dir(cfg) / RECORD).read_text()) == record
    assert record["split"]["train_keys"] and record["split"]["test_keys"]
    for tar in shards.rglob("*.tar"):  # from here on, opening a shard fails
        tar.unlink()
    assert prepare_run(cfg, 2, reuse_matching=True) == record  # what rank 0 does
    prep = load_prepared(cfg, record, tmp_path / "work")
    assert prep.split.train_keys == record["split"]["train_keys"]
    assert prep.stimuli.ids == [s["id"] for s in record["stimuli"]["stimuli"]]
    assert prep.encoder_dir == built / "encoder" and len(prep.encoder_fingerprint) == 16


def test_resume_reuses_the_record_and_refuses_a_changed_split(built, tmp_path):
    cfg = config(tmp_path, built / "shards", built / "encoder")
    first = prepare_run(cfg, 1)
    path = prepared_dir(cfg) / RECORD
    written = path.stat().st_mtime_ns
    resumed = config(tmp_path, built / "shards", built / "encoder", "train.resume=true")
    assert prepare_run(resumed, 1) == first and path.stat().st_mtime_ns == written
    changed = config(
        tmp_path, built / "shards", built / "encoder", "train.resume=true", "data.split.seed=1"
    )
    with pytest.raises(ValueError, match=r"train.resume=true.*data.split was .*'seed': 0"):
        prepare_run(changed, 1)
    with pytest.raises(ValueError, match="prepared for another config"):
        load_prepared(changed, first, tmp_path / "work")  # a rank given a stale record
    fresh = config(tmp_path, built / "shards", built / "encoder", "data.split.seed=1")
    again = prepare_run(fresh, 1)  # a fresh run prepares again
    assert again["determined_by"]["data.split"]["seed"] == 1
    assert json.loads(path.read_text()) == again


def test_an_encoder_folder_out_of_sight_is_resolved_again_and_checked(built, tmp_path):
    from pretrain.export import register_export

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_export(built / "encoder", "enc", "current", uri)
    cfg = config(tmp_path, built / "shards", "models:/enc@current", f"tracking.tracking_uri={uri}")
    record = prepare_run(cfg, 1)
    downloaded = prepared_dir(cfg) / "encoder"
    assert str(downloaded.resolve()) in record["encoder"]["folder"]
    shutil.rmtree(downloaded)  # another node: the run folder is not shared
    prep = load_prepared(cfg, record, tmp_path / "work")
    assert prep.encoder_dir.is_relative_to(tmp_path / "work")
    assert prep.encoder_fingerprint == record["encoder"]["fingerprint"]

    torch.manual_seed(1)
    Encoder(get_config("tiny")).save_pretrained(tmp_path / "other")
    register_export(tmp_path / "other", "enc", "current", uri)  # the alias moves
    with pytest.raises(ValueError, match="alias moved"):
        load_prepared(cfg, record, tmp_path / "work2")


def test_a_refused_preparation_leaves_no_run_folder(built, tmp_path):
    cfg = config(tmp_path, built / "shards", tmp_path / "no-such-encoder")
    with pytest.raises(ValueError, match="no-such-encoder"):
        prepare_run(cfg, 1)
    assert not cfg.run_path.exists()
