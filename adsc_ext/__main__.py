"""``python -m adsc_ext ...`` is the ``adsc`` command, plus ``--cmake-prefix-path``.

``python -m adsc_ext --cmake-prefix-path`` prints the prefix of the C/C++ SDK that ships inside the
package (``lib/libadsc.so``, ``include/adsc/``, ``lib/cmake/adsc``), for
``cmake -DCMAKE_PREFIX_PATH=$(python -m adsc_ext --cmake-prefix-path)`` and ``find_package(adsc)``,
as ``torch.utils.cmake_prefix_path`` does for torch.
"""

import sys

from . import cmake_prefix_path

if sys.argv[1:] == ["--cmake-prefix-path"]:
    try:
        print(cmake_prefix_path())
    except FileNotFoundError as exc:
        print(f"adsc: error: {exc}", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(0)

from .cli import main  # noqa: E402

raise SystemExit(main())
