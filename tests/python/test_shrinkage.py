"""Shrinkage Hessians for rare experts (FallbackConfig.policy="shrink"): estimator, capture, pipeline.

H_e' = (n_e H_e + k H_all) / (n_e + k). The synthetic problem: an expert sees n_e = 8 tokens of dimension 32
(rank-deficient H_e) drawn from a known covariance S_e; the layer's all-token Hessian H_all mixes S_e with
another expert population. The shrunk Hessian gives GPTQ a lower output error on held-out x ~ S_e than H_e
alone, the identity and RTN.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from moequant import ops, pipeline
from moequant.calibration.capture import LayerCapture
from moequant.models import detect_family, split_expert
from moequant.recipe import CalibrationConfig, FallbackConfig, QuantScheme, Recipe
from moequant.pipeline.jobs import ExpertHessians
from testdata import tiny_qwen3_checkpoint

REPO = Path(__file__).resolve().parents[2]
CALIB = REPO / "examples" / "data" / "wikitext2_calib.txt"


def _cov(d, g, decay=0.7):
    b = torch.randn(d, d, generator=g, dtype=torch.float64) / (1 + torch.arange(d, dtype=torch.float64)) ** decay
    return b @ b.T


def _sample(s, n, g):
    return torch.randn(n, s.shape[0], generator=g, dtype=torch.float64) @ torch.linalg.cholesky(s).T


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_shrunk_hessian_beats_own_identity_and_rtn_on_held_out_x(seed):
    g = torch.Generator().manual_seed(seed)
    d, n_e, k = 32, 8, 64.0
    s_e, s_o = _cov(d, g), _cov(d, g)
    x_all = torch.cat([_sample(s_e, 2000, g), _sample(s_o, 2000, g)])  # the layer's tokens: two populations
    h_all = x_all.T @ x_all / x_all.shape[0]
    x_e = _sample(s_e, n_e, g)
    # through the estimator the pipeline uses: an accumulator holding the expert's 8 rows
    acc = ops.HessianAccumulator(2, d, dtype=torch.float64)
    acc.add(x_e.float(), torch.zeros(n_e, dtype=torch.int32))
    est = ExpertHessians(acc, min_tokens=16, policy="shrink", shrinkage_tokens=k, prior=lambda e: h_all)
    h_s, fallback, rtn = est.get(0)
    h_e = acc.hessian(0)
    assert fallback == "shrink" and not rtn
    assert torch.linalg.matrix_rank(h_e) == n_e
    torch.testing.assert_close(h_s, (n_e * h_e + k * h_all) / (n_e + k))
    w = torch.randn(32, d, generator=g, dtype=torch.float64).float()
    x_test = _sample(s_e, 4000, g)

    def err(qt):
        return float((((w - qt.dequantized).double() @ x_test.T) ** 2).mean())

    kw = dict(bits=3, group_size=-1, symmetric=False)
    e = {"own": err(ops.gptq_quantize(w, h_e, **kw)), "identity": err(ops.gptq_quantize(w, torch.eye(d), **kw)),
         "rtn": err(ops.quantize_rtn(w, **kw)), "shrink": err(ops.gptq_quantize(w, h_s, **kw)),
         "oracle": err(ops.gptq_quantize(w, s_e, **kw))}
    print(f"seed {seed}: held-out output error " + ", ".join(f"{a} {b:.3f}" for a, b in e.items()))
    assert e["shrink"] < 0.8 * min(e["own"], e["identity"], e["rtn"])
    assert e["oracle"] <= e["shrink"] * 1.05


def test_shrink_estimator_limits():
    g = torch.Generator().manual_seed(0)
    d = 8
    acc = ops.HessianAccumulator(3, d, dtype=torch.float64)
    big = torch.randn(5000, d, generator=g)
    acc.add(big, torch.zeros(5000, dtype=torch.int32))
    acc.add(torch.randn(2, d, generator=g), torch.ones(2, dtype=torch.int32))
    target = torch.eye(d, dtype=torch.float64) * 3.0
    est = ExpertHessians(acc, min_tokens=8, policy="shrink", shrinkage_tokens=64, prior=lambda e: target)
    h0, fb0, _ = est.get(0)  # well calibrated: its own Hessian dominates, no fallback reported
    assert fb0 is None
    assert (h0 - acc.hessian(0)).norm() < 0.05 * acc.hessian(0).norm()
    h2, fb2, rtn = est.get(2)  # no token at all: exactly the target
    assert fb2 == "shrink" and not rtn
    torch.testing.assert_close(h2, target)
    # without a prior the target is the pooled Hessian of all routed rows
    est2 = ExpertHessians(acc, min_tokens=8, policy="shrink", shrinkage_tokens=64)
    torch.testing.assert_close(est2.get(2)[0], acc.hessians.sum(0) / acc.mass.sum())
    # routing-weighted: n_e is the routing mass
    accw = ops.HessianAccumulator(1, d, dtype=torch.float64)
    x = torch.randn(4, d, generator=g)
    accw.add(x, torch.zeros(4, dtype=torch.int32), torch.full((4,), 0.25))
    hw = ExpertHessians(accw, 8, "shrink", 1.0, prior=lambda e: target).get(0)[0]
    torch.testing.assert_close(hw, (accw.hessians[0] + target) / (1.0 + 1.0))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("shrink") / "model", num_experts=8,
                                 moe_intermediate_size=32, dtype=torch.float32)


def test_capture_all_token_hessians(tiny):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    fam = detect_family(model.config)
    layer = fam.layers(model)[0]
    cap = LayerCapture(layer, fam, all_tokens=True, all_token_down=True)
    x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    with cap.attach(), torch.no_grad():
        layer.mlp(x)
    ec = cap.experts
    flat = x.reshape(-1, 64)
    assert int(ec.all_input.counts[0]) == 10
    torch.testing.assert_close(ec.all_input.hessians[0], flat.T @ flat, rtol=1e-5, atol=1e-5)
    assert ec.down_all.counts.tolist() == [10] * 8  # every token through every expert
    t = split_expert(ec.experts, fam, 3)
    h = fam.glu(ec.experts, flat @ t.gate.t(), flat @ t.up.t())
    torch.testing.assert_close(ec.down_all.hessians[3], h.T @ h, rtol=1e-5, atol=1e-6)
    assert int(ec.gate_up.counts.sum()) == 20  # the routed accumulators are unchanged (top-2)


@pytest.mark.parametrize("all_experts", [False, True])
def test_pipeline_shrink_policy(tiny, all_experts):
    recipe = Recipe(scheme=QuantScheme(group_size=32, symmetric=True), routing_weighted=True,
                    fallback=FallbackConfig(policy="shrink", min_tokens=10_000, shrinkage_tokens=32.0,
                                            calibrate_all_experts=all_experts),
                    calibration=CalibrationConfig(text_files=[str(CALIB)], num_samples=2, seq_len=32, batch_size=2))
    rep = pipeline.quantize(tiny, recipe, progress=False)
    experts = [m for layer in rep.layers for m in layer.modules if ".experts." in m.name]
    assert experts and all(m.fallback == "shrink" and m.method == "gptq" for m in experts)
    assert Recipe.from_dict(recipe.to_dict()).fallback.calibrate_all_experts is all_experts


def test_fallback_config_validation():
    with pytest.raises(ValueError, match="shrinkage_tokens"):
        FallbackConfig(policy="shrink", shrinkage_tokens=0)
    with pytest.raises(ValueError, match="calibrate_all_experts"):
        FallbackConfig(calibrate_all_experts="yes")
