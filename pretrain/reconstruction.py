"""`brainmoe evaluate reconstruction`: does pretraining beat the classical answers?

A falling loss says nothing about whether a masked-signal model learnt EEG: a flat line at 0
has a finite loss too. This scores a pretraining run's reconstructions of hidden patches of
recordings it never saw, in microvolts, against what a neurophysiologist would do instead:

- **random masking** (60% of the patches hidden at random): MNE's spherical-spline
  interpolation of each hidden channel from the channels visible in the same time patch
  (MNE's own interpolation matrix, origin from a sphere fitted to the montage), copying the
  nearest visible channel (3D position), and zero;
- **time-block masking** (one interior patch hidden on every channel, so no spatial help
  exists): linear interpolation across the gap from the edges of the visible patches, and
  zero;
- with a spectral target, the predicted log spectrum against each channel's mean visible
  spectrum.

Scores are R^2 over all hidden samples and the mean per-patch Pearson r, after removing each
patch's mean (the 0.5 Hz high-pass leaves offsets that carry nothing). Channels flagged bad
by the shard build are absent (``channel_mask``), so they are neither scored nor given to
the baselines.

Shape legend: B batch, C channels, P patches, L samples per patch, F spectral values.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch loads only when a command runs: `brainmoe --help` stays fast
    from torch import Tensor

    from pretrain.msm import MaskedSignalModel

# ---- loading -----------------------------------------------------------------------------


def load_run(run_dir: str | Path) -> MaskedSignalModel:
    """The MSM model (encoder *and* decoder) of a run's newest checkpoint, in fp32 on CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain.checkpoint import weights_only_loads
    from pretrain.config import PretrainConfig
    from pretrain.export import _buffers_from_model_states, checkpoint_tag_dir
    from pretrain.model import build_model
    from shards.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise ValueError(f"{run_dir} is not a pretraining run folder (no config.yaml)")
    if not (run_dir / "checkpoints" / "latest").exists():
        raise ValueError(f"{run_dir} has no checkpoint yet (no checkpoints/latest)")
    cfg = load_config(PretrainConfig, str(run_dir / "config.yaml"), [])
    cfg.model.overrides = {**cfg.model.overrides, "activation_checkpointing": False}
    model = build_model(cfg)
    root, tag = checkpoint_tag_dir(run_dir / "checkpoints")
    with weights_only_loads():  # DeepSpeed's pickles may not run code (pretrain/checkpoint.py)
        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        state.update(_buffers_from_model_states(root / tag, "", missing))
        model.load_state_dict(state, strict=True)
    assert not unexpected, unexpected
    return model.float().eval()


def iter_batches(source: str, batch_size: int, max_windows: int | None, shard_cfg=None):
    """Reader batches from a shard folder, or from any source spec through the shards'
    preprocessing (``shard_cfg``: a PreprocessConfig, e.g. the training corpus's)."""
    from shards.reader import ReaderConfig, make_loader
    from shards.sample import collate_eeg

    seen = 0
    if Path(source).is_dir() and (Path(source) / "manifest.json").exists():
        reader = ReaderConfig(batch_size=batch_size, num_workers=0, shuffle=False)
        loader = make_loader(source, reader, rank=0, world_size=1)
        for batch in loader:
            if max_windows:
                keep = max_windows - seen
                if keep <= 0:
                    return
                batch = _head(batch, keep)
            seen += batch["eeg"].shape[0]
            yield batch
        return
    from shards.preprocess import preprocessed
    from shards.sample import window_sample

    samples: list[dict[str, Any]] = []
    for _, processed in preprocessed(source, shard_cfg):
        names, pos = processed.channels.names, processed.channels.positions
        for win in processed.windows:
            samples.append(
                window_sample(win.data, names, pos, processed.sfreq, processed.bad_channels)
            )
            if len(samples) == batch_size or (max_windows and seen + len(samples) >= max_windows):
                yield collate_eeg(samples)
                seen += len(samples)
                samples = []
            if max_windows and seen >= max_windows:
                return
    if samples:
        yield collate_eeg(samples)


def _head(batch: dict[str, Any], n: int) -> dict[str, Any]:
    return {k: v[:n] for k, v in batch.items()}


# ---- classical baselines (numpy, one window at a time) -------------------------------------


def _sphere_origin(pos: np.ndarray) -> np.ndarray:
    from mne.bem import _fit_sphere

    return _fit_sphere(pos)[1]


def spline_predict(x: np.ndarray, visible: np.ndarray, hidden: np.ndarray, pos: np.ndarray):
    """`x [C, L]` of one patch; boolean `visible`/`hidden [C]`; `pos [C, 3]` centred on the
    head sphere -> predictions of the hidden channels `[H, L]` (MNE's spherical splines)."""
    from mne.channels.interpolation import _make_interpolation_matrix

    matrix = _make_interpolation_matrix(pos[visible], pos[hidden])  # [H, V]
    return matrix @ x[visible]


def neighbour_predict(x, visible, hidden, pos):
    """Copy of the nearest visible channel (3D distance) for each hidden one `[H, L]`."""
    dist = np.linalg.norm(pos[hidden][:, None] - pos[visible][None], axis=-1)  # [H, V]
    return x[visible][dist.argmin(1)]


def linear_gap(before: np.ndarray | None, after: np.ndarray | None, length: int) -> np.ndarray:
    """A straight line from the last visible sample before a hidden patch to the first after
    it (`[L]`); flat from the one edge there is; zero with none."""
    if before is None and after is None:
        return np.zeros(length)
    a = before[-1] if before is not None else after[0]
    b = after[0] if after is not None else before[-1]
    t = np.arange(1, length + 1) / (length + 1)
    return a + (b - a) * t


# ---- scoring -----------------------------------------------------------------------------


class Scores:
    """R^2 over all hidden samples and mean per-patch r, per method, from centred patches."""

    def __init__(self):
        self.sse: dict[str, float] = defaultdict(float)
        self.sum_t = 0.0
        self.sum_t2 = 0.0
        self.n = 0
        self.r: dict[str, list[float]] = defaultdict(list)

    def add_target(self, target: np.ndarray) -> None:  # [M, L] centred
        self.sum_t += float(target.sum())
        self.sum_t2 += float((target**2).sum())
        self.n += target.size

    def add(self, name: str, pred: np.ndarray, target: np.ndarray) -> None:  # [M, L] each
        pred = pred - pred.mean(-1, keepdims=True)
        self.sse[name] += float(((pred - target) ** 2).sum())
        num = (pred * target).sum(-1)
        den = np.sqrt((pred**2).sum(-1) * (target**2).sum(-1))
        self.r[name].extend(np.where(den > 0, num / np.maximum(den, 1e-12), 0.0).tolist())

    def result(self) -> dict[str, Any]:
        sst = self.sum_t2 - self.sum_t**2 / max(self.n, 1)
        r2 = {k: 1.0 - v / max(sst, 1e-12) for k, v in self.sse.items()}
        r = {k: float(np.mean(v)) if v else float("nan") for k, v in self.r.items()}
        return {**r2, "r": r, "samples": self.n}


def evaluate(
    model: MaskedSignalModel,
    batches,
    mask_ratio: float = 0.6,
    seed: int = 0,
    keep_examples: int = 4,
) -> dict[str, Any]:
    """Score `model` and the baselines on every batch; see the module docstring."""
    import torch

    with torch.no_grad():
        return _evaluate(model, batches, mask_ratio, seed, keep_examples)


def _evaluate(model, batches, mask_ratio, seed, keep_examples) -> dict[str, Any]:
    import torch

    from pretrain.masking import make_mask

    gen = torch.Generator().manual_seed(seed)
    scale_uv = model.config.encoder.input_scale_uv
    spectral = model.config.target != "signal"
    random_s, block_s = Scores(), Scores()
    spec = {"random": Scores(), "time_block": Scores()}
    examples: dict[str, list] = {"random": [], "time_block": []}
    windows = 0
    for batch in batches:
        inp = model.encoder.prepare(batch)
        b, c, p, length = inp.patches.shape
        valid = inp.valid
        raw = inp.patches.float() * scale_uv  # [B, C, P, L] uV
        centred = raw - raw.mean(-1, keepdim=True)
        masks = {"random": make_mask(valid, mask_ratio, "random", 1, gen)}
        block = torch.zeros_like(valid)
        if p >= 3:  # an interior patch: both edges visible
            where = torch.randint(1, p - 1, (b,), generator=gen)
        else:
            where = torch.randint(0, p, (b,), generator=gen)
        block[torch.arange(b), :, where] = True
        masks["time_block"] = block & valid
        for mode, mask in masks.items():
            out = model(batch, mask=mask)
            pred_uv = out["pred"] if "mse_signal" in out else None
            if pred_uv is not None:
                pred_uv = pred_uv.float() * out["scale"][:, None, None, None] * scale_uv
            scores = random_s if mode == "random" else block_s
            labels = (batch["key"], batch["ch_names"])
            _score_batch(
                mode,
                scores,
                pred_uv,
                raw,
                centred,
                mask,
                valid,
                inp,
                examples,
                labels,
                keep_examples,
            )
            if spectral:
                _score_spectrum(spec[mode], out, mask, valid)
        windows += b
    result: dict[str, Any] = {
        "random": random_s.result(),
        "time_block": block_s.result(),
        "windows": windows,
        "mask_ratio": mask_ratio,
    }
    if spectral:
        result["spectrum"] = {mode: s.result() for mode, s in spec.items()}
    result["_examples"] = examples
    return result


def _score_batch(mode, scores, pred_uv, raw, centred, mask, valid, inp, examples, labels, keep=4):
    b, c, p, length = raw.shape
    for i in range(b):
        known = inp.pos_known[i].numpy() & valid[i].any(-1).numpy()
        pos = inp.ch_pos[i].numpy().astype(np.float64)
        origin = _sphere_origin(pos[known]) if known.sum() >= 4 else np.zeros(3)
        pos = pos - origin
        for t in range(p):
            hidden = mask[i, :, t].numpy()
            if not hidden.any():
                continue
            target = centred[i, hidden, t].numpy()  # [H, L]
            scores.add_target(target)
            scores.add("zero", np.zeros_like(target), target)
            if pred_uv is not None:
                scores.add("model", pred_uv[i, hidden, t].numpy(), target)
            x = raw[i, :, t].numpy()
            visible = valid[i, :, t].numpy() & ~hidden & known
            hidden_known = hidden & known
            if mode == "random":
                spline = np.zeros_like(target)
                neigh = np.zeros_like(target)
                if visible.sum() >= 3 and hidden_known.any():
                    sel = hidden_known[hidden]
                    spline[sel] = spline_predict(x, visible, hidden_known, pos)
                    neigh[sel] = neighbour_predict(x, visible, hidden_known, pos)
                scores.add("spline", spline, target)
                scores.add("neighbour", neigh, target)
                extra = {"spline": spline, "neighbour": neigh}
            else:
                lin = []
                for ch in np.flatnonzero(hidden):
                    ok_b = t > 0 and valid[i, ch, t - 1] and not mask[i, ch, t - 1]
                    ok_a = t + 1 < p and valid[i, ch, t + 1] and not mask[i, ch, t + 1]
                    lin.append(
                        linear_gap(
                            raw[i, ch, t - 1].numpy() if ok_b else None,
                            raw[i, ch, t + 1].numpy() if ok_a else None,
                            length,
                        )
                    )
                lin = np.stack(lin)
                scores.add("linear", lin, target)
                extra = {"linear": lin}
            if len(examples[mode]) < keep:
                j = 0
                row = {"target": target[j], **{k: v[j] - v[j].mean() for k, v in extra.items()}}
                if pred_uv is not None:
                    m = pred_uv[i, hidden, t].numpy()[j]
                    row["model"] = m - m.mean()
                ch = int(np.flatnonzero(hidden)[j])
                key, names = labels[0][i], labels[1][i]
                examples[mode].append((f"{key}, {names[ch]}, second {t + 1}", row))


def _score_spectrum(scores: Scores, out: dict[str, Tensor], mask: Tensor, valid: Tensor):
    """Predicted log spectra of hidden patches vs each channel's mean visible spectrum."""
    target = out["target_spectrum"].float()  # [B, C, P, F]
    pred = out["pred_spectrum"].float()
    visible = (valid & ~mask)[..., None].float()
    mean_vis = (target * visible).sum(2, keepdim=True) / visible.sum(2, keepdim=True).clamp_min(1)
    m = mask.numpy()
    t = target.numpy()[m]  # [M, F]
    # spectra are not centred per patch (their level is the point): score them as they are
    scores.sum_t += float(t.sum())
    scores.sum_t2 += float((t**2).sum())
    scores.n += t.size
    for name, value in (("model", pred), ("channel_mean", mean_vis.expand_as(target))):
        v = value.numpy()[m]
        scores.sse[name] += float(((v - t) ** 2).sum())


# ---- report ------------------------------------------------------------------------------


def plot_examples(examples: dict[str, list], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(mode, title, row) for mode, items in examples.items() for title, row in items]
    fig, axes = plt.subplots(len(rows), 1, figsize=(9, 1.9 * len(rows)), squeeze=False)
    styles = {"target": ("k", 1.6), "model": ("tab:red", 1.2)}
    for ax, (mode, title, row) in zip(axes[:, 0], rows, strict=True):
        for name, y in row.items():
            color, width = styles.get(name, (None, 0.9))
            ax.plot(y, label=name, color=color, lw=width, alpha=0.9)
        ax.set_title(f"{mode}: {title}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6, loc="upper right", ncol=4)
    axes[-1, 0].set_xlabel("sample")
    fig.supylabel("uV (patch mean removed)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_result(result: dict[str, Any]) -> str:
    lines = [f"reconstruction of hidden patches ({result['windows']} windows, uV, R^2 | mean r)"]
    for mode, methods in (("random", ("model", "spline", "neighbour", "zero")),
                          ("time_block", ("model", "linear", "zero"))):  # fmt: skip
        res = result[mode]
        cells = [f"{m} {res[m]:.3f} | {res['r'][m]:.3f}" for m in methods if m in res]
        lines.append(f"  {mode:<10} " + "   ".join(cells))
    if "spectrum" in result:
        for mode, res in result["spectrum"].items():
            lines.append(
                f"  spectrum {mode:<10} model {res['model']:.3f}   channel mean "
                f"{res['channel_mean']:.3f}"
            )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="a pretraining run folder (train.run_dir)")
    parser.add_argument(
        "--source", required=True, help="a shard folder or a source spec the run never saw"
    )
    parser.add_argument("--max-windows", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--mask-ratio", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the result to this JSON file")
    parser.add_argument("--plot", help="PNG of hidden patches with every method overlaid")


def run(args: argparse.Namespace) -> int:
    if not 0 < args.mask_ratio < 1:
        raise ValueError(f"--mask-ratio must be in (0, 1), got {args.mask_ratio}")
    if args.max_windows is not None and args.max_windows < 1:
        raise ValueError("--max-windows must be at least 1")
    src = Path(args.source)
    if "://" not in args.source and ":" not in args.source and not src.is_dir():
        raise ValueError(f"--source {args.source}: not a shard folder nor a source spec")
    model = load_run(args.run)
    shard_cfg = _training_preprocess(args.run)
    batches = iter_batches(args.source, args.batch_size, args.max_windows, shard_cfg)
    result = evaluate(model, batches, args.mask_ratio, args.seed)
    examples = result.pop("_examples")
    result.update(run=str(args.run), source=args.source)
    print(format_result(result))
    plot = Path(args.plot) if args.plot else Path(args.run) / "plots" / "reconstruction_eval.png"
    result["plot"] = str(plot_examples(examples, plot))
    print(f"plot: {result['plot']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


def _training_preprocess(run_dir: str | Path):
    """The preprocessing of the run's first shard folder, so a raw source is cleaned alike."""
    from pretrain.config import PretrainConfig
    from shards.config import load_config
    from shards.preprocess import PreprocessConfig

    cfg = load_config(PretrainConfig, str(Path(run_dir) / "config.yaml"), [])
    from shards import storage

    for folder in cfg.data.shards:  # a local folder or an s3:// URL
        manifest = storage.join(folder, "manifest.json")
        if storage.exists(manifest):
            pre = storage.read_json(manifest).get("config", {}).get("preprocess")
            if pre:
                known = PreprocessConfig.__dataclass_fields__
                return PreprocessConfig(**{k: v for k, v in pre.items() if k in known})
    return None
