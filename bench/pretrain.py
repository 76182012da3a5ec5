"""Pretraining step throughput and memory: dense vs MoE at equal *active* parameters.

    python bench/pretrain.py            # CPU here; on a GPU machine it also reports MFU

What is compared, and why: a MoE layer's promise is more parameters for the same compute
per token, so the fair baseline is the dense model whose FFN is as wide as what one token
uses in the MoE (K routed + shared experts; `pretrain.encoder.dense_variant`). The gap in
step time between the two is the price of routing (router, top-k, sort/gather/scatter, and
E small GEMMs instead of one large one); it is also measured on the FFN layer alone. Each
configuration runs in its own process so that its peak memory is its own.

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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.results import write_section  # noqa: E402
from bench.timing import timed_steps  # noqa: E402
from pretrain.encoder import EncoderConfig, dense_variant  # noqa: E402
from pretrain.moe import MoE, SwiGLU  # noqa: E402
from pretrain.msm import MaskedSignalModel, MSMConfig  # noqa: E402

# The MoE under test: 8 experts, top-2 (+1 shared), sized so a CPU step takes ~1 s.
CPU_MOE = EncoderConfig(
    dim=128, depth=4, heads=4, ffn_hidden=256, n_experts=8, top_k=2, n_shared_experts=1
)
GPU_MOE = EncoderConfig(
    dim=512, depth=12, heads=8, ffn_hidden=512, n_experts=8, top_k=2, n_shared_experts=1
)  # the `base` config
# Dense bf16 peak (TFLOP/s) of GPUs we may be lent, for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}


def batch(b: int, c: int, seconds: float, device: str) -> dict:
    g = torch.Generator().manual_seed(0)
    t = round(seconds * 200)
    return {"eeg": (20 * torch.randn(b, c, t, generator=g)).to(device)}


def step_flops(model: MaskedSignalModel, tokens: int, seq: int) -> float:
    """Training FLOPs of one step: 6 x active params x tokens + attention (12 x L x N x D
    per token, forward + backward)."""
    active = model.encoder.num_parameters()["active"] + model.num_parameters()["decoder"]
    enc = model.config.encoder
    attention = 12 * enc.depth * seq * enc.dim
    return tokens * (6 * active + attention)


def run_one(variant: str, args: argparse.Namespace) -> dict:
    """One configuration, timed in this process (called in a child process)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = GPU_MOE if device == "cuda" else CPU_MOE
    enc = dense_variant(base) if variant == "dense" else base
    if variant.startswith("moe-"):
        enc = dataclasses.replace(enc, expert_backend=variant.removeprefix("moe-"))
    import resource

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # torch imported
    torch.manual_seed(0)
    model = MaskedSignalModel(MSMConfig(encoder=enc, mask_ratio=0.6)).to(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    data = batch(args.batch, args.channels, args.seconds, device)
    gen = torch.Generator().manual_seed(0)

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=device == "cuda"):
            out = model(data, generator=gen)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        model.encoder.update_router_bias()

    for _ in range(args.warmup):
        step()
    times = timed_steps(step, args.steps, device)
    wall = statistics.median(times)
    seq = args.channels * round(args.seconds / enc.patch_seconds)
    tokens = args.batch * seq
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:  # what training added to the process's peak RSS (torch itself is ~0.8 GiB)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    params = model.encoder.num_parameters()
    result = {
        "variant": variant,
        "device": device,
        "total_params": params["total"],
        "active_params": params["active"],
        "step_s": wall,
        "samples_per_s": args.batch / wall,
        "tokens_per_s": tokens / wall,
        "peak_mib": peak,
    }
    if device == "cuda":
        name = torch.cuda.get_device_name(0)
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak_tflops:
            result["mfu"] = step_flops(model, tokens, seq) / wall / (peak_tflops * 1e12)
    return result


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child, args)))
        return

    passthrough = [f"--{k}={v}" for k, v in vars(args).items() if k != "child"]
    results = []
    for variant in ("dense", "moe-loop", "moe-grouped_mm"):
        proc = subprocess.run(
            [sys.executable, __file__, f"--child={variant}", *passthrough],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            print(proc.stderr[-2000:], file=sys.stderr)
            results.append({"variant": variant, "error": proc.stderr.strip().splitlines()[-1]})
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(results[-1], flush=True)
    ffn = ffn_overhead(args)
    print(ffn)

    device = next((r["device"] for r in results if "device" in r), "cpu")
    cfg = GPU_MOE if device == "cuda" else CPU_MOE
    dense = next((r for r in results if r["variant"] == "dense" and "step_s" in r), None)
    lines = [
        f"Masked-signal pretraining step (forward + backward + AdamW; median of {args.steps} steps), one process on {device}, "
        f"{'bf16' if device == 'cuda' else 'fp32'}; batch {args.batch} x {args.channels} channels "
        f"x {args.seconds:g} s at 200 Hz = {args.batch * args.channels * round(args.seconds)} "
        f"tokens. MoE: D={cfg.dim}, depth {cfg.depth}, E={cfg.n_experts}, K={cfg.top_k}, "
        f"{cfg.n_shared_experts} shared expert, H={cfg.ffn_hidden}; dense: the same with one "
        f"SwiGLU of width (K + shared) x H = {(cfg.top_k + cfg.n_shared_experts) * cfg.ffn_hidden}"
        " (equal active parameters).",
        "",
        "| model | params total | params active | step ms | samples/s | tokens/s | "
        + ("peak MiB (CUDA allocated) " if device == "cuda" else "peak MiB (RSS above import) ")
        + "| vs dense |"
        + (" MFU |" if device == "cuda" else ""),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        + (" ---: |" if device == "cuda" else ""),
    ]
    for r in results:
        if "step_s" not in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:60]} | | | | | | |")
            continue
        rel = f"{r['step_s'] / dense['step_s']:.2f}x" if dense else ""
        row = (
            f"| {r['variant']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M "
            f"| {1e3 * r['step_s']:.0f} | {r['samples_per_s']:.1f} | {r['tokens_per_s']:.0f} "
            f"| {r['peak_mib']:.0f} | {rel} |"
        )
        if device == "cuda":
            row += f" {100 * r['mfu']:.1f}% |" if "mfu" in r else " n/a |"
        lines.append(row)
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
    body = "\n".join(lines)
    write_section("Pretraining", body)
    print(body)


if __name__ == "__main__":
    main()
