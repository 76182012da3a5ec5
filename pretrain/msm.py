"""Masked signal modelling: hide patches, reconstruct their samples from the rest.

Shape legend: B batch, C channels, P patches per channel, L samples per patch, N = C*P
tokens, D encoder width, d decoder width.

Why it looks like this (the design `configs/pretrain/*.yaml` use; the dataclass defaults
keep the earlier one, for the ablation rows in bench/RESULTS.md):

- **MAE: the encoder sees only visible patches** (``encoder_input="visible"``); hidden
  ones are re-inserted at the decoder as a mask token plus their channel and time
  embeddings. The encoder computes on ~40% of the tokens, and MoE routing and its
  statistics describe what it actually sees. ``"all"`` (BERT-style mask tokens at the
  encoder input) stays for comparison.
- **Two masking modes.** ``random`` hides valid patches independently; neighbouring
  channels are strongly correlated in EEG (0.92 on EEGMMIDB), so this alone can be solved by
  spatial interpolation. ``time_block`` hides every channel over a time span, forcing
  temporal prediction. ``mixed`` picks one of the two per sample.
- **A decoder that reads raw samples** (``mix_heads``, ``time_mix``, ``spline_path``:
  pretrain/mixing.py). Squeezing every hidden waveform through the token width predicts
  nearly flat lines (R^2 0.04); mixing the *visible raw patches* of nearby channels, and of
  the same channel's neighbouring patches, with weights computed from the tokens is what
  takes reconstruction past spherical splines. The cost, measured in bench/RESULTS.md
  ("MOABB", "Demo"): the encoder need not carry the waveform, and its frozen features are
  no better for motor imagery than a random-init twin's.
- **Loss on masked, valid patches only**, in the encoder's input units (each window divided
  by one robust std of its visible samples), with each patch's mean removed from target and
  prediction (``center_patches``: the 0.5 Hz high-pass leaves offsets no context predicts).
- **What is reconstructed** (``target``): the samples (``signal``), the log amplitude
  spectrum of each patch (``spectrum``), or both. Ongoing rhythms have random phase, so a
  hidden patch's samples are only partly predictable; its power per frequency is more so
  (LaBraM reconstructs Fourier amplitudes for that reason). On EEGMMIDB the spectral target
  did not make the frozen features better for motor imagery either (bench/RESULTS.md).
- Masks come from an optional ``torch.Generator``: the same seed gives the same masks.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.contrast import SplitContrast
from pretrain.encoder import Block, Encoder, EncoderInput, distance_bias, spatial_slopes
from pretrain.encoder_config import EncoderConfig, get_config, strict_from_dict
from pretrain.latent import LatentTarget
from pretrain.mixing import SpatialMix, SplinePath, TimeMix
from pretrain.moe import SwiGLU, load_imbalance
from pretrain.packing import gathered_bias, make_packing
from pretrain.spectral import EEG_BANDS_HZ, channel_band_power, log_spectrum

MASK_MODES = ("random", "time_block", "mixed")
TARGETS = ("signal", "spectrum", "both")
ENCODER_INPUTS = ("all", "visible")


@dataclass
class MSMConfig:
    """Masked-signal-modelling model: an encoder plus masking and decoder settings."""

    encoder: EncoderConfig = field(default_factory=lambda: get_config("small"))
    mask_ratio: float = 0.6  # fraction of valid patches (random) or time blocks hidden
    mask_mode: str = "random"  # "random" | "time_block" | "mixed"
    block_patches: int = 1  # time_block: length of one hidden span, in patches
    decoder_dim: int = 0  # 0: min(256, max(32, D // 2))
    decoder_depth: int = 2
    decoder_heads: int = 4
    norm_target: bool = False  # per-patch (mean 0, std 1) signal targets
    target: str = "signal"  # "signal" | "spectrum" | "both" (see the module docstring)
    spectrum_weight: float = 1.0  # weight of the spectrum MSE when target == "both"
    # 0: every rFFT bin; n: log power in n log-spaced bands (less noisy per value)
    spectrum_bands: int = 0
    # weight of the same loss on the visible patches (0: masked patches only, as in MAE)
    visible_weight: float = 0.0
    # remove each patch's mean log amplitude from the spectral target: its *shape*. The
    # pre-norm blocks see every token scale-normalised, so a raw-patch encoder can compute
    # where power sits across frequencies but hardly its absolute level -- and it is the
    # shape (a beta peak at C3, an alpha bump) that carries most labels
    spectrum_norm: bool = False
    # "all": hidden patches enter the encoder as a mask token (BERT); "visible": they are
    # dropped before it and re-inserted at the decoder (MAE): the encoder computes on ~40%
    # of the tokens, and routing statistics describe real patches only
    encoder_input: str = "all"
    # remove each patch's mean from target and prediction: the 0.5 Hz high-pass leaves
    # per-second offsets that nothing can predict and that would dominate the loss
    center_patches: bool = False
    mix_heads: int = 0  # > 0: SpatialMix heads (pretrain/mixing.py) in the decoder
    time_mix: bool = False  # TimeMix (previous/next visible patch of the same channel)
    # SplinePath: MNE's spherical-spline estimate of each patch from the visible channels of
    # its time patch, gated by the decoder, which learns the correction on top
    spline_path: bool = False
    # fraction of time blocks hidden in time_block/mixed masking (None: mask_ratio); a lower
    # value leaves visible patches on both sides of a gap, as at evaluation
    block_ratio: float | None = None
    # time_block/mixed: a time-block sample also hides this fraction of its other patches at
    # random (0: the block only). The encoder's cost follows the patches it sees, and a block
    # sample otherwise shows it (1 - block_ratio) of them: 75% at the recipe's 0.25
    block_random_ratio: float = 0.0
    # > 0 with a raw path: a linear head on the decoder's hidden states also reconstructs the
    # hidden samples *without* the raw paths, at this weight. The raw paths interpolate so well
    # that the encoder need not carry the waveform (their features probe below random-init on
    # MOABB); this loss makes it carry it, while the prediction scored stays the mixed one
    token_weight: float = 0.0
    # with ``token_weight``: the raw paths' prediction (and the decoder head added to it) reads
    # the decoder's hidden states through a stop-gradient, so only the token-only loss trains
    # the encoder and the decoder blocks. The scored prediction still mixes visible raw patches,
    # but the encoder can no longer lean on them at all (without raw paths, ``noraw``, the
    # features probed above their random twins across subjects). Measured on EEGMMIDB it does
    # not bring that back: MOABB inside the recipe's seed spread (bench/RESULTS.md, "MOABB")
    mix_detached: bool = False
    # > 0: a *linear* head on the encoder's output tokens predicts each visible patch's own
    # log band amplitude (``own_spectrum_bands`` log-spaced bands), at this weight. The classes
    # of motor imagery (and of the simulator) live in band power, which a random-init encoder's
    # tokens hardly carry (ridge R^2 < 0 on the demo); the raw decoder paths never ask for it.
    # Linear, so what a frozen-feature probe reads (pooled tokens) holds it linearly too
    own_spectrum_weight: float = 0.0
    own_spectrum_bands: int = 16
    # > 0: a *linear* head on each channel's mean encoded token predicts that channel's log
    # amplitude in the classic EEG bands (1-4 ... 30-45 Hz) over the whole window -- hidden
    # patches included -- at this weight. Motor-imagery labels (and the simulator's) live in
    # where band power sits on the scalp across a trial; sample reconstruction never asks the
    # tokens for it, so pretraining let it decay (bench/RESULTS.md, "Demo"). Linear and per
    # channel, so a frozen-feature probe that pools channels (``--pooling regions``) reads it
    # linearly too
    band_target_weight: float = 0.0
    # > 0: a subject classifier reads each window's mean encoder token through a gradient
    # reversal layer scaled by this (DANN): the classifier learns to tell recordings' subjects
    # apart, the encoder to make that impossible. Frozen features that decode within a subject
    # do not transfer across subjects (bench/RESULTS.md, "MOABB"); this asks pretraining for
    # features without the subject. Subjects come from each sample's provenance, hashed into
    # ``subject_buckets`` classes
    subject_adversary: float = 0.0
    subject_buckets: int = 256
    # > 0: the split-window contrast (pretrain/contrast.py) at this weight: each window's two
    # time halves, encoded apart from a random ``contrast_keep`` of their patches, must find
    # each other among the batch's windows (InfoNCE at ``contrast_temperature`` on a
    # ``contrast_dim``-wide projection of the mean token). It asks the tokens for what lasts
    # across a trial -- where reconstruction asks for what interpolates
    contrast_weight: float = 0.0
    contrast_temperature: float = 0.1
    contrast_dim: int = 64
    contrast_keep: float = 0.5
    # "batch": every other window of the batch is a negative; "subject": only windows of the
    # same subject (provenance), so subject traits cannot solve the task
    contrast_negatives: str = "batch"
    # > 0: masked latent prediction (pretrain/latent.py) at this weight: a linear head on the
    # decoder's hidden state predicts, at each hidden patch, the encoder's own layer-normed
    # token there when it sees the whole window (stop-gradient) -- data2vec's target beside
    # the samples
    latent_weight: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.encoder, str):
            self.encoder = get_config(self.encoder)
        elif isinstance(self.encoder, Mapping):
            self.encoder = EncoderConfig.from_dict(self.encoder)
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {self.mask_ratio}")
        if self.mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {self.mask_mode!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.spectrum_weight < 0:
            raise ValueError(f"spectrum_weight must be >= 0, got {self.spectrum_weight}")
        if self.block_patches < 1:
            raise ValueError("block_patches must be >= 1")
        if self.decoder_dim_resolved % self.decoder_heads:
            raise ValueError("decoder width must be divisible by decoder_heads")
        if self.encoder_input not in ENCODER_INPUTS:
            raise ValueError(
                f"encoder_input must be one of {ENCODER_INPUTS}, got {self.encoder_input!r}"
            )
        if self.block_ratio is not None and not 0.0 < self.block_ratio < 1.0:
            raise ValueError(f"block_ratio must be in (0, 1), got {self.block_ratio}")
        if not 0.0 <= self.block_random_ratio < 1.0:
            raise ValueError(f"block_random_ratio must be in [0, 1), got {self.block_random_ratio}")
        if self.mix_heads < 0:
            raise ValueError(f"mix_heads must be >= 0, got {self.mix_heads}")
        if self.token_weight < 0:
            raise ValueError(f"token_weight must be >= 0, got {self.token_weight}")
        if self.mix_detached and not (
            self.token_weight and (self.mix_heads or self.time_mix or self.spline_path)
        ):
            raise ValueError(
                "mix_detached trains the encoder through the token-only head alone: it needs "
                "token_weight > 0 and a raw path (mix_heads, time_mix or spline_path)"
            )
        if self.own_spectrum_weight < 0:
            raise ValueError(f"own_spectrum_weight must be >= 0, got {self.own_spectrum_weight}")
        if self.own_spectrum_bands < 1:
            raise ValueError(f"own_spectrum_bands must be >= 1, got {self.own_spectrum_bands}")
        if self.band_target_weight < 0:
            raise ValueError(f"band_target_weight must be >= 0, got {self.band_target_weight}")
        if self.subject_adversary < 0:
            raise ValueError(f"subject_adversary must be >= 0, got {self.subject_adversary}")
        if self.subject_buckets < 2:
            raise ValueError(f"subject_buckets must be >= 2, got {self.subject_buckets}")
        if self.contrast_weight < 0:
            raise ValueError(f"contrast_weight must be >= 0, got {self.contrast_weight}")
        if self.contrast_temperature <= 0:
            raise ValueError(f"contrast_temperature must be > 0, got {self.contrast_temperature}")
        if self.contrast_dim < 1:
            raise ValueError(f"contrast_dim must be >= 1, got {self.contrast_dim}")
        if self.contrast_negatives not in ("batch", "subject"):
            raise ValueError(
                f"contrast_negatives must be 'batch' or 'subject', got {self.contrast_negatives!r}"
            )
        if self.latent_weight < 0:
            raise ValueError(f"latent_weight must be >= 0, got {self.latent_weight}")
        if not 0.0 < self.contrast_keep <= 1.0:
            raise ValueError(f"contrast_keep must be in (0, 1], got {self.contrast_keep}")
        if (self.mix_heads or self.time_mix or self.spline_path) and self.target == "spectrum":
            raise ValueError(
                "mix_heads/time_mix/spline_path predict samples: they need target signal or both"
            )

    @property
    def n_freqs(self) -> int:
        """F: spectral values per patch (rFFT bins, or bands)."""
        return self.spectrum_bands or self.encoder.patch_len // 2 + 1

    @property
    def out_dim(self) -> int:
        """Values the decoder predicts per patch: L samples and/or F log amplitudes."""
        signal = self.encoder.patch_len if self.target != "spectrum" else 0
        return signal + (self.n_freqs if self.target != "signal" else 0)

    @property
    def decoder_dim_resolved(self) -> int:
        if self.decoder_dim:
            return self.decoder_dim
        return min(256, max(32, self.encoder.dim // 2))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MSMConfig:
        """``encoder`` may be a dict of fields or a registry name; unknown keys are errors."""
        return strict_from_dict(cls, data)


# ---- masking -----------------------------------------------------------------------------


def _n_to_mask(n: Tensor, ratio: float) -> Tensor:
    """How many of `n [B]` items to hide: round(ratio * n), at least 1 and at most n - 1
    (something to predict, something to predict from); 0 when n < 2."""
    k = torch.round(n.float() * ratio).long()
    k = torch.minimum(torch.clamp(k, min=1), n - 1)
    return torch.where(n >= 2, k, torch.zeros_like(k))


def _rand(shape: Sequence[int], generator: torch.Generator | None, device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(tuple(shape), generator=generator, device=gen_device).to(device)


def _choose(ok: Tensor, ratio: float, generator: torch.Generator | None) -> Tensor:
    """Hide a random ``ratio`` of the True entries of each row of `ok [B, M]` -> `[B, M]`."""
    noise = _rand(ok.shape, generator, ok.device).masked_fill(~ok, 2.0)  # invalid sort last
    rank = noise.argsort(1).argsort(1)  # rank of each entry within its row
    return (rank < _n_to_mask(ok.sum(1), ratio)[:, None]) & ok


def random_mask(valid: Tensor, ratio: float, generator: torch.Generator | None = None) -> Tensor:
    """Hide ``ratio`` of each sample's valid patches, uniformly: `valid [B, C, P]` -> same."""
    b = valid.shape[0]
    return _choose(valid.reshape(b, -1), ratio, generator).view(valid.shape)


def time_block_mask(
    valid: Tensor, ratio: float, block: int = 1, generator: torch.Generator | None = None
) -> Tensor:
    """Hide all channels over ``ratio`` of the time blocks (``block`` patches each, with a
    random phase per sample): `valid [B, C, P]` -> same."""
    b, _, p = valid.shape
    dev = valid.device
    time_ok = valid.any(1)  # [B, P]
    offset = (_rand((b,), generator, dev) * block).long().clamp_max(block - 1)  # [B]
    block_id = (torch.arange(p, device=dev)[None] + offset[:, None]) // block  # [B, P]
    n_blocks = (p + block - 1) // block + 1
    block_ok = torch.zeros(b, n_blocks, dtype=torch.long, device=dev)
    block_ok = block_ok.scatter_add(1, block_id, time_ok.long()) > 0  # [B, n_blocks]
    hidden = _choose(block_ok, ratio, generator).gather(1, block_id)  # [B, P]
    return hidden[:, None, :] & valid


def make_mask(
    valid: Tensor,
    ratio: float,
    mode: str = "random",
    block: int = 1,
    generator: torch.Generator | None = None,
    block_ratio: float | None = None,
    block_random_ratio: float = 0.0,
) -> Tensor:
    """`valid [B, C, P]` -> mask `[B, C, P]` (True = hidden; always a subset of valid).
    ``block_ratio`` (default ``ratio``) is the fraction of time blocks hidden; a time-block
    sample also hides ``block_random_ratio`` of its other valid patches at random."""
    block_ratio = ratio if block_ratio is None else block_ratio

    def blocks() -> Tensor:
        blk = time_block_mask(valid, block_ratio, block, generator)
        if block_random_ratio > 0:
            blk = blk | random_mask(valid & ~blk, block_random_ratio, generator)
        return blk

    if mode == "random":
        return random_mask(valid, ratio, generator)
    if mode == "time_block":
        return blocks()
    if mode == "mixed":
        rnd = random_mask(valid, ratio, generator)
        blk = blocks()
        coin = _rand((valid.shape[0],), generator, valid.device) < 0.5
        return torch.where(coin[:, None, None], rnd, blk)
    raise ValueError(f"mask mode must be one of {MASK_MODES}, got {mode!r}")


# ---- model -------------------------------------------------------------------------------


class GradReverse(torch.autograd.Function):
    """Identity forward; the gradient times -scale backward (Ganin & Lempitsky's DANN)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return -ctx.scale * grad, None


def subject_bucket(meta: Mapping[str, Any], buckets: int) -> int:
    """A sample's subject (dataset + subject of its provenance) as a stable class index."""
    prov = (meta or {}).get("provenance") or {}
    name = f"{prov.get('dataset')}/{prov.get('subject')}"
    return zlib.crc32(name.encode()) % buckets


class Decoder(nn.Module):
    """Encoder tokens `[B, N, D]` -> predictions of every patch `[B, N, out_dim]` (dense,
    narrow)."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        heads: int,
        patch_len: int,
        spatial: bool = False,
        learn_slopes: bool = True,
        packing: bool = False,
    ):
        super().__init__()
        self.packing = packing  # as the encoder's: run valid tokens only (pretrain/packing.py)
        out_std = 0.02 / math.sqrt(2 * max(depth, 1))
        self.spatial_slope = spatial_slopes(heads, spatial, learn_slopes, self)  # as the encoder's
        self.proj = nn.Linear(in_dim, dim)
        self.blocks = nn.ModuleList(
            Block(dim, heads, SwiGLU(dim, 2 * dim, out_std), True, 0.0, out_std)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_len)
        for lin in (self.proj, self.head):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)

    def forward(
        self,
        tokens: Tensor,
        valid: Tensor,
        pos: Tensor | None = None,
        known: Tensor | None = None,
        return_hidden: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """`tokens [B, N, in_dim]` in channel-major order (N = C x P), `valid [B, N]`
        (channel positions `pos [B, C, 3]`, `known [B, C]` for the spatial bias) ->
        `[B, N, out]` (and the hidden states `[B, N, d]`)."""
        x = self.proj(tokens)
        packing, block_valid = None, valid
        if self.packing and not x.is_meta and not bool(valid.all()):
            # a mixed-montage batch is padded to its widest montage (up to half the decoder's
            # tokens): run the valid tokens only, as the encoder does
            bias = None
            if self.spatial_slope is not None and pos is not None:
                p = valid.shape[1] // pos.shape[1]
                tok_pos = pos.repeat_interleave(p, 1)  # [B, N, 3] channel-major, as the tokens
                tok_known = known.repeat_interleave(p, 1)  # [B, N]
                slope = functools.partial(distance_bias, self.spatial_slope)
                bias = gathered_bias(slope, tok_pos, tok_known, x.dtype)
            packing = make_packing(valid, bias)
            x, attn_mask, block_valid = packing.pack(x), packing, None  # x [Nt, d]
        else:
            keys = valid | ~valid.any(1, keepdim=True)
            attn_mask = keys[:, None, None, :]  # [B, 1, 1, N]
            if self.spatial_slope is not None and pos is not None:
                b, n = valid.shape
                c = pos.shape[1]
                # per channel pair, then repeated over the P x P patch pairs: the distance of
                # every token pair from a C x C table (a 128-channel window's N x N cdist and its
                # scaling were two thirds of the decoder's forward)
                bias = distance_bias(self.spatial_slope, pos, known)  # [B, h, C, C]
                h, p = bias.shape[1], n // c
                bias = bias[:, :, :, None, :, None].expand(b, h, c, p, c, p).reshape(b, h, n, n)
                if torch.compiler.is_compiling() or not bool(keys.all()):  # no host sync compiled
                    bias = bias.masked_fill(~attn_mask, float("-inf"))
                attn_mask = bias.to(x.dtype)
        for block in self.blocks:
            x = block(x, attn_mask, block_valid)[0]
        hidden = self.norm(x)
        if packing is not None:
            hidden = packing.unpack(hidden)  # [B, N, d], zeros where padding (never scored)
        out = self.head(hidden)
        return (out, hidden) if return_hidden else out


def standardise_bands(target: Tensor, scored: Tensor) -> Tensor:
    """`[B, C, F]` -> each band centred and scaled by its mean and std over the `scored
    [B, C]` channels. Band log amplitudes vary little around each band's mean (variance ~0.02
    on the simulator): unscaled, a head that predicts the mean alone already has a small loss,
    and the encoder is never asked for the differences between channels and windows."""
    w = scored[..., None].float()
    n = w.sum((0, 1)).clamp_min(1.0)  # [1] -> broadcast over F
    mean = (target * w).sum((0, 1)) / n  # [F]
    var = ((target - mean).pow(2) * w).sum((0, 1)) / n
    return (target - mean) / (var + 1e-6).sqrt()


class MaskedSignalModel(nn.Module):
    """Encoder + mask token + decoder; ``forward(batch)`` returns the loss dict the trainer
    backpropagates (``out["loss"].backward()``)."""

    def __init__(self, config: MSMConfig, channel_vocab: Sequence[str] | None = None):
        super().__init__()
        self.config = config
        enc = config.encoder
        self.encoder = Encoder(enc, channel_vocab)
        self.mask_token = nn.Parameter(torch.empty(enc.dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.decoder = Decoder(
            enc.dim,
            config.decoder_dim_resolved,
            config.decoder_depth,
            config.decoder_heads,
            config.out_dim,
            spatial=enc.spatial_bias,
            learn_slopes=enc.learn_spatial_slopes,
            packing=enc.packing,
        )
        d = config.decoder_dim_resolved
        self.spatial_mix = SpatialMix(d, config.mix_heads) if config.mix_heads else None
        self.time_mix = TimeMix(d, enc.patch_len) if config.time_mix else None
        self.spline_path = SplinePath(d) if config.spline_path else None
        if self.spline_path is not None and self.spatial_mix is not None:
            nn.init.zeros_(self.spatial_mix.gate.bias)  # start from the spline alone
        raw_paths = config.mix_heads or config.time_mix or config.spline_path
        self.token_head = nn.Linear(d, enc.patch_len) if raw_paths and config.token_weight else None
        self.subject_head = None
        if config.subject_adversary:
            self.subject_head = nn.Sequential(
                nn.Linear(enc.dim, enc.dim),
                nn.GELU(),
                nn.Linear(enc.dim, config.subject_buckets),
            )
        self.own_spectrum_head = (
            nn.Linear(enc.dim, config.own_spectrum_bands) if config.own_spectrum_weight else None
        )
        self.band_head = (
            nn.Linear(enc.dim, len(EEG_BANDS_HZ)) if config.band_target_weight else None
        )
        self.contrast = None
        if config.contrast_weight:
            self.contrast = SplitContrast(
                enc.dim, config.contrast_dim, config.contrast_temperature, config.contrast_keep
            )
        self.latent = LatentTarget(d, enc.dim) if config.latent_weight else None

    def make_mask(self, valid: Tensor, generator: torch.Generator | None = None) -> Tensor:
        cfg = self.config
        return make_mask(
            valid,
            cfg.mask_ratio,
            cfg.mask_mode,
            cfg.block_patches,
            generator,
            block_ratio=cfg.block_ratio,
            block_random_ratio=cfg.block_random_ratio,
        )

    def target(self, patches: Tensor) -> Tensor:
        """Patch samples to reconstruct `[B, C, P, L]` float32, from the patches the encoder
        read (in its units: after ``input_scale_uv`` and any window normalisation)."""
        target = patches.float()
        if self.config.center_patches or self.config.norm_target:
            target = target - target.mean(-1, keepdim=True)
        if self.config.norm_target:
            var = target.var(-1, keepdim=True, unbiased=False)
            target = target / torch.sqrt(var + 1e-6)
        return target

    @staticmethod
    def unclipped(inp: EncoderInput, enc) -> Tensor:
        """The patches in the encoder's units but not clipped `[B, C, P, L]`: what the
        decoder's raw paths mix and what the loss compares with. Interpolation is linear, so
        a blink at 15 robust stds must reach it whole (the encoder's input is clipped for
        stability; the targets are not, or the loss would forgive exactly the big errors)."""
        return inp.patches.float() / enc.scale[:, None, None, None]

    def decode(self, inp: EncoderInput, mask: Tensor):
        """Encode what is visible, decode every patch -> (encoder output, predictions
        `[B, C, P, out_dim]` float32, sample predictions of the mixing paths or None, sample
        predictions of ``token_head`` `[B, C, P, L]` or None, the decoder's hidden state
        `[B, N, d]`)."""
        b, c, p, _ = inp.patches.shape
        n = c * p
        visible = inp.valid & ~mask
        if self.config.encoder_input == "visible":
            enc = self.encoder.encode(inp, keep=visible)
            d = enc.tokens.shape[-1]
            full = self.mask_token.to(enc.tokens.dtype).expand(b, n, d).clone()
            src = torch.where(
                enc.valid[..., None],
                enc.tokens,
                full.gather(1, enc.index[..., None].expand(-1, -1, d)),
            )
            full = full.scatter(1, enc.index[..., None].expand(-1, -1, d), src)
            full = full + self.encoder.position_embeddings(inp).reshape(b, n, d)
            tokens, valid = full, inp.valid.reshape(b, n)
        else:
            enc = self.encoder.encode(inp, token_mask=mask, mask_token=self.mask_token)
            tokens, valid = enc.tokens, enc.valid
        out, hidden = self.decoder(tokens, valid, inp.ch_pos, inp.pos_known, return_hidden=True)
        decoded = hidden  # [B, N, d]
        mixed = tokens_only = None
        if self.token_head is not None:
            tokens_only = self.token_head(hidden).view(b, c, p, -1).float()
        if self.config.mix_detached:  # the sample prediction scored: no gradient upstream
            hidden = hidden.detach()
            length = inp.patches.shape[-1]
            out = torch.cat([self.decoder.head(hidden)[..., :length], out[..., length:]], -1)
        out = out.view(b, c, p, -1).float()
        if any(m is not None for m in (self.spatial_mix, self.time_mix, self.spline_path)):
            h = hidden.view(b, c, p, -1)
            unclipped = self.unclipped(inp, enc)
            raw = self.target(unclipped) if self.config.center_patches else unclipped
            args = (h, raw, visible, inp.ch_pos, inp.pos_known)
            # a mixed-montage batch is padded to its widest montage, and the raw paths cost C
            # (mixing) to C^3 (the spline's solve) per patch: with packing on, samples run in
            # groups of equal width (channels up to their last one with a valid patch or a
            # position: padding has neither), as attention does
            used = inp.valid.any(-1) | inp.pos_known  # [B, C]
            width = torch.where(used.any(1), c - used.flip(1).int().argmax(1), 0)  # [B]
            grouped = (
                self.encoder.config.packing
                and not torch.compiler.is_compiling()
                and not bool((width == c).all())
            )
            if not grouped:
                mixed = self.raw_paths(*args)
            else:
                mixed = raw.new_zeros(raw.shape, dtype=torch.float32)
                for w in torch.unique(width).tolist():
                    rows = (width == w).nonzero().squeeze(1)
                    if w:
                        mixed[rows, :w] = self.raw_paths(*(t[rows, :w] for t in args))
        return enc, out, mixed, tokens_only, decoded

    def raw_paths(
        self, h: Tensor, raw: Tensor, visible: Tensor, pos: Tensor, known: Tensor
    ) -> Tensor:
        """The decoder's raw-sample paths (pretrain/mixing.py), summed: `h [B, C, P, d]`,
        `raw [B, C, P, L]`, `visible [B, C, P]`, `pos [B, C, 3]`, `known [B, C]` ->
        `[B, C, P, L]` float32."""
        mixed = torch.zeros_like(raw, dtype=torch.float32)
        if self.spatial_mix is not None:
            mixed = mixed + self.spatial_mix(h, raw, visible, pos, known)
        if self.time_mix is not None:
            mixed = mixed + self.time_mix(h, raw, visible)
        if self.spline_path is not None:
            mixed = mixed + self.spline_path(h, raw, visible, pos, known)
        return mixed

    def forward(
        self,
        batch: Mapping[str, Any] | Tensor,
        generator: torch.Generator | None = None,
        mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """-> ``loss`` (= ``mse`` + ``aux_loss``: what to backpropagate), ``mse`` (masked,
        valid patches; ``mse_signal`` + weights x ``mse_spectrum``/``mse_tokens``/``contrast`` as
        configured), ``aux_loss``,
        ``pred``/``target`` `[B, C, P, L]` (``pred_spectrum``/``target_spectrum``
        `[B, C, P, F]` with a spectral target), ``mask``/``valid``
        `[B, C, P]`, ``n_masked``, ``scale`` `[B]` (pred x scale x input_scale_uv = uV),
        and for MoE encoders ``expert_counts`` `[L_moe, E]` and ``expert_imbalance``
        `[L_moe]` (max/mean load) of this forward.

        ``mask`` (True = hide) overrides the sampled mask; it is intersected with validity.
        """
        inp = self.encoder.prepare(batch)
        length = inp.patches.shape[-1]
        if mask is None:
            mask = self.make_mask(inp.valid, generator)
        else:
            mask = mask.to(inp.valid.device, torch.bool) & inp.valid
        enc, out_all, mixed, tokens_only, decoded = self.decode(inp, mask)
        n_masked = mask.sum()

        visible = inp.valid & ~mask
        vw = self.config.visible_weight

        def masked_mse(pred: Tensor, target: Tensor) -> Tensor:
            per_patch = (pred - target).pow(2).mean(-1)  # [B, C, P]
            loss = (per_patch * mask).sum() / n_masked.clamp_min(1)
            if vw > 0:
                loss = loss + vw * (per_patch * visible).sum() / visible.sum().clamp_min(1)
            return loss

        out: dict[str, Tensor] = {}
        mse = out_all.new_zeros(())
        split = length if self.config.target != "spectrum" else 0
        if self.config.target != "spectrum":
            pred = out_all[..., :split]
            if mixed is not None:
                pred = pred + mixed
            if self.config.center_patches:
                pred = pred - pred.mean(-1, keepdim=True)
            out["pred"], out["target"] = pred, self.target(self.unclipped(inp, enc))
            out["mse_signal"] = masked_mse(out["pred"], out["target"])
            mse = mse + out["mse_signal"]
            if tokens_only is not None:
                if self.config.center_patches:
                    tokens_only = tokens_only - tokens_only.mean(-1, keepdim=True)
                out["mse_tokens"] = masked_mse(tokens_only, out["target"])
                mse = mse + self.config.token_weight * out["mse_tokens"]
        if self.config.target != "signal":
            out["pred_spectrum"] = out_all[..., split:]  # [B, C, P, F]
            target = log_spectrum(enc.patches, self.config.spectrum_bands)  # [B, C, P, F]
            if self.config.spectrum_norm:
                target = target - target.mean(-1, keepdim=True)
            out["target_spectrum"] = target
            out["mse_spectrum"] = masked_mse(out["pred_spectrum"], out["target_spectrum"])
            weight = self.config.spectrum_weight if self.config.target == "both" else 1.0
            mse = mse + weight * out["mse_spectrum"]
            if "pred" not in out:  # plots and callers read pred/target
                out["pred"], out["target"] = out["pred_spectrum"], out["target_spectrum"]
        if self.own_spectrum_head is not None:
            out["mse_own_spectrum"] = self.own_spectrum_loss(enc, visible)
            mse = mse + self.config.own_spectrum_weight * out["mse_own_spectrum"]
        if self.band_head is not None:
            out["mse_bands"] = self.band_target_loss(enc, inp.valid, visible)
            mse = mse + self.config.band_target_weight * out["mse_bands"]
        if self.latent is not None:
            out["mse_latent"] = self.latent(self.encoder, inp, decoded, mask)
            mse = mse + self.config.latent_weight * out["mse_latent"]
        aux = enc.aux_loss
        if self.contrast is not None:
            groups = None
            if self.config.contrast_negatives == "subject":
                if not (isinstance(batch, Mapping) and "meta" in batch):
                    raise ValueError(
                        "msm.contrast_negatives=subject needs each sample's meta (provenance) "
                        "in the batch; pass reader batches or set contrast_negatives=batch"
                    )
                ids = [subject_bucket(m, 1 << 30) for m in batch["meta"]]
                groups = torch.tensor(ids, device=inp.patches.device)
            out["contrast"], out["contrast_top1"], contrast_aux = self.contrast(
                self.encoder, inp, generator, groups
            )
            mse = mse + self.config.contrast_weight * out["contrast"]
            aux = aux + contrast_aux
        adversary = None
        if self.subject_head is not None and isinstance(batch, Mapping) and "meta" in batch:
            adversary = self.subject_loss(enc, batch["meta"])
            out["subject_ce"] = adversary.detach()
        out.update(
            loss=mse + aux + (adversary if adversary is not None else 0.0),
            mse=mse,
            aux_loss=aux,
            mask=mask,
            valid=inp.valid,
            n_masked=n_masked,
            scale=enc.scale,
        )
        if enc.expert_counts.numel():
            out["expert_counts"] = enc.expert_counts
            out["expert_imbalance"] = load_imbalance(enc.expert_counts)
        return out

    def subject_loss(self, enc, meta: Sequence[Mapping[str, Any]]) -> Tensor:
        """Cross-entropy of the subject classifier on each window's mean encoded token, read
        through a gradient reversal: minimising it trains the classifier and pushes the
        encoder's tokens away from whatever tells subjects apart."""
        ids = [subject_bucket(m, self.config.subject_buckets) for m in meta]
        target = torch.tensor(ids, device=enc.tokens.device)
        pooled = Encoder.pool(enc.tokens, enc.valid)  # [B, D]
        # standardised over the batch: pooled tokens share a large common part (cosine ~0.998
        # between windows, finetune/heads/resampler.py); what tells subjects apart is the rest
        pooled = (pooled - pooled.mean(0)) / (pooled.float().std(0) + 1e-4).to(pooled.dtype)
        reversed_ = GradReverse.apply(pooled, self.config.subject_adversary)
        return F.cross_entropy(self.subject_head(reversed_).float(), target)

    def own_spectrum_loss(self, enc, visible: Tensor) -> Tensor:
        """MSE of the linear read-out of each encoded visible token against its own patch's log
        band amplitude (`[B, C, P, F]`), over the visible valid patches."""
        b = visible.shape[0]
        target = log_spectrum(enc.patches, self.config.own_spectrum_bands)  # [B, C, P, F]
        target = target.reshape(b, -1, target.shape[-1])  # [B, N, F]
        seen = visible.reshape(b, -1)  # [B, N]
        if enc.index is not None:  # only the kept tokens were encoded: [B, Nk, ...]
            target = target.gather(1, enc.index[..., None].expand(-1, -1, target.shape[-1]))
            seen = seen.gather(1, enc.index) & enc.valid
        pred = self.own_spectrum_head(enc.tokens).float()  # [B, N or Nk, F]
        per_token = (pred - target).pow(2).mean(-1)
        return (per_token * seen).sum() / seen.sum().clamp_min(1)

    def band_target_loss(self, enc, valid: Tensor, visible: Tensor) -> Tensor:
        """MSE of the linear read-out of each channel's mean encoded token against its
        window band power (all valid patches, standardised per band over the batch's scored
        channels: 1 - R^2, so a head that only learns each band's mean scores 1), over the
        channels with at least one encoded (visible) token."""
        b, c, p = valid.shape
        target = channel_band_power(enc.patches, valid, self.config.encoder.patch_seconds)
        tokens = enc.tokens.float()  # [B, N or Nk, D]
        d = tokens.shape[-1]
        if enc.index is not None:  # only the kept tokens were encoded: back onto the grid
            kept = tokens * enc.valid[..., None]
            tokens = tokens.new_zeros(b, c * p, d).scatter(
                1, enc.index[..., None].expand(-1, -1, d), kept
            )
        w = visible[..., None].float()  # [B, C, P, 1]
        per_channel = (tokens.view(b, c, p, d) * w).sum(2) / w.sum(2).clamp_min(1.0)  # [B, C, D]
        pred = self.band_head(per_channel.to(enc.tokens.dtype)).float()  # [B, C, 6]
        scored = visible.any(2)  # [B, C]
        target = standardise_bands(target, scored)
        err = (pred - target).pow(2).mean(-1)
        return (err * scored).sum() / scored.sum().clamp_min(1)

    def num_parameters(self) -> dict[str, int]:
        """Encoder counts (what is kept after pretraining) plus the decoder side."""
        enc = self.encoder.num_parameters()
        enc_ids = {id(p) for p in self.encoder.parameters()}
        extra = sum(p.numel() for p in self.parameters() if id(p) not in enc_ids)
        return {**enc, "decoder": extra}
