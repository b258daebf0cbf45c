"""Kernels on GPUs with less shared memory per block (issue #11, "Trust"): the batched GPTQ and the Hadamard
transform with the shared memory per block capped through the test-only ``max_shared_memory_bytes`` of ``_C``
(kernels.h; 0 = the device's opt-in limit), so that a large-memory GPU (H100 / H200: 227 KiB) runs the
configurations of the small ones.

Caps: 99 KiB = 101376 bytes (sm_86, sm_89, sm_120) and 48 KiB = 49152 (what every kernel gets without opting in, the
smallest cap the API accepts). kernels/src/smem_plan.h chooses per launch (tests/cpp/test_smem_plan.cpp checks the
choice on the CPU):

- batched GPTQ: chol_diag_kernel<S> / diag_inverse_kernel<S> keep S of their two 128 x 129 float arrays in shared
  memory (2 needs 132,096 bytes, 1 needs 66,048, 0 none); gptq_block_kernel<ACT, 4, SMEM> copies U's 128 x 128
  block into shared memory (66,048 bytes) or reads it from global memory;
- Hadamard: fewer rows per CTA where the default batch does not fit (28 x 32 .. 28 x 256 at 48 KiB), and
  hadamard_scratch_kernel<T, m, k> (one row per CTA in global memory) where a single row does not fit (32768 and
  28 x 1024 at 99 KiB; also 12288 .. 24576 at 48 KiB).

Every configuration does the same floating-point operations in the same order, so the capped results must equal the
uncapped ones bit for bit (torch.equal), and the uncapped ones are held to the references of the existing tests
(the CPU solver with test_gptq_batched.compare's policy; the float64 Kronecker reference with test_hadamard's fp32
budget). The launch tests read the kernels that ran from torch.profiler's trace (name, grid, dynamic + static shared
memory), so a cap that changed nothing would fail them.
"""

from __future__ import annotations

import json
import re
import types

import pytest
import torch

from moequant import _C, ops
from test_gptq_batched import compare, problem
from test_hadamard import _budget, _fast_ref64

pytestmark = pytest.mark.gpu

CAP_99K = 99 * 1024  # 101376: the opt-in shared memory per block of sm_86, sm_89 and sm_120
CAP_48K = 48 * 1024  # 49152: the default (no opt-in) of every architecture
CAPS = [CAP_99K, CAP_48K]

# bytes of the planned configurations (smem_plan.h: chol_array_bytes(128), gptq_block_bytes(128))
CHOL_ARRAY = 128 * 129 * 4  # 66048
BLOCK_U = 128 * 129 * 4  # 66048


def device_limit() -> int:
    """The device's opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    limit = getattr(props, "shared_memory_per_block_optin", None)
    assert limit, "torch does not report shared_memory_per_block_optin for this device"
    return int(limit)


def effective(cap: int) -> int:
    """What the kernels plan with: the device's limit, or the cap when it is smaller (0 = no cap)."""
    return device_limit() if cap == 0 else min(cap, device_limit())


def needs_large_device(cap: int) -> None:
    """Skips when the device's own limit is already at or below `cap` (then the capped run is the default run and
    the comparison proves nothing): the point is a large-memory GPU playing a small one."""
    if device_limit() <= cap:
        pytest.skip(f"the device allows only {device_limit()} bytes of shared memory per block (<= the cap {cap})")


# --- which kernels ran, with their launch configuration -------------------------------------------------------------


def kernel_launches(fn, tmp_path) -> list[dict]:
    """The CUDA kernels one call of fn() launched, from torch.profiler's chrome trace: dicts with ``name`` (demangled),
    ``grid`` and ``block`` (3-lists) and ``smem`` (static + dynamic shared memory per block, in bytes)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    events = json.loads(path.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    out = []
    for e in events:
        if str(e.get("cat", "")).lower() != "kernel":
            continue
        args = e.get("args", {})
        out.append(dict(name=e["name"], grid=list(args["grid"]), block=list(args["block"]),
                        smem=int(args["shared memory"])))
    assert out, "the profiler recorded no kernel"
    return out


def ours(launches: list[dict]) -> list[dict]:
    """The launches of moequant's own kernels (cuBLAS plans its own shared memory)."""
    return [k for k in launches if "moequant" in k["name"]]


def template_args(launches: list[dict], kernel: str) -> list[str]:
    """The template argument lists of every launch of `kernel` (e.g. ``"2"`` for chol_diag_kernel<2>)."""
    found = []
    for k in launches:
        m = re.search(rf"(?<!\w){re.escape(kernel)}<([^>]*)>", k["name"])
        if m:
            found.append(m.group(1).replace(" ", ""))
    return found


# --- batched GPTQ -------------------------------------------------------------------------------------------------


def gptq_raw(w, h, kw, cap):
    """One _C.gptq_batched call with the shared memory capped at `cap` (0: the device's limit): the call
    ops.gptq_quantize_batched makes, plus the cap. Returns the six result tensors (codes, scale, zero, dequantized,
    losses, escalations)."""
    sd = kw.get("scale_dtype") or torch.float32
    spec = ops.make_spec(kw.get("bits", 4), kw.get("group_size", 128), kw.get("symmetric", False),
                         in_features=w.shape[2], scale_search=kw.get("scale_search", "minmax"),
                         mse_grid=kw.get("mse_grid", 100), scale_dtype=sd)
    return _C.gptq_batched(w.contiguous(), h.contiguous(), spec, bool(kw.get("act_order", False)),
                           float(kw.get("damp", 0.01)), int(kw.get("block_size", 128)), True, False,
                           max_shared_memory_bytes=cap)


def as_results(raw, cols, kw):
    """The raw tuple as the per-expert objects test_gptq_batched.compare reads."""
    codes, scale, zero, deq, losses, esc = raw
    gs = cols if kw.get("group_size", 128) in (None, -1) else kw.get("group_size", 128)
    return [types.SimpleNamespace(codes=codes[e], scale=scale[e], zero_point=zero[e], dequantized=deq[e],
                                  loss=float(losses[e]), escalations=int(esc[e]), group_size=gs)
            for e in range(codes.shape[0])]


def assert_same_raw(got, want, what):
    names = ("codes", "scale", "zero_point", "dequantized", "losses", "escalations")
    for name, a, b in zip(names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name} differs in dtype or shape"
        assert torch.equal(a, b), (f"{what}: {name} is not bit-identical to the uncapped run "
                                   f"({int((a != b).sum())} of {a.numel()} entries differ)")


def gpu_hessians(E, cols, tokens, seed):
    """E float32 Hessians X^T X / tokens of correlated, unevenly scaled features, built on the GPU (float64 GEMMs):
    the CPU construction of test_gptq_batched.problem takes minutes at 7168 columns. tokens < cols makes H singular,
    which the damping handles as on a real layer with few tokens."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    hs = []
    for _ in range(E):
        mix = torch.randn(cols, cols, generator=g, device="cuda", dtype=torch.float64) * 0.05
        mix += torch.eye(cols, device="cuda", dtype=torch.float64)
        x = torch.randn(tokens, cols, generator=g, device="cuda", dtype=torch.float64) @ mix
        x *= torch.exp(torch.randn(cols, generator=g, device="cuda", dtype=torch.float64))
        hs.append((x.t() @ x / tokens).float())
    return torch.stack(hs)


# E, rows, cols, kwargs; every cols >= 128, so the uncapped run (on a >= 129 KiB device) takes the two-array
# Cholesky and the shared-memory column kernel, and the caps take the others. Compared with the CPU solver too.
CPU_CASES = [
    (2, 48, 2048, dict(bits=4, group_size=128, act_order=False, block_size=128)),  # DeepSeek-V3 down / Qwen3 gate
    (2, 32, 2048, dict(bits=4, group_size=128, act_order=True, block_size=128, scale_search="mse", mse_grid=20)),
    (2, 40, 768, dict(bits=4, group_size=128, act_order=True, block_size=128)),  # Qwen3-30B-A3B down
    (2, 24, 2880, dict(bits=4, group_size=32, act_order=False, block_size=128)),  # gpt-oss: a last block of 64
    (2, 33, 200, dict(bits=3, group_size=40, act_order=False, block_size=111, symmetric=True)),  # 111: > 48 KiB
    (3, 16, 256, dict(bits=8, group_size=-1, act_order=True, block_size=100)),  # a block that fits 48 KiB
]


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("E,rows,cols,kw", CPU_CASES)
def test_gptq_capped_is_bit_identical_and_matches_cpu(E, rows, cols, kw, cap, gen, make_hessian):
    needs_large_device(cap)
    w, h = problem(E, rows, cols, gen, make_hessian)
    wc, hc = w.cuda(), h.cuda()
    base = gptq_raw(wc, hc, kw, 0)
    capped = gptq_raw(wc, hc, kw, cap)
    assert_same_raw(capped, base, f"cap {cap}")
    compare(w, h, as_results(capped, cols, kw), **kw)  # and both against the CPU solver (test_gptq_batched policy)


# The shapes whose Cholesky needed 132 KB: the hidden sizes of DeepSeek-V3 (7168) and Mixtral (4096) as in_features
# (gate / up), Mixtral's expert width 14336 (down) with few rows. GPU only (the CPU solver takes minutes here):
# bit-identical to the uncapped run, which test_gptq_batched holds to the CPU solver on smaller shapes.
LARGE_CASES = [
    (2, 32, 7168, dict(bits=4, group_size=128, act_order=False), 1024),
    (2, 32, 7168, dict(bits=4, group_size=128, act_order=True), 1024),
    (2, 64, 4096, dict(bits=4, group_size=128, act_order=False), 2048),
    (1, 16, 14336, dict(bits=4, group_size=128, act_order=True), 1024),
]


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("E,rows,cols,kw,tokens", LARGE_CASES)
def test_gptq_capped_is_bit_identical_at_model_widths(E, rows, cols, kw, tokens, cap):
    needs_large_device(cap)
    h = gpu_hessians(E, cols, tokens, seed=cols)
    w = torch.randn(E, rows, cols, generator=torch.Generator(device="cuda").manual_seed(7), device="cuda") * 0.05
    base = gptq_raw(w, h, kw, 0)
    capped = gptq_raw(w, h, kw, cap)
    assert_same_raw(capped, base, f"cap {cap}")
    losses = base[4]
    assert bool(torch.isfinite(base[3]).all()) and bool((losses > 0).all()), "the uncapped run itself looks broken"


@pytest.mark.parametrize("cap", CAPS)
def test_gptq_capped_escalation_and_failure(cap, gen, make_hessian):
    """The pivot-failure flag of chol_diag_kernel in every storage mode: an indefinite expert escalates exactly as
    uncapped (and as the CPU), a hopeless one is the same numerical error."""
    needs_large_device(cap)
    w, h = problem(3, 32, 256, gen, make_hessian)
    a, b = 3, 7
    h[1, a, b] = h[1, b, a] = 1.5 * float((h[1, a, a] * h[1, b, b]).sqrt())
    kw = dict(group_size=32)
    base = gptq_raw(w.cuda(), h.cuda(), kw, 0)
    capped = gptq_raw(w.cuda(), h.cuda(), kw, cap)
    assert_same_raw(capped, base, f"cap {cap}")
    assert capped[5].tolist()[1] >= 1 and capped[5].tolist()[0] == 0 and capped[5].tolist()[2] == 0
    compare(w, h, as_results(capped, 256, kw), **kw)
    hb = torch.eye(256).repeat(2, 1, 1)
    hb[1, 0, 1] = hb[1, 1, 0] = 1e9
    with pytest.raises(RuntimeError, match="expert 1"):
        gptq_raw(torch.randn(2, 8, 256).cuda(), hb.cuda(), kw, cap)


@pytest.mark.parametrize("cap", [0] + CAPS)
def test_gptq_cap_launches_the_planned_kernels(cap, tmp_path, gen, make_hessian):
    """The kernels that ran under each cap, from the profiler: the Cholesky diagonal-block kernels with S arrays in
    shared memory (2 / 1 / 0 for >= 132096 / >= 66048 / less) and the column kernel with or without its shared copy
    of U (66048 bytes), and no moequant kernel above the limit it was given."""
    w, h = problem(2, 32, 512, gen, make_hessian)
    kw = dict(bits=4, group_size=128, act_order=False, block_size=128)
    launches = kernel_launches(lambda: gptq_raw(w.cuda(), h.cuda(), kw, cap), tmp_path)
    limit = effective(cap)
    s = 2 if limit >= 2 * CHOL_ARRAY else 1 if limit >= CHOL_ARRAY else 0
    block_smem = "true" if limit >= BLOCK_U else "false"
    assert template_args(launches, "chol_diag_kernel") == [str(s)] * 4, [k["name"] for k in launches]
    assert template_args(launches, "diag_inverse_kernel") == [str(s)]
    assert template_args(launches, "gptq_block_kernel") == [f"false,4,{block_smem}"] * 4
    for k in ours(launches):
        assert k["smem"] <= limit, f"{k['name']} took {k['smem']} bytes of shared memory, the limit is {limit}"
    chol = [k for k in launches if "chol_diag_kernel" in k["name"]]
    assert [k["smem"] for k in chol] == [s * CHOL_ARRAY] * 4
    if cap != 0 and device_limit() > cap:  # the cap changed the configuration on this device
        base = kernel_launches(lambda: gptq_raw(w.cuda(), h.cuda(), kw, 0), tmp_path)
        assert template_args(base, "chol_diag_kernel") != template_args(launches, "chol_diag_kernel")


# --- Hadamard -------------------------------------------------------------------------------------------------------

# n, rows: the long rows (one row per CTA: 32768 = 132 KiB, 28 x 1024 = 112 KiB, 24576 = 99 KiB exactly, 20480,
# 16384, 14336 (Mixtral's expert width), 12288), the batched lengths whose batch shrinks at 48 KiB (28 x 32 ..
# 28 x 256, 7168 = DeepSeek-V3's hidden size), lengths that never change (control). Rows exceed two CTAs per SM of
# the scratch kernel (several launches sharing one scratch buffer) where that is cheap, and are not a multiple of
# the rows per CTA.
HADAMARD_CASES = [
    (32768, 600), (28 * 1024, 600), (24576, 301), (20480, 301), (16384, 301), (14336, 301), (12288, 301),
    (40 * 256, 37), (28 * 256, 99), (28 * 32, 1000), (28 * 64, 77), (2048, 513), (768, 70), (16, 333),
]


@pytest.mark.parametrize("cap", CAPS)
@pytest.mark.parametrize("n,rows", HADAMARD_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_capped_is_bit_identical(n, rows, dtype, cap):
    needs_large_device(cap)
    g = torch.Generator(device="cuda").manual_seed(n + rows)
    x = (torch.randn(rows, n, generator=g, device="cuda") *
         torch.logspace(-2, 2, rows, device="cuda").unsqueeze(1)).to(dtype)
    base = _C.hadamard(x)
    capped = _C.hadamard(x, max_shared_memory_bytes=cap)
    assert capped.dtype == dtype and capped.shape == x.shape
    assert torch.equal(capped, base), f"{int((capped != base).sum())} of {capped.numel()} outputs differ"
    # and the float64 reference (test_hadamard's budget), on the first and last rows
    ends = torch.cat((x[:3], x[-3:])).cpu().float()
    got = torch.cat((capped[:3], capped[-3:])).cpu().double()
    ref = _fast_ref64(ends)
    if dtype == torch.float32:
        assert bool(((got - ref).abs() <= _budget(ends)).all())
    else:
        assert bool(((got - ref).abs() <= 2.0**-8 * ref.abs() + _budget(ends) + 2.0**-24).all())


def hadamard_bytes(n: int, rows: int) -> int:
    """A mirror of smem_plan.h's hadamard_reg_bytes for the lengths below (padded layout: 33 floats per 32, except
    28 x 1024, which runs unpadded)."""
    elems = rows * n
    return 4 * (elems if n == 28 * 1024 else elems + elems // 32)


@pytest.mark.parametrize("cap", [0] + CAPS)
def test_hadamard_cap_launches_the_planned_kernels(cap, tmp_path):
    """Which kernel ran and with how much shared memory: a row that does not fit the limit runs in the scratch
    kernel (one CTA per row, no dynamic shared memory, launches of at most two CTAs per SM); 28 x 256 takes two rows
    per CTA (59,136 bytes) unless the limit allows only one (29,568 bytes, twice the CTAs)."""
    limit = effective(cap)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    rows = 2 * sms + 7  # two scratch launches
    for n, m, k in ((32768, 1, 15), (28 * 1024, 28, 10), (14336, 28, 9)):
        x = torch.randn(rows, n, device="cuda")
        launches = ours(kernel_launches(lambda: _C.hadamard(x, max_shared_memory_bytes=cap), tmp_path))
        if hadamard_bytes(n, 1) <= limit:
            assert [k_["name"] for k_ in launches if "hadamard_reg_kernel" in k_["name"]], launches
            assert template_args(launches, "hadamard_reg_kernel") == [f"float,{m},{k}"]
            assert template_args(launches, "hadamard_scratch_kernel") == []
            assert launches[0]["grid"][0] == rows and launches[0]["smem"] == hadamard_bytes(n, 1)
        else:
            assert template_args(launches, "hadamard_reg_kernel") == []
            assert template_args(launches, "hadamard_scratch_kernel") == [f"float,{m},{k}"] * 2
            assert [k_["grid"][0] for k_ in launches] == [2 * sms, 7]
            assert all(k_["smem"] == 0 for k_ in launches)
    x = torch.randn(99, 28 * 256, device="cuda")
    launches = ours(kernel_launches(lambda: _C.hadamard(x, max_shared_memory_bytes=cap), tmp_path))
    assert template_args(launches, "hadamard_reg_kernel") == ["float,28,8"]
    rpc = 2 if hadamard_bytes(28 * 256, 2) <= limit else 1
    assert launches[0]["grid"][0] == -(-99 // rpc) and launches[0]["smem"] == hadamard_bytes(28 * 256, rpc)
    for k_ in launches:
        assert k_["smem"] <= limit


def test_cap_argument_errors_and_clamp():
    x = torch.randn(3, 1024, device="cuda")
    for bad in (1, 1024, CAP_48K - 1):
        with pytest.raises(ValueError, match=rf"max_shared_memory_bytes: expected 0 \(the device's limit\) or at "
                                             rf"least 49152 .*got {bad}"):
            _C.hadamard(x, max_shared_memory_bytes=bad)
    with pytest.raises(ValueError, match="max_shared_memory_bytes: expected 0"):
        _C.hadamard(x, max_shared_memory_bytes=-1)
    w, h = torch.randn(1, 8, 128, device="cuda"), torch.eye(128, device="cuda").unsqueeze(0)
    with pytest.raises(ValueError, match=r"max_shared_memory_bytes: .*got 4096"):
        gptq_raw(w, h, dict(group_size=128), 4096)
    # a cap above the device's limit is lowered to it: the default configuration, the same bits
    big = 1 << 40
    y = torch.randn(7, 32768, device="cuda")
    assert torch.equal(_C.hadamard(y, max_shared_memory_bytes=big), _C.hadamard(y))
    assert all(torch.equal(a, b) for a, b in zip(gptq_raw(w, h, dict(group_size=128), big),
                                                 gptq_raw(w, h, dict(group_size=128), 0)))
