"""Reference models and the generic LightningModule the configs use."""

from qat_lightning.models.classifier import ImageClassifier, classification_metrics
from qat_lightning.models.small_cnn import SmallCNN

__all__ = ["ImageClassifier", "SmallCNN", "classification_metrics"]
