"""``python -m adsc_ext ...`` is the ``adsc`` command."""

from .cli import main

raise SystemExit(main())
