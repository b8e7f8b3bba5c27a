"""TensorRTRunner's host logic (requests, plan, image scatter, per-stage K/V state, pruning of
finished rows, token picking) on the CPU: the engines are replaced by ONNX Runtime sessions of the
same graphs behind the runner's graph-runner interface (torch tensors in and out), and the results
must equal OnnxRunner's. The runs on real engines are in test_tensorrt_gpu.py."""

from __future__ import annotations

import pytest
import torch

from pathlib import Path

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
if not (Path(__file__).resolve().parents[1] / "adsc_ext/export/runner.py").is_file():
    pytest.skip("the ONNX export and its runner (adsc_ext/export/runner.py) are not in this tree",
                allow_module_level=True)

from adsc_ext.export.runner import OnnxRunner  # noqa: E402
from adsc_ext.export.trt_runner import TensorRTRunner  # noqa: E402
from adsc_ext.testing import tiny_llava  # noqa: E402

SCHEDULE = "1:2,2:4"  # 4x4 -> 4x2 -> 2x1: three stages on a three-layer model


class OrtGraph:
    """An ONNX Runtime session as a graph runner: what EngineGraph is for an engine."""

    def __init__(self, session):
        self.session = session
        self.inputs = [i.name for i in session.get_inputs()]
        self.calls = 0

    def __call__(self, feeds):
        self.calls += 1
        for t in feeds.values():
            assert isinstance(t, torch.Tensor)  # the runner hands tensors, never numpy
        arrays = {n: feeds[n].detach().cpu().numpy() for n in self.inputs}
        return [torch.from_numpy(o) for o in self.session.run(None, arrays)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from adsc_ext.export.onnx_export import export_onnx

    out = tmp_path_factory.mktemp("trt_runner") / "export"
    export_onnx(tiny_llava(seed=3, num_layers=3, vision_layers=1), out, SCHEDULE, progress=None)
    return out


@pytest.fixture(scope="module")
def runners(folder):
    onnx_runner = OnnxRunner(folder)
    graphs = {name: OrtGraph(s) for name, s in onnx_runner.sessions.items()}
    return onnx_runner, TensorRTRunner(folder, graph_runners=graphs), graphs


def _requests(runner, seed=0):
    g = torch.Generator().manual_seed(seed)
    hw, img = runner.spec.tokens_per_image, runner.image_token_id
    side = runner.image_size

    def text(n):
        return torch.randint(3, 250, (n,), generator=g)

    def pix(k):
        return torch.randn(k, 3, side, side, generator=g)

    return [
        {"input_ids": torch.cat([text(3), torch.full((hw,), img), text(5)]), "pixel_values": pix(1)},
        {"input_ids": text(7), "pixel_values": None},
        {"input_ids": torch.cat([text(2), torch.full((2 * hw,), img), text(4)]), "pixel_values": pix(2),
         "max_new_tokens": 3},
        {"input_ids": torch.cat([torch.full((hw,), img), text(1)]), "pixel_values": pix(1)},
    ]


def test_runner_equals_onnx_runner(runners):
    onnx_runner, trt_runner, graphs = runners
    reqs = _requests(onnx_runner)
    want = onnx_runner.generate(reqs, 6, return_logits=True)
    got = trt_runner.generate(reqs, 6, return_logits=True)
    for (wt, wl), (gt, gl) in zip(want, got):
        assert gt == wt
        torch.testing.assert_close(gl, wl, rtol=0, atol=0)  # the same graphs: bit for bit
    assert [len(t) for t, _ in got] == [6, 6, 3, 6]
    assert trt_runner.stats["stage_lengths"] == onnx_runner.stats["stage_lengths"]
    assert trt_runner.stats["decode_steps"] == 5
    assert graphs["vision"].calls >= 1 and graphs["decode"].calls >= 5


def test_runner_text_only_batch_and_eos(runners):
    onnx_runner, trt_runner, _ = runners
    reqs = [r for r in _requests(onnx_runner, seed=1) if r["pixel_values"] is None]
    first = onnx_runner.generate(reqs, 4)[0]
    eos = first[1]
    assert trt_runner.generate(reqs, 4, eos_token_id=eos) == onnx_runner.generate(reqs, 4, eos_token_id=eos)
    assert trt_runner.generate(reqs, 4, eos_token_id=eos)[0][-1] == eos


def test_runner_checks_requests_like_the_onnx_runner(runners):
    from adsc_ext.errors import AdscInputError

    onnx_runner, trt_runner, _ = runners
    bad = {"input_ids": torch.full((onnx_runner.spec.tokens_per_image,), onnx_runner.image_token_id),
           "pixel_values": None}
    with pytest.raises(AdscInputError, match="request 0: input_ids hold 1 image"):
        trt_runner.generate([bad], 2)
    out = trt_runner.generate([bad, {"input_ids": torch.tensor([5, 6])}], 2, return_exceptions=True)
    assert isinstance(out[0], AdscInputError) and len(out[1]) == 2


def test_runner_needs_every_graph(folder):
    with pytest.raises(ValueError, match="graph_runners lacks"):
        TensorRTRunner(folder, graph_runners={"embed": None})


def test_runner_without_gpu_or_engines(folder):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA GPU"):
        TensorRTRunner(folder)
