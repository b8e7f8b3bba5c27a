"""``adsc train``: fine-tune a LLaVA-1.5 checkpoint with the ADSC schedule in place.

    adsc train --model DIR --data train.json --image-folder IMAGES --output OUT [--schedule S]
    accelerate launch --config_file examples/accelerate/ddp.yaml -m adsc_ext.train --model ...
    torchrun --nproc_per_node 2 -m adsc_ext.train --model ...   # CPU: 2 processes over gloo

Defaults follow LLaVA-1.5's published LoRA recipe (see :class:`adsc_ext.train.TrainConfig`).
Errors are one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

__all__ = ["add_arguments", "run", "main", "config_from_args"]


def _bool_flag(parser, name: str, default: bool, help: str) -> None:
    parser.add_argument(f"--{name}", dest=name.replace("-", "_"), action=argparse.BooleanOptionalAction,
                        default=default, help=f"{help} (default: {'on' if default else 'off'})")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .loop import LORA_TARGETS, TrainConfig

    d = TrainConfig(model="", data="", output="")
    io = parser.add_argument_group("data and checkpoints")
    io.add_argument("--model", required=True, metavar="DIR", help="LLaVA-1.5 checkpoint (with its processor and chat template)")
    io.add_argument("--data", required=True, metavar="FILE", help="LLaVA instruction data: a JSON list (or .jsonl)")
    io.add_argument("--image-folder", metavar="DIR", help="root of the samples' image paths")
    io.add_argument("--output", required=True, metavar="DIR", help="output checkpoint folder")
    io.add_argument("--overwrite", action="store_true", help="write over a checkpoint already in --output")
    io.add_argument("--schedule", default=None,
                    help="ADSC schedule 'layer:factor,...' ('' = unmodified model); default: the checkpoint's "
                         "config.adsc_schedule, else the model's default")
    io.add_argument("--save-adapter", action="store_true", help="also keep the LoRA adapter (OUT/adapter)")
    io.add_argument("--save-steps", type=int, default=d.save_steps, metavar="N",
                    help="save a resumable state every N steps under OUT/checkpoints (0: never); default: %(default)s")
    io.add_argument("--resume", metavar="DIR|latest", help="resume from OUT/checkpoints/step-N (or the latest one)")
    io.add_argument("--model-max-length", type=int, default=d.model_max_length,
                    help="longest sample in tokens, images included; default: %(default)s")

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=float, default=d.epochs, help="default: %(default)s")
    opt.add_argument("--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    opt.add_argument("--per-device-batch-size", type=int, default=d.per_device_batch_size, help="default: %(default)s")
    opt.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps,
                     help="default: %(default)s")
    opt.add_argument("--lr", type=float, default=d.lr, help="default: %(default)s")
    opt.add_argument("--projector-lr", type=float, default=d.projector_lr,
                     help="learning rate of the projector (LLaVA's mm_projector_lr); default: %(default)s")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default: %(default)s")
    opt.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="default: %(default)s")
    opt.add_argument("--lr-scheduler", default=d.lr_scheduler, choices=["cosine", "linear", "constant"])
    opt.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0: no clipping; default: %(default)s")
    opt.add_argument("--seed", type=int, default=d.seed, help="default: %(default)s")
    opt.add_argument("--bf16", default=d.bf16, choices=["auto", "yes", "no"],
                     help="bf16 mixed precision; auto: where the GPU has it; default: %(default)s")
    _bool_flag(opt, "gradient-checkpointing", d.gradient_checkpointing, "gradient checkpointing")

    what = parser.add_argument_group("what is trained")
    what.add_argument("--full", action="store_true", help="full fine-tuning of the LLM instead of LoRA")
    what.add_argument("--lora-r", type=int, default=d.lora_r, help="default: %(default)s")
    what.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="default: %(default)s")
    what.add_argument("--lora-dropout", type=float, default=d.lora_dropout, help="default: %(default)s")
    what.add_argument("--lora-targets", default=",".join(LORA_TARGETS),
                      help="comma-separated linear layers of the LLM that get LoRA; default: %(default)s")
    _bool_flag(what, "tune-llm", d.tune_llm, "train the language model (LoRA or --full)")
    _bool_flag(what, "tune-projector", d.tune_projector, "train the projector")
    _bool_flag(what, "tune-vision", d.tune_vision, "train the vision tower")

    misc = parser.add_argument_group("misc")
    misc.add_argument("--attn", default=d.attn, choices=["eager", "sdpa", "flash_attention_2"],
                      help="attention implementation; default: %(default)s")
    misc.add_argument("--log-every", type=int, default=d.log_every, help="loss log (OUT/train_log.jsonl) every N steps")
    misc.add_argument("--num-workers", type=int, default=d.num_workers, help="data loader workers; default: %(default)s")
    misc.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def config_from_args(args):
    from .loop import TrainConfig

    return TrainConfig(
        model=args.model, data=args.data, output=args.output, image_folder=args.image_folder,
        schedule=args.schedule, epochs=args.epochs, max_steps=args.max_steps,
        per_device_batch_size=args.per_device_batch_size, gradient_accumulation_steps=args.gradient_accumulation_steps,
        lr=args.lr, projector_lr=args.projector_lr, weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio,
        lr_scheduler=args.lr_scheduler, max_grad_norm=args.max_grad_norm, seed=args.seed, full=args.full,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        tune_llm=args.tune_llm, tune_projector=args.tune_projector, tune_vision=args.tune_vision,
        gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, model_max_length=args.model_max_length,
        save_adapter=args.save_adapter, save_steps=args.save_steps, resume=args.resume, attn=args.attn,
        log_every=args.log_every, num_workers=args.num_workers, progress=args.progress, overwrite=args.overwrite,
    )


def run(args) -> int:
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
        if not args.full:
            import peft  # noqa: F401
    except ImportError as exc:
        print(f"adsc train: error: {exc.name} is not installed (from a checkout: pip install --no-build-isolation -e '.[train]'; docs/install.md)", file=sys.stderr)
        return 2
    from ..errors import AdscError
    from .loop import train

    try:
        train(config_from_args(args))
    except (AdscError, OSError) as exc:  # TrainError, DataError, ScheduleError, ModelSpecError, ... (one line)
        print(f"adsc train: error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return 2
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="adsc train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
