"""moequant: post-training quantization of Mixture-of-Experts LLMs.

Layers: a header-first C++ core (libmoequant), CUDA kernels, the pybind11 extension ``moequant._C``,
and this package, whose folders are roles (README.md "Layout", docs/architecture.md): :mod:`moequant.ops` (tensor
operations) and :mod:`moequant.ref` (their plain-PyTorch reference twins), :mod:`moequant.formats`,
:mod:`moequant.recipe`, :mod:`moequant.models`, :mod:`moequant.calibration`, :mod:`moequant.methods`,
:mod:`moequant.pipeline`, :mod:`moequant.io`, :mod:`moequant.eval`, :mod:`moequant.cli`.
"""
import torch  # noqa: F401  (loads LibTorch before the extension that links against it)

__version__ = "0.1.0"


def check_torch_version(built: "str | None" = None, running: "str | None" = None) -> None:
    """Raises ImportError when the torch moequant._C was compiled against (``moequant/_build_info.py``, written
    by the build) and the running torch differ in major.minor: LibTorch's C++ ABI changes between releases, so the
    extension would fail with undefined symbols or worse. A source checkout without the file is not checked."""
    if built is None:
        try:
            from moequant._build_info import TORCH_VERSION as built
        except ImportError:  # built in place or copied: no record of the build's torch
            return
    running = torch.__version__ if running is None else running

    def major_minor(v: str) -> tuple:
        return tuple(v.split("+")[0].split(".")[:2])

    if major_minor(built) != major_minor(running):
        raise ImportError(
            f"moequant was built against torch {built}, but torch {running} is installed: its C++ extension only "
            f"works with the torch it was compiled with. Install torch=={built.split('+')[0]}, or rebuild moequant "
            f"against this torch (`pip install --no-build-isolation --force-reinstall --no-deps .` from the "
            f"repository, or `bash scripts/setup.sh`)")


check_torch_version()

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
    Returns a :class:`moequant.pipeline.report.QuantizationReport`.
    """
    from .pipeline import quantize as _quantize

    return _quantize(model_or_path, recipe, calibration, output_dir, **kwargs)


def __getattr__(name):  # lazy re-exports: importing moequant stays cheap
    if name in ("Recipe", "QuantScheme", "Override", "CalibrationConfig", "FallbackConfig"):
        from . import recipe

        return getattr(recipe, name)
    if name == "IntFormat":
        from .formats import IntFormat

        return IntFormat
    raise AttributeError(f"module 'moequant' has no attribute {name!r}")
