"""dashboard.js renders the controls from Python's ``control_specs`` (headless Chromium, no Jupyter needed).

The ES module is loaded into a blank page with a stand-in for the anywidget model that holds a
``DashboardPanel``'s traits, so the test checks what the front end does with the table: one input per
control, the select options Python sent, numbers parsed before they reach a trait, and the configs'
messages shown beside their controls.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from ipywidgets import DOMWidget

from lora_widgets.training.config import PRECISIONS
from lora_widgets.training.schedules import SCHEDULES
from lora_widgets.widget import controls
from lora_widgets.widget.panel import DashboardPanel

pytestmark = pytest.mark.e2e

JS = Path(controls.__file__).parent / "static" / "dashboard.js"

# a stand-in for anywidget's model: get/set/save_changes/on/off/send over a plain object of traits
HARNESS = """
async ([src, traits]) => {
  const handlers = {};
  window.sets = [];
  const model = {
    get: (k) => traits[k],
    set: (k, v) => { traits[k] = v; window.sets.push([k, v]); },
    save_changes: () => {},
    on: (name, fn) => { (handlers[name] ||= []).push(fn); },
    off: () => {},
    send: () => {},
  };
  window.setTrait = (k, v) => { traits[k] = v; for (const fn of handlers[`change:${k}`] || []) fn(); };
  const url = URL.createObjectURL(new Blob([src], { type: "text/javascript" }));
  const widget = (await import(url)).default;
  const el = document.createElement("div");
  document.body.appendChild(el);
  widget.render({ model, el });
}
"""


def _traits() -> dict[str, Any]:
    """The panel's own synced traits (not those every DOM widget has), as the comm sends them."""
    panel = DashboardPanel()
    widget_traits = set(DOMWidget().trait_names())
    own = [n for n in panel.trait_names(sync=True) if n not in widget_traits and not n.startswith("_")]
    return json.loads(json.dumps({name: getattr(panel, name) for name in own}))


def test_the_panel_renders_pythons_table(browser_page: tuple[Any, list[str]]) -> None:
    page, errors = browser_page
    page.set_content("<html><body></body></html>")
    page.evaluate(HARNESS, [JS.read_text(), _traits()])

    names = page.eval_on_selector_all(".lw-dash [data-control]", "els => els.map(e => e.name)")
    assert names == list(controls.CONTROL_NAMES)
    legends = page.eval_on_selector_all(".lw-dash .lw-group legend", "els => els.map(e => e.textContent)")
    assert legends == ["LoRA", "Training"]
    for name, choices in (("schedule", SCHEDULES), ("precision", PRECISIONS)):
        options = page.eval_on_selector_all(f"select[name={name}] option", "els => els.map(e => e.value)")
        assert options == list(choices)
    listed = page.eval_on_selector_all(
        "input[name=target_modules]", "els => [...els[0].list.options].map(o => o.value)"
    )
    assert listed == list(controls.TARGET_PRESETS)
    assert page.input_value("input[name=max_steps]") == str(DashboardPanel().max_steps)

    box = page.locator("input[name=rank]")
    box.fill("16")
    box.dispatch_event("change")
    box.fill("2.5")  # not a whole number: flagged here, never sent to the Int trait
    box.dispatch_event("change")
    assert page.evaluate("window.sets") == [["rank", 16]]
    assert "whole number" in page.locator("input[name=rank] + .lw-error").inner_text()

    page.evaluate(
        "window.setTrait('errors', {learning_rate: 'TrainConfig.learning_rate=1.0 is invalid', settings: 'x'})"
    )
    assert (
        page.locator("input[name=learning_rate] + .lw-error").inner_text()
        == "TrainConfig.learning_rate=1.0 is invalid"
    )
    assert page.locator(".lw-error-general").inner_text() == "x"
    assert page.locator(".lw-train").is_disabled()
    assert errors == []
