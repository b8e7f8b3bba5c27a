"""The PyTorch modules that are exported to ONNX: one per graph of an ADSC LLaVA deployment.

Every module reads the model through its model spec (:class:`~adsc_ext.models.ModelSpec`): the
decoder layer is run as ``attention_inputs`` -> attention -> ``attention_output``, so the exported
math is the math the engine and the tests check against transformers' own layer; the stage layout
(compaction, masks) is :class:`~adsc_ext.layout.StagedLayout`'s, traced. Attention is
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

from ..layout import StagedLayout, StageMap, causal_mask, gather_rows
from ..models.base import ModelSpec, unwrap
from ..schedule import Schedule, StageInfo

__all__ = ["EmbedGraph", "VisionGraph", "QwenVisionGraph", "PrefillGraph", "DecodeGraph", "compact_rows"]


def compact_rows(x: torch.Tensor, index: torch.Tensor, plugin: bool = False) -> torch.Tensor:
    """``x [B, S, D]`` compacted by a plan index ``[B, S']`` of flat rows of ``x`` -> ``[B, S', D]``;
    a slot holding ``-1`` (padding) is a zero row.

    Standard ops (:func:`adsc_ext.layout.gather_rows`: Gather + Where, as a plain Gather would
    read row -1, the last row), or, with ``plugin``, ``torch.ops.adsc.compact_tokens``, which the
    exporter translates into one ``AdscCompactTokens`` node (see :mod:`adsc_ext.export._plugin`).
    """
    B, S2 = index.shape
    rows = _compactor(plugin)(x.reshape(-1, x.shape[-1]), index.reshape(-1))
    return rows.reshape(B, S2, x.shape[-1])


def _plugin_compact(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.ops.adsc.compact_tokens(rows, index, False)


def _compactor(plugin: bool):
    """The layout's compaction in an exported graph: standard ops, or the plugin node."""
    return _plugin_compact if plugin else gather_rows


class _Decoder(nn.Module):
    """What prefill and decode share: the model's spec (its layers, rotary, norm and head) and the
    stage of every layer."""

    def __init__(self, model, spec: ModelSpec, schedule: Schedule, stages: Sequence[StageInfo]):
        super().__init__()
        self.model = unwrap(model)
        self.layers = spec.layers  # the model's own ModuleList
        self.spec = spec
        self.stage_map = StageMap(schedule, spec.num_layers)
        self.gqa = spec.num_heads != spec.num_kv_heads

    def attend(self, layer, h, cos, sin, mask, past=None):
        """One decoder layer; returns ``(h, k, v)`` with ``k, v [B, kv_heads, T_total, head_dim]``."""
        q, k, v = self.spec.attention_inputs(layer, h, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.spec.scaling, enable_gqa=self.gqa)
        return self.spec.attention_output(layer, h, o.transpose(1, 2)), k, v

    def logits(self, h_last: torch.Tensor) -> torch.Tensor:
        return self.spec.logits(h_last).float()


class PrefillGraph(_Decoder):
    """Prefill with the schedule baked in.

    ``forward(inputs_embeds [B, S0, D], attention_mask [B, S0] int64, position_ids [B, S0] int64,
    *index)`` with one int32 ``index[s-1] [B, S_s]`` per stage ``s >= 1`` (the plan's
    ``stages[s].index``: flat rows of the previous stage, -1 padding). Returns ``logits [B, V]``
    (float32, each row's last prompt token), then ``key, value`` of every layer,
    ``[B, kv_heads, S_stage, head_dim]``. The layout is :meth:`StagedLayout.from_index` of the
    inputs: its compaction and masks are traced into the graph.
    """

    def __init__(self, model, spec, schedule, stages, plugin: bool = False):
        super().__init__(model, spec, schedule, stages)
        self.plugin = plugin

    def forward(self, inputs_embeds, attention_mask, position_ids, *index):
        layout = StagedLayout.from_index(self.stage_map, attention_mask != 0, index, compact=_compactor(self.plugin))
        h = inputs_embeds
        cos, sin = self.spec.rotary(h, position_ids)
        kv: List[torch.Tensor] = []
        mask = None
        for l, s, entering in layout.layers():
            if entering:
                if s > 0:
                    h, cos, sin = layout.enter(s, h, cos, sin)
                mask = layout.attention_mask(s)
            h, k, v = self.attend(self.layers[l], h, cos, sin, mask)
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
        n = self.stage_map.num_stages
        past_mask, past = rest[:n], rest[n:]
        h = inputs_embeds
        cos, sin = self.spec.rotary(h, position_ids)
        new = torch.ones_like(inputs_embeds[..., 0], dtype=torch.bool)  # [B, 1] (positions may lead with components)
        keys = [torch.cat([m != 0, new], dim=1) for m in past_mask]
        masks = [causal_mask(k, 1, k.shape[1] - 1) for k in keys]  # the new token sees every real key
        kv: List[torch.Tensor] = []
        for l, s, _ in self.stage_map.layers():
            h, k, v = self.attend(self.layers[l], h, cos, sin, masks[s], past=(past[2 * l], past[2 * l + 1]))
            kv += [k, v]
        return (self.logits(h[:, -1]), *kv)


class EmbedGraph(nn.Module):
    """The token embedding table: ``input_ids [B, S]`` -> ``inputs_embeds [B, S, D]``."""

    def __init__(self, model):
        super().__init__()
        self.embed = unwrap(model).get_input_embeddings()

    def forward(self, input_ids):
        return self.embed(input_ids)


class QwenVisionGraph(nn.Module):
    """Qwen2.5-VL's vision tower + merger: ``pixel_values [N, patch_dim]`` (patches in window
    order), ``position_ids [N, 2]``, ``full_segments [N]``, ``window_segments [N]`` ->
    ``image_features [N / m^2, hidden]`` (merged tokens in window order).

    The number of patches is dynamic; everything the tower derives from the grids (the window
    order, the rotary ids, the attention blocks) is computed on the host by
    :meth:`~adsc_ext.models.qwen_vl.QwenVLSpec.vision_layout` and fed in (transformers computes it
    with host loops that a graph cannot hold), and the host puts the features back in raster order
    (``restore``). Attention is one masked ``scaled_dot_product_attention`` per block over the
    patches of the same block (``full_segments`` in the full-attention blocks, ``window_segments``
    elsewhere); the blocks are :meth:`~adsc_ext.models.qwen_vl.QwenVLSpec.vision_block`.
    """

    def __init__(self, model, spec: ModelSpec):
        super().__init__()
        self.visual = unwrap(model).model.visual
        self.spec = spec
        self.full = set(spec.fullatt_blocks)

    def forward(self, pixel_values, position_ids, full_segments, window_segments):
        visual = self.visual
        h = visual.patch_embed(pixel_values)
        cos, sin = visual.rotary_pos_emb(h, position_ids)
        full = full_segments[:, None] == full_segments[None, :]
        window = window_segments[:, None] == window_segments[None, :]
        for i, block in enumerate(visual.blocks):
            h = self.spec.vision_block(block, h, cos, sin, full if i in self.full else window)
        return visual.merger(h)


class VisionGraph(nn.Module):
    """Vision tower + projector: ``pixel_values [N, 3, S, S]`` -> ``image_features [N, H*W, D]``.

    LLaVA's feature rule (hidden states of ``vision_feature_layer``, one int or a list concatenated
    on the feature dim, CLS dropped by the "default" strategy, then the projector) on LLaVA's
    public modules. It does not call ``get_image_features``, whose result is a Python list of
    per-image tensors (``list(features)``), which fixes the number of images at export time; the
    tests check this graph against :func:`adsc_ext.models.llava.image_features`.
    """

    def __init__(self, model, spec: ModelSpec):
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
