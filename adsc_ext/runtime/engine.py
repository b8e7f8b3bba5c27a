"""The ADSC serving engine: packed prefill, staged paged KV cache, batched decode.

``Engine(model, schedule=...)`` takes a ``transformers.LlavaForConditionalGeneration`` and runs its
vision tower, projector and decoder layers itself (reusing the model's modules and weights):

- **prefill** runs on a packed batch (no padding): the batch is planned once with
  :func:`adsc_ext.stage_plan` (one host-device synchronisation per batch); at every stage boundary
  the hidden states and the rotary cos/sin are re-indexed with :func:`adsc_ext.compact_tokens`,
  and the stage's ``cu_seqlens`` / max length / slot mappings come from the plan and from the
  host-side block tables (nothing is read back per layer). Attention is varlen (see
  :mod:`adsc_ext.runtime.attention`).
- **KV cache**: one paged pool per stage (:class:`~adsc_ext.runtime.kv_pool.StagedKVPool`); K/V
  are written with :func:`adsc_ext.write_paged_kv` at each stage's slot mapping; decode attention
  reads the pool through block tables. RoPE uses the original positions; generated token ``t`` of a
  request whose prompt had ``n`` tokens gets position ``n + t`` (spec section 5).
- **continuous batching**: requests wait in a queue; between decode steps, waiting requests are
  admitted (prefilled together) as soon as batch slots (``max_batch_size``) and KV blocks allow.
  A request reserves its blocks for prompt + ``max_new_tokens`` at admission (no preemption) and
  frees them when it finishes.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .attention import Attention
from .kv_pool import KVCapacityError, StagedKVPool, blocks_needed

__all__ = ["Engine", "EngineInputError", "KVCapacityError"]


class EngineInputError(ValueError):
    """A request the engine cannot run (bad ids, images that do not match the model...)."""


@dataclass
class _Seq:
    rid: int
    ids: torch.Tensor
    pixel_values: Optional[torch.Tensor]
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
    rids: List[int]
    block_tables: List[torch.Tensor]  # per stage, int32 [B, max_blocks]
    lens: List[torch.Tensor]  # per stage, int32 [B]: tokens cached before this step's token
    pos: torch.Tensor  # int64 [B]: position of this step's token
    pool: StagedKVPool


class Engine:
    """Batched ADSC generation for a Hugging Face LLaVA model.

    Args:
        model: a ``transformers.LlavaForConditionalGeneration`` (LLaMA-family text model), in eval
            mode; ``apply_adsc`` need not have been called.
        schedule: schedule string / :class:`~adsc_ext.Schedule`; None: ``config.adsc_schedule`` or
            the LLaVA-1.5 default. ``""`` runs the unmodified model.
        backend: attention backend, ``"flash_attn" | "torch_varlen" | "sdpa"``, or None / "auto".
        block_size: tokens per KV block.
        num_blocks: blocks of every stage's pool (an int for all stages or one per stage) for a
            persistent cache; None sizes fresh pools for each ``generate`` call to exactly the
            blocks its requests need in every stage.
        max_batch_size: most requests decoded together (others wait and join between steps).
    """

    def __init__(self, model, schedule=None, *, backend: Optional[str] = None, block_size: int = 16,
                 num_blocks: Union[None, int, Sequence[int]] = None, max_batch_size: int = 256):
        from ..hf.llava import _check_llava, _unwrap, resolve_schedule

        model = _unwrap(model)
        grid, image_token_id, num_layers, _ = _check_llava(model)
        self.schedule, self.stages = resolve_schedule(model.config, schedule, num_layers, grid)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.text = model.model.language_model
        self.grid = grid
        self.image_token_id = image_token_id
        self.num_layers = num_layers
        self.tokens_per_image = grid[0] * grid[1]
        self.stage_of_layer = [self.schedule.stage_of_layer(l) for l in range(num_layers)]
        self.boundaries = {st.first_layer: st.index for st in self.stages[1:]}
        self.block_size = int(block_size)
        self.max_batch_size = int(max_batch_size)
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.attention = Attention(backend, self.device, block_size=self.block_size)
        attn0 = self.text.layers[0].self_attn
        self.head_dim = attn0.head_dim
        tcfg = self.text.config
        self.num_heads = tcfg.num_attention_heads
        self.num_kv_heads = getattr(tcfg, "num_key_value_heads", None) or self.num_heads
        self.scaling = attn0.scaling
        self._rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        vcfg = model.config.vision_config
        self.image_size = int(vcfg.image_size)
        self.max_positions = int(getattr(tcfg, "max_position_embeddings", 1 << 30))
        if num_blocks is None:
            self._fixed_blocks = None
            self.pool: Optional[StagedKVPool] = None
        else:
            nb = [int(num_blocks)] * len(self.stages) if isinstance(num_blocks, int) else [int(b) for b in num_blocks]
            if len(nb) != len(self.stages):
                raise ValueError(f"num_blocks needs one entry per stage ({len(self.stages)}), got {nb}")
            self._fixed_blocks = nb
            self.pool = self._new_pool(nb)
        self.stats: Dict[str, Any] = {}
        self._dstate: Optional[_DecodeBatch] = None  # decode layout of the running batch

    @property
    def backend(self) -> str:
        return self.attention.name

    def _new_pool(self, num_blocks: Sequence[int]) -> StagedKVPool:
        layers = [list(range(st.first_layer, st.end_layer)) for st in self.stages]
        return StagedKVPool(layers, num_blocks, block_size=self.block_size, num_kv_heads=self.num_kv_heads,
                            head_dim=self.head_dim, dtype=self.dtype, device=self.device)

    # ---- requests --------------------------------------------------------------------------------
    def stage_lengths(self, input_ids: torch.Tensor) -> List[int]:
        """Prompt tokens alive in every stage for one request's ``input_ids``."""
        n = int(input_ids.numel())
        n_img_tok = int((input_ids == self.image_token_id).sum())
        k = n_img_tok // self.tokens_per_image
        return [n - n_img_tok + k * st.tokens_per_image for st in self.stages]

    def _check_request(self, i: int, req, max_new_tokens: int) -> _Seq:
        def bad(msg):
            return EngineInputError(f"request {i}: {msg}")

        if not isinstance(req, dict) or "input_ids" not in req:
            raise bad("must be a dict with 'input_ids' (1-D LongTensor) and optional 'pixel_values'")
        ids = req["input_ids"]
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise bad("input_ids must be an integer tensor")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise bad(f"input_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
        ids = ids.long()
        vocab = self.text.config.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise bad(f"token ids must be in [0, {vocab}), got values in [{lo}, {hi}]")
        pix = req.get("pixel_values")
        n_img = 0
        if pix is not None:
            if not isinstance(pix, torch.Tensor) or pix.dim() != 4 or pix.shape[1] != 3:
                raise bad(f"pixel_values must be a [k, 3, H, W] tensor, got "
                          f"{tuple(pix.shape) if isinstance(pix, torch.Tensor) else type(pix).__name__}")
            if tuple(pix.shape[2:]) != (self.image_size, self.image_size):
                raise bad(f"images must be {self.image_size}x{self.image_size} for this model's vision tower, "
                          f"got {pix.shape[2]}x{pix.shape[3]}")
            n_img = pix.shape[0]
            if n_img == 0:
                pix = None
        from ..hf.llava import _image_runs

        hw = self.tokens_per_image
        runs = _image_runs(ids.tolist(), self.image_token_id)
        for p, q in runs:
            if (q - p) % hw:
                raise bad(f"image tokens must form whole images of {self.grid[0]}x{self.grid[1]} = {hw} "
                          f"tokens; got a run of {q - p} at position {p}")
        n_tok_img = sum(q - p for p, q in runs) // hw
        if n_tok_img != n_img:
            raise bad(f"input_ids hold {n_tok_img} image(s) ({n_tok_img * hw} image tokens) but "
                      f"pixel_values has {n_img} image(s)")
        max_new = int(req.get("max_new_tokens", max_new_tokens))
        if max_new < 1:
            raise bad(f"max_new_tokens must be >= 1, got {max_new}")
        if ids.numel() + max_new > self.max_positions:
            raise bad(f"prompt ({ids.numel()}) + max_new_tokens ({max_new}) exceeds the model's "
                      f"{self.max_positions} positions")
        seq = _Seq(i, ids.to(self.device), None if pix is None else pix.to(self.device, self.dtype), n_img,
                   self.stage_lengths(ids), max_new)
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
                 progress=None) -> List[Any]:
        """Generate for every request; returns one list of token ids per request (in order).

        Each request: ``{"input_ids": LongTensor [n], "pixel_values": [k, 3, H, W] or None,
        "max_new_tokens": optional int}``. Greedy unless ``temperature > 0`` (then top-p sampling).
        A request stops after its ``max_new_tokens`` or at ``eos_token_id`` (included).
        Bad requests raise :class:`EngineInputError` / :class:`KVCapacityError` before any work, or,
        with ``return_exceptions=True``, get the exception as their result while the others run.
        ``return_logits=True`` makes each result ``(tokens, logits)``, logits a float32 CPU tensor
        ``[len(tokens), vocab]`` of the raw scores each token was picked from.
        The cache is left as it was (every block taken by this call is freed), also on errors.
        """
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
        sample = dict(temperature=temperature, top_p=top_p, suppress=suppress_image_token, generator=generator)
        stats = dict(prefill_seconds=0.0, decode_seconds=0.0, decode_steps=0, decode_tokens=0, prefills=0,
                     admitted_per_prefill=[], backend=self.backend, pool_bytes=pool.total_bytes())
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
                    self._prefill(pool, admitted, sample)
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
            stats["peak_kv_bytes"] = pool.peak_used_bytes
            stats["decode_path"] = self.attention.decode_path
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

    def _append(self, seqs: List[_Seq], logits: torch.Tensor, sample) -> None:
        for i, s in enumerate(seqs):
            if s.logits is not None:  # before _pick, which masks the image token in place
                s.logits.append(logits[i].detach().clone())
        for s, t in zip(seqs, self._pick(logits, sample)):
            s.generated.append(t)

    def _pick(self, logits: torch.Tensor, sample) -> List[int]:
        logits = logits.float()
        if sample["suppress"]:
            logits[:, self.image_token_id] = -float("inf")
        t = sample["temperature"]
        if not t or t <= 0:
            return logits.argmax(-1).tolist()
        probs = torch.softmax(logits / t, -1)
        top_p = sample["top_p"]
        if top_p < 1.0:
            sp, si = probs.sort(-1, descending=True)
            cut = (sp.cumsum(-1) - sp) > top_p
            sp = sp.masked_fill(cut, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, si, sp)
        return torch.multinomial(probs, 1, generator=sample["generator"])[:, 0].tolist()

    # ---- the layers --------------------------------------------------------------------------------
    def _layer(self, l: int, h: torch.Tensor, cos, sin, pool: StagedKVPool, slots, attend):
        layer = self.text.layers[l]
        attn = layer.self_attn
        x = layer.input_layernorm(h)
        T = x.shape[0]
        q = attn.q_proj(x).view(T, -1, self.head_dim)
        k = attn.k_proj(x).view(T, -1, self.head_dim)
        v = attn.v_proj(x).view(T, -1, self.head_dim).contiguous()
        q, k = self._rope(q, k, cos, sin, unsqueeze_dim=1)
        k = k.contiguous()
        sp = pool.pools[self.stage_of_layer[l]]
        from ..ops import write_paged_kv

        write_paged_kv(k, v, sp.k[l], sp.v[l], slots, check_slots=False)
        o = attend(q, k, v, sp.k[l], sp.v[l])
        h = h + attn.o_proj(o.reshape(T, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def _prefill(self, pool: StagedKVPool, seqs: List[_Seq], sample) -> None:
        from ..hf.llava import embed_with_images
        from ..ops import compact_tokens, stage_plan

        dev = self.device
        ids = torch.cat([s.ids for s in seqs])
        lens = [s.n for s in seqs]
        cu0 = [0]
        for n in lens:
            cu0.append(cu0[-1] + n)
        cu = torch.tensor(cu0, dtype=torch.int32, device=dev)
        pix = [s.pixel_values for s in seqs if s.pixel_values is not None]
        h = embed_with_images(self.model, ids, torch.cat(pix) if pix else None, self.image_token_id)
        plan = stage_plan(self.schedule, input_ids=ids, cu_seqlens=cu, image_token_id=self.image_token_id,
                          grid=self.grid)  # one host-device synchronisation per batch
        # Host-side per-stage layout (from the request shapes; equals the plan's seq_lens).
        per_stage = []
        for s_i in range(len(self.stages)):
            slens = [s.stage_lens[s_i] for s in seqs]
            cuh = [0]
            for n in slens:
                cuh.append(cuh[-1] + n)
            slots = []
            for s, n in zip(seqs, slens):
                slots += pool.slots(s.rid, s_i, 0, n)
            per_stage.append((cuh, max(slens), torch.tensor(slots, dtype=torch.int64, device=dev)))
        st0 = plan.stages[0]
        cos, sin = self.text.rotary_emb(h[None], st0.position_ids[None])
        cos, sin = cos[0], sin[0]
        stage = 0
        for l in range(self.num_layers):
            if l in self.boundaries:
                stage = self.boundaries[l]
                idx = plan.stages[stage].index
                h = compact_tokens(h, idx, check_index=False)
                cos = compact_tokens(cos, idx, check_index=False)
                sin = compact_tokens(sin, idx, check_index=False)
            cuh, mx, slots = per_stage[stage]
            cu_s = plan.stages[stage].cu_seqlens

            def attend(q, k, v, kc, vc, cu_s=cu_s, mx=mx, cuh=cuh):
                return self.attention.varlen_prefill(q, k, v, cu_s, mx, self.scaling, cu_host=cuh)

            h = self._layer(l, h, cos, sin, pool, slots, attend)
        last = torch.tensor(per_stage[stage][0][1:], device=dev) - 1
        logits = self.model.lm_head(self.text.norm(h[last]))
        self._append(seqs, logits, sample)

    def _decode_layout(self, pool: StagedKVPool, seqs: List[_Seq]) -> "_DecodeBatch":
        """Device-side decode state of a running batch: per stage, the block tables and the cached
        token counts. Built when the batch changes; each step then only adds 1 on the device."""
        dev = self.device
        rids = [s.rid for s in seqs]
        bts = [pool.block_table_tensor(rids, k, dev) for k in range(len(self.stages))]
        lens = [torch.tensor([s.stage_lens[k] + len(s.generated) - 1 for s in seqs], dtype=torch.int32, device=dev)
                for k in range(len(self.stages))]
        pos = torch.tensor([s.n + len(s.generated) - 1 for s in seqs], device=dev)  # n + t
        return _DecodeBatch(rids, bts, lens, pos, pool)

    def _decode_step(self, pool: StagedKVPool, seqs: List[_Seq], sample) -> None:
        dev = self.device
        state = self._dstate
        if state is None or state.pool is not pool or state.rids != [s.rid for s in seqs]:
            state = self._dstate = self._decode_layout(pool, seqs)
        toks = torch.tensor([s.generated[-1] for s in seqs], device=dev)
        h = self.model.get_input_embeddings()(toks)
        cos, sin = self.text.rotary_emb(h[None], state.pos[None])
        cos, sin = cos[0], sin[0]
        bs = self.block_size
        per_stage = []
        for bt, at in zip(state.block_tables, state.lens):
            # the new token's slot: block at / bs of the request's table, offset at % bs
            blk = bt.gather(1, (at // bs).long()[:, None])[:, 0]
            slots = blk.long() * bs + (at % bs).long()
            seq_lens = at + 1
            cu_k = (F.pad(seq_lens.cumsum(0, dtype=torch.int32), (1, 0))
                    if self.attention.decode_path == "paged" else None)  # only the paged varlen call reads it
            per_stage.append((slots, bt, seq_lens, cu_k))
        for l in range(self.num_layers):
            slots, bt, seq_lens, cu_k = per_stage[self.stage_of_layer[l]]

            def attend(q, k, v, kc, vc, bt=bt, seq_lens=seq_lens, cu_k=cu_k):
                return self.attention.paged_decode(q, kc, vc, bt, seq_lens, self.scaling, cu_seqlens_k=cu_k)

            h = self._layer(l, h, cos, sin, pool, slots, attend)
        for at in state.lens:
            at.add_(1)
        state.pos.add_(1)
        logits = self.model.lm_head(self.text.norm(h))
        self._append(seqs, logits, sample)

    # ---- accounting ----------------------------------------------------------------------------------
    def kv_bytes_per_token(self) -> int:
        """Bytes of K+V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()

    def analytic_kv_tokens(self, requests: Sequence[dict], max_new_tokens: int) -> int:
        """Sum over layers and requests of cached tokens (prompt alive in the layer's stage + new)."""
        total = 0
        for req in requests:
            lens = self.stage_lengths(req["input_ids"].reshape(-1))
            total += sum(lens[self.stage_of_layer[l]] + max_new_tokens for l in range(self.num_layers))
        return total
