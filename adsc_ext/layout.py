"""The staged layout: how one forward's tokens are laid out in every stage, made once from the plan.

ADSC runs the decoder in *stages* (spec section 2): stage 0 is the input layout, stage ``s >= 1``
starts at the layer of the schedule's step ``s - 1`` and holds fewer vision tokens. Every
consumer -- the Hugging Face hooks, the serving engine, the ONNX graphs and the FastV baseline --
needs the same facts about a forward, and they live here, once (the vLLM plugin plans its steps in
``integrations/vllm/chunks.py``, since vLLM's chunks may cut an image, and shares the core's plan):

- :class:`StageMap`: the stage of every decoder layer (made once per model);
- :class:`StagedLayout`: per stage, the gather ``index`` from the previous stage, the
  ``source_index`` into the input, the ``position_ids`` (any leading shape: ``[B, S]``, packed
  ``[T]``, M-RoPE's ``[3, B, S]`` -- a kept token keeps every component), ``cu_seqlens``, the
  per-sequence lengths, the longest one, the ``valid`` mask and, for a segment that continues a
  cache, the key mask and the slot of its first query;
- the stage loop, :meth:`StagedLayout.layers`, and **the** boundary compaction,
  :meth:`StagedLayout.enter`, which at a stage's first layer compacts every tensor it is given
  (hidden states, residual, rotary ``cos``/``sin``...);
- the attention masks (:func:`causal_mask` for padded batches with a cache offset and key mask,
  :func:`packed_causal_mask` for packed ones) and the paged-KV slot arithmetic
  (:func:`kv_slots`, :meth:`StagedLayout.slot_mapping`: ``block_table[r, p // bs] * bs + p % bs``).

Constructors, for what each consumer has:

- :meth:`StagedLayout.padded`: a left- or right-padded batch ``[B, S]`` from its plan, optionally
  continuing a cache (the Hugging Face path: per-stage cached key masks and next positions);
- :meth:`StagedLayout.packed`: a packed batch ``[T]`` (or ``[1, T]``) from its plan (the engine's
  prefill, packed Hugging Face inputs; per-request context offsets go to :meth:`slot_mapping`,
  one block table per stage);
- :meth:`StagedLayout.text`: a segment without images (decode steps): every stage has the input
  layout and nothing is compacted;
- :meth:`StagedLayout.from_index`: a padded layout from explicit gather indices (the ONNX graphs,
  whose indices are graph inputs, and FastV, whose one boundary's index comes from attention
  scores). It stays traceable by ``torch.onnx.export(dynamo=True)``: no host reads, no data-
  dependent shapes.

Torch only (no transformers). The compaction is :func:`adsc_ext.compact_tokens` unless a layout is
given another ``compact`` (the ONNX graphs pass their exportable lowering).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .schedule import Schedule

__all__ = [
    "StageMap",
    "Stage",
    "StagedLayout",
    "causal_mask",
    "packed_causal_mask",
    "kv_slots",
    "gather_rows",
    "IGNORE_INDEX",
]

#: The label value the loss ignores (transformers' convention).
IGNORE_INDEX = -100

#: ``compact(rows [N, ...], index [M]) -> [M, ...]``: rows gathered by a flat index, -1 a zero row.
Compactor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---- the stage of every layer ------------------------------------------------------------------


class StageMap:
    """The stage every decoder layer runs in, for a schedule on a model of ``num_layers`` layers.

    ``stage_of_layer[l]``, ``first_layers[s]`` (the layer a stage starts at), ``boundaries``
    (``{layer: stage}`` for the stages after the first), ``layers_of(s)`` and the loop
    :meth:`layers`. The schedule must fit the model (``Schedule.validate``). ``boundaries`` may
    also be given as the increasing layers where stages start (a layout whose indices come from
    elsewhere, e.g. FastV's one pruning layer); ``schedule`` is then None.
    """

    def __init__(self, schedule, num_layers: int):
        self.num_layers = int(num_layers)
        if isinstance(schedule, (list, tuple)) and all(isinstance(x, int) for x in schedule):
            self.schedule, layers = None, tuple(schedule)
            if any(b <= a for a, b in zip((0, *layers), layers)):
                raise ValueError(f"stage boundaries must be increasing layers >= 1, got {list(layers)}")
        else:
            self.schedule = Schedule.coerce(schedule)
            layers = self.schedule.layers
        if layers and layers[-1] >= self.num_layers:
            raise ValueError(f"a stage starts at layer {layers[-1]}, past the model's {self.num_layers} layers "
                             f"(validate the schedule first)")
        self.first_layers: Tuple[int, ...] = (0, *layers)
        ends = (*layers, self.num_layers)
        self.stage_of_layer: Tuple[int, ...] = tuple(s for s, (a, b) in enumerate(zip(self.first_layers, ends))
                                                     for _ in range(a, b))
        self.boundaries = {layer: s + 1 for s, layer in enumerate(layers)}

    @property
    def num_stages(self) -> int:
        return len(self.first_layers)

    def layers_of(self, stage: int) -> range:
        end = self.first_layers[stage + 1] if stage + 1 < self.num_stages else self.num_layers
        return range(self.first_layers[stage], end)

    def stage_layers(self) -> List[List[int]]:
        """The layers of every stage."""
        return [list(self.layers_of(s)) for s in range(self.num_stages)]

    def layers(self) -> Iterator[Tuple[int, int, bool]]:
        """``(layer, stage, entering)`` for every decoder layer in order; ``entering`` is True at a
        stage's first layer (layer 0 included), where the stage's tensors are set up."""
        for layer, stage in enumerate(self.stage_of_layer):
            yield layer, stage, layer == self.first_layers[stage]

    def __eq__(self, other) -> bool:
        return isinstance(other, StageMap) and (self.first_layers, self.num_layers) == (other.first_layers,
                                                                                          other.num_layers)

    def __hash__(self) -> int:
        return hash((self.first_layers, self.num_layers))

    def __repr__(self) -> str:
        return f"StageMap(stages at layers {list(self.first_layers)}, num_layers={self.num_layers})"


# ---- the pieces every layout uses ----------------------------------------------------------------


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [N, ...]`` rows gathered by ``index [M]``; a ``-1`` slot is a zero row. Plain torch ops
    (an exportable ``Gather`` + ``Where``; a bare gather would read row -1, the last row): the
    reference lowering of :func:`adsc_ext.compact_tokens`, equal to it bit for bit."""
    keep = (index >= 0).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(keep, x.index_select(0, index.clamp(min=0).long()), torch.zeros((), dtype=x.dtype))


def _compact_op(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    from .ops import compact_tokens  # the compiled op (loads adsc_ext._C)

    # Plan indices are in range by construction: no range check, so no device sync.
    return compact_tokens(rows, index, check_index=False)


def causal_mask(key_valid: torch.Tensor, q: int, offset=0) -> torch.Tensor:
    """bool ``[B, 1, q, K]`` "may attend": query ``i`` (at cache slot ``offset + i``) sees key ``j``
    iff ``key_valid[:, j]`` and ``j <= offset + i``. A query also always sees its own slot, so a
    padding query's row is never fully masked (a fully masked softmax row is NaN on some
    backends); its output is never read."""
    K = key_valid.shape[1]
    dev = key_valid.device
    qpos = torch.arange(q, device=dev)[:, None] + offset
    kpos = torch.arange(K, device=dev)[None, :]
    allowed = key_valid[:, None, :] & (kpos <= qpos)[None]
    allowed = allowed | (kpos == qpos)[None]
    return allowed[:, None]


def packed_causal_mask(cu_seqlens: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """bool ``[1, 1, T, T]``: causal attention within each packed sequence."""
    dev = cu_seqlens.device
    i = torch.arange(num_tokens, device=dev)
    seq = torch.bucketize(i, cu_seqlens[1:].long(), right=True)
    allowed = (seq[:, None] == seq[None, :]) & (i[None, :] <= i[:, None])
    return allowed[None, None]


def kv_slots(block_table: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """int64 paged-KV slot of cache position ``positions`` of sequence ``rows`` (same shape):
    ``block_table[rows, positions // block_size] * block_size + positions % block_size`` -- the
    rule of FlashAttention's and vLLM's paged caches (block ids from the sequence's block table)."""
    positions = positions.long()
    blocks = block_table[rows, torch.div(positions, block_size, rounding_mode="floor")].long()
    return blocks * block_size + positions % block_size


def _gather_positions(positions: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Stage positions from stage-0 ones (``[*lead, *input token shape]``, as many token dims as
    ``source`` has) by ``source``, an index of flat input rows (-1: padding, which gets position 1
    as the plan gives it): every leading component of a kept token's position is kept."""
    lead = positions.shape[: positions.dim() - source.dim()]
    flat = positions.reshape(*lead, -1)
    src = source.reshape(-1).long()
    out = flat.index_select(-1, src.clamp(min=0)).masked_fill(src < 0, 1)
    return out.reshape(*lead, *source.shape)


# ---- one stage ------------------------------------------------------------------------------------


@dataclass
class Stage:
    """The token layout of one stage of one forward. Token shape: padded ``[B, S_s]``, packed
    ``[T_s]`` (or ``[1, T_s]`` for a layout made with ``batch_dim=True``)."""

    stage: int
    #: the token shape: padded ``(B, S_s)``; packed ``(T_s,)`` or ``(1, T_s)``.
    shape: Tuple[int, ...]
    #: bool, the token shape: True for real tokens (None: every slot is real, as in a packed layout).
    valid: Optional[torch.Tensor]
    #: int64 ``[*lead, *token shape]``: the position id of every slot (RoPE is not re-indexed);
    #: padding holds 1. (None in a :meth:`StagedLayout.from_index` layout made without positions.)
    position_ids: Optional[torch.Tensor]
    #: int32/int64 gather index from the previous stage's layout (its flat rows), ``-1`` for
    #: padding; None: the same layout as the previous stage (nothing to compact).
    index: Optional[torch.Tensor] = None
    #: flat row of the input layout of every slot, ``-1`` for padding; None: the input layout.
    source_index: Optional[torch.Tensor] = None
    #: int32 ``[B+1]``: the offsets of the sequences if the stage were packed.
    cu_seqlens: Optional[torch.Tensor] = None
    #: int ``[B]``: real tokens per sequence.
    seq_lens: Optional[torch.Tensor] = None
    #: the longest sequence (a host int, as FlashAttention's varlen API wants it).
    max_seqlen: Optional[int] = None
    #: real tokens of the stage (host int), where known.
    num_tokens: Optional[int] = None
    #: whether any slot is padding.
    has_padding: bool = False
    #: bool ``[B, K]``: the keys this segment's queries attend to -- a cache's keys, then the
    #: segment's own slots (padded layouts; None: the segment's own ``valid``).
    key_valid: Optional[torch.Tensor] = None
    #: cache slots before the segment's first query (0 without a cache).
    offset: int = 0
    #: host copy of ``cu_seqlens`` (a list), when the plan ran on the host.
    cu_host: Optional[List[int]] = field(default=None, repr=False)

    @property
    def mask(self) -> torch.Tensor:
        """``valid``, made for a stage whose slots are all real."""
        if self.valid is not None:
            return self.valid
        ref = next(t for t in (self.cu_seqlens, self.index, self.source_index, self.position_ids) if t is not None)
        return torch.ones(self.shape, dtype=torch.bool, device=ref.device)

    @property
    def keys(self) -> torch.Tensor:
        """The key mask of this stage's attention: ``key_valid``, else the stage's own ``mask``."""
        return self.mask if self.key_valid is None else self.key_valid


# ---- the layout of one forward ------------------------------------------------------------------


class StagedLayout:
    """Every stage's token layout of one forward (see the module docstring); build it with one of
    the constructors. ``kind``: ``"padded"`` (``[B, S]`` token shapes) or ``"packed"``."""

    def __init__(self, kind: str, stage_map: StageMap, stages: Sequence[Stage], *,
                 compact: Optional[Compactor] = None):
        if len(stages) != stage_map.num_stages:
            raise ValueError(f"a layout of {stage_map} needs {stage_map.num_stages} stages, got {len(stages)}")
        self.kind = kind
        self.stage_map = stage_map
        self.stages: List[Stage] = list(stages)
        self.compact: Compactor = compact or _compact_op

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def batch_size(self) -> int:
        st = self.stages[0]
        if st.cu_seqlens is not None:
            return int(st.cu_seqlens.shape[0]) - 1
        return int(st.shape[0])

    def __getitem__(self, stage: int) -> Stage:
        return self.stages[stage]

    # ---- constructors ---------------------------------------------------------------------------
    @classmethod
    def padded(cls, stage_map: StageMap, plan, *, position_ids: Optional[torch.Tensor] = None,
               next_pos: Optional[torch.Tensor] = None, cache_valid: Optional[Sequence[torch.Tensor]] = None,
               compact: Optional[Compactor] = None) -> "StagedLayout":
        """The layout of a padded batch from its (padded) plan.

        ``position_ids``: stage-0 positions, any leading shape with ``[B, S]`` last (None: the
        plan's, each token's index among its sequence's real tokens). ``next_pos`` (int64
        ``[*lead, B]``): the position the segment's first token of each row continues from (a
        cache's next positions; added to the real tokens' positions, every component).
        ``cache_valid``: per stage, the bool ``[B, L_s]`` key mask of a cache this segment
        continues (its queries then sit at slots ``L_s ..``)."""
        stages = []
        if position_ids is not None and next_pos is not None:
            valid0 = plan.stages[0].attention_mask
            position_ids = torch.where(valid0, position_ids + next_pos[..., None], position_ids)
        for s, st in enumerate(plan.stages):
            valid = st.attention_mask
            if position_ids is None:
                pos = st.position_ids
                if next_pos is not None:
                    pos = torch.where(valid, pos + next_pos[..., None], pos)
            else:
                pos = position_ids if s == 0 else _gather_positions(position_ids, st.source_index)
            stages.append(Stage(
                stage=s, shape=tuple(valid.shape), valid=valid, position_ids=pos, index=st.index if s > 0 else None,
                source_index=st.source_index, cu_seqlens=st.cu_seqlens, seq_lens=st.seq_lens,
                max_seqlen=int(st.max_seqlen), num_tokens=int(st.num_tokens),
                has_padding=int(st.num_tokens) != valid.numel(),
            ))
        return cls("padded", stage_map, _with_cache(stages, cache_valid), compact=compact)

    @classmethod
    def packed(cls, stage_map: StageMap, plan, *, position_ids: Optional[torch.Tensor] = None,
               batch_dim: bool = False, compact: Optional[Compactor] = None) -> "StagedLayout":
        """The layout of a packed batch from its (packed) plan: token shape ``[T_s]``, or
        ``[1, T_s]`` with ``batch_dim`` (how Hugging Face models take a packed batch).

        ``position_ids``: stage-0 positions, any leading shape with the tokens last (None: the
        plan's). A host plan keeps a host copy of every ``cu_seqlens`` (``Stage.cu_host``)."""
        stages = []
        for s, st in enumerate(plan.stages):
            src, pos, index = st.source_index, st.position_ids, st.index if s > 0 else None
            if batch_dim:
                src, pos, index = src[None], pos[None], None if index is None else index[None]
            if position_ids is not None:
                pos = position_ids if s == 0 else _gather_positions(position_ids, src)
            stages.append(Stage(
                stage=s, shape=tuple(src.shape), valid=None, position_ids=pos, index=index, source_index=src,
                cu_seqlens=st.cu_seqlens, seq_lens=st.seq_lens, max_seqlen=int(st.max_seqlen),
                num_tokens=int(st.num_tokens),
                cu_host=st.cu_seqlens.tolist() if st.cu_seqlens.device.type == "cpu" else None,
            ))
        return cls("packed", stage_map, stages, compact=compact)

    @classmethod
    def text(cls, stage_map: StageMap, batch: int, q: int, *, device=None, mask: Optional[torch.Tensor] = None,
             next_pos: Optional[torch.Tensor] = None, position_ids: Optional[torch.Tensor] = None,
             cache_valid: Optional[Sequence[torch.Tensor]] = None) -> "StagedLayout":
        """A segment of ``q`` tokens per row without images (decode steps, text chunks): every
        stage has the input layout. ``mask`` (``[B, q]``): real tokens (None: all); positions are
        ``position_ids``, else each real token's index in the segment plus ``next_pos`` (``[B]``,
        or ``[*lead, B]`` for positions with leading components: ``[*lead, B, q]``)."""
        if mask is None:
            valid = torch.ones(batch, q, dtype=torch.bool, device=device)
        else:
            valid = mask.bool()
        if position_ids is None:
            if mask is None:
                position_ids = torch.arange(q, device=device).expand(batch, q)
            else:
                position_ids = (valid.long().cumsum(dim=1) - 1).masked_fill(~valid, 1)
            if next_pos is not None:
                position_ids = torch.where(valid, position_ids + next_pos[..., None], position_ids)
        st = Stage(stage=0, shape=(batch, q), valid=valid, position_ids=position_ids, max_seqlen=q,
                   has_padding=mask is not None)
        stages = [replace(st, stage=s) for s in range(stage_map.num_stages)]
        return cls("padded", stage_map, _with_cache(stages, cache_valid))

    @classmethod
    def from_index(cls, stage_map: StageMap, valid: torch.Tensor, indices: Sequence[torch.Tensor], *,
                   position_ids: Optional[torch.Tensor] = None,
                   compact: Optional[Compactor] = None) -> "StagedLayout":
        """A padded layout from explicit gather indices: ``valid [B, S_0]`` (real input tokens) and,
        for every stage ``s >= 1``, ``indices[s - 1] [B, S_s]`` of flat rows of the previous
        stage's ``[B * S_{s-1}]`` layout (``-1``: padding). Traceable (what the ONNX graphs use).

        ``position_ids`` (stage 0's, any leading shape): given, every stage's positions and source
        rows are derived from the indices; None, the layout holds only masks and indices (all a
        graph that compacts its rotary tensors needs)."""
        if len(indices) != stage_map.num_stages - 1:
            raise ValueError(f"{stage_map} needs {stage_map.num_stages - 1} indices, got {len(indices)}")
        stages = [Stage(stage=0, shape=tuple(valid.shape), valid=valid, position_ids=position_ids)]
        source = None
        for s, idx in enumerate(indices, start=1):
            pos = None
            if position_ids is not None:
                prev = (torch.arange(valid.numel(), device=valid.device) if source is None else source).reshape(-1)
                source = torch.where(idx >= 0, prev.index_select(0, idx.reshape(-1).clamp(min=0).long()).view(idx.shape),
                                     torch.full((), -1, dtype=prev.dtype, device=idx.device))
                pos = _gather_positions(position_ids, source)
            stages.append(Stage(stage=s, shape=tuple(idx.shape), valid=idx >= 0, index=idx, source_index=source,
                                position_ids=pos, has_padding=True))
        return cls("padded", stage_map, stages, compact=compact)

    # ---- the stage loop ------------------------------------------------------------------------
    def layers(self) -> Iterator[Tuple[int, int, bool]]:
        """``(layer, stage, entering)`` for every decoder layer (see :meth:`StageMap.layers`)."""
        return self.stage_map.layers()

    def enter(self, stage: int, *tensors: torch.Tensor, token_dim: int = 0) -> Tuple[torch.Tensor, ...]:
        """Lay ``tensors`` out for ``stage`` (call it before the stage's first layer): each tensor,
        in the previous stage's layout, is compacted by the stage's index. Its token dims start at
        ``token_dim`` (0: ``[*tokens, ...]`` such as hidden states, residuals and rotary cos/sin;
        1 for a tensor with one leading dim such as M-RoPE's ``[3, *tokens, ...]``). A stage with
        the previous stage's layout (a text segment) returns the tensors as they are."""
        st = self.stages[stage]
        if stage == 0 or st.index is None:
            return tensors
        prev = self.stages[stage - 1].shape
        k = len(prev)
        index = st.index.reshape(-1)
        out = []
        for x in tensors:
            lead, tail = x.shape[:token_dim], x.shape[token_dim + k:]
            if token_dim == 0:
                y = self.compact(x.reshape(-1, *tail), index)
            else:
                rows = x.reshape(math.prod(lead), -1, *tail).transpose(0, 1)
                y = self.compact(rows, index).transpose(0, 1)
            out.append(y.reshape(*lead, *st.shape, *tail))
        return tuple(out)

    # ---- masks ----------------------------------------------------------------------------------
    def attention_mask(self, stage: int) -> torch.Tensor:
        """bool "may attend" mask of ``stage``'s queries: ``[B, 1, q, K]`` for a padded layout
        (causal over the cache's and the segment's real keys, see :func:`causal_mask`), ``[1, 1, T,
        T]`` for a packed one (causal within each sequence)."""
        st = self.stages[stage]
        if self.kind == "packed":
            return packed_causal_mask(st.cu_seqlens, st.shape[-1])
        return causal_mask(st.keys, st.shape[1], st.offset)

    # ---- the paged KV cache ---------------------------------------------------------------------
    def slot_mapping(self, stage: int, block_table: torch.Tensor, block_size: int,
                     context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """int64 paged-KV slot of every slot of ``stage`` (padding: ``-1``): token ``j`` of
        sequence ``r`` goes to cache position ``context[r] + j`` (``context``: tokens of the
        sequence already in this stage's cache, 0 if None) of the sequence's ``block_table [B, W]``
        row. Packed: ``[T_s]`` (needs the stage's host-known ``num_tokens``); padded: ``[B, q]``."""
        st = self.stages[stage]
        dev = block_table.device
        if self.kind == "packed":
            cu = st.cu_seqlens
            tok = torch.arange(st.num_tokens, device=dev, dtype=cu.dtype)
            rows = torch.searchsorted(cu[1:], tok, right=True)
            pos = (tok - cu[rows]).long()
            if context is not None:
                pos = pos + context.long()[rows]
            return kv_slots(block_table, rows, pos, block_size)
        B, q = st.shape
        valid = st.mask
        rows = torch.arange(B, device=dev)[:, None].expand(B, q)
        pos = (valid.long().cumsum(dim=1) - 1).clamp(min=0)
        if context is not None:
            pos = pos + context.long()[:, None]
        return torch.where(valid, kv_slots(block_table, rows, pos, block_size), -1)

    # ---- outputs --------------------------------------------------------------------------------
    def source_rows(self, stage: int = -1) -> torch.Tensor:
        """int32, ``stage``'s token shape: the flat input row of every slot (-1: padding)."""
        st = self.stages[stage]
        if st.source_index is not None:
            return st.source_index
        valid = st.mask
        flat = torch.arange(valid.numel(), device=valid.device, dtype=torch.int32).view(valid.shape)
        return torch.where(valid, flat, torch.full((), -1, dtype=torch.int32, device=valid.device))

    def loss_targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Spec 6.4: the label each slot of the last stage predicts -- ``labels`` (the input's
        shape) shifted by one on the input sequence, then compacted with the tokens (a kept token
        predicts the token that followed it originally). Padding and sequence ends give
        :data:`IGNORE_INDEX`."""
        st0 = self.stages[0]
        if self.kind == "packed":
            flat = labels.reshape(-1)
            shifted = torch.cat([flat[1:], flat.new_full((1,), IGNORE_INDEX)])
            ends = st0.cu_seqlens[1:].to(flat.device).long() - 1
            shifted[ends[ends >= 0]] = IGNORE_INDEX
        else:
            if tuple(labels.shape) != st0.shape:
                from .errors import AdscInputError

                raise AdscInputError(f"labels must have the shape of input_ids {st0.shape}, got {tuple(labels.shape)}")
            shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
            shifted = shifted.masked_fill(~st0.mask, IGNORE_INDEX).reshape(-1)
        last = self.stages[-1]
        if last.source_index is None:
            return shifted.view(last.shape)
        src = last.source_index.long()
        return shifted[src.clamp(min=0)].masked_fill(src < 0, IGNORE_INDEX)

    # ---- moving a layout -------------------------------------------------------------------------
    TENSOR_FIELDS = ("valid", "position_ids", "index", "source_index", "cu_seqlens", "seq_lens", "key_valid")

    def tensors(self, fields: Sequence[str] = TENSOR_FIELDS) -> List[torch.Tensor]:
        """The layout's tensors of ``fields`` (all by default), stage by stage in a fixed order: what
        one upload moves (see :meth:`with_tensors`)."""
        return [t for st in self.stages for name in fields if (t := getattr(st, name)) is not None]

    def with_tensors(self, tensors: Sequence[torch.Tensor],
                     fields: Sequence[str] = TENSOR_FIELDS) -> "StagedLayout":
        """The layout over ``tensors`` (e.g. device copies of ``tensors(fields)``, in its order),
        each with its original dtype and shape; host facts (``shape``, ``max_seqlen``, ``cu_host``...)
        stay. Tensor fields not in ``fields`` are left out (None): a consumer that moves part of a
        layout uses only that part (the engine's prefill moves positions, indices and offsets)."""
        unknown = set(fields) - set(self.TENSOR_FIELDS)
        if unknown:
            raise ValueError(f"unknown layout fields {sorted(unknown)}")
        it = iter(tensors)
        stages = []
        for st in self.stages:
            new = {}
            for name in self.TENSOR_FIELDS:
                old = getattr(st, name)
                new[name] = None if old is None or name not in fields else next(it).to(old.dtype).view(old.shape)
            stages.append(replace(st, **new))
        return StagedLayout(self.kind, self.stage_map, stages, compact=self.compact)


def _with_cache(stages: List[Stage], cache_valid: Optional[Sequence[torch.Tensor]]) -> List[Stage]:
    if cache_valid is None:
        return stages
    return [replace(st, key_valid=torch.cat([cv, st.mask], dim=1), offset=int(cv.shape[1]))
            for st, cv in zip(stages, cache_valid)]
