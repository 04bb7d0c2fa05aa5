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
    "confined": (_confined, "Where", ["confined to us", "1 of 3 hosts"]),
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
