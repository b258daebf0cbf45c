"""Helpers shared by the CUDA test modules: CUDA inputs of a chosen layout, the kernel each layout takes, raw
``_C`` Hessian calls and the CPU-vs-CUDA quantization comparison. Functions only (no module state); every
comparison follows tolerances.py.

The ``*_kernel`` functions mirror the launchers' choices in kernels/src/quant_pack.cu (launch_quantize_rtn,
launch_dequantize, launch_pack_rows / launch_unpack_rows) for the tensor ``_C`` receives, so that a test can say
which path its input is meant to take. A mirror alone would follow a changed launcher nowhere, so the quantize and
dequantize tests also check the label against the launch itself: ``assert_launches`` runs the call once under
torch.profiler and asserts that the kernel the label names (RTN_KERNELS, DEQUANTIZE_KERNELS) is the one that ran.
Pack / unpack's 16-byte vs element-wise chunks are a runtime argument of one kernel (pack_chunks_kernel<B>,
unpack_chunks_kernel<B>), invisible to the profiler, so pack_kernel stays a mirror only. The outputs the bindings
allocate are fresh, aligned buffers, so only the inputs decide.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, TypeVar

import torch

from moequant import _C, ops
from tolerances import assert_equal

# _C.accumulate_hessian's precision codes are the indices: 0 fp32, 1 tf32, 2 bf16 (bindings/module.cpp)
HESSIAN_PRECISIONS = ("fp32", "tf32", "bf16")

# The __global__ kernel each label of rtn_kernel / dequantize_kernel stands for (kernels/src/quant_pack.cu)
RTN_KERNELS = {"team": "quantize_rtn_minmax_kernel", "general": "quantize_rtn_kernel"}
DEQUANTIZE_KERNELS = {"quads": "dequantize_quads_kernel", "element": "dequantize_kernel"}

T = TypeVar("T")


# --- inputs of a given layout ----------------------------------------------------------------------------------


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CUDA copy of t whose data pointer is one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    view = flat[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0, "expected a contiguous, misaligned view"
    return view


def in_wider_rows(t: torch.Tensor, ld: int, col0: int) -> torch.Tensor:
    """A CUDA view holding t [rows, cols] at columns [col0, col0 + cols) of a [rows, ld] buffer (row stride ld
    elements, data pointer col0 elements past the buffer's start). The rest of the buffer is NaN, so a kernel that
    read outside the view's rows would report a non-finite input or give different values."""
    rows, cols = t.shape
    assert 0 <= col0 and col0 + cols <= ld, f"columns [{col0}, {col0 + cols}) do not fit a row of {ld}"
    buf = torch.full((rows, ld), float("nan"), dtype=t.dtype, device="cuda")
    view = buf[:, col0:col0 + cols]
    view.copy_(t)
    assert view.stride() == (ld, 1), "expected a row-strided view"
    return view


# --- which kernel an input takes -----------------------------------------------------------------------------


def rtn_kernel(w: torch.Tensor, group_size: int, scale_search: str = "minmax") -> str:
    """``"team"`` (quantize_rtn_minmax_kernel: minmax search, a power-of-two group of 16..512, row stride a multiple
    of 4 floats, w 16-byte aligned) or ``"general"`` (quantize_rtn_kernel, one warp per group) for the float32
    [rows, cols] matrix ``w`` that _C.quantize_rtn receives (its row stride is the kernel's ld)."""
    rows, cols = w.shape
    gs = cols if group_size == -1 else group_size
    team = (scale_search == "minmax" and 16 <= gs <= 512 and gs & (gs - 1) == 0 and rows * (cols // gs) < 2**31
            and w.stride(0) % 4 == 0 and w.data_ptr() % 16 == 0)
    return "team" if team else "general"


def dequantize_kernel(codes: torch.Tensor, group_size: int) -> str:
    """``"quads"`` (dequantize_quads_kernel: group size a multiple of 4, codes 4-byte aligned) or ``"element"``
    (dequantize_kernel) for the contiguous int8 codes that _C.dequantize receives."""
    gs = codes.shape[1] if group_size == -1 else group_size
    quads = gs % 4 == 0 and codes.numel() // 4 < 2**31 and codes.data_ptr() % 4 == 0
    return "quads" if quads else "element"


def pack_kernel(t: torch.Tensor, cols: int) -> str:
    """``"16-byte"`` (rows a multiple of 32 elements, the input 16-byte aligned: 16-byte loads / stores of each
    32-element chunk) or ``"scalar"`` (the same chunks element by element) for the contiguous input of
    _C.pack_rows (int8 codes, ``cols`` of them per row) or _C.unpack_rows (int32 words of rows of ``cols``).

    A mirror of the ``vec`` flag of launch_pack_rows / launch_unpack_rows only: both paths are one kernel
    (pack_chunks_kernel<B> / unpack_chunks_kernel<B>) with ``vec`` as a runtime argument, so the profiler cannot
    tell them apart and no test checks this label against the launch. A test asserting it checks the test's own
    expectation against this formula, not against the launcher."""
    return "16-byte" if cols % 32 == 0 and t.data_ptr() % 16 == 0 else "scalar"


# --- which kernel a call launched ------------------------------------------------------------------------------


def launched_kernels(fn: Callable[[], object]) -> list[str]:
    """The demangled names of the CUDA kernels that one call of fn() launches, in the profiler's order
    (torch.profiler with ProfilerActivity.CUDA; memcpy / memset records are not kernels and are left out, by
    name). fn's result is dropped (assert_launches keeps it)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events()
            if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]


def names_kernel(name: str, kernel: str) -> bool:
    """Whether the demangled kernel name ``name`` is the kernel ``kernel``: ``kernel`` as a whole identifier
    (neither preceded nor followed by a letter, digit or underscore), so ``dequantize_kernel`` does not match
    ``...::dequantize_quads_kernel(...)`` nor ``quantize_rtn_kernel`` ``...::quantize_rtn_minmax_kernel<8>(...)``."""
    return re.search(rf"(?<!\w){re.escape(kernel)}(?!\w)", name) is not None


def assert_launches(label: str, kernels: dict[str, str], fn: Callable[[], T]) -> T:
    """Runs fn() once under launched_kernels and returns its result, asserting that it launched ``kernels[label]``
    exactly once and none of the other kernels of ``kernels`` (RTN_KERNELS or DEQUANTIZE_KERNELS)."""
    assert label in kernels, f"unknown label {label!r}, expected one of {sorted(kernels)}"
    out = []
    names = launched_kernels(lambda: out.append(fn()))
    launched = {lab: sum(names_kernel(n, k) for n in names) for lab, k in kernels.items()}
    expected = {lab: int(lab == label) for lab in kernels}
    assert launched == expected, (f"expected one launch of {kernels[label]} ({label!r}) and none of the others; "
                                  f"launch counts {launched}, kernels launched: {names}")
    return out[0]


# --- comparisons ---------------------------------------------------------------------------------------------------

_QUANT_FIELDS = ("codes", "scale", "zero_point", "dequantized")


def _quant_fields(r) -> tuple:
    """(codes, scale, zero point, dequantized) of an ops.QuantizedTensor or of the tuple _C.quantize_rtn returns."""
    if isinstance(r, ops.QuantizedTensor):
        return tuple(getattr(r, name) for name in _QUANT_FIELDS)
    assert isinstance(r, tuple) and len(r) == 4, f"expected a QuantizedTensor or a 4-tuple, got {type(r).__name__}"
    return r


def assert_same_quantization(cpu, gpu) -> None:
    """Tier 0 (tolerances.py): codes, scales, zero points and dequantized values of the CUDA result ``gpu`` are the
    CPU result's bits. Both are ops.QuantizedTensor or both raw _C.quantize_rtn tuples."""
    assert type(cpu) is type(gpu), f"compare like with like, got {type(cpu).__name__} and {type(gpu).__name__}"
    for name, a, b in zip(_QUANT_FIELDS, _quant_fields(gpu), _quant_fields(cpu)):
        assert a.is_cuda, f"{name}: expected a CUDA result"
        assert_equal(a.cpu(), b, name)


# --- Hessians through _C ------------------------------------------------------------------------------------------


class RawHessians(NamedTuple):
    """The three accumulators _C.accumulate_hessian updates (the attribute names of ops.HessianAccumulator)."""

    hessians: torch.Tensor
    counts: torch.Tensor
    mass: torch.Tensor


def accumulate_raw(x: torch.Tensor, ids: torch.Tensor, w, experts: int, precision: str = "fp32",
                   symmetrize: bool = True) -> RawHessians:
    """One _C.accumulate_hessian call into fresh zero accumulators on x's CUDA device. ``x`` goes in as it is (row
    stride, data pointer, 16-bit dtype), where ops.HessianAccumulator.add would convert or copy some layouts; ids
    (any integer dtype) and weights (or None) are moved to the device."""
    assert x.is_cuda, "expected CUDA rows"
    dim, dev = x.shape[1], x.device
    out = RawHessians(torch.zeros(experts, dim, dim, device=dev), torch.zeros(experts, dtype=torch.int64, device=dev),
                      torch.zeros(experts, dtype=torch.float64, device=dev))
    _C.accumulate_hessian(out.hessians, out.counts, out.mass, x, ids.to(device=dev, dtype=torch.int32).contiguous(),
                          None if w is None else w.to(device=dev, dtype=torch.float32).contiguous(),
                          HESSIAN_PRECISIONS.index(precision), symmetrize=symmetrize)
    return out
