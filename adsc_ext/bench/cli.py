"""``adsc bench`` arguments, the checks made before anything is allocated, and where results go.

Every bad argument -- an unknown ``--dtype`` or ``--device``, ``--device cuda`` on a torch without
CUDA, the full-size model on a device that cannot hold it (a CPU, or a GPU with too little free
memory) -- is refused with one line (``adsc: error: ...``, exit status 2) before a model is built.

Results: ``--out-dir`` if given (created), else ``benchmarks/results`` of the source checkout when
adsc_ext runs from one (an editable install), else the run is refused with a line asking for
``--out-dir``: nothing is written relative to the current directory unless asked for. The folder
is printed as an absolute path.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional

import torch

__all__ = ["add_arguments", "run", "main", "BenchError", "default_out_dir"]

#: Accepted ``--dtype`` names.
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


class BenchError(ValueError):
    """A benchmark that cannot run as asked (one line, exit status 2)."""


def _int_list(text: str) -> List[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes >= 1, got {text!r}")
    return out


def _block_size(text: str):
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block size (int) or 'auto', got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a block size >= 1, got {v}")
    return v


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="a tiny random LLaVA (runs on a CPU in seconds)")
    parser.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--schedule", default=None, help="default: 8:2,16:2,24:2 (tiny: 2:2,4:2,6:2)")
    parser.add_argument("--backend", default=None, help="attention backend: flash_attn | torch_varlen | sdpa (default: auto)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per request after BOS and the image; default: %(default)s")
    parser.add_argument("--prefill-batches", type=_int_list, default=[1, 8], help="prefill batch sizes; default: 1,8")
    parser.add_argument("--prefill-batch", type=int, default=8, help="batch of the prefill targets, HF and FastV runs; default: %(default)s")
    parser.add_argument("--decode-batches", type=_int_list, default=[32, 64], help="decode batch sizes; default: 32,64")
    parser.add_argument("--decode-batch", type=int, default=32, help="batch of the decode target, the KV records and HF decode; default: %(default)s")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode length (default: 256; tiny: 16)")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size of the prefill engines and the KV records; default: %(default)s")
    parser.add_argument("--decode-block-size", type=_block_size, default="auto",
                        help="KV block size of the decode engines; auto: 256 where the backend reads 256-token pages "
                             "in place (flash-attn, torch varlen_attn with block_table), else --block-size")
    parser.add_argument("--cuda-graphs", choices=("auto", "on", "off"), default="auto",
                        help="CUDA-graph decode: auto = on CUDA, off on the CPU; a failed capture is recorded and "
                             "decode reruns without graphs")
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV's pruning layer K; default: %(default)s")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate() runs")
    parser.add_argument("--no-fastv", action="store_true", help="skip the FastV baseline")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up; default: %(default)s")
    parser.add_argument("--out-dir", default=None, help="where the JSON and the plot go (default: see adsc_ext.bench.cli)")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")


def default_out_dir() -> Optional[Path]:
    """``benchmarks/results`` of the source checkout adsc_ext is imported from, or None."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "benchmarks").is_dir() and (root / "adsc_ext").is_dir():
        return root / "benchmarks" / "results"
    return None


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise BenchError(f"--device {name!r} is not a device (use cuda, cuda:N or cpu)") from None
    if device.type not in ("cuda", "cpu"):
        raise BenchError(f"--device {name!r}: adsc bench runs on cuda or cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = ("this torch is built without CUDA" if torch.version.cuda is None
                   else "torch sees no CUDA device")
            raise BenchError(f"--device {name}: {why} (torch {torch.__version__}); use --device cpu --tiny")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BenchError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    return device


def check_fits(args, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse the full-size model (before anything is allocated) where it cannot run."""
    if args.tiny:
        return
    from .suite import full_model_bytes

    need = full_model_bytes(args, dtype)
    if device.type != "cuda":
        raise BenchError(f"adsc bench without --tiny runs LLaVA-1.5-7B shapes and needs a CUDA GPU with about "
                         f"{need / 2**30:.0f} GiB free; this run is on {device}: use --tiny")
    free, total = torch.cuda.mem_get_info(device)
    if free < need:
        raise BenchError(f"adsc bench without --tiny needs about {need / 2**30:.0f} GiB of GPU memory, "
                         f"{torch.cuda.get_device_name(device)} has {free / 2**30:.0f} GiB free of "
                         f"{total / 2**30:.0f} GiB: use --tiny, or smaller --decode-batches")


def run(args) -> int:
    """Check the arguments, then run the suite (:func:`adsc_ext.bench.suite.run_suite`)."""
    device = resolve_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    new_tokens = args.new_tokens if args.new_tokens is not None else (16 if args.tiny else 256)
    if new_tokens < 2:
        raise BenchError(f"--new-tokens must be >= 2 (decode throughput needs a decode step), got {new_tokens}")
    if args.repeats < 2:
        raise BenchError(f"--repeats must be >= 2 (the spread needs two samples), got {args.repeats}")
    if args.text_tokens < 0:
        raise BenchError(f"--text-tokens must be >= 0, got {args.text_tokens}")
    if args.block_size < 1:
        raise BenchError(f"--block-size must be >= 1, got {args.block_size}")
    out_dir = Path(args.out_dir).expanduser().resolve() if args.out_dir else default_out_dir()
    if out_dir is None:
        raise BenchError("give --out-dir: adsc_ext is not running from a source checkout, so there is no "
                         "benchmarks/results folder to default to")
    check_fits(args, device, dtype)
    from .suite import run_suite

    return run_suite(args, device, dtype, new_tokens, out_dir)


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m adsc_ext.bench`` / ``benchmarks/bench.py``: the same as ``adsc bench``."""
    from ..cli import main as adsc_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return adsc_main(["bench", *argv])


if __name__ == "__main__":
    sys.exit(main())
