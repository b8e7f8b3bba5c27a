"""LLaVA instruction data for fine-tuning (spec section 9): :class:`InstructDataset` and
:func:`collate`.

The data is LLaVA's instruction format, a JSON list (or JSON Lines) of
``{"id", "image" | "images", "conversations": [{"from": "human" | "gpt", "value"}, ...]}`` where
``<image>`` in a ``value`` marks where each image goes (in the order of ``images``), and image paths
are relative to ``image_folder``.

A sample is rendered with the checkpoint's own chat template (``processor.apply_chat_template``),
tokenized with its own tokenizer and its images go through its own image processor, as at inference.
The labels are the assistant turns' tokens only: a turn's span is found by rendering the
conversation up to that turn (with the generation prompt) and up to its end, so any template that
renders a conversation's prefix as a prefix works. When a template does not close an assistant turn
with the end-of-sequence token (llava-hf's does not), it is appended to the turn, as LLaVA's own
training does (``</s>`` after every answer), so the tuned model stops.

Every row is checked when the dataset is built, before any training: a missing image file, an
``<image>`` count that does not match the images, a sample longer than the context, each raise
:class:`DataError` naming the row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Union

import torch

from ..errors import AdscInputError
from ..layout import IGNORE_INDEX  # one definition: the loss and the labels share it

__all__ = ["IGNORE_INDEX", "DataError", "Sample", "load_records", "chat_content", "to_messages", "InstructDataset", "collate",
           "IndexCollator"]

IMAGE = "<image>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class DataError(AdscInputError):
    """Training data that cannot be used as it is (the message names the file and the row)."""


def load_records(path: Union[str, Path]) -> List[dict]:
    """The rows of a LLaVA-format JSON list (``.json``) or JSON Lines file (``.jsonl``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--data {path}: no such file (a JSON list in LLaVA's instruction format is expected)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: a JSON list of samples is expected, got a {type(rows).__name__}")
    if not rows:
        raise DataError(f"{path}: the list of samples is empty")
    return rows


def _row_name(i: int, row: Any) -> str:
    rid = row.get("id") if isinstance(row, dict) else None
    return f"row {i}" + (f" (id {rid!r})" if rid is not None else "")


def _row_images(row: dict, where: str) -> List[str]:
    if "image" in row and "images" in row:
        raise DataError(f"{where}: give 'image' or 'images', not both")
    images = row.get("images", row.get("image"))
    if images is None:
        return []
    if isinstance(images, str):
        return [images]
    if isinstance(images, list) and all(isinstance(p, str) for p in images):
        return list(images)
    raise DataError(f"{where}: 'images' must be a list of file names (or 'image' one file name), got {images!r}")


def chat_content(parts: Sequence[str]) -> List[dict]:
    """A turn's content items from its text split at the image markers (``text.split("<image>")``):
    an image item between parts; the newline LLaVA puts after a marker (``"<image>\n"``) dropped,
    as chat templates render an image item as ``"<image>\n"`` themselves."""
    content: List[dict] = []
    for k, part in enumerate(parts):
        if k:
            content.append({"type": "image"})
            if part.startswith("\n"):
                part = part[1:]
        if part:
            content.append({"type": "text", "text": part})
    return content


def to_messages(conversations: Sequence[dict], where: str = "the sample") -> List[dict]:
    """LLaVA ``conversations`` as chat messages: ``human`` -> ``user``, ``gpt`` -> ``assistant``;
    a value's ``<image>`` markers become ``{"type": "image"}`` items in place. The newline LLaVA's
    data puts after a marker (``"<image>\nWhat is..."``) belongs to the marker: chat templates
    (llava-hf's too) render an image item as ``"<image>\n"``, so it is not kept twice."""
    if not isinstance(conversations, list) or not conversations:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of turns")
    messages = []
    for t, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str) or "from" not in turn:
            raise DataError(f"{where}, turn {t}: a turn is {{\"from\": \"human\"|\"gpt\", \"value\": str}}, got {turn!r}")
        role = _ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(f"{where}, turn {t}: 'from' must be 'human' or 'gpt', got {turn['from']!r}")
        content = chat_content(turn["value"].split(IMAGE))
        if role == "assistant" and any(c["type"] == "image" for c in content):
            raise DataError(f"{where}, turn {t}: an assistant turn cannot hold {IMAGE}")
        messages.append({"role": role, "content": content})
    return messages


@dataclass
class Sample:
    """One checked row: token ids with one image token per image (expanded in ``__getitem__``),
    their labels, and the image files."""

    name: str
    text: str  # the rendered conversation (EOS appended where the template has none)
    ids: List[int]
    labels: List[int]
    images: List[Path]
    length: int  # after expanding every image to its tokens


class InstructDataset(torch.utils.data.Dataset):
    """LLaVA-format samples tokenized with a checkpoint's processor and chat template.

    Args:
        records: the rows (:func:`load_records`).
        image_folder: where the rows' image paths are rooted.
        processor: the checkpoint's processor (``AutoProcessor.from_pretrained``): its chat
            template, tokenizer and image processor are used.
        tokens_per_image: vision tokens one image becomes (the model's grid, ``H * W``).
        image_token_id: the model's image token id.
        max_length: the longest sample allowed (tokens, images expanded): the model's context or
            a smaller ``--model-max-length``.
        append_eos: close every assistant turn with the end-of-sequence token when the template
            does not.

    ``dataset[i]`` is ``{"input_ids": [n], "labels": [n], "pixel_values": [k, 3, S, S] | None}``.
    """

    def __init__(self, records: Sequence[dict], image_folder: Union[str, Path, None], processor, *,
                 tokens_per_image: int, image_token_id: int, max_length: int, append_eos: bool = True):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise DataError("the checkpoint's processor has no chat template; save one with the processor "
                            "(processor.chat_template = ...; processor.save_pretrained(DIR))")
        self.image_folder = Path(image_folder) if image_folder is not None else None
        self.tokens_per_image = int(tokens_per_image)
        self.image_token_id = int(image_token_id)
        self.max_length = int(max_length)
        self.append_eos = append_eos
        self.samples = [self._prepare(i, row) for i, row in enumerate(records)]
        self._check_processor()

    # ---- preparation (every row, up front) ---------------------------------------------------------
    def _render(self, messages, generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _prepare(self, i: int, row: Any) -> Sample:
        where = _row_name(i, row)
        if not isinstance(row, dict):
            raise DataError(f"{where}: a sample is a JSON object, got {type(row).__name__}")
        messages = to_messages(row.get("conversations"), where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no 'gpt' turn, so nothing to learn")
        files = _row_images(row, where)
        n_marks = sum(c["type"] == "image" for m in messages for c in m["content"])
        if n_marks != len(files):
            raise DataError(f"{where}: the conversation has {n_marks} {IMAGE} marker(s) but the sample lists "
                            f"{len(files)} image(s) ({files})")
        paths = []
        for f in files:
            p = Path(f) if self.image_folder is None else self.image_folder / f
            if not p.is_file():
                raise DataError(f"{where}: image {f!r} not found (looked for {p})")
            paths.append(p)

        text, spans = self._text_and_spans(messages, where)
        enc = self.tokenizer(text, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        labels = [IGNORE_INDEX] * len(ids)
        for start, end in spans:
            for t, (a, b) in enumerate(offsets):
                if b > a and start <= a < end:
                    labels[t] = ids[t]
        n_img = sum(t == self.image_token_id for t in ids)
        if n_img != len(paths):
            raise DataError(f"{where}: the rendered conversation holds {n_img} image tokens for {len(paths)} "
                            f"image(s): the tokenizer does not map {IMAGE} to the model's image token "
                            f"{self.image_token_id}")
        if all(lab == IGNORE_INDEX for lab in labels):
            raise DataError(f"{where}: the assistant turns tokenize to nothing")
        length = len(ids) + n_img * (self.tokens_per_image - 1)
        if length > self.max_length:
            raise DataError(f"{where}: the sample is {length} tokens long ({len(ids) - n_img} text tokens + {n_img} "
                            f"image(s) of {self.tokens_per_image}), longer than the context of {self.max_length}; "
                            f"shorten it or raise --model-max-length (the model has its own limit)")
        return Sample(where, text, ids, labels, paths, length)

    def _text_and_spans(self, messages, where: str):
        """The rendered conversation and the character spans of its assistant turns."""
        eos = getattr(self.tokenizer, "eos_token", None)
        full = self._render(messages, False)
        text, spans, taken = "", [], 0  # `text` is `full` with any appended EOS tokens
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._render(messages[:k], True) if k else ""
            through = self._render(messages[: k + 1], False)
            if not (full.startswith(before) and through.startswith(before) and full.startswith(through)):
                raise DataError(f"{where}: the chat template does not render the conversation up to turn {k} as a "
                                f"prefix of the whole, so the assistant turns cannot be located")
            turn = full[len(before):len(through)]
            text += full[taken:len(before)]
            start = len(text)
            end = len(turn)
            if self.append_eos and eos and eos not in turn:
                body = turn.rstrip()
                turn = body + eos + turn[len(body):]
                end = len(body) + len(eos)  # the template's whitespace after the turn is no label
            text += turn
            spans.append((start, start + end))
            taken = len(through)
        return text + full[taken:], spans

    def _check_processor(self) -> None:
        """The processor's own expansion of the first sample with images matches ours."""
        for s in self.samples:
            if s.images:
                got = self.processor(text=s.text, images=self._load(s), return_tensors="pt")
                want = self._expand(s)[0].tolist()
                if got["input_ids"][0].tolist() != want:
                    raise DataError(f"{s.name}: the processor expands the images to "
                                    f"{int((got['input_ids'] == self.image_token_id).sum())} tokens, the model's grid "
                                    f"to {len(s.images) * self.tokens_per_image}: processor and model do not match")
                return

    # ---- items ------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    @property
    def lengths(self) -> List[int]:
        return [s.length for s in self.samples]

    def _load(self, s: Sample):
        from PIL import Image

        out = []
        for p in s.images:
            try:
                with Image.open(p) as im:
                    out.append(im.convert("RGB"))
            except OSError as exc:
                raise DataError(f"{s.name}: cannot read image {p}: {exc}") from None
        return out

    def _expand(self, s: Sample):
        ids, labels = [], []
        for t, lab in zip(s.ids, s.labels):
            if t == self.image_token_id:
                ids += [t] * self.tokens_per_image
                labels += [IGNORE_INDEX] * self.tokens_per_image
            else:
                ids.append(t)
                labels.append(lab)
        return torch.tensor(ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        s = self.samples[i]
        ids, labels = self._expand(s)
        pixel_values = None
        if s.images:
            pixel_values = self.processor.image_processor(self._load(s), return_tensors="pt")["pixel_values"]
        return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values}


def collate(batch: Sequence[Dict[str, Any]], pad_token_id: int = 0) -> Dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` ``[B, L]`` and the batch's images
    ``pixel_values [sum k, 3, S, S]`` in row order (absent when no row has an image)."""
    if not batch:
        raise ValueError("collate() needs at least one sample")
    width = max(int(b["input_ids"].numel()) for b in batch)
    B = len(batch)
    ids = torch.full((B, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((B, width), dtype=torch.long)
    labels = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    for r, b in enumerate(batch):
        n = int(b["input_ids"].numel())
        ids[r, :n] = b["input_ids"]
        mask[r, :n] = 1
        labels[r, :n] = b["labels"]
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pix = [b["pixel_values"] for b in batch if b.get("pixel_values") is not None]
    if pix:
        out["pixel_values"] = torch.cat(pix, dim=0)
    return out


class IndexCollator:
    """For trainers that take only a ``datasets.Dataset`` (TRL's ``SFTTrainer``): give them
    ``datasets.Dataset.from_dict({"index": list(range(len(dataset)))})`` and this collator, which
    turns a batch of ``{"index": i}`` rows into :func:`collate` of the samples (images are still
    read lazily, per batch)."""

    def __init__(self, dataset: InstructDataset, pad_token_id: int = 0):
        self.dataset, self.pad_token_id = dataset, pad_token_id

    def __call__(self, rows: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        return collate([self.dataset[int(r["index"])] for r in rows], self.pad_token_id)
