"""The exported encoder as an MLflow pyfunc model: `mlflow.pyfunc.load_model` and
`mlflow models serve` turn EEG into pooled embeddings with no brainmoe code on the caller's side.

Shape legend: C channels, T samples, D width.

What the registry stores is still the `save_pretrained` folder (safetensors + config.json, its
checksums checked by `Encoder.from_pretrained` at load), now inside the pyfunc model's
artifacts under ``model``; `pretrain.tracking.resolve_model` finds it there.

Input (what `predict` takes, and what serving's ``{"inputs": ...}`` JSON becomes): one
recording ``{"eeg": [[...]] (C x T microvolts), "ch_names": [...], "sfreq": 160.0}``, a list of
them, or a pandas DataFrame with those columns (MLflow's schema enforcement hands a
DataFrame to `predict`). Each recording is cleaned and cut exactly as `brainmoe generate`
cuts a file (shards.preprocess with its defaults: band-pass, notch, resampling, 4 s windows,
bad windows dropped, broken channels left out), so a served embedding is the one the heads
were trained on. Output: one row per window, ``{"input": i, "window": w, "start_s": s,
"embedding": [D floats]}`` -- ``input`` the recording's position in the request, ``window``
the window's index in it (a rejected window leaves a gap), ``start_s`` its start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np

ARTIFACT = "model"  # key of the save_pretrained folder in the pyfunc model's artifacts
FIELDS = ("eeg", "ch_names", "sfreq")


def _records(model_input: Any) -> list[Mapping[str, Any]]:
    """A dict, a list of dicts or a DataFrame (what schema enforcement makes of either) ->
    one mapping per recording."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, Mapping):
        return [model_input]
    if isinstance(model_input, Sequence) and not isinstance(model_input, str | bytes):
        return list(model_input)
    raise ValueError(
        f"expected {{'eeg': [[...]], 'ch_names': [...], 'sfreq': Hz}} or a list of them, got "
        f"{type(model_input).__name__}"
    )


def _matrix(value: Any) -> np.ndarray:
    """Nested lists, an array, or an object array of row arrays (pandas' cells) -> [C, T]."""
    if isinstance(value, np.ndarray) and value.dtype == object:
        value = [np.asarray(row, dtype=np.float64) for row in value]
    try:
        return np.asarray(value if not isinstance(value, list) else np.stack(value), np.float64)
    except (TypeError, ValueError):
        return np.asarray([], dtype=np.float64)  # ragged or not numbers: refused below


def parse_inputs(model_input: Any) -> list[dict[str, Any]]:
    """Every recording of a request as ``{"eeg" [C, T] float64 uV, "ch_names", "sfreq"}``;
    a ValueError naming the recording and the field for anything malformed, before any
    filtering or encoding."""
    records = _records(model_input)
    if not records:
        raise ValueError("no recording in the input: give at least one {'eeg', 'ch_names', ...}")
    parsed = []
    for i, rec in enumerate(records):
        if not isinstance(rec, Mapping):
            raise ValueError(f"input {i} is a {type(rec).__name__}, not an object with {FIELDS}")
        missing = [f for f in FIELDS if f not in rec]
        if missing:
            raise ValueError(f"input {i} lacks {missing}: each recording needs {list(FIELDS)}")
        eeg = _matrix(rec["eeg"])
        names = [str(n) for n in np.asarray(rec["ch_names"]).reshape(-1)]
        try:
            sfreq = float(np.asarray(rec["sfreq"]).reshape(-1)[0])
        except (TypeError, ValueError, IndexError):
            sfreq = float("nan")
        if eeg.ndim != 2 or eeg.size == 0:
            raise ValueError(
                f"input {i}: eeg must be a C x T list of lists of numbers (one row per channel, "
                f"microvolts), got shape {eeg.shape}"
            )
        if len(names) != eeg.shape[0]:
            raise ValueError(
                f"input {i}: eeg has {eeg.shape[0]} rows (channels) but {len(names)} ch_names"
            )
        if not np.isfinite(sfreq) or sfreq <= 0:
            raise ValueError(f"input {i}: sfreq must be a positive number of Hz, got {sfreq}")
        parsed.append({"eeg": eeg, "ch_names": names, "sfreq": sfreq})
    return parsed


def windows(recordings: list[dict[str, Any]], preprocess_cfg=None) -> list[dict[str, Any]]:
    """Reader-format samples of every window of every recording, cleaned as `brainmoe
    generate` cleans a file; ``meta`` holds ``input``, ``window`` and ``start_s``. A recording
    with no usable window is a ValueError that says why."""
    from shards.preprocess import PreprocessConfig, preprocess
    from shards.recording import Provenance, Recording
    from shards.sample import window_sample

    cfg = preprocess_cfg or PreprocessConfig()
    samples = []
    for i, r in enumerate(recordings):
        rec = Recording(r["eeg"], r["sfreq"], r["ch_names"], "uV", Provenance("request", str(i)))
        processed = preprocess(rec, cfg)
        if processed.channels is None or not processed.windows:
            reason = (
                processed.rejected_reason or f"every window rejected {dict(processed.rejected)}"
            )
            raise ValueError(f"input {i}: nothing to encode ({reason})")
        ch = processed.channels
        for win in processed.windows:
            meta = {"input": i, "window": win.index, "start_s": win.start_s}
            samples.append(
                window_sample(
                    win.data,
                    ch.names,
                    ch.positions,
                    processed.sfreq,
                    processed.bad_channels,
                    key=f"input{i}_w{win.index:06d}",
                    ch_known=ch.known,
                    meta=meta,
                )
            )
    return samples


def embed(encoder, samples: list[dict[str, Any]], pooling: str = "mean") -> np.ndarray:
    """Pooled embeddings `[n, D]` (``pooling`` as in pretrain.features) of reader samples.
    Flagged channels are left out, which is what the reader's mask does to them."""
    from pretrain.features import pooled_features

    eeg, names, pos = [], [], []
    for s in samples:
        good = np.array([n not in set(s["bad_channels"]) for n in s["ch_names"]])
        position = np.where(s["pos_known"][:, None], s["ch_pos"], np.nan)  # [C, 3]
        eeg.append(s["eeg"][good])
        names.append([n for n, g in zip(s["ch_names"], good, strict=True) if g])
        pos.append(position[good])
    rates = {s["sfreq"] for s in samples}
    assert len(rates) == 1, rates  # preprocess brings every recording to one rate
    return pooled_features(encoder, eeg, names, pos, rates.pop(), pooling=pooling)


def origins(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where each window came from, the first columns of every output row."""
    return [{k: s["meta"][k] for k in ("input", "window", "start_s")} for s in samples]


class EncoderModel(mlflow.pyfunc.PythonModel):
    """EEG recordings -> one pooled embedding per window (module docstring).

    ``params={"pooling": "regions"}`` picks another pooling of pretrain.features."""

    # the signature logged with the model validates inputs; without this MLflow 3 asks for
    # type hints on predict at import time (a warning for every process that imports us)
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from pretrain.encoder import Encoder

        self.encoder = Encoder.from_pretrained(context.artifacts[ARTIFACT]).eval()

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[dict]:
        from pretrain.features import POOLINGS

        pooling = (params or {}).get("pooling", "mean")
        if pooling not in POOLINGS:
            raise ValueError(f"params.pooling must be one of {POOLINGS}, got {pooling!r}")
        samples = windows(parse_inputs(model_input))
        pooled = embed(self.encoder, samples, pooling)  # [n, D]
        return [
            {**where, "embedding": e}
            for where, e in zip(origins(samples), pooled.astype(float).tolist(), strict=True)
        ]


def example_input(n_channels: int = 3, seconds: float = 4.0, sfreq: float = 160.0) -> dict:
    """A short real-looking window (10 Hz alpha + 1/f-ish noise, tens of uV) at 10-20 sites:
    the input example MLflow stores and validates the model with."""
    rng = np.random.default_rng(0)
    t = np.arange(round(seconds * sfreq)) / sfreq
    noise = np.cumsum(rng.normal(0, 2.0, (n_channels, t.size)), axis=1)
    noise -= noise.mean(axis=1, keepdims=True)
    eeg = 20 * np.sin(2 * np.pi * 10 * t) + noise + rng.normal(0, 5.0, (n_channels, t.size))
    names = ["C3", "Cz", "C4", "Fz", "Pz", "O1", "O2", "F3"][:n_channels]
    return {"eeg": eeg.round(2).tolist(), "ch_names": names, "sfreq": sfreq}


def requirements() -> list[str]:
    """What the model imports, pinned to what logged it (MLflow would otherwise load the model
    in a subprocess to guess). brainmoe itself must be importable where the model is served."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in (
        "mlflow",
        "torch",
        "numpy",
        "scipy",
        "pandas",
        "mne",
        "safetensors",
        "scikit-learn",
    ):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def log_pyfunc(
    python_model: str | Path,
    artifacts: dict[str, str],
    example: Any,
    outputs: list[tuple[str, Any]],
    params: dict[str, Any] | None = None,
) -> Any:
    """`mlflow.pyfunc.log_model` of ``python_model`` (a file that calls
    `mlflow.models.set_model`: MLflow's models-from-code) in the active run: the input schema inferred from
    ``example`` (an input, or MLflow's (input, params) pair), the output schema as declared (``[(column, MLflow type)]``: inferring it
    would load the model once more just to run it); returns the ModelInfo. MLflow loads the
    logged model once and predicts ``example`` before it returns."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types import ColSpec, Schema

    data = example[0] if isinstance(example, tuple) else example  # (input, params) or input
    inferred = infer_signature(data, params=params)
    signature = ModelSignature(
        inputs=inferred.inputs,
        outputs=Schema([ColSpec(kind, name) for name, kind in outputs]),
        params=inferred.params,
    )
    major = int(mlflow.__version__.split(".")[0])
    where = {"name": ARTIFACT} if major >= 3 else {"artifact_path": ARTIFACT}
    return mlflow.pyfunc.log_model(
        python_model=str(python_model),
        artifacts=artifacts,
        signature=signature,
        input_example=example,
        pip_requirements=requirements(),
        **where,
    )


WINDOW_COLUMNS = [("input", "long"), ("window", "long"), ("start_s", "double")]


def log_encoder(folder: str | Path) -> Any:
    """Log an exported encoder folder as a pyfunc model in the active run."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not an exported encoder (no config.json)")
    from mlflow.types.schema import Array

    outputs = [*WINDOW_COLUMNS, ("embedding", Array("double"))]
    return log_pyfunc(
        Path(__file__).with_name("pyfunc_entry.py"),
        {ARTIFACT: str(folder)},
        example_input(),
        outputs,
        {"pooling": "mean"},
    )
