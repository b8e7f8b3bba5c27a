"""Efficiency accounting of ADSC (spec section 7): decoder FLOPs and KV-cache bytes of one prefill,
the whole prefill's FLOPs (vision tower, projector, decoder, LM head), and the bytes one decode step
reads (weights + KV cache).

Architectures (:data:`ARCHITECTURES`): LLaVA-1.5 (``llava``: every image a fixed grid), LLaVA-NeXT
and LLaVA-OneVision (``llava_next``, ``llava_onevision``: anyres crops, a base grid plus a
high-resolution grid whose rows end with a newline token), Qwen2-VL, Qwen2.5-VL and Qwen3-VL
(``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``: the image resized to whole merged patches). Except
for LLaVA-1.5 an image's tokens depend on its size in pixels (:func:`image_tokens`, from the
geometry in :mod:`adsc_ext.image_grids`), so a report is for images of one size.

Counting rules, chosen to match what ``torch.utils.flop_counter.FlopCounterMode`` reports for a
real forward with eager attention (the tests check this on small models of every architecture;
on the CPU the counter does not count SDPA, research note section 5):

- decoder layers only: no embeddings, no final norm, no ``lm_head``;
- 2 FLOPs per multiply-add; a layer with ``n`` tokens alive does ``2 * n * (weights)`` for its
  q/k/v/o projections (k and v are ``num_kv_heads * head_dim`` wide: GQA-aware) and its
  gate/up/down MLP projections (biases, norms, Qwen3's q/k norms and M-RoPE count nothing);
- attention is dense: ``2 * n * n * head_dim * num_heads`` for the scores plus the same for the
  values, as the counter counts SDPA/bmm whatever the causal mask skips;
- norms, activations, RoPE and softmax are not matmuls, so they count nothing;
- KV cache: each layer stores K and V for the tokens alive at that layer.

The whole prefill (what time to first token pays, spec section 8), per request, adds to the
decoder:

- the **vision tower and projector** per image, which ADSC does not shrink
  (:func:`vision_flops`): CLIP / SigLIP towers (LLaVA-1.5, NeXT, OneVision) per crop -- the patch
  embedding (a convolution, ``2 * patches * 3 * patch**2 * hidden_v``), every encoder layer
  (transformers runs all of them and then picks ``vision_feature_layer``; CLIP's CLS token too),
  SigLIP's pooling head if the config has one, and the projector ``hidden_v -> hidden -> hidden``
  on every crop's patch tokens; Qwen ViTs per image -- the patch embedding, every block (Qwen2.5-VL:
  windowed attention except in its full-attention blocks, each window dense), the patch merger
  (and Qwen3-VL's DeepStack mergers);
- the **LM head** on the last prompt token (the first generated token needs only it).

One **decode step** reads (spec section 8's decode ratio): every weight of the decoder layers (their
projections, biases and norms), the final norm and the LM head, once per step whatever the batch (the
embedding rows and the vision tower are not read), plus, per sequence and layer, K and V of every
cached token. Step ``s = 1 .. new_tokens - 1`` (the first token comes from the prefill) attends to
the stage's prompt tokens plus ``s`` generated ones; the report averages over the steps.

Pure Python on purpose: ``adsc plan`` must work without torch kernels, the compiled extension or
transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from adsc_ext.errors import AdscInputError, ModelSpecError
from adsc_ext.image_grids import anyres_layout, anyres_max_crops, qwen_resize
from adsc_ext.schedule import LLAVA15_DEFAULT, Schedule, ScheduleError

__all__ = [
    "ModelSpecError",
    "VisionSpec",
    "ModelSpec",
    "ImageTokens",
    "ARCHITECTURES",
    "DEFAULT_IMAGE_SIZE",
    "PRESETS",
    "load_model_spec",
    "spec_from_config",
    "image_tokens",
    "parse_image_size",
    "layer_flops",
    "layer_kv_bytes",
    "vision_flops",
    "lm_head_flops",
    "decode_weight_bytes",
    "plan_report",
    "describe_image",
    "format_section8",
]

#: model_type -> what it is (the architectures adsc plan accounts)
ARCHITECTURES: Dict[str, str] = {
    "llava": "LLaVA-1.5",
    "llava_next": "LLaVA-NeXT",
    "llava_onevision": "LLaVA-OneVision",
    "qwen2_vl": "Qwen2-VL",
    "qwen2_5_vl": "Qwen2.5-VL",
    "qwen3_vl": "Qwen3-VL",
}
_ANYRES = ("llava_next", "llava_onevision")
_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
#: The image size (height, width) in pixels a report assumes unless told: a 640 x 480 photo.
DEFAULT_IMAGE_SIZE = (480, 640)


@dataclass(frozen=True)
class VisionSpec:
    """The shape of a model's vision tower and its projector.

    ``kind``: ``"clip"`` (a CLS token runs through every layer; LLaVA-1.5, NeXT), ``"siglip"`` (no
    CLS; OneVision; ``head``: SigLIP's attention-pooling head runs too), or a Qwen ViT
    (``"qwen2_vl"``: plain MLP; ``"qwen2_5_vl"``: SwiGLU MLP, window attention of ``window_size``
    pixels except in ``full_attention_blocks``; ``"qwen3_vl"``: plain MLP, ``deepstack`` extra
    mergers), which take patches of ``temporal_patch_size x patch_size^2`` pixels, merge
    ``merge_size x merge_size`` of them into one token of ``out_hidden_size``, and resize images
    to ``[min_pixels, max_pixels]``. ``image_size`` is a CLIP / SigLIP tower's input side.

    Defaults are CLIP ViT-L/14 at 336 px, LLaVA-1.5's tower."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    kind: str = "clip"
    head: bool = False
    temporal_patch_size: int = 1
    merge_size: int = 1
    out_hidden_size: int = 0
    window_size: int = 0
    full_attention_blocks: Tuple[int, ...] = ()
    deepstack: int = 0
    min_pixels: int = 0
    max_pixels: int = 0

    @property
    def patches(self) -> int:
        """Patches of one crop of a CLIP / SigLIP tower."""
        return (self.image_size // self.patch_size) ** 2

    @property
    def qwen(self) -> bool:
        return self.kind in _QWEN


@dataclass(frozen=True)
class ModelSpec:
    """The shape of a multimodal model's language decoder and of its images (and, for the whole
    prefill and the decode-step bytes, its vocabulary and vision tower).

    ``grid``: the one ``(height, width)`` grid of every LLaVA-1.5 image (raster order); the base
    crop's grid of an anyres model; None for Qwen (each image its own). ``arch``: a key of
    :data:`ARCHITECTURES`. ``pinpoints`` / ``max_crops``: an anyres model's
    ``image_grid_pinpoints`` and OneVision's ``anyres_max_N``. ``attention_bias``, ``output_bias``,
    ``mlp_bias``, ``qk_norm``: q/k/v biases (Qwen2; LLaMA's ``attention_bias``), the o_proj bias
    (LLaMA's and Qwen3's ``attention_bias``), gate/up/down biases (LLaMA's ``mlp_bias``) and q/k
    RMSNorms (Qwen3): weights a decode step reads."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    #: Vision tokens of one image as ``(height, width)``, in raster order (None: per image).
    grid: Optional[Tuple[int, int]]
    vocab_size: int = 32064
    vision: VisionSpec = VisionSpec()
    arch: str = "llava"
    pinpoints: Tuple[Tuple[int, int], ...] = ()
    max_crops: Optional[int] = None
    attention_bias: bool = False
    qk_norm: bool = False
    output_bias: bool = False
    mlp_bias: bool = False
    #: the schedule a checkpoint's config stores (``adsc_schedule``), if any
    adsc_schedule: Optional[str] = None

    def __post_init__(self) -> None:
        for attr in ("hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            _check_positive(f"{self.name}: {attr}", getattr(self, attr))
        if self.num_heads % self.num_kv_heads:
            raise ModelSpecError(
                f"{self.name}: num_heads ({self.num_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.arch not in ARCHITECTURES:
            raise ModelSpecError(f"{self.name}: arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}")
        if self.grid is None:
            if self.arch not in _QWEN:
                raise ModelSpecError(f"{self.name}: a {ARCHITECTURES[self.arch]} model needs its image grid")
        else:
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
        if self.arch in _ANYRES and not self.pinpoints:
            raise ModelSpecError(f"{self.name}: an anyres model needs its image_grid_pinpoints")
        if v.qwen:
            for attr in ("temporal_patch_size", "merge_size", "out_hidden_size", "min_pixels", "max_pixels"):
                _check_positive(f"{self.name}: vision {attr}", getattr(v, attr))

    def default_schedule(self) -> str:
        """The schedule a model runs unless told (spec section 2): the config's ``adsc_schedule``,
        else ``8:2,16:2,24:2`` for LLaVA-1.5, else factor 2 before layers ``round(L/4)``,
        ``round(L/2)``, ``round(3L/4)`` (:func:`adsc_ext.models.default_schedule`)."""
        if self.adsc_schedule is not None:
            return self.adsc_schedule
        if self.arch == "llava":
            return LLAVA15_DEFAULT
        from adsc_ext.models.base import default_schedule

        return default_schedule(self.num_layers)

    @property
    def tokens_per_image(self) -> int:
        """Vision tokens of one image before any downsampling (LLaVA-1.5's fixed grid; for the
        other architectures it depends on the image: :func:`image_tokens`)."""
        if self.arch != "llava":
            raise ModelSpecError(f"{self.name}: a {ARCHITECTURES[self.arch]} image's tokens depend on its size; "
                                 f"use image_tokens(spec, (height, width))")
        return self.grid[0] * self.grid[1]


def _check_positive(what: str, value: Any) -> None:
    # bool is an int subclass; a JSON `true` must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ModelSpecError(f"{what} must be a positive integer, got {value!r}")


# ---- presets: the released 7B-class checkpoints -----------------------------------------------

# Both LLaVA-1.5 models use CLIP ViT-L/14 at 336 px (336 / 14 = 24 x 24 patches, CLS dropped)
# and a Vicuna-v1.5 (LLaMA-2) decoder without GQA.
_LLAVA15_GRID = (24, 24)
# llava-hf/llava-v1.6-*: the same CLIP tower; crops of 1x2, 2x1, 2x2, 3x1, 1x3 (336 px each).
_NEXT_PINPOINTS = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
# llava-hf/llava-onevision-qwen2-7b-ov-hf: SigLIP-so400m (26 layers kept, no head) at 384 px, every
# 1..6 x 1..6 crops, anyres_max_9; Qwen2-7B-Instruct with its vocabulary padded by the conversion
# (152064 + <image>, <video> -> a multiple of 64: 152128).
_OV_PINPOINTS = tuple((384 * i, 384 * j) for i in range(1, 7) for j in range(1, 7))
_SIGLIP_SO400M = VisionSpec(1152, 4304, 26, 16, 384, 14, kind="siglip")
# Qwen2-VL-7B / Qwen2.5-VL-7B (-Instruct) and Qwen3-VL-8B-Instruct: config.json and
# preprocessor_config.json (min / max pixels) of the releases.
_QWEN2_VIT = VisionSpec(1280, 5120, 32, 16, 28, 14, kind="qwen2_vl", temporal_patch_size=2, merge_size=2,
                        out_hidden_size=3584, min_pixels=3136, max_pixels=12845056)
_QWEN25_VIT = VisionSpec(1280, 3420, 32, 16, 28, 14, kind="qwen2_5_vl", temporal_patch_size=2, merge_size=2,
                         out_hidden_size=3584, window_size=112, full_attention_blocks=(7, 15, 23, 31),
                         min_pixels=3136, max_pixels=12845056)
_QWEN3_VIT = VisionSpec(1152, 4304, 27, 16, 32, 16, kind="qwen3_vl", temporal_patch_size=2, merge_size=2,
                        out_hidden_size=4096, deepstack=3, min_pixels=65536, max_pixels=16777216)
PRESETS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("llava-1.5-7b", 4096, 11008, 32, 32, 32, 128, _LLAVA15_GRID, 32064, VisionSpec()),
        ModelSpec("llava-1.5-13b", 5120, 13824, 40, 40, 40, 128, _LLAVA15_GRID, 32064, VisionSpec()),
        ModelSpec("llava-v1.6-mistral-7b", 4096, 14336, 32, 32, 8, 128, _LLAVA15_GRID, 32064, VisionSpec(),
                  arch="llava_next", pinpoints=_NEXT_PINPOINTS),
        ModelSpec("llava-v1.6-vicuna-7b", 4096, 11008, 32, 32, 32, 128, _LLAVA15_GRID, 32064, VisionSpec(),
                  arch="llava_next", pinpoints=_NEXT_PINPOINTS),
        ModelSpec("llava-onevision-qwen2-7b", 3584, 18944, 28, 28, 4, 128, (27, 27), 152128, _SIGLIP_SO400M,
                  arch="llava_onevision", pinpoints=_OV_PINPOINTS, max_crops=9, attention_bias=True),
        ModelSpec("qwen2-vl-7b", 3584, 18944, 28, 28, 4, 128, None, 152064, _QWEN2_VIT, arch="qwen2_vl",
                  attention_bias=True),
        ModelSpec("qwen2.5-vl-7b", 3584, 18944, 28, 28, 4, 128, None, 152064, _QWEN25_VIT, arch="qwen2_5_vl",
                  attention_bias=True),
        ModelSpec("qwen3-vl-8b", 4096, 12288, 36, 32, 8, 128, None, 151936, _QWEN3_VIT, arch="qwen3_vl",
                  qk_norm=True),
    )
}

# ---- config.json -------------------------------------------------------------------------------

# What transformers fills in for a key a config.json leaves out: the defaults of the config class of
# each sub-model's model_type (tests/test_accounting.py checks them against transformers). A
# text_config without model_type is a LLaMA one, as in LlavaConfig. LLaVA-1.5's own config.json
# spells every vision size out; CLIP's defaults are ViT-B/32 at 224 px.
_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "llama": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
              "vocab_size": 32000},
    "mistral": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                "num_key_value_heads": 8, "vocab_size": 32000},
    "qwen2": {"hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 151936},
    "qwen2_vl_text": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064},
    "qwen2_5_vl_text": {"hidden_size": 8192, "intermediate_size": 29568, "num_hidden_layers": 80,
                        "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 152064},
    "qwen3_vl_text": {"hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
                      "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 151936,
                      "attention_bias": False},
    "clip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                          "num_attention_heads": 12},
    "siglip_vision_model": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                            "num_attention_heads": 12, "image_size": 224, "patch_size": 16, "vision_use_head": True},
    "qwen2_vl_vision": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16, "hidden_size": 3584,
                        "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
    "qwen2_5_vl_vision": {"depth": 32, "hidden_size": 3584, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
    "qwen3_vl_vision": {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
                        "out_hidden_size": 3584, "patch_size": 16, "spatial_merge_size": 2,
                        "temporal_patch_size": 2, "deepstack_visual_indexes": [8, 16, 24]},
}
# The sub-configs' model_type when a config leaves it out (the composite config classes' defaults).
_SUB_TYPES = {
    "llava": ("llama", "clip_vision_model"),
    "llava_next": ("llama", "clip_vision_model"),
    "llava_onevision": ("qwen2", "siglip_vision_model"),
    "qwen2_vl": ("qwen2_vl_text", "qwen2_vl_vision"),
    "qwen2_5_vl": ("qwen2_5_vl_text", "qwen2_5_vl_vision"),
    "qwen3_vl": ("qwen3_vl_text", "qwen3_vl_vision"),
}
# LlavaOnevisionConfig's vision tower when config.json has no vision_config at all.
_OV_VISION = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304, "patch_size": 14,
              "image_size": 384, "num_hidden_layers": 26, "num_attention_heads": 16, "vision_use_head": False}
# The processors' pixel limits where no preprocessor_config.json says (the releases' values).
_QWEN_PIXELS = {"qwen2_vl": (3136, 12845056), "qwen2_5_vl": (3136, 12845056), "qwen3_vl": (65536, 16777216)}


class _Reader:
    """Reads one section of a config dict with its defaults; errors name the config and key."""

    def __init__(self, name: str, section: Mapping[str, Any], where: str, defaults: Mapping[str, Any]):
        self.name, self.section, self.where, self.defaults = name, section, where, defaults

    def int(self, key: str, default: Any = None) -> int:
        value = self.section.get(key)
        if value is None:  # configs write `null` for "use the default" (e.g. head_dim)
            value = self.defaults.get(key, default)
            if value is None:
                raise ModelSpecError(f"{self.name}: missing {self.where}.{key}")
            return value
        _check_positive(f"{self.name}: {self.where}.{key}", value)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self.section.get(key)
        return self.defaults.get(key, default) if value is None else value


def _sections(config: Mapping[str, Any], name: str, arch: str) -> Tuple[Mapping[str, Any], str, Mapping[str, Any], str]:
    """``(text_config, its model_type, vision_config, its model_type)`` of a LLaVA-style config."""
    text, vision = config.get("text_config"), config.get("vision_config")
    if not isinstance(text, Mapping) or not isinstance(vision, Mapping):
        raise ModelSpecError(f"{name}: a {'LLaVA' if arch == 'llava' else ARCHITECTURES[arch]}-style config needs "
                             f"'text_config' and 'vision_config'")
    text_type, vision_type = _SUB_TYPES[arch]
    return text, str(text.get("model_type") or text_type), vision, str(vision.get("model_type") or vision_type)


def spec_from_config(config: Mapping[str, Any], name: str, *, preprocessor: Optional[Mapping[str, Any]] = None
                     ) -> ModelSpec:
    """Describe a model from its config.json dict: a LlavaConfig-style one (``text_config`` +
    ``vision_config``; ``model_type`` ``llava``, ``llava_next``, ``llava_onevision``, or none) or a
    Qwen-VL one (``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``; text keys in ``text_config`` or, as
    the released Qwen2-VL / Qwen2.5-VL files have them, at the top level). ``preprocessor``: the
    checkpoint's ``preprocessor_config.json`` (a Qwen model's pixel limits; else the releases')."""
    arch = config.get("model_type") or "llava"
    if arch not in ARCHITECTURES:
        arch = "llava"  # a LLaVA-style config of another name: read as LLaVA-1.5, as before
    if arch in _QWEN:
        return _qwen_spec(config, name, arch, preprocessor or {})
    if arch == "llava_onevision" and config.get("vision_config") is None:
        config = {**config, "vision_config": _OV_VISION}
    text, text_type, vision, vision_type = _sections(config, name, arch)
    has_cls = vision_type != "siglip_vision_model"
    strategy = config.get("vision_feature_select_strategy", "full" if arch == "llava_onevision" else "default")
    if (strategy == "default") != has_cls:
        # each crop must be a side x side grid: CLIP drops its CLS token with 'default'; SigLIP has none
        want = "'default' (CLS dropped)" if has_cls else "'full' (SigLIP has no CLS token)"
        raise ModelSpecError(f"{name}: with a {vision_type} tower vision_feature_select_strategy must be {want}, "
                             f"got {strategy!r}")
    t = _Reader(name, text, "text_config", _DEFAULTS.get(text_type, {}))
    v = _Reader(name, vision, "vision_config", _DEFAULTS.get(vision_type, {}))
    hidden, heads = t.int("hidden_size"), t.int("num_attention_heads")
    if text.get("head_dim") is None and t.defaults.get("head_dim") is None and hidden % heads:
        raise ModelSpecError(
            f"{name}: text_config.hidden_size ({hidden}) is not a multiple of num_attention_heads "
            f"({heads}); give text_config.head_dim"
        )
    side = v.int("image_size") // v.int("patch_size")
    if side < 1:
        raise ModelSpecError(f"{name}: vision_config.image_size is smaller than its patch_size")
    vision_spec = VisionSpec(
        hidden_size=v.int("hidden_size"), intermediate_size=v.int("intermediate_size"),
        num_layers=v.int("num_hidden_layers"), num_heads=v.int("num_attention_heads"),
        image_size=v.int("image_size"), patch_size=v.int("patch_size"),
        kind="clip" if has_cls else "siglip", head=bool(v.get("vision_use_head", False)) and not has_cls,
    )
    extra: Dict[str, Any] = {}
    if arch in _ANYRES:
        tower = vision_spec.image_size
        pins = config.get("image_grid_pinpoints")
        if pins is None:
            pins = _NEXT_PINPOINTS if arch == "llava_next" else tuple(
                (tower * i, tower * j) for i in range(1, 7) for j in range(1, 7))
        try:
            pins = tuple((int(h), int(w)) for h, w in pins)
        except (TypeError, ValueError):
            raise ModelSpecError(f"{name}: image_grid_pinpoints must be [height, width] pairs, got {pins!r}") from None
        odd = [p for p in pins if p[0] % tower or p[1] % tower or min(p) < tower]
        if odd:
            raise ModelSpecError(f"{name}: image_grid_pinpoints must be whole {tower}-pixel crops, got {odd}")
        extra["pinpoints"] = pins
        if arch == "llava_onevision":
            try:
                extra["max_crops"] = anyres_max_crops(config.get("vision_aspect_ratio", "anyres_max_9"))
            except ValueError as exc:
                raise ModelSpecError(f"{name}: {exc}") from None
    return ModelSpec(
        name=name,
        hidden_size=hidden,
        intermediate_size=t.int("intermediate_size"),
        num_layers=t.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=t.int("num_key_value_heads", heads),
        head_dim=t.int("head_dim", hidden // heads),
        grid=(side, side),
        vocab_size=t.int("vocab_size", 32000),
        vision=vision_spec,
        arch=arch,
        **_biases(text_type, t),
        adsc_schedule=_stored_schedule(config, name),
        **extra,
    )


def _qwen_spec(config: Mapping[str, Any], name: str, arch: str, preprocessor: Mapping[str, Any]) -> ModelSpec:
    text_type, vision_type = _SUB_TYPES[arch]
    text = config.get("text_config")
    if not isinstance(text, Mapping):  # the released Qwen2-VL / Qwen2.5-VL files: text keys at the top
        text = config
    vision = config.get("vision_config")
    if not isinstance(vision, Mapping):
        vision = {}
    t = _Reader(name, text, "text_config", _DEFAULTS[text_type])
    v = _Reader(name, vision, "vision_config", _DEFAULTS[vision_type])
    hidden, heads = t.int("hidden_size"), t.int("num_attention_heads")
    head_dim = t.int("head_dim", hidden // heads) if arch == "qwen3_vl" or text.get("head_dim") else hidden // heads
    if arch == "qwen2_vl":
        width = v.int("embed_dim")
        mlp = int(width * v.get("mlp_ratio"))
        out = v.int("hidden_size")
    else:
        width, mlp, out = v.int("hidden_size"), v.int("intermediate_size"), v.int("out_hidden_size")
    patch, merge = v.int("patch_size"), v.int("spatial_merge_size")
    size = preprocessor.get("size") if isinstance(preprocessor.get("size"), Mapping) else {}
    lo, hi = _QWEN_PIXELS[arch]
    min_pixels = preprocessor.get("min_pixels") or size.get("shortest_edge") or lo
    max_pixels = preprocessor.get("max_pixels") or size.get("longest_edge") or hi
    vision_spec = VisionSpec(
        hidden_size=width, intermediate_size=mlp, num_layers=v.int("depth"), num_heads=v.int("num_heads"),
        image_size=patch * merge, patch_size=patch, kind=arch, temporal_patch_size=v.int("temporal_patch_size"),
        merge_size=merge, out_hidden_size=out,
        window_size=v.int("window_size") if arch == "qwen2_5_vl" else 0,
        full_attention_blocks=tuple(int(b) for b in v.get("fullatt_block_indexes", ())) if arch == "qwen2_5_vl" else (),
        deepstack=len(v.get("deepstack_visual_indexes", ())) if arch == "qwen3_vl" else 0,
        min_pixels=int(min_pixels), max_pixels=int(max_pixels),
    )
    return ModelSpec(
        name=name, hidden_size=hidden, intermediate_size=t.int("intermediate_size"),
        num_layers=t.int("num_hidden_layers"), num_heads=heads, num_kv_heads=t.int("num_key_value_heads", heads),
        head_dim=head_dim, grid=None, vocab_size=t.int("vocab_size"), vision=vision_spec, arch=arch,
        qk_norm=arch == "qwen3_vl", **_biases(text_type, t),
        adsc_schedule=_stored_schedule(config, name),
    )


def _biases(text_type: str, t: "_Reader") -> Dict[str, bool]:
    """The bias vectors a decoder layer of this text model_type has (transformers' modules: Qwen2's
    q/k/v always; Mistral's never; LLaMA's and Qwen3's q/k/v/o with ``attention_bias``, LLaMA's MLP
    with ``mlp_bias``)."""
    if text_type in ("qwen2", "qwen2_vl_text", "qwen2_5_vl_text"):
        return dict(attention_bias=True, output_bias=False, mlp_bias=False)
    if text_type == "mistral":
        return dict(attention_bias=False, output_bias=False, mlp_bias=False)
    bias = bool(t.get("attention_bias", False))
    return dict(attention_bias=bias, output_bias=bias,
                mlp_bias=text_type != "qwen3_vl_text" and bool(t.get("mlp_bias", False)))


def _stored_schedule(config: Mapping[str, Any], name: str) -> Optional[str]:
    """The config's ``adsc_schedule`` (what apply_adsc stores), checked to parse."""
    text = config.get("adsc_schedule")
    if text is None:
        return None
    try:
        return str(Schedule.parse(text)) if isinstance(text, str) else str(Schedule.coerce(text))
    except ScheduleError as exc:
        raise ScheduleError(f"{name}: its adsc_schedule {text!r} is not a schedule: {exc}") from None


def _read_json(path: Path) -> Mapping[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelSpecError(f"cannot read {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ModelSpecError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, Mapping):
        raise ModelSpecError(f"{path}: a JSON object is expected")
    return config


def load_model_spec(name_or_path: Union[str, Path]) -> ModelSpec:
    """A preset name (see :data:`PRESETS`), a config.json path, or a directory holding one (a
    ``preprocessor_config.json`` beside it gives a Qwen model's pixel limits)."""
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
    config = _read_json(path)
    pre = path.parent / "preprocessor_config.json"
    return spec_from_config(config, str(path), preprocessor=_read_json(pre) if pre.is_file() else None)


# ---- images ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageTokens:
    """What one image of ``height x width`` pixels becomes in a model.

    grids: ``(h, w, newline)`` of each grid ADSC downsamples, in sequence order (LLaVA-1.5 and Qwen:
    one; anyres: the base grid, then the high-resolution grid with a newline token ending each row).
    text_tokens: placeholder tokens outside every grid, kept like text (OneVision's trailing newline).
    crops: vision-tower inputs (anyres crops, base included; 1 otherwise). resized: the pixels a
    Qwen processor resizes it to. multi_image: a OneVision item of a multi-image prompt."""

    height: int
    width: int
    grids: Tuple[Tuple[int, int, int], ...]
    text_tokens: int = 0
    crops: int = 1
    resized: Optional[Tuple[int, int]] = None
    multi_image: bool = False

    @property
    def tokens(self) -> int:
        """The image's placeholder tokens in the prompt."""
        return sum(h * (w + nl) for h, w, nl in self.grids) + self.text_tokens


def parse_image_size(text: str) -> Tuple[int, int]:
    """``"WIDTHxHEIGHT"`` (e.g. ``"640x480"``, as screens and PIL give a size) as ``(height, width)``."""
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        width, height = (int(p) for p in parts)
    except ValueError:
        raise AdscInputError(f"an image size is WIDTHxHEIGHT in pixels, e.g. 640x480; got {text!r}") from None
    if width < 1 or height < 1:
        raise AdscInputError(f"an image size needs positive sides, got {text!r}")
    return height, width


def image_tokens(spec: ModelSpec, image_size: Optional[Sequence[int]] = None, *,
                 multi_image: bool = False) -> ImageTokens:
    """The :class:`ImageTokens` of an image of ``image_size = (height, width)`` pixels (default
    :data:`DEFAULT_IMAGE_SIZE`) in ``spec``'s model; ``multi_image``: a OneVision item of a
    multi-image prompt (its base crop alone)."""
    height, width = (int(v) for v in (image_size or DEFAULT_IMAGE_SIZE))
    if height < 1 or width < 1:
        raise AdscInputError(f"an image size needs positive sides, got {height}x{width} (height x width)")
    if spec.arch == "llava":  # resized to the tower's square input: one fixed grid
        return ImageTokens(height, width, ((spec.grid[0], spec.grid[1], 0),))
    v = spec.vision
    if spec.arch in _ANYRES:
        lay = anyres_layout((height, width), spec.pinpoints, v.image_size, v.patch_size, max_crops=spec.max_crops,
                            multi_image=multi_image and spec.arch == "llava_onevision")
        return ImageTokens(height, width, tuple(lay.grids), lay.text_tokens, lay.crops,
                           multi_image=lay.hires is None)
    factor = v.patch_size * v.merge_size
    try:
        rh, rw = qwen_resize(height, width, factor, v.min_pixels, v.max_pixels)
    except ValueError as exc:
        raise AdscInputError(f"{spec.name}: {exc}") from None
    return ImageTokens(height, width, ((rh // factor, rw // factor, 0),), resized=(rh, rw))


# ---- FLOPs and bytes ---------------------------------------------------------------------------


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


def _vit_layer_flops(n: int, d: int, mlp: int, mlp_mats: int = 2) -> int:
    """One ViT encoder layer on ``n`` tokens: q/k/v/o (``4 d^2``), an MLP of ``mlp_mats`` matrices
    ``d x mlp``, dense attention (scores + values)."""
    return 2 * n * (4 * d * d + mlp_mats * d * mlp) + 2 * (2 * n * n * d)


def _crop_flops(spec: ModelSpec) -> int:
    """A CLIP / SigLIP tower and the projector on one crop."""
    v = spec.vision
    p = v.patches
    n = p + 1 if v.kind == "clip" else p  # CLIP's CLS token runs through every encoder layer
    patch_embed = 2 * p * 3 * v.patch_size * v.patch_size * v.hidden_size
    tower = patch_embed + v.num_layers * _vit_layer_flops(n, v.hidden_size, v.intermediate_size)
    if v.head:  # SigLIP's attention pooling: one probe query over the patches, then an MLP on it
        d = v.hidden_size
        tower += 2 * d * d + 2 * p * 2 * d * d + 2 * (2 * p * d) + 2 * d * d + 2 * 2 * d * v.intermediate_size
    projector = 2 * p * (v.hidden_size * spec.hidden_size + spec.hidden_size * spec.hidden_size)
    return tower + projector


def _qwen_vit_flops(spec: ModelSpec, gh: int, gw: int) -> int:
    """A Qwen ViT and its merger(s) on one image of ``gh x gw`` merged tokens."""
    v = spec.vision
    m, d = v.merge_size, v.hidden_size
    h, w = gh * m, gw * m  # patches
    n = h * w
    patch_embed = 2 * n * d * (3 * v.temporal_patch_size * v.patch_size * v.patch_size)
    mlp_mats = 3 if v.kind == "qwen2_5_vl" else 2  # Qwen2.5-VL: SwiGLU; Qwen2-VL, Qwen3-VL: fc1, fc2
    linear = 2 * n * (4 * d * d + mlp_mats * d * v.intermediate_size)
    full = 2 * (2 * n * n * d)
    blocks = v.num_layers * linear
    if v.window_size:  # windows of win x win merged tokens (the edge ones smaller), each dense
        win = v.window_size // m // v.patch_size
        windowed = sum(2 * (2 * (min(win, gh - i) * min(win, gw - j) * m * m) ** 2 * d)
                       for i in range(0, gh, win) for j in range(0, gw, win))
        n_full = sum(1 for b in v.full_attention_blocks if 0 <= b < v.num_layers)
        blocks += n_full * full + (v.num_layers - n_full) * windowed
    else:
        blocks += v.num_layers * full
    md = d * m * m
    merger = 2 * (n // (m * m)) * (md * md + md * v.out_hidden_size)
    return patch_embed + blocks + (1 + v.deepstack) * merger


def vision_flops(spec: ModelSpec, image: Optional[ImageTokens] = None) -> int:
    """FLOPs of the vision tower and the projector for one image (see the module docstring);
    ``image``: its :class:`ImageTokens` (default: :func:`image_tokens` of the default size)."""
    image = image if image is not None else image_tokens(spec)
    if spec.vision.qwen:
        ((gh, gw, _),) = image.grids
        return _qwen_vit_flops(spec, gh, gw)
    return image.crops * _crop_flops(spec)


def lm_head_flops(spec: ModelSpec, n_tokens: int = 1) -> int:
    """FLOPs of the LM head on ``n_tokens`` tokens."""
    return 2 * n_tokens * spec.hidden_size * spec.vocab_size


def decode_weight_bytes(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """Bytes of the weights one decode step reads: the decoder layers (projections, q/k/v biases,
    Qwen3's q/k norms and the two layer norms), the final norm and the LM head."""
    q_width = spec.num_heads * spec.head_dim
    kv_width = spec.num_kv_heads * spec.head_dim
    per_layer = (spec.hidden_size * q_width + 2 * spec.hidden_size * kv_width + q_width * spec.hidden_size
                 + 3 * spec.hidden_size * spec.intermediate_size + 2 * spec.hidden_size)
    if spec.attention_bias:
        per_layer += q_width + 2 * kv_width
    if spec.output_bias:
        per_layer += spec.hidden_size
    if spec.mlp_bias:
        per_layer += 2 * spec.intermediate_size + spec.hidden_size
    if spec.qk_norm:
        per_layer += 2 * spec.head_dim
    return dtype_bytes * (spec.num_layers * per_layer + spec.hidden_size + spec.vocab_size * spec.hidden_size)


def _check_count(what: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise AdscInputError(f"{what} must be an integer >= {minimum}, got {value!r}")


def plan_report(
    spec: ModelSpec,
    schedule: Union[str, Schedule, None],
    text_tokens: int,
    images: int = 1,
    dtype_bytes: int = 2,
    *,
    image_size: Optional[Sequence[int]] = None,
    decode_batch: int = 32,
    new_tokens: int = 256,
) -> dict[str, Any]:
    """Everything ``adsc plan`` prints, for one prefill of ``text_tokens`` + ``images`` images of
    ``image_size = (height, width)`` pixels (default :data:`DEFAULT_IMAGE_SIZE`; LLaVA-1.5 resizes
    every image to its one grid). A OneVision prompt of several images makes each a multi-image
    item (its base crop and one newline), as the model's processor does.

    Returns a JSON-ready dict: the inputs, ``image`` (one image's ``height``, ``width``,
    ``tokens``, ``grids`` as ``[h, w, newline]``, ``text_tokens``, ``crops``, ``resized``,
    ``multi_image``), ``stages`` (one row per stage: ``stage``, ``first_layer``, ``last_layer``,
    ``grid`` (the image's first grid), ``grids`` (all of them, ``[h, w, newline]``),
    ``vision_tokens_per_image``, ``tokens``, ``flops``, ``kv_bytes``), ``layers`` (``{"layer": i,
    "tokens": n}`` per decoder layer), the exact integer totals ``baseline_flops``, ``adsc_flops``,
    ``baseline_kv_bytes``, ``adsc_kv_bytes``, the reductions in percent and ``ideal_speedup``
    (baseline / ADSC FLOPs). The baseline is the same prompt through the unmodified model.

    Spec section 8's two other ratios: ``prefill`` (per request: ``vision_flops``,
    ``lm_head_flops``, ``baseline_flops`` / ``adsc_flops`` of the whole prefill and their ratio
    ``speedup``) and ``decode`` (one step of ``decode_batch`` sequences, averaged over the
    ``new_tokens - 1`` decode steps: ``weights_bytes``, ``baseline_kv_bytes`` / ``adsc_kv_bytes``
    and ``baseline_bytes`` / ``adsc_bytes`` read per step, their ratio ``speedup``; and
    ``*_kv_bytes_end``: the cache of the whole batch after the last token, prompt + generated).
    Raises :class:`~adsc_ext.errors.AdscInputError` (``ScheduleError`` for the schedule) on bad arguments.
    """
    schedule = Schedule.coerce(schedule)
    _check_count("text_tokens", text_tokens, 0)
    _check_count("images", images, 0)
    _check_count("dtype_bytes", dtype_bytes, 1)
    _check_count("decode_batch", decode_batch, 1)
    _check_count("new_tokens", new_tokens, 2)
    if text_tokens + images == 0:
        raise AdscInputError("the prompt is empty: give text tokens or images")
    image = image_tokens(spec, image_size, multi_image=images > 1)
    grids = image.grids
    try:
        stage_infos = schedule.validate(spec.num_layers)
        stage_grids = [schedule.grids(g[:2]) for g in grids]
        stage_image_tokens = [schedule.image_tokens(g[:2], newline=bool(g[2])) for g in grids]
    except ScheduleError as exc:
        where = "" if spec.arch == "llava" else f", a {image.width}x{image.height} image"
        raise ScheduleError(f"{exc} ({spec.name}{where})") from None

    lengths = schedule.stage_lengths(text_tokens + images * image.tokens, list(grids) * images)
    stages, layers = [], []
    for info in stage_infos:
        s, tokens = info.stage, lengths[info.stage]
        stages.append({
            "stage": s,
            "first_layer": info.first_layer,
            "last_layer": info.end_layer - 1,
            "grid": list(stage_grids[0][s]),
            "grids": [[*stage_grids[k][s], g[2]] for k, g in enumerate(grids)],
            "vision_tokens_per_image": sum(t[s] for t in stage_image_tokens) + image.text_tokens,
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

    per_image = vision_flops(spec, image)
    vis = images * per_image
    head = lm_head_flops(spec, 1)
    prefill = {
        "vision_flops": vis,
        "vision_flops_per_image": per_image,
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
        "arch": spec.arch,
        "schedule": str(schedule),
        "text_tokens": text_tokens,
        "images": images,
        "image": {
            "height": image.height, "width": image.width, "tokens": image.tokens,
            "grids": [list(g) for g in grids], "text_tokens": image.text_tokens, "crops": image.crops,
            "resized": list(image.resized) if image.resized else None, "multi_image": image.multi_image,
        },
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


def describe_image(report: Mapping[str, Any]) -> str:
    """One image of a report in words, e.g. ``"640x480 px (27x27 + 40x54 with newlines = 2929
    vision tokens, 5 crops)"``."""
    img = report["image"]
    grids = " + ".join(f"{h}x{w}{' with newlines' if nl else ''}" for h, w, nl in img["grids"])
    extra = f" + {img['text_tokens']} newline{'s' if img['text_tokens'] != 1 else ''}" if img["text_tokens"] else ""
    how = ""
    if img["resized"]:
        how = f", resized to {img['resized'][1]}x{img['resized'][0]}"
    elif img["crops"] > 1 or report.get("arch") in _ANYRES:
        how = f", {img['crops']} crop{'s' if img['crops'] != 1 else ''}"
    if img["multi_image"]:
        how += ", base crop only (a multi-image prompt)"
    if report.get("arch", "llava") == "llava":
        return f"{grids} vision tokens"
    return f"{img['width']}x{img['height']} px ({grids}{extra} = {img['tokens']} vision tokens{how})"


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
