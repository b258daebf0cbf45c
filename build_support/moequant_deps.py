"""scikit-build-core metadata provider (``[tool.scikit-build.metadata.dependencies]`` in pyproject.toml): the
wheel's runtime dependencies, with torch pinned to the exact version the extension is compiled against.

moequant._C links against LibTorch's C++ API, which is not ABI-stable across torch releases: a wheel built with
torch X.Y.Z only works with torch X.Y.Z (any local variant: +cu128, +cpu), so that is what it declares. The
static dependencies come from the table's ``requires`` setting.
"""
from __future__ import annotations

from typing import Any, Mapping

__all__ = ["dynamic_metadata", "torch_requirement"]


def torch_requirement() -> str:
    """``torch==<public version>`` of the torch importable in the build environment (the one the extension is
    compiled against; PEP 440: the public version matches every local variant such as ``+cu128``)."""
    import torch

    return f"torch=={torch.__version__.split('+')[0]}"


def dynamic_metadata(field: str, settings: Mapping[str, Any]) -> list[str]:
    if field != "dependencies":
        raise ValueError(f"moequant_deps provides 'dependencies', not {field!r}")
    requires = settings.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise ValueError("moequant_deps: 'requires' must be a list of requirement strings")
    if any(r.split(";")[0].strip().lower().startswith("torch") for r in requires):
        raise ValueError("moequant_deps: leave torch out of 'requires'; it is pinned to the build's torch")
    return [torch_requirement(), *requires]
