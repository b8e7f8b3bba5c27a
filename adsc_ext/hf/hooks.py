"""ADSC for Hugging Face multimodal models: :func:`apply_adsc`.

``apply_adsc(model)`` makes a transformers model with a model spec (:mod:`adsc_ext.models`:
LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...) run ADSC without replacing any of its code:
transformers runs its own forward, and adsc_ext acts only where ADSC changes something, through
module hooks (``register_forward_pre_hook(with_kwargs=True)`` and ``register_forward_hook``).
Module names, classes and the state dict stay as they are, so PEFT, ``save_pretrained``, gradient
checkpointing, ``Trainer`` and pickling work unchanged; the schedule is stored in
``model.config.adsc_schedule``. Nothing here knows an architecture: what differs between them is
asked of the model spec.

- **Before the model's forward** (a pre-hook on the model): the forward's segment (the prompt, a
  prefill chunk, or a decode step's new tokens) is handed to the spec as a
  :class:`~adsc_ext.models.Segment` -- its token ids, real-token mask, layout (padded or packed),
  whether it continues a cache, and every other argument the forward got (``pixel_values``,
  ``image_grid_thw``, ``video_grid_thw``, ``image_sizes``, ``mm_encoder_outputs``,
  ``mm_token_type_ids``, the caller's ``position_ids``...). The spec answers
  (:meth:`~adsc_ext.models.ModelSpec.segment_inputs`) with the plan's image arguments (image spans
  ``[N, 4]`` or ``[N, 5]`` in the segment's layout, or a token scan) -- or None for a segment
  that is laid out as it is (a decode step) -- and the stage-0 positions (any leading shape:
  M-RoPE's ``[4, B, q]``). The segment gets its :class:`~adsc_ext.layout.StagedLayout`; the
  position ids become the layout's, the cache becomes an :class:`~adsc_ext.hf.cache.AdscCache` (a
  fresh one in place of an empty ``DynamicCache``, as ``generate`` passes), and ``labels`` are
  taken aside for the ADSC loss.
- **Before each decoder layer** (a pre-hook on every layer): the layer gets its stage's attention
  mask, position ids (the text row of multi-component positions, as transformers passes them),
  rotary ``(cos, sin)`` and, for packed flash attention, ``cu_seq_lens_*``. Before the first layer
  of a stage the hidden states and ``cos``/``sin`` are compacted by the layout
  (:meth:`StagedLayout.enter`; the layers before it returned the previous stage's layout).
- **After the model's forward** (a forward hook): the cache's per-stage bookkeeping is advanced
  (its key masks, and every row's next position by the spec's continuation rule,
  :meth:`~adsc_ext.models.ModelSpec.next_positions`), the loss of spec section 6.4 is set, and
  the layout of the logits is attached.

Positions: a kept token keeps its original position (every component of it); the next token of a
row continues from the row's positions by the spec's rule (spec section 5: ``n + t`` for a prompt
of ``n`` real tokens after ``t`` generated ones; Qwen-VL's rotary rows ``n + t + rope_delta``).
A continuation segment's positions come from the cache, not from the caller (``generate``'s are
the same numbers); a first segment's are the spec's (LLaVA: each token's index; Qwen-VL: the
caller's M-RoPE rows when given, else computed from the grids).

Outputs are transformers' own output class, in the layout of the last stage: ``logits`` is
``[B, S_last, V]`` (``[1, T_last, V]`` for packed inputs). :func:`adsc_layout` gives, for every
logit row, the flat row of the input it belongs to (``-1`` for padding) and its position id.
With the empty schedule the layout is the input's.

What this needs from transformers beyond its documented API is in :mod:`adsc_ext.hf._compat`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import AdscInputError, AdscModelError
from ..layout import IGNORE_INDEX, StagedLayout, StageMap
from ..models.base import ModelSpec, Segment, model_spec, unwrap
from ..schedule import Schedule
from . import _compat
from .cache import AdscCache, AdscCacheState

try:
    from transformers import DynamicCache
except ImportError as exc:  # pragma: no cover
    raise ImportError("adsc_ext.hf needs the 'transformers' package (>= 5.17)") from exc

__all__ = [
    "AdscInputError",
    "AdscModelError",
    "AdscLayout",
    "AdscSetup",
    "adsc_layout",
    "adsc_setup",
    "apply_adsc",
    "is_adsc_model",
    "remove_adsc",
]


@dataclass(frozen=True)
class AdscSetup:
    """What :func:`apply_adsc` resolved about a model (:func:`adsc_setup` returns it): the
    schedule, the model's spec (its facts; the model itself is not referenced) and the stage of
    every decoder layer."""

    schedule: Schedule
    spec: ModelSpec = field(compare=False)
    stages: StageMap = field(compare=False)

    @property
    def grid(self) -> Optional[Tuple[int, int]]:
        """The one image grid of a model whose images all have it (LLaVA-1.5), else None."""
        return self.spec.schedule_grid()

    @property
    def image_token_id(self) -> int:
        return self.spec.image_token_id

    @property
    def tokens_per_image(self) -> Optional[int]:
        grid = self.grid
        return None if grid is None else grid[0] * grid[1]

    @property
    def num_layers(self) -> int:
        return self.stages.num_layers

    @property
    def stage_of_layer(self) -> Tuple[int, ...]:
        return self.stages.stage_of_layer

    @property
    def boundaries(self) -> Dict[int, int]:
        """layer -> stage that starts before it."""
        return dict(self.stages.boundaries)


@dataclass(frozen=True)
class AdscLayout:
    """The token layout of an ADSC forward's ``logits`` (the last stage's layout).

    source_index: int32, the leading shape of ``logits``: the flat row of the input layout
        (``b * S + j`` for a padded batch, the packed row for packed inputs) of each logit row;
        ``-1`` for padding slots.
    position_ids: int64, the same shape: the position id of each logit row.
    """

    source_index: torch.Tensor
    position_ids: torch.Tensor


def adsc_layout(output) -> AdscLayout:
    """The :class:`AdscLayout` of the logits of an ADSC model's output (``return_dict=True``)."""
    layout = getattr(output, "adsc_layout", None)
    if not isinstance(layout, AdscLayout):
        raise AdscInputError(
            "this output carries no ADSC layout: it must come from a model given to apply_adsc, "
            "called with return_dict=True"
        )
    return layout


# =============================================================================================
# apply_adsc
# =============================================================================================


def apply_adsc(model, schedule=None):
    """Make a multimodal model run ADSC; returns the model (changed in place: hooks and the config).

    Args:
        model: a transformers model with a model spec (:func:`adsc_ext.models.registered_architectures`:
            ``LlavaForConditionalGeneration`` (LLaVA-1.5, LLaMA-family text model),
            ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``,
            ``Qwen3VLForConditionalGeneration``, ...), possibly wrapped by PEFT.
        schedule: a schedule string (``"8:2,16:2,24:2"``), a :class:`~adsc_ext.Schedule`, or
            None: the model's ``config.adsc_schedule`` if it has one, else the architecture's
            default (LLaVA-1.5: ``8:2,16:2,24:2``; others: spec section 2's rule).

    The schedule is checked against the model's decoder layers (and the image grid of a model
    with one; a model with per-image grids checks every image when it is planned) and stored in
    ``config.adsc_schedule``, so ``save_pretrained`` / ``from_pretrained`` + ``apply_adsc(model)``
    restores it. Calling it again replaces the schedule.

    Raises:
        AdscModelError: the model has no spec, or a shape its spec refuses.
        ScheduleError: the schedule does not parse or does not fit the layers or the grid.
    """
    base = unwrap(model)
    spec = model_spec(base)
    try:
        cache_kw = _compat.cache_kwarg(base)
    except TypeError as exc:
        raise AdscModelError(str(exc)) from None
    sched, _ = spec.resolve_schedule(schedule, base.config)
    remove_adsc(base, keep_config=True)
    setup = AdscSetup(schedule=sched, spec=spec.unbound(), stages=StageMap(sched, spec.num_layers))
    base.config.adsc_schedule = str(sched)
    state = _State(setup, cache_kw)
    handles = [
        base.register_forward_pre_hook(_ModelPreHook(state), with_kwargs=True),
        base.register_forward_hook(_ModelHook(state), with_kwargs=True),
    ]
    for l, layer in enumerate(spec.layers[: spec.num_layers]):
        handles.append(layer.register_forward_pre_hook(_LayerPreHook(state, l), with_kwargs=True))
    base._adsc = setup
    base._adsc_hooks = handles
    return model


def remove_adsc(model, keep_config: bool = False):
    """Undo :func:`apply_adsc` (removes its hooks, and ``config.adsc_schedule`` unless ``keep_config``)."""
    base = unwrap(model)
    for handle in base.__dict__.pop("_adsc_hooks", []):
        handle.remove()
    base.__dict__.pop("_adsc", None)
    if not keep_config and hasattr(base.config, "adsc_schedule"):
        delattr(base.config, "adsc_schedule")
    return model


def is_adsc_model(model) -> bool:
    return isinstance(getattr(unwrap(model), "_adsc", None), AdscSetup)


def adsc_setup(model) -> AdscSetup:
    base = unwrap(model)
    if not is_adsc_model(base):
        raise AdscModelError("the model is not an ADSC model; call adsc_ext.apply_adsc(model) first")
    return base._adsc


# =============================================================================================
# The hooks
# =============================================================================================


@dataclass
class _Forward:
    """What one forward call of an ADSC model runs with.

    The layer hooks act while ``active``: from the model's pre-hook to its forward hook, and after
    that as long as a backward pass may recompute layers (a training forward with gradients: with
    gradient checkpointing, transformers releases before 5.23 run a layer's hooks again in the
    backward's recompute). Layers called on their own outside a forward are left alone.
    """

    layout: StagedLayout
    cache: Optional[AdscCache]
    impl: str
    dtype: torch.dtype
    labels: Optional[torch.Tensor]
    num_items: Optional[torch.Tensor]
    layer_kwargs: Dict[int, dict] = field(default_factory=dict)  # stage -> its layers' kwargs (built once)
    rope: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # stage -> (cos, sin)
    active: bool = True


class _State:
    """The per-model state the hooks share: the setup and, per thread, the current forward (two
    threads may run one model at once, as a server around it does)."""

    def __init__(self, setup: AdscSetup, cache_kw: str):
        self.setup = setup
        self.cache_kw = cache_kw  # the forward's cache argument (_compat item 2), found once
        self._local = threading.local()

    @property
    def current(self) -> Optional[_Forward]:
        return getattr(self._local, "forward", None)

    @current.setter
    def current(self, fwd: Optional[_Forward]) -> None:
        self._local.forward = fwd

    def __getstate__(self):  # pickling / deepcopy of a model: the last forward's tensors are not state
        return {"setup": self.setup, "cache_kw": self.cache_kw}

    def __setstate__(self, state):
        self.__init__(state["setup"], state["cache_kw"])


def _bind(module, args, kwargs) -> dict:
    """The model's forward arguments as keywords."""
    if not args:
        return dict(kwargs)
    params = _compat.forward_parameters(module)
    out = dict(zip(params, args))
    out.update(kwargs)
    return out


def _padding_side(mask: Optional[torch.Tensor]) -> str:
    if mask is None:
        return "left"
    return "right" if bool((mask[:, -1] == 0).any()) else "left"


def _packed_cu(attention_mask, position_ids, cu_kw, B) -> Optional[torch.Tensor]:
    """cu_seqlens of a packed (padding-free) batch, or None if the batch is not packed: given as
    flash attention's ``cu_seq_lens_q``, or read from position ids that restart at each sequence."""
    if attention_mask is not None or B != 1:
        return None
    if cu_kw is not None:
        return cu_kw.to(torch.int64)
    if position_ids is not None and position_ids.dim() == 3 and position_ids.shape[0] == 4:
        position_ids = position_ids[0]  # M-RoPE with its text row first: the text model detects packing from it
    if position_ids is None or position_ids.dim() != 2 or position_ids.shape[-1] < 2:
        return None
    pos = position_ids[0]
    starts = torch.nonzero(pos[1:] <= pos[:-1]).flatten() + 1
    if starts.numel() == 0:
        return None
    zero = torch.zeros(1, dtype=torch.int64, device=pos.device)
    end = torch.tensor([pos.numel()], dtype=torch.int64, device=pos.device)
    return torch.cat([zero, starts.to(torch.int64), end])


class _ModelPreHook:
    def __init__(self, state: _State):
        self.state = state

    def __call__(self, module, args, kwargs):
        self.state.current = None  # nothing of an earlier forward (one that raised, too) carries over
        setup = self.state.setup
        spec = setup.spec.bind(module)
        kw = _bind(module, args, kwargs)
        if kw.get("output_attentions"):
            raise NotImplementedError("output_attentions is not supported by ADSC models")
        input_ids, inputs_embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if (input_ids is None) == (inputs_embeds is None):
            raise AdscInputError("give exactly one of input_ids or inputs_embeds")
        attention_mask = kw.get("attention_mask")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise AdscInputError(
                f"ADSC builds its own per-stage masks from a 2-D attention_mask [batch, length]; got a "
                f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}"
            )
        if getattr(module, "_is_replica", False):
            raise NotImplementedError(
                "an ADSC model cannot run under torch.nn.DataParallel (its replicas would share one "
                "hook state); use DistributedDataParallel, one process per GPU"
            )
        cache_name = self.state.cache_kw
        cache = None
        for name in _compat.CACHE_KWARGS:
            c = kw.pop(name, None)
            if c is not None:
                if cache is not None and c is not cache:
                    raise AdscInputError(f"pass the cache once (as {cache_name!r}), not under two names")
                cache = c
        text_config = module.config.get_text_config(decoder=True)
        if cache is not None and not isinstance(cache, AdscCache):
            if type(cache) is DynamicCache and cache.get_seq_length() == 0:
                cache = AdscCache(config=text_config)  # generate()'s fresh cache: ours continues it
            else:
                raise AdscInputError(
                    f"an ADSC model needs an AdscCache (or an empty DynamicCache) as its cache, got "
                    f"{type(cache).__name__}; its layers hold different lengths per stage"
                )
        ref = inputs_embeds if inputs_embeds is not None else input_ids
        B, q = ref.shape[:2]
        device = ref.device
        cu_kw = kw.pop("cu_seq_lens_q", None)
        for name in _compat.FLASH_VARLEN_KWARGS[1:]:  # recomputed per stage
            kw.pop(name, None)
        kw.pop("cache_position", None)
        packed_cu = _packed_cu(attention_mask, kw.get("position_ids"), cu_kw, B)
        if packed_cu is not None and cache is not None and cache.adsc is not None:
            raise AdscInputError("packed (padding-free) inputs cannot continue a cache")
        use_cache = kw.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(text_config, "use_cache", True)) and not module.training
        if packed_cu is not None:
            use_cache = False
        if not use_cache:
            cache = None
        elif cache is None:
            cache = AdscCache(config=text_config)
        kw["use_cache"] = use_cache
        state = cache.adsc if cache is not None else None
        first = state is None

        ids = input_ids
        if ids is None:  # placeholder tokens recognised by their embedding, as the models do
            ids = _placeholder_ids(module, spec, inputs_embeds)
        seg_mask = attention_mask[:, -q:] if attention_mask is not None else None
        valid0 = seg_mask.bool() if seg_mask is not None else torch.ones(B, q, dtype=torch.bool, device=device)
        seg = Segment(input_ids=ids, valid=valid0, padding_side=_padding_side(seg_mask), packed_cu=packed_cu,
                      continuation=not first, schedule=setup.schedule,
                      inputs={k: v for k, v in kw.items() if k not in _NOT_INPUTS})
        plan = None
        try:
            got = spec.segment_inputs(seg)  # images None: a continuation laid out as it is (a decode step)
            if got.images is not None:
                plan = spec.plan(setup.schedule, **seg.layout, images=got.images)
        except AdscInputError:
            raise
        except ValueError as exc:
            # Only on failure: walk the tokens again for a message that names a split prefill chunk.
            spec.check_images(ids, valid0, continuation=not first, packed_cu=packed_cu)
            raise AdscInputError(str(exc)) from exc
        if plan is not None:
            spec.check_features(seg)

        pos = got.position_ids
        if cache is not None and first:
            lead = () if pos is None else tuple(pos.shape[:-2])
            cache.adsc = AdscCacheState(
                setup.stage_of_layer,
                [torch.zeros(B, 0, dtype=torch.bool, device=device) for _ in range(setup.stages.num_stages)],
                torch.zeros(*lead, B, dtype=torch.long, device=device),
            )
            state = cache.adsc
        cached = None if state is None else state.valid
        next_pos = None if first else state.next_pos
        if packed_cu is not None:  # the spec saw the packed tokens [T]; the model takes [1, T]
            pos = None if pos is None else pos.unsqueeze(-2)
            layout = StagedLayout.packed(setup.stages, plan, position_ids=pos, batch_dim=True)
        elif plan is not None:
            layout = StagedLayout.padded(setup.stages, plan, position_ids=pos, next_pos=next_pos, cache_valid=cached)
        else:
            layout = StagedLayout.text(setup.stages, B, q, device=device, mask=seg_mask, next_pos=next_pos,
                                       cache_valid=cached)
        text = spec.text_model()
        dtype = (inputs_embeds if inputs_embeds is not None else text.embed_tokens.weight).dtype
        self.state.current = _Forward(
            layout=layout, cache=cache, impl=_compat.attn_implementation(text.config), dtype=dtype,
            labels=kw.pop("labels", None), num_items=kw.get("num_items_in_batch"),
        )
        if cache is not None:
            kw[cache_name] = cache
        kw["position_ids"] = layout.stages[0].position_ids  # stage 0's rotary comes from these
        return (), kw


#: forward arguments that are not processor outputs (a Segment's ``inputs`` leaves them out)
_NOT_INPUTS = frozenset(("input_ids", "inputs_embeds", "attention_mask", "labels", "use_cache", "return_dict",
                         "output_attentions", "output_hidden_states", "logits_to_keep", "num_items_in_batch",
                         *_compat.CACHE_KWARGS))


def _placeholder_ids(module, spec: ModelSpec, inputs_embeds: torch.Tensor) -> torch.Tensor:
    """Token ids for a forward given ``inputs_embeds``: a placeholder's id where a row equals its
    embedding (how the models themselves find the rows their features go to), else a text id."""
    emb = module.get_input_embeddings()
    toks = spec.placeholder_ids
    other = next(t for t in range(len(toks) + 1) if t not in toks)
    ids = torch.full(inputs_embeds.shape[:-1], other, dtype=torch.long, device=inputs_embeds.device)
    for tok in toks:
        row = emb(torch.tensor(tok, device=inputs_embeds.device)).to(inputs_embeds.dtype)
        ids = torch.where((inputs_embeds == row).all(-1), tok, ids)
    return ids


class _LayerPreHook:
    def __init__(self, state: _State, layer: int):
        self.state = state
        self.layer = layer
        stages = state.setup.stages
        self.stage = stages.stage_of_layer[layer]
        self.entering = layer == stages.first_layers[self.stage]

    def __call__(self, module, args, kwargs):
        fwd = self.state.current
        if fwd is None or not fwd.active:  # a layer called on its own, outside an ADSC model's forward
            return None
        s, layout = self.stage, fwd.layout
        hidden, positional = _compat.layer_hidden(args, kwargs)
        expect = layout.stages[s - 1 if self.entering and s > 0 else s].shape
        if tuple(hidden.shape[:2]) != tuple(expect):  # not this forward's layout: a direct call
            return None
        if self.entering:
            if s == 0:
                fwd.rope[0] = kwargs["position_embeddings"]
            else:
                hidden, cos, sin = layout.enter(s, hidden, *fwd.rope[s - 1])
                fwd.rope[s] = (cos, sin)
        lkw = fwd.layer_kwargs.get(s)
        if lkw is None:
            lkw = fwd.layer_kwargs[s] = _stage_kwargs(fwd, s)
        kwargs = {**kwargs, **lkw, "position_embeddings": fwd.rope[s]}
        if positional:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs


def _stage_kwargs(fwd: _Forward, s: int) -> dict:
    """The keyword arguments every layer of stage ``s`` gets: its positions and its attention mask
    in the form the attention implementation takes (_compat item 1)."""
    layout = fwd.layout
    st = layout.stages[s]
    flash = _compat.is_flash(fwd.impl)
    pos = st.position_ids
    if pos.dim() > len(st.shape):  # M-RoPE [4, *tokens]: the layers get the text row, as transformers passes it
        pos = pos[0]
    out: Dict[str, Any] = {"position_ids": pos}
    if layout.kind == "packed":
        if flash:
            cu = st.cu_seqlens.to(torch.int32)
            out.update(attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                       max_length_q=st.max_seqlen, max_length_k=st.max_seqlen)
        else:
            out["attention_mask"] = _compat.format_mask(fwd.impl, layout.attention_mask(s), fwd.dtype)
    elif flash:
        out["attention_mask"] = st.keys.to(torch.long)  # a 2-D key mask: FlashAttention unpads with it
    elif fwd.impl == "sdpa" and st.offset == 0 and not st.has_padding and st.keys.shape[1] == st.shape[1]:
        out["attention_mask"] = None  # plain causal prefill: SDPA's is_causal
    else:
        out["attention_mask"] = _compat.format_mask(fwd.impl, layout.attention_mask(s), fwd.dtype)
    return out


def _loss(logits: torch.Tensor, labels: torch.Tensor, layout: StagedLayout, num_items) -> torch.Tensor:
    """Spec 6.4: the mean cross-entropy of every kept token against the token that followed it."""
    target = layout.loss_targets(labels.to(logits.device))
    if logits.shape[:-1] != target.shape:
        raise AdscInputError(
            f"the loss needs the logits of every token (logits_to_keep=0); got logits for "
            f"{tuple(logits.shape[:-1])} of {tuple(target.shape)} token slots"
        )
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items is not None:
        denom = num_items.to(total.device) if isinstance(num_items, torch.Tensor) else num_items
    else:
        denom = (target != IGNORE_INDEX).sum()
    return total / denom


class _ModelHook:
    def __init__(self, state: _State):
        self.state = state

    def __call__(self, module, args, kwargs, output):
        fwd = self.state.current
        if fwd is None:
            return None
        spec = self.state.setup.spec
        fwd.active = (module.training and torch.is_grad_enabled()
                      and _compat.layer_checkpointed(spec.bind(module).layers[0]))
        layout = fwd.layout
        if fwd.cache is not None:  # the [B, L_s + q_s] key masks, and each row's next position
            st0, state = layout.stages[0], fwd.cache.adsc
            state.advance([st.keys for st in layout.stages],
                          next_pos=spec.next_positions(st0.position_ids, st0.mask, state.next_pos))
        logits = output["logits"] if not isinstance(output, tuple) else output[0]
        loss = None if fwd.labels is None else _loss(logits, fwd.labels, layout, fwd.num_items)
        # Nothing of this forward outlives it: the cache and labels are the caller's, and the layout,
        # masks and rotary tables stay only while a backward may recompute layers (``active``).
        fwd.cache = fwd.labels = fwd.num_items = None
        if not fwd.active:
            self.state.current = None
        if isinstance(output, tuple):
            return output if loss is None else (loss, *output)
        if loss is not None:  # first, as transformers' outputs have it (output[0], to_tuple())
            output = type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
        output.adsc_layout = AdscLayout(layout.source_rows(-1), layout.stages[-1].position_ids)
        return output
