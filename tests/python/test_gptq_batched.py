"""Batched GPTQ (moequant.ops.gptq_quantize_batched): the CUDA kernel against the CPU solver, expert by expert.

The CUDA solver factorises J P^T H P J once in fp32 and runs the GPTQ recursion in its Cholesky form (see
kernels/src/gptq_batched.cu); the CPU solver inverts in double. Both are GPTQ on the same inputs with different
rounding, so the policy is (issue: GPU fast path): proxy loss within LOSS_RTOL of the CPU's, at least
CODES_MATCH of the codes identical, static (act-order) group parameters bit-identical, and the returned loss equal
to tr((W - Q) H (W - Q)^T) recomputed in float64 from the returned Q.
"""

from __future__ import annotations

import pytest
import torch

from moequant import ops

LOSS_RTOL = 0.01  # the bound; typical runs agree to ~1e-4
CODES_MATCH = 0.99  # fraction of identical codes (a rounding flip propagates along its row)
LOSS_SELF_RTOL = 1e-3  # returned loss (fp32 SYRK of D^T D, then a double sum that cancels) vs float64


def problem(E, rows, cols, gen, make_hessian, tokens=None):
    w = torch.randn(E, rows, cols, generator=gen) * 0.05
    h = torch.stack([make_hessian(cols, tokens or 2 * cols, gen, torch.float64) for _ in range(E)])
    h = (h / (tokens or 2 * cols)).float()
    return w, h


def loss64(w, q, h):
    d = (w - q).double()
    hs = torch.tril(h.double()) + torch.tril(h.double(), -1).t()
    return float(torch.einsum("rc,cd,rd->", d, hs, d))


def compare(w, h, gpu, **kw):
    for e in range(w.shape[0]):
        cpu = ops.gptq_quantize(w[e], h[e], **kw)
        g = gpu[e]
        assert g.codes.is_cuda
        rel = abs(g.loss - cpu.loss) / max(cpu.loss, 1e-30)
        assert rel <= LOSS_RTOL, f"expert {e}: loss gpu {g.loss} vs cpu {cpu.loss} (rel {rel:.2e})"
        match = float((g.codes.cpu() == cpu.codes).float().mean())
        assert match >= CODES_MATCH, f"expert {e}: only {match:.4f} of the codes match"
        assert g.escalations == cpu.escalations
        if kw.get("act_order"):
            assert torch.equal(g.scale.cpu(), cpu.scale) and torch.equal(g.zero_point.cpu(), cpu.zero_point)
        deq = (g.codes.float() - g.zero_point.float().repeat_interleave(g.group_size, 1)) * \
            g.scale.repeat_interleave(g.group_size, 1)
        assert torch.equal(deq, g.dequantized)
        ref = loss64(w[e], g.dequantized.cpu(), h[e])
        assert abs(g.loss - ref) <= LOSS_SELF_RTOL * max(ref, 1e-30) + 1e-30


CASES = [
    # E, rows, cols, kwargs
    (3, 64, 256, dict(bits=4, group_size=128, act_order=False, block_size=128)),
    (3, 64, 256, dict(bits=4, group_size=128, act_order=True, block_size=128)),
    (2, 48, 192, dict(bits=4, group_size=64, act_order=False, block_size=64)),
    (2, 40, 200, dict(bits=4, group_size=40, act_order=False, block_size=64)),  # groups straddle blocks
    (2, 33, 160, dict(bits=3, group_size=32, act_order=True, block_size=48, symmetric=True)),
    (2, 32, 128, dict(bits=4, group_size=-1, act_order=False, block_size=32)),  # per-channel
    (2, 70, 256, dict(bits=8, group_size=128, act_order=False, block_size=128, scale_dtype=torch.bfloat16)),
    (2, 64, 384, dict(bits=2, group_size=128, act_order=True, block_size=100)),
    (2, 16, 256, dict(bits=4, group_size=128, act_order=True, scale_search="mse", mse_grid=20)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("E,rows,cols,kw", CASES)
def test_matches_cpu_solver(E, rows, cols, kw, gen, make_hessian):
    w, h = problem(E, rows, cols, gen, make_hessian)
    gpu = ops.gptq_quantize_batched(w.cuda(), h.cuda(), **kw)
    assert len(gpu) == E
    compare(w, h, gpu, **kw)


@pytest.mark.gpu
def test_dead_columns_and_zero_token_expert(gen, make_hessian):
    w, h = problem(3, 32, 128, gen, make_hessian)
    h[1] = 0.0  # an expert that saw no tokens: every column dead
    h[2][:, 5] = 0.0
    h[2][5, :] = 0.0  # one dead column
    gpu = ops.gptq_quantize_batched(w.cuda(), h.cuda(), act_order=True)
    for g in gpu:
        assert bool(torch.isfinite(g.dequantized).all()) and g.loss == g.loss
    assert bool((gpu[1].dequantized == 0).all()) and gpu[1].loss == 0.0
    assert bool((gpu[2].dequantized[:, 5] == 0).all())
    compare(w, h, gpu, act_order=True)


@pytest.mark.gpu
def test_escalation_only_for_the_indefinite_expert(gen, make_hessian):
    w, h = problem(3, 32, 96, gen, make_hessian)
    # expert 1: an off-diagonal pair larger than its diagonals allow makes a negative 2x2 principal minor,
    # so H is indefinite while every diagonal entry stays positive
    a, b = 3, 7
    h[1, a, b] = h[1, b, a] = 1.5 * float((h[1, a, a] * h[1, b, b]).sqrt())
    assert float(torch.linalg.eigvalsh(h[1].double())[0]) < 0 and bool((h[1].diagonal() > 0).all())
    gpu = ops.gptq_quantize_batched(w.cuda(), h.cuda(), group_size=32)
    esc = [g.escalations for g in gpu]
    assert esc[0] == 0 and esc[2] == 0 and esc[1] >= 1, esc
    compare(w, h, gpu, group_size=32)


@pytest.mark.gpu
def test_hopeless_expert_is_a_numerical_error():
    h = torch.eye(32).repeat(2, 1, 1)
    h[1, 0, 1] = h[1, 1, 0] = 1e9  # indefinite beyond any damping that 8 escalations reach
    w = torch.randn(2, 8, 32)
    with pytest.raises(RuntimeError, match="expert 1"):
        ops.gptq_quantize_batched(w.cuda(), h.cuda(), group_size=32)


@pytest.mark.gpu
def test_h_untouched_and_loss_optional(gen, make_hessian):
    w, h = problem(2, 16, 128, gen, make_hessian)
    hc = h.cuda()
    before = hc.clone()
    out = ops.gptq_quantize_batched(w.cuda(), hc, compute_loss=False)
    assert torch.equal(hc, before) and out[0].loss is None
    out2 = ops.gptq_quantize_batched(w.cuda(), hc.clone(), overwrite_h=True)
    assert torch.equal(out[0].codes, out2[0].codes)


@pytest.mark.gpu
def test_errors(gen, make_hessian):
    w, h = problem(2, 16, 128, gen, make_hessian)
    w, h = w.cuda(), h.cuda()
    bad = w.clone()
    bad[1, 3, 7] = float("nan")
    with pytest.raises(ValueError, match=r"w: expected finite values, got NaN at expert 1 \(3, 7\)"):
        ops.gptq_quantize_batched(bad, h)
    hb = h.clone()
    hb[0, 4, 4] = -1.0
    with pytest.raises(ValueError, match="h: expected a non-negative diagonal"):
        ops.gptq_quantize_batched(w, hb)
    with pytest.raises(ValueError, match="block_size"):
        ops.gptq_quantize_batched(w, h, block_size=256)
    with pytest.raises(ValueError, match="mse"):
        ops.gptq_quantize_batched(w, h, scale_search="mse")
    with pytest.raises(ValueError, match="h: expected a float tensor of shape"):
        ops.gptq_quantize_batched(w, h[:, :64, :64])
    with pytest.raises(ValueError, match="h: expected float32"):
        ops.gptq_quantize_batched(w, h.double())
    with pytest.raises(ValueError, match="group_size"):
        ops.gptq_quantize_batched(w, h, group_size=100)


def test_cpu_tensors_loop_over_the_cpu_solver(gen, make_hessian):
    w, h = problem(2, 8, 64, gen, make_hessian)
    out = ops.gptq_quantize_batched(w, h, group_size=32)
    for e in range(2):
        ref = ops.gptq_quantize(w[e], h[e], group_size=32)
        assert torch.equal(out[e].codes, ref.codes) and out[e].loss == ref.loss
    with pytest.raises(ValueError, match="w: expected a 3-D"):
        ops.gptq_quantize_batched(w[0], h[0])


@pytest.mark.gpu
def test_float16_scale_overflow_raises_once_for_the_batch():
    # Expert 1, row 2, group 1 spans 3e6 at 4 bits: its float16 scale would be inf.
    w = torch.zeros(2, 3, 64, device="cuda")
    w[1, 2, 40] = 3e6
    h = torch.eye(64, device="cuda").expand(2, 64, 64).contiguous()
    with pytest.raises(ValueError, match=r"float16 cannot hold the scale of group \(1, 2, 1\).*bfloat16"):
        ops.gptq_quantize_batched(w, h, bits=4, group_size=32, scale_dtype=torch.float16)
