"""The encoder's architecture as data: EncoderConfig (saved as config.json) and the named sizes.

Apart from the modules (pretrain/encoder.py) so that configs, parameter counts and the
DeepSpeed JSON can be built and checked without reading the transformer's code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pretrain.moe import BACKENDS, GATES

INPUT_NORMS = ("fixed", "window")


@dataclass
class EncoderConfig:
    """Everything that defines an encoder's architecture (saved as config.json)."""

    # Input step.
    sfreq: float = 200.0  # model sampling rate (Hz); inputs are resampled to it
    patch_seconds: float = 1.0  # patch length; L = round(patch_seconds * sfreq)
    input_scale_uv: float = 100.0  # inputs in uV are divided by this
    # "fixed": only the division above (amplitude reaches the model as it is); "window": then
    # each window is divided by one robust std of the samples the encoder may see (its visible
    # patches), clipped at +-norm_clip, and log(scale) enters every token as an embedding --
    # one loud recording no longer dominates, and nothing hidden leaks through the scale
    input_norm: str = "fixed"
    norm_clip: float = 8.0
    # > 0: add an embedding of the patch's log power in this many bands (CBraMod-style);
    # the pre-norm blocks normalise each token, which hides amplitude from a linear patch
    # embedding alone, and band power is where most EEG labels live
    spectral_bands: int = 0
    # true: add to every token an embedding of its *channel's* log power in the classic EEG
    # bands, averaged over the channel's visible patches (pretrain/spectral.py). A token sees
    # one 1-s patch; the classes of motor imagery and of the simulator sit in band power over
    # the window, which a linear read-out of one patch's spectrum hardly recovers
    channel_bands: bool = False
    # Transformer.
    dim: int = 256  # D
    depth: int = 6
    heads: int = 4
    ffn_hidden: int = 512  # H of each routed/shared expert, or of the MLP when n_experts == 0
    qk_norm: bool = True  # LayerNorm on queries/keys: keeps attention logits bounded at scale
    # attention logits biased by -slope_h * electrode distance (ALiBi over the scalp, one
    # slope per head from local to global): volume conduction makes near channels redundant,
    # and the bias lets a head find them from the first step
    spatial_bias: bool = False
    # learned slopes make the bias a tensor that needs a gradient, which sends CPU attention
    # to PyTorch's unfused math kernel; fixed ALiBi-style slopes keep the fused one (a 128-
    # channel recipe step: 988 -> 655 ms here)
    learn_spatial_slopes: bool = True
    dropout: float = 0.0
    # Mixture of experts (n_experts == 0: dense SwiGLU MLP of width ffn_hidden).
    n_experts: int = 8  # E
    top_k: int = 2  # K
    n_shared_experts: int = 1  # always-on experts, fused into one MLP of width n * ffn_hidden
    gate: str = "sigmoid"  # "sigmoid" (DeepSeek-V3) or "softmax"; top-k gates renormalised
    router_bias_rate: float = 1e-3  # step of the aux-loss-free balancing bias
    aux_loss_coef: float = 0.0  # optional Switch load-balancing loss; 0 = off
    expert_backend: str = "auto"  # "auto" | "grouped_mm" | "loop"
    # Channels.
    pos_freqs: int = 8  # Fourier frequencies per axis for the position embedding
    channel_name_dropout: float = 0.0  # training only: name -> unknown, forces use of position
    # Memory and compute (not architecture: the same weights run either way).
    activation_checkpointing: bool = False
    # batches with padding (mixed montages, MAE's per-sample visible tokens) run packed:
    # valid tokens only, attention per equal-length group (pretrain/packing.py)
    packing: bool = True

    def __post_init__(self) -> None:
        if self.dim % self.heads:
            raise ValueError(f"dim {self.dim} is not divisible by heads {self.heads}")
        if self.n_experts < 0 or self.n_shared_experts < 0:
            raise ValueError("n_experts and n_shared_experts must be >= 0")
        if self.n_experts and not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"need 1 <= top_k <= n_experts, got {self.top_k}, {self.n_experts}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if self.expert_backend not in BACKENDS:
            raise ValueError(f"expert_backend must be one of {BACKENDS}")
        if self.patch_len < 1:
            raise ValueError("patch_seconds * sfreq must be at least one sample")
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm must be one of {INPUT_NORMS}, got {self.input_norm!r}")
        if self.norm_clip <= 0:
            raise ValueError(f"norm_clip must be positive, got {self.norm_clip}")
        if not 0 <= self.spectral_bands <= self.patch_len // 2:
            raise ValueError(
                f"spectral_bands must be in [0, {self.patch_len // 2}] (patch of "
                f"{self.patch_len} samples), got {self.spectral_bands}"
            )

    @property
    def patch_len(self) -> int:
        return round(self.patch_seconds * self.sfreq)

    @property
    def is_moe(self) -> bool:
        return self.n_experts > 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderConfig:
        return strict_from_dict(cls, data)


def strict_from_dict(cls: type, data: Mapping[str, Any]) -> Any:
    """A config dataclass from a dict where unknown keys are an error: a silently ignored
    key would build another model than the one asked for."""
    known = {f.name for f in dataclasses.fields(cls)}
    extra = set(data) - known
    if extra:
        raise ValueError(f"unknown {cls.__name__} keys: {sorted(extra)}")
    return cls(**dict(data))


def dense_variant(config: EncoderConfig) -> EncoderConfig:
    """The dense model with the same active FFN width: MLP hidden = (K + shared) * H."""
    if not config.is_moe:
        return config
    hidden = (config.top_k + config.n_shared_experts) * config.ffn_hidden
    return dataclasses.replace(config, n_experts=0, n_shared_experts=0, ffn_hidden=hidden)


_MOE_CONFIGS = {
    # CPU tests.
    "tiny": EncoderConfig(
        dim=64, depth=2, heads=4, ffn_hidden=128, n_experts=4, top_k=2, n_shared_experts=1
    ),
    # Single-GPU experiments.
    "small": EncoderConfig(
        dim=256, depth=6, heads=4, ffn_hidden=512, n_experts=8, top_k=2, n_shared_experts=1
    ),
    "base": EncoderConfig(
        dim=512, depth=12, heads=8, ffn_hidden=512, n_experts=8, top_k=2, n_shared_experts=1
    ),
    # Multi-node: fine-grained experts (H = D/2), ~1/5 of the parameters active per token.
    "large": EncoderConfig(
        dim=1024,
        depth=24,
        heads=16,
        ffn_hidden=512,
        n_experts=32,
        top_k=2,
        n_shared_experts=1,
        activation_checkpointing=True,
    ),
}
CONFIGS: dict[str, EncoderConfig] = {
    **_MOE_CONFIGS,
    **{f"{name}-dense": dense_variant(cfg) for name, cfg in _MOE_CONFIGS.items()},
}


def list_configs() -> list[str]:
    return list(CONFIGS)


def get_config(name: str, **overrides: Any) -> EncoderConfig:
    """A fresh copy of a named config, with field overrides."""
    if name not in CONFIGS:
        raise KeyError(f"unknown encoder config {name!r}; known: {list_configs()}")
    return dataclasses.replace(CONFIGS[name], **overrides)
