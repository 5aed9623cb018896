"""The LightningCLI entry point with the shipped configs, shortened through command-line overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from qat_lightning.cli import main
from qat_lightning.nn import plan_from_state_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SHORT = [
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI also looks at ``sys.argv``; leave it only the program name, as a console script would."""
    monkeypatch.setattr(sys, "argv", ["qat-lightning"])


def _checkpoint(root: Path) -> dict:
    (path,) = root.glob("lightning_logs/version_0/checkpoints/*.ckpt")
    return torch.load(path, weights_only=False)


def test_qat_config_short_run(tmp_path):
    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_qat4.yaml"),
            "--trainer.max_epochs=2",
            "--trainer.callbacks.init_args.warmup_epochs=1",  # edits the config's (only) callback
            f"--trainer.default_root_dir={tmp_path}",
            *SHORT,
        ]
    )
    checkpoint = _checkpoint(tmp_path)
    assert checkpoint["epoch"] == 1
    state = checkpoint["state_dict"]
    for layer in ("backbone.features.0", "backbone.features.4", "backbone.classifier"):
        assert state[f"{layer}.weight_quantizer.scale"].numel() > 1  # per-channel weight scales
        assert bool(state[f"{layer}.weight_quantizer.observer.initialized"])
        assert f"{layer}.input_quantizer.zero_point" in state
    (callback_state,) = (v for k, v in checkpoint["callbacks"].items() if "QuantizationCallback" in k)
    assert callback_state["quantized"] and callback_state["bits"] == 4
    assert callback_state["fp32_score"] is not None and callback_state["quantized_score"] is not None

    saved = yaml.safe_load((tmp_path / "lightning_logs/version_0/config.yaml").read_text())
    (callback,) = saved["trainer"]["callbacks"]
    assert callback["class_path"] == "qat_lightning.QuantizationCallback"
    assert callback["init_args"]["warmup_epochs"] == 1 and callback["init_args"]["bits"] == 4
    assert saved["trainer"]["max_epochs"] == 2


def test_fp32_config_parses_and_trains_without_quantization(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "digits_fp32.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["model"]["class_path"] == "qat_lightning.ImageClassifier"
    assert config["model"]["init_args"]["backbone"]["class_path"] == "qat_lightning.SmallCNN"
    assert config["data"]["class_path"] == "qat_lightning.DigitsDataModule"
    assert not config["trainer"]["callbacks"]
    assert config["trainer"]["max_epochs"] == 30

    main(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits_fp32.yaml"),
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            *SHORT,
        ]
    )
    checkpoint = _checkpoint(tmp_path)
    assert "backbone.classifier.weight" in checkpoint["state_dict"]
    assert not any("quantizer" in key for key in checkpoint["state_dict"])


def test_bad_bits_on_the_command_line_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"`bits` must be an integer in 2\.\.16, got 1"):
        main(
            [
                "fit",
                "--config",
                str(CONFIGS / "digits_qat4.yaml"),
                "--trainer.callbacks.init_args.bits=1",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )


def test_python_dash_m_help():
    result = subprocess.run(
        [sys.executable, "-m", "qat_lightning", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    for subcommand in ("fit", "validate", "test", "predict"):
        assert subcommand in result.stdout


def _config_with(tmp_path: Path, **callback_args) -> Path:
    """``digits_qat4.yaml`` with some of its QuantizationCallback's arguments replaced, written under ``tmp_path``."""
    config = yaml.safe_load((CONFIGS / "digits_qat4.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"].update(callback_args)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("field", "value"),
    [("warmup_epochs", "two"), ("warmup_epochs", 1.5), ("warmup_epochs", True), ("freeze_bn_epoch", 2.5)],
)
def test_epochs_of_the_wrong_type_in_a_yaml_config_name_the_field(tmp_path, capsys, field, value):
    """The config parser checks the callback's type hints before anything is built or trained."""
    path = _config_with(tmp_path, **{field: value})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f'Parser key "{field}"' in error and "Expected a <class 'int'>" in error, error[-2000:]
    assert not (tmp_path / "lightning_logs").exists()


@pytest.mark.parametrize(
    ("field", "value"), [("warmup_epochs", -1), ("warmup_epochs", None), ("freeze_observers_epoch", -3)]
)
def test_epochs_the_callback_rejects_in_a_yaml_config_name_the_field(tmp_path, field, value):
    """Values of the right type but out of range (or a null the parser lets through) stop at the callback."""
    path = _config_with(tmp_path, **{field: value})
    with pytest.raises(ValueError, match=rf"`{field}` must be a non-negative integer.*, got {value}\."):
        main(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"])
    assert not (tmp_path / "lightning_logs").exists()


def test_a_recipe_in_a_yaml_config_is_the_plan_the_checkpoint_trained(tmp_path):
    """``recipe:`` in a config replaces the callback's recipe arguments; the saved quantizers follow it."""
    recipe = {"bits": 2, "layer_bits": {"backbone.features.4": 3}, "activation_observer": "minmax"}
    config = yaml.safe_load((CONFIGS / "digits_qat4.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"] = {"warmup_epochs": 0, "recipe": recipe}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}", *SHORT])

    plan = {p.name: p for p in plan_from_state_dict(_checkpoint(tmp_path)["state_dict"], prefix="backbone.")}
    assert {name: (p.weight.bits, p.activation.bits) for name, p in plan.items()} == {
        "features.0": (8, 8),  # first and last layer: the recipe's default 8 bits
        "features.4": (3, 3),
        "classifier": (8, 8),
    }
    assert [p.weight.learned_scale for p in plan.values()] == [False, True, False]  # LSQ at <= 4 bits
    assert {p.activation.observer for p in plan.values()} == {"minmax"}


def test_a_recipe_and_recipe_arguments_in_a_config_is_an_error_naming_them(tmp_path):
    path = _config_with(tmp_path, bits=3, recipe={"bits": 2})
    with pytest.raises(ValueError, match=r"either as `recipe` or as keyword arguments, not both: `bits`=3"):
        main(["fit", "--config", str(path), f"--trainer.default_root_dir={tmp_path}"])
