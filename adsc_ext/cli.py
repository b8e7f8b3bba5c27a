"""The ``adsc`` command line (console script ``adsc = adsc_ext.cli:main``).

- ``adsc plan``: per-stage token counts, decoder FLOPs and KV-cache bytes of one prefill, baseline
  against ADSC (spec section 7). Needs neither torch kernels nor the compiled extension.
- ``adsc generate`` (:mod:`adsc_ext.hf.generate_cli`) and ``adsc bench``
  (:mod:`adsc_ext.bench.cli`) are imported only when they run, so ``adsc plan`` keeps
  working (and stays fast) without them.

Every error the user can fix (an :class:`~adsc_ext.errors.AdscError`, or an ``OSError`` such as a
missing file) is one line ``adsc: error: ...`` on stderr and exit status 2. Anything else is a bug
and surfaces as a traceback, never dressed up as a usage error.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from typing import Any, Optional, Sequence

from adsc_ext import __version__
from adsc_ext.accounting import (DEFAULT_IMAGE_SIZE, PRESETS, describe_image, format_section8, load_model_spec,
                                 parse_image_size, plan_report)
from adsc_ext.errors import AdscError, CliError
from adsc_ext.schedule import LLAVA15_DEFAULT, Schedule, ScheduleError

__all__ = ["main", "format_report"]

_USAGE_ERROR = 2

# Subcommands whose module (with add_arguments(parser) and run(args) -> int) is imported only when
# the subcommand runs, so `adsc plan` needs neither torch kernels nor transformers.
_DELEGATED = {
    "generate": ("adsc_ext.hf.generate_cli", "Generate text with an ADSC model."),
    "bench": ("adsc_ext.bench.cli",
              "Benchmark the ADSC engine against the unmodified model (JSON + plot)."),
    "export": ("adsc_ext.export.export_cli",
               "Export LLaVA with the ADSC schedule baked in to ONNX; --check runs it on ONNX Runtime."),
    "trt-build": ("adsc_ext.export.trt_cli",
                  "Build TensorRT engines from an `adsc export` folder (needs tensorrt and a GPU)."),
    "train": ("adsc_ext.train.cli", "Fine-tune a LLaVA checkpoint with the ADSC schedule in place (Accelerate)."),
}


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing the usage block, so errors stay one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CliError(message)


def _build_parser() -> _Parser:
    parser = _Parser(prog="adsc", description="ADSC (Attention-Driven Self-Compression) tools.")
    parser.add_argument("--version", action="version", version=f"adsc {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(["plan", *_DELEGATED]) + "}")

    plan = commands.add_parser(
        "plan",
        help="decoder FLOPs and KV-cache bytes of one prefill, baseline vs ADSC",
        description="Per-stage token counts, decoder FLOPs and KV-cache bytes of one prefill, "
        "for the unmodified model (baseline) and with the ADSC schedule.",
    )
    plan.add_argument(
        "--model", default="llava-1.5-7b",
        help=f"a preset ({', '.join(PRESETS)}) or a config.json of LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, "
        "Qwen2-VL, Qwen2.5-VL or Qwen3-VL (or its directory); default: %(default)s",
    )
    plan.add_argument(
        "--schedule", default=None,
        help="'layer:factor,...' ('' = unmodified model); default: the config's adsc_schedule, else the "
        f"model's default ({LLAVA15_DEFAULT} for LLaVA-1.5; factor 2 before layers round(L/4), round(L/2), "
        "round(3L/4) of the others)",
    )
    plan.add_argument("--text-tokens", type=int, default=64, help="default: %(default)s")
    plan.add_argument("--images", type=int, default=1, help="default: %(default)s")
    plan.add_argument(
        "--image-size", default=None, metavar="WIDTHxHEIGHT",
        help="the images' size in pixels, which sets their vision tokens in LLaVA-NeXT, LLaVA-OneVision and "
        f"Qwen-VL models (LLaVA-1.5 resizes every image to one grid); default: "
        f"{DEFAULT_IMAGE_SIZE[1]}x{DEFAULT_IMAGE_SIZE[0]}",
    )
    plan.add_argument(
        "--dtype-bytes", type=int, default=2, help="bytes per KV-cache value; default: %(default)s"
    )
    plan.add_argument("--decode-batch", type=int, default=32,
                      help="batch of the decode-step bytes; default: %(default)s")
    plan.add_argument("--new-tokens", type=int, default=256,
                      help="tokens generated, for the decode-step bytes; default: %(default)s")
    plan.add_argument("--json", action="store_true", help="print one JSON object")

    # No help of their own: every argument, --help included, goes to the delegate's parser.
    for name, (_, summary) in _DELEGATED.items():
        commands.add_parser(name, add_help=False, help=f"{summary} (see its --help)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``adsc`` command line; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, rest = _build_parser().parse_known_args(argv)
        if args.command in _DELEGATED:
            return _delegate(args.command, rest)
        if rest:
            raise CliError(f"unrecognized arguments: {' '.join(rest)}")
        return _plan(args)
    except (AdscError, OSError) as exc:
        print(f"adsc: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return _USAGE_ERROR


def _plan(args: argparse.Namespace) -> int:
    spec = load_model_spec(args.model)
    text = spec.default_schedule() if args.schedule is None else args.schedule
    try:
        schedule = Schedule.parse(text)
    except ScheduleError as exc:
        raise CliError(f"bad --schedule {text!r}: {exc}") from None
    try:
        size = None if args.image_size is None else parse_image_size(args.image_size)
    except AdscError as exc:
        raise CliError(f"bad --image-size: {exc}") from None
    report = plan_report(
        spec, schedule, args.text_tokens, args.images, args.dtype_bytes, image_size=size,
        decode_batch=args.decode_batch, new_tokens=args.new_tokens,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _delegate(command: str, argv: list[str]) -> int:
    module_name, summary = _DELEGATED[command]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"'adsc {command}' is unavailable: {exc}") from None
    parser = _Parser(prog=f"adsc {command}", description=summary)
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))


def _format_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def _tflops(flops: int) -> str:
    return f"{flops / 1e12:.3f}"


def _aligned(rows: list[list[str]], left: int = 1) -> list[str]:
    """Columns padded to a common width: the first ``left`` left-aligned, the rest right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(w) if i < left else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths))
        ).rstrip()
        for row in rows
    ]


def format_report(report: dict[str, Any]) -> str:
    """The readable form of :func:`adsc_ext.accounting.plan_report`'s result."""
    images = report["images"]
    plural = "" if images == 1 else "s"
    if report.get("arch", "llava") == "llava":  # every image one grid, whatever its size
        what = f"{images} image{plural} ({describe_image(report)} each)"
    else:
        what = f"{images} image{plural} of {describe_image(report)}"
    title = (
        f"{report['model']}: {report['text_tokens']} text tokens + {what}, "
        f"schedule '{report['schedule']}'"
        f"{'' if report['schedule'] else ' (unmodified model)'}, "
        f"KV cache at {report['dtype_bytes']} bytes per value"
    )
    stage_rows = [["stage", "layers", "grid", "vision/image", "tokens", "TFLOPs", "KV cache"]]
    for s in report["stages"]:
        first, last = s["first_layer"], s["last_layer"]
        stage_rows.append([
            str(s["stage"]),
            f"{first}-{last}" if last != first else str(first),
            " + ".join(f"{h}x{w}{'n' if nl else ''}" for h, w, nl in s["grids"]),
            str(s["vision_tokens_per_image"]),
            str(s["tokens"]),
            _tflops(s["flops"]),
            _format_bytes(s["kv_bytes"]),
        ])
    total_rows = [
        ["total", "baseline", "ADSC", "reduction"],
        ["TFLOPs", _tflops(report["baseline_flops"]), _tflops(report["adsc_flops"]),
         f"{report['flops_reduction_pct']:.1f} %"],
        ["KV cache", _format_bytes(report["baseline_kv_bytes"]),
         _format_bytes(report["adsc_kv_bytes"]), f"{report['kv_reduction_pct']:.1f} %"],
    ]
    newlines = any(nl for _, _, nl in report["stages"][0]["grids"])
    return "\n".join([
        title,
        "",
        *_aligned(stage_rows, left=3),
        *(["(n: each row of the grid ends with a newline token, kept with its row)"] if newlines else []),
        "",
        *_aligned(total_rows),
        "",
        f"ideal prefill speed-up (FLOPs ratio): {report['ideal_speedup']:.2f}x",
        *format_section8(report),
    ])


if __name__ == "__main__":
    raise SystemExit(main())
