"""The named schemes (FP8, FP8_BLOCK, NVFP4, NVFP4A16, MXFP4, MXFP4A16, MXFP6A16, MXFP6A8, MXFP8A16, MXFP8, W8A8,
and three mixed-precision recipes) write
checkpoints that (1) compressed-tensors parses and decompresses, with its own compressors, to exactly the weights the
run computed (those of the run's dequantized export, bit for bit), and (2) plain transformers loads wherever
moequant.compat says it does -- its logits with compressed-tensors' quantization forward off (the decompressed weights
alone) equal our dequantized model's bit for bit, and so do its plain logits for the weight-only schemes -- and
fails or differs wherever compat says it does not (a subprocess that never imports moequant). Three families of
tiny random models (tests/python/family_checkpoints.py) and the trained qwen3moe-tiny, GPTQ (the default method)
on 4 x 64 calibration tokens.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from checkpoints import checkpoint_tensors, transformers_logits
from family_checkpoints import CALIB_TEXT, HELDOUT_TEXT, family_checkpoint

import moequant
from moequant import cli
from moequant.formats import config_groups, group_of
from moequant.io.compat import loader_support
from moequant.io.exported import checkpoint_schemes, fused_expert_layers, load_model
from moequant.models import detect_family
from moequant.recipe import Recipe

FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3"]
ATTENTION = "re:.*\\.self_attn\\."
LAYER0 = "re:model\\.layers\\.0\\."
PRESETS = ["FP8", "FP8_BLOCK", "NVFP4", "NVFP4A16", "MXFP4", "MXFP4A16", "MXFP6A16", "MXFP6A8", "MXFP8A16", "MXFP8",
           "W8A8"]
CONFIGS = {**{p: {"scheme": p} for p in PRESETS},
           # the example: experts NVFP4, attention FP8, layer 0 bf16
           "mixed": {"scheme": "NVFP4", "overrides": [{"pattern": ATTENTION, "scheme": "FP8"},
                                                      {"pattern": LAYER0, "skip": True}]},
           # one transformers reads: experts MXFP4A16, attention W8A8, layer 0 bf16
           "mixed-mx": {"scheme": "MXFP4A16", "overrides": [{"pattern": ATTENTION, "scheme": "W8A8"},
                                                            {"pattern": LAYER0, "skip": True}]},
           # AlphaQuant's pattern recipe: experts MXFP4, attention MXFP6
           "mixed-alpha": {"scheme": "MXFP4A16", "overrides": [{"pattern": ATTENTION, "scheme": "MXFP6A16"}]}}
FORMATS = {"FP8": "float-quantized", "FP8_BLOCK": "float-quantized", "NVFP4": "nvfp4-pack-quantized",
           "NVFP4A16": "nvfp4-pack-quantized", "MXFP4": "mxfp4-pack-quantized", "MXFP4A16": "mxfp4-pack-quantized",
           "MXFP6A16": "mxfp6-pack-quantized", "MXFP6A8": "mxfp6-pack-quantized", "MXFP8A16": "mxfp8-quantized",
           "MXFP8": "mxfp8-quantized", "W8A8": "int-quantized",
           "mixed": "mixed-precision", "mixed-mx": "mixed-precision", "mixed-alpha": "mixed-precision"}
CALIBRATION = {"num_samples": 4, "seq_len": 64, "batch_size": 4}
IDS = torch.randint(0, 8192, (2, 24), generator=torch.Generator().manual_seed(0))


SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"


def _quantize(src: Path, config: dict, out: Path, export_format: str = "pack-quantized",
              calibration: dict = CALIBRATION, text: Path = CALIB_TEXT) -> None:
    recipe = Recipe.from_dict({**json.loads(json.dumps(config)), "calibration": calibration})
    moequant.quantize(str(src), recipe, calibration=str(text), output_dir=out, progress=False,
                      export_format=export_format)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """family -> {config: (checkpoint, its dequantized export, transformers outcome)}; built lazily, one family at a
    time; one transformers subprocess per family."""
    root = tmp_path_factory.mktemp("formats")
    torch.save(IDS, root / "ids.pt")
    cache: dict = {}

    def get(family: str) -> dict:
        if family not in cache:
            src = family_checkpoint(family, root / "models")
            out = {}
            for name, config in CONFIGS.items():
                d, deq = root / f"{family}-{name}", root / f"{family}-{name}-dequantized"
                _quantize(src, config, d)
                _quantize(src, config, deq, "dequantized")
                out[name] = (d, deq)
            outcome = transformers_logits(root / "ids.pt", [p for pair in out.values() for p in pair])
            cache[family] = {k: (d, deq, outcome[str(d)], outcome[str(deq)]) for k, (d, deq) in out.items()}
        return cache[family]

    return get


def _ours(d: Path) -> torch.Tensor:
    with torch.no_grad():
        return load_model(d)(IDS).logits


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_tensors_decompress_through_compressed_tensors_to_the_runs_weights(runs, family, config):
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    d, deq, _, _ = runs(family)[config]
    qcfg = json.loads((d / "config.json").read_text())["quantization_config"]
    ct = QuantizationConfig.model_validate(qcfg)
    assert qcfg["format"] == FORMATS[config]
    groups = config_groups(qcfg)
    tensors, weights = checkpoint_tensors(d), checkpoint_tensors(deq)
    modules = sorted(n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale"))
    assert modules, "nothing quantized"
    for m in modules:
        group = group_of(m, groups)
        scheme = ct.config_groups[group.name]
        local = {k[len(m) + 1:]: v for k, v in tensors.items()
                 if k.startswith(m + ".") and k.count(".") == m.count(".") + 1}
        dense = BaseCompressor.get_value_from_registry(group.compression).decompress(local, scheme)["weight"]
        want = weights[f"{m}.weight"]
        assert torch.equal(dense.to(want.dtype), want), f"{family} {config} {m}: compressed-tensors decompresses " \
            "otherwise"
        if group.activations is not None and group.activations.static_global_scale:  # NVFP4 W4A4
            g = tensors[f"{m}.input_global_scale"]
            assert g.dtype == torch.float32 and g.shape == (1,) and bool(torch.isfinite(g).all()) and float(g) > 0
    if config in ("NVFP4", "NVFP4A16", "mixed"):  # fused partners share the global scale (vLLM runs them as one)
        g = {m: float(tensors[f"{m}.weight_global_scale"]) for m in modules if f"{m}.weight_global_scale" in tensors}
        pairs = [("gate_proj", "up_proj"), ("w1", "w3"), ("q_proj", "k_proj"), ("q_proj", "v_proj"),
                 ("q_a_proj", "kv_a_proj_with_mqa")]
        checked = 0
        for m in g:
            for a, b in pairs:
                if m.endswith("." + a) and m[: -len(a)] + b in g:
                    assert g[m] == g[m[: -len(a)] + b], f"{m} and its partner {b} have different global scales"
                    checked += 1
        assert checked


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_where_compat_says(runs, family, config):
    d, deq, outcome, deq_outcome = runs(family)[config]
    assert deq_outcome == "ok", f"transformers cannot load the plain dequantized export: {deq_outcome}"
    ours = _ours(d)
    assert torch.equal(ours, torch.load(deq / "logits.pt")), "moequant's loader != the dequantized export"
    config_json = json.loads((d / "config.json").read_text())
    _, schemes = checkpoint_schemes(d)
    fam = detect_family(config_json["model_type"])
    expected = loader_support(fam, schemes, "pack-quantized", fused_expert_layers(d, fam))[0]
    report = json.loads((d / "moequant_report.json").read_text())
    assert report["loaders"][0] == expected.to_dict(), "the report's loader statement differs from the checkpoint's"
    assert report["quantization_format"] == FORMATS[config]
    weights_ok = outcome == "ok" and torch.equal(torch.load(d / "logits_weights.pt"), ours)
    if expected.loads:
        assert outcome == "ok", f"{family} {config}: plain transformers failed: {outcome}"
        assert weights_ok, f"{family} {config}: transformers' decompressed weights differ from ours"
        weight_only = all(g.activations is None for g in config_groups(config_json["quantization_config"]))
        assert torch.equal(torch.load(d / "logits.pt"), ours) == weight_only, \
            f"{family} {config}: transformers' activation quantization is not as compat says"
    else:  # documents transformers' gap: if it starts loading these correctly, moequant.compat must learn it
        assert not weights_ok, f"{family} {config}: transformers now loads this; update moequant.compat"


@pytest.mark.parametrize("family", FAMILIES[:1])
def test_moequant_eval_reads_every_format(runs, family, capsys, tmp_path):
    res = runs(family)
    text = tmp_path / "heldout.txt"
    text.write_text(HELDOUT_TEXT.read_text(encoding="utf-8")[:3000], encoding="utf-8")
    for name in ("NVFP4", "FP8_BLOCK", "mixed", "W8A8", "mixed-mx"):
        d, deq = res[name][:2]
        ppl = []
        # moequant's loader and, where it reads the checkpoint (compat), transformers: the weights alone
        # (--no-simulate-activations), exactly those of the dequantized export (test_eval_simulation.py checks
        # the simulation of the W8A8 / W4A4 activation quantization, eval's default)
        loaders = [(d, "moequant"), (deq, "transformers")] + ([(d, "transformers")] if name == "mixed-mx" else [])
        for path, loader in loaders:
            rc = cli.main(["-q", "eval", str(path), "--text", str(text), "--seq-len", "64", "--batch-size", "16",
                           "--loader", loader, "--no-simulate-activations"])
            out = capsys.readouterr()
            assert rc == 0, f"{name}: {out.err}"
            ppl.append(float(out.out.strip().splitlines()[-1].removeprefix("ppl=")))
        assert len(set(ppl)) == 1, f"{name}: {ppl}"


@pytest.mark.parametrize("family", FAMILIES[:1])
def test_eval_models_run_where_they_are_put(runs, family):
    """compressed-tensors >= 0.20 loads some checkpoints (FP8) into modules that onload their weights to the CPU in
    every forward: the evaluation model must hold plain tensors, so that on a GPU its logits are computed there (the
    GPU quality table failed on FP8 with the logits on the CPU, its targets on cuda). On a GPU machine, the logits'
    device is checked too."""
    from compressed_tensors.offload.cache import OffloadCache

    from moequant.eval.loader import choose_loader
    from moequant.eval.loader import load_model as load_eval_model

    res = runs(family)
    via_transformers = [n for n in CONFIGS if choose_loader(res[n][0])[0] == "transformers"]
    assert "FP8" in via_transformers
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in via_transformers:
        for device in devices:
            model = load_eval_model(res[name][0], device=device)
            wrapped = [n for n, m in model.named_modules() if isinstance(m._parameters, OffloadCache)]
            assert not wrapped, f"{name}: offloading modules {wrapped[:3]}"
            with torch.no_grad():
                assert model(IDS.to(device)).logits.device.type == device, name


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """The trained qwen3moe-tiny in three schemes (GPTQ, 16 x 128 calibration tokens of its own calibration text)."""
    tiny, text = SHARED / "models" / "qwen3moe-tiny", SHARED / "data" / "evaltext"
    if not (tiny / "model.safetensors").is_file() or not (text / "heldout.txt").is_file():
        pytest.skip(f"trained tiny model or its text not found at {tiny}, {text}")
    root = tmp_path_factory.mktemp("tiny-formats")
    out = {}
    for name in ("FP8", "MXFP4A16", "NVFP4"):
        out[name] = root / name
        _quantize(tiny, {"scheme": name}, out[name], calibration={"num_samples": 16, "seq_len": 128, "batch_size": 8},
                  text=text / "calib.txt")
    torch.save(IDS, root / "ids.pt")
    return tiny, out, transformers_logits(root / "ids.pt", list(out.values()))


@pytest.mark.slow
def test_trained_model_in_every_float_format(tiny_runs):
    import transformers

    from moequant.eval import load_token_ids, perplexity

    tiny, out, outcome = tiny_runs
    ids = load_token_ids(tiny, SHARED / "data" / "evaltext" / "heldout.txt")[:8 * 256 + 1]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16)
    ppl0 = perplexity(base, ids, seq_len=256, progress=False)
    # |ppl / bf16's - 1| on 8 windows of 256 tokens; measured (CPU): FP8 -0.02 %, MXFP4A16 +1.9 %, NVFP4 +0.4 %
    limits = {"FP8": 0.01, "MXFP4A16": 0.06, "NVFP4": 0.06}
    for name, d in out.items():
        ours = _ours(d)
        fam = detect_family("qwen3_moe")
        tf = loader_support(fam, checkpoint_schemes(d)[1])[0]
        if tf.loads:
            assert outcome[str(d)] == "ok" and torch.equal(torch.load(d / "logits_weights.pt"), ours), name
        ppl = perplexity(load_model(d), ids, seq_len=256, progress=False)
        assert abs(ppl / ppl0 - 1) < limits[name], f"{name}: perplexity {ppl:.4f} vs bf16 {ppl0:.4f}"
        print(f"{name}: perplexity {ppl:.4f} (bf16 {ppl0:.4f})")
