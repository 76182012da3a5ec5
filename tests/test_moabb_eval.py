"""The frozen encoder as a scikit-learn transformer, and MOABB's evaluations of it, on real
EEGMMIDB epochs."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from pretrain import moabb_eval
from pretrain.encoder import Encoder
from pretrain.encoder_config import get_config
from pretrain.features import EncoderFeatures, pooled_features, region_of
from shards.channels import standard_positions


@pytest.fixture
def tiny_model(tmp_path):
    """A tiny encoder on disk; seeded apart from the random twins' seeds 0, 1, 2."""
    torch.manual_seed(123)
    return str(Encoder(get_config("tiny")).save_pretrained(tmp_path / "tiny"))


@pytest.fixture
def subject1(physionet):
    """MOABB's LeftRightImagery epochs of subject 1: X `[45, 64, 481]` (uV), labels, Epochs."""
    from moabb.datasets import PhysionetMI
    from moabb.paradigms import LeftRightImagery

    paradigm, dataset = LeftRightImagery(), PhysionetMI()
    X, y, _ = paradigm.get_data(dataset, subjects=[1])
    epochs = paradigm.get_data(dataset, subjects=[1], return_epochs=True)[0]
    return X, y, epochs


def test_transformer_in_pipeline_clone_and_grid_search(tiny_model, subject1):
    X, y, epochs = subject1
    features = EncoderFeatures(
        model=tiny_model, ch_names=epochs.ch_names, sfreq=epochs.info["sfreq"]
    )
    pipe = Pipeline(
        [("features", features), ("scale", StandardScaler()), ("lr", LogisticRegression())]
    )
    twin = clone(pipe)
    assert twin.get_params()["features__model"] == tiny_model
    assert twin.get_params()["features__pooling"] == "regions"
    assert not hasattr(twin.named_steps["features"], "encoder_")  # loaded in fit, not before

    pipe.fit(X, y)
    assert pipe.predict_proba(X).shape == (45, 2)
    f = pipe.named_steps["features"]
    assert f.unit_ == "uV"  # MOABB 1.7 hands out microvolts
    assert f.layer_ == 1  # tiny has 2 blocks; default: the last
    fx = f.transform(X)
    assert fx.shape == (45, 20 * 64) and np.isfinite(fx).all()
    np.testing.assert_allclose(twin.fit(X, y).named_steps["features"].transform(X), fx)

    grid = GridSearchCV(
        pipe,
        {"features__pooling": ["mean", "regions"], "features__layer": [0, None]},
        cv=StratifiedKFold(3, shuffle=True, random_state=0),
        scoring="roc_auc",
    )
    grid.fit(X, y)
    assert len(grid.cv_results_["params"]) == 4
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()
    assert grid.best_params_["features__pooling"] in ("mean", "regions")
    best = grid.best_estimator_.named_steps["features"]
    width = 64 if best.pooling == "mean" else 20 * 64
    assert best.transform(X).shape == (45, width)


def test_layers_units_and_random_twin(tiny_model, subject1):
    X, _, epochs = subject1
    info = {"ch_names": epochs.ch_names, "sfreq": epochs.info["sfreq"]}
    last = EncoderFeatures(tiny_model, **info).fit(X).transform(X)
    np.testing.assert_allclose(
        EncoderFeatures(tiny_model, layer=-1, **info).fit(X).transform(X), last, atol=1e-5
    )
    lower = EncoderFeatures(tiny_model, layer=0, **info).fit(X)
    assert lower.layer_ == 0
    assert not np.allclose(lower.transform(X), last, atol=1e-3)

    # An mne.Epochs brings its own names and rate, in volts: the same features as the uV array.
    from_epochs = EncoderFeatures(tiny_model).fit(epochs)
    assert from_epochs.unit_ == "V"
    np.testing.assert_allclose(from_epochs.transform(epochs), last, rtol=1e-4, atol=1e-4)

    twin = EncoderFeatures(tiny_model, random_init=True, seed=0, **info).fit(X).transform(X)
    again = EncoderFeatures(tiny_model, random_init=True, seed=0, **info).fit(X).transform(X)
    np.testing.assert_array_equal(twin, again)  # a twin is its seed
    assert not np.allclose(twin, last, atol=1e-3)


def test_batched_region_pooling_matches_one_by_one():
    std = standard_positions()
    rng = np.random.default_rng(0)
    montages = [["C3", "C4", "Cz"], ["Fp1", "C3", "C4", "O2", "Pz"], ["T7", "T8"]]
    eeg = [rng.normal(0, 20, (len(m), 640)).astype(np.float32) for m in montages]
    pos = [np.stack([std[n] for n in m]) for m in montages]
    encoder = Encoder(get_config("tiny"))
    batched = pooled_features(encoder, eeg, montages, pos, 160.0, pooling="regions")
    single = pooled_features(encoder, eeg, montages, pos, 160.0, pooling="regions", batch_size=1)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    # 19 sites + the global mean; the second window has Fp1 (site 0) but nothing near Fp2.
    sites = batched.reshape(3, 20, 64)
    assert region_of(pos[1]).tolist() == [0, 8, 10, 18, 14]
    assert np.abs(sites[1, 0]).sum() > 0 and np.abs(sites[1, 1]).sum() == 0


def test_bad_inputs_are_clear_errors(tiny_model):
    X = np.zeros((4, 3, 320))
    names = ["C3", "C4", "Cz"]
    with pytest.raises(ValueError, match="pooling must be one of"):
        EncoderFeatures(tiny_model, pooling="max", ch_names=names, sfreq=160).fit(X)
    with pytest.raises(ValueError, match="outside this encoder's 2 blocks"):
        EncoderFeatures(tiny_model, layer=2, ch_names=names, sfreq=160).fit(X)
    with pytest.raises(ValueError, match="needs ch_names= and sfreq="):
        EncoderFeatures(tiny_model).fit(X)
    with pytest.raises(ValueError, match="3 channels but 2 channel names"):
        EncoderFeatures(tiny_model, ch_names=names[:2], sfreq=160).fit(X)
    with pytest.raises(ValueError, match=r"epochs \[n, C, T\]"):
        EncoderFeatures(tiny_model, ch_names=names, sfreq=160).fit(X[0])
    with pytest.raises(ValueError, match="needs model="):
        EncoderFeatures(ch_names=names, sfreq=160).fit(X)
    with pytest.raises(ValueError, match="no such folder"):
        EncoderFeatures("/nonexistent/encoder", ch_names=names, sfreq=160).fit(X)

    assert moabb_eval.parse_subjects("1-3,5") == [1, 2, 3, 5]
    with pytest.raises(ValueError, match="--subjects"):
        moabb_eval.parse_subjects("one")
    with pytest.raises(ValueError, match="--evaluation"):
        moabb_eval.evaluate(tiny_model, evaluation="leave-one-out")
    with pytest.raises(ValueError, match="at least 2 subjects"):
        moabb_eval.evaluate(tiny_model, subjects=[1])
    with pytest.raises(ValueError, match="has no subjects"):
        moabb_eval.evaluate(tiny_model, subjects=[1, 200])
    with pytest.raises(ValueError, match="not a MOABB dataset"):
        moabb_eval.evaluate(tiny_model, dataset="NoSuchDataset")
    with pytest.raises(ValueError, match="--fmin < --fmax"):
        moabb_eval.evaluate(tiny_model, fmin=30, fmax=8)
    with pytest.raises(ValueError, match="positive or 'auto'"):
        moabb_eval.evaluate(tiny_model, c=-1.0)
    with pytest.raises(ValueError, match="needs --evaluation cross-subject"):
        moabb_eval.evaluate(tiny_model, evaluation="within-session", target="unlabeled-20p")
    with pytest.raises(ValueError, match="--target must be one of"):
        moabb_eval.evaluate(tiny_model, target="labeled")
    parser = argparse.ArgumentParser()
    moabb_eval.add_arguments(parser)
    assert parser.parse_args(["--model", "m", "--C", "auto"]).c is None
    with pytest.raises(SystemExit):  # argparse's own error message names --C
        parser.parse_args(["--model", "m", "--C", "strong"])


def test_local_fist_runs_reach_subjects_4_and_5(physionet):
    from moabb.datasets import PhysionetMI
    from moabb.paradigms import LeftRightImagery

    from pretrain.moabb_local import PhysionetFists

    paradigm = LeftRightImagery()
    X1, y1, _ = paradigm.get_data(PhysionetMI(), subjects=[1])
    X1_local, y1_local, _ = paradigm.get_data(PhysionetFists(), subjects=[1])
    np.testing.assert_array_equal(X1_local, X1)  # PhysionetMI's own epochs
    np.testing.assert_array_equal(y1_local, y1)
    X, y, meta = paradigm.get_data(PhysionetFists(), subjects=[4, 5])
    assert X.shape == (90, 64, 481)
    assert set(y) == {"left_hand", "right_hand"} and sorted(set(meta.subject)) == [4, 5]


def test_run_cross_subject_writes_every_field(tiny_model, physionet, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    moabb_eval.add_arguments(parser)
    out = tmp_path / "moabb.json"
    args = parser.parse_args(
        ["--model", tiny_model, "--subjects", "1,2", "--layer", "0", "--random-seeds", "2"]
        + ["--C", "auto", "--json", str(out)]
    )
    assert moabb_eval.run(args) == 0
    assert "layer 0 of 0..1" in capsys.readouterr().out

    result = json.loads(out.read_text())
    assert result["metric"] == "roc_auc"
    assert result["evaluation"] == "CrossSubjectEvaluation"
    assert result["dataset"] == "PhysionetMotorImagery"
    assert result["paradigm"] == "LeftRightImagery" and result["bands"] == [[8, 32]]
    assert result["subjects"] == [1, 2] and result["model"] == tiny_model
    assert (result["layer"], result["depth"], result["pooling"]) == (0, 2, "regions")
    assert result["C"] == "auto"  # chosen by inner CV in each fold
    assert result["random_seeds"] == [0, 1]
    pipes = result["pipelines"]
    assert set(pipes) == {"brainmoe", "brainmoe-random", "CSP+LDA", "TS+LR"}
    for row in pipes.values():
        assert 0.0 <= row["score"] <= 1.0 and row["std"] >= 0.0
    seeds = pipes["brainmoe-random"]["seeds"]
    assert set(seeds) == {"brainmoe-random-s0", "brainmoe-random-s1"}
    assert pipes["brainmoe-random"]["score"] == pytest.approx(np.mean(list(seeds.values())))
    assert pipes["TS+LR"]["score"] > 0.55  # the classic baseline finds left/right across people

    folds = result["folds"]
    assert [f["subject"] for f in folds] == [1, 2]  # cross-subject: one fold per held-out subject
    for fold in folds:
        assert fold["difference"] == pytest.approx(fold["brainmoe"] - fold["brainmoe-random"])
    diff = result["difference"]
    assert diff["n_folds"] == 2 and 0 <= diff["n_positive"] <= 2
    assert diff["mean"] == pytest.approx(np.mean([f["difference"] for f in folds]))
    assert diff["std"] == pytest.approx(np.std([f["difference"] for f in folds], ddof=1))
    assert pipes["brainmoe"]["score"] == pytest.approx(np.mean([f["brainmoe"] for f in folds]))


def test_cross_subject_with_an_unlabeled_target_slice_aligns_every_pipeline(
    tiny_model, physionet, monkeypatch
):
    """--target unlabeled-50p: MOABB's own protocol hands every aligned step the training
    subjects and half of the held-out subject's trials, unlabeled; the rest are scored."""
    from pretrain import alignment

    seen = []
    fit_transform = alignment._PerSubject.fit_transform

    def recording(self, X, y=None, subjects=None, X_target_unlabeled=None):
        seen.append((type(self).__name__, len(set(subjects)), len(X_target_unlabeled), len(X)))
        return fit_transform(self, X, y, subjects, X_target_unlabeled)

    monkeypatch.setattr(alignment._PerSubject, "fit_transform", recording)
    result = moabb_eval.evaluate(
        tiny_model, subjects=[1, 2], target="unlabeled-50p", random_seeds=1
    )
    assert (result["target"], result["aligned"]) == ("unlabeled-50p", True)
    assert "aligned per subject" in moabb_eval.format_result(result)
    # 2 folds x (brainmoe, one twin: AlignedFeatures; CSP+LDA, TS+LR: AlignedCovariances)
    assert sorted(seen) == sorted(
        [("AlignedFeatures", 1, 22, 45)] * 4 + [("AlignedCovariances", 1, 22, 45)] * 4
    ), seen
    for row in result["pipelines"].values():
        assert 0.0 <= row["score"] <= 1.0
