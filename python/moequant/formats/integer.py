"""Integer weight formats: :class:`IntFormat`, the one description of how a matrix's weights are stored.

Every layer of moequant uses it, from the recipe (``QuantScheme.format``) through the solvers
(``QuantizedTensor.format``), the work directory and the export (:mod:`moequant.formats.compressed_tensors`) to
the loaders (:mod:`moequant.io.compat`, :mod:`moequant.io.exported`). A format is validated once, when it is
made: ``bits`` in [2, 8], ``group_size`` a positive number of input columns per scale or -1 for one scale per
output channel (``None`` means -1), ``symmetric`` a bool. Whether a group size fits a matrix depends on the matrix
(:meth:`IntFormat.groups`).

Two formats can store one matrix identically: a group spanning the whole row is per-channel.
:meth:`IntFormat.equivalents` gives the set of formats a matrix of ``in_features`` columns is stored correctly
under, which is what the export, the compatibility rules and the preflight compare.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, Optional

__all__ = ["IntFormat", "check_bits", "check_group_size", "matrix_group_size"]

_BITS_REMEDY = "use 4 (W4A16) or 8 for sensitive modules"


def check_bits(bits: Any) -> int:
    """``bits`` if it is an integer in [2, 8], else ValueError naming the value and the remedy."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an integer in [2, 8], got {bits!r}; {_BITS_REMEDY}")
    return bits


def check_group_size(group_size: Any) -> int:
    """``group_size`` (None: -1) if it is a positive integer or -1 (per-channel), else ValueError."""
    if group_size is None:
        return -1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size < 1 and group_size != -1):
        raise ValueError(f"group_size: expected a positive integer (e.g. 128) or -1 for per-channel, got "
                         f"{group_size!r}")
    return group_size


def matrix_group_size(group_size: Any, in_features: int) -> int:
    """The group size of a matrix of ``in_features`` columns: -1 (per-channel, also for None) or a positive divisor
    of ``in_features``; ValueError naming ``in_features`` otherwise."""
    if group_size is None or group_size == -1:
        return -1
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size: expected a positive divisor of in_features={in_features} or -1 "
                         f"(per-channel), got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size: expected a divisor of in_features={in_features} (or -1 for per-channel), "
                         f"got {group_size}")
    return group_size


@dataclass(frozen=True)
class IntFormat:
    """Integer codes of ``bits`` bits, one scale (and, asymmetric, one zero point) per ``group_size`` input columns
    (-1: per output channel). Frozen and hashable; validated on construction (module docstring).

    Semantics (compressed-tensors ``pack-quantized``, docs/formats.md): codes ``q`` in ``[-2^(b-1), 2^(b-1)-1]``,
    ``dequantized = (q - zero_point) * scale`` per group."""

    bits: int
    group_size: Optional[int] = -1
    symmetric: bool = True
    type: ClassVar[str] = "int"  # compressed-tensors' weights "type"

    def __post_init__(self) -> None:
        check_bits(self.bits)
        object.__setattr__(self, "group_size", check_group_size(self.group_size))
        if not isinstance(self.symmetric, bool):
            raise ValueError(f"symmetric: expected true or false, got {self.symmetric!r}")

    @property
    def per_channel(self) -> bool:
        return self.group_size == -1

    @property
    def key(self) -> tuple:
        """``(bits, group_size, symmetric)``: what the work directory stores and messages print."""
        return (self.bits, self.group_size, self.symmetric)

    @classmethod
    def from_key(cls, key) -> "IntFormat":
        """The format of a stored ``(bits, group_size, symmetric)`` (group sizes <= 0 mean per-channel)."""
        bits, gs, sym = key
        return cls(int(bits), int(gs) if gs and gs > 0 else -1, bool(sym))

    def groups(self, in_features: int) -> int:
        """Scales per row of a matrix of ``in_features`` columns (ValueError if the group size does not divide it)."""
        gs = matrix_group_size(self.group_size, in_features)
        return 1 if gs == -1 else in_features // gs

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, int]:
        """The shape of the scale (and zero-point) tensor of an ``[out, in]`` matrix: ``[out, groups]``."""
        return (out_features, self.groups(in_features))

    def divides(self, in_features: int) -> bool:
        """Whether the group size fits a matrix of ``in_features`` columns."""
        return self.per_channel or in_features % self.group_size == 0

    def splits_rows(self, rows: int) -> bool:
        """Whether a matrix quantized whole can be cut after ``rows`` rows into two quantized the same: always
        (scales are per row)."""
        return True

    def equivalents(self, in_features: int) -> frozenset:
        """The formats a matrix of ``in_features`` columns quantized in this format is stored correctly under: one
        group spanning the whole row (per-channel, or a group size >= in_features) is both ``-1`` and
        ``in_features``."""
        if self.per_channel or self.group_size >= in_features:
            return frozenset({replace(self, group_size=-1), replace(self, group_size=in_features)})
        return frozenset({self})

    def storage_bits(self, out_features: int, in_features: int, scale_bits: int = 16) -> int:
        """Bits a ``[out_features, in_features]`` matrix takes in a ``pack-quantized`` checkpoint
        (:func:`moequant.formats.tensors.compressed_tensor_names`): the int32-packed codes
        (``out * ceil(in * bits / 32)`` words), one ``scale_bits`` scale per row and group (16 for a bf16 / fp16
        checkpoint), asymmetric the int32-packed zero points (``ceil(out * bits / 32)`` words per group) and the
        int64 ``weight_shape`` pair. ValueError if the group size does not divide ``in_features``."""
        groups = self.groups(in_features)
        words = out_features * -(-in_features * self.bits // 32)
        if not self.symmetric:
            words += -(-out_features * self.bits // 32) * groups
        return 32 * words + out_features * groups * scale_bits + 128

    def label(self) -> str:
        """``"W4 g128 sym"`` / ``"W3 per-channel asym"``."""
        g = "per-channel" if self.per_channel else f"g{self.group_size}"
        return f"W{self.bits} {g} {'sym' if self.symmetric else 'asym'}"
