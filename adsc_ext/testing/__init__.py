"""Test fixtures: small random-weight models built from configs, and a stand-in processor.

Nothing here is on the runtime's import path (``adsc_ext.hf``, ``adsc_ext.runtime`` and
``adsc_ext.export`` never import it; ``tests/test_imports.py`` checks that): it serves the tests,
the examples, ``adsc bench`` and the ``--random`` model of ``adsc generate`` / ``adsc export``.

- :mod:`adsc_ext.testing.llava`: LLaVA-1.5 (CLIP vision tower + LLaMA decoder);
- :mod:`adsc_ext.testing.llava_next`: LLaVA-NeXT (CLIP + Mistral / LLaMA) and LLaVA-OneVision
  (SigLIP + Qwen2) with their real processors (imported on its own: ``from
  adsc_ext.testing.llava_next import tiny_llava_onevision``).
- :mod:`adsc_ext.testing.checkpoint`: a tiny LLaVA saved to a folder with a real (byte-level BPE)
  tokenizer, a ``LlavaProcessor`` and a LLaVA-1.5 chat template (``build_tiny_checkpoint``).
"""

from .llava import TinyProcessor, build_llava, llava15_7b_config, tiny_llava, tiny_llava_config

__all__ = ["tiny_llava_config", "tiny_llava", "build_llava", "TinyProcessor", "llava15_7b_config"]
