"""Cost of the full low-bit recipe against plain QAT: seconds per training epoch, medians of interleaved runs.

- ``plain``: ``QuantizationCallback(bits=2, warmup_epochs=0, calibration_batches=0)``.
- ``full``: the same with the calibration at insertion (``calibration_batches=10``), ``progressive=(4, 3)`` (one
  epoch each) and ``WeightNormalization()``.

Each run trains ``--epochs`` epochs of a ``bench_accuracy`` job (``--model``, default ``digits_cnn``); the first
epoch holds the insertion (and, for ``full``, the calibration), later epochs are steady state (for ``full`` they
include the stage switches). Prints one line per epoch index and the ratio full / plain, then a JSON object on the
last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import lightning.pytorch as pl
import torch
from bench_accuracy import JOBS  # the accuracy benchmark's models and data (ResNet-20 on 32x32 resized digits)

from qat_lightning import ImageClassifier, QuantizationCallback, WeightNormalization


class EpochTimer(pl.Callback):
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def run(variant: str, job_name: str, epochs: int, batches: int | None) -> list[float]:
    pl.seed_everything(0, verbose=False)
    job = JOBS[job_name]
    model = ImageClassifier(job.model())
    timer = EpochTimer()
    if variant == "plain":
        callbacks = [QuantizationCallback(bits=2, warmup_epochs=0, calibration_batches=0, convert_on_fit_end=False)]
    else:
        callbacks = [
            WeightNormalization(),
            QuantizationCallback(bits=2, warmup_epochs=0, progressive=(4, 3), convert_on_fit_end=False),
        ]
    trainer = pl.Trainer(
        max_epochs=epochs,
        callbacks=[timer, *callbacks],  # the timer first: epoch 0 includes the insertion (and calibration),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        limit_train_batches=batches,
    )
    trainer.fit(model, job.data(False))
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits_cnn", choices=list(JOBS), help="a bench_accuracy job")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=None, help="training batches per epoch (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[str, list[list[float]]] = {"plain": [], "full": []}
    for _ in range(args.repeats):
        for variant in times:  # interleaved, so drifting machine load hits both alike
            times[variant].append(run(variant, args.model, args.epochs, args.batches))
    result = {}
    for epoch in range(args.epochs):
        plain = statistics.median(t[epoch] for t in times["plain"])
        full = statistics.median(t[epoch] for t in times["full"])
        ratio = round(full / plain, 3)
        result[f"epoch{epoch}"] = {"plain_s": round(plain, 3), "full_s": round(full, 3), "ratio": ratio}
        print(f"epoch {epoch}: plain {plain:.3f} s, full {full:.3f} s, full/plain {full / plain:.2f}")
    print(json.dumps({"model": args.model, "threads": args.threads, "repeats": args.repeats, **result}))


if __name__ == "__main__":
    main()
