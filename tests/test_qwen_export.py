"""Qwen2.5-VL through the ONNX export (`adsc export`, export_onnx, OnnxRunner) and the command line
(`adsc export --model`, `adsc generate --model`), on a tiny random checkpoint saved with its
tokenizer and image processor. The module exports once (through the command line, with --check)."""

import copy
import json
import shutil

import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch  # noqa: E402

from adsc_ext.cli import main as adsc_main  # noqa: E402
from adsc_ext.errors import AdscModelError, ExportError  # noqa: E402
from adsc_ext.export import OnnxRunner, export_onnx, load_manifest  # noqa: E402
from adsc_ext.export.manifest import MANIFEST_NAME, graph_io, spec_of  # noqa: E402
from adsc_ext.hf import apply_adsc  # noqa: E402
from adsc_ext.models import model_spec  # noqa: E402
from adsc_ext.testing.qwen import qwen_inputs, qwen_requests, save_qwen_checkpoint, tiny_qwen  # noqa: E402

# fp32 on the CPU: ONNX Runtime and PyTorch run the same math with other kernels and another grouping
# of the ops (the vision tower's windows as one masked attention); measured differences ~4e-6.
LOGIT_ATOL = 1e-4
SCHED = "1:2,3:2"
N = 4
ROWS = [["ab", ("image", 2, 3), "cd"], ["plain text"], ["y", ("image", 4, 4), "z", ("video", 2, 2, 2), "w", ("image", 3, 2)],
        [("image", 3, 5), "q", ("image", 2, 2)]]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen("qwen2_5_vl", num_layers=4)


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen25") / "ckpt"
    save_qwen_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """`adsc export --model <checkpoint> --check`: the folder, and what the command printed."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("qwen25_onnx") / "onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = adsc_main(["export", "--model", str(ckpt), "--out", str(out), "--schedule", SCHED, "--check",
                        "--check-tokens", "3"])
    return out, rc, buf.getvalue()


def test_export_command_checks_itself(exported):
    _, rc, text = exported
    assert rc == 0, text
    assert "greedy tokens agree" in text


def test_runner_equals_apply_adsc(model, exported):
    folder = exported[0]
    inp = qwen_inputs(model, ROWS)
    runner = OnnxRunner(folder, schedule=SCHED)
    got = runner.generate(qwen_requests(inp, model.config), max_new_tokens=N, return_logits=True)
    ref_model = apply_adsc(copy.deepcopy(model), SCHED)
    with torch.no_grad():
        g = ref_model.generate(**inp, max_new_tokens=N, min_new_tokens=N, do_sample=False, output_scores=True,
                               return_dict_in_generate=True, suppress_tokens=[model.config.image_token_id])
    assert [t for t, _ in got] == g.sequences[:, inp["input_ids"].shape[1]:].tolist()
    first, ref = torch.stack([lg[0] for _, lg in got]), g.scores[0]
    finite = torch.isfinite(ref)  # generate's suppressed image token is -inf
    err = (first[finite] - ref[finite]).abs().max().item()
    print(f"largest first-step logit difference: {err:.3g}")
    assert err <= LOGIT_ATOL
    # every layer's cache at its stage's padded length; the stages shrink
    lens = runner.stats["prefill_kv_lengths"]
    assert lens[0] > lens[1] == lens[2] > lens[3]


def test_manifest_records_the_architecture(model, exported):
    folder = exported[0]
    man = load_manifest(folder, SCHED)
    spec = model_spec(model)
    assert man["architecture"] == "qwen2.5-vl" and "grid" not in man
    assert man["vision"]["window_size"] == spec.window_size and man["tokens"]["video_token_id"] == spec.video_token_id
    assert spec_of(man) == spec.unbound()  # every fact the runner needs, from the manifest alone
    assert [v["name"] for v in man["graphs"]["vision"]["inputs"]] == graph_io(4, 3, "qwen2.5-vl")["vision"][0]
    pos = next(v for v in man["graphs"]["prefill"]["inputs"] if v["name"] == "position_ids")
    assert pos["shape"] == [4, "batch", "seq_stage0"]
    assert man["graphs"]["vision"]["inputs"][0]["shape"] == ["num_patches", spec.patch_dim]


def test_bad_manifests_and_runners_are_refused(exported, tmp_path):
    from adsc_ext.export.trt_runner import TensorRTRunner

    folder = exported[0]
    with pytest.raises(ExportError, match="holds a qwen2.5-vl export; TensorRTRunner runs llava-1.5"):
        TensorRTRunner(folder, graph_runners={})

    def edited(name, edit):
        dst = tmp_path / name
        shutil.copytree(folder, dst)
        man = json.loads((dst / MANIFEST_NAME).read_text())
        edit(man)
        (dst / MANIFEST_NAME).write_text(json.dumps(man))
        return dst

    with pytest.raises(ExportError, match="'architecture' must be one of llava-1.5, qwen2.5-vl, got 'qwen9'"):
        OnnxRunner(edited("arch", lambda m: m.update(architecture="qwen9")))
    with pytest.raises(ExportError, match="incomplete qwen2.5-vl manifest, missing vision"):
        OnnxRunner(edited("novision", lambda m: m.pop("vision")))
    with pytest.raises(ExportError, match="tokens"):
        OnnxRunner(edited("tokens", lambda m: m["tokens"].update(video_token_id=10 ** 6)))
    # a LLaVA manifest on Qwen graphs: the graphs carry their architecture

    def as_llava(m):
        m.update(architecture="llava-1.5", grid=[4, 4], tokens_per_image=16, image_size=16)
        for st, g in zip(m["stages"], ([4, 4], [4, 2], [2, 2])):
            st.update(grid=g, tokens_per_image=g[0] * g[1])

    with pytest.raises(ExportError, match="vision.onnx is not this export's vision graph: it carries architecture "
                                          "'qwen2.5-vl'"):
        OnnxRunner(edited("llava", as_llava))


def test_export_refuses_what_it_cannot_export(tmp_path):
    with pytest.raises(AdscModelError, match="DeepStack"):
        export_onnx(tiny_qwen("qwen3_vl", num_layers=4), tmp_path / "q3", "2:2")
    with pytest.raises(ExportError, match="qwen2-vl's vision tower has no exported graph"):
        export_onnx(tiny_qwen("qwen2_vl", num_layers=4), tmp_path / "q2", "1:2")


def test_generate_command_on_the_checkpoint(ckpt, tmp_path, capsys):
    from PIL import Image
    import numpy as np

    img = tmp_path / "img.png"
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 60, 3), dtype=np.uint8)).save(img)
    assert adsc_main(["generate", "--model", str(ckpt), "--image", str(img), "--max-new-tokens", "3",
                      "--schedule", SCHED]) == 0
    out = capsys.readouterr().out
    assert f"schedule: '{SCHED}'" in out and "generated: 3" in out
    rows = [ln.split() for ln in out.splitlines() if ln.strip()[:1].isdigit() and len(ln.split()) == 6]
    assert [int(r[1]) for r in rows] == [0, 1, 1, 2] and int(rows[0][2]) > int(rows[1][2]) > int(rows[3][2])
    # the config's default: spec 2's rule for its 4 layers; a schedule the layers cannot take is one line
    assert adsc_main(["generate", "--model", str(ckpt), "--max-new-tokens", "2"]) == 0
    assert "schedule: '1:2,2:2,3:2'" in capsys.readouterr().out
    assert adsc_main(["generate", "--model", str(ckpt), "--schedule", "5:2"]) == 2
    assert "does not fit a model with 4 decoder layers" in capsys.readouterr().err


def test_checkpoint_rows(ckpt, model):
    from adsc_ext.models.checkpoint import SUPPORTED, check_schedule, inspect_checkpoint
    from adsc_ext.schedule import ScheduleError

    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl"} <= set(SUPPORTED)
    info = inspect_checkpoint(ckpt, "float32", 4)
    assert info.architecture.class_name == "Qwen2_5_VLForConditionalGeneration"
    n = sum(p.numel() for p in model.parameters())
    assert SUPPORTED["qwen2_5_vl"].parameters(info.config) == n
    assert str(check_schedule(info)) == "1:2,2:2,3:2"
    with pytest.raises(ScheduleError, match="4 decoder layers"):
        check_schedule(info, "4:2")
    q3 = tiny_qwen("qwen3_vl", num_layers=4).config.to_dict()
    with pytest.raises(ScheduleError, match="DeepStack"):
        check_schedule(type(info)(info.path, q3, SUPPORTED["qwen3_vl"], "float32", None, ""), "1:2")


def test_trt_build_refuses_a_qwen_export_by_name(exported, capsys):
    """adsc trt-build names the architecture it cannot build (not a 'broken manifest' message)."""
    from adsc_ext.errors import TensorRTBuildError
    from adsc_ext.export.tensorrt import read_manifest

    folder = exported[0]
    with pytest.raises(TensorRTBuildError, match="holds a qwen2.5-vl export; adsc trt-build builds llava-1.5"):
        read_manifest(folder)
    assert adsc_main(["trt-build", str(folder)]) == 2
    assert "holds a qwen2.5-vl export" in capsys.readouterr().err
