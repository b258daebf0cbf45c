"""Batched GPTQ in every weight format on CUDA (moequant.ops.gptq_quantize_format_batched, kernels/src/gptq_format.cu)
against the CPU solver (moequant.ops.gptq_quantize_format, the C++ core), expert by expert.

What can be bit for bit, and is tested so:
* the static tile parameters -- scales, FP8 / E8M0 scale bytes, int zero points, NVFP4 global scales -- come from the
  original weight before any column is processed, through format.h's own derive_group_params on both sides;
* with a diagonal Hessian the inverse factor U is diagonal on both sides (exact zeros off the diagonal), no error
  propagates, and the codes and dequantized weights are the element rounding of the column kernel alone: the whole
  result except the loss must then equal the CPU's (also with act-order, dead columns, partial tiles and several
  blocks). Weights avoid -0.0 there (adding the zero updates may turn it into +0.0, whose FP6 / FP8 code differs);
* dequantized == format_dequantize(codes, scales) and the int formats of quant.h (which take the int kernel).
What cannot be: with a correlated Hessian the GPU factorises in fp32 and applies the lazy trailing update as a cuBLAS
SGEMM (the CPU: float64 factor, ordered fp32 updates), so codes may flip at rounding boundaries and the flip travels
along its row -- the int batched solver's policy (test_gptq_batched.py) applies: codes CODES_MATCH, loss LOSS_RTOL.
"""

from __future__ import annotations

import pytest
import torch

from moequant import _C, ops
from moequant.ref import quadratic_loss_ref

pytestmark = pytest.mark.gpu

EK, GK, SK, SD = _C.ElementKind, _C.GroupKind, _C.ScaleKind, _C.ScaleDtype
LOSS_RTOL = 0.01  # as test_gptq_batched.py: the batched solver's loss vs the CPU's
CODES_MATCH = 0.99
LOSS_SELF_RTOL = 1e-3  # the returned loss (fp32 SYRK) vs float64 from the returned weight
DIAG_LOSS_RTOL = 1e-4  # diagonal H: same weight, the loss summed in fp32 (GPU) vs float64 (CPU)

FORMATS = {
    "fp8_channel": _C.Format.fp8_channel(),
    "fp8_channel_bf16": _C.Format.fp8_channel(SD.bfloat16),
    "fp8_tensor": _C.Format.fp8_tensor(),
    "fp8_block128": _C.Format.fp8_block(),
    "fp8_block5x24_fp16": _C.Format.fp8_block(5, 24, SD.float16),
    "nvfp4": _C.Format.nvfp4(),
    "mxfp4": _C.Format.mxfp4(),
    "mxfp6_e2m3": _C.Format.mx(EK.fp6_e2m3),
    "mxfp6_e3m2": _C.Format.mx(EK.fp6_e3m2),
    "mxfp8": _C.Format.mx(EK.fp8_e4m3),
    "fp4_group24_bf16": _C.Format(EK.fp4_e2m1, group=GK.group, group_size=24, scale_dtype=SD.bfloat16),
    "fp6_e3m2_fp8_scales_global": _C.Format(EK.fp6_e3m2, group=GK.group, group_size=8, scale=SK.fp8_e4m3,
                                            global_scale=True),
    "int4_tensor": _C.Format(EK.int, bits=4, symmetric=True, group=GK.tensor),
    "int3_asym_block4x24": _C.Format(EK.int, bits=3, symmetric=False, group=GK.block, block_rows=4, block_cols=24),
    "int4_group48_ragged": _C.Format(EK.int, bits=4, symmetric=False, group=GK.group, group_size=48),
}
INT_SOLVER = {"int4_g32": _C.Format.int_(4, False, 32), "int3_sym_channel": _C.Format.int_(3, True, -1)}

# (E, rows, cols, block_size): several blocks and a partial one, rows that are no multiple of the 32 rows of a CTA,
# widths that leave partial groups / blocks (and no multiple of 48: the ragged int groups stay ragged)
SHAPES = [(3, 40, 200, 128), (2, 33, 290, 64), (2, 7, 50, 16)]


def bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    a, b = a.cpu(), b.cpu()
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    if a.is_floating_point():
        a, b = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    bad = (a != b).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} of {a.numel()} differ, first at {bad[0].tolist()}"


def weights(E, rows, cols, gen):
    """Normal weights of varied scale per expert, an outlier row, no -0.0."""
    w = torch.randn(E, rows, cols, generator=gen) * torch.logspace(-2, 1, E).view(E, 1, 1)
    w[:, 0, 0] = 40.0
    return w


def assert_static_equal(g: ops.FormatQuantized, c: ops.FormatQuantized, fmt) -> None:
    for field in ("scales", "scale_codes", "zeros"):
        bits_equal(getattr(g, field), getattr(c, field), field)
    if fmt.global_scale:
        bits_equal(g.global_scale, c.global_scale, "global_scale")
    bits_equal(ops.format_dequantize(g), g.dequantized, "format_dequantize(codes) vs dequantized")


@pytest.mark.parametrize("name", list(FORMATS) + list(INT_SOLVER))
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_diagonal_hessian_bit_for_bit(name, act_order, shape, gen):
    fmt = {**FORMATS, **INT_SOLVER}[name]
    E, rows, cols, block = shape
    w = weights(E, rows, cols, gen)
    d = torch.rand(E, cols, generator=gen) + 0.5  # distinct: act-order really permutes
    d[1, 3] = 0.0  # a dead column
    h = torch.diag_embed(d)
    gpu = ops.gptq_quantize_format_batched(w.cuda(), h.cuda(), fmt, act_order=act_order, block_size=block)
    for e in range(E):
        cpu = ops.gptq_quantize_format(w[e], h[e], fmt, act_order=act_order, block_size=block)
        g = gpu[e]
        assert g.codes.is_cuda
        for field in ("codes", "scales", "scale_codes", "zeros", "dequantized"):
            bits_equal(getattr(g, field), getattr(cpu, field), f"expert {e} {field}")
        if fmt.global_scale:
            bits_equal(g.global_scale, cpu.global_scale, f"expert {e} global_scale")
        assert abs(g.loss - cpu.loss) <= DIAG_LOSS_RTOL * max(cpu.loss, 1e-30)
        assert g.info["escalations"] == cpu.info["escalations"] == 0


@pytest.mark.parametrize("name", list(FORMATS) + list(INT_SOLVER))
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_correlated_hessian_matches_cpu_solver(name, act_order, shape, gen, make_hessian):
    fmt = {**FORMATS, **INT_SOLVER}[name]
    E, rows, cols, block = shape
    w = weights(E, rows, cols, gen)
    h = torch.stack([make_hessian(cols, 2 * cols, gen, torch.float64) for _ in range(E)]) / (2 * cols)
    h = h.float()
    h[0, 5, :] = 0.0
    h[0, :, 5] = 0.0  # a dead column
    gpu = ops.gptq_quantize_format_batched(w.cuda(), h.cuda(), fmt, act_order=act_order, block_size=block)
    for e in range(E):
        cpu = ops.gptq_quantize_format(w[e], h[e], fmt, act_order=act_order, block_size=block)
        g = gpu[e]
        if name in FORMATS or act_order:  # static parameters (the int solver's dynamic groups drift)
            assert_static_equal(g, cpu, fmt)
        rel = abs(g.loss - cpu.loss) / max(cpu.loss, 1e-30)
        assert rel <= LOSS_RTOL, f"expert {e}: loss gpu {g.loss} vs cpu {cpu.loss} (rel {rel:.2e})"
        match = float((g.codes.cpu() == cpu.codes).float().mean())
        assert match >= CODES_MATCH, f"expert {e}: only {match:.4f} of the codes match"
        assert g.info["escalations"] == cpu.info["escalations"]
        ref = quadratic_loss_ref(w[e], g.dequantized.cpu(), h[e])
        assert abs(g.loss - ref) <= LOSS_SELF_RTOL * max(ref, 1e-30)
        rtn = quadratic_loss_ref(w[e], ops.format_quantize(w[e], fmt).dequantized, h[e])
        assert g.loss <= rtn * (1 + LOSS_RTOL), f"expert {e}: gptq {g.loss} vs rtn {rtn}"
        if e == 0:
            assert bool((g.dequantized[:, 5] == 0).all())


def test_caller_global_scales_and_fused_partners(gen, make_hessian):
    inter, cols, E = 32, 256, 3
    gate = torch.randn(E, inter, cols, generator=gen)
    up = torch.randn(E, inter, cols, generator=gen) * 3.0
    h = (torch.stack([make_hessian(cols, 600, gen) for _ in range(E)]) / 600).float()
    fmt = ops.Format.nvfp4()
    fused = ops.gptq_quantize_format_batched(torch.cat([gate, up], 1).cuda(), h.cuda(), fmt, act_order=True)
    g = torch.cat([q.global_scale for q in fused])
    for part, rows in ((gate, slice(0, inter)), (up, slice(inter, None))):
        sep = ops.gptq_quantize_format_batched(part.cuda(), h.cuda(), fmt, act_order=True, global_scale=g)
        for e in range(E):
            bits_equal(sep[e].global_scale, fused[e].global_scale, "global_scale")
            bits_equal(sep[e].scale_codes, fused[e].scale_codes[rows], "scale_codes")
            match = float((sep[e].codes == fused[e].codes[rows]).float().mean())
            assert match >= CODES_MATCH  # the SGEMMs of another row count may round differently
            cpu = ops.gptq_quantize_format(part[e], h[e], fmt, act_order=True, global_scale=g[e:e + 1].cpu())
            assert_static_equal(sep[e], cpu, fmt)


@pytest.mark.parametrize("name", list(INT_SOLVER))
def test_int_formats_take_the_int_kernel(name, gen, make_hessian):
    fmt = INT_SOLVER[name]
    w = torch.randn(2, 24, 128, generator=gen)
    h = (torch.stack([make_hessian(128, 300, gen) for _ in range(2)]) / 300).float()
    q = ops.gptq_quantize_format_batched(w.cuda(), h.cuda(), fmt, act_order=False)
    gs = fmt.group_size if fmt.group == GK.group else -1
    i = ops.gptq_quantize_batched(w.cuda(), h.cuda(), fmt.bits, gs, fmt.symmetric, False)
    for e in range(2):
        bits_equal(q[e].codes.view(torch.int8), i[e].codes, "codes")
        bits_equal(q[e].scales, i[e].scale, "scales")
        bits_equal(q[e].dequantized, i[e].dequantized, "dequantized")
        assert int(q[e].scale_codes.abs().sum()) == 0


def test_small_shared_memory_and_loss_options_are_bit_identical(gen, make_hessian):
    w = torch.randn(2, 40, 300, generator=gen).cuda()
    h = (torch.stack([make_hessian(300, 700, gen) for _ in range(2)]) / 700).float().cuda()
    fmt = ops.Format.mxfp4()
    base = ops.gptq_quantize_format_batched(w, h, fmt, act_order=True)
    out = _C.gptq_format_batched(w, h.clone(), fmt, None, True, 0.01, 128, True, False, 49152)
    bits_equal(out[0], torch.stack([q.codes for q in base]), "codes with 48 KiB of shared memory")
    bits_equal(out[5], torch.stack([q.dequantized for q in base]), "dequantized with 48 KiB of shared memory")
    hc = h.clone()
    before = hc.clone()
    nl = ops.gptq_quantize_format_batched(w, hc, fmt, act_order=True, compute_loss=False)
    assert torch.equal(hc, before) and nl[0].loss is None
    ow = ops.gptq_quantize_format_batched(w, h.clone(), fmt, act_order=True, overwrite_h=True)
    bits_equal(ow[1].codes, base[1].codes, "codes with overwrite_h")


def test_the_default_route_for_cuda_weights_is_the_cpu_core(gen, make_hessian):
    w = torch.randn(16, 96, generator=gen)
    h = make_hessian(96, 300, gen) / 300
    q = ops.gptq_quantize_format(w.cuda(), h.cuda(), ops.Format.nvfp4(), act_order=True)
    c = ops.gptq_quantize_format(w, h, ops.Format.nvfp4(), act_order=True)
    assert q.codes.is_cuda and q.dequantized.is_cuda
    for field in ("codes", "scales", "scale_codes", "global_scale", "dequantized"):
        bits_equal(getattr(q, field), getattr(c, field), field)
    assert q.loss == c.loss


def test_errors(gen, make_hessian):
    w = torch.randn(2, 16, 128, generator=gen).cuda()
    h = (torch.stack([make_hessian(128, 300, gen) for _ in range(2)]) / 300).float().cuda()
    fmt = ops.Format.nvfp4()
    with pytest.raises(ValueError, match=r"global_scale: expected a finite value > 0, got nan at expert 1"):
        ops.gptq_quantize_format_batched(w, h, fmt, global_scale=torch.tensor([1.0, float("nan")]))
    bad = w.clone()
    bad[1, 3, 7] = float("inf")
    with pytest.raises(ValueError, match=r"w: expected finite values, got Inf at expert 1 \(3, 7\)"):
        ops.gptq_quantize_format_batched(bad, h, fmt)
    with pytest.raises(ValueError, match="scale_dtype: float16 cannot hold the scale of tile .* of expert 1"):
        ops.gptq_quantize_format_batched(w * torch.tensor([1.0, 1e8], device="cuda").view(2, 1, 1), h,
                                         ops.Format.fp8_channel(SD.float16))
    with pytest.raises(ValueError, match="block_size"):
        ops.gptq_quantize_format_batched(w, h, fmt, block_size=256)
    with pytest.raises(ValueError, match="h: expected float32"):
        ops.gptq_quantize_format_batched(w, h.double(), fmt)
    with pytest.raises(ValueError, match="global_scale: expected None"):
        ops.gptq_quantize_format_batched(w, h, ops.Format.mxfp4(), global_scale=torch.ones(2))
    hopeless = torch.eye(128).repeat(2, 1, 1).cuda()
    hopeless[1, 0, 1] = hopeless[1, 1, 0] = 1e9
    with pytest.raises(RuntimeError, match="expert 1"):
        ops.gptq_quantize_format_batched(w, hopeless, fmt)
