"""``adsc bench``: ADSC against the baseline (same engine, empty schedule), side by side in one run.

Metrics (spec section 8): ``prefill_seconds_b8`` (time to first token, batch 8, 1 image + text),
``decode_tokens_per_s_b32`` (batch 32), ``peak_kv_bytes`` (the staged paged pools at their peak),
``compact_bandwidth_fraction`` (compaction kernel bandwidth / the device's measured copy
bandwidth), ``compact_fraction_of_prefill`` and, on CUDA, ``peak_gpu_memory_bytes``.

Each run writes ``<out-dir>/<device>-<date>.json`` (device, torch, cuda, date, command, records of
``{metric, unit, baseline, adsc, config}``) and a PNG plot next to it (skipped, with a message, when
matplotlib is not installed). ``--tiny`` runs the same code on a tiny random model (CPU: seconds);
the default is LLaVA-1.5-7B shapes with random weights (needs a large GPU).

The integrator wires it as a subcommand: ``add_arguments(parser)`` then ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Dict, List, Optional

import torch

__all__ = ["add_arguments", "run", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="a tiny random LLaVA (runs on a CPU in seconds)")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--schedule", default=None, help="default: 8:2,16:2,24:2 (tiny: 2:2,4:2,6:2)")
    parser.add_argument("--backend", default=None, help="attention backend: flash_attn | torch_varlen | sdpa (default: auto)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per request; default: %(default)s")
    parser.add_argument("--prefill-batch", type=int, default=8, help="default: %(default)s")
    parser.add_argument("--decode-batch", type=int, default=32, help="default: %(default)s")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode length (default: 256; tiny: 32)")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size; default: %(default)s")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (median), after one warm-up; default: %(default)s")
    parser.add_argument("--out-dir", default=os.path.join("benchmarks", "results"), help="default: %(default)s")
    parser.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


class _Progress:
    def __init__(self, total: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.n, self.total = 0, total
        if enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc="adsc bench", file=sys.stderr)
            except Exception:
                self.bar = None

    def step(self, what: str) -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.set_postfix_str(what)
            self.bar.update(1)
        elif self.enabled:
            print(f"[{self.n}/{self.total}] {what}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    from ..hf.tiny import llava15_7b_config, tiny_llava

    if tiny:
        return tiny_llava(seed=0, grid_side=24, patch_size=2, num_layers=8, hidden_size=64,
                          dtype=dtype).to(device)
    cfg = llava15_7b_config()
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype)
    return model.eval()


def _requests(model, n: int, text_tokens: int, images: int, seed: int) -> List[dict]:
    cfg = model.config
    tok = cfg.image_token_id
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.randint(3, min(tok, cfg.text_config.vocab_size), (text_tokens,), generator=g)
        ids = torch.cat([torch.tensor([1]), torch.full((images * side * side,), tok), text])
        pix = torch.randn(images, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, generator=g) if images else None
        out.append(dict(input_ids=ids, pixel_values=pix))
    return out


def _median_time(fn, repeats: int, device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _copy_bandwidth(device, nbytes: int, repeats: int) -> float:
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    y = torch.empty_like(x)
    t = _median_time(lambda: y.copy_(x), repeats, device)
    return 2 * x.numel() * 4 / t  # read + write


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu " + (platform.processor() or platform.machine() or "unknown")


def run(args) -> int:
    from ..ops import compact_tokens, stage_plan
    from .engine import Engine

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    schedule = args.schedule if args.schedule is not None else ("2:2,4:2,6:2" if args.tiny else "8:2,16:2,24:2")
    new_tokens = args.new_tokens if args.new_tokens is not None else (32 if args.tiny else 256)
    repeats = max(1, args.repeats)
    prog = _Progress(8, not args.no_progress)
    t_start = time.perf_counter()

    model = _build_model(args.tiny, device, dtype)
    prog.step("model built")
    engines = {name: Engine(model, sched, backend=args.backend, block_size=args.block_size)
               for name, sched in (("baseline", ""), ("adsc", schedule))}
    backend = engines["adsc"].backend
    base_cfg = dict(model="tiny-llava" if args.tiny else "llava-1.5-7b (random weights)", dtype=dtype_name,
                    schedule=schedule, backend=backend, block_size=args.block_size, text_tokens=args.text_tokens,
                    images_per_request=1, tokens_per_image=engines["adsc"].tokens_per_image, repeats=repeats)
    records: List[Dict[str, Any]] = []

    # ---- prefill (time to first token), batch 8 ---------------------------------------------
    reqs = _requests(model, args.prefill_batch, args.text_tokens, 1, seed=0)
    pre = {}
    for name, eng in engines.items():
        def once(eng=eng):
            eng.generate(reqs, max_new_tokens=1)
            return eng.stats["prefill_seconds"]

        once()
        pre[name] = statistics.median(once() for _ in range(repeats))
        prog.step(f"prefill {name}")
    records.append(dict(metric=f"prefill_seconds_b{args.prefill_batch}", unit="s", baseline=pre["baseline"],
                        adsc=pre["adsc"], config=dict(base_cfg, batch=args.prefill_batch,
                                                      speedup=pre["baseline"] / pre["adsc"])))

    # ---- decode throughput and peak KV bytes, batch 32 ----------------------------------------
    reqs = _requests(model, args.decode_batch, args.text_tokens, 1, seed=1)
    dec, kv, gpu_mem = {}, {}, {}
    for name, eng in engines.items():
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        eng.generate(reqs, max_new_tokens=new_tokens)
        dec[name] = eng.stats["decode_tokens"] / max(eng.stats["decode_seconds"], 1e-12)
        kv[name] = eng.stats["peak_kv_bytes"]
        if device.type == "cuda":
            gpu_mem[name] = torch.cuda.max_memory_allocated(device)
        prog.step(f"decode {name}")
    analytic = (engines["adsc"].analytic_kv_tokens(reqs, new_tokens)
                / engines["baseline"].analytic_kv_tokens(reqs, new_tokens))
    records.append(dict(metric=f"decode_tokens_per_s_b{args.decode_batch}", unit="tokens/s", baseline=dec["baseline"],
                        adsc=dec["adsc"], config=dict(base_cfg, batch=args.decode_batch, new_tokens=new_tokens,
                                                      speedup=dec["adsc"] / dec["baseline"])))
    records.append(dict(metric="peak_kv_bytes", unit="bytes", baseline=kv["baseline"], adsc=kv["adsc"],
                        config=dict(base_cfg, batch=args.decode_batch, new_tokens=new_tokens,
                                    ratio=kv["adsc"] / kv["baseline"], analytic_ratio=analytic,
                                    ratio_error=abs(kv["adsc"] / kv["baseline"] - analytic) / analytic)))
    if gpu_mem:
        records.append(dict(metric="peak_gpu_memory_bytes", unit="bytes", baseline=gpu_mem["baseline"],
                            adsc=gpu_mem["adsc"], config=dict(base_cfg, batch=args.decode_batch, new_tokens=new_tokens)))

    # ---- compaction bandwidth (first stage boundary of a batch-8 prefill) -----------------------
    reqs = _requests(model, args.prefill_batch, args.text_tokens, 1, seed=0)
    ids = torch.cat([r["input_ids"] for r in reqs]).to(device)
    cu = [0]
    for r in reqs:
        cu.append(cu[-1] + r["input_ids"].numel())
    cu_t = torch.tensor(cu, dtype=torch.int32, device=device)
    eng = engines["adsc"]
    plan_t = _median_time(lambda: stage_plan(eng.schedule, input_ids=ids, cu_seqlens=cu_t,
                                             image_token_id=eng.image_token_id, grid=eng.grid), repeats, device)
    plan = stage_plan(eng.schedule, input_ids=ids, cu_seqlens=cu_t, image_token_id=eng.image_token_id, grid=eng.grid)
    hidden_size = model.config.text_config.hidden_size
    # A wide row (hidden x 16 on tiny models) so that the kernel, not the launch, is measured.
    width = hidden_size if not args.tiny else hidden_size * 16
    x = torch.randn(ids.numel(), width, device=device, dtype=dtype)
    st = plan.stages[1] if len(plan.stages) > 1 else plan.stages[0]
    out = torch.empty(st.num_tokens, width, device=device, dtype=dtype)
    t_compact = _median_time(lambda: compact_tokens(x, st.index, out=out, check_index=False), max(repeats, 5), device)
    moved = 2 * out.numel() * out.element_size()
    compact_bw = moved / t_compact
    copy_bw = _copy_bandwidth(device, max(moved, 64 << 20 if device.type == "cuda" else 8 << 20), max(repeats, 5))
    prog.step("compaction")
    records.append(dict(metric="compact_bandwidth_fraction", unit="fraction of copy bandwidth", baseline=1.0,
                        adsc=compact_bw / copy_bw,
                        config=dict(base_cfg, compact_bytes_per_s=compact_bw, copy_bytes_per_s=copy_bw,
                                    rows=st.num_tokens, row_width=width, seconds=t_compact)))
    # all boundaries of one prefill (hidden at model width + cos/sin) plus the plan, against prefill time
    per_boundary = t_compact * (hidden_size / width)
    n_bound = len(plan.stages) - 1
    reindex = plan_t + n_bound * per_boundary * (1 + 2 * eng.head_dim / hidden_size)
    records.append(dict(metric="compact_fraction_of_prefill", unit="fraction", baseline=0.0,
                        adsc=reindex / pre["adsc"],
                        config=dict(base_cfg, plan_seconds=plan_t, boundaries=n_bound, estimate="from the kernel timing above")))
    prog.step("records")

    now = _dt.datetime.now(_dt.timezone.utc)
    dev_name = _device_name(device)
    result = dict(device=dev_name, torch=torch.__version__, cuda=torch.version.cuda, date=now.isoformat(timespec="seconds"),
                  command=" ".join(["adsc", "bench", *getattr(args, "argv", [])]) if hasattr(args, "argv")
                  else " ".join(sys.argv), wall_seconds=None, records=records)
    os.makedirs(args.out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dev_name).strip("-").lower() or "device"
    stem = os.path.join(args.out_dir, f"{slug}-{now.strftime('%Y%m%d-%H%M%S')}")
    result["wall_seconds"] = time.perf_counter() - t_start
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot = None if args.no_plot else _plot(records, stem + ".png", dev_name)
    prog.step("written")
    prog.close()
    _print_table(records)
    print(f"wrote {stem}.json" + (f" and {plot}" if plot else ""))
    return 0


def _plot(records, path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)", file=sys.stderr)
        return None
    names = [r["metric"] for r in records if r["baseline"]]
    ratios = [r["adsc"] / r["baseline"] for r in records if r["baseline"]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names, ratios, color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("ADSC / baseline")
    ax.set_title(f"adsc bench: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _print_table(records) -> None:
    print(f"{'metric':32} {'unit':28} {'baseline':>14} {'adsc':>14}")
    for r in records:
        print(f"{r['metric']:32} {r['unit']:28} {r['baseline']:>14.6g} {r['adsc']:>14.6g}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="adsc bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
