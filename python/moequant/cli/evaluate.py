"""``moequant eval MODEL --text FILE``: perplexity of an original or quantized model."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..eval.loader import LOADERS
from . import common
from .common import CliError, positive_int

__all__ = ["add_parser", "run"]


def add_parser(sub, parent) -> None:
    """Adds the ``eval`` subcommand (``parent``: the shared -v/-q parser)."""
    e = sub.add_parser("eval", parents=[parent], help="perplexity of a model on a text file",
                       description="Perplexity with non-overlapping windows; the last stdout line is "
                       "ppl=<number>, the one before it says which runtime quantization of activations / KV cache "
                       "was simulated.")
    e.add_argument("model", metavar="MODEL", help="local model directory (original or quantized)")
    e.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    e.add_argument("--seq-len", type=positive_int, default=512, help="window length (default 512)")
    e.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    e.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    e.add_argument("--loader", choices=LOADERS, default="auto",
                   help="who reads the checkpoint: transformers, or moequant's own dequantizing loader for what "
                   "transformers cannot read (asymmetric, per-layer expert schemes, GPT-OSS/GraniteMoE experts); "
                   "default auto picks")
    e.add_argument("--no-simulate-activations", dest="simulate", action="store_false",
                   help="compute with the checkpoint's weights alone: do not simulate the runtime's quantization of "
                   "activations (W8A8 / W4A4 schemes) and of the KV cache (kv_cache fp8), which eval does by default")
    e.set_defaults(func=run)


def simulation_line(sim, simulate: bool) -> str:
    """The line eval prints before ``ppl=``: whether the runtime's activation / KV-cache quantization was
    simulated."""
    if not simulate:
        also = f"; the runtime also quantizes {sim.describe()}" if sim is not None else ""
        return f"simulated: nothing (--no-simulate-activations: weights only{also})"
    if sim is None:
        return "simulated: nothing (the checkpoint quantizes weights only)"
    return f"simulated: {sim.describe()}"


def run(args: argparse.Namespace) -> int:
    """``moequant eval``: input checks, then the perplexity; the last stdout line is ``ppl=<number>``."""
    import torch
    import transformers

    from moequant.eval import load_model, load_token_ids, perplexity, simulation_of

    model_dir = common.model_dir(args.model)
    if not Path(args.text).is_file():
        raise CliError(f"--text {args.text} not found; pass an existing UTF-8 text file")
    if args.seq_len < 2:
        raise CliError(f"--seq-len: expected an integer >= 2, got {args.seq_len}")
    common.check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from moequant.calibration.data import load_tokenizer, read_utf8
    from moequant.io.safetensors import check_checkpoint

    read_utf8(args.text, "--text")  # a file that is not UTF-8: its name and the byte offset
    check_checkpoint(model_dir)  # truncated or corrupt safetensors: one line before transformers reads them
    tokenizer = load_tokenizer(model_dir)
    ids = load_token_ids(tokenizer, args.text, seq_len=args.seq_len)
    common.logger.info("%s: %d tokens; loading %s on %s", args.text, ids.numel(), model_dir, device)
    model = load_model(model_dir, device, args.loader, simulate=args.simulate)
    ppl = perplexity(model, ids, seq_len=args.seq_len, batch_size=args.batch_size, device=device,
                     progress=common.logger.isEnabledFor(logging.INFO))
    print(simulation_line(simulation_of(model), args.simulate))
    print(f"ppl={ppl:.4f}")
    return 0

