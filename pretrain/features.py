"""Frozen-encoder features: the pooling the probe uses, and a scikit-learn transformer for it.

Shape legend: B batch, C channels, T samples, P patches per channel, D width, R 10-20 sites.

The field compares EEG decoders through MOABB, whose pipelines are scikit-learn estimators
fed `X [n, C, T]` (volts, the epochs' own rate). :class:`EncoderFeatures` turns such an
array (or an ``mne.Epochs``) into pooled encoder features, so a frozen encoder drops into
any MOABB evaluation, ``Pipeline`` or grid search beside CSP and tangent-space baselines.
It stores its parameters as given and loads the encoder in ``fit``, which is what
``sklearn.clone`` (called by MOABB for every fold) needs.

Three poolings. ``mean`` averages every valid token (the usual foundation-model probe).
``regions`` keeps coarse space: tokens are averaged over time per channel, channels are
assigned to the nearest of the 19 10-20 sites by 3D position (any montage maps onto the
same grid; channels without a position only enter a global mean), and the 20 vectors are
concatenated. Much of what EEG labels mean is lateralised (left vs right motor imagery
moves mu/beta power between C3 and C4), which a global mean cannot see. ``moments`` is
``regions`` over each token and its square: a time average of tokens that follow the
waveform cancels oscillations out, and their second moment keeps the power that motor
imagery changes.

``layer`` reads a block's output instead of the last one (through the final norm): frozen
foundation models often carry more in a middle layer than at the top.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted
from torch import Tensor

from pretrain.encoder import Encoder, EncoderOutput
from pretrain.encoder_input import EncoderInput

POOLINGS = ("mean", "regions", "moments")
UNITS = {"V": 1e6, "mV": 1e3, "uV": 1.0}  # factor to microvolts, what the encoder reads
REGION_SITES = (
    "Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz",
    "C4", "T8", "P7", "P3", "Pz", "P4", "P8", "O1", "O2",
)  # fmt: skip


@functools.cache
def _site_positions() -> np.ndarray:
    from shards.channels import standard_positions

    std = standard_positions()
    return np.stack([std[name] for name in REGION_SITES])  # [R, 3]


def region_of(positions: np.ndarray) -> np.ndarray:
    """`[..., C, 3]` metres (NaN unknown) -> index of the nearest 10-20 site per channel
    `[..., C]`, -1 where the position is unknown."""
    sites = _site_positions()
    known = np.isfinite(positions).all(axis=-1)
    dist = np.linalg.norm(np.nan_to_num(positions)[..., None, :] - sites, axis=-1)  # [..., C, R]
    return np.where(known, dist.argmin(axis=-1), -1)


def region_index(ch_pos: Tensor, pos_known: Tensor) -> Tensor:
    """:func:`region_of` for an encoder's batch: `[B, C, 3]` metres + known `[B, C]` ->
    `[B, C]` long on the same device (the probe's assignment, computed by the same code)."""
    pos = ch_pos.detach().double().cpu().numpy()
    pos[~pos_known.bool().cpu().numpy()] = np.nan
    return torch.from_numpy(region_of(pos)).to(ch_pos.device)


def region_pool(grid: Tensor, valid: Tensor, regions: np.ndarray) -> Tensor:
    """One sample's tokens `[C, P, D]` -> `[(R + 1) * D]`: per-site means of the time-pooled
    channels (zeros for a site no channel is near), then the mean of every channel."""
    return region_pool_batch(grid[None], valid[None], np.asarray(regions)[None])[0]


def region_pool_batch(grid: Tensor, valid: Tensor, regions: np.ndarray | Tensor) -> Tensor:
    """:func:`region_pool` for a batch: `[B, C, P, D]`, valid `[B, C, P]`, site per channel
    `[B, C]` (-1: none) -> `[B, (R + 1) * D]`, as one matrix product per batch."""
    return region_tokens(grid, valid, regions)[0].reshape(grid.shape[0], -1)


def region_tokens(
    grid: Tensor, valid: Tensor, regions: np.ndarray | Tensor
) -> tuple[Tensor, Tensor]:
    """Tokens `[B, C, P, D]` -> one token per 10-20 site and one for every channel
    `[B, R + 1, D]`, each the mean of its time-pooled channels, and which of them had any
    channel `[B, R + 1]` (a site no channel is near is zeros, marked False)."""
    w = valid[..., None].to(grid.dtype)  # [B, C, P, 1]
    per_channel = (grid * w).sum(2) / w.sum(2).clamp_min(1.0)  # [B, C, D]
    has = valid.any(2)  # [B, C]
    sites = torch.arange(len(REGION_SITES), device=grid.device)
    member = torch.as_tensor(regions, device=grid.device)[:, None, :] == sites[None, :, None]
    member = torch.cat([member, torch.ones_like(member[:, :1])], 1) & has[:, None, :]
    weight = member.to(grid.dtype)  # [B, R + 1, C]: sites, then every channel
    out = weight @ per_channel / weight.sum(-1, keepdim=True).clamp_min(1.0)  # [B, R + 1, D]
    return out, member.any(-1)


def resolve_layer(layer: int | None, depth: int) -> int:
    """``layer`` (None = last, negative counts from the end) -> block index in [0, depth)."""
    if layer is None:
        return depth - 1
    if not isinstance(layer, (int, np.integer)) or isinstance(layer, bool):
        raise ValueError(f"layer must be an integer block index or None, got {layer!r}")
    if not -depth <= layer < depth:
        raise ValueError(f"layer {layer} is outside this encoder's {depth} blocks")
    return int(layer) % depth


def encode_at_layer(
    encoder: Encoder,
    batch: dict[str, Any] | EncoderInput,
    layer: int | None,
    keep: Tensor | None = None,
) -> EncoderOutput:
    """The encoder's output with ``tokens`` read after block ``layer`` (then the final norm);
    None is the encoder's own output. ``keep [B, C, P]`` encodes only those patches (MAE),
    as :meth:`Encoder.encode` does; a prepared input is not prepared again."""
    inp = batch if isinstance(batch, EncoderInput) else encoder.prepare(batch)
    if layer is None or layer == len(encoder.blocks) - 1:
        return encoder.encode(inp, keep=keep)
    # The encoder run with its first layer + 1 blocks: the same tokens a hook on that block
    # would see, but packed batches (mixed montages) come back unpacked to [B, N, D].
    blocks = encoder.blocks
    encoder.blocks = torch.nn.ModuleList(list(blocks)[: layer + 1])
    try:
        return encoder.encode(inp, keep=keep)
    finally:
        encoder.blocks = blocks


def random_twin(encoder: Encoder, seed: int) -> Encoder:
    """A random-init encoder of the same config and channel vocabulary, its weights from
    ``seed`` (the global RNG is left as it was): the control every probe compares with."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Encoder(encoder.config, channel_vocab=encoder.vocab.names)


def pooled_width(dim: int, pooling: str) -> int:
    """Features per window of :func:`pool_encoded` for an encoder of width ``dim``."""
    sites = len(REGION_SITES) + 1  # the 10-20 sites, then every channel
    return {"mean": dim, "regions": sites * dim, "moments": 2 * sites * dim}[pooling]


def batch_regions(ch_pos: Sequence[np.ndarray], n_channels: int) -> np.ndarray:
    """Each window's positions `[C_i, 3]` (NaN unknown) -> 10-20 site per channel `[B, C]`,
    padded channels -1 (they belong nowhere)."""
    regions = np.full((len(ch_pos), n_channels), -1)
    for j, pos in enumerate(ch_pos):
        regions[j, : len(pos)] = region_of(pos)
    return regions


def pool_encoded(enc: EncoderOutput, regions: np.ndarray, pooling: str) -> Tensor:
    """One batch's encoder output -> pooled features `[B, F]`, differentiable: the frozen
    probe reads them, the fine-tuning probe (pretrain/finetune_probe.py) trains through them."""
    if pooling == "mean":
        return Encoder.pool(enc).float()
    grid = enc.grid().float()  # [B, C, P, D]
    if pooling == "moments":  # + second moments over time: power, not only the average
        grid = torch.cat([grid, grid.pow(2)], dim=-1)  # [B, C, P, 2D]
    return region_pool_batch(grid, enc.valid.view(grid.shape[:3]), regions)


@torch.no_grad()
def pooled_features(
    encoder: Encoder,
    eeg: Sequence[np.ndarray],
    ch_names: Sequence[Sequence[str]],
    ch_pos: Sequence[np.ndarray],
    sfreq: float,
    pooling: str = "mean",
    layer: int | None = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Windows (each `[C, T]` uV at ``sfreq``, its names and positions `[C, 3]`, NaN unknown)
    -> features `[n, D]` (``mean``), `[n, 20 * D]` (``regions``) or `[n, 40 * D]`
    (``moments``)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    from shards.sample import collate_eeg, window_sample

    encoder.eval()
    device = next(encoder.parameters()).device
    out = []
    for start in range(0, len(eeg), batch_size):
        idx = range(start, min(start + batch_size, len(eeg)))
        samples = [window_sample(eeg[i], ch_names[i], ch_pos[i], sfreq, key=str(i)) for i in idx]
        batch = collate_eeg(samples)
        batch["eeg"] = batch["eeg"].to(device)
        enc = encode_at_layer(encoder, batch, layer)
        regions = batch_regions([ch_pos[i] for i in idx], enc.n_channels)
        out.append(pool_encoded(enc, regions, pooling).float().cpu().numpy())
    return np.concatenate(out)


# ---- loading, shared by every clone of the transformer ------------------------------------


@functools.cache
def _model_folder(model: str, tracking_uri: str | None) -> Path:
    """A local folder for a path or a registry URI, downloaded once per process."""
    from pretrain.tracking import resolve_model

    return resolve_model(model, tracking_uri)  # MLflow picks a temp dir


@functools.lru_cache(maxsize=4)
def load_encoder(
    model: str, tracking_uri: str | None, device: str, random_init: bool, seed: int
) -> Encoder:
    """The frozen encoder (or its random-init twin: same config and vocabulary, weights from
    ``seed``). Cached: MOABB clones the pipeline for every fold, and the encoder never changes."""
    encoder = Encoder.from_pretrained(_model_folder(str(model), tracking_uri))
    if random_init:
        encoder = random_twin(encoder, seed)
    return encoder.to(device).eval().requires_grad_(False)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class EncoderFeatures(TransformerMixin, BaseEstimator):
    """Epochs `X [n, C, T]` (or an ``mne.Epochs``) -> frozen-encoder features `[n, F]`.

    ``model`` is an encoder folder or a ``models:/name@alias`` URI. ``ch_names`` and
    ``sfreq`` describe X's channels and rate (taken from the epochs' info when X is an
    ``mne.Epochs``); ``unit`` is X's unit ("V", "mV", "uV", or "auto": judged from the
    amplitude when fitting). ``random_init`` uses the encoder's random-init twin seeded by
    ``seed``: the baseline that says what pretraining added.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        pooling: str = "regions",
        layer: int | None = None,
        batch_size: int = 32,
        unit: str = "auto",
        ch_names: Sequence[str] | None = None,
        sfreq: float | None = None,
        random_init: bool = False,
        seed: int = 0,
        device: str = "auto",
        tracking_uri: str | None = None,
    ):
        self.model = model
        self.pooling = pooling
        self.layer = layer
        self.batch_size = batch_size
        self.unit = unit
        self.ch_names = ch_names
        self.sfreq = sfreq
        self.random_init = random_init
        self.seed = seed
        self.device = device
        self.tracking_uri = tracking_uri

    def _check_params(self) -> None:
        if self.model is None:
            raise ValueError("EncoderFeatures needs model= (an encoder folder or models:/ URI)")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.unit != "auto" and self.unit not in UNITS:
            raise ValueError(f"unit must be 'auto' or one of {list(UNITS)}, got {self.unit!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def _array_and_info(self, X: Any) -> tuple[np.ndarray, list[str], float]:
        """`[n, C, T]` values with their channel names and rate, from an array or Epochs."""
        import mne

        if isinstance(X, mne.BaseEpochs):
            names, sfreq = list(X.ch_names), float(X.info["sfreq"])
            X = X.get_data(copy=False)
        else:
            names = None if self.ch_names is None else list(self.ch_names)
            sfreq = None if self.sfreq is None else float(self.sfreq)
        X = np.asarray(X)
        if X.ndim != 3:
            raise ValueError(f"X must be epochs [n, C, T], got an array of shape {X.shape}")
        if names is None or sfreq is None:
            raise ValueError(
                "EncoderFeatures needs ch_names= and sfreq= for an array X (or pass mne.Epochs)"
            )
        if len(names) != X.shape[1]:
            raise ValueError(f"X has {X.shape[1]} channels but {len(names)} channel names")
        if sfreq <= 0:
            raise ValueError(f"sfreq must be positive, got {sfreq}")
        return X, names, sfreq

    def fit(self, X: Any, y: Any = None) -> EncoderFeatures:
        from shards.channels import canonicalize
        from shards.preprocess import detect_scale

        self._check_params()
        X, names, sfreq = self._array_and_info(X)
        self.encoder_ = load_encoder(
            str(self.model),
            self.tracking_uri,
            resolve_device(self.device),
            bool(self.random_init),
            int(self.seed),
        )
        self.layer_ = resolve_layer(self.layer, len(self.encoder_.blocks))
        channels = canonicalize(names)
        self.ch_names_, self.ch_pos_, self.sfreq_ = channels.names, channels.positions, sfreq
        self.unit_ = detect_scale(X)[0] if self.unit == "auto" else self.unit
        self.n_features_in_ = X.shape[1]
        return self

    def transform(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "encoder_")
        X, names, sfreq = self._array_and_info(X)
        if len(names) != len(self.ch_names_) or sfreq != self.sfreq_:
            raise ValueError(
                f"X has {len(names)} channels at {sfreq} Hz; fitted on "
                f"{len(self.ch_names_)} at {self.sfreq_} Hz"
            )
        uv = (X * UNITS[self.unit_]).astype(np.float32)  # [n, C, T] uV
        last = self.layer_ == len(self.encoder_.blocks) - 1
        return pooled_features(
            self.encoder_,
            list(uv),
            [self.ch_names_] * len(uv),
            [self.ch_pos_] * len(uv),
            self.sfreq_,
            pooling=self.pooling,
            layer=None if last else self.layer_,
            batch_size=int(self.batch_size),
        )
