"""What the ADSC plugin reads from a checkpoint's config, and what it changes in vLLM's config.

:func:`llava_adsc_setup` reads ``adsc_schedule`` (written by ``apply_adsc`` + ``save_pretrained``,
or passed with ``hf_overrides``). :func:`verify_and_update_config` runs in
``VllmConfig.__post_init__`` (before the engine and its scheduler exist) for LLaVA checkpoints
with a schedule. It turns off what ADSC cannot serve correctly, saying why, and refuses what the
plugin does not support:

- prefix caching is switched off: a stage stores its compacted sequence in the request's blocks,
  so a block's content is no longer a function of the block's own tokens (what the prefix-cache
  hash assumes), and two requests sharing a prefix would write different compacted tokens into
  the shared blocks;
- chunked prefill is left as it is (on by default), and so is ``disable_chunked_mm_input``: a
  chunk may start or end anywhere, inside an image too, and continues each stage's compacted
  sequence where the previous chunk left it (``chunks.py``; tested against ``apply_adsc``);
- eager execution: the plan reads its stage sizes on the host once per forward, which CUDA graph
  capture and torch.compile of the staged loop do not allow yet;
- refused: pipeline parallelism, speculative decoding, LoRA and KV transfer (each assumes the
  decoder runs every step's tokens through every layer);
- Qwen2.5-VL (:func:`qwen_adsc_setup`; a grid per image): ``disable_chunked_mm_input`` is set
  and the ADSC scheduler keeps every image inside one chunk (the plan reads an image's grid from
  its M-RoPE positions, all of which must be in the step), also with ``ADSC_VLLM_KV_GROUPS=0``;
  ``long_prefill_token_threshold > 0`` is refused (it could cap a chunk below an image forever);
  the multimodal processor cache is switched off (``mm_processor_cache_gb=0``): the per-request
  grid check needs every image's ``image_grid_thw``, which the cache leaves out of a repeated
  image, and a refused image would put the front end's and the engine's caches out of step;
- LLaVA-OneVision (:func:`onevision_adsc_setup`; an anyres layout per image, read by the forward
  from the image's embeddings): the same as Qwen2.5-VL (whole images per chunk, the processor
  cache off: the per-request check reads each image's ``image_sizes``);
- per-stage KV-cache groups (default; ``ADSC_VLLM_KV_GROUPS=0`` turns them off): the scheduler
  becomes :class:`~adsc_ext.integrations.vllm.kv_groups.AdscScheduler`, which needs the hybrid
  KV-cache manager. Async scheduling is kept: vLLM decides it after this hook, and the ADSC
  scheduler is then built over vLLM's ``AsyncScheduler`` (``AdscAsyncScheduler``), as vLLM's own
  choice would be; the hook logs that.
"""

from __future__ import annotations

from typing import Optional, Tuple

from ...schedule import Schedule, ScheduleError

__all__ = ["llava_adsc_setup", "qwen_adsc_setup", "onevision_adsc_setup", "adsc_setup", "whole_images", "verify_and_update_config",
           "kv_groups_enabled"]

#: model_type of the Qwen checkpoints the plugin serves (a grid per image, M-RoPE positions)
QWEN_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl")

#: model_type of LLaVA-OneVision (anyres: each image its own layout of grids, 1-D positions)
ONEVISION_MODEL_TYPES = ("llava_onevision",)

#: the scheduler that hands its requests to the per-stage KV managers (kv_groups.py)
ADSC_SCHEDULER = "adsc_ext.integrations.vllm.kv_groups.AdscScheduler"


def kv_groups_enabled() -> bool:
    """Per-stage KV-cache groups (``ADSC_VLLM_KV_GROUPS``, default on; ``0`` keeps all stages in
    vLLM's one group: the compute saving without the memory saving)."""
    import os

    return os.environ.get("ADSC_VLLM_KV_GROUPS", "1") != "0"


def llava_adsc_setup(hf_config) -> Optional[Tuple[Schedule, Tuple[int, int], int]]:
    """``(schedule, grid, num_layers)`` for an HF LLaVA config with ``adsc_schedule``, or None.

    Raises ScheduleError / ValueError for a schedule or a model ADSC cannot run.
    """
    text = getattr(hf_config, "adsc_schedule", None)
    if text is None:
        return None
    vision = hf_config.vision_config
    if getattr(vision, "model_type", "") not in ("clip_vision_model", "siglip_vision_model"):
        raise ValueError(
            f"ADSC on vLLM supports LLaVA-1.5 (a CLIP or SigLIP tower), got vision model "
            f"{getattr(vision, 'model_type', None)!r}"
        )
    if getattr(hf_config, "vision_feature_select_strategy", "default") != "default":
        raise ValueError(
            "ADSC needs every image to be an H x W grid of tokens: "
            "vision_feature_select_strategy must be 'default'"
        )
    side = int(vision.image_size) // int(vision.patch_size)
    grid = (side, side)
    num_layers = int(hf_config.text_config.num_hidden_layers)
    return _fitted_schedule(text, num_layers, grid, "image grid"), grid, num_layers


def _fitted_schedule(text, num_layers: int, grid: Optional[Tuple[int, int]] = None, grid_name: str = "") -> Schedule:
    """The config's ``adsc_schedule``, checked against the decoder layers (and ``grid``, every
    image's grid or base crop, where the model has one); a ScheduleError names the model's facts."""
    schedule = Schedule.coerce(text)
    try:
        schedule.validate(num_layers, grid)
    except ScheduleError as exc:
        facts = f"{num_layers} decoder layers" + ("" if grid is None else f", {grid[0]}x{grid[1]} {grid_name}")
        raise ScheduleError(f"adsc_schedule '{schedule}' does not fit this model ({facts}): {exc}") from None
    return schedule


def qwen_adsc_setup(hf_config) -> Optional[Tuple[Schedule, int, int]]:
    """``(schedule, num_layers, spatial_merge_size)`` for an HF Qwen2-VL / Qwen2.5-VL config with
    ``adsc_schedule``, or None. Each image has its own grid, checked per request by the
    multimodal processor (``model.ImageGridError``); here the schedule is checked against the
    decoder layers only."""
    text = getattr(hf_config, "adsc_schedule", None)
    if text is None:
        return None
    text_config = getattr(hf_config, "text_config", hf_config)
    num_layers = int(text_config.num_hidden_layers)
    merge = int(getattr(hf_config.vision_config, "spatial_merge_size", 2))
    return _fitted_schedule(text, num_layers), num_layers, merge


def onevision_adsc_setup(hf_config) -> Optional[Tuple[Schedule, int, int]]:
    """``(schedule, num_layers, side)`` for an HF LLaVA-OneVision config with ``adsc_schedule``, or
    None (``side``: tokens per crop side). Each image has its own layout (anyres), checked per
    request by the multimodal processor; here the schedule is checked against the decoder layers
    and the base crop's ``side x side`` grid, which every image has."""
    text = getattr(hf_config, "adsc_schedule", None)
    if text is None:
        return None
    vision = hf_config.vision_config
    if getattr(vision, "model_type", "") != "siglip_vision_model":
        raise ValueError(
            f"ADSC on vLLM supports LLaVA-OneVision with a SigLIP tower, got vision model "
            f"{getattr(vision, 'model_type', None)!r}"
        )
    if getattr(hf_config, "vision_feature_select_strategy", "full") != "full":
        raise ValueError(
            "ADSC needs every crop to be a side x side grid of tokens: LLaVA-OneVision's "
            "vision_feature_select_strategy must be 'full' (SigLIP has no CLS token)"
        )
    side = int(vision.image_size) // int(vision.patch_size)
    num_layers = int(hf_config.text_config.num_hidden_layers)
    return _fitted_schedule(text, num_layers, (side, side), "base grid"), num_layers, side


def adsc_setup(hf_config) -> Optional[Schedule]:
    """The schedule of an HF config the plugin serves (LLaVA-1.5, Qwen2-VL, Qwen2.5-VL or
    LLaVA-OneVision), or None."""
    model_type = getattr(hf_config, "model_type", "")
    if model_type in ONEVISION_MODEL_TYPES:
        setup = onevision_adsc_setup(hf_config)
    elif model_type in QWEN_MODEL_TYPES:
        setup = qwen_adsc_setup(hf_config)
    else:
        setup = llava_adsc_setup(hf_config)
    return None if setup is None else setup[0]


def whole_images(hf_config) -> bool:
    """Whether the plugin keeps each image inside one chunk for this model: each image of a Qwen
    model has its own grid, which the forward reads from the image's M-RoPE positions, all of
    them in the chunk (see ``chunks.plan_grid_step``); each LLaVA-OneVision image has its own
    anyres layout, which the forward reads from the image's embeddings, all of them in the chunk
    (``chunks.plan_items_step``)."""
    return (getattr(hf_config, "model_type", "") in QWEN_MODEL_TYPES + ONEVISION_MODEL_TYPES
            and adsc_setup(hf_config) is not None)


def verify_and_update_config(vllm_config) -> None:
    """The config hook (see the module docstring); a no-op without ``adsc_schedule``."""
    from vllm.logger import init_logger

    logger = init_logger(__name__)
    hf_config = vllm_config.model_config.hf_config
    schedule = adsc_setup(hf_config)
    if schedule is None:
        return
    refused = []
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        refused.append("pipeline parallelism (pipeline_parallel_size > 1)")
    if vllm_config.speculative_config is not None:
        refused.append("speculative decoding")
    if vllm_config.lora_config is not None:
        refused.append("LoRA adapters (their per-token mapping is built for the uncompacted batch)")
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        refused.append("KV transfer / disaggregated prefill")
    if refused:
        raise ValueError(f"ADSC (adsc_schedule '{schedule}') does not support " + "; ".join(refused))

    cache, sched = vllm_config.cache_config, vllm_config.scheduler_config
    if cache.enable_prefix_caching:
        logger.warning(
            "ADSC: prefix caching disabled. Each stage stores its compacted tokens in the "
            "request's blocks, so cached blocks could not be shared between requests."
        )
        cache.enable_prefix_caching = False
    if not vllm_config.model_config.enforce_eager:
        logger.warning(
            "ADSC: enforce_eager set. The plan reads its stage sizes on the host once per "
            "forward, which CUDA graphs and torch.compile of the staged loop do not support yet."
        )
        vllm_config.model_config.enforce_eager = True
    whole = whole_images(hf_config) and bool(schedule)
    if whole:
        if not sched.disable_chunked_mm_input:
            logger.warning(
                "ADSC: disable_chunked_mm_input set. Each image of this model has its own grid, "
                "which the plan reads from the image's M-RoPE positions (Qwen) or embeddings "
                "(LLaVA-OneVision), so every image is "
                "prefilled inside one chunk (the ADSC scheduler also keeps a chunk that starts at "
                "an image from ending inside it)."
            )
            sched.disable_chunked_mm_input = True
        mm_config = vllm_config.model_config.multimodal_config
        if mm_config is not None and mm_config.mm_processor_cache_gb > 0:
            logger.warning(
                "ADSC: mm_processor_cache_gb set to 0. The multimodal processor refuses, per "
                "request, an image whose grid the schedule cannot downsample, which needs each "
                "image's image_grid_thw / image_sizes; the processor cache hands a repeated image over without "
                "it (and a refused image would leave the front end's and the engine's caches out "
                "of step)."
            )
            mm_config.mm_processor_cache_gb = 0
        if getattr(sched, "long_prefill_token_threshold", 0) > 0:
            raise ValueError(
                f"ADSC (adsc_schedule '{schedule}') prefills each image of this model inside one "
                f"chunk; long_prefill_token_threshold={sched.long_prefill_token_threshold} caps a "
                f"request's chunk below what an image may need (set it to 0, and "
                f"max_num_partial_prefills to 1)"
            )
    if (kv_groups_enabled() or whole) and schedule:
        if sched.scheduler_cls not in (None, ADSC_SCHEDULER):
            raise ValueError(
                f"ADSC's per-stage KV-cache groups and whole-image chunks need "
                f"scheduler_cls={ADSC_SCHEDULER!r}, got "
                f"{sched.scheduler_cls!r} (set ADSC_VLLM_KV_GROUPS=0 to keep one KV group)"
            )
        sched.scheduler_cls = ADSC_SCHEDULER
        logger.info(
            "ADSC: scheduler_cls=%s (per-stage KV-cache groups); it is built over vLLM's "
            "AsyncScheduler when async scheduling is on, else over its Scheduler.", ADSC_SCHEDULER,
        )
        if kv_groups_enabled() and sched.disable_hybrid_kv_cache_manager:
            raise ValueError(
                "ADSC's per-stage KV-cache groups need the hybrid KV-cache manager "
                "(disable_hybrid_kv_cache_manager is set; or set ADSC_VLLM_KV_GROUPS=0)"
            )
    logger.info("ADSC: schedule '%s' (adsc_ext vLLM plugin)", schedule)
