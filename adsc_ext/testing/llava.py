"""Small random-weight LLaVA models built from configs (tests, examples, ``adsc generate --random``).

Nothing is downloaded: the vision tower is a CLIP vision model, the text model a LLaMA, both with
random weights. ``TinyProcessor`` stands in for LLaVA's processor: a byte-level tokenizer and an
image preprocessor that resizes to the tower's input size.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
from transformers import (AutoModelForImageTextToText, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration)

from ._weights import ready_random_model

__all__ = ["tiny_llava_config", "tiny_llava", "build_llava", "TinyProcessor", "llava15_7b_config"]

#: byte-level vocabulary: 0 pad, 1 bos, 2 eos, 3..258 bytes, then the image token
PAD, BOS, EOS, BYTE0 = 0, 1, 2, 3


def tiny_llava_config(
    *,
    grid_side: int = 4,
    patch_size: int = 4,
    num_layers: int = 6,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 300,
    vision_hidden: int = 32,
    vision_layers: int = 2,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config: CLIP tower with a ``grid_side x grid_side`` patch grid."""
    vision = CLIPVisionConfig(
        hidden_size=vision_hidden,
        intermediate_size=2 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        image_size=grid_side * patch_size,
        patch_size=patch_size,
        projection_dim=vision_hidden,
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=4096,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=vocab_size - 1,
        image_seq_length=grid_side * grid_side,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=PAD,
    )
    return cfg


def tiny_llava(seed: int = 0, attn_implementation: str = "sdpa", dtype=torch.float32, **kw) -> LlavaForConditionalGeneration:
    """A random-weight tiny LLaVA in eval mode (weights depend only on ``seed`` and the config)."""
    cfg = tiny_llava_config(**kw)
    torch.manual_seed(seed)
    model = build_llava(cfg, attn_implementation=attn_implementation, dtype=dtype)
    return ready_random_model(model, pad_token_id=PAD).eval()


def build_llava(config: LlavaConfig, attn_implementation: str = "sdpa", dtype=torch.float32) -> LlavaForConditionalGeneration:
    """A random-weight LLaVA from ``config`` (transformers' public ``from_config``). Build under
    ``with torch.device("cuda"):`` to allocate it on a GPU directly."""
    model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    if not isinstance(model, LlavaForConditionalGeneration):  # pragma: no cover - a changed auto mapping
        raise TypeError(f"from_config built a {type(model).__name__} for a LlavaConfig")
    return model


def llava15_7b_config() -> LlavaConfig:
    """The LLaVA-1.5-7B configuration (CLIP ViT-L/14-336 + Vicuna-7B shapes)."""
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )
    text = LlamaConfig(
        vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, pad_token_id=0,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=32000, image_seq_length=576,
        vision_feature_layer=-2, vision_feature_select_strategy="default", pad_token_id=0,
    )


class TinyProcessor:
    """Byte-level text + image preprocessing for :func:`tiny_llava` models.

    ``"<image>"`` in a prompt becomes ``H*W`` image tokens; a prompt with images but no
    ``"<image>"`` gets them in front.
    """

    def __init__(self, config: LlavaConfig):
        self.config = config
        v = config.vision_config
        self.image_size = v.image_size
        side = v.image_size // v.patch_size
        self.tokens_per_image = side * side
        self.image_token_id = config.image_token_id
        self.vocab_size = config.text_config.vocab_size

    def encode(self, text: str, num_images: int = 0) -> List[int]:
        parts = text.split("<image>")
        if len(parts) - 1 < num_images:
            parts = [""] * (num_images - (len(parts) - 1)) + parts
        ids = [BOS]
        for i, part in enumerate(parts):
            if i > 0:
                ids += [self.image_token_id] * self.tokens_per_image
            ids += [BYTE0 + b for b in part.encode("utf-8") if BYTE0 + b < self.image_token_id]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(t) - BYTE0 for t in ids if BYTE0 <= int(t) < BYTE0 + 256)
        return data.decode("utf-8", errors="replace")

    def images(self, images) -> torch.Tensor:
        """PIL images or ``[3, h, w]`` tensors -> pixel_values ``[N, 3, S, S]`` in [-1, 1]."""
        out = []
        for im in images:
            if not isinstance(im, torch.Tensor):
                import numpy as np

                im = torch.from_numpy(np.asarray(im.convert("RGB"), dtype="float32") / 255.0).permute(2, 0, 1)
            im = torch.nn.functional.interpolate(im[None].float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)[0]
            out.append(im * 2 - 1)
        return torch.stack(out)

    def __call__(self, text, images=None, padding_side: str = "left"):
        texts = [text] if isinstance(text, str) else list(text)
        imgs = list(images) if images is not None else []
        n_img = [t.count("<image>") for t in texts]
        if len(texts) == 1 and imgs and n_img[0] == 0:
            n_img = [len(imgs)]
        rows = [self.encode(t, n) for t, n in zip(texts, n_img)]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            sl = slice(width - len(r), width) if padding_side == "left" else slice(0, len(r))
            ids[b, sl] = torch.tensor(r)
            mask[b, sl] = 1
        out = {"input_ids": ids, "attention_mask": mask}
        if imgs:
            out["pixel_values"] = self.images(imgs)
        return out
