"""``ImageClassifier``: a LightningModule around any backbone that maps images to class logits."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.core.mixins.hparams_mixin import _given_hyperparameters
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score, MulticlassPrecision, MulticlassRecall

from qat_lightning.nn import prepare_on_load


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy (micro) and macro precision, recall and F1, logged as ``<prefix>acc`` etc."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro"),
            "precision": MulticlassPrecision(num_classes, average="macro"),
            "recall": MulticlassRecall(num_classes, average="macro"),
            "f1": MulticlassF1Score(num_classes, average="macro"),
        },
        prefix=prefix,
    )


class ImageClassifier(pl.LightningModule):
    """Cross-entropy training of ``backbone`` with AdamW (or SGD) and a cosine learning-rate schedule.

    Args:
        backbone: module mapping ``(N, C, H, W)`` images to ``(N, num_classes)`` logits.
        num_classes: number of classes.
        lr: peak learning rate, decayed to 0 over the run by a per-step cosine schedule.
        weight_decay: weight decay (decoupled for AdamW, L2 for SGD).
        optimizer: ``"adamw"``, or ``"sgd"`` (with ``momentum``; the usual recipe of CIFAR ResNets).
        momentum: SGD momentum (ignored by AdamW).

    Logs ``train/loss``, ``val/loss``, ``val/acc``, ``val/precision``, ``val/recall``, ``val/f1`` (and
    ``test/...``); precision, recall and F1 are macro averages over classes.

    Checkpoints saved during QAT load with ``ImageClassifier.load_from_checkpoint(path)``: the fake-quant
    structure is rebuilt from the checkpoint first. Models built by the CLI store the backbone's config and
    load with the path alone; models built in Python pass ``backbone=`` again (it is not pickled).
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        momentum: float = 0.9,
    ):
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise ValueError(f"`optimizer` must be 'adamw' or 'sgd', got {optimizer!r}.")
        # The CLI hands over the backbone as a config (saved, so the checkpoint rebuilds it); a module built in
        # Python is not pickled into the checkpoint's hyper-parameters.
        from_config = _given_hyperparameters.get() is not None
        self.save_hyperparameters(ignore=[] if from_config else ["backbone"])
        self.backbone = backbone
        prepare_on_load(self)  # QAT state dicts (checkpoints, DDP spawn results) rebuild their quantizers to load
        self.val_metrics = classification_metrics(num_classes, "val/")
        self.test_metrics = classification_metrics(num_classes, "test/")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], metrics: MetricCollection, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=stage == "val")
        self._update_metrics(metrics, logits, y)

    @torch.compiler.disable
    def _update_metrics(self, metrics: MetricCollection, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Update and log ``metrics`` eagerly: under ``torch.compile`` torchmetrics' checks break the trace."""
        metrics.update(logits, y)
        for name, metric in metrics.items():
            self.log(name, metric, prog_bar=name == "val/acc")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(dim=1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
