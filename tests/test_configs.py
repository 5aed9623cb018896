"""Every shipped config parses, says what its name says, and runs one ``fast_dev_run`` step on generated data."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI

import qat_lightning.cli
from qat_lightning import QuantizationCallback
from qat_lightning.cli import main
from qat_lightning.nn import fake_quantized_layers, is_prepared, quantizers
from tests.dataset_files import write_cifar10, write_image_folder, write_mnist

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
QUIET = ["--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def generated_data(config: dict, root: Path) -> list[str]:
    """Write small data of the config's dataset under ``root``; return the command-line overrides that use it."""
    data = config["data"]["class_path"].rsplit(".", 1)[-1]
    if data == "DigitsDataModule":  # bundled with scikit-learn
        return []
    if data == "GlyphsDataModule":  # generated: a few hundred images are enough for one step
        return [f"--data.init_args.{split}_size={n}" for split, n in (("train", 256), ("val", 64), ("test", 64))]
    if data in ("MNISTDataModule", "FashionMNISTDataModule"):
        write_mnist(root, name=data.removesuffix("DataModule"), n_train=24, n_test=8)
        return [f"--data.init_args.root={root}", "--data.init_args.download=false", "--data.init_args.val_size=0"]
    if data == "CIFAR10DataModule":
        write_cifar10(root, per_batch=4, n_test=4)
        return [
            f"--data.init_args.root={root}",
            "--data.init_args.download=false",
            "--data.init_args.verify_checksums=false",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=4",
        ]
    if data == "ImageFolderDataModule":
        write_image_folder(root, classes=("a", "b", "c"), per_class=2, size=36)
        return [
            f"--data.init_args.root={root}",
            "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=3",
            "--data.init_args.image_size=32",
            "--model.init_args.num_classes=3",
            "--model.init_args.backbone.init_args.num_classes=3",
        ]
    raise AssertionError(f"no generated data for {data}: add it here so that its configs are tested")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_and_matches_its_name(path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config"])
    assert exit_info.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(path.read_text())
    assert resolved["model"]["class_path"] == written["model"]["class_path"]
    assert resolved["data"]["class_path"] == written["data"]["class_path"]

    callbacks = {c["class_path"].rsplit(".", 1)[-1]: c["init_args"] for c in resolved["trainer"]["callbacks"] or []}
    bits = re.search(r"_(?:qat|ptq)(\d+)$", path.stem)
    if bits:
        assert int(bits.group(1)) == callbacks["QuantizationCallback"]["bits"]
    else:
        assert path.stem.endswith("fp32") and "QuantizationCallback" not in callbacks


def _quantization_args(config: dict) -> dict | None:
    callbacks = config["trainer"].get("callbacks") or []
    found = [c.get("init_args", {}) for c in callbacks if c["class_path"].endswith("QuantizationCallback")]
    return found[0] if found else None


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_runs_fast_dev_run_on_generated_data(path, tmp_path, monkeypatch):
    """One training and one validation batch, in the config's quantized phase: a QAT config trains that batch
    fake-quantized (its FP32 warmup set to 0), a PTQ config calibrates after it; both convert at fit end."""
    monkeypatch.chdir(tmp_path)  # checkpoints and logs land here
    config = yaml.safe_load(path.read_text())
    overrides = generated_data(config, tmp_path / "data")
    if "weights_path" in config["model"]["init_args"]["backbone"].get("init_args", {}):
        # Random init (the chain test below covers the checkpoint). jsonargparse 4.53 reads the dotted form
        # `--model.init_args.backbone.init_args.weights_path=null` of a nested argument as the string 'None'.
        overrides += ["--model.init_args.backbone", '{"init_args": {"weights_path": null}}']
    quantization = _quantization_args(config)
    mode = None if quantization is None else quantization.get("mode", "qat")
    if mode == "qat" and quantization.get("warmup_epochs", 1):
        assert len(config["trainer"]["callbacks"]) == 1, "the override below edits the config's only callback"
        overrides.append("--trainer.callbacks.init_args.warmup_epochs=0")
    runs: list[LightningCLI] = []

    class RecordedCLI(LightningCLI):
        def __init__(self, *args, **kwargs) -> None:
            runs.append(self)  # before the run, so a failing run is recorded too
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(qat_lightning.cli, "LightningCLI", RecordedCLI)
    main(["fit", "--config", str(path), "--trainer.fast_dev_run=true", *QUIET, *overrides])

    (cli,) = runs
    trainer, model = cli.trainer, cli.model
    assert trainer.global_step == 1
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    assert {"train/loss", "val/loss", "val/acc"} <= metrics.keys()
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    report_path = tmp_path / "quantized" / "conversion_report.json"
    if mode is None:
        assert not is_prepared(model) and not report_path.exists()
        return
    (callback,) = (c for c in trainer.callbacks if isinstance(c, QuantizationCallback))
    assert callback.quantized and callback.phase == ("qat_frozen" if mode == "ptq" else "qat")
    layers = dict(fake_quantized_layers(model))
    assert layers and {name for name, _ in layers.items()} == {p.name for p in callback.plan}
    assert all(q.calibrated for q in quantizers(model))
    assert {layer.weight_quantizer.config.bits for layer in layers.values()} >= {quantization["bits"]}
    inputs, _ = next(iter(trainer.datamodule.val_dataloader()))
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(inputs)).all()
    report = json.loads(report_path.read_text())
    assert report["failed"] == {} and set(report["fidelity"]) == {"pt2", "onnx"}
    for fidelity in report["fidelity"].values():
        assert math.isfinite(fidelity["relative_error"]) and 0 <= fidelity["agreement"] <= 1, fidelity


@pytest.mark.parametrize(
    ("name", "qat_configs"),
    [
        ("cifar10_resnet20", ("cifar10_resnet20_qat4.yaml", "cifar10_resnet20_qat2.yaml")),
        ("glyphs", ("glyphs_qat2.yaml",)),
    ],
)
def test_qat_configs_start_from_the_float_configs_checkpoint(name, qat_configs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    configs = Path(__file__).parents[1] / "configs"
    overrides = generated_data(yaml.safe_load((configs / f"{name}_fp32.yaml").read_text()), tmp_path / "data")
    short = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"]
    main(["fit", "--config", str(configs / f"{name}_fp32.yaml"), *short, *QUIET, *overrides])
    checkpoint = tmp_path / "checkpoints" / name / "fp32.ckpt"
    assert checkpoint.is_file()

    for qat_config in qat_configs:
        assert yaml.safe_load((configs / qat_config).read_text())["model"]["init_args"]["backbone"]["init_args"][
            "weights_path"
        ] == str(checkpoint.relative_to(tmp_path))
        main(["fit", "--config", str(configs / qat_config), "--trainer.fast_dev_run=true", *QUIET, *overrides])
