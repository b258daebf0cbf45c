"""The ``rotation`` section of a :class:`moequant.recipe.Recipe` (offline residual rotation, :mod:`moequant.rotation`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["RotationConfig"]

_KINDS = ("hadamard",)


def _fail(name: str, expected: str, got: Any, remedy: str = "") -> None:
    raise ValueError(f"{name}: expected {expected}, got {got!r}" + (f"; {remedy}" if remedy else ""))


@dataclass
class RotationConfig:
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
        if not isinstance(self.enabled, bool):
            _fail("rotation.enabled", "true or false", self.enabled)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            _fail("rotation.seed", "an integer >= 0", self.seed, "any non-negative integer; 0 is the default")
        if self.kind not in _KINDS:
            _fail("rotation.kind", f"one of {', '.join(map(repr, _KINDS))}", self.kind,
                  "only the randomized Hadamard rotation is implemented")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "RotationConfig":
        if not isinstance(data, dict):
            _fail("rotation", "a mapping", data)
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ValueError(f"rotation: unknown key(s) {', '.join(map(repr, unknown))}; known keys: "
                             f"{', '.join(known)}")
        return cls(**data)
