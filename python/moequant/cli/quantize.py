"""``moequant quantize MODEL --out DIR``: a recipe (file and flags) through the pipeline into a checkpoint."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from ..formats.schemes import PRESET_ALIASES, PRESETS, preset
from ..methods.registry import default_solvers
from . import common
from .common import CliError, positive_int

__all__ = ["add_parser", "run"]

_PRESET_NAMES = list(PRESETS) + list(PRESET_ALIASES)


def _preset(value: str) -> str:
    """``--scheme``: a preset name (case-insensitive), else the parser's one-line error listing them."""
    try:
        return preset(value).name
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(_PRESET_NAMES)}, got {value!r}") from None


def add_parser(sub, parent) -> None:
    """Adds the ``quantize`` subcommand (``parent``: the shared -v/-q parser)."""
    q = sub.add_parser("quantize", parents=[parent], help="quantize a model into a compressed-tensors checkpoint",
                       description="Quantize MODEL into --out. Flags given explicitly override the recipe file; "
                       "flags left out keep the recipe's values (or the defaults without --recipe). Under torchrun "
                       "(torchrun --nproc-per-node N -m moequant quantize ...) the ranks share the work and rank 0 "
                       "writes (docs/distributed.md).")
    q.add_argument("model", metavar="MODEL", help="local Hugging Face model directory")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    q.add_argument("--recipe", metavar="FILE", help="recipe file (.yaml/.yml/.json), see docs/recipes.md")
    q.add_argument("--scheme", type=_preset, metavar="NAME",
                   help="a named scheme (llm-compressor's names): " + ", ".join(_PRESET_NAMES) +
                   "; applied before --bits / --group-size / --symmetric / --method (docs/recipes.md)")
    q.add_argument("--bits", type=int, help="code width 2..8 (default 4)")
    q.add_argument("--group-size", type=int, help="columns per scale, -1 = per-channel (default 128)")
    q.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric codes without zero points (default); --no-symmetric: asymmetric, with zero points "
                        "(loads in vLLM at 4 and 8 bits, not in transformers: docs/export.md)")
    q.add_argument("--method", choices=default_solvers().names(),
                   help="the solver, a registered method (default gptq)")
    q.add_argument("--calib", action="append", metavar="FILE",
                   help="calibration text file (*.jsonl: JSONL samples); repeat for several")
    q.add_argument("--num-samples", type=positive_int, help="calibration samples (default 128)")
    q.add_argument("--seq-len", type=positive_int, help="calibration sample length in tokens (default 512)")
    q.add_argument("--device", help="cpu, cuda or cuda:N (default: the recipe's, else chosen by the pipeline)")
    q.add_argument("--device-memory-gb", type=float, metavar="GB",
                   help="memory of the device one MoE layer may use; its experts go through it in groups that fit "
                   "(default: the GPU's free memory less 2 GiB)")
    q.add_argument("--host-memory-gb", type=float, metavar="GB",
                   help="host memory the calibration hidden states may use; beyond it they live in a disk-backed "
                   "store in DIR.partial (0: always; default: half of the available memory after one layer)")
    q.add_argument("--budget", metavar="BITS|SIZE",
                   help="budgeted mixed precision: average bits per weight, scales included (e.g. 3.5), or a "
                   "checkpoint size (e.g. 12GB, 800MiB); each module group gets the candidate scheme that minimises "
                   "the measured error within it (recipe section budget, docs/recipes.md); runs a measurement pass "
                   "first")
    q.add_argument("--kv-cache", choices=("fp8", "none"), metavar="fp8|none",
                   help="fp8: calibrate per-tensor k_scale / v_scale of every attention for an FP8 KV cache "
                   "(llm-compressor's kv_cache_scheme; vLLM --kv-cache-dtype fp8); none: no KV-cache quantization "
                   "(default: the recipe's kv_cache, else none)")
    q.add_argument("--resume", action="store_true", help="continue the unfinished run in DIR.partial")
    q.add_argument("--format", choices=("pack-quantized", "dequantized"), default="pack-quantized",
                   help="checkpoint format (default pack-quantized)")
    q.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """``moequant quantize``: checks, then :func:`moequant.pipeline.quantize`, then the report summary."""
    from moequant.recipe import Recipe

    model = common.model_dir(args.model)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    if out.exists():  # the pipeline writes --out atomically at the end; an unfinished run lives in <out>.partial
        raise CliError(f"--out {out} already exists; choose another --out or delete it" +
                       (f" (--resume continues an unfinished run from {partial})" if args.resume else ""))
    if partial.exists() and not args.resume:
        from moequant.pipeline.lock import lock_holder

        holder = lock_holder(partial)
        if holder is not None:
            raise CliError(f"{partial} is in use by another moequant run ({holder}); wait for it to finish or stop "
                           "it")
        raise CliError(f"{partial} holds an unfinished run; pass --resume to continue it, or delete it")
    recipe = Recipe.from_cli(args.recipe, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                             method=args.method, calib=args.calib, num_samples=args.num_samples,
                             seq_len=args.seq_len, device=args.device, device_memory_gb=args.device_memory_gb,
                             host_memory_gb=args.host_memory_gb, scheme=args.scheme, budget=args.budget,
                             kv_cache=args.kv_cache)
    common.check_device(recipe.device)
    cal = recipe.calibration
    if not (cal.text_files or cal.jsonl_files):  # the pipeline calibrates layer by layer, even for rtn
        raise CliError("no calibration data; pass --calib FILE (or set calibration.text_files in the recipe)")
    for f in cal.text_files + cal.jsonl_files:
        if not Path(f).is_file():
            raise CliError(f"calibration file {f} not found; pass an existing file with --calib")
    config, family = common.load_config(model)
    common.logger.info("model %s: family %s; recipe %s", model, family.name, recipe.scheme.describe())
    try:
        pipeline = importlib.import_module("moequant.pipeline")
    except ModuleNotFoundError as exc:
        if exc.name != "moequant.pipeline":
            raise
        print("moequant: error: this installation has no quantization pipeline (moequant.pipeline)", file=sys.stderr)
        return 1
    # torchrun (WORLD_SIZE > 1): one process per rank, a process group made here (docs/distributed.md)
    owned = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from moequant.pipeline.distributed import init_from_env

        device = recipe.device if recipe.device not in (None, "auto") else \
            ("cuda" if importlib.import_module("torch").cuda.is_available() else "cpu")
        owned = init_from_env(device)
    try:
        report = pipeline.quantize(str(model), recipe, output_dir=str(out), resume=args.resume,
                                   export_format=args.format, progress=common.logger.isEnabledFor(logging.INFO))
    finally:
        if owned:
            importlib.import_module("torch.distributed").destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 prints the summary of a distributed run
        return 0
    print(report.summary() if hasattr(report, "summary") else report)
    budget = report.budget_table() if hasattr(report, "budget_table") else ""
    if budget:
        print(budget)
    table = report.utilization_table() if hasattr(report, "utilization_table") else ""
    if table:
        print("tokens per expert (columns: experts, darker = more tokens):")
        print(table)
    return 0

