"""Chunked prefill that cuts images, at LLaVA-1.5's image size (24x24 = 576 vision tokens), against
transformers' ADSC (``apply_adsc``) on each request alone.

Issue 21's two failures, as reported (the plugin then forced ``disable_chunked_mm_input``, whose
rollback does not protect a chunk that starts exactly at an image), and a randomized schedule:

- case 1: 32 requests with one image each, ``max_num_batched_tokens=4096``, ``max_num_seqs=32``:
  in step 2 a request is scheduled for its tokens [1, 257), the first 256 of its 576 image tokens;
- case 2: ``max_num_batched_tokens=600``, ``max_model_len=2048``, six requests mixing text-only, one
  image mid-prompt and two images: a chunk of 21 image tokens, then one that starts 21 tokens
  into the image (its other 555);
- random: requests of random shapes arriving at random steps, every step a random token budget
  and a random ``disable_chunked_mm_input``.

Each must give every request the tokens it gets alone in transformers, finish every request, and
leave every KV block free. A request that cannot be served (an image that is not a 24x24 grid)
fails alone when it is added, holding no block, and one aborted in the middle of an image frees
its blocks without disturbing the others.
"""

from __future__ import annotations

import random

import pytest
import torch

from tiny_checkpoint import (
    SCHEDULE, Request, build_checkpoint, close_llm, greedy, hf_greedy, load_hf, load_processor,
    make_llm, prompt,
)

pytest.importorskip("vllm")

SIDE = 24
HW = SIDE * SIDE


def _words(n: int, first: int = 5):
    return [first + (i % 60) for i in range(n)]


CASE1 = tuple(
    Request(f"c1_{i}", prompt(_words(63, 5 + i), 1), (100 + i,), 4) for i in range(32)
)  # BOS, image, 63 words: 640 tokens each
CASE2 = (
    # 1 + 576 + 9 + 576 + 603 = 1765 tokens: its last text chunk leaves 21 tokens of the budget
    Request("c2_two_images", prompt(_words(612), 2, image_at=[0, 9]), (1, 2), 6),
    Request("c2_image_mid", prompt(_words(20, 7), 1, image_at=[10]), (3,), 6),
    Request("c2_text40", prompt(_words(40, 9)), (), 5),
    Request("c2_image_mid2", prompt(_words(25, 11), 1, image_at=[5]), (4,), 4),
    Request("c2_text10", prompt(_words(10, 13)), (), 7),
    Request("c2_adjacent", prompt(_words(5, 15), 2, image_at=[2, 2]), (5, 6), 3),
)


@pytest.fixture(scope="module")
def checkpoint24(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("ckpt24") / "adsc", schedule=SCHEDULE, grid_side=SIDE)


@pytest.fixture(scope="module")
def hf24(checkpoint24):
    """``reference(requests) -> {name: tokens}``: transformers' ADSC, each request alone (cached)."""
    model = load_hf(checkpoint24, adsc=True)
    processor = load_processor(checkpoint24)
    cache = {}

    def reference(requests):
        for r in requests:
            if r not in cache:
                cache[r] = hf_greedy(model, processor, r)
        return {r.name: cache[r] for r in requests}

    return reference


def _engine(path, **kw):
    args = dict(
        disable_chunked_mm_input=True, enable_chunked_prefill=True, kv_cache_memory_bytes=64 << 20,
    )
    args.update(kw)
    return make_llm(path, **args)


@pytest.fixture(scope="module")
def llm_case1(checkpoint24):
    engine = _engine(checkpoint24, max_model_len=1024, max_num_batched_tokens=4096, max_num_seqs=32,
                     limit_mm_per_prompt={"image": 1})
    yield engine
    close_llm(engine)


@pytest.fixture(scope="module")
def llm_600(checkpoint24):
    engine = _engine(checkpoint24, max_model_len=2048, max_num_batched_tokens=600, max_num_seqs=8,
                     enable_mm_embeds=True)
    yield engine
    close_llm(engine)


class Recorder:
    """The engine's scheduler, watched: every scheduled prefill chunk as (request, start, end)
    and the image placeholders of each request; optionally a hook before each step."""

    def __init__(self, llm, before_step=None):
        self.scheduler = llm.llm_engine.engine_core.engine_core.scheduler
        self.chunks, self.images = [], {}
        self._schedule = self.scheduler.schedule
        self.before_step = before_step

        def schedule(*args, **kwargs):
            if self.before_step is not None:
                self.before_step(self.scheduler)
            out = self._schedule(*args, **kwargs)
            for rid, n in out.num_scheduled_tokens.items():
                req = self.scheduler.requests[rid]
                end = req.num_computed_tokens  # advanced by the scheduler already
                if end - n < req.num_prompt_tokens:
                    name = rid.rsplit("-", 1)[0]  # the engine appends a suffix to our ids
                    self.chunks.append((name, end - n, end))
                    self.images[name] = [
                        (f.mm_position.offset, f.mm_position.length) for f in (req.mm_features or [])
                    ]
            return out

        self.scheduler.schedule = schedule

    def close(self):
        self.scheduler.schedule = self._schedule

    def cuts_inside_images(self):
        """``(request, where, k)``: a chunk that starts (``where="start"``) or ends (``"end"``)
        ``k`` tokens into an image."""
        out = []
        for name, start, end in self.chunks:
            for offset, length in self.images.get(name, []):
                for where, at in (("start", start), ("end", end)):
                    if offset < at < offset + length:
                        out.append((name, where, (at - offset) % HW))
        return out

    def free_blocks(self):
        pool = self.scheduler.kv_cache_manager.block_pool
        return pool.get_num_free_blocks(), pool.num_gpu_blocks - 1  # the null block is never free


def _run(llm, requests, arrivals=None, recorder=None, max_steps=2000):
    """Add ``requests`` (``arrivals[i]``: the step before which request i is added; default all
    at once) and step the engine until all finish; returns ``{name: tokens}``."""
    engine = llm.llm_engine
    arrivals = arrivals or [0] * len(requests)
    pending = sorted(zip(arrivals, range(len(requests))))
    got, step = {}, 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][0] <= step:
            r = requests[pending.pop(0)[1]]
            engine.add_request(r.name, r.vllm_prompt(), greedy(r.max_tokens))
        for out in engine.step():
            if out.finished:
                got[out.request_id] = list(out.outputs[0].token_ids)
        step += 1
        assert step < max_steps
    return got


def test_case1_a_chunk_ends_inside_the_first_image(llm_case1, hf24):
    rec = Recorder(llm_case1)
    try:
        got = _run(llm_case1, CASE1)
    finally:
        rec.close()
    assert got == hf24(CASE1)
    # the failing chunk of the report: tokens [1, 257) of a request whose image starts at 1
    assert any(start == 1 and end == 257 for _, start, end in rec.chunks), rec.chunks[:40]
    assert ("end" in {w for _, w, _ in rec.cuts_inside_images()})
    free, total = rec.free_blocks()
    assert free == total


def test_case2_a_chunk_starts_21_tokens_into_an_image(llm_600, hf24):
    rec = Recorder(llm_600)
    try:
        got = _run(llm_600, CASE2)
    finally:
        rec.close()
    assert got == hf24(CASE2)
    cuts = rec.cuts_inside_images()
    assert ("c2_image_mid", "end", 21) in cuts and ("c2_image_mid", "start", 21) in cuts, rec.chunks
    (offset, _), = rec.images["c2_image_mid"]
    assert (offset, offset + 21) in [(s, e) for n, s, e in rec.chunks if n == "c2_image_mid"]
    assert any(n == "c2_image_mid" and s == offset + 21 and e >= offset + HW for n, s, e in rec.chunks)
    free, total = rec.free_blocks()
    assert free == total


def _random_request(rng: random.Random, name: str) -> Request:
    kind = rng.choice(["text", "one", "one", "two", "adjacent"])
    n = rng.randint(1, 60)
    words = _words(n, rng.randint(3, 200))
    if kind == "text":
        return Request(name, prompt(words), (), rng.randint(1, 6))
    if kind == "one":
        return Request(name, prompt(words, 1, image_at=[rng.randint(0, n)]), (rng.randint(0, 999),), rng.randint(1, 6))
    at = sorted([rng.randint(0, n), rng.randint(0, n)]) if kind == "two" else [rng.randint(0, n)] * 2
    return Request(name, prompt(words, 2, image_at=at), (rng.randint(0, 999), rng.randint(0, 999)), rng.randint(1, 6))


@pytest.mark.parametrize("seed", [0, 1])
def test_random_chunked_prefill_schedule(llm_600, hf24, seed):
    """Random requests arriving at random steps; before every step the token budget (8 to 600)
    and ``disable_chunked_mm_input`` are drawn anew, so chunks start and end anywhere."""
    rng = random.Random(seed)
    requests = [_random_request(rng, f"rand{seed}_{i}") for i in range(7)]
    arrivals = sorted(rng.randint(0, 12) for _ in requests)
    config = llm_600.llm_engine.engine_core.engine_core.scheduler.scheduler_config
    saved = None

    def before_step(scheduler):
        nonlocal saved
        if saved is None:
            saved = (scheduler.max_num_scheduled_tokens, config.disable_chunked_mm_input)
        scheduler.max_num_scheduled_tokens = rng.randint(8, 600)
        config.disable_chunked_mm_input = rng.random() < 0.3

    rec = Recorder(llm_600, before_step)
    try:
        got = _run(llm_600, requests, arrivals)
    finally:
        rec.close()
        if saved is not None:
            rec.scheduler.max_num_scheduled_tokens, config.disable_chunked_mm_input = saved
    assert got == hf24(requests)
    cuts = rec.cuts_inside_images()
    assert {"start", "end"} <= {w for _, w, _ in cuts}, rec.chunks  # images really were cut
    free, total = rec.free_blocks()
    assert free == total


def test_bad_request_fails_alone_and_aborted_requests_free_their_blocks(llm_600, hf24):
    """An image of 10 vision tokens is refused when its request is added (it never reaches the
    scheduler); a request aborted while its prefill is inside an image frees its blocks (and its
    first block, reused by a later request, starts that request from a clean state); the others
    finish with the tokens they get alone."""
    good = [CASE2[1], CASE2[2], CASE2[5]]
    victim = Request("victim", prompt(_words(30, 21), 1, image_at=[3]), (7,), 5)
    engine = llm_600.llm_engine
    rec = Recorder(llm_600, lambda s: setattr(s, "max_num_scheduled_tokens", 100))
    try:
        for r in good[:2] + [victim]:
            engine.add_request(r.name, r.vllm_prompt(), greedy(r.max_tokens))
        bad = {"prompt": prompt([5, 6], 1), "multi_modal_data": {"image": torch.randn(1, 10, 128)}}
        with pytest.raises(ValueError, match="24x24 grid of vision tokens"):
            engine.add_request("bad", bad, greedy(4))
        assert not any(rid.startswith("bad") for rid in rec.scheduler.requests)
        got = {}
        aborted = False
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    got[out.request_id] = list(out.outputs[0].token_ids)
            if not aborted and any(n == "victim" and s > 4 for n, s, _ in rec.chunks):
                engine.abort_request(["victim"])  # its prefill has reached into its image
                aborted = True
                engine.add_request(good[2].name, good[2].vllm_prompt(), greedy(good[2].max_tokens))
        assert aborted and ("victim", "end") in {(n, w) for n, w, _ in rec.cuts_inside_images()}
    finally:
        rec.scheduler.max_num_scheduled_tokens = 600
        rec.close()
    assert {k: v for k, v in got.items() if k != "victim"} == hf24(good)
    free, total = rec.free_blocks()
    assert free == total
