"""Tests of adsc_ext.runtime (the serving engine): CPU, fp32, tiny random LLaVA models."""

import pytest

pytest.importorskip("transformers")

import torch  # noqa: E402

from adsc_ext.hf import apply_adsc  # noqa: E402
from adsc_ext.testing import TinyProcessor, tiny_llava  # noqa: E402
from adsc_ext.runtime import (  # noqa: E402
    Attention, Engine, EngineInputError, KVCapacityError, StagedKVPool, select_backend,
)
from adsc_ext.runtime.attention import gather_index, paged_decode_gather  # noqa: E402

ROWS = [("ab", 1, "cd"), ("", 0, "plain text row"), ("x", 2, "y?")]  # 1, 0 and 2 images
SCHED = "2:2,4:2"


def make(side=4, impl="sdpa", seed=0):
    return tiny_llava(seed=seed, attn_implementation=impl, grid_side=side)


def requests(model, rows=ROWS, seed=0):
    """Engine requests and the equivalent left-padded HF batch (same processed pixels)."""
    proc = TinyProcessor(model.config)
    side = model.config.vision_config.image_size
    n = sum(k for _, k, _ in rows)
    g = torch.Generator().manual_seed(seed)
    pix = proc.images(list(torch.rand(n, 3, side, side, generator=g))) if n else None
    reqs, i = [], 0
    for before, k, after in rows:
        text = before + "<image>" * k + after
        reqs.append(dict(input_ids=torch.tensor(proc.encode(text, k)), pixel_values=pix[i:i + k] if k else None))
        i += k
    batch = proc([b + "<image>" * k + a for b, k, a in rows], images=list(pix) if n else None)
    if n:
        batch["pixel_values"] = pix
    return reqs, batch


def hf_generate(model, batch, n):
    with torch.no_grad():
        g = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           suppress_tokens=[model.config.image_token_id])
    return g[:, batch["input_ids"].shape[1]:].tolist()


def recompute(model, req, n):
    """Spec 6.2 oracle: the whole sequence re-run with the schedule (HF path, no cache) per step."""
    ids = req["input_ids"][None]
    out = []
    for _ in range(n):
        with torch.no_grad():
            o = model(input_ids=ids, pixel_values=req["pixel_values"], use_cache=False)
        last = o.logits[0, -1].clone()
        last[model.config.image_token_id] = -float("inf")
        out.append(int(last.argmax()))
        ids = torch.cat([ids, torch.tensor([[out[-1]]])], 1)
    return out


@pytest.fixture(scope="module")
def model():
    return make()


# ---- correctness ---------------------------------------------------------------------------------
@pytest.mark.parametrize("side,schedule,block_size", [(4, SCHED, 4), (4, "3:4", 16), (5, "1:2,3:4", 3)])
def test_engine_equals_hf_adsc_generate_and_recompute(side, schedule, block_size):
    m = make(side)
    reqs, batch = requests(m)
    eng = Engine(m, schedule, block_size=block_size)
    assert eng.backend == "sdpa"
    got = eng.generate(reqs, max_new_tokens=5)
    apply_adsc(m, schedule)
    assert got == hf_generate(m, batch, 5)
    for r, toks in zip(reqs, got):
        assert toks == recompute(m, r, 5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_empty_schedule_equals_unmodified_model(impl):
    m = make(impl=impl)
    reqs, batch = requests(m)
    got = Engine(m, "", block_size=4).generate(reqs, max_new_tokens=5)
    assert got == hf_generate(m, batch, 5)  # plain transformers LLaVA, left-padded batch


def test_engine_cache_equals_engine_recompute(model):
    """Spec 6.2 with the engine itself: one prefill per step over prompt + tokens so far."""
    reqs, _ = requests(model)
    eng = Engine(model, SCHED, block_size=4)
    got = eng.generate(reqs, max_new_tokens=4)
    for r, toks in zip(reqs, got):
        ids, out = r["input_ids"], []
        for _ in range(4):
            t = eng.generate([dict(r, input_ids=ids)], max_new_tokens=1)[0][0]
            out.append(t)
            ids = torch.cat([ids, torch.tensor([t])])
        assert out == toks


def test_batch_equals_alone_and_continuous_batching(model):
    reqs, _ = requests(model)
    eng = Engine(model, SCHED, block_size=4)
    full = eng.generate(reqs, max_new_tokens=6)
    alone = [eng.generate([r], max_new_tokens=6)[0] for r in reqs]
    assert full == alone
    # Two slots: request 0 stops after 2 tokens, so request 2 joins while request 1 is decoding.
    reqs2 = [dict(reqs[0], max_new_tokens=2), reqs[1], reqs[2]]
    got = Engine(model, SCHED, block_size=4, max_batch_size=2).generate(reqs2, max_new_tokens=6)
    assert got == [full[0][:2], full[1], full[2]]
    eng2 = Engine(model, SCHED, block_size=4, max_batch_size=2)
    eng2.generate(reqs2, max_new_tokens=6)
    assert eng2.stats["admitted_per_prefill"] == [[0, 1], [2]]
    assert eng2.stats["prefills"] == 2


def test_eos_stops_a_request(model):
    reqs, _ = requests(model)
    eng = Engine(model, SCHED)
    full = eng.generate(reqs, max_new_tokens=6)
    eos = full[1][2]
    got = eng.generate(reqs, max_new_tokens=6, eos_token_id=eos)
    cut = full[1][: full[1].index(eos) + 1]
    assert got[1] == cut


def test_sampling_is_seeded_and_valid(model):
    reqs, _ = requests(model)
    eng = Engine(model, SCHED)
    a = eng.generate(reqs, max_new_tokens=4, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = eng.generate(reqs, max_new_tokens=4, temperature=0.8, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert a == b
    tok = model.config.image_token_id
    assert all(0 <= t < model.config.text_config.vocab_size and t != tok for row in a for t in row)


# ---- the staged paged cache ------------------------------------------------------------------------
@pytest.mark.parametrize("block_size", [1, 4])
def test_pools_are_sized_per_stage_and_kv_saving_is_real(model, block_size):
    reqs, _ = requests(model)
    new = 5
    eng = Engine(model, SCHED, block_size=block_size)
    base = Engine(model, "", block_size=block_size)
    eng.generate(reqs, max_new_tokens=new)
    base.generate(reqs, max_new_tokens=new)
    pool = eng.pool_for(reqs, new)  # what generate allocated for the call
    lens = [eng.stage_lengths(r["input_ids"]) for r in reqs]
    for s, sp in enumerate(pool.pools):
        want = sum(-(-(L[s] + new) // block_size) for L in lens)
        assert sp.num_blocks == want == eng.stats["pool_blocks"][s]
        assert sp.layers == [l for l in range(6) if eng.stage_of_layer[l] == s]
    assert eng.stats["pool_bytes"] == pool.total_bytes()
    assert eng.stats["peak_kv_bytes"] == pool.total_bytes() < base.stats["peak_kv_bytes"]
    if block_size == 1:  # no rounding: exactly the analytic KV bytes of spec section 5
        per_tok = eng.kv_bytes_per_token()
        assert eng.stats["peak_kv_bytes"] == eng.analytic_kv_tokens(reqs, new) * per_tok
        assert base.stats["peak_kv_bytes"] == base.analytic_kv_tokens(reqs, new) * per_tok
        ratio = eng.analytic_kv_tokens(reqs, new) / base.analytic_kv_tokens(reqs, new)
        assert eng.stats["peak_kv_bytes"] / base.stats["peak_kv_bytes"] == pytest.approx(ratio)
        assert ratio < 0.85
    # a request's own max_new_tokens counts, as in pool_blocks_for (the pools it allocates)
    own = [dict(r, max_new_tokens=2 + i) for i, r in enumerate(reqs)]
    per_layer = [sum(L[eng.stage_of_layer[l]] + 2 + i for i, L in enumerate(lens)) for l in range(6)]
    assert eng.analytic_kv_tokens(own, new) == sum(per_layer)


def test_a_calls_pool_does_not_outlive_the_call(monkeypatch, model):
    """Fresh pools are the call's: once generate returns (or fails), nothing holds them, so resident
    memory does not grow between calls; a persistent pool (num_blocks) stays, emptied."""
    import gc
    import weakref

    from adsc_ext.runtime import engine as E

    made = []
    new_pool = E.Engine._new_pool
    monkeypatch.setattr(E.Engine, "_new_pool", lambda self, nb: (made.append(new_pool(self, nb)), made[-1])[1])
    reqs, _ = requests(model)
    eng = Engine(model, SCHED, block_size=4)
    eng.generate(reqs, max_new_tokens=3)
    refs = [weakref.ref(p) for p in made]
    made.clear()
    gc.collect()
    assert refs and all(r() is None for r in refs)
    with pytest.raises(RuntimeError, match="boom"):
        eng.generate(reqs, max_new_tokens=3, progress=lambda done, total: (_ for _ in ()).throw(RuntimeError("boom")))
    refs = [weakref.ref(p) for p in made]
    made.clear()
    gc.collect()
    assert refs and all(r() is None for r in refs)
    fixed = Engine(model, SCHED, block_size=4, num_blocks=[40, 30, 20])
    fixed.generate(reqs, max_new_tokens=3)
    assert fixed.pool.tables == {}


def test_fixed_pool_blocks_freed_after_finish(model):
    reqs, _ = requests(model)
    eng = Engine(model, SCHED, block_size=4, num_blocks=[40, 30, 20])
    free0 = eng.pool.num_free_blocks()
    got = eng.generate(reqs, max_new_tokens=4)
    assert eng.pool.num_free_blocks() == free0 and eng.pool.tables == {}
    assert eng.stats["peak_kv_bytes"] > 0
    assert got == Engine(model, SCHED, block_size=4).generate(reqs, max_new_tokens=4)


def test_small_pool_serves_requests_one_after_another(model):
    reqs, _ = requests(model)
    want = Engine(model, SCHED, block_size=4).generate(reqs, max_new_tokens=4)
    # Room for about one request at a time: the others wait for blocks to be freed.
    eng = Engine(model, SCHED, block_size=4, num_blocks=[14, 9, 7])
    assert eng.generate(reqs, max_new_tokens=4) == want
    assert eng.stats["prefills"] >= 2
    assert eng.pool.tables == {}


def test_allocator_is_all_or_nothing():
    pool = StagedKVPool([[0, 1], [2]], [4, 2], block_size=2, num_kv_heads=1, head_dim=2)
    pool.allocate("a", [3, 3])
    with pytest.raises(KVCapacityError, match="stage 1"):
        pool.allocate("b", [2, 2])
    assert pool.num_free_blocks() == [2, 0] and list(pool.tables) == ["a"]
    assert pool.slots("a", 0, 1, 2) == [1, 2]
    pool.free("a")
    assert pool.num_free_blocks() == [4, 2]


# ---- bad input -------------------------------------------------------------------------------------
def test_request_too_large_for_cache_is_a_clear_error_and_pool_intact(model):
    reqs, _ = requests(model)
    eng = Engine(model, SCHED, block_size=4, num_blocks=[8, 8, 8])
    free0 = eng.pool.num_free_blocks()
    k0 = eng.pool.pools[0].k[0].clone()
    with pytest.raises(KVCapacityError, match="request 2: needs .* can never be served"):
        eng.generate(reqs, max_new_tokens=4)
    assert eng.pool.num_free_blocks() == free0 and eng.pool.tables == {}
    assert torch.equal(eng.pool.pools[0].k[0], k0)
    # The others still run; with return_exceptions the failing one gets its error.
    out = eng.generate(reqs, max_new_tokens=4, return_exceptions=True)
    assert isinstance(out[2], KVCapacityError)
    want = Engine(model, SCHED).generate(reqs[:2], max_new_tokens=4)
    assert out[:2] == want
    assert eng.pool.num_free_blocks() == free0


def test_images_that_do_not_match(model):
    reqs, _ = requests(model)
    eng = Engine(model, SCHED)
    bad = dict(reqs[2], pixel_values=reqs[2]["pixel_values"][:1])
    with pytest.raises(EngineInputError, match="request 1: input_ids hold 2 image"):
        eng.generate([reqs[0], bad], max_new_tokens=2)
    with pytest.raises(EngineInputError, match="images must be 16x16"):
        eng.generate([dict(reqs[0], pixel_values=torch.zeros(1, 3, 8, 8))], max_new_tokens=2)
    with pytest.raises(EngineInputError, match="whole images"):
        eng.generate([dict(input_ids=reqs[0]["input_ids"][:-4], pixel_values=None)], max_new_tokens=2)
    with pytest.raises(EngineInputError, match="1-D"):
        eng.generate([dict(input_ids=torch.zeros(2, 3, dtype=torch.long))], max_new_tokens=2)
    out = eng.generate([reqs[0], bad, reqs[1]], max_new_tokens=3, return_exceptions=True)
    assert isinstance(out[1], EngineInputError)
    assert [out[0], out[2]] == eng.generate([reqs[0], reqs[1]], max_new_tokens=3)


def test_backend_selection(model):
    assert select_backend(None, "cpu") == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend 'xformers'"):
        Engine(model, SCHED, backend="xformers")
    for name in ("flash_attn", "torch_varlen"):
        with pytest.raises(ValueError, match="needs"):
            Attention(name, "cpu")


def test_bad_engine_arguments_raise_instead_of_truncating(model):
    for bad in (2.5, "16", True, None):
        with pytest.raises(TypeError, match="block_size must be an int"):
            Engine(model, SCHED, block_size=bad)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        Engine(model, SCHED, block_size=0)
    with pytest.raises(TypeError, match="max_batch_size must be an int"):
        Engine(model, SCHED, max_batch_size=1.5)
    with pytest.raises(ValueError, match="num_blocks must be ints"):
        Engine(model, SCHED, num_blocks=[4, 4.5, 4])
    reqs, _ = requests(model)
    with pytest.raises(EngineInputError, match="max_new_tokens must be an int"):
        Engine(model, SCHED).generate([dict(reqs[0], max_new_tokens=2.5)])


def test_generate_is_not_reentrant(model):
    """A progress callback that calls generate() on the same engine gets a clear error, and the
    engine is usable afterwards (its blocks were all freed)."""
    reqs, _ = requests(model)
    eng = Engine(model, SCHED, block_size=4, num_blocks=[60, 40, 30])
    free0 = eng.pool.num_free_blocks()
    with pytest.raises(RuntimeError, match="not re-entrant"):
        eng.generate(reqs, max_new_tokens=3, progress=lambda done, total: eng.generate(reqs[:1], max_new_tokens=1))
    assert eng.pool.num_free_blocks() == free0 and eng.pool.tables == {}
    assert eng.generate(reqs, max_new_tokens=3) == Engine(model, SCHED).generate(reqs, max_new_tokens=3)
    seen = []
    eng.generate(reqs, max_new_tokens=2, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (3, 3)


class _DevicePathSpy:
    """Counts, per prefill / decode step of the generation loop (the engine's step and the pick), what
    reaches the device path:
    tensors made from host data (``aten.lift_fresh``: ``torch.tensor(list)``; 0-dim scalars aside), host reads
    (``aten._local_scalar_dense``: ``int(t)``, ``.item()``; and ``Tensor.tolist``), and uploads
    (the engine's one-copy ``_upload`` / ``_upload_pixels``). The host-side layout builders are
    allowed to make host tensors; nothing else is."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        from adsc_ext.generation import Generator
        from adsc_ext.runtime import engine as E

        self.calls = []  # one dict per prefill / decode step
        self._host = 0
        spy = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if spy.calls and not spy._host:
                    # (a 0-dim tensor is a wrapped Python scalar, passed to kernels by value)
                    if func is torch.ops.aten.lift_fresh.default and args[0].dim() > 0:
                        spy.calls[-1]["host_tensors"] += 1
                    elif func is torch.ops.aten._local_scalar_dense.default:
                        spy.calls[-1]["syncs"] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode

        def phases(fn):
            def wrapped(self_, phase, seqs):
                self.calls.append(dict(phase=phase, host_tensors=0, syncs=0, reads=0, uploads=0, layouts=0))
                with Mode():
                    return fn(self_, phase, seqs)
            return wrapped

        def host(fn, counter=None):
            def wrapped(*a, **k):
                if counter and self.calls:
                    self.calls[-1][counter] += 1
                self._host += 1
                try:
                    return fn(*a, **k)
                finally:
                    self._host -= 1
            return wrapped

        tolist = torch.Tensor.tolist

        def counted_tolist(t):
            if self.calls and not self._host:
                self.calls[-1]["reads"] += 1
            return tolist(t)

        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        monkeypatch.setattr(Generator, "_step", phases(Generator._step))
        monkeypatch.setattr(E.Engine, "_prefill_layout", host(E.Engine._prefill_layout))
        monkeypatch.setattr(E.Engine, "_decode_layout", host(E.Engine._decode_layout, "layouts"))
        monkeypatch.setattr(E.Engine, "_upload", host(E.Engine._upload, "uploads"))
        monkeypatch.setattr(E.Engine, "_upload_pixels", host(E.Engine._upload_pixels, "uploads"))


def test_prefill_and_decode_steps_make_no_device_tensor_from_host_data(monkeypatch, model):
    """Issue 13, item 1: no ``torch.tensor(list)`` and no host read on the device path; a prefill
    uploads its integers in one copy (plus one for the images) and reads back only the picked
    tokens; a decode step uploads nothing unless the batch changed, and reads back its tokens."""
    reqs, _ = requests(model)
    want = Engine(model, SCHED, block_size=4).generate(reqs, max_new_tokens=5)
    spy = _DevicePathSpy(monkeypatch)
    # request 0 stops after 2 tokens: the batch changes once mid-decode
    reqs2 = [dict(reqs[0], max_new_tokens=2), reqs[1], reqs[2]]
    got = Engine(model, SCHED, block_size=4).generate(reqs2, max_new_tokens=5)
    assert got == [want[0][:2], want[1], want[2]]
    prefills = [c for c in spy.calls if c["phase"] == "prefill"]
    decodes = [c for c in spy.calls if c["phase"] == "decode"]
    assert len(prefills) == 1 and len(decodes) == 4
    for c in spy.calls:
        assert c["host_tensors"] == 0 and c["syncs"] == 0, c
        assert c["reads"] == 1, c  # the picked tokens
    assert prefills[0]["uploads"] == 2  # the integers, the images
    assert [c["layouts"] for c in decodes] == [1, 1, 0, 0]  # built at the start and when request 0 left
    assert [c["uploads"] for c in decodes] == [1, 1, 0, 0]


def test_gather_decode_reads_only_the_blocks_in_use(monkeypatch, model):
    """The gather fallback reads the blocks the longest sequence has filled, not the blocks
    reserved for max_new_tokens, and builds its index once per stage and step (not per layer)."""
    from adsc_ext.runtime import attention as A
    from adsc_ext.runtime import engine as E

    reqs, _ = requests(model)
    new = 9
    want = Engine(model, SCHED, block_size=1).generate(reqs, max_new_tokens=new)
    widths, builds = [], []
    gather, build = A.paged_decode_gather, A.gather_index
    monkeypatch.setattr(A, "paged_decode_gather", lambda q, kc, vc, g, scale: (widths.append(g.width),
                                                                               gather(q, kc, vc, g, scale))[1])
    monkeypatch.setattr(E, "gather_index", lambda *a: (builds.append(1), build(*a))[1])
    eng = Engine(model, SCHED, block_size=4)
    assert eng.attention.decode_path == "gather"
    assert eng.generate(reqs, max_new_tokens=new) == want
    steps = new - 1
    assert len(builds) == steps * len(eng.stages)
    assert len(widths) == steps * eng.num_layers
    # every layer of a stage at a step reads the same width: the longest sequence's blocks in use
    lens = [eng.stage_lengths(r["input_ids"]) for r in reqs]
    want = []
    for t in range(1, new):
        for l in range(eng.num_layers):
            k = eng.stage_of_layer[l]
            want.append(-(-(max(L[k] for L in lens) + t) // 4))
    assert widths == want
    reserved = max(-(-(L[0] + new) // 4) for L in lens)
    assert widths[0] < reserved


def test_cuda_graph_decode_bookkeeping_on_cpu(monkeypatch, model):
    """What ``cuda_graphs=True`` does around the capture, checked on the CPU with the capture
    replaced by a plain call whose "replay" re-runs the step on the same static buffers: batch
    buckets with padded rows (which must write nothing), buffers that keep their addresses while a
    bucket is reused, a reload when the batch changes, and the same tokens as eager decode. The
    capture itself (torch.cuda.graph) is only checked on a GPU."""
    from adsc_ext.runtime import engine as E

    captured = []

    def fake_capture(fn, pool):
        out = fn()
        captured.append(fn)
        return (lambda: out.copy_(fn())), out

    monkeypatch.setattr(E, "_require_cuda_graphs", lambda device: None)
    monkeypatch.setattr(E, "_capture", fake_capture)
    reqs, _ = requests(model)
    reqs2 = [dict(reqs[0], max_new_tokens=3), reqs[1], reqs[2]]
    want = Engine(model, SCHED, block_size=4).generate(reqs2, max_new_tokens=7)
    blocks = Engine(model, SCHED, block_size=4).pool_blocks_for(reqs2, 7)
    eng = Engine(model, SCHED, block_size=4, cuda_graphs=True, num_blocks=blocks)  # a persistent pool
    ptrs = []
    step = E._GraphRunner.step

    def spy_step(self, state):
        ptrs.append((self.batch, self.tokens.data_ptr(), self.lens[0].data_ptr(), state.tokens.data_ptr()))
        return step(self, state)

    monkeypatch.setattr(E._GraphRunner, "step", spy_step)
    got = eng.generate(reqs2, max_new_tokens=7)
    assert got == want
    assert eng.stats["cuda_graphs"] is True
    # 3 requests -> bucket 4 (one padded row); after request 0 leaves, 2 -> bucket 2
    assert [p[0] for p in ptrs] == [4, 4, 2, 2, 2, 2]
    assert len({p[1:] for p in ptrs[:2]}) == 1 and len({p[1:] for p in ptrs[2:]}) == 1
    assert all(p[1] == p[3] for p in ptrs)  # the step reads the runner's static buffers
    assert len(captured) == 2 == eng.stats["graphs_captured"]
    # padded rows stay at length 0 and position 0 (they write nothing and read one key)
    runner = next(r for (b, _), r in eng._graphs.items() if b == 4)
    assert runner.lens[0][3].item() == 0 and runner.pos[3].item() == 0 and not runner.valid[3]
    # A second call on the same (persistent) pool reuses the runners and their graphs.
    assert eng.generate(reqs2, max_new_tokens=7) == want
    assert len(captured) == 2
    # Fresh pools per call (num_blocks=None) move the KV tensors: the graphs are captured again.
    fresh = Engine(model, SCHED, block_size=4, cuda_graphs=True)
    assert fresh.generate(reqs2, max_new_tokens=7) == want == fresh.generate(reqs2, max_new_tokens=7)
    assert len(captured) == 6
    # ... and no runner keeps a call's fresh pool (nor its graph, which baked the pool in) afterwards
    assert all(r.pool is None and r.replay is None and r.out is None for r in fresh._graphs.values())
    # sampling runs on the device outside the graph, seeded as in eager decode
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert (eng.generate(reqs, max_new_tokens=4, temperature=0.9, generator=g())
            == Engine(model, SCHED, block_size=4).generate(reqs, max_new_tokens=4, temperature=0.9, generator=g()))


def test_cuda_graphs_need_a_cuda_device(model):
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        Engine(model, SCHED, cuda_graphs=True)


# ---- attention kernels against dense references ------------------------------------------------
def test_varlen_prefill_and_paged_decode_match_dense():
    g = torch.Generator().manual_seed(0)
    H, Hkv, D = 4, 2, 8
    lens = [5, 1, 7]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    q, k, v = (torch.randn(13, h, D, generator=g) for h in (H, Hkv, Hkv))
    out = Attention("sdpa").varlen_prefill(q, k, v, cu, 7, 0.3)
    for i, n in enumerate(lens):
        a = int(cu[i])
        kk = k[a:a + n].repeat_interleave(2, 1)
        vv = v[a:a + n].repeat_interleave(2, 1)
        s = torch.einsum("qhd,khd->hqk", q[a:a + n], kk) * 0.3
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -float("inf"))
        ref = torch.einsum("hqk,khd->qhd", s.softmax(-1), vv)
        torch.testing.assert_close(out[a:a + n], ref)
    # paged decode: sequence i's keys live in scattered blocks
    bs = 2
    kc, vc = torch.zeros(10, bs, Hkv, D), torch.zeros(10, bs, Hkv, D)
    tables = [[3, 7, 1], [9], [0, 2, 4, 6]]
    seq_lens = [5, 1, 7]
    qd = torch.randn(3, H, D, generator=g)
    for i, (t, n) in enumerate(zip(tables, seq_lens)):
        a = int(cu[i])
        for j in range(n):
            kc[t[j // bs], j % bs] = k[a + j]
            vc[t[j // bs], j % bs] = v[a + j]
    bt = torch.zeros(3, 4, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    o = paged_decode_gather(qd, kc, vc, gather_index(bt, sl, bt.shape[1], kc.shape[1]), 0.3)
    for i, n in enumerate(seq_lens):
        a = int(cu[i])
        kk = k[a:a + n].repeat_interleave(2, 1)
        vv = v[a:a + n].repeat_interleave(2, 1)
        s = torch.einsum("hd,khd->hk", qd[i], kk) * 0.3
        torch.testing.assert_close(o[i], torch.einsum("hk,khd->hd", s.softmax(-1), vv))


def _dense_varlen(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal):
    """Reference packed attention (bottom-right aligned causal mask, GQA by repetition)."""
    import torch.nn.functional as F

    assert cu_q.dtype == torch.int32 and cu_k.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k >= int((cu_k[1:] - cu_k[:-1]).max())
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    for a, b, c, d in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        qi = q[a:b].transpose(0, 1)
        ki = k[c:d].repeat_interleave(rep, 1).transpose(0, 1)
        vi = v[c:d].repeat_interleave(rep, 1).transpose(0, 1)
        mask = None
        if causal:
            mask = torch.ones(b - a, d - c, dtype=torch.bool).tril(d - c - (b - a))
        o = F.scaled_dot_product_attention(qi[None], ki[None], vi[None], attn_mask=mask, scale=scale)
        out[a:b] = o[0].transpose(0, 1)
    return out


def _unpage(k_cache, block_table, seq_lens):
    """Packed keys of every sequence from a paged cache."""
    bs = k_cache.shape[1]
    rows = []
    for t, n in zip(block_table.tolist(), seq_lens.tolist()):
        rows += [k_cache[t[j // bs], j % bs] for j in range(n)]
    return torch.stack(rows)


# The public signatures of flash-attn 2.8 (flash_attn/flash_attn_interface.py), recorded here because
# flash-attn cannot be installed on the CI machine: the stand-ins below have exactly these parameters,
# so a call that passes an argument flash-attn does not take fails here as it would there.
def _flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    assert dropout_p == 0.0 and block_table is None and not return_attn_probs
    return _dense_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal)


_FLASH_KVCACHE_CALLS = []


def _flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                             cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                             softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                             rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    _FLASH_KVCACHE_CALLS.append(k_cache.shape[1])
    assert q.dim() == 4 and q.shape[1] == 1 and k is None and v is None
    assert block_table.dtype == torch.int32 and cache_seqlens.dtype == torch.int32
    assert k_cache.shape[1] % 256 == 0  # flash-attn 2: "Paged KV cache block size must be divisible by 256"
    gather = gather_index(block_table, cache_seqlens, block_table.shape[1], k_cache.shape[1])
    o = paged_decode_gather(q[:, 0], k_cache, v_cache, gather, softmax_scale)
    return o[:, None]


def _torch_varlen_stand_in(signature, calls):
    """A stand-in for torch.nn.attention.varlen.varlen_attn that accepts exactly ``signature``."""
    import inspect

    def varlen_attn(*args, **kwargs):
        a = signature.bind(*args, **kwargs)
        a.apply_defaults()
        p = a.arguments
        causal = p["window_size"] == (-1, 0) if "window_size" in p else p["is_causal"]
        scale = p.get("scale")
        q, k, v = p["query"], p["key"], p["value"]
        if k.shape[-2] != q.shape[1] and not p.get("enable_gqa", False):
            raise ValueError("Expect query and key/value to have the same number of heads")
        if p.get("block_table") is not None:
            calls.append(k.shape[1])
            assert p["seqused_k"] is not None and p["block_table"].dtype == torch.int32
            assert torch.equal(p["cu_seq_k"][1:] - p["cu_seq_k"][:-1], p["seqused_k"])
            k, v = (_unpage(t, p["block_table"], p["seqused_k"]) for t in (k, v))
        return _dense_varlen(q, k, v, p["cu_seq_q"], p["cu_seq_k"], p["max_q"], p["max_k"], scale, causal)

    varlen_attn.__signature__ = signature
    assert inspect.signature(varlen_attn) == signature
    return varlen_attn


def _newest_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                   window_size=(-1, -1), enable_gqa=False, seqused_k=None, block_table=None, num_splits=None):
    """torch 2.12/2.13's varlen_attn signature, recorded so the paged path is tested on every torch."""
    raise AssertionError("only the signature is used")


@pytest.mark.parametrize("signature", ["installed", "torch-2.13"])
def test_flash_and_torch_varlen_wiring_with_stand_ins(monkeypatch, model, signature):
    """The CUDA backends' call wiring on the CPU: flash-attn 2.8 stand-ins with its recorded signatures,
    and torch's ``varlen_attn`` signature (this torch's own, and 2.13's with ``block_table``)."""
    import inspect
    import sys
    import types

    import torch.nn.attention.varlen as tv

    from adsc_ext.runtime import attention as A

    fake = types.ModuleType("flash_attn")
    fake.flash_attn_varlen_func = _flash_attn_varlen_func
    fake.flash_attn_with_kvcache = _flash_attn_with_kvcache
    monkeypatch.setitem(sys.modules, "flash_attn", fake)
    monkeypatch.setattr(A, "_unavailable_reason", lambda name, device: None)
    sig = inspect.signature(tv.varlen_attn if signature == "installed" else _newest_varlen)
    tv_paged = {"block_table", "seqused_k"} <= set(sig.parameters)
    tv_calls = []
    monkeypatch.setattr(tv, "varlen_attn", _torch_varlen_stand_in(sig, tv_calls))
    reqs, _ = requests(model)
    want = Engine(model, SCHED, backend="sdpa", block_size=4).generate(reqs, max_new_tokens=4)
    _FLASH_KVCACHE_CALLS.clear()
    for backend, bs, path in (("flash_attn", 256, "paged"), ("flash_attn", 4, "gather"),
                              ("torch_varlen", 4, "gather"), ("torch_varlen", 256, "paged" if tv_paged else "gather")):
        eng = Engine(model, SCHED, backend=backend, block_size=bs)
        assert (eng.backend, eng.attention.decode_path) == (backend, path)
        assert eng.generate(reqs, max_new_tokens=4) == want
        assert eng.stats["decode_path"] == path
    assert _FLASH_KVCACHE_CALLS and set(_FLASH_KVCACHE_CALLS) == {256}  # paged flash decode only with 256-token blocks
    assert set(tv_calls) == ({256} if tv_paged else set())
    if signature == "torch-2.13":
        assert tv_paged


def test_torch_varlen_refusing_block_tables_falls_back_to_gather(monkeypatch, model):
    """A torch whose FlashAttention build rejects block tables: one RuntimeWarning, then gather."""
    import inspect

    import torch.nn.attention.varlen as tv

    from adsc_ext.runtime import attention as A

    calls = []
    inner = _torch_varlen_stand_in(inspect.signature(_newest_varlen), calls)

    def refusing(*args, **kwargs):
        if kwargs.get("block_table") is not None:
            raise RuntimeError("Paged KV cache block size must be divisible by 256")  # as FA2 would
        return inner(*args, **kwargs)

    refusing.__signature__ = inspect.signature(_newest_varlen)
    monkeypatch.setattr(tv, "varlen_attn", refusing)
    monkeypatch.setattr(A, "_unavailable_reason", lambda name, device: None)
    reqs, _ = requests(model)
    want = Engine(model, SCHED, backend="sdpa", block_size=256).generate(reqs, max_new_tokens=3)
    eng = Engine(model, SCHED, backend="torch_varlen", block_size=256)
    assert eng.attention.decode_path == "paged"
    with pytest.warns(RuntimeWarning, match="refused the paged KV cache"):
        assert eng.generate(reqs, max_new_tokens=3) == want
    assert eng.stats["decode_path"] == eng.attention.decode_path == "gather"


def test_torch_varlen_older_signature(monkeypatch, model):
    """torch releases before block_table/scale/enable_gqa (``is_causal`` positional): K/V heads are
    repeated, decode gathers, and a non-default scale is refused with a clear error."""
    import inspect

    import torch.nn.attention.varlen as tv

    from adsc_ext.runtime import attention as A

    def old(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        raise AssertionError("only the signature is used")

    calls = []
    monkeypatch.setattr(tv, "varlen_attn", _torch_varlen_stand_in(inspect.signature(old), calls))
    monkeypatch.setattr(A, "_unavailable_reason", lambda name, device: None)
    reqs, _ = requests(model)
    want = Engine(model, SCHED, backend="sdpa", block_size=4).generate(reqs, max_new_tokens=3)
    eng = Engine(model, SCHED, backend="torch_varlen", block_size=256)
    # (a paged call could not even bind this signature: the stand-in would raise TypeError)
    assert eng.attention.decode_path == "gather" and eng.generate(reqs, max_new_tokens=3) == want
    q = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="no scale argument"):
        eng.attention.varlen_prefill(q, q, q, torch.tensor([0, 3], dtype=torch.int32), 3, 0.5)

    def alien(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k):
        raise AssertionError

    monkeypatch.setattr(tv, "varlen_attn", alien)
    with pytest.raises(ValueError, match="neither window_size nor is_causal"):
        Attention("torch_varlen")


def test_return_logits_are_the_raw_scores(model):
    reqs, _ = requests(model)
    eng = Engine(model, SCHED, block_size=4)
    plain = eng.generate(reqs, max_new_tokens=3)
    out = eng.generate(reqs, max_new_tokens=3, return_logits=True)
    for toks, (t2, logits) in zip(plain, out):
        assert toks == t2 and logits.shape == (3, model.config.text_config.vocab_size)
        assert logits.dtype == torch.float32 and torch.isfinite(logits).all()  # image token not masked
        masked = logits.clone()
        masked[:, model.config.image_token_id] = -float("inf")
        assert masked.argmax(-1).tolist() == toks
    # first-step logits are the HF ADSC model's last-position logits
    m = apply_adsc(make(), SCHED)
    with torch.no_grad():
        ref = m(input_ids=reqs[0]["input_ids"][None], pixel_values=reqs[0]["pixel_values"]).logits[0, -1]
    torch.testing.assert_close(out[0][1][0], ref, rtol=1e-4, atol=1e-4)


# ---- CUDA: the same engine in bf16 on a GPU against fp32 (skipped without a GPU) ------------------------
def _cuda_backends():
    if not torch.cuda.is_available():
        return []
    from adsc_ext.runtime import available_backends

    return available_backends("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("block_size", [16, 256])
def test_cuda_bf16_engine_matches_fp32(block_size):
    """LLaVA-1.5-7B shapes (4 decoder layers, random weights) on a GPU: every CUDA backend in bf16
    against the fp32 SDPA engine. FlashAttention's accuracy rule: a backend's error against fp32 is
    at most twice that of the plain SDPA engine run in bf16. The first decode step (the paged cache)
    is compared with the bf16 SDPA engine's, on the rows where both picked the same first token."""
    from adsc_ext.testing import build_llava, llava15_7b_config

    cfg = llava15_7b_config()
    cfg.text_config.num_hidden_layers = 4
    torch.manual_seed(0)
    with torch.device("cuda"):
        m32 = build_llava(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    m16 = build_llava(cfg, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    m16.cuda()
    g = torch.Generator().manual_seed(0)
    reqs = []
    for text in (64, 7, 130, 20, 1, 33):
        ids = torch.cat([torch.tensor([1]), torch.full((576,), cfg.image_token_id),
                         torch.randint(3, 30000, (text,), generator=g)])
        reqs.append(dict(input_ids=ids, pixel_values=torch.randn(1, 3, 336, 336, generator=g)))
    reqs.append(dict(input_ids=torch.randint(3, 30000, (40,), generator=g), pixel_values=None))
    reqs.append(dict(input_ids=torch.randint(3, 30000, (300,), generator=g), pixel_values=None))
    sched = "1:2,2:2,3:2"
    ref = Engine(m32, sched, backend="sdpa", block_size=block_size).generate(reqs, max_new_tokens=2, return_logits=True)
    sdpa16 = Engine(m16, sched, backend="sdpa", block_size=block_size).generate(reqs, max_new_tokens=2,
                                                                                return_logits=True)
    base = max((l16[0] - l32[0]).abs().max().item() for (_, l32), (_, l16) in zip(ref, sdpa16))
    scale = max(l32[0].abs().max().item() for _, l32 in ref)
    for backend in _cuda_backends():
        eng = Engine(m16, sched, backend=backend, block_size=block_size)
        out = eng.generate(reqs, max_new_tokens=2, return_logits=True)
        err = max((l16[0] - l32[0]).abs().max().item() for (_, l32), (_, l16) in zip(ref, out))
        assert err <= 2 * base + 1e-3 * scale, (backend, block_size, err, base)
        compared = 0
        for (t_ref, l_ref), (t, l) in zip(sdpa16, out):
            if t[0] == t_ref[0]:
                compared += 1
                cos = torch.nn.functional.cosine_similarity(l[1], l_ref[1], dim=0)
                assert cos > 0.99, (backend, eng.attention.decode_path, float(cos))
        assert compared >= len(reqs) // 2, (backend, compared)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["sdpa", *[b for b in _cuda_backends() if b != "sdpa"]])
def test_cuda_graph_decode_equals_eager_on_a_gpu(backend):
    """The real capture (torch.cuda.graph) and replay: greedy tokens and logits equal eager decode
    (fp32, a tiny model), through a batch change, with a persistent pool so graphs are reused."""
    model = make().cuda()
    reqs, _ = requests(model)
    reqs2 = [dict(reqs[0], max_new_tokens=3), reqs[1], reqs[2]]
    eager = Engine(model, SCHED, backend=backend, block_size=4).generate(reqs2, max_new_tokens=8, return_logits=True)
    blocks = Engine(model, SCHED, block_size=4).pool_blocks_for(reqs2, 8)
    eng = Engine(model, SCHED, backend=backend, block_size=4, num_blocks=blocks, cuda_graphs=True)
    for _ in range(2):
        got = eng.generate(reqs2, max_new_tokens=8, return_logits=True)
        for (t, l), (te, le) in zip(got, eager):
            assert t == te
            torch.testing.assert_close(l, le, rtol=1e-4, atol=1e-4)
    assert eng.stats["graphs_captured"] == 2  # buckets 4 and 2, captured once, replayed after
