"""Generate with an ADSC LLaVA model and compare its KV cache with the unmodified model's.

    python examples/generate_llava.py                      # built-in random tiny LLaVA
    python examples/generate_llava.py --model /path/llava-1.5-7b-hf --image cat.jpg

With a real checkpoint, the prompt follows LLaVA-1.5's "USER: <image>\\n... ASSISTANT:" format.
"""

import argparse
import time

import torch

from adsc_ext.hf import apply_adsc
from adsc_ext.testing import TinyProcessor, tiny_llava


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="local LLaVA-1.5 checkpoint; default: a random tiny LLaVA")
    ap.add_argument("--image", help="image file (needs Pillow); default: a random image")
    ap.add_argument("--prompt", default="Describe the image.")
    args = ap.parse_args()

    if args.model:
        from PIL import Image
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        processor = AutoProcessor.from_pretrained(args.model)
        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.bfloat16).eval()
        image = Image.open(args.image).convert("RGB")
        inputs = processor(images=image, text=f"USER: <image>\n{args.prompt} ASSISTANT:", return_tensors="pt")
        schedule = None  # config.adsc_schedule, else LLaVA-1.5's default 8:2,16:2,24:2
        decode = lambda ids: processor.batch_decode([ids], skip_special_tokens=True)[0]  # noqa: E731
    else:
        # LLaVA-1.5's 24x24 grid (336 px / 14 px patches), 8 tiny random layers
        model = tiny_llava(grid_side=24, patch_size=14, num_layers=8)
        processor = TinyProcessor(model.config)
        inputs = processor("<image>" + args.prompt, images=[torch.rand(3, 336, 336)])
        schedule = "2:2,4:2,6:2"  # 576 -> 288 -> 144 -> 72 image tokens
        decode = processor.decode

    apply_adsc(model, schedule)  # the model now runs ADSC; the schedule is in model.config
    print("schedule:", model.config.adsc_schedule)

    t = time.perf_counter()
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    print(f"generate: {time.perf_counter() - t:.2f} s")
    new = out.sequences[0, inputs["input_ids"].shape[1]:]
    print("answer:", repr(decode(new.tolist())))

    cache = out.past_key_values  # an adsc_ext.hf.AdscCache: each layer holds its stage's tokens
    full = out.sequences.shape[1] - 1  # what every layer of the unmodified model would hold
    for layer, n in enumerate(cache.layer_lengths()):
        print(f"layer {layer:2d}: {n:4d} cached tokens (unmodified: {full})")
    saved = 1 - sum(cache.layer_lengths()) / (full * len(cache.layer_lengths()))
    print(f"KV cache: {100 * saved:.1f} % smaller")


if __name__ == "__main__":
    main()
