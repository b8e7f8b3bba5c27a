"""The ADSC serving engine: packed prefill, staged paged KV cache, batched decode.

``Engine(model, schedule=...)`` takes a ``transformers.LlavaForConditionalGeneration`` and runs its
vision tower, projector and decoder layers itself (reusing the model's modules and weights, through
the one model description :mod:`adsc_ext.models.llava`):

- **prefill** runs on a packed batch (no padding). The batch is planned on the host with the
  core's CPU plan (the request ids are host tensors anyway; the C++ plan of a batch takes well
  under a millisecond and runs while the device works through the vision tower). Everything the
  device needs for the batch -- token ids, every stage's gather index and ``cu_seqlens``, the
  original positions and every stage's block tables -- goes to the device in **one** host-to-device
  copy (pinned, non-blocking); slot mappings and the last-token rows are computed there. No
  host-device synchronisation until the picked tokens are read back. At every stage boundary the
  hidden states and the rotary cos/sin are re-indexed with :func:`adsc_ext.compact_tokens`.
  Attention is varlen (see :mod:`adsc_ext.runtime.attention`).
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
  frees them when it finishes.
"""

from __future__ import annotations

import numbers
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..models.llava import (
    attention_inputs,
    attention_output,
    check_request,
    embed_with_images,
    llava_spec,
    resolve_schedule,
    rotary,
    unwrap,
)
from ..sampling import pick_tokens
from .attention import Attention, gather_index
from .kv_pool import KVCapacityError, StagedKVPool, blocks_needed

__all__ = ["Engine", "EngineInputError", "KVCapacityError"]


class EngineInputError(ValueError):
    """A request the engine cannot run (bad ids, images that do not match the model...)."""


def _positive_int(name: str, value) -> int:
    """``value`` as an int >= 1; a float, bool or string is refused rather than truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


@dataclass
class _Seq:
    rid: int
    ids: torch.Tensor  # int64 [n], on the host
    pixel_values: Optional[torch.Tensor]  # on the host
    num_images: int
    stage_lens: List[int]  # prompt tokens alive in every stage
    max_new: int
    generated: List[int] = field(default_factory=list)
    logits: Optional[List[torch.Tensor]] = None  # per generated token, with return_logits=True

    @property
    def n(self) -> int:
        return self.ids.numel()


@dataclass
class _DecodeBatch:
    """Device-side decode state of a running batch (views of static buffers under CUDA graphs)."""

    rids: List[int]
    tokens: torch.Tensor  # int64 [B]: the token fed to the next step
    pos: torch.Tensor  # int64 [B]: its position
    lens: List[torch.Tensor]  # per stage, int32 [B]: tokens cached before this step's token
    block_tables: List[torch.Tensor]  # per stage, int32 [B, width]
    valid: Optional[torch.Tensor]  # bool [B]: real rows (None: all rows are real)
    increment: Optional[torch.Tensor]  # int32 [B]: 1 for real rows, 0 for padding (None: all 1)
    max_lens: List[int]  # per stage, host: the longest cached length before this step
    pool: StagedKVPool
    runner: Optional["_GraphRunner"] = None


class Engine:
    """Batched ADSC generation for a Hugging Face LLaVA model.

    Args:
        model: a ``transformers.LlavaForConditionalGeneration`` (LLaMA-family text model), in eval
            mode; ``apply_adsc`` need not have been called.
        schedule: schedule string / :class:`~adsc_ext.Schedule`; None: ``config.adsc_schedule`` or
            the LLaVA-1.5 default. ``""`` runs the unmodified model.
        backend: attention backend, ``"flash_attn" | "torch_varlen" | "sdpa"``, or None / "auto".
        block_size: tokens per KV block (an int >= 1).
        num_blocks: blocks of every stage's pool (an int for all stages or one per stage) for a
            persistent cache, allocated (and zero-filled) here; None sizes fresh pools for each
            ``generate`` call to exactly the blocks its requests need in every stage.
        max_batch_size: most requests decoded together (others wait and join between steps).
        cuda_graphs: capture each decode step's decoder in a CUDA graph, one per batch-size bucket
            (powers of two up to ``max_batch_size``), and replay it. CUDA only. A graph bakes in
            the KV pools' addresses, so give ``num_blocks`` (a persistent pool) to reuse graphs
            across ``generate`` calls; fresh pools are captured again. **Not yet verified
            on a GPU**: the bookkeeping (static buffers, padded rows, buckets) is tested on the CPU
            with the capture replaced by a plain call.
    """

    def __init__(self, model, schedule=None, *, backend: Optional[str] = None, block_size: int = 16,
                 num_blocks: Union[None, int, Sequence[int]] = None, max_batch_size: int = 256,
                 cuda_graphs: bool = False):
        model = unwrap(model)
        self.spec = spec = llava_spec(model)
        self.schedule, self.stages = resolve_schedule(model.config, schedule, spec.num_layers, spec.grid)
        self.block_size = _positive_int("block_size", block_size)
        self.max_batch_size = _positive_int("max_batch_size", max_batch_size)
        self.model = model
        self.text = model.model.language_model
        self.grid = spec.grid
        self.image_token_id = spec.image_token_id
        self.num_layers = spec.num_layers
        self.tokens_per_image = spec.tokens_per_image
        self.stage_of_layer = [self.schedule.stage_of_layer(l) for l in range(self.num_layers)]
        self.boundaries = {st.first_layer: st.stage for st in self.stages[1:]}
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.attention = Attention(backend, self.device, block_size=self.block_size)
        self.head_dim, self.num_heads, self.num_kv_heads = spec.head_dim, spec.num_heads, spec.num_kv_heads
        self.scaling = spec.scaling
        self.image_size = spec.image_size
        self.max_positions = spec.max_positions
        self.cuda_graphs = bool(cuda_graphs)
        if self.cuda_graphs:
            _require_cuda_graphs(self.device)
        self._graphs: Dict[Tuple[int, Tuple[int, ...]], _GraphRunner] = {}
        self._graph_pool = None
        if num_blocks is None:
            self._fixed_blocks = None
            self.pool: Optional[StagedKVPool] = None
        else:
            if isinstance(num_blocks, numbers.Integral) and not isinstance(num_blocks, bool):
                nb = [int(num_blocks)] * len(self.stages)
            else:
                nb = list(num_blocks)
                if len(nb) != len(self.stages):
                    raise ValueError(f"num_blocks needs one entry per stage ({len(self.stages)}), got {nb}")
            for b in nb:
                if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 0:
                    raise ValueError(f"num_blocks must be ints >= 0, got {nb}")
            self._fixed_blocks = [int(b) for b in nb]
            self.pool = self._new_pool(self._fixed_blocks)
        self.stats: Dict[str, Any] = {}
        self.last_pool: Optional[StagedKVPool] = None
        self._dstate: Optional[_DecodeBatch] = None  # decode layout of the running batch
        self._running = False  # generate() is not re-entrant

    @property
    def backend(self) -> str:
        return self.attention.name

    def _new_pool(self, num_blocks: Sequence[int]) -> StagedKVPool:
        layers = [list(range(st.first_layer, st.end_layer)) for st in self.stages]
        return StagedKVPool(layers, num_blocks, block_size=self.block_size, num_kv_heads=self.num_kv_heads,
                            head_dim=self.head_dim, dtype=self.dtype, device=self.device)

    def pool_for(self, requests: Sequence[dict], max_new_tokens: int) -> StagedKVPool:
        """A fresh KV pool holding exactly ``requests`` at once with ``max_new_tokens`` each (``0``:
        the prompts alone): what ``generate`` allocates for them."""
        return self._new_pool(self.pool_blocks_for(requests, max_new_tokens))

    def pool_blocks_for(self, requests: Sequence[dict], max_new_tokens: int) -> List[int]:
        """Blocks every stage's pool needs to hold all ``requests`` at once (prompt + new tokens):
        the ``num_blocks`` of a persistent pool sized for them."""
        out = [0] * len(self.stages)
        for req in requests:
            lens = self.stage_lengths(req["input_ids"].reshape(-1))
            for k, L in enumerate(lens):
                out[k] += blocks_needed(L + int(req.get("max_new_tokens", max_new_tokens)), self.block_size)
        return out

    # ---- requests --------------------------------------------------------------------------------
    def stage_lengths(self, input_ids: torch.Tensor) -> List[int]:
        """Prompt tokens alive in every stage for one request's ``input_ids``."""
        n = int(input_ids.numel())
        n_img_tok = int((input_ids == self.image_token_id).sum())
        k = n_img_tok // self.tokens_per_image
        return [n - n_img_tok + k * st.tokens_per_image for st in self.stages]

    def _check_request(self, i: int, req, max_new_tokens: int) -> _Seq:
        ids, pix, n_img, max_new = check_request(self.spec, i, req, max_new_tokens, EngineInputError)
        seq = _Seq(i, ids, None if pix is None else pix.cpu(), n_img, self.stage_lengths(ids), max_new)
        if self.pool is not None:
            need = [L + max_new for L in seq.stage_lens]
            if not self.pool.fits_ever(need):
                cap = self.pool.capacity_tokens()
                raise KVCapacityError(
                    f"request {i}: needs {need} cache tokens per stage (prompt + max_new_tokens) but the "
                    f"KV pools hold {cap} tokens ({self.block_size}-token blocks); it can never be served"
                )
        return seq

    # ---- generation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, requests: Sequence[dict], max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: Optional[int] = None, suppress_image_token: bool = True,
                 generator: Optional[torch.Generator] = None, return_exceptions: bool = False,
                 return_logits: bool = False,
                 progress: Optional[Callable[[int, int], None]] = None) -> List[Any]:
        """Generate for every request; returns one list of token ids per request (in order).

        Each request: ``{"input_ids": LongTensor [n], "pixel_values": [k, 3, H, W] or None,
        "max_new_tokens": optional int}``. Greedy unless ``temperature > 0`` (then top-p sampling).
        A request stops after its ``max_new_tokens`` or at ``eos_token_id`` (included).
        Bad requests raise :class:`EngineInputError` / :class:`KVCapacityError` before any work, or,
        with ``return_exceptions=True``, get the exception as their result while the others run.
        ``return_logits=True`` makes each result ``(tokens, logits)``, logits a float32 CPU tensor
        ``[len(tokens), vocab]`` of the raw scores each token was picked from.
        ``progress(done, total)`` is called after every step; it must not call back into this
        engine (``generate`` is not re-entrant: a nested call raises ``RuntimeError``).
        The cache is left as it was (every block taken by this call is freed), also on errors.

        ``stats`` afterwards: ``prefill_seconds`` (wall time of the prefills, synchronised),
        ``prefill_decoder_seconds`` (the decoder layers alone, CUDA events on a GPU),
        ``prefill_host_layout_seconds`` (the host work of the prefills: plan, layout, upload),
        ``prefill_reindex_device_seconds`` (the compactions at the stage boundaries, on the device),
        ``decode_seconds``, ``decode_steps``, ``decode_tokens``, ``decode_path``, ``cuda_graphs``,
        ``pool_bytes``, ``peak_kv_bytes`` ...
        """
        if self._running:
            raise RuntimeError("Engine.generate() is not re-entrant: it was called while a generate() call on "
                               "this engine is running (from its progress callback?); use a second Engine")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self._running = True
        try:
            return self._generate(requests, max_new_tokens, temperature, top_p, eos_token_id,
                                  suppress_image_token, generator, return_exceptions, return_logits, progress)
        finally:
            self._running = False

    def _generate(self, requests, max_new_tokens, temperature, top_p, eos_token_id, suppress_image_token,
                  generator, return_exceptions, return_logits, progress):
        seqs: List[Optional[_Seq]] = []
        results: List[Any] = [None] * len(requests)
        for i, req in enumerate(requests):
            try:
                seqs.append(self._check_request(i, req, max_new_tokens))
            except (EngineInputError, KVCapacityError) as exc:
                if not return_exceptions:
                    raise
                results[i] = exc
                seqs.append(None)
        live = [s for s in seqs if s is not None]
        for s in live:
            s.logits = [] if return_logits else None
        pool = self.pool
        if pool is None:  # size fresh pools exactly for this call
            need = [sum(blocks_needed(s.stage_lens[k] + s.max_new, self.block_size) for s in live)
                    for k in range(len(self.stages))]
            pool = self._new_pool(need)
        self._dstate = None  # decode layout of the running batch (rebuilt when the batch changes)
        sample = dict(temperature=temperature, top_p=top_p, generator=generator,
                      suppress_token_id=self.image_token_id if suppress_image_token else None)
        stats = dict(prefill_seconds=0.0, prefill_decoder_seconds=0.0, decode_seconds=0.0, decode_steps=0,
                     decode_tokens=0, prefills=0, admitted_per_prefill=[], backend=self.backend,
                     cuda_graphs=self.cuda_graphs, pool_bytes=pool.total_bytes())
        timers: List[Dict[str, Any]] = []
        waiting = deque(live)
        running: List[_Seq] = []
        held: List[int] = []
        try:
            while waiting or running:
                admitted = []
                while waiting and len(running) + len(admitted) < self.max_batch_size:
                    s = waiting[0]
                    need = [L + s.max_new for L in s.stage_lens]
                    if not pool.can_allocate(need):
                        break
                    pool.allocate(s.rid, need)
                    held.append(s.rid)
                    admitted.append(waiting.popleft())
                if not admitted and not running:
                    raise RuntimeError("internal error: a waiting request fits no empty pool")  # checked above
                if admitted:
                    t0 = time.perf_counter()
                    timers.append(self._prefill(pool, admitted, sample))
                    stats["prefill_seconds"] += self._sync_time(t0)
                    stats["prefills"] += 1
                    stats["admitted_per_prefill"].append([s.rid for s in admitted])
                    running += admitted
                running = self._retire(pool, running, results, held, eos_token_id)
                if running:
                    t0 = time.perf_counter()
                    self._decode_step(pool, running, sample)
                    stats["decode_seconds"] += self._sync_time(t0)
                    stats["decode_steps"] += 1
                    stats["decode_tokens"] += len(running)
                    running = self._retire(pool, running, results, held, eos_token_id)
                if progress is not None:
                    progress(sum(1 for r in results if r is not None), len(requests))
        finally:
            for rid in held:
                pool.free(rid)
            stats["prefill_decoder_seconds"] = sum(t["decoder"].seconds() for t in timers)
            stats["prefill_host_layout_seconds"] = sum(t["host"] for t in timers)
            stats["prefill_reindex_device_seconds"] = sum(r.seconds() for t in timers for r in t["reindex"])
            stats["peak_kv_bytes"] = pool.peak_used_bytes
            stats["decode_path"] = self.attention.decode_path
            stats["graphs_captured"] = len(self._graphs)
            self._dstate = None
            self.stats = stats
            self.last_pool = pool
        return results

    def _sync_time(self, t0: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def _retire(self, pool, running, results, held, eos):
        keep = []
        for s in running:
            done = len(s.generated) >= s.max_new or (eos is not None and s.generated and s.generated[-1] == eos)
            if done:
                results[s.rid] = (list(s.generated) if s.logits is None
                                  else (list(s.generated), torch.stack(s.logits).float().cpu()))
                pool.free(s.rid)
                held.remove(s.rid)
            else:
                keep.append(s)
        return keep

    def _pick(self, seqs: List[_Seq], logits: torch.Tensor, sample) -> torch.Tensor:
        """Pick every sequence's next token on the device; one read-back for the host's lists."""
        toks = pick_tokens(logits, **sample)  # int64 [B], on the device
        for i, s in enumerate(seqs):
            if s.logits is not None:
                s.logits.append(logits[i].detach().clone())
        for s, t in zip(seqs, toks[: len(seqs)].tolist()):  # the step's one synchronisation
            s.generated.append(t)
        return toks

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

    # ---- one decoder layer ------------------------------------------------------------------------
    def _layer(self, l: int, h: torch.Tensor, cos, sin, pool: StagedKVPool, slots, attend):
        from ..ops import write_paged_kv

        layer = self.text.layers[l]
        q, k, v = attention_inputs(layer, h, cos, sin, self.head_dim)
        k, v = k.contiguous(), v.contiguous()
        sp = pool.pools[self.stage_of_layer[l]]
        write_paged_kv(k, v, sp.k[l], sp.v[l], slots, check_slots=False)
        return attention_output(layer, h, attend(q, k, v, sp.k[l], sp.v[l]))

    # ---- prefill -------------------------------------------------------------------------------------
    def _prefill_layout(self, pool: StagedKVPool, seqs: List[_Seq]) -> Dict[str, Any]:
        """The host side of a prefill: the plan (the core's CPU plan on the host ids: no device
        round trip, and its sizes equal the host-known stage lengths) and every integer the device
        needs, as ``parts`` for :meth:`_upload`."""
        from ..ops import stage_plan

        S = len(self.stages)
        ids_host = torch.cat([s.ids for s in seqs])
        cu0 = [0]
        for s in seqs:
            cu0.append(cu0[-1] + s.n)
        plan = stage_plan(self.schedule, input_ids=ids_host, cu_seqlens=torch.as_tensor(cu0, dtype=torch.int32),
                          image_token_id=self.image_token_id, grid=self.grid)
        widths = [max(len(pool.tables[s.rid][k]) for s in seqs) for k in range(S)]
        parts: List[Any] = [ids_host, plan.stages[0].position_ids]
        for k in range(S):
            parts += [plan.stages[k].cu_seqlens, pool.block_table_rows([s.rid for s in seqs], k, widths[k])]
        parts += [plan.stages[k].index for k in range(1, S)]
        cu_host = [[0] for _ in range(S)]
        for k in range(S):
            for s in seqs:
                cu_host[k].append(cu_host[k][-1] + s.stage_lens[k])
        return dict(parts=parts, widths=widths, cu_host=cu_host,
                    max_lens=[max(s.stage_lens[k] for s in seqs) for k in range(S)])

    def _upload_pixels(self, seqs: List[_Seq]) -> Optional[torch.Tensor]:
        """The batch's images in one host-to-device copy (None without images)."""
        pix = [s.pixel_values for s in seqs if s.pixel_values is not None]
        if not pix:
            return None
        host = torch.cat(pix).to(self.dtype)
        if self.device.type == "cuda":
            host = host.pin_memory()
        return host.to(self.device, non_blocking=True)

    def _prefill(self, pool: StagedKVPool, seqs: List[_Seq], sample) -> Dict[str, Any]:
        from ..ops import compact_tokens

        B, S, bs = len(seqs), len(self.stages), self.block_size
        t_host = time.perf_counter()
        lay = self._prefill_layout(pool, seqs)
        widths, cu_host, max_lens = lay["widths"], lay["cu_host"], lay["max_lens"]
        dev_parts = self._upload(lay["parts"])
        t_host = time.perf_counter() - t_host
        ids, pos0 = dev_parts[0], dev_parts[1]
        cus = [dev_parts[2 + 2 * k].to(torch.int32) for k in range(S)]
        bts = [dev_parts[3 + 2 * k].view(B, widths[k]) for k in range(S)]
        index = [None] + dev_parts[2 + 2 * S:]
        slots = [_prefill_slots(cus[k], bts[k], cu_host[k][-1], bs) for k in range(S)]
        pix_dev = self._upload_pixels(seqs)
        n_img_tokens = sum(s.num_images for s in seqs) * self.tokens_per_image
        h = embed_with_images(self.model, ids, pix_dev, self.image_token_id, num_image_tokens=n_img_tokens)
        cos, sin = rotary(self.model, h[None], pos0[None])
        cos, sin = cos[0], sin[0]
        timer = _Timer(self.device)
        reindex = [_Timer(self.device) for _ in self.boundaries]
        timer.start()
        stage = 0
        for l in range(self.num_layers):
            if l in self.boundaries:
                stage = self.boundaries[l]
                idx = index[stage]
                reindex[stage - 1].start()
                h = compact_tokens(h, idx, check_index=False)
                cos = compact_tokens(cos, idx, check_index=False)
                sin = compact_tokens(sin, idx, check_index=False)
                reindex[stage - 1].stop()

            def attend(q, k, v, kc, vc, cu=cus[stage], mx=max_lens[stage], cuh=cu_host[stage]):
                return self.attention.varlen_prefill(q, k, v, cu, mx, self.scaling, cu_host=cuh)

            h = self._layer(l, h, cos, sin, pool, slots[stage], attend)
        timer.stop()
        last = (cus[stage][1:] - 1).long()  # the last prompt row of every sequence, on the device
        logits = self.model.lm_head(self.text.norm(h[last]))
        self._pick(seqs, logits, sample)
        return dict(decoder=timer, reindex=reindex, host=t_host)

    # ---- decode --------------------------------------------------------------------------------------
    def _decode_layout(self, pool: StagedKVPool, seqs: List[_Seq]) -> _DecodeBatch:
        """Upload a running batch's decode state (one copy); built when the batch changes."""
        S, B = len(self.stages), len(seqs)
        rids = [s.rid for s in seqs]
        widths = [max(len(pool.tables[r][k]) for r in rids) for k in range(S)]
        lens_host = [[s.stage_lens[k] + len(s.generated) - 1 for s in seqs] for k in range(S)]
        parts: List[Any] = [[s.generated[-1] for s in seqs], [s.n + len(s.generated) - 1 for s in seqs]]  # n + t
        parts += lens_host
        parts += [pool.block_table_rows(rids, k, widths[k]) for k in range(S)]
        if self.cuda_graphs:
            runner = self._runner(B, widths)
            return runner.load(rids, parts, widths, [max(x) for x in lens_host], pool, self)
        dev = self._upload(parts)
        return _DecodeBatch(rids, dev[0], dev[1], [t.to(torch.int32) for t in dev[2:2 + S]],
                            [dev[2 + S + k].view(B, widths[k]).to(torch.int32) for k in range(S)], None, None,
                            [max(x) for x in lens_host], pool)

    def _decode_step(self, pool: StagedKVPool, seqs: List[_Seq], sample) -> None:
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
        toks = self._pick(seqs, logits[: len(seqs)], sample)
        state.tokens[: len(seqs)].copy_(toks)

    def _decode_forward(self, state: _DecodeBatch, full_width: bool) -> torch.Tensor:
        """One decode step's decoder on the device state: logits ``[B, vocab]``. Writes this
        step's K/V; changes no other state (so a CUDA graph can capture it). ``full_width``: the
        gather path reads the whole block table (static shapes) instead of the blocks in use."""
        bs = self.block_size
        h = self.model.get_input_embeddings()(state.tokens)
        cos, sin = rotary(self.model, h[None], state.pos[None])
        cos, sin = cos[0], sin[0]
        paged = self.attention.decode_path == "paged"
        per_stage = []
        for k, (bt, at) in enumerate(zip(state.block_tables, state.lens)):
            # the new token's slot: block at // bs of the request's table, offset at % bs
            blk = bt.gather(1, (at // bs).long()[:, None])[:, 0]
            slots = blk.long() * bs + (at % bs).long()
            if state.valid is not None:
                slots = torch.where(state.valid, slots, -1)  # padded rows write nothing
            seq_lens = at + 1
            if paged:
                per_stage.append((slots, bt, seq_lens, self.attention.decode_cu_seqlens(seq_lens), None))
            else:
                width = bt.shape[1] if full_width else blocks_needed(state.max_lens[k] + 1, bs)
                per_stage.append((slots, bt, seq_lens, None, gather_index(bt, seq_lens, width, bs)))
        for l in range(self.num_layers):
            slots, bt, seq_lens, cu_k, gidx = per_stage[self.stage_of_layer[l]]

            def attend(q, k, v, kc, vc, bt=bt, seq_lens=seq_lens, cu_k=cu_k, gidx=gidx):
                return self.attention.paged_decode(q, kc, vc, bt, seq_lens, self.scaling, cu_seqlens_k=cu_k,
                                                   gather=gidx)

            h = self._layer(l, h, cos, sin, state.pool, slots, attend)
        return self.model.lm_head(self.text.norm(h))

    def _runner(self, B: int, widths: Sequence[int]) -> "_GraphRunner":
        bucket = _bucket(B, self.max_batch_size)
        wb = tuple(_bucket(w, 1 << 30) for w in widths)
        # A runner for a wider table serves narrower ones (extra columns point at block 0, unread).
        for (b, ws), r in self._graphs.items():
            if b == bucket and all(x >= y for x, y in zip(ws, wb)):
                return r
        r = self._graphs[(bucket, wb)] = _GraphRunner(self, bucket, wb)
        return r

    # ---- accounting ----------------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """Bytes of K+V of one token in one layer."""
        return self.spec.kv_bytes_per_token(self.dtype)

    def analytic_kv_tokens(self, requests: Sequence[dict], max_new_tokens: int) -> int:
        """Sum over layers and requests of cached tokens (prompt alive in the layer's stage + new)."""
        total = 0
        for req in requests:
            lens = self.stage_lengths(req["input_ids"].reshape(-1))
            total += sum(lens[self.stage_of_layer[l]] + max_new_tokens for l in range(self.num_layers))
        return total


def _prefill_slots(cu: torch.Tensor, bt: torch.Tensor, num_tokens: int, bs: int) -> torch.Tensor:
    """int64 ``[num_tokens]`` slot of every packed token of a stage, on the device, from the
    stage's ``cu_seqlens`` (int32 ``[B+1]``) and block tables (``[B, width]``)."""
    tok = torch.arange(num_tokens, device=cu.device, dtype=torch.int32)
    seq = torch.searchsorted(cu[1:], tok, right=True)
    off = (tok - cu[seq]).long()
    return bt[seq, off // bs] * bs + off % bs


def _bucket(n: int, cap: int) -> int:
    """The batch-size bucket of ``n``: the next power of two, at most ``cap`` (and at least n)."""
    b = 1
    while b < n:
        b *= 2
    return max(n, min(b, cap))


def _require_cuda_graphs(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device, it is on {device}")


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
        self.pos = torch.zeros(batch, dtype=torch.int64, device=dev)
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
        self.pos[:B].copy_(dev[1])
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
