"""The ``moequant`` command line (:func:`main`): :mod:`~moequant.cli.main` (parser, entry point, exit codes),
one module per subcommand (:mod:`~moequant.cli.quantize`, :mod:`~moequant.cli.evaluate`,
:mod:`~moequant.cli.inspect_model`, :mod:`~moequant.cli.ebss`) and what they share (:mod:`~moequant.cli.common`)."""
from . import common
from .common import CliError
from .inspect_model import model_summary
from .main import Terminated, build_parser, main

__all__ = ["main", "build_parser", "model_summary", "CliError", "Terminated", "common"]
