"""Tests of adsc_ext.accounting: the spec section 7 table, model descriptions, and the FLOPs
formula against ``torch.utils.flop_counter.FlopCounterMode`` on real forwards of a small LLaMA."""

from __future__ import annotations

import dataclasses
import json
import re
from contextlib import contextmanager

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from adsc_ext.accounting import (
    PRESETS,
    ModelSpecError,
    VisionSpec,
    decode_weight_bytes,
    layer_flops,
    lm_head_flops,
    vision_flops,
    layer_kv_bytes,
    load_model_spec,
    plan_report,
    spec_from_config,
)
from adsc_ext.reference import compact_tokens_reference, stage_plan_reference
from adsc_ext.schedule import LLAVA15_DEFAULT, ScheduleError

LLAVA7B = PRESETS["llava-1.5-7b"]
LLAVA13B = PRESETS["llava-1.5-13b"]


# ---- spec section 7 ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text_tokens, baseline, adsc, flops_cut, kv_cut",
    [(0, "7.634", "3.555", "53.4", "53.1"), (64, "8.504", "4.404", "48.2", "47.8")],
)
def test_spec_table_llava7b(text_tokens, baseline, adsc, flops_cut, kv_cut):
    r = plan_report(LLAVA7B, LLAVA15_DEFAULT, text_tokens)
    assert f"{r['baseline_flops'] / 1e12:.3f}" == baseline
    assert f"{r['adsc_flops'] / 1e12:.3f}" == adsc
    assert f"{r['flops_reduction_pct']:.1f}" == flops_cut
    assert f"{r['kv_reduction_pct']:.1f}" == kv_cut


def test_llava7b_exact_numbers_at_64_text_tokens():
    r = plan_report(LLAVA7B, LLAVA15_DEFAULT, 64)
    per_token_linear = 2 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    assert r["baseline_flops"] == 32 * (640 * per_token_linear + 4 * 640 * 640 * 4096)
    assert r["baseline_kv_bytes"] == 32 * 2 * 640 * 4096 * 2 == 320 * 2**20
    assert r["adsc_kv_bytes"] == 8 * 2 * (640 + 352 + 208 + 136) * 4096 * 2
    assert f"{r['ideal_speedup']:.2f}" == "1.93"
    assert r["ideal_speedup"] == r["baseline_flops"] / r["adsc_flops"]
    rows = [(s["first_layer"], s["last_layer"], s["grid"], s["vision_tokens_per_image"], s["tokens"])
            for s in r["stages"]]
    assert rows == [
        (0, 7, [24, 24], 576, 640),
        (8, 15, [24, 12], 288, 352),
        (16, 23, [12, 12], 144, 208),
        (24, 31, [12, 6], 72, 136),
    ]
    assert [row["layer"] for row in r["layers"]] == list(range(32))
    assert [row["tokens"] for row in r["layers"]] == [640] * 8 + [352] * 8 + [208] * 8 + [136] * 8
    assert sum(s["flops"] for s in r["stages"]) == r["adsc_flops"]
    json.dumps(r)  # the CLI prints it as JSON


@pytest.mark.parametrize("schedule", ["", None])
def test_empty_schedule_is_no_reduction(schedule):
    r = plan_report(LLAVA7B, schedule, 64)
    assert r["adsc_flops"] == r["baseline_flops"]
    assert r["adsc_kv_bytes"] == r["baseline_kv_bytes"]
    assert r["flops_reduction_pct"] == r["kv_reduction_pct"] == 0.0
    assert r["ideal_speedup"] == 1.0
    assert len(r["stages"]) == 1 and r["stages"][0]["last_layer"] == 31


def test_images_scale_the_vision_part():
    two = plan_report(LLAVA7B, LLAVA15_DEFAULT, 10, images=2)
    assert [s["tokens"] for s in two["stages"]] == [10 + 2 * t for t in (576, 288, 144, 72)]
    text_only = plan_report(LLAVA7B, LLAVA15_DEFAULT, 10, images=0)
    assert text_only["adsc_flops"] == text_only["baseline_flops"] == 32 * layer_flops(LLAVA7B, 10)


def test_dtype_bytes_scales_kv_only():
    fp16 = plan_report(LLAVA7B, LLAVA15_DEFAULT, 64)
    fp32 = plan_report(LLAVA7B, LLAVA15_DEFAULT, 64, dtype_bytes=4)
    assert fp32["adsc_kv_bytes"] == 2 * fp16["adsc_kv_bytes"]
    assert fp32["adsc_flops"] == fp16["adsc_flops"]


def test_llava13b_preset():
    r = plan_report(LLAVA13B, LLAVA15_DEFAULT, 64)
    per_token_linear = 2 * (4 * 5120 * 5120 + 3 * 5120 * 13824)
    assert r["baseline_flops"] == 40 * (640 * per_token_linear + 4 * 640 * 640 * 5120)
    assert r["baseline_kv_bytes"] == 40 * 2 * 640 * 5120 * 2 == 500 * 2**20
    assert [(s["first_layer"], s["last_layer"], s["tokens"]) for s in r["stages"]] == [
        (0, 7, 640), (8, 15, 352), (16, 23, 208), (24, 39, 136)]
    # 40 layers: the last stage is twice as long, so the KV saving beats 7B's 47.8 %.
    assert r["kv_reduction_pct"] == pytest.approx(100 * (1 - (8 * 1200 + 16 * 136) / (40 * 640)))
    assert f"{r['kv_reduction_pct']:.1f}" == "54.0"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(text_tokens=-1), "text_tokens"),
        (dict(text_tokens=1.5), "text_tokens"),
        (dict(text_tokens=1, images=-1), "images"),
        (dict(text_tokens=1, dtype_bytes=0), "dtype_bytes"),
        (dict(text_tokens=0, images=0), "empty"),
    ],
)
def test_plan_report_rejects_bad_numbers(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_report(LLAVA7B, LLAVA15_DEFAULT, **kwargs)


def test_plan_report_rejects_schedules_that_do_not_fit():
    with pytest.raises(ScheduleError, match="32 decoder layers"):
        plan_report(LLAVA7B, "8:2,32:2", 64)
    tiny = dataclasses.replace(LLAVA7B, name="tiny-grid", grid=(2, 2))
    with pytest.raises(ScheduleError, match="grid"):
        plan_report(tiny, "8:4,16:2", 64)


# ---- model descriptions -----------------------------------------------------------------------
def _write_config(tmp_path, config) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config) if not isinstance(config, str) else config)
    return str(path)


# The official llava-hf/llava-1.5-7b-hf config.json (abridged): its text_config leaves the LLaMA
# shape to transformers' LlamaConfig defaults.
LLAVA_HF_7B = {
    "architectures": ["LlavaForConditionalGeneration"],
    "image_token_index": 32000,
    "model_type": "llava",
    "text_config": {"_name_or_path": "lmsys/vicuna-7b-v1.5", "model_type": "llama",
                    "vocab_size": 32064},
    "vision_config": {"hidden_size": 1024, "image_size": 336, "intermediate_size": 4096,
                      "model_type": "clip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768,
                      "vocab_size": 32000},
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}


def test_presets_by_name():
    assert load_model_spec("llava-1.5-7b") is LLAVA7B
    assert (LLAVA7B.head_dim, LLAVA7B.grid, LLAVA7B.tokens_per_image) == (128, (24, 24), 576)
    assert (LLAVA13B.hidden_size, LLAVA13B.num_layers, LLAVA13B.num_heads) == (5120, 40, 40)


def test_official_llava_config_matches_the_preset(tmp_path):
    path = _write_config(tmp_path, LLAVA_HF_7B)
    for where in (path, tmp_path):  # the file or the directory holding it
        spec = load_model_spec(where)
        assert dataclasses.replace(spec, name=LLAVA7B.name) == LLAVA7B


def test_gqa_config(tmp_path):
    config = {
        "text_config": {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336,
                        "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 8},
        "vision_config": {"image_size": 336, "patch_size": 14},
    }
    spec = load_model_spec(_write_config(tmp_path, config))
    assert (spec.num_kv_heads, spec.head_dim, spec.grid) == (8, 128, (24, 24))
    # k/v projections are 8 * 128 = 1024 wide; attention still runs over all 32 query heads.
    linear = 2 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert layer_flops(spec, 1) == linear + 4 * 128 * 32
    assert layer_kv_bytes(spec, 10) == 2 * 10 * 8 * 128 * 2


def test_explicit_head_dim():
    spec = spec_from_config(
        {"text_config": {"model_type": "x", "hidden_size": 64, "intermediate_size": 100,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 32},
         "vision_config": {"image_size": 60, "patch_size": 14}},
        name="wide-heads",
    )
    assert (spec.head_dim, spec.num_kv_heads, spec.grid) == (32, 4, (4, 4))
    assert layer_flops(spec, 3) == 2 * 3 * (4 * 64 * 128 + 3 * 64 * 100) + 4 * 3 * 3 * 32 * 4


_TEXT = {"model_type": "x", "hidden_size": 64, "intermediate_size": 100, "num_hidden_layers": 2,
         "num_attention_heads": 4}
_VISION = {"image_size": 56, "patch_size": 14}


@pytest.mark.parametrize(
    "config, match",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ({"text_config": _TEXT}, "needs 'text_config' and 'vision_config'"),
        ({"text_config": {**_TEXT, "hidden_size": None}, "vision_config": _VISION},
         "missing text_config.hidden_size"),
        ({"text_config": _TEXT, "vision_config": {"image_size": 56}},
         "missing vision_config.patch_size"),
        ({"text_config": {**_TEXT, "num_key_value_heads": 3}, "vision_config": _VISION},
         "multiple"),
        ({"text_config": {**_TEXT, "num_hidden_layers": -2}, "vision_config": _VISION},
         "positive"),
        ({"text_config": {**_TEXT, "num_hidden_layers": True}, "vision_config": _VISION},
         "positive"),
        ({"text_config": {**_TEXT, "hidden_size": 66}, "vision_config": _VISION}, "head_dim"),
        ({"text_config": _TEXT, "vision_config": {"image_size": 10, "patch_size": 14}}, "smaller"),
        ({"text_config": _TEXT, "vision_config": _VISION, "vision_feature_select_strategy": "full"},
         "CLS"),
    ],
)
def test_bad_configs(tmp_path, config, match):
    with pytest.raises(ModelSpecError, match=match) as info:
        load_model_spec(_write_config(tmp_path, config))
    assert "\n" not in str(info.value)


def test_unknown_model_and_missing_file(tmp_path):
    with pytest.raises(ModelSpecError, match="not a preset"):
        load_model_spec("llava-9b")
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_model_spec(str(tmp_path / "nowhere" / "config.json"))
    with pytest.raises(ModelSpecError, match="no config.json"):
        load_model_spec(tmp_path)  # a directory without config.json


def test_model_spec_checks_itself():
    with pytest.raises(ModelSpecError, match="grid"):
        dataclasses.replace(LLAVA7B, grid=(24, 0))
    with pytest.raises(ModelSpecError, match="multiple"):
        dataclasses.replace(LLAVA7B, num_kv_heads=5)


# ---- the formula against FlopCounterMode on a real forward ------------------------------------
TINY_TEXT = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=6, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=100)
IMAGE_TOKEN = 99  # text tokens are drawn below it


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_llama(request):
    """A random 6-layer LLaMA with GQA (4 query heads, 2 KV heads) and its ModelSpec (4x4 grid)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_TEXT, attn_implementation=request.param)
    model = transformers.LlamaModel(config).eval()
    assert model.config._attn_implementation == request.param
    spec = spec_from_config(
        {"text_config": config.to_dict(), "vision_config": {"image_size": 56, "patch_size": 14}},
        name="tiny-llama",
    )
    assert (spec.num_kv_heads, spec.head_dim, spec.grid) == (2, 16, (4, 4))
    return model, spec


@contextmanager
def _flop_counter():
    # On CPU, SDPA picks a flash kernel that FlopCounterMode has no formula for (its attention
    # would count 0). The math backend runs the same attention as matmuls, counted densely like
    # the CUDA flash/efficient kernels are; eager attention ignores the setting.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        yield counter


def _rope_flops(counter):
    """The FLOPs counted in the rotary embedding: transformers before 5.19 computes RoPE's angles
    with a matmul (inv_freq [head_dim/2, 1] @ positions [1, n]: head_dim * n FLOPs), which spec
    section 7 does not count; from 5.19 on it is an elementwise product, which FlopCounterMode does
    not count either. The module is named by its path in a forward, by its class when called alone."""
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
               if name.split(".")[-1] in ("rotary_emb", "LlamaRotaryEmbedding"))


@pytest.mark.parametrize("n", [1, 37])
def test_plain_forward_counts_layer_flops(tiny_llama, n):
    model, spec = tiny_llama
    with _flop_counter() as counter:
        model(input_ids=torch.randint(0, IMAGE_TOKEN, (1, n)))
    counts = counter.get_flop_counts()
    per_layer = [sum(counts[f"LlamaModel.layers.{i}"].values()) for i in range(spec.num_layers)]
    assert per_layer == [layer_flops(spec, n)] * spec.num_layers
    # Embedding lookup, RoPE and the final norm are no counted matmuls: the whole model's count
    # is the decoder layers' count, as spec section 7 defines it.
    assert _rope_flops(counter) in (0, spec.head_dim * n)
    assert counter.get_total_flops() - _rope_flops(counter) == spec.num_layers * layer_flops(spec, n)


def test_adsc_forward_counts_plan_report_flops(tiny_llama):
    model, spec = tiny_llama
    schedule = "2:2,4:4"  # 4x4 -> 4x2 -> 2x1 vision tokens per image
    text = lambda k: torch.randint(0, IMAGE_TOKEN, (k,))  # noqa: E731
    image = torch.full((spec.tokens_per_image,), IMAGE_TOKEN)
    input_ids = torch.cat([text(3), image, text(2), image, text(4)])[None]
    plan = stage_plan_reference(schedule, input_ids=input_ids, image_token_id=IMAGE_TOKEN,
                                grid=spec.grid)
    report = plan_report(spec, schedule, text_tokens=9, images=2)

    alive = []
    with _flop_counter() as counter:
        hidden = model.embed_tokens(input_ids)
        for i, layer in enumerate(model.layers):
            stage = plan.stage_of_layer(i)
            if stage.stage > 0 and i == stage.first_layer:
                hidden = compact_tokens_reference(hidden, stage.index)
            n = hidden.shape[1]
            # Kept tokens keep their original positions (spec section 5); order is preserved,
            # so the compacted sequence is plainly causal.
            cos_sin = model.rotary_emb(hidden, stage.position_ids)
            causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
            hidden = layer(hidden, attention_mask=causal, position_embeddings=cos_sin,
                           position_ids=stage.position_ids)
            alive.append({"layer": i, "tokens": n})

    assert alive == report["layers"]
    assert [row["tokens"] for row in alive] == [41, 41, 25, 25, 13, 13]
    assert _rope_flops(counter) in (0, sum(spec.head_dim * row["tokens"] for row in alive))
    assert counter.get_total_flops() - _rope_flops(counter) == report["adsc_flops"]
    assert report["adsc_flops"] < report["baseline_flops"] == 6 * layer_flops(spec, 41)


# ---- spec section 8's ratios: the whole prefill and one decode step ---------------------------
def test_whole_prefill_and_decode_step_ratios_llava7b():
    r = plan_report(LLAVA7B, LLAVA15_DEFAULT, 64)
    pre, dec = r["prefill"], r["decode"]
    # CLIP ViT-L/14-336: patch conv + 24 layers on 577 tokens; projector 1024 -> 4096 -> 4096 on 576
    per_layer = 2 * 577 * (4 * 1024 ** 2 + 2 * 1024 * 4096) + 4 * 577 * 577 * 1024
    want_vision = 2 * 576 * 3 * 14 * 14 * 1024 + 24 * per_layer + 2 * 576 * (1024 * 4096 + 4096 * 4096)
    assert pre["vision_flops"] == pre["vision_flops_per_image"] == want_vision
    assert f"{8 * want_vision / 1e12:.2f}" == "3.25"  # issue 13: 3.25 TFLOPs at batch 8
    assert pre["lm_head_flops"] == 2 * 4096 * 32064
    assert pre["baseline_flops"] == r["baseline_flops"] + want_vision + pre["lm_head_flops"]
    assert pre["adsc_flops"] == r["adsc_flops"] + want_vision + pre["lm_head_flops"]
    assert f"{pre['speedup']:.2f}" == "1.85"  # spec section 8: "about 1.85x"
    assert pre["speedup"] < r["ideal_speedup"]
    # decode, batch 32, 256 new tokens: weights once per step, KV at each step's lengths
    weights = 2 * (32 * (4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096) + 4096 + 32064 * 4096)
    assert dec["weights_bytes"] == weights == decode_weight_bytes(LLAVA7B)
    per_tok = 2 * 4096 * 2  # K and V of one token in one layer
    stage_tokens = [640] * 8 + [352] * 8 + [208] * 8 + [136] * 8
    steps = range(1, 256)
    base = sum(32 * per_tok * sum(640 + s for _ in range(32)) for s in steps) / len(steps)
    adsc = sum(32 * per_tok * sum(n + s for n in stage_tokens) for s in steps) / len(steps)
    assert (dec["batch"], dec["new_tokens"], dec["steps"]) == (32, 256, 255)
    assert dec["baseline_kv_bytes"] == pytest.approx(base, rel=1e-12)
    assert dec["adsc_kv_bytes"] == pytest.approx(adsc, rel=1e-12)
    assert dec["speedup"] == pytest.approx((weights + base) / (weights + adsc), rel=1e-12)
    assert f"{dec['speedup']:.2f}" == "1.24"  # spec section 8: "about 1.24x"
    # batch 64: the KV share, and so the gain, is larger
    assert plan_report(LLAVA7B, LLAVA15_DEFAULT, 64, decode_batch=64)["decode"]["speedup"] > dec["speedup"]
    # the cache after the run (prompt + new tokens): smaller than the prompt-only reduction
    assert dec["adsc_kv_bytes_end"] == 32 * per_tok * (sum(stage_tokens) + 32 * 256)
    assert 0 < dec["kv_end_reduction_pct"] < r["kv_reduction_pct"]
    json.dumps(r)


def test_empty_schedule_ratios_are_one():
    r = plan_report(LLAVA7B, "", 64)
    assert r["prefill"]["speedup"] == 1.0 and r["decode"]["speedup"] == 1.0


@pytest.mark.parametrize("kwargs, match", [(dict(decode_batch=0), "decode_batch"), (dict(new_tokens=1), "new_tokens")])
def test_decode_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_report(LLAVA7B, LLAVA15_DEFAULT, 64, **kwargs)


def test_official_config_vision_and_vocab():
    spec = spec_from_config(LLAVA_HF_7B, "llava-hf")
    assert spec.vision == VisionSpec() and spec.vocab_size == 32064
    with pytest.raises(ModelSpecError, match="vision hidden_size"):
        dataclasses.replace(LLAVA7B, vision=VisionSpec(hidden_size=1000, num_heads=16))


@pytest.fixture(scope="module")
def tiny_llava_and_spec():
    """A tiny random LLaVA (CLIP tower, LLaMA decoder) and its ModelSpec read from its config."""
    pytest.importorskip("transformers")
    from adsc_ext.testing import tiny_llava

    model = tiny_llava(seed=0, grid_side=4, patch_size=4, vision_layers=3, attn_implementation="sdpa")
    spec = spec_from_config(model.config.to_dict(), "tiny-llava")
    return model, spec


def test_vision_tower_and_projector_count_vision_flops(tiny_llava_and_spec):
    """The vision formula against FlopCounterMode on LLaVA's own get_image_features (tower +
    projector, all encoder layers run), for two images."""
    model, spec = tiny_llava_and_spec
    side = spec.vision.image_size
    assert (spec.vision.num_layers, spec.vision.patches) == (3, 16)
    with _flop_counter() as counter:
        model.model.get_image_features(pixel_values=torch.randn(2, 3, side, side),
                                       vision_feature_layer=model.config.vision_feature_layer,
                                       vision_feature_select_strategy="default")
    assert counter.get_total_flops() == 2 * vision_flops(spec)


def test_lm_head_and_decode_weights_are_the_model_s(tiny_llava_and_spec):
    """LM head FLOPs against FlopCounterMode; decode-step weight bytes against the parameters of
    the decoder layers, the final norm and the LM head of the real model."""
    model, spec = tiny_llava_and_spec
    with _flop_counter() as counter:
        model.lm_head(torch.randn(3, spec.hidden_size))
    assert counter.get_total_flops() == lm_head_flops(spec, 3)
    text = model.model.language_model
    params = sum(p.numel() for p in text.layers.parameters()) + text.norm.weight.numel() + model.lm_head.weight.numel()
    assert decode_weight_bytes(spec, dtype_bytes=4) == 4 * params


def test_adsc_plan_prints_the_section8_ratios(capsys):
    from adsc_ext import cli

    assert cli.main(["plan"]) == 0
    out = capsys.readouterr().out
    assert "8.910 vs 4.810 TFLOPs, ideal time-to-first-token speed-up 1.85x" in out
    assert "one decode step, batch 32, 256 new tokens (mean over 255 steps)" in out
    assert "ideal decode speed-up 1.24x" in out
    assert cli.main(["plan", "--decode-batch", "64", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["decode"]["batch"] == 64 and r["decode"]["speedup"] > 1.24
    assert cli.main(["plan", "--new-tokens", "1"]) == 2
    assert "new_tokens must be an integer >= 2" in capsys.readouterr().err


# ---- the architectures beyond LLaVA-1.5 (issue 20): presets, config.json, images, FLOP counter ----
from adsc_ext.accounting import (ARCHITECTURES, DEFAULT_IMAGE_SIZE, image_tokens,  # noqa: E402
                                 parse_image_size)
from adsc_ext.image_grids import qwen_resize  # noqa: E402
from adsc_ext.errors import AdscInputError  # noqa: E402

NEW_PRESETS = ["llava-v1.6-mistral-7b", "llava-v1.6-vicuna-7b", "llava-onevision-qwen2-7b", "qwen2-vl-7b",
               "qwen2.5-vl-7b", "qwen3-vl-8b"]


def test_config_defaults_are_transformers_own():
    """What a config.json may leave out is filled with the defaults of transformers' config class of
    that model_type, as transformers does (a release that changes one fails here)."""
    transformers = pytest.importorskip("transformers")
    from adsc_ext.accounting import _DEFAULTS

    # Keys an older config class does not define, and what transformers' model then does without
    # them (transformers 5.17's SiglipVisionConfig has no vision_use_head; its
    # SiglipVisionTransformer runs the pooling head when the attribute is absent).
    model_fallbacks = {("siglip_vision_model", "vision_use_head"): True}
    for model_type, defaults in _DEFAULTS.items():
        cfg = transformers.AutoConfig.for_model(model_type)
        for key, want in defaults.items():
            if not hasattr(cfg, key):
                assert (model_type, key) in model_fallbacks, (model_type, key, "missing from the config class")
                got = model_fallbacks[model_type, key]
            else:
                got = getattr(cfg, key)
            assert (list(got) if isinstance(got, tuple) else got) == want, (model_type, key)


def _release_configs():
    """transformers configs with the published shapes of the 7B-class releases (sources: research
    note section 5), as their config.json files hold them."""
    T = pytest.importorskip("transformers")
    clip = T.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    nl = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    mistral = T.MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=32064, sliding_window=None)
    vicuna = T.LlamaConfig(vocab_size=32064)
    siglip = T.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
                                  num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False)
    qwen2 = T.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                          num_key_value_heads=4, vocab_size=152128)
    text7 = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064)
    return {
        "llava-v1.6-mistral-7b": T.LlavaNextConfig(vision_config=clip, text_config=mistral, image_grid_pinpoints=nl),
        "llava-v1.6-vicuna-7b": T.LlavaNextConfig(vision_config=clip, text_config=vicuna, image_grid_pinpoints=nl),
        "llava-onevision-qwen2-7b": T.LlavaOnevisionConfig(vision_config=siglip, text_config=qwen2),
        "qwen2-vl-7b": T.Qwen2VLConfig(text_config=text7, vision_config=dict(depth=32, embed_dim=1280, mlp_ratio=4,
                                                                              num_heads=16, hidden_size=3584)),
        "qwen2.5-vl-7b": T.Qwen2_5_VLConfig(text_config=text7, vision_config=dict(
            depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, window_size=112,
            fullatt_block_indexes=[7, 15, 23, 31])),
        "qwen3-vl-8b": T.Qwen3VLConfig(
            text_config=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                             num_key_value_heads=8, head_dim=128, vocab_size=151936),
            vision_config=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                               patch_size=16, deepstack_visual_indexes=[8, 16, 24])),
    }


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_new_presets_are_their_release_configs(name, tmp_path):
    cfg = _release_configs()[name]
    path = _write_config(tmp_path, cfg.to_dict())
    spec = load_model_spec(path)
    assert dataclasses.replace(spec, name=name) == PRESETS[name]


def test_qwen25_release_config_json_with_its_preprocessor(tmp_path):
    """The released Qwen2.5-VL-7B-Instruct config.json keeps the text keys at the top level; the
    processor's pixel limits come from preprocessor_config.json beside it."""
    config = {"architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
              "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
              "num_key_value_heads": 4, "vocab_size": 152064, "rope_scaling": {"type": "mrope",
                                                                                "mrope_section": [16, 24, 24]},
              "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                                "num_heads": 16, "in_chans": 3, "out_hidden_size": 3584, "patch_size": 14,
                                "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                                "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2,
                                "temporal_patch_size": 2}}
    _write_config(tmp_path, config)
    spec = load_model_spec(tmp_path)
    assert dataclasses.replace(spec, name="qwen2.5-vl-7b") == PRESETS["qwen2.5-vl-7b"]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 3136, "max_pixels": 200704}))
    small = load_model_spec(tmp_path)
    assert (small.vision.min_pixels, small.vision.max_pixels) == (3136, 200704)
    assert image_tokens(small, (1024, 1024)).tokens == 256 < image_tokens(spec, (1024, 1024)).tokens == 1369
    config["adsc_schedule"] = "7:4"
    _write_config(tmp_path, config)
    assert load_model_spec(tmp_path).default_schedule() == "7:4"
    config["adsc_schedule"] = "7:3"
    _write_config(tmp_path, config)
    with pytest.raises(ScheduleError, match="adsc_schedule"):
        load_model_spec(tmp_path)


@pytest.mark.parametrize("name, schedule", [("llava-1.5-7b", "8:2,16:2,24:2"), ("llava-v1.6-mistral-7b", "8:2,16:2,24:2"),
                                            ("llava-onevision-qwen2-7b", "7:2,14:2,21:2"),
                                            ("qwen2.5-vl-7b", "7:2,14:2,21:2"), ("qwen3-vl-8b", "9:2,18:2,27:2")])
def test_default_schedules(name, schedule):
    """Spec section 2: LLaVA-1.5's own, else round(L/4), round(L/2), round(3L/4)."""
    assert PRESETS[name].default_schedule() == schedule


# The research note's per-image table (section 5), from the released geometry; sizes are (height, width).
@pytest.mark.parametrize("name, size, tokens, crops, tflops", [
    ("qwen2.5-vl-7b", (448, 448), 256, 1, "1.347"), ("qwen2.5-vl-7b", (640, 480), 391, 1, "2.073"),
    ("qwen2.5-vl-7b", (1024, 1024), 1369, 1, "7.700"), ("qwen3-vl-8b", (448, 448), 196, 1, "0.787"),
    ("qwen3-vl-8b", (1024, 1024), 1024, 1, "5.798"), ("llava-onevision-qwen2-7b", (448, 448), 3699, 5, "3.333"),
    ("llava-onevision-qwen2-7b", (1024, 1024), 7371, 10, "6.665"), ("llava-onevision-qwen2-7b", (480, 640), 2929, 5, "3.333"),
    ("llava-v1.6-mistral-7b", (448, 448), 2928, 5, "2.030"), ("llava-v1.6-mistral-7b", (640, 480), 2352, 5, "2.030"),
])
def test_release_images(name, size, tokens, crops, tflops):
    spec = PRESETS[name]
    image = image_tokens(spec, size)
    assert (image.tokens, image.crops) == (tokens, crops)
    assert f"{vision_flops(spec, image) / 1e12:.3f}" == tflops


def test_onevision_report_of_a_multi_image_prompt():
    """A OneVision prompt of several images encodes each as its base crop + one newline (730
    tokens, 1 crop), as its processor does; LLaVA-NeXT patches every image."""
    ov = plan_report(PRESETS["llava-onevision-qwen2-7b"], "7:2,14:2,21:2", 10, images=2, image_size=(448, 448))
    assert ov["image"]["multi_image"] and ov["image"]["tokens"] == 730 and ov["image"]["crops"] == 1
    assert ov["image"]["grids"] == [[27, 27, 0]] and ov["image"]["text_tokens"] == 1
    # 27x27 -> 27x14 -> 14x14 -> 14x7, and the trailing newline stays with the text
    assert [s["vision_tokens_per_image"] for s in ov["stages"]] == [730, 379, 197, 99]
    assert [s["tokens"] for s in ov["stages"]] == [10 + 2 * t for t in (730, 379, 197, 99)]
    nxt = plan_report(PRESETS["llava-v1.6-mistral-7b"], "8:2", 10, images=2, image_size=(448, 448))
    assert not nxt["image"]["multi_image"] and nxt["image"]["tokens"] == 2928


def test_anyres_stage_counts_keep_newlines_with_their_rows():
    """An anyres image's tokens per stage: the base grid, plus the high-resolution grid's rows with
    one newline each (halving columns never removes a newline; halving rows drops it with its row)."""
    r = plan_report(PRESETS["llava-onevision-qwen2-7b"], "7:2,14:2,21:4", 0, image_size=(480, 640))
    rows = [(s["grids"], s["vision_tokens_per_image"]) for s in r["stages"]]
    assert rows == [
        ([[27, 27, 0], [40, 54, 1]], 729 + 40 * 55),
        ([[27, 14, 0], [40, 27, 1]], 378 + 40 * 28),   # columns halved: every newline stays
        ([[14, 14, 0], [20, 27, 1]], 196 + 20 * 28),   # rows halved: half the newlines go with them
        ([[7, 7, 0], [10, 14, 1]], 49 + 10 * 15),
    ]
    assert r["baseline_kv_bytes"] == 28 * layer_kv_bytes(PRESETS["llava-onevision-qwen2-7b"], 2929)


def test_image_sizes_and_their_errors():
    assert parse_image_size("640x480") == (480, 640) == DEFAULT_IMAGE_SIZE
    assert parse_image_size(" 448 X 448") == (448, 448)
    for bad in ("448", "axb", "0x10", "10x-3", "1x2x3"):
        with pytest.raises(AdscInputError, match="image size"):
            parse_image_size(bad)
    with pytest.raises(AdscInputError, match="aspect ratio"):
        image_tokens(PRESETS["qwen2.5-vl-7b"], (10, 5000))
    # Qwen's smallest image is 2x2 merged tokens, which the default schedule cannot take three times
    with pytest.raises(ScheduleError, match=r"qwen2.5-vl-7b, a 28x28 image"):
        plan_report(PRESETS["qwen2.5-vl-7b"], "7:2,14:2,21:2", 8, image_size=(28, 28))
    with pytest.raises(ModelSpecError, match="depend on its size"):
        PRESETS["qwen2.5-vl-7b"].tokens_per_image
    assert ARCHITECTURES["qwen2_5_vl"] == "Qwen2.5-VL"


def test_qwen_resize_equals_transformers():
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    import random

    rng = random.Random(0)
    sizes = [(rng.randint(10, 5000), rng.randint(10, 5000)) for _ in range(300)] + [(28, 28), (1, 100), (56, 3000)]
    for h, w in sizes:
        for factor, lo, hi in ((28, 3136, 12845056), (32, 65536, 16777216), (28, 3136, 200704)):
            try:
                want = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
            except ValueError:
                with pytest.raises(ValueError):
                    qwen_resize(h, w, factor, lo, hi)
                continue
            assert qwen_resize(h, w, factor, lo, hi) == tuple(want), (h, w, factor)


# ---- against FlopCounterMode, eager attention, on small models of each architecture -----------------
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=100)
MROPE = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}


def _small_model(arch):
    T = pytest.importorskip("transformers")
    from adsc_ext.testing.llava_next import tiny_llava_next_config, tiny_llava_onevision_config

    if arch == "llava_next":
        cfg = tiny_llava_next_config(num_layers=2)
    elif arch == "llava_onevision":
        cfg = tiny_llava_onevision_config(num_layers=2)
        cfg.vision_config.vision_use_head = True  # SigLIP's pooling head runs too (OneVision's is off)
    elif arch == "qwen2_vl":
        cfg = T.Qwen2VLConfig(text_config=dict(TEXT, rope_parameters=MROPE),
                              vision_config=dict(depth=2, embed_dim=32, mlp_ratio=2, num_heads=2, hidden_size=64))
    elif arch == "qwen2_5_vl":
        cfg = T.Qwen2_5_VLConfig(text_config=dict(TEXT, rope_parameters=MROPE), vision_config=dict(
            depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64, fullatt_block_indexes=[1],
            window_size=112))
    else:
        cfg = T.Qwen3VLConfig(text_config=dict(TEXT, head_dim=16, rope_parameters={**MROPE, "mrope_interleaved": True}),
                              vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2,
                                                 out_hidden_size=64, deepstack_visual_indexes=[0, 2],
                                                 num_position_embeddings=64))
    torch.manual_seed(0)
    model = T.AutoModelForImageTextToText.from_config(cfg, attn_implementation="eager").eval()
    return model, spec_from_config(json.loads(cfg.to_json_string()), arch)


def _count(fn) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def _count_layers(fn) -> int:
    """FLOPs inside the decoder layers only (the rotary table outside them is not a layer's cost;
    transformers 5.17 builds it with a matmul the counter sees, later releases do not)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
               if re.fullmatch(r".*\.layers\.\d+", name))


NEW_ARCHS = ["llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
SIZES_HW = [(448, 448), (300, 700), (30, 100), (97, 1000)]


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_flop_counter_on_each_architecture(arch):
    """Decoder layers, the vision tower + projector of images of several sizes (anyres crops,
    Qwen2.5-VL's windows, Qwen3-VL's DeepStack mergers), the LM head, and the weights a decode step
    reads, against the real modules."""
    model, spec = _small_model(arch)
    assert spec.arch == arch
    text = model.model.language_model
    ids = torch.randint(0, 50, (1, 13))
    assert _count_layers(lambda: text(input_ids=ids)) == spec.num_layers * layer_flops(spec, 13)
    assert _count(lambda: model.lm_head(torch.randn(3, spec.hidden_size))) == lm_head_flops(spec, 3)
    params = sum(p.numel() for p in text.layers.parameters()) + text.norm.weight.numel() + model.lm_head.weight.numel()
    assert decode_weight_bytes(spec, dtype_bytes=1) == params
    for size in SIZES_HW:
        image = image_tokens(spec, size)
        if spec.vision.qwen:
            ((gh, gw, _),) = image.grids
            m, v = spec.vision.merge_size, spec.vision
            pixels = torch.randn(gh * gw * m * m, 3 * v.temporal_patch_size * v.patch_size ** 2)
            got = _count(lambda: model.model.get_image_features(pixels, torch.tensor([[1, gh * m, gw * m]]),
                                                                return_dict=True))
        else:
            from adsc_ext.testing.llava_next import random_images, tiny_processor

            out = tiny_processor(model.config)(images=random_images([size]), text=["<image>"], return_tensors="pt")
            assert out["input_ids"].numel() == image.tokens
            kw = {"batch_num_images": out["batch_num_images"]} if arch == "llava_onevision" else {}
            got = _count(lambda: model.model.get_image_features(out["pixel_values"], out["image_sizes"],
                                                                return_dict=True, **kw))
        assert got == vision_flops(spec, image), size


def test_qwen_image_grids_are_the_processors():
    """image_tokens' Qwen grid is the processor's image_grid_thw after the merge."""
    pytest.importorskip("transformers")
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from adsc_ext.testing.llava_next import random_images

    for name, patch in (("qwen2.5-vl-7b", 14), ("qwen3-vl-8b", 16)):
        spec = PRESETS[name]
        proc = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=2, min_pixels=spec.vision.min_pixels,
                                        max_pixels=spec.vision.max_pixels)
        for size in [(60, 90), (448, 448), (333, 1000)]:
            out = proc(images=random_images([size]), return_tensors="pt")
            t, h, w = out["image_grid_thw"][0].tolist()
            assert image_tokens(spec, size).grids == ((h // 2, w // 2, 0),) and t == 1


@pytest.mark.parametrize("onevision", [False, True])
def test_plan_report_counts_what_the_model_spec_plans(onevision):
    """adsc plan's stage token counts equal the plan the model spec makes for a processed prompt
    (the same images through the real processor), one image and OneVision's multi-image prompt."""
    pytest.importorskip("transformers")
    from adsc_ext.models import model_spec
    from adsc_ext.testing.llava_next import random_images, tiny_llava_next, tiny_llava_onevision, tiny_processor

    model = tiny_llava_onevision() if onevision else tiny_llava_next()
    spec, acct = model_spec(model), spec_from_config(model.config.to_dict(), "tiny")
    proc = tiny_processor(model.config)
    schedule = "2:2,3:2,4:2"
    cases = [[(30, 100)], [(200, 200)], [(400, 500)], [(170, 13)], [(200, 200), (30, 100)]]
    for sizes in cases:
        out = proc(images=[random_images(sizes)], text=["w1 w2 " + "<image> " * len(sizes) + "w3"],
                   return_tensors="pt")
        extra = {k: out[k] for k in ("image_sizes", "batch_num_images") if k in out}
        plan = spec.plan(schedule, out["input_ids"], attention_mask=out["attention_mask"], **extra)
        if len(set(sizes)) > 1 and not onevision:
            continue  # a report is for images of one size; NeXT patches each image on its own
        r = plan_report(acct, schedule, 3, images=len(sizes), image_size=sizes[0])
        assert [s["tokens"] for s in r["stages"]] == [int(st.seq_lens[0]) for st in plan.stages], sizes


def test_adsc_plan_for_the_new_models(capsys, tmp_path):
    from adsc_ext import cli

    assert cli.main(["plan", "--model", "qwen2.5-vl-7b", "--image-size", "448x448", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["schedule"] == "7:2,14:2,21:2" and r["image"]["tokens"] == 256 and r["image"]["resized"] == [448, 448]
    assert [s["grid"] for s in r["stages"]] == [[16, 16], [16, 8], [8, 8], [8, 4]]
    assert cli.main(["plan", "--model", "llava-onevision-qwen2-7b"]) == 0
    out = capsys.readouterr().out
    assert "1 image of 640x480 px (27x27 + 40x54 with newlines = 2929 vision tokens, 5 crops)" in out
    assert "27x14 + 40x27n" in out and "newline token, kept with its row" in out
    assert cli.main(["plan", "--model", "llava-onevision-qwen2-7b", "--images", "2"]) == 0
    assert "base crop only (a multi-image prompt)" in capsys.readouterr().out
    # a config.json of any of them, with the schedule its checkpoint stores
    cfg = _release_configs()["qwen3-vl-8b"].to_dict()
    cfg["adsc_schedule"] = "9:4"
    _write_config(tmp_path, cfg)
    assert cli.main(["plan", "--model", str(tmp_path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["schedule"] == "9:4" and r["arch"] == "qwen3_vl" and r["image"]["tokens"] == 300
    assert cli.main(["plan", "--model", "qwen2.5-vl-7b", "--image-size", "448"]) == 2
    assert "--image-size" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "qwen2.5-vl-7b", "--image-size", "28x28"]) == 2
    assert "a 28x28 image" in capsys.readouterr().err
