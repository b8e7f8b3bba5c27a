"""ADSC as a vLLM plugin (adsc_ext's ``[vllm]`` extra).

vLLM loads :func:`register` in each of its processes through the ``vllm.general_plugins`` entry
point ``adsc = adsc_ext.integrations.vllm:register``. It registers
:class:`~adsc_ext.integrations.vllm.model.AdscLlavaForConditionalGeneration` for the architecture
``LlavaForConditionalGeneration`` (and under its own name ``AdscLlavaForConditionalGeneration``),
and :class:`~adsc_ext.integrations.vllm.model.AdscQwen2_5_VLForConditionalGeneration` /
:class:`~adsc_ext.integrations.vllm.model.AdscQwen2VLForConditionalGeneration` for Qwen2.5-VL and
Qwen2-VL, and :class:`~adsc_ext.integrations.vllm.model.AdscLlavaOnevisionForConditionalGeneration`
for LLaVA-OneVision (images). Each class is vLLM's own model unchanged unless the checkpoint's config has ``adsc_schedule`` (what
``apply_adsc`` + ``save_pretrained`` write), or the user passes it::

    vllm serve ./llava-adsc                                   # config.json has adsc_schedule
    LLM(model="llava-hf/llava-1.5-7b-hf", hf_overrides={"adsc_schedule": "8:2,16:2,24:2"})

Set ``VLLM_PLUGINS`` to a list without ``adsc`` to run vLLM without the plugin.
"""

from __future__ import annotations

__all__ = ["register", "ARCHITECTURES", "QWEN_ARCHITECTURES", "QWEN2_ARCHITECTURES", "ONEVISION_ARCHITECTURES"]

#: Architectures the plugin serves (the first is vLLM's own LLaVA name, which it takes over).
ARCHITECTURES = ("LlavaForConditionalGeneration", "AdscLlavaForConditionalGeneration")
#: Qwen2.5-VL and Qwen2-VL (a grid per image or video frame, M-RoPE positions)
QWEN_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration", "AdscQwen2_5_VLForConditionalGeneration")
QWEN2_ARCHITECTURES = ("Qwen2VLForConditionalGeneration", "AdscQwen2VLForConditionalGeneration")
#: LLaVA-OneVision (an anyres layout per image, read from its embeddings)
ONEVISION_ARCHITECTURES = ("LlavaOnevisionForConditionalGeneration", "AdscLlavaOnevisionForConditionalGeneration")

_MODEL = "adsc_ext.integrations.vllm.model:AdscLlavaForConditionalGeneration"
_QWEN_MODEL = "adsc_ext.integrations.vllm.model:AdscQwen2_5_VLForConditionalGeneration"
_QWEN2_MODEL = "adsc_ext.integrations.vllm.model:AdscQwen2VLForConditionalGeneration"
_ONEVISION_MODEL = "adsc_ext.integrations.vllm.model:AdscLlavaOnevisionForConditionalGeneration"


def register() -> None:
    """The ``vllm.general_plugins`` entry point (idempotent: vLLM may call it more than once)."""
    from vllm import ModelRegistry

    from . import _compat
    from .config import verify_and_update_config

    if not _compat.supported():
        from vllm.logger import init_logger

        init_logger(__name__).warning(
            "adsc_ext's vLLM plugin is tested with vLLM %s, not %d.%d: "
            "tests/vllm_plugin/test_compat.py says whether what it relies on is still there",
            ", ".join(_compat.SUPPORTED_VLLM), *_compat.vllm_version(),
        )
    for archs, model in ((ARCHITECTURES, _MODEL), (QWEN_ARCHITECTURES, _QWEN_MODEL),
                         (QWEN2_ARCHITECTURES, _QWEN2_MODEL), (ONEVISION_ARCHITECTURES, _ONEVISION_MODEL)):
        for arch in archs:
            ModelRegistry.register_model(arch, model)
            _compat.register_config_hook(arch, verify_and_update_config)
    from .config import kv_groups_enabled

    if kv_groups_enabled():
        from . import kv_groups

        kv_groups.register()
