"""The ONNX node contract of the ``AdscCompactTokens`` TensorRT plugin (csrc/tensorrt).

The ONNX exporter emits this node in place of the standard-op compaction when asked to; TensorRT's
ONNX parser, finding no built-in importer for the op type, falls back to the plugin registry and
looks up the creator by the node's ``op_type`` with the version and namespace read from the node
attributes ``plugin_version`` / ``plugin_namespace`` (the parser's ``FallbackPluginImporter``;
absent attributes mean version "1" and namespace ""). The parser dispatches on ``op_type`` only;
the domain is ours, so ONNX tooling treats the node as a custom op (the model's ``opset_import``
must list ``(DOMAIN, DOMAIN_VERSION)``, see :func:`compact_opset_import`).

Node ``AdscCompactTokens`` (domain ``adsc``, version 1):

- input 0 ``x``      ``[T, D]``  float32, float16 or bfloat16: the token rows of a packed batch;
- input 1 ``index``  ``[T_s]``   int32: the stage's gather index into the rows of ``x``; ``-1``
  gives a zero row (padding). Any other value outside ``[0, T)`` also gives a zero row on the GPU
  (it is never read out of bounds), but it is a bug in the plan that fed it;
- output 0           ``[T_s, D]``, the type of ``x``: ``out[i] = x[index[i]]``.

The plugin has no fields, so the node carries no attributes beyond the two lookup keys.
This module imports nothing (no onnx); it is the single source of these names.
"""

OP_TYPE = "AdscCompactTokens"
DOMAIN = "adsc"            # ONNX domain of the node
DOMAIN_VERSION = 1         # opset version of that domain in the model's opset_import
PLUGIN_NAME = OP_TYPE      # the TensorRT plugin creator's name (the parser matches op_type to it)
PLUGIN_VERSION = "1"
PLUGIN_NAMESPACE = "adsc"
NUM_INPUTS = 2             # x [T, D], index [T_s] int32
NUM_OUTPUTS = 1            # [T_s, D], dtype of x
INDEX_DTYPE = "int32"
PLUGIN_LIBRARY = "libadsc_tensorrt.so"


def compact_node_attributes() -> dict:
    """The attributes of every ``AdscCompactTokens`` node: exactly the parser's lookup keys."""
    return {"plugin_version": PLUGIN_VERSION, "plugin_namespace": PLUGIN_NAMESPACE}


def compact_opset_import() -> tuple:
    """``(domain, version)`` to add to the model's ``opset_import`` when the graph has the node."""
    return (DOMAIN, DOMAIN_VERSION)
