"""Registered models are MLflow pyfunc models: `mlflow.pyfunc.load_model` and `mlflow models
serve` answer with what the encoder (and the heads) compute in process, on real EEG.

A tiny random-weight encoder is registered to a local sqlite store the way `brainmoe register`
registers an export; the inputs are windows of a real EEGMMIDB recording in microvolts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import free_port
from tests.servers import _wait_http, stop

EDF = "MNE-eegbci-data/files/eegmmidb/1.0.0/S001/S001R04.edf"
NAME, ALIAS = "tiny-pyfunc", "current"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """(tracking URI, exported folder): a tiny encoder registered under NAME@ALIAS."""
    from pretrain.encoder import Encoder
    from pretrain.encoder_config import get_config
    from pretrain.export import register_export

    root = tmp_path_factory.mktemp("pyfunc")
    torch.manual_seed(0)
    folder = Encoder(get_config("tiny")).save_pretrained(root / "encoder")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    register_export(folder, NAME, ALIAS, uri)
    return uri, folder


def recording(physionet: Path, start_s: float, seconds: float) -> dict:
    """A stretch of S001R04 as the pyfunc takes it: C x T microvolts, raw channel names."""
    import mne

    raw = mne.io.read_raw_edf(physionet / EDF, preload=True, verbose="error").pick("eeg")
    sfreq = float(raw.info["sfreq"])
    start = round(start_s * sfreq)
    uv = raw.get_data(start=start, stop=start + round(seconds * sfreq)) * 1e6  # [C, T] uV
    return {"eeg": uv.round(3).tolist(), "ch_names": list(raw.ch_names), "sfreq": sfreq}


def reference(folder: Path, rec: dict) -> np.ndarray:
    """The pooled embedding of each window, computed without MLflow or the pyfunc code: the
    generate path (preprocess, reader samples with bad channels masked) into the encoder."""
    from pretrain.encoder import Encoder
    from shards.preprocess import PreprocessConfig, preprocess
    from shards.recording import Provenance, Recording
    from shards.sample import collate_eeg, window_sample

    data = np.asarray(rec["eeg"])
    processed = preprocess(
        Recording(data, rec["sfreq"], rec["ch_names"], "uV", Provenance("t", "1")),
        PreprocessConfig(),
    )
    ch = processed.channels
    samples = [
        window_sample(w.data, ch.names, ch.positions, processed.sfreq, processed.bad_channels)
        for w in processed.windows
    ]
    encoder = Encoder.from_pretrained(folder).eval()
    with torch.no_grad():
        return Encoder.pool(encoder(collate_eeg(samples))).numpy()  # [n, D]


def use_store(uri: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)


@pytest.mark.shared_data
def test_load_model_predicts_the_encoders_pooled_embedding(registered, physionet):
    import mlflow

    from pretrain.tracking import model_version_info, resolve_model

    uri, folder = registered
    use_store(uri)
    window = recording(physionet, 10.0, 4.0)
    longer = recording(physionet, 20.0, 10.0)  # 10 s: two 4 s windows (generate's cut)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}")
    assert model.metadata.get_input_schema().input_names() == ["eeg", "ch_names", "sfreq"]

    rows = model.predict(window)
    assert [(r["input"], r["window"], r["start_s"]) for r in rows] == [(0, 0, 0.0)]
    got = np.array([r["embedding"] for r in rows])
    np.testing.assert_allclose(got, reference(folder, window), rtol=1e-5, atol=1e-5)

    both = model.predict([window, longer])
    assert [(r["input"], r["window"], r["start_s"]) for r in both] == [
        (0, 0, 0.0),
        (1, 0, 0.0),
        (1, 1, 4.0),
    ]
    got = np.array([r["embedding"] for r in both[1:]])
    np.testing.assert_allclose(got, reference(folder, longer), rtol=1e-5, atol=1e-5)
    regions = model.predict(window, params={"pooling": "regions"})[0]["embedding"]
    assert len(regions) == 20 * got.shape[1]  # 19 10-20 sites and the global mean

    # the registry entry kept its tags and alias, and still resolves to the exported folder
    info = model_version_info(f"models:/{NAME}@{ALIAS}", uri)
    assert info["tags"]["kind"] == "brainmoe-encoder" and str(info["version"]) == "1"
    resolved = resolve_model(f"models:/{NAME}@{ALIAS}", uri, folder.parent / "dl")
    assert (resolved / "model.safetensors").read_bytes() == (
        folder / "model.safetensors"
    ).read_bytes()

    with pytest.raises(ValueError, match="64 rows .* but 3 ch_names"):
        model.predict({**window, "ch_names": ["C3", "Cz", "C4"]})


def _post(url: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.shared_data
def test_mlflow_models_serve_answers_like_load_model(registered, physionet, tmp_path):
    import mlflow

    uri, _ = registered
    use_store(uri)
    window = recording(physionet, 10.0, 4.0)
    expected = mlflow.pyfunc.load_model(f"models:/{NAME}@{ALIAS}").predict(window)
    port = free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",  # the server runs uvicorn from PATH
    }
    cmd = [str(BIN / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@{ALIAS}"]
    cmd += ["--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    with open(tmp_path / "serve.log", "wb") as log:
        server = subprocess.Popen(
            cmd, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_http(f"http://127.0.0.1:{port}/ping", server, "mlflow models serve", timeout=300)
        status, answer = _post(f"http://127.0.0.1:{port}/invocations", {"inputs": window})
        assert status == 200, answer
        rows = answer["predictions"]
        assert [(r["input"], r["window"]) for r in rows] == [(0, 0)]
        np.testing.assert_allclose(
            rows[0]["embedding"], expected[0]["embedding"], rtol=1e-5, atol=1e-5
        )
        status, answer = _post(
            f"http://127.0.0.1:{port}/invocations",
            {"inputs": {**window, "ch_names": window["ch_names"][:3]}},
        )
        # MLflow answers 400 with our ValueError in the trace it returns
        assert status == 400 and "but 3 ch_names" in answer.get("stack_trace", ""), answer
    finally:
        stop(server)
    assert server.poll() is not None


def _gallery(folder: Path, dim: int) -> Path:
    """A CLIP cache folder in finetune/clip_cache.py's format: 6 stimuli, unit vectors."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    gen = torch.Generator().manual_seed(1)
    for name, rows in (("image", 6), ("text", 6), ("concepts", 2)):
        emb = torch.nn.functional.normalize(torch.randn(rows, dim, generator=gen), dim=-1)
        save_file({"embeddings": emb}, str(folder / f"{name}.safetensors"))
    ids = [f"synthetic:c{k:02d}:i{i:02d}" for k in range(2) for i in range(3)]
    index = {"ids": ids, "concepts": ["a", "b"], "stimulus_concepts": ["a"] * 3 + ["b"] * 3}
    (folder / "index.json").write_text(json.dumps({**index, "model": "x", "pretrained": None}))
    return folder


@pytest.mark.shared_data
def test_registered_heads_predict_what_generate_writes(registered, physionet, tmp_path):
    """Tiny random-weight heads on the registered encoder: the pyfunc's captions and images
    are `brainmoe generate`'s, its retrieval ranks the gallery by the head's embedding."""
    import base64
    import dataclasses
    import io

    import mlflow
    from PIL import Image

    from finetune.config import FinetuneConfig
    from finetune.generate import generate, load_finetuned
    from finetune.model import build_model, encoder_fingerprint
    from finetune.registry import register_adapters
    from finetune.tiny.diffusion import build_tiny_sd
    from finetune.tiny.llm import build_tiny_llm
    from pretrain.pyfunc import parse_inputs, windows
    from shards.config import load_config

    uri, encoder_dir = registered
    use_store(uri)
    clip_dim = 32
    heads = {
        "retrieval": {"hidden": 32},
        "image": {
            "base": str(build_tiny_sd(tmp_path / "sd", cross_attention_dim=32)),
            "context_len": 8,
            "projector_heads": 4,
            "num_inference_steps": 2,
            "guidance_scale": 1.0,
        },
        "text": {
            "base": str(build_tiny_llm(tmp_path / "llm", corpus=["a red circle", "a blue square"])),
            "prefix_tokens": 2,
            "max_new_tokens": 4,
        },
    }
    cfg = load_config(FinetuneConfig, None, [], tasks=list(heads), **heads)
    torch.manual_seed(0)
    model = build_model(cfg, encoder_dir, clip_dim).eval()
    meta = {
        "encoder_uri": f"models:/{NAME}@{ALIAS}",
        "encoder_fingerprint": encoder_fingerprint(encoder_dir),
        "tasks": list(model.heads),
        "clip_dim": clip_dim,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    folder = model.save_adapters(tmp_path / "adapters", meta)
    gallery = _gallery(tmp_path / "gallery", clip_dim)
    info = register_adapters(folder, "tiny-heads", ALIAS, uri, gallery=gallery)
    assert info["tags"]["encoder_version"] == f"{NAME}/1"

    window = recording(physionet, 10.0, 4.0)
    served = mlflow.pyfunc.load_model(f"models:/tiny-heads@{ALIAS}")
    rows = served.predict(window, params={"num_images": 1, "steps": 2, "top_k": 3})
    assert [(r["input"], r["window"]) for r in rows] == [(0, 0)]

    # the same finetune output through `brainmoe generate`'s own path
    reloaded, _, _ = load_finetuned(str(folder), uri, tmp_path / "work")
    samples = windows(parse_inputs(window))
    [record] = generate(reloaded, samples, tmp_path / "generated", num_images=1, steps=2)
    assert rows[0]["caption"] == record["caption"]
    png = Image.open(io.BytesIO(base64.b64decode(rows[0]["images"][0])))
    written = Image.open(tmp_path / "generated" / record["images"][0])
    np.testing.assert_array_equal(np.asarray(png), np.asarray(written))

    with torch.no_grad():
        from shards.sample import collate_eeg

        enc = reloaded.encoder(collate_eeg(samples))
        emb = reloaded.heads["retrieval"].embed(enc.tokens, enc.valid)[0]  # [Dc]
    np.testing.assert_allclose(rows[0]["clip_embedding"], emb.numpy(), rtol=1e-5, atol=1e-6)
    from safetensors.torch import load_file

    scores = load_file(str(gallery / "image.safetensors"))["embeddings"] @ emb  # [S]
    ids = json.loads((gallery / "index.json").read_text())["ids"]
    best = [ids[j] for j in scores.argsort(descending=True)[:3].tolist()]
    assert [h["stimulus_id"] for h in rows[0]["retrieval"]] == best
    np.testing.assert_allclose(
        [h["score"] for h in rows[0]["retrieval"]],
        scores.sort(descending=True).values[:3],
        rtol=1e-5,
        atol=1e-6,
    )
