"""GPTQ in every weight format (moequant.ops.gptq_quantize_format, the C++ core of gptq_format.h) against its
plain-PyTorch twin moequant.ref.gptq_quantize_format_ref, against RTN (moequant.ops.format_quantize) and against the
int solver.

Policy (tolerances.py): given the core's inverse factor (``_C.gptq_factor``) the twin computes everything else on its
own -- static scales, processing order, dead columns, element rounding, the float32 error feedback -- and must agree
bit for bit (codes, scales, scale codes, zero points, global scale, dequantized weight; the loss to its summation
order). With the twin's own float64 factor U differs in the last bits, and the GPTQ tier applies (codes
GPTQ_CODE_MATCH_FRACTION, loss GPTQ_LOSS_RTOL).
"""

from __future__ import annotations

import pytest
import torch

from moequant import _C, ops
from moequant.ref import formats as fref
from moequant.ref import gptq_quantize_format_ref, quadratic_loss_ref
from tolerances import GPTQ_CODE_MATCH_FRACTION, GPTQ_LOSS_REPORT_RTOL, GPTQ_LOSS_RTOL, GPTQ_VS_RTN_SLACK

EK, GK, SK, SD = _C.ElementKind, _C.GroupKind, _C.ScaleKind, _C.ScaleDtype

# the loss of two bit-identical results, summed in different orders (Eigen panels vs a float64 matmul)
LOSS_SUM_RTOL = 1e-9

FORMATS = {
    "fp8_channel": (_C.Format.fp8_channel(), fref.FormatSpec("fp8_e4m3", "channel")),
    "fp8_channel_bf16": (_C.Format.fp8_channel(SD.bfloat16),
                         fref.FormatSpec("fp8_e4m3", "channel", scale_dtype=torch.bfloat16)),
    "fp8_tensor": (_C.Format.fp8_tensor(), fref.FormatSpec("fp8_e4m3", "tensor")),
    "fp8_block128": (_C.Format.fp8_block(), fref.FormatSpec("fp8_e4m3", "block", block=(128, 128))),
    "fp8_block5x24_fp16": (_C.Format.fp8_block(5, 24, SD.float16),
                           fref.FormatSpec("fp8_e4m3", "block", block=(5, 24), scale_dtype=torch.float16)),
    "nvfp4": (_C.Format.nvfp4(), fref.FormatSpec.nvfp4()),
    "mxfp4": (_C.Format.mxfp4(), fref.FormatSpec.mx("fp4_e2m1")),
    "mxfp6_e2m3": (_C.Format.mx(EK.fp6_e2m3), fref.FormatSpec.mx("fp6_e2m3")),
    "mxfp6_e3m2": (_C.Format.mx(EK.fp6_e3m2), fref.FormatSpec.mx("fp6_e3m2")),
    "mxfp8": (_C.Format.mx(EK.fp8_e4m3), fref.FormatSpec.mx("fp8_e4m3")),
    "fp4_group24_bf16": (_C.Format(EK.fp4_e2m1, group=GK.group, group_size=24, scale_dtype=SD.bfloat16),
                         fref.FormatSpec("fp4_e2m1", "group", 24, scale_dtype=torch.bfloat16)),
    "fp6_e3m2_fp8_scales_global": (
        _C.Format(EK.fp6_e3m2, group=GK.group, group_size=8, scale=SK.fp8_e4m3, global_scale=True),
        fref.FormatSpec("fp6_e3m2", "group", 8, scale="fp8_e4m3", global_scale=True)),
    "int4_tensor": (_C.Format(EK.int, bits=4, symmetric=True, group=GK.tensor),
                    fref.FormatSpec("int", "tensor", bits=4, symmetric=True)),
    "int3_asym_block4x24": (_C.Format(EK.int, bits=3, symmetric=False, group=GK.block, block_rows=4, block_cols=24),
                            fref.FormatSpec("int", "block", block=(4, 24), bits=3, symmetric=False)),
    "int4_group48_ragged": (_C.Format(EK.int, bits=4, symmetric=False, group=GK.group, group_size=48),
                            fref.FormatSpec("int", "group", 48, bits=4, symmetric=False)),
}
# the int formats gptq_quantize itself solves (they go through the int solver: test_int_formats_are_gptq_quantize)
INT_SOLVER = {
    "int4_g32": (_C.Format.int_(4, False, 32), fref.FormatSpec("int", "group", 32, bits=4, symmetric=False)),
    "int3_sym_channel_bf16": (_C.Format.int_(3, True, -1, SD.bfloat16),
                              fref.FormatSpec("int", "channel", bits=3, symmetric=True, scale_dtype=torch.bfloat16)),
}


def bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Same shape, dtype and bits (signed zeros included)."""
    assert a.shape == b.shape and a.dtype == b.dtype, f"{what}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    if a.is_floating_point():
        a, b = a.contiguous().view(torch.int32), b.contiguous().view(torch.int32)
    bad = (a != b).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} of {a.numel()} differ, first at {bad[0].tolist()}"


def assert_same(got: ops.FormatQuantized, want, spec: fref.FormatSpec) -> None:
    bits_equal(got.codes, want.codes, "codes")
    bits_equal(got.scales, want.scales, "scales")
    bits_equal(got.scale_codes, want.scale_codes, "scale_codes")
    bits_equal(got.zeros, want.zeros, "zeros")
    if spec.global_scale:
        bits_equal(got.global_scale, want.global_scale, "global_scale")
    bits_equal(got.dequantized, want.dequantized, "dequantized")
    assert abs(got.loss - want.loss) <= LOSS_SUM_RTOL * max(want.loss, 1e-300)
    assert got.info["dead_columns"] == want.dead_columns


def weight(kind: str, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """random, or adversarial: exact FP4 / int ties relative to power-of-two maxima, zeros, tiny (subnormal-scale)
    rows, outliers."""
    w = torch.randn(rows, cols, generator=gen)
    if kind == "adversarial":
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -2.5, -5.0, 0.0])
        idx = torch.randint(0, 24, (rows, cols), generator=gen)
        w = torch.where(idx < 12, ties[idx.clamp(max=11)], w)
        w[1::5] *= 1e-30
        w[2::7, 0] = 3e4
        w[4::11] = 0.0
    return w


def problem(rows, cols, kind, gen, make_hessian, dead=()):
    w = weight(kind, rows, cols, gen)
    h = make_hessian(cols, 2 * cols + 3, gen) / (2 * cols + 3)
    for d in dead:
        h[d, :] = 0.0
        h[:, d] = 0.0
    return w, h


SHAPES = [(13, 200), (1, 97), (9, 1), (40, 150)]


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("kind", ["random", "adversarial", "dead"])
def test_core_equals_reference_bit_for_bit(name, act_order, kind, gen, make_hessian):
    fmt, spec = FORMATS[name]
    for rows, cols in SHAPES:
        dead = (0, cols // 2, cols - 1) if kind == "dead" else ()
        w, h = problem(rows, cols, "random" if kind == "random" else "adversarial", gen, make_hessian, dead)
        got = ops.gptq_quantize_format(w, h, fmt, act_order=act_order, block_size=37)
        u, perm, finfo = _C.gptq_factor(h, act_order, 0.01)
        want = gptq_quantize_format_ref(w, h, spec, act_order=act_order, factor=u)
        if act_order:
            ref_perm = torch.sort(torch.where(h.diagonal() == 0, 1.0, h.diagonal()), descending=True, stable=True)
            assert torch.equal(perm, ref_perm.indices)
        assert_same(got, want, spec)
        assert got.info["escalations"] == finfo["escalations"]
        if dead:
            assert bool((got.dequantized[:, cols // 2] == 0).all())


@pytest.mark.parametrize("act_order", [False, True])
def test_fp8_block128_over_several_row_and_column_blocks(act_order, gen, make_hessian):
    """DeepSeek-V3's 128 x 128 blocks with partial edge blocks in both directions (3 x 3 scales)."""
    fmt, spec = FORMATS["fp8_block128"]
    w, h = problem(260, 300, "random", gen, make_hessian, dead=(129,))
    got = ops.gptq_quantize_format(w, h, fmt, act_order=act_order)
    assert tuple(got.scales.shape) == (3, 3)
    u, _, _ = _C.gptq_factor(h, act_order, 0.01)
    assert_same(got, gptq_quantize_format_ref(w, h, spec, act_order=act_order, factor=u), spec)


@pytest.mark.parametrize("name", ["fp8_channel", "nvfp4", "mxfp4", "int4_tensor", "int4_g32"])
@pytest.mark.parametrize("act_order", [False, True])
def test_zero_hessian_zeroes_the_weight(name, act_order, gen):
    """Every column dead (an expert no token reached): the weight is zeroed, the loss is 0, no escalation."""
    fmt, spec = {**FORMATS, **INT_SOLVER}[name]
    w, h = torch.randn(6, 64, generator=gen), torch.zeros(64, 64)
    got = ops.gptq_quantize_format(w, h, fmt, act_order=act_order)
    assert bool((got.dequantized == 0).all()) and got.loss == 0.0
    assert got.info["dead_columns"] == 64 and got.info["escalations"] == 0
    want = gptq_quantize_format_ref(w, h, spec, act_order=act_order)
    bits_equal(got.codes, want.codes, "codes")
    bits_equal(got.scales, want.scales, "scales")
    bits_equal(got.dequantized, want.dequantized, "dequantized")


@pytest.mark.parametrize("name", list(FORMATS) + list(INT_SOLVER))
@pytest.mark.parametrize("act_order", [False, True])
def test_core_agrees_with_the_twins_own_factor(name, act_order, gen, make_hessian):
    fmt, spec = {**FORMATS, **INT_SOLVER}[name]
    w, h = problem(24, 200, "random", gen, make_hessian)  # 200: the ragged int groups of 48 stay ragged
    got = ops.gptq_quantize_format(w, h, fmt, act_order=act_order)
    want = gptq_quantize_format_ref(w, h, spec, act_order=act_order)
    match = float((got.codes == want.codes).float().mean())
    assert match >= GPTQ_CODE_MATCH_FRACTION, f"only {match:.4f} of the codes match"
    assert abs(got.loss - want.loss) <= GPTQ_LOSS_RTOL * want.loss
    if name in FORMATS or act_order:  # static scales: exact (the int solver's dynamic groups drift in the last bits)
        bits_equal(got.scales, want.scales, "scales")
    # the reported loss is the quadratic loss of the returned weight
    assert abs(got.loss - quadratic_loss_ref(w, got.dequantized, h)) <= GPTQ_LOSS_REPORT_RTOL * got.loss


@pytest.mark.parametrize("name", list(FORMATS) + list(INT_SOLVER))
def test_scales_are_rtn_and_dequantized_is_format_dequantize(name, gen, make_hessian):
    fmt, _ = {**FORMATS, **INT_SOLVER}[name]
    w, h = problem(20, 150, "random", gen, make_hessian, dead=(7,))  # 150: no multiple of 48 (ragged int groups)
    for act_order in (False, True):
        q = ops.gptq_quantize_format(w, h, fmt, act_order=act_order)
        bits_equal(ops.format_dequantize(q), q.dequantized, "format_dequantize(codes) vs dequantized")
        if name in INT_SOLVER and not act_order:
            continue  # the int solver's dynamic groups
        w0 = w.clone()
        w0[:, 7] = 0.0
        rtn = ops.format_quantize(w0, fmt)
        for field in ("scales", "scale_codes", "zeros", "global_scale"):
            bits_equal(getattr(q, field), getattr(rtn, field), field)


@pytest.mark.parametrize("name", list(FORMATS))
def test_result_does_not_depend_on_block_size(name, gen, make_hessian):
    fmt, _ = FORMATS[name]
    w, h = problem(16, 160, "random", gen, make_hessian)
    one = ops.gptq_quantize_format(w, h, fmt, act_order=True, block_size=1)
    for block in (16, 100, 128, 1000):
        q = ops.gptq_quantize_format(w, h, fmt, act_order=True, block_size=block)
        bits_equal(q.codes, one.codes, "codes")
        bits_equal(q.dequantized, one.dequantized, "dequantized")
        assert q.loss == one.loss


@pytest.mark.parametrize("name", list(FORMATS) + list(INT_SOLVER))
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_correlated_inputs(name, act_order, gen, make_hessian):
    fmt, _ = {**FORMATS, **INT_SOLVER}[name]
    w, h = problem(48, 256, "random", gen, make_hessian)
    q = ops.gptq_quantize_format(w, h, fmt, act_order=act_order)
    rtn = quadratic_loss_ref(w, ops.format_quantize(w, fmt).dequantized, h)
    assert q.loss <= rtn * (1 + GPTQ_VS_RTN_SLACK), f"gptq {q.loss} vs rtn {rtn}"


@pytest.mark.parametrize("act_order", [False, True])
def test_nvfp4_caller_global_scale_equals_the_fused_solve(act_order, gen, make_hessian):
    inter, cols = 24, 128
    gate = torch.randn(inter, cols, generator=gen)
    up = torch.randn(inter, cols, generator=gen) * 3.0  # the larger absmax sets the fused global scale
    h = make_hessian(cols, 400, gen) / 400
    fmt = ops.Format.nvfp4()
    fused = ops.gptq_quantize_format(torch.cat([gate, up]), h, fmt, act_order=act_order)
    g = fused.global_scale
    assert not torch.equal(ops.gptq_quantize_format(gate, h, fmt).global_scale, g)  # the gate alone has its own
    for part, rows in ((gate, slice(0, inter)), (up, slice(inter, None))):
        q = ops.gptq_quantize_format(part, h, fmt, act_order=act_order, global_scale=g)
        bits_equal(q.global_scale, g, "global_scale")
        bits_equal(q.codes, fused.codes[rows], "codes")
        bits_equal(q.scale_codes, fused.scale_codes[rows], "scale_codes")
        bits_equal(q.dequantized, fused.dequantized[rows], "dequantized")
        float_g = ops.gptq_quantize_format(part, h, fmt, act_order=act_order, global_scale=float(g))
        bits_equal(float_g.codes, q.codes, "codes with a float global scale")
    # the twin, given the same global scale and factor
    u, _, _ = _C.gptq_factor(h, act_order, 0.01)
    assert_same(ops.gptq_quantize_format(up, h, fmt, act_order=act_order, global_scale=g),
                gptq_quantize_format_ref(up, h, fref.FormatSpec.nvfp4(), act_order=act_order, global_scale=g,
                                         factor=u), fref.FormatSpec.nvfp4())


@pytest.mark.parametrize("name", list(INT_SOLVER))
@pytest.mark.parametrize("act_order", [False, True])
def test_int_formats_are_gptq_quantize(name, act_order, gen, make_hessian):
    fmt, spec = INT_SOLVER[name]
    w, h = problem(12, 128, "random", gen, make_hessian, dead=(5,))
    q = ops.gptq_quantize_format(w, h, fmt, act_order=act_order, block_size=48)
    gs = spec.group_size if spec.group == "group" else -1
    i = ops.gptq_quantize(w, h, spec.bits, gs, spec.symmetric, act_order, block_size=48, scale_dtype=spec.scale_dtype)
    bits_equal(q.codes.view(torch.int8), i.codes, "codes")
    bits_equal(q.scales, i.scale, "scales")
    bits_equal(q.zeros, i.zero_point.to(torch.int32), "zeros")
    bits_equal(q.dequantized, i.dequantized, "dequantized")
    assert q.loss == i.loss and q.info["dead_columns"] == 1


def test_bf16_input_float_hessian_and_batched_cpu_loop(gen, make_hessian):
    w, h = problem(8, 64, "random", gen, make_hessian)
    fmt = ops.Format.mxfp4()
    a = ops.gptq_quantize_format(w.bfloat16(), h, fmt)
    bits_equal(a.codes, ops.gptq_quantize_format(w.bfloat16().float(), h, fmt).codes, "bf16 input read as float32")
    assert ops.gptq_quantize_format(w, h.float(), fmt).loss > 0  # a float32 Hessian
    batch = ops.gptq_quantize_format_batched(torch.stack([w, 2 * w]), torch.stack([h, h]), ops.Format.nvfp4(),
                                             global_scale=torch.tensor([100.0, 200.0]))
    for e, x in enumerate((w, 2 * w)):
        one = ops.gptq_quantize_format(x, h, ops.Format.nvfp4(), global_scale=100.0 * (e + 1))
        bits_equal(batch[e].codes, one.codes, "codes")
        assert batch[e].loss == one.loss


def test_errors_name_the_argument(gen, make_hessian):
    w, h = problem(4, 32, "random", gen, make_hessian)
    fmt = ops.Format.nvfp4()
    cases = [
        (dict(w=w, h=h, fmt="nvfp4"), "fmt"),
        (dict(w=w, h=h[:16, :16], fmt=fmt), "h:"),
        (dict(w=w, h=h, fmt=fmt, damp=0.0), "damp"),
        (dict(w=w, h=h, fmt=fmt, block_size=0), "block_size"),
        (dict(w=w, h=h, fmt=fmt, global_scale=0.0), "global_scale"),
        (dict(w=w, h=h, fmt=fmt, global_scale=float("nan")), "global_scale"),
        (dict(w=w, h=h, fmt=fmt, global_scale=torch.ones(2)), "global_scale"),
        (dict(w=w, h=h, fmt=ops.Format.mxfp4(), global_scale=1.0), "global_scale"),
        (dict(w=w.masked_fill(torch.eye(4, 32, dtype=torch.bool), float("inf")), h=h, fmt=fmt), "w:"),
        (dict(w=w, h=h.masked_fill(torch.eye(32, dtype=torch.bool), -1.0), fmt=fmt), "diagonal"),
        (dict(w=w * 1e8, h=h, fmt=ops.Format.fp8_channel(SD.float16)), "scale_dtype"),
        (dict(w=w, h=h, fmt=fmt, global_scale=float("inf")), "global_scale: expected a finite value > 0"),
        (dict(w=w, h=h, fmt=fmt, global_scale=-2.0), "global_scale: expected a finite value > 0"),
        (dict(w=w, h=h, fmt=fmt, global_scale="1"), "global_scale: expected a number"),
        (dict(w=w, h=h, fmt=ops.Format.int_(4, True, 16), global_scale=2.0), "global_scale: expected None"),
        (dict(w=w.masked_fill(torch.eye(4, 32, dtype=torch.bool), float("nan")), h=h, fmt=fmt),
         r"w: expected finite values, got NaN at \(0, 0\)"),
        (dict(w=w, h=h.masked_fill(torch.eye(32, dtype=torch.bool).roll(2, 1), float("nan")), fmt=fmt),
         r"h: expected finite values, got NaN at \(0, 2\)"),
        (dict(w=w[0], h=h, fmt=fmt), "w: expected a 2-D"),
        (dict(w=w[:0], h=h, fmt=fmt), "out_features"),
        (dict(w=w.int(), h=h, fmt=fmt), "w: expected a floating-point"),
        (dict(w=w, h=h.int(), fmt=fmt), "h: expected a 2-D float"),
        (dict(w=w, h=h[None], fmt=fmt), "h: expected a 2-D float"),
        (dict(w=w, h=h, fmt=fmt, damp=float("nan")), "damp"),
        (dict(w=w, h=h, fmt=fmt, block_size=2.0), "block_size"),
        (dict(w=w, h=h, fmt=fref.FormatSpec.nvfp4()), "fmt: expected a moequant.ops.Format"),
    ]
    for kw, word in cases:
        w_, h_, f_ = kw.pop("w"), kw.pop("h"), kw.pop("fmt")
        with pytest.raises(ValueError, match=word):
            ops.gptq_quantize_format(w_, h_, f_, **kw)
    with pytest.raises(ValueError, match="group_size"):
        _C.Format(EK.fp4_e2m1, group=GK.group, group_size=0)
    with pytest.raises(ValueError, match="w: expected a 3-D"):
        ops.gptq_quantize_format_batched(w, h, fmt)
    with pytest.raises(ValueError, match="global_scale: expected one value per expert"):
        ops.gptq_quantize_format_batched(w[None], h[None], fmt, global_scale=torch.ones(3))
    with pytest.raises(ValueError, match=r"h: expected a float tensor of shape \[1, 32, 32\]"):
        ops.gptq_quantize_format_batched(w[None], h[None, :16, :16], fmt)
    with pytest.raises(ValueError, match="fmt"):
        ops.gptq_quantize_format_batched(w[None], h[None], "nvfp4")
    with pytest.raises(ValueError, match="global_scale: expected None"):
        ops.gptq_quantize_format_batched(w[None], h[None], ops.Format.mxfp4(), global_scale=torch.ones(1))
    with pytest.raises(ValueError, match="global_scale: expected a finite value > 0"):  # the CPU loop's core check
        ops.gptq_quantize_format_batched(w[None], h[None], fmt, global_scale=torch.tensor([float("nan")]))
    # a Hessian no damping makes positive definite: one line, RuntimeError (numerical), as gptq_quantize
    hopeless = torch.eye(32, dtype=torch.float64)
    hopeless[0, 1] = hopeless[1, 0] = 1e9
    with pytest.raises(RuntimeError, match="not positive definite"):
        ops.gptq_quantize_format(w, hopeless, fmt)
    # the reference fails alike on the same inputs
    with pytest.raises(ValueError, match="scale_dtype"):
        gptq_quantize_format_ref(w * 1e8, h, fref.FormatSpec("fp8_e4m3", "channel", scale_dtype=torch.float16))
