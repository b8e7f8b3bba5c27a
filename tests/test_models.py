"""The one LLaVA model spec (adsc_ext.models.llava) against transformers' own modules.

The engine and the ONNX export run a decoder layer as ``attention_inputs`` -> their attention ->
``attention_output``; this checks that split against the layer's own forward (a transformers
release that changes the layer's math fails here, naming the layer).
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from adsc_ext.testing import tiny_llava  # noqa: E402
from adsc_ext.models import (  # noqa: E402
    AdscInputError,
    AdscModelError,
    attention_inputs,
    attention_output,
    count_images,
    embed_with_images,
    image_runs,
    llava_spec,
    text_model,
)
from adsc_ext.models.llava import rotary  # noqa: E402

# fp32 on CPU: the split layer and transformers' layer run the same ops in a different grouping.
ATOL, RTOL = 1e-5, 1e-5


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_split_layer_equals_transformers_layer(heads, kv_heads, attn):
    model = tiny_llava(seed=1, attn_implementation=attn, num_heads=heads, num_kv_heads=kv_heads)
    spec = llava_spec(model)
    text = text_model(model)
    B, T = 2, 7
    torch.manual_seed(0)
    h = torch.randn(B, T, spec.hidden_size)
    pos = torch.arange(T).expand(B, T)
    cos, sin = rotary(model, h, pos)
    mask = torch.full((T, T), torch.finfo(h.dtype).min).triu(1)[None, None].expand(B, 1, T, T)
    for i, layer in enumerate(text.layers):
        with torch.no_grad():
            want = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=pos)
            want = want[0] if isinstance(want, tuple) else want
            q, k, v = attention_inputs(layer, h, cos, sin, spec.head_dim)
            assert q.shape == (B, T, heads, spec.head_dim) and k.shape == (B, T, kv_heads, spec.head_dim)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True, scale=spec.scaling, enable_gqa=True)
            got = attention_output(layer, h, o.transpose(1, 2))
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"layer {i}: {m}")


def test_spec_fields():
    model = tiny_llava(grid_side=3, num_layers=5, num_heads=4, num_kv_heads=2, hidden_size=64)
    spec = llava_spec(model)
    assert spec.grid == (3, 3) and spec.tokens_per_image == 9 and spec.num_layers == 5
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 16)
    assert spec.image_token_id == model.config.image_token_index
    assert spec.kv_bytes_per_token(torch.bfloat16) == 2 * 2 * 16 * 2


def test_spec_rejects_non_llava():
    with pytest.raises(AdscModelError, match="LlavaForConditionalGeneration"):
        llava_spec(torch.nn.Linear(2, 2))


def test_embed_with_images_and_runs():
    model = tiny_llava(grid_side=2)
    spec = llava_spec(model)
    tok = spec.image_token_id
    ids = torch.tensor([[1, tok, tok, tok, tok, 5, 6]])
    pix = torch.randn(1, 3, spec.image_size, spec.image_size)
    h = embed_with_images(model, ids, pix)
    plain = model.get_input_embeddings()(ids)
    assert torch.equal(h[0, [0, 5, 6]], plain[0, [0, 5, 6]])
    assert not torch.equal(h[0, 1:5], plain[0, 1:5])
    assert image_runs(ids[0].tolist(), tok) == [(1, 5)]
    assert count_images(ids[0], spec) == 1
    with pytest.raises(AdscInputError, match="whole images of 2x2 = 4 tokens; got a run of 3"):
        count_images([1, tok, tok, tok, 2], spec)
    with pytest.raises(AdscInputError, match="4 image tokens but the images give 8"):
        embed_with_images(model, ids, torch.randn(2, 3, spec.image_size, spec.image_size))


# ---- the model spec interface and its registry (issue 20, item 3) ---------------------------------
def test_model_spec_dispatches_on_the_hf_class_and_looks_through_peft():
    from adsc_ext.models import LlavaSpec, model_spec, registered_architectures

    model = tiny_llava(grid_side=3, num_layers=5)
    spec = model_spec(model)
    assert isinstance(spec, LlavaSpec) and spec.model is model and spec == llava_spec(model)
    assert "LlavaForConditionalGeneration" in registered_architectures()
    peft = pytest.importorskip("peft")
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert model_spec(wrapped).model is model
    with pytest.raises(AdscModelError, match="LlavaForConditionalGeneration.*got torch.nn.modules.linear.Linear"):
        model_spec(torch.nn.Linear(2, 2))


def test_a_registered_architecture_is_found_for_its_subclasses():
    from adsc_ext.models import base

    class Fake(torch.nn.Module):
        pass

    class FakeChild(Fake):
        pass

    seen = []

    @base.register_model_spec("Fake")
    class FakeSpec(base.ModelSpec):
        @classmethod
        def from_model(cls, model):
            seen.append(model)
            return cls(num_layers=1, hidden_size=2, num_heads=1, num_kv_heads=1, head_dim=2, vocab_size=3,
                       max_positions=4, rms_norm_eps=1e-6, scaling=1.0, image_token_id=0)

    try:
        m = FakeChild()
        assert isinstance(base.model_spec(m), FakeSpec) and seen == [m]
    finally:
        base._REGISTRY.pop("Fake")


def test_spec_operations_equal_the_models_modules():
    from adsc_ext.models import model_spec

    model = tiny_llava(seed=2, grid_side=2, num_layers=3)
    spec = model_spec(model)
    text = text_model(model)
    h = torch.randn(2, 5, spec.hidden_size)
    with torch.no_grad():
        assert torch.equal(spec.logits(h), model.lm_head(text.norm(h)))
        pos = torch.arange(5).expand(2, 5)
        assert all(torch.equal(a, b) for a, b in zip(spec.rotary(h, pos), text.rotary_emb(h, pos)))
    assert list(spec.layers) == list(text.layers)
    assert spec.prompt_grids(torch.tensor([1, *[spec.image_token_id] * 8, 2])) == [(2, 2), (2, 2)]
    assert spec.stage_lengths(spec.resolve_schedule("1:2")[0], 11, [(2, 2), (2, 2)]) == [11, 7]
    facts = spec.unbound()
    assert facts == spec and facts.model is None
    with pytest.raises(AdscModelError, match="does not hold"):
        facts.logits(h)


def test_default_schedules_follow_spec_section_2():
    from adsc_ext.models import default_schedule, model_spec
    from adsc_ext.schedule import LLAVA15_DEFAULT, ScheduleError

    assert default_schedule(28) == "7:2,14:2,21:2"  # Qwen2.5-VL-7B's 28 layers
    assert default_schedule(32) == "8:2,16:2,24:2" and default_schedule(3) == "1:2,2:2"
    spec = model_spec(tiny_llava(grid_side=4, num_layers=6))
    assert spec.default_schedule() == LLAVA15_DEFAULT  # LLaVA-1.5's own, whatever the depth
    with pytest.raises(ScheduleError, match="does not fit"):
        spec.resolve_schedule()


def test_spec_from_an_export_manifest_has_the_facts_only():
    from adsc_ext.models import LlavaSpec

    model = tiny_llava(grid_side=3, num_layers=2)
    spec = llava_spec(model)
    man = {"grid": list(spec.grid), "image_token_id": spec.image_token_id, "image_size": spec.image_size,
           "model": {k: getattr(spec, k) for k in ("num_layers", "hidden_size", "num_heads", "num_kv_heads",
                                                   "head_dim", "vocab_size", "max_positions", "rms_norm_eps",
                                                   "scaling")}}
    assert LlavaSpec.from_manifest(man) == spec and LlavaSpec.from_manifest(man).model is None
