"""Quantization recipes: what to quantize, how, and with which calibration data.

* :mod:`moequant.recipe.recipe`: :class:`Recipe` and its sections (:class:`CalibrationConfig`,
  :class:`FallbackConfig`; the method sections :class:`~moequant.methods.awq.AWQConfig` and
  :class:`~moequant.methods.rotation.RotationConfig` live with their methods), :data:`DEFAULT_IGNORE`, file I/O;
* :mod:`moequant.recipe.scheme`: :class:`QuantScheme` (a :class:`~moequant.formats.IntFormat` plus the solver's
  settings), :class:`Override`, :func:`match_pattern`;
* :mod:`moequant.recipe.fields`: the validation helpers of every section;
* :mod:`moequant.recipe.device`: the device grammar (``cpu``, ``cuda``, ``cuda:N``) and :func:`resolve_device`.

The names are re-exported here lazily (the method sections import :mod:`moequant.recipe.fields`, so this package
must not import them at its own import).
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "RECIPE_VERSION": "recipe", "DEFAULT_IGNORE": "recipe", "Recipe": "recipe", "CalibrationConfig": "recipe",
    "FallbackConfig": "recipe", "AWQConfig": "recipe", "RotationConfig": "recipe", "GPTAQConfig": "recipe",
    "QuantScheme": "scheme", "Override": "scheme", "match_pattern": "scheme",
    "DEVICE_PATTERN": "device", "resolve_device": "device",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
