"""ONNX export with the ADSC schedule baked in (adsc_ext.export), checked on ONNX Runtime (CPU).

Each configuration is exported once (module-scoped fixture) and every test below runs on it:
tiny random LLaVAs with even and odd grids, MHA / GQA / MQA, factor-2 and factor-4 steps, 1 to 4
stages, the standard-op and the plugin compaction, opset 23 (ONNX Attention op) and 18
(MatMul/Softmax). The oracle is the Hugging Face ADSC path (``apply_adsc``), or the unmodified
model for the empty schedule.
"""

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import torch  # noqa: E402

from adsc_ext.accounting import plan_report, spec_from_config  # noqa: E402
from adsc_ext.export import ExportError, OnnxRunner, export_onnx, load_manifest  # noqa: E402
from adsc_ext.export import _plugin  # noqa: E402
from adsc_ext.export.manifest import GRAPH_FILES, MANIFEST_NAME  # noqa: E402
from adsc_ext.hf import apply_adsc  # noqa: E402
from adsc_ext.testing import TinyProcessor, tiny_llava  # noqa: E402
from adsc_ext.models import AdscInputError, AdscModelError  # noqa: E402
from adsc_ext.schedule import Schedule, ScheduleError  # noqa: E402

# fp32 on the CPU: ONNX Runtime and PyTorch run the same math with other kernels and another
# grouping of the ops; measured differences are ~1e-6 (printed by the test), the bound leaves room.
LOGIT_ATOL = 1e-4
NEW_TOKENS = 5

CONFIGS = {
    # 3 stages, a factor-4 step, GQA (4 query heads on 2 KV heads)
    "grid4_gqa_f4": dict(model=dict(grid_side=4, num_layers=3, num_heads=4, num_kv_heads=2),
                         schedule="1:2,2:4"),
    # odd grid 5x5 -> 5x3 -> 3x3 -> 2x2: 4 stages, MHA
    "grid5_mha_4stages": dict(model=dict(grid_side=5, num_layers=4, num_heads=4, num_kv_heads=4),
                              schedule="1:2,2:2,3:4"),
    # 2 stages, MQA, AdscCompactTokens plugin nodes (run on ONNX Runtime through the reference function)
    "grid4_mqa_plugin": dict(model=dict(grid_side=4, num_layers=2, num_heads=4, num_kv_heads=1),
                             schedule="1:2", compaction="plugin"),
    # odd grid 3x3, the empty schedule (one stage, the unmodified model), opset 18 (MatMul/Softmax);
    # exported through the command line from a saved checkpoint, with --check
    "grid3_empty_opset18_cli": dict(model=dict(grid_side=3, num_layers=2), schedule="", opset=18, cli=True),
}

# rows: (text before, images, text after): 1, 0 and 2 images, all of different lengths
ROWS = [("ab", 1, "cd"), ("", 0, "plain text row"), ("x", 2, "y?")]


def make_model(cfg, seed=0):
    return tiny_llava(seed=seed, **cfg["model"])


def make_requests(model, rows=ROWS, seed=0):
    """Engine-style requests and the equivalent left-padded HF batch (same pixels)."""
    proc = TinyProcessor(model.config)
    side = model.config.vision_config.image_size
    n = sum(k for _, k, _ in rows)
    g = torch.Generator().manual_seed(seed)
    pix = proc.images(list(torch.rand(n, 3, side, side, generator=g))) if n else None
    reqs, i = [], 0
    for before, k, after in rows:
        reqs.append(dict(input_ids=torch.tensor(proc.encode(before + "<image>" * k + after, k)),
                         pixel_values=pix[i:i + k] if k else None))
        i += k
    batch = proc([b + "<image>" * k + a for b, k, a in rows], images=list(pix) if n else None)
    if n:
        batch["pixel_values"] = pix
    return reqs, batch


def hf_generate(model, batch, n):
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             suppress_tokens=[model.config.image_token_id])
    return out[:, batch["input_ids"].shape[1]:].tolist()


def hf_last_logits(model, req):
    with torch.no_grad():
        return model(input_ids=req["input_ids"][None], pixel_values=req["pixel_values"]).logits[0, -1].float()


class Exported:
    def __init__(self, name, cfg, folder, manifest, cli=None):
        self.name, self.cfg, self.folder, self.manifest, self.cli = name, cfg, Path(folder), manifest, cli
        self.reference = make_model(cfg)  # same seed: the same weights as the exported model
        if cfg["schedule"]:
            apply_adsc(self.reference, cfg["schedule"])
        self.runner = OnnxRunner(folder)

    def graph(self, name):
        return onnx.load(str(self.folder / GRAPH_FILES[name]))


@pytest.fixture(scope="module", params=list(CONFIGS))
def exported(request, tmp_path_factory):
    name = request.param
    cfg = CONFIGS[name]
    folder = tmp_path_factory.mktemp("onnx") / name
    if cfg.get("cli"):
        ckpt = tmp_path_factory.mktemp("ckpt")
        make_model(cfg).save_pretrained(ckpt)
        res = _adsc("export", "--model", str(ckpt), "--schedule", cfg["schedule"], "--opset", str(cfg["opset"]),
                    "--out", str(folder), "--check", "--check-tokens", "4")
        assert res.returncode == 0, res.stderr
        lines = [ln for ln in res.stdout.splitlines() if ln.startswith("adsc export: ") and ".onnx " in ln]
        assert [ln.split()[2] for ln in lines] == list(GRAPH_FILES.values())  # one progress line per graph
        return Exported(name, cfg, folder, load_manifest(folder), cli=(ckpt, res))
    lines = []
    manifest = export_onnx(make_model(cfg), folder, cfg["schedule"], opset=cfg.get("opset", 23),
                           compaction=cfg.get("compaction", "onnx"), progress=lines.append)
    assert [ln.split()[2] for ln in lines] == list(GRAPH_FILES.values())  # one progress line per graph
    return Exported(name, cfg, folder, manifest)


# ---- equivalence ------------------------------------------------------------------------------
def test_runner_greedy_tokens_and_logits_equal_pytorch(exported):
    """The runner's greedy tokens equal apply_adsc's (the unmodified model's for the empty
    schedule), batched with 0, 1 and 2 images per row; first-step logits within LOGIT_ATOL."""
    reqs, batch = make_requests(exported.reference)
    got = exported.runner.generate(reqs, max_new_tokens=NEW_TOKENS, return_logits=True)
    assert [g[0] for g in got] == hf_generate(exported.reference, batch, NEW_TOKENS)
    diffs = [float((lg[0] - hf_last_logits(exported.reference, r)).abs().max()) for r, (_, lg) in zip(reqs, got)]
    print(f"\n[{exported.name}] first-step logit |diff| per request: {['%.2e' % d for d in diffs]}")
    assert max(diffs) <= LOGIT_ATOL


def test_batch_and_lengths_never_traced(exported):
    """Dynamic axes are real: batch sizes and prompt lengths unseen at export time, and a batch
    gives every row what it gets alone."""
    traced = exported.manifest["traced_with"]
    rows = [("a", 1, "bcdefghij"), ("", 0, "k"), ("lm", 2, ""), ("no images but a longer prompt here", 0, ""), ("q", 1, "r")]
    reqs, _ = make_requests(exported.reference, rows, seed=3)
    assert len(reqs) > traced["batch"]
    assert max(r["input_ids"].numel() for r in reqs) > max(traced["seq_stage"])
    batched = exported.runner.generate(reqs, max_new_tokens=3)
    alone = [exported.runner.generate([r], max_new_tokens=3)[0] for r in reqs]
    assert batched == alone


def test_vision_graph_equals_llava_image_features(exported):
    import onnxruntime as ort

    from adsc_ext.models.llava import image_features

    side = exported.reference.config.vision_config.image_size
    pix = torch.rand(3, 3, side, side, generator=torch.Generator().manual_seed(5)) * 2 - 1
    sess = ort.InferenceSession(str(exported.folder / "vision.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {"pixel_values": pix.numpy()})[0])
    with torch.no_grad():
        want = image_features(exported.reference, pix)
    torch.testing.assert_close(got.reshape(want.shape), want, atol=1e-5, rtol=1e-5)


# ---- the KV saving is in the graph --------------------------------------------------------------
def test_kv_lengths_are_the_stage_lengths_adsc_plan_counts(exported):
    model, sched = exported.reference, Schedule.parse(exported.cfg["schedule"])
    spec = spec_from_config(model.config.to_dict(), exported.name)
    stage_of = [sched.stage_of_layer(l) for l in range(model.config.text_config.num_hidden_layers)]
    reqs, _ = make_requests(model)
    tpi = TinyProcessor(model.config).tokens_per_image
    for r in reqs:
        k = 0 if r["pixel_values"] is None else r["pixel_values"].shape[0]
        text = r["input_ids"].numel() - k * tpi
        counted = [st["tokens"] for st in plan_report(spec, sched, text, k, 4)["stages"]]
        exported.runner.generate([r], max_new_tokens=4)
        assert exported.runner.stats["prefill_kv_lengths"] == [counted[s] for s in stage_of]
        assert exported.runner.stats["kv_lengths"] == [counted[s] + 3 for s in stage_of]  # 3 fed-back tokens
    if sched:  # the last stage holds fewer tokens than the first, for a row with an image
        assert counted[-1] < counted[0]


def test_kv_dims_are_named_per_stage(exported):
    man = exported.manifest
    n_st, L = len(man["stages"]), man["model"]["num_layers"]
    kvh, hd = man["model"]["num_kv_heads"], man["model"]["head_dim"]
    stage_of = man["stage_of_layer"]

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    dec = exported.graph("decode").graph
    ins, outs = {v.name: dims(v) for v in dec.input}, {v.name: dims(v) for v in dec.output}
    for l in range(L):
        s = stage_of[l]
        for w in ("key", "value"):
            assert ins[f"past_key_values.{l}.{w}"] == ["batch", kvh, f"past_seq_stage{s}", hd]
            assert outs[f"present.{l}.{w}"] == ["batch", kvh, f"past_seq_stage{s} + 1", hd]
    for s in range(n_st):
        assert ins[f"past_mask.{s}"] == ["batch", f"past_seq_stage{s}"]
    names = {ins[f"past_key_values.{l}.key"][2] for l in range(L)}
    assert len(names) == n_st  # one name per stage, shared by its layers
    pre = exported.graph("prefill").graph
    pouts = {v.name: dims(v) for v in pre.output}
    for l in range(L):
        assert pouts[f"present.{l}.key"] == ["batch", kvh, f"seq_stage{stage_of[l]}", hd]
    assert pouts["logits"] == ["batch", man["model"]["vocab_size"]]


# ---- graphs and manifest ------------------------------------------------------------------------
def test_every_graph_passes_the_full_checker(exported):
    for file in GRAPH_FILES.values():
        onnx.checker.check_model(str(exported.folder / file), full_check=True)


def test_manifest_is_complete_and_matches_the_graphs(exported):
    man = load_manifest(exported.folder, exported.cfg["schedule"])
    cfg = exported.reference.config
    sched = Schedule.parse(exported.cfg["schedule"])
    assert man["schedule"] == str(sched)
    assert man["grid"] == [cfg.vision_config.image_size // cfg.vision_config.patch_size] * 2
    assert man["image_token_id"] == cfg.image_token_id
    assert man["dtype"] == "float32" and man["opset"] == exported.cfg.get("opset", 23)
    assert man["compaction"] == exported.cfg.get("compaction", "onnx")
    assert man["model"]["num_kv_heads"] == cfg.text_config.num_key_value_heads
    assert [st["tokens_per_image"] for st in man["stages"]] == [h * w for h, w in sched.grids(man["grid"])]
    for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "adsc_ext"):
        assert man["versions"].get(pkg)
    for name, file in GRAPH_FILES.items():
        g = exported.graph(name)
        meta = {p.key: p.value for p in g.metadata_props}
        assert meta["adsc_schedule"] == man["schedule"] and meta["adsc_graph"] == name
        desc = man["graphs"][name]
        for vals, listed in ((g.graph.input, desc["inputs"]), (g.graph.output, desc["outputs"])):
            assert [v.name for v in vals] == [t["name"] for t in listed]
            for v, t in zip(vals, listed):
                assert [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] == t["shape"]
                assert t["dtype"] and t["meaning"], f"{name}: {t['name']} lacks dtype or meaning"
    ops = {n.op_type for n in exported.graph("prefill").graph.node}
    if man["opset"] >= 23:
        assert man["attention"] == "onnx.Attention" and "Attention" in ops and "Softmax" not in ops
    else:
        assert man["attention"] == "MatMul/Softmax" and "Attention" not in ops and "Softmax" in ops


def test_compaction_nodes(exported):
    g = exported.graph("prefill")
    n_boundaries = len(exported.manifest["stages"]) - 1
    plugin = [n for n in g.graph.node if n.op_type == _plugin.OP_TYPE]
    if exported.manifest["compaction"] == "plugin":
        assert len(plugin) == 3 * n_boundaries  # hidden states, cos, sin at every boundary
        for n in plugin:
            assert n.domain == _plugin.DOMAIN and len(n.input) == _plugin.NUM_INPUTS
            assert {a.name: a.s.decode() for a in n.attribute} == _plugin.compact_node_attributes()
        assert (_plugin.DOMAIN, _plugin.DOMAIN_VERSION) in {(o.domain, o.version) for o in g.opset_import}
        assert exported.manifest["plugin"]["library"] == _plugin.PLUGIN_LIBRARY
        idx = {v.name: v.type.tensor_type.elem_type for v in g.graph.input if v.name.startswith("adsc_index.")}
        assert set(idx.values()) == {onnx.TensorProto.INT32}
    else:
        assert not plugin
        assert all(o.domain in ("", "ai.onnx") for o in g.opset_import)


def test_standard_compaction_gives_zero_rows_for_padding():
    """Index -1 gives a zero row (a plain Gather would give the last row), bit for bit as the op."""
    import adsc_ext
    from adsc_ext.export.onnx_graphs import compact_rows

    x = torch.randn(2, 5, 3)
    idx = torch.tensor([[-1, 1, 4], [5, 7, 9]], dtype=torch.int32)
    got = compact_rows(x, idx)
    assert torch.equal(got, adsc_ext.compact_tokens(x, idx))
    assert torch.equal(got[0, 0], torch.zeros(3))


# ---- dtypes ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def half_exports(tmp_path_factory):
    cfg = dict(model=dict(grid_side=4, num_layers=2, num_kv_heads=2, vision_layers=1), schedule="1:4")
    out = {}
    for dt in ("float16", "bfloat16"):
        folder = tmp_path_factory.mktemp("onnx") / dt
        export_onnx(make_model(cfg), folder, cfg["schedule"], dtype=dt, progress=None)
        out[dt] = folder
    return cfg, out


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_exports(half_exports, dtype):
    cfg, folders = half_exports
    folder = folders[dtype]
    man = load_manifest(folder)
    assert man["dtype"] == dtype
    elem = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}[dtype]
    for name, file in GRAPH_FILES.items():
        onnx.checker.check_model(str(folder / file), full_check=True)
        g = onnx.load(str(folder / file)).graph
        floats = [v for v in g.input if v.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, elem)]
        assert all(v.type.tensor_type.elem_type == elem for v in floats), name
    if dtype == "bfloat16":  # numpy / ONNX Runtime's CPU kernels have no bfloat16: refused clearly
        with pytest.raises(ExportError, match="bfloat16"):
            OnnxRunner(folder)


def test_float16_export_accuracy(half_exports):
    """FlashAttention's accuracy rule on the first-step logits: the fp16 graph's error against the
    fp32 model is at most twice PyTorch's own fp16 error (plus a small floor)."""
    cfg, folders = half_exports
    ref32 = make_model(cfg)
    apply_adsc(ref32, cfg["schedule"])
    ref16 = copy.deepcopy(ref32).to(torch.float16)
    reqs, _ = make_requests(ref32)
    got = OnnxRunner(folders["float16"]).generate(
        [dict(r, pixel_values=None if r["pixel_values"] is None else r["pixel_values"].half()) for r in reqs],
        max_new_tokens=1, return_logits=True)
    for r, (_, lg) in zip(reqs, got):
        want = hf_last_logits(ref32, r)
        r16 = dict(input_ids=r["input_ids"], pixel_values=None if r["pixel_values"] is None else r["pixel_values"].half())
        torch_err = float((hf_last_logits(ref16, r16) - want).abs().max())
        onnx_err = float((lg[0] - want).abs().max())
        print(f"\n[float16] first-step logit error vs fp32: onnx {onnx_err:.3e}, torch fp16 {torch_err:.3e}")
        assert onnx_err <= 2 * torch_err + 1e-3


# ---- bad input ---------------------------------------------------------------------------------------
def test_unsupported_models_are_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2))
    with pytest.raises(AdscModelError, match="LlavaForConditionalGeneration"):
        export_onnx(llama, tmp_path / "a", "1:2")
    full = tiny_llava(grid_side=4, num_layers=2)
    full.config.vision_feature_select_strategy = "full"
    with pytest.raises(AdscModelError, match="vision_feature_select_strategy"):
        export_onnx(full, tmp_path / "b", "1:2")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("schedule,match", [("5:2", "decoder layers"), ("1:4,2:4,3:4", "cannot be downsampled"),
                                            ("1:3", "factor")])
def test_schedules_that_do_not_fit_are_refused(tmp_path, schedule, match):
    with pytest.raises(ScheduleError, match=match):
        export_onnx(tiny_llava(grid_side=4, num_layers=4), tmp_path / "x", schedule)


def test_existing_folder_and_bad_options_are_refused(tmp_path):
    model = tiny_llava(grid_side=4, num_layers=2)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        export_onnx(model, tmp_path / "taken", "1:2")
    with pytest.raises(ExportError, match="compaction"):
        export_onnx(model, tmp_path / "y", "1:2", compaction="gather")
    with pytest.raises(ExportError, match="opset"):
        export_onnx(model, tmp_path / "y", "1:2", opset=11)
    with pytest.raises(ExportError, match="dtype"):
        export_onnx(model, tmp_path / "y", "1:2", dtype="int8")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_force_replaces_only_the_earlier_export(tmp_path):
    """What --force does to a folder: the earlier export's files go, the user's stay, manifest last."""
    from adsc_ext.export.onnx_export import _install

    old, new = tmp_path / "old", tmp_path / "new"
    old.mkdir(), new.mkdir()
    for f in (*GRAPH_FILES.values(), "prefill.onnx.data", MANIFEST_NAME, "notes.txt"):
        (old / f).write_text("old")
    for f in (*GRAPH_FILES.values(), MANIFEST_NAME):
        (new / f).write_text("new")
    _install(new, old)
    assert sorted(p.name for p in old.iterdir()) == sorted([*GRAPH_FILES.values(), MANIFEST_NAME, "notes.txt"])
    assert all((old / f).read_text() == "new" for f in (*GRAPH_FILES.values(), MANIFEST_NAME))


def test_runner_refuses_images_that_do_not_match(exported):
    if exported.name != "grid4_gqa_f4":
        pytest.skip("request checks are the same for every export; run once")
    reqs, _ = make_requests(exported.reference)
    two = torch.cat([reqs[0]["pixel_values"], reqs[0]["pixel_values"]])
    bad = dict(reqs[0], pixel_values=two)  # 1 image's tokens, 2 images
    with pytest.raises(AdscInputError, match=r"request 1: input_ids hold 1 image\(s\).*pixel_values has 2"):
        exported.runner.generate([reqs[1], bad], max_new_tokens=2)
    with pytest.raises(AdscInputError, match=r"request 0: input_ids hold 0 image\(s\)"):
        exported.runner.generate([dict(reqs[1], pixel_values=reqs[0]["pixel_values"])], max_new_tokens=2)
    side = exported.reference.config.vision_config.image_size
    with pytest.raises(AdscInputError, match=f"must be {side}x{side}"):
        exported.runner.generate([dict(reqs[0], pixel_values=torch.zeros(1, 3, side + 1, side + 1))], max_new_tokens=2)
    split = dict(input_ids=reqs[0]["input_ids"][:-6], pixel_values=reqs[0]["pixel_values"])  # a cut image
    with pytest.raises(AdscInputError, match="whole images"):
        exported.runner.generate([split], max_new_tokens=2)
    out = exported.runner.generate([reqs[1], bad], max_new_tokens=2, return_exceptions=True)
    assert len(out[0]) == 2 and isinstance(out[1], AdscInputError)


def test_runner_refuses_broken_folders(exported, tmp_path):
    if exported.name != "grid4_gqa_f4":
        pytest.skip("folder checks are the same for every export; run once")
    with pytest.raises(ExportError, match="exported with schedule '1:2,2:4', not '1:2'"):
        OnnxRunner(exported.folder, schedule="1:2")
    copy_dir = tmp_path / "copy"
    shutil.copytree(exported.folder, copy_dir)
    (copy_dir / MANIFEST_NAME).unlink()
    with pytest.raises(ExportError, match="has no adsc_manifest.json"):
        OnnxRunner(copy_dir)
    with pytest.raises(ExportError, match="no such export folder"):
        OnnxRunner(tmp_path / "nowhere")
    shutil.copy(exported.folder / MANIFEST_NAME, copy_dir / MANIFEST_NAME)
    (copy_dir / "decode.onnx").unlink()
    with pytest.raises(ExportError, match="decode.onnx is missing"):
        OnnxRunner(copy_dir)
    # a graph of another export (another schedule) dropped into the folder
    g = onnx.load(str(exported.folder / "prefill.onnx"))
    for p in g.metadata_props:
        if p.key == "adsc_schedule":
            p.value = "2:2"
    onnx.save(g, str(copy_dir / "prefill.onnx"))
    shutil.copy(exported.folder / "decode.onnx", copy_dir / "decode.onnx")
    with pytest.raises(ExportError, match="not this export's prefill graph: it carries schedule '2:2'"):
        OnnxRunner(copy_dir)
    man = json.loads((exported.folder / MANIFEST_NAME).read_text())
    man["format_version"] = 99
    (copy_dir / MANIFEST_NAME).write_text(json.dumps(man))
    with pytest.raises(ExportError, match="format version 99"):
        OnnxRunner(copy_dir)


# ---- the command line ----------------------------------------------------------------------------------
def _adsc(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "adsc_ext.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


def _one_line_error(res):
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    return res.stderr


def test_cli_export_and_check(exported, tmp_path):
    """``adsc export --model PATH --check``: the export (the fixture made it), ONNX Runtime against
    PyTorch; and an existing folder is refused without --force."""
    if exported.cli is None:
        pytest.skip("exported through the API")
    ckpt, res = exported.cli
    assert "greedy tokens agree" in res.stdout
    diff = float(res.stdout.split("largest first-step logit difference ")[1].split()[0])
    print(f"\n[{exported.name}] adsc export --check: first-step logit |diff| {diff:.2e}")
    assert diff <= LOGIT_ATOL
    assert exported.manifest["model"]["source"] == str(Path(ckpt).resolve())
    err = _one_line_error(_adsc("export", "--model", str(ckpt), "--schedule", "1:2", "--out", str(exported.folder)))
    assert "already exists" in err and "--force" in err


def test_cli_errors_are_one_line(tmp_path, capsys):
    """Each bad input of ``adsc export`` is one line on stderr and exit status 2 (in-process, through
    the CLI's entry point; the subprocess case above shows the same for the installed command)."""
    from adsc_ext.cli import main

    def error(*argv):
        capsys.readouterr()  # drop what saving the checkpoints printed
        code = main(["export", *argv])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    ckpt = tmp_path / "ckpt"
    model = tiny_llava(grid_side=4, num_layers=2)
    model.config.vision_feature_select_strategy = "full"
    model.save_pretrained(ckpt)
    assert "vision_feature_select_strategy" in error("--model", str(ckpt), "--out", str(tmp_path / "o1"))
    ok = tmp_path / "ok"
    tiny_llava(grid_side=4, num_layers=2).save_pretrained(ok)
    assert "does not fit" in error("--model", str(ok), "--schedule", "4:2", "--out", str(tmp_path / "o2"))
    assert "bad schedule" in error("--model", str(ok), "--schedule", "x", "--out", str(tmp_path / "o3"))
    assert "no such checkpoint" in error("--model", str(tmp_path / "none"), "--out", str(tmp_path / "o4"))
    from transformers import LlamaConfig

    llama = tmp_path / "llama"
    LlamaConfig(num_hidden_layers=1).save_pretrained(llama)
    assert "model_type 'llava'" in error("--model", str(llama), "--out", str(tmp_path / "o5"))
    assert "--check-tokens" in error("--check-tokens", "0")
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3", "o4", "o5"))


def test_plugin_export_with_external_weights_runs(exported, tmp_path):
    """A plugin-compaction prefill whose weights live in a .data file (as every graph over 2 GB does)
    runs on ONNX Runtime: the runner does not pull the weights into the graph's bytes."""
    import shutil

    import onnx

    if exported.manifest["compaction"] != "plugin":
        pytest.skip("plugin compaction only")
    folder = tmp_path / "ext"
    shutil.copytree(exported.folder, folder)
    prefill = folder / GRAPH_FILES["prefill"]
    g = onnx.load(str(prefill))
    onnx.save(g, str(prefill), save_as_external_data=True, all_tensors_to_one_file=True,
              location=prefill.name + ".data")  # onnx's default threshold: weights out, small constants in
    from adsc_ext.export.runner import _with_plugin_reference

    data = (folder / (prefill.name + ".data")).stat().st_size
    assert len(_with_plugin_reference(prefill)) < data  # the weights are not in the bytes ORT is given
    reqs, _ = make_requests(exported.reference)
    want = exported.runner.generate(reqs, max_new_tokens=3)
    assert OnnxRunner(folder).generate(reqs, max_new_tokens=3) == want
