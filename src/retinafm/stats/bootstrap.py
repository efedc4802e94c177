"""Bootstrap resampling for confidence intervals and paired model comparisons.

Replicates are index arrays into the evaluated images. Each one comes from its own seeded
generator (seed, replicate number), so a replicate is the same whichever process draws it and
however the work is split. Resampling can keep every class's size (stratified) and can draw
whole patients (cluster bootstrap): images of one patient are not independent, and resampling
them one by one gives intervals that are too narrow.
"""
from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

MIN_PARALLEL_CHUNK = 50  # replicates per job below which a worker process costs more than it saves


class BootstrapSamples(Sequence):
    """`replicates` resamples of `n` items, drawn lazily (memory stays O(n), not O(n * replicates))."""

    def __init__(self, n: int, replicates: int, seed: int = 0, *, strata: np.ndarray | None = None,
                 groups: np.ndarray | None = None):
        if n < 1:
            raise ValueError("cannot bootstrap an empty set")
        if replicates < 1:
            raise ValueError(f"bootstrap replicates must be at least 1, got {replicates}")
        for name, values in (("strata", strata), ("groups", groups)):
            if values is not None and len(values) != n:
                raise ValueError(f"bootstrap {name} has {len(values)} entries for {n} items")
        self.n, self.replicates, self.seed = n, replicates, seed
        # Units are what gets drawn: single items, or patients (all their items at once).
        if groups is None:
            self._members = None
            unit_strata = np.asarray(strata) if strata is not None else None
        else:
            _, first, codes = np.unique(np.asarray(groups, dtype=str), return_index=True, return_inverse=True)
            order = np.argsort(codes, kind="stable")
            self._members = np.split(order, np.cumsum(np.bincount(codes))[:-1])
            # A patient's stratum is that of their first image (e.g. the class of one eye).
            unit_strata = np.asarray(strata)[first] if strata is not None else None
        units = len(self._members) if self._members is not None else n
        if unit_strata is None:
            self._pools = [np.arange(units)]
        else:
            _, unit_codes = np.unique(unit_strata, return_inverse=True)
            self._pools = [np.flatnonzero(unit_codes == c) for c in range(unit_codes.max() + 1)]

    def __len__(self) -> int:
        return self.replicates

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.replicates))]
        if not -self.replicates <= i < self.replicates:
            raise IndexError(i)
        rng = np.random.default_rng((self.seed, i % self.replicates))
        units = np.concatenate([pool[rng.integers(0, len(pool), len(pool))] for pool in self._pools])
        if self._members is None:
            return units
        return np.concatenate([self._members[u] for u in units])

    def __reduce__(self):  # pickled to worker processes without the drawn replicates
        return (_rebuild, (self.__dict__,))


def _rebuild(state: dict) -> BootstrapSamples:
    samples = BootstrapSamples.__new__(BootstrapSamples)
    samples.__dict__.update(state)
    return samples


def bootstrap_samples(n: int, replicates: int, seed: int = 0, *, strata: np.ndarray | None = None,
                      groups: np.ndarray | None = None) -> BootstrapSamples:
    """Index arrays of `replicates` resamples with replacement of `n` items: within each stratum
    when `strata` is given (per-item labels), whole groups (patients) at a time when `groups` is."""
    return BootstrapSamples(n, replicates, seed, strata=strata, groups=groups)


def _evaluate(statistic: Callable, samples: Sequence[np.ndarray], start: int, stop: int) -> list:
    with warnings.catch_warnings():
        # Small resamples make some metrics undefined (one class missing); they count as NaN.
        warnings.simplefilter("ignore")
        return [statistic(samples[i]) for i in range(start, stop)]


def _map(statistic: Callable, samples: Sequence[np.ndarray], n_jobs: int | None) -> list:
    """statistic(rows) for every replicate, in replicate order, over `n_jobs` processes (-1: all cores)."""
    total = len(samples)
    jobs = (os.cpu_count() or 1) if n_jobs in (None, -1) else max(1, int(n_jobs))
    jobs = min(jobs, max(1, total // MIN_PARALLEL_CHUNK))
    if jobs == 1:
        return _evaluate(statistic, samples, 0, total)
    from joblib import Parallel, delayed

    bounds = np.linspace(0, total, jobs + 1).astype(int)
    parts = Parallel(n_jobs=jobs)(delayed(_evaluate)(statistic, samples, int(a), int(b))
                                  for a, b in zip(bounds[:-1], bounds[1:], strict=True))
    return [value for part in parts for value in part]


def _percentiles(values: np.ndarray, level: float) -> tuple[float, float]:
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_ci(
    statistic: Callable[[np.ndarray], dict[str, float]],
    samples: Sequence[np.ndarray],
    *,
    level: float = 0.95,
    n_jobs: int | None = 1,
    min_defined: float = 0.5,
) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every value `statistic(rows)` returns, over the replicates.

    Replicates where a value is undefined (NaN) are left out of its interval; when more than
    `1 - min_defined` of them are, the interval is (NaN, NaN) rather than a misleading one.
    """
    if not 0 < level < 1:
        raise ValueError(f"confidence level must be between 0 and 1, got {level}")
    results = _map(statistic, samples, n_jobs)
    names = list(dict.fromkeys(k for r in results for k in r))
    intervals: dict[str, tuple[float, float]] = {}
    for name in names:
        values = np.array([r.get(name, math.nan) for r in results], dtype=float)
        defined = values[np.isfinite(values)]
        if len(defined) < max(1, min_defined * len(values)):
            intervals[name] = (math.nan, math.nan)
        else:
            intervals[name] = _percentiles(defined, level)
    return intervals


@dataclass(frozen=True)
class PairedDifference:
    """A metric of two models on the same images, its difference (b - a), CI and two-sided p."""

    a: float
    b: float
    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    replicates: int  # replicates where both values were defined


def paired_bootstrap(
    statistic: Callable[[np.ndarray], tuple[float, float]],
    samples: Sequence[np.ndarray],
    *,
    full: tuple[float, float],
    level: float = 0.95,
    n_jobs: int | None = 1,
) -> PairedDifference:
    """Paired bootstrap of b - a: both models are scored on the same resampled images, so the
    interval reflects the difference, not two independent uncertainties.

    `full` is (a, b) on all images: the point estimates. The two-sided p-value is twice the
    smaller share of replicate differences on either side of zero (at most 1), never reported
    below 1/(replicates + 1), the resolution the replicates give.
    """
    pairs = np.array(_map(statistic, samples, n_jobs), dtype=float).reshape(-1, 2)
    differences = pairs[:, 1] - pairs[:, 0]
    differences = differences[np.isfinite(differences)]
    a, b = (float(v) for v in full)
    if len(differences) == 0:
        return PairedDifference(a, b, b - a, math.nan, math.nan, math.nan, 0)
    low, high = _percentiles(differences, level)
    tail = min(np.mean(differences <= 0), np.mean(differences >= 0))
    p_value = max(min(1.0, 2 * float(tail)), 1 / (len(differences) + 1))
    return PairedDifference(a, b, b - a, low, high, p_value, len(differences))
