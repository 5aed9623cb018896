"""Nothing depends on TorchScript: with every ``torch.jit`` entry point raising (as PyTorch is turning its
deprecation warnings into errors), the package imports, trains through QAT and converts to every default format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys, torch

def retired(*args, **kwargs):
    raise RuntimeError("torch.jit is retired")

for name in ("script", "trace", "trace_module", "save", "load", "freeze", "optimize_for_inference"):
    setattr(torch.jit, name, retired)
try:
    torch.jit.script(torch.nn.Linear(1, 1))
except RuntimeError:
    pass
else:
    raise SystemExit("torch.jit was not retired")

import lightning as L
from qat_lightning import DigitsDataModule, ImageClassifier, QuantizationCallback, SmallCNN

L.seed_everything(0)
callback = QuantizationCallback(bits=4, warmup_epochs=1, freeze_bn_epoch=2, freeze_observers_epoch=2)
trainer = L.Trainer(max_epochs=2, callbacks=[callback], default_root_dir=sys.argv[1], enable_progress_bar=False,
                    enable_model_summary=False, limit_train_batches=6, logger=False, enable_checkpointing=False)
trainer.fit(ImageClassifier(SmallCNN()), DigitsDataModule(batch_size=64))
"""


def test_fit_and_conversion_never_touch_torch_jit(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "quantized" / "conversion_report.json").read_text())
    assert report["failed"] == {}
    assert set(report["files"]) == {"pt2", "onnx", "packed"}
    assert all(f["agreement"] == 1.0 for f in report["fidelity"].values()), report["fidelity"]
