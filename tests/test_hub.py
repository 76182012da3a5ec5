"""Hugging Face Hub conventions, offline: a repo id resolves through a pre-filled Hub cache
(the layout `hf download` leaves: models--org--name/{blobs,snapshots/<commit>,refs/main}) to
the very weights saved, checksums still checked; a push that cannot succeed says why before
any work; and the model card of an export parses as Hub metadata with the model's sizes, the
training corpus (from a real shard build's manifest) and real evaluation results."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cluster.cli import main as brainmoe
from pretrain.artifacts import ArtifactError
from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from tests.conftest import REPO, free_port

REPO_ID = "brainmoe-test/tiny-encoder"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SYNTH = "synthetic?subjects=2&runs=1&duration_s=40"


def trained_like_tiny(seed: int = 0) -> Encoder:
    """A tiny encoder with non-zero router biases (balancing state must travel too)."""
    torch.manual_seed(seed)
    model = Encoder(get_config("tiny"))
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router_bias.add_(0.1 * torch.randn(layer.n_experts))
    return model.eval()


def sample_batch() -> dict:
    gen = torch.Generator().manual_seed(1)
    names = ["Fp1", "Fp2", "C3", "Cz", "C4", "O1", "O2", "T7"]
    return {"eeg": 20 * torch.randn(2, 8, 1000, generator=gen), "ch_names": [names] * 2,
            "sfreq": [250.0, 250.0]}  # fmt: skip


def fill_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str = COMMIT) -> Path:
    """Write ``folder`` into ``cache`` as the Hub cache holds a downloaded repo: content-
    addressed blobs (sha256 for LFS files, the git blob sha1 otherwise), a snapshot of
    relative symlinks per commit, and refs/main naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in sorted(folder.iterdir()):
        data = file.read_bytes()
        if file.suffix == ".safetensors":
            blob = hashlib.sha256(data).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path) -> tuple[Path, Encoder, dict]:
    """A Hub cache holding REPO_ID (an exported-style folder: weights, config, card)."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    from pretrain.model_card import write_model_card

    model = trained_like_tiny()
    folder = model.save_pretrained(tmp_path / "saved")
    write_model_card(folder, repo_id=REPO_ID)
    cache = tmp_path / "hub"
    snapshot = fill_hub_cache(cache, REPO_ID, folder)
    # huggingface_hub itself must see a complete, valid cached repo
    report = scan_cache_dir(cache)
    assert report.warnings == [], report.warnings
    (repo,) = report.repos
    assert repo.repo_id == REPO_ID and {r.commit_hash for r in repo.revisions} == {COMMIT}
    files = {f.file_name for r in repo.revisions for f in r.files}
    assert files == {"config.json", "model.safetensors", "README.md"}
    hit = try_to_load_from_cache(REPO_ID, "model.safetensors", cache_dir=cache)
    assert Path(hit) == snapshot / "model.safetensors"
    with torch.no_grad():
        expected = model(sample_batch())
    return cache, model, {"tokens": expected.tokens, "valid": expected.valid}


SCRIPT = """
import json, sys, torch
from pretrain.encoder import Encoder
out, repo, cache = sys.argv[1:4]
batch = torch.load(out + "/batch.pt", weights_only=False)
result = {}
def error(call):
    try:
        call()
    except ValueError as err:
        return str(err)
    return None
model = Encoder.from_pretrained(repo).eval()
with torch.no_grad():
    got = model(batch)
torch.save({"tokens": got.tokens, "valid": got.valid, "state": model.state_dict()}, out + "/got.pt")
result["missing"] = error(lambda: Encoder.from_pretrained(repo + "-missing"))
# every command that takes a model takes a repo id: they all resolve through these two
from pretrain.braindecode_model import resolve_encoder
from pretrain.tracking import resolve_model
result["resolved"] = [str(resolve_model(repo)), str(resolve_encoder(repo))]
result["push"] = error(lambda: model.push_to_hub(repo))
result["push_token"] = error(lambda: model.push_to_hub(repo, token="hf_not_a_real_token"))
# `brainmoe export --push-to-hub` checks the push before it reads the checkpoint
import contextlib, io
from cluster.cli import main
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(["export", out + "/no-checkpoint", out + "/exported", "--push-to-hub", repo])
result["cli_push"] = [code, err.getvalue()]
print(json.dumps(result))
"""


def run_script(tmp_path: Path, env: dict[str, str]) -> dict:
    torch.save(sample_batch(), tmp_path / "batch.pt")
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    base.update(OMP_NUM_THREADS="1", HF_HOME=str(tmp_path / "hf-home"), **env)
    cmd = [sys.executable, "-c", SCRIPT, str(tmp_path), REPO_ID, env.get("HF_HUB_CACHE", "")]
    done = subprocess.run(cmd, cwd=REPO, env=base, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def assert_same_model(tmp_path: Path, model: Encoder, expected: dict) -> None:
    got = torch.load(tmp_path / "got.pt", weights_only=False)
    assert torch.equal(got["tokens"], expected["tokens"])
    assert torch.equal(got["valid"], expected["valid"])
    state = model.state_dict()
    assert got["state"].keys() == state.keys()
    assert all(torch.equal(got["state"][k], v) for k, v in state.items())


def test_repo_id_loads_from_the_hub_cache_offline(hub_cache, tmp_path):
    """HF_HUB_OFFLINE=1 + HF_HUB_CACHE: `from_pretrained("org/name")` is the saved model."""
    cache, model, expected = hub_cache
    result = run_script(tmp_path, {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    assert_same_model(tmp_path, model, expected)
    snapshot = cache / f"models--{REPO_ID.replace('/', '--')}" / "snapshots" / COMMIT
    assert result["resolved"] == [str(snapshot)] * 2
    assert f"'{REPO_ID}-missing' is not a local folder" in result["missing"]
    assert "not in the Hub cache" in result["missing"] and "hf download" in result["missing"]
    assert "HF_HUB_OFFLINE is set" in result["push"]
    code, stderr = result["cli_push"]
    assert code == 2 and "HF_HUB_OFFLINE is set" in stderr, stderr
    assert not (tmp_path / "exported").exists()


def test_hub_down_falls_back_to_the_cache_and_push_says_why(hub_cache, tmp_path):
    """Online mode with the Hub unreachable (a closed local port as HF_ENDPOINT): loading uses
    the cached snapshot; a push without a token, or to the dead endpoint, is a clear error."""
    cache, model, expected = hub_cache
    endpoint = f"http://127.0.0.1:{free_port()}"
    result = run_script(tmp_path, {"HF_HUB_CACHE": str(cache), "HF_ENDPOINT": endpoint})
    assert_same_model(tmp_path, model, expected)
    assert "no Hugging Face token" in result["push"] and "hf auth login" in result["push"]
    assert f"to {REPO_ID} at {endpoint} failed" in result["push_token"]
    code, stderr = result["cli_push"]
    assert code == 2 and "no Hugging Face token" in stderr, stderr


def test_cached_snapshot_keeps_the_checksum_check(hub_cache):
    cache, model, _ = hub_cache
    kw = {"cache_dir": cache, "local_files_only": True}
    pinned = Encoder.from_pretrained(REPO_ID, revision=COMMIT, **kw)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in pinned.state_dict().items())
    with pytest.raises(ValueError, match="not in the Hub cache"):
        Encoder.from_pretrained(REPO_ID, revision="v2", **kw)
    with pytest.raises(ValueError, match="no such folder, and not a Hub repo id"):
        Encoder.from_pretrained("runs/typo/encoder", **kw)
    # one flipped byte in the cached blob: refused, naming the file, before any tensor is read
    (blob,) = (cache / f"models--{REPO_ID.replace('/', '--')}" / "blobs").glob("?" * 64)
    data = bytearray(blob.read_bytes())
    data[-10] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors does not match the sha256"):
        Encoder.from_pretrained(REPO_ID, **kw)


# ---- model card ----------------------------------------------------------------------------


@pytest.fixture
def exported_like(tmp_path) -> tuple[Path, Path, dict]:
    """An encoder folder with the lineage.json a run leaves (the shard manifest's sha256 and
    the resolved config), over a real tiny shard build."""
    from pretrain.config import PretrainConfig, load_run_config
    from shards.build import BuildConfig, build
    from shards.config import load_config, to_dict

    corpus = tmp_path / "corpus"
    build(load_config(BuildConfig, sources=[SYNTH], out=str(corpus), workers=0))
    manifest = (corpus / "manifest.json").read_bytes()
    cfg = load_run_config(
        PretrainConfig, REPO / "configs/pretrain/tiny.yaml", [f"data.shards=[{corpus}]"]
    )
    folder = trained_like_tiny().save_pretrained(tmp_path / "encoder")
    lineage = {
        "shard_manifests": {str(corpus): hashlib.sha256(manifest).hexdigest()},
        "config": to_dict(cfg),
        "step": 300,
        "world_size": 2,
        "launcher": "deepspeed",
    }
    (folder / "lineage.json").write_text(json.dumps(lineage))
    return folder, corpus, json.loads(manifest)


def real_evals(folder: Path, corpus: Path, tmp_path: Path) -> list[Path]:
    """`brainmoe evaluate moabb --json` (MOABB's FakeDataset: no download) and the
    reconstruction scores of a tiny masked-signal model on the corpus."""
    from pretrain import reconstruction
    from pretrain.config import PretrainConfig, load_run_config
    from pretrain.model import build_model

    moabb = tmp_path / "moabb.json"
    args = ["evaluate", "moabb", "--model", str(folder), "--dataset", "FakeDataset"]
    args += ["--subjects", "1,2", "--paradigm", "MotorImagery", "--random-seeds", "1"]
    assert brainmoe([*args, "--device", "cpu", "--json", str(moabb)]) == 0
    cfg = load_run_config(PretrainConfig, REPO / "configs/pretrain/tiny.yaml", [])
    torch.manual_seed(0)
    batches = reconstruction.iter_batches(str(corpus), 4, 8)
    result = reconstruction.evaluate(build_model(cfg).eval(), batches)
    result.pop("_examples")
    recon = tmp_path / "recon.json"
    recon.write_text(json.dumps({**result, "source": str(corpus)}))
    return [recon, moabb]


def test_model_card_metadata_parses_with_sizes_data_and_evals(exported_like, tmp_path):
    from huggingface_hub import ModelCard

    from pretrain.model_card import load_evals, write_model_card

    folder, corpus, manifest = exported_like
    evals = real_evals(folder, corpus, tmp_path)
    # a result file of another kind is refused by `brainmoe export` before the checkpoint
    # is even looked at
    (tmp_path / "other.json").write_text('{"accuracy": 0.9}')
    bad = ["export", str(tmp_path / "no-checkpoint"), str(tmp_path / "out")]
    assert brainmoe([*bad, "--eval", str(tmp_path / "other.json")]) == 2
    assert not (tmp_path / "out").exists()

    path = write_model_card(folder, evals=load_evals(evals), license="apache-2.0", repo_id=REPO_ID)
    card = ModelCard.load(path)
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "brainmoe"
    assert {"eeg", "bci"} <= set(data["tags"]) and data["datasets"] == ["synthetic"]
    meta = data["brainmoe"]
    assert meta["parameters"] == Encoder.from_pretrained(folder).num_parameters()
    arch = meta["architecture"]
    assert (arch["dim"], arch["depth"], arch["n_experts"], arch["top_k"]) == (64, 2, 4, 2)
    assert (arch["patch_len"], arch["sfreq"]) == (200, 200.0)
    # the corpus as its manifest has it: 2 synthetic subjects, windows x 4 s
    recs = manifest["recordings"]
    subjects = {r["provenance"]["subject"] for r in recs if r["windows"]}
    hours = round(sum(r["windows"] for r in recs) * manifest["window_s"] / 3600, 3)
    train = meta["training_data"]["datasets"]["synthetic"]
    assert train["subjects"] == len(subjects) == 2 and train["hours"] == hours > 0
    assert train["channels"] == sorted({r["n_channels"] for r in recs if r["windows"]})
    # evaluation figures: in model-index and in the text
    moabb = json.loads(evals[1].read_text())
    scores = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert (
        scores["accuracy (linear probe on frozen features)"]
        == moabb["pipelines"]["brainmoe"]["score"]
    )
    assert scores["R^2 (random)"] == json.loads(evals[0].read_text())["random"]["model"]
    text = card.text
    assert f'Encoder.from_pretrained("{REPO_ID}")' in text
    assert "| CSP+LDA |" in text and "| random | spline |" in text
    assert "mask_ratio: 0.6" in text and "tracking:" not in text  # resolved, minus servers

    # a corpus rebuilt since training is not described as the training data
    lineage = json.loads((folder / "lineage.json").read_text())
    lineage["shard_manifests"] = {str(corpus): "0" * 64}
    (folder / "lineage.json").write_text(json.dumps(lineage))
    card = ModelCard.load(write_model_card(folder))
    assert card.data.datasets is None and "changed since training" in card.text
