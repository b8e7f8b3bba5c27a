"""``adsc trt-build``: argument and folder errors are reported as themselves, not hidden behind
"TensorRT is not installed" (the check order of issue 18, item 6: every argument first). Runs
without TensorRT; on a machine with TensorRT the same errors come before any engine is built."""

from __future__ import annotations

import pytest

from adsc_ext.cli import main


def _one_line(capsys, *argv):
    capsys.readouterr()
    code = main(["trt-build", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err and err.count("\n") == 1, (code, out, err)
    assert "TensorRT's Python package is not installed" not in err, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["--max-batch", "0"], "max_batch"),
    (["--max-new-tokens", "0"], "max_new_tokens"),
    (["--max-batch", "4", "--opt-batch", "8"], "opt_batch"),
    (["--opt-text-tokens", "-1"], "opt_text_tokens"),
    (["--workspace-gib", "-1"], "--workspace-gib"),
    (["--workspace-gib", "0"], "--workspace-gib"),
    (["--graphs", ","], "--graphs"),
])
def test_bad_limits_are_reported_before_the_folder_and_tensorrt(tmp_path, capsys, argv, needle):
    assert needle in _one_line(capsys, str(tmp_path / "nowhere"), *argv)


def test_a_folder_that_is_not_an_export_is_reported_without_tensorrt(tmp_path, capsys):
    assert "is not a folder" in _one_line(capsys, str(tmp_path / "nowhere"))
    assert "has no adsc_manifest.json" in _one_line(capsys, str(tmp_path))
