"""The dashboard's controls: one table, the configs' rules, the configs' messages, choices from Python.

Every control is set to a bad value through the panel, as the browser does, and the panel must show the
very message that constructing the config with that value raises; the dashboard and ``TrainConfig`` must
accept exactly the same settings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from lora_widgets.lora.layers import LoRAConfig
from lora_widgets.training.config import PRECISIONS, TrainConfig
from lora_widgets.training.schedules import SCHEDULES
from lora_widgets.widget import controls
from lora_widgets.widget.controls import (
    CONTROL_NAMES,
    CONTROLS,
    to_configs,
    validate_settings,
    values_from_configs,
)
from lora_widgets.widget.dashboard import LoRADashboard
from lora_widgets.widget.panel import DashboardPanel
from tests.helpers import tiny_llama

STATIC = Path(controls.__file__).parent / "static"

# control -> (a bad value as the panel holds it, the same value as the config field holds it)
INVALID: dict[str, tuple[Any, Any]] = {
    "rank": (0, 0),
    "alpha": (0.0, 0.0),
    "dropout": (1.0, 1.0),
    "target_modules": ("q_proj[", "q_proj["),  # one name with a regex character: a broken regular expression
    "learning_rate": (1.0, 1.0),
    "schedule": ("step", "step"),
    "warmup_steps": (-1, -1),
    "batch_size": (0, 0),
    "grad_accum_steps": (0, 0),
    "max_steps": (-5, -5),
    "epochs": (0, 0),
    "precision": ("fp8", "fp8"),
    "base": ("2-bit", "2-bit"),
    "early_stopping": (-1, {"patience": -1}),  # the panel builds EarlyStopping(patience=-1)
    "seed": (-1, -1),
}


def _control(name: str) -> controls.Control:
    return next(c for c in CONTROLS if c.name == name)


def _config_message(config: type, field: str, value: Any) -> str:
    with pytest.raises(ValueError) as info:
        config(**{field: value})
    return str(info.value)


@pytest.fixture(scope="module")
def dash() -> LoRADashboard:
    data = torch.randint(0, 128, (54, 16), generator=torch.Generator().manual_seed(0))  # ~10% held out
    return LoRADashboard(
        model=tiny_llama(),
        train_data=data,
        lora=LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj")),
        train=TrainConfig(max_steps=12, batch_size=4, warmup_steps=2, device="cpu", output_dir="unused"),
    )


def test_every_control_has_an_invalid_case() -> None:
    assert set(INVALID) == set(CONTROL_NAMES)  # a new control needs its bad value here


@pytest.mark.parametrize("name", list(INVALID))
def test_the_panel_shows_the_configs_own_message(dash: LoRADashboard, name: str) -> None:
    control = _control(name)
    panel_value, config_value = INVALID[name]
    expected = _config_message(control.config, control.field, config_value)
    before = getattr(dash.panel, name)
    assert dash.panel.errors == {}
    try:
        setattr(dash.panel, name, panel_value)  # what typing it in the browser does
        assert dash.panel.errors == {name: expected}
        with pytest.raises(ValueError) as refused:  # Train is refused with the same words
            asyncio.run(dash.run())
        assert expected in str(refused.value)
        assert dash.runs == []
    finally:
        setattr(dash.panel, name, before)
    assert dash.panel.errors == {}


def test_every_bad_control_is_flagged_at_once(dash: LoRADashboard) -> None:
    values = {**dash.panel.control_values(), **{n: v for n, (v, _) in INVALID.items()}}
    errors = validate_settings(values, lora=dash._lora0, train=dash._train0)
    assert set(errors) == set(CONTROL_NAMES)


def test_the_runs_context_is_checked_by_the_configs_methods(dash: LoRADashboard) -> None:
    with pytest.raises(ValueError) as fp16:
        TrainConfig(precision="fp16").check_device("cpu")
    assert validate_settings({"precision": "fp16"}, "cpu") == {"precision": str(fp16.value)}
    if torch.cuda.is_available():
        assert validate_settings({"precision": "fp16"}, "cuda") == {}
    n = dash.panel.summary["train_blocks"]
    assert n > 40
    with pytest.raises(ValueError) as too_big:
        TrainConfig(batch_size=n // 2 + 1, grad_accum_steps=2).check_data(n)
    dash.panel.grad_accum_steps = 2
    dash.panel.batch_size = n // 2 + 1
    try:
        assert dash.panel.errors == {"batch_size": str(too_big.value)}
        assert f"{2 * (n // 2 + 1)} sequences per step" in str(too_big.value) and f"{n} blocks" in str(
            too_big.value
        )
        dash.panel.batch_size = n // 2  # at most n sequences: one step fits
        assert dash.panel.errors == {}
    finally:
        dash.panel.batch_size, dash.panel.grad_accum_steps = 4, 1


# the values around every boundary the panel and the configs used to disagree on, and a few more
PROBES: dict[str, list[Any]] = {
    "learning_rate": [0.0, 1e-9, 3e-3, 0.5, 0.999, 1.0, 1.5, math.inf, math.nan, -1e-3],
    "warmup_steps": [-1, 0, 5, 11, 12, 13, 500],  # the run has max_steps=12
    "max_steps": [-1, 0, 1, 12],
    "epochs": [0, 1, 3],
    "alpha": [-1.0, 0.0, 1e-6, 16.0, math.inf],
    "dropout": [-0.1, 0.0, 0.5, 0.99, 1.0],
    "rank": [-1, 0, 1, 64],
    "seed": [-1, 0, 2**31],
    "schedule": [*SCHEDULES, "", "Cosine"],
    "precision": ["fp32", "bf16", "fp64", "FP32"],  # fp16 depends on the device: see the test above
    "target_modules": ["", "all-linear", "q_proj,v_proj", "q_proj[", ".*proj"],
}


@pytest.mark.parametrize("name", list(PROBES))
def test_the_panel_accepts_exactly_what_the_config_accepts(name: str) -> None:
    control = _control(name)
    base = {"lora": LoRAConfig(), "train": TrainConfig(max_steps=12, warmup_steps=0)}
    config = base["lora"] if control.config is LoRAConfig else base["train"]
    for value in PROBES[name]:
        try:
            dataclasses.replace(config, **{control.field: control.to_config(value)})
        except ValueError:
            accepted = False
        else:
            accepted = True
        flagged = validate_settings({name: value}, "cpu", **base)
        assert (flagged == {}) is accepted, (name, value, flagged)


def test_the_old_disagreements_are_settled() -> None:
    with pytest.raises(ValueError, match=r"learning_rate=1 .*\(0, 1\)"):
        TrainConfig(learning_rate=1)
    assert "learning_rate" in validate_settings({"learning_rate": 1.0})
    # warm-up as long as the run, or longer: accepted by both (the rate never reaches its peak)
    assert TrainConfig(max_steps=20, warmup_steps=20).warmup_steps == 20
    assert TrainConfig(max_steps=5).warmup_steps > 5  # a short trial run with the default warm-up
    assert validate_settings({"max_steps": 20, "warmup_steps": 20}) == {}


def test_a_subclass_rule_is_shown_under_its_control() -> None:
    class NoThirteen(TrainConfig):
        def __post_init__(self) -> None:
            super().__post_init__()
            if self.seed == 13:
                raise ValueError("TrainConfig.seed=13 is unlucky; pick another seed")

    errors = validate_settings({"seed": 13}, train=NoThirteen())
    assert errors == {"seed": "TrainConfig.seed=13 is unlucky; pick another seed"}


# --- the front end gets everything from Python ---------------------------------------------------------
def test_the_spec_trait_carries_the_table_and_pythons_choices() -> None:
    panel = DashboardPanel()
    specs = {s["name"]: s for s in panel.control_specs}
    assert list(specs) == list(CONTROL_NAMES) == list(DashboardPanel.CONFIG_TRAITS)
    assert specs["schedule"]["choices"] == list(SCHEDULES)
    assert specs["precision"]["choices"] == list(PRECISIONS)
    assert specs["target_modules"]["choices"] == list(controls.TARGET_PRESETS)
    assert {s["group"] for s in specs.values()} == {"LoRA", "Training"}
    assert all(
        s["label"] and s["help"] and s["kind"] in ("int", "float", "text", "select") for s in specs.values()
    )
    assert json.loads(json.dumps(panel.control_specs)) == panel.control_specs  # what the comm sends
    assert "control_specs" in panel.trait_names(sync=True)


def test_the_front_end_hard_codes_no_control_or_choice() -> None:
    js = (STATIC / "dashboard.js").read_text()
    assert 'model.get("control_specs")' in js
    for word in (*CONTROL_NAMES, *SCHEDULES, *PRECISIONS, "q_proj"):
        assert f'"{word}"' not in js, f"dashboard.js hard-codes {word!r}"
    dts = (STATIC / "dashboard.d.ts").read_text()
    assert "interface ControlSpec" in dts and "control_specs: ControlSpec[]" in dts


def test_each_control_is_a_documented_trait_typed_and_defaulted_by_its_config() -> None:
    panel = DashboardPanel()
    kinds = {"int": int, "float": float, "text": str, "select": str}
    for c in CONTROLS:
        trait = panel.traits()[c.name]
        assert trait.metadata.get("sync") is True and trait.help == c.help
        default = getattr(c.config(), c.field)
        assert getattr(panel, c.name) == c.display(default)
        assert type(getattr(panel, c.name)) is kinds[c.kind]


def test_number_hints_agree_with_the_configs() -> None:
    for c in CONTROLS:
        if c.kind == "int" and c.min is not None:
            assert validate_settings({c.name: int(c.min)}) == {}, c.name
            assert c.name in validate_settings({c.name: int(c.min) - 1}), c.name


# --- both directions of the mapping ------------------------------------------------------------------
def test_configs_round_trip_through_the_controls() -> None:
    lora = LoRAConfig(r=16, alpha=32, dropout=0.1, target_modules=r"model\.layers\.[0-9]{1,2}\.self_attn\.q_proj",
                      use_rslora=True)  # fmt: skip
    train = TrainConfig(learning_rate=1e-3, schedule="linear", warmup_steps=3, max_steps=None, epochs=2,
                        precision="bf16", seed=7, eval_every=9, output_dir="elsewhere")  # fmt: skip
    values = values_from_configs(lora, train)
    assert values["max_steps"] == 0 and values["rank"] == 16 and values["schedule"] == "linear"
    assert to_configs(values, lora, train) == (lora, train)  # a regex with a comma survives unchanged
    changed = {**values, "rank": 2, "max_steps": 40, "target_modules": "q_proj, v_proj"}
    lora2, train2 = to_configs(changed, lora, train)
    assert (lora2.r, lora2.target_modules, lora2.use_rslora) == (2, ("q_proj", "v_proj"), True)
    assert (train2.max_steps, train2.eval_every, train2.output_dir) == (40, 9, "elsewhere")
    assert values_from_configs(lora2, train2) == {**changed, "target_modules": "q_proj,v_proj"}


def test_the_dashboard_maps_its_panel_through_the_table(dash: LoRADashboard) -> None:
    assert dash.panel.control_values() == values_from_configs(dash._lora0, dash._train0)
    dash.panel.learning_rate = 1e-2
    try:
        lora, train = dash.current_configs()
        assert train == dash._train0.replace(learning_rate=1e-2) and lora == dash._lora0
    finally:
        dash.panel.learning_rate = dash._train0.learning_rate


def test_a_control_must_name_a_real_field() -> None:
    with pytest.raises(ValueError, match=r"unknown control\(s\) \['lr'\]"):
        validate_settings({"lr": 1e-3})
    with pytest.raises(ValueError, match="has no field 'rnak'"):
        controls.Control("rnak", "rank", "int", LoRAConfig, "rnak", help="typo")
    with pytest.raises(ValueError, match="needs choices"):
        controls.Control("schedule", "schedule", "select", TrainConfig, "schedule", help="no choices")
