"""ADSC served by vLLM against vLLM's own LLaVA: throughput, KV blocks per request, and how many
requests run at once within one KV budget.

Each variant runs in its own process (vLLM loads its plugins once per process): ``vllm`` is
vLLM's own LLaVA (``VLLM_PLUGINS`` names no plugin) on the checkpoint without ``adsc_schedule``,
``adsc`` the plugin on the same checkpoint with it. Both get the same requests (one random image
and ``--text`` words each, ``--new-tokens`` greedy tokens, EOS ignored), all added at once, and the
same KV budget (``--kv-bytes``). The engine is stepped by hand so that every step's running
requests and KV blocks are read from the scheduler.

Models (nothing is downloaded):
- ``tiny24``: the random tiny LLaVA of ``tests/vllm_plugin/tiny_checkpoint.py`` (6 layers, hidden
  128) with a 24x24 image grid, schedule ``2:2,4:2``; fp32 weights saved in the checkpoint (the
  CPU setup of ``tests/vllm_plugin``);
- ``llava-1.5-7b``: LLaVA-1.5-7B's configuration with random weights (``load_format="dummy"``),
  schedule ``8:2,16:2,24:2`` (the GPU check, ``benchmarks/vllm_gpu.sh``).

    python benchmarks/vllm_bench.py --model tiny24 --requests 32 --new-tokens 64 \\
        --kv-bytes 12582912 --no-chunked-prefill --out result.json

Prints one JSON record (and writes it to ``--out``): per variant the wall time of the run,
generated tokens per second, the most requests running at once, the KV blocks each request held
(per KV-cache group, and in bytes), the blocks in the pool; and the ADSC / vLLM ratios.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "vllm_plugin"))  # tiny_checkpoint

MODELS = {
    # name: (default schedule, dtype, load_format)
    "tiny24": ("2:2,4:2", "float32", "auto"),
    "llava-1.5-7b": ("8:2,16:2,24:2", "bfloat16", "dummy"),
}


def build_checkpoints(model: str, schedule: str, root: Path) -> dict:
    """``{"vllm": dir, "adsc": dir}``: the same model without and with ``adsc_schedule``."""
    import tiny_checkpoint as tc

    out = {}
    for variant, sched in (("vllm", None), ("adsc", schedule)):
        path = root / f"{model}-{variant}"
        if not (path / "config.json").exists():
            if model == "tiny24":
                tc.build_checkpoint(path, schedule=sched, grid_side=24)
            else:
                from adsc_ext.testing import llava15_7b_config
                tc.save_config_checkpoint(path, llava15_7b_config(), schedule=sched)
        out[variant] = str(path)
    return out


def run_variant(args) -> dict:
    """One engine (this process), all requests at once, stepped by hand."""
    import tiny_checkpoint as tc
    from vllm import LLM, SamplingParams

    _, dtype, load_format = MODELS[args.model]
    kw = dict(
        model=args.checkpoint, dtype=args.dtype or dtype, load_format=load_format,
        max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        kv_cache_memory_bytes=args.kv_bytes, enable_chunked_prefill=args.chunked_prefill,
        limit_mm_per_prompt={"image": 1}, seed=0, enable_prefix_caching=False,
    )
    if args.max_num_batched_tokens:
        kw["max_num_batched_tokens"] = args.max_num_batched_tokens
    if args.block_size:
        kw["block_size"] = args.block_size
    if args.enforce_eager:
        kw["enforce_eager"] = True
    llm = LLM(**kw)
    engine = llm.llm_engine
    core = engine.engine_core.engine_core  # in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    sched = core.scheduler
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    pool = sched.kv_cache_manager.block_pool
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    words = list(range(5, 5 + args.text))

    def request(i):
        return {"prompt": tc.prompt(words, 1), "multi_modal_data": {"image": [tc.random_image(i)]}}

    # warm-up: one request through prefill and a few decode steps
    llm.generate([request(10_000)], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))

    for i in range(args.requests):
        engine.add_request(f"r{i}", request(i), params)
    peak_running, steps, generated = 0, 0, 0
    held = {}  # request -> most blocks held per group
    t0, c0 = time.perf_counter(), time.process_time()
    while engine.has_unfinished_requests():
        outs = engine.step()
        steps += 1
        peak_running = max(peak_running, len(sched.running))
        for g, m in enumerate(managers):
            for rid, blocks in m.req_to_blocks.items():
                row = held.setdefault(rid, [0] * len(managers))
                row[g] = max(row[g], len(blocks))
        generated += sum(len(o.outputs[0].token_ids) for o in outs if o.finished)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert generated == args.requests * args.new_tokens, generated
    specs = [m.kv_cache_spec for m in managers]
    layers = [len(g.layer_names) for g in sched.kv_cache_config.kv_cache_groups]
    # a group's block holds page_size_bytes for each of its layers
    page_bytes = [int(s.page_size_bytes) * n for s, n in zip(specs, layers)]
    per_req = sorted(held.values())[len(held) // 2] if held else []  # the median request
    return {
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),  # CPU time of this process (all threads): steadier on a shared CPU
        "steps": steps,
        "generated_tokens": generated,
        "tokens_per_s": round(generated / wall, 2),
        "peak_running_requests": peak_running,
        "kv_blocks_total": int(pool.num_gpu_blocks),
        "kv_groups": len(managers),
        "layers_per_group": layers,
        "block_size": int(specs[0].block_size) if specs else None,
        "blocks_per_request_by_group": per_req,
        "kv_bytes_per_request": sum(b * p for b, p in zip(per_req, page_bytes)),
        "async_scheduling": bool(engine.vllm_config.scheduler_config.async_scheduling),
        "chunked_prefill": bool(engine.vllm_config.scheduler_config.enable_chunked_prefill),
        "scheduler": type(sched).__name__,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(MODELS), default="tiny24")
    p.add_argument("--schedule", default=None, help="default: the model's (see the docstring)")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--text", type=int, default=63, help="words after the image in each prompt")
    p.add_argument("--kv-bytes", type=int, required=True, help="KV budget (kv_cache_memory_bytes)")
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--chunked-prefill", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enforce-eager", action="store_true",
                   help="both variants eager (ADSC always runs eager; vLLM's own may use CUDA graphs)")
    p.add_argument("--variants", default="vllm,adsc")
    p.add_argument("--workdir", default=os.environ.get("TMPDIR", "/tmp") + "/adsc-vllm-bench")
    p.add_argument("--out", default=None)
    p.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant here
    p.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.variant:
        print("RESULT " + json.dumps(run_variant(args)), flush=True)
        return 0

    schedule = args.schedule or MODELS[args.model][0]
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    ckpts = build_checkpoints(args.model, schedule, root)
    record = {
        "benchmark": "vllm_bench", "model": args.model, "schedule": schedule,
        "requests": args.requests, "new_tokens": args.new_tokens, "text_words": args.text,
        "kv_bytes": args.kv_bytes, "max_num_seqs": args.max_num_seqs,
        "chunked_prefill": args.chunked_prefill, "command": " ".join(sys.argv),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(), "results": {},
    }
    passthrough = [a for a in (argv if argv is not None else sys.argv[1:])]
    for variant in args.variants.split(","):
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        if variant == "vllm":
            env["VLLM_PLUGINS"] = "none-of-them"  # vLLM's own LLaVA
        cmd = [sys.executable, __file__, *passthrough, "--variant", variant,
               "--checkpoint", ckpts[variant]]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            record["results"][variant] = {"error": f"exit {proc.returncode}"}
            continue
        record["results"][variant] = json.loads(lines[-1][len("RESULT "):])
    res = record["results"]
    if all("tokens_per_s" in res.get(v, {}) for v in ("vllm", "adsc")):
        a, v = res["adsc"], res["vllm"]
        record["adsc_vs_vllm"] = {
            "throughput": round(a["tokens_per_s"] / v["tokens_per_s"], 3),
            "peak_running_requests": [a["peak_running_requests"], v["peak_running_requests"]],
            "kv_bytes_per_request": round(v["kv_bytes_per_request"] / max(a["kv_bytes_per_request"], 1), 3),
        }
    text = json.dumps(record, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if all("error" not in r for r in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
