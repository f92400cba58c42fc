// SweepView front end (anywidget ESM): the runs' table (sortable, best highlighted), their loss curves
// overlaid (best emphasised, a clicked run emphasised), a scatter of one setting against best validation
// loss (log axis for a learning rate), Stop sweep and Skip this run. Python owns every number: it sends
// `rows`, `live` and each finished run's curve once (a "curves" message); the page keeps the curves.

const NS = "http://www.w3.org/2000/svg";
const W = 420, H = 240, PAD = 40;

function el(tag, attrs = {}, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function svgEl(tag, attrs = {}) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function fmt(v) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return Number.isInteger(v) ? String(v) : v.toPrecision(3);
  if (Array.isArray(v)) return v.join(",");
  return String(v);
}

function settingsText(s) {
  return Object.entries(s).map(([k, v]) => `${k}=${fmt(v)}`).join(", ");
}

const COLUMNS = [
  ["index", "#", (r) => r.index],
  ["settings", "settings", (r) => settingsText(r.settings)],
  ["seed", "seed", (r) => r.seed],
  ["best_val", "best val", (r) => r.best_val],
  ["mean_val", "mean ± sd (seeds)", (r) => r.mean_val],
  ["step", "steps", (r) => r.step],
  ["elapsed_s", "time s", (r) => r.elapsed_s],
  ["adapter_bytes", "adapter KB", (r) => r.adapter_bytes],
  ["outcome", "outcome", (r) => r.outcome],
];

function cell(key, r) {
  if (key === "settings") return settingsText(r.settings);
  if (key === "best_val") return r.best_val === null ? "" : r.best_val.toFixed(4);
  if (key === "mean_val")
    return r.mean_val === null ? "" : r.mean_val.toFixed(4) + (r.std_val === null ? "" : ` ± ${r.std_val.toFixed(4)}`);
  if (key === "elapsed_s") return r.elapsed_s === null ? "" : r.elapsed_s.toFixed(1);
  if (key === "adapter_bytes") return r.adapter_bytes === null ? "" : (r.adapter_bytes / 1024).toFixed(0);
  if (key === "outcome") return r.outcome + (r.reason ? ` (${r.reason})` : "");
  return fmt(r[key]);
}

function scale(lo, hi, a, b) {
  if (hi === lo) { lo -= 0.5; hi += 0.5; }
  return (v) => a + ((v - lo) / (hi - lo)) * (b - a);
}

function render({ model, el: root }) {
  const curves = new Map(); // run index -> [[step, loss], ...] (finished runs)
  const view = { sortKey: "index", sortUp: true, selected: -1 };
  root.classList.add("lw-sweep");
  const bar = el("div", { class: "lw-sweep-bar" });
  const status = el("span", { class: "lw-sweep-status" });
  const stop = el("button", { class: "lw-sweep-stop" }, "Stop sweep");
  const skip = el("button", { class: "lw-sweep-skip" }, "Skip this run");
  stop.onclick = () => model.send({ type: "stop" });
  skip.onclick = () => model.send({ type: "skip" });
  bar.append(stop, skip, status);
  const charts = el("div", { class: "lw-sweep-charts" });
  const curveSvg = svgEl("svg", { width: W, height: H, class: "lw-sweep-curves" });
  const scatterBox = el("div", { class: "lw-sweep-scatter" });
  const pick = el("select", { class: "lw-sweep-setting" });
  pick.onchange = () => { model.set("scatter_setting", pick.value); model.save_changes(); };
  const scatterSvg = svgEl("svg", { width: W, height: H });
  scatterBox.append(pick, scatterSvg);
  charts.append(curveSvg, scatterBox);
  const table = el("table", { class: "lw-sweep-table" });
  root.append(bar, charts, table);

  function drawTable() {
    const rows = [...model.get("rows")];
    const col = COLUMNS.find((c) => c[0] === view.sortKey);
    rows.sort((a, b) => {
      const x = col[2](a), y = col[2](b);
      if (x === y) return 0;
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * (view.sortUp ? 1 : -1);
    });
    table.replaceChildren();
    const head = el("tr");
    for (const [key, label] of COLUMNS) {
      const th = el("th", { "data-key": key }, label + (key === view.sortKey ? (view.sortUp ? " ▲" : " ▼") : ""));
      th.onclick = () => { view.sortUp = view.sortKey === key ? !view.sortUp : true; view.sortKey = key; drawTable(); };
      head.append(th);
    }
    table.append(head);
    const best = model.get("best_index");
    for (const r of rows) {
      const tr = el("tr", { "data-index": r.index, title: r.message || "" });
      if (r.index === best) tr.classList.add("lw-sweep-best");
      if (r.index === view.selected) tr.classList.add("lw-sweep-selected");
      if (r.outcome === "failed") tr.classList.add("lw-sweep-failed");
      tr.onclick = () => {
        view.selected = view.selected === r.index ? -1 : r.index;
        if (view.selected >= 0) model.send({ type: "select", index: r.index }); // Python may show its charts
        drawTable(); drawCurves();
      };
      for (const [key] of COLUMNS) tr.append(el("td", {}, cell(key, r)));
      table.append(tr);
    }
  }

  function drawCurves() {
    const live = model.get("live");
    const all = [...curves.entries()];
    if (live && live.curve && !curves.has(live.index)) all.push([live.index, live.curve]);
    const pts = all.flatMap(([, c]) => c);
    curveSvg.replaceChildren();
    if (!pts.length) return;
    const sx = scale(0, Math.max(...pts.map((p) => p[0])), PAD, W - 10);
    const sy = scale(Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1])), H - PAD, 10);
    const best = model.get("best_index");
    const order = all.sort((a, b) => (a[0] === best || a[0] === view.selected) - (b[0] === best || b[0] === view.selected));
    for (const [index, c] of order) {
      const d = c.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      const cls = index === best ? "best" : index === view.selected ? "selected" : live && index === live.index ? "live" : "other";
      curveSvg.append(svgEl("path", { d, class: `lw-sweep-line ${cls}`, "data-index": index }));
    }
    const label = svgEl("text", { x: W / 2, y: H - 8, "text-anchor": "middle", class: "lw-sweep-axis" });
    label.textContent = "step (training loss, every run)";
    curveSvg.append(label);
  }

  function drawScatter() {
    const setting = model.get("scatter_setting");
    pick.replaceChildren(...model.get("settings").map((s) => { const o = el("option", { value: s }, s); o.selected = s === setting; return o; }));
    const rows = model.get("rows").filter((r) => typeof r.settings[setting] === "number" && r.best_val !== null);
    scatterSvg.replaceChildren();
    if (!rows.length) return;
    const xs = rows.map((r) => r.settings[setting]);
    const log = Math.min(...xs) > 0 && (setting.endsWith("learning_rate") || Math.max(...xs) / Math.min(...xs) >= 20);
    const tx = (v) => (log ? Math.log10(v) : v);
    const sx = scale(Math.min(...xs.map(tx)), Math.max(...xs.map(tx)), PAD, W - 10);
    const ys = rows.map((r) => r.best_val);
    const sy = scale(Math.min(...ys), Math.max(...ys), H - PAD, 10);
    const best = model.get("best_index");
    for (const r of rows) {
      const dot = svgEl("circle", { cx: sx(tx(r.settings[setting])), cy: sy(r.best_val), r: r.index === best ? 7 : 4, class: r.index === best ? "lw-sweep-dot best" : "lw-sweep-dot" });
      scatterSvg.append(dot);
    }
    const label = svgEl("text", { x: W / 2, y: H - 8, "text-anchor": "middle", class: "lw-sweep-axis" });
    label.textContent = `${setting}${log ? " (log scale)" : ""} vs best validation loss`;
    scatterSvg.append(label);
  }

  function drawStatus() {
    const state = model.get("state");
    status.textContent = `${state}${model.get("message") ? " — " + model.get("message") : ""}`;
    stop.disabled = skip.disabled = state !== "running";
  }

  model.on("msg:custom", (msg) => {
    if (msg.type === "curves") for (const [k, c] of Object.entries(msg.curves)) curves.set(Number(k), c);
    drawCurves();
  });
  model.on("change:rows", () => { drawTable(); drawScatter(); });
  model.on("change:best_index", () => { drawTable(); drawCurves(); drawScatter(); });
  model.on("change:live", drawCurves);
  model.on("change:scatter_setting", drawScatter);
  model.on("change:state", drawStatus);
  model.on("change:message", drawStatus);
  drawTable(); drawScatter(); drawCurves(); drawStatus();
  model.send({ type: "curves" });
}

export default { render };
