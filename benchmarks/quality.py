"""Quality gate: perplexity of moequant-quantized checkpoints of a trained MoE.

Protocol (same as ../shared/tools/ref_baseline.py): calibration = 128 random windows of 512 tokens of
calib.txt (seed 0), perplexity over non-overlapping 512-token windows of heldout.txt and wt2_test.txt,
all Linears of the decoder layers and every routed expert quantized, router / embeddings / lm_head in bf16.
Each row quantizes, exports (dequantized bf16 weights, which equal what the pack-quantized checkpoint
decompresses to), reloads with transformers and evaluates.

    python benchmarks/quality.py --model ../shared/models/qwen3moe-tiny --text-dir ../shared/data/evaltext \
        --configs gptq-w4,gptq-w3 [--device cuda] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

_PLAIN = dict(scale_search="minmax", act_order=False)  # the reference's plain GPTQ / RTN
CONFIGS = {
    "rtn-w4": dict(bits=4, method="rtn", **_PLAIN),
    "rtn-w3": dict(bits=3, method="rtn", **_PLAIN),
    "gptq-w4": dict(bits=4, method="gptq", **_PLAIN),
    "gptq-w3": dict(bits=3, method="gptq", **_PLAIN),
    "gptq-ao-w4": dict(bits=4, method="gptq", act_order=True, scale_search="minmax"),
    "gptq-ao-w3": dict(bits=3, method="gptq", act_order=True, scale_search="minmax"),
    "gptq-mse-w4": dict(bits=4, method="gptq", scale_search="mse", act_order=False),
    "gptq-mse-w3": dict(bits=3, method="gptq", scale_search="mse", act_order=False),
    "gptq-ao-mse-w4": dict(bits=4, method="gptq", act_order=True, scale_search="mse"),
    "gptq-ao-mse-w3": dict(bits=3, method="gptq", act_order=True, scale_search="mse"),
}


def evaluate(model_dir: str, held: torch.Tensor, wt2: torch.Tensor, device: str, seq_len: int) -> dict:
    import transformers

    from moequant.evaluation import perplexity

    # bf16 matmuls are slow on most CPUs: evaluate in float32 there (the weights are bf16 values either way)
    on_gpu = str(device).startswith("cuda")
    extra = {} if on_gpu else {"experts_implementation": "eager"}  # fastest on CPUs
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, **extra)
    model = (model if on_gpu else torch.nn.Module.float(model)).to(device).eval()
    out = {"heldout": perplexity(model, held, seq_len=seq_len, device=device, progress=False),
           "wt2": perplexity(model, wt2, seq_len=seq_len, device=device, progress=False)}
    del model
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="../shared/models/qwen3moe-tiny")
    ap.add_argument("--text-dir", default="../shared/data/evaltext")
    ap.add_argument("--configs", default="gptq-w4,gptq-w3", help=f"comma list of {sorted(CONFIGS)} or 'bf16'")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--num-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument("--json", help="write the results table here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from moequant import pipeline
    from moequant.evaluation import load_token_ids
    from moequant.recipe import CalibrationConfig, QuantScheme, Recipe

    td = Path(args.text_dir)
    for f in ("calib.txt", "heldout.txt", "wt2_test.txt"):
        if not (td / f).is_file():
            print(f"quality: {td / f} not found (pass --text-dir)", file=sys.stderr)
            return 2
    held = load_token_ids(args.model, td / "heldout.txt")
    wt2 = load_token_ids(args.model, td / "wt2_test.txt")
    rows = {}
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    for name in names:
        t = time.time()
        if name == "bf16":
            res = evaluate(args.model, held, wt2, args.device, args.seq_len)
            qsec = 0.0
        else:
            scheme = QuantScheme(group_size=args.group_size, symmetric=args.symmetric, **CONFIGS[name])
            recipe = Recipe(scheme=scheme, device=args.device,
                            calibration=CalibrationConfig(text_files=[str(td / "calib.txt")],
                                                          num_samples=args.num_samples, seq_len=args.seq_len))
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "q"
                report = pipeline.quantize(args.model, recipe, output_dir=out, export_format="dequantized",
                                           progress=False)
                qsec = report.seconds
                res = evaluate(str(out), held, wt2, args.device, args.seq_len)
        res = {k: round(v, 3) for k, v in res.items()}
        res.update(quantize_seconds=round(qsec, 1), total_seconds=round(time.time() - t, 1))
        rows[name] = res
        print(f"{name:12s} heldout {res['heldout']:.3f}  wt2 {res['wt2']:.2f}  quantize {qsec:.1f} s "
              f"(device {args.device})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": args.device, "model": args.model, "rows": rows,
                                               "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
