/* A line chart on a <canvas>, no library: drawChart(canvas, [{name, points: [[x, y], ...], color, dashed}], opts).
   The canvas carries data-points (how many points it drew), which the browser test reads. */
"use strict";
function drawChart(canvas, series, opts) {
  opts = opts || {};
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 420, h = canvas.clientHeight || 220;
  canvas.width = w * dpr; canvas.height = h * dpr;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const pad = {l: 58, r: 12, t: 22, b: 28};
  const all = [].concat.apply([], series.map(s => s.points)).filter(p => isFinite(p[0]) && isFinite(p[1]));
  canvas.dataset.points = String(all.length);
  ctx.font = "12px system-ui, sans-serif"; ctx.fillStyle = "#111";
  ctx.fillText(opts.title || "", pad.l, 14);
  if (!all.length) { ctx.fillStyle = "#888"; ctx.fillText("no data yet", w / 2 - 30, h / 2); return; }
  let x0 = Math.min.apply(null, all.map(p => p[0])), x1 = Math.max.apply(null, all.map(p => p[0]));
  let y0 = Math.min.apply(null, all.map(p => p[1])), y1 = Math.max.apply(null, all.map(p => p[1]));
  if (x1 === x0) { x1 = x0 + 1; }
  if (y1 === y0) { const d = Math.abs(y0) * 0.1 || 1; y0 -= d; y1 += d; }
  const X = x => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
  const Y = y => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#e5e7eb"; ctx.fillStyle = "#555"; ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4, yy = Y(yv);
    ctx.beginPath(); ctx.moveTo(pad.l, yy); ctx.lineTo(w - pad.r, yy); ctx.stroke();
    ctx.fillText(fmtNum(yv), 4, yy + 4);
  }
  const integral = all.every(p => Number.isInteger(p[0]));  // steps: label whole numbers
  for (let i = 0; i <= 4; i++) {
    const xv = x0 + (x1 - x0) * i / 4;
    ctx.textAlign = i === 0 ? "left" : i === 4 ? "right" : "center";
    ctx.fillText(integral ? String(Math.round(xv)) : fmtNum(xv), X(xv), h - 8);
  }
  ctx.textAlign = "left";
  series.forEach((s, k) => {
    const pts = s.points.filter(p => isFinite(p[0]) && isFinite(p[1]));
    if (!pts.length) return;
    ctx.strokeStyle = s.color || ["#2563eb", "#dc2626", "#16a34a", "#9333ea"][k % 4];
    ctx.fillStyle = ctx.strokeStyle; ctx.lineWidth = 1.6; ctx.setLineDash(s.dashed ? [5, 4] : []);
    ctx.beginPath();
    pts.forEach((p, i) => i ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1])));
    ctx.stroke(); ctx.setLineDash([]);
    if (pts.length < 40 || s.dashed) pts.forEach(p => { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 2.2, 0, 7); ctx.fill(); });
    ctx.fillText(s.name, w - pad.r - 120, pad.t + 4 + 14 * k);
  });
}
function fmtNum(v) {
  if (v === null || v === undefined || !isFinite(v)) return "-";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(1);
  return a >= 100 ? v.toFixed(0) : a >= 1 ? v.toFixed(2) : v.toPrecision(2);
}
