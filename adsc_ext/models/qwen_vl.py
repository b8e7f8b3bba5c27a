"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``transformers.Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``): their :class:`QwenVLSpec`.

**Images and videos** (spec section 3). The processor writes one run of placeholder tokens per
image (``<|image_pad|>``) or video (``<|video_pad|>``), between ``<|vision_start|>`` and
``<|vision_end|>`` (which are text). An item's grid is its ``image_grid_thw`` /
``video_grid_thw`` row ``(t, H, W)`` in patches, after the ``spatial_merge_size`` merge: ``t``
temporal patches of ``H/m x W/m`` tokens in raster order. An image is one grid (``t = 1``); a
video is ``t`` grids, each downsampled on its own (spatially only: frames are never dropped).
Qwen3-VL writes a video as one run per temporal patch, each after its timestamp text, so each run
is one grid. Every item is an ``[N, 4]`` image span of the plan; its grid must survive the
schedule, else :class:`~adsc_ext.errors.AdscInputError` names the item.

Where the grids come from: the processor's ``image_grid_thw`` / ``video_grid_thw`` when the forward
gets them. ``generate`` does not pass them to the forward (it runs the vision tower first and
passes ``mm_encoder_outputs``); its prefill gets the M-RoPE ``position_ids`` instead, from which
every run's grid is read (inside a run the height row is ``start + r`` and the width row
``start + c``), checked against the vision tower's outputs.

**Positions**: M-RoPE. The layout holds ``[4, *tokens]``: row 0 the text index (each token's index
among its sequence's real tokens, what transformers' text model uses for masks and packing), rows
1-3 the temporal, height and width rotary ids of transformers' ``get_rope_index`` (computed here,
from the items, so that runtimes without the model compute them too; ``tests/test_qwen_vl.py``
checks them against the model's own). A kept token keeps all four. The next token of a row gets
``n + t`` in the text row and ``n + t + rope_delta`` in the rotary rows (one past the row's
largest rotary id, the rule of ``generate``).

**Qwen3-VL DeepStack**: the model adds vision features to the hidden states after its first
``len(deepstack_visual_indexes)`` decoder layers, at every vision token of the full sequence. ADSC
refuses schedules whose first boundary comes before the last injection
(``first layer >= len(deepstack_visual_indexes)``), so every injection happens before any token
is dropped; the features are not compacted.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import AdscInputError, AdscModelError, ScheduleError
from ..schedule import Schedule, StageInfo
from .base import (ModelSpec, Segment, SegmentInputs, apply_rotary, attention_inputs, llama_family_facts,
                   register_model_spec, unwrap)

__all__ = ["QwenVLSpec", "qwen_vl_spec", "VisionItem", "QWEN_CLASSES", "check_deepstack"]

#: transformers class -> architecture
QWEN_CLASSES = {
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
}
_NAMES = {"qwen2_vl": "Qwen2-VL", "qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}


@dataclass(frozen=True)
class VisionItem:
    """One run of vision placeholder tokens: an image, a video, or (Qwen3-VL) one temporal patch
    of a video. ``index``: its row in ``image_grid_thw`` / ``video_grid_thw`` (None when the grid was
    read from the positions); ``sequence``, ``start``: where its tokens start, counting the
    sequence's real tokens; ``t x h x w``: temporal patches and merged grid."""

    kind: str
    index: Optional[int]
    sequence: int
    start: int
    t: int
    h: int
    w: int
    frame: Optional[int] = None  # Qwen3-VL: the temporal patch of the video this run is

    @property
    def length(self) -> int:
        return self.t * self.h * self.w

    def describe(self) -> str:
        what = self.kind if self.index is None else f"{self.kind} {self.index}"
        if self.frame is not None:
            what += f" (temporal patch {self.frame})"
        return f"{what} (sequence {self.sequence}, tokens {self.start}..{self.start + self.length - 1})"


@register_model_spec(*QWEN_CLASSES)
@dataclass(frozen=True)
class QwenVLSpec(ModelSpec):
    """A Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (see the module docstring and
    :class:`~adsc_ext.models.ModelSpec`)."""

    arch: str  # "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl"
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    spatial_merge_size: int
    temporal_patch_size: int
    patch_size: int
    in_channels: int
    tokens_per_second: float  # Qwen2.5-VL's temporal position step per second of video
    deepstack_layers: int  # Qwen3-VL: the decoder layers after which vision features are added
    window_size: int  # Qwen2.5-VL: the vision tower's attention window, in pixels (0: none)
    fullatt_blocks: Tuple[int, ...]  # Qwen2.5-VL: the vision blocks with full attention
    model: Any = field(default=None, compare=False, repr=False)
    #: Qwen2.5-VL under transformers 5.17: a video's seconds per grid are truncated to whole seconds
    #: before the temporal position step (hf._compat item 6); exports record it
    whole_video_seconds: bool = False

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.arch.replace("_", "-").replace("2-5", "2.5")

    position_lead = (4,)  # the text index, then the temporal, height and width rotary ids

    @property
    def placeholder_ids(self) -> Tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    def check_runtime(self, runtime: str) -> None:
        if self.deepstack_layers:
            raise AdscModelError(f"{runtime} does not run {_NAMES[self.arch]} (its DeepStack vision features are "
                                 f"added inside the decoder); use apply_adsc on the Hugging Face model")

    @property
    def patch_dim(self) -> int:
        """Values of one patch of ``pixel_values`` (``[patches, channels * temporal_patch * p * p]``)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_model(cls, model) -> "QwenVLSpec":
        return qwen_vl_spec(model)

    def manifest_facts(self) -> Dict[str, Any]:
        """The facts an export manifest records beside the decoder's (:meth:`from_manifest` reads them)."""
        return {"vision": {"patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
                           "spatial_merge_size": self.spatial_merge_size, "in_channels": self.in_channels,
                           "window_size": self.window_size, "fullatt_blocks": list(self.fullatt_blocks),
                           "tokens_per_second": self.tokens_per_second,
                           "whole_video_seconds": self.whole_video_seconds},
                "tokens": {"video_token_id": self.video_token_id, "vision_start_token_id": self.vision_start_token_id,
                           "vision_end_token_id": self.vision_end_token_id}}

    @classmethod
    def from_manifest(cls, manifest: Dict[str, Any]) -> "QwenVLSpec":
        """The spec of an exported model, from its ``adsc_manifest.json`` (no model: facts only)."""
        m, v, t = manifest["model"], manifest["vision"], manifest["tokens"]
        arch = {"qwen2-vl": "qwen2_vl", "qwen2.5-vl": "qwen2_5_vl", "qwen3-vl": "qwen3_vl"}[manifest["architecture"]]
        return cls(arch=arch, image_token_id=int(manifest["image_token_id"]), video_token_id=int(t["video_token_id"]),
                   vision_start_token_id=int(t["vision_start_token_id"]),
                   vision_end_token_id=int(t["vision_end_token_id"]), spatial_merge_size=int(v["spatial_merge_size"]),
                   temporal_patch_size=int(v["temporal_patch_size"]), patch_size=int(v["patch_size"]),
                   in_channels=int(v["in_channels"]), tokens_per_second=float(v["tokens_per_second"]),
                   deepstack_layers=0, window_size=int(v["window_size"]),
                   fullatt_blocks=tuple(int(b) for b in v["fullatt_blocks"]), num_layers=int(m["num_layers"]),
                   hidden_size=int(m["hidden_size"]), num_heads=int(m["num_heads"]),
                   num_kv_heads=int(m["num_kv_heads"]), head_dim=int(m["head_dim"]), vocab_size=int(m["vocab_size"]),
                   max_positions=int(m["max_positions"]), rms_norm_eps=float(m["rms_norm_eps"]),
                   scaling=float(m["scaling"]), whole_video_seconds=bool(v.get("whole_video_seconds", False)))

    def vision_feeds(self, pixel_values: torch.Tensor, grid_thw) -> Tuple[Dict[str, torch.Tensor], torch.Tensor]:
        """The exported vision graph's inputs for ``pixel_values [N, patch_dim]`` of the items of
        ``grid_thw``, and the index that puts its output rows back in the items' raster order."""
        lay = self.vision_layout(grid_thw)
        feeds = {"pixel_values": pixel_values[lay["order"]], "position_ids": lay["position_ids"],
                 "full_segments": lay["full_segments"], "window_segments": lay["window_segments"]}
        return feeds, lay["restore"]

    # ---- the model ----------------------------------------------------------------------------
    def text_model(self):
        return unwrap(self._bound()).model.language_model

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor):
        """``(cos, sin)`` of the M-RoPE rows of ``position_ids [4, *tokens]`` (row 0, the text index,
        is not a rotary id), each ``[*tokens, head_dim]`` (transformers merges the sections)."""
        return self.text_model().rotary_emb(hidden, position_ids[1:])

    def attention_inputs(self, layer, hidden, cos, sin):
        # Qwen3: an RMSNorm over each head of q and k before the rotary
        return attention_inputs(layer, hidden, cos, sin, self.head_dim, qk_norm=self.arch == "qwen3_vl")

    def vision_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, kind: str = "image") -> torch.Tensor:
        """Merged features ``[sum(t*h*w), hidden]`` of the items of ``grid_thw [n, 3]`` (one kind),
        through the model's public ``get_image_features`` / ``get_video_features``."""
        inner = unwrap(self._bound()).model
        fn = inner.get_image_features if kind == "image" else inner.get_video_features
        out = fn(pixel_values, grid_thw, return_dict=True)
        feats = out.pooler_output
        if isinstance(feats, (list, tuple)):
            feats = torch.cat(list(feats), dim=0)
        return feats

    def embed(self, input_ids, pixel_values=None, *, num_image_tokens=None, image_grid_thw=None,
              pixel_values_videos=None, video_grid_thw=None, **inputs):
        """Token embeddings of ``input_ids`` (any shape) with the image features in the
        ``<|image_pad|>`` rows and the video features in the ``<|video_pad|>`` rows, in order.
        ``num_image_tokens``: the image and video tokens, counted on the host (no device sync)."""
        if self.deepstack_layers:
            raise AdscModelError(f"{_NAMES[self.arch]}'s DeepStack features are added inside the decoder; this "
                                 f"runtime does not add them (use apply_adsc on the Hugging Face model)")
        model = unwrap(self._bound())
        h = model.get_input_embeddings()(input_ids)
        rows = 0
        for kind, pix, grid, tok in (("image", pixel_values, image_grid_thw, self.image_token_id),
                                     ("video", pixel_values_videos, video_grid_thw, self.video_token_id)):
            if pix is None or not pix.shape[0]:
                continue
            if grid is None:
                raise AdscInputError(f"{kind} pixel values need their {kind}_grid_thw")
            feats = self.vision_features(pix.to(h.device), grid.to(h.device), kind).to(h.dtype)
            rows += feats.shape[0]
            h = h.masked_scatter((input_ids == tok)[..., None], feats)
        if num_image_tokens is not None and int(num_image_tokens) != rows:
            raise AdscInputError(f"the input has {num_image_tokens} image and video tokens but the images and "
                                 f"videos give {rows} feature rows")
        return h

    # ---- the vision tower, as the exported graph runs it (Qwen2.5-VL) ------------------------------------
    def vision_layout(self, grid_thw) -> Dict[str, torch.Tensor]:
        """What the vision tower derives from ``grid_thw [n, 3]`` (patches), computed on the host for
        a graph that takes it as inputs (transformers' ``vision_utils`` rules, checked against them
        in the tests). The tower runs its patches in *window order* (merge units of ``m*m`` patches
        regrouped window by window); with ``N`` patches and ``U = N / m^2`` merge units:

        - ``order`` int64 ``[N]``: the patch row of ``pixel_values`` at every window-order slot;
        - ``position_ids`` int64 ``[N, 2]``: each slot's (row, column) rotary ids;
        - ``full_segments`` / ``window_segments`` int64 ``[N]``: the attention block of each slot
          (a temporal patch of an item: the full-attention blocks; a window of it: the others);
        - ``restore`` int64 ``[U]``: the window-order row of every merged token, in the items'
          raster order (the features the decoder takes).
        """
        m = self.spatial_merge_size
        unit = m * m
        rows = _grid_rows(grid_thw, "grid_thw")
        ws = self.window_size // m // self.patch_size if self.window_size else 0
        window_index, window_lens, pos, frames = [], [], [], []
        base = 0
        for t, gh, gw in rows:
            h, w = gh // m, gw // m
            hp = torch.arange(gh)[:, None].expand(gh, gw).reshape(h, m, w, m).transpose(1, 2).reshape(-1)
            wp = torch.arange(gw)[None, :].expand(gh, gw).reshape(h, m, w, m).transpose(1, 2).reshape(-1)
            pos.append(torch.stack([hp, wp], dim=-1).repeat(t, 1))
            frames += [h * w * unit] * t
            index = torch.arange(t * h * w).reshape(t, h, w)
            if ws:
                ph, pw = ws - h % ws, ws - w % ws
                nh, nw = (h + ph) // ws, (w + pw) // ws
                padded = torch.nn.functional.pad(index, (0, pw, 0, ph), value=-100)
                padded = padded.reshape(t, nh, ws, nw, ws).permute(0, 1, 3, 2, 4).reshape(t, nh * nw, ws, ws)
                lens = (padded != -100).sum([2, 3]).reshape(-1)
                flat = padded.reshape(-1)
                window_index.append(flat[flat != -100] + base)
                window_lens += [int(n) * unit for n in lens.tolist() if n]
            else:
                window_index.append(index.reshape(-1) + base)
                window_lens += [h * w * unit] * t
            base += t * h * w
        win = torch.cat(window_index) if window_index else torch.zeros(0, dtype=torch.long)
        order = (win[:, None] * unit + torch.arange(unit)).reshape(-1)
        pos_all = torch.cat(pos) if pos else torch.zeros(0, 2, dtype=torch.long)

        def segments(lens):
            return torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens, dtype=torch.long))

        return {"order": order, "position_ids": pos_all[order], "full_segments": segments(frames),
                "window_segments": segments(window_lens), "restore": torch.argsort(win)}

    def vision_block(self, block, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     allowed: torch.Tensor) -> torch.Tensor:
        """One vision block (Qwen2.5-VL's, through its public modules) on ``hidden [N, D]`` with
        attention restricted to ``allowed [N, N]`` (bool; transformers runs the same blocks as
        separate attention calls): the graph's lowering, checked against the model's tower."""
        attn = block.attn
        x = block.norm1(hidden)
        N = x.shape[0]
        q, k, v = attn.qkv(x).reshape(N, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        dt = q.dtype
        qf, kf = apply_rotary(q.float(), k.float(), cos.float(), sin.float())
        q, k = qf.to(dt), kf.to(dt)
        q, k, v = (x.transpose(0, 1)[None] for x in (q, k, v))  # [1, heads, N, head_dim] (what ONNX lowers)
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed[None, None], scale=attn.scaling)
        hidden = hidden + attn.proj(o[0].transpose(0, 1).reshape(N, -1))
        return hidden + block.mlp(block.norm2(hidden))

    # ---- schedules ----------------------------------------------------------------------------
    def resolve_schedule(self, schedule=None, config=None) -> Tuple[Schedule, List[StageInfo]]:
        sched, infos = super().resolve_schedule(schedule, config)
        self.check_deepstack(sched)
        return sched, infos

    def check_deepstack(self, schedule: Schedule) -> None:
        """Qwen3-VL: the schedule's first boundary must come after the last DeepStack injection."""
        check_deepstack(schedule, self.deepstack_layers, _NAMES[self.arch])

    # ---- images and positions -----------------------------------------------------------------
    def has_vision_inputs(self, inputs: Dict[str, Any]) -> bool:
        mm = inputs.get("mm_encoder_outputs") or {}
        return (inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None
                or mm.get("image") is not None or mm.get("video") is not None)

    def plan_images(self, input_ids, **inputs) -> Dict[str, Any]:
        return self.plan_inputs(input_ids, **inputs).images

    def position_ids(self, input_ids, attention_mask=None, *, cu_seqlens=None, **inputs) -> torch.Tensor:
        return self.plan_inputs(input_ids, attention_mask=attention_mask, cu_seqlens=cu_seqlens, **inputs).position_ids

    def plan_inputs(self, input_ids: torch.Tensor, *, cu_seqlens=None, attention_mask=None, padding_side: str = "left",
                    schedule=None, position_ids: Optional[torch.Tensor] = None, image_grid_thw=None,
                    video_grid_thw=None, second_per_grid_ts=None, mm_encoder_outputs=None, **inputs) -> SegmentInputs:
        """Image spans (``[N, 4]``, one per grid) and ``[4, *tokens]`` positions of a batch, from the
        processor's ``image_grid_thw`` / ``video_grid_thw`` or, without them, from M-RoPE
        ``position_ids`` (``[3 or 4, *tokens]``, what ``generate`` passes); the caller's M-RoPE
        rows are kept when given (transformers runs them)."""
        seqs, where = _sequences(input_ids, attention_mask, cu_seqlens)
        rope = _rope_rows(position_ids, input_ids)
        if rope is not None:
            rope = _per_sequence(rope, where)
        if image_grid_thw is not None or video_grid_thw is not None:
            items = self.items_from_grids(seqs, image_grid_thw, video_grid_thw)
        elif rope is not None:
            items = self.items_from_positions(seqs, rope)
            _check_encoder_outputs(items, mm_encoder_outputs)
        else:
            items = self.items_from_grids(seqs, None, None)  # refuses vision tokens without grids
        if schedule is not None:
            self.check_grids(Schedule.coerce(schedule), items)
        spans = torch.tensor([(it.sequence, it.start + k * it.h * it.w, it.h, it.w)
                              for it in items for k in range(it.t)], dtype=torch.long).reshape(-1, 4)
        device = input_ids.device
        if rope is None:
            rows = self.mrope_positions(seqs, items, second_per_grid_ts)
        else:  # transformers runs the caller's rotary rows; the text row is each token's index
            rows = [torch.cat([torch.arange(r.shape[1])[None], r.long()]) for r in rope]
        pos = _scatter_positions(rows, where, input_ids.shape, device)
        return SegmentInputs({"image_spans": spans.to(device)}, pos)

    def segment_inputs(self, seg: Segment) -> SegmentInputs:
        if seg.continuation and seg.inputs.get("position_ids") is not None:
            # a segment continuing a cache counts its positions from its own start (the hook adds the
            # cache's next positions); the caller's count from the prompt's
            seg = dataclasses.replace(seg, inputs={k: v for k, v in seg.inputs.items() if k != "position_ids"})
        return super().segment_inputs(seg)

    def next_positions(self, position_ids, valid, previous=None) -> torch.Tensor:
        """Row 0 (text): one past the row's last index; rows 1-3 (M-RoPE): one past the row's largest
        rotary id, the same for the three (``n + t + rope_delta``, transformers' rule)."""
        nxt = super().next_positions(position_ids, valid, previous)
        return torch.cat([nxt[:1], nxt[1:].amax(dim=0, keepdim=True).expand(nxt.shape[0] - 1, -1)])

    # ---- items ----------------------------------------------------------------------------------------
    def _runs(self, row: Sequence[int]) -> List[Tuple[str, int, int]]:
        kinds = {self.image_token_id: "image", self.video_token_id: "video"}
        out, p = [], 0
        for tok, grp in itertools.groupby(row):
            n = len(list(grp))
            if tok in kinds:
                out.append((kinds[tok], p, p + n))
            p += n
        return out

    def items_from_grids(self, seqs: Sequence[Sequence[int]], image_grid_thw, video_grid_thw) -> List[VisionItem]:
        """The vision items of ``seqs`` (each sequence's real token ids), their grids read in order
        from ``image_grid_thw`` / ``video_grid_thw`` (``[n, 3]`` in patches), each checked against
        its run of placeholder tokens."""
        m = self.spatial_merge_size
        grids: Dict[str, List[Tuple[int, Optional[int], List[int]]]] = {}
        for kind, g in (("image", image_grid_thw), ("video", video_grid_thw)):
            rows = [] if g is None else _grid_rows(g, f"{kind}_grid_thw")
            if kind == "video" and self.arch == "qwen3_vl":  # one run per temporal patch
                grids[kind] = [(i, k, [1, h, w]) for i, (t, h, w) in enumerate(rows) for k in range(t)]
            else:
                grids[kind] = [(i, None, r) for i, r in enumerate(rows)]
        used = {"image": 0, "video": 0}
        items = []
        for b, row in enumerate(seqs):
            for kind, start, end in self._runs(row):
                k = used[kind]
                if k >= len(grids[kind]):
                    what = "runs of <|image_pad|>" if kind == "image" else "runs of <|video_pad|>"
                    given = f"{kind}_grid_thw has {len(grids[kind])} row(s)" if grids[kind] or (
                        image_grid_thw is not None or video_grid_thw is not None) else f"no {kind}_grid_thw was given"
                    raise AdscInputError(
                        f"sequence {b} has {kind} tokens at {start}..{end - 1} but {given} for the batch's "
                        f"{sum(1 for s in seqs for r in self._runs(s) if r[0] == kind)} {what}: give the processor's "
                        f"{kind}_grid_thw (or, inside generate, its M-RoPE position_ids)"
                    )
                index, frame, (t, gh, gw) = grids[kind][k]
                used[kind] += 1
                if gh % m or gw % m:
                    raise AdscInputError(f"{kind}_grid_thw row {index} {[t, gh, gw]}: height and width must be "
                                         f"multiples of spatial_merge_size {m}")
                item = VisionItem(kind, index, b, start, t, gh // m, gw // m, frame)
                if end - start != item.length:
                    raise AdscInputError(
                        f"{item.describe()}: {kind}_grid_thw {[t, gh, gw]} gives {item.length} tokens after the {m}x{m} "
                        f"merge but its run has {end - start} {kind} tokens"
                    )
                items.append(item)
        for kind in ("image", "video"):
            if used[kind] != len(grids[kind]):
                raise AdscInputError(f"{kind}_grid_thw describes {len(grids[kind])} {kind} run(s) but the batch holds "
                                     f"{used[kind]}")
        return items

    def items_from_positions(self, seqs: Sequence[Sequence[int]], rope: Sequence[torch.Tensor]) -> List[VisionItem]:
        """The vision items of ``seqs``, their grids read from each sequence's M-RoPE rows ``[3, n]``:
        inside a run the height row is ``start + r`` and the width row ``start + c``."""
        items = []
        for b, (row, r) in enumerate(zip(seqs, rope)):
            for kind, start, end in self._runs(row):
                hh, ww = r[1, start:end], r[2, start:end]
                h = int(hh.max() - hh.min()) + 1
                w = int(ww.max() - ww.min()) + 1
                n = end - start
                if n % (h * w):
                    raise AdscInputError(
                        f"sequence {b}: the M-RoPE position_ids of the {kind} tokens at {start}..{end - 1} span a {h}x{w} "
                        f"grid, which does not divide their {n} tokens; pass the processor's {kind}_grid_thw"
                    )
                items.append(VisionItem(kind, None, b, start, n // (h * w), h, w))
        return items

    def check_grids(self, schedule: Schedule, items: Sequence[VisionItem]) -> None:
        """Refuse an item whose grid the schedule cannot downsample, naming it."""
        for it in items:
            try:
                schedule.grids((it.h, it.w))
            except ScheduleError as exc:
                m = self.spatial_merge_size
                raise AdscInputError(
                    f"{it.describe()} is a {it.h}x{it.w} grid after the {m}x{m} merge, which schedule '{schedule}' "
                    f"cannot downsample ({exc}); give it a larger image or use a schedule with fewer steps"
                ) from None

    def mrope_positions(self, seqs: Sequence[Sequence[int]], items: Sequence[VisionItem],
                        second_per_grid_ts=None) -> List[torch.Tensor]:
        """``[4, n]`` positions of every sequence (its real tokens): the text index, then
        transformers' ``get_rope_index`` rows (text runs continue a counter; a grid's temporal row is
        ``start + floor(i_t * interval)``, its height row ``start + r``, its width row
        ``start + c``; after a grid the counter moves by ``max(h, w)``)."""
        by_seq: Dict[int, List[VisionItem]] = {}
        for it in items:
            by_seq.setdefault(it.sequence, []).append(it)
        seconds = None
        if second_per_grid_ts is not None:
            n_videos = sum(it.kind == "video" for it in items)
            secs = second_per_grid_ts.tolist() if isinstance(second_per_grid_ts, torch.Tensor) else list(second_per_grid_ts)
            if self.arch == "qwen2_5_vl" and len(secs) < n_videos:
                raise AdscInputError(f"second_per_grid_ts has {len(secs)} entries for {n_videos} video(s); give one "
                                     f"per video, as the processor does")
            seconds = iter(secs)
        out = []
        for b, row in enumerate(seqs):
            parts, cur, p = [], 0, 0
            for it in by_seq.get(b, []):
                if it.start > p:
                    parts.append(torch.arange(it.start - p).expand(3, -1) + cur)
                    cur += it.start - p
                interval: Any = 1
                if it.kind == "video" and self.arch == "qwen2_5_vl":
                    sec = next(seconds) if seconds is not None else 1
                    interval = self.tokens_per_second * (int(sec) if self.whole_video_seconds else sec)
                t_ids = (torch.arange(it.t) * interval).long() + cur
                tt, hh, ww = torch.meshgrid(t_ids, torch.arange(it.h) + cur, torch.arange(it.w) + cur, indexing="ij")
                parts.append(torch.stack([tt, hh, ww]).reshape(3, -1))
                cur += max(it.h, it.w)
                p = it.start + it.length
            if len(row) > p:
                parts.append(torch.arange(len(row) - p).expand(3, -1) + cur)
            rope = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
            out.append(torch.cat([torch.arange(len(row))[None], rope.long()]))
        return out

    # ---- requests (the serving loop's check) --------------------------------------------------
    def prompt_grids(self, input_ids, what: str = "the sequence", **inputs) -> List[Tuple[int, int]]:
        row = input_ids.reshape(-1).tolist()
        try:
            items = self.items_from_grids([row], inputs.get("image_grid_thw"), inputs.get("video_grid_thw"))
        except AdscInputError as exc:
            raise AdscInputError(f"{what}: {exc}") from None
        return [(it.h, it.w) for it in items for _ in range(it.t)]

    def image_grids(self, i: int, request) -> List[Tuple[int, int]]:
        inputs = dict(request.inputs)
        for kind, pix, grid in (("image", request.pixel_values, inputs.get("image_grid_thw")),
                                ("video", inputs.get("pixel_values_videos"), inputs.get("video_grid_thw"))):
            name = "pixel_values" if kind == "image" else "pixel_values_videos"
            if pix is None and grid is None:
                continue
            if pix is None or grid is None:
                raise AdscInputError(f"request {i}: give {name} and {kind}_grid_thw together")
            if not isinstance(pix, torch.Tensor) or pix.dim() != 2 or pix.shape[1] != self.patch_dim:
                shape = tuple(pix.shape) if isinstance(pix, torch.Tensor) else type(pix).__name__
                raise AdscInputError(f"request {i}: {name} must be the processor's patches [num_patches, "
                                     f"{self.patch_dim}], got {shape}")
            rows = _grid_rows(grid, f"request {i}: {kind}_grid_thw")
            need = sum(t * h * w for t, h, w in rows)
            if pix.shape[0] != need:
                raise AdscInputError(f"request {i}: {kind}_grid_thw {rows} needs {need} patches, {name} has "
                                     f"{pix.shape[0]}")
        return self.prompt_grids(request.input_ids, what=f"request {i}", **inputs)


def check_deepstack(schedule: Schedule, deepstack_layers: int, name: str = "Qwen3-VL") -> None:
    """:class:`~adsc_ext.errors.ScheduleError` for a schedule that downsamples before the last of
    ``deepstack_layers`` DeepStack injections (after decoder layers ``0 .. deepstack_layers - 1``):
    ADSC keeps every token until the vision features are added (spec section 3)."""
    if deepstack_layers and schedule.layers and schedule.layers[0] < deepstack_layers:
        raise ScheduleError(
            f"schedule '{schedule}' downsamples before layer {schedule.layers[0]}, but {name} adds DeepStack vision "
            f"features to every vision token after decoder layers 0..{deepstack_layers - 1}; ADSC keeps all tokens "
            f"until they are added: the first step's layer must be >= {deepstack_layers}"
        )


def _sequences(input_ids: torch.Tensor, attention_mask=None, cu_seqlens=None):
    """``(sequences, where)``: each sequence's real token ids (host lists) and where they sit:
    ``("packed", cu)`` or ``("padded", per-row indices of the real slots or None)``."""
    if cu_seqlens is not None:
        flat = input_ids.reshape(-1).tolist()
        cu = [int(c) for c in cu_seqlens.tolist()]
        return [flat[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)], ("packed", cu)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    if attention_mask is None:
        return ids.tolist(), ("padded", None)
    mask = attention_mask.bool().to(ids.device)
    idx = [torch.nonzero(m).flatten().cpu() for m in mask]
    rows = ids.cpu().tolist()
    return [[rows[b][j] for j in ix.tolist()] for b, ix in enumerate(idx)], ("padded", idx)


def _per_sequence(t: torch.Tensor, where) -> List[torch.Tensor]:
    """Every sequence's ``[C, n]`` values (its real tokens) of a ``[C, *tokens]`` tensor laid out as
    ``where`` (:func:`_sequences`) says."""
    kind, info = where
    t = t.cpu()
    if kind == "packed":
        flat = t.reshape(t.shape[0], -1)
        return [flat[:, info[i]:info[i + 1]] for i in range(len(info) - 1)]
    t = t if t.dim() == 3 else t[:, None]
    if info is None:
        return [t[:, b] for b in range(t.shape[1])]
    return [t[:, b, ix] for b, ix in enumerate(info)]


def _rope_rows(position_ids: Optional[torch.Tensor], input_ids: torch.Tensor) -> Optional[torch.Tensor]:
    """The caller's M-RoPE rows ``[3, *tokens]`` (from ``[3 or 4, *tokens]`` positions), else None
    (2-D text positions are not M-RoPE)."""
    if position_ids is None or position_ids.dim() != input_ids.dim() + 1 or position_ids.shape[0] not in (3, 4):
        return None
    if tuple(position_ids.shape[1:]) != tuple(input_ids.shape):
        raise AdscInputError(f"position_ids {tuple(position_ids.shape)} do not match input_ids {tuple(input_ids.shape)}: "
                             f"M-RoPE positions are [3 or 4, *input_ids.shape]")
    return position_ids[-3:]


def _scatter_positions(rows: Sequence[torch.Tensor], where, shape, device) -> torch.Tensor:
    """``[4, *shape]`` positions from every sequence's ``[4, n]`` rows (padding: 1)."""
    kind, info = where
    if kind == "packed":
        return torch.cat(list(rows), dim=1).to(device) if rows else torch.zeros(4, 0, dtype=torch.long, device=device)
    B, S = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
    out = torch.ones(4, B, S, dtype=torch.long)
    for b, r in enumerate(rows):
        if info is None:
            out[:, b] = r
        else:
            out[:, b, info[b]] = r
    out = out.to(device)
    return out if len(shape) == 2 else out[:, 0]


def _grid_rows(grid, what: str) -> List[List[int]]:
    g = torch.as_tensor(grid)
    if g.dim() != 2 or g.shape[1] != 3 or g.dtype.is_floating_point:
        raise AdscInputError(f"{what} must be an integer [n, 3] tensor of (t, h, w) rows, got shape {tuple(g.shape)}")
    rows = g.tolist()
    if any(v < 1 for r in rows for v in r):
        raise AdscInputError(f"{what} must hold positive (t, h, w), got {rows}")
    return rows


def _check_encoder_outputs(items: Sequence[VisionItem], mm) -> None:
    """The vision tower's outputs (``generate``'s ``mm_encoder_outputs``) must fill the runs whose
    grids the positions gave: the same number of rows per kind."""
    if not mm:
        return
    for kind in ("image", "video"):
        out = mm.get(kind)
        if out is None:
            continue
        feats = getattr(out, "pooler_output", out)
        n = sum(f.shape[0] for f in feats) if isinstance(feats, (list, tuple)) else int(feats.shape[0])
        want = sum(it.length for it in items if it.kind == kind)
        if n != want:
            raise AdscInputError(f"the batch's {kind} tokens ({want}, with grids read from the M-RoPE position_ids) "
                                 f"do not match the vision tower's {n} {kind} feature rows")


def qwen_vl_spec(model) -> QwenVLSpec:
    """Check that ``model`` is a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model ADSC can run and describe it
    (bound to it). :class:`AdscModelError` names what does not fit: another class, a decoder layer
    that is not LLaMA-family shaped, sliding-window attention, rotary without M-RoPE sections."""
    from ..hf._compat import qwen25_whole_video_seconds

    model = unwrap(model)
    arch = next((QWEN_CLASSES[c.__name__] for c in type(model).__mro__ if c.__name__ in QWEN_CLASSES), None)
    if arch is None:
        raise AdscModelError(f"expected one of transformers' {', '.join(QWEN_CLASSES)}, got "
                             f"{type(model).__module__}.{type(model).__name__}")
    cfg = model.config
    text = getattr(getattr(model, "model", None), "language_model", None)
    facts = llama_family_facts(text)  # the decoder's facts; refuses what is not full causal attention
    if arch == "qwen3_vl":  # Qwen3: an RMSNorm over each head of q and k
        for i, layer in enumerate(text.layers):
            if not all(hasattr(layer.self_attn, p) for p in ("q_norm", "k_norm")):
                raise AdscModelError(f"decoder layer {i} ({type(layer).__name__}) is not shaped as Qwen3-VL's: its "
                                     f"self_attn needs q_norm and k_norm")
    tcfg = text.config
    rope = getattr(tcfg, "rope_parameters", None) or {}
    if not rope.get("mrope_section"):
        raise AdscModelError(f"{_NAMES[arch]}'s text config has no mrope_section in its rope_parameters")
    vcfg = cfg.vision_config
    patch = getattr(vcfg, "patch_size", 14)
    return QwenVLSpec(
        arch=arch,
        image_token_id=int(cfg.image_token_id),
        video_token_id=int(cfg.video_token_id),
        vision_start_token_id=int(cfg.vision_start_token_id),
        vision_end_token_id=int(cfg.vision_end_token_id),
        spatial_merge_size=int(vcfg.spatial_merge_size),
        temporal_patch_size=int(vcfg.temporal_patch_size),
        patch_size=int(patch if isinstance(patch, int) else patch[0]),
        in_channels=int(getattr(vcfg, "in_channels", 3)),
        tokens_per_second=float(getattr(vcfg, "tokens_per_second", 1) or 1),
        deepstack_layers=len(getattr(vcfg, "deepstack_visual_indexes", None) or ()) if arch == "qwen3_vl" else 0,
        window_size=int(getattr(vcfg, "window_size", 0) or 0) if arch == "qwen2_5_vl" else 0,
        fullatt_blocks=tuple(int(b) for b in getattr(vcfg, "fullatt_block_indexes", ()) or ()) if arch == "qwen2_5_vl" else (),
        **facts,
        model=model,
        whole_video_seconds=arch == "qwen2_5_vl" and qwen25_whole_video_seconds(),
    )
