"""A tiny random-weight Llama and a word-level tokenizer, saved like a hub checkpoint.

Why word level: the tokenizer must be built offline (no hub download), and one token per
word keeps the text head's overfit tests short and readable. The special tokens mirror
Llama's roles (bos prepended on encode, eos ends a caption, pad for batching, unk for words
outside the vocabulary), so the head's code path is the one a real Llama takes.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3 in this order

# Words every tiny tokenizer knows: the default prompt and common caption words, so a
# tokenizer built without a corpus still encodes typical captions without <unk>.
DEFAULT_VOCABULARY = """
describe the image person saw : a an of on in with and is are at to by for from near
photo picture close up view two three some small large big red green blue yellow black white
brown orange dog cat bird horse fish car bus train plane boat bicycle tree flower house
building street road water sky grass field beach mountain table chair food fruit apple banana
man woman child people face hand ball toy cup bottle book computer phone clock lamp bed
sitting standing running flying lying holding eating walking object animal plant tool
. ,
"""


def build_tokenizer(corpus: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A lowercase word-level tokenizer over ``corpus`` plus :data:`DEFAULT_VOCABULARY`."""
    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits words from punctuation
    trainer = trainers.WordLevelTrainer(special_tokens=SPECIAL_TOKENS, min_frequency=1)
    tok.train_from_iterator([DEFAULT_VOCABULARY, *(corpus or [])], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(  # like Llama: bos first
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def build_tiny_llm(
    folder: str | Path,
    corpus: list[str] | None = None,
    hidden: int = 48,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Write a random-weight ``LlamaForCausalLM`` and its tokenizer to ``folder``.

    Loadable with ``AutoTokenizer.from_pretrained(folder)`` and
    ``AutoModelForCausalLM.from_pretrained(folder)``; returns ``folder``.
    """
    import torch

    folder = Path(folder)
    tokenizer = build_tokenizer(corpus)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
