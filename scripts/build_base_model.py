"""Rebuild the shipped tiny base model from scratch: tokenizer, pretraining, evaluation, model card.

Usage::

    python scripts/build_base_model.py                      # writes lora_widgets/assets/base_model/
    python scripts/build_base_model.py --out /tmp/rebuild   # rebuild elsewhere and compare with the shipped one
    python scripts/build_base_model.py --tokenizer-files-only   # rewrite only the tokenizer config + chat template
    python scripts/build_base_model.py --card-only   # re-measure the python-instruct baseline, rewrite the card

Steps (all seeded, CPU, fp32):

1. Train a byte-level BPE tokenizer (``tokenizers``; Radford et al. 2019, section 2.2) with a 2,048-token
   vocabulary on the ``"stdlib-code"`` corpus and wrap it as a ``PreTrainedTokenizerFast``.
2. Build a small Llama (``LlamaConfig``; Touvron et al. 2023) and pretrain it on the training blocks of
   ``"stdlib-code"`` (:func:`block_split`: random 128-token blocks, 10%, seed 0) with AdamW
   (Loshchilov & Hutter 2019), linear warm-up and cosine decay.
3. Measure validation loss on the held-out ``"stdlib-code"`` blocks and on the ``"python-docs"``
   validation blocks (the fine-tuning target), against the uniform-guess baseline ln(vocab).
4. Run the LoRA evidence fine-tune (r=8, all linear layers, 200 steps, batch 8) on ``"python-docs"`` and
   record how much it lowers the target-domain validation loss; ``tests/test_evidence.py`` repeats it.
5. ``save_pretrained`` (safetensors) the model and tokenizer, and write ``README.md`` (the model card)
   and ``training_summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lora_widgets.data.corpora import load_corpus, python_version
from lora_widgets.data.text import DataSplit, pack_blocks, split_blocks

sys.path.insert(0, str(Path(__file__).resolve().parent))
from base_model_card import model_card

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "lora_widgets" / "assets" / "base_model"

EOS = "<|endoftext|>"
PAD = "<|pad|>"

#: The shipped chat template (ChatML-like; Jinja, rendered by ``tokenizer.apply_chat_template``). Each turn is
#: ``<|role|>\n{content}<|endoftext|>\n``; the role markers are spelled with tokens the BPE vocabulary already has
#: (``<``, ``|``, ``user``, ...), so no embedding is added and left untrained, and the end-of-turn token is the
#: EOS token, so generation stops where a turn ends. The assistant's content, its end-of-turn token and the newline
#: after it sit inside ``{% generation %}`` markers: TRL's ``assistant_only_loss=True`` and transformers'
#: ``return_assistant_tokens_mask`` work with it as they are.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{- raise_exception('roles must be system, user or assistant, got ' + message['role']) }}"
    "{%- endif %}"
    "{{- '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{%- generation %}{{- message['content'] + eos_token + '\\n' }}{%- endgeneration %}"
    "{%- else %}"
    "{{- message['content'] + eos_token + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)

HPARAMS: dict[str, Any] = {
    "seed": 0,
    "vocab_size": 2048,
    "hidden_size": 160,
    "intermediate_size": 432,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 512,
    "block_size": 128,
    "batch_size": 16,
    "steps": 1500,
    "learning_rate": 3e-3,
    "warmup_steps": 50,
    "min_lr_ratio": 0.1,
    "weight_decay": 0.01,
    "betas": (0.9, 0.95),
    "max_grad_norm": 1.0,
    "val_fraction": 0.1,
}

EVIDENCE: dict[str, Any] = {
    "r": 8,
    "alpha": 16.0,
    "target_modules": "all-linear",
    "steps": 200,
    "batch_size": 8,
    "learning_rate": 3e-3,
    "seed": 0,
}


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE: every byte is in the base alphabet, so any text encodes without an unknown token."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        model_max_length=HPARAMS["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def write_tokenizer_files(tokenizer: Any, out: Path) -> None:
    """Write ``tokenizer.json`` and a ``tokenizer_config.json`` that every supported transformers loads.

    ``save_pretrained`` under transformers 5 names the class ``TokenizersBackend``, which 4.x does not have,
    and writes the chat template to ``chat_template.jinja``, which 4.45 does not read. The config written here
    names ``PreTrainedTokenizerFast`` (4.x's class; 5.x maps it to its tokenizers backend), holds the chat
    template itself, and pins ``clean_up_tokenization_spaces=False`` (4.x's default was True, which rewrites
    " ." as "." when decoding), so 4.45-4.57 and 5.x tokenise, decode and render chats the same.
    """
    tokenizer.save_pretrained(out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    config = {
        "bos_token": EOS,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": HPARAMS["max_position_embeddings"],
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up then cosine decay to ``min_ratio * peak`` (Loshchilov & Hutter 2017, SGDR eq. 5)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 64) -> float:
    """Token-weighted mean next-token cross-entropy (nats) over ``blocks[n, block_size]``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        batch = blocks[i : i + batch_size]  # [b, T]
        loss = model(input_ids=batch, labels=batch).loss
        n = batch.shape[0] * (batch.shape[1] - 1)  # predicted positions
        total += float(loss) * n
        count += n
    model.train(was_training)
    return total / count


def batches(n: int, batch_size: int, generator: torch.Generator) -> Any:
    """Endless stream of index batches: a fresh seeded permutation per epoch."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def pretrain(
    model: LlamaForCausalLM, train: torch.Tensor, hp: dict[str, Any], log: Any
) -> list[dict[str, float]]:
    """Full pretraining with AdamW, warm-up + cosine, gradient clipping; returns the logged curve."""
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": hp["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=hp["learning_rate"],
        betas=hp["betas"],
    )
    gen = torch.Generator().manual_seed(hp["seed"])
    stream = batches(len(train), hp["batch_size"], gen)
    curve: list[dict[str, float]] = []
    model.train()
    start = time.perf_counter()
    running = 0.0
    for step in range(hp["steps"]):
        lr = lr_at(step, hp["steps"], hp["learning_rate"], hp["warmup_steps"], hp["min_lr_ratio"])
        for group in opt.param_groups:
            group["lr"] = lr
        batch = train[next(stream)]  # [batch_size, block_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["max_grad_norm"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        running += loss.item()
        if (step + 1) % 100 == 0:
            elapsed = time.perf_counter() - start
            curve.append({"step": step + 1, "train_loss": running / 100, "lr": lr, "elapsed_s": elapsed})
            log(f"step {step + 1:5d}  loss {running / 100:.3f}  lr {lr:.2e}  {elapsed:6.0f} s")
            running = 0.0
    model.eval()
    return curve


def block_split(name: str, tokenizer: Any, block_size: int, val_fraction: float, seed: int) -> DataSplit:
    """The split the shipped model was built with: random blocks of the packed corpus (``split_blocks``).

    Runs now split by document (``prepare_data``), because random blocks leave each validation block's
    neighbours in training; this older rule is kept here so that a rebuild reproduces the shipped model and card.
    So no whole ``stdlib-code`` file was held out from pretraining: ``load_heldout_code()`` is code it never saw.
    """
    blocks = pack_blocks(load_corpus(name), tokenizer, block_size)  # [n, block_size]
    train, val = split_blocks(blocks, val_fraction, seed)
    n_tokens = sum(
        len(ids) + 1 for ids in tokenizer(load_corpus(name), add_special_tokens=False)["input_ids"]
    )
    return DataSplit(train, val, block_size, n_tokens, f"random blocks ({val_fraction:.0%}, seed {seed})")


def lora_evidence(model_dir: Path, log: Any) -> dict[str, Any]:
    """LoRA r=8 for 200 steps on the finetune corpus; returns base and adapted target-domain val loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_widgets.lora.layers import LoRAConfig, apply_lora

    ev = EVIDENCE
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = block_split("python-docs", tokenizer, HPARAMS["block_size"], 0.1, 0)
    base = mean_loss(model, data.val)
    torch.manual_seed(ev["seed"])
    report = apply_lora(model, LoRAConfig(r=ev["r"], alpha=ev["alpha"], target_modules=ev["target_modules"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=ev["learning_rate"])
    gen = torch.Generator().manual_seed(ev["seed"])
    stream = batches(len(data.train), ev["batch_size"], gen)
    model.train()
    start = time.perf_counter()
    for _ in range(ev["steps"]):
        batch = data.train[next(stream)]  # [batch_size, block_size]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    train_s = time.perf_counter() - start
    after = mean_loss(model, data.val)
    result = {
        **ev,
        "trainable_params": report.trainable_params,
        "finetune_val_loss_base": base,
        "finetune_val_loss_lora": after,
        "relative_reduction": (base - after) / base,
        "train_wall_s": train_s,
    }
    log(f"LoRA evidence: {base:.3f} -> {after:.3f} ({result['relative_reduction']:.1%}) in {train_s:.0f} s")
    return result


def instruct_baseline(model_dir: Path, log: Any) -> dict[str, Any]:
    """The base model on the ``"python-instruct"`` validation split: answer loss and end-of-turn share."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_widgets.data.corpora import read_instructions
    from lora_widgets.data.sft import prepare_sft
    from lora_widgets.data.sft_eval import answer_loss, end_of_turn_share

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, train_stats = prepare_sft("python-instruct", tokenizer, max_length=256)
    rows = read_instructions("python-instruct", "validation")
    val, _ = prepare_sft(rows, tokenizer, max_length=256)
    result = {
        "train_rows": train_stats.n_rows,
        "val_rows": len(rows),
        "train_trained_share": train_stats.trained_share,
        "val_answer_loss": answer_loss(model, val, tokenizer.pad_token_id),
        "val_end_of_turn_share": end_of_turn_share(model, tokenizer, rows, max_new_tokens=128),
    }
    log(
        f"python-instruct baseline: answer loss {result['val_answer_loss']:.3f}, "
        f"end-of-turn share {result['val_end_of_turn_share']:.0%}"
    )
    return result


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (replaced)")
    parser.add_argument("--steps", type=int, default=HPARAMS["steps"], help="pretraining steps")
    parser.add_argument("--skip-evidence", action="store_true", help="do not run the LoRA evidence fine-tune")
    parser.add_argument(
        "--card-only",
        action="store_true",
        help="only measure the python-instruct baseline of the model in --out and rewrite its training_summary.json "
        "and README.md (no training)",
    )
    parser.add_argument(
        "--tokenizer-files-only",
        action="store_true",
        help="only rewrite the tokenizer files of the model in --out (its tokenizer.json is kept; the config and "
        "chat template are written as a full build writes them); no training",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: on a shared 2-core machine two threads spend most of their time "
        "waiting for each other; a fixed count also keeps the float results reproducible)",
    )
    args = parser.parse_args(argv)
    if args.tokenizer_files_only:
        write_tokenizer_files(
            PreTrainedTokenizerFast(tokenizer_file=str(args.out / "tokenizer.json")), args.out
        )
        print(f"rewrote the tokenizer files in {args.out}")
        return 0
    if args.card_only:
        rewrite_card(args.out)
        return 0

    def log(msg: str) -> None:
        print(msg, flush=True)

    hp = {**HPARAMS, "steps": args.steps}
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    torch.manual_seed(hp["seed"])

    pre_texts = load_corpus("stdlib-code")
    tokenizer = train_tokenizer(pre_texts, hp["vocab_size"])
    log(f"tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - t0:.1f} s")
    pre = block_split("stdlib-code", tokenizer, hp["block_size"], hp["val_fraction"], hp["seed"])
    fin = block_split("python-docs", tokenizer, hp["block_size"], hp["val_fraction"], hp["seed"])
    log(f"pretrain: {pre.n_tokens:,} tokens, {len(pre.train)} train / {len(pre.val)} val blocks")
    log(f"finetune: {fin.n_tokens:,} tokens, {len(fin.train)} train / {len(fin.val)} val blocks")

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hp["hidden_size"],
        intermediate_size=hp["intermediate_size"],
        num_hidden_layers=hp["num_hidden_layers"],
        num_attention_heads=hp["num_attention_heads"],
        num_key_value_heads=hp["num_key_value_heads"],
        max_position_embeddings=hp["max_position_embeddings"],
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(hp["seed"])
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters")

    t_train = time.perf_counter()
    curve = pretrain(model, pre.train, hp, log)
    pretrain_wall = time.perf_counter() - t_train
    pre_val = mean_loss(model, pre.val)
    fin_val = mean_loss(model, fin.val)
    log(
        f"val loss: stdlib-code {pre_val:.3f}, python-docs {fin_val:.3f}, uniform {math.log(len(tokenizer)):.3f}"
    )

    out: Path = args.out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(tmp)
    write_tokenizer_files(tokenizer, tmp)

    evidence = {} if args.skip_evidence else lora_evidence(tmp, log)
    baseline = {} if args.skip_evidence else instruct_baseline(tmp, log)
    summary: dict[str, Any] = {
        "hparams": {**hp, "betas": list(hp["betas"])},
        "n_params": n_params,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "pretrain_tokens": pre.n_tokens,
        "pretrain_train_blocks": len(pre.train),
        "pretrain_val_blocks": len(pre.val),
        "finetune_tokens": fin.n_tokens,
        "finetune_val_blocks": len(fin.val),
        "uniform_loss": math.log(len(tokenizer)),
        "pretrain_val_loss": pre_val,
        "finetune_val_loss": fin_val,
        "final_train_loss": curve[-1]["train_loss"] if curve else float("nan"),
        "curve": curve,
        "lora_evidence": evidence,
        "instruct_baseline": baseline,
        "pretrain_wall_s": pretrain_wall,
        "total_wall_s": time.perf_counter() - t0,
        "python_version": python_version(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    summary["size_bytes"] = dir_size(tmp)
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if evidence:
        (tmp / "README.md").write_text(model_card(summary))
        summary["size_bytes"] = dir_size(tmp)
        (tmp / "README.md").write_text(model_card(summary))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log(f"saved to {out} ({summary['size_bytes'] / 1e6:.1f} MB) in {summary['total_wall_s'] / 60:.1f} min")
    if out.resolve() != DEFAULT_OUT.resolve():
        compare_with_shipped(summary, log)
    return 0


def rewrite_card(out: Path) -> None:
    """Re-measure the ``python-instruct`` baseline of the model in ``out`` and rewrite its summary and card."""
    summary = json.loads((out / "training_summary.json").read_text())
    summary["instruct_baseline"] = instruct_baseline(out, print)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(model_card(summary))
    summary["size_bytes"] = dir_size(out)
    (out / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "README.md").write_text(model_card(summary))


def compare_with_shipped(summary: dict[str, Any], log: Any) -> None:
    """Print how far a rebuild's losses are from the shipped model's card (a few percent is expected)."""
    shipped_file = DEFAULT_OUT / "training_summary.json"
    if not shipped_file.is_file():
        return
    shipped = json.loads(shipped_file.read_text())
    for key in ("pretrain_val_loss", "finetune_val_loss", "final_train_loss"):
        a, b = summary[key], shipped[key]
        log(f"{key}: rebuild {a:.4f}, shipped {b:.4f} ({(a - b) / b:+.2%})")


if __name__ == "__main__":
    sys.exit(main())
