"""Tests of adsc_ext.hf: ADSC for Hugging Face LLaVA (tiny random models, CPU; one CUDA test)."""

import pytest

pytest.importorskip("transformers")


import torch

from oracle import run_decoder
from adsc_ext.schedule import Schedule
from adsc_ext.testing import TinyProcessor, tiny_llava


def make_model(side=4, impl="sdpa", seed=0, num_layers=6):
    return tiny_llava(seed=seed, attn_implementation=impl, grid_side=side, num_layers=num_layers)


def images(n, side, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side * 4, side * 4, generator=g)


def batch(model, rows, padding_side="left", seed=0):
    """rows: list of (text_before, n_images, text_after); returns processor output."""
    proc = TinyProcessor(model.config)
    texts, n = [], 0
    for before, k, after in rows:
        texts.append(before + "<image>" * k + after)
        n += k
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    imgs = list(images(n, side, seed)) if n else None
    return proc(texts, images=imgs, padding_side=padding_side)


def image_features(model, pixel_values):
    cfg = model.config
    out = model.model.get_image_features(
        pixel_values=pixel_values,
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, (list, tuple)):
        feats = torch.cat(list(feats), 0)
    return feats.reshape(-1, feats.shape[-1])


def naive_forward(model, ids, pixel_values, schedule, image_offset=0):
    """Logits [n_final, V] and the kept original positions of ONE unpadded sequence ``ids`` [n].

    ``pixel_values`` are the images of this sequence (in order) or None.
    """
    schedule = Schedule.coerce(schedule)
    text = model.model.language_model
    cfg = model.config
    tok = cfg.image_token_id
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    hw = side * side
    ids = ids.tolist()
    n = len(ids)
    emb = model.get_input_embeddings()(torch.tensor([ids]))
    starts = []
    p = 0
    while p < n:
        if ids[p] == tok:
            starts.append(p)
            p += hw
        else:
            p += 1
    if starts:
        feats = image_features(model, pixel_values).to(emb.dtype)
        emb = emb.clone()
        for i, st in enumerate(starts):
            emb[0, st:st + hw] = feats[i * hw:(i + 1) * hw]
    return run_decoder(text, model.lm_head, emb, [(st, (side, side), 0) for st in starts], schedule)


def real_rows(attention_mask):
    return [torch.nonzero(m).flatten() for m in attention_mask]


def split_pixels(rows, pixel_values):
    """Per-row pixel values from a batch built by `batch` (images in row order)."""
    out, i = [], 0
    for _, k, _ in rows:
        out.append(pixel_values[i:i + k] if k else None)
        i += k
    return out


# =============================================================================================
# The tests
# =============================================================================================

import copy  # noqa: E402

from adsc_ext.hf import (  # noqa: E402
    AdscCache,
    AdscInputError,
    AdscModelError,
    adsc_layout,
    adsc_setup,
    apply_adsc,
    enable_checkpointing,
    is_adsc_model,
    remove_adsc,
)
from adsc_ext.hf import _compat  # noqa: E402
from adsc_ext.schedule import ScheduleError  # noqa: E402
from adsc_ext.reference import stage_plan_reference  # noqa: E402

ROWS_MIXED = [("ab", 1, "cd"), ("", 0, "plain text row"), ("x", 2, "y?")]  # 1, 0 and 2 images
ATOL = 2e-5

# (grid side, schedule): factor 2 and 4, odd sides (5x5 -> 5x3 -> 3x2, 3x3 -> 3x2 -> 2x2)
CASES = [(4, "2:2,4:2"), (4, "3:4"), (3, "2:2,4:2"), (5, "1:2,3:4")]


def _adsc(side=4, impl="sdpa", schedule="2:2,4:2", seed=0):
    return apply_adsc(make_model(side, impl, seed), schedule)


def _greedy_recompute(model, inp, steps):
    """Spec 6.2 oracle: re-run the whole sequence with the schedule at every step, no cache."""
    ids, mask = inp["input_ids"], inp["attention_mask"]
    out = []
    for _ in range(steps):
        with torch.no_grad():
            o = model(input_ids=ids, attention_mask=mask, pixel_values=inp.get("pixel_values"), use_cache=False)
        last = o.logits[:, -1].clone()
        last[:, model.config.image_token_id] = -float("inf")  # as generate(suppress_tokens=...)
        nxt = last.argmax(-1)
        out.append(nxt)
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def _gen(model, inp, n, **kw):
    image_tok = model.config.image_token_id
    with torch.no_grad():
        g = model.generate(**inp, max_new_tokens=n, min_new_tokens=n, suppress_tokens=[image_tok], **kw)
    return g[:, inp["input_ids"].shape[1]:]


# ---- 6.1 empty schedule == unmodified model ---------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_empty_schedule_matches_unmodified(impl):
    plain = make_model(4, impl)
    model = apply_adsc(copy.deepcopy(plain), "")
    inp = batch(plain, ROWS_MIXED)
    pos = (inp["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = plain(**inp, position_ids=pos).logits
        got = model(**inp).logits
    m = inp["attention_mask"].bool()
    torch.testing.assert_close(got[m], ref[m], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(_gen(model, inp, 6), _gen(plain, inp, 6))


# ---- prefill == the independent oracle, and batch == alone (6.3) ----------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("side,schedule", CASES)
def test_prefill_matches_oracle_and_alone(impl, side, schedule):
    model = _adsc(side, impl, schedule)
    inp = batch(model, ROWS_MIXED)
    with torch.no_grad():
        out = model(**inp)
    pix = split_pixels(ROWS_MIXED, inp["pixel_values"])
    S = inp["input_ids"].shape[1]
    for b, rows in enumerate(real_rows(inp["attention_mask"])):
        ids = inp["input_ids"][b, rows]
        with torch.no_grad():
            ref, kept = naive_forward(model, ids, pix[b], schedule)
            alone = model(input_ids=ids[None], pixel_values=pix[b])
        src = adsc_layout(out).source_index[b]
        real = src >= 0
        # which original position each batch logit row holds
        got_pos = (src[real].long() - b * S - (S - len(rows))).tolist()
        assert got_pos == kept
        assert adsc_layout(out).position_ids[b][real].tolist() == kept
        torch.testing.assert_close(out.logits[b][real], ref, atol=ATOL, rtol=1e-4)
        torch.testing.assert_close(alone.logits[0], ref, atol=ATOL, rtol=1e-4)


# ---- 6.2 cache == no cache --------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("side,schedule", CASES)
def test_cached_generation_equals_recompute(impl, side, schedule):
    model = _adsc(side, impl, schedule)
    inp = batch(model, ROWS_MIXED)
    steps = 5
    cached = _gen(model, inp, steps)
    torch.testing.assert_close(cached, _greedy_recompute(model, inp, steps))
    # each sequence alone generates what it generates in the batch
    for b, rows in enumerate(real_rows(inp["attention_mask"])):
        one = {"input_ids": inp["input_ids"][b:b + 1, rows], "attention_mask": inp["attention_mask"][b:b + 1, rows]}
        pix = split_pixels(ROWS_MIXED, inp["pixel_values"])[b]
        if pix is not None:
            one["pixel_values"] = pix
        torch.testing.assert_close(_gen(model, one, steps), cached[b:b + 1])


def test_decode_logits_match_recompute():
    """Stronger than tokens: the logits of every cached decode step equal a full re-run's."""
    model = _adsc(4, "eager", "2:2,4:2")
    inp = batch(model, ROWS_MIXED)
    ids, mask = inp["input_ids"], inp["attention_mask"]
    with torch.no_grad():
        out = model(**inp, use_cache=True)
        cache = out.past_key_values
        for _ in range(3):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
            mask = torch.cat([mask, torch.ones_like(nxt)], 1)
            out = model(input_ids=nxt, attention_mask=mask, past_key_values=cache, use_cache=True)
            full = model(input_ids=ids, attention_mask=mask, pixel_values=inp["pixel_values"], use_cache=False)
            torch.testing.assert_close(out.logits[:, -1], full.logits[:, -1], atol=ATOL, rtol=1e-4)


def test_cache_layer_lengths_are_stage_lengths():
    schedule = "2:2,4:2"
    model = _adsc(4, "sdpa", schedule)
    inp = batch(model, ROWS_MIXED)
    with torch.no_grad():
        out = model(**inp, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, AdscCache)
    plan = stage_plan_reference(schedule, input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                                image_token_id=model.config.image_token_id, grid=(4, 4))
    expect = [plan.stage_of_layer(l).index.shape[1] for l in range(6)]
    assert cache.layer_lengths() == expect
    assert expect[0] > expect[2] > expect[4]  # the saving is real
    assert [k.shape[-2] for k in (layer.keys for layer in cache.layers)] == expect
    # after 3 generated tokens every layer grew by 3
    g = model.generate(**inp, max_new_tokens=4, min_new_tokens=4, return_dict_in_generate=True)
    assert g.past_key_values.layer_lengths() == [e + 3 for e in expect]


# ---- beam search, sampling -----------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_beam_search_and_sampling_cache_equals_no_cache(impl):
    model = _adsc(4, impl, "2:2,4:2")
    inp = batch(model, ROWS_MIXED)
    beam_c = _gen(model, inp, 4, num_beams=3, do_sample=False)
    beam_n = _gen(model, inp, 4, num_beams=3, do_sample=False, use_cache=False)
    torch.testing.assert_close(beam_c, beam_n)
    torch.manual_seed(7)
    samp_c = _gen(model, inp, 5, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(7)
    samp_n = _gen(model, inp, 5, do_sample=True, top_k=0, temperature=1.0, use_cache=False)
    torch.testing.assert_close(samp_c, samp_n)


def test_num_return_sequences_and_user_cache():
    model = _adsc(4, "sdpa", "2:2,4:2")
    inp = batch(model, ROWS_MIXED)
    dyn = _gen(model, inp, 4)
    cache = AdscCache(config=model.config.get_text_config())
    mine = _gen(model, inp, 4, **{_compat.cache_kwarg(model): cache})
    torch.testing.assert_close(mine, dyn)
    plan = stage_plan_reference("2:2,4:2", input_ids=inp["input_ids"], attention_mask=inp["attention_mask"],
                                image_token_id=model.config.image_token_id, grid=(4, 4))
    assert cache.layer_lengths() == [plan.stage_of_layer(l).index.shape[1] + 3 for l in range(6)]
    rep = _gen(model, inp, 4, num_return_sequences=2, do_sample=False, num_beams=2)
    assert rep.shape == (6, 4)


def test_static_cache_is_refused_clearly():
    from transformers import StaticCache

    model = _adsc(4, "sdpa", "2:2,4:2")
    inp = batch(model, ROWS_MIXED)
    with pytest.raises(AdscInputError, match="needs an AdscCache .* got StaticCache"):
        model(**inp, **{_compat.cache_kwarg(model): StaticCache(config=model.config.get_text_config(), max_cache_len=64)})


# ---- chunked prefill, packed inputs -------------------------------------------------------------------
def test_chunked_prefill_with_whole_images_equals_one_prefill():
    model = _adsc(4, "eager", "2:2,4:2")
    rows = [("ab", 1, "cd"), ("xy", 1, "zz")]
    inp = batch(model, rows)
    ids, mask, pix = inp["input_ids"], inp["attention_mask"], inp["pixel_values"]
    cut = 1 + 2 + 16  # bos + 2 text tokens + the image: both rows split between whole images
    with torch.no_grad():
        full = model(**inp, use_cache=True)
        c1 = model(input_ids=ids[:, :cut], attention_mask=mask[:, :cut], pixel_values=pix, use_cache=True)
        c2 = model(input_ids=ids[:, cut:], attention_mask=mask, past_key_values=c1.past_key_values, use_cache=True)
    torch.testing.assert_close(c2.logits[:, -1], full.logits[:, -1], atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_packed_equals_padded(impl):
    model = _adsc(4, impl, "2:2,4:2")
    inp = batch(model, ROWS_MIXED)
    rows = real_rows(inp["attention_mask"])
    flat = torch.cat([inp["input_ids"][b, r] for b, r in enumerate(rows)])[None]
    pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
    with torch.no_grad():
        packed = model(input_ids=flat, position_ids=pos, pixel_values=inp["pixel_values"])
        padded = model(**inp)
    got = packed.logits[0][adsc_layout(packed).source_index[0] >= 0]
    ref = padded.logits[adsc_layout(padded).source_index >= 0]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4)


# ---- training ----------------------------------------------------------------------------------------------
def _labels(inp, image_token_id):
    labels = inp["input_ids"].clone()
    labels[inp["attention_mask"] == 0] = -100
    labels[labels == image_token_id] = -100
    return labels


def _reference_loss(model, inp, labels, schedule):
    total, count = 0.0, 0
    pix = split_pixels(ROWS_MIXED, inp["pixel_values"])
    for b, rows in enumerate(real_rows(inp["attention_mask"])):
        logits, kept = naive_forward(model, inp["input_ids"][b, rows], pix[b], schedule)
        lab = labels[b, rows]
        tgt = torch.tensor([lab[p + 1].item() if p + 1 < len(rows) else -100 for p in kept])
        total = total + torch.nn.functional.cross_entropy(logits.float(), tgt, ignore_index=-100, reduction="sum")
        count += int((tgt != -100).sum())
    return total / count


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_loss_equals_reference_and_grads_reach_everything(padding_side):
    schedule = "2:2,4:2"
    model = _adsc(4, "eager", schedule).train()
    inp = batch(model, ROWS_MIXED, padding_side=padding_side)
    labels = _labels(inp, model.config.image_token_id)
    labels[0, -1] = -100 if padding_side == "right" else labels[0, -1]
    out = model(**inp, labels=labels)
    ref = _reference_loss(model, inp, labels, schedule)
    torch.testing.assert_close(out.loss, ref, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    groups = {"vision": model.model.vision_tower, "projector": model.model.multi_modal_projector,
              "llm": model.model.language_model}
    for name, mod in groups.items():
        grads = [p.grad for p in mod.parameters() if p.grad is not None]
        assert grads, name
        assert all(torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_same_loss_and_grads(reentrant):
    model = _adsc(4, "eager", "2:2,4:2").train()
    inp = batch(model, ROWS_MIXED)
    labels = _labels(inp, model.config.image_token_id)
    ref = model(**inp, labels=labels)
    ref.loss.backward()
    g_ref = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    enable_checkpointing(model, use_reentrant=reentrant)
    assert model.model.language_model.layers[0].gradient_checkpointing
    out = model(**inp, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss)
    for n, p in model.named_parameters():
        if n in g_ref:
            torch.testing.assert_close(p.grad, g_ref[n], atol=1e-6, rtol=1e-4)


def test_lora_finetune_and_trainer(tmp_path):
    peft = pytest.importorskip("peft")
    model = _adsc(4, "sdpa", "2:2,4:2")
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pm = peft.get_peft_model(model, lcfg)
    assert is_adsc_model(pm)
    pm.train()
    inp = batch(model, ROWS_MIXED)
    labels = _labels(inp, model.config.image_token_id)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(4):
        loss = pm(**inp, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    lora_grads = [p for n, p in pm.named_parameters() if "lora" in n]
    assert lora_grads

    from transformers import Trainer, TrainingArguments

    class DS(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            d = {k: v[i] for k, v in inp.items() if k != "pixel_values"}
            d["labels"] = labels[i]
            return d

    pix = split_pixels(ROWS_MIXED, inp["pixel_values"])

    def collate(items):
        out = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        idx = [int(next(j for j in range(3) if torch.equal(inp["input_ids"][j], it["input_ids"]))) for it in items]
        pv = [pix[j] for j in idx if pix[j] is not None]
        if pv:
            out["pixel_values"] = torch.cat(pv)
        return out

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, max_steps=2,
                             learning_rate=1e-3, report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", remove_unused_columns=False)
    res = Trainer(model=pm, args=args, train_dataset=DS(), data_collator=collate).train()
    assert torch.isfinite(torch.tensor(res.training_loss))


# ---- save / reload --------------------------------------------------------------------------------------------
def test_save_reload_keeps_schedule(tmp_path):
    from transformers import LlavaForConditionalGeneration

    model = _adsc(4, "sdpa", "3:4")
    model.save_pretrained(tmp_path)
    again = LlavaForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa")
    assert again.config.adsc_schedule == "3:4"
    apply_adsc(again)
    assert str(adsc_setup(again).schedule) == "3:4"
    inp = batch(model, ROWS_MIXED)
    with torch.no_grad():
        torch.testing.assert_close(again(**inp).logits, model(**inp).logits)


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_errors():
    from transformers import LlamaConfig, LlamaForCausalLM

    with pytest.raises(AdscModelError, match="LlavaForConditionalGeneration"):
        apply_adsc(LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, vocab_size=50)))
    model = make_model(4, "sdpa")
    with pytest.raises(ScheduleError, match="6 decoder layers"):
        apply_adsc(model, "2:2,6:2")
    with pytest.raises(ScheduleError, match="4x4 image grid"):
        apply_adsc(model, "1:4,2:4,3:4")  # 4x4 -> 2x2 -> 1x1 -> cannot halve
    with pytest.raises(ScheduleError, match="does not fit"):
        apply_adsc(model)  # LLAVA15_DEFAULT needs 25+ layers
    apply_adsc(model, "2:2")
    tok = model.config.image_token_id
    ids = torch.tensor([[1, 5] + [tok] * 10 + [6, 7]])
    with pytest.raises(AdscInputError, match="whole images of 4x4 = 16 tokens; got a run of 10"):
        model(input_ids=ids)
    ids = torch.tensor([[1, 5] + [tok] * 16 + [6]])
    with pytest.raises(AdscInputError, match="give 32 feature rows"):
        model(input_ids=ids, pixel_values=images(2, 4))
    # a prompt whose image is split across prefill chunks
    ids = torch.tensor([[1, 5] + [tok] * 16 + [6, 7]])
    with pytest.raises(AdscInputError, match="split across prefill chunks"):
        model(input_ids=ids[:, :10], use_cache=True)
    out = model(input_ids=ids[:, :2], use_cache=True)
    with pytest.raises(AdscInputError, match="holds image tokens but no pixel_values"):
        model(input_ids=ids[:, 2:18], attention_mask=torch.ones(1, 18, dtype=torch.long),
              past_key_values=out.past_key_values)
    with pytest.raises(AdscInputError, match="split across prefill chunks"):
        model(input_ids=ids[:, 2:10], attention_mask=torch.ones(1, 10, dtype=torch.long),
              past_key_values=out.past_key_values, pixel_values=images(1, 4))


def test_apply_is_idempotent_and_leaves_the_model_class_and_names():
    from transformers import LlavaForConditionalGeneration

    plain = make_model(4, "sdpa")
    names = [n for n, _ in plain.named_modules()]
    keys = list(plain.state_dict())
    model = apply_adsc(copy.deepcopy(plain), "2:2")
    apply_adsc(model, "3:4")
    assert type(model) is LlavaForConditionalGeneration
    assert [n for n, _ in model.named_modules()] == names and list(model.state_dict()) == keys
    assert model.config.adsc_schedule == "3:4" and str(adsc_setup(model).schedule) == "3:4"
    # one set of hooks, not two: the second apply replaced the first
    assert len(model._forward_pre_hooks) == 1 and len(model.model.language_model.layers[0]._forward_pre_hooks) == 1
    inp = batch(model, ROWS_MIXED)
    with torch.no_grad():
        ref = apply_adsc(copy.deepcopy(plain), "3:4")(**inp).logits
        torch.testing.assert_close(model(**inp).logits, ref)
    remove_adsc(model)
    assert not is_adsc_model(model) and not hasattr(model.config, "adsc_schedule")
    with torch.no_grad():
        torch.testing.assert_close(model(**inp).logits, plain(**inp).logits)


def test_loss_is_the_first_output_and_threads_keep_their_own_state():
    import threading

    model = _adsc(4, "eager", "2:2,4:2")
    inp = batch(model, ROWS_MIXED)
    labels = _labels(inp, model.config.image_token_id)
    with torch.no_grad():
        out = model(**inp, labels=labels)
        assert list(out.keys())[0] == "loss" and out[0] is out.loss and out.to_tuple()[0] is out.loss
        assert torch.equal(model(**inp, labels=labels, return_dict=False)[0], out.loss)
        one = {"input_ids": inp["input_ids"][1:2], "attention_mask": inp["attention_mask"][1:2]}
        ref_batch, ref_one = model(**inp).logits, model(**one).logits
    results, errors = {}, []

    def run(name, kw, n=4):
        try:
            with torch.no_grad():
                results[name] = [model(**kw).logits for _ in range(n)]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("batch", inp)), threading.Thread(target=run, args=("one", one))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for got in results["batch"]:
        torch.testing.assert_close(got, ref_batch)
    for got in results["one"]:
        torch.testing.assert_close(got, ref_one)


def test_pickle_and_torch_save_roundtrip(tmp_path):
    """apply_adsc adds nothing unpicklable (its hooks are module-level classes). Pickled before a
    forward: transformers itself installs unpicklable output-capturing hooks on a model's first
    forward with images (5.23), with or without ADSC."""
    import pickle

    model = _adsc(4, "sdpa", "2:2,4:2")
    inp = batch(model, ROWS_MIXED)
    again = pickle.loads(pickle.dumps(model))
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        ref = model(**inp).logits
    for m in (again, loaded):
        assert is_adsc_model(m)
        with torch.no_grad():
            torch.testing.assert_close(m(**inp).logits, ref)


# ---- GPU ------------------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_llava15_7b_bf16_cuda():
    """LLaVA-1.5-7B shapes, random weights, bf16: ADSC's error against the fp32 oracle is at most
    twice the error of the plain-PyTorch oracle run in bf16 (FlashAttention's accuracy rule)."""
    from adsc_ext.testing import build_llava, llava15_7b_config

    cfg = llava15_7b_config()
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = build_llava(cfg, attn_implementation="sdpa", dtype=torch.bfloat16)
    model.eval()
    apply_adsc(model)  # LLAVA15_DEFAULT: 576 -> 288 -> 144 -> 72
    tok = cfg.image_token_id
    prompt = [1] + list(range(100, 120)) + [tok] * 576 + list(range(200, 230))
    ids = torch.tensor([prompt], device="cuda")
    pix = torch.randn(1, 3, 336, 336, device="cuda", dtype=torch.bfloat16)
    sched = str(model._adsc.schedule)
    with torch.no_grad(), torch.device("cuda"):
        got = model(input_ids=ids, pixel_values=pix).logits[0].float()
        pos = adsc_layout(model(input_ids=ids, pixel_values=pix)).position_ids[0].tolist()
        ref16, kept = naive_forward(model, ids[0].cpu(), pix, sched)
        model.float()
        ref32, _ = naive_forward(model, ids[0].cpu(), pix.float(), sched)
        model.to(torch.bfloat16)
    assert pos == kept and len(kept) == 1 + 20 + 72 + 30
    err = (got - ref32).abs().max().item()
    base = (ref16.float() - ref32).abs().max().item()
    assert err <= 2 * base + 1e-3 * ref32.abs().max().item(), (err, base)
    g = model.generate(input_ids=ids, pixel_values=pix, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                       return_dict_in_generate=True)
    assert g.sequences.shape == (1, ids.shape[1] + 8)
    lengths = g.past_key_values.layer_lengths()
    assert lengths[0] == len(prompt) + 7 and lengths[31] == 1 + 20 + 72 + 30 + 7


def test_reorder_cache_across_rows():
    """Reordering the batch of a filled cache moves the per-row masks and positions too."""
    model = _adsc(4, "eager", "2:2,4:2")
    inp = batch(model, ROWS_MIXED)
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        out = model(**inp, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inp["attention_mask"], torch.ones_like(nxt)], 1)
        ref = model(input_ids=nxt, attention_mask=mask, past_key_values=out.past_key_values).logits
        out = model(**inp, use_cache=True)
        out.past_key_values.reorder_cache(perm)
        got = model(input_ids=nxt[perm], attention_mask=mask[perm], past_key_values=out.past_key_values).logits
    torch.testing.assert_close(got, ref[perm], atol=ATOL, rtol=1e-4)


# ---- FlashAttention kwargs (a pure-PyTorch stand-in for flash-attn's varlen semantics) -------------
def _fake_flash(module, query, key, value, attention_mask, scaling=None, dropout=0.0, cu_seq_lens_q=None,
                cu_seq_lens_k=None, max_length_q=None, max_length_k=None, position_ids=None, **kw):
    """What transformers' flash path computes: a 2-D key mask -> unpadded, bottom-right causal
    attention per row; cu_seq_lens -> varlen causal blocks; neither -> plain causal (and packed
    detection from position_ids, which must not trigger for ADSC's gapped positions)."""
    B, H, Q, D = query.shape
    rep = H // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    K = key.shape[2]
    qpad = None
    if attention_mask is not None:
        real_k = attention_mask.bool()
        rank_k = real_k.long().cumsum(-1) - 1
        rank_q = rank_k[:, -Q:]
        real_q = real_k[:, -Q:]
        allowed = real_k[:, None, :] & (rank_k[:, None, :] <= rank_q[:, :, None])
        allowed = allowed | ~real_q[:, :, None]
        qpad = ~real_q
    elif cu_seq_lens_q is not None:
        assert B == 1 and torch.equal(cu_seq_lens_q, cu_seq_lens_k) and max_length_q == max_length_k
        seg = torch.bucketize(torch.arange(Q), cu_seq_lens_q[1:].long(), right=True)
        allowed = ((seg[:, None] == seg[None, :]) & torch.ones(Q, K, dtype=torch.bool).tril())[None]
        assert max_length_q == int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    else:
        if position_ids is not None and B == 1 and Q > 1:
            assert (position_ids[0, 1:] - position_ids[0, :-1] == 1).all(), "would be taken for packed"
        allowed = torch.ones(Q, K, dtype=torch.bool).tril(K - Q)[None].expand(B, Q, K)
    out = torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=allowed[:, None], scale=scaling)
    if qpad is not None:
        out = out.masked_fill(qpad[:, None, :, None], 0.0)
    return out.transpose(1, 2).contiguous(), None


def test_flash_attention_kwargs_with_a_stand_in(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "flash_attention_2", _fake_flash)
    ref_model = _adsc(4, "sdpa", "2:2,4:2")
    model = _adsc(4, "sdpa", "2:2,4:2")
    model.model.language_model.config._attn_implementation = "flash_attention_2"
    assert model.model.language_model.config._attn_implementation == "flash_attention_2"
    inp = batch(model, ROWS_MIXED)
    with torch.no_grad():
        got, ref = model(**inp), ref_model(**inp)
    m = adsc_layout(ref).source_index >= 0
    torch.testing.assert_close(got.logits[m], ref.logits[m], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(_gen(model, inp, 4), _gen(ref_model, inp, 4))
    rows = real_rows(inp["attention_mask"])
    flat = torch.cat([inp["input_ids"][b, r] for b, r in enumerate(rows)])[None]
    pos = torch.cat([torch.arange(len(r)) for r in rows])[None]
    with torch.no_grad():
        packed = model(input_ids=flat, position_ids=pos, pixel_values=inp["pixel_values"])
        one = model(input_ids=inp["input_ids"][1:2, rows[1]])  # batch of one, no images, no padding
        one_ref = ref_model(input_ids=inp["input_ids"][1:2, rows[1]])
    torch.testing.assert_close(packed.logits[0][adsc_layout(packed).source_index[0] >= 0], ref.logits[m], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(one.logits, one_ref.logits, atol=ATOL, rtol=1e-4)


def test_nothing_of_a_forward_outlives_it():
    """The hooks' per-thread state lets go of a forward's cache, labels, layout, masks and rotary
    tables when it returns (issue 18: 110 MB of masks per thread stayed alive at 3,000 tokens)."""
    import gc
    import weakref

    from adsc_ext.hf import _compat

    model = _adsc(4, "eager", "2:2,4:2")
    inp = batch(model, ROWS_MIXED)
    state = next(iter(model._forward_pre_hooks.values())).state
    with torch.no_grad():
        out = model(**inp, use_cache=True)
    assert state.current is None
    cache = weakref.ref(_compat.output_cache(out))
    del out
    gc.collect()
    assert cache() is None, "the forward's cache outlived it"
    labels = _labels(inp, model.config.image_token_id)
    model.train()
    try:
        model(**inp, labels=labels).loss.backward()  # a training forward without checkpointing
    finally:
        model.eval()
    assert state.current is None
