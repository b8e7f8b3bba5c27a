"""ADSC inside vLLM's LLaVA: :class:`AdscLlavaForConditionalGeneration`.

A subclass of vLLM's own ``LlavaForConditionalGeneration``: its vision tower, projector,
tensor-parallel decoder layers, weight loading and multimodal processor are vLLM's. Only the
decoder loop is ours. Without ``adsc_schedule`` in the HF config the class *is* vLLM's LLaVA (the
forward is the parent's). With one, each forward:

1. plans the packed batch once with :func:`adsc_ext.stage_plan` (sequences from the attention
   metadata's ``query_start_loc``, images from the runner's multimodal mask: the rows where it
   placed image embeddings);
2. runs vLLM's decoder layers; before each stage's first layer the hidden states, the residual
   and the positions are compacted with :func:`adsc_ext.compact_tokens` (positions keep their
   original values: RoPE is not re-indexed);
3. gives every layer of stage ``s`` that stage's attention metadata, built by the backend's own
   metadata builder: the compacted query lengths, sequence lengths ``context_s + kept_s`` and
   slot mappings of the compacted sequence, so stage ``s`` writes K/V only for its kept tokens
   and later steps read only those;
4. scatters the last stage's hidden states back to the step's token rows (vLLM samples from the
   last row of each request, which ADSC always keeps).

Per-request state across steps is one number per stage: how many of the request's tokens the
stage has dropped so far (``dropped[s]``). It lives in a device table indexed by the request's
first KV block (a block belongs to one running request while prefix caching is off, which the
plugin ensures), so a decode or a later prefill chunk knows where its tokens go in each stage's
compacted sequence: token at position ``p`` sits at index ``p - dropped[s]`` of stage ``s``.

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

from ...schedule import Schedule
from . import _compat
from .config import kv_groups_enabled, llava_adsc_setup

logger = init_logger(__name__)

__all__ = ["AdscLlavaForConditionalGeneration", "AdscStages", "ImageGridError"]


class AdscStages:
    """The staged decoder loop over vLLM's LLaMA-family text model (one per model instance)."""

    def __init__(self, text_model, schedule: Schedule, grid: Tuple[int, int], vllm_config) -> None:
        for name in ("layers", "norm", "embed_input_ids", "start_layer", "end_layer"):
            if not hasattr(text_model, name):
                raise TypeError(
                    f"ADSC needs a LLaMA-family vLLM text model with {name}; "
                    f"{type(text_model).__name__} has none"
                )
        if text_model.start_layer != 0 or text_model.end_layer != len(text_model.layers):
            raise NotImplementedError("ADSC on vLLM does not support pipeline parallelism")
        self.text_model = text_model
        self.schedule = schedule
        self.grid = grid
        self.vllm_config = vllm_config
        self.attn = [_compat.attention_layer(layer) for layer in text_model.layers]
        n = len(self.attn)
        self.stage_of_layer = [schedule.stage_of_layer(i) for i in range(n)]
        self.num_stages = len(schedule) + 1
        self.stage_layer_names: List[List[str]] = [[] for _ in range(self.num_stages)]
        for i, a in enumerate(self.attn):
            self.stage_layer_names[self.stage_of_layer[i]].append(a.layer_name)
        self.boundaries: Dict[int, int] = {layer: s + 1 for s, layer in enumerate(schedule.layers)}
        self._builders: Dict[int, object] = {}
        self._dropped: Optional[torch.Tensor] = None  # int32 [blocks, stages]
        self._layout_checked = False
        #: the runner's multimodal mask of the coming forward (set by embed_input_ids)
        self.pending_mm_mask: Optional[torch.Tensor] = None
        #: what the last forward did, for tests and logs: stage token counts
        self.last_stage_tokens: Optional[List[int]] = None

    # ---- state -----------------------------------------------------------------------------
    def _builder_for(self, stage: int):
        """The metadata builder for stage ``stage``'s layers (one KV-cache group)."""
        if stage not in self._builders:
            names = self.stage_layer_names[stage]
            first = next(a for a in self.attn if a.layer_name == names[0])
            self._builders[stage] = _compat.make_metadata_builder(first, names, self.vllm_config)
        return self._builders[stage]

    def use_stage_kv_groups(self) -> None:
        """Give each stage's layers their own KV-cache spec (:mod:`.kv_groups`): vLLM then
        keeps one block table per stage, sized by the stage's tokens."""
        from . import kv_groups

        per_stage = kv_groups.layer_specs(self.schedule, self.grid)
        for i, attn in enumerate(self.attn):
            s = self.stage_of_layer[i]
            drop, image = per_stage[s]
            own = attn.get_kv_cache_spec

            def spec(vllm_config, _own=own, _s=s, _drop=drop, _image=image):
                return kv_groups.stage_spec(_own(vllm_config), _s, _drop, _image)

            attn.get_kv_cache_spec = spec

    def _dropped_table(self, first_blocks: torch.Tensor) -> torch.Tensor:
        need = _compat.num_kv_blocks(self.vllm_config)
        if need is None or (first_blocks.device.type == "cpu" and first_blocks.numel()):
            # host-visible block ids: size exactly (on a GPU the block count is always known)
            need = max(need or 0, int(first_blocks.max()) + 1 if first_blocks.numel() else 1)
        t = self._dropped
        if t is None or t.shape[0] < need or t.device != first_blocks.device:
            new = torch.zeros((need, self.num_stages), dtype=torch.int32, device=first_blocks.device)
            if t is not None:
                new[: t.shape[0]] = t.to(new.device)
            self._dropped = t = new
        return t

    def _check_layout(self, view: _compat.BatchView, positions: torch.Tensor, block_size: int):
        """Once: the runner's slots must be ``block_table[r, p // bs] * bs + p % bs`` (the rule
        the stages' slots are computed with)."""
        T = view.num_tokens
        if self._layout_checked or T == 0:
            return
        req = self._request_of_token(view.query_start_loc, T)
        pos = positions[:T].long()
        want = _slots(view.block_table, req, pos, block_size)
        if not torch.equal(want, view.slot_mapping[:T].long()):
            raise NotImplementedError(
                f"ADSC computes each stage's KV slots as block_table[r, p // {block_size}] * "
                f"{block_size} + p % {block_size}; this vLLM build's runner maps slots differently "
                f"(kernel block size != cache block size?)"
            )
        self._layout_checked = True

    @staticmethod
    def _request_of_token(cu: torch.Tensor, num_tokens: int) -> torch.Tensor:
        lens = (cu[1:] - cu[:-1]).long()
        return torch.repeat_interleave(
            torch.arange(lens.shape[0], device=cu.device), lens, output_size=num_tokens
        )

    # ---- the forward -----------------------------------------------------------------------
    def forward(self, input_ids, positions: torch.Tensor, inputs_embeds) -> torch.Tensor:
        from ... import compact_tokens, stage_plan

        lm = self.text_model
        mm_mask, self.pending_mm_mask = self.pending_mm_mask, None
        hidden = inputs_embeds if inputs_embeds is not None else lm.embed_input_ids(input_ids)
        ctx = _compat.forward_context()
        md0 = _compat.layer_metadata(ctx, self.attn[0].layer_name)
        if md0 is None or not self.schedule:
            # Profiling / warm-up (no metadata) or the empty schedule: vLLM's own loop (the
            # unmodified layout is the most memory any step can need).
            self.last_stage_tokens = None
            return self._run_layers(hidden, positions, None)

        view = _compat.batch_view(md0)
        T = view.num_tokens
        bs = int(self.vllm_config.cache_config.block_size)
        self._check_layout(view, positions, bs)
        cu = view.query_start_loc
        if mm_mask is not None and mm_mask.shape[0] >= T:
            marks = mm_mask[:T].to(torch.int64)
        else:
            marks = torch.zeros(T, dtype=torch.int64, device=hidden.device)
        plan = stage_plan(self.schedule, input_ids=marks, cu_seqlens=cu, image_token_id=1, grid=self.grid)
        self.last_stage_tokens = [st.num_tokens for st in plan.stages]

        q_len = (cu[1:] - cu[:-1]).to(torch.int32)
        context = view.seq_lens - q_len  # tokens of each request already in the cache
        first_blocks = view.block_table[:, 0].long()
        table = self._dropped_table(first_blocks)
        # dropped[r, s]: tokens of request r that stage s dropped in earlier steps (0 for a
        # request that starts here: its table row may be a finished request's)
        dropped = torch.where((context > 0)[:, None], table[first_blocks], torch.zeros_like(table[first_blocks]))

        def stage_metadata(s: int):
            st = plan.stages[s]
            # the stage's block table (its own KV-cache group, or the shared one)
            md_s = _compat.layer_metadata(ctx, self.stage_layer_names[s][0])
            blocks = _compat.batch_view(md_s).block_table if md_s is not None else view.block_table
            ctx_s = context - dropped[:, s]
            seq_s = ctx_s + st.seq_lens
            req = self._request_of_token(st.cu_seqlens, st.num_tokens)
            within = torch.arange(st.num_tokens, device=cu.device) - st.cu_seqlens.long()[req]
            idx = ctx_s.long()[req] + within
            slots = _slots(blocks, req, idx, bs)
            md = _compat.build_stage_metadata(
                self._builder_for(s),
                query_start_loc=st.cu_seqlens, seq_lens=seq_s.to(torch.int32),
                block_table=blocks, slot_mapping=slots, num_tokens=st.num_tokens,
                max_query_len=st.max_seqlen, max_seq_len=view.max_seq_len,
            )
            return md, slots

        with _compat.stage_metadata_scope(ctx) as assign:
            def enter_stage(s: int, hidden, residual, pos):
                index = plan.stages[s].index
                md, slots = stage_metadata(s)
                assign(self.stage_layer_names[s], md, slots)
                if s == 1:  # padding rows (beyond the real tokens) are dropped with stage 0
                    hidden, residual, pos = hidden[:T], residual[:T], pos[:T]
                return (
                    compact_tokens(hidden, index, check_index=False),
                    compact_tokens(residual, index, check_index=False),
                    compact_tokens(pos, index, check_index=False),
                )

            out = self._run_layers(hidden, positions, enter_stage)

        # Each stage's drop count grows by this step's dropped tokens.
        kept = torch.stack([st.seq_lens for st in plan.stages[1:]], dim=1)  # [B, S-1]
        table[first_blocks, 1:] = dropped[:, 1:] + (q_len[:, None] - kept)
        if len(plan.stages) == 1:
            return out
        full = out.new_zeros((hidden.shape[0], out.shape[-1]))
        full.index_copy_(0, plan.stages[-1].source_index.long(), out)
        return full

    def _run_layers(self, hidden, positions, enter_stage):
        """vLLM's decoder loop; ``enter_stage(s, hidden, residual, positions)`` re-lays the
        tokens out before stage ``s``'s first layer."""
        lm = self.text_model
        residual = None
        pos = positions
        for i, layer in enumerate(lm.layers):
            s = self.boundaries.get(i)
            if s is not None and enter_stage is not None:
                hidden, residual, pos = enter_stage(s, hidden, residual, pos)
            hidden, residual = layer(pos, hidden, residual)
        hidden, _ = lm.norm(hidden, residual)
        return hidden


def _slots(block_table: torch.Tensor, req: torch.Tensor, idx: torch.Tensor, block_size: int) -> torch.Tensor:
    """KV slot of sequence index ``idx`` of request ``req``: ``block_table[req, idx // bs] * bs +
    idx % bs`` (int64)."""
    blocks = block_table[req, torch.div(idx, block_size, rounding_mode="floor")].long()
    return blocks * block_size + idx % block_size


class ImageGridError(ValueError):
    """A request's image is not a whole vision-token grid, which ADSC's plan needs."""


_CHECKED_PROCESSORS: Dict[type, type] = {}


def _checked_processor_class(base: type) -> type:
    cls = _CHECKED_PROCESSORS.get(base)
    if cls is None:

        def apply(self, inputs, *args, **kwargs):
            out = base.apply(self, inputs, *args, **kwargs)
            setup = llava_adsc_setup(self.info.get_hf_config())
            if setup is not None:
                (h, w), per_image = setup[1], setup[1][0] * setup[1][1]
                for i, n in enumerate(_compat.placeholder_lengths(out)):
                    if n != per_image:
                        raise ImageGridError(
                            f"ADSC (adsc_schedule '{setup[0]}') needs every image to be a {h}x{w} "
                            f"grid of vision tokens ({per_image}); image {i} of this request has "
                            f"{n} (image embeddings of another size?)"
                        )
            return out

        cls = type(f"Adsc{base.__name__}", (base,), {"apply": apply})
        _CHECKED_PROCESSORS[base] = cls
    return cls


_PROCESSOR, _INFO, _DUMMY_INPUTS = _compat.processor_factories(LlavaForConditionalGeneration)


def _adsc_processor(info, dummy_inputs, **kwargs):
    """vLLM's LLaVA processor, refusing (per request, when it is added) images that are not
    whole grids: a plan error inside a forward would fail every request of the step."""
    proc = _PROCESSOR(info, dummy_inputs, **kwargs)
    proc.__class__ = _checked_processor_class(type(proc))
    return proc


@MULTIMODAL_REGISTRY.register_processor(_adsc_processor, info=_INFO, dummy_inputs=_DUMMY_INPUTS)
class AdscLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with ADSC when the HF config carries ``adsc_schedule`` (else vLLM's own)."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        setup = llava_adsc_setup(self.config)
        self.adsc: Optional[AdscStages] = None
        if setup is not None:
            schedule, grid, _ = setup
            self.adsc = AdscStages(self.language_model.model, schedule, grid, vllm_config)
            if kv_groups_enabled():
                self.adsc.use_stage_kv_groups()
            logger.info("ADSC schedule '%s' on a %dx%d image grid", schedule, *grid)

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
