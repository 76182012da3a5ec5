"""The fine-tuning probe: a paired comparison (same folds, batches, head, budget) that trains
the encoder it is given a copy of, and says per fold what pretraining gave."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from pretrain.finetune_probe import FinetuneProbeConfig, finetune_probe
from pretrain.probe import folds
from tests.conftest import REPO

# 3 subjects, so the folds leave subjects out; planted patterns 3x the realistic strength
SOURCE = "synthetic?subjects=3&runs=1&duration_s=48&artifacts=false&effect=3"
SMALL = FinetuneProbeConfig(epochs=2, batch_size=16)


def tiny_encoder(seed: int) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(get_config("tiny", dim=32, depth=1, ffn_hidden=64))


def test_an_encoder_equal_to_its_twin_gets_exactly_its_twins_score():
    """Seed 0's random-init twin is the encoder itself: identical batches, head init and
    budget must then give identical predictions, fold by fold."""
    encoder = tiny_encoder(0)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    result = finetune_probe(encoder, SOURCE, SMALL, seed=0, random_seeds=1)
    assert result["protocol"] == "finetune" and result["classes"] == 4
    assert result["groups"] == 3 and len(result["folds"]) == 3
    assert result["pretrained"] == result["random_init"], result
    assert result["difference"]["mean"] == 0.0 and result["difference"]["n_positive"] == 0
    for fold in result["folds"]:
        assert fold["pretrained"] == fold["random_init"][0], fold
    # the probe trains copies: the caller's encoder is untouched
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_another_encoder_gets_other_scores_and_the_difference_is_per_fold():
    result = finetune_probe(tiny_encoder(7), SOURCE, SMALL, seed=0, random_seeds=2)
    per_fold = [f["pretrained"] - np.mean(f["random_init"]) for f in result["folds"]]
    assert result["difference"]["mean"] == pytest.approx(np.mean(per_fold))
    assert result["difference"]["n_positive"] == sum(d > 0 for d in per_fold)
    assert len(result["random_init_each"]) == 2
    assert any(d != 0 for d in per_fold), result  # a different start trains to other weights
    for score in (result["pretrained"], *result["random_init_each"]):
        assert 0.0 <= score <= 1.0


def test_folds_leave_whole_groups_out():
    y = np.repeat([0, 1], 30)
    groups = np.tile(np.repeat(["a", "b", "c"], 10), 2)
    for train, test in folds(y, groups):
        assert not set(groups[train]) & set(groups[test])


@pytest.mark.parametrize(
    "cfg",
    [FinetuneProbeConfig(epochs=0), FinetuneProbeConfig(head_lr=0), FinetuneProbeConfig(lr=-1)],
)
def test_a_bad_budget_is_refused_before_any_window_loads(cfg):
    with pytest.raises(ValueError, match="must be|need"):
        finetune_probe(tiny_encoder(0), "no-such-source:", cfg)


def test_cli_writes_the_result_and_the_report_labels_it(tmp_path):
    folder = tiny_encoder(3).save_pretrained(tmp_path / "encoder")
    out = tmp_path / "probe.json"
    cmd = [sys.executable, "-m", "cluster.cli", "probe", "--model", str(folder)]
    cmd += ["--source", SOURCE, "--finetune", "--epochs", "1", "--random-seeds", "1"]
    done = subprocess.run(
        [*cmd, "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "fine-tuning probe (mean pooling)" in done.stdout, done.stdout
    assert "fold 3/3" in done.stdout and "folds above" in done.stdout, done.stdout
    result = json.loads(out.read_text())
    assert result["finetune"]["epochs"] == 1 and result["model"] == str(folder)
    from finetune.report import probe_rows

    (row,) = probe_rows(result)
    assert row[0] == "fine-tuned probe balanced accuracy (4 classes)"
    assert f"({result['difference']['n_positive']}/3 folds above it)" in row[2]
