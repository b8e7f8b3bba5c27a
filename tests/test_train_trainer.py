"""adsc_ext.train's dataset and collator with transformers' ``Trainer`` and TRL's ``SFTTrainer``
(what LLaVA fine-tuners use): one optimizer step on the whole tiny dataset, whose logged loss is
the model's own loss on that batch (with ``Trainer``: the ADSC model's, spec 6.4).

TRL 1.16's ``SFTTrainer`` replaces the model's forward with its fused LM head, which computes the
loss from the backbone's hidden states against labels in the input's layout; an ADSC model's
hidden states are in the last stage's (shorter) layout, so ADSC fine-tuning does not run under it
(``adsc train`` or ``Trainer`` do). What is tested with it: the dataset and the collator, on the
model without ADSC."""

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from adsc_ext.testing.checkpoint import IMAGE_TOKEN_ID, build_tiny_checkpoint  # noqa: E402
from adsc_ext.train import InstructDataset, TrainConfig, build_model, collate, load_records  # noqa: E402

from train_fixtures import SCHEDULE, make_data  # noqa: E402


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    from transformers import AutoProcessor

    root = tmp_path_factory.mktemp("trainer")
    ckpt = build_tiny_checkpoint(root / "ckpt", schedule=SCHEDULE)
    data = make_data(root)
    proc = AutoProcessor.from_pretrained(ckpt)
    ds = InstructDataset(load_records(data), root / "images", proc, tokens_per_image=16, image_token_id=IMAGE_TOKEN_ID,
                         max_length=512)
    cfg = TrainConfig(model=str(ckpt), data=str(data), output=str(root / "out"), lora_r=8, lora_alpha=16,
                      lora_dropout=0.0, gradient_checkpointing=False)
    return root, cfg, ds


def _run(trainer_cls, args, model, ds, train_dataset=None, data_collator=collate, rel=1e-4, **kw):
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():
        want = float(model(**collate([ds[i] for i in range(len(ds))])).loss)  # the batch of all 8 samples
    trainer = trainer_cls(model=model, args=args, train_dataset=ds if train_dataset is None else train_dataset,
                          data_collator=data_collator, **kw)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert losses[0] == pytest.approx(want, rel=rel)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lora_B" in n for n in moved) and any("multi_modal_projector" in n for n in moved)


def test_transformers_trainer(parts):
    from transformers import Trainer, TrainingArguments

    root, cfg, ds = parts
    model, schedule = build_model(cfg)
    assert schedule == SCHEDULE
    args = TrainingArguments(output_dir=str(root / "hf"), per_device_train_batch_size=len(ds), max_steps=1,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             remove_unused_columns=False, dataloader_num_workers=0)
    _run(Trainer, args, model, ds)


def test_trl_sft_trainer(parts):
    pytest.importorskip("trl")
    from trl import SFTConfig, SFTTrainer

    from adsc_ext.hf import remove_adsc

    root, cfg, ds = parts
    model, _ = build_model(cfg)
    remove_adsc(model)  # see the module docstring
    args = SFTConfig(output_dir=str(root / "sft"), per_device_train_batch_size=len(ds), max_steps=1,
                     learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                     remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True}, max_length=None)
    import datasets

    from adsc_ext.train import IndexCollator

    # SFTTrainer takes a datasets.Dataset: one of row indices, the samples made by the collator
    rows = datasets.Dataset.from_dict({"index": list(range(len(ds)))})
    # rel 1e-3: TRL's fused LM head computes the log-probabilities its own way (measured 1.5e-4 off);
    # a token counted twice or missed would be ~1 % off (about 90 label tokens)
    _run(SFTTrainer, args, model, ds, train_dataset=rows, data_collator=IndexCollator(ds), processing_class=ds.processor,
         rel=1e-3)
