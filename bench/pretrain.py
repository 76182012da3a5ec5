"""Pretraining throughput in EEG channel-seconds per second, against a channel-mixing MAE.

    python bench/pretrain.py            # CPU here; on a GPU machine it also reports MFU

What is measured, and why. Users compare pretraining cost in signal processed, not tokens:
**channel-seconds per second** = real (unpadded) channels x seconds of signal per wall
second of training step (forward + backward + AdamW). brainmoe (one token per channel x 1 s,
the `configs/pretrain/eegmmidb-cpu.yaml` objective) runs dense and MoE at 19, 32, 64 and 128
channels: as the design was before (BERT mask tokens: the encoder sees every token, padded)
and now (MAE: visible tokens only, packed), in fp32 and bf16 autocast, and with the
encoder shown a fifth of the patches (`HIGH_MASK`, an option of the recipe); a mixed-montage
batch (19/32/64 together) packed vs padded; and DreamDiffusion's design, a channel-mixing MAE
(bench/channel_mix_mae.py: one token = all 128 channels x 4 samples, 75% dropped) at equal
encoder parameters. Model FLOPs come from torch's FlopCounterMode on one step; the achieved
fraction is against a large GEMM's rate measured in the same run. Each row runs in its own
process so its peak memory is its own; each ratio of the targets is measured again with its
two rows in one process, their steps alternating, since rows minutes apart on a shared VM moved
by up to a fifth between runs. The MoE's FFN overhead is also measured alone.

Figures go to the "Pretraining" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from bench.results import write_section  # noqa: E402
from bench.timing import timed_steps  # noqa: E402
from pretrain.encoder_config import EncoderConfig, dense_variant
from pretrain.moe import MoE, SwiGLU  # noqa: E402
from pretrain.msm import MaskedSignalModel, MSMConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs/pretrain/eegmmidb-cpu.yaml"
# The MoE under test: 8 experts, top-2 (+1 shared); the dense twin has equal active params.
CPU_MOE = EncoderConfig(
    dim=128, depth=4, heads=4, ffn_hidden=256, n_experts=8, top_k=2, n_shared_experts=1
)
GPU_MOE = EncoderConfig(
    dim=512, depth=12, heads=8, ffn_hidden=512, n_experts=8, top_k=2, n_shared_experts=1
)  # the `base` config
# Dense bf16 peak (TFLOP/s) of GPUs we may be lent, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}
SECONDS = 4.0
SFREQ = 200.0


# The recipe with the encoder shown a fifth of the patches (issue 12's FLOP lever: the encoder
# is three quarters of a step's forward FLOPs; learning figures in RESULTS "MOABB")
HIGH_MASK = {"mask_ratio": 0.8, "block_random_ratio": 0.75}
# The decoder's attention split into channel and time heads (pretrain/criss_cross.py)
CRISS_CROSS_LABEL = "criss-cross decoder"


def recipe_msm(
    encoder: EncoderConfig, encoder_input: str, packing: bool, overrides: dict | None = None
) -> MSMConfig:
    """The recipe's objective (masking, decoder paths) on ``encoder``'s size."""
    cfg = yaml.safe_load(RECIPE.read_text())
    arch = {
        k: v
        for k, v in cfg["model"]["overrides"].items()
        if k in ("input_norm", "spatial_bias", "learn_spatial_slopes")
    }
    enc = dataclasses.replace(encoder, **arch, packing=packing)
    msm = {**cfg["msm"], "encoder_input": encoder_input, **(overrides or {})}
    return MSMConfig(encoder=enc, **msm)


def eeg_batch(channels: list[int], device: str) -> dict:
    """Reader-collated windows (the one sample type), `channels[i]` channels for sample i."""
    from shards.channels import standard_positions
    from shards.sample import collate_eeg, window_sample

    pos = standard_positions()
    names = [n for n in pos if not n.startswith(("LPA", "RPA", "Nz"))]
    rng = np.random.default_rng(0)
    t = round(SECONDS * SFREQ)
    samples = []
    for i, c in enumerate(channels):
        picked = names[:: max(1, len(names) // c)][:c]
        assert len(picked) == c, (c, len(names))
        eeg = (20 * rng.standard_normal((c, t))).astype(np.float32)
        xyz = np.stack([pos[n] for n in picked]).astype(np.float32)
        samples.append(window_sample(eeg, picked, xyz, SFREQ, key=str(i)))
    batch = collate_eeg(samples)
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


def build_step(spec: dict, device: str) -> tuple[Callable[[], None], int]:
    """One configuration's training step (forward + backward + AdamW) and its encoder's
    active parameter count."""
    torch.manual_seed(0)
    base = GPU_MOE if device == "cuda" else CPU_MOE
    enc = dense_variant(base) if spec["model"] == "dense" else base
    channels = spec["channels"]
    if spec["model"] == "channel-mix":
        from bench.channel_mix_mae import matched

        dense_params = MaskedSignalModel(recipe_msm(dense_variant(base), "visible", True))
        target = dense_params.encoder.num_parameters()["active"]
        model = matched(target, dim=enc.dim, depth=enc.depth, heads=enc.heads).to(device)
        encoder_params = model.encoder_parameters()
        eeg = eeg_batch(channels, device)["eeg"]

        def forward(gen):
            return model(eeg, generator=gen)

    else:
        msm = recipe_msm(enc, spec["encoder_input"], spec["packing"], spec.get("msm"))
        model = MaskedSignalModel(msm).to(device)
        encoder_params = model.encoder.num_parameters()["active"]
        data = eeg_batch(channels, device)

        def forward(gen):
            return model(data, generator=gen)["loss"]

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # as the trainer's
    gen = torch.Generator().manual_seed(0)
    if spec.get("compile"):  # the forward only: optimizer and router update stay eager
        compiled = torch.compile(model, dynamic=True)
        forward = (
            (lambda gen: compiled(eeg, generator=gen))
            if spec["model"] == "channel-mix"
            else (lambda gen: compiled(data, generator=gen)["loss"])
        )
    bf16 = spec["precision"] == "bf16"

    def step() -> None:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = forward(gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(model, "encoder"):
            model.encoder.update_router_bias()

    return step, encoder_params


def run_one(spec: dict, args: argparse.Namespace) -> dict:
    """One configuration, timed in this process (called in a child process)."""
    import resource

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch imported
    step, encoder_params = build_step(spec, device)
    channels = spec["channels"]
    for _ in range(args.warmup):
        step()
    flops = model_flops(step)
    times = timed_steps(step, args.steps, device)
    wall = statistics.median(times)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # what training added to the process's peak RSS (torch itself is ~0.8 GiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    channel_seconds = sum(channels) * SECONDS
    result = {
        **spec,
        "device": device,
        "encoder_params": encoder_params,
        "step_s": wall,
        "ch_s_per_s": channel_seconds / wall,
        "flops_per_ch_s": flops / channel_seconds,
        "flops_per_s": flops / wall,
        "peak_mib": peak,
    }
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak_tflops:
            result["mfu"] = flops / wall / (peak_tflops * 1e12)
    return result


def run_pair(specs_ab: list[dict], args: argparse.Namespace) -> dict:
    """Two configurations in one process, their steps alternating: the speed ratio of a over b
    (channel-seconds per second) with the machine's drift shared by both. Rows run one per
    process minutes apart moved by up to a fifth between runs on a shared 2-core VM."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = [build_step(spec, device)[0] for spec in specs_ab]
    for step in steps:
        for _ in range(args.warmup):
            step()
    times: list[list[float]] = [[], []]
    for _ in range(2 * args.steps):
        for i, step in enumerate(steps):
            times[i] += timed_steps(step, 1, device)
    a, b = (statistics.median(t) for t in times)
    ch_a, ch_b = (sum(spec["channels"]) for spec in specs_ab)
    return {"a_ms": 1e3 * a, "b_ms": 1e3 * b, "ratio": (ch_a / a) / (ch_b / b)}


def gemm_peak(dtype: torch.dtype, device: str, n: int = 2048, reps: int = 10) -> float:
    """FLOP/s of an n x n matmul in ``dtype``: the machine's practical peak."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(3):
        a @ b
    times = timed_steps(lambda: a @ b, reps, device)
    return 2 * n**3 / min(times)


def ffn_overhead(args: argparse.Namespace) -> list[dict]:
    """The FFN alone, forward + backward on the same tokens: MoE backends vs dense."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = GPU_MOE if device == "cuda" else CPU_MOE
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    n = args.batch * args.channels * round(args.seconds / cfg.patch_seconds)
    x = torch.randn(n, cfg.dim, device=device, dtype=dtype, requires_grad=True)
    dense_width = (cfg.top_k + cfg.n_shared_experts) * cfg.ffn_hidden
    layers = {"dense SwiGLU": SwiGLU(cfg.dim, dense_width)}
    for backend in ("loop", "grouped_mm"):
        layers[f"MoE ({backend})"] = MoE(
            cfg.dim, cfg.ffn_hidden, cfg.n_experts, cfg.top_k, cfg.n_shared_experts, backend=backend
        )
    rows = []
    for name, layer in layers.items():
        layer = layer.to(device, dtype)

        def run(layer=layer) -> None:
            out = layer(x)
            y = out[0] if isinstance(out, tuple) else out
            y.float().pow(2).mean().backward()

        try:
            for _ in range(3):
                run()
            if device == "cuda":
                torch.cuda.synchronize()
            times = []
            for _ in range(args.steps * 2):
                start = time.perf_counter()
                run()
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
            rows.append({"layer": name, "ms": 1e3 * statistics.median(times)})
        except (RuntimeError, NotImplementedError) as err:  # grouped_mm absent on this build
            rows.append({"layer": name, "ms": None, "error": str(err).splitlines()[0][:80]})
    return rows


def specs(batch: int) -> list[dict]:
    """Every row of the table: (label, child spec)."""
    rows = []

    def add(label, model, channels, encoder_input="visible", packing=True, precision="fp32", **kw):
        spec = dict(model=model, channels=channels, encoder_input=encoder_input, **kw)
        rows.append((label, {**spec, "packing": packing, "precision": precision}))

    for c in (19, 32, 64, 128):
        add(
            f"channel-mixing MAE (DreamDiffusion), {c} ch padded to 128", "channel-mix", [c] * batch
        )
        for model in ("dense", "moe"):
            add(f"brainmoe {model}, {c} ch, before (mask tokens)", model, [c] * batch, "all", False)
            add(f"brainmoe {model}, {c} ch, MAE", model, [c] * batch)
            add(
                f"brainmoe {model}, {c} ch, MAE, bf16 autocast",
                model,
                [c] * batch,
                precision="bf16",
            )
    for c in (32, 128):
        for model in ("dense", "moe"):
            add(f"brainmoe {model}, {c} ch, MAE, 80% mask", model, [c] * batch, msm=HIGH_MASK)
    for c in (32, 128):
        for model in ("dense", "moe"):
            for label, msm in (("MAE", {}), ("MAE, 80% mask", HIGH_MASK)):
                add(
                    f"brainmoe {model}, {c} ch, {label}, {CRISS_CROSS_LABEL}",
                    model,
                    [c] * batch,
                    msm={**msm, "decoder_attention": "criss_cross"},
                )
    for c in (32, 128):
        add(f"channel-mixing MAE, {c} ch, torch.compile", "channel-mix", [c] * batch, compile=True)
        for model in ("dense", "moe"):
            add(f"brainmoe {model}, {c} ch, MAE, torch.compile", model, [c] * batch, compile=True)
    mixed = [(19, 32, 64)[i % 3] for i in range(batch)]
    for model in ("dense", "moe"):
        add(f"brainmoe {model}, mixed 19/32/64, MAE, padded", model, mixed, packing=False)
        add(f"brainmoe {model}, mixed 19/32/64, MAE, packed", model, mixed)
        cross = {"decoder_attention": "criss_cross"}
        for x, packing in (("padded", False), ("packed", True)):
            label = f"brainmoe {model}, mixed 19/32/64, MAE, {CRISS_CROSS_LABEL}, {x}"
            add(label, model, mixed, packing=packing, msm=cross)
    return rows


def _ratios() -> list[tuple[str, str, str, str]]:
    """(name, row a, row b, target) of every ratio reported: a's speed over b's."""
    ref = "channel-mixing MAE (DreamDiffusion), {c} ch padded to 128"
    out = []
    for model in ("dense", "moe"):
        for suffix in ("MAE", "MAE, 80% mask", f"MAE, 80% mask, {CRISS_CROSS_LABEL}"):
            a, b = (f"brainmoe {model}, 128 ch, {x}" for x in (suffix, "before (mask tokens)"))
            out.append((f"{model} 128 ch: {suffix} / before", a, b, ">= 3x"))
    for c, target in ((128, ">= 0.36x"), (32, ">= 1.5x")):
        for suffix in (
            "MAE",
            "MAE, bf16 autocast",
            "MAE, 80% mask",
            f"MAE, {CRISS_CROSS_LABEL}",
            f"MAE, 80% mask, {CRISS_CROSS_LABEL}",
        ):
            name = f"dense {c} ch ({suffix}) / channel-mixing MAE"
            out.append((name, f"brainmoe dense, {c} ch, {suffix}", ref.format(c=c), target))
        name = f"dense {c} ch / channel-mixing MAE, both torch.compile"
        a, b = (
            f"brainmoe dense, {c} ch, MAE, torch.compile",
            f"channel-mixing MAE, {c} ch, torch.compile",
        )
        out.append((name, a, b, target))
    for model in ("dense", "moe"):
        for suffix in ("MAE", "MAE, 80% mask"):  # the option against the recipe's decoder
            b = f"brainmoe {model}, 128 ch, {suffix}"
            a = f"{b}, {CRISS_CROSS_LABEL}"
            out.append((f"{model} 128 ch ({suffix}): criss-cross / full decoder", a, b, "-"))
    for model in ("dense", "moe"):
        a, b = (f"brainmoe {model}, mixed 19/32/64, MAE, {x}" for x in ("packed", "padded"))
        out.append((f"{model} mixed batch: packed / padded", a, b, ">= 1.3x"))
        a, b = (
            f"brainmoe {model}, mixed 19/32/64, MAE, {CRISS_CROSS_LABEL}, {x}"
            for x in ("packed", "padded")
        )
        out.append((f"{model} mixed batch, {CRISS_CROSS_LABEL}: packed / padded", a, b, ">= 1.3x"))
    for c in (32, 128):
        a, b = (f"brainmoe {m}, {c} ch, MAE" for m in ("dense", "moe"))
        out.append((f"MoE step time / dense, {c} ch (MAE)", a, b, "<= 1.25x"))
    return out


RATIOS = _ratios()


def child(spec, passthrough: list[str], mode: str = "child") -> dict:
    proc = subprocess.run(
        [sys.executable, __file__, f"--{mode}={json.dumps(spec)}", *passthrough],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        print(proc.stderr[-2000:], file=sys.stderr)
        error = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {**spec, "error": error} if isinstance(spec, dict) else {"error": error}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32, help="FFN-overhead table only")
    parser.add_argument("--seconds", type=float, default=SECONDS, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", help="run the rows whose label contains this text")
    parser.add_argument("--section", default="Pretraining", help="RESULTS.md section to write")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(json.loads(args.child), args)))
        return
    if args.pair:
        print(json.dumps(run_pair(json.loads(args.pair), args)))
        return

    passthrough = [
        f"--{k}={v}" for k, v in vars(args).items() if k not in ("child", "pair", "only", "section")
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peaks = {"fp32": gemm_peak(torch.float32, device), "bf16": gemm_peak(torch.bfloat16, device)}
    print({k: f"{v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()}, flush=True)
    results = []
    for label, spec in specs(args.batch):
        if args.only and args.only not in label:
            continue
        results.append({"label": label, **child(spec, passthrough)})
        print(results[-1], flush=True)
    by_label = dict(specs(args.batch))
    paired = {}
    for name, a, b, _ in RATIOS:
        if a in by_label and b in by_label and (not args.only or args.only in a + b):
            paired[name] = child([by_label[a], by_label[b]], passthrough, mode="pair")
            print(name, paired[name], flush=True)
    ffn = ffn_overhead(args)
    body = report(results, paired, ffn, peaks, args, device)
    write_section(args.section, body)
    print(body)


def report(
    results: list[dict], paired: dict, ffn: list[dict], peaks: dict, args, device: str
) -> str:
    cfg = GPU_MOE if device == "cuda" else CPU_MOE
    by = {r["label"]: r for r in results}

    def ratio(a: str, b: str) -> tuple[str, str]:
        """(measured speed ratio, the ratio at equal achieved GFLOP/s -- b's FLOPs per
        channel-second over a's: how far the FLOPs alone allow a to go)."""
        ra, rb = by.get(a, {}), by.get(b, {})
        if "ch_s_per_s" not in ra or "ch_s_per_s" not in rb:
            return "n/a", "n/a"
        bound = rb["flops_per_ch_s"] / ra["flops_per_ch_s"]
        return f"{ra['ch_s_per_s'] / rb['ch_s_per_s']:.2f}x", f"{bound:.2f}x"

    lines = [
        f"Pretraining step (forward + backward + AdamW; median of {args.steps} steps after "
        f"{args.warmup} warm-up), one process per row on {device}; batch {args.batch} windows of "
        f"{SECONDS:g} s at {SFREQ:g} Hz, collated by the reader. brainmoe: the "
        f"`{RECIPE.name}` objective; MoE D={cfg.dim}, depth {cfg.depth}, E={cfg.n_experts}, "
        f"K={cfg.top_k}, {cfg.n_shared_experts} shared, H={cfg.ffn_hidden}; dense: one SwiGLU of "
        f"(K + shared) x H (equal active parameters). Channel-mixing MAE: bench/channel_mix_mae.py "
        f"at the dense encoder's parameter count. GEMM peak (2048^2, this run): fp32 "
        f"{peaks['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s.",
        "",
        "| model | encoder params | step ms | channel-s / s | model GFLOP / channel-s "
        "| achieved GFLOP/s | of GEMM peak | peak MiB |" + (" MFU |" if device == "cuda" else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: |" if device == "cuda" else ""),
    ]
    for r in results:
        if "step_s" not in r:
            lines.append(f"| {r['label']} | failed: {r['error'][:60]} | | | | | | |")
            continue
        frac = r["flops_per_s"] / peaks[r["precision"]]
        row = (
            f"| {r['label']} | {r['encoder_params'] / 1e6:.2f}M | {1e3 * r['step_s']:.0f} "
            f"| {r['ch_s_per_s']:.0f} | {r['flops_per_ch_s'] / 1e9:.3f} "
            f"| {r['flops_per_s'] / 1e9:.1f} | {100 * frac:.1f}% | {r['peak_mib']:.0f} |"
        )
        if device == "cuda":
            row += f" {100 * r['mfu']:.1f}% |" if "mfu" in r else " n/a |"
        lines.append(row)
    lines += [
        "",
        "Ratios (channel-seconds per second; targets from issue 12). Separate processes: from "
        "the table above, each row in its own process, minutes apart. Interleaved: the two "
        f"rows built in one process, their steps alternating ({2 * args.steps} each, median), "
        "so the machine's drift hits both alike -- read this column first. FLOP bound: the "
        "ratio if both ran at the same achieved GFLOP/s, i.e. what the model FLOPs per "
        "channel-second alone allow; a measured value near it means the gap is work done, "
        "not overhead.",
        "",
        "| ratio | separate processes | interleaved, one process | FLOP bound | target |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, a, b, target in RATIOS:
        pair = paired.get(name, {})
        inter = f"{pair['ratio']:.2f}x" if "ratio" in pair else "n/a"
        separate, bound = ratio(a, b)
        if inter == separate == "n/a":  # neither row measured in this run (--only)
            continue
        lines.append(f"| {name} | {separate} | {inter} | {bound} | {target} |")
    lines += [
        "",
        "Routed-compute overhead, the FFN layer alone (forward + backward on the same tokens):",
        "",
        "| FFN | ms | vs dense |",
        "| --- | ---: | ---: |",
    ]
    base_ms = ffn[0]["ms"]
    for row in ffn:
        if row["ms"] is None:
            lines.append(f"| {row['layer']} | unavailable: {row['error']} | |")
        else:
            lines.append(f"| {row['layer']} | {row['ms']:.2f} | {row['ms'] / base_ms:.2f}x |")
    if device != "cuda":
        lines += ["", "No GPU on this machine: MFU is measured only on CUDA runs of this script."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
