"""Montage-agnostic EEG encoder: per-channel patches as tokens, a transformer with MoE FFNs.

Shape legend: B batch, C channels, T samples, P patches per channel, L samples per patch,
N = C*P tokens, D width, E routed experts, K experts per token.

Why it looks like this:

- **A token is one channel's one patch** (``patch_seconds`` at the model's ``sfreq``), so any
  channel count is just a longer sequence: nothing is padded to a fixed montage, and a batch
  mixing 19- and 128-channel recordings is handled by key-padding masks.
- **Any input rate**: the input step resamples to the model rate (antialiased linear
  interpolation) so a 250 Hz file works without a preprocessing pass; the data plane
  already writes 200 Hz, where the step is a no-op.
- **A channel is known by its name and by its position.** The name embedding (vocabulary =
  sorted 10-05 names, id 0 = unknown) is exact for standard montages; the position
  embedding (Fourier features of xyz -> MLP, zero when the position is unknown) lets an
  unseen name on a known position land near its neighbours, so a new montage still works.
  The vocabulary is saved with the weights, so a newer MNE cannot renumber a checkpoint.
- **Time position** is a learned projection of sin/cos features of the patch index: no
  maximum length, unlike a learned table, so longer windows need no new parameters.
- **Padding never leaks**: invalid samples are zeroed before anything else, a patch is valid
  only if all its samples are, invalid tokens are masked as attention keys and skip the
  experts, so changing padded values cannot change valid outputs.
- Inputs are scaled by a fixed ``input_scale_uv``; ``input_norm="window"`` then divides each
  window by one robust std of what the encoder sees and gives log(scale) back as an
  embedding, so amplitude still reaches the model.
- The architecture is data (pretrain/encoder_config.py); the channel vocabulary, the blocks
  and the input/output types are their own modules (pretrain/channel_vocab.py,
  pretrain/encoder_blocks.py, pretrain/encoder_input.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pretrain.channel_vocab import ChannelVocab
from pretrain.encoder_blocks import (
    Block,
    PositionEmbedding,
    distance_bias,
    make_ffn,
    sinusoid,
    spatial_slopes,
)
from pretrain.encoder_config import CONFIGS, EncoderConfig, get_config, list_configs
from pretrain.encoder_files import EncoderFiles
from pretrain.encoder_input import EncoderInput, EncoderOutput, resample
from pretrain.moe import MoE
from pretrain.packing import gathered_bias, make_packing
from pretrain.spectral import EEG_BANDS_HZ, channel_band_power, log_spectrum


class Encoder(EncoderFiles, nn.Module):
    """The EEG encoder. ``forward(batch)`` takes the reader's dict (or a bare `[B, C, T]`
    tensor of uV at ``config.sfreq``) and returns an :class:`EncoderOutput`."""

    def __init__(self, config: EncoderConfig, channel_vocab: Sequence[str] | None = None):
        super().__init__()
        self.config = config
        self.vocab = ChannelVocab(channel_vocab) if channel_vocab else ChannelVocab.standard()
        d = config.dim
        out_std = 0.02 / math.sqrt(2 * config.depth)  # residual branches sum over 2*depth
        self.patch_embed = nn.Linear(config.patch_len, d)
        self.spectral_embed = (
            nn.Linear(config.spectral_bands, d) if config.spectral_bands > 0 else None
        )
        self.channel_band_embed = nn.Linear(len(EEG_BANDS_HZ), d) if config.channel_bands else None
        self.channel_embed = nn.Embedding(len(self.vocab), d)
        self.position_embed = PositionEmbedding(d, config.pos_freqs)
        self.time_embed = nn.Linear(d, d, bias=False)  # over sinusoid(P, D)
        self.blocks = nn.ModuleList(
            Block(
                d,
                config.heads,
                make_ffn(config, d, config.ffn_hidden, out_std),
                config.qk_norm,
                config.dropout,
                out_std,
            )
            for _ in range(config.depth)
        )
        self.norm = nn.LayerNorm(d)
        self.scale_embed = nn.Linear(1, d) if config.input_norm == "window" else None
        if self.scale_embed is not None:
            nn.init.trunc_normal_(self.scale_embed.weight, std=0.02)
            nn.init.zeros_(self.scale_embed.bias)
        self.spatial_slope: Tensor | None = spatial_slopes(
            config.heads, config.spatial_bias, config.learn_spatial_slopes, self
        )
        # patch_embed keeps PyTorch's fan-in init (std ~ 1/sqrt(L)): the signal enters at unit
        # scale, above the 0.02-scale channel and time embeddings.
        nn.init.trunc_normal_(self.channel_embed.weight, std=0.02)
        nn.init.trunc_normal_(self.time_embed.weight, std=0.02)
        self.last_expert_counts: Tensor | None = None  # [L_moe, E] of the last forward

    # ---- input step ----------------------------------------------------------------------

    def channel_ids(self, ch_names: Sequence[Sequence[str]], n_channels: int | None = None):
        """``batch["ch_names"]`` -> LongTensor `[B, C]` in this model's vocabulary."""
        return self.vocab.ids(ch_names, n_channels)

    def prepare(self, batch: Mapping[str, Any] | Tensor) -> EncoderInput:
        """Reader batch (or bare `eeg [B, C, T]`) -> :class:`EncoderInput` at the model rate.

        Missing keys get defaults: every channel and sample valid, rate = ``config.sfreq``,
        names unknown; positions come from the 10-05 template when names are given
        without ``ch_pos``.
        """
        if isinstance(batch, Tensor):
            batch = {"eeg": batch}
        cfg = self.config
        eeg = batch["eeg"].float()  # [B, C, T]
        b, c, t = eeg.shape
        dev = eeg.device
        channel_mask = batch.get("channel_mask")
        channel_mask = (
            torch.ones(b, c, dtype=torch.bool, device=dev)
            if channel_mask is None
            else channel_mask.to(dev, torch.bool)
        )
        time_mask = batch.get("time_mask")
        time_mask = (
            torch.ones(b, t, dtype=torch.bool, device=dev)
            if time_mask is None
            else time_mask.to(dev, torch.bool)
        )

        if batch.get("ch_ids") is not None:
            ids = batch["ch_ids"].long()
        elif batch.get("ch_names") is not None:
            ids = self.vocab.ids(batch["ch_names"], c)  # on CPU until positions are looked up
        else:
            ids = torch.zeros(b, c, dtype=torch.long)
        if batch.get("ch_pos") is not None:
            pos = batch["ch_pos"].to(dev, torch.float32)
            known = batch.get("pos_known")
            known = (pos.abs().sum(-1) > 0) if known is None else known.to(dev, torch.bool)
        elif batch.get("ch_names") is not None:
            pos, known = self.vocab.positions(ids)
            pos, known = pos.to(dev), known.to(dev)
        else:
            pos = torch.zeros(b, c, 3, device=dev)
            known = torch.zeros(b, c, dtype=torch.bool, device=dev)
        ids = ids.to(dev)
        pos = torch.where(known[..., None], pos, torch.zeros_like(pos))

        sfreq = batch.get("sfreq")
        if sfreq is None:
            rates = [cfg.sfreq] * b
        else:
            rates = torch.as_tensor(sfreq, dtype=torch.float32).reshape(-1).tolist()
            rates = rates * b if len(rates) == 1 else rates

        # Zero every padded sample first (NaN included): nothing downstream can see it.
        real = channel_mask[:, :, None] & time_mask[:, None, :]  # [B, C, T]
        eeg = torch.where(real, eeg, torch.zeros_like(eeg))
        eeg, time_mask = resample(eeg, time_mask, rates, cfg.sfreq)

        length = cfg.patch_len
        p = max(1, eeg.shape[-1] // length)
        if eeg.shape[-1] < p * length:
            eeg = F.pad(eeg, (0, p * length - eeg.shape[-1]))
            time_mask = F.pad(time_mask, (0, p * length - time_mask.shape[-1]), value=False)
        eeg, time_mask = eeg[..., : p * length], time_mask[:, : p * length]
        real = channel_mask[:, :, None] & time_mask[:, None, :]
        eeg = torch.where(real, eeg, torch.zeros_like(eeg)) / cfg.input_scale_uv
        patches = eeg.reshape(b, c, p, length)  # [B, C, P, L]
        patch_ok = time_mask.view(b, p, length).all(-1)  # [B, P]
        valid = channel_mask[:, :, None] & patch_ok[:, None, :]  # [B, C, P]
        return EncoderInput(patches, valid, ids, pos, known)

    # ---- transformer ---------------------------------------------------------------------

    def normalize(self, inp: EncoderInput, visible: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """-> (patches as the blocks read them `[B, C, P, L]`, scale `[B]`).

        With ``input_norm="window"`` each window is divided by a robust std (1.4826 x the
        median absolute deviation from each patch's mean) of its ``visible [B, C, P]``
        patches only -- the encoder may not learn the scale from what it has to predict --
        and clipped at +-``norm_clip``. "fixed" returns the patches and ones.
        """
        cfg = self.config
        patches = inp.patches.float()
        b = patches.shape[0]
        if cfg.input_norm == "fixed":
            return patches, patches.new_ones(b)
        visible = inp.valid if visible is None else visible & inp.valid
        centred = (patches - patches.mean(-1, keepdim=True)).abs()
        centred = centred.masked_fill(~visible[..., None], float("nan")).reshape(b, -1)
        scale = torch.nanmedian(centred, dim=1).values * 1.4826  # [B]; NaN if nothing visible
        scale = torch.nan_to_num(scale, nan=1.0).clamp_min(1e-3)
        out = (patches / scale[:, None, None, None]).clamp(-cfg.norm_clip, cfg.norm_clip)
        return out * inp.valid[..., None], scale

    def position_embeddings(self, inp: EncoderInput) -> Tensor:
        """Where each token sits: channel (name + position) + time embedding `[B, C, P, D]`."""
        cfg = self.config
        p = inp.patches.shape[2]
        dtype = self.patch_embed.weight.dtype
        ids = inp.ch_ids
        if self.training and cfg.channel_name_dropout > 0:
            drop = torch.rand(ids.shape, device=ids.device) < cfg.channel_name_dropout
            ids = ids.masked_fill(drop, 0)
        chan = self.channel_embed(ids) + self.position_embed(inp.ch_pos, inp.pos_known)  # [B,C,D]
        time = self.time_embed(sinusoid(p, cfg.dim, ids.device).to(dtype))  # [P, D]
        return chan[:, :, None, :] + time[None, None]

    def spatial_bias(self, pos: Tensor, known: Tensor) -> Tensor:
        """Token positions `[B, N, 3]` (m) and `known [B, N]` -> logit bias `[B, h, N, N]`."""
        return distance_bias(self.spatial_slope, pos, known)

    def encode(
        self,
        inp: EncoderInput,
        token_mask: Tensor | None = None,
        mask_token: Tensor | None = None,
        keep: Tensor | None = None,
    ) -> EncoderOutput:
        """Tokens for a prepared input.

        ``keep [B, C, P]`` (MAE): only those (valid) tokens are encoded; the output holds
        them packed to the batch's largest count, with ``index`` saying where each came from,
        and the input scale is taken from them alone. ``token_mask [B, C, P]`` (True = hide,
        BERT-style) instead replaces those patch embeddings by ``mask_token [D]``; channel
        and time embeddings are still added, so the model knows where the hidden patch sits.
        """
        cfg = self.config
        b, c, p, _ = inp.patches.shape
        dtype = self.patch_embed.weight.dtype
        seen = inp.valid if keep is None else keep & inp.valid
        if token_mask is not None:
            seen = seen & ~token_mask
        patches, scale = self.normalize(inp, seen)
        n = c * p
        flat = patches.reshape(b, n, -1)  # [B, N, L]
        valid = inp.valid.reshape(b, n)  # [B, N]
        tok_pos = inp.ch_pos[:, :, None, :].expand(b, c, p, 3).reshape(b, n, 3)
        tok_known = inp.pos_known[:, :, None].expand(b, c, p).reshape(b, n)
        where = self.position_embeddings(inp).reshape(b, n, cfg.dim)  # [B, N, D]
        if self.channel_band_embed is not None:  # from seen patches only: nothing hidden leaks
            bands = channel_band_power(patches, seen, cfg.patch_seconds)  # [B, C, 6]
            chan = self.channel_band_embed(bands.to(dtype))  # [B, C, D]
            where = where + chan[:, :, None, :].expand(b, c, p, cfg.dim).reshape(b, n, cfg.dim)
        index = None
        if keep is not None:
            # MAE: hidden patches are dropped here, before any weight touches them
            flat_keep = (keep & inp.valid).reshape(b, n)
            n_keep = int(flat_keep.sum(1).max().clamp_min(1))
            # kept tokens first, in token order (stable sort), then the rest as padding
            index = torch.sort((~flat_keep).to(torch.uint8), dim=1, stable=True).indices
            index = index[:, :n_keep]  # [B, Nk]
            valid = flat_keep.gather(1, index)
            # padding slots carry nothing of hidden patches
            flat = flat.gather(1, index[..., None].expand(-1, -1, flat.shape[-1]))
            flat = flat * valid[..., None].to(flat.dtype)
            where = where.gather(1, index[..., None].expand(-1, -1, cfg.dim))
            tok_pos = tok_pos.gather(1, index[..., None].expand(-1, -1, 3))
            tok_known = tok_known.gather(1, index)
        x = self.patch_embed(flat.to(dtype))  # [B, N or Nk, D]
        if self.spectral_embed is not None:
            power = log_spectrum(flat, cfg.spectral_bands)  # [B, N, bands]
            power = power.masked_fill(~valid[..., None], 0.0)
            x = x + self.spectral_embed(power.to(dtype))
        if token_mask is not None:
            x = torch.where(token_mask.reshape(b, n, 1), mask_token.to(x.dtype), x)
        if self.scale_embed is not None:
            log_scale = torch.log(scale * cfg.input_scale_uv / 10.0)  # ~0 for a 10 uV window
            x = x + self.scale_embed(log_scale[:, None].to(dtype))[:, None, :]
        x = x + where
        if keep is not None:
            x = x * valid[..., None].to(x.dtype)
        packing, block_valid = None, valid
        if cfg.packing and not x.is_meta and not bool(valid.all()):
            # padding (montages, kept counts) would cost compute: run the valid tokens only
            bias = None
            if cfg.spatial_bias:
                bias = gathered_bias(self.spatial_bias, tok_pos, tok_known, dtype)
            packing = make_packing(valid, bias)
            x, attn_mask, block_valid = packing.pack(x), packing, None  # x [Nt, D]
        else:
            # A sample with no valid token attends to everything (finite garbage, masked
            # later) instead of to nothing (NaN through softmax).
            keys = valid | ~valid.any(1, keepdim=True)
            attn_mask = keys[:, None, None, :]  # [B, 1, 1, N]
            if cfg.spatial_bias:
                bias = self.spatial_bias(tok_pos, tok_known)  # [B, h, N, N]
                attn_mask = bias.masked_fill(~attn_mask, float("-inf")).to(dtype)

        aux = x.new_zeros((), dtype=torch.float32)
        counts = []
        use_ckpt = cfg.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.blocks:
            if use_ckpt:
                x, a, n = checkpoint(block, x, attn_mask, block_valid, use_reentrant=False)
            else:
                x, a, n = block(x, attn_mask, block_valid)
            aux = aux + a
            if isinstance(block.ffn, MoE):
                counts.append(n)
                if self.training and not x.is_meta:  # here, not in the block: not recomputed
                    block.ffn.record(n)
        x = self.norm(x)
        if packing is not None:
            x = packing.unpack(x)  # [B, N, D], zeros where padding
        expert_counts = (
            torch.stack(counts) if counts else torch.zeros(0, 0, dtype=torch.long, device=x.device)
        )
        self.last_expert_counts = expert_counts
        return EncoderOutput(
            x, valid, c, p, aux, expert_counts, index, scale, patches, inp.ch_pos, inp.pos_known
        )

    def forward(
        self,
        batch: Mapping[str, Any] | Tensor | EncoderInput,
        token_mask: Tensor | None = None,
        mask_token: Tensor | None = None,
    ) -> EncoderOutput:
        inp = batch if isinstance(batch, EncoderInput) else self.prepare(batch)
        return self.encode(inp, token_mask, mask_token)

    @staticmethod
    def pool(tokens: Tensor | EncoderOutput, valid: Tensor | None = None) -> Tensor:
        """Mean over valid tokens -> `[B, D]`: the representation linear probes read.

        ``tokens`` is `[B, N, D]` or `[B, C, P, D]` with ``valid`` of matching leading shape,
        or an :class:`EncoderOutput`.
        """
        if isinstance(tokens, EncoderOutput):
            tokens, valid = tokens.tokens, tokens.valid
        b, d = tokens.shape[0], tokens.shape[-1]
        tokens = tokens.reshape(b, -1, d)
        if valid is None:
            return tokens.mean(1)
        w = valid.reshape(b, -1, 1).to(tokens.dtype)
        return (tokens * w).sum(1) / w.sum(1).clamp_min(1.0)

    # ---- experts -------------------------------------------------------------------------

    def moe_layers(self) -> list[MoE]:
        return [blk.ffn for blk in self.blocks if isinstance(blk.ffn, MoE)]

    def routing_counts(self) -> Tensor:
        """`[L_moe, E]` assignments per expert accumulated over training forwards since the
        last bias update (all micro-batches of a step): what to all-reduce before
        :meth:`update_router_bias`."""
        layers = self.moe_layers()
        if not layers:
            return torch.zeros(0, 0, dtype=torch.long)
        return torch.stack([m.counts for m in layers])

    @torch.no_grad()
    def update_router_bias(self, counts: Tensor | None = None, rate: float | None = None) -> None:
        """Aux-loss-free balancing step; call after every optimizer step.

        ``counts [L_moe, E]``: :meth:`routing_counts` summed over data-parallel ranks (pass
        the all-reduced tensor so every rank applies the same update); None uses this rank's
        own counts (single process). Resets the accumulators. No-op for dense models.
        """
        layers = self.moe_layers()
        for i, layer in enumerate(layers):
            layer.update_bias(None if counts is None else counts[i], rate)

    # ---- parameters and checkpoints ------------------------------------------------------

    def num_parameters(self) -> dict[str, int]:
        """Total parameters, and those a token uses (all but its E - K unchosen experts per
        MoE layer; embedding tables count in full)."""
        total = sum(p.numel() for p in self.parameters())
        idle = sum((m.n_experts - m.top_k) * m.params_per_expert for m in self.moe_layers())
        return {"total": total, "active": total - idle}


def build_on_meta(config: EncoderConfig) -> Encoder:
    """An encoder with no storage: for shapes and parameter counts of any size."""
    with torch.device("meta"):
        return Encoder(config)


def count_parameters(config: EncoderConfig | str) -> dict[str, int]:
    """``{"total", "active"}`` of a config without allocating it (built on meta)."""
    if isinstance(config, str):
        config = get_config(config)
    return build_on_meta(config).num_parameters()


def _fmt(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def main() -> None:
    header = f"{'name':<12} {'D':>5} {'depth':>5} {'heads':>5} {'E':>3} {'K':>2} {'shared':>6}"
    header += f" {'H':>5} {'total':>9} {'active':>9}"
    print(header)
    for name in list_configs():
        cfg = CONFIGS[name]
        n = count_parameters(cfg)
        experts = (cfg.n_experts, cfg.top_k, cfg.n_shared_experts) if cfg.is_moe else (0, 0, 0)
        print(
            f"{name:<12} {cfg.dim:>5} {cfg.depth:>5} {cfg.heads:>5} {experts[0]:>3} "
            f"{experts[1]:>2} {experts[2]:>6} {cfg.ffn_hidden:>5} "
            f"{_fmt(n['total']):>9} {_fmt(n['active']):>9}"
        )


if __name__ == "__main__":
    main()
