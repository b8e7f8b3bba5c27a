"""``adsc generate``: answer a prompt about an image with an ADSC LLaVA model.

``--model PATH`` loads a local LLaVA-1.5 checkpoint and its processor; ``--random`` (the default)
builds a small random-weight LLaVA with LLaVA-1.5's 24x24 image grid, so it runs on any machine
(its answer is noise; the timings and cache sizes are the point). Prints the answer, the prefill
and decode times, and the per-layer KV-cache sizes against the unmodified model.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from typing import List, Optional

__all__ = ["add_arguments", "run"]

RANDOM_SCHEDULE = "2:2,4:2,6:2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH", help="local LLaVA-1.5 checkpoint directory (with its processor)")
    src.add_argument("--random", action="store_true",
                     help="a built-in small random-weight LLaVA (24x24 image grid, 8 layers); the default")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="image file (repeat for several); --random without --image uses a synthetic image")
    parser.add_argument("--prompt", default="What is in this image?", help="the question")
    parser.add_argument("--schedule", default=None,
                        help="ADSC schedule 'layer:factor,...' ('' = unmodified); default: the checkpoint's "
                             f"config.adsc_schedule, else 8:2,16:2,24:2 ({RANDOM_SCHEDULE} with --random)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens to generate (greedy); default: %(default)s")
    parser.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"],
                        help="attention implementation")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights / synthetic image")


def _fail(msg: str) -> int:
    print(f"adsc generate: error: {msg}", file=sys.stderr)
    return 2


def _resolve_device(torch, name: Optional[str]):
    """The torch.device for --device, or a one-line reason why it cannot run here."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu"), None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return None, f"--device {name!r}: expected cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return None, f"--device {name!r}: expected cpu, cuda or cuda:N"
    if device.type == "cuda":
        if torch.version.cuda is None:
            return None, (f"--device {name}: this PyTorch ({torch.__version__}) is a CPU-only build; "
                          "install a CUDA build of torch or use --device cpu")
        if not torch.cuda.is_available():
            return None, f"--device {name}: no CUDA GPU is visible to this PyTorch; use --device cpu"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return None, (f"--device {name}: there are {torch.cuda.device_count()} CUDA devices "
                          f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return device, None


def _check_paths(args) -> Optional[str]:
    """A one-line problem with --model / --image paths, before anything is loaded."""
    if args.model is not None:
        if not os.path.exists(args.model):
            return (f"--model {args.model}: no such directory (a local LLaVA-1.5 checkpoint "
                    "directory with config.json is expected)")
        if not os.path.isdir(args.model):
            return f"--model {args.model}: not a directory (a checkpoint directory with config.json is expected)"
        if not os.path.isfile(os.path.join(args.model, "config.json")):
            return f"--model {args.model}: no config.json in this directory: not a transformers checkpoint"
    for path in args.image:
        if os.path.isdir(path):
            return f"--image {path}: is a directory, not an image file"
        if not os.path.exists(path):
            return f"--image {path}: no such file"
    return None


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _random_model(seed: int, attn: str, dtype, device):
    from .tiny import tiny_llava

    return tiny_llava(seed=seed, attn_implementation=attn, dtype=dtype, grid_side=24, patch_size=14,
                      num_layers=8, hidden_size=64, vision_hidden=32, vision_layers=2).to(device)


def run(args) -> int:
    try:
        import torch
    except ImportError:
        return _fail("PyTorch is not installed")
    try:
        import transformers  # noqa: F401
    except ImportError:
        return _fail("the 'transformers' package is not installed (pip install transformers)")
    from ..models.llava import AdscInputError, AdscModelError, llava_spec
    from ..schedule import LLAVA15_DEFAULT, Schedule, ScheduleError
    from ..sampling import pick_tokens
    from . import adsc_setup, apply_adsc

    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    device, problem = _resolve_device(torch, args.device)
    if problem:
        return _fail(problem)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    if args.max_new_tokens < 1:
        return _fail(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.attn == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            return _fail("--attn flash_attention_2 needs the flash-attn package, which is not "
                         "installed (pip install flash-attn); use --attn sdpa or eager")
        if device.type != "cuda":
            return _fail("--attn flash_attention_2 runs on CUDA only; use --attn sdpa or eager on the CPU")
    if args.schedule is not None:
        try:
            Schedule.parse(args.schedule)
        except ScheduleError as exc:
            return _fail(f"--schedule: {exc}")
    problem = _check_paths(args)
    if problem:
        return _fail(problem)

    try:
        images = []
        if args.image:
            try:
                from PIL import Image
            except ImportError:
                return _fail(f"--image {args.image[0]}: reading image files needs Pillow "
                             "(pip install 'adsc_ext[hf]', or pillow)")
            for path in args.image:
                images.append(Image.open(path).convert("RGB"))

        if args.model:
            from transformers import AutoProcessor, LlavaForConditionalGeneration

            processor = AutoProcessor.from_pretrained(args.model)
            model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
            model.to(device).eval()
            prompt = args.prompt
            if images and "<image>" not in prompt:
                prompt = "<image>\n" * len(images) + prompt
            text = f"USER: {prompt} ASSISTANT:"
            inputs = processor(images=images or None, text=text, return_tensors="pt")
            decode = lambda ids: processor.batch_decode([ids], skip_special_tokens=True)[0]  # noqa: E731
            eos = model.generation_config.eos_token_id
            default_schedule = getattr(model.config, "adsc_schedule", None) or LLAVA15_DEFAULT
        else:
            from .tiny import TinyProcessor

            model = _random_model(args.seed, args.attn, dtype, device)
            processor = TinyProcessor(model.config)
            if not images:
                g = torch.Generator().manual_seed(args.seed)
                images = [torch.rand(3, 336, 336, generator=g)]
            inputs = processor(args.prompt, images=images)
            decode = processor.decode
            eos = None
            default_schedule = RANDOM_SCHEDULE
        schedule = Schedule.coerce(args.schedule if args.schedule is not None else default_schedule)
        spec = llava_spec(model)
        try:  # checked here so the message names the model once
            schedule.validate(spec.num_layers, spec.grid)
        except ScheduleError as exc:
            return _fail(str(exc))  # "schedule '9:2' does not fit a model with 8 decoder layers: ..."
        prompt_tokens = int(inputs["input_ids"].shape[-1])
        if prompt_tokens + args.max_new_tokens > spec.max_positions:
            return _fail(
                f"the prompt has {prompt_tokens} tokens (images included) and --max-new-tokens is "
                f"{args.max_new_tokens}, but the model has {spec.max_positions} positions: shorten "
                f"the prompt, use fewer images or lower --max-new-tokens"
            )
        apply_adsc(model, schedule)
    except oom as exc:
        return _fail(f"out of memory on {device} while loading the model ({str(exc).splitlines()[0]}); "
                     "try --dtype bfloat16 or a smaller model")
    except (OSError, ScheduleError, AdscModelError, ValueError) as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    inputs = {k: (v.to(device, dtype) if k == "pixel_values" else v.to(device)) for k, v in inputs.items()}
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    try:
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            nxt = pick_tokens(out.logits[:, -1])[:, None]
            _sync(device)
            t_prefill = time.perf_counter() - t0
            cache = out.past_key_values
            mask = inputs["attention_mask"]
            generated: List[int] = [int(nxt)]
            t1 = time.perf_counter()
            while len(generated) < args.max_new_tokens and generated[-1] not in eos_ids:
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
                nxt = pick_tokens(out.logits[:, -1])[:, None]
                generated.append(int(nxt))
            _sync(device)
            t_decode = time.perf_counter() - t1
    except oom as exc:
        return _fail(f"out of memory on {device} while generating ({str(exc).splitlines()[0]}); "
                     "try a shorter prompt or lower --max-new-tokens")
    except (AdscInputError, ValueError) as exc:
        return _fail(str(exc).splitlines()[0])

    prompt_len = int(inputs["attention_mask"].sum())
    n_dec = len(generated) - 1
    print(f"schedule: '{schedule}'" + ("  (empty: the unmodified model)" if not schedule else ""))
    print(f"answer: {decode(generated)!r}")
    print(f"prompt tokens: {prompt_len}; generated: {len(generated)}")
    print(f"prefill: {t_prefill * 1e3:.1f} ms")
    rate = f" ({n_dec / t_decode:.1f} tokens/s)" if n_dec and t_decode > 0 else ""
    print(f"decode:  {t_decode * 1e3:.1f} ms for {n_dec} steps{rate}")
    lengths, nbytes = cache.layer_lengths(), cache.layer_nbytes()
    full = inputs["input_ids"].shape[1] + len(generated) - 1
    stage_of = adsc_setup(model).stage_of_layer
    print("KV cache per layer (tokens, bytes) -- ADSC vs unmodified:")
    print(f"{'layer':>5} {'stage':>5} {'adsc tok':>9} {'base tok':>9} {'adsc bytes':>12} {'base bytes':>12}")
    tot_a = tot_b = 0
    for l, (n, b) in enumerate(zip(lengths, nbytes)):
        per_tok = b // n if n else 0
        base = per_tok * full
        tot_a, tot_b = tot_a + b, tot_b + base
        print(f"{l:>5} {stage_of[l]:>5} {n:>9} {full:>9} {b:>12} {base:>12}")
    red = 100.0 * (1 - tot_a / tot_b) if tot_b else 0.0
    print(f"total KV bytes: {tot_a} vs {tot_b} unmodified ({red:.1f} % less)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:  # python -m adsc_ext.hf.generate_cli
    parser = argparse.ArgumentParser(prog="adsc generate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
