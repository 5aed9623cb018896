"""``python -m qat_lightning.convert`` / ``qat-lightning-convert``: convert a saved QAT checkpoint.

The model and data are built from the same LightningCLI config that trained them, the checkpoint is loaded
by ``Trainer.validate`` (which also reports the fake-quant model's validation metrics), then the files of
``convert_model`` are written::

    python -m qat_lightning.convert --config configs/digits_qat4.yaml \\
        --ckpt_path lightning_logs/version_0/checkpoints/last.ckpt [--output_dir DIR] [--formats pt2 onnx]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lightning.pytorch.cli import LightningCLI

from qat_lightning.convert.api import ConversionResult
from qat_lightning.convert.backends import BACKENDS, DEFAULT_FORMATS
from qat_lightning.convert.from_trainer import OUTPUT_SUBDIR, convert_from_trainer
from qat_lightning.nn import is_prepared


def default_output_dir(ckpt_path: Path) -> Path:
    """``<run>/quantized`` for Lightning's ``<run>/checkpoints/x.ckpt`` layout, else ``<ckpt dir>/quantized``."""
    run_dir = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
    return run_dir / OUTPUT_SUBDIR


def main(args: list[str] | None = None) -> ConversionResult:
    """Parse ``--ckpt_path``, ``--output_dir``, ``--formats``; every other argument goes to LightningCLI."""
    parser = argparse.ArgumentParser(
        prog="qat-lightning-convert",
        description="Convert a QAT checkpoint into int8 files (torch.export .pt2, ONNX QDQ, ...) and packed weights. "
        "All other arguments (--config, --model.*, --data.*) are those of the training command.",
    )
    parser.add_argument("--ckpt_path", type=Path, required=True, help="checkpoint saved during QAT")
    parser.add_argument("--output_dir", type=Path, default=None, help="default: <run dir>/quantized")
    parser.add_argument(
        "--formats", nargs="+", choices=tuple(BACKENDS), default=list(DEFAULT_FORMATS), help="files to write"
    )
    known, rest = parser.parse_known_args(args)
    if not known.ckpt_path.is_file():
        parser.error(f"--ckpt_path {known.ckpt_path} is not a file.")
    cli = LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        save_config_callback=None,
        args=[
            *rest,
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.enable_progress_bar=false",
        ],
    )
    cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=known.ckpt_path)
    if not is_prepared(cli.model):
        parser.error(
            f"{known.ckpt_path} holds no fake-quantized layers: it was saved before QAT started (during the FP32 "
            "warmup) or the config has no QuantizationCallback."
        )
    output_dir = known.output_dir or default_output_dir(known.ckpt_path)
    return convert_from_trainer(cli.trainer, cli.model, output_dir, known.formats)
