"""The one generation loop (adsc_ext.generation): its request and sampling types, and the loop
itself on a scripted backend (no model), then through the engine."""

import math

import pytest
import torch

from adsc_ext.errors import AdscError, AdscInputError, KVCapacityError
from adsc_ext.generation import Generator, Request, SamplingParams, rows_of
from adsc_ext.sampling import pick_tokens

V = 10


class _Spec:
    """The facts the loop reads from a model spec: the image token and the request check."""

    image_token_id = V - 1

    def check_request(self, i, req):
        if int(req.input_ids.max()) >= V:
            raise AdscInputError(f"request {i}: token ids must be in [0, {V})")
        return []


class Scripted(Generator):
    """A backend whose next token is (last token + 1) % 7 (greedy), logging the protocol calls.
    ``slots`` requests run at once (continuous batching); ``cap``: requests it can ever hold."""

    def __init__(self, slots=2, cap=None):
        self.spec, self.stats, self.slots, self.cap, self.log = _Spec(), {}, slots, cap, []

    def _check(self, seq):
        if self.cap is not None and seq.n > self.cap:
            raise KVCapacityError(f"request {seq.rid}: too long")

    def _start(self, seqs):
        self.log.append(("start", [s.rid for s in seqs]))
        self.rows = []

    def _admit(self, waiting, running):
        out = []
        while waiting and len(running) + len(out) < self.slots:
            out.append(waiting.popleft())
        return out

    def _logits(self, last):
        x = torch.full((len(last), V), -1.0)
        x[torch.arange(len(last)), torch.tensor([(t + 1) % 7 for t in last])] = 1.0
        return x

    def _prefill(self, seqs):
        self.log.append(("prefill", [s.rid for s in seqs]))
        return self._logits([int(s.ids[-1]) for s in seqs])

    def _decode(self, seqs):
        self.log.append(("decode", [s.rid for s in seqs]))
        return self._logits([s.generated[-1] for s in seqs])

    def _release(self, seq):
        self.log.append(("release", seq.rid))

    def _finish(self, stats):
        self.log.append(("finish",))


def _reqs(*lasts):
    return [dict(input_ids=torch.tensor([1, t])) for t in lasts]


def test_the_loop_admits_prefills_decodes_picks_and_retires():
    g = Scripted(slots=2)
    reqs = [dict(_reqs(0)[0], max_new_tokens=2), *_reqs(3, 5)]
    seen = []
    out = g.generate(reqs, 4, progress=lambda done, total: seen.append((done, total)))
    assert out == [[1, 2], [4, 5, 6, 0], [6, 0, 1, 2]]
    # request 2 waits for a slot and joins when request 0 retires (continuous batching)
    assert g.log[:4] == [("start", [0, 1, 2]), ("prefill", [0, 1]), ("decode", [0, 1]), ("release", 0)]
    assert ("prefill", [2]) in g.log and g.log[-1] == ("finish",)
    assert g.stats["admitted_per_prefill"] == [[0, 1], [2]] and g.stats["prefills"] == 2
    assert g.stats["decode_tokens"] == sum(len(o) for o in out) - 3  # one token per request from its prefill
    assert seen[-1] == (3, 3)


def test_eos_logits_exceptions_and_request_types():
    g = Scripted()
    out = g.generate([*_reqs(0), Request(torch.tensor([[2, 3]]), max_new_tokens=3)], 5, eos_token_id=3,
                     return_logits=True)
    assert out[0][0] == [1, 2, 3] and out[1][0] == [4, 5, 6]  # stops at eos (included) / at its own limit
    toks, logits = out[0]
    assert logits.dtype == torch.float32 and logits.shape == (3, V)
    assert [int(r.argmax()) for r in logits] == toks
    bad = [dict(input_ids=torch.tensor([1, V + 3])), dict(input_ids=torch.tensor([1, 2, 3, 4])), *_reqs(1)]
    g = Scripted(cap=3)
    with pytest.raises(AdscInputError, match="request 0: token ids"):
        g.generate(bad, 2)
    assert g.log == []  # refused before any work
    out = g.generate(bad, 2, return_exceptions=True)
    assert isinstance(out[0], AdscInputError) and isinstance(out[1], KVCapacityError) and out[2] == [2, 3]
    for req, match in ((dict(ids=torch.tensor([1])), "must be a dict with 'input_ids'"),
                       (dict(input_ids=[1, 2]), "input_ids must be an integer tensor"),
                       (dict(input_ids=torch.zeros(2, 3, dtype=torch.long)), "1-D"),
                       (dict(input_ids=torch.zeros(0, dtype=torch.long)), "non-empty"),
                       (dict(input_ids=torch.tensor([1]), max_new_tokens=2.5), "max_new_tokens must be an int >= 1")):
        with pytest.raises(AdscInputError, match=match):
            Scripted().generate([req], 2)


def test_finish_runs_on_errors_and_generate_is_not_reentrant():
    g = Scripted()

    def boom(done, total):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        g.generate(_reqs(0, 1), 3, progress=boom)
    assert g.log[-1] == ("finish",)
    with pytest.raises(RuntimeError, match="Scripted.generate\\(\\) is not re-entrant"):
        g.generate(_reqs(0), 3, progress=lambda d, t: g.generate(_reqs(1), 1))
    assert g.generate(_reqs(0), 2) == [[1, 2]]  # usable afterwards


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature="hot"), "temperature must be a number"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an int >= 1, got 2.0"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int >= 1"),
    (dict(eos_token_id="2"), "eos_token_id must be an int or None"),
    (dict(generator=3), "generator must be a torch.Generator"),
])
def test_sampling_params_are_checked_once_when_made(kw, match):
    with pytest.raises(AdscInputError, match=match) as err:
        SamplingParams(**kw)
    assert isinstance(err.value, (AdscError, ValueError))
    g = Scripted()
    sampling = {k: v for k, v in kw.items() if k != "max_new_tokens"}
    with pytest.raises(AdscInputError, match=match):  # the keyword form gets the same check, before any work
        g.generate(_reqs(0), kw.get("max_new_tokens", 2), **sampling)
    assert g.log == []


def test_sampling_params_object_and_keyword_forms_agree():
    p = SamplingParams(max_new_tokens=3, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert p.temperature == 0.7 and isinstance(p.top_p, float) and not math.isnan(p.top_p)
    a = Scripted().generate(_reqs(0, 4), p)
    b = Scripted().generate(_reqs(0, 4), 3, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(3))
    assert a == b
    with pytest.raises(AdscInputError, match="not both"):
        Scripted().generate(_reqs(0), p, temperature=0.5)
    with pytest.raises(AdscInputError, match="temperature must be a finite"):
        pick_tokens(torch.zeros(1, 3), temperature=float("nan"))


def test_rows_of():
    assert rows_of([4, 5, 6], [type("S", (), {"rid": r})() for r in (4, 5, 6)]) is None
    assert rows_of([4, 5, 6], [type("S", (), {"rid": r})() for r in (4, 6)]) == [0, 2]


# ---- through the engine ---------------------------------------------------------------------------
def test_engine_refuses_a_bad_temperature_before_any_work():
    pytest.importorskip("transformers")
    from adsc_ext.runtime import Engine
    from adsc_ext.testing import tiny_llava

    model = tiny_llava(seed=0, num_layers=4)
    eng = Engine(model, "2:2", block_size=4, num_blocks=[20, 20])
    reqs = [dict(input_ids=torch.tensor([1, 5, 6]))]
    free0 = eng.pool.num_free_blocks()
    for bad in (float("nan"), float("inf")):
        with pytest.raises(AdscInputError, match="temperature must be a finite number >= 0"):
            eng.generate(reqs, max_new_tokens=2, temperature=bad)
    assert eng.pool.num_free_blocks() == free0
    want = eng.generate(reqs, max_new_tokens=3)
    assert eng.generate([Request(torch.tensor([1, 5, 6]))], SamplingParams(max_new_tokens=3)) == want


def test_a_0d_pixel_values_is_an_input_error():
    with pytest.raises(AdscInputError, match="request 2: pixel_values must be a tensor of images"):
        Request.coerce(2, {"input_ids": torch.tensor([1, 2]), "pixel_values": torch.tensor(1.0)}, 4)
    assert Request.coerce(0, {"input_ids": torch.tensor([1, 2]), "pixel_values": torch.zeros(0, 3)}, 4).pixel_values is None
