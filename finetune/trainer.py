"""Finetuning = the shared DeepSpeed loop (pretrain/trainer.py) + the paired data, the
multi-task model, held-out evaluation, and saving/registering only what was trained."""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from finetune.clip_cache import ClipCache
from finetune.config import FinetuneConfig
from finetune.model import MultiTaskModel, adapt_encoder
from finetune.pairs import Pairing, latent_cache
from finetune.prepare import clip_folder, data_root, prepare
from finetune.splits import KeySelect
from pretrain.encoder import Encoder
from pretrain.tracking import Tracker
from pretrain.trainer import Trainer, log
from shards.reader import ReaderConfig, collate_eeg, make_loader


def build_heads(cfg: FinetuneConfig, encoder_dim: int, clip_dim: int) -> dict[str, torch.nn.Module]:
    heads: dict[str, torch.nn.Module] = {}
    for task in cfg.tasks:
        if task == "retrieval":
            from finetune.heads.retrieval import RetrievalHead

            heads[task] = RetrievalHead(cfg.retrieval, encoder_dim, clip_dim)
        elif task == "image":
            from finetune.heads.image import ImageHead

            heads[task] = ImageHead(cfg.image, encoder_dim, clip_dim)
        elif task == "text":
            from finetune.heads.text import TextHead

            heads[task] = TextHead(cfg.text, encoder_dim)
    return heads


def build_model(cfg: FinetuneConfig, encoder_dir: Path, clip_dim: int) -> MultiTaskModel:
    from finetune.multitask import TaskWeighting

    encoder = Encoder.from_pretrained(encoder_dir)
    e = cfg.encoder
    encoder = adapt_encoder(encoder, e.train, e.top_blocks, e.lora_rank, e.lora_alpha)
    heads = build_heads(cfg, encoder.config.dim, clip_dim)
    weighting = TaskWeighting(cfg.weighting, list(heads), encoder.config.dim)
    return MultiTaskModel(encoder, heads, weighting)


class FinetuneTrainer(Trainer):
    cfg: FinetuneConfig

    def validate(self, world: int) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="brainmoe-finetune-")
        self.prep = prepare(self.cfg, world, Path(self._tmp.name))
        folder = clip_folder(self.cfg)
        self.clip = ClipCache.load(folder)

    def build_model(self) -> torch.nn.Module:
        model = build_model(self.cfg, self.prep.encoder_dir, self.clip.dim)
        if self.cfg.init_adapters:
            from finetune.prepare import check_adapter

            folder = check_adapter(
                self.cfg,
                self.cfg.init_adapters,
                self.prep.encoder_fingerprint,
                Path(self._tmp.name) / "init",
            )
            model.load_adapters(folder)
        latents = None
        if "image" in model.heads:
            head = model.heads["image"]
            latents = latent_cache(
                self.prep.stimuli,
                head.encode_latents,
                head.image_size,
                data_root(self.cfg) / "latents",
                head.latent_key(),
            )
        self.pairing = Pairing(self.prep.stimuli, self.clip, latents)
        if self.rank == 0:
            self.prep.split.save(self.run_dir / "split.json")
            self.prep.stimuli.save(self.run_dir / "stimuli.json")
            log(self.prep.split.summary())
            counts = {
                name: sum(p.numel() for p in mod.parameters() if p.requires_grad)
                for name, mod in [("encoder", model.encoder), *model.heads.items()]
            }
            log("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        return model

    def make_loader(self, reader: ReaderConfig):
        split = self.prep.split
        reader.samples_per_epoch = len(split.train_keys)
        return make_loader(
            self.cfg.data.shards,
            reader,
            rank=self.rank,
            world_size=self.world,
            select=KeySelect(split.train_keys),
        )

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        out = self.engine(self.pairing(batch), generator=generator)
        metrics = {"loss": out["loss"].detach()}
        metrics.update({f"{k}_loss": v.detach() for k, v in out["losses"].items()})
        metrics.update({f"weight/{k}": v for k, v in out["weights"].items()})
        return {"loss": out["loss"], "metrics": metrics, "tokens": out["enc"].valid.sum()}

    def after_step(self) -> torch.Tensor | None:
        # Routing only rebalances when the experts' blocks themselves are trained.
        if self.cfg.encoder.train not in ("top", "full"):
            return None
        encoder = self.engine.module.encoder
        load = encoder.routing_counts().to(torch.float64)
        if not load.numel():
            return None
        dist.all_reduce(load)
        encoder.update_router_bias(load)
        return load

    def meta(self) -> dict[str, Any]:
        model = self.engine.module
        bases: dict[str, str] = {}
        for name, head in model.heads.items():
            bases.update({f"{name}.{k}": v for k, v in head.base_models().items()})
        return {
            "encoder_uri": self.prep.encoder_uri,
            "encoder_fingerprint": self.prep.encoder_fingerprint,
            "encoder_config": model.encoder.config.to_dict(),
            "encoder_train": asdict(self.cfg.encoder),
            "tasks": list(model.heads),
            "base_models": bases,
            "clip": {
                "model": self.clip.index["model"],
                "pretrained": self.clip.index["pretrained"],
            },
            "clip_dim": self.clip.dim,
            "config": json.loads(json.dumps(asdict(self.cfg), default=str)),
            "lineage": self.lineage(),
        }

    def finish(self, tracker: Tracker) -> dict[str, Any]:
        from finetune.evaluate import evaluate

        result: dict[str, Any] = {"step": self.state.step, "run_dir": str(self.run_dir)}
        model = self.engine.module
        model.eval()
        if self.rank == 0:
            out = self.run_dir / "adapters"
            model.save_adapters(out, self.meta())
            self.prep.stimuli.save(out / "stimuli.json")  # for generate's contact sheet
            tracker.log_artifact(self.run_dir / "config.yaml")
            tracker.log_artifact(self.run_dir / "split.json")
            self.save_reference(model)
            scores = evaluate(model, self.cfg, self.prep, self.pairing, self.device, self.dtype)
            (self.run_dir / "eval.json").write_text(json.dumps(scores, indent=1) + "\n")
            tracker.log_metrics(
                {k: v for k, v in _flat(scores).items() if isinstance(v, float)}, self.state.step
            )
            tracker.log_artifact(self.run_dir / "eval.json")
            if self.cfg.train.plots:
                from pretrain.plots import plot_loss

                plots = self.run_dir / "plots"
                plots.mkdir(exist_ok=True)
                plot_loss(self.history, plots / "loss.png")
                tracker.log_artifact(plots, "plots")
            result["eval"] = scores
            if self.cfg.register.name:
                from finetune.registry import register_adapters

                result["registered"] = self.register_output(register_adapters, out)
        model.train()
        return result

    @torch.no_grad()
    def save_reference(self, model: MultiTaskModel) -> None:
        """What the engine's model computes on a fixed held-out batch, so a reload of the saved
        adapters can be checked against it (tests, and anyone doubting an export)."""
        from finetune.inputs import windows_from_shards

        keys = self.prep.split.test_keys[:4]
        batch = self._to_device(
            self.pairing(collate_eeg(windows_from_shards(self.cfg.data.shards, keys)))
        )
        torch.save(
            {"keys": keys, **reference_outputs(model, batch)}, self.run_dir / "reference_output.pt"
        )


@torch.no_grad()
def reference_outputs(model: MultiTaskModel, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Deterministic outputs of every trained part on `batch` (eval mode)."""
    enc = model.encoder(batch)
    out = {"tokens": enc.tokens.float().cpu()}
    for name, head in model.heads.items():
        if name == "retrieval":
            out[name] = head.embed(enc.tokens, enc.valid).float().cpu()
        elif name == "image":
            out[name] = head.context(enc.tokens, enc.valid).float().cpu()
        elif name == "text":
            ids, mask, _ = head.teacher_forcing_inputs(enc.tokens, enc.valid, batch["captions"])
            logits = head.lm(inputs_embeds=ids, attention_mask=mask).logits
            out[name] = logits.float().cpu()
    return out


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = float(value) if isinstance(value, int | float) else value
    return out
