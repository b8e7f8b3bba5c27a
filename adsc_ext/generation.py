"""One generation loop for every runtime: requests in, token lists out.

:class:`Generator` owns ``generate()`` and its loop -- **admit** waiting requests, **prefill**
them, **decode** the running batch one token per step, **pick** tokens
(:func:`adsc_ext.sampling.pick_tokens`) and **retire** finished requests -- over a small backend
protocol that the serving engine (:class:`~adsc_ext.runtime.Engine`), the ONNX Runtime and
TensorRT runners (:class:`~adsc_ext.export.OnnxRunner`, :class:`~adsc_ext.export.TensorRTRunner`)
and the FastV baseline (:class:`~adsc_ext.baselines.FastV`) implement:

========================  =======================================================================
``_check(seq)``           backend checks of a request (e.g. the engine's "can it ever fit the pool")
``_start(seqs)``          set up a call (the engine sizes its KV pool)
``_admit(waiting, run)``  requests to prefill now (default: every waiting one when nothing runs)
``_prefill(seqs)``        logits ``[len(seqs), V]`` of every admitted request's last prompt token
``_decode(seqs)``         logits ``[len(seqs), V]`` of one decode step of the running batch, whose
                          rows are ``seqs`` (a backend keeps its per-row state and drops the rows
                          of requests that left)
``_accept(seqs, tokens)`` the tokens just picked for ``seqs`` (int64, on the logits' device)
``_release(seq)``         a request finished (the engine frees its blocks)
``_finish(stats)``        the call ended, also on errors; add backend statistics
``_sync()``               wait for the device (for the timings)
========================  =======================================================================

One request type (:class:`Request`, or the dict form ``{"input_ids": [n], "pixel_values": [k, 3,
H, W] or None, "max_new_tokens": optional int}``) and one sampling type (:class:`SamplingParams`),
each checked once; ``generate(requests, max_new_tokens, temperature=..., ...)`` keeps its keyword
form. Each backend's model spec checks the requests against the model
(:meth:`~adsc_ext.models.ModelSpec.check_request`).
"""

from __future__ import annotations

import numbers
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .errors import AdscError, AdscInputError
from .sampling import check_sampling, pick_tokens

__all__ = ["Request", "SamplingParams", "Seq", "Generator"]


def _max_new(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise AdscInputError(f"{what}max_new_tokens must be an int >= 1, got {value!r}")
    return int(value)


@dataclass
class Request:
    """One generation request.

    input_ids: int ``[n]`` (``[1, n]`` is accepted), the prompt with its image tokens.
    pixel_values: the prompt's images in the model's preprocessing (LLaVA: ``[k, 3, S, S]``), or None.
    max_new_tokens: this request's limit (None: the call's).
    inputs: other processor outputs the model's spec reads (e.g. a per-image grid).
    """

    input_ids: torch.Tensor
    pixel_values: Optional[torch.Tensor] = None
    max_new_tokens: Optional[int] = None
    inputs: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, i: int, req: Union["Request", Mapping[str, Any]], default_max_new: int) -> "Request":
        """A checked copy of request ``i``: ``input_ids`` int64 ``[n]`` on the host, ``pixel_values``
        detached (None for no image), ``max_new_tokens`` resolved. Raises
        :class:`~adsc_ext.errors.AdscInputError` ``"request {i}: ..."``."""
        if isinstance(req, Request):
            fields = dict(input_ids=req.input_ids, pixel_values=req.pixel_values,
                          max_new_tokens=req.max_new_tokens, **req.inputs)
        elif isinstance(req, Mapping) and "input_ids" in req:
            fields = dict(req)
        else:
            raise AdscInputError(f"request {i}: must be a dict with 'input_ids' (1-D LongTensor) and optional "
                                 f"'pixel_values'")
        ids = fields.pop("input_ids")
        if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
            raise AdscInputError(f"request {i}: input_ids must be an integer tensor")
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise AdscInputError(f"request {i}: input_ids must be a non-empty 1-D tensor, got shape "
                                 f"{tuple(ids.shape)}")
        pix = fields.pop("pixel_values", None)
        if isinstance(pix, torch.Tensor):
            if pix.dim() == 0:
                raise AdscInputError(f"request {i}: pixel_values must be a tensor of images (or None), got a 0-d tensor")
            pix = pix.detach() if pix.shape[0] else None
        max_new = fields.pop("max_new_tokens", None)
        max_new = default_max_new if max_new is None else _max_new(max_new, f"request {i}: ")
        # requests live on the host until their prefill
        return cls(ids.detach().to("cpu", torch.int64), pix, max_new, fields)


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are picked, and when a request stops (checked once, when made).

    Greedy at ``temperature == 0`` (the default), else softmax sampling at ``temperature`` (finite,
    > 0) with nucleus truncation at ``top_p`` (in ``(0, 1]``), drawing from ``generator``. A
    request stops after ``max_new_tokens`` (its own if it sets one) or after ``eos_token_id``
    (included). ``suppress_image_token``: never pick the image placeholder token.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    eos_token_id: Optional[int] = None
    suppress_image_token: bool = True
    generator: Optional[torch.Generator] = field(default=None, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "max_new_tokens", _max_new(self.max_new_tokens, ""))
        t, p = check_sampling(self.temperature, self.top_p)
        object.__setattr__(self, "temperature", t)
        object.__setattr__(self, "top_p", p)
        eos = self.eos_token_id
        if eos is not None and (isinstance(eos, bool) or not isinstance(eos, numbers.Integral)):
            raise AdscInputError(f"eos_token_id must be an int or None, got {eos!r}")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise AdscInputError(f"generator must be a torch.Generator, got {type(self.generator).__name__}")


@dataclass
class Seq:
    """A request inside one ``generate`` call."""

    rid: int  # its index in the call's requests
    request: Request
    grids: List[Tuple[int, int]]  # the grid of every image (the model spec's check)
    max_new: int
    stage_lens: Optional[List[int]] = None  # prompt tokens alive in every stage (backends that need it)
    generated: List[int] = field(default_factory=list)
    logits: Optional[List[torch.Tensor]] = None  # per generated token, with return_logits=True

    @property
    def ids(self) -> torch.Tensor:
        return self.request.input_ids

    @property
    def pixel_values(self) -> Optional[torch.Tensor]:
        return self.request.pixel_values

    @property
    def n(self) -> int:
        return self.request.input_ids.numel()

    @property
    def num_images(self) -> int:
        return len(self.grids)


_KEYWORD_DEFAULTS = dict(temperature=0.0, top_p=1.0, eos_token_id=None, suppress_image_token=True, generator=None)


class Generator:
    """The generation loop (module docstring); a backend subclasses it and sets ``self.spec`` (its
    :class:`~adsc_ext.models.ModelSpec`, for the request checks) and ``self.stats``."""

    spec: Any
    stats: Dict[str, Any]
    _running: bool = False

    def generate(self, requests: Sequence[Union[Request, Mapping[str, Any]]],
                 max_new_tokens: Union[int, SamplingParams] = 32, *, temperature: float = 0.0, top_p: float = 1.0,
                 eos_token_id: Optional[int] = None, suppress_image_token: bool = True,
                 generator: Optional[torch.Generator] = None, return_exceptions: bool = False,
                 return_logits: bool = False, progress: Optional[Callable[[int, int], None]] = None) -> List[Any]:
        """Generate for every request; returns one list of token ids per request (in order).

        Each request: a :class:`Request` or ``{"input_ids": LongTensor [n], "pixel_values": [k, 3, H, W]
        or None, "max_new_tokens": optional int}``. The second argument is ``max_new_tokens`` (an
        int) or a :class:`SamplingParams` (then the sampling keywords must keep their defaults).
        Greedy unless ``temperature > 0`` (then top-p sampling). A request stops after its
        ``max_new_tokens`` or at ``eos_token_id`` (included).

        Bad requests raise :class:`~adsc_ext.errors.AdscInputError` (or the backend's
        ``KVCapacityError``) before any work, or, with ``return_exceptions=True``, get the exception
        as their result while the others run. ``return_logits=True`` makes each result ``(tokens,
        logits)``, logits a float32 CPU tensor ``[len(tokens), vocab]`` of the raw scores each
        token was picked from. ``progress(done, total)`` is called after every step; it must not
        call back into this object (``generate`` is not re-entrant: a nested call raises
        ``RuntimeError``). ``stats`` afterwards: ``prefills``, ``admitted_per_prefill``,
        ``prefill_seconds``, ``decode_seconds``, ``decode_steps``, ``decode_tokens`` and the
        backend's own.
        """
        if isinstance(max_new_tokens, SamplingParams):
            given = dict(temperature=temperature, top_p=top_p, eos_token_id=eos_token_id,
                         suppress_image_token=suppress_image_token, generator=generator)
            changed = [k for k, v in given.items() if v is not _KEYWORD_DEFAULTS[k] and v != _KEYWORD_DEFAULTS[k]]
            if changed:
                raise AdscInputError(f"give the sampling settings in the SamplingParams or as keywords, not both "
                                     f"(got SamplingParams and {', '.join(changed)})")
            params = max_new_tokens
        else:
            params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                    eos_token_id=eos_token_id, suppress_image_token=suppress_image_token,
                                    generator=generator)
        if self._running:
            raise RuntimeError(f"{type(self).__name__}.generate() is not re-entrant: it was called while a generate() "
                               f"call on this object is running (from its progress callback?); use a second "
                               f"{type(self).__name__}")
        self._running = True
        try:
            with torch.inference_mode():
                return self._loop(list(requests), params, return_exceptions, return_logits, progress)
        finally:
            self._running = False

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self, requests, params: SamplingParams, return_exceptions, return_logits, progress) -> List[Any]:
        results: List[Any] = [None] * len(requests)
        live: List[Seq] = []
        for i, raw in enumerate(requests):
            try:
                req = Request.coerce(i, raw, params.max_new_tokens)
                seq = Seq(i, req, self.spec.check_request(i, req), req.max_new_tokens)
                self._check(seq)
            except AdscError as exc:
                if not return_exceptions:
                    raise
                results[i] = exc
                continue
            seq.logits = [] if return_logits else None
            live.append(seq)
        suppress = self.spec.image_token_id if params.suppress_image_token else None
        self._sample = dict(temperature=params.temperature, top_p=params.top_p, generator=params.generator,
                            suppress_token_id=suppress)
        stats = self.stats = dict(prefills=0, admitted_per_prefill=[], prefill_seconds=0.0, decode_seconds=0.0,
                                  decode_steps=0, decode_tokens=0)
        waiting: Deque[Seq] = deque(live)
        running: List[Seq] = []
        self._start(live)
        try:
            while waiting or running:
                admitted = self._admit(waiting, running)
                if not admitted and not running:
                    raise RuntimeError("internal error: a waiting request fits no empty backend")  # checked before
                if admitted:
                    stats["prefill_seconds"] += self._step("prefill", admitted)
                    stats["prefills"] += 1
                    stats["admitted_per_prefill"].append([s.rid for s in admitted])
                    running += admitted
                running = self._retire(running, results, params.eos_token_id)
                if running:
                    stats["decode_seconds"] += self._step("decode", running)
                    stats["decode_steps"] += 1
                    stats["decode_tokens"] += len(running)
                    running = self._retire(running, results, params.eos_token_id)
                if progress is not None:
                    progress(sum(1 for r in results if r is not None), len(requests))
        finally:
            self._finish(stats)
        return results

    def _step(self, phase: str, seqs: List[Seq]) -> float:
        """One prefill or decode step: the backend's logits, the picked tokens (one read-back)."""
        t0 = time.perf_counter()
        logits = self._prefill(seqs) if phase == "prefill" else self._decode(seqs)
        toks = pick_tokens(logits, **self._sample)  # int64 [B], on the logits' device
        for i, s in enumerate(seqs):
            if s.logits is not None:
                s.logits.append(logits[i].detach().clone())
        for s, t in zip(seqs, toks.tolist()):  # the step's one synchronisation
            s.generated.append(t)
        self._accept(seqs, toks)
        self._sync()
        return time.perf_counter() - t0

    def _retire(self, running: List[Seq], results: List[Any], eos: Optional[int]) -> List[Seq]:
        keep = []
        for s in running:
            if len(s.generated) >= s.max_new or (eos is not None and s.generated[-1] == eos):
                results[s.rid] = (list(s.generated) if s.logits is None
                                  else (list(s.generated), torch.stack(s.logits).float().cpu()))
                self._release(s)
            else:
                keep.append(s)
        return keep

    # ---- the backend protocol (defaults) -----------------------------------------------------------
    def _check(self, seq: Seq) -> None:
        """Backend checks of a request beyond the model's (raise an AdscError)."""

    def _start(self, seqs: List[Seq]) -> None:
        """A call starts with these (checked) requests."""

    def _admit(self, waiting: Deque[Seq], running: List[Seq]) -> List[Seq]:
        """The requests to prefill now, popped from ``waiting``: by default all of them, once
        nothing runs (one static batch)."""
        if running:
            return []
        out = list(waiting)
        waiting.clear()
        return out

    def _prefill(self, seqs: List[Seq]) -> torch.Tensor:  # pragma: no cover - every backend defines it
        raise NotImplementedError

    def _decode(self, seqs: List[Seq]) -> torch.Tensor:  # pragma: no cover - every backend defines it
        raise NotImplementedError

    def _accept(self, seqs: List[Seq], tokens: torch.Tensor) -> None:
        """The tokens just picked for ``seqs`` (also in each ``seq.generated``)."""

    def _release(self, seq: Seq) -> None:
        """``seq`` finished."""

    def _finish(self, stats: Dict[str, Any]) -> None:
        """The call ended (also on errors)."""

    def _sync(self) -> None:
        """Wait for the device's queued work (the timings are wall times)."""


def rows_of(state_rids: Sequence[int], seqs: Sequence[Seq]) -> Optional[List[int]]:
    """Where each of ``seqs`` sits in a batch state whose rows are ``state_rids``: None when the
    state's rows are ``seqs`` already, else the row numbers to keep (a backend drops the rest)."""
    rids = [s.rid for s in seqs]
    if list(state_rids) == rids:
        return None
    where = {r: j for j, r in enumerate(state_rids)}
    return [where[r] for r in rids]
