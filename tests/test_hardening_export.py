"""``adsc export`` and :class:`OnnxRunner` against damaged, mixed and mis-described folders, and
opsets the exporter cannot write (issue 18, item 6).

Two exports of the same tiny configuration (seeds 0 and 1: same graphs' inputs and outputs,
other weights) are made once; every damaged folder is a copy of the first. The runner must refuse
each with one :class:`ExportError` naming the file and the field, before any generation: a graph
from another export, a manifest whose grid, image token id, dtype or layer count disagrees with
the graphs, a truncated graph, manifest fields of the wrong type or value.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch  # noqa: E402

from adsc_ext.cli import main  # noqa: E402
from adsc_ext.export import ExportError, OnnxRunner, export_onnx  # noqa: E402
from adsc_ext.export.manifest import GRAPH_FILES, MANIFEST_NAME  # noqa: E402
from adsc_ext.testing import tiny_llava  # noqa: E402

SCHEDULE = "1:2"
MODEL = dict(grid_side=4, num_layers=2, vision_layers=1)


@pytest.fixture(scope="module")
def two_exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    for seed in (0, 1):
        export_onnx(tiny_llava(seed=seed, **MODEL), root / f"seed{seed}", SCHEDULE, progress=None)
    return root / "seed0", root / "seed1"


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_manifest(folder: Path, edit) -> Path:
    man = json.loads((folder / MANIFEST_NAME).read_text())
    edit(man)
    (folder / MANIFEST_NAME).write_text(json.dumps(man))
    return folder


def _refused(folder, *needles):
    """OnnxRunner(folder) raises exactly ExportError, one line, naming every needle."""
    with pytest.raises(ExportError) as info:
        OnnxRunner(folder)
    assert type(info.value) is ExportError
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


# ---- one export, one id --------------------------------------------------------------------------
def test_every_graph_carries_the_export_id(two_exports):
    ids = []
    for folder in two_exports:
        man = json.loads((folder / MANIFEST_NAME).read_text())
        assert isinstance(man["export_id"], str) and len(man["export_id"]) == 32
        for file in GRAPH_FILES.values():
            meta = {p.key: p.value for p in onnx.load(str(folder / file), load_external_data=False).metadata_props}
            assert meta["adsc_export_id"] == man["export_id"]
        ids.append(man["export_id"])
    assert ids[0] != ids[1]


@pytest.mark.parametrize("graph", ["decode", "vision"])
def test_graph_copied_from_another_export_is_refused(two_exports, tmp_path, graph):
    """Same schedule, same graph name, same inputs: only the export id tells (the weights differ)."""
    first, second = two_exports
    folder = _copy(first, tmp_path / "mixed")
    shutil.copy(second / GRAPH_FILES[graph], folder / GRAPH_FILES[graph])
    _refused(folder, str(folder / GRAPH_FILES[graph]), "another export", "export_id")


# ---- the manifest against the graphs -----------------------------------------------------------------
def test_manifest_grid_that_disagrees_with_the_graphs_is_refused(two_exports, tmp_path):
    """A grid, stage grids and token counts consistent among themselves, but not the graphs' 4x4."""

    def edit(man):
        man["grid"], man["tokens_per_image"] = [2, 8], 16
        man["stages"][0]["grid"], man["stages"][1]["grid"] = [2, 8], [2, 4]

    folder = _edit_manifest(_copy(two_exports[0], tmp_path / "grid"), edit)
    _refused(folder, "grid", ".onnx", "4x4")


def test_manifest_image_token_id_that_disagrees_is_refused(two_exports, tmp_path):
    folder = _edit_manifest(_copy(two_exports[0], tmp_path / "tok"), lambda m: m.update(image_token_id=5))
    _refused(folder, "image_token_id", ".onnx")


def test_manifest_dtype_that_disagrees_with_the_graphs_is_refused(two_exports, tmp_path):
    folder = _edit_manifest(_copy(two_exports[0], tmp_path / "dt"), lambda m: m.update(dtype="float16"))
    _refused(folder, "dtype", "float16", "float32")


def test_manifest_layer_count_that_disagrees_with_the_graphs_is_refused(two_exports, tmp_path):
    """3 layers in a consistent manifest; the graphs have present.* for 2."""

    def edit(man):
        man["model"]["num_layers"] = 3
        man["stage_of_layer"] = [0, 1, 1]
        man["stages"][-1]["end_layer"] = 3

    folder = _edit_manifest(_copy(two_exports[0], tmp_path / "layers"), edit)
    _refused(folder, "num_layers", "3", "present.")


def test_manifest_model_dims_that_disagree_are_refused(two_exports, tmp_path):
    for field, value in (("hidden_size", 48), ("vocab_size", 301), ("num_kv_heads", 1), ("head_dim", 8)):
        folder = _edit_manifest(_copy(two_exports[0], tmp_path / field),
                                lambda m: m["model"].update({field: value}))
        _refused(folder, f"model.{field}", ".onnx")
    folder = _edit_manifest(_copy(two_exports[0], tmp_path / "size"), lambda m: m.update(image_size=20))
    _refused(folder, "image_size", "vision.onnx")


def test_manifest_opset_that_disagrees_is_refused(two_exports, tmp_path):
    folder = _edit_manifest(_copy(two_exports[0], tmp_path / "op"), lambda m: m.update(opset=18))
    _refused(folder, "opset", ".onnx")


# ---- damaged folders ------------------------------------------------------------------------------
def test_truncated_graph_is_one_export_error(two_exports, tmp_path):
    for file in ("prefill.onnx", "embed.onnx"):
        folder = _copy(two_exports[0], tmp_path / file)
        data = (folder / file).read_bytes()
        (folder / file).write_bytes(data[: len(data) // 2])
        _refused(folder, str(folder / file))


def test_empty_graph_file_is_one_export_error(two_exports, tmp_path):
    folder = _copy(two_exports[0], tmp_path / "empty")
    (folder / "decode.onnx").write_bytes(b"")
    _refused(folder, str(folder / "decode.onnx"))


BAD_FIELDS = [
    # (field path, value, text the message must hold)
    (("model", "num_layers"), "two", "model.num_layers"),
    (("model", "num_layers"), 0, "model.num_layers"),
    (("model", "num_layers"), 2.5, "model.num_layers"),
    (("model", "num_layers"), True, "model.num_layers"),
    (("model",), [], "'model'"),
    (("model", "vocab_size"), None, "model.vocab_size"),
    (("model", "max_positions"), "4096", "model.max_positions"),
    (("dtype",), 5, "dtype"),
    (("dtype",), ["float32"], "dtype"),
    (("dtype",), "int8", "dtype"),
    (("graphs",), [], "graphs"),
    (("graphs",), {"vision": {"file": "vision.onnx"}}, "graphs"),
    (("graphs", "decode"), "decode.onnx", "graphs.decode"),
    (("grid",), "4x4", "grid"),
    (("grid",), [4], "grid"),
    (("grid",), [4, 0], "grid"),
    (("grid",), [4, "4"], "grid"),
    (("image_token_id",), "299", "image_token_id"),
    (("image_token_id",), -1, "image_token_id"),
    (("image_token_id",), 10**6, "image_token_id"),
    (("tokens_per_image",), 15, "tokens_per_image"),
    (("image_size",), 0, "image_size"),
    (("schedule",), 12, "schedule"),
    (("schedule",), "x:y", "schedule"),
    (("stages",), None, "stages"),
    (("stages",), [], "stages"),
    (("stage_of_layer",), [0, 0], "stage_of_layer"),
    (("stage_of_layer",), "01", "stage_of_layer"),
    (("opset",), "23", "opset"),
    (("compaction",), "gather", "compaction"),
    (("padding_side",), "right", "padding_side"),
    (("export_id",), 7, "export_id"),
]


@pytest.mark.parametrize("path, value, needle", BAD_FIELDS, ids=[f"{'.'.join(p)}={v!r}" for p, v, _ in BAD_FIELDS])
def test_manifest_field_of_the_wrong_type_or_value_is_one_export_error(two_exports, tmp_path, path, value, needle):
    def edit(man):
        d = man
        for k in path[:-1]:
            d = d[k]
        d[path[-1]] = value

    folder = _edit_manifest(_copy(two_exports[0], tmp_path / "m"), edit)
    _refused(folder, str(folder / MANIFEST_NAME), needle)


def test_manifest_missing_export_id_is_refused(two_exports, tmp_path):
    folder = _edit_manifest(_copy(two_exports[0], tmp_path / "noid"), lambda m: m.pop("export_id"))
    _refused(folder, "export_id")


def test_the_intact_export_still_runs(two_exports):
    runner = OnnxRunner(two_exports[0], schedule=SCHEDULE)
    out = runner.generate([{"input_ids": torch.tensor([1, 5, 6, 7]), "pixel_values": None}], max_new_tokens=2)
    assert len(out[0]) == 2


# ---- opsets the exporter cannot write ---------------------------------------------------------------
def _one_line_cli(capsys, *argv):
    capsys.readouterr()
    code = main(["export", *argv])
    out, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (code, err)
    return err


@pytest.mark.parametrize("opset", [26, 27, 28, 99])
def test_opsets_the_exporter_cannot_write_are_refused_before_exporting(tmp_path, capsys, opset):
    t0 = time.perf_counter()
    err = _one_line_cli(capsys, "--opset", str(opset), "--out", str(tmp_path / "o"))
    assert f"opset {opset}" in err, err
    assert not (tmp_path / "o").exists()
    assert time.perf_counter() - t0 < 60  # a probe, not an export


def test_export_onnx_refuses_an_opset_it_cannot_write(tmp_path):
    with pytest.raises(ExportError, match="opset 26"):
        export_onnx(tiny_llava(**MODEL), tmp_path / "o", SCHEDULE, opset=26, progress=None)
    assert not (tmp_path / "o").exists()


def test_a_graph_that_declares_another_opset_fails_the_export(tmp_path, monkeypatch):
    """Belt and braces: were the probe wrong, the first written graph's declared opset is checked
    and nothing is installed."""
    from adsc_ext.export import onnx_export

    monkeypatch.setattr(onnx_export, "check_opset", lambda opset: None)
    with pytest.raises(ExportError, match="vision.onnx.*declares opset 18.*26"):
        export_onnx(tiny_llava(**MODEL), tmp_path / "o", SCHEDULE, opset=26, progress=None)
    assert not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.partial")]


# ---- every argument before "already exists" ------------------------------------------------------------
def test_existing_folder_does_not_hide_other_argument_errors(tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    llama = tmp_path / "llama"
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=1).save_pretrained(llama)
    ok = tmp_path / "ok"
    tiny_llava(grid_side=4, num_layers=2).save_pretrained(ok)
    cases = [
        (["--schedule", "x"], "bad schedule"),
        (["--schedule", "9:2"], "does not fit a model with 8 decoder layers"),
        (["--opset", "11"], "opset"),
        (["--opset", "26"], "opset 26"),
        (["--check-tokens", "0"], "--check-tokens"),
        (["--model", str(tmp_path / "none")], "no such checkpoint"),
        (["--model", str(llama)], "model_type 'llama'"),
        (["--model", str(ok)], "does not fit a model with 2 decoder layers"),  # the LLaVA-1.5 default
        (["--model", str(ok), "--schedule", "1:4,1:2"], "schedule"),
    ]
    for argv, needle in cases:
        err = _one_line_cli(capsys, *argv, "--out", str(taken))
        assert needle in err and "already exists" not in err, (argv, err)
    err = _one_line_cli(capsys, "--model", str(ok), "--schedule", "1:2", "--out", str(taken))
    assert "already exists" in err  # and only then, the folder
    assert sorted(p.name for p in taken.iterdir()) == ["notes.txt"]
