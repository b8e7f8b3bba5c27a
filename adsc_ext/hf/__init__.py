"""ADSC for Hugging Face transformers' LLaVA-1.5 (module hooks over transformers' own forward)."""

from ..models.llava import AdscInputError, AdscModelError
from ._compat import enable_checkpointing
from .cache import AdscCache, AdscCacheState
from .hooks import AdscLayout, AdscSetup, adsc_layout, adsc_setup, apply_adsc, is_adsc_model, remove_adsc

__all__ = [
    "AdscCache",
    "AdscCacheState",
    "AdscInputError",
    "AdscLayout",
    "AdscModelError",
    "AdscSetup",
    "adsc_layout",
    "adsc_setup",
    "apply_adsc",
    "enable_checkpointing",
    "is_adsc_model",
    "remove_adsc",
]
