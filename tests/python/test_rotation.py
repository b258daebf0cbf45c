"""Offline residual rotation (moequant.rotation): the transform against its dense twin, function preservation on
tiny random models of every foldable family and on the trained tiny MoE, routing unchanged, errors, and the
pipeline (rotated + quantized export reloads, tied embeddings untied, resume bit-identical)."""
from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers

from moequant import pipeline
from moequant.methods import rotation
from moequant.io.export import Replacements, export_checkpoint
from moequant.models import detect_family
from moequant.models.base import get_path
from moequant.recipe import Recipe
from moequant.ref.rotation import random_hadamard_ref, random_signs_ref, rotate_along_ref
from moequant.methods.rotation import RotationConfig
from test_models import build_tiny, tiny_config
from checkpoints import assert_resume_bit_identical, checkpoint_tensors
from test_pipeline import small_recipe
from testdata import tiny_qwen3_checkpoint

# Written tolerances (relative to max |logit| of the unrotated model).
# Every RMSNorm (and some routers) of these models compute in float32 internally even for float64 weights, so a
# float64 model with the float64 dense Q still rounds at ~2^-24: 1e-6 is ~4x the largest difference seen
# (2.5e-7 on the tiny models). The float32 model with the fast transform adds float32 rounding of the rotated
# weights: 1e-5 is ~10x the largest seen (1.8e-6, GraniteMoE).
LOGITS_RTOL_F64 = 1e-6
LOGITS_RTOL_F32 = 1e-5
# The fast transform (fp32) vs the dense float64 Q: a Hadamard of order n sums n terms; fp32 error grows like
# log2(n) * 2^-24 relative to |x| per element: 1e-6 * max|x| covers n <= 32768.
TRANSFORM_ATOL = 1e-6
FOLDABLE = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "deepseek_v3", "deepseek_v2", "gpt_oss", "qwen3_next",
            "granitemoe"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(vocab, shape=(2, 12), seed=0):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _dense(n: int, seed: int) -> rotation.DenseRotation:
    return rotation.DenseRotation(random_hadamard_ref(n, seed))


# ------------------------------------------------------------------------------------------------ transform
@pytest.mark.parametrize("n", [1, 2, 32, 12, 48, 20 * 8, 40, 28 * 4, 384])
def test_fast_rotation_matches_dense_reference(n, gen):
    fast, q = rotation.random_hadamard(n, seed=5), random_hadamard_ref(n, 5)
    assert torch.allclose(q @ q.T, torch.eye(n, dtype=torch.float64), atol=1e-12)  # orthogonal
    x = torch.randn(3, n, 5, generator=gen)
    for dim in (1, -2):
        want = rotate_along_ref(x, q, dim)
        got = fast.along(x, dim)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert (got - want).abs().max() <= TRANSFORM_ATOL * x.abs().max()
    assert torch.equal(fast.signs.double(), random_signs_ref(n, 5))


def test_rotation_is_seeded_and_7168_is_supported(gen):
    assert torch.equal(rotation.random_hadamard(64, 1).signs, rotation.random_hadamard(64, 1).signs)
    assert not torch.equal(rotation.random_hadamard(64, 1).signs, rotation.random_hadamard(64, 2).signs)
    r = rotation.random_hadamard(7168, 0)  # DeepSeek-V3: 28 * 256
    x = torch.randn(4, 7168, generator=gen)
    y = r.along(x, -1)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)  # orthogonal: norms kept
    assert not torch.allclose(y, x)


@pytest.mark.parametrize("n", [0, 3, 36, 100, 7000, 65536, True, 32.0])
def test_unsupported_size_raises_with_remedy(n):
    with pytest.raises(ValueError, match=r"hidden_size.*rotation.enabled"):
        rotation.random_hadamard(n)


def test_along_checks_the_size(gen):
    with pytest.raises(ValueError, match="expected size 32"):
        rotation.random_hadamard(32).along(torch.randn(4, 16, generator=gen), -1)


# ------------------------------------------------------------------------------------------------ models
def _router_choices(model, fam, ids):
    """Sorted top-k expert ids per token of every MoE layer, read at the experts module's input."""
    seen = []

    def hook(mod, args, kwargs):
        b = inspect.signature(mod.forward).bind(*args, **kwargs)
        seen.append(torch.sort(list(b.arguments.values())[1], dim=-1).values.clone())

    hooks = [fam.experts_of(layer).register_forward_pre_hook(hook, with_kwargs=True)
             for _, _, layer in fam.iter_layers(model) if fam.experts_of(layer) is not None]
    try:
        _logits(model, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("name", FOLDABLE)
def test_float64_rotation_preserves_logits_and_routing(name):
    model = build_tiny(name).double()
    fam = detect_family(model.config)
    ids = _ids(100)
    before, choices = _logits(model, ids), _router_choices(model, fam, ids)
    emb = model.get_input_embeddings().weight.clone()
    rotation.rotate_model_(model, fam, _dense(model.config.hidden_size, 3))
    assert not torch.allclose(model.get_input_embeddings().weight, emb)  # it did rotate
    after = _logits(model, ids)
    assert (after - before).abs().max() <= LOGITS_RTOL_F64 * before.abs().max()
    for a, b in zip(choices, _router_choices(model, fam, ids), strict=True):
        assert torch.equal(a, b)
    offset = fam.norm_weight_offset
    for _, _, layer in fam.iter_layers(model):
        for norm, _ in fam.residual_norms:
            assert torch.all(get_path(layer, norm).weight == 1 - offset)


@pytest.mark.parametrize("name", FOLDABLE)
def test_float32_fast_rotation_preserves_logits(name):
    model = build_tiny(name)
    fam = detect_family(model.config)
    ids = _ids(100)
    before = _logits(model, ids)
    rotation.rotate_model_(model, fam, rotation.random_hadamard(model.config.hidden_size, 0))
    after = _logits(model, ids)
    assert (after - before).abs().max() <= LOGITS_RTOL_F32 * before.abs().max()


def test_wrong_rotation_breaks_the_model():
    """The checks above can fail: rotating the layers but not the globals changes the logits."""
    model = build_tiny("qwen3_moe")
    fam = detect_family(model.config)
    ids = _ids(100)
    before = _logits(model, ids)
    r = rotation.random_hadamard(32, 0)
    for _, _, layer in fam.iter_layers(model):
        rotation.rotate_layer_(layer, fam, r)
    assert (_logits(model, ids) - before).abs().max() > 100 * LOGITS_RTOL_F32 * before.abs().max()


def test_tied_embeddings_are_untied(tmp_path):
    cfg = tiny_config("qwen3_moe")
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids = _ids(100)
    before = _logits(model, ids)
    changed = rotation.rotate_globals_(model, detect_family(model.config), _dense(32, 0))
    assert set(changed) == {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"}
    assert model.lm_head.weight is not model.model.embed_tokens.weight and not model.config.tie_word_embeddings
    for _, _, layer in detect_family(model.config).iter_layers(model):
        rotation.rotate_layer_(layer, detect_family(model.config), _dense(32, 0))
    assert (_logits(model, ids) - before).abs().max() <= LOGITS_RTOL_F32 * before.abs().max()
    model.save_pretrained(tmp_path / "m")  # an ordinary checkpoint: reloads untied with the same logits
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert again.lm_head.weight.data_ptr() != again.model.embed_tokens.weight.data_ptr()
    assert torch.allclose(_logits(again, ids), _logits(model, ids), atol=1e-6)


# ------------------------------------------------------------------------------------------------ errors
def test_layernorm_family_raises_with_remedy():
    model = build_tiny("phimoe")
    with pytest.raises(ValueError, match=r"phimoe.*LayerNorm.*RMSNorm.*rotation.enabled"):
        rotation.rotate_model_(model, detect_family(model.config), rotation.random_hadamard(32))


def test_wrong_norm_convention_raises():
    model = build_tiny("qwen3_next")  # (1 + weight) RMSNorm declared with offset 1; pretend it is 0
    fam = dataclasses.replace(detect_family(model.config), norm_weight_offset=0.0)
    with torch.no_grad():
        model.model.norm.weight.normal_()
    with pytest.raises(ValueError, match=r"does not compute x / rms\(x\)"):
        rotation.rotate_globals_(model, fam, rotation.random_hadamard(32))


def test_undeclared_structure_raises():
    model = build_tiny("qwen3_moe")
    fam = detect_family(model.config)
    layer = fam.layers(model)[0]
    no_mlp = dataclasses.replace(fam, residual_norms=(("input_layernorm", ("self_attn",)),
                                                     ("post_attention_layernorm", ())))
    with pytest.raises(ValueError, match=r"outside the declared blocks.*families.py"):
        rotation.rotation_plan(layer, no_mlp, 32)
    no_internal = dataclasses.replace(fam, rotation_internal=())
    with pytest.raises(ValueError, match=r"q_norm.*not a declared residual norm"):
        rotation.rotation_plan(layer, no_internal, 32)
    no_norm = dataclasses.replace(fam, residual_norms=(("pre_norm", ("self_attn",)),))
    with pytest.raises(ValueError, match="no residual norm 'pre_norm'"):
        rotation.rotation_plan(layer, no_norm, 32)
    with pytest.raises(ValueError, match="expected the hidden size 64"):
        rotation.rotation_plan(layer, fam, 64)


def test_recipe_rotation_round_trip_and_bad_values():
    r = Recipe(rotation={"enabled": True, "seed": 7})
    assert r.rotation == RotationConfig(enabled=True, seed=7)
    assert Recipe.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    assert Recipe().rotation.enabled is False
    for bad, match in (({"enabled": "yes"}, "rotation.enabled: expected true or false"),
                       ({"seed": -1}, "rotation.seed: expected an integer >= 0"),
                       ({"seed": 1.5}, "rotation.seed"), ({"kind": "random"}, "rotation.kind: expected one of"),
                       ({"angle": 1}, "unknown key.*'angle'"), ([1], "rotation: expected a RotationConfig or a mapping")):
        with pytest.raises(ValueError, match=match):
            Recipe(rotation=bad)
    with pytest.raises(ValueError, match="rotation: expected a RotationConfig"):
        Recipe(rotation=3)


def test_export_added_tensors_and_config_overrides(tmp_path):
    src = tiny_qwen3_checkpoint(tmp_path / "src")
    extra = torch.ones(3, dtype=torch.bfloat16)
    export_checkpoint(src, tmp_path / "out", Replacements(added={"extra.weight": extra}), None, mode="dequantized",
                      config_overrides={"tie_word_embeddings": False})
    assert torch.equal(checkpoint_tensors(tmp_path / "out")["extra.weight"], extra)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    with pytest.raises(ValueError, match="replace it through 'tensors'"):
        export_checkpoint(src, tmp_path / "o2", Replacements(added={"model.norm.weight": extra}), None,
                          mode="dequantized")
    with pytest.raises(ValueError, match="added twice"):
        export_checkpoint(src, tmp_path / "o3", [Replacements(added={"x": extra}), {"added": {"x": extra}}], None,
                          mode="dequantized")


# ------------------------------------------------------------------------------------------------ pipeline
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("rot") / "model")  # hidden 64, tied embeddings, bf16


def _rot_recipe(**scheme) -> Recipe:
    r = small_recipe(**scheme)
    r.rotation = RotationConfig(enabled=True, seed=1)
    return r


def _load(d, dtype=torch.float32):
    return transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()


def test_pipeline_rotated_export_matches_in_memory_rotation(tiny, tmp_path):
    """Dequantized rotated W4 export == the original rotated in memory with the export's quantized weights put
    in: every high-precision tensor (embeddings, untied lm_head, norms = 1, routers) is exported rotated."""
    report = pipeline.quantize(tiny, _rot_recipe(symmetric=False), output_dir=tmp_path / "d", progress=False,
                               export_format="dequantized")
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is False
    exported = checkpoint_tensors(tmp_path / "d")
    assert "lm_head.weight" in exported and torch.all(exported["model.norm.weight"] == 1)
    assert torch.all(exported["model.layers.1.post_attention_layernorm.weight"] == 1)
    ref = _load(tiny)
    fam = detect_family(ref.config)
    rotation.rotate_model_(ref, fam, rotation.random_hadamard(64, 1))
    quantized = {m.name for layer in report.layers for m in layer.modules}
    state = ref.state_dict()
    for name in state:
        if name.rsplit(".", 1)[0] in quantized or ".experts." in name:
            continue  # quantized: compared through the logits below
        want = state[name].to(torch.bfloat16)
        assert torch.equal(exported[name], want), name
        state[name].copy_(want)  # the checkpoint stores bf16
    reloaded = _load(tmp_path / "d")
    for name, t in reloaded.state_dict().items():  # quantized weights into the in-memory rotated model
        if name.rsplit(".", 1)[0] in quantized or ".experts." in name:
            state[name].copy_(t)
    ids = _ids(8000, (2, 32), seed=1)
    assert torch.allclose(_logits(reloaded, ids), _logits(ref, ids), atol=1e-5, rtol=1e-5)


def test_pipeline_rotation_w8_keeps_the_model(tiny, tmp_path):
    """At 8 bits the rotated, quantized export computes what the source does (the rotation is transparent)."""
    pipeline.quantize(tiny, _rot_recipe(bits=8, symmetric=True), output_dir=tmp_path / "d", progress=False,
                      export_format="dequantized")
    ids = _ids(8000, (2, 32), seed=2)
    src, out = _logits(_load(tiny), ids), _logits(_load(tmp_path / "d"), ids)
    assert (out - src).abs().max() <= 0.05 * src.abs().max()
    assert (out.argmax(-1) == src.argmax(-1)).float().mean() > 0.95


def test_pipeline_rotated_pack_quantized_reloads(tiny, tmp_path):
    pytest.importorskip("compressed_tensors")
    r = _rot_recipe(symmetric=True)
    pipeline.quantize(tiny, r, output_dir=tmp_path / "p", progress=False)
    pipeline.quantize(tiny, r, output_dir=tmp_path / "d", progress=False, export_format="dequantized")
    t = checkpoint_tensors(tmp_path / "p")
    assert "lm_head.weight" in t and "model.layers.0.mlp.gate.weight" in t
    ids = _ids(8000, (2, 32), seed=1)
    a = _logits(_load(tmp_path / "p", torch.bfloat16), ids).float()
    b = _logits(_load(tmp_path / "d", torch.bfloat16), ids).float()
    assert torch.allclose(a, b, atol=2e-2, rtol=2e-2), (a - b).abs().max()


def test_pipeline_rotation_resume_is_bit_identical(tiny, tmp_path):
    assert_resume_bit_identical(tiny, _rot_recipe(), tmp_path)


def test_pipeline_unsupported_hidden_size_fails_before_work(tmp_path):
    model = tmp_path / "m"
    tiny_qwen3_checkpoint(model)
    cfg = json.loads((model / "config.json").read_text())
    small = transformers.Qwen3MoeConfig(**{**{k: v for k, v in cfg.items() if k in (
        "vocab_size", "num_hidden_layers", "num_experts", "num_experts_per_tok", "tie_word_embeddings")},
        "hidden_size": 48 + 4, "intermediate_size": 32, "moe_intermediate_size": 32, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 14, "max_position_embeddings": 256})
    odd = tmp_path / "odd"
    transformers.Qwen3MoeForCausalLM(small).to(torch.bfloat16).save_pretrained(odd)
    for f in model.glob("tokenizer*"):
        shutil.copy(f, odd / f.name)
    r = _rot_recipe()
    r.scheme = r.scheme.replace(group_size=4)
    with pytest.raises(ValueError, match=r"hidden_size.*got 52.*rotation.enabled"):
        pipeline.quantize(odd, r, output_dir=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


# ------------------------------------------------------------------------------------------------ trained model
@pytest.fixture
def trained(shared_tiny_model):
    """The trained tiny MoE of ../shared (conftest's ``shared_tiny_model`` skips, with the reason, when ../shared or
    the model is absent)."""
    return shared_tiny_model


def test_trained_model_rotation_preserves_logits_and_routing(trained):
    ids = _ids(8192, (2, 64), seed=3)
    model = _load(trained)  # bf16 weights, computed in float32
    fam = detect_family(model.config)
    before, choices = _logits(model, ids), _router_choices(model, fam, ids)
    rotation.rotate_model_(model, fam, rotation.random_hadamard(384, 0))  # 384 = 12 * 32
    after = _logits(model, ids)
    assert (after - before).abs().max() <= LOGITS_RTOL_F32 * before.abs().max()
    agree = [torch.all(a == b, dim=-1).float().mean() for a, b in zip(choices, _router_choices(model, fam, ids))]
    assert min(agree) >= 0.995, agree  # float32 rounding may flip an exact near-tie, nothing more


def test_trained_model_bf16_rotation_costs_no_more_than_bf16_compute(trained):
    """bf16: the rotated bf16 model (rotated in float32, rounded to bf16 once) is about as close to the float32
    original as the unrotated bf16 model is. Mean |logit error| (the max is dominated by single outliers of the
    bf16 compute): measured ratios 0.86 .. 1.12 over three batches; 1.5 leaves room."""
    ids = _ids(8192, (4, 128), seed=4)
    ref32 = _logits(_load(trained), ids)  # the trained weights are bf16 values; float32 compute
    base = _logits(_load(trained, torch.bfloat16), ids).float()
    rot = _load(trained, torch.bfloat16)
    rotation.rotate_model_(rot, detect_family(rot.config), rotation.random_hadamard(384, 0))
    err_rot = (_logits(rot, ids).float() - ref32).abs().mean()
    err_base = (base - ref32).abs().mean()
    assert err_rot <= 1.5 * err_base, (err_rot, err_base)
    assert err_base > 0  # bf16 compute does round: the comparison is not vacuous
