"""Run the ADSC benchmarks: ``python benchmarks/bench.py [--tiny] ...`` (= ``adsc bench``).

Results go to this checkout's ``benchmarks/results/<device>-<date>.json`` (+ a PNG plot with the
``[bench]`` extra's matplotlib) unless ``--out-dir`` says otherwise. See :mod:`adsc_ext.bench.suite`
for the metrics.
"""

import sys

from adsc_ext.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
