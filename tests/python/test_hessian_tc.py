"""Tensor-core routed Hessians (``HessianAccumulator(..., precision="tf32" | "bf16")`` on CUDA) on awkward shapes.

The update stage groups experts of similar row counts, writes each expert's scaled rows transposed and zero-padded
to its group's length (a multiple of 32), covers the lower triangle with 256- or 512-wide square tiles (edge tiles
when dim is not a multiple), runs one batched GEMM call per (group, tile shape), and defers the mirror to the next
read of ``hessians``. Each case is checked
element by element against the float64 reference (``moequant.ref``) and against the fp32 CUDA accumulator, with the
written worst-case budgets of tests/python/tolerances.py. Marked ``gpu`` (skipped without CUDA).
"""

from __future__ import annotations

import pytest
import torch

from gpu_helpers import accumulate_raw, in_wider_rows
from moequant import _C, ops
from testdata import routed_batch
from tolerances import (
    HESSIAN_ATOL,
    HESSIAN_BF16_RTOL,
    HESSIAN_FP32_RTOL,
    HESSIAN_TF32_RTOL,
    assert_equal,
    assert_hessian_close,
)

pytestmark = pytest.mark.gpu

RTOL = {"tf32": HESSIAN_TF32_RTOL, "bf16": HESSIAN_BF16_RTOL}


def _check(precision, x, ids, w, experts, dim, acc=None):
    """The tensor-core accumulator (a fresh one fed x, ids, w unless ``acc`` is given) within its budget of the
    float64 reference (tolerances.assert_hessian_close) and of the fp32 CUDA accumulator, with the same mass."""
    if acc is None:
        acc = ops.HessianAccumulator(experts, dim, device="cuda", precision=precision)
        acc.add(x.cuda(), ids.cuda(), None if w is None else w.cuda())
    fp32 = ops.HessianAccumulator(experts, dim, device="cuda")
    fp32.add(x.cuda(), ids.cuda(), None if w is None else w.cuda())
    h_abs = assert_hessian_close(acc, x, ids, w, rtol=RTOL[precision])
    err32 = (acc.hessians.cpu().double() - fp32.hessians.cpu().double()).abs()
    assert (err32 <= (RTOL[precision] + HESSIAN_FP32_RTOL) * h_abs + HESSIAN_ATOL).all(), f"{precision} vs fp32 CUDA"
    assert_equal(acc.mass.cpu(), fp32.mass.cpu(), "mass vs the fp32 path (same float64 sum)")
    return acc


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("dim", [1, 3, 8, 130, 256, 257, 600, 1024, 2600])  # <= 256: one tile; 257, 600, 1024:
# 256-wide tiles (600: an 88-wide edge); 2600: 512-wide tiles with a 40-wide edge. bf16: dims that are multiples of
# 8 take the 16-byte-store gather (8: one 8-wide step; 2600: two steps per thread, the second partly idle)
def test_awkward_dims(precision, dim, gen):
    # expert 1 empty, expert 2 a single row, the others spread over several padded counts
    counts = [70, 0, 1, 64, 65, 130]
    x, ids, w = routed_batch(gen, counts, dim)
    _check(precision, x, ids, w, len(counts), dim)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_many_buckets_and_edge_tiles(precision, gen):
    # 23 experts with counts 0..~300 (several groups of padded lengths, zero-row and one-row experts), dim 1100 = 4
    # tiles of 256 plus a 76-wide edge: all three tile shapes in every group.
    counts = [0, 1, 2, 63, 64, 65, 127, 128, 129, 191, 0, 300, 5, 17, 256, 257, 33, 1, 90, 150, 0, 64, 200]
    x, ids, w = routed_batch(gen, counts, 1100, weighted=False)
    _check(precision, x, ids, w, len(counts), 1100)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_sorted_input_and_all_rows_to_one_expert(precision, gen):
    x, ids, w = routed_batch(gen, [0, 0, 700, 0], 96, order="sorted")
    _check(precision, x, ids, w, 4, 96)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_accumulates_over_batches_with_deferred_mirror(precision, gen):
    counts = [300, 0, 1, 129, 40]
    x, ids, w = routed_batch(gen, counts, 300)
    acc = ops.HessianAccumulator(5, 300, device="cuda", precision=precision)
    for s in (slice(0, 1), slice(1, 200), slice(200, 200), slice(200, 470)):  # incl. an empty batch
        acc.add(x[s].cuda(), ids[s].cuda(), w[s].cuda())
        h_mid = acc.hessians  # reading in between mirrors; the next add must still accumulate on top
        assert torch.equal(h_mid, h_mid.transpose(1, 2))
    _check(precision, x[:470], ids[:470], w[:470], 5, 300, acc=acc)


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_symmetrize_false_then_symmetrize_is_bit_identical(precision, gen):
    # The deferred mirror gives exactly the immediate one; with symmetrize=False only the row-major upper triangle
    # (the one the updates write) may be read, and it already equals the final values.
    x, ids, w = routed_batch(gen, [50, 0, 260, 3], 270)
    immediate = accumulate_raw(x.cuda(), ids, w, 4, precision, symmetrize=True)
    deferred = accumulate_raw(x.cuda(), ids, w, 4, precision, symmetrize=False)
    upper = torch.triu(deferred.hessians)
    _C.hessian_symmetrize(deferred.hessians)
    assert torch.equal(torch.triu(deferred.hessians), upper), "symmetrize must not change the updated triangle"
    assert_equal(deferred.hessians, immediate.hessians, "deferred vs immediate mirror")
    assert_equal(deferred.counts, immediate.counts, "counts")
    assert_equal(deferred.mass, immediate.mass, "mass")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_row_strided_x(precision, gen):
    # ldx = 51 (odd) and dim = 37 (a partial 64-feature gather tile), straight through _C (the view itself; NaN in
    # the columns around it, so a gather that read past the view's rows would fail).
    x, ids, w = routed_batch(gen, [40, 0, 90], 37)
    view = in_wider_rows(x, 51, 5)
    assert_hessian_close(accumulate_raw(view, ids, w, 3, precision), x, ids, w, rtol=RTOL[precision])


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_bad_x_reported_for_tensor_core_gather(precision, gen):
    # The tensor-core gather validates x itself (full and partial feature tiles): first offending element, H untouched.
    for dim in (64, 37, 2600):  # 2600: the 16-byte-store gather, bad element in a thread's second step
        x, ids, w = routed_batch(gen, [30, 0, 20], dim)
        acc = ops.HessianAccumulator(3, dim, device="cuda", precision=precision)
        acc.add(x.cuda(), ids.cuda(), w.cuda())
        before = acc.hessians.clone()
        xb = x.clone()
        xb[33, dim - 2] = float("inf")
        xb[40, 1] = float("nan")
        with pytest.raises(ValueError, match=rf"x: .*Inf at \(33, {dim - 2}\)"):
            acc.add(xb.cuda(), ids.cuda(), w.cuda())
        assert_equal(acc.hessians, before, "H after a rejected batch")
