"""The TensorRT end on a GPU with TensorRT installed (skipped elsewhere, i.e. on every machine this
project has had so far):

- the AdscCompactTokens plugin inside a real engine, reached the way an export reaches it (an ONNX
  node with the _plugin contract -> the parser's plugin fallback -> libadsc_tensorrt.so), against
  the reference compaction bit for bit, for every dtype;
- `adsc trt-build` on a tiny export (plugin and standard-op compaction): engines, report, the
  refusal to overwrite;
- TensorRTRunner's tokens against OnnxRunner's on the same export.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

trt = pytest.importorskip("tensorrt")
pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from adsc_ext.export import _plugin  # noqa: E402
from adsc_ext.export import tensorrt as trt_export  # noqa: E402
from adsc_ext.export.tensorrt import BuildLimits, TensorRTBuildError, build_engines  # noqa: E402

SCHEDULE = "2:2,4:2"


def _plugin_library() -> Path:
    try:
        return trt_export.find_plugin_library()
    except TensorRTBuildError as exc:
        pytest.skip(f"libadsc_tensorrt.so not built: {exc}")


def _one_node_model(path: Path, onnx_dtype, d: int):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    node = helper.make_node(_plugin.OP_TYPE, ["x", "index"], ["y"], name="compact",
                            domain=_plugin.DOMAIN, **_plugin.compact_node_attributes())
    graph = helper.make_graph(
        [node], "compact",
        [helper.make_tensor_value_info("x", onnx_dtype, ["T", d]),
         helper.make_tensor_value_info("index", TensorProto.INT32, ["T_s"])],
        [helper.make_tensor_value_info("y", onnx_dtype, ["T_s", d])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(*_plugin.compact_opset_import())])
    onnx.save(model, str(path))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_plugin_in_an_engine_matches_the_reference(tmp_path, dtype):
    from onnx import TensorProto

    from adsc_ext.export.trt_runner import EngineGraph
    from adsc_ext.reference import compact_tokens_reference

    onnx_dtype = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
                  torch.bfloat16: TensorProto.BFLOAT16}[dtype]
    d = 96
    path = tmp_path / "compact.onnx"
    _one_node_model(path, onnx_dtype, d)
    trt_export._load_plugin(trt, _plugin_library())
    logger = trt.Logger(trt.Logger.WARNING)
    inputs = [{"name": "x", "dims": ["T", d]}, {"name": "index", "dims": ["T_s"]}]
    shapes = {"x": ((1, d), (640, d), (2048, d)), "index": ((1,), (352, ), (2048,))}
    blob = trt_export._build_engine(trt, logger, path, inputs, shapes, None)
    (tmp_path / "compact.engine").write_bytes(memoryview(blob))
    graph = EngineGraph(trt, trt.Runtime(logger), tmp_path / "compact.engine", torch.device("cuda"))
    g = torch.Generator(device="cuda").manual_seed(0)
    for T, Ts in ((630, 342), (1, 1), (2048, 2048), (17, 5)):
        x = torch.randn(T, d, device="cuda", generator=g).to(dtype)
        index = torch.randint(-1, T, (Ts,), device="cuda", generator=g, dtype=torch.int32)
        index[0] = -1
        (y,) = graph({"x": x, "index": index})
        torch.cuda.synchronize()
        assert y.dtype == dtype and y.shape == (Ts, d)
        assert torch.equal(y, compact_tokens_reference(x, index))


def _export(tmp_path, compaction):
    pytest.importorskip("onnxscript")
    from adsc_ext.export.onnx_export import export_onnx
    from adsc_ext.testing import tiny_llava

    out = tmp_path / f"export-{compaction}"
    export_onnx(tiny_llava(seed=3), out, SCHEDULE, compaction=compaction, progress=None)
    return out


@pytest.mark.parametrize("compaction", ["plugin", "onnx"])
def test_build_and_run_engines(tmp_path, compaction):
    from adsc_ext.export.runner import OnnxRunner
    from adsc_ext.export.trt_runner import TensorRTRunner

    if compaction == "plugin":
        _plugin_library()
    folder = _export(tmp_path, compaction)
    limits = BuildLimits(max_batch=4, max_prompt=96, max_new_tokens=8)
    report = build_engines(folder, limits, log=lambda line: None)
    saved = json.loads((folder / "trt_build_report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert set(report["engines"]) == {"vision", "embed", "prefill", "decode"}
    assert report["tensorrt_version"] == trt.__version__
    assert report["engines"]["prefill"]["uses_plugin"] == (compaction == "plugin")
    for e in report["engines"].values():
        assert (folder / e["engine"]).stat().st_size == e["bytes"] > 0
    # One profile dim per stage: the decode caches of different stages have different opt lengths.
    prof = report["engines"]["decode"]["profile"]
    opts = {prof[f"past_mask.{s}"]["opt"][1] for s in range(3)}
    assert len(opts) == 3
    with pytest.raises(TensorRTBuildError, match="exists; pass force=True"):
        build_engines(folder, limits, log=lambda line: None)

    onnx_runner = OnnxRunner(folder)
    trt_runner = TensorRTRunner(folder)
    g = torch.Generator().manual_seed(0)
    hw, img, side = onnx_runner.spec.tokens_per_image, onnx_runner.image_token_id, onnx_runner.image_size
    reqs = [
        {"input_ids": torch.cat([torch.randint(3, 250, (3,), generator=g), torch.full((hw,), img),
                                 torch.randint(3, 250, (5,), generator=g)]),
         "pixel_values": torch.randn(1, 3, side, side, generator=g)},
        {"input_ids": torch.randint(3, 250, (9,), generator=g), "pixel_values": None},
        {"input_ids": torch.cat([torch.full((2 * hw,), img), torch.randint(3, 250, (2,), generator=g)]),
         "pixel_values": torch.randn(2, 3, side, side, generator=g), "max_new_tokens": 3},
    ]
    want = onnx_runner.generate(reqs, 6, return_logits=True)
    got = trt_runner.generate(reqs, 6, return_logits=True)
    for (wt, wl), (gt, gl) in zip(want, got):
        # float32 on both, TF32 off: the first step's logits agree closely, and so do the tokens.
        torch.testing.assert_close(gl[0], wl[0], rtol=1e-3, atol=1e-3)
        assert gt == wt
    assert trt_runner.stats["stage_lengths"] == onnx_runner.stats["stage_lengths"]


def test_trt_build_command(tmp_path, capsys):
    from adsc_ext.cli import main

    folder = _export(tmp_path, "onnx")
    assert main(["trt-build", str(folder), "--max-batch", "2", "--max-prompt", "64",
                 "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    assert "4 engines" in out and "trt_build_report.json" in out
    assert main(["trt-build", str(folder)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("adsc: error: ") and err.count("\n") == 1 and "--force" in err
