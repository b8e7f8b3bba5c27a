"""The lmms-eval plugin (``--model adsc``) on a local task, offline, with a tiny random LLaVA.

Two tasks the test writes (a few mosaics of random images, LLaVA-1.5 prompts): ``adsc_tiny_gen``
(``generate_until``, exact match) and ``adsc_tiny_mc`` (``multiple_choice``: loglikelihood, acc).
They run through lmms-eval's own CLI (a score is computed and written) and ``simple_evaluate``
(the per-item responses are compared with what the models give directly).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

# Runs in its own venv (tests/lmms_eval_plugin/ci_step.sh: lmms-eval on top of the main
# environment); where lmms-eval is not installed (the main suite) the module is skipped. (Not
# `importorskip("lmms_eval")`: a folder of that name on sys.path would pass as a namespace package.)
pytest.importorskip("lmms_eval.evaluator")

# Offline: the local tasks' data are JSON Lines files; nothing may reach a hub.
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

SCHEDULE = "2:2,4:2"  # the tiny checkpoint's 4x4 grid -> 4x2 -> 2x2
N_DOCS = 6

TASK_UTILS = '''
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip() == doc["answer"])}
'''

GEN_YAML = '''task: adsc_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
'''

MC_YAML = '''task: adsc_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_choice: ["yes", "no", "maybe"]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import numpy as np
    from PIL import Image

    from adsc_ext.testing.checkpoint import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("lmms")
    ckpt = build_tiny_checkpoint(root / "ckpt", schedule=SCHEDULE, hidden_size=64)
    tasks = root / "tasks"
    tasks.mkdir()
    docs = []
    for i in range(N_DOCS):
        img = root / f"img{i}.png"
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (18 + i, 16 + 2 * i, 3), dtype=np.uint8)).save(img)
        # prompts of two lengths in every batch: padding in ADSC's and FastV's batches
        docs.append({"image": str(img), "question": "What is it?" if i % 2 else "Is this a test image?",
                     "answer": "a", "label": i % 3})
    data = root / "docs.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (tasks / "utils.py").write_text(TASK_UTILS)
    (tasks / "adsc_tiny_gen.yaml").write_text(GEN_YAML.format(data=data))
    (tasks / "adsc_tiny_mc.yaml").write_text(MC_YAML.format(data=data))
    return root, ckpt, tasks, docs


_RUNS = {}


def evaluate(ckpt, tasks, model_args: str, batch_size: int = 4):
    """simple_evaluate on both tasks: (results, {doc: generated text}, {doc: [(logprob, greedy)] per choice});
    each configuration runs once per session."""
    key = (str(ckpt), model_args, batch_size)
    if key not in _RUNS:
        _RUNS[key] = _evaluate(ckpt, tasks, model_args, batch_size)
    return _RUNS[key]


def _evaluate(ckpt, tasks, model_args: str, batch_size: int):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    out = simple_evaluate(model="adsc", model_args=f"pretrained={ckpt},{model_args}",
                          tasks=["adsc_tiny_gen", "adsc_tiny_mc"], batch_size=batch_size, device="cpu",
                          task_manager=TaskManager(include_path=str(tasks)), log_samples=True)
    samples = out["samples"]
    gen = {s["doc_id"]: s["filtered_resps"][0] for s in samples["adsc_tiny_gen"]}
    mc = {s["doc_id"]: [r[0] for r in s["resps"]] for s in samples["adsc_tiny_mc"]}  # [(logprob, greedy)] per choice
    return out["results"], gen, mc


def reference(ckpt, docs, schedule, score: bool = True):
    """What transformers' LLaVA (with apply_adsc(schedule)) gives for each doc alone."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from adsc_ext import apply_adsc

    proc = AutoProcessor.from_pretrained(ckpt)
    model = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    if schedule is not None:
        apply_adsc(model, schedule)
    gen, mc = {}, {}
    for i, d in enumerate(docs):
        prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": d["question"]}]}],
                                          add_generation_prompt=True)
        img = [Image.open(d["image"]).convert("RGB")]
        enc = proc(text=prompt, images=img, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, eos_token_id=2, pad_token_id=2,
                                 suppress_tokens=[model.config.image_token_id])
        toks = out[0, enc["input_ids"].shape[1]:].tolist()
        toks = toks[: toks.index(2)] if 2 in toks else toks
        gen[i] = proc.tokenizer.decode(toks, skip_special_tokens=True)
        scores = []
        for choice in ("yes", "no", "maybe") if score else ():
            full = proc(text=prompt + " " + choice, images=img, return_tensors="pt")
            n = enc["input_ids"].shape[1]
            with torch.no_grad():
                logits = model(**full).logits[0].float()
            if schedule:  # ADSC logits are in the last stage's layout: map them back
                pytest.fail("reference() scores only the unmodified model")
            logp = logits.log_softmax(-1)
            ids = full["input_ids"][0]
            scores.append(sum(float(logp[p - 1, ids[p]]) for p in range(n, ids.numel())))
        mc[i] = scores
    return gen, mc


def test_cli_writes_a_score(setup, tmp_path):
    root, ckpt, tasks, _ = setup
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "adsc", "--model_args",
           f"pretrained={ckpt},method=adsc,schedule=2:2;4:2", "--tasks", "adsc_tiny_gen,adsc_tiny_mc",
           "--include_path", str(tasks), "--batch_size", "3", "--device", "cpu", "--output_path", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = list((tmp_path / "out").rglob("*results*.json"))
    assert files, list((tmp_path / "out").rglob("*"))
    results = json.loads(files[0].read_text())["results"]
    assert 0.0 <= results["adsc_tiny_gen"]["exact_match,none"] <= 1.0
    assert 0.0 <= results["adsc_tiny_mc"]["acc,none"] <= 1.0
    assert "Error during evaluation" not in r.stdout + r.stderr  # the CLI exits 0 on errors too


def test_empty_schedule_is_the_unmodified_model_item_by_item(setup):
    root, ckpt, tasks, docs = setup
    results, gen, mc = evaluate(ckpt, tasks, "method=none", batch_size=4)
    ref_gen, ref_mc = reference(ckpt, docs, None)
    assert gen == ref_gen
    for i in range(N_DOCS):
        assert [lp for lp, _ in mc[i]] == pytest.approx(ref_mc[i], abs=1e-4)
        assert all(math.isfinite(lp) and lp < 0 for lp, _ in mc[i])
    assert results["adsc_tiny_mc"]["acc,none"] == pytest.approx(
        sum(int(max(range(3), key=lambda c: ref_mc[i][c]) == d["label"]) for i, d in enumerate(docs)) / N_DOCS)


def test_adsc_batched_equals_alone(setup):
    """The plugin's batches (padding, several prompts) give each request what it gets alone."""
    root, ckpt, tasks, docs = setup
    _, gen4, mc4 = evaluate(ckpt, tasks, f'schedule="{SCHEDULE}"', batch_size=4)
    _, gen1, mc1 = evaluate(ckpt, tasks, "schedule=2:2;4:2", batch_size=1)
    ref_gen, _ = reference(ckpt, docs, SCHEDULE, score=False)
    assert gen4 == gen1 == ref_gen
    for i in range(N_DOCS):
        assert [lp for lp, _ in mc4[i]] == pytest.approx([lp for lp, _ in mc1[i]], abs=1e-4)
        assert [g for _, g in mc4[i]] == [g for _, g in mc1[i]]
    _, gen0, mc0 = evaluate(ckpt, tasks, "method=none", batch_size=4)
    assert any(abs(mc4[i][c][0] - mc0[i][c][0]) > 1e-3 for i in range(N_DOCS) for c in range(3))  # ADSC is on


def test_fastv(setup):
    """FastV keeping every image token is the unmodified model; at the schedule's budget it prunes."""
    root, ckpt, tasks, docs = setup
    _, gen_all, mc_all = evaluate(ckpt, tasks, "method=fastv,fastv_keep=16", batch_size=4)
    _, gen_none, mc_none = evaluate(ckpt, tasks, "method=none", batch_size=4)
    assert gen_all == gen_none
    for i in range(N_DOCS):
        assert [lp for lp, _ in mc_all[i]] == pytest.approx([lp for lp, _ in mc_none[i]], abs=1e-4)
    _, gen_b, mc_b = evaluate(ckpt, tasks, "method=fastv,budget=2:2;4:2", batch_size=4)
    from adsc_ext.baselines.fastv import budget_keep

    assert budget_keep(SCHEDULE, 6, 2, (4, 4)) < 16
    assert any(abs(mc_b[i][c][0] - mc_none[i][c][0]) > 1e-3 for i in range(N_DOCS) for c in range(3))


def test_fastv_batched_equals_alone(setup):
    """FastV's batches (prompts of two lengths, left-padded by its generation loop; right-padded
    continuations in one teacher-forced forward) give each request what it gets alone, and its
    answers and log-likelihoods are FastV's own (adsc_ext.baselines.FastV, request by request)."""
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from adsc_ext.baselines import FastV

    root, ckpt, tasks, docs = setup
    _, gen4, mc4 = evaluate(ckpt, tasks, "method=fastv,fastv_keep=5", batch_size=4)
    _, gen1, mc1 = evaluate(ckpt, tasks, "method=fastv,fastv_keep=5", batch_size=1)
    assert gen4 == gen1
    for i in range(N_DOCS):
        assert [lp for lp, _ in mc4[i]] == pytest.approx([lp for lp, _ in mc1[i]], abs=1e-4)
        assert [g for _, g in mc4[i]] == [g for _, g in mc1[i]]
    proc = AutoProcessor.from_pretrained(ckpt)
    fv = FastV(LlavaForConditionalGeneration.from_pretrained(ckpt).eval(), layer=2, keep=5)
    for i, d in enumerate(docs):
        prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": d["question"]}]}],
                                          add_generation_prompt=True)
        img = [Image.open(d["image"]).convert("RGB")]
        enc = proc(text=prompt, images=img, return_tensors="pt")
        toks = fv.generate([{"input_ids": enc["input_ids"][0], "pixel_values": enc["pixel_values"]}], 6, eos_token_id=2)[0]
        toks = toks[: toks.index(2)] if 2 in toks else toks
        assert gen1[i] == proc.tokenizer.decode(toks, skip_special_tokens=True)
        n = enc["input_ids"].shape[1]
        for c, choice in enumerate(("yes", "no", "maybe")):
            full = proc(text=prompt + " " + choice, images=img, return_tensors="pt")
            with torch.no_grad():
                out = fv.forward(full["input_ids"], full["attention_mask"], full["pixel_values"], last_prompt=[n - 1])
            logp = out.logits[0].float().log_softmax(-1)
            row = {int(p): j for j, p in enumerate(out.kept[0].tolist())}
            ids = full["input_ids"][0]
            want = sum(float(logp[row[p - 1], ids[p]]) for p in range(n, ids.numel()))
            assert mc1[i][c][0] == pytest.approx(want, abs=1e-4)


def test_fastv_samples_with_the_tasks_temperature(setup):
    """method=fastv honours a task's temperature (the generation loop samples) instead of refusing it."""
    from adsc_ext.integrations.lmms_eval.model import AdscLMM

    root, ckpt, tasks, docs = setup
    lm = AdscLMM(pretrained=str(ckpt), method="fastv", fastv_keep=5, device="cpu")
    from PIL import Image

    texts = [lm._prompt("What is it?", 1), lm._prompt("Is this a test image?", 1)]
    images = [[Image.open(docs[0]["image"]).convert("RGB")], [Image.open(docs[1]["image"]).convert("RGB")]]
    torch.manual_seed(0)
    greedy = lm._generate(texts, images, 8, 0.0, 1.0)
    outs = set()
    for seed in range(4):
        torch.manual_seed(seed)
        outs.add(tuple(lm._generate(texts, images, 8, 5.0, 1.0)))
    assert len(outs) > 1 and tuple(greedy) not in outs  # hot sampling varies with the seed and is not greedy


def test_bad_model_args(setup):
    root, ckpt, tasks, _ = setup
    from adsc_ext.integrations.lmms_eval.model import AdscLMM

    with pytest.raises(ValueError, match="method must be one of adsc, none, fastv"):
        AdscLMM(pretrained=str(ckpt), method="pdrop")
    with pytest.raises(ValueError, match="unknown model_args"):
        AdscLMM(pretrained=str(ckpt), shedule="2:2")
    from adsc_ext import ScheduleError

    with pytest.raises(ScheduleError):
        AdscLMM(pretrained=str(ckpt), schedule="9:2")


def test_fastv_budget_defaults_to_the_checkpoints_schedule(setup):
    from adsc_ext.baselines.fastv import budget_keep
    from adsc_ext.integrations.lmms_eval.model import AdscLMM

    root, ckpt, tasks, _ = setup
    want = budget_keep(SCHEDULE, 6, 2, (4, 4))
    assert AdscLMM(pretrained=str(ckpt), method="fastv").fastv.keep == want
    assert AdscLMM(pretrained=str(ckpt), method="fastv", schedule="2:4").fastv.keep == budget_keep("2:4", 6, 2, (4, 4))
    assert AdscLMM(pretrained=str(ckpt), method="fastv", fastv_keep=3).fastv.keep == 3


def test_registered_by_entry_point():
    from lmms_eval.models import get_model

    from adsc_ext.integrations.lmms_eval.model import AdscLMM

    assert get_model("adsc") is AdscLMM
