"""Token selection from logits, on the logits' device (no host round trip per token).

One rule for every generator in adsc_ext (the generation loop of the engine, the ONNX and TensorRT
runners and the FastV baseline; ``adsc generate``): greedy at ``temperature == 0``, else softmax
sampling with optional nucleus (``top_p``) truncation; the image placeholder token can be
suppressed (a generated image token would be read as the start of an image by the next plan).
:func:`check_sampling` is the one check of the two numbers (:class:`~adsc_ext.generation.SamplingParams`
uses it too).
"""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import torch

from .errors import AdscInputError

__all__ = ["pick_tokens", "check_sampling"]


def check_sampling(temperature, top_p) -> Tuple[float, float]:
    """``(temperature, top_p)`` as floats; :class:`~adsc_ext.errors.AdscInputError` unless the
    temperature is a finite number ``>= 0`` and ``top_p`` is in ``(0, 1]``."""
    for name, value in (("temperature", temperature), ("top_p", top_p)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise AdscInputError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(temperature) or temperature < 0:
        raise AdscInputError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:  # NaN fails this too
        raise AdscInputError(f"top_p must be in (0, 1], got {top_p}")
    return float(temperature), float(top_p)


def pick_tokens(logits: torch.Tensor, *, temperature: float = 0.0, top_p: float = 1.0,
                generator: Optional[torch.Generator] = None, suppress_token_id: Optional[int] = None) -> torch.Tensor:
    """``logits [B, V]`` -> token ids ``[B]`` (int64, on the logits' device). ``logits`` is not changed."""
    if logits.dim() != 2:
        raise AdscInputError(f"logits must be [batch, vocab], got shape {tuple(logits.shape)}")
    temperature, top_p = check_sampling(temperature, top_p)
    x = logits.float()
    if suppress_token_id is not None:
        x = x.clone() if x is logits else x
        x[:, suppress_token_id] = -float("inf")
    if temperature == 0:
        return x.argmax(-1)
    probs = torch.softmax(x / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        sp = sp.masked_fill((sp.cumsum(-1) - sp) > top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, si, sp)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
