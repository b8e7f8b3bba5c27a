"""The measurements of ``adsc bench``, the records they give and spec section 8's targets.

One configuration produces every spec-8 record (LLaVA-1.5-7B configuration, random weights, bf16
on CUDA; ``--tiny``: a tiny random LLaVA, fp32 on the CPU, the same code). Baseline = the same code
path with the empty schedule, side by side, with their repeats interleaved. Every engine has a
persistent KV pool, allocated and zero-filled before anything is timed.

- **prefill** (engine, ``--prefill-batches``): ``prefill_decoder_seconds_b<B>`` (the decoder layers
  alone, CUDA events) against the decoder FLOPs ratio, and ``ttft_seconds_b<B>`` (time to first
  token: host layout, upload, vision tower, projector, decoder, head, the first token read back)
  against the whole-prefill FLOPs ratio; both ratios from :func:`adsc_ext.accounting.plan_report`.
- **decode** (engine, ``--decode-batches``, ``--new-tokens``): ``decode_tokens_per_s_b<B>``
  against the ratio of bytes one decode step reads; the record says which decode path ran
  (``paged``: the cache read in place, or ``gather``) and whether CUDA graphs did. The target is
  judged on the paged path only.
- **KV cache**: ``kv_cache_bytes_prompt`` and ``kv_cache_bytes_prompt_generated``: the bytes a
  pool for the decode batch takes (``torch.cuda.memory_allocated`` before and after allocating it;
  on a CPU the pool tensors' sizes), against the analytic bytes; ``peak_gpu_memory_bytes``.
- **kernels**: compaction and paged KV writes on buffers of at least 4x the device's L2, as a
  fraction of the device's copy bandwidth measured on such buffers; ``reindex_fraction_of_prefill``:
  the prefill's host layout work plus its boundary compactions over time to first token.
- **Hugging Face** ``generate()`` (SDPA) without and with ``apply_adsc``, and **FastV** (eager
  attention at its pruning layer, :mod:`adsc_ext.baselines.fastv`) at the schedule's token budget
  against the HF ADSC prefill (the same code path).

Timed values keep every sample, median and spread; a target is ``met`` / ``missed`` only where
the samples' range does not straddle it (else ``inconclusive``), and ``not applicable`` off the
full model in bf16 on an H100 / H200 (or, for decode, off the paged path; for the KV bytes, off a
CUDA device's allocator).
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import platform
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..errors import BenchError
from .timing import Samples, kernel_seconds, speedup_bounds, sync, verdict, wall_samples

__all__ = ["run_suite", "full_model_bytes", "applicability", "tiny_config"]

#: GPUs spec section 8's targets are stated for.
TARGET_GPUS = ("H100", "H200")


# ---- the model and the prompts -----------------------------------------------------------------------
#: the --tiny model
TINY_MODEL = dict(grid_side=24, patch_size=2, num_layers=8, hidden_size=64)


def tiny_config():
    from ..testing import tiny_llava_config

    return tiny_llava_config(**TINY_MODEL)


def _full_config():
    from ..testing import llava15_7b_config

    return llava15_7b_config()


def _config(args):
    """The run's model config: ``--model``'s (set by the CLI's checks), the tiny one, or LLaVA-1.5-7B."""
    cfg = getattr(args, "model_config", None)
    if cfg is not None:
        return cfg
    return tiny_config() if getattr(args, "tiny", False) else _full_config()


def _model_name(args) -> str:
    return getattr(args, "model_name", None) or ("tiny-llava" if getattr(args, "tiny", False) else "llava-1.5-7b")


def full_model_bytes(args, dtype: torch.dtype) -> int:
    """What the run needs on the device, roughly: the weights (counted from the config, nothing
    allocated), the larger of the prefill engines' and the largest decode engines' pools (both
    engines at once; decode at 256-token rounding, prefill at --block-size) and 4 GiB for
    activations (512 MiB for --tiny)."""
    from ..accounting import plan_report, spec_from_config
    from ..models.checkpoint import SUPPORTED

    cfg = _config(args)
    tiny = getattr(args, "tiny", False)
    elt = torch.empty((), dtype=dtype).element_size()
    weights = SUPPORTED["llava"].parameters(cfg.to_dict()) * elt
    spec = spec_from_config(cfg.to_dict(), _model_name(args))
    per_tok = 2 * spec.num_kv_heads * spec.head_dim * elt  # K + V of a token in a layer
    schedule = args.schedule if args.schedule is not None else ("2:2,4:2,6:2" if tiny else "8:2,16:2,24:2")

    def pools(batch: int, new: int, block: int) -> int:
        kv = 0
        for sched in ("", schedule):  # both engines' pools
            r = plan_report(spec, sched, 1 + args.text_tokens, 1, elt)
            for st in r["stages"]:
                tokens = -(-(st["tokens"] + new) // block) * block
                kv += batch * (st["last_layer"] - st["first_layer"] + 1) * tokens * per_tok
        return kv

    decode = pools(max(list(args.decode_batches) + [args.decode_batch]), args.new_tokens or (16 if tiny else 256), 256)
    prefill_batches = list(getattr(args, "prefill_batches", None) or []) + [getattr(args, "prefill_batch", 1)]
    prefill = pools(max(prefill_batches), 1, max(1, getattr(args, "block_size", 16)))
    return int(weights + max(decode, prefill) + ((512 << 20) if tiny else (4 << 30)))


def _build_model(tiny: bool, device: torch.device, dtype: torch.dtype, config=None):
    from ..testing import build_llava, tiny_llava

    if tiny:
        return tiny_llava(seed=0, **TINY_MODEL, attn_implementation="sdpa", dtype=dtype).to(device)
    with torch.device(device):
        model = build_llava(config if config is not None else _full_config(), attn_implementation="sdpa", dtype=dtype)
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
        ids = torch.cat([torch.ones(1, dtype=torch.int64), torch.full((side * side,), tok), text])
        size = cfg.vision_config.image_size
        out.append(dict(input_ids=ids, pixel_values=torch.randn(1, 3, size, size, generator=g)))
    return out


def _padded(reqs: List[dict], device, dtype):
    """The requests as one HF batch (equal lengths: no padding)."""
    ids = torch.stack([r["input_ids"] for r in reqs]).to(device)
    pix = torch.cat([r["pixel_values"] for r in reqs]).to(device, dtype)
    return ids, pix


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


def applicability(tiny: bool, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when spec section 8's targets apply to this run, else why not."""
    if tiny:
        return "a tiny model: the targets are for LLaVA-1.5-7B"
    if device.type != "cuda":
        return f"run on {device}: the targets are for an H100 / H200"
    name = torch.cuda.get_device_name(device)
    if not any(g in name.upper() for g in TARGET_GPUS):
        return f"run on {name}: the targets are for an H100 / H200"
    if dtype != torch.bfloat16:
        return f"run in {dtype}: the targets are for bf16"
    return None


def graphs_supported(device: torch.device) -> bool:
    return device.type == "cuda"


class _Progress:
    def __init__(self, enabled: bool):
        self.enabled, self.t0, self.n = enabled, time.perf_counter(), 0

    def step(self, what: str) -> None:
        self.n += 1
        if self.enabled:
            print(f"[adsc bench {time.perf_counter() - self.t0:7.1f} s] {what}", file=sys.stderr, flush=True)


# ---- the run -----------------------------------------------------------------------------------------
def run_suite(args, device: torch.device, dtype: torch.dtype, new_tokens: int, out_dir: Path) -> int:
    from ..accounting import plan_report, spec_from_config
    from ..runtime import Engine
    from ..runtime.attention import PAGED_BLOCK_MULTIPLE

    t_start = time.perf_counter()
    prog = _Progress(not args.no_progress)
    dtype_name = str(dtype).replace("torch.", "")
    schedule = args.schedule if args.schedule is not None else ("2:2,4:2,6:2" if args.tiny else "8:2,16:2,24:2")
    repeats = args.repeats
    prefill_batches = sorted(set(args.prefill_batches) | {args.prefill_batch})
    decode_batches = sorted(set(args.decode_batches) | {args.decode_batch})
    graphs = args.cuda_graphs == "on" or (args.cuda_graphs == "auto" and device.type == "cuda")
    if graphs and not graphs_supported(device):
        raise BenchError("--cuda-graphs on needs a CUDA device")

    model = _build_model(args.tiny, device, dtype, getattr(args, "model_config", None))
    prog.step(f"model built ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {dtype_name})")
    elt = torch.empty((), dtype=dtype).element_size()
    spec = spec_from_config(model.config.to_dict(), _model_name(args))
    report = plan_report(spec, schedule, 1 + args.text_tokens, 1, elt, decode_batch=args.decode_batch,
                         new_tokens=new_tokens)
    not_applicable = applicability(args.tiny, device, dtype)

    def engine(sched, block_size, reqs, new, cuda_graphs=False):
        blocks = Engine(model, sched, backend=args.backend, block_size=block_size).pool_blocks_for(reqs, new)
        return Engine(model, sched, backend=args.backend, block_size=block_size, num_blocks=blocks,
                      max_batch_size=max(len(reqs), 1), cuda_graphs=cuda_graphs)

    probe = Engine(model, schedule, backend=args.backend, block_size=PAGED_BLOCK_MULTIPLE)
    decode_bs = args.decode_block_size
    if decode_bs == "auto":
        decode_bs = PAGED_BLOCK_MULTIPLE if probe.attention.decode_path == "paged" else args.block_size
    base_cfg = dict(model=_model_name(args) + ("" if args.tiny else " (random weights)"), dtype=dtype_name,
                    schedule=schedule, backend=probe.backend,
                    prompt=f"1 BOS + {probe.tokens_per_image} image + {args.text_tokens} text tokens",
                    repeats=repeats)
    records: List[Dict[str, Any]] = []
    targets: List[Dict[str, Any]] = []

    def record(metric, unit, baseline, adsc, higher_is_better=None, **config):
        r = dict(metric=metric, unit=unit, config=dict(base_cfg, **config))
        if isinstance(baseline, Samples):
            r.update(baseline=baseline.median, adsc=adsc.median, baseline_samples=baseline.summary(),
                     adsc_samples=adsc.summary(), **speedup_bounds(baseline, adsc, higher_is_better))
        else:
            r.update(baseline=baseline, adsc=adsc)
        records.append(r)
        return r

    def target(name, measured, goal, note, low=None, high=None, higher_is_better=True, why_not=None):
        why_not = why_not or not_applicable
        status = "not applicable" if why_not else verdict(measured, goal, low, high, higher_is_better)
        targets.append(dict(name=name, measured=measured, target=goal, status=status, met=status == "met",
                            applies=why_not is None, low=low, high=high, note=note,
                            **({"not_applicable": why_not} if why_not else {})))

    # ---- prefill: decoder-only time and time to first token -----------------------------------------
    reqs_p = {b: _requests(model, b, args.text_tokens, seed=b) for b in prefill_batches}
    big = reqs_p[prefill_batches[-1]]
    pre_engines = {"baseline": engine("", args.block_size, big, 1), "adsc": engine(schedule, args.block_size, big, 1)}
    reindex = Samples()
    ttft_adsc: Dict[int, Samples] = {}
    for b in prefill_batches:
        dec = {k: Samples() for k in pre_engines}
        ttft = {k: Samples() for k in pre_engines}
        for e in pre_engines.values():  # warm-up
            e.generate(reqs_p[b], max_new_tokens=1)
        for _ in range(repeats):
            for name, e in pre_engines.items():
                e.generate(reqs_p[b], max_new_tokens=1)
                dec[name].append(e.stats["prefill_decoder_seconds"])
                ttft[name].append(e.stats["prefill_seconds"])
                if name == "adsc" and b == args.prefill_batch:
                    st = e.stats
                    reindex.append((st["prefill_host_layout_seconds"] + st["prefill_reindex_device_seconds"])
                                   / st["prefill_seconds"])
        ttft_adsc[b] = ttft["adsc"]
        r1 = record(f"prefill_decoder_seconds_b{b}", "s", dec["baseline"], dec["adsc"], False, batch=b,
                    flops_ratio=report["ideal_speedup"], block_size=args.block_size,
                    what="the decoder layers of one packed prefill (CUDA events on a GPU)")
        r2 = record(f"ttft_seconds_b{b}", "s", ttft["baseline"], ttft["adsc"], False, batch=b,
                    flops_ratio=report["prefill"]["speedup"], block_size=args.block_size,
                    what="time to first token: host layout + upload + vision tower + projector + decoder + head + "
                         "the picked token read back (synchronised wall time)")
        if b == args.prefill_batch:
            g1, g2 = 0.95 * report["ideal_speedup"], 0.95 * report["prefill"]["speedup"]
            target(f"prefill_decoder_speedup_b{b}", r1["speedup"], g1,
                   f">= 0.95 x the decoder FLOPs ratio {report['ideal_speedup']:.3f}", r1["low"], r1["high"])
            target(f"ttft_speedup_b{b}", r2["speedup"], g2,
                   f">= 0.95 x the whole-prefill FLOPs ratio {report['prefill']['speedup']:.3f}", r2["low"], r2["high"])
        prog.step(f"prefill b{b}: decoder {r1['speedup']:.2f}x, ttft {r2['speedup']:.2f}x")
    rr = record("reindex_fraction_of_prefill", "fraction", 0.0, reindex.median, batch=args.prefill_batch,
                adsc_samples=reindex.summary(), boundaries=len(pre_engines["adsc"].stages) - 1,
                what="host layout work (plan on the host, layout, one upload) + the boundary compactions on the "
                     "device, over time to first token, measured inside the engine's prefills")
    target("reindex_fraction_of_prefill", rr["adsc"], 0.01, "< 1 % of the prefill (host work included)",
           min(reindex), max(reindex), higher_is_better=False)
    del pre_engines
    _free(device)

    # ---- KV cache: bytes actually allocated, prompt-only and prompt + generated ---------------------
    reqs_d = {b: _requests(model, b, args.text_tokens, seed=100 + b) for b in decode_batches}
    kv_reqs = reqs_d[args.decode_batch]
    kv_eng = {"baseline": Engine(model, "", backend=args.backend, block_size=args.block_size),
              "adsc": Engine(model, schedule, backend=args.backend, block_size=args.block_size)}
    analytic = {
        ("prompt", "baseline"): report["baseline_kv_bytes"] * args.decode_batch,
        ("prompt", "adsc"): report["adsc_kv_bytes"] * args.decode_batch,
        ("prompt_generated", "baseline"): report["decode"]["baseline_kv_bytes_end"],
        ("prompt_generated", "adsc"): report["decode"]["adsc_kv_bytes_end"],
    }
    kv_why_not = None if device.type == "cuda" else "no device allocator on a CPU: the pool tensors' sizes are reported"
    for what, new in (("prompt", 0), ("prompt_generated", new_tokens)):
        measured, pool_bytes = {}, {}
        for name, e in kv_eng.items():
            measured[name], pool_bytes[name] = _pool_bytes(e, kv_reqs, new, device)
        err = {n: abs(measured[n] - analytic[(what, n)]) / analytic[(what, n)] for n in kv_eng}
        red = 1 - measured["adsc"] / measured["baseline"]
        red_an = 1 - analytic[(what, "adsc")] / analytic[(what, "baseline")]
        record(f"kv_cache_bytes_{what}", "bytes", measured["baseline"], measured["adsc"], batch=args.decode_batch,
               new_tokens=new, block_size=args.block_size, analytic_baseline=analytic[(what, "baseline")],
               analytic_adsc=analytic[(what, "adsc")], error_baseline=err["baseline"], error_adsc=err["adsc"],
               reduction=red, analytic_reduction=red_an, pool_tensor_bytes=pool_bytes,
               measured_by="torch.cuda.memory_allocated around the pool's allocation" if device.type == "cuda"
               else "the pool tensors' sizes (no device allocator on a CPU)",
               what=f"KV pool of the decode batch, {'prompts only' if not new else f'prompts + {new} new tokens'}; "
                    f"analytic = adsc plan's KV bytes (the excess is {args.block_size}-token block rounding)")
        target(f"kv_bytes_error_{what}", max(err.values()), 0.01,
               f"allocated KV bytes within 1 % of the analytic value (analytic reduction {100 * red_an:.1f} %, "
               f"measured {100 * red:.1f} %)", higher_is_better=False, why_not=not_applicable or kv_why_not)
    prog.step("kv cache bytes measured")
    del kv_eng
    _free(device)

    # ---- decode throughput -------------------------------------------------------------------------
    big = reqs_d[decode_batches[-1]]
    graph_error = None

    def decode_engines(use_graphs):
        return {"baseline": engine("", decode_bs, big, new_tokens, use_graphs),
                "adsc": engine(schedule, decode_bs, big, new_tokens, use_graphs)}

    dec_engines = decode_engines(graphs)
    for b in decode_batches:
        try:
            for e in dec_engines.values():  # warm-up (captures the CUDA graphs)
                e.generate(reqs_d[b], max_new_tokens=new_tokens)
        except Exception as exc:  # a failed capture must not cost the whole run: record it, run eager
            if not graphs:
                raise
            graph_error = f"{type(exc).__name__}: {exc}"
            print(f"adsc bench: CUDA-graph decode failed ({graph_error}); decode runs without graphs",
                  file=sys.stderr)
            graphs = False
            del dec_engines
            _free(device)
            dec_engines = decode_engines(False)
            for e in dec_engines.values():
                e.generate(reqs_d[b], max_new_tokens=new_tokens)
        rate = {k: Samples() for k in dec_engines}
        peak = {}
        for i in range(repeats):
            for name, e in dec_engines.items():
                if i == 0 and device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                e.generate(reqs_d[b], max_new_tokens=new_tokens)
                rate[name].append(e.stats["decode_tokens"] / max(e.stats["decode_seconds"], 1e-12))
                if i == 0 and device.type == "cuda":
                    peak[name] = torch.cuda.max_memory_allocated(device)
        path = dec_engines["adsc"].stats["decode_path"]
        ratio = plan_report(spec, schedule, 1 + args.text_tokens, 1, elt, decode_batch=b,
                            new_tokens=new_tokens)["decode"]["speedup"]
        r = record(f"decode_tokens_per_s_b{b}", "tokens/s", rate["baseline"], rate["adsc"], True, batch=b,
                   new_tokens=new_tokens, block_size=decode_bs, decode_path=path, cuda_graphs=graphs,
                   cuda_graphs_error=graph_error, bytes_ratio=ratio,
                   what="engine decode steps after the prefill (tokens / decode seconds)")
        if b == args.decode_batch:
            why = None if path == "paged" else (
                f"decode ran the '{path}' path: the target is for the cache read in place (paged)")
            target(f"decode_speedup_b{b}", r["speedup"], 0.95 * ratio,
                   f">= 0.95 x the decode-step bytes ratio {ratio:.3f} (weights + KV at each step's lengths)",
                   r["low"], r["high"], why_not=not_applicable or why)
            if peak:
                pools = {k: e.pool.total_bytes() for k, e in dec_engines.items()}
                record("peak_gpu_memory_bytes", "bytes", peak["baseline"], peak["adsc"], batch=b,
                       new_tokens=new_tokens, pool_bytes=pools,
                       weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
                       what="torch.cuda.max_memory_allocated over one decode run: weights, both engines' "
                            "persistent pools (sized for the largest decode batch) and activations")
        prog.step(f"decode b{b}: {r['speedup']:.2f}x ({path}{', CUDA graphs' if graphs else ''})")
    del dec_engines
    _free(device)

    # ---- Hugging Face generate() with SDPA, with and without ADSC; FastV --------------------------
    hf_ttft: Dict[str, Samples] = {}
    if not args.no_hf:
        from ..hf import apply_adsc, remove_adsc

        def hf_gen(m, reqs):
            ids, pix = _padded(reqs, device, dtype)
            gen = dict(input_ids=ids, pixel_values=pix, attention_mask=torch.ones_like(ids), do_sample=False,
                       suppress_tokens=[model.config.image_token_id], pad_token_id=0)
            return lambda n: m.generate(**gen, max_new_tokens=n, min_new_tokens=n)

        pre = hf_gen(model, reqs_p[args.prefill_batch])
        dec = hf_gen(model, reqs_d[args.decode_batch])
        hf_rate: Dict[str, Samples] = {}
        for name, sched in (("baseline", None), ("adsc", schedule)):
            if sched is not None:
                apply_adsc(model, sched)
            try:
                with torch.inference_mode():
                    hf_ttft[name] = wall_samples(lambda: pre(1), repeats, device)
                    t1 = wall_samples(lambda: dec(1), 2, device)
                    tn = wall_samples(lambda: dec(new_tokens), 2, device, warmup=0)
                # time(n) - time(1) is the decode; where noise makes it <= 0 the sample says nothing
                hf_rate[name] = Samples(args.decode_batch * (new_tokens - 1) / (t - t1.median) for t in tn
                                        if t > t1.median)
            finally:
                if sched is not None:
                    remove_adsc(model)
        record(f"hf_ttft_seconds_b{args.prefill_batch}", "s", hf_ttft["baseline"], hf_ttft["adsc"], False,
               batch=args.prefill_batch, what="transformers generate(max_new_tokens=1), sdpa; adsc = apply_adsc")
        if all(hf_rate.values()):
            record(f"hf_decode_tokens_per_s_b{args.decode_batch}", "tokens/s", hf_rate["baseline"], hf_rate["adsc"],
                   True, batch=args.decode_batch, new_tokens=new_tokens,
                   what="transformers generate: batch * (n - 1) tokens / (time(n) - median time(1))")
        else:
            print("adsc bench: HF decode time not resolvable (time(n) <= time(1)); no hf_decode record",
                  file=sys.stderr)
        prog.step("hugging face generate")
    if not args.no_fastv:
        from ..baselines import FastV

        fv = FastV(model, layer=args.fastv_layer, schedule=schedule)
        ids, pix = _padded(reqs_p[args.prefill_batch], device, dtype)
        t_fv = wall_samples(lambda: fv.generate(ids, pix, 1), repeats, device)
        against, where = ((hf_ttft["adsc"], "HF apply_adsc generate(max_new_tokens=1), sdpa") if hf_ttft
                          else (ttft_adsc[args.prefill_batch], "the engine's ADSC time to first token"))
        r = record(f"fastv_ttft_seconds_b{args.prefill_batch}", "s", t_fv, against, False, batch=args.prefill_batch,
                   fastv_layer=fv.layer, fastv_keep_per_image=fv.keep, adsc_is=where,
                   what="baseline = FastV (HF layers, eager attention, prune after layer K by the last token's "
                        "attention) at the schedule's image-token budget")
        target("prefill_faster_than_fastv", r["speedup"], 1.0, f"ADSC ({where}) faster than FastV at the same "
               "token budget", r["low"], r["high"])
        prog.step("fastv")

    # ---- kernels: compaction and paged KV writes against the device's copy bandwidth ----------------
    _kernel_records(args, model, probe, device, dtype, record, target)
    prog.step("kernels")

    now = _dt.datetime.now(_dt.timezone.utc)
    dev_name = _device_name(device)
    import transformers

    result = dict(device=dev_name, torch=torch.__version__, cuda=torch.version.cuda,
                  transformers=transformers.__version__, python=platform.python_version(),
                  date=now.isoformat(timespec="seconds"), command=_command(getattr(args, "argv", None)),
                  model=base_cfg["model"], dtype=dtype_name, schedule=schedule, backend=probe.backend,
                  decode_block_size=decode_bs, cuda_graphs=graphs, cuda_graphs_error=graph_error,
                  targets_apply=not_applicable is None, targets_not_applicable=not_applicable,
                  plan=dict(decoder_flops_ratio=report["ideal_speedup"], prefill_flops_ratio=report["prefill"]["speedup"],
                            decode_bytes_ratio=report["decode"]["speedup"],
                            kv_reduction_pct=report["kv_reduction_pct"],
                            kv_prompt_generated_reduction_pct=report["decode"]["kv_end_reduction_pct"]),
                  wall_seconds=round(time.perf_counter() - t_start, 1), records=records, targets=targets)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", dev_name).strip("-").lower() or "device"
    stem = out_dir / f"{slug}-{now.strftime('%Y%m%d-%H%M%S')}"
    plot, why_no_plot = (None, "--no-plot") if args.no_plot else _plot(
        records, targets, stem.with_suffix(".png"), f"{dev_name} ({base_cfg['model']}, {dtype_name})")
    result["plot"] = None if plot is None else plot.name
    if why_no_plot:
        result["plot_skipped"] = why_no_plot
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    _print_table(records, targets)
    if why_no_plot and not args.no_plot:
        print(f"plot skipped: {why_no_plot}")
    print(f"wrote {stem.with_suffix('.json')}" + (f" and {plot}" if plot else ""))
    return 0


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _pool_bytes(engine, reqs, new: int, device: torch.device):
    """(bytes measured for a pool holding ``reqs`` with ``new`` tokens each, its tensors' bytes)."""
    _free(device)
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        pool = engine.pool_for(reqs, new)
        sync(device)
        measured = torch.cuda.memory_allocated(device) - before
    else:
        pool = engine.pool_for(reqs, new)
        measured = pool.total_bytes()
    tensors = pool.total_bytes()
    del pool
    return measured, tensors


def kernel_buffer_bytes(device: torch.device):
    """``(L2 bytes or None, buffer bytes)``: kernels are timed on buffers of 4x the device's L2 (at
    least 256 MiB on a GPU), so that they measure HBM, not the cache; a CPU run uses 16 MiB (it
    only shows that the measurement works)."""
    if device.type != "cuda":
        return None, 16 << 20
    l2 = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 0) or (60 << 20)
    return l2, max(4 * l2, 256 << 20)


def _kernel_records(args, model, eng, device, dtype, record, target) -> None:
    from ..ops import compact_tokens, stage_plan, write_paged_kv

    l2, size = kernel_buffer_bytes(device)
    elt = torch.empty((), dtype=dtype).element_size()
    hidden = model.config.text_config.hidden_size
    width = max(hidden, 2048 // elt)  # rows of at least 2 KiB (a tiny model's 64-wide rows are all launch)
    one = _requests(model, 1, args.text_tokens, seed=7)[0]["input_ids"]
    n_seq = max(1, math.ceil(size / (one.numel() * width * elt)))
    ids = one.repeat(n_seq)
    cu = torch.arange(n_seq + 1, dtype=torch.int32) * one.numel()
    plan = stage_plan(eng.schedule, input_ids=ids, cu_seqlens=cu, image_token_id=eng.image_token_id, grid=eng.grid)
    st = plan.stages[1] if len(plan.stages) > 1 else plan.stages[0]
    index = st.index.to(device)
    x = torch.randn(ids.numel(), width, device=device, dtype=dtype)
    out = torch.empty(st.num_tokens, width, device=device, dtype=dtype)
    t = kernel_seconds(lambda: compact_tokens(x, index, out=out, check_index=False), device)
    moved = 2 * out.numel() * out.element_size()
    copy_bw = _copy_bandwidth(device, max(size, moved // 2))
    frac = Samples(moved / s / copy_bw for s in t)
    record("compact_bandwidth_fraction", "fraction of copy bandwidth", 1.0, frac.median, rows=st.num_tokens,
           row_bytes=width * elt, source_bytes=x.numel() * elt, l2_bytes=l2, seconds=t.summary(),
           compact_bytes_per_s=moved / t.median, copy_bytes_per_s=copy_bw, adsc_samples=frac.summary(),
           what="compact_tokens of a first stage boundary's rows (bytes read + written) vs Tensor.copy_ on a "
                "buffer of at least 4x the L2 (read + written)")
    target("compact_bandwidth_fraction", frac.median, 0.8, ">= 80 % of the device's copy bandwidth (buffers >= 4x L2)",
           min(frac), max(frac))

    kvh, hd, bs = eng.num_kv_heads, eng.head_dim, args.block_size
    T = max(bs, math.ceil(size / (kvh * hd * elt)))
    k = torch.randn(T, kvh, hd, device=device, dtype=dtype)
    v = torch.randn_like(k)
    nblocks = -(-T // bs)
    kc = torch.empty(nblocks, bs, kvh, hd, device=device, dtype=dtype)
    vc = torch.empty_like(kc)
    perm = torch.randperm(nblocks, generator=torch.Generator().manual_seed(0)).to(device)
    slots = (perm[:, None] * bs + torch.arange(bs, device=device)).reshape(-1)[:T]
    t = kernel_seconds(lambda: write_paged_kv(k, v, kc, vc, slots, check_slots=False), device)
    moved = 2 * 2 * k.numel() * elt
    frac = Samples(moved / s / copy_bw for s in t)
    record("kv_write_bandwidth_fraction", "fraction of copy bandwidth", 1.0, frac.median, tokens=T, block_size=bs,
           key_bytes=k.numel() * elt, l2_bytes=l2, seconds=t.summary(), write_bytes_per_s=moved / t.median,
           copy_bytes_per_s=copy_bw, adsc_samples=frac.summary(),
           what="write_paged_kv of K and V (read + written) into shuffled blocks vs the copy bandwidth")
    target("kv_write_bandwidth_fraction", frac.median, 0.8, ">= 80 % of the device's copy bandwidth (buffers >= 4x L2)",
           min(frac), max(frac))


def _copy_bandwidth(device, nbytes: int) -> float:
    """Bytes moved per second (read + write) by ``Tensor.copy_`` of ``nbytes`` (median)."""
    x = torch.randn(max(1, nbytes // 4), dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / kernel_seconds(lambda: y.copy_(x), device).median


def _command(argv: Optional[List[str]]) -> str:
    """The command line as a user would type it (``adsc bench ...``)."""
    if argv is None:
        argv = sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]
    return " ".join(["adsc", "bench", *argv])


def _plot(records, targets, path: Path, title: str):
    """``(path, None)``, or ``(None, why)`` when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None, "matplotlib is not installed (pip install matplotlib; it comes with adsc_ext's [bench] extra)"
    rows = [r for r in records if "speedup" in r]
    names = [r["metric"] for r in rows]
    vals = [r["speedup"] for r in rows]
    errs = [[v - r["low"] for v, r in zip(vals, rows)], [r["high"] - v for v, r in zip(vals, rows)]]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.8))
    ax.barh(names, vals, xerr=errs, color=["tab:green" if v >= 1 else "tab:blue" for v in vals], capsize=3)
    ax.axvline(1.0, color="k", lw=0.8)
    for i, (v, r) in enumerate(zip(vals, rows)):
        ratio = r["config"].get("flops_ratio") or r["config"].get("bytes_ratio")
        if ratio:
            ax.plot([0.95 * ratio] * 2, [i - 0.4, i + 0.4], color="tab:red", lw=1.5)
        ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ADSC speed-up over the baseline (range: worst to best sample ratio); red: spec-8 target")
    counts = {s: sum(t["status"] == s for t in targets) for s in ("met", "missed", "inconclusive", "not applicable")}
    ax.set_title(f"adsc bench: {title}\n" + ", ".join(f"{n} {s}" for s, n in counts.items() if n), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path, None


def _print_table(records, targets) -> None:
    print(f"{'metric':36} {'unit':28} {'baseline':>12} {'adsc':>12} {'speed-up':>9} {'spread':>7}")
    for r in records:
        sp = f"{r['speedup']:.3f}" if "speedup" in r else ""
        spread = (max(r["baseline_samples"]["spread"], r["adsc_samples"]["spread"]) if "adsc_samples" in r
                  and "baseline_samples" in r else None)
        print(f"{r['metric']:36} {r['unit']:28} {r['baseline']:>12.5g} {r['adsc']:>12.5g} {sp:>9} "
              f"{'' if spread is None else f'{100 * spread:.0f} %':>7}")
    print()
    for t in targets:
        scope = f" ({t['not_applicable']})" if not t["applies"] else ""
        print(f"target {t['name']:34} {t['measured']:>9.4g} vs {t['target']:<8.4g} {t['status']}{scope}: {t['note']}")
