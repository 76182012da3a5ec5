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

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from pretrain.aux_objectives import (
    band_target_loss,
    own_spectrum_loss,
    subject_bucket,
    subject_head,
    subject_loss,
)
from pretrain.contrast import SplitContrast
from pretrain.encoder import Encoder, EncoderInput
from pretrain.latent import LatentTarget
from pretrain.masking import make_mask
from pretrain.mixing import SpatialMix, SplinePath, TimeMix
from pretrain.moe import load_imbalance
from pretrain.msm_config import MSMConfig
from pretrain.msm_decoder import Decoder
from pretrain.spectral import EEG_BANDS_HZ, log_spectrum


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
            attention=config.decoder_attention,
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
            self.subject_head = subject_head(enc.dim, config.subject_buckets)
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
            out["mse_own_spectrum"] = own_spectrum_loss(
                self.own_spectrum_head, self.config.own_spectrum_bands, enc, visible
            )
            mse = mse + self.config.own_spectrum_weight * out["mse_own_spectrum"]
        if self.band_head is not None:
            out["mse_bands"] = band_target_loss(
                self.band_head, self.config.encoder.patch_seconds, enc, inp.valid, visible
            )
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
            cfg = self.config
            adversary = subject_loss(
                self.subject_head, cfg.subject_adversary, cfg.subject_buckets, enc, batch["meta"]
            )
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

    def num_parameters(self) -> dict[str, int]:
        """Encoder counts (what is kept after pretraining) plus the decoder side."""
        enc = self.encoder.num_parameters()
        enc_ids = {id(p) for p in self.encoder.parameters()}
        extra = sum(p.numel() for p in self.parameters() if id(p) not in enc_ids)
        return {**enc, "decoder": extra}
