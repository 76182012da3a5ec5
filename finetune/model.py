"""One encoder, several heads, one loss: the finetuning model (plain PyTorch).

The encoder comes from pretraining (a folder or a registry URI) and is adapted in one of four
ways, cheapest first: ``frozen``; ``lora`` (low-rank adapters on its attention projections,
via peft -- the MoE experts and routers stay as pretrained); ``top`` (the last few blocks
trainable); ``full``. The heads take the encoder's tokens; their losses are combined by the
configured task weighting (a learned gate over the pooled EEG representation, uncertainty
weighting, or fixed weights).

What is saved after finetuning is only what was trained (see `trainable_state`): adapters and
projectors, megabytes, never the base models.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from finetune.head_inputs import head_inputs
from finetune.heads.registry import head_spec
from pretrain.artifacts import load_safetensors, verify_checksums, write_checksums
from pretrain.encoder import Encoder, EncoderOutput

if TYPE_CHECKING:
    from finetune.config import FinetuneConfig

ENCODER_LORA_TARGETS = ["qkv", "out"]  # pretrain.encoder.Attention's projections
MULTITASK_FILE = "multitask.safetensors"  # encoder adapters/blocks + the task weighting (gate)
META_FILE = "finetune.json"
REMEDY = "re-download the finetune output (or finetune again)"


def encoder_fingerprint(folder: str | Path) -> str:
    """Identity of an exported encoder: the hash of its weights file. An adapter records it,
    so it is never attached to an encoder it was not trained with."""
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()[:16]


def adapt_encoder(encoder: Encoder, mode: str, top_blocks: int = 1, rank: int = 8, alpha: int = 16):
    """Set what of the encoder trains; returns the encoder (LoRA layers injected in place)."""
    encoder.requires_grad_(False)
    if mode == "frozen":
        return encoder
    if mode == "full":
        return encoder.requires_grad_(True)
    if mode == "top":
        if not 1 <= top_blocks <= len(encoder.blocks):
            raise ValueError(
                f"encoder.top_blocks={top_blocks} but the encoder has {len(encoder.blocks)} blocks"
            )
        for block in encoder.blocks[-top_blocks:]:
            block.requires_grad_(True)
        encoder.norm.requires_grad_(True)
        return encoder
    if mode == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=ENCODER_LORA_TARGETS)
        return inject_adapter_in_model(config, encoder)
    raise ValueError(f"encoder.train must be frozen, lora, top or full; got {mode!r}")


def build_heads(cfg: FinetuneConfig, encoder_dim: int, clip_dim: int) -> dict[str, nn.Module]:
    """One head per configured task, each from its config section (finetune/heads/registry.py)."""
    return {
        task: head_spec(task).build(getattr(cfg, task), encoder_dim, clip_dim) for task in cfg.tasks
    }


def build_model(cfg: FinetuneConfig, encoder_dir: str | Path, clip_dim: int) -> MultiTaskModel:
    """The finetuning model as configured, on the exported encoder in `encoder_dir`: what the
    trainer trains and `brainmoe generate` reloads adapters into.

    ``dist.activation_checkpointing`` recomputes the encoder blocks' activations in the
    backward pass (when the encoder trains: lora, top, full); the image head's UNet has its
    own switch, ``image.gradient_checkpointing``.
    """
    from finetune.multitask import TaskWeighting

    checkpointing = bool(cfg.dist.activation_checkpointing)
    encoder = Encoder.from_pretrained(encoder_dir, activation_checkpointing=checkpointing)
    e = cfg.encoder
    encoder = adapt_encoder(encoder, e.train, e.top_blocks, e.lora_rank, e.lora_alpha)
    heads = build_heads(cfg, encoder.config.dim, clip_dim)
    weighting = TaskWeighting(cfg.weighting, list(heads), encoder.config.dim)
    return MultiTaskModel(encoder, heads, weighting, e.heads_read)


class MultiTaskModel(nn.Module):
    """``forward(batch)`` -> {"loss", "losses": {task: scalar}, "weights": {task: float}}."""

    def __init__(
        self,
        encoder: Encoder,
        heads: dict[str, nn.Module],
        weighting: nn.Module,
        heads_read: str = "tokens",
    ):
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.weighting = weighting
        self.heads_read = heads_read  # finetune/head_inputs.py

    def read(self, batch: dict[str, Any]) -> tuple[EncoderOutput, Tensor, Tensor]:
        """The encoder on `batch` -> (its output, the heads' tokens [B, N, D], valid [B, N])."""
        enc = self.encoder(batch)
        return (enc, *head_inputs(enc, self.heads_read))

    def encoder_trainable(self) -> bool:
        return any(p.requires_grad for p in self.encoder.parameters())

    def forward(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.encoder_trainable()):
            enc, tokens, valid = self.read(batch)  # [B, N, D], [B, N]
        losses: dict[str, Tensor] = {}
        extra: dict[str, Tensor] = {}
        for name, head in self.heads.items():
            out = head(tokens, valid, batch, generator=generator)
            losses[name] = out["loss"]
            extra.update({f"{name}/{k}": v for k, v in out.items() if k != "loss"})
        pooled = Encoder.pool(enc)  # [B, D]
        total, weights = self.weighting(losses, pooled)
        if self.encoder_trainable():
            total = total + enc.aux_loss
        return {"loss": total, "losses": losses, "weights": weights, "extra": extra, "enc": enc}

    @torch.no_grad()
    def reference_outputs(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Deterministic outputs of every trained part on `batch` (call in eval mode): what a
        reload of the saved adapters must reproduce."""
        _, tokens, valid = self.read(batch)
        out = {"tokens": tokens.float().cpu()}
        for name, head in self.heads.items():
            out[name] = head.reference(tokens, valid, batch).float().cpu()
        return out

    # ---- what is saved -------------------------------------------------------------------
    def trainable_state(self) -> dict[str, Tensor]:
        """Encoder adapters/blocks and the weighting (the heads save their own formats)."""
        trained = {k for k, p in self.encoder.named_parameters() if p.requires_grad}
        state = {
            f"encoder.{k}": v
            for k, v in self.encoder.state_dict().items()
            if k in trained or "lora_" in k
        }
        state.update({f"weighting.{k}": v for k, v in self.weighting.state_dict().items()})
        return state

    def save_adapters(self, folder: str | Path, meta: dict[str, Any]) -> Path:
        """multitask.safetensors + one folder per head + finetune.json.

        finetune.json lists the sha256 of every file written here (each head folder also lists
        its own), so the whole output is verified in one step before registering or loading.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().float().cpu().contiguous() for k, v in self.trainable_state().items()},
            folder / MULTITASK_FILE,
        )
        files = [MULTITASK_FILE]
        for name, head in self.heads.items():
            head.save_adapter(folder / name)
            written = (folder / name).rglob("*")
            files += sorted(p.relative_to(folder).as_posix() for p in written if p.is_file())
        (folder / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
        write_checksums(folder, files, META_FILE)
        return folder

    def load_adapters(self, folder: str | Path) -> None:
        """Restore what `save_adapters` wrote; every file is checked against its sha256 first."""
        folder = Path(folder)
        verify_checksums(folder, META_FILE, REMEDY)
        state = load_safetensors(folder / MULTITASK_FILE, remedy=REMEDY)
        enc = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        wgt = {
            k.removeprefix("weighting."): v for k, v in state.items() if k.startswith("weighting.")
        }
        missing = set(enc) - set(self.encoder.state_dict())
        if missing:
            raise ValueError(
                f"{folder} holds encoder weights this encoder does not have "
                f"({sorted(missing)[:3]}...): it was finetuned with another encoder.train mode"
            )
        self.encoder.load_state_dict(enc, strict=False)
        self.weighting.load_state_dict(wgt)
        for name, head in self.heads.items():
            if not (folder / name).is_dir():
                raise ValueError(f"{folder} has no adapter for the {name!r} head")
            head.load_adapter(folder / name)
