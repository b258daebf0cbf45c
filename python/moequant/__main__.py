"""``python -m moequant``: the same command line as the ``moequant`` console script."""
import sys

from moequant.cli import main

if __name__ == "__main__":
    sys.exit(main())
