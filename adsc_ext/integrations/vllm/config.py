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
- chunked prefill stays on, with ``disable_chunked_mm_input``: a chunk never ends inside an image,
  so every chunk plans whole images and continues each stage's compacted sequence where the
  previous chunk left it (tested against unchunked prefill);
- eager execution: the plan reads its stage sizes on the host once per forward, which CUDA graph
  capture and torch.compile of the staged loop do not allow yet;
- refused: pipeline parallelism, speculative decoding, LoRA and KV transfer (each assumes the
  decoder runs every step's tokens through every layer);
- per-stage KV-cache groups (default; ``ADSC_VLLM_KV_GROUPS=0`` turns them off): the scheduler
  becomes :class:`~adsc_ext.integrations.vllm.kv_groups.AdscScheduler`, which needs the hybrid
  KV-cache manager.
"""

from __future__ import annotations

from typing import Optional, Tuple

from ...schedule import Schedule, ScheduleError

__all__ = ["llava_adsc_setup", "verify_and_update_config", "kv_groups_enabled"]

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
    schedule = Schedule.coerce(text)
    try:
        schedule.validate(num_layers, grid)
    except ScheduleError as exc:
        raise ScheduleError(
            f"adsc_schedule '{schedule}' does not fit this model ({num_layers} decoder layers, "
            f"{side}x{side} image grid): {exc}"
        ) from None
    return schedule, grid, num_layers


def verify_and_update_config(vllm_config) -> None:
    """The config hook (see the module docstring); a no-op without ``adsc_schedule``."""
    from vllm.logger import init_logger

    logger = init_logger(__name__)
    setup = llava_adsc_setup(vllm_config.model_config.hf_config)
    if setup is None:
        return
    schedule = setup[0]
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
    if sched.enable_chunked_prefill and not sched.disable_chunked_mm_input:
        logger.info(
            "ADSC: chunked prefill kept, with disable_chunked_mm_input=True (no chunk ends inside "
            "an image, so each chunk plans whole images)."
        )
        sched.disable_chunked_mm_input = True
    if not vllm_config.model_config.enforce_eager:
        logger.warning(
            "ADSC: enforce_eager set. The plan reads its stage sizes on the host once per "
            "forward, which CUDA graphs and torch.compile of the staged loop do not support yet."
        )
        vllm_config.model_config.enforce_eager = True
    if kv_groups_enabled() and schedule:
        if sched.scheduler_cls not in (None, ADSC_SCHEDULER):
            raise ValueError(
                f"ADSC's per-stage KV-cache groups need scheduler_cls={ADSC_SCHEDULER!r}, got "
                f"{sched.scheduler_cls!r} (set ADSC_VLLM_KV_GROUPS=0 to keep one KV group)"
            )
        sched.scheduler_cls = ADSC_SCHEDULER
        if sched.disable_hybrid_kv_cache_manager:
            raise ValueError(
                "ADSC's per-stage KV-cache groups need the hybrid KV-cache manager "
                "(disable_hybrid_kv_cache_manager is set; or set ADSC_VLLM_KV_GROUPS=0)"
            )
    logger.info("ADSC: schedule '%s' (adsc_ext vLLM plugin)", schedule)
