"""What the subcommands share: the one-line user error (:class:`CliError`), the parser that raises it, and the
checks of a model directory, a device and a config before any work."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional

__all__ = ["CliError", "Parser", "positive_int", "model_dir", "check_device", "load_config", "logger"]

logger = logging.getLogger("moequant.cli")


class CliError(Exception):
    """A user error: reported as one ``moequant: error: ...`` line and exit code 2."""



class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise :class:`CliError` instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise CliError(f"{message} (see '{self.prog} --help')")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value



def model_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CliError(f"model directory {p} not found; pass a local Hugging Face model directory")
    if not (p / "config.json").is_file():
        raise CliError(f"{p} has no config.json; pass a Hugging Face model directory")
    return p


def check_device(device: Optional[str]) -> None:
    """The --device checks with CLI messages and exit code 2: the recipe's device grammar, then whether that CUDA
    device exists (recipe.resolve_device checks only that some GPU is available, and the CLI does not import
    the pipeline before the run)."""
    from moequant.recipe.device import DEVICE_PATTERN

    if device is None:
        return
    if not DEVICE_PATTERN.fullmatch(device):
        raise CliError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CliError(f"--device {device}: no CUDA GPU is available (torch.cuda.is_available() is False); "
                           "use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def load_config(model_dir: Path):
    """``(config, family)`` of a model directory; CliError when transformers cannot read the config (an
    unsupported family raises ValueError from :func:`moequant.models.detect_family`)."""
    import transformers

    from moequant.models import detect_family

    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    return config, detect_family(config)

