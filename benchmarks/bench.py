"""Run the ADSC benchmarks: ``python benchmarks/bench.py [--tiny] ...`` (= ``adsc bench``).

Results go to ``benchmarks/results/<device>-<date>.json`` (+ a PNG plot when matplotlib is
installed). See :mod:`adsc_ext.runtime.bench_cli` for the metrics.
"""

import sys

from adsc_ext.runtime.bench_cli import main

if __name__ == "__main__":
    sys.exit(main())
