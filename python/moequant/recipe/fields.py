"""Validation helpers of the recipe's config dataclasses (:mod:`moequant.recipe` and the method sections,
:class:`moequant.methods.awq.AWQConfig`, :class:`moequant.methods.rotation.RotationConfig`): every bad value raises
ValueError naming the field, the expected and the actual value, and a remedy; :class:`Section` gives the flat
sections ``to_dict`` / ``from_dict`` with unknown keys as an error."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar, NoReturn, Optional


__all__ = ["fail", "is_int", "check_int", "check_choice", "check_bool", "check_pos_float", "check_keys", "str_list",
           "Section"]


def fail(name: str, expected: str, got: Any, remedy: str = "") -> NoReturn:
    """Raises ``ValueError("<name>: expected <expected>, got <got!r>[; <remedy>]")``."""
    msg = f"{name}: expected {expected}, got {got!r}"
    raise ValueError(msg + (f"; {remedy}" if remedy else ""))


def is_int(v: Any) -> bool:
    """An int that is not a bool."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_int(name: str, v: Any, lo: int, remedy: str = "") -> None:
    if not is_int(v) or v < lo:
        fail(name, f"an integer >= {lo}", v, remedy)


def check_choice(name: str, v: Any, choices: tuple, remedy: str = "") -> None:
    if v not in choices:
        fail(name, f"one of {', '.join(map(repr, choices))}", v, remedy)


def check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        fail(name, "true or false", v)


def check_pos_float(name: str, v: Any, hi: Optional[float] = None, remedy: str = "") -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok or (hi is not None and v > hi):
        fail(name, "a finite number > 0" + (f" and <= {hi}" if hi is not None else ""), v, remedy)


def check_keys(cls: type, data: Any, where: str) -> dict:
    """``data`` if it is a mapping whose keys are fields of dataclass ``cls``; ValueError listing the known keys."""
    if not isinstance(data, dict):
        fail(where, "a mapping", data)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")
    return data


def str_list(name: str, v: Any) -> list[str]:
    """``v`` (a path or a list of paths/strings) as a list of strings."""
    if isinstance(v, (str, os.PathLike)):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, (str, os.PathLike)) for x in v):
        fail(name, "a list of strings", v)
    return [os.fspath(x) for x in v]


class Section:
    """``to_dict()`` / ``from_dict()`` for the flat config dataclasses (unknown keys are an error)."""

    _where: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        return cls(**check_keys(cls, data, cls._where))
