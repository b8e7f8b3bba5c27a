"""A tiny LLaVA-1.5 checkpoint saved the way a published one is: weights, a real tokenizer, a
``LlavaProcessor`` (CLIP image processor + tokenizer) and a chat template, all in one folder, so
``from_pretrained`` / ``AutoProcessor.from_pretrained`` / ``apply_chat_template`` work on it as on
``llava-hf/llava-1.5-7b-hf``. Built from configs; nothing is downloaded.

- The tokenizer is a byte-level BPE without merges (every UTF-8 byte is one token, so any text
  tokenizes) plus ``<pad>``, ``<s>``, ``</s>`` and ``<image>`` (the model's image token id, the
  last id of the vocabulary).
- The chat template is LLaVA-1.5's (Vicuna v1) conversation format,
  ``USER: <image>\\n{question} ASSISTANT: {answer}</s>``, rendering a message's images and texts in
  their order.
- The weights are :func:`adsc_ext.testing.tiny_llava`'s, sized by the keyword arguments.

Used by the training tests, the lmms-eval plugin's test and the self-compression study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

__all__ = ["CHAT_TEMPLATE", "VOCAB_SIZE", "PAD", "BOS", "EOS", "IMAGE_TOKEN_ID", "build_processor",
           "build_tiny_checkpoint"]

PAD, BOS, EOS = 0, 1, 2
BYTE0 = 3  # bytes 0..255 are ids 3..258
IMAGE_TOKEN_ID = BYTE0 + 256  # 259
VOCAB_SIZE = IMAGE_TOKEN_ID + 1

#: LLaVA-1.5's conversation format (what llava-hf's template renders), images in message order.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] if message['content'] is string "
    "else message['content'][0]['text'] }}{{ ' ' }}"
    "{%- else -%}"
    "{{ message['role'] | upper }}{{ ': ' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' -%}{{ '<image>\\n' }}{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- else -%}{{ ' ' }}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def _bytes_to_unicode() -> dict:
    """GPT-2's printable stand-in character for every byte (what the ByteLevel pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<s>": BOS, "</s>": EOS}
    for b, ch in _bytes_to_unicode().items():
        vocab[ch] = BYTE0 + b
    vocab["<image>"] = IMAGE_TOKEN_ID
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<pad>", "<s>", "</s>", "<image>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def build_processor(image_size: int, patch_size: int):
    """A ``LlavaProcessor`` for a tower of ``image_size`` pixels and ``patch_size`` patches."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        do_center_crop=True, do_resize=True, do_normalize=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=_tokenizer(), patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>", chat_template=CHAT_TEMPLATE,
    )


def build_tiny_checkpoint(path, *, schedule: Optional[str] = None, seed: int = 0, grid_side: int = 4,
                          patch_size: int = 4, num_layers: int = 6, hidden_size: int = 64, num_heads: int = 4,
                          num_kv_heads: int = 2, vision_hidden: int = 32, vision_layers: int = 2,
                          max_positions: int = 512) -> Path:
    """Save a random-weight tiny LLaVA with its processor and chat template under ``path``.

    ``schedule`` is stored as ``config.adsc_schedule`` when given. The text model has
    ``max_positions`` positions (the context a training sample must fit)."""
    from .llava import tiny_llava

    path = Path(path)
    model = tiny_llava(seed=seed, grid_side=grid_side, patch_size=patch_size, num_layers=num_layers,
                       hidden_size=hidden_size, num_heads=num_heads, num_kv_heads=num_kv_heads,
                       vocab_size=VOCAB_SIZE, vision_hidden=vision_hidden, vision_layers=vision_layers)
    model.config.text_config.max_position_embeddings = max_positions
    model.config.text_config.eos_token_id = EOS
    model.generation_config.eos_token_id = EOS
    model.generation_config.pad_token_id = PAD
    if schedule is not None:
        model.config.adsc_schedule = schedule
    model.save_pretrained(path)
    build_processor(grid_side * patch_size, patch_size).save_pretrained(path)
    return path
