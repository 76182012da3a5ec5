"""A tiny random-weight open_clip model, written the way a released one is laid out.

open_clip loads a local model from a folder holding ``open_clip_config.json`` (``model_cfg``
plus ``preprocess_cfg``) and a weights file (``open_clip_model.safetensors`` is its first
choice) when the model name is ``local-dir:<folder>``; the tokenizer comes from the config too,
and without ``hf_tokenizer_name`` it is the bundled SimpleTokenizer, so nothing is downloaded.
Writing exactly that layout lets tests and the demo run the same
``open_clip.create_model_and_transforms(name)`` call a real checkpoint goes through.

Size: the text tower must keep CLIP's 49408-token vocabulary (the SimpleTokenizer emits those
ids), so its width is what sets the parameter count: width 16 gives ~0.8 M parameters in all,
~0.79 M of them the token embedding.

Random weights put every image in one narrow cone (pairwise cosine ~0.997: the embedding is
mostly the class token's constant), which no EEG->CLIP model can be trained against and no
real CLIP does. ``fit_steps`` therefore gives the tiny model a few seconds of CLIP's own
contrastive training on the synthetic source's rendered stimuli and captions, so its space is
semantic for that world the way a released CLIP's is for photographs.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
_VOCAB = 49408  # open_clip's SimpleTokenizer vocabulary


def tiny_clip_config(image_size: int = 32, embed_dim: int = 32, context_length: int = 32) -> dict:
    """The open_clip_config.json content: a 2-layer ViT (8x8 patches) and a 2-layer text tower."""
    if image_size % 8:
        raise ValueError(f"image_size={image_size} must be a multiple of the 8-pixel patch size")
    return {
        "model_cfg": {
            "embed_dim": embed_dim,
            "vision_cfg": {
                "image_size": image_size,
                "patch_size": 8,
                "width": 32,
                "head_width": 16,  # 2 heads; the default 64 would give width // 64 = 0 heads
                "layers": 2,
                "mlp_ratio": 2.0,
            },
            "text_cfg": {
                "context_length": context_length,
                "vocab_size": _VOCAB,
                "width": 16,
                "heads": 2,
                "layers": 2,
                "mlp_ratio": 2.0,
            },
        },
        "preprocess_cfg": {
            "size": image_size,
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
            "interpolation": "bicubic",
            "resize_mode": "shortest",
        },
    }


def fit_synthetic(model: open_clip.CLIP, config: dict, steps: int, seed: int = 0) -> None:
    """CLIP's symmetric InfoNCE on rendered synthetic stimuli (8 classes x 10 instances) and
    their captions, in place: a tiny stand-in for a released checkpoint's pretraining."""
    import random

    import torch.nn.functional as F
    import torchvision.transforms as T

    from finetune.synthetic_stimuli import render_synthetic_image, synthetic_captions

    pre = config["preprocess_cfg"]
    transform = T.Compose([T.ToTensor(), T.Normalize(pre["mean"], pre["std"])])
    size = config["model_cfg"]["vision_cfg"]["image_size"]
    pairs = [(k, i) for k in range(8) for i in range(10)]
    images = torch.stack([transform(render_synthetic_image(k, i, size=size)) for k, i in pairs])
    captions = [synthetic_captions(k, i) for k, i in pairs]
    tokenizer = open_clip.SimpleTokenizer(
        context_length=config["model_cfg"]["text_cfg"]["context_length"]
    )
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(seed)
    model.train()
    for _ in range(steps):
        rows = rng.sample(range(len(pairs)), 32)
        text = tokenizer([rng.choice(captions[r]) for r in rows])
        img = F.normalize(model.encode_image(images[rows]), dim=-1)
        txt = F.normalize(model.encode_text(text), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T  # [32, 32]
        target = torch.arange(len(rows))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def build_tiny_clip(
    folder: str | Path,
    image_size: int = 32,
    embed_dim: int = 32,
    seed: int = 0,
    fit_steps: int = 150,
) -> str:
    """Write the tiny model to `folder` and return the name open_clip loads it by.

    Pass the returned ``local-dir:<folder>`` as the model name (``pretrained`` is ignored for
    it) to ``open_clip.create_model_and_transforms`` / ``get_tokenizer`` or to ClipConfig.model.
    The weights depend on `seed` only, so two builds give identical files.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    config = tiny_clip_config(image_size=image_size, embed_dim=embed_dim)
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**config["model_cfg"])  # what create_model builds from it
        if fit_steps:
            fit_synthetic(model, config, fit_steps, seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    return "local-dir:" + str(folder)
