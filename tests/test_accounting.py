"""Tests of adsc_ext.accounting: the spec section 7 table, model descriptions, and the FLOPs
formula against ``torch.utils.flop_counter.FlopCounterMode`` on real forwards of a small LLaMA."""

from __future__ import annotations

import dataclasses
import json
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
    assert counter.get_total_flops() == spec.num_layers * layer_flops(spec, n)


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
    assert counter.get_total_flops() == report["adsc_flops"]
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
    from adsc_ext.hf.tiny import tiny_llava

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
