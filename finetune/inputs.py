"""EEG inputs for inference: windows of a recording file (any format MNE reads, any montage)
or chosen windows of built shards, as the reader's batches -- so inference sees exactly the
preprocessing and batch format that training saw."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shards.preprocess import PreprocessConfig, preprocess
from shards.reader import ReaderConfig, make_loader
from shards.sample import collate_eeg, window_sample


def windows_from_file(
    path: str | Path, max_windows: int = 4, preprocess_cfg: PreprocessConfig | None = None
) -> list[dict[str, Any]]:
    """Reader-format samples of the first `max_windows` windows of one recording file."""
    from shards.recording import Provenance, Rejected
    from shards.sources.contained import ReaderCrashed, ReaderFailed, call_contained
    from shards.sources.files import read_recording

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--eeg {path}: no such file")
    provenance = Provenance("file", path.stem, "0", "0", file=str(path))
    try:  # in the reader child, as the build reads: a native reader's crash stays there
        rec = call_contained(read_recording, path, provenance)
    except (ReaderFailed, ReaderCrashed) as err:
        raise ValueError(f"--eeg {path}: MNE cannot read it ({err})") from None
    if isinstance(rec, Rejected):
        raise ValueError(f"--eeg {path}: {rec.reason}")
    processed = preprocess(rec, preprocess_cfg or PreprocessConfig())
    if processed.channels is None or not processed.windows:
        reason = processed.rejected_reason or "no usable window"
        raise ValueError(f"--eeg {path}: nothing to decode ({reason})")
    ch = processed.channels
    return [
        window_sample(
            win.data,
            ch.names,
            ch.positions,
            processed.sfreq,
            processed.bad_channels,
            key=f"{path.stem}_w{win.index:06d}",
            shard=str(path),
            ch_known=ch.known,
            label=win.label,
            stimulus_id=win.stimulus_id,
            meta={"start_s": win.start_s},
        )
        for win in processed.windows[:max_windows]
    ]


def windows_from_shards(folders: list[str], keys: list[str]) -> list[dict[str, Any]]:
    """The named windows of built shards, in the order of `keys`."""
    from finetune.splits import KeySelect

    loader = make_loader(
        folders,
        ReaderConfig(batch_size=1, num_workers=0, shuffle=False),
        rank=0,
        world_size=1,
        select=KeySelect(keys),
    )
    found = {}
    for batch in loader:
        sample = _uncollate(batch)
        found[sample["key"]] = sample
    missing = [k for k in keys if k not in found]
    if missing:
        raise ValueError(f"--keys {missing[:5]} are not in the shards {folders}")
    return [found[k] for k in keys]


def _uncollate(batch: dict[str, Any]) -> dict[str, Any]:
    """A batch of one back into the sample type, cropped to its real channels and samples."""
    c = len(batch["ch_names"][0])  # not channel_mask: flagged bad channels are False there
    t = int(batch["time_mask"][0].sum())
    pos = batch["ch_pos"][0, :c].numpy().copy()
    pos[~batch["pos_known"][0, :c].numpy()] = float("nan")
    return window_sample(
        batch["eeg"][0, :c, :t].numpy(),
        batch["ch_names"][0][:c],
        pos,
        float(batch["sfreq"][0]),
        batch.get("bad_channels", [[]])[0],
        key=batch["key"][0],
        shard=batch["shard"][0],
        ch_known=batch["ch_known"][0, :c].numpy(),
        label=batch["label"][0],
        stimulus_id=batch["stimulus_id"][0],
        meta=batch["meta"][0],
    )


def batches(samples: list[dict[str, Any]], batch_size: int = 8):
    for start in range(0, len(samples), batch_size):
        yield collate_eeg(samples[start : start + batch_size])
