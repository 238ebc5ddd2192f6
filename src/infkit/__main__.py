"""``python -m infkit``: the command line of :mod:`infkit.cli`."""

import sys

from infkit.cli import main

if __name__ == "__main__":
    sys.exit(main())
