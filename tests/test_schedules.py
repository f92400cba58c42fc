"""Learning-rate schedules: values at known steps, agreement with transformers, validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lora_widgets.training.schedules import lr_at, lr_schedule


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_warmup_is_linear_from_zero(schedule: str) -> None:
    assert lr_at(0, 100, 1e-3, 10, schedule) == 0.0
    assert lr_at(5, 100, 1e-3, 10, schedule) == pytest.approx(5e-4)
    assert lr_at(10, 100, 1e-3, 10, schedule) == pytest.approx(1e-3)  # peak right after warm-up


def test_known_values() -> None:
    # constant stays at the peak
    assert lr_at(99, 100, 2e-3, 0, "constant") == 2e-3
    # linear: (T - s) / (T - w)
    assert lr_at(55, 100, 1.0, 10, "linear") == pytest.approx(45 / 90)
    assert lr_at(100, 100, 1.0, 10, "linear") == 0.0
    # cosine: half-way through the decay is half the peak, the end is zero
    assert lr_at(55, 100, 1.0, 10, "cosine") == pytest.approx(0.5)
    assert lr_at(10 + 30, 100, 1.0, 10, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 3)))
    assert lr_at(100, 100, 1.0, 10, "cosine") == pytest.approx(0.0)


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_matches_transformers_schedulers(schedule: str) -> None:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    total, warmup, base = 57, 7, 3e-3
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    if schedule == "constant":
        sched = get_constant_schedule_with_warmup(opt, warmup)
    elif schedule == "linear":
        sched = get_linear_schedule_with_warmup(opt, warmup, total)
    else:
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    theirs = []
    for _ in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    np.testing.assert_allclose(lr_schedule(total, base, warmup, schedule), theirs, rtol=1e-12, atol=1e-15)


def test_preview_is_the_pure_function() -> None:
    curve = lr_schedule(40, 1e-2, 4, "cosine")
    assert curve.shape == (40,)
    assert curve.dtype == np.float64
    assert [lr_at(s, 40, 1e-2, 4, "cosine") for s in range(40)] == curve.tolist()
    assert curve.max() == pytest.approx(1e-2)
    assert np.all(np.diff(curve[4:]) <= 0)  # non-increasing after warm-up


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"schedule": "step"}, "schedule"),
        ({"total_steps": 0}, "total_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"base_lr": float("nan")}, "base_lr"),
        ({"step": -1}, "step"),
    ],
)
def test_bad_arguments_name_the_field(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {
        "step": 0,
        "total_steps": 10,
        "base_lr": 1e-3,
        "warmup_steps": 0,
        "schedule": "cosine",
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        lr_at(**args)  # type: ignore[arg-type]
