"""The build's choices (cmake/torch.cmake, csrc/torch/CMakeLists.txt, setup.py), checked by
configuring the project against the torch this suite runs on: which ops a configure picks, the one
line that says so, and the errors for what cannot be honoured. The builds themselves run in CI
(.ci/run: the CUDA build of torch 2.14.1 and 2.11 with a partial CUDA toolkit, a CPU torch 2.13)."""

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import adsc_ext

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
OPS_LINE = re.compile(r"^-- adsc: (torch extension with .*|CUDA ops skipped, CPU ops only: .*)$", re.M)


def configure(tmp_path, *args, python=sys.executable):
    cmd = ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={python}",
           "-DADSC_BUILD_TESTS=OFF", *args]
    run = subprocess.run(cmd, capture_output=True, text=True)
    return run.returncode, run.stdout + run.stderr


@pytest.fixture(scope="module")
def auto_dir(tmp_path_factory):
    """One build folder for the auto and cuda configures: the second reuses the first's compiler
    checks (nvcc's take most of a configure), and each passes its own ADSC_TARGET_DEVICE."""
    return tmp_path_factory.mktemp("auto")


def test_cpu_target_device_never_runs_torchs_cmake_config(tmp_path):
    rc, out = configure(tmp_path, "-DADSC_TARGET_DEVICE=cpu")
    assert rc == 0, out
    assert OPS_LINE.findall(out) == ["torch extension with CPU ops (ADSC_TARGET_DEVICE=cpu)"]
    assert "adsc: CUDA kernels OFF" in out
    # find_package(Torch) would print these (and, for a CUDA torch, demand a full toolkit)
    assert "Caffe2" not in out and "PyTorch:" not in out and "Found Torch" not in out


def test_auto_says_which_ops_on_one_line(auto_dir):
    rc, out = configure(auto_dir, "-DADSC_TARGET_DEVICE=auto")
    assert rc == 0, out
    lines = OPS_LINE.findall(out)
    assert len(lines) == 1, out
    if torch.version.cuda is None:
        assert lines == [f"torch extension with CPU ops (torch {torch.__version__} is a CPU build)"]
    elif not adsc_ext.cuda_ops_available():  # a CUDA torch this machine builds CPU ops for: why
        assert lines[0].startswith("CUDA ops skipped, CPU ops only: "), lines


def test_cuda_target_device_that_cannot_be_honoured_is_an_error(auto_dir):
    if adsc_ext.cuda_ops_available():
        pytest.skip("this machine builds the CUDA ops")
    rc, out = configure(auto_dir, "-DADSC_TARGET_DEVICE=cuda")
    assert rc != 0
    flat = " ".join(out.split())
    assert ("adsc: ADSC_TARGET_DEVICE=cuda, but the CUDA ops cannot be built: " in flat
            or "adsc: ADSC_WITH_CUDA=ON (or ADSC_TARGET_DEVICE=cuda) but no CUDA compiler (nvcc) was found" in flat), out
    if torch.version.cuda is None and shutil.which("nvcc"):
        assert f"torch {torch.__version__} is a CPU build" in flat


def test_unknown_target_device_is_an_error(tmp_path):
    rc, out = configure(tmp_path, "-DADSC_TARGET_DEVICE=gpu")
    assert rc != 0
    assert "ADSC_TARGET_DEVICE must be auto, cuda or cpu, got 'gpu'" in out


def test_a_python_without_torch_is_an_error(tmp_path):
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "venv")], check=True)
    rc, out = configure(tmp_path, "-DADSC_TARGET_DEVICE=cpu", python=tmp_path / "venv" / "bin" / "python")
    assert rc != 0
    flat = " ".join(out.split())
    assert "adsc: the torch extension needs torch importable by" in flat
    assert "No module named 'torch'" in flat


def _setup_module():
    spec = importlib.util.spec_from_file_location("adsc_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines, does not build (setup() runs only as __main__)
    return module


def test_metadata_requires_the_torch_it_was_built_against():
    major, minor = (int(p) for p in re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    assert f"torch=={major}.{minor}.*" in importlib.metadata.requires("adsc_ext")
    assert _setup_module().build_torch() == f"torch=={major}.{minor}.*"


def test_torch_outside_the_verified_range(monkeypatch):
    setup = _setup_module()
    oldest, newest = setup.TORCH_OLDEST, setup.TORCH_NEWEST_VERIFIED
    monkeypatch.setattr(torch, "__version__", f"{oldest[0]}.{oldest[1] - 1}.0+cu126")
    with pytest.raises(SystemExit, match=rf"needs torch >= {oldest[0]}\.{oldest[1]} .*is {oldest[0]}\.{oldest[1] - 1}\.0"):
        setup.build_torch()
    monkeypatch.setattr(torch, "__version__", f"{newest[0]}.{newest[1] + 1}.0")
    with pytest.warns(UserWarning, match="newer than the newest release CI has verified"):
        assert setup.build_torch() == f"torch=={newest[0]}.{newest[1] + 1}.*"
    monkeypatch.setattr(torch, "__version__", f"{oldest[0]}.{oldest[1]}.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert setup.build_torch() == f"torch=={oldest[0]}.{oldest[1]}.*"


def test_old_setuptools_without_wheel_is_an_error(monkeypatch):
    import setuptools

    setup = _setup_module()
    monkeypatch.setattr(setuptools, "__version__", "65.5.0")
    monkeypatch.setattr(setup.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=r"needs setuptools >= 70\.1 \(this is 65\.5\.0\)"):
        setup.check_setuptools()
