"""Export an ADSC LLaVA-1.5 model to ONNX with the schedule baked in (:func:`export_onnx`).

The folder holds four graphs and a manifest:

- ``vision.onnx``  vision tower + projector: ``pixel_values`` -> ``image_features``;
- ``embed.onnx``   the token embedding table: ``input_ids`` -> ``inputs_embeds`` (the host scatters
  the image features into the image-token rows between the two, as LLaVA does);
- ``prefill.onnx`` the language model over a left-padded prompt batch, with one compaction index
  per later stage as inputs (the host plans the batch once with :func:`adsc_ext.stage_plan`); the
  hidden states and rotary cos/sin are compacted in the graph at every stage boundary, and every
  layer's ``present.{layer}.key/value`` comes out at its own stage's length;
- ``decode.onnx``  one token per row, ``past_key_values.{layer}.key/value`` at each stage's cached
  length (the dim is named per stage) and one past-key mask per stage -> logits and the grown K/V;
- ``adsc_manifest.json`` (:mod:`adsc_ext.export.manifest`).

Exporter: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript). Every sequence length is
its own ``torch.export.Dim``, so each stage gets a named dynamic dim (the TorchScript exporter
names dims too, but cannot go past opset 20 and so has no ``Attention`` op). At opset >= 23 the
attention is the ONNX ``Attention`` op (GQA included), below it MatMul/Softmax; the manifest says
which, read from the saved graph.

Memory: the graphs are traced with fake tensors and their initializers are the model's own
parameters until they are written, so an export needs the model plus, at most, one copy (the
dtype-converted copy when ``dtype`` differs from the model's).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import platform
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import _plugin
from .manifest import FORMAT, FORMAT_VERSION, GRAPH_FILES, ExportError, past_dim, stage_dim, write_manifest

__all__ = ["export_onnx", "DEFAULT_OPSET", "ATTENTION_OPSET", "COMPACTIONS", "plugin_reference_function",
           "require_onnx"]

DEFAULT_OPSET = 23
ATTENTION_OPSET = 23   # the first opset with the ONNX Attention op
MIN_OPSET = 18
COMPACTIONS = ("onnx", "plugin")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def require_onnx():
    """Import onnx, onnxscript (the exporter's backend); a clear error naming the extra if absent."""
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"ONNX export needs the 'export' extra (pip install 'adsc_ext[export]'): {exc}") from None
    return onnx


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise ExportError(f"export supports float32, float16 and bfloat16 models, got {dtype}")


def _resolve_dtype(dtype) -> Optional[torch.dtype]:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}.get(str(dtype), str(dtype))
    if name not in _DTYPES:
        raise ExportError(f"dtype must be one of float32, float16, bfloat16 (or fp32/fp16/bf16), got {dtype!r}")
    return _DTYPES[name]


# ---- the AdscCompactTokens node ---------------------------------------------------------------
def _plugin_translation():
    """The exporter's translation of ``torch.ops.adsc.compact_tokens`` into one plugin node."""
    import onnxscript
    from onnx.defs import OpSchema

    fp = OpSchema.FormalParameter
    schema = OpSchema(
        _plugin.OP_TYPE, _plugin.DOMAIN, _plugin.DOMAIN_VERSION,
        doc="ADSC token compaction (TensorRT plugin): out[i] = x[index[i]], zero where index[i] == -1",
        inputs=[fp("x", "T"), fp("index", f"tensor({_plugin.INDEX_DTYPE})")],
        outputs=[fp("y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "token rows")],
        attributes=[OpSchema.Attribute(k, OpSchema.AttrType.STRING, "") for k in _plugin.compact_node_attributes()],
    )
    op = onnxscript.values.Op(onnxscript.values.Opset(_plugin.DOMAIN, _plugin.DOMAIN_VERSION), _plugin.OP_TYPE, schema)

    def compact_tokens(x, index, check_index: bool = True):
        return op(x, index, **_plugin.compact_node_attributes())

    return {torch.ops.adsc.compact_tokens.default: compact_tokens}


def plugin_reference_function():
    """An ONNX function (domain ``adsc``) that computes ``AdscCompactTokens`` with standard ops.

    Added to a plugin graph's ``functions``, it lets ONNX Runtime run that graph (the node then
    resolves to this function): how the runner and the tests check a plugin export on the CPU.
    """
    onnx = require_onnx()
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.INT32, [], [0])),
        helper.make_node("Constant", [], ["last"], value=helper.make_tensor("last", TensorProto.INT64, [1], [-1])),
        helper.make_node("GreaterOrEqual", ["index", "zero"], ["valid"]),
        helper.make_node("Max", ["index", "zero"], ["safe"]),
        helper.make_node("Gather", ["x", "safe"], ["rows"], axis=0),
        helper.make_node("Unsqueeze", ["valid", "last"], ["valid_col"]),
        helper.make_node("Sub", ["rows", "rows"], ["zeros"]),
        helper.make_node("Where", ["valid_col", "rows", "zeros"], ["y"]),
    ]
    return helper.make_function(
        _plugin.DOMAIN, _plugin.OP_TYPE, ["x", "index"], ["y"], nodes,
        [helper.make_opsetid("", 18)], attributes=list(_plugin.compact_node_attributes()),
    )


# ---- one graph ---------------------------------------------------------------------------------
_ONNX_DTYPE = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT64": "int64",
               "INT32": "int32", "BOOL": "bool"}


def _describe(values, meanings: Dict[str, str]) -> List[Dict[str, Any]]:
    out = []
    for v in values:
        dims = [d if isinstance(d, int) else str(d) for d in v.shape.dims]
        out.append({"name": v.name, "dtype": _ONNX_DTYPE.get(v.dtype.name, v.dtype.name.lower()), "shape": dims,
                    "meaning": _meaning(v.name, meanings)})
    return out


def _meaning(name: str, meanings: Dict[str, str]) -> str:
    if name in meanings:
        return meanings[name]
    for prefix, text in meanings.items():
        if prefix.endswith("*") and name.startswith(prefix[:-1]):
            return text
    return ""


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter's INFO/WARNING chatter (missing torchvision ops, deprecations) off; errors stay."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export_graph(module, args, dynamic_shapes, input_names, output_names, *, opset: int, path: Path,
                  metadata: Dict[str, str], meanings: Dict[str, str], table=None) -> Dict[str, Any]:
    t0 = time.perf_counter()
    with _quiet_exporter(), torch.no_grad():
        prog = torch.onnx.export(
            module, args, dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
            input_names=list(input_names), output_names=list(output_names), optimize=True, verbose=False,
            custom_translation_table=table,
        )
    model = prog.model
    _check_dynamic(model, args, dynamic_shapes, path.name)
    for k, v in metadata.items():
        model.metadata_props[k] = v
    model.producer_name = "adsc_ext"
    ops = sorted({n.op_type for n in model.graph.all_nodes()} if hasattr(model.graph, "all_nodes")
                 else {n.op_type for n in model.graph})
    info = {
        "file": path.name,
        "inputs": _describe(model.graph.inputs, meanings),
        "outputs": _describe(model.graph.outputs, meanings),
        "op_types": ops,
    }
    with _quiet_exporter():
        prog.save(str(path))  # weights go to <file>.data when the graph is over 2 GB
    del prog, model
    gc.collect()
    files = [p for p in path.parent.iterdir() if p.name == path.name or p.name.startswith(path.name + ".")]
    info["external_data"] = sorted(p.name for p in files if p.name != path.name)
    info["bytes"] = sum(p.stat().st_size for p in files)
    info["seconds"] = round(time.perf_counter() - t0, 2)
    return info


def _flat_dims(dynamic_shapes) -> List[Dict[int, str]]:
    """``{axis: Dim name}`` per tensor input, in the flattened order of the graph inputs."""
    out: List[Dict[int, str]] = []

    def walk(d):
        if d is None or isinstance(d, dict):
            out.append({ax: dim.__name__ for ax, dim in (d or {}).items()})
        else:
            for x in d:
                walk(x)

    walk(tuple(dynamic_shapes))
    return out


def _check_dynamic(model, args, dynamic_shapes, file: str) -> None:
    """Every dim asked to be dynamic is a named dim of the graph (the exporter falls back to a
    static export when tracing specialises one; that graph would fail on other shapes)."""
    for value, dims in zip(model.graph.inputs, _flat_dims(dynamic_shapes)):
        for ax, name in dims.items():
            got = value.shape.dims[ax]
            if isinstance(got, int) or str(got) != name:
                raise ExportError(f"{file}: input {value.name} dim {ax} should be the dynamic dim {name!r} but "
                                  f"the exporter made it {got!r}: the model's code fixes that size at export time")


# ---- the export --------------------------------------------------------------------------------
def _versions() -> Dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("adsc_ext", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def prepare_folder(out_dir: Path, force: bool) -> None:
    """Refuse an output folder that holds something, unless ``force``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise ExportError(f"{out_dir} already exists and is not empty; choose another folder or pass force=True "
                          f"(--force) to overwrite the export in it")


def _install(tmp: Path, out_dir: Path) -> None:
    """Move a finished export into ``out_dir``; with ``--force``, the earlier export's files go first
    (other files in the folder are left alone). The manifest moves last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ours = set(GRAPH_FILES.values()) | {"adsc_manifest.json"}
    for p in out_dir.iterdir():
        if p.name in ours or any(p.name.startswith(f + ".") for f in GRAPH_FILES.values()):
            p.unlink()
    names = sorted(p.name for p in tmp.iterdir())
    names.sort(key=lambda n: n == "adsc_manifest.json")
    for n in names:
        shutil.move(str(tmp / n), str(out_dir / n))


def export_onnx(model, out_dir, schedule=None, *, dtype=None, opset: int = DEFAULT_OPSET,
                compaction: str = "onnx", force: bool = False,
                progress: Optional[Callable[[str], None]] = _stderr, source: Optional[str] = None) -> Dict[str, Any]:
    """Export ``model`` (a ``transformers.LlavaForConditionalGeneration``) with ``schedule`` baked in.

    Args:
        out_dir: the folder to write (created; an existing non-empty one is refused unless ``force``).
        schedule: schedule text / :class:`~adsc_ext.Schedule`; None: ``config.adsc_schedule``, else the
            LLaVA-1.5 default; ``""`` exports the unmodified model.
        dtype: float32 / float16 / bfloat16 (or "fp32", "fp16", "bf16"); None keeps the model's.
            A different dtype is exported from a converted copy (the model is not changed).
        opset: ONNX opset, >= 18; the ``Attention`` op needs >= 23 (the default), below it attention
            is MatMul/Softmax.
        compaction: ``"onnx"`` (standard ops: Gather + Where, padding slots give zero rows) or
            ``"plugin"`` (one ``AdscCompactTokens`` node per compaction, for the TensorRT plugin).
        progress: called with one line per written graph (None: silent).
        source: what the model is (a path...), recorded in the manifest.

    Returns the manifest (also written to ``out_dir/adsc_manifest.json``).
    Raises :class:`~adsc_ext.models.AdscModelError` for a model ADSC does not support,
    :class:`~adsc_ext.ScheduleError` for a schedule that does not fit it, :class:`ExportError` for
    bad arguments or an existing folder.
    """
    require_onnx()
    from ..models.llava import llava_spec, resolve_schedule, unwrap
    from .onnx_graphs import DecodeGraph, EmbedGraph, PrefillGraph, VisionGraph

    if compaction not in COMPACTIONS:
        raise ExportError(f"compaction must be one of {', '.join(COMPACTIONS)}, got {compaction!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    model = unwrap(model)
    spec = llava_spec(model)
    sched, stages = resolve_schedule(model.config, schedule, spec.num_layers, spec.grid)
    want = _resolve_dtype(dtype)
    have = next(model.parameters()).dtype
    out_dir = Path(out_dir)
    prepare_folder(out_dir, force)
    if want is not None and want != have:
        model = copy.deepcopy(model).to(want)
    dt = want or have
    dname = _dtype_name(dt)
    if compaction == "plugin":
        from .. import ops  # noqa: F401  (registers torch.ops.adsc.compact_tokens and its fake kernel)
    model.eval()

    L, n_st = spec.num_layers, len(stages)
    B, D, hd, kvh = 2, spec.hidden_size, spec.head_dim, spec.num_kv_heads
    stage_of = [sched.stage_of_layer(l) for l in range(L)]
    batch = torch.export.Dim("batch", min=1)
    seq = [torch.export.Dim(stage_dim(s), min=1) for s in range(n_st)]
    past = [torch.export.Dim(past_dim(s), min=1) for s in range(n_st)]
    kv_names = lambda pre: [f"{pre}.{l}.{w}" for l in range(L) for w in ("key", "value")]  # noqa: E731
    metadata = {"adsc_schedule": str(sched), "adsc_grid": f"{spec.grid[0]}x{spec.grid[1]}",
                "adsc_image_token_id": str(spec.image_token_id), "adsc_format": f"{FORMAT}/{FORMAT_VERSION}",
                "adsc_dtype": dname}
    lens = [2 * n_st + 8 - s for s in range(n_st)]  # example lengths: >= 2 and distinct, so none specialises
    kv_meaning = {f"present.*": "this layer's K (or V), [batch, num_kv_heads, its stage's length, head_dim]"}

    jobs: List[Tuple[str, Any, tuple, Any, List[str], List[str], Dict[str, str], Any]] = []
    side = spec.image_size
    jobs.append(("vision", VisionGraph(model, spec), (torch.zeros(2, 3, side, side, dtype=dt),),
                 ({0: torch.export.Dim("num_images", min=1)},), ["pixel_values"], ["image_features"],
                 {"pixel_values": f"preprocessed images [num_images, 3, {side}, {side}]",
                  "image_features": f"projected features, {spec.tokens_per_image} rows (the {spec.grid[0]}x"
                                    f"{spec.grid[1]} grid, raster order) per image"}, None))
    jobs.append(("embed", EmbedGraph(model), (torch.zeros(B, 3, dtype=torch.long),),
                 ({0: batch, 1: torch.export.Dim("seq", min=1)},), ["input_ids"], ["inputs_embeds"],
                 {"input_ids": "token ids [batch, seq] (prefill prompt or one decode token per row)",
                  "inputs_embeds": "token embeddings; the host scatters image_features into the image-token rows"},
                 None))
    idx_in = [f"adsc_index.{s}" for s in range(1, n_st)]
    pre_args = (torch.zeros(B, lens[0], D, dtype=dt), torch.ones(B, lens[0], dtype=torch.long),
                torch.arange(lens[0]).expand(B, -1).contiguous(),
                *(torch.zeros(B, lens[s], dtype=torch.int32) for s in range(1, n_st)))
    pre_dyn = ({0: batch, 1: seq[0]}, {0: batch, 1: seq[0]}, {0: batch, 1: seq[0]})
    if n_st > 1:  # the *index varargs (none for the empty schedule)
        pre_dyn += (tuple({0: batch, 1: seq[s]} for s in range(1, n_st)),)
    jobs.append(("prefill", PrefillGraph(model, spec, sched, stages, plugin=compaction == "plugin"), pre_args, pre_dyn,
                 ["inputs_embeds", "attention_mask", "position_ids", *idx_in], ["logits", *kv_names("present")],
                 {"inputs_embeds": "left-padded prompt embeddings with image features scattered in [batch, seq_stage0, hidden]",
                  "attention_mask": "1 for real tokens, 0 for left padding [batch, seq_stage0]",
                  "position_ids": "stage_plan(...).stages[0].position_ids (padding: 1)",
                  "adsc_index.*": "stage_plan(...).stages[s].index, int32 [batch, seq_stage<s>]: flat row of the previous "
                                  "stage's [batch * seq] layout per slot, -1 for padding",
                  "logits": "float32 [batch, vocab]: scores of each row's last prompt token", **kv_meaning},
                 _plugin_translation() if compaction == "plugin" else None))
    pm_in = [f"past_mask.{s}" for s in range(n_st)]
    dec_args = (torch.zeros(B, 1, D, dtype=dt), torch.full((B, 1), lens[0], dtype=torch.long),
                *(torch.ones(B, lens[s], dtype=torch.long) for s in range(n_st)),
                *(torch.zeros(B, kvh, lens[stage_of[l]], hd, dtype=dt) for l in range(L) for _ in range(2)))
    dec_dyn = ({0: batch}, {0: batch},
               (*({0: batch, 1: past[s]} for s in range(n_st)),
                *({0: batch, 2: past[stage_of[l]]} for l in range(L) for _ in range(2))))
    jobs.append(("decode", DecodeGraph(model, spec, sched, stages), dec_args, dec_dyn,
                 ["inputs_embeds", "position_ids", *pm_in, *kv_names("past_key_values")], ["logits", *kv_names("present")],
                 {"inputs_embeds": "embedding of each row's new token [batch, 1, hidden]",
                  "position_ids": "position of the new token [batch, 1]: prompt length + tokens generated before it",
                  "past_mask.*": "int64 [batch, past_seq_stage<s>]: 1 for cached real tokens, 0 for padding slots",
                  "past_key_values.*": "cached K (or V) of this layer [batch, num_kv_heads, past_seq_stage<its stage>, head_dim]",
                  "logits": "float32 [batch, vocab]: scores of the next token",
                  "present.*": "this layer's K (or V) grown by the new token [batch, num_kv_heads, past + 1, head_dim]"},
                 None))

    graphs: Dict[str, Any] = {}
    t_all = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        for name, module, args, dyn, ins, outs, meanings, table in jobs:
            info = _export_graph(module, args, dyn, ins, outs, opset=opset, path=tmp / GRAPH_FILES[name],
                                 metadata={**metadata, "adsc_graph": name}, meanings=meanings, table=table)
            graphs[name] = info
            if progress is not None:
                progress(f"adsc export: {info['file']:<12} {info['bytes'] / 2**20:9.1f} MiB  {info['seconds']:7.1f} s"
                         f"  ({len(info['inputs'])} inputs, {len(info['outputs'])} outputs)")
        has_attention = "Attention" in graphs["prefill"]["op_types"]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "schedule": str(sched),
            "grid": list(spec.grid),
            "image_token_id": spec.image_token_id,
            "tokens_per_image": spec.tokens_per_image,
            "image_size": spec.image_size,
            "stages": [{"stage": st.stage, "first_layer": st.first_layer, "end_layer": st.end_layer,
                        "grid": list(st.grid), "tokens_per_image": st.tokens_per_image,
                        "prefill_dim": stage_dim(st.stage), "decode_dim": past_dim(st.stage)} for st in stages],
            "stage_of_layer": stage_of,
            "model": {"num_layers": L, "hidden_size": D, "num_heads": spec.num_heads, "num_kv_heads": kvh,
                      "head_dim": hd, "vocab_size": spec.vocab_size, "max_positions": spec.max_positions,
                      "rms_norm_eps": spec.rms_norm_eps, "scaling": spec.scaling,
                      "source": source or type(model).__name__},
            "dtype": dname,
            "opset": opset,
            "attention": "onnx.Attention" if has_attention else "MatMul/Softmax",
            "compaction": compaction,
            "padding_side": "left",
            "exporter": "torch.onnx.export(dynamo=True)",
            "versions": _versions(),
            "export_seconds": round(time.perf_counter() - t_all, 2),
            # the example shapes the graphs were traced with (every one of them is a dynamic dim)
            "traced_with": {"batch": B, "num_images": 2, "seq_stage": lens, "past_seq_stage": lens},
            "graphs": graphs,
        }
        if compaction == "plugin":
            manifest["plugin"] = {"op_type": _plugin.OP_TYPE, "domain": _plugin.DOMAIN,
                                  "domain_version": _plugin.DOMAIN_VERSION, "plugin_name": _plugin.PLUGIN_NAME,
                                  "plugin_version": _plugin.PLUGIN_VERSION,
                                  "plugin_namespace": _plugin.PLUGIN_NAMESPACE, "library": _plugin.PLUGIN_LIBRARY}
        write_manifest(tmp, manifest)
        _install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
