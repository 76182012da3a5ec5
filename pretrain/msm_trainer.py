"""Pretraining = the shared DeepSpeed loop (pretrain/trainer.py) + what is particular to masked
signal modelling: the MSM model, loss-free expert balancing after each step, the encoder
config in every checkpoint, and reconstructions / export / registration at the end."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pretrain.config import PretrainConfig
from pretrain.model import build_model, encoder_config, validate_config
from pretrain.tracking import Tracker
from pretrain.trainer import Trainer
from shards.reader import ReaderConfig, make_loader


class MSMTrainer(Trainer):
    cfg: PretrainConfig

    def validate(self, world: int) -> None:
        validate_config(self.cfg, world)

    def build_model(self) -> torch.nn.Module:
        return build_model(self.cfg)

    def forward(self, batch: dict[str, Any], generator: torch.Generator) -> dict[str, Any]:
        out = self.engine(batch, generator=generator)
        parts = {
            k: v.detach() for k, v in out.items() if k.startswith(("mse_", "subject_", "contrast"))
        }
        return {
            "loss": out["loss"],  # mse + aux_loss
            "metrics": {"loss": out["mse"].detach(), "aux_loss": out["aux_loss"].detach(), **parts},
            "tokens": out["valid"].sum(),
        }

    def after_step(self) -> torch.Tensor | None:
        # aux-loss-free balancing: every rank applies the same all-reduced load
        encoder = self.engine.module.encoder
        load = encoder.routing_counts().to(torch.float64)
        if not load.numel():
            return None
        dist.all_reduce(load)
        encoder.update_router_bias(load)
        return load

    def checkpoint_extras(self, folder: Path) -> None:
        enc = encoder_config(self.cfg)
        (folder / "encoder_config.json").write_text(json.dumps(asdict(enc), indent=1))

    def finish(self, tracker: Tracker) -> dict[str, Any]:
        """Reference outputs for the export check, plots, and (optionally) registration."""
        from pretrain.plots import plot_expert_load, plot_loss, plot_reconstructions

        probe = make_loader(
            self.cfg.data.shards,
            ReaderConfig(batch_size=4, num_workers=0, shuffle=False),
            rank=0,
            world_size=1,
        )
        batch = self._to_device(next(iter(probe)))
        self.engine.eval()
        with torch.no_grad():
            tokens = self.engine.module.encoder(batch).tokens
            recon = self.engine.module(batch, generator=torch.Generator().manual_seed(0))
        self.engine.train()
        result = {"step": self.state.step, "run_dir": str(self.run_dir)}
        if self.rank == 0:
            torch.save(
                {
                    "batch": {k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()},
                    "tokens": tokens.float().cpu(),
                },
                self.run_dir / "reference_output.pt",
            )
            if self.cfg.train.plots:
                plots = self.run_dir / "plots"
                plots.mkdir(exist_ok=True)
                plot_loss(self.history, plots / "loss.png")
                if getattr(self, "last_load", None) is not None:
                    plot_expert_load(self.last_load.cpu().numpy(), plots / "expert_load.png")
                plot_reconstructions(batch, recon, plots / "reconstructions.png")
                tracker.log_artifact(plots, "plots")
            tracker.log_artifact(self.run_dir / "config.yaml")
            if self.cfg.register.name:
                result["registered"] = self.export_and_register()
        return result

    def export_and_register(self) -> dict[str, Any]:
        from pretrain.export import export_checkpoint, register_export

        out = self.run_dir / "encoder"
        export_checkpoint(self.ckpt_dir, out)
        return self.register_output(register_export, out)
