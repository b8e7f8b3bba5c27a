"""Deployment export: LLaVA-1.5 with the ADSC schedule baked in, as ONNX graphs (and, next, TensorRT).

- :func:`export_onnx` (``adsc export``): vision / embed / prefill / decode graphs and
  ``adsc_manifest.json`` (:mod:`adsc_ext.export.onnx_export`);
- :class:`OnnxRunner` (``adsc export --check``): runs an exported folder on ONNX Runtime with the
  same requests and results as :meth:`adsc_ext.runtime.Engine.generate`;
- :mod:`adsc_ext.export._plugin`: the ``AdscCompactTokens`` node contract shared with the TensorRT
  plugin.

Names are imported on first use, so ``adsc_ext.export._plugin`` needs neither onnx nor onnxruntime.
"""

from importlib import import_module

_LAZY = {
    "export_onnx": "onnx_export",
    "plugin_reference_function": "onnx_export",
    "OnnxRunner": "runner",
    "ExportError": "manifest",
    "load_manifest": "manifest",
    "MANIFEST_NAME": "manifest",
    "build_engines": "tensorrt",
    "BuildLimits": "tensorrt",
    "TensorRTRunner": "trt_runner",
}

__all__ = list(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'adsc_ext.export' has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value
