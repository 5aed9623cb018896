"""An interrupted conversion (an exception, or the process killed while it writes) leaves the files of the previous
conversion byte for byte, and never a partial file under a final name."""

from __future__ import annotations

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
from qat_lightning.nn import apply_plan, plan_quantization

FILES = ["model_int8.pt", "model_w4.packed.pt"]
EXAMPLE = (torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)),)
PARTIAL = b"PK\x03\x04 partial"  # the start of a zip file (TorchScript and torch.save write zip files)


def calibrated_model(seed: int) -> SmallCNN:
    """A 4-bit fake-quant CNN whose observers saw one random batch."""
    torch.manual_seed(seed)
    model = SmallCNN(channels=(8, 16))
    apply_plan(model, plan_quantization(model, 4))
    model.train()
    with torch.no_grad():
        model(torch.randn(32, 1, 8, 8))
    return model.eval()


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
        (root / "new" / f".{name}.tmp").write_bytes(PARTIAL)
    convert_model(calibrated_model(1), EXAMPLE, root / "new")
    old, new = _files(root / "old"), _files(root / "new")
    assert list(old) == list(new) == FILES
    assert all(old[name] != new[name] for name in FILES)  # an interruption that let a file through would show
    return SimpleNamespace(old_dir=root / "old", old=old, new=new)


def _write_part_then_fail(obj, path, *args, **kwargs):
    Path(path).write_bytes(PARTIAL)
    raise OSError("No space left on device")


@pytest.mark.parametrize("failing", ["int8", "packed"])
def test_an_exception_while_writing_keeps_the_previous_files(tmp_path, conversions, monkeypatch, failing):
    """The int8 file is written first, the packed weights last: either failure leaves both old files."""
    shutil.copytree(conversions.old_dir, tmp_path / "out")
    # TorchScript files are written by torch.jit.save, the packed weights by torch.save
    monkeypatch.setattr(*(torch.jit, "save") if failing == "int8" else (torch, "save"), _write_part_then_fail)
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
    assert set(left) - set(FILES) == {".model_int8.pt.tmp", ".model_w4.packed.pt.tmp"}
    assert partial.name == ".model_w4.packed.pt.tmp"
    int8 = torch.jit.load(str(tmp_path / "out" / ".model_int8.pt.tmp"))  # complete, but never renamed
    assert int8(EXAMPLE[0]).shape == (8, 10)
