"""Run an exported ADSC folder on ONNX Runtime: :class:`OnnxRunner`.

``OnnxRunner(folder).generate(requests, max_new_tokens)`` takes the requests of
:meth:`adsc_ext.runtime.Engine.generate` and returns what it returns (one list of token ids per
request; ``(tokens, logits)`` with ``return_logits=True``). One call runs:

1. ``vision.onnx`` on every request's images, ``embed.onnx`` on the left-padded prompt batch, and
   the image features scattered into the image-token rows (LLaVA's rule; Qwen2.5-VL: the host
   computes what the tower derives from the grids -- window order, rotary ids, attention blocks
   -- with :meth:`~adsc_ext.models.qwen_vl.QwenVLSpec.vision_feeds`, images and videos each
   into their own placeholder rows);
2. the batch's :class:`~adsc_ext.layout.StagedLayout` on the host, once per batch (the model
   spec's plan and positions -- M-RoPE ``[4, B, S]`` for Qwen2.5-VL --, padded layout, left
   padding): its gather indices, masks and positions feed the graphs; each row's decode positions
   continue by the spec's rule (:meth:`~adsc_ext.models.ModelSpec.next_positions`);
3. ``prefill.onnx`` -> the first token of every row and every layer's K/V at its stage's length;
4. greedy (or sampled) decode with ``decode.onnx``: the K/V of each stage grow by one token per
   step; finished rows leave the batch.

The runner is a backend of the one generation loop (:class:`~adsc_ext.generation.Generator`):
the requests, sampling, stopping rules, request checks and results are the engine's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..generation import Generator, Seq, rows_of
from ..layout import StagedLayout, StageMap
from .manifest import ARCHITECTURES, GRAPH_FILES, ExportError, check_graph, load_manifest, spec_of

__all__ = ["OnnxRunner"]

_NP = {"float32": np.float32, "float16": np.float16}


def _left_padded(seqs: Sequence[Seq]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The requests' prompts as a left-padded batch: ``(input_ids, attention_mask)``, each
    int64 ``[B, S]`` on the host (padding: token 0, masked out)."""
    B, S = len(seqs), max(s.n for s in seqs)
    ids = torch.zeros(B, S, dtype=torch.long)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, S - s.n:] = s.ids
        mask[b, S - s.n:] = 1
    return ids, mask


class OnnxRunner(Generator):
    """Greedy / sampled generation with an exported folder on ONNX Runtime.

    Args:
        folder: the folder :func:`~adsc_ext.export.export_onnx` wrote.
        providers: ONNX Runtime execution providers (default: CPU).
        schedule: the schedule the caller expects; a folder exported with another one is refused.
        session_options: an ``onnxruntime.SessionOptions`` for every session.

    Raises :class:`~adsc_ext.export.ExportError`, naming the file and the field, when the folder is
    not a complete export, was made with another schedule, holds a graph from another export or a
    damaged one, or has a manifest that disagrees with its graphs
    (:func:`~adsc_ext.export.manifest.check_graph`).
    """

    def __init__(self, folder, providers: Optional[Sequence] = None, *, schedule=None, session_options=None):
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError(f"OnnxRunner needs onnxruntime (pip install onnxruntime; it comes with adsc_ext's [export] extra): {exc}") from None
        man = self._read_manifest(folder, schedule)
        if man["dtype"] not in _NP:
            raise ExportError(f"{self.folder}: a {man['dtype']} export cannot run on ONNX Runtime here "
                              f"(numpy has no {man['dtype']}); export float32 or float16 to check it")
        self.np_dtype = _NP[man["dtype"]]
        self.providers = list(providers) if providers is not None else ["CPUExecutionProvider"]
        self.sessions: Dict[str, Any] = {}
        for name in GRAPH_FILES:  # every graph checked before any session is made
            check_graph(self.folder, name, man)
        for name, file in GRAPH_FILES.items():
            path = self.folder / file
            model_arg: Any = str(path)
            options = session_options
            if name == "prefill" and man["compaction"] == "plugin":
                # the graph goes to ONNX Runtime as bytes; weights over 2 GB stay in their .data files,
                # which ONNX Runtime then finds in the export folder (a session config entry)
                model_arg = _with_plugin_reference(path)
                options = session_options if session_options is not None else ort.SessionOptions()
                options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                 str(self.folder.resolve()))
            try:
                self.sessions[name] = ort.InferenceSession(model_arg, sess_options=options,
                                                           providers=self.providers)
            except Exception as exc:  # onnxruntime's pybind errors (Fail, NotImplemented...) share no base
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ExportError(f"ONNX Runtime ({', '.join(map(str, self.providers))}) cannot load "
                                  f"{path}: {first}") from exc
        self.stats: Dict[str, Any] = {}
        self._state: Optional[Dict[str, Any]] = None  # the running batch's graph state

    #: the architectures this runner runs (the TensorRT runner: LLaVA-1.5 only)
    architectures: Tuple[str, ...] = ARCHITECTURES

    def _read_manifest(self, folder, schedule) -> Dict[str, Any]:
        """Load the folder's manifest (checked against ``schedule`` if given) and set the model's
        facts from it (its spec, without the model); shared with the TensorRT runner."""
        from ..schedule import Schedule

        self.folder = Path(folder)
        want = None if schedule is None else str(Schedule.coerce(schedule))
        self.manifest = man = load_manifest(self.folder, want)
        if man["architecture"] not in self.architectures:
            raise ExportError(f"{self.folder} holds a {man['architecture']} export; {type(self).__name__} runs "
                              f"{', '.join(self.architectures)}")
        self.schedule = Schedule.parse(man["schedule"])
        self.spec = spec_of(man)
        self.stage_map = StageMap(self.schedule, self.spec.num_layers)
        return man

    # ---- the model's facts, for callers --------------------------------------------------------------
    @property
    def grid(self):
        """The one image grid of a LLaVA-1.5 export, else None (each image has its own)."""
        return self.spec.schedule_grid()

    @property
    def image_token_id(self) -> int:
        return self.spec.image_token_id

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def num_stages(self) -> int:
        return self.stage_map.num_stages

    @property
    def stage_of_layer(self):
        return self.stage_map.stage_of_layer

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def max_positions(self) -> int:
        return self.spec.max_positions

    @property
    def image_size(self) -> Optional[int]:
        return getattr(self.spec, "image_size", None)

    # ---- the generation loop's backend ----------------------------------------------------------------
    def _start(self, seqs: List[Seq]) -> None:
        # stage_lengths: the prefill batch's padded length per stage; prefill_kv_lengths / kv_lengths:
        # every layer's cached length after prefill / after the last decode step
        self.stats.update(prefill_batch=len(seqs), stage_lengths=None, prefill_kv_lengths=None, kv_lengths=None)
        self._state = None

    def _finish(self, stats: Dict[str, Any]) -> None:
        self._state = None  # the call's K/V do not outlive it

    def _batch(self, seqs: List[Seq]) -> Tuple[torch.Tensor, torch.Tensor, StagedLayout]:
        """The host side of a prefill: the left-padded batch and its layout (planned once, with the
        spec's positions)."""
        ids, mask = _left_padded(seqs)
        plan, pos = self.spec.prepare(self.schedule, ids, attention_mask=mask, padding_side="left",
                                      **self.spec.collate([s.request for s in seqs]))
        layout = StagedLayout.padded(self.stage_map, plan, position_ids=pos)
        self.stats["stage_lengths"] = [st.shape[1] for st in layout.stages]
        return ids, mask, layout

    def _vision(self, seqs: List[Seq]):
        """``(placeholder id, features)`` of the batch's images (and videos), in prompt order."""
        pix = [s.pixel_values for s in seqs if s.pixel_values is not None]
        if self.spec.schedule_grid() is not None:  # LLaVA-1.5: whole images of one size
            if pix:
                pv = torch.cat(pix).to(torch.float32).numpy().astype(self.np_dtype)
                feats = self.sessions["vision"].run(None, {"pixel_values": pv})[0]
                yield self.image_token_id, feats.reshape(-1, feats.shape[-1])
            return
        inputs = self.spec.collate([s.request for s in seqs])
        kinds = (("pixel_values", "image_grid_thw", self.spec.image_token_id),
                 ("pixel_values_videos", "video_grid_thw", self.spec.video_token_id))
        for name, grid, tok in kinds:
            pv = torch.cat(pix) if name == "pixel_values" and pix else inputs.get(name)
            if pv is None:
                continue
            feeds, restore = self.spec.vision_feeds(pv.to(torch.float32), inputs[grid])
            feeds = {k: (v.numpy().astype(self.np_dtype) if v.is_floating_point() else v.numpy())
                     for k, v in feeds.items()}
            yield tok, self.sessions["vision"].run(None, feeds)[0][restore.numpy()]

    def _rows(self, seqs: List[Seq], take) -> Dict[str, Any]:
        """The running batch's state, its rows cut to ``seqs`` (finished requests leave)."""
        state = self._state
        keep = rows_of(state["rids"], seqs)
        if keep is not None:
            state = {k: (v if k == "rids" else take(v, keep)) for k, v in state.items()}
            state["rids"] = [s.rid for s in seqs]
            self._state = state
        return state

    def _embed(self, ids: np.ndarray) -> np.ndarray:
        return self.sessions["embed"].run(None, {"input_ids": ids})[0]

    def _prefill(self, seqs: List[Seq]) -> torch.Tensor:
        ids, mask, layout = self._batch(seqs)
        h = self._embed(ids.numpy())
        for tok, feats in self._vision(seqs):
            rows = (ids == tok).numpy() & (mask.numpy() != 0)
            if int(rows.sum()) != feats.shape[0]:
                raise ExportError(f"the batch has {int(rows.sum())} placeholder tokens {tok} but the vision graph gave "
                                  f"{feats.shape[0]} feature rows")
            h[rows] = feats.astype(h.dtype)
        st0 = layout.stages[0]
        feed = {"inputs_embeds": h, "attention_mask": mask.numpy(), "position_ids": st0.position_ids.numpy()}
        for st in layout.stages[1:]:
            feed[f"adsc_index.{st.stage}"] = st.index.to(torch.int32).numpy()
        out = self.sessions["prefill"].run(None, feed)
        self.stats["prefill_kv_lengths"] = self.stats["kv_lengths"] = [int(k.shape[2]) for k in out[1::2]]
        nxt = self.spec.next_positions(st0.position_ids, st0.mask)  # [*lead, B]: each row's next position
        self._state = {"rids": [s.rid for s in seqs], "masks": [st.mask.long().numpy() for st in layout.stages],
                       "kv": out[1:], "pos": np.moveaxis(nxt.numpy(), -1, 0)}  # batch first, for the row cuts
        return torch.from_numpy(out[0])

    def _decode(self, seqs: List[Seq]) -> torch.Tensor:
        state = self._rows(seqs, lambda v, keep: v[keep] if isinstance(v, np.ndarray) else [a[keep] for a in v])
        toks = np.array([[s.generated[-1]] for s in seqs], dtype=np.int64)
        feed = {"inputs_embeds": self._embed(toks), "position_ids": np.moveaxis(state["pos"], 0, -1)[..., None]}
        for k, m in enumerate(state["masks"]):
            feed[f"past_mask.{k}"] = m
        for l in range(self.num_layers):
            feed[f"past_key_values.{l}.key"] = state["kv"][2 * l]
            feed[f"past_key_values.{l}.value"] = state["kv"][2 * l + 1]
        out = self.sessions["decode"].run(None, feed)
        self.stats["kv_lengths"] = [int(k.shape[2]) for k in out[1::2]]
        ones = np.ones((len(seqs), 1), dtype=np.int64)
        self._state = {"rids": state["rids"], "masks": [np.concatenate([m, ones], axis=1) for m in state["masks"]],
                       "kv": out[1:], "pos": state["pos"] + 1}
        return torch.from_numpy(out[0])


def _with_plugin_reference(path: Path) -> bytes:
    """A plugin-compaction prefill graph that ONNX Runtime can run: the ``AdscCompactTokens`` nodes
    resolve to :func:`~adsc_ext.export.onnx_export.plugin_reference_function` (standard ops)."""
    import onnx

    from .onnx_export import plugin_reference_function

    # without external weights (a 7B graph's exceed protobuf's 2 GB): they stay in the folder's
    # .data files, which the session reads (OnnxRunner sets the folder); small graphs carry theirs
    model = onnx.load(str(path), load_external_data=False)
    model.functions.append(plugin_reference_function())
    return model.SerializeToString()
