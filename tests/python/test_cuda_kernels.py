"""The CUDA kernels (moequant::cuda behind moequant.ops) against the same calls on CPU tensors.

Every test is marked ``gpu`` and skipped without CUDA (conftest.py). The CPU core is the oracle:
codes, scales, zero points, dequantized values and packed words must be bit-identical (torch.equal); the
Hessian is an fp32 cuBLAS SYRK and is held to the fp32 budget of tolerances.py against a float64 reference;
counts are exact and the routing-weight mass is bit-identical (the kernel sums it in the CPU's order).
The MSE scale search follows the GPU policy of tolerances.py: CUDA's pow may differ from libm's by an ulp, so a
near-tie between two different candidates could flip in a tiny fraction of the groups (in practice none do).

The launchers pick a vectorised kernel when the shape and the pointers allow it and a general kernel otherwise
(kernels/src/quant_pack.cu); the shape lists here drive both sides of every shape switch with contiguous, aligned
inputs and say which side each shape takes (checked with the mirrors in gpu_helpers.py and, for quantize and
dequantize, against the kernel the profiler saw launch: gpu_helpers.assert_launches). The switches that depend on
the layout (row stride, misaligned pointers) are in test_cuda_bandwidth.py, through _C, because ops would copy.
"""

from __future__ import annotations

import re

import pytest
import torch

from gpu_helpers import (
    DEQUANTIZE_KERNELS,
    RTN_KERNELS,
    accumulate_raw,
    assert_launches,
    assert_same_quantization,
    dequantize_kernel,
    in_wider_rows,
    pack_kernel,
    rtn_kernel,
)
from moequant import _C, ops
from moequant.ref import accumulate_hessian_ref
from moequant.ref.quant import abs_pow_sum_f64
from testdata import routed_batch, split_rows, weight
from tolerances import (
    HESSIAN_BF16_RTOL,
    HESSIAN_TF32_RTOL,
    MSE_PARAM_MISMATCH_FRACTION_GPU,
    MSE_TIE_RTOL,
    assert_equal,
    assert_hessian_close,
)

pytestmark = pytest.mark.gpu


# --- RTN (minmax): bit-exact ----------------------------------------------------------------------------------

# rows, cols, group_size, the kernel launch_quantize_rtn takes for a contiguous input (gpu_helpers.rtn_kernel).
RTN_SHAPES = [
    # team kernel (a power-of-two group of 16..512): odd group counts (idle teams in the last warp), a single group,
    # many rows
    (1, 16, 16, "team"), (3, 48, 16, "team"), (5, 96, 32, "team"), (33, 96, 32, "team"), (7, 320, 64, "team"),
    (33, 128, 128, "team"), (64, 512, 128, "team"), (129, 384, 128, "team"), (2, 7168, 128, "team"),
    (9, 768, 256, "team"), (3, 1536, 512, "team"), (1, 512, 512, "team"),
    # general kernel: groups of 8 and 96, per-channel rows of 8, 300 and 4096 elements
    (1, 136, 8, "general"), (5, 136, 8, "general"), (7, 136, 8, "general"), (3, 40, 8, "general"),
    (4, 288, 96, "general"), (1, 8, -1, "general"), (3, 300, -1, "general"), (5, 300, -1, "general"),
    (16, 4096, -1, "general"),
]


@pytest.mark.parametrize("rows, cols, group_size, kernel", RTN_SHAPES)
@pytest.mark.parametrize("bits, symmetric", [(2, False), (3, True), (4, False), (4, True), (5, False), (7, True),
                                             (8, False)])
def test_quantize_rtn_minmax_bit_exact(rows, cols, group_size, kernel, bits, symmetric, gen):
    w = weight(rows, cols, gen)
    wc = w.cuda()
    assert rtn_kernel(wc, group_size) == kernel
    gpu = assert_launches(kernel, RTN_KERNELS, lambda: ops.quantize_rtn(wc, bits, group_size, symmetric))
    assert_same_quantization(ops.quantize_rtn(w, bits, group_size, symmetric), gpu)


@pytest.mark.parametrize("rows, cols, group_size, kernel", [(48, 256, 64, "team"), (37, 256, 32, "team"),
                                                            (24, 288, 96, "general")])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_rtn_scale_dtypes_bit_exact(rows, cols, group_size, kernel, scale_dtype, symmetric, gen):
    # Tiny and large magnitudes exercise fp16 subnormal scales, bf16 rounding and the zero-scale epsilon.
    w = weight(rows, cols, gen)
    w[5] *= 1e-6
    w[6] *= 1e3
    w[7, :128] = 0.0
    wc = w.cuda()
    assert rtn_kernel(wc, group_size) == kernel
    gpu = assert_launches(kernel, RTN_KERNELS,
                          lambda: ops.quantize_rtn(wc, 4, group_size, symmetric, scale_dtype=scale_dtype))
    assert_same_quantization(ops.quantize_rtn(w, 4, group_size, symmetric, scale_dtype=scale_dtype), gpu)


def test_quantize_rtn_half_inputs_bit_exact(gen):
    # bf16 / fp16 weights: ops converts to float32 before the kernel and defaults scale_dtype to the weight's.
    for dt in (torch.bfloat16, torch.float16):
        w = weight(32, 128, gen).to(dt)
        assert_same_quantization(ops.quantize_rtn(w, 4, 32, False), ops.quantize_rtn(w.cuda(), 4, 32, False))


_INF, _NAN = float("inf"), float("nan")


@pytest.mark.parametrize("rows, cols, group_size, kernel, bad, first", [
    # several non-finite values in different lanes, quads and groups of the team kernel
    (8, 512, 128, "team", [((6, 3), _INF), ((2, 300), -_INF), ((2, 261), _NAN), ((2, 511), _NAN)], "NaN at (2, 261)"),
    (8, 64, 32, "team", [((3, 17), _NAN), ((5, 2), _INF)], "NaN at (3, 17)"),
    # the general kernel: one warp per group, offenders in different lanes of one group
    (8, 96, -1, "general", [((6, 3), _INF), ((2, 70), -_INF), ((2, 50), _NAN)], "NaN at (2, 50)"),
    (8, 136, 8, "general", [((5, 1), _NAN), ((4, 135), -_INF), ((4, 100), _INF)], "Inf at (4, 100)"),
])
def test_quantize_rtn_first_nonfinite(rows, cols, group_size, kernel, bad, first, gen):
    """The error names the first non-finite element in row-major order, as the CPU does."""
    w = weight(rows, cols, gen)
    for at, value in bad:
        w[at] = value
    wc = w.cuda()
    assert rtn_kernel(wc, group_size) == kernel
    pattern = r"^w: expected finite values, got " + re.escape(first) + "$"

    def gpu_call():
        with pytest.raises(ValueError, match=pattern):
            ops.quantize_rtn(wc, 4, group_size, False)

    assert_launches(kernel, RTN_KERNELS, gpu_call)
    with pytest.raises(ValueError, match=pattern):
        ops.quantize_rtn(w, 4, group_size, False)


# --- RTN (MSE search): bit-exact up to the GPU near-tie policy ----------------------------------------------------


def _group_errors(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, gs: int, norm: float):
    """The reference MSE error (libm pow, sequential float64 sum) of each group under the given parameters."""
    rows, cols = w.shape
    g = w.reshape(rows, cols // gs, gs)
    s = scale.unsqueeze(-1)
    z = zero.to(torch.float32).unsqueeze(-1)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.clamp(torch.round(g / s + z), qmin, qmax)
    deq = (q - z) * s
    return abs_pow_sum_f64(g.double() - deq.double(), norm)


def assert_mse_close(w, cpu, gpu, bits, gs, norm=2.4) -> None:
    same = (cpu.scale == gpu.scale.cpu()) & (cpu.zero_point == gpu.zero_point.cpu())
    frac = 1.0 - same.float().mean().item()
    assert frac <= MSE_PARAM_MISMATCH_FRACTION_GPU, f"{frac:.4%} of the groups chose different parameters"
    if not same.all():
        e_cpu = _group_errors(w, cpu.scale, cpu.zero_point, bits, gs, norm)
        e_gpu = _group_errors(w, gpu.scale.cpu(), gpu.zero_point.cpu(), bits, gs, norm)
        d = ((e_gpu - e_cpu).abs() / e_cpu.clamp_min(1e-300))[~same]
        assert (d <= MSE_TIE_RTOL).all(), f"a differing group is not a near-tie: rel diff {d.max().item():.3g}"
    rows_same = same.all(dim=1)  # rows whose every group agrees must have identical codes
    assert_equal(gpu.codes.cpu()[rows_same], cpu.codes[rows_same], "codes")
    assert_equal(gpu.dequantized.cpu()[rows_same], cpu.dequantized[rows_same], "dequantized")


@pytest.mark.parametrize("rows, cols, group_size", [(1, 136, 8), (9, 136, 8), (32, 256, 64), (6, 384, -1)])
@pytest.mark.parametrize("bits, symmetric, scale_dtype", [(4, False, torch.float32), (3, True, torch.bfloat16),
                                                          (5, False, torch.float16), (8, True, torch.float32)])
def test_quantize_rtn_mse(rows, cols, group_size, bits, symmetric, scale_dtype, gen):
    w = weight(rows, cols, gen) * torch.randn(rows, cols, generator=gen).abs()  # heavier tails: the search matters
    cpu = ops.quantize_rtn(w, bits, group_size, symmetric, scale_search="mse", scale_dtype=scale_dtype)
    gpu = ops.quantize_rtn(w.cuda(), bits, group_size, symmetric, scale_search="mse", scale_dtype=scale_dtype)
    assert_mse_close(w, cpu, gpu, bits, group_size if group_size > 0 else cols)


@pytest.mark.parametrize("magnitude", [1.0, 1e-20, 1e17])
@pytest.mark.parametrize("bits, symmetric, scale_dtype", [(4, False, torch.bfloat16), (3, True, torch.float32),
                                                          (2, False, torch.float32)])
def test_quantize_rtn_mse_float_screen(magnitude, bits, symmetric, scale_dtype, gen):
    # The CUDA search screens candidates with a float error and evaluates the exact double error only near the
    # float minimum (search_qparams_screened). Many groups of heavy-tailed weights: the chosen parameters must be
    # the CPU's up to pow() near-ties. 1e-20: every float term underflows to 0 (all candidates pass the screen);
    # 1e17: float terms overflow (the exact search is the fallback).
    w = (torch.randn(256, 2048, generator=gen) ** 3) * magnitude
    cpu = ops.quantize_rtn(w, bits, 128, symmetric, scale_search="mse", scale_dtype=scale_dtype)
    gpu = ops.quantize_rtn(w.cuda(), bits, 128, symmetric, scale_search="mse", scale_dtype=scale_dtype)
    assert_mse_close(w, cpu, gpu, bits, 128)


@pytest.mark.parametrize("case", ["norm<1", "wide-group"])
def test_quantize_rtn_mse_screen_fallbacks(case, gen):
    # Where the float screen's error bound does not hold, the CUDA search runs the exact search for every candidate
    # (search_qparams_screened): mse_norm < 1 on weights whose quantization errors are subnormal in float (terms the
    # screen flushes to 0 weigh d^norm >> FLT_MIN), and a group wider than 2^16 (per-channel, 70,000 columns).
    if case == "norm<1":
        w, gs, norm = (torch.randn(64, 256, generator=gen) ** 3) * 1e-37, 64, 0.5
    else:
        w, gs, norm = torch.randn(3, 70_000, generator=gen) ** 3, -1, 2.4
    kw = dict(scale_search="mse", mse_norm=norm)
    cpu = ops.quantize_rtn(w, 4, gs, False, **kw)
    gpu = ops.quantize_rtn(w.cuda(), 4, gs, False, **kw)
    assert_mse_close(w, cpu, gpu, 4, gs if gs > 0 else w.shape[1], norm=norm)


@pytest.mark.parametrize("cols, group_size, grid", [
    (256, 32, 37),     # the lane-per-candidate screen (search_qparams_lanes), 19 candidates
    (1024, 512, 37),   # its largest group (kLaneScreenMaxN)
    (1040, -1, 37),    # a group of 1040 > kLaneScreenMaxN: the element screen (search_qparams_screened)
    (256, 32, 200),    # 161 candidates > kScreenCache: the element screen, recomputing pass 1's errors
])
def test_quantize_rtn_mse_search_parameters(cols, group_size, grid, gen):
    w = torch.randn(16, cols, generator=gen) ** 3
    kw = dict(scale_search="mse", mse_grid=grid, mse_min_shrink=0.2 if grid == 200 else 0.5, mse_norm=2.0)
    cpu = ops.quantize_rtn(w, 4, group_size, False, **kw)
    gpu = ops.quantize_rtn(w.cuda(), 4, group_size, False, **kw)
    assert_mse_close(w, cpu, gpu, 4, group_size if group_size > 0 else cols, norm=2.0)


# --- dequantize -----------------------------------------------------------------------------------------------

# rows, cols, group_size, bits, the kernel (gpu_helpers.dequantize_kernel): four codes per thread for a group size
# that is a multiple of 4 (per-channel 300 and 96 too), one element per thread for groups of 6 and per-channel 1025
DEQUANT_SHAPES = [
    (1, 4, 4, 4, "quads"), (3, 20, 4, 4, "quads"), (1, 136, 8, 3, "quads"), (17, 256, 64, 4, "quads"),
    (33, 384, 128, 4, "quads"), (5, 7168, 128, 4, "quads"), (7, 300, -1, 4, "quads"), (4, 96, -1, 8, "quads"),
    (1, 18, 6, 4, "element"), (9, 1025, -1, 4, "element"),
]


@pytest.mark.parametrize("rows, cols, group_size, bits, kernel", DEQUANT_SHAPES)
@pytest.mark.parametrize("symmetric", [False, True])
def test_dequantize_bit_exact(rows, cols, group_size, bits, kernel, symmetric, gen):
    r = ops.quantize_rtn(weight(rows, cols, gen), bits, group_size, symmetric)
    zp = None if symmetric else r.zero_point
    codes = r.codes.cuda()
    assert dequantize_kernel(codes, group_size) == kernel
    cpu = ops.dequantize(r.codes, r.scale, zp, group_size, bits)
    scale, zpc = r.scale.cuda(), None if zp is None else zp.cuda()
    gpu = assert_launches(kernel, DEQUANTIZE_KERNELS, lambda: ops.dequantize(codes, scale, zpc, group_size, bits))
    assert gpu.is_cuda
    assert_equal(gpu.cpu(), cpu, "dequantized")
    assert_equal(gpu.cpu(), r.dequantized, "dequantized vs quantize_rtn")


# --- pack / unpack ----------------------------------------------------------------------------------------------

# rows x cols: rows of a multiple of 32 elements take 16-byte loads / stores of each 32-element chunk, the others
# the same chunks element by element (gpu_helpers.pack_kernel); partial last chunks, single elements, many rows
PACK_SHAPES = [(1, 32), (3, 64), (37, 96), (2, 7168), (300, 32), (1, 1), (1, 7), (3, 31), (5, 31), (4, 33), (2, 33),
               (2, 95), (9, 100), (5, 136), (1, 1001), (1, 4099), (64, 4099)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("rows, cols", PACK_SHAPES)
def test_pack_unpack_bit_exact(bits, rows, cols, gen):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(qmin, qmax + 1, (rows, cols), generator=gen, dtype=torch.int8)
    qc = q.cuda()
    cpu = ops.pack_int32(q, bits)
    gpu = ops.pack_int32(qc, bits)
    assert gpu.is_cuda and gpu.dtype == torch.int32
    assert_equal(gpu.cpu(), cpu, "packed")
    back = ops.unpack_int32(gpu, bits, cols)
    assert back.is_cuda
    assert_equal(back.cpu(), q, "unpacked")
    assert_equal(back.cpu(), ops.unpack_int32(cpu, bits, cols), "unpacked vs CPU")


def test_pack_golden_words():
    q = torch.tensor([list(range(-8, 0)), list(range(0, 8)), [0] * 8], dtype=torch.int8)
    packed = ops.pack_int32(q.cuda(), 4).cpu()
    expected = torch.tensor([[0x76543210], [0xFEDCBA98 - (1 << 32)], [0x88888888 - (1 << 32)]], dtype=torch.int32)
    assert_equal(packed, expected, "golden")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7])
@pytest.mark.parametrize("cols", [37, 96, 100])  # scalar chunks with a partial last one, 16-byte chunks, scalar
def test_pack_first_out_of_range(bits, cols):
    """Bad codes in different chunks and rows (and one later in the same chunk): both devices name the first in
    row-major order (the CPU names the element within the row)."""
    q = torch.zeros(5, cols, dtype=torch.int8)
    first = int(cols * 0.45)
    q[3, int(cols * 0.7)] = -(2 ** (bits - 1)) - 1  # qmin - 1, in a later row
    q[1, first] = 2 ** (bits - 1)  # qmax + 1
    q[1, first + 2] = 100
    qc = q.cuda()
    assert pack_kernel(qc, cols) == ("16-byte" if cols == 96 else "scalar")
    with pytest.raises(ValueError, match=rf"^q: .* got {2 ** (bits - 1)} at element {first} of row 1$"):
        ops.pack_int32(qc, bits)
    with pytest.raises(ValueError, match=rf"^q: .* got {2 ** (bits - 1)} at element {first}$"):
        ops.pack_int32(q, bits)


def test_pack_error_then_success(gen):
    """The CUDA call reports through a page-locked host word from torch's pinned cache and clears it itself: a good
    call right after a failed one (which leaves the word set and hands it back to the cache) must pass."""
    bad = torch.zeros(64, 96, dtype=torch.int8, device="cuda")
    bad[5, 9] = 8
    good = torch.randint(-8, 8, (64, 96), generator=gen, dtype=torch.int8)
    for _ in range(3):
        with pytest.raises(ValueError, match=r"^q: expected codes in \[-8, 7\] for 4 bits, got 8 at element 9 of row"):
            ops.pack_int32(bad, 4)
        assert_equal(ops.pack_int32(good.cuda(), 4).cpu(), ops.pack_int32(good, 4), "packed after an error")


@pytest.mark.parametrize("bits", [3, 4, 7])
def test_pack_large_first_out_of_range(bits):
    """Offenders in many blocks of the vectorised path (the kernel only flags; the second pass names the first)."""
    q = torch.zeros(2048, 7168, dtype=torch.int8, device="cuda")
    q[2047, 7167] = -128
    q[1500, 7000] = 2 ** (bits - 1)
    q[1999, 3] = -(2 ** (bits - 1)) - 1
    with pytest.raises(ValueError, match=rf"^q: .* got {2 ** (bits - 1)} at element 7000 of row 1500$"):
        ops.pack_int32(q, bits)


def test_pack_host_flag_argument(gen):
    """_C.pack_rows(q, bits, host_flag=...): a caller-owned pinned word, cleared by the call, set on an error; memory
    that is not page-locked host memory, too small or misaligned is a ValueError naming host_flag."""
    q = torch.randint(-8, 8, (16, 64), generator=gen, dtype=torch.int8)
    flag = torch.ones(8, dtype=torch.uint8).pin_memory()  # stale contents: the call must clear the word
    assert_equal(_C.pack_rows(q.cuda(), 4, host_flag=flag).cpu(), ops.pack_int32(q, 4), "packed")
    assert flag[:4].view(torch.int32).item() == 0
    bad = q.clone()
    bad[3, 17] = -9
    with pytest.raises(ValueError, match=r"^q: .* got -9 at element 17 of row 3$"):
        _C.pack_rows(bad.cuda(), 4, host_flag=flag)
    assert flag[:4].view(torch.int32).item() == 1
    qc = q.cuda()
    with pytest.raises(ValueError, match=r"^host_flag: expected page-locked host memory, got .*(pageable|CUDA does not)"):
        _C.pack_rows(qc, 4, host_flag=torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"^host_flag: expected page-locked host memory, got device memory$"):
        _C.pack_rows(qc, 4, host_flag=torch.zeros(4, dtype=torch.uint8, device="cuda"))
    with pytest.raises(ValueError, match=r"^host_flag: expected a tensor of at least 4 bytes, got 2 bytes$"):
        _C.pack_rows(qc, 4, host_flag=torch.zeros(2, dtype=torch.uint8).pin_memory())
    with pytest.raises(ValueError, match=r"^host_flag: expected a 4-byte aligned address"):
        _C.pack_rows(qc, 4, host_flag=flag[1:])


def test_pack_zero_points_bit_exact(gen):
    zp = torch.randint(-4, 4, (37, 5), generator=gen, dtype=torch.int8)
    cpu = ops.pack_zero_points(zp, 3)
    gpu = ops.pack_zero_points(zp.cuda(), 3)
    assert_equal(gpu.cpu(), cpu, "packed zero points")
    assert_equal(ops.unpack_zero_points(gpu, 3, 37).cpu(), zp, "unpacked zero points")


# --- Hessian accumulation ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, dim, experts, weighted", [(1, 8, 1, False), (2000, 24, 6, True), (3001, 129, 5, False),
                                                       (5000, 256, 16, True)])
def test_hessian_accumulator_cuda_matches_cpu(n, dim, experts, weighted, gen):
    x, ids, w = routed_batch(gen, split_rows(n, experts, empty=1), dim, weighted=weighted)
    gpu = ops.HessianAccumulator(experts, dim, dtype=torch.float32, device="cuda")
    gpu.add(x.cuda(), ids.cuda(), None if w is None else w.cuda())
    assert gpu.hessians.is_cuda and gpu.counts.is_cuda and gpu.mass.is_cuda
    assert_hessian_close(gpu, x, ids, w)
    cpu = ops.HessianAccumulator(experts, dim, dtype=torch.float32)
    cpu.add(x, ids, w)
    assert_equal(gpu.counts.cpu(), cpu.counts, "counts vs CPU")
    assert_equal(gpu.mass.cpu(), cpu.mass, "mass vs CPU")  # same float64 sum in the same order
    if experts > 1:
        assert (gpu.hessians[1] == 0).all() and gpu.counts[1] == 0 and gpu.mass[1] == 0  # the empty expert


def test_hessian_accumulator_cuda_accumulates_and_is_deterministic(gen):
    x, ids, w = routed_batch(gen, split_rows(2500, 8, empty=1), 64)
    a = ops.HessianAccumulator(8, 64, device="cuda")
    b = ops.HessianAccumulator(8, 64, device="cuda")
    for s in (slice(0, 1), slice(1, 1000), slice(1000, 1000), slice(1000, 2500)):  # incl. an empty batch
        a.add(x[s].cuda(), ids[s].cuda(), w[s].cuda())
        b.add(x[s].cuda(), ids[s].cuda(), w[s].cuda())
    assert_hessian_close(a, x, ids, w)
    assert_equal(a.hessians.cpu(), b.hessians.cpu(), "run-to-run determinism")
    assert_equal(a.mass.cpu(), b.mass.cpu(), "mass determinism")


def test_hessian_strided_input(gen):
    # A column slice of a wider activation buffer (row stride 56 > dim 40, NaN in the other columns): ops.add passes
    # such a view on as it is (unit column stride, stride(0) >= dim; python/moequant/ops.py), and _C gets the view
    # directly as well, so the fp32 gather reads x with ldx = 56 either way.
    x, ids, w = routed_batch(gen, split_rows(700, 4, empty=1), 40)
    view = in_wider_rows(x, 56, 8)
    acc = ops.HessianAccumulator(4, 40, device="cuda")
    acc.add(view, ids.cuda(), w.cuda())
    assert_hessian_close(acc, x, ids, w)
    assert_hessian_close(accumulate_raw(view, ids, w, 4), x, ids, w)


@pytest.mark.parametrize("bad", [-1, 6, 1 << 20])
def test_hessian_bad_expert_id_raises_and_leaves_state(bad, gen):
    x, ids, w = routed_batch(gen, split_rows(300, 6, empty=1), 16)
    acc = ops.HessianAccumulator(6, 16, device="cuda")
    acc.add(x.cuda(), ids.cuda(), w.cuda())
    before = (acc.hessians.clone(), acc.counts.clone(), acc.mass.clone())
    ids_bad = ids.clone()
    ids_bad[123] = bad
    with pytest.raises(ValueError, match=r"expert_ids: .*at row 123"):
        acc.add(x.cuda(), ids_bad.cuda(), w.cuda())
    assert_equal(acc.hessians, before[0], "H after a rejected batch")
    assert_equal(acc.counts, before[1], "counts after a rejected batch")
    assert_equal(acc.mass, before[2], "mass after a rejected batch")


def test_hessian_bad_weights_and_x_raise(gen):
    x, ids, w = routed_batch(gen, split_rows(200, 4, empty=1), 16)
    acc = ops.HessianAccumulator(4, 16, device="cuda")
    for bad in (-0.5, float("nan"), float("inf")):
        wb = w.clone()
        wb[77] = bad
        with pytest.raises(ValueError, match=r"weights: .*at row 77"):
            acc.add(x.cuda(), ids.cuda(), wb.cuda())
    xb = x.clone()
    xb[150, 3] = float("nan")
    with pytest.raises(ValueError, match=r"x: .*NaN at \(150, 3\)"):
        acc.add(xb.cuda(), ids.cuda(), w.cuda())
    assert (acc.hessians == 0).all() and (acc.counts == 0).all() and (acc.mass == 0).all()


# --- streams and devices ------------------------------------------------------------------------------------------


def _run_all_ops_on_current_stream(device: str, gen: torch.Generator) -> None:
    """Produces every input on the current (side) stream behind a long sleep, so that a kernel launched on any
    other stream would read unfinished inputs and give wrong results."""
    w_cpu = weight(64, 512, gen)
    x, ids, wt = routed_batch(gen, split_rows(1500, 4, empty=1), 32)
    q_cpu = torch.randint(-4, 4, (9, 77), generator=gen, dtype=torch.int8)
    base = [t.to(device) for t in (w_cpu, x, q_cpu)]
    ids_d, wt_d = ids.to(device), wt.to(device)
    torch.cuda.current_stream(device).wait_stream(torch.cuda.default_stream(device))
    torch.cuda._sleep(100_000_000)  # ~50-100 ms of GPU time on the current stream
    w_d = base[0] * 1.0  # produced on the current stream, after the sleep
    x_d = base[1] * 1.0
    q_d = base[2].clone()
    r = ops.quantize_rtn(w_d, 4, 128, False)
    packed = ops.pack_int32(q_d, 3)
    acc = ops.HessianAccumulator(4, 32, device=device)
    acc.add(x_d, ids_d, wt_d)
    torch.cuda.current_stream(device).synchronize()
    assert r.codes.device == torch.device(device)
    assert_same_quantization(ops.quantize_rtn(w_cpu, 4, 128, False), r)
    assert_equal(packed.cpu(), ops.pack_int32(q_cpu, 3), "packed")
    assert_hessian_close(acc, x, ids, wt)


def test_cuda_ops_run_on_the_current_stream(gen):
    device = f"cuda:{torch.cuda.current_device()}"
    s = torch.cuda.Stream(device=device)
    with torch.cuda.stream(s):
        _run_all_ops_on_current_stream(device, gen)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_cuda_ops_on_a_non_default_device_use_its_current_stream(gen):
    # The tensors live on the last device. torch.cuda.stream(s) makes s current on that device: the kernels must
    # run there and on s, not on device 0 or a default stream.
    index = torch.cuda.device_count() - 1
    device = f"cuda:{index}"
    s = torch.cuda.Stream(device=device)
    with torch.cuda.stream(s):
        _run_all_ops_on_current_stream(device, gen)
    # With device 0 current, a call on that device's tensors still runs there, and device 0 stays current.
    with torch.cuda.device(0):
        w = weight(16, 256, gen)
        r = ops.quantize_rtn(w.to(device), 4, 64, True)
        assert torch.cuda.current_device() == 0
        assert r.codes.device == torch.device(device)
        assert_same_quantization(ops.quantize_rtn(w, 4, 64, True), r)


# --- tensor-core Hessians (precision="tf32" / "bf16") ------------------------------------------------------------


@pytest.mark.parametrize("precision, budget, rtol", [("tf32", 2e-3, HESSIAN_TF32_RTOL),
                                                     ("bf16", 1.5e-2, HESSIAN_BF16_RTOL)])
@pytest.mark.parametrize("n, dim, experts, weighted", [(2000, 24, 6, True), (3001, 129, 5, False),
                                                       (4000, 1100, 3, True)])  # 1100: 3 block columns (512)
def test_hessian_low_precision_within_budget(precision, budget, rtol, n, dim, experts, weighted, gen):
    # elementwise: the written worst-case budget of tolerances.py; per expert: the typical Frobenius error
    x, ids, w = routed_batch(gen, split_rows(n, experts, empty=1), dim, weighted=weighted)
    acc = ops.HessianAccumulator(experts, dim, device="cuda", precision=precision)
    acc.add(x.cuda(), ids.cuda(), None if w is None else w.cuda())
    assert_hessian_close(acc, x, ids, w, rtol=rtol)
    h_ref, counts_ref, _ = accumulate_hessian_ref(x, ids, w, experts)
    h = acc.hessians.cpu().double()
    for e in range(experts):
        if counts_ref[e] > 0:
            rel = ((h[e] - h_ref[e]).norm() / h_ref[e].norm()).item()
            assert rel <= budget, f"expert {e}: relative Frobenius error {rel:.3g} > {budget} ({precision})"
    cpu = ops.HessianAccumulator(experts, dim)
    cpu.add(x, ids, w)
    assert_equal(acc.mass.cpu(), cpu.mass, "mass vs CPU")


def test_hessian_low_precision_accumulates_and_validates(gen):
    x, ids, w = routed_batch(gen, split_rows(1500, 4, empty=1), 64)
    fp32 = ops.HessianAccumulator(4, 64, device="cuda")
    bf16 = ops.HessianAccumulator(4, 64, device="cuda", precision="bf16")
    for s in (slice(0, 700), slice(700, 700), slice(700, 1500)):
        fp32.add(x[s].cuda(), ids[s].cuda(), w[s].cuda())
        bf16.add(x[s].cuda(), ids[s].cuda(), w[s].cuda())
    rel = ((bf16.hessians - fp32.hessians).norm() / fp32.hessians.norm()).item()
    assert rel <= 1.5e-2
    before = bf16.hessians.clone()
    ids_bad = ids.clone()
    ids_bad[77] = 9
    with pytest.raises(ValueError, match=r"expert_ids: .*at row 77"):
        bf16.add(x.cuda(), ids_bad.cuda(), w.cuda())
    assert_equal(bf16.hessians, before, "H after a rejected batch")


def test_hessian_bad_precision_raises():
    with pytest.raises(ValueError, match="precision"):
        ops.HessianAccumulator(2, 8, device="cuda", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        ops.HessianAccumulator(2, 8, device="cuda", precision=1)
    with pytest.raises(ValueError, match="precision"):
        ops.HessianAccumulator(2, 8, device="cpu", precision="bf16")
    H = torch.zeros(2, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="precision"):
        _C.accumulate_hessian(H, torch.zeros(2, dtype=torch.int64, device="cuda"),
                              torch.zeros(2, dtype=torch.float64, device="cuda"), torch.randn(4, 8, device="cuda"),
                              torch.zeros(4, dtype=torch.int32, device="cuda"), None, 3)
