"""THE tolerance policy of the Python test suite, in one place.

Every comparison of moequant against its references (``moequant.ref``) or against a mathematical bound uses a
constant from this file, so a reviewer can see at a glance what "equal" means for each kind of result.
Change a number here only with a comment saying why.
"""

from __future__ import annotations

import torch

# --- Tier 0: bit-exact ------------------------------------------------------------------------------------
# Quantization parameters, codes, dequantized values and packed words are specified bit for bit by
# libmoequant/include/moequant/{quant,pack}.h and reproduced by the references: compared with torch.equal.
# (fp32 arithmetic in a fixed order, RNE rounding of scales, round-half-to-even of codes.)
CODES_EXACT = True  # codes: torch.equal
SCALES_EXACT = True  # scale (fp32 holding a value of scale_dtype) and zero point: torch.equal
PACKING_EXACT = True  # packed int32 words and their unpacking: torch.equal
DEQUANT_EXACT = True  # (q - zero) * scale in fp32: torch.equal

# MSE scale search. quant.h accumulates sum |x - deq|^norm in double with libm pow in a sequential loop;
# the reference does the same (math.pow + cumsum), so in practice the chosen parameters are identical.
# A different accumulation order or pow implementation (a GPU kernel, a SIMD pow) could only change the
# winner of a near-tie, so the policy is: at most this fraction of groups may pick different parameters, and
# every such group's error (as the reference computes it) must be within MSE_TIE_RTOL of the best one.
# Codes of groups with identical parameters are bit-exact.
MSE_PARAM_MISMATCH_FRACTION = 0.0  # CPU core vs reference: identical
MSE_PARAM_MISMATCH_FRACTION_GPU = 1e-3  # a non-libm pow may flip near-ties in at most 0.1% of the groups
MSE_TIE_RTOL = 1e-12  # relative error difference that still counts as a tie (a few ulps of a 128-term sum)

# --- RTN round trip ---------------------------------------------------------------------------------------
# Inside the clamp range, round-to-nearest puts a value at most half a step from its dequantized value. The
# float32 evaluation of x / scale + zero and of (q - zero) * scale adds at most ~3 * 2^bits units of 2^-24
# of a step (|x / scale|, |v| and |q - zero| are all below 2^bits). So, per bit width:
#     max |w - deq| <= scale * (0.5 + RTN_FP32_SLACK_ULPS * 2**bits * 2**-24)
# e.g. 4 bits: 0.5 + 2.9e-6 steps; 8 bits: 0.5 + 4.6e-5 steps. With minmax scales stored in fp32 every value
# is inside the clamp range, so the bound holds for the whole tensor.
RTN_FP32_SLACK_ULPS = 3.0


def rtn_step_budget(bits: int) -> float:
    """Largest |w - deq| in units of the group's scale for a value inside the clamp range."""
    return 0.5 + RTN_FP32_SLACK_ULPS * (2**bits) * 2.0**-24


RTN_STEP_BUDGET = {b: rtn_step_budget(b) for b in range(2, 9)}  # per-bit-width RTN round-trip budgets

# --- Hessian accumulation ---------------------------------------------------------------------------------
# Reference: float64 sums. An fp32 accumulator differs per element by at most gamma_n * sum_t c_t |x_ti x_tj|
# (worst case n * 2^-24 for n tokens); blocked/pairwise sums do far better (~sqrt(n) * 2^-24). The budget is
# elementwise, relative to that absolute-value sum, so it is meaningful even where H[i, j] cancels to ~0:
#     |H32 - H64| <= HESSIAN_FP32_RTOL * (sum_t c_t |x_t| |x_t|^T) + tiny
# 1e-5 covers sequential float32 sums up to ~170 tokens per expert in the worst case and ~1e5 tokens typically;
# the tests use at most a few thousand tokens.
HESSIAN_FP32_RTOL = 1e-5
HESSIAN_FP64_RTOL = 1e-12  # float64 accumulator vs float64 reference (different summation order only)
HESSIAN_ATOL = 1e-30  # keeps all-zero entries (experts without tokens) comparable with <=
MASS_RTOL = 1e-6  # routing-weight mass: float32 weights summed in float64 (order only)
# Tensor-core Hessians (precision "tf32" / "bf16"), elementwise against the same |.|-sum as above:
#     |H_lp - H_ref| <= RTOL * (sum_t c_t |x_t| |x_t|^T) + tiny
# Each scaled row value sqrt(c) x is rounded once to the input format (bf16: 8 significant bits, unit roundoff
# u = 2^-8; TF32: 11 bits, u = 2^-11 when rounded, 2^-10 if the hardware truncates), so every product carries a
# relative error <= 2u + u^2; the fp32 accumulation adds the fp32 budget. Worst-case bounds, not statistics:
HESSIAN_BF16_RTOL = 2 * 2.0**-8 + 2.0**-16 + HESSIAN_FP32_RTOL  # 7.83e-3
HESSIAN_TF32_RTOL = 2 * 2.0**-10 + 2.0**-20 + HESSIAN_FP32_RTOL  # 1.96e-3 (truncation bound)

# --- GPTQ: C++ core vs reference ---------------------------------------------------------------------------
# Both run exact GPTQ; the core works in float32 where the reference uses float64, so a value sitting on a code
# boundary may round the other way and the error feedback carries the difference along its row. Policy:
GPTQ_CODE_MATCH_FRACTION = 0.99  # identical codes for >= 99% of the entries
GPTQ_LOSS_RTOL = 1e-3  # |loss - loss_ref| <= 1e-3 * loss_ref
# Dynamic groups (no act-order) take their range from error-updated columns, which carry the float32-vs-float64
# drift (~1e-6 relative), so their scales are compared with a relative tolerance, zero points exactly:
GPTQ_PARAM_MATCH_FRACTION = 0.99  # >= 99% of the groups: same zero point and scale within GPTQ_SCALE_RTOL
GPTQ_SCALE_RTOL = 1e-5  # a few float32 ulps of drift in the group's min/max (static groups are bit-exact)
GPTQ_LOSS_REPORT_RTOL = 1e-9  # the reported loss vs tr((W-Q) H (W-Q)^T) recomputed from the returned Q in float64
# GPTQ must not be worse than RTN on the proxy loss it minimises (same format, same H). A small slack, since
# on an almost diagonal H both are essentially RTN:
GPTQ_VS_RTN_SLACK = 1e-6  # loss_gptq <= loss_rtn * (1 + slack)


def assert_equal(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-exact comparison with a message that says where the first difference is."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not torch.equal(actual, expected):
        diff = (actual != expected).nonzero()
        i = tuple(diff[0].tolist())
        raise AssertionError(
            f"{what}: {diff.shape[0]} of {actual.numel()} entries differ; first at {i}: "
            f"{actual[i].item()!r} != {expected[i].item()!r}"
        )


def assert_hessian_close(acc, x: torch.Tensor, ids: torch.Tensor, w, rtol: float = HESSIAN_FP32_RTOL) -> torch.Tensor:
    """The Hessian policy above for an accumulator that took the rows ``x`` routed to ``ids`` with weights ``w``
    (None: 1) from zero. ``acc``: anything with ``hessians`` [E, d, d], ``counts`` and ``mass`` (an
    ops.HessianAccumulator on any device, or gpu_helpers.RawHessians); ``rtol``: HESSIAN_FP32_RTOL (default),
    HESSIAN_FP64_RTOL, HESSIAN_TF32_RTOL or HESSIAN_BF16_RTOL.

    Checks every element against the float64 reference within ``rtol`` of the |.|-sum, H exactly symmetric, experts
    without rows exactly zero, counts exact, mass (float64) within MASS_RTOL, H in the accumulator's dtype (float32
    for raw CUDA tensors). Returns the |.|-sum ``sum_t c_t |x_t| |x_t|^T`` (float64, CPU) for further budgets."""
    from moequant.ref import accumulate_hessian_ref

    h = acc.hessians.cpu()
    experts = h.shape[0]
    assert h.dtype == getattr(acc, "dtype", torch.float32), f"H: dtype {h.dtype}"
    h_ref, counts_ref, mass_ref = accumulate_hessian_ref(x, ids, w, experts)
    h_abs, _, _ = accumulate_hessian_ref(x.abs(), ids, w, experts)
    err = (h.double() - h_ref).abs()
    assert (err <= rtol * h_abs + HESSIAN_ATOL).all(), (
        f"max err / |.|-sum {(err / (h_abs + 1e-300)).max().item():.3g} > rtol {rtol:.3g}"
    )
    assert torch.equal(h, h.transpose(1, 2)), "H must be exactly symmetric"
    assert (h[counts_ref == 0] == 0).all(), "an expert without rows must stay exactly zero"
    assert_equal(acc.counts.cpu(), counts_ref, "counts")
    assert acc.mass.dtype == torch.float64, f"mass: dtype {acc.mass.dtype}"
    assert torch.allclose(acc.mass.cpu(), mass_ref, rtol=MASS_RTOL, atol=0), "mass vs the float64 reference"
    return h_abs
