"""Every threshold ``aurora diagnose`` judges by, with its default, in one place.

``diagnose(runs, settings=Settings(stage_shift=1.2))`` or ``aurora diagnose --set stage_shift=1.2``. The
defaults are the documented method (``spikes`` and ``causes`` module docs say where each one acts);
``compare``'s environment check uses the same CPU/GPU margins between its two sides
(``compare(..., settings=...)`` or ``aurora compare --set steal_more=10``; ``compare.ENV_SETTINGS``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    # -- spike windows (spikes.detect) --
    min_ratio: float = 1.3          # p50 or p99 at least this times the baseline's is a spike (>= 1)
    alpha: float = 1e-3             # significance of spikes, stage shifts and span growth (0 < alpha < 1)
    # -- claiming a cause (causes.analyze) --
    claim: float = 0.3              # the top cause is named when share x strength reaches this
    stage_shift: float = 1.15       # a stage's per-item service time (or a span's mean) grew by this factor
    matched_rate: float = 0.10      # arrival rates within +-10%: load matched (regression at full strength)
    # -- load --
    load_rate_up: float = 1.05      # arrival rate up by this factor ...
    load_z: float = 3.0             # ... and this many standard scores in the two-sample Poisson test
    kingman_within: float = 3.0     # observed/predicted wait ratio within this factor: consistent
    saturated_busy: float = 0.95    # bottleneck thread busy fraction at which the pipeline is saturated
    # -- CPU contention --
    others_cores_more: float = 0.5  # other processes' CPU, cores, window - baseline
    cpu_stretch: float = 1.3        # service time / own CPU time per request
    steal_more: float = 5.0         # steal_pct points
    cgroup_throttled_more: float = 0.05  # cgroup_throttled_frac
    psi_cpu_more: float = 10.0      # psi_cpu_some_avg10 points (supporting)
    # -- GPU hardware --
    throttled_more: float = 0.1     # any limiting throttle_frac_*
    sm_clock_ratio: float = 0.9     # SM clock at or below this times the baseline's
    temp_margin_c: float = 5.0      # temperature margin at or below this (supporting)
    power_of_limit: float = 0.97    # power at or above this fraction of the limit (supporting)
    idle_gap_s: float = 0.5         # median inter-arrival at which traffic is sparse (idle clocks case)
    idle_clock_ratio: float = 0.5   # SM clock at or below this fraction of max, or idle_clocks >= it
    # -- memory --
    gpu_mem_full: float = 0.95      # GPU memory used / total
    swap_more_bytes: float = 64 * 2**20
    psi_mem_more: float = 10.0      # psi_mem_some_avg10 points

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int | float) or v != v or v < 0:
                raise ValueError(f"diagnose settings: {f.name} must be a number >= 0, got {v!r}")
        if self.min_ratio < 1:
            raise ValueError(f"diagnose settings: min_ratio must be >= 1, got {self.min_ratio!r}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"diagnose settings: alpha must be in (0, 1), got {self.alpha!r}")

    def with_pairs(self, pairs, op: str = "diagnose", only=None) -> Settings:
        """These settings with "name=value" strings applied (the CLI's ``--set``); ``only``: the names
        ``op`` reads (default: all)."""
        names = set(only or (f.name for f in dataclasses.fields(self)))
        out = {}
        for pair in pairs:
            name, sep, value = str(pair).partition("=")
            name = name.strip().replace("-", "_")
            if not sep or name not in names:
                raise ValueError(f"{op}: --set expects NAME=VALUE with NAME one of {', '.join(sorted(names))}; "
                                 f"got {pair!r}")
            try:
                out[name] = float(value)
            except ValueError:
                raise ValueError(f"{op}: --set {name}: expected a number, got {value!r}") from None
        return dataclasses.replace(self, **out)


DEFAULTS = Settings()
