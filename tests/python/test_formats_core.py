"""The weight formats of moequant/format.h through ``moequant._C`` on the CPU, against independent implementations:

* ``moequant.ref.formats`` (plain PyTorch written from the spec): codes, scales, zero points, global scales and
  dequantized values bit for bit, on random and adversarial weights, for every format;
* torch: the FP8 codec equals ``x.to(torch.float8_e4m3fn)`` on every bfloat16 bit pattern (and random fp32 ones);
* compressed-tensors 0.20: its FP4 / FP6 casts and packers give our codes and packed bytes; its own decompressors
  (NVFP4, MXFP4, MXFP6, MXFP8, FP8 channel / tensor / block) turn our packed tensors into exactly our dequantized
  weights; its calculate_qparams gives our scales on float32 weights;
* transformers: the gpt-oss MXFP4 decode equals ``convert_moe_packed_tensors``;
* a plain-torch formula: the DeepSeek FP8 block decode.
"""

from __future__ import annotations

import pytest
import torch

from moequant import _C
from moequant.ref import formats as ref

EK, GK, SK, SD = _C.ElementKind, _C.GroupKind, _C.ScaleKind, _C.ScaleDtype
_TORCH_SD = {SD.float32: torch.float32, SD.bfloat16: torch.bfloat16, SD.float16: torch.float16}


def bits_equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bit-identical tensors, signed zeros included; NaN matches NaN whatever its payload (torch's own conversions
    give different NaN bits on different code paths, e.g. 0x7FC0 or 0xFFFF for float -> bfloat16; format.h always
    returns the quiet NaN 0x7FC00000 / 0x7FC0, which test_formats_cuda.py checks bit for bit)."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    if a.is_floating_point():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        assert torch.equal(nan_a, nan_b), f"{what}: NaN at different positions"
        iv = {4: torch.int32, 2: torch.int16}[a.element_size()]
        a = torch.where(nan_a, torch.zeros_like(a), a)
        b = torch.where(nan_b, torch.zeros_like(b), b)
        a, b = a.contiguous().view(iv), b.contiguous().view(iv)
    bad = (a != b).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.shape[0]} of {a.numel()} differ, first at {bad[0].tolist()}"


def all_bf16_values() -> torch.Tensor:
    """Every bfloat16 bit pattern, widened exactly to float32 (65536 values incl. +-0, subnormals, +-inf, NaNs)."""
    return torch.arange(65536, dtype=torch.int32).to(torch.uint16).view(torch.bfloat16).float()


# --- the formats under test: (_C.Format, ref.FormatSpec) ------------------------------------------------------------


def _fmt_pairs():
    pairs = {
        "fp8_channel": (_C.Format.fp8_channel(), ref.FormatSpec("fp8_e4m3", "channel")),
        "fp8_channel_bf16": (_C.Format.fp8_channel(SD.bfloat16),
                             ref.FormatSpec("fp8_e4m3", "channel", scale_dtype=torch.bfloat16)),
        "fp8_tensor": (_C.Format.fp8_tensor(), ref.FormatSpec("fp8_e4m3", "tensor")),
        "fp8_block128": (_C.Format.fp8_block(), ref.FormatSpec("fp8_e4m3", "block", block=(128, 128))),
        "fp8_block16x8_fp16": (_C.Format.fp8_block(16, 8, SD.float16),
                               ref.FormatSpec("fp8_e4m3", "block", block=(16, 8), scale_dtype=torch.float16)),
        "nvfp4": (_C.Format.nvfp4(), ref.FormatSpec.nvfp4()),
        "mxfp4": (_C.Format.mxfp4(), ref.FormatSpec.mx("fp4_e2m1")),
        "mxfp6_e2m3": (_C.Format.mx(EK.fp6_e2m3), ref.FormatSpec.mx("fp6_e2m3")),
        "mxfp6_e3m2": (_C.Format.mx(EK.fp6_e3m2), ref.FormatSpec.mx("fp6_e3m2")),
        "mxfp8": (_C.Format.mx(EK.fp8_e4m3), ref.FormatSpec.mx("fp8_e4m3")),
        "fp4_group24_bf16": (_C.Format(EK.fp4_e2m1, group=GK.group, group_size=24, scale_dtype=SD.bfloat16),
                             ref.FormatSpec("fp4_e2m1", "group", 24, scale_dtype=torch.bfloat16)),
        "fp6_e3m2_fp8_scales_global": (
            _C.Format(EK.fp6_e3m2, group=GK.group, group_size=8, scale=SK.fp8_e4m3, global_scale=True),
            ref.FormatSpec("fp6_e3m2", "group", 8, scale="fp8_e4m3", global_scale=True)),
        "int4_sym_g32": (_C.Format.int_(4, True, 32), ref.FormatSpec("int", "group", 32, bits=4, symmetric=True)),
        "int3_asym_channel_fp16": (_C.Format.int_(3, False, -1, SD.float16),
                                   ref.FormatSpec("int", "channel", bits=3, symmetric=False,
                                                  scale_dtype=torch.float16)),
        "int8_asym_block": (_C.Format(EK.int, bits=8, symmetric=False, group=GK.block, block_rows=4, block_cols=24),
                            ref.FormatSpec("int", "block", block=(4, 24), bits=8, symmetric=False)),
    }
    return pairs


FORMATS = _fmt_pairs()


def adversarial_weight(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Random rows of magnitudes 1e-38 .. 1e30, plus rows that are all zero, constant, exact FP4 ties (x.25, x.75 of a
    step), powers of two (E8M0 boundaries), -0.0 entries and fp32 subnormals."""
    w = torch.randn(rows, cols, generator=gen) * torch.logspace(-38, 30, rows).unsqueeze(1)
    if rows >= 10:
        w[1] = 0.0
        w[2] = 0.375
        w[3] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] * cols)[:cols]  # ties (with amax 7: MX rounds up)
        w[4] = torch.pow(2.0, torch.arange(cols) % 20 - 10.0)
        w[5, ::3] = -0.0
        w[6] = torch.randn(cols, generator=gen) * 1e-40  # fp32 subnormals
        w[7] = torch.tensor([6.0, -6.0, 448.0, -448.0, 1.0, 0.5] * cols)[:cols]
        w[8] = torch.randn(cols, generator=gen)
        w[9] = torch.randn(cols, generator=gen) * 3.0
    return w


def run_c(w: torch.Tensor, fmt, global_scale=None):
    codes, scales, scale_codes, zeros, g, deq = _C.format_quantize(w, fmt, global_scale)
    return ref.FormatResult(codes, scales, scale_codes, zeros, g, deq)


def assert_same_result(got: ref.FormatResult, want: ref.FormatResult, spec: ref.FormatSpec) -> None:
    bits_equal(got.codes, want.codes, "codes")
    bits_equal(got.scales, want.scales, "scales")
    if spec.scale != "float":
        bits_equal(got.scale_codes, want.scale_codes, "scale_codes")
    if spec.element == "int" and not spec.symmetric:
        bits_equal(got.zeros, want.zeros, "zeros")
    if spec.global_scale:
        bits_equal(got.global_scale, want.global_scale, "global_scale")
    bits_equal(got.dequantized, want.dequantized, "dequantized")


# === codecs ==========================================================================================================


class TestCodecs:
    def test_fp8_encode_equals_torch_cast_on_every_bf16_pattern(self):
        x = all_bf16_values()
        bits_equal(_C.encode_elements(x, EK.fp8_e4m3), x.to(torch.float8_e4m3fn).view(torch.uint8), "fp8 codes")

    def test_fp8_encode_equals_torch_cast_on_random_fp32_patterns(self, gen):
        u = torch.randint(-(2**31), 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int64).to(torch.int32)
        x = u.view(torch.float32)
        near = torch.randn(1 << 18, generator=gen) * 300.0  # dense around the saturation point and the ties
        for v in (x, near, torch.nextafter(near, torch.full_like(near, float("inf")))):
            bits_equal(_C.encode_elements(v.contiguous(), EK.fp8_e4m3), v.to(torch.float8_e4m3fn).view(torch.uint8),
                       "fp8 codes")

    def test_fp8_decode_every_code(self):
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        bits_equal(_C.decode_elements(codes, EK.fp8_e4m3).isnan(), ref.e4m3_decode_ref(codes).isnan(), "NaN codes")
        ok = (codes & 0x7F) != 0x7F
        bits_equal(_C.decode_elements(codes, EK.fp8_e4m3)[ok], codes.view(torch.float8_e4m3fn).float()[ok], "values")

    @pytest.mark.parametrize("element", ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2"])
    def test_small_float_codecs_equal_reference(self, element):
        x = all_bf16_values()
        x = x[torch.isfinite(x)]
        kind = getattr(EK, element)
        want = ref.e2m1_encode_ref(x) if element == "fp4_e2m1" else ref.fp6_encode_ref(x, element)
        bits_equal(_C.encode_elements(x, kind), want, f"{element} codes")
        n = 16 if element == "fp4_e2m1" else 64
        codes = torch.arange(n, dtype=torch.int32).to(torch.uint8)
        dec = ref.e2m1_decode_ref(codes) if element == "fp4_e2m1" else ref.fp6_decode_ref(codes, element)
        bits_equal(_C.decode_elements(codes, kind), dec, f"{element} values")

    def test_fp4_cast_and_pack_equal_compressed_tensors(self):
        from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8
        from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

        x = all_bf16_values()
        x = x[torch.isfinite(x)].clamp(-6.0, 6.0)  # compressed-tensors clamps before its cast
        x = x[: x.numel() // 2 * 2].reshape(-1, 2)
        want = pack_fp4_to_uint8(cast_to_fp4(x.clone()))
        codes = _C.encode_elements(x.contiguous(), EK.fp4_e2m1)
        bits_equal(_C.pack_fp_codes(codes, EK.fp4_e2m1), want, "packed fp4")

    def test_fp6_cast_and_pack_equal_compressed_tensors(self):
        from compressed_tensors.compressors.mxfp6.helpers import pack_fp6_to_uint8
        from compressed_tensors.quantization.utils.fp6_utils import cast_to_fp6

        x = all_bf16_values()
        x = x[torch.isfinite(x)].clamp(-7.5, 7.5)
        x = x[: x.numel() // 4 * 4].reshape(-1, 4)
        want = pack_fp6_to_uint8(cast_to_fp6(x))
        codes = _C.encode_elements(x.contiguous(), EK.fp6_e2m3)
        bits_equal(_C.pack_fp_codes(codes, EK.fp6_e2m3), want, "packed fp6")

    def test_mx_scale_exponent_equals_compressed_tensors(self, gen):
        from compressed_tensors.quantization.utils.mxfp_utils import generate_mx_scales

        amax = torch.cat([torch.rand(1 << 16, generator=gen) * torch.logspace(-37, 37, 1 << 16),
                          torch.pow(2.0, torch.arange(-120, 120.0)) * 1.75,
                          torch.pow(2.0, torch.arange(-120, 120.0)) * torch.nextafter(torch.tensor(1.75),
                                                                                        torch.tensor(0.0)),
                          torch.tensor([0.0, 6.0, 7.0, 7.5, 7.75, 448.0])])
        for element, bits in [("fp4_e2m1", 4), ("fp6_e2m3", 6), ("fp8_e4m3", 8)]:
            want = torch.clamp(generate_mx_scales(amax, bits), 0, 255).to(torch.uint8)
            bits_equal(ref.mx_scale_exponent_ref(amax, element), want, f"{element} E8M0 (ref vs compressed-tensors)")
            # through _C: a [n, 32] matrix whose rows have absmax amax -> one E8M0 byte per row
            fmt = _C.Format.mx(getattr(EK, element))
            w = torch.zeros(amax.numel(), 32)
            w[:, 5] = amax
            bits_equal(run_c(w, fmt).scale_codes[:, 0], want, f"{element} E8M0 (_C vs compressed-tensors)")


# === quantize / dequantize against the reference =======================================================================


class TestQuantizeMatchesReference:
    @pytest.mark.parametrize("name", sorted(FORMATS))
    @pytest.mark.parametrize("rows, cols", [(10, 96), (37, 72), (130, 257), (1, 1), (0, 16), (3, 0)])
    def test_format_quantize_equals_reference(self, name, rows, cols, gen):
        fmt, spec = FORMATS[name]
        w = adversarial_weight(rows, cols, gen)
        assert_same_result(run_c(w, fmt), ref.quantize_ref(w, spec), spec)

    @pytest.mark.parametrize("name", ["nvfp4", "mxfp4", "fp8_block128", "int4_sym_g32", "mxfp6_e2m3"])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    def test_half_inputs_are_widened_exactly(self, name, dtype, gen):
        fmt, spec = FORMATS[name]
        w = (torch.randn(33, 160, generator=gen) * 0.02).to(dtype)
        got = run_c(w, fmt)
        assert_same_result(got, ref.quantize_ref(w, spec), spec)
        assert_same_result(got, run_c(w.float(), fmt), spec)

    def test_strided_rows(self, gen):
        fmt, spec = FORMATS["mxfp4"]
        big = torch.randn(20, 200, generator=gen)
        w = big[:, 40:136]
        assert w.stride() == (200, 1)
        assert_same_result(run_c(w, fmt), ref.quantize_ref(w.contiguous(), spec), spec)

    @pytest.mark.parametrize("name", ["nvfp4", "fp6_e3m2_fp8_scales_global"])
    def test_caller_global_scale(self, name, gen):
        fmt, spec = FORMATS[name]
        w = torch.randn(8, 64, generator=gen)
        g = torch.tensor([123.5])
        got = run_c(w, fmt, g)
        assert got.global_scale.item() == 123.5
        assert_same_result(got, ref.quantize_ref(w, spec, g), spec)

    @pytest.mark.parametrize("name", sorted(FORMATS))
    @pytest.mark.parametrize("out_dtype", [SD.float32, SD.bfloat16])
    def test_dequantize_reconstructs_the_quantizer_output(self, name, out_dtype, gen):
        fmt, spec = FORMATS[name]
        w = adversarial_weight(37, 72, gen)
        r = run_c(w, fmt)
        zeros = r.zeros if spec.element == "int" and not spec.symmetric else None
        g = r.global_scale if spec.global_scale else None
        got = _C.format_dequantize(r.codes, r.scales, zeros, g, fmt, out_dtype)
        bits_equal(got, r.dequantized.to(_TORCH_SD[out_dtype]), "dequantized")
        bits_equal(ref.dequantize_ref(r.codes, r.scales, spec, zeros, g).to(_TORCH_SD[out_dtype]), got, "vs reference")

    @pytest.mark.parametrize("element", ["fp4_e2m1", "fp6_e2m3", "fp6_e3m2", "fp8_e4m3"])
    @pytest.mark.parametrize("rows, cols", [(3, 1), (3, 2), (5, 7), (4, 64), (2, 65), (0, 8), (4, 0)])
    def test_pack_unpack_equal_reference(self, element, rows, cols, gen):
        width = {"fp4_e2m1": 16, "fp8_e4m3": 256}.get(element, 64)
        codes = torch.randint(0, width, (rows, cols), generator=gen, dtype=torch.int32).to(torch.uint8)
        kind = getattr(EK, element)
        packed = _C.pack_fp_codes(codes, kind)
        bits_equal(packed, ref.pack_ref(codes, element), "packed")
        bits_equal(_C.unpack_fp_codes(packed, kind, cols), codes, "unpacked")
        bits_equal(ref.unpack_ref(packed, element, cols), codes, "reference unpack")


# === compressed-tensors ===============================================================================================


def _scheme(preset: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(preset, ["Linear"])


class TestCompressedTensors:
    """Our packed tensors through compressed-tensors' own decompressors (output dtype bf16: its unpack dtype), and its
    calculate_qparams / compressors on float32 weights against ours."""

    @pytest.mark.parametrize("rows, cols", [(32, 64), (7, 160)])
    def test_nvfp4_decompress(self, rows, cols, gen):
        from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor

        fmt = _C.Format.nvfp4()
        w = adversarial_weight(rows, cols, gen) if rows >= 10 else torch.randn(rows, cols, generator=gen)
        r = run_c(w, fmt)
        sd = {"weight_packed": _C.pack_fp_codes(r.codes, EK.fp4_e2m1),
              "weight_scale": r.scale_codes.view(torch.float8_e4m3fn), "weight_global_scale": r.global_scale}
        out = NVFP4PackedCompressor.decompress(sd, _scheme("NVFP4A16"))["weight"]
        bits_equal(out, r.dequantized.to(out.dtype), "NVFP4 decompressed")
        bits_equal(out, _C.format_dequantize(r.codes, r.scales, None, r.global_scale, fmt, SD.bfloat16), "dequantize")

    @pytest.mark.parametrize("preset, element, compressor", [
        ("MXFP4A16", "fp4_e2m1", "compressed_tensors.compressors.mxfp4.base:MXFP4PackedCompressor"),
        ("MXFP6A16", "fp6_e2m3", "compressed_tensors.compressors.mxfp6.base:MXFP6PackedCompressor"),
        ("MXFP8A16", "fp8_e4m3", "compressed_tensors.compressors.mxfp8.base:MXFP8QuantizationCompressor"),
    ])
    def test_mx_decompress(self, preset, element, compressor, gen):
        import importlib

        mod, cls = compressor.split(":")
        comp = getattr(importlib.import_module(mod), cls)
        kind = getattr(EK, element)
        fmt = _C.Format.mx(kind)
        w = adversarial_weight(40, 128, gen)
        w[0] = w[0] * 1e-30  # keep every scale finite in bf16 (compressed-tensors decodes scales to bf16)
        r = run_c(w, fmt)
        if element == "fp8_e4m3":
            sd = {"weight": r.codes.view(torch.float8_e4m3fn), "weight_scale": r.scale_codes}
        else:
            sd = {"weight_packed": _C.pack_fp_codes(r.codes, kind), "weight_scale": r.scale_codes}
        out = comp.decompress(sd, _scheme(preset))["weight"]
        bits_equal(out, r.dequantized.to(out.dtype), f"{preset} decompressed")

    @pytest.mark.parametrize("preset, fmt_name", [("FP8_DYNAMIC", "fp8_channel_bf16"), ("FP8", "fp8_tensor"),
                                                  ("FP8_BLOCK", "fp8_block128")])
    def test_fp8_decompress(self, preset, fmt_name, gen):
        from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor

        fmt, spec = FORMATS[fmt_name]
        w = torch.randn(300, 200, generator=gen) * 0.05  # not multiples of 128: partial edge blocks
        r = run_c(w, fmt)
        scale = r.scales.to(spec.scale_dtype)
        if fmt_name == "fp8_tensor":
            scale = scale.reshape(1)
        sd = {"weight": r.codes.view(torch.float8_e4m3fn), "weight_scale": scale}
        out = NaiveQuantizationCompressor.decompress(sd, _scheme(preset))["weight"]
        bits_equal(out, r.dequantized.to(out.dtype), f"{preset} decompressed")

    @pytest.mark.parametrize("preset, fmt_name", [("NVFP4A16", "nvfp4"), ("MXFP4A16", "mxfp4"),
                                                  ("MXFP6A16", "mxfp6_e2m3"), ("FP8_DYNAMIC", "fp8_channel"),
                                                  ("FP8_BLOCK", "fp8_block128"), ("FP8", "fp8_tensor")])
    def test_qparams_and_compress_equal_compressed_tensors_on_fp32(self, preset, fmt_name, gen):
        """compressed-tensors' calculate_qparams (llm-compressor's memoryless minmax observer: min / max per group)
        and its compressor, on a float32 weight, give our scales and packed codes bit for bit."""
        from compressed_tensors.compressors import BaseCompressor
        from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam

        fmt, spec = FORMATS[fmt_name]
        scheme = _scheme(preset)
        args = scheme.weights
        w = adversarial_weight(256, 256, gen)[10:] if fmt_name != "fp8_tensor" else torch.randn(200, 256, generator=gen)
        rows, cols = w.shape
        r = run_c(w, fmt)
        if spec.group == "group":
            v = w.reshape(rows, cols // spec.group_size, spec.group_size)
            lo, hi = v.amin(-1), v.amax(-1)
        elif spec.group == "channel":
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        elif spec.group == "tensor":
            lo, hi = w.amin().reshape(1), w.amax().reshape(1)
        else:
            pad = torch.nn.functional.pad(w, (0, -cols % 128, 0, -rows % 128))
            t = pad.reshape(pad.shape[0] // 128, 128, pad.shape[1] // 128, 128)
            lo, hi = t.amin(dim=(1, 3)), t.amax(dim=(1, 3))
        g = None
        if spec.global_scale:
            absmax = torch.maximum(-w.amin(), w.amax())
            g = generate_gparam(-absmax.reshape(1), absmax.reshape(1))
            bits_equal(r.global_scale, g, "global scale")
        scale, _ = calculate_qparams(lo, hi, args, global_scale=g)
        bits_equal(r.scales, scale.float().reshape(r.scales.shape), "scales")
        sd = {"weight": w, "weight_scale": scale}
        if g is not None:
            sd["weight_global_scale"] = g
        name = {"NVFP4A16": "nvfp4-pack-quantized", "MXFP4A16": "mxfp4-pack-quantized",
                "MXFP6A16": "mxfp6-pack-quantized"}.get(preset, "naive-quantized")
        comp = BaseCompressor.get_value_from_registry(name)
        out = comp.compress(sd, scheme)
        if "weight_packed" in out:
            bits_equal(out["weight_packed"], _C.pack_fp_codes(r.codes, fmt.element), "weight_packed")
        else:
            bits_equal(out["weight"].view(torch.uint8), r.codes, "fp8 weight")


# === source checkpoints ===============================================================================================


class TestSourceDecoders:
    @pytest.mark.parametrize("dtype, out_dtype", [(torch.bfloat16, SD.bfloat16), (torch.float32, SD.float32)])
    def test_gpt_oss_mxfp4_equals_transformers(self, dtype, out_dtype, gen):
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors

        E, R, G = 2, 6, 5
        blocks = torch.randint(0, 256, (E, R, G, 16), generator=gen, dtype=torch.int32).to(torch.uint8)
        scales = torch.randint(0, 255, (E, R, G), generator=gen, dtype=torch.int32).to(torch.uint8)  # no 255 (NaN)
        scales[0, 0, :3] = torch.tensor([0, 1, 254], dtype=torch.uint8)  # extremes: 2^-127, 2^-126, 2^127 (overflow)
        want = convert_moe_packed_tensors(blocks.clone(), scales.clone(), dtype=dtype)  # [E, G * 32, R]
        got = _C.decode_mxfp4_blocks(blocks, scales, out_dtype)  # [E, R, G * 32]
        bits_equal(got.transpose(1, 2).contiguous(), want, "gpt-oss MXFP4")
        bits_equal(got.float(), ref.decode_mxfp4_blocks_ref(blocks, scales).to(dtype).float(), "reference")

    def test_gpt_oss_nan_scale_gives_nan(self):
        blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
        out = _C.decode_mxfp4_blocks(blocks, torch.full((1, 1), 255, dtype=torch.uint8), SD.float32)
        assert out.isnan().all()

    @pytest.mark.parametrize("rows, cols", [(256, 384), (300, 200), (1, 129), (129, 1)])
    @pytest.mark.parametrize("out_dtype", [SD.bfloat16, SD.float32])
    def test_deepseek_fp8_blocks_equal_plain_torch(self, rows, cols, out_dtype, gen):
        weight = (torch.randn(rows, cols, generator=gen) * 100).to(torch.float8_e4m3fn)
        sr, sc = -(-rows // 128), -(-cols // 128)
        scale_inv = torch.rand(sr, sc, generator=gen) * 1e-3
        expanded = scale_inv.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
        want = (weight.float() * expanded).to(_TORCH_SD[out_dtype])  # DeepSeek's weight_dequant: fp32 product
        got = _C.decode_fp8_block_scaled(weight, scale_inv, 128, 128, out_dtype)
        bits_equal(got, want, "FP8 block decode")
        bits_equal(_C.decode_fp8_block_scaled(weight.view(torch.uint8), scale_inv, out_dtype=out_dtype), got,
                   "uint8 view")


# === argument errors =================================================================================================


class TestErrors:
    def test_format_validation_names_the_field(self):
        with pytest.raises(ValueError, match=r"^bits: expected an integer in \[2, 8\] for int elements, got 9$"):
            _C.Format.int_(9, True, 32)
        with pytest.raises(ValueError, match=r"^group_size: expected > 0 for group scales, got 0$"):
            _C.Format(EK.fp4_e2m1, group=GK.group)
        with pytest.raises(ValueError, match=r"^global_scale: expected only with fp8_e4m3 scales"):
            _C.Format(EK.fp4_e2m1, group=GK.group, group_size=32, scale=SK.e8m0, global_scale=True)

    def test_quantize_arguments(self):
        fmt = _C.Format.nvfp4()
        with pytest.raises(ValueError, match=r"^w: expected dtype float32, bfloat16 or float16, got Double$"):
            _C.format_quantize(torch.zeros(2, 16, dtype=torch.float64), fmt)
        with pytest.raises(ValueError, match=r"^w: expected a 2-D tensor, got 1-D"):
            _C.format_quantize(torch.zeros(16), fmt)
        with pytest.raises(ValueError, match=r"^w: expected finite values, got NaN at \(1, 3\)$"):
            w = torch.zeros(2, 16)
            w[1, 3] = float("nan")
            _C.format_quantize(w, fmt)
        with pytest.raises(ValueError, match=r"^global_scale: expected a finite value > 0, got 0$"):
            _C.format_quantize(torch.zeros(2, 16), fmt, torch.zeros(1))
        with pytest.raises(ValueError, match=r"^global_scale: expected a tensor of one element, got shape \[2\]$"):
            _C.format_quantize(torch.zeros(2, 16), fmt, torch.ones(2))
        with pytest.raises(ValueError, match=r"^global_scale: expected None for a format without a global scale"):
            _C.format_quantize(torch.zeros(2, 16), _C.Format.mxfp4(), torch.ones(1))

    def test_dequantize_arguments(self):
        fmt = _C.Format.mxfp4()
        codes = torch.zeros(4, 64, dtype=torch.uint8)
        with pytest.raises(ValueError, match=r"^scales: expected shape \[4, 2\] \(group scales of a \[4, 64\] weight\), "
                                             r"got \[4, 3\]$"):
            _C.format_dequantize(codes, torch.ones(4, 3), format=fmt)
        with pytest.raises(ValueError, match=r"^codes: expected dtype Byte, got Char$"):
            _C.format_dequantize(codes.view(torch.int8), torch.ones(4, 2), format=fmt)
        with pytest.raises(ValueError, match=r"^global_scale: expected a float32 tensor of one element"):
            _C.format_dequantize(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(4, 4), format=_C.Format.nvfp4())
        with pytest.raises(ValueError, match=r"^out_dtype: expected ScaleDtype.float32 or ScaleDtype.bfloat16, got 2$"):
            _C.format_dequantize(codes, torch.ones(4, 2), format=fmt, out_dtype=SD.float16)

    def test_pack_and_decoder_arguments(self):
        with pytest.raises(ValueError, match=r"^codes: expected fp4_e2m1 codes in \[0, 15\], got 16 at \(1, 2\)$"):
            c = torch.zeros(2, 4, dtype=torch.uint8)
            c[1, 2] = 16
            _C.pack_fp_codes(c, EK.fp4_e2m1)
        with pytest.raises(ValueError, match=r"^element: expected ElementKind.fp8_e4m3, fp4_e2m1"):
            _C.pack_fp_codes(torch.zeros(2, 4, dtype=torch.uint8), EK.int)
        with pytest.raises(ValueError, match=r"^cols: expected a value whose fp6_e2m3 packing takes 3 bytes per row"):
            _C.unpack_fp_codes(torch.zeros(2, 3, dtype=torch.uint8), EK.fp6_e2m3, 5)
        with pytest.raises(ValueError, match=r"^weight_scale_inv: expected shape \[3, 2\]"):
            _C.decode_fp8_block_scaled(torch.zeros(300, 200, dtype=torch.uint8), torch.ones(2, 2))
        with pytest.raises(ValueError, match=r"^weight: expected dtype float8_e4m3fn \(or its uint8 view\), got Float$"):
            _C.decode_fp8_block_scaled(torch.zeros(3, 3), torch.ones(1, 1))
        with pytest.raises(ValueError, match=r"^blocks: expected shape \[..., groups, 16\], got \[2, 3, 8\]$"):
            _C.decode_mxfp4_blocks(torch.zeros(2, 3, 8, dtype=torch.uint8), torch.zeros(2, 3, dtype=torch.uint8))
        with pytest.raises(ValueError, match=r"^scales: expected shape \[2, 3\]"):
            _C.decode_mxfp4_blocks(torch.zeros(2, 3, 16, dtype=torch.uint8), torch.zeros(2, 4, dtype=torch.uint8))
