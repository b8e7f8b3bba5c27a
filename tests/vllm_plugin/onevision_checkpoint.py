"""A tiny random LLaVA-OneVision checkpoint that both vLLM and transformers load from one folder.

:func:`adsc_ext.testing.llava_next.tiny_llava_onevision` weights (Qwen2 decoder with head_dim 32:
vLLM's CPU attention needs >= 32; a SigLIP tower of 56-pixel crops in 14-pixel patches, so every
crop is a 4x4 grid), ``anyres_max_9`` (vLLM's OneVision counts an image's tokens with 9 whatever
the config says), its word-level tokenizer and transformers' OneVision processor.

transformers 5 saves the SigLIP tower as ``vision_tower.embeddings...`` / ``.encoder...`` /
``.post_layernorm...``; vLLM 0.32's OneVision loads ``vision_tower.vision_model...`` and has no
post-layernorm (the feature layer is the last one, before it): :func:`build_checkpoint` renames
those keys and drops the two post-norm tensors, which transformers then reads back as missing
keys it does not use (the feature layer -1 is the encoder's output, before the post-norm).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from engines import close_llm  # noqa: F401  (re-exported: the tests import it from here)
from engines import cpu_llm, greedy_params, hf_model

NUM_LAYERS = 6
SCHEDULE = "2:4,4:4"  # 4x4 -> 2x2 -> 1x1; a 2-row high-resolution grid cannot take the second step
IMAGE = "<image>"
#: (height, width) pixels of an image whose high-resolution grid is 2x12: refused by SCHEDULE
BAD_SIZE = (40, 168)


def _rename(state):
    out = {}
    for k, v in state.items():
        if ".vision_tower.post_layernorm." in f".{k}":
            continue
        for p in ("model.vision_tower.", "vision_tower."):
            if k.startswith(p) and not k.startswith(p + "vision_model."):
                k = p + "vision_model." + k[len(p):]
                break
        out[k] = v
    return out


def build_checkpoint(path, *, schedule: Optional[str] = None, seed: int = 0) -> Path:
    """Save the tiny OneVision (``config.adsc_schedule`` when ``schedule`` is given), its tokenizer
    and processor under ``path``, with vLLM's tower key names; returns the path."""
    from safetensors.torch import load_file, save_file
    from transformers import LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_llava_onevision import LlavaOnevisionImageProcessor
    from transformers.models.llava_onevision.video_processing_llava_onevision import LlavaOnevisionVideoProcessor

    from adsc_ext.testing.llava_next import tiny_llava_onevision, tiny_tokenizer

    path = Path(path)
    model = tiny_llava_onevision(seed=seed, num_layers=NUM_LAYERS, hidden_size=128, num_heads=4, num_kv_heads=2,
                                 vision_hidden=64, vision_aspect_ratio="anyres_max_9")
    if schedule is not None:
        model.config.adsc_schedule = schedule
    model.config.architectures = ["LlavaOnevisionForConditionalGeneration"]
    model.save_pretrained(path)
    files = sorted(path.glob("*.safetensors"))
    assert len(files) == 1, files
    state = load_file(files[0])
    renamed = _rename(state)
    assert len(state) - len(renamed) == 2, "expected to drop the tower's post_layernorm weight and bias"
    save_file(renamed, files[0], metadata={"format": "pt"})
    cfg = model.config
    side = cfg.vision_config.image_size
    pinpoints = [list(p) for p in cfg.image_grid_pinpoints]
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size={"height": side, "width": side}, image_grid_pinpoints=pinpoints),
        tokenizer=tiny_tokenizer(),
        video_processor=LlavaOnevisionVideoProcessor(size={"height": side, "width": side}),
        num_image_tokens=(side // cfg.vision_config.patch_size) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
    )
    processor.save_pretrained(path)
    del model
    gc.collect()
    return path


def random_image(seed: int, size: Tuple[int, int]):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    h, w = size
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


@dataclass(frozen=True)
class Request:
    name: str
    text: str  # one IMAGE per image
    images: Tuple[Tuple[int, int, int], ...]  # (seed, height, width) pixels of each image
    max_tokens: int

    def pil_images(self):
        return [random_image(s, (h, w)) for s, h, w in self.images]

    def vllm_prompt(self) -> dict:
        p = {"prompt": self.text}
        if self.images:
            p["multi_modal_data"] = {"image": self.pil_images()[0] if len(self.images) == 1 else self.pil_images()}
        return p


#: images of different sizes (crops 2x3, 1x1, 1x3, 3x2 -> high-resolution grids 8x12, 4x4, 4x12,
#: 12x8 after unpadding), two in one request, and a text-only request
REQUESTS = (
    Request("img_100x150", f"w1 w2 {IMAGE} w3 w4", ((1, 100, 150),), 6),
    Request("text", "w5 w6 w7", (), 5),
    Request("img_56x56", f"{IMAGE} w8", ((2, 56, 56),), 4),
    Request("img_60x170", f"w9 {IMAGE} w10 w11", ((3, 60, 170),), 7),
    Request("img_130x80", f"w12 {IMAGE}", ((4, 130, 80),), 5),
    # two images in one prompt: transformers' processor (a flat image list) and vLLM's both give
    # each its full anyres layout
    Request("two_images", f"w13 {IMAGE} w14 {IMAGE} w15", ((5, 100, 150), (6, 60, 170)), 6),
)


def load_processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def load_hf(path, adsc: bool):
    """transformers' OneVision from ``path`` (with ``apply_adsc`` when ``adsc``), greedy-ready."""
    return hf_model(path, adsc)


def special_ids(config) -> List[int]:
    """Tokens never generated: the placeholders, and the pad token (its embedding row is zero, so
    a generated pad would write all-zero K/V in the first layer, which the KV tests cannot see)."""
    return [config.image_token_id, config.video_token_id, config.text_config.pad_token_id or 0]


def hf_greedy(model, processor, req: Request) -> List[int]:
    """transformers' greedy ``generate`` on one request alone; the new token ids."""
    enc = processor(text=[req.text], images=req.pil_images() or None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=req.max_tokens, min_new_tokens=req.max_tokens, do_sample=False,
                             suppress_tokens=special_ids(model.config))
    return out[0, enc["input_ids"].shape[1]:].tolist()


def greedy(max_tokens: int, config):
    """Greedy sampling, EOS ignored, the placeholder tokens never generated."""
    return greedy_params(max_tokens, config.text_config.vocab_size, special_ids(config))


def make_llm(path, **kw):
    return cpu_llm(path, **{"max_model_len": 512, "limit_mm_per_prompt": {"image": 2, "video": 0}, **kw})
