// MemoryPlanner front end (anywidget ESM): the controls and the GPU fit table.
// Python owns the estimate: every control writes its trait and Python recomputes
// `estimate`, `gpus` and `error`, which this view renders. The bar chart is a bqplot
// Figure shown next to this view (planner.widget).

const GiB = 1024 ** 3;
const RANKS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
const SEQ_LENS = [64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768];
const METHODS = [
  ["full", "Full fine-tuning"],
  ["lora", "LoRA"],
  ["qlora", "QLoRA (4-bit base)"],
];
const PRECISIONS = [
  ["float32", "fp32"],
  ["bfloat16", "bf16"],
  ["float16", "fp16"],
  ["mixed-bf16", "mixed bf16 (fp32 weights)"],
  ["mixed-fp16", "mixed fp16 (fp32 weights)"],
];
const TARGETS = [
  ["default", "q, v (default)"],
  ["all-linear", "all linear layers"],
];

function gib(bytes) {
  return `${(bytes / GiB).toFixed(2)} GiB`;
}

function make(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "className") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.appendChild(child);
  return node;
}

function field(label, control) {
  return make("label", { className: "lw-planner-field" }, [
    make("span", { className: "lw-planner-label", text: label }),
    control,
  ]);
}

function fillSelect(select, options, value) {
  select.replaceChildren(
    ...options.map(([v, text]) => make("option", { value: String(v), text: String(text) })),
  );
  select.value = String(value);
}

function withValue(list, value) {
  // keep a value that is not in the preset list selectable
  return list.includes(value) ? list : [...list, value].sort((a, b) => a - b);
}

function render({ model, el }) {
  el.classList.add("lw-planner");
  const modelSelect = make("select", { "aria-label": "model", className: "lw-planner-model" });
  const methodSelect = make("select", { "aria-label": "method", className: "lw-planner-method" });
  const rankSelect = make("select", { "aria-label": "rank", className: "lw-planner-rank" });
  const targetSelect = make("select", { "aria-label": "targets", className: "lw-planner-targets" });
  const batchInput = make("input", {
    type: "number",
    min: "1",
    max: "4096",
    step: "1",
    "aria-label": "batch size",
    className: "lw-planner-batch",
  });
  const seqSelect = make("select", { "aria-label": "sequence length", className: "lw-planner-seq" });
  const precisionSelect = make("select", { "aria-label": "precision", className: "lw-planner-precision" });
  const gcInput = make("input", { type: "checkbox", "aria-label": "gradient checkpointing", className: "lw-planner-gc" });

  const controls = make("div", { className: "lw-planner-controls" }, [
    field("Model", modelSelect),
    field("Method", methodSelect),
    field("LoRA rank", rankSelect),
    field("Targets", targetSelect),
    field("Batch size", batchInput),
    field("Sequence length", seqSelect),
    field("Precision", precisionSelect),
    field("Gradient checkpointing", gcInput),
  ]);
  const summary = make("div", { className: "lw-planner-summary", role: "status" });
  const errorBox = make("div", { className: "lw-planner-error", role: "alert" });
  const table = make("table", { className: "lw-planner-fit" });
  el.replaceChildren(controls, summary, errorBox, table);

  function syncControls() {
    fillSelect(
      modelSelect,
      model.get("models").map((m) => [m, m]),
      model.get("model_name"),
    );
    fillSelect(methodSelect, METHODS, model.get("method"));
    fillSelect(
      rankSelect,
      withValue(RANKS, model.get("rank")).map((r) => [r, r]),
      model.get("rank"),
    );
    fillSelect(targetSelect, TARGETS, model.get("targets"));
    batchInput.value = String(model.get("batch_size"));
    fillSelect(
      seqSelect,
      withValue(SEQ_LENS, model.get("seq_len")).map((s) => [s, s]),
      model.get("seq_len"),
    );
    fillSelect(precisionSelect, PRECISIONS, model.get("precision"));
    gcInput.checked = Boolean(model.get("gradient_checkpointing"));
    const full = model.get("method") === "full";
    rankSelect.disabled = full;
    targetSelect.disabled = full;
  }

  function renderEstimate() {
    const est = model.get("estimate") || {};
    if (typeof est.total !== "number") {
      summary.textContent = "";
      return;
    }
    const share = est.total_params ? (100 * est.trainable_params) / est.total_params : 0;
    summary.replaceChildren(
      make("strong", { text: `Peak ${gib(est.total)}` }),
      make("span", {
        text:
          ` in the ${est.peak_phase} phase · textbook sum ${gib(est.naive_total)} · ` +
          `trainable ${Number(est.trainable_params).toLocaleString()} of ` +
          `${Number(est.total_params).toLocaleString()} parameters (${share.toFixed(share < 1 ? 3 : 1)}%)`,
      }),
    );
  }

  function renderFit() {
    const rows = model.get("gpus") || [];
    const head = make("tr", {}, [
      make("th", { text: "GPU" }),
      make("th", { text: "memory" }),
      make("th", { text: "needed" }),
      make("th", { text: "fits?" }),
    ]);
    const body = rows.map((row) =>
      make("tr", { className: row.fits ? "lw-fits" : "lw-no-fit" }, [
        make("td", { text: row.name }),
        make("td", { text: gib(row.capacity) }),
        make("td", { text: gib(row.required) }),
        make("td", { text: row.fits ? "✓ fits" : "✗ too big" }),
      ]),
    );
    table.replaceChildren(make("thead", {}, [head]), make("tbody", {}, body));
  }

  function renderError() {
    const message = model.get("error") || "";
    errorBox.textContent = message;
    errorBox.style.display = message ? "block" : "none";
  }

  function send(name, value) {
    model.set(name, value);
    model.save_changes();
  }

  const listeners = [
    [modelSelect, "change", () => send("model_name", modelSelect.value)],
    [methodSelect, "change", () => send("method", methodSelect.value)],
    [rankSelect, "change", () => send("rank", parseInt(rankSelect.value, 10))],
    [targetSelect, "change", () => send("targets", targetSelect.value)],
    [
      batchInput,
      "change",
      () => {
        const value = Math.min(4096, Math.max(1, parseInt(batchInput.value, 10) || 1));
        batchInput.value = String(value);
        send("batch_size", value);
      },
    ],
    [seqSelect, "change", () => send("seq_len", parseInt(seqSelect.value, 10))],
    [precisionSelect, "change", () => send("precision", precisionSelect.value)],
    [gcInput, "change", () => send("gradient_checkpointing", gcInput.checked)],
  ];
  for (const [node, type, handler] of listeners) node.addEventListener(type, handler);

  // the inputs are Python's list (MemoryPlanner.input_names), plus the model choices it offers
  const inputs = ["models", ...model.get("input_names")];
  for (const name of inputs) model.on(`change:${name}`, syncControls);
  model.on("change:estimate", renderEstimate);
  model.on("change:gpus", renderFit);
  model.on("change:error", renderError);

  syncControls();
  renderEstimate();
  renderFit();
  renderError();

  return () => {
    for (const [node, type, handler] of listeners) node.removeEventListener(type, handler);
    for (const name of inputs) model.off(`change:${name}`, syncControls);
    model.off("change:estimate", renderEstimate);
    model.off("change:gpus", renderFit);
    model.off("change:error", renderError);
  };
}

export default { render };
