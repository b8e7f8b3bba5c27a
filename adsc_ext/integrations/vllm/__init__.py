"""ADSC as a vLLM plugin (``pip install "adsc_ext[vllm]"``).

vLLM loads :func:`register` in each of its processes through the ``vllm.general_plugins`` entry
point ``adsc = adsc_ext.integrations.vllm:register``. It registers
:class:`~adsc_ext.integrations.vllm.model.AdscLlavaForConditionalGeneration` for the architecture
``LlavaForConditionalGeneration`` (and under its own name ``AdscLlavaForConditionalGeneration``).
The class is vLLM's LLaVA unchanged unless the checkpoint's config has ``adsc_schedule`` (what
``apply_adsc`` + ``save_pretrained`` write), or the user passes it::

    vllm serve ./llava-adsc                                   # config.json has adsc_schedule
    LLM(model="llava-hf/llava-1.5-7b-hf", hf_overrides={"adsc_schedule": "8:2,16:2,24:2"})

Set ``VLLM_PLUGINS`` to a list without ``adsc`` to run vLLM without the plugin.
"""

from __future__ import annotations

__all__ = ["register", "ARCHITECTURES"]

#: Architectures the plugin serves (the first is vLLM's own LLaVA name, which it takes over).
ARCHITECTURES = ("LlavaForConditionalGeneration", "AdscLlavaForConditionalGeneration")

_MODEL = "adsc_ext.integrations.vllm.model:AdscLlavaForConditionalGeneration"


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent: vLLM may call it more than once)."""
    from vllm import ModelRegistry

    from . import _compat
    from .config import verify_and_update_config

    for arch in ARCHITECTURES:
        ModelRegistry.register_model(arch, _MODEL)
        _compat.register_config_hook(arch, verify_and_update_config)
    from .config import kv_groups_enabled

    if kv_groups_enabled():
        from . import kv_groups

        kv_groups.register()
