"""Per-subject alignment (pretrain/alignment.py): what each step computes, and that sklearn's
metadata routing -- as MOABB's cross-subject protocol uses it -- hands it the subjects and the
unlabeled target trials."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import config_context
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer

from pretrain.alignment import AlignedCovariances, AlignedFeatures, request_alignment_metadata


def _subject_shifted(rng, n=40, f=5, offset=0.0, scale=1.0):
    """Two classes apart along feature 0, then a subject's own offset and gain."""
    y = np.arange(n) % 2
    x = rng.normal(0, 1, (n, f))
    x[:, 0] += 2 * y
    return offset + scale * x, y


def test_features_are_z_scored_per_subject_and_the_target_by_its_own_slice():
    rng = np.random.default_rng(0)
    xa, ya = _subject_shifted(rng, offset=10.0, scale=1.0)
    xb, yb = _subject_shifted(rng, offset=-5.0, scale=3.0)
    xt, _ = _subject_shifted(rng, offset=40.0, scale=0.5)  # held-out subject
    X, subjects = np.vstack([xa, xb]), np.array([1] * 40 + [2] * 40)
    step = AlignedFeatures(FunctionTransformer())
    Z = step.fit_transform(X, None, subjects=subjects, X_target_unlabeled=xt[:20])
    for s in (1, 2):
        np.testing.assert_allclose(Z[subjects == s].mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(Z[subjects == s].std(0), 1, atol=1e-5)
    assert step.n_subjects_ == 2 and step.n_target_ == 20
    out = step.transform(xt[:20])
    np.testing.assert_allclose(out.mean(0), 0, atol=1e-9)  # the slice's own statistics
    # Without subjects or a target slice it is a StandardScaler on the pooled data.
    plain = AlignedFeatures(FunctionTransformer()).fit(X)
    np.testing.assert_allclose(plain.transform(X).mean(0), 0, atol=1e-9)
    assert plain.n_subjects_ == 1 and plain.n_target_ == 0
    with pytest.raises(ValueError, match="subjects has 3 entries for 80 trials"):
        AlignedFeatures(FunctionTransformer()).fit(X, subjects=[1, 2, 3])


def test_covariances_are_recentred_at_the_identity_per_subject():
    from pyriemann.utils.mean import mean_riemann

    rng = np.random.default_rng(1)
    mixing = {s: rng.normal(0, 1, (4, 4)) + 3 * np.eye(4) for s in (1, 2)}
    X = np.concatenate(
        [np.einsum("ij,njt->nit", mixing[s], rng.normal(0, 1, (12, 4, 200))) for s in (1, 2)]
    )
    subjects = np.repeat([1, 2], 12)
    step = AlignedCovariances("oas")
    C = step.fit_transform(X, None, subjects=subjects, X_target_unlabeled=X[:12])
    assert C.shape == (24, 4, 4)
    for s in (1, 2):
        np.testing.assert_allclose(mean_riemann(C[subjects == s]), np.eye(4), atol=1e-4)
    np.testing.assert_allclose(mean_riemann(step.transform(X[:12])), np.eye(4), atol=1e-4)


def test_metadata_routing_hands_the_step_subjects_and_the_target_slice():
    """What MOABB's CrossSubjectEvaluation does with cs_mode=train_and_target_unlabeled_*: the
    pipeline is fitted with routing on, and only steps that asked get the metadata."""
    rng = np.random.default_rng(2)
    xa, ya = _subject_shifted(rng)
    xb, yb = _subject_shifted(rng)
    xt, yt = _subject_shifted(rng, offset=np.array([5.0, 0, 0, 0, 0]))  # along the class axis
    X, y = np.vstack([xa, xb]), np.concatenate([ya, yb])
    subjects = np.repeat([1, 2], 40)
    pipe = make_pipeline(
        request_alignment_metadata(AlignedFeatures(FunctionTransformer())), LogisticRegression()
    )
    with config_context(enable_metadata_routing=True):
        pipe.fit(X, y, subjects=subjects, X_target_unlabeled=xt)
    step = pipe.steps[0][1]
    assert step.n_subjects_ == 2 and step.n_target_ == 40
    # The held-out subject sits past the boundary: aligned, it is read at its own origin.
    assert pipe.score(xt, yt) > 0.75
    unaligned = make_pipeline(AlignedFeatures(FunctionTransformer()), LogisticRegression())
    assert unaligned.fit(X, y).score(xt, yt) < 0.6
