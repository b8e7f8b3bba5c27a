"""Tests of ``adsc bench`` (adsc_ext.bench) on the CPU with ``--tiny``: what it measures, records and
judges, where it writes, and how it refuses what it cannot run. Nothing here is a timed test: the
numbers of a tiny CPU run mean nothing; the logic that turns them into records and verdicts does."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from adsc_ext import cli  # noqa: E402
from adsc_ext.accounting import plan_report, spec_from_config  # noqa: E402
from adsc_ext.bench import cli as bench_cli  # noqa: E402
from adsc_ext.bench import suite  # noqa: E402
from adsc_ext.bench.timing import Samples, speedup_bounds, verdict  # noqa: E402

SMALL = ["--tiny", "--repeats", "2", "--new-tokens", "3", "--prefill-batches", "2", "--prefill-batch", "2",
         "--decode-batches", "2,3", "--decode-batch", "2", "--text-tokens", "4", "--no-progress"]

SPEC8_RECORDS = {
    "prefill_decoder_seconds_b2", "ttft_seconds_b2", "reindex_fraction_of_prefill", "kv_cache_bytes_prompt",
    "kv_cache_bytes_prompt_generated", "decode_tokens_per_s_b2", "decode_tokens_per_s_b3",
    "fastv_ttft_seconds_b2", "compact_bandwidth_fraction", "kv_write_bandwidth_fraction",
}
SPEC8_TARGETS = {
    "prefill_decoder_speedup_b2", "ttft_speedup_b2", "reindex_fraction_of_prefill", "kv_bytes_error_prompt",
    "kv_bytes_error_prompt_generated", "decode_speedup_b2", "prefill_faster_than_fastv",
    "compact_bandwidth_fraction", "kv_write_bandwidth_fraction",
}


def _bench(argv, capsys):
    rc = cli.main(["bench", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run, through the ``adsc`` command, every engine checked to time only persistent pools."""
    from adsc_ext.runtime import Engine

    out_dir = tmp_path_factory.mktemp("bench")
    mp = pytest.MonkeyPatch()
    generate = Engine.generate
    fresh_pools = []

    def checked(self, *a, **k):
        fresh_pools.append(self.pool is None)  # a timed run must not allocate (or zero-fill) its pool
        return generate(self, *a, **k)

    mp.setattr(Engine, "generate", checked)
    mp.setattr(sys, "argv", ["adsc", "bench", *SMALL])
    import io
    from contextlib import redirect_stderr, redirect_stdout

    so, se = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(so), redirect_stderr(se):
            rc = cli.main(["bench", *SMALL, "--out-dir", str(out_dir)])
    finally:
        mp.undo()
    (path,) = out_dir.glob("*.json")
    return dict(rc=rc, out=so.getvalue(), err=se.getvalue(), path=path, res=json.loads(path.read_text()),
                fresh_pools=fresh_pools)


def test_tiny_run_writes_every_spec8_record(tiny_run):
    res = tiny_run["res"]
    assert tiny_run["rc"] == 0
    assert {"device", "torch", "cuda", "transformers", "date", "command", "records", "targets", "plan"} <= set(res)
    assert res["command"] == "adsc bench " + " ".join(SMALL)
    metrics = {r["metric"]: r for r in res["records"]}
    assert SPEC8_RECORDS <= set(metrics)
    assert {t["name"] for t in res["targets"]} == SPEC8_TARGETS
    # nothing was timed on a pool allocated inside the timed call
    assert tiny_run["fresh_pools"] and not any(tiny_run["fresh_pools"])


def test_prefill_records_compare_like_with_like(tiny_run):
    """Decoder-only time against the decoder FLOPs ratio; time to first token against the
    whole-prefill ratio (vision tower included), both from adsc plan's accounting."""
    res = tiny_run["res"]
    metrics = {r["metric"]: r for r in res["records"]}
    report = _tiny_report()
    dec, ttft = metrics["prefill_decoder_seconds_b2"], metrics["ttft_seconds_b2"]
    assert dec["config"]["flops_ratio"] == pytest.approx(report["ideal_speedup"])
    assert ttft["config"]["flops_ratio"] == pytest.approx(report["prefill"]["speedup"])
    assert report["prefill"]["speedup"] < report["ideal_speedup"]  # the vision tower does not shrink
    targets = {t["name"]: t for t in res["targets"]}
    assert targets["prefill_decoder_speedup_b2"]["target"] == pytest.approx(0.95 * report["ideal_speedup"])
    assert targets["ttft_speedup_b2"]["target"] == pytest.approx(0.95 * report["prefill"]["speedup"])
    assert targets["decode_speedup_b2"]["target"] == pytest.approx(0.95 * report["decode"]["speedup"])
    for r in (dec, ttft):  # every sample kept, with its spread
        for side in ("baseline_samples", "adsc_samples"):
            s = r[side]
            assert len(s["samples"]) == 2 and s["min"] <= s["median"] <= s["max"] and s["spread"] >= 0
        assert r["low"] <= r["speedup"] <= r["high"]
        assert 0 < dec["adsc"] <= ttft["adsc"]  # the decoder is part of time to first token


def _tiny_report():
    from adsc_ext.testing import tiny_llava_config

    cfg = tiny_llava_config(grid_side=24, patch_size=2, num_layers=8, hidden_size=64)
    return plan_report(spec_from_config(cfg.to_dict(), "tiny"), "2:2,4:2,6:2", 1 + 4, 1, 4, decode_batch=2,
                       new_tokens=3)


def test_kv_records_are_measured_allocations_against_analytic_prompt_and_total(tiny_run):
    metrics = {r["metric"]: r for r in tiny_run["res"]["records"]}
    report = _tiny_report()
    prompt, total = metrics["kv_cache_bytes_prompt"], metrics["kv_cache_bytes_prompt_generated"]
    assert prompt["config"]["analytic_adsc"] == 2 * report["adsc_kv_bytes"]
    assert prompt["config"]["analytic_baseline"] == 2 * report["baseline_kv_bytes"]
    assert total["config"]["analytic_adsc"] == report["decode"]["adsc_kv_bytes_end"]
    assert prompt["config"]["analytic_reduction"] == pytest.approx(report["kv_reduction_pct"] / 100)
    assert total["config"]["analytic_reduction"] == pytest.approx(report["decode"]["kv_end_reduction_pct"] / 100)
    for r in (prompt, total):
        # on a CPU the pool tensors' sizes are what is measured, and said so
        assert r["adsc"] == r["config"]["pool_tensor_bytes"]["adsc"] and "CPU" in r["config"]["measured_by"]
        assert r["config"]["analytic_adsc"] <= r["adsc"] < 1.1 * r["config"]["analytic_adsc"]  # block rounding
        assert r["adsc"] < r["baseline"]
    targets = {t["name"]: t for t in tiny_run["res"]["targets"]}
    assert targets["kv_bytes_error_prompt"]["measured"] == pytest.approx(
        max(prompt["config"]["error_adsc"], prompt["config"]["error_baseline"]))


def test_decode_record_says_which_path_ran(tiny_run):
    metrics = {r["metric"]: r for r in tiny_run["res"]["records"]}
    for b in (2, 3):
        c = metrics[f"decode_tokens_per_s_b{b}"]["config"]
        assert c["decode_path"] == "gather" and c["cuda_graphs"] is False and c["block_size"] == 16
    assert metrics["reindex_fraction_of_prefill"]["adsc"] > 0


def test_tiny_targets_are_not_applicable_and_the_output_is_clear(tiny_run):
    res = tiny_run["res"]
    assert res["targets_apply"] is False and "tiny" in res["targets_not_applicable"]
    assert all(t["status"] == "not applicable" and not t["met"] for t in res["targets"])
    out = tiny_run["out"]
    assert "not applicable (a tiny model" in out and f"wrote {tiny_run['path']}" in out
    assert Path(str(tiny_run["path"])).is_absolute()


def test_missing_matplotlib_is_one_clear_line(tiny_run, monkeypatch):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plot skipped: matplotlib is not installed (pip install matplotlib; it comes with adsc_ext's [bench] extra)" in tiny_run["out"]
        assert tiny_run["res"]["plot"] is None and "matplotlib" in tiny_run["res"]["plot_skipped"]
    else:
        monkeypatch.setitem(sys.modules, "matplotlib", None)
        path, why = suite._plot([], [], Path("unused.png"), "t")
        assert path is None and "adsc_ext[bench]" in why


def test_targets_are_judged_where_they_apply(tmp_path, monkeypatch, capsys):
    """With the applicability check passed (as on an H200 with the full model), the targets get a
    verdict, except decode on the gather path and the KV bytes without a device allocator."""
    monkeypatch.setattr(suite, "applicability", lambda tiny, device, dtype: None)
    rc, out, err = _bench([*SMALL, "--no-hf", "--out-dir", str(tmp_path)], capsys)
    assert rc == 0, err
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    t = {x["name"]: x for x in res["targets"]}
    assert t["decode_speedup_b2"]["status"] == "not applicable"
    assert "'gather' path" in t["decode_speedup_b2"]["not_applicable"]
    for name in ("kv_bytes_error_prompt", "kv_bytes_error_prompt_generated"):
        assert t[name]["status"] == "not applicable" and "allocator" in t[name]["not_applicable"]
    for name in ("prefill_decoder_speedup_b2", "ttft_speedup_b2", "reindex_fraction_of_prefill",
                 "prefill_faster_than_fastv", "compact_bandwidth_fraction", "kv_write_bandwidth_fraction"):
        assert t[name]["status"] in ("met", "missed", "inconclusive") and t[name]["applies"]
        assert t[name]["met"] == (t[name]["status"] == "met")


def test_applicability_names_h100_and_h200(monkeypatch):
    cuda = torch.device("cuda")
    for name, applies in (("NVIDIA H200", True), ("NVIDIA H100 80GB HBM3", True), ("NVIDIA A100-SXM4-80GB", False)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert (suite.applicability(False, cuda, torch.bfloat16) is None) == applies
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert "bf16" in suite.applicability(False, cuda, torch.float16)
    assert "tiny" in suite.applicability(True, cuda, torch.bfloat16)
    assert "cpu" in suite.applicability(False, torch.device("cpu"), torch.bfloat16)


def test_verdicts_need_the_spread_to_allow_them():
    # a noisy "19.6x": the samples admit anything from 0.5x to 30x: not "met"
    b = speedup_bounds([1.0, 3.0, 15.0], [0.5, 2.0, 0.1], higher_is_better=True)
    assert verdict(b["speedup"], 1.3, b["low"], b["high"]) == "inconclusive"
    tight = speedup_bounds([1.0, 1.01], [0.5, 0.505], higher_is_better=False)  # times: baseline / adsc
    assert tight["low"] == pytest.approx(1.0 / 0.505) and verdict(tight["speedup"], 1.83, tight["low"], tight["high"]) == "met"
    assert verdict(1.5, 1.83, 1.4, 1.6) == "missed"
    assert verdict(0.002, 0.01, 0.001, 0.003, higher_is_better=False) == "met"
    assert verdict(0.02, 0.01, 0.005, 0.03, higher_is_better=False) == "inconclusive"
    s = Samples([3.0, 1.0, 2.0])
    assert (s.median, s.spread) == (2.0, 1.0)


def test_kernel_buffers_are_four_times_l2(monkeypatch):
    class Props:
        L2_cache_size = 100 << 20

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: Props())
    assert suite.kernel_buffer_bytes(torch.device("cuda")) == (100 << 20, 4 * (100 << 20))
    Props.L2_cache_size = 50 << 20  # H100 / H200: 50-60 MB of L2; never under 256 MiB
    assert suite.kernel_buffer_bytes(torch.device("cuda")) == (50 << 20, 256 << 20)
    assert suite.kernel_buffer_bytes(torch.device("cpu")) == (None, 16 << 20)


# ---- where results go ------------------------------------------------------------------------------
def test_out_dir_defaults_to_the_checkout_not_the_current_directory(tmp_path, monkeypatch):
    root = Path(bench_cli.__file__).resolve().parents[2]
    assert bench_cli.default_out_dir() == root / "benchmarks" / "results"
    monkeypatch.chdir(tmp_path)
    assert bench_cli.default_out_dir().is_absolute()


def test_out_dir_required_outside_a_checkout(monkeypatch, capsys):
    monkeypatch.setattr(bench_cli, "default_out_dir", lambda: None)
    rc, out, err = _bench(["--tiny"], capsys)
    assert rc == 2 and err.count("\n") == 1 and "give --out-dir" in err


def test_relative_out_dir_is_made_absolute(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(suite, "run_suite", lambda args, device, dtype, new, out_dir: print(f"OUT {out_dir}") or 0)
    rc, out, err = _bench(["--tiny", "--out-dir", "res"], capsys)
    assert rc == 0 and f"OUT {tmp_path / 'res'}" in out


# ---- refusals: one line, exit 2, no traceback, nothing allocated -----------------------------------
@pytest.mark.parametrize("argv, match", [
    (["--tiny", "--dtype", "foo"], "--dtype: invalid choice: 'foo'"),
    (["--tiny", "--dtype", "Tensor"], "--dtype: invalid choice: 'Tensor'"),
    (["--tiny", "--device", "foo"], "--device 'foo' is not a device"),
    (["--tiny", "--device", "cuda"] if not torch.cuda.is_available() else ["--tiny", "--device", "cuda:99"],
     "--device cuda"),
    (["--tiny", "--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["--tiny", "--repeats", "1"], "--repeats must be >= 2"),
    (["--tiny", "--decode-batches", "0"], "batch sizes >= 1"),
    (["--tiny", "--decode-block-size", "x"], "block size"),
])
def test_bad_arguments_are_one_line(argv, match, monkeypatch, capsys):
    monkeypatch.setattr(suite, "_build_model", lambda *a: pytest.fail("a model was built"))
    rc, out, err = _bench(argv, capsys)
    assert rc == 2 and "Traceback" not in err and err.count("\n") == 1 and match in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_full_size_on_a_cpu_is_refused_before_allocating(monkeypatch, capsys):
    monkeypatch.setattr(suite, "_build_model", lambda *a: pytest.fail("a model was built"))
    # a CPU runs what fits in its memory: the refusal below is of a machine with 24 GiB available
    monkeypatch.setattr("adsc_ext.models.checkpoint.available_memory", lambda device="cpu": (24 << 30, "MemAvailable"))
    rc, out, err = _bench([], capsys)
    assert rc == 2 and err.count("\n") == 1 and "needs a CUDA GPU with about" in err and "--tiny" in err
    rc, out, err = _bench(["--device", "cpu", "--dtype", "bf16"], capsys)
    assert rc == 2 and "needs a CUDA GPU" in err


def test_full_size_needs_its_memory():
    """The estimate the refusal uses: LLaVA-1.5-7B's weights (7.06 B parameters, bf16), the KV
    pools of the largest decode batch (both engines) and activations."""
    args = bench_cli.argparse.Namespace(new_tokens=None, decode_batches=[32, 64], decode_batch=32, schedule=None,
                                        text_tokens=64)
    need = suite.full_model_bytes(args, torch.bfloat16)
    weights = 2 * 7_063_427_072  # llava-hf/llava-1.5-7b-hf's parameters in bf16
    # batch 64 at 256-token blocks: 32 GiB baseline + 22 GiB ADSC
    assert need == weights + 64 * (32 * 1024 + 8 * (1024 + 768 + 512 + 512)) * 2 * 4096 * 2 + (4 << 30)


def test_bench_script_and_module_run_the_same_command(monkeypatch):
    import runpy

    seen = []
    monkeypatch.setattr(cli, "main", lambda argv: seen.append(argv) or 0)
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench.py", "--tiny"])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(Path(bench_cli.__file__).resolve().parents[2] / "benchmarks" / "bench.py"),
                       run_name="__main__")
    assert e.value.code == 0 and seen == [["bench", "--tiny"]]


def test_decode_target_is_judged_on_the_paged_path(tmp_path, monkeypatch, capsys):
    """With a backend that reads 256-token pages in place (flash-attn, here its recorded-signature
    stand-ins from test_runtime), the decode engines take 256-token blocks, the record says
    'paged' and the decode target gets a verdict; the prefill engines keep --block-size."""
    import types

    from adsc_ext.runtime import attention as A
    from test_runtime import _flash_attn_varlen_func, _flash_attn_with_kvcache

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = _flash_attn_varlen_func
    fake.flash_attn_with_kvcache = _flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(A, "_unavailable_reason", lambda name, device: None)
    monkeypatch.setattr(suite, "applicability", lambda tiny, device, dtype: None)
    rc, out, err = _bench([*SMALL, "--backend", "flash_attn", "--no-hf", "--no-fastv", "--out-dir", str(tmp_path)],
                          capsys)
    assert rc == 0, err
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    metrics = {r["metric"]: r for r in res["records"]}
    c = metrics["decode_tokens_per_s_b2"]["config"]
    assert (c["decode_path"], c["block_size"], c["backend"]) == ("paged", 256, "flash_attn")
    assert metrics["ttft_seconds_b2"]["config"]["block_size"] == 16
    t = {x["name"]: x for x in res["targets"]}["decode_speedup_b2"]
    assert t["applies"] and t["status"] in ("met", "missed", "inconclusive")


def test_a_failed_cuda_graph_capture_is_recorded_and_decode_reruns_eager(tmp_path, monkeypatch, capsys):
    """A capture that fails on the GPU must not cost the run: the error goes into the record and
    decode is measured without graphs (here the capture is made to fail on the CPU)."""
    from adsc_ext.runtime import engine as E

    monkeypatch.setattr(suite, "graphs_supported", lambda device: True)
    monkeypatch.setattr(E, "_require_cuda_graphs", lambda device: None)

    def failing(fn, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(E, "_capture", failing)
    rc, out, err = _bench([*SMALL, "--cuda-graphs", "on", "--no-hf", "--no-fastv", "--out-dir", str(tmp_path)], capsys)
    assert rc == 0, err
    assert "CUDA-graph decode failed (RuntimeError: operation not permitted" in err
    res = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert res["cuda_graphs"] is False and "not permitted" in res["cuda_graphs_error"]
    for b in (2, 3):
        c = {r["metric"]: r for r in res["records"]}[f"decode_tokens_per_s_b{b}"]["config"]
        assert c["cuda_graphs"] is False and "not permitted" in c["cuda_graphs_error"]
