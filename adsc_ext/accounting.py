"""Efficiency accounting of ADSC (spec section 7): decoder FLOPs and KV-cache bytes of one prefill,
the whole prefill's FLOPs (vision tower, projector, decoder, LM head), and the bytes one decode step
reads (weights + KV cache).

Counting rules, chosen to match what ``torch.utils.flop_counter.FlopCounterMode`` reports for a
real forward of the decoder layers (the tests check this on a small LLaMA):

- decoder layers only: no embeddings, no final norm, no ``lm_head``;
- 2 FLOPs per multiply-add; a layer with ``n`` tokens alive does ``2 * n * (weights)`` for its
  q/k/v/o projections (k and v are ``num_kv_heads * head_dim`` wide: GQA-aware) and its
  gate/up/down MLP projections;
- attention is dense: ``2 * n * n * head_dim * num_heads`` for the scores plus the same for the
  values, as the counter counts SDPA/bmm whatever the causal mask skips;
- norms, activations, RoPE and softmax are not matmuls, so they count nothing;
- KV cache: each layer stores K and V for the tokens alive at that layer.

The whole prefill (what time to first token pays, spec section 8), per request, adds to the
decoder (tested against ``FlopCounterMode`` on a real LLaVA forward too):

- the **vision tower** per image, which ADSC does not shrink: the patch embedding (a convolution,
  ``2 * patches * 3 * patch**2 * hidden_v``) and every CLIP encoder layer on ``patches + 1`` tokens
  (the CLS token too; transformers runs all layers and then picks ``vision_feature_layer``), counted
  like a decoder layer with a plain two-matrix MLP;
- the **projector** per image on the ``patches`` kept tokens: ``hidden_v -> hidden -> hidden``;
- the **LM head** on the last prompt token (the first generated token needs only it).

One **decode step** reads (spec section 8's decode ratio): every weight of the decoder layers (their
projections and norms), the final norm and the LM head, once per step whatever the batch (the
embedding rows and the vision tower are not read), plus, per sequence and layer, K and V of every
cached token. Step ``s = 1 .. new_tokens - 1`` (the first token comes from the prefill) attends to
the stage's prompt tokens plus ``s`` generated ones; the report averages over the steps.

Pure Python on purpose: ``adsc plan`` must work without torch kernels or the compiled extension.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

from adsc_ext.schedule import Schedule, ScheduleError

__all__ = [
    "ModelSpecError",
    "VisionSpec",
    "ModelSpec",
    "PRESETS",
    "load_model_spec",
    "spec_from_config",
    "layer_flops",
    "layer_kv_bytes",
    "vision_flops",
    "lm_head_flops",
    "decode_weight_bytes",
    "plan_report",
    "format_section8",
]


class ModelSpecError(ValueError):
    """A model that cannot be described: unknown preset, unreadable or incomplete config.json."""


@dataclass(frozen=True)
class VisionSpec:
    """The shape of a LLaVA-style model's vision tower (CLIP ViT) and its projector.

    Defaults are CLIP ViT-L/14 at 336 px, LLaVA-1.5's tower."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a LLaVA-style model's language decoder and its image grid (and, for the whole
    prefill and the decode-step bytes, its vocabulary and vision tower)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: Vision tokens of one image as ``(height, width)``, in raster order.
    grid: tuple[int, int]
    vocab_size: int = 32064
    vision: VisionSpec = VisionSpec()

    def __post_init__(self) -> None:
        for attr in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            _check_positive(f"{self.name}: {attr}", getattr(self, attr))
        if self.num_heads % self.num_kv_heads:
            raise ModelSpecError(
                f"{self.name}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if len(self.grid) != 2:
            raise ModelSpecError(f"{self.name}: grid must be (height, width), got {self.grid!r}")
        for side in self.grid:
            _check_positive(f"{self.name}: grid side", side)
        _check_positive(f"{self.name}: vocab_size", self.vocab_size)
        v = self.vision
        for attr in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size"):
            _check_positive(f"{self.name}: vision {attr}", getattr(v, attr))
        if v.hidden_size % v.num_heads:
            raise ModelSpecError(f"{self.name}: the vision hidden_size ({v.hidden_size}) must be a multiple of "
                                 f"its num_heads ({v.num_heads})")

    @property
    def tokens_per_image(self) -> int:
        """Vision tokens of one image before any downsampling."""
        return self.grid[0] * self.grid[1]


def _check_positive(what: str, value: Any) -> None:
    # bool is an int subclass; a JSON `true` must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelSpecError(f"{what} must be a positive integer, got {value!r}")


# Both LLaVA-1.5 models use CLIP ViT-L/14 at 336 px (336 / 14 = 24 x 24 patches, CLS dropped)
# and a Vicuna-v1.5 (LLaMA-2) decoder without GQA.
_LLAVA15_GRID = (24, 24)
PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("llava-1.5-7b", 4096, 11008, 32, 32, 32, 128, _LLAVA15_GRID, 32064, VisionSpec()),
        ModelSpec("llava-1.5-13b", 5120, 13824, 40, 40, 40, 128, _LLAVA15_GRID, 32064, VisionSpec()),
    )
}

# transformers' LlamaConfig defaults (the LLaMA-7B shape). The official llava-hf LLaVA-1.5-7B
# config.json leaves these out of `text_config`, so transformers -- and we -- fill them in; a
# `text_config` without `model_type` is a LLaMA one, as in LlavaConfig.
_LLAMA_DEFAULTS = {
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "vocab_size": 32000,
}
# transformers' CLIPVisionConfig defaults (ViT-B/32 at 224 px), used where a vision_config leaves a
# size out, as transformers does; LLaVA-1.5's own config.json spells every one out.
_CLIP_VISION_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
}


def spec_from_config(config: Mapping[str, Any], name: str) -> ModelSpec:
    """Describe a model from a LlavaConfig-style dict (``text_config`` + ``vision_config``)."""
    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, Mapping) or not isinstance(vision, Mapping):
        raise ModelSpecError(f"{name}: a LLaVA-style config needs 'text_config' and 'vision_config'")
    if config.get("vision_feature_select_strategy", "default") != "default":
        # 'full' keeps the CLS token, so an image is not a pure h x w grid ADSC can downsample.
        raise ModelSpecError(
            f"{name}: vision_feature_select_strategy must be 'default' (CLS dropped), got "
            f"{config['vision_feature_select_strategy']!r}"
        )
    if text.get("model_type", "llama") == "llama":
        text = {**_LLAMA_DEFAULTS, **text}

    def get(section: Mapping[str, Any], section_name: str, key: str, default: Any = None) -> Any:
        value = section.get(key)
        if value is None:  # configs write `null` for "use the default" (e.g. head_dim)
            if default is None:
                raise ModelSpecError(f"{name}: missing {section_name}.{key}")
            return default
        _check_positive(f"{name}: {section_name}.{key}", value)
        return value

    hidden = get(text, "text_config", "hidden_size")
    heads = get(text, "text_config", "num_attention_heads")
    if text.get("head_dim") is None and hidden % heads:
        raise ModelSpecError(
            f"{name}: text_config.hidden_size ({hidden}) is not a multiple of num_attention_heads "
            f"({heads}); give text_config.head_dim"
        )
    side = get(vision, "vision_config", "image_size") // get(vision, "vision_config", "patch_size")
    if side < 1:
        raise ModelSpecError(f"{name}: vision_config.image_size is smaller than its patch_size")
    vdef = _CLIP_VISION_DEFAULTS
    vision_spec = VisionSpec(
        hidden_size=get(vision, "vision_config", "hidden_size", vdef["hidden_size"]),
        intermediate_size=get(vision, "vision_config", "intermediate_size", vdef["intermediate_size"]),
        num_layers=get(vision, "vision_config", "num_hidden_layers", vdef["num_hidden_layers"]),
        num_heads=get(vision, "vision_config", "num_attention_heads", vdef["num_attention_heads"]),
        image_size=get(vision, "vision_config", "image_size"),
        patch_size=get(vision, "vision_config", "patch_size"),
    )
    return ModelSpec(
        name=name,
        hidden_size=hidden,
        intermediate_size=get(text, "text_config", "intermediate_size"),
        num_layers=get(text, "text_config", "num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=get(text, "text_config", "num_key_value_heads", heads),
        head_dim=get(text, "text_config", "head_dim", hidden // heads),
        grid=(side, side),
        vocab_size=get(text, "text_config", "vocab_size", 32000),
        vision=vision_spec,
    )


def load_model_spec(name_or_path: Union[str, Path]) -> ModelSpec:
    """A preset name (see :data:`PRESETS`), a config.json path, or a directory holding one."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if path.suffix == ".json" or len(path.parts) > 1:
            raise ModelSpecError(f"no config.json at {str(name_or_path)!r}")
        raise ModelSpecError(
            f"unknown model {str(name_or_path)!r}: not a preset ({', '.join(PRESETS)}) "
            f"nor a config.json or a directory holding one"
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelSpecError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, Mapping):
        raise ModelSpecError(f"{path}: a JSON object is expected")
    return spec_from_config(config, str(path))


def layer_flops(spec: ModelSpec, n_tokens: int) -> int:
    """FLOPs of one decoder layer's prefill over ``n_tokens`` tokens (see the module docstring)."""
    q_width = spec.num_heads * spec.head_dim
    kv_width = spec.num_kv_heads * spec.head_dim
    weights = (
        spec.hidden_size * q_width  # q_proj
        + 2 * spec.hidden_size * kv_width  # k_proj, v_proj
        + q_width * spec.hidden_size  # o_proj
        + 3 * spec.hidden_size * spec.intermediate_size  # gate_proj, up_proj, down_proj
    )
    linear = 2 * n_tokens * weights
    # Scores (q @ k^T) and values (p @ v), both [n, n] x head_dim per query head, dense.
    attention = 2 * (2 * n_tokens * n_tokens * spec.head_dim * spec.num_heads)
    return linear + attention


def layer_kv_bytes(spec: ModelSpec, n_tokens: int, dtype_bytes: int = 2) -> int:
    """Bytes of one layer's K and V cache for ``n_tokens`` tokens."""
    return 2 * n_tokens * spec.num_kv_heads * spec.head_dim * dtype_bytes


def vision_flops(spec: ModelSpec) -> int:
    """FLOPs of the vision tower and the projector for one image (see the module docstring)."""
    v = spec.vision
    p = v.patches
    n = p + 1  # the CLS token runs through every encoder layer
    patch_embed = 2 * p * 3 * v.patch_size * v.patch_size * v.hidden_size
    per_layer = 2 * n * (4 * v.hidden_size * v.hidden_size + 2 * v.hidden_size * v.intermediate_size) \
        + 2 * (2 * n * n * v.hidden_size)
    projector = 2 * p * (v.hidden_size * spec.hidden_size + spec.hidden_size * spec.hidden_size)
    return patch_embed + v.num_layers * per_layer + projector


def lm_head_flops(spec: ModelSpec, n_tokens: int = 1) -> int:
    """FLOPs of the LM head on ``n_tokens`` tokens."""
    return 2 * n_tokens * spec.hidden_size * spec.vocab_size


def decode_weight_bytes(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """Bytes of the weights one decode step reads: the decoder layers (projections and their two
    norms), the final norm and the LM head."""
    q_width = spec.num_heads * spec.head_dim
    kv_width = spec.num_kv_heads * spec.head_dim
    per_layer = (spec.hidden_size * q_width + 2 * spec.hidden_size * kv_width + q_width * spec.hidden_size
                 + 3 * spec.hidden_size * spec.intermediate_size + 2 * spec.hidden_size)
    return dtype_bytes * (spec.num_layers * per_layer + spec.hidden_size + spec.vocab_size * spec.hidden_size)


def _check_count(what: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def plan_report(
    spec: ModelSpec,
    schedule: Union[str, Schedule, None],
    text_tokens: int,
    images: int = 1,
    dtype_bytes: int = 2,
    *,
    decode_batch: int = 32,
    new_tokens: int = 256,
) -> dict[str, Any]:
    """Everything ``adsc plan`` prints, for one prefill of ``text_tokens`` + ``images`` images.

    Returns a JSON-ready dict: the inputs, ``stages`` (one row per stage: ``stage``,
    ``first_layer``, ``last_layer``, ``grid``, ``vision_tokens_per_image``, ``tokens``, ``flops``,
    ``kv_bytes``), ``layers`` (``{"layer": i, "tokens": n}`` per decoder layer), the exact integer
    totals ``baseline_flops``, ``adsc_flops``, ``baseline_kv_bytes``, ``adsc_kv_bytes``, the
    reductions in percent and ``ideal_speedup`` (baseline / ADSC FLOPs). The baseline is the same
    prompt through the unmodified model.

    Spec section 8's two other ratios: ``prefill`` (per request: ``vision_flops``,
    ``lm_head_flops``, ``baseline_flops`` / ``adsc_flops`` of the whole prefill and their ratio
    ``speedup``) and ``decode`` (one step of ``decode_batch`` sequences, averaged over the
    ``new_tokens - 1`` decode steps: ``weights_bytes``, ``baseline_kv_bytes`` / ``adsc_kv_bytes``
    and ``baseline_bytes`` / ``adsc_bytes`` read per step, their ratio ``speedup``; and
    ``*_kv_bytes_end``: the cache of the whole batch after the last token, prompt + generated).
    Raises :class:`ValueError` (``ScheduleError`` for the schedule) on bad arguments.
    """
    schedule = Schedule.coerce(schedule)
    _check_count("text_tokens", text_tokens, 0)
    _check_count("images", images, 0)
    _check_count("dtype_bytes", dtype_bytes, 1)
    _check_count("decode_batch", decode_batch, 1)
    _check_count("new_tokens", new_tokens, 2)
    if text_tokens + images == 0:
        raise ValueError("the prompt is empty: give text tokens or images")
    try:
        stage_infos = schedule.validate(spec.num_layers, spec.grid)
    except ScheduleError as exc:
        raise ScheduleError(f"{exc} ({spec.name})") from None

    stages, layers = [], []
    for info in stage_infos:
        tokens = text_tokens + images * info.tokens_per_image
        stages.append({
            "stage": info.stage,
            "first_layer": info.first_layer,
            "last_layer": info.end_layer - 1,
            "grid": list(info.grid),
            "vision_tokens_per_image": info.tokens_per_image,
            "tokens": tokens,
            "flops": info.num_layers * layer_flops(spec, tokens),
            "kv_bytes": info.num_layers * layer_kv_bytes(spec, tokens, dtype_bytes),
        })
        layers += [{"layer": i, "tokens": tokens} for i in range(info.first_layer, info.end_layer)]

    full_tokens = stages[0]["tokens"]
    baseline_flops = spec.num_layers * layer_flops(spec, full_tokens)
    baseline_kv = spec.num_layers * layer_kv_bytes(spec, full_tokens, dtype_bytes)
    adsc_flops = sum(s["flops"] for s in stages)
    adsc_kv = sum(s["kv_bytes"] for s in stages)

    vis = images * vision_flops(spec)
    head = lm_head_flops(spec, 1)
    prefill = {
        "vision_flops": vis,
        "vision_flops_per_image": vision_flops(spec),
        "lm_head_flops": head,
        "baseline_flops": vis + baseline_flops + head,
        "adsc_flops": vis + adsc_flops + head,
    }
    prefill["speedup"] = prefill["baseline_flops"] / prefill["adsc_flops"]

    # KV bytes of one token in one layer; decode step s reads (stage tokens + s) of them per layer.
    per_tok = layer_kv_bytes(spec, 1, dtype_bytes)
    steps = new_tokens - 1
    mean_new = (1 + steps) / 2  # generated tokens cached at the average step
    base_tok = spec.num_layers * full_tokens
    adsc_tok = sum(s["tokens"] * (s["last_layer"] - s["first_layer"] + 1) for s in stages)
    weights = decode_weight_bytes(spec, dtype_bytes)
    decode = {
        "batch": decode_batch,
        "new_tokens": new_tokens,
        "steps": steps,
        "weights_bytes": weights,
        "baseline_kv_bytes": decode_batch * per_tok * (base_tok + spec.num_layers * mean_new),
        "adsc_kv_bytes": decode_batch * per_tok * (adsc_tok + spec.num_layers * mean_new),
        "baseline_kv_bytes_end": decode_batch * per_tok * (base_tok + spec.num_layers * new_tokens),
        "adsc_kv_bytes_end": decode_batch * per_tok * (adsc_tok + spec.num_layers * new_tokens),
    }
    decode["baseline_bytes"] = weights + decode["baseline_kv_bytes"]
    decode["adsc_bytes"] = weights + decode["adsc_kv_bytes"]
    decode["speedup"] = decode["baseline_bytes"] / decode["adsc_bytes"]
    decode["kv_end_reduction_pct"] = 100.0 * (1 - decode["adsc_kv_bytes_end"] / decode["baseline_kv_bytes_end"])
    return {
        "model": spec.name,
        "schedule": str(schedule),
        "text_tokens": text_tokens,
        "images": images,
        "dtype_bytes": dtype_bytes,
        "stages": stages,
        "layers": layers,
        "baseline_flops": baseline_flops,
        "adsc_flops": adsc_flops,
        "baseline_kv_bytes": baseline_kv,
        "adsc_kv_bytes": adsc_kv,
        "flops_reduction_pct": 100.0 * (1 - adsc_flops / baseline_flops),
        "kv_reduction_pct": 100.0 * (1 - adsc_kv / baseline_kv),
        "ideal_speedup": baseline_flops / adsc_flops,
        "prefill": prefill,
        "decode": decode,
    }


def format_section8(report: Mapping[str, Any]) -> list[str]:
    """The lines ``adsc plan`` prints for spec section 8's two other ratios."""
    pre, dec = report["prefill"], report["decode"]
    gib = 2.0**30
    return [
        f"whole prefill per request (vision tower + projector {pre['vision_flops'] / 1e12:.3f} TFLOPs, "
        f"decoder, LM head {pre['lm_head_flops'] / 1e12:.4f} TFLOPs): {pre['baseline_flops'] / 1e12:.3f} vs "
        f"{pre['adsc_flops'] / 1e12:.3f} TFLOPs, ideal time-to-first-token speed-up {pre['speedup']:.2f}x",
        f"one decode step, batch {dec['batch']}, {dec['new_tokens']} new tokens (mean over {dec['steps']} steps): "
        f"weights {dec['weights_bytes'] / gib:.2f} GiB + KV {dec['baseline_kv_bytes'] / gib:.2f} vs "
        f"{dec['adsc_kv_bytes'] / gib:.2f} GiB read, ideal decode speed-up {dec['speedup']:.2f}x",
    ]
