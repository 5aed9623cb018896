"""Train-step time of our QAT against float and the stock QAT paths, measured side by side in one run.

A step is forward, cross-entropy backward and an SGD-momentum update on one fixed batch. Paths:

- ``fp32``: the float model, eager.
- ``ours_4bit`` / ``ours_8bit``: ``plan_quantization`` defaults, as ``QuantizationCallback(bits=b,
  share_inputs=False)`` builds them (each layer rounds its own input; 8-bit first/last layer, LSQ learned scales at
  <= 4 bits, observed ranges at 8 bits), eager, with the fused (inductor-compiled) fake quantization of
  ``qat_lightning.quant.fused`` on large tensors.
- ``ours_4bit_passes``: ``ours_4bit`` with ``set_fused(False)``: the vectorised passes only.
- ``ours_4bit_kept``: ``ours_4bit`` with ``set_recompute(False)``: each convolution keeps its rounded input for the
  backward pass instead of recomputing it from its source (``qat_lightning.nn.recomputed_input``).
- ``ours_4bit_shared``: ``ours_4bit`` with the callback's default input sharing and output roundings
  (``share_inputs=True``: shared inputs rounded at their producer, residual-add operands and pool inputs at 8 bits).
- ``ours_4bit_observed``: 4 bits with observed (moving-average) ranges instead of LSQ.
- ``ours_8bit_lsq``: 8 bits with LSQ scales.
- ``ours_4bit_frozen``: ``ours_4bit_observed`` after the observers are frozen (the last QAT epochs).
- ``fx``: stock ``torch.ao`` FX ``prepare_qat_fx`` with the x86 default QAT qconfig (8 bit; deprecated).
- ``pt2e``: torchao ``prepare_qat_pt2e`` with the X86 inductor quantizer on ``torch.export`` (when installed).
- ``brevitas``: Brevitas layers at 4 bits (digits CNN only, when installed: the ``bench`` extra).
- ``fp32_compiled``, ``ours_4bit_compiled``: the same models under ``torch.compile`` (inductor);
  compilation happens in the warm-up. ``--no-compiled`` leaves them out.

Paths are run round-robin after a warm-up and the median of each is reported; the ratios divide by the float
median of the same run. Peak memory is measured apart: a fresh Python process builds one path, resets its
peak resident set size (Linux ``/proc/self/clear_refs``) after one step (which compiles what is compiled) and
``malloc_trim`` (glibc keeps freed memory otherwise), and reports how far 3 more steps raise it: once with glibc's
defaults (``peak MiB``: what a training process sees, including freed blocks glibc keeps in its heap) and once with
every large block mapped on its own (``mmap MiB``: close to the peak of the tensors alive).
The last line is one JSON object; ``ratio_*`` keys are ResNet-20, batch 64, 4-bit default.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from qat_lightning import SmallCNN, set_fused
from qat_lightning.models import resnet20
from qat_lightning.nn import (
    apply_plan,
    find_input_producers,
    find_output_roundings,
    plan_quantization,
    round_outputs,
    set_observers_enabled,
    share_input_quantizers,
)
from qat_lightning.quant import set_recompute

Step = Callable[[], None]


UNFUSED = {"ours_4bit_passes"}
KEPT = {"ours_4bit_kept"}


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, fused: bool = True, kept: bool = False) -> Step:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step() -> None:
        set_fused(fused)
        set_recompute(not kept)
        try:
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        finally:
            set_fused(True)
            set_recompute(True)

    return step


def path_step(path: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Step:
    return train_step(model, x, y, fused=path not in UNFUSED, kept=path in KEPT)


def ours(
    model: nn.Module,
    x: torch.Tensor,
    bits: int,
    learned_scale: bool | None,
    frozen: bool = False,
    shared: bool = False,
) -> nn.Module:
    model = copy.deepcopy(model)
    apply_plan(model, plan_quantization(model, bits, first_last_bits=8, learned_scale=learned_scale))
    if shared:  # as ``QuantizationCallback(share_inputs=True)`` does
        share_input_quantizers(model, find_input_producers(model, (x,)))
        round_outputs(model, find_output_roundings(model, (x,)))
    model.train()
    with torch.no_grad():
        model(x)  # calibrate (and initialise LSQ scales) before the optimizer is built
    if frozen:
        set_observers_enabled(model, False)
    return model


def fx_qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    return prepare_qat_fx(copy.deepcopy(model).train(), get_default_qat_qconfig_mapping("x86"), (x,))


def split_reused_module_calls(graph: torch.fx.Graph) -> None:
    """Give each call of a module that runs more than once (ResNet-20's shared ``relu``) its own name.

    Export tags the second call's ``nn_module_stack`` entry with the same module name; torchao's quantizer then
    merges both calls into one pattern and fails ("Input partition has more than one output node"). Renaming
    ``relu`` to ``relu@1`` for the second call (export's own key for it) keeps them apart.
    """
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        key, (name, cls) = next(reversed(stack.items()))
        call = key.rpartition("@")[2]
        if "@" in key and call.isdigit():
            node.meta["nn_module_stack"] = {**stack, key: (f"{name}@{call}", cls)}


def pt2e_qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    exported = torch.export.export(copy.deepcopy(model).train(), (x,)).module()
    split_reused_module_calls(exported.graph)  # torchao's quantizer fails on a module called twice otherwise
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
    return prepare_qat_pt2e(exported, quantizer)


def brevitas_cnn(bits: int) -> nn.Module:
    import brevitas.nn as qnn

    return nn.Sequential(
        qnn.QuantIdentity(bit_width=8),
        qnn.QuantConv2d(1, 16, 3, padding=1, bias=False, weight_bit_width=8),
        nn.BatchNorm2d(16),
        qnn.QuantReLU(bit_width=bits),
        nn.MaxPool2d(2),
        qnn.QuantConv2d(16, 32, 3, padding=1, bias=False, weight_bit_width=bits),
        nn.BatchNorm2d(32),
        qnn.QuantReLU(bit_width=8),
        nn.MaxPool2d(2),
        nn.Flatten(),
        qnn.QuantLinear(128, 10, bias=True, weight_bit_width=8),
    )


def build_paths(
    name: str, model: nn.Module, x: torch.Tensor, only: str | None = None, compiled: bool = True
) -> dict[str, nn.Module]:
    builders: dict[str, Callable[[], nn.Module]] = {
        "fp32": lambda: copy.deepcopy(model),
        "ours_4bit": lambda: ours(model, x, 4, None),
        "ours_4bit_passes": lambda: ours(model, x, 4, None),
        "ours_4bit_kept": lambda: ours(model, x, 4, None),
        "ours_4bit_shared": lambda: ours(model, x, 4, None, shared=True),
        "ours_4bit_observed": lambda: ours(model, x, 4, False),
        "ours_4bit_frozen": lambda: ours(model, x, 4, False, frozen=True),
        "ours_8bit": lambda: ours(model, x, 8, None),
        "ours_8bit_lsq": lambda: ours(model, x, 8, True),
        "fx": lambda: fx_qat(model, x),
    }
    if importlib.util.find_spec("torchao") is not None:
        builders["pt2e"] = lambda: pt2e_qat(model, x)
    if name == "cnn" and importlib.util.find_spec("brevitas") is not None:
        builders["brevitas"] = lambda: brevitas_cnn(4)
    if compiled:
        for path in ("fp32", "ours_4bit"):
            if path in builders:
                builders[f"{path}_compiled"] = functools.partial(lambda build: torch.compile(build()), builders[path])
    return {path: build() for path, build in builders.items() if only in (None, path)}


SETUPS: dict[str, Callable[[], tuple[nn.Module, torch.Tensor]]] = {
    "resnet20": lambda: (resnet20(num_classes=10), torch.randn(64, 3, 32, 32)),
    "cnn": lambda: (SmallCNN(), torch.randn(64, 1, 8, 8)),
}


def peak_memory_mb(model_name: str, path: str, threads: int, mmap_all: bool = False) -> float:
    """Peak RSS growth (MiB) of 3 steps of one path, in a fresh process (``--memory-of MODEL PATH``).

    ``mmap_all``: glibc maps every block of 128 KiB or more on its own and unmaps it when freed
    (``MALLOC_MMAP_THRESHOLD_``), so RSS follows the tensors alive; by default it keeps freed blocks in its heap.
    """
    command = [sys.executable, __file__, "--memory-of", model_name, path, "--threads", str(threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"} if mmap_all else None
    out = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def report_memory(model_name: str, path: str, threads: int) -> None:
    torch.set_num_threads(threads)
    model, x = SETUPS[model_name]()
    y = torch.randint(0, 10, (x.shape[0],))
    step = path_step(path, build_paths(model_name, model.train(), x, only=path)[path], x, y)
    step()  # compiles what is compiled, outside the measured steps
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand the freed heap back, so the 3 steps must raise RSS again
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM, the peak RSS, to the current RSS
    for _ in range(3):
        step()
    print((_status_kib("VmHWM") - before) / 1024)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def measure(paths: dict[str, nn.Module], x: torch.Tensor, y: torch.Tensor, rounds: int) -> dict[str, float]:
    steps = {name: path_step(name, model, x, y) for name, model in paths.items()}
    for step in steps.values():  # warm-up
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _ratio(summary: dict[str, float], key: str, path: str) -> float | None:
    """ResNet-20 ``path``'s ``key`` figure over float's, where both were measured."""
    ours, base = summary.get(f"resnet20_{path}_{key}"), summary.get(f"resnet20_fp32_{key}")
    return round(ours / base, 3) if ours is not None and base else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="timed steps per path (median reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-compiled", action="store_true", help="leave out the torch.compile rows")
    parser.add_argument("--memory-of", nargs=2, metavar=("MODEL", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.memory_of:
        report_memory(*args.memory_of, args.threads)
        return
    torch.set_num_threads(args.threads)
    summary: dict[str, float] = {}
    for name, setup in SETUPS.items():
        model, x = setup()
        y = torch.randint(0, 10, (x.shape[0],))
        paths = build_paths(name, model.train(), x, compiled=not args.no_compiled)
        medians = measure(paths, x, y, args.rounds)
        print(f"\n{name}, batch {x.shape[0]}, {args.threads} threads, median of {args.rounds} interleaved steps")
        print(f"{'path':<20}{'ms/step':>10}{'x fp32':>9}{'peak MiB':>10}{'mmap MiB':>10}")
        for path, seconds in medians.items():
            ratio = seconds / medians["fp32"]
            peak, mapped = (peak_memory_mb(name, path, args.threads, mmap_all) for mmap_all in (False, True))
            print(f"{path:<20}{seconds * 1e3:>10.1f}{ratio:>9.2f}{peak:>10.1f}{mapped:>10.1f}")
            summary[f"{name}_{path}_ratio"] = round(ratio, 3)
            summary[f"{name}_{path}_peak_mib"] = round(peak, 1)
            summary[f"{name}_{path}_mmap_peak_mib"] = round(mapped, 1)
    best_stock = min(summary[k] for k in ("resnet20_fx_ratio", "resnet20_pt2e_ratio") if k in summary)
    result = {
        "ratio_ours_vs_fp32": summary["resnet20_ours_4bit_ratio"],
        "ratio_ours_frozen_vs_fp32": summary["resnet20_ours_4bit_frozen_ratio"],
        "ratio_fx_vs_fp32": summary["resnet20_fx_ratio"],
        "ratio_pt2e_vs_fp32": summary.get("resnet20_pt2e_ratio"),
        "ours_below_best_stock": summary["resnet20_ours_4bit_ratio"] < best_stock,
        "ratio_ours_compiled_vs_fp32_compiled": (
            round(summary["resnet20_ours_4bit_compiled_ratio"] / summary["resnet20_fp32_compiled_ratio"], 3)
            if "resnet20_ours_4bit_compiled_ratio" in summary
            else None
        ),
        "peak_ratio_ours_vs_fp32": _ratio(summary, "peak_mib", "ours_4bit"),
        "mmap_peak_ratio_ours_vs_fp32": _ratio(summary, "mmap_peak_mib", "ours_4bit"),
        "mmap_peak_ratio_ours_shared_vs_fp32": _ratio(summary, "mmap_peak_mib", "ours_4bit_shared"),
        **summary,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
