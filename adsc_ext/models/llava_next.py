"""LLaVA-NeXT and LLaVA-OneVision (anyres): their :class:`LlavaNextSpec`.

Both transformers classes (``LlavaNextForConditionalGeneration``,
``LlavaOnevisionForConditionalGeneration``) give an image one run of ``<image>`` tokens whose
length depends on the image's size (:mod:`adsc_ext.image_grids`): the base crop's ``side x side``
grid, then the high-resolution grid whose every row ends with the learned ``image_newline``
vector. ADSC sees two grids per image (spec section 3): the base grid, and the high-resolution grid
with a newline token per row (an ``[N, 5]`` image span with the newline flag: the newline is kept
exactly while its row is, and halving columns never removes it). A OneVision item of a multi-image
prompt is the base grid plus one trailing newline (kept like text); a OneVision video is one
pooled grid per frame plus one trailing newline. The text models (Mistral / LLaMA / Qwen2) use
1-D RoPE, so positions are each token's index in its sequence, as for LLaVA-1.5.

Where the grids come from, never from a guess (:meth:`LlavaNextSpec.image_items`):

- the processor's ``image_sizes`` (and OneVision's ``batch_num_images``; videos: the frame count of
  ``pixel_values_videos``) -- what a plain forward gets;
- inside ``generate``, which runs the vision tower before the prefill and removes those inputs
  (research note section 2.4), the per-image features in ``mm_encoder_outputs``: the newline rows
  are exact copies of the model's ``image_newline``, so their places give each high-resolution
  grid (one host read per prefill).

The run of image tokens of every image is then checked against its layout and turned into spans
(:meth:`LlavaNextSpec.image_spans`); a mismatch (an image split across prefill chunks, sizes that
do not match the prompt) is an :class:`~adsc_ext.errors.AdscInputError` naming the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import AdscInputError, AdscModelError
from ..image_grids import AnyresLayout, anyres_layout, anyres_max_crops, onevision_video_layout
from .base import ModelSpec, llama_family_facts, register_model_spec, unwrap

__all__ = ["LlavaNextSpec", "ImageItem", "llava_next_spec", "item_from_features"]

#: vision towers whose feature layout adsc_ext knows: model_type -> does a CLS token come first
_TOWER_CLS = {"clip_vision_model": True, "siglip_vision_model": False}

Grid3 = Tuple[int, int, int]


@dataclass(frozen=True)
class ImageItem:
    """The vision tokens of one image (or video) in sequence order: ``tokens`` placeholder tokens;
    ``units``: ``(offset, h, w, newline)`` of each grid ADSC downsamples, ``offset`` counted from
    the item's first token. Tokens of no unit (a trailing newline) are kept like text."""

    kind: str  # "image" or "video"
    tokens: int
    units: Tuple[Tuple[int, int, int, int], ...]

    @classmethod
    def from_grids(cls, kind: str, grids: Sequence[Grid3], extra: int) -> "ImageItem":
        units, off = [], 0
        for h, w, nl in grids:
            units.append((off, h, w, nl))
            off += h * (w + nl)
        return cls(kind, off + extra, tuple(units))

    @classmethod
    def from_anyres(cls, layout: AnyresLayout) -> "ImageItem":
        return cls.from_grids("image", layout.grids, layout.text_tokens)

    @property
    def grids(self) -> List[Grid3]:
        return [(h, w, nl) for _, h, w, nl in self.units]


@register_model_spec("LlavaNextForConditionalGeneration", "LlavaOnevisionForConditionalGeneration")
@dataclass(frozen=True)
class LlavaNextSpec(ModelSpec):
    """A LLaVA-NeXT or LLaVA-OneVision model (see the module docstring).

    side: tokens per crop side (``tower_size // patch_size``); tower_size: the vision tower's input
    side in pixels; pinpoints: ``image_grid_pinpoints`` as ``(height, width)``; max_crops: ``N`` of
    OneVision's ``anyres_max_N`` (None for NeXT); onevision: multi-image items and videos follow
    OneVision's rules; video_token_id: OneVision's ``<video>`` id (None for NeXT).
    image_newline: the model's ``image_newline`` parameter itself (not a copy: ``generate``'s image
    features carry its current value), kept by :meth:`unbound` so the hooks can read grids from
    features.
    """

    video_token_id: Optional[int]
    side: int
    tower_size: int
    patch_size: int
    pinpoints: Tuple[Tuple[int, int], ...]
    max_crops: Optional[int]
    onevision: bool
    model: Any = field(default=None, compare=False, repr=False)
    image_newline: Any = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:  # type: ignore[override]
        return "llava-onevision" if self.onevision else "llava-next"

    @classmethod
    def from_model(cls, model) -> "LlavaNextSpec":
        return llava_next_spec(model)

    # ---- the model ----------------------------------------------------------------------------
    def text_model(self):
        return self._bound().model.language_model

    def embed(self, input_ids, pixel_values=None, *, num_image_tokens=None, image_sizes=None,
              batch_num_images=None, pixel_values_videos=None, **inputs):
        """Token embeddings of ``input_ids [B, S]`` with the packed image (and OneVision video)
        features in their placeholder rows, in order -- what the model's own forward computes."""
        model = self._bound()
        h = model.get_input_embeddings()(input_ids)
        feats = self.image_features(pixel_values, image_sizes, batch_num_images)
        if feats is not None:
            h = _scatter(h, input_ids, self.image_token_id, torch.cat(feats, 0), "image", num_image_tokens)
        if pixel_values_videos is not None:
            if not self.onevision:
                raise AdscInputError("LLaVA-NeXT takes no videos (pixel_values_videos)")
            video = model.model.get_video_features(pixel_values_videos, return_dict=True).pooler_output
            h = _scatter(h, input_ids, self.video_token_id, video.flatten(0, 1), "video", None)
        return h

    def image_features(self, pixel_values, image_sizes, batch_num_images=None) -> Optional[List[torch.Tensor]]:
        """The packed features of every image (``[tokens_i, hidden]`` each), through the model's
        public ``get_image_features``; None without images."""
        if pixel_values is None or pixel_values.shape[0] == 0:
            return None
        if image_sizes is None:
            raise AdscInputError(f"{self.name} needs image_sizes (the processor's output) with pixel_values")
        model = self._bound()
        kw = {"batch_num_images": batch_num_images} if self.onevision and batch_num_images is not None else {}
        out = model.model.get_image_features(pixel_values, image_sizes, return_dict=True, **kw)
        return list(out.pooler_output)

    # ---- images -------------------------------------------------------------------------------
    def image_items(self, *, image_sizes=None, batch_num_images=None, pixel_values_videos=None,
                    mm_encoder_outputs=None, **inputs) -> List[ImageItem]:
        """The layout of every image, then every video, of a batch, in the order their features
        fill the placeholder tokens (the flattened batch), from the processor's outputs or, inside
        ``generate``, from ``mm_encoder_outputs`` (module docstring)."""
        items: List[ImageItem] = []
        mm = mm_encoder_outputs or {}
        if image_sizes is not None:
            sizes = _rows(image_sizes, "image_sizes", 2)
            multi = _multi_image_flags(batch_num_images, len(sizes)) if self.onevision else [False] * len(sizes)
            for i, (size, m) in enumerate(zip(sizes, multi)):
                if size[0] < 1 or size[1] < 1:
                    raise AdscInputError(f"image_sizes[{i}] must be a positive (height, width), got {size}")
                items.append(ImageItem.from_anyres(self.layout(size, multi_image=m)))
        elif mm.get("image") is not None:
            for i, feat in enumerate(_pooled(mm["image"], "image")):
                items.append(self._item_from_features(i, feat))
        if self.onevision:
            frames = None
            if pixel_values_videos is not None:
                if pixel_values_videos.dim() != 5:
                    raise AdscInputError(f"pixel_values_videos must be [videos, frames, 3, H, W], got "
                                         f"{tuple(pixel_values_videos.shape)}")
                n_videos, frames = int(pixel_values_videos.shape[0]), int(pixel_values_videos.shape[1])
            elif mm.get("video") is not None:
                video = _pooled(mm["video"], "video")
                pooled = onevision_video_layout(1, self.side)[0][0]
                per_frame = pooled[0] * pooled[1]
                n_videos, n = len(video), int(video[0].shape[0]) if len(video) else 1
                if (n - 1) % per_frame:
                    raise AdscInputError(f"a video's features have {n} rows, not frames x {per_frame} + 1 newline")
                frames = (n - 1) // per_frame
            if frames is not None:
                grids, extra = onevision_video_layout(frames, self.side)
                items += [ImageItem.from_grids("video", grids, extra)] * n_videos
        return items

    def check_runtime(self, runtime: str) -> None:
        name = "LLaVA-OneVision" if self.onevision else "LLaVA-NeXT"
        raise AdscModelError(f"{runtime} does not run {name} yet (its anyres images are planned by apply_adsc on the "
                             f"Hugging Face model, which runs it; docs/models-llava-next.md)")

    def layout(self, image_size: Sequence[int], *, multi_image: bool = False) -> AnyresLayout:
        """The :class:`~adsc_ext.image_grids.AnyresLayout` of an image of ``(height, width)``
        pixels in this model (a OneVision multi-image item with ``multi_image``)."""
        return anyres_layout(image_size, self.pinpoints, self.tower_size, self.patch_size,
                             max_crops=self.max_crops, multi_image=multi_image)

    def _item_from_features(self, i: int, feat: torch.Tensor) -> ImageItem:
        """An image's layout from its packed features (:func:`item_from_features`)."""
        return item_from_features(i, feat, self.side, self.image_newline)

    def image_spans(self, input_ids: torch.Tensor, *, attention_mask: Optional[torch.Tensor] = None,
                    cu_seqlens: Optional[torch.Tensor] = None, **inputs) -> torch.Tensor:
        """The ``[N, 5]`` image spans ``(sequence, start, h, w, newline)`` of a batch (see
        :func:`adsc_ext.stage_plan`): ``input_ids [B, S]`` with ``attention_mask`` (padded; positions
        count real tokens), or ``input_ids [T]`` (or ``[1, T]``) with ``cu_seqlens`` (packed). Each
        item of :meth:`image_items` must be one run of consecutive placeholder tokens of one
        sequence; the runs are taken in order."""
        items = self.image_items(**inputs)
        ids = input_ids.detach()
        device = (cu_seqlens if cu_seqlens is not None else attention_mask if attention_mask is not None
                  else input_ids).device
        ids = ids.cpu()
        if cu_seqlens is not None:
            ids = ids.reshape(-1)
            cu = cu_seqlens.detach().cpu().to(torch.int64)
            seq = torch.repeat_interleave(torch.arange(cu.numel() - 1), cu[1:] - cu[:-1])
            if seq.numel() != ids.numel():
                raise AdscInputError(f"cu_seqlens ends at {int(cu[-1])} but input_ids has {ids.numel()} tokens")
            seq_of, pos_of, valid = seq, torch.arange(ids.numel()) - cu[seq], torch.ones_like(ids, dtype=torch.bool)
        else:
            if ids.dim() == 1:
                ids = ids[None]
            valid = (attention_mask.detach().cpu().bool() if attention_mask is not None
                     else torch.ones_like(ids, dtype=torch.bool))
            if valid.shape != ids.shape:
                raise AdscInputError(f"attention_mask {tuple(valid.shape)} does not match input_ids {tuple(ids.shape)}")
            seq_of = torch.arange(ids.shape[0])[:, None].expand_as(ids)
            pos_of = valid.long().cumsum(1) - 1
            ids, valid, seq_of, pos_of = ids.reshape(-1), valid.reshape(-1), seq_of.reshape(-1), pos_of.reshape(-1)
        rows: List[List[int]] = []
        kinds = [("image", self.image_token_id)] + ([("video", self.video_token_id)] if self.onevision else [])
        for kind, token in kinds:
            mine = [it for it in items if it.kind == kind]
            hits = ((ids == token) & valid).nonzero().flatten()
            rows += _spans_of(kind, token, mine, seq_of[hits], pos_of[hits])
        rows.sort(key=lambda r: (r[0], r[1]))
        return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 5)

    def plan_images(self, input_ids, **inputs) -> Dict[str, Any]:
        """``{"image_spans": [N, 5]}`` of a batch (:meth:`image_spans`; ``inputs`` hold the layout,
        ``cu_seqlens`` or ``attention_mask``, and the processor's outputs)."""
        return {"image_spans": self.image_spans(input_ids, **inputs)}

    # ---- the Hugging Face hooks' contract ------------------------------------------------------
    @property
    def placeholder_ids(self) -> Tuple[int, ...]:
        return (self.image_token_id, self.video_token_id) if self.onevision else (self.image_token_id,)

    def has_vision_inputs(self, inputs: Dict[str, Any]) -> bool:
        mm = inputs.get("mm_encoder_outputs") or {}
        return (inputs.get("pixel_values") is not None or mm.get("image") is not None
                or (self.onevision and (inputs.get("pixel_values_videos") is not None or mm.get("video") is not None)))

    def check_features(self, seg) -> None:
        """Every image given has its size (the spans were checked against the tokens already)."""
        pix, sizes = seg.inputs.get("pixel_values"), seg.inputs.get("image_sizes")
        if pix is not None and sizes is not None and int(pix.shape[0]) != len(_rows(sizes, "image_sizes", 2)):
            raise AdscInputError(f"pixel_values holds {int(pix.shape[0])} image(s) but image_sizes "
                                 f"{len(_rows(sizes, 'image_sizes', 2))}")

    # ---- requests ------------------------------------------------------------------------------
    def prompt_grids(self, input_ids, what: str = "the sequence", **inputs) -> List[Grid3]:
        """The ``(h, w, newline)`` grid of every image unit of one prompt ``[n]``, in order."""
        ids = input_ids.reshape(-1)
        try:
            spans = self.image_spans(ids, cu_seqlens=torch.tensor([0, ids.numel()]), **inputs)
        except AdscInputError as exc:
            raise AdscInputError(f"{what}: {exc}") from None
        return [tuple(r[2:]) for r in spans.tolist()]

    def image_grids(self, i: int, request) -> List[Grid3]:
        inputs = dict(request.inputs)
        pix = request.pixel_values
        sizes = inputs.get("image_sizes")
        if pix is not None and sizes is not None and int(pix.shape[0]) != len(_rows(sizes, "image_sizes", 2)):
            raise AdscInputError(f"request {i}: pixel_values holds {pix.shape[0]} image(s) but image_sizes "
                                 f"{len(_rows(sizes, 'image_sizes', 2))}")
        if pix is not None and sizes is None:
            raise AdscInputError(f"request {i}: {self.name} needs image_sizes (the processor's output) with its images")
        return self.prompt_grids(request.input_ids, what=f"request {i}", **inputs)


def _rows(value, name: str, width: int) -> List[List[int]]:
    rows = value.tolist() if isinstance(value, torch.Tensor) else [list(r) for r in value]
    if any(len(r) != width for r in rows):
        raise AdscInputError(f"{name} must have {width} values per row, got {rows!r}")
    return [[int(v) for v in r] for r in rows]


def _multi_image_flags(batch_num_images, n_images: int) -> List[bool]:
    """OneVision: image ``i`` is a multi-image item when its sample holds more than one image
    (``batch_num_images``; None: every image on its own, as transformers assumes)."""
    if batch_num_images is None:
        return [False] * n_images
    counts = [int(n) for n in (batch_num_images.tolist() if isinstance(batch_num_images, torch.Tensor)
                               else batch_num_images)]
    flags = [n > 1 for n in counts for _ in range(n)]
    if len(flags) != n_images:
        raise AdscInputError(f"batch_num_images {counts} counts {len(flags)} images but image_sizes has {n_images}")
    return flags


def _pooled(output, kind: str) -> List[torch.Tensor]:
    """Per-item features of an ``mm_encoder_outputs`` entry (a list/tuple of ``[n, D]``, or a
    ``[items, n, D]`` tensor)."""
    feats = output if isinstance(output, (list, tuple, torch.Tensor)) else getattr(output, "pooler_output", None)
    if feats is None:
        raise AdscInputError(f"mm_encoder_outputs[{kind!r}] has no pooler_output")
    return list(feats)


def _spans_of(kind: str, token: int, items: Sequence[ImageItem], seq: torch.Tensor, pos: torch.Tensor) -> List[List[int]]:
    """Span rows of ``items``, which fill the placeholder tokens at ``(seq, pos)`` (in order)."""
    lengths = torch.tensor([it.tokens for it in items], dtype=torch.int64)
    if int(lengths.sum()) != seq.numel():
        sizes = ", ".join(str(it.tokens) for it in items) or "none"
        raise AdscInputError(
            f"the input has {seq.numel()} {kind} tokens (id {token}) but its {len(items)} {kind}(s) need "
            f"{int(lengths.sum())} ({sizes}); each {kind} must be whole in the segment that holds it (not split "
            f"across prefill chunks) and match the processor's outputs"
        )
    if not items:
        return []
    first = torch.cumsum(lengths, 0) - lengths
    item_of = torch.repeat_interleave(torch.arange(len(items)), lengths)
    k = torch.arange(seq.numel())
    ok = (seq == seq[first][item_of]) & (pos == pos[first][item_of] + (k - first[item_of]))
    if not bool(ok.all()):
        bad = int(item_of[~ok][0])
        raise AdscInputError(
            f"{kind} {bad} ({items[bad].tokens} tokens) is not one run of consecutive {kind} tokens in one "
            f"sequence: its tokens start at sequence {int(seq[first[bad]])}, position {int(pos[first[bad]])}"
        )
    out = []
    for it, b, p in zip(items, seq[first].tolist(), pos[first].tolist()):
        out += [[b, p + off, h, w, nl] for off, h, w, nl in it.units]
    return out


def item_from_features(i: int, feat: torch.Tensor, side: int, image_newline: Optional[torch.Tensor]) -> ImageItem:
    """Image ``i``'s layout from its packed features ``[n, hidden]``: the ``side x side`` base grid,
    then (if more than one trailing newline) rows of ``C`` grid tokens + 1 newline, found where the
    rows equal ``image_newline`` bit for bit (one host read). Shared by the Hugging Face hooks
    (inside ``generate``) and the vLLM plugin (whose forward sees only the embeddings)."""
    base = side * side
    rest = int(feat.shape[0]) - base
    if rest < 0:
        raise AdscInputError(f"image {i}'s features have {feat.shape[0]} rows, fewer than the base grid's {base}")
    if rest <= 1:  # base only, or base + one trailing newline (OneVision multi-image)
        return ImageItem.from_grids("image", [(side, side, 0)], rest)
    if image_newline is None:
        raise AdscModelError("this spec holds no image_newline: build it with model_spec(model)")
    newline = image_newline.detach().to(feat.device, feat.dtype)
    is_nl = (feat[base:] == newline).all(-1).nonzero().flatten().tolist()  # one host read per prefill
    cols = is_nl[0] if is_nl else -1
    rows = rest // (cols + 1) if cols >= 0 else 0
    if cols < 0 or rows * (cols + 1) != rest or is_nl != [r * (cols + 1) + cols for r in range(rows)]:
        raise AdscInputError(
            f"image {i}'s features ({feat.shape[0]} rows) are not a {side}x{side} base grid followed "
            f"by rows that each end with image_newline; pass image_sizes (the processor's output)"
        )
    grids = [(side, side, 0)] + ([(rows, cols, 1)] if cols > 0 else [])
    return ImageItem.from_grids("image", grids, rows if cols == 0 else 0)


def _scatter(h, input_ids, token, feats, kind, count):
    mask = input_ids == token
    n = int(mask.sum()) if count is None else int(count)
    if n != feats.shape[0]:
        raise AdscInputError(f"the input has {n} {kind} tokens but the {kind}s give {feats.shape[0]} feature rows")
    return h.masked_scatter(mask[..., None], feats.to(h.device, h.dtype))


def _classes():
    try:
        from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError("adsc_ext's LLaVA-NeXT / OneVision support needs the 'transformers' package") from exc
    return LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration


def llava_next_spec(model) -> LlavaNextSpec:
    """Check that ``model`` is a LLaVA-NeXT / OneVision ADSC can run and describe it.

    Raises :class:`AdscModelError` naming what does not fit: another class; a text model that is not
    LLaMA-family or not full causal attention (:func:`~adsc_ext.models.base.llama_family_facts`); a
    vision tower other than CLIP / SigLIP, or a feature strategy that does not give a ``side x side``
    grid per crop (CLIP needs ``"default"``, which drops its CLS token; SigLIP ``"full"``); grid
    pinpoints that are not whole crops; a OneVision ``vision_aspect_ratio`` other than
    ``anyres_max_N``.
    """
    next_cls, ov_cls = _classes()
    model = unwrap(model)
    if not isinstance(model, (next_cls, ov_cls)):
        raise AdscModelError(f"expected a transformers LlavaNextForConditionalGeneration or "
                             f"LlavaOnevisionForConditionalGeneration, got {type(model).__module__}.{type(model).__name__}")
    onevision = isinstance(model, ov_cls)
    cfg = model.config
    facts = llama_family_facts(getattr(getattr(model, "model", None), "language_model", None))
    vcfg = cfg.vision_config
    tower, patch = getattr(vcfg, "image_size", None), getattr(vcfg, "patch_size", None)
    if not isinstance(tower, int) or not isinstance(patch, int) or patch < 1 or tower < patch:
        raise AdscModelError(f"the vision tower's config must give int image_size >= patch_size, got {tower!r} and {patch!r}")
    if tower % patch:
        raise AdscModelError(f"image_size {tower} is not a multiple of patch_size {patch}")
    has_cls = _TOWER_CLS.get(getattr(vcfg, "model_type", None))
    if has_cls is None:
        raise AdscModelError(f"ADSC knows the feature layout of CLIP and SigLIP vision towers; this model's is "
                             f"{getattr(vcfg, 'model_type', None)!r}")
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    if (strategy == "default") != has_cls:
        want = "'default' (CLS dropped)" if has_cls else "'full' (SigLIP has no CLS token)"
        raise AdscModelError(f"each crop must be a {tower // patch}x{tower // patch} grid of tokens: with a "
                             f"{vcfg.model_type} tower vision_feature_select_strategy must be {want}, got {strategy!r}")
    pinpoints = tuple((int(h), int(w)) for h, w in cfg.image_grid_pinpoints)
    odd = [p for p in pinpoints if p[0] % tower or p[1] % tower or p[0] < tower or p[1] < tower]
    if odd:
        raise AdscModelError(f"image_grid_pinpoints must be whole {tower}-pixel crops, got {odd}")
    try:
        max_crops = anyres_max_crops(getattr(cfg, "vision_aspect_ratio", None)) if onevision else None
    except ValueError as exc:
        raise AdscModelError(str(exc)) from None
    video = getattr(cfg, "video_token_id", None) if onevision else None
    return LlavaNextSpec(
        image_token_id=int(cfg.image_token_id), video_token_id=None if video is None else int(video),
        side=tower // patch, tower_size=tower, patch_size=patch, pinpoints=pinpoints, max_crops=max_crops,
        onevision=onevision, model=model, image_newline=model.model.image_newline, **facts,
    )
