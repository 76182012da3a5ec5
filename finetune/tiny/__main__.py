"""`python -m finetune.tiny OUT`: build every tiny base (CLIP, Stable Diffusion, causal LM) into
OUT and print, as the last line, the config overrides that point a finetuning run at them
(demo, CI, bench; libraries may print warnings before it, hence `| tail -n 1`)."""

from __future__ import annotations

import sys
from pathlib import Path

from finetune.synthetic_stimuli import MAX_CLASSES, MAX_INSTANCES, synthetic_captions
from finetune.tiny.clip import build_tiny_clip
from finetune.tiny.diffusion import build_tiny_sd
from finetune.tiny.llm import build_tiny_llm


def build_all(out: str | Path) -> list[str]:
    """-> key=value overrides for configs/finetune/*.yaml."""
    out = Path(out).resolve()
    clip = build_tiny_clip(out / "clip")
    sd = build_tiny_sd(out / "sd")
    corpus = [
        c
        for k in range(MAX_CLASSES)
        for i in range(MAX_INSTANCES)
        for c in synthetic_captions(k, i)
    ]
    llm = build_tiny_llm(out / "llm", corpus=corpus)
    return [
        f"data.clip.model={clip}",
        "data.clip.pretrained=null",
        f"image.base={sd}",
        f"text.base={llm}",
    ]


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m finetune.tiny OUT")
    print(" ".join(build_all(sys.argv[1])))
