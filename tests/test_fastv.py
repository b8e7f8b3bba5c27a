"""The FastV-style baseline (adsc_ext.baselines.fastv): CPU, fp32, tiny random LLaVA models."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from adsc_ext import stage_plan  # noqa: E402
from adsc_ext.baselines import FastV, budget_keep  # noqa: E402
from adsc_ext.baselines.fastv import top_attention  # noqa: E402
from adsc_ext.hf import apply_adsc  # noqa: E402
from adsc_ext.hf.tiny import TinyProcessor, tiny_llava  # noqa: E402

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
    uneven = ids.clone()
    uneven[1][uneven[1] == model.config.image_token_id] = 5
    with pytest.raises(ValueError, match=r"same number of images in every row, got \[1, 0\]"):
        fv.generate(uneven, pix)
    with pytest.raises(ValueError, match=r"keep must be in \[0, 16\]"):
        FastV(model, layer=2, keep=17)
    with pytest.raises(ValueError, match=r"pruning layer must be in \[1, 5\], got 6"):
        FastV(model, layer=6)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        fv.generate(ids, pix, 0)
    # layers 0-1 see 16 image tokens, 2-3 see 8, 4-5 see 4: FastV keeps (56 - 2 * 16) / 4 = 6
    assert FastV(model, layer=2, schedule="2:2,4:2").keep == 6
