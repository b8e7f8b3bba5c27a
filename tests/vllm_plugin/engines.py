"""What the vLLM tests of every architecture share: closing an in-process engine, the greedy
tokens of vLLM's own model (no plugin) on a checkpoint, from a subprocess (plugins are chosen when
vLLM is imported), and the KV-cache probes the per-stage length tests pass to ``LLM.apply_model``."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = str(Path(__file__).resolve().parent)

_BASELINE = r"""
import json, sys
sys.path.insert(0, {here!r})
from transformers import AutoConfig
from {module} import REQUESTS, greedy, make_llm
if __name__ == "__main__":
    cfg = AutoConfig.from_pretrained({path!r})
    llm = make_llm({path!r})
    assert type(llm.apply_model(lambda m: m)[0]).__name__ == {class_name!r}
    outs = llm.generate([r.vllm_prompt() for r in REQUESTS], [greedy(r.max_tokens, cfg) for r in REQUESTS])
    print("TOKENS " + json.dumps({{r.name: list(o.outputs[0].token_ids) for r, o in zip(REQUESTS, outs)}}))
"""


def vllm_own_tokens(module: str, path, class_name: str, work_dir: Path) -> dict:
    """``{request name: greedy token ids}`` of vLLM's own ``class_name`` (no plugin) on the
    checkpoint ``path``, for the ``REQUESTS`` of the test module ``module`` (its ``make_llm`` and
    ``greedy(max_tokens, config)``)."""
    script = Path(work_dir) / "baseline.py"
    script.write_text(_BASELINE.format(here=HERE, module=module, path=str(path), class_name=class_name))
    env = dict(os.environ, VLLM_PLUGINS="none-of-them", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("TOKENS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("TOKENS "):])


def close_llm(llm) -> None:
    """Shut an in-process engine down (best effort: the process ends anyway)."""
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def generate_tokens(llm, requests, config, greedy):
    """``({request name: greedy token ids}, vLLM's outputs)`` of ``requests`` on ``llm``."""
    outs = llm.generate([r.vllm_prompt() for r in requests], [greedy(r.max_tokens, config) for r in requests])
    return {r.name: list(o.outputs[0].token_ids) for r, o in zip(requests, outs)}, outs


def hf_reference(ckpts, load_hf, load_processor, hf_greedy):
    """``reference(kind, requests) -> {name: tokens}``: transformers on checkpoint ``ckpts[kind]``
    (``apply_adsc`` with its saved schedule unless ``kind`` names a plain one), each request alone;
    models and tokens cached."""
    cache, models = {}, {}

    def reference(kind, requests):
        if kind not in models:
            models[kind] = (load_hf(ckpts[kind], adsc="plain" not in kind), load_processor(ckpts[kind]))
        model, processor = models[kind]
        for r in requests:
            if (kind, r) not in cache:
                cache[(kind, r)] = hf_greedy(model, processor, r)
        return {r.name: cache[(kind, r)] for r in requests}

    return reference


def hf_model(path, adsc: bool, pad_token_id: int = 0):
    """transformers' model of the checkpoint at ``path``, fp32, in eval mode, greedy-ready as vLLM
    runs it (no EOS: vLLM runs with ignore_eos), with ``apply_adsc`` and the schedule saved in
    ``config.adsc_schedule`` when ``adsc``."""
    import torch
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad_token_id
    if adsc:
        from adsc_ext import apply_adsc

        apply_adsc(model)
    return model


def cpu_llm(path, **kw):
    """One in-process vLLM engine on the CPU backend, fp32, eager, 32 MiB of KV, 8 sequences (each
    architecture's ``make_llm`` adds its own ``max_model_len`` and ``limit_mm_per_prompt``; ``kw``
    overrides any of them)."""
    from vllm import LLM

    args = dict(
        model=str(path), dtype="float32", enforce_eager=True, seed=0, kv_cache_memory_bytes=32 << 20,
        distributed_executor_backend="uni", max_num_seqs=8,
    )
    args.update(kw)
    return LLM(**args)


def greedy_params(max_tokens: int, vocab_size: int = 0, banned=()):
    """Greedy sampling with EOS ignored; with ``banned`` ids, only the other ids of the vocabulary
    may be generated (placeholder tokens that vLLM would read as text and transformers as vision)."""
    from vllm import SamplingParams

    allowed = None
    if banned:
        banned = set(banned)
        allowed = [i for i in range(vocab_size) if i not in banned]
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, allowed_token_ids=allowed)


def clear_kv(model) -> bool:
    """Zero every layer's KV cache (``llm.apply_model(clear_kv)`` before a request)."""
    for layer in model.language_model.model.layers:
        layer.self_attn.attn.kv_cache.zero_()
    return True


def kv_tokens_written(model) -> list:
    """``[(layers, tokens)]`` per KV-cache tensor: the decoder layers sharing it and how many tokens'
    K/V were written into it since :func:`clear_kv`. Tokens = non-zero values / values per token (K
    and V of every KV head), which does not depend on how the CPU kernels tile a block (their layout
    is ISA-specific). With per-stage KV groups one tensor holds one layer of every stage."""
    per_tensor = {}
    for i, layer in enumerate(model.language_model.model.layers):
        attn = layer.self_attn.attn
        per_token = 2 * attn.num_kv_heads * attn.head_size
        key = attn.kv_cache.data_ptr()
        layers, _ = per_tensor.get(key, ([], 0))
        per_tensor[key] = (layers + [i], int((attn.kv_cache != 0).sum()) / per_token)
    return list(per_tensor.values())
