"""Model specs: one description per architecture that every adsc_ext consumer reads.

- :mod:`adsc_ext.models.base`: :class:`ModelSpec` (the interface), :func:`model_spec` (the
  registry, dispatching on the Hugging Face class), the LLaMA-family layer split;
- :mod:`adsc_ext.models.llava`: LLaVA-1.5 (:class:`LlavaSpec`);
- :mod:`adsc_ext.models.llava_next`: LLaVA-NeXT and LLaVA-OneVision (:class:`LlavaNextSpec`);
- :mod:`adsc_ext.models.qwen_vl`: Qwen2-VL, Qwen2.5-VL, Qwen3-VL (:class:`QwenVLSpec`).
"""

from ..errors import AdscInputError, AdscModelError
from .base import (
    ModelSpec,
    apply_rotary,
    attention_inputs,
    attention_output,
    default_schedule,
    model_spec,
    register_model_spec,
    registered_architectures,
    Segment,
    SegmentInputs,
    unwrap,
)
from .llava import (
    LlavaSpec,
    count_images,
    embed_with_images,
    image_features,
    image_runs,
    llava_spec,
    text_model,
)
from .llava_next import LlavaNextSpec, llava_next_spec
from .qwen_vl import QwenVLSpec, qwen_vl_spec

__all__ = [
    "AdscInputError", "AdscModelError", "ModelSpec", "LlavaSpec", "model_spec", "register_model_spec",
    "registered_architectures", "LlavaNextSpec", "llava_next_spec", "default_schedule", "apply_rotary", "attention_inputs", "attention_output",
    "count_images", "embed_with_images", "image_features", "image_runs", "llava_spec",
    "text_model", "unwrap", "QwenVLSpec", "qwen_vl_spec", "Segment", "SegmentInputs",
]
