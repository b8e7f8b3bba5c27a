"""The FastV-style baseline (adsc_ext.baselines.fastv): CPU, fp32, tiny random LLaVA models."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from adsc_ext import stage_plan  # noqa: E402
from adsc_ext.baselines import FastV, budget_keep  # noqa: E402
from adsc_ext.baselines.fastv import top_attention  # noqa: E402
from adsc_ext.hf import apply_adsc  # noqa: E402
from adsc_ext.testing import TinyProcessor, tiny_llava  # noqa: E402

NEW = 5


def batch(model, texts=(("ab", "cd"), ("xy", "zw")), images=1, seed=0):
    """Equal-length rows, ``images`` images each: (input_ids [B, n], pixel_values [B*images, 3, H, W])."""
    proc = TinyProcessor(model.config)
    side = model.config.vision_config.image_size
    g = torch.Generator().manual_seed(seed)
    pix = proc.images(list(torch.rand(len(texts) * images, 3, side, side, generator=g)))
    ids = torch.stack([torch.tensor(proc.encode(a + "<image>" * images + b, images)) for a, b in texts])
    return ids, pix


def hf_greedy(model, ids, pix, n=NEW):
    with torch.no_grad():
        g = model.generate(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids),
                           max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           suppress_tokens=[model.config.image_token_id], output_logits=True,
                           return_dict_in_generate=True)
    return g.sequences[:, ids.shape[1]:], g.logits[0]  # raw logits (before suppression)


@pytest.fixture(scope="module")
def model():
    return tiny_llava(seed=0, attn_implementation="sdpa", grid_side=4, num_layers=6)


def test_budget_keep():
    # LLaVA-1.5 default: (576 + 288 + 144 + 72) * 8 image tokens over 32 layers; FastV at K=2
    # spends 2 * 576 and keeps R in the other 30 layers: R = (8640 - 1152) / 30 = 249.6.
    assert budget_keep("8:2,16:2,24:2", 32, 2, (24, 24)) == 250
    assert budget_keep("", 32, 2, (24, 24)) == 576
    assert budget_keep("2:2", 4, 2, (4, 4)) == 8  # same layer and budget: keeps ADSC's 16 / 2
    with pytest.raises(ValueError, match=r"pruning layer must be in \[1, 31\], got 0"):
        budget_keep("8:2", 32, 0, (24, 24))


def test_keep_all_equals_unmodified_model(model):
    ids, pix = batch(model)
    fv = FastV(model, layer=2, keep=16)
    toks, logits = fv.generate(ids, pix, NEW, return_logits=True)
    ref, ref_scores = hf_greedy(model, ids, pix)
    assert toks.tolist() == ref.tolist()
    torch.testing.assert_close(logits[:, 0], ref_scores, rtol=1e-4, atol=1e-4)  # fp32, eager vs sdpa
    assert model.config.text_config._attn_implementation == "sdpa"  # restored after the eager run


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_uniform_selection_equals_adsc_single_stage(model, layer):
    """With ADSC's uniform subset in place of the attention rule, FastV at layer K is exactly ADSC
    with the schedule ``K:2`` (spec section 4): an oracle independent of the FastV code."""
    ids, pix = batch(model)
    tok = model.config.image_token_id

    def uniform(scores, is_img, keep):
        rows = []
        for b in range(ids.shape[0]):
            plan = stage_plan(f"{layer}:2", input_ids=ids[b], cu_seqlens=torch.tensor([0, ids.shape[1]]),
                              image_token_id=tok, grid=(4, 4))
            rows.append(plan.stages[1].index.long())
        return torch.stack(rows)

    fv = FastV(model, layer=layer, keep=8, select=uniform)
    toks, logits = fv.generate(ids, pix, NEW, return_logits=True)
    adsc = apply_adsc(tiny_llava(seed=0, attn_implementation="sdpa", grid_side=4, num_layers=6), f"{layer}:2")
    ref, ref_scores = hf_greedy(adsc, ids, pix)
    assert toks.tolist() == ref.tolist()
    torch.testing.assert_close(logits[:, 0], ref_scores, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("images", [1, 2])
def test_kept_tokens_are_the_top_attention_scores(images):
    """The rule itself, against the attention maps Hugging Face returns (eager, output_attentions)."""
    m = tiny_llava(seed=1, attn_implementation="eager", grid_side=4, num_layers=6)
    ids, pix = batch(m, images=images)
    fv = FastV(m, layer=2, keep=5)
    fv.generate(ids, pix, 1)
    with torch.no_grad():
        att = m(input_ids=ids, pixel_values=pix, output_attentions=True).attentions[1]  # layer K-1 = 1
    scores = att[:, :, -1, :].mean(1)
    is_img = ids == m.config.image_token_id
    for b in range(ids.shape[0]):
        kept = set(fv.last_kept[b].tolist())
        assert {int(p) for p in (~is_img[b]).nonzero()[:, 0]} <= kept  # every text token stays
        img = is_img[b].nonzero()[:, 0]
        for i in range(images):
            pos = img[16 * i:16 * (i + 1)]
            want = {int(pos[j]) for j in scores[b, pos].topk(5).indices}
            assert {p for p in kept if p in set(pos.tolist())} == want
    assert fv.last_kept.shape == (ids.shape[0], ids.shape[1] - images * (16 - 5))


def test_top_attention_keeps_order_and_count():
    scores = torch.tensor([[0.0, 5, 1, 4, 2, 0]])
    is_img = torch.tensor([[False, True, True, True, True, False]])
    assert top_attention(scores, is_img, 2, 4).tolist() == [[0, 1, 3, 5]]
    assert top_attention(scores, is_img, 4, 4).tolist() == [[0, 1, 2, 3, 4, 5]]
    assert top_attention(scores, is_img, 0, 4).tolist() == [[0, 5]]
    # ties go to the earlier token; two adjacent images are two groups
    scores = torch.tensor([[1.0, 1, 1, 1, 3, 2, 2, 0]])
    is_img = torch.tensor([[True] * 8])
    assert top_attention(scores, is_img, 2, 4).tolist() == [[0, 1, 4, 5]]


def _top_attention_reference(scores, image_mask, keep, tpi):
    """The rule written plainly: per row, per image (tpi consecutive image tokens), topk."""
    rows = []
    for b in range(scores.shape[0]):
        img = image_mask[b].nonzero()[:, 0]
        kept = [(~image_mask[b]).nonzero()[:, 0]]
        for i in range(0, img.numel(), tpi):
            pos = img[i:i + tpi]
            kept.append(pos[scores[b, pos].topk(min(keep, tpi)).indices])
        rows.append(torch.cat(kept).sort().values)
    width = max(r.numel() for r in rows)
    return torch.stack([torch.cat([torch.full((width - r.numel(),), -1), r]) for r in rows])


@pytest.mark.parametrize("keep", [0, 1, 5, 15, 16])
def test_top_attention_equals_the_plain_rule(keep):
    """Rows with 0, 1, 2 and 3 images (adjacent or apart) at random places, random scores, any keep."""
    g = torch.Generator().manual_seed(keep)
    T, masks = 70, []
    for n_img, starts in ((0, []), (1, [7]), (2, [0, 16]), (3, [3, 30, 54])):
        m = torch.zeros(T, dtype=torch.bool)
        for st in starts:
            m[st:st + 16] = True
        masks.append(m)
    image_mask = torch.stack(masks)
    scores = torch.rand(4, T, generator=g)
    got = top_attention(scores, image_mask, keep, 16)
    assert got.tolist() == _top_attention_reference(scores, image_mask, keep, 16).tolist()
    assert top_attention(scores[:0], image_mask[:0], keep, 16).shape == (0, 0)  # an empty batch


def test_only_the_scoring_layer_runs_eager(model):
    """Layer K-1 returns attention weights (eager); every other layer runs the model's SDPA (no
    weights), in the prefill and in the decode steps, and the teacher-forced forward."""
    ids, pix = batch(model)
    fv = FastV(model, layer=3, keep=4)
    layers = model.model.language_model.layers
    seen = []
    hooks = [layers[i].self_attn.register_forward_hook(lambda m, a, out, i=i: seen.append((i, out[1] is not None)))
             for i in range(len(layers))]
    try:
        fv.generate(ids, pix, 2)
        with torch.no_grad():
            fv.forward(ids, None, pix)
    finally:
        for h in hooks:
            h.remove()
    prefill = [(i, i == 2) for i in range(6)]
    assert seen == prefill + [(i, False) for i in range(6)] + prefill


def test_the_query_token_is_always_kept(model):
    """A prompt that ends inside an image: its last token (FastV's query) is kept whatever its score,
    so the prefill's last slot is still the prompt's last token."""
    proc = TinyProcessor(model.config)
    side = model.config.vision_config.image_size
    pix = proc.images(list(torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(1))))
    ids = torch.tensor([proc.encode("ab<image>", 1)])
    n = ids.shape[1]
    fv = FastV(model, layer=2, keep=2)
    _, logits = fv.generate(ids, pix, 1, return_logits=True)
    kept = fv.last_kept[0]
    assert int(kept[-1]) == n - 1 and {0, 1} <= set(kept.tolist())
    assert (kept >= 0).sum() in (n - 14, n - 13)
    with torch.no_grad():
        out = fv.forward(ids, None, pix)
    torch.testing.assert_close(out.logits[:, -1], logits[:, 0], atol=1e-4, rtol=0)


def test_bad_input(model):
    ids, pix = batch(model)
    fv = FastV(model, layer=2, keep=4)
    with pytest.raises(ValueError, match=r"\[B, n\] tensor"):
        fv.generate(ids[0], pix)
    with pytest.raises(ValueError, match="input_ids hold 2 image\\(s\\) but pixel_values has 1"):
        fv.generate(ids, pix[:1])
    stray = ids.clone()
    stray[1, 1] = model.config.image_token_id
    with pytest.raises(ValueError, match="row 1: image tokens must form whole images of 4x4 = 16 tokens; got a run of 1"):
        fv.generate(stray, pix)
    with pytest.raises(ValueError, match=r"\[B, n\] tensor"):
        fv.generate(ids[:, :0], pix)
    with pytest.raises(ValueError, match=r"keep must be in \[0, 16\]"):
        FastV(model, layer=2, keep=17)
    with pytest.raises(ValueError, match=r"pruning layer must be in \[1, 5\], got 6"):
        FastV(model, layer=6)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        fv.generate(ids, pix, 0)
    # layers 0-1 see 16 image tokens, 2-3 see 8, 4-5 see 4: FastV keeps (56 - 2 * 16) / 4 = 6
    assert FastV(model, layer=2, schedule="2:2,4:2").keep == 6


def test_rows_of_any_length_and_image_count_equal_each_alone(model):
    """A left-padded batch of requests (the engine's form) with 1, 0 and 2 images and different
    lengths: each row gets what it gets alone (spec 6.3), pruned by the attention rule, and the
    tensor shorthand of equal rows with different image counts works too."""
    proc = TinyProcessor(model.config)
    side = model.config.vision_config.image_size
    pix = proc.images(list(torch.rand(3, 3, side, side, generator=torch.Generator().manual_seed(4))))
    reqs = [dict(input_ids=torch.tensor(proc.encode("ab<image>cd", 1)), pixel_values=pix[:1]),
            dict(input_ids=torch.tensor(proc.encode("plain text row", 0)), pixel_values=None),
            dict(input_ids=torch.tensor(proc.encode("x<image><image>y?", 2)), pixel_values=pix[1:])]
    fv = FastV(model, layer=2, keep=5)
    batch = fv.generate(reqs, max_new_tokens=NEW, return_logits=True)
    kept = fv.last_kept
    assert kept.shape[0] == 3 and (kept[1] >= 0).sum() == reqs[1]["input_ids"].numel()  # no image: all kept
    assert (kept[2] >= 0).sum() == reqs[2]["input_ids"].numel() - 2 * (16 - 5)
    for r, (toks, logits) in zip(reqs, batch):
        (alone_toks, alone_logits), = fv.generate([r], max_new_tokens=NEW, return_logits=True)
        assert toks == alone_toks
        torch.testing.assert_close(logits, alone_logits, rtol=1e-4, atol=1e-4)
    n = reqs[0]["input_ids"].numel()
    rows = torch.stack([reqs[0]["input_ids"], torch.tensor(proc.encode("a" * (n - 1), 0))])  # 1 and 0 images
    out = fv.generate(rows, pix[:1], NEW)
    assert out.tolist() == [batch[0][0], fv.generate([dict(input_ids=rows[1])], max_new_tokens=NEW)[0]]


def test_other_architectures_are_refused_in_one_line():
    """FastV's budget is per image of one grid: a Qwen-VL model is refused with a clear error, not an
    AttributeError from the spec."""
    from adsc_ext.errors import AdscModelError
    from adsc_ext.testing.qwen import tiny_qwen

    with pytest.raises(AdscModelError, match="FastV baseline runs LLaVA-1.5"):
        FastV(tiny_qwen("qwen2_5_vl", num_layers=4))
