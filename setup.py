"""Builds adsc_ext: CMake owns the build (CMakeLists.txt); this file only forwards settings.

Build against the torch that is installed (no build isolation, or pip fetches another torch):
    pip install --no-build-isolation .                      # or -e . (editable)
    pip wheel --no-build-isolation --no-deps . -w dist      # a wheel (docs/install.md)
Settings (environment), forwarded to CMake:
    ADSC_TARGET_DEVICE  auto (default: CUDA ops when torch is a CUDA build and a full CUDA toolkit
                        of its major version is found, else CPU ops), cuda (CUDA ops or an error), cpu
    TORCH_CUDA_ARCH_LIST GPU architectures, default "8.0;8.6;8.9;9.0"
    CMAKE_BUILD_TYPE    Release (default), Debug, RelWithDebInfo
    MAX_JOBS            parallel compile jobs (default: CPU count)
    CMAKE_ARGS          extra arguments for cmake's configure step
The package's metadata requires the torch release it was compiled against (torch==X.Y.*): the
extension links torch's C++ libraries, whose ABI changes between releases.
"""

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
# The torch releases CI builds and tests (.ci/run): the oldest is built and tested, and so is the
# newest verified. An older torch is refused; a newer one builds with a warning (not yet verified).
TORCH_OLDEST = (2, 11)
TORCH_NEWEST_VERIFIED = (2, 14)


def check_setuptools() -> None:
    """pip's editable and wheel builds call bdist_wheel: in setuptools from 70.1 on, else the wheel
    package. A fresh venv of Python < 3.12 holds setuptools 65, which torch < 2.14 keeps."""
    import setuptools

    release = tuple(int(part) for part in re.findall(r"\d+", setuptools.__version__)[:2])
    if release < (70, 1) and importlib.util.find_spec("wheel") is None:
        raise SystemExit(
            f"adsc_ext's build needs setuptools >= 70.1 (this is {setuptools.__version__}): "
            "python3 -m pip install --upgrade setuptools"
        )


def build_torch() -> str:
    """``torch==X.Y.*`` for the installed torch, which the extension is compiled against."""
    try:
        import torch
    except ImportError as exc:
        raise SystemExit(
            "adsc_ext is compiled against the installed torch, and none is importable "
            f"({exc}): install torch first (python3 -m pip install torch setuptools cmake ninja), "
            "then build without isolation (pip install --no-build-isolation .)"
        ) from None
    match = re.match(r"(\d+)\.(\d+)", torch.__version__)
    if match is None:
        raise SystemExit(f"adsc_ext: cannot read torch's version {torch.__version__!r}")
    release = (int(match[1]), int(match[2]))
    if release < TORCH_OLDEST:
        raise SystemExit(
            f"adsc_ext needs torch >= {TORCH_OLDEST[0]}.{TORCH_OLDEST[1]} (the oldest release CI "
            f"builds and tests); the installed torch is {torch.__version__}"
        )
    if release > TORCH_NEWEST_VERIFIED:
        warnings.warn(
            f"adsc_ext: torch {torch.__version__} is newer than the newest release CI has verified "
            f"({TORCH_NEWEST_VERIFIED[0]}.{TORCH_NEWEST_VERIFIED[1]}); building anyway",
            stacklevel=1,
        )
    return f"torch=={release[0]}.{release[1]}.*"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        package_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DADSC_TARGET_DEVICE={os.environ.get('ADSC_TARGET_DEVICE', 'auto').lower()}",
            "-DADSC_WITH_TORCH=ON",
            "-DADSC_BUILD_TESTS=OFF",
        ]
        if shutil.which("ninja"):
            args.append("-GNinja")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call(["cmake", "--build", str(build_dir), "-j", jobs])
        install = ["cmake", "--install", str(build_dir), "--component"]
        # adsc_ext/_C*.so, then the C/C++ SDK under adsc_ext/ (lib/, include/, lib/cmake/adsc):
        # `python -m adsc_ext --cmake-prefix-path` hands that prefix to CMake.
        subprocess.check_call([*install, "python", "--prefix", str(package_dir.parent)])
        subprocess.check_call([*install, "sdk", "--prefix", str(package_dir)])

    def copy_extensions_to_source(self) -> None:
        # Editable installs: the SDK installed beside _C (lib/, include/) goes in place too.
        super().copy_extensions_to_source()
        built = Path(self.build_lib) / "adsc_ext"
        for sub in ("lib", "include"):
            if (built / sub).is_dir():
                shutil.rmtree(ROOT / "adsc_ext" / sub, ignore_errors=True)
                shutil.copytree(built / sub, ROOT / "adsc_ext" / sub, symlinks=True)


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it
    check_setuptools()
    setup(
        install_requires=[build_torch()],
        ext_modules=[CMakeExtension("adsc_ext._C")],
        cmdclass={"build_ext": CMakeBuild},
    )
