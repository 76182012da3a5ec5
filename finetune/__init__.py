"""Generation heads on the pretrained EEG encoder: EEG->image, EEG->text, EEG<->CLIP retrieval.

Layout (one job per file):
    stimuli.py      what each stimulus id is: image file, label, captions (and the synthetic
                    source's rendered stimulus set)
    clip_cache.py   Ray job: CLIP image/text embeddings of the stimuli, once, beside the shards
    splits.py       leak-free train/test splits by stimulus or concept (and subject)
    pairs.py        EEG windows from the shards joined to their stimulus embeddings
    heads/          image (Stable Diffusion + LoRA), text (causal LM + LoRA), retrieval
    multitask.py    how the heads' losses are combined (learned task gate, uncertainty)
    metrics.py      retrieval accuracy, caption BLEU/ROUGE, CLIP similarity, n-way semantic
    tiny/           tiny random-weight base models built from configs (tests, demo, bench)
"""
