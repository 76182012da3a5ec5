"""`synthetic`: simulated EEG with planted, learnable structure -- offline, fast, exactly known.

Why it exists: the demo and every test of *learning* (masked-signal pretraining must lower
its loss, a linear probe on a pretrained encoder must beat a random-init one, EEG->image
retrieval must beat chance) need recordings whose ground truth is known, that build in
seconds on a laptop and need no download. White noise would make all of those tests
meaningless, so the simulator plants structure a model can find, inside the nuisances a
real corpus has, so the shared pipeline (canonical names, units, filters, resampling,
window rejection) is exercised on the way.

What a recording contains (generated in microvolts, delivered in volts as MNE gives them):

* Background, by default (`head=kernel`, the version-1 signals the learning tests were set
  on): pink sources spread over the scalp, mixed into the electrodes by a Gaussian kernel of
  distance (nearest-neighbour correlation ~0.6-0.7, less redundant than real EEG), plus a
  little independent sensor noise; beta/mu bursts of 4-7 uV.
* Background (~10-20 uV), with `head=sphere`: 1/f ("pink") cortical activity mixed into the
  electrodes by a spherical head model (shards/sources/synthetic_head.py), plus the reference electrode's own
  pink signal in every channel (72-80% of the background's variance), so channels are as
  redundant as in real EEG: in 4 s windows the correlation at 2-4, 4-6, 6-8, 8-12, 12-16 cm
  is within 0.05 of EEGMMIDB's (0.92, 0.88, 0.82, 0.74, 0.60), and on the 64-channel cap
  (`montage=1010`) so is the nearest-neighbour correlation (0.92; see
  tests/test_simulator_realism.py). Only the farthest pairs (~18 cm) correlate more than in
  EEGMMIDB (~0.5 against 0.35). Then a posterior alpha rhythm (9-11.5 Hz, waxing and
  waning); line noise at `line_freq` (a few uV, near-common phase); electrode noise, 1-2.5
  uV, except on the few poor contacts of each cap (8-16 uV, 6% of the electrodes).
* Artifacts (`artifacts=true`): blinks (100-200 uV slow frontal deflections) and muscle
  bursts (10-30 uV, broadband > 20 Hz, on one temporal side). They are a separate random
  stream, so `artifacts=false` gives the same recording minus exactly those.
* Trials, one every `trial_s` seconds from t=0 (so fixed windows of `trial_s` are trials).
  Each class has (a) an evoked response: a smooth Gaussian scalp bump at a class-specific
  site times a class-specific damped oscillation (10-15 uV, latency 120-300 ms, 2.5-6 Hz);
  and (b) an oscillatory power change: a beta/mu burst (3.7-6.5 uV, 12-26 Hz, a different
  frequency per class, 0.5-3 s after onset) at a class-specific site, with random phase,
  so only band power reveals it, as in motor imagery. Each stimulus *instance* of a class
  differs consistently from its siblings: it shifts the evoked latency (+-40 ms), sets the
  sign and size of a late component (350-550 ms, up to 6 uV) at a second class site, and
  scales the burst, so EEG->stimulus retrieval is learnable too. Class and instance
  patterns depend on `seed` only: a stimulus means the same thing for every subject.
  Single trials are noisy, as real ones are: a linear classifier on simple features gets
  ~0.7 for 4 classes on the default spec (see tests/test_synthetic_source.py), and so does
  CSP+LDA on the 8-30 Hz band (calibrated there: tests/test_simulator_realism.py).
* Subjects differ the way real ones do: an overall gain (0.7-1.4), a few mm / ms of jitter
  on every class pattern, their own alpha, background level and artifact rates, a different
  montage (the 19 electrodes of the 10-20 system that every subject has, so learning
  transfers, plus 0-13 of 26 10-10 electrodes: 19-32 channels, counts distinct for 14
  consecutive subjects; or, with `montage=1010`, everyone on EEGMMIDB's 64-channel cap),
  their own poor contacts, sometimes a shuffled channel order, and a vendor's spelling of the
  names, by subject number (1-based) modulo 4:

  1. "standard": MNE's names (``Fp1``, ``T7``, ``FCz``);
  2. "tuh": TUH-style ``EEG FP1-REF``, ``EEG T3-REF``, with the old 10-20 temporal names;
  3. "upper-1020": upper case with the old names (``FP1``, ``T3``, ``T5``, ``FCZ``);
  4. "physionet": PhysioNet's four characters padded with dots (``Fp1.``, ``Cz..``, ``Fcz.``).

  All of them canonicalise to 10-05 names in `shards.channels`; positions are left to the
  template montage (`Recording.ch_pos` is None), as for an EDF file.

Everything is drawn from `np.random.SeedSequence([seed, stream, subject, run])`, so a
subject's data are bit-identical whichever subjects are loaded, and in whatever order.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np

from shards.channels import standard_positions
from shards.recording import Event, Provenance, Recording, Rejected, WorkUnit, fingerprint
from shards.sources import Spec, parse_params
from shards.sources.synthetic_head import TEN_TEN, background_mixing

GENERATOR = "brainmoe.synthetic"
VERSION = 2  # bump when the generated signals change: it is part of every unit's fingerprint

# The 10-20 system: every subject has these, so what is learnt on one subject transfers.
CORE = (
    "Fp1", "Fp2", "F7", "F3", "Fz", "F4", "F8", "T7", "C3", "Cz",
    "C4", "T8", "P7", "P3", "Pz", "P4", "P8", "O1", "O2",
)  # fmt: skip
# 10-10 electrodes a subject may have on top (up to MAX_CHANNELS in all).
EXTRA = (
    "AF3", "AF4", "F1", "F2", "FT7", "FC5", "FC1", "FCz", "FC2", "FC6", "FT8", "C1", "C2",
    "TP7", "CP5", "CP1", "CPz", "CP2", "CP6", "TP8", "P1", "P2", "PO3", "POz", "PO4", "Oz",
)  # fmt: skip
MAX_CHANNELS = 32
MONTAGES = ("mixed", "1010")
HEADS = ("kernel", "sphere")
_BACKGROUND_WIDTH = 0.04  # head=kernel: width of the distance kernel (metres)  # per-subject 19-32 channels, or everyone on the 64-channel cap
SPELLINGS = ("standard", "tuh", "upper-1020", "physionet")
_OLD_NAMES = {"T7": "T3", "T8": "T4", "P7": "T5", "P8": "T6"}
# Class patterns sit away from the rim, where blinks and muscle live.
_RIM = {"Fp1", "Fp2", "F7", "F8", "FT7", "FT8", "T7", "T8", "TP7", "TP8", "P7", "P8", "O1", "O2"}

# Spatial scale of the class bumps on the template head (metres).
_PATTERN_WIDTH = 0.055
# The share of the background's variance that the reference puts in every channel (EEGMMIDB
# shares ~60% of its variance across all channels; the head model adds some of its own).
_REFERENCE_SHARE = (0.72, 0.80)
# Electrode noise (uV): most contacts are good, a few per cap are poor (as EEGMMIDB's right
# temporal channels), which is much of what decorrelates neighbours in real recordings.
_GOOD_CONTACT_UV, _POOR_CONTACT_UV, _POOR_CONTACTS = (1.0, 2.5), (8.0, 16.0), 0.06
# Random streams: [seed, stream, ...] seeds each, so streams never shift one another.
_WORLD, _MONTAGE, _SUBJECT, _RUN, _CONTACTS = 1, 2, 3, 4, 5


@dataclass
class SyntheticParams:
    subjects: int = 4
    classes: int = 4
    instances: int = 8  # stimulus instances per class
    runs: int = 2
    duration_s: float = 120.0  # per run
    sfreq: float = 250.0  # native rate; deliberately not the 200 Hz target
    trial_s: float = 4.0  # one trial onset every trial_s seconds from t=0
    seed: int = 0
    line_freq: float = 50.0  # 0 for none
    artifacts: bool = True
    # scale of every planted class/instance pattern (evoked, late, burst): 1 is the realistic
    # default; larger makes a world where decoding is easy, to test that a pipeline *can*
    # learn when the information is there, apart from how hard real data are
    effect: float = 1.0
    # "mixed": each subject has the 10-20 core plus some 10-10 electrodes (19-32 channels);
    # "1010": every subject wears EEGMMIDB's 64-channel 10-10 cap (e.g. to compare with it)
    montage: str = "mixed"
    # "sphere": background through the spherical head model, the reference's own signal and
    # poor contacts (as redundant as EEGMMIDB; tests/test_simulator_realism.py); "kernel": the
    # earlier Gaussian distance kernel (version-1 signals), still the default because the
    # learning tests' margins were set on it (see the module docstring)
    head: str = "kernel"

    def check(self, spec: str) -> None:
        """Raise ValueError naming every bad parameter and what to use instead."""
        problems = [
            f"{name}={value} must be a finite number"
            for name, value in (
                ("duration_s", self.duration_s),
                ("sfreq", self.sfreq),
                ("trial_s", self.trial_s),
                ("line_freq", self.line_freq),
                ("effect", self.effect),
            )
            if not math.isfinite(value)
        ]
        if problems:
            raise ValueError(f"source {spec!r}: " + "; ".join(problems))
        if self.subjects < 1:
            problems.append(f"subjects={self.subjects} must be at least 1")
        if self.classes < 2:
            problems.append(f"classes={self.classes} must be at least 2 (e.g. classes=4)")
        if self.instances < 1:
            problems.append(f"instances={self.instances} must be at least 1")
        if self.runs < 1:
            problems.append(f"runs={self.runs} must be at least 1")
        if self.sfreq < 100:
            problems.append(
                f"sfreq={self.sfreq} is too low for the planted beta bursts and muscle "
                "artifacts; use sfreq>=100 (e.g. 250)"
            )
        if self.trial_s < 1.0:
            problems.append(
                f"trial_s={self.trial_s} is too short for the planted responses; use trial_s>=1"
            )
        if self.duration_s < self.trial_s:
            problems.append(
                f"duration_s={self.duration_s} is shorter than one trial (trial_s={self.trial_s}); "
                "raise duration_s or lower trial_s"
            )
        if self.line_freq < 0 or (self.line_freq > 0 and self.line_freq >= self.sfreq / 2):
            problems.append(
                f"line_freq={self.line_freq} must be 0 (none) or below the Nyquist frequency "
                f"({self.sfreq / 2} Hz), e.g. 50 or 60"
            )
        if self.seed < 0:
            problems.append(f"seed={self.seed} must be non-negative")
        if self.effect < 0:
            problems.append(f"effect={self.effect} must be >= 0 (1 = the default strength)")
        if self.head not in HEADS:
            problems.append(f"head={self.head!r} must be one of {', '.join(HEADS)}")
        if self.montage not in MONTAGES:
            problems.append(f"montage={self.montage!r} must be one of {', '.join(MONTAGES)}")
        if problems:
            raise ValueError(f"source {spec!r}: " + "; ".join(problems))


@dataclass(frozen=True)
class ClassPattern:
    """What is planted for one class (before each subject's jitter): for tests and the demo."""

    label: str
    evoked_site: str  # electrode at the centre of the evoked response's scalp bump
    evoked_latency_s: float
    evoked_freq_hz: float
    late_site: str  # centre of the instance-dependent late component
    burst_site: str  # centre of the oscillatory burst
    burst_freq_hz: float


class SyntheticSource:
    def __init__(self, spec: str, params: SyntheticParams):
        params.check(spec)
        self.spec, self.params = spec, params

    @classmethod
    def from_spec(cls, spec: str, parsed: Spec) -> SyntheticSource:
        if parsed.argument is not None:
            raise ValueError(
                f"source {spec!r} takes no ':argument'; give parameters as a query, "
                "e.g. synthetic?subjects=4&classes=3"
            )
        return cls(spec, parse_params(SyntheticParams, parsed.params, spec))

    def units(self) -> list[WorkUnit]:
        # A subject's signals do not depend on how many subjects there are: leave that out of
        # the fingerprint, so asking for more subjects does not redo the finished ones.
        inputs = {k: v for k, v in asdict(self.params).items() if k != "subjects"}
        if inputs["effect"] == 1.0:
            del inputs["effect"]  # the default: fingerprints of builds made before it existed hold
        return [
            WorkUnit(
                id=f"synthetic-sub-{s:03d}",
                fingerprint=fingerprint(inputs, s, GENERATOR, VERSION),
                payload={"subject": s},
            )
            for s in range(1, self.params.subjects + 1)
        ]

    def load(self, unit: WorkUnit) -> Iterator[Recording | Rejected]:
        subject = int(unit.payload["subject"])
        p = self.params
        world = _world(p)
        subj = _subject(p, world, subject)
        for run in range(p.runs):
            data, events = _run(p, world, subj, subject, run)
            yield Recording(
                data=data,
                sfreq=p.sfreq,
                ch_names=list(subj.ch_names),
                unit="V",
                provenance=Provenance("synthetic", f"{subject:03d}", "0", str(run)),
                events=events,
                line_freq=p.line_freq or None,
                extra={"generator": GENERATOR, "version": VERSION},
            )


def class_patterns(params: SyntheticParams) -> list[ClassPattern]:
    """The planted class structure for `params` (it depends on seed and classes only)."""
    w = _world(params)
    sites = _sites()
    return [
        ClassPattern(
            label=f"class_{k}",
            evoked_site=sites[w.evoked_site[k]],
            evoked_latency_s=float(w.evoked_latency[k]),
            evoked_freq_hz=float(w.evoked_freq[k]),
            late_site=sites[w.late_site[k]],
            burst_site=sites[w.burst_site[k]],
            burst_freq_hz=float(w.burst_freq[k]),
        )
        for k in range(params.classes)
    ]


# ----------------------------------------------------------------------------- generation


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


def _sites() -> tuple[str, ...]:
    return CORE + EXTRA


def _positions(names) -> np.ndarray:
    table = standard_positions()
    return np.stack([table[n] for n in names])  # [C, 3] metres


def _bump(pos: np.ndarray, centre: np.ndarray, width: float) -> np.ndarray:
    """A smooth scalp topography: Gaussian in electrode distance. pos [C, 3], centre [..., 3]."""
    d2 = ((pos - centre[..., None, :]) ** 2).sum(-1)  # [..., C]
    return np.exp(-d2 / (2 * width**2))


def _spread(lo: float, hi: float, n: int) -> np.ndarray:
    return lo + (hi - lo) * (np.arange(n) + 0.5) / n  # n evenly spaced, centred values


def _farthest_first(pos: np.ndarray, start: int) -> np.ndarray:
    """Sites ordered so each is as far as possible from those before it. pos [sites, 3]."""
    order = [start]
    dist = np.linalg.norm(pos - pos[start], axis=1)
    for _ in range(len(pos) - 1):
        nxt = int(np.argmax(dist))
        order.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(pos - pos[nxt], axis=1))
    return np.array(order)


@dataclass(frozen=True)
class _World:
    """Class and instance patterns (seed only): [classes] or [classes, instances] arrays."""

    evoked_site: np.ndarray
    evoked_latency: np.ndarray
    evoked_freq: np.ndarray
    evoked_width: np.ndarray
    evoked_phase: np.ndarray
    evoked_amp: np.ndarray  # uV
    late_site: np.ndarray
    late_latency: np.ndarray
    late_width: np.ndarray
    burst_site: np.ndarray
    burst_freq: np.ndarray
    burst_amp: np.ndarray  # uV
    inst_shift: np.ndarray  # s, added to the evoked latency
    inst_late: np.ndarray  # uV of the late component, signed
    inst_burst: np.ndarray  # factor on the burst


def _world(p: SyntheticParams) -> _World:
    rng = _rng(p.seed, _WORLD)
    nc, ni = p.classes, p.instances
    sites = _sites()
    inner = np.array([i for i, n in enumerate(sites) if n not in _RIM])
    pos = _positions([sites[i] for i in inner])
    evoked = inner[_farthest_first(pos, int(rng.integers(len(inner))))]
    burst = inner[_farthest_first(pos, int(rng.integers(len(inner))))]
    ks = np.arange(nc)
    return _World(
        evoked_site=evoked[ks % len(evoked)],
        evoked_latency=rng.uniform(0.12, 0.30, nc),
        evoked_freq=rng.uniform(2.5, 6.0, nc),
        evoked_width=rng.uniform(0.10, 0.18, nc),
        evoked_phase=rng.uniform(0, 2 * np.pi, nc),
        evoked_amp=rng.uniform(10.0, 15.0, nc),
        late_site=inner[rng.integers(len(inner), size=nc)],
        late_latency=rng.uniform(0.35, 0.55, nc),
        late_width=rng.uniform(0.06, 0.10, nc),
        burst_site=burst[(ks + 1) % len(burst)],
        burst_freq=rng.permutation(_spread(12.0, 26.0, nc)),
        burst_amp=rng.uniform(3.7, 6.5, nc) if p.head == "sphere" else rng.uniform(4.0, 7.0, nc),
        inst_shift=rng.permuted(np.tile(_spread(-0.04, 0.04, ni), (nc, 1)), axis=1),
        inst_late=rng.permuted(np.tile(_spread(-6.0, 6.0, ni), (nc, 1)), axis=1),
        inst_burst=rng.permuted(np.tile(_spread(0.6, 1.4, ni), (nc, 1)), axis=1),
    )


@dataclass(frozen=True)
class _Subject:
    names: tuple[str, ...]  # canonical 10-05 names, in this subject's channel order
    ch_names: tuple[str, ...]  # as this subject's "vendor" spells them
    pos: np.ndarray  # [C, 3]
    mix: np.ndarray  # [C, C] head model: independent noise -> correlated background
    gain: float
    background_uv: float
    reference_share: float  # of the background's variance: the reference's own signal
    contact_uv: np.ndarray  # [C] each electrode's own noise
    alpha_freq: float
    alpha_uv: float
    blink_rate: float  # per second
    muscle_rate: float  # per second
    evoked_topo: np.ndarray  # [classes, C]
    late_topo: np.ndarray  # [classes, C]
    burst_topo: np.ndarray  # [classes, C]
    latency_jitter: np.ndarray  # [classes] s
    amp_jitter: np.ndarray  # [classes] factor


def _kernel_mixing(pos: np.ndarray) -> np.ndarray:
    """head=kernel: pink sources at every 10-10 site, mixed into the electrodes `pos [C, 3]`
    by a Gaussian of distance, rows normalised -> `[C, sites]`."""
    mix = _bump(_positions(_sites()), pos, _BACKGROUND_WIDTH)
    return mix / np.linalg.norm(mix, axis=1, keepdims=True)


def _spell(name: str, style: str) -> str:
    if style == "tuh":
        return f"EEG {_OLD_NAMES.get(name, name).upper()}-REF"
    if style == "upper-1020":
        return _OLD_NAMES.get(name, name).upper()
    if style == "physionet":
        return (name[0] + name[1:].lower()).ljust(4, ".")
    return name


def _subject(p: SyntheticParams, w: _World, subject: int) -> _Subject:
    counts = _rng(p.seed, _MONTAGE).permutation(MAX_CHANNELS - len(CORE) + 1)
    n_extra = int(counts[(subject - 1) % len(counts)])
    rng = _rng(p.seed, _SUBJECT, subject)
    extra = set(rng.choice(len(EXTRA), n_extra, replace=False).tolist())
    names = [n for i, n in enumerate(_sites()) if i < len(CORE) or i - len(CORE) in extra]
    if p.montage == "1010":
        names = list(TEN_TEN)  # the draw above still happens, so the traits below stay put
    if rng.random() < 0.5:
        names = [names[i] for i in rng.permutation(len(names))]
    style = SPELLINGS[(subject - 1) % len(SPELLINGS)]
    pos = _positions(names)

    gain = rng.uniform(0.7, 1.4)
    background_uv = rng.uniform(10.0, 15.0)
    alpha_freq, alpha_uv = rng.uniform(9.0, 11.5), rng.uniform(5.0, 10.0)
    blink_rate, muscle_rate = rng.uniform(2, 8) / 60, rng.uniform(0.5, 2) / 60
    sphere = p.head == "sphere"
    reference_share = rng.uniform(*_REFERENCE_SHARE) if sphere else 0.0
    contacts = _rng(p.seed, _CONTACTS, subject)
    contact_uv = np.where(
        contacts.random(len(names)) < _POOR_CONTACTS,
        contacts.uniform(*_POOR_CONTACT_UV, len(names)),
        contacts.uniform(*_GOOD_CONTACT_UV, len(names)),
    )
    # Per-class jitter last, so the scalar traits above do not depend on `classes`.
    nc = p.classes
    site_pos = _positions(_sites())
    jitter = rng.normal(0, 0.004, (3, nc, 3))  # [pattern, classes, xyz] metres
    topo = [
        _bump(pos, site_pos[sites] + jitter[j], _PATTERN_WIDTH)
        for j, sites in enumerate((w.evoked_site, w.late_site, w.burst_site))
    ]
    return _Subject(
        names=tuple(names),
        ch_names=tuple(_spell(n, style) for n in names),
        pos=pos,
        mix=background_mixing(names) if sphere else _kernel_mixing(pos),
        gain=float(gain),
        background_uv=float(background_uv),
        reference_share=float(reference_share),
        contact_uv=contact_uv,
        alpha_freq=float(alpha_freq),
        alpha_uv=float(alpha_uv),
        blink_rate=float(blink_rate),
        muscle_rate=float(muscle_rate),
        evoked_topo=topo[0],
        late_topo=topo[1],
        burst_topo=topo[2],
        latency_jitter=rng.normal(0, 0.01, nc),
        amp_jitter=rng.uniform(0.85, 1.15, nc),
    )


def _coloured(rng: np.random.Generator, n: int, T: int, sfreq: float, gain) -> np.ndarray:
    """[n, T] unit-variance noise whose amplitude spectrum is `gain(freqs)`."""
    spectrum = np.fft.rfft(rng.standard_normal((n, T)), axis=-1)
    x = np.fft.irfft(spectrum * gain(np.fft.rfftfreq(T, 1 / sfreq)), n=T, axis=-1)
    return x / x.std(axis=-1, keepdims=True)


def _blocks(rng: np.random.Generator, n_values: int, n: int) -> np.ndarray:
    """n draws from range(n_values), balanced: concatenated random permutations."""
    reps = max(1, -(-n // n_values))  # one even for n=0: a short run may miss a class
    return np.concatenate([rng.permutation(n_values) for _ in range(reps)])[:n]


def _run(
    p: SyntheticParams, w: _World, subj: _Subject, subject: int, run: int
) -> tuple[np.ndarray, list[Event]]:
    """One run: data [C, T] in volts and its trial events."""
    design, background, alpha, line, sensor, artifacts = np.random.SeedSequence(
        [p.seed, _RUN, subject, run]
    ).spawn(6)
    C, T, sfreq = len(subj.names), round(p.duration_s * p.sfreq), p.sfreq

    # Background: pink cortical activity through the head model, plus the reference's own
    # pink signal in every channel (see shards/sources/synthetic_head.py).
    pink = _coloured(
        np.random.default_rng(background),
        subj.mix.shape[1] + 1 if subj.reference_share else subj.mix.shape[1],
        T,
        sfreq,
        lambda f: np.where(f > 0, 1 / np.sqrt(np.maximum(f, 0.2)), 0.0),
    )  # [C + 1, T]
    share = subj.reference_share
    n_src = subj.mix.shape[1]
    neural = math.sqrt(1 - share) * (subj.mix @ pink[:n_src])  # [C, T] uV
    if share:
        neural = neural + math.sqrt(share) * pink[n_src]
    neural = subj.background_uv * neural

    a = _coloured(
        np.random.default_rng(alpha),
        1,
        T,
        sfreq,
        lambda f: np.exp(-0.5 * ((f - subj.alpha_freq) / 0.7) ** 2),
    )[0]  # [T]
    occipital = _positions(["Oz", "POz"]).mean(0)
    neural += subj.alpha_uv * np.outer(_bump(subj.pos, occipital, 0.05), a)

    events = _plant_trials(p, w, subj, neural, np.random.default_rng(design))
    data = subj.gain * neural

    if subj.reference_share:  # head=sphere: each contact's own noise
        data += subj.contact_uv[:, None] * np.random.default_rng(sensor).standard_normal((C, T))
    else:  # head=kernel: a little independent sensor noise, as in version 1
        rng = np.random.default_rng(sensor)
        data += rng.uniform(0.5, 1.5, (C, 1)) * rng.standard_normal((C, T))
    if p.line_freq > 0:
        rng = np.random.default_rng(line)
        amp = rng.uniform(1.0, 4.0, (C, 1))
        phase = rng.uniform(0, 2 * np.pi) + rng.normal(0, 0.2, (C, 1))
        t = np.arange(T) / sfreq
        data += amp * np.sin(2 * np.pi * p.line_freq * t + phase)
    if p.artifacts:
        _plant_artifacts(p, subj, data, np.random.default_rng(artifacts))
    return data * 1e-6, events


def _plant_trials(
    p: SyntheticParams, w: _World, subj: _Subject, out: np.ndarray, rng: np.random.Generator
) -> list[Event]:
    """Add every trial's class and instance response to out [C, T] (uV); return the events."""
    sfreq = p.sfreq
    N = int(math.floor(p.duration_s / p.trial_s + 1e-9))
    gain = p.effect  # scales every pattern below
    cls = _blocks(rng, p.classes, N)  # [N]
    inst = np.empty(N, dtype=np.int64)
    for k in range(p.classes):
        mine = np.flatnonzero(cls == k)
        inst[mine] = _blocks(rng, p.instances, len(mine))
    trial_latency_jitter = rng.normal(0, 0.008, N)
    trial_amp = np.clip(rng.normal(1.0, 0.15, N), 0.5, 1.5)
    burst_phase = rng.uniform(0, 2 * np.pi, N)
    burst_freq = w.burst_freq[cls] + rng.normal(0, 0.3, N)

    Ts = round(p.trial_s * sfreq)
    tt = np.arange(Ts) / sfreq  # [Ts] s after onset; Ts = samples in a trial
    lat = (w.evoked_latency + subj.latency_jitter)[cls] + w.inst_shift[cls, inst]
    lat = (lat + trial_latency_jitter)[:, None]  # [N, 1]
    evoked = (
        (w.evoked_amp * subj.amp_jitter)[cls, None]
        * trial_amp[:, None]
        * np.exp(-0.5 * ((tt - lat) / w.evoked_width[cls, None]) ** 2)
        * np.cos(2 * np.pi * w.evoked_freq[cls, None] * (tt - lat) + w.evoked_phase[cls, None])
    )  # [N, Ts]
    late = w.inst_late[cls, inst][:, None] * np.exp(
        -0.5 * ((tt - w.late_latency[cls, None]) / w.late_width[cls, None]) ** 2
    )  # [N, Ts]
    b0 = 0.5 * min(1.0, p.trial_s / 4)
    b1 = min(b0 + 2.5, 0.85 * p.trial_s)
    envelope = np.where(
        (tt >= b0) & (tt < b1), np.sin(np.pi * np.clip((tt - b0) / (b1 - b0), 0, 1)) ** 2, 0.0
    )  # [Ts]
    burst = (
        (w.burst_amp * subj.amp_jitter)[cls, None]
        * w.inst_burst[cls, inst][:, None]
        * envelope
        * np.sin(2 * np.pi * burst_freq[:, None] * tt + burst_phase[:, None])
    )  # [N, Ts]

    T = out.shape[1]
    events = []
    for i in range(N):
        onset = round(i * p.trial_s, 9)  # 3.9, not 3.9000000000000004, in the shard JSON
        o = round(onset * sfreq)
        n = min(Ts, T - o)
        k = int(cls[i])
        out[:, o : o + n] += gain * (
            subj.evoked_topo[k, :, None] * evoked[i, :n]
            + subj.late_topo[k, :, None] * late[i, :n]
            + subj.burst_topo[k, :, None] * burst[i, :n]
        )
        events.append(
            Event(
                onset=float(onset),
                duration=float(p.trial_s),
                label=f"class_{k}",
                stimulus_id=f"synthetic:c{k:02d}:i{int(inst[i]):02d}",
            )
        )
    return events


def _plant_artifacts(
    p: SyntheticParams, subj: _Subject, out: np.ndarray, rng: np.random.Generator
) -> None:
    """Add blinks (frontal) and muscle bursts (temporal) to out [C, T] (uV)."""
    C, T = out.shape
    sfreq = p.sfreq
    blink = np.zeros(T)
    n_blinks = rng.poisson(subj.blink_rate * p.duration_s)
    starts = rng.uniform(0, p.duration_s, n_blinks)
    lengths = rng.uniform(0.2, 0.4, n_blinks)
    amps = rng.uniform(100.0, 200.0, n_blinks)
    for start, length, amp in zip(starts, lengths, amps, strict=True):
        s, n = round(start * sfreq), round(length * sfreq)
        piece = amp * np.hanning(n + 2)[1:-1]
        blink[s : s + n] += piece[: T - s]
    frontal = _bump(subj.pos, _positions(["Fpz"])[0], 0.05)  # [C]
    out += np.outer(frontal, blink)

    n_bursts = rng.poisson(subj.muscle_rate * p.duration_s)
    if n_bursts == 0:
        return
    starts = rng.uniform(0, p.duration_s, n_bursts)
    lengths = rng.uniform(0.5, 2.0, n_bursts)
    amps = rng.uniform(10.0, 30.0, n_bursts)
    sides = rng.integers(2, size=n_bursts)
    envelope = np.zeros((2, T))  # [left/right, T]
    for start, length, amp, side in zip(starts, lengths, amps, sides, strict=True):
        s, n = round(start * sfreq), round(length * sfreq)
        envelope[side, s : s + n] += (amp * np.hanning(n + 2)[1:-1])[: T - s]
    top = min(150.0, 0.45 * sfreq)
    emg = _coloured(rng, C, T, sfreq, lambda f: ((f > 20) & (f < top)).astype(float))  # [C, T]
    temporal = _bump(subj.pos, _positions(["T7", "T8"]), 0.04)  # [2, C]
    out += (temporal.T @ envelope) * emg
