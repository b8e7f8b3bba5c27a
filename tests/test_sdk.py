"""The C/C++ SDK shipped inside the Python package: prefix, library, versions, a consumer build."""

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import adsc_ext

ROOT = Path(__file__).resolve().parents[1]


def prefix() -> Path:
    out = subprocess.run([sys.executable, "-m", "adsc_ext", "--cmake-prefix-path"],
                         capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def test_cmake_prefix_path_holds_the_package():
    p = prefix()
    assert (p / "lib" / "cmake" / "adsc" / "adscConfig.cmake").is_file()
    assert (p / "include" / "adsc" / "adsc.h").is_file()
    assert p == Path(adsc_ext.cmake_prefix_path())


def test_shared_library_through_the_c_abi():
    lib = ctypes.CDLL(str(prefix() / "lib" / "libadsc.so"))
    lib.adsc_version.restype = ctypes.c_char_p
    lib.adsc_last_error.restype = ctypes.c_char_p
    # One version everywhere: CMake's project(), pyproject.toml, adsc_ext.__version__.
    assert lib.adsc_version().decode() == adsc_ext.__version__
    assert f'version = "{adsc_ext.__version__}"' in (ROOT / "pyproject.toml").read_text()

    class Schedule(ctypes.Structure):
        _fields_ = [("num_steps", ctypes.c_int32), ("layers", ctypes.c_int32 * 16),
                    ("factors", ctypes.c_int32 * 16)]

    s = Schedule()
    assert lib.adsc_schedule_parse(b"8:2,16:2,24:2", ctypes.byref(s)) == 0
    assert (s.num_steps, list(s.layers[:3]), list(s.factors[:3])) == (3, [8, 16, 24], [2, 2, 2])
    assert lib.adsc_schedule_parse(b"8:3", ctypes.byref(s)) == 1  # ADSC_INVALID_ARGUMENT
    assert b"factor must be 2 or 4, got 3" in lib.adsc_last_error()
    assert lib.adsc_schedule_parse(None, ctypes.byref(s)) == 1
    assert b"text must not be NULL" in lib.adsc_last_error()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_consumer_builds_against_the_package(tmp_path):
    """examples/cpp_service finds the package with find_package(adsc) alone and runs."""
    example = ROOT / "examples" / "cpp_service"
    build = tmp_path / "build"
    cmd = ["cmake", "-S", str(example), "-B", str(build), f"-DCMAKE_PREFIX_PATH={prefix()}",
           "-DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF"]
    if shutil.which("ninja"):
        cmd.append("-GNinja")
    subprocess.run(cmd, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build)], check=True, capture_output=True)
    run = subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
