"""EEG <-> CLIP retrieval: pooled EEG mapped into the CLIP space with a contrastive loss.

ATM-style: the encoder's valid tokens are mean-pooled, an MLP maps them to the CLIP width and
the result is L2-normalised, so an EEG window can be ranked against precomputed CLIP image (and
caption) embeddings. The loss is CLIP's symmetric InfoNCE with a learnable logit scale, clamped
at 100 as CLIP does, because an unbounded scale lets a small batch be fit by sharpening alone.

Repeated stimuli in one batch (several EEG trials of the same image) are all positives of each
other when ``batch["stimulus_id"]`` is given: the targets spread over the repeats instead of
calling a trial of the same image a negative.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from finetune.heads.resampler import TokenResampler
from pretrain.artifacts import load_safetensors, read_json, verify_checksums, write_checksums
from pretrain.encoder import Encoder

CONFIG_FILE = "retrieval_head.json"
WEIGHTS_FILE = "retrieval_head.safetensors"
REMEDY = "re-download the finetune output, or save the head again"
MAX_LOGIT_SCALE = 100.0


@dataclass
class RetrievalHeadConfig:
    """The retrieval head: CLIP width, projector size, temperature, text alignment."""

    clip_dim: int = 0  # Dc; 0: the caller sets it from the CLIP cache or the batch
    hidden: int = 512
    temperature_init: float = 0.07
    learn_temperature: bool = True
    text_weight: float = 0.0  # > 0: also align to batch["clip_text"] with this weight
    # > 0: add this weight x (1 - cos(EEG, image embedding)) -- ATM's InfoNCE + regression: a
    # dense per-sample signal beside the in-batch contrast, which small batches make weak
    cosine_weight: float = 1.0
    # how tokens become one vector: "attention" (learned queries over the tokens, keeps where
    # on the scalp; finetune/heads/resampler.py) or "mean" (Encoder.pool)
    pooling: str = "attention"
    queries: int = 4  # attention pooling: learned queries, concatenated
    dropout: float = 0.0


def clip_loss(
    a: Tensor, b: Tensor, scale: Tensor, positives: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE between L2-normalised a [B, Dc] and b [B, Dc] -> (loss, top1).

    ``positives [B, B]`` bool marks pairs that share a stimulus (diagonal when None).
    """
    logits = scale * a @ b.T  # [B, B]
    if positives is None:
        target = torch.arange(len(a), device=a.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        top1 = (logits.argmax(1) == target).float().mean()
        return loss, top1
    soft = positives.float() / positives.float().sum(1, keepdim=True)
    loss = (F.cross_entropy(logits, soft) + F.cross_entropy(logits.T, soft.T)) / 2
    top1 = positives.gather(1, logits.argmax(1, keepdim=True)).float().mean()
    return loss, top1


class RetrievalHead(nn.Module):
    """Pooled EEG -> MLP -> unit vector in the CLIP space [B, Dc]."""

    def __init__(self, config: RetrievalHeadConfig, encoder_dim: int, clip_dim: int | None = None):
        super().__init__()
        clip_dim = clip_dim or config.clip_dim
        if not clip_dim or clip_dim < 1:
            raise ValueError(
                "the retrieval head needs the CLIP width: set RetrievalHeadConfig.clip_dim or "
                "pass clip_dim (the width of the clip_image embeddings in the CLIP cache)"
            )
        if config.pooling not in ("attention", "mean"):
            raise ValueError(f"pooling must be 'attention' or 'mean', got {config.pooling!r}")
        if config.queries < 1:
            raise ValueError(f"queries must be >= 1, got {config.queries}")
        if config.temperature_init <= 0:
            raise ValueError(f"temperature_init must be > 0, got {config.temperature_init}")
        if config.text_weight < 0:
            raise ValueError(f"text_weight must be >= 0, got {config.text_weight}")
        self.config = dataclasses.replace(config, clip_dim=clip_dim)
        self.encoder_dim = encoder_dim
        self.clip_dim = clip_dim
        pooled_dim = encoder_dim
        self.resampler = None
        if config.pooling == "attention":
            self.resampler = TokenResampler(encoder_dim, encoder_dim, config.queries, depth=1)
            pooled_dim = config.queries * encoder_dim
        self.projector = nn.Sequential(
            nn.BatchNorm1d(pooled_dim),  # standardise each feature over the batch (see above)
            nn.Linear(pooled_dim, config.hidden),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden, clip_dim),
        )
        # shape [1], not a 0-dim scalar: DeepSpeed's parameter broadcast cannot view a 0-dim
        # bf16 tensor as bytes
        init = torch.tensor([math.log(1.0 / config.temperature_init)])
        if config.learn_temperature:
            self.log_scale = nn.Parameter(init)
        else:
            self.register_buffer("log_scale", init)

    def logit_scale(self) -> Tensor:
        return self.log_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()[0]

    def embed(self, tokens: Tensor, valid: Tensor | None) -> Tensor:
        """EEG tokens [B, N, D] (or [B, C, P, D]) -> unit vectors [B, Dc]."""
        if self.resampler is None:
            pooled = Encoder.pool(tokens, valid)  # [B, D]
        else:
            pooled = self.resampler(tokens, valid).flatten(1)  # [B, queries * D]
        return F.normalize(self.projector(pooled), dim=-1)

    def _target(self, batch: dict, key: str, b: int, device: torch.device) -> Tensor:
        if key not in batch:
            raise ValueError(f"the retrieval head needs batch[{key!r}] [B, Dc] (the CLIP cache)")
        target = torch.as_tensor(batch[key], device=device, dtype=torch.float32)
        if target.shape != (b, self.clip_dim):
            raise ValueError(
                f"batch[{key!r}] has shape {tuple(target.shape)}, expected ({b}, {self.clip_dim}):"
                " the head's clip_dim must be the CLIP cache's width"
            )
        return F.normalize(target, dim=-1)

    @classmethod
    def from_config(
        cls, config: RetrievalHeadConfig, encoder_dim: int, clip_dim: int
    ) -> RetrievalHead:
        return cls(config, encoder_dim, clip_dim)

    def forward(
        self,
        tokens: Tensor,
        valid: Tensor | None,
        batch: dict,
        generator: torch.Generator | None = None,  # the contrastive loss draws nothing random
    ) -> dict[str, Tensor]:
        b = tokens.shape[0]
        eeg = self.embed(tokens, valid).float()  # [B, Dc]
        scale = self.logit_scale()
        positives = None
        ids = batch.get("stimulus_id")
        if ids is not None:
            if len(ids) != b:
                raise ValueError(f"batch['stimulus_id'] has {len(ids)} items for {b} EEG windows")
            index = {s: i for i, s in enumerate(dict.fromkeys(ids))}
            codes = torch.tensor([index[s] for s in ids], device=eeg.device)
            positives = codes[:, None] == codes[None, :]  # [B, B]
        image = self._target(batch, "clip_image", b, eeg.device)
        loss, top1 = clip_loss(eeg, image, scale, positives)
        out = {"retrieval_loss": loss.detach()}
        if self.config.cosine_weight > 0:
            cosine = (1 - (eeg * image).sum(-1)).mean()
            loss = loss + self.config.cosine_weight * cosine
            out["retrieval_cosine_loss"] = cosine.detach()
        if self.config.text_weight > 0:
            text = self._target(batch, "clip_text", b, eeg.device)
            text_loss, _ = clip_loss(eeg, text, scale, positives)
            loss = loss + self.config.text_weight * text_loss
            out["retrieval_text_loss"] = text_loss.detach()
        out.update(loss=loss, logit_scale=scale.detach(), batch_top1=top1.detach())
        return out

    @torch.no_grad()
    def reference(self, tokens: Tensor, valid: Tensor | None, batch: dict) -> Tensor:
        return self.embed(tokens, valid)  # [B, Dc]

    def decode(self, tokens: Tensor, valid: Tensor | None, **_: object) -> dict[str, list]:
        return {}  # an embedding to rank against stimuli, nothing `generate` writes

    def stimulus_tensors(self, stimuli, cache_root) -> dict[str, dict[str, Tensor]]:
        return {}  # the CLIP embeddings come from the CLIP cache

    @staticmethod
    def check_saved(config: RetrievalHeadConfig, folder: str | Path) -> None:
        """No frozen base to mismatch; the widths are checked when the adapter loads."""
        if not (Path(folder) / CONFIG_FILE).is_file():
            raise ValueError(f"{folder} is not a retrieval head adapter (no {CONFIG_FILE})")

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items()}

    def save_adapter(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(folder / WEIGHTS_FILE))
        meta = {
            "head": "retrieval",
            "config": dataclasses.asdict(self.config),
            "encoder_dim": self.encoder_dim,
            "clip_dim": self.clip_dim,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        write_checksums(folder, [WEIGHTS_FILE], CONFIG_FILE)
        return folder

    def load_adapter(self, folder: str | Path) -> None:
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise ValueError(f"{folder} is not a retrieval head adapter (no {CONFIG_FILE})")
        meta = read_json(folder / CONFIG_FILE, REMEDY)
        for key in ("encoder_dim", "clip_dim"):
            if meta[key] != getattr(self, key):
                raise ValueError(
                    f"adapter in {folder} has {key}={meta[key]}, this head has "
                    f"{getattr(self, key)}; build the head with the adapter's dimensions"
                )
        if meta["config"]["hidden"] != self.config.hidden:
            raise ValueError(
                f"adapter in {folder} has hidden={meta['config']['hidden']}, "
                f"this head has {self.config.hidden}"
            )
        verify_checksums(folder, CONFIG_FILE, REMEDY)  # damaged bytes would load silently
        self.load_state_dict(load_safetensors(folder / WEIGHTS_FILE, remedy=REMEDY))

    def base_models(self) -> dict[str, str]:
        return {}  # nothing frozen: the CLIP embeddings come precomputed from the cache
