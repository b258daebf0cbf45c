"""``moequant compare`` against the plain alternative: one forward pass of each of the two whole models over the same
tokens (the issue-15 target: compare is at least as fast).

A Qwen3-30B-A3B-shaped model with random bf16 weights and ``--layers`` decoder layers (hidden 2048, 128 experts of
width 768, top-8, 32 query / 4 KV heads of 128, vocab 151,936) is saved, quantized with RTN (W4 g128, min/max
scales: the quantized checkpoint's contents do not matter for the timing), then:

* ``baseline``: both checkpoints loaded whole onto the device by transformers (``moequant.eval.load_model``, as
  ``moequant eval`` loads them: the quantized one decompressed; bf16 on a GPU, float32 on the CPU, like compare), a
  forward pass of each over the windows, batch by batch, with the next-token log-probabilities computed in fp32
  (what any KL measurement needs); loading is not timed;
* ``compare``: :func:`moequant.eval.compare.compare` over the same windows, end to end (opening the checkpoints,
  streaming the layers from disk, the per-layer errors on ``--error-windows`` windows, routing drift, KL).

    python benchmarks/bench_compare.py --layers 4 --windows 64 --seq-len 512 [--device cuda] [--work DIR]
    python benchmarks/bench_compare.py --shape smoke --layers 2 --windows 8 --seq-len 64 --device cpu  # script check
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


SHAPES = {  # Qwen3-30B-A3B; "smoke": a CPU check of this script
    "qwen3-30b-a3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                          num_experts_per_tok=8),
    "smoke": dict(vocab_size=8192, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2),
}


def make_model(path: Path, layers: int, tokenizer_from: Path, shape: str) -> Path:
    import transformers

    cfg = transformers.Qwen3MoeConfig(num_hidden_layers=layers, max_position_embeddings=4096,
                                      tie_word_embeddings=False, norm_topk_prob=True, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = transformers.Qwen3MoeForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    transformers.AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(path)
    return path


@torch.no_grad()
def baseline(dirs: list, windows: torch.Tensor, batch: int, device: str) -> float:
    from moequant.eval import load_model

    models = [load_model(d, device) for d in dirs]  # bf16 on a GPU, float32 on the CPU, decompressed
    torch.cuda.synchronize() if device.startswith("cuda") else None
    t = time.perf_counter()
    for b in windows.split(batch):
        b = b.to(device)
        for m in models:
            torch.log_softmax(m(input_ids=b).logits.float(), -1)
    torch.cuda.synchronize() if device.startswith("cuda") else None
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--error-windows", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--work", help="keep the checkpoints here (default: a temporary directory)")
    args = ap.parse_args(argv)
    from moequant import pipeline
    from moequant.eval.compare import compare
    from moequant.recipe import CalibrationConfig, QuantScheme, Recipe

    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        base, quant = work / "base", work / "rtn-w4"
        if not base.exists():
            make_model(base, args.layers, repo / "examples" / "tiny_moe" / "tokenizer", args.shape)
        if not quant.exists():
            ids = torch.randint(0, 8000, (8, 512), generator=torch.Generator().manual_seed(0))
            recipe = Recipe(scheme=QuantScheme(method="rtn", scale_search="minmax", act_order=False,
                                               group_size=128 if args.shape != "smoke" else 32),
                            calibration=CalibrationConfig(num_samples=8, seq_len=512), device=args.device)
            pipeline.quantize(base, recipe, ids, output_dir=quant, progress=False)
        windows = torch.randint(0, 8000, (args.windows, args.seq_len), generator=torch.Generator().manual_seed(1))
        t_base = baseline([base, quant], windows, args.batch_size, args.device)
        flat = windows.reshape(-1)
        flat = torch.cat([flat, flat[:1]])  # one token more: the protocol keeps the last full window
        t = time.perf_counter()
        r = compare(base, quant, token_ids=flat, seq_len=args.seq_len, batch_size=args.batch_size,
                    error_windows=args.error_windows, device=args.device, progress=False)
        t_cmp = time.perf_counter() - t
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"{name}: {args.layers} layers, {r.tokens} tokens: one forward of both models {t_base:.2f} s (loaded "
          f"beforehand), compare {t_cmp:.2f} s end to end ({t_cmp / t_base:.2f}x); KL mean {r.kl_mean:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
