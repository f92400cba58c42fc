"""MemoryPlanner driven from Python (no browser), plus a JS smoke test of its view in headless Chromium."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import traitlets

from lora_widgets.lora.layers import LoRAConfig, apply_lora
from lora_widgets.memory.fit import GPUS, estimate_memory, known_models
from lora_widgets.widget.planner import _INPUTS, BARS, COMPONENTS, CSS_PATH, ESM_PATH, MemoryPlanner
from tests.helpers import tiny_llama

GiB = 1024**3


def test_defaults_compute_an_estimate_and_a_fit_table() -> None:
    planner = MemoryPlanner()
    assert planner.error == ""
    assert planner.models == known_models()
    expected = estimate_memory("SmolLM2-135M", LoRAConfig(r=16, alpha=32), 8, 512, "bfloat16")
    assert planner.estimate["total"] == expected.total
    assert [row["name"] for row in planner.gpus] == list(GPUS)
    for row in planner.gpus:
        assert row["fits"] == expected.fits(GPUS[row["name"]])


def test_every_trait_is_documented_and_assets_are_files() -> None:
    traits = MemoryPlanner.class_traits(sync=True)
    for name in (*_INPUTS, "models", "estimate", "gpus", "error"):
        assert traits[name].help, f"trait {name} has no help"
    assert isinstance(ESM_PATH, pathlib.Path) and ESM_PATH.name == "planner.js"
    assert isinstance(CSS_PATH, pathlib.Path) and CSS_PATH.name == "planner.css"
    # anywidget loaded the files' contents
    assert str(MemoryPlanner._esm) == ESM_PATH.read_text()
    assert str(MemoryPlanner._css) == CSS_PATH.read_text()


@pytest.fixture
def shell() -> Iterator[Any]:
    """An IPython shell, so that ``display()`` publishes display data (cleared afterwards)."""
    from IPython.core.interactiveshell import InteractiveShell

    existed = InteractiveShell.initialized()
    yield InteractiveShell.instance()
    if not existed:
        InteractiveShell.clear_instance()


def displayed(obj: Any) -> list[dict[str, Any]]:
    """The display data ``IPython.display.display(obj)`` publishes (through whichever protocol it uses)."""
    from IPython.display import display
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        display(obj)
    return [out.data for out in captured.outputs]


def test_display_shows_controls_and_figure_together(shell: Any) -> None:
    """Through IPython's display protocol, as a notebook shows it, under ipywidgets 7 (Colab's) and 8."""
    planner = MemoryPlanner()
    (data,) = displayed(planner)
    view = data["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == planner.widget.model_id
    assert planner.widget.children == (planner, planner.figure)


def test_publish_view_shows_a_widget_that_overrides_its_own_display(shell: Any) -> None:
    """A widget class whose ``_ipython_display_`` adds output (as the dashboard's static summary does)
    still shows its standard view first; a closed widget shows only its text."""
    import ipywidgets

    from lora_widgets.widget.view import publish_view

    class Annotated(ipywidgets.VBox):
        def _ipython_display_(self, **kwargs: Any) -> None:
            from IPython.display import display

            publish_view(self, **kwargs)
            display({"text/plain": "summary"}, raw=True)

    box = Annotated([ipywidgets.Label("x")])
    view, summary = displayed(box)
    assert view["application/vnd.jupyter.widget-view+json"]["model_id"] == box.model_id
    assert summary == {"text/plain": "summary"}
    box.close()
    from IPython.utils.capture import capture_output

    with capture_output() as captured:
        publish_view(box)
    assert [set(out.data) for out in captured.outputs] == [{"text/plain"}]


def test_bars_are_stacked_phases_and_match_the_estimate() -> None:
    planner = MemoryPlanner(model_name="Qwen2.5-0.5B")
    bars = planner.figure.marks[0]
    assert bars.type == "stacked"
    assert list(bars.x) == list(BARS) and list(bars.labels) == list(COMPONENTS)
    y = np.asarray(bars.y)  # [components, bars] in GiB
    assert y.shape == (len(COMPONENTS), len(BARS))
    est = planner.estimate
    phase_col = ["forward", "backward", "optimizer"].index(est["peak_phase"])
    assert y[:, phase_col].sum() == pytest.approx(est["total"] / GiB)
    assert y[:, 3].sum() == pytest.approx(est["naive_total"] / GiB)  # textbook sum
    assert "Qwen2.5-0.5B" in planner.figure.title


def test_controls_update_estimate_and_bars_in_place() -> None:
    planner = MemoryPlanner(model_name="Llama-3.2-3B", rank=32)
    bars = planner.figure.marks[0]
    assert planner.estimate["trainable_params"] == 9_175_040  # r=32 on q and v
    before = np.asarray(bars.y).copy()
    planner.rank = 8
    assert planner.figure.marks[0] is bars
    assert planner.estimate["trainable_params"] == 9_175_040 // 4
    assert not np.allclose(np.asarray(bars.y), before)

    totals = {}
    for name, value in [
        ("batch_size", 16),
        ("seq_len", 2048),
        ("gradient_checkpointing", True),
        ("precision", "mixed-bf16"),
        ("precision", "float32"),
        ("targets", "all-linear"),
    ]:
        previous = planner.estimate["total"]
        setattr(planner, name, value)
        totals[name] = planner.estimate["total"]
        assert totals[name] != previous, name
    assert totals["precision"] > 0 and planner.estimate["dtype"] == "float32"

    lora_total = planner.estimate["total"]
    planner.method = "qlora"
    assert (
        planner.estimate["frozen_weights"]
        < estimate_memory(
            "Llama-3.2-3B", LoRAConfig(r=8, target_modules="all-linear"), 16, 2048, "float32"
        ).frozen_weights
    )
    planner.method = "full"
    assert planner.estimate["trainable_params"] == planner.estimate["total_params"]
    assert planner.estimate["total"] > lora_total


def test_fit_table_follows_the_estimate() -> None:
    planner = MemoryPlanner(model_name="Llama-3.1-8B", method="full", batch_size=8, seq_len=2048)
    assert not any(row["fits"] for row in planner.gpus)
    planner.method = "qlora"
    planner.batch_size = 1
    planner.seq_len = 512
    assert all(row["fits"] for row in planner.gpus if row["capacity"] >= 24 * 10**9)


def test_bad_values_are_rejected_with_clear_errors() -> None:
    with pytest.raises(TypeError, match=r"unexpected keyword.*colour"):
        MemoryPlanner(colour="red")
    planner = MemoryPlanner()
    with pytest.raises(ValueError, match="rank=0"):
        planner.rank = 0
    with pytest.raises(traitlets.TraitError, match="batch_size=0"):
        planner.batch_size = 0
    with pytest.raises(ValueError, match="not one of"):
        planner.model_name = "GPT-5"
    with pytest.raises(traitlets.TraitError):
        planner.method = "dora"
    with pytest.raises(TypeError, match="LoRAConfig"):
        MemoryPlanner(lora={"r": 8})


def test_custom_config_and_model_are_offered() -> None:
    model = tiny_llama()
    planner = MemoryPlanner(model=model, batch_size=2, seq_len=64, method="full")
    assert planner.models[0] == planner.model_name and planner.model_name not in known_models()
    assert planner.estimate["total_params"] == sum(p.numel() for p in model.parameters())
    planner.model_name = "GPT-2"
    assert planner.estimate["total_params"] == 124_439_808
    with_adapters = MemoryPlanner(model=model, method="lora", rank=2)
    apply_lora(model, LoRAConfig(r=2))  # a model that already carries adapters is planned from its config
    assert MemoryPlanner(model=model, method="lora", rank=2).estimate == with_adapters.estimate
    assert MemoryPlanner(model="meta-llama/Llama-3.2-1B").model_name == "Llama-3.2-1B"
    by_config = MemoryPlanner(model=model.config, lora=LoRAConfig(r=4, target_modules="all-linear"))
    assert by_config.rank == 4 and by_config.targets == "all-linear"
    assert by_config.models[0] == by_config.model_name


def test_estimator_errors_are_shown_not_raised() -> None:
    planner = MemoryPlanner(model_name="GPT-2")
    planner._custom["broken"] = object()  # an unusable model: the error goes to the `error` trait
    planner.models = ["broken", *planner.models]
    planner.model_name = "broken"
    assert "model_or_config" in planner.error
    planner.model_name = "GPT-2"
    assert planner.error == ""


# ---------------------------------------------------------------------------------------------
# The view in a real browser, without Jupyter: a fake anywidget model drives planner.js.
# ---------------------------------------------------------------------------------------------

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><style>{css}</style></head><body>
<div id="root"></div>
<script type="module">
const state = {state};
const handlers = {{}};
window.sent = [];
const model = {{
  get: (k) => state[k],
  set: (k, v) => {{ window.sent.push([k, v]); window.update(k, v); }},  // Backbone fires change:k locally
  save_changes: () => {{}},
  on: (ev, f) => {{ (handlers[ev] = handlers[ev] || []).push(f); }},
  off: (ev, f) => {{ handlers[ev] = (handlers[ev] || []).filter((g) => g !== f); }},
}};
window.update = (k, v) => {{ state[k] = v; (handlers["change:" + k] || []).forEach((f) => f()); }};
const mod = await import("data:text/javascript;base64,{js}");
window.cleanup = mod.default.render({{ model, el: document.getElementById("root") }});
window.ready = true;
</script></body></html>"""


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install chromium)")
def test_view_renders_and_sends_changes_without_console_errors(tmp_path: pathlib.Path) -> None:
    import base64

    playwright = pytest.importorskip("playwright.sync_api")
    planner = MemoryPlanner(model_name="Llama-3.2-1B")
    state = {
        name: getattr(planner, name)
        for name in (*_INPUTS, "models", "estimate", "gpus", "error", "input_names")
    }
    js = base64.b64encode(ESM_PATH.read_bytes()).decode()
    page_file = tmp_path / "planner.html"
    page_file.write_text(_PAGE.format(css=CSS_PATH.read_text(), state=json.dumps(state), js=js))
    errors: list[str] = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"]
        )
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_file.as_uri())
        page.wait_for_function("window.ready === true", timeout=10_000)
        assert page.locator(".lw-planner-model option").count() == len(known_models())
        assert page.locator(".lw-planner-fit tbody tr").count() == len(GPUS)
        assert "Peak" in page.locator(".lw-planner-summary").inner_text()
        page.select_option(".lw-planner-rank", "64")
        page.select_option(".lw-planner-method", "full")
        page.fill(".lw-planner-batch", "0")  # clamped to 1
        page.dispatch_event(".lw-planner-batch", "change")
        page.check(".lw-planner-gc")
        sent = page.evaluate("window.sent")
        assert ["rank", 64] in sent and ["method", "full"] in sent
        assert ["batch_size", 1] in sent and ["gradient_checkpointing", True] in sent
        assert page.locator(".lw-planner-rank").is_disabled()  # full fine-tuning has no rank
        page.evaluate("window.update('error', 'boom')")
        assert page.locator(".lw-planner-error").inner_text() == "boom"
        page.evaluate("window.cleanup()")
        browser.close()
    assert errors == []


def test_mixed_precision_option() -> None:
    planner = MemoryPlanner(precision="mixed-fp16")
    assert planner.estimate["dtype"] == "float16" and planner.estimate["weight_dtype"] == "float32"
    planner.precision = "float16"
    assert planner.estimate["weight_dtype"] == "float16"
