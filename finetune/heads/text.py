"""EEG -> text: a frozen causal LM reads k EEG prefix embeddings and writes a caption.

Thought2Text / LLaVA recipe: only a projector (EEG tokens -> k vectors in the LM's input
embedding space) and LoRA adapters on the LM are trained, so a 1B-parameter LM fits beside the
encoder and an adapter is a few MB.

Sequence the LM sees, teacher-forced during training:

    [bos] [prefix_1 .. prefix_k] [prompt tokens] [caption tokens] [eos] [pad ...]
    labels: -100 everywhere except the caption tokens and eos

Projector design: k learned queries attend over the encoder's valid tokens (one block of the
resampler every head shares, finetune/heads/resampler.py: a small Perceiver resampler /
Q-Former), plus the mean-pooled tokens as a residual, then an MLP to the LM width.
Cross-attention rather than a pooled MLP because a caption names several things (object,
colour, scene) that different channels and patches carry: k queries can each read a
different part of the token grid. The output is layer-normed and scaled to the RMS of the
LM's own word embeddings, so the frozen LM receives inputs at the magnitude it was trained on
from the first step.

The mean-pooled tokens are standardised per feature over the batch (BatchNorm, as in the
retrieval head; the resampler's ``pooled=True``) before they reach the queries and the
output. Pooled encoder tokens are nearly the same vector for every window (pairwise cosine
0.998 on the synthetic corpus, the window-specific part ~4% of the norm), and a per-sample
LayerNorm keeps that common part: the prefix then hardly changes with the EEG (cosine 0.999
between windows), the LM learns the caption prior first, and greedy decoding writes one
caption for every held-out window (400 steps on 4 strong synthetic classes, measured with
the single-attention projector this head had before the shared resampler: one caption, the
right shape named in 16/64 windows; standardised: 5 captions, the right shape in 33/64).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
)

from finetune.heads.resampler import TokenResampler
from pretrain.artifacts import load_safetensors, read_json, verify_checksums, write_checksums

DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "text_head.json"
FORMAT = 2  # of the saved adapter; 2: the projector is finetune/heads/resampler.py's
PROJECTOR_FILE = "projector.safetensors"
LORA_DIR = "lora"
LORA_FILES = (f"{LORA_DIR}/adapter_model.safetensors", f"{LORA_DIR}/adapter_config.json")
REMEDY = "re-download the finetune output, or save the head again"


@dataclass
class TextHeadConfig:
    """The text head: which LM, how many prefix embeddings, the LoRA shape, the prompt."""

    base: str = "meta-llama/Llama-3.2-1B-Instruct"  # hub id or local folder of a causal LM
    prefix_tokens: int = 8  # k EEG prefix embeddings
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    prompt: str = "Describe the image the person saw:"
    max_caption_tokens: int = 32  # caption tokens kept for teacher forcing, eos included
    max_new_tokens: int = 24  # default generation length
    dtype: str = "float32"  # LM weights: float32 | bfloat16 | float16
    local_files_only: bool = True  # never download at run time unless asked


def _check_base(base: str, local_files_only: bool) -> tuple[str, Any]:
    """(where to load ``base`` from, its config) if it is a causal LM; else a ValueError.

    Runs before any weights are read, so a typo fails in seconds, not after a load.
    """
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(
                f"text head base {base!r} is not a transformers model folder (no config.json); "
                "pass a folder written by save_pretrained (e.g. finetune.tiny.llm.build_tiny_llm)"
                " or a hub id"
            )
    elif base.startswith(("/", ".", "~")) or base.count("/") > 1:
        raise ValueError(f"text head base folder {base!r} does not exist")
    source = str(path) if path.exists() else base
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"cannot load the config of text head base {base!r} ({err}); pass a local folder, "
            "or set local_files_only=False to download it from the hub"
        ) from err
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ValueError(
            f"text head base {base!r} is a {config.model_type!r} model, not a causal LM; "
            "pass a decoder-only LM such as a Llama, Qwen or GPT-2 checkpoint"
        )
    return source, config


class TextHead(nn.Module):
    """Frozen causal LM + LoRA, conditioned on EEG through k prefix embeddings."""

    def __init__(self, config: TextHeadConfig, encoder_dim: int):
        super().__init__()
        if config.prefix_tokens < 1:
            raise ValueError(f"prefix_tokens must be >= 1, got {config.prefix_tokens}")
        if config.max_caption_tokens < 2:
            raise ValueError(
                f"max_caption_tokens must be >= 2 (a word and eos), got {config.max_caption_tokens}"
            )
        dtype = getattr(torch, config.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {config.dtype!r}")
        self.config = config
        self.encoder_dim = encoder_dim
        source, lm_config = _check_base(config.base, config.local_files_only)
        self.tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=config.local_files_only
        )
        if self.tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {config.base!r} has no eos token to end captions")
        lm = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=config.local_files_only, dtype=dtype
        )
        lm.requires_grad_(False)
        names = {name.rsplit(".", 1)[-1] for name, _ in lm.named_modules()}
        missing = [t for t in config.lora_targets if t not in names]
        if missing or not config.lora_targets:
            raise ValueError(
                f"lora_targets {missing or '[]'} are not modules of {config.base!r}; "
                f"choose among {sorted(n for n in names if n.endswith('proj'))}"
            )
        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=list(config.lora_targets),
            task_type="CAUSAL_LM",
        )
        self.lm = get_peft_model(lm, lora)
        self.lm_hidden = int(lm_config.hidden_size)
        embed = self.lm.get_input_embeddings().weight
        # EEG tokens [B, N, D] -> k prefix vectors [B, k, D] -> the LM width [B, k, H]
        self.projector = nn.ModuleDict(
            {
                "resampler": TokenResampler(
                    encoder_dim, encoder_dim, config.prefix_tokens, depth=1, pooled=True
                ),
                "to_lm": nn.Sequential(
                    nn.Linear(encoder_dim, self.lm_hidden),
                    nn.GELU(),
                    nn.Linear(self.lm_hidden, self.lm_hidden),
                    nn.LayerNorm(self.lm_hidden),
                ),
            }
        )
        # the prefix arrives at the RMS of the LM's own word embeddings (module docstring)
        self.register_buffer(
            "embed_rms", embed.detach().float().pow(2).mean().sqrt(), persistent=False
        )
        self.pad_id = (
            self.tokenizer.pad_token_id
            if self.tokenizer.pad_token_id is not None
            else self.tokenizer.eos_token_id
        )
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        prompt = self.tokenizer(config.prompt, add_special_tokens=False)["input_ids"]
        self.register_buffer("bos_ids", torch.tensor(bos, dtype=torch.long), persistent=False)
        self.register_buffer("prompt_ids", torch.tensor(prompt, dtype=torch.long), persistent=False)

    # ---- inputs -------------------------------------------------------------------------

    def _embed(self, ids: Tensor) -> Tensor:
        return self.lm.get_input_embeddings()(ids)

    def _context(self, tokens: Tensor, valid: Tensor | None) -> Tensor:
        """[bos] [prefix] [prompt] embeddings: [B, S0, H] in the LM's dtype."""
        b = tokens.shape[0]
        prefix = self.projector["to_lm"](self.projector["resampler"](tokens, valid))  # [B, k, H]
        prefix = prefix * self.embed_rms
        dtype = self.lm.get_input_embeddings().weight.dtype
        bos = self._embed(self.bos_ids).unsqueeze(0).expand(b, -1, -1)
        prompt = self._embed(self.prompt_ids).unsqueeze(0).expand(b, -1, -1)
        return torch.cat([bos, prefix.to(dtype), prompt], dim=1)

    @staticmethod
    def _check_captions(captions: Any, b: int) -> list[str]:
        """One caption per window: the Pairing picked it (finetune/pairs.py, by window key)."""
        if (
            not isinstance(captions, (list, tuple))
            or len(captions) != b
            or not all(isinstance(c, str) for c in captions)
        ):
            raise ValueError(
                f"batch['captions'] must be a list of {b} strings (one per window), "
                f"got {type(captions).__name__}"
                + (f" of length {len(captions)}" if isinstance(captions, (list, tuple)) else "")
            )
        return list(captions)

    def teacher_forcing_inputs(
        self, tokens: Tensor, valid: Tensor | None, captions: list[str]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(inputs_embeds [B, S, H], attention_mask [B, S], labels [B, S]) for the LM.

        Captions are right-padded; padding is masked out of attention and of the labels.
        """
        eos = self.tokenizer.eos_token_id
        limit = self.config.max_caption_tokens - 1
        ids = [
            self.tokenizer(c, add_special_tokens=False)["input_ids"][:limit] + [eos]
            for c in captions
        ]
        length = max(len(x) for x in ids)
        device = tokens.device
        cap = torch.full((len(ids), length), self.pad_id, dtype=torch.long, device=device)
        cap_mask = torch.zeros(len(ids), length, dtype=torch.long, device=device)
        for i, x in enumerate(ids):
            cap[i, : len(x)] = torch.tensor(x, device=device)
            cap_mask[i, : len(x)] = 1
        context = self._context(tokens, valid)  # [B, S0, H]
        b, s0 = context.shape[:2]
        inputs = torch.cat([context, self._embed(cap)], dim=1)  # [B, S0 + L, H]
        mask = torch.cat([torch.ones(b, s0, dtype=torch.long, device=device), cap_mask], dim=1)
        ignore = torch.full((b, s0), -100, dtype=torch.long, device=device)
        labels = torch.cat([ignore, cap.masked_fill(cap_mask == 0, -100)], dim=1)
        return inputs, mask, labels

    # ---- head contract ------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: TextHeadConfig, encoder_dim: int, clip_dim: int) -> TextHead:
        return cls(config, encoder_dim)  # the captions are the target: no CLIP width needed

    def forward(
        self,
        tokens: Tensor,
        valid: Tensor | None,
        batch: dict,
        generator: torch.Generator | None = None,  # teacher forcing draws nothing random
    ) -> dict[str, Tensor]:
        if "captions" not in batch:
            raise ValueError("the text head needs batch['captions'] (list[str]) to train")
        captions = self._check_captions(batch["captions"], tokens.shape[0])
        inputs, mask, labels = self.teacher_forcing_inputs(tokens, valid, captions)
        out = self.lm(inputs_embeds=inputs, attention_mask=mask, labels=labels)
        loss = out.loss.float()
        return {"loss": loss, "text_loss": loss.detach()}

    @torch.no_grad()
    def generate(
        self,
        tokens: Tensor,
        valid: Tensor | None,
        max_new_tokens: int | None = None,
        greedy: bool = True,
        seed: int = 0,
    ) -> list[str]:
        """One caption per EEG input; greedy decoding is deterministic, sampling is seeded."""
        was_training = self.training
        self.eval()
        try:
            context = self._context(tokens, valid)
            mask = torch.ones(context.shape[:2], dtype=torch.long, device=context.device)
            with torch.random.fork_rng(devices=[context.device] if context.is_cuda else []):
                torch.manual_seed(seed)
                out = self.lm.generate(
                    inputs_embeds=context,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens or self.config.max_new_tokens,
                    do_sample=not greedy,
                    eos_token_id=self.tokenizer.eos_token_id,
                    pad_token_id=self.pad_id,
                )
        finally:
            self.train(was_training)
        # With inputs_embeds only, decoder-only generate returns just the new tokens.
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    @torch.no_grad()
    def reference(self, tokens: Tensor, valid: Tensor | None, batch: dict) -> Tensor:
        """The LM's teacher-forced logits [B, S, V] on the batch's captions."""
        captions = self._check_captions(batch["captions"], tokens.shape[0])
        inputs, mask, _ = self.teacher_forcing_inputs(tokens, valid, captions)
        return self.lm(inputs_embeds=inputs, attention_mask=mask).logits

    def decode(
        self, tokens: Tensor, valid: Tensor | None, num_images: int = 1, steps=None, seed: int = 0
    ) -> dict[str, list]:
        """What `brainmoe generate` writes: one greedy caption per window."""
        return {"caption": self.generate(tokens, valid)}

    def stimulus_tensors(self, stimuli, cache_root) -> dict[str, dict[str, Tensor]]:
        return {}  # the captions come with the stimulus set

    @staticmethod
    def check_saved(config: TextHeadConfig, folder: str | Path) -> None:
        """A saved text adapter fits only an LM of the width it was trained against."""
        path = Path(folder) / CONFIG_FILE
        if not path.is_file():
            raise ValueError(f"{folder} is not a text head adapter (no {CONFIG_FILE})")
        saved = read_json(path, REMEDY)["lm_hidden"]
        _, lm = _check_base(config.base, config.local_files_only)
        if int(lm.hidden_size) != int(saved):
            raise ValueError(
                f"the text adapter was built for an LM of width {saved}, but "
                f"text.base={config.base} has hidden size {lm.hidden_size}"
            )

    def trainable_state_dict(self) -> dict[str, Tensor]:
        state = {f"projector.{k}": v for k, v in self.projector.state_dict().items()}
        state.update({f"lora.{k}": v for k, v in get_peft_model_state_dict(self.lm).items()})
        return state

    def save_adapter(self, folder: str | Path) -> Path:
        """projector.safetensors + lora/ (peft format, loadable by PeftModel) + text_head.json."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()},
            str(folder / PROJECTOR_FILE),
        )
        self.lm.save_pretrained(str(folder / LORA_DIR))
        meta = {
            "head": "text",
            "format": FORMAT,
            "config": dataclasses.asdict(self.config),
            "encoder_dim": self.encoder_dim,
            "lm_hidden": self.lm_hidden,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        write_checksums(folder, [PROJECTOR_FILE, *LORA_FILES], CONFIG_FILE)
        return folder

    def load_adapter(self, folder: str | Path) -> None:
        """Load what :meth:`save_adapter` wrote; a ValueError if it was made for another shape."""
        folder = Path(folder)
        if not (folder / CONFIG_FILE).is_file():
            raise ValueError(f"{folder} is not a text head adapter (no {CONFIG_FILE})")
        meta = read_json(folder / CONFIG_FILE, REMEDY)
        if meta.get("format", 1) != FORMAT:
            raise ValueError(
                f"adapter in {folder} has the text head format {meta.get('format', 1)}, this "
                f"brainmoe reads format {FORMAT} (the projector became the shared resampler in "
                "format 2); finetune the text head again"
            )
        saved = meta["config"]
        if meta["lm_hidden"] != self.lm_hidden:
            raise ValueError(
                f"adapter in {folder} was trained on an LM with hidden size {meta['lm_hidden']} "
                f"({saved['base']}), this head's base {self.config.base} has {self.lm_hidden}; "
                "load it onto the base it was trained on"
            )
        for key in ("prefix_tokens", "lora_rank", "lora_targets"):
            if saved[key] != getattr(self.config, key):
                raise ValueError(
                    f"adapter in {folder} has {key}={saved[key]}, this head has "
                    f"{getattr(self.config, key)}; build the head with the adapter's config"
                )
        if meta["encoder_dim"] != self.encoder_dim:
            raise ValueError(
                f"adapter in {folder} expects encoder width {meta['encoder_dim']}, "
                f"this head has {self.encoder_dim}"
            )
        verify_checksums(folder, CONFIG_FILE, REMEDY)  # damaged bytes would load silently
        self.projector.load_state_dict(load_safetensors(folder / PROJECTOR_FILE, remedy=REMEDY))
        lora = load_safetensors(folder / LORA_FILES[0], remedy=REMEDY)
        result = set_peft_model_state_dict(self.lm, lora)
        assert not result.unexpected_keys, result.unexpected_keys

    def base_models(self) -> dict[str, str]:
        return {"lm": self.config.base}
