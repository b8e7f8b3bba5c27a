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
import functools
import gc
import logging
import platform
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import _plugin
from .manifest import (FORMAT, FORMAT_VERSION, GRAPH_FILES, ONNX_DTYPES, ExportError, check_graph, graph_io,
                       graph_metadata, load_manifest, past_dim, stage_dim, write_manifest)

__all__ = ["export_onnx", "DEFAULT_OPSET", "ATTENTION_OPSET", "COMPACTIONS", "plugin_reference_function",
           "require_onnx", "check_opset"]

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
        raise ImportError(f"ONNX export needs onnx, onnxscript and onnxruntime (pip install onnx onnxscript onnxruntime; adsc_ext's [export] extra): {exc}") from None
    return onnx


@functools.lru_cache(maxsize=None)
def _declared_opset(opset: int) -> Optional[int]:
    """The default-domain opset ``torch.onnx.export(dynamo=True)`` declares when asked for ``opset``,
    on a one-op graph that lowers to ``Attention`` from opset 23 (a probe of about a second, once per
    opset and process). The exporter writes its graphs at its own opset (18) and converts them; past
    the converter's range it keeps 18 silently, with the newer ops already in the graph."""
    class _Probe(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)

    with _quiet_exporter(), torch.no_grad():
        prog = torch.onnx.export(_Probe(), (torch.zeros(1, 2, 3, 4),), dynamo=True, opset_version=opset,
                                 optimize=False, verbose=False)
    return dict(prog.model.opset_imports).get("")


def check_opset(opset) -> None:
    """Refuse an opset this exporter cannot write (:class:`ExportError`), before anything is exported:
    below :data:`MIN_OPSET`, above what the installed onnx knows, or one the exporter would not
    declare (:func:`_declared_opset`)."""
    import onnx

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"opset must be an int >= {MIN_OPSET}, got {opset!r}")
    known = onnx.defs.onnx_opset_version()
    if opset > known:
        raise ExportError(f"opset {opset}: the installed onnx {onnx.__version__} knows opsets up to {known}")
    try:
        got = _declared_opset(opset)
    except Exception as exc:  # the exporter's errors share no base class; name it and stop here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"opset {opset}: torch.onnx.export fails for it ({type(exc).__name__}: {first})") from None
    if got != opset:
        best = next((o for o in range(opset - 1, MIN_OPSET - 1, -1) if _declared_opset(o) == o), MIN_OPSET)
        raise ExportError(f"opset {opset}: this exporter (torch {torch.__version__}, onnxscript "
                          f"{_versions().get('onnxscript', '?')}) cannot write it (asked for opset {opset}, it "
                          f"declares opset {got}); the highest opset it writes is {best} (the default is "
                          f"{DEFAULT_OPSET})")


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
    require_onnx()
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
def _describe(values, meanings: Dict[str, str]) -> List[Dict[str, Any]]:
    out = []
    for v in values:
        dims = [d if isinstance(d, int) else str(d) for d in v.shape.dims]
        out.append({"name": v.name, "dtype": ONNX_DTYPES.get(v.dtype.name, v.dtype.name.lower()), "shape": dims,
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
    declared = dict(model.opset_imports).get("")
    if declared != opset:  # check_opset probed it; a graph that still differs is not written
        raise ExportError(f"{path.name}: the exporter declares opset {declared} for a graph asked for opset {opset}: "
                          f"it cannot write opset {opset}")
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
    """Export ``model`` (LLaVA-1.5 or Qwen2.5-VL, ``transformers``' classes) with ``schedule`` baked in.

    Args:
        out_dir: the folder to write (created; an existing non-empty one is refused unless ``force``).
        schedule: schedule text / :class:`~adsc_ext.Schedule`; None: ``config.adsc_schedule``, else the
            architecture's default (spec section 2); ``""`` exports the unmodified model.
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
    from ..layout import StageMap
    from ..models.base import model_spec, unwrap
    from .manifest import ARCHITECTURES
    from .onnx_graphs import DecodeGraph, EmbedGraph, PrefillGraph, QwenVisionGraph, VisionGraph

    if compaction not in COMPACTIONS:
        raise ExportError(f"compaction must be one of {', '.join(COMPACTIONS)}, got {compaction!r}")
    check_opset(opset)
    model = unwrap(model)
    spec = model_spec(model)
    spec.check_runtime("the ONNX export")
    if spec.name not in ARCHITECTURES:
        raise ExportError(f"the ONNX export supports {', '.join(ARCHITECTURES)}; {spec.name}'s vision tower has no "
                          f"exported graph")
    sched, stages = spec.resolve_schedule(schedule, model.config)
    want = _resolve_dtype(dtype)
    have = next(model.parameters()).dtype
    out_dir = Path(out_dir)
    prepare_folder(out_dir, force)
    if want is not None and want != have:
        model = copy.deepcopy(model).to(want)
        spec = model_spec(model)  # the copy's spec: the graphs run its modules
    dt = want or have
    dname = _dtype_name(dt)
    if compaction == "plugin":
        from .. import ops  # noqa: F401  (registers torch.ops.adsc.compact_tokens and its fake kernel)
    model.eval()

    L, n_st = spec.num_layers, len(stages)
    B, D, hd, kvh = 2, spec.hidden_size, spec.head_dim, spec.num_kv_heads
    arch = spec.name
    stage_of = list(StageMap(sched, L).stage_of_layer)
    batch = torch.export.Dim("batch", min=1)
    seq = [torch.export.Dim(stage_dim(s), min=1) for s in range(n_st)]
    past = [torch.export.Dim(past_dim(s), min=1) for s in range(n_st)]
    io_names = graph_io(L, n_st, arch)
    grid = spec.schedule_grid()
    facts = {"export_id": uuid.uuid4().hex, "architecture": arch, "schedule": str(sched),
             "grid": None if grid is None else list(grid), "image_token_id": spec.image_token_id,
             "dtype": dname}  # every graph carries them (graph_metadata)
    lens = [2 * n_st + 8 - s for s in range(n_st)]  # example lengths: >= 2 and distinct, so none specialises
    kv_meaning = {"present.*": "this layer's K (or V), [batch, num_kv_heads, its stage's length, head_dim]"}
    lead = tuple(spec.position_lead)  # a position's leading components (M-RoPE: text, T, H, W)
    npl = len(lead)
    pos_text = ("[4, batch, seq]: the text index, then the temporal, height and width M-RoPE ids" if npl
                else "[batch, seq]")

    jobs: List[Tuple[str, Any, tuple, Any, List[str], List[str], Dict[str, str], Any]] = []
    if arch == "qwen2.5-vl":
        n_patch = 2 * 4 * spec.spatial_merge_size ** 2  # example: two windows' worth of merge units
        patches = torch.export.Dim("num_patches", min=2)
        jobs.append(("vision", QwenVisionGraph(model, spec),
                     (torch.zeros(n_patch, spec.patch_dim, dtype=dt), torch.zeros(n_patch, 2, dtype=torch.long),
                      torch.zeros(n_patch, dtype=torch.long), torch.arange(n_patch) // 4),
                     ({0: patches}, {0: patches}, {0: patches}, {0: patches}), *io_names["vision"],
                     {"pixel_values": f"the processor's patches [num_patches, {spec.patch_dim}] of every image (or "
                                      f"video) in window order (QwenVLSpec.vision_layout(grid_thw)['order'])",
                      "position_ids": "int64 [num_patches, 2]: each patch's (row, column) rotary ids, window order",
                      "full_segments": "int64 [num_patches]: the item and temporal patch of each patch (attention "
                                       f"blocks of the full-attention layers {list(spec.fullatt_blocks)})",
                      "window_segments": "int64 [num_patches]: the attention window of each patch (the other layers)",
                      "image_features": f"merged features [num_patches / {spec.spatial_merge_size ** 2}, hidden] in "
                                        f"window order (vision_layout(...)['restore'] puts them in raster order)"},
                     None))
    else:
        side = spec.image_size
        jobs.append(("vision", VisionGraph(model, spec), (torch.zeros(2, 3, side, side, dtype=dt),),
                     ({0: torch.export.Dim("num_images", min=1)},), *io_names["vision"],
                     {"pixel_values": f"preprocessed images [num_images, 3, {side}, {side}]",
                      "image_features": f"projected features, {spec.tokens_per_image} rows (the {spec.grid[0]}x"
                                        f"{spec.grid[1]} grid, raster order) per image"}, None))
    jobs.append(("embed", EmbedGraph(model), (torch.zeros(B, 3, dtype=torch.long),),
                 ({0: batch, 1: torch.export.Dim("seq", min=1)},), *io_names["embed"],
                 {"input_ids": "token ids [batch, seq] (prefill prompt or one decode token per row)",
                  "inputs_embeds": "token embeddings; the host scatters image_features into the image-token rows"},
                 None))
    pre_args = (torch.zeros(B, lens[0], D, dtype=dt), torch.ones(B, lens[0], dtype=torch.long),
                torch.arange(lens[0]).expand(*lead, B, -1).contiguous(),
                *(torch.zeros(B, lens[s], dtype=torch.int32) for s in range(1, n_st)))
    pre_dyn = ({0: batch, 1: seq[0]}, {0: batch, 1: seq[0]}, {npl: batch, npl + 1: seq[0]})
    if n_st > 1:  # the *index varargs (none for the empty schedule)
        pre_dyn += (tuple({0: batch, 1: seq[s]} for s in range(1, n_st)),)
    jobs.append(("prefill", PrefillGraph(model, spec, sched, stages, plugin=compaction == "plugin"), pre_args, pre_dyn,
                 *io_names["prefill"],
                 {"inputs_embeds": "left-padded prompt embeddings with image features scattered in [batch, seq_stage0, hidden]",
                  "attention_mask": "1 for real tokens, 0 for left padding [batch, seq_stage0]",
                  "position_ids": f"the model spec's stage-0 positions {pos_text} (padding: 1)",
                  "adsc_index.*": "stage_plan(...).stages[s].index, int32 [batch, seq_stage<s>]: flat row of the previous "
                                  "stage's [batch * seq] layout per slot, -1 for padding",
                  "logits": "float32 [batch, vocab]: scores of each row's last prompt token", **kv_meaning},
                 _plugin_translation() if compaction == "plugin" else None))
    dec_args = (torch.zeros(B, 1, D, dtype=dt), torch.full((*lead, B, 1), lens[0], dtype=torch.long),
                *(torch.ones(B, lens[s], dtype=torch.long) for s in range(n_st)),
                *(torch.zeros(B, kvh, lens[stage_of[l]], hd, dtype=dt) for l in range(L) for _ in range(2)))
    dec_dyn = ({0: batch}, {npl: batch},
               (*({0: batch, 1: past[s]} for s in range(n_st)),
                *({0: batch, 2: past[stage_of[l]]} for l in range(L) for _ in range(2))))
    jobs.append(("decode", DecodeGraph(model, spec, sched, stages), dec_args, dec_dyn,
                 *io_names["decode"],
                 {"inputs_embeds": "embedding of each row's new token [batch, 1, hidden]",
                  "position_ids": f"position of the new token ({pos_text} with seq 1): the row's next position after "
                                  f"its prompt (prompt length; M-RoPE: + the row's rope delta) + tokens generated before it",
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
                                 metadata=graph_metadata(facts, name), meanings=meanings, table=table)
            graphs[name] = info
            if progress is not None:
                progress(f"adsc export: {info['file']:<12} {info['bytes'] / 2**20:9.1f} MiB  {info['seconds']:7.1f} s"
                         f"  ({len(info['inputs'])} inputs, {len(info['outputs'])} outputs)")
        has_attention = "Attention" in graphs["prefill"]["op_types"]
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "export_id": facts["export_id"],
            "architecture": arch,
            "schedule": str(sched),
            "image_token_id": spec.image_token_id,
            "stages": [{"stage": st.stage, "first_layer": st.first_layer, "end_layer": st.end_layer,
                        **({"grid": list(st.grid), "tokens_per_image": st.tokens_per_image} if grid else {}),
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
        if grid is not None:  # one image grid (LLaVA-1.5)
            manifest.update(grid=list(grid), tokens_per_image=spec.tokens_per_image, image_size=spec.image_size)
        else:
            manifest.update(spec.manifest_facts())
        if compaction == "plugin":
            manifest["plugin"] = {"op_type": _plugin.OP_TYPE, "domain": _plugin.DOMAIN,
                                  "domain_version": _plugin.DOMAIN_VERSION, "plugin_name": _plugin.PLUGIN_NAME,
                                  "plugin_version": _plugin.PLUGIN_VERSION,
                                  "plugin_namespace": _plugin.PLUGIN_NAMESPACE, "library": _plugin.PLUGIN_LIBRARY}
        write_manifest(tmp, manifest)
        load_manifest(tmp)  # what the runners will check, checked before the folder is installed
        for name in GRAPH_FILES:
            check_graph(tmp, name, manifest)
        _install(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return manifest
