"""Issue 11, faults 8 and 9: saved folders are verified by sha256 at load, and `brainmoe
generate` checks its inputs before loading any model.

Everything is tiny and in-process: a random-weight "tiny" encoder, a tiny random Llama built
into a tmp folder, and a stand-in for DeepSpeed's ZeRO consolidation so the real export code
writes the encoder folder.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import sys
import time
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune.generate
from cluster.cli import build_parser, main
from finetune.heads.text import PROJECTOR_FILE, TextHead, TextHeadConfig
from finetune.model import MultiTaskModel
from finetune.multitask import TaskWeighting, TaskWeightingConfig
from finetune.tiny.llm import build_tiny_llm
from pretrain.artifacts import ArtifactError, UnverifiedArtifactWarning, file_digest
from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config

CAPTIONS = ["a red apple on a table", "a dog running on the beach"]
PROJECTOR = f"text/{PROJECTOR_FILE}"


# ---- helpers -------------------------------------------------------------------------------


def _model(lm: Path, seed: int) -> MultiTaskModel:
    """Tiny encoder + text head + gate (the gate is saved in multitask.safetensors)."""
    torch.manual_seed(seed)
    encoder = Encoder(get_config("tiny"))
    dim = encoder.config.dim
    head = TextHead(TextHeadConfig(base=str(lm), prefix_tokens=2), encoder_dim=dim)
    weighting = TaskWeighting(TaskWeightingConfig(mode="gate"), ["text"], dim)
    return MultiTaskModel(encoder, {"text": head}, weighting).eval()


def _data_start(path: Path) -> int:
    """Offset of the first tensor byte: 8-byte header length, then the JSON header."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def _flip(path: Path, offset: int, n: int = 4) -> None:
    blob = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        blob[i] ^= 0xFF
    path.write_bytes(bytes(blob))


def _flip_data(path: Path) -> None:
    start = _data_start(path)
    _flip(path, start + (path.stat().st_size - start) // 2)


def _break_header(path: Path) -> None:
    _flip(path, 9)  # inside the JSON header: no longer valid JSON / UTF-8


def _strip_checksums(folder: Path) -> None:
    """Make a folder look like one saved before checksums existed."""
    for meta in folder.rglob("*.json"):
        data = json.loads(meta.read_text())
        if isinstance(data, dict) and data.pop("checksums", None) is not None:
            meta.write_text(json.dumps(data))


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory) -> Path:
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), corpus=CAPTIONS)


@pytest.fixture(scope="module")
def saved(tiny_lm, tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A saved finetune output and the projector weights it holds."""
    model = _model(tiny_lm, seed=0)
    folder = model.save_adapters(tmp_path_factory.mktemp("out") / "adapters", {"tasks": ["text"]})
    projector = {k: v.clone() for k, v in model.heads["text"].projector.state_dict().items()}
    return folder, projector


@pytest.fixture
def adapters(saved, tmp_path) -> Path:
    """A fresh copy of the saved output, for one test to damage."""
    return Path(shutil.copytree(saved[0], tmp_path / "adapters"))


def _projector_equal(model: MultiTaskModel, expected: dict[str, torch.Tensor]) -> bool:
    state = model.heads["text"].projector.state_dict()
    return all(torch.equal(state[k], v) for k, v in expected.items())


# ---- fault 8: checksums ----------------------------------------------------------------------


def test_saved_folders_list_every_file_with_sha256_and_size(adapters):
    top = json.loads((adapters / "finetune.json").read_text())["checksums"]
    head = json.loads((adapters / "text" / "text_head.json").read_text())["checksums"]
    assert {"multitask.safetensors", PROJECTOR, "text/lora/adapter_model.safetensors"} <= set(top)
    assert set(head) == {
        PROJECTOR_FILE,
        "lora/adapter_model.safetensors",
        "lora/adapter_config.json",
    }
    assert top[PROJECTOR] == head[PROJECTOR_FILE] == file_digest(adapters / PROJECTOR)


def test_intact_folder_loads_verified(adapters, saved, tiny_lm):
    model = _model(tiny_lm, seed=1)
    assert not _projector_equal(model, saved[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedArtifactWarning)
        model.load_adapters(adapters)
    assert _projector_equal(model, saved[1])


def test_flipped_projector_data_is_refused_naming_the_file(adapters, saved, tiny_lm):
    path = adapters / PROJECTOR
    _flip_data(path)
    # the fault: safetensors reads the damaged file without complaint, other weights in it
    damaged = load_file(str(path))
    assert any(not torch.equal(damaged[k], v) for k, v in saved[1].items())

    model = _model(tiny_lm, seed=1)
    with pytest.raises(ArtifactError, match=r"text/projector\.safetensors.*re-download"):
        model.load_adapters(adapters)
    with pytest.raises(ValueError, match=r"projector\.safetensors does not match the sha256"):
        model.heads["text"].load_adapter(adapters / "text")  # the head checks on its own too


def test_damaged_header_is_the_same_clear_error(adapters, tiny_lm):
    _break_header(adapters / PROJECTOR)
    with pytest.raises(ArtifactError, match=r"text/projector\.safetensors"):
        _model(tiny_lm, seed=1).load_adapters(adapters)


def test_folder_without_checksums_loads_with_a_warning(adapters, saved, tiny_lm):
    _strip_checksums(adapters)
    model = _model(tiny_lm, seed=1)
    with pytest.warns(UnverifiedArtifactWarning, match="no checksums"):
        model.load_adapters(adapters)
    assert _projector_equal(model, saved[1])
    # ...and a damaged header there is still the clear error, not a SafetensorError
    _break_header(adapters / PROJECTOR)
    with (
        pytest.warns(UnverifiedArtifactWarning),
        pytest.raises(ArtifactError, match=r"projector\.safetensors is not a readable"),
    ):
        _model(tiny_lm, seed=1).load_adapters(adapters)


@pytest.fixture
def exported(tmp_path, monkeypatch) -> tuple[Path, Encoder]:
    """An encoder folder written by the real `export_checkpoint`, with ZeRO's consolidation
    (`get_fp32_state_dict_from_zero_checkpoint`) replaced by the encoder's own state."""
    from pretrain.export import export_checkpoint

    torch.manual_seed(0)
    config = get_config("tiny")
    encoder = Encoder(config)
    state = {f"encoder.{k}": v.clone() for k, v in encoder.state_dict().items()}
    zero = types.ModuleType("deepspeed.utils.zero_to_fp32")
    zero.get_fp32_state_dict_from_zero_checkpoint = lambda root, tag: state
    for name in ("deepspeed", "deepspeed.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "deepspeed.utils.zero_to_fp32", zero)
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step1").mkdir(parents=True)
    (ckpt / "latest").write_text("step1")
    (ckpt / "step1" / "encoder_config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return export_checkpoint(ckpt, tmp_path / "encoder"), encoder


def test_exported_encoder_is_verified(exported):
    folder, encoder = exported
    sums = json.loads((folder / "config.json").read_text())["checksums"]
    assert sums == {"model.safetensors": file_digest(folder / "model.safetensors")}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnverifiedArtifactWarning)
        loaded = Encoder.from_pretrained(folder)
    assert all(torch.equal(v, encoder.state_dict()[k]) for k, v in loaded.state_dict().items())

    _flip_data(folder / "model.safetensors")
    with pytest.raises(ArtifactError, match=r"model\.safetensors.*re-export"):
        Encoder.from_pretrained(folder)


def test_exported_encoder_without_checksums_warns_and_names_a_bad_header(exported):
    folder, _ = exported
    _strip_checksums(folder)
    with pytest.warns(UnverifiedArtifactWarning):
        Encoder.from_pretrained(folder)
    _break_header(folder / "model.safetensors")
    with (
        pytest.warns(UnverifiedArtifactWarning),
        pytest.raises(ArtifactError, match=r"model\.safetensors is not a readable"),
    ):
        Encoder.from_pretrained(folder)


# ---- fault 9: generate checks its inputs first ----------------------------------------------


@pytest.fixture
def no_model_loading(monkeypatch) -> list[str]:
    """Model loading replaced by a recorder that fails the test if it is reached."""
    calls: list[str] = []

    def load(uri, *args, **kwargs):
        calls.append(uri)
        raise AssertionError("generate reached model loading")

    monkeypatch.setattr(finetune.generate, "load_finetuned", load)
    return calls


@pytest.fixture
def model_folder(tmp_path) -> Path:
    """A finetune output's structure (finetune.json naming an existing encoder folder)."""
    (tmp_path / "encoder").mkdir()
    folder = tmp_path / "adapters"
    folder.mkdir()
    (folder / "finetune.json").write_text(json.dumps({"encoder_uri": str(tmp_path / "encoder")}))
    return folder


def _generate(capsys, *argv: str) -> tuple[int, str, float]:
    """(exit code, stderr, seconds) of `brainmoe generate argv`, timed after the parser is
    built (building it imports the shards layer once per process, ~4 s of CPU, whatever
    the command)."""
    build_parser()
    start = time.perf_counter()
    rc = main(["generate", *argv])
    return rc, capsys.readouterr().err, time.perf_counter() - start


def test_generate_with_missing_eeg_fails_before_loading_models(
    model_folder, no_model_loading, tmp_path, capsys
):
    missing = tmp_path / "missing.edf"
    rc, err, elapsed = _generate(
        capsys, "--model", str(model_folder), "--eeg", str(missing), "--out", str(tmp_path / "o")
    )
    assert rc == 2 and not no_model_loading
    assert err.strip() == f"error: --eeg {missing}: no such file", err
    assert "loading model" not in err
    assert elapsed < 2.0, f"{elapsed:.1f} s to report a missing file (model loading is ~10 s)"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "case, message",
    [
        ("bad_uri", "is not models:/<name>@<alias>"),
        ("out_is_file", "a file is in the way"),
        ("no_finetune_json", "not a finetune output"),
        ("encoder_missing", "the encoder of --model"),
        ("shards_missing", "--shards .*: no such folder"),
        ("keys_with_eeg", "--keys selects windows of --shards"),
    ],
)
def test_generate_refuses_bad_inputs_before_loading(
    case, message, model_folder, no_model_loading, tmp_path, capsys
):
    eeg = tmp_path / "rec.edf"
    eeg.write_bytes(b"")
    model, out, source = str(model_folder), str(tmp_path / "o"), ["--eeg", str(eeg)]
    if case == "bad_uri":
        model = "models:/heads"
    elif case == "out_is_file":
        out = str(eeg)
    elif case == "no_finetune_json":
        (model_folder / "finetune.json").unlink()
    elif case == "encoder_missing":
        (model_folder / "finetune.json").write_text(json.dumps({"encoder_uri": "gone/"}))
    elif case == "shards_missing":
        source = ["--shards", str(tmp_path / "nope"), "--keys", "k1"]
    elif case == "keys_with_eeg":
        source += ["--keys", "k1"]
    rc, err, _ = _generate(capsys, "--model", model, *source, "--out", out)
    assert rc == 2 and not no_model_loading, err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
