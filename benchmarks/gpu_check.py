"""One-command GPU check: the ``cuda``-marked tests, then QAT step time vs float step time on the GPU.

    python benchmarks/gpu_check.py            # tests + timing (a few minutes on a current card)
    python benchmarks/gpu_check.py --no-tests # timing only

1. Prints the card (name, compute capability, memory), torch and CUDA versions.
2. Runs ``pytest -m cuda tests`` (fit, resume, per-bit-width metrics and conversion on ``cuda`` under ``32-true``
   and ``16-mixed``, see ``tests/test_cuda.py``) and reports its summary line and duration.
3. Times training steps of ResNet-20 (CIFAR-shaped input, batch 128): the float model and the 4-bit QAT model
   that ``QuantizationCallback(bits=4)`` builds (8-bit first/last layer, LSQ scales at 4 bits, observers on),
   each at ``32-true`` (float32; PyTorch's default TF32 settings) and ``16-mixed`` (``torch.autocast`` float16 and
   a ``GradScaler``, as Lightning runs it). A step is forward, cross-entropy, backward and an SGD-momentum update
   on one fixed batch, timed between ``torch.cuda.synchronize()`` calls. The four configurations run
   round-robin after a warm-up; the median of each is reported with the QAT / float ratio per precision.

The last line printed is one JSON object with everything above. Exit status: 0 when the tests pass (or are not
run), 1 when they fail, 2 when there is no CUDA GPU (nothing is run).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning.models import resnet20
from qat_lightning.nn import apply_plan, plan_quantization

ROOT = Path(__file__).resolve().parents[1]
PRECISIONS = ("32-true", "16-mixed")
NO_GPU_EXIT = 2

Step = Callable[[], None]


def card_info() -> dict[str, Any]:
    """Name, compute capability and memory (GiB) of CUDA device 0, with the torch and CUDA versions."""
    props = torch.cuda.get_device_properties(0)
    return {
        "card": props.name,
        "capability": f"{props.major}.{props.minor}",
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn_tf32": torch.backends.cudnn.allow_tf32,
        "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
    }


def run_tests(extra: list[str]) -> dict[str, Any]:
    """``pytest -m cuda tests`` in the repository root: return code, last summary line, seconds."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests", *extra]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    print(output[-8000:])
    lines = [line.strip("= ") for line in output.splitlines() if line.strip()]
    summary = next((line for line in reversed(lines) if " in " in line and ("passed" in line or "failed" in line)), "")
    return {"returncode": done.returncode, "summary": summary or (lines[-1] if lines else ""), "seconds": seconds}


def qat_model(model: nn.Module, x: torch.Tensor, bits: int = 4) -> nn.Module:
    """A copy of ``model`` fake-quantized as ``QuantizationCallback(bits=bits)`` does, calibrated on ``x``."""
    model = copy.deepcopy(model)
    apply_plan(model, plan_quantization(model, bits, first_last_bits=8))
    model.train()
    with torch.no_grad():
        model(x)  # the first batch sets the scales (and initialises the LSQ ones), as in training
    return model


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> Step:
    """One optimizer step of ``model`` on ``(x, y)`` at ``precision`` (``"32-true"`` or ``"16-mixed"``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"`precision` must be one of {PRECISIONS}, got {precision!r}.")
    device = x.device.type
    mixed = precision == "16-mixed"
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device, enabled=mixed)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.float16, enabled=mixed):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_step_times(steps: dict[str, Step], device: torch.device, rounds: int, warmup: int) -> dict[str, float]:
    """Median seconds per step of each entry of ``steps``, timed round-robin after ``warmup`` steps each."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"`rounds` must be >= 1 and `warmup` >= 0, got {rounds} and {warmup}.")
    for step in steps.values():
        for _ in range(warmup):
            step()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            _synchronize(device)
            start = time.perf_counter()
            step()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def time_qat_vs_float(
    device: torch.device, batch: int = 128, rounds: int = 50, warmup: int = 10, model: nn.Module | None = None
) -> dict[str, dict[str, float]]:
    """``{precision: {"float_ms", "qat_ms", "ratio"}}``: ResNet-20 (or ``model``), ``(batch, 3, 32, 32)`` inputs."""
    torch.manual_seed(0)
    float_model = (model if model is not None else resnet20(num_classes=10)).to(device).train()
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    quantized = qat_model(float_model, x)
    steps: dict[str, Step] = {}
    for precision in PRECISIONS:
        steps[f"float/{precision}"] = train_step(copy.deepcopy(float_model), x, y, precision)
        steps[f"qat/{precision}"] = train_step(copy.deepcopy(quantized), x, y, precision)
    medians = median_step_times(steps, device, rounds, warmup)
    result = {}
    for precision in PRECISIONS:
        float_s, qat_s = medians[f"float/{precision}"], medians[f"qat/{precision}"]
        result[precision] = {"float_ms": float_s * 1e3, "qat_ms": qat_s * 1e3, "ratio": qat_s / float_s}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tests", action="store_true", help="skip the pytest run, time only")
    parser.add_argument("--rounds", type=int, default=50, help="timed steps per configuration (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per configuration first")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. '-x'")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing was run. Run it on a machine "
            f"with an NVIDIA GPU and a CUDA build of torch (this torch: {torch.__version__}, CUDA "
            f"{torch.version.cuda or 'none'}).",
            file=sys.stderr,
        )
        return NO_GPU_EXIT
    info = card_info()
    print(f"card: {info['card']} (compute {info['capability']}, {info['memory_gib']} GiB); torch {info['torch']}, "
          f"CUDA {info['cuda']}")  # fmt: skip
    report: dict[str, Any] = dict(info)
    status = 0
    if not args.no_tests:
        tests = run_tests(args.pytest_args.split())
        print(f"cuda tests: {tests['summary']} ({tests['seconds']:.0f} s)")
        report["tests"] = tests
        status = 0 if tests["returncode"] == 0 else 1
    timing = time_qat_vs_float(torch.device("cuda"), args.batch, args.rounds, args.warmup)
    print(f"\nResNet-20, batch {args.batch}, median of {args.rounds} interleaved steps on {info['card']}")
    print(f"{'precision':<10}{'float ms':>10}{'QAT ms':>10}{'QAT/float':>11}")
    for precision, row in timing.items():
        print(f"{precision:<10}{row['float_ms']:>10.2f}{row['qat_ms']:>10.2f}{row['ratio']:>11.2f}")
    report["resnet20"] = {"batch": args.batch, "rounds": args.rounds, **timing}
    print(json.dumps(report))
    return status


if __name__ == "__main__":
    sys.exit(main())
