"""One self-contained HTML page for every aurora report: answer cards, linked time-series plots, small
multiples and tables.

The page opens offline from a file, a CI artifact or an e-mail: uPlot (51 KB, MIT, ``uplot.min.js`` beside
this file) and the page's own script are inlined, and the data is one JSON block. uPlot was chosen over
Plotly (4.6 MB minified, most of a 5 MB page budget on its own) and Vega-Lite (~800 KB with Vega, and
slower to draw hundreds of series): the plots here are lines over time, which is what uPlot draws, and
it draws 48 hosts' small multiples in milliseconds.

Plots take per-interval aggregates, never raw requests, so a page's size grows with the number of
intervals and hosts, not requests. Plots of one ``group`` share the x axis: zooming one (drag) zooms the
others, and the cursor moves on all of them. A plot with no data is one line saying why, never an empty
frame.

    page = Page("aurora diagnose")
    page.cards([Card("Deployment", "no deployment in the window", status="no")])
    page.plots([Plot("latency", x, {"p99": p99}, unit="ms", log=True, spans=[(a, b, "spike")])])
    page.write("report.html")
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

__all__ = ["Card", "Plot", "Page", "esc"]

esc = html.escape


@dataclass
class Card:
    """One answer. ``status``: "yes" (the answer names a cause), "no" (checked, and not it),
    "inconclusive" (checked, cannot tell; ``detail`` says what was checked) or "info"."""

    question: str
    answer: str
    figure: str = ""          # the number behind the answer, e.g. "+21% arrivals"
    confidence: str = ""      # e.g. "high (p < 1e-3)"
    status: str = "info"
    detail: str = ""


@dataclass
class Plot:
    """A time-series panel. ``x`` in seconds (unix seconds with ``time=True``); ``lines`` maps a name to
    values aligned with ``x`` (NaN: no data in that interval). ``spans``: (start, end, "spike" |
    "baseline") shaded; ``marks``: (x, text) vertical lines, e.g. a deployment. ``empty``: why there is
    nothing to draw, shown instead of the plot (also used when every value is NaN)."""

    title: str
    x: np.ndarray | list = field(default_factory=list)
    lines: dict = field(default_factory=dict)
    unit: str = ""
    log: bool = False
    time: bool = True
    spans: list = field(default_factory=list)
    marks: list = field(default_factory=list)
    empty: str = ""
    height: int = 170
    colors: dict = field(default_factory=dict)


def _num(v: float, digits: int = 5):
    """JSON number with ``digits`` significant digits (page size), None for NaN/inf. Unix seconds need
    13 for milliseconds."""
    v = float(v)
    if not math.isfinite(v):
        return None
    return float(f"{v:.{digits}g}")


def _col(a, log: bool) -> list:
    a = np.asarray(a, dtype=np.float64)
    if log:  # a log axis cannot place 0 or below: those intervals are gaps
        a = np.where(a > 0, a, np.nan)
    return [_num(v) for v in a]


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2433;background:#f4f6f9}
main{max-width:1180px;margin:0 auto;padding:18px 22px 40px}
h1{font-size:22px;margin:6px 0 2px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #d9dee6;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px}.sub{color:#5b6577;font-size:13px;margin:0 0 12px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(250px,1fr));gap:12px;margin:12px 0}
.card{background:#fff;border-radius:8px;padding:12px 14px;border-left:5px solid #9aa5b5;box-shadow:0 1px 2px #0001}
.card.yes{border-left-color:#d62728}.card.no{border-left-color:#2ca02c}.card.inconclusive{border-left-color:#e0a800}
.card .q{font-size:12px;text-transform:uppercase;letter-spacing:.04em;color:#5b6577}
.card .a{font-size:15px;font-weight:600;margin:4px 0}.card .f{font-size:20px;font-weight:700}
.card .c{font-size:12px;color:#5b6577}.card .d{font-size:12px;color:#5b6577;margin-top:6px}
.panel{background:#fff;border-radius:8px;padding:8px 10px;margin:8px 0;box-shadow:0 1px 2px #0001}
.panel .t{font-size:13px;font-weight:600;margin:0 0 2px}.empty{color:#5b6577;font-size:13px;font-style:italic}
.multiples{display:grid;grid-template-columns:repeat(auto-fill,minmax(270px,1fr));gap:8px}
.multiples .panel{margin:0}
table{border-collapse:collapse;font-size:13px;background:#fff;margin:6px 0}
td,th{border:1px solid #d9dee6;padding:3px 8px;text-align:right}th{background:#eef1f5}
td:first-child,th:first-child{text-align:left}
details{margin:6px 0;font-size:13px}pre{background:#fff;padding:8px;font-size:12px;overflow-x:auto}
.valid{color:#0a7a2f;font-weight:bold}.invalid{color:#b00020;font-weight:bold}
.verdict{font-size:15px;padding:8px 12px;background:#fff;border-left:4px solid #888}
.hint{font-size:12px;color:#5b6577}
"""


def _asset(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


class Page:
    """Build a page top to bottom, then ``render()`` or ``write(path)``. Text passed to ``p``, ``h`` and
    the dataclasses is escaped; ``raw`` takes trusted HTML."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title = title
        self.parts: list[str] = [f"<h1>{esc(title)}</h1>"]
        if subtitle:
            self.parts.append(f"<p class='sub'>{esc(subtitle)}</p>")
        self.specs: list[dict] = []

    def h(self, text: str, level: int = 2) -> Page:
        self.parts.append(f"<h{level}>{esc(text)}</h{level}>")
        return self

    def p(self, text: str, cls: str = "") -> Page:
        self.parts.append(f"<p{f' class={cls!r}' if cls else ''}>{esc(text)}</p>")
        return self

    def raw(self, trusted_html: str) -> Page:
        self.parts.append(trusted_html)
        return self

    def cards(self, cards: list[Card]) -> Page:
        out = ["<div class='cards'>"]
        for c in cards:
            out.append(f"<div class='card {esc(c.status)}' data-question='{esc(c.question)}'>"
                       f"<div class='q'>{esc(c.question)}</div><div class='a'>{esc(c.answer)}</div>"
                       + (f"<div class='f'>{esc(c.figure)}</div>" if c.figure else "")
                       + (f"<div class='c'>confidence: {esc(c.confidence)}</div>" if c.confidence else "")
                       + (f"<div class='d'>{esc(c.detail)}</div>" if c.detail else "") + "</div>")
        out.append("</div>")
        self.parts.append("".join(out))
        return self

    def _panel(self, p: Plot, group: str) -> str:
        x = np.asarray(p.x, dtype=np.float64)
        cols = {k: np.asarray(v, dtype=np.float64) for k, v in p.lines.items()}
        cols = {k: v for k, v in cols.items() if v.size == x.size and np.any(np.isfinite(v) & (v > 0 if p.log else True))}
        why = p.empty or ("" if cols and x.size else "no data in this run")
        if why:
            return (f"<div class='panel'><div class='t'>{esc(p.title)}</div>"
                    f"<div class='empty'>{esc(why)}</div></div>")
        pid = f"plot{len(self.specs)}"
        self.specs.append({
            "id": pid, "group": group, "unit": p.unit, "log": p.log, "time": p.time, "height": p.height,
            "x": [_num(v, 13 if p.time else 6) for v in x], "legend": p.height >= 150,
            "lines": [{"name": k, "y": _col(v, p.log), **({"color": p.colors[k]} if k in p.colors else {})}
                      for k, v in cols.items()],
            "spans": [[_num(a, 13), _num(b, 13), kind] for a, b, kind in p.spans],
            "marks": [[_num(a, 13), str(t)] for a, t in p.marks],
        })
        return f"<div class='panel'><div class='t'>{esc(p.title)}</div><div id='{pid}' class='plot'></div></div>"

    def plots(self, plots: list[Plot], group: str = "time") -> Page:
        """Full-width panels stacked on one shared, zoom-linked x axis (per ``group``)."""
        self.parts.append("".join(self._panel(p, group) for p in plots))
        return self

    def multiples(self, plots: list[Plot], group: str = "time") -> Page:
        """Small panels in a grid, in the given order, on the same linked axis."""
        self.parts.append("<div class='multiples'>" + "".join(self._panel(p, group) for p in plots) + "</div>")
        return self

    def table(self, rows, header=None) -> Page:
        self.parts.append(table(rows, header))
        return self

    def render(self) -> str:
        # "</" inside the JSON would end the script element early; a JSON string may escape "/".
        data = json.dumps({"plots": self.specs}, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
        script = (f"<script>{_asset('uplot.min.js')}</script>"
                  f"<script type='application/json' id='aurora-data'>{data}</script>"
                  f"<script>{_asset('page.js')}</script>") if self.specs else ""
        return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
                "<meta name='viewport' content='width=device-width, initial-scale=1'>"
                f"<title>{esc(self.title)}</title><style>{_asset('uplot.min.css')}{_CSS}</style></head>"
                f"<body><main>{''.join(self.parts)}"
                + ("<p class='hint'>Drag across a plot to zoom every plot on the same axis; double-click to "
                   "reset. Hover for the interval's values.</p>" if self.specs else "")
                + f"</main>{script}</body></html>")

    def write(self, path) -> str:
        with open(path, "w", encoding="utf-8") as f:
            f.write(self.render())
        return str(path)


def _cell(v) -> str:
    if isinstance(v, float):
        return "n/a" if not math.isfinite(v) else f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return esc(json.dumps(v, default=str))
    return esc("n/a" if v is None else str(v))


def table(rows, header=None) -> str:
    """An HTML table of escaped cells; floats to 4 significant digits, None and NaN as n/a."""
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{esc(str(h))}</th>" for h in header) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>")
    out.append("</table>")
    return "".join(out)


def binned(t: np.ndarray, v: np.ndarray, edges: np.ndarray, how=np.mean) -> np.ndarray:
    """``how`` of the values ``v`` whose time ``t`` falls in each interval of ``edges``; NaN where none.
    Sorted once and cut per filled interval: runs days apart leave most intervals empty, and a scan of
    every value per interval took seconds."""
    out = np.full(edges.size - 1, np.nan)
    idx = np.searchsorted(edges, t, side="right") - 1
    keep = (idx >= 0) & (idx < out.size)
    order = np.argsort(idx[keep], kind="stable")
    idx, v = idx[keep][order], v[keep][order]
    bounds = np.searchsorted(idx, np.arange(out.size + 1))
    for k in np.flatnonzero(bounds[1:] > bounds[:-1]):
        out[k] = how(v[bounds[k]:bounds[k + 1]])
    return out
