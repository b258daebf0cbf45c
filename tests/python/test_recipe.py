"""Recipe dataclasses: validation, resolution precedence, (de)serialization, CLI flag merging."""
from __future__ import annotations

import json

import pytest

from moequant.recipe import (DEFAULT_IGNORE, CalibrationConfig, FallbackConfig, Override, QuantScheme, Recipe,
                             match_pattern)

ATTN = "model.layers.3.self_attn.q_proj"
EXPERT = "model.layers.3.mlp.experts.7.gate_proj"


def test_defaults():
    s = QuantScheme()
    assert (s.bits, s.group_size, s.symmetric, s.method, s.scale_search, s.act_order) == \
        (4, 128, True, "gptq", "mse", True)  # symmetric: the format every loader reads (docs/export.md)
    assert (s.mse_grid, s.mse_min_shrink, s.mse_norm, s.damp, s.block_size) == (100, 0.2, 2.4, 0.1, 128)
    r = Recipe()
    assert r.version == 1 and r.hessian_dtype == "float32" and r.routing_weighted is False and r.device is None
    assert r.ignore == list(DEFAULT_IGNORE) and r.overrides == []
    assert (r.calibration.num_samples, r.calibration.seq_len, r.calibration.seed, r.calibration.batch_size) == \
        (128, 512, 0, 8)
    assert (r.fallback.min_tokens, r.fallback.policy) == (8, "mean")


def test_per_channel_none_is_minus_one():
    assert QuantScheme(group_size=None).group_size == -1
    assert QuantScheme(group_size=-1).per_channel


@pytest.mark.parametrize("kwargs, field", [
    ({"bits": 9}, "bits"), ({"bits": 1}, "bits"), ({"bits": 4.0}, "bits"), ({"bits": True}, "bits"),
    ({"group_size": 0}, "group_size"), ({"group_size": -2}, "group_size"), ({"symmetric": "yes"}, "symmetric"),
    ({"method": "awq"}, "method"), ({"scale_search": "l2"}, "scale_search"), ({"mse_grid": 0}, "mse_grid"),
    ({"mse_min_shrink": 0.0}, "mse_min_shrink"), ({"mse_min_shrink": 1.5}, "mse_min_shrink"),
    ({"mse_norm": float("nan")}, "mse_norm"), ({"act_order": 1}, "act_order"), ({"damp": 0}, "damp"),
    ({"damp": float("inf")}, "damp"), ({"block_size": 0}, "block_size"),
])
def test_scheme_validation_names_field_expected_and_actual(kwargs, field):
    with pytest.raises(ValueError) as info:
        QuantScheme(**kwargs)
    msg = str(info.value)
    assert msg.startswith(field + ":") and "expected" in msg and repr(next(iter(kwargs.values()))) in msg


def test_bits_error_has_remedy():
    with pytest.raises(ValueError, match=r"bits: expected an integer in \[2, 8\], got 9; use 4"):
        QuantScheme(bits=9)


@pytest.mark.parametrize("cls, kwargs, field", [
    (CalibrationConfig, {"num_samples": 0}, "calibration.num_samples"),
    (CalibrationConfig, {"seq_len": 1}, "calibration.seq_len"),
    (CalibrationConfig, {"seed": -1}, "calibration.seed"),
    (CalibrationConfig, {"batch_size": 0}, "calibration.batch_size"),
    (CalibrationConfig, {"text_files": [3]}, "calibration.text_files"),
    (FallbackConfig, {"policy": "zero"}, "fallback.policy"),
    (FallbackConfig, {"min_tokens": -1}, "fallback.min_tokens"),
    (Recipe, {"hessian_dtype": "float16"}, "hessian_dtype"),
    (Recipe, {"hessian_precision": "fp16"}, "hessian_precision"),
    (Recipe, {"hessian_dtype": "float64", "hessian_precision": "bf16"}, "hessian_precision"),
    (Recipe, {"device": "tpu"}, "device"),
    (Recipe, {"version": 2}, "version"),
    (Recipe, {"routing_weighted": "no"}, "routing_weighted"),
    (Recipe, {"ignore": ["re:("]}, "ignore[0]"),
])
def test_config_validation(cls, kwargs, field):
    with pytest.raises(ValueError, match="^" + field.replace("[", r"\[").replace("]", r"\]") + ": expected"):
        cls(**kwargs)


def test_calibration_single_path_becomes_list():
    assert CalibrationConfig(text_files="a.txt").text_files == ["a.txt"]


def test_device_values():
    for d in ("cpu", "cuda", "cuda:1", None):
        assert Recipe(device=d).device == d


def test_override_validation():
    with pytest.raises(ValueError, match="unknown key.*'bitz'.*known keys: bits, group_size"):
        Override("model.*", {"bitz": 8})
    with pytest.raises(ValueError, match=r"overrides\['x'\]\.bits: expected"):
        Override("x", {"bits": 12})
    with pytest.raises(ValueError, match="nothing when skip is true"):
        Override("x", {"bits": 8}, skip=True)
    with pytest.raises(ValueError, match="overrides.pattern"):
        Override("", None)
    with pytest.raises(ValueError, match="valid regular expression"):
        Override("re:[", None)


def test_match_pattern_glob_and_regex():
    assert match_pattern("model.layers.*.self_attn.*", ATTN)
    assert not match_pattern("model.layers.*.self_attn.*", EXPERT)
    assert match_pattern("lm_head", "lm_head") and not match_pattern("lm_head", "model.lm_head")
    assert match_pattern("re:.*mlp\\.gate$", "model.layers.0.mlp.gate")
    assert not match_pattern("re:.*mlp\\.gate$", "model.layers.0.mlp.gate_proj")
    assert not match_pattern("re:layers", "model.layers.0")  # re.match is anchored at the start
    assert not match_pattern("Model.*", "model.x")  # case-sensitive


def test_default_ignores():
    r = Recipe()
    for name in ("lm_head", "model.embed_tokens", "model.layers.0.mlp.gate", "model.layers.1.mlp.router",
                 "model.layers.2.mlp.shared_expert_gate"):
        assert r.resolve(name) is None, name
    for name in (ATTN, EXPERT, "model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.gate_proj"):
        assert r.resolve(name) == r.scheme, name


def test_resolve_last_matching_override_wins_and_is_not_merged():
    r = Recipe(overrides=[
        Override("model.layers.*", {"bits": 8, "symmetric": False}),
        Override("model.layers.*.self_attn.*", {"group_size": 64}),
        Override("re:model\\.layers\\.0\\.", skip=True),
    ])
    attn = r.resolve(ATTN)
    assert (attn.bits, attn.group_size, attn.symmetric) == (4, 64, True)  # last match only, on the base scheme
    ex = r.resolve(EXPERT)
    assert (ex.bits, ex.group_size, ex.symmetric) == (8, 128, False)
    assert r.resolve("model.layers.0.self_attn.q_proj") is None
    assert r.resolve("model.layers.10.self_attn.q_proj").group_size == 64
    r.overrides.reverse()  # order matters
    assert r.resolve("model.layers.0.self_attn.q_proj").bits == 8


def test_ignore_beats_overrides():
    r = Recipe(overrides=[Override("lm_head", {"bits": 8})])
    assert r.resolve("lm_head") is None


def test_empty_override_restores_base_scheme():
    r = Recipe(overrides=[Override("model.layers.*", skip=True), Override("model.layers.1.*")])
    assert r.resolve("model.layers.2.self_attn.q_proj") is None
    assert r.resolve("model.layers.1.self_attn.q_proj") == r.scheme


def _rich() -> Recipe:
    return Recipe(scheme=QuantScheme(bits=3, group_size=-1, symmetric=True, scale_search="mse", act_order=True),
                  ignore=["lm_head", "re:.*gate$"], overrides=[Override("x.*", {"bits": 8}), Override("y", skip=True)],
                  calibration=CalibrationConfig(text_files=["a.txt"], jsonl_files=["b.jsonl"], num_samples=4,
                                                seq_len=16, seed=3, batch_size=2),
                  fallback=FallbackConfig(min_tokens=2, policy="rtn"), hessian_dtype="float64",
                  routing_weighted=True, device="cuda:0", report_loss=False)


@pytest.mark.parametrize("suffix", [".json", ".yaml", ".yml"])
def test_save_load_roundtrip(tmp_path, suffix):
    r = _rich()
    path = tmp_path / ("recipe" + suffix)
    r.save(path)
    assert Recipe.load(path) == r
    assert Recipe.from_dict(r.to_dict()) == r
    if suffix == ".json":
        assert json.loads(path.read_text())["version"] == 1


def test_load_yaml_with_nested_dicts(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("scheme: {bits: 4, group_size: 128}\n"
                    "overrides:\n"
                    "  - pattern: 'model.layers.*.self_attn.*'\n"
                    "    scheme: {bits: 8}\n"
                    "  - pattern: 're:model\\.layers\\.0\\.'\n"
                    "    skip: true\n"
                    "calibration: {text_files: [calib.txt], num_samples: 64}\n")
    r = Recipe.load(path)
    assert r.resolve(ATTN).bits == 8 and r.resolve(EXPERT).bits == 4
    assert r.resolve("model.layers.0.mlp.experts.0.up_proj") is None
    assert r.calibration.num_samples == 64 and r.calibration.seq_len == 512
    assert r.ignore == list(DEFAULT_IGNORE)  # missing keys take defaults


def test_unknown_keys_list_known(tmp_path):
    with pytest.raises(ValueError, match=r"recipe: unknown key\(s\) 'bitz'; known keys: scheme, ignore"):
        Recipe.from_dict({"bitz": 4})
    with pytest.raises(ValueError, match=r"scheme: unknown key\(s\) 'nbits'; known keys: bits"):
        Recipe.from_dict({"scheme": {"nbits": 4}})
    with pytest.raises(ValueError, match=r"calibration: unknown key"):
        Recipe.from_dict({"calibration": {"files": []}})
    path = tmp_path / "r.json"
    path.write_text('{"fallback": {"policy": "mean", "x": 1}}')
    with pytest.raises(ValueError, match=r"recipe file .*r.json: fallback: unknown key\(s\) 'x'"):
        Recipe.load(path)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="recipe file .* not found"):
        Recipe.load(tmp_path / "missing.yaml")
    bad = tmp_path / "r.txt"
    bad.write_text("{}")
    with pytest.raises(ValueError, match="expected a .json, .yaml or .yml suffix"):
        Recipe.load(bad)
    bad = tmp_path / "r.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Recipe.load(bad)
    bad = tmp_path / "r.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping at the top level"):
        Recipe.load(bad)
    empty = tmp_path / "e.yaml"
    empty.write_text("")
    assert Recipe.load(empty) == Recipe()


def test_from_cli_flags_override_file(tmp_path):
    path = tmp_path / "r.yaml"
    _rich().save(path)
    r = Recipe.from_cli(str(path), bits=4, method="rtn", calib=["c.txt", "d.jsonl"], seq_len=32)
    assert (r.scheme.bits, r.scheme.method, r.scheme.symmetric, r.scheme.group_size) == (4, "rtn", True, -1)
    assert r.calibration.text_files == ["c.txt"] and r.calibration.jsonl_files == ["d.jsonl"]
    assert (r.calibration.seq_len, r.calibration.num_samples) == (32, 4)
    assert r.overrides == _rich().overrides and r.device == "cuda:0"
    r2 = Recipe.from_cli(None, symmetric=True, group_size=-1, device="cpu", num_samples=7)
    assert (r2.scheme.symmetric, r2.scheme.group_size, r2.device, r2.calibration.num_samples) == (True, -1, "cpu", 7)
    base = _rich()
    Recipe.from_cli(base, bits=8)
    assert base.scheme.bits == 3  # the base is not mutated
    assert Recipe.from_cli() == Recipe()
    with pytest.raises(ValueError, match="^bits: expected"):
        Recipe.from_cli(bits=16)


def test_kwargs_for_ops():
    s = QuantScheme(bits=3, scale_search="mse", act_order=True, damp=0.05)
    assert s.quant_kwargs() == {"bits": 3, "group_size": 128, "symmetric": True, "scale_search": "mse",
                                "mse_grid": 100, "mse_min_shrink": 0.2, "mse_norm": 2.4}
    g = s.gptq_kwargs()
    assert (g["act_order"], g["damp"], g["block_size"]) == (True, 0.05, 128)
    assert s.describe() == "W3 g128 sym gptq act-order mse"
    assert QuantScheme(group_size=-1, symmetric=True, method="rtn", scale_search="minmax").describe() == \
        "W4 per-channel sym rtn"
    assert QuantScheme(method="rtn", symmetric=False).describe() == "W4 g128 asym rtn mse"
