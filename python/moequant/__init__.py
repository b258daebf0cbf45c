"""moequant: post-training quantization of Mixture-of-Experts LLMs.

Layers: a header-first C++ core (libmoequant), CUDA kernels, the pybind11 extension ``moequant._C``,
and this package. Start with :mod:`moequant.ops` (tensor operations) and :mod:`moequant.ref` (their
plain-PyTorch reference twins).
"""
import torch  # noqa: F401  (loads LibTorch before the extension that links against it)

__version__ = "0.1.0"

try:
    from moequant import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "moequant's C++ extension (moequant._C) is not built or does not match this torch. "
        "Install with `pip install --no-build-isolation -e .` from the repository root "
        "(see README.md)."
    ) from exc
