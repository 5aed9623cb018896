"""Int8 inference: our converted files in their runtimes vs FP32 eager and the stock int8 paths, side by side.

Models: ResNet-20 (CIFAR-shaped, 3x32x32) and torchvision's ResNet-18 (3x64x64 by default), batch 1 and 64.
Paths, all on CPU with 2 threads, timed in the same process with interleaved rounds (medians):

- ``fp32``: the float model in eager mode.
- ours, from one ``qat_lightning.convert_model`` of the 8-bit fake-quant model (pt2, onnx, x86, executorch):
  ``ours_ort`` / ``ours_openvino``: the ONNX QDQ file in ONNX Runtime / OpenVINO; ``ours_x86``: the AOTInductor
  package (oneDNN int8 kernels); ``ours_executorch``: the XNNPACK ``.pte`` (int8 kernels only where exact);
  ``ours_pt2``: the ``.pt2`` reference program (portable, not fast).
- stock: ``fx_x86``: torch.ao FX ``prepare_fx`` -> calibrate -> ``convert_fx`` (deprecated); ``pt2e_compile``: torchao
  ``prepare_pt2e`` (X86InductorQuantizer) -> calibrate -> ``convert_pt2e`` -> ``torch.compile`` with freezing;
  ``openvino_nncf``: OpenVINO's own int8, ``nncf.quantize`` of the ``openvino.convert_model`` float model.

Sizes: FP32 ``state_dict``; our ONNX, ``.pt2`` and x86 files; our packed 4-bit and 2-bit weight files. Weights are
random (speed and size do not depend on training); the fake-quant models are calibrated on random batches. The
last line is one JSON object. OpenVINO paths need ``pip install -e ".[bench]"``.

    python benchmarks/bench_int8.py [--rounds 5] [--quick] [--resnet18-size 64]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from qat_lightning import convert_model, save_packed_weights
from qat_lightning.convert.backends import backend
from qat_lightning.models import resnet20
from qat_lightning.nn import (
    apply_plan,
    find_input_producers,
    find_output_roundings,
    plan_quantization,
    round_outputs,
    share_input_quantizers,
)

warnings.filterwarnings("ignore")
THREADS = 2
STOCK = ("fx_x86", "pt2e_compile", "openvino_nncf")
OURS = ("ours_ort", "ours_openvino", "ours_x86", "ours_executorch", "ours_pt2")


def float_model(build: Callable[[], nn.Module]) -> nn.Module:
    """A float model with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = build()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def fake_quant_model(model: nn.Module, bits: int, batches: list[torch.Tensor]) -> nn.Module:
    """``model`` with fake quantization at ``bits`` (weights and inputs; shared inputs rounded where they are
    produced; residual-add operands and pool inputs rounded as the callback does), observers calibrated on
    ``batches``."""
    qat = copy.deepcopy(model)
    apply_plan(qat, plan_quantization(qat, bits, learned_scale=False))  # observed ranges: calibrated below
    share_input_quantizers(qat, find_input_producers(qat, (batches[0],)))  # as QuantizationCallback does
    round_outputs(qat, find_output_roundings(qat, (batches[0],)))
    qat.train()
    for m in qat.modules():  # keep the BatchNorm statistics: calibrate the quantizers only
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        for x in batches:
            qat(x)
    return qat.eval()


def fx_int8(model: nn.Module, engine: str, batches: list[torch.Tensor]) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    torch.backends.quantized.engine = engine
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping(engine), (batches[0],))
    with torch.no_grad():
        for x in batches:
            prepared(x)
    return convert_fx(prepared)


def _split_reused_module_calls(graph: torch.fx.Graph) -> None:
    """Give each call of a module that runs twice (torchvision's ``BasicBlock.relu``) its own name, without which
    torchao's X86InductorQuantizer fails on ResNets ("Input partition has more than one output node")."""
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            key, (name, cls) = next(reversed(stack.items()))
            if "@" in key and key.rpartition("@")[2].isdigit():
                node.meta["nn_module_stack"] = {**stack, key: (f"{name}@{key.rpartition('@')[2]}", cls)}


def pt2e_compiled(model: nn.Module, batches: list[torch.Tensor], example: torch.Tensor) -> Callable:
    import torch._inductor.config as inductor_config
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    exported = torch.export.export(copy.deepcopy(model), (example,)).module()
    _split_reused_module_calls(exported.graph)
    prepared = prepare_pt2e(exported, quantizer)
    with torch.no_grad():
        for x in batches:
            prepared(x[: len(example)] if len(x) >= len(example) else x.repeat(len(example), 1, 1, 1)[: len(example)])
    converted = convert_pt2e(prepared)
    inductor_config.freezing = True
    compiled = torch.compile(converted)
    with torch.no_grad():
        compiled(example)  # compile now, not inside the timed loop
    return compiled


def openvino_available() -> bool:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_runner(model_or_path, example: torch.Tensor | None = None, calibration=None) -> Callable:
    """An OpenVINO CPU runner (2 threads) of an ONNX file, or of ``model`` converted and NNCF-quantized."""
    import openvino as ov

    if calibration is not None:
        import nncf

        float_ir = ov.convert_model(model_or_path, example_input=example)
        model_or_path = nncf.quantize(float_ir, nncf.Dataset([x.numpy() for x in calibration]))
    compiled = ov.Core().compile_model(model_or_path, "CPU", {"INFERENCE_NUM_THREADS": THREADS})
    request = compiled.create_infer_request()
    return lambda x: torch.from_numpy(request.infer({0: x.numpy()})[compiled.output(0)])


def ort_runner(path: Path) -> Callable:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def file_size(save: Callable[[Path], object]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        save(path)
        return path.stat().st_size


def time_paths(paths: dict[str, Callable], x: torch.Tensor, rounds: int, iters: int) -> dict[str, dict[str, float]]:
    """Median and minimum latency (ms) per path; rounds interleave the paths so machine noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in paths}
    with torch.inference_mode():
        for fn in paths.values():
            for _ in range(2):
                fn(x)
        for _ in range(rounds):
            for name, fn in paths.items():
                for _ in range(iters):
                    start = time.perf_counter()
                    fn(x)
                    samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        "median": {n: statistics.median(s) for n, s in samples.items()},
        "min": {n: min(s) for n, s in samples.items()},
    }


def bench_model(
    label: str, build: Callable[[], nn.Module], shape: tuple[int, ...], batch_sizes: list[int], rounds: int, out: Path
) -> dict:
    model = float_model(build)
    calib = [torch.randn(64, *shape) for _ in range(4)]
    result: dict = {"latency_ms": {}, "min_latency_ms": {}, "size_bytes": {}, "fidelity": {}}
    qat8 = fake_quant_model(model, 8, calib)
    optional = ("x86", "executorch")
    formats = ("pt2", "onnx") + tuple(fmt for fmt in optional if backend(fmt).requirement() is None)
    checks = [((torch.randn(64, *shape),), None) for _ in range(2)]
    started = time.perf_counter()
    conversion = convert_model(qat8, (calib[0],), out / label, formats=formats, check_batches=checks)
    result["convert_s"] = round(time.perf_counter() - started, 1)
    result["fidelity"] = {fmt: f.as_dict() for fmt, f in conversion.fidelity.items()}
    result["failed"] = conversion.failed
    ours = {"ours_ort": ort_runner(conversion.paths["onnx"]), "ours_pt2": backend("pt2").load(conversion.paths["pt2"])}
    for fmt in optional:
        if fmt in conversion.paths:
            ours[f"ours_{fmt}"] = backend(fmt).load(conversion.paths[fmt])
    stock: dict[str, Callable] = {"fx_x86": fx_int8(model, "x86", calib)}
    if openvino_available():
        ours["ours_openvino"] = openvino_runner(str(conversion.paths["onnx"]))
        stock["openvino_nncf"] = openvino_runner(copy.deepcopy(model), calib[0], calib)
    fp32_bytes = file_size(lambda p: torch.save(model.state_dict(), p))
    result["size_bytes"] = {
        "fp32": fp32_bytes,
        **{f"ours_{k}": conversion.sizes[p] for k, p in conversion.paths.items()},
    }
    result["size_bytes"]["packed4"] = file_size(lambda p: save_packed_weights(fake_quant_model(model, 4, calib), p))
    result["size_bytes"]["packed2"] = file_size(lambda p: save_packed_weights(fake_quant_model(model, 2, calib), p))
    result["size_bytes"]["fx_x86_int8"] = file_size(lambda p: torch.save(stock["fx_x86"].state_dict(), p))
    for batch in batch_sizes:
        x = torch.randn(batch, *shape)
        paths = {"fp32": model, **ours, **stock, "pt2e_compile": pt2e_compiled(model, calib, x)}
        iters = 20 if batch == 1 else 3
        timings = time_paths(paths, x, rounds, iters)
        result["latency_ms"][f"batch{batch}"] = timings["median"]
        result["min_latency_ms"][f"batch{batch}"] = timings["min"]
        line = ", ".join(f"{k} {v:.2f} ms" for k, v in timings["median"].items())
        print(f"{label} batch {batch}: {line}", flush=True)
    print(f"{label} sizes (bytes): " + ", ".join(f"{k} {v}" for k, v in result["size_bytes"].items()), flush=True)
    return result


def _summary(result: dict) -> dict:
    out = {}
    for batch, latency in result["latency_ms"].items():
        stock = {k: v for k, v in latency.items() if k in STOCK}
        ours = {k: v for k, v in latency.items() if k in OURS}
        best_stock, best_ours = min(stock, key=stock.get), min(ours, key=ours.get)
        out[batch] = {
            "fastest_ours": best_ours,
            "fastest_stock": best_stock,
            "ours_vs_fp32": round(latency["fp32"] / latency[best_ours], 2),
            "stock_vs_fp32": round(latency["fp32"] / latency[best_stock], 2),
            "ours_vs_fastest_stock": round(latency[best_stock] / latency[best_ours], 3),
        }
    sizes = result["size_bytes"]
    out["size_vs_fp32"] = {k: round(v / sizes["fp32"], 4) for k, v in sizes.items() if k != "fp32"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per configuration")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 at batch 64 only, 2 rounds")
    parser.add_argument("--resnet18-size", type=int, default=64, help="input side of torchvision's ResNet-18")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    rounds = 2 if args.quick else args.rounds
    started = time.perf_counter()
    side = args.resnet18_size
    with tempfile.TemporaryDirectory() as tmp:
        batches = [64] if args.quick else [1, 64]
        results = {"resnet20": bench_model("resnet20", resnet20, (3, 32, 32), batches, rounds, Path(tmp))}
        if not args.quick:
            build = lambda: torchvision.models.resnet18(num_classes=1000)  # noqa: E731
            results["resnet18"] = bench_model("resnet18", build, (3, side, side), batches, rounds, Path(tmp))
    summary = {label: _summary(r) for label, r in results.items()}
    for label, s in summary.items():
        for batch, row in s.items():
            if batch.startswith("batch"):
                print(
                    f"{label} {batch}: fastest ours {row['fastest_ours']} {row['ours_vs_fp32']}x FP32; fastest stock "
                    f"{row['fastest_stock']} {row['stock_vs_fp32']}x; ours / stock {row['ours_vs_fastest_stock']}x"
                )
    print(
        json.dumps(
            {
                "summary": summary,
                "threads": THREADS,
                "torch": torch.__version__,
                "cpu": _cpu_name(),
                "runtime_s": round(time.perf_counter() - started, 1),
                "results": results,
            }
        )
    )


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
