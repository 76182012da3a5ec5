"""Heads attach small trainable parts (projectors, LoRA adapters) to the encoder's tokens.

The contract every head keeps (the trainer, the registry and the tests rely on it):

    head = XHead(config, encoder_dim=D)      # loads its frozen base model(s) named in config
    out = head(tokens, valid, batch)         # tokens [B, N, D], valid [B, N] bool
                                             # -> {"loss": scalar tensor, other named scalars}
    head.trainable_state_dict()              # only what was trained: adapters + projectors
    head.save_adapter(folder); head.load_adapter(folder)
    head.base_models()                       # {"unet": hub id or path, ...} for lineage tags

Batch fields the paired loader provides next to the EEG (see finetune/pairs.py):
    clip_image [B, Dc] float32, clip_text [B, Dc] float32  (precomputed, L2-normalised)
    latents [B, 4, h, w] float32 (precomputed VAE latents, optional) or pixels [B, 3, H, W]
    captions list[str], stimulus_id list[str], concept list[str]

Heads are plain PyTorch / diffusers / transformers / peft: they never import deepspeed,
ray or mlflow.
"""
