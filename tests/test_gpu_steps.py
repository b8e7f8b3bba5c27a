"""benchmarks/steps.sh: the step runner of the GPU session scripts (gpu_session.sh, vllm_gpu.sh).

It has to be right the first time it runs on a lent GPU, so its bookkeeping is checked here on the
CPU: exit codes, the per-step limit cut to the call's deadline, a timeout, a skip near the deadline.
"""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("timeout") is None, reason="needs coreutils' timeout")


def run_steps(tmp_path, body: str):
    script = f"""
set -u
OUT={tmp_path}; LOG={tmp_path}/log; DEADLINE=$((SECONDS + 30))
. {ROOT}/benchmarks/steps.sh
{body}
echo "failed=$failed"
"""
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [line.split("\t") for line in (tmp_path / "budget.tsv").read_text().splitlines()]
    return done.stdout, rows, (tmp_path / "log").read_text()


def test_steps_record_exit_codes_timeouts_and_skips(tmp_path):
    out, rows, log = run_steps(tmp_path, """
step ok 10 bash -c 'echo hello'
step bad 10 bash -c 'exit 3'
step slow 1 sleep 5
DEADLINE=$((SECONDS + 5))
step late 100 true
""")
    assert [r[0] for r in rows] == ["ok", "bad", "slow", "late"]
    assert [r[3] for r in rows] == ["0", "3", "124", "skipped"]
    assert rows[2][2] == "1"  # its own limit, below the deadline
    assert "failed=3" in out
    assert "hello" in log  # the command's output goes to the log
    assert "=== slow: TIMED OUT after 1 s" in out
    assert "=== late: SKIPPED" in out


def test_a_step_limit_is_cut_to_the_deadline(tmp_path):
    out, rows, _ = run_steps(tmp_path, "step cut 500 true")
    assert rows == [["cut", "0", rows[0][2], "0"]]
    assert 25 <= int(rows[0][2]) <= 30, rows  # the 30 s left, not 500
    assert "failed=0" in out
