"""Validation helpers shared by the recipe's config dataclasses (:mod:`moequant.recipe`,
:mod:`moequant.awq_config`, :mod:`moequant.rotation_config`): every bad value raises ValueError naming the field,
the expected and the actual value, and a remedy; :class:`_Dict` gives the flat sections ``to_dict`` / ``from_dict``
with unknown keys as an error."""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar, NoReturn, Optional


def _fail(name: str, expected: str, got: Any, remedy: str = "") -> NoReturn:
    msg = f"{name}: expected {expected}, got {got!r}"
    raise ValueError(msg + (f"; {remedy}" if remedy else ""))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_int(name: str, v: Any, lo: int, remedy: str = "") -> None:
    if not _is_int(v) or v < lo:
        _fail(name, f"an integer >= {lo}", v, remedy)


def _check_choice(name: str, v: Any, choices: tuple, remedy: str = "") -> None:
    if v not in choices:
        _fail(name, f"one of {', '.join(map(repr, choices))}", v, remedy)


def _check_bool(name: str, v: Any) -> None:
    if not isinstance(v, bool):
        _fail(name, "true or false", v)


def _check_pos_float(name: str, v: Any, hi: Optional[float] = None, remedy: str = "") -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
    if not ok or (hi is not None and v > hi):
        _fail(name, "a finite number > 0" + (f" and <= {hi}" if hi is not None else ""), v, remedy)


def _check_keys(cls: type, data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        _fail(where, "a mapping", data)
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; known keys: {', '.join(known)}")
    return data


def _str_list(name: str, v: Any) -> list[str]:
    if isinstance(v, (str, os.PathLike)):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(x, (str, os.PathLike)) for x in v):
        _fail(name, "a list of strings", v)
    return [os.fspath(x) for x in v]


class _Dict:
    """``to_dict()`` / ``from_dict()`` for the flat config dataclasses (unknown keys are an error)."""

    _where: ClassVar[str] = ""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        return cls(**_check_keys(cls, data, cls._where))
