// aurora report pages: draws every plot from the JSON block #aurora-data with uPlot (inlined above).
// Plots of one group share uPlot's cursor sync key: the cursor moves on all of them, and a zoom (drag)
// or its reset (double-click) on one is published to the others, which zoom to the same x range.
(function () {
  "use strict";
  var spec = JSON.parse(document.getElementById("aurora-data").textContent);
  var PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                 "#7f7f7f", "#bcbd22"];

  function shadeHook(p) {
    return function (u) {
      var ctx = u.ctx, top = u.bbox.top, h = u.bbox.height;
      ctx.save();
      (p.spans || []).forEach(function (s) {
        var a = u.valToPos(s[0], "x", true), b = u.valToPos(s[1], "x", true);
        if (b < u.bbox.left || a > u.bbox.left + u.bbox.width) return;
        ctx.fillStyle = s[2] === "baseline" ? "rgba(44,160,44,0.10)" : "rgba(214,39,40,0.16)";
        ctx.fillRect(a, top, Math.max(b - a, 1), h);
      });
      (p.marks || []).forEach(function (m) {
        var x = u.valToPos(m[0], "x", true);
        ctx.strokeStyle = "#555"; ctx.setLineDash([4, 3]); ctx.lineWidth = 1;
        ctx.beginPath(); ctx.moveTo(x, top); ctx.lineTo(x, top + h); ctx.stroke();
        ctx.setLineDash([]); ctx.fillStyle = "#333"; ctx.font = "11px system-ui, sans-serif";
        ctx.fillText(m[1], x + 3, top + 12);
      });
      ctx.restore();
    };
  }

  function make(p, el) {
    var series = [{label: p.time ? "time" : "x"}];
    var data = [p.x];
    p.lines.forEach(function (ln, i) {
      series.push({label: ln.name, stroke: ln.color || PALETTE[i % PALETTE.length], width: 1.4,
                   points: {show: p.x.length < 60}, spanGaps: false, dash: ln.dash || undefined,
                   value: function (u, v) { return v == null ? "-" : (+v.toPrecision(4)) + (p.unit ? " " + p.unit : ""); }});
      data.push(ln.y);
    });
    var opts = {
      width: Math.max(el.clientWidth, 200), height: p.height || 170,
      series: series,
      scales: {x: {time: !!p.time}, y: p.log ? {distr: 3} : {}},
      axes: [{}, {label: p.unit || "", size: 60}],
      cursor: {sync: {key: p.group}, drag: {x: true, y: false}},
      legend: {show: p.legend, live: true},
      hooks: {draw: [shadeHook(p)]},
    };
    var u = new uPlot(opts, data, el);
    return u;
  }

  var all = [];
  spec.plots.forEach(function (p) {
    var el = document.getElementById(p.id);
    if (el) all.push(make(p, el));
  });
  window.addEventListener("resize", function () {
    all.forEach(function (u) { u.setSize({width: Math.max(u.root.parentNode.clientWidth, 200), height: u.height}); });
  });
  window.auroraPlots = all;  // for tests and the curious
})();
