"""``adsc bench``: every argument checked before anything is built (issue 18, item 6), and other
model shapes than ``--tiny`` and LLaVA-1.5-7B (``--model``, as ``adsc plan`` takes it).

A refusal here must come before a model is built or a benchmark runs: the suite's model builder
and the suite itself are replaced by functions that fail the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from adsc_ext import cli  # noqa: E402
from adsc_ext.bench import suite  # noqa: E402

GiB = 2**30
FAST = ["--repeats", "2", "--new-tokens", "3", "--prefill-batches", "2", "--prefill-batch", "2",
        "--decode-batches", "2", "--decode-batch", "2", "--text-tokens", "4", "--no-progress", "--no-plot"]


def _bench(capsys, *argv):
    capsys.readouterr()
    rc = cli.main(["bench", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def nothing_runs(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a model was built or the benchmark started before the arguments were checked")

    monkeypatch.setattr(suite, "_build_model", boom)
    monkeypatch.setattr(suite, "run_suite", boom)


def _refused(capsys, *argv):
    rc, out, err = _bench(capsys, *argv)
    assert rc == 2 and out == "" and "Traceback" not in err and err.count("\n") == 1, (rc, out, err)
    return err


def _small_config(path: Path, **text) -> Path:
    """A LLaVA config.json: a 4-layer, 256-wide LLaMA and a 2-layer CLIP tower on a 12x12 grid."""
    from adsc_ext.testing import tiny_llava_config

    cfg = tiny_llava_config(grid_side=12, patch_size=4, num_layers=4, hidden_size=256, num_heads=4,
                            num_kv_heads=2, vocab_size=512)
    for k, v in text.items():
        setattr(cfg.text_config, k, v)
    cfg.save_pretrained(path)
    return path / "config.json"


@pytest.mark.parametrize("argv, needle", [
    (["--tiny", "--prefill-batch", "0"], "--prefill-batch"),
    (["--tiny", "--prefill-batch", "-3"], "--prefill-batch"),
    (["--tiny", "--decode-batch", "0"], "--decode-batch"),
    (["--tiny", "--text-tokens", "100000000"], "positions"),
    (["--tiny", "--new-tokens", "4000"], "positions"),
    (["--tiny", "--fastv-layer", "0"], "--fastv-layer"),
    (["--tiny", "--fastv-layer", "99"], "--fastv-layer"),
    (["--tiny", "--schedule", "9:2"], "does not fit a model with 8 decoder layers"),
    (["--tiny", "--schedule", "x"], "--schedule"),
    (["--tiny", "--schedule", "1:4,2:4,3:4,4:4,5:4,6:4"], "cannot be downsampled"),
    (["--tiny", "--backend", "nope"], "--backend"),
    (["--tiny", "--backend", "flash_attn"], "--backend"),
    (["--tiny", "--cuda-graphs", "on", "--device", "cpu"], "--cuda-graphs on"),
    (["--tiny", "--model", "llava-1.5-7b"], "not allowed with"),
    (["--model", "llava-9b"], "not a preset"),
    (["--model", "/no/such/config.json"], "no config.json"),
])
def test_bad_argument_is_refused_before_anything_is_built(argv, needle, capsys, nothing_runs):
    if "--backend" in argv and "flash_attn" in argv and torch.cuda.is_available():
        pytest.skip("flash_attn may be available on a GPU machine")
    err = _refused(capsys, *argv)
    assert needle in err, err


def test_out_dir_that_is_a_file_is_refused_before_anything_is_built(tmp_path, capsys, nothing_runs):
    f = tmp_path / "results.txt"
    f.write_text("mine")
    assert "--out-dir" in _refused(capsys, "--tiny", "--out-dir", str(f))
    assert "--out-dir" in _refused(capsys, "--tiny", "--out-dir", str(f / "sub"))  # cannot be made
    assert f.read_text() == "mine"


def test_unwritable_out_dir_is_refused_before_anything_is_built(tmp_path, capsys, nothing_runs, monkeypatch):
    """A folder the run cannot write into (read-only here through the probe the check makes, as a
    root user can write anywhere)."""
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", kwargs.get("dir"))

    monkeypatch.setattr(tempfile, "NamedTemporaryFile", read_only)
    err = _refused(capsys, "--tiny", "--out-dir", str(tmp_path / "ro"))
    assert "--out-dir" in err and "cannot write" in err


def test_other_model_shapes_from_a_config(tmp_path, capsys, monkeypatch):
    """``--model config.json`` (and a preset name) is what the suite builds and names."""
    seen = {}

    def fake_suite(args, device, dtype, new_tokens, out_dir):
        seen.update(config=args.model_config, name=args.model_name, schedule=args.schedule)
        return 0

    monkeypatch.setattr(suite, "run_suite", fake_suite)
    cfg = _small_config(tmp_path / "small")
    rc, out, err = _bench(capsys, "--model", str(cfg), "--device", "cpu", "--out-dir", str(tmp_path / "r"), *FAST,
                          "--schedule", "1:2,2:2")
    assert rc == 0, err
    assert seen["config"].text_config.hidden_size == 256 and seen["name"] == str(cfg)
    rc, out, err = _bench(capsys, "--model", str(cfg.parent), "--device", "cpu", "--out-dir", str(tmp_path / "r"),
                          *FAST, "--schedule", "1:2")
    assert rc == 0 and seen["schedule"] == "1:2", err
    # the LLaVA-1.5 default does not fit 4 layers: said before anything runs
    err = _refused(capsys, "--model", str(cfg), "--device", "cpu", "--out-dir", str(tmp_path / "r"), *FAST)
    assert "does not fit a model with 4 decoder layers" in err and "--schedule" in err


def test_a_config_that_is_not_llava_is_refused(tmp_path, capsys, nothing_runs):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1).save_pretrained(tmp_path / "llama")
    err = _refused(capsys, "--model", str(tmp_path / "llama"))
    assert "model_type 'llama'" in err


def test_preset_configs_are_the_shapes_adsc_plan_counts():
    from adsc_ext.accounting import PRESETS, spec_from_config
    from adsc_ext.bench.cli import model_config
    from adsc_ext.errors import BenchError
    from adsc_ext.testing import llava15_7b_config
    from adsc_ext.models.checkpoint import SUPPORTED

    count = SUPPORTED["llava"].parameters
    for name, spec in PRESETS.items():
        if spec.arch != "llava":  # adsc plan accounts them; adsc bench runs LLaVA-1.5
            with pytest.raises(BenchError, match="adsc bench runs LLaVA-1.5"):
                model_config(name)
            continue
        cfg, shown = model_config(name)
        assert shown == name
        got = spec_from_config(cfg.to_dict(), name)
        assert got == spec, name
    seven = model_config("llava-1.5-7b")[0]
    assert count(seven.to_dict()) == count(llava15_7b_config().to_dict()) == 7_063_427_072


def test_a_small_config_runs_the_whole_suite_on_the_cpu(tmp_path, capsys):
    """A shape neither --tiny nor LLaVA-1.5-7B, through every record, on the CPU."""
    cfg = _small_config(tmp_path / "small")
    rc, out, err = _bench(capsys, "--model", str(cfg), "--device", "cpu", "--out-dir", str(tmp_path / "r"), *FAST,
                          "--schedule", "1:2,2:2", "--no-hf", "--no-fastv")
    assert rc == 0, err
    (path,) = (tmp_path / "r").glob("*.json")
    res = json.loads(path.read_text())
    assert res["model"].startswith(str(cfg)) and res["schedule"] == "1:2,2:2"
    assert res["plan"]["decoder_flops_ratio"] > 1
    assert any(r["metric"] == "decode_tokens_per_s_b2" for r in res["records"])


def test_a_model_that_does_not_fit_in_memory_is_refused(tmp_path, capsys, nothing_runs, monkeypatch):
    monkeypatch.setattr("adsc_ext.models.checkpoint.available_memory",
                        lambda device="cpu": (24 * GiB, "MemAvailable in /proc/meminfo"))
    err = _refused(capsys, "--model", "llava-1.5-13b", "--device", "cpu", "--dtype", "bf16")
    assert "GiB" in err and "24 GiB available" in err and "--tiny" in err
    err = _refused(capsys, "--tiny", "--device", "cpu", "--decode-batches", "1000000")
    assert "GiB" in err and "decode" in err


def test_absurd_config_is_refused_fast(tmp_path, capsys, nothing_runs):
    """Dims no machine holds: counted from the config (no model, not even on the meta device)."""
    import time

    cfg = _small_config(tmp_path / "huge", num_hidden_layers=1_000_000, hidden_size=65536, num_attention_heads=64,
                        num_key_value_heads=64, intermediate_size=4 * 65536)
    t0 = time.perf_counter()
    err = _refused(capsys, "--model", str(cfg), "--device", "cpu", "--schedule", "1:2")
    assert "GiB" in err and time.perf_counter() - t0 < 30
