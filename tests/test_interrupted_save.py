"""An interrupted conversion (an exception, or the process killed while it writes) leaves the files of the previous
conversion byte for byte, and never a partial file under a final name."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from qat_lightning import SmallCNN, convert_model
from qat_lightning.convert.backends import pt2 as pt2_backend
from qat_lightning.nn import apply_plan, plan_quantization

FILES = ["conversion_report.json", "model_int8.onnx", "model_int8.pt2", "model_w4.packed.pt"]
EXAMPLE = (torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)),)
PARTIAL = b"PK\x03\x04 partial"  # the start of a zip file (torch.export.save and torch.save write zip files)


def calibrated_model(seed: int) -> SmallCNN:
    """A 4-bit fake-quant CNN whose observers saw one random batch."""
    torch.manual_seed(seed)
    model = SmallCNN(channels=(8, 16))
    apply_plan(model, plan_quantization(model, 4))
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8))
    return model.eval()


def _staged(name: str) -> str:
    path = Path(name)
    return f".{path.stem}.tmp{path.suffix}"


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def conversions(tmp_path_factory) -> SimpleNamespace:
    """The files of two finished conversions: ``old`` (model 0), and ``new`` (model 1), which every test below
    interrupts. ``new`` was written over the temporary files that a killed conversion leaves: they are replaced."""
    root = tmp_path_factory.mktemp("conversions")
    convert_model(calibrated_model(0), EXAMPLE, root / "old")
    (root / "new").mkdir()
    for name in FILES:
        (root / "new" / _staged(name)).write_bytes(PARTIAL)
    convert_model(calibrated_model(1), EXAMPLE, root / "new")
    old, new = _files(root / "old"), _files(root / "new")
    assert list(old) == list(new) == FILES
    # an interruption that let a file through would show (the reports may match: same sizes, exact agreement)
    assert all(old[name] != new[name] for name in FILES if name != "conversion_report.json")
    return SimpleNamespace(old_dir=root / "old", old=old, new=new)


def _write_part_then_fail(obj, path, *args, **kwargs):
    Path(path).write_bytes(PARTIAL)
    raise OSError("No space left on device")


@pytest.mark.parametrize("failing", ["pt2", "packed"])
def test_a_disk_error_while_writing_keeps_the_previous_files(tmp_path, conversions, monkeypatch, failing):
    """The .pt2 file is written first, the packed weights near the end: either failure leaves every old file."""
    shutil.copytree(conversions.old_dir, tmp_path / "out")
    # .pt2 files are written by the pt2 backend's deflating copy of torch.export.save's archive, packed weights by
    # torch.save
    target = (pt2_backend, "_deflate") if failing == "pt2" else (torch, "save")
    monkeypatch.setattr(*target, _write_part_then_fail)
    with pytest.raises(OSError, match="No space left"):
        convert_model(calibrated_model(1), EXAMPLE, tmp_path / "out")
    assert _files(tmp_path / "out") == conversions.old  # same names (no temporary file left), same bytes


def _convert_and_hang_in_the_last_write(out: Path, ready: Path) -> None:
    """Runs in a forked process: converts model 1, but the packed-weight write stops half-way, to be killed."""

    def stuck_save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(PARTIAL)
            f.flush()
            os.fsync(f.fileno())
        ready.write_text(str(path))
        time.sleep(120)

    torch.save = stuck_save
    convert_model(calibrated_model(1), EXAMPLE, out)


def test_a_process_killed_while_writing_keeps_the_previous_files(tmp_path, conversions):
    shutil.copytree(conversions.old_dir, tmp_path / "out")
    ready = tmp_path / "ready"
    process = multiprocessing.get_context("fork").Process(
        target=_convert_and_hang_in_the_last_write, args=(tmp_path / "out", ready)
    )
    process.start()
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.is_alive(), f"the conversion ended (exit code {process.exitcode}) before its last write"
            assert time.monotonic() < deadline, "the conversion never reached its last write"
            time.sleep(0.05)
    finally:
        process.kill()
        process.join()
    assert process.exitcode == -signal.SIGKILL

    partial = Path(ready.read_text())
    assert partial.parent == tmp_path / "out" and partial.read_bytes() == PARTIAL
    left = _files(tmp_path / "out")
    assert {name: left[name] for name in FILES} == conversions.old
    # What the killed process leaves: its hidden temporary files (the next conversion replaces them, see above).
    assert set(left) - set(FILES) == {_staged(n) for n in ("model_int8.pt2", "model_int8.onnx", "model_w4.packed.pt")}
    assert partial.name == _staged("model_w4.packed.pt")
    program = torch.export.load(tmp_path / "out" / _staged("model_int8.pt2"))  # complete, but never renamed
    assert program.module()(EXAMPLE[0]).shape == (8, 10)


def test_a_format_that_cannot_translate_the_model_is_reported_and_its_old_file_removed(
    tmp_path, conversions, monkeypatch
):
    """The other files are written; the failed format's file of the previous conversion does not outlive them."""
    from qat_lightning.convert.backends import onnx as onnx_backend

    shutil.copytree(conversions.old_dir, tmp_path / "out")

    def untranslatable(source, path):
        raise RuntimeError("no ONNX form for aten::frobnicate")

    monkeypatch.setattr(onnx_backend, "write", untranslatable)
    with pytest.warns(UserWarning, match=r"the 'onnx' file could not be written \(RuntimeError: no ONNX form"):
        result = convert_model(calibrated_model(1), EXAMPLE, tmp_path / "out")

    assert result.failed == {"onnx": "RuntimeError: no ONNX form for aten::frobnicate"}
    left = _files(tmp_path / "out")
    assert sorted(left) == [n for n in FILES if n != "model_int8.onnx"]
    assert left["model_int8.pt2"] == conversions.new["model_int8.pt2"]
    assert json.loads(left["conversion_report.json"])["failed"] == result.failed
