"""Typed Python entry points of the compiled ops (``torch.ops.adsc.*``), their fake kernels for
``torch.compile`` and their autograd.

- :func:`stage_plan` re-indexes a batch for every stage of a schedule in one call.
- :func:`compact_tokens` gathers token rows by a stage index (differentiable).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _C  # loads the library that registers torch.ops.adsc (and holds the core's limits)
from .plan import Plan, StagePlan, normalize_plan_inputs
from .schedule import Schedule

__all__ = ["stage_plan", "compact_tokens", "write_paged_kv", "cuda_ops_available"]

# The summary layout of adsc/plan.h and the plan's token limit, read from the compiled core: a
# header of PLAN_SUMMARY_HEADER int32s, then (tokens, longest sequence) per stage.
_SUMMARY_HEADER: int = _C.PLAN_SUMMARY_HEADER
_MAX_TOKENS: int = _C.PLAN_MAX_TOKENS


def _summary_size(num_steps: int) -> int:
    return _SUMMARY_HEADER + 2 * (num_steps + 1)


def cuda_ops_available() -> bool:
    """Whether this build registered CUDA implementations (needs a CUDA torch and nvcc)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("adsc::compact_tokens", "CUDA")


def stage_plan(
    schedule,
    *,
    input_ids: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    attention_mask: Optional[torch.Tensor] = None,
    image_spans: Optional[torch.Tensor] = None,
    image_token_id: Optional[int] = None,
    grid: Sequence[int] = (24, 24),
    padding_side: str = "left",
) -> Plan:
    """Plan every stage of ``schedule`` for one batch.

    Layout: ``cu_seqlens [B+1]`` with ``input_ids [T]`` (packed), or ``attention_mask [B, S]`` with
    ``input_ids [B, S]`` (padded). Images, from exactly one of:

    - runs of ``image_token_id`` (an int) in ``input_ids``, each run a whole number of ``grid``
      images;
    - ``image_spans``, int64 (or int32), sorted by (sequence, start), not overlapping, each image
      with its own grid: ``[N, 4]`` rows of ``(sequence, start, h, w)``, an ``h x w`` grid at
      positions ``start .. start + h*w - 1`` of its sequence (positions count real tokens only, so
      padding is skipped), or ``[N, 5]`` rows of ``(sequence, start, h, w, newline)`` where
      ``newline = 1`` marks a LLaVA-NeXT / OneVision grid whose rows each end with one newline token
      (``h * (w + 1)`` positions; the newline is kept exactly while its row is, spec section 3) and
      ``newline = 0`` a plain one. Give the layout with ``cu_seqlens`` or ``attention_mask``.

    On CUDA this is one kernel launch and one host-device synchronisation (to learn the stage
    sizes), whatever the number of stages.
    """
    schedule = Schedule.coerce(schedule)
    inp = normalize_plan_inputs(
        input_ids=input_ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
        image_spans=image_spans, image_token_id=image_token_id, grid=grid,
        padding_side=padding_side,
    )
    if inp.device.type == "meta":
        raise ValueError(
            "stage_plan cannot run on meta tensors: the stage sizes depend on the token ids, which "
            "meta tensors do not hold (give CPU or CUDA tensors)"
        )
    if inp.num_tokens > _MAX_TOKENS:
        shape = f" ({inp.batch_size} x {inp.num_tokens // max(inp.batch_size, 1)})" if inp.layout == "padded" else ""
        raise ValueError(
            f"too many tokens: a plan takes at most {_MAX_TOKENS} tokens (its indices are int32), "
            f"got {inp.num_tokens}{shape}"
        )
    ids = None if inp.image_spans is not None else inp.input_ids
    token_id = inp.image_token_id
    gh, gw = (int(v) for v in grid)
    factors = list(schedule.factors)
    if inp.layout == "packed":
        index, source, pos, cu, summary = torch.ops.adsc.stage_plan_packed(
            ids, inp.cu_seqlens, inp.image_spans, inp.num_tokens, token_id, gh, gw, factors
        )
    else:
        index, source, pos, cu, summary = torch.ops.adsc.stage_plan_padded(
            ids, inp.attention_mask, inp.image_spans, token_id, gh, gw, factors,
            padding_side == "left",
        )
    sizes = summary.tolist()
    seq_lens = cu[:, 1:] - cu[:, :-1]
    B = inp.batch_size
    layers = (0,) + schedule.layers
    stages = []
    for s in range(len(factors) + 1):
        tokens, longest = sizes[_SUMMARY_HEADER + 2 * s], sizes[_SUMMARY_HEADER + 2 * s + 1]
        if inp.layout == "packed":
            shape = (tokens,)
        else:
            shape = (B, inp.attention_mask.shape[1] if s == 0 else longest)
        used = shape[0] * (shape[1] if len(shape) == 2 else 1)
        stages.append(
            StagePlan(
                stage=s,
                first_layer=layers[s],
                index=index[s, :used].view(shape),
                source_index=source[s, :used].view(shape),
                position_ids=pos[s, :used].view(shape),
                cu_seqlens=cu[s],
                seq_lens=seq_lens[s],
                max_seqlen=longest,
                num_tokens=tokens,
            )
        )
    return Plan(schedule=schedule, layout=inp.layout, batch_size=B, stages=stages)


def compact_tokens(
    x: torch.Tensor,
    index: torch.Tensor,
    out: Optional[torch.Tensor] = None,
    *,
    check_index: bool = True,
) -> torch.Tensor:
    """Gather token rows: ``out[i] = x_tokens[index[i]]``, zero where ``index[i] == -1``.

    The leading ``index.dim()`` dims of ``x`` are its token dims, taken as one flat row axis (so a
    padded ``[B, S, D]`` tensor is compacted by a ``[B, S']`` plan index into ``[B, S', D]``). The
    result has shape ``index.shape + x.shape[index.dim():]``; pass ``out`` to write into a
    caller-owned buffer (no allocation). Differentiable in ``x``. ``check_index`` validates the
    index range; on CUDA that costs a synchronisation, so pass False for indices from a plan.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(index, torch.Tensor):
        raise TypeError("compact_tokens takes tensors x and index")
    k = index.dim()
    if k == 0:
        raise ValueError("index must have at least one dim (the token rows to gather)")
    if x.dim() < k:
        raise ValueError(
            f"x has {x.dim()} dims but index has {k} token dims: x must be index-shaped token dims "
            f"followed by feature dims, got x {tuple(x.shape)} and index {tuple(index.shape)}"
        )
    if k > 1 and x.shape[: k - 1] != index.shape[: k - 1]:
        raise ValueError(
            f"x {tuple(x.shape)} and index {tuple(index.shape)} must agree on the leading dims "
            f"{tuple(index.shape[: k - 1])} (for a padded layout: the batch)"
        )
    tail = tuple(x.shape[k:])
    rows = x.reshape(math.prod(x.shape[:k]), *tail) if k > 1 else x
    flat_index = index.reshape(-1)
    if out is None:
        return torch.ops.adsc.compact_tokens(rows, flat_index, check_index).view(*index.shape, *tail)
    want = (*index.shape, *tail)
    if tuple(out.shape) != want:
        raise ValueError(f"out must have shape {want} (index.shape + x.shape[{k}:]), got {tuple(out.shape)}")
    if out.device != x.device:
        raise ValueError(f"out must be on {x.device} like x, got {out.device}")
    if torch.is_grad_enabled() and (x.requires_grad or out.requires_grad):
        what = "x requires grad" if x.requires_grad else "out requires grad (it is tracked by autograd)"
        raise RuntimeError(
            f"compact_tokens(out=...) does not support automatic differentiation: {what}; "
            "call it without out= (or under torch.no_grad())"
        )
    try:
        out_rows = out.view(flat_index.numel(), *tail)
    except RuntimeError:
        raise ValueError(
            f"out must be contiguous in its token dims {tuple(out.shape[:k])} (they are taken as "
            f"one row axis), got strides {out.stride()}"
        ) from None
    torch.ops.adsc.compact_tokens_out(rows, flat_index, out_rows, check_index)
    return out


def write_paged_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    check_slots: bool = True,
) -> None:
    """Write K/V rows into paged caches in place: ``key_cache[slot] = key[t]`` (and value).

    Caches are ``[num_blocks, block_size, num_kv_heads, head_dim]`` (FlashAttention's paged layout);
    ``key``/``value`` are ``[T, num_kv_heads, head_dim]``; ``slot_mapping`` is int64 ``[T]`` with
    ``slot = block * block_size + offset`` and ``-1`` for tokens not to write (padding). With ADSC
    each stage has its own pool, sized by that stage's tokens. ``check_slots`` validates the slot
    range (one synchronisation on CUDA; pass False for slots computed from block tables).
    """
    torch.ops.adsc.write_paged_kv(key, value, key_cache, value_cache, slot_mapping, check_slots)


# ---- torch.compile support: fake kernels --------------------------------------------------------
# A call with any meta tensor among real ones is dispatched to these kernels, so they repeat the
# real ops' device, dtype and shape checks (with the same exception types) instead of returning
# uninitialised memory or doing nothing.
_INDEX_DTYPES = (torch.int32, torch.int64)
_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _same_device(device, **tensors) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} must be on {device} like the other inputs, got {t.device}")


def _check_index(index, device) -> None:
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(f"index must be int32 or int64, got {_dtype_name(index.dtype)}")
    if index.dim() != 1:
        raise ValueError(f"index must be 1-D [rows], got shape {list(index.shape)}")
    _same_device(device, index=index)


def _dtype_name(dtype) -> str:
    # The C++ front end prints c10 scalar type names (Float, Int, Long, ...).
    names = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
             torch.bfloat16: "BFloat16", torch.int32: "Int", torch.int64: "Long",
             torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool"}
    return names.get(dtype, str(dtype))


def _check_real_plan_inputs(layout_tensor) -> None:
    # Outside tracing (plain meta tensors) the plan cannot run: its sizes depend on the data.
    from torch._subclasses.fake_tensor import FakeTensor

    if not isinstance(layout_tensor, FakeTensor):
        raise ValueError(
            "stage_plan cannot run on meta tensors: the stage sizes depend on the token ids, which "
            "meta tensors do not hold"
        )


def _plan_fakes(device, stages: int, num_tokens, batch: int):
    i32 = dict(dtype=torch.int32, device=device)
    return (
        torch.empty((stages, num_tokens), **i32),
        torch.empty((stages, num_tokens), **i32),
        torch.empty((stages, num_tokens), dtype=torch.int64, device=device),
        torch.empty((stages, batch + 1), **i32),
        torch.empty((_summary_size(stages - 1),), dtype=torch.int32, device="cpu"),
    )


def _check_fake_images(input_ids, image_spans) -> None:
    if (input_ids is None) == (image_spans is None):
        raise ValueError("give exactly one of input_ids (images are runs of image_token_id) and "
                         "image_spans")
    if image_spans is not None:
        if image_spans.dtype not in _INDEX_DTYPES:
            raise TypeError(f"image_spans must be an int64 (or int32) tensor, got "
                            f"{_dtype_name(image_spans.dtype)}")
        if image_spans.dim() != 2 or image_spans.shape[1] not in (4, 5):
            raise ValueError(f"image_spans must be [N, 4] rows of (sequence, start, height, width) "
                             f"or [N, 5] with a newline flag, got {list(image_spans.shape)}")


@torch.library.register_fake("adsc::stage_plan_packed")
def _(input_ids, cu_seqlens, image_spans, num_tokens, image_token_id, grid_h, grid_w, factors):
    _same_device(cu_seqlens.device, input_ids=input_ids, image_spans=image_spans)
    _check_fake_images(input_ids, image_spans)
    if cu_seqlens.dtype not in _INDEX_DTYPES:
        raise TypeError(f"cu_seqlens must be int32 or int64, got {_dtype_name(cu_seqlens.dtype)}")
    if input_ids is not None and (input_ids.dim() != 1 or input_ids.numel() != num_tokens):
        raise ValueError(f"the packed layout needs input_ids of shape [{num_tokens}], got "
                         f"{list(input_ids.shape)}")
    _check_real_plan_inputs(cu_seqlens)
    return _plan_fakes(cu_seqlens.device, len(factors) + 1, num_tokens, cu_seqlens.shape[0] - 1)


@torch.library.register_fake("adsc::stage_plan_padded")
def _(input_ids, attention_mask, image_spans, image_token_id, grid_h, grid_w, factors, pad_left):
    _same_device(attention_mask.device, input_ids=input_ids, image_spans=image_spans)
    _check_fake_images(input_ids, image_spans)
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, S], got shape {list(attention_mask.shape)}")
    if input_ids is not None and input_ids.shape != attention_mask.shape:
        raise ValueError(f"input_ids {list(input_ids.shape)} and attention_mask "
                         f"{list(attention_mask.shape)} must have the same shape")
    _check_real_plan_inputs(attention_mask)
    return _plan_fakes(
        attention_mask.device, len(factors) + 1, attention_mask.numel(), attention_mask.shape[0]
    )


def _check_compact(x, index, out=None) -> None:
    if x.dim() < 1:
        raise ValueError("x must have a token dim: shape [rows, ...], got a scalar")
    _check_index(index, x.device)
    if out is not None:
        _same_device(x.device, out=out)
        if out.dtype != x.dtype:
            raise TypeError(f"out must have x's dtype {_dtype_name(x.dtype)}, got {_dtype_name(out.dtype)}")
        want = [index.shape[0], *x.shape[1:]]
        if list(out.shape) != want:
            raise ValueError(f"out must have shape {want} ([index rows] + x.shape[1:]), got {list(out.shape)}")


@torch.library.register_fake("adsc::compact_tokens")
def _(x, index, check_index=True):
    _check_compact(x, index)
    return x.new_empty((index.shape[0], *x.shape[1:]))


@torch.library.register_fake("adsc::compact_tokens_out")
def _(x, index, out, check_index=True):
    _check_compact(x, index, out)
    return None


@torch.library.register_fake("adsc::write_paged_kv")
def _(key, value, key_cache, value_cache, slot_mapping, check_slots=True):
    _same_device(key.device, value=value, key_cache=key_cache, value_cache=value_cache,
                 slot_mapping=slot_mapping)
    if key.dim() < 1 or key.shape != value.shape:
        raise ValueError(f"key and value must be [tokens, ...] of one shape, got {list(key.shape)} "
                         f"and {list(value.shape)}")
    if not (key.dtype == value.dtype == key_cache.dtype == value_cache.dtype):
        raise TypeError("key, value and the caches must share one dtype")
    if (key_cache.dim() != key.dim() + 1 or key_cache.shape != value_cache.shape
            or key_cache.shape[2:] != key.shape[1:]):
        raise ValueError(f"caches must be [num_blocks, block_size] + key.shape[1:], got "
                         f"{list(key_cache.shape)} and {list(value_cache.shape)}")
    if slot_mapping.dtype != torch.int64:
        raise TypeError(f"slot_mapping must be int64, got {_dtype_name(slot_mapping.dtype)}")
    if slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]:
        raise ValueError(f"slot_mapping must be [{key.shape[0]}] (one slot per token), got "
                         f"{list(slot_mapping.shape)}")
    return None


@torch.library.register_fake("adsc::scatter_add_tokens")
def _(grad, index, num_rows):
    if grad.dim() < 1:
        raise ValueError("grad must be [rows, ...], got a scalar")
    _check_index(index, grad.device)
    if index.shape[0] != grad.shape[0]:
        raise ValueError(f"index has {index.shape[0]} rows but grad has {grad.shape[0]}")
    if grad.dtype not in _GRAD_DTYPES:
        raise TypeError("scatter_add_tokens supports float32, float16, bfloat16 and float64 "
                        f"gradients, got {_dtype_name(grad.dtype)}")
    return grad.new_empty((num_rows, *grad.shape[1:]))


# ---- autograd: compaction and its adjoint are each other's backward ----------------------------
def _compact_setup(ctx, inputs, output):
    x, index, _ = inputs
    ctx.save_for_backward(index)
    ctx.num_rows = x.shape[0]


def _compact_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return torch.ops.adsc.scatter_add_tokens(grad, index, ctx.num_rows), None, None


def _scatter_setup(ctx, inputs, output):
    _, index, _ = inputs
    ctx.save_for_backward(index)


def _scatter_backward(ctx, grad):
    (index,) = ctx.saved_tensors
    return torch.ops.adsc.compact_tokens(grad, index, False), None, None


torch.library.register_autograd("adsc::compact_tokens", _compact_backward, setup_context=_compact_setup)
torch.library.register_autograd(
    "adsc::scatter_add_tokens", _scatter_backward, setup_context=_scatter_setup
)
