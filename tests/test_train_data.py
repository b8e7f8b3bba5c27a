"""adsc_ext.train.data: LLaVA instruction data through a checkpoint's own processor and chat template."""

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("PIL")

from adsc_ext.testing.checkpoint import EOS, IMAGE_TOKEN_ID, build_processor, build_tiny_checkpoint  # noqa: E402
from adsc_ext.train import IGNORE_INDEX, DataError, InstructDataset, collate, load_records  # noqa: E402

from train_fixtures import make_data, samples, write_images  # noqa: E402

TPI = 16  # the tiny checkpoint's 4x4 grid


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_data(root)
    return root


@pytest.fixture(scope="module")
def processor():
    return build_processor(16, 4)


def dataset(rows, folder, processor, **kw):
    kw.setdefault("max_length", 512)
    return InstructDataset(rows, folder / "images", processor, tokens_per_image=TPI, image_token_id=IMAGE_TOKEN_ID, **kw)


def labeled_text(tok, item) -> list:
    """The label spans of an item, decoded, one string per contiguous span."""
    spans, cur = [], []
    for t, lab in zip(item["input_ids"].tolist(), item["labels"].tolist()):
        if lab != IGNORE_INDEX:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return [tok.decode(s) for s in spans]


def test_labels_cover_the_assistant_turns_only(folder, processor):
    ds = dataset(samples(), folder, processor)
    tok = processor.tokenizer
    one, multi = ds[0], ds[3]
    assert labeled_text(tok, one) == [" number 0</s>"]
    assert labeled_text(tok, multi) == [" no 3</s>", " yes</s>"]
    # the whole sequence is what the processor makes of the rendered conversation (what inference sees)
    text = processor.apply_chat_template([
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "left, "}, {"type": "image"},
                                     {"type": "text", "text": " right: same?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "no 3"}]},
        {"role": "user", "content": [{"type": "text", "text": "sure?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "yes"}]}], tokenize=False)
    assert text == "USER: <image>\nleft, <image>\n right: same? ASSISTANT: no 3</s>USER: sure? ASSISTANT: yes</s>"
    from PIL import Image

    imgs = [Image.open(folder / "images" / f).convert("RGB") for f in ("3.png", "4.png")]
    want = processor(text=text, images=imgs, return_tensors="pt")
    assert multi["input_ids"].tolist() == want["input_ids"][0].tolist()
    torch.testing.assert_close(multi["pixel_values"], want["pixel_values"], rtol=0, atol=0)
    ids = multi["input_ids"]
    assert int((ids == IMAGE_TOKEN_ID).sum()) == 2 * TPI
    assert (multi["labels"][ids == IMAGE_TOKEN_ID] == IGNORE_INDEX).all()
    assert ds.lengths[3] == ids.numel()


def test_eos_is_appended_where_the_template_has_none(folder, processor):
    import copy

    proc = copy.deepcopy(processor)
    proc.chat_template = proc.chat_template.replace("{{ '</s>' }}", "{{ ' ' }}")  # llava-hf's style
    tok = proc.tokenizer
    ds = dataset(samples()[:1], folder, proc)
    assert labeled_text(tok, ds[0]) == [" number 0</s>"]
    assert ds[0]["input_ids"][-2].item() == EOS  # EOS closes the turn; the template's space follows
    ds = dataset(samples()[:1], folder, proc, append_eos=False)
    assert labeled_text(tok, ds[0]) == [" number 0 "]


def test_text_only_rows_and_collate(folder, processor):
    rows = [{"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
            *samples()[:2]]
    ds = dataset(rows, folder, processor)
    assert ds[0]["pixel_values"] is None
    batch = collate([ds[0], ds[1], ds[2]], pad_token_id=0)
    B, L = batch["input_ids"].shape
    assert B == 3 and L == max(ds.lengths)
    for r in range(3):
        n = ds.lengths[r]
        assert batch["attention_mask"][r].tolist() == [1] * n + [0] * (L - n)  # right padding
        assert batch["input_ids"][r, :n].tolist() == ds[r]["input_ids"].tolist()
        assert (batch["input_ids"][r, n:] == 0).all() and (batch["labels"][r, n:] == IGNORE_INDEX).all()
    torch.testing.assert_close(batch["pixel_values"], torch.cat([ds[1]["pixel_values"], ds[2]["pixel_values"]]))
    assert "pixel_values" not in collate([ds[0]])
    with pytest.raises(ValueError, match="at least one"):
        collate([])


def _error(rows, folder, processor, match, **kw):
    with pytest.raises(DataError, match=match):
        dataset(rows, folder, processor, **kw)


def test_errors_name_the_row(folder, processor):
    good = samples()[0]
    _error([good, {**good, "id": "x1", "image": "nope.png"}], folder, processor, r"row 1 \(id 'x1'\): image 'nope.png' not found")
    two = {**good, "id": "x2", "images": ["0.png", "1.png"]}
    del two["image"]
    _error([two], folder, processor, r"row 0 \(id 'x2'\): the conversation has 1 <image> marker\(s\) but the sample lists 2")
    _error([{**good, "id": "x3", "images": ["0.png"]}], folder, processor, "give 'image' or 'images', not both")
    _error([good], folder, processor, r"row 0 \(id 's0'\): the sample is 56 tokens long \(40 text tokens \+ 1 image\(s\) of 16\), longer than the context of 20", max_length=20)
    _error([{"id": "x4", "conversations": [{"from": "human", "value": "hi"}]}], folder, processor, "no 'gpt' turn")
    _error([{"id": "x5", "conversations": [{"from": "bot", "value": "hi"}]}], folder, processor, "'from' must be")
    _error([{"id": "x6", "conversations": "hi"}], folder, processor, "non-empty list of turns")
    _error([{"id": "x7", "image": "0.png", "conversations": [{"from": "human", "value": "q"},
                                                            {"from": "gpt", "value": "<image>"}]}],
           folder, processor, "assistant turn cannot hold <image>")
    _error(["text"], folder, processor, "row 0: a sample is a JSON object")


def test_load_records_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_records(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(DataError, match="not valid JSON"):
        load_records(bad)
    bad.write_text(json.dumps({"id": 1}))
    with pytest.raises(DataError, match="a JSON list of samples"):
        load_records(bad)
    bad.write_text("[]")
    with pytest.raises(DataError, match="empty"):
        load_records(bad)
    jl = tmp_path / "d.jsonl"
    jl.write_text("\n".join(json.dumps(r) for r in samples()[:3]) + "\n")
    assert [r["id"] for r in load_records(jl)] == ["s0", "s1", "s2"]


def test_processor_without_chat_template(folder, processor):
    import copy

    proc = copy.deepcopy(processor)
    proc.chat_template = None
    proc.tokenizer.chat_template = None
    _error(samples()[:1], folder, proc, "no chat template")


def test_processor_and_model_grid_must_agree(folder, processor):
    with pytest.raises(DataError, match="processor and model do not match"):
        InstructDataset(samples()[:1], folder / "images", processor, tokens_per_image=9, image_token_id=IMAGE_TOKEN_ID,
                        max_length=512)


def test_checkpoint_round_trip(tmp_path):
    """The saved checkpoint loads with transformers' Auto classes, processor and template included."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = build_tiny_checkpoint(tmp_path / "c", schedule="2:2")
    model = LlavaForConditionalGeneration.from_pretrained(path)
    assert model.config.adsc_schedule == "2:2"
    proc = AutoProcessor.from_pretrained(path)
    assert proc.chat_template is not None and proc.tokenizer.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_ID
    write_images(tmp_path / "im", 1)
    from PIL import Image

    enc = proc(text="USER: <image>\nhi ASSISTANT:", images=[Image.open(tmp_path / "im" / "0.png")], return_tensors="pt")
    assert int((enc["input_ids"] == IMAGE_TOKEN_ID).sum()) == TPI
    assert proc.tokenizer.decode(proc.tokenizer("héllo wörld")["input_ids"], skip_special_tokens=True) == "héllo wörld"
