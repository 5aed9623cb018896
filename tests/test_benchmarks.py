"""The benchmark scripts run: each imports, and the cheap ones finish a tiny run with a consistent JSON last line.

The scripts are not part of the package, so nothing else imports them; ``bench_recipe_cost.py`` once failed at
import for a session (a name it imported from ``bench_accuracy`` was gone) without a test noticing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


def _run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=BENCHMARKS, capture_output=True, text=True, timeout=timeout, check=False
    )


def _last_json(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_every_benchmark_script_imports():
    assert {"bench_accuracy", "bench_int8", "bench_qat_step", "bench_recipe_cost"} <= set(SCRIPTS)
    code = (
        "import importlib, sys\n"
        f"failed = {{}}\nfor name in {SCRIPTS!r}:\n"
        "    try:\n        importlib.import_module(name)\n"
        "    except Exception as err:\n        failed[name] = repr(err)\n"
        "print(failed)\nsys.exit(1 if failed else 0)\n"
    )
    result = _run("-c", code)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_recipe_cost_reports_each_epoch_and_its_ratio():
    result = _last_json(_run("bench_recipe_cost.py", "--epochs", "2", "--repeats", "1", "--batches", "5"))
    assert result["model"] == "digits_cnn" and result["repeats"] == 1
    assert sorted(k for k in result if k.startswith("epoch")) == ["epoch0", "epoch1"]
    for epoch in ("epoch0", "epoch1"):
        times = result[epoch]
        assert times["plain_s"] > 0 and times["full_s"] > 0
        # the printed times are rounded to milliseconds, the ratio is of the unrounded ones
        assert times["ratio"] == pytest.approx(times["full_s"] / times["plain_s"], rel=0.1)


def test_accuracy_quick_run_reports_every_method_of_the_subset():
    args = ("--quick", "--jobs", "digits_cnn", "--bits", "2", "--variants", "qat", "--threads", "1")
    run = _run("bench_accuracy.py", *args)
    result = _last_json(run)
    seed_lines = [line for line in run.stdout.splitlines() if line.startswith("[digits_cnn seed 0 done after")]
    assert len(seed_lines) == 1  # each seed's accuracies are printed when it ends, before the summary
    per_seed = json.loads(seed_lines[0].split("] ", 1)[1])
    assert {f"digits_cnn_{m}": a for m, a in per_seed.items()} == {
        k: v["runs"][0] for k, v in result.items() if k.startswith("digits_cnn_")
    }
    methods = {k.removeprefix("digits_cnn_") for k in result if k.startswith("digits_cnn_")}
    assert {"fp32", "ptq_naive_2", "ptq_2", "ptq_all_2", "qat_2"} <= methods
    assert methods <= {"fp32", "ptq_naive_2", "ptq_2", "ptq_all_2", "qat_2", "brevitas_qat_2"}
    for method in methods:
        entry = result[f"digits_cnn_{method}"]
        assert len(entry["runs"]) == 1 and entry["std"] == 0.0 and entry["mean"] == entry["runs"][0]
        assert 0.0 <= entry["mean"] <= 1.0
    assert result["digits_cnn_fp32"]["mean"] > 0.5  # 10 classes: a trained float model, not chance
    assert result["settings"]["quick"] is True and result["settings"]["bits"] == [2]
    assert result["settings"]["qat lr per bit width"] == {"digits_cnn": {"2": 1e-3}}  # JSON keys are strings


def test_accuracy_jobs_fine_tune_at_their_per_bit_width_lr():
    code = (
        "import bench_accuracy as b\n"
        "job = b.JOBS['digits_resnet20']\n"
        "print([job.lr_for(bits) for bits in (2, 4, 8)], [b.JOBS['digits_cnn'].lr_for(bits) for bits in (2, 4, 8)])\n"
    )
    result = _run("-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[0.003,", "0.0001,", "0.0001]", "[0.001,", "0.001,", "0.001]"]
