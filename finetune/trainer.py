"""Finetuning = the shared DeepSpeed loop (pretrain/trainer.py) + the paired data, the
multi-task model, held-out evaluation, and saving/registering only what was trained."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from finetune.clip_cache import ClipCache
from finetune.config import FinetuneConfig
from finetune.model import MultiTaskModel, build_model
from finetune.pairs import Pairing
from finetune.prepare import clip_folder, data_root, validate_finetune
from finetune.prepared import load_prepared, prepare_run
from finetune.splits import KeySelect
from pretrain.scratch import scratch_path, sweep_dead
from pretrain.tracking import Tracker
from pretrain.trainer import Trainer, log
from shards.reader import ReaderConfig, make_loader
from shards.sample import collate_eeg

SCRATCH_PREFIX = "brainmoe-finetune"  # <prefix>-pid<pid>-<random>: one rank's fetched files


class FinetuneTrainer(Trainer):
    """``prepared``: the run's preparation record (finetune/prepared.py), given by a launcher
    whose ranks may not share the run folder (Ray Train); otherwise rank 0 reads it there."""

    cfg: FinetuneConfig

    def __init__(self, cfg: FinetuneConfig, checkpoints=None, prepared: dict | None = None):
        self._record = prepared
        self._scratch: Path | None = None
        try:
            super().__init__(cfg, checkpoints)
        except BaseException:  # e.g. a refused adapter: train(), which cleans up, never runs
            self._drop_scratch()
            raise

    def _drop_scratch(self) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def validate(self, world: int) -> None:
        validate_finetune(self.cfg, world)
        record = self._record if self._record is not None else self._shared_record(world)
        # this rank's scratch: only an encoder or adapters fetched from elsewhere land here,
        # and the download makes the folder. Made up front, every rank that never reached
        # train()'s clean-up (a killed worker) left an empty folder in /tmp; named by pid, the
        # copies of ranks killed after fetching are swept by the next rank on the node
        tmp = Path(tempfile.gettempdir())
        sweep_dead(tmp, SCRATCH_PREFIX)
        self._scratch = scratch_path(tmp, SCRATCH_PREFIX)
        self.prep = load_prepared(self.cfg, record, self._scratch)
        self.clip = ClipCache.load(clip_folder(self.cfg))

    def _shared_record(self, world: int) -> dict:
        """Rank 0 reads the launcher's record from the run folder -- or, started without the
        launcher, prepares it -- and broadcasts it (or its ValueError) to every rank."""
        message: list[Any] = [None]
        if self.rank == 0:
            try:
                message = [prepare_run(self.cfg, world, reuse_matching=True)]
            except ValueError as err:
                message = [err]
        nccl = dist.get_backend() == "nccl"  # its objects travel on this rank's GPU
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if nccl else None
        dist.broadcast_object_list(message, src=0, device=device)
        if isinstance(message[0], ValueError):
            raise message[0]
        return message[0]

    def build_model(self) -> torch.nn.Module:
        model = build_model(self.cfg, self.prep.encoder_dir, self.clip.dim)
        if self.cfg.init_adapters:
            from finetune.prepare import check_adapter

            folder = check_adapter(
                self.cfg,
                self.cfg.init_adapters,
                self.prep.encoder_fingerprint,
                self._scratch / "init",
            )
            model.load_adapters(folder)
        fields: dict[str, dict[str, torch.Tensor]] = {}
        for head in model.heads.values():  # precomputed per stimulus, e.g. VAE latents
            fields.update(head.stimulus_tensors(self.prep.stimuli, data_root(self.cfg)))
        self.pairing = Pairing(self.prep.stimuli, self.clip, fields)
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

    def train(self) -> dict[str, Any]:
        """The base loop, then the scratch folder goes if anything was fetched into it (a Ray
        worker ends without running atexit: no finaliser would remove it)."""
        try:
            return super().train()
        finally:
            self._drop_scratch()

    def finish(self, tracker: Tracker) -> dict[str, Any]:
        from finetune.evaluate import evaluate
        from finetune.model import META_FILE
        from finetune.model_card import write_model_card
        from pretrain.artifacts import add_checksums

        result: dict[str, Any] = {"step": self.state.step, "run_dir": str(self.run_dir)}
        model = self.engine.module
        model.eval()
        if self.rank == 0:
            out = self.run_dir / "adapters"
            model.save_adapters(out, self.meta())
            self.prep.stimuli.save(out / "stimuli.json")  # for generate's contact sheet
            # signed too: verified on load, pushed to and fetched from the Hub with the rest
            add_checksums(out, ["stimuli.json"], META_FILE)
            tracker.log_artifact(self.run_dir / "config.yaml")
            tracker.log_artifact(self.run_dir / "split.json")
            self.save_reference(model)
            scores = evaluate(model, self.cfg, self.prep, self.pairing, self.device, self.dtype)
            (self.run_dir / "eval.json").write_text(json.dumps(scores, indent=1) + "\n")
            write_model_card(out, scores)  # README.md, added to finetune.json's checksums
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
            {"keys": keys, **model.reference_outputs(batch)}, self.run_dir / "reference_output.pt"
        )


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = float(value) if isinstance(value, int | float) else value
    return out
