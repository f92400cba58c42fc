"""A quantized frozen base (QLoRA) on the CPU: the loader's ``base=`` option, LoRA on bitsandbytes layers,
the dequantized weight, merging, and the bad-input errors. Tiny Llamas built from configs; bitsandbytes' CPU
backend runs 4-bit and 8-bit, so nothing here needs a GPU."""

from __future__ import annotations

import builtins
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lora_widgets.lora.layers import LoRAConfig, LoRALinear, apply_lora, lora_layers, merge_lora
from lora_widgets.lora.statistics import adapter_stats
from lora_widgets.quantization import (
    BASE_PRECISIONS,
    base_of,
    compute_dtype,
    describe_base,
    frozen_weight,
    is_quantized,
    keep_cpu_layout,
    quantization_config,
    quantized_layers,
)
from tests.helpers import tiny_llama

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")


def quantized_tiny(
    tmp_path: Path, base: Any = "4-bit", seed: int = 0, hidden: int = 32
) -> tuple[nn.Module, nn.Module]:
    """(the tiny Llama in fp32, the same checkpoint loaded with ``base``) from one save_pretrained directory,
    loaded as ``load_model`` loads it (bitsandbytes' CPU repacking off: it fails for in_features 32)."""
    model = tiny_llama(seed)
    if hidden != 32:
        torch.manual_seed(seed)
        config = model.config
        config.hidden_size, config.intermediate_size, config.head_dim = hidden, 2 * hidden, hidden // 4
        model = type(model)(config).eval()
    directory = tmp_path / f"tiny-{seed}-{hidden}"
    model.save_pretrained(directory)
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=quantization_config(base, "cpu"), device_map="cpu"
    )
    keep_cpu_layout(quantized)
    return model, quantized.eval()


def ids(seed: int = 1, n: int = 2, t: int = 12) -> torch.Tensor:
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ loading and the base= option


def test_four_bit_config_is_qloras_recipe_and_cpu_computes_in_fp32() -> None:
    config = quantization_config("4-bit", "cpu")
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.float32 == compute_dtype("cpu")
    assert quantization_config("8-bit", "cpu").load_in_8bit
    assert quantization_config("16-bit", "cpu") is None
    assert BASE_PRECISIONS == ("16-bit", "8-bit", "4-bit")


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_gpu_compute_dtype_is_bf16_where_supported_else_fp16(
    monkeypatch: pytest.MonkeyPatch, bf16: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16 or including_emulation
    )
    assert compute_dtype("cuda") == expected
    assert quantization_config("4-bit", "cuda").bnb_4bit_compute_dtype == expected


def test_bf16_compute_on_a_gpu_without_bf16_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # a T4: torch's default including_emulation=True answers True there; only the native answer is False
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    own = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"bfloat16 is not supported by this GPU.*float16 on a T4"):
        quantization_config(own, "cuda")


@pytest.mark.parametrize(
    "base, match",
    [
        ("4bit", r"base='4bit' is not a base precision: use one of \['16-bit', '8-bit', '4-bit'\]"),
        (4, r"base=4 is not a base precision"),
        (None, r"base=None is not a base precision"),
    ],
)
def test_unknown_base_names_the_value_and_the_choices(base: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantization_config(base, "cpu")


def test_a_bnb_config_that_quantizes_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="neither load_in_4bit nor load_in_8bit"):
        quantization_config(transformers.BitsAndBytesConfig(), "cpu")


def test_a_device_bitsandbytes_cannot_use_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bnb, "supported_torch_devices", {"cpu", "cuda"})
    with pytest.raises(ValueError, match=r"bitsandbytes cannot use the device 'mps'.*base='16-bit'"):
        quantization_config("4-bit", "mps")


def test_quantized_base_without_bitsandbytes_gives_the_install_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_import = builtins.__import__

    def no_bnb(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(__import__("sys").modules, "bitsandbytes")
    monkeypatch.setattr(builtins, "__import__", no_bnb)
    monkeypatch.setattr("importlib.import_module", lambda name: no_bnb(name))
    with pytest.raises(
        ImportError, match=r"base='4-bit' needs the bitsandbytes package.*pip install bitsandbytes"
    ):
        quantization_config("4-bit", "cpu")
    assert quantization_config("16-bit", "cpu") is None  # a 16-bit base never needs it


def test_load_model_bad_base_leaves_nothing_loaded() -> None:
    from lora_widgets.models import load_model

    with pytest.raises(ValueError, match="base='2-bit' is not a base precision"):
        load_model(None, base="2-bit")


def test_shipped_model_loads_in_4_bit_and_8_bit() -> None:
    from lora_widgets.data.corpora import load_corpus
    from lora_widgets.models import load_base_model

    model16, _ = load_base_model()
    model4, tokenizer = load_base_model(base="4-bit")
    model8, _ = load_base_model(base="8-bit")
    assert (base_of(model16), base_of(model4), base_of(model8)) == ("16-bit", "4-bit", "8-bit")
    assert describe_base(model4) == "4-bit NF4"
    layers = quantized_layers(model4)
    assert layers and all(isinstance(m, bnb.nn.Linear4bit) for m in layers.values())
    assert not isinstance(
        model4.lm_head, bnb.nn.Linear4bit
    )  # the head stays unquantized (transformers' rule)
    assert model4.get_memory_footprint() < 0.6 * model16.get_memory_footprint()
    # eval mode, no gradients (bitsandbytes' CPU repacking path): runs, and predicts text nearly as well
    # (measured on 256 tokens of the fine-tuning corpus: 4.33 at 16-bit, 4.64 at 4-bit, 4.33 at 8-bit)
    text = "\n".join(load_corpus("finetune")[:3])
    batch = tokenizer([text], return_tensors="pt")["input_ids"][:, :256]
    with torch.no_grad():
        losses = [m(batch, labels=batch).loss.item() for m in (model16, model4, model8)]
    assert losses[0] < losses[1] < 1.15 * losses[0]
    assert losses[2] == pytest.approx(losses[0], rel=0.01)


# ------------------------------------------------------------------ LoRA on quantized layers


@pytest.mark.parametrize("base", ["4-bit", "8-bit"])
def test_lora_wraps_quantized_layers_frozen_with_fp32_factors(tmp_path: Path, base: str) -> None:
    _, model = quantized_tiny(tmp_path, base)
    before = model(ids()).logits
    report = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    layers = lora_layers(model)
    assert set(layers) == set(report.matched) and len(layers) == 14
    for layer in layers.values():
        assert layer.quantized == base
        assert type(layer.base_layer).__name__ in ("Linear4bit", "Linear8bitLt")
        assert not layer.base_layer.weight.is_floating_point()  # still quantized
        assert not any(p.requires_grad for p in layer.base_layer.parameters())
        assert layer.lora_A.weight.dtype == layer.lora_B.weight.dtype == torch.float32
        assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    torch.testing.assert_close(model(ids()).logits, before)  # B = 0: the base model, exactly
    loss = model(ids(), labels=ids()).loss
    loss.backward()
    grads = [layer.lora_A.weight.grad for layer in layers.values()]
    assert all(g is not None for g in grads)  # through the B = 0 path A gets no signal, B does
    assert all(layer.lora_B.weight.grad.abs().sum() > 0 for layer in layers.values())


@pytest.mark.parametrize("base, tolerance", [("4-bit", 0.11), ("8-bit", 0.02)])
def test_frozen_weight_is_the_dequantized_weight(tmp_path: Path, base: str, tolerance: float) -> None:
    """NF4 of normal weights: a relative error of 0.0925 (a reference NF4 rounding of the same numbers gives
    the same); int8 with a per-row absmax: 0.006. Hidden size 64: bitsandbytes 0.50.2's CPU dequantize kernel
    assumes every row holds whole 64-weight blocks and reads the wrong absmax otherwise (relative error 0.26 at
    in_features 160, 0.43 at 32); frozen_weight returns what the layer computes with either way."""
    original, model = quantized_tiny(tmp_path, base, hidden=64)
    for name, layer in quantized_layers(model).items():
        w = frozen_weight(layer)
        w0 = original.get_submodule(name).weight.detach()
        assert w.shape == w0.shape
        assert ((w.float() - w0).norm() / w0.norm()).item() < tolerance


def test_adapter_statistics_measure_the_dequantized_weight(tmp_path: Path) -> None:
    original, model = quantized_tiny(tmp_path, hidden=64)
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    stats = adapter_stats(model, step=1)
    layers = lora_layers(model)
    assert {s.name for s in stats.layers} == set(layers)
    for layer_stats in stats.layers:
        layer = layers[layer_stats.name]
        exact = frozen_weight(layer.base_layer).norm().item()
        assert layer_stats.weight_norm == pytest.approx(exact, rel=1e-5)
        w0 = original.get_submodule(layer_stats.name).weight.detach()
        assert layer_stats.weight_norm == pytest.approx(w0.norm().item(), rel=0.05)  # NF4 keeps the norm
        delta = layer.delta_weight().norm().item()
        assert layer_stats.relative_update == pytest.approx(delta / exact, rel=1e-4)


def test_in_place_merge_into_4_bit_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    _, model = quantized_tiny(tmp_path)
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    packed = {n: m.base_layer.weight.data.clone() for n, m in lora_layers(model).items()}
    with pytest.raises(
        ValueError, match=r"cannot merge into a 4-bit weight in place.*merge_lora\(model, unload=True\)"
    ):
        merge_lora(model)
    assert not any(layer.merged for layer in lora_layers(model).values())
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base_layer.weight.data, packed[name])


@pytest.mark.parametrize("base", ["4-bit", "8-bit"])
def test_merge_with_unload_dequantizes_merges_and_says_so(tmp_path: Path, base: str) -> None:
    _, model = quantized_tiny(tmp_path, base)
    apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.1)
    adapted = model(ids()).logits
    with pytest.warns(UserWarning, match=rf"the base was {base}; its 14 quantized layers were dequantized"):
        merged = merge_lora(model, unload=True)
    assert merged is model and not lora_layers(model) and not is_quantized(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("_proj",)))
    assert getattr(model.config, "quantization_config", None) is None
    # LLM.int8() rounds the activations to int8 as well (Dettmers et al. 2022, sec. 3.1), so an 8-bit layer's
    # output differs from the float product by that rounding (measured: at most 0.09 on logits of size ~1)
    torch.testing.assert_close(model(ids()).logits, adapted, atol=2e-3 if base == "4-bit" else 0.15, rtol=0)
    model.save_pretrained(tmp_path / "merged")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not is_quantized(reloaded)
    torch.testing.assert_close(reloaded(ids()).logits, model(ids()).logits)


def test_quantized_layer_is_reported_as_such_by_the_wrapper(tmp_path: Path) -> None:
    _, model = quantized_tiny(tmp_path)
    layer = LoRALinear(model.model.layers[0].self_attn.q_proj, r=2, alpha=2)
    assert layer.delta_weight().dtype == torch.float32 and layer.delta_weight().shape == (32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert layer(torch.randn(3, 32)).shape == (3, 32)
