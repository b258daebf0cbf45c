"""FP8 KV cache (issue 14): the recipe's ``kv_cache: fp8`` calibrates ``k_scale`` / ``v_scale`` of every attention;
the scales equal a brute-force ``amax / 448`` over a plain forward of the quantized model through transformers' own
``DynamicCache`` (keys after ``k_norm`` and RoPE); the checkpoint stores them as compressed-tensors does
(``<attention>.k_scale`` ``[1]`` in the checkpoint dtype) with the ``kv_cache_scheme`` that compressed-tensors' own
parser accepts; plain transformers reloads it (and fake-quantizes the cache with our scales); ``moequant eval``
simulates the cache; a resumed run is bit-identical; the errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from checkpoints import assert_resume_bit_identical, checkpoint_tensors
from family_checkpoints import HELDOUT_TEXT, family_checkpoint

import moequant
from moequant import cli
from moequant.eval import SimulationPlan, load_model, simulation_of
from moequant.formats import quantization_config_block
from moequant.formats.kv_cache import check_kv_cache, kv_cache_kind, kv_cache_scheme_args, kv_scale
from moequant.io.exported import load_model as load_dequantized
from moequant.ops import fake_quantize_fp8
from moequant.recipe import Recipe
from moequant.ref import kv_scale_ref

CALIBRATION = {"num_samples": 4, "seq_len": 48, "batch_size": 2}
IDS = torch.randint(0, 8192, (4, 48), generator=torch.Generator().manual_seed(3))
EVAL_IDS = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))


def _recipe(scheme: str = "W4A16", **extra) -> Recipe:
    return Recipe.from_dict({"scheme": {"preset": scheme, "method": "rtn"}, "kv_cache": "fp8",
                             "calibration": CALIBRATION, **extra})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(family, scheme) -> a checkpoint quantized with kv_cache fp8 on IDS (built lazily)."""
    root = tmp_path_factory.mktemp("kv")
    cache = {}

    def get(family: str, scheme: str = "W4A16") -> Path:
        if (family, scheme) not in cache:
            out = root / f"{family}-{scheme}"
            moequant.quantize(str(family_checkpoint(family, root / "models")), _recipe(scheme), calibration=IDS,
                              output_dir=out, progress=False)
            cache[family, scheme] = out
        return cache[family, scheme]

    get.root = root
    return get


def test_scale_math_and_its_twin():
    for amax in (0.0, 1e-30, 3.5, 448.0, 1e4, torch.tensor(2.75)):
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            s = kv_scale(amax, dtype)
            assert s.dtype == dtype and s.shape == (1,)
            assert torch.equal(s, kv_scale_ref(float(amax), dtype)), (amax, dtype)
    assert kv_scale(448.0, torch.float32).item() == 1.0
    assert kv_scale(0.0, torch.bfloat16).item() == torch.finfo(torch.bfloat16).eps
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="amax: expected a finite value >= 0"):
            kv_scale(bad)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_scales_equal_a_brute_force_amax_over_a_plain_forward(runs, family):
    import transformers

    d = runs(family)
    tensors = checkpoint_tensors(d)
    model = load_dequantized(d, dtype=torch.float32)  # the quantized model, as the pipeline computed it
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(IDS, past_key_values=cache, use_cache=True)
    n = model.config.num_hidden_layers
    assert len(cache.layers) == n
    exact = 0
    for i, layer in enumerate(cache.layers):
        for leaf, t in (("k_scale", layer.keys), ("v_scale", layer.values)):
            ours = tensors[f"model.layers.{i}.self_attn.{leaf}"]
            assert ours.dtype == torch.bfloat16 and ours.shape == (1,)
            want = kv_scale_ref(float(t.abs().max()), torch.bfloat16)
            # the pipeline ran the batches 2 at a time, layer by layer: its float32 sums may differ in the last
            # bit, which the bf16 rounding of the scale absorbs but for an amax next to a rounding boundary
            assert torch.equal(ours, want) or abs(ours.float().item() - want.float().item()) <= \
                2 ** -8 * want.float().item(), (i, leaf, ours, want)
            exact += torch.equal(ours, want)
    assert sum(k.endswith(("k_scale", "v_scale")) for k in tensors) == 2 * n
    assert exact >= 2 * n - 1, f"{exact} of {2 * n} scales equal the brute force's"


def test_config_and_tensors_are_compressed_tensors(runs):
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStrategy

    d = runs("qwen3_moe")
    qcfg = json.loads((d / "config.json").read_text())["quantization_config"]
    assert qcfg["kv_cache_scheme"] == {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor",
                                       "group_size": None, "dynamic": False, "observer": "static_minmax"}
    parsed = QuantizationConfig.model_validate(qcfg)
    kv = parsed.kv_cache_scheme
    assert (kv.num_bits, kv.type, kv.strategy, kv.symmetric, kv.dynamic) == (8, "float", QuantizationStrategy.TENSOR,
                                                                             True, False)
    # vLLM's CompressedTensorsKVCacheMethod.validate_kv_cache_scheme (its source): 8-bit float, tensor, symmetric
    assert kv_cache_kind(qcfg["kv_cache_scheme"]) == "fp8"
    assert quantization_config_block([(["Linear"], moequant.formats.IntFormat(4, 128, True))], [])[
        "kv_cache_scheme"] is None
    names = [n for n in checkpoint_tensors(d) if n.endswith(("k_scale", "v_scale"))]
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.{s}" for i in range(3) for s in ("k_scale", "v_scale"))


_RELOAD = r"""
import json, sys, torch, transformers
from compressed_tensors.quantization import disable_quantization
d, ids = sys.argv[1], torch.load(sys.argv[2])
assert "moequant" not in sys.modules
m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
scales = {f"{n}.{s}": getattr(mod, s).detach().float().item() for n, mod in m.named_modules()
          for s in ("k_scale", "v_scale") if isinstance(getattr(mod, s, None), torch.Tensor)}
with torch.no_grad():
    on = m(ids).logits.float()
    m.apply(disable_quantization)
    off = m(ids).logits.float()
torch.save({"on": on, "off": off}, sys.argv[3])
print(json.dumps(scales))
"""


def test_plain_transformers_reloads_it_and_quantizes_the_cache_with_our_scales(runs, tmp_path):
    d = runs("qwen3_moe")
    torch.save(EVAL_IDS, tmp_path / "ids.pt")
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(d), str(tmp_path / "ids.pt"), str(tmp_path / "l.pt")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scales = json.loads(proc.stdout.strip().splitlines()[-1])
    tensors = checkpoint_tensors(d)
    assert scales == {k: tensors[k].float().item() for k in tensors if k.endswith(("k_scale", "v_scale"))}
    logits = torch.load(tmp_path / "l.pt")
    effect = (logits["on"] - logits["off"]).abs().max()
    assert effect > 0  # compressed-tensors fake-quantizes the KV cache (W4A16: nothing else) with our scales
    # compressed-tensors' fake quantization of a cached tensor is ours up to its bf16 arithmetic (it divides by the
    # scale in bf16, vLLM and moequant in float32): the same on most elements, one FP8 step apart on the others
    import transformers
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    att = m.model.layers[1].self_attn
    x = torch.randn(2, 2, 24, 32, generator=torch.Generator().manual_seed(5)).bfloat16() * 0.5
    for leaf in ("k", "v"):
        scale = getattr(att, f"{leaf}_scale").detach()
        theirs = forward_quantize(att, x, leaf, att.quantization_scheme.input_activations).float()
        ours = fake_quantize_fp8(x, scale).float()
        assert (theirs != ours).float().mean() < 0.1
        step = (ours.abs() / 8).clamp_min(scale.float().item() * 2 ** -9)  # an E4M3 step at that magnitude
        assert ((theirs - ours).abs() <= 2 * step + 1e-12).all()


def test_eval_simulates_the_kv_cache(runs, capsys, tmp_path):
    d = runs("qwen3_moe", "FP8")
    model = load_model(d, loader="moequant")
    sim = simulation_of(model)
    assert sim.describe() == ("activations A8 FP8 per-token (15 Linears, the routed experts of 2 layers) and "
                              "KV cache FP8 (3 attentions)")
    with torch.no_grad():
        both = model(EVAL_IDS).logits
        sim.remove()
        none = model(EVAL_IDS).logits
        kv_only = type(sim)(model, sim.family, SimulationPlan({}, sim.plan.kv))
        with kv_only:
            kv = model(EVAL_IDS).logits
        assert torch.equal(model(EVAL_IDS).logits, none)
    assert not torch.equal(kv, none) and not torch.equal(kv, both)
    # both loaders simulate the cache identically (transformers' own KV quantization, which compressed-tensors
    # hooks in, is off under moequant's)
    w4 = runs("qwen3_moe")
    a, b = load_model(w4, loader="moequant"), load_model(w4, loader="transformers")
    with torch.no_grad():
        la, lb = a(EVAL_IDS).logits, b(EVAL_IDS).logits
        assert torch.equal(la, lb)
        simulation_of(b).remove()
        assert not torch.equal(b(EVAL_IDS).logits, lb)
    text = tmp_path / "heldout.txt"
    text.write_text(HELDOUT_TEXT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    assert cli.main(["-q", "eval", str(runs("qwen3_moe")), "--text", str(text), "--seq-len", "64"]) == 0
    said, ppl = capsys.readouterr().out.strip().splitlines()[-2:]
    assert said == "simulated: KV cache FP8 (3 attentions)" and ppl.startswith("ppl=")


def test_dequantized_export_has_no_scales(runs):
    out = runs.root / "deq"
    moequant.quantize(str(runs.root / "models" / "qwen3_moe"), _recipe(), calibration=IDS, output_dir=out,
                      progress=False, export_format="dequantized")
    assert not any(k.endswith(("k_scale", "v_scale")) for k in checkpoint_tensors(out))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


def test_resume_is_bit_identical(runs, tmp_path):
    runs("qwen3_moe")  # builds the model
    tensors = assert_resume_bit_identical(str(runs.root / "models" / "qwen3_moe"), _recipe(), tmp_path,
                                          calibration=IDS)
    assert "model.layers.2.self_attn.v_scale" in tensors


def test_errors(runs, tmp_path, capsys):
    with pytest.raises(ValueError, match="kv_cache: expected one of 'fp8' or null, got 'int8'"):
        _recipe(kv_cache="int8")
    assert check_kv_cache("FP8") == "fp8" and kv_cache_scheme_args(None) is None
    assert Recipe.from_cli(_recipe(), kv_cache="none").kv_cache is None
    assert Recipe.from_cli(None, kv_cache="fp8").to_dict()["kv_cache"] == "fp8"
    with pytest.raises(ValueError, match="kv_cache_scheme .* is not one moequant reads"):
        kv_cache_kind({"num_bits": 8, "type": "int", "strategy": "tensor"})
    # MLA: no key / value cache to calibrate, refused before the first layer
    src = family_checkpoint("deepseek_v3", runs.root / "models")
    with pytest.raises(ValueError, match="kv_cache: 'fp8' needs attentions that cache keys and values .* "
                                         "deepseek_v3's attention .* set kv_cache to null"):
        moequant.quantize(str(src), _recipe(), calibration=IDS, output_dir=tmp_path / "mla", progress=False)
    assert not (tmp_path / "mla.partial").exists()
    rc = cli.main(["quantize", str(src), "--out", str(tmp_path / "x"), "--calib", "c.txt", "--kv-cache", "int8"])
    assert rc == 2 and "invalid choice: 'int8'" in capsys.readouterr().err
    # a checkpoint whose config announces a KV cache scheme without its scales
    import shutil

    from safetensors.torch import load_file, save_file
    d = tmp_path / "noscales"
    shutil.copytree(runs("qwen3_moe"), d)
    for f in d.glob("*.safetensors"):
        save_file({k: v for k, v in load_file(f).items() if not k.endswith(("k_scale", "v_scale"))}, f,
                  metadata={"format": "pt"})
    with pytest.raises(ValueError, match="has a kv_cache_scheme but the checkpoint has no \\*.k_scale"):
        SimulationPlan.from_checkpoint(d)


def test_eval_of_a_kv_scheme_moequant_does_not_simulate(runs, tmp_path, capsys):
    """A checkpoint moequant did not write (here: an int8 kv_cache_scheme, which compressed-tensors reads): eval with
    simulation says what to do; --no-simulate-activations evaluates the weights alone."""
    import shutil

    d = tmp_path / "int8kv"
    shutil.copytree(runs("qwen3_moe"), d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["kv_cache_scheme"].update(type="int", observer="minmax")
    (d / "config.json").write_text(json.dumps(config))
    text = tmp_path / "heldout.txt"
    text.write_text(HELDOUT_TEXT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    args = ["-q", "eval", str(d), "--text", str(text), "--seq-len", "64", "--loader", "transformers"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("moequant: error: quantization_config: kv_cache_scheme {") and \
        err.endswith("is not one moequant reads (it writes and simulates FP8 E4M3 with per-tensor static scales); "
                     "evaluate its weights alone with simulate=False (--no-simulate-activations)"), err
    assert cli.main(args + ["--no-simulate-activations"]) == 0
    said, ppl = capsys.readouterr().out.strip().splitlines()[-2:]
    assert said == "simulated: nothing (--no-simulate-activations: weights only)" and ppl.startswith("ppl=")
