"""The ADSC serving engine: packed prefill, staged paged KV cache, batched decode.

``Engine(model, schedule=...)`` takes a Hugging Face multimodal model (LLaVA-1.5, Qwen2-VL,
Qwen2.5-VL; the spec's ``check_runtime`` refuses LLaVA-NeXT / OneVision and Qwen3-VL's DeepStack when
the engine is built) and runs its vision tower, projector and
decoder layers itself, reusing the model's modules and weights through the spec. It is a backend
of the one generation loop (:class:`~adsc_ext.generation.Generator`: admit, prefill, decode, pick,
retire), which gives it ``generate()``:

- **prefill** runs on a packed batch (no padding). The batch is planned on the host with the
  core's CPU plan (the request ids are host tensors anyway; the C++ plan of a batch takes well
  under a millisecond and runs while the device works through the vision tower) into a packed
  :class:`~adsc_ext.layout.StagedLayout`. Everything the device needs for the batch -- token
  ids, the layout's positions, gather indices and ``cu_seqlens``, and every stage's block tables
  -- goes to the device in **one** host-to-device copy (pinned, non-blocking); slot mappings and
  the last-token rows are computed there. No host-device synchronisation until the picked tokens
  are read back. At every stage boundary the layout compacts the hidden states and the rotary
  cos/sin (:meth:`~adsc_ext.layout.StagedLayout.enter`). Attention is varlen (see
  :mod:`adsc_ext.runtime.attention`).
- **KV cache**: one paged pool per stage (:class:`~adsc_ext.runtime.kv_pool.StagedKVPool`); K/V
  are written with :func:`adsc_ext.write_paged_kv` at each stage's slot mapping; decode attention
  reads the pool through block tables. RoPE uses the original positions; generated token ``t`` of a
  request whose prompt had ``n`` tokens gets position ``n + t`` (spec section 5).
- **decode**: the batch's layout (tokens, positions, cached lengths, block tables) is uploaded once
  when the batch changes; a step then runs on the device alone (slots, lengths and positions
  advance there, tokens are picked there by :func:`adsc_ext.sampling.pick_tokens`) and reads back
  only the picked tokens. ``cuda_graphs=True`` captures the step's decoder once per batch-size
  bucket into a CUDA graph over static buffers and replays it (see :class:`_GraphRunner`).
- **continuous batching**: requests wait in a queue; between decode steps, waiting requests are
  admitted (prefilled together) as soon as batch slots (``max_batch_size``) and KV blocks allow.
  A request reserves its blocks for prompt + ``max_new_tokens`` at admission (no preemption) and
  frees them when it finishes. A call's fresh pool is dropped when the call ends.
"""

from __future__ import annotations

import numbers
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import AdscInputError, EngineInputError, KVCapacityError, ScheduleError
from ..generation import Generator, Request, Seq
from ..layout import StagedLayout, StageMap, kv_slots
from ..models.base import model_spec, positive_int, unwrap
from .attention import Attention, gather_index
from .kv_pool import StagedKVPool, blocks_needed

__all__ = ["Engine", "EngineInputError", "KVCapacityError"]

#: The layout fields a prefill moves to the device (with the token ids and the block tables).
_PREFILL_FIELDS = ("position_ids", "index", "cu_seqlens")


@dataclass
class _DecodeBatch:
    """Device-side decode state of a running batch (views of static buffers under CUDA graphs)."""

    rids: List[int]
    tokens: torch.Tensor  # int64 [B]: the token fed to the next step
    pos: torch.Tensor  # int64 [*lead, B]: its position (every component: M-RoPE's [4, B])
    lens: List[torch.Tensor]  # per stage, int32 [B]: tokens cached before this step's token
    block_tables: List[torch.Tensor]  # per stage, int32 [B, width]
    valid: Optional[torch.Tensor]  # bool [B]: real rows (None: all rows are real)
    increment: Optional[torch.Tensor]  # int32 [B]: 1 for real rows, 0 for padding (None: all 1)
    max_lens: List[int]  # per stage, host: the longest cached length before this step
    pool: StagedKVPool
    runner: Optional["_GraphRunner"] = None


class Engine(Generator):
    """Batched ADSC generation for a Hugging Face multimodal model (``generate()``: see
    :meth:`adsc_ext.generation.Generator.generate`).

    Args:
        model: a ``transformers`` LLaVA-1.5, Qwen2-VL or Qwen2.5-VL model (LLaMA-family text model,
            see :mod:`adsc_ext.models`), in eval mode; ``apply_adsc`` need not have been called.
        schedule: schedule string / :class:`~adsc_ext.Schedule`; None: ``config.adsc_schedule`` or
            the architecture's default. ``""`` runs the unmodified model.
        backend: attention backend, ``"flash_attn" | "torch_varlen" | "sdpa"``, or None / "auto".
        block_size: tokens per KV block (an int >= 1).
        num_blocks: blocks of every stage's pool (an int for all stages or one per stage) for a
            persistent cache, allocated (and zero-filled) here; None sizes fresh pools for each
            ``generate`` call to exactly the blocks its requests need in every stage (dropped when
            the call ends).
        max_batch_size: most requests decoded together (others wait and join between steps).
        cuda_graphs: capture each decode step's decoder in a CUDA graph, one per batch-size bucket
            (powers of two up to ``max_batch_size``), and replay it. CUDA only. A graph bakes in
            the KV pools' addresses, so give ``num_blocks`` (a persistent pool) to reuse graphs
            across ``generate`` calls; fresh pools are captured again. **Not yet verified
            on a GPU**: the bookkeeping (static buffers, padded rows, buckets) is tested on the CPU
            with the capture replaced by a plain call.

    ``stats`` after ``generate``: the loop's (``prefill_seconds``: wall time of the prefills,
    synchronised; ``decode_seconds``, ``decode_steps``, ``decode_tokens``, ``prefills``,
    ``admitted_per_prefill``), and ``prefill_decoder_seconds`` (the decoder layers alone, CUDA
    events on a GPU), ``prefill_host_layout_seconds`` (the host work of the prefills: plan,
    layout, upload), ``prefill_reindex_device_seconds`` (the compactions at the stage boundaries,
    on the device), ``backend``, ``decode_path``, ``cuda_graphs``, ``graphs_captured``,
    ``pool_bytes``, ``pool_blocks`` (per stage), ``peak_kv_bytes``.
    """

    def __init__(self, model, schedule=None, *, backend: Optional[str] = None, block_size: int = 16,
                 num_blocks: Union[None, int, Sequence[int]] = None, max_batch_size: int = 256,
                 cuda_graphs: bool = False):
        model = unwrap(model)
        self.spec = spec = model_spec(model)
        spec.check_runtime("the engine")
        self.schedule, self.stages = spec.resolve_schedule(schedule, model.config)
        self.stage_map = StageMap(self.schedule, spec.num_layers)
        self.block_size = positive_int("block_size", block_size)
        self.max_batch_size = positive_int("max_batch_size", max_batch_size)
        self.model = model
        self.layers = spec.layers
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.attention = Attention(backend, self.device, block_size=self.block_size)
        self.cuda_graphs = bool(cuda_graphs)
        if self.cuda_graphs:
            _require_cuda_graphs(self.device)
        self._graphs: Dict[Tuple[int, Tuple[int, ...]], _GraphRunner] = {}
        self._graph_pool = None
        if num_blocks is None:
            self.pool: Optional[StagedKVPool] = None
        else:
            if isinstance(num_blocks, numbers.Integral) and not isinstance(num_blocks, bool):
                nb = [int(num_blocks)] * len(self.stages)
            else:
                nb = list(num_blocks)
                if len(nb) != len(self.stages):
                    raise AdscInputError(f"num_blocks needs one entry per stage ({len(self.stages)}), got {nb}")
            for b in nb:
                if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0:
                    raise AdscInputError(f"num_blocks must be ints >= 0, got {nb}")
            self.pool = self._new_pool([int(b) for b in nb])
        self.stats: Dict[str, Any] = {}
        self._call: Optional[_Call] = None  # what one generate() call holds (its pool, blocks, timers)
        self._dstate: Optional[_DecodeBatch] = None  # decode layout of the running batch

    # ---- the model's facts, for callers ---------------------------------------------------------
    @property
    def backend(self) -> str:
        return self.attention.name

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def stage_of_layer(self) -> Tuple[int, ...]:
        return self.stage_map.stage_of_layer

    @property
    def image_token_id(self) -> int:
        return self.spec.image_token_id

    @property
    def grid(self):
        """The one image grid of a model whose images all have it (LLaVA-1.5), else None."""
        return self.spec.schedule_grid()

    @property
    def tokens_per_image(self) -> Optional[int]:
        grid = self.grid
        return None if grid is None else grid[0] * grid[1]

    @property
    def num_kv_heads(self) -> int:
        return self.spec.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.spec.head_dim

    # ---- pools ------------------------------------------------------------------------------------
    def _new_pool(self, num_blocks: Sequence[int]) -> StagedKVPool:
        return StagedKVPool(self.stage_map.stage_layers(), num_blocks, block_size=self.block_size,
                            num_kv_heads=self.spec.num_kv_heads, head_dim=self.spec.head_dim, dtype=self.dtype,
                            device=self.device)

    def pool_for(self, requests: Sequence[Any], max_new_tokens: int) -> StagedKVPool:
        """A fresh KV pool holding exactly ``requests`` at once with ``max_new_tokens`` each (``0``:
        the prompts alone): what ``generate`` allocates for them."""
        return self._new_pool(self.pool_blocks_for(requests, max_new_tokens))

    def pool_blocks_for(self, requests: Sequence[Any], max_new_tokens: int) -> List[int]:
        """Blocks every stage's pool needs to hold all ``requests`` at once (prompt + new tokens):
        the ``num_blocks`` of a persistent pool sized for them."""
        out = [0] * len(self.stages)
        for req in requests:
            ids, new, inputs = _request_parts(req)
            new = max_new_tokens if new is None else int(new)
            for k, n in enumerate(self.stage_lengths(ids, **inputs)):
                out[k] += blocks_needed(n + new, self.block_size)
        return out

    # ---- requests --------------------------------------------------------------------------------
    def stage_lengths(self, input_ids: torch.Tensor, **inputs) -> List[int]:
        """Prompt tokens alive in every stage for one request's ``input_ids`` (and the processor
        outputs that give its images' grids, e.g. ``image_grid_thw``)."""
        ids = input_ids.reshape(-1)
        return self.spec.stage_lengths(self.schedule, ids.numel(), self.spec.prompt_grids(ids, **inputs))

    def analytic_kv_tokens(self, requests: Sequence[Any], max_new_tokens: int) -> int:
        """Sum over layers and requests of cached tokens (prompt alive in the layer's stage + new)."""
        total = 0
        for req in requests:
            ids, new, inputs = _request_parts(req)
            new = max_new_tokens if new is None else int(new)  # a request's own budget, as pool_blocks_for
            lens = self.stage_lengths(ids, **inputs)
            total += sum(lens[s] + new for s in self.stage_of_layer)
        return total

    def kv_bytes_per_token(self) -> int:
        """Bytes of K+V of one token in one layer."""
        return self.spec.kv_bytes_per_token(self.dtype)

    # ---- the generation loop's backend -------------------------------------------------------------
    def _check(self, seq: Seq) -> None:
        try:
            seq.stage_lens = self.spec.stage_lengths(self.schedule, seq.n, seq.grids)
        except ScheduleError as exc:  # an image of its own grid that the schedule cannot downsample
            raise ScheduleError(f"request {seq.rid}: {exc}") from None
        if self.pool is not None:
            need = [L + seq.max_new for L in seq.stage_lens]
            if not self.pool.fits_ever(need):
                raise KVCapacityError(
                    f"request {seq.rid}: needs {need} cache tokens per stage (prompt + max_new_tokens) but the "
                    f"KV pools hold {self.pool.capacity_tokens()} tokens ({self.block_size}-token blocks); it can "
                    f"never be served"
                )

    def _start(self, seqs: List[Seq]) -> None:
        pool = self.pool
        if pool is None:  # size a fresh pool exactly for this call
            pool = self._new_pool([sum(blocks_needed(s.stage_lens[k] + s.max_new, self.block_size) for s in seqs)
                                   for k in range(len(self.stages))])
        self._call = _Call(pool)
        self._dstate = None
        self.stats.update(backend=self.backend, cuda_graphs=self.cuda_graphs, pool_bytes=pool.total_bytes(),
                          pool_blocks=[p.num_blocks for p in pool.pools])

    def _admit(self, waiting: Deque[Seq], running: List[Seq]) -> List[Seq]:
        call, admitted = self._call, []
        while waiting and len(running) + len(admitted) < self.max_batch_size:
            s = waiting[0]
            need = [L + s.max_new for L in s.stage_lens]
            if not call.pool.can_allocate(need):
                break
            call.pool.allocate(s.rid, need)
            call.held.append(s.rid)
            admitted.append(waiting.popleft())
        return admitted

    def _release(self, seq: Seq) -> None:
        self._call.pool.free(seq.rid)
        self._call.held.remove(seq.rid)

    def _finish(self, stats: Dict[str, Any]) -> None:
        call, self._call, self._dstate = self._call, None, None  # nothing of the call outlives it
        if call is None:
            return
        for rid in call.held:
            call.pool.free(rid)
        if call.pool is not self.pool:  # a fresh pool for this call: no captured graph keeps it alive
            for runner in self._graphs.values():
                if runner.pool is call.pool:
                    runner.replay = runner.out = runner.pool = None
        stats["prefill_decoder_seconds"] = sum(t["decoder"].seconds() for t in call.timers)
        stats["prefill_host_layout_seconds"] = sum(t["host"] for t in call.timers)
        stats["prefill_reindex_device_seconds"] = sum(r.seconds() for t in call.timers for r in t["reindex"])
        stats["peak_kv_bytes"] = call.pool.peak_used_bytes
        stats["decode_path"] = self.attention.decode_path
        stats["graphs_captured"] = len(self._graphs)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _accept(self, seqs: List[Seq], tokens: torch.Tensor) -> None:
        state = self._dstate
        if state is not None and state.pool is self._call.pool and state.rids == [s.rid for s in seqs]:
            state.tokens[: len(seqs)].copy_(tokens)  # the next step's input, without a host round trip

    # ---- transfers ------------------------------------------------------------------------------
    def _upload(self, parts: Sequence[Union[torch.Tensor, Sequence[int]]]) -> List[torch.Tensor]:
        """Every integer the device needs for a batch, in ONE host-to-device copy.

        ``parts`` are host int tensors or lists of ints; returns int64 device views, one per part.
        The staging buffer is pinned on CUDA, so the copy does not block the host."""
        host = [p.reshape(-1).to(torch.int64) if isinstance(p, torch.Tensor) else torch.as_tensor(p, dtype=torch.int64)
                for p in parts]
        flat = torch.cat(host) if host else torch.empty(0, dtype=torch.int64)
        if self.device.type == "cuda":
            flat = flat.pin_memory()
        dev = flat.to(self.device, non_blocking=True)
        return list(dev.split([h.numel() for h in host]))

    def _to_device(self, t):
        """A request input on the model's device (floating ones in its dtype)."""
        if not isinstance(t, torch.Tensor):
            return t
        return t.to(self.device, self.dtype if t.is_floating_point() else t.dtype, non_blocking=True)

    def _upload_pixels(self, seqs: List[Seq]) -> Optional[torch.Tensor]:
        """The batch's images in one host-to-device copy (None without images)."""
        pix = [s.pixel_values for s in seqs if s.pixel_values is not None]
        if not pix:
            return None
        host = torch.cat([p.cpu() for p in pix]).to(self.dtype)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    # ---- one decoder layer ------------------------------------------------------------------------
    def _layer(self, l: int, h: torch.Tensor, cos, sin, pool: StagedKVPool, slots, attend):
        from ..ops import write_paged_kv

        layer = self.layers[l]
        q, k, v = self.spec.attention_inputs(layer, h, cos, sin)
        k, v = k.contiguous(), v.contiguous()
        sp = pool.pools[self.stage_map.stage_of_layer[l]]
        write_paged_kv(k, v, sp.k[l], sp.v[l], slots, check_slots=False)
        return self.spec.attention_output(layer, h, attend(q, k, v, sp.k[l], sp.v[l]))

    # ---- prefill -------------------------------------------------------------------------------------
    def _prefill_layout(self, pool: StagedKVPool, seqs: List[Seq]) -> Dict[str, Any]:
        """The host side of a prefill: the packed batch's layout (the core's CPU plan on the host
        ids: no device round trip, and its sizes equal the host-known stage lengths) and every
        integer the device needs, as ``parts`` for :meth:`_upload`."""
        S = len(self.stages)
        ids_host = torch.cat([s.ids for s in seqs])
        cu0 = [0]
        for s in seqs:
            cu0.append(cu0[-1] + s.n)
        inputs = self.spec.collate([s.request for s in seqs])  # the batch's grids etc., in request order
        plan, pos = self.spec.prepare(self.schedule, ids_host, cu_seqlens=torch.as_tensor(cu0, dtype=torch.int32),
                                      **inputs)
        layout = StagedLayout.packed(self.stage_map, plan, position_ids=pos)
        pos0 = layout.stages[0].position_ids  # [*lead, T] on the host: each request's next position
        for s, a, b in zip(seqs, cu0[:-1], cu0[1:]):
            one = pos0[..., a:b].unsqueeze(-2)
            self._call.next_pos[s.rid] = self.spec.next_positions(one, torch.ones(1, b - a, dtype=torch.bool))[..., 0]
        widths = [max(len(pool.tables[s.rid][k]) for s in seqs) for k in range(S)]
        tables = [pool.block_table_rows([s.rid for s in seqs], k, widths[k]) for k in range(S)]
        parts = [ids_host, *tables, *layout.tensors(_PREFILL_FIELDS)]
        return dict(parts=parts, widths=widths, layout=layout, inputs=inputs)

    def _prefill(self, seqs: List[Seq]) -> torch.Tensor:
        call, B, S, bs = self._call, len(seqs), len(self.stages), self.block_size
        pool = call.pool
        t_host = time.perf_counter()
        host = self._prefill_layout(pool, seqs)
        dev = self._upload(host["parts"])
        t_host = time.perf_counter() - t_host
        ids = dev[0]
        bts = [dev[1 + k].view(B, w) for k, w in enumerate(host["widths"])]
        layout = host["layout"].with_tensors(dev[1 + S:], _PREFILL_FIELDS)
        slots = [layout.slot_mapping(k, bts[k], bs) for k in range(S)]
        pix_dev = self._upload_pixels(seqs)
        inputs = {k: self._to_device(v) for k, v in host["inputs"].items()}
        n_img_tokens = sum(g[0] * g[1] for s in seqs for g in s.grids)  # on the host: no device sync
        h = self.spec.embed(ids, pix_dev, num_image_tokens=n_img_tokens, **inputs)
        cos, sin = self.spec.rotary(h[None], layout.stages[0].position_ids.unsqueeze(-2))  # one batch row
        cos, sin = cos[0], sin[0]
        timer = _Timer(self.device)
        reindex = [_Timer(self.device) for _ in range(S - 1)]
        timer.start()
        for l, s, entering in layout.layers():
            st = layout.stages[s]
            if entering and s > 0:
                reindex[s - 1].start()
                h, cos, sin = layout.enter(s, h, cos, sin)
                reindex[s - 1].stop()

            def attend(q, k, v, kc, vc, st=st):
                return self.attention.varlen_prefill(q, k, v, st.cu_seqlens, st.max_seqlen, self.spec.scaling,
                                                     cu_host=st.cu_host)

            h = self._layer(l, h, cos, sin, pool, slots[s], attend)
        timer.stop()
        last = (layout.stages[-1].cu_seqlens[1:] - 1).long()  # the last prompt row of every sequence, on the device
        call.timers.append(dict(decoder=timer, reindex=reindex, host=t_host))
        return self.spec.logits(h[last])

    # ---- decode --------------------------------------------------------------------------------------
    def _decode_layout(self, pool: StagedKVPool, seqs: List[Seq]) -> _DecodeBatch:
        """Upload a running batch's decode state (one copy); built when the batch changes."""
        S, B = len(self.stages), len(seqs)
        rids = [s.rid for s in seqs]
        widths = [max(len(pool.tables[r][k]) for r in rids) for k in range(S)]
        lens_host = [[s.stage_lens[k] + len(s.generated) - 1 for s in seqs] for k in range(S)]
        # each request's position: its next one after the prompt (n, or the spec's rule: M-RoPE's n + delta) + t
        nxt = self._call.next_pos
        pos = torch.stack([nxt[s.rid] + (len(s.generated) - 1) for s in seqs], dim=-1)  # [*lead, B]
        parts: List[Any] = [[s.generated[-1] for s in seqs], pos]
        parts += lens_host
        parts += [pool.block_table_rows(rids, k, widths[k]) for k in range(S)]
        if self.cuda_graphs:
            runner = self._runner(B, widths)
            return runner.load(rids, parts, widths, [max(x) for x in lens_host], pool, self)
        dev = self._upload(parts)
        return _DecodeBatch(rids, dev[0], dev[1].view(pos.shape), [t.to(torch.int32) for t in dev[2:2 + S]],
                            [dev[2 + S + k].view(B, widths[k]).to(torch.int32) for k in range(S)], None, None,
                            [max(x) for x in lens_host], pool)

    def _decode(self, seqs: List[Seq]) -> torch.Tensor:
        pool = self._call.pool
        state = self._dstate
        if state is None or state.pool is not pool or state.rids != [s.rid for s in seqs]:
            state = self._dstate = self._decode_layout(pool, seqs)
        if state.runner is not None:
            logits = state.runner.step(state)
        else:
            logits = self._decode_forward(state, full_width=False)
        inc = 1 if state.increment is None else state.increment  # padded rows stay where they are
        for at in state.lens:
            at.add_(inc)
        state.pos.add_(inc)
        state.max_lens = [m + 1 for m in state.max_lens]
        return logits[: len(seqs)]

    def _decode_forward(self, state: _DecodeBatch, full_width: bool) -> torch.Tensor:
        """One decode step's decoder on the device state: logits ``[B, vocab]``. Writes this
        step's K/V; changes no other state (so a CUDA graph can capture it). ``full_width``: the
        gather path reads the whole block table (static shapes) instead of the blocks in use."""
        bs = self.block_size
        h = self.model.get_input_embeddings()(state.tokens)
        cos, sin = self.spec.rotary(h[None], state.pos.unsqueeze(-2))
        cos, sin = cos[0], sin[0]
        paged = self.attention.decode_path == "paged"
        rows = torch.arange(state.tokens.shape[0], device=state.tokens.device)
        per_stage = []
        for k, (bt, at) in enumerate(zip(state.block_tables, state.lens)):
            slots = kv_slots(bt, rows, at, bs)  # the new token's slot: cache position `at` of the row
            if state.valid is not None:
                slots = torch.where(state.valid, slots, -1)  # padded rows write nothing
            seq_lens = at + 1
            if paged:
                per_stage.append((slots, bt, seq_lens, self.attention.decode_cu_seqlens(seq_lens), None))
            else:
                width = bt.shape[1] if full_width else blocks_needed(state.max_lens[k] + 1, bs)
                per_stage.append((slots, bt, seq_lens, None, gather_index(bt, seq_lens, width, bs)))
        for l, s, _ in self.stage_map.layers():  # one token per row: every stage has the same layout
            slots, bt, seq_lens, cu_k, gidx = per_stage[s]

            def attend(q, k, v, kc, vc, bt=bt, seq_lens=seq_lens, cu_k=cu_k, gidx=gidx):
                return self.attention.paged_decode(q, kc, vc, bt, seq_lens, self.spec.scaling, cu_seqlens_k=cu_k,
                                                   gather=gidx)

            h = self._layer(l, h, cos, sin, state.pool, slots, attend)
        return self.spec.logits(h)

    def _runner(self, B: int, widths: Sequence[int]) -> "_GraphRunner":
        bucket = _bucket(B, self.max_batch_size)
        wb = tuple(_bucket(w, 1 << 30) for w in widths)
        # A runner for a wider table serves narrower ones (extra columns point at block 0, unread).
        for (b, ws), r in self._graphs.items():
            if b == bucket and all(x >= y for x, y in zip(ws, wb)):
                return r
        r = self._graphs[(bucket, wb)] = _GraphRunner(self, bucket, wb)
        return r


class _Call:
    """What one ``generate`` call holds: its pool (the persistent one, or a fresh one sized for
    the call), the requests holding blocks, and the prefills' timers."""

    def __init__(self, pool: StagedKVPool):
        self.pool = pool
        self.held: List[int] = []
        self.timers: List[Dict[str, Any]] = []
        self.next_pos: Dict[int, torch.Tensor] = {}  # rid -> [*lead]: the position after its prompt (host)


def _request_parts(req) -> Tuple[torch.Tensor, Optional[int], Dict[str, Any]]:
    """``(input_ids, max_new_tokens, other inputs)`` of a :class:`Request` or its dict form."""
    if isinstance(req, Request):
        return req.input_ids, req.max_new_tokens, dict(req.inputs)
    rest = {k: v for k, v in req.items() if k not in ("input_ids", "max_new_tokens", "pixel_values")}
    return req["input_ids"], req.get("max_new_tokens"), rest


def _bucket(n: int, cap: int) -> int:
    """The batch-size bucket of ``n``: the next power of two, at most ``cap`` (and at least n)."""
    b = 1
    while b < n:
        b *= 2
    return max(n, min(b, cap))


def _require_cuda_graphs(device: torch.device) -> None:
    if device.type != "cuda":
        raise AdscInputError(f"cuda_graphs=True needs the model on a CUDA device, it is on {device}")


def _warmup(fn: Callable[[], torch.Tensor], device: torch.device) -> torch.Tensor:
    """Run ``fn`` once before its capture; on CUDA on a side stream, as ``torch.cuda.graph``
    advises (lazy initialisations such as cuBLAS workspaces then happen outside the capture)."""
    if device.type != "cuda":
        return fn()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        out = fn()
    main = torch.cuda.current_stream(device)
    main.wait_stream(side)
    out.record_stream(main)  # made on the side stream, read on the main one
    return out


def _capture(fn: Callable[[], torch.Tensor], pool) -> Tuple[Callable[[], None], torch.Tensor]:
    """Capture ``fn`` (already warmed up) in a CUDA graph: ``(replay, output)``; ``output`` is
    the static tensor a replay rewrites. Tests on a CPU replace this with a plain call."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph.replay, out


class _GraphRunner:
    """Static device buffers for one batch-size bucket and block-table widths, and the captured
    decode step over them.

    Rows past the live batch are padding: their slots are -1 (they write nothing), their length
    stays 0 (so they attend to one key of block 0, which is finite) and their logits are dropped.
    ``load`` copies a new batch's state into the buffers (one upload, then device copies), so
    every address the graph saw stays valid; a step updates them in place.
    """

    def __init__(self, engine: Engine, batch: int, widths: Sequence[int]):
        dev, S = engine.device, len(engine.stages)
        self.engine, self.batch, self.widths = engine, batch, tuple(widths)
        self.tokens = torch.zeros(batch, dtype=torch.int64, device=dev)
        self.pos = torch.zeros(*engine.spec.position_lead, batch, dtype=torch.int64, device=dev)
        self.lens = [torch.zeros(batch, dtype=torch.int32, device=dev) for _ in range(S)]
        self.block_tables = [torch.zeros(batch, w, dtype=torch.int32, device=dev) for w in widths]
        self.valid = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.increment = torch.zeros(batch, dtype=torch.int32, device=dev)
        self.replay: Optional[Callable[[], None]] = None
        self.out: Optional[torch.Tensor] = None
        self.captures = 0
        self.pool: Optional[StagedKVPool] = None

    def load(self, rids, parts, widths, max_lens, pool: StagedKVPool, engine: Engine) -> _DecodeBatch:
        S, B = len(self.lens), len(rids)
        if pool is not self.pool:  # the graph baked in the KV tensors' addresses
            self.replay, self.out, self.pool = None, None, pool
        dev = engine._upload(parts)
        for buf in (self.tokens, self.pos, *self.lens, *self.block_tables):
            buf.zero_()
        self.tokens[:B].copy_(dev[0])
        self.pos[..., :B].copy_(dev[1].view(*self.pos.shape[:-1], B))
        for k in range(S):
            self.lens[k][:B].copy_(dev[2 + k])
            self.block_tables[k][:B, : widths[k]].copy_(dev[2 + S + k].view(B, widths[k]))
        self.valid.copy_(torch.arange(self.batch, device=self.valid.device) < B)
        self.increment.copy_(self.valid)
        return _DecodeBatch(list(rids), self.tokens, self.pos, self.lens, self.block_tables, self.valid,
                            self.increment, list(max_lens), pool, runner=self)

    def step(self, state: _DecodeBatch) -> torch.Tensor:
        eng = self.engine

        def fn():
            return eng._decode_forward(state, full_width=True)

        if self.replay is None:
            out = _warmup(fn, eng.device)  # also this step's result (it writes the same K/V a replay would)
            if eng._graph_pool is None and eng.device.type == "cuda":
                eng._graph_pool = torch.cuda.graph_pool_handle()
            self.replay, self.out = _capture(fn, eng._graph_pool)
            self.captures += 1
            return out
        self.replay()
        return self.out


class _Timer:
    """Elapsed time of a region of device work: CUDA events on a GPU (read after the work is done),
    the host clock on a CPU (where the work is synchronous)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._t = 0.0
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self._start.record()
        else:
            self._t = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self._end.record()
        else:
            self._t = time.perf_counter() - self._t

    def seconds(self) -> float:
        if self.cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        return self._t
