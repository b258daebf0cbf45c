"""The device grammar of recipes and the command line (``cpu``, ``cuda``, ``cuda:N``) and its resolution."""
from __future__ import annotations

import re
from typing import Optional

import torch

__all__ = ["DEVICE_PATTERN", "resolve_device"]

DEVICE_PATTERN = re.compile(r"^(cpu|cuda|cuda:\d+)$")
"""What a recipe's ``device`` (and ``--device``) may say."""


def resolve_device(spec: Optional[str]) -> torch.device:
    """The torch device of a recipe's ``device`` (None / ``"auto"``: CUDA when available), checked."""
    if spec in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(spec)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {spec!r} requested but no CUDA GPU is available; use device='cpu'")
    return dev
