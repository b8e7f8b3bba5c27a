"""The serving engine (adsc_ext.runtime.Engine) on Qwen2.5-VL (tiny random models, CPU, fp32):
requests carry the processor's outputs, M-RoPE positions in the packed prefill, decode positions
with each request's rope delta; greedy tokens and first-step logits equal apply_adsc's."""

import copy

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from adsc_ext.errors import AdscInputError, AdscModelError, ScheduleError  # noqa: E402
from adsc_ext.generation import Request  # noqa: E402
from adsc_ext.hf import apply_adsc  # noqa: E402
from adsc_ext.runtime import Engine  # noqa: E402
from adsc_ext.testing.qwen import qwen_inputs, qwen_requests, tiny_qwen  # noqa: E402

ROWS = [["ab", ("image", 2, 3), "cd"], ["plain text"], ["y", ("image", 4, 4), "z", ("video", 2, 2, 2), "w", ("image", 3, 2)],
        [("image", 3, 5), "q", ("image", 2, 2)]]
SCHED = "1:2,3:2"
N = 5


@pytest.fixture(scope="module")
def plain():
    return tiny_qwen("qwen2_5_vl", num_layers=4)


def test_engine_on_qwen2_vl():
    q2 = tiny_qwen("qwen2_vl", num_layers=4)
    inp = qwen_inputs(q2, ROWS)
    got = Engine(q2, SCHED, block_size=4).generate(qwen_requests(inp, q2.config), max_new_tokens=N)
    assert got == hf_generate(apply_adsc(copy.deepcopy(q2), SCHED), inp, N)[0]


def hf_generate(model, inp, n):
    cfg = model.config
    with torch.no_grad():
        g = model.generate(**inp, max_new_tokens=n, min_new_tokens=n, do_sample=False, output_scores=True,
                           return_dict_in_generate=True, suppress_tokens=[cfg.image_token_id])
    return g.sequences[:, inp["input_ids"].shape[1]:].tolist(), g.scores


@pytest.mark.parametrize("schedule,block_size", [(SCHED, 4), ("2:4", 16), ("", 3)])
def test_engine_equals_apply_adsc(plain, schedule, block_size):
    inp = qwen_inputs(plain, ROWS)
    reqs = qwen_requests(inp, plain.config)
    eng = Engine(plain, schedule, block_size=block_size)
    got = eng.generate(reqs, max_new_tokens=N, return_logits=True)
    model = apply_adsc(copy.deepcopy(plain), schedule)
    want, scores = hf_generate(model, inp, N)
    assert [t for t, _ in got] == want
    first = torch.stack([lg[0] for _, lg in got])
    ref = scores[0].clone()
    ref[ref == -float("inf")] = first[ref == -float("inf")]  # generate's suppressed image token
    torch.testing.assert_close(first, ref, atol=1e-4, rtol=1e-4)
    # alone == in the batch, and continuous batching (two slots)
    assert [eng.generate([r], max_new_tokens=N)[0] for r in reqs] == want
    two = Engine(plain, schedule, block_size=block_size, max_batch_size=2)
    assert two.generate([Request(r.input_ids, r.pixel_values, max_new_tokens=2 if i == 0 else None, inputs=r.inputs)
                         for i, r in enumerate(reqs)], max_new_tokens=N) == [want[0][:2], *want[1:]]
    if schedule:  # the cache: every stage's pool holds the grids' stage lengths
        lens = [eng.stage_lengths(r.input_ids, **r.inputs) for r in reqs]
        assert lens[2][0] > lens[2][-1] and all(a >= b for a, b in zip(lens[2], lens[2][1:]))
        assert eng.pool_blocks_for(reqs, N) == [sum(-(-(ln[k] + N) // block_size) for ln in lens)
                                              for k in range(len(lens[0]))]


def test_engine_request_checks(plain):
    eng = Engine(plain, SCHED, block_size=4)
    inp = qwen_inputs(plain, [["a", ("image", 2, 3), "b"]])
    r = qwen_requests(inp, plain.config)[0]
    with pytest.raises(AdscInputError, match="request 0: give pixel_values and image_grid_thw together"):
        eng.generate([Request(r.input_ids, r.pixel_values)], max_new_tokens=2)
    with pytest.raises(AdscInputError, match=r"request 0: pixel_values must be the processor's patches \[num_patches, 24\]"):
        eng.generate([Request(r.input_ids, torch.zeros(2, 3, 4, 4), inputs=r.inputs)], max_new_tokens=2)
    with pytest.raises(AdscInputError, match=r"request 0: image_grid_thw \[\[1, 4, 4\]\] needs 16 patches, pixel_values has 24"):
        eng.generate([Request(r.input_ids, r.pixel_values, inputs={"image_grid_thw": torch.tensor([[1, 4, 4]])})],
                     max_new_tokens=2)
    small = qwen_requests(qwen_inputs(plain, [["a", ("image", 2, 2)]]), plain.config)[0]
    res = Engine(plain, "1:2,2:2,3:2", block_size=4).generate([small, r], max_new_tokens=2, return_exceptions=True)
    assert isinstance(res[0], ScheduleError) and "request 0: schedule '1:2,2:2,3:2' does not fit a 2x2" in str(res[0])
    assert len(res[1]) == 2  # 2x3 -> 2x2 -> 2x1 -> 1x1: it runs


def test_engine_refuses_deepstack():
    q3 = tiny_qwen("qwen3_vl", num_layers=4)
    with pytest.raises(AdscModelError, match="DeepStack"):
        Engine(q3, "2:2")
