// Typed view of the DashboardPanel model (lora_widgets/widget/panel.py): the synced traits that
// dashboard.js reads and writes, and the messages it sends. Documentation only; nothing is compiled
// (dashboard.js refers to these types in JSDoc, as `import("@anywidget/types").Render<DashboardModel>`).

export type RunState = "idle" | "running" | "paused" | "stopped" | "finished" | "failed";

export interface Progress {
  step: number;
  total: number;
  elapsed?: number; // seconds
  eta?: number | null; // seconds
  tokens_per_s?: number | null;
  epoch?: number;
  loss?: number | null;
  extra?: StepExtra; // present when the run logs any of them (TRL's SFTTrainer does)
}

/** TRL's per-step metrics (StepMetrics.extra), the ones the progress line shows. */
export interface StepExtra {
  mean_token_accuracy?: number | null; // 0..1
  entropy?: number | null; // nats
  num_tokens?: number | null; // tokens trained on so far
}

export interface Summary {
  device?: string; // "cpu" | "cuda" | ...
  device_name?: string; // e.g. "NVIDIA T4 (15 GiB)"
  trainable?: number;
  total?: number;
  trainable_pct?: number;
  adapter_bytes?: number;
  adapter_size?: string; // "≈80.0 KiB" while estimated, exact after the run
  adapter_estimated?: boolean;
  adapter_path?: string;
  val_loss?: number | null;
  best_val_loss?: number | null;
  perplexity?: number | null;
  run_dir?: string;
  train_blocks?: number | null;
  train_rows?: number | null; // an attached trainer's training rows
  val_token_accuracy?: number | null; // TRL's eval_mean_token_accuracy, 0..1
}

export interface Callout {
  kind: "success" | "warning" | "danger" | "info";
  title: string;
  message: string;
  suggestions: string[];
}

/** One control, as lora_widgets/widget/controls.py declares it (Control.spec()). */
export interface ControlSpec {
  name: string; // the trait holding its value, the <input>/<select> name, the key in `errors`
  label: string;
  kind: "int" | "float" | "text" | "select"; // int/float: a number input; select: one of `choices`
  group: string; // "LoRA" | "Training": one <fieldset> per group, in order of first appearance
  help: string; // tooltip
  min?: number; // input hints only: the configs decide what is valid (see `errors`)
  max?: number;
  step?: number | "any";
  placeholder?: string;
  choices?: string[]; // select: the options; text: suggestions (a <datalist>)
}

/** The data's facts (lora_widgets/widget/data_view.py, data_facts). */
export interface DataFacts {
  kind: "packed" | "sft";
  train: number; // training examples (sft) or blocks (packed)
  val: number;
  seq_len: number; // block size, or the longest padded length
  tokens: number; // without padding
  trained_pct: number;
  padding_pct: number;
  rows: number;
  truncated: number;
  dropped: number;
  formats: Record<string, number>; // rows per source format
  train_on: string;
  max_length: number | null;
  packed?: boolean; // examples laid out padding-free (TrainConfig.packing)
}

/** The data view: the facts, and (for the dashboard's own data) one example's tokens. */
export interface DataViewPayload {
  facts?: DataFacts;
  index?: number; // 0-based
  count?: number;
  row?: number | null; // the source row of the example
  length?: number; // tokens in the example
  trained?: number; // of them trained
  tokens?: Array<[string, boolean]>; // [text, trained], at most data_view.MAX_TOKENS
}

/** One prompt's greedy answers (lora_widgets.events.types.SamplePair, with the step they were generated at). */
export interface SamplePair {
  prompt: string;
  base: string; // the base model's answer (adapters off)
  current: string; // the current adapter's answer
  base_ended: boolean | null; // ended with the end-of-turn token; null when unknown (plain text)
  current_ended: boolean | null;
  step: number;
}

export interface DashboardModel {
  // controls: what to render, from Python; then one trait per control, named by ControlSpec.name
  // (number for int/float, string for text/select). The names are not repeated here: the table in
  // controls.py is their only list.
  control_specs: ControlSpec[];
  [control: string]: unknown;
  // run
  state: RunState;
  progress: Progress;
  summary: Summary;
  callouts: Callout[];
  errors: Record<string, string>; // control name (or "settings") -> the config's message
  log_scale: boolean;
  run_label: string;
  data_view: DataViewPayload;
  data_index: number; // which example the data view shows (0-based); the buttons set it
  // an attached trainer's settings (TrainingArguments names), read-only; {} for the dashboard's own runs
  attached_settings: Record<string, unknown> & { trainer?: string };
  samples: SamplePair[]; // the last sample answers, one per prompt ([] before the first)
  samples_note: string; // what they cost
  // the current or last run for reactive readers (a marimo cell reading the dashboard's value)
  run_state: RunStateInfo;
  run_state_seen: number; // set by charts.js (marimo) to run_state.serial once shown
}

export interface RunStateInfo {
  serial: number; // grows at every change
  state: RunState;
  run: string | null;
  step: number | null;
  adapter_path: string | null; // set once the run has ended
  final_loss: number | null;
  best_val_loss: number | null;
  ended: boolean;
}

/** One chart line as sent (web_charts.py): int32 steps and float32 values as binary buffers, or the steps of
 * another line of the same message (`x_ref`). */
export type WireSeries = { x: DataView; y: DataView } | { x_ref: string; y: DataView };

/** What marimo's dashboard (WebDashboardPanel) adds: the chart model drawn by charts.js. */
export interface WebDashboardModel extends DashboardModel {
  chart_live: { series: Record<string, WireSeries>; label: string; gpu: boolean };
  chart_evals: { val_loss?: WireSeries };
  chart_fixed: { lr?: WireSeries; overlays?: (WireSeries & { label: string; color: string })[] };
  chart_axes: { log?: boolean; loss_domain?: [number, number] | null };
  adapter_map: Record<string, unknown>; // rows, columns, values (float32 [rows * columns]), detail
}

export type DashboardMessage =
  | { type: "train" }
  | { type: "pause" }
  | { type: "resume" }
  | { type: "stop" }
  | { type: "adapter_cell"; row: number; column: number }; // marimo's heatmap: a click on a cell
