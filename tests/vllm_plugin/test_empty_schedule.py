"""The empty schedule and the unmodified checkpoint against vLLM's own LLaVA and transformers.

vLLM's own LLaVA runs in a subprocess with ``VLLM_PLUGINS`` naming no plugin (plugins load once
per process). In this process the plugin serves (a) the checkpoint without ``adsc_schedule`` (its
class is vLLM's LLaVA forward) and (b) the same checkpoint with ``hf_overrides={"adsc_schedule":
""}``: the plugin's own decoder loop with no stage boundary.
"""

from __future__ import annotations

import pytest

from engines import vllm_own_tokens
from tiny_checkpoint import REQUESTS, close_llm, greedy, make_llm

pytest.importorskip("vllm")



@pytest.fixture(scope="module")
def vllm_own_llava(checkpoints, tmp_path_factory):
    """Greedy tokens of vLLM's own LLaVA (no plugin) on the plain checkpoint."""
    return vllm_own_tokens("tiny_checkpoint", checkpoints["plain"], "LlavaForConditionalGeneration",
                           tmp_path_factory.mktemp("baseline"))


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
