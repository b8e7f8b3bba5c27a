"""Builds adsc_ext: CMake owns the build (CMakeLists.txt); this file only forwards settings.

Build against the torch that is installed (no build isolation, or pip fetches another torch):
    pip install --no-build-isolation .
Settings (environment):
    ADSC_TARGET_DEVICE  auto (default: CUDA ops if torch has CUDA and nvcc is found), cuda, cpu
    TORCH_CUDA_ARCH_LIST GPU architectures, default "8.0;8.6;8.9;9.0"
    CMAKE_BUILD_TYPE    Release (default), Debug, RelWithDebInfo
    MAX_JOBS            parallel compile jobs (default: CPU count)
    CMAKE_ARGS          extra arguments for cmake's configure step
"""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import torch.utils  # the installed torch is the one the extension is built against

        package_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        device = os.environ.get("ADSC_TARGET_DEVICE", "auto").lower()
        cuda = {"auto": "AUTO", "cuda": "ON", "cpu": "OFF"}.get(device)
        if cuda is None:
            raise RuntimeError(f"ADSC_TARGET_DEVICE must be auto, cuda or cpu, got {device!r}")
        args = [
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DADSC_WITH_CUDA={cuda}",
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


setup(ext_modules=[CMakeExtension("adsc_ext._C")], cmdclass={"build_ext": CMakeBuild})
