"""A checkpoint folder, read before any weight is: is it an architecture adsc_ext supports, and will
its weights fit in the memory available? (``adsc generate --model``, ``adsc export --model``.)

transformers builds whatever class it is asked for from any ``config.json``: asked for a
``LlavaForConditionalGeneration`` from a Llama checkpoint, it fills every missing LLaVA field with
its defaults and allocates a 7B model. So the front ends read the folder's ``config.json`` first
(:func:`inspect_checkpoint`), look its ``model_type`` / ``architectures`` up in :data:`SUPPORTED`,
estimate the bytes its weights will take at the dtype they will be loaded in, and compare them with
the memory available (:func:`check_fits`) -- all before transformers opens a weight file.

:data:`SUPPORTED` is the one table of what a checkpoint may be: ``model_type`` -> the transformers
class adsc_ext loads it with (the class the model description in :mod:`adsc_ext.models` is made
for) and the parameter count its config implies. A new architecture adds one row here beside its
model description.

The weights' bytes: the larger of the parameter count the config implies (what transformers will
allocate, whatever the files hold) and the tensors the safetensors headers list (only the headers
are read), each at the load dtype; ``*.bin`` files count by their size. The check refuses a load
whose weights plus a margin of ``max(MARGIN_BYTES, MARGIN_FRACTION x weights)`` (activations,
the processor, the interpreter) exceed the memory available: ``MemAvailable`` of ``/proc/meminfo``
(bounded by a cgroup memory limit) on the CPU, ``torch.cuda.mem_get_info`` on a GPU. Where the
machine does not say (no ``/proc/meminfo``), nothing is refused.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..errors import AdscError
from .llava import AdscModelError

__all__ = ["SUPPORTED", "COMMANDS", "Architecture", "CheckpointError", "CheckpointInfo", "inspect_checkpoint", "check_fits",
           "check_schedule", "available_memory", "safetensors_bytes", "read_config", "read_config_file",
           "architecture", "MARGIN_BYTES", "MARGIN_FRACTION"]

GiB = 2**30
#: the memory a load needs beyond its weights: max(MARGIN_BYTES, MARGIN_FRACTION x the weights' bytes)
MARGIN_BYTES = GiB
MARGIN_FRACTION = 0.10
#: safetensors' own limit on a header's size
_MAX_HEADER = 100 * 2**20
#: bytes per element of the safetensors dtypes (the floating ones are loaded at the load dtype)
_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
             "I8": 1, "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}
_ST_FLOAT = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class CheckpointError(AdscError, ValueError):
    """A checkpoint folder that cannot be loaded here: an unreadable config or weight header, or
    weights larger than the memory available."""


@dataclass(frozen=True)
class Architecture:
    """A row of :data:`SUPPORTED`."""

    model_type: str  #: ``config.json``'s ``model_type``
    class_name: str  #: the transformers class adsc_ext loads it with
    description: str  #: what it is, for messages
    parameters: Callable[[Mapping[str, Any]], int]  #: the parameter count the config implies
    #: the adsc commands that load it (of :data:`COMMANDS`; apply_adsc takes every row's class)
    commands: Tuple[str, ...] = ()


def _llava_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of a LLaVA-1.5, LLaVA-NeXT or LLaVA-OneVision model of ``config``: a CLIP or
    SigLIP vision tower, the projector, (NeXT / OneVision) the ``image_newline`` vector, and the
    language model (dims read by :func:`adsc_ext.accounting.spec_from_config`, which fills in
    transformers' defaults; ``tests/test_hardening_generate.py`` and
    ``tests/test_llava_next_checkpoint.py`` check the count against transformers' own models)."""
    from ..accounting import decode_weight_bytes, spec_from_config

    spec = spec_from_config(config, "config.json")
    text = config["text_config"]
    h, v = spec.hidden_size, spec.vision
    feature_layer = config.get("vision_feature_layer", -2)
    n_feature_layers = len(feature_layer) if isinstance(feature_layer, (list, tuple)) else 1
    # decoder layers (projections, their biases, two norms), final norm and LM head
    total = decode_weight_bytes(spec, 1)
    tied = config.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False)
    if not tied:
        total += spec.vocab_size * h  # the input embeddings (the LM head is counted above)
    vh, vi = v.hidden_size, v.intermediate_size
    layer = 4 * (vh * vh + vh) + 2 * vh + (vh * vi + vi) + (vi * vh + vh) + 2 * vh
    if v.kind == "clip":  # patch embedding (no bias), class + position embeddings, pre/post norms
        total += 3 * v.patch_size * v.patch_size * vh + vh + (v.patches + 1) * vh + 4 * vh
    else:  # SigLIP: patch embedding with bias, position embeddings, post norm, the pooling head if any
        total += 3 * v.patch_size * v.patch_size * vh + vh + v.patches * vh + 2 * vh
        if v.head:
            total += vh + (3 * vh * vh + 3 * vh) + (vh * vh + vh) + 2 * vh + (vh * vi + vi) + (vi * vh + vh)
    total += v.num_layers * layer
    # projector: vision features (one or several layers, concatenated) -> hidden -> hidden
    bias = 1 if config.get("multimodal_projector_bias", True) else 0
    total += n_feature_layers * vh * h + bias * h + h * h + bias * h
    if spec.arch != "llava":
        total += h  # image_newline
    return int(total)


#: The adsc commands that load a checkpoint (the others read configs only: adsc plan accounts every
#: architecture of adsc_ext.accounting.ARCHITECTURES).
COMMANDS = ("generate", "export", "bench")


def _meta_parameters(config: Mapping[str, Any]) -> int:
    """Parameters of the model transformers builds from ``config`` (on the ``meta`` device: no memory,
    no weights read), counted once each (tied weights once): what a load will allocate."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    try:
        cfg = AutoConfig.for_model(**dict(config))
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(cfg)
    except Exception as exc:  # a config transformers cannot build: no count (the files alone tell)
        raise ValueError(f"transformers cannot build this config: {exc}") from None
    return int(sum(p.numel() for p in model.parameters()))


#: model_type -> how adsc_ext loads it; one row per supported architecture.
SUPPORTED: Dict[str, Architecture] = {
    a.model_type: a for a in (
        Architecture("llava", "LlavaForConditionalGeneration",
                     "LLaVA-1.5: a CLIP vision tower and a LLaMA-family language model", _llava_parameters,
                     COMMANDS),
        Architecture("llava_next", "LlavaNextForConditionalGeneration",
                     "LLaVA-NeXT: anyres crops of a CLIP tower and a LLaMA / Mistral language model",
                     _llava_parameters, ()),
        Architecture("llava_onevision", "LlavaOnevisionForConditionalGeneration",
                     "LLaVA-OneVision: anyres crops of a SigLIP tower and a Qwen2 language model",
                     _llava_parameters, ()),
        Architecture("qwen2_vl", "Qwen2VLForConditionalGeneration",
                     "Qwen2-VL: dynamic-resolution images and videos, M-RoPE", _meta_parameters,
                     ("generate",)),
        Architecture("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration",
                     "Qwen2.5-VL: dynamic-resolution images and videos, windowed ViT, M-RoPE", _meta_parameters,
                     ("generate", "export")),
        Architecture("qwen3_vl", "Qwen3VLForConditionalGeneration",
                     "Qwen3-VL: dynamic-resolution images and videos, interleaved M-RoPE, DeepStack", _meta_parameters,
                     ("generate",)),
    )
}


def _supported_text() -> str:
    return ", ".join(f"model_type '{a.model_type}' ({a.class_name}, {a.description})" for a in SUPPORTED.values())


@dataclass(frozen=True)
class CheckpointInfo:
    """What :func:`inspect_checkpoint` read: the folder, its config, its architecture, and the bytes
    its weights take at the load dtype (``weight_bytes``; None when nothing tells) and how that was
    counted (``counted_from``)."""

    path: Path
    config: Dict[str, Any]
    architecture: Architecture
    dtype_name: str
    weight_bytes: Optional[int]
    counted_from: str


def read_config(path: Path) -> Dict[str, Any]:
    """``path/config.json`` as a dict; :class:`CheckpointError` if missing or not a JSON object."""
    return read_config_file(Path(path) / "config.json", folder=True)


def read_config_file(file: Path, folder: bool = False) -> Dict[str, Any]:
    """A config.json file as a dict; :class:`CheckpointError` if missing or not a JSON object."""
    file = Path(file)
    path = file.parent
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json in this directory: not a transformers checkpoint" if folder
                              else f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc})") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: a JSON object is expected, got {type(config).__name__}")
    return config


def architecture(config: Mapping[str, Any], where: str, command: Optional[str] = None) -> Architecture:
    """The :data:`SUPPORTED` row of a config; :class:`AdscModelError` naming what it is otherwise, or
    when ``command`` (``adsc generate`` / ``export`` / ``bench``) does not load it."""
    model_type = config.get("model_type")
    classes = config.get("architectures")
    named = f" ({', '.join(map(str, classes))})" if isinstance(classes, list) and classes else ""
    if not isinstance(model_type, str):
        raise CheckpointError(f"{where}: config.json has no model_type{named}; adsc_ext supports {_supported_text()}")
    arch = SUPPORTED.get(model_type)
    if arch is None:
        raise AdscModelError(f"{where}: config.json says model_type '{model_type}'{named}, which adsc_ext does not "
                             f"support; it supports {_supported_text()}")
    if isinstance(classes, list) and classes and arch.class_name not in classes:
        raise AdscModelError(f"{where}: config.json says model_type '{model_type}' but architectures "
                             f"{', '.join(map(str, classes))}: adsc_ext loads {arch.class_name} checkpoints (the "
                             f"transformers format); convert this checkpoint to it")
    if command is not None and command not in arch.commands:
        takes = [a for a in SUPPORTED.values() if command in a.commands]
        raise AdscModelError(
            f"{where}: adsc {command} loads {', '.join(f'{a.model_type} ({a.class_name})' for a in takes)} "
            f"checkpoints; this is model_type '{model_type}' ({arch.class_name}), which apply_adsc runs in Python "
            f"and adsc plan accounts"
        )
    return arch


def _header(file: Path) -> Dict[str, Any]:
    """The JSON header of a safetensors file (only the header is read)."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            size = os.fstat(f.fileno()).st_size
            if n > _MAX_HEADER or n > size - 8:
                raise CheckpointError(f"{file}: not a safetensors file (header length {n} with {size} bytes in "
                                      f"the file)")
            raw = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot be read ({exc})") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{file}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: not a safetensors file (its header is not a JSON object)")
    return header


def safetensors_bytes(files: List[Path], itemsize: int) -> int:
    """Bytes of the tensors the files' headers list, floating tensors at ``itemsize`` bytes."""
    total = 0
    for file in files:
        for name, t in _header(file).items():
            if name == "__metadata__":
                continue
            shape, dtype = (t.get("shape"), t.get("dtype")) if isinstance(t, dict) else (None, None)
            if (not isinstance(shape, list) or dtype not in _ST_BYTES
                    or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
                raise CheckpointError(f"{file}: not a safetensors file (tensor {name!r} has shape {shape!r}, "
                                      f"dtype {dtype!r})")
            total += math.prod(shape) * (itemsize if dtype in _ST_FLOAT else _ST_BYTES[dtype])
    return total


def _weight_files(path: Path) -> Tuple[List[Path], List[Path]]:
    """``(safetensors files, *.bin files)`` transformers would load from ``path``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, AttributeError, TypeError):
            raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a 'weight_map')") from None
        files = [path / str(n) for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{index} lists {', '.join(missing)}, which is missing")
        return files, []
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], []
    return [], sorted(path.glob("pytorch_model*.bin"))


def inspect_checkpoint(path, dtype_name: str, itemsize: int, where: Optional[str] = None,
                       command: Optional[str] = None) -> CheckpointInfo:
    """Read ``path/config.json`` (and the weight files' headers, never their tensors).

    Raises :class:`CheckpointError` for an unreadable config or weight header and
    :class:`~adsc_ext.models.AdscModelError` for an architecture not in :data:`SUPPORTED`.
    ``dtype_name`` / ``itemsize``: the dtype the weights will be loaded in; ``where``: how messages
    name the folder (default: its path); ``command``: the adsc command that will load it (refused
    for an architecture it does not load).
    """
    path = Path(path)
    where = where or str(path)
    config = read_config(path)
    arch = architecture(config, where, command)
    counts: List[Tuple[int, str]] = []
    if "quantization_config" not in config:  # quantized weights are not params x itemsize
        try:
            n = arch.parameters(config)
        except (ValueError, TypeError, KeyError):
            n = None  # a config the count cannot read: the files alone tell
        if n is not None:
            counts.append((n * itemsize, f"{n / 1e9:.1f} B parameters as {dtype_name}, from config.json"))
    st, bins = _weight_files(path)
    if st:
        counts.append((safetensors_bytes(st, itemsize),
                       f"the tensors {'its ' + str(len(st)) + ' safetensors files list' if len(st) > 1 else st[0].name + ' lists'}"
                       f" as {dtype_name}"))
    if bins:
        counts.append((sum(f.stat().st_size for f in bins), f"the size of {', '.join(f.name for f in bins)}"))
    if not counts:
        return CheckpointInfo(path, config, arch, dtype_name, None, "nothing (no weight count could be made)")
    nbytes, how = max(counts, key=lambda c: c[0])
    return CheckpointInfo(path, config, arch, dtype_name, nbytes, how)


def check_schedule(info: CheckpointInfo, schedule=None):
    """The schedule a load of this checkpoint runs (``schedule``, else the config's
    ``adsc_schedule``, else the architecture's default, spec section 2), checked against the
    config's decoder layers and image grid (LLaVA-1.5's one grid; the base grid every anyres image
    has) before any weight is read. Raises :class:`~adsc_ext.ScheduleError`; returns the
    :class:`~adsc_ext.Schedule`, or None when the config's dims cannot be read here (the loaded
    model's check then decides)."""
    from ..accounting import ModelSpecError, spec_from_config
    from ..schedule import Schedule

    if info.architecture.model_type.startswith("qwen"):  # per-image grids: the layers (and DeepStack) decide
        return _qwen_schedule(info, schedule)
    try:
        spec = spec_from_config(info.config, str(info.path / "config.json"))
    except ModelSpecError:
        return None
    sched = Schedule.coerce(spec.default_schedule() if schedule is None else schedule)
    sched.validate(spec.num_layers, spec.grid)  # its ScheduleError names the layers or the grid
    return sched


def _qwen_schedule(info: CheckpointInfo, schedule=None):
    """A Qwen-VL checkpoint's schedule (the argument, the config's ``adsc_schedule``, else spec
    section 2's rule on its decoder layers), checked against its layers and (Qwen3-VL) the DeepStack
    layers; None when the config does not say how many layers it has."""
    from ..schedule import Schedule
    from .base import default_schedule
    from .qwen_vl import check_deepstack

    text = info.config.get("text_config") or info.config
    layers = text.get("num_hidden_layers")
    if isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        return None
    if schedule is None:
        schedule = info.config.get("adsc_schedule")
    sched = Schedule.coerce(default_schedule(layers) if schedule is None else schedule)
    sched.validate(layers)
    if info.architecture.model_type == "qwen3_vl":
        deep = (info.config.get("vision_config") or {}).get("deepstack_visual_indexes")
        check_deepstack(sched, 3 if deep is None else len(deep))  # transformers' default: (8, 16, 24)
    return sched


def _cgroup_free() -> Optional[int]:
    """Memory left under this process's cgroup limit (v2, else v1), or None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):
            return max(0, int(limit) - usage)
    return None


def available_memory(device="cpu") -> Optional[Tuple[int, str]]:
    """``(bytes available, where that figure comes from)`` on ``device``, or None if unknown."""
    dev = str(device)
    if dev.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        return int(free), f"free on {torch.cuda.get_device_name(torch.device(dev))} (torch.cuda.mem_get_info)"
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f if ":" in line)
        avail = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    cg = _cgroup_free()
    if cg is not None and cg < avail:
        return cg, "under this process's cgroup memory limit (MemAvailable is larger)"
    return avail, "MemAvailable in /proc/meminfo"


def check_fits(nbytes: Optional[int], what: str, device="cpu", hint: str = "") -> None:
    """Refuse (:class:`CheckpointError`, one line) when ``nbytes`` plus the margin exceed the memory
    available on ``device``. ``what`` names the bytes in the message (e.g. "--model X: its weights
    (69.4 B parameters as float32, from config.json)"); ``hint`` is appended (what to do instead)."""
    if nbytes is None:
        return
    avail = available_memory(device)
    if avail is None:
        return
    have, source = avail
    margin = max(MARGIN_BYTES, int(MARGIN_FRACTION * nbytes))
    if nbytes + margin > have:
        raise CheckpointError(
            f"{what} take about {nbytes / GiB:.1f} GiB; with a margin of {margin / GiB:.1f} GiB (activations, "
            f"the processor) the load needs {(nbytes + margin) / GiB:.1f} GiB, but {device} has "
            f"{have / GiB:.1f} GiB available ({source}){'; ' + hint if hint else ''}"
        )
