"""The ``moequant`` command line: ``quantize``, ``eval`` and ``inspect``.

User errors (missing files, bad values, unsupported families, an existing ``--out`` without ``--resume``, a
CUDA device without a GPU, corrupt safetensors, a missing tokenizer, non-UTF-8 text, an unwritable or full output
disk: ValueError and OSError) print one line ``moequant: error: ...`` to stderr and return exit code 2, without a
traceback (``-v`` logs it at DEBUG). Ctrl-C (SIGINT) and SIGTERM unwind the run like an exception (temporary
outputs are removed, a quantize run stays resumable), print ``moequant: interrupted`` and return 130 / 143.
Logging goes to stderr (INFO; ``-v`` DEBUG, ``-q`` warnings only); stdout carries only the results (the report
summary, ``ppl=<number>`` as the last line of ``eval``, the inspection).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import re
import signal
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["main", "build_parser", "model_summary"]

logger = logging.getLogger("moequant.cli")
_EXPERT_PROJS = 3  # gate, up, down


class CliError(Exception):
    """A user error: reported as one ``moequant: error: ...`` line and exit code 2."""


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the CLI's SIGTERM handler: unwinds like Ctrl-C (``finally`` blocks and context
    managers clean up); ``main`` reports it and returns ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise :class:`CliError` instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise CliError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``moequant`` (subcommands ``quantize``, ``eval``, ``inspect``)."""
    common = _Parser(add_help=False)  # -v/-q also after the subcommand; SUPPRESS keeps a value given before it
    g = common.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only")
    parser = _Parser(prog="moequant", parents=[common],
                     description="Post-training quantization of Mixture-of-Experts LLMs to compressed-tensors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quantize,eval,inspect,ebss}")

    q = sub.add_parser("quantize", parents=[common], help="quantize a model into a compressed-tensors checkpoint",
                       description="Quantize MODEL into --out. Flags given explicitly override the recipe file; "
                       "flags left out keep the recipe's values (or the defaults without --recipe).")
    q.add_argument("model", metavar="MODEL", help="local Hugging Face model directory")
    q.add_argument("--out", required=True, metavar="DIR", help="output directory (must not exist)")
    q.add_argument("--recipe", metavar="FILE", help="recipe file (.yaml/.yml/.json), see docs/recipes.md")
    q.add_argument("--bits", type=int, help="code width 2..8 (default 4)")
    q.add_argument("--group-size", type=int, help="columns per scale, -1 = per-channel (default 128)")
    q.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                   help="symmetric codes without zero points (default); --no-symmetric: asymmetric, with zero points "
                        "(loads in vLLM at 4 and 8 bits, not in transformers: docs/export.md)")
    q.add_argument("--method", choices=("gptq", "rtn"), help="default gptq")
    q.add_argument("--calib", action="append", metavar="FILE",
                   help="calibration text file (*.jsonl: JSONL samples); repeat for several")
    q.add_argument("--num-samples", type=_positive_int, help="calibration samples (default 128)")
    q.add_argument("--seq-len", type=_positive_int, help="calibration sample length in tokens (default 512)")
    q.add_argument("--device", help="cpu, cuda or cuda:N (default: the recipe's, else chosen by the pipeline)")
    q.add_argument("--resume", action="store_true", help="continue the unfinished run in DIR.partial")
    q.add_argument("--format", choices=("pack-quantized", "dequantized"), default="pack-quantized",
                   help="checkpoint format (default pack-quantized)")
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", parents=[common], help="perplexity of a model on a text file",
                       description="Perplexity with non-overlapping windows; the last stdout line is ppl=<number>.")
    e.add_argument("model", metavar="MODEL", help="local model directory (original or quantized)")
    e.add_argument("--text", required=True, metavar="FILE", help="UTF-8 text file")
    e.add_argument("--seq-len", type=_positive_int, default=512, help="window length (default 512)")
    e.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    e.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass (default 8)")
    e.add_argument("--loader", choices=("auto", "transformers", "moequant"), default="auto",
                   help="who reads the checkpoint: transformers, or moequant's own dequantizing loader for what "
                   "transformers cannot read (asymmetric, per-layer expert schemes, GPT-OSS/GraniteMoE experts); "
                   "default auto picks")
    e.set_defaults(func=_cmd_eval)

    i = sub.add_parser("inspect", parents=[common], help="describe a model and what the default recipe quantizes")
    i.add_argument("model", metavar="MODEL", help="local model directory")
    i.set_defaults(func=_cmd_inspect)

    b = sub.add_parser("ebss", parents=[common], help="generate expert-balanced calibration data (MoEQuant EBSS)",
                       description="Generate calibration sequences from MODEL itself (beam search scored by "
                       "log-probability and expert balance) into a JSONL file usable with --calib FILE.jsonl.")
    b.add_argument("model", metavar="MODEL", help="local Hugging Face MoE model directory")
    b.add_argument("--out", required=True, metavar="FILE.jsonl", help="output JSONL (+ FILE.jsonl.meta.json)")
    b.add_argument("--num-samples", type=_positive_int, default=128, help="sequences (default 128)")
    b.add_argument("--seq-len", type=_positive_int, default=512, help="tokens per sequence (default 512)")
    b.add_argument("--beam", type=_positive_int, default=4, help="beam width w (default 4)")
    b.add_argument("--tau", type=float, default=1.2, help="balance temperature tau (default 1.2)")
    b.add_argument("--no-balance", action="store_true", help="drop the balance term (plain beam search)")
    b.add_argument("--seed", type=int, default=0, help="seed of the first tokens (default 0)")
    b.add_argument("--batch-size", type=_positive_int, default=8, help="samples generated together (default 8)")
    b.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    b.set_defaults(func=_cmd_ebss)
    return parser


def _cmd_ebss(args: argparse.Namespace) -> int:
    from moequant import ebss

    model_dir = _model_dir(args.model)
    _check_device(args.device)
    _load_config(model_dir)  # unsupported families fail here with a clear message
    if not args.out.endswith(".jsonl"):
        raise CliError(f"--out: expected a *.jsonl path, got {args.out!r}")
    if Path(args.out).exists() or Path(args.out).is_symlink():
        raise CliError(f"--out {args.out} already exists; choose another --out or delete it")
    # ebss.run refuses an --out that appears meanwhile, and writes the JSONL and its .meta.json atomically
    res = ebss.run(model_dir, args.out, device=args.device, num_samples=args.num_samples, seq_len=args.seq_len,
                   beam=args.beam, tau=args.tau, balance=not args.no_balance, seed=args.seed,
                   batch_size=args.batch_size)
    n = max(len(res.sigma), 1)
    print(f"wrote {len(res.sequences)} sequences of {args.seq_len} tokens to {args.out} "
          f"(mean sigma {sum(res.sigma) / n:.4f}, mean nll {sum(res.nll) / n:.3f}, {res.seconds:.1f} s)")
    return 0


# ---------------------------------------------------------------------------- checks
def _model_dir(path: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise CliError(f"model directory {p} not found; pass a local Hugging Face model directory")
    if not (p / "config.json").is_file():
        raise CliError(f"{p} has no config.json; pass a Hugging Face model directory")
    return p


def _check_device(device: Optional[str]) -> None:
    """The --device checks with CLI messages and exit code 2: the recipe's device grammar, then whether that CUDA
    device exists (pipeline.resolve_device checks only that some GPU is available, and the CLI does not import
    the pipeline before the run)."""
    from moequant.recipe import _DEVICE_RE

    if device is None:
        return
    if not _DEVICE_RE.fullmatch(device):
        raise CliError(f"--device: expected cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise CliError(f"--device {device}: no CUDA GPU is available (torch.cuda.is_available() is False); "
                           "use --device cpu")
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise CliError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")


def _load_config(model_dir: Path):
    import transformers

    from moequant.models import detect_family

    try:
        config = transformers.AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {model_dir / 'config.json'}: {exc}") from exc
    return config, detect_family(config)


# ---------------------------------------------------------------------------- quantize
def _cmd_quantize(args: argparse.Namespace) -> int:
    from moequant.recipe import Recipe

    model = _model_dir(args.model)
    out = Path(args.out)
    partial = out.with_name(out.name + ".partial")
    if out.exists():  # the pipeline writes --out atomically at the end; an unfinished run lives in <out>.partial
        raise CliError(f"--out {out} already exists; choose another --out or delete it" +
                       (f" (--resume continues an unfinished run from {partial})" if args.resume else ""))
    if partial.exists() and not args.resume:
        from moequant.workdir import lock_holder

        holder = lock_holder(partial)
        if holder is not None:
            raise CliError(f"{partial} is in use by another moequant run ({holder}); wait for it to finish or stop "
                           "it")
        raise CliError(f"{partial} holds an unfinished run; pass --resume to continue it, or delete it")
    recipe = Recipe.from_cli(args.recipe, bits=args.bits, group_size=args.group_size, symmetric=args.symmetric,
                             method=args.method, calib=args.calib, num_samples=args.num_samples,
                             seq_len=args.seq_len, device=args.device)
    _check_device(recipe.device)
    cal = recipe.calibration
    if not (cal.text_files or cal.jsonl_files):  # the pipeline calibrates layer by layer, even for rtn
        raise CliError("no calibration data; pass --calib FILE (or set calibration.text_files in the recipe)")
    for f in cal.text_files + cal.jsonl_files:
        if not Path(f).is_file():
            raise CliError(f"calibration file {f} not found; pass an existing file with --calib")
    config, family = _load_config(model)
    logger.info("model %s: family %s; recipe %s", model, family.name, recipe.scheme.describe())
    try:
        pipeline = importlib.import_module("moequant.pipeline")
    except ModuleNotFoundError as exc:
        if exc.name != "moequant.pipeline":
            raise
        print("moequant: error: this installation has no quantization pipeline (moequant.pipeline)", file=sys.stderr)
        return 1
    report = pipeline.quantize(str(model), recipe, output_dir=str(out), resume=args.resume,
                               export_format=args.format, progress=logger.isEnabledFor(logging.INFO))
    print(report.summary() if hasattr(report, "summary") else report)
    table = report.utilization_table() if hasattr(report, "utilization_table") else ""
    if table:
        print("tokens per expert (columns: experts, darker = more tokens):")
        print(table)
    return 0


# ---------------------------------------------------------------------------- eval
def _cmd_eval(args: argparse.Namespace) -> int:
    import torch
    import transformers

    from moequant.evaluation import load_model, load_token_ids, perplexity

    model_dir = _model_dir(args.model)
    if not Path(args.text).is_file():
        raise CliError(f"--text {args.text} not found; pass an existing UTF-8 text file")
    if args.seq_len < 2:
        raise CliError(f"--seq-len: expected an integer >= 2, got {args.seq_len}")
    _check_device(args.device)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    from moequant.data import load_tokenizer, read_utf8
    from moequant.loading import check_checkpoint

    read_utf8(args.text, "--text")  # a file that is not UTF-8: its name and the byte offset
    check_checkpoint(model_dir)  # truncated or corrupt safetensors: one line before transformers reads them
    tokenizer = load_tokenizer(model_dir)
    ids = load_token_ids(tokenizer, args.text, seq_len=args.seq_len)
    logger.info("%s: %d tokens; loading %s on %s", args.text, ids.numel(), model_dir, device)
    model = load_model(model_dir, device, args.loader)
    ppl = perplexity(model, ids, seq_len=args.seq_len, batch_size=args.batch_size, device=device,
                     progress=logger.isEnabledFor(logging.INFO))
    print(f"ppl={ppl:.4f}")
    return 0


# ---------------------------------------------------------------------------- inspect
def _group_name(name: str) -> str:
    return re.sub(r"\.(layers|experts)\.\d+(?=\.|$)", r".\1.*", name)


def model_summary(model_path: str, recipe=None) -> dict:
    """Structure of a model directory (built on the meta device, no weights read) and what ``recipe`` (default:
    ``Recipe()``) quantizes, resolving modules by checkpoint name like the pipeline.

    Returns a dict with ``family``, ``model_type``, ``layers``, ``moe_layers``, ``dense_layers``,
    ``experts_per_layer`` (sorted distinct counts), ``top_k``, ``hidden_size``, ``intermediate_size`` (dense MLP,
    from the config), ``moe_intermediate_size`` (sorted distinct expert widths), ``shared_expert``, ``parameters``,
    ``expert_parameters``, ``tied_embeddings``, ``recipe`` (label of the base scheme), ``quantized_linears``,
    ``quantized_experts``, ``quantized_expert_matrices`` and ``high_precision`` ({grouped name: count}).
    """
    import torch
    import transformers
    from torch import nn

    from moequant.models import get_path, intermediate_size, linear_modules, num_experts, text_config
    from moequant.recipe import Recipe

    config, family = _load_config(_model_dir(model_path))
    text_cfg = text_config(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    recipe = Recipe() if recipe is None else recipe
    experts, widths, top_k, quant, high = [], [], set(), [], Counter()
    moe_layers = shared = n_exp = 0
    expert_params = 0
    in_layers: set[str] = set()
    for _, prefix, layer in family.iter_layers(model):
        in_layers.add(prefix)
        for p in family.high_precision:  # router, shared_expert_gate, family extras
            if get_path(layer, p) is not None:
                high[_group_name(family.disk_name(f"{prefix}.{p}"))] += 1
        for name in linear_modules(layer, family, prefix):  # resolved by checkpoint name, like the pipeline
            disk = family.disk_name(name)
            if recipe.resolve(disk) is None:
                high[_group_name(disk)] += 1
            else:
                quant.append(disk)
        ex = family.experts_of(layer)
        if ex is None:
            continue
        moe_layers += 1
        shared += family.shared_expert_of(layer) is not None
        experts.append(num_experts(ex))
        widths.append(intermediate_size(ex, family))
        expert_params += sum(p.numel() for p in ex.parameters())
        router = family.router_of(layer)
        if getattr(router, "top_k", None) is not None:
            top_k.add(int(router.top_k))
        for e in range(num_experts(ex)):
            for name in family.disk_expert_names(prefix, e).values():
                if recipe.resolve(name) is None:
                    high[_group_name(name)] += 1
                else:
                    quant.append(name)
                    n_exp += 1
    for name, mod in model.named_modules():  # outside the decoder layers: embeddings, lm_head (never quantized)
        if isinstance(mod, (nn.Linear, nn.Embedding)) and not any(name.startswith(p + ".") for p in in_layers):
            high[name] += 1
    if not top_k:
        for key in ("num_experts_per_tok", "moe_topk", "top_k"):
            if isinstance(getattr(text_cfg, key, None), int):
                top_k.add(getattr(text_cfg, key))
                break
    out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
    return {
        "family": family.name, "model_type": getattr(text_cfg, "model_type", None),
        "layers": len(family.layers(model)), "moe_layers": moe_layers,
        "dense_layers": len(family.layers(model)) - moe_layers, "experts_per_layer": sorted(set(experts)),
        "top_k": sorted(top_k), "hidden_size": getattr(text_cfg, "hidden_size", None),
        "intermediate_size": getattr(text_cfg, "intermediate_size", None),
        "moe_intermediate_size": sorted(set(widths)), "shared_expert": shared,
        "parameters": sum(p.numel() for p in model.parameters()), "expert_parameters": expert_params,
        "tied_embeddings": out_emb is not None and in_emb is not None and out_emb.weight is in_emb.weight,
        "recipe": recipe.scheme.describe(), "quantized_linears": len(quant) - n_exp,
        "quantized_experts": n_exp // _EXPERT_PROJS, "quantized_expert_matrices": n_exp,
        "high_precision": dict(high),
    }


def _fmt(values: list) -> str:
    return ", ".join(str(v) for v in values) if values else "-"


def _cmd_inspect(args: argparse.Namespace) -> int:
    from moequant.loading import check_checkpoint, has_checkpoint

    s = model_summary(args.model)
    weights = "none (config.json only)"
    if has_checkpoint(args.model):  # headers and file sizes only: truncated or corrupt files are an error
        index = check_checkpoint(args.model)
        weights = f"{len(index.files)} safetensors file(s), {len(index.tensors)} tensors, " \
                  f"{index.total_bytes / 1e9:.2f} GB (headers checked)"
    total = s["parameters"]
    lines = [
        f"model: {args.model}",
        f"family: {s['family']} (model_type {s['model_type']})",
        f"layers: {s['layers']} (MoE {s['moe_layers']}, dense {s['dense_layers']})",
        f"experts per layer: {_fmt(s['experts_per_layer'])}",
        f"top-k: {_fmt(s['top_k'])}",
        f"shared expert: {'yes' if s['shared_expert'] else 'no'}",
        f"hidden size: {s['hidden_size']}",
        f"intermediate size (dense MLP): {s['intermediate_size']}",
        f"moe intermediate size: {_fmt(s['moe_intermediate_size'])}",
        f"parameters: {total:,} ({total / 1e6:.1f}M; routed experts {s['expert_parameters']:,}, "
        f"{100 * s['expert_parameters'] / max(total, 1):.1f}%)" + ("; tied embeddings" if s["tied_embeddings"] else ""),
        f"default recipe: {s['recipe']}",
        f"quantized: {s['quantized_linears']} Linears + {s['quantized_experts']} experts x {_EXPERT_PROJS} projections "
        f"({s['quantized_linears'] + s['quantized_expert_matrices']} weight matrices)",
        "high precision: " + (", ".join(f"{k} (x{v})" if v > 1 else k for k, v in s["high_precision"].items())
                              or "-"),
        f"weights: {weights}",
    ]
    print("\n".join(lines))
    return 0


# ---------------------------------------------------------------------------- entry point
def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the ``moequant`` command line; returns the exit code (0 ok, 2 user error, 130 Ctrl-C, 143 SIGTERM)."""
    parser = build_parser()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("moequant")
    old_level = root.level
    root.addHandler(handler)
    # SIGTERM unwinds like Ctrl-C (signal handlers can only be set from the main thread; restored on return)
    in_main_thread = threading.current_thread() is threading.main_thread()
    old_sigterm = signal.signal(signal.SIGTERM, _raise_terminated) if in_main_thread else None
    try:
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:  # --help
            return int(exc.code or 0)
        verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
        if verbose and quiet:
            raise CliError("-v/--verbose and -q/--quiet exclude each other")
        root.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
        return args.func(args)
    except (CliError, ValueError, OSError) as exc:  # OSError: missing files, unwritable or full output, ...
        if not isinstance(exc, CliError):
            logger.debug("error details", exc_info=True)
        print(f"moequant: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print("moequant: interrupted", file=sys.stderr)
        return 128 + getattr(exc, "signum", signal.SIGINT)
    finally:
        if in_main_thread:  # None: a handler not set from Python, which cannot be restored
            signal.signal(signal.SIGTERM, signal.SIG_DFL if old_sigterm is None else old_sigterm)
        root.removeHandler(handler)
        root.setLevel(old_level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
