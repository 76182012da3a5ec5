"""An encoder folder: the weights (safetensors) and config.json, written and read exactly.

``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` are methods of
:class:`pretrain.encoder.Encoder` (through this mixin), so a folder written on a cluster
rebuilds the same model anywhere without DeepSpeed: architecture, channel vocabulary and
router biases included, checksums checked before a tensor is read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pretrain.encoder_config import EncoderConfig

if TYPE_CHECKING:  # the class this mixin is part of
    from pretrain.encoder import Encoder

FORMAT_VERSION = 1
ENCODER_REMEDY = "re-export it (brainmoe export) or re-download it from the registry"


class EncoderFiles:
    """Saving and loading for :class:`pretrain.encoder.Encoder` (needs its ``config``,
    ``vocab``, ``state_dict`` and ``moe_layers``)."""

    def save_pretrained(self, path: str | Path) -> Path:
        """``path/model.safetensors`` + ``path/config.json`` (config and channel vocabulary).

        Under ZeRO-3 gather the full parameters first (e.g. inside
        ``deepspeed.zero.GatheredParameters``) and call this on rank 0 only.
        """
        from safetensors.torch import save_file

        from pretrain.artifacts import write_checksums

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        meta = {
            "model_type": "brainmoe-encoder",
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "channel_vocab": list(self.vocab.names),
        }
        (path / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        # sha256 + size of the weights in config.json: from_pretrained refuses damaged bytes
        write_checksums(path, ["model.safetensors"], "config.json")
        return path

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str:
        """Save with a model card and upload as one commit of ``repo_id``; -> commit URL.
        ``kwargs``: see :func:`pretrain.hub.push_folder` (``private``, ``token``, ...)."""
        from pretrain.hub import push_encoder
        from pretrain.model_card import write_model_card

        return push_encoder(self.save_pretrained, write_model_card, repo_id, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **overrides: Any,
    ) -> Encoder:
        """Rebuild a saved encoder exactly (router biases included), without DeepSpeed.

        ``path``: a folder or a Hub repo id ("org/name"), read through the Hub cache
        (pretrain/hub.py). ``overrides`` change non-architectural fields (e.g.
        ``activation_checkpointing``, ``expert_backend``, ``dropout``).
        """
        from pretrain.artifacts import ArtifactError, load_safetensors, read_json, verify_checksums
        from pretrain.hub import resolve

        hub = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        path = resolve(path, token=token, **hub)
        remedy = ENCODER_REMEDY
        meta = read_json(path / "config.json", remedy)
        if meta.get("model_type") != "brainmoe-encoder":
            raise ArtifactError(
                f"{path}/config.json is not a brainmoe encoder's (model_type "
                f"{meta.get('model_type')!r}); give a folder written by save_pretrained"
            )
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} was written by a newer brainmoe")
        config = EncoderConfig.from_dict({**meta["config"], **overrides})
        verify_checksums(path, "config.json", remedy)  # before a tensor is read
        state = load_safetensors(path / "model.safetensors", str(device), remedy)
        with torch.device("meta"):  # no random init of weights about to be overwritten
            model = cls(config, meta["channel_vocab"])
        model.load_state_dict(state, strict=True, assign=True)
        model._materialize_buffers(torch.device(device))
        if dtype is not None:
            model.to(dtype)
        return model

    def _materialize_buffers(self, device: torch.device) -> None:
        """Recreate the non-saved buffers left on meta by a meta build + assign-load."""
        for layer in self.moe_layers():
            layer.counts = torch.zeros(layer.n_experts, dtype=torch.int64, device=device)
        left = [n for n, t in [*self.named_parameters(), *self.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"tensors left on the meta device: {left}")
