"""The weight-format kernels (kernels/src/format.cu behind moequant._C) against the same _C calls on CPU tensors.

Every test is marked ``gpu`` and skipped without CUDA (conftest.py). The CPU core is the oracle and the comparison is
bit for bit, NaN payloads included (format.h returns the one quiet NaN 0x7FC00000 / bfloat16 0x7FC0 on both sides):
codes, scale values, scale bytes, zero points, global scales, dequantized values, packed bytes, decoded weights.

The launchers pick a vector kernel (a team of lanes per scale group, 16-byte accesses) or a general one (one warp per
group, scalar accesses) from the shape and the layout; the shape lists drive both and ``test_kernel_choice`` checks with
the profiler which one a representative input takes, so a launcher that silently stopped using the fast path fails.
"""

from __future__ import annotations

import re

import pytest
import torch

from gpu_helpers import in_wider_rows, launched_kernels, misaligned, names_kernel
from moequant import _C
from test_formats_core import FORMATS, adversarial_weight

pytestmark = pytest.mark.gpu

EK, GK, SK, SD = _C.ElementKind, _C.GroupKind, _C.ScaleKind, _C.ScaleDtype
FIELDS = ("codes", "scales", "scale_codes", "zeros", "global_scale", "dequantized")


def strict_equal(gpu: torch.Tensor, cpu: torch.Tensor, what: str) -> None:
    """Bit-identical (NaN payloads and signed zeros included): gpu is a CUDA tensor, cpu the CPU oracle."""
    assert gpu.is_cuda, f"{what}: expected a CUDA result"
    g = gpu.cpu()
    assert g.shape == cpu.shape and g.dtype == cpu.dtype, f"{what}: {g.shape} {g.dtype} vs {cpu.shape} {cpu.dtype}"
    if g.is_floating_point():
        iv = {4: torch.int32, 2: torch.int16}[g.element_size()]
        g, cpu = g.contiguous().view(iv), cpu.contiguous().view(iv)
    bad = (g != cpu).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} of {g.numel()} elements differ, first at {bad[0].tolist()}"


def quantize_both(w_cpu: torch.Tensor, w_gpu: torch.Tensor, fmt, global_scale=None):
    cpu = _C.format_quantize(w_cpu, fmt, global_scale)
    gpu = _C.format_quantize(w_gpu, fmt, None if global_scale is None else global_scale.cuda())
    for name, a, b in zip(FIELDS, gpu, cpu):
        strict_equal(a, b, name)
    return cpu, gpu


# (rows, cols): multiples of 8 (team kernels, partial edge groups / blocks), columns not a multiple of 8 (general
# kernel), a row longer than a team holds (channel: general), per-tensor scales over several work tiles, empty.
SHAPES = [(10, 96), (37, 72), (300, 200), (130, 257), (1, 1), (3, 8200), (64, 16392), (0, 16), (3, 0), (0, 0)]


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("rows, cols", SHAPES)
def test_quantize_bit_exact(name, rows, cols, gen):
    fmt, _ = FORMATS[name]
    w = adversarial_weight(rows, cols, gen)
    quantize_both(w, w.cuda(), fmt)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "mxfp6_e2m3", "fp8_block128", "fp8_channel", "fp8_tensor",
                                  "int4_sym_g32", "int8_asym_block"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, cols", [(40, 256), (300, 200), (7, 100)])
def test_quantize_half_inputs_bit_exact(name, dtype, rows, cols, gen):
    fmt, _ = FORMATS[name]
    w = (torch.randn(rows, cols, generator=gen) * 0.03).to(dtype)
    quantize_both(w, w.cuda(), fmt)


@pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "fp8_block128", "fp8_tensor", "fp8_channel"])
@pytest.mark.parametrize("layout", ["wider_rows_aligned", "wider_rows_odd", "misaligned"])
def test_quantize_layouts_bit_exact(name, layout, gen):
    """Row strides and base pointers: a row stride that keeps 16-byte rows (team kernel), an odd one and a misaligned
    base (general kernel). The buffer around the view is NaN: reading outside the view would be reported."""
    fmt, _ = FORMATS[name]
    w = adversarial_weight(48, 256, gen)
    if layout == "wider_rows_aligned":
        wg = in_wider_rows(w.cuda(), 264, 8)
    elif layout == "wider_rows_odd":
        wg = in_wider_rows(w.cuda(), 259, 1)
    else:
        wg = misaligned(w.cuda())
    quantize_both(w, wg, fmt)


@pytest.mark.parametrize("name", ["nvfp4", "fp6_e3m2_fp8_scales_global"])
def test_caller_global_scale_bit_exact(name, gen):
    fmt, _ = FORMATS[name]
    w = torch.randn(64, 256, generator=gen)
    cpu, gpu = quantize_both(w, w.cuda(), fmt, torch.tensor([321.0]))
    assert gpu[4].item() == 321.0


@pytest.mark.parametrize("name", sorted(FORMATS))
@pytest.mark.parametrize("out_dtype", [SD.float32, SD.bfloat16])
@pytest.mark.parametrize("rows, cols, misalign", [(37, 72, False), (300, 200, False), (130, 257, False),
                                                  (64, 128, True), (0, 8, False)])
def test_dequantize_bit_exact(name, out_dtype, rows, cols, misalign, gen):
    fmt, spec = FORMATS[name]
    w = adversarial_weight(rows, cols, gen)
    codes, scales, _, zeros, g, _ = _C.format_quantize(w, fmt)
    zeros = zeros if spec.element == "int" and not spec.symmetric else None
    g = g if spec.global_scale else None
    cpu = _C.format_dequantize(codes, scales, zeros, g, fmt, out_dtype)
    cg = misaligned(codes.cuda()) if misalign else codes.cuda()
    gpu = _C.format_dequantize(cg, scales.cuda(), None if zeros is None else zeros.cuda(),
                               None if g is None else g.cuda(), fmt, out_dtype)
    strict_equal(gpu, cpu, "dequantized")


def test_dequantize_nan_codes_bit_exact():
    """FP8 NaN codes (0x7F, 0xFF) and every other code, in both output dtypes: the canonical NaN on both sides."""
    fmt = _C.Format.fp8_channel()
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    scales = torch.tensor([[1.0], [0.5], [3.0], [1e-3]])
    for out_dtype in (SD.float32, SD.bfloat16):
        cpu = _C.format_dequantize(codes, scales, format=fmt, out_dtype=out_dtype)
        strict_equal(_C.format_dequantize(codes.cuda(), scales.cuda(), format=fmt, out_dtype=out_dtype), cpu, "fp8")


@pytest.mark.parametrize("element", ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3"])
@pytest.mark.parametrize("rows, cols, misalign", [(64, 256, False), (5, 7, False), (3, 2, False), (9, 36, False),
                                                  (2, 65, False), (16, 64, True), (0, 8, False), (4, 0, False)])
def test_pack_unpack_bit_exact(element, rows, cols, misalign, gen):
    kind = getattr(EK, element)
    width = {"fp4_e2m1": 16, "fp8_e4m3": 256}.get(element, 64)
    codes = torch.randint(0, width, (rows, cols), generator=gen, dtype=torch.int32).to(torch.uint8)
    packed = _C.pack_fp_codes(codes, kind)
    cg = misaligned(codes.cuda()) if misalign else codes.cuda()
    pg = _C.pack_fp_codes(cg, kind)
    strict_equal(pg, packed, "packed")
    src = misaligned(packed.cuda()) if misalign else packed.cuda()
    strict_equal(_C.unpack_fp_codes(src, kind, cols), codes, "unpacked")


@pytest.mark.parametrize("element, bad", [("fp4_e2m1", 16), ("fp6_e2m3", 64)])
@pytest.mark.parametrize("rows, cols", [(64, 256), (5, 7)])
def test_pack_reports_the_first_bad_code(element, bad, rows, cols):
    kind = getattr(EK, element)
    codes = torch.zeros(rows, cols, dtype=torch.uint8)
    codes[rows - 1, cols - 1] = bad + 3
    codes[rows // 2, 1] = bad
    msg = f"codes: expected {element} codes in [0, {bad - 1}], got {bad} at ({rows // 2}, 1)"
    for t in (codes, codes.cuda()):
        with pytest.raises(ValueError, match="^" + re.escape(msg) + "$"):
            _C.pack_fp_codes(t, kind)


@pytest.mark.parametrize("rows, cols, misalign", [(256, 384, False), (300, 200, False), (129, 1, False),
                                                  (1, 129, False), (64, 128, True)])
@pytest.mark.parametrize("out_dtype", [SD.bfloat16, SD.float32])
def test_deepseek_fp8_decode_bit_exact(rows, cols, misalign, out_dtype, gen):
    weight = torch.randint(0, 256, (rows, cols), generator=gen, dtype=torch.int32).to(torch.uint8)  # NaN codes too
    scale_inv = torch.rand(-(-rows // 128), -(-cols // 128), generator=gen) * 1e-2
    cpu = _C.decode_fp8_block_scaled(weight, scale_inv, 128, 128, out_dtype)
    wg = misaligned(weight.cuda()) if misalign else weight.cuda()
    strict_equal(_C.decode_fp8_block_scaled(wg, scale_inv.cuda(), 128, 128, out_dtype), cpu, "fp8 blocks")


@pytest.mark.parametrize("shape", [(2, 6, 5), (3, 90), (1, 1), (0, 4)])
@pytest.mark.parametrize("out_dtype", [SD.bfloat16, SD.float32])
@pytest.mark.parametrize("misalign", [False, True])
def test_mxfp4_blocks_decode_bit_exact(shape, out_dtype, misalign, gen):
    if misalign and 0 in shape:
        pytest.skip("an empty tensor has no data to misalign")
    blocks = torch.randint(0, 256, shape + (16,), generator=gen, dtype=torch.int32).to(torch.uint8)
    scales = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32).to(torch.uint8)  # 255 (NaN) included
    cpu = _C.decode_mxfp4_blocks(blocks, scales, out_dtype)
    bg = misaligned(blocks.cuda()) if misalign else blocks.cuda()
    strict_equal(_C.decode_mxfp4_blocks(bg, scales.cuda(), out_dtype), cpu, "gpt-oss MXFP4")


@pytest.mark.parametrize("name, rows, cols, at", [
    ("nvfp4", 64, 256, [(40, 3), (12, 200), (12, 199)]),       # team kernel (TEAM = 2) + the range pass
    ("fp8_block128", 300, 200, [(299, 199), (130, 150)]),      # team kernel (TEAM = 256), partial blocks
    ("fp8_tensor", 8, 8200, [(7, 8199), (3, 4100)]),           # range pass only decides
    ("mxfp4", 9, 100, [(8, 99), (2, 50), (2, 49)]),            # general kernel
])
def test_first_nonfinite_is_reported_like_the_cpu(name, rows, cols, at, gen):
    fmt, _ = FORMATS[name]
    w = torch.randn(rows, cols, generator=gen)
    for i, (r, c) in enumerate(at):
        w[r, c] = (float("nan"), float("inf"), -float("inf"))[i % 3]
    with pytest.raises(ValueError) as cpu_err:
        _C.format_quantize(w, fmt)
    with pytest.raises(ValueError) as gpu_err:
        _C.format_quantize(w.cuda(), fmt)
    assert str(gpu_err.value) == str(cpu_err.value)
    assert str(cpu_err.value).startswith("w: expected finite values, got ")


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_caller_global_scale(value):
    w = torch.randn(4, 64)
    with pytest.raises(ValueError) as cpu_err:
        _C.format_quantize(w, _C.Format.nvfp4(), torch.tensor([value]))
    with pytest.raises(ValueError) as gpu_err:
        _C.format_quantize(w.cuda(), _C.Format.nvfp4(), torch.tensor([value], device="cuda"))
    assert str(gpu_err.value) == str(cpu_err.value)


# --- which kernel runs ------------------------------------------------------------------------------------------------


def _launched(fn) -> list[str]:
    return launched_kernels(fn)


@pytest.mark.parametrize("name, rows, cols, kernel", [
    ("nvfp4", 64, 256, "quantize_team_kernel"),
    ("mxfp4", 64, 256, "quantize_team_kernel"),
    ("fp8_block128", 300, 256, "quantize_team_kernel"),
    ("fp8_channel", 16, 7168, "quantize_team_kernel"),
    ("fp8_tensor", 16, 7168, "quantize_team_kernel"),
    ("mxfp4", 9, 100, "quantize_general_kernel"),
    ("fp8_channel", 4, 16392, "quantize_general_kernel"),
])
def test_kernel_choice_quantize(name, rows, cols, kernel, gen):
    fmt, _ = FORMATS[name]
    w = torch.randn(rows, cols, generator=gen).cuda()
    names = _launched(lambda: _C.format_quantize(w, fmt))
    others = {"quantize_team_kernel", "quantize_general_kernel"} - {kernel}
    assert any(names_kernel(n, kernel) for n in names), names
    assert not any(names_kernel(n, k) for n in names for k in others), names


@pytest.mark.parametrize("fn, kernel", [
    (lambda c: _C.format_dequantize(c, torch.ones(64, 8, device="cuda"), format=_C.Format.mxfp4(),
                                    out_dtype=SD.bfloat16), "dequantize_vec_kernel"),
    (lambda c: _C.pack_fp_codes(c, EK.fp4_e2m1), "pack_vec_kernel"),
    (lambda c: _C.pack_fp_codes(c, EK.fp6_e2m3), "pack_vec_kernel"),
])
def test_kernel_choice_vector_paths(fn, kernel):
    codes = torch.zeros(64, 256, dtype=torch.uint8, device="cuda")
    assert any(names_kernel(n, kernel) for n in _launched(lambda: fn(codes))), kernel
