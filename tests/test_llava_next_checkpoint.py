"""LLaVA-NeXT / OneVision checkpoints read before any weight (adsc_ext.models.checkpoint): their
SUPPORTED rows, the parameter count of their config against transformers' own models, the
default schedule checked from config.json, and the commands that do not load them refusing in one
line."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from adsc_ext import ScheduleError, cli  # noqa: E402
from adsc_ext.errors import AdscModelError  # noqa: E402
from adsc_ext.models import checkpoint  # noqa: E402
from adsc_ext.testing.llava_next import tiny_llava_next_config, tiny_llava_onevision_config  # noqa: E402


def _release(onevision: bool):
    """The 7B releases' shapes (research note section 5)."""
    if onevision:
        return transformers.LlavaOnevisionConfig(
            vision_config=transformers.SiglipVisionConfig(hidden_size=1152, intermediate_size=4304,
                                                          num_hidden_layers=26, num_attention_heads=16,
                                                          image_size=384, patch_size=14, vision_use_head=False),
            text_config=transformers.Qwen2Config(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152128))
    return transformers.LlavaNextConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                                    num_attention_heads=16, image_size=336, patch_size=14,
                                                    projection_dim=768),
        text_config=transformers.MistralConfig(vocab_size=32064, sliding_window=None),
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]])


def _configs():
    out = [("next-7b", _release(False)), ("onevision-7b", _release(True)),
           ("next-tiny-llama", tiny_llava_next_config(text="llama")), ("onevision-tiny", tiny_llava_onevision_config())]
    head = tiny_llava_onevision_config()
    head.vision_config.vision_use_head = True
    tied = tiny_llava_next_config()
    tied.tie_word_embeddings = True
    multi = tiny_llava_next_config()
    multi.vision_feature_layer = [-2, -1]
    biased = tiny_llava_next_config(text="llama")
    biased.text_config.attention_bias = biased.text_config.mlp_bias = True
    return out + [("siglip-head", head), ("tied", tied), ("two-feature-layers", multi), ("llama-biases", biased)]


@pytest.mark.parametrize("name, config", _configs(), ids=[n for n, _ in _configs()])
def test_parameter_count_from_the_config_equals_transformers(name, config):
    cls = getattr(transformers, checkpoint.SUPPORTED[config.model_type].class_name)
    with torch.device("meta"):
        model = cls(config)
    want = sum(p.numel() for p in model.parameters())
    assert checkpoint.SUPPORTED[config.model_type].parameters(json.loads(config.to_json_string())) == want
    if name == "onevision-7b":
        assert f"{want / 1e9:.2f}" == "8.03"  # llava-onevision-qwen2-7b-ov-hf: 8.03 B parameters
    if name == "next-7b":
        assert f"{want / 1e9:.2f}" == "7.57"  # llava-v1.6-mistral-7b-hf: 7.57 B parameters


def test_rows_and_the_commands_that_load_them():
    rows = checkpoint.SUPPORTED
    assert rows["llava_next"].class_name == "LlavaNextForConditionalGeneration"
    assert rows["llava_onevision"].class_name == "LlavaOnevisionForConditionalGeneration"
    assert rows["llava"].commands == checkpoint.COMMANDS
    config = json.loads(tiny_llava_onevision_config().to_json_string())
    assert checkpoint.architecture(config, "x") is rows["llava_onevision"]
    with pytest.raises(AdscModelError, match=r"adsc export loads llava \(LlavaForConditionalGeneration\), "
                                             r"qwen2_5_vl \(Qwen2_5_VLForConditionalGeneration\) checkpoints; "
                                             r"this is model_type 'llava_onevision'"):
        checkpoint.architecture(config, "x", command="export")


@pytest.mark.parametrize("argv", [["generate", "--max-new-tokens", "1"], ["export", "--out", "{tmp}/out"],
                                  ["bench", "--device", "cpu"]])
def test_commands_that_do_not_load_them_refuse_in_one_line(tmp_path, capsys, argv):
    folder = tmp_path / "ov"
    tiny_llava_onevision_config().save_pretrained(folder)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code = cli.main([*argv, "--model", str(folder)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert "model_type 'llava_onevision'" in err and "adsc plan" in err, err


def test_check_schedule_uses_the_architecture_default(tmp_path):
    folder = tmp_path / "ov"
    config = _release(True)
    config.save_pretrained(folder)
    info = checkpoint.inspect_checkpoint(folder, "bfloat16", 2)
    assert str(checkpoint.check_schedule(info)) == "7:2,14:2,21:2"  # 28 layers: spec section 2
    assert str(checkpoint.check_schedule(info, "3:4")) == "3:4"
    with pytest.raises(ScheduleError, match="28 decoder layers"):
        checkpoint.check_schedule(info, "28:2")
    with pytest.raises(ScheduleError, match="27x27"):  # the base grid every image has
        checkpoint.check_schedule(info, "1:4,2:4,3:4,4:4,5:4,6:4")
