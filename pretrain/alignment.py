"""Per-subject alignment for cross-subject decoding, on MOABB's unlabeled-target protocol.

Why: a frozen encoder can carry what a label needs and still fail across subjects, because
each head, cap and amplifier shifts every feature by its own offset and scale; a classifier
fitted on four subjects then reads the fifth through the wrong origin. The field's answer is
alignment with unlabeled data of each subject: re-centre each subject's covariances at the
identity (Euclidean / Riemannian alignment, He & Wu 2019, Zanini et al. 2018) or standardise
each subject's features (adaptive normalisation). MOABB >= 1.7 evaluates exactly that:
``CrossSubjectEvaluation(cs_mode=...)`` routes the training trials' ``subjects`` and an
unlabeled slice of the held-out subject (``X_target_unlabeled``, raw) to every pipeline step
that requests them, and scores the rest. No label of the held-out subject is ever seen.

Both steps here wrap the transform they align, because MOABB routes the target slice raw:
:class:`AlignedFeatures` (any feature transformer, e.g. the frozen encoder, then per-subject
z-scores) and :class:`AlignedCovariances` (pyriemann covariances, then per-subject
re-centring at the Riemannian mean). Training trials are aligned with their own subject's
statistics (``fit_transform``); ``transform`` uses the target slice's, or the pooled training
statistics when no slice was given (the plain protocol: then they are a StandardScaler and
plain covariances).

Shape legend: n trials, C channels, T samples, F features.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin, clone
from sklearn.preprocessing import StandardScaler


def _groups(subjects: Any, n: int) -> np.ndarray:
    if subjects is None:
        return np.zeros(n, dtype=int)
    subjects = np.asarray(subjects)
    if len(subjects) != n:
        raise ValueError(f"subjects has {len(subjects)} entries for {n} trials")
    return subjects


class _PerSubject(TransformerMixin, BaseEstimator):
    """Fit a base transform, then align every subject by statistics of its own trials."""

    def _base_fit(self, X, y):  # -> fitted base and its output on X
        raise NotImplementedError

    def _base_transform(self, X):
        raise NotImplementedError

    def _stats(self, Z: np.ndarray) -> Any:
        raise NotImplementedError

    def _apply(self, Z: np.ndarray, stats: Any) -> np.ndarray:
        raise NotImplementedError

    def fit_transform(self, X, y=None, subjects=None, X_target_unlabeled=None):
        Z = self._base_fit(X, y)
        groups = _groups(subjects, len(Z))
        out = np.empty_like(Z)
        for g in np.unique(groups):
            rows = groups == g
            out[rows] = self._apply(Z[rows], self._stats(Z[rows]))
        self.n_subjects_ = len(np.unique(groups))
        has_target = X_target_unlabeled is not None and len(X_target_unlabeled) > 0
        self.n_target_ = len(X_target_unlabeled) if has_target else 0
        # held-out trials are read by the target slice's statistics, else the pooled ones
        self.target_stats_ = self._stats(
            self._base_transform(X_target_unlabeled) if has_target else Z
        )
        return out

    def fit(self, X, y=None, subjects=None, X_target_unlabeled=None):
        self.fit_transform(X, y, subjects, X_target_unlabeled)
        return self

    def transform(self, X):
        return self._apply(self._base_transform(X), self.target_stats_)


class AlignedFeatures(_PerSubject):
    """``features`` (a transformer, cloned), then each subject's features z-scored by its own
    mean and std; held-out trials by the unlabeled target slice's."""

    def __init__(self, features=None):
        self.features = features

    def _base_fit(self, X, y):
        self.features_ = clone(self.features)
        return np.asarray(self.features_.fit_transform(X, y), dtype=np.float64)

    def _base_transform(self, X):
        return np.asarray(self.features_.transform(X), dtype=np.float64)

    def _stats(self, Z):
        return StandardScaler().fit(Z)  # a feature constant within the slice keeps scale 1

    def _apply(self, Z, stats):
        return stats.transform(Z)


class AlignedCovariances(_PerSubject):
    """pyriemann ``Covariances(estimator)``, then each subject's covariances re-centred at
    the identity: C -> M^-1/2 C M^-1/2 with M their Riemannian mean; held-out trials by the
    unlabeled target slice's mean."""

    def __init__(self, estimator: str = "oas"):
        self.estimator = estimator

    def _base_fit(self, X, y):
        from pyriemann.estimation import Covariances

        self.covariances_ = Covariances(self.estimator).fit(X, y)
        return self.covariances_.transform(X)

    def _base_transform(self, X):
        return self.covariances_.transform(X)

    def _stats(self, Z):
        from pyriemann.utils.base import invsqrtm
        from pyriemann.utils.mean import mean_riemann

        return invsqrtm(mean_riemann(Z))  # [C, C]

    def _apply(self, Z, stats):
        return stats @ Z @ stats  # [n, C, C]


def request_alignment_metadata(step: _PerSubject) -> _PerSubject:
    """Ask sklearn's metadata routing (as MOABB's evaluation enables it) to hand ``step`` the
    training subjects and the unlabeled target slice."""
    from sklearn import config_context

    with config_context(enable_metadata_routing=True):
        return step.set_fit_request(subjects=True, X_target_unlabeled=True)
