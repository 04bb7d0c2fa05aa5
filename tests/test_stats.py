"""aurora_core.diagnose.stats against its oracles (ruptures' PELT, scipy.stats) on seeded random cases and
the edge cases, and the import check: diagnose and compare load neither scipy nor ruptures (issue 14)."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import pytest
import ruptures as rpt
from scipy import special, stats

from aurora_core.diagnose.stats import (
    _t_sf,
    fisher_greater_p,
    mannwhitney_greater_p,
    pelt_l2,
    ttest_greater_p,
)

RTOL = 1e-9


def close(ours: float, ref: float) -> bool:
    """Equal within RTOL where the reference is above 1e-300; below, both merely tiny."""
    if math.isnan(ref):
        return math.isnan(ours)
    if ref <= 1e-300:
        return ours <= 1e-290
    return abs(ours - ref) <= RTOL * ref


def _ref_pelt(x, pen, min_size, jump=1):
    return rpt.Pelt(model="l2", min_size=min_size, jump=jump).fit(x).predict(pen=pen)


def _signal(rng, n: int, d: int, kind: str) -> np.ndarray:
    x = rng.normal(size=(n, d))
    for _ in range(int(rng.integers(0, 5))):  # level shifts of random size at random places
        x[int(rng.integers(0, n)):] += rng.normal(0, 3, size=d)
    if kind == "ties":  # repeated values: many equal segment costs
        x = np.round(x)
    elif kind == "flat":  # flat stretches (zero-cost segments) among noise
        a = int(rng.integers(0, n - 3))
        x[a:a + int(rng.integers(3, max(4, n // 3)))] = 0.7
    elif kind == "offset":  # a large level, as log-latencies over their noise scale are
        x += 80.0
    return x


# --------------------------------------------------------------------------------------------------
# PELT
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["noise", "ties", "flat", "offset"])
def test_pelt_matches_ruptures_as_diagnose_calls_it(kind):
    """jump=1, min_size=3, pen = 3 d ln n, d = 2: change_points' call, n from 6 to 300."""
    rng = np.random.default_rng({"noise": 1, "ties": 2, "flat": 3, "offset": 4}[kind])
    for _ in range(30):
        n = int(rng.integers(6, 60)) if rng.random() < 0.6 else int(rng.integers(60, 300))
        x = _signal(rng, n, 2, kind)
        pen = 3.0 * 2 * math.log(n)
        assert pelt_l2(x, pen, 3, jump=1) == _ref_pelt(x, pen, 3), (kind, n)


def test_pelt_matches_ruptures_at_1000_intervals():
    rng = np.random.default_rng(5)
    x = _signal(rng, 1000, 2, "noise")
    x[400:430] += 4.0
    pen = 6 * math.log(1000)
    ours = pelt_l2(x, pen, 3)
    assert ours == _ref_pelt(x, pen, 3)
    assert len(ours) > 2  # found the shifts: not a trivially agreeing single segment


@pytest.mark.parametrize("min_size,jump", [(1, 1), (2, 1), (5, 1), (3, 2), (2, 5), (4, 3), (7, 4)])
def test_pelt_matches_ruptures_other_sizes_and_jumps(min_size, jump):
    """ruptures' admissible points with jump > 1 (and its zip of admissible points with candidates)."""
    rng = np.random.default_rng(10 * min_size + jump)
    for k in range(25):
        n = int(rng.integers(max(min_size, 6), 120))
        d = int(rng.integers(1, 4))
        x = _signal(rng, n, d, ["noise", "ties", "flat"][k % 3])
        pen = float(rng.uniform(0.5, 4.0)) * d * math.log(n)
        assert pelt_l2(x, pen, min_size, jump) == _ref_pelt(x, pen, min_size, jump), (n, d)


def test_pelt_edge_cases():
    rng = np.random.default_rng(6)
    x1 = rng.normal(size=50)
    x1[20:] += 5
    assert pelt_l2(x1, 10.0, 3) == _ref_pelt(x1, 10.0, 3)  # 1-D input, as ruptures reshapes it
    for n in (3, 4, 5, 6):  # down to one segment of min_size
        x = rng.normal(size=(n, 2))
        assert pelt_l2(x, 1.0, 3) == _ref_pelt(x, 1.0, 3)
    flat = np.full((40, 2), 0.1)  # every segment costs 0: ties everywhere, broken as ruptures does
    assert pelt_l2(flat, 6 * math.log(40), 3) == _ref_pelt(flat, 6 * math.log(40), 3) == [40]
    steps = np.repeat([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0]], [10, 10, 10], axis=0)  # exact steps, zero noise
    assert pelt_l2(steps, 1.0, 3) == _ref_pelt(steps, 1.0, 3) == [10, 20, 30]
    assert pelt_l2(steps, 0.0, 3) == _ref_pelt(steps, 0.0, 3)  # no penalty
    with pytest.raises(ValueError, match="pelt_l2: 2 samples cannot hold one segment of min_size 3"):
        pelt_l2(np.zeros((2, 2)), 1.0, 3)
    with pytest.raises(ValueError, match="NaN or inf"):
        pelt_l2(np.array([[1.0, np.nan]] * 10), 1.0, 3)
    with pytest.raises(ValueError, match="jump >= 1"):
        pelt_l2(np.zeros((10, 2)), 1.0, 3, jump=0)
    with pytest.raises(ValueError, match="penalty >= 0"):
        pelt_l2(np.zeros((10, 2)), -1.0, 3)


# --------------------------------------------------------------------------------------------------
# Mann-Whitney
# --------------------------------------------------------------------------------------------------
def _ref_mw(a, b) -> float:
    return float(stats.mannwhitneyu(a, b, alternative="greater").pvalue)


def test_mannwhitney_matches_scipy_random():
    """Both of scipy's paths: exact (a side <= 8, no ties) and asymptotic (ties or both > 8)."""
    rng = np.random.default_rng(7)
    paths = {"exact": 0, "asymptotic": 0}
    for k in range(400):
        n1 = int(rng.integers(1, 12)) if k % 2 else int(rng.integers(1, 300))
        n2 = int(rng.integers(1, 12)) if k % 3 else int(rng.integers(1, 300))
        a = rng.lognormal(0, 1, n1) * float(rng.choice([1.0, 1.3, 3.0]))
        b = rng.lognormal(0, 1, n2)
        if k % 4 == 0:  # ties: rounded latencies
            a, b = np.round(a, 1), np.round(b, 1)
        exact = (n1 <= 8 or n2 <= 8) and np.unique(np.r_[a, b]).size == n1 + n2
        paths["exact" if exact else "asymptotic"] += 1
        assert close(mannwhitney_greater_p(a, b), _ref_mw(a, b)), (n1, n2, k)
    assert min(paths.values()) > 50


@pytest.mark.parametrize("n1,n2,shift", [(8, 2000, 0.0), (3, 4000, 2.0), (8, 500, -1.0), (5, 5, 10.0),
                                         (1, 1, 1.0), (2, 9, 0.5), (8, 8, 0.0)])
def test_mannwhitney_exact_path_large_other_side(n1, n2, shift):
    """The exact null distribution with one small side and one large (counts beyond uint64), both tails."""
    rng = np.random.default_rng(n1 * 10_000 + n2)
    a, b = rng.normal(shift, 1, n1), rng.normal(0, 1, n2)
    assert close(mannwhitney_greater_p(a, b), _ref_mw(a, b))
    assert close(mannwhitney_greater_p(b, a), _ref_mw(b, a))


def test_mannwhitney_edge_cases():
    rng = np.random.default_rng(8)
    for n1, n2 in [(1, 1), (1, 5), (2, 2), (2, 30), (30, 2)]:
        a, b = rng.normal(1, 1, n1), rng.normal(0, 1, n2)
        assert close(mannwhitney_greater_p(a, b), _ref_mw(a, b)), (n1, n2)
    same = np.full(7, 3.0)
    assert mannwhitney_greater_p(same, same) == _ref_mw(same, same) == 1.0  # all tied: z = -inf
    assert close(mannwhitney_greater_p([1.0, 1.0, 2.0], [1.0]), _ref_mw([1.0, 1.0, 2.0], [1.0]))
    big_a, big_b = rng.normal(3, 1, 4000), rng.normal(0, 1, 4000)  # p far below 1e-300
    assert mannwhitney_greater_p(big_a, big_b) <= 1e-290 and _ref_mw(big_a, big_b) <= 1e-290
    mid_a, mid_b = rng.normal(0.3, 1, 4000), rng.normal(0, 1, 4000)
    assert close(mannwhitney_greater_p(mid_a, mid_b), _ref_mw(mid_a, mid_b))
    with pytest.raises(ValueError, match="mannwhitney_greater_p: got 0 and 3 values"):
        mannwhitney_greater_p([], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="NaN"):
        mannwhitney_greater_p([1.0, np.nan], [1.0, 2.0])


# --------------------------------------------------------------------------------------------------
# t-test
# --------------------------------------------------------------------------------------------------
def _ref_t(v, base) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(v, base, equal_var=True, alternative="greater").pvalue)


def test_ttest_matches_scipy_random():
    rng = np.random.default_rng(9)
    for k in range(400):
        n1, n2 = int(rng.integers(1, 40)), int(rng.integers(2, 40))
        if k % 10 == 0:
            n1, n2 = int(rng.integers(200, 3000)), int(rng.integers(200, 3000))
        v = rng.normal(float(rng.choice([0.0, 0.5, 2.0, -1.0, 8.0])), float(rng.uniform(0.05, 2)), n1)
        base = rng.normal(0, float(rng.uniform(0.05, 2)), n2)
        assert close(ttest_greater_p(v, base), _ref_t(v, base)), (n1, n2, k)


def test_ttest_zero_variance_and_small_sizes():
    """NaN exactly where scipy gives NaN: both sides without spread at one mean, one value a side, empty."""
    cases = [
        ([1.0, 1.0, 1.0], [1.0, 1.0]),        # no spread, equal means: NaN
        ([2.0, 2.0, 2.0], [1.0, 1.0]),        # no spread, v higher: t = inf, p = 0
        ([1.0, 1.0, 1.0], [2.0, 2.0]),        # no spread, v lower: p = 1
        ([0.1, 0.1, 0.1], [0.1, 0.1, 0.1]),   # means that round off 0.1: scipy's own arithmetic decides
        ([5.0], [1.0, 2.0, 3.0]),             # one value on a side: its variance counts as 0
        ([5.0], [1.0]),                       # no degree of freedom: NaN
        ([1.0, 2.0, 3.0], [2.0]),
        ([1.0, 1.0, 1.0], [0.0, 1.0, 2.0]),   # one side without spread
        ([-np.inf, 1.0, 2.0], [0.0, 1.0]),    # log(0) of an empty interval: NaN as in scipy
    ]
    for v, base in cases:
        ref = _ref_t(v, base)
        assert close(ttest_greater_p(v, base), ref), (v, base, ref)
    assert math.isnan(ttest_greater_p([1.0, 1.0, 1.0], [1.0, 1.0]))
    assert math.isnan(ttest_greater_p([], [1.0, 2.0]))
    with pytest.raises(ValueError, match="ttest_greater_p: v's values hold NaN at index 1"):
        ttest_greater_p([1.0, np.nan], [1.0, 2.0])


def test_t_survival_function_against_scipy():
    """The incomplete-beta t survival function over df and t, far tails included."""
    for df in (1.0, 2.0, 3.0, 5.5, 10.0, 57.0, 300.0, 2999.0, 20000.0):
        for t in (-40.0, -3.0, -1.0, -1e-3, 0.0, 1e-12, 0.3, 1.0, 2.5, 6.0, 20.0, 150.0, 1e10, 1e150):
            ref = float(special.stdtr(df, -t))
            assert close(_t_sf(t, df), ref), (df, t, _t_sf(t, df), ref)
    # Beyond |t| ~ 1e154 scipy's t^2 overflows and it returns 0; here t^2 is never formed, so the tail stays
    # the true one (df = 1 is Cauchy: P(T > t) = atan(1/t) / pi ~ 1 / (pi t)).
    for t in (1e160, 1e200, 1e300):
        assert close(_t_sf(t, 1.0), 1 / (math.pi * t))
    assert _t_sf(math.inf, 5.0) == 0.0 and _t_sf(-math.inf, 5.0) == 1.0
    assert math.isnan(_t_sf(math.nan, 5.0)) and math.isnan(_t_sf(1.0, 0.0))


# --------------------------------------------------------------------------------------------------
# Fisher
# --------------------------------------------------------------------------------------------------
def _ref_fisher(kv, nv, kb, nb) -> float:
    return float(stats.fisher_exact([[kv, nv - kv], [kb, nb - kb]], alternative="greater")[1])


def test_fisher_matches_scipy_random():
    rng = np.random.default_rng(11)
    for k in range(400):
        hi = 60 if k % 3 == 0 else 5000
        nv, nb = int(rng.integers(1, hi)), int(rng.integers(1, hi))
        share_b = float(rng.choice([0.01, 0.05, 0.3]))
        share_v = share_b * float(rng.choice([0.5, 1.0, 1.5, 3.0, 10.0]))
        kv, kb = int(rng.binomial(nv, min(share_v, 1.0))), int(rng.binomial(nb, share_b))
        assert close(fisher_greater_p(kv, nv, kb, nb), _ref_fisher(kv, nv, kb, nb)), (kv, nv, kb, nb)


def test_fisher_large_counts_and_edges():
    for kv, nv, kb, nb in [(3000, 200_000, 2000, 200_000), (12_000, 1_000_000, 10_000, 1_000_000),
                           (500, 40_000, 100, 50_000), (0, 5, 0, 7), (5, 5, 0, 7), (5, 5, 7, 7),
                           (0, 5, 7, 7), (1, 1, 0, 1), (0, 1, 1, 1), (1, 2, 1, 2), (2000, 2000, 1, 3000)]:
        assert close(fisher_greater_p(kv, nv, kb, nb), _ref_fisher(kv, nv, kb, nb)), (kv, nv, kb, nb)
    # degenerate tables: an empty row or column gives 1.0, as scipy
    for kv, nv, kb, nb in [(0, 0, 3, 9), (2, 9, 0, 0), (0, 9, 0, 4), (9, 9, 4, 4)]:
        assert fisher_greater_p(kv, nv, kb, nb) == 1.0
        if nv and nb:
            assert _ref_fisher(kv, nv, kb, nb) == 1.0
    with pytest.raises(ValueError, match=r"fisher_greater_p: expected 0 <= kv <= nv"):
        fisher_greater_p(5, 4, 0, 3)
    with pytest.raises(ValueError, match="integer counts"):
        fisher_greater_p(1.5, 4, 0, 3)


# --------------------------------------------------------------------------------------------------
# Import cost
# --------------------------------------------------------------------------------------------------
def test_diagnose_imports_neither_scipy_nor_ruptures():
    code = ("import sys, aurora_core.diagnose, aurora_core.diagnose.compare; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'scipy', 'ruptures'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_group_percentiles_and_medians_equal_numpy_per_group():
    """Bit for bit what np.percentile / np.median give per group (ties, even and odd sizes, empty groups)."""
    from aurora_core.diagnose.stats import group_medians, group_percentiles

    rng = np.random.default_rng(7)
    for trial in range(200):
        sizes = rng.integers(0, 40, rng.integers(1, 30))
        cut = np.r_[0, np.cumsum(sizes)]
        vals = (rng.lognormal(0, 1, cut[-1]) if trial % 3 == 0 else
                rng.integers(0, 4, cut[-1]).astype(float) if trial % 3 == 1 else rng.normal(0, 1e6, cut[-1]))
        ref = np.array([[np.percentile(vals[a:b], q) if b > a else np.nan for a, b in zip(cut[:-1], cut[1:], strict=True)]
                        for q in (50, 99, 1)])
        assert np.array_equal(group_percentiles(vals, cut, [50, 99, 1]), ref, equal_nan=True)
        med = [np.median(vals[a:b]) for a, b in zip(cut[:-1], cut[1:], strict=True) if b > a]
        assert np.array_equal(group_medians(vals, cut), np.array(med))
