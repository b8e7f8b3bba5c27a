"""apply_adsc on LLaVA-NeXT and LLaVA-OneVision (tiny random models from transformers' own config
classes, inputs from their real processors): spec section 6's equivalences in eager and sdpa --
empty schedule == unmodified, prefill == a by-hand oracle and batch == alone with images of
different sizes in one left-padded batch, cache == no-cache recomputation (generate's prefill gets
the vision features instead of image_sizes), the loss -- the per-layer cache lengths of spec
section 4 with the newline kept with its row, a OneVision video, and the input errors."""

import copy

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from adsc_ext.errors import AdscInputError  # noqa: E402
from adsc_ext.hf import AdscCache, adsc_layout, apply_adsc  # noqa: E402
from adsc_ext.models import model_spec  # noqa: E402
from oracle import run_decoder  # noqa: E402
from adsc_ext.schedule import Schedule  # noqa: E402
from adsc_ext.testing.llava_next import (IMAGE, VIDEO, random_images, tiny_llava_next,  # noqa: E402
                                         tiny_llava_onevision, tiny_processor)

torch.set_num_threads(1)
ATOL = 2e-5
ARCHS = ["next", "onevision"]
SCHEDULE = "2:2,3:2,4:2"  # the spec-2 default of the tiny models' 6 layers
#: a left-padded batch: images of different sizes (grids 8x8, 2x8, 12x4 with newlines), a row
#: without images, a prompt of two images (OneVision: a multi-image sample, base grid + newline each)
PROMPTS = ["w1 <image> w2 w3", "w4 w5 w6 w7", "<image> w8 <image> w9"]
SIZES = [[(200, 200)], [], [(30, 100), (300, 90)]]

_MODELS = {}


def model_for(arch, impl="sdpa", schedule=SCHEDULE):
    """``(plain, adsc)``: a cached plain tiny model and a fresh ADSC copy of it."""
    if (arch, impl) not in _MODELS:
        build = tiny_llava_next if arch == "next" else tiny_llava_onevision
        _MODELS[arch, impl] = build(seed=0, attn_implementation=impl)
    plain = _MODELS[arch, impl]
    return plain, apply_adsc(copy.deepcopy(plain), schedule)


def inputs(model, rows=range(len(PROMPTS)), padding_side="left"):
    proc = tiny_processor(model.config)
    proc.tokenizer.padding_side = padding_side
    rows = list(rows)
    images = [random_images(SIZES[b], seed=b) for b in rows]
    return dict(proc(images=images if any(images) else None, text=[PROMPTS[b] for b in rows], return_tensors="pt",
                     padding=True))


def _units(model, one):
    """``(start, (h, w), newline)`` of every grid of ONE unpadded sequence, from its processor
    outputs (the layout adsc_ext.image_grids computes, checked against the processors and the
    models' features in test_llava_next_spec.py)."""
    spec = model_spec(model)
    row = one["input_ids"][0].tolist()
    sizes = one["image_sizes"].tolist() if "image_sizes" in one else []
    multi = spec.onevision and "batch_num_images" in one and int(one["batch_num_images"][0]) > 1
    layouts = iter([spec.layout(s, multi_image=multi) for s in sizes])
    units, p = [], 0
    while p < len(row):
        if row[p] == IMAGE:
            lay = next(layouts)
            units.append((p, lay.base, 0))
            if lay.hires and lay.hires[1] > 0:
                units.append((p + lay.base[0] * lay.base[1], lay.hires, 1))
            p += lay.tokens
        elif row[p] == VIDEO:
            frames = one["pixel_values_videos"].shape[1]
            side = (spec.side + 1) // 2
            units += [(p + f * side * side, (side, side), 0) for f in range(frames)]
            p += frames * side * side + 1
        else:
            p += 1
    return units


def naive_forward(plain, one, schedule):
    """Spec oracle for ONE unpadded sequence: the unmodified model's own input embeddings (vision
    features in place), then every decoder layer run by hand on the tokens alive at it
    (kept_image_indices of every grid, newline column kept with its rows), original positions,
    an explicit causal mask. Returns the last stage's logits ``[n_kept, V]`` and the kept positions."""
    schedule = Schedule.coerce(schedule)
    text = plain.model.language_model
    seen = {}
    handle = text.register_forward_pre_hook(lambda m, a, kw: seen.update(h=kw["inputs_embeds"]), with_kwargs=True)
    try:
        with torch.no_grad():
            plain(**one)
    finally:
        handle.remove()
    with torch.no_grad():
        return run_decoder(text, plain.lm_head, seen["h"], _units(plain, one), schedule)


def _gen(model, inp, n, **kw):
    with torch.no_grad():
        g = model.generate(**inp, max_new_tokens=n, min_new_tokens=n, do_sample=False, suppress_tokens=[IMAGE, VIDEO],
                           **kw)
    return g[:, inp["input_ids"].shape[1]:]


def _greedy_recompute(model, inp, steps):
    """Spec 6.2 oracle: the whole sequence (with its images) re-run with the schedule at every
    step, without a cache."""
    cur = dict(inp)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            last = model(**cur, use_cache=False).logits[:, -1].clone()
        last[:, [IMAGE, VIDEO]] = -float("inf")
        nxt = last.argmax(-1)
        out.append(nxt)
        cur["input_ids"] = torch.cat([cur["input_ids"], nxt[:, None]], 1)
        cur["attention_mask"] = torch.cat([cur["attention_mask"], torch.ones_like(nxt[:, None])], 1)
    return torch.stack(out, 1)


# ---- 6.1 empty schedule == unmodified model ------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_empty_schedule_matches_unmodified(arch, impl):
    plain, model = model_for(arch, impl, "")
    inp = inputs(plain)
    with torch.no_grad():
        ref, got = plain(**inp).logits, model(**inp).logits
    m = inp["attention_mask"].bool()
    torch.testing.assert_close(got[m], ref[m], atol=ATOL, rtol=1e-4)
    assert torch.equal(_gen(model, inp, 5), _gen(plain, inp, 5))


# ---- the prefill == the oracle; 6.3 batch == alone ---------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_prefill_matches_oracle_and_alone(arch, impl):
    plain, model = model_for(arch, impl)
    inp = inputs(model)
    with torch.no_grad():
        out = model(**inp)
    S = inp["input_ids"].shape[1]
    lay = adsc_layout(out)
    for b in range(len(PROMPTS)):
        one = inputs(model, [b])
        n = one["input_ids"].shape[1]
        ref, kept = naive_forward(plain, one, SCHEDULE)
        with torch.no_grad():
            alone = model(**one)
        src = lay.source_index[b]
        real = src >= 0
        assert (src[real].long() - b * S - (S - n)).tolist() == kept
        assert lay.position_ids[b][real].tolist() == kept  # kept tokens keep their positions
        torch.testing.assert_close(out.logits[b][real], ref, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(alone.logits[0], ref, atol=ATOL, rtol=1e-4)
        if b != 1:
            assert len(kept) < n  # images were downsampled


# ---- 6.2 cache == no-cache recomputation; the per-layer cache lengths ----------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_generate_equals_recomputation(arch, impl):
    """generate runs the vision tower first and gives the prefill the features, not image_sizes:
    the spec reads each grid from the newline rows; the recomputation passes image_sizes."""
    _, model = model_for(arch, impl)
    inp = inputs(model)
    assert torch.equal(_gen(model, inp, 5), _greedy_recompute(model, inp, 5))


@pytest.mark.parametrize("arch", ARCHS)
def test_cache_layer_lengths_are_the_stage_lengths(arch):
    plain, model = model_for(arch)
    inp = inputs(model)
    with torch.no_grad():
        out = model(**inp, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, AdscCache)
    sched = Schedule.parse(SCHEDULE)
    per_row = []
    for b in range(len(PROMPTS)):
        one = inputs(model, [b])
        grids = [(gh, gw, nl) for _, (gh, gw), nl in _units(plain, one)]
        per_row.append(sched.stage_lengths(one["input_ids"].shape[1], grids))
    # a padded batch's stage holds its longest row (spec section 4's lengths, newline kept with its row)
    want = [max(r[sched.stage_of_layer(layer)] for r in per_row) for layer in range(model.config.text_config.num_hidden_layers)]
    assert cache.layer_lengths() == want
    assert want[0] > want[2] > want[3] > want[4]  # the saving is real
    g = model.generate(**inp, max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True,
                       suppress_tokens=[IMAGE, VIDEO])
    assert g.past_key_values.layer_lengths() == [w + 3 for w in want]


# ---- 6.4 the loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_loss_equals_reference_and_reaches_every_part(arch, padding_side):
    plain, model = model_for(arch, "eager")
    model.train()
    inp = inputs(model, padding_side=padding_side)
    labels = inp["input_ids"].clone()
    labels[(inp["attention_mask"] == 0) | (labels == IMAGE)] = -100
    out = model(**inp, labels=labels)
    total, count = 0.0, 0
    for b in range(len(PROMPTS)):
        one = inputs(model, [b])
        logits, kept = naive_forward(plain, one, SCHEDULE)
        lab = labels[b][inp["attention_mask"][b].bool()]
        tgt = torch.tensor([lab[p + 1].item() if p + 1 < len(lab) else -100 for p in kept])
        total += torch.nn.functional.cross_entropy(logits.float(), tgt, ignore_index=-100, reduction="sum")
        count += int((tgt != -100).sum())
    torch.testing.assert_close(out.loss, total / count, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    inner = model.model
    for name, params in {"vision tower": inner.vision_tower.parameters(), "projector": inner.multi_modal_projector.parameters(),
                         "image_newline": [inner.image_newline], "llm": inner.language_model.parameters()}.items():
        grads = [p.grad for p in params if p.grad is not None]
        assert grads and any(bool(g.abs().sum() > 0) for g in grads), name


# ---- a OneVision video ----------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_onevision_video(impl):
    plain, model = model_for("onevision", impl, "2:2,3:2")  # 2x2 frames: 2x2 -> 2x1 -> 1x1
    proc = tiny_processor(model.config)
    frames = 3
    video = torch.randn(1, frames, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    n_video = frames * 4 + 1
    assert proc.replace_video_token({"pixel_values_videos": [video[0]]}, 0) == "<video>" * n_video
    ids = torch.tensor([[2, 9, 10] + [VIDEO] * n_video + [11, 12]])
    one = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": video}
    ref, kept = naive_forward(plain, one, "2:2,3:2")
    assert len(kept) == ids.shape[1] - frames * 3  # 4 -> 2 -> 1 per frame; the trailing newline stays
    with torch.no_grad():
        out = model(**one)
    torch.testing.assert_close(out.logits[0], ref, atol=ATOL, rtol=1e-4)
    assert adsc_layout(out).position_ids[0].tolist() == kept
    assert torch.equal(_gen(model, one, 4), _greedy_recompute(model, one, 4))


# ---- input errors -------------------------------------------------------------------------------------------
def test_input_errors():
    _, model = model_for("onevision")
    inp = inputs(model)
    with pytest.raises(AdscInputError, match="need"):  # images without their sizes
        model(**{k: v for k, v in inp.items() if k != "image_sizes"} | {"image_sizes": None})
    # a prefill chunk that ends inside an image: refused, naming the split
    one = inputs(model, [0])
    cache = AdscCache(config=model.config.get_text_config())
    with pytest.raises(AdscInputError, match="split across prefill chunks"):
        model(input_ids=one["input_ids"][:, :-4], attention_mask=one["attention_mask"][:, :-4],
              pixel_values=one["pixel_values"], image_sizes=one["image_sizes"],
              batch_num_images=one["batch_num_images"], past_key_values=cache, use_cache=True)
    with pytest.raises(AdscInputError, match="image_sizes"):
        model(**one | {"image_sizes": torch.cat([one["image_sizes"]] * 2)})


@pytest.mark.parametrize("arch", ARCHS)
def test_inputs_embeds_equal_input_ids(arch):
    """Placeholders found by their embedding (what the models themselves do with inputs_embeds)."""
    _, model = model_for(arch)
    inp = inputs(model)
    embeds = model.get_input_embeddings()(inp["input_ids"])
    with torch.no_grad():
        want = model(**inp).logits
        got = model(**{k: v for k, v in inp.items() if k != "input_ids"}, inputs_embeds=embeds).logits
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_packed_equals_padded(arch):
    """A padding-free batch (one row, position ids restarting at every sequence, as transformers'
    DataCollatorWithFlattening makes it) gives each sequence what the padded batch gives it."""
    _, model = model_for(arch)
    inp = inputs(model)
    ones = [inputs(model, [b]) for b in range(len(PROMPTS))]
    flat = torch.cat([o["input_ids"][0] for o in ones])[None]
    pos = torch.cat([torch.arange(o["input_ids"].shape[1]) for o in ones])[None]
    kw = {k: v for k, v in inp.items() if k not in ("input_ids", "attention_mask")}
    with torch.no_grad():
        packed = model(input_ids=flat, position_ids=pos, **kw)
        padded = model(**inp)
    got = packed.logits[0][adsc_layout(packed).source_index[0] >= 0]
    ref = padded.logits[adsc_layout(padded).source_index >= 0]
    assert got.shape[0] < flat.shape[1]  # downsampled
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_and_export_refuse_them_when_built(arch, tmp_path):
    """The engine and the ONNX export do not run anyres models yet: refused when built, naming the
    model, never at the first request with a feature-count mismatch."""
    from adsc_ext.errors import AdscModelError
    from adsc_ext.runtime import Engine

    plain, _ = model_for(arch)
    name = "LLaVA-OneVision" if arch == "onevision" else "LLaVA-NeXT"
    with pytest.raises(AdscModelError, match=f"the engine does not run {name}"):
        Engine(plain, schedule=SCHEDULE)
    pytest.importorskip("onnx")
    from adsc_ext.export import export_onnx

    with pytest.raises(AdscModelError, match=f"the ONNX export does not run {name}"):
        export_onnx(plain, tmp_path / "x", SCHEDULE)
