"""docs/quality.md, "Simulated activations and FP8 KV cache": the trained qwen3moe-tiny in the W8A8 / W4A4 schemes
(GPTQ, 16 x 128 calibration tokens, kv_cache fp8), perplexity on the first 16 windows of 256 held-out tokens with
the weights alone, with the activations simulated, and with activations and the FP8 KV cache simulated.

    PYTHONPATH=python python benchmarks/simulation_table.py OUT_ROOT [SCHEME ...]   # default FP8 W8A8 NVFP4 FP8_BLOCK
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import transformers

import moequant
from moequant.eval import Simulation, SimulationPlan, load_model, load_token_ids, perplexity, simulation_of
from moequant.recipe import Recipe

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main(root: Path, schemes: list[str]) -> None:
    tiny, text = SHARED / "models" / "qwen3moe-tiny", SHARED / "data" / "evaltext"
    root.mkdir(parents=True, exist_ok=True)
    ids = load_token_ids(tiny, text / "heldout.txt")[: 16 * 256 + 1]
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.bfloat16).float()
    print("bf16", perplexity(base, ids, seq_len=256, progress=False), flush=True)
    for scheme in schemes:
        out = root / scheme
        if not out.exists():
            recipe = Recipe.from_dict({"scheme": scheme, "kv_cache": "fp8",
                                       "calibration": {"num_samples": 16, "seq_len": 128, "batch_size": 8}})
            moequant.quantize(str(tiny), recipe, calibration=str(text / "calib.txt"), output_dir=out, progress=False)
        model = load_model(out, loader="moequant")
        sim = simulation_of(model)
        both = perplexity(model, ids, seq_len=256, progress=False)
        sim.remove()
        weights = perplexity(model, ids, seq_len=256, progress=False)
        with Simulation(model, sim.family, SimulationPlan(sim.plan.inputs, {})):
            acts = perplexity(model, ids, seq_len=256, progress=False)
        print(scheme, json.dumps({"weights": weights, "acts": acts, "acts+kv": both}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["FP8", "W8A8", "NVFP4", "FP8_BLOCK"])
