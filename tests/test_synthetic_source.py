"""The synthetic source: the protocol, determinism, realistic nuisances, and learnable structure.

The learning tests of later stages rely on this source planting structure a model can find;
the decoding test here is the guarantee that it does (and that shuffled labels do not).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.signal
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.model_selection import LeaveOneGroupOut, StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from shards.channels import canonicalize, standard_positions
from shards.preprocess import PreprocessConfig, detect_scale, preprocess
from shards.recording import Recording
from shards.sources import get_source
from shards.sources.synthetic import (
    CORE,
    EXTRA,
    MAX_CHANNELS,
    SyntheticParams,
    SyntheticSource,
    class_patterns,
)

STIMULUS = re.compile(r"^synthetic:c(\d{2}):i(\d{2})$")


def _source(spec: str) -> SyntheticSource:
    source = get_source(spec)
    assert isinstance(source, SyntheticSource)
    return source


def _load_all(source: SyntheticSource) -> list[Recording]:
    return [rec for unit in source.units() for rec in source.load(unit)]


@pytest.fixture(scope="module")
def default_recordings() -> list[Recording]:
    """The default spec: 4 subjects x 2 runs x 120 s, 4 classes (240 trials)."""
    return _load_all(_source("synthetic"))


def _canonical(rec: Recording) -> list[str]:
    info = canonicalize(rec.ch_names)
    assert all(info.known), [n for n, k in zip(rec.ch_names, info.known, strict=True) if not k]
    return info.names


# ----------------------------------------------------------------------------- the spec


def test_spec_defaults_and_overrides():
    assert _source("synthetic").params == SyntheticParams()
    p = _source("synthetic?subjects=2&classes=3&artifacts=false&seed=5&duration_s=30").params
    assert (p.subjects, p.classes, p.artifacts, p.seed, p.duration_s) == (2, 3, False, 5, 30.0)
    assert p.sfreq == 250.0 and p.trial_s == 4.0 and p.line_freq == 50.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("synthetic:extra", "takes no ':argument'"),
        ("synthetic?bogus=1", r"unknown parameter\(s\) \['bogus'\]"),
        ("synthetic?subjects=two", "not a valid int"),
        ("synthetic?artifacts=maybe", "true/false"),
        ("synthetic?subjects=0", "subjects=0 must be at least 1"),
        ("synthetic?classes=1", "classes=1 must be at least 2"),
        ("synthetic?instances=0", "instances=0 must be at least 1"),
        ("synthetic?runs=0", "runs=0 must be at least 1"),
        ("synthetic?duration_s=3", r"shorter than one trial \(trial_s=4.0\); raise duration_s"),
        ("synthetic?trial_s=0.5", "too short for the planted responses; use trial_s>=1"),
        ("synthetic?sfreq=64", "use sfreq>=100"),
        ("synthetic?line_freq=200", r"below the Nyquist frequency \(125.0 Hz\)"),
        ("synthetic?duration_s=nan", "duration_s=nan must be a finite number"),
        ("synthetic?seed=-1", "seed=-1 must be non-negative"),
        ("synthetic?montage=1020", "montage='1020' must be one of mixed, 1010"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        get_source(spec)
    assert spec in str(err.value)  # the message names the spec it came from


def test_every_problem_is_reported_at_once():
    with pytest.raises(ValueError, match="classes=1.*runs=0"):
        get_source("synthetic?classes=1&runs=0")


# ----------------------------------------------------------------------------- units


def test_units_are_stable_and_fingerprinted():
    units = _source("synthetic").units()
    assert [u.id for u in units] == [f"synthetic-sub-{s:03d}" for s in (1, 2, 3, 4)]
    assert [u.payload for u in units] == [{"subject": s} for s in (1, 2, 3, 4)]
    assert units == _source("synthetic").units()
    assert len({u.fingerprint for u in units}) == 4
    # More subjects does not invalidate the finished ones; any signal parameter does.
    assert _source("synthetic?subjects=6").units()[:4] == units
    for change in ("seed=1", "classes=3", "duration_s=60", "artifacts=false", "sfreq=256"):
        other = _source(f"synthetic?{change}").units()
        assert [u.id for u in other] == [u.id for u in units]
        assert all(a.fingerprint != b.fingerprint for a, b in zip(other, units, strict=True))


def test_same_params_give_bit_identical_data_in_any_order():
    spec = "synthetic?subjects=3&duration_s=24"
    source = _source(spec)
    forward = {(r.provenance.subject, r.provenance.run): r for r in _load_all(source)}
    assert len(forward) == 6
    backward = [rec for unit in reversed(_source(spec).units()) for rec in source.load(unit)]
    alone = list(_source(spec).load(_source(spec).units()[1]))  # subject 2 by itself
    assert [r.provenance.subject for r in alone] == ["002", "002"]
    for rec in backward + alone:
        ref = forward[(rec.provenance.subject, rec.provenance.run)]
        assert np.array_equal(rec.data, ref.data)
        assert rec.ch_names == ref.ch_names and rec.events == ref.events
    # ... and a different seed gives different data
    other = next(_source(spec + "&seed=1").load(source.units()[0]))
    first = forward[("001", "0")]
    assert other.data.shape != first.data.shape or not np.array_equal(other.data, first.data)


# ----------------------------------------------------------------------------- recordings


def test_recordings_follow_the_protocol(default_recordings):
    assert len(default_recordings) == 8
    for rec in default_recordings:
        s, r = rec.provenance.subject, rec.provenance.run
        assert (rec.provenance.dataset, rec.provenance.session) == ("synthetic", "0")
        assert s in ("001", "002", "003", "004") and r in ("0", "1")
        assert not rec.epoched and rec.data.shape[1] == 120 * 250 and rec.sfreq == 250.0
        assert rec.data.dtype == np.float64 and np.isfinite(rec.data).all()
        assert rec.unit == "V" and detect_scale(rec.data)[0] == "V"
        assert 5e-6 < rec.data.std() < 5e-5, f"{rec.data.std() * 1e6:.1f} uV is not EEG-like"
        assert rec.line_freq == 50.0 and rec.ch_pos is None
        assert rec.extra == {"generator": "brainmoe.synthetic", "version": 2}


def test_montages_differ_but_share_the_10_20_core(default_recordings):
    names_by_subject = {rec.provenance.subject: rec.ch_names for rec in default_recordings}
    counts = {len(names) for names in names_by_subject.values()}
    assert len(counts) == 4 and min(counts) >= len(CORE) and max(counts) <= MAX_CHANNELS, counts
    canonical = {}
    for rec in default_recordings:
        names = _canonical(rec)
        assert len(set(names)) == len(names)
        assert set(CORE) <= set(names) <= set(CORE + EXTRA)
        canonical[rec.provenance.subject] = names
    # Vendor spellings, one style per subject (see the module docstring).
    spelled = "\n".join(" ".join(names) for names in names_by_subject.values())
    for example in ("EEG FP1-REF", "EEG T3-REF", "FP1", "T5", "Cz..", "Fp1."):
        assert re.search(rf"(^|\s){re.escape(example)}(\s|$)", spelled), example
    assert len({tuple(sorted(n)) for n in canonical.values()}) == 4
    assert len({n.index("Cz") for n in canonical.values()}) > 1, "channel order never varies"


def test_events_are_evenly_spaced_balanced_trials(default_recordings):
    for rec in default_recordings:
        onsets = np.array([e.onset for e in rec.events])
        assert np.array_equal(onsets, 4.0 * np.arange(30))
        assert all(e.duration == 4.0 for e in rec.events)
        labels = [int(e.label.removeprefix("class_")) for e in rec.events]
        assert set(labels) <= set(range(4))
        counts = np.bincount(labels, minlength=4)
        assert counts.max() - counts.min() <= 1, counts
        for e, k in zip(rec.events, labels, strict=True):
            match = STIMULUS.match(e.stimulus_id or "")
            assert match and int(match[1]) == k and int(match[2]) < 8, e


def test_odd_rates_and_trial_lengths():
    spec = "synthetic?subjects=1&runs=1&duration_s=10.5&trial_s=1.3&sfreq=256&line_freq=0"
    rec = next(_source(spec).load(_source(spec).units()[0]))
    assert rec.data.shape[1] == round(10.5 * 256) and rec.line_freq is None
    assert [e.onset for e in rec.events] == [0.0, 1.3, 2.6, 3.9, 5.2, 6.5, 7.8, 9.1]


def test_windows_of_the_pipeline_are_the_trials(default_recordings):
    rec = default_recordings[0]
    processed = preprocess(rec, PreprocessConfig())
    assert processed.rejected_reason is None and not processed.rejected
    assert processed.channels is not None and processed.channels.layout == "10-05"
    assert len(processed.windows) == len(rec.events) == 30
    for win, event in zip(processed.windows, rec.events, strict=True):
        assert win.data.shape == (len(rec.ch_names), 800)  # 4 s at 200 Hz
        assert (win.label, win.stimulus_id) == (event.label, event.stimulus_id)
        assert len(win.events) == 1


# ----------------------------------------------------------------------------- signal


def test_spectrum_is_1_over_f_with_alpha_and_line_noise(default_recordings):
    for rec in default_recordings[::2]:
        names = _canonical(rec)
        cz, o1, fz = (names.index(c) for c in ("Cz", "O1", "Fz"))
        freqs, power = scipy.signal.welch(rec.data, fs=rec.sfreq, nperseg=512)  # [C, F]
        ratio = power[cz, np.argmin(np.abs(freqs - 2))] / power[cz, np.argmin(np.abs(freqs - 30))]
        assert ratio > 5, f"power at 2 Hz is only {ratio:.1f}x that at 30 Hz"
        alpha = (freqs >= 8) & (freqs <= 13)
        posterior = power[o1, alpha].sum() / power[fz, alpha].sum()
        assert posterior > 2, f"alpha is not posterior: O1/Fz power in 8-13 Hz = {posterior:.2f}"
        # Finer resolution for the line: a sinusoid's peak grows with it, noise does not.
        freqs, power = scipy.signal.welch(rec.data[cz], fs=rec.sfreq, nperseg=2048)
        near = (np.abs(freqs - 50) > 2) & (np.abs(freqs - 50) < 6)
        line = power[np.argmin(np.abs(freqs - 50))] / np.median(power[near])
        assert line > 10, f"line noise at 50 Hz is only {line:.1f}x its neighbours"


def test_artifacts_are_an_add_on_that_can_be_switched_off():
    on = _source("synthetic?subjects=1&runs=1")
    off = _source("synthetic?subjects=1&runs=1&artifacts=false")
    a, b = next(on.load(on.units()[0])), next(off.load(off.units()[0]))
    assert a.events == b.events and a.ch_names == b.ch_names
    diff = np.abs(a.data - b.data) * 1e6  # [C, T] uV
    names = _canonical(a)
    frontal = diff[[names.index("Fp1"), names.index("Fp2")]].max()
    assert frontal > 60, f"blinks reach only {frontal:.1f} uV at Fp1/Fp2"
    assert (diff.max(axis=0) == 0).mean() > 0.5, "artifacts must leave most samples untouched"


# ----------------------------------------------------------------------------- learnable


def _trial_features(recordings: list[Recording]):
    """Per trial on the 10-20 core: evoked (1-15 Hz, 0-0.8 s in 50 ms bins) and log band power
    (0.5-3 s in 8-13, 13-20, 20-30 Hz). Returns evoked [N, 19*16], power [N, 19*3], labels,
    subjects."""
    evoked, power, labels, groups = [], [], [], []
    for rec in recordings:
        sf, names = rec.sfreq, _canonical(rec)
        core = rec.data[[names.index(c) for c in CORE]] * 1e6  # [19, T] uV
        sos = scipy.signal.butter(4, [1, 15], btype="band", fs=sf, output="sos")
        slow = scipy.signal.sosfiltfilt(sos, core, axis=-1)
        step = round(0.05 * sf)
        for event in rec.events:
            o = round(event.onset * sf)
            evoked.append(slow[:, o : o + 16 * step].reshape(len(CORE), 16, step).mean(-1))
            seg = core[:, o + round(0.5 * sf) : o + round(3.0 * sf)]
            freqs, pxx = scipy.signal.welch(seg, fs=sf, nperseg=round(sf / 2))
            bands = [(8, 13), (13, 20), (20, 30)]
            power.append(
                [np.log(pxx[:, (freqs >= lo) & (freqs < hi)].mean(-1)) for lo, hi in bands]
            )
            labels.append(event.label)
            groups.append(rec.provenance.subject)
    n = len(labels)
    return (
        np.reshape(evoked, (n, -1)),
        np.reshape(power, (n, -1)),
        np.array(labels),
        np.array(groups),
    )


def test_class_structure_is_learnable_and_transfers(default_recordings):
    evoked, power, labels, subjects = _trial_features(default_recordings)
    both = np.hstack([evoked, power])
    chance = 1 / len(set(labels))
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.05, max_iter=2000))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    acc = {
        name: cross_val_score(clf, x, labels, cv=cv).mean()
        for name, x in (("evoked", evoked), ("band power", power), ("both", both))
    }
    shuffled = cross_val_score(clf, both, np.random.default_rng(0).permutation(labels), cv=cv)
    # Train on three subjects, test on the fourth: the shared core carries the patterns.
    loso = cross_val_score(clf, both, labels, cv=LeaveOneGroupOut(), groups=subjects)
    report = (
        f"5-fold accuracy over {len(labels)} trials (chance {chance:.2f}): "
        + ", ".join(f"{k} {v:.2f}" for k, v in acc.items())
        + f"; shuffled labels {shuffled.mean():.2f}; leave-one-subject-out {np.round(loso, 2)}"
    )
    print(report)
    assert acc["evoked"] > chance + 0.12, report
    assert acc["band power"] > chance + 0.25, report
    assert acc["both"] > chance + 0.3, report
    assert abs(shuffled.mean() - chance) < 0.1, report
    assert loso.mean() > chance + 0.2, report


def test_bursts_sit_where_class_patterns_say(default_recordings):
    """Each class's beta/mu burst raises band power at its site, for that class only."""
    patterns = class_patterns(SyntheticParams())
    assert len({p.burst_freq_hz for p in patterns}) == len(patterns)
    table = standard_positions()
    for k, pattern in enumerate(patterns):
        assert pattern.label == f"class_{k}"
        assert {pattern.evoked_site, pattern.late_site, pattern.burst_site} <= set(CORE + EXTRA)
        mine, others = [], []
        for rec in default_recordings:
            pos = canonicalize(rec.ch_names).positions  # [C, 3]
            c = int(np.argmin(np.linalg.norm(pos - table[pattern.burst_site], axis=1)))
            f0, sf = pattern.burst_freq_hz, rec.sfreq
            sos = scipy.signal.butter(4, [f0 - 1.5, f0 + 1.5], btype="band", fs=sf, output="sos")
            x = scipy.signal.sosfiltfilt(sos, rec.data[c] * 1e6)
            for e in rec.events:
                o = round(e.onset * sf)
                p = np.mean(x[o + round(1.0 * sf) : o + round(2.5 * sf)] ** 2)
                (mine if e.label == pattern.label else others).append(p)
        ratio = np.median(mine) / np.median(others)
        # Real mu/beta power changes are tens of percent; these are planted a little stronger.
        assert ratio > 1.4, f"{pattern.label}: {pattern.burst_freq_hz} Hz power x{ratio:.2f}"


def test_stimulus_instances_are_learnable():
    """Instances of a class differ consistently, so EEG->stimulus retrieval has signal."""
    recordings = _load_all(_source("synthetic?subjects=2&classes=2&instances=4&duration_s=480"))
    evoked, power, _, _ = _trial_features(recordings)
    stimuli = np.array([e.stimulus_id for rec in recordings for e in rec.events])
    features = np.hstack([evoked, power])
    chance = 1 / len(set(stimuli))  # 2 classes x 4 instances
    clf = make_pipeline(StandardScaler(), RidgeClassifier(alpha=100.0))
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    acc = cross_val_score(clf, features, stimuli, cv=cv).mean()
    shuffled = cross_val_score(
        clf, features, np.random.default_rng(0).permutation(stimuli), cv=cv
    ).mean()
    report = (
        f"stimulus accuracy over {len(stimuli)} trials {acc:.2f}, "
        f"shuffled {shuffled:.2f}, chance {chance:.3f}"
    )
    print(report)
    assert acc > 2.5 * chance and shuffled < 1.6 * chance, report
