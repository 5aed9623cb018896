"""Command line: LightningCLI over any LightningModule/LightningDataModule (``lightning fit --config ...``)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning`` / ``qat-lightning`` commands and of ``python -m qat_lightning``.

    Model and data are chosen by ``class_path`` in the config (any LightningModule / LightningDataModule);
    see ``configs/`` for the shipped studies.
    """
    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
