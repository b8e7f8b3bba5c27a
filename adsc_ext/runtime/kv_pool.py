"""Staged paged KV cache: one paged pool per ADSC stage.

The decoder layers of a stage share one token layout, so they share one block allocator and one
block table per request; each layer of the stage has its own K and V tensors of shape
``[num_blocks, block_size, num_kv_heads, head_dim]`` (FlashAttention's paged layout). Every pool
is sized for its own stage's token counts, so a later (compressed) stage really holds fewer bytes.

Allocation is all-or-nothing: :meth:`StagedKVPool.allocate` either reserves the blocks of every
stage for a request or raises :class:`KVCapacityError` and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch

from ..errors import AdscInputError, KVCapacityError
from ..layout import kv_slots

__all__ = ["KVCapacityError", "BlockAllocator", "StagePool", "StagedKVPool", "blocks_needed"]


def blocks_needed(tokens: int, block_size: int) -> int:
    return -(-int(tokens) // int(block_size))


class BlockAllocator:
    """A free list of block ids ``0 .. num_blocks-1``."""

    def __init__(self, num_blocks: int):
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        self.num_blocks = int(num_blocks)
        self._free: List[int] = list(range(self.num_blocks - 1, -1, -1))  # pop() gives 0, 1, ...
        self._used = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self, n: int) -> List[int]:
        if n > len(self._free):
            raise KVCapacityError(f"need {n} blocks, {len(self._free)} free of {self.num_blocks}")
        out = [self._free.pop() for _ in range(n)]
        self._used.update(out)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise ValueError(f"block {b} is not allocated (double free?)")
        for b in reversed(list(blocks)):
            self._used.discard(b)
            self._free.append(b)


@dataclass
class StagePool:
    """The paged K/V tensors of one stage (one pair per layer of the stage) and its allocator."""

    stage: int
    layers: List[int]
    block_size: int
    allocator: BlockAllocator
    k: Dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> [blocks, bs, kvh, d]
    v: Dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    def bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))

    def bytes_per_block(self) -> int:
        if not self.layers or self.num_blocks == 0:
            return 0
        return self.bytes() // self.num_blocks


class StagedKVPool:
    """One :class:`StagePool` per stage; per-request block tables per stage.

    Args:
        stage_layers: for every stage, the decoder layers that run on it.
        num_blocks: blocks of every stage's pool (one int per stage).
        block_size, num_kv_heads, head_dim, dtype, device: the paged layout.
    """

    def __init__(self, stage_layers: Sequence[Sequence[int]], num_blocks: Sequence[int], *, block_size: int,
                 num_kv_heads: int, head_dim: int, dtype=torch.float32, device="cpu"):
        if block_size < 1:
            raise AdscInputError(f"block_size must be >= 1, got {block_size}")
        if len(num_blocks) != len(stage_layers):
            raise ValueError(f"num_blocks needs one entry per stage ({len(stage_layers)}), got {list(num_blocks)}")
        self.block_size = int(block_size)
        self.pools: List[StagePool] = []
        for s, (layers, nb) in enumerate(zip(stage_layers, num_blocks)):
            pool = StagePool(s, list(layers), self.block_size, BlockAllocator(int(nb)))
            shape = (int(nb), self.block_size, num_kv_heads, head_dim)
            for l in layers:
                pool.k[l] = torch.zeros(shape, dtype=dtype, device=device)
                pool.v[l] = torch.zeros(shape, dtype=dtype, device=device)
            self.pools.append(pool)
        self.tables: Dict[object, List[List[int]]] = {}  # request id -> per stage block ids
        self._peak_used = 0

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def num_stages(self) -> int:
        return len(self.pools)

    def capacity_tokens(self) -> List[int]:
        return [p.num_blocks * self.block_size for p in self.pools]

    def num_free_blocks(self) -> List[int]:
        return [p.allocator.num_free for p in self.pools]

    def total_bytes(self) -> int:
        """Bytes held by all pools (what the cache costs in memory)."""
        return sum(p.bytes() for p in self.pools)

    def used_bytes(self) -> int:
        return sum(p.allocator.num_used * p.bytes_per_block() for p in self.pools)

    @property
    def peak_used_bytes(self) -> int:
        return self._peak_used

    # ---- requests ------------------------------------------------------------------------------
    def blocks_for(self, stage_tokens: Sequence[int]) -> List[int]:
        return [blocks_needed(t, self.block_size) for t in stage_tokens]

    def fits_ever(self, stage_tokens: Sequence[int]) -> bool:
        return all(n <= p.num_blocks for n, p in zip(self.blocks_for(stage_tokens), self.pools))

    def can_allocate(self, stage_tokens: Sequence[int]) -> bool:
        return all(n <= p.allocator.num_free for n, p in zip(self.blocks_for(stage_tokens), self.pools))

    def allocate(self, rid, stage_tokens: Sequence[int]) -> List[List[int]]:
        """Reserve room for ``stage_tokens[s]`` tokens in every stage; all or nothing."""
        if rid in self.tables:
            raise ValueError(f"request {rid!r} already holds blocks")
        if len(stage_tokens) != self.num_stages:
            raise ValueError(f"need a token count per stage ({self.num_stages}), got {list(stage_tokens)}")
        need = self.blocks_for(stage_tokens)
        for s, (n, p) in enumerate(zip(need, self.pools)):
            if n > p.allocator.num_free:
                raise KVCapacityError(
                    f"request {rid!r} needs {stage_tokens[s]} tokens ({n} blocks of {self.block_size}) in "
                    f"stage {s}'s KV pool, which has {p.allocator.num_free} free of {p.num_blocks} blocks"
                )
        tables = [p.allocator.allocate(n) for n, p in zip(need, self.pools)]
        self.tables[rid] = tables
        self._peak_used = max(self._peak_used, self.used_bytes())
        return tables

    def free(self, rid) -> None:
        tables = self.tables.pop(rid)
        for p, blocks in zip(self.pools, tables):
            p.allocator.free(blocks)

    def slots(self, rid, stage: int, start: int, count: int) -> List[int]:
        """Slot ids (``block * block_size + offset``) of tokens ``start .. start+count-1``."""
        table, bs = self.tables[rid][stage], self.block_size
        if start + count > len(table) * bs:
            raise KVCapacityError(
                f"request {rid!r}: token {start + count - 1} is past its {len(table) * bs} reserved slots in stage {stage}"
            )
        pos = torch.arange(start, start + count)
        return kv_slots(torch.tensor([table]), torch.zeros_like(pos), pos, bs).tolist()

    def block_table_rows(self, rids: Sequence, stage: int, width: int) -> List[int]:
        """The block tables of ``stage`` for ``rids`` as one flat host list, row by row, each row
        padded with block 0 to ``width`` (the caller uploads it with the batch's other integers)."""
        out: List[int] = []
        for r in rids:
            t = self.tables[r][stage]
            if len(t) > width:
                raise ValueError(f"request {r!r} holds {len(t)} blocks in stage {stage}, more than width {width}")
            out += t
            out += [0] * (width - len(t))
        return out
