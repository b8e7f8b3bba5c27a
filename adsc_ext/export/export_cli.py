"""``adsc export``: write a LLaVA-1.5 or Qwen2.5-VL model with the ADSC schedule baked in as ONNX graphs.

``--model PATH`` exports a local LLaVA-1.5 or Qwen2.5-VL checkpoint; without it (``--random``, the default) a
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
    src.add_argument("--model", metavar="PATH", help="local LLaVA-1.5 or Qwen2.5-VL checkpoint directory")
    src.add_argument("--random", action="store_true",
                     help="a built-in small random-weight LLaVA (24x24 image grid, 8 layers); the default")
    parser.add_argument("--out", default="adsc_onnx", metavar="DIR", help="output folder; default: %(default)s")
    parser.add_argument("--force", action="store_true", help="overwrite an export already in --out")
    parser.add_argument("--schedule", default=None,
                        help="ADSC schedule 'layer:factor,...' ('' = unmodified); default: the checkpoint's "
                             f"config.adsc_schedule, else the architecture's (LLaVA-1.5: 8:2,16:2,24:2; Qwen2.5-VL: "
                             f"factor 2 before layers L/4, L/2, 3L/4) ({RANDOM_SCHEDULE} with --random)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                        help="dtype of the exported weights and activations; default: %(default)s")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset (>= 18; the Attention op needs >= 23; one the installed exporter cannot "
                             "write is refused); default: 23")
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
    from ..testing import tiny_llava

    return tiny_llava(seed=seed, dtype=dtype, grid_side=24, patch_size=14, num_layers=8, hidden_size=64,
                      vision_hidden=32, vision_layers=2)


def _check_checkpoint(path: str, schedule, dtype, check: bool) -> None:
    """Refuse ``--model PATH`` from its config.json and weight headers, before any weight is read
    (:mod:`adsc_ext.models.checkpoint`): an architecture adsc_ext does not support, a schedule that
    does not fit it, weights that do not fit in memory (twice with ``--check``: ONNX Runtime holds a
    copy beside the model)."""
    from ..models.checkpoint import check_fits, check_schedule, inspect_checkpoint

    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path}: no such checkpoint directory")
    name = str(dtype).replace("torch.", "")
    info = inspect_checkpoint(path, name, dtype.itemsize, where=f"--model {path}", command="export")
    check_schedule(info, schedule)
    if info.weight_bytes is not None:
        copies = 2 if check else 1
        check_fits(copies * info.weight_bytes,
                   f"--model {path}: its weights ({info.counted_from}){' twice (--check)' if check else ''}", "cpu",
                   "--dtype float16 or bfloat16 halves them" if name == "float32" else "")


def _load_checkpoint(path: str, dtype):
    import transformers
    from transformers.utils import logging as hf_logging

    from ..models.checkpoint import architecture, read_config

    hf_logging.disable_progress_bar()  # errors stay one line on stderr
    cls = getattr(transformers, architecture(read_config(Path(path)), f"--model {path}").class_name)
    return cls.from_pretrained(path, dtype=dtype).eval()


def _check_requests(model, seed: int):
    """Two requests: a question with one image, and plain text (so both row kinds are checked)."""
    import torch

    from ..generation import Request
    from ..models.base import model_spec

    spec = model_spec(model)
    g = torch.Generator().manual_seed(seed)
    if spec.schedule_grid() is None:  # Qwen2.5-VL: a 6x8-token image (12x16 patches) between its markers
        m = spec.spatial_merge_size
        special = min(spec.image_token_id, spec.video_token_id, spec.vision_start_token_id, spec.vision_end_token_id)
        text = lambda n: torch.randint(3, max(4, min(spec.vocab_size, special)), (n,), generator=g)  # noqa: E731
        grid = torch.tensor([[1, 6 * m, 8 * m]])
        img = torch.cat([torch.tensor([spec.vision_start_token_id]), torch.full((48,), spec.image_token_id),
                         torch.tensor([spec.vision_end_token_id])])
        pix = torch.randn(int(grid.prod()), spec.patch_dim, generator=g)
        return [Request(torch.cat([text(3), img, text(9)]), pix, inputs={"image_grid_thw": grid}),
                Request(text(17))]
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
    reqs = [r if not isinstance(r, dict) else
            {k: (v.to(dtype) if k == "pixel_values" and v is not None else v) for k, v in r.items()}
            for r in _check_requests(model, seed)]
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

        from .onnx_export import DEFAULT_OPSET, check_opset, export_onnx, prepare_folder, require_onnx
        require_onnx()
    except ImportError as exc:
        return _fail(str(exc))
    from ..errors import AdscError
    from ..models.llava import llava_spec
    from ..schedule import Schedule, ScheduleError

    dtype = getattr(torch, args.dtype)
    if args.check_tokens < 1:
        return _fail(f"--check-tokens must be >= 1, got {args.check_tokens}")
    opset = DEFAULT_OPSET if args.opset is None else args.opset
    try:
        # every argument first, the output folder last, the checkpoint's weights after both
        check_opset(opset)
        try:
            schedule = None if args.schedule is None else Schedule.coerce(args.schedule)
        except ScheduleError as exc:
            msg = str(exc)
            raise ScheduleError(msg if msg.startswith("bad schedule") else f"--schedule {args.schedule!r}: {msg}") from None
        if args.model:
            _check_checkpoint(args.model, schedule, dtype, args.check)
            source = str(Path(args.model).resolve())
        else:
            model = _random_model(args.seed, dtype)  # small: built now, so the schedule is checked against it
            schedule = Schedule.coerce(RANDOM_SCHEDULE) if schedule is None else schedule
            llava_spec(model).resolve_schedule(schedule, model.config)
            source = f"random tiny LLaVA (seed {args.seed}, 24x24 grid, 8 layers)"
        prepare_folder(Path(args.out), args.force)
        if args.model:
            model = _load_checkpoint(args.model, dtype)
        out = Path(args.out)
        t0 = time.perf_counter()
        manifest = export_onnx(model, out, schedule, opset=opset,
                               compaction=args.compaction, force=args.force, source=source,
                               progress=lambda line: print(line, flush=True))
        size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
        print(f"adsc export: wrote {out} in {time.perf_counter() - t0:.1f} s ({size / 2**20:.1f} MiB): schedule "
              f"'{manifest['schedule']}', {manifest['dtype']}, opset {manifest['opset']}, attention "
              f"{manifest['attention']}, compaction {manifest['compaction']}")
        if args.check:
            return _check(model, out, manifest["schedule"], args.check_tokens, args.seed)
    except (AdscError, OSError, ImportError) as exc:
        return _fail(str(exc) or type(exc).__name__)
    return 0


def main(argv: Optional[List[str]] = None) -> int:  # python -m adsc_ext.export.export_cli
    parser = argparse.ArgumentParser(prog="adsc export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
