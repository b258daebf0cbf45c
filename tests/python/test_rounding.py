"""Greedy rounding correction (moequant.ops.refine_rounding, C++ moequant/rounding.h) and its recipe wiring."""
from __future__ import annotations

import pytest
import torch

from moequant import ops
from moequant.recipe import QuantScheme
from moequant.pipeline.jobs import solve_matrix


def _problem(rows=32, cols=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4 * cols, cols // 4, generator=g, dtype=torch.float64)
    x = z @ torch.randn(cols // 4, cols, generator=g, dtype=torch.float64) + 0.2 * torch.randn(
        4 * cols, cols, generator=g, dtype=torch.float64)
    h = x.T @ x / x.shape[0]
    w = torch.randn(rows, cols, generator=g)
    return w, h


def _loss(w, deq, h):
    d = (w - deq).double()
    return float(torch.einsum("ri,ij,rj->", d, h.double(), d))


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("solver", ["rtn", "gptq"])
def test_refine_lowers_the_loss_keeps_range_and_params(solver, sym):
    w, h = _problem()
    kw = dict(bits=4, group_size=32, symmetric=sym)
    qt = ops.quantize_rtn(w, **kw) if solver == "rtn" else ops.gptq_quantize(w, h, **kw)
    before = _loss(w, qt.dequantized, h)
    out = ops.refine_rounding(qt, w, h, passes=2, outlier_quantile=0.99)
    after = _loss(w, out.dequantized, h)
    r = out.info["rounding"]
    print(f"{solver} {'sym' if sym else 'asym'}: proxy loss {before:.4g} -> {after:.4g} "
          f"({100 * (1 - after / before):.1f}% lower, {r['flips']} flips)")
    assert after < 0.9 * before
    assert r["loss_before"] == pytest.approx(before, rel=1e-6) and out.loss == pytest.approx(after, rel=1e-6)
    assert int(out.codes.min()) >= -8 and int(out.codes.max()) <= 7
    assert torch.equal(out.scale, qt.scale) and torch.equal(out.zero_point, qt.zero_point)
    deq = ops.dequantize(out.codes, out.scale, None if sym else out.zero_point, 32, 4)
    assert torch.equal(deq, out.dequantized)
    changed = int((out.codes != qt.codes).sum())
    assert changed == r["flips"] and changed > 0


def test_refine_never_increases_is_deterministic_and_passes_zero_is_identity():
    for seed in range(3):
        w, h = _problem(rows=8, cols=64, seed=seed)
        h = h + torch.randn(64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) * 1e-3
        h = (h + h.T) / 2
        qt = ops.quantize_rtn(w, bits=3, group_size=-1)
        a = ops.refine_rounding(qt, w, h, passes=1)
        b = ops.refine_rounding(qt, w, h, passes=1)
        assert torch.equal(a.codes, b.codes) and torch.equal(a.dequantized, b.dequantized)
        assert a.info["rounding"]["loss_after"] <= a.info["rounding"]["loss_before"]
        # per row too
        for r in range(8):
            assert _loss(w[r:r + 1], a.dequantized[r:r + 1], h) <= _loss(w[r:r + 1], qt.dequantized[r:r + 1], h) + 1e-9
        z = ops.refine_rounding(qt, w, h, passes=0)
        assert torch.equal(z.codes, qt.codes)


def test_outliers_are_frozen():
    w, h = _problem(rows=4, cols=64)
    qt = ops.quantize_rtn(w, bits=4, group_size=64)
    out = ops.refine_rounding(qt, w, h.float(), passes=3, outlier_quantile=0.9)  # top floor(6.4) = 6 per row
    assert out.info["rounding"]["excluded"] == 4 * 6
    top = w.abs().argsort(dim=1, descending=True, stable=True)[:, :6]
    assert torch.equal(out.codes.gather(1, top), qt.codes.gather(1, top))


def test_refine_validation():
    w, h = _problem(rows=2, cols=32)
    qt = ops.quantize_rtn(w, bits=4, group_size=16)
    with pytest.raises(ValueError, match="passes"):
        ops.refine_rounding(qt, w, h, passes=-1)
    with pytest.raises(ValueError, match="outlier_quantile"):
        ops.refine_rounding(qt, w, h, outlier_quantile=0)
    with pytest.raises(ValueError, match="h"):
        ops.refine_rounding(qt, w, h[:16, :16])
    with pytest.raises(ValueError, match="w"):
        ops.refine_rounding(qt, w[:, :16], h)


def test_scheme_field_and_solve_wiring():
    assert QuantScheme().rounding_passes == 0
    with pytest.raises(ValueError, match="rounding_passes"):
        QuantScheme(rounding_passes=-1)
    with pytest.raises(ValueError, match="rounding_outlier_quantile"):
        QuantScheme(rounding_outlier_quantile=1.5)
    s = QuantScheme(group_size=32, rounding_passes=1)
    assert "round1" in s.describe()
    w, h = _problem()
    plain = solve_matrix(w, h, QuantScheme(group_size=32), torch.float32)
    refined = solve_matrix(w, h, s, torch.float32)
    assert refined.loss < plain.loss and "rounding" in refined.info
    rtn = solve_matrix(w, None, s, torch.float32)  # no Hessian (forced RTN): nothing to refine against
    assert "rounding" not in rtn.info
    per_channel = solve_matrix(w, h, QuantScheme(group_size=-1, rounding_passes=1), torch.float32)
    assert per_channel.group_size == -1 and per_channel.info["rounding"]["flips"] > 0
