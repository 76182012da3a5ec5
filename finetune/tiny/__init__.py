"""Tiny random-weight base models built from configs and saved to a folder, so the real
`from_pretrained(path)` loading code runs in tests, the demo and benchmarks with nothing
downloaded (as diffusers' and transformers' own tests do). One module per kind of base:
clip.py (open_clip), diffusion.py (UNet + VAE + scheduler), llm.py (causal LM + tokenizer).
"""
