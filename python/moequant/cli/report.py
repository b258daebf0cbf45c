"""``moequant report OUT``: a saved run (quantize report, and the compare result if present) as text on the
terminal and as a self-contained HTML page with figures (:mod:`moequant.eval.report_html`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from . import common
from .common import CliError

__all__ = ["add_parser", "run"]


def add_parser(sub, parent) -> None:
    """Adds the ``report`` subcommand (``parent``: the shared -v/-q parser)."""
    r = sub.add_parser("report", parents=[parent], help="show a saved run: text, and an HTML page with figures",
                       description="Prints the run's report (and compare result) and writes one self-contained "
                       "HTML page (figures inline) next to it.")
    r.add_argument("out", metavar="OUT", help="the output directory of moequant quantize")
    r.add_argument("--compare", metavar="FILE", help="a compare result (default OUT/moequant_compare.json if present)")
    r.add_argument("--html", metavar="FILE", help="where the page goes (default OUT/moequant_report.html)")
    r.add_argument("--no-html", action="store_true", help="print the text only")
    r.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from moequant.eval.report_html import HTML_FILE, load_run, render_html, render_text
    from moequant.io.files import atomic_write

    run_ = load_run(args.out, args.compare)
    path = Path(args.html) if args.html else run_.dir / HTML_FILE
    if not args.no_html and not path.parent.is_dir():
        raise CliError(f"--html {path}: directory {path.parent} not found; pass a path in an existing directory")
    page = None
    if not args.no_html:
        try:
            page = render_html(run_)
        except ImportError as exc:
            raise CliError(f"{exc}; or pass --no-html") from None
    print(render_text(run_))
    if page is not None:
        atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))
        common.logger.info("wrote %s", path)
    return 0
