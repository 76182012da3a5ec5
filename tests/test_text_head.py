"""The text head on a tiny random Llama loaded by path: what trains, what is supervised,
that it learns two captions, and that adapters round-trip and refuse the wrong base."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, CLIPVisionConfig

from finetune.heads.text import TextHead, TextHeadConfig
from finetune.tiny.llm import build_tiny_llm

D = 16  # encoder width
CAPTIONS = ["a red apple on a table", "a dog running on the beach"]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return build_tiny_llm(tmp_path_factory.mktemp("tiny_llm"), corpus=CAPTIONS)


def _head(base, **kw) -> TextHead:
    torch.manual_seed(0)
    return TextHead(TextHeadConfig(base=str(base), prefix_tokens=4, **kw), encoder_dim=D)


def _eeg() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(2, 6, D, generator=gen)  # [B, N, D]
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[1, 4:] = False
    return tokens, valid


@pytest.fixture(scope="module")
def trained(tiny_lm):
    """A head trained for 30 steps on two (EEG, caption) pairs, and its loss curve."""
    head = _head(tiny_lm)
    tokens, valid = _eeg()
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(30):
        out = head(tokens, valid, {"captions": CAPTIONS})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["text_loss"].item())
    return head, losses


def test_tiny_lm_loads_by_path(tiny_lm):
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm)
    ids = tokenizer(CAPTIONS[0])["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == CAPTIONS[0]
    assert model.config.vocab_size == len(tokenizer)


def test_only_lora_and_projector_train(tiny_lm):
    head = _head(tiny_lm)
    trainable = [n for n, p in head.named_parameters() if p.requires_grad]
    frozen = [n for n, p in head.named_parameters() if not p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("projector.") for n in trainable)
    assert any("lora_" in n for n in trainable) and any("embed_tokens" in n for n in frozen)
    n_lora = sum("lora_" in n for n in trainable)
    assert n_lora == 2 * 7 * 2, f"{n_lora} LoRA matrices, expected A+B x 7 targets x 2 layers"
    state = head.trainable_state_dict()
    assert all(k.startswith(("projector.", "lora.")) for k in state)
    assert head.base_models() == {"lm": str(tiny_lm)}


def test_teacher_forcing_supervises_only_the_caption(tiny_lm):
    head = _head(tiny_lm, max_caption_tokens=5)
    tokens, valid = _eeg()
    captions = ["a dog", "a red apple on a table"]  # the second is cut to 4 words + eos
    inputs, mask, labels = head.teacher_forcing_inputs(tokens, valid, captions)
    tok = head.tokenizer
    context = (
        1
        + 4
        + len(tok("Describe the image the person saw:", add_special_tokens=False)["input_ids"])
    )  # bos + k prefix + prompt
    assert inputs.shape == (2, context + 5, head.lm_hidden)
    assert (labels[:, :context] == -100).all()
    eos = tok.eos_token_id
    assert labels[0, context:].tolist() == tok("a dog", add_special_tokens=False)["input_ids"] + [
        eos,
        -100,
        -100,
    ]
    assert mask[0].tolist() == [1] * (context + 3) + [0, 0]  # padding is not attended
    long = tok("a red apple on", add_special_tokens=False)["input_ids"]
    assert labels[1, context:].tolist() == long + [eos] and mask[1].all()
    # one caption per window: the Pairing picked it (by window key) before the head
    with pytest.raises(ValueError, match="one per window"):
        head(tokens, valid, {"captions": [["x y", "z"], "w"]})
    with pytest.raises(ValueError, match="captions"):
        head(tokens, valid, {"captions": ["only one"]})


def test_loss_falls_and_greedy_output_is_each_caption(trained):
    head, losses = trained
    assert losses[-1] < 0.5 * losses[0], f"text loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    tokens, valid = _eeg()
    first = head.generate(tokens, valid, max_new_tokens=10)
    assert first == head.generate(tokens, valid, max_new_tokens=10)  # greedy is deterministic
    assert first == CAPTIONS, f"greedy captions {first} after 30 steps, expected {CAPTIONS}"
    sampled = head.generate(tokens, valid, max_new_tokens=6, greedy=False, seed=3)
    assert len(sampled) == 2 and all(isinstance(s, str) for s in sampled)
    assert sampled == head.generate(tokens, valid, max_new_tokens=6, greedy=False, seed=3)


def test_save_load_gives_identical_outputs(trained, tiny_lm, tmp_path):
    head, _ = trained
    head.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "lora" / "adapter_config.json").is_file()  # peft's format
    fresh = _head(tiny_lm)
    tokens, valid = _eeg()
    batch = {"captions": CAPTIONS}
    head.eval()
    fresh.eval()
    assert fresh(tokens, valid, batch)["loss"] != head(tokens, valid, batch)["loss"]
    fresh.load_adapter(tmp_path / "adapter")
    torch.testing.assert_close(
        fresh(tokens, valid, batch)["loss"], head(tokens, valid, batch)["loss"], rtol=0, atol=0
    )
    assert fresh.generate(tokens, valid, max_new_tokens=10) == CAPTIONS


def test_adapter_for_another_hidden_size_is_refused(trained, tmp_path):
    head, _ = trained
    head.save_adapter(tmp_path / "adapter48")
    other_lm = build_tiny_llm(tmp_path / "lm32", corpus=CAPTIONS, hidden=32)
    other = _head(other_lm)
    with pytest.raises(ValueError, match="hidden size 48"):
        other.load_adapter(tmp_path / "adapter48")


def test_an_adapter_of_the_old_projector_format_is_refused(trained, tiny_lm, tmp_path):
    head, _ = trained
    folder = head.save_adapter(tmp_path / "old")
    meta = json.loads((folder / "text_head.json").read_text())
    del meta["format"]  # what the single-attention projector's adapters held
    (folder / "text_head.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="text head format 1.*finetune the text head again"):
        _head(tiny_lm).load_adapter(folder)


def test_bad_bases_fail_before_loading(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        _head(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        _head(tmp_path / "empty")
    CLIPVisionConfig().save_pretrained(tmp_path / "vision")
    with pytest.raises(ValueError, match="not a causal LM"):
        _head(tmp_path / "vision")
