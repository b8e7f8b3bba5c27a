"""The one description of a LLaVA-1.5 model that every consumer of adsc_ext reads.

The Hugging Face integration (:mod:`adsc_ext.hf`), the serving engine (:mod:`adsc_ext.runtime`),
the FastV baseline (:mod:`adsc_ext.baselines`) and the ONNX export (:mod:`adsc_ext.export`) all
need the same facts about a ``transformers.LlavaForConditionalGeneration``: its image grid and
image token id, its decoder layers and their shapes, how images become embeddings, how rotary
embeddings are applied and how one decoder layer is split around its attention call. They get
them here, through the model's public modules (``model.model.language_model``, the layers'
``self_attn.{q,k,v,o}_proj``, ``input_layernorm``, ``mlp`` ...), so a transformers release that
moves something is met in one place.

- :func:`llava_spec` checks that a model is LLaVA-1.5 shaped and returns its :class:`LlavaSpec`;
- :func:`image_features` / :func:`embed_with_images`: projected image features, and the token
  embeddings with them scattered into the image-token rows (LLaVA's own rule);
- :func:`attention_inputs` / :func:`attention_output`: one decoder layer split around attention,
  so a runtime can put its own attention (paged, varlen, an ONNX ``Attention`` op) in between;
  ``tests/test_models.py`` checks them against transformers' own layer;
- :func:`image_runs` / :func:`count_images`: the runs of image tokens in a sequence (spec
  section 3), with the error every consumer gives for a broken image.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import torch

from ..schedule import LLAVA15_DEFAULT, Schedule, StageInfo

__all__ = [
    "AdscModelError",
    "AdscInputError",
    "LlavaSpec",
    "llava_spec",
    "unwrap",
    "text_model",
    "resolve_schedule",
    "image_features",
    "embed_with_images",
    "rotary",
    "apply_rotary",
    "attention_inputs",
    "attention_output",
    "image_runs",
    "count_images",
    "check_request",
]


class AdscModelError(TypeError):
    """The model is not a LLaVA-shaped model ADSC supports."""


class AdscInputError(ValueError):
    """Inputs an ADSC model cannot run: broken images, split images, mismatched features..."""


@dataclass(frozen=True)
class LlavaSpec:
    """What adsc_ext needs to know about a LLaVA-1.5 model (all read from its config and modules).

    grid: ``(H, W)`` vision tokens per image (LLaVA-1.5: 336 / 14 = 24 x 24).
    image_token_id: the placeholder token id of one vision token.
    """

    grid: Tuple[int, int]
    image_token_id: int
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    image_size: int  # the vision tower's input side in pixels
    max_positions: int
    rms_norm_eps: float
    scaling: float  # the attention's softmax scale (head_dim ** -0.5 for LLaMA)

    @property
    def tokens_per_image(self) -> int:
        return self.grid[0] * self.grid[1]

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K plus V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * dtype.itemsize


def _llava_class():
    try:
        from transformers import LlavaForConditionalGeneration
    except ImportError as exc:  # pragma: no cover - exercised only without transformers
        raise ImportError("adsc_ext's LLaVA support needs the 'transformers' package (>= 5.17)") from exc
    return LlavaForConditionalGeneration


def unwrap(model):
    """The LLaVA model under a PEFT (or similar) wrapper, or the model itself."""
    cls = _llava_class()
    for _ in range(4):
        if isinstance(model, cls) or not hasattr(model, "get_base_model"):
            break
        model = model.get_base_model()
    return model


def text_model(model):
    """The LLaMA-family language model (embeddings, decoder layers, final norm, rotary)."""
    return unwrap(model).model.language_model


def llava_spec(model) -> LlavaSpec:
    """Check that ``model`` is LLaVA-1.5 shaped and describe it.

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
    needed = ("embed_tokens", "layers", "norm", "rotary_emb")
    missing = [n for n in needed if text is None or not hasattr(text, n)]
    if missing:
        raise AdscModelError(
            f"ADSC expects a LLaMA-family text model with {', '.join(needed)}; "
            f"{type(text).__name__} lacks {', '.join(missing)}"
        )
    layers = text.layers
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        ok = attn is not None and all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
        ok = ok and all(hasattr(layer, p) for p in ("input_layernorm", "post_attention_layernorm", "mlp"))
        if not ok:
            raise AdscModelError(
                f"decoder layer {i} ({type(layer).__name__}) is not a LLaMA-family layer: it needs "
                f"input_layernorm, self_attn with q_proj/k_proj/v_proj/o_proj, post_attention_layernorm and mlp"
            )
    tcfg = text.config
    layer_types = getattr(tcfg, "layer_types", None)
    if layer_types is not None and any(t != "full_attention" for t in layer_types):
        raise AdscModelError(
            f"ADSC supports full causal attention in every layer; the text model has layer types "
            f"{sorted(set(layer_types))}"
        )
    if getattr(tcfg, "use_sliding_window", False) and getattr(tcfg, "sliding_window", None):
        raise AdscModelError("ADSC does not support sliding-window attention in the text model")

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
    num_heads = int(tcfg.num_attention_heads)
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // num_heads
    return LlavaSpec(
        grid=(side, side),
        image_token_id=int(image_token_id),
        num_layers=len(layers),
        hidden_size=int(tcfg.hidden_size),
        num_heads=num_heads,
        num_kv_heads=int(getattr(tcfg, "num_key_value_heads", None) or num_heads),
        head_dim=int(head_dim),
        vocab_size=int(tcfg.vocab_size),
        image_size=int(image_size),
        max_positions=int(getattr(tcfg, "max_position_embeddings", None) or (1 << 30)),
        rms_norm_eps=float(getattr(tcfg, "rms_norm_eps", 1e-6)),
        scaling=float(getattr(layers[0].self_attn, "scaling", int(head_dim) ** -0.5)),
    )


def resolve_schedule(config, schedule, num_layers: int, grid) -> Tuple[Schedule, List[StageInfo]]:
    """The schedule to run (the argument, else ``config.adsc_schedule``, else ``LLAVA15_DEFAULT``),
    checked against the model: ``(schedule, stage infos)``; ScheduleError if it does not fit."""
    if schedule is None:
        schedule = getattr(config, "adsc_schedule", None)
        if schedule is None:
            schedule = LLAVA15_DEFAULT
    sched = Schedule.coerce(schedule)
    return sched, sched.validate(num_layers, grid)  # its ScheduleError names the layers or the grid


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


def check_request(spec: LlavaSpec, i: int, req, max_new_tokens: int, error=AdscInputError):
    """Check request ``i`` of a ``generate(requests, ...)`` call (the engine's and the ONNX and
    TensorRT runners' format: ``{"input_ids": [n], "pixel_values": [k, 3, S, S] or None,
    "max_new_tokens": optional int}``). Returns ``(ids, pixel_values, num_images, max_new)``
    with ``ids`` int64 ``[n]`` on the host and ``pixel_values`` None without images; raises
    ``error`` (an exception class) with a message that starts ``request {i}:``."""

    def bad(msg):
        return error(f"request {i}: {msg}")

    if not isinstance(req, dict) or "input_ids" not in req:
        raise bad("must be a dict with 'input_ids' (1-D LongTensor) and optional 'pixel_values'")
    ids = req["input_ids"]
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise bad("input_ids must be an integer tensor")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1 or ids.numel() == 0:
        raise bad(f"input_ids must be a non-empty 1-D tensor, got shape {tuple(ids.shape)}")
    ids = ids.detach().to("cpu", torch.int64)  # requests live on the host until their prefill
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= spec.vocab_size:
        raise bad(f"token ids must be in [0, {spec.vocab_size}), got values in [{lo}, {hi}]")
    pix = req.get("pixel_values")
    n_img = 0
    if pix is not None:
        if not isinstance(pix, torch.Tensor) or pix.dim() != 4 or pix.shape[1] != 3:
            raise bad(f"pixel_values must be a [k, 3, H, W] tensor, got "
                      f"{tuple(pix.shape) if isinstance(pix, torch.Tensor) else type(pix).__name__}")
        if tuple(pix.shape[2:]) != (spec.image_size, spec.image_size):
            raise bad(f"images must be {spec.image_size}x{spec.image_size} for this model's vision tower, "
                      f"got {pix.shape[2]}x{pix.shape[3]}")
        n_img = int(pix.shape[0])
        pix = pix.detach() if n_img else None
    try:
        n_tok_img = count_images(ids, spec, what=f"request {i}")
    except AdscInputError as exc:
        raise error(str(exc)) from None
    if n_tok_img != n_img:
        raise bad(f"input_ids hold {n_tok_img} image(s) ({n_tok_img * spec.tokens_per_image} image tokens) but "
                  f"pixel_values has {n_img} image(s)")
    max_new = req.get("max_new_tokens", max_new_tokens)
    if isinstance(max_new, bool) or not isinstance(max_new, numbers.Integral) or max_new < 1:
        raise bad(f"max_new_tokens must be an int >= 1, got {max_new!r}")
    max_new = int(max_new)
    if ids.numel() + max_new > spec.max_positions:
        raise bad(f"prompt ({ids.numel()}) + max_new_tokens ({max_new}) exceeds the model's "
                  f"{spec.max_positions} positions")
    return ids, pix, n_img, max_new


# ---- one decoder layer, split around its attention --------------------------------------------


def rotary(model, hidden: torch.Tensor, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The text model's rotary ``(cos, sin)`` for ``position_ids [B, T]``: each ``[B, T, head_dim]``."""
    return text_model(model).rotary_emb(hidden, position_ids)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """LLaMA's rotary embedding on ``q, k [..., T, heads, head_dim]`` with ``cos, sin [..., T, head_dim]``."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def attention_inputs(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int):
    """The first half of a LLaMA decoder layer: ``(q, k, v)``, each ``[..., T, heads, head_dim]``
    (``k``, ``v`` with the KV heads), rotary applied, from ``hidden [..., T, hidden]``."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, head_dim)
    q = attn.q_proj(x).view(shape)
    k = attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape)
    q, k = apply_rotary(q, k, cos, sin)
    return q, k, v


def attention_output(layer, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The second half: the layer's output from its input ``hidden [..., T, hidden]`` and the
    attention result ``attn_out [..., T, heads, head_dim]``."""
    h = hidden + layer.self_attn.o_proj(attn_out.reshape(*attn_out.shape[:-2], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))
