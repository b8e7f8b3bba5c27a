"""ADSC inside vLLM's LLaVA, Qwen2.5-VL / Qwen2-VL and LLaVA-OneVision:
:class:`AdscLlavaForConditionalGeneration`, :class:`AdscQwen2_5_VLForConditionalGeneration`,
:class:`AdscQwen2VLForConditionalGeneration` and :class:`AdscLlavaOnevisionForConditionalGeneration`.

Subclasses of vLLM's own models: their vision towers, projectors, tensor-parallel decoder layers,
weight loading and multimodal processors are vLLM's. Only the decoder loop is ours, one for both
(:class:`AdscStages`). Without ``adsc_schedule`` in the HF config each class *is* vLLM's model (the
forward is the parent's). With one, each forward:

1. plans the packed step once (:func:`~adsc_ext.integrations.vllm.chunks.plan_step`: requests
   from the attention metadata's ``query_start_loc``, image tokens from the runner's multimodal
   mask, i.e. the rows where it placed image embeddings). A request's chunk may start or end
   inside an image (vLLM's chunked prefill cuts wherever the token budget ends): the stage keeps
   of a partial image what it keeps of the whole one, so chunked and unchunked prefill agree;
2. runs vLLM's decoder layers; before each stage's first layer the hidden states, the residual
   and the positions are compacted with :func:`adsc_ext.compact_tokens` (positions keep their
   original values: RoPE is not re-indexed);
3. gives every layer of stage ``s`` that stage's attention metadata, built by the backend's own
   metadata builder: the compacted query lengths, sequence lengths ``context_s + kept_s`` and
   slot mappings of the compacted sequence, so stage ``s`` writes K/V only for its kept tokens
   and later steps read only those;
4. scatters the last stage's hidden states back to the step's token rows (vLLM samples from the
   last row of each request: ADSC keeps it whenever it is a prompt's last token or a decode
   token; a chunk that ends inside an image samples nothing that vLLM keeps).

Qwen2.5-VL differs in where the grids come from: each image has its own, read per step from its
M-RoPE positions ``[3, T]`` (:func:`~adsc_ext.integrations.vllm.chunks.plan_grid_step`), which the
stages compact on their last dim; its images are prefilled whole inside one chunk (the scheduler
in :mod:`.kv_groups` sees to it). KV slots always come from sequence indices, not positions.

LLaVA-OneVision (:class:`AdscLlavaOnevisionForConditionalGeneration`): 1-D positions, but each
image has its own anyres layout (a base grid, then a high-resolution grid whose rows end with a
newline token), read per step from the image's embeddings in ``embed_input_ids``
(:func:`~adsc_ext.integrations.vllm.chunks.plan_items_step`); its images are also prefilled whole.

Per-request state across steps (:class:`RequestTable`): per stage, how many of the request's
tokens the stage has dropped so far (token at position ``p`` sits at index ``p - dropped[s]`` of
stage ``s``'s compacted sequence), and the phase, how far into an unfinished image the request's
computed tokens end. It lives in a device table indexed by the request's first KV block (a block
belongs to one running request while prefix caching is off, which the plugin ensures), sized by
the KV cache's current block count.

KV memory: by default each stage's layers are a KV-cache group of their own (:mod:`.kv_groups`):
vLLM gives every group its own block table, and a request holds blocks for ``L_s`` tokens in
stage ``s``'s group, so each stage's slots ``0 .. L_s - 1`` are computed from that group's block
table. With ``ADSC_VLLM_KV_GROUPS=0`` all stages share vLLM's one group and stage ``s`` uses the
first ``L_s`` slots of the request's blocks (compute saved, memory allocated for full length).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from vllm.logger import init_logger
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.model_executor.models.llava import LlavaForConditionalGeneration
from vllm.model_executor.models.llava_onevision import LlavaOnevisionForConditionalGeneration
from vllm.model_executor.models.qwen2_5_vl import Qwen2_5_VLForConditionalGeneration
from vllm.model_executor.models.qwen2_vl import Qwen2VLForConditionalGeneration

from ...layout import kv_slots
from ...schedule import Schedule, ScheduleError
from . import _compat
from .chunks import image_keep, plan_grid_step, plan_items_step, plan_step, plan_text_step, request_of_token
from .config import kv_groups_enabled, llava_adsc_setup, onevision_adsc_setup, qwen_adsc_setup

logger = init_logger(__name__)

__all__ = ["AdscLlavaForConditionalGeneration", "AdscQwen2_5_VLForConditionalGeneration",
           "AdscQwen2VLForConditionalGeneration", "AdscLlavaOnevisionForConditionalGeneration", "AdscStages",
           "RequestTable", "ImageGridError"]


class RequestTable:
    """Per-request state across steps: int32 ``[blocks, stages + 1]``, one row per KV block id
    (the request's first block), columns ``0 .. stages-1`` the tokens each stage has dropped,
    column ``stages`` the phase inside an unfinished image.

    Sized by the KV cache's block count at each step: when it grows (vLLM 0.34's extensible KV
    cache commits more blocks after warm-up), the table grows with it and keeps its rows. Where
    the count is not known the largest block id of the step sizes it (one host read).
    """

    def __init__(self, num_stages: int) -> None:
        self.num_stages = num_stages
        self.table: Optional[torch.Tensor] = None

    def rows_for(self, first_blocks: torch.Tensor, num_blocks: Optional[int]) -> torch.Tensor:
        """The table, at least ``num_blocks`` rows (or enough for ``first_blocks``), on
        ``first_blocks``' device."""
        need = num_blocks
        if not need:
            need = int(first_blocks.max()) + 1 if first_blocks.numel() else 1
        t = self.table
        if t is None or t.shape[0] < need or t.device != first_blocks.device:
            new = torch.zeros((need, self.num_stages + 1), dtype=torch.int32, device=first_blocks.device)
            if t is not None:
                new[: t.shape[0]] = t.to(new.device)
            self.table = t = new
        return t


class AdscStages:
    """The staged decoder loop over vLLM's LLaMA-family text model (one per model instance).

    ``grid``: every image's ``(H, W)`` token grid (LLaVA-1.5), or None when each image has its own
    grid, read per step from the M-RoPE positions ``[3, T]`` (Qwen2-VL / Qwen2.5-VL, whose images
    the scheduler keeps whole inside one chunk; ``merge`` is the vision tower's spatial merge,
    which the KV managers need to read a request's grids from its ``image_grid_thw``).
    """

    def __init__(self, text_model, schedule: Schedule, grid: Optional[Tuple[int, int]], vllm_config,
                 *, merge: int = 1, anyres: str = "") -> None:
        self.layers = _compat.decoder_layers(text_model)
        self.text_model = text_model
        self.schedule = schedule
        self.grid = grid
        self.merge = int(merge)
        #: LLaVA-OneVision's anyres geometry (``kv_groups.anyres_spec``), "" for other models
        self.anyres = str(anyres)
        self.vllm_config = vllm_config
        self.keep = image_keep(str(schedule), *grid) if grid is not None else None
        self.attn = [_compat.attention_layer(layer) for layer in self.layers]
        n = len(self.attn)
        self.stage_of_layer = [schedule.stage_of_layer(i) for i in range(n)]
        self.num_stages = len(schedule) + 1
        self.stage_layer_names: List[List[str]] = [[] for _ in range(self.num_stages)]
        for i, a in enumerate(self.attn):
            self.stage_layer_names[self.stage_of_layer[i]].append(a.layer_name)
        self.boundaries: Dict[int, int] = {layer: s + 1 for s, layer in enumerate(schedule.layers)}
        self._builders: Dict[Tuple[str, ...], object] = {}
        self.requests = RequestTable(self.num_stages)
        self._layout_checked = False
        #: the runner's multimodal mask of the coming forward (set by embed_input_ids)
        self.pending_mm_mask: Optional[torch.Tensor] = None
        #: a model whose images each have their own layout of grids (LLaVA-OneVision): the coming
        #: forward's image items (``ImageItem``, set by embed_input_ids from the embeddings)
        self.per_item_layout = bool(self.anyres)
        self.pending_items: Optional[list] = None
        #: what the last forward did, for tests and logs: stage token counts
        self.last_stage_tokens: Optional[List[int]] = None

    # ---- state -----------------------------------------------------------------------------
    def _builder_for(self, names: Tuple[str, ...]):
        """The metadata builder for the layers ``names`` (one KV-cache group)."""
        if names not in self._builders:
            first = next(a for a in self.attn if a.layer_name == names[0])
            self._builders[names] = _compat.make_metadata_builder(first, list(names), self.vllm_config)
        return self._builders[names]

    def _kv_groups_of(self, ctx, stage: int) -> List[Tuple[Tuple[str, ...], object]]:
        """The layers of stage ``stage`` by the runner's metadata of this forward: one entry per
        KV-cache group (the runner builds one metadata object per group, with the group's block
        table). vLLM may split a stage's layers into several groups of one spec (it makes all
        groups the same size: a schedule whose stages have 2, 1, 1 and 2 layers gives groups of
        one layer), each with its own block table."""
        groups: Dict[int, Tuple[List[str], object]] = {}
        for name in self.stage_layer_names[stage]:
            md = _compat.layer_metadata(ctx, name)
            groups.setdefault(id(md), ([], md))[0].append(name)
        return [(tuple(names), md) for names, md in groups.values()]

    def use_stage_kv_groups(self) -> None:
        """Give each stage's layers their own KV-cache spec (:mod:`.kv_groups`): vLLM then
        keeps one block table per stage, sized by the stage's tokens."""
        from . import kv_groups

        for i, attn in enumerate(self.attn):
            s = self.stage_of_layer[i]

            def make(own, _vllm_config, _s=s):
                return kv_groups.stage_spec(own, _s, str(self.schedule), self.grid, merge=self.merge,
                                            anyres=self.anyres)

            _compat.override_kv_cache_spec(attn, make)

    def _check_layout(self, view: _compat.BatchView, context: torch.Tensor, block_size: int):
        """Once: the runner's slots must be ``block_table[r, p // bs] * bs + p % bs`` for the
        token at sequence index ``p`` (the rule the stages' slots are computed with; with M-RoPE
        the index is not a position)."""
        T = view.num_tokens
        if self._layout_checked or T == 0:
            return
        req = request_of_token(view.query_start_loc, T)
        local = torch.arange(T, device=req.device) - view.query_start_loc.long()[req]
        pos = context.long()[req] + local
        want = kv_slots(view.block_table, req, pos, block_size)
        if not torch.equal(want, view.slot_mapping[:T].long()):
            raise NotImplementedError(
                f"ADSC computes each stage's KV slots as block_table[r, p // {block_size}] * "
                f"{block_size} + p % {block_size}; this vLLM build's runner maps slots differently "
                f"(kernel block size != cache block size?)"
            )
        self._layout_checked = True

    # ---- the forward -----------------------------------------------------------------------
    def forward(self, input_ids, positions: torch.Tensor, inputs_embeds) -> torch.Tensor:
        from ... import compact_tokens

        lm = self.text_model
        mm_mask, self.pending_mm_mask = self.pending_mm_mask, None
        items, self.pending_items = self.pending_items, None
        hidden = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        ctx = _compat.forward_context()
        md0 = _compat.layer_metadata(ctx, self.attn[0].layer_name)
        view = _compat.batch_view(md0) if md0 is not None else None
        if view is None or not self.schedule or view.num_tokens == 0:
            # Profiling / warm-up (no metadata) or the empty schedule: vLLM's own loop (the
            # unmodified layout is the most memory any step can need).
            self.last_stage_tokens = None
            return self._run_layers(hidden, positions, None)

        T = view.num_tokens
        bs = int(self.vllm_config.cache_config.block_size)
        cu = view.query_start_loc
        # the runner's multimodal mask: None when the step has no image embeddings
        is_image = None
        if mm_mask is not None and mm_mask.shape[0] >= T:
            is_image = mm_mask[:T].to(device=hidden.device, dtype=torch.bool)

        q_len = (cu[1:] - cu[:-1]).to(torch.int32)
        context = view.seq_lens - q_len  # tokens of each request already in the cache
        self._check_layout(view, context, bs)
        first_blocks = view.block_table[:, 0].long()
        table = self.requests.rows_for(first_blocks, _compat.num_kv_blocks(self.vllm_config))
        # a request that starts here (its row may be a finished request's) starts from zeros
        state = table[first_blocks] * (context > 0).to(torch.int32)[:, None]  # [B, S+1]
        S = self.num_stages
        dropped, phase = state[:, :S], state[:, S]
        if is_image is None:  # decode steps, text chunks: every stage keeps every token
            plan = plan_text_step(S, cu, phase)
        elif self.per_item_layout:  # each image's layout from its embeddings; whole images
            plan = plan_items_step(self.schedule, is_image, cu, items or [])
        elif self.keep is None:  # a grid per image, from the M-RoPE positions; whole images
            plan = plan_grid_step(self.schedule, is_image, positions, cu)
        else:
            plan = plan_step(self.keep, is_image, cu, phase)
        self.last_stage_tokens = [st.num_tokens for st in plan.stages]

        def assign_stage(s: int, assign) -> None:
            st = plan.stages[s]
            ctx_s = context - dropped[:, s]
            seq_s = (ctx_s + st.seq_lens).to(torch.int32)
            req = st.request
            within = torch.arange(st.num_tokens, device=cu.device) - st.cu_seqlens.long()[req]
            idx = ctx_s.long()[req] + within
            # each KV-cache group of the stage's layers has its own block table (per-stage
            # groups), or all share the runner's one
            for names, md_g in self._kv_groups_of(ctx, s):
                blocks = _compat.batch_view(md_g).block_table if md_g is not None else view.block_table
                slots = kv_slots(blocks, req, idx, bs)
                md = _compat.build_stage_metadata(
                    self._builder_for(names),
                    query_start_loc=st.cu_seqlens, query_start_loc_cpu=st.cu_seqlens_cpu,
                    seq_lens=seq_s, block_table=blocks, slot_mapping=slots,
                    num_tokens=st.num_tokens, max_query_len=st.max_seqlen,
                    max_seq_len=view.max_seq_len,
                )
                assign(names, md, slots)

        with _compat.stage_metadata_scope(ctx) as assign:
            def enter_stage(s: int, hidden, residual, pos):
                index = plan.stages[s].index
                assign_stage(s, assign)
                if s == 1:  # padding rows (beyond the real tokens) are dropped with stage 0
                    hidden, residual, pos = hidden[:T], residual[:T], pos[..., :T]
                if plan.identity:
                    return hidden, residual, pos
                return (
                    compact_tokens(hidden, index, check_index=False),
                    compact_tokens(residual, index, check_index=False),
                    _compact_positions(pos, index),
                )

            out = self._run_layers(hidden, positions, enter_stage)

        # Each stage's drop count grows by this step's dropped tokens; the phase moves on.
        kept = torch.stack([st.seq_lens for st in plan.stages], dim=1)  # [B, S]
        table[first_blocks] = torch.cat(
            [dropped + (q_len[:, None] - kept), plan.next_phase[:, None]], dim=1
        )
        full = out.new_zeros((hidden.shape[0], out.shape[-1]))
        if plan.identity:
            full[:T] = out
        else:
            full.index_copy_(0, plan.stages[-1].source_index.long(), out)
        return full

    def _run_layers(self, hidden, positions, enter_stage):
        """vLLM's decoder loop; ``enter_stage(s, hidden, residual, positions)`` re-lays the
        tokens out before stage ``s``'s first layer."""
        residual = None
        pos = positions
        for i, layer in enumerate(self.layers):
            s = self.boundaries.get(i)
            if s is not None and enter_stage is not None:
                hidden, residual, pos = enter_stage(s, hidden, residual, pos)
            hidden, residual = _compat.run_decoder_layer(layer, pos, hidden, residual)
        return _compat.final_norm(self.text_model.norm, hidden, residual)


def _compact_positions(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Positions of the kept tokens: ``[T]`` rows, or M-RoPE's ``[3, T]`` on its last dim (kept
    tokens keep their original positions)."""
    from ... import compact_tokens

    if positions.dim() == 1:
        return compact_tokens(positions, index, check_index=False)
    return positions.index_select(-1, index.long())


class ImageGridError(ValueError):
    """A request's image is not a whole vision-token grid, which ADSC's plan needs."""


_CHECKED_PROCESSORS: Dict[tuple, type] = {}


def _llava_check(processor, out) -> None:
    """Every image of a LLaVA-1.5 request must be the one ``H x W`` grid of vision tokens."""
    setup = llava_adsc_setup(processor.info.get_hf_config())
    if setup is None:
        return
    (h, w), per_image = setup[1], setup[1][0] * setup[1][1]
    for i, n in enumerate(_compat.placeholder_lengths(out)):
        if n != per_image:
            raise ImageGridError(
                f"ADSC (adsc_schedule '{setup[0]}') needs every image to be a {h}x{w} "
                f"grid of vision tokens ({per_image}); image {i} of this request has "
                f"{n} (image embeddings of another size?)"
            )


def _qwen_check(processor, out) -> None:
    """Every image and video frame of a Qwen2-VL / Qwen2.5-VL request must be a grid the schedule can
    downsample (a side of length 1 cannot be halved)."""
    setup = qwen_adsc_setup(processor.info.get_hf_config())
    if setup is None or not setup[0]:
        return
    schedule, _, m = setup
    for kind in ("image", "video"):
        lengths = _compat.placeholder_lengths(out, kind)
        for i, (thw, n) in enumerate(zip(_compat.item_grids(out, kind), lengths)):
            if thw is None:  # the processor cache left it out (the config hook turns the cache off)
                raise ImageGridError(
                    f"{kind} {i} of this request came without its {kind}_grid_thw (the multimodal "
                    f"processor cache is on?): ADSC cannot check its grid"
                )
            t, gh, gw = thw
            if gh % m or gw % m or n != t * (gh // m) * (gw // m):
                raise ImageGridError(
                    f"{kind} {i} of this request: {kind}_grid_thw {thw} is not {t} {m}x{m}-merged "
                    f"grid(s) of its {n} tokens"
                )
            try:
                schedule.grids((gh // m, gw // m))
            except ScheduleError as exc:
                raise ImageGridError(
                    f"{kind} {i} of this request is a {gh // m}x{gw // m} grid after the {m}x{m} "
                    f"merge, which adsc_schedule '{schedule}' cannot downsample ({exc}); give it a "
                    f"larger {kind} or use a schedule with fewer steps"
                ) from None


def _checked_processor_class(base: type, check) -> type:
    cls = _CHECKED_PROCESSORS.get((base, check))
    if cls is None:

        def apply(self, inputs, *args, **kwargs):
            out = base.apply(self, inputs, *args, **kwargs)
            check(self, out)
            return out

        cls = type(f"Adsc{base.__name__}", (base,), {"apply": apply})
        _CHECKED_PROCESSORS[(base, check)] = cls
    return cls


def _checked_factory(model_cls, check):
    """vLLM's processor factory for ``model_cls``, its processor refusing (per request, when it is
    added, before it holds any KV block) what ``check(processor, processed)`` refuses."""
    processor_factory, info, dummy_inputs = _compat.processor_factories(model_cls)

    def factory(info_, dummy_inputs_, **kwargs):
        return _compat.checked_processor(
            processor_factory(info_, dummy_inputs_, **kwargs),
            lambda base: _checked_processor_class(base, check),
        )

    return factory, info, dummy_inputs


class _AdscModel:
    """What the ADSC subclasses of vLLM's models share: the stages, the multimodal mask hook and
    the forward. ``_adsc_text_model()`` is the decoder stack (item 4 of :mod:`._compat`)."""

    adsc: Optional[AdscStages]

    def _adsc_init(self, vllm_config, schedule, grid, merge: int = 1, anyres: str = "") -> None:
        self.adsc = None
        if schedule is None:
            return
        self.adsc = AdscStages(self._adsc_text_model(), schedule, grid, vllm_config, merge=merge, anyres=anyres)
        if kv_groups_enabled() and schedule:
            self.adsc.use_stage_kv_groups()
        if anyres:
            logger.info("ADSC schedule '%s', an anyres layout per image (from its embeddings)", schedule)
        elif grid is None:
            logger.info("ADSC schedule '%s', a grid per image (M-RoPE positions)", schedule)
        else:
            logger.info("ADSC schedule '%s' on a %dx%d image grid", schedule, *grid)

    def _adsc_text_model(self):
        return self.language_model.model

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kw):
        if self.adsc is not None:
            has_images = multimodal_embeddings is not None and len(multimodal_embeddings) > 0
            self.adsc.pending_mm_mask = is_multimodal if has_images else None
        return super().embed_input_ids(
            input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kw
        )

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if self.adsc is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)
        if intermediate_tensors is not None:
            raise NotImplementedError("ADSC on vLLM does not support pipeline parallelism")
        return self.adsc.forward(input_ids, positions, inputs_embeds)


_LLAVA_FACTORIES = _checked_factory(LlavaForConditionalGeneration, _llava_check)


@MULTIMODAL_REGISTRY.register_processor(
    _LLAVA_FACTORIES[0], info=_LLAVA_FACTORIES[1], dummy_inputs=_LLAVA_FACTORIES[2]
)
class AdscLlavaForConditionalGeneration(_AdscModel, LlavaForConditionalGeneration):
    """vLLM's LLaVA with ADSC when the HF config carries ``adsc_schedule`` (else vLLM's own)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        setup = llava_adsc_setup(self.config)
        self._adsc_init(vllm_config, *(setup[:2] if setup is not None else (None, None)))


class _AdscQwenModel(_AdscModel):
    """Qwen2-VL / Qwen2.5-VL: each image (and video frame) has its own grid, read per step from its
    M-RoPE positions (``chunks.plan_grid_step``), so every image and video is prefilled inside one
    chunk (the config hook sets ``disable_chunked_mm_input`` and the ADSC scheduler cuts a chunk
    that would end inside one). A video is ``t`` frames of one grid, each downsampled as an
    image."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        setup = qwen_adsc_setup(self.config)
        if setup is None:
            self._adsc_init(vllm_config, None, None)
        else:
            self._adsc_init(vllm_config, setup[0], None, merge=setup[2])


_QWEN_FACTORIES = _checked_factory(Qwen2_5_VLForConditionalGeneration, _qwen_check)


@MULTIMODAL_REGISTRY.register_processor(
    _QWEN_FACTORIES[0], info=_QWEN_FACTORIES[1], dummy_inputs=_QWEN_FACTORIES[2]
)
class AdscQwen2_5_VLForConditionalGeneration(_AdscQwenModel, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with ADSC when the HF config carries ``adsc_schedule`` (else vLLM's own)."""


_QWEN2_FACTORIES = _checked_factory(Qwen2VLForConditionalGeneration, _qwen_check)


@MULTIMODAL_REGISTRY.register_processor(
    _QWEN2_FACTORIES[0], info=_QWEN2_FACTORIES[1], dummy_inputs=_QWEN2_FACTORIES[2]
)
class AdscQwen2VLForConditionalGeneration(_AdscQwenModel, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with ADSC when the HF config carries ``adsc_schedule`` (else vLLM's own)."""


def _onevision_check(processor, out) -> None:
    """Every image of a LLaVA-OneVision request must be an anyres layout (from its ``image_sizes``)
    whose grids the schedule can downsample; videos are refused (not planned by the plugin yet)."""
    from ...image_grids import anyres_layout, anyres_max_crops

    cfg = processor.info.get_hf_config()
    setup = onevision_adsc_setup(cfg)
    if setup is None or not setup[0]:
        return
    schedule, _, side = setup
    if _compat.placeholder_lengths(out, "video"):
        raise ImageGridError(
            f"ADSC (adsc_schedule '{schedule}') on vLLM serves LLaVA-OneVision images; this request "
            f"has a video, which the plugin does not plan yet"
        )
    vision = cfg.vision_config
    tower, patch = int(vision.image_size), int(vision.patch_size)
    pinpoints = [(int(h), int(w)) for h, w in cfg.image_grid_pinpoints]
    max_crops = anyres_max_crops(getattr(cfg, "vision_aspect_ratio", None) or "anyres_max_9")
    lengths = _compat.placeholder_lengths(out, "image")
    for i, (size, n) in enumerate(zip(_compat.item_values(out, "image", "image_sizes"), lengths)):
        if size is None:  # the processor cache left it out (the config hook turns the cache off)
            raise ImageGridError(
                f"image {i} of this request came without its image_sizes (the multimodal processor "
                f"cache is on?): ADSC cannot check its layout"
            )
        layout = anyres_layout(size, pinpoints, tower, patch, max_crops=max_crops)
        if n == layout.tokens:
            grids = layout.grids
        elif n == side * side + 1:  # a multi-image prompt's item: the base grid + one newline
            grids = [(side, side, 0)]
        else:
            raise ImageGridError(
                f"image {i} of this request ({size[0]}x{size[1]} pixels) has {n} placeholder tokens, "
                f"not its anyres layout's {layout.tokens} (vision_aspect_ratio other than "
                f"anyres_max_9? vLLM counts with 9)"
            )
        for h, w, _nl in grids:
            try:
                schedule.grids((h, w))
            except ScheduleError as exc:
                raise ImageGridError(
                    f"image {i} of this request ({size[0]}x{size[1]} pixels) has a {h}x{w} token grid, "
                    f"which adsc_schedule '{schedule}' cannot downsample ({exc}); give it another "
                    f"size or use a schedule with fewer steps"
                ) from None


_ONEVISION_FACTORIES = _checked_factory(LlavaOnevisionForConditionalGeneration, _onevision_check)


@MULTIMODAL_REGISTRY.register_processor(
    _ONEVISION_FACTORIES[0], info=_ONEVISION_FACTORIES[1], dummy_inputs=_ONEVISION_FACTORIES[2]
)
class AdscLlavaOnevisionForConditionalGeneration(_AdscModel, LlavaOnevisionForConditionalGeneration):
    """vLLM's LLaVA-OneVision with ADSC when the HF config carries ``adsc_schedule`` (else vLLM's
    own). Each image has its own anyres layout (a base grid, then a high-resolution grid whose
    rows end with ``image_newline``), read per step from the image's embeddings, where the newline
    rows are copies of ``self.image_newline`` (``models.llava_next.item_from_features``); every
    image is prefilled inside one chunk, as for Qwen2.5-VL. KV blocks: each stage's group holds a
    request's blocks for the stage's tokens, each image's layout computed on the scheduler side from
    its ``image_sizes`` (``kv_groups.anyres_keep``)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        from .kv_groups import anyres_spec

        setup = onevision_adsc_setup(self.config)
        self._adsc_side = None if setup is None else setup[2]
        if setup is None:
            self._adsc_init(vllm_config, None, None)
        else:
            self._adsc_init(vllm_config, setup[0], None, anyres=anyres_spec(self.config))

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None, **kw):
        if (self.adsc is not None and self.adsc.schedule and multimodal_embeddings is not None
                and len(multimodal_embeddings) > 0):  # the empty schedule plans nothing
            from ...models.llava_next import item_from_features

            self.adsc.pending_items = [
                item_from_features(i, feat, self._adsc_side, self.image_newline)
                for i, feat in enumerate(multimodal_embeddings)
            ]
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kw)
