"""Round to nearest (min/max or MSE scales), no calibration data needed: :func:`moequant.ops.quantize_rtn`; twin
:func:`moequant.ref.quantize_rtn_ref`."""
from .solver import RTNSolver

__all__ = ["RTNSolver"]
