"""Finetuning step time and memory per head and for all heads together, with what trains.

    python bench/finetune.py                      # tiny random-weight bases, CPU here
    python bench/finetune.py image.base=stable-diffusion-v1-5/stable-diffusion-v1-5 \
        text.base=meta-llama/Llama-3.2-1B-Instruct --clip-dim 768 --encoder base   # on a GPU

What is measured, and why: a finetuning step pays for the encoder (adapted by LoRA, frozen
or fully trained), each head's frozen base model (the UNet for image, the LM for text) and
the few parameters that train. Measuring each head alone and the three together shows which
head dominates a multi-task step, and whether the multi-task step costs more than the sum
of its heads (it should cost less: the encoder runs once). The trainable-parameter split is
what a saved adapter holds, next to the total the process must keep in memory.

The batch is synthetic but in the paired loader's format: reader-collated EEG (a mix of
montages, so the encoder sees padding), CLIP embeddings of the CLIP width, VAE latents
from the image head's own `encode_latents`, and synthetic captions. Each configuration
runs in its own process so that its peak memory is its own. The loop is the trainer's step
without DeepSpeed: forward, backward, AdamW on the trainable parameters only (plus the
router-bias update when the encoder's experts train).

Figures go to the "Finetuning" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.results import write_section  # noqa: E402
from bench.timing import timed_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs/finetune/tiny.yaml"
# (name, tasks, encoder.train): each head alone, then all three, with the encoder adapted
# the three ways that differ in what trains.
CONFIGS = [
    ("retrieval", ["retrieval"], "lora"),
    ("image", ["image"], "lora"),
    ("text", ["text"], "lora"),
    ("multitask", ["retrieval", "image", "text"], "lora"),
    ("multitask", ["retrieval", "image", "text"], "frozen"),
    ("multitask", ["retrieval", "image", "text"], "full"),
]
TASKS = ["retrieval", "image", "text"]
BASE_KEYS = ("image.base", "text.base")  # overrides that name real bases instead of tiny ones
# 19 channels of 10-20, then 13 of 10-10 up to 32: every name is on the 10-05 template.
CHANNELS = [
    *["Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz", "C4", "T8", "P7", "P3"],
    *["Pz", "P4", "P8", "O1", "O2"],
    *["AF3", "AF4", "FC5", "FC1", "FC2", "FC6", "CP5", "CP1", "CP2", "CP6", "PO3", "PO4", "Oz"],
]
SFREQ = 200.0


def eeg_samples(b: int, max_channels: int, seconds: float) -> list[dict[str, Any]]:
    """Reader-format samples (as finetune/inputs.py builds them) with 19..max_channels
    channels, so the collated batch is padded like a mixed-montage one."""
    from finetune.synthetic_stimuli import MAX_CLASSES, MAX_INSTANCES
    from shards.channels import standard_positions
    from shards.sample import window_sample

    positions = standard_positions()
    rng = np.random.default_rng(0)
    t = round(seconds * SFREQ)
    samples = []
    for i in range(b):
        c = 19 + (i * (max_channels - 19)) // max(1, b - 1)  # [19, max_channels]
        names = CHANNELS[:c]
        k, inst = i % MAX_CLASSES, (i // MAX_CLASSES) % MAX_INSTANCES
        pos = np.stack([positions[n] for n in names]).astype(np.float32)
        eeg = (20 * rng.standard_normal((c, t))).astype(np.float32)  # [C, T] uV
        samples.append(
            window_sample(
                eeg,
                names,
                pos,
                SFREQ,
                key=f"bench_w{i:06d}",
                shard="synthetic",
                label=str(k),
                stimulus_id=f"synthetic:c{k:02d}:i{inst:02d}",
                meta={"start_s": 0.0},
            )
        )
    return samples


def paired_batch(model: torch.nn.Module, args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The reader batch plus what finetune/pairs.py joins to it: CLIP embeddings, captions,
    latents (only the fields the model's heads read)."""
    from finetune.synthetic_stimuli import parse_synthetic_id, synthetic_captions
    from shards.sample import collate_eeg

    batch = collate_eeg(eeg_samples(args.batch, args.channels, args.seconds))
    g = torch.Generator().manual_seed(1)
    for key in ("clip_image", "clip_text"):  # [B, Dc], L2-normalised as the CLIP cache's
        x = torch.randn(args.batch, args.clip_dim, generator=g)
        batch[key] = torch.nn.functional.normalize(x, dim=-1)
    batch["captions"] = [
        synthetic_captions(*parse_synthetic_id(s))[0] for s in batch["stimulus_id"]
    ]
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
    if "image" in model.heads:  # what the latent cache would hold: the VAE's own latents
        head = model.heads["image"]
        pixels = torch.rand(args.batch, 3, head.image_size, head.image_size, generator=g)
        batch["latents"] = head.encode_latents(2 * pixels - 1).to(device)  # [B, 4, h, w]
    return batch


def count(module: torch.nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def reset_peak_rss() -> float:
    """Restart the process's peak-RSS count (Linux) and return the RSS now, MiB.

    The imports' transient peak (~1 GiB) is above what a tiny model adds, so the lifetime
    peak (``ru_maxrss``, what bench/pretrain.py reads) would hide it; Linux lets a process
    reset its high-water mark by writing 5 to /proc/self/clear_refs.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the lifetime peak, which may hide small models
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return _proc_status("VmRSS")


def peak_rss() -> float:
    try:
        return _proc_status("VmHWM")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status(field: str) -> float:
    """A ``kB`` line of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def run_one(name: str, args: argparse.Namespace) -> dict:
    """One configuration, timed in this process (called in a child process)."""
    # Every heavy import before the RSS baseline, so the peak is the model and training only.
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from finetune.config import FinetuneConfig
    from finetune.model import build_model
    from shards.channels import standard_positions
    from shards.config import load_config

    standard_positions()
    tasks, train = args.tasks.split(","), args.train
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    overrides = [
        f"tasks=[{','.join(tasks)}]",
        f"encoder.train={train}",
        "weighting.mode=uncertainty",
        *args.overrides,
    ]
    cfg = load_config(FinetuneConfig, TINY_CONFIG, overrides)
    rss_before = reset_peak_rss()

    torch.manual_seed(0)
    model = build_model(cfg, Path(args.workdir) / "encoder", args.clip_dim).to(device)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4)
    batch = paired_batch(model, args, device)
    gen = torch.Generator().manual_seed(0)  # timesteps, noise, null-context dropout
    experts_train = train in ("top", "full")

    def step() -> torch.Tensor:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            out = model(batch, generator=gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if experts_train:
            model.encoder.update_router_bias()
        return out["loss"].detach()

    for _ in range(args.warmup):
        loss = float(step())
        if not np.isfinite(loss):
            raise RuntimeError(f"{name} ({train}): non-finite loss {loss} in warm-up")
    times = timed_steps(step, args.steps, device)
    wall = statistics.median(times)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # what building the model and training added to the RSS after the imports
        peak = peak_rss() - rss_before
    return {
        "name": name,
        "train": train,
        "tasks": tasks,
        "device": device,
        "trainable": {
            "encoder": count(model.encoder),
            **{task: count(head) for task, head in model.heads.items()},
            "weighting": count(model.weighting),
        },
        "trainable_total": sum(p.numel() for p in trainable),
        "total_params": count(model, trainable=False),
        "step_s": wall,
        "step_min_s": min(times),
        "samples_per_s": args.batch / wall,
        "peak_mib": peak,
    }


def prepare(workdir: Path, args: argparse.Namespace) -> list[str]:
    """The encoder folder, and tiny random-weight SD and LM bases unless the overrides name
    real ones; -> the overrides pointing the config at what was built."""
    from pretrain.encoder import Encoder
    from pretrain.encoder_config import get_config

    torch.manual_seed(0)
    Encoder(get_config(args.encoder, spectral_bands=16)).save_pretrained(workdir / "encoder")
    named = {o.split("=", 1)[0] for o in args.overrides}
    out = []
    if "image.base" not in named:
        from finetune.tiny.diffusion import build_tiny_sd

        out.append(f"image.base={build_tiny_sd(workdir / 'sd')}")
    if "text.base" not in named:
        from finetune.synthetic_stimuli import MAX_CLASSES, MAX_INSTANCES, synthetic_captions
        from finetune.tiny.llm import build_tiny_llm

        corpus = [
            c
            for k in range(MAX_CLASSES)
            for i in range(MAX_INSTANCES)
            for c in synthetic_captions(k, i)
        ]
        out.append(f"text.base={build_tiny_llm(workdir / 'llm', corpus=corpus)}")
    return out


def report(results: list[dict], args: argparse.Namespace, bases: str, load: float) -> str:
    device = next((r["device"] for r in results if "device" in r), "cpu")
    timed = [r for r in results if "step_s" in r]
    singles = [r["step_s"] for r in timed if len(r["tasks"]) == 1 and r["train"] == "lora"]
    multi = next((r for r in timed if len(r["tasks"]) > 1 and r["train"] == "lora"), None)
    lines = [
        f"Finetuning step (forward + backward + AdamW on the trainable parameters; median of "
        f"{args.steps} steps after {args.warmup} warm-up), one process per row on {device}, "
        f"{'bf16 autocast' if device == 'cuda' else 'fp32'}; batch {args.batch} windows of "
        f"19-{args.channels} channels x {args.seconds:g} s at 200 Hz, collated by the reader "
        f"(padded to {args.channels}), with CLIP embeddings (Dc={args.clip_dim}), VAE latents "
        f"and captions as the paired loader adds them. Encoder: `{args.encoder}` "
        f"(pretrain/encoder.py); bases: {bases}; configs/finetune/tiny.yaml otherwise, "
        "uncertainty task weighting.",
        "",
        "| heads | encoder.train | trainable: encoder | retrieval | image | text | weighting "
        "| trainable total | params total | step ms (min) | samples/s | "
        + ("peak MiB (CUDA allocated) |" if device == "cuda" else "peak MiB (RSS above imports) |"),
        "| --- | --- |" + " ---: |" * 10,
    ]
    for r in results:
        if "step_s" not in r:
            lines.append(f"| {r['name']} | {r['train']} | failed: {r['error'][:80]} |" + " |" * 9)
            continue
        split = r["trainable"]
        cells = [f"{split[k]:,}" if k in split else "-" for k in ("encoder", *TASKS)]
        lines.append(
            f"| {r['name']} | {r['train']} | "
            + " | ".join(cells)
            + f" | {split['weighting']:,} | {r['trainable_total']:,} "
            f"| {r['total_params'] / 1e6:.2f}M "
            f"| {1e3 * r['step_s']:.0f} ({1e3 * r['step_min_s']:.0f}) "
            f"| {r['samples_per_s']:.1f} | {r['peak_mib']:.0f} |"
        )
    if multi and len(singles) == len(TASKS):
        lines += [
            "",
            f"The multitask step (encoder LoRA) takes {1e3 * multi['step_s']:.0f} ms against "
            f"{1e3 * sum(singles):.0f} ms for the three heads run one by one, each of which "
            "pays for the encoder's forward and backward again.",
        ]
    lines += [
        "",
        "Trainable counts are what a saved adapter holds (encoder LoRA or blocks, each head's "
        "projectors and LoRA, the task log-variances; - = head not in the run); params total "
        "includes the frozen encoder and base models the process keeps in memory.",
    ]
    if device != "cuda":
        lines += [
            "",
            f"1-minute load average at the start: {load:.1f} on {os.cpu_count()} CPUs "
            f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}, so a busy CPU "
            "slows a step in proportion rather than many-fold). No GPU on this machine: CUDA "
            "runs use bf16 autocast and report the CUDA allocator's peak.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32, help="most channels (19..32)")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--encoder", default="tiny", help="pretrain.encoder config name")
    parser.add_argument(
        "--clip-dim", type=int, default=0, help="Dc; 0: the tiny CLIP's (finetune/tiny/clip.py)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tasks", help=argparse.SUPPRESS)
    parser.add_argument("--train", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="key=value finetune config overrides")
    args = parser.parse_args()
    if not 19 <= args.channels <= len(CHANNELS):
        raise ValueError(f"--channels must be in [19, {len(CHANNELS)}], got {args.channels}")
    if args.batch < 2:
        raise ValueError(f"--batch must be >= 2 (retrieval's contrastive loss), got {args.batch}")
    if args.clip_dim == 0:
        from finetune.tiny.clip import tiny_clip_config

        args.clip_dim = tiny_clip_config()["model_cfg"]["embed_dim"]
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return
    from finetune.config import FinetuneConfig
    from shards.config import load_config

    load_config(FinetuneConfig, TINY_CONFIG, args.overrides)  # a bad override fails here, now

    with tempfile.TemporaryDirectory(prefix="brainmoe-bench-finetune-") as tmp:
        workdir = Path(tmp)
        built = prepare(workdir, args)
        given = {k: v for k, v in (o.split("=", 1) for o in args.overrides) if k in BASE_KEYS}
        bases = (
            ", ".join(
                f"{key.split('.')[0]} " + (f"`{given[key]}`" if key in given else "tiny")
                for key in BASE_KEYS
            )
            if given
            else "tiny random-weight SD and LM (finetune/tiny/)"
        )
        passthrough = [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k in ("batch", "channels", "seconds", "steps", "warmup", "encoder", "clip_dim")
        ]
        load = os.getloadavg()[0]
        env = dict(os.environ)
        if not torch.cuda.is_available():
            # OpenMP threads that spin while waiting make a step on a CPU shared with other
            # jobs up to 100x slower, at random; threads that sleep make it steady.
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        results = []
        for name, tasks, train in CONFIGS:
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    f"--child={name}",
                    f"--tasks={','.join(tasks)}",
                    f"--train={train}",
                    f"--workdir={workdir}",
                    *passthrough,
                    *args.overrides,
                    *built,
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            if proc.returncode != 0:
                print(proc.stderr[-2000:], file=sys.stderr)
                error = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                results.append({"name": name, "train": train, "error": error})
                continue
            results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(results[-1], flush=True)

    body = report(results, args, bases, load)
    write_section("Finetuning", body)
    print(body)


if __name__ == "__main__":
    main()
