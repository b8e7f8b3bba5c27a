"""``python -m adsc_ext.train``: the same as ``adsc train`` (and what ``accelerate launch -m`` /
``torchrun -m`` start in every process)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
