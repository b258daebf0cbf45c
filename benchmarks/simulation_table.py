"""docs/quality.md, "Simulated activations and FP8 KV cache": the trained qwen3moe-tiny in the W8A8 / W4A4 schemes
(GPTQ, 16 x 128 calibration tokens, kv_cache fp8), perplexity on the first 16 windows of 256 held-out tokens with
the weights alone, with the activations simulated, and with activations and the FP8 KV cache simulated.

    PYTHONPATH=python python benchmarks/simulation_table.py OUT_ROOT [SCHEME ...]   # default FP8 W8A8 NVFP4 FP8_BLOCK

The small protocol's helpers (``small_recipe``, ``quantize_once``, ``eval_ids``) are shared with
benchmarks/format_table.py.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import transformers

import moequant
from moequant.eval import Simulation, SimulationPlan, load_model, load_token_ids, perplexity, simulation_of
from moequant.recipe import Recipe

SHARED = Path(__file__).resolve().parents[2] / "shared"
TINY, TEXT = SHARED / "models" / "qwen3moe-tiny", SHARED / "data" / "evaltext"
SEQ_LEN = 256


def small_recipe(scheme, **extra) -> Recipe:
    """``scheme`` (a preset name or a scheme dict) with the small protocol's calibration: 16 x 128 tokens."""
    return Recipe.from_dict({"scheme": scheme, **extra,
                             "calibration": {"num_samples": 16, "seq_len": 128, "batch_size": 8}})


def quantize_once(recipe: Recipe, out: Path) -> float | None:
    """Quantizes the tiny model on calib.txt into ``out`` unless it is there already (an export is atomic: a
    present ``out`` is complete; an interrupted run's ``out.partial`` is resumed). Seconds taken, None if reused."""
    if out.exists():
        return None
    t = time.time()
    moequant.quantize(str(TINY), recipe, calibration=str(TEXT / "calib.txt"), output_dir=out, progress=False,
                      resume=out.with_name(out.name + ".partial").exists())
    return time.time() - t


def eval_ids(name: str, windows: int = 16) -> torch.Tensor:
    """The first ``windows`` windows of SEQ_LEN tokens of ``TEXT/name`` (plus the last window's target)."""
    return load_token_ids(TINY, TEXT / name)[: windows * SEQ_LEN + 1]


def load_bf16() -> torch.nn.Module:
    """The unquantized tiny model in float32 holding its bf16 weights (as load_model does on the CPU)."""
    return transformers.AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16).float()


def main(root: Path, schemes: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    ids = eval_ids("heldout.txt")
    print("bf16", perplexity(load_bf16(), ids, seq_len=SEQ_LEN, progress=False), flush=True)
    for scheme in schemes:
        out = root / scheme
        quantize_once(small_recipe(scheme, kv_cache="fp8"), out)
        model = load_model(out, loader="moequant")
        sim = simulation_of(model)
        both = perplexity(model, ids, seq_len=SEQ_LEN, progress=False)
        sim.remove()
        weights = perplexity(model, ids, seq_len=SEQ_LEN, progress=False)
        with Simulation(model, sim.family, SimulationPlan(sim.plan.inputs, {})):
            acts = perplexity(model, ids, seq_len=SEQ_LEN, progress=False)
        print(scheme, json.dumps({"weights": weights, "acts": acts, "acts+kv": both}), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:] or ["FP8", "W8A8", "NVFP4", "FP8_BLOCK"])
