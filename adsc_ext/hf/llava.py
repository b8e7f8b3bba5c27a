"""ADSC for Hugging Face LLaVA: :func:`apply_adsc`.

``apply_adsc(model)`` turns a ``transformers.LlavaForConditionalGeneration`` into an ADSC model by
swapping its class for a subclass (named like the original, so ``save_pretrained`` writes the same
``architectures``) that overrides ``forward``. Nothing in the library is monkeypatched and no
weights change; the schedule is stored in ``model.config.adsc_schedule``.

One forward call handles one *segment* of every sequence of the batch (the prompt at prefill, a
chunk of it with chunked prefill, or the new tokens of a decode step):

1. the segment is planned with :func:`adsc_ext.stage_plan` (images found from the image token id;
   decode steps carry no images and skip the plan);
2. image features are scattered into the embeddings as LLaVA does;
3. the decoder layers run on the stage layouts: at each stage boundary the hidden states and the
   rotary ``cos``/``sin`` are compacted with :func:`adsc_ext.compact_tokens`, the position ids and
   key masks are the plan's; every stage gets a causal mask for its own query and key lengths;
4. the cache (:class:`~adsc_ext.hf.cache.AdscCache`) stores per layer only its stage's K/V and
   remembers each stage's key mask and the next position id of every row.

Positions: a kept token keeps its original position (its index among the real tokens of its
sequence); generated token ``t`` of a row whose prompt had ``n`` real tokens gets ``n + t``
(spec section 5). ``position_ids`` passed by the caller are not used (``generate``'s are the same
numbers), except to detect packed inputs.

Outputs are in the layout of the last stage: ``logits`` is ``[B, S_last, V]`` (``[1, T_last, V]``
for packed inputs); ``adsc_source_index`` gives, for every logit row, the flat row of the input
layout it belongs to (``-1`` for padding) and ``adsc_position_ids`` its position id. With the empty
schedule the layout is the input's.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..schedule import LLAVA15_DEFAULT, Schedule, ScheduleError
from ._kernels import kernels
from .cache import AdscCache, AdscCacheState, AdscStaticCache

try:
    from transformers import LlavaForConditionalGeneration
    from transformers.cache_utils import Cache, DynamicCache, StaticCache
    from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast
except ImportError as exc:  # pragma: no cover
    raise ImportError("adsc_ext.hf needs the 'transformers' package (>= 5.17)") from exc

__all__ = [
    "AdscInputError",
    "AdscModelError",
    "AdscLlavaOutput",
    "apply_adsc",
    "remove_adsc",
    "is_adsc_model",
    "adsc_setup",
]

IGNORE_INDEX = -100


class AdscModelError(TypeError):
    """The model given to :func:`apply_adsc` is not a LLaVA-shaped model ADSC supports."""


class AdscInputError(ValueError):
    """Inputs an ADSC model cannot run: broken images, split images, mismatched features..."""


@dataclass
class AdscLlavaOutput(LlavaCausalLMOutputWithPast):
    """LLaVA's output plus the token layout of ``logits`` (the last stage's layout).

    adsc_source_index: int32, same leading shape as ``logits``: flat row of the input layout
        (``b * S + j`` for a padded batch, the packed row for packed inputs) of each logit row;
        ``-1`` for padding slots.
    adsc_position_ids: int64, same leading shape: the position id of each logit row.
    """

    adsc_source_index: Optional[torch.Tensor] = None
    adsc_position_ids: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class AdscSetup:
    """What :func:`apply_adsc` resolved about a model (kept on it as ``model._adsc``)."""

    schedule: Schedule
    grid: Tuple[int, int]
    image_token_id: int
    num_layers: int
    stage_of_layer: Tuple[int, ...]
    cache_kw: str  # the decoder layers' keyword for the cache: "past_key_values" or "cache"

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def boundaries(self) -> Dict[int, int]:
        """layer -> stage that starts before it."""
        return {layer: i + 1 for i, layer in enumerate(self.schedule.layers)}


# =============================================================================================
# apply_adsc
# =============================================================================================


def _unwrap(model):
    """The LLaVA model under a PEFT wrapper (or the model itself)."""
    seen = 0
    while hasattr(model, "get_base_model") and not isinstance(model, LlavaForConditionalGeneration) and seen < 4:
        model = model.get_base_model()
        seen += 1
    return model


def _text_model(model):
    return model.model.language_model


def _check_llava(model) -> Tuple[Tuple[int, int], int, int, str]:
    """Check that ``model`` is LLaVA-1.5 shaped; returns (grid, image token id, layers, cache kw)."""
    if not isinstance(model, LlavaForConditionalGeneration):
        raise AdscModelError(
            f"apply_adsc expects a transformers LlavaForConditionalGeneration (LLaVA-1.5 with a "
            f"LLaMA-family text model), got {type(model).__module__}.{type(model).__name__}"
        )
    cfg = model.config
    text = getattr(getattr(model, "model", None), "language_model", None)
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    missing = [n for n in needed if text is None or not hasattr(text, n)]
    if missing:
        raise AdscModelError(
            f"apply_adsc expects a LLaMA-family text model with {', '.join(needed)}; "
            f"{type(text).__name__} lacks {', '.join(missing)}"
        )
    layers = text.layers
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            raise AdscModelError(
                f"decoder layer {i} ({type(layer).__name__}) is not a LLaMA-family layer: it needs "
                f"self_attn with q_proj/k_proj/v_proj/o_proj"
            )
    tcfg = text.config
    layer_types = getattr(tcfg, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise AdscModelError(
            f"ADSC supports full causal attention in every layer; the text model has layer types "
            f"{sorted(set(layer_types))}"
        )
    if getattr(tcfg, "use_sliding_window", False) and getattr(tcfg, "sliding_window", None):
        raise AdscModelError("ADSC does not support sliding-window attention in the text model")

    vcfg = cfg.vision_config
    image_size, patch_size = getattr(vcfg, "image_size", None), getattr(vcfg, "patch_size", None)
    if not isinstance(image_size, int) or not isinstance(patch_size, int) or patch_size < 1:
        raise AdscModelError(
            f"the vision tower's config must give an int image_size and patch_size, got "
            f"{image_size!r} and {patch_size!r}"
        )
    if image_size % patch_size:
        raise AdscModelError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise AdscModelError(
            f"ADSC needs each image to be an H x W grid of tokens: vision_feature_select_strategy "
            f"must be 'default' (CLS dropped), got {strategy!r}"
        )
    side = image_size // patch_size
    image_token_id = getattr(cfg, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(cfg, "image_token_index", None)
    if image_token_id is None:
        raise AdscModelError("the model's config has no image_token_id / image_token_index")

    params = inspect.signature(type(layers[0]).forward).parameters
    if "past_key_values" in params:
        cache_kw = "past_key_values"
    elif "cache" in params:
        cache_kw = "cache"
    else:
        raise AdscModelError(
            f"decoder layer {type(layers[0]).__name__}.forward takes neither 'past_key_values' nor "
            f"'cache'; this transformers version is not supported"
        )
    return (side, side), int(image_token_id), len(layers), cache_kw


_ADSC_CLASSES: Dict[type, type] = {}


def _adsc_class(base: type) -> type:
    if getattr(base, "_is_adsc_class", False):
        return base
    cls = _ADSC_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (_AdscLlavaMixin, base), {"_is_adsc_class": True, "__module__": base.__module__})
        cls.__qualname__ = base.__qualname__
        _ADSC_CLASSES[base] = cls
    return cls


def resolve_schedule(config, schedule, num_layers: int, grid) -> Tuple[Schedule, list]:
    """The schedule to run (the argument, else ``config.adsc_schedule``, else ``LLAVA15_DEFAULT``),
    checked against the model: ``(schedule, stage infos)``; ScheduleError names the model's shape."""
    if schedule is None:
        schedule = getattr(config, "adsc_schedule", None)
        if schedule is None:
            schedule = LLAVA15_DEFAULT
    sched = Schedule.coerce(schedule)
    try:
        return sched, sched.validate(num_layers, grid)
    except ScheduleError as exc:
        raise ScheduleError(
            f"schedule '{sched}' does not fit this model ({num_layers} decoder layers, "
            f"{grid[0]}x{grid[1]} image grid): {exc}"
        ) from None


def apply_adsc(model, schedule=None):
    """Make a LLaVA model run ADSC; returns the model (changed in place).

    Args:
        model: a ``transformers.LlavaForConditionalGeneration`` (LLaVA-1.5, LLaMA-family text
            model), possibly wrapped by PEFT.
        schedule: a schedule string (``"8:2,16:2,24:2"``), a :class:`~adsc_ext.Schedule`, or
            None: the model's ``config.adsc_schedule`` if it has one, else ``LLAVA15_DEFAULT``.

    The schedule is checked against the model's decoder layers and image grid and stored in
    ``config.adsc_schedule``, so ``save_pretrained`` / ``from_pretrained`` + ``apply_adsc(model)``
    restores it. Calling it again replaces the schedule.

    Raises:
        AdscModelError: the model is not LLaVA-shaped.
        ScheduleError: the schedule does not parse or does not fit the layers or the grid.
    """
    base = _unwrap(model)
    grid, image_token_id, num_layers, cache_kw = _check_llava(base)
    sched, _ = resolve_schedule(base.config, schedule, num_layers, grid)
    base.config.adsc_schedule = str(sched)
    base._adsc = AdscSetup(
        schedule=sched,
        grid=grid,
        image_token_id=image_token_id,
        num_layers=num_layers,
        stage_of_layer=tuple(sched.stage_of_layer(l) for l in range(num_layers)),
        cache_kw=cache_kw,
    )
    base.__class__ = _adsc_class(type(base))
    return model


def remove_adsc(model):
    """Undo :func:`apply_adsc` (the class swap); ``config.adsc_schedule`` is removed too."""
    base = _unwrap(model)
    if getattr(type(base), "_is_adsc_class", False):
        base.__class__ = type(base).__mro__[2]
    base.__dict__.pop("_adsc", None)
    if hasattr(base.config, "adsc_schedule"):
        delattr(base.config, "adsc_schedule")
    return model


def is_adsc_model(model) -> bool:
    return getattr(type(_unwrap(model)), "_is_adsc_class", False)


def adsc_setup(model) -> AdscSetup:
    base = _unwrap(model)
    if not is_adsc_model(base):
        raise AdscModelError("the model is not an ADSC model; call adsc_ext.apply_adsc(model) first")
    return base._adsc


# =============================================================================================
# The model subclass
# =============================================================================================


class _AdscLlavaMixin:
    """Put before the LLaVA class in the MRO by :func:`apply_adsc`."""

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        vision_feature_layer=None,
        vision_feature_select_strategy: Optional[str] = None,
        labels: Optional[torch.LongTensor] = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        cache = past_key_values
        if "cache" in kwargs:  # newer transformers spell the keyword `cache`
            alt = kwargs.pop("cache")
            if cache is not None and alt is not None and alt is not cache:
                raise ValueError("pass the cache as either `past_key_values` or `cache`, not both")
            cache = cache if cache is not None else alt
        out = _adsc_forward(
            self,
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            labels=labels,
            logits_to_keep=logits_to_keep,
            image_sizes=image_sizes,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
            kwargs=kwargs,
        )
        if return_dict is False:
            return out.to_tuple()
        return out

    # generate() creates a plain DynamicCache / StaticCache; hand it ADSC caches instead.
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        res = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        for name in ("past_key_values", "cache"):
            c = model_kwargs.get(name)
            if c is None or isinstance(c, (AdscCache, AdscStaticCache)):
                continue
            if type(c) is DynamicCache and c.get_seq_length() == 0:
                model_kwargs[name] = _new_dynamic_cache(self.config)
            elif isinstance(c, StaticCache) and c.get_seq_length() == 0:
                max_new = generation_config.max_new_tokens
                if max_new is None:
                    raise AdscInputError(
                        "a static cache for ADSC needs generate(max_new_tokens=...) (its per-stage "
                        "buffers are sized as stage prompt length + max_new_tokens)"
                    )
                model_kwargs[name] = AdscStaticCache(self.config, max_new_tokens=max_new)
        return res

    # generate() builds 4-D masks for compileable caches; ADSC builds its own per stage from the
    # 2-D mask, so keep that.
    def create_masks_for_generate(self, *args, attention_mask=None, **kwargs):
        return attention_mask


def _new_dynamic_cache(config) -> AdscCache:
    try:
        return AdscCache(config=config.get_text_config(decoder=True))
    except TypeError:  # older signatures
        return AdscCache()


# =============================================================================================
# Segments: the per-stage layout of the tokens of one forward call
# =============================================================================================


@dataclass
class _Stage:
    index: Optional[torch.Tensor]  # int32 gather index from the previous stage; None = same layout
    position_ids: torch.Tensor  # int64 [B, q_s] ([1, T_s] packed)
    valid: torch.Tensor  # bool, same shape
    source_index: Optional[torch.Tensor]  # int32 flat input rows, -1 padding; None = identity
    cu_seqlens: Optional[torch.Tensor]  # int32 [n+1] (packed layout)
    max_seqlen: int
    has_padding: bool


@dataclass
class _Segment:
    layout: str  # "padded" | "packed"
    stages: List[_Stage]
    real_per_row: torch.Tensor  # int64 [B]: real tokens of the segment per row


def _image_runs(row: Sequence[int], tok: int) -> List[Tuple[int, int]]:
    runs, p, n = [], 0, len(row)
    while p < n:
        if row[p] != tok:
            p += 1
            continue
        q = p
        while q < n and row[q] == tok:
            q += 1
        runs.append((p, q))
        p = q
    return runs


def _check_images(setup: AdscSetup, ids: torch.Tensor, valid: torch.Tensor, continuation: bool, packed_cu=None):
    """Readable errors for image tokens that do not form whole images (spec section 3)."""
    hw, (h, w) = setup.tokens_per_image, setup.grid
    tok = setup.image_token_id
    if packed_cu is not None:
        flat = ids.reshape(-1).tolist()
        cu = packed_cu.tolist()
        rows = [flat[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]
    else:
        ids_l, valid_l = ids.tolist(), valid.tolist()
        rows = [[t for t, v in zip(r, m) if v] for r, m in zip(ids_l, valid_l)]
    for b, row in enumerate(rows):
        for p, q in _image_runs(row, tok):
            n = q - p
            if n % hw == 0:
                continue
            if q == len(row) and packed_cu is None:
                raise AdscInputError(
                    f"sequence {b}: the prompt (chunk) ends inside an image: its last {n} tokens are "
                    f"image tokens, not a multiple of {hw} ({h}x{w} tokens per image). An image must "
                    f"not be split across prefill chunks; end each chunk between whole images."
                )
            if p == 0 and continuation:
                raise AdscInputError(
                    f"sequence {b}: this prefill chunk starts inside an image: its first {n} tokens "
                    f"are image tokens, not a multiple of {hw} ({h}x{w} tokens per image). An image "
                    f"must not be split across prefill chunks."
                )
            raise AdscInputError(
                f"sequence {b}: image tokens must form whole images of {h}x{w} = {hw} tokens; got a "
                f"run of {n} image tokens (id {tok}) at position {p}"
            )


def _padding_side(mask: Optional[torch.Tensor]) -> str:
    if mask is None:
        return "left"
    return "right" if bool((mask[:, -1] == 0).any()) else "left"


def _plan_segment(setup, ids, seg_mask, next_pos) -> _Segment:
    stage_plan, _ = kernels()
    B, q = ids.shape
    valid0 = seg_mask.bool() if seg_mask is not None else torch.ones(B, q, dtype=torch.bool, device=ids.device)
    plan = stage_plan(
        setup.schedule,
        input_ids=ids,
        attention_mask=valid0,
        image_token_id=setup.image_token_id,
        grid=setup.grid,
        padding_side=_padding_side(seg_mask),
    )
    stages = []
    for s, st in enumerate(plan.stages):
        valid = st.attention_mask
        pos = st.position_ids
        if next_pos is not None:
            pos = torch.where(valid, pos + next_pos[:, None], pos)
        stages.append(
            _Stage(
                index=st.index if s > 0 else None,
                position_ids=pos,
                valid=valid,
                source_index=st.source_index,
                cu_seqlens=st.cu_seqlens,
                max_seqlen=int(st.max_seqlen),
                has_padding=int(st.num_tokens) != valid.numel(),
            )
        )
    return _Segment("padded", stages, valid0.sum(dim=1))


def _text_segment(setup, B, q, seg_mask, next_pos, device) -> _Segment:
    """A segment with no images (decode steps): every stage has the input layout."""
    if seg_mask is None:
        valid = torch.ones(B, q, dtype=torch.bool, device=device)
        pos = torch.arange(q, device=device).expand(B, q)
    else:
        valid = seg_mask.bool()
        pos = (valid.long().cumsum(dim=1) - 1).masked_fill(~valid, 1)
    if next_pos is not None:
        pos = torch.where(valid, pos + next_pos[:, None], pos)
    st = _Stage(None, pos, valid, None, None, q, seg_mask is not None)
    return _Segment("padded", [st] * (len(setup.schedule) + 1), valid.sum(dim=1))


def _packed_segment(setup, ids, cu) -> _Segment:
    stage_plan, _ = kernels()
    flat = ids.reshape(-1)
    plan = stage_plan(
        setup.schedule,
        input_ids=flat,
        cu_seqlens=cu.to(torch.int32),
        image_token_id=setup.image_token_id,
        grid=setup.grid,
    )
    stages = []
    for s, st in enumerate(plan.stages):
        stages.append(
            _Stage(
                index=st.index if s > 0 else None,
                position_ids=st.position_ids.unsqueeze(0),
                valid=(st.source_index >= 0).unsqueeze(0),
                source_index=st.source_index.unsqueeze(0),
                cu_seqlens=st.cu_seqlens,
                max_seqlen=int(st.max_seqlen),
                has_padding=False,
            )
        )
    return _Segment("packed", stages, torch.tensor([flat.numel()], device=ids.device))


def _packed_cu(attention_mask, position_ids, kwargs, B) -> Optional[torch.Tensor]:
    """cu_seqlens of a packed (padding-free) batch, or None if the batch is not packed."""
    if attention_mask is not None or B != 1:
        return None
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:
        return cu.to(torch.int64)
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
        return None
    pos = position_ids[0]
    starts = torch.nonzero(pos[1:] <= pos[:-1]).flatten() + 1
    if starts.numel() == 0:
        return None
    zero = torch.zeros(1, dtype=torch.int64, device=pos.device)
    end = torch.tensor([pos.numel()], dtype=torch.int64, device=pos.device)
    return torch.cat([zero, starts.to(torch.int64), end])


# =============================================================================================
# Masks
# =============================================================================================


def _causal_allowed(kv_valid: torch.Tensor, q: int, offset) -> torch.Tensor:
    """bool [B, 1, q, K]: query i (slot offset+i) sees key j iff j is real and j <= offset+i.

    A query also always sees its own slot, so padding queries stay finite (they are never read).
    """
    K = kv_valid.shape[1]
    dev = kv_valid.device
    qpos = torch.arange(q, device=dev)[:, None] + offset
    kpos = torch.arange(K, device=dev)[None, :]
    allowed = kv_valid[:, None, :] & (kpos <= qpos)[None]
    allowed = allowed | (kpos == qpos)[None]
    return allowed[:, None]


def _packed_allowed(cu: torch.Tensor, T: int) -> torch.Tensor:
    dev = cu.device
    seg = torch.bucketize(torch.arange(T, device=dev), cu[1:].long(), right=True)
    i = torch.arange(T, device=dev)
    allowed = (seg[:, None] == seg[None, :]) & (i[None, :] <= i[:, None])
    return allowed[None, None]


def _attn_mask(impl: str, allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def _is_flash(impl: str) -> bool:
    return "flash" in (impl or "")


# =============================================================================================
# The forward
# =============================================================================================


def _image_features(model, pixel_values, mm, vfl, vfss, image_sizes) -> Optional[torch.Tensor]:
    """Projected image features as ``[num_image_tokens, D]`` (None without images)."""
    out = None
    if mm is not None and mm.get("image") is not None:
        out = mm["image"]
    elif pixel_values is not None:
        cfg = model.config
        kw = dict(
            pixel_values=pixel_values,
            vision_feature_layer=vfl if vfl is not None else cfg.vision_feature_layer,
            vision_feature_select_strategy=vfss if vfss is not None else cfg.vision_feature_select_strategy,
        )
        if image_sizes is not None:
            kw["image_sizes"] = image_sizes
        try:
            out = model.model.get_image_features(**kw, return_dict=True)
        except TypeError:
            out = model.model.get_image_features(**kw)
    if out is None:
        return None
    feats = getattr(out, "pooler_output", out) if not isinstance(out, (list, tuple, torch.Tensor)) else out
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], dim=0)
    return feats.reshape(-1, feats.shape[-1])


def embed_with_images(model, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                      image_token_id: int) -> torch.Tensor:
    """Token embeddings of ``input_ids`` (any shape) with the projected image features scattered
    into the image-token rows, in order (the runtime engine's and the FastV baseline's input)."""
    h = model.get_input_embeddings()(input_ids)
    if pixel_values is not None and pixel_values.shape[0]:
        feats = _image_features(model, pixel_values.to(h.device, h.dtype), None, None, None, None).to(h.dtype)
        h = h.masked_scatter((input_ids == image_token_id)[..., None], feats)
    return h


def _adsc_forward(
    self,
    *,
    input_ids,
    pixel_values,
    attention_mask,
    position_ids,
    cache,
    inputs_embeds,
    vision_feature_layer,
    vision_feature_select_strategy,
    labels,
    logits_to_keep,
    image_sizes,
    use_cache,
    output_hidden_states,
    output_attentions,
    kwargs,
):
    setup: AdscSetup = self._adsc
    text = _text_model(self)
    if output_attentions:
        raise NotImplementedError("output_attentions is not supported by ADSC models")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids or inputs_embeds")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise AdscInputError(
            f"ADSC builds its own per-stage masks from a 2-D attention_mask [batch, length]; got a "
            f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}"
        )
    mm = kwargs.pop("mm_encoder_outputs", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    kwargs.pop("cache_position", None)
    cu_kw = kwargs.pop("cu_seq_lens_q", None)
    for k in ("cu_seq_lens_k", "max_length_q", "max_length_k"):  # recomputed per stage
        kwargs.pop(k, None)

    # ---- the cache ---------------------------------------------------------------------------
    if cache is not None and not isinstance(cache, (AdscCache, AdscStaticCache)):
        if type(cache) is DynamicCache and cache.get_seq_length() == 0:
            cache.__class__ = AdscCache  # an empty plain cache: adopt it
            cache.adsc = None
        else:
            raise AdscInputError(
                f"an ADSC model needs an AdscCache (or an empty DynamicCache) as its cache, got "
                f"{type(cache).__name__}; its layers hold different lengths per stage"
            )
    ref = inputs_embeds if inputs_embeds is not None else input_ids
    B, q = ref.shape[:2]
    device = ref.device
    packed_cu = _packed_cu(attention_mask, position_ids, {"cu_seq_lens_q": cu_kw} if cu_kw is not None else {}, B)
    if packed_cu is not None and cache is not None and cache.adsc is not None:
        raise AdscInputError("packed (padding-free) inputs cannot continue a cache")
    if use_cache is None:
        use_cache = bool(getattr(text.config, "use_cache", True)) and not self.training
    if packed_cu is not None:
        use_cache = False
    if cache is None and use_cache:
        cache = _new_dynamic_cache(self.config)
    state: Optional[AdscCacheState] = cache.adsc if cache is not None else None
    first = state is None

    # ---- embeddings and images -----------------------------------------------------------------
    embed = self.get_input_embeddings()
    ids = input_ids
    if inputs_embeds is None:
        inputs_embeds = embed(input_ids)
    elif ids is None:
        tok_emb = embed(torch.tensor(setup.image_token_id, device=device)).to(inputs_embeds.dtype)
        is_img = (inputs_embeds == tok_emb).all(-1)
        ids = torch.where(is_img, setup.image_token_id, 0 if setup.image_token_id != 0 else 1).long()
    has_features = pixel_values is not None or (mm is not None and mm.get("image") is not None)
    seg_mask = attention_mask[:, -q:] if attention_mask is not None else None
    # ---- the segment's layout (the plan also checks that image tokens form whole images) --------
    try:
        if packed_cu is not None:
            seg = _packed_segment(setup, ids, packed_cu)
        elif first or has_features:
            seg = _plan_segment(setup, ids, seg_mask, None if first else state.next_pos)
        else:
            seg = _text_segment(setup, B, q, seg_mask, state.next_pos, device)
    except ValueError as exc:
        # Only on failure: walk the tokens again for a message that names a split prefill chunk.
        valid0 = seg_mask.bool() if seg_mask is not None else torch.ones(B, q, dtype=torch.bool, device=device)
        _check_images(setup, ids, valid0, continuation=not first, packed_cu=packed_cu)
        raise AdscInputError(str(exc)) from exc
    feats = _image_features(self, pixel_values, mm, vision_feature_layer, vision_feature_select_strategy, image_sizes)
    if feats is not None:
        img_mask = ids == setup.image_token_id
        n_tok = int(img_mask.sum())
        if n_tok != feats.shape[0]:
            hw = setup.tokens_per_image
            raise AdscInputError(
                f"the input has {n_tok} image tokens ({n_tok / hw:g} images of {hw}) but the images "
                f"give {feats.shape[0]} feature rows ({feats.shape[0] / hw:g} images)"
            )
        feats = feats.to(inputs_embeds.device, inputs_embeds.dtype)
        inputs_embeds = inputs_embeds.masked_scatter(img_mask.unsqueeze(-1).to(inputs_embeds.device), feats)

    # ---- the cache's bookkeeping -----------------------------------------------------------------
    static = isinstance(cache, AdscStaticCache)
    if cache is not None and first:
        if static:
            cache.allocate(setup.stage_of_layer, [st.valid.shape[1] for st in seg.stages], B, device)
        else:
            cache.adsc = AdscCacheState(
                setup.stage_of_layer,
                [torch.zeros(B, 0, dtype=torch.bool, device=device) for _ in seg.stages],
                torch.zeros(B, dtype=torch.long, device=device),
            )
        state = cache.adsc
    kv = []  # per stage: (key valid [B, K], offset of the segment's first slot)
    if cache is None:
        kv = [(st.valid, 0) for st in seg.stages]
    elif static:
        offsets = [cache.filled(s) for s in range(len(seg.stages))]
        cache.record([st.valid for st in seg.stages], seg.real_per_row)
        kv = [(state.valid[s], offsets[s]) for s in range(len(seg.stages))]
    else:
        kv = [(torch.cat([state.valid[s], st.valid], dim=1), state.valid[s].shape[1]) for s, st in enumerate(seg.stages)]

    hidden, all_hidden = _run_decoder(
        text, setup, inputs_embeds, seg, kv, cache, use_cache, bool(output_hidden_states), kwargs
    )
    if cache is not None and not static:
        state.append([st.valid for st in seg.stages], seg.real_per_row)

    # ---- head and loss ---------------------------------------------------------------------------------
    last = seg.stages[-1]
    h = hidden
    if isinstance(logits_to_keep, int) and logits_to_keep > 0 and labels is None:
        h = hidden[:, -logits_to_keep:]
    elif isinstance(logits_to_keep, torch.Tensor) and labels is None:
        h = hidden[:, logits_to_keep]
    logits = self.lm_head(h)
    loss = None
    if labels is not None:
        loss = _adsc_loss(logits, labels, seg, packed_cu, num_items)
    src = last.source_index
    if src is None:  # identity layout
        src = torch.where(
            last.valid,
            torch.arange(B * q, device=device, dtype=torch.int32).view(B, q),
            torch.full((), -1, dtype=torch.int32, device=device),
        )
    return AdscLlavaOutput(
        loss=loss,
        logits=logits,
        past_key_values=cache if use_cache else None,
        hidden_states=tuple(all_hidden) if output_hidden_states else None,
        attentions=None,
        image_hidden_states=feats,
        adsc_source_index=src,
        adsc_position_ids=last.position_ids,
    )


def _run_decoder(text, setup: AdscSetup, hidden, seg: _Segment, kv, cache, use_cache, want_hidden, kwargs):
    _, compact_tokens = kernels()
    impl = getattr(text.config, "_attn_implementation", None) or "eager"
    if impl == "flex_attention":
        raise NotImplementedError("ADSC models run with eager, sdpa or flash attention, not flex_attention")
    flash = _is_flash(impl)
    packed = seg.layout == "packed"

    def stage_inputs(s: int):
        st = seg.stages[s]
        kv_valid, offset = kv[s]
        extra = {}
        if packed:
            if flash:
                cu = st.cu_seqlens.to(torch.int32)
                extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=st.max_seqlen, max_length_k=st.max_seqlen)
                mask = None
            else:
                mask = _attn_mask(impl, _packed_allowed(st.cu_seqlens, st.valid.shape[1]), hidden.dtype)
        elif flash:
            mask = kv_valid.to(torch.long)  # 2-D key mask; FlashAttention unpads with it
        elif impl == "sdpa" and offset == 0 and not st.has_padding and kv_valid.shape[1] == st.valid.shape[1]:
            mask = None  # plain causal prefill: let SDPA use is_causal
        else:
            mask = _attn_mask(impl, _causal_allowed(kv_valid, st.valid.shape[1], offset), hidden.dtype)
        return mask, st.position_ids, extra

    cos, sin = text.rotary_emb(hidden, seg.stages[0].position_ids)
    mask, pos, extra = stage_inputs(0)
    boundaries = setup.boundaries
    all_hidden = [hidden] if want_hidden else []
    for l, layer in enumerate(text.layers[: setup.num_layers]):
        s = boundaries.get(l)
        if s is not None:
            idx = seg.stages[s].index
            if idx is not None:
                # Plan indices are in range by construction: no range check, so no GPU sync here.
                if packed:
                    hidden = compact_tokens(hidden[0], idx, check_index=False).unsqueeze(0)
                    cos = compact_tokens(cos[0], idx, check_index=False).unsqueeze(0)
                    sin = compact_tokens(sin[0], idx, check_index=False).unsqueeze(0)
                else:
                    hidden = compact_tokens(hidden, idx, check_index=False)
                    cos = compact_tokens(cos, idx, check_index=False)
                    sin = compact_tokens(sin, idx, check_index=False)
            mask, pos, extra = stage_inputs(s)
        lkw = dict(attention_mask=mask, position_ids=pos, use_cache=use_cache, position_embeddings=(cos, sin))
        lkw[setup.cache_kw] = cache
        out = layer(hidden, **lkw, **extra, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out
        if want_hidden:
            all_hidden.append(hidden)
    hidden = text.norm(hidden)
    if want_hidden:
        all_hidden[-1] = hidden
    return hidden, all_hidden


def _adsc_loss(logits, labels, seg: _Segment, packed_cu, num_items):
    """Spec 6.4: targets shifted on the input sequence, then compacted with the tokens."""
    labels = labels.to(logits.device)
    if packed_cu is not None:
        flat = labels.reshape(-1)
        shifted = torch.cat([flat[1:], flat.new_full((1,), IGNORE_INDEX)])
        ends = packed_cu[1:].to(flat.device) - 1
        shifted[ends[ends >= 0]] = IGNORE_INDEX
    else:
        if labels.shape != seg.stages[0].valid.shape:
            raise AdscInputError(
                f"labels must have the shape of input_ids {tuple(seg.stages[0].valid.shape)}, got {tuple(labels.shape)}"
            )
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        shifted = shifted.masked_fill(~seg.stages[0].valid, IGNORE_INDEX).reshape(-1)
    last = seg.stages[-1]
    if last.source_index is None:
        target = shifted.view(last.valid.shape)
    else:
        src = last.source_index.long()
        target = shifted[src.clamp(min=0)].masked_fill(src < 0, IGNORE_INDEX)
    logits = logits.float()
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    if num_items is not None:
        denom = num_items.to(total.device) if isinstance(num_items, torch.Tensor) else num_items
    else:
        denom = (target != IGNORE_INDEX).sum()
    return total / denom
