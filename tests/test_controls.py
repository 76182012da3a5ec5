"""The honest controls of the held-out evaluation, on real synthetic shards, a tiny random
encoder and a tiny Llama: noise of the EEG's own power, the most frequent training caption,
free-running captions that never see the reference, the closing report table, and a contact
sheet whose HTML survives being moved."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections import Counter

import pytest
import torch

from finetune import metrics
from finetune.config import FinetuneConfig
from finetune.evaluate import captions, encode_test, training_captions
from finetune.heads.text import TextHead, TextHeadConfig
from finetune.model import MultiTaskModel
from finetune.splits import SplitConfig, index_shards, make_split
from finetune.stimuli import Stimulus, StimulusSet, stimuli_for
from finetune.synthetic_stimuli import synthetic_captions
from finetune.tiny.llm import build_tiny_llm
from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from shards.build import BuildConfig, build
from shards.config import load_config
from tests.conftest import REPO

SPEC = "synthetic?subjects=2&runs=1&duration_s=40&classes=2&instances=3&artifacts=false"
CAPTIONS = ["a red apple on a table", "a dog running on the beach"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shards of 6 synthetic stimuli, their split and stimulus set, and a tiny encoder."""
    root = tmp_path_factory.mktemp("controls")
    shards = root / "shards"
    build(load_config(BuildConfig, sources=[SPEC], out=str(shards), workers=0))
    rows = index_shards([str(shards)])
    split = make_split(rows, SplitConfig(test_fraction=0.34))
    stimuli = stimuli_for([r.stimulus_id for r in rows], render_dir=root / "stimuli")
    torch.manual_seed(0)
    encoder = Encoder(get_config("tiny")).eval()
    return {
        "root": root,
        "shards": [str(shards)],
        "split": split,
        "stimuli": stimuli,
        "enc": encoder,
    }


def _encode(world, limit=40, noise_seed=None):
    cfg = FinetuneConfig()
    cfg.data.shards = world["shards"]
    return encode_test(
        MultiTaskModel(world["enc"], {}, torch.nn.Identity()),  # only its encoder is read
        cfg,
        world["split"],
        dict,  # the stimulus side of the batch plays no part in the noise control
        torch.device("cpu"),
        torch.float32,
        limit,
        noise_seed,
    )


def test_matched_power_noise_keeps_each_channels_power_and_the_padding():
    gen = torch.Generator().manual_seed(0)
    eeg = torch.randn(3, 5, 400, generator=gen) * torch.tensor([1.0, 5.0, 20.0, 0.1, 3.0])[:, None]
    channel_mask = torch.ones(3, 5, dtype=torch.bool)
    channel_mask[1, 3:] = False
    time_mask = torch.ones(3, 400, dtype=torch.bool)
    time_mask[2, 250:] = False
    eeg = eeg * channel_mask[:, :, None] * time_mask[:, None, :]  # zero padding, as collated
    noise = metrics.matched_power_noise(
        eeg, channel_mask, time_mask, torch.Generator().manual_seed(1)
    )
    n = time_mask.sum(-1)[:, None].float()  # [B, 1]
    power, noise_power = eeg.pow(2).sum(-1) / n, noise.pow(2).sum(-1) / n  # [B, C]
    torch.testing.assert_close(noise_power, power, rtol=1e-5, atol=1e-9)
    assert (noise[1, 3:] == 0).all() and (noise[2, :, 250:] == 0).all()
    again = metrics.matched_power_noise(
        eeg, channel_mask, time_mask, torch.Generator().manual_seed(1)
    )
    assert torch.equal(noise, again)
    with pytest.raises(ValueError, match="channel_mask"):
        metrics.matched_power_noise(eeg, channel_mask[:, :4], time_mask, gen)


def test_noise_control_replaces_the_eeg_by_noise_of_its_per_channel_power(world):
    real, noise = _encode(world), _encode(world, noise_seed=4)
    assert [b["key"] for b, _, _ in real] == [b["key"] for b, _, _ in noise]
    for (rb, rtok, _), (nb, ntok, _) in zip(real, noise, strict=True):
        x, z = rb["eeg"].float(), nb["eeg"].float()  # [B, C, T] uV
        keep = rb["channel_mask"][:, :, None] & rb["time_mask"][:, None, :]
        n = keep.sum(-1).clamp(min=1)
        torch.testing.assert_close(z.pow(2).sum(-1) / n, x.pow(2).sum(-1) / n, rtol=1e-4, atol=1e-6)
        assert (z[~keep] == 0).all()
        # noise, not the EEG rescaled: uncorrelated with it channel by channel
        xc, zc = x - x.mean(-1, keepdim=True), z - z.mean(-1, keepdim=True)
        corr = (xc * zc).sum(-1) / (xc.norm(dim=-1) * zc.norm(dim=-1) + 1e-12)  # [B, C]
        assert corr[rb["channel_mask"]].abs().mean() < 0.05, corr
        assert not torch.allclose(rtok, ntok), "the encoder saw the same input twice"


def test_prior_control_is_the_most_frequent_training_caption(world):
    taught = training_captions(world["shards"], world["split"], world["stimuli"])
    assert len(taught) == len(world["split"].train_keys)
    train_ids = set(world["split"].train_stimuli)
    allowed = {c for s in train_ids for c in world["stimuli"][s].captions}
    assert set(taught) <= allowed
    prior = metrics.most_frequent(taught)
    counts = Counter(taught)
    assert counts[prior] == max(counts.values())
    # "a red circle" names a class, shared by its instances, so it outnumbers any caption
    # that names one instance's size and position
    per_class = {synthetic_captions(k, i)[1] for k in range(2) for i in range(3)}
    assert prior in per_class, (prior, counts.most_common(3))
    assert metrics.most_frequent(["b", "a", "b", "a", "c"]) == "a"  # a tie: alphabetical
    with pytest.raises(ValueError, match="at least one"):
        metrics.most_frequent([])


@pytest.fixture(scope="module")
def taught_head(tmp_path_factory):
    """A text head that learnt to say CAPTIONS[i] for EEG tokens i (as in test_text_head)."""
    lm = build_tiny_llm(tmp_path_factory.mktemp("llm"), corpus=CAPTIONS)
    torch.manual_seed(0)
    head = TextHead(TextHeadConfig(base=str(lm), prefix_tokens=4), encoder_dim=16)
    tokens = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(1))  # [B, N, D]
    valid = torch.ones(2, 6, dtype=torch.bool)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=5e-3)
    for _ in range(30):
        loss = head(tokens, valid, {"captions": CAPTIONS})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return head.eval(), tokens, valid


def _stimuli(captions_of):
    return StimulusSet(
        Stimulus(f"s{i}", None, f"concept{i}", [c]) for i, c in enumerate(captions_of)
    )


def test_free_running_captions_do_not_see_the_reference(taught_head):
    head, tokens, valid = taught_head
    batch = {"key": ["w0", "w1"], "stimulus_id": ["s0", "s1"]}
    encoded = [(batch, tokens, valid)]
    noise_tokens = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(9))
    noise = [(batch, noise_tokens, valid)]
    right = captions(head, encoded, noise, _stimuli(CAPTIONS), prior=CAPTIONS[0])
    wrong = captions(head, encoded, noise, _stimuli(["zebra zebra", "blue sky"]), prior="x")
    written = [e["predicted"] for e in right["examples"]]
    assert written == CAPTIONS, written
    assert [e["predicted"] for e in wrong["examples"]] == written, "the reference leaked in"
    assert written == head.generate(tokens, valid, max_new_tokens=head.config.max_caption_tokens)
    assert right["report"]["bleu4"]["value"] == pytest.approx(1.0)
    assert wrong["report"]["bleu4"]["value"] == 0.0
    assert right["distinct_captions"] == 2 and right["concepts"] == 2
    controls = right["controls"]
    assert set(controls) == {"shuffled", "noise", "prior"}
    assert controls["prior"] == metrics.caption_scores([CAPTIONS[0]] * 2, [[c] for c in CAPTIONS])
    noise_written = [e["from_noise"] for e in right["examples"]]
    assert controls["noise"] == metrics.caption_scores(noise_written, [[c] for c in CAPTIONS])
    assert controls["prior"]["bleu4"] < right["report"]["bleu4"]["value"]
    assert right["report"]["bleu4"]["control"] == controls["shuffled"]["bleu4"]


def _eval_json() -> dict:
    row = lambda v, c: {"value": v, "control": c, "margin": v - c}  # noqa: E731
    text = {"bleu1": 0.61, "bleu4": 0.32, "rougeL": 0.55}
    return {
        "windows": 64,
        "retrieval": {
            "stimuli": 8,
            "chance_top1": 0.125,
            "chance_zero_shot": 0.25,
            "report": {
                "top1": row(0.5, 0.125),
                "top5": row(0.875, 0.625),
                "window_top1": row(0.31, 0.12),
                "zero_shot": row(0.44, 0.26),
            },
        },
        "text": {
            "windows": 64,
            "concepts": 4,
            "distinct_captions": 5,
            "distinct_noise_captions": 1,
            "report": {k: row(v, 0.2) for k, v in text.items()},
            "controls": {
                "shuffled": {k: 0.2 for k in text},
                "noise": {k: 0.15 for k in text},
                "prior": {k: 0.18 for k in text},
            },
        },
        "image": {
            "images": 8,
            "n_way": 4,
            "report": {"clip_similarity": row(0.71, 0.64), "semantic_top1": row(0.5, 0.3)},
        },
    }


def test_report_prints_every_row(tmp_path):
    probe = {"classes": 4, "pretrained": 0.274, "random_init": 0.248, "chance": 0.25}
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    (tmp_path / "eval.json").write_text(json.dumps(_eval_json()))
    cmd = [sys.executable, "-m", "finetune.report"]
    args = ["--probe", str(tmp_path / "probe.json"), "--eval", str(tmp_path / "eval.json")]
    done = subprocess.run(cmd + args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert re.match(r"\| metric +\| model +\| controls +\| chance +\|", lines[0]), lines[0]
    expected = [
        ("probe balanced accuracy", "0.274", "random-init 0.248", "0.250"),
        ("retrieval top-1 (8 held-out stimuli)", "0.500", "shuffled 0.125", "0.125"),
        ("retrieval top-5", "0.875", "shuffled 0.625", "0.625"),
        ("per-window top-1", "0.310", "shuffled 0.120", "0.125"),
        ("zero-shot concept accuracy", "0.440", "shuffled 0.260", "0.250"),
        ("distinct captions (64 held-out windows)", "5", "classes 4, from noise 1", "-"),
        ("BLEU-1", "0.610", "shuffled 0.200, noise 0.150, prior 0.180", "-"),
        ("BLEU-4", "0.320", "shuffled 0.200, noise 0.150, prior 0.180", "-"),
        ("ROUGE-L", "0.550", "shuffled 0.200, noise 0.150, prior 0.180", "-"),
        ("CLIP similarity (8 images)", "0.710", "shuffled 0.640", "-"),
        ("semantic top-1 (4-way)", "0.500", "shuffled 0.300", "0.250"),
    ]
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert len(body) == len(expected), done.stdout
    for cells, (metric, model, controls, chance) in zip(body, expected, strict=True):
        assert cells[0].startswith(metric) and cells[1:] == [model, controls, chance], cells
    missing = subprocess.run(
        [*cmd, "--eval", str(tmp_path / "nope.json")], cwd=REPO, capture_output=True, text=True
    )
    assert (
        missing.returncode != 0
        and "nope.json" in missing.stderr
        and "does not exist" in (missing.stderr)
    )


def test_contact_sheet_html_has_only_relative_paths(world, tmp_path):
    from finetune.generate import generate
    from finetune.inputs import windows_from_shards
    from finetune.model import MultiTaskModel
    from finetune.multitask import TaskWeighting, TaskWeightingConfig

    encoder = world["enc"]
    torch.manual_seed(0)
    lm = build_tiny_llm(tmp_path / "llm", corpus=CAPTIONS)
    head = TextHead(
        TextHeadConfig(base=str(lm), prefix_tokens=2, max_new_tokens=4), encoder.config.dim
    )
    weighting = TaskWeighting(TaskWeightingConfig(), ["text"], encoder.config.dim)
    model = MultiTaskModel(encoder, {"text": head}, weighting).eval()
    keys = world["split"].test_keys[:2]
    out = tmp_path / "generated"
    generate(model, windows_from_shards(world["shards"], keys), out, stimuli=world["stimuli"])
    page = (out / "index.html").read_text()
    sources = re.findall(r"src=[\"']([^\"']+)[\"']", page)
    assert len(sources) == 1 + len(keys), sources  # the sheet + one stimulus per window
    for src in sources:
        assert not src.startswith(("/", "file:")) and ":" not in src, src
    (tmp_path / "elsewhere").mkdir()
    moved = shutil.move(str(out), str(tmp_path / "elsewhere" / "sheet"))
    for src in sources:
        assert (tmp_path / "elsewhere" / "sheet" / src).is_file(), (moved, src)
    assert str(tmp_path) not in page
