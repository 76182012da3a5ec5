"""EEG -> image: a frozen Stable Diffusion UNet conditioned on EEG, tuned with LoRA (DreamDiffusion).

DreamDiffusion (Bai et al. 2023) replaces SD's text context with a projection of the EEG
encoder's output and trains it with the usual denoising loss plus a CLIP alignment term,

    L = E ||eps - eps_theta(z_t, t, tau(EEG))||^2 + lambda * (1 - cos(h(tau(EEG)), CLIP_img))

(eq. 3), so the EEG context is pulled towards the image-embedding space CLIP text contexts
already live near. Here tau is a resampler (learned queries attending to the EEG tokens), the
UNet gets LoRA on its attention projections instead of full fine-tuning (what fits a GPU next
to the encoder, and keeps the adapter a few MB), and h is a small MLP on the pooled context.

The UNet, VAE and noise schedule are loaded from ``base`` with diffusers' own
``from_pretrained`` (subfolders unet/, vae/, scheduler/ as in a hub SD repo, or a folder from
finetune.tiny.diffusion.build_tiny_sd); only the LoRA, the projector (with its null context)
and h are trained and saved.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PretrainedConfig

from finetune.heads.resampler import TokenResampler
from pretrain.artifacts import load_safetensors, read_json, verify_checksums, write_checksums

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SD_CONTEXT_LEN = 77  # CLIP's text context, what every SD1.x/2.x UNet was trained on
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name: pipe.load_lora_weights reads it
PROJECTOR_FILE = "eeg_projector.safetensors"
CONFIG_FILE = "image_head.json"
REMEDY = "re-download the finetune output, or save the head again"
_BASE_FILES = ("unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")


@dataclass
class ImageHeadConfig:
    # Hub id or local folder of a diffusers Stable Diffusion repo (unet/, vae/, scheduler/).
    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    local_files_only: bool = True  # never download unless asked: the cluster has no internet
    # S: 0 = the base's text context length (text_encoder max_position_embeddings, else 77).
    context_len: int = 0
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    clip_weight: float = 1.0  # lambda of DreamDiffusion eq. 3; 0 turns the CLIP term off
    projector_depth: int = 2  # resampler blocks (cross-attention + MLP)
    projector_heads: int = 8  # must divide the UNet's cross-attention width
    # Probability of training on the null context instead of the EEG context, which is what
    # makes classifier-free guidance meaningful; 0 keeps a fixed zero null context.
    uncond_prob: float = 0.1
    image_size: int = 0  # pixels per side generated; 0 = UNet sample_size * VAE scale factor
    guidance_scale: float = 3.0  # 1 = no classifier-free guidance (one UNet call per step)
    num_inference_steps: int = 50  # DDIM steps in generate()
    dtype: str = "float32"  # frozen UNet weights; "bfloat16"/"float16" halve their memory
    gradient_checkpointing: bool = False  # recompute UNet activations: SD1.5 at batch > 8

    def __post_init__(self) -> None:
        self.lora_targets = tuple(self.lora_targets)  # JSON round trips give a list
        if not self.base:
            raise ValueError("base must name a hub id or a local Stable Diffusion folder")
        checks = [
            ("context_len", self.context_len >= 0, ">= 0 (0 = from the base)"),
            ("lora_rank", self.lora_rank >= 1, ">= 1"),
            ("lora_alpha", self.lora_alpha > 0, "> 0"),
            ("lora_targets", len(self.lora_targets) > 0, "a non-empty list of module names"),
            ("clip_weight", self.clip_weight >= 0, ">= 0"),
            ("projector_depth", self.projector_depth >= 1, ">= 1"),
            ("projector_heads", self.projector_heads >= 1, ">= 1"),
            ("uncond_prob", 0 <= self.uncond_prob < 1, "in [0, 1)"),
            ("image_size", self.image_size >= 0, ">= 0 (0 = from the base)"),
            ("guidance_scale", self.guidance_scale >= 1, ">= 1 (1 = no guidance)"),
            ("num_inference_steps", self.num_inference_steps >= 1, ">= 1"),
            ("dtype", self.dtype in DTYPES, f"one of {sorted(DTYPES)}"),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(
                    f"ImageHeadConfig.{name} must be {expected}, got {getattr(self, name)!r}"
                )


def read_base_config(config: ImageHeadConfig) -> tuple[dict, dict, int]:
    """(unet config, vae config, context length S) of ``config.base``, from its JSON files only.

    Reading the configs first lets every base-related ValueError come before gigabytes of
    weights are loaded. SDXL (two text encoders, added time ids) and unCLIP-style UNets take a
    different conditioning than one context sequence and are refused here.
    """
    base = config.base
    path = Path(base).expanduser()
    sd_layout = (
        "a diffusers Stable Diffusion folder with unet/, vae/ and scheduler/ subfolders (as in "
        "the hub repo stable-diffusion-v1-5/stable-diffusion-v1-5, or one written by "
        "finetune.tiny.diffusion.build_tiny_sd)"
    )
    if path.exists():
        missing = [f for f in _BASE_FILES if not (path / f).is_file()]
        if missing:
            raise ValueError(f"base {base!r} is not {sd_layout}: missing {', '.join(missing)}")
    elif path.is_absolute() or base.startswith((".", "~")) or base.count("/") != 1:
        raise ValueError(f"base {base!r} does not exist; expected a hub id or {sd_layout}")
    try:
        unet_cfg = UNet2DConditionModel.load_config(
            base, subfolder="unet", local_files_only=config.local_files_only
        )
        vae_cfg = AutoencoderKL.load_config(
            base, subfolder="vae", local_files_only=config.local_files_only
        )
    except OSError as err:
        hint = (
            f"download it first (`hf download {base}`) or set local_files_only=False"
            if config.local_files_only
            else "check the hub id and your network"
        )
        raise ValueError(f"could not read base {base!r} as {sd_layout}: {hint} ({err})") from err
    width = unet_cfg.get("cross_attention_dim")
    if (
        not isinstance(width, int)
        or unet_cfg.get("addition_embed_type") is not None
        or unet_cfg.get("encoder_hid_dim") is not None
    ):
        raise ValueError(
            f"base {base!r} is not an SD1.x/2.x UNet (cross_attention_dim={width!r}, "
            f"addition_embed_type={unet_cfg.get('addition_embed_type')!r}): SDXL-style dual "
            "contexts with added embeddings are not supported; use an SD1.x or SD2.x base"
        )
    if unet_cfg.get("in_channels") != vae_cfg.get("latent_channels"):
        raise ValueError(
            f"base {base!r}: the UNet takes {unet_cfg.get('in_channels')} latent channels but "
            f"the VAE makes {vae_cfg.get('latent_channels')} (inpainting UNets are not supported)"
        )
    context_len = config.context_len
    if context_len == 0:
        try:
            text_cfg, _ = PretrainedConfig.get_config_dict(
                base, subfolder="text_encoder", local_files_only=config.local_files_only
            )
        except OSError:
            text_cfg = {}
        context_len = int(text_cfg.get("max_position_embeddings", SD_CONTEXT_LEN))
    return dict(unet_cfg), dict(vae_cfg), context_len


class EEGContextProjector(nn.Module):
    """EEG tokens [B, N, D] (+ valid [B, N]) -> UNet context [B, S, Dctx].

    S learned queries attending to the tokens (finetune/heads/resampler.py says why not
    pooling or flattening): S keeps the context length the UNet was trained on.
    The output LayerNorm mirrors CLIP's final_layer_norm, so the context has the per-token
    scale the UNet's cross-attention was tuned for.
    """

    def __init__(
        self,
        encoder_dim: int,
        context_dim: int,
        context_len: int,
        depth: int,
        heads: int,
        learned_null: bool,
    ) -> None:
        super().__init__()
        self.resampler = TokenResampler(encoder_dim, context_dim, context_len, depth, heads)
        null = torch.zeros(context_len, context_dim)  # the unconditional context
        if learned_null:
            self.null = nn.Parameter(null)
        else:
            self.register_buffer("null", null, persistent=False)

    def forward(self, tokens: Tensor, valid: Tensor) -> Tensor:
        return self.resampler(tokens, valid)  # [B, S, Dctx]


class ImageHead(nn.Module):
    """EEG tokens -> Stable Diffusion context; trains UNet LoRA + projector + CLIP map h.

    The base UNet and VAE are submodules (so ``.to(device)`` moves them) but stay frozen and
    in eval mode; ``trainable_state_dict`` holds everything that trains.
    """

    def __init__(self, config: ImageHeadConfig, encoder_dim: int, clip_dim: int) -> None:
        super().__init__()
        if encoder_dim < 1 or clip_dim < 1:
            raise ValueError(
                f"encoder_dim and clip_dim must be >= 1, got {encoder_dim}, {clip_dim}"
            )
        unet_cfg, vae_cfg, context_len = read_base_config(config)
        context_dim = unet_cfg["cross_attention_dim"]
        if context_dim % config.projector_heads:
            raise ValueError(
                f"projector_heads={config.projector_heads} does not divide the base's context "
                f"width {context_dim}; pick a divisor (SD1.5: 768 -> 8 or 12, SD2: 1024 -> 8)"
            )
        vae_scale = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
        unet_down = 2 ** (len(unet_cfg["block_out_channels"]) - 1)
        image_size = config.image_size or unet_cfg["sample_size"] * vae_scale
        if image_size % (vae_scale * unet_down):
            raise ValueError(
                f"image_size={image_size} must be a multiple of {vae_scale * unet_down} (VAE "
                f"scale {vae_scale} x UNet downsampling {unet_down})"
            )
        self.config = config
        self.encoder_dim, self.clip_dim = encoder_dim, clip_dim
        self.context_dim, self.context_len = context_dim, context_len  # Dctx, S
        self.image_size, self.vae_scale = image_size, vae_scale

        dtype = DTYPES[config.dtype]
        load = {"local_files_only": config.local_files_only}
        self.unet = UNet2DConditionModel.from_pretrained(
            config.base, subfolder="unet", torch_dtype=dtype, **load
        )
        # float32 VAE: SD's VAE overflows in float16, and it only runs to fill the latent
        # cache and to decode generated images, not in every training step.
        self.vae = AutoencoderKL.from_pretrained(
            config.base, subfolder="vae", torch_dtype=torch.float32, **load
        )
        self.noise_scheduler = DDPMScheduler.from_pretrained(
            config.base, subfolder="scheduler", **load
        )
        self.unet.requires_grad_(False)
        self.vae.requires_grad_(False)
        self.unet.add_adapter(
            LoraConfig(
                r=config.lora_rank,
                lora_alpha=config.lora_alpha,
                init_lora_weights="gaussian",
                target_modules=list(config.lora_targets),
            )
        )
        cast_training_params(self.unet, torch.float32)  # LoRA trains in fp32 on a bf16 base
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.projector = EEGContextProjector(
            encoder_dim,
            context_dim,
            context_len,
            config.projector_depth,
            config.projector_heads,
            learned_null=config.uncond_prob > 0,
        )
        # h of eq. 3: pooled context [B, Dctx] -> CLIP image space [B, Dc].
        self.h = nn.Sequential(
            nn.LayerNorm(context_dim),
            nn.Linear(context_dim, context_dim),
            nn.GELU(),
            nn.Linear(context_dim, clip_dim),
        )
        self.train()

    @classmethod
    def from_config(cls, config: ImageHeadConfig, encoder_dim: int, clip_dim: int) -> ImageHead:
        return cls(config, encoder_dim, clip_dim)

    # ---- structure -----------------------------------------------------------------------

    def train(self, mode: bool = True) -> ImageHead:
        super().train(mode)
        self.unet.eval()  # frozen base: no dropout, whatever the trainer asks
        self.vae.eval()
        return self

    def base_models(self) -> dict[str, str]:
        return {"unet": self.config.base, "vae": self.config.base}

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {n: p.detach() for n, p in self.named_parameters() if p.requires_grad}

    # ---- conditioning --------------------------------------------------------------------

    def context(self, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        """EEG tokens [B, N, D] or [B, C, P, D] (+ valid) -> UNet context [B, S, Dctx] (float32)."""
        b, d = tokens.shape[0], tokens.shape[-1]
        if d != self.encoder_dim:
            raise ValueError(f"tokens have width {d}, the head was built for {self.encoder_dim}")
        tokens = tokens.reshape(b, -1, d).float()  # [B, N, D]
        if valid is None:
            valid = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        valid = valid.reshape(b, -1).bool()
        if valid.shape[1] != tokens.shape[1]:
            raise ValueError(
                f"valid {tuple(valid.shape)} does not match tokens {tuple(tokens.shape)}"
            )
        if not bool(valid.any(1).all()):
            raise ValueError("a sample has no valid EEG token; drop it before the image head")
        return self.projector(tokens, valid)

    def clip_embedding(self, context: Tensor) -> Tensor:
        """h(EEG): context [B, S, Dctx] -> [B, Dc], compared with CLIP image embeddings."""
        return self.h(context.mean(1))

    # ---- training ------------------------------------------------------------------------

    @torch.no_grad()
    def encode_latents(self, pixels: Tensor) -> Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, H/f, W/f] float32.

        The posterior mean, not a sample: the latent cache and the uncached path then give the
        same latents, and SD's posterior std is negligible next to the diffusion noise.
        """
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, H, W] in [-1, 1], got {tuple(pixels.shape)}")
        latents = self.vae.encode(pixels.to(self.vae.device, torch.float32)).latent_dist.mode()
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * self.vae.config.scaling_factor

    def latent_key(self) -> str:
        """A file-name-safe name for latents this head's :meth:`encode_latents` makes.

        Latents depend on the VAE (base and config) and the pixel size, so a cache named by
        this key is never reused for another VAE or resolution.
        """
        path = Path(self.config.base).expanduser()
        base = str(path.resolve()) if path.exists() else self.config.base  # hub id as is
        identity = json.dumps(
            [base, dict(self.vae.config), self.image_size], sort_keys=True, default=str
        )
        slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(self.config.base).name).strip("-") or "sd"
        return f"{slug}-{self.image_size}px-{hashlib.sha1(identity.encode()).hexdigest()[:10]}"

    def _latents(self, batch: dict) -> Tensor:
        if "latents" in batch:
            latents = batch["latents"].to(self.unet.device, torch.float32)
        elif "pixels" in batch:
            latents = self.encode_latents(batch["pixels"])
        else:
            raise ValueError("the image head needs batch['latents'] or batch['pixels']")
        if latents.ndim != 4 or latents.shape[1] != self.unet.config.in_channels:
            raise ValueError(
                f"latents must be [B, {self.unet.config.in_channels}, h, w], "
                f"got {tuple(latents.shape)}"
            )
        return latents

    def forward(
        self,
        tokens: Tensor,
        valid: Tensor | None,
        batch: dict,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """DreamDiffusion's loss on one batch; ``generator`` fixes timesteps, noise and dropout."""
        latents = self._latents(batch)  # [B, 4, h, w]
        b, device = latents.shape[0], latents.device
        context = self.context(tokens.to(device), None if valid is None else valid.to(device))
        if context.shape[0] != b:
            raise ValueError(f"{context.shape[0]} EEG samples but {b} images in the batch")
        rng_device = generator.device if generator is not None else device
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=generator, device=rng_device).to(device)
        noise = randn_tensor(latents.shape, generator=generator, device=device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)

        cond = context  # the UNet sees the null context for a random uncond_prob of samples
        if self.training and self.config.uncond_prob > 0:
            drop = torch.rand(b, generator=generator, device=rng_device).to(device)
            drop = drop < self.config.uncond_prob
            cond = torch.where(drop[:, None, None], self.projector.null.expand_as(context), context)
        dtype = self.unet.dtype
        pred = self.unet(noisy.to(dtype), t, encoder_hidden_states=cond.to(dtype)).sample

        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        elif kind == "sample":
            target = latents
        else:
            raise ValueError(f"scheduler prediction_type {kind!r} is not supported")
        diffusion_loss = F.mse_loss(pred.float(), target.float())

        if self.config.clip_weight > 0:
            if "clip_image" not in batch:
                raise ValueError("batch has no clip_image: provide it or set clip_weight=0")
            clip = batch["clip_image"].to(device, torch.float32)  # [B, Dc]
            cos = F.cosine_similarity(self.clip_embedding(context), clip, dim=-1)  # [B]
            clip_loss = (1 - cos).mean()
        else:
            clip_loss = diffusion_loss.new_zeros(())
        loss = diffusion_loss + self.config.clip_weight * clip_loss
        return {"loss": loss, "diffusion_loss": diffusion_loss, "clip_loss": clip_loss}

    @torch.no_grad()
    def reference(self, tokens: Tensor, valid: Tensor | None, batch: dict) -> Tensor:
        return self.context(tokens, valid)  # [B, S, Dctx]: what the UNet is conditioned on

    def stimulus_tensors(self, stimuli, cache_root: str | Path) -> dict[str, dict[str, Tensor]]:
        """The VAE latents of every stimulus image, computed once beside the shards (named by
        this VAE and image size), so training never runs the VAE encoder."""
        from finetune.pairs import latent_cache
        from shards import storage

        folder = storage.join(cache_root, "latents")  # a folder, or s3:// beside the shards
        cache = latent_cache(
            stimuli, self.encode_latents, self.image_size, folder, self.latent_key()
        )
        return {"latents": cache}

    @staticmethod
    def check_saved(config: ImageHeadConfig, folder: str | Path) -> None:
        """A saved image adapter fits only a UNet of the context width it was trained for."""
        saved = read_adapter_meta(folder)["context_dim"]
        unet, _, _ = read_base_config(config)
        if int(unet["cross_attention_dim"]) != int(saved):
            raise ValueError(
                f"the image adapter was built for context width {saved}, but "
                f"image.base={config.base} has cross-attention width "
                f"{unet['cross_attention_dim']}; use the base it was trained on"
            )

    # ---- generation ----------------------------------------------------------------------

    def decode(
        self,
        tokens: Tensor,
        valid: Tensor | None,
        num_images: int = 1,
        steps: int | None = None,
        seed: int = 0,
    ) -> dict[str, list]:
        """What `brainmoe generate` writes: ``num_images`` images per window."""
        images = self.generate(tokens, valid, num_images=num_images, steps=steps, seed=seed)
        return {"images": [images[b : b + num_images] for b in range(0, len(images), num_images)]}

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        valid: Tensor | None = None,
        num_images: int = 1,
        steps: int | None = None,
        seed: int = 0,
        guidance_scale: float | None = None,
    ) -> list[Image.Image]:
        """B x num_images PIL images (sample-major: all of sample 0's first), same for a seed.

        DDIM (eta 0) on the training noise schedule; with guidance_scale > 1, classifier-free
        guidance against the projector's null context.
        """
        steps = steps or self.config.num_inference_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if num_images < 1 or steps < 1 or scale < 1:
            raise ValueError(
                f"need num_images >= 1, steps >= 1 and guidance_scale >= 1, "
                f"got {num_images}, {steps}, {scale}"
            )
        device, dtype = self.unet.device, self.unet.dtype
        context = self.context(tokens.to(device), None if valid is None else valid.to(device))
        context = context.repeat_interleave(num_images, 0)  # [B * num_images, S, Dctx]
        if scale > 1:
            null = self.projector.null.expand_as(context)
            context = torch.cat([null, context])  # [2 * B * num_images, S, Dctx]
        context = context.to(dtype)

        scheduler = DDIMScheduler.from_config(self.noise_scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        side = self.image_size // self.vae_scale
        shape = (
            context.shape[0] // (2 if scale > 1 else 1),
            self.unet.config.in_channels,
            side,
            side,
        )
        generator = torch.Generator("cpu").manual_seed(seed)  # same images on any device
        latents = (
            randn_tensor(shape, generator=generator, device=device) * scheduler.init_noise_sigma
        )
        for t in scheduler.timesteps:
            inp = torch.cat([latents] * 2) if scale > 1 else latents
            inp = scheduler.scale_model_input(inp, t).to(dtype)
            pred = self.unet(inp, t, encoder_hidden_states=context).sample.float()
            if scale > 1:
                uncond, cond = pred.chunk(2)
                pred = uncond + scale * (cond - uncond)
            latents = scheduler.step(pred, t, latents).prev_sample
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        images = self.vae.decode(latents.float()).sample  # [B * num_images, 3, H, W] in [-1, 1]
        return VaeImageProcessor(vae_scale_factor=self.vae_scale).postprocess(images, "pil")

    # ---- adapters ------------------------------------------------------------------------

    def _meta(self) -> dict:
        return {
            "format": 1,
            "config": asdict(self.config),
            "base": self.config.base,
            "encoder_dim": self.encoder_dim,
            "clip_dim": self.clip_dim,
            "context_dim": self.context_dim,
            "context_len": self.context_len,
            "prediction_type": self.noise_scheduler.config.prediction_type,
        }

    def save_adapter(self, folder: str | Path) -> Path:
        """Write the UNet LoRA (diffusers format), projector + h and the head's JSON.

        ``pytorch_lora_weights.safetensors`` is what ``StableDiffusionPipeline.load_lora_weights``
        and ``UNet2DConditionModel.load_lora_adapter(folder, prefix="unet")`` read.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        lora = get_peft_model_state_dict(self.unet)
        lora = {k: v.detach().float().contiguous() for k, v in lora.items()}
        peft_meta = self.unet.peft_config["default"].to_dict()
        peft_meta["target_modules"] = sorted(peft_meta["target_modules"])
        StableDiffusionLoraLoaderMixin.save_lora_weights(
            folder,
            unet_lora_layers=convert_state_dict_to_diffusers(lora),
            unet_lora_adapter_metadata=peft_meta,
            safe_serialization=True,
        )
        rest = {
            k: v.contiguous()
            for k, v in self.trainable_state_dict().items()
            if not k.startswith("unet.")
        }
        save_file(rest, str(folder / PROJECTOR_FILE))
        (folder / CONFIG_FILE).write_text(json.dumps(self._meta(), indent=2) + "\n")
        write_checksums(folder, [LORA_FILE, PROJECTOR_FILE], CONFIG_FILE)
        return folder

    def load_adapter(self, folder: str | Path) -> None:
        """Restore what :meth:`save_adapter` wrote; refuses adapters built for another shape."""
        meta = read_adapter_meta(folder)
        ours = self._meta()
        if meta["context_dim"] != self.context_dim:
            raise ValueError(
                f"adapter in {folder} was built for context width {meta['context_dim']}, base "
                f"{self.config.base!r} has {self.context_dim}: use the base it was trained on "
                f"({meta['base']!r})"
            )
        theirs_cfg, ours_cfg = meta["config"], ours["config"]
        shape_keys = ("lora_rank", "lora_alpha", "projector_depth", "projector_heads")
        diffs = [
            f"{k}: adapter {meta[k]}, head {ours[k]}"
            for k in ("encoder_dim", "clip_dim", "context_len")
            if meta[k] != ours[k]
        ]
        diffs += [
            f"{k}: adapter {theirs_cfg[k]}, head {ours_cfg[k]}"
            for k in shape_keys
            if theirs_cfg[k] != ours_cfg[k]
        ]
        if sorted(theirs_cfg["lora_targets"]) != sorted(ours_cfg["lora_targets"]):
            diffs.append(
                f"lora_targets: adapter {theirs_cfg['lora_targets']}, head {ours_cfg['lora_targets']}"
            )
        if (theirs_cfg["uncond_prob"] > 0) != (ours_cfg["uncond_prob"] > 0):
            diffs.append("learned null context (uncond_prob > 0) differs")
        if diffs:
            raise ValueError(
                f"adapter in {folder} does not fit this head ({'; '.join(diffs)}); build the "
                "head with the adapter's config (ImageHead.from_adapter does)"
            )
        folder = Path(folder)
        verify_checksums(folder, CONFIG_FILE, REMEDY)  # damaged bytes would load silently
        lora = load_safetensors(folder / LORA_FILE, remedy=REMEDY)
        lora = {k.removeprefix("unet."): v for k, v in lora.items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(
            self.unet, convert_unet_state_dict_to_peft(lora), adapter_name="default"
        )
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if unexpected or missing:
            raise ValueError(
                f"{folder / LORA_FILE} does not match the UNet's LoRA layers "
                f"(unexpected {unexpected[:3]}, missing {missing[:3]})"
            )
        cast_training_params(self.unet, torch.float32)
        rest = load_safetensors(folder / PROJECTOR_FILE, remedy=REMEDY)
        own = {
            k: p
            for k, p in self.named_parameters()
            if p.requires_grad and not k.startswith("unet.")
        }
        if set(rest) != set(own):
            raise ValueError(
                f"{folder / PROJECTOR_FILE} holds {sorted(set(rest) ^ set(own))[:4]} where the "
                "head differs"
            )
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(rest[k])

    @classmethod
    def from_adapter(
        cls, folder: str | Path, base: str | None = None, local_files_only: bool = True
    ) -> ImageHead:
        """A head built from a saved adapter's config (optionally on another copy of its base)."""
        meta = read_adapter_meta(folder)
        known = {f.name for f in fields(ImageHeadConfig)}
        values = {k: v for k, v in meta["config"].items() if k in known}
        values.update(base=base or meta["base"], local_files_only=local_files_only)
        config = ImageHeadConfig(**values)
        unet_cfg, _, _ = read_base_config(config)  # refuse a wrong base before loading it
        if unet_cfg["cross_attention_dim"] != meta["context_dim"]:
            raise ValueError(
                f"adapter in {folder} was built for context width {meta['context_dim']}, base "
                f"{config.base!r} has {unet_cfg['cross_attention_dim']}"
            )
        head = cls(config, encoder_dim=meta["encoder_dim"], clip_dim=meta["clip_dim"])
        head.load_adapter(folder)
        return head


def read_adapter_meta(folder: str | Path) -> dict:
    """The JSON :meth:`ImageHead.save_adapter` wrote, after checking the folder is complete."""
    folder = Path(folder)
    missing = [f for f in (CONFIG_FILE, LORA_FILE, PROJECTOR_FILE) if not (folder / f).is_file()]
    if missing:
        raise ValueError(
            f"{folder} is not an image-head adapter folder: missing {', '.join(missing)} "
            "(written by ImageHead.save_adapter)"
        )
    return read_json(folder / CONFIG_FILE, REMEDY)
