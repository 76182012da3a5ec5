"""Checkpoint -> `save_pretrained` folder + model card -> MLflow registry / Hugging Face Hub.

A ZeRO checkpoint is sharded across ranks; `zero_to_fp32` consolidates it into one fp32
state dict on any machine (no GPUs, no DeepSpeed launch). The encoder's part of it is
saved as safetensors + config.json, which is all `Encoder.from_pretrained` needs.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def checkpoint_tag_dir(ckpt: str | Path) -> tuple[Path, str]:
    """(checkpoints folder, tag) for a checkpoints folder (newest tag) or a tag folder."""
    ckpt = Path(ckpt)
    if (ckpt / "latest").exists():
        return ckpt, (ckpt / "latest").read_text().strip()
    if (ckpt.parent / "latest").exists() or ckpt.name.startswith("step"):
        return ckpt.parent, ckpt.name
    raise ValueError(
        f"{ckpt} is not a DeepSpeed checkpoint folder (no 'latest' file) nor a tag in one"
    )


def export_checkpoint(
    ckpt: str | Path,
    out: str | Path,
    evals: Sequence[str | Path] = (),
    license: str | None = None,
    repo_id: str | None = None,
) -> Path:
    """Consolidate the encoder of a (ZeRO) checkpoint into a `save_pretrained` folder, with
    a README.md model card (pretrain/model_card.py) listing the `evals` result files.

    `Encoder.save_pretrained` records the weights' sha256 and size in config.json, and
    `from_pretrained` checks them, so a copy damaged on its way to a user is refused.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain.checkpoint import weights_only_loads
    from pretrain.encoder import Encoder
    from pretrain.encoder_config import EncoderConfig
    from pretrain.model_card import load_evals, write_model_card

    results = load_evals(evals)  # a wrong file fails now, not after the consolidation
    root, tag = checkpoint_tag_dir(ckpt)
    tag_dir = root / tag
    config_file = tag_dir / "encoder_config.json"
    if not config_file.exists():
        raise ValueError(
            f"{tag_dir} has no encoder_config.json: not a brainmoe pretraining checkpoint"
        )
    config = EncoderConfig(**json.loads(config_file.read_text()))
    with weights_only_loads():  # DeepSpeed's pickles: tensors and its few types, never code
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    prefix = "encoder."
    encoder_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    encoder = Encoder(config)
    missing, unexpected = encoder.load_state_dict(encoder_state, strict=False)
    # buffers that zero_to_fp32 does not carry (e.g. router biases) come from the model file
    if missing:
        encoder_state.update(_buffers_from_model_states(tag_dir, prefix, missing))
        missing, unexpected = encoder.load_state_dict(encoder_state, strict=True), []
    assert not unexpected, unexpected
    out = Path(out)
    encoder.save_pretrained(out)
    if (tag_dir / "lineage.json").exists():
        shutil.copy(tag_dir / "lineage.json", out / "lineage.json")
    write_model_card(out, evals=results, license=license, repo_id=repo_id)
    return out


def _buffers_from_model_states(tag_dir: Path, prefix: str, names: list[str]) -> dict[str, Any]:
    import torch

    from pretrain.checkpoint import weights_only_loads

    states = sorted(tag_dir.glob("*model_states.pt"))
    if not states:
        raise ValueError(f"{tag_dir}: no model states file to read buffers {names} from")
    with weights_only_loads():  # refuses a pickle that would run code, naming the file
        module = torch.load(states[0], map_location="cpu")["module"]
    found = {n: module[prefix + n].float() for n in names if prefix + n in module}
    lost = sorted(set(names) - set(found))
    if lost:
        raise ValueError(f"{tag_dir}: checkpoint lacks encoder tensors {lost}")
    return found


def register_export(
    folder: str | Path,
    name: str,
    alias: str | None,
    tracking_uri: str,
    experiment: str = "brainmoe",
) -> dict[str, Any]:
    """Register an exported encoder folder with its lineage tags."""
    from pretrain.tracking import lineage_tags, register_folder

    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise ValueError(
            f"{folder} is not an exported encoder (no config.json); run brainmoe export first"
        )
    lineage = (
        json.loads((folder / "lineage.json").read_text())
        if (folder / "lineage.json").exists()
        else {}
    )
    tags = {"kind": "brainmoe-encoder", **lineage_tags(lineage)}
    config_json = json.dumps(lineage.get("config", {}), sort_keys=True)
    if len(config_json) <= 5000:
        tags["resolved_config"] = config_json
    return register_folder(
        folder, name, alias, tags, tracking_uri, experiment, run_id=lineage.get("mlflow_run_id")
    )
