"""``adsc trt-build FOLDER``: TensorRT engines from an ``adsc export`` folder (see
:func:`adsc_ext.export.tensorrt.build_engines`). Errors are one line and exit status 2; without
TensorRT the line says what to install."""

from __future__ import annotations

import argparse
import sys

from .tensorrt import (
    BuildLimits,
    TensorRTBuildError,
    TensorRTUnavailable,
    build_engines,
)

_USAGE_ERROR = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="the folder `adsc export` wrote (adsc_manifest.json + *.onnx)")
    parser.add_argument("--max-batch", type=int, default=8, help="largest batch; default: %(default)s")
    parser.add_argument("--max-prompt", type=int, default=None,
                        help="longest padded prompt in tokens, image tokens included; default: one "
                        "image + 512 text tokens")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="default: %(default)s")
    parser.add_argument("--max-images", type=int, default=None,
                        help="most images in one batch; default: as many as --max-prompt holds, per row")
    parser.add_argument("--opt-batch", type=int, default=None,
                        help="the batch TensorRT tunes for; default: --max-batch")
    parser.add_argument("--opt-text-tokens", type=int, default=64,
                        help="text tokens per prompt TensorRT tunes for; default: %(default)s")
    parser.add_argument("--graphs", default=None,
                        help="comma-separated graph names to build; default: all in the manifest")
    parser.add_argument("--plugin", default=None,
                        help="libadsc_tensorrt.so (needed only for an export with AdscCompactTokens "
                        "nodes); default: $ADSC_TENSORRT_PLUGIN, adsc_ext/lib, build/*/csrc/tensorrt")
    parser.add_argument("--workspace-gib", type=float, default=None,
                        help="builder workspace limit in GiB; default: TensorRT's")
    parser.add_argument("--tf32", action="store_true",
                        help="let TensorRT use TF32 for float32 matrix products (off: float32 math)")
    parser.add_argument("--force", action="store_true", help="replace engines that exist")


def run(args: argparse.Namespace) -> int:
    """Check the arguments, then :func:`build_engines` (which checks the folder and the limits
    against its manifest before it imports TensorRT): a bad argument or folder is reported as
    itself on a machine without TensorRT too."""
    try:
        limits = BuildLimits(
            max_batch=args.max_batch,
            max_prompt=args.max_prompt,
            max_new_tokens=args.max_new_tokens,
            max_images=args.max_images,
            opt_batch=args.opt_batch,
            opt_text_tokens=args.opt_text_tokens,
        )
        limits.check()
        graphs = None
        if args.graphs is not None:
            graphs = [g.strip() for g in args.graphs.split(",") if g.strip()]
            if not graphs:
                raise TensorRTBuildError(f"--graphs {args.graphs!r}: expected comma-separated graph names "
                                         "(vision, embed, prefill, decode)")
        workspace = None
        if args.workspace_gib is not None:
            if not args.workspace_gib > 0:  # NaN too
                raise TensorRTBuildError(f"--workspace-gib must be > 0, got {args.workspace_gib}")
            workspace = int(args.workspace_gib * 2**30)
        report = build_engines(args.folder, limits, graphs=graphs, plugin_library=args.plugin,
                               workspace_bytes=workspace, allow_tf32=args.tf32,
                               force=args.force)
    except (TensorRTBuildError, TensorRTUnavailable) as exc:
        print(f"adsc: error: adsc trt-build: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return _USAGE_ERROR
    total = sum(e["bytes"] for e in report["engines"].values())
    print(f"trt-build: {len(report['engines'])} engines, {total / 2**20:.1f} MiB, TensorRT "
          f"{report['tensorrt_version']}; report: {args.folder}/trt_build_report.json")
    return 0
