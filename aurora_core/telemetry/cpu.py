"""CPU backend: host and process readings as one ``Sample(source="cpu")`` per tick (Linux).

Utilization, steal and iowait come from /proc/stat deltas between ticks (percent of the interval);
runnable tasks from /proc/stat; cgroup CPU throttling from cpu.stat (v2, or v1 cpu controller); this
process's RSS and threads from /proc/self/stat, its CPU time and context switches (all threads) from
getrusage. These are read every tick.

Read every ``slow_every`` ticks (1 Hz at the default 10 Hz) because each costs a file the kernel formats
(~40 µs each on a small VM) and changes slowly anyway: load (/proc/loadavg, a 5 s kernel update), pressure
stall information (/proc/pressure/*, avg10 is a 10 s average updated every 2 s), memory and swap
(/proc/meminfo), the process's cgroup (/proc/self/cgroup: a process can be moved into another cgroup
while it runs, e.g. by an operator or a node agent; a move is an Event "cgroup_move") and that cgroup's CPU
quota (cpu.max, or v1 cpu.cfs_quota_us / cpu.cfs_period_us: Kubernetes resizes pods in place and systemd's
CPUQuota= changes at run time, so it is re-read rather than fixed at start; a change is an Event
"cgroup_quota_change" and ``cgroup_throttled_frac`` is recorded whenever a quota is in force), frequency
and thermal throttle counts (one file per core: at 10 Hz on a 128-core host they alone would cost about 1%
of a core). Reading everything every tick cost 1.3% of a core at 10 Hz
on the 2-core development VM; this split keeps it well under the 1% target.

What the host does not expose is absent from the sample and listed in ``missing`` with the reason,
never reported as 0. The roots are parameters so that tests can point the parser at fixture trees.
"""

from __future__ import annotations

import glob
import os
import resource
from collections.abc import Callable

from aurora_core.records import Event, Sample, now_ns

_PAGE = os.sysconf("SC_PAGE_SIZE")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _kv(text: str) -> dict[str, float]:
    """``key value`` lines (cpu.stat, meminfo without units) -> dict."""
    out = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2:
            try:
                out[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return out


class CpuBackend:
    """One thread calls ``tick()``. proc/sys: roots of /proc and /sys. Watches the calling process."""

    def __init__(self, proc: str = "/proc", sys: str = "/sys", slow_every: int = 10,
                 clock: Callable[[], int] = now_ns):
        self.proc, self.sys, self.clock, self.slow_every = proc, sys, clock, max(1, slow_every)
        self.missing: dict[str, str] = {}
        self._prev_stat: dict[str, list[int]] | None = None
        self._prev_cg: tuple[float, float] | None = None
        self._prev_proc: tuple[float, int] | None = None
        self._n = 0
        self._events: list[Event] = []
        self._cg_dir, self._cg_version = self._find_cgroup()
        self._cg_missing()
        self._cg_quota = self._quota()  # cores, or None: unlimited
        self._freq_files = sorted(glob.glob(os.path.join(sys, "devices/system/cpu/cpu[0-9]*/cpufreq/scaling_cur_freq")))
        self._therm_files = sorted(glob.glob(
            os.path.join(sys, "devices/system/cpu/cpu[0-9]*/thermal_throttle/core_throttle_count")))
        if not self._therm_files:
            self.missing["thermal_throttle_count"] = "no /sys/devices/system/cpu/cpu*/thermal_throttle (kernel or VM does not expose it)"

    def capabilities(self) -> dict:
        return {"cgroup": {"dir": self._cg_dir, "version": self._cg_version, "quota": self._cg_quota is not None,
                           "quota_cores": self._cg_quota},
                "freq_source": "cpufreq" if self._freq_files else "cpuinfo", "missing": dict(self.missing)}

    # -- cgroup discovery --------------------------------------------------------------------------
    def _find_cgroup(self) -> tuple[str | None, int]:
        text = _read(os.path.join(self.proc, "self/cgroup")) or ""
        root = os.path.join(self.sys, "fs/cgroup")
        for line in text.splitlines():
            hid, controllers, path = (line.split(":", 2) + ["", ""])[:3]
            rel = path.lstrip("/")
            if hid == "0" and controllers == "":
                for d in (os.path.join(root, rel), root):  # inside a container the path may be its root
                    if os.path.exists(os.path.join(d, "cpu.stat")) and _read(os.path.join(d, "cpu.max")) is not None:
                        return os.path.normpath(d), 2
            elif "cpu" in controllers.split(","):
                for mount in (controllers, "cpu", "cpu,cpuacct"):
                    for d in (os.path.join(root, mount, rel), os.path.join(root, mount)):
                        if os.path.exists(os.path.join(d, "cpu.stat")):
                            return os.path.normpath(d), 1
        return None, 0

    def _cg_missing(self) -> None:
        for m in ("cgroup_nr_throttled", "cgroup_throttled_frac"):  # _cgroup() re-marks a quota-less cgroup
            if self._cg_dir is None:
                self.missing[m] = "no cgroup cpu.stat found for this process"
            else:
                self.missing.pop(m, None)

    def _move_tick(self) -> None:
        """Re-resolve the process's cgroup (slow cadence); a move is an Event, and the throttling counters
        restart from the new cgroup's (another cgroup's counts are no delta of the old one's)."""
        d, version = self._find_cgroup()
        if d == self._cg_dir:
            return
        self._events.append(Event(self.clock(), "cpu", "cgroup_move", float(version),
                                  f"process moved to cgroup {d or 'none'} (from {self._cg_dir or 'none'})"))
        self._cg_dir, self._cg_version, self._prev_cg = d, version, None
        self._cg_missing()

    def _quota(self) -> float | None:
        """The cgroup's CPU quota in cores (quota / period), None when unlimited or unreadable."""
        if self._cg_dir is None:
            return None
        if self._cg_version == 2:
            parts = (_read(os.path.join(self._cg_dir, "cpu.max")) or "max").split()
            quota, period = parts[0], parts[1] if len(parts) > 1 else "100000"
        else:
            quota = (_read(os.path.join(self._cg_dir, "cpu.cfs_quota_us")) or "-1").strip()
            period = (_read(os.path.join(self._cg_dir, "cpu.cfs_period_us")) or "100000").strip()
        try:
            q, p = float(quota), float(period)
        except ValueError:  # "max"
            return None
        return q / p if q > 0 and p > 0 else None

    def _quota_tick(self, v: dict[str, float]) -> None:
        """Re-read the quota (slow cadence); a change is an Event."""
        q = self._quota()
        if q != self._cg_quota:
            fmt = lambda x: "unlimited" if x is None else f"{x:g} cores"  # noqa: E731
            self._events.append(Event(self.clock(), "cpu", "cgroup_quota_change", -1.0 if q is None else q,
                                      f"cgroup CPU quota {fmt(self._cg_quota)} -> {fmt(q)}"))
            self._cg_quota = q
        if q is not None:
            v["cgroup_quota_cores"] = q

    def drain_events(self) -> list[Event]:
        """Events since the last call (quota changes), oldest first."""
        out, self._events = self._events, []
        return out

    # -- sampling --------------------------------------------------------------------------------
    def tick(self) -> Sample:
        v: dict[str, float] = {}
        self._stat(v)
        if self._n % self.slow_every == 0:
            if self._n:
                self._move_tick()
            self._quota_tick(v)  # before the throttled fraction, which needs to know whether a quota is set
        self._cgroup(v)
        self._process_stats(v)
        if self._n % self.slow_every == 0:
            self._loadavg(v)
            self._pressure(v)
            self._meminfo(v)
            self._freq(v)
            self._thermal(v)
        self._n += 1
        return Sample(self.clock(), "cpu", v)

    def _stat(self, v: dict[str, float]) -> None:
        text = _read(os.path.join(self.proc, "stat"))
        if text is None:
            self.missing["cpu_util_pct"] = "cannot read /proc/stat"
            return
        cur: dict[str, list[int]] = {}
        for line in text.splitlines():
            parts = line.split()
            if parts and parts[0].startswith("cpu"):
                cur[parts[0]] = [int(x) for x in parts[1:]]
            elif parts and parts[0] == "procs_running":
                v["runq"] = float(parts[1])
        prev, self._prev_stat = self._prev_stat, cur
        if prev is None:
            return  # utilization needs two readings
        for name, now in cur.items():
            before = prev.get(name)
            if before is None:
                continue
            d = [a - b for a, b in zip(now, before, strict=False)]
            # user nice system idle iowait irq softirq steal (guest time is already in user/nice)
            total = sum(d[:8])
            if total <= 0:
                continue
            idle = d[3] + (d[4] if len(d) > 4 else 0)
            pct = 100.0 * (total - idle) / total
            if name == "cpu":
                v["cpu_util_pct"] = pct
                v["iowait_pct"] = 100.0 * d[4] / total if len(d) > 4 else float("nan")
                if len(d) > 7:
                    v["steal_pct"] = 100.0 * d[7] / total
            else:
                v[f"cpu_core{name[3:]}_util_pct"] = pct
        if v.get("iowait_pct") != v.get("iowait_pct"):  # NaN: an old kernel without the column
            del v["iowait_pct"]

    def _loadavg(self, v: dict[str, float]) -> None:
        text = _read(os.path.join(self.proc, "loadavg"))
        if text is None:
            self.missing["load1"] = "cannot read /proc/loadavg"
            return
        v["load1"] = float(text.split()[0])

    def _pressure(self, v: dict[str, float]) -> None:
        for res, kinds in (("cpu", ("some",)), ("memory", ("some", "full")), ("io", ("some",))):
            short = "mem" if res == "memory" else res
            text = _read(os.path.join(self.proc, "pressure", res))
            if text is None:
                for k in kinds:
                    self.missing[f"psi_{short}_{k}_avg10"] = f"no /proc/pressure/{res} (kernel < 4.20 or psi=0)"
                continue
            for line in text.splitlines():
                parts = line.split()
                if parts and parts[0] in kinds:
                    fields = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
                    v[f"psi_{short}_{parts[0]}_avg10"] = float(fields["avg10"])

    def _meminfo(self, v: dict[str, float]) -> None:
        text = _read(os.path.join(self.proc, "meminfo"))
        if text is None:
            self.missing["mem_available_bytes"] = "cannot read /proc/meminfo"
            return
        m = _kv(text)  # values in kB
        if "MemAvailable" in m:
            v["mem_available_bytes"] = m["MemAvailable"] * 1024
        if "SwapTotal" in m and "SwapFree" in m:
            v["swap_used_bytes"] = (m["SwapTotal"] - m["SwapFree"]) * 1024

    def _cgroup(self, v: dict[str, float]) -> None:
        if self._cg_dir is None:
            return
        text = _read(os.path.join(self._cg_dir, "cpu.stat"))
        if text is None:
            return
        s = _kv(text)
        if "nr_throttled" not in s:
            return
        v["cgroup_nr_throttled"] = s["nr_throttled"]
        periods = s.get("nr_periods", 0.0)
        prev, self._prev_cg = self._prev_cg, (periods, s["nr_throttled"])
        if self._cg_quota is None:
            self.missing["cgroup_throttled_frac"] = "no CPU quota on this cgroup (cpu.max / cfs_quota_us unlimited)"
            return
        self.missing.pop("cgroup_throttled_frac", None)
        if prev is not None and periods > prev[0]:
            # share of CFS enforcement periods in which the cgroup hit its quota
            v["cgroup_throttled_frac"] = (s["nr_throttled"] - prev[1]) / (periods - prev[0])
        elif prev is not None:
            v["cgroup_throttled_frac"] = 0.0  # a quota is set and no period elapsed: nothing was throttled

    def _process_stats(self, v: dict[str, float]) -> None:
        text = _read(os.path.join(self.proc, "self/stat"))
        if text is None:
            self.missing["proc_rss_bytes"] = "cannot read /proc/self/stat"
        else:
            f = text[text.rfind(")") + 2:].split()  # fields from 3 (state) on; comm may hold spaces
            v["proc_threads"] = float(f[17])
            v["proc_rss_bytes"] = float(f[21]) * _PAGE
        ru = resource.getrusage(resource.RUSAGE_SELF)  # whole process, every thread
        v["proc_ctx_switches"] = float(ru.ru_nvcsw + ru.ru_nivcsw)
        cpu_s, now = ru.ru_utime + ru.ru_stime, self.clock()
        prev, self._prev_proc = self._prev_proc, (cpu_s, now)
        if prev is not None and now > prev[1]:
            v["proc_cpu_pct"] = 100.0 * (cpu_s - prev[0]) / ((now - prev[1]) / 1e9)

    def _freq(self, v: dict[str, float]) -> None:
        khz = [float(t) for t in (_read(f) for f in self._freq_files) if t and t.strip().isdigit()]
        if khz:
            v["freq_mhz"] = sum(khz) / len(khz) / 1000.0
            return
        text = _read(os.path.join(self.proc, "cpuinfo")) or ""
        mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
        if mhz:
            v["freq_mhz"] = sum(mhz) / len(mhz)
        else:
            self.missing["freq_mhz"] = "no cpufreq scaling_cur_freq and no 'cpu MHz' in /proc/cpuinfo"

    def _thermal(self, v: dict[str, float]) -> None:
        counts = [float(t) for t in (_read(f) for f in self._therm_files) if t and t.strip().isdigit()]
        if counts:
            v["thermal_throttle_count"] = sum(counts)
