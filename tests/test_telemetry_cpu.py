"""CPU backend: /proc and /sys parsing against fixture trees, missing-with-reason, and a live smoke test."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from aurora_core.telemetry.cpu import CpuBackend
from aurora_core.telemetry.sampler import TelemetrySampler

# docs/CONTRACTS.md, "CPU metric names" (per-core names are cpu_core{N}_util_pct).
CONTRACT_CPU = {
    "cpu_util_pct", "steal_pct", "iowait_pct", "load1", "runq", "freq_mhz", "cgroup_throttled_frac",
    "cgroup_nr_throttled", "psi_cpu_some_avg10", "psi_mem_some_avg10", "psi_mem_full_avg10", "psi_io_some_avg10",
    "proc_rss_bytes", "proc_threads", "proc_ctx_switches", "swap_used_bytes", "mem_available_bytes",
    "thermal_throttle_count", "proc_cpu_pct", "sampler_cpu_s", "cgroup_quota_cores",
}


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def stat(cpu, c0, c1, running=3):
    # user nice system idle iowait irq softirq steal guest guest_nice
    line = lambda name, v: f"{name} " + " ".join(str(x) for x in v) + " 0 0\n"  # noqa: E731
    return line("cpu", cpu) + line("cpu0", c0) + line("cpu1", c1) + f"ctxt 1\nprocs_running {running}\n"


@pytest.fixture
def host(tmp_path):
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    write(proc, "stat", stat([100, 0, 50, 800, 20, 0, 0, 30], [50, 0, 25, 400, 10, 0, 0, 15], [50, 0, 25, 400, 10, 0, 0, 15]))
    write(proc, "loadavg", "1.50 1.00 0.50 4/300 1234\n")
    write(proc, "pressure/cpu", "some avg10=12.50 avg60=3.00 avg300=1.00 total=100\nfull avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    write(proc, "pressure/memory", "some avg10=1.25 avg60=0 avg300=0 total=1\nfull avg10=0.50 avg60=0 avg300=0 total=1\n")
    write(proc, "pressure/io", "some avg10=7.00 avg60=0 avg300=0 total=1\nfull avg10=1.00 avg60=0 avg300=0 total=1\n")
    write(proc, "meminfo", "MemTotal: 1000 kB\nMemAvailable: 600 kB\nSwapTotal: 200 kB\nSwapFree: 150 kB\n")
    write(proc, "self/cgroup", "0::/app.slice/svc\n")
    fields = ["R"] + ["0"] * 40
    fields[17], fields[21] = "7", "100"  # num_threads, rss in pages (man 5 proc fields 20 and 24)
    write(proc, "self/stat", "4242 (a (tricky) name) " + " ".join(fields) + "\n")
    write(sys_, "fs/cgroup/app.slice/svc/cpu.max", "200000 100000\n")
    write(sys_, "fs/cgroup/app.slice/svc/cpu.stat", "usage_usec 5\nnr_periods 100\nnr_throttled 10\nthrottled_usec 999\n")
    for i, (khz, thr) in enumerate(((2_000_000, 3), (3_000_000, 4))):
        write(sys_, f"devices/system/cpu/cpu{i}/cpufreq/scaling_cur_freq", f"{khz}\n")
        write(sys_, f"devices/system/cpu/cpu{i}/thermal_throttle/core_throttle_count", f"{thr}\n")
    return proc, sys_


def test_fixture_host_exact_values(host):
    proc, sys_ = host
    be = CpuBackend(proc=str(proc), sys=str(sys_), slow_every=1)
    first = be.tick().values
    assert "cpu_util_pct" not in first  # needs two readings: absent, not 0
    assert first["freq_mhz"] == 2500.0 and first["thermal_throttle_count"] == 7.0
    # +100 jiffies per core: core0 all busy user, core1 half idle half iowait; total adds 40 steal
    write(proc, "stat", stat([200, 0, 50, 850, 70, 0, 0, 70], [150, 0, 25, 400, 10, 0, 0, 15],
                             [50, 0, 25, 450, 60, 0, 0, 15], running=5))
    write(sys_, "fs/cgroup/app.slice/svc/cpu.stat", "nr_periods 150\nnr_throttled 30\nthrottled_usec 2000\n")
    v = be.tick().values
    total = 100 + 50 + 50 + 40
    assert v["cpu_util_pct"] == pytest.approx(100 * (total - 100) / total)
    assert v["steal_pct"] == pytest.approx(100 * 40 / total)
    assert v["iowait_pct"] == pytest.approx(100 * 50 / total)
    assert v["cpu_core0_util_pct"] == pytest.approx(100.0)
    assert v["cpu_core1_util_pct"] == pytest.approx(0.0)
    assert v["runq"] == 5 and v["load1"] == 1.5
    assert v["psi_cpu_some_avg10"] == 12.5 and v["psi_mem_some_avg10"] == 1.25
    assert v["psi_mem_full_avg10"] == 0.5 and v["psi_io_some_avg10"] == 7.0
    assert v["mem_available_bytes"] == 600 * 1024 and v["swap_used_bytes"] == 50 * 1024
    assert v["cgroup_nr_throttled"] == 30
    assert v["cgroup_throttled_frac"] == pytest.approx(20 / 50)
    assert v["proc_threads"] == 7 and v["proc_rss_bytes"] == 100 * os.sysconf("SC_PAGE_SIZE")
    assert v["proc_ctx_switches"] > 0 and v["proc_cpu_pct"] >= 0  # getrusage of this process
    names = {k for k in v if not (k.startswith("cpu_core") and k.endswith("_util_pct"))}
    assert names <= CONTRACT_CPU
    assert be.missing == {}


def test_cgroup_v1(tmp_path):
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    write(proc, "self/cgroup", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n")
    write(sys_, "fs/cgroup/cpu,cpuacct/docker/abc/cpu.stat", "nr_periods 10\nnr_throttled 1\nthrottled_time 5\n")
    write(sys_, "fs/cgroup/cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "50000\n")
    be = CpuBackend(proc=str(proc), sys=str(sys_))
    assert be.capabilities()["cgroup"]["version"] == 1
    be.tick()
    write(sys_, "fs/cgroup/cpu,cpuacct/docker/abc/cpu.stat", "nr_periods 20\nnr_throttled 6\nthrottled_time 9\n")
    v = be.tick().values
    assert v["cgroup_nr_throttled"] == 6 and v["cgroup_throttled_frac"] == pytest.approx(0.5)


def test_unlimited_cgroup_reports_count_but_no_fraction(host):
    proc, sys_ = host
    write(sys_, "fs/cgroup/app.slice/svc/cpu.max", "max 100000\n")
    be = CpuBackend(proc=str(proc), sys=str(sys_))
    be.tick()
    v = be.tick().values
    assert "cgroup_throttled_frac" not in v and v["cgroup_nr_throttled"] == 10
    assert "no CPU quota" in be.missing["cgroup_throttled_frac"]


@pytest.mark.parametrize("version", [1, 2])
def test_quota_set_while_running_is_seen(tmp_path, version):
    """Started with no quota, then a limit is set, lowered, and lifted while the process runs (a pod resized
    in place, systemd CPUQuota=): each change is an Event, the quota is a sample in cores, and the throttled
    fraction is recorded whenever a quota is in force (it was 'missing' for the whole run before)."""
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    if version == 2:
        write(proc, "self/cgroup", "0::/svc\n")
        d = "fs/cgroup/svc"
        quota = lambda q: write(sys_, f"{d}/cpu.max", "max 100000\n" if q is None else f"{int(q * 100000)} 100000\n")  # noqa: E731
    else:
        write(proc, "self/cgroup", "3:cpu,cpuacct:/svc\n")
        d = "fs/cgroup/cpu,cpuacct/svc"
        write(sys_, f"{d}/cpu.cfs_period_us", "50000\n")
        quota = lambda q: write(sys_, f"{d}/cpu.cfs_quota_us", "-1\n" if q is None else f"{int(q * 50000)}\n")  # noqa: E731
    stat_ = lambda periods, thr: write(sys_, f"{d}/cpu.stat", f"nr_periods {periods}\nnr_throttled {thr}\n")  # noqa: E731
    quota(None)
    stat_(0, 0)
    be = CpuBackend(proc=str(proc), sys=str(sys_), slow_every=2)
    v = be.tick().values
    assert "cgroup_quota_cores" not in v and "cgroup_throttled_frac" not in v and be.drain_events() == []
    quota(0.5)
    stat_(10, 0)
    be.tick()  # a fast tick: the quota is re-read on the slow cadence only
    assert be.drain_events() == []
    stat_(20, 8)
    v = be.tick().values
    assert v["cgroup_quota_cores"] == 0.5 and v["cgroup_throttled_frac"] == pytest.approx(0.8)
    (ev,) = be.drain_events()
    assert (ev.source, ev.kind, ev.value) == ("cpu", "cgroup_quota_change", 0.5)
    assert "unlimited -> 0.5 cores" in ev.detail and "cgroup_throttled_frac" not in be.missing
    stat_(30, 18)
    assert be.tick().values["cgroup_throttled_frac"] == pytest.approx(1.0)
    quota(None)
    stat_(40, 18)
    v = be.tick().values
    assert "cgroup_quota_cores" not in v and "cgroup_throttled_frac" not in v and v["cgroup_nr_throttled"] == 18
    (ev,) = be.drain_events()
    assert ev.value == -1.0 and "0.5 cores -> unlimited" in ev.detail
    assert be.capabilities()["cgroup"]["quota_cores"] is None



def test_process_moved_into_a_limited_cgroup_is_seen(tmp_path):
    """The cgroup is found at start; a process moved into another one (an operator, a node agent) while it
    runs is seen at the next slow tick: a move Event, then the new cgroup's quota and throttling."""
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    write(proc, "self/cgroup", "3:cpu,cpuacct:/free\n")
    write(sys_, "fs/cgroup/cpu,cpuacct/free/cpu.stat", "nr_periods 0\nnr_throttled 0\n")
    write(sys_, "fs/cgroup/cpu,cpuacct/free/cpu.cfs_quota_us", "-1\n")
    write(sys_, "fs/cgroup/cpu,cpuacct/slow/cpu.stat", "nr_periods 500\nnr_throttled 100\n")
    write(sys_, "fs/cgroup/cpu,cpuacct/slow/cpu.cfs_quota_us", "10000\n")
    be = CpuBackend(proc=str(proc), sys=str(sys_), slow_every=2)
    be.tick(), be.tick()
    write(proc, "self/cgroup", "3:cpu,cpuacct:/slow\n")
    v = be.tick().values
    assert v["cgroup_quota_cores"] == pytest.approx(0.1) and "cgroup_throttled_frac" not in v  # no delta yet
    move, quota = be.drain_events()
    assert (move.kind, quota.kind, quota.value) == ("cgroup_move", "cgroup_quota_change", pytest.approx(0.1))
    assert move.detail.endswith("/slow (from " + str(sys_ / "fs/cgroup/cpu,cpuacct/free") + ")")
    write(sys_, "fs/cgroup/cpu,cpuacct/slow/cpu.stat", "nr_periods 510\nnr_throttled 108\n")
    assert be.tick().values["cgroup_throttled_frac"] == pytest.approx(0.8)  # the new cgroup's counters only
    assert be.capabilities()["cgroup"]["dir"].endswith("/slow") and be.drain_events() == []

def test_bare_host_records_missing_with_reasons(tmp_path):
    proc, sys_ = tmp_path / "proc", tmp_path / "sys"
    write(proc, "stat", stat([1] * 8, [1] * 8, [1] * 8))
    be = CpuBackend(proc=str(proc), sys=str(sys_))
    v = be.tick().values
    for m in ("psi_cpu_some_avg10", "thermal_throttle_count", "cgroup_throttled_frac", "load1", "freq_mhz",
              "mem_available_bytes", "proc_rss_bytes"):
        assert m not in v, m
        assert be.missing[m], m
    assert "pressure" in be.missing["psi_cpu_some_avg10"]


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="needs Linux /proc")
def test_live_host_sane():
    be = CpuBackend()
    be.tick()
    v = be.tick().values
    for k, x in v.items():
        if k.endswith("_pct") and k != "proc_cpu_pct":
            assert 0.0 <= x <= 100.0 + 1e-6, (k, x)
    assert v["proc_rss_bytes"] > 0


def test_sampler_cpu_only_publishes_and_accounts_its_cpu_time():
    got = []
    with TelemetrySampler(callbacks=[got.append], period_s=0.02, gpu=False) as s:
        deadline = time.monotonic() + 10
        while len([x for x in got if x.source == "cpu"]) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    cpu = [x for x in got if x.source == "cpu"]
    assert len(cpu) >= 3
    assert cpu[-1].values["sampler_cpu_s"] > 0
    assert s.latest()["cpu"].ts_ns == cpu[-1].ts_ns  # latest() is the newest published sample
    assert "cpu" in s.capabilities() and s.capabilities()["gpu"] == {}


def test_burst_mode_is_bounded():
    s = TelemetrySampler(period_s=0.1, gpu=False)
    assert s._period() == 0.1
    s.burst(period_s=0.0001, duration_s=3600)
    assert s._period() == 0.01  # never faster than 10 ms
    assert s._burst_until - time.monotonic() <= 10.0  # never longer than 10 s
    s.burst(period_s=0.05, duration_s=0)
    assert s._period() == 0.1
    with pytest.raises(ValueError, match="period_s"):
        TelemetrySampler(period_s=0)


def _v1_cpu_root() -> str | None:
    """This machine's writable cgroup v1 cpu hierarchy (root), or None."""
    root = "/sys/fs/cgroup/cpu"
    ok = os.path.exists(os.path.join(root, "cpu.cfs_quota_us")) and os.access(root, os.W_OK) and os.geteuid() == 0
    return root if ok else None


@pytest.mark.skipif(_v1_cpu_root() is None, reason="needs a writable cgroup v1 cpu hierarchy (root)")
def test_live_cgroup_v1_quota_set_while_running(tmp_path):
    """A real cgroup v1: a CPU-burning child samples itself while the parent sets a 0.2-core quota on its
    cgroup 1 s in. The child's sampler sees the change (an event), the quota in cores and a throttled fraction."""
    import json
    import subprocess
    import sys

    cg = os.path.join(_v1_cpu_root(), f"aurora_test_{os.getpid()}")
    os.mkdir(cg)
    code = f"""
import json, os, sys, time
with open({os.path.join(cg, "cgroup.procs")!r}, "w") as f:
    f.write(str(os.getpid()))
from aurora_core.telemetry.cpu import CpuBackend
be, out, events, t0 = CpuBackend(slow_every=2), [], [], time.monotonic()
while time.monotonic() - t0 < 3.0:
    t1 = time.monotonic()
    while time.monotonic() - t1 < 0.05:
        pass
    v = be.tick().values
    out.append([time.monotonic() - t0, v.get("cgroup_quota_cores"), v.get("cgroup_throttled_frac")])
    events += [[e.kind, e.value, e.detail] for e in be.drain_events()]
print(json.dumps({{"samples": out, "events": events}}))
"""
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        time.sleep(1.0)
        with open(os.path.join(cg, "cpu.cfs_quota_us"), "w") as f:
            f.write(str(int(0.2 * int(open(os.path.join(cg, "cpu.cfs_period_us")).read()))))
        out, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        os.rmdir(cg)
    got = json.loads(out)
    early = [s for s in got["samples"] if s[0] < 0.8]
    assert early and all(q is None and f is None for _, q, f in early)
    late = [s for s in got["samples"] if s[1] is not None]
    assert late and all(q == pytest.approx(0.2) for _, q, _f in late)
    assert max(f for *_, f in late if f is not None) > 0.3, late  # a busy loop on 0.2 cores is throttled
    assert [e[:2] for e in got["events"]] == [["cgroup_quota_change", pytest.approx(0.2)]], got["events"]
