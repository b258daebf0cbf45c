"""Plain-PyTorch twin of ``libmoequant/include/moequant/format.h``: the weight formats, written from their specs.

Nothing here is transliterated from the C++ (which works on bits): the FP8 codec is torch's own ``float8_e4m3fn``
cast, the FP4 codec is compressed-tensors' threshold table, the FP6 codecs round ``|x| / step`` with the step of
the value's binade, the E8M0 exponent comes from ``torch.frexp``, and the groups are ``reshape``s of a zero-padded
matrix. The tests (tests/python/test_formats_core.py) compare ``moequant._C`` against these functions bit for bit.

The contract (docs/formats.md), for a weight ``w [rows, cols]`` read as float32:

* a *format* is an element kind (int b-bit, FP8 E4M3, FP4 E2M1, FP6 E2M3, FP6 E3M2), a group shape (tensor,
  channel, group of ``group_size`` columns, block ``block_rows x block_cols``; edge groups / blocks may be partial),
  a scale kind (float of a storage dtype, FP8 E4M3, E8M0) and an optional per-tensor global scale (NVFP4);
* each group's range ``[lo, hi]`` (widened to include 0) gives its scale (``group_params_ref``); floats use
  ``amax = max(-lo, hi)``:
  - float scales: ``s = round_to(amax / max_elem, scale_dtype)``, 0 -> ``finfo(scale_dtype).eps``;
  - FP8 scales: ``s = e4m3(amax / max_elem [* global])`` (saturating), 0 -> 0.125;
  - E8M0 scales: ``s = 2**(e - 127)``, ``e = clamp(127 + log2(p) - emax, 0, 254)`` with ``p`` the power of two
    that amax rounds to (upwards when its mantissa fraction is >= 1 - 2**-(m+1));
  - the global scale is ``448 * max_elem / max(amax_tensor, FLT_MIN)``, 1 when that is not finite;
* floats: ``code = encode(x / eff)`` (round to nearest even, saturating), ``eff = s`` or ``s / global``; dequantized
  ``decode(code) * eff``; ints follow :mod:`moequant.ref.quant`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .quant import _qparams_from_range

__all__ = [
    "ELEMENTS",
    "FormatSpec",
    "FormatResult",
    "e4m3_encode_ref",
    "e4m3_decode_ref",
    "e2m1_encode_ref",
    "e2m1_decode_ref",
    "fp6_encode_ref",
    "fp6_decode_ref",
    "e8m0_decode_ref",
    "mx_scale_exponent_ref",
    "global_scale_ref",
    "group_params_ref",
    "quantize_ref",
    "dequantize_ref",
    "pack_ref",
    "unpack_ref",
    "decode_fp8_block_scaled_ref",
    "decode_mxfp4_blocks_ref",
]

# element kind -> (exponent bits, mantissa bits, bias, largest finite value, MX emax, MX rounding mantissa)
ELEMENTS = {
    "fp8_e4m3": (4, 3, 7, 448.0, 8, 1),
    "fp4_e2m1": (2, 1, 1, 6.0, 2, 1),
    "fp6_e2m3": (2, 3, 1, 7.5, 2, 3),
    "fp6_e3m2": (3, 2, 3, 28.0, 4, 2),
}
_FLT_MIN = torch.finfo(torch.float32).tiny


class FormatSpec(NamedTuple):
    """A format (the fields of format.h's ``Format``; ``group`` in tensor / channel / group / block, ``scale`` in
    float / fp8_e4m3 / e8m0)."""

    element: str  # "int" or a key of ELEMENTS
    group: str
    group_size: int = 0
    block: tuple[int, int] = (0, 0)
    scale: str = "float"
    scale_dtype: torch.dtype = torch.float32
    global_scale: bool = False
    bits: int = 8  # int only
    symmetric: bool = True  # int only

    @staticmethod
    def nvfp4() -> "FormatSpec":
        return FormatSpec("fp4_e2m1", "group", 16, scale="fp8_e4m3", global_scale=True)

    @staticmethod
    def mx(element: str) -> "FormatSpec":
        return FormatSpec(element, "group", 32, scale="e8m0")


class FormatResult(NamedTuple):
    codes: Tensor  # uint8 [rows, cols]
    scales: Tensor  # float32 [sr, sc] (values)
    scale_codes: Tensor  # uint8 [sr, sc] (FP8 / E8M0 bytes; 0 for float scales)
    zeros: Tensor  # int32 [sr, sc]
    global_scale: Tensor  # float32 [1]
    dequantized: Tensor  # float32 [rows, cols]


# --- element codecs ----------------------------------------------------------------------------------------------


def e4m3_encode_ref(x: Tensor) -> Tensor:
    """float8_e4m3fn codes (uint8) of x: torch's cast after clamping to [-448, 448] (compressed-tensors). NaN stays NaN."""
    return torch.clamp(x.float(), -448.0, 448.0).to(torch.float8_e4m3fn).view(torch.uint8)


def e4m3_decode_ref(codes: Tensor) -> Tensor:
    return codes.to(torch.uint8).view(torch.float8_e4m3fn).float()


_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e2m1_encode_ref(x: Tensor) -> Tensor:
    """FP4 codes (sign << 3 | index) by compressed-tensors' thresholds (round half to even, saturating at 6); the
    sign bit is set for x < 0 (so -0.0 -> 0, a tiny negative -> 8)."""
    a = x.float().abs()
    idx = torch.zeros_like(a, dtype=torch.uint8)
    # a value above a threshold (or equal to it when the upper neighbour is the even one) moves up one index
    for k, (t, inclusive) in enumerate([(0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False),
                                        (3.5, True), (5.0, False)]):
        idx = torch.where(a >= t if inclusive else a > t, torch.tensor(k + 1, dtype=torch.uint8), idx)
    return idx | ((x.float() < 0).to(torch.uint8) << 3)


def e2m1_decode_ref(codes: Tensor) -> Tensor:
    c = codes.to(torch.int64)
    v = _E2M1[c & 7]
    return torch.where((c & 8) != 0, -v, v)


def _fp6_params(element: str):
    e, m, bias, vmax, _, _ = ELEMENTS[element]
    return m, 1 - bias, vmax


def fp6_encode_ref(x: Tensor, element: str) -> Tensor:
    """6-bit codes (sign in bit 5) of FP6 E2M3 / E3M2: |x| rounded half to even on the grid of its binade
    (step 2**(max(floor(log2|x|), emin) - m)), saturating at the largest value; the sign bit is x's sign bit."""
    m, emin, vmax = _fp6_params(element)
    a = x.float().abs()
    _, ex = torch.frexp(a)  # a = f * 2**ex, f in [0.5, 1): floor(log2 a) = ex - 1
    e = torch.clamp(ex - 1, min=emin)
    step = torch.pow(2.0, (e - m).float())
    mag = torch.clamp(torch.round(a / step) * step, max=vmax)  # torch.round: half to even
    table = fp6_decode_ref(torch.arange(32, dtype=torch.uint8), element)
    code = torch.searchsorted(table, mag).to(torch.uint8)
    return code | (torch.signbit(x.float()).to(torch.uint8) << 5)


def fp6_decode_ref(codes: Tensor, element: str) -> Tensor:
    m, emin, _ = _fp6_params(element)
    c = codes.to(torch.int64)
    mag = c & 0x1F
    exp, man = mag >> m, mag & ((1 << m) - 1)
    sub = man.double() * 2.0 ** (emin - m)
    norm = (1.0 + man.double() / 2**m) * torch.pow(2.0, (exp + emin - 1).double())
    v = torch.where(exp == 0, sub, norm).float()
    return torch.where((c & 0x20) != 0, -v, v)


def _encode(element: str, v: Tensor) -> Tensor:
    if element == "fp8_e4m3":
        return e4m3_encode_ref(v)
    if element == "fp4_e2m1":
        return e2m1_encode_ref(v)
    return fp6_encode_ref(v, element)


def _decode(element: str, codes: Tensor) -> Tensor:
    if element == "fp8_e4m3":
        return e4m3_decode_ref(codes)
    if element == "fp4_e2m1":
        return e2m1_decode_ref(codes & 0xF)
    return fp6_decode_ref(codes & 0x3F, element)


def e8m0_decode_ref(e: Tensor) -> Tensor:
    """2**(e - 127) in float32 (e = 0 is 2**-127), 255 -> NaN."""
    v = torch.pow(2.0, e.to(torch.float64) - 127.0).float()
    return torch.where(e.to(torch.int64) == 255, torch.tensor(float("nan")), v)


def mx_scale_exponent_ref(amax: Tensor, element: str) -> Tensor:
    """E8M0 byte of groups with absmax ``amax`` (compressed-tensors' generate_mx_scales, clamped to [0, 254])."""
    _, _, _, _, emax, mround = ELEMENTS[element]
    f, ex = torch.frexp(amax.float())  # amax = f * 2**ex, f in [0.5, 1)
    k = ex - 1  # floor(log2 amax)
    frac = 2.0 * f.double() - 1.0  # mantissa fraction in [0, 1)
    k = torch.where(frac >= 1.0 - 2.0 ** -(mround + 1), k + 1, k)
    e = torch.clamp(127 + k - emax, 0, 254)
    return torch.where(amax > 0, e, torch.zeros_like(e)).to(torch.uint8)


def global_scale_ref(amax_tensor: float | Tensor, element: str = "fp4_e2m1") -> Tensor:
    """NVFP4's global scale: (448 * max_elem) * fl(1 / max(amax, FLT_MIN)) in float32, 1 if not finite
    (generate_gparam's ``2688 / amax``, which torch evaluates as ``amax.reciprocal() * 2688``)."""
    amax = torch.as_tensor(amax_tensor, dtype=torch.float32).reshape(1)
    g = torch.reciprocal(torch.clamp(amax, min=_FLT_MIN)) * torch.tensor(448.0 * ELEMENTS[element][3],
                                                                         dtype=torch.float32)
    return torch.where(torch.isfinite(g), g, torch.ones_like(g))


# --- groups ----------------------------------------------------------------------------------------------------------


def _tiles(spec: FormatSpec, rows: int, cols: int) -> tuple[int, int]:
    if spec.group == "tensor":
        return max(rows, 1), max(cols, 1)
    if spec.group == "channel":
        return 1, max(cols, 1)
    if spec.group == "group":
        return 1, spec.group_size
    if spec.group == "block":
        return spec.block
    raise ValueError(f"group: expected tensor, channel, group or block, got {spec.group!r}")


def _scale_shape(spec: FormatSpec, rows: int, cols: int) -> tuple[int, int]:
    """tensor [1, 1], channel [rows, 1], group [rows, ceil(cols / g)], block [ceil(rows / R), ceil(cols / C)]."""
    tr, tc = _tiles(spec, rows, cols)
    if spec.group == "tensor":
        return 1, 1
    if spec.group == "channel":
        return rows, 1
    return -(-rows // tr), -(-cols // tc)


def _expand(t: Tensor, spec: FormatSpec, rows: int, cols: int) -> Tensor:
    """A per-group tensor [sr, sc] broadcast to [rows, cols]."""
    tr, tc = _tiles(spec, rows, cols)
    return t.repeat_interleave(tr, 0)[:rows].repeat_interleave(tc, 1)[:, :cols]


def group_params_ref(spec: FormatSpec, lo: Tensor, hi: Tensor, global_scale: Tensor | None = None):
    """(scale values f32, scale codes uint8, zeros int32, effective multipliers f32) of groups spanning [lo, hi]."""
    lo = torch.clamp(lo.float(), max=0.0)
    hi = torch.clamp(hi.float(), min=0.0)
    zeros_u8 = torch.zeros(lo.shape, dtype=torch.uint8)
    if spec.element == "int":
        scale, zero = _qparams_from_range(lo, hi, spec.bits, spec.symmetric, spec.scale_dtype)
        return scale, zeros_u8, zero.to(torch.int32), scale
    vmax = torch.tensor(ELEMENTS[spec.element][3], dtype=torch.float32)
    amax = torch.maximum(-lo, hi)
    zero = torch.zeros(lo.shape, dtype=torch.int32)
    if spec.scale == "e8m0":
        code = mx_scale_exponent_ref(amax, spec.element)
        scale = e8m0_decode_ref(code)
    elif spec.scale == "fp8_e4m3":
        local = amax / vmax
        if spec.global_scale:
            local = global_scale * local
        code = e4m3_encode_ref(local)
        code = torch.where(e4m3_decode_ref(code) == 0, torch.tensor(0x20, dtype=torch.uint8), code)  # eps 0.125
        scale = e4m3_decode_ref(code)
    else:
        code = zeros_u8
        scale = (amax / vmax).to(spec.scale_dtype).float()
        scale = torch.where(scale == 0, torch.tensor(torch.finfo(spec.scale_dtype).eps), scale)
    eff = scale / global_scale if spec.global_scale else scale
    return scale, code, zero, eff


def quantize_ref(w: Tensor, spec: FormatSpec, global_scale: Tensor | float | None = None) -> FormatResult:
    """RTN quantization of ``w [rows, cols]`` (any float dtype, read as float32) in format ``spec``."""
    x = w.float()
    if not torch.isfinite(x).all():
        raise ValueError("w: expected finite values, got NaN or Inf")
    rows, cols = x.shape
    tr, tc = _tiles(spec, rows, cols)
    sr, sc = _scale_shape(spec, rows, cols)
    g = None
    if spec.global_scale:
        if global_scale is None:
            amax = x.abs().max() if x.numel() else torch.tensor(0.0)
            g = global_scale_ref(amax, spec.element)
        else:
            g = torch.as_tensor(global_scale, dtype=torch.float32).reshape(1)
    # zero padding to whole tiles leaves every range unchanged (ranges include 0); an empty group is an all-zero one
    pr, pc = sr * tr, sc * tc
    xp = torch.zeros(pr, pc)
    xp[:rows, :cols] = x
    tiles = xp.reshape(pr // tr, tr, sc, tc)
    lo, hi = tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3))
    scale, code, zero, eff = group_params_ref(spec, lo, hi, g)
    eff_full, zero_full = _expand(eff, spec, rows, cols), _expand(zero, spec, rows, cols)
    if spec.element == "int":
        qmin, qmax = -(1 << (spec.bits - 1)), (1 << (spec.bits - 1)) - 1
        q = torch.clamp(torch.round(x / eff_full + zero_full.float()), qmin, qmax).to(torch.int32)
        codes = q.to(torch.int8).view(torch.uint8)
        deq = (q - zero_full).float() * eff_full
    else:
        codes = _encode(spec.element, x / eff_full)
        deq = _decode(spec.element, codes) * eff_full
    return FormatResult(codes, scale, code, zero, g if g is not None else torch.ones(1), _canonical_nan(deq))


def _canonical_nan(t: Tensor) -> Tensor:
    """Every NaN as the quiet NaN 0x7FC00000 (torch's default NaN), as format.h returns them."""
    return torch.where(torch.isnan(t), torch.tensor(float("nan")), t)


def dequantize_ref(codes: Tensor, scales: Tensor, spec: FormatSpec, zeros: Tensor | None = None,
                   global_scale: Tensor | float | None = None) -> Tensor:
    """float32 [rows, cols]: floats decode(code) * scale (or * (scale / global)); ints (int8(code) - zero) * scale."""
    rows, cols = codes.shape
    s = scales.float()
    if spec.global_scale:
        s = s / torch.as_tensor(global_scale, dtype=torch.float32).reshape(1)
    s = _expand(s, spec, rows, cols)
    if spec.element == "int":
        z = _expand(zeros, spec, rows, cols) if zeros is not None else torch.zeros(rows, cols, dtype=torch.int32)
        return _canonical_nan((codes.view(torch.int8).to(torch.int32) - z).float() * s)
    return _canonical_nan(_decode(spec.element, codes) * s)


# --- packing -----------------------------------------------------------------------------------------------------


def pack_ref(codes: Tensor, element: str) -> Tensor:
    """FP4: byte j = code[2j] | code[2j+1] << 4 (odd rows padded with a zero code); FP6: four codes -> the three
    little-endian bytes of c0 | c1 << 6 | c2 << 12 | c3 << 18 (rows padded to a multiple of 4); FP8: the bytes."""
    rows, cols = codes.shape
    c = codes.to(torch.int64)
    if element == "fp8_e4m3":
        return codes.to(torch.uint8).clone()
    per = 2 if element == "fp4_e2m1" else 4
    if rows == 0:
        return torch.zeros(0, (-(-cols // per)) * (1 if per == 2 else 3), dtype=torch.uint8)
    bits = 4 if element == "fp4_e2m1" else 6
    pad = -cols % per
    c = torch.cat([c, torch.zeros(rows, pad, dtype=torch.int64)], dim=1).reshape(rows, -1, per)
    word = sum(c[..., i] << (bits * i) for i in range(per))
    if element == "fp4_e2m1":
        return word.to(torch.uint8)
    return torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1).reshape(rows, -1).to(torch.uint8)


def unpack_ref(packed: Tensor, element: str, cols: int) -> Tensor:
    rows = packed.shape[0]
    p = packed.to(torch.int64)
    if element == "fp8_e4m3":
        return packed.to(torch.uint8).clone()
    if rows == 0:
        return torch.zeros(0, cols, dtype=torch.uint8)
    if element == "fp4_e2m1":
        out = torch.stack([p & 0xF, p >> 4], dim=-1).reshape(rows, -1)
    else:
        b = p.reshape(rows, -1, 3)
        word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)
        out = torch.stack([(word >> (6 * i)) & 0x3F for i in range(4)], dim=-1).reshape(rows, -1)
    return out[:, :cols].to(torch.uint8)


# --- source checkpoints ----------------------------------------------------------------------------------------------


def decode_fp8_block_scaled_ref(weight: Tensor, scale_inv: Tensor, block: tuple[int, int] = (128, 128)) -> Tensor:
    """DeepSeek-V3 FP8: ``weight.float() * scale_inv`` broadcast over its blocks (float32)."""
    rows, cols = weight.shape
    s = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return weight.view(torch.float8_e4m3fn).float() * s


def decode_mxfp4_blocks_ref(blocks: Tensor, scales: Tensor) -> Tensor:
    """gpt-oss MXFP4: blocks [..., G, 16] (element 2j in the low nibble of byte j) with E8M0 scales [..., G] ->
    float32 [..., G * 32] = value * 2**(scale - 127)."""
    b = blocks.to(torch.int64)
    codes = torch.stack([b & 0xF, b >> 4], dim=-1).flatten(-2)  # [..., G, 32]
    v = e2m1_decode_ref(codes) * e8m0_decode_ref(scales).unsqueeze(-1)
    return _canonical_nan(v.flatten(-2))
