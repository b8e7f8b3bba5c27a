"""A few steps of LoRA fine-tuning with the ADSC schedule in place (as the paper trains).

    python examples/lora_finetune_tiny.py [STEPS]

The loop below is the smallest picture of what happens; to fine-tune a real checkpoint on LLaVA
instruction data (the checkpoint's chat template, several processes, LoRA merged into a checkpoint
that serves as it is) use ``adsc train`` (``adsc_ext.train``, docs/training.md).

A tiny random LLaVA learns to answer with a fixed caption for its images; the loss is ADSC's
(spec 6.4: next-token targets shifted on the original sequence, then compacted with the tokens).
Needs `peft`.
"""

import sys

import torch
from peft import LoraConfig, get_peft_model

from adsc_ext.hf import apply_adsc, enable_checkpointing
from adsc_ext.testing import TinyProcessor, tiny_llava


def main(steps: int = 20, out_dir: str = "lora-adsc-tiny"):
    torch.manual_seed(0)
    model = tiny_llava(grid_side=4, num_layers=6, attn_implementation="sdpa")
    apply_adsc(model, "2:2,4:2")  # 16 -> 8 -> 4 image tokens
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.print_trainable_parameters()
    enable_checkpointing(model)  # activation_checkpointing_enable from transformers 5.23, the older name before
    model.train()

    proc = TinyProcessor(model.config)
    prompts = ["<image>what is it? a cat", "<image>and this? a dog", "<image><image>both? cat and dog"]
    imgs = [torch.rand(3, 16, 16) for _ in range(4)]
    batch = proc(prompts, images=imgs, padding_side="right")
    labels = batch["input_ids"].clone()
    labels[batch["attention_mask"] == 0] = -100
    labels[labels == model.config.image_token_id] = -100  # learn the text, not the image tokens

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step:2d}  loss {loss.item():.4f}")
    model.save_pretrained(out_dir)  # adapter; the base config carries adsc_schedule
    print(f"saved the LoRA adapter to {out_dir}")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 20)
