"""Fine-tuning with the ADSC schedule in place (spec section 9): ``adsc train`` /
``python -m adsc_ext.train``.

- :mod:`adsc_ext.train.data`: LLaVA instruction data -> :class:`InstructDataset` (the checkpoint's
  chat template, tokenizer and image processor; labels on the assistant turns) and :func:`collate`;
  both also work with ``transformers.Trainer`` and TRL's ``SFTTrainer``.
- :mod:`adsc_ext.train.loop`: :func:`train` on Accelerate (one process, DDP, FSDP or DeepSpeed,
  as launched), LoRA or full fine-tuning, writing a checkpoint with ``config.adsc_schedule``.
- :mod:`adsc_ext.train.cli`: the command line.
"""

from .data import IGNORE_INDEX, DataError, IndexCollator, InstructDataset, collate, load_records, to_messages
from .loop import LORA_TARGETS, TrainConfig, TrainError, build_model, train

__all__ = ["IGNORE_INDEX", "DataError", "IndexCollator", "InstructDataset", "collate", "load_records", "to_messages",
           "LORA_TARGETS", "TrainConfig", "TrainError", "build_model", "train"]
