"""A finetune output (adapters, projectors and the encoder they were trained on) as an MLflow
pyfunc model: `mlflow.pyfunc.load_model` / `mlflow models serve` turn EEG into what `brainmoe
generate` writes, as JSON.

Shape legend: B batch, Dc CLIP width.

The input is the encoder model's (pretrain/pyfunc.py: one ``{"eeg", "ch_names", "sfreq"}``
recording, a list of them, or a DataFrame), cut into windows the same way. Each output row
is one window: ``input``, ``window``, ``start_s``, then what the heads give --

- ``caption`` (text head): the greedy caption `brainmoe generate` writes;
- ``images`` (image head): ``num_images`` PNGs, base64-encoded (a served model's files would
  be out of a remote caller's reach; ``num_images=0`` skips the diffusion);
- ``clip_embedding`` (retrieval head): the window's unit vector in the CLIP space, to rank
  any gallery of CLIP image embeddings by dot product; and with a gallery logged beside the
  model (the run's CLIP cache), ``retrieval``: the ``top_k`` stimuli ``{stimulus_id,
  score}``, best first, scored by cosine similarity.

The model is rebuilt by `finetune.generate.load_finetuned`, so its checks hold here too:
checksums, and an encoder whose weights differ from the recorded fingerprint is refused. The
encoder is fetched from the finetune's ``encoder_uri`` when the model loads (a registry URI:
set MLFLOW_TRACKING_URI where the model is served), not copied into every heads version.
"""

from __future__ import annotations

import base64
import io
import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow.pyfunc

from pretrain.pyfunc import (
    ARTIFACT,
    WINDOW_COLUMNS,
    example_input,
    log_pyfunc,
    origins,
    parse_inputs,
    windows,
)

GALLERY = "gallery"  # artifact key of a CLIP cache folder (finetune/clip_cache.py)
PARAMS = {"num_images": 1, "steps": 0, "seed": 0, "top_k": 5}  # steps 0: the head's default


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _params(params: dict[str, Any] | None) -> dict[str, int]:
    """The request's params over the defaults; a ValueError for one out of range."""
    out = {k: int((params or {}).get(k, v)) for k, v in PARAMS.items()}
    low = {"num_images": 0, "steps": 0, "seed": 0, "top_k": 1}
    bad = {k: v for k, v in out.items() if v < low[k]}
    if bad:
        raise ValueError(f"params {bad} out of range: need { ({k: f'>= {low[k]}' for k in bad}) }")
    return out


class HeadsModel(mlflow.pyfunc.PythonModel):
    """EEG recordings -> per window, a caption, images and retrieval (module docstring)."""

    # the signature logged with the model validates inputs (see pretrain.pyfunc.EncoderModel)
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        from finetune.generate import load_finetuned

        folder = context.artifacts[ARTIFACT]
        # the encoder version it resolves is downloaded here and read into memory: the folder
        # goes at once (held for the model's life it stayed in /tmp whenever the process ended
        # without atexit, as a Ray worker does after MLflow validates an input example)
        with tempfile.TemporaryDirectory(prefix="brainmoe-heads-") as workdir:
            self.model, self.meta, _ = load_finetuned(folder, None, Path(workdir))
        self.gallery = None  # (stimulus ids [S], their CLIP image embeddings [S, Dc])
        if context.artifacts.get(GALLERY):
            from finetune.clip_cache import ClipCache

            cache = ClipCache.load(context.artifacts[GALLERY])
            self.gallery = (cache.ids, cache.image(cache.ids).float())

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> list[dict]:
        import torch

        p = _params(params)
        samples = windows(parse_inputs(model_input))
        with torch.no_grad():
            decoded = self._decode(samples, p)
        return [{**where, **row} for where, row in zip(origins(samples), decoded, strict=True)]

    def _decode(self, samples: list[dict[str, Any]], p: dict[str, int]) -> list[dict[str, Any]]:
        """Each head's `decode` per window (as `brainmoe generate`), JSON-ready."""
        from finetune.inputs import batches

        decoded: list[dict[str, Any]] = []
        for batch in batches(samples):
            _, tokens, valid = self.model.read(batch)
            out: dict[str, list] = {}
            for name, head in self.model.heads.items():
                if name == "image" and p["num_images"] == 0:
                    continue
                out.update(
                    head.decode(
                        tokens,
                        valid,
                        num_images=p["num_images"],
                        steps=p["steps"] or None,
                        seed=p["seed"],
                    )
                )
            if "retrieval" in self.model.heads:
                out.update(self._retrieval(tokens, valid, p["top_k"]))
            for b in range(len(batch["key"])):
                row = {k: v[b] for k, v in out.items()}
                if "images" in row:
                    row["images"] = [_png(image) for image in row["images"]]
                decoded.append(row)
        return decoded

    def _retrieval(self, tokens, valid, top_k: int) -> dict[str, list]:
        emb = self.model.heads["retrieval"].embed(tokens, valid).float()  # [B, Dc]
        out: dict[str, list] = {"clip_embedding": emb.tolist()}
        if self.gallery is not None:
            ids, gallery = self.gallery
            scores = emb @ gallery.T  # [B, S] cosine: both sides are unit vectors
            best = scores.topk(min(top_k, len(ids)), dim=1)
            out["retrieval"] = [
                [{"stimulus_id": ids[j], "score": float(s)} for s, j in zip(v, i, strict=True)]
                for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
            ]
        return out


def output_columns(tasks: list[str], gallery: bool) -> list[tuple[str, Any]]:
    """The output schema of a heads model with these tasks."""
    from mlflow.types.schema import Array, Object, Property

    columns = list(WINDOW_COLUMNS)
    if "text" in tasks:
        columns.append(("caption", "string"))
    if "image" in tasks:
        columns.append(("images", Array("string")))
    if "retrieval" in tasks:
        columns.append(("clip_embedding", Array("double")))
        if gallery:
            hit = Object([Property("stimulus_id", "string"), Property("score", "double")])
            columns.append(("retrieval", Array(hit)))
    return columns


def log_heads(folder: str | Path, gallery: str | Path | None = None) -> Any:
    """Log a finetune output folder (and optionally a CLIP cache folder to rank) as a pyfunc
    model in the active run. MLflow runs the model once on a short example as it logs it
    (captions and retrieval only: ``num_images=0`` keeps the diffusion out of registration)."""
    folder = Path(folder)
    meta_path = folder / "finetune.json"
    if not meta_path.is_file():
        raise ValueError(f"{folder} is not a finetune output (no finetune.json)")
    tasks = list(json.loads(meta_path.read_text()).get("tasks", []))
    artifacts = {ARTIFACT: str(folder)}
    if gallery is not None:
        if not (Path(gallery) / "index.json").is_file():
            raise ValueError(f"gallery {gallery} is not a CLIP cache folder (no index.json)")
        artifacts[GALLERY] = str(gallery)
    example = (example_input(), {**PARAMS, "num_images": 0})
    return log_pyfunc(
        Path(__file__).with_name("pyfunc_entry.py"),
        artifacts,
        example,
        output_columns(tasks, gallery is not None),
        dict(PARAMS),
    )
