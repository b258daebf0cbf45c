"""moequant.eval.compare and ``moequant compare``: a model against itself, against its quantized checkpoint (equal
to a direct computation from the full logits of both models), a rotated residual stream, mismatched models."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file

from moequant import pipeline
from moequant.cli import main
from moequant.eval import load_model, perplexity, window_starts
from moequant.eval.compare import COMPARE_FILE, compare
from moequant.eval.compare_result import load_compare
from moequant.recipe import CalibrationConfig, QuantScheme, Recipe
from testdata import tiny_qwen3_checkpoint

REPO = Path(__file__).resolve().parents[2]
CALIB = REPO / "examples" / "data" / "wikitext2_calib.txt"
TEXT = REPO / "examples" / "data" / "wikitext2_heldout.txt"
KW = dict(seq_len=32, max_windows=6, batch_size=4, progress=False)


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("moequant: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("cmp") / "model")


@pytest.fixture(scope="module")
def tiny_q(tiny, tmp_path_factory) -> Path:
    """``tiny`` quantized W4 g32 symmetric GPTQ, pack-quantized (transformers reads it too)."""
    out = tmp_path_factory.mktemp("cmpq") / "q"
    recipe = Recipe(scheme=QuantScheme(group_size=32, symmetric=True),
                    calibration=CalibrationConfig(text_files=[str(CALIB)], num_samples=4, seq_len=64, batch_size=2))
    pipeline.quantize(tiny, recipe, output_dir=out, progress=False)
    return out


def test_a_model_against_itself_changes_nothing(tiny):
    r = compare(tiny, tiny, TEXT, **KW)
    assert r.tokens == 6 * 31 and r.windows == 6 and r.same_basis
    assert r.kl_mean == 0.0 and r.kl_max == 0.0 and r.top1_agreement == 1.0 and r.ppl_base == r.ppl_quant
    assert len(r.layers) == 2
    for x in r.layers:
        assert x.moe and x.topk_changed == 0.0 and x.top1_flip == 0.0 and x.overlap == 1.0
        assert x.hidden_drift == 0.0 and x.layer_error == 0.0 and x.update_error == 0.0
        assert x.load_base == x.load_quant and abs(sum(x.load_base) - 1) < 1e-9


def _routing_hooks(model, sink: list):
    fam_experts = [layer.mlp.experts for layer in model.model.layers]
    return [e.register_forward_pre_hook(lambda m, a, k, i=i: sink.append((i, a[1].clone())), with_kwargs=True)
            for i, e in enumerate(fam_experts)]


def test_quantized_equals_a_direct_computation_from_full_logits(tiny, tiny_q):
    """KL, agreement, perplexities and routing drift equal what the two whole models (transformers, and moequant's
    eval loader for the quantized one) give on the same windows."""
    r = compare(tiny, tiny_q, TEXT, **KW)
    tok = transformers.AutoTokenizer.from_pretrained(tiny)
    ids = torch.tensor(tok(TEXT.read_text())["input_ids"])
    windows = torch.stack([ids[s: s + 32] for s in list(window_starts(ids.numel(), 32))[:6]])
    models = [load_model(tiny, "cpu"), load_model(tiny_q, "cpu")]
    logits, routes = [], []
    for m in models:
        sink: list = []
        hooks = _routing_hooks(m, sink)
        with torch.no_grad():
            logits.append(m(input_ids=windows).logits[:, :-1].float())
        for h in hooks:
            h.remove()
        routes.append(sink)
    lp = [F.log_softmax(x, -1) for x in logits]
    kl = (lp[0].exp() * (lp[0] - lp[1])).sum(-1).clamp_min(0)
    assert r.kl_mean == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-9)
    assert r.kl_max == pytest.approx(float(kl.max()), rel=1e-4)
    assert r.top1_agreement == pytest.approx(float((lp[0].argmax(-1) == lp[1].argmax(-1)).double().mean()), abs=1e-12)
    for k, model in enumerate(models):  # the perplexity protocol over the same 6 windows (+1 token: see ppl.py)
        ppl = perplexity(model, ids[: 6 * 32 + 1], seq_len=32, progress=False)
        assert (r.ppl_base, r.ppl_quant)[k] == pytest.approx(ppl, rel=1e-5)
    # routing drift from the whole models' experts calls: each layer's top-k sets, base vs quantized
    for layer in range(2):
        ib = torch.cat([t for i, t in routes[0] if i == layer]).sort(1).values
        iq = torch.cat([t for i, t in routes[1] if i == layer]).sort(1).values
        changed = (ib != iq).any(1).double().mean()
        assert r.layers[layer].topk_changed == pytest.approx(float(changed), abs=1e-9)
        load = torch.bincount(iq.reshape(-1), minlength=4).double() / iq.numel()
        assert r.layers[layer].load_quant == pytest.approx(load.tolist(), abs=1e-12)
    # plausible: a W4 model stays close, but not identical
    assert 0 < r.kl_mean < 0.05 and 0.8 < r.top1_agreement <= 1.0
    assert all(0 < x.hidden_drift < 0.5 and 0 < x.layer_error < 0.5 for x in r.layers)


def test_dequantized_export_compares_like_the_packed_one(tiny, tiny_q, tmp_path):
    """Both of moequant's export formats hold the same weights: the same comparison, to the bit."""
    out = tmp_path / "deq"
    recipe = Recipe(scheme=QuantScheme(group_size=32, symmetric=True),
                    calibration=CalibrationConfig(text_files=[str(CALIB)], num_samples=4, seq_len=64, batch_size=2))
    pipeline.quantize(tiny, recipe, output_dir=out, progress=False, export_format="dequantized")
    a, b = compare(tiny, tiny_q, TEXT, **KW), compare(tiny, out, TEXT, **KW)
    assert (a.kl_mean, a.top1_agreement, a.ppl_quant) == (b.kl_mean, b.top1_agreement, b.ppl_quant)
    assert [x.topk_changed for x in a.layers] == [x.topk_changed for x in b.layers]


def test_trained_model_at_w3_rtn_gives_plausible_numbers(shared_tiny_model, shared_dir, tmp_path):
    out = tmp_path / "rtn3"
    recipe = Recipe(scheme=QuantScheme(bits=3, method="rtn", symmetric=False, scale_search="minmax", act_order=False),
                    calibration=CalibrationConfig(text_files=[str(shared_dir / "data/evaltext/calib.txt")],
                                                  num_samples=2, seq_len=128))
    pipeline.quantize(shared_tiny_model, recipe, output_dir=out, progress=False)
    r = compare(shared_tiny_model, out, shared_dir / "data/evaltext/heldout.txt", seq_len=256, max_windows=4,
                batch_size=4, progress=False)
    assert 1e-3 < r.kl_mean < 1.0 and 0.6 < r.top1_agreement < 1.0
    assert r.ppl_quant > r.ppl_base and 5 < r.ppl_base < 100
    assert len(r.moe_layers) == 6 and all(0 < x.topk_changed < 1 and x.top1_flip <= x.topk_changed + 1e-9
                                          for x in r.moe_layers)
    assert all(abs(sum(x.load_quant) - 1) < 1e-9 for x in r.moe_layers)


def test_rotated_residual_stream_leaves_hidden_metrics_out(tiny, tmp_path):
    """A checkpoint whose embeddings differ (a rotated residual stream) has no comparable hidden states."""
    other = tmp_path / "rot"
    shutil.copytree(tiny, other)
    t = load_file(other / "model.safetensors")
    t["model.embed_tokens.weight"] = (t["model.embed_tokens.weight"].float() * 1.01).to(torch.bfloat16)
    save_file(t, other / "model.safetensors", metadata={"format": "pt"})
    r = compare(tiny, other, TEXT, **KW)
    assert not r.same_basis and r.kl_mean > 0
    assert all(x.hidden_drift is None and x.layer_error is None for x in r.layers)
    assert all(x.topk_changed is not None for x in r.layers)


def test_cli_compare_saves_and_prints(capsys, tiny, tiny_q, tmp_path):
    out = tmp_path / "c.json"
    rc = main(["compare", str(tiny), str(tiny_q), "--text", str(TEXT), "--seq-len", "32", "--max-windows", "3",
               "--error-windows", "0", "--out", str(out), "-q"])
    o, err = capsys.readouterr()
    assert rc == 0 and err == "", err
    assert "KL(base || quant)" in o and "top-1 agreement" in o
    r = load_compare(out)
    assert r.windows == 3 and r.error_windows == 0 and all(x.layer_error is None for x in r.layers)
    assert all(x.hidden_drift is not None for x in r.layers)


@pytest.fixture(scope="module")
def other_model(tmp_path_factory) -> Path:
    return tiny_qwen3_checkpoint(tmp_path_factory.mktemp("other") / "model", num_experts=8)


@pytest.mark.parametrize("case", ["missing_base", "missing_text", "mismatch", "no_tokens", "bad_out", "errwin",
                                  "fp8"])
def test_cli_compare_user_errors_exit_2(capsys, tiny, other_model, tmp_path, case):
    text = tmp_path / "t.txt"
    text.write_text("a few words only\n" if case == "no_tokens" else TEXT.read_text())
    fp8 = tmp_path / "fp8"
    if case == "fp8":  # a quantization compare does not read
        shutil.copytree(tiny, fp8)
        cfg = json.loads((fp8 / "config.json").read_text())
        cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        (fp8 / "config.json").write_text(json.dumps(cfg))
    args = {"missing_base": [str(tmp_path / "nope"), str(tiny), "--text", str(text)],
            "missing_text": [str(tiny), str(tiny), "--text", str(tmp_path / "none.txt")],
            "mismatch": [str(tiny), str(other_model), "--text", str(text), "--out", str(tmp_path / "c.json")],
            "no_tokens": [str(tiny), str(tiny), "--text", str(text), "--out", str(tmp_path / "c.json")],
            "bad_out": [str(tiny), str(tiny), "--text", str(text), "--out", str(tmp_path / "no" / "c.json")],
            "errwin": [str(tiny), str(tiny), "--text", str(text), "--error-windows", "-2"],
            "fp8": [str(tiny), str(fp8), "--text", str(text), "--out", str(tmp_path / "c.json")]}[case]
    match = {"missing_base": "model directory", "missing_text": "--text", "mismatch": "not the same model",
             "no_tokens": "fewer than seq_len", "bad_out": "pass --out FILE", "errwin": "--error-windows",
             "fp8": "is not read"}[case]
    assert main(["compare", *args, "--seq-len", "32", "-q"]) == 2
    assert match in _one_error_line(capsys.readouterr().err)
    assert not (tiny / COMPARE_FILE).exists()


def test_compare_result_round_trip(tiny, tmp_path):
    r = compare(tiny, tiny, TEXT, **{**KW, "max_windows": 2})
    r.save(tmp_path / "r.json")
    back = load_compare(tmp_path / "r.json")
    assert back == r and json.loads((tmp_path / "r.json").read_text())["tokens"] == 62
    (tmp_path / "bad.json").write_text("{\"tokens\": 1}")
    with pytest.raises(ValueError, match="not a moequant compare result"):
        load_compare(tmp_path / "bad.json")


def _foreign_checkpoint(base: Path, out: Path, dense: Path) -> None:
    """``base`` quantized W4 g32 asymmetric round-to-nearest and written the way llm-compressor writes a checkpoint:
    compressed-tensors' own min/max quantization parameters (``calculate_qparams``) and its own pack-quantized
    compressor, a ``quantization_config`` from its own ``QuantizationConfig``; no moequant code writes a tensor.
    ``dense`` gets the same model with the weights compressed-tensors' decompressor gives back."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    comp = BaseCompressor.get_value_from_registry("pack-quantized")
    src = load_file(str(base / "model.safetensors"))
    packed, plain = {}, {}
    for name, w in src.items():
        if ".layers." in name and name.endswith("_proj.weight") and w.dim() == 2:  # attention and experts
            wf = w.float().reshape(w.shape[0], -1, 32)
            scale, zp = calculate_qparams(wf.amin(-1), wf.amax(-1), args)
            local = comp.compress({"weight": w, "weight_scale": scale.to(w.dtype), "weight_zero_point": zp}, scheme)
            m = name[: -len(".weight")]
            packed.update({f"{m}.{k}": v for k, v in local.items() if v is not None})
            plain[name] = comp.decompress(local, scheme)["weight"].to(w.dtype)
        else:
            packed[name] = plain[name] = w
    for d, tensors in ((out, packed), (dense, plain)):
        shutil.copytree(base, d)
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = QuantizationConfig(
        config_groups={"group_0": scheme}, format="pack-quantized", quantization_status="compressed",
        ignore=["lm_head", "re:.*mlp.gate$"]).model_dump(exclude_none=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))


def test_compare_reads_a_checkpoint_compressed_tensors_wrote(tiny, tmp_path):
    """A checkpoint of another tool (compressed-tensors' compressor, as llm-compressor saves): compare dequantizes
    it as a loader does, so the result is the comparison with the decompressed weights, to the bit."""
    out, dense = tmp_path / "llmc", tmp_path / "dense"
    _foreign_checkpoint(tiny, out, dense)
    assert any(k.endswith(".weight_packed") for k in load_file(str(out / "model.safetensors")))
    a, b = compare(tiny, out, TEXT, **KW), compare(tiny, dense, TEXT, **KW)
    assert 0 < a.kl_mean < 0.5
    assert (a.kl_mean, a.top1_agreement, a.ppl_quant) == (b.kl_mean, b.top1_agreement, b.ppl_quant)
    assert [x.topk_changed for x in a.layers] == [x.topk_changed for x in b.layers]
