"""``moequant compare BASE QUANT --text FILE``: KL divergence, top-1 agreement, perplexities, per-layer errors and
routing drift of a quantized checkpoint against its original (:func:`moequant.eval.compare.compare`)."""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from . import common
from .common import CliError, positive_int

__all__ = ["add_parser", "run"]


def add_parser(sub, parent) -> None:
    """Adds the ``compare`` subcommand (``parent``: the shared -v/-q parser)."""
    c = sub.add_parser("compare", parents=[parent], help="what quantization changed: KL, agreement, routing drift",
                       description="Streams both models layer by layer over held-out text: per-token KL divergence "
                       "and top-1 agreement, both perplexities, per-layer output errors and per-MoE-layer routing "
                       "drift. Prints a summary and saves JSON (moequant report renders it).")
    c.add_argument("base", metavar="BASE", help="the original model directory")
    c.add_argument("quant", metavar="QUANT", help="the quantized model directory (moequant or llm-compressor output)")
    c.add_argument("--text", required=True, metavar="FILE",
                   help="held-out UTF-8 text (tokenized with BASE's tokenizer)")
    c.add_argument("--seq-len", type=positive_int, default=512, help="window length (default 512)")
    c.add_argument("--max-windows", type=positive_int, help="use at most this many windows (default: all)")
    c.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    c.add_argument("--error-windows", type=int, default=8,
                   help="windows the per-layer output error is measured on (default 8; 0 skips it, -1 all)")
    c.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    c.add_argument("--out", metavar="FILE", help="where the result is saved (default QUANT/moequant_compare.json)")
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``moequant compare``: input checks before any work, the comparison, the summary on stdout."""
    import torch

    from moequant.eval.compare import COMPARE_FILE, compare

    base, quant = common.model_dir(args.base), common.model_dir(args.quant)
    if not Path(args.text).is_file():
        raise CliError(f"--text {args.text} not found; pass an existing UTF-8 text file")
    if args.seq_len < 2:
        raise CliError(f"--seq-len: expected an integer >= 2, got {args.seq_len}")
    if args.error_windows < -1:
        raise CliError(f"--error-windows: expected -1 (all), 0 (none) or a count, got {args.error_windows}")
    common.check_device(args.device)
    out = Path(args.out) if args.out else quant / COMPARE_FILE
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise CliError(f"cannot write the result to {out} (no writable directory {out.parent}); pass --out FILE")
    from moequant.calibration.data import read_utf8
    from moequant.io.safetensors import check_checkpoint

    read_utf8(args.text, "--text")
    check_checkpoint(base)
    check_checkpoint(quant)
    _, fam_b = common.load_config(base)
    _, fam_q = common.load_config(quant)
    if fam_b.name != fam_q.name:
        raise CliError(f"{base} ({fam_b.name}) and {quant} ({fam_q.name}) are not the same model; pass the original "
                       f"checkpoint QUANT was quantized from")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = compare(base, quant, args.text, seq_len=args.seq_len, max_windows=args.max_windows,
                     batch_size=args.batch_size, device=device,
                     error_windows=None if args.error_windows == -1 else args.error_windows,
                     progress=common.logger.isEnabledFor(logging.INFO))
    result.save(out)
    print(result.summary())
    common.logger.info("saved %s (moequant report %s renders it)", out, quant if out.parent == quant else out.parent)
    return 0
