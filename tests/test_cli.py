"""Tests of the ``adsc`` command line (adsc_ext.cli)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from adsc_ext.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str) -> None:
    assert code == 2
    assert out == ""
    assert err.startswith("adsc: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


def test_plan_table_default(capsys):
    code, out, err = run(capsys, "plan")
    assert (code, err) == (0, "")
    for row in (
        r"0\s+0-7\s+24x24\s+576\s+640\s+2\.126\s+80\.00 MiB",
        r"1\s+8-15\s+24x12\s+288\s+352\s+1\.156\s+44\.00 MiB",
        r"2\s+16-23\s+12x12\s+144\s+208\s+0\.679\s+26\.00 MiB",
        r"3\s+24-31\s+12x6\s+72\s+136\s+0\.443\s+17\.00 MiB",
        r"TFLOPs\s+8\.504\s+4\.404\s+48\.2 %",
        r"KV cache\s+320\.00 MiB\s+167\.00 MiB\s+47\.8 %",
    ):
        assert re.search(f"^{row}$", out, re.M), row
    assert "ideal prefill speed-up (FLOPs ratio): 1.93x" in out
    assert "llava-1.5-7b" in out and "'8:2,16:2,24:2'" in out


def test_plan_table_columns_are_aligned(capsys):
    _, out, _ = run(capsys, "plan", "--images", "2", "--text-tokens", "7")
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("stage"))
    table = lines[header:header + 5]
    tokens_end = table[0].index("tokens") + len("tokens")
    assert [row[:tokens_end].split()[-1] for row in table[1:]] == ["1159", "583", "295", "151"]
    assert len({len(row) for row in table}) == 1  # the right-aligned last column ends together


def test_plan_json_default(capsys):
    code, out, err = run(capsys, "plan", "--json")
    assert (code, err) == (0, "")
    r = json.loads(out)
    assert r["baseline_flops"] == 8_504_035_246_080
    assert r["adsc_flops"] == 4_403_994_034_176
    assert r["baseline_kv_bytes"] == 320 * 2**20
    assert r["adsc_kv_bytes"] == 167 * 2**20
    assert len(r["layers"]) == 32
    assert r["layers"][7] == {"layer": 7, "tokens": 640}
    assert r["layers"][8] == {"layer": 8, "tokens": 352}
    assert f"{r['ideal_speedup']:.2f}" == "1.93"


def test_plan_json_spec_row_zero_text_tokens(capsys):
    _, out, _ = run(capsys, "plan", "--json", "--text-tokens", "0")
    r = json.loads(out)
    assert f"{r['baseline_flops'] / 1e12:.3f}" == "7.634"
    assert f"{r['adsc_flops'] / 1e12:.3f}" == "3.555"
    assert (f"{r['flops_reduction_pct']:.1f}", f"{r['kv_reduction_pct']:.1f}") == ("53.4", "53.1")


def test_plan_empty_schedule(capsys):
    code, out, _ = run(capsys, "plan", "--json", "--schedule", "")
    r = json.loads(out)
    assert code == 0 and r["schedule"] == ""
    assert (r["adsc_flops"], r["adsc_kv_bytes"]) == (r["baseline_flops"], r["baseline_kv_bytes"])
    _, table, _ = run(capsys, "plan", "--schedule", "")
    assert "(unmodified model)" in table and re.search(r"^TFLOPs.*0\.0 %$", table, re.M)


def test_plan_13b_and_config_path(capsys, tmp_path):
    _, out, _ = run(capsys, "plan", "--json", "--model", "llava-1.5-13b")
    assert len(json.loads(out)["layers"]) == 40
    config = {
        "text_config": {"hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 6,
                        "num_attention_heads": 4, "num_key_value_heads": 2},
        "vision_config": {"image_size": 56, "patch_size": 14},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    code, out, _ = run(capsys, "plan", "--json", "--model", str(tmp_path), "--schedule", "2:2,4:4",
                       "--text-tokens", "9", "--images", "2")
    r = json.loads(out)
    assert code == 0 and r["model"] == str(tmp_path / "config.json")
    assert [row["tokens"] for row in r["layers"]] == [41, 41, 25, 25, 13, 13]
    code, out, _ = run(capsys, "plan", "--model", str(tmp_path), "--schedule", "2:2,4:4")
    assert code == 0 and "KiB" in out  # small caches are printed in a readable unit too


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["plan", "--schedule", "8:3"], "factor must be 2 or 4"),
        (["plan", "--schedule", "8"], "--schedule"),
        (["plan", "--schedule", "8:2,16:2,40:2"], "32 decoder layers"),
        (["plan", "--model", "llava-2-70b"], "not a preset"),
        (["plan", "--model", "/nonexistent/adsc/config.json"], "no config.json"),
        (["plan", "--text-tokens", "-5"], "text_tokens"),
        (["plan", "--text-tokens", "many"], "invalid int"),
        (["plan", "--images", "-1"], "images"),
        (["plan", "--dtype-bytes", "0"], "dtype_bytes"),
        (["plan", "--text-tokens", "0", "--images", "0"], "empty"),
        (["plan", "--bogus"], "unrecognized arguments: --bogus"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_bad_arguments_give_one_line_errors(capsys, argv, needle):
    code, out, err = run(capsys, *argv)
    assert_one_line_error(code, out, err)
    assert needle in err


def test_bad_config_file_gives_one_line_error(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{\n  broken")
    code, out, err = run(capsys, "plan", "--model", str(path))
    assert_one_line_error(code, out, err)
    assert "not valid JSON" in err


@pytest.mark.parametrize("command, module", [("generate", "adsc_ext.hf.generate_cli"),
                                             ("bench", "adsc_ext.bench.cli")])
def test_delegate_without_its_module_is_a_one_line_error(capsys, monkeypatch, command, module):
    monkeypatch.setitem(sys.modules, module, None)  # makes the import fail
    code, out, err = run(capsys, command, "--prompt", "hi")
    assert_one_line_error(code, out, err)
    assert f"'adsc {command}' is unavailable" in err


@pytest.mark.parametrize("command, module", [("generate", "adsc_ext.hf.generate_cli"),
                                             ("bench", "adsc_ext.bench.cli")])
def test_delegate_dispatches_to_its_module(capsys, monkeypatch, command, module):
    seen = []
    fake = types.SimpleNamespace(
        add_arguments=lambda parser: parser.add_argument("--prompt", required=True),
        run=lambda args: seen.append(args.prompt) or 0,
    )
    monkeypatch.setitem(sys.modules, module, fake)
    assert run(capsys, command, "--prompt", "hi")[0] == 0
    assert seen == ["hi"]
    code, out, err = run(capsys, command, "--bogus")
    assert_one_line_error(code, out, err)


def _adsc(*argv: str) -> subprocess.CompletedProcess:
    path = [str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run([sys.executable, "-m", "adsc_ext.cli", *argv], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_module_entry_point():
    done = _adsc("plan", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["adsc_flops"] == 4_403_994_034_176
    done = _adsc("plan", "--schedule", "8:3")
    assert done.returncode == 2
    assert done.stderr.startswith("adsc: error: ") and done.stderr.count("\n") == 1


# ---- every documented failure path is one line, exit 2, no traceback (issue 14, D9) ------------
def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    import adsc_ext

    assert capsys.readouterr().out == f"adsc {adsc_ext.__version__}\n"
    done = _adsc("--version")
    assert (done.returncode, done.stdout) == (0, f"adsc {adsc_ext.__version__}\n")


def _one_line_failure(code: int, out: str, err: str) -> str:
    assert code == 2, (code, err)
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert "Traceback" not in err
    assert err.startswith(("adsc: error: ", "adsc generate: error: ")), err
    return err


def _generate_failures(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import importlib.util

    not_a_dir = tmp_path / "weights.bin"
    not_a_dir.write_bytes(b"\0")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    cases = [
        (["--device", "foo"], "--device 'foo': expected cpu, cuda or cuda:N"),
        (["--device", "cuda:x"], "expected cpu, cuda or cuda:N"),
        (["--device", "mps"], "expected cpu, cuda or cuda:N"),
        (["--model", "/nonexistent/llava"], "--model /nonexistent/llava: no such directory"),
        (["--model", str(not_a_dir)], "not a directory"),
        (["--model", str(empty_dir)], "no config.json"),
        (["--image", str(tmp_path)], "is a directory, not an image file"),
        (["--image", "/no/such/file.png"], "no such file"),
        (["--image", str(text_file), "--max-new-tokens", "1"], "notes.txt"),
        (["--schedule", "9:2", "--max-new-tokens", "1"], "does not fit a model with 8 decoder layers"),
        (["--schedule", "\u0661:\u0662"], "expected 'layer:factor'"),
        (["--schedule", "1:\u00b2"], "expected 'layer:factor'"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
        (["--max-new-tokens", "many"], "invalid int value"),
        (["--dtype", "foo"], "invalid choice"),
        (["--attn", "flash"], "invalid choice"),
        (["--random", "--model", "x"], "not allowed with"),
        (["--bogus"], "unrecognized arguments"),
        (["--prompt", "x" * 5000, "--max-new-tokens", "4"],
         "tokens (images included) and --max-new-tokens is 4, but the model has 4096 positions"),
    ]
    if not torch.cuda.is_available():
        why = "CPU-only build" if torch.version.cuda is None else "no CUDA GPU"
        cases += [(["--device", "cuda"], why), (["--device", "cuda:0"], why)]
    if importlib.util.find_spec("flash_attn") is None:
        cases.append((["--attn", "flash_attention_2"], "needs the flash-attn package"))
    return cases


def test_generate_failure_paths_are_one_line_errors(capsys, tmp_path):
    for argv, needle in _generate_failures(tmp_path):
        err = _one_line_failure(*run(capsys, "generate", *argv))
        assert needle in err, (argv, err)
        assert err.count("does not fit") <= 1, err  # the schedule error does not repeat itself


def test_generate_failure_through_the_console_entry_point():
    pytest.importorskip("transformers")
    for argv, needle in ((["--model", "/nonexistent/llava"], "no such directory"),):
        done = _adsc("generate", *argv)
        assert done.returncode == 2 and done.stdout == "", done.stderr
        assert done.stderr.count("\n") == 1 and needle in done.stderr and "Traceback" not in done.stderr


def test_plan_failure_paths_name_what_was_expected(capsys):
    for argv, needle in ((["--schedule", "\u0661:\u0662"], "expected 'layer:factor'"),
                         (["--schedule", "1:\u00b2"], "expected 'layer:factor'"),
                         (["--schedule", "1234567890:2"], "at most 9 ASCII digits")):
        err = _one_line_failure(*run(capsys, "plan", *argv))
        assert needle in err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    assert "default: 32" in " ".join(out.split())


# ---- the newcomer path (issue 14): two commands do all the set-up, and CI runs the second ------
def _readme_commands():
    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    joined = [block.replace("\\\n", "") for block in blocks]
    main_job = [b.strip() for b in joined if b.strip().endswith("&& adsc generate")]
    tests = [b.strip() for b in joined if b.strip().endswith("python3 -m pytest -q") and "pip install" in b]
    return main_job, tests


def test_readme_has_the_two_commands():
    main_job, tests = _readme_commands()
    assert len(main_job) == 1 and len(tests) == 1, (main_job, tests)
    setup = "python3 -m pip install torch setuptools cmake ninja && python3 -m pip install --no-build-isolation -e"
    assert main_job[0].startswith(setup) and '".[hf]"' in main_job[0]
    assert tests[0].startswith(setup) and '".[test]"' in tests[0]
    # that .ci/run runs both verbatim, each in a fresh venv: tests/test_readme.py


def test_pillow_comes_with_the_hf_extra():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    hf = re.search(r"^hf = \[(.*)\]$", pyproject, re.M).group(1)
    assert re.search(r'"pillow[<>=!~]', hf, re.I)


def test_generate_out_of_memory_is_one_line(capsys, monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from adsc_ext.hf import generate_cli

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 26.00 GiB\nmore detail")

    monkeypatch.setattr(generate_cli, "_random_model", no_memory)
    err = _one_line_failure(*run(capsys, "generate", "--max-new-tokens", "1"))
    assert "out of memory on cpu while loading the model (CUDA out of memory." in err


# ---- what is a usage error and what is a bug (issue 20, item 2) --------------------------------
def test_an_internal_value_error_escapes_as_a_traceback(monkeypatch):
    """A ValueError that is not an AdscError is a bug in adsc_ext: main() lets it through instead of
    printing it as a usage error."""
    from adsc_ext import cli

    def broken(*args, **kwargs):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(cli, "plan_report", broken)
    with pytest.raises(ValueError, match="internal invariant"):
        main(["plan"])


def test_an_adsc_error_is_one_line_with_exit_2(capsys, monkeypatch):
    from adsc_ext import cli
    from adsc_ext.errors import AdscInputError

    def refuse(*args, **kwargs):
        raise AdscInputError("what was expected\nand what was given")

    monkeypatch.setattr(cli, "plan_report", refuse)
    code, out, err = run(capsys, "plan")
    assert_one_line_error(code, out, err)
    assert "what was expected and what was given" in err


def test_every_error_class_has_the_common_base_and_its_old_one():
    import adsc_ext.errors as E
    from adsc_ext import accounting, schedule

    old_bases = {"AdscInputError": ValueError, "AdscModelError": TypeError, "ScheduleError": ValueError,
                 "KVCapacityError": ValueError, "ExportError": ValueError, "ModelSpecError": ValueError,
                 "BenchError": ValueError, "TensorRTUnavailable": ImportError, "TensorRTBuildError": ValueError}
    for name in E.__all__:
        cls = getattr(E, name)
        assert issubclass(cls, E.AdscError), name
        if name in old_bases:
            assert issubclass(cls, old_bases[name]), name
    # the historic homes re-export the same classes (one class per error, not copies)
    assert schedule.ScheduleError is E.ScheduleError and accounting.ModelSpecError is E.ModelSpecError
    assert E.EngineInputError is E.AdscInputError
