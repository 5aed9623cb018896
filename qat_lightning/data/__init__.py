"""Datamodules used by the shipped configs."""

from qat_lightning.data.cifar import CIFAR10DataModule
from qat_lightning.data.digits import DigitsDataModule
from qat_lightning.data.glyphs import GLYPH_CLASSES, GlyphsDataModule, render_glyphs
from qat_lightning.data.image_folder import ImageFolderDataModule
from qat_lightning.data.mnist import FashionMNISTDataModule, MNISTDataModule
from qat_lightning.data.vision import TorchvisionDataModule, VisionDataModule

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "GLYPH_CLASSES",
    "GlyphsDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "TorchvisionDataModule",
    "VisionDataModule",
    "render_glyphs",
]
