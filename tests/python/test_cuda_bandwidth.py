"""The layout switches of the vectorised CUDA paths (issue #4): strided rows and misaligned pointers, through _C.

The launchers in kernels/src/quant_pack.cu pick a vectorised kernel only when the shape *and the layout* allow it:
minmax RTN takes the team kernel for a power-of-two group of 16..512 only if the row stride ``ld`` is a multiple of
4 floats and ``w`` is 16-byte aligned; dequantize takes the four-codes-per-thread kernel only for 4-byte aligned
codes; pack / unpack take 16-byte chunk loads only for 16-byte aligned inputs. moequant.ops makes every input
contiguous first (python/moequant/ops.py), so a strided view given to ops reaches the kernels as a contiguous copy;
these tests call the bindings (bindings/module.cpp) with the view itself:

* ``_C.quantize_rtn`` accepts rows with unit stride and any row stride >= cols (check_matrix_f32) and hands the
  stride to the launcher as ``ld`` (bindings/ops_cuda.cpp): strided views and misaligned base pointers both reach
  launch_quantize_rtn, and each case below says which kernel its layout takes (checked with gpu_helpers.rtn_kernel
  and against the kernel the profiler saw launch, gpu_helpers.assert_launches).
* ``_C.dequantize``, ``_C.pack_rows`` and ``_C.unpack_rows`` reject non-contiguous inputs (check_contiguous), so
  their only layout switch is the pointer alignment: they get contiguous inputs one element past a 16-byte boundary
  (dequantize's kernel is checked against the launch too; pack / unpack's 16-byte path is a runtime argument of one
  kernel, which the profiler cannot see, so only gpu_helpers.pack_kernel's mirror states it).

The shape switches (group sizes, partial chunks) with contiguous inputs are in test_cuda_kernels.py. Every result
must be the CPU core's bits (tolerances.py tier 0).
"""

from __future__ import annotations

import pytest
import torch

from gpu_helpers import (
    DEQUANTIZE_KERNELS,
    RTN_KERNELS,
    assert_launches,
    assert_same_quantization,
    dequantize_kernel,
    in_wider_rows,
    misaligned,
    pack_kernel,
    rtn_kernel,
)
from moequant import _C, ops
from testdata import weight
from tolerances import assert_equal

pytestmark = pytest.mark.gpu


# --- quantize_rtn (minmax) ------------------------------------------------------------------------------------------

# rows, cols, row stride ld (None: a contiguous misaligned copy), column offset of the view, group size, the kernel
RTN_LAYOUTS = {
    # ld % 4 == 0 and a view 32 bytes into an aligned buffer: the team kernel, reading rows ld apart (ld != cols)
    "team-ld200": (24, 128, 200, 8, 16, "team"),
    "team-ld264": (6, 128, 264, 8, 32, "team"),
    # ld = 262 is not a multiple of 4 (every other row starts off a 16-byte boundary): the general kernel with ld
    "general-ld262": (6, 128, 262, 3, 32, "general"),
    # ld % 4 == 0 but the view starts 4 bytes past a 16-byte boundary: the general kernel with ld
    "general-ld264-misaligned": (6, 128, 264, 1, 32, "general"),
    # a group of 8 (not the team kernel's shape) on a strided view: the general kernel with ld
    "general-gs8-ld200": (5, 136, 200, 8, 8, "general"),
    # contiguous rows (ld == cols) whose first element is 4 bytes past a 16-byte boundary: the general kernel
    "general-contiguous-misaligned": (6, 256, None, 0, 64, "general"),
}


@pytest.mark.parametrize("rows, cols, ld, col0, group_size, kernel", list(RTN_LAYOUTS.values()), ids=list(RTN_LAYOUTS))
@pytest.mark.parametrize("bits, symmetric", [(4, False), (3, True)])
def test_quantize_rtn_layouts_bit_exact(rows, cols, ld, col0, group_size, kernel, bits, symmetric, gen):
    w = weight(rows, cols, gen)
    view = misaligned(w) if ld is None else in_wider_rows(w, ld, col0)
    assert rtn_kernel(view, group_size) == kernel
    spec = ops.make_spec(bits, group_size, symmetric, in_features=cols)
    # _C gets the view as it is (its row stride is the kernel's ld; NaN outside it); the CPU core the plain matrix
    gpu = assert_launches(kernel, RTN_KERNELS, lambda: _C.quantize_rtn(view, spec))
    assert_same_quantization(_C.quantize_rtn(w, spec), gpu)
    # ops hands _C a contiguous copy of a strided view (and a contiguous misaligned one as it is): the same bits
    assert_same_quantization(ops.quantize_rtn(w, bits, group_size, symmetric),
                             ops.quantize_rtn(view, bits, group_size, symmetric))


# --- dequantize ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols, group_size, symmetric", [(4, 64, 16, False), (5, 96, -1, True)])
def test_dequantize_misaligned_codes(rows, cols, group_size, symmetric, gen):
    """Group sizes the four-codes-per-thread kernel takes, but codes one byte past a 16-byte boundary (not 4-byte
    aligned): the element-wise kernel."""
    r = ops.quantize_rtn(weight(rows, cols, gen), 4, group_size, symmetric)
    spec = ops.make_spec(4, group_size, symmetric, in_features=cols)
    zp = None if symmetric else r.zero_point.to(torch.int32)
    codes = misaligned(r.codes)
    assert dequantize_kernel(codes, group_size) == "element"
    assert dequantize_kernel(r.codes.cuda(), group_size) == "quads"  # the same codes aligned would take the quads
    scale, zpc = r.scale.cuda(), None if zp is None else zp.cuda()
    got = assert_launches("element", DEQUANTIZE_KERNELS, lambda: _C.dequantize(codes, scale, zpc, spec))
    assert got.is_cuda
    assert_equal(got.cpu(), _C.dequantize(r.codes, r.scale, zp, spec), "dequantized vs CPU")
    assert_equal(got.cpu(), r.dequantized, "dequantized vs quantize_rtn")


# --- pack / unpack ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_unpack_misaligned(bits, gen):
    """cols % 32 == 0 but the input is not 16-byte aligned: the element-wise chunks instead of the 16-byte ones."""
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 64), generator=gen, dtype=torch.int8)
    qm = misaligned(q)
    assert pack_kernel(qm, 64) == "scalar" and pack_kernel(q.cuda(), 64) == "16-byte"
    cpu = _C.pack_rows(q, bits)
    packed = _C.pack_rows(qm, bits)
    assert packed.is_cuda
    assert_equal(packed.cpu(), cpu, "packed")
    pm = misaligned(packed)
    assert pack_kernel(pm, 64) == "scalar"
    back = _C.unpack_rows(pm, bits, 64)
    assert back.is_cuda
    assert_equal(back.cpu(), q, "unpacked")
