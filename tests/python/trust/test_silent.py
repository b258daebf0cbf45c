"""Silent wrong results the pipeline must never produce (issue #11): an expert without calibration data destroyed
by GPTQ, and a quantization_config that misdescribes the run."""
from __future__ import annotations

import json

import pytest
import torch

from checkpoints import checkpoint_tensors
from testdata import tiny_qwen3_checkpoint

from moequant import pipeline
from moequant.io.exported import load_model
from moequant.recipe import Recipe


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("tiny") / "m", num_experts=8)


@pytest.mark.parametrize("policy", ["mean", "identity", "rtn", "shrink"])
def test_experts_without_tokens_are_never_zeroed_whatever_min_tokens(tiny, tmp_path, policy):
    # 2 tokens, top-2 of 8 experts: at most 4 experts of a layer see a token, the others none. min_tokens 0 used to
    # send their all-zero Hessian to GPTQ, which zeroes every column (dead columns) and reported no fallback.
    recipe = Recipe.from_dict({"scheme": {"group_size": 32}, "fallback": {"min_tokens": 0, "policy": policy},
                               "calibration": {"num_samples": 1, "seq_len": 2}})
    ids = torch.tensor([[17, 4242]])
    report = pipeline.quantize(tiny, recipe, calibration=ids, output_dir=tmp_path / "q", progress=False)
    model = load_model(tmp_path / "q", dtype=torch.float32)
    src = checkpoint_tensors(tiny)
    checked = 0
    for layer in report.layers:
        records = {m.name: m for m in layer.modules}
        for e, tokens in enumerate(layer.expert_tokens):
            if tokens:
                continue
            checked += 1
            rec = records[f"{layer.prefix}.mlp.experts.{e}.gate_proj+up"]
            assert rec.fallback is not None, f"expert {e} of layer {layer.index} saw no token but reports no fallback"
            experts = model.model.layers[layer.index].mlp.experts
            for w, name in ((experts.gate_up_proj[e], "gate_proj"), (experts.down_proj[e], "down_proj")):
                original = src[f"{layer.prefix}.mlp.experts.{e}.{name}.weight"].float()
                assert w.abs().sum() > 0, f"expert {e} {name} of layer {layer.index} was zeroed"
                if name == "down_proj":
                    # any of the fallbacks stays close to the original weight (W4 g32: well under 30% error)
                    assert (w - original).norm() / original.norm() < 0.3
    assert checked > 0, "the calibration reached every expert: the test would not exercise starved experts"


@pytest.mark.parametrize("scheme, observer, actorder", [
    ({}, "mse", "weight"),
    ({"method": "rtn"}, "mse", None),
    ({"scale_search": "minmax", "act_order": False}, "minmax", None),
])
def test_quantization_config_describes_the_run(tiny, tmp_path, scheme, observer, actorder):
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.quantization import QuantizationConfig

    recipe = Recipe.from_dict({"scheme": {"group_size": 32, **scheme}, "calibration": {"num_samples": 2,
                                                                                      "seq_len": 16}})
    ids = torch.randint(0, 8000, (2, 16), generator=torch.Generator().manual_seed(0))
    pipeline.quantize(tiny, recipe, calibration=ids, output_dir=tmp_path / "q", progress=False)
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    weights = [g["weights"] for g in qc["config_groups"].values()]
    assert weights and all(w["observer"] == observer and w["actorder"] == actorder for w in weights), weights
    parsed = QuantizationConfig.model_validate(qc)  # compressed-tensors reads it as it is
    assert all(g.weights.symmetric for g in parsed.config_groups.values()), ct.__version__
