"""Where the Hugging Face integration gets the ADSC ops from."""

from __future__ import annotations

from typing import Callable, Tuple


def kernels() -> Tuple[Callable, Callable]:
    """``(stage_plan, compact_tokens)``: the compiled ops of :mod:`adsc_ext.ops`."""
    from adsc_ext.ops import compact_tokens, stage_plan

    return stage_plan, compact_tokens
