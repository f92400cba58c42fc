// LoRADashboard panel: controls, Train/Pause/Stop, status, progress, callouts, summary, sample answers.
// A plain ES module for anywidget (no build step, no dependencies). All state lives in the Python
// model's traits (see panel.py and dashboard.d.ts); buttons send {type: "train" | "pause" |
// "resume" | "stop"} messages that Python handles. Text is always set with textContent (never
// innerHTML), so messages from the trainer cannot inject markup.
// The controls are not listed here: they are rendered from the `control_specs` trait, which Python
// builds from the table in lora_widgets/widget/controls.py (names, labels, kinds, hints and choices).
// Values are only parsed as numbers here; whether they are valid is for the configs to say (`errors`).
// Attached to a trainer that owns its settings (LoRADashboard(trainer=...)), `control_specs` is empty and
// `attached_settings` is shown instead, read-only, as a table.

/** @typedef {import("./dashboard").DashboardModel} Model */
/** @typedef {import("./dashboard").ControlSpec} ControlSpec */
/** @typedef {import("./dashboard").DataFacts} DataFacts */
/** @typedef {import("./dashboard").DataViewPayload} DataViewPayload */
/** @typedef {import("./dashboard").SamplePair} SamplePair */

const IDLE_STATES = ["idle", "stopped", "finished", "failed"];

function h(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "class") node.className = v;
    else node.setAttribute(k, v);
  }
  for (const c of children) node.appendChild(c);
  return node;
}

function clock(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  const s = Math.max(0, Math.round(seconds));
  const hh = Math.floor(s / 3600);
  const mm = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return hh > 0 ? `${hh}:${String(mm).padStart(2, "0")}:${ss}` : `${mm}:${ss}`;
}

function num(x, digits = 4) {
  if (x === null || x === undefined || !isFinite(x)) return "–";
  return Number(x).toPrecision(digits).replace(/\.?0+$/, "").replace(/\.?0+e/, "e");
}

function count(x) {
  if (x === null || x === undefined) return "–";
  return Number(x).toLocaleString("en-US");
}

/**
 * The input for one control: a <select> of its choices, or an <input> (number or text; a text with
 * choices offers them as suggestions through a <datalist>). `name` and `data-control` are the trait's name.
 * @param {ControlSpec} spec
 * @param {HTMLElement} container where a datalist goes
 * @returns {HTMLInputElement | HTMLSelectElement}
 */
function controlInput(spec, container) {
  let input;
  if (spec.kind === "select") {
    input = h("select", { name: spec.name });
    for (const opt of spec.choices || []) input.appendChild(h("option", { value: opt, text: opt }));
  } else {
    const attrs = { name: spec.name, type: spec.kind === "text" ? "text" : "number" };
    for (const k of ["min", "max", "step", "placeholder"]) if (spec[k] !== undefined) attrs[k] = String(spec[k]);
    if (spec.choices && spec.choices.length) {
      const id = `lw-${spec.name}-${Math.random().toString(36).slice(2)}`;
      container.appendChild(h("datalist", { id }, spec.choices.map((c) => h("option", { value: c }))));
      attrs.list = id;
    }
    input = h("input", attrs);
  }
  input.classList.add("lw-input");
  input.dataset.control = spec.name;
  return input;
}

/**
 * The value to send for what the user typed: a number for int/float controls (undefined when it is not
 * one), the text otherwise.
 * @param {ControlSpec} spec
 * @param {string} text
 * @returns {number | string | undefined}
 */
function parseInput(spec, text) {
  if (spec.kind === "int") {
    const value = Number(text);
    return text.trim() !== "" && Number.isInteger(value) ? value : undefined;
  }
  if (spec.kind === "float") {
    const value = Number(text);
    return text.trim() !== "" && isFinite(value) ? value : undefined;
  }
  return text;
}

/**
 * The data facts as (label, value) lines: the same lines as lora_widgets/widget/data_view.py's facts_rows.
 * @param {DataFacts} f
 * @returns {string[][]}
 */
function factRows(f) {
  if (!f || !f.kind) return [];
  const split = f.split ? [["validation split", String(f.split)]] : [];
  const held = f.val ? ` (validation ${((100 * f.val) / (f.train + f.val)).toFixed(1)}%)` : ""; // data_view._val_share
  if (f.kind === "packed") {
    return [
      ["data", "text packed into blocks (every token trained)"],
      ["blocks (train / validation)", `${count(f.train)} / ${count(f.val)} of ${f.seq_len} tokens${held}`],
      ["tokens", count(f.tokens)],
      ...split,
    ];
  }
  const formats = Object.keys(f.formats || {})
    .sort()
    .map((k) => `${k} ${count(f.formats[k])}`)
    .join(", ");
  return [
    ["data", `instruction/chat rows (${formats}); loss on ${f.train_on}`],
    ["examples (train / validation)", `${count(f.train)} / ${count(f.val)}${held}`],
    ["rows truncated / dropped", `${count(f.truncated)} / ${count(f.dropped)} (max_length ${f.max_length})`],
    ["tokens trained", `${Number(f.trained_pct).toFixed(1)}% of ${count(f.tokens)}`],
    f.packed
      ? ["padding", "none: packed, examples side by side, positions restart per example"]
      : ["padding", `${Number(f.padding_pct).toFixed(1)}% (longest padded length ${f.seq_len})`],
    ...split,
  ];
}

/**
 * One example's tokens: trained ones highlighted, the rest (prompt, template markup) dimmed.
 * @param {Array<[string, boolean]>} tokens
 * @returns {HTMLElement[]}
 */
function tokenSpans(tokens) {
  return tokens.map(([text, trained]) =>
    h("span", { class: trained ? "lw-tok lw-tok-trained" : "lw-tok", text, title: trained ? "trained" : "not trained" }),
  );
}

/**
 * One answer's cell: the text, then ✓ or ✗ when it is known whether the answer ended with the end-of-turn
 * token (chat data); nothing when it is not known (plain text).
 * @param {string} text
 * @param {boolean | null | undefined} ended
 * @param {string} cls
 * @returns {HTMLTableCellElement}
 */
/** What the samples table's marks mean (readouts.py's ENDED_LEGEND, word for word). */
const ENDED_LEGEND = "✓ the reply ended its turn (it produced the end-of-turn token within the token limit); ✗ it was cut at the limit. Neither mark says whether the answer is right.";

function answerCell(text, ended, cls) {
  const cell = h("td", { class: `lw-sample-text ${cls}` }, [h("span", { text: text || "" })]);
  if (ended === true || ended === false) {
    cell.appendChild(
      h("span", {
        class: ended ? "lw-ended lw-ended-yes" : "lw-ended lw-ended-no",
        text: ended ? " ✓" : " ✗",
        title: ended ? "ended with the end-of-turn token" : "did not end with the end-of-turn token (cut at the token limit)",
      }),
    );
  }
  return /** @type {HTMLTableCellElement} */ (cell);
}

/** @type {import("@anywidget/types").Render<Model>} */
function render({ model, el }) {
  let pending = false; // a Train click was sent and Python has not answered yet
  const root = h("div", { class: "lw-dash" });
  el.appendChild(root);

  // --- header: buttons, status, run label, log toggle ----------------------------------------
  const trainBtn = h("button", { class: "lw-btn lw-train", type: "button", text: "Train" });
  const pauseBtn = h("button", { class: "lw-btn lw-pause", type: "button", text: "Pause" });
  const stopBtn = h("button", { class: "lw-btn lw-stop", type: "button", text: "Stop" });
  const status = h("span", { class: "lw-status", "data-state": "idle", title: "run state" });
  const label = h("span", { class: "lw-run-label" });
  const logBox = h("input", { type: "checkbox", class: "lw-log-input" });
  const logLabel = h("label", { class: "lw-log" }, [logBox, h("span", { text: " log-scale loss" })]);
  root.appendChild(
    h("div", { class: "lw-head" }, [
      h("div", { class: "lw-buttons" }, [trainBtn, pauseBtn, stopBtn]),
      h("span", { class: "lw-status-wrap" }, [h("span", { text: "status: " }), status]),
      label,
      logLabel,
    ]),
  );

  // --- body: controls on the left, progress/callouts/summary on the right ----------------------
  const controls = h("div", { class: "lw-controls" });
  const side = h("div", { class: "lw-side" });
  root.appendChild(h("div", { class: "lw-body" }, [controls, side]));

  /** @type {ControlSpec[]} */
  const specs = model.get("control_specs") || [];
  const inputs = {};
  const errorNodes = {};
  const groups = {};
  for (const spec of specs) {
    if (!(spec.group in groups)) {
      groups[spec.group] = h("fieldset", { class: "lw-group" }, [h("legend", { text: spec.group })]);
      controls.appendChild(groups[spec.group]);
    }
    const input = controlInput(spec, controls);
    const err = h("div", { class: "lw-error" });
    groups[spec.group].appendChild(
      h("label", { class: "lw-field", title: spec.help || "" }, [
        h("span", { class: "lw-label", text: spec.label }),
        input,
        err,
      ]),
    );
    inputs[spec.name] = input;
    errorNodes[spec.name] = err;
    input.addEventListener("change", () => {
      const value = parseInput(spec, input.value);
      if (value === undefined) {
        err.textContent = `${spec.label} must be ${spec.kind === "int" ? "a whole number" : "a number"}`;
        input.classList.add("lw-invalid");
        return;
      }
      model.set(spec.name, value);
      model.save_changes();
    });
  }

  // --- an attached trainer's own settings, read-only ----------------------------------------------
  const settingsLegend = h("legend");
  const settingsTable = h("table", { class: "lw-settings-table" });
  const settingsBox = h("fieldset", { class: "lw-settings" }, [settingsLegend, settingsTable]);
  controls.appendChild(settingsBox);

  const bar = h("div", { class: "lw-bar" }, [h("div", { class: "lw-fill" })]);
  const progressText = h("div", { class: "lw-progress-text" });
  side.appendChild(h("div", { class: "lw-progress" }, [bar, progressText]));
  const generalErrors = h("div", { class: "lw-error lw-error-general" });
  side.appendChild(generalErrors);
  const callouts = h("div", { class: "lw-callouts" });
  side.appendChild(callouts);
  const summary = h("table", { class: "lw-summary" });
  side.appendChild(summary);
  // sample answers, full width under the body: prompt | base model | current adapter @ step
  const samplesBox = h("div", { class: "lw-samples" });
  root.appendChild(samplesBox);

  // --- data view: facts, and one example with its trained tokens (data_view / data_index traits) ----
  const dataFacts = h("table", { class: "lw-data-facts" });
  const prevBtn = h("button", { class: "lw-btn lw-data-prev", type: "button", text: "◀" });
  const nextBtn = h("button", { class: "lw-btn lw-data-next", type: "button", text: "▶" });
  const indexBox = h("input", { class: "lw-input lw-data-index", type: "number", min: "1", step: "1" });
  const dataCaption = h("span", { class: "lw-data-caption" });
  const dataTokens = h("div", { class: "lw-data-tokens" });
  const dataNav = h("div", { class: "lw-data-nav" }, [prevBtn, h("span", { text: "example " }), indexBox, nextBtn, dataCaption]);
  const dataBox = h("details", { class: "lw-data", open: "" }, [
    h("summary", { text: "Data: what is trained" }),
    dataFacts,
    dataNav,
    dataTokens,
  ]);
  side.appendChild(dataBox);

  // --- renderers ----------------------------------------------------------------------------
  function renderControls() {
    const running = !IDLE_STATES.includes(model.get("state"));
    const errors = model.get("errors") || {};
    for (const spec of specs) {
      const input = inputs[spec.name];
      const value = model.get(spec.name);
      if (document.activeElement !== input || running) input.value = value === null || value === undefined ? "" : String(value);
      input.disabled = running;
      const msg = errors[spec.name] || "";
      errorNodes[spec.name].textContent = msg;
      input.classList.toggle("lw-invalid", msg !== "");
      input.title = msg;
    }
    generalErrors.textContent = Object.entries(errors)
      .filter(([k]) => !(k in inputs))
      .map(([, v]) => v)
      .join("; ");
  }

  function renderButtons() {
    const state = model.get("state");
    const errors = model.get("errors") || {};
    const hasErrors = Object.keys(errors).length > 0;
    status.textContent = state;
    status.dataset.state = state;
    trainBtn.disabled = pending || hasErrors || !IDLE_STATES.includes(state);
    trainBtn.title = hasErrors ? "Fix the flagged settings first" : "Start a run with these settings";
    pauseBtn.textContent = state === "paused" ? "Resume" : "Pause";
    pauseBtn.disabled = !(state === "running" || state === "paused");
    stopBtn.disabled = !(state === "running" || state === "paused");
    label.textContent = model.get("run_label") || "";
    logBox.checked = !!model.get("log_scale");
  }

  function renderProgress() {
    const p = model.get("progress") || {};
    const step = p.step || 0;
    const total = p.total || 0;
    const frac = total > 0 ? Math.min(1, step / total) : 0;
    bar.firstChild.style.width = `${(100 * frac).toFixed(1)}%`;
    bar.dataset.step = String(step);
    const parts = [`step ${count(step)} / ${total ? count(total) : "–"}`];
    parts.push(`elapsed ${clock(p.elapsed)}`);
    parts.push(`ETA ${clock(p.eta)}`);
    parts.push(`${p.tokens_per_s ? count(Math.round(p.tokens_per_s)) : "–"} tokens/s`);
    parts.push(`epoch ${p.epoch !== undefined ? Number(p.epoch).toFixed(2) : "–"}`);
    if (p.loss !== undefined && p.loss !== null) parts.push(`loss ${num(p.loss)}`);
    const x = p.extra || {}; // TRL's metrics, when the run logs them
    if (isFinite(x.mean_token_accuracy) && x.mean_token_accuracy !== null) {
      parts.push(`token accuracy ${(100 * x.mean_token_accuracy).toFixed(1)}%`);
    }
    if (isFinite(x.entropy) && x.entropy !== null) parts.push(`entropy ${num(x.entropy, 3)}`);
    if (isFinite(x.num_tokens) && x.num_tokens !== null) parts.push(`${count(Math.round(x.num_tokens))} tokens trained`);
    progressText.textContent = parts.join(" · ");
  }

  function settingValue(v) {
    if (v === null || v === undefined) return "None";
    if (Array.isArray(v)) return v.join(", ");
    if (typeof v === "object") return JSON.stringify(v);
    return String(v);
  }

  function renderSettings() {
    const settings = model.get("attached_settings") || {};
    const names = Object.keys(settings).filter((k) => k !== "trainer");
    settingsBox.hidden = names.length === 0;
    settingsLegend.textContent = `${settings.trainer || "Trainer"} settings (read-only: its TrainingArguments own them)`;
    settingsTable.replaceChildren(
      ...names.map((k) => h("tr", {}, [h("th", { text: k }), h("td", { text: settingValue(settings[k]) })])),
    );
  }

  function renderCallouts() {
    const list = model.get("callouts") || [];
    callouts.replaceChildren(
      ...list.map((c) => {
        const box = h("div", { class: `lw-callout lw-${c.kind}`, role: c.kind === "danger" ? "alert" : "status" }, [
          h("div", { class: "lw-callout-title", text: c.title || "" }),
          h("div", { class: "lw-callout-message", text: c.message || "" }),
        ]);
        if (c.suggestions && c.suggestions.length) {
          box.appendChild(h("ul", {}, c.suggestions.map((s) => h("li", { text: s }))));
        }
        return box;
      }),
    );
  }

  function renderSummary() {
    const s = model.get("summary") || {};
    const rows = [];
    rows.push(["Device", s.device_name || s.device || "–"]);
    if (s.total) {
      rows.push([
        "Trainable / total params",
        `${count(s.trainable)} / ${count(s.total)} (${Number(s.trainable_pct || 0).toFixed(2)}%)`,
      ]);
    }
    rows.push(["Adapter size on disk", s.adapter_size || "–"]);
    rows.push(["Validation loss (current / best)", `${num(s.val_loss)} / ${num(s.best_val_loss)}`]);
    rows.push(["Perplexity", num(s.perplexity)]);
    if (s.val_token_accuracy !== undefined && s.val_token_accuracy !== null) {
      rows.push(["Validation token accuracy", `${(100 * s.val_token_accuracy).toFixed(1)}%`]);
    }
    const kind = ((model.get("data_view") || {}).facts || {}).kind;
    if (s.train_blocks) rows.push([kind === "sft" ? "Training examples" : "Training blocks", count(s.train_blocks)]);
    if (s.train_rows) rows.push(["Training rows", count(s.train_rows)]);
    summary.replaceChildren(
      ...rows.map(([k, v]) => h("tr", {}, [h("th", { text: k }), h("td", { text: String(v) })])),
    );
  }

  function renderData() {
    /** @type {DataViewPayload} */
    const d = model.get("data_view") || {};
    dataFacts.replaceChildren(
      ...factRows(d.facts).map(([k, v]) => h("tr", {}, [h("th", { text: k }), h("td", { text: String(v) })])),
    );
    dataBox.style.display = d.facts && d.facts.kind ? "" : "none";
    const has = Array.isArray(d.tokens);
    dataNav.style.display = has ? "" : "none";
    dataTokens.style.display = has ? "" : "none";
    if (!has) return;
    indexBox.max = String(d.count);
    if (document.activeElement !== indexBox) indexBox.value = String(d.index + 1);
    prevBtn.disabled = d.index <= 0;
    nextBtn.disabled = d.index >= d.count - 1;
    // one numbering, 1-based as the example box: the example's row in the data given (dropped rows counted)
    const row = d.row === null || d.row === undefined ? "" : ` (row ${count(d.row + 1)} of the data)`;
    const cut = d.tokens.length < d.length ? `; first ${d.tokens.length} shown` : "";
    dataCaption.textContent = ` of ${count(d.count)}${row}: ${count(d.trained)} of ${count(d.length)} tokens trained${cut}`;
    dataTokens.replaceChildren(...tokenSpans(d.tokens));
  }

  /** @param {number} index 0-based */
  function selectExample(index) {
    model.set("data_index", Math.max(0, index));
    model.save_changes();
  }

  function renderSamples() {
    /** @type {SamplePair[]} */
    const list = model.get("samples") || [];
    samplesBox.hidden = list.length === 0;
    if (list.length === 0) {
      samplesBox.replaceChildren();
      return;
    }
    const head = h("tr", {}, [
      h("th", { text: "prompt" }),
      h("th", { text: "base model" }),
      h("th", { text: `current adapter @ step ${count(list[0].step)}` }),
    ]);
    const rows = list.map((s) =>
      h("tr", { class: "lw-sample" }, [
        h("td", { class: "lw-sample-text lw-sample-prompt", text: s.prompt || "" }),
        answerCell(s.base, s.base_ended, "lw-sample-base"),
        answerCell(s.current, s.current_ended, "lw-sample-current"),
      ]),
    );
    samplesBox.replaceChildren(
      h("div", { class: "lw-samples-title", text: "What the model says now (greedy)" }),
      h("table", { class: "lw-samples-table" }, [h("caption", { class: "lw-samples-legend", text: ENDED_LEGEND }),
        h("thead", {}, [head]), h("tbody", {}, rows)]),
      h("div", { class: "lw-samples-note", text: model.get("samples_note") || "" }),
    );
  }

  // --- events ----------------------------------------------------------------------------------
  trainBtn.addEventListener("click", () => {
    if (trainBtn.disabled || pending) return; // a double click sends one message
    pending = true;
    trainBtn.disabled = true;
    model.send({ type: "train" });
  });
  pauseBtn.addEventListener("click", () => {
    model.send({ type: model.get("state") === "paused" ? "resume" : "pause" });
  });
  stopBtn.addEventListener("click", () => {
    stopBtn.disabled = true;
    model.send({ type: "stop" });
  });
  prevBtn.addEventListener("click", () => selectExample((model.get("data_view").index || 0) - 1));
  nextBtn.addEventListener("click", () => selectExample((model.get("data_view").index || 0) + 1));
  indexBox.addEventListener("change", () => {
    const value = Number(indexBox.value);
    if (Number.isInteger(value)) selectExample(value - 1);
  });
  logBox.addEventListener("change", () => {
    model.set("log_scale", logBox.checked);
    model.save_changes();
  });

  const onState = () => {
    pending = false;
    renderButtons();
    renderControls();
  };
  const onCallouts = () => {
    pending = false;
    renderCallouts();
    renderButtons();
  };
  const onErrors = () => {
    renderControls();
    renderButtons();
  };
  const listeners = [
    ["change:state", onState],
    ["change:callouts", onCallouts],
    ["change:errors", onErrors],
    ["change:progress", renderProgress],
    ["change:summary", renderSummary],
    ["change:run_label", renderButtons],
    ["change:log_scale", renderButtons],
    ["change:data_view", () => (renderData(), renderSummary())], // the summary names blocks or examples
    ["change:attached_settings", renderSettings],
    ["change:samples", renderSamples],
    ["change:samples_note", renderSamples],
  ];
  for (const spec of specs) listeners.push([`change:${spec.name}`, renderControls]);
  for (const [name, fn] of listeners) model.on(name, fn);

  renderControls();
  renderButtons();
  renderProgress();
  renderCallouts();
  renderSummary();
  renderData();
  renderSettings();
  renderSamples();

  return () => {
    for (const [name, fn] of listeners) model.off(name, fn);
  };
}

export default { render };
