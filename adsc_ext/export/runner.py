"""Run an exported ADSC folder on ONNX Runtime: :class:`OnnxRunner`.

``OnnxRunner(folder).generate(requests, max_new_tokens)`` takes the requests of
:meth:`adsc_ext.runtime.Engine.generate` and returns what it returns (one list of token ids per
request; ``(tokens, logits)`` with ``return_logits=True``). One call runs:

1. ``vision.onnx`` on every request's images, ``embed.onnx`` on the left-padded prompt batch, and
   the image features scattered into the image-token rows (LLaVA's rule);
2. the plan on the host, once per batch (:func:`adsc_ext.stage_plan`, padded layout, left padding);
3. ``prefill.onnx`` -> the first token of every row and every layer's K/V at its stage's length;
4. greedy (or sampled) decode with ``decode.onnx``: the K/V of each stage grow by one token per
   step; finished rows leave the batch.

Token picking is :func:`adsc_ext.sampling.pick_tokens`, the rule every generator here uses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..models.llava import AdscInputError, check_request
from .manifest import GRAPH_FILES, ExportError, load_manifest

__all__ = ["OnnxRunner"]

_NP = {"float32": np.float32, "float16": np.float16}


class _Spec:
    """The fields of a :class:`~adsc_ext.models.LlavaSpec` that ``check_request`` reads, from the manifest."""

    def __init__(self, man):
        self.grid = tuple(man["grid"])
        self.image_token_id = int(man["image_token_id"])
        self.tokens_per_image = int(man["tokens_per_image"])
        self.vocab_size = int(man["model"]["vocab_size"])
        self.max_positions = int(man["model"]["max_positions"])
        self.image_size = int(man["image_size"])


def _left_padded(live) -> Tuple[torch.Tensor, torch.Tensor]:
    """The live requests' prompts as a left-padded batch: ``(input_ids, attention_mask)``, each
    int64 ``[B, S]`` on the host (padding: token 0, masked out)."""
    B, S = len(live), max(s["ids"].numel() for s in live)
    ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, s in enumerate(live):
        n = s["ids"].numel()
        ids[b, S - n:] = s["ids"]
        mask[b, S - n:] = 1
    return ids, mask


class OnnxRunner:
    """Greedy / sampled generation with an exported folder on ONNX Runtime.

    Args:
        folder: the folder :func:`~adsc_ext.export.export_onnx` wrote.
        providers: ONNX Runtime execution providers (default: CPU).
        schedule: the schedule the caller expects; a folder exported with another one is refused.
        session_options: an ``onnxruntime.SessionOptions`` for every session.

    Raises :class:`~adsc_ext.export.ExportError` when the folder is not a complete export, was made
    with another schedule, or holds a graph from another export.
    """

    def __init__(self, folder, providers: Optional[Sequence] = None, *, schedule=None, session_options=None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError(f"OnnxRunner needs onnxruntime (pip install 'adsc_ext[export]'): {exc}") from None
        man = self._read_manifest(folder, schedule)
        if man["dtype"] not in _NP:
            raise ExportError(f"{self.folder}: a {man['dtype']} export cannot run on ONNX Runtime here "
                              f"(numpy has no {man['dtype']}); export float32 or float16 to check it")
        self.np_dtype = _NP[man["dtype"]]
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.sessions: Dict[str, Any] = {}
        for name, file in GRAPH_FILES.items():
            path = self.folder / file
            model_arg: Any = str(path)
            import onnx

            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            if meta.get("adsc_schedule") != man["schedule"] or meta.get("adsc_graph") != name:
                raise ExportError(
                    f"{path} is not this export's {name} graph: it carries schedule "
                    f"'{meta.get('adsc_schedule')}' (graph {meta.get('adsc_graph')!r}), the manifest says "
                    f"'{man['schedule']}'"
                )
            if name == "prefill" and man["compaction"] == "plugin":
                model_arg = _with_plugin_reference(path)
            try:
                self.sessions[name] = ort.InferenceSession(model_arg, sess_options=session_options,
                                                           providers=self.providers)
            except Exception as exc:  # onnxruntime's pybind errors (Fail, NotImplemented...) share no base
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportError(f"ONNX Runtime ({', '.join(map(str, self.providers))}) cannot load "
                                  f"{path}: {first}") from exc
        self.stats: Dict[str, Any] = {}

    def _read_manifest(self, folder, schedule) -> Dict[str, Any]:
        """Load the folder's manifest (checked against ``schedule`` if given) and set the model's
        facts from it; shared with the TensorRT runner."""
        from ..schedule import Schedule

        self.folder = Path(folder)
        want = None if schedule is None else str(Schedule.coerce(schedule))
        self.manifest = man = load_manifest(self.folder, want)
        self.schedule = Schedule.parse(man["schedule"])
        self.spec = _Spec(man)
        self.grid = self.spec.grid
        self.image_token_id = self.spec.image_token_id
        self.num_layers = int(man["model"]["num_layers"])
        self.vocab_size, self.max_positions = self.spec.vocab_size, self.spec.max_positions
        self.image_size = self.spec.image_size
        self.num_stages = len(man["stages"])
        self.stage_of_layer = list(man["stage_of_layer"])
        return man

    # ---- requests (the engine's rules and messages) ------------------------------------------------
    def _check(self, i: int, req, max_new_tokens: int) -> Dict[str, Any]:
        ids, pix, _, max_new = check_request(self.spec, i, req, max_new_tokens)
        return {"rid": i, "ids": ids, "pix": pix, "max_new": max_new, "tokens": [], "logits": []}

    # ---- generation ---------------------------------------------------------------------------------
    def generate(self, requests: Sequence[dict], max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_p: float = 1.0, eos_token_id: Optional[int] = None, suppress_image_token: bool = True,
                 generator: Optional[torch.Generator] = None, return_exceptions: bool = False,
                 return_logits: bool = False, progress=None) -> List[Any]:
        """Generate for every request; the arguments and results of :meth:`Engine.generate`.

        Each request: ``{"input_ids": LongTensor [n], "pixel_values": [k, 3, H, W] or None,
        "max_new_tokens": optional int}``. Greedy unless ``temperature > 0``. A request stops after
        its ``max_new_tokens`` or at ``eos_token_id`` (included). Bad requests raise
        :class:`~adsc_ext.models.AdscInputError` before any work or, with ``return_exceptions``,
        get it as their result. ``return_logits=True``: each result is ``(tokens, logits)``, logits
        float32 ``[len(tokens), vocab]``.
        """
        results: List[Any] = [None] * len(requests)
        live = []
        for i, req in enumerate(requests):
            try:
                live.append(self._check(i, req, max_new_tokens))
                if not return_logits:
                    live[-1]["logits"] = None  # keep no per-step scores nobody asked for
            except AdscInputError as exc:
                if not return_exceptions:
                    raise
                results[i] = exc
        # stage_lengths: the prefill batch's padded length per stage; prefill_kv_lengths / kv_lengths:
        # every layer's cached length after prefill / after the last decode step
        self.stats = {"prefill_batch": len(live), "decode_steps": 0, "stage_lengths": None,
                      "prefill_kv_lengths": None, "kv_lengths": None}
        if not live:
            return results
        sample = dict(temperature=temperature, top_p=top_p, generator=generator,
                      suppress_token_id=self.image_token_id if suppress_image_token else None)
        state = self._prefill(live, sample)
        while True:
            keep = [j for j, s in enumerate(live) if not self._done(s, eos_token_id)]
            for j, s in enumerate(live):
                if j not in keep:
                    results[s["rid"]] = self._result(s, return_logits)
            if progress is not None:
                progress(sum(r is not None for r in results), len(requests))
            if not keep:
                break
            if len(keep) < len(live):
                live = [live[j] for j in keep]
                state = {k: (v[keep] if isinstance(v, np.ndarray) else [a[keep] for a in v]) for k, v in state.items()}
            state = self._decode(live, state, sample)
            self.stats["decode_steps"] += 1
        return results

    @staticmethod
    def _done(s, eos) -> bool:
        return len(s["tokens"]) >= s["max_new"] or (eos is not None and bool(s["tokens"]) and s["tokens"][-1] == eos)

    @staticmethod
    def _result(s, return_logits: bool):
        toks = list(s["tokens"])
        return (toks, torch.from_numpy(np.stack(s["logits"]).astype(np.float32))) if return_logits else toks

    def _pick(self, live, logits: np.ndarray, sample) -> np.ndarray:
        from ..sampling import pick_tokens

        picked = pick_tokens(torch.from_numpy(logits), **sample).numpy()
        for s, row, t in zip(live, logits, picked):
            if s["logits"] is not None:
                s["logits"].append(row.copy())
            s["tokens"].append(int(t))
        return picked

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed"].run(None, {"input_ids": ids})[0]

    def _prefill(self, live, sample) -> Dict[str, Any]:
        from ..ops import stage_plan

        ids, mask = _left_padded(live)
        h = self._embed(ids.numpy())
        pix = [s["pix"] for s in live if s["pix"] is not None]
        if pix:
            pv = torch.cat(pix).to(torch.float32).numpy().astype(self.np_dtype)
            feats = self.sessions["vision"].run(None, {"pixel_values": pv})[0]
            rows = (ids == self.image_token_id).numpy() & (mask.numpy() != 0)
            h[rows] = feats.reshape(-1, feats.shape[-1]).astype(h.dtype)
        plan = stage_plan(self.schedule, input_ids=ids, attention_mask=mask, image_token_id=self.image_token_id,
                          grid=self.grid, padding_side="left")
        feed = {"inputs_embeds": h, "attention_mask": mask.numpy(),
                "position_ids": plan.stages[0].position_ids.numpy()}
        for st in plan.stages[1:]:
            feed[f"adsc_index.{st.stage}"] = st.index.to(torch.int32).numpy()
        out = self.sessions["prefill"].run(None, feed)
        masks = [mask.numpy()] + [(st.source_index >= 0).to(torch.long).numpy() for st in plan.stages[1:]]
        self.stats["stage_lengths"] = [int(st.index.shape[1]) for st in plan.stages]
        self.stats["prefill_kv_lengths"] = self.stats["kv_lengths"] = [int(k.shape[2]) for k in out[1::2]]
        self._pick(live, out[0], sample)
        return {"masks": masks, "kv": out[1:],
                "pos": np.array([[s["ids"].numel()] for s in live], dtype=np.int64)}

    def _decode(self, live, state, sample) -> Dict[str, Any]:
        toks = np.array([[s["tokens"][-1]] for s in live], dtype=np.int64)
        feed = {"inputs_embeds": self._embed(toks), "position_ids": state["pos"]}
        for k, m in enumerate(state["masks"]):
            feed[f"past_mask.{k}"] = m
        for l in range(self.num_layers):
            feed[f"past_key_values.{l}.key"] = state["kv"][2 * l]
            feed[f"past_key_values.{l}.value"] = state["kv"][2 * l + 1]
        out = self.sessions["decode"].run(None, feed)
        self.stats["kv_lengths"] = [int(k.shape[2]) for k in out[1::2]]
        self._pick(live, out[0], sample)
        ones = np.ones((len(live), 1), dtype=np.int64)
        return {"masks": [np.concatenate([m, ones], axis=1) for m in state["masks"]], "kv": out[1:],
                "pos": state["pos"] + 1}


def _with_plugin_reference(path: Path) -> bytes:
    """A plugin-compaction prefill graph that ONNX Runtime can run: the ``AdscCompactTokens`` nodes
    resolve to :func:`~adsc_ext.export.onnx_export.plugin_reference_function` (standard ops)."""
    import onnx

    from .onnx_export import plugin_reference_function

    model = onnx.load(str(path))  # with its weights: the bytes carry everything
    model.functions.append(plugin_reference_function())
    return model.SerializeToString()
