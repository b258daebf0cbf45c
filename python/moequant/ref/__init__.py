"""moequant.ref -- plain-PyTorch reference twins of the C++ core ("the plainest correct code").

They are the oracles of the test suite: slow, readable, CPU-only, and bit-exact with the core where the
core's contract is bit-exact (quantization parameters, codes, packing). See each function's docstring for
its shape/dtype contract and the equivalence it promises.
"""

from .awq import fake_quantize_ref, search_clip_ref
from .budget import allocate_ref
from .gptq import GptqFormatRefResult, GptqRefResult, gptq_quantize_format_ref, gptq_quantize_ref, quadratic_loss_ref
from .hadamard import hadamard_matrix, hadamard_ref
from .hessian import accumulate_hessian_ref
from .pack import (
    pack_int32_ref,
    pack_zero_points_ref,
    packed_words,
    unpack_int32_ref,
    unpack_zero_points_ref,
)
from .quant import (
    RtnResult,
    dequantize_ref,
    dequantize_values_ref,
    mse_qparams_ref,
    qparams_ref,
    qrange,
    quantize_ref,
    quantize_rtn_ref,
)

__all__ = [
    "GptqFormatRefResult",
    "GptqRefResult",
    "RtnResult",
    "accumulate_hessian_ref",
    "allocate_ref",
    "dequantize_ref",
    "dequantize_values_ref",
    "fake_quantize_ref",
    "gptq_quantize_format_ref",
    "gptq_quantize_ref",
    "hadamard_matrix",
    "hadamard_ref",
    "mse_qparams_ref",
    "pack_int32_ref",
    "pack_zero_points_ref",
    "packed_words",
    "qparams_ref",
    "qrange",
    "quadratic_loss_ref",
    "quantize_ref",
    "quantize_rtn_ref",
    "search_clip_ref",
    "unpack_int32_ref",
    "unpack_zero_points_ref",
]
from .act_quant import fake_quantize_activations_ref, fake_quantize_fp8_ref  # noqa: E402

__all__ += ["fake_quantize_activations_ref", "fake_quantize_fp8_ref"]
from .kv_cache import kv_scale_ref  # noqa: E402

__all__ += ["kv_scale_ref"]
