"""Token selection from logits, on the logits' device (no host round trip per token).

One rule for every generator in adsc_ext (the engine, the FastV baseline, the CLI, the ONNX
runner): greedy at ``temperature <= 0``, else softmax sampling with optional nucleus (``top_p``)
truncation; the image placeholder token can be suppressed (a generated image token would be read
as the start of an image by the next plan).
"""

from __future__ import annotations

from typing import Optional

import torch

__all__ = ["pick_tokens"]


def pick_tokens(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None, suppress_token_id: Optional[int] = None) -> torch.Tensor:
    """``logits [B, V]`` -> token ids ``[B]`` (int64, on the logits' device). ``logits`` is not changed."""
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    x = logits.float()
    if suppress_token_id is not None:
        x = x.clone() if x is logits else x
        x[:, suppress_token_id] = -float("inf")
    if not temperature or temperature <= 0:
        return x.argmax(-1)
    probs = torch.softmax(x / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        sp = sp.masked_fill((sp.cumsum(-1) - sp) > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
