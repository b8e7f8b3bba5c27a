"""Model descriptions shared by every adsc_ext consumer (see :mod:`adsc_ext.models.llava`)."""

from .llava import (
    AdscInputError,
    AdscModelError,
    LlavaSpec,
    attention_inputs,
    attention_output,
    count_images,
    embed_with_images,
    image_features,
    image_runs,
    llava_spec,
    resolve_schedule,
    text_model,
    unwrap,
)

__all__ = [
    "AdscInputError", "AdscModelError", "LlavaSpec", "attention_inputs", "attention_output", "count_images",
    "embed_with_images", "image_features", "image_runs", "llava_spec", "resolve_schedule", "text_model", "unwrap",
]
