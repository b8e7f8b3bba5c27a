"""Contract test of adsc_ext/hf/_compat.py: what the Hugging Face integration assumes about the
installed transformers beyond its documented API. Each test names the item of _compat's doc it
checks, so a release that moves something fails here with the surface that moved."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402
import transformers  # noqa: E402

from adsc_ext.hf import AdscCache, _compat, apply_adsc  # noqa: E402
from adsc_ext.testing import tiny_llava  # noqa: E402
from adsc_ext.models import attention_inputs, attention_output, llava_spec, text_model  # noqa: E402
from adsc_ext.models.llava import rotary  # noqa: E402

V = transformers.__version__


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_item1_attention_implementation_and_mask_format(impl):
    """A decoder layer given format_mask(impl, allowed) attends exactly where `allowed` says."""
    model = tiny_llava(seed=3, attn_implementation=impl)
    text = text_model(model)
    assert _compat.attn_implementation(text.config) == impl, (
        f"transformers {V}: config._attn_implementation no longer names the attention implementation (item 1)")
    spec = llava_spec(model)
    B, T = 2, 6
    torch.manual_seed(0)
    h = torch.randn(B, T, spec.hidden_size)
    cos, sin = rotary(model, h, torch.arange(T).expand(B, T))
    allowed = torch.rand(B, 1, T, T) < 0.6
    allowed |= torch.eye(T, dtype=torch.bool)  # every query sees something
    layer = text.layers[0]
    with torch.no_grad():
        out = layer(h, attention_mask=_compat.format_mask(impl, allowed, h.dtype), position_embeddings=(cos, sin))
        out = out[0] if isinstance(out, tuple) else out
        q, k, v = attention_inputs(layer, h, cos, sin, spec.head_dim)
        o = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=allowed, scale=spec.scaling,
            enable_gqa=True)
        ref = attention_output(layer, h, o.transpose(1, 2))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=lambda m: (
        f"transformers {V}: the {impl} attention no longer takes the mask format of _compat.format_mask (item 1): {m}"))


def test_item2_cache_argument_names():
    model = tiny_llava()
    name = _compat.cache_kwarg(model)
    assert name in _compat.forward_parameters(model), f"transformers {V}: LLaVA's forward cache argument (item 2)"
    assert _compat.cache_kwarg(text_model(model).layers[0]) in _compat.CACHE_KWARGS
    # the output's field of the same name holds the cache the model returns (read without a warning)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
    assert name in out.__dataclass_fields__, f"transformers {V}: LLaVA's output has no {name!r} field (item 2)"
    cache = _compat.output_cache(out)
    assert cache is not None and cache.get_seq_length() == 3


def test_item4_dynamic_cache_batch_methods():
    from transformers import DynamicCache

    missing = [m for m in _compat.CACHE_BATCH_METHODS if not callable(getattr(DynamicCache, m, None))]
    assert not missing, f"transformers {V}: DynamicCache no longer has {missing}, which AdscCache overrides (item 4)"


def test_item3_layer_call_convention():
    """The text model calls each decoder layer with the hidden states first and these keywords."""
    model = tiny_llava()
    seen = []
    handle = text_model(model).layers[1].register_forward_pre_hook(
        lambda mod, args, kwargs: seen.append((args, kwargs)), with_kwargs=True)
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 5, 6, 7]]))
    finally:
        handle.remove()
    (args, kwargs), = seen
    hidden, positional = _compat.layer_hidden(args, kwargs)
    assert hidden.shape[:2] == (1, 4), f"transformers {V}: a decoder layer's hidden states argument moved (item 3)"
    missing = [k for k in _compat.LAYER_KWARGS if k not in kwargs]
    assert not missing, f"transformers {V}: decoder layers are no longer called with {missing} (item 3)"
    cos, sin = kwargs["position_embeddings"]
    assert cos.shape == sin.shape == (1, 4, llava_spec(model).head_dim), (
        f"transformers {V}: position_embeddings is no longer (cos, sin) of [B, T, head_dim] (item 3)")


def test_item4_cache_layer_tensors():
    model = tiny_llava()
    with torch.no_grad():
        out = model(input_ids=torch.tensor([[1, 5, 6, 7, 8]]), use_cache=True)
    cache = out.past_key_values if hasattr(out, "past_key_values") else out.cache
    spec = llava_spec(model)
    kv = _compat.layer_kv(cache.layers[0])
    assert kv is not None and kv[0].shape == (1, spec.num_kv_heads, 5, spec.head_dim), (
        f"transformers {V}: a DynamicCache layer's keys/values/is_initialized moved (item 4)")
    assert _compat.layer_kv(AdscCache(config=model.config.get_text_config()).layers[0]) is None


def test_generate_continues_with_the_cache_the_model_returns():
    """generate() creates a DynamicCache; the ADSC pre-hook hands the forward an AdscCache in its
    place, and generate must carry on with the cache the output returns."""
    model = apply_adsc(tiny_llava(), "2:2")
    g = model.generate(input_ids=torch.tensor([[1, 5, 6, 7]]), max_new_tokens=3, min_new_tokens=3,
                       return_dict_in_generate=True)
    cache = getattr(g, "past_key_values", None) or getattr(g, "cache", None)
    assert isinstance(cache, AdscCache), (
        f"transformers {V}: generate() no longer continues with the cache the model's output returns")


def test_item5_attention_weights_for_the_fastv_baseline():
    """Under eager attention the attention module returns (output, weights [B, H, q, K])."""
    model = tiny_llava()
    text = text_model(model)
    got = []
    h = text.layers[0].self_attn.register_forward_hook(lambda m, a, out: got.append(out[1]))
    try:
        with _compat.attention_implementation(text.config, "eager"), torch.no_grad():
            model(input_ids=torch.tensor([[1, 5, 6]]))
    finally:
        h.remove()
    assert _compat.attn_implementation(text.config) == "sdpa"
    assert got and got[0] is not None and got[0].shape[-2:] == (3, 3), (
        f"transformers {V}: eager attention no longer returns its weights as the second output")


def test_item7_checkpointing_switch_and_layer_flag():
    import warnings

    model = tiny_llava()
    layers = text_model(model).layers
    assert not any(_compat.layer_checkpointed(layer) for layer in layers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated name warns from 5.23
        _compat.enable_checkpointing(model)
    assert all(_compat.layer_checkpointed(layer) for layer in layers), (
        f"transformers {V}: enable_checkpointing no longer sets the decoder layers' gradient_checkpointing flag")
    with _compat.checkpointing_off(layers[0]):
        assert not _compat.layer_checkpointed(layers[0])
    assert _compat.layer_checkpointed(layers[0])
