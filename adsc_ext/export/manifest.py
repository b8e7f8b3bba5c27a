"""``adsc_manifest.json``: what an exported folder holds and how its graphs are fed.

The exporter writes it last (a folder without it is not a finished export); the runner and the
TensorRT build read it. It records the export's id, the architecture (:data:`ARCHITECTURES`), the
schedule, the image token id, model dims, dtype, opset, the attention and compaction lowering,
the versions used, and every graph's inputs and outputs with their dims and meaning (taken from
the saved graphs themselves); then the architecture's own facts: LLaVA-1.5's one image ``grid``,
``tokens_per_image`` and ``image_size``; Qwen2.5-VL's ``vision`` geometry (patch, temporal patch,
merge, window, full-attention blocks, channels, tokens per second) and ``tokens`` (video, vision
start and end ids), whose images each have their own grid.

Every graph carries the export's id and its facts (schedule, grid, image token id, dtype, graph
name) in its ``metadata_props``. :func:`load_manifest` checks every manifest field's type and value
(and that the fields agree with each other); :func:`check_graph` checks one graph against the
manifest: its metadata, its declared opset, its input and output names (:func:`graph_io`: the
layer and stage counts), element types (the dtype) and fixed dims (hidden size, vocabulary, KV
heads, head dim, image size). A folder that fails any of them raises one :class:`ExportError`
naming the file and the field, before any session is made.
"""

from __future__ import annotations

import json
import numbers
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..errors import ExportError

__all__ = ["MANIFEST_NAME", "FORMAT", "FORMAT_VERSION", "GRAPH_FILES", "ARCHITECTURES", "ExportError", "load_manifest",
           "write_manifest", "stage_dim", "past_dim", "graph_io", "graph_metadata", "check_graph", "spec_of", "DTYPES"]

MANIFEST_NAME = "adsc_manifest.json"
FORMAT = "adsc-llava-onnx"
#: 2: the export id (manifest ``export_id``, every graph's ``adsc_export_id``);
#: 3: the ``architecture`` field (every graph's ``adsc_architecture``) and Qwen2.5-VL folders
FORMAT_VERSION = 3
#: the architectures an export folder may hold (the model spec's name)
ARCHITECTURES = ("llava-1.5", "qwen2.5-vl")
#: graph name -> file, in the order they are exported and run
GRAPH_FILES = {"vision": "vision.onnx", "embed": "embed.onnx", "prefill": "prefill.onnx", "decode": "decode.onnx"}
#: keys every manifest has (checked on load)
REQUIRED = ("format", "format_version", "export_id", "architecture", "schedule", "image_token_id", "stages",
            "stage_of_layer", "model", "dtype", "opset", "attention", "compaction", "padding_side", "versions",
            "graphs")
#: keys of each architecture's own
ARCH_REQUIRED = {"llava-1.5": ("grid", "tokens_per_image", "image_size"), "qwen2.5-vl": ("vision", "tokens")}
_QWEN_VISION_INTS = ("patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels", "window_size")
_QWEN_TOKENS = ("video_token_id", "vision_start_token_id", "vision_end_token_id")
#: the dtypes an export is made in
DTYPES = ("float32", "float16", "bfloat16")
#: ONNX element type names -> the manifest's dtype names
ONNX_DTYPES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "INT64": "int64",
               "INT32": "int32", "BOOL": "bool"}
_MODEL_INTS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "max_positions")


def stage_dim(stage: int) -> str:
    """The prefill dim name of a stage's sequence length (all its layers' K/V share it)."""
    return f"seq_stage{stage}"


def past_dim(stage: int) -> str:
    """The decode dim name of a stage's cached length (``past_key_values.{layer}.*`` dim 2)."""
    return f"past_seq_stage{stage}"


def graph_io(num_layers: int, num_stages: int, architecture: str = "llava-1.5") -> Dict[str, Tuple[List[str], List[str]]]:
    """``{graph: (input names, output names)}`` of an export with these layer and stage counts: the
    names the exporter gives the graphs and the runners feed."""
    kv = lambda pre: [f"{pre}.{l}.{w}" for l in range(num_layers) for w in ("key", "value")]  # noqa: E731
    vision = (["pixel_values", "position_ids", "full_segments", "window_segments"] if architecture == "qwen2.5-vl"
              else ["pixel_values"])
    return {
        "vision": (vision, ["image_features"]),
        "embed": (["input_ids"], ["inputs_embeds"]),
        "prefill": (["inputs_embeds", "attention_mask", "position_ids",
                     *(f"adsc_index.{s}" for s in range(1, num_stages))], ["logits", *kv("present")]),
        "decode": (["inputs_embeds", "position_ids", *(f"past_mask.{s}" for s in range(num_stages)),
                    *kv("past_key_values")], ["logits", *kv("present")]),
    }


def graph_metadata(manifest: Dict[str, Any], graph: str) -> Dict[str, str]:
    """The ``metadata_props`` every graph of the export carries (what :func:`check_graph` compares)."""
    grid = manifest.get("grid")
    return {"adsc_export_id": manifest["export_id"], "adsc_graph": graph,
            "adsc_architecture": manifest["architecture"], "adsc_schedule": manifest["schedule"],
            "adsc_grid": f"{grid[0]}x{grid[1]}" if grid else "per image",
            "adsc_image_token_id": str(manifest["image_token_id"]),
            "adsc_dtype": manifest["dtype"], "adsc_format": f"{FORMAT}/{FORMAT_VERSION}"}


#: metadata key -> the manifest field it is compared with (for messages)
_META_FIELD = {"adsc_graph": "graph name", "adsc_export_id": "export_id", "adsc_architecture": "architecture",
               "adsc_schedule": "schedule", "adsc_grid": "grid", "adsc_image_token_id": "image_token_id",
               "adsc_dtype": "dtype", "adsc_format": "format_version"}


def spec_of(manifest: Dict[str, Any]):
    """The model spec of a (loaded) manifest's architecture, from its facts (no model)."""
    if manifest["architecture"] == "qwen2.5-vl":
        from ..models.qwen_vl import QwenVLSpec

        return QwenVLSpec.from_manifest(manifest)
    from ..models.llava import LlavaSpec

    return LlavaSpec.from_manifest(manifest)


def write_manifest(folder: Path, manifest: Dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load_manifest(folder, schedule: Optional[str] = None) -> Dict[str, Any]:
    """Read and check a folder's manifest. ``schedule``: the schedule the caller expects (text);
    a folder exported with another one is refused. Raises :class:`ExportError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ExportError(f"{folder}: no such export folder")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{folder} has no {MANIFEST_NAME}: not an adsc export folder (or an unfinished export)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: not a readable JSON manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not an adsc export manifest (format {manifest.get('format')!r}, "
                          f"expected {FORMAT!r})" if isinstance(manifest, dict) else f"{path}: not a JSON object")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(f"{path}: manifest format version {manifest.get('format_version')!r}; this adsc_ext "
                          f"reads version {FORMAT_VERSION}: re-export the model")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ExportError(f"{path}: incomplete manifest, missing {', '.join(missing)}")
    if manifest["architecture"] not in ARCHITECTURES:
        raise ExportError(f"{path}: manifest field 'architecture' must be one of {', '.join(ARCHITECTURES)}, got "
                          f"{manifest['architecture']!r}")
    missing = [k for k in ARCH_REQUIRED[manifest["architecture"]] if k not in manifest]
    if missing:
        raise ExportError(f"{path}: incomplete {manifest['architecture']} manifest, missing {', '.join(missing)}")
    _validate(manifest, path)
    if schedule is not None and str(schedule) != manifest["schedule"]:
        raise ExportError(f"{folder} was exported with schedule '{manifest['schedule']}', not '{schedule}'")
    for file in GRAPH_FILES.values():
        if not (folder / file).is_file():
            raise ExportError(f"{folder}: {file} is missing (the manifest lists it)")
    return manifest


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= lo


def _validate(man: Dict[str, Any], path: Path) -> None:
    """Every field the runners read, of the right type and value, and agreeing with each other."""
    from ..schedule import Schedule, ScheduleError

    def bad(field: str, expected: str, got: Any = None, show: bool = True):
        raise ExportError(f"{path}: manifest field '{field}' must be {expected}"
                          + (f", got {got!r}" if show else ""))

    if not isinstance(man["export_id"], str) or not re.fullmatch(r"[0-9a-f]{32}", man["export_id"]):
        bad("export_id", "32 hex digits (a uuid4)", man["export_id"])
    if not isinstance(man["schedule"], str):
        bad("schedule", "a schedule text ('layer:factor,...')", man["schedule"])
    try:
        sched = Schedule.parse(man["schedule"])
    except ScheduleError as exc:
        raise ExportError(f"{path}: manifest field 'schedule': {exc}") from None
    model = man["model"]
    if not isinstance(model, dict):
        bad("model", "an object with the model's dims", model)
    for k in _MODEL_INTS:
        if not _is_int(model.get(k), 1):
            bad(f"model.{k}", "a positive int", model.get(k))
    if not _is_int(man["image_token_id"]) or man["image_token_id"] >= model["vocab_size"]:
        bad("image_token_id", f"an int in [0, model.vocab_size = {model['vocab_size']})", man["image_token_id"])
    L = model["num_layers"]
    if man["architecture"] == "llava-1.5":
        grid = man["grid"]
        if not (isinstance(grid, list) and len(grid) == 2 and all(_is_int(v, 1) for v in grid)):
            bad("grid", "[height, width] of positive ints", grid)
        if man["tokens_per_image"] != grid[0] * grid[1] or not _is_int(man["tokens_per_image"], 1):
            bad("tokens_per_image", f"grid[0] * grid[1] = {grid[0] * grid[1]}", man["tokens_per_image"])
        if not _is_int(man["image_size"], 1):
            bad("image_size", "a positive int (the vision tower's input side in pixels)", man["image_size"])
        try:
            infos = sched.validate(L, tuple(grid))
        except ScheduleError as exc:
            raise ExportError(f"{path}: manifest fields 'schedule', 'grid' and 'model.num_layers' disagree: {exc}") from None
        want_stages = [{"stage": st.stage, "first_layer": st.first_layer, "end_layer": st.end_layer,
                        "grid": list(st.grid), "tokens_per_image": st.tokens_per_image} for st in infos]
        what = f"a {grid[0]}x{grid[1]} grid and {L} layers"
    else:
        vision, tokens = man["vision"], man["tokens"]
        if not isinstance(vision, dict) or any(not _is_int(vision.get(k)) for k in _QWEN_VISION_INTS):
            bad("vision", f"an object of ints {', '.join(_QWEN_VISION_INTS)}", vision)
        if not isinstance(vision.get("fullatt_blocks"), list) or not all(_is_int(b) for b in vision["fullatt_blocks"]):
            bad("vision.fullatt_blocks", "a list of ints", vision.get("fullatt_blocks"))
        if not isinstance(vision.get("tokens_per_second"), (int, float)) or isinstance(vision.get("tokens_per_second"), bool):
            bad("vision.tokens_per_second", "a number", vision.get("tokens_per_second"))
        if not isinstance(vision.get("whole_video_seconds", False), bool):
            bad("vision.whole_video_seconds", "a bool", vision.get("whole_video_seconds"))
        if not isinstance(tokens, dict) or any(not _is_int(tokens.get(k)) or tokens[k] >= model["vocab_size"]
                                               for k in _QWEN_TOKENS):
            bad("tokens", f"an object of token ids in [0, model.vocab_size) {', '.join(_QWEN_TOKENS)}", tokens)
        try:
            infos = sched.validate(L)
        except ScheduleError as exc:
            raise ExportError(f"{path}: manifest fields 'schedule' and 'model.num_layers' disagree: {exc}") from None
        want_stages = [{"stage": st.stage, "first_layer": st.first_layer, "end_layer": st.end_layer} for st in infos]
        what = f"{L} layers"
    stages = man["stages"]
    if (not isinstance(stages, list) or len(stages) != len(want_stages)
            or any(not isinstance(g, dict) or {k: g.get(k) for k in w} != w for g, w in zip(stages, want_stages))):
        bad("stages", f"the {len(want_stages)} stages schedule '{sched}' makes of {what} ({want_stages})", show=False)
    want_of = [sched.stage_of_layer(l) for l in range(L)]
    if man["stage_of_layer"] != want_of:
        bad("stage_of_layer", f"{want_of} (schedule '{sched}', model.num_layers {L})", man["stage_of_layer"])
    if not isinstance(man["dtype"], str) or man["dtype"] not in DTYPES:
        bad("dtype", f"one of {', '.join(DTYPES)}", man["dtype"])
    if not _is_int(man["opset"], 1):
        bad("opset", "an int", man["opset"])
    if man["compaction"] not in ("onnx", "plugin"):
        bad("compaction", "'onnx' or 'plugin'", man["compaction"])
    if man["padding_side"] != "left":
        bad("padding_side", "'left' (the graphs take left-padded batches)", man["padding_side"])
    graphs = man["graphs"]
    if not isinstance(graphs, dict):
        bad("graphs", f"an object describing the graphs {', '.join(GRAPH_FILES)}", type(graphs).__name__)
    for name, file in GRAPH_FILES.items():
        g = graphs.get(name)
        if not isinstance(g, dict) or g.get("file") != file:
            bad(f"graphs.{name}", f"an object with \"file\": \"{file}\"", g)


def _dims(value) -> List[Any]:
    return [d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
            for d in value.type.tensor_type.shape.dim]


def _elem(value) -> str:
    import onnx

    et = value.type.tensor_type.elem_type
    name = onnx.TensorProto.DataType.Name(et) if et in onnx.TensorProto.DataType.values() else str(et)
    return ONNX_DTYPES.get(name, name.lower())


def check_graph(folder, name: str, manifest: Dict[str, Any]) -> None:
    """Check graph ``name`` of an export folder against its (loaded) manifest: readable, this
    export's (its id and facts in ``metadata_props``), the manifest's opset, the input and output
    names of :func:`graph_io`, the dtype's element types and the model's fixed dims. Reads the
    graph without its external weights. Raises :class:`ExportError` naming the file and field."""
    import onnx

    folder = Path(folder)
    path = folder / GRAPH_FILES[name]
    man_path = folder / MANIFEST_NAME
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError, onnx's own errors: no shared base class
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ExportError(f"{path}: not a readable ONNX graph ({type(exc).__name__}{': ' + first if first else ''}); "
                          f"the file is damaged or truncated: re-export") from None
    meta = {p.key: p.value for p in model.metadata_props}
    for key, want in graph_metadata(manifest, name).items():
        got = meta.get(key)
        if got == want:
            continue
        field = _META_FIELD[key]
        if got is None:
            raise ExportError(f"{path} carries no {field} ({key}): not a graph of an adsc export in format version "
                              f"{FORMAT_VERSION} (damaged, or from an older adsc_ext: re-export)")
        if key == "adsc_export_id":
            raise ExportError(f"{path} is from another export: its export_id is {got}, {man_path} says {want}; "
                              f"a folder's graphs must come from one export")
        raise ExportError(f"{path} is not this export's {name} graph: it carries {field} {got!r}, "
                          f"the manifest ({man_path}) says {want!r}")
    opset = {o.domain: o.version for o in model.opset_import}.get("", None)
    if opset != manifest["opset"]:
        raise ExportError(f"{path} declares opset {opset}, the manifest's field 'opset' says {manifest['opset']}")
    g = model.graph
    L, n_st = manifest["model"]["num_layers"], len(manifest["stages"])
    arch = manifest["architecture"]
    want_in, want_out = graph_io(L, n_st, arch)[name]
    for kind, values, want in (("inputs", g.input, want_in), ("outputs", g.output, want_out)):
        got = [v.name for v in values]
        if got != want:
            n_kv = sum(1 for n in got if n.startswith(("present.", "past_key_values."))) // 2
            why = (f" (K/V for {n_kv} layers: present.*/past_key_values.*, the manifest's 'model.num_layers' says {L})"
                   if n_kv != L and name in ("prefill", "decode") else
                   f" (the manifest's 'stages' has {n_st} stages, 'model.num_layers' is {L})")
            raise ExportError(f"{path}: its {kind} are {got}, not {want}{why}")
    m = manifest["model"]
    io = {v.name: v for v in (*g.input, *g.output)}
    dtype = manifest["dtype"]
    float_values = {"vision": ["pixel_values", "image_features"], "embed": ["inputs_embeds"],
                    "prefill": ["inputs_embeds", *want_out[1:]], "decode": ["inputs_embeds", *want_in[2 + n_st:],
                                                                            *want_out[1:]]}[name]
    for v in float_values:
        if _elem(io[v]) != dtype:
            raise ExportError(f"{path}: {v} is {_elem(io[v])}, the manifest's field 'dtype' says {dtype}")
    fixed = []  # (value, axis, manifest field, expected)
    if name == "vision" and arch == "qwen2.5-vl":
        v = manifest["vision"]
        fixed += [("pixel_values", 1, "vision (channels x temporal_patch_size x patch_size^2)",
                   v["in_channels"] * v["temporal_patch_size"] * v["patch_size"] ** 2),
                  ("position_ids", 1, "2 (row, column)", 2),
                  ("image_features", -1, "model.hidden_size", m["hidden_size"])]
    elif name == "vision":
        fixed += [("pixel_values", 1, "3 channels", 3), ("pixel_values", 2, "image_size", manifest["image_size"]),
                  ("pixel_values", 3, "image_size", manifest["image_size"]),
                  ("image_features", -1, "model.hidden_size", m["hidden_size"])]
    elif name == "embed":
        fixed += [("inputs_embeds", -1, "model.hidden_size", m["hidden_size"])]
    else:
        fixed += [("inputs_embeds", -1, "model.hidden_size", m["hidden_size"]),
                  ("logits", -1, "model.vocab_size", m["vocab_size"])]
        if arch == "qwen2.5-vl":
            fixed += [("position_ids", 0, "4 position rows (text, then M-RoPE)", 4)]
        for v in want_out[1:] + (want_in[2 + n_st:] if name == "decode" else []):
            fixed += [(v, 1, "model.num_kv_heads", m["num_kv_heads"]), (v, 3, "model.head_dim", m["head_dim"])]
    for v, axis, field, want in fixed:
        dims = _dims(io[v])
        got = dims[axis] if -len(dims) <= axis < len(dims) else None
        if got != want:
            raise ExportError(f"{path}: {v} has {got!r} at dim {axis}, the manifest's field '{field}' says {want}")
