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


def quantize(model_or_path, recipe=None, calibration=None, output_dir=None, **kwargs):
    """Quantizes a Hugging Face MoE checkpoint layer by layer; see :func:`moequant.pipeline.quantize`.

    ``recipe``: a :class:`moequant.recipe.Recipe`, its dict, or a YAML/JSON file (default W4 g128 symmetric
    GPTQ); ``calibration``: token ids ``[N, seq_len]``, text/JSONL file path(s), or None for the recipe's;
    ``output_dir``: where the compressed-tensors checkpoint goes (None: nothing is written).
    Returns a :class:`moequant.report.QuantizationReport`.
    """
    from .pipeline import quantize as _quantize

    return _quantize(model_or_path, recipe, calibration, output_dir, **kwargs)


def __getattr__(name):  # lazy re-exports: importing moequant stays cheap
    if name in ("Recipe", "QuantScheme", "Override", "CalibrationConfig", "FallbackConfig"):
        from . import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'moequant' has no attribute {name!r}")
