"""Quantized source checkpoints read directly (issue #13): DeepSeek-V3 / Qwen3-MoE FP8 with 128x128 block scales and
gpt-oss MXFP4 (tests/python/source_checkpoints.py), each beside the bf16 checkpoint of exactly its decoded weights.

* the reader's view of a source is that bf16 checkpoint, tensor for tensor (names, shapes, dtypes, bits), and
  agrees with transformers' own FP8 / MXFP4 dequantization;
* quantizing the source writes the checkpoint that quantizing the bf16 twin writes, bit for bit (same recipe, same
  tokens), with no FP8 / MXFP4 tensor left and a compressed-tensors (or no) quantization_config;
* the outputs load in plain transformers (a subprocess without moequant) wherever moequant.compat says they do;
* ``moequant inspect``, the header checks and the NaN/Inf scan work on sources and name a damaged tensor;
* other quantized inputs stay one clear error.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from checkpoints import checkpoint_tensors, transformers_logits
from family_checkpoints import CALIB_TEXT
from source_checkpoints import SOURCES, source_checkpoint

import moequant
from moequant import cli
from moequant.io.exported import load_model
from moequant.io.safetensors import CheckpointReader, check_checkpoint, scan_weights
from moequant.recipe import Recipe

CALIBRATION = {"num_samples": 4, "seq_len": 64, "batch_size": 4}
IDS = torch.randint(0, 1000, (4, 64), generator=torch.Generator().manual_seed(0))
SKIP_LAYER_0 = {"overrides": [{"pattern": "re:model\\.layers\\.0\\.", "skip": True}]}
# (family, recipe, export format, transformers loads it): layer 0 skipped writes FP8 Linears and per-expert FP8
# experts decoded (in transformers' fused layout); gpt-oss's quantized experts have no transformers loader
RUNS = {
    "deepseek_v3": ("deepseek_v3", {}, "pack-quantized", True),
    "qwen3_moe-skip-layer-0": ("qwen3_moe", SKIP_LAYER_0, "pack-quantized", True),
    "gpt_oss": ("gpt_oss", {}, "pack-quantized", False),
    "gpt_oss-dequantized": ("gpt_oss", {}, "dequantized", True),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sources")


@pytest.fixture(scope="module")
def runs(root):
    """run name -> (output of the source, output of its bf16 twin, the source run's report); built lazily."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            family, recipe, mode, _ = RUNS[name]
            out = []
            for d in source_checkpoint(family, root):
                o = root / f"out-{name}-{d.name}"
                report = moequant.quantize(str(d), Recipe.from_dict({**recipe, "calibration": CALIBRATION}),
                                           calibration=IDS, output_dir=o, export_format=mode, progress=False)
                out.append((o, report))
            cache[name] = (out[0][0], out[1][0], out[0][1])
        return cache[name]

    return get


@pytest.mark.parametrize("family", list(SOURCES))
def test_the_view_of_a_source_is_its_decoded_bf16_checkpoint(root, family):
    src, ref = source_checkpoint(family, root)
    index = check_checkpoint(src)
    assert index.source.method == SOURCES[family]
    companions = [n for n in index.tensors if n.endswith(("_scale_inv", "_blocks", "_scales"))]
    assert companions and not any(n in index.view for n in companions)
    with CheckpointReader(src) as a, CheckpointReader(ref) as b:
        assert sorted(a.names()) == sorted(b.names())
        for n in b.names():
            assert (a.shape(n), a.dtype(n)) == (b.shape(n), b.dtype(n)), n
            assert torch.equal(a.get(n), b.get(n)), n
    scan_weights(index)  # finite


def test_fp8_decoding_agrees_with_transformers(root):
    """transformers' Fp8Dequantize (its dequantize=True loading path) on every FP8 weight whose scale grid it reads
    right: it derives the block size from the grid (rows // grid rows), which is 128 only when 128 divides the
    dimension or one block covers it; DeepSeek's kv_b_proj [192, 128] (grid [2, 1]) it decodes with 96-row blocks."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    src, _ = source_checkpoint("deepseek_v3", root)
    checked = 0
    with CheckpointReader(src) as r:
        for name, vt in r.index.view.items():
            if vt.codec != "fp8" or not all(d % 128 == 0 or d <= 128 for d in vt.shape):
                continue
            theirs = Fp8Dequantize(None)._dequantize_one(r.raw(vt.parts[0]), r.raw(vt.parts[1]), torch.bfloat16)
            assert torch.equal(r.get(name), theirs), name
            checked += 1
    assert checked >= 20


@pytest.mark.parametrize("name", list(RUNS))
def test_quantizing_a_source_equals_quantizing_its_decoded_twin(runs, name):
    out, twin, report = runs(name)
    family, _, mode, _ = RUNS[name]
    a, b = checkpoint_tensors(out), checkpoint_tensors(twin)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not [k for k, t in a.items() if k.endswith(("_scale_inv", "_blocks", "_scales"))
                or t.dtype == torch.float8_e4m3fn]
    config, twin_config = (json.loads((d / "config.json").read_text()) for d in (out, twin))
    assert config["moequant"].pop("source_format") == report.source_format == {
        "fp8": {"quant_method": "fp8", "weight_block_size": [128, 128]}, "mxfp4": {"quant_method": "mxfp4"}}[
        SOURCES[family]]
    assert config == twin_config and config["dtype"] == "bfloat16"
    assert config.get("quantization_config", {}).get("quant_method") == (
        "compressed-tensors" if mode == "pack-quantized" else None)
    saved = json.loads((out / "moequant_report.json").read_text())
    assert saved["source_format"] == report.source_format and "decoded to bf16" in report.summary()
    if name.startswith("qwen3_moe"):  # layer 0 was skipped: its FP8 Linears are written decoded, under their names
        src_index = check_checkpoint(source_checkpoint(family, out.parent)[0])
        assert src_index.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == "F8_E4M3"
        assert a["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
        assert "model.layers.0.mlp.experts.gate_up_proj" in a


def test_outputs_load_in_plain_transformers(runs, root):
    """Every output that moequant.compat says transformers loads does, with the logits of our dequantized model and
    of the bf16 twin's output; and transformers' own MXFP4 loading (dequantize=True) of the gpt-oss source gives the
    logits of its decoded bf16 twin (the view's layout is transformers')."""
    ids = IDS[:2, :24]
    torch.save(ids, root / "ids.pt")
    loaded = [n for n, run in RUNS.items() if run[3]]
    for n in RUNS:
        report = runs(n)[2]
        assert report.loaders[0]["loads"] == RUNS[n][3], n
    mx_src, mx_ref = source_checkpoint("gpt_oss", root)
    args = [str(p) for n in loaded for p in runs(n)[:2]] + [f"{mx_src}=mxfp4", str(mx_ref)]
    outcome = transformers_logits(root / "ids.pt", args)
    assert set(outcome.values()) == {"ok"}, outcome
    for n in loaded:
        out, twin, _ = runs(n)
        with torch.no_grad():
            ours = load_model(out)(ids).logits
        assert torch.equal(torch.load(out / "logits.pt"), ours), n
        assert torch.equal(torch.load(twin / "logits.pt"), ours), n
    assert torch.equal(torch.load(mx_src / "logits.pt"), torch.load(mx_ref / "logits.pt"))


def test_inspect_describes_a_source(root, capsys):
    src, _ = source_checkpoint("deepseek_v3", root)
    assert cli.main(["inspect", str(src)]) == 0
    out = capsys.readouterr().out
    assert "source format: FP8 E4M3 with 128x128 block scales (weight_scale_inv)" in out
    assert "decoded to bf16 on load" in out


def _damaged(root: Path, family: str, tmp: Path, edit) -> Path:
    """A copy of ``family``'s source in ``tmp`` whose tensors (one file) went through ``edit(tensors)``."""
    src, _ = source_checkpoint(family, root)
    d = tmp / f"{family}-damaged"
    shutil.copytree(src, d)
    for f in d.glob("*.safetensors*"):
        f.unlink()
    tensors = checkpoint_tensors(src)
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def _quantize(d: Path):
    return moequant.quantize(str(d), Recipe.from_dict({"calibration": CALIBRATION}), calibration=IDS,
                             progress=False)


EXPERT = "model.layers.2.mlp.experts.1.down_proj.weight"


def _set(name: str, index: tuple, value):
    def edit(t: dict):
        raw = t[name].view(torch.uint8) if t[name].dtype == torch.float8_e4m3fn else t[name]
        raw[index] = value
    return edit


@pytest.mark.parametrize("family, edit, message", [
    ("qwen3_moe", _set(EXPERT, (5, 7), 0x7F),  # an FP8 NaN code
     f"{EXPERT} (layer 2, model.safetensors): 1 NaN/Inf value(s) of 16384, the first at index [5, 7]"),
    ("qwen3_moe", _set(EXPERT + "_scale_inv", (0, 0), 1e36),  # 448 * 1e36 overflows bf16
     f"{EXPERT}_scale_inv (layer 2, model.safetensors): 1 FP8_SCALE_INV scale(s) that decode to NaN/Inf in bf16"),
    ("gpt_oss", _set("model.layers.1.mlp.experts.down_proj_scales", (2, 3, 1), 0xFF),  # an E8M0 NaN
     "model.layers.1.mlp.experts.down_proj_scales (layer 1, model.safetensors): 1 E8M0 scale(s) that decode to NaN/Inf "
     "in bf16 of 2048, the first at index [2, 3, 1]"),
])
def test_the_scan_names_a_damaged_source_tensor(root, tmp_path, family, edit, message):
    d = _damaged(root, family, tmp_path, edit)
    with pytest.raises(ValueError) as exc:
        _quantize(d)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def _error_lines(capsys) -> list[str]:
    """stderr's ``moequant`` lines (the fixtures' checkpoint writers and transformers' warnings may print before
    them; the CLI's exit code 2 says it reported a user error, not a crash)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("moequant")]


def _replace(name: str, new: str, value):
    def edit(t: dict):
        del t[name]
        if value is not None:
            t[new] = value
    return edit


@pytest.mark.parametrize("family, edit, message", [
    ("qwen3_moe", _replace(EXPERT + "_scale_inv", EXPERT + "_scale_inv", torch.ones(1, 2)),
     f"{EXPERT}_scale_inv (layer 2, model.safetensors): F32 [1, 2], expected F32 [1, 1] (ceil of its weight "
     f"[128, 128] / weight_block_size [128, 128])"),
    ("qwen3_moe", _replace(EXPERT + "_scale_inv", "unused", None),
     f"{EXPERT} (layer 2, model.safetensors): F8_E4M3 [128, 128] without its '{EXPERT}_scale_inv'"),
    ("gpt_oss", _replace("model.layers.0.mlp.experts.down_proj_scales", "unused", None),
     "model.layers.0.mlp.experts.down_proj_blocks (layer 0, model.safetensors): MXFP4 blocks without their scales"),
])
def test_header_checks_name_a_bad_companion(root, tmp_path, capsys, family, edit, message):
    d = _damaged(root, family, tmp_path, edit)
    with pytest.raises(ValueError) as exc:
        check_checkpoint(d)
    assert message in str(exc.value) and "re-download it" in str(exc.value)
    assert cli.main(["-q", "inspect", str(d)]) == 2  # one line, exit code 2
    err = _error_lines(capsys)
    assert len(err) == 1 and message in err[0]


def test_a_decoded_shape_that_does_not_match_the_config_is_named(root, tmp_path):
    blocks = "model.layers.0.mlp.experts.down_proj_blocks"

    def halve(t: dict):  # groups of 32 along I: 4 -> 2, decoded [4, 64, 128] where config.json implies [4, 128, 128]
        t[blocks] = t[blocks][:, :, :2].contiguous()
        t[blocks.replace("blocks", "scales")] = t[blocks.replace("blocks", "scales")][:, :, :2].contiguous()
    d = _damaged(root, "gpt_oss", tmp_path, halve)
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.experts\.down_proj \(layer 0, model\.safetensors\): "
                                         r"shape \[4, 64, 128\] \(decoded from .*down_proj_blocks \+ "
                                         r".*down_proj_scales\), but config\.json implies \[4, 128, 128\]"):
        _quantize(d)


def test_other_quantized_inputs_are_one_clear_error(runs, root, tmp_path, capsys):
    out = runs("deepseek_v3")[0]  # a compressed-tensors checkpoint moequant wrote
    with pytest.raises(ValueError, match=r"is quantized already \(config\.json's quantization_config: quant_method "
                                         r"'compressed-tensors', format 'pack-quantized'\); moequant reads unquantized "
                                         r"checkpoints and FP8 block-scaled sources"):
        _quantize(out)
    src, _ = source_checkpoint("qwen3_moe", root)
    static = tmp_path / "static"
    shutil.copytree(src, static)
    config = json.loads((static / "config.json").read_text())
    config["quantization_config"]["activation_scheme"] = "static"
    (static / "config.json").write_text(json.dumps(config))
    assert cli.main(["-q", "quantize", str(static), "--out", str(tmp_path / "o"), "--calib", str(CALIB_TEXT),
                     "--num-samples", "4", "--seq-len", "64"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "quant_method fp8 with activation_scheme 'static' (expected dynamic" in err[0]
    del config["quantization_config"]  # FP8 tensors without the config that declares them
    (static / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\(layer 0, model\.safetensors\): dtype F8_E4M3, expected one of BF16, F16, "
                                         r"F32, F64; moequant reads BF16/F16/F32 checkpoints and FP8 block-scaled"):
        _quantize(static)
    assert not (tmp_path / "o").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("family", list(SOURCES))
def test_gpu_decoding_matches_the_cpu(root, family):
    """The reader decodes on the GPU (raw bytes to the device, the kernels) bit for bit as on the CPU, and the lazy
    model's layers read through it equal the CPU-decoded ones."""
    from moequant.models import LazyModel

    src, _ = source_checkpoint(family, root)
    with CheckpointReader(src) as cpu, CheckpointReader(src, decode_device="cuda") as gpu:
        for n in cpu.names():
            assert torch.equal(gpu.get(n, device="cuda").cpu(), cpu.get(n)), n
            assert torch.equal(gpu.get(n), cpu.get(n)), n
    a, b = LazyModel(src), LazyModel(src, decode_device=torch.device("cuda"))
    for i in range(a.num_layers):
        sa, sb = a.load_layer(i).state_dict(), b.load_layer(i, "cuda", experts_device="cpu").state_dict()
        assert all(torch.equal(sa[k], sb[k].cpu()) for k in sa)
