"""`moabb:<DatasetClass>`: any MOABB dataset through MOABB's own API.

Continuous raws (the default) feed pretraining; `paradigm=<ParadigmClass>` asks MOABB's
paradigm for labelled epochs instead (e.g. LeftRightImagery for motor-imagery probes).
Parameters the spec does not know are passed to the dataset's constructor, so
`moabb:FakeDataset?n_subjects=2&duration=60` works for any MOABB dataset argument.
Downloads go where MOABB puts them (MNE_DATA); a cluster needs it on shared storage.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, fields

from shards.recording import Provenance, Recording, Rejected, WorkUnit, fingerprint
from shards.sources import Spec, parse_params
from shards.sources.mne_raw import recording_from_epochs, recording_from_raw


@dataclass
class MoabbParams:
    subjects: list[int] | None = None
    paradigm: str | None = None  # a moabb.paradigms class name, for labelled epochs


class MoabbSource:
    def __init__(self, spec: str, name: str, params: MoabbParams, kwargs: dict):
        self.spec, self.name, self.params, self.kwargs = spec, name, params, kwargs
        self.dataset = _dataset_class(name, spec)(**kwargs)

    @classmethod
    def from_spec(cls, spec: str, parsed: Spec) -> MoabbSource:
        if not parsed.argument:
            raise ValueError(f"source {spec!r} needs a dataset class: moabb:<DatasetClass>")
        own = {f.name for f in fields(MoabbParams)}
        params = parse_params(
            MoabbParams, {k: v for k, v in parsed.params.items() if k in own}, spec
        )
        dataset_cls = _dataset_class(parsed.argument, spec)
        accepted = inspect.signature(dataset_cls.__init__).parameters
        kwargs = {}
        for key, raw in parsed.params.items():
            if key in own:
                continue
            if key not in accepted:
                raise ValueError(
                    f"source {spec!r}: {key!r} is neither a source parameter ({', '.join(sorted(own))}) "
                    f"nor an argument of {parsed.argument} ({', '.join(p for p in accepted if p != 'self')})"
                )
            kwargs[key] = _literal(raw)
        if params.paradigm is not None:
            _paradigm(params.paradigm, spec)
        return cls(spec, parsed.argument, params, kwargs)

    def units(self) -> list[WorkUnit]:
        available = list(self.dataset.subject_list)
        subjects = self.params.subjects or available
        missing = sorted(set(subjects) - set(available))
        if missing:
            raise ValueError(
                f"source {self.spec!r}: subjects {missing} are not in {self.name} "
                f"(it has {available[0]}..{available[-1]})"
            )
        mode = self.params.paradigm or "raw"
        return [
            WorkUnit(
                id=f"moabb-{self.name}-{mode}-sub-{s:03d}",
                fingerprint=fingerprint(self.name, self.kwargs, mode, s),
                payload={"subject": s},
            )
            for s in subjects
        ]

    def load(self, unit: WorkUnit) -> Iterator[Recording | Rejected]:
        subject = unit.payload["subject"]
        if self.params.paradigm:
            yield from self._epochs(subject)
            return
        sessions = self.dataset.get_data(subjects=[subject])[subject]
        for session, runs in sorted(sessions.items()):
            for run, raw in sorted(runs.items()):
                prov = Provenance(self.name, f"{subject:03d}", str(session), str(run))
                yield recording_from_raw(raw, prov)

    def _epochs(self, subject: int) -> Iterator[Recording]:
        paradigm = _paradigm(self.params.paradigm, self.spec)()
        epochs, labels, meta = paradigm.get_data(
            self.dataset, subjects=[subject], return_epochs=True
        )
        for (session, run), rows in meta.groupby(["session", "run"], sort=True):
            idx = rows.index.to_numpy()
            prov = Provenance(self.name, f"{subject:03d}", str(session), str(run))
            yield recording_from_epochs(epochs[idx], [labels[i] for i in idx], prov)


def _dataset_class(name: str, spec: str):
    import moabb.datasets

    cls = getattr(moabb.datasets, name, None)
    if not inspect.isclass(cls):
        known = [n for n in dir(moabb.datasets) if n[0].isupper()]
        raise ValueError(
            f"source {spec!r}: moabb has no dataset {name!r}; e.g. {', '.join(known[:8])}, ... "
            "(see moabb.datasets)"
        )
    return cls


def _paradigm(name: str, spec: str):
    import moabb.paradigms

    cls = getattr(moabb.paradigms, name, None)
    if not inspect.isclass(cls):
        raise ValueError(
            f"source {spec!r}: moabb has no paradigm {name!r} (e.g. LeftRightImagery, MotorImagery, P300, SSVEP)"
        )
    return cls


def _literal(raw: str):
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw
