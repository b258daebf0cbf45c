"""AWQ (activation-aware scaling and clipping): scale math, exact folding, routing unchanged, pipeline run."""
from __future__ import annotations

import torch

from moequant.pipeline.report import LayerRecord
from moequant.pipeline.workdir import WorkDir


def test_workdir_saves_and_yields_high_precision_tensors(tmp_path):
    """WorkDir.save_layer(tensors=...) round-trips any on-disk name -> tensor into Replacements.tensors."""
    work = WorkDir(tmp_path / "w", {"v": 1}, resume=False)
    t = {"model.layers.0.post_attention_layernorm.weight": torch.randn(8, dtype=torch.bfloat16),
         "model.layers.0.mlp.gate.weight": torch.randn(4, 8)}
    work.save_layer(0, {}, LayerRecord(index=0, prefix="p", seconds=0.0, moe=False), [torch.zeros(1)], tensors=t)
    work.save_layer(1, {}, LayerRecord(index=1, prefix="p", seconds=0.0, moe=False), [torch.zeros(1)])
    chunks = list(work.iter_replacements(2))
    assert set(chunks[0].tensors) == set(t)
    for k, v in t.items():
        assert chunks[0].tensors[k].dtype == v.dtype and torch.equal(chunks[0].tensors[k], v)
    assert dict(chunks[1].tensors) == {} and dict(chunks[0].quantized) == {}


# ------------------------------------------------------------------------------------------------ math
import dataclasses  # noqa: E402
import math  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

import pytest  # noqa: E402
import transformers  # noqa: E402

from moequant import ops  # noqa: E402
from moequant.methods.awq import search as awq  # noqa: E402
from moequant.methods.awq import apply_awq  # noqa: E402
from moequant.models import detect_family, split_expert  # noqa: E402
from moequant.recipe import AWQConfig, CalibrationConfig, QuantScheme, Recipe  # noqa: E402
from moequant.ref import fake_quantize_ref, search_clip_ref  # noqa: E402


@pytest.mark.parametrize("shape,gs", [((5, 64), 16), ((3, 7, 48), 48), ((4, 96), -1), ((1, 24), 8)])
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("sd", [torch.float32, torch.bfloat16])
def test_fake_quantize_matches_core_and_ref(gen, shape, gs, sym, bits, sd):
    w = torch.randn(*shape, generator=gen) * torch.exp(torch.randn(shape[-1], generator=gen))
    fq = awq.fake_quantize(w, bits, gs, sym, sd)
    assert torch.equal(fq, fake_quantize_ref(w, bits, gs, sym, sd))
    flat = w.reshape(-1, shape[-1])
    core = ops.quantize_rtn(flat, bits, gs, sym, scale_dtype=sd).dequantized
    assert torch.equal(fq.reshape(-1, shape[-1]), core)


def test_awq_scales_properties():
    x = torch.tensor([0.1, 1.0, 10.0, 3.0])
    w = torch.tensor([0.5, 0.2, 0.9, 0.4])
    for duo in (True, False):
        for r in (0.0, 0.3, 0.95):
            s = awq.awq_scales(x, w, r, duo)
            assert math.isclose(float(s.max() * s.min()), 1.0, rel_tol=1e-5)
    assert torch.equal(awq.awq_scales(x, None, 0.0, duo=False), torch.ones(4))
    s = awq.awq_scales(x, None, 0.5, duo=False)
    assert s.argmax() == 2 and s.argmin() == 0  # larger activations get larger scales
    p = awq.awq_scales(x, w, 0.5, True, pow2=True)
    assert torch.equal(torch.exp2(torch.log2(p).round()), p)
    assert torch.isfinite(awq.awq_scales(torch.tensor([0.0, float("inf")]), None, 0.5, duo=False)).all()


def _outlier_problem(gen, n=512, d=128, out=64):
    x = torch.randn(n, d, generator=gen)
    x[:, :4] *= 30.0  # a few channels with large activations (AWQ's salient channels)
    w = torch.randn(out, d, generator=gen) * 0.05
    return x, w


def test_scale_search_lowers_quantized_output_error_on_salient_channels(gen):
    x, w = _outlier_problem(gen)
    ref = x @ w.t()

    def loss(s):
        q = awq.fake_quantize(w * s, 3, 32, False) / s
        return float((x @ q.t() - ref).pow(2).mean())

    res = awq.search_scale(awq.activation_absmean(x), awq.weight_absmean([w], [32]), loss, grid=20)
    rtn = loss(torch.ones(128))
    assert res.identity_loss == pytest.approx(rtn)
    assert res.ratio is not None and res.loss < 0.7 * rtn
    assert res.scales[:4].min() > res.scales[4:].max()  # the salient channels are scaled up
    assert len(res.losses) == 20


def test_activation_salience_abs_and_l2(gen):
    x = torch.randn(3, 50, 7, generator=gen)
    x[0, 0, 2] = 40.0  # one rare large activation: L2 weighs it more than E|x|
    flat = x.reshape(-1, 7).double()
    torch.testing.assert_close(awq.activation_salience(x, "abs"), flat.abs().mean(0).float())
    torch.testing.assert_close(awq.activation_salience(x, "l2"), flat.pow(2).mean(0).sqrt().float())
    assert torch.equal(awq.activation_salience(x), awq.activation_absmean(x))  # the default is AutoAWQ's
    l2, ab = awq.activation_salience(x, "l2"), awq.activation_salience(x, "abs")
    assert (l2 >= ab).all() and l2[2] / ab[2] > 2 * (l2[3] / ab[3])
    const = torch.tensor([[2.0, -3.0], [-2.0, 3.0]])  # constant magnitude: both statistics agree
    assert torch.equal(awq.activation_salience(const, "l2"), awq.activation_salience(const, "abs"))
    with pytest.raises(ValueError, match="salience: expected one of"):
        awq.activation_salience(x, "max")


@pytest.mark.parametrize("salience", ["abs", "l2"])
def test_layer_search_uses_the_configured_salience(salience, monkeypatch):
    """Every scale search of a layer receives the recipe's statistic of its input (checked on the attention's
    input norm group, whose input the test recomputes)."""
    layer, fam, hidden, kwargs = _tiny_layer("qwen3_moe")
    xs = []
    h = layer.input_layernorm.register_forward_hook(lambda m, a, o: xs.append(o.detach()))
    _run(layer, hidden, kwargs)
    h.remove()
    seen = []
    real = awq.search_scale

    def spy(x_mean, *args, **kw):
        seen.append(x_mean.clone())
        return real(x_mean, *args, **kw)

    monkeypatch.setattr(awq, "search_scale", spy)
    apply_awq(layer, fam, _awq_recipe(clip_search=False, salience=salience), "model.layers.0", hidden, kwargs, 0,
              "cpu", torch.float64)
    want = awq.activation_salience(xs[0], salience)
    other = awq.activation_salience(xs[0], "l2" if salience == "abs" else "abs")
    first = seen[0]  # the input_layernorm group (q/k/v) is searched first
    torch.testing.assert_close(first, want)
    assert not torch.allclose(first, other)


def test_scale_search_keeps_identity_when_nothing_helps():
    res = awq.search_scale(torch.ones(8), torch.ones(8), lambda s: float((s - 1).abs().sum()), grid=5)
    assert res.ratio is None and torch.equal(res.scales, torch.ones(8))


def _group_err64(w, x, mv, sym, g=16):
    q = awq.fake_quantize(awq.apply_clip(w, mv), 3, g, sym)
    d = (q - w).double().reshape(w.shape[0], -1, g)
    return torch.einsum("ngk,ogk->nog", x.double().reshape(x.shape[0], -1, g), d).pow(2).mean(0)


def test_search_clip_matches_ref_and_lowers_error(gen):
    x, w = _outlier_problem(gen, n=64, d=32, out=6)
    w[0, 3] = 2.0  # an outlier weight the clip should cut
    for sym in (False, True):
        mv = awq.search_clip(w, x, 3, 16, sym, grid=20, max_shrink=0.5, row_chunk=4)
        mv_ref = search_clip_ref(w, x, 3, 16, sym, grid=20, max_shrink=0.5)
        # same threshold, or (float32 vs float64 loss near a tie) one whose float64 error is as small
        e_fast, e_ref = _group_err64(w, x, mv, sym), _group_err64(w, x, mv_ref, sym)
        assert ((mv - mv_ref).abs() < 1e-6).float().mean() > 0.9
        assert (e_fast <= e_ref * (1 + 1e-4) + 1e-12).all()
        clipped = awq.apply_clip(w, mv)

        def err(wc):
            q = awq.fake_quantize(wc, 3, 16, sym)
            return float((x @ (q - w).t()).pow(2).mean())

        assert err(clipped) <= err(w)
        assert (mv <= w.abs().reshape(6, 2, 16).amax(-1) + 1e-7).all()  # for both sym values


def test_math_error_paths():
    with pytest.raises(ValueError, match="grid"):
        awq.search_scale(torch.ones(2), None, lambda s: 0.0, grid=0)
    with pytest.raises(ValueError, match="w_mean"):
        awq.awq_scales(torch.ones(2), None, 0.5, duo=True)
    with pytest.raises(ValueError, match="weights"):
        awq.weight_absmean([], [])
    with pytest.raises(ValueError, match="bits"):
        awq.fake_quantize(torch.ones(2, 4), 9, 4, False)
    with pytest.raises(ValueError, match="group_size"):
        awq.fake_quantize(torch.ones(2, 6), 4, 4, False)
    with pytest.raises(ValueError, match="max_shrink"):
        awq.search_clip(torch.ones(2, 4), torch.ones(3, 4), 4, 4, False, max_shrink=1.0)
    with pytest.raises(ValueError, match="grid"):
        awq.search_clip(torch.ones(2, 4), torch.ones(3, 4), 4, 4, False, grid=0)
    with pytest.raises(ValueError, match="x: expected"):
        awq.search_clip(torch.ones(2, 4), torch.ones(3, 5), 4, 4, False)


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("field,value", [
    ("enabled", 1), ("grid", 0), ("grid", 2.5), ("duo_scaling", "yes"), ("clip_search", None), ("clip_grid", 0),
    ("clip_max_shrink", 0.0), ("clip_max_shrink", 1.0), ("clip_max_shrink", True), ("max_tokens", 0),
    ("clip_tokens", -1), ("min_tokens", 0), ("exact_routing", 0), ("salience", "l1"), ("salience", None)])
def test_awq_config_rejects_bad_values(field, value):
    with pytest.raises(ValueError, match=f"awq.{field}: expected"):
        AWQConfig(**{field: value})
    with pytest.raises(ValueError, match=f"awq.{field}"):
        Recipe.from_dict({"awq": {field: value}})


def test_awq_config_round_trip_and_unknown_key():
    r = Recipe(awq=AWQConfig(enabled=True, grid=10, clip_search=False, max_tokens=1000, salience="l2"))
    assert Recipe.from_dict(r.to_dict()) == r and r.to_dict()["awq"]["grid"] == 10
    assert r.to_dict()["awq"]["salience"] == "l2" and Recipe().awq.salience == "abs"
    assert Recipe().awq.enabled is False
    with pytest.raises(ValueError, match="awq: unknown key"):
        Recipe.from_dict({"awq": {"gird": 3}})


# ------------------------------------------------------------------------------------------------ layer
def _tiny_config(kind: str):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64)
    if kind == "qwen3_moe":
        return transformers.Qwen3MoeConfig(moe_intermediate_size=16, num_experts=4, head_dim=8, **common)
    if kind == "qwen2_moe":
        return transformers.Qwen2MoeConfig(moe_intermediate_size=16, num_experts=4,
                                           shared_expert_intermediate_size=32, **common)
    if kind == "mixtral":
        return transformers.MixtralConfig(num_local_experts=4, **common)
    if kind == "olmoe":
        return transformers.OlmoeConfig(num_experts=4, pad_token_id=0, eos_token_id=1, bos_token_id=None, **common)
    if kind == "deepseek_v3":
        return transformers.DeepseekV3Config(n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
                                             first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1,
                                             topk_group=1, rope_parameters={"rope_type": "default",
                                                                            "rope_theta": 10000.0}, **common)
    if kind == "gpt_oss":
        return transformers.GptOssConfig(num_local_experts=4, head_dim=8, sliding_window=16,
                                         layer_types=["full_attention"], **common)
    raise AssertionError(kind)


def _tiny_layer(kind: str, dtype=torch.float64, seed=0):
    """Layer 0 of a random tiny model of ``kind`` and its recorded inputs (2 sequences of 16 tokens)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_tiny_config(kind), experts_implementation="eager")
    model = model.to(dtype).eval()
    with torch.no_grad():  # non-trivial norm weights, so folding into them is visible
        for m in model.modules():
            if "norm" in type(m).__name__.lower() and getattr(m, "weight", None) is not None:
                m.weight.mul_(1 + 0.5 * torch.rand_like(m.weight))
    layer = model.model.layers[0]
    rec = {}
    h = layer.register_forward_pre_hook(lambda m, a, k: rec.update(h=a[0] if a else k["hidden_states"],
                                                                   kw={x: v for x, v in k.items()
                                                                       if x != "hidden_states"}),
                                        with_kwargs=True)
    with torch.no_grad():
        model(input_ids=torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed)),
              use_cache=False)
    h.remove()
    return layer, detect_family(model.config), [rec["h"].detach()], [[rec["kw"]]]


def _awq_recipe(**awq_fields) -> Recipe:
    return Recipe(scheme=QuantScheme(group_size=8, method="rtn"),
                  awq=AWQConfig(enabled=True, grid=4, clip_grid=4, **awq_fields))


def _forced_scales(monkeypatch, seed: Callable[[torch.Tensor, int], int] = lambda x_mean, n: 1000 + n):
    """Every scale search returns random (non-identity) scales, so the folds are exercised whatever wins. The scales
    are drawn with ``seed(x_mean, n)``, n = the number of searches before this one (default: 1000 + n); returns the
    list of the searches' ``pow2`` flags."""
    calls = []

    def forced(x_mean, w_mean, loss_fn, grid=20, duo=True, pow2=False):
        g = torch.Generator().manual_seed(seed(x_mean, len(calls)))
        s = torch.exp(torch.randn(x_mean.numel(), generator=g)).to(x_mean.device)
        s = awq.round_pow2(s) if pow2 else s
        calls.append(pow2)
        loss_fn(s)  # the loss path runs on the same scales
        return awq.ScaleSearchResult(s, 0.5, 0.0, 1.0, [])

    monkeypatch.setattr(awq, "search_scale", forced)
    return calls


def _run(layer, hidden, kwargs):
    routes = []
    ex = [m for n, m in layer.named_modules() if n.endswith("experts") and hasattr(m, "gate_up_proj")][0]
    h = ex.register_forward_pre_hook(lambda m, a, k: routes.append((a[1] if len(a) > 1 else
                                                                      list(k.values())[0]).clone()),
                                     with_kwargs=True)
    with torch.no_grad():
        y = layer(hidden[0], **kwargs[0][0])
    h.remove()
    return (y[0] if isinstance(y, tuple) else y), routes[0]


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"])
def test_folding_is_exact_in_float64_and_routing_unchanged(kind, monkeypatch):
    layer, fam, hidden, kwargs = _tiny_layer(kind)
    y0, r0 = _run(layer, hidden, kwargs)
    norm0 = layer.post_attention_layernorm.weight.clone()
    router0 = fam.router_of(layer).weight.clone()
    calls = _forced_scales(monkeypatch)
    res = apply_awq(layer, fam, _awq_recipe(clip_search=False), "model.layers.0", hidden, kwargs, 0, "cpu",
                    torch.float64)
    y1, r1 = _run(layer, hidden, kwargs)
    assert torch.equal(r0, r1)  # router choices identical
    torch.testing.assert_close(y1, y0, rtol=1e-10, atol=1e-10)
    assert True in calls  # the norm feeding the router used power-of-two scales (exact_routing)
    assert not torch.equal(norm0, layer.post_attention_layernorm.weight)
    assert not torch.equal(router0, fam.router_of(layer).weight)
    router_name = fam.disk_name("model.layers.0." + fam.router) + ".weight"
    for name in ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight",
                 router_name):
        assert name in res.tensors
    if kind == "qwen2_moe":  # the gated shared expert's sigmoid gate reads the same norm: scaled and exported
        assert "model.layers.0.mlp.shared_expert_gate.weight" in res.tensors
    groups = {g["group"]: g for g in res.groups}
    if kind == "gpt_oss":
        assert "skipped" in groups["experts up->down"]  # clamped SwiGLU is not act(gate) * up
    else:
        assert groups["experts up->down"]["smoothed"] > 0
    if kind == "deepseek_v3":  # MLA: q_a_proj and kv_a_proj_with_mqa read input_layernorm; no v_proj -> o_proj
        assert set(groups["input_layernorm"]["readers"]) == {"self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"}
    else:
        assert groups["self_attn.v->o"]["heads_per_kv"] == 2  # GQA: one scale per KV channel


def test_folding_keeps_routing_bit_identical_in_bfloat16(monkeypatch):
    layer, fam, hidden, kwargs = _tiny_layer("qwen3_moe", dtype=torch.bfloat16)
    _, r0 = _run(layer, hidden, kwargs)
    _forced_scales(monkeypatch)
    apply_awq(layer, fam, _awq_recipe(clip_search=False), "model.layers.0", hidden, kwargs, 0, "cpu",
              torch.bfloat16)
    _, r1 = _run(layer, hidden, kwargs)
    assert torch.equal(r0, r1)


def test_zero_token_expert_is_not_scaled_or_clipped(monkeypatch):
    layer, fam, hidden, kwargs = _tiny_layer("qwen3_moe")
    ex = fam.experts_of(layer)

    def starve(m, args, kwargs):  # expert 3 never receives a token
        idx = args[1].clone()
        idx[idx == 3] = 0
        return (args[0], idx, args[2]), kwargs

    ex.register_forward_pre_hook(starve, with_kwargs=True)
    down0 = ex.down_proj.detach().clone()
    _forced_scales(monkeypatch)
    res = apply_awq(layer, fam, _awq_recipe(min_tokens=1), "model.layers.0", hidden, kwargs, 0, "cpu",
                    torch.float64)
    assert torch.equal(ex.down_proj[3], down0[3])
    assert all(not torch.equal(ex.down_proj[e], down0[e]) for e in range(3))
    groups = {g["group"]: g for g in res.groups}
    assert groups["experts up->down"]["below_min_tokens_or_unquantized"] == 1
    assert groups["clip"]["experts"] == 3


def test_unsupported_reader_raises_with_remedy(monkeypatch):
    layer, fam, hidden, kwargs = _tiny_layer("qwen3_moe")
    layer.mlp.gate.weight = torch.nn.Parameter(layer.mlp.gate.weight.detach().t().contiguous())  # [H, E]: odd

    def forward(hidden_states):
        logits = hidden_states.reshape(-1, 32) @ layer.mlp.gate.weight
        w, i = torch.topk(logits.softmax(-1), 2)
        return logits, w, i

    layer.mlp.gate.forward = forward
    with pytest.raises(ValueError, match="awq.enabled=false"):
        apply_awq(layer, fam, _awq_recipe(), "model.layers.0", hidden, kwargs, 0, "cpu", torch.float64)


def test_trained_model_routing_identical_after_awq(shared_dir, shared_tiny_model):
    from moequant.calibration.data import calibration_batches
    from moequant.models.lazy import LazyModel, record_layer_inputs

    model = shared_tiny_model
    lazy = LazyModel(model, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(model)
    ids = calibration_batches(tok, CalibrationConfig(text_files=[str(shared_dir / "data/evaltext/calib.txt")],
                                                     num_samples=4, seq_len=128))
    rec = record_layer_inputs(lazy, ids, "cpu")
    layer = lazy.load_layer(0, "cpu")
    hidden, kwargs = [rec.hidden_states], [rec.kwargs_per_layer]
    resid = []
    h = layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: resid.append(a[0]))
    y0, _ = _run(layer, hidden, kwargs)
    h.remove()

    def routes():  # the experts' top-k choices for the same residual stream (the MoE input before its norm)
        return _run_moe(layer, resid[0])

    r0 = routes()
    recipe = Recipe(scheme=QuantScheme(bits=3), awq=AWQConfig(enabled=True, clip_search=False))
    res = apply_awq(layer, lazy.family, recipe, lazy.layer_prefix(0), hidden, kwargs, 0, "cpu", torch.bfloat16)
    assert torch.equal(r0, routes())  # bit-identical: power-of-two scales fold exactly into norm and router
    y1, _ = _run(layer, hidden, kwargs)
    assert float((y1 - y0).norm() / y0.norm()) < 1e-2  # bf16 rounding of the attention norm only
    groups = {g["group"]: g for g in res.groups}
    assert groups["post_attention_layernorm"]["pow2"] is True
    assert any(g.get("ratio") is not None for g in res.groups)


def _run_moe(layer, resid):
    routes = []
    ex = layer.mlp.experts
    h = ex.register_forward_pre_hook(lambda m, a, k: routes.append(a[1].clone()), with_kwargs=True)
    with torch.no_grad():
        layer.mlp(layer.post_attention_layernorm(resid))
    h.remove()
    return routes[0]


# ------------------------------------------------------------------------------------------------ pipeline
def test_pipeline_awq_end_to_end_export_reload_and_resume(tmp_path, monkeypatch):
    """AWQ + GPTQ on the random tiny Qwen3-MoE of the pipeline tests: changed norms/router exported, the checkpoint
    reloads, and an interrupted run resumes bit-identically. The scale search is forced to non-identity scales
    derived from its input (the same in the resumed run, where a count of the searches would restart), so that the
    MoE input norm and the router change: on this random model the real search keeps the identity there, which would
    make the router check compare equal tensors."""
    from checkpoints import assert_resume_bit_identical, checkpoint_tensors
    from test_pipeline import CALIB
    from testdata import tiny_qwen3_checkpoint

    _forced_scales(monkeypatch, seed=lambda x_mean, n: int(x_mean.double().abs().sum().item() * 1e6) % (2**31))

    model = tiny_qwen3_checkpoint(tmp_path / "model")
    recipe = Recipe(scheme=QuantScheme(group_size=32), awq=AWQConfig(enabled=True, grid=5, clip_grid=10),
                    calibration=CalibrationConfig(text_files=[str(CALIB)], num_samples=4, seq_len=64, batch_size=2))

    a = assert_resume_bit_identical(model, recipe, tmp_path, crash=KeyboardInterrupt, export_format="dequantized")
    src = checkpoint_tensors(model)
    assert all(k in a for k in src if "layernorm" in k)  # every norm is exported
    # smoothing scales were folded into norms and exported, the MoE input norm itself among them (else the router
    # check below compares identical tensors)
    assert any(not torch.equal(src[f"model.layers.{i}.post_attention_layernorm.weight"],
                               a[f"model.layers.{i}.post_attention_layernorm.weight"]) for i in range(2))
    for i in range(2):  # the router was folded exactly: logits of the exported model's MoE input unchanged
        k = f"model.layers.{i}.post_attention_layernorm.weight"
        g = f"model.layers.{i}.mlp.gate.weight"
        s = src[k].double() / a[k].double()
        torch.testing.assert_close(a[g].double(), src[g].double() * s, rtol=0, atol=0)
    m = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "full", dtype=torch.float32)
    with torch.no_grad():
        assert torch.isfinite(m(input_ids=torch.randint(0, 100, (1, 16))).logits).all()
