"""Small random-weight LLaVA-NeXT and LLaVA-OneVision models, and their real processors.

Built from transformers' own config classes (nothing is downloaded): LLaVA-NeXT is a CLIP tower
with a LLaMA or Mistral decoder, LLaVA-OneVision a SigLIP tower with a Qwen2 decoder, both with the
released checkpoints' anyres geometry scaled down (crops of 56 pixels in patches of 14: a 4 x 4
grid per crop, so a prompt stays short). :func:`tiny_processor` builds transformers' own
``LlavaNextProcessor`` / ``LlavaOnevisionProcessor`` (their PIL image processors) around a tiny
word-level tokenizer, so the tests count placeholder tokens with the processors' own rules.

The OneVision processor is made without its video processor (transformers' needs torchvision);
videos are given as ``pixel_values_videos`` and their token count is the processor's
``replace_video_token``.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from transformers import (AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor, MistralConfig,
                          PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig)

from ._weights import ready_random_model

__all__ = [
    "NEXT_PINPOINTS", "ONEVISION_PINPOINTS", "WORDS", "tiny_llava_next_config", "tiny_llava_onevision_config",
    "tiny_llava_next", "tiny_llava_onevision", "tiny_tokenizer", "tiny_processor",
]

#: the word-level vocabulary of :func:`tiny_tokenizer`: specials, the placeholders, then words
WORDS = ["<pad>", "<unk>", "<s>", "</s>", "<image>", "<video>"] + [f"w{i}" for i in range(58)]
PAD, UNK, BOS, EOS, IMAGE, VIDEO = range(6)
CROP, PATCH = 56, 14  # 4 x 4 tokens per crop
#: LLaVA-v1.6's pinpoints (336-pixel crops: 1x2, 2x1, 2x2, 3x1, 1x3) in 56-pixel crops
NEXT_PINPOINTS = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
#: LLaVA-OneVision's pinpoints (every 1..6 x 1..6 crops of 384) up to 3 x 3 crops of 56
ONEVISION_PINPOINTS = [[56 * i, 56 * j] for i in range(1, 4) for j in range(1, 4)]


def _text_config(kind: str, *, num_layers: int, hidden_size: int, num_heads: int, num_kv_heads: int):
    common = dict(vocab_size=len(WORDS), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  max_position_embeddings=4096, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "mistral":  # llava-v1.6-mistral: full attention (sliding_window null)
        return MistralConfig(sliding_window=None, **common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"text model kind must be 'llama', 'mistral' or 'qwen2', got {kind!r}")


def tiny_llava_next_config(*, text: str = "mistral", num_layers: int = 6, hidden_size: int = 64,
                           num_heads: int = 4, num_kv_heads: int = 2, vision_hidden: int = 32,
                           vision_layers: int = 2, pinpoints: Optional[Sequence[Sequence[int]]] = None) -> LlavaNextConfig:
    """A LLaVA-NeXT config: CLIP tower (CLS dropped, feature layer -2), 56-pixel crops."""
    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=2, image_size=CROP,
                              patch_size=PATCH, projection_dim=vision_hidden)
    return LlavaNextConfig(
        vision_config=vision,
        text_config=_text_config(text, num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                                 num_kv_heads=num_kv_heads),
        image_token_index=IMAGE, vision_feature_layer=-2, vision_feature_select_strategy="default",
        image_grid_pinpoints=[list(p) for p in (pinpoints or NEXT_PINPOINTS)], pad_token_id=PAD,
    )


def tiny_llava_onevision_config(*, num_layers: int = 6, hidden_size: int = 64, num_heads: int = 4,
                                num_kv_heads: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
                                vision_aspect_ratio: str = "anyres_max_4",
                                pinpoints: Optional[Sequence[Sequence[int]]] = None) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision config: SigLIP tower (no CLS, no head, feature layer -1, "full"), Qwen2
    decoder, 56-pixel crops; ``anyres_max_4`` so that 3 x 3 crops are shrunk, as 6 x 6 are by
    the released ``anyres_max_9``."""
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=2, image_size=CROP,
                                patch_size=PATCH, vision_use_head=False)
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=_text_config("qwen2", num_layers=num_layers, hidden_size=hidden_size, num_heads=num_heads,
                                 num_kv_heads=num_kv_heads),
        image_token_index=IMAGE, video_token_index=VIDEO, vision_feature_layer=-1,
        vision_feature_select_strategy="full", vision_aspect_ratio=vision_aspect_ratio,
        image_grid_pinpoints=[list(p) for p in (pinpoints or ONEVISION_PINPOINTS)], pad_token_id=PAD,
    )


def _build(config, cls, seed: int, attn_implementation: str, dtype):
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    if not isinstance(model, cls):  # pragma: no cover - a changed auto mapping
        raise TypeError(f"from_config built a {type(model).__name__} for a {type(config).__name__}")
    return ready_random_model(model, pad_token_id=PAD).eval()


def tiny_llava_next(seed: int = 0, attn_implementation: str = "sdpa", dtype=torch.float32,
                    **kw) -> LlavaNextForConditionalGeneration:
    """A random-weight tiny LLaVA-NeXT in eval mode (weights depend only on ``seed`` and the config)."""
    return _build(tiny_llava_next_config(**kw), LlavaNextForConditionalGeneration, seed, attn_implementation, dtype)


def tiny_llava_onevision(seed: int = 0, attn_implementation: str = "sdpa", dtype=torch.float32,
                         **kw) -> LlavaOnevisionForConditionalGeneration:
    """A random-weight tiny LLaVA-OneVision in eval mode."""
    return _build(tiny_llava_onevision_config(**kw), LlavaOnevisionForConditionalGeneration, seed,
                  attn_implementation, dtype)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over :data:`WORDS` (whitespace-separated; ``<image>`` / ``<video>``
    are tokens of their own even without spaces around them)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"<image>|<video>"), behavior="isolated"), pre_tokenizers.WhitespaceSplit()])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>")
    out.padding_side = "left"
    return out


class _ImageOnlyOnevisionProcessor(LlavaOnevisionProcessor):
    """transformers' OneVision processor without the video processor (which needs torchvision)."""

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, **kwargs)
        self.video_processor = None


def tiny_processor(config):
    """The real processor of a tiny model's config (:func:`tiny_llava_next_config` or
    :func:`tiny_llava_onevision_config`): its PIL image processor with the config's crop size and
    pinpoints, :func:`tiny_tokenizer`, and the feature geometry of the config."""
    side = config.vision_config.image_size
    patch = config.vision_config.patch_size
    pinpoints = [list(p) for p in config.image_grid_pinpoints]
    if isinstance(config, LlavaOnevisionConfig):
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        images = LlavaOnevisionImageProcessorPil(size={"height": side, "width": side}, image_grid_pinpoints=pinpoints)
        return _ImageOnlyOnevisionProcessor(
            image_processor=images, tokenizer=tiny_tokenizer(), num_image_tokens=(side // patch) ** 2,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            vision_aspect_ratio=config.vision_aspect_ratio)
    if isinstance(config, LlavaNextConfig):
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        images = LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                            image_grid_pinpoints=pinpoints)
        return LlavaNextProcessor(image_processor=images, tokenizer=tiny_tokenizer(), patch_size=patch,
                                  vision_feature_select_strategy=config.vision_feature_select_strategy,
                                  num_additional_image_tokens=1)
    raise TypeError(f"expected a LlavaNextConfig or LlavaOnevisionConfig, got {type(config).__name__}")


def random_images(sizes: Sequence[Sequence[int]], seed: int = 0) -> List:
    """PIL images of ``(height, width)`` sizes with random pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for h, w in sizes]
