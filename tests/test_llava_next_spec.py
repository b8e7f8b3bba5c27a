"""LLaVA-NeXT / LLaVA-OneVision model spec (adsc_ext.models.llava_next) against transformers' own
processors and models: the anyres geometry (adsc_ext.image_grids), the image spans of a batch, the
plan of spec section 4 on every grid with the newline kept with its row, and the errors.

The tiny models have the released checkpoints' anyres geometry with 56-pixel crops (4 x 4 tokens
per crop); the pure-arithmetic checks also run the real 7B processors' geometry.
"""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adsc_ext import Schedule  # noqa: E402
from adsc_ext.errors import AdscInputError, AdscModelError  # noqa: E402
from adsc_ext.image_grids import (anyres_layout, anyres_max_crops, onevision_video_layout,  # noqa: E402
                                  select_best_resolution)
from adsc_ext.models import LlavaNextSpec, model_spec  # noqa: E402
from adsc_ext.reference import kept_image_indices, stage_plan_reference  # noqa: E402
from adsc_ext.testing.llava_next import (IMAGE, VIDEO, random_images, tiny_llava_next,  # noqa: E402
                                         tiny_llava_next_config, tiny_llava_onevision,
                                         tiny_llava_onevision_config, tiny_processor, tiny_tokenizer)

torch.set_num_threads(1)

# The released checkpoints' geometry (llava-v1.6-mistral-7b-hf, llava-onevision-qwen2-7b-ov-hf).
NEXT_7B_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
OV_7B_PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
# (height, width) in pixels: landscape, portrait, square, tiny, huge, extreme strips, odd
SIZES = [(30, 100), (100, 30), (56, 56), (200, 200), (300, 90), (13, 170), (170, 13), (111, 57), (400, 500),
         (5, 900)]


def _random_sizes(n, seed=0, lo=1, hi=5000):
    rng = random.Random(seed)
    out = [(rng.randint(lo, hi), rng.randint(lo, hi)) for _ in range(n)]
    out += [(rng.randint(lo, 60), rng.randint(lo, hi)) for _ in range(n // 4)]  # strips
    return out + [(h, w) for w, h in out[: n // 4]]


# ---- the geometry, against transformers' arithmetic (no model) ---------------------------------
def test_select_best_resolution_equals_transformers():
    from transformers.image_processing_utils import select_best_resolution as theirs

    for size in _random_sizes(300):
        for pins in (NEXT_7B_PINPOINTS, OV_7B_PINPOINTS):
            assert select_best_resolution(size, pins) == tuple(theirs(list(size), pins)), size
    with pytest.raises(ValueError, match="positive"):
        select_best_resolution((0, 5), NEXT_7B_PINPOINTS)


def _real_processor(onevision: bool):
    if onevision:
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        from adsc_ext.testing.llava_next import _ImageOnlyOnevisionProcessor

        ip = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=OV_7B_PINPOINTS)
        return _ImageOnlyOnevisionProcessor(image_processor=ip, tokenizer=tiny_tokenizer(), num_image_tokens=729,
                                            vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    ip = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_grid_pinpoints=NEXT_7B_PINPOINTS)
    return transformers.LlavaNextProcessor(image_processor=ip, tokenizer=tiny_tokenizer(), patch_size=14,
                                           vision_feature_select_strategy="default", num_additional_image_tokens=1)


@pytest.mark.parametrize("onevision", [False, True], ids=["next-7b", "onevision-7b"])
def test_anyres_layout_counts_equal_the_real_processors(onevision):
    """The 7B processors' own token counts (``_get_num_multimodal_tokens``) for 375 image sizes."""
    proc = _real_processor(onevision)
    sizes = _random_sizes(300, seed=1)
    want = proc._get_num_multimodal_tokens(image_sizes=[list(s) for s in sizes])["num_image_tokens"]
    tower = 384 if onevision else 336
    max_crops = 9 if onevision else None
    pins = OV_7B_PINPOINTS if onevision else NEXT_7B_PINPOINTS
    got = [anyres_layout(s, pins, tower, 14, max_crops=max_crops).tokens for s in sizes]
    assert got == want
    # the research note's worked examples (transformers 5.24, real processors and models)
    if onevision:
        assert anyres_layout((480, 640), pins, 384, 14, max_crops=9).tokens == 2929
        big = anyres_layout((2000, 2000), pins, 384, 14, max_crops=9)
        assert (big.crops, big.hires, big.tokens) == (37, (81, 81), 7371)
        multi = anyres_layout((480, 640), pins, 384, 14, max_crops=9, multi_image=True)
        assert (multi.tokens, multi.grids, multi.text_tokens, multi.crops) == (730, [(27, 27, 0)], 1, 1)
        assert proc.replace_image_token({"batch_num_images": [2]}, 0) == "<image>" * multi.tokens
    else:
        assert anyres_layout((1000, 300), pins, 336, 14).tokens == 2232


def test_onevision_video_layout_equals_the_processor():
    proc = _real_processor(onevision=True)
    for frames in (1, 3, 8):
        grids, extra = onevision_video_layout(frames, 27)
        text = proc.replace_video_token({"pixel_values_videos": [torch.zeros(frames, 3, 384, 384)]}, 0)
        assert grids == [(14, 14, 0)] * frames and extra == 1
        assert text == "<video>" * (frames * 196 + 1)


def test_anyres_max_crops():
    assert anyres_max_crops("anyres_max_9") == 9 and anyres_max_crops(None) is None
    for bad in ("anyres", "anyres_max_0", "max_9", "anyres_max_x"):
        with pytest.raises(ValueError, match="anyres_max_N"):
            anyres_max_crops(bad)


# ---- tiny models: tokens, features and newline rows --------------------------------------------
@pytest.fixture(scope="module", params=["next", "onevision"])
def tiny(request):
    model = tiny_llava_next(seed=0) if request.param == "next" else tiny_llava_onevision(seed=0)
    return model, model_spec(model), tiny_processor(model.config)


def _features(model, spec, out):
    kw = {"batch_num_images": out["batch_num_images"]} if spec.onevision else {}
    with torch.no_grad():
        return list(model.model.get_image_features(out["pixel_values"], out["image_sizes"], return_dict=True,
                                                   **kw).pooler_output)


def test_spec_facts(tiny):
    model, spec, _ = tiny
    assert isinstance(spec, LlavaNextSpec)
    assert (spec.side, spec.tower_size, spec.patch_size) == (4, 56, 14)
    assert spec.image_token_id == IMAGE and spec.num_layers == 6
    assert spec.video_token_id == (VIDEO if spec.onevision else None)
    assert spec.max_crops == (4 if spec.onevision else None)
    assert spec.default_schedule() == "2:2,3:2,4:2"  # spec section 2: round(L/4), round(L/2), round(3L/4)
    assert spec.unbound().model is None and spec.unbound().image_newline is model.model.image_newline


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_items_equal_processor_tokens_and_model_features(tiny, size):
    """For each image size: the processor's <image> count == the layout's tokens == the rows of the
    model's packed features; the feature rows equal image_newline exactly at the layout's newline
    offsets (the last token of each high-resolution row) and nowhere else; the layout read back
    from the features (what generate gives) is the same."""
    model, spec, proc = tiny
    out = proc(images=random_images([size]), text=["w1 <image> w2"], return_tensors="pt")
    n_tok = int((out["input_ids"] == IMAGE).sum())
    (item,) = spec.image_items(image_sizes=out["image_sizes"], batch_num_images=out.get("batch_num_images"))
    (feat,) = _features(model, spec, out)
    assert item.tokens == n_tok == feat.shape[0]
    newline_rows = (feat == model.model.image_newline).all(-1).nonzero().flatten().tolist()
    want = []
    for off, h, w, nl in item.units:
        assert nl in (0, 1)
        want += [off + r * (w + 1) + w for r in range(h)] if nl else []
    layout = spec.layout(size)
    if layout.hires and layout.hires[1] == 0:  # unpadding left no column: the rows' newlines alone
        want = list(range(16, 16 + layout.hires[0]))
    assert newline_rows == want
    assert spec._item_from_features(0, feat) == item


def test_onevision_multi_image_items(tiny):
    model, spec, proc = tiny
    if not spec.onevision:
        pytest.skip("OneVision only")
    out = proc(images=[random_images([(30, 100), (200, 200)])], text=["w1 <image> w2 <image>"], return_tensors="pt")
    items = spec.image_items(image_sizes=out["image_sizes"], batch_num_images=out["batch_num_images"])
    feats = _features(model, spec, out)
    assert [it.tokens for it in items] == [f.shape[0] for f in feats] == [17, 17]
    assert items[0].grids == [(4, 4, 0)] and int((out["input_ids"] == IMAGE).sum()) == 34
    assert [spec._item_from_features(i, f) for i, f in enumerate(feats)] == items
    # without batch_num_images transformers patches every image, and so does the spec
    single = spec.image_items(image_sizes=out["image_sizes"])
    assert [it.tokens for it in single] == [spec.layout(s).tokens for s in [(30, 100), (200, 200)]]


# ---- spans and the plan of a batch ---------------------------------------------------------------
def _expected_positions(n_real, units, schedule):
    """Spec section 4 by hand: every real position of a sequence except the dropped image tokens;
    ``units`` = (start, h, w, newline) spans of the sequence."""
    stages = []
    for s in range(len(Schedule.coerce(schedule)) + 1):
        dropped = set()
        for start, h, w, nl in units:
            alive = set(kept_image_indices((h, w), schedule, newline=nl)[s])
            dropped |= {start + o for o in range(h * (w + nl)) if o not in alive}
        stages.append([p for p in range(n_real) if p not in dropped])
    return stages


def _batch(spec, proc):
    """A left-padded batch: images of different sizes (one prompt with two images), one prompt
    without an image."""
    prompts = ["w1 <image> w2 w3", "w4 w5", "<image> w6 <image>", "w7 <image>"]
    images = [random_images([(200, 200)], 1), [], random_images([(30, 100), (300, 90)], 2), random_images([(56, 56)], 3)]
    return proc(images=images, text=prompts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("schedule", ["", "2:2", "2:2,3:2", "1:4", "2:2,3:2,4:2"])
def test_batch_spans_and_plan(tiny, schedule):
    model, spec, proc = tiny
    out = _batch(spec, proc)
    ids, mask = out["input_ids"], out["attention_mask"]
    extra = {k: out[k] for k in ("image_sizes", "batch_num_images") if k in out}
    spans = spec.image_spans(ids, attention_mask=mask, **extra)
    assert spans.dtype == torch.int64 and spans.shape[1] == 5
    # every span covers image tokens only, and together they cover all of them but trailing newlines
    real = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    covered = set()
    for b, start, h, w, nl in spans.tolist():
        covered |= {(b, start + o) for o in range(h * (w + nl))}
        assert all(real[b][start + o] == IMAGE for o in range(h * (w + nl)))
    image_tokens = {(b, p) for b, row in enumerate(real) for p, t in enumerate(row) if t == IMAGE}
    assert covered <= image_tokens and len(image_tokens - covered) == (2 if spec.onevision else 0)
    plan = spec.plan(schedule, ids, attention_mask=mask, **extra)
    ref = stage_plan_reference(schedule, attention_mask=mask, image_spans=spans)
    for s, (st, rs) in enumerate(zip(plan.stages, ref.stages)):
        assert torch.equal(st.position_ids, rs.position_ids) and torch.equal(st.index, rs.index)
        for b in range(ids.shape[0]):
            units = [r[1:] for r in spans.tolist() if r[0] == b]
            want = _expected_positions(len(real[b]), units, schedule)[s]
            got = st.position_ids[b][st.attention_mask[b]].tolist()
            assert got == want, (s, b)
    # the stage lengths the serving loop would count, per prompt, from the same grids
    for b in range(ids.shape[0]):
        grids = [tuple(r[2:]) for r in spans.tolist() if r[0] == b]
        assert Schedule.coerce(schedule).stage_lengths(len(real[b]), grids) == [int(st.seq_lens[b]) for st in
                                                                                 plan.stages]
    # packed: the same kept positions per sequence
    lens = mask.sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)]).to(torch.int32)
    packed = spec.plan(schedule, ids[mask.bool()], cu_seqlens=cu, **extra)
    for st, pst in zip(plan.stages, packed.stages):
        assert st.position_ids[st.attention_mask].tolist() == pst.position_ids.tolist()


def test_spans_from_generate_features_equal_spans_from_sizes(tiny):
    """Inside generate the sizes are gone: the features (mm_encoder_outputs) give the same spans."""
    model, spec, proc = tiny
    out = _batch(spec, proc)
    extra = {k: out[k] for k in ("image_sizes", "batch_num_images") if k in out}
    want = spec.image_spans(out["input_ids"], attention_mask=out["attention_mask"], **extra)
    mm = {"image": transformers.modeling_outputs.BaseModelOutputWithPooling(pooler_output=_features(model, spec, out))}
    got = spec.unbound().image_spans(out["input_ids"], attention_mask=out["attention_mask"], mm_encoder_outputs=mm)
    assert torch.equal(got, want)


def test_onevision_video_spans(tiny):
    model, spec, proc = tiny
    if not spec.onevision:
        pytest.skip("OneVision only")
    frames = 3
    video = torch.randn(1, frames, 3, 56, 56)
    n = len(proc.replace_video_token({"pixel_values_videos": [video[0]]}, 0)) // len("<video>")
    assert n == frames * 4 + 1  # 4x4 pooled to 2x2 per frame, one trailing newline
    image = proc(images=random_images([(30, 100)]), text=["<image>"], return_tensors="pt")
    ids = torch.tensor([[1, 9] + [IMAGE] * 34 + [10] + [VIDEO] * n + [11]])
    spans = spec.image_spans(ids, pixel_values_videos=video, image_sizes=image["image_sizes"])
    assert spans.tolist() == [[0, 2, 4, 4, 0], [0, 18, 2, 8, 1]] + [[0, 37 + 4 * f, 2, 2, 0] for f in range(frames)]
    with torch.no_grad():
        feats = model.model.get_video_features(video, return_dict=True)
    if feats.pooler_output.shape[1] == frames * 4:  # older releases (5.17) append the newline in forward, not here
        newline = model.model.image_newline[None, None, :].to(feats.pooler_output)
        feats.pooler_output = torch.cat((feats.pooler_output, newline), dim=1)  # the format generate passes
    mm = {"video": feats, "image": transformers.modeling_outputs.BaseModelOutputWithPooling(
        pooler_output=_features(model, spec, image))}
    assert torch.equal(spec.image_spans(ids, mm_encoder_outputs=mm), spans)
    mask = torch.ones_like(ids)
    plan = spec.plan("1:2", ids, attention_mask=mask, pixel_values_videos=video, image_sizes=image["image_sizes"])
    assert plan.stages[1].num_tokens == ids.shape[1] - 8 - 8 - frames * 2  # base 4x4->4x2, 2x8->2x4, 2x2->2x1
    with pytest.raises(ValueError, match="cannot downsample"):  # 2x2 -> 2x1 -> 1x1 -> a side of 1 to halve
        spec.plan("1:2,2:2,3:2", ids, attention_mask=mask, pixel_values_videos=video, image_sizes=image["image_sizes"])


# ---- errors ---------------------------------------------------------------------------------------
def test_input_errors(tiny):
    model, spec, proc = tiny
    out = _batch(spec, proc)
    ids, mask = out["input_ids"], out["attention_mask"]
    extra = {k: out[k] for k in ("image_sizes", "batch_num_images") if k in out}
    with pytest.raises(AdscInputError, match=r"image tokens .* need"):  # images but no sizes nor features
        spec.image_spans(ids, attention_mask=mask)
    with pytest.raises(AdscInputError, match="split across prefill chunks"):  # a chunk that cuts an image
        spec.image_spans(ids[:, :-3], attention_mask=mask[:, :-3], **extra)
    sizes = out["image_sizes"].clone()
    sizes[0] = torch.tensor([56, 56])
    with pytest.raises(AdscInputError, match="need"):  # sizes that do not match the prompt
        spec.image_spans(ids, attention_mask=mask, **{**extra, "image_sizes": sizes})
    with pytest.raises(AdscInputError, match="positive"):
        spec.image_spans(ids, attention_mask=mask, **{**extra, "image_sizes": -out["image_sizes"]})
    # one image's tokens in two sequences (the counts agree, the runs do not)
    one = proc(images=random_images([(56, 56)]), text=["<image>"], return_tensors="pt")
    n = int(one["input_ids"].numel())
    two = torch.full((2, n), 9)
    two[0, -(n // 2):] = IMAGE
    two[1, : n - n // 2] = IMAGE
    with pytest.raises(AdscInputError, match="image 0 .* not one run"):
        spec.image_spans(two, image_sizes=one["image_sizes"])
    if spec.onevision:
        with pytest.raises(AdscInputError, match="batch_num_images"):
            spec.image_spans(ids, attention_mask=mask, image_sizes=out["image_sizes"], batch_num_images=[1, 1])
        with pytest.raises(AdscInputError, match="frames"):
            spec.image_spans(ids, attention_mask=mask, pixel_values_videos=torch.zeros(1, 3, 56, 56), **extra)
    # features that are not a base grid + newline-ended rows
    bad = torch.randn(16 + 10, spec.hidden_size)
    with pytest.raises(AdscInputError, match="image_newline"):
        spec._item_from_features(0, bad)
    with pytest.raises(AdscInputError, match="fewer than the base grid"):
        spec._item_from_features(0, bad[:5])


def _model_error(build, match, **config):
    with torch.device("meta"):
        model = build(**config)
    with pytest.raises(AdscModelError, match=match):
        model_spec(model)


def test_model_errors():
    from transformers import LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    def next_model(**kw):
        cfg = tiny_llava_next_config()
        for k, v in kw.items():
            setattr(cfg, k, v)
        return LlavaNextForConditionalGeneration(cfg)

    def ov_model(**kw):
        cfg = tiny_llava_onevision_config()
        for k, v in kw.items():
            setattr(cfg, k, v)
        return LlavaOnevisionForConditionalGeneration(cfg)

    _model_error(next_model, "must be 'default'", vision_feature_select_strategy="full")
    _model_error(ov_model, "must be 'full'", vision_feature_select_strategy="default")
    _model_error(next_model, "whole 56-pixel crops", image_grid_pinpoints=[[56, 100]])
    _model_error(ov_model, "anyres_max_N", vision_aspect_ratio="anyres")

    def mistral_window():
        cfg = tiny_llava_next_config()
        cfg.text_config.sliding_window = 4096
        return LlavaNextForConditionalGeneration(cfg)

    _model_error(mistral_window, "sliding-window")
    with pytest.raises(AdscModelError, match="LlavaNextForConditionalGeneration"):
        from adsc_ext.models import llava_next_spec

        llava_next_spec(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("onevision, layers, want", [(True, 28, "7:2,14:2,21:2"), (False, 32, "8:2,16:2,24:2")])
def test_default_schedules_of_the_7b_depths(onevision, layers, want):
    """Spec section 2: OneVision-7B (28 layers) and NeXT-7B (32 layers)."""
    build = tiny_llava_onevision_config if onevision else tiny_llava_next_config
    cls = transformers.LlavaOnevisionForConditionalGeneration if onevision else transformers.LlavaNextForConditionalGeneration
    with torch.device("meta"):
        spec = model_spec(cls(build(num_layers=layers)))
    assert spec.default_schedule() == want
    sched, infos = spec.resolve_schedule(None, None)
    assert str(sched) == want and len(infos) == 4


# ---- embeddings: what the model's own forward puts in the placeholder rows ----------------------------
def test_embed_equals_the_model_s_inputs_embeds(tiny):
    model, spec, proc = tiny
    out = _batch(spec, proc)
    extra = {k: out[k] for k in ("image_sizes", "batch_num_images") if k in out}
    seen = {}

    def grab(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**out)
            got = spec.embed(out["input_ids"], out["pixel_values"], **extra)
    finally:
        handle.remove()
    assert torch.equal(got, seen["embeds"])
