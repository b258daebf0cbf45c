"""The named floating-point schemes through the pipeline on a GPU (the CPU side: test_fp_schemes.py and
trust/test_loadable_formats.py).

* every scheme, RTN (the format kernels, kernels/src/format.cu) and GPTQ: the run on CUDA writes a checkpoint whose
  every quantized module decompresses, through compressed-tensors' own compressors, to exactly the weights of the
  same run's dequantized export, and that moequant's loader reads;
* the batched GPU format solver in the pipeline (GPTQSolver.float_batched, off by default until this and
  test_fp_gptq_cuda.py have passed): its scales and global scales equal the per-matrix route's bit for bit (they come
  from the weights alone), its codes agree at the batched int solver's policy (99 %);
* the accumulators' largest |x| on CUDA equals the CPU's.
"""
from __future__ import annotations

import json

import pytest
import torch

from checkpoints import checkpoint_tensors
from family_checkpoints import CALIB_TEXT, family_checkpoint

import moequant
from moequant import ops
from moequant.formats import config_groups, group_of
from moequant.io.exported import load_model
from moequant.methods.gptq.solver import GPTQSolver
from moequant.recipe import Recipe

pytestmark = pytest.mark.gpu

CALIBRATION = {"num_samples": 4, "seq_len": 64, "batch_size": 4}
CODES_MATCH = 0.99  # the batched int solver's policy (test_gptq_batched.py)


def _run(src, out, scheme: dict, export_format="pack-quantized"):
    recipe = Recipe.from_dict({"scheme": scheme, "calibration": CALIBRATION, "device": "cuda"})
    moequant.quantize(str(src), recipe, calibration=str(CALIB_TEXT), output_dir=out, progress=False,
                      export_format=export_format)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return family_checkpoint("qwen3_moe", tmp_path_factory.mktemp("fp-cuda"))


@pytest.mark.parametrize("method", ["rtn", "gptq"])
@pytest.mark.parametrize("preset", ["FP8", "FP8_BLOCK", "NVFP4", "MXFP4", "W8A8"])
def test_cuda_run_decompresses_exactly_through_compressed_tensors(model, tmp_path, preset, method):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    d, deq = tmp_path / "q", tmp_path / "deq"
    _run(model, d, {"preset": preset, "method": method})
    _run(model, deq, {"preset": preset, "method": method}, "dequantized")
    qcfg = json.loads((d / "config.json").read_text())["quantization_config"]
    ct, groups = QuantizationConfig.model_validate(qcfg), config_groups(qcfg)
    tensors, weights = checkpoint_tensors(d), checkpoint_tensors(deq)
    modules = sorted(n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale"))
    assert modules
    for m in modules:
        g = group_of(m, groups)
        local = {k[len(m) + 1:]: v for k, v in tensors.items()
                 if k.startswith(m + ".") and k.count(".") == m.count(".") + 1}
        dense = BaseCompressor.get_value_from_registry(g.compression).decompress(local, ct.config_groups[g.name])
        want = weights[f"{m}.weight"]
        assert torch.equal(dense["weight"].to(want.dtype), want), f"{preset} {method} {m}"
    with torch.no_grad():
        logits = load_model(d)(torch.arange(24)[None] + 5).logits
    assert bool(torch.isfinite(logits).all())


@pytest.mark.parametrize("preset", ["FP8_BLOCK", "NVFP4", "MXFP4"])
def test_batched_format_gptq_in_the_pipeline(model, tmp_path, preset, monkeypatch):
    runs = {}
    for batched in (False, True):
        monkeypatch.setattr(GPTQSolver, "float_batched", batched)
        d = tmp_path / f"b{batched}"
        _run(model, d, {"preset": preset, "method": "gptq"})
        runs[batched] = checkpoint_tensors(d)
    a, b = runs[False], runs[True]
    assert a.keys() == b.keys()
    first = [k for k in a if k.startswith("model.layers.0.mlp.experts.")]
    assert first
    same = total = 0
    for k in first:
        if k.endswith(("weight_scale", "weight_global_scale")):  # static: from the weights alone
            assert torch.equal(a[k], b[k]), k
        elif k.endswith(("weight_packed", ".weight")):
            x, y = a[k].view(torch.uint8), b[k].view(torch.uint8)
            same, total = same + int((x == y).sum()), total + x.numel()
    assert total and same / total >= CODES_MATCH, f"{preset}: {same / total:.4f} of the code bytes agree"


def test_accumulator_absmax_on_cuda_equals_the_cpu(gen):
    x = (torch.randn(300, 64, generator=gen) * 3).to(torch.bfloat16)
    ids = torch.randint(0, 5, (300,), generator=gen, dtype=torch.int32)
    ids[ids == 3] = 4  # expert 3 sees nothing
    cpu, gpu = ops.HessianAccumulator(5, 64), ops.HessianAccumulator(5, 64, device="cuda", precision="bf16")
    cpu.add(x, ids)
    gpu.add(x.cuda(), ids.cuda())
    assert torch.equal(gpu.absmax.cpu(), cpu.absmax) and cpu.absmax[3] == 0
