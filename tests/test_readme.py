"""The README's commands are the ones CI runs and the ones that exist; the versions and commands
the install docs state are the ones pyproject, setup.py and CI use."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INSTALL = (ROOT / "docs" / "install.md").read_text()
PYPROJECT = (ROOT / "pyproject.toml").read_text()


def _ci(name="run"):
    return (ROOT / ".ci" / name).read_text()


def _readme_commands():
    blocks = [b.strip() for b in re.findall(r"```bash\n(.*?)```", README, re.S)]
    main_job = [b for b in blocks if b.endswith("&& adsc generate")]
    tests = [b for b in blocks if b.endswith("python3 -m pytest -q") and "pip install" in b]
    assert len(main_job) == 1 and len(tests) == 1, (main_job, tests)
    return main_job[0], tests[0]


def _block_after(ci_lines, marker):
    at = [i for i, line in enumerate(ci_lines) if line.strip().startswith(marker)]
    assert len(at) == 1, f".ci/run must have one line starting {marker!r}"
    return at[0]


def test_readme_commands_are_the_ones_ci_runs_verbatim_in_fresh_venvs():
    main_job, tests = _readme_commands()
    ci = _ci().splitlines()
    at = _block_after(ci, "# The README's main-job command:")
    assert ci[at + 1].strip() == main_job
    # the test command's lines as the README has them (its `&& \` line continuations too)
    parts = [line.strip() for line in tests.splitlines()]
    at_test = _block_after(ci, "# The README's test command")
    assert [line.strip() for line in ci[at_test + 1:at_test + 1 + len(parts)]] == parts
    # each in a venv made just before, with nothing in it (no torch beforehand)
    for i in (at, at_test):
        assert re.fullmatch(r'\s*fresh_venv "(\S+)" && \. "\1/bin/activate"', ci[i - 1]), ci[i - 1]
    assert re.search(r'fresh_venv\(\) \{ rm -rf "\$1" && python3 -m venv "\$1"; \}', _ci())
    assert "set -euo pipefail" in _ci()
    # the whole suite: no marker or keyword selection
    assert tests.endswith("&& python3 -m pytest -q")


def test_the_test_extra_brings_what_the_whole_suite_needs():
    extras = dict(re.findall(r"^(\w+) = \[(.*)\]$", PYPROJECT, re.M))
    assert re.search(r'"adsc_ext\[(hf,export|export,hf)\]"', extras["test"]), extras["test"]
    for package in ("onnx", "onnxscript", "onnxruntime"):
        assert re.search(rf'"{package}>=', extras["export"])
    for package in ("transformers", "peft", "accelerate", "pillow"):
        assert re.search(rf'"{package}>=', extras["hf"], re.I)


def _setup():
    spec = importlib.util.spec_from_file_location("adsc_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_version_ranges_are_what_ci_runs():
    hf = re.search(r"^hf = \[(.*)\]$", PYPROJECT, re.M).group(1)
    export = re.search(r"^export = \[(.*)\]$", PYPROJECT, re.M).group(1)
    matrix = _ci("hf-matrix")
    oldest = dict(re.findall(r"([\w-]+)==([\d.]+)", re.search(r'OLDEST_PINS="(.*)"', matrix).group(1)))
    for package in ("transformers", "peft", "accelerate", "onnx", "onnxscript", "onnxruntime"):
        low, high = re.search(rf'"{package}>=([\d.]+),<=([\d.]+)"', hf + export).groups()
        # the oldest lane pins the lower bound; the README's fresh venvs get the upper one, which
        # the install docs name
        assert oldest[package] == low or oldest[package] == low + ".0", (package, oldest[package], low)
        assert re.search(rf"^\| {package}\b.*\b{re.escape(high)}\b", INSTALL, re.M | re.S), package
    setup = _setup()
    major, minor = setup.TORCH_OLDEST
    assert re.search(rf'OLDEST_TORCH="torch=={major}\.{minor}\.\d+"', matrix)
    assert f"torch older than {major}.{minor} is refused" in INSTALL
    newest = "{}.{}".format(*setup.TORCH_NEWEST_VERIFIED)
    assert f"newest that CI has verified ({newest})" in INSTALL
    assert f'"torch>={major}.{minor}"' in PYPROJECT  # build-system requires


def test_wheel_command_is_the_one_ci_runs():
    command = "pip wheel --no-build-isolation --no-deps . -w dist"
    assert command in INSTALL
    assert re.search(r"python3 -m pip wheel -q --no-build-isolation --no-deps \. -w dist", _ci("wheel"))
    assert "bash .ci/wheel" in _ci()


def test_no_false_install_claims():
    for doc, text in (("README.md", README), ("docs/install.md", INSTALL)):
        assert "runs on any machine" not in text, doc
        assert not re.search(r"torch\s*>=\s*2\.4", text), doc
        assert not re.search(r"pip install ['\"]?adsc_ext\[", text), doc  # on no registry
        # every build folder an install step names is one the same page builds
        for folder in re.findall(r"cmake --install (\S+)", text):
            assert f"cmake -S . -B {folder}" in text, (doc, folder)


def test_readme_plan_numbers_are_what_adsc_plan_prints():
    out = subprocess.run([sys.executable, "-m", "adsc_ext", "plan"], capture_output=True,
                         text=True, check=True).stdout
    for line in ("TFLOPs         8.504       4.404     48.2 %",
                 "ideal prefill speed-up (FLOPs ratio): 1.93x"):
        assert line in out and line in README
    assert re.search(r"\| 64 \| 8\.504 \| 4\.404 \| 48\.2 % \| 47\.8 % \|", README)
