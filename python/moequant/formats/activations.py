"""Input-activation formats of the W8A8 / W4A4 schemes: :class:`ActivationFormat`, what a checkpoint's config
group says under ``input_activations`` and what a runtime (vLLM) does to every Linear's input.

moequant quantizes weights; activations are quantized by the runtime. What moequant computes for them is only
NVFP4's static per-tensor ``input_global_scale`` (from the calibration inputs: :func:`moequant.formats.
nvfp4_global_scale` of their largest ``|x|``, as llm-compressor's ``static_minmax`` observer and compressed-tensors'
``generate_gparam`` define it). :meth:`ActivationFormat.core` is the format core of the runtime's activation
quantization (a ``moequant.ops.Format`` applied to the ``[tokens, in_features]`` input row by row), which
:func:`moequant.ops.fake_quantize_activations` (``moequant eval``'s simulation) applies for the float kinds; int8
there follows vLLM (``amax / 127``), not this core's compressed-tensors convention (``amax / 127.5``):

=============  ==================================================  =====================================
kind           runtime quantization of the input                   ``moequant.ops.Format`` on ``[T, in]``
=============  ==================================================  =====================================
``fp8_token``  FP8 E4M3, one dynamic scale per token                ``fp8_channel`` (a row is a token)
``fp8_group``  FP8 E4M3, one dynamic scale per 128 columns a token  ``fp8_block(1, 128)``
``nvfp4``      FP4 E2M1 in groups of 16, FP8 group scales computed  ``nvfp4`` with the static
               per token ("local"), static fp32 global scale        ``input_global_scale``
``mxfp4``      FP4 E2M1 in groups of 32, E8M0 scales, dynamic       ``mxfp4``
``mxfp8``      FP8 E4M3 in groups of 32, E8M0 scales, dynamic       ``mx(fp8_e4m3)``
``int8_token`` int8 symmetric, one dynamic scale per token          ``int_(8, symmetric, per-channel)``
=============  ==================================================  =====================================
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ActivationFormat", "ACTIVATION_KINDS"]

ACTIVATION_KINDS = ("fp8_token", "fp8_group", "nvfp4", "mxfp4", "mxfp8", "int8_token")
_LABELS = {"fp8_token": "A8 FP8 per-token", "fp8_group": "A8 FP8 g128", "nvfp4": "A4 NVFP4",
           "mxfp4": "A4 MXFP4", "mxfp8": "A8 MXFP8", "int8_token": "A8 int8 per-token"}


@dataclass(frozen=True)
class ActivationFormat:
    """The quantization of a Linear's input at run time (module docstring); ``kind`` is one of
    :data:`ACTIVATION_KINDS`. Frozen and hashable."""

    kind: str

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(f"kind: expected one of {', '.join(map(repr, ACTIVATION_KINDS))}, got {self.kind!r}")

    @property
    def static_global_scale(self) -> bool:
        """Whether the checkpoint stores a calibrated ``input_global_scale`` (fp32 ``[1]``) per Linear (NVFP4)."""
        return self.kind == "nvfp4"

    def args(self) -> dict:
        """compressed-tensors' ``input_activations`` arguments (its presets FP8_DYNAMIC, FP8_BLOCK, NVFP4, MXFP4,
        W8A8 without ``scale_dtype``, which compressed-tensors 0.11 / 0.12 reject; MXFP8, a format of 0.20, with its
        ``scale_dtype`` uint8)."""
        k = self.kind
        out = {"num_bits": 4 if k in ("nvfp4", "mxfp4") else 8, "type": "int" if k == "int8_token" else "float",
               "symmetric": True}
        if k in ("fp8_token", "int8_token"):
            out.update(strategy="token", group_size=None, dynamic=True, observer=None)
        elif k == "fp8_group":
            out.update(strategy="group", group_size=128, dynamic=True, observer=None)
        elif k in ("mxfp4", "mxfp8"):
            out.update(strategy="group", group_size=32, dynamic=True, observer=None)
            if k == "mxfp8":
                out["scale_dtype"] = "torch.uint8"
        else:  # nvfp4: local FP8 group scales at run time, the global scale calibrated ("static_minmax")
            out.update(strategy="tensor_group", group_size=16, dynamic="local", observer="static_minmax")
        return out

    def label(self) -> str:
        """``"A8 FP8 per-token"``, ``"A4 NVFP4"``, ..."""
        return _LABELS[self.kind]

    def core(self):
        """The ``moequant.ops.Format`` of the runtime's quantization of an input ``[tokens, in_features]`` (module
        docstring; NVFP4 with the module's ``input_global_scale`` as the caller's global scale)."""
        from moequant import _C  # the native extension; imported lazily so this module imports without it

        F = _C.Format
        return {"fp8_token": lambda: F.fp8_channel(), "fp8_group": lambda: F.fp8_block(1, 128),
                "nvfp4": F.nvfp4, "mxfp4": F.mxfp4, "mxfp8": lambda: F.mx(_C.ElementKind.fp8_e4m3),
                "int8_token": lambda: F.int_(8, True, -1)}[self.kind]()
