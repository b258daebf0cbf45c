"""CUDA routed Hessians from bfloat16 / float16 rows (``HessianAccumulator.add`` with a 16-bit ``x`` on CUDA).

The kernels widen every 16-bit element exactly to fp32 on load, so each precision (fp32 SYRK, TF32 and BF16 tensor
cores) must give bit-for-bit the result of the same values passed as float32 -- H, counts and mass -- on every
gather path: 16-byte vector loads (dim a multiple of 8, aligned rows), the scalar fallback (odd dim, odd row
stride, misaligned base), with and without routing weights, with experts that get no rows. Errors name the first
non-finite element like the float32 path and leave the state untouched. Also the per-expert mass sum (one serial
chain of double adds, tiled through shared memory) against the CPU loop on experts with thousands of rows.
"""

from __future__ import annotations

import pytest
import torch

from gpu_helpers import HESSIAN_PRECISIONS, RawHessians, accumulate_raw, in_wider_rows
from moequant import _C, ops
from testdata import routed_batch
from tolerances import assert_equal

DTYPES = [torch.bfloat16, torch.float16]


def _acc(experts, dim, precision, x, ids, w):
    """An ops.HessianAccumulator on CUDA fed one batch through ``add`` (the pipeline's path: ops' dtype handling and
    the deferred mirror), where gpu_helpers.accumulate_raw calls _C directly."""
    acc = ops.HessianAccumulator(experts, dim, device="cuda", precision=precision)
    acc.add(x, ids.cuda(), None if w is None else w.cuda())
    return acc


def _assert_same(a, b, what):
    """H, counts and mass of ``a`` and ``b`` bit for bit (ops.HessianAccumulator or gpu_helpers.RawHessians)."""
    assert_equal(a.hessians, b.hessians, f"H {what}")
    assert_equal(a.counts, b.counts, f"counts {what}")
    assert_equal(a.mass, b.mass, f"mass {what}")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", HESSIAN_PRECISIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,weighted", [(64, True), (2600, True), (2600, False), (37, True), (8, False)])
def test_16bit_rows_equal_float32_rows(precision, dtype, dim, weighted, gen):
    # 2600: the 16-byte-load gather with two steps per thread; 37: the scalar path; expert 1 gets no rows.
    x, ids, w = routed_batch(gen, [70, 0, 130, 1], dim, weighted=weighted, dtype=dtype)
    a16 = _acc(4, dim, precision, x.cuda(), ids, w)
    a32 = _acc(4, dim, precision, x.float().cuda(), ids, w)
    _assert_same(a16, a32, f"{dtype} vs float32 rows ({precision}, dim {dim})")
    assert (a16.hessians[1] == 0).all() and a16.counts[1] == 0


@pytest.mark.gpu
@pytest.mark.parametrize("precision", HESSIAN_PRECISIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_16bit_strided_and_misaligned_rows(precision, dtype, gen):
    # Straight through _C with the view itself: row stride 51 elements (102 bytes, no 16-byte loads) and a base
    # pointer 6 bytes into the allocation; then an aligned stride of 72 (144 bytes) with an aligned base (16-byte
    # loads where the gather has them: bf16 precision, dim 48 a multiple of 8). NaN around the views.
    for ld, lo, dim in ((51, 3, 40), (72, 8, 48)):
        x, ids, w = routed_batch(gen, [33, 0, 61], dim, dtype=dtype)
        view = in_wider_rows(x, ld, lo)
        got = accumulate_raw(view, ids, w, 3, precision)
        want = accumulate_raw(x.float().cuda(), ids, w, 3, precision)
        _assert_same(got, want, f"strided {dtype} (ld {ld}, offset {lo}) vs float32 ({precision})")


@pytest.mark.gpu
@pytest.mark.parametrize("precision", HESSIAN_PRECISIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_16bit_non_finite_rows_rejected_and_state_kept(precision, dtype, gen):
    for dim in (64, 37):
        x, ids, w = routed_batch(gen, [30, 0, 20], dim, dtype=dtype)
        acc = _acc(3, dim, precision, x.cuda(), ids, w)
        before = RawHessians(acc.hessians.clone(), acc.counts.clone(), acc.mass.clone())
        xb = x.clone()
        xb[33, dim - 2] = float("-inf")
        xb[40, 1] = float("nan")
        with pytest.raises(ValueError, match=rf"x: expected finite values, got Inf at \(33, {dim - 2}\)"):
            acc.add(xb.cuda(), ids.cuda(), w.cuda())
        xb[33, dim - 2] = 0.0
        with pytest.raises(ValueError, match=r"x: expected finite values, got NaN at \(40, 1\)"):
            acc.add(xb.cuda(), ids.cuda(), w.cuda())
        _assert_same(acc, before, f"after a rejected {dtype} batch")


def test_16bit_rows_rejected_by_the_cpu_binding():
    # The C++ CPU accumulator takes float32 rows only (ops.HessianAccumulator converts before calling it).
    H = torch.zeros(1, 4, 4)
    counts, mass = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.float64)
    x = torch.ones(3, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"x: expected dtype float32 \(16-bit rows only on CUDA\), got BFloat16"):
        _C.accumulate_hessian(H, counts, mass, x, torch.zeros(3, dtype=torch.int32), None, 0)
    acc = ops.HessianAccumulator(1, 4)
    acc.add(x, torch.zeros(3, dtype=torch.int32))  # converted: 3 rows of ones
    assert_equal(acc.hessians[0], torch.full((4, 4), 3.0), "CPU accumulator from bf16 rows")


@pytest.mark.gpu
@pytest.mark.parametrize("weighted", [True, False])
def test_mass_of_large_experts_bit_identical_to_cpu(weighted, gen):
    # Several shared-memory tiles of 2048 weights per expert, a partial last tile, exactly one tile, one row, none.
    counts = [5000, 2048, 1, 0, 4097]
    x, ids, w = routed_batch(gen, counts, 8, weighted=weighted)
    if weighted:
        w = w * torch.exp(torch.randn(w.numel(), generator=gen) * 4)  # wide exponent range: order matters
    gpu = _acc(5, 8, "bf16", x.cuda(), ids, w)
    gpu.add(x.cuda(), ids.cuda(), None if w is None else w.cuda())  # mass += a second chain
    cpu = ops.HessianAccumulator(5, 8)
    for _ in range(2):
        cpu.add(x, ids, w)
    assert_equal(gpu.mass.cpu(), cpu.mass, "mass vs the CPU loop")
    assert_equal(gpu.counts.cpu(), torch.tensor(counts) * 2, "counts")
