"""The spec oracle's decoder loop, shared by the per-architecture HF tests (test_hf_llava.py,
test_llava_next_hf.py, test_qwen_vl.py).

Independent of adsc_ext's planning: which tokens are alive at each stage comes from
``adsc_ext.reference.kept_image_indices`` (the spec's rule, in plain Python) per image grid, and every
decoder layer is run by hand on exactly those tokens, with their original positions and an explicit
causal mask. Each test finds its own images' spans and embeddings (the architecture-specific part).
"""

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from adsc_ext.reference import kept_image_indices
from adsc_ext.schedule import Schedule

#: one image grid in a sequence: (first token, (rows, cols), 1 if each row ends with a newline token)
Unit = Tuple[int, Tuple[int, int], int]


def alive_per_stage(n: int, units: Sequence[Unit], schedule) -> List[List[int]]:
    """The original positions alive in each stage (``len(schedule) + 1`` lists) of a sequence of
    ``n`` tokens whose image grids are ``units``."""
    schedule = Schedule.coerce(schedule)
    alive = []
    for s in range(len(schedule) + 1):
        drop = set()
        for start, (gh, gw), nl in units:
            kept = kept_image_indices((gh, gw), schedule, newline=nl)
            drop |= {start + r for r in range(gh * (gw + nl))} - {start + r for r in kept[s]}
        alive.append([q for q in range(n) if q not in drop])
    return alive


def run_decoder(text, lm_head, h: torch.Tensor, units: Sequence[Unit], schedule, *,
                rope_positions: Optional[Callable[[List[int]], torch.Tensor]] = None,
                after_layer: Optional[Callable[[int, torch.Tensor, List[int]], torch.Tensor]] = None):
    """Run ``text``'s decoder layers by hand on the embeddings ``h`` [1, n, D] of one unpadded
    sequence, dropping at each boundary the tokens the schedule drops.

    ``rope_positions(positions)``: the position ids the rotary embedding takes for the alive original
    positions (default ``[positions]``; M-RoPE passes its ``[3, 1, len]`` slice); the layer itself gets
    ``[positions]``. ``after_layer(l, h, positions)`` may change the hidden states after layer ``l``
    (Qwen3-VL's DeepStack). Returns the last stage's logits ``[n_kept, V]`` and the kept positions."""
    schedule = Schedule.coerce(schedule)
    alive = alive_per_stage(h.shape[1], units, schedule)
    bounds = {layer: i + 1 for i, layer in enumerate(schedule.layers)}
    positions = list(range(h.shape[1]))
    for l, layer in enumerate(text.layers):
        if l in bounds:
            new = alive[bounds[l]]
            h = h[:, [positions.index(q) for q in new]]
            positions = new
        pos = torch.tensor([positions])
        cos_sin = text.rotary_emb(h, pos if rope_positions is None else rope_positions(positions))
        L = len(positions)
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        mask = torch.zeros(1, 1, L, L, dtype=h.dtype).masked_fill(~causal, torch.finfo(h.dtype).min)
        out = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=cos_sin)
        h = out[0] if isinstance(out, tuple) else out
        if after_layer is not None:
            h = after_layer(l, h, positions)
    return lm_head(text.norm(h))[0], positions
