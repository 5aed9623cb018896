"""Does weight normalization make a float model quantize better after training? (the weight-norm write-up)

The write-up trained a small MNIST CNN (2 conv + BN + fc) for 1 and for 15 epochs, with and without
``weight_norm`` on its conv/linear layers, then quantized it after training (PTQ). This script repeats that on
scikit-learn's bundled 8x8 digits (no download) with ``SmallCNN``: for each training length and with or without
the ``WeightNormalization`` callback (folded into plain weights at fit end), it reports the float test accuracy
and the PTQ test accuracy at 4 and 2 bits: weights per channel (the library default) and per tensor (one range
for the whole layer, where growing weights hurt most); layer inputs at the same bit width, min/max-calibrated on
4 training batches. It also reports the largest |weight| of the model, the write-up's "weights grow" symptom.

Runs in a few minutes on 2 CPU cores:

    python examples/weight_norm_study.py                          # 3 seeds, 1 and 15 epochs (~1 min)
    python examples/weight_norm_study.py --epochs 1 15 100        # also much longer training (~5 min)
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import lightning as L
import torch

from qat_lightning import DigitsDataModule, ImageClassifier, SmallCNN, WeightNormalization, quantized_snapshot

BITS = (4, 2)
CALIBRATION_BATCHES = 4


@torch.no_grad()
def accuracy(model: torch.nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    return correct / total


def run(epochs: int, weight_norm: bool, seed: int, weight_decay: float) -> dict[str, float]:
    """Train one model and return its float and PTQ test accuracies (fractions) and largest |weight|."""
    L.seed_everything(seed, verbose=False)
    data = DigitsDataModule(batch_size=64, seed=0)
    model = ImageClassifier(SmallCNN(), lr=3e-3, weight_decay=weight_decay)
    trainer = L.Trainer(
        max_epochs=epochs,
        callbacks=[WeightNormalization()] if weight_norm else [],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(model, data)
    calibration = [x for x, _ in itertools.islice(data.train_dataloader(), CALIBRATION_BATCHES)]
    result = {"fp32": accuracy(model, data.test_dataloader())}
    for bits, per_channel in itertools.product(BITS, (True, False)):
        snapshot = quantized_snapshot(model, bits, calibration, per_channel=per_channel)
        result[f"{bits}-bit {'per-channel' if per_channel else 'per-tensor'}"] = accuracy(
            snapshot, data.test_dataloader()
        )
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    result["max abs(w)"] = max(float(m.weight.detach().abs().max()) for m in layers)
    return result


def percent(runs: list[dict[str, float]], column: str) -> str:
    """``mean ± std`` of one column over the runs, in percent."""
    values = [100 * r[column] for r in runs]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="training runs per setting (mean and spread reported)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 15], help="training lengths to compare")
    parser.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and kind to a shared machine

    start = time.perf_counter()
    rows = []
    for epochs, weight_norm in itertools.product(args.epochs, (False, True)):
        runs = [run(epochs, weight_norm, seed, args.weight_decay) for seed in range(args.seeds)]
        rows.append((epochs, weight_norm, runs))
        print(f"done: {epochs} epochs, weight norm {weight_norm} ({time.perf_counter() - start:.0f} s)", flush=True)

    columns = list(rows[0][2][0])
    print(
        f"\nTest accuracy (%) on the digits test split (270 images), mean ± std over {args.seeds} seeds; "
        f"max abs(w): largest Conv/Linear weight magnitude over the seeds. AdamW weight decay {args.weight_decay}.\n"
    )
    print("| epochs | weight norm | " + " | ".join(columns) + " |")
    print("|---:|:---:|" + "---:|" * len(columns))
    for epochs, weight_norm, runs in rows:
        cells = [percent(runs, c) if c != "max abs(w)" else f"{max(r[c] for r in runs):.2f}" for c in columns]
        print(f"| {epochs} | {'yes' if weight_norm else 'no'} | " + " | ".join(cells) + " |")
    print(f"\nTotal time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
