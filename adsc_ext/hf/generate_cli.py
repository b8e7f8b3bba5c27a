"""``adsc generate``: answer a prompt about an image with an ADSC model.

``--model PATH`` loads a local checkpoint of a supported architecture
(:data:`adsc_ext.models.checkpoint.SUPPORTED`: LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) and its
processor; ``--random`` (the default) builds a small random-weight LLaVA with LLaVA-1.5's 24x24
image grid, so it runs on any machine (its answer is noise; the timings and cache sizes are the
point). Prints the answer, the prefill and decode times, and the per-layer KV-cache sizes against
the unmodified model.

The prompt: the processor's chat template when it has one (the image entries first), else
LLaVA's ``USER: <image>\n... ASSISTANT:`` or Qwen's ``<|vision_start|><|image_pad|><|vision_end|>``
before the question. A Qwen-VL processor needs torchvision in transformers (its video processor);
without it the checkpoint's tokenizer and image processor are used as its processor would use them
(each ``<|image_pad|>`` expanded to the image's merged tokens), images only.
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
    src.add_argument("--model", metavar="PATH",
                     help="local checkpoint directory (with its processor): LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Qwen3-VL")
    src.add_argument("--random", action="store_true",
                     help="a built-in small random-weight LLaVA (24x24 image grid, 8 layers); the default")
    parser.add_argument("--image", action="append", default=[], metavar="FILE",
                        help="image file (repeat for several); --random without --image uses a synthetic image")
    parser.add_argument("--prompt", default="What is in this image?", help="the question; default: %(default)r")
    parser.add_argument("--schedule", default=None,
                        help="ADSC schedule 'layer:factor,...' ('' = unmodified); default: the checkpoint's "
                             f"config.adsc_schedule, else the architecture's (LLaVA-1.5: 8:2,16:2,24:2; others: "
                             f"factor 2 before layers L/4, L/2, 3L/4) ({RANDOM_SCHEDULE} with --random)")
    parser.add_argument("--max-new-tokens", type=int, default=32,
                        help="tokens to generate (greedy); default: %(default)s")
    parser.add_argument("--attn", default="sdpa", choices=["eager", "sdpa", "flash_attention_2"],
                        help="attention implementation; default: %(default)s")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on CUDA, float32 on CPU; default: %(default)s")
    parser.add_argument("--device", default=None,
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random weights / synthetic image; default: %(default)s")


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
            return (f"--model {args.model}: no such directory (a local checkpoint directory with "
                    "config.json is expected)")
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _check_checkpoint(path: str, schedule: Optional[str], dtype, device):
    """``(problem, info)``: a one-line reason why ``--model PATH`` cannot run here, read from its
    config.json and weight headers before any weight is (:mod:`adsc_ext.models.checkpoint`): an
    architecture adsc_ext does not support, a schedule that does not fit its layers or grid, or
    weights that do not fit in the memory available (None if it can); and the checkpoint's
    :class:`~adsc_ext.models.checkpoint.CheckpointInfo`."""
    from ..models.checkpoint import CheckpointError, check_fits, check_schedule, inspect_checkpoint
    from ..models.llava import AdscModelError
    from ..schedule import ScheduleError

    name = str(dtype).replace("torch.", "")
    info = None
    try:
        info = inspect_checkpoint(path, name, dtype.itemsize, where=f"--model {path}", command="generate")
        check_schedule(info, schedule)
        what = f"--model {path}: its weights ({info.counted_from})"
        hint = "--dtype bfloat16 halves them" if name == "float32" else ""
        check_fits(info.weight_bytes, what, "cpu", hint)  # from_pretrained loads on the host first
        if device.type == "cuda":
            check_fits(info.weight_bytes, what, device, hint)
    except (CheckpointError, AdscModelError, ScheduleError) as exc:
        return str(exc), info
    return None, info


def _load_processor(path: str, qwen: bool):
    """``(processor, chat template owner)`` of a checkpoint: its ``AutoProcessor``; for a Qwen-VL
    checkpoint whose processor transformers cannot build without torchvision (its video processor),
    :class:`_QwenImageProcessor` over the checkpoint's tokenizer and image processor."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        proc = AutoProcessor.from_pretrained(path)
        return proc, proc
    except ImportError:
        if not qwen:
            raise
    tok = AutoTokenizer.from_pretrained(path)
    try:
        image_processor = AutoImageProcessor.from_pretrained(path)
    except ImportError:  # transformers 5.17's AutoImageProcessor needs torchvision: Qwen's PIL processor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return _QwenImageProcessor(tok, image_processor), tok


class _QwenImageProcessor:
    """What ``Qwen2_5_VLProcessor`` does for images, from the checkpoint's tokenizer and image
    processor: each ``<|image_pad|>`` of the text becomes the next image's ``prod(grid_thw) / m^2``
    tokens; ``mm_token_type_ids`` marks them (1)."""

    def __init__(self, tokenizer, image_processor):
        self.tokenizer, self.image_processor = tokenizer, image_processor

    def __call__(self, images=None, text="", return_tensors="pt"):
        import torch

        out = {}
        pad = "<|image_pad|>"
        if images:
            vis = self.image_processor(images=images, return_tensors="pt")
            out.update(pixel_values=vis["pixel_values"], image_grid_thw=vis["image_grid_thw"])
            merge = self.image_processor.merge_size ** 2
            parts = text.split(pad)
            if len(parts) - 1 != len(images):
                raise ValueError(f"the prompt holds {len(parts) - 1} {pad} for {len(images)} images")
            text = parts[0] + "".join(pad * (int(g.prod()) // merge) + p for g, p in zip(vis["image_grid_thw"], parts[1:]))
        enc = self.tokenizer([text], return_tensors="pt")
        out.update(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        out["mm_token_type_ids"] = (enc["input_ids"] == self.tokenizer.convert_tokens_to_ids(pad)).to(torch.int32)
        return out

    def batch_decode(self, ids, **kw):
        return self.tokenizer.batch_decode(ids, **kw)


def _prompt_text(prompt: str, n_images: int, qwen: bool, template_owner) -> str:
    """The model's prompt: the chat template when there is one, else the architecture's plain form."""
    if getattr(template_owner, "chat_template", None):
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        return template_owner.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                  tokenize=False)
    if qwen:
        return "<|vision_start|><|image_pad|><|vision_end|>" * n_images + prompt
    if n_images and "<image>" not in prompt:
        prompt = "<image>\n" * n_images + prompt
    return f"USER: {prompt} ASSISTANT:"


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _random_model(seed: int, attn: str, dtype, device):
    from ..testing import tiny_llava

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
    from ..errors import AdscError
    from ..models.base import model_spec
    from ..schedule import Schedule, ScheduleError
    from ..sampling import pick_tokens
    from . import adsc_setup, apply_adsc
    from ._compat import cache_kwarg, output_cache

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
    info = None
    if args.model is not None:
        problem, info = _check_checkpoint(args.model, args.schedule, dtype, device)
        if problem:
            return _fail(problem)

    try:
        images = []
        if args.image:
            try:
                from PIL import Image
            except ImportError:
                return _fail(f"--image {args.image[0]}: reading image files needs Pillow "
                             "(pip install pillow; it comes with adsc_ext's [hf] extra)")
            for path in args.image:
                images.append(Image.open(path).convert("RGB"))

        if args.model:
            import transformers
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # errors stay one line on stderr
            qwen = info.architecture.model_type.startswith("qwen")
            try:  # a tokenizer's own exceptions (tokenizers' Exception, KeyError...) share no base class
                processor, template = _load_processor(args.model, qwen)
            except Exception as exc:
                return _fail(f"--model {args.model}: cannot load its tokenizer / processor ({_first_line(exc)})")
            cls = getattr(transformers, info.architecture.class_name)
            model = cls.from_pretrained(args.model, dtype=dtype, attn_implementation=args.attn)
            model.to(device).eval()
            try:
                text = _prompt_text(args.prompt, len(images), qwen, template)
                inputs = processor(images=images or None, text=text, return_tensors="pt")
            except Exception as exc:
                return _fail(f"--model {args.model}: its tokenizer / processor failed on the prompt and images "
                             f"({_first_line(exc)})")
            decode = lambda ids: processor.batch_decode([ids], skip_special_tokens=True)[0]  # noqa: E731
            eos = model.generation_config.eos_token_id
            default_schedule = getattr(model.config, "adsc_schedule", None)
            if default_schedule is None:
                default_schedule = model_spec(model).default_schedule()
        else:
            from ..testing import TinyProcessor

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
        spec = model_spec(model)
        try:  # checked here so the message names the model once
            spec.resolve_schedule(schedule)
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
    except (AdscError, OSError) as exc:
        return _fail(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)

    inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in dict(inputs).items()
              if isinstance(v, torch.Tensor)}
    eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
    try:
        with torch.no_grad():
            _sync(device)
            t0 = time.perf_counter()
            out = model(**inputs, use_cache=True, logits_to_keep=1)
            nxt = pick_tokens(out.logits[:, -1])[:, None]
            _sync(device)
            t_prefill = time.perf_counter() - t0
            cache = output_cache(out)
            cache_arg = cache_kwarg(model)  # `cache` from transformers 5.24, `past_key_values` before
            mask = inputs["attention_mask"]
            generated: List[int] = [int(nxt)]
            t1 = time.perf_counter()
            while len(generated) < args.max_new_tokens and generated[-1] not in eos_ids:
                mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
                out = model(input_ids=nxt, attention_mask=mask, use_cache=True, **{cache_arg: cache})
                nxt = pick_tokens(out.logits[:, -1])[:, None]
                generated.append(int(nxt))
            _sync(device)
            t_decode = time.perf_counter() - t1
    except oom as exc:
        return _fail(f"out of memory on {device} while generating ({str(exc).splitlines()[0]}); "
                     "try a shorter prompt or lower --max-new-tokens")
    except (AdscError, OSError) as exc:
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
