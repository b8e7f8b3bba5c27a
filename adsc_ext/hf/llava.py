"""The former name of :mod:`adsc_ext.hf.hooks` (the hooks now serve every architecture with a model
spec, not LLaVA-1.5 alone); kept so that existing imports keep working."""

from .hooks import AdscLayout, AdscSetup, adsc_layout, adsc_setup, apply_adsc, is_adsc_model, remove_adsc  # noqa: F401

__all__ = ["AdscLayout", "AdscSetup", "adsc_layout", "adsc_setup", "apply_adsc", "is_adsc_model", "remove_adsc"]
