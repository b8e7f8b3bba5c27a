"""The empty schedule and the unmodified checkpoint against vLLM's own LLaVA and transformers.

vLLM's own LLaVA runs in a subprocess with ``VLLM_PLUGINS`` naming no plugin (plugins load once
per process). In this process the plugin serves (a) the checkpoint without ``adsc_schedule`` (its
class is vLLM's LLaVA forward) and (b) the same checkpoint with ``hf_overrides={"adsc_schedule":
""}``: the plugin's own decoder loop with no stage boundary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_checkpoint import REQUESTS, close_llm, greedy, make_llm

pytest.importorskip("vllm")

_BASELINE = r"""
import json, os, sys
sys.path.insert(0, {here!r})
from tiny_checkpoint import REQUESTS, greedy, make_llm
if __name__ == "__main__":
    llm = make_llm({path!r})
    assert type(llm.apply_model(lambda m: m)[0]).__name__ == "LlavaForConditionalGeneration"
    outs = llm.generate([r.vllm_prompt() for r in REQUESTS], [greedy(r.max_tokens) for r in REQUESTS])
    print("TOKENS " + json.dumps({{r.name: list(o.outputs[0].token_ids) for r, o in zip(REQUESTS, outs)}}))
"""


@pytest.fixture(scope="module")
def vllm_own_llava(checkpoints, tmp_path_factory):
    """Greedy tokens of vLLM's own LLaVA (no plugin) on the plain checkpoint."""
    script = tmp_path_factory.mktemp("baseline") / "baseline.py"
    here = str(Path(__file__).resolve().parent)
    script.write_text(_BASELINE.format(here=here, path=str(checkpoints["plain"])))
    env = dict(os.environ, VLLM_PLUGINS="none-of-them", VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("TOKENS ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("TOKENS "):])


@pytest.fixture(scope="module")
def llm(checkpoints):
    engine = make_llm(checkpoints["plain"], hf_overrides={"adsc_schedule": ""})
    yield engine
    close_llm(engine)


def test_vllm_own_llava_equals_transformers(vllm_own_llava, hf_tokens):
    """The test setup itself: vLLM's LLaVA and transformers' agree on the plain checkpoint
    (weights, placeholder expansion and image preprocessing all line up)."""
    assert vllm_own_llava == hf_tokens["plain"]


def test_empty_schedule_equals_vllm_own_llava(llm, vllm_own_llava):
    kind = llm.apply_model(lambda m: (type(m).__name__, m.adsc is not None, str(m.adsc.schedule)))[0]
    assert kind == ("AdscLlavaForConditionalGeneration", True, "")
    outs = llm.generate([r.vllm_prompt() for r in REQUESTS], [greedy(r.max_tokens) for r in REQUESTS])
    got = {r.name: list(o.outputs[0].token_ids) for r, o in zip(REQUESTS, outs)}
    assert got == vllm_own_llava
