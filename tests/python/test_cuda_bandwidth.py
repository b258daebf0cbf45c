"""The vectorised CUDA paths of quantize_rtn (minmax), dequantize, pack and unpack (issue #4) against the CPU core.

The launchers pick a vectorised kernel when the shape and the pointers allow it and the general kernel otherwise
(kernels/src/quant_pack.cu): minmax RTN with a power-of-two group of 16..512 (a team of group/16 lanes per group),
dequantize with a group size that is a multiple of 4, pack / unpack with rows that are a multiple of 32 elements,
all with 16-byte aligned buffers. These tests drive both sides of every switch with awkward shapes (group counts
that leave teams idle, partial chunks, rows not a multiple of the block's work, misaligned views) and require the
CPU's bits (tolerances.py tier 0), including which element an error names.
"""

from __future__ import annotations

import pytest
import torch

from moequant import ops
from testdata import weight
from tolerances import assert_equal

pytestmark = pytest.mark.gpu


def _misaligned(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CUDA copy of t whose data pointer is one element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device="cuda")
    view = flat[1:].view(t.shape)
    view.copy_(t)
    assert view.is_contiguous() and view.data_ptr() % 16 != 0
    return view


def _same_quant(cpu, gpu) -> None:
    for name in ("codes", "scale", "zero_point", "dequantized"):
        a = getattr(gpu, name)
        assert a.is_cuda, name
        assert_equal(a.cpu(), getattr(cpu, name), name)


# --- quantize_rtn (minmax): the team kernel ------------------------------------------------------------------------

# rows x cols with group sizes 16..512: odd group counts (idle teams in the last warp), a single group, many rows
QUANT_FAST = [(1, 16, 16), (3, 48, 16), (5, 96, 32), (7, 320, 64), (33, 128, 128), (2, 7168, 128), (9, 768, 256),
              (3, 1536, 512), (1, 512, 512), (129, 384, 128)]


@pytest.mark.parametrize("rows, cols, group_size", QUANT_FAST)
@pytest.mark.parametrize("bits, symmetric", [(2, False), (3, True), (4, False), (4, True), (8, False)])
def test_quantize_rtn_team_kernel_bit_exact(rows, cols, group_size, bits, symmetric, gen):
    w = weight(rows, cols, gen)
    _same_quant(ops.quantize_rtn(w, bits, group_size, symmetric), ops.quantize_rtn(w.cuda(), bits, group_size, symmetric))


@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16])
def test_quantize_rtn_team_kernel_scale_dtypes(scale_dtype, gen):
    w = weight(37, 256, gen)
    w[7] *= 1e-6  # fp16 subnormal scales
    for sym in (False, True):
        cpu = ops.quantize_rtn(w, 4, 32, sym, scale_dtype=scale_dtype)
        _same_quant(cpu, ops.quantize_rtn(w.cuda(), 4, 32, sym, scale_dtype=scale_dtype))


def test_quantize_rtn_fallbacks_bit_exact(gen):
    """Shapes and pointers the team kernel does not take: group 8 / 96 / per-channel 300, a misaligned w, a row
    stride that is not a multiple of 4, and a strided view that is (team kernel with ld != cols)."""
    for rows, cols, gs in [(5, 136, 8), (4, 288, 96), (3, 300, -1)]:
        w = weight(rows, cols, gen)
        _same_quant(ops.quantize_rtn(w, 4, gs), ops.quantize_rtn(w.cuda(), 4, gs))
    w = weight(6, 256, gen)
    _same_quant(ops.quantize_rtn(w, 4, 64), ops.quantize_rtn(_misaligned(w.cuda()), 4, 64))
    big = torch.randn(6, 262, generator=gen)  # ld = 262: not a multiple of 4
    _same_quant(ops.quantize_rtn(big[:, 3:131].contiguous(), 4, 32),
                ops.quantize_rtn(big.cuda()[:, 3:131], 4, 32))
    big = torch.randn(6, 264, generator=gen)  # ld = 264, column offset 8: 16-byte aligned rows
    _same_quant(ops.quantize_rtn(big[:, 8:136].contiguous(), 4, 32),
                ops.quantize_rtn(big.cuda()[:, 8:136], 4, 32))


def test_quantize_rtn_team_kernel_first_nonfinite(gen):
    """Several non-finite values in different lanes, quads and groups: the error names the first in row-major order."""
    w = weight(8, 512, gen)
    w[6, 3] = float("inf")
    w[2, 300] = float("-inf")  # group 2 of row 2, lane 3 of its team
    w[2, 261] = float("nan")   # same group, an earlier element in another lane / quad
    w[2, 511] = float("nan")
    with pytest.raises(ValueError, match=r"w: .*NaN at \(2, 261\)"):
        ops.quantize_rtn(w.cuda(), 4, 128, False)
    with pytest.raises(ValueError, match=r"w: .*NaN at \(2, 261\)"):
        ops.quantize_rtn(w, 4, 128, False)


# --- dequantize --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols, group_size", [(1, 4, 4), (3, 20, 4), (7, 300, -1), (33, 384, 128),
                                                    (5, 7168, 128), (1, 18, 6), (9, 1025, -1)])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_paths_bit_exact(rows, cols, group_size, symmetric, gen):
    r = ops.quantize_rtn(weight(rows, cols, gen), 4, group_size, symmetric)
    zp = None if symmetric else r.zero_point
    got = ops.dequantize(r.codes.cuda(), r.scale.cuda(), None if zp is None else zp.cuda(), group_size)
    assert_equal(got.cpu(), r.dequantized, "dequantized")


def test_dequantize_misaligned_codes(gen):
    r = ops.quantize_rtn(weight(4, 64, gen), 4, 16, False)
    got = ops.dequantize(_misaligned(r.codes.cuda()), r.scale.cuda(), r.zero_point.cuda(), 16)
    assert_equal(got.cpu(), r.dequantized, "dequantized")


# --- pack / unpack: 32-element chunks ----------------------------------------------------------------------------

PACK_SHAPES = [(1, 32), (3, 64), (37, 96), (2, 7168), (300, 32), (5, 31), (4, 33), (2, 95), (9, 100), (1, 4099)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("rows, cols", PACK_SHAPES)
def test_pack_unpack_chunks_bit_exact(bits, rows, cols, gen):
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (rows, cols), generator=gen, dtype=torch.int8)
    cpu = ops.pack_int32(q, bits)
    gpu = ops.pack_int32(q.cuda(), bits)
    assert_equal(gpu.cpu(), cpu, "packed")
    assert_equal(ops.unpack_int32(gpu, bits, cols).cpu(), q, "unpacked")


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_unpack_misaligned(bits, gen):
    """cols % 32 == 0 but the buffers are not 16-byte aligned: the per-row chunk path."""
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (6, 64), generator=gen, dtype=torch.int8)
    cpu = ops.pack_int32(q, bits)
    gpu = ops.pack_int32(_misaligned(q.cuda()), bits)
    assert_equal(gpu.cpu(), cpu, "packed")
    assert_equal(ops.unpack_int32(_misaligned(gpu), bits, 64).cpu(), q, "unpacked")


@pytest.mark.parametrize("bits", [2, 4, 5, 7])
@pytest.mark.parametrize("cols", [96, 100])
def test_pack_first_out_of_range(bits, cols):
    """Two bad codes in different chunks and rows (and one in the same chunk, later): the first is named."""
    q = torch.zeros(5, cols, dtype=torch.int8)
    q[3, 70] = -(2 ** (bits - 1)) - 1
    q[1, 45] = 2 ** (bits - 1)
    q[1, 47] = 100
    with pytest.raises(ValueError, match=r"q: .*element 45 of row 1"):
        ops.pack_int32(q.cuda(), bits)
    with pytest.raises(ValueError, match=r"q: .*at element 45\b"):
        ops.pack_int32(q, bits)  # the CPU names the element within the row
