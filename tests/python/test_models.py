"""Family adapters on tiny random models of every supported family (CPU, seeded).

``build_tiny(name)`` is also used by test_capture.py. Experts run the "eager" implementation
(``config._experts_implementation = "eager"``; ``from_pretrained(..., experts_implementation="eager")`` is the
loading-time knob); capture does not depend on it (see test_capture).
"""
from __future__ import annotations

import re

import pytest
import torch
import transformers

from testdata import redraw_experts

from moequant.models import FAMILIES, MoEFamily, detect_family, linear_modules, split_expert
from moequant.models.base import STANDARD, intermediate_size, num_experts

COMMON = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)

TINY = {
    # name: (config class, kwargs)
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16,
                                          num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1])),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16,
                                          shared_expert_intermediate_size=24, num_experts=8, num_experts_per_tok=2)),
    "mixtral": ("MixtralConfig", dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=6,
                                       num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", dict(num_hidden_layers=2, intermediate_size=16, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_hidden_layers=3, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, num_key_value_heads=4)),
    "deepseek_v2": ("DeepseekV2Config", dict(
        num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=2,
        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=8, topk_method="greedy", num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8,
                                      num_experts_per_tok=2, head_dim=8, sliding_window=16,
                                      layer_types=["sliding_attention", "full_attention"])),
    "qwen3_next": ("Qwen3NextConfig", dict(
        num_hidden_layers=2, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        num_experts=8, num_experts_per_tok=2, head_dim=8, linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention"])),
    "phimoe": ("PhimoeConfig", dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=4,
                                     num_experts_per_tok=2)),
    "granitemoe": ("GraniteMoeConfig", dict(num_hidden_layers=2, intermediate_size=16, num_local_experts=8,
                                             num_experts_per_tok=2)),
}
NAMES = list(TINY)


def tiny_config(name: str, experts_implementation: str | None = "eager"):
    cls_name, kw = TINY[name]
    cfg = getattr(transformers, cls_name)(**{**COMMON, **kw})
    if experts_implementation is not None:
        cfg._experts_implementation = experts_implementation
    return cfg


def build_tiny(name: str, seed: int = 0, experts_implementation: str | None = "eager", scale: float = 1.0):
    """Tiny ``*ForCausalLM`` of family ``name`` in fp32 eval mode. Expert weights are re-drawn with a larger
    std (``scale / sqrt(fan_in)``, biases too) so activations are O(1) (GPT-OSS clamps are hit at scale>=4)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(name, experts_implementation))
    model.eval().float()
    redraw_experts(model, scale=scale, seed=seed + 1)
    return model


def test_every_family_has_a_tiny_config():
    assert {f.name for f in FAMILIES} == set(TINY)


@pytest.mark.parametrize("name", NAMES)
def test_detect_and_structure(name):
    model = build_tiny(name)
    fam = detect_family(model.config)
    assert isinstance(fam, MoEFamily) and fam.name == name
    assert detect_family(model) is fam and detect_family(model.config.model_type) is fam
    fam.validate(model)
    layers = fam.layers(model)
    moe = [fam.is_moe_layer(layer) for layer in layers]
    expected_dense = {"qwen3_moe": [1], "deepseek_v3": [0], "deepseek_v2": [0]}.get(name, [])
    assert [i for i, m in enumerate(moe) if not m] == expected_dense
    for i, layer in enumerate(layers):
        ex = fam.experts_of(layer)
        assert (fam.router_of(layer) is None) == (ex is None)
        if ex is None:
            continue
        E, I = num_experts(ex), intermediate_size(ex, fam)
        assert type(fam.router_of(layer)).__name__.endswith("Router")
        t = split_expert(ex, fam, 0)
        H = model.config.hidden_size
        assert t.gate.shape == (I, H) and t.up.shape == (I, H) and t.down.shape == (H, I)
        assert (t.gate_bias is not None) == fam.has_bias
        if fam.layout == STANDARD:
            assert torch.equal(t.gate, ex.gate_up_proj[0, :I]) and torch.equal(t.up, ex.gate_up_proj[0, I:])
        else:  # GPT-OSS: transposed, interleaved
            assert torch.equal(t.gate, ex.gate_up_proj[0][:, 0::2].t()) and torch.equal(t.up, ex.gate_up_proj[0][:, 1::2].t())
            assert torch.equal(t.down, ex.down_proj[0].t())
        assert E == getattr(ex, "num_experts", E)
        if fam.shared_expert:
            assert fam.shared_expert_of(layer) is not None
        if fam.shared_expert_gate:
            assert fam.shared_expert_gate_of(layer).weight.shape == (1, H)


def test_unknown_model_type_raises_listing_families():
    cfg = transformers.LlamaConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1, num_attention_heads=1)
    with pytest.raises(ValueError) as ei:
        detect_family(cfg)
    msg = str(ei.value)
    assert "llama" in msg and all(f.name in msg for f in FAMILIES) and "MoEFamily" in msg


LINEAR_EXPECT = {
    # family: (must include (layer-relative), must exclude)
    "qwen3_moe": ({"self_attn.q_proj", "self_attn.o_proj"}, {"mlp.gate"}),
    "qwen2_moe": ({"self_attn.q_proj", "mlp.shared_expert.gate_proj", "mlp.shared_expert.down_proj"},
                  {"mlp.gate", "mlp.shared_expert_gate"}),
    "mixtral": ({"self_attn.k_proj"}, {"mlp.gate"}),
    "olmoe": ({"self_attn.v_proj"}, {"mlp.gate"}),
    "deepseek_v3": ({"self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa",
                     "self_attn.kv_b_proj", "self_attn.o_proj", "mlp.shared_experts.up_proj"}, {"mlp.gate"}),
    "deepseek_v2": ({"self_attn.q_proj", "self_attn.kv_b_proj", "mlp.shared_experts.down_proj"}, {"mlp.gate"}),
    "gpt_oss": ({"self_attn.q_proj", "self_attn.o_proj"}, {"mlp.router"}),
    "qwen3_next": ({"mlp.shared_expert.up_proj"}, {"mlp.gate", "mlp.shared_expert_gate", "linear_attn.in_proj_ba"}),
    "phimoe": ({"self_attn.q_proj"}, {"mlp.router"}),
    "granitemoe": ({"self_attn.q_proj"}, {"block_sparse_moe.router"}),
}


@pytest.mark.parametrize("name", NAMES)
def test_linear_modules(name):
    model = build_tiny(name)
    fam = detect_family(model.config)
    inc, exc = LINEAR_EXPECT[name]
    idx = next(i for i, layer in enumerate(fam.layers(model)) if fam.is_moe_layer(layer))
    layer = fam.layers(model)[idx]
    rel = linear_modules(layer, fam)
    assert inc <= set(rel) and not (exc & set(rel)), sorted(rel)
    assert all(isinstance(m, torch.nn.Linear) for m in rel.values())
    prefix = fam.layer_prefix(model, idx)
    full = linear_modules(layer, fam, prefix)
    named = dict(model.named_modules())
    assert all(named[n] is m for n, m in full.items())
    for e in exc:
        assert fam.is_high_precision(f"{prefix}.{e}")
    assert fam.is_high_precision("lm_head") and fam.is_high_precision("model.embed_tokens")
    if name == "qwen3_next":
        lin = linear_modules(fam.layers(model)[0], fam)
        assert {"linear_attn.in_proj_qkvz", "linear_attn.out_proj"} <= set(lin)
        assert "self_attn.q_proj" in linear_modules(fam.layers(model)[1], fam)
    dense = [layer for layer in fam.layers(model) if not fam.is_moe_layer(layer)]
    for layer in dense:  # dense MLP Linears are quantized
        assert {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"} <= set(linear_modules(layer, fam))


def test_disk_names():
    fams = {f.name: f for f in FAMILIES}
    assert fams["mixtral"].disk_expert_names("model.layers.2", 5) == {
        "gate": "model.layers.2.block_sparse_moe.experts.5.w1", "up": "model.layers.2.block_sparse_moe.experts.5.w3",
        "down": "model.layers.2.block_sparse_moe.experts.5.w2"}
    assert fams["qwen3_moe"].disk_expert_names("model.layers.0", 1)["down"] == "model.layers.0.mlp.experts.1.down_proj"
    assert fams["mixtral"].disk_name("model.layers.0.mlp.gate") == "model.layers.0.block_sparse_moe.gate"
    assert fams["phimoe"].disk_name("model.layers.0.mlp.router") == "model.layers.0.block_sparse_moe.gate"
    assert fams["qwen2_moe"].disk_name("model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    ign = fams["qwen2_moe"].ignore_patterns()
    assert "lm_head" in ign and any(re.fullmatch(p[3:], "model.layers.4.mlp.shared_expert_gate") for p in ign)
    assert any(re.fullmatch(p[3:], "model.layers.4.block_sparse_moe.gate") for p in fams["mixtral"].ignore_patterns())
    assert fams["gpt_oss"].disk_fused and fams["granitemoe"].disk_fused


@pytest.mark.parametrize("name", NAMES)
def test_disk_names_match_transformers_conversion_mapping(name):
    """Our per-expert checkpoint names are what transformers' loader fuses (when the checkpoint is per-expert)."""
    conv = pytest.importorskip("transformers.conversion_mapping")
    fam = {f.name: f for f in FAMILIES}[name]
    mapping = conv.get_checkpoint_conversion_mapping(fam.model_types[0]) or []
    sources = [s for m in mapping if type(m).__name__ == "WeightConverter" for s in m.source_patterns]
    if fam.disk_fused:
        assert not sources, "fused-on-disk family unexpectedly has a per-expert converter"
        return
    assert len(sources) == 3, mapping
    names = fam.disk_expert_names("model.layers.7", 3)
    for role, pat in zip(("gate", "up", "down"), sources):
        rx = re.escape(pat).replace(r"\*", r"\d+")
        assert re.search(rx, names[role] + ".weight"), (role, pat, names[role])
