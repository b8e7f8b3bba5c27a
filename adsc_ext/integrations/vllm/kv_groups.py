"""Per-stage KV-cache groups: each ADSC stage's layers get their own block table, sized by the
stage's tokens, through vLLM's hybrid KV-cache manager.

vLLM's pieces (all reached through :mod:`._compat`), and what the plugin adds to each:

- a spec per stage (``AdscStage{s}Spec``, a ``FullAttentionSpec``): vLLM groups layers by spec
  class (``UniformTypeKVCacheSpecs`` / ``FullAttentionSpec.merge``), so each stage has its own
  class, registered in vLLM's ``KVCacheSpecRegistry`` as its own grouping base, and ``merge``
  refuses to join stages. The spec carries the stage, the schedule and the image grid, so the
  scheduler process can count a stage's tokens without the model;
- a manager (:class:`AdscStageManager`, a ``FullAttentionManager``) that allocates a request's
  blocks for the stage's compacted length instead of ``num_tokens``. vLLM calls managers with a
  request id and a token count only, so the manager reads the request's image placeholders from
  the scheduler's request table;
- a scheduler that hands its request table to those managers: :class:`AdscScheduler`, set as
  ``scheduler_cls`` by the config hook. vLLM resolves ``async_scheduling`` after the hook, so the
  class is chosen when vLLM builds the scheduler: with async scheduling (vLLM's default on CUDA)
  it is :class:`AdscAsyncScheduler` (vLLM's ``AsyncScheduler``), else vLLM's ``Scheduler``.

For a model with a grid per image (Qwen2.5-VL) the specs carry no grid: the manager reads each
image's grid from the request's ``image_grid_thw`` (``mm_features[i].data``); for LLaVA-OneVision
the specs carry the anyres geometry and the manager computes each image's layout from its
``image_sizes``. The scheduler also keeps every image of these models inside one chunk (:meth:`AdscScheduler._try_schedule_encoder_inputs`).

The groups share one block pool: a request holds ``sum_s ceil(L_s / block_size)`` blocks, each
the size of one group's layers, instead of ``stages * ceil(L / block_size)``: the ADSC saving.
``L_s`` counts partial images too (a chunk of a prefill may end inside an image): stage ``s``
keeps of an image's first ``k`` tokens exactly those its grid rule keeps
(:class:`~adsc_ext.integrations.vllm.chunks.ImageKeep`), which is what the model writes.

vLLM's start-up check (``max_model_len`` must fit the KV budget) sizes every group for
``max_model_len`` tokens: that is right, because a text-only prompt keeps every token in every
stage, so ADSC needs what vLLM's own LLaVA needs for one longest request; what it saves is per
image, and shows as more requests running at once.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, Optional

from vllm.logger import init_logger

from . import _compat
from .chunks import ImageKeep, image_keep

logger = init_logger(__name__)

__all__ = [
    "AdscScheduler", "AdscAsyncScheduler", "AdscStageManager", "stage_spec", "compacted_length",
    "anyres_spec", "anyres_keep", "register",
]

_FullAttentionSpec, _FullAttentionManager = _compat.kv_cache_classes()
_Scheduler, _AsyncScheduler = _compat.scheduler_classes()


@dataclass(frozen=True, kw_only=True)
class _AdscStageSpec(_FullAttentionSpec):
    #: the stage, the schedule's text form and the image grid (tokens per side; 0 x 0 when each
    #: image has its own grid, read from the request's ``image_grid_thw`` and divided by
    #: ``adsc_merge``, the vision tower's spatial merge)
    adsc_stage: int = 0
    adsc_schedule: str = ""
    adsc_grid_h: int = 0
    adsc_grid_w: int = 0
    adsc_merge: int = 0
    #: LLaVA-OneVision's anyres geometry (:func:`anyres_spec`), "" for other models: each image's
    #: layout is computed from the request's ``image_sizes``
    adsc_anyres: str = ""

    @classmethod
    def merge(cls, specs):
        first = specs[0]
        if any(type(s) is not type(first) or s != first for s in specs):
            raise AssertionError("ADSC stages keep separate KV cache groups")
        return first

    @property
    def adsc_keep(self) -> Optional[ImageKeep]:
        """The one grid's :class:`ImageKeep`, or None when each image has its own grid."""
        if not self.adsc_grid_h:
            return None
        return image_keep(self.adsc_schedule, self.adsc_grid_h, self.adsc_grid_w)


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


def stage_spec(base, stage: int, schedule: str, grid, *, merge: int = 0, anyres: str = "") -> "_AdscStageSpec":
    """``base`` (a layer's own ``FullAttentionSpec``) as stage ``stage``'s spec; ``grid`` None
    when each image has its own grid (``merge``: the tower's spatial merge; ``anyres``: the
    OneVision geometry of :func:`anyres_spec`)."""
    fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
    h, w = (0, 0) if grid is None else (int(grid[0]), int(grid[1]))
    return STAGE_SPECS[stage](
        **fields, adsc_stage=stage, adsc_schedule=str(schedule), adsc_grid_h=h, adsc_grid_w=w,
        adsc_merge=int(merge), adsc_anyres=str(anyres),
    )


def anyres_spec(hf_config) -> str:
    """LLaVA-OneVision's anyres geometry as the stage specs carry it (a hashable string):
    ``"tower,patch,max_crops;h1xw1,h2xw2,..."`` (the image_grid_pinpoints)."""
    from ...image_grids import anyres_max_crops

    vision = hf_config.vision_config
    max_crops = anyres_max_crops(getattr(hf_config, "vision_aspect_ratio", None) or "anyres_max_9")
    pins = ",".join(f"{int(h)}x{int(w)}" for h, w in hf_config.image_grid_pinpoints)
    return f"{int(vision.image_size)},{int(vision.patch_size)},{max_crops};{pins}"


class AnyresKeep:
    """What each stage keeps of one OneVision image of a given layout: ``kept(stage, k)`` for its
    first ``k`` tokens (the whole item: its grids downsampled by the schedule, the rest kept; a
    partial item, which the scheduler never makes for this model: all ``k``, more blocks than
    needed, never fewer)."""

    def __init__(self, schedule: str, item) -> None:
        from ...schedule import Schedule

        sched = Schedule.coerce(schedule)
        self.tokens = int(item.tokens)
        lost = [0] * (len(sched) + 1)
        for _, h, w, nl in item.units:
            per_stage = sched.image_tokens((h, w), newline=bool(nl))
            for s in range(len(per_stage)):
                lost[s] += per_stage[0] - per_stage[s]
        self.lost = lost

    def kept(self, stage: int, image_tokens: int) -> int:
        k = int(image_tokens)
        return k - self.lost[stage] if k >= self.tokens else k


@lru_cache(maxsize=4096)
def anyres_keep(schedule: str, anyres: str, height: int, width: int) -> AnyresKeep:
    """The (cached) :class:`AnyresKeep` of an image of ``height x width`` pixels."""
    from ...image_grids import anyres_layout
    from ...models.llava_next import ImageItem

    head, pins = anyres.split(";")
    tower, patch, max_crops = (int(v) for v in head.split(","))
    pinpoints = [tuple(int(v) for v in p.split("x")) for p in pins.split(",")]
    layout = anyres_layout((height, width), pinpoints, tower, patch, max_crops=max_crops)
    return AnyresKeep(schedule, ImageItem.from_anyres(layout))


def compacted_length(num_tokens: int, placeholders, keep: Optional[ImageKeep], stage: int) -> int:
    """Tokens of a prompt's first ``num_tokens`` that stage ``stage`` keeps (``placeholders``:
    ``(offset, length)`` of each image item, ``length`` a whole number of images of ``keep``'s
    grid; or ``(offset, length, item_keep)`` with the item's own :class:`ImageKeep`, None for an
    item whose grid is not known: counted whole, which over-allocates and is safe). An image cut
    by ``num_tokens`` counts with the tokens of it that the stage keeps."""
    if stage == 0:
        return num_tokens
    lost = 0
    for place in placeholders:
        offset, length = place[0], place[1]
        item_keep = place[2] if len(place) > 2 else keep
        if item_keep is None:
            continue
        covered = min(max(num_tokens - offset, 0), length)
        lost += covered - item_keep.kept(stage, covered)
    return num_tokens - lost


def _item_keep(feature, spec) -> Optional[ImageKeep]:
    """The :class:`ImageKeep` of one multimodal item of a request, from its ``image_grid_thw`` or
    ``video_grid_thw`` (per-item grids), or its :class:`AnyresKeep` from its ``image_sizes``
    (OneVision), or None where the item carries no layout here (counted whole: safe)."""
    if spec.adsc_anyres:
        size = _compat.feature_values(feature, "image_sizes")
        if getattr(feature, "modality", "image") != "image" or size is None or len(size) != 2:
            return None
        keep = anyres_keep(spec.adsc_schedule, spec.adsc_anyres, size[0], size[1])
        # a multi-image item (base grid + 1 newline) is not the anyres layout: counted whole
        return keep if keep.tokens == int(feature.mm_position.length) else None
    grid = _compat.feature_grid_thw(feature)
    if grid is None or spec.adsc_merge <= 0:
        return None
    _, h, w = grid  # a video's t frames are t images of the grid (ImageKeep.kept counts them)
    m = spec.adsc_merge
    if h % m or w % m:
        return None
    try:
        return image_keep(spec.adsc_schedule, h // m, w // m)
    except ValueError:  # a grid the schedule cannot take (ScheduleError): the processor refuses it
        return None


#: request id -> {(item, schedule): ImageKeep or None}: each request's per-item grids, read once
#: (per-image grids); dropped when the scheduler frees the request
_ITEM_KEEPS: Dict[str, Dict[tuple, Optional[ImageKeep]]] = {}


class AdscStageManager(_FullAttentionManager):
    """Allocates a request's blocks for the stage's compacted length."""

    #: request id -> Request (the scheduler's table; set by AdscScheduler)
    requests: Optional[Dict[str, object]] = None

    def _compacted(self, request_id: str, num_tokens: int) -> int:
        spec = self.kv_cache_spec
        req = (self.requests or {}).get(request_id)
        if req is None or spec.adsc_stage == 0:
            return num_tokens
        keep = spec.adsc_keep
        if keep is not None:
            places = [(f.mm_position.offset, f.mm_position.length) for f in (req.mm_features or [])]
        else:
            cache = _ITEM_KEEPS.setdefault(request_id, {})
            places = []
            for i, f in enumerate(req.mm_features or []):
                key = (i, spec.adsc_schedule)
                if key not in cache:
                    cache[key] = _item_keep(f, spec)
                places.append((f.mm_position.offset, f.mm_position.length, cache[key]))
        return compacted_length(num_tokens, places, keep, spec.adsc_stage)

    def get_num_blocks_to_allocate(self, request_id, *args, **kwargs):
        args, kwargs = _compat.replace_token_counts(
            _FullAttentionManager.get_num_blocks_to_allocate, (request_id, *args), kwargs,
            lambda n: self._compacted(request_id, n),
        )
        return super().get_num_blocks_to_allocate(*args, **kwargs)

    def allocate_new_blocks(self, request_id, *args, **kwargs):
        args, kwargs = _compat.replace_token_counts(
            _FullAttentionManager.allocate_new_blocks, (request_id, *args), kwargs,
            lambda n: self._compacted(request_id, n),
        )
        return super().allocate_new_blocks(*args, **kwargs)


class AdscScheduler(_Scheduler):
    """vLLM's scheduler, handing its request table to the ADSC stage managers.

    Built by vLLM as ``scheduler_cls(vllm_config=..., ...)``; with ``async_scheduling`` on (what
    vLLM resolves after the config hook ran) the instance is an :class:`AdscAsyncScheduler`.
    """

    def __new__(cls, *args, **kwargs):
        config = kwargs.get("vllm_config", args[0] if args else None)
        if cls is AdscScheduler and getattr(config.scheduler_config, "async_scheduling", False):
            cls = AdscAsyncScheduler
        return super().__new__(cls)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for manager in _compat.single_type_managers(self.kv_cache_manager):
            if isinstance(manager, AdscStageManager):
                manager.requests = self.requests
        from .config import whole_images

        #: keep every image inside one chunk (models with a grid per image)
        self.adsc_whole_images = whole_images(_compat.scheduler_hf_config(self))
        logger.info(
            "ADSC: %s (per-stage KV-cache groups %s, whole images per chunk %s, async scheduling %s)",
            type(self).__name__,
            "on" if any(isinstance(m, AdscStageManager)
                        for m in _compat.single_type_managers(self.kv_cache_manager)) else "off",
            "on" if self.adsc_whole_images else "off",
            "on" if isinstance(self, _AsyncScheduler) else "off",
        )

    def _try_schedule_encoder_inputs(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs):
        """vLLM's, then (whole images) a chunk that would end inside an image ends before it.

        vLLM's ``disable_chunked_mm_input`` rolls a chunk back only while it starts before the
        image; one that starts exactly at the image's first token (after such a rollback) may
        still end inside it. Here that chunk is cut back to end before the image, so every
        image is prefilled inside one chunk; with nothing left the request waits for a step
        with room (vLLM skips a request with 0 new tokens). An image longer than the step's
        token budget could never be scheduled whole: vLLM refuses such a budget at start-up when
        ``disable_chunked_mm_input`` is set (which the config hook sets for these models).
        """
        out = super()._try_schedule_encoder_inputs(request, num_computed_tokens, num_new_tokens, *args, **kwargs)
        if not getattr(self, "adsc_whole_images", False):
            return out
        scheduled = _compat.encoder_schedule_tokens(out)
        end = num_computed_tokens + scheduled
        cut = None
        for f in request.mm_features or []:
            start, length = f.mm_position.offset, f.mm_position.length
            if start < end < start + length:
                cut = start if cut is None else min(cut, start)
        if cut is None:
            return out
        if cut < num_computed_tokens:  # a chunk that starts inside an image: never planned
            raise RuntimeError(
                f"ADSC: request {request.request_id} was scheduled from inside an image "
                f"({num_computed_tokens} computed tokens); its images must be prefilled whole"
            )
        return super()._try_schedule_encoder_inputs(
            request, num_computed_tokens, cut - num_computed_tokens, *args, **kwargs
        )

    def _free_request(self, request, *args, **kwargs):
        _ITEM_KEEPS.pop(request.request_id, None)
        return super()._free_request(request, *args, **kwargs)


class AdscAsyncScheduler(AdscScheduler, _AsyncScheduler):
    """:class:`AdscScheduler` over vLLM's ``AsyncScheduler``."""


def register() -> None:
    """Register the stage specs with their manager (each process; idempotent)."""
    for cls in STAGE_SPECS:
        _compat.register_kv_cache_spec(cls, AdscStageManager)
