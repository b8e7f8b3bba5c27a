"""``adsc bench`` arguments, the checks made before anything is allocated, and where results go.

The model: ``--tiny`` (a tiny random LLaVA), or ``--model`` -- a preset of ``adsc plan``
(:data:`adsc_ext.accounting.PRESETS`; the default is ``llava-1.5-7b``) or a LLaVA ``config.json``
(or its directory) -- built with random weights.

Every bad argument is refused with one line (``adsc: error: ...``, exit status 2) before a model is
built or anything is measured: an unknown ``--dtype`` or ``--device``, ``--device cuda`` on a
torch without CUDA, a batch below 1, a ``--model`` that is no preset and no LLaVA config, a
schedule that does not fit the model, a FastV layer outside it, prompts longer than the model's
positions, an unknown or unavailable ``--backend``, ``--cuda-graphs on`` off CUDA, an ``--out-dir``
that cannot be written, and a run whose weights, KV pools and activations do not fit in the
device's memory (``torch.cuda.mem_get_info`` on a GPU, ``MemAvailable`` on the CPU).

Results: ``--out-dir`` if given (created), else ``benchmarks/results`` of the source checkout when
adsc_ext runs from one (an editable install), else the run is refused with a line asking for
``--out-dir``: nothing is written relative to the current directory unless asked for. The folder
is printed as an absolute path.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import List, Optional

import torch

from ..errors import BenchError

__all__ = ["add_arguments", "run", "BenchError", "default_out_dir"]

#: Accepted ``--dtype`` names.
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def _int_list(text: str) -> List[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes >= 1, got {text!r}")
    return out


def _positive(text: str, what: str, alternative: str = "") -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a {what} (int){alternative}, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a {what} >= 1, got {v}")
    return v


def _batch(text: str) -> int:
    return _positive(text, "batch size")


def _block_size(text: str):
    return text if text == "auto" else _positive(text, "block size", " or 'auto'")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true", help="a tiny random LLaVA (runs on a CPU in minutes)")
    which.add_argument("--model", default=None, metavar="NAME|CONFIG",
                       help="a preset of adsc plan (llava-1.5-7b, llava-1.5-13b) or a LLaVA config.json (or its "
                            "directory), built with random weights; default: llava-1.5-7b")
    parser.add_argument("--device", default=None, help="cuda | cuda:N | cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                        help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--schedule", default=None,
                        help="default: the config's adsc_schedule, else 8:2,16:2,24:2 (tiny: 2:2,4:2,6:2)")
    parser.add_argument("--backend", default=None, help="attention backend: flash_attn | torch_varlen | sdpa (default: auto)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per request after BOS and the image; default: %(default)s")
    parser.add_argument("--prefill-batches", type=_int_list, default=[1, 8], help="prefill batch sizes; default: 1,8")
    parser.add_argument("--prefill-batch", type=_batch, default=8, help="batch of the prefill targets, HF and FastV runs; default: %(default)s")
    parser.add_argument("--decode-batches", type=_int_list, default=[32, 64], help="decode batch sizes; default: 32,64")
    parser.add_argument("--decode-batch", type=_batch, default=32, help="batch of the decode target, the KV records and HF decode; default: %(default)s")
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


def _llava_config(spec):
    """A transformers ``LlavaConfig`` of the shape an :class:`adsc_ext.accounting.ModelSpec`
    describes (LLaVA-1.5's layout: CLIP tower, LLaMA decoder, 4096 positions)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    v = spec.vision
    vision = CLIPVisionConfig(hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                              num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads,
                              image_size=v.image_size, patch_size=v.patch_size, projection_dim=768)
    text = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
                       intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                       num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                       head_dim=spec.head_dim, max_position_embeddings=4096, rms_norm_eps=1e-5, pad_token_id=0)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=min(32000, spec.vocab_size - 1),
                       image_seq_length=spec.tokens_per_image, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", pad_token_id=0)


def model_config(name: str):
    """``(transformers config, name)`` of ``--model``: a preset of :data:`adsc_ext.accounting.PRESETS`
    or a LLaVA config.json (or a directory holding one), read as ``adsc plan`` reads it."""
    import transformers

    from ..accounting import ARCHITECTURES, PRESETS, ModelSpecError, spec_from_config
    from ..models.checkpoint import CheckpointError, architecture, read_config_file
    from ..models.llava import AdscModelError

    if name in PRESETS:
        if PRESETS[name].arch != "llava":
            raise BenchError(f"--model {name}: adsc bench runs LLaVA-1.5 models; {name} is "
                             f"{ARCHITECTURES[PRESETS[name].arch]} (adsc plan accounts it)")
        return _llava_config(PRESETS[name]), name
    path = Path(name).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        if file.suffix == ".json" or len(path.parts) > 1:
            raise BenchError(f"--model {name}: no config.json there")
        raise BenchError(f"--model {name!r}: not a preset ({', '.join(PRESETS)}) nor a config.json or a directory "
                         f"holding one")
    try:
        config = read_config_file(file)
        arch = architecture(config, f"--model {name}", command="bench")
        spec_from_config(config, str(file))  # the dims adsc plan reads, checked (vision strategy too)
        cfg = getattr(transformers, arch.class_name).config_class.from_dict(config)
    except (CheckpointError, AdscModelError, ModelSpecError) as exc:
        raise BenchError(str(exc)) from None
    return cfg, name


def _positions(cfg) -> int:
    return int(getattr(cfg.text_config, "max_position_embeddings", None) or (1 << 30))


def check_arguments(args, device: torch.device, new_tokens: int) -> None:
    """Every argument against the model's config (nothing is built): ``args.model_config``,
    ``args.model_name`` and ``args.schedule`` (resolved) are set for the suite."""
    from ..accounting import spec_from_config
    from ..baselines.fastv import budget_keep
    from ..runtime.attention import select_backend
    from ..schedule import LLAVA15_DEFAULT, Schedule, ScheduleError
    from .suite import graphs_supported, tiny_config

    if args.tiny:
        cfg, name = tiny_config(), "tiny-llava"
    else:
        cfg, name = model_config(args.model or "llava-1.5-7b")
    spec = spec_from_config(cfg.to_dict(), name)
    default = "2:2,4:2,6:2" if args.tiny else getattr(cfg, "adsc_schedule", None)
    text = args.schedule if args.schedule is not None else (LLAVA15_DEFAULT if default is None else default)
    try:
        schedule = Schedule.coerce(text)
        schedule.validate(spec.num_layers, spec.grid)
    except ScheduleError as exc:
        raise BenchError(f"--schedule {text!r}: {exc}" + ("" if args.schedule is not None else
                                                            " (the default; give --schedule)")) from None
    if not args.no_fastv:
        try:
            budget_keep(schedule, spec.num_layers, args.fastv_layer, spec.grid)
        except ValueError as exc:
            raise BenchError(f"--fastv-layer {args.fastv_layer}: {exc} (or --no-fastv)") from None
    prompt = 1 + spec.tokens_per_image + args.text_tokens
    if prompt + new_tokens > _positions(cfg):
        raise BenchError(f"a prompt of 1 BOS + {spec.tokens_per_image} image + {args.text_tokens} text tokens and "
                         f"{new_tokens} new tokens need {prompt + new_tokens} positions; {name} has "
                         f"{_positions(cfg)}: lower --text-tokens or --new-tokens")
    try:
        select_backend(args.backend, device)
    except ValueError as exc:
        raise BenchError(f"--backend {args.backend}: {exc}") from None
    if args.cuda_graphs == "on" and not graphs_supported(device):
        raise BenchError(f"--cuda-graphs on needs a CUDA device; this run is on {device}")
    args.model_config, args.model_name, args.schedule = cfg, name, str(schedule)


def check_fits(args, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse (before anything is allocated) a run whose weights, KV pools and activations do not fit
    in the memory the device has (:func:`adsc_ext.bench.suite.full_model_bytes`)."""
    from ..models.checkpoint import available_memory
    from .suite import full_model_bytes

    need = full_model_bytes(args, dtype)
    avail = available_memory(device)
    if avail is None or avail[0] >= need:
        return
    have, source = avail
    what = "--tiny" if args.tiny else f"--model {args.model_name}"
    gib = f"{need / 2**30:.0f} GiB"
    todo = "use smaller --decode-batches or --prefill-batches" if args.tiny else (
        "use a GPU with more free memory, --tiny, a smaller --model or smaller --decode-batches"
        if device.type == "cuda" else
        f"it needs a CUDA GPU with about {gib} free, or use --tiny, a smaller --model or smaller --decode-batches")
    raise BenchError(f"adsc bench {what} in {str(dtype).replace('torch.', '')} needs about {gib} (weights, the KV "
                     f"pools of the largest prefill and decode batches, activations); {device} has "
                     f"{have / 2**30:.0f} GiB available ({source}): {todo}")


def check_out_dir(out_dir: Path) -> None:
    """Make ``out_dir`` and check that a file can be written in it (before anything is measured)."""
    import tempfile

    if out_dir.exists() and not out_dir.is_dir():
        raise BenchError(f"--out-dir {out_dir}: exists and is not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".adsc-bench-write-check-"):
            pass
    except OSError as exc:
        raise BenchError(f"--out-dir {out_dir}: cannot write there ({exc.strerror or exc})") from None


def run(args) -> int:
    """Check every argument (nothing is built before), then run the suite
    (:func:`adsc_ext.bench.suite.run_suite`)."""
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
    check_arguments(args, device, new_tokens)
    check_fits(args, device, dtype)
    check_out_dir(out_dir)  # last: it makes the folder
    from .suite import run_suite

    return run_suite(args, device, dtype, new_tokens, out_dir)

