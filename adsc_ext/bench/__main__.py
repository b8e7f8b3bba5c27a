"""``python -m adsc_ext.bench ...`` is ``adsc bench ...``."""

import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
