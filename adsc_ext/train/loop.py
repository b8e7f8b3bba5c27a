"""The fine-tuning loop of ``adsc train``, on Hugging Face Accelerate.

One loop for one process, DDP, FSDP and DeepSpeed: Accelerate wraps the model, the optimizer and
the data loader for whatever ``accelerate launch`` / ``torchrun`` started (its config file picks the
engine); this module never talks to ``torch.distributed`` itself.

The loss of an optimizer step is the mean next-token cross-entropy over **all** label tokens of the
step's global batch (every process, every accumulated micro-batch): the label tokens are counted
first and summed over the processes, each micro-batch's ADSC loss (spec 6.4) is its summed
cross-entropy over that count (``num_items_in_batch``), and it is scaled by the world size (DDP and
FSDP average gradients over the processes). So N processes with per-device batch b and
accumulation g take exactly the step one process takes with batch N*b*g, up to floating-point
rounding (``tests/test_train_distributed.py`` checks it).

The output folder is a checkpoint: LoRA merged into the weights (``--save-adapter`` keeps the
adapter too, under ``adapter/``), ``config.adsc_schedule`` set, the processor saved beside it, so
``from_pretrained`` + ``apply_adsc(model)`` (or ``adsc generate --model``, the engine, ``adsc
export``, the vLLM plugin) take it as it is.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch

from ..errors import AdscError
from .data import IGNORE_INDEX, InstructDataset, collate, load_records

__all__ = ["LORA_TARGETS", "TrainConfig", "TrainError", "build_model", "trainable_groups", "train"]

#: LLaVA trains LoRA on every linear layer of the language model (``find_all_linear_names`` in
#: LLaVA's ``llava/train/train.py``: all ``nn.Linear`` outside the projector and the vision tower,
#: minus ``lm_head``); for a LLaMA decoder these are:
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROJECTOR = "multi_modal_projector"
VISION = "vision_tower"


class TrainError(AdscError, ValueError):
    """A training set-up that cannot run (bad arguments, an unusable checkpoint or output folder)."""


@dataclass
class TrainConfig:
    """Everything ``adsc train`` takes. The defaults are LLaVA-1.5's published LoRA fine-tuning
    recipe (``scripts/v1_5/finetune_lora.sh`` in haotian-liu/LLaVA: ``--lora_r 128 --lora_alpha 256
    --mm_projector_lr 2e-5 --learning_rate 2e-4 --num_train_epochs 1 --per_device_train_batch_size
    16 --gradient_accumulation_steps 1 --weight_decay 0. --warmup_ratio 0.03 --lr_scheduler_type
    cosine --model_max_length 2048 --gradient_checkpointing True --bf16 True``, on 8 GPUs: a global
    batch of 128; ``lora_dropout`` 0.05 is its ``train.py`` default)."""

    model: str
    data: str
    output: str
    image_folder: Optional[str] = None
    schedule: Optional[str] = None  # None: the checkpoint's config.adsc_schedule, else the default
    epochs: float = 1.0
    max_steps: Optional[int] = None  # overrides epochs
    per_device_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    lr: float = 2e-4
    projector_lr: Optional[float] = 2e-5  # None: lr
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    lr_scheduler: str = "cosine"
    max_grad_norm: float = 1.0
    seed: int = 0
    full: bool = False  # full fine-tuning of the LLM instead of LoRA
    lora_r: int = 128
    lora_alpha: int = 256
    lora_dropout: float = 0.05
    lora_targets: Tuple[str, ...] = LORA_TARGETS
    tune_llm: bool = True
    tune_projector: bool = True
    tune_vision: bool = False
    gradient_checkpointing: bool = True
    bf16: str = "auto"  # auto | yes | no
    model_max_length: int = 2048
    save_adapter: bool = False
    save_steps: int = 0  # 0: no intermediate checkpoints
    resume: Optional[str] = None  # a checkpoints/step-N folder, or "latest"
    attn: str = "sdpa"
    log_every: int = 1
    num_workers: int = 0
    progress: bool = True
    overwrite: bool = False

    def check(self) -> None:
        def positive(name, v, minimum=1):
            if v is None or isinstance(v, bool) or v < minimum:
                raise TrainError(f"--{name.replace('_', '-')} must be >= {minimum}, got {v}")

        positive("per_device_batch_size", self.per_device_batch_size)
        positive("gradient_accumulation_steps", self.gradient_accumulation_steps)
        positive("model_max_length", self.model_max_length)
        positive("log_every", self.log_every)
        positive("save_steps", self.save_steps, 0)
        positive("num_workers", self.num_workers, 0)
        if self.max_steps is not None:
            positive("max_steps", self.max_steps)
        if not self.epochs > 0:
            raise TrainError(f"--epochs must be > 0, got {self.epochs}")
        if not self.lr > 0 or (self.projector_lr is not None and not self.projector_lr > 0):
            raise TrainError(f"learning rates must be > 0, got --lr {self.lr}, --projector-lr {self.projector_lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainError(f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise TrainError("--weight-decay and --max-grad-norm must be >= 0")
        if self.lr_scheduler not in ("cosine", "linear", "constant"):
            raise TrainError(f"--lr-scheduler must be cosine, linear or constant, got {self.lr_scheduler!r}")
        if self.bf16 not in ("auto", "yes", "no"):
            raise TrainError(f"--bf16 must be auto, yes or no, got {self.bf16!r}")
        if not self.full and self.tune_llm:
            positive("lora_r", self.lora_r)
            positive("lora_alpha", self.lora_alpha)
            if not 0 <= self.lora_dropout < 1:
                raise TrainError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
            if not self.lora_targets:
                raise TrainError("--lora-targets is empty")
        if not (self.tune_llm or self.tune_projector or self.tune_vision):
            raise TrainError("nothing to train: --no-tune-llm, --no-tune-projector and no --tune-vision")


# =============================================================================================
# The model
# =============================================================================================


def _check_model_dir(path: str) -> None:
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise TrainError(f"--model {path}: not a checkpoint directory (no config.json)")
    try:
        mtype = json.loads(cfg_file.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise TrainError(f"--model {path}: cannot read config.json: {exc}") from None
    if mtype != "llava":
        raise TrainError(f"--model {path}: a {mtype!r} checkpoint; adsc train needs a LLaVA-1.5 (model_type "
                         f"'llava') checkpoint")


def _load_base(cfg: TrainConfig, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    _check_model_dir(cfg.model)
    return LlavaForConditionalGeneration.from_pretrained(cfg.model, dtype=dtype, attn_implementation=cfg.attn)


def build_model(cfg: TrainConfig, dtype: torch.dtype = torch.float32):
    """The checkpoint, ADSC applied with ``cfg.schedule``, wrapped for training: LoRA (PEFT) on
    the language model's ``lora_targets`` (the projector, and the vision tower with
    ``tune_vision``, fully trained beside it) or full fine-tuning; what is not tuned is frozen.
    Returns ``(model, schedule)``."""
    from ..hf import apply_adsc, adsc_setup

    model = _load_base(cfg, dtype)
    apply_adsc(model, cfg.schedule)
    schedule = str(adsc_setup(model).schedule)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    tuned = [m for m, on in ((PROJECTOR, cfg.tune_projector), (VISION, cfg.tune_vision)) if on]
    if cfg.full or not cfg.tune_llm:
        if cfg.tune_llm:
            tuned += ["model.language_model", "lm_head"]
        for name, p in model.named_parameters():
            if any(name.startswith(t) or f".{t}." in f".{name}" for t in tuned):
                p.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        pattern = r".*language_model\..*\.(" + "|".join(cfg.lora_targets) + r")"
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=pattern, modules_to_save=tuned or None, bias="none")
        model = get_peft_model(model, lora)
    if not any(p.requires_grad for p in model.parameters()):  # pragma: no cover - checked by cfg.check
        raise TrainError("no parameter is trainable")
    return model, schedule


def trainable_groups(model, cfg: TrainConfig) -> List[dict]:
    """Optimizer parameter groups: the projector at ``projector_lr`` (LLaVA's ``mm_projector_lr``),
    everything else trainable at ``lr``."""
    proj, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (proj if PROJECTOR in name else rest).append(p)
    groups = [{"params": rest, "lr": cfg.lr}] if rest else []
    if proj:
        groups.append({"params": proj, "lr": cfg.projector_lr if cfg.projector_lr is not None else cfg.lr})
    for g in groups:
        g["weight_decay"] = cfg.weight_decay
    return groups


def _schedule_fn(name: str, warmup: int, total: int) -> Callable[[int], float]:
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1) if warmup else 1.0
        if name == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress))) if name == "cosine" else max(0.0, 1.0 - progress)

    return fn


def _mixed_precision(flag: str) -> str:
    if flag == "yes":
        return "bf16"
    if flag == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


# =============================================================================================
# The loop
# =============================================================================================


def _resolve_resume(cfg: TrainConfig) -> Optional[Path]:
    if cfg.resume is None:
        return None
    if cfg.resume == "latest":
        root = Path(cfg.output) / "checkpoints"
        steps = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if p.name.split("-")[1].isdigit())
        if not steps:
            raise TrainError(f"--resume latest: no checkpoints under {root}")
        return steps[-1][1]
    path = Path(cfg.resume)
    if not (path / "trainer_state.json").is_file():
        raise TrainError(f"--resume {cfg.resume}: not an adsc train checkpoint (no trainer_state.json)")
    return path


def _count_targets(labels: torch.Tensor) -> int:
    """Label tokens a micro-batch's loss averages over: positions whose next token is a label."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def train(cfg: TrainConfig, *, log: Callable[[str], None] = print,
          forward: Optional[Callable[[torch.nn.Module, dict, torch.Tensor], torch.Tensor]] = None,
          dataset: Optional[InstructDataset] = None) -> Path:
    """Fine-tune ``cfg.model`` on ``cfg.data`` with the ADSC schedule in place; returns the output
    folder (a checkpoint with ``config.adsc_schedule``). Run under ``accelerate launch`` or
    ``torchrun`` for several processes.

    ``forward(model, batch, num_items)``, if given, replaces the model's own loss (a baseline trained
    through another forward, e.g. the self-compression study's FastV arm): it must return the summed
    cross-entropy of the batch's label tokens over ``num_items``. It gets the model as prepared
    (``accelerator.unwrap_model`` it to bypass a DDP wrapper only in a single process).
    ``dataset``, if given, is used instead of reading ``cfg.data`` (runs that share one dataset)."""
    from accelerate import Accelerator, DataLoaderConfiguration
    from accelerate.utils import DistributedType, set_seed
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    from ..hf import enable_checkpointing

    # Everything a user can get wrong is checked before Accelerate starts (and before any weight is read).
    cfg.check()
    _check_model_dir(cfg.model)
    if cfg.schedule is not None:  # against the checkpoint's layers and grid, before any weight is read
        from ..accounting import load_model_spec
        from ..schedule import Schedule

        spec = load_model_spec(cfg.model)
        Schedule.parse(cfg.schedule).validate(spec.num_layers, spec.grid)
    records = load_records(cfg.data) if dataset is None else None
    if cfg.image_folder is not None and not Path(cfg.image_folder).is_dir():
        raise TrainError(f"--image-folder {cfg.image_folder}: no such directory")
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--output {out}: exists and is not a directory")
    resume_dir = _resolve_resume(cfg)
    if resume_dir is None and (out / "config.json").exists() and not cfg.overwrite:
        raise TrainError(f"--output {out} already holds a checkpoint; pass --overwrite or --resume")
    mp = _mixed_precision(cfg.bf16)
    # cpu=True on a machine without an accelerator: Accelerate then reads torchrun's environment
    # (LOCAL_RANK, WORLD_SIZE) as a multi-process CPU run over gloo.
    has_accel = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=mp, cpu=not has_accel,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    if deepspeed:  # DeepSpeed accumulates itself (and scales each micro-batch's loss by 1/GA)
        accelerator.gradient_accumulation_steps = cfg.gradient_accumulation_steps
        accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    main = accelerator.is_main_process
    if not main:
        hf_logging.set_verbosity_error()
    set_seed(cfg.seed)

    # Frozen base weights in bf16 where training runs in bf16 and only adapters are trained.
    dtype = torch.bfloat16 if mp == "bf16" and not cfg.full else torch.float32
    model, schedule = build_model(cfg, dtype)
    if cfg.gradient_checkpointing:
        enable_checkpointing(model)
    from ..models.llava import llava_spec

    spec = llava_spec(model)
    processor = AutoProcessor.from_pretrained(cfg.model)
    if dataset is None:
        dataset = InstructDataset(records, cfg.image_folder, processor,
                                  tokens_per_image=spec.tokens_per_image, image_token_id=spec.image_token_id,
                                  max_length=min(cfg.model_max_length, spec.max_positions))
    pad_id = processor.tokenizer.pad_token_id
    pad_id = 0 if pad_id is None else pad_id
    g = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.per_device_batch_size, shuffle=True, generator=g,
                                         collate_fn=functools.partial(collate, pad_token_id=pad_id),
                                         num_workers=cfg.num_workers)
    optimizer = torch.optim.AdamW(trainable_groups(model, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    ga = cfg.gradient_accumulation_steps
    per_epoch = max(1, math.ceil(len(loader) / ga))
    total = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(cfg.epochs * per_epoch))
    warmup = math.ceil(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule_fn(cfg.lr_scheduler, warmup, total))
    accelerator.register_for_checkpointing(scheduler)

    step = 0
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        step = json.loads((resume_dir / "trainer_state.json").read_text())["step"]
    world = accelerator.num_processes
    scale = world * (ga if deepspeed else 1)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        log(f"adsc train: schedule '{schedule}', {'full' if cfg.full else 'LoRA'} fine-tuning, {n_trainable:,} "
            f"trainable parameters; {len(dataset)} samples, {world} process(es) x batch {cfg.per_device_batch_size} "
            f"x accumulation {ga} = {world * cfg.per_device_batch_size * ga} per step; {total} steps"
            + (f", resumed at step {step}" if step else "") + f"; {accelerator.distributed_type.value}, "
            f"mixed precision {mp}")
        (out / "train_args.json").write_text(json.dumps({**asdict(cfg), "schedule": schedule}, indent=2))
    log_file = open(out / "train_log.jsonl", "a" if step else "w") if main else None
    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="adsc train", unit="step")

    model.train()
    t0 = time.perf_counter()
    done_batches = step * ga  # micro-batches per process already consumed (all processes take as many)

    def stream(start: int):
        """The micro-batches from the ``start``-th on, epoch after epoch (each epoch's order seeded)."""
        epoch, skip = divmod(start, len(loader))
        while True:
            loader.set_epoch(epoch)
            yield from (accelerator.skip_first_batches(loader, skip) if skip else loader)
            epoch, skip = epoch + 1, 0

    batches = stream(done_batches)
    try:
        while step < total:
            window = [next(batches) for _ in range(ga)]
            done_batches += ga
            n_local = torch.tensor(sum(_count_targets(b["labels"]) for b in window), device=accelerator.device)
            n_global = accelerator.reduce(n_local, reduction="sum")
            if int(n_global) == 0:
                raise TrainError(f"step {step}: the batch holds no label tokens")
            loss_sum = torch.zeros((), device=accelerator.device)
            for k, batch in enumerate(window):
                ctx = contextlib.nullcontext() if k == ga - 1 or deepspeed else accelerator.no_sync(model)
                with ctx:
                    if forward is None:
                        loss = model(**batch, num_items_in_batch=n_global).loss
                    else:
                        loss = forward(model, batch, n_global)
                    accelerator.backward(loss * scale)
                loss_sum += loss.detach()
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            step_loss = float(accelerator.reduce(loss_sum, reduction="sum"))
            if main:
                rec = {"step": step, "epoch": round(done_batches / len(loader), 4), "loss": step_loss,
                       "lr": scheduler.get_last_lr()[0], "tokens": int(n_global),
                       "grad_norm": None if grad_norm is None else float(grad_norm),
                       "seconds": round(time.perf_counter() - t0, 3)}
                if step % cfg.log_every == 0 or step == total:
                    log_file.write(json.dumps(rec) + "\n")
                    log_file.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}")
            if cfg.save_steps and step % cfg.save_steps == 0 and step < total:
                _save_state(accelerator, out, step)
    finally:
        if bar is not None:
            bar.close()
        if log_file is not None:
            log_file.close()

    _export(accelerator, model, cfg, schedule, dtype, processor)
    if main:
        log(f"adsc train: wrote {out} ({step} steps in {time.perf_counter() - t0:.1f} s)")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _save_state(accelerator, out: Path, step: int) -> None:
    path = out / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    accelerator.wait_for_everyone()


def _export(accelerator, model, cfg: TrainConfig, schedule: str, dtype: torch.dtype, processor) -> None:
    """Write the output checkpoint: the trained weights gathered from every engine
    (``get_state_dict`` also gathers FSDP / ZeRO-3 shards), loaded into a fresh copy of the model
    on the main process, LoRA merged, ``config.adsc_schedule`` set."""
    accelerator.wait_for_everyone()
    state = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    out = Path(cfg.output)
    fresh, _ = build_model(cfg, dtype)
    missing, unexpected = fresh.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in state.items()}, strict=False)
    missing = [k for k in missing if "lora_" in k or any(p.requires_grad for n, p in fresh.named_parameters() if n == k)]
    if missing or unexpected:  # pragma: no cover - a wrapper that renamed the weights
        raise TrainError(f"the trained weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if hasattr(fresh, "merge_and_unload"):
        if cfg.save_adapter:
            fresh.save_pretrained(out / "adapter")
        fresh = fresh.merge_and_unload()
    fresh.config.adsc_schedule = schedule
    fresh.config.use_cache = True
    from ..hf import remove_adsc

    remove_adsc(fresh, keep_config=True)
    fresh.save_pretrained(out)
    processor.save_pretrained(out)
