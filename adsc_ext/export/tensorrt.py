"""TensorRT engines from an ``adsc export`` folder: ``adsc trt-build`` and :class:`TensorRTRunner`.

:func:`build_engines` turns every ONNX graph listed in the folder's ``adsc_manifest.json`` into a
serialized TensorRT engine beside it (``prefill.onnx`` -> ``prefill.engine``), with TensorRT's
builder and ONNX parser:

- **strongly typed** networks (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``): every tensor keeps
  the type the export gave it, so an fp16 / bf16 export builds an fp16 / bf16 engine, no precision
  flags;
- **one optimisation profile** per engine. Each dynamic dim of a graph input is named in the
  manifest, and :func:`dim_ranges` gives it a ``(min, opt, max)`` from the manifest (schedule, grid,
  stages) and the user's :class:`BuildLimits` (max batch, max prompt, max new tokens): the batch,
  the number of images, the prompt length, and **every stage's own length**, so a stage's KV cache
  is tuned and bounded by what that stage holds (text tokens + its compacted image tokens);
- the ``AdscCompactTokens`` plugin library (``libadsc_tensorrt.so``, built with
  ``cmake -DADSC_WITH_TENSORRT=ON``) loaded into TensorRT's plugin registry when a graph holds that
  node (an export with ``--plugin``); the standard-op export needs no plugin;
- a build report, ``trt_build_report.json``: TensorRT version, limits, the plugin library, and per
  engine its file, size, build time and profile.

Everything but the TensorRT calls is plain Python (:func:`read_manifest`, :func:`dim_ranges`,
:func:`profile_shapes`, :func:`find_plugin_library`, :func:`graph_uses_plugin`,
:func:`write_build_report`) and is tested without TensorRT. ``tensorrt`` is imported only inside
:func:`build_engines` and :class:`TensorRTRunner`; without it they raise
:class:`TensorRTUnavailable`, whose message says what to install.

What is read from the manifest (``adsc export`` writes it, :mod:`adsc_ext.export.manifest`):
``graphs``: graph name -> ``{"file", "inputs": [{"name", "shape", "dtype"}, ...], "op_types"}``
(``dims`` for ``shape`` and a list of graphs with a ``name`` each are accepted too); a shape holds
ints (static) and strings (dynamic dim names). ``stages``: per stage its ``tokens_per_image``,
``prefill_dim`` and ``decode_dim`` (else ``schedule`` + ``grid``, and dims classified by name, see
:func:`dim_kind`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ..errors import TensorRTBuildError, TensorRTUnavailable
from ..schedule import Schedule
from . import _plugin

__all__ = [
    "BuildLimits",
    "TensorRTUnavailable",
    "TensorRTBuildError",
    "MANIFEST_NAME",
    "REPORT_NAME",
    "INSTALL_HINT",
    "read_manifest",
    "graph_specs",
    "stage_tokens_per_image",
    "dim_kind",
    "dim_ranges",
    "profile_shapes",
    "graph_uses_plugin",
    "find_plugin_library",
    "write_build_report",
    "import_tensorrt",
    "build_engines",
]

MANIFEST_NAME = "adsc_manifest.json"
REPORT_NAME = "trt_build_report.json"
ENGINE_SUFFIX = ".engine"
PLUGIN_ENV = "ADSC_TENSORRT_PLUGIN"
INSTALL_HINT = (
    "TensorRT's Python package is not installed: install TensorRT 10 or later for your CUDA "
    "(`pip install tensorrt`, or NVIDIA's TensorRT packages) on a machine with an NVIDIA GPU, then rerun"
)

Range = Tuple[int, int, int]  # (min, opt, max)


@dataclass(frozen=True)
class BuildLimits:
    """What the engines must accept: the profile's max (and opt) values.

    ``max_prompt`` is the longest padded prompt in tokens (text + image tokens at stage 0);
    ``max_images`` the most images in one batch (default: as many as fit, ``max_batch`` x
    ``max_prompt // tokens_per_image``). The ``opt_*`` values are what TensorRT tunes for; by
    default a batch of ``max_batch`` one-image prompts with ``opt_text_tokens`` text tokens each,
    halfway through ``max_new_tokens``.
    """

    max_batch: int = 8
    max_prompt: Optional[int] = None          # default: one image + 512 text tokens
    max_new_tokens: int = 256
    max_images: Optional[int] = None
    opt_batch: Optional[int] = None
    opt_text_tokens: int = 64
    opt_images_per_prompt: int = 1

    def check(self) -> None:
        for name in ("max_batch", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise TensorRTBuildError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt", "max_images", "opt_batch"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise TensorRTBuildError(f"{name} must be >= 1, got {value}")
        if self.opt_text_tokens < 0 or self.opt_images_per_prompt < 0:
            raise TensorRTBuildError("opt_text_tokens and opt_images_per_prompt must be >= 0")
        if self.opt_batch is not None and self.opt_batch > self.max_batch:
            raise TensorRTBuildError(
                f"opt_batch {self.opt_batch} is larger than max_batch {self.max_batch}")


# ---- the manifest -----------------------------------------------------------------------------

def read_manifest(folder) -> Dict[str, Any]:
    """Read ``folder/adsc_manifest.json``; one clear error if the folder or manifest is not usable."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TensorRTBuildError(f"{folder} is not a folder (give the folder `adsc export` wrote)")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise TensorRTBuildError(
            f"{folder} has no {MANIFEST_NAME}: is it a folder written by `adsc export`?")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise TensorRTBuildError(f"{path} is not readable JSON: {exc}") from None
    if not isinstance(manifest, dict) or "graphs" not in manifest:
        raise TensorRTBuildError(f"{path} has no 'graphs' entry")
    arch = manifest.get("architecture", "llava-1.5")  # exports before manifest format 3 are LLaVA-1.5's
    if arch != "llava-1.5":
        raise TensorRTBuildError(f"{folder} holds a {arch} export; adsc trt-build builds llava-1.5 exports "
                                 f"(the TensorRT runner feeds LLaVA-1.5's graphs only)")
    graph_specs(manifest)  # validates the graph entries
    return manifest


def graph_specs(manifest: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """``{graph name: {"file", "inputs", "outputs", ...}}``, whichever form the manifest uses."""
    graphs = manifest.get("graphs")
    if isinstance(graphs, list):
        try:
            graphs = {g["name"]: g for g in graphs}
        except (TypeError, KeyError):
            raise TensorRTBuildError("every entry of the manifest's 'graphs' list needs a 'name'") from None
    if not isinstance(graphs, dict) or not graphs:
        raise TensorRTBuildError("the manifest's 'graphs' is empty or not a mapping")
    out = {}
    for name, spec in graphs.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("inputs"), list):
            raise TensorRTBuildError(f"manifest graph {name!r} has no 'inputs' list")
        spec = dict(spec)
        spec.setdefault("file", f"{name}.onnx")
        inputs = []
        for t in spec["inputs"]:
            dims = t.get("dims", t.get("shape")) if isinstance(t, dict) else None
            if "name" not in t or not isinstance(dims, list):
                raise TensorRTBuildError(
                    f"manifest graph {name!r}: every input needs 'name' and 'shape' (or 'dims')")
            inputs.append(dict(t, dims=dims))
        spec["inputs"] = inputs
        out[name] = spec
    return out


def _manifest_value(manifest: Dict[str, Any], key: str):
    if key in manifest:
        return manifest[key]
    for section in ("model", "dims_of_model", "config"):
        sub = manifest.get(section)
        if isinstance(sub, dict) and key in sub:
            return sub[key]
    return None


def stage_tokens_per_image(manifest: Dict[str, Any]) -> List[int]:
    """Vision tokens per image at each stage (stage 0 first), from the manifest's schedule and grid."""
    stages = manifest.get("stages")
    if isinstance(stages, list) and stages and all(
            isinstance(st, dict) and "tokens_per_image" in st for st in stages):
        return [int(st["tokens_per_image"]) for st in stages]
    schedule_text = _manifest_value(manifest, "schedule")
    grid = _manifest_value(manifest, "grid")
    if schedule_text is None or grid is None:
        raise TensorRTBuildError("the manifest lacks 'schedule' or 'grid'")
    schedule = Schedule.coerce(schedule_text)
    num_layers = _manifest_value(manifest, "num_layers")
    if num_layers is not None:
        schedule.validate(int(num_layers), grid)
    return [h * w for h, w in schedule.grids(grid)]


_STAGE_SUFFIX = re.compile(r"(?:_|\.|stage)(\d+)$")


def dim_kind(name: str, manifest: Optional[Dict[str, Any]] = None) -> Tuple[str, int]:
    """``(kind, stage)`` of a dynamic dim: kind is ``batch``, ``images``, ``prompt`` (stage-0
    prompt length), ``stage`` (the prefill length at stage ``s``) or ``past`` (a decode cache length
    at stage ``s``). The manifest's ``stages[s]["prefill_dim"]`` / ``["decode_dim"]`` (what
    ``adsc export`` writes) or its ``dims`` table decide when present; else the name:
    ``batch*``; ``*image*``; ``past*`` / ``*cache*`` / ``*kv*`` with a stage suffix (``_1``,
    ``.1``, ``stage1``); ``*seq*`` / ``*prompt*`` / ``*len*`` / ``*token*`` with a stage suffix
    (stage 0: ``prompt``) or without one (``prompt``)."""
    for st in (manifest or {}).get("stages") or []:
        if isinstance(st, dict) and name in (st.get("prefill_dim"), st.get("decode_dim")):
            stage = int(st.get("stage", 0))
            if name == st.get("decode_dim"):
                return "past", stage
            return ("stage", stage) if stage else ("prompt", 0)
    table = (manifest or {}).get("dims")
    if isinstance(table, dict) and name in table:
        entry = table[name]
        kind = entry.get("kind") if isinstance(entry, dict) else entry
        stage = int(entry.get("stage", 0)) if isinstance(entry, dict) else 0
        if kind not in ("batch", "images", "prompt", "stage", "past"):
            raise TensorRTBuildError(f"manifest dim {name!r} has unknown kind {kind!r}")
        if kind == "stage" and stage == 0:
            kind = "prompt"
        return kind, stage
    low = name.lower()
    m = _STAGE_SUFFIX.search(low)
    stage = int(m.group(1)) if m else None
    if low.startswith("batch") or low in ("b", "bsz"):
        return "batch", 0
    if "image" in low:
        return "images", 0
    if any(w in low for w in ("past", "cache", "kv")):
        return "past", stage if stage is not None else 0
    if any(w in low for w in ("seq", "prompt", "len", "token")):
        if stage is None or stage == 0:
            return "prompt", 0
        return "stage", stage
    raise TensorRTBuildError(
        f"the manifest does not say what dynamic dim {name!r} is (add it to the manifest's 'dims')")


def dim_ranges(manifest: Dict[str, Any], limits: BuildLimits) -> Dict[str, Range]:
    """``{dim name: (min, opt, max)}`` for every dynamic dim of every graph input.

    - batch: ``1 .. max_batch`` (opt ``opt_batch``, default ``max_batch``);
    - images: ``1 .. max_images`` (opt: ``opt_images_per_prompt`` per row of the opt batch);
    - prompt (stage 0): ``1 .. max_prompt``, opt ``opt_text_tokens`` + the opt images' tokens;
    - stage ``s`` of prefill: ``1 .. max_prompt`` (a text-only row is not compacted), opt
      ``opt_text_tokens`` + the opt images at stage ``s``'s tokens per image;
    - past of stage ``s`` (decode): ``1 .. max_prompt + max_new_tokens - 1``, opt the stage's opt
      length + ``max_new_tokens // 2``.
    """
    limits.check()
    per_image = stage_tokens_per_image(manifest)
    num_stages = len(per_image)
    max_prompt = limits.max_prompt or (per_image[0] + 512)
    opt_batch = limits.opt_batch or limits.max_batch
    opt_images = limits.opt_images_per_prompt
    if opt_images * per_image[0] > max_prompt:
        opt_images = max_prompt // per_image[0]
    max_images = limits.max_images or max(1, limits.max_batch * (max_prompt // per_image[0]))
    max_past = max_prompt + limits.max_new_tokens - 1

    def clamp(lo: int, opt: int, hi: int) -> Range:
        return lo, min(max(opt, lo), hi), hi

    def stage_opt(s: int) -> int:
        return limits.opt_text_tokens + opt_images * per_image[s]

    ranges: Dict[str, Range] = {}
    for graph, spec in graph_specs(manifest).items():
        for tensor in spec["inputs"]:
            for d in tensor["dims"]:
                if isinstance(d, int) or (isinstance(d, str) and d.isdigit()):
                    continue
                if not isinstance(d, str):
                    raise TensorRTBuildError(
                        f"graph {graph!r} input {tensor['name']!r} has a dim {d!r} that is neither "
                        "an int nor a name")
                if d in ranges:
                    continue
                kind, stage = dim_kind(d, manifest)
                if stage >= num_stages:
                    raise TensorRTBuildError(
                        f"dim {d!r} names stage {stage}, but the schedule has {num_stages} stages")
                if kind == "batch":
                    ranges[d] = clamp(1, opt_batch, limits.max_batch)
                elif kind == "images":
                    ranges[d] = clamp(1, opt_batch * max(opt_images, 1), max_images)
                elif kind in ("prompt", "stage"):
                    ranges[d] = clamp(1, stage_opt(stage), max_prompt)
                else:  # past
                    ranges[d] = clamp(1, stage_opt(stage) + limits.max_new_tokens // 2, max_past)
    return ranges


def profile_shapes(inputs: Sequence[Dict[str, Any]], ranges: Dict[str, Range]
                   ) -> Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...]]]:
    """``{input name: (min shape, opt shape, max shape)}`` for the inputs with a dynamic dim."""
    shapes = {}
    for tensor in inputs:
        dims = tensor["dims"]
        if all(isinstance(d, int) or (isinstance(d, str) and d.isdigit()) for d in dims):
            continue
        lo, opt, hi = [], [], []
        for d in dims:
            if isinstance(d, int) or d.isdigit():
                v = int(d)
                lo.append(v); opt.append(v); hi.append(v)
            else:
                if d not in ranges:
                    raise TensorRTBuildError(f"input {tensor['name']!r}: no range for dim {d!r}")
                a, b, c = ranges[d]
                lo.append(a); opt.append(b); hi.append(c)
        shapes[tensor["name"]] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes


# ---- the plugin library ----------------------------------------------------------------------

def graph_uses_plugin(onnx_path) -> bool:
    """Whether the ONNX graph holds an ``AdscCompactTokens`` node (onnx if installed, else a scan of
    the file's bytes for the op type, which protobuf stores verbatim)."""
    path = Path(onnx_path)
    try:
        import onnx  # noqa: WPS433 (optional)
    except ImportError:
        return _plugin.OP_TYPE.encode() in path.read_bytes()
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise TensorRTBuildError(f"{path} is not a readable ONNX model: {exc}") from None

    def walk(graph) -> bool:
        for node in graph.node:
            if node.op_type == _plugin.OP_TYPE:
                return True
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node) and walk(attr.g):
                    return True
        return False

    if any(f.name == _plugin.OP_TYPE and f.domain == _plugin.DOMAIN for f in model.functions):
        # TensorRT's parser prefers a model-local function over the plugin fallback.
        raise TensorRTBuildError(
            f"{path} defines {_plugin.OP_TYPE} as a local ONNX function (the ONNX Runtime reference): "
            "TensorRT would inline it instead of using the plugin; build from the graph without it")
    return walk(model.graph) or any(
        n.op_type == _plugin.OP_TYPE for f in model.functions for n in f.node)


def _default_plugin_candidates() -> List[Path]:
    package = Path(__file__).resolve().parents[1]        # adsc_ext/
    repo = package.parent
    found = [package / "lib" / _plugin.PLUGIN_LIBRARY]   # `pip install` with -DADSC_WITH_TENSORRT=ON
    build = repo / "build"
    if build.is_dir():
        found += sorted(build.glob(f"*/csrc/tensorrt/{_plugin.PLUGIN_LIBRARY}"))
    return found


def find_plugin_library(explicit=None) -> Path:
    """The plugin library: ``explicit``, else ``$ADSC_TENSORRT_PLUGIN``, else the package's
    ``lib/`` or a source tree's ``build/*/csrc/tensorrt/``. One error naming what was tried."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise TensorRTBuildError(f"plugin library {path} does not exist")
        return path.resolve()
    env = os.environ.get(PLUGIN_ENV)
    if env:
        path = Path(env)
        if not path.is_file():
            raise TensorRTBuildError(f"${PLUGIN_ENV}={env} does not exist")
        return path.resolve()
    candidates = _default_plugin_candidates()
    for path in candidates:
        if path.is_file():
            return path.resolve()
    tried = ", ".join(str(p) for p in candidates)
    raise TensorRTBuildError(
        f"the graphs use the {_plugin.OP_TYPE} plugin but {_plugin.PLUGIN_LIBRARY} was not found "
        f"(tried {tried}); build it with `cmake -S . -B build/trt -DADSC_WITH_TENSORRT=ON "
        f"-DTensorRT_INCLUDE_DIR=<TensorRT include dir> && cmake --build build/trt` and pass "
        f"--plugin or set ${PLUGIN_ENV}")


# ---- the report ------------------------------------------------------------------------------

def write_build_report(folder, report: Dict[str, Any]) -> Path:
    """Write ``folder/trt_build_report.json`` (atomically: a partial report never replaces a
    good one)."""
    path = Path(folder) / REPORT_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def _check_outputs_free(folder: Path, names: Sequence[str], specs, force: bool) -> None:
    existing = [folder / (Path(specs[n]["file"]).stem + ENGINE_SUFFIX) for n in names]
    existing = [p for p in existing if p.exists()]
    if existing and not force:
        raise TensorRTBuildError(
            f"{existing[0]} exists; pass force=True (--force) to rebuild the engines")


# ---- TensorRT ----------------------------------------------------------------------------------

def import_tensorrt():
    """``import tensorrt``, or :class:`TensorRTUnavailable` with :data:`INSTALL_HINT`."""
    try:
        import tensorrt  # noqa: WPS433
    except (ImportError, OSError) as exc:  # OSError: the package is there, libnvinfer is not
        raise TensorRTUnavailable(f"{INSTALL_HINT} ({' '.join(str(exc).splitlines())})") from None
    major = int(str(getattr(tensorrt, "__version__", "0")).split(".")[0] or 0)
    if major < 10:
        raise TensorRTUnavailable(
            f"TensorRT {tensorrt.__version__} is too old: IPluginV3, strongly typed networks and "
            "execute_async_v3 need TensorRT 10 or later")
    return tensorrt


def _load_plugin(trt, path: Path) -> None:
    """Register the plugin library's creators with TensorRT's (process-wide) plugin registry,
    once: a second build or a runner in the same process finds them there."""
    registry = trt.get_plugin_registry()

    def creator():
        return registry.get_creator(_plugin.PLUGIN_NAME, _plugin.PLUGIN_VERSION, _plugin.PLUGIN_NAMESPACE)

    if creator() is not None:
        return
    if registry.load_library(str(path)) is None:
        raise TensorRTBuildError(f"TensorRT could not load the plugin library {path}")
    if creator() is None:
        raise TensorRTBuildError(
            f"{path} loaded but registered no {_plugin.PLUGIN_NAMESPACE}::{_plugin.PLUGIN_NAME} "
            f"version {_plugin.PLUGIN_VERSION}")


def _parser_error(err) -> str:
    """One ParserError as text: its description and node (the binding has no __str__)."""
    try:
        return f"{err.desc()} (node {err.node()})"
    except AttributeError:
        return str(err)


def _build_engine(trt, logger, onnx_path: Path, inputs, shapes, workspace_bytes: Optional[int],
                  allow_tf32: bool = False):
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(_parser_error(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTBuildError(f"{onnx_path.name}: TensorRT's ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_bytes))
    if not allow_tf32:  # on by default in TensorRT; a float32 export means float32 math
        config.clear_flag(trt.BuilderFlag.TF32)
    declared = {t["name"]: t for t in inputs}
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = tuple(tensor.shape)
        if all(d >= 0 for d in dims):
            continue
        if tensor.name not in shapes:
            raise TensorRTBuildError(
                f"{onnx_path.name}: input {tensor.name!r} {dims} is dynamic but the manifest gives "
                f"it no dynamic dims ({declared.get(tensor.name, {}).get('dims')})")
        lo, opt, hi = shapes[tensor.name]
        if len(lo) != len(dims) or any(d >= 0 and d != m for d, m in zip(dims, lo)):
            raise TensorRTBuildError(
                f"{onnx_path.name}: input {tensor.name!r} is {dims} in the graph but "
                f"{declared[tensor.name]['dims']} in the manifest")
        profile.set_shape(tensor.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise TensorRTBuildError(f"{onnx_path.name}: TensorRT's builder failed (see its log above)")
    return blob


def build_engines(
    folder,
    limits: Optional[BuildLimits] = None,
    *,
    graphs: Optional[Sequence[str]] = None,
    plugin_library=None,
    workspace_bytes: Optional[int] = None,
    allow_tf32: bool = False,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Dict[str, Any]:
    """Build a TensorRT engine for every graph of an ``adsc export`` folder (or the ``graphs``
    named), write them beside the ONNX files and ``trt_build_report.json``; returns the report.

    ``allow_tf32``: let TensorRT run float32 matrix products in TF32 (its default; off here, so a
    float32 export computes in float32 as exported).

    Raises :class:`TensorRTBuildError` for a bad folder, manifest or limit (checked before TensorRT
    is imported) and :class:`TensorRTUnavailable` without ``tensorrt``.
    """
    folder = Path(folder)
    limits = limits or BuildLimits()
    manifest = read_manifest(folder)
    specs = graph_specs(manifest)
    names = list(graphs) if graphs else list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise TensorRTBuildError(f"no graph {unknown[0]!r} in the manifest (it has {', '.join(specs)})")
    for n in names:
        if not (folder / specs[n]["file"]).is_file():
            raise TensorRTBuildError(f"{folder / specs[n]['file']} is missing")
    ranges = dim_ranges(manifest, limits)
    shapes = {n: profile_shapes(specs[n]["inputs"], ranges) for n in names}
    _check_outputs_free(folder, names, specs, force)
    uses_plugin = {}
    for n in names:
        op_types = specs[n].get("op_types")
        if isinstance(op_types, list):
            uses_plugin[n] = _plugin.OP_TYPE in op_types
        else:
            uses_plugin[n] = graph_uses_plugin(folder / specs[n]["file"])
    plugin_path = find_plugin_library(plugin_library) if any(uses_plugin.values()) else None

    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    if plugin_path is not None:
        _load_plugin(trt, plugin_path)
    report: Dict[str, Any] = {
        "tensorrt_version": trt.__version__,
        "folder": str(folder.resolve()),
        "schedule": str(_manifest_value(manifest, "schedule")),
        "limits": asdict(limits),
        "dim_ranges": {k: list(v) for k, v in ranges.items()},
        "plugin_library": str(plugin_path) if plugin_path else None,
        "strongly_typed": True,
        "tf32": bool(allow_tf32),
        "engines": {},
    }
    for n in names:
        onnx_path = folder / specs[n]["file"]
        engine_path = folder / (onnx_path.stem + ENGINE_SUFFIX)
        log(f"trt-build: {onnx_path.name} -> {engine_path.name} ...")
        start = time.perf_counter()
        blob = _build_engine(trt, logger, onnx_path, specs[n]["inputs"], shapes[n], workspace_bytes,
                             allow_tf32)
        tmp = engine_path.with_suffix(".engine.tmp")
        with open(tmp, "wb") as f:
            f.write(memoryview(blob))
        os.replace(tmp, engine_path)
        seconds = time.perf_counter() - start
        report["engines"][n] = {
            "onnx": onnx_path.name,
            "engine": engine_path.name,
            "bytes": engine_path.stat().st_size,
            "build_seconds": round(seconds, 3),
            "uses_plugin": uses_plugin[n],
            "profile": {k: {"min": list(v[0]), "opt": list(v[1]), "max": list(v[2])}
                        for k, v in shapes[n].items()},
        }
        log(f"trt-build: {engine_path.name}: {engine_path.stat().st_size / 2**20:.1f} MiB in {seconds:.1f} s")
    write_build_report(folder, report)
    return report
