"""Look at one window of a built corpus: its traces, spectrum and metadata, as a PNG.

The fastest way to trust (or distrust) a corpus is to look at it: filtering, units,
channel names and rejection all show up in one picture.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from shards.manifest import load_manifest

_KEY = re.compile(r"^(?P<unit>.+)_r\d{3}_w\d{6}$")


def read_sample(build_dir: str | Path, key: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The `[C, T]` window and JSON of `key` (or of the corpus' first sample if key is None)."""
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    shards = manifest["shards"]
    if key is not None:
        match = _KEY.match(key)
        if not match:
            raise ValueError(f"{key!r} is not a sample key (they look like <unit>_r000_w000012)")
        shards = [s for s in shards if s["unit"] == match["unit"]]
        if not shards:
            raise ValueError(f"no shards of unit {match['unit']!r} in {build_dir}")
    for shard in shards:
        with tarfile.open(build_dir / shard["name"]) as tar:
            members = {m.name: m for m in tar.getmembers()}
            wanted = key or min(m.rsplit(".", 1)[0].split(".")[0] for m in members)
            if f"{wanted}.json" in members:
                meta = json.loads(tar.extractfile(members[f"{wanted}.json"]).read())
                raw = tar.extractfile(members[f"{wanted}.eeg.npy"]).read()
                return np.load(io.BytesIO(raw), allow_pickle=False), meta
    raise ValueError(f"no sample {key!r} in {build_dir}")


def plot_sample(
    eeg: np.ndarray, meta: dict[str, Any], png: str | Path, max_channels: int = 64
) -> None:
    """Stacked traces (left) and per-channel power spectra (right) of one `[C, T]` window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scipy.signal

    eeg = eeg.astype(np.float32)[:max_channels]  # [C, T]
    names = meta["ch_names"][:max_channels]
    known = meta["ch_known"][:max_channels]
    sfreq = meta["sfreq"]
    t = meta["window"]["start_s"] + np.arange(eeg.shape[1]) / sfreq
    spread = float(np.percentile(np.abs(eeg), 99)) * 2 or 1.0
    fig, (ax, ax_psd) = plt.subplots(
        1, 2, figsize=(14, max(4, 0.22 * len(names) + 2)), gridspec_kw={"width_ratios": [3, 1]}
    )
    for i, trace in enumerate(eeg):
        ax.plot(t, trace - i * spread, lw=0.6, color="k" if known[i] else "tab:orange")
    ax.set_yticks([-i * spread for i in range(len(names))], names, fontsize=7)
    for event in meta.get("events", []):
        onset = meta["window"]["start_s"] + event["onset"]
        ax.axvline(onset, color="tab:blue", ls="--", lw=0.8)
        ax.text(onset, spread, event["label"], color="tab:blue", fontsize=8)
    ax.set_xlabel("time (s)")
    ax.set_title(
        f"{meta['key']}  label={meta.get('label')}  ({spread:.0f} uV between traces; "
        "orange = not a 10-05 name)",
        fontsize=9,
    )
    freqs, psd = scipy.signal.welch(eeg, fs=sfreq, nperseg=min(eeg.shape[1], int(2 * sfreq)))
    ax_psd.semilogy(freqs, psd.T, lw=0.4, alpha=0.5)
    ax_psd.semilogy(freqs, np.median(psd, axis=0), lw=2, color="k", label="median")
    ax_psd.set_xlabel("Hz")
    ax_psd.set_ylabel("uV^2/Hz")
    ax_psd.legend(fontsize=8)
    prov = meta["provenance"]
    ax_psd.set_title(
        f"{prov['dataset']} sub-{prov['subject']} ses-{prov['session']} "
        f"run-{prov['run']}\n{len(meta['ch_names'])} ch @ {sfreq:g} Hz",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
