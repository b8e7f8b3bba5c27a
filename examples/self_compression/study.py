"""The self-compression study (spec section 9's claim, measured at a CPU's scale).

    pip install scikit-learn matplotlib                  # the digits and the plot
    python examples/self_compression/study.py            # the committed run (see the meta data's timings)
    python examples/self_compression/study.py --check    # run again and compare with the record

Data: 4x4 mosaics of scikit-learn's handwritten digits, to be read out digit by digit in place
(digits.py). Per seed, a small LLaVA-shaped model (CLIP tower 32 px / 8 px patches = 4x4 vision
tokens, one per digit; 6-layer LLaMA, hidden 64: ``MODEL``) is trained from scratch with ``adsc_ext.train`` (arm
``unmodified``), then, at each compression level:

- ``adsc_untuned``: the schedule applied to the trained model, no fine-tuning;
- ``adsc_tuned_lora`` / ``adsc_tuned_full``: fine-tuned with the schedule in place (``adsc train``'s
  loop, LoRA or full);
- ``fastv_untuned`` / ``fastv_tuned``: FastV pruning after layer 2 at the schedule's token budget
  (``adsc_ext.baselines.fastv.budget_keep``), untuned or LoRA-tuned through FastV's pruning
  (``adsc_ext.train.fastv``) with the same recipe as ``adsc_tuned_lora``.

Accuracy is exact match of the greedy answer on held-out mosaics; TFLOPs (decoder, one prefill)
and KV bytes (2-byte values) come from ``adsc plan``'s accounting for the test prompts' mean
length. The record (``benchmarks/results/self_compression.json``) is a list of
``{"arm", "schedule" | "budget", "seed", "accuracy", "tflops", "kv_bytes"}``; the run's settings,
timings and per-question accuracies go to ``self_compression.meta.json`` beside it, and a plot to
``self_compression.png``.

Everything runs in one thread with deterministic algorithms and fixed seeds, so a rerun on the
same machine gives the same numbers; ``--check`` accepts a rerun whose every accuracy is within
``--tolerance`` (default 0.03) of the record's (other CPUs may round differently).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
REPO = HERE.parent.parent
RESULTS = REPO / "benchmarks" / "results"

LEVELS = ("2:2", "2:2,3:2,4:2", "2:4")
FASTV_LAYER = 2
MODEL = dict(grid_side=4, patch_size=8, num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2,
             vision_hidden=64, vision_layers=2, max_positions=256)
ARMS = ("unmodified", "adsc_untuned", "adsc_tuned_lora", "adsc_tuned_full", "fastv_untuned", "fastv_tuned")


def _quiet():
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore")


# ---- evaluation --------------------------------------------------------------------------------


def _load(path, attn="sdpa"):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation=attn).eval()
    return model, AutoProcessor.from_pretrained(path)


def _prompt(processor, row) -> str:
    """The question of a row as the model sees it at inference (the training data's own conversion)."""
    from adsc_ext.train import to_messages

    return processor.apply_chat_template(to_messages(row["conversations"][:1]), add_generation_prompt=True)


def _batches(rows, folder: Path, processor, size: int):
    """Test prompts grouped by question kind (one prompt length per batch, as in the recorded run)."""
    from PIL import Image

    for kind in sorted({r["kind"] for r in rows}):
        group = [r for r in rows if r["kind"] == kind]
        for i in range(0, len(group), size):
            chunk = group[i:i + size]
            texts = [_prompt(processor, r) for r in chunk]
            images = [Image.open(folder / "images" / r["image"]).convert("RGB") for r in chunk]
            enc = processor(text=texts, images=images, return_tensors="pt")
            yield chunk, enc


def score(got: str, want: str) -> float:
    """The fraction of the mosaic's digits read right, each in its place (spaces between rows ignored)."""
    g, w = got.replace(" ", ""), want.replace(" ", "")
    return sum(a == b for a, b in zip(g, w)) / len(w)


def evaluate(path, rows, folder: Path, method: str, schedule: str = "", keep: Optional[int] = None,
             batch: int = 50) -> Dict[str, float]:
    """Accuracy of the greedy answers: the mean over the test mosaics of the fraction of their digits
    read right (:func:`score`); overall and per question kind."""
    import torch

    from adsc_ext import apply_adsc
    from adsc_ext.baselines import FastV

    model, processor = _load(path)
    eos = processor.tokenizer.eos_token_id
    if method == "adsc":
        apply_adsc(model, schedule)
    else:
        fastv = FastV(model, layer=FASTV_LAYER, keep=keep)
    right: Dict[str, List[float]] = {}
    n_new = max(len(processor.tokenizer(" " + r["answer"], add_special_tokens=False)["input_ids"]) for r in rows) + 2
    with torch.no_grad():
        for chunk, enc in _batches(rows, folder, processor, batch):
            if method == "adsc":
                out = model.generate(**enc, max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=eos)
                new = out[:, enc["input_ids"].shape[1]:]
            else:
                new = fastv.generate(enc["input_ids"], enc["pixel_values"], max_new_tokens=n_new)
            for r, toks in zip(chunk, new.tolist()):
                toks = toks[: toks.index(eos)] if eos in toks else toks
                got = processor.tokenizer.decode(toks, skip_special_tokens=True).strip()
                right.setdefault(r["kind"], []).append(score(got, r["answer"]))
    acc = {k: sum(v) / len(v) for k, v in right.items()}
    acc["all"] = sum(sum(v) for v in right.values()) / sum(len(v) for v in right.values())
    return acc


# ---- accounting ---------------------------------------------------------------------------------


def costs(path, rows, processor, schedule: str = "", fastv_keep: Optional[int] = None):
    """(decoder TFLOPs of one prefill, KV bytes) for the test prompts' mean length, from ``adsc plan``'s
    accounting; FastV: full layers before ``FASTV_LAYER``, text + ``keep`` image tokens after."""
    from adsc_ext.accounting import layer_flops, layer_kv_bytes, load_model_spec, plan_report

    spec = load_model_spec(path)
    n_text = round(sum(len(processor.tokenizer(_prompt(processor, r))["input_ids"]) - 1 for r in rows) / len(rows))
    if fastv_keep is None:
        rep = plan_report(spec, schedule, n_text, 1)
        return rep["adsc_flops"] / 1e12, rep["adsc_kv_bytes"]
    full, pruned = n_text + spec.tokens_per_image, n_text + fastv_keep
    layers = [full] * FASTV_LAYER + [pruned] * (spec.num_layers - FASTV_LAYER)
    return sum(layer_flops(spec, n) for n in layers) / 1e12, sum(layer_kv_bytes(spec, n) for n in layers)


# ---- the study -----------------------------------------------------------------------------------


def run(args) -> List[dict]:
    import torch

    from adsc_ext.baselines.fastv import budget_keep
    from adsc_ext.testing.checkpoint import build_tiny_checkpoint
    from adsc_ext.train import TrainConfig, train
    from adsc_ext.train.fastv import fastv_forward
    from digits import make_dataset

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    _quiet()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _, test = make_dataset(work / "data", args.n_train, args.n_test, data_seed=0)
    data = dict(data=str(work / "data" / "train.json"), image_folder=str(work / "data" / "images"))
    records, meta_acc, timings = [], {}, {}
    from adsc_ext.train import InstructDataset, load_records

    def dataset_for(path):  # one tokenized training set for every run (same processor and grid)
        if "ds" not in cache:
            _, proc = _load(path)
            side = MODEL["grid_side"]
            cache["ds"] = InstructDataset(load_records(data["data"]), data["image_folder"], proc,
                                          tokens_per_image=side * side, image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"),
                                          max_length=MODEL["max_positions"])
        return cache["ds"]

    cache = {}
    quiet = dict(progress=False, overwrite=True, gradient_checkpointing=False, log_every=10)
    say = lambda msg: print(f"[{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)  # noqa: E731

    def record(arm, key, level, seed, acc, path, processor, keep=None):
        tflops, kv = costs(path, test, processor, "" if arm == "unmodified" else level, keep)
        records.append({"arm": arm, key: level, "seed": seed, "accuracy": round(acc["all"], 4),
                        "tflops": round(tflops, 9), "kv_bytes": int(kv)})
        meta_acc[f"{arm}|{level}|{seed}"] = {k: round(v, 4) for k, v in acc.items()}
        say(f"seed {seed} {arm:16s} {key} {level!r:15s} accuracy {acc['all']:.3f} "
            + " ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "all"))

    for seed in args.seeds:
        t0 = time.perf_counter()
        init = build_tiny_checkpoint(work / f"init-{seed}", seed=seed, **MODEL)
        base = work / f"base-{seed}"
        if not (args.reuse and (base / "config.json").exists()):
            train(TrainConfig(model=str(init), output=str(base), schedule="", full=True, tune_vision=True,
                              max_steps=args.base_steps, per_device_batch_size=args.batch, lr=args.base_lr,
                              projector_lr=None, warmup_ratio=0.05, seed=seed, **data, **quiet),
                  log=say, dataset=dataset_for(init))
        timings[f"base-{seed}"] = time.perf_counter() - t0
        _, processor = _load(base)
        record("unmodified", "schedule", "", seed, evaluate(base, test, work / "data", "adsc", ""), base, processor)
        for level in args.levels:
            keep = budget_keep(level, MODEL["num_layers"], FASTV_LAYER, (MODEL["grid_side"],) * 2)
            record("adsc_untuned", "schedule", level, seed, evaluate(base, test, work / "data", "adsc", level), base, processor)
            record("fastv_untuned", "budget", level, seed, evaluate(base, test, work / "data", "fastv", keep=keep),
                   base, processor, keep)
            ft = dict(model=str(base), max_steps=args.ft_steps, per_device_batch_size=args.ft_batch, seed=seed,
                      warmup_ratio=0.1, **data, **quiet)
            lora = dict(lora_r=16, lora_alpha=32, lora_dropout=0.0, lr=args.lora_lr, projector_lr=args.lora_lr / 10)
            for arm in ("adsc_tuned_lora", "adsc_tuned_full", "fastv_tuned"):
                t0 = time.perf_counter()
                out = work / f"{arm}-{level.replace(':', '_').replace(',', '-')}-{seed}"
                if arm == "adsc_tuned_full":
                    cfg = TrainConfig(output=str(out), schedule=level, full=True, lr=args.full_lr,
                                      projector_lr=args.full_lr / 10, **ft)
                else:
                    cfg = TrainConfig(output=str(out), schedule=level if arm != "fastv_tuned" else "", **lora, **ft)
                if not (args.reuse and (out / "config.json").exists()):
                    train(cfg, log=lambda m: None, forward=fastv_forward(FASTV_LAYER, keep) if arm == "fastv_tuned" else None,
                          dataset=dataset_for(base))
                timings[out.name] = time.perf_counter() - t0
                if arm == "fastv_tuned":
                    record(arm, "budget", level, seed, evaluate(out, test, work / "data", "fastv", keep=keep), base,
                           processor, keep)
                else:
                    record(arm, "schedule", level, seed, evaluate(out, test, work / "data", "adsc", level), base, processor)
    timings["total"] = time.perf_counter() - t_start
    return records, meta_acc, timings


def summary(records: List[dict]) -> List[dict]:
    """Mean and spread (min, max) of the accuracy over seeds, per arm and level."""
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["arm"], r.get("schedule", r.get("budget"))), []).append(r)
    out = []
    for (arm, level), rs in groups.items():
        accs = [r["accuracy"] for r in rs]
        out.append({"arm": arm, "level": level, "mean": sum(accs) / len(accs), "min": min(accs), "max": max(accs),
                    "tflops": rs[0]["tflops"], "kv_bytes": rs[0]["kv_bytes"], "seeds": len(rs)})
    return out


def table(records: List[dict]) -> str:
    rows = summary(records)
    base = next((r for r in rows if r["arm"] == "unmodified"), None)
    lines = ["| level | arm | accuracy (mean of seeds) | min - max | of unmodified | decoder MFLOPs | KV bytes |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(rows, key=lambda r: (r["level"] != "", r["level"], ARMS.index(r["arm"]))):
        rel = f"{100 * r['mean'] / base['mean']:.0f} %" if base and base["mean"] else "-"
        lines.append(f"| {r['level'] or '(none)'} | {r['arm']} | {r['mean']:.3f} | {r['min']:.3f} - {r['max']:.3f} | "
                     f"{rel} | {r['tflops'] * 1e6:.1f} | {r['kv_bytes'] / 1024:.1f} KiB |")
    return "\n".join(lines)


def plot(records: List[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary(records)
    base = next(r for r in rows if r["arm"] == "unmodified")
    levels = [lv for lv in LEVELS if any(r["level"] == lv for r in rows)]
    arms = [a for a in ARMS[1:] if any(r["arm"] == a for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    width = 0.8 / len(arms)
    for i, arm in enumerate(arms):
        got = [next((r for r in rows if r["arm"] == arm and r["level"] == lv), None) for lv in levels]
        xs = [j + (i - (len(arms) - 1) / 2) * width for j in range(len(levels))]
        means = [g["mean"] if g else 0 for g in got]
        err = [[g["mean"] - g["min"] if g else 0 for g in got], [g["max"] - g["mean"] if g else 0 for g in got]]
        ax.bar(xs, means, width, yerr=err, capsize=2, label=arm)
    ax.axhline(base["mean"], color="k", linestyle="--", linewidth=1, label=f"unmodified ({base['mean']:.2f})")
    ax.set_xticks(range(len(levels)))
    ax.set_xticklabels([f"{lv}\n{100 * (1 - next(r['tflops'] for r in rows if r['level'] == lv and r['arm'] == 'adsc_untuned') / base['tflops']):.0f} % fewer FLOPs"
                        for lv in levels])
    ax.set_ylabel("accuracy (held-out mosaics)")
    ax.set_ylim(0, 1)
    ax.set_title("ADSC self-compression vs FastV at the same token budget (mean of seeds, min-max)")
    ax.legend(fontsize=8, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="self_compression_work", help="scratch folder (data, checkpoints)")
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--levels", type=lambda s: s.split(";"), default=list(LEVELS), help="';'-separated schedules")
    p.add_argument("--n-train", type=int, default=4000)
    p.add_argument("--n-test", type=int, default=200)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--base-steps", type=int, default=300)
    p.add_argument("--base-lr", type=float, default=3e-3)
    p.add_argument("--ft-steps", type=int, default=50)
    p.add_argument("--ft-batch", type=int, default=16)
    p.add_argument("--lora-lr", type=float, default=2e-3)
    p.add_argument("--full-lr", type=float, default=3e-4)
    p.add_argument("--reuse", action="store_true", help="keep checkpoints already in --work (an interrupted run)")
    p.add_argument("--out", default=str(RESULTS), help="where the record, its meta data and the plot go")
    p.add_argument("--check", action="store_true",
                   help="do not write: compare the run with the record in --out within --tolerance")
    p.add_argument("--tolerance", type=float, default=0.03)
    args = p.parse_args(argv)

    records, meta_acc, timings = run(args)
    out = Path(args.out)
    if args.check:
        want = json.loads((out / "self_compression.json").read_text())
        key = lambda r: (r["arm"], r.get("schedule", r.get("budget")), r["seed"])  # noqa: E731
        got = {key(r): r for r in records}
        bad = [(key(w), w["accuracy"], got[key(w)]["accuracy"]) for w in want
               if key(w) in got and abs(got[key(w)]["accuracy"] - w["accuracy"]) > args.tolerance]
        missing = [key(w) for w in want if key(w) not in got]
        print(f"check: {len(want) - len(missing)} records compared, {len(bad)} outside +-{args.tolerance}")
        for b in bad:
            print(f"  {b[0]}: record {b[1]:.4f}, this run {b[2]:.4f}")
        return 1 if bad else 0
    import torch
    import transformers

    out.mkdir(parents=True, exist_ok=True)
    (out / "self_compression.json").write_text(json.dumps(records, indent=1) + "\n")
    meta = {
        "command": "python examples/self_compression/study.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average_at_end": os.getloadavg()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "check", "tolerance")},
        "model": MODEL, "fastv_layer": FASTV_LAYER, "kv_bytes_dtype_bytes": 2,
        "accuracy_by_question": meta_acc, "seconds": {k: round(v, 1) for k, v in timings.items()},
    }
    (out / "self_compression.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    plot(records, out / "self_compression.png")
    print(table(records))
    print(f"wrote {out / 'self_compression.json'} in {timings['total'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
