"""ADSC for Hugging Face LLaVA: :func:`apply_adsc`.

``apply_adsc(model)`` makes a ``transformers.LlavaForConditionalGeneration`` run ADSC without
replacing any of its code: transformers runs its own LLaVA / LLaMA forward, and adsc_ext acts only
where ADSC changes something, through module hooks (``register_forward_pre_hook(with_kwargs=True)``
and ``register_forward_hook``). Module names, classes and the state dict stay as they are, so
PEFT, ``save_pretrained``, gradient checkpointing, ``Trainer`` and pickling work unchanged; the
schedule is stored in ``model.config.adsc_schedule``.

- **Before the model's forward** (a pre-hook on the ``LlavaForConditionalGeneration``): the
  forward's segment (the prompt, a prefill chunk, or a decode step's new tokens) is planned with
  :func:`adsc_ext.stage_plan` (images found from the image token id; decode steps have no images
  and need no plan). The position ids become the plan's, the cache becomes an
  :class:`~adsc_ext.hf.cache.AdscCache` (a fresh one in place of an empty ``DynamicCache``, as
  ``generate`` passes), and ``labels`` are taken aside for the ADSC loss.
- **Before each decoder layer** (a pre-hook on every layer): the layer gets its stage's attention
  mask, position ids, rotary ``(cos, sin)`` and, for packed flash attention, ``cu_seq_lens_*``.
  Before the first layer of a stage the hidden states and ``cos``/``sin`` are compacted with
  :func:`adsc_ext.compact_tokens` (the layers before it returned the previous stage's layout).
- **After the model's forward** (a forward hook): the cache's per-stage bookkeeping is advanced,
  the loss of spec section 6.4 is set, and the layout of the logits is attached.

Positions: a kept token keeps its original position (its index among the real tokens of its
sequence); generated token ``t`` of a row whose prompt had ``n`` real tokens gets ``n + t``
(spec section 5). ``position_ids`` passed by the caller are not used (``generate``'s are the same
numbers), except to detect packed inputs.

Outputs are transformers' own output class, in the layout of the last stage: ``logits`` is
``[B, S_last, V]`` (``[1, T_last, V]`` for packed inputs). :func:`adsc_layout` gives, for every
logit row, the flat row of the input it belongs to (``-1`` for padding) and its position id.
With the empty schedule the layout is the input's.

What this needs from transformers beyond its documented API is in :mod:`adsc_ext.hf._compat`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from ..models.llava import AdscInputError, AdscModelError, llava_spec, resolve_schedule, unwrap
from ..schedule import Schedule
from . import _compat
from .cache import AdscCache, AdscCacheState
from .segments import (Segment, adsc_loss, causal_allowed, check_images, find_packed_cu, packed_allowed, packed_segment,
                       plan_segment, text_segment)

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
    """What :func:`apply_adsc` resolved about a model (:func:`adsc_setup` returns it)."""

    schedule: Schedule
    grid: Tuple[int, int]
    image_token_id: int
    num_layers: int
    stage_of_layer: Tuple[int, ...]

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def boundaries(self) -> Dict[int, int]:
        """layer -> stage that starts before it."""
        return {layer: i + 1 for i, layer in enumerate(self.schedule.layers)}


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
        raise ValueError(
            "this output carries no ADSC layout: it must come from a model given to apply_adsc, "
            "called with return_dict=True"
        )
    return layout


# =============================================================================================
# apply_adsc
# =============================================================================================


def apply_adsc(model, schedule=None):
    """Make a LLaVA model run ADSC; returns the model (changed in place: hooks and the config).

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
    base = unwrap(model)
    spec = llava_spec(base)
    try:
        cache_kw = _compat.cache_kwarg(base)
    except TypeError as exc:
        raise AdscModelError(str(exc)) from None
    sched, _ = resolve_schedule(base.config, schedule, spec.num_layers, spec.grid)
    remove_adsc(base, keep_config=True)
    setup = AdscSetup(
        schedule=sched,
        grid=spec.grid,
        image_token_id=spec.image_token_id,
        num_layers=spec.num_layers,
        stage_of_layer=tuple(sched.stage_of_layer(l) for l in range(spec.num_layers)),
    )
    base.config.adsc_schedule = str(sched)
    state = _State(setup, cache_kw)
    handles = [
        base.register_forward_pre_hook(_ModelPreHook(state), with_kwargs=True),
        base.register_forward_hook(_ModelHook(state), with_kwargs=True),
    ]
    for l, layer in enumerate(base.model.language_model.layers[: spec.num_layers]):
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

    seg: Segment
    kv: List[Tuple[torch.Tensor, int]]  # per stage: (key valid [B, K], slot of the segment's first query)
    cache: Optional[AdscCache]
    impl: str
    dtype: torch.dtype
    labels: Optional[torch.Tensor]
    num_items: Optional[torch.Tensor]
    packed_cu: Optional[torch.Tensor]
    layer_kwargs: Dict[int, dict]  # stage -> the kwargs its layers get (built at its first layer)
    rope: Dict[int, Tuple[torch.Tensor, torch.Tensor]]  # stage -> (cos, sin)
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


class _ModelPreHook:
    def __init__(self, state: _State):
        self.state = state

    def __call__(self, module, args, kwargs):
        setup = self.state.setup
        kw = _bind(module, args, kwargs)
        if kw.get("output_attentions"):
            raise NotImplementedError("output_attentions is not supported by ADSC models")
        input_ids, inputs_embeds = kw.get("input_ids"), kw.get("inputs_embeds")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids or inputs_embeds")
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
                    raise ValueError(f"pass the cache once (as {cache_name!r}), not under two names")
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
        packed_cu = find_packed_cu(attention_mask, kw.get("position_ids"), cu_kw, B)
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
        if ids is None:  # image tokens recognised by their embedding, as LLaVA does
            emb = module.get_input_embeddings()
            tok_emb = emb(torch.tensor(setup.image_token_id, device=device)).to(inputs_embeds.dtype)
            is_img = (inputs_embeds == tok_emb).all(-1)
            ids = torch.where(is_img, setup.image_token_id, 0 if setup.image_token_id != 0 else 1).long()
        pixel_values = kw.get("pixel_values")
        mm = kw.get("mm_encoder_outputs")
        has_features = pixel_values is not None or (mm is not None and mm.get("image") is not None)
        seg_mask = attention_mask[:, -q:] if attention_mask is not None else None
        try:
            if packed_cu is not None:
                seg = packed_segment(setup, ids, packed_cu)
            elif first or has_features:
                seg = plan_segment(setup, ids, seg_mask, None if first else state.next_pos)
            else:
                if q > 1 and bool((ids == setup.image_token_id).any()):  # a prefill chunk, not a decode step
                    raise AdscInputError(
                        "this prefill chunk continues a cache and holds image tokens but no pixel_values: "
                        "pass the chunk's images with it (images are downsampled in the chunk that holds them)"
                    )
                seg = text_segment(setup, B, q, seg_mask, state.next_pos, device)
        except ValueError as exc:
            # Only on failure: walk the tokens again for a message that names a split prefill chunk.
            valid0 = seg_mask.bool() if seg_mask is not None else torch.ones(B, q, dtype=torch.bool, device=device)
            check_images(setup, ids, valid0, continuation=not first, packed_cu=packed_cu)
            raise AdscInputError(str(exc)) from exc
        if pixel_values is not None:
            n_tok = int((ids == setup.image_token_id).sum())
            rows = pixel_values.shape[0] * setup.tokens_per_image
            if n_tok != rows:
                hw = setup.tokens_per_image
                raise AdscInputError(
                    f"the input has {n_tok} image tokens ({n_tok / hw:g} images of {hw}) but the images "
                    f"give {rows} feature rows ({pixel_values.shape[0]} images)"
                )

        if cache is not None and first:
            cache.adsc = AdscCacheState(
                setup.stage_of_layer,
                [torch.zeros(B, 0, dtype=torch.bool, device=device) for _ in seg.stages],
                torch.zeros(B, dtype=torch.long, device=device),
            )
            state = cache.adsc
        if cache is None:
            kv = [(st.valid, 0) for st in seg.stages]
        else:
            kv = [(torch.cat([state.valid[s], st.valid], dim=1), state.valid[s].shape[1])
                  for s, st in enumerate(seg.stages)]
        text = module.model.language_model
        dtype = (inputs_embeds if inputs_embeds is not None else text.embed_tokens.weight).dtype
        self.state.current = _Forward(
            seg=seg, kv=kv, cache=cache, impl=_compat.attn_implementation(text.config), dtype=dtype,
            labels=kw.pop("labels", None), num_items=kw.get("num_items_in_batch"), packed_cu=packed_cu,
            layer_kwargs={}, rope={},
        )
        if cache is not None:
            kw[cache_name] = cache
        kw["position_ids"] = seg.stages[0].position_ids  # stage 0's rotary comes from these
        return (), kw


class _LayerPreHook:
    def __init__(self, state: _State, layer: int):
        self.state = state
        self.layer = layer
        self.stage = state.setup.stage_of_layer[layer]
        self.first_of_stage = layer == 0 or state.setup.boundaries.get(layer) is not None

    def __call__(self, module, args, kwargs):
        fwd = self.state.current
        if fwd is None or not fwd.active:  # a layer called on its own, outside an ADSC model's forward
            return None
        s = self.stage
        hidden, positional = _compat.layer_hidden(args, kwargs)
        expect = fwd.seg.stages[s - 1 if self.first_of_stage and s > 0 else s].valid.shape
        if tuple(hidden.shape[:2]) != tuple(expect):  # not this forward's layout: a direct call
            return None
        if self.first_of_stage:
            if s == 0:
                fwd.rope[0] = kwargs["position_embeddings"]
            else:
                idx = fwd.seg.stages[s].index
                cos, sin = fwd.rope[s - 1]
                if idx is not None:
                    from ..ops import compact_tokens

                    # Plan indices are in range by construction: no range check, so no GPU sync here.
                    if fwd.seg.layout == "packed":
                        hidden = compact_tokens(hidden[0], idx, check_index=False).unsqueeze(0)
                        cos = compact_tokens(cos[0], idx, check_index=False).unsqueeze(0)
                        sin = compact_tokens(sin[0], idx, check_index=False).unsqueeze(0)
                    else:
                        hidden = compact_tokens(hidden, idx, check_index=False)
                        cos = compact_tokens(cos, idx, check_index=False)
                        sin = compact_tokens(sin, idx, check_index=False)
                fwd.rope[s] = (cos, sin)
        lkw = fwd.layer_kwargs.get(s)
        if lkw is None:
            lkw = fwd.layer_kwargs[s] = self._stage_kwargs(fwd, s)
        kwargs = {**kwargs, **lkw, "position_embeddings": fwd.rope[s]}
        if positional:
            return (hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = hidden
        return args, kwargs

    @staticmethod
    def _stage_kwargs(fwd: _Forward, s: int) -> dict:
        st = fwd.seg.stages[s]
        kv_valid, offset = fwd.kv[s]
        flash = _compat.is_flash(fwd.impl)
        out = {"position_ids": st.position_ids}
        if fwd.seg.layout == "packed":
            if flash:
                cu = st.cu_seqlens.to(torch.int32)
                out.update(attention_mask=None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                           max_length_q=st.max_seqlen, max_length_k=st.max_seqlen)
            else:
                out["attention_mask"] = _compat.format_mask(fwd.impl, packed_allowed(st.cu_seqlens, st.valid.shape[1]),
                                                            fwd.dtype)
        elif flash:
            out["attention_mask"] = kv_valid.to(torch.long)  # a 2-D key mask: FlashAttention unpads with it
        elif fwd.impl == "sdpa" and offset == 0 and not st.has_padding and kv_valid.shape[1] == st.valid.shape[1]:
            out["attention_mask"] = None  # plain causal prefill: SDPA's is_causal
        else:
            out["attention_mask"] = _compat.format_mask(fwd.impl, causal_allowed(kv_valid, st.valid.shape[1], offset),
                                                        fwd.dtype)
        return out


class _ModelHook:
    def __init__(self, state: _State):
        self.state = state

    def __call__(self, module, args, kwargs, output):
        fwd = self.state.current
        if fwd is None:
            return None
        fwd.active = (module.training and torch.is_grad_enabled()
                      and _compat.layer_checkpointed(module.model.language_model.layers[0]))
        seg = fwd.seg
        if fwd.cache is not None:
            fwd.cache.adsc.advance([v for v, _ in fwd.kv], seg.real_per_row)  # the [B, L_s + q_s] key masks
        last = seg.stages[-1]
        src = last.source_index
        if src is None:  # identity layout
            B, q = last.valid.shape
            src = torch.where(last.valid, torch.arange(B * q, device=last.valid.device, dtype=torch.int32).view(B, q),
                              torch.full((), -1, dtype=torch.int32, device=last.valid.device))
        logits = output["logits"] if not isinstance(output, tuple) else output[0]
        loss = None if fwd.labels is None else adsc_loss(logits, fwd.labels, seg, fwd.packed_cu, fwd.num_items)
        if isinstance(output, tuple):
            return output if loss is None else (loss, *output)
        if loss is not None:  # first, as transformers' outputs have it (output[0], to_tuple())
            output = type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
        output.adsc_layout = AdscLayout(src, last.position_ids)
        return output
