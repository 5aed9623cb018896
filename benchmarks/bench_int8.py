"""Int8 inference: our converted file vs FP32 eager and the stock PyTorch int8 paths, side by side.

Models: ResNet-20 (CIFAR-shaped, 3x32x32) at batch 1 and 64, and the digits CNN (1x8x8) at batch 64.
Paths, all on CPU with 2 threads, timed in the same process with interleaved rounds (medians):

- ``fp32``: the float model in eager mode.
- ``ours``: ``qat_lightning.convert_model`` of the 8-bit fake-quant model, loaded with ``torch.jit.load``.
- ``fx_x86`` / ``fx_onednn``: torch.ao FX ``prepare_fx`` -> calibrate -> ``convert_fx`` with the x86 (default)
  or oneDNN quantized engine, run as the converted GraphModule (deprecated stock path).
- ``pt2e_compile``: torchao ``prepare_pt2e`` (X86InductorQuantizer) -> calibrate -> ``convert_pt2e`` ->
  ``torch.compile`` with inductor freezing (skipped when torchao is missing).

Sizes: FP32 ``state_dict``; our int8 TorchScript file; the FX model scripted and saved; our packed 4-bit and
2-bit weight files. Weights are random (speed and size do not depend on training); the fake-quant models are
calibrated on random batches. The last line is one JSON object; its headline keys are for ResNet-20 at
batch 64.

    python benchmarks/bench_int8.py [--rounds 5] [--quick]
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
from torch import nn

from qat_lightning import SmallCNN, convert_model, save_packed_weights
from qat_lightning.convert.int8 import split_reused_module_calls
from qat_lightning.nn import apply_plan, plan_quantization

warnings.filterwarnings("ignore")
THREADS = 2


def resnet20() -> nn.Module:
    """``qat_lightning.models.resnet20`` when available, else the same network built here."""
    try:
        from qat_lightning.models import resnet20 as library_resnet20

        return library_resnet20()
    except ImportError:
        from torchvision.models.resnet import BasicBlock, conv1x1

        class CifarResNet20(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
                self.bn1 = nn.BatchNorm2d(16)
                self.relu = nn.ReLU(inplace=True)
                stages, inplanes = [], 16
                for planes, stride in ((16, 1), (32, 2), (64, 2)):
                    down = None
                    if stride != 1 or inplanes != planes:
                        down = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
                    blocks = [BasicBlock(inplanes, planes, stride, down), BasicBlock(planes, planes)]
                    stages.append(nn.Sequential(*blocks, BasicBlock(planes, planes)))
                    inplanes = planes
                self.layer1, self.layer2, self.layer3 = stages
                self.avgpool = nn.AdaptiveAvgPool2d(1)
                self.fc = nn.Linear(64, 10)

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                x = self.relu(self.bn1(self.conv1(x)))
                x = self.layer3(self.layer2(self.layer1(x)))
                return self.fc(torch.flatten(self.avgpool(x), 1))

        return CifarResNet20()


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
    """``model`` with fake quantization at ``bits`` (weights and inputs), observers calibrated on ``batches``."""
    qat = copy.deepcopy(model)
    apply_plan(qat, plan_quantization(qat, bits))
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


def pt2e_compiled(model: nn.Module, batches: list[torch.Tensor], example: torch.Tensor) -> Callable | None:
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        return None
    import torch._inductor.config as inductor_config

    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    exported = torch.export.export(copy.deepcopy(model), (example,)).module()
    # torchao's quantizer rejects a module called twice (torchvision BasicBlock.relu); apply the same metadata
    # fix as our converter so that the stock path runs at all (it changes no kernel and no quantization point).
    split_reused_module_calls(exported.graph)
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
    result: dict = {"latency_ms": {}, "size_bytes": {}}
    qat8 = fake_quant_model(model, 8, calib)
    conversion = convert_model(qat8, (calib[0],), out / label, calibration_inputs=[(x,) for x in calib[1:]])
    ours = torch.jit.load(str(conversion.int8_path))
    x_check = torch.randn(256, *shape)
    with torch.no_grad():
        same = (ours(x_check).argmax(1) == qat8(x_check).argmax(1)).float().mean().item()
    result["ours_vs_fake_quant_agreement"] = same
    qat4 = fake_quant_model(model, 4, calib)
    ours4 = torch.jit.load(str(convert_model(qat4, (calib[0],), out / f"{label}_w4", packed=False).int8_path))
    fx = {engine: fx_int8(model, engine, calib) for engine in ("x86", "onednn")}
    torch.backends.quantized.engine = "x86"

    result["size_bytes"] = {
        "fp32": file_size(lambda p: torch.save(model.state_dict(), p)),
        "ours_int8": conversion.sizes[conversion.int8_path],
        "fx_x86_int8": file_size(lambda p: torch.jit.save(torch.jit.trace(fx["x86"], calib[0]), str(p))),
        "packed4": file_size(lambda p: save_packed_weights(qat4, p)),
        "packed2": file_size(lambda p: save_packed_weights(fake_quant_model(model, 2, calib), p)),
    }
    for batch in batch_sizes:
        x = torch.randn(batch, *shape)
        started = time.perf_counter()
        compiled = pt2e_compiled(model, calib, x)
        compile_s = time.perf_counter() - started

        def fx_x86(t: torch.Tensor) -> torch.Tensor:
            torch.backends.quantized.engine = "x86"
            return fx["x86"](t)

        def fx_onednn(t: torch.Tensor) -> torch.Tensor:
            torch.backends.quantized.engine = "onednn"
            return fx["onednn"](t)

        paths = {"fp32": model, "ours": ours, "ours_w4a4": ours4, "fx_x86": fx_x86, "fx_onednn": fx_onednn}
        if compiled is not None:
            paths["pt2e_compile"] = compiled
        iters = 20 if batch == 1 else 3
        timings = time_paths(paths, x, rounds, iters)
        torch.backends.quantized.engine = "x86"
        latency = timings["median"]
        result["latency_ms"][f"batch{batch}"] = latency
        result.setdefault("min_latency_ms", {})[f"batch{batch}"] = timings["min"]
        result.setdefault("pt2e_compile_s", {})[f"batch{batch}"] = round(compile_s, 1)
        print(f"{label} batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in latency.items()), flush=True)  # noqa: T201
    sizes = result["size_bytes"]
    print(f"{label} sizes (bytes): " + ", ".join(f"{k} {v}" for k, v in sizes.items()), flush=True)  # noqa: T201
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds per configuration")
    parser.add_argument("--quick", action="store_true", help="ResNet-20 at batch 64 only, 2 rounds")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    rounds = 2 if args.quick else args.rounds
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        batches = [64] if args.quick else [1, 64]
        results = {"resnet20": bench_model("resnet20", resnet20, (3, 32, 32), batches, rounds, Path(tmp))}
        if not args.quick:
            results["digits_cnn"] = bench_model("digits_cnn", SmallCNN, (1, 8, 8), [64], rounds, Path(tmp))

    rn = results["resnet20"]
    lat, size, fastest = rn["latency_ms"]["batch64"], rn["size_bytes"], rn["min_latency_ms"]["batch64"]
    stock = {k: v for k, v in lat.items() if k.startswith(("fx_", "pt2e_"))}
    best_stock = min(stock, key=stock.get)
    for label, r in results.items():
        for batch, lat_b in r["latency_ms"].items():
            stock_b = min(v for k, v in lat_b.items() if k.startswith(("fx_", "pt2e_")))
            print(  # noqa: T201
                f"{label} {batch}: ours {lat_b['fp32'] / lat_b['ours']:.2f}x FP32, "
                f"{stock_b / lat_b['ours']:.2f}x the fastest stock path"
            )
    summary = {
        "speedup_vs_fp32": round(lat["fp32"] / lat["ours"], 3),
        "speedup_vs_best_stock": round(lat[best_stock] / lat["ours"], 3),
        "best_stock": best_stock,
        "size_ratio_int8": round(size["ours_int8"] / size["fp32"], 4),
        "size_ratio_packed4": round(size["packed4"] / size["fp32"], 4),
        "size_ratio_packed2": round(size["packed2"] / size["fp32"], 4),
        "size_ratio_fx_int8": round(size["fx_x86_int8"] / size["fp32"], 4),
        "from_min_latency": {  # minimums are less sensitive to other jobs on a shared machine
            "speedup_vs_fp32": round(fastest["fp32"] / fastest["ours"], 3),
            "speedup_vs_best_stock": round(min(v for k, v in fastest.items() if k in stock) / fastest["ours"], 3),
        },
        "model": "resnet20 CIFAR 3x32x32, batch 64",
        "threads": THREADS,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "runtime_s": round(time.perf_counter() - started, 1),
        "results": results,
    }
    print(json.dumps(summary))  # noqa: T201


if __name__ == "__main__":
    main()
