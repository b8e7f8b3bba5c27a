"""Training through FastV's pruning: the ``forward`` that :func:`adsc_ext.train.train` takes for the
self-compression study's ``fastv_tuned`` arm (FastV fine-tuned at the same token budget as ADSC).

An adapter only: the pruning, its scores and its loss are :meth:`adsc_ext.baselines.FastV.forward`,
the code path of FastV's inference (see :mod:`adsc_ext.baselines.fastv`).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch

from ..baselines.fastv import FastV
from ..models.base import unwrap

__all__ = ["fastv_forward"]


def fastv_forward(layer: int, keep: int) -> Callable[[torch.nn.Module, dict, torch.Tensor], torch.Tensor]:
    """``forward(model, batch, num_items)`` for :func:`adsc_ext.train.train`: spec 6.4's loss through
    FastV's pruning after ``layer`` (``keep`` image tokens per image), the summed cross-entropy of
    the batch's label tokens over ``num_items``. Each row's query token is the one before its first
    label (its last prompt token), as at inference.

    FastV calls the decoder's layers one by one, so the model must not be wrapped for distributed
    training (DDP would not see the forward): it trains in one process."""
    fastvs: Dict[int, FastV] = {}

    def forward(model, batch, num_items):
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            raise RuntimeError("training through FastV's pruning runs in one process (it calls the decoder layers "
                               "one by one, which a DistributedDataParallel wrapper would not see)")
        base = unwrap(model)
        fv = fastvs.get(id(base))
        if fv is None:
            fv = fastvs[id(base)] = FastV(base, layer=layer, keep=keep)
        return fv.forward(batch["input_ids"], batch["attention_mask"], batch.get("pixel_values"),
                          labels=batch["labels"], num_items=num_items).loss

    return forward
