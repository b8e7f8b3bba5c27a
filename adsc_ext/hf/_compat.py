"""Everything the Hugging Face integration needs from transformers that is not a documented API.

The integration runs transformers' own model forward and acts only through module hooks (see
:mod:`adsc_ext.hf.hooks`). What it still has to know about transformers' internals is here, and
``tests/test_hf_compat.py`` checks each item against the installed release, naming the item that
moved when a release breaks it:

1. the attention implementation a text config runs (``config._attn_implementation``), and the
   mask format each implementation takes (eager: an additive float mask; sdpa: a boolean mask;
   flash: a 2-D key mask, or none with ``cu_seq_lens_*``);
2. the name of the cache argument of the model's forward and of its output's cache field
   (``past_key_values``; ``cache`` from transformers 5.24, where the old name is deprecated until 5.40);
3. how a decoder layer is called by the text model: hidden states first (positionally), then the
   keyword arguments ``attention_mask``, ``position_ids``, ``position_embeddings``;
4. a dynamic cache layer's tensors (``layer.keys`` / ``layer.values``, ``layer.is_initialized``),
   and the ``DynamicCache`` methods ``generate`` calls to reorder, repeat, select or crop a batch
   (``reorder_cache``, ``batch_repeat_interleave``, ``batch_select_indices``, ``crop``), which
   :class:`~adsc_ext.hf.cache.AdscCache` overrides to keep its per-stage state in step;
5. the attention module's outputs under eager attention: ``(output, weights)`` (the FastV baseline);
6. Qwen2.5-VL's video temporal positions: transformers 5.17's ``get_rope_index`` truncates
   ``second_per_grid_ts`` to whole seconds (``int(...)``) before it scales by ``tokens_per_second``;
   5.18 and later (and the original Qwen2.5-VL code) keep the fraction. The spec follows the
   installed release (:func:`qwen25_whole_video_seconds`), checked against ``get_rope_index`` by
   ``tests/test_qwen_vl.py::test_positions_equal_get_rope_index``;
7. the name of the switch that turns on activation checkpointing (public API, renamed in 5.23:
   :func:`enable_checkpointing`), and the per-layer flag it sets (:func:`layer_checkpointed`).

Everything else (the hooks, the per-stage masks adsc_ext builds itself, the output classes) goes
through public API: ``register_forward_pre_hook`` / ``register_forward_hook``, ``DynamicCache``,
``get_image_features``, ``get_input_embeddings``, ``AutoModelForImageTextToText.from_config``.
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional, Tuple

import torch

#: The names transformers has used for the cache argument of a model's forward, newest first.
CACHE_KWARGS = ("cache", "past_key_values")

#: The batch-surgery methods of DynamicCache that AdscCache overrides (item 4).
CACHE_BATCH_METHODS = ("reorder_cache", "batch_repeat_interleave", "batch_select_indices", "crop")

#: The keyword arguments a LLaMA decoder layer receives from its text model that ADSC replaces per
#: stage (item 3); flash attention's varlen arguments are added for packed inputs.
LAYER_KWARGS = ("attention_mask", "position_ids", "position_embeddings")
FLASH_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def attn_implementation(config) -> str:
    """The attention implementation the model with this (text) config runs (item 1)."""
    return getattr(config, "_attn_implementation", None) or "eager"


def is_flash(impl: str) -> bool:
    return "flash" in impl


def format_mask(impl: str, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean ``allowed [B, 1, q, K]`` (True = may attend) in the form ``impl`` takes (item 1)."""
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def forward_parameters(model) -> Tuple[str, ...]:
    """The parameter names of ``type(model).forward`` (self excluded), decorators unwrapped."""
    return tuple(inspect.signature(type(model).forward).parameters)[1:]


def cache_kwarg(module) -> str:
    """The name of the cache argument of a model's or a decoder layer's forward (item 2)."""
    params = forward_parameters(module)
    for name in CACHE_KWARGS:
        if name in params:
            return name
    raise TypeError(
        f"{type(module).__name__}.forward takes none of {CACHE_KWARGS} as its cache argument; this "
        f"transformers release is not supported (adsc_ext/hf/_compat.py, item 2)"
    )


def output_cache(output):
    """The cache a model's output returns (item 2: the field is ``cache`` from transformers 5.24,
    where reading ``past_key_values`` logs a deprecation, ``past_key_values`` before)."""
    fields = getattr(output, "__dataclass_fields__", {})
    for name in CACHE_KWARGS:
        if name in fields:
            return getattr(output, name)
    raise TypeError(f"{type(output).__name__} has none of {CACHE_KWARGS}; this transformers release is not supported "
                    f"(adsc_ext/hf/_compat.py, item 2)")


def layer_hidden(args: tuple, kwargs: dict) -> Tuple[torch.Tensor, bool]:
    """The hidden states a decoder layer was called with, and whether they came positionally (item 3)."""
    if args:
        return args[0], True
    return kwargs["hidden_states"], False


def layer_kv(layer) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(keys, values)`` of one cache layer, each ``[B, H, L, D]``; None before its first update (item 4)."""
    if not getattr(layer, "is_initialized", False) or getattr(layer, "keys", None) is None:
        return None
    return layer.keys, layer.values


@contextlib.contextmanager
def attention_implementation(config, impl: str):
    """Run the model of this (text) config with attention ``impl`` for a while (item 1): the FastV
    baseline needs eager attention's weights."""
    old = config._attn_implementation
    config._attn_implementation = impl
    try:
        yield
    finally:
        config._attn_implementation = old


def qwen25_whole_video_seconds() -> bool:
    """Whether the installed transformers' Qwen2.5-VL positions truncate ``second_per_grid_ts`` to
    whole seconds (item 6: releases before 5.18)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return (major, minor) < (5, 18)


def enable_checkpointing(model, use_reentrant: bool = False) -> None:
    """Turn on activation (gradient) checkpointing on a transformers model, or a PEFT model over one:
    ``activation_checkpointing_enable`` from transformers 5.23, where ``gradient_checkpointing_enable``
    is deprecated (a FutureWarning); the older name before (public API both; only the name moved)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


def layer_checkpointed(layer) -> bool:
    """Whether gradient checkpointing is on for a decoder layer (``GradientCheckpointingLayer``'s
    ``gradient_checkpointing`` flag, set by ``model.gradient_checkpointing_enable()``)."""
    return bool(getattr(layer, "gradient_checkpointing", False))


@contextlib.contextmanager
def checkpointing_off(layer):
    """Run a decoder layer without gradient checkpointing for a while (the flag of
    :func:`layer_checkpointed`): FastV's scoring layer runs with eager attention inside
    :func:`attention_implementation`, which a backward-pass recompute would run outside."""
    on = layer_checkpointed(layer)
    if on:
        layer.gradient_checkpointing = False
    try:
        yield
    finally:
        if on:
            layer.gradient_checkpointing = True
