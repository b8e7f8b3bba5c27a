"""The ADSC runtime: batched serving with packed prefill and a staged paged KV cache.

- :class:`Engine`: ``Engine(model, schedule=...).generate(requests, max_new_tokens=...)``;
- :class:`Attention` / :func:`select_backend`: varlen prefill and paged decode attention
  (``flash_attn``, ``torch_varlen`` or ``sdpa``);
- :class:`StagedKVPool`: one paged KV pool per ADSC stage.
"""

from .attention import BACKENDS, Attention, available_backends, select_backend
from .engine import Engine, EngineInputError
from .kv_pool import BlockAllocator, KVCapacityError, StagedKVPool, StagePool

__all__ = [
    "Engine", "EngineInputError", "KVCapacityError", "Attention", "BACKENDS", "available_backends",
    "select_backend", "StagedKVPool", "StagePool", "BlockAllocator",
]
