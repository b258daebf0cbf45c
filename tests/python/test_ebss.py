"""EBSS (moequant.ebss): the beam-search generator, its JSONL output, and the effect of the balance term.

The model is a tiny random Qwen3-MoE (8 experts, top-2) built here with the shipped tokenizer.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from moequant import cli
from moequant.calibration import ebss
from moequant.calibration.data import read_jsonl_samples
from moequant.recipe import CalibrationConfig
from testdata import tiny_qwen3_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_qwen3_checkpoint(tmp_path_factory.mktemp("ebss") / "model", num_experts=8,
                                 moe_intermediate_size=32, dtype=torch.float32)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path), path


def test_expert_balance_formula():
    # one layer, 4 experts: fractions [.5, .5, 0, 0] -> std(ddof=1) = sqrt(0.25 / 3)
    c = torch.tensor([[[2.0, 2.0, 0.0, 0.0]], [[1.0, 1.0, 1.0, 1.0]]])
    s = ebss.expert_balance(c)
    assert s[0].item() == pytest.approx((0.25 / 3) ** 0.5)
    assert s[1].item() == 0.0


def test_generate_shapes_determinism_and_jsonl(tiny, tmp_path):
    model, tok, _ = tiny
    cfg = ebss.EbssConfig(num_samples=3, seq_len=12, beam=3, tau=1.2, seed=1, batch_size=2)
    a = ebss.generate(model, tok, cfg)
    b = ebss.generate(model, tok, cfg)
    assert a.sequences == b.sequences  # fixed seed: deterministic
    assert len(a.sequences) == 3 and all(len(s) == 12 for s in a.sequences)
    special = set(tok.all_special_ids)
    assert not any(t in special or t >= len(tok) for s in a.sequences for t in s)
    out = ebss.write_jsonl(a, tmp_path / "ebss.jsonl")
    lines = out.read_text().splitlines()
    assert [json.loads(x)["input_ids"] for x in lines] == a.sequences
    meta = json.loads((tmp_path / "ebss.jsonl.meta.json").read_text())
    assert (meta["beam"], meta["tau"], meta["seq_len"], meta["balance"]) == (3, 1.2, 12, True)
    kept, dropped = read_jsonl_samples(tok, out, 12)
    assert dropped == 0 and [k.tolist() for k in kept] == a.sequences
    # the pipeline's calibration loader mixes them with nothing else here
    from moequant.calibration.data import load_calibration

    cal = load_calibration(tok, CalibrationConfig(jsonl_files=[str(out)], num_samples=3, seq_len=10))
    assert cal.input_ids.shape == (3, 10) and cal.num_jsonl == 3


def test_balance_term_makes_routing_more_uniform(tiny):
    """Same seeds (same first tokens), balance on vs off: the routing of the generated text (recomputed with a
    fresh full-sequence forward) is more uniform on average with the balance term."""
    model, tok, _ = tiny
    common = dict(num_samples=6, seq_len=24, beam=4, tau=0.5, seed=3, batch_size=6)
    on = ebss.generate(model, tok, ebss.EbssConfig(balance=True, **common))
    off = ebss.generate(model, tok, ebss.EbssConfig(balance=False, **common))
    s_on = ebss.expert_balance(ebss.expert_usage(model, torch.tensor(on.sequences)))
    s_off = ebss.expert_balance(ebss.expert_usage(model, torch.tensor(off.sequences)))
    print(f"EBSS sigma: balance on {s_on.mean():.4f} (per sample {s_on.tolist()}), "
          f"off {s_off.mean():.4f}; nll on {sum(on.nll) / 6:.4f} off {sum(off.nll) / 6:.4f}")
    # the incremental (cached) routing the search saw equals the full-sequence routing
    assert torch.allclose(torch.tensor(on.sigma, dtype=torch.float64), s_on, atol=1e-6)
    assert s_on.mean() < 0.92 * s_off.mean()  # measured: 0.161 vs 0.189 (-15 %), lower in 6 of 6 samples
    assert (s_on < s_off).sum() >= 5
    # and the pure log-probability beam has the better likelihood
    assert sum(off.nll) <= sum(on.nll) + 1e-9


def test_cli_ebss(tiny, tmp_path, capsys):
    _, tok, path = tiny
    out = tmp_path / "cal.jsonl"
    rc = cli.main(["ebss", str(path), "--out", str(out), "--num-samples", "2", "--seq-len", "8", "--beam", "2",
                   "--device", "cpu"])
    assert rc == 0
    assert "wrote 2 sequences" in capsys.readouterr().out
    kept, dropped = read_jsonl_samples(tok, out, 8)
    assert len(kept) == 2 and dropped == 0
    assert json.loads((tmp_path / "cal.jsonl.meta.json").read_text())["num_samples"] == 2
    assert cli.main(["ebss", str(path), "--out", str(tmp_path / "x.txt")]) == 2
