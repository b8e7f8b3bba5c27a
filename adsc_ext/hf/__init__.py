"""ADSC integrations for Hugging Face transformers (LLaVA-1.5)."""

from .cache import AdscCache, AdscCacheState, AdscStaticCache
from .llava import (
    AdscInputError,
    AdscLlavaOutput,
    AdscModelError,
    adsc_setup,
    apply_adsc,
    is_adsc_model,
    remove_adsc,
)

__all__ = [
    "AdscCache",
    "AdscCacheState",
    "AdscStaticCache",
    "AdscInputError",
    "AdscLlavaOutput",
    "AdscModelError",
    "adsc_setup",
    "apply_adsc",
    "is_adsc_model",
    "remove_adsc",
]
