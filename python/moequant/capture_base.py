"""What the capture classes (:mod:`moequant.capture`, :mod:`moequant.capture_linear`) share: the hook-owning base
class, the default Hessian accumulator and the token-mask helper."""
from __future__ import annotations

import abc
import logging
from typing import Callable

import torch

logger = logging.getLogger("moequant.capture")  # one logger for the capture, whichever module logs

AccumulatorFactory = Callable[[int, int, torch.device], object]


def default_accumulator_factory(num_experts: int, dim: int, device: torch.device):
    """``moequant.ops.HessianAccumulator(num_experts, dim, dtype=float32, device=device)`` (imported lazily)."""
    from . import ops

    return ops.HessianAccumulator(num_experts, dim, dtype=torch.float32, device=device)


def flat_mask(mask: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    """``mask`` flattened to bool ``[rows]``; None when there is none or it does not have one element a row."""
    if mask is None:
        return None
    if mask.numel() != rows:
        logger.debug("token mask of %d elements ignored for an input of %d rows", mask.numel(), rows)
        return None
    return mask.reshape(-1).bool()


class Hooks(abc.ABC):
    """Owns hook handles; removal is idempotent. Context manager base of the capture classes."""

    def __init__(self) -> None:
        self._handles: list = []

    @abc.abstractmethod
    def attach(self):
        """Registers the hooks and returns self."""

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def __enter__(self):
        self.attach()
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
