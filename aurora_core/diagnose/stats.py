"""The few statistics ``aurora diagnose`` and ``aurora compare`` need, in numpy and ``math`` alone.

``import scipy.stats`` costs ~0.6-0.8 s and ~85 MB, and ruptures' PELT ~0.3-0.5 s on 300 intervals (pure
Python over dicts), against a 1 s budget for diagnosing a million requests (issue 14). Without them
``import aurora_core.diagnose`` went from 0.85 s and 104 MB peak RSS to 0.20 s and 35 MB, and the change-point
search on 301 intervals from 257 ms to 11 ms (benchmarks/diagnose_stats_ratios.py, 2-core EPYC VM). Each function here
returns what its scipy/ruptures counterpart returns (tests/test_stats.py compares them on seeded random
cases; scipy 1.17.1, ruptures 1.1.10), so verdicts do not move:

* ``pelt_l2``                 ``ruptures.Pelt(model="l2", min_size, jump).fit(x).predict(pen)``, identical lists
* ``mannwhitney_greater_p``   ``scipy.stats.mannwhitneyu(a, b, alternative="greater").pvalue``
* ``ttest_greater_p``         ``scipy.stats.ttest_ind(v, base, equal_var=True, alternative="greater").pvalue``
* ``fisher_greater_p``        ``scipy.stats.fisher_exact([[kv, nv-kv], [kb, nb-kb]], alternative="greater")[1]``

p-values agree to ~1e-12 relative (the tests hold them to 1e-9 above 1e-300); the one known difference is
a t statistic beyond ~1e154, where scipy's t^2 overflows to a p of 0 and this keeps the true tail. Bad input
(NaN, empty where the test needs data, counts out of range) raises ValueError naming the function.
"""

from __future__ import annotations

import math

import numpy as np

_EPS = float(np.finfo(np.float64).eps)


def _vec(name: str, x, what: str = "values") -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a 1-D array of {what}, got shape {a.shape}; pass a flat array")
    if np.isnan(a).any():
        raise ValueError(f"{name}: {what} hold NaN at index {int(np.flatnonzero(np.isnan(a))[0])}; "
                         "drop unmeasured values first")
    return a


# --------------------------------------------------------------------------------------------------
# PELT, l2 cost
# --------------------------------------------------------------------------------------------------
def pelt_l2(x, pen: float, min_size: int, jump: int = 1) -> list[int]:
    """Penalized change points under the l2 cost: the segment ends (last = n), as ruptures'
    ``Pelt(model="l2", min_size=min_size, jump=jump).fit(x).predict(pen=pen)`` returns them.

    x: float [n] or [n, d]; the cost of a segment is its squared deviations from its mean, summed over the d
    columns. pen >= 0. min_size is raised to 1 as ruptures does; jump >= 1.

    Same algorithm as ruptures 1.1.10's ``Pelt._seg``, with its rules kept: candidates are the last
    admissible point ``floor((bkp - min_size) / jump) * jump`` of each step and the survivors of earlier
    ones; the first of equal totals wins (the earliest start); a candidate survives while its total is
    <= the optimum + pen. What changes is the arithmetic: segment costs come from cumulative sums over the
    centred data and each step is a handful of numpy operations on the whole candidate set, instead of a
    ``var`` per candidate and a Python sum over dicts. Where two totals (or a total and the pruning bound)
    lie within the rounding those two arithmetics can differ by, both are recomputed as ruptures computes
    them (``var`` of the slice, the same summation order), so ties in the data (flat stretches, repeated
    values) break as ruptures breaks them. A signal flat from end to end ties everywhere, prunes nothing
    and is then as slow as ruptures (~0.5 s at n = 300 here); noisy intervals recompute a few totals at most.
    """
    name = "pelt_l2"
    sig = np.asarray(x, dtype=np.float64)
    if sig.ndim == 1:
        sig = sig.reshape(-1, 1)
    if sig.ndim != 2 or sig.shape[1] == 0:
        raise ValueError(f"{name}: expected x of shape [n] or [n, d], got {np.shape(x)}")
    if not np.isfinite(sig).all():
        raise ValueError(f"{name}: x holds NaN or inf; change points need finite values")
    pen = float(pen)
    if not (math.isfinite(pen) and pen >= 0):
        raise ValueError(f"{name}: expected a finite penalty >= 0, got {pen}")
    if int(jump) != jump or jump < 1:
        raise ValueError(f"{name}: expected an integer jump >= 1, got {jump!r}")
    jump, min_size = int(jump), max(int(min_size), 1)
    n = sig.shape[0]
    if min_size > n:
        raise ValueError(f"{name}: {n} samples cannot hold one segment of min_size {min_size}; "
                         "pass more samples or a smaller min_size")

    xc = sig - sig.mean(axis=0)  # centred: the cumulative sums then cancel far less
    c1 = np.zeros((n + 1, xc.shape[1]))
    np.cumsum(xc, axis=0, out=c1[1:])
    c2 = np.zeros(n + 1)
    np.cumsum(np.einsum("ij,ij->i", xc, xc), out=c2[1:])
    # Bound on |cumulative-sum total - ruptures' total|: every total is <= 2 * SS + (n + 1) * pen, and
    # the cumulative sums lose at most ~n^1.5 eps of that (the square of the segment sum is the worst
    # term); a generous margin only costs an exact recomputation now and then.
    tol = max(1e-9, 64 * _EPS * n ** 1.5) * (c2[-1] + n * pen) + 1e-12 * n * float(np.max(sig * sig))

    total = np.zeros(n + 1)          # optimal total of sig[:t], cumulative-sum arithmetic
    prev = np.zeros(n + 1, np.int64)  # start of the last segment of that optimum
    done = np.zeros(n + 1, bool)
    done[0] = True
    exact = {0: 0.0}                  # ruptures' own total of sig[:t], computed on demand

    def cost(a: int, b: int) -> float:  # ruptures' CostL2.error, operation for operation
        return sig[a:b].var(axis=0).sum() * (b - a)

    def exact_total(t: int) -> float:
        chain = []
        while t not in exact:
            chain.append(t)
            t = int(prev[t])
        for u in reversed(chain):
            p = int(prev[u])
            exact[u] = exact[p] + (cost(p, u) + pen)
        return exact[chain[0]] if chain else exact[t]

    def exact_cand(t: int, bkp: int) -> float:
        return exact_total(t) + (cost(t, bkp) + pen)

    adm = np.empty(0, np.int64)
    for bkp in [k for k in range(0, n, jump) if k >= min_size] + [n]:
        adm = np.append(adm, (bkp - min_size) // jump * jump)
        cand = adm[done[adm]]  # ruptures skips points with no partition (0 < t < min_size)
        s1 = c1[bkp] - c1[cand]
        tot = total[cand] + ((c2[bkp] - c2[cand]) - np.einsum("ij,ij->i", s1, s1) / (bkp - cand) + pen)
        i = int(np.argmin(tot))
        near = np.flatnonzero(tot <= tot[i] + tol)
        if near.size > 1:
            i = int(near[int(np.argmin([exact_cand(int(cand[j]), bkp) for j in near]))])
        total[bkp], prev[bkp], done[bkp] = tot[i], cand[i], True
        keep = tot <= tot[i] + pen
        edge = np.flatnonzero(np.abs(tot - (tot[i] + pen)) <= tol)
        if edge.size:
            bound = exact_total(bkp) + pen
            for j in edge:
                keep[j] = exact_cand(int(cand[j]), bkp) <= bound
        # ruptures zips the admissible list with the candidates, so drops from its end as many points as
        # were skipped; kept literally
        adm = adm[:cand.size][keep]

    ends, t = [], n
    while t > 0:
        ends.append(t)
        t = int(prev[t])
    return ends[::-1]


# --------------------------------------------------------------------------------------------------
# Mann-Whitney U
# --------------------------------------------------------------------------------------------------
def mannwhitney_greater_p(a, b) -> float:
    """One-sided Mann-Whitney U p-value for "a tends to be larger than b", as
    ``scipy.stats.mannwhitneyu(a, b, alternative="greater").pvalue`` (method "auto", continuity on).

    a, b: 1-D, at least one value each, no NaN. As scipy does: exact when one side has <= 8 values and
    there are no ties, else the normal approximation with the tie correction and a 0.5 continuity
    correction. The exact null distribution of U is computed here too, in integers (see ``_mwu_sf_exact``),
    so scipy is never imported.
    """
    name = "mannwhitney_greater_p"
    a, b = _vec(name, a, "a's values"), _vec(name, b, "b's values")
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        raise ValueError(f"{name}: got {n1} and {n2} values; each side needs at least one")
    xy = np.concatenate([a, b])
    order = np.argsort(xy, kind="stable")
    srt = xy[order]
    first = np.flatnonzero(np.r_[True, srt[1:] != srt[:-1]])
    counts = np.diff(np.r_[first, xy.size])
    ranks = np.empty(xy.size)
    ranks[order] = np.repeat(first + 1 + (counts - 1) / 2, counts)  # average ranks of tied values
    u1 = float(ranks[:n1].sum()) - n1 * (n1 + 1) / 2
    if (n1 <= 8 or n2 <= 8) and counts.max() == 1:
        return _mwu_sf_exact(int(u1), n1, n2)
    n = n1 + n2
    t = counts.astype(np.float64)
    s = math.sqrt(n1 * n2 / 12 * ((n + 1) - float(np.sum(t ** 3 - t)) / (n * (n - 1))))
    num = u1 - n1 * n2 / 2 - 0.5
    if s == 0:  # every value tied: U sits at its mean, and the continuity correction makes z -inf
        z = math.copysign(math.inf, num) if num else math.nan
    else:
        z = num / s
    return min(max(_norm_sf(z), 0.0), 1.0)


def _norm_sf(z: float) -> float:
    return 0.5 * math.erfc(z * math.sqrt(0.5))


def _mwu_sf_exact(u: int, n1: int, n2: int) -> float:
    """P(U >= u) under the null, no ties. The counts of U over the C(n1+n2, n1) arrangements are the
    coefficients of the Gaussian binomial prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i) (m <= n the two sizes);
    they are built in Python integers up to the smaller tail (the distribution is symmetric), so the p-value
    is one correctly rounded division. m <= 8 here, so that is <= 16 passes over <= m*n/2 + 1 coefficients."""
    m, n = min(n1, n2), max(n1, n2)
    mn = m * n
    if u <= 0:
        return 1.0
    if u > mn:
        return 0.0
    deg = min(mn - u, u - 1)  # P(U >= u) = P(U <= mn - u) = 1 - P(U <= u - 1)
    c = np.zeros(deg + 1, dtype=object)  # Python ints: the counts outgrow uint64 (C(4008, 8) ~ 1e24)
    c[0] = 1
    for i in range(1, m + 1):  # times (1 - q^(n+i))
        s = n + i
        if s <= deg:
            c[s:] = c[s:] - c[:deg + 1 - s]
    for i in range(1, m + 1):  # divided by (1 - q^i): a running sum along each residue class mod i
        for r in range(min(i, deg + 1)):
            c[r::i] = np.cumsum(c[r::i])
    low = int(sum(c.tolist()))
    total = math.comb(m + n, m)
    return low / total if deg == mn - u else (total - low) / total


# --------------------------------------------------------------------------------------------------
# Student's t
# --------------------------------------------------------------------------------------------------
def ttest_greater_p(v, base) -> float:
    """One-sided pooled-variance two-sample t-test p-value for "v's mean is larger", as
    ``scipy.stats.ttest_ind(v, base, equal_var=True, alternative="greater").pvalue``, NaN where scipy
    gives NaN: an empty side, one value on each side (no degree of freedom), or no spread on either side
    with equal means. No spread with different means gives 0 or 1 (t is infinite), as in scipy.

    Means and variances are computed with the numpy operations scipy uses, so a spread that rounds to zero
    there does here too; the t survival function is the regularized incomplete beta (``_betainc``)."""
    name = "ttest_greater_p"
    v, base = _vec(name, v, "v's values"), _vec(name, base, "base's values")
    n1, n2 = v.size, base.size
    if n1 == 0 or n2 == 0:
        return math.nan
    with np.errstate(all="ignore"):
        m1, m2 = np.mean(v), np.mean(base)
        v1 = 0.0 if n1 == 1 else np.mean((v - m1) ** 2) * (n1 / (n1 - 1))
        v2 = 0.0 if n2 == 1 else np.mean((base - m2) ** 2) * (n2 / (n2 - 1))
        df = n1 + n2 - 2.0
        svar = ((n1 - 1) * v1 + (n2 - 1) * v2) / np.float64(df)
        denom = np.sqrt(svar * (1.0 / n1 + 1.0 / n2))
        t = float(np.divide(m1 - m2, denom))
    return _t_sf(t, df)


def _t_sf(t: float, df: float) -> float:
    """P(T > t), Student's t with df degrees of freedom: 0.5 * I_x(df/2, 1/2), x = df / (df + t^2)."""
    if math.isnan(t) or not df > 0:
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    at = abs(t)
    if at > math.sqrt(df):  # x small: take its logarithm without forming t^2 (it may overflow)
        w = (df / at) / at
        lx, ly = math.log(df) - 2 * math.log(at) - math.log1p(w), -math.log1p(w)
        x, y = w / (1 + w), 1 / (1 + w)
    else:
        w = (at / df) * at
        lx, ly = -math.log1p(w), -math.log1p(1 / w) if w > 0 else -math.inf
        x, y = 1 / (1 + w), w / (1 + w)
    tail = 0.5 * _betainc(0.5 * df, 0.5, x, y, lx, ly)
    return tail if t > 0 else 1.0 - tail


def _betainc(a: float, b: float, x: float, y: float, lx: float, ly: float) -> float:
    """Regularized incomplete beta I_x(a, b), y = 1 - x, lx = log x, ly = log y (given separately so that
    neither end loses digits). The continued fraction (Numerical Recipes' betacf, modified Lentz) on
    whichever side of the mean it converges fast, the other by symmetry; ~1e-14 relative."""
    if lx == -math.inf:
        return 0.0
    if ly == -math.inf:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * lx + b * ly)
    if x < (a + 1) / (a + b + 2):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, y) / b


def _betacf(a: float, b: float, x: float) -> float:
    tiny, max_iter = 1e-300, 100_000
    qab, qap, qam = a + b, a + 1, a - 1
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, max_iter + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d, c = 1.0 + aa * d, 1.0 + aa / c
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d, c = 1.0 + aa * d, 1.0 + aa / c
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = c if abs(c) > tiny else tiny
        step = d * c
        h *= step
        if abs(step - 1.0) < 1e-16:
            return h
    raise ArithmeticError(f"_betacf: no convergence after {max_iter} terms (a={a}, b={b}, x={x})")


# --------------------------------------------------------------------------------------------------
# Fisher's exact test
# --------------------------------------------------------------------------------------------------
def fisher_greater_p(kv: int, nv: int, kb: int, nb: int) -> float:
    """One-sided Fisher exact p-value for "a larger share of v than of base is above", as
    ``scipy.stats.fisher_exact([[kv, nv - kv], [kb, nb - kb]], alternative="greater")[1]``.

    kv of nv and kb of nb counted above. 1.0 for a table with an empty row or column, as scipy. The
    hypergeometric tail P(X >= kv), X the above-count of v when kv + kb of nv + nb are above, is summed
    from its end away from the mode (terms only shrink there; the complement when kv is at or below the
    mode): its first term from Loader's saddle-point form (``_log_dbinom``, ~1e-14 relative even for
    counts in the millions, where lgamma differences lose ~N eps), the others by a cumulative sum of log
    ratios, in numpy, so counts in the thousands neither underflow nor loop in Python."""
    name = "fisher_greater_p"
    vals = (kv, nv, kb, nb)
    if any(int(q) != q for q in vals):
        raise ValueError(f"{name}: expected integer counts, got {vals}")
    kv, nv, kb, nb = (int(q) for q in vals)
    if not (0 <= kv <= nv and 0 <= kb <= nb):
        raise ValueError(f"{name}: expected 0 <= kv <= nv and 0 <= kb <= nb, got kv={kv}, nv={nv}, "
                         f"kb={kb}, nb={nb}")
    N, K = nv + nb, kv + kb
    if nv == 0 or nb == 0 or K == 0 or K == N:
        return 1.0
    lo, hi = max(0, K - nb), min(nv, K)
    mode = (K + 1) * (nv + 1) // (N + 2)
    if kv > mode:
        return min(_hyper_tail(kv, hi, nv, nb, K, +1), 1.0)
    if kv <= lo:
        return 1.0
    return min(max(1.0 - _hyper_tail(kv - 1, lo, nv, nb, K, -1), 0.0), 1.0)


def _hyper_tail(x0: int, end: int, nv: int, nb: int, K: int, step: int) -> float:
    """Sum of the hypergeometric pmf from x0 to end (inclusive) in direction step (+1 or -1)."""
    N = nv + nb
    lp0 = _log_dbinom(x0, nv, K, N) + _log_dbinom(K - x0, nb, K, N) - _log_dbinom(K, N, K, N)
    x = np.arange(x0, end, step, dtype=np.float64)  # the pmf ratio from each x to its neighbour
    if step > 0:
        lr = np.log(nv - x) + np.log(K - x) - np.log(x + 1) - np.log(nb - K + x + 1)
    else:
        lr = np.log(x) + np.log(nb - K + x) - np.log(nv - x + 1) - np.log(K - x + 1)
    rest = float(np.exp(np.cumsum(lr)).sum()) if lr.size else 0.0
    return math.exp(lp0 + math.log1p(rest))


# Loader (2000), "Fast and accurate computation of binomial probabilities", as in R's dbinom_raw.
_STIRLERR = [  # log(n!) - log(sqrt(2 pi n) (n/e)^n), n = 0..15
    0.0, 0.0810614667953272582196702, 0.0413406959554092940938221, 0.02767792568499833914878929,
    0.02079067210376509311152277, 0.01664469118982119216319487, 0.01387612882307074799874573,
    0.01189670994589177009505572, 0.010411265261972096497478567, 0.009255462182712732917728637,
    0.008330563433362871256469318, 0.007573675487951840794972024, 0.006942840107209529865664152,
    0.006408994188004207068439631, 0.005951370112758847735624416, 0.005554733551962801371038690]


def _stirlerr(n: int) -> float:
    if n <= 15:
        return _STIRLERR[n]
    nn = float(n) * n
    s0, s1, s2, s3, s4 = 1 / 12, 1 / 360, 1 / 1260, 1 / 1680, 1 / 1188
    if n > 500:
        return (s0 - s1 / nn) / n
    if n > 80:
        return (s0 - (s1 - s2 / nn) / nn) / n
    if n > 35:
        return (s0 - (s1 - (s2 - s3 / nn) / nn) / nn) / n
    return (s0 - (s1 - (s2 - (s3 - s4 / nn) / nn) / nn) / nn) / n


def _bd0(x: float, m: float) -> float:
    """x log(x/m) + m - x, without cancellation when x is near m."""
    if abs(x - m) < 0.1 * (x + m):
        v = (x - m) / (x + m)
        s = (x - m) * v
        ej = 2 * x * v
        v *= v
        for j in range(1, 1000):
            ej *= v
            s1 = s + ej / (2 * j + 1)
            if s1 == s:
                return s1
            s = s1
        return s
    return x * math.log(x / m) + m - x


def _log_dbinom(x: int, n: int, K: int, N: int) -> float:
    """log of C(n, x) p^x q^(n-x), p = K/N, q = (N-K)/N (0 < K < N)."""
    p, q = K / N, (N - K) / N
    if x == 0:
        return -_bd0(n, n * q) - n * p if p < 0.1 else n * math.log(q)
    if x == n:
        return -_bd0(n, n * p) - n * q if q < 0.1 else n * math.log(p)
    lc = _stirlerr(n) - _stirlerr(x) - _stirlerr(n - x) - _bd0(x, n * p) - _bd0(n - x, n * q)
    return lc - 0.5 * (math.log(2 * math.pi) + math.log(x) + math.log1p(-x / n))


# --------------------------------------------------------------------------------------------------
# Percentiles and medians of many groups at once
# --------------------------------------------------------------------------------------------------
def _order_stats(values: np.ndarray, cut: np.ndarray, offsets: list[np.ndarray]) -> np.ndarray:
    """``values`` with each group ``values[cut[k]:cut[k + 1]]`` partitioned so that its elements at the
    positions ``offsets[j][k]`` (within the group) are the group's order statistics there: a partition per
    group (linear time), not a sort."""
    out = values.copy()
    kth = np.stack(offsets, axis=1) if offsets else np.zeros((cut.size - 1, 0), np.intp)
    for k, (i, j) in enumerate(zip(cut[:-1].tolist(), cut[1:].tolist(), strict=True)):
        if j > i:
            out[i:j].partition(np.unique(kth[k]))
    return out


def group_percentiles(values: np.ndarray, cut: np.ndarray, qs) -> np.ndarray:
    """``np.percentile(values[cut[k]:cut[k + 1]], q)`` (linear method) for every group k and q in ``qs``:
    shape (len(qs), groups), NaN for an empty group. The same arithmetic as numpy's (virtual index
    (n - 1) * q / 100, its two-sided lerp), so the figures are numpy's to the bit; numpy's per-call overhead
    (~60 us) was most of diagnosing 48 hosts' 10-minute window, 300 intervals each. One partition per group
    at the order statistics needed, as numpy does."""
    values = np.asarray(values, np.float64)
    cut = np.asarray(cut, np.intp)
    m = np.diff(cut)
    ne = m > 0
    start, n = cut[:-1][ne], m[ne]
    virtual = [(n - 1) * (np.float64(q) / 100) for q in qs]
    prev = [np.floor(v).astype(np.intp) for v in virtual]
    nxt = [np.minimum(p + 1, n - 1) for p in prev]
    def every_group(x):  # positions of the non-empty groups; 0 for the empty ones (nothing to partition)
        z = np.zeros(m.size, np.intp)
        z[ne] = x
        return z

    part = _order_stats(values, cut, [every_group(x) for x in prev + nxt])
    out = np.full((len(qs), cut.size - 1), np.nan)
    for k, v in enumerate(virtual):
        g = v - prev[k]
        a, b = part[start + prev[k]], part[start + nxt[k]]
        d = b - a
        out[k, ne] = np.where(g >= 0.5, b - d * (1 - g), a + d * g)
    return out


def group_medians(values: np.ndarray, cut: np.ndarray) -> np.ndarray:
    """``np.median`` of every non-empty group (the mean of the two middle values of an even one, as numpy)."""
    values = np.asarray(values, np.float64)
    cut = np.asarray(cut, np.intp)
    m = np.diff(cut)
    half = m // 2
    part = _order_stats(values, cut, [half, np.maximum(half - 1, 0)])
    ne = m > 0
    start, m, half = cut[:-1][ne], m[ne], half[ne]
    hi, lo = part[start + half], part[start + np.maximum(half - 1, 0)]
    return np.where(m % 2 == 1, hi, (lo + hi) / 2)
