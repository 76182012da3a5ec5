"""The one list of heads: each task name mapped to its head class, config and evaluation.

Everything that used to switch on "retrieval" / "image" / "text" (building the model, the
held-out scores, the report table, `brainmoe generate`, the adapter compatibility checks, the
reload reference) looks the task up here and calls the head through the protocol below, so a
new head is one entry here, one config field in finetune/config.py, and one contract test
run (tests/test_head_contract.py runs over every entry).

The entries name their code as "module:attribute" strings, imported on first use: the
report and `generate`'s input checks read this table without importing torch, diffusers or
transformers.

The protocol every head class keeps (see also finetune/heads/__init__.py):

    head = Head.from_config(config, encoder_dim=D, clip_dim=Dc)   # loads its frozen bases
    out = head(tokens, valid, batch, generator=None)   # tokens [B, N, D], valid [B, N] bool
                                                       # -> {"loss": scalar, named scalars}
    head.save_adapter(folder); head.load_adapter(folder); head.trainable_state_dict()
    head.base_models()                                 # {"unet": hub id or path, ...}
    head.reference(tokens, valid, batch) -> Tensor     # deterministic output (reload checks)
    head.decode(tokens, valid, num_images=, steps=, seed=) -> {"caption": [B] | "images": [B]}
    head.stimulus_tensors(stimuli, cache_root) -> {batch field: {stimulus id: tensor}}
    Head.check_saved(config, folder)                   # a saved adapter vs the configured base,
                                                       # from config files only (ValueError)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


def load(path: str) -> Any:
    """ "package.module:attribute" -> the attribute."""
    module, _, attribute = path.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class HeadSpec:
    """One kind of head. ``name`` is the task name: the `tasks` entry, the FinetuneConfig
    section of its config, the adapter subfolder, and the prefix of its losses and scores."""

    name: str
    head: str  # "module:Class" of the nn.Module keeping the protocol above
    config: str  # "module:Class" of its config dataclass
    scores: str  # "module:function" (head, EvalContext) -> held-out scores (dict) or None
    rows: str  # "module:function" (its scores) -> rows of the finetune report table

    @property
    def head_class(self) -> type:
        return load(self.head)

    @property
    def config_class(self) -> type:
        return load(self.config)

    def build(self, config: Any, encoder_dim: int, clip_dim: int):
        if not isinstance(config, self.config_class):
            raise TypeError(f"the {self.name} head needs a {self.config}, got {type(config)}")
        return self.head_class.from_config(config, encoder_dim, clip_dim)

    def score(self, head, context) -> dict[str, Any] | None:
        return load(self.scores)(head, context)

    def report_rows(self, scores: dict[str, Any]) -> list[tuple[str, str, str, str]]:
        return load(self.rows)(scores)


HEADS: dict[str, HeadSpec] = {
    spec.name: spec
    for spec in (
        HeadSpec(
            "retrieval",
            "finetune.heads.retrieval:RetrievalHead",
            "finetune.heads.retrieval:RetrievalHeadConfig",
            "finetune.evaluate:retrieval_scores",
            "finetune.report:retrieval_rows",
        ),
        HeadSpec(
            "image",
            "finetune.heads.image:ImageHead",
            "finetune.heads.image:ImageHeadConfig",
            "finetune.evaluate:image_scores",
            "finetune.report:image_rows",
        ),
        HeadSpec(
            "text",
            "finetune.heads.text:TextHead",
            "finetune.heads.text:TextHeadConfig",
            "finetune.evaluate:text_scores",
            "finetune.report:text_rows",
        ),
    )
}
TASKS = tuple(HEADS)


def head_spec(name: str) -> HeadSpec:
    if name not in HEADS:
        raise ValueError(f"unknown task {name!r}: the heads are {', '.join(HEADS)}")
    return HEADS[name]
