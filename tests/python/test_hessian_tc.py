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

from moequant import _C, ops
from moequant.ref import accumulate_hessian_ref
from tolerances import HESSIAN_ATOL, HESSIAN_BF16_RTOL, HESSIAN_FP32_RTOL, HESSIAN_TF32_RTOL, assert_equal

pytestmark = pytest.mark.gpu

RTOL = {"tf32": HESSIAN_TF32_RTOL, "bf16": HESSIAN_BF16_RTOL}


def _routed(gen, counts, dim, weighted=True, ids_order="shuffled"):
    """Rows routed so that expert e gets exactly counts[e] rows; column scales spread over ~e^(+-2)."""
    ids = torch.cat([torch.full((c,), e, dtype=torch.int64) for e, c in enumerate(counts)])
    if ids_order == "shuffled":
        ids = ids[torch.randperm(ids.numel(), generator=gen)]
    n = ids.numel()
    x = torch.randn(n, dim, generator=gen) * torch.exp(torch.randn(dim, generator=gen))
    w = None
    if weighted:
        w = torch.rand(n, generator=gen) * 2.0
        w[torch.rand(n, generator=gen) < 0.1] = 0.0
    return x, ids, w


def _check(precision, x, ids, w, experts, dim, acc=None):
    if acc is None:
        acc = ops.HessianAccumulator(experts, dim, device="cuda", precision=precision)
        acc.add(x.cuda(), ids.cuda(), None if w is None else w.cuda())
    fp32 = ops.HessianAccumulator(experts, dim, device="cuda")
    fp32.add(x.cuda(), ids.cuda(), None if w is None else w.cuda())
    h_ref, counts_ref, _ = accumulate_hessian_ref(x, ids, w, experts)
    h_abs, _, _ = accumulate_hessian_ref(x.abs(), ids, w, experts)  # sum_t c_t |x_t| |x_t|^T
    h = acc.hessians.cpu().double()
    budget = RTOL[precision] * h_abs + HESSIAN_ATOL
    err = (h - h_ref).abs()
    assert (err <= budget).all(), f"{precision}: max err / |.|-sum {(err / (h_abs + 1e-300)).max().item():.3g}"
    err32 = (h - fp32.hessians.cpu().double()).abs()
    assert (err32 <= budget + HESSIAN_FP32_RTOL * h_abs).all(), f"{precision} vs fp32 CUDA"
    assert torch.equal(acc.hessians, acc.hessians.transpose(1, 2)), "H must be exactly symmetric"
    assert_equal(acc.counts.cpu(), counts_ref, "counts")
    assert_equal(acc.mass.cpu(), fp32.mass.cpu(), "mass vs the fp32 path (same float64 sum)")
    for e in range(experts):
        if counts_ref[e] == 0:
            assert (acc.hessians[e] == 0).all(), f"expert {e} has no rows and must stay exactly zero"
    return acc


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
@pytest.mark.parametrize("dim", [1, 3, 8, 130, 256, 257, 600, 1024, 2600])  # <= 256: one tile; 257, 600, 1024:
# 256-wide tiles (600: an 88-wide edge); 2600: 512-wide tiles with a 40-wide edge. bf16: dims that are multiples of
# 8 take the 16-byte-store gather (8: one 8-wide step; 2600: two steps per thread, the second partly idle)
def test_awkward_dims(precision, dim, gen):
    # expert 1 empty, expert 2 a single row, the others spread over several padded counts
    counts = [70, 0, 1, 64, 65, 130]
    x, ids, w = _routed(gen, counts, dim)
    _check(precision, x, ids, w, len(counts), dim)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_many_buckets_and_edge_tiles(precision, gen):
    # 23 experts with counts 0..~300 (several groups of padded lengths, zero-row and one-row experts), dim 1100 = 4
    # tiles of 256 plus a 76-wide edge: all three tile shapes in every group.
    counts = [0, 1, 2, 63, 64, 65, 127, 128, 129, 191, 0, 300, 5, 17, 256, 257, 33, 1, 90, 150, 0, 64, 200]
    x, ids, w = _routed(gen, counts, 1100, weighted=False)
    _check(precision, x, ids, w, len(counts), 1100)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_sorted_input_and_all_rows_to_one_expert(precision, gen):
    x, ids, w = _routed(gen, [0, 0, 700, 0], 96, ids_order="sorted")
    _check(precision, x, ids, w, 4, 96)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_accumulates_over_batches_with_deferred_mirror(precision, gen):
    counts = [300, 0, 1, 129, 40]
    x, ids, w = _routed(gen, counts, 300)
    acc = ops.HessianAccumulator(5, 300, device="cuda", precision=precision)
    for s in (slice(0, 1), slice(1, 200), slice(200, 200), slice(200, 470)):  # incl. an empty batch
        acc.add(x[s].cuda(), ids[s].cuda(), w[s].cuda())
        h_mid = acc.hessians  # reading in between mirrors; the next add must still accumulate on top
        assert torch.equal(h_mid, h_mid.transpose(1, 2))
    _check(precision, x[:470], ids[:470], w[:470], 5, 300, acc=acc)


@pytest.mark.parametrize("precision", [0, 1, 2])
def test_symmetrize_false_then_symmetrize_is_bit_identical(precision, gen):
    # The deferred mirror gives exactly the immediate one; with symmetrize=False only the row-major upper triangle
    # (the one the updates write) may be read, and it already equals the final values.
    x, ids, w = _routed(gen, [50, 0, 260, 3], 270)
    out = []
    for sym in (True, False):
        H = torch.zeros(4, 270, 270, device="cuda")
        counts = torch.zeros(4, dtype=torch.int64, device="cuda")
        mass = torch.zeros(4, dtype=torch.float64, device="cuda")
        _C.accumulate_hessian(H, counts, mass, x.cuda(), ids.int().cuda(), w.cuda(), precision, symmetrize=sym)
        if not sym:
            upper = torch.triu(H)
            _C.hessian_symmetrize(H)
            assert torch.equal(torch.triu(H), upper), "symmetrize must not change the updated triangle"
        out.append(H)
    assert_equal(out[1], out[0], "deferred vs immediate mirror")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_row_strided_x(precision, gen):
    # ldx = 51 (odd) and dim = 37 (a partial 64-feature gather tile), straight through _C (ops would copy).
    x, ids, w = _routed(gen, [40, 0, 90], 37)
    wide = torch.randn(x.shape[0], 51, generator=gen)
    wide[:, 5:42] = x
    H = torch.zeros(3, 37, 37, device="cuda")
    counts = torch.zeros(3, dtype=torch.int64, device="cuda")
    mass = torch.zeros(3, dtype=torch.float64, device="cuda")
    _C.accumulate_hessian(H, counts, mass, wide.cuda()[:, 5:42], ids.int().cuda(), w.cuda(),
                          {"tf32": 1, "bf16": 2}[precision])
    h_ref, _, _ = accumulate_hessian_ref(x, ids, w, 3)
    h_abs, _, _ = accumulate_hessian_ref(x.abs(), ids, w, 3)
    err = (H.cpu().double() - h_ref).abs()
    assert (err <= RTOL[precision] * h_abs + HESSIAN_ATOL).all()


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_bad_x_reported_for_tensor_core_gather(precision, gen):
    # The tensor-core gather validates x itself (full and partial feature tiles): first offending element, H untouched.
    for dim in (64, 37, 2600):  # 2600: the 16-byte-store gather, bad element in a thread's second step
        x, ids, w = _routed(gen, [30, 0, 20], dim)
        acc = ops.HessianAccumulator(3, dim, device="cuda", precision=precision)
        acc.add(x.cuda(), ids.cuda(), w.cuda())
        before = acc.hessians.clone()
        xb = x.clone()
        xb[33, dim - 2] = float("inf")
        xb[40, 1] = float("nan")
        with pytest.raises(ValueError, match=rf"x: .*Inf at \(33, {dim - 2}\)"):
            acc.add(xb.cuda(), ids.cuda(), w.cuda())
        assert_equal(acc.hessians, before, "H after a rejected batch")
