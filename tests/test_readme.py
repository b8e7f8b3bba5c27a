"""The README's commands are the ones CI runs and the ones that exist."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    command = ci.split("# The README's test command:\n", 1)[1].strip().splitlines()[0]
    assert command.startswith("cmake -S . -B build/core") and command.endswith("pytest -q")
    assert command in readme


def test_readme_plan_numbers_are_what_adsc_plan_prints():
    readme = (ROOT / "README.md").read_text()
    out = subprocess.run([sys.executable, "-m", "adsc_ext", "plan"], capture_output=True,
                         text=True, check=True).stdout
    for line in ("TFLOPs         8.504       4.404     48.2 %",
                 "ideal prefill speed-up (FLOPs ratio): 1.93x"):
        assert line in out and line in readme
    assert re.search(r"\| 64 \| 8\.504 \| 4\.404 \| 48\.2 % \| 47\.8 % \|", readme)
