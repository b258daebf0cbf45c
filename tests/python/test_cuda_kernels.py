"""The CUDA kernels (moequant::cuda behind moequant.ops) against the same calls on CPU tensors.

Every test is marked ``gpu`` and skipped without CUDA (conftest.py). The CPU core is the oracle:
codes, scales, zero points, dequantized values and packed words must be bit-identical (torch.equal); the
Hessian is an fp32 cuBLAS SYRK and is held to the fp32 budget of tolerances.py against a float64 reference;
counts are exact and the routing-weight mass is bit-identical (the kernel sums it in the CPU's order).
The MSE scale search follows the GPU policy of tolerances.py: CUDA's pow may differ from libm's by an ulp, so a
near-tie between two different candidates could flip in a tiny fraction of the groups (in practice none do).
"""

from __future__ import annotations

import pytest
import torch

from moequant import ops
from moequant.ref import accumulate_hessian_ref
from moequant.ref.quant import _abs_pow_sum_f64
from testdata import weight
from tolerances import (
    HESSIAN_ATOL,
    HESSIAN_FP32_RTOL,
    MSE_PARAM_MISMATCH_FRACTION_GPU,
    MSE_TIE_RTOL,
    assert_equal,
)

pytestmark = pytest.mark.gpu


def _cuda(t: torch.Tensor, device: str = "cuda") -> torch.Tensor:
    return t.to(device)


def assert_same_quantization(cpu, gpu) -> None:
    for name in ("codes", "scale", "zero_point", "dequantized"):
        a, b = getattr(gpu, name), getattr(cpu, name)
        assert a.is_cuda, f"{name}: expected a CUDA result"
        assert_equal(a.cpu(), b, name)


# --- RTN (minmax): bit-exact ----------------------------------------------------------------------------------

RTN_CASES = [
    # rows, cols, group_size: awkward shapes first
    (1, 136, 8),
    (7, 136, 8),
    (1, 8, -1),
    (3, 40, 8),
    (64, 512, 128),
    (33, 96, 32),
    (5, 300, -1),
    (16, 4096, -1),
]


@pytest.mark.parametrize("rows, cols, group_size", RTN_CASES)
@pytest.mark.parametrize("bits, symmetric", [(2, False), (3, True), (4, False), (4, True), (5, False), (7, True),
                                             (8, False)])
def test_quantize_rtn_minmax_bit_exact(rows, cols, group_size, bits, symmetric, gen):
    w = weight(rows, cols, gen)
    cpu = ops.quantize_rtn(w, bits, group_size, symmetric)
    gpu = ops.quantize_rtn(_cuda(w), bits, group_size, symmetric)
    assert_same_quantization(cpu, gpu)


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantize_rtn_scale_dtypes_bit_exact(scale_dtype, symmetric, gen):
    # Tiny and large magnitudes exercise fp16 subnormal scales, bf16 rounding and the zero-scale epsilon.
    w = weight(48, 256, gen)
    w[5] *= 1e-6
    w[6] *= 1e3
    w[7, :128] = 0.0
    cpu = ops.quantize_rtn(w, 4, 64, symmetric, scale_dtype=scale_dtype)
    gpu = ops.quantize_rtn(_cuda(w), 4, 64, symmetric, scale_dtype=scale_dtype)
    assert_same_quantization(cpu, gpu)


def test_quantize_rtn_half_inputs_bit_exact(gen):
    # bf16 / fp16 weights: ops converts to float32 before the kernel and defaults scale_dtype to the weight's.
    for dt in (torch.bfloat16, torch.float16):
        w = weight(32, 128, gen).to(dt)
        cpu = ops.quantize_rtn(w, 4, 32, False)
        gpu = ops.quantize_rtn(_cuda(w), 4, 32, False)
        assert_same_quantization(cpu, gpu)


def test_quantize_rtn_strided_rows_bit_exact(gen):
    # A column slice has a leading dimension larger than its width; ops makes it contiguous, the result must not
    # depend on where the rows came from.
    big = weight(24, 200, gen)
    w = big[:, 8:136]
    cpu = ops.quantize_rtn(w.contiguous(), 4, 16, False)
    gpu = ops.quantize_rtn(_cuda(big)[:, 8:136], 4, 16, False)
    assert_same_quantization(cpu, gpu)


def test_quantize_rtn_nonfinite_raises(gen):
    w = weight(8, 64, gen)
    w[3, 17] = float("nan")
    w[5, 2] = float("inf")
    with pytest.raises(ValueError, match=r"w: .*NaN at \(3, 17\)"):
        ops.quantize_rtn(_cuda(w), 4, 32, False)
    with pytest.raises(ValueError, match=r"w: "):
        ops.quantize_rtn(w, 4, 32, False)  # the CPU says the same


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
    return _abs_pow_sum_f64(g.double() - deq.double(), norm)


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
    gpu = ops.quantize_rtn(_cuda(w), bits, group_size, symmetric, scale_search="mse", scale_dtype=scale_dtype)
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
    gpu = ops.quantize_rtn(_cuda(w), bits, 128, symmetric, scale_search="mse", scale_dtype=scale_dtype)
    assert_mse_close(w, cpu, gpu, bits, 128)


def test_quantize_rtn_mse_search_parameters(gen):
    w = torch.randn(16, 256, generator=gen) ** 3
    kw = dict(scale_search="mse", mse_grid=37, mse_min_shrink=0.5, mse_norm=2.0)
    cpu = ops.quantize_rtn(w, 4, 32, False, **kw)
    gpu = ops.quantize_rtn(_cuda(w), 4, 32, False, **kw)
    assert_mse_close(w, cpu, gpu, 4, 32, norm=2.0)


# --- dequantize -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, cols, group_size, bits, symmetric", [(1, 136, 8, 3, False), (17, 256, 64, 4, True),
                                                                     (4, 96, -1, 8, False)])
def test_dequantize_bit_exact(rows, cols, group_size, bits, symmetric, gen):
    r = ops.quantize_rtn(weight(rows, cols, gen), bits, group_size, symmetric)
    zp = None if symmetric else r.zero_point
    cpu = ops.dequantize(r.codes, r.scale, zp, group_size)
    gpu = ops.dequantize(_cuda(r.codes), _cuda(r.scale), None if zp is None else _cuda(zp), group_size)
    assert gpu.is_cuda
    assert_equal(gpu.cpu(), cpu, "dequantized")
    assert_equal(gpu.cpu(), r.dequantized, "dequantized vs quantize_rtn")


# --- pack / unpack ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 7), (3, 31), (2, 33), (5, 136), (1, 1001), (64, 4099)])
def test_pack_unpack_bit_exact(bits, rows, cols, gen):
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(qmin, qmax + 1, (rows, cols), generator=gen, dtype=torch.int8)
    cpu = ops.pack_int32(q, bits)
    gpu = ops.pack_int32(_cuda(q), bits)
    assert gpu.is_cuda and gpu.dtype == torch.int32
    assert_equal(gpu.cpu(), cpu, "packed")
    back = ops.unpack_int32(gpu, bits, cols)
    assert back.is_cuda
    assert_equal(back.cpu(), q, "unpacked")
    assert_equal(back.cpu(), ops.unpack_int32(cpu, bits, cols), "unpacked vs CPU")


def test_pack_golden_words():
    q = torch.tensor([list(range(-8, 0)), list(range(0, 8)), [0] * 8], dtype=torch.int8)
    packed = ops.pack_int32(_cuda(q), 4).cpu()
    expected = torch.tensor([[0x76543210], [0xFEDCBA98 - (1 << 32)], [0x88888888 - (1 << 32)]], dtype=torch.int32)
    assert_equal(packed, expected, "golden")


@pytest.mark.parametrize("bits", [2, 3, 5, 7])
def test_pack_out_of_range_raises(bits, gen):
    q = torch.zeros(4, 37, dtype=torch.int8)
    q[2, 11] = 2 ** (bits - 1)  # qmax + 1
    with pytest.raises(ValueError, match=r"q: .*element 11"):
        ops.pack_int32(_cuda(q), bits)
    with pytest.raises(ValueError, match=r"q: "):
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
    from moequant import _C

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
    gpu = ops.pack_zero_points(_cuda(zp), 3)
    assert_equal(gpu.cpu(), cpu, "packed zero points")
    assert_equal(ops.unpack_zero_points(gpu, 3, 37).cpu(), zp, "unpacked zero points")


# --- Hessian accumulation ---------------------------------------------------------------------------------------


def routed_batch(gen: torch.Generator, n: int, dim: int, experts: int, weighted: bool = True, empty: int = 1):
    """n rows routed over `experts` experts; expert `empty` gets no rows; ~10% of the weights are exactly 0."""
    x = torch.randn(n, dim, generator=gen) * torch.exp(torch.randn(dim, generator=gen))
    ids = torch.randint(0, experts, (n,), generator=gen, dtype=torch.int64)
    ids[ids == empty] = 0
    w = None
    if weighted:
        w = torch.rand(n, generator=gen) * 2.0
        w[torch.rand(n, generator=gen) < 0.1] = 0.0
    return x, ids, w


def assert_hessian_close(acc, x, ids, w, experts) -> None:
    h_ref, counts_ref, _ = accumulate_hessian_ref(x, ids, w, experts)
    h_abs, _, _ = accumulate_hessian_ref(x.abs(), ids, w, experts)  # sum_t c_t |x_t| |x_t|^T
    h = acc.hessians.cpu().double()
    err = (h - h_ref).abs()
    assert (err <= HESSIAN_FP32_RTOL * h_abs + HESSIAN_ATOL).all(), (
        f"max rel err {(err / (h_abs + 1e-300)).max().item():.3g}"
    )
    assert_equal(acc.counts.cpu(), counts_ref, "counts")
    assert torch.equal(acc.hessians, acc.hessians.transpose(1, 2)), "H must be exactly symmetric"


@pytest.mark.parametrize("n, dim, experts, weighted", [(1, 8, 1, False), (2000, 24, 6, True), (3001, 129, 5, False),
                                                       (5000, 256, 16, True)])
def test_hessian_accumulator_cuda_matches_cpu(n, dim, experts, weighted, gen):
    x, ids, w = routed_batch(gen, n, dim, experts, weighted)
    gpu = ops.HessianAccumulator(experts, dim, dtype=torch.float32, device="cuda")
    gpu.add(_cuda(x), _cuda(ids), None if w is None else _cuda(w))
    assert gpu.hessians.is_cuda and gpu.counts.is_cuda and gpu.mass.is_cuda
    assert_hessian_close(gpu, x, ids, w, experts)
    cpu = ops.HessianAccumulator(experts, dim, dtype=torch.float32)
    cpu.add(x, ids, w)
    assert_equal(gpu.counts.cpu(), cpu.counts, "counts vs CPU")
    assert_equal(gpu.mass.cpu(), cpu.mass, "mass vs CPU")  # same float64 sum in the same order
    if experts > 1:
        assert (gpu.hessians[1] == 0).all() and gpu.counts[1] == 0 and gpu.mass[1] == 0  # the empty expert


def test_hessian_accumulator_cuda_accumulates_and_is_deterministic(gen):
    x, ids, w = routed_batch(gen, 2500, 64, 8)
    a = ops.HessianAccumulator(8, 64, device="cuda")
    b = ops.HessianAccumulator(8, 64, device="cuda")
    for s in (slice(0, 1), slice(1, 1000), slice(1000, 1000), slice(1000, 2500)):  # incl. an empty batch
        a.add(_cuda(x[s]), _cuda(ids[s]), _cuda(w[s]))
        b.add(_cuda(x[s]), _cuda(ids[s]), _cuda(w[s]))
    assert_hessian_close(a, x, ids, w, 8)
    assert_equal(a.hessians.cpu(), b.hessians.cpu(), "run-to-run determinism")
    assert_equal(a.mass.cpu(), b.mass.cpu(), "mass determinism")


def test_hessian_strided_input(gen):
    # A column slice of a wider activation buffer (leading dimension > dim) after ops' .contiguous(), and the
    # same with a non-contiguous CUDA tensor.
    x, ids, w = routed_batch(gen, 700, 40, 4)
    wide = torch.randn(700, 56, generator=gen)
    wide[:, 8:48] = x
    acc = ops.HessianAccumulator(4, 40, device="cuda")
    acc.add(_cuda(wide)[:, 8:48], _cuda(ids), _cuda(w))
    assert_hessian_close(acc, x, ids, w, 4)


@pytest.mark.parametrize("bad", [-1, 6, 1 << 20])
def test_hessian_bad_expert_id_raises_and_leaves_state(bad, gen):
    x, ids, w = routed_batch(gen, 300, 16, 6)
    acc = ops.HessianAccumulator(6, 16, device="cuda")
    acc.add(_cuda(x), _cuda(ids), _cuda(w))
    before = (acc.hessians.clone(), acc.counts.clone(), acc.mass.clone())
    ids_bad = ids.clone()
    ids_bad[123] = bad
    with pytest.raises(ValueError, match=r"expert_ids: .*at row 123"):
        acc.add(_cuda(x), _cuda(ids_bad), _cuda(w))
    assert_equal(acc.hessians, before[0], "H after a rejected batch")
    assert_equal(acc.counts, before[1], "counts after a rejected batch")
    assert_equal(acc.mass, before[2], "mass after a rejected batch")


def test_hessian_bad_weights_and_x_raise(gen):
    x, ids, w = routed_batch(gen, 200, 16, 4)
    acc = ops.HessianAccumulator(4, 16, device="cuda")
    for bad in (-0.5, float("nan"), float("inf")):
        wb = w.clone()
        wb[77] = bad
        with pytest.raises(ValueError, match=r"weights: .*at row 77"):
            acc.add(_cuda(x), _cuda(ids), _cuda(wb))
    xb = x.clone()
    xb[150, 3] = float("nan")
    with pytest.raises(ValueError, match=r"x: .*NaN at \(150, 3\)"):
        acc.add(_cuda(xb), _cuda(ids), _cuda(w))
    assert (acc.hessians == 0).all() and (acc.counts == 0).all() and (acc.mass == 0).all()


# --- streams and devices ------------------------------------------------------------------------------------------


def _run_all_ops_on_current_stream(device: str, gen: torch.Generator) -> None:
    """Produces every input on the current (side) stream behind a long sleep, so that a kernel launched on any
    other stream would read unfinished inputs and give wrong results."""
    w_cpu = weight(64, 512, gen)
    x, ids, wt = routed_batch(gen, 1500, 32, 4)
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
    assert_hessian_close(acc, x, ids, wt, 4)


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


@pytest.mark.parametrize("precision, budget", [("tf32", 2e-3), ("bf16", 1.5e-2)])
@pytest.mark.parametrize("n, dim, experts, weighted", [(2000, 24, 6, True), (3001, 129, 5, False),
                                                       (4000, 1100, 3, True)])  # 1100: 3 block columns (512)
def test_hessian_low_precision_within_budget(precision, budget, n, dim, experts, weighted, gen):
    x, ids, w = routed_batch(gen, n, dim, experts, weighted)
    acc = ops.HessianAccumulator(experts, dim, device="cuda", precision=precision)
    acc.add(_cuda(x), _cuda(ids), None if w is None else _cuda(w))
    h_ref, counts_ref, mass_ref = accumulate_hessian_ref(x, ids, w, experts)
    h = acc.hessians.cpu().double()
    for e in range(experts):
        ref = h_ref[e]
        if counts_ref[e] == 0:
            assert (h[e] == 0).all(), "an expert with no rows must stay untouched"
            continue
        rel = ((h[e] - ref).norm() / ref.norm()).item()
        assert rel <= budget, f"expert {e}: relative Frobenius error {rel:.3g} > {budget} ({precision})"
    assert torch.equal(acc.hessians, acc.hessians.transpose(1, 2)), "H must be exactly symmetric"
    assert_equal(acc.counts.cpu(), counts_ref, "counts")
    cpu = ops.HessianAccumulator(experts, dim)
    cpu.add(x, ids, w)
    assert_equal(acc.mass.cpu(), cpu.mass, "mass vs CPU")


def test_hessian_low_precision_accumulates_and_validates(gen):
    x, ids, w = routed_batch(gen, 1500, 64, 4)
    fp32 = ops.HessianAccumulator(4, 64, device="cuda")
    bf16 = ops.HessianAccumulator(4, 64, device="cuda", precision="bf16")
    for s in (slice(0, 700), slice(700, 700), slice(700, 1500)):
        fp32.add(_cuda(x[s]), _cuda(ids[s]), _cuda(w[s]))
        bf16.add(_cuda(x[s]), _cuda(ids[s]), _cuda(w[s]))
    rel = ((bf16.hessians - fp32.hessians).norm() / fp32.hessians.norm()).item()
    assert rel <= 1.5e-2
    before = bf16.hessians.clone()
    ids_bad = ids.clone()
    ids_bad[77] = 9
    with pytest.raises(ValueError, match=r"expert_ids: .*at row 77"):
        bf16.add(_cuda(x), _cuda(ids_bad), _cuda(w))
    assert_equal(bf16.hessians, before, "H after a rejected batch")


def test_hessian_bad_precision_raises():
    with pytest.raises(ValueError, match="precision"):
        ops.HessianAccumulator(2, 8, device="cuda", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        ops.HessianAccumulator(2, 8, device="cuda", precision=1)
    with pytest.raises(ValueError, match="precision"):
        ops.HessianAccumulator(2, 8, device="cpu", precision="bf16")
    from moequant import _C
    H = torch.zeros(2, 8, 8, device="cuda")
    with pytest.raises(ValueError, match="precision"):
        _C.accumulate_hessian(H, torch.zeros(2, dtype=torch.int64, device="cuda"),
                              torch.zeros(2, dtype=torch.float64, device="cuda"), torch.randn(4, 8, device="cuda"),
                              torch.zeros(4, dtype=torch.int32, device="cuda"), None, 3)
