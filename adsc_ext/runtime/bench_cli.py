"""``adsc bench``: ADSC against its baselines, side by side in one run (spec section 8).

What runs (LLaVA-1.5-7B configuration, random weights, bf16 on CUDA; ``--tiny``: a tiny random
LLaVA, fp32 on the CPU, the same code):

- **engine** (:class:`adsc_ext.runtime.Engine`, varlen prefill + staged paged KV cache), empty
  schedule (baseline) and the ADSC schedule, at every ``--batches`` size: time to first token
  (``prefill_seconds_b<B>``), decode throughput over ``--new-tokens`` tokens
  (``decode_tokens_per_s_b<B>``), peak KV-cache bytes (``peak_kv_bytes``, against the analytic
  ratio) and, on CUDA, peak GPU memory;
- **Hugging Face** ``generate()`` with SDPA, unmodified model vs ``apply_adsc``
  (``hf_prefill_seconds_b<B>``, ``hf_decode_tokens_per_s_b<B>``);
- **FastV-style pruning** (:mod:`adsc_ext.baselines.fastv`: attention scores after layer 2, eager
  attention) at the ADSC schedule's token budget, against the engine's ADSC prefill
  (``prefill_seconds_b<B>_vs_fastv``);
- **kernels**: compaction and paged KV writes against the device's copy bandwidth measured at the
  same size (``compact_bandwidth_fraction``, ``kv_write_bandwidth_fraction``), and the whole
  re-indexing of one prefill (plan + every stage boundary's compactions) as a fraction of the
  ADSC prefill (``reindex_fraction_of_prefill``).

Every run writes ``<out-dir>/<device>-<date>.json``: ``device``, ``torch``, ``cuda``, ``date``,
``command``, ``records`` (``{metric, unit, baseline, adsc, config}``) and ``targets`` (spec
section 8, each with the measured value and whether it is met; they apply to the full model on an
H100 only), and a PNG plot next to it (skipped, with a message, without matplotlib).
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
from typing import Any, Callable, Dict, List, Optional

import torch

__all__ = ["add_arguments", "run", "main"]


def _int_list(text: str) -> List[int]:
    try:
        out = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"expected batch sizes >= 1, got {text!r}")
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tiny", action="store_true", help="a tiny random LLaVA (runs on a CPU in seconds)")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda when available)")
    parser.add_argument("--dtype", default=None, help="bfloat16 | float16 | float32 (default: bf16 on CUDA, fp32 on CPU)")
    parser.add_argument("--schedule", default=None, help="default: 8:2,16:2,24:2 (tiny: 2:2,4:2,6:2)")
    parser.add_argument("--backend", default=None, help="attention backend: flash_attn | torch_varlen | sdpa (default: auto)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens per request; default: %(default)s")
    parser.add_argument("--batches", type=_int_list, default=[1, 8, 32], help="engine batch sizes; default: 1,8,32")
    parser.add_argument("--prefill-batch", type=int, default=8, help="batch of the prefill target, HF and FastV runs; default: %(default)s")
    parser.add_argument("--decode-batch", type=int, default=32, help="batch of the decode target and HF decode; default: %(default)s")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode length (default: 256; tiny: 32)")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size; default: %(default)s")
    parser.add_argument("--fastv-layer", type=int, default=2, help="FastV's pruning layer K; default: %(default)s")
    parser.add_argument("--no-hf", action="store_true", help="skip the Hugging Face generate() runs")
    parser.add_argument("--no-fastv", action="store_true", help="skip the FastV baseline")
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


# ---- timing ----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_time(fn: Callable[[], Any], repeats: int, device) -> float:
    """Median wall time of ``fn`` (synchronised) over ``repeats`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _kernel_time(fn: Callable[[], Any], device, iters: int = 50, repeats: int = 5) -> float:
    """Seconds per call of a short kernel: ``iters`` back-to-back calls timed together (CUDA events
    on a GPU), median of ``repeats``."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            # Keep the GPU busy while the launches are queued, so that the events time the kernels
            # back to back, not the host's launch rate (a short kernel beats a Python op's launch).
            torch.cuda._sleep(50_000_000)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def _copy_bandwidth(device, nbytes: int) -> float:
    """Bytes moved per second (read + write) by ``Tensor.copy_`` of ``nbytes``."""
    x = torch.ones(max(1, nbytes // 4), dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / _kernel_time(lambda: y.copy_(x), device)


def _release(engines, device) -> None:
    """Drop the engines' last KV pools and return cached blocks, so that the next peak is its own."""
    import gc

    for e in engines:
        e.last_pool = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


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


# ---- the model and the prompts -----------------------------------------------------------------------
def _build_model(tiny: bool, device: torch.device, dtype: torch.dtype):
    from transformers import LlavaForConditionalGeneration

    from ..hf.tiny import llava15_7b_config, tiny_llava

    if tiny:
        return tiny_llava(seed=0, grid_side=24, patch_size=2, num_layers=8, hidden_size=64,
                          attn_implementation="sdpa", dtype=dtype).to(device)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(llava15_7b_config(), attn_implementation="sdpa", dtype=dtype)
    return model.eval()


def _requests(model, n: int, text_tokens: int, seed: int) -> List[dict]:
    """``n`` requests of BOS + one image + ``text_tokens`` random text tokens (equal lengths)."""
    cfg = model.config
    tok = cfg.image_token_id
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.randint(3, min(tok, cfg.text_config.vocab_size), (text_tokens,), generator=g)
        ids = torch.cat([torch.tensor([1]), torch.full((side * side,), tok), text])
        size = cfg.vision_config.image_size
        out.append(dict(input_ids=ids, pixel_values=torch.randn(1, 3, size, size, generator=g)))
    return out


def _padded(reqs: List[dict], device, dtype):
    """The requests as one HF batch (equal lengths: no padding)."""
    ids = torch.stack([r["input_ids"] for r in reqs]).to(device)
    pix = torch.cat([r["pixel_values"] for r in reqs]).to(device, dtype)
    return ids, pix


# ---- the run -----------------------------------------------------------------------------------------
def run(args) -> int:
    from ..accounting import plan_report, spec_from_config
    from ..baselines import FastV
    from ..hf import apply_adsc, remove_adsc
    from ..ops import compact_tokens, stage_plan, write_paged_kv
    from .engine import Engine

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    schedule = args.schedule if args.schedule is not None else ("2:2,4:2,6:2" if args.tiny else "8:2,16:2,24:2")
    new_tokens = args.new_tokens if args.new_tokens is not None else (32 if args.tiny else 256)
    repeats = max(1, args.repeats)
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be >= 2 (decode throughput needs a decode step), got {new_tokens}")
    batches = sorted(set(args.batches) | {args.prefill_batch, args.decode_batch})
    steps = 2 + 2 * len(batches) * 2 + (0 if args.no_hf else 2) + (0 if args.no_fastv else 1) + 1
    prog = _Progress(steps, not args.no_progress)
    t_start = time.perf_counter()

    model = _build_model(args.tiny, device, dtype)
    prog.step("model built")
    engines = {name: Engine(model, sched, backend=args.backend, block_size=args.block_size)
               for name, sched in (("baseline", ""), ("adsc", schedule))}
    eng = engines["adsc"]
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report = plan_report(spec_from_config(model.config.to_dict(), "model"), schedule, 1 + args.text_tokens, 1,
                         dtype_bytes=torch.empty((), dtype=dtype).element_size())
    base_cfg = dict(model="tiny-llava" if args.tiny else "llava-1.5-7b (random weights)", dtype=dtype_name,
                    schedule=schedule, backend=eng.backend, decode_path=eng.attention.decode_path,
                    block_size=args.block_size,
                    prompt=f"1 BOS + {eng.tokens_per_image} image + {args.text_tokens} text tokens",
                    repeats=repeats)
    records: List[Dict[str, Any]] = []

    def record(metric, unit, baseline, adsc, **config):
        records.append(dict(metric=metric, unit=unit, baseline=baseline, adsc=adsc, config=dict(base_cfg, **config)))

    # ---- engine: prefill (time to first token) ---------------------------------------------------
    prefill: Dict[int, Dict[str, float]] = {}
    for b in batches:
        reqs = _requests(model, b, args.text_tokens, seed=b)
        prefill[b] = {}
        for name, e in engines.items():
            def ttft(e=e):
                e.generate(reqs, max_new_tokens=1)
                return e.stats["prefill_seconds"]

            ttft()
            prefill[b][name] = statistics.median(ttft() for _ in range(repeats))
            prog.step(f"prefill b{b} {name}")
        record(f"prefill_seconds_b{b}", "s", prefill[b]["baseline"], prefill[b]["adsc"], batch=b,
               speedup=prefill[b]["baseline"] / prefill[b]["adsc"], flops_ratio=report["ideal_speedup"],
               what="engine time to first token (vision tower + packed prefill + first token)")

    # ---- engine: decode throughput, peak KV bytes, peak GPU memory ----------------------------------
    for b in batches:
        reqs = _requests(model, b, args.text_tokens, seed=100 + b)
        dec, kv, mem = {}, {}, {}
        for name, e in engines.items():
            _release(engines.values(), device)
            e.generate(reqs, max_new_tokens=new_tokens)
            dec[name] = e.stats["decode_tokens"] / max(e.stats["decode_seconds"], 1e-12)
            kv[name] = e.stats["peak_kv_bytes"]
            if device.type == "cuda":
                mem[name] = torch.cuda.max_memory_allocated(device)
            prog.step(f"decode b{b} {name}")
        record(f"decode_tokens_per_s_b{b}", "tokens/s", dec["baseline"], dec["adsc"], batch=b, new_tokens=new_tokens,
               speedup=dec["adsc"] / dec["baseline"], decode_path=eng.stats["decode_path"],
               what="engine decode steps after the prefill")
        if b != args.decode_batch:
            continue
        analytic = eng.analytic_kv_tokens(reqs, new_tokens) / engines["baseline"].analytic_kv_tokens(reqs, new_tokens)
        ratio = kv["adsc"] / kv["baseline"]
        record("peak_kv_bytes", "bytes", kv["baseline"], kv["adsc"], batch=b, new_tokens=new_tokens, ratio=ratio,
               analytic_ratio=analytic, ratio_error=abs(ratio - analytic) / analytic,
               what="KV blocks held at the peak (blocks reserved for prompt + new tokens)")
        if mem:
            record("peak_gpu_memory_bytes", "bytes", mem["baseline"], mem["adsc"], batch=b, new_tokens=new_tokens,
                   weights_bytes=weights_bytes,
                   what="torch.cuda.max_memory_allocated over the decode run, weights included "
                        "(the other engine's pool freed first)")

    # ---- Hugging Face generate() with SDPA, with and without ADSC ----------------------------------------
    if not args.no_hf:
        def hf_gen(m, reqs):
            ids, pix = _padded(reqs, device, dtype)
            gen = dict(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids), do_sample=False,
                       suppress_tokens=[model.config.image_token_id], pad_token_id=0)
            return lambda n: m.generate(**gen, max_new_tokens=n, min_new_tokens=n)

        _release(engines.values(), device)
        hf = {}
        pre = hf_gen(model, _requests(model, args.prefill_batch, args.text_tokens, seed=args.prefill_batch))
        dec = hf_gen(model, _requests(model, args.decode_batch, args.text_tokens, seed=100 + args.decode_batch))
        for name, sched in (("baseline", None), ("adsc", schedule)):
            if sched is not None:
                apply_adsc(model, sched)
            try:
                with torch.inference_mode():
                    ttft = _median_time(lambda: pre(1), repeats, device)
                    t1 = _median_time(lambda: dec(1), 1, device)
                    _sync(device)
                    t0 = time.perf_counter()
                    dec(new_tokens)  # warm already (dec(1) ran the same shapes)
                    _sync(device)
                    tn = time.perf_counter() - t0
                hf[name] = (ttft, args.decode_batch * (new_tokens - 1) / max(tn - t1, 1e-12))
            finally:
                if sched is not None:
                    remove_adsc(model)
            prog.step(f"hf generate {name}")
        record(f"hf_prefill_seconds_b{args.prefill_batch}", "s", hf["baseline"][0], hf["adsc"][0],
               batch=args.prefill_batch, speedup=hf["baseline"][0] / hf["adsc"][0],
               what="transformers generate(max_new_tokens=1), sdpa; adsc = apply_adsc")
        record(f"hf_decode_tokens_per_s_b{args.decode_batch}", "tokens/s", hf["baseline"][1], hf["adsc"][1],
               batch=args.decode_batch, new_tokens=new_tokens, speedup=hf["adsc"][1] / hf["baseline"][1],
               what="transformers generate: batch * (n - 1) tokens / (time(n) - time(1))")

    # ---- FastV-style pruning (eager attention) at the same token budget ----------------------------------
    if not args.no_fastv:
        fv = FastV(model, layer=args.fastv_layer, schedule=schedule)
        ids, pix = _padded(_requests(model, args.prefill_batch, args.text_tokens, seed=args.prefill_batch), device, dtype)
        t_fv = _median_time(lambda: fv.generate(ids, pix, 1), repeats, device)
        b = args.prefill_batch
        record(f"prefill_seconds_b{b}_vs_fastv", "s", t_fv, prefill[b]["adsc"], batch=b,
               speedup=t_fv / prefill[b]["adsc"], fastv_layer=fv.layer, fastv_keep_per_image=fv.keep,
               what="baseline = FastV (HF layers, eager attention, prune after layer K by the last token's "
                    "attention) at the schedule's image-token budget; adsc = the engine's ADSC prefill")
        prog.step("fastv")

    # ---- kernels: compaction, paged KV writes, the whole re-indexing of one prefill -------------------
    b = args.prefill_batch
    reqs = _requests(model, b, args.text_tokens, seed=b)
    ids = torch.cat([r["input_ids"] for r in reqs]).to(device)
    cu = torch.tensor([0] + [(i + 1) * reqs[0]["input_ids"].numel() for i in range(b)], dtype=torch.int32, device=device)
    hidden = model.config.text_config.hidden_size
    # Tiny models are so narrow that a launch would be all there is to time: widen their rows.
    width = hidden if not args.tiny else hidden * 16
    plan = stage_plan(eng.schedule, input_ids=ids, cu_seqlens=cu, image_token_id=eng.image_token_id, grid=eng.grid)
    st = plan.stages[1] if len(plan.stages) > 1 else plan.stages[0]
    x = torch.randn(ids.numel(), width, device=device, dtype=dtype)
    out = torch.empty(st.num_tokens, width, device=device, dtype=dtype)
    t_compact = _kernel_time(lambda: compact_tokens(x, st.index, out=out, check_index=False), device)
    moved = 2 * out.numel() * out.element_size()
    copy_same = _copy_bandwidth(device, moved // 2)
    copy_peak = _copy_bandwidth(device, 1 << 30 if device.type == "cuda" else 64 << 20)
    record("compact_bandwidth_fraction", "fraction of copy bandwidth", 1.0, (moved / t_compact) / copy_same,
           batch=b, rows=st.num_tokens, row_bytes=width * out.element_size(), seconds=t_compact,
           compact_bytes_per_s=moved / t_compact, copy_bytes_per_s_same_size=copy_same,
           copy_bytes_per_s_peak=copy_peak, fraction_of_peak_copy=(moved / t_compact) / copy_peak,
           what="compact_tokens of the first stage boundary's hidden states vs Tensor.copy_ of as many bytes")

    kvh, hd, bs = eng.num_kv_heads, eng.head_dim, args.block_size
    T = ids.numel()
    k = torch.randn(T, kvh, hd, device=device, dtype=dtype)
    v = torch.randn_like(k)
    nblocks = -(-T // bs)
    kc = torch.empty(nblocks, bs, kvh, hd, device=device, dtype=dtype)
    vc = torch.empty_like(kc)
    perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(0)).to(device)
    slots = (perm[:, None] * bs + torch.arange(bs, device=device)).reshape(-1)[:T]
    t_kv = _kernel_time(lambda: write_paged_kv(k, v, kc, vc, slots, check_slots=False), device)
    moved_kv = 2 * 2 * k.numel() * k.element_size()
    copy_kv = _copy_bandwidth(device, moved_kv // 2)
    record("kv_write_bandwidth_fraction", "fraction of copy bandwidth", 1.0, (moved_kv / t_kv) / copy_kv,
           batch=b, tokens=T, block_size=bs, seconds=t_kv, write_bytes_per_s=moved_kv / t_kv,
           copy_bytes_per_s_same_size=copy_kv, fraction_of_peak_copy=(moved_kv / t_kv) / copy_peak,
           what="write_paged_kv of one layer's K and V for a whole prefill batch into shuffled blocks")

    h = torch.randn(T, hidden, device=device, dtype=dtype)
    cs = torch.randn(T, hd, device=device, dtype=dtype)

    def reindex():
        p = stage_plan(eng.schedule, input_ids=ids, cu_seqlens=cu, image_token_id=eng.image_token_id, grid=eng.grid)
        hh, c, s = h, cs, cs
        for stg in p.stages[1:]:
            hh = compact_tokens(hh, stg.index, check_index=False)
            c = compact_tokens(c, stg.index, check_index=False)
            s = compact_tokens(s, stg.index, check_index=False)
        return hh

    t_reindex = _median_time(reindex, max(repeats, 5), device)
    record("reindex_fraction_of_prefill", "fraction", 0.0, t_reindex / prefill[b]["adsc"], batch=b,
           seconds=t_reindex, prefill_seconds=prefill[b]["adsc"], boundaries=len(plan.stages) - 1,
           what="stage_plan (one sync) + compaction of hidden, cos and sin at every boundary, measured")
    prog.step("kernels")

    targets = _targets(records, args, report["ideal_speedup"], device)
    now = _dt.datetime.now(_dt.timezone.utc)
    dev_name = _device_name(device)
    argv = getattr(args, "argv", None)
    result = dict(device=dev_name, torch=torch.__version__, cuda=torch.version.cuda,
                  date=now.isoformat(timespec="seconds"),
                  command=_command(argv),
                  backend=eng.backend, flops_ratio=report["ideal_speedup"],
                  wall_seconds=round(time.perf_counter() - t_start, 1), records=records, targets=targets)
    os.makedirs(args.out_dir, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dev_name).strip("-").lower() or "device"
    stem = os.path.join(args.out_dir, f"{slug}-{now.strftime('%Y%m%d-%H%M%S')}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    plot = None if args.no_plot else _plot(records, targets, stem + ".png", f"{dev_name} ({base_cfg['model']}, {dtype_name})")
    prog.step("written")
    prog.close()
    _print_table(records, targets)
    print(f"wrote {stem}.json" + (f" and {plot}" if plot else ""))
    return 0


def _command(argv: Optional[List[str]]) -> str:
    """The command line as a user would type it (``adsc bench ...``)."""
    if argv is None:  # through the ``adsc`` CLI: sys.argv is [prog, "bench", ...]
        argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    return " ".join(["adsc", "bench", *argv])


def _targets(records, args, flops_ratio: float, device: torch.device) -> List[Dict[str, Any]]:
    """Spec section 8, each measured value against its target (they apply to the full model on an H100)."""
    by = {r["metric"]: r for r in records}
    applies = (not args.tiny) and device.type == "cuda" and "H100" in torch.cuda.get_device_name(device)
    out = []

    def add(name, measured, target, met, note):
        out.append(dict(name=name, measured=measured, target=target, met=bool(met), applies=applies, note=note))

    r = by.get(f"prefill_seconds_b{args.prefill_batch}")
    if r:
        s = r["baseline"] / r["adsc"]
        add("prefill_speedup", s, 0.95 * flops_ratio, s >= 0.95 * flops_ratio,
            f"batch {args.prefill_batch}: >= 0.95 x the decoder FLOPs ratio {flops_ratio:.3f}")
    r = by.get(f"decode_tokens_per_s_b{args.decode_batch}")
    if r:
        s = r["adsc"] / r["baseline"]
        add("decode_speedup", s, 1.3, s >= 1.3, f"batch {args.decode_batch}: >= 1.3x the baseline")
    r = by.get("peak_kv_bytes")
    if r:
        e = r["config"]["ratio_error"]
        add("peak_kv_ratio_error", e, 0.01, e <= 0.01, "measured / analytic KV reduction within 1 %")
    for m in ("compact_bandwidth_fraction", "kv_write_bandwidth_fraction"):
        if m in by:
            add(m, by[m]["adsc"], 0.8, by[m]["adsc"] >= 0.8, ">= 80 % of the copy bandwidth at the same size")
    r = by.get("reindex_fraction_of_prefill")
    if r:
        add("reindex_fraction_of_prefill", r["adsc"], 0.01, r["adsc"] < 0.01, "< 1 % of the prefill")
    r = by.get(f"prefill_seconds_b{args.prefill_batch}_vs_fastv")
    if r:
        add("prefill_faster_than_fastv", r["baseline"] / r["adsc"], 1.0, r["adsc"] < r["baseline"],
            "ADSC prefill faster than FastV (eager) at the same token budget")
    return out


def _plot(records, targets, path: str, title: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the plot (pip install matplotlib)", file=sys.stderr)
        return None
    rows = [r for r in records if r["baseline"]]
    names = [r["metric"] for r in rows]
    # Higher is better for every bar: speed-ups (baseline time / ADSC time, ADSC rate / baseline
    # rate), the KV and memory reductions (baseline bytes / ADSC bytes), bandwidth fractions.
    vals = []
    for r in rows:
        if r["unit"] in ("s", "bytes"):
            vals.append(r["baseline"] / r["adsc"])
        else:
            vals.append(r["adsc"] / r["baseline"])
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
    ax.barh(names, vals, color=["tab:green" if v >= 1 else "tab:blue" for v in vals])
    ax.axvline(1.0, color="k", lw=0.8)
    for i, v in enumerate(vals):
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ADSC advantage (x): time and bytes baseline/ADSC, rates ADSC/baseline, bandwidth fraction")
    met = sum(t["met"] for t in targets)
    ax.set_title(f"adsc bench: {title}\nspec-8 targets met: {met}/{len(targets)}"
                 + ("" if all(t["applies"] for t in targets) else " (targets apply to LLaVA-1.5-7B on an H100)"),
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _print_table(records, targets) -> None:
    print(f"{'metric':34} {'unit':28} {'baseline':>14} {'adsc':>14}")
    for r in records:
        print(f"{r['metric']:34} {r['unit']:28} {r['baseline']:>14.6g} {r['adsc']:>14.6g}")
    print()
    for t in targets:
        flag = "met" if t["met"] else "MISSED"
        scope = "" if t["applies"] else " (not applicable: targets are for LLaVA-1.5-7B on an H100)"
        print(f"target {t['name']:30} {t['measured']:>10.4g} vs {t['target']:<8.4g} {flag}{scope}: {t['note']}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="adsc bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
