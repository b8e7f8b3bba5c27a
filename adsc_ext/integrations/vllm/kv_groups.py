"""Per-stage KV-cache groups: each ADSC stage's layers get their own block table, sized by the
stage's tokens, through vLLM 0.32's hybrid KV-cache manager.

vLLM's pieces, and what the plugin adds to each:

- a spec per stage (``AdscStage{s}Spec``, a ``FullAttentionSpec``): vLLM groups layers by spec
  class (``UniformTypeKVCacheSpecs`` / ``FullAttentionSpec.merge``), so each stage has its own
  class, registered with ``vllm.v1.kv_cache_spec_registry.register_kv_cache_spec``-style
  registration as its own grouping base, and ``merge`` refuses to join stages;
- a manager (:class:`AdscStageManager`, a ``FullAttentionManager``) that allocates a request's
  blocks for the stage's compacted length ``num_tokens - dropped_s`` instead of ``num_tokens``.
  vLLM calls managers with a request id and a token count only, so the manager reads the
  request's image placeholders from the scheduler's request table;
- a scheduler (:class:`AdscScheduler`, vLLM's ``Scheduler``, set through ``scheduler_cls``)
  that hands its request table to those managers.

The groups share one block pool: a request holds ``sum_s ceil(L_s / block_size)`` blocks, each
the size of one group's layers, instead of ``stages * ceil(L / block_size)``: the ADSC saving.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec

from ...schedule import Schedule
from . import _compat

__all__ = ["AdscScheduler", "AdscStageManager", "stage_spec", "compacted_length", "register"]


@dataclass(frozen=True, kw_only=True)
class _AdscStageSpec(FullAttentionSpec):
    #: the stage; ``adsc_drop`` is how many vision tokens of one image the stage has dropped and
    #: ``adsc_image`` the tokens of one image at stage 0 (one image placeholder)
    adsc_stage: int = 0
    adsc_drop: int = 0
    adsc_image: int = 0

    @classmethod
    def merge(cls, specs):
        first = specs[0]
        if any(type(s) is not type(first) or s != first for s in specs):
            raise AssertionError("ADSC stages keep separate KV cache groups")
        return first


#: One class per stage (vLLM groups by class); module attributes, so specs pickle by reference.
#: 17 stages: the compiled core's limit of 16 steps.
STAGE_SPECS = []
for _s in range(17):
    _cls = dataclass(frozen=True, kw_only=True)(
        type(f"AdscStage{_s}Spec", (_AdscStageSpec,), {"__module__": __name__})
    )
    _cls.__qualname__ = _cls.__name__
    setattr(sys.modules[__name__], _cls.__name__, _cls)
    STAGE_SPECS.append(_cls)


def stage_spec(base: FullAttentionSpec, stage: int, drop: int, image: int) -> FullAttentionSpec:
    """``base`` (a layer's own spec) as stage ``stage``'s spec."""
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    return STAGE_SPECS[stage](**fields, adsc_stage=stage, adsc_drop=drop, adsc_image=image)


def compacted_length(num_tokens: int, placeholders, drop: int, image: int) -> int:
    """Tokens of the first ``num_tokens`` that a stage keeps: images wholly inside lose ``drop``
    tokens each (``placeholders``: (offset, length) of each image item)."""
    if drop == 0:
        return num_tokens
    lost = 0
    for offset, length in placeholders:
        if offset + length <= num_tokens and image:
            lost += drop * (length // image)
    return num_tokens - lost


class AdscStageManager(FullAttentionManager):
    """Allocates a request's blocks for the stage's compacted length."""

    #: request id -> Request (the scheduler's table; set by AdscScheduler)
    requests: Optional[Dict[str, object]] = None

    def _compacted(self, request_id: str, num_tokens: int) -> int:
        spec = self.kv_cache_spec
        req = (self.requests or {}).get(request_id)
        if req is None or spec.adsc_drop == 0:
            return num_tokens
        places = [(f.mm_position.offset, f.mm_position.length) for f in (req.mm_features or [])]
        return compacted_length(num_tokens, places, spec.adsc_drop, spec.adsc_image)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks,
                                   total_computed_tokens, num_local_computed_tokens,
                                   num_tokens_main_model, *args, **kwargs):
        return super().get_num_blocks_to_allocate(
            request_id, self._compacted(request_id, num_tokens), new_computed_blocks,
            total_computed_tokens, num_local_computed_tokens,
            self._compacted(request_id, num_tokens_main_model), *args, **kwargs,
        )

    def allocate_new_blocks(self, request_id, num_tokens, num_tokens_main_model):
        return super().allocate_new_blocks(
            request_id, self._compacted(request_id, num_tokens),
            self._compacted(request_id, num_tokens_main_model),
        )


class AdscScheduler(Scheduler):
    """vLLM's scheduler; hands its request table to the ADSC stage managers."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for manager in _compat.single_type_managers(self.kv_cache_manager):
            if isinstance(manager, AdscStageManager):
                manager.requests = self.requests


def register() -> None:
    """Register the stage specs with their manager (each process; idempotent)."""
    for cls in STAGE_SPECS:
        _compat.register_kv_cache_spec(cls, AdscStageManager)


def layer_specs(schedule: Schedule, grid) -> List[tuple]:
    """``(drop, image)`` of every stage: vision tokens one image has lost, tokens of one image."""
    infos = schedule.validate(max(schedule.layers, default=0) + 1, grid)
    image = infos[0].tokens_per_image
    return [(image - info.tokens_per_image, image) for info in infos]
