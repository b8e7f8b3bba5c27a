"""The model spec: everything adsc_ext needs to know about one multimodal architecture.

Every consumer of a model (the Hugging Face hooks, the serving engine, the ONNX graphs, the FastV
baseline) reads it through a :class:`ModelSpec`, never through the model's classes directly, so a
new architecture is one subclass here and nothing else:

- **facts** (attributes): decoder shape (``num_layers``, ``hidden_size``, ``num_heads``,
  ``num_kv_heads``, ``head_dim``, ``scaling``), ``vocab_size``, ``max_positions``,
  ``image_token_id``;
- **images** (:meth:`ModelSpec.plan_images`): how the plan finds each image's span and grid --
  runs of the image token with a fixed grid (LLaVA-1.5), or explicit spans read from the
  processor's outputs (a per-image grid, e.g. Qwen2-VL's ``image_grid_thw`` after the spatial
  merge, or LLaVA-OneVision's anyres grids whose rows end with a newline token);
- **positions** (:meth:`ModelSpec.position_ids`): the stage-0 position ids, any leading shape
  (``None``: each token's index in its sequence; M-RoPE models return ``[3, B, S]``). The layout
  keeps every component of a kept token's position; the next generated token of a row gets one
  past the largest position of the row (spec section 5, and Qwen2-VL's ``rope_deltas`` rule);
- **the decoder** (:attr:`ModelSpec.layers`, :meth:`embed`, :meth:`rotary`,
  :meth:`attention_inputs` / :meth:`attention_output`: one layer split around its attention,
  :meth:`logits`: final norm + LM head);
- **the default schedule** (spec section 2) and the request check of the serving loop.

:func:`model_spec` returns the spec of a model, dispatching on its Hugging Face class through the
registry that :func:`register_model_spec` fills (:mod:`adsc_ext.models.llava` registers LLaVA-1.5).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch

from ..errors import AdscInputError, AdscModelError
from ..schedule import Schedule, StageInfo

__all__ = [
    "ModelSpec",
    "model_spec",
    "register_model_spec",
    "registered_architectures",
    "unwrap",
    "default_schedule",
    "apply_rotary",
    "attention_inputs",
    "attention_output",
    "llama_family_facts",
    "Segment",
    "SegmentInputs",
]

@dataclasses.dataclass
class Segment:
    """One forward call's tokens, as the Hugging Face model pre-hook hands them to the spec
    (:meth:`ModelSpec.segment_inputs`): the prompt, a prefill chunk or a decode step.

    input_ids: int64 ``[B, q]`` (a packed batch: ``[1, T]``); a forward given ``inputs_embeds``
        gets placeholder ids where a row is a placeholder's embedding (``ModelSpec.placeholder_ids``).
    valid: bool ``[B, q]``: the segment's real tokens.
    padding_side: ``"left"`` or ``"right"``.
    packed_cu: int64 ``[n + 1]``: the sequences of a packed batch (None: a padded one).
    continuation: whether the segment continues a cache (a prefill chunk or a decode step).
    schedule: the model's schedule (a spec refuses images it cannot downsample).
    inputs: every other argument of the forward, by name -- ``position_ids`` (the caller's),
        ``pixel_values``, ``pixel_values_videos``, ``image_grid_thw``, ``video_grid_thw``,
        ``second_per_grid_ts``, ``image_sizes``, ``mm_encoder_outputs`` (``generate`` runs the vision
        tower first and passes its outputs instead of the pixels), ``mm_token_type_ids`` ... (not the
        forward's ``attention_mask``: ``valid`` is the segment's part of it).
    """

    input_ids: torch.Tensor
    valid: torch.Tensor
    padding_side: str
    packed_cu: Optional[torch.Tensor]
    continuation: bool
    schedule: Schedule
    inputs: Dict[str, Any]

    @property
    def layout(self) -> Dict[str, Any]:
        """The plan's layout arguments: ``cu_seqlens`` (packed) or ``attention_mask`` and
        ``padding_side`` (padded), with the matching ``input_ids`` under ``"input_ids"``."""
        if self.packed_cu is not None:
            return {"input_ids": self.input_ids.reshape(-1), "cu_seqlens": self.packed_cu.to(torch.int32)}
        return {"input_ids": self.input_ids, "attention_mask": self.valid, "padding_side": self.padding_side}


@dataclasses.dataclass
class SegmentInputs:
    """What a spec hands back for a :class:`Segment`.

    images: :func:`adsc_ext.stage_plan`'s image arguments for the segment (``{"image_spans": [N, 4]
        or [N, 5]}`` in the segment's padded or packed layout, or ``{"image_token_id", "grid"}``);
        None: plan nothing, the segment has every stage's layout (a decode step or a text chunk
        continuing a cache).
    position_ids: the segment's stage-0 position ids, any leading shape with the token dims last
        (M-RoPE: ``[4, B, q]``, the text index then the three rotary rows), counted from the
        segment's start: the hook adds the cache's next positions (:meth:`ModelSpec.next_positions`);
        None: each real token's index in the segment (the plan's).
    """

    images: Optional[Dict[str, Any]]
    position_ids: Optional[torch.Tensor] = None


# HF class name -> factory(model) -> ModelSpec
_REGISTRY: Dict[str, Callable[[Any], "ModelSpec"]] = {}


def register_model_spec(*class_names: str):
    """Class decorator: ``spec_cls.from_model(model)`` describes models of these HF classes."""

    def register(cls):
        for name in class_names:
            _REGISTRY[name] = cls.from_model
        return cls

    return register


def registered_architectures() -> Tuple[str, ...]:
    return tuple(_REGISTRY)


def _registered(model) -> Optional[Callable[[Any], "ModelSpec"]]:
    for cls in type(model).__mro__:
        if cls.__name__ in _REGISTRY:
            return _REGISTRY[cls.__name__]
    return None


def unwrap(model):
    """The Hugging Face model under a PEFT (or similar) wrapper, or the model itself."""
    for _ in range(4):
        if _registered(model) is not None or not hasattr(model, "get_base_model"):
            break
        model = model.get_base_model()
    return model


def model_spec(model) -> "ModelSpec":
    """The :class:`ModelSpec` of a Hugging Face model (PEFT wrappers are looked through).

    Raises :class:`~adsc_ext.errors.AdscModelError` for an architecture with no spec, or one whose
    shape ADSC cannot run (the spec's own checks)."""
    base = unwrap(model)  # (the package's __init__, run before this module, registered the built-in specs)
    factory = _registered(base)
    if factory is None:
        raise AdscModelError(
            f"ADSC supports transformers' {', '.join(_REGISTRY)}; got "
            f"{type(base).__module__}.{type(base).__name__}"
        )
    return factory(base)


def default_schedule(num_layers: int) -> str:
    """Spec section 2's default for a model without its own: factor 2 before layers ``round(L/4)``,
    ``round(L/2)`` and ``round(3L/4)`` (duplicates and layer 0 dropped)."""
    layers = sorted({round(num_layers * k / 4) for k in (1, 2, 3)} - {0})
    return ",".join(f"{layer}:2" for layer in layers if layer < num_layers)


# ---- one decoder layer, split around its attention (LLaMA-family layers: LLaMA, Qwen2, ...) -----


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotary embedding on ``q, k [..., T, heads, head_dim]`` with ``cos, sin [..., T, head_dim]``."""
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def attention_inputs(layer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int,
                     qk_norm: bool = False):
    """The first half of a LLaMA-family decoder layer: ``(q, k, v)``, each ``[..., T, heads,
    head_dim]`` (``k``, ``v`` with the KV heads), rotary applied, from ``hidden [..., T, hidden]``.
    ``qk_norm``: the attention's ``q_norm`` / ``k_norm`` (per-head RMSNorm, Qwen3) before the rotary."""
    attn = layer.self_attn
    x = layer.input_layernorm(hidden)
    shape = (*x.shape[:-1], -1, head_dim)
    q = attn.q_proj(x).view(shape)
    k = attn.k_proj(x).view(shape)
    v = attn.v_proj(x).view(shape)
    if qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = apply_rotary(q, k, cos, sin)
    return q, k, v


def attention_output(layer, hidden: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """The second half: the layer's output from its input ``hidden [..., T, hidden]`` and the
    attention result ``attn_out [..., T, heads, head_dim]``."""
    h = hidden + layer.self_attn.o_proj(attn_out.reshape(*attn_out.shape[:-2], -1))
    return h + layer.mlp(layer.post_attention_layernorm(h))


def llama_family_facts(text) -> Dict[str, Any]:
    """Check that ``text`` (a multimodal model's language model) is a LLaMA-family decoder ADSC can
    run, and return its facts: ``num_layers``, ``hidden_size``, ``num_heads``, ``num_kv_heads``,
    ``head_dim``, ``vocab_size``, ``max_positions``, ``rms_norm_eps``, ``scaling``.

    Raises :class:`AdscModelError` naming what does not fit: no ``embed_tokens`` / ``layers`` /
    ``norm`` / ``rotary_emb``, a layer without ``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm`` and ``mlp``, or attention that is not full and causal in every layer
    (layer types other than ``full_attention``, or a sliding window: Mistral's config has one unless
    it says ``sliding_window: null``)."""
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
    # Qwen2-style configs clear sliding_window unless use_sliding_window; Mistral's has no switch.
    if getattr(tcfg, "use_sliding_window", True) and getattr(tcfg, "sliding_window", None):
        raise AdscModelError(
            f"ADSC does not support sliding-window attention in the text model (its config has sliding_window="
            f"{tcfg.sliding_window}; checkpoints with full attention say null)"
        )
    num_heads = int(tcfg.num_attention_heads)
    head_dim = getattr(tcfg, "head_dim", None) or tcfg.hidden_size // num_heads
    return dict(
        num_layers=len(layers),
        hidden_size=int(tcfg.hidden_size),
        num_heads=num_heads,
        num_kv_heads=int(getattr(tcfg, "num_key_value_heads", None) or num_heads),
        head_dim=int(head_dim),
        vocab_size=int(tcfg.vocab_size),
        max_positions=int(getattr(tcfg, "max_position_embeddings", None) or (1 << 30)),
        rms_norm_eps=float(getattr(tcfg, "rms_norm_eps", 1e-6)),
        scaling=float(getattr(layers[0].self_attn, "scaling", int(head_dim) ** -0.5)),
    )


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What adsc_ext knows about one architecture; an instance describes one model.

    The fields here are the decoder facts every architecture has (:func:`llama_family_facts` reads
    all but ``image_token_id``). Subclasses are frozen dataclasses that add their own facts and
    ``model`` (the Hugging Face model, or None for a spec built from facts alone, e.g. an export
    manifest: then only the facts and the request check are available); they are built with
    keywords. Every method that runs the model goes through its public modules.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_positions: int
    rms_norm_eps: float
    scaling: float  # the attention's softmax scale (head_dim ** -0.5 for LLaMA)
    image_token_id: int

    name = "model"  # class attributes, not fields (a subclass may make name a property)
    model = None

    @classmethod
    def from_model(cls, model) -> "ModelSpec":  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def unbound(self) -> "ModelSpec":
        """The same facts without the model (what a hook keeps, so the model holds no reference
        to itself; an export manifest's spec is one too)."""
        return dataclasses.replace(self, model=None)

    def bind(self, model) -> "ModelSpec":
        """The same facts bound to ``model`` (a hook binds its unbound spec to the model it runs)."""
        return self if self.model is model else dataclasses.replace(self, model=model)

    @property
    def placeholder_ids(self) -> Tuple[int, ...]:
        """The token ids whose rows carry vision features (LLaVA: the image token; Qwen-VL: the
        image and the video token)."""
        return (self.image_token_id,)

    #: the leading shape of a token's position (``()``: one index; M-RoPE with a text row: ``(4,)``)
    position_lead: ClassVar[Tuple[int, ...]] = ()

    def check_runtime(self, runtime: str) -> None:
        """Refuse a runtime that cannot run this model (:class:`~adsc_ext.errors.AdscModelError`)."""

    def collate(self, requests: Sequence[Any]) -> Dict[str, Any]:
        """The processor outputs of several requests (their ``inputs``) as one batch's: each
        tensor concatenated over the requests that have it, in order (the keyword arguments of
        :meth:`embed` and :meth:`prepare` beside the token ids and ``pixel_values``)."""
        names: List[str] = []
        for r in requests:
            names += [k for k in r.inputs if k not in names]
        out: Dict[str, Any] = {}
        for name in names:
            parts = [torch.as_tensor(r.inputs[name]) for r in requests if r.inputs.get(name) is not None]
            if parts:
                out[name] = torch.cat(parts)
        return out

    # ---- the model ----------------------------------------------------------------------------
    def _bound(self):
        if self.model is None:
            raise AdscModelError(f"this {type(self).__name__} describes a model it does not hold (built from its "
                                 f"facts alone); build it with model_spec(model) to run the model")
        return self.model

    def text_model(self):
        """The decoder (embeddings, layers, final norm, rotary)."""
        raise NotImplementedError

    @property
    def layers(self) -> Sequence[Any]:
        """The decoder layers, in order."""
        return self.text_model().layers

    def embed(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None, *,
              num_image_tokens: Optional[int] = None, **inputs) -> torch.Tensor:
        """Token embeddings of ``input_ids`` (any shape) with the image features in the image rows."""
        raise NotImplementedError

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """The decoder's rotary ``(cos, sin)`` for ``position_ids`` (:meth:`position_ids`' shape):
        each ``[*token dims, head_dim]``, the token dims leading."""
        return self.text_model().rotary_emb(hidden, position_ids)

    def attention_inputs(self, layer, hidden, cos, sin):
        return attention_inputs(layer, hidden, cos, sin, self.head_dim)

    def attention_output(self, layer, hidden, attn_out):
        return attention_output(layer, hidden, attn_out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head: ``hidden [..., hidden]`` -> ``[..., vocab]``."""
        model = self._bound()
        return model.lm_head(self.text_model().norm(hidden))

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """Bytes of K plus V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * dtype.itemsize

    # ---- schedules ----------------------------------------------------------------------------
    def default_schedule(self) -> str:
        """The schedule used when neither the caller nor the checkpoint's config gives one."""
        return default_schedule(self.num_layers)

    def schedule_grid(self) -> Optional[Tuple[int, int]]:
        """The one image grid every image has (checked against the schedule), or None when each
        image has its own (then each image is checked when it is planned)."""
        return None

    def resolve_schedule(self, schedule=None, config=None) -> Tuple[Schedule, List[StageInfo]]:
        """The schedule to run (``schedule``, else ``config.adsc_schedule``, else
        :meth:`default_schedule`), checked against the model: ``(schedule, stage infos)``;
        :class:`~adsc_ext.errors.ScheduleError` if it does not fit."""
        if schedule is None and config is not None:
            schedule = getattr(config, "adsc_schedule", None)
        if schedule is None:
            schedule = self.default_schedule()
        sched = Schedule.coerce(schedule)
        return sched, sched.validate(self.num_layers, self.schedule_grid())

    # ---- images and positions -----------------------------------------------------------------
    def plan_images(self, input_ids: Optional[torch.Tensor], **inputs) -> Dict[str, Any]:
        """How :func:`adsc_ext.stage_plan` finds this batch's images: ``{"image_token_id": ...,
        "grid": (h, w)}`` (runs of the image token, a fixed grid) or ``{"image_spans": [N, 4]}``
        (rows of sequence, start, height, width from the processor's outputs in ``inputs``).
        ``inputs`` also holds the layout (``cu_seqlens`` or ``attention_mask`` and
        ``padding_side``) and the ``schedule`` (to refuse an image it cannot downsample)."""
        raise NotImplementedError

    def plan(self, schedule, input_ids: Optional[torch.Tensor], *, cu_seqlens=None, attention_mask=None,
             padding_side: str = "left", images: Optional[Dict[str, Any]] = None, **inputs):
        """The :class:`~adsc_ext.plan.Plan` of a batch (packed with ``cu_seqlens``, padded with
        ``attention_mask``; see :func:`adsc_ext.stage_plan`). ``images``: the image arguments
        already found (:meth:`plan_inputs`); else :meth:`plan_images` finds them from ``inputs``."""
        from ..ops import stage_plan

        if images is None:
            images = self.plan_images(input_ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                                      padding_side=padding_side, schedule=schedule, **inputs)
        ids = None if "image_spans" in images else input_ids  # spans replace the token scan
        return stage_plan(schedule, input_ids=ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                          padding_side=padding_side, **images)

    def plan_inputs(self, input_ids: torch.Tensor, *, cu_seqlens=None, attention_mask=None,
                    padding_side: str = "left", schedule=None, **inputs) -> SegmentInputs:
        """The image arguments of the plan and the stage-0 positions of a batch (packed with
        ``cu_seqlens`` and ``input_ids [T]``, padded with ``attention_mask`` and ``input_ids [B, S]``),
        from the processor's outputs in ``inputs``: :meth:`plan_images` and :meth:`position_ids`
        (an architecture that reads the same runs for both overrides this to read them once)."""
        layout = dict(cu_seqlens=cu_seqlens, attention_mask=attention_mask)
        return SegmentInputs(self.plan_images(input_ids, padding_side=padding_side, schedule=schedule, **layout, **inputs),
                             self.position_ids(input_ids, **layout, **inputs))

    def prepare(self, schedule, input_ids: torch.Tensor, *, cu_seqlens=None, attention_mask=None,
                padding_side: str = "left", **inputs):
        """``(plan, position_ids)`` of a batch: what a runtime builds its
        :class:`~adsc_ext.layout.StagedLayout` from (``StagedLayout.packed(stage_map, plan,
        position_ids=...)`` or ``.padded(...)``); ``position_ids`` None: the plan's."""
        got = self.plan_inputs(input_ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                               padding_side=padding_side, schedule=schedule, **inputs)
        plan = self.plan(schedule, input_ids, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                         padding_side=padding_side, images=got.images)
        return plan, got.position_ids

    # ---- the Hugging Face hooks' contract ---------------------------------------------------------
    def has_vision_inputs(self, inputs: Dict[str, Any]) -> bool:
        """Whether a forward's arguments carry vision features to place (pixels, or the vision
        tower's outputs that ``generate`` computes before the prefill)."""
        mm = inputs.get("mm_encoder_outputs") or {}
        return inputs.get("pixel_values") is not None or mm.get("image") is not None

    def segment_inputs(self, seg: Segment) -> SegmentInputs:
        """The plan's image arguments and the stage-0 positions of one forward segment (the
        Hugging Face model pre-hook's one question to the spec).

        A segment that continues a cache without vision inputs is laid out as it is (``images``
        None: a decode step, or a text chunk); one whose tokens hold placeholders without their
        features is refused (images are downsampled in the chunk that holds them). Otherwise the
        segment is planned from the processor's outputs (:meth:`plan_inputs`)."""
        if seg.packed_cu is None and seg.continuation and not self.has_vision_inputs(seg.inputs):
            if seg.input_ids.shape[-1] > 1 and self._holds_placeholders(seg.input_ids, seg.valid):
                raise AdscInputError(
                    "this prefill chunk continues a cache and holds image tokens but no pixel_values: "
                    "pass the chunk's images with it (images are downsampled in the chunk that holds them)"
                )
            return SegmentInputs(None, None)
        layout = seg.layout
        ids = layout.pop("input_ids")
        inputs = {k: v for k, v in seg.inputs.items() if k not in layout}
        return self.plan_inputs(ids, schedule=seg.schedule, **layout, **inputs)

    def _holds_placeholders(self, ids: torch.Tensor, valid: torch.Tensor) -> bool:
        hit = torch.zeros_like(valid)
        for tok in self.placeholder_ids:
            hit |= ids == tok
        return bool((hit & valid).any())

    def check_features(self, seg: Segment) -> None:
        """Checks of a planned segment's vision inputs against its tokens (after the plan, whose
        messages about the token layout come first); :class:`~adsc_ext.errors.AdscInputError`."""

    def next_positions(self, position_ids: torch.Tensor, valid: torch.Tensor,
                       previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The position of the next token of every row, ``[*lead, B]``, from a segment's stage-0
        ``position_ids [*lead, B, q]`` and its real tokens ``valid [B, q]``: one past the row's
        largest position, per component (spec section 5: ``n + t`` for a prompt of ``n`` tokens
        after ``t`` generated ones); a row without a real token keeps ``previous`` (0 if None)."""
        nxt = position_ids.masked_fill(~valid, torch.iinfo(position_ids.dtype).min).amax(dim=-1) + 1
        keep = previous if previous is not None else torch.zeros_like(nxt)
        return torch.where(valid.any(dim=-1), nxt, keep)

    def check_images(self, ids: torch.Tensor, valid: torch.Tensor, continuation: bool, packed_cu=None) -> None:
        """Raise a readable :class:`~adsc_ext.errors.AdscInputError` for a batch whose plan failed
        (e.g. naming a prefill chunk that splits an image); the plan's own message is used when
        this returns."""

    def position_ids(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
                     cu_seqlens: Optional[torch.Tensor] = None, **inputs) -> Optional[torch.Tensor]:
        """Stage-0 position ids of a batch (padded with ``attention_mask``, or packed with
        ``cu_seqlens``), any leading shape with the token dims last; None: each token's index
        among its sequence's real tokens (what the plan computes)."""
        return None

    # ---- requests (the serving loop's check) --------------------------------------------------
    def prompt_grids(self, input_ids: torch.Tensor, what: str = "the sequence", **inputs) -> List[Tuple[int, int]]:
        """The grid of every image one prompt holds (``input_ids [n]`` and its processor outputs),
        in order; :class:`~adsc_ext.errors.AdscInputError` naming ``what`` for broken images."""
        raise NotImplementedError

    def image_grids(self, i: int, request) -> List[Tuple[int, int]]:
        """The grid of every image of a checked request (its order in the prompt); raises
        :class:`~adsc_ext.errors.AdscInputError` (``request {i}: ...``) for images that do not match
        the prompt's image tokens."""
        raise NotImplementedError

    def check_request(self, i: int, request) -> List[Tuple[int, int]]:
        """Check request ``i`` (a :class:`~adsc_ext.generation.Request` whose generic fields are
        checked) against the model: token ids in the vocabulary, images matching their tokens, the
        prompt and its new tokens within the model's positions. Returns the image grids."""
        ids = request.input_ids
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise AdscInputError(f"request {i}: token ids must be in [0, {self.vocab_size}), got values in "
                                 f"[{lo}, {hi}]")
        grids = self.image_grids(i, request)
        if ids.numel() + request.max_new_tokens > self.max_positions:
            raise AdscInputError(f"request {i}: prompt ({ids.numel()}) + max_new_tokens ({request.max_new_tokens}) "
                                 f"exceeds the model's {self.max_positions} positions")
        return grids

    def stage_lengths(self, schedule: Schedule, num_tokens: int, grids: Sequence[Tuple[int, int]]) -> List[int]:
        """Tokens alive in every stage of a sequence of ``num_tokens`` tokens holding images of
        ``grids`` (spec section 4: each image downsampled on its own grid)."""
        return schedule.stage_lengths(num_tokens, grids)


def positive_int(name: str, value, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; a float, bool or string is refused rather than truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise AdscInputError(f"{name} must be >= {minimum}, got {value}")
    return int(value)
