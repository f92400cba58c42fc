"""The model card (``README.md``) of the shipped base model, written from ``training_summary.json``'s figures.

Used by ``scripts/build_base_model.py``; kept apart so the build script stays about building.
"""

from __future__ import annotations

import math
from typing import Any

from lora_widgets.data.corpora import get_corpus_info


def _instruct_card(s: dict[str, Any]) -> str:
    base = s.get("instruct_baseline")
    if not base:
        return "(Not measured in this build.)"
    return (
        f"{base['train_rows']} training rows ({base['train_trained_share']:.0%} of their tokens are answer tokens, "
        f"the rest is chat markup and questions) and {base['val_rows']} validation rows. This base model on the "
        f"validation rows: loss on the answer tokens **{base['val_answer_loss']:.3f}** nats; greedy replies that "
        f"end with the end-of-turn token within 128 new tokens: **{base['val_end_of_turn_share']:.0%}**. "
        "`benchmarks/bench_sft_evidence.py` fine-tunes it with LoRA on the training rows and prints both figures "
        "before and after."
    )


def model_card(s: dict[str, Any]) -> str:
    hp, ev = s["hparams"], s["lora_evidence"]
    pre, fin = get_corpus_info("stdlib-code"), get_corpus_info("python-docs")
    inst = get_corpus_info("python-instruct")
    return f"""---
license: other
license_name: psf-2.0
library_name: transformers
pipeline_tag: text-generation
---

# lora_widgets tiny base model

A {s["n_params"] / 1e6:.2f} M-parameter Llama-architecture causal language model, pretrained from scratch on
the Python standard library's source code. It ships inside the `lora_widgets` package so that every notebook,
test and dashboard can fine-tune a *pretrained* model offline, on a CPU, in minutes. It is a teaching model:
it writes plausible-looking Python-flavoured text, not working programs.

Load it like any hub model (this directory is what `save_pretrained` wrote):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)
# or: from lora_widgets.models import load_base_model; model, tokenizer = load_base_model()
```

## Model

| | |
|---|---|
| Architecture | `LlamaForCausalLM`, {hp["num_hidden_layers"]} layers, hidden {hp["hidden_size"]}, MLP {hp["intermediate_size"]}, {hp["num_attention_heads"]} heads, RoPE, untied embeddings |
| Parameters | {s["n_params"]:,} (fp32, `model.safetensors`) |
| Tokenizer | byte-level BPE (`tokenizers`), vocabulary {hp["vocab_size"]:,}, trained on the pretraining corpus; `<|endoftext|>` = EOS/BOS (id {s["eos_token_id"]}), `<|pad|>` = padding (id {s["pad_token_id"]}); no BOS is prepended |
| Context | trained on {hp["block_size"]}-token blocks (positions up to {hp["max_position_embeddings"]} are accepted, but beyond {hp["block_size"]} quality drops) |
| Size on disk | {s["size_bytes"] / 1e6:.1f} MB (this directory) |

## Training data

* **Pretraining: `stdlib-code`** — {pre.description} Read from CPython {s["python_version"]}.
  {s["pretrain_tokens"]:,} tokens, packed into {hp["block_size"]}-token blocks with EOS between files;
  {s["pretrain_train_blocks"]:,} training blocks, {s["pretrain_val_blocks"]:,} held-out validation blocks
  (`split_blocks(pack_blocks(load_corpus("stdlib-code"), tokenizer, {hp["block_size"]}), 0.1, seed=0)`: random blocks,
  so every file has blocks on the training side; `load_heldout_code()` is stdlib code this model never saw).
  The tokenizer was trained on the whole corpus, validation text included.
* **Fine-tuning target (not seen in pretraining): `python-docs`** — {fin.description}
  {s["finetune_tokens"]:,} tokens; {s["finetune_val_blocks"]} validation blocks.

Both corpora are written by the Python developers and distributed with Python under the
{pre.licence}.

## Training

{hp["steps"]:,} steps of AdamW (peak learning rate {hp["learning_rate"]}, betas {tuple(hp["betas"])}, weight decay
{hp["weight_decay"]} on matrices, {hp["warmup_steps"]} warm-up steps then cosine decay to {hp["min_lr_ratio"]:.0%} of the peak,
gradient clipping at {hp["max_grad_norm"]}), batch {hp["batch_size"]} × {hp["block_size"]} tokens, fp32, seed {hp["seed"]},
≈ {hp["steps"] * hp["batch_size"] * hp["block_size"] / 1e6:.1f} M tokens
(≈ {hp["steps"] * hp["batch_size"] / max(1, s["pretrain_train_blocks"]):.1f} epochs).
Rebuild with `python scripts/build_base_model.py` (torch {s["torch_version"]}, transformers {s["transformers_version"]});
`--out /tmp/rebuild` builds elsewhere and prints how far the rebuild's losses are from these. With the same
library versions and thread count a rebuild has come out bit-identical (weights and tokenizer).

Wall time: **{s["pretrain_wall_s"] / 60:.1f} min** of pretraining ({s["total_wall_s"] / 60:.1f} min for the whole script) on a
2-core CPU ({s["machine"]}, {s["torch_threads"]} torch thread{"s" if s["torch_threads"] != 1 else ""}) that other jobs were
sharing at the time, so these figures are pessimistic. One thread is the default on purpose: on a shared 2-core
machine two threads spent most of their time waiting for each other (measured: 7.6× more CPU time per step);
a fixed thread count also keeps the floating-point results reproducible.

## Results (validation loss, nats per token)

| | loss | perplexity |
|---|---|---|
| uniform guess, ln({hp["vocab_size"]}) | {s["uniform_loss"]:.3f} | {hp["vocab_size"]:,} |
| held-out `stdlib-code` (pretraining domain) | **{s["pretrain_val_loss"]:.3f}** | {math.exp(s["pretrain_val_loss"]):.1f} |
| `python-docs` validation (fine-tuning domain) | {s["finetune_val_loss"]:.3f} | {math.exp(s["finetune_val_loss"]):.1f} |
| final training loss (mean of the last 100 steps) | {s["final_train_loss"]:.3f} | |

### LoRA evidence

LoRA r={ev["r"]}, alpha={ev["alpha"]:g}, on all linear layers of the blocks ({ev["trainable_params"]:,} trainable parameters),
{ev["steps"]} steps of AdamW (lr {ev["learning_rate"]}, constant), batch {ev["batch_size"]} × {hp["block_size"]}, on the `python-docs`
training blocks: validation loss on `python-docs` **{ev["finetune_val_loss_base"]:.3f} → {ev["finetune_val_loss_lora"]:.3f}
({ev["relative_reduction"]:.1%} lower)**, in {ev["train_wall_s"]:.0f} s of training on the same shared 2-core CPU.
`tests/test_evidence.py` repeats this run on today's split, which keeps documents that share a 40-word
passage on one side (validation 4.702 → 4.005, 14.8% lower, on 7 Dec 2026), and asserts a reduction of at least 12%.

## Chat template

`tokenizer_config.json` carries a ChatML-like chat template, so `tokenizer.apply_chat_template` works offline as it
does for a hub instruct model. Each turn is rendered as

```
<|system|>\\n{{content}}<|endoftext|>\\n<|user|>\\n{{content}}<|endoftext|>\\n<|assistant|>\\n{{content}}<|endoftext|>\\n
```

and `add_generation_prompt=True` appends `<|assistant|>\\n`. The role markers are spelled with tokens the vocabulary
already has (`<`, `|`, `user`, `|`, `>`), so no embedding was added and none is left untrained; the end-of-turn token
is the EOS token `<|endoftext|>` (id {s["eos_token_id"]}), so generation stops where a turn ends. Roles other than system,
user and assistant are refused. The assistant's content, its end-of-turn token and the newline after it sit inside
`{{% generation %}}` markers, so transformers' `return_assistant_tokens_mask` and TRL's `assistant_only_loss=True` work
as they are. The base model was pretrained on code, not chats: it has never seen this format and does not end its
turns until fine-tuned on it.

## Instruction set: `python-instruct`

{inst.description}

{_instruct_card(s)}

## Limitations

Tiny and trained on ~{s["pretrain_tokens"] / 1e6:.1f} M tokens of one codebase: it has no knowledge worth relying on, and it
will repeat stdlib idioms. The corpora, and therefore a rebuild's exact numbers, differ slightly between Python
versions. Use it to learn and test fine-tuning, not for anything else.

## Licence

Weights and tokenizer are derived from Python's standard library and documentation
({pre.licence}); they are distributed with `lora_widgets` under the same terms as its corpora.
"""
