"""``adsc bench``: the benchmark harness of spec section 8 (not part of the serving runtime).

- :mod:`adsc_ext.bench.cli`: arguments, checks made before anything is allocated, where results go;
- :mod:`adsc_ext.bench.suite`: the measurements, the records and the spec-8 targets;
- :mod:`adsc_ext.bench.timing`: repeated timings with their spread, and target judgement.

Imports go one way: ``cli`` -> ``suite`` -> ``timing`` (``adsc_ext.cli`` runs ``cli``; nothing here
imports ``adsc_ext.cli``). ``python -m adsc_ext.bench`` is ``adsc bench``.
"""

from .cli import add_arguments, run

__all__ = ["add_arguments", "run"]
