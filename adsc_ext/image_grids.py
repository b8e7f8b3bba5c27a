"""How an image of ``H x W`` pixels becomes grids of vision tokens, per architecture (pure Python).

One place for the geometry that both the model specs (:mod:`adsc_ext.models.llava_next`, which
plan a batch from the processor's ``image_sizes``) and the accounting (``adsc plan --image-size``,
which has no processor) need. Every function here equals the transformers 5.24 processors' and
models' own arithmetic; ``tests/test_llava_next_spec.py`` checks that against the real processors
and ``pack_image_features`` for many image sizes.

- **LLaVA-NeXT / LLaVA-OneVision (anyres)**, :func:`anyres_layout`: the image is resized to the
  best of the ``image_grid_pinpoints`` (:func:`select_best_resolution`) and cut into crops of the
  tower's input size, plus one base crop of the whole image. Its tokens, in order: the base crop's
  ``side x side`` grid (raster order), then the crops stitched into one high-resolution grid, the
  letterbox padding removed ("unpad"), OneVision then shrinks it when it exceeds ``anyres_max_N``
  crops' worth of tokens, and every row is followed by one ``image_newline`` token. A OneVision
  item of a multi-image prompt is the base grid alone plus one trailing newline; a OneVision video
  is one pooled ``ceil(side/2)`` square grid per frame plus one trailing newline
  (:func:`onevision_video_layout`).
- **Qwen2-VL / Qwen2.5-VL / Qwen3-VL**, :func:`qwen_resize`: the image is resized to multiples of
  ``patch_size * merge_size`` within ``[min_pixels, max_pixels]`` (transformers'
  ``smart_resize``); its grid is ``(H / patch / merge) x (W / patch / merge)`` tokens.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

__all__ = [
    "AnyresLayout",
    "select_best_resolution",
    "anyres_layout",
    "anyres_max_crops",
    "onevision_video_layout",
    "qwen_resize",
]

Grid3 = Tuple[int, int, int]  # (h, w, newline)


def select_best_resolution(size: Sequence[int], pinpoints: Sequence[Sequence[int]]) -> Tuple[int, int]:
    """The ``(height, width)`` of ``pinpoints`` an image of ``size = (height, width)`` is resized
    to: the one that keeps the most of its pixels, then the one that wastes the fewest
    (transformers' ``image_processing_utils.select_best_resolution``)."""
    oh, ow = (int(v) for v in size)
    if oh < 1 or ow < 1:
        raise ValueError(f"an image size must be positive (height, width), got {oh}x{ow}")
    best, best_effective, best_wasted = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / ow, h / oh)
        dw, dh = int(ow * scale), int(oh * scale)
        effective = min(dw * dh, ow * oh)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (int(h), int(w)), effective, wasted
    if best is None:
        raise ValueError(f"no grid pinpoint fits an image of {oh}x{ow}: {list(pinpoints)!r}")
    return best


_ANYRES_MAX = re.compile(r"anyres_max_([0-9]+)")


def anyres_max_crops(vision_aspect_ratio: Optional[str]) -> Optional[int]:
    """``N`` of OneVision's ``vision_aspect_ratio = "anyres_max_N"`` (None for None: LLaVA-NeXT,
    which never shrinks the high-resolution grid)."""
    if vision_aspect_ratio is None:
        return None
    m = _ANYRES_MAX.fullmatch(str(vision_aspect_ratio))
    if m is None or int(m.group(1)) < 1:
        raise ValueError(f"vision_aspect_ratio must be 'anyres_max_N' with N >= 1, got {vision_aspect_ratio!r}")
    return int(m.group(1))


@dataclass(frozen=True)
class AnyresLayout:
    """The vision tokens of one anyres image, in sequence order.

    base: the base crop's grid ``(side, side)``, raster order.
    hires: ``(rows, cols)`` of the high-resolution grid, each row followed by one newline token
        (``rows * (cols + 1)`` tokens); None for a OneVision multi-image item.
    trailing: newline tokens after everything else (1 for a OneVision multi-image item).
    crops: the vision tower's input crops the image costs (base crop included).
    """

    base: Tuple[int, int]
    hires: Optional[Tuple[int, int]]
    trailing: int
    crops: int

    @property
    def tokens(self) -> int:
        """The image's ``<image>`` tokens (what the processor writes)."""
        rows, cols = self.hires or (0, 0)
        return self.base[0] * self.base[1] + rows * (cols + 1) + self.trailing

    @property
    def grids(self) -> List[Grid3]:
        """The ``(h, w, newline)`` grids ADSC downsamples, in order: the base grid, then the
        high-resolution grid with its newline column (when it has a token)."""
        out = [(self.base[0], self.base[1], 0)]
        if self.hires is not None and self.hires[0] > 0 and self.hires[1] > 0:
            out.append((self.hires[0], self.hires[1], 1))
        return out

    @property
    def text_tokens(self) -> int:
        """Tokens of the image that belong to no grid (kept like text): the trailing newline, and
        the newlines of a high-resolution grid that unpadding left without a column."""
        rows, cols = self.hires or (0, 0)
        return self.trailing + (rows if cols == 0 else 0)


def anyres_layout(image_size: Sequence[int], pinpoints: Sequence[Sequence[int]], tower_size: int,
                  patch_size: int, *, max_crops: Optional[int] = None, multi_image: bool = False) -> AnyresLayout:
    """The :class:`AnyresLayout` of an image of ``image_size = (height, width)`` pixels (the
    processor's ``image_sizes`` row).

    ``tower_size`` / ``patch_size``: the vision tower's input side and patch (``side = tower_size //
    patch_size`` tokens per crop side); ``pinpoints``: ``image_grid_pinpoints``; ``max_crops``: ``N``
    of OneVision's ``anyres_max_N`` (None: LLaVA-NeXT); ``multi_image``: a OneVision item of a
    multi-image prompt (base crop only).
    """
    side = tower_size // patch_size
    if side < 1:
        raise ValueError(f"the vision tower's image ({tower_size}) is smaller than its patch ({patch_size})")
    if multi_image:
        return AnyresLayout((side, side), None, 1, 1)
    oh, ow = (int(v) for v in image_size)
    bh, bw = select_best_resolution((oh, ow), pinpoints)
    nph, npw = bh // tower_size, bw // tower_size
    h, w = nph * side, npw * side
    # unpad: remove the letterbox padding of the aspect-preserving resize (transformers' unpad_image)
    if ow / oh > w / h:
        new_h = int(round(oh * (w / ow), 7))
        h -= 2 * ((h - new_h) // 2)
    else:
        new_w = int(round(ow * (h / oh), 7))
        w -= 2 * ((w - new_w) // 2)
    if max_crops is not None:  # OneVision: bilinear shrink to about max_crops crops' worth of tokens
        ratio = math.sqrt(h * w / (max_crops * side * side))
        if ratio > 1.1:
            h, w = int(h // ratio), int(w // ratio)
    return AnyresLayout((side, side), (h, w), 0, 1 + nph * npw)


def onevision_video_layout(frames: int, side: int) -> Tuple[List[Grid3], int]:
    """``(grids, trailing)`` of a OneVision video of ``frames`` frames: one ``ceil(side/2)``
    square grid per frame (the tower's ``side x side`` features pooled bilinearly), then one
    newline token for the whole video."""
    pooled = math.ceil(side / 2)
    return [(pooled, pooled, 0)] * int(frames), 1


def qwen_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> Tuple[int, int]:
    """The ``(height, width)`` in pixels a Qwen-VL processor resizes an image to (transformers'
    ``smart_resize``): multiples of ``factor`` (``patch_size * merge_size``), the aspect ratio kept
    as closely as possible, the area within ``[min_pixels, max_pixels]``."""
    if height < 1 or width < 1:
        raise ValueError(f"an image size must be positive (height, width), got {height}x{width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar
