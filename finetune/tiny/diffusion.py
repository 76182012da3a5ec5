"""A tiny random-weight Stable Diffusion base (UNet + VAE + scheduler), laid out like a hub repo.

The image head loads its base with ``UNet2DConditionModel.from_pretrained(base,
subfolder="unet")`` and the same for ``vae`` and ``scheduler``; writing exactly those subfolders
lets tests, the demo and benchmarks run that code path with nothing downloaded. The components
follow diffusers' own tests (block_out_channels (32, 64), one layer per block,
cross_attention_dim 32) and SD1.x's noise schedule, shrunk until a CPU training step at batch 4
takes well under a second:

    pixels [B, 3, 32, 32] --VAE (3 levels, /4)--> latents [B, 4, 8, 8] --UNet (sample_size 8)

There is no text encoder, tokenizer or model_index.json: the head conditions on EEG, not text,
and reads nothing else (it falls back to SD's 77-token context length without a text encoder).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

# The VAE halves the resolution at each level but the last: 3 levels -> 32 px images give 8x8
# latents (SD's VAE has 4 levels: 512 px -> 64x64).
_VAE_CHANNELS = (16, 32, 32)


def build_tiny_sd(
    folder: str | Path,
    cross_attention_dim: int = 32,
    sample_size: int = 8,
    prediction_type: str = "epsilon",
    seed: int = 0,
) -> Path:
    """Write ``unet/``, ``vae/`` and ``scheduler/`` to ``folder`` and return ``folder``.

    ``cross_attention_dim`` is the context width Dctx the UNet attends to (SD1.5: 768,
    SD2: 1024); ``sample_size`` the latent side, so images are ``4 * sample_size`` pixels;
    ``prediction_type`` the UNet's target ("epsilon" as SD1.5, "v_prediction" as SD2-768).
    The weights depend on ``seed`` only, so two builds give identical files.
    """
    if sample_size < 4 or sample_size % 2:
        raise ValueError(f"sample_size={sample_size} must be even and >= 4 (the UNet halves it)")
    if cross_attention_dim < 8 or cross_attention_dim % 8:
        raise ValueError(
            f"cross_attention_dim={cross_attention_dim} must be a positive multiple of 8 "
            "(the UNet's 8 attention heads split it)"
        )
    folder = Path(folder)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=cross_attention_dim,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(_VAE_CHANNELS),
            up_block_types=("UpDecoderBlock2D",) * len(_VAE_CHANNELS),
            block_out_channels=_VAE_CHANNELS,
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=4 * sample_size,
        )
    # SD1.x's training schedule (its scheduler/ folder holds the same betas for PNDM).
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type=prediction_type,
    )
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    scheduler.save_pretrained(folder / "scheduler")
    return folder
