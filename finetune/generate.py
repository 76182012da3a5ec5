"""`brainmoe generate`: EEG in, images and captions out, from a registered finetune.

The registered folder holds only adapters; `finetune.json` names the encoder version (and
its fingerprint) and the base models, so the model is rebuilt exactly as trained -- and an
encoder whose weights differ from the recorded fingerprint is refused rather than decoded
into plausible-looking nonsense.

Loading the models takes seconds to minutes, so every input is checked first
(`check_inputs`: the EEG file or shard folders, the output folder, the model references)
and the EEG is read before any model: a typo fails at once. torch and the heads are
imported only when a model is loaded, for the same reason.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from pretrain.artifacts import read_json
from pretrain.tracking import resolve_model

if TYPE_CHECKING:
    from finetune.model import MultiTaskModel
    from finetune.stimuli import StimulusSet

# models:/<name>@<alias> or models:/<name>/<version>; runs:/<run id>/<path>
_REGISTRY_URI = re.compile(r"models:/[^/@\s]+(@[^/@\s]+|/\d+)")
_RUN_URI = re.compile(r"runs:/[^/\s]+/\S+")


def check_model_ref(uri: str, what: str) -> Path | None:
    """A ValueError unless ``uri`` is a well-formed registry/run URI or an existing folder;
    returns the folder for a local path (None for a URI, resolved only when loading)."""
    if uri.startswith("models:/"):
        if not _REGISTRY_URI.fullmatch(uri):
            raise ValueError(
                f"{what} {uri!r} is not models:/<name>@<alias> or models:/<name>/<version>"
            )
        return None
    if uri.startswith("runs:/"):
        if not _RUN_URI.fullmatch(uri):
            raise ValueError(f"{what} {uri!r} is not runs:/<run id>/<artifact path>")
        return None
    if "://" in uri:
        return None  # another MLflow artifact store (s3://, ...): only it can tell
    path = Path(uri)
    if not path.is_dir():
        raise ValueError(f"{what} {uri!r}: no such folder (or give models:/<name>@<alias>)")
    return path


def _check_out(out: str) -> None:
    """The output folder exists or can be created, and can be written to."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: a file is in the way, give a folder")
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {probe} is not a writable folder")


def check_inputs(args) -> None:
    """Every mistake in the command line found before anything is loaded (a ValueError)."""
    if args.num_images < 1:
        raise ValueError("--num-images must be at least 1")
    if args.max_windows < 1:
        raise ValueError("--max-windows must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be at least 1")
    if args.eeg:
        if args.keys:
            raise ValueError("--keys selects windows of --shards; with --eeg give --max-windows")
        eeg = Path(args.eeg)
        if not eeg.is_file():
            raise ValueError(f"--eeg {args.eeg}: no such file")
        if not os.access(eeg, os.R_OK):
            raise ValueError(f"--eeg {args.eeg}: not readable")
    else:
        if not args.keys:
            raise ValueError(
                "--shards needs --keys (window keys: brainmoe shards inspect lists them)"
            )
        missing = [f for f in args.shards if not Path(f).is_dir()]
        if missing:
            raise ValueError(f"--shards {' '.join(missing)}: no such folder")
    _check_out(args.out)
    folder = check_model_ref(args.model, "--model")
    if folder is not None:
        if not (folder / "finetune.json").is_file():
            raise ValueError(f"--model {args.model} is not a finetune output (no finetune.json)")
        meta = read_json(folder / "finetune.json")
        encoder_uri = meta.get("encoder_uri")
        if not isinstance(encoder_uri, str) or not encoder_uri:
            raise ValueError(f"{folder / 'finetune.json'} names no encoder_uri")
        check_model_ref(encoder_uri, f"the encoder of --model {args.model}")


def load_finetuned(
    uri: str, tracking_uri: str | None, workdir: Path
) -> tuple[MultiTaskModel, dict[str, Any], Path]:
    """A finetune folder or models:/ URI -> (model in eval mode, its finetune.json, folder)."""
    from finetune.config import FinetuneConfig
    from finetune.model import build_model, encoder_fingerprint
    from shards.config import load_config

    folder = resolve_model(uri, tracking_uri, workdir / "adapters")
    meta_path = folder / "finetune.json"
    if not meta_path.is_file():
        raise ValueError(f"{uri} is not a finetune output (no finetune.json in {folder})")
    meta = read_json(meta_path)
    encoder_dir = resolve_model(meta["encoder_uri"], tracking_uri, workdir / "encoder")
    found = encoder_fingerprint(encoder_dir)
    if found != meta["encoder_fingerprint"]:
        raise ValueError(
            f"{uri} was trained on encoder {meta['encoder_uri']} with fingerprint "
            f"{meta['encoder_fingerprint']}, but that URI now resolves to weights with "
            f"fingerprint {found} (the alias moved?); use the encoder version it was trained on"
        )
    cfg = load_config(FinetuneConfig, None, [], **_config_values(meta["config"]))
    clip_dim = int(meta["clip_dim"])
    model = build_model(cfg, encoder_dir, clip_dim)
    model.load_adapters(folder)
    return model.eval(), meta, folder


def _config_values(config: dict[str, Any]) -> dict[str, Any]:
    """What builds the model: the encoder setup, the tasks, their heads' sections, the
    weighting (not the data, the run folder or the launcher)."""
    keep = {"encoder", "tasks", "weighting", *config.get("tasks", [])}
    return {k: v for k, v in config.items() if k in keep}


def generate(
    model: MultiTaskModel,
    samples: list[dict[str, Any]],
    out: Path,
    num_images: int = 1,
    steps: int | None = None,
    seed: int = 0,
    stimuli: StimulusSet | None = None,
) -> list[dict[str, Any]]:
    """Images (PNG) and captions per input window into `out`; returns one record per window."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        records = _decode(model, samples, out, num_images, steps, seed, stimuli)
    (out / "captions.json").write_text(
        json.dumps({r["key"]: r["caption"] for r in records}, indent=1) + "\n"
    )
    contact_sheet(records, out)
    for r in records:
        r.pop("eeg")
    (out / "generated.json").write_text(json.dumps(records, indent=1) + "\n")
    return records


def _decode(model, samples, out, num_images, steps, seed, stimuli) -> list[dict[str, Any]]:
    from finetune.inputs import batches

    records = []
    for batch in batches(samples):
        _, tokens, valid = model.read(batch)
        keys = batch["key"]
        decoded: dict[str, list] = {}  # each head's outputs per window ({} for retrieval)
        for head in model.heads.values():
            decoded.update(
                head.decode(tokens, valid, num_images=num_images, steps=steps, seed=seed)
            )
        captions = decoded.get("caption", [None] * len(keys))
        images = decoded.get("images", [[] for _ in keys])
        for b, key in enumerate(keys):
            folder = out / _safe(key)
            folder.mkdir(exist_ok=True)
            paths = []
            for j, image in enumerate(images[b]):
                path = folder / f"image_{j:02d}.png"
                image.save(path)
                paths.append(str(path.relative_to(out)))
            sid = batch["stimulus_id"][b]
            stim = stimuli.get(sid) if (stimuli is not None and sid) else None
            copy = copy_stimulus(stim.image, folder) if stim and stim.image else None
            records.append(
                {
                    "key": key,
                    "caption": captions[b],
                    "images": paths,
                    "stimulus_id": sid,
                    "stimulus_image": str(stim.image) if stim and stim.image else None,
                    "stimulus_copy": str(copy.relative_to(out)) if copy else None,
                    "stimulus_captions": stim.captions if stim else None,
                    "channels": len(batch["ch_names"][b]),
                    "eeg": batch["eeg"][b, : len(batch["ch_names"][b])].numpy(),
                }
            )
    return records


def copy_stimulus(image: str | Path, folder: Path) -> Path:
    """A copy of the stimulus image beside the generated ones, so the folder stays whole when
    moved; the image may be a local file or an object-store URL (renders beside s3:// shards)."""
    from shards import storage

    copy = folder / f"stimulus{Path(str(image)).suffix}"
    if storage.is_uri(image):
        copy.write_bytes(storage.read_bytes(str(image)))
    else:
        shutil.copyfile(image, copy)
    return copy


def contact_sheet(records: list[dict[str, Any]], out: Path) -> None:
    """contact_sheet.png (EEG | stimulus | generated images, caption below) and index.html.

    index.html names every image relative to `out` (the stimulus by its copy there), so the
    folder can be moved, zipped or served as it is.
    """
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    n_img = max([len(r["images"]) for r in records] + [0])
    cols = 2 + n_img
    fig, axes = plt.subplots(
        len(records), cols, figsize=(2.2 * cols, 2.2 * len(records)), squeeze=False
    )
    for row, r in zip(axes, records, strict=True):
        eeg = r["eeg"]  # [C, T] uV
        offsets = 3 * (eeg.std() + 1e-9) * np.arange(len(eeg))[:, None]
        row[0].plot((eeg + offsets).T, lw=0.3, color="k")
        row[0].set_title(f"{r['key'][:24]}\n{r['channels']} ch", fontsize=6)
        if r["stimulus_copy"]:  # the local copy: the original may be an s3:// URL
            row[1].imshow(Image.open(out / r["stimulus_copy"]))
            row[1].set_title("stimulus", fontsize=6)
        for j, path in enumerate(r["images"]):
            row[2 + j].imshow(Image.open(out / path))
            row[2 + j].set_title(f"generated {j}", fontsize=6)
        row[-1].set_xlabel((r["caption"] or "")[:40], fontsize=6)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out / "contact_sheet.png", dpi=100)
    plt.close(fig)
    rows = []
    for r in records:
        stim = (
            f'<img src="{_src(r["stimulus_copy"])}" width=128>'
            if r.get("stimulus_copy")
            else "unknown"
        )
        imgs = "".join(f'<img src="{_src(p)}" width=128>' for p in r["images"])
        rows.append(
            f"<tr><td>{html.escape(r['key'])}<br>{r['channels']} channels</td><td>{stim}</td>"
            f"<td>{imgs}</td><td>{html.escape(r['caption'] or '')}</td></tr>"
        )
    (out / "index.html").write_text(
        "<html><body><h1>brainmoe generate</h1><img src='contact_sheet.png'><table border=1>"
        "<tr><th>EEG window</th><th>stimulus</th><th>generated</th><th>caption</th></tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )


def _src(relative: str) -> str:
    """A path relative to the output folder as an HTML src: URL-quoted, forward slashes."""
    return html.escape(quote(Path(relative).as_posix()))


def _safe(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)


def generate_cli(args) -> int:
    """Check every input, read the EEG, then load the model and decode."""
    check_inputs(args)  # before any heavy import: a typo fails in a fraction of a second
    from finetune.inputs import windows_from_file, windows_from_shards

    samples = (
        windows_from_file(args.eeg, args.max_windows)
        if args.eeg
        else windows_from_shards(args.shards, args.keys)
    )
    print(f"loading model {args.model} ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model, meta, folder = load_finetuned(args.model, args.tracking_uri, Path(tmp))
        from finetune.stimuli import StimulusSet

        stimuli = (
            StimulusSet.load(folder / "stimuli.json")
            if (folder / "stimuli.json").is_file()
            else None
        )
        records = generate(
            model, samples, Path(args.out), args.num_images, args.steps, args.seed, stimuli
        )
    for r in records:
        print(f"{r['key']}: {len(r['images'])} image(s)  caption: {r['caption']!r}")
    print(f"contact sheet: {Path(args.out) / 'contact_sheet.png'}")
    return 0
