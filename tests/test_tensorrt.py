"""Tests of the TensorRT end that run without TensorRT: the plugin node contract (against the C++
plugin's constants), profile computation from a manifest, argument and folder checks, the build
report, plugin discovery, and `adsc trt-build`'s one-line error where tensorrt is missing. The
engine build and run are in test_tensorrt_gpu.py (tensorrt + a GPU)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from adsc_ext.cli import main
from adsc_ext.export import _plugin
from adsc_ext.export import tensorrt as trt_export
from adsc_ext.export.tensorrt import (
    BuildLimits,
    TensorRTBuildError,
    TensorRTUnavailable,
    build_engines,
    dim_kind,
    dim_ranges,
    find_plugin_library,
    graph_uses_plugin,
    read_manifest,
    profile_shapes,
    stage_tokens_per_image,
    write_build_report,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
HAVE_TENSORRT = importlib.util.find_spec("tensorrt") is not None
no_tensorrt = pytest.mark.skipif(HAVE_TENSORRT, reason="tensorrt is installed here")


# ---- the plugin node contract --------------------------------------------------------------------

def _cxx_constant(name: str) -> str:
    header = (REPO_ROOT / "csrc/tensorrt/compact_tokens_rules.h").read_text()
    m = re.search(rf'{name} = "([^"]*)";', header)
    assert m, name
    return m.group(1)


def test_plugin_contract_matches_the_cxx_plugin():
    assert _plugin.OP_TYPE == _plugin.PLUGIN_NAME == _cxx_constant("kPluginName") == "AdscCompactTokens"
    assert _plugin.PLUGIN_VERSION == _cxx_constant("kPluginVersion") == "1"
    assert _plugin.PLUGIN_NAMESPACE == _cxx_constant("kPluginNamespace") == "adsc"
    # The keys TensorRT's ONNX parser reads in its plugin fallback (FallbackPluginImporter), and
    # nothing else: the plugin has no fields.
    assert _plugin.compact_node_attributes() == {"plugin_version": "1", "plugin_namespace": "adsc"}
    assert _plugin.compact_opset_import() == ("adsc", 1)


def test_plugin_module_imports_nothing():
    source = (REPO_ROOT / "adsc_ext/export/_plugin.py").read_text()
    assert not re.search(r"^\s*(import|from)\s", source, re.M)


def _plugin_model(path: Path, dtype=None):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    dtype = TensorProto.FLOAT16 if dtype is None else dtype
    node = helper.make_node(_plugin.OP_TYPE, ["x", "index"], ["y"], name="compact_1",
                            domain=_plugin.DOMAIN, **_plugin.compact_node_attributes())
    graph = helper.make_graph(
        [node], "compact",
        [helper.make_tensor_value_info("x", dtype, ["T", 64]),
         helper.make_tensor_value_info("index", TensorProto.INT32, ["T_s"])],
        [helper.make_tensor_value_info("y", dtype, ["T_s", 64])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(*_plugin.compact_opset_import())])
    onnx.save(model, str(path))
    return model


def test_a_plugin_node_passes_the_onnx_checker(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = _plugin_model(tmp_path / "compact.onnx")
    onnx.checker.check_model(model, full_check=True)
    (node,) = model.graph.node
    attrs = {a.name: a.s.decode() for a in node.attribute}
    assert attrs == {"plugin_version": "1", "plugin_namespace": "adsc"}


def test_graph_uses_plugin(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    import onnx

    _plugin_model(tmp_path / "plugin.onnx")
    plain = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    assert graph_uses_plugin(tmp_path / "plugin.onnx")
    assert not graph_uses_plugin(tmp_path / "plain.onnx")
    (tmp_path / "broken.onnx").write_bytes(b"not a graph")
    with pytest.raises(TensorRTBuildError, match="broken.onnx is not a readable ONNX model"):
        graph_uses_plugin(tmp_path / "broken.onnx")
    # Without onnx: a scan of the bytes gives the same answers.
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert graph_uses_plugin(tmp_path / "plugin.onnx")
    assert not graph_uses_plugin(tmp_path / "plain.onnx")


# ---- a manifest like the one `adsc export` writes ----------------------------------------------------

def make_manifest(schedule="8:2,16:2,24:2", grid=(24, 24), num_layers=32, with_table=False):
    stages = len(schedule.split(",")) + 1 if schedule else 1
    index = [{"name": f"index.{s}", "dims": ["batch", f"seq.{s}"], "dtype": "int32"}
             for s in range(1, stages)]
    past_mask = [{"name": f"past_mask.{s}", "dims": ["batch", f"past_seq.{s}"], "dtype": "int64"}
                 for s in range(stages)]
    past = [{"name": f"past_key_values.0.{kv}", "dims": ["batch", 8, "past_seq.0", 64],
             "dtype": "float16"} for kv in ("key", "value")]
    manifest = {
        "schedule": schedule,
        "grid": list(grid),
        "model": {"num_layers": num_layers, "hidden_size": 512},
        "graphs": {
            "vision": {"file": "vision.onnx",
                       "inputs": [{"name": "pixel_values", "dims": ["num_images", 3, 336, 336],
                                   "dtype": "float16"}], "outputs": []},
            "prefill": {"file": "prefill.onnx",
                        "inputs": [{"name": "inputs_embeds", "dims": ["batch", "seq.0", 512],
                                    "dtype": "float16"},
                                   {"name": "attention_mask", "dims": ["batch", "seq.0"], "dtype": "int64"},
                                   *index], "outputs": []},
            "decode": {"file": "decode.onnx",
                       "inputs": [{"name": "inputs_embeds", "dims": ["batch", 1, 512], "dtype": "float16"},
                                  *past_mask, *past], "outputs": []},
        },
    }
    if with_table:
        table = {"batch": {"kind": "batch"}, "num_images": {"kind": "images"},
                 "seq.0": {"kind": "prompt"}}
        table.update({f"seq.{s}": {"kind": "stage", "stage": s} for s in range(1, stages)})
        table.update({f"past_seq.{s}": {"kind": "past", "stage": s} for s in range(stages)})
        manifest["dims"] = table
    return manifest


def _identity_model_bytes() -> bytes:
    try:
        from onnx import TensorProto, helper
    except ImportError:
        return b"\x08\x08"  # without onnx, graph_uses_plugin scans bytes: any content will do
    model = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "plain",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]))
    return model.SerializeToString()


def write_folder(tmp_path, manifest=None, files=("vision.onnx", "prefill.onnx", "decode.onnx")):
    folder = tmp_path / "export"
    folder.mkdir(parents=True)
    (folder / "adsc_manifest.json").write_text(json.dumps(manifest or make_manifest()))
    for f in files:
        (folder / f).write_bytes(_identity_model_bytes())
    return folder


def export_manifest(max_stage_tokens=(16, 8, 4)):
    """The shape of what `adsc export` writes (adsc_ext.export.manifest): inputs with 'shape',
    per-stage dim names in 'stages', op_types per graph (here a plugin export, schedule 2:2,4:2)."""
    n = len(max_stage_tokens)
    stages = [{"stage": s, "tokens_per_image": t, "prefill_dim": f"seq_stage{s}",
               "decode_dim": f"past_seq_stage{s}"} for s, t in enumerate(max_stage_tokens)]
    kv = [{"name": f"past_key_values.{l}.{w}", "shape": ["batch", 2, f"past_seq_stage{l // 2}", 16],
           "dtype": "float32"} for l in range(2 * n) for w in ("key", "value")]
    return {
        "format": "adsc-llava-onnx", "schedule": "2:2,4:2", "grid": [4, 4], "stages": stages,
        "model": {"num_layers": 6},
        "graphs": {
            "vision": {"file": "vision.onnx", "op_types": ["Conv"],
                       "inputs": [{"name": "pixel_values", "shape": ["num_images", 3, 16, 16]}]},
            "embed": {"file": "embed.onnx", "op_types": ["Gather"],
                      "inputs": [{"name": "input_ids", "shape": ["batch", "seq"]}]},
            "prefill": {"file": "prefill.onnx", "op_types": ["AdscCompactTokens", "Attention"],
                        "inputs": [{"name": "inputs_embeds", "shape": ["batch", "seq_stage0", 64]},
                                   {"name": "attention_mask", "shape": ["batch", "seq_stage0"]},
                                   {"name": "position_ids", "shape": ["batch", "seq_stage0"]},
                                   *({"name": f"adsc_index.{s}", "shape": ["batch", f"seq_stage{s}"]}
                                     for s in range(1, n))]},
            "decode": {"file": "decode.onnx", "op_types": ["Attention"],
                       "inputs": [{"name": "inputs_embeds", "shape": ["batch", 1, 64]},
                                  {"name": "position_ids", "shape": ["batch", 1]},
                                  *({"name": f"past_mask.{s}", "shape": ["batch", f"past_seq_stage{s}"]}
                                    for s in range(n)), *kv]},
        },
    }


def test_profiles_of_an_export_manifest():
    m = export_manifest()
    r = dim_ranges(m, BuildLimits(max_batch=4, max_prompt=200, max_new_tokens=32))
    assert r == {"num_images": (1, 4, 48), "batch": (1, 4, 4), "seq": (1, 80, 200),
                 "seq_stage0": (1, 80, 200), "seq_stage1": (1, 72, 200), "seq_stage2": (1, 68, 200),
                 "past_seq_stage0": (1, 96, 231), "past_seq_stage1": (1, 88, 231),
                 "past_seq_stage2": (1, 84, 231)}
    shapes = profile_shapes(trt_export.graph_specs(m)["decode"]["inputs"], r)
    assert shapes["past_key_values.5.value"] == ((1, 2, 1, 16), (4, 2, 84, 16), (4, 2, 231, 16))
    assert shapes["past_mask.1"] == ((1, 1), (4, 88), (4, 231))
    # The stages table wins over names: a stage dim named like a batch is still a stage.
    m["stages"][1]["prefill_dim"] = "batch_like"
    assert dim_kind("batch_like", m) == ("stage", 1)
    assert dim_kind("past_seq_stage2", m) == ("past", 2)


def test_plugin_use_is_read_from_the_manifest_op_types(tmp_path, monkeypatch):
    folder = write_folder(tmp_path, export_manifest(),
                          files=("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx"))
    monkeypatch.delenv("ADSC_TENSORRT_PLUGIN", raising=False)
    monkeypatch.setattr(trt_export, "_default_plugin_candidates", lambda: [])
    # prefill's op_types name the plugin (its file here is a plain graph: the manifest decides).
    with pytest.raises(TensorRTBuildError, match="use the AdscCompactTokens plugin"):
        build_engines(folder, graphs=["prefill"])
    if not HAVE_TENSORRT:
        with pytest.raises(TensorRTUnavailable):
            build_engines(folder, graphs=["embed", "decode"])


def test_a_local_reference_function_is_refused(tmp_path):
    pytest.importorskip("onnx")
    import onnx
    from onnx import helper

    model = _plugin_model(tmp_path / "p.onnx")
    ref = helper.make_function(_plugin.DOMAIN, _plugin.OP_TYPE, ["x", "index"], ["y"],
                               [helper.make_node("Identity", ["x"], ["y"])],
                               [helper.make_opsetid("", 17)])
    model.functions.append(ref)
    onnx.save(model, str(tmp_path / "p.onnx"))
    with pytest.raises(TensorRTBuildError, match="local ONNX function"):
        graph_uses_plugin(tmp_path / "p.onnx")


def test_stage_tokens_per_image():
    assert stage_tokens_per_image(make_manifest()) == [576, 288, 144, 72]
    assert stage_tokens_per_image(make_manifest("2:4", (5, 7), 4)) == [35, 12]
    assert stage_tokens_per_image(make_manifest("", (24, 24))) == [576]
    with pytest.raises(ValueError):
        stage_tokens_per_image(make_manifest("40:2"))  # past the model's 32 layers


@pytest.mark.parametrize("with_table", [False, True])
def test_dim_ranges_default_schedule(with_table):
    manifest = make_manifest(with_table=with_table)
    limits = BuildLimits(max_batch=8, max_prompt=1200, max_new_tokens=256)
    r = dim_ranges(manifest, limits)
    assert r["batch"] == (1, 8, 8)
    # 2 images fit a 1200-token prompt: up to 16 in a batch of 8; opt one per row.
    assert r["num_images"] == (1, 8, 16)
    # Prompt and every prefill stage: up to max_prompt (a text-only row is not compacted); the
    # opt is 64 text tokens + one image at that stage's tokens per image.
    assert r["seq.0"] == (1, 64 + 576, 1200)
    assert r["seq.1"] == (1, 64 + 288, 1200)
    assert r["seq.2"] == (1, 64 + 144, 1200)
    assert r["seq.3"] == (1, 64 + 72, 1200)
    # Decode caches: up to the prompt plus all but the last new token; each stage its own opt.
    for s, per_image in enumerate((576, 288, 144, 72)):
        assert r[f"past_seq.{s}"] == (1, 64 + per_image + 128, 1200 + 255)
    assert len({r[f"past_seq.{s}"][1] for s in range(4)}) == 4  # one profile dim per stage


def test_dim_ranges_limits_and_opt_values():
    manifest = make_manifest()
    r = dim_ranges(manifest, BuildLimits(max_batch=32, opt_batch=4, max_new_tokens=16,
                                         max_images=40, opt_text_tokens=10))
    assert r["batch"] == (1, 4, 32)
    assert r["num_images"] == (1, 4, 40)
    assert r["seq.0"] == (1, 586, 576 + 512)     # default max prompt: one image + 512 text
    assert r["past_seq.3"] == (1, 10 + 72 + 8, 576 + 512 + 15)
    # A max prompt shorter than one image: the opt values are text-only, and clamped.
    r = dim_ranges(manifest, BuildLimits(max_prompt=100, max_new_tokens=1))
    assert r["seq.0"] == (1, 64, 100) and r["seq.3"] == (1, 64, 100)
    assert r["past_seq.0"] == (1, 64, 100)
    assert r["num_images"] == (1, 1, 1)  # no image fits: one, for a valid profile


@pytest.mark.parametrize("kwargs, needle", [
    ({"max_batch": 0}, "max_batch must be >= 1"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ({"max_prompt": 0}, "max_prompt must be >= 1"),
    ({"opt_batch": 9, "max_batch": 8}, "opt_batch 9 is larger than max_batch 8"),
    ({"opt_text_tokens": -1}, "must be >= 0"),
])
def test_bad_limits(kwargs, needle):
    with pytest.raises(TensorRTBuildError, match=needle):
        dim_ranges(make_manifest(), BuildLimits(**kwargs))


def test_dim_kind():
    assert dim_kind("batch") == ("batch", 0)
    assert dim_kind("batch_size") == ("batch", 0)
    assert dim_kind("num_images") == ("images", 0)
    assert dim_kind("seq") == ("prompt", 0)
    assert dim_kind("prompt_len") == ("prompt", 0)
    assert dim_kind("seq_0") == ("prompt", 0)
    assert dim_kind("seq_2") == ("stage", 2)
    assert dim_kind("past_seq.1") == ("past", 1)
    assert dim_kind("kv_len_stage3") == ("past", 3)
    assert dim_kind("past_sequence_length") == ("past", 0)
    table = {"dims": {"n": {"kind": "past", "stage": 2}, "m": "batch", "x": {"kind": "stage", "stage": 0}}}
    assert dim_kind("n", table) == ("past", 2)
    assert dim_kind("m", table) == ("batch", 0)
    assert dim_kind("x", table) == ("prompt", 0)
    with pytest.raises(TensorRTBuildError, match="does not say what dynamic dim 'height' is"):
        dim_kind("height")
    with pytest.raises(TensorRTBuildError, match="unknown kind 'rows'"):
        dim_kind("n", {"dims": {"n": {"kind": "rows"}}})


def test_dim_ranges_rejects_unknown_and_out_of_range_dims():
    m = make_manifest()
    m["graphs"]["vision"]["inputs"][0]["dims"] = ["num_images", 3, "height", "width"]
    with pytest.raises(TensorRTBuildError, match="'height'"):
        dim_ranges(m, BuildLimits())
    m = make_manifest()
    m["graphs"]["prefill"]["inputs"].append({"name": "index.9", "dims": ["batch", "seq.9"]})
    with pytest.raises(TensorRTBuildError, match="names stage 9, but the schedule has 4 stages"):
        dim_ranges(m, BuildLimits())


def test_profile_shapes():
    m = make_manifest()
    r = dim_ranges(m, BuildLimits(max_batch=4, max_prompt=700, max_new_tokens=10))
    shapes = profile_shapes(m["graphs"]["decode"]["inputs"], r)
    assert shapes["inputs_embeds"] == ((1, 1, 512), (4, 1, 512), (4, 1, 512))
    lo, opt, hi = shapes["past_key_values.0.key"]
    assert lo == (1, 8, 1, 64) and hi == (4, 8, 709, 64) and opt == (4, 8, 64 + 576 + 5, 64)
    assert shapes["past_mask.2"][2] == (4, 709)
    static = profile_shapes([{"name": "a", "dims": [2, 3]}], r)
    assert static == {}  # static inputs need no profile entry
    with pytest.raises(TensorRTBuildError, match="no range for dim 'foo'"):
        profile_shapes([{"name": "a", "dims": ["foo"]}], r)


# ---- folders, manifests, reports -------------------------------------------------------------------

def test_read_manifest_errors(tmp_path):
    with pytest.raises(TensorRTBuildError, match="is not a folder"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(TensorRTBuildError, match="has no adsc_manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "adsc_manifest.json").write_text("{not json")
    with pytest.raises(TensorRTBuildError, match="not readable JSON"):
        read_manifest(tmp_path)
    (tmp_path / "adsc_manifest.json").write_text(json.dumps({"schedule": ""}))
    with pytest.raises(TensorRTBuildError, match="no 'graphs' entry"):
        read_manifest(tmp_path)
    (tmp_path / "adsc_manifest.json").write_text(json.dumps({"graphs": {"vision": {}}}))
    with pytest.raises(TensorRTBuildError, match="'vision' has no 'inputs' list"):
        read_manifest(tmp_path)
    # The list form of 'graphs' is read too.
    m = make_manifest()
    m["graphs"] = [dict(v, name=k) for k, v in m["graphs"].items()]
    (tmp_path / "adsc_manifest.json").write_text(json.dumps(m))
    assert set(trt_export.graph_specs(read_manifest(tmp_path))) == {"vision", "prefill", "decode"}


def test_build_engines_checks_before_tensorrt(tmp_path):
    folder = write_folder(tmp_path)
    with pytest.raises(TensorRTBuildError, match="no graph 'lm'"):
        build_engines(folder, graphs=["lm"])
    (folder / "decode.onnx").unlink()
    with pytest.raises(TensorRTBuildError, match="decode.onnx is missing"):
        build_engines(folder)
    with pytest.raises(TensorRTBuildError, match="max_batch must be >= 1"):
        build_engines(folder, BuildLimits(max_batch=0), graphs=["vision"])
    (folder / "vision.engine").write_bytes(b"old")
    with pytest.raises(TensorRTBuildError, match="vision.engine exists; pass force=True"):
        build_engines(folder, graphs=["vision"])


@no_tensorrt
def test_build_engines_without_tensorrt(tmp_path):
    folder = write_folder(tmp_path)
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt"):
        build_engines(folder, graphs=["vision"])
    assert not list(folder.glob("*.engine")) and not (folder / "trt_build_report.json").exists()


def test_write_build_report(tmp_path):
    report = {"tensorrt_version": "11.1.0", "engines": {"vision": {"bytes": 3}}}
    path = write_build_report(tmp_path, report)
    assert path.name == "trt_build_report.json"
    assert json.loads(path.read_text()) == report
    assert not list(tmp_path.glob("*.tmp"))


def test_find_plugin_library(tmp_path, monkeypatch):
    lib = tmp_path / "libadsc_tensorrt.so"
    with pytest.raises(TensorRTBuildError, match="does not exist"):
        find_plugin_library(lib)
    lib.write_bytes(b"")
    assert find_plugin_library(lib) == lib.resolve()
    monkeypatch.setenv("ADSC_TENSORRT_PLUGIN", str(lib))
    assert find_plugin_library() == lib.resolve()
    monkeypatch.setenv("ADSC_TENSORRT_PLUGIN", str(tmp_path / "nope.so"))
    with pytest.raises(TensorRTBuildError, match="ADSC_TENSORRT_PLUGIN=.*does not exist"):
        find_plugin_library()
    monkeypatch.delenv("ADSC_TENSORRT_PLUGIN")
    monkeypatch.setattr(trt_export, "_default_plugin_candidates", lambda: [tmp_path / "a.so"])
    with pytest.raises(TensorRTBuildError, match="-DADSC_WITH_TENSORRT=ON"):
        find_plugin_library()


def test_a_plugin_export_without_the_library_fails_before_tensorrt(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    folder = write_folder(tmp_path, files=("prefill.onnx", "decode.onnx"))
    _plugin_model(folder / "vision.onnx")
    monkeypatch.delenv("ADSC_TENSORRT_PLUGIN", raising=False)
    monkeypatch.setattr(trt_export, "_default_plugin_candidates", lambda: [])
    with pytest.raises(TensorRTBuildError, match="use the AdscCompactTokens plugin"):
        build_engines(folder, graphs=["vision"])


# ---- the command -----------------------------------------------------------------------------------

@no_tensorrt
def test_trt_build_without_tensorrt_is_one_line(capsys, tmp_path):
    folder = write_folder(tmp_path)
    code = main(["trt-build", str(folder)])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.startswith("adsc: error: adsc trt-build: ") and err.count("\n") == 1, err
    assert "pip install tensorrt" in err and "Traceback" not in err
    assert not list(folder.glob("*.engine"))


@no_tensorrt
def test_trt_build_without_tensorrt_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "adsc_ext", "trt-build", str(write_folder(tmp_path))],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "TensorRT's Python package is not installed" in proc.stderr


def test_a_broken_tensorrt_install_is_one_line_too(capsys, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "tensorrt":
            raise OSError("libnvinfer.so.10: cannot open shared object file\nNo such file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    code = main(["trt-build", str(write_folder(tmp_path))])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 1 and "libnvinfer.so.10" in err and "Traceback" not in err


def test_trt_build_usage_errors_are_one_line(capsys):
    code = main(["trt-build", "--max-batch", "many", "x"])
    out, err = capsys.readouterr()
    assert code == 2 and err.startswith("adsc: error: ") and err.count("\n") == 1


# ---- build_engines' TensorRT calls, against a recording stand-in of the tensorrt module -------------

class _FakeTensorRT:
    """The slice of the TensorRT Python API build_engines uses (10.x / 11.x names), recording calls.
    The parser 'parses' a graph into the inputs the test gives for its file."""

    __version__ = "11.1.0"

    def __init__(self, network_inputs, fail_parse=()):
        import types

        self.calls = []
        self.network_inputs = network_inputs   # file name -> [(name, shape with -1)]
        self.fail_parse = set(fail_parse)
        fake = self

        class Logger:
            WARNING = 2

            def __init__(self, level):
                fake.calls.append(("Logger", level))

        class Registry:
            def __init__(self):
                self.loaded = []

            def get_creator(self, name, version, namespace):
                fake.calls.append(("get_creator", name, version, namespace))
                return object() if self.loaded else None

            def load_library(self, path):
                fake.calls.append(("load_library", path))
                self.loaded.append(path)
                return object()

        self.registry = Registry()

        class Tensor:
            def __init__(self, name, shape):
                self.name, self.shape = name, shape

        class Network:
            def __init__(self, flags):
                self.flags, self.inputs = flags, []

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class Parser:
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                name = Path(path).name
                fake.calls.append(("parse", name))
                if name in fake.fail_parse:
                    self.num_errors = 1
                    return False
                self.network.inputs = [Tensor(n, s) for n, s in fake.network_inputs[name]]
                return True

            def get_error(self, i):
                return types.SimpleNamespace(desc=lambda: "unsupported op Foo", node=lambda: 7)

        class Profile:
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (tuple(lo), tuple(opt), tuple(hi))

        class Config:
            def __init__(self):
                self.profiles, self.cleared, self.pools = [], [], {}

            def set_memory_pool_limit(self, pool, size):
                self.pools[pool] = size

            def clear_flag(self, flag):
                self.cleared.append(flag)

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.last_network = Network(flags)
                return fake.last_network

            def create_builder_config(self):
                fake.last_config = Config()
                return fake.last_config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                fake.calls.append(("build", [i.name for i in network.inputs]))
                fake.configs.append(config)
                return b"engine:" + ",".join(i.name for i in network.inputs).encode()

        self.configs = []
        self.Logger, self.Builder, self.OnnxParser = Logger, Builder, Parser
        self.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=2)
        self.MemoryPoolType = types.SimpleNamespace(WORKSPACE="workspace")
        self.BuilderFlag = types.SimpleNamespace(TF32="tf32")

    def get_plugin_registry(self):
        return self.registry


def _network_inputs(manifest):
    return {spec["file"]: [(t["name"], [d if isinstance(d, int) else -1 for d in t["shape"]])
                           for t in spec["inputs"]]
            for spec in manifest["graphs"].values()}


def _fake_build(tmp_path, monkeypatch, **kwargs):
    manifest = export_manifest()
    folder = write_folder(tmp_path, manifest, files=("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx"))
    lib = tmp_path / "libadsc_tensorrt.so"
    lib.write_bytes(b"")
    fake = _FakeTensorRT(_network_inputs(manifest), kwargs.pop("fail_parse", ()))
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: fake)
    lines = []
    report = build_engines(folder, BuildLimits(max_batch=4, max_prompt=200, max_new_tokens=32),
                           plugin_library=lib, log=lines.append, **kwargs)
    return folder, fake, report, lines, lib


def test_build_engines_drives_tensorrt(tmp_path, monkeypatch):
    folder, fake, report, lines, lib = _fake_build(tmp_path, monkeypatch, workspace_bytes=2**30)
    # Strongly typed networks, TF32 off, the workspace limit, one profile per engine.
    assert fake.last_network.flags == 1 << 2
    assert all(c.cleared == ["tf32"] and c.pools == {"workspace": 2**30} and len(c.profiles) == 1
               for c in fake.configs)
    # The plugin is loaded once, before the first parse, and checked through the registry.
    kinds = [c[0] for c in fake.calls]
    assert kinds.count("load_library") == 1 and kinds.index("load_library") < kinds.index("parse")
    assert ("get_creator", "AdscCompactTokens", "1", "adsc") in fake.calls
    # Every dynamic input got the manifest's ranges; static inputs none.
    decode = fake.configs[3].profiles[0].shapes
    assert decode["past_key_values.5.value"] == ((1, 2, 1, 16), (4, 2, 84, 16), (4, 2, 231, 16))
    assert decode["inputs_embeds"] == ((1, 1, 64), (4, 1, 64), (4, 1, 64))
    assert fake.configs[0].profiles[0].shapes == {"pixel_values": ((1, 3, 16, 16), (4, 3, 16, 16),
                                                                   (48, 3, 16, 16))}
    # Engines beside the ONNX files, the report beside them.
    for name in ("vision", "embed", "prefill", "decode"):
        e = report["engines"][name]
        assert (folder / f"{name}.engine").read_bytes().startswith(b"engine:")
        assert e["bytes"] == (folder / f"{name}.engine").stat().st_size
        assert e["uses_plugin"] == (name == "prefill")
    assert report["plugin_library"] == str(lib.resolve()) and report["tensorrt_version"] == "11.1.0"
    assert json.loads((folder / "trt_build_report.json").read_text())["engines"]["decode"]["profile"][
        "past_mask.2"] == {"min": [1, 1], "opt": [4, 84], "max": [4, 231]}
    assert len(lines) == 8 and not list(folder.glob("*.tmp"))


def test_build_engines_reports_parser_and_shape_mismatches(tmp_path, monkeypatch):
    with pytest.raises(TensorRTBuildError, match=r"prefill.onnx: TensorRT's ONNX parser failed: "
                                                 r"unsupported op Foo \(node 7\)"):
        _fake_build(tmp_path / "a", monkeypatch, fail_parse={"prefill.onnx"}, graphs=["prefill"])
    manifest = export_manifest()
    inputs = _network_inputs(manifest)
    inputs["embed.onnx"] = [("input_ids", [-1, -1, -1])]    # the graph and the manifest disagree
    folder = write_folder(tmp_path / "b", manifest,
                          files=("vision.onnx", "embed.onnx", "prefill.onnx", "decode.onnx"))
    fake = _FakeTensorRT(inputs)
    monkeypatch.setattr(trt_export, "import_tensorrt", lambda: fake)
    with pytest.raises(TensorRTBuildError, match="'input_ids' is \\(-1, -1, -1\\) in the graph"):
        build_engines(folder, graphs=["embed"], log=lambda line: None)
    assert not list(folder.glob("*.engine"))
