"""The brainmoe encoder with a classification head, as a braindecode model.

Shape legend: B batch, C channels, T samples, P patches per channel, D width, F pooled width.

braindecode users train with ``EEGClassifier`` on their own ``WindowsDataset``: windows
`[B, C, T]` in the recording's unit (volts for ``MOABBDataset``) at its own rate, the
channels described once by ``chs_info`` (``info["chs"]``). This module follows braindecode's
conventions (:class:`~braindecode.models.base.EEGModuleMixin`: ``n_outputs``, ``n_chans``,
``chs_info``, ``n_times``, ``input_window_seconds``, ``sfreq``; ``final_layer``,
``reset_head``, ``return_features``) and turns such a window into what the encoder reads:

- **channels**: ``chs_info`` names are canonicalised as the data plane does (``Fc5.`` ->
  FC5, ``T3`` -> T7) and looked up in the encoder's saved vocabulary; a known name gets its
  10-05 template position (the one pretraining saw), an unknown name keeps its ``loc``
  position if it has one. A montage with no channel known by name or position is an error:
  the encoder would see anonymous signals.
- **units**: the encoder reads microvolts; ``unit`` says what the windows hold ("V" for
  braindecode/MNE data unless a preprocessing step rescaled it, "mV", or "uV").
- **rate**: windows stay at ``sfreq``; the encoder resamples them to its own rate itself.

The pooled representation is the probe's (:mod:`pretrain.features`): ``regions`` (default)
keeps the left/right split motor imagery lives on. A LayerNorm then a linear layer map it to
logits -- the norm is the trainable counterpart of the probe's StandardScaler.

Finetuning leaves MoE router biases as pretrained (the aux-loss-free balancing step belongs
to pretraining) and turns channel-name dropout off (one fixed montage here). Plain PyTorch +
braindecode: a registry URI is resolved through MLflow only when one is given.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from braindecode.models.base import EEGModuleMixin
from torch import Tensor, nn

from pretrain.channel_vocab import ChannelVocab
from pretrain.encoder import Encoder
from pretrain.encoder_config import CONFIGS, EncoderConfig, get_config
from pretrain.encoder_files import ENCODER_REMEDY
from pretrain.features import POOLINGS, REGION_SITES, UNITS, region_of, region_pool_batch

REGISTRY_PREFIXES = ("models:/", "runs:/")


def resolve_encoder(source: str | Path, tracking_uri: str | None = None) -> Path | str:
    """An encoder folder, or the config name of a random init; a Hub repo id or a
    ``models:/``/``runs:/`` URI is downloaded (MLflow is imported only then)."""
    text = str(source)
    if text in CONFIGS and not Path(text).exists():
        return text
    if Path(text).is_dir() or text.startswith(REGISTRY_PREFIXES) or "/" in text:
        from pretrain.tracking import resolve_model  # folders, models:/, runs:/, Hub ids

        return resolve_model(text, tracking_uri)  # MLflow picks a temp dir
    raise ValueError(
        f"encoder={text!r} is neither an encoder folder (save_pretrained / brainmoe export), "
        f"a registry URI (models:/<name>@<alias>), a Hub repo id (org/name), nor a config "
        f"name {list(CONFIGS)}"
    )


def encoder_meta(resolved: Path | str) -> tuple[EncoderConfig, ChannelVocab]:
    """A resolved encoder's config and channel vocabulary, without reading its weights."""
    if isinstance(resolved, str):
        return get_config(resolved), ChannelVocab.standard()
    from pretrain.artifacts import read_json

    meta = read_json(resolved / "config.json", ENCODER_REMEDY)
    return EncoderConfig.from_dict(meta["config"]), ChannelVocab(meta["channel_vocab"])


def build_encoder(resolved: Path | str) -> Encoder:
    """Saved weights, or a random init of a config. Channel-name dropout (pretraining's way
    of teaching positions) is off: a finetuning sees one montage."""
    if isinstance(resolved, str):
        return Encoder(get_config(resolved, channel_name_dropout=0.0))
    return Encoder.from_pretrained(resolved, channel_name_dropout=0.0)


def channel_table(vocab: ChannelVocab, chs_info: list[dict]) -> tuple[Tensor, Tensor, np.ndarray]:
    """``chs_info`` -> (vocabulary ids `[C]`, position known `[C]`, positions `[C, 3]` metres
    as numpy with NaN unknown), raising when no channel can be placed by name or position."""
    from shards.channels import canonicalize

    names = [str(ch.get("ch_name", "")) for ch in chs_info]
    locs = np.full((len(names), 3), np.nan)
    for i, ch in enumerate(chs_info):
        loc = ch.get("loc")
        if loc is not None and len(loc) >= 3:
            locs[i] = np.asarray(loc[:3], dtype=np.float64)
    info = canonicalize(names, locs)
    ids = vocab.ids([info.names])[0]  # [C]
    known = torch.from_numpy(np.isfinite(info.positions).all(axis=1))  # [C]
    placed = (ids > 0) | known
    if not bool(placed.any()):
        raise ValueError(
            f"none of the {len(names)} channels in chs_info ({names[:5]}...) is known to the "
            "encoder by name (10-05 system) or by position (chs_info[i]['loc']): give the "
            "recording's montage (raw.set_montage) or standard channel names"
        )
    if not bool(placed.all()):
        lost = [n for n, ok in zip(names, placed.tolist(), strict=True) if not ok]
        warnings.warn(
            f"channels {lost} have neither a 10-05 name nor a position: the encoder sees "
            "them without any channel identity",
            stacklevel=3,
        )
    return ids, known, info.positions


class BrainmoeClassifier(EEGModuleMixin, nn.Module):
    """brainmoe encoder + pooling + linear head: windows `[B, C, T]` -> logits
    `[B, n_outputs]`.

    Parameters
    ----------
    encoder : str
        An encoder folder (``Encoder.save_pretrained`` or ``brainmoe export``), a registry URI
        ``models:/<name>@<alias>`` (resolved with MLflow at ``tracking_uri``), or an
        ``EncoderConfig`` name such as ``"tiny"`` for a randomly initialised encoder.
    pooling : str
        ``"mean"``, ``"regions"`` or ``"moments"`` (:mod:`pretrain.features`).
    unit : str
        Unit of the windows: ``"V"`` (braindecode/MNE default), ``"mV"`` or ``"uV"``; they
        are multiplied by ``pretrain.features.UNITS[unit]`` to reach the encoder's uV.
    freeze_encoder : bool
        Train the head only (a linear probe); the encoder then stays in eval mode.
    drop_prob : float
        Dropout before the linear layer.
    tracking_uri : str or None
        MLflow server for a registry URI.
    """

    def __init__(
        self,
        n_outputs: int | None = None,
        n_chans: int | None = None,
        chs_info: list[dict] | None = None,
        n_times: int | None = None,
        input_window_seconds: float | None = None,
        sfreq: float | None = None,
        encoder: str | None = None,
        pooling: str = "regions",
        unit: str = "V",
        freeze_encoder: bool = False,
        drop_prob: float = 0.0,
        tracking_uri: str | None = None,
    ):
        super().__init__(
            n_outputs=n_outputs,
            n_chans=n_chans,
            chs_info=chs_info,
            n_times=n_times,
            input_window_seconds=input_window_seconds,
            sfreq=sfreq,
        )
        del n_outputs, n_chans, chs_info, n_times, input_window_seconds, sfreq
        # Every user error before the encoder's weights are read.
        if encoder is None:
            raise ValueError(
                "BrainmoeClassifier needs encoder= (an encoder folder, models:/<name>@<alias>, "
                f"or a config name {list(CONFIGS)} for random init)"
            )
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {list(UNITS)}, got {unit!r}")
        if self._chs_info is None:
            raise ValueError(
                "BrainmoeClassifier needs chs_info= (e.g. windows_dataset.datasets[0]."
                "raw.info['chs']): the encoder knows a channel by its name and position"
            )
        if self._n_outputs is None or self._n_outputs < 1:
            raise ValueError(f"n_outputs must be a positive class count, got {self._n_outputs}")
        rate = self.sfreq  # braindecode's own error when neither given nor inferable
        if rate <= 0:
            raise ValueError(f"sfreq must be positive, got {rate}")
        self.pooling, self.unit, self.freeze_encoder = pooling, unit, freeze_encoder
        self.drop_prob = drop_prob

        resolved = resolve_encoder(encoder, tracking_uri)
        cfg, vocab = encoder_meta(resolved)
        ids, known, positions = channel_table(vocab, self.chs_info)
        if self._n_times is not None or self._input_window_seconds is not None:
            seconds = self.n_times / rate
            if seconds < cfg.patch_seconds:
                raise ValueError(
                    f"windows of {seconds:.3g} s are shorter than one encoder patch "
                    f"({cfg.patch_seconds} s): use longer windows"
                )
        self.encoder = build_encoder(resolved)
        pos = torch.from_numpy(np.nan_to_num(positions)).float()
        # derived from chs_info, so not part of the state dict (encoder + head only)
        self.register_buffer("ch_ids", ids, persistent=False)  # [C]
        self.register_buffer("ch_pos", pos, persistent=False)  # [C, 3]
        self.register_buffer("pos_known", known, persistent=False)  # [C]
        regions = torch.from_numpy(region_of(positions)).long()
        self.register_buffer("regions", regions, persistent=False)  # [C], -1 = no site
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        self.n_features = self.feature_width(pooling, cfg.dim)
        self.final_layer = self.make_head(self.n_outputs)

    @staticmethod
    def feature_width(pooling: str, dim: int) -> int:
        sites = len(REGION_SITES) + 1
        return {"mean": dim, "regions": sites * dim, "moments": 2 * sites * dim}[pooling]

    def make_head(self, n_outputs: int) -> nn.Module:
        return nn.Sequential(
            nn.LayerNorm(self.n_features),
            nn.Dropout(self.drop_prob),
            nn.Linear(self.n_features, n_outputs),
        )

    def reset_head(self, n_outputs: int) -> None:
        """A fresh head for another class count (braindecode's from_pretrained calls it)."""
        self._set_n_outputs(n_outputs)
        device = self.final_layer[-1].weight.device
        self.final_layer = self.make_head(n_outputs).to(device)

    def train(self, mode: bool = True) -> BrainmoeClassifier:
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder is a fixed feature extractor
        return self

    def features(self, x: Tensor) -> Tensor:
        """Windows `[B, C, T]` in ``unit`` at ``sfreq`` -> pooled features `[B, F]`."""
        if x.ndim != 3 or x.shape[1] != self.n_chans:
            raise ValueError(
                f"expected windows [batch, {self.n_chans} channels, time], got {tuple(x.shape)}"
            )
        b = x.shape[0]
        batch: dict[str, Any] = {
            "eeg": x.float() * UNITS[self.unit],  # [B, C, T] uV
            "ch_ids": self.ch_ids.expand(b, -1),  # [B, C]
            "ch_pos": self.ch_pos.expand(b, -1, -1),  # [B, C, 3]
            "pos_known": self.pos_known.expand(b, -1),  # [B, C]
            "sfreq": float(self.sfreq),  # the encoder resamples to its own rate
        }
        # prepare + encode is Encoder.forward; called apart so module hooks (torchinfo, which
        # braindecode's str(model) runs) never meet the EncoderOutput dataclass
        out = self.encoder.encode(self.encoder.prepare(batch))
        if self.pooling == "mean":
            return Encoder.pool(out)  # [B, D]
        grid = out.grid()  # [B, C, P, D]
        if self.pooling == "moments":
            grid = torch.cat([grid, grid.pow(2)], dim=-1)  # [B, C, P, 2D]
        valid = out.valid.view(grid.shape[:3])  # [B, C, P]
        return region_pool_batch(grid, valid, self.regions.expand(b, -1))  # [B, F]

    def forward(self, x: Tensor, return_features: bool = False) -> Tensor | dict[str, Any]:
        """`[B, C, T]` -> logits `[B, n_outputs]`; with ``return_features`` braindecode's
        ``{"features": [B, F], "cls_token": None}``."""
        z = self.features(x)
        if return_features:
            return {"features": z, "cls_token": None}
        return self.final_layer(z)

    def extra_repr(self) -> str:
        return f"pooling={self.pooling!r}, unit={self.unit!r}, sfreq={self.sfreq:g}"
