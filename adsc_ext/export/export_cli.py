"""``adsc export``: write a LLaVA-1.5 model with the ADSC schedule baked in as ONNX graphs.

``--model PATH`` exports a local LLaVA-1.5 checkpoint; without it (``--random``, the default) a
small random-weight LLaVA with LLaVA-1.5's 24x24 image grid, so the command runs anywhere.
``--check`` then runs the folder once on ONNX Runtime (:class:`~adsc_ext.export.OnnxRunner`)
against the PyTorch model (:class:`~adsc_ext.runtime.Engine`, same schedule) and prints the largest
first-step logit difference and whether the greedy tokens agree (exit status 1 if they do not).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional

__all__ = ["add_arguments", "run"]

RANDOM_SCHEDULE = "2:2,4:2,6:2"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    src = parser.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH", help="local LLaVA-1.5 checkpoint directory")
    src.add_argument("--random", action="store_true",
                     help="a built-in small random-weight LLaVA (24x24 image grid, 8 layers); the default")
    parser.add_argument("--out", default="adsc_onnx", metavar="DIR", help="output folder; default: %(default)s")
    parser.add_argument("--force", action="store_true", help="overwrite an export already in --out")
    parser.add_argument("--schedule", default=None,
                        help="ADSC schedule 'layer:factor,...' ('' = unmodified); default: the checkpoint's "
                             f"config.adsc_schedule, else 8:2,16:2,24:2 ({RANDOM_SCHEDULE} with --random)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the exported weights and activations; default: %(default)s")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (>= 18; the Attention op needs >= 23); default: 23")
    parser.add_argument("--compaction", default="onnx", choices=["onnx", "plugin"],
                        help="token compaction as standard ONNX ops (default) or AdscCompactTokens plugin "
                             "nodes for TensorRT")
    parser.add_argument("--check", action="store_true",
                        help="run the export on ONNX Runtime against the PyTorch model")
    parser.add_argument("--check-tokens", type=int, default=8, metavar="N",
                        help="new tokens per request in --check; default: %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights / synthetic image")


def _fail(msg: str) -> int:
    print(f"adsc export: error: {' '.join(str(msg).split())}", file=sys.stderr)
    return 2


def _random_model(seed: int, dtype):
    from ..hf.tiny import tiny_llava

    return tiny_llava(seed=seed, dtype=dtype, grid_side=24, patch_size=14, num_layers=8, hidden_size=64,
                      vision_hidden=32, vision_layers=2)


def _load_checkpoint(path: str, dtype):
    from transformers import AutoConfig, LlavaForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # errors stay one line on stderr
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path}: no such checkpoint directory")
    cfg = AutoConfig.from_pretrained(path)
    if getattr(cfg, "model_type", None) != "llava":
        raise ValueError(f"--model {path}: a {getattr(cfg, 'model_type', '?')!r} checkpoint; adsc export needs "
                         f"a LLaVA-1.5 (model_type 'llava') checkpoint")
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()


def _check_requests(model, seed: int):
    """Two requests: a question with one image, and plain text (so both row kinds are checked)."""
    import torch

    from ..models.llava import llava_spec

    spec = llava_spec(model)
    g = torch.Generator().manual_seed(seed)
    side = spec.image_size
    pix = torch.rand(1, 3, side, side, generator=g) * 2 - 1
    vocab = min(spec.vocab_size, spec.image_token_id) if spec.image_token_id > 8 else spec.vocab_size
    text = lambda n: torch.randint(3, vocab, (n,), generator=g)  # noqa: E731
    img = torch.full((spec.tokens_per_image,), spec.image_token_id)
    return [{"input_ids": torch.cat([text(3), img, text(9)]), "pixel_values": pix},
            {"input_ids": text(17), "pixel_values": None}]


def _check(model, folder: Path, schedule, n: int, seed: int) -> int:
    from ..runtime import Engine
    from .runner import OnnxRunner

    dtype = next(model.parameters()).dtype
    reqs = _check_requests(model, seed)
    reqs = [{k: (v.to(dtype) if k == "pixel_values" and v is not None else v) for k, v in r.items()} for r in reqs]
    t0 = time.perf_counter()
    runner = OnnxRunner(folder, schedule=schedule)
    got = runner.generate(reqs, max_new_tokens=n, return_logits=True)
    t_ort = time.perf_counter() - t0
    want = Engine(model, schedule).generate(reqs, max_new_tokens=n, return_logits=True)
    diff = max(float((g[1][0] - w[1][0].float()).abs().max()) for g, w in zip(got, want))
    agree = all(g[0] == w[0] for g, w in zip(got, want))
    print(f"check: ONNX Runtime ({', '.join(runner.providers)}) vs PyTorch, {len(reqs)} requests (1 and 0 images), "
          f"{n} new tokens each, in {t_ort:.1f} s")
    print(f"check: largest first-step logit difference {diff:.3g}")
    print(f"check: greedy tokens {'agree' if agree else 'DIFFER'}")
    if not agree:
        for i, (g, w) in enumerate(zip(got, want)):
            if g[0] != w[0]:
                print(f"  request {i}: onnx {g[0]} vs torch {w[0]}")
    return 0 if agree else 1


def run(args) -> int:
    try:
        import torch

        from .onnx_export import DEFAULT_OPSET, export_onnx, prepare_folder, require_onnx
        require_onnx()
    except ImportError as exc:
        return _fail(str(exc))
    from ..models.llava import AdscInputError, AdscModelError
    from ..schedule import Schedule, ScheduleError
    from .manifest import ExportError

    dtype = getattr(torch, args.dtype)
    if args.check_tokens < 1:
        return _fail(f"--check-tokens must be >= 1, got {args.check_tokens}")
    try:
        prepare_folder(Path(args.out), args.force)  # before any model is loaded
        if args.model:
            model = _load_checkpoint(args.model, dtype)
            schedule = args.schedule
            source = str(Path(args.model).resolve())
        else:
            model = _random_model(args.seed, dtype)
            schedule = RANDOM_SCHEDULE if args.schedule is None else args.schedule
            source = f"random tiny LLaVA (seed {args.seed}, 24x24 grid, 8 layers)"
        if schedule is not None:
            schedule = Schedule.coerce(schedule)
        out = Path(args.out)
        t0 = time.perf_counter()
        manifest = export_onnx(model, out, schedule, opset=DEFAULT_OPSET if args.opset is None else args.opset,
                               compaction=args.compaction, force=args.force, source=source,
                               progress=lambda line: print(line, flush=True))
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        print(f"adsc export: wrote {out} in {time.perf_counter() - t0:.1f} s ({size / 2**20:.1f} MiB): schedule "
              f"'{manifest['schedule']}', {manifest['dtype']}, opset {manifest['opset']}, attention "
              f"{manifest['attention']}, compaction {manifest['compaction']}")
        if args.check:
            return _check(model, out, manifest["schedule"], args.check_tokens, args.seed)
    except (ExportError, AdscModelError, AdscInputError, ScheduleError, OSError, ValueError, ImportError) as exc:
        return _fail(str(exc) or type(exc).__name__)
    return 0


def main(argv: Optional[List[str]] = None) -> int:  # python -m adsc_ext.export.export_cli
    parser = argparse.ArgumentParser(prog="adsc export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
