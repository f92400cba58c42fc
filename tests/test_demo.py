"""The shipped base model and the demo helpers: loads like a hub model, offline; pretrained; sampling."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from lora_widgets.data.corpora import list_corpora, load_corpus
from lora_widgets.data.text import prepare_data
from lora_widgets.models import (
    BASE_MODEL_PATH,
    generate,
    load_base_model,
    load_model,
)
from tests.helpers import tiny_llama


@pytest.fixture(scope="module")
def base():  # type: ignore[no-untyped-def]
    return load_base_model()


def test_shipped_files_and_size() -> None:
    names = {p.name for p in BASE_MODEL_PATH.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
        "training_summary.json",
    } <= names
    size = sum(p.stat().st_size for p in BASE_MODEL_PATH.iterdir())
    assert size <= 10_000_000, f"shipped model is {size / 1e6:.1f} MB, over the 10 MB budget"


def test_loads_through_the_standard_auto_classes() -> None:
    model = AutoModelForCausalLM.from_pretrained(BASE_MODEL_PATH)
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_PATH)
    assert isinstance(model, LlamaForCausalLM)
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= n_params <= 5_000_000
    assert next(model.parameters()).dtype == torch.float32
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token_id is not None
    text = "def f(x):\n    return x ** 2  # é\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text  # byte-level: lossless


def test_model_card_states_corpus_size_steps_losses_licence() -> None:
    card = (BASE_MODEL_PATH / "README.md").read_text()
    summary = json.loads((BASE_MODEL_PATH / "training_summary.json").read_text())
    assert "stdlib-code" in card and "python-docs" in card and "PSF" in card
    assert f"{summary['n_params']:,}" in card
    assert f"{summary['hparams']['steps']:,} steps" in card
    assert f"{summary['pretrain_val_loss']:.3f}" in card and f"{summary['uniform_loss']:.3f}" in card
    assert summary["lora_evidence"]["relative_reduction"] >= 0.15


def test_load_base_model(base) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = base
    assert not model.training
    assert tokenizer.pad_token is not None
    assert model.config.eos_token_id == tokenizer.eos_token_id


def test_base_model_is_pretrained_on_its_domain(base) -> None:  # type: ignore[no-untyped-def]
    """Stdlib code it never trained on scores far better than a uniform guess, and better than the other domain."""
    from lora_widgets.data.corpora import load_heldout_code

    model, tokenizer = base
    uniform = math.log(len(tokenizer))
    losses = {}
    for name, source in (("stdlib-code", load_heldout_code()), ("python-docs", "python-docs")):
        val = prepare_data(source, tokenizer, block_size=128, val_fraction=0.1, seed=0).val[:64]
        with torch.no_grad():
            losses[name] = float(model(input_ids=val, labels=val).loss)
    assert losses["stdlib-code"] < 0.6 * uniform, (losses, uniform)
    assert losses["stdlib-code"] < losses["python-docs"], losses


def test_load_model_from_a_local_directory(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_PATH)
    model = tiny_llama(vocab_size=len(tokenizer))
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    for source in (str(tmp_path / "m"), tmp_path / "m"):
        loaded, tok = load_model(source)
        assert isinstance(loaded, LlamaForCausalLM) and loaded.config.hidden_size == 32
        for (n, p), q in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
            assert torch.equal(p, q), n
        assert tok.pad_token is not None
    half, _ = load_model(tmp_path / "m", dtype="bf16", device="cpu")
    assert next(half.parameters()).dtype == torch.bfloat16


def test_load_model_sets_a_missing_pad_token(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_PATH)
    tokenizer.pad_token = None
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded = load_model(tmp_path)
    assert loaded.pad_token == loaded.eos_token == "<|endoftext|>"


def test_load_model_errors_say_what_was_tried(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ValueError, match="does not exist") as info:
        load_model(missing)
    assert str(missing) in str(info.value)
    with pytest.raises(ValueError, match=r"model directory './no-such-dir' does not exist"):
        load_model("./no-such-dir")
    # a hub-shaped id with the hub switched off (tests/conftest.py sets HF_HUB_OFFLINE=1): no network used
    with pytest.raises(ValueError, match=r"tried it as a local directory .* and as a Hugging Face hub id"):
        load_model("lora-widgets-tests/not-a-real-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"could not load a model from the local directory .*empty"):
        load_model(tmp_path / "empty")
    with pytest.raises(ValueError, match="unknown dtype"):
        load_model(None, dtype="float8")


def test_corpora_by_role() -> None:
    assert load_corpus("pretrain")[0].startswith(("#", '"""', "import", "from", "r'''", "'''", '"'))
    assert load_corpus("finetune") == load_corpus("finetune")
    assert {c.role for c in list_corpora()} == {"pretrain", "finetune", "instruct"}
    with pytest.raises(ValueError, match=r"unknown corpus 'code'.*or a role: pretrain, finetune, instruct"):
        load_corpus("code")


def test_generate_is_seeded_greedy_and_side_effect_free(base) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = base
    prompt = "def parse_args("
    model.train()
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = generate(model, tokenizer, prompt, max_new_tokens=12, seed=1)
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    assert model.training  # mode restored
    model.eval()
    assert a.startswith(prompt) and len(a) > len(prompt)
    assert generate(model, tokenizer, prompt, max_new_tokens=12, seed=1) == a
    assert generate(model, tokenizer, prompt, max_new_tokens=12, seed=2) != a  # the seed matters
    greedy = generate(model, tokenizer, prompt, max_new_tokens=12, temperature=0, seed=5)
    only_new = generate(
        model, tokenizer, prompt, max_new_tokens=12, temperature=0, seed=6, include_prompt=False
    )
    assert greedy == prompt + only_new  # greedy ignores the seed
    assert isinstance(generate(model, tokenizer, "", max_new_tokens=3), str)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_k": -5}, "top_k"),
        ({"temperature": "hot"}, r"temperature must be a number >= 0 .* got 'hot'"),
        ({"temperature": float("nan")}, "temperature must be a number >= 0"),
        ({"temperature": float("inf")}, "temperature must be finite"),
        ({"seed": "1"}, "seed must be an int"),
        ({"include_prompt": "no"}, "include_prompt must be True or False"),
    ],
)
def test_generate_rejects_bad_arguments(base, kwargs, message) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = base
    with pytest.raises(ValueError, match=message):
        generate(model, tokenizer, "x", **kwargs)


def test_generate_prompt_none_is_named(base) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = base
    with pytest.raises(TypeError, match=r"prompt must be a str or a list of .* got NoneType"):
        generate(model, tokenizer, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"prompt, message 0: unknown role 'bot'"):
        generate(model, tokenizer, [{"role": "bot", "content": "hi"}])


def test_generate_from_messages_uses_the_chat_template_and_stops_at_end_of_turn(base) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = base
    messages = [{"role": "user", "content": "Explain the `with` statement in Python."}]
    prompt_ids = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert tokenizer.decode(prompt_ids["input_ids"]).endswith("<|assistant|>\n")
    reply = generate(model, tokenizer, messages, max_new_tokens=8, temperature=0)
    assert "<|user|>" not in reply and "Explain the" not in reply  # only the new text
    expected = model.generate(
        torch.tensor([prompt_ids["input_ids"]]), max_new_tokens=8, do_sample=False, pad_token_id=1
    )[0, len(prompt_ids["input_ids"]) :]
    assert reply == tokenizer.decode(expected, skip_special_tokens=True)
    # a model that ends its turn stops there: make EOS the only possible next token
    with torch.no_grad():
        saved = model.lm_head.weight.clone()
        model.lm_head.weight.zero_()
        model.lm_head.weight[tokenizer.eos_token_id] = 1.0
        try:
            assert generate(model, tokenizer, messages, max_new_tokens=20, temperature=0) == ""
        finally:
            model.lm_head.weight.copy_(saved)


def test_shipped_chat_template_uses_known_tokens_and_eos_as_end_of_turn() -> None:
    tokenizer = AutoTokenizer.from_pretrained(BASE_MODEL_PATH)
    config = json.loads((BASE_MODEL_PATH / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # transformers 4.x and 5.x both load it
    assert "{% generation %}" in config["chat_template"].replace("{%- generation %}", "{% generation %}")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids = tokenizer.apply_chat_template(chat, tokenize=True, return_dict=True)["input_ids"]
    assert tokenizer.decode(ids) == "<|user|>\nhi<|endoftext|>\n<|assistant|>\nyo<|endoftext|>\n"
    assert max(ids) < 2048 and len(tokenizer) == 2048  # no token added
    assert ids.count(tokenizer.eos_token_id) == 2
    assert "Chat template" in (BASE_MODEL_PATH / "README.md").read_text()
