"""The Hadamard transform: moequant.ops.hadamard_transform (CPU core; CUDA kernel when available) against the
explicit-matrix reference moequant.ref.hadamard_ref, orthonormality of the matrices, error paths."""

from __future__ import annotations

import math

import pytest
import torch

from gpu_helpers import misaligned
from moequant import ops
from moequant.ref import hadamard_matrix, hadamard_ref
from moequant.ref.hadamard import decompose, special_hadamard, sylvester

# fp32: every output is a +-1 sum of n inputs, scaled once; butterflies in a different order than the float64
# reference. Budget: a few ulps of the largest partial sum times log2(n) levels.
FP32_RTOL = 4 * 2.0**-24
SIZES = [1, 2, 16, 128, 1024, 12, 24, 96, 20, 40, 160, 28, 56, 7168, 4096, 40 * 64]


def _budget(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    mag = x.double().abs().sum(-1, keepdim=True) / math.sqrt(n)
    return FP32_RTOL * max(1.0, math.log2(n)) * mag + 1e-30


@pytest.mark.parametrize("m", [12, 20, 28, 40])
def test_special_matrices_are_hadamard(m):
    h = special_hadamard(m)
    assert h.shape == (m, m)
    assert torch.equal(h.abs(), torch.ones_like(h))
    assert torch.equal(h @ h.t(), m * torch.eye(m, dtype=torch.float64))


@pytest.mark.parametrize("n", [12 * 8, 20 * 4, 28 * 16, 40 * 2, 64, 7168 // 16])
def test_full_matrices_are_orthogonal(n):
    h = hadamard_matrix(n)
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


def test_sylvester_is_symmetric_natural_order():
    h = sylvester(8)
    assert torch.equal(h, h.t())
    assert torch.equal(h[3], torch.tensor([1.0, -1, -1, 1, 1, -1, -1, 1], dtype=torch.float64))


def test_core_tables_match_reference_constructions():
    """The C++ sign tables (hadamard_tables.h) are the matrices the reference builds: checked through the CPU
    transform of the identity, which returns H_n / sqrt(n) row by row."""
    for n in (12, 20, 28, 56):
        got = ops.hadamard_transform(torch.eye(n)).double() * math.sqrt(n)
        assert torch.equal(got.round(), hadamard_matrix(n)), n


def test_decompose():
    assert decompose(7168) == (28, 256)
    assert decompose(40 * 64) == (20, 128)
    assert decompose(32768) == (1, 32768)
    for bad in (0, 3, 36, 65536, 28 * 2048):
        assert decompose(bad) is None


@pytest.mark.parametrize("n", SIZES)
def test_cpu_matches_reference(n, gen):
    x = torch.randn(5, n, generator=gen) * torch.logspace(-3, 2, 5).unsqueeze(1)
    got = ops.hadamard_transform(x)
    ref = hadamard_ref(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    assert bool(((got.double() - ref.double()).abs() <= _budget(x)).all())


def test_leading_dims_and_norm(gen):
    x = torch.randn(2, 3, 4, 96, generator=gen)
    y = ops.hadamard_transform(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, 96), hadamard_ref(x.reshape(-1, 96)), rtol=0, atol=1e-5)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)


def test_orthonormal_inverse(gen):
    """H / sqrt(n) is orthogonal: applying the transform to the rows of its transpose gives back x."""
    n = 7168
    x = torch.randn(2, n, generator=gen)
    y = ops.hadamard_transform(x)
    # x = y @ (H/sqrt n)^T = (H/sqrt n) applied to y via the matrix transpose
    back = (y.double() @ hadamard_matrix(n).t()) / math.sqrt(n)
    torch.testing.assert_close(back.float(), x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_dtypes(dtype, gen):
    x = torch.randn(4, 224, generator=gen).to(dtype)
    y = ops.hadamard_transform(x)
    assert y.dtype == dtype
    ref = hadamard_ref(x.float())  # computed in fp32 / fp64, then rounded once
    assert torch.equal(y, ref.to(dtype)) or float((y.float() - ref).abs().max()) <= float(ref.abs().max()) * 2**-7


def test_errors():
    with pytest.raises(ValueError, match=r"x: .*12, 20, 28 or 40"):
        ops.hadamard_transform(torch.randn(3, 36))
    with pytest.raises(ValueError, match="x"):
        ops.hadamard_transform(torch.randn(3, 65536))
    with pytest.raises(ValueError, match="x: expected dtype"):
        ops.hadamard_transform(torch.randn(3, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match="x"):
        ops.hadamard_transform([1.0, 2.0])


@pytest.mark.gpu
@pytest.mark.parametrize("n", SIZES + [32768, 16384, 28 * 1024, 12 * 2048, 20 * 1024])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_matches_cpu(n, dtype, gen):
    """2-byte dtypes: one rounding to the dtype after an fp32 computation, within one ulp of the rounded float64
    reference. (float32 at these lengths: test_cuda_every_length_fp32, which covers every supported length.)"""
    rows = 7 if n <= 4096 else 3
    x = (torch.randn(rows, n, generator=gen) * torch.logspace(-2, 2, rows).unsqueeze(1)).to(dtype)
    got = ops.hadamard_transform(x.cuda())
    assert got.is_cuda and got.dtype == dtype and got.shape == x.shape
    ref = _fast_ref64(x.float())  # the dense hadamard_ref needs minutes and 8 GB at n = 32768
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    err = (got.cpu().double() - ref.double()).abs()
    assert bool((err <= ref.double().abs() * ulp + _budget(x.float()) * 4).all())


@pytest.mark.gpu
def test_cuda_in_place_and_many_rows(gen):
    x = torch.randn(5000, 96, generator=gen).cuda()
    y = ops.hadamard_transform(x)
    torch.testing.assert_close(y.cpu(), ops.hadamard_transform(x.cpu()), rtol=0, atol=2e-6)
    with pytest.raises(ValueError, match="x"):
        ops.hadamard_transform(torch.randn(3, 36, device="cuda"))


# --- CUDA: every supported length, partial CTAs, misaligned input (issue #4 kernel) -----------------------------------


def _fast_ref64(x: torch.Tensor) -> torch.Tensor:
    """x (H_m (x) H_p) / sqrt(n) in float64 through the Kronecker structure (butterflies, then the m x m mix): the
    same matrix as hadamard_ref without materialising H_n, so every length up to 32768 can be checked."""
    n = x.shape[-1]
    m, p = decompose(n)
    y = x.detach().cpu().double().reshape(-1, m, p)
    h = 1
    while h < p:
        y = y.reshape(-1, m, p // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    y = y.reshape(-1, m, p)
    if m > 1:
        y = torch.einsum("ac,rab->rcb", special_hadamard(m), y)
    return y.reshape(x.shape) / math.sqrt(n)


def _all_lengths() -> list[int]:
    out = []
    for m in (1, 12, 20, 28, 40):
        p = 1
        while m * p <= 32768:
            out.append(m * p)
            p *= 2
    return out


def _rows_per_cta(n: int) -> int:
    """Rows the CUDA kernel batches into one CTA for p >= 32 (hadamard.cu launch_reg): m = 1 >= 256 items of 32
    elements; m > 1 >= 512 columns (2^k each)."""
    m, p = decompose(n)
    if m > 1:
        return max(1, 512 // p)
    per_row = n // 32
    return 1 if per_row >= 256 else -(-256 // per_row)


def test_rows_per_cta_mirror():
    assert [_rows_per_cta(n) for n in (128, 768, 7168, 14336, 40 * 64, 16384)] == [64, 8, 2, 1, 4, 1]


@pytest.mark.parametrize("n", [48, 640, 2560, 1792, 7168])
def test_fast_reference_matches_matrix_reference(n, gen):
    x = torch.randn(3, n, generator=gen)
    torch.testing.assert_close(_fast_ref64(x), hadamard_ref(x.double()), rtol=0, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("n", _all_lengths())
def test_cuda_every_length_fp32(n, gen):
    """Every supported n = m 2^k; rows = 2 CTAs' worth + 1 (a partial last CTA), capped for the long rows."""
    rpc = _rows_per_cta(n) if n >= 32 else 1
    rows = min(2 * rpc + 1, max(3, (1 << 20) // n))
    x = torch.randn(rows, n, generator=gen) * torch.logspace(-2, 2, rows).unsqueeze(1)
    got = ops.hadamard_transform(x.cuda()).cpu()
    assert bool(((got.double() - _fast_ref64(x)).abs() <= _budget(x)).all())


@pytest.mark.gpu
@pytest.mark.parametrize("n", [32, 64, 128, 256, 512, 768, 1280, 1792, 4096, 7168, 14336, 16384, 32768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_every_kernel(n, dtype, gen):
    """Every kernel path in 2-byte dtypes: 64..512 take the staged, coalesced 16-byte store of the last stage."""
    rows = min(2 * _rows_per_cta(n) + 1, max(3, (1 << 19) // n))
    x = torch.randn(rows, n, generator=gen).to(dtype)
    got = ops.hadamard_transform(x.cuda()).cpu()
    assert got.dtype == dtype
    ref = _fast_ref64(x.float())
    # computed in fp32, rounded once: within one rounding of the output dtype (plus fp32 noise)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    assert bool(((got.double() - ref).abs() <= ulp * ref.abs() + _budget(x.float()) + 2.0**-24).all())


@pytest.mark.gpu
@pytest.mark.parametrize("n", [128, 512, 7168])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_misaligned_input(n, dtype, gen):
    """A contiguous input one element past a 16-byte boundary takes the element-wise loads."""
    x = torch.randn(5, n, generator=gen).to(dtype)
    xm = misaligned(x)  # asserts the copy is contiguous and not 16-byte aligned
    got = ops.hadamard_transform(xm).cpu()
    torch.testing.assert_close(got, ops.hadamard_transform(x.cuda()).cpu(), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [128, 768, 2048, 4096, 7168, 14336, 16384, 32768])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_low_precision_equals_rounded_fp32(n, dtype, gen):
    """The benchmark lengths with ~4M elements (many CTAs, several waves, a partial last CTA where rows are
    batched): bf16 / fp16 output bit-equal to the fp32 kernel's result (same arithmetic in the same order) rounded
    once to the dtype, and the rows at both ends within one rounding of the float64 reference."""
    rows = (1 << 22) // n + 3
    x = torch.randn(rows, n, generator=gen).to(dtype).cuda()
    got = ops.hadamard_transform(x)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got, ops.hadamard_transform(x.float()).to(dtype))
    ends = torch.cat((x[:2], x[-2:])).cpu().float()
    ref = _fast_ref64(ends)
    ulp = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    err = (torch.cat((got[:2], got[-2:])).cpu().double() - ref).abs()
    assert bool((err <= ulp * ref.abs() + _budget(ends) + 2.0**-24).all())


def test_shared_memory_layout_model_has_no_conflicts():
    """scripts/hadamard_smem_model.py: the padded shared-memory indexing of hadamard.cu is exact and bank-conflict
    free for every (m, K) and row batching (a model of the kernel's index arithmetic, CPU only). The model covers
    the padded layout only: 28 x 1024, which the kernel runs with the XOR swizzle (padded<M, K>()), is checked in
    its padded form, and the XOR layout is not modelled. Run in-process so that a failure shows the script's list
    of problems."""
    import runpy
    from pathlib import Path
    script = Path(__file__).resolve().parents[2] / "scripts" / "hadamard_smem_model.py"
    assert runpy.run_path(str(script))["main"]() == 0
