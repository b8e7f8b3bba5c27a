"""lmms-eval model plugin: ``--model adsc`` serves an ADSC LLaVA checkpoint (or the unmodified
model, or FastV at the same token budget) on any lmms-eval task.

Registered through the ``lmms_eval.models`` entry point (``pyproject.toml``), which lmms-eval 0.7
reads at start-up; nothing in lmms-eval is patched. See :class:`.model.AdscLMM` for the
``--model_args``.
"""

__all__ = ["manifests"]


def manifests():
    """The entry point's payload: lmms-eval's ``ModelManifest`` for ``adsc``."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="adsc", simple_class_path="adsc_ext.integrations.lmms_eval.model.AdscLMM")]
