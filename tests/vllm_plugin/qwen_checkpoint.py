"""A tiny random Qwen2.5-VL checkpoint that both vLLM and transformers load from one folder.

:func:`adsc_ext.testing.qwen.tiny_qwen` weights (head_dim 32: vLLM's CPU attention needs >= 32),
its word-level tokenizer with Qwen's special tokens and the real Qwen2-VL image processor, plus
a saved ``Qwen2_5_VLProcessor`` (vLLM's Qwen2.5-VL processor loads it; its video processor needs
torchvision, which the vLLM venv has). Images are random RGB pictures whose pixel sizes are
multiples of ``patch_size * merge`` (4 px), so an ``h x w``-token image is ``4h x 4w`` pixels and
the processor does not resize it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from engines import close_llm  # noqa: F401  (re-exported: the tests import it from here)
from engines import cpu_llm, greedy_params, hf_model

NUM_LAYERS = 6
VOCAB = 300
SCHEDULE = "2:2,4:2"  # a 4x6 grid -> 4x3 -> 2x3
UNIT = 4  # pixels per merged token side (patch 2, merge 2)
MAX_SIDE = 8  # the processor's largest image: 8x8 tokens (so a step of 64 tokens holds any image)
VISION = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
FPS = 24.0  # the frame rate both front ends assume for a video given as frames (transformers' default)


#: architecture -> (transformers' model class, its processor class)
CLASSES = {
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
}


def build_checkpoint(path, *, schedule: Optional[str] = None, seed: int = 0, arch: str = "qwen2_5_vl") -> Path:
    """Save the tiny Qwen2.5-VL (or Qwen2-VL: ``arch``; ``config.adsc_schedule`` when ``schedule``
    is given), its tokenizer and processor under ``path``; returns the path."""
    import transformers
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from adsc_ext.testing.qwen import qwen_image_processor, qwen_tokenizer, save_qwen_checkpoint, tiny_qwen

    path = Path(path)
    model = tiny_qwen(arch, seed=seed, num_layers=NUM_LAYERS, hidden_size=128, num_heads=4,
                      num_kv_heads=2, vocab_size=VOCAB, vision_hidden=64)
    if schedule is not None:
        model.config.adsc_schedule = schedule
    model_cls, processor_cls = CLASSES[arch]
    model.config.architectures = [model_cls]
    save_qwen_checkpoint(model, path)
    cfg = model.config
    qwen_image_processor(cfg, max_pixels=(UNIT * MAX_SIDE) ** 2).save_pretrained(path)
    vc = cfg.vision_config
    processor = getattr(transformers, processor_cls)(
        image_processor=qwen_image_processor(cfg, max_pixels=(UNIT * MAX_SIDE) ** 2),
        tokenizer=qwen_tokenizer(vocab_size=cfg.text_config.vocab_size),
        video_processor=Qwen2VLVideoProcessor(
            patch_size=vc.patch_size, merge_size=vc.spatial_merge_size, temporal_patch_size=vc.temporal_patch_size,
            size={"shortest_edge": (UNIT * 2) ** 2, "longest_edge": 4 * (UNIT * MAX_SIDE) ** 2},
        ),
    )
    processor.save_pretrained(path)
    return path


def random_image(seed: int, grid: Tuple[int, int]):
    """A random RGB image of ``grid`` (height, width) merged tokens."""
    import numpy as np
    from PIL import Image

    h, w = grid
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h * UNIT, w * UNIT, 3), dtype=np.uint8), "RGB")


def random_video(seed: int, frames: int, grid: Tuple[int, int]):
    """``frames`` random RGB frames ``[frames, 4h, 4w, 3]`` (uint8) of ``grid`` merged tokens: a
    video of ``frames / 2`` temporal patches."""
    import numpy as np

    h, w = grid
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, h * UNIT, w * UNIT, 3), dtype=np.uint8)


@dataclass(frozen=True)
class Request:
    name: str
    text: str  # with one VISION per image, one VIDEO per video
    images: Tuple[Tuple[int, int, int], ...]  # (seed, h, w) of each image, in order
    max_tokens: int
    videos: Tuple[Tuple[int, int, int, int], ...] = ()  # (seed, frames, h, w) of each video

    def pil_images(self):
        return [random_image(s, (h, w)) for s, h, w in self.images]

    def video_frames(self):
        return [random_video(s, f, (h, w)) for s, f, h, w in self.videos]

    @property
    def grids(self) -> List[Tuple[int, int]]:
        """Every image's grid and every video frame's (a temporal patch of 2 frames)."""
        return [(h, w) for _, h, w in self.images] + [(h, w) for _, f, h, w in self.videos for _ in range(f // 2)]

    def vllm_prompt(self) -> dict:
        p = {"prompt": self.text}
        data = {}
        if self.images:
            data["image"] = self.pil_images()
        if self.videos:
            data["video"] = [
                (v, {"fps": FPS, "frames_indices": list(range(len(v))), "total_num_frames": len(v),
                     "duration": len(v) / FPS, "video_backend": "opencv", "do_sample_frames": False})
                for v in self.video_frames()
            ]
        if data:
            p["multi_modal_data"] = data
        return p


#: images of different grids (odd sides too), one request with two, one text-only, a video of
#: two 4x4 temporal patches before a 3x4 image
REQUESTS = (
    Request("img_4x6", f"ab{VISION}cd", ((1, 4, 6),), 6),
    Request("text", "hello world", (), 5),
    Request("two_images", f"x{VISION}yz{VISION}w", ((2, 5, 3), (3, 8, 8)), 7),
    Request("img_2x2", f"{VISION}q", ((4, 2, 2),), 4),
    Request("video", f"q{VIDEO}r{VISION}st", ((5, 3, 4),), 6, videos=((9, 4, 4, 4),)),
)


def special_ids(config) -> List[int]:
    return [config.vision_start_token_id, config.vision_end_token_id, config.image_token_id, config.video_token_id]


def load_processor(path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def load_hf(path, adsc: bool):
    """transformers' Qwen2.5-VL / Qwen2-VL from ``path`` (with ``apply_adsc`` when ``adsc``),
    greedy-ready."""
    return hf_model(path, adsc)


def hf_greedy(model, processor, req: Request) -> List[int]:
    """transformers' greedy ``generate`` on one request alone (Qwen's special tokens suppressed,
    as :func:`greedy` does for vLLM); the new token ids."""
    enc = processor(text=[req.text], images=req.pil_images() or None, videos=req.video_frames() or None,
                    do_sample_frames=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=req.max_tokens, min_new_tokens=req.max_tokens, do_sample=False,
                             suppress_tokens=special_ids(model.config))
    return out[0, enc["input_ids"].shape[1]:].tolist()


def greedy(max_tokens: int, config=None):
    """Greedy sampling, EOS ignored, Qwen's special tokens never generated (a generated
    ``<|image_pad|>`` would be text to vLLM but an image token to transformers)."""
    return greedy_params(max_tokens, VOCAB, special_ids(config) if config is not None else ())


def make_llm(path, **kw):
    return cpu_llm(path, **{"max_model_len": 512, "limit_mm_per_prompt": {"image": 2, "video": 1}, **kw})
