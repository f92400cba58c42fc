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

/** One prompt's greedy answers (lora_widgets.events.SamplePair, with the step they were generated at). */
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
  samples: SamplePair[]; // the last sample answers, one per prompt ([] before the first)
  samples_note: string; // what they cost
}

export type DashboardMessage = { type: "train" } | { type: "pause" } | { type: "resume" } | { type: "stop" };
