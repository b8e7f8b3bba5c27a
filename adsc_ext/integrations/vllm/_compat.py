"""Every place where the ADSC plugin touches vLLM below its plugin API, in one module.

vLLM's public extension points (``vllm.general_plugins``, ``ModelRegistry.register_model``,
subclassing its ``LlavaForConditionalGeneration``) load the model. Running each ADSC stage on its
own token layout needs four things vLLM has no public API for; they are here, written against
vLLM 0.32 and checked by ``tests/vllm_plugin/test_compat.py`` (the contract test: it fails when a vLLM
release moves one of them):

1. the per-forward :class:`vllm.forward_context.ForwardContext`: its ``attn_metadata`` and
   ``slot_mapping`` dicts (layer name -> backend metadata / KV write slots), which the plugin
   swaps per stage;
2. the batch view read from a layer's backend metadata (``query_start_loc``, ``seq_lens``,
   ``block_table``, ``slot_mapping``, ``num_actual_tokens``, ``max_seq_len``: the fields vLLM's
   CPU, FlashAttention and Triton backends share);
3. a stage's backend metadata built by the backend's own ``AttentionMetadataBuilder`` from a
   :class:`vllm.v1.attention.backend.CommonAttentionMetadata`;
4. the per-architecture config hook ``vllm.model_executor.models.config.MODELS_CONFIG_MAP``
   (``VerifyAndUpdateConfig``), run in ``VllmConfig.__post_init__``, through which the plugin
   switches off what ADSC cannot serve (prefix caching) before the scheduler exists;
5. the multimodal processor factories vLLM's LLaVA registered (``_processor_factory``) and the
   processed prompt's placeholders, so a request whose images are not whole grids is refused
   when it is added (alone) instead of failing a whole engine step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, Optional

import torch

#: The vLLM release this module is written against (``tests/vllm_plugin/test_compat.py`` checks it).
TESTED_VLLM = "0.32"

#: Fields of a layer's backend metadata the plugin reads (shared by vLLM's CPU_ATTN,
#: FLASH_ATTN and TRITON_ATTN metadata classes).
BATCH_FIELDS = (
    "query_start_loc", "seq_lens", "block_table", "slot_mapping", "num_actual_tokens",
    "max_seq_len",
)


class UnsupportedBackendError(NotImplementedError):
    """The attention backend's metadata does not carry what ADSC needs to re-index a stage."""


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
        query_start_loc_cpu=query_start_loc.cpu(),
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


def attention_layer(decoder_layer):
    """The vLLM ``Attention`` module of a LLaMA-family decoder layer."""
    attn = getattr(getattr(decoder_layer, "self_attn", None), "attn", None)
    if attn is None or not hasattr(attn, "layer_name"):
        raise TypeError(
            f"{type(decoder_layer).__name__} has no self_attn.attn (a vLLM Attention layer): "
            f"ADSC supports LLaMA-family text models"
        )
    return attn


def num_kv_blocks(vllm_config) -> Optional[int]:
    """Blocks in the KV cache (set by the worker once the cache is allocated)."""
    return getattr(vllm_config.cache_config, "num_gpu_blocks", None)


# ---- 4. the per-architecture config hook -------------------------------------------------------
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



# ---- 5. the multimodal processor ---------------------------------------------------------------
def processor_factories(model_cls):
    """``(processor, info, dummy_inputs)`` factories vLLM registered for ``model_cls`` (its
    ``MULTIMODAL_REGISTRY.register_processor`` decorator), to register a wrapped processor for a
    subclass with the same info and dummy inputs."""
    factories = model_cls._processor_factory
    return factories.processor, factories.info, factories.dummy_inputs


def placeholder_lengths(mm_input, modality: str = "image"):
    """Length of each ``modality`` item's placeholder in a processed prompt."""
    return [int(r.length) for r in mm_input["mm_placeholders"].get(modality, [])]


# ---- 6. per-stage KV-cache groups ---------------------------------------------------------------
def register_kv_cache_spec(spec_cls, manager_cls) -> None:
    """Register ``spec_cls`` as its own grouping base with ``manager_cls`` (vLLM's
    ``KVCacheSpecRegistry``, the registry its ``register_kv_cache_spec`` decorator fills). The
    built-in specs are registered first: the registry fills itself lazily only while empty."""
    from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(spec_cls, manager_cls, uniform_type_base_spec=spec_cls)


def single_type_managers(kv_cache_manager):
    """The per-group managers of the scheduler's ``KVCacheManager``."""
    return kv_cache_manager.coordinator.single_type_managers
