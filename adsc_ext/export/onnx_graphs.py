"""The PyTorch modules that are exported to ONNX: one per graph of an ADSC LLaVA deployment.

Every module reads the model through the one model spec (:mod:`adsc_ext.models.llava`): the decoder
layer is run as ``attention_inputs`` -> attention -> ``attention_output``, so the exported math is
the math the engine and the tests check against transformers' own layer. Attention is
``F.scaled_dot_product_attention``, which the ONNX exporter maps to the ONNX ``Attention`` op at
opset >= 23 (GQA included) and to MatMul/Softmax below.

Layout: padded ``[batch, seq]`` batches, left-padded, as the host plan (``stage_plan(...,
attention_mask=..., padding_side="left")``) lays them out. With left padding the last slot of every
row is its last real token at every stage, so the prefill logits are those of slot ``-1``.

- :class:`EmbedGraph`    ``input_ids [batch, seq]`` -> ``inputs_embeds [batch, seq, hidden]``;
- :class:`VisionGraph`   ``pixel_values [num_images, 3, S, S]`` -> ``image_features [num_images, H*W, hidden]``;
- :class:`PrefillGraph`  embeddings + stage-0 mask/positions + one compaction index per later stage ->
  last-token logits and every layer's K/V at its own stage's length;
- :class:`DecodeGraph`   one token per row + per-stage past masks + every layer's past K/V ->
  logits and the grown K/V.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.llava import (
    LlavaSpec,
    attention_inputs,
    attention_output,
    rotary,
    text_model,
    unwrap,
)
from ..schedule import Schedule, StageInfo

__all__ = ["EmbedGraph", "VisionGraph", "PrefillGraph", "DecodeGraph", "compact_rows"]


def compact_rows(x: torch.Tensor, index: torch.Tensor, plugin: bool = False) -> torch.Tensor:
    """``x [B, S, D]`` compacted by a plan index ``[B, S']`` of flat rows of ``x`` -> ``[B, S', D]``;
    a slot holding ``-1`` (padding) is a zero row.

    Standard ops (exported as Gather + Where: a plain Gather would read row -1, the last row), or,
    with ``plugin``, ``torch.ops.adsc.compact_tokens``, which the exporter translates into one
    ``AdscCompactTokens`` node (see :mod:`adsc_ext.export._plugin`).
    """
    B, S2 = index.shape
    rows = x.reshape(-1, x.shape[-1])
    flat = index.reshape(-1)
    if plugin:
        out = torch.ops.adsc.compact_tokens(rows, flat, False)
    else:
        keep = (flat >= 0).unsqueeze(-1)
        out = torch.where(keep, rows.index_select(0, flat.clamp(min=0).long()), torch.zeros((), dtype=x.dtype))
    return out.reshape(B, S2, x.shape[-1])


class _Decoder(nn.Module):
    """What prefill and decode share: the text model's layers, norm, head and the stage layout."""

    def __init__(self, model, spec: LlavaSpec, schedule: Schedule, stages: Sequence[StageInfo]):
        super().__init__()
        self.model = unwrap(model)
        self.text = text_model(model)
        self.lm_head = self.model.lm_head
        self.spec = spec
        self.schedule = schedule
        self.num_stages = len(stages)
        self.stage_of_layer = [schedule.stage_of_layer(l) for l in range(spec.num_layers)]
        self.boundaries = {st.first_layer: st.stage for st in stages[1:]}
        self.gqa = spec.num_heads != spec.num_kv_heads

    def attend(self, layer, h, cos, sin, mask, past=None):
        """One decoder layer; returns ``(h, k, v)`` with ``k, v [B, kv_heads, T_total, head_dim]``."""
        q, k, v = attention_inputs(layer, h, cos, sin, self.spec.head_dim)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.spec.scaling, enable_gqa=self.gqa)
        return attention_output(layer, h, o.transpose(1, 2)), k, v

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.text.norm(h_last)).float()


def _prefill_mask(valid: torch.Tensor) -> torch.Tensor:
    """``valid [B, S]`` bool -> ``[B, 1, S, S]`` bool: causal over real keys. A padding query may
    always see itself, so no row is fully masked (a fully masked softmax row is NaN on some
    backends); its output is never read."""
    pos = torch.arange(valid.shape[1], device=valid.device)
    causal = pos[None, :] <= pos[:, None]
    diag = pos[None, :] == pos[:, None]
    return (causal[None] & (valid[:, None, :] | diag[None]))[:, None]


class PrefillGraph(_Decoder):
    """Prefill with the schedule baked in.

    ``forward(inputs_embeds [B, S0, D], attention_mask [B, S0] int64, position_ids [B, S0] int64,
    *index)`` with one int32 ``index[s-1] [B, S_s]`` per stage ``s >= 1`` (the plan's
    ``stages[s].index``: flat rows of the previous stage, -1 padding). Returns ``logits [B, V]``
    (float32, each row's last prompt token), then ``key, value`` of every layer,
    ``[B, kv_heads, S_stage, head_dim]``.
    """

    def __init__(self, model, spec, schedule, stages, plugin: bool = False):
        super().__init__(model, spec, schedule, stages)
        self.plugin = plugin

    def forward(self, inputs_embeds, attention_mask, position_ids, *index):
        h = inputs_embeds
        cos, sin = rotary(self.model, h, position_ids)
        mask = _prefill_mask(attention_mask != 0)
        kv: List[torch.Tensor] = []
        for l, layer in enumerate(self.text.layers):
            if l in self.boundaries:
                idx = index[self.boundaries[l] - 1]
                h = compact_rows(h, idx, self.plugin)
                cos = compact_rows(cos, idx, self.plugin)
                sin = compact_rows(sin, idx, self.plugin)
                mask = _prefill_mask(idx >= 0)
            h, k, v = self.attend(layer, h, cos, sin, mask)
            kv += [k, v]
        return (self.logits(h[:, -1]), *kv)


class DecodeGraph(_Decoder):
    """One decode step.

    ``forward(inputs_embeds [B, 1, D], position_ids [B, 1] int64, *past_mask, *past)``: one int64
    ``past_mask[s] [B, P_s]`` per stage (1 for cached real tokens, 0 for padding slots), then
    ``key, value`` of every layer ``[B, kv_heads, P_stage, head_dim]``. Returns ``logits [B, V]``
    (float32), then every layer's grown ``key, value`` ``[B, kv_heads, P_stage + 1, head_dim]``.
    """

    def forward(self, inputs_embeds, position_ids, *rest):
        n = self.num_stages
        past_mask, past = rest[:n], rest[n:]
        h = inputs_embeds
        cos, sin = rotary(self.model, h, position_ids)
        new = torch.ones_like(position_ids, dtype=torch.bool)
        masks = [torch.cat([m != 0, new], dim=1)[:, None, None, :] for m in past_mask]
        kv: List[torch.Tensor] = []
        for l, layer in enumerate(self.text.layers):
            h, k, v = self.attend(layer, h, cos, sin, masks[self.stage_of_layer[l]],
                                  past=(past[2 * l], past[2 * l + 1]))
            kv += [k, v]
        return (self.logits(h[:, -1]), *kv)


class EmbedGraph(nn.Module):
    """The token embedding table: ``input_ids [B, S]`` -> ``inputs_embeds [B, S, D]``."""

    def __init__(self, model):
        super().__init__()
        self.embed = unwrap(model).get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class VisionGraph(nn.Module):
    """Vision tower + projector: ``pixel_values [N, 3, S, S]`` -> ``image_features [N, H*W, D]``.

    LLaVA's feature rule (hidden states of ``vision_feature_layer``, one int or a list concatenated
    on the feature dim, CLS dropped by the "default" strategy, then the projector) on LLaVA's
    public modules. It does not call ``get_image_features``, whose result is a Python list of
    per-image tensors (``list(features)``), which fixes the number of images at export time; the
    tests check this graph against :func:`adsc_ext.models.llava.image_features`.
    """

    def __init__(self, model, spec: LlavaSpec):
        super().__init__()
        self.model = unwrap(model)
        self.spec = spec
        layer = self.model.config.vision_feature_layer
        self.layers = [layer] if isinstance(layer, int) else list(layer)

    def forward(self, pixel_values):
        inner = self.model.model
        out = inner.vision_tower(pixel_values, output_hidden_states=True, return_dict=True)
        feats = torch.cat([out.hidden_states[l][:, 1:] for l in self.layers], dim=-1)  # llava_spec: "default"
        return inner.multi_modal_projector(feats)
