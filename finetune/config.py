"""The finetuning run config: the pretraining run's shared parts (optim, dist, train,
tracking, register) plus the paired data, the encoder to start from, and the heads.

configs/finetune/<name>.yaml + key=value overrides -> FinetuneConfig -> resolved YAML in the
run folder, flattened into MLflow params, and the generated DeepSpeed JSON.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from cluster.ray_train import RayConfig
from finetune.clip_cache import ClipConfig
from finetune.heads import registry
from finetune.heads.image import ImageHeadConfig
from finetune.heads.retrieval import RetrievalHeadConfig
from finetune.heads.text import TextHeadConfig
from finetune.multitask import TaskWeightingConfig
from finetune.splits import SplitConfig
from pretrain.config import (
    COUNT,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    PROBABILITY,
    Range,
    RegisterConfig,
    RunPaths,
    TrainConfig,
)
from pretrain.ds_config import DistConfig, OptimConfig
from pretrain.tracking import TrackingConfig
from shards.reader import ReaderConfig

TASKS = registry.TASKS  # each has a config section below, named as the task
ENCODER_TRAINING = ("frozen", "lora", "top", "full")


def _reader() -> ReaderConfig:
    return ReaderConfig(
        batch_size=8, num_workers=1, resampled=True, shuffle_buffer=128, shuffle_initial=32
    )


@dataclass
class StimuliConfig:
    image_root: str | None = None  # THINGS-EEG2 / ImageNet-EEG image folder
    captions: str | None = None  # JSON or CSV: stimulus id -> caption(s)
    render_size: int = 64  # the synthetic source's stimuli are rendered at this size


@dataclass
class FinetuneDataConfig:
    shards: list[str] = field(default_factory=list)  # build folders with paired windows
    reader: ReaderConfig = field(default_factory=_reader)
    stimuli: StimuliConfig = field(default_factory=StimuliConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    split: SplitConfig = field(default_factory=SplitConfig)


@dataclass
class EncoderSetup:
    model: str = ""  # an exported encoder folder or models:/<name>@<alias>
    train: str = "lora"  # frozen | lora (attention LoRA) | top (last top_blocks) | full
    top_blocks: int = 1
    lora_rank: int = 8
    lora_alpha: int = 16
    # what the heads read: "tokens" (all C x P) or "regions" (one per 10-20 site, 20 in all;
    # finetune/head_inputs.py says why)
    heads_read: str = "tokens"


@dataclass
class FinetuneTrainConfig(TrainConfig):
    run_dir: str = "runs/finetune"
    eval_windows: int = 512  # held-out windows scored at the end (retrieval, captions)
    eval_images: int = 8  # of them, how many get an image generated and scored in CLIP space


@dataclass
class FinetuneConfig(RunPaths):
    # numbers of the parts particular to finetuning (the shared ones: pretrain.config.RUN_RANGES),
    # checked by validate_run before any rank starts
    ranges: ClassVar[dict[str, Range]] = {
        "data.stimuli.render_size": COUNT,
        "data.clip.batch_size": COUNT,
        "data.clip.chunk_size": COUNT,
        "data.split.test_fraction": FRACTION,
        "encoder.top_blocks": COUNT,
        "encoder.lora_rank": COUNT,
        "encoder.lora_alpha": POSITIVE,
        "train.eval_windows": NON_NEGATIVE,
        "train.eval_images": NON_NEGATIVE,
        "retrieval.clip_dim": NON_NEGATIVE,
        "retrieval.hidden": COUNT,
        "retrieval.temperature_init": POSITIVE,
        "retrieval.text_weight": NON_NEGATIVE,
        "retrieval.cosine_weight": NON_NEGATIVE,
        "retrieval.queries": COUNT,
        "retrieval.dropout": PROBABILITY,
        "image.context_len": NON_NEGATIVE,
        "image.lora_rank": COUNT,
        "image.lora_alpha": POSITIVE,
        "image.clip_weight": NON_NEGATIVE,
        "image.projector_depth": COUNT,
        "image.projector_heads": COUNT,
        "image.uncond_prob": PROBABILITY,
        "image.image_size": NON_NEGATIVE,
        "image.guidance_scale": NON_NEGATIVE,
        "image.num_inference_steps": COUNT,
        "text.prefix_tokens": COUNT,
        "text.lora_rank": COUNT,
        "text.lora_alpha": POSITIVE,
        "text.lora_dropout": PROBABILITY,
        "text.max_caption_tokens": COUNT,
        "text.max_new_tokens": COUNT,
        "weighting.gate_floor": PROBABILITY,
        "weighting.gate_kl": NON_NEGATIVE,
    }

    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    encoder: EncoderSetup = field(default_factory=EncoderSetup)
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    init_adapters: str | None = None  # start the heads from a finetune folder / models:/ URI
    # one section per head of finetune/heads/registry.py, named as its task
    retrieval: RetrievalHeadConfig = field(default_factory=RetrievalHeadConfig)
    image: ImageHeadConfig = field(default_factory=ImageHeadConfig)
    text: TextHeadConfig = field(default_factory=TextHeadConfig)
    weighting: TaskWeightingConfig = field(default_factory=TaskWeightingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    train: FinetuneTrainConfig = field(default_factory=FinetuneTrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)
    ray: RayConfig = field(default_factory=RayConfig)  # --launcher ray only
