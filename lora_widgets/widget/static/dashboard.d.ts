// Typed view of the DashboardPanel model (lora_widgets/widget/dashboard.py): the synced traits that
// dashboard.js reads and writes, and the messages it sends. Documentation only; nothing is compiled.

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

export interface DashboardModel {
  // LoRA controls
  rank: number;
  alpha: number;
  dropout: number;
  target_modules: string; // "" = default, "all-linear", or "q_proj,v_proj"
  target_choices: string[];
  // training controls
  learning_rate: number;
  schedule: "constant" | "linear" | "cosine";
  warmup_steps: number;
  batch_size: number;
  grad_accum_steps: number;
  epochs: number;
  max_steps: number; // 0 = use epochs
  precision: "fp32" | "bf16" | "fp16";
  seed: number;
  // run
  state: RunState;
  progress: Progress;
  summary: Summary;
  callouts: Callout[];
  errors: Record<string, string>; // control name -> why it is invalid
  log_scale: boolean;
  run_label: string;
}

export type DashboardMessage = { type: "train" } | { type: "pause" } | { type: "resume" } | { type: "stop" };
