"""QLoRA end to end on the CPU: the shipped model fine-tunes on a 4-bit base (its loss falls), its adapter loads with
PEFT on the 16-bit base, a PEFT QLoRA adapter loads in ours, and the trainer's k-bit preparation and its refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lora_widgets.lora import LoRAConfig, apply_lora, lora_layers
from lora_widgets.lora.peft_format import load_adapter, save_adapter
from lora_widgets.models import load_base_model
from lora_widgets.quantization import base_of, is_quantized, quantized_layers
from lora_widgets.training.config import TrainConfig
from lora_widgets.training.kbit import KbitState, prepare_kbit
from lora_widgets.training.trainer import LoRATrainer
from tests.test_qlora import ids, quantized_tiny

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

LORA = LoRAConfig(r=8, alpha=16, target_modules="all-linear")


def short_run(tmp_path: Path, **changes: object) -> TrainConfig:
    settings: dict[str, object] = dict(
        max_steps=12, eval_every=12, eval_batches=2, batch_size=4, warmup_steps=2, learning_rate=5e-3,
        output_dir=str(tmp_path / "runs"), sample_prompts=(), seed=0,
    )  # fmt: skip
    settings.update(changes)
    return TrainConfig(**settings)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def trained_4bit(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoRATrainer, Path]:
    """The shipped model, 4-bit base, 12 steps of LoRA on the fine-tuning corpus (about 10 s on 2 cores)."""
    tmp = tmp_path_factory.mktemp("qlora")
    model, tokenizer = load_base_model(base="4-bit")
    trainer = LoRATrainer(model, tokenizer, "python-docs", lora=LORA, config=short_run(tmp))
    trainer.run_sync()
    return trainer, tmp


def test_shipped_model_fine_tunes_on_a_4_bit_base(trained_4bit: tuple[LoRATrainer, Path]) -> None:
    trainer, _ = trained_4bit
    assert trainer.state == "finished", trainer.last_event
    assert base_of(trainer.model) == "4-bit"
    layers = lora_layers(trainer.model)
    assert layers and all(layer.quantized == "4-bit" for layer in layers.values())
    val = trainer.history.val_loss
    assert len(val) == 2 and val[-1] < val[0] - 0.05, val  # the base's validation loss, then after 12 steps
    # the base stayed frozen and quantized; the k-bit preparation's temporary changes were put back
    assert all(not p.requires_grad for m in quantized_layers(trainer.model).values() for p in m.parameters())
    assert getattr(trainer.model, "_require_grads_hook", None) is None


def test_adapter_trained_on_4_bit_loads_with_peft_on_the_16_bit_base(
    trained_4bit: tuple[LoRATrainer, Path],
) -> None:
    trainer, tmp = trained_4bit
    directory = save_adapter(trainer.model, tmp / "adapter")
    base16, _ = load_base_model()
    peft_model = peft.PeftModel.from_pretrained(base16, directory).eval()
    ours16, _ = load_base_model()
    load_adapter(ours16, directory)
    batch = ids(t=32) % 2048
    with torch.no_grad():
        peft_logits = peft_model(batch).logits
        ours_logits = ours16(batch).logits
        quantized_logits = trainer.model.eval()(batch).logits
    torch.testing.assert_close(peft_logits, ours_logits, atol=1e-5, rtol=1e-5)  # the same adapter, exactly
    # on the 16-bit base the adapter sees unrounded weights: close to the 4-bit model, not equal
    assert (peft_logits - quantized_logits).abs().mean() < 0.5 * quantized_logits.abs().mean()


def test_a_peft_qlora_adapter_loads_in_ours(tmp_path: Path) -> None:
    _, peft_base = quantized_tiny(tmp_path, hidden=64)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = peft.get_peft_model(peft_base, config).eval()
    peft_model.save_pretrained(tmp_path / "peft-adapter")
    with torch.no_grad():
        expected = peft_model(ids()).logits
    _, ours = quantized_tiny(tmp_path / "again", hidden=64)
    report = load_adapter(ours, tmp_path / "peft-adapter")
    assert len(report.matched) == 4 and all(layer.quantized for layer in lora_layers(ours).values())
    with torch.no_grad():
        torch.testing.assert_close(ours(ids()).logits, expected, atol=1e-5, rtol=1e-5)


def test_full_fine_tuning_of_a_quantized_model_is_refused(tmp_path: Path) -> None:
    _, model = quantized_tiny(tmp_path)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(
        ValueError, match=r"full fine-tuning of a quantized model \(4-bit base\).*lora=LoRAConfig"
    ):
        LoRATrainer(model, None, torch.randint(0, 128, (16, 8)), lora=None, config=short_run(tmp_path))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags and not lora_layers(model)


def test_a_config_naming_another_base_is_refused(tmp_path: Path) -> None:
    model, tokenizer = load_base_model()
    with pytest.raises(
        ValueError, match=r"TrainConfig.base='4-bit' but the model's base is 16-bit.*base='4-bit'"
    ):
        LoRATrainer(model, tokenizer, "python-docs", lora=LORA, config=short_run(tmp_path, base="4-bit"))
    assert not lora_layers(model)
    with pytest.raises(ValueError, match=r"TrainConfig.base='8-bit' is invalid|base=.*one of"):
        TrainConfig(base="8bit")


def test_kbit_preparation_upcasts_the_rest_and_is_put_back(tmp_path: Path) -> None:
    """What peft.prepare_model_for_kbit_training does: bf16 norms/embeddings/head -> fp32, input grads with
    checkpointing; the run's compute dtype on each 4-bit layer, restored afterwards."""
    _, model = quantized_tiny(tmp_path)
    for (
        p
    ) in model.parameters():  # the unquantized parameters (norms, embeddings, head), as a bf16 load has them
        if p.is_floating_point():
            p.data = p.data.bfloat16()
    apply_lora(model, LoRAConfig(r=2, alpha=2))
    before = KbitState.of(model, gradient_checkpointing=True)
    assert before.input_grads and len(before.compute_dtypes) == 14
    assert prepare_kbit(model, precision="bf16", gradient_checkpointing=True)
    floats = [p for p in model.parameters() if p.is_floating_point()]
    assert floats and all(p.dtype == torch.float32 for p in floats)
    assert all(m.compute_dtype == torch.bfloat16 for m in quantized_layers(model).values())
    embedded = model.get_input_embeddings()(ids())
    assert embedded.requires_grad  # the hook that lets checkpointed frozen blocks pass gradients
    before.restore(model)
    assert all(m.compute_dtype == before.compute_dtypes[m] for m in quantized_layers(model).values())
    assert not model.get_input_embeddings()(ids()).requires_grad
    assert not prepare_kbit(apply_lora_plain(), precision="fp32", gradient_checkpointing=False)


def apply_lora_plain() -> torch.nn.Module:
    from tests.helpers import tiny_llama

    model = tiny_llama()
    apply_lora(model, LoRAConfig(r=2, alpha=2))
    return model


def test_quantized_base_with_checkpointing_trains(tmp_path: Path) -> None:
    _, model = quantized_tiny(tmp_path, hidden=64)
    data = torch.randint(0, 128, (24, 16), generator=torch.Generator().manual_seed(0))
    config = short_run(tmp_path, max_steps=6, eval_every=6, gradient_checkpointing=True, batch_size=4)
    trainer = LoRATrainer(
        model, None, data, lora=LoRAConfig(r=4, alpha=8, target_modules="all-linear"), config=config
    )
    trainer.run_sync()
    assert trainer.state == "finished", trainer.last_event
    assert is_quantized(model) and len(trainer.history.loss) == 6
    assert getattr(model, "_require_grads_hook", None) is None  # the input-grad hook was removed again
