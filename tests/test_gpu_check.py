"""``benchmarks/gpu_check.py`` on a machine without a GPU: its refusal, and its timing logic on the CPU."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import nn

from qat_lightning.nn import is_prepared, quantizers

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"


def load_gpu_check() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the behaviour without a GPU")
def test_without_a_gpu_it_exits_2_with_a_clear_message(capsys):
    assert gpu_check.main([]) == gpu_check.NO_GPU_EXIT == 2  # the script's exit status (`sys.exit(main())`)
    out, err = capsys.readouterr()
    assert "no CUDA GPU here (torch.cuda.is_available() is False); nothing was run" in err
    assert out == ""  # neither the tests nor the timing started


def test_median_step_times_warms_up_then_times_round_robin(monkeypatch):
    now = [0.0]  # a fake perf_counter, which each timed step advances by its own duration
    monkeypatch.setattr(gpu_check.time, "perf_counter", lambda: now[0])
    durations = {"a": iter([5.0, 1.0, 2.0, 9.0]), "b": iter([3.0, 3.0, 4.0, 100.0])}
    calls: list[str] = []

    def step(name: str):
        def run() -> None:
            calls.append(name)
            if calls.count(name) > 2:  # the first 2 calls of each are the warm-up
                now[0] += next(durations[name])

        return run

    medians = gpu_check.median_step_times({"a": step("a"), "b": step("b")}, torch.device("cpu"), rounds=4, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 4
    assert medians == {"a": 3.5, "b": 3.5}  # medians of (5, 1, 2, 9) and (3, 3, 4, 100)
    with pytest.raises(ValueError, match="`rounds` must be >= 1"):
        gpu_check.median_step_times({}, torch.device("cpu"), rounds=0, warmup=0)


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_train_step_updates_the_model_at_each_precision(precision):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 1, 2, 3])
    before = [p.detach().clone() for p in model.parameters()]
    gpu_check.train_step(model, x, y, precision)()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    with pytest.raises(ValueError, match="`precision` must be one of"):
        gpu_check.train_step(model, x, y, "bf16-true")


def test_time_qat_vs_float_reports_both_precisions_and_their_ratio():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)
    )
    quantized = gpu_check.qat_model(model, torch.randn(2, 3, 32, 32))
    assert is_prepared(quantized) and not is_prepared(model)
    assert all(q.calibrated for q in quantizers(quantized))
    result = gpu_check.time_qat_vs_float(torch.device("cpu"), batch=2, rounds=2, warmup=1, model=model)
    assert set(result) == {"32-true", "16-mixed"}
    for row in result.values():
        assert row["float_ms"] > 0 and row["qat_ms"] > 0
        assert row["ratio"] == pytest.approx(row["qat_ms"] / row["float_ms"])
