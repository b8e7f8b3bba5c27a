"""Run the TensorRT engines of an exported ADSC folder: :class:`TensorRTRunner`.

``TensorRTRunner(folder).generate(requests, max_new_tokens)`` is :class:`OnnxRunner`'s
``generate`` (the one generation loop's: the requests and results of
:meth:`adsc_ext.runtime.Engine.generate`, the same request checks, layout and token picking), on the engines :func:`~adsc_ext.export.build_engines`
wrote beside the ONNX files. Everything lives on the GPU: the embeddings, image features and plan
tensors are uploaded once per prefill, every layer's K/V stays in device buffers sized by its own
stage's length from step to step (the decode engine's ``present.*`` outputs are the next step's
``past_key_values.*`` inputs, no copy), and each step reads back only the picked token ids.

Each graph is called through a *graph runner*: ``runner(feeds: {name: torch.Tensor}) ->
[torch.Tensor, ...]`` (outputs in the graph's order). The default one executes a TensorRT engine
(``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3`` on torch's current stream);
``graph_runners=`` replaces it, which is how the tests check this class's host logic on the CPU
against :class:`OnnxRunner` with ONNX Runtime behind the same interface.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch

from ..errors import AdscInputError
from ..generation import Seq
from .manifest import GRAPH_FILES, ExportError
from .runner import OnnxRunner
from .tensorrt import (
    REPORT_NAME,
    TensorRTBuildError,
    find_plugin_library,
    import_tensorrt,
    _load_plugin,
)

__all__ = ["TensorRTRunner", "EngineGraph"]

GraphRunner = Callable[[Mapping[str, torch.Tensor]], List[torch.Tensor]]

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _trt_to_torch(trt) -> Dict[Any, torch.dtype]:
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
             "INT32": torch.int32, "INT64": torch.int64, "INT8": torch.int8, "UINT8": torch.uint8,
             "BOOL": torch.bool}
    return {getattr(trt.DataType, k): v for k, v in table.items() if hasattr(trt.DataType, k)}


class EngineGraph:
    """One deserialized TensorRT engine as a graph runner: torch tensors in, torch tensors out,
    on ``device``, enqueued on torch's current stream (so torch work before and after is ordered
    with it and nothing synchronises)."""

    def __init__(self, trt, runtime, path: Path, device: torch.device):
        self.path = Path(path)
        self.device = device
        self.runtime = runtime  # kept: the runtime must outlive the engines it deserialized
        self.engine = runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise TensorRTBuildError(
                f"TensorRT could not deserialize {self.path} (built by another TensorRT version, or "
                "for another GPU? rebuild it with `adsc trt-build --force`)")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TensorRTBuildError(f"{self.path}: TensorRT could not create an execution context")
        dtypes = _trt_to_torch(trt)
        self.inputs: List[str] = []
        self.outputs: List[str] = []
        self.dtypes: Dict[str, torch.dtype] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            trt_dtype = self.engine.get_tensor_dtype(name)
            if trt_dtype not in dtypes:
                raise TensorRTBuildError(f"{self.path}: tensor {name!r} has type {trt_dtype}, "
                                         "which torch cannot hold")
            self.dtypes[name] = dtypes[trt_dtype]
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(name)
            else:
                self.outputs.append(name)

    def __call__(self, feeds: Mapping[str, torch.Tensor]) -> List[torch.Tensor]:
        missing = [n for n in self.inputs if n not in feeds]
        if missing:
            raise ValueError(f"{self.path.name}: no value for input {missing[0]!r}")
        keep = []  # the inputs must outlive the enqueued work: torch's allocator is stream-ordered
        for name in self.inputs:
            t = feeds[name].to(device=self.device, dtype=self.dtypes[name]).contiguous()
            keep.append(t)
            if not self.context.set_input_shape(name, tuple(t.shape)):
                raise AdscInputError(f"{self.path.name}: input {name!r} of shape {tuple(t.shape)} is "
                                 "outside the engine's optimisation profile (rebuild with larger limits)")
            self.context.set_tensor_address(name, t.data_ptr())
        outs = []
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise ValueError(f"{self.path.name}: output {name!r} has unresolved shape {shape}")
            out = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, out.data_ptr())
            outs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"{self.path.name}: TensorRT's execute_async_v3 failed (see its log)")
        for t in keep:
            t.record_stream(stream)
        return outs


class TensorRTRunner(OnnxRunner):
    """Greedy / sampled generation on an exported folder's TensorRT engines.

    Args:
        folder: an ``adsc export`` folder after ``adsc trt-build``.
        schedule: the schedule the caller expects; a folder exported with another one is refused.
        device: the CUDA device (default ``cuda``).
        plugin_library: ``libadsc_tensorrt.so`` for engines with ``AdscCompactTokens`` (default:
            the one the build report names, else :func:`find_plugin_library`'s search).
        graph_runners: ``{graph name: runner}`` to use instead of the engines (see the module
            docstring); with it, neither TensorRT nor a GPU is needed.
    """

    architectures = ("llava-1.5",)  # its host logic feeds LLaVA-1.5's graphs only

    def __init__(self, folder, *, schedule=None, device=None,
                 plugin_library=None, graph_runners: Optional[Mapping[str, GraphRunner]] = None):
        man = self._read_manifest(folder, schedule)
        if man["dtype"] not in _TORCH_DTYPES:
            raise ExportError(f"{self.folder}: unknown export dtype {man['dtype']!r}")
        self.dtype = _TORCH_DTYPES[man["dtype"]]
        self.stats: Dict[str, Any] = {}
        self._state: Optional[Dict[str, Any]] = None
        if graph_runners is not None:
            missing = [n for n in GRAPH_FILES if n not in graph_runners]
            if missing:
                raise AdscInputError(f"graph_runners lacks {', '.join(missing)}")
            self.device = torch.device(device or "cpu")
            self.graphs: Dict[str, GraphRunner] = dict(graph_runners)
            self.report = None
            return
        self.device = torch.device(device or "cuda")
        if self.device.type != "cuda" or not torch.cuda.is_available():
            raise RuntimeError("TensorRTRunner runs the engines on a CUDA GPU; none is available")
        trt = import_tensorrt()
        report_path = self.folder / REPORT_NAME
        if not report_path.is_file():
            raise TensorRTBuildError(f"{self.folder} has no {REPORT_NAME}: run `adsc trt-build {self.folder}`")
        self.report = json.loads(report_path.read_text())
        engines = self.report.get("engines", {})
        missing = [n for n in GRAPH_FILES if n not in engines]
        if missing:
            raise TensorRTBuildError(f"{self.folder}: no engine for the {missing[0]} graph; run "
                                     f"`adsc trt-build {self.folder}` (without --graphs)")
        if any(e.get("uses_plugin") for e in engines.values()):
            lib = plugin_library
            if lib is None:  # the library the build used, if it is still there; else the search
                recorded = self.report.get("plugin_library")
                lib = recorded if recorded and Path(recorded).is_file() else None
            _load_plugin(trt, find_plugin_library(lib))
        self._trt_logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._trt_logger)
        torch.cuda.set_device(self.device)
        self.graphs = {}
        for name in GRAPH_FILES:
            path = self.folder / engines[name]["engine"]
            if not path.is_file():
                raise TensorRTBuildError(f"{path} is missing; run `adsc trt-build {self.folder} --force`")
            self.graphs[name] = EngineGraph(trt, self._runtime, path, self.device)

    # ---- the graph calls: torch tensors on self.device --------------------------------------------
    def _run(self, name: str, feeds: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        return self.graphs[name](feeds)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._run("embed", {"input_ids": ids.to(self.device)})[0]

    def _prefill(self, seqs: List[Seq]) -> torch.Tensor:
        dev = self.device
        ids, mask, layout = self._batch(seqs)  # planned on the host, once per batch
        ids_d, mask_d = ids.to(dev), mask.to(dev)
        h = self._embed(ids_d)
        pix = [s.pixel_values for s in seqs if s.pixel_values is not None]
        if pix:
            pv = torch.cat(pix).to(device=dev, dtype=self.dtype)
            feats = self._run("vision", {"pixel_values": pv})[0]
            rows = (ids_d == self.image_token_id) & (mask_d != 0)
            h[rows] = feats.reshape(-1, feats.shape[-1]).to(h.dtype)
        feed = {"inputs_embeds": h, "attention_mask": mask_d,
                "position_ids": layout.stages[0].position_ids.to(dev)}
        for st in layout.stages[1:]:
            feed[f"adsc_index.{st.stage}"] = st.index.to(device=dev, dtype=torch.int32)
        out = self._run("prefill", feed)
        masks = [mask_d] + [st.mask.to(device=dev, dtype=torch.long) for st in layout.stages[1:]]
        pos = torch.tensor([[s.n] for s in seqs], dtype=torch.long, device=dev)
        self._state = {"rids": [s.rid for s in seqs], "masks": masks, "kv": list(out[1:]), "pos": pos, "toks": None}
        return out[0]

    def _accept(self, seqs: List[Seq], tokens: torch.Tensor) -> None:
        self._state["toks"] = tokens[:, None]  # the next step's input, still on the device

    def _decode(self, seqs: List[Seq]) -> torch.Tensor:
        dev = self.device

        def take(v, keep):
            idx = torch.as_tensor(keep, device=dev)
            return [t.index_select(0, idx) for t in v] if isinstance(v, list) else v.index_select(0, idx)

        state = self._rows(seqs, take)
        feed = {"inputs_embeds": self._embed(state["toks"]), "position_ids": state["pos"]}
        for k, m in enumerate(state["masks"]):
            feed[f"past_mask.{k}"] = m
        for l in range(self.num_layers):
            feed[f"past_key_values.{l}.key"] = state["kv"][2 * l]
            feed[f"past_key_values.{l}.value"] = state["kv"][2 * l + 1]
        out = self._run("decode", feed)
        ones = torch.ones(len(seqs), 1, dtype=torch.long, device=dev)
        self._state = {"rids": state["rids"], "masks": [torch.cat([m, ones], dim=1) for m in state["masks"]],
                       "kv": list(out[1:]), "pos": state["pos"] + 1, "toks": None}
        return out[0]
