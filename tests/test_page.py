"""The report pages: components (escaping, gaps, empty panels, size) and the diagnose page in a real
headless Chromium, whose four answer cards must say the right thing for a regression, a load rise, a
confined host and a dependency (run files made here through the real Recorder)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from test_incidents import simulate_run
from test_report_browser import assert_plots_drawn, load_in_chromium, needs_chromium

from aurora_core.cli import main
from aurora_core.diagnose import diagnose
from aurora_core.diagnose.html import diagnose_cards, diagnose_page
from aurora_core.loadgen import poisson_schedule
from aurora_core.page import Card, Page, Plot
from aurora_core.recorder import load_run
from aurora_core.records import Sample

DUR, STEP = 10.0, 5.0


def _data(html: str) -> dict:
    m = re.search(r"<script type='application/json' id='aurora-data'>(.*?)</script>", html, re.S)
    return json.loads(m.group(1).replace("<\\/", "</"))


def test_components_escape_and_encode():
    page = Page("t <b>", "s & s")
    page.cards([Card("Q<", "A>", "1 < 2", "high", "yes", "d'")])
    x = np.arange(5.0)
    page.plots([Plot("lat", x, {"p99": [1.0, np.nan, 0.0, -1.0, 3.0], "</script>": x}, unit="ms", log=True),
                Plot("nothing", x, {"a": np.full(5, np.nan)}), Plot("gpu", empty="no GPU telemetry")])
    html = page.render()
    assert "t &lt;b&gt;" in html and "Q&lt;" in html and "1 &lt; 2" in html and "<b>" not in html.split("<script")[0]
    spec = _data(html)["plots"]
    assert len(spec) == 1  # an all-NaN plot and an empty one are lines of text, not frames
    lines = {ln["name"]: ln["y"] for ln in spec[0]["lines"]}
    assert lines["p99"] == [1.0, None, None, None, 3.0]  # NaN, and <= 0 on a log axis, are gaps
    assert "</script>" in lines  # a name cannot close the script element early
    assert html.count("class='empty'") == 2 and "no data in this run" in html and "no GPU telemetry" in html


def test_a_page_without_plots_has_no_script():
    html = Page("t").cards([Card("q", "a")]).render()
    assert "<script" not in html


def _arr(rate, seed, dur=DUR):
    return poisson_schedule(rate, dur, seed=seed) / 1e9


def _regression(tmp_path):
    a = simulate_run(tmp_path / "a", _arr(40, 1, STEP), meta={"label": "v1", "host": "h"}, item_ms=lambda t: 6.0,
                     seed=1)
    b = simulate_run(tmp_path / "b", _arr(40, 2, STEP), meta={"label": "v2", "host": "h"}, item_ms=lambda t: 12.0,
                     seed=2)
    ra, rb = load_run(a), load_run(b)
    end_a = ra.wall_minus_mono_ns + int(ra.requests["arrival_ns"].max())
    rb.meta["wall_minus_mono_ns"] = end_a + 100_000_000 - int(rb.requests["arrival_ns"].min())
    return [ra, rb]


def _load_rise(tmp_path):
    arrivals = np.sort(np.concatenate([_arr(60, 1), STEP + _arr(60, 2, DUR - STEP)]))
    arrivals = arrivals[arrivals < DUR]
    return [simulate_run(tmp_path / "l", arrivals, meta={"label": "v1"}, item_ms=lambda t: 6.0, cpu_ms=1.0,
                         seed=3)]


def _confined(tmp_path):
    def cpu(slow):
        def samples(t0):
            return [Sample(t0 + int(k * 0.1e9), "cpu", {"cpu_util_pct": 95.0 if slow and k * 0.1 >= STEP else 35.0,
                                                        "proc_cpu_pct": 50.0}) for k in range(int(DUR * 10) + 10)]
        return samples

    runs = []
    for i, region in enumerate(("us", "eu", "eu")):
        slow = i == 0
        runs.append(simulate_run(tmp_path / f"h{i}", _arr(40, 10 + i),
                                 meta={"label": "v1", "host": f"h{i}", "region": region, "cpu": {"logical_cores": 2}},
                                 item_ms=(lambda t: 12.0 if t >= STEP else 6.0) if slow else (lambda t: 6.0),
                                 cpu_ms=(lambda t: 4.0 if t >= STEP else 2.0) if slow else 2.0, samples=cpu(slow),
                                 seed=20 + i))
    return runs


def _dependency(tmp_path):
    run = load_run(simulate_run(tmp_path / "d", _arr(40, 1), meta={"label": "v1"}, item_ms=lambda t: 6.0, seed=3))
    a = run.requests["arrival_ns"]
    d = np.where((a - a.min()) / 1e9 >= STEP, 40_000_000, 4_000_000)
    run.spans = {"name": np.array(["auth_service"] * a.size), "start_ns": a - d - 1000, "end_ns": a - 1000,
                 "request_id": run.requests["request_id"].copy(), "attrs": np.array([""] * a.size)}
    return [run]


CASES = {  # case -> (runs, the card that must name it, words its answer must hold)
    "regression": (_regression, "Deployment", ["label", "lines up"]),
    "load": (_load_rise, "Traffic", ["arrivals rose", "queueing explains"]),
    "confined": (_confined, "Where", ["confined to us", "1 of 3 hosts with data"]),
    "dependency": (_dependency, "Dependencies", ["auth_service", "grew"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_four_answers(tmp_path, case):
    make, question, words = CASES[case]
    res = diagnose(make(tmp_path))
    cards = {c.question: c for c in diagnose_cards(res.data)}
    assert set(cards) == {"Deployment", "Traffic", "Where", "Dependencies"}, res.data["summary"]
    assert cards[question].status == "yes", (cards[question], res.data["summary"])
    assert all(w in cards[question].answer for w in words), cards[question]
    others = [c for q, c in cards.items() if q != question and q != "Where"]
    assert all(c.status != "yes" for c in others), others  # the other causes are not claimed


@needs_chromium
@pytest.mark.parametrize("case", ["confined", "dependency"])
def test_diagnose_page_in_chromium(tmp_path, case):
    make, question, words = CASES[case]
    runs = make(tmp_path)
    out = tmp_path / "d.html"
    paths = []
    for r in runs:  # through the real command, from run files
        paths.append(str(r.path if hasattr(r, "path") else r))
    if case == "dependency":  # spans were added in memory: render through the library
        diagnose_page(diagnose(runs)).write(out)
    else:
        assert main(["diagnose", *paths, "--html", str(out)]) == 0
    page = load_in_chromium(out, tmp_path, drag="plot0")
    assert page["errors"] == []
    assert_plots_drawn(page, at_least=4)
    cards = {q: (cls, text) for q, cls, text in page["cards"]}
    assert "yes" in cards[question][0].split() and all(w in cards[question][1] for w in words), cards
    # one shared time axis: a drag on the first plot zooms every plot of the page to the same range
    after = {p["id"]: p["x"] for p in page["after_drag"]}
    lo, hi = after["plot0"]
    full = next(p["x"] for p in page["plots"] if p["id"] == "plot0")
    assert full[0] < lo < hi < full[1]
    assert all(x == pytest.approx([lo, hi]) for x in after.values()), after
    if case == "confined":
        assert "The fleet at a glance" in page["text"]
        # the most deviating host comes first in the small multiples
        assert page["text"].index("h0/us: p99") < page["text"].index("h1/eu")


def _win(name, affected, unaffected, no_data=()):
    return {"start_s": 1.0, "end_s": 2.0, "p_value": 1e-5, "verdict": "inconclusive", "causes": [], "checked": [],
            "confinement": {"affected": affected, "unaffected": unaffected, "no_data": list(no_data),
                            "confined": bool(unaffected)}}


def test_where_card_says_what_the_text_report_says():
    """A spikes while B is calm, later B while A is calm: each spike is confined (the text's "yes"), not
    fleet-wide; a host without data at the time is neither affected nor spared."""
    from aurora_core.diagnose.html import _where_card
    from aurora_core.diagnose.report import answers

    data = {"series": [{"name": "a/us", "windows": [_win("a/us", ["a/us"], ["b/eu"])]},
                       {"name": "b/eu", "windows": [_win("b/eu", ["b/eu"], ["a/us"])]}]}
    wins = [(e["name"], w) for e in data["series"] for w in e["windows"]]
    card = _where_card(data, wins)
    assert card.status == "yes" and answers(data)[2].startswith("confined to some hosts/regions: yes")
    assert card.answer == "confined to us (1 of 2 hosts with data)" and "1 more confined" in card.detail
    data = {"series": [{"name": "a/us", "windows": [_win("a/us", ["a/us"], [], no_data=["b/eu"])]},
                       {"name": "b/eu", "windows": []}]}
    card = _where_card(data, [("a/us", data["series"][0]["windows"][0])])
    assert card.status == "no" and "no (" in answers(data)[2]


def test_memory_verdict_panel_shows_gpu_memory_used_fraction(tmp_path):
    from aurora_core.diagnose.html import _host_plots

    def samples(t0):
        return [Sample(t0 + int(k * 0.1e9), "gpu0", {"mem_used_bytes": (79.5 if k * 0.1 >= STEP else 40.0) * 2**30,
                                                      "mem_total_bytes": 80.0 * 2**30}) for k in range(110)]

    run = simulate_run(tmp_path / "m", _arr(40, 3), meta={"label": "v1"},
                       item_ms=lambda t: 12.0 if t >= STEP else 6.0, samples=samples, seed=3)
    res = diagnose([run])
    entry = res.data["series"][0]
    assert any(w["verdict"] == "memory" for w in entry["windows"]), res.data["summary"]
    plots = _host_plots(res.series[0], res.detections[0], entry, 0.0)
    mem = next(p for p in plots if "Memory pressure" in p.title)
    assert not mem.empty and np.nanmax(mem.lines["gpu0 memory used fraction"]) > 0.95
