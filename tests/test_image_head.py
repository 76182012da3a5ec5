"""The EEG->image head on tiny random-weight SD bases built into tmp folders (nothing downloaded)."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from peft.utils import get_peft_model_state_dict

from finetune.heads.image import (
    LORA_FILE,
    PROJECTOR_FILE,
    ImageHead,
    ImageHeadConfig,
    read_base_config,
)
from finetune.tiny.diffusion import build_tiny_sd

D, DC, S = 16, 24, 8  # encoder width, CLIP width, context length used here


@pytest.fixture(scope="module")
def base32(tmp_path_factory):
    return build_tiny_sd(tmp_path_factory.mktemp("sd32"), cross_attention_dim=32)


@pytest.fixture(scope="module")
def base48(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd48")
    return build_tiny_sd(folder, cross_attention_dim=48, prediction_type="v_prediction")


def make_head(base, seed: int = 0, **overrides) -> ImageHead:
    values = dict(base=str(base), context_len=S, projector_heads=4, uncond_prob=0.0)
    values.update(overrides)
    torch.manual_seed(seed)  # projector / h / LoRA init
    return ImageHead(ImageHeadConfig(**values), encoder_dim=D, clip_dim=DC)


def make_batch(b: int = 4, n: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, n, D, generator=g)  # [B, N, D]
    valid = torch.ones(b, n, dtype=torch.bool)
    valid[0, n // 2 :] = False  # one padded sample
    batch = {
        "pixels": torch.rand(b, 3, 32, 32, generator=g) * 2 - 1,
        "clip_image": F.normalize(torch.randn(b, DC, generator=g), dim=-1),
    }
    return tokens, valid, batch


def loss_at(head, tokens, valid, batch, seed: int = 1) -> dict:
    with torch.no_grad():
        out = head(tokens, valid, batch, generator=torch.Generator().manual_seed(seed))
    return {k: v.item() for k, v in out.items()}


def test_context_follows_the_unet_config(base32, base48, tmp_path):
    tokens, valid, batch = make_batch()
    for base, width in ((base32, 32), (base48, 48)):
        head = make_head(base)
        assert head.context(tokens, valid).shape == (4, S, width)
        assert head.image_size == 32  # latent side 8 x VAE scale 4
        out = head(tokens, valid, batch)
        assert torch.isfinite(out["loss"]), out
    assert head.noise_scheduler.config.prediction_type == "v_prediction"
    # context_len 0: from the text encoder's config if the base has one, else SD's 77.
    assert read_base_config(ImageHeadConfig(base=str(base32)))[2] == 77
    with_text = tmp_path / "with_text"
    shutil.copytree(base32, with_text)
    (with_text / "text_encoder").mkdir()
    (with_text / "text_encoder" / "config.json").write_text(
        json.dumps({"model_type": "clip_text_model", "max_position_embeddings": 12})
    )
    assert read_base_config(ImageHeadConfig(base=str(with_text)))[2] == 12
    # [B, C, P, D] tokens are flattened like Encoder.pool does.
    assert head.context(tokens.reshape(4, 2, 5, D), valid.reshape(4, 2, 5)).shape == (4, S, 48)


def test_only_lora_projector_and_h_train(base32):
    head = make_head(base32, uncond_prob=0.5)
    head.train()
    assert not head.unet.training and not head.vae.training, "frozen base must stay in eval"
    trainable = head.trainable_state_dict()
    lora = {k for k in trainable if k.startswith("unet.")}
    assert lora and all(".lora_A." in k or ".lora_B." in k for k in lora)
    assert {k.split(".")[0] for k in trainable} == {"unet", "projector", "h"}
    assert "projector.null" in trainable  # learned null context since uncond_prob > 0
    # LoRA on 4 projections of 8 attention modules (self + cross in 4 transformer blocks).
    assert len(lora) == 2 * 4 * 8, len(lora)
    fresh = UNet2DConditionModel.from_pretrained(base32, subfolder="unet")
    n_base = sum(p.numel() for p in fresh.parameters())
    n_frozen = sum(p.numel() for p in head.unet.parameters() if not p.requires_grad)
    assert n_frozen == n_base, (n_frozen, n_base)
    assert not any(p.requires_grad for p in head.vae.parameters())
    n_lora = sum(trainable[k].numel() for k in lora)
    assert 0 < n_lora < 0.02 * n_base, (n_lora, n_base)

    tokens, valid, batch = make_batch()
    head(tokens, valid, batch, generator=torch.Generator().manual_seed(3))["loss"].backward()
    grads = {n for n, p in head.named_parameters() if p.grad is not None}
    assert grads <= set(trainable)
    missing = set(trainable) - grads - {"projector.null"}  # null only if a sample was dropped
    assert not missing, sorted(missing)[:5]


def test_training_steps_lower_the_loss(base32):
    head = make_head(base32)
    tokens, valid, batch = make_batch()
    batch = {"latents": head.encode_latents(batch["pixels"]), "clip_image": batch["clip_image"]}
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    head.eval()
    before = loss_at(head, tokens, valid, batch)
    head.train()
    for _ in range(8):
        out = head(tokens, valid, batch, generator=torch.Generator().manual_seed(1))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    head.eval()
    after = loss_at(head, tokens, valid, batch)
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    assert after["diffusion_loss"] < before["diffusion_loss"], (before, after)
    assert after["clip_loss"] < 0.5 * before["clip_loss"], (before, after)


def test_pixels_and_cached_latents_give_the_same_loss(base32):
    head = make_head(base32).eval()
    tokens, valid, batch = make_batch()
    cached = {"latents": head.encode_latents(batch["pixels"]), "clip_image": batch["clip_image"]}
    assert cached["latents"].shape == (4, 4, 8, 8)
    assert loss_at(head, tokens, valid, batch) == loss_at(head, tokens, valid, cached)
    # The cache is named per VAE and pixel size.
    key = head.latent_key()
    assert re.fullmatch(r"[A-Za-z0-9._-]+", key) and "32px" in key, key
    assert make_head(base32, seed=3).latent_key() == key  # projector init does not matter
    assert make_head(base32, image_size=16).latent_key() != key


def test_half_precision_base_and_checkpointing_keep_the_loss(base32):
    tokens, valid, batch = make_batch()
    reference = loss_at(make_head(base32).eval(), tokens, valid, batch)
    checkpointed = make_head(base32, gradient_checkpointing=True)
    checkpointed(tokens, valid, batch)["loss"].backward()  # runs backward through checkpoints
    assert loss_at(checkpointed.eval(), tokens, valid, batch) == reference
    bf16 = make_head(base32, dtype="bfloat16").eval()
    assert bf16.unet.dtype == torch.bfloat16
    assert {v.dtype for v in bf16.trainable_state_dict().values()} == {torch.float32}
    got = loss_at(bf16, tokens, valid, batch)["diffusion_loss"]
    assert abs(got - reference["diffusion_loss"]) < 0.05, (got, reference)


def test_save_load_restores_exactly(base32, tmp_path):
    head = make_head(base32, uncond_prob=0.3)
    tokens, valid, batch = make_batch()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-2)
    head(tokens, valid, batch, generator=torch.Generator().manual_seed(0))["loss"].backward()
    opt.step()  # LoRA B leaves zero, so the saved LoRA changes the UNet
    head.eval()
    folder = head.save_adapter(tmp_path / "adapter")

    other = make_head(base32, seed=1, uncond_prob=0.3).eval()
    assert loss_at(other, tokens, valid, batch) != loss_at(head, tokens, valid, batch)
    other.load_adapter(folder)
    assert loss_at(other, tokens, valid, batch) == loss_at(head, tokens, valid, batch)
    ours, theirs = head.trainable_state_dict(), other.trainable_state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    kw = dict(num_images=1, steps=2, seed=5, guidance_scale=2.0)
    a, b = head.generate(tokens[:1], valid[:1], **kw), other.generate(tokens[:1], valid[:1], **kw)
    assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))
    rebuilt = ImageHead.from_adapter(folder).eval()
    assert loss_at(rebuilt, tokens, valid, batch) == loss_at(head, tokens, valid, batch)

    # Only the trained tensors are written, and the LoRA file is diffusers' own format.
    n_bytes = sum(4 * v.numel() for v in ours.values())
    written = (folder / LORA_FILE).stat().st_size + (folder / PROJECTOR_FILE).stat().st_size
    base_bytes = (base32 / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert n_bytes <= written < n_bytes + 64_000, (written, n_bytes)
    assert written < 0.2 * base_bytes, (written, base_bytes)
    plain = UNet2DConditionModel.from_pretrained(base32, subfolder="unet")
    plain.load_lora_adapter(folder, prefix="unet", weight_name=LORA_FILE, adapter_name="a")
    lora_plain = get_peft_model_state_dict(plain, adapter_name="a")
    lora_head = get_peft_model_state_dict(head.unet)
    assert lora_plain.keys() == lora_head.keys()
    assert all(torch.equal(lora_plain[k], lora_head[k]) for k in lora_head)


def test_generate_is_deterministic_per_seed(base32):
    head = make_head(base32, image_size=16)
    tokens, valid, _ = make_batch(b=2)
    images = head.generate(tokens, valid, num_images=3, steps=2, seed=7, guidance_scale=1.5)
    assert len(images) == 6 and all(im.size == (16, 16) and im.mode == "RGB" for im in images)
    again = head.generate(tokens, valid, num_images=3, steps=2, seed=7, guidance_scale=1.5)
    pixels = np.stack([np.asarray(im) for im in images])  # [6, 16, 16, 3] uint8
    assert np.array_equal(pixels, np.stack([np.asarray(im) for im in again]))
    assert pixels.std() > 0, "a constant image says the decode path is broken"
    other = head.generate(tokens, valid, num_images=3, steps=2, seed=8, guidance_scale=1.5)
    assert not np.array_equal(np.asarray(images[0]), np.asarray(other[0]))
    assert len(head.generate(tokens[:1], valid[:1], steps=1, guidance_scale=1.0)) == 1


def test_adapter_for_another_width_is_refused(base32, base48, tmp_path):
    folder = make_head(base32).save_adapter(tmp_path / "adapter32")
    with pytest.raises(ValueError, match="built for context width 32, base .* has 48"):
        make_head(base48).load_adapter(folder)
    with pytest.raises(ValueError, match="built for context width 32, base .* has 48"):
        ImageHead.from_adapter(folder, base=str(base48))
    with pytest.raises(ValueError, match="lora_rank: adapter 4, head 8"):
        make_head(base32, lora_rank=8).load_adapter(folder)
    with pytest.raises(ValueError, match="not an image-head adapter folder"):
        make_head(base32).load_adapter(tmp_path)


def test_bad_bases_and_configs_are_refused(base32, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        make_head(tmp_path / "nowhere")
    no_vae = tmp_path / "no_vae"
    shutil.copytree(base32, no_vae)
    shutil.rmtree(no_vae / "vae")
    with pytest.raises(ValueError, match="missing vae/config.json"):
        make_head(no_vae)
    with pytest.raises(ValueError, match="local_files_only=False"):
        make_head("nobody-here/no-such-sd-model")
    sdxl = tmp_path / "sdxl"
    shutil.copytree(base32, sdxl)
    cfg = json.loads((sdxl / "unet" / "config.json").read_text())
    cfg.update(addition_embed_type="text_time", cross_attention_dim=[32, 32])
    (sdxl / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="SDXL"):
        make_head(sdxl)
    with pytest.raises(ValueError, match="projector_heads=5 does not divide"):
        make_head(base32, projector_heads=5)
    with pytest.raises(ValueError, match="image_size=20 must be a multiple of 8"):
        make_head(base32, image_size=20)
    for bad in ({"lora_rank": 0}, {"guidance_scale": 0.5}, {"uncond_prob": 1.0}, {"dtype": "int8"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ImageHeadConfig(**bad)
    head = make_head(base32)
    tokens, valid, batch = make_batch()
    valid[1] = False
    with pytest.raises(ValueError, match="no valid EEG token"):
        head(tokens, valid, batch)
    with pytest.raises(ValueError, match="clip_image"):
        head(tokens, None, {"pixels": batch["pixels"]})
