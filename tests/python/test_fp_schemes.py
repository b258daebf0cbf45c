"""The floating-point / microscaling schemes from the recipe to the checkpoint tensors, on the CPU, without a model:
the format types (FloatFormat, ActivationFormat, presets), the recipe's ``preset`` rules, the config block and its
parser against compressed-tensors' own schemes, every tensor layout against compressed-tensors' own decompressors
(bit for bit), RTN / GPTQ dispatch, NVFP4 global scales shared by fused partners, the input global scale, and the
loader rules. The checkpoints of whole models: tests/python/trust/test_loadable_formats.py."""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from moequant import ops
from moequant.ref import formats as fref
from moequant.formats import (FLOAT_KINDS, PRESETS, ActivationFormat, FloatFormat, IntFormat, WeightsConfig,
                              compressed_tensor_names, compression_format, config_groups, decompress, group_of,
                              nvfp4_global_scale, preset, quantization_config_block, weight_format_from_key,
                              weights_args)
from moequant.io.compat import ModuleScheme, loader_support
from moequant.methods import default_solvers
from moequant.methods.base import Solver
from moequant.methods.registry import SolverRegistry
from moequant.models import detect_family
from moequant.pipeline.activations import complete_input_scales
from moequant.pipeline.jobs import shared_global_scale, solve_matrix
from moequant.recipe import Override, QuantScheme, Recipe

# The CPU-readable presets and compressed-tensors' own preset of the same name (moequant's FP8 = its FP8_DYNAMIC).
CT_PRESET = {"W4A16": "W4A16", "W8A16": "W8A16", "W8A8": "W8A8", "FP8": "FP8_DYNAMIC", "FP8_BLOCK": "FP8_BLOCK",
             "NVFP4": "NVFP4", "NVFP4A16": "NVFP4A16", "MXFP4": "MXFP4", "MXFP4A16": "MXFP4A16",
             "MXFP6A16": "MXFP6A16", "MXFP6A8": "MXFP6A8", "MXFP8A16": "MXFP8A16", "MXFP8": "MXFP8"}


def _ct_scheme(name: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(name, ["Linear"])


def _spec(fmt: FloatFormat, scale_dtype=torch.float32) -> fref.FormatSpec:
    return {"fp8": fref.FormatSpec("fp8_e4m3", "channel", scale_dtype=scale_dtype),
            "fp8_block": fref.FormatSpec("fp8_e4m3", "block", block=(128, 128), scale_dtype=scale_dtype),
            "nvfp4": fref.FormatSpec.nvfp4(), "mxfp4": fref.FormatSpec.mx("fp4_e2m1"),
            "mxfp6": fref.FormatSpec.mx("fp6_e2m3"), "mxfp8": fref.FormatSpec.mx("fp8_e4m3")}[fmt.kind]


# ---- format types -------------------------------------------------------------------------------------------------
def test_float_format_interface():
    shapes = {"fp8": (300, 1), "fp8_block": (3, 2), "nvfp4": (300, 12), "mxfp4": (300, 6), "mxfp6": (300, 6),
              "mxfp8": (300, 6)}
    for kind in FLOAT_KINDS:
        f = FloatFormat(kind)
        assert f.type == "float" and f.symmetric and f.equivalents(192) == frozenset({f})
        assert weight_format_from_key(list(f.key)) == f and hash(f) == hash(FloatFormat(kind))
        assert f.scale_shape(300, 192) == shapes[kind] and f.groups(192) == shapes[kind][1]
    assert (FloatFormat("nvfp4").bits, FloatFormat("nvfp4").group_size, FloatFormat("mxfp4").group_size) == (4, 16, 32)
    assert [(FloatFormat(k).bits, FloatFormat(k).element) for k in ("mxfp6", "mxfp8")] == [(6, "fp6_e2m3"),
                                                                                          (8, "fp8_e4m3")]
    # bits of a 300 x 192 matrix: the elements plus one E8M0 byte per group of 32
    assert [FloatFormat(k).storage_bits(300, 192) for k in ("mxfp4", "mxfp6", "mxfp8")] == \
        [300 * 192 * b + 300 * 6 * 8 for b in (4, 6, 8)]
    assert not FloatFormat("mxfp6").divides(48) and FloatFormat("mxfp8").divides(64)
    assert FloatFormat("fp8").per_channel and not FloatFormat("fp8_block").per_channel
    assert not FloatFormat("nvfp4").divides(40) and FloatFormat("nvfp4").divides(48) and FloatFormat("fp8").divides(7)
    assert not FloatFormat("mxfp4").divides(48) and FloatFormat("fp8_block").divides(200)  # partial edge blocks
    assert FloatFormat("fp8_block").splits_rows(256) and not FloatFormat("fp8_block").splits_rows(64)
    assert FloatFormat("nvfp4").splits_rows(8) and IntFormat(4, 128).splits_rows(3)
    assert weight_format_from_key([4, 128, True]) == IntFormat(4, 128, True)
    with pytest.raises(ValueError, match="kind: expected one of 'fp8', 'fp8_block', 'nvfp4', 'mxfp4', 'mxfp6', "
                                         "'mxfp8', got 'fp6'"):
        FloatFormat("fp6")
    with pytest.raises(ValueError, match="in_features: NVFP4 g16 needs a multiple of 16"):
        FloatFormat("nvfp4").groups(40)
    with pytest.raises(ValueError, match=r"format key: expected \[bits, group_size, symmetric\] or \[kind\]"):
        weight_format_from_key([4, 128])
    with pytest.raises(ValueError, match="kind: expected one of"):
        ActivationFormat("fp16")


def test_nvfp4_global_scale_is_generate_gparam(gen):
    from compressed_tensors.quantization.utils import generate_gparam

    for amax in (torch.rand(1, generator=gen) * 3, torch.tensor([1e-30]), torch.tensor([7.25e4])):
        ours = nvfp4_global_scale(amax)
        assert ours.dtype == torch.float32 and ours.shape == (1,)
        assert torch.equal(ours, generate_gparam(-amax, amax)), amax
        assert torch.equal(ours, fref.global_scale_ref(amax))
    assert nvfp4_global_scale(0.0).item() == 1.0  # all zero: 1, as the format core's
    w = torch.randn(64, 64, generator=gen)
    assert torch.equal(ops.quantize_float(w, FloatFormat("nvfp4")).global_scale, nvfp4_global_scale(w.abs().max()))


def test_presets_match_compressed_tensors_schemes():
    """Every preset's weights and input activations, as written to config.json, validate as compressed-tensors'
    QuantizationArgs equal to its own preset's (observers aside: ours say what the solver did)."""
    from compressed_tensors.quantization import QuantizationArgs

    keys = ("num_bits", "type", "symmetric", "strategy", "group_size", "block_structure", "dynamic")
    for name, ct in CT_PRESET.items():
        p, theirs = preset(name), _ct_scheme(ct)
        ours = QuantizationArgs.model_validate(weights_args(WeightsConfig(p.weights, activations=p.activations)))
        assert {k: getattr(ours, k) for k in keys} == {k: getattr(theirs.weights, k) for k in keys}, name
        if p.activations is None:
            assert theirs.input_activations is None, name
        else:
            a = QuantizationArgs.model_validate(p.activations.args())
            assert {k: getattr(a, k) for k in keys} == {k: getattr(theirs.input_activations, k) for k in keys}, name
    assert preset("fp8_dynamic") is PRESETS["FP8"] and preset("int8") is PRESETS["W8A8"]
    with pytest.raises(ValueError, match="preset: expected one of W4A16, .*, got 'FP4'"):
        preset("FP4")


def test_compression_formats():
    fmts = {name: p.format for name, p in PRESETS.items()}
    assert fmts == {"W4A16": "pack-quantized", "W8A16": "pack-quantized", "W8A8": "int-quantized",
                    "FP8": "float-quantized", "FP8_BLOCK": "float-quantized", "NVFP4": "nvfp4-pack-quantized",
                    "NVFP4A16": "nvfp4-pack-quantized", "MXFP4": "mxfp4-pack-quantized",
                    "MXFP4A16": "mxfp4-pack-quantized", "MXFP6A16": "mxfp6-pack-quantized",
                    "MXFP6A8": "mxfp6-pack-quantized", "MXFP8A16": "mxfp8-quantized", "MXFP8": "mxfp8-quantized"}
    for w, a in ((FloatFormat("fp8"), None), (IntFormat(4, 128), ActivationFormat("int8_token")),
                 (FloatFormat("nvfp4"), ActivationFormat("mxfp4")),
                 (IntFormat(8, 128), ActivationFormat("int8_token"))):
        with pytest.raises(ValueError, match="cannot go with"):
            compression_format(w, a)


# ---- the recipe ---------------------------------------------------------------------------------------------------
def test_preset_fills_and_checks_the_fields_it_fixes():
    s = QuantScheme.from_preset("nvfp4", method="rtn")
    assert (s.preset, s.bits, s.group_size, s.symmetric, s.scale_search) == ("NVFP4", 4, 16, True, "minmax")
    assert s.format == FloatFormat("nvfp4") and s.activations == ActivationFormat("nvfp4")
    assert s.describe() == "NVFP4 rtn" and QuantScheme.from_dict(s.to_dict()) == s
    assert QuantScheme(preset="FP8_DYNAMIC", method="rtn").preset == "FP8"  # the constructor fills defaults too
    w8 = QuantScheme.from_dict("W8A16")  # the integer weight-only presets are their fields
    assert (w8.preset, w8.bits, w8.group_size, w8.format, w8.activations) == (None, 8, 128, IntFormat(8, 128), None)
    w8a8 = QuantScheme.from_preset("W8A8", scale_search="mse")
    assert w8a8.format == IntFormat(8, -1, True) and w8a8.activations.kind == "int8_token"
    for bad, match in (({"preset": "NVFP4", "group_size": 32}, "group_size: expected 16 with preset NVFP4"),
                       ({"preset": "NVFP4", "scale_search": "mse"}, "scale_search: expected 'minmax' with preset"),
                       ({"preset": "W4A16", "group_size": 64}, "group_size: expected 128 with preset W4A16"),
                       ({"preset": "FP4"}, "preset: expected one of"), ({"preset": 4}, "preset: expected one of"),
                       ({"preset": "MXFP4", "method": "rtn", "rounding_passes": 1}, "rounding_passes: expected 0")):
        with pytest.raises(ValueError, match=match):
            QuantScheme.from_dict(bad)
    with pytest.raises(ValueError, match="bits: expected 8 with preset FP8"):
        QuantScheme(preset="FP8", bits=3)


def test_override_presets_and_replace_resets_the_fixed_fields():
    r = Recipe.from_dict({"scheme": {"preset": "NVFP4", "method": "rtn"},
                          "overrides": [{"pattern": "re:.*self_attn\\.", "scheme": "FP8"},
                                        {"pattern": "re:.*shared_expert\\.", "scheme": {"preset": None, "bits": 8}},
                                        {"pattern": "re:model\\.layers\\.0\\.", "skip": True}]})
    assert r.resolve("model.layers.1.self_attn.q_proj").describe() == "FP8 rtn"
    assert r.resolve("model.layers.1.mlp.experts.0.up_proj").describe() == "NVFP4 rtn"
    sh = r.resolve("model.layers.1.mlp.shared_expert.up_proj")  # preset null: the defaults of the fixed fields
    assert (sh.preset, sh.bits, sh.group_size, sh.scale_search) == (None, 8, 128, "mse")
    assert r.resolve("model.layers.0.mlp.experts.0.up_proj") is None
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()
    base = QuantScheme(bits=3, group_size=64, scale_search="minmax", method="rtn")
    assert base.replace(preset="W8A16").scale_search == "minmax"  # W8A16 does not fix the scale search
    assert (base.replace(preset="MXFP4").group_size, base.replace(preset="MXFP4").scale_search) == (32, "minmax")
    with pytest.raises(ValueError, match="bits: expected 4 with preset NVFP4"):
        r.scheme.replace(bits=8)
    with pytest.raises(ValueError, match=r"overrides\['re:.\*'\].scheme.bits: expected 4 with preset NVFP4 \(the "
                                         r"preset fixes it\), got 8; .* \(the base scheme is NVFP4\)"):
        Recipe.from_dict({"scheme": "NVFP4", "overrides": [{"pattern": "re:.*", "scheme": {"bits": 8}}]})
    with pytest.raises(ValueError, match="overrides.scheme: expected a mapping of QuantScheme fields"):
        Override("x", scheme=3)


def test_recipe_checks_methods_and_awq_against_the_formats():
    r = Recipe.from_dict({"scheme": "NVFP4"})  # the default method, GPTQ, solves every format
    assert r.scheme.describe() == "NVFP4 gptq act-order"

    class IntOnly(Solver):
        name = "intonly"

    reg = default_solvers().with_solver(IntOnly())
    Recipe.from_dict({"scheme": {"method": "intonly"}}, solvers=reg)
    with pytest.raises(ValueError, match=r"scheme.method: expected a method that solves FP8 block 128x128 weights "
                                         r"\(gptq, rtn\), got 'intonly'"):
        Recipe.from_dict({"scheme": {"preset": "FP8_BLOCK", "method": "intonly"}}, solvers=reg)
    with pytest.raises(ValueError, match=r"overrides\['re:.\*'\].scheme.method: expected a method that solves"):
        Recipe.from_dict({"scheme": {"method": "intonly"}, "overrides": [{"pattern": "re:.*", "scheme": "MXFP4"}]},
                         solvers=reg)
    with pytest.raises(ValueError, match="awq.enabled: expected false with the MXFP4 scheme of scheme"):
        Recipe.from_dict({"scheme": "MXFP4", "awq": {"enabled": True}})
    with pytest.raises(ValueError, match="scheme: expected a QuantScheme, a mapping or a preset name"):
        Recipe.from_dict({"scheme": 4})


def test_cli_flags_apply_the_preset_first():
    r = Recipe.from_cli(None, scheme="FP8_BLOCK", method="rtn")
    assert r.scheme.preset == "FP8_BLOCK" and r.scheme.method == "rtn" and r.scheme.act_order  # others kept
    assert Recipe.from_cli(None, scheme="W8A16", group_size=-1).scheme.describe() == \
        "W8 per-channel sym gptq act-order mse"
    with pytest.raises(ValueError, match="bits: expected 4 with preset MXFP4"):
        Recipe.from_cli(None, scheme="MXFP4", bits=8)


# ---- tensors: compressed-tensors decompresses exactly our dequantized weights --------------------------------------
def _quantized(name: str, w: torch.Tensor):
    p = preset(name)
    if isinstance(p.weights, FloatFormat):
        qt = ops.quantize_float(w, p.weights, scale_dtype=torch.bfloat16)
        if p.activations is not None and p.activations.static_global_scale:
            qt.input_global_scale = nvfp4_global_scale(torch.tensor(3.5))
        return qt
    qt = ops.quantize_rtn(w, p.weights.bits, p.weights.group_size, True, scale_dtype=torch.bfloat16)
    qt.format = p.weights  # per-channel as the pipeline keeps it (-1)
    return qt


@pytest.mark.parametrize("name", list(PRESETS))
@pytest.mark.parametrize("shape", [(200, 256), (44, 384)])  # rows not a multiple of 8 / 128: partial FP8 blocks
def test_tensors_decompress_exactly_through_compressed_tensors(name, shape, gen):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    w = (torch.randn(*shape, generator=gen) * 0.05).to(torch.bfloat16)
    w[3] *= 40  # a row of outliers
    p = preset(name)
    qt = _quantized(name, w)
    prefix = "model.layers.0.mlp.experts.3.gate_proj"
    t = compressed_tensor_names(prefix, qt, torch.bfloat16, p.format, p.activations)
    out_f, in_f = shape
    expect = {"pack-quantized": {"weight_packed": (torch.int32, (out_f, in_f * p.weights.bits // 32)),
                                 "weight_scale": (torch.bfloat16, (out_f, in_f // 128)),
                                 "weight_shape": (torch.int64, (2,))},
              "int-quantized": {"weight": (torch.int8, shape), "weight_scale": (torch.bfloat16, (out_f, 1))},
              "float-quantized": {"weight": (torch.float8_e4m3fn, shape),
                                  "weight_scale": (torch.bfloat16, (out_f, 1) if name == "FP8" else
                                                   (math.ceil(out_f / 128), math.ceil(in_f / 128)))},
              "nvfp4-pack-quantized": {"weight_packed": (torch.uint8, (out_f, in_f // 2)),
                                       "weight_scale": (torch.float8_e4m3fn, (out_f, in_f // 16)),
                                       "weight_global_scale": (torch.float32, (1,)),
                                       **({"input_global_scale": (torch.float32, (1,))} if name == "NVFP4" else {})},
              "mxfp4-pack-quantized": {"weight_packed": (torch.uint8, (out_f, in_f // 2)),
                                       "weight_scale": (torch.uint8, (out_f, in_f // 32))},
              "mxfp6-pack-quantized": {"weight_packed": (torch.uint8, (out_f, in_f * 3 // 4)),
                                       "weight_scale": (torch.uint8, (out_f, in_f // 32))},
              "mxfp8-quantized": {"weight": (torch.float8_e4m3fn, shape),
                                  "weight_scale": (torch.uint8, (out_f, in_f // 32))}}[p.format]
    assert {k[len(prefix) + 1:]: (v.dtype, tuple(v.shape)) for k, v in t.items()} == expect
    block = quantization_config_block([(["Linear"], WeightsConfig(p.weights, activations=p.activations))], ["lm_head"])
    scheme = QuantizationConfig.model_validate(block).config_groups["group_0"]
    local = {k[len(prefix) + 1:]: v for k, v in t.items()}
    dense = BaseCompressor.get_value_from_registry(block["config_groups"]["group_0"]["format"]).decompress(
        dict(local), scheme)["weight"]
    assert dense.dtype == torch.bfloat16
    assert torch.equal(dense, qt.dequantized.to(torch.bfloat16)), f"{name}: compressed-tensors decompresses otherwise"
    ours = decompress(t.__getitem__, prefix, p.weights, p.format)  # moequant's own reader
    assert torch.equal(ours.to(torch.bfloat16), dense)


def test_tensor_errors_name_the_module(gen):
    w = torch.randn(32, 64, generator=gen).to(torch.bfloat16)
    fp8 = ops.quantize_float(w, FloatFormat("fp8"), scale_dtype=torch.float32)
    with pytest.raises(ValueError, match="x: scales are not exactly representable in torch.bfloat16"):
        compressed_tensor_names("x", fp8, torch.bfloat16, "float-quantized")
    nv = ops.quantize_float(w, FloatFormat("nvfp4"))
    with pytest.raises(ValueError, match="x: input_global_scale: expected a float32 tensor of one element"):
        compressed_tensor_names("x", nv, torch.bfloat16, activations=ActivationFormat("nvfp4"))
    with pytest.raises(ValueError, match="x: a NVFP4 g16 weight cannot be stored as 'float-quantized'"):
        compressed_tensor_names("x", nv, torch.bfloat16, "float-quantized")
    w4 = ops.quantize_rtn(w, 4, 64, True, scale_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="x: int-quantized stores int8 symmetric per-channel weights"):
        compressed_tensor_names("x", w4, torch.bfloat16, "int-quantized")
    with pytest.raises(ValueError, match="activations: none cannot go with FP8 per-channel weights"):
        compressed_tensor_names("x", fp8, torch.bfloat16)


def test_config_block_groups_and_mixed_precision():
    from compressed_tensors.quantization import QuantizationConfig

    groups = [(["Linear"], WeightsConfig(FloatFormat("nvfp4"), activations=ActivationFormat("nvfp4"))),
              (["model.layers.1.self_attn.q_proj"], WeightsConfig(FloatFormat("fp8"), "minmax", "weight",
                                                                  ActivationFormat("fp8_token"))),
              (["model.layers.1.mlp.gate_proj"], WeightsConfig(IntFormat(4, 128), "mse", "weight"))]
    block = quantization_config_block(groups, ["lm_head"])
    assert block["format"] == "mixed-precision"
    assert [g["format"] for g in block["config_groups"].values()] == ["nvfp4-pack-quantized", "float-quantized",
                                                                      "pack-quantized"]
    QuantizationConfig.model_validate(block)
    parsed = config_groups(block)
    assert [(g.format, g.activations, g.compression) for g in parsed] == [
        (FloatFormat("nvfp4"), ActivationFormat("nvfp4"), "nvfp4-pack-quantized"),
        (FloatFormat("fp8"), ActivationFormat("fp8_token"), "float-quantized"),
        (IntFormat(4, 128), None, "pack-quantized")]
    assert group_of("model.layers.1.self_attn.q_proj", parsed).name == "group_1"
    assert group_of("model.layers.1.mlp.experts.0.up_proj", parsed).name == "group_0"
    assert quantization_config_block(groups[:1], [])["format"] == "nvfp4-pack-quantized"
    bad = {"config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 6, "type": "float",
                                                                        "group_size": 16, "strategy": "group"}}}}
    with pytest.raises(ValueError, match="group 'g' has weights moequant does not read"):
        config_groups(bad)
    # the MX formats of compressed-tensors 0.20 read back; FP8 in groups of 32 only with E8M0 (uint8) scales
    mx = quantization_config_block([(["Linear"], FloatFormat("mxfp6")), (["re:.*self_attn.*"], FloatFormat("mxfp8"))],
                                   [])
    QuantizationConfig.model_validate(mx)
    assert [(g.format, g.compression) for g in config_groups(mx)] == [
        (FloatFormat("mxfp6"), "mxfp6-pack-quantized"), (FloatFormat("mxfp8"), "mxfp8-quantized")]
    del mx["config_groups"]["group_1"]["weights"]["scale_dtype"]
    with pytest.raises(ValueError, match="group 'group_1' has weights moequant does not read"):
        config_groups(mx)


# ---- ops and solvers ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", FLOAT_KINDS)
def test_quantize_float_equals_the_reference_and_slices_rows(kind, gen):
    fmt = FloatFormat(kind)
    w = torch.randn(260, 160, generator=gen) * 0.1
    qt = ops.quantize_float(w, fmt, scale_dtype=torch.bfloat16)
    r = fref.quantize_ref(w, _spec(fmt, torch.bfloat16))
    assert torch.equal(qt.codes, r.codes) and torch.equal(qt.scale, r.scales) and torch.equal(qt.scale_codes,
                                                                                                r.scale_codes)
    assert torch.equal(qt.dequantized, r.dequantized)
    assert (qt.global_scale is not None) == (kind == "nvfp4") and qt.zero_point is None
    cut = 128 if kind == "fp8_block" else 37
    a, b = qt.rows(slice(0, cut)), qt.rows(slice(cut, None))
    assert torch.equal(torch.cat([a.dequantized, b.dequantized]), qt.dequantized)
    a.values = b.values = None  # recomputed from the codes and scales
    assert torch.equal(torch.cat([a.dequantized, b.dequantized]), qt.dequantized)
    if kind == "fp8_block":
        with pytest.raises(ValueError, match="rows: an FP8-block matrix is cut only at a multiple of 128 rows"):
            qt.rows(slice(0, 100))


@pytest.mark.parametrize("name", ["FP8", "FP8_BLOCK", "NVFP4", "MXFP4", "MXFP6A16", "MXFP8A16", "W8A8"])
def test_solvers_dispatch_on_the_format(name, gen, make_hessian):
    w = torch.randn(48, 256, generator=gen).to(torch.bfloat16)
    h = make_hessian(256, 512, gen).float()
    s = QuantScheme.from_preset(name, method="rtn")
    rtn = solve_matrix(w, None, s, torch.bfloat16)
    assert rtn.format == s.format
    if isinstance(s.format, FloatFormat):
        assert torch.equal(rtn.codes, ops.quantize_float(w, s.format, scale_dtype=torch.bfloat16).codes)
    g = s.replace(method="gptq")
    q = solve_matrix(w, h, g, torch.bfloat16)
    assert q.format == s.format and q.loss is not None and q.loss > 0
    if isinstance(s.format, FloatFormat):
        d = ops.gptq_quantize_format(w, h, s.format.core(torch.bfloat16), act_order=True, damp=g.damp)
        assert torch.equal(q.codes, d.codes) and q.loss == d.loss
    err = lambda qt: float(((w.float() - qt.dequantized) @ h * (w.float() - qt.dequantized)).sum())  # noqa: E731
    assert err(q) < err(rtn)


def test_nvfp4_partners_share_one_global_scale(gen):
    gate, up = torch.randn(32, 64, generator=gen), torch.randn(32, 64, generator=gen) * 3
    g = shared_global_scale([gate, up])
    stacked = ops.quantize_float(torch.cat([gate, up]), FloatFormat("nvfp4"))
    assert torch.equal(g, stacked.global_scale)
    s = QuantScheme.from_preset("NVFP4A16", method="rtn")
    a, b = (solve_matrix(x, None, s, torch.float32, g) for x in (gate, up))
    assert torch.equal(a.global_scale, b.global_scale)
    assert torch.equal(torch.cat([a.dequantized, b.dequantized]), stacked.dequantized)


def test_accumulator_tracks_the_largest_input(gen):
    acc = ops.HessianAccumulator(3, 8)
    x = torch.randn(10, 8, generator=gen)
    ids = torch.tensor([0, 0, 2, 2, 2, 0, 2, 0, 0, 2], dtype=torch.int32)
    acc.add(x.to(torch.bfloat16), ids)
    want = torch.stack([x.to(torch.bfloat16).float()[ids == e].abs().max() if (ids == e).any() else torch.tensor(0.)
                        for e in range(3)])
    assert torch.equal(acc.absmax, want) and acc.absmax[1] == 0
    other = ops.HessianAccumulator(3, 8)
    other.add(torch.full((1, 8), 100.0), torch.tensor([1], dtype=torch.int32))
    acc.merge(other)
    assert acc.absmax.tolist() == [want[0].item(), 100.0, want[2].item()]
    acc.add(torch.zeros(0, 8), torch.zeros(0, dtype=torch.int32))  # no rows: nothing changes
    assert acc.absmax[1] == 100.0


def test_experts_without_tokens_take_the_layers_input_scale(caplog):
    s = QuantScheme.from_preset("NVFP4", method="rtn")
    recipe = Recipe(scheme=s)
    w = torch.randn(16, 32)

    def q(scale):
        qt = ops.quantize_float(w, FloatFormat("nvfp4"))
        qt.input_global_scale = None if scale is None else torch.tensor([scale])
        return qt

    e = "model.layers.2.mlp.experts"
    results = {f"{e}.0.gate_proj": q(200.0), f"{e}.1.gate_proj": q(150.0), f"{e}.2.gate_proj": q(None),
               f"{e}.2.down_proj": q(None), f"{e}.0.down_proj": q(90.0), "model.layers.2.self_attn.q_proj": q(None)}
    with caplog.at_level(logging.WARNING):
        complete_input_scales(results, recipe)
    assert results[f"{e}.2.gate_proj"].input_global_scale.item() == 150.0  # the largest |x| of the layer's gates
    assert results[f"{e}.2.down_proj"].input_global_scale.item() == 90.0
    assert results["model.layers.2.self_attn.q_proj"].input_global_scale.item() == 1.0
    assert "saw no calibration input (e.g. model.layers.2.self_attn.q_proj)" in caplog.text


# ---- loader rules -------------------------------------------------------------------------------------------------
def test_loader_rules_of_the_formats():
    fam = detect_family("qwen3_moe")
    e = "model.layers.1.mlp.experts.{}.{}"
    attn = "model.layers.1.self_attn.q_proj"

    def support(expert_scheme, shape=(128, 128), attn_scheme=None):
        s = {e.format(i, p): ModuleScheme.of(expert_scheme, shape) for i in range(2) for p in ("gate_proj", "up_proj",
                                                                                             "down_proj")}
        s[attn] = ModuleScheme.of(attn_scheme or expert_scheme, (128, 128))
        return loader_support(fam, s)

    def scheme(name):
        return QuantScheme.from_preset(name, method="rtn")

    for name in ("MXFP4A16", "W4A16", "FP8"):
        assert support(scheme(name))[0].loads, name
    assert support(scheme("FP8_BLOCK"))[0].loads and not support(scheme("FP8_BLOCK"), (256, 128))[0].loads
    for name, why in (("NVFP4", "without their global scale"), ("NVFP4A16", "issue #48371"),
                      ("W8A8", "no loader for int-quantized experts")):
        tf = support(scheme(name))[0]
        assert not tf.loads and why in tf.reasons[0], name
    tf = support(scheme("MXFP4A16"), attn_scheme=scheme("FP8"))[0]
    assert tf.loads and "fake-quantizes the inputs of the dense Linears (A8 FP8 per-token)" in tf.reasons[0]
    vl = support(scheme("NVFP4"))[1]
    assert vl.loads and not vl.tested and "CUTLASS FP4" in vl.reasons[0]
    assert support(FloatFormat("mxfp4"))[0].loads  # a bare weight format: weight-only
    # MX6 / MX8: transformers reads MXFP6 experts, not MXFP8 ones; vLLM is known to read MXFP8 W8A8 only
    assert support(scheme("MXFP6A16"))[0].loads and support(scheme("MXFP6A16"), attn_scheme=scheme("MXFP8A16"))[0].loads
    for name in ("MXFP8A16", "MXFP8"):
        tf = support(scheme(name))[0]
        assert not tf.loads and "E8M0 scale bytes" in tf.reasons[0], name
    for name in ("MXFP6A16", "MXFP6A8", "MXFP8A16"):
        vl = support(scheme(name))[1]
        assert not vl.loads and "no vLLM compressed-tensors scheme" in vl.reasons[0], name
    vl = support(scheme("MXFP8"))[1]
    assert vl.loads and "PR #38815" in vl.reasons[0]


def test_linears_get_the_global_scales_of_their_weights_and_inputs(gen):
    """quantize_linears on a captured attention: q / k / v (one shared input, one accumulator) share the NVFP4 global
    scale of their joint |w| maximum; o_proj keeps its own; every input_global_scale is compressed-tensors'
    generate_gparam of the largest |x| its accumulator saw."""
    from types import SimpleNamespace

    from compressed_tensors.quantization.utils import generate_gparam

    from moequant.pipeline.jobs import quantize_linears

    torch.manual_seed(0)
    p = "model.layers.0.self_attn."
    lins = {p + n: torch.nn.Linear(64, o, bias=False) for n, o in (("q_proj", 64), ("k_proj", 32), ("v_proj", 32),
                                                                 ("o_proj", 64))}
    with torch.no_grad():
        lins[p + "k_proj"].weight.mul_(5)  # the partners' maximum is k's
    shared, own = ops.HessianAccumulator(1, 64), ops.HessianAccumulator(1, 64)
    x, y = torch.randn(40, 64, generator=gen) * 2, torch.randn(30, 64, generator=gen)
    shared.add(x, torch.zeros(40, dtype=torch.int32))
    own.add(y, torch.zeros(30, dtype=torch.int32))
    accs = {p + "q_proj": shared, p + "k_proj": shared, p + "v_proj": shared, p + "o_proj": own}
    capture = SimpleNamespace(linears=SimpleNamespace(modules=lins, accumulators=accs))
    weights = {n: m.weight.detach().clone() for n, m in lins.items()}
    res, _ = quantize_linears(capture, detect_family("qwen3_moe"), Recipe.from_dict({"scheme": "NVFP4"}), torch.float32)
    g = shared_global_scale([weights[p + n] for n in ("q_proj", "k_proj", "v_proj")])
    for n in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(res[p + n].global_scale, g), n
        assert torch.equal(res[p + n].input_global_scale, generate_gparam(-x.abs().max()[None], x.abs().max()[None]))
    assert torch.equal(res[p + "o_proj"].global_scale, nvfp4_global_scale(weights[p + "o_proj"].abs().max()))
    assert not torch.equal(res[p + "o_proj"].global_scale, g)
    assert torch.equal(res[p + "o_proj"].input_global_scale, generate_gparam(-y.abs().max()[None], y.abs().max()[None]))


def test_fp8_blocks_never_straddle_gate_and_up(tmp_path):
    """Experts of width 64: an FP8 block of the stacked [2I, H] gate+up matrix would hold rows of both, so gate and up
    are solved apart, each with its own blocks (the checkpoint equals RTN of each source matrix alone)."""
    from safetensors import safe_open

    from testdata import tiny_qwen3_checkpoint

    from moequant import pipeline

    src = tiny_qwen3_checkpoint(tmp_path / "m", moe_intermediate_size=64)
    recipe = Recipe.from_dict({"scheme": {"preset": "FP8_BLOCK", "method": "rtn"},
                               "calibration": {"num_samples": 2, "seq_len": 16}})
    ids = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(3))
    pipeline.quantize(src, recipe, calibration=ids, output_dir=tmp_path / "q", progress=False)
    with safe_open(str(next(src.glob("*.safetensors"))), "pt") as f, \
            safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as g:
        for proj in ("gate_proj", "up_proj"):
            name = f"model.layers.0.mlp.experts.1.{proj}"
            want = ops.quantize_float(f.get_tensor(name + ".weight"), FloatFormat("fp8_block"))
            assert torch.equal(g.get_tensor(name + ".weight").view(torch.uint8), want.codes), proj
            assert torch.equal(g.get_tensor(name + ".weight_scale").float(), want.scale), proj


def test_preflight_names_formats_that_do_not_fit(tmp_path):
    from testdata import tiny_qwen3_checkpoint

    from moequant import pipeline

    src = tiny_qwen3_checkpoint(tmp_path / "m", moe_intermediate_size=48)  # down_proj: 48 input columns
    ids = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(3))

    def run(recipe: dict):
        pipeline.quantize(src, Recipe.from_dict({**recipe, "calibration": {"num_samples": 2, "seq_len": 16}}),
                          calibration=ids, output_dir=tmp_path / "q", progress=False)

    with pytest.raises(ValueError, match=r"preset: MXFP4 quantizes groups of 32 input columns, which do not divide "
                                         r"in_features=48 of model\.layers\.0\.mlp\.experts\.0\.down_proj"):
        run({"scheme": "MXFP4"})
    with pytest.raises(ValueError, match=r"routed experts resolve to different schemes \(model\.layers\.0\.mlp\."
                                         r"experts\.0\.gate_proj: NVFP4A16; model\.layers\.0\.mlp\.experts\.1\."
                                         r"gate_proj: NVFP4\)"):
        run({"scheme": "NVFP4", "overrides": [{"pattern": "*.experts.0.*", "scheme": "NVFP4A16"}]})
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.partial").exists()


@pytest.mark.parametrize("kind", ["fp8_token", "fp8_group", "nvfp4", "mxfp4", "mxfp8", "int8_token"])
def test_activation_formats_quantize_inputs_token_by_token(kind, gen):
    """The seam of activation simulation: ActivationFormat.core() applied to an input [tokens, in] quantizes each
    token (row) on its own, NVFP4 with the module's static input global scale."""
    x = torch.randn(6, 256, generator=gen) * torch.logspace(-2, 2, 6)[:, None]
    fmt = ActivationFormat(kind).core()
    g = nvfp4_global_scale(x.abs().max()) if kind == "nvfp4" else None
    whole = ops.format_quantize(x, fmt, g)
    for t in range(6):
        one = ops.format_quantize(x[t:t + 1], fmt, g)
        assert torch.equal(one.dequantized, whole.dequantized[t:t + 1]), t
    cols = {"fp8_token": 1, "fp8_group": 2, "nvfp4": 16, "mxfp4": 8, "mxfp8": 8, "int8_token": 1}[kind]
    assert tuple(whole.scales.shape) == (6, cols)
    if kind == "fp8_token":
        assert torch.equal(whole.scales[:, 0], x.abs().amax(1) / 448)


def test_cli_scheme_flag(tmp_path, capsys):
    from testdata import tiny_qwen3_checkpoint

    from moequant import cli

    src = tiny_qwen3_checkpoint(tmp_path / "m")
    out = tmp_path / "q"
    args = ["-q", "quantize", str(src), "--out", str(out), "--calib", str(tmp_path / "m" / "calib.txt"),
            "--num-samples", "2", "--seq-len", "16"]
    (tmp_path / "m" / "calib.txt").write_text("the quick brown fox jumps over the lazy dog " * 40)
    assert cli.main(args + ["--scheme", "mxfp4a16", "--method", "rtn"]) == 0
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["format"] == "mxfp4-pack-quantized"
    assert json.loads((out / "moequant_recipe.json").read_text())["scheme"]["preset"] == "MXFP4A16"
    capsys.readouterr()
    for bad, why in ((["--scheme", "NVFP5"], "argument --scheme: expected one of W4A16"),
                     (["--scheme", "FP8", "--group-size", "64"], "group_size: expected -1 with preset FP8")):
        assert cli.main(args[:4] + [str(tmp_path / "q2")] + args[5:] + bad) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("moequant: error:") and why in err[0], err


def test_resume_after_a_crash_is_bit_identical(tmp_path):
    """The work directory keeps the floating-point results (codes, scale bytes, global and input global scales): a
    run of mixed schemes interrupted after layer 0 and resumed writes exactly the uninterrupted run's checkpoint."""
    from checkpoints import assert_resume_bit_identical
    from family_checkpoints import CALIB_TEXT, family_checkpoint

    src = family_checkpoint("qwen3_moe", tmp_path / "models")
    recipe = Recipe.from_dict({"scheme": "NVFP4", "overrides": [{"pattern": "re:.*\\.self_attn\\.", "scheme": "FP8"},
                                                                {"pattern": "re:.*\\.mlp\\.(gate|up|down)_proj",
                                                                 "scheme": "MXFP4A16"}],
                               "calibration": {"num_samples": 4, "seq_len": 32, "batch_size": 4}})
    t = assert_resume_bit_identical(str(src), recipe, tmp_path, calibration=str(CALIB_TEXT))
    assert any(k.endswith("input_global_scale") for k in t) and any(k.endswith(".weight") and t[k].dtype ==
                                                                    torch.float8_e4m3fn for k in t)
