"""``adsc train`` end to end on a tiny checkpoint (real tokenizer, processor and chat template) and
tiny local data: one process, two gloo processes (torchrun), resume, and the output checkpoint
through ``adsc generate``, the engine and ``adsc export``.

Each run is a child process with one thread (the runs are what users launch, and Accelerate's
process state is per process). About 90 s on 2 cores.
"""

import json
import math
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("accelerate")

from adsc_ext.testing.checkpoint import build_tiny_checkpoint  # noqa: E402

from train_fixtures import SCHEDULE, load_weights, make_data, max_diff, run, train_cmd  # noqa: E402

#: Same global batch, same data, same initial weights: the runs differ only in how fp32 sums are
#: split (per process / per micro-batch). Measured: 3e-8 after 2 steps at lr 1e-3; 1e-5 leaves
#: room for other BLAS builds while catching any real difference (one sample dropped or counted
#: twice, a loss averaged per process instead of over the global batch, moves weights by ~1e-4).
WEIGHTS_ATOL = 1e-5


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ckpt = build_tiny_checkpoint(root / "ckpt", schedule=SCHEDULE)
    data = make_data(root)
    return root, ckpt, data


@pytest.fixture(scope="module")
def one(setup):
    """The reference run: 1 process, batch 4, 2 steps (8 samples: one epoch), through `adsc train`."""
    root, ckpt, data = setup
    out = root / "one"
    r = run(train_cmd(ckpt, data, out, "--max-steps", "2", "--per-device-batch-size", "4", "--save-adapter",
                      "--save-steps", "1", module=False))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "schedule '2:2,4:2', LoRA fine-tuning" in r.stdout
    return out


def test_output_is_a_checkpoint_with_its_schedule(setup, one):
    _, ckpt, _ = setup
    cfg = json.loads((one / "config.json").read_text())
    assert cfg["adsc_schedule"] == SCHEDULE
    got, base = load_weights(one), load_weights(ckpt)
    assert got.keys() == base.keys()  # LoRA merged: the checkpoint's own weight names, nothing added
    changed = {k for k in got if not torch.equal(got[k], base[k])}
    assert any("language_model" in k and "q_proj" in k for k in changed)  # LoRA merged into the LLM
    assert any("multi_modal_projector" in k for k in changed)  # the projector is trained
    assert not any("vision_tower" in k for k in changed)  # the tower is frozen
    assert not any("embed_tokens" in k or "norm" in k for k in changed)  # LoRA touches nothing else
    for f in ("processor_config.json", "tokenizer.json", "chat_template.jinja", "adapter/adapter_config.json",
              "adapter/adapter_model.safetensors", "checkpoints/step-1/trainer_state.json", "train_args.json"):
        assert (one / f).is_file(), f
    log = [json.loads(line) for line in (one / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    assert log[-1]["epoch"] == 1.0


def test_output_runs_in_generate_engine_and_export(setup, one, tmp_path):
    from transformers import LlavaForConditionalGeneration

    from adsc_ext import apply_adsc
    from adsc_ext.runtime import Engine

    root = setup[0]
    r = run([sys.executable, "-m", "adsc_ext", "generate", "--model", str(one), "--image", str(root / "images" / "0.png"),
             "--prompt", "What is it?", "--max-new-tokens", "4"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"schedule: '{SCHEDULE}'" in r.stdout

    model = LlavaForConditionalGeneration.from_pretrained(one).eval()
    apply_adsc(model)  # the schedule saved in the checkpoint
    assert model.config.adsc_schedule == SCHEDULE
    ids = torch.tensor([1] + [80, 81] + [259] * 16 + [82, 83, 84])
    pix = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    engine_tokens = Engine(model).generate([{"input_ids": ids, "pixel_values": pix}], max_new_tokens=5)[0]
    with torch.no_grad():
        hf = model.generate(input_ids=ids[None], attention_mask=torch.ones(1, ids.numel(), dtype=torch.long),
                            pixel_values=pix, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0,
                            suppress_tokens=[259])
    assert engine_tokens == hf[0, ids.numel():].tolist()

    pytest.importorskip("onnxruntime")
    r = run([sys.executable, "-m", "adsc_ext", "export", "--model", str(one), "--out", str(tmp_path / "onnx"),
             "--check", "--check-tokens", "3"])
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"schedule '{SCHEDULE}'" in r.stdout and "greedy tokens agree" in r.stdout


def test_two_gloo_processes_equal_one(setup, one):
    """torchrun, 2 processes x batch 2 = the reference's global batch of 4 (Accelerate's DDP over gloo)."""
    root, ckpt, data = setup
    out = root / "two"
    cmd = train_cmd(ckpt, data, out, "--max-steps", "2", "--per-device-batch-size", "2")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *cmd[1:]]
    r = run(cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 process(es) x batch 2" in r.stdout and "MULTI_CPU" in r.stdout
    ref = load_weights(one)
    got = load_weights(out)
    assert max_diff(got, ref) <= WEIGHTS_ATOL
    assert max_diff(got, load_weights(ckpt)) > 100 * WEIGHTS_ATOL  # the runs did move the weights
    assert [json.loads(x)["loss"] for x in (out / "train_log.jsonl").read_text().splitlines()] == pytest.approx(
        [json.loads(x)["loss"] for x in (one / "train_log.jsonl").read_text().splitlines()], abs=1e-5)


def test_resume_with_accumulation_equals_the_uninterrupted_run(setup, one):
    """Step 2 resumed from the reference's step-1 state, as 2 micro-batches of 2 accumulated: the
    reference's weights (the data order, optimizer, schedule and loss normalisation all carry over)."""
    root, ckpt, data = setup
    out = root / "resumed"
    r = run(train_cmd(ckpt, data, out, "--max-steps", "2", "--per-device-batch-size", "2",
                      "--gradient-accumulation-steps", "2", "--resume", str(one / "checkpoints" / "step-1")))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed at step 1" in r.stdout
    assert max_diff(load_weights(out), load_weights(one)) <= WEIGHTS_ATOL
    assert [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()] == [2]


@pytest.mark.parametrize("args, message", [
    (["--model", "{root}/nope"], "--model {root}/nope: not a checkpoint directory"),
    (["--data", "{root}/nope.json"], "--data {root}/nope.json: no such file"),
    (["--schedule", "9:2"], "schedule '9:2'"),
    (["--schedule", "2:3"], "factor"),
    (["--output", "{root}/ckpt"], "already holds a checkpoint; pass --overwrite or --resume"),
    (["--per-device-batch-size", "0"], "--per-device-batch-size must be >= 1, got 0"),
    (["--resume", "{root}"], "not an adsc train checkpoint"),
    (["--image-folder", "{root}/nope"], "--image-folder {root}/nope: no such directory"),
])
def test_usage_errors_are_one_line(setup, args, message, capsys):
    from adsc_ext.cli import main

    root, ckpt, data = setup
    opts = {"--model": str(ckpt), "--data": str(data), "--output": str(root / "unused"),
            "--image-folder": str(root / "images")}
    opts.update({k: v.format(root=root) for k, v in zip(args[::2], args[1::2])})
    argv = ["train"] + [x for kv in opts.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("adsc train: error:"), err
    assert message.format(root=root) in err


def test_module_entry_point_errors_are_one_line_too(setup, tmp_path, capsys):
    """`python -m adsc_ext.train` (what `accelerate launch -m` runs) reports every AdscError in one
    line, as `adsc train` does: here a LLaVA config without the vision facts the plan needs."""
    import json

    from adsc_ext.train.cli import main

    root, ckpt, data = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"],
                                                 "text_config": {"model_type": "llama"}, "vision_config": {}}))
    argv = ["--model", str(bad), "--data", str(data), "--output", str(tmp_path / "out"),
            "--image-folder", str(root / "images")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("adsc train: error:"), err
