"""``adsc generate --model``: checkpoints that must be refused before any weight is read (issue 18,
item 5), and what ``adsc generate --help`` shows (item 7).

A Llama (text-only) checkpoint once made transformers build a default-size LLaVA (~7B, fp32) and
ran a 24 GB machine out of memory; a checkpoint too large for the machine, and a broken tokenizer,
must each give one line and exit status 2. The weight loaders are replaced by functions that fail
the test, so a check that reads weights first cannot pass (and cannot hurt the machine either).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")

import transformers  # noqa: E402

from adsc_ext.cli import main  # noqa: E402
from adsc_ext.testing import tiny_llava  # noqa: E402

GiB = 2**30


def _checkpoint_module():
    from adsc_ext.models import checkpoint

    return checkpoint


def _one_line(capsys, *argv):
    capsys.readouterr()  # drop what saving the checkpoint printed
    code = main(["generate", *argv])
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("adsc generate: error: "), err
    return err


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Any attempt to load weights or a processor fails the test."""

    def boom(*args, **kwargs):
        raise AssertionError("a weight file or the processor was read before the checkpoint was checked")

    for cls in (transformers.PreTrainedModel, transformers.LlavaForConditionalGeneration,
                transformers.AutoProcessor, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(boom) if cls is not transformers.AutoProcessor
                            and cls is not transformers.AutoTokenizer else boom)
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", boom)


def _saved_checkpoint(path: Path) -> Path:
    """A saved tiny LLaVA with a word-level tokenizer and a LlavaProcessor (the vLLM tests' builder)."""
    sys.path.insert(0, str(Path(__file__).parent / "vllm_plugin"))
    try:
        from tiny_checkpoint import build_checkpoint
    finally:
        sys.path.pop(0)
    return build_checkpoint(path)


def _llama_checkpoint(path: Path, **dims) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, **dims)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _llava_config(path: Path, **text) -> Path:
    """A LLaVA-1.5 config.json with these text_config dims (LLaVA-1.5's vision tower), no weights."""
    from adsc_ext.testing import llava15_7b_config

    cfg = llava15_7b_config()
    for k, v in text.items():
        setattr(cfg.text_config, k, v)
    cfg.save_pretrained(path)
    return path


# ---- the architecture ------------------------------------------------------------------------------
def test_text_only_checkpoint_is_refused_before_any_weight_is_read(tmp_path, capsys, no_weight_loading):
    ckpt = _llama_checkpoint(tmp_path / "llama")
    t0 = time.perf_counter()
    err = _one_line(capsys, "--model", str(ckpt), "--max-new-tokens", "1")
    assert time.perf_counter() - t0 < 30
    assert "model_type 'llama'" in err and "LlamaForCausalLM" in err, err
    assert "'llava'" in err and "LlavaForConditionalGeneration" in err, err


def test_default_size_llama_config_is_refused_without_building_a_model(tmp_path, capsys, no_weight_loading,
                                                                       monkeypatch):
    """The issue's case: a config.json transformers would fill up into a 7B LLaVA."""
    from transformers import LlamaConfig

    LlamaConfig().save_pretrained(tmp_path / "llama7b")  # the 7B defaults, no weights
    built = []
    monkeypatch.setattr(transformers.PreTrainedModel, "__init__",
                        lambda self, *a, **k: built.append(type(self).__name__) or 1 / 0)
    err = _one_line(capsys, "--model", str(tmp_path / "llama7b"))
    assert "model_type 'llama'" in err and not built


def test_llava_model_type_with_another_class_is_refused(tmp_path, capsys, no_weight_loading):
    """A config that says llava but names a class transformers' LLaVA would not load its weights into
    (the original LLaVA repository's format): refused, not loaded with random weights."""
    ckpt = _llava_config(tmp_path / "orig", num_hidden_layers=2)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["LlavaLlamaForCausalLM"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    err = _one_line(capsys, "--model", str(ckpt))
    assert "LlavaLlamaForCausalLM" in err and "LlavaForConditionalGeneration" in err


@pytest.mark.parametrize("content, needle", [("{not json", "not valid JSON"), ("[1, 2]", "JSON object"),
                                              ('{"architectures": ["LlavaForConditionalGeneration"]}',
                                               "no model_type")])
def test_unreadable_config_is_one_line(tmp_path, capsys, no_weight_loading, content, needle):
    (tmp_path / "config.json").write_text(content)
    assert needle in _one_line(capsys, "--model", str(tmp_path))


def test_supported_table_is_the_one_place(tmp_path):
    """Every supported model_type names a transformers class that exists and whose config class has
    that model_type: the table cannot name a class transformers does not have."""
    checkpoint = _checkpoint_module()
    assert "llava" in checkpoint.SUPPORTED
    for model_type, arch in checkpoint.SUPPORTED.items():
        cls = getattr(transformers, arch.class_name)
        assert cls.config_class.model_type == model_type


# ---- the memory ------------------------------------------------------------------------------------
def test_config_claiming_70b_is_refused(tmp_path, capsys, no_weight_loading, monkeypatch):
    ckpt = _llava_config(tmp_path / "big", hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8)
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")  # tiny files
    monkeypatch.setattr("adsc_ext.models.checkpoint.available_memory", lambda device="cpu": (24 * GiB, "MemAvailable"))
    err = _one_line(capsys, "--model", str(ckpt), "--dtype", "bfloat16")
    assert "69.4 B parameters" in err and "bfloat16" in err and "24.0 GiB" in err, err
    assert "MemAvailable" in err


def test_fake_safetensors_header_is_refused(tmp_path, capsys, no_weight_loading, monkeypatch):
    """A small config whose weight file's header claims a 4 TiB tensor: the headers count too."""
    ckpt = tmp_path / "tiny"
    tiny_llava(grid_side=4, num_layers=2).config.save_pretrained(ckpt)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20, 1 << 20], "data_offsets": [0, 0]}}).encode()
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    monkeypatch.setattr("adsc_ext.models.checkpoint.available_memory", lambda device="cpu": (24 * GiB, "MemAvailable"))
    err = _one_line(capsys, "--model", str(ckpt), "--schedule", "1:2")
    assert "4096.0 GiB" in err and "safetensors" in err, err


@pytest.mark.parametrize("data, needle", [(b"\x01", "shorter than its 8-byte header length"),
                                          (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
                                          (struct.pack("<Q", 5) + b"nope!", "header is not JSON")])
def test_broken_safetensors_header_is_one_line(tmp_path, capsys, no_weight_loading, data, needle):
    ckpt = tmp_path / "tiny"
    tiny_llava(grid_side=4, num_layers=2).config.save_pretrained(ckpt)
    (ckpt / "model.safetensors").write_bytes(data)
    err = _one_line(capsys, "--model", str(ckpt))
    assert "model.safetensors" in err and needle in err, err


def test_sharded_index_with_a_missing_shard_is_one_line(tmp_path, capsys, no_weight_loading):
    ckpt = tmp_path / "tiny"
    tiny_llava(grid_side=4, num_layers=2).config.save_pretrained(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 10}, "weight_map": {"a": "model-00001-of-00002.safetensors"}}))
    err = _one_line(capsys, "--model", str(ckpt))
    assert "model-00001-of-00002.safetensors" in err and "missing" in err, err


def test_parameter_count_from_the_config_equals_transformers():
    """The count used for the memory check is what transformers builds (on the meta device)."""
    checkpoint = _checkpoint_module()
    import torch

    from adsc_ext.testing import llava15_7b_config, tiny_llava_config

    configs = [llava15_7b_config(), tiny_llava_config(grid_side=5, num_layers=3, num_heads=4, num_kv_heads=2)]
    tied = tiny_llava_config(grid_side=4)
    tied.tie_word_embeddings = True
    tied.text_config.tie_word_embeddings = True
    configs.append(tied)
    multi = tiny_llava_config(grid_side=4)
    multi.vision_feature_layer = [-2, -1]
    configs.append(multi)
    for cfg in configs:
        with torch.device("meta"):
            model = transformers.LlavaForConditionalGeneration(cfg)
        want = sum(p.numel() for p in model.parameters())
        got = checkpoint.SUPPORTED["llava"].parameters(json.loads(cfg.to_json_string()))
        assert got == want, (cfg.text_config.hidden_size, got, want)


def test_memory_check_states_its_margin(monkeypatch):
    checkpoint = _checkpoint_module()
    monkeypatch.setattr("adsc_ext.models.checkpoint.available_memory", lambda device="cpu": (10 * GiB, "MemAvailable"))
    checkpoint.check_fits(8 * GiB, "weights", "cpu")  # 8 + max(1, 0.8) = 9 GiB <= 10
    with pytest.raises(checkpoint.CheckpointError, match=r"9.1 GiB; with a margin of 1.0 GiB.*needs 10.1 GiB.*10.0 GiB available"):
        checkpoint.check_fits(int(9.1 * GiB), "weights", "cpu")
    monkeypatch.setattr("adsc_ext.models.checkpoint.available_memory", lambda device="cpu": None)
    checkpoint.check_fits(1 << 50, "weights", "cpu")  # nothing known: not refused


def test_available_memory_reads_the_machine():
    checkpoint = _checkpoint_module()
    got = checkpoint.available_memory("cpu")
    if Path("/proc/meminfo").is_file():
        assert got is not None and got[0] > 0 and "MemAvailable" in got[1]


def test_a_supported_checkpoint_that_fits_still_runs(tmp_path, capsys):
    """The checks do not refuse what works: a saved tiny LLaVA with the tiny test tokenizer."""
    ckpt = _saved_checkpoint(tmp_path / "ok")
    # the test tokenizer is word-level: give it the words of generate's chat template
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["USER:"], vocab["ASSISTANT:"] = vocab.pop("w0"), vocab.pop("w1")
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    capsys.readouterr()
    code = main(["generate", "--model", str(ckpt), "--max-new-tokens", "2", "--schedule", "2:2",
                 "--prompt", "w2 w3"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "answer:" in out and "total KV bytes" in out


# ---- the tokenizer ---------------------------------------------------------------------------------
def _with_tokenizer(tmp_path, tokenizer_json: str) -> Path:
    ckpt = _saved_checkpoint(tmp_path / "tok")
    (ckpt / "tokenizer.json").write_text(tokenizer_json)
    return ckpt


@pytest.mark.parametrize("tokenizer_json", ['{"version": "1.0", "model": {"type": "Nope"}}', "{truncated"])
def test_broken_tokenizer_is_one_line(tmp_path, capsys, tokenizer_json):
    ckpt = _with_tokenizer(tmp_path, tokenizer_json)
    capsys.readouterr()
    err = _one_line(capsys, "--model", str(ckpt), "--max-new-tokens", "1", "--schedule", "2:2")
    assert "cannot load its tokenizer / processor" in err, err
    assert str(ckpt) in err


def test_tokenizer_that_fails_on_the_prompt_is_one_line(tmp_path, capsys, monkeypatch):
    """A tokenizer that loads but raises on the prompt, as the tokenizers library does (a bare
    ``Exception``; seen with a word-level tokenizer whose unknown token went missing)."""
    ckpt = _saved_checkpoint(tmp_path / "words")

    def fails(self, *args, **kwargs):
        raise Exception("WordLevel error: Missing [UNK] token from the vocabulary")

    monkeypatch.setattr(transformers.LlavaProcessor, "__call__", fails)
    err = _one_line(capsys, "--model", str(ckpt), "--max-new-tokens", "1", "--schedule", "2:2")
    assert "failed on the prompt" in err and "tokenizer" in err, err


def test_refusal_through_the_console_entry_point_is_fast(tmp_path):
    """In a fresh interpreter (the real loaders, nothing replaced): a text-only checkpoint whose
    LLaVA defaults would be 7B is refused in seconds, not after building a model."""
    from transformers import LlamaConfig

    LlamaConfig().save_pretrained(tmp_path / "llama7b")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "adsc_ext.cli", "generate", "--model", str(tmp_path / "llama7b")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.count("\n") == 1 and "model_type 'llama'" in done.stderr
    assert time.perf_counter() - t0 < 60


# ---- --help ------------------------------------------------------------------------------------------
def test_generate_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for needle in ("default: sdpa", "default: 'What is in this image?'", "default: 0", "default: 32",
                   "default: auto"):
        assert needle in out, needle


def test_schedule_that_does_not_fit_the_checkpoint_is_refused_before_loading(tmp_path, capsys, no_weight_loading):
    ckpt = tmp_path / "tiny"
    tiny_llava(grid_side=2, num_layers=3).save_pretrained(ckpt)
    err = _one_line(capsys, "--model", str(ckpt))  # the LLaVA-1.5 default 8:2,16:2,24:2 on 3 layers
    assert "does not fit a model with 3 decoder layers" in err
    assert "cannot be downsampled" in _one_line(capsys, "--model", str(ckpt), "--schedule", "1:4,2:2")  # 2x2 -> 1x1 -> ?
