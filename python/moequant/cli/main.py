"""The ``moequant`` command line: ``quantize``, ``eval``, ``compare``, ``report``, ``inspect`` and ``ebss`` (one
module each).

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
import logging
import signal
import sys
import threading
from typing import Optional, Sequence

from . import compare, ebss, evaluate, inspect_model, quantize, report
from .common import CliError, Parser

__all__ = ["main", "build_parser", "Terminated"]

logger = logging.getLogger("moequant.cli")

_SUBCOMMANDS = (quantize, evaluate, compare, report, inspect_model, ebss)  # in the order of the help


class Terminated(KeyboardInterrupt):
    """Raised in the main thread by the CLI's SIGTERM handler: unwinds like Ctrl-C (``finally`` blocks and context
    managers clean up); ``main`` reports it and returns ``128 + signum``."""

    def __init__(self, signum: int):
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)



def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``moequant`` (subcommands ``quantize``, ``eval``, ``compare``, ``report``, ``inspect``,
    ``ebss``)."""
    common = Parser(add_help=False)  # -v/-q also after the subcommand; SUPPRESS keeps a value given before it
    g = common.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="warnings only")
    parser = Parser(prog="moequant", parents=[common],
                    description="Post-training quantization of Mixture-of-Experts LLMs to compressed-tensors.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{quantize,eval,compare,report,inspect,ebss}")
    for module in _SUBCOMMANDS:
        module.add_parser(sub, common)
    return parser


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
