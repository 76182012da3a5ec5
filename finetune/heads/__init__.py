"""Heads attach small trainable parts (projectors, LoRA adapters) to the encoder's tokens.

Every head is listed once, in registry.py (task name -> head class, config, evaluation), and
keeps the protocol written there; the model, the trainer, the evaluation, the report,
`brainmoe generate` and the contract test (tests/test_head_contract.py) go through it.
In short:

    head = XHead.from_config(config, encoder_dim=D, clip_dim=Dc)  # loads its frozen bases
    out = head(tokens, valid, batch, generator=None)  # tokens [B, N, D], valid [B, N] bool
                                                      # -> {"loss": scalar, other scalars}
    head.trainable_state_dict()              # only what was trained: adapters + projectors
    head.save_adapter(folder); head.load_adapter(folder)
    head.base_models()                       # {"unet": hub id or path, ...} for lineage tags

Every head reads the tokens through the same learned-query resampler (resampler.py).

Batch fields the paired loader provides next to the EEG (see finetune/pairs.py):
    clip_image [B, Dc] float32, clip_text [B, Dc] float32  (precomputed, L2-normalised)
    latents [B, 4, h, w] float32 (precomputed VAE latents, optional) or pixels [B, 3, H, W]
    captions list[str] (one per window), stimulus_id list[str], concept list[str]

Heads are plain PyTorch / diffusers / transformers / peft: they never import deepspeed,
ray or mlflow.
"""
