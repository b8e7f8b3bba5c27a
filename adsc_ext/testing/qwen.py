"""Small random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL models, and their inputs (tests, examples).

Nothing is downloaded: the models come from transformers' own config classes
(``Qwen2VLConfig``, ``Qwen2_5_VLConfig``, ``Qwen3VLConfig``) with tiny sizes. The vision tower
keeps its real geometry (temporal patches of 2 frames, a 2x2 spatial merge, Qwen2.5's windows,
Qwen3's learned position embeddings and DeepStack mergers) at a small patch size, so an image of
``h x w`` merged tokens is ``2h x 2w`` patches of ``patch_size`` pixels.

- :func:`tiny_qwen` / :func:`tiny_qwen_config`: a random model of one of :data:`ARCHS`;
- :func:`qwen_inputs`: a padded batch of prompts with images and videos, laid out as the Qwen
  processors lay them out (``<|vision_start|>``, one placeholder per merged token,
  ``<|vision_end|>``; Qwen3 videos one run per temporal patch, each after a timestamp), with the
  processor's other outputs (``pixel_values`` patches, ``image_grid_thw``, ``mm_token_type_ids``...);
- :func:`qwen_tokenizer` / :func:`qwen_image_processor` / :func:`save_qwen_checkpoint`: a
  word-level tokenizer with Qwen's special tokens and the real Qwen2-VL image processor (no
  download), saved beside a tiny model as a checkpoint ``adsc generate --model`` can load.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._weights import ready_random_model

__all__ = ["ARCHS", "tiny_qwen_config", "tiny_qwen", "qwen_inputs", "split_inputs", "qwen_requests", "qwen_tokenizer",
           "qwen_image_processor", "save_qwen_checkpoint", "qwen25_vl_7b_config", "SPECIAL_TOKENS"]

#: architecture -> (config class, model class) names in transformers
ARCHS = {
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
}

#: Qwen's special tokens, in the order their ids follow the words of a tiny vocabulary
SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")

PAD, BOS, EOS = 0, 1, 2


def _transformers(name: str):
    import transformers

    return getattr(transformers, name)


def tiny_qwen_config(arch: str = "qwen2_5_vl", *, num_layers: int = 4, hidden_size: int = 64, num_heads: int = 4,
                     num_kv_heads: int = 2, vocab_size: int = 300, patch_size: int = 2, vision_hidden: int = 32,
                     vision_layers: int = 2, deepstack_layers: int = 2, adsc_schedule: Optional[str] = None):
    """A Qwen-VL config of ``arch`` with tiny sizes. The last four token ids of the vocabulary are
    ``<|vision_start|>``, ``<|vision_end|>``, ``<|image_pad|>``, ``<|video_pad|>``. Qwen3-VL
    injects DeepStack features after its first ``deepstack_layers`` decoder layers."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {arch!r}")
    head_dim = hidden_size // num_heads
    half = head_dim // 2
    ids = dict(vision_start_token_id=vocab_size - 4, vision_end_token_id=vocab_size - 3,
               image_token_id=vocab_size - 2, video_token_id=vocab_size - 1)
    text = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                max_position_embeddings=4096, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if arch == "qwen3_vl":
        t_sec = half - 2 * (half // 3)
        text.update(head_dim=head_dim, rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                            mrope_section=[t_sec, half // 3, half // 3],
                                                            mrope_interleaved=True))
        vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, num_heads=2,
                      out_hidden_size=hidden_size, patch_size=patch_size, num_position_embeddings=64,
                      deepstack_visual_indexes=list(range(deepstack_layers)))
    else:
        sec = [half - 2 * (half // 3), half // 3, half // 3]
        text.update(rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=sec))
        if arch == "qwen2_vl":
            vision = dict(depth=vision_layers, embed_dim=vision_hidden, hidden_size=hidden_size, num_heads=2,
                          mlp_ratio=2, patch_size=patch_size)
        else:  # Qwen2.5-VL: windowed attention (2x2 merged tokens per window), full attention in the last block
            vision = dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                          num_heads=2, out_hidden_size=hidden_size, patch_size=patch_size,
                          window_size=4 * patch_size, fullatt_block_indexes=[vision_layers - 1], tokens_per_second=2)
    cfg = _transformers(ARCHS[arch][0])(text_config=text, vision_config=vision, **ids)
    if adsc_schedule is not None:
        cfg.adsc_schedule = adsc_schedule
    return cfg


def tiny_qwen(arch: str = "qwen2_5_vl", seed: int = 0, attn_implementation: str = "sdpa", dtype=torch.float32,
              **kw):
    """A random-weight tiny Qwen-VL model of ``arch`` in eval mode (weights depend only on ``seed``
    and the config)."""
    from transformers import AutoModelForImageTextToText

    cfg = tiny_qwen_config(arch, **kw)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(cfg, attn_implementation=attn_implementation, dtype=dtype)
    if type(model).__name__ != ARCHS[arch][1]:  # pragma: no cover - a changed auto mapping
        raise TypeError(f"from_config built a {type(model).__name__} for a {ARCHS[arch][0]}")
    ready_random_model(model, pad_token_id=PAD, skip="embed_tokens")  # (the vision patch_embed too)
    model.generation_config.bos_token_id = BOS
    return model.eval()


# ---- inputs ----------------------------------------------------------------------------------------

#: one element of a prompt: text (a str: one token per character), ("image", h, w) or
#: ("video", t, h, w) in merged tokens (h x w tokens per temporal patch)
Item = Union[str, Tuple[Any, ...]]


def _text_ids(text: str, vocab_size: int) -> List[int]:
    span = vocab_size - 4 - 3  # ids 3 .. vocab-5 are "words"
    return [3 + (ord(c) % span) for c in text]


def qwen_inputs(model_or_config, rows: Sequence[Sequence[Item]], *, padding_side: str = "left", seed: int = 0,
                bos: bool = True, second_per_grid_ts: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """A padded batch of prompts for a Qwen-VL model, as its processor would give it.

    Each row is a list of items: text (a str, one token per character), ``("image", h, w)`` or
    ``("video", t, h, w)`` with ``h x w`` merged vision tokens per temporal patch (``2h x 2w``
    patches). An image is ``<|vision_start|>``, ``h*w`` ``<|image_pad|>``, ``<|vision_end|>``; a
    video likewise with ``t*h*w`` ``<|video_pad|>`` (Qwen3-VL: per temporal patch, a timestamp
    text token then ``<|vision_start|>``, ``h*w`` ``<|video_pad|>``, ``<|vision_end|>``). Pixel
    values are random patches (``[patches, 3 * 2 * p * p]``), images then videos each in prompt
    order across the batch, as the processor concatenates them.

    Returns ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` and, when present,
    ``pixel_values`` + ``image_grid_thw`` and ``pixel_values_videos`` + ``video_grid_thw`` (+
    ``second_per_grid_ts`` for Qwen2.5-VL videos when given).
    """
    cfg = getattr(model_or_config, "config", model_or_config)
    V = cfg.text_config.vocab_size
    vc = cfg.vision_config
    m, tps, p = vc.spatial_merge_size, vc.temporal_patch_size, vc.patch_size
    qwen3 = cfg.model_type == "qwen3_vl"
    patch_dim = vc.in_channels * tps * p * p
    g = torch.Generator().manual_seed(seed)
    seqs, img_grids, vid_grids = [], [], []
    for row in rows:
        ids: List[int] = [BOS] if bos else []
        for item in row:
            if isinstance(item, str):
                ids += _text_ids(item, V)
                continue
            kind, *dims = item
            if kind == "image":
                h, w = dims
                img_grids.append([1, h * m, w * m])
                ids += [cfg.vision_start_token_id] + [cfg.image_token_id] * (h * w) + [cfg.vision_end_token_id]
            elif kind == "video":
                t, h, w = dims
                vid_grids.append([t, h * m, w * m])
                if qwen3:
                    for k in range(t):
                        ids += _text_ids(f"{k}", V)  # the frame's timestamp text
                        ids += [cfg.vision_start_token_id] + [cfg.video_token_id] * (h * w) + [cfg.vision_end_token_id]
                else:
                    ids += [cfg.vision_start_token_id] + [cfg.video_token_id] * (t * h * w) + [cfg.vision_end_token_id]
            else:
                raise ValueError(f"unknown item {item!r}: expected text, ('image', h, w) or ('video', t, h, w)")
        seqs.append(ids)
    width = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, width), PAD, dtype=torch.long)
    mask = torch.zeros(B, width, dtype=torch.long)
    for b, s in enumerate(seqs):
        sl = slice(width - len(s), width) if padding_side == "left" else slice(0, len(s))
        input_ids[b, sl] = torch.tensor(s, dtype=torch.long)
        mask[b, sl] = 1
    mm = torch.zeros_like(input_ids, dtype=torch.int32)
    mm[input_ids == cfg.image_token_id] = 1
    mm[input_ids == cfg.video_token_id] = 2
    out: Dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": mask, "mm_token_type_ids": mm}
    if img_grids:
        grid = torch.tensor(img_grids, dtype=torch.long)
        out["pixel_values"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
        out["image_grid_thw"] = grid
    if vid_grids:
        grid = torch.tensor(vid_grids, dtype=torch.long)
        out["pixel_values_videos"] = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=g)
        out["video_grid_thw"] = grid
        if second_per_grid_ts is not None:
            out["second_per_grid_ts"] = torch.full((len(vid_grids),), float(second_per_grid_ts))
    return out


def split_inputs(inputs: Dict[str, torch.Tensor], config) -> List[Dict[str, torch.Tensor]]:
    """Each row of a :func:`qwen_inputs` batch as a batch of one, padding removed, with its own
    images and videos (what the row's processor call alone would give)."""
    mask = inputs["attention_mask"].bool()
    ids = inputs["input_ids"]
    rows = []
    counts = {"image": [], "video": []}
    qwen3 = config.model_type == "qwen3_vl"
    for b in range(ids.shape[0]):
        row = ids[b][mask[b]]
        for kind, tok in (("image", config.image_token_id), ("video", config.video_token_id)):
            n_runs = int(((row[1:] == tok) & (row[:-1] != tok)).sum() + (row[:1] == tok).sum())
            counts[kind].append(n_runs)
        rows.append(row)
    out = []
    starts = {"image": 0, "video": 0}
    patch_starts = {"image": 0, "video": 0}
    for b, row in enumerate(rows):
        one: Dict[str, torch.Tensor] = {"input_ids": row[None], "attention_mask": torch.ones(1, row.numel(), dtype=torch.long),
                                        "mm_token_type_ids": inputs["mm_token_type_ids"][b][mask[b]][None]}
        for kind, pix, grid in (("image", "pixel_values", "image_grid_thw"),
                                ("video", "pixel_values_videos", "video_grid_thw")):
            n = counts[kind][b]
            if kind == "video" and qwen3 and n:  # one run per temporal patch
                g_all = inputs[grid]
                k, runs = starts[kind], 0
                while runs < n:
                    runs += int(g_all[k, 0])
                    k += 1
                n = k - starts[kind]
            if not n:
                continue
            g = inputs[grid][starts[kind]:starts[kind] + n]
            rows_pix = int(g.prod(-1).sum())
            one[grid] = g
            one[pix] = inputs[pix][patch_starts[kind]:patch_starts[kind] + rows_pix]
            if kind == "video" and "second_per_grid_ts" in inputs:
                one["second_per_grid_ts"] = inputs["second_per_grid_ts"][starts[kind]:starts[kind] + n]
            starts[kind] += n
            patch_starts[kind] += rows_pix
        out.append(one)
    return out


def qwen_requests(inputs: Dict[str, torch.Tensor], config) -> list:
    """One serving :class:`~adsc_ext.generation.Request` per row of a :func:`qwen_inputs` batch: its
    ids, its patches and its other processor outputs (grids, ``second_per_grid_ts``), as the engine
    and the ONNX/TensorRT runners take them."""
    from ..generation import Request

    reqs = []
    for one in split_inputs(inputs, config):
        extra = {k: v for k, v in one.items() if k not in ("input_ids", "attention_mask", "pixel_values",
                                                              "mm_token_type_ids")}
        reqs.append(Request(one["input_ids"][0], one.get("pixel_values"), inputs=extra))
    return reqs


# ---- a processor -------------------------------------------------------------------------------------


def qwen_tokenizer(words: Sequence[str] = (), vocab_size: Optional[int] = None):
    """A word-level ``PreTrainedTokenizerFast`` with Qwen's special tokens: ``<pad>``, ``<s>``,
    ``</s>``, ``<unk>``, the printable ASCII characters, ``words``, then (at the end of the
    vocabulary when ``vocab_size`` is given) :data:`SPECIAL_TOKENS`. Text splits into special
    tokens, the given words and single characters."""
    import re

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = ["<pad>", "<s>", "</s>", "<unk>"] + [chr(c) for c in range(33, 127)] + list(words)
    if vocab_size is not None:
        if len(base) + len(SPECIAL_TOKENS) > vocab_size:
            raise ValueError(f"a vocabulary of {vocab_size} cannot hold {len(base) + len(SPECIAL_TOKENS)} tokens")
        base += [f"<unused{i}>" for i in range(vocab_size - len(base) - len(SPECIAL_TOKENS))]
    vocab = {w: i for i, w in enumerate(base + list(SPECIAL_TOKENS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    alternatives = [re.escape(s) for s in SPECIAL_TOKENS] + [re.escape(w) for w in sorted(words, key=len, reverse=True)]
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex("|".join(alternatives + ["."])), behavior="isolated"),
    ])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=list(SPECIAL_TOKENS))
    return fast


def qwen_image_processor(config, *, min_pixels: Optional[int] = None, max_pixels: Optional[int] = None):
    """The real Qwen2-VL image processor (its PIL backend: no torchvision) for a tiny Qwen2-VL /
    Qwen2.5-VL ``config``: images resized to multiples of ``patch_size * merge`` pixels, between
    ``min_pixels`` and ``max_pixels`` (default: 2x2 to 16x16 merged tokens)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vc = config.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    size = {"shortest_edge": min_pixels or (unit * 2) ** 2, "longest_edge": max_pixels or (unit * 16) ** 2}
    return Qwen2VLImageProcessorPil(patch_size=vc.patch_size, merge_size=vc.spatial_merge_size,
                                    temporal_patch_size=vc.temporal_patch_size, size=size)


def save_qwen_checkpoint(model, path) -> None:
    """Save a tiny Qwen-VL model as a checkpoint ``adsc generate --model`` / ``adsc export --model``
    load: the model, :func:`qwen_tokenizer` (its special token ids checked against the config) and
    :func:`qwen_image_processor`. (transformers builds a Qwen-VL *processor* only with torchvision,
    for its video processor; the folder holds the tokenizer and image processor it is made of.)"""
    cfg = model.config
    tok = qwen_tokenizer(vocab_size=cfg.text_config.vocab_size)
    for name, want in zip(SPECIAL_TOKENS, (cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id,
                                           cfg.video_token_id)):
        if tok.convert_tokens_to_ids(name) != want:
            raise ValueError(f"the tokenizer's {name} is {tok.convert_tokens_to_ids(name)}, the config's is {want}")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    qwen_image_processor(cfg).save_pretrained(path)


def qwen25_vl_7b_config():
    """The Qwen2.5-VL-7B-Instruct configuration (28 decoder layers, 3584 hidden, GQA 28/4, M-RoPE
    [16, 24, 24]; ViT of 32 blocks, patch 14, windows of 112 px, full attention at 7/15/23/31)."""
    return _transformers("Qwen2_5_VLConfig")(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                         rms_norm_eps=1e-6, rope_parameters=dict(rope_type="default", rope_theta=1e6,
                                                                 mrope_section=[16, 24, 24])),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                           patch_size=14, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    )
