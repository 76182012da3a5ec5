"""The masked-signal-modelling settings (``msm:`` in a pretraining config).

Why each option exists, and what it measured, is said beside it: most of them are the
ablations of bench/RESULTS.md ("Pretraining ablation", "MOABB", "Demo"), kept so that a row
there can be re-run; the design `configs/pretrain/*.yaml` use is described in pretrain/msm.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pretrain.encoder_config import EncoderConfig, get_config, strict_from_dict

MASK_MODES = ("random", "time_block", "mixed")
TARGETS = ("signal", "spectrum", "both")
ENCODER_INPUTS = ("all", "visible")
DECODER_ATTENTIONS = ("full", "criss_cross")


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
    # "full": every decoder token attends to every other (N^2 per window); "criss_cross": half
    # the heads across the channels of a patch, half across the patches of a channel
    # (pretrain/criss_cross.py; N*(C + P), 4.7x cheaper per layer at 128 channels x 4 s)
    decoder_attention: str = "full"
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
    # ``subject_buckets`` classes (a non-BIDS ``files:`` corpus needs ``subject=<regex>``, or
    # each file is a subject). Measured on EEGMMIDB with the four people hidden from the mean
    # token: reconstruction kept, MOABB worse within and across subjects (bench/RESULTS.md)
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
    # same subject (provenance, as for ``subject_adversary``), so subject traits cannot solve it
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
        if self.decoder_attention not in DECODER_ATTENTIONS:
            raise ValueError(
                f"decoder_attention must be one of {DECODER_ATTENTIONS}, "
                f"got {self.decoder_attention!r}"
            )
        if self.decoder_attention == "criss_cross" and self.decoder_heads < 2:
            raise ValueError("decoder_attention=criss_cross needs decoder_heads >= 2")
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
