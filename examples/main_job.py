"""The README's main job: quantize the small trained MoE shipped in examples/tiny_moe/model with GPTQ,
export a compressed-tensors checkpoint, reload it with transformers and compare perplexities.

Every step is a `moequant` CLI command, printed before it runs, so this is also a walk-through:
    python examples/main_job.py [--out out/tiny-moe-w4] [--device cpu]
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> str:
    print("$ " + " ".join(cmd), flush=True)
    t = time.time()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.PIPE, text=True)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0:
        sys.exit(f"main job: command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    print(f"  ({time.time() - t:.1f} s)\n", flush=True)
    return proc.stdout


def ppl(output: str) -> float:
    m = re.search(r"^ppl=([0-9.]+)\s*$", output.strip().splitlines()[-1])
    if not m:
        sys.exit(f"main job: could not read the perplexity from: {output.strip().splitlines()[-1]!r}")
    return float(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="examples/tiny_moe/model")
    ap.add_argument("--out", default="out/tiny-moe-w4")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("moequant"))
    model, out = args.model, args.out
    heldout, calib = "examples/data/wikitext2_heldout.txt", "examples/data/wikitext2_calib.txt"
    if not (REPO / model / "config.json").is_file():
        sys.exit(f"main job: {model} not found; it ships with the repository (examples/tiny_moe/README.md)")
    shutil.rmtree(REPO / out, ignore_errors=True)  # this job's own output from an earlier run
    shutil.rmtree(REPO / (out + ".partial"), ignore_errors=True)

    run([exe, "inspect", model])
    # The default recipe (W4 g128 symmetric GPTQ, act-order, MSE scales): a checkpoint vLLM and transformers load.
    run([exe, "quantize", model, "--out", out, "--calib", calib, "--num-samples", "64", "--seq-len", "256",
         "--device", args.device])
    rtn_out = out + "-rtn"  # the same scheme by round-to-nearest, for comparison
    shutil.rmtree(REPO / rtn_out, ignore_errors=True)
    run([exe, "-q", "quantize", model, "--out", rtn_out, "--method", "rtn", "--calib", calib, "--num-samples", "8",
         "--seq-len", "256", "--device", args.device])
    # Plain transformers, no moequant import: the checkpoint loads as it is.
    run([sys.executable, "-c", "import sys, transformers; m = transformers.AutoModelForCausalLM.from_pretrained("
         "sys.argv[1]); print(f'plain transformers loaded {type(m).__name__} from {sys.argv[1]} '"
         "f'({sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters)')", out])
    base = ppl(run([exe, "eval", model, "--text", heldout, "--seq-len", "256", "--device", args.device]))
    quant = ppl(run([exe, "eval", out, "--loader", "transformers", "--text", heldout, "--seq-len", "256",
                     "--device", args.device]))
    rtn = ppl(run([exe, "-q", "eval", rtn_out, "--text", heldout, "--seq-len", "256", "--device", args.device]))
    size = lambda d: sum(f.stat().st_size for f in (REPO / d).glob("*.safetensors"))  # noqa: E731
    print(f"bf16 perplexity       {base:.3f}  ({size(model) / 2**20:.2f} MiB of weights)")
    print(f"W4 GPTQ perplexity    {quant:.3f}  ({size(out) / 2**20:.2f} MiB, compressed-tensors pack-quantized, "
          f"reloaded with transformers)")
    print(f"W4 RTN perplexity     {rtn:.3f}  (same format, round-to-nearest)")
    print(f"checkpoint: {out}  (report: {out}/moequant_report.json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
