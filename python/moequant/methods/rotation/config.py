"""The ``rotation`` section of a :class:`moequant.recipe.Recipe`.

Offline residual rotation, :mod:`moequant.methods.rotation.rotate`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...recipe.fields import Section, check_bool, check_choice, check_int

__all__ = ["RotationConfig"]

_KINDS = ("hadamard",)


@dataclass
class RotationConfig(Section):
    """Offline rotation of the residual stream before quantization (QuaRot R1, no online transforms).

    Attributes:
        enabled: fold the residual RMSNorms and rotate embeddings, attention, router, shared and routed experts
            and lm_head by ``Q = H diag(s) / sqrt(hidden)`` before calibrating; the exported checkpoint is an
            ordinary one (rotated weights, norm weights 1, lm_head untied).
        seed: seed of the random signs ``s`` (the rotation is a deterministic function of it).
        kind: ``"hadamard"`` (randomized Hadamard of the hidden size: 2^k or 12/20/28/40 * 2^k).
    """

    _where: ClassVar[str] = "rotation"
    enabled: bool = False
    seed: int = 0
    kind: str = "hadamard"

    def __post_init__(self) -> None:
        check_bool("rotation.enabled", self.enabled)
        check_int("rotation.seed", self.seed, 0, "any non-negative integer; 0 is the default")
        check_choice("rotation.kind", self.kind, _KINDS, "only the randomized Hadamard rotation is implemented")
