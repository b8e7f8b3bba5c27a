"""A tiny random LLaVA-1.5 checkpoint that both vLLM and transformers load from one folder.

vLLM's LLaVA path needs what a published llava-hf checkpoint has: a tokenizer (its multimodal
processor works on text), a saved ``LlavaProcessor`` (CLIP image processor + tokenizer) and
weights under the names vLLM's loader maps. Everything is built here from configs (nothing is
downloaded): a word-level tokenizer whose vocabulary is ``w0 .. wN`` plus ``<image>`` at the
model's image token id, a CLIP image processor at the tower's input size, and
:func:`adsc_ext.testing.tiny_llava` weights with head_dim 32 (vLLM's CPU attention needs >= 32).
"""

from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from engines import close_llm  # noqa: F401  (re-exported: the tests import it from here)
from engines import cpu_llm, greedy_params, hf_model

GRID_SIDE = 4  # 4x4 vision tokens per image
PATCH = 4
NUM_LAYERS = 6
VOCAB = 300  # ids: 0 <pad>, 1 <s>, 2 </s>, 3.. words, VOCAB-1 <image>
SCHEDULE = "2:2,4:2"  # 4x4 -> 4x2 -> 2x2 vision tokens per image
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN_ID = VOCAB - 1
NUM_WORDS = VOCAB - 4


def word(i: int) -> str:
    return f"w{i}"


def _tokenizer(vocab_size: int = VOCAB, image_token_id: int = IMAGE_TOKEN_ID):
    """A word-level tokenizer: ``<pad> <s> </s>`` at 0 1 2, the words ``w0 ..`` from id 3,
    ``<unk>`` and ``<image>`` (at ``image_token_id``) at the top of ``vocab_size``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    vocab.update({word(i): 3 + i for i in range(min(image_token_id, vocab_size - 1) - 4)})
    vocab["<unk>"] = min(image_token_id, vocab_size - 1) - 1  # not a word
    vocab["<image>"] = image_token_id
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"},
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


def save_processor(path, config) -> None:
    """Save a ``LlavaProcessor`` for the LLaVA ``config`` under ``path``: the word-level
    tokenizer over its vocabulary and a CLIP image processor at its tower's input size."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    vision = config.vision_config
    side = int(vision.image_size)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side},
        do_center_crop=True, do_resize=True, do_normalize=True,
    )
    tokenizer = _tokenizer(int(config.text_config.vocab_size), int(config.image_token_id))
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=int(vision.patch_size),
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>",
    )
    processor.save_pretrained(path)


def save_config_checkpoint(path, config, *, schedule: Optional[str] = None) -> Path:
    """A checkpoint folder without weights (config, tokenizer, processor) for vLLM's
    ``load_format="dummy"`` (random weights): benchmarks of real model shapes, nothing to load."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config.__class__.from_dict(config.to_dict())
    config.architectures = ["LlavaForConditionalGeneration"]
    config.text_config.eos_token_id = EOS
    if schedule is not None:
        config.adsc_schedule = schedule
    config.save_pretrained(path)
    save_processor(path, config)
    return path


def build_checkpoint(
    path, *, schedule: Optional[str] = None, seed: int = 0, grid_side: int = GRID_SIDE
) -> Path:
    """Save the tiny model (with ``config.adsc_schedule`` when ``schedule`` is given), its
    tokenizer and processor under ``path``; returns the path. ``grid_side``: vision tokens per
    image side (the tower's input is ``grid_side * PATCH`` pixels square)."""
    from adsc_ext.testing import tiny_llava

    path = Path(path)
    model = tiny_llava(
        seed=seed, grid_side=grid_side, patch_size=PATCH, num_layers=NUM_LAYERS, hidden_size=128,
        num_heads=4, num_kv_heads=2, vocab_size=VOCAB, vision_hidden=64, vision_layers=2,
    )
    if schedule:
        from adsc_ext import apply_adsc

        apply_adsc(model, schedule)
    model.config.text_config.eos_token_id = EOS
    model.save_pretrained(path)
    _classic_vision_keys(path / "model.safetensors")
    save_processor(path, model.config)
    return path


def _classic_vision_keys(file: Path) -> None:
    """Rename the vision tower's weights to the layout of the published llava-hf checkpoints.

    transformers 5.19 saves them as ``vision_tower.embeddings...`` (no ``vision_model.``); vLLM
    0.32's CLIP loader expects ``vision_tower.vision_model.embeddings...`` and skips what it does
    not know. transformers loads both layouts to the same weights (``test_checkpoint_layouts``).
    """
    from safetensors.torch import load_file, save_file

    state = load_file(str(file))
    prefix, classic = "vision_tower.", "vision_tower.vision_model."
    renamed = {
        (classic + k[len(prefix):] if k.startswith(prefix) and not k.startswith(classic) else k): v
        for k, v in state.items()
    }
    save_file(renamed, str(file), metadata={"format": "pt"})


def load_processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def prompt(words: List[int], images: int = 0, image_at: Optional[List[int]] = None) -> str:
    """A prompt of the given word ids with ``images`` ``<image>`` markers, inserted before the
    word indices ``image_at`` (default: all at the front)."""
    at = list(image_at) if image_at is not None else [0] * images
    parts = []
    for i, w in enumerate(words):
        parts += ["<image>"] * at.count(i)
        parts.append(word(w))
    parts += ["<image>"] * at.count(len(words))
    return " ".join(parts)


def random_image(seed: int, size=(24, 20)):
    """A small random RGB PIL image (resized and cropped by the processor)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


@dataclass(frozen=True)
class Request:
    name: str
    text: str
    images: Tuple[int, ...]  # seeds of random_image
    max_tokens: int

    def pil_images(self):
        return [random_image(s, (24 + 6 * s, 20 + 4 * s)) for s in self.images]

    def vllm_prompt(self) -> dict:
        p = {"prompt": self.text}
        if self.images:
            p["multi_modal_data"] = {"image": self.pil_images()}
        return p


#: Prompts of different lengths with 0, 1 and 2 images (adjacent images form one run of
#: image tokens), finishing after different numbers of steps.
REQUESTS = (
    Request("text4", prompt([5, 6, 7, 8]), (), 10),
    Request("img1", prompt([5, 6, 7, 8], 1), (1,), 6),
    Request("img2", prompt([9, 10, 11], 2, image_at=[1, 3]), (2, 3), 12),
    Request("text9", prompt(list(range(20, 29))), (), 3),
    Request("img1_mid", prompt([30, 31, 32, 33, 34, 35, 36], 1, image_at=[4]), (4,), 8),
    Request("img2_adjacent", prompt([40, 41], 2, image_at=[1, 1]), (5, 6), 5),
)


def load_hf(path, adsc: bool):
    """transformers' LLaVA from ``path`` (with ``apply_adsc`` when ``adsc``), greedy-ready."""
    return hf_model(path, adsc, pad_token_id=PAD)


def hf_greedy(model, processor, req: Request) -> List[int]:
    """transformers' greedy ``generate`` on one request alone; returns the new token ids."""
    enc = processor(text=req.text, images=req.pil_images() or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=req.max_tokens, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def greedy(max_tokens: int, config=None):  # config: the other architectures' signature
    return greedy_params(max_tokens)


def make_llm(path, **kw):
    return cpu_llm(path, **{"max_model_len": 256, "limit_mm_per_prompt": {"image": 2}, **kw})
