// LoRADashboard charts as SVG, for hosts where bqplot does not render (marimo). A plain ES module (no build
// step, no dependencies, nothing fetched): web_charts.py composes it with dashboard.js into one anywidget.
// Every point comes from Python's chart model (lora_widgets/widget/chart_model.py), the same points bqplot
// draws in Jupyter: x int32 and y float32 arrays sent as binary buffers, drawn here as they are.
// Traits: chart_live (the current run's series), chart_evals (validation dots), chart_fixed (schedule, earlier runs), chart_axes (log
// scale, loss range), adapter_map (heatmap and one adapter's singular values), run_state (echoed back as
// run_state_seen, so marimo re-runs the cells that read the dashboard's value when a run changes state).

const NS = "http://www.w3.org/2000/svg";
const W = 440;
const H = 270;
const M = { top: 36, bottom: 40, left: 62, right: 16 };
const COLORS = { raw_loss: "#9ecae1", smooth_loss: "#1f77b4", val_loss: "#d62728", memory: "#2ca02c",
  memory_reserved: "#98df8a", gpu_util: "#bcbd22", tokens_per_s: "#9467bd", lr: "#555", lr_marker: "#1f77b4" };

function s(tag, attrs = {}, text = null) {
  const node = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== null) node.textContent = text;
  return node;
}

/** A binary trait value as a typed array (DataView, ArrayBuffer, typed array, base64 text or a list). */
function arr(v, Ctor) {
  if (v === null || v === undefined) return new Ctor(0);
  if (typeof v === "string") v = Uint8Array.from(atob(v), (c) => c.charCodeAt(0));
  if (Array.isArray(v)) return Ctor.from(v);
  if (v instanceof ArrayBuffer) return new Ctor(v.slice(0));
  if (ArrayBuffer.isView(v)) return new Ctor(v.buffer.slice(v.byteOffset, v.byteOffset + v.byteLength));
  return new Ctor(0);
}

function series(v) {
  return v ? { x: arr(v.x, Int32Array), y: arr(v.y, Float32Array) } : { x: new Int32Array(0), y: new Float32Array(0) };
}

/** About n round ticks over [lo, hi] (steps of 1, 2 or 5 times a power of ten). */
function ticks(lo, hi, n = 5) {
  const raw = (hi - lo) / n;
  if (!(raw > 0) || !isFinite(raw)) return [lo];
  const p = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((k) => k * p).find((k) => k >= raw);
  const out = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(Number(t.toPrecision(12)));
  return out;
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-2) return v.toExponential(1).replace("e+", "e");
  return String(Number(v.toPrecision(3)));
}

/** A chart's title; a long one (an adapter's detail) goes on two lines, split at its first " · ". */
function title(svg, text) {
  const cut = text.length > 56 ? text.indexOf(" · ") : -1;
  const lines = cut > 0 ? [text.slice(0, cut), text.slice(cut + 3)] : [text];
  const node = s("text", { x: W / 2, y: lines.length > 1 ? 12 : 20, "text-anchor": "middle", class: "lw-chart-title" });
  lines.forEach((line, i) => node.appendChild(s("tspan", { x: W / 2, dy: i ? 14 : 0, class: i ? "lw-subtitle" : "" }, line)));
  svg.appendChild(node);
}

function extent(lists, zero) {
  let lo = zero ? 0 : Infinity;
  let hi = -Infinity;
  for (const a of lists) for (const v of a) if (isFinite(v)) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  if (!isFinite(lo) || !isFinite(hi)) return null;
  if (hi === lo) { hi = lo + (Math.abs(lo) || 1) * 0.05; lo = zero ? lo : lo - (hi - lo); }
  return [lo, hi + (zero ? 0.05 * (hi - lo) : 0)];
}

/**
 * Draw one chart into `svg`. spec: {title, xLabel (default "step"), yLabel, lines: [{name, x, y, color, width, dash, label}],
 * dots: [{name, x, y, color, r, label}], domain: [lo, hi] or null, zero: y starts at 0, log: log10 y, legend}.
 */
function draw(svg, spec) {
  svg.replaceChildren();
  const pw = W - M.left - M.right;
  const ph = H - M.top - M.bottom;
  title(svg, spec.title);
  const all = [...spec.lines, ...spec.dots];
  const xs = extent(all.map((d) => d.x), false);
  const fy = spec.log ? (v) => (v > 0 ? Math.log10(v) : NaN) : (v) => v;
  let yd = spec.domain ? spec.domain.map(fy) : extent(all.map((d) => Array.from(d.y, fy)), spec.zero);
  if (!xs || !yd || !yd.every(isFinite)) {
    svg.appendChild(s("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "lw-chart-empty" }, "no data yet"));
    return;
  }
  const X = (v) => M.left + ((v - xs[0]) / (xs[1] - xs[0] || 1)) * pw;
  const Y = (v) => M.top + ph - ((fy(v) - yd[0]) / (yd[1] - yd[0] || 1)) * ph;
  const axes = s("g", { class: "lw-axes" });
  axes.appendChild(s("rect", { x: M.left, y: M.top, width: pw, height: ph, class: "lw-plot" }));
  for (const t of ticks(xs[0], xs[1])) {
    axes.appendChild(s("line", { x1: X(t), x2: X(t), y1: M.top + ph, y2: M.top + ph + 4, class: "lw-tick" }));
    axes.appendChild(s("text", { x: X(t), y: M.top + ph + 16, "text-anchor": "middle" }, fmt(t)));
  }
  const yt = spec.log ? ticks(Math.ceil(yd[0] * 4) / 4, yd[1], 4).map((t) => Math.pow(10, t)) : ticks(yd[0], yd[1]);
  for (const t of yt) {
    const y = Y(t);
    if (!(y >= M.top - 0.5 && y <= M.top + ph + 0.5)) continue;
    axes.appendChild(s("line", { x1: M.left, x2: M.left + pw, y1: y, y2: y, class: "lw-grid" }));
    axes.appendChild(s("text", { x: M.left - 6, y: y + 4, "text-anchor": "end" }, fmt(t)));
  }
  axes.appendChild(s("text", { x: M.left + pw / 2, y: H - 6, "text-anchor": "middle" }, spec.xLabel || "step"));
  const yl = s("text", { x: 14, y: M.top + ph / 2, "text-anchor": "middle", transform: `rotate(-90 14 ${M.top + ph / 2})` }, spec.yLabel || "");
  axes.appendChild(yl);
  svg.appendChild(axes);
  const plot = s("g", { class: "lw-marks" });
  for (const line of spec.lines) {
    let d = "";
    let n = 0;
    let pen = "M";
    for (let i = 0; i < line.x.length; i++) {
      const px = X(line.x[i]);
      const py = Y(line.y[i]);
      if (!isFinite(px) || !isFinite(py)) { pen = "M"; continue; }
      d += `${pen}${px.toFixed(1)},${py.toFixed(1)}`;
      pen = "L";
      n++;
    }
    plot.appendChild(s("path", { d: d || "M0,0", fill: "none", stroke: line.color, "stroke-width": line.width || 1.5,
      "stroke-dasharray": line.dash || "none", class: `lw-line lw-line-${line.name}`, "data-points": n,
      visibility: n ? "visible" : "hidden" }));
  }
  for (const dots of spec.dots) {
    const g = s("g", { class: `lw-dots lw-dots-${dots.name}`, "data-points": dots.x.length });
    for (let i = 0; i < dots.x.length; i++) {
      const px = X(dots.x[i]);
      const py = Y(dots.y[i]);
      if (isFinite(px) && isFinite(py)) g.appendChild(s("circle", { cx: px, cy: py, r: dots.r || 3.5, fill: dots.color, stroke: "white" }));
    }
    plot.appendChild(g);
  }
  svg.appendChild(plot);
  if (spec.legend) legend(svg, all.filter((d) => d.label));
}

function legend(svg, items) {
  const g = s("g", { class: "lw-legend" });
  items.forEach((it, i) => {
    const y = M.top + 10 + i * 14;
    g.appendChild(s("rect", { x: M.left + 8, y: y - 5, width: 14, height: 3, fill: it.color }));
    g.appendChild(s("text", { x: M.left + 26, y: y, "dominant-baseline": "middle" }, it.label));
  });
  svg.appendChild(g);
}

function colorAt(colors, t) {
  const rgb = colors.map((c) => [1, 3, 5].map((i) => parseInt(c.slice(i, i + 2), 16)));
  const u = Math.min(1, Math.max(0, t)) * (rgb.length - 1);
  const k = Math.min(rgb.length - 2, Math.floor(u));
  const f = u - k;
  return `rgb(${rgb[k].map((a, j) => Math.round(a + (rgb[k + 1][j] - a) * f)).join(",")})`;
}

/** The ||dW||/||W|| heatmap (click a cell: its singular values in the detail chart). */
function drawHeatmap(svg, detailSvg, map, model) {
  svg.replaceChildren();
  const rows = map.rows || [];
  const cols = map.columns || [];
  if (!rows.length) {
    title(svg, "||ΔW|| / ||W|| per adapter: appears at the first update");
    draw(detailSvg, { title: "One adapter: click a cell of the heatmap", lines: [], dots: [] });
    return;
  }
  const values = arr(map.values, Float32Array);
  const top = map.max || 0;
  title(svg, `||ΔW||/||W|| per adapter, step ${map.step} · white 0, darkest ${top ? top.toExponential(1) : "–"}`);
  const cw = (W - 56 - 16) / cols.length;
  const ch = Math.min(22, (H - 36 - 46) / rows.length);
  const sel = map.selected || [];
  rows.forEach((r, i) => {
    svg.appendChild(s("text", { x: 50, y: 36 + (i + 0.5) * ch + 4, "text-anchor": "end" }, r));
    cols.forEach((c, j) => {
      const v = values[i * cols.length + j];
      const rect = s("rect", { x: 56 + j * cw, y: 36 + i * ch, width: cw - 1, height: ch - 1,
        fill: isFinite(v) ? colorAt(map.colors, top > 0 ? v / top : 0) : map.null_color,
        stroke: sel[0] === i && sel[1] === j ? "#d62728" : "white", "stroke-width": sel[0] === i && sel[1] === j ? 3 : 1,
        class: "lw-cell" });
      rect.addEventListener("click", () => model.send({ type: "adapter_cell", row: i, column: j }));
      svg.appendChild(rect);
    });
  });
  cols.forEach((c, j) => svg.appendChild(s("text", { x: 56 + (j + 0.5) * cw, y: 36 + rows.length * ch + 14, "text-anchor": "middle" }, c)));
  const sv = arr((map.detail || {}).y, Float32Array);
  const xs = Int32Array.from(sv, (_, i) => i + 1);
  draw(detailSvg, { title: (map.detail || {}).title || "One adapter", yLabel: "σ_i", xLabel: "i: singular values of ΔW = (alpha/r) B A",
    lines: [], dots: [{ name: "singular_values", x: xs, y: sv, color: COLORS.smooth_loss, r: 4 }], zero: true });
}

function render({ model, el }) {
  const root = document.createElement("div");
  root.className = "lw-charts";
  el.appendChild(root);
  const svgs = {};
  for (const name of ["loss", "lr", "memory", "throughput", "heatmap", "detail"]) {
    svgs[name] = s("svg", { viewBox: `0 0 ${W} ${H}`, class: `lw-chart lw-chart-${name}`, role: "img" });
    root.appendChild(svgs[name]);
  }
  const redraw = () => {
    const live = model.get("chart_live") || {};
    const ser = live.series || {};
    const evals = model.get("chart_evals") || {};
    const get = (k) => {
      const v = k === "val_loss" ? evals.val_loss : ser[k];
      return series(v && v.x_ref ? { x: (ser[v.x_ref] || {}).x, y: v.y } : v);  // steps shared with another line
    };
    const fixed = model.get("chart_fixed") || {};
    const axes = model.get("chart_axes") || {};
    const overlays = (fixed.overlays || []).map((o, i) => ({ name: `overlay-${i}`, ...series(o), color: o.color, width: 1.5, label: o.label }));
    draw(svgs.loss, { title: "Loss", yLabel: "loss (nats)", legend: true, log: !!axes.log, domain: axes.loss_domain || null,
      lines: [...overlays, { name: "raw_loss", ...get("raw_loss"), color: COLORS.raw_loss, width: 1, label: "train loss" },
        { name: "smooth_loss", ...get("smooth_loss"), color: COLORS.smooth_loss, width: 2.5, label: live.label || "smoothed" }],
      dots: [{ name: "val_loss", ...get("val_loss"), color: COLORS.val_loss, label: "validation" }] });
    draw(svgs.lr, { title: "Learning rate", zero: true, lines: [{ name: "lr", ...series(fixed.lr), color: COLORS.lr }],
      dots: [{ name: "lr_marker", ...get("lr_marker"), color: COLORS.lr_marker, r: 5 }] });
    const gpu = !!live.gpu;
    draw(svgs.memory, { title: gpu ? "GPU memory" : "Memory (CPU)", yLabel: gpu ? "MiB" : "process RSS (MiB)", zero: true, legend: gpu, dots: [],
      lines: [{ name: "memory", ...get("memory"), color: COLORS.memory, label: gpu ? "GPU allocated" : "process RSS" },
        { name: "memory_reserved", ...get("memory_reserved"), color: COLORS.memory_reserved, dash: "4 3", label: gpu ? "GPU reserved" : "" }] });
    draw(svgs.throughput, { title: "Throughput", yLabel: "tokens/s (smoothed)", zero: true, dots: [],
      lines: [{ name: "tokens_per_s", ...get("tokens_per_s"), color: COLORS.tokens_per_s }] });
  };
  const redrawMap = () => drawHeatmap(svgs.heatmap, svgs.detail, model.get("adapter_map") || {}, model);
  const echo = () => {
    const st = model.get("run_state") || {};
    if (st.serial && st.serial !== model.get("run_state_seen")) {
      model.set("run_state_seen", st.serial);
      model.save_changes();
    }
  };
  const listeners = [["change:chart_live", redraw], ["change:chart_fixed", redraw], ["change:chart_evals", redraw], ["change:chart_axes", redraw],
    ["change:adapter_map", redrawMap], ["change:run_state", echo]];
  for (const [name, fn] of listeners) model.on(name, fn);
  redraw();
  redrawMap();
  return () => {
    for (const [name, fn] of listeners) model.off(name, fn);
  };
}

export default { render };
