"""LLaVA-1.5 (``transformers.LlavaForConditionalGeneration``): its :class:`LlavaSpec`.

Every image is one fixed ``H x W`` grid (the vision tower's patches, CLS dropped: 24 x 24 for
LLaVA-1.5), so the plan finds images as runs of the image token, each run a whole number of grids
(spec section 3). Positions are each token's index in its sequence. The decoder is LLaMA-family.
Everything is read through the model's public modules (``model.model.language_model``, the
layers' ``self_attn.{q,k,v,o}_proj``, ``input_layernorm``, ``mlp``, ``get_image_features``...), so
a transformers release that moves something is met here, in one place.

The module-level functions are the spec's implementation, kept public for the tests and for code
that holds a model rather than a spec:

- :func:`llava_spec` checks that a model is LLaVA-1.5 shaped and returns its :class:`LlavaSpec`;
- :func:`image_features` / :func:`embed_with_images`: projected image features, and the token
  embeddings with them scattered into the image-token rows (LLaVA's own rule);
- :func:`image_runs` / :func:`count_images`: the runs of image tokens in a sequence, with the
  error every consumer gives for a broken image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..errors import AdscInputError, AdscModelError
from ..schedule import LLAVA15_DEFAULT
from .base import (ModelSpec, apply_rotary, attention_inputs, attention_output, llama_family_facts,
                   register_model_spec, unwrap)

__all__ = [
    "AdscModelError",
    "AdscInputError",
    "LlavaSpec",
    "llava_spec",
    "unwrap",
    "text_model",
    "image_features",
    "embed_with_images",
    "rotary",
    "apply_rotary",
    "attention_inputs",
    "attention_output",
    "image_runs",
    "count_images",
]


@register_model_spec("LlavaForConditionalGeneration")
@dataclass(frozen=True)
class LlavaSpec(ModelSpec):
    """A LLaVA-1.5 model (all read from its config and modules; see :class:`~adsc_ext.models.ModelSpec`).

    grid: ``(H, W)`` vision tokens per image (LLaVA-1.5: 336 / 14 = 24 x 24).
    image_token_id: the placeholder token id of one vision token.
    image_size: the vision tower's input side in pixels.
    """

    grid: Tuple[int, int]
    image_size: int
    model: Any = field(default=None, compare=False, repr=False)
    name = "llava-1.5"

    @classmethod
    def from_model(cls, model) -> "LlavaSpec":
        return llava_spec(model)

    @classmethod
    def from_manifest(cls, manifest: Dict[str, Any]) -> "LlavaSpec":
        """The spec of an exported model, from its ``adsc_manifest.json`` (no model: facts only)."""
        m = manifest["model"]
        return cls(grid=tuple(manifest["grid"]), image_token_id=int(manifest["image_token_id"]),
                   num_layers=int(m["num_layers"]), hidden_size=int(m["hidden_size"]), num_heads=int(m["num_heads"]),
                   num_kv_heads=int(m["num_kv_heads"]), head_dim=int(m["head_dim"]), vocab_size=int(m["vocab_size"]),
                   image_size=int(manifest["image_size"]), max_positions=int(m["max_positions"]),
                   rms_norm_eps=float(m["rms_norm_eps"]), scaling=float(m["scaling"]))

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    # ---- the model ----------------------------------------------------------------------------
    def text_model(self):
        return text_model(self._bound())

    def embed(self, input_ids, pixel_values=None, *, num_image_tokens=None, **inputs):
        return embed_with_images(self._bound(), input_ids, pixel_values, self.image_token_id,
                                 num_image_tokens=num_image_tokens)

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return image_features(self._bound(), pixel_values)

    # ---- schedules, images, requests ----------------------------------------------------------
    def default_schedule(self) -> str:
        return LLAVA15_DEFAULT  # spec section 2: LLaVA-1.5's own default, whatever the depth

    def schedule_grid(self) -> Tuple[int, int]:
        return self.grid

    def plan_images(self, input_ids, **inputs) -> Dict[str, Any]:
        return {"image_token_id": self.image_token_id, "grid": self.grid}

    def prompt_grids(self, input_ids, what: str = "the sequence", **inputs) -> List[Tuple[int, int]]:
        return [self.grid] * count_images(input_ids, self, what)

    def image_grids(self, i: int, request) -> List[Tuple[int, int]]:
        pix = request.pixel_values
        n_img = 0
        if pix is not None:
            if not isinstance(pix, torch.Tensor) or pix.dim() != 4 or pix.shape[1] != 3:
                raise AdscInputError(f"request {i}: pixel_values must be a [k, 3, H, W] tensor, got "
                                     f"{tuple(pix.shape) if isinstance(pix, torch.Tensor) else type(pix).__name__}")
            if tuple(pix.shape[2:]) != (self.image_size, self.image_size):
                raise AdscInputError(f"request {i}: images must be {self.image_size}x{self.image_size} for this "
                                     f"model's vision tower, got {pix.shape[2]}x{pix.shape[3]}")
            n_img = int(pix.shape[0])
        n_tok_img = len(self.prompt_grids(request.input_ids, what=f"request {i}"))
        if n_tok_img != n_img:
            raise AdscInputError(f"request {i}: input_ids hold {n_tok_img} image(s) "
                                 f"({n_tok_img * self.tokens_per_image} image tokens) but pixel_values has "
                                 f"{n_img} image(s)")
        return [self.grid] * n_img

    def check_features(self, seg) -> None:
        """The images given must fill the image tokens (a whole grid each)."""
        pixel_values = seg.inputs.get("pixel_values")
        if pixel_values is None:
            return
        n_tok = int(((seg.input_ids == self.image_token_id) & seg.valid).sum())
        hw = self.tokens_per_image
        rows = pixel_values.shape[0] * hw
        if n_tok != rows:
            raise AdscInputError(
                f"the input has {n_tok} image tokens ({n_tok / hw:g} images of {hw}) but the images "
                f"give {rows} feature rows ({pixel_values.shape[0]} images)"
            )

    def check_images(self, ids: torch.Tensor, valid: torch.Tensor, continuation: bool, packed_cu=None) -> None:
        """Readable errors for image tokens that do not form whole images (spec section 3), naming a
        prefill chunk that starts or ends inside an image; raised after the plan refused a batch."""
        hw, (h, w) = self.tokens_per_image, self.grid
        tok = self.image_token_id
        if packed_cu is not None:
            flat = ids.reshape(-1).tolist()
            cu = packed_cu.tolist()
            rows = [flat[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]
        else:
            rows = [[t for t, v in zip(r, m) if v] for r, m in zip(ids.tolist(), valid.tolist())]
        for b, row in enumerate(rows):
            for p, q in image_runs(row, tok):
                n = q - p
                if n % hw == 0:
                    continue
                if q == len(row) and packed_cu is None:
                    raise AdscInputError(
                        f"sequence {b}: the prompt (chunk) ends inside an image: its last {n} tokens are "
                        f"image tokens, not a multiple of {hw} ({h}x{w} tokens per image). An image must "
                        f"not be split across prefill chunks; end each chunk between whole images."
                    )
                if p == 0 and continuation:
                    raise AdscInputError(
                        f"sequence {b}: this prefill chunk starts inside an image: its first {n} tokens "
                        f"are image tokens, not a multiple of {hw} ({h}x{w} tokens per image). An image "
                        f"must not be split across prefill chunks."
                    )
                raise AdscInputError(
                    f"sequence {b}: image tokens must form whole images of {h}x{w} = {hw} tokens; got a "
                    f"run of {n} image tokens (id {tok}) at position {p}"
                )


def _llava_class():
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError("adsc_ext's LLaVA support needs the 'transformers' package (>= 5.17)") from exc
    return LlavaForConditionalGeneration


def text_model(model):
    """The LLaMA-family language model (embeddings, decoder layers, final norm, rotary)."""
    return unwrap(model).model.language_model


def llava_spec(model) -> LlavaSpec:
    """Check that ``model`` is LLaVA-1.5 shaped and describe it (its :class:`LlavaSpec`, bound to it).

    Raises :class:`AdscModelError` naming what does not fit: not a
    ``LlavaForConditionalGeneration``, a text model that is not LLaMA-family (``embed_tokens``,
    ``layers``, ``norm``, ``rotary_emb``; ``self_attn.{q,k,v,o}_proj`` in every layer), sliding
    window or non-full attention layers, a vision tower whose image is not a whole number of
    patches, or a feature strategy that keeps the CLS token (the image is then not an H x W grid).
    """
    cls = _llava_class()
    model = unwrap(model)
    if not isinstance(model, cls):
        raise AdscModelError(
            f"ADSC expects a transformers LlavaForConditionalGeneration (LLaVA-1.5 with a "
            f"LLaMA-family text model), got {type(model).__module__}.{type(model).__name__}"
        )
    cfg = model.config
    text = getattr(getattr(model, "model", None), "language_model", None)
    facts = llama_family_facts(text)

    vcfg = cfg.vision_config
    image_size, patch_size = getattr(vcfg, "image_size", None), getattr(vcfg, "patch_size", None)
    if not isinstance(image_size, int) or not isinstance(patch_size, int) or patch_size < 1:
        raise AdscModelError(
            f"the vision tower's config must give an int image_size and patch_size, got "
            f"{image_size!r} and {patch_size!r}"
        )
    if image_size % patch_size:
        raise AdscModelError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    strategy = getattr(cfg, "vision_feature_select_strategy", "default")
    if strategy != "default":
        raise AdscModelError(
            f"ADSC needs each image to be an H x W grid of tokens: vision_feature_select_strategy "
            f"must be 'default' (CLS dropped), got {strategy!r}"
        )
    side = image_size // patch_size
    image_token_id = getattr(cfg, "image_token_id", None)
    if image_token_id is None:
        image_token_id = getattr(cfg, "image_token_index", None)
    if image_token_id is None:
        raise AdscModelError("the model's config has no image_token_id / image_token_index")
    return LlavaSpec(
        grid=(side, side),
        image_token_id=int(image_token_id),
        image_size=int(image_size),
        model=model,
        **facts,
    )


# ---- images ----------------------------------------------------------------------------------


def image_features(model, pixel_values: torch.Tensor, vision_feature_layer=None,
                   vision_feature_select_strategy: Optional[str] = None) -> torch.Tensor:
    """Projected image features of ``pixel_values [k, 3, S, S]`` as ``[k * H * W, hidden]``.

    Through LLaVA's public ``get_image_features``; its return type has changed across
    transformers releases (a tensor, a list of per-image tensors, or an output object with
    ``pooler_output``), and all of them are accepted.
    """
    model = unwrap(model)
    cfg = model.config
    out = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=cfg.vision_feature_layer if vision_feature_layer is None else vision_feature_layer,
        vision_feature_select_strategy=(cfg.vision_feature_select_strategy if vision_feature_select_strategy is None
                                        else vision_feature_select_strategy),
    )
    feats = out if isinstance(out, (list, tuple, torch.Tensor)) else getattr(out, "pooler_output", None)
    if feats is None:  # pragma: no cover - a new return type
        raise AdscModelError(f"get_image_features returned {type(out).__name__}, which has no image features")
    if isinstance(feats, (list, tuple)):
        feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], dim=0)
    return feats.reshape(-1, feats.shape[-1])


def embed_with_images(model, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor],
                      image_token_id: Optional[int] = None, *,
                      num_image_tokens: Optional[int] = None) -> torch.Tensor:
    """Token embeddings of ``input_ids`` (any shape) ``[..., hidden]`` with the projected image
    features scattered into the image-token rows, in order (LLaVA's rule).

    ``num_image_tokens``: the image tokens in ``input_ids`` if the caller already counted them on
    the host; the check against the features is then made on the host, without counting on the
    device (which would synchronise a GPU)."""
    model = unwrap(model)
    if image_token_id is None:
        image_token_id = llava_spec(model).image_token_id
    h = model.get_input_embeddings()(input_ids)
    if pixel_values is not None and pixel_values.shape[0]:
        feats = image_features(model, pixel_values.to(h.device, h.dtype)).to(h.dtype)
        mask = input_ids == image_token_id
        n = int(mask.sum()) if num_image_tokens is None else int(num_image_tokens)
        if n != feats.shape[0]:
            raise AdscInputError(f"the input has {n} image tokens but the images give {feats.shape[0]} feature rows")
        h = h.masked_scatter(mask[..., None], feats)
    return h


def image_runs(row: Sequence[int], image_token_id: int) -> List[Tuple[int, int]]:
    """``[(start, end), ...]``: the maximal runs of ``image_token_id`` in ``row`` (a list of ids)."""
    runs, p, n = [], 0, len(row)
    while p < n:
        if row[p] != image_token_id:
            p += 1
            continue
        q = p
        while q < n and row[q] == image_token_id:
            q += 1
        runs.append((p, q))
        p = q
    return runs


def count_images(row: Union[Sequence[int], torch.Tensor], spec: LlavaSpec, what: str = "the sequence") -> int:
    """Images in one sequence of token ids; :class:`AdscInputError` if a run of image tokens is
    not a whole number of images (spec section 3)."""
    if isinstance(row, torch.Tensor):
        row = row.reshape(-1).tolist()
    hw, (h, w) = spec.tokens_per_image, spec.grid
    n = 0
    for p, q in image_runs(row, spec.image_token_id):
        if (q - p) % hw:
            raise AdscInputError(
                f"{what}: image tokens must form whole images of {h}x{w} = {hw} tokens; got a run of "
                f"{q - p} image tokens (id {spec.image_token_id}) at position {p}"
            )
        n += (q - p) // hw
    return n


def rotary(model, hidden: torch.Tensor, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The text model's rotary ``(cos, sin)`` for ``position_ids [B, T]``: each ``[B, T, head_dim]``."""
    return text_model(model).rotary_emb(hidden, position_ids)
