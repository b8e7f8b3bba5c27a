"""A FastV-style baseline: prune image tokens by attention score (Chen et al., 2024, "An Image is
Worth 1/2 Tokens After Layer 2").

After decoder layer ``layer - 1`` every image keeps the ``keep`` image tokens that the last prompt
token attends to most (the attention weights averaged over heads); layers ``layer .. L-1`` run on
the text tokens plus the kept image tokens, in their original order and at their original
positions, and their KV caches hold only those tokens. Decoding continues at position ``n + t``
(as in ADSC, spec section 5).

In adsc_ext's terms the pruning is a one-boundary :class:`~adsc_ext.layout.StagedLayout` whose
gather index comes from attention scores (:meth:`StagedLayout.from_index`). :class:`FastV` runs
it in two ways, through **one** method (``FastV._run``: the same embeddings, layers, score rule,
selection and layout):

- as a backend of the one generation loop (:class:`~adsc_ext.generation.Generator`): it takes the
  engine's requests (a left-padded batch, any lengths and numbers of images, greedy or sampled)
  and returns its results; ``generate(input_ids [B, n], pixel_values, max_new_tokens)`` (a tensor
  of prompts) is kept as a shorthand returning ``[B, max_new_tokens]`` token ids;
- teacher-forced, :meth:`FastV.forward`: the logits of every kept token of a padded batch of
  prompts with continuations, and spec 6.4's loss on the kept tokens. It is differentiable (LoRA
  or full fine-tuning through the pruning: the self-compression study's ``fastv_tuned`` arm via
  :func:`adsc_ext.train.fastv.fastv_forward`) and gives the lmms-eval plugin its log-likelihoods.

**How the scores are computed** (one rule, :func:`last_prompt_scores`, for inference and
training): the attention *weights* of layer ``layer - 1`` as that layer computes them, with
transformers' **eager** attention for that one layer (its attention module returns
``(output, weights)``, ``hf/_compat.py`` item 5). Every other layer runs the model's own fast
attention (SDPA; a FlashAttention model runs SDPA too, since FastV's padded 4-D masks are what
SDPA takes). This is what FastV's reference implementation does (``output_attentions`` at layer
K-1 only) and what spec section 8 prices in ("eager attention at its pruning layer"): the
weights are the layer's own, so no part of the layer is computed twice, and the score of the
pruned forward is by construction the one inference uses. The alternative -- recomputing the
last query's row from q and k so that layer K-1 could keep SDPA too -- would repeat that layer's
norm and q/k projections for every row and make FastV's score a second implementation of the
layer's attention; the cost it saves is one layer's ``[B, heads, T, T]`` weights. The scores are
detached: the selection (a top-k) has no gradient, and everything after it is differentiable.

:func:`budget_keep` gives the ``keep`` at which FastV processes as many image tokens, summed over
layers, as an ADSC schedule ("the same token budget").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..errors import AdscInputError, AdscModelError
from ..generation import Generator, Request, Seq, rows_of
from ..hf import _compat
from ..layout import IGNORE_INDEX, StagedLayout, StageMap
from ..models.base import model_spec, unwrap
from ..models.llava import count_images

__all__ = ["FastV", "FastVOutput", "budget_keep", "top_attention", "last_prompt_scores"]

#: ``select(scores [B, T], image_mask [B, T], keep) -> kept token indices [B, T']`` (ascending
#: within each row; ``-1`` for slots a shorter row leaves empty). Slots that are padding in the
#: batch are dropped from whatever it returns.
Selector = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def _check_layer(layer: int, num_layers: int) -> None:
    if not 0 < layer < num_layers:
        raise AdscInputError(f"FastV's pruning layer must be in [1, {num_layers - 1}], got {layer}")


def budget_keep(schedule, num_layers: int, layer: int, grid) -> int:
    """Image tokens per image that FastV keeps after ``layer`` so that the image tokens summed over
    all layers equal those of ``schedule`` (rounded to the nearest integer)."""
    from ..schedule import Schedule

    _check_layer(layer, num_layers)
    stages = Schedule.coerce(schedule).validate(num_layers, grid)
    n = grid[0] * grid[1]
    total = sum(st.tokens_per_image * (st.end_layer - st.first_layer) for st in stages)
    return max(0, min(n, round((total - layer * n) / (num_layers - layer))))


# ---- the rule: scores, selection, the kept rows --------------------------------------------------


def last_prompt_scores(weights: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """FastV's score of every key: the attention weights ``weights [B, heads, q, K]`` of each row's
    query ``last [B]`` (its last prompt token), averaged over heads; float32 ``[B, K]``, detached."""
    rows = torch.arange(weights.shape[0], device=weights.device)
    return weights.detach()[rows, :, last.to(weights.device)].float().mean(1)


def _top_image_tokens(scores: torch.Tensor, image_mask: torch.Tensor, keep: int, tokens_per_image: int) -> torch.Tensor:
    """bool ``[B, T]``: per image (``tokens_per_image`` consecutive image tokens of a row, in order),
    its ``keep`` highest-scoring tokens; ties go to the earlier token. On the device, no host read.

    Two stable sorts put every row's tokens in the order (image, score descending, position); a
    token's rank within its image is then its place minus ``image * tokens_per_image`` (each image
    has exactly that many tokens)."""
    B, T = scores.shape
    if keep >= tokens_per_image:
        return image_mask.clone()
    if keep <= 0 or T == 0:
        return torch.zeros_like(image_mask)
    image = torch.div(image_mask.long().cumsum(1) - 1, tokens_per_image, rounding_mode="floor")
    image = image.masked_fill(~image_mask, T)  # text sorts after every image
    by_score = scores.float().masked_fill(~image_mask, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    by_image = image.gather(1, by_score).sort(dim=1, stable=True).indices
    order = by_score.gather(1, by_image)  # [B, T] token index in (image, -score, position) order
    img = image.gather(1, order)
    rank = torch.arange(T, device=scores.device)[None] - img * tokens_per_image
    return torch.zeros_like(image_mask).scatter(1, order, (img < T) & (rank < keep))  # order: a permutation


def _left_padded(keep: torch.Tensor, width: Optional[int] = None) -> torch.Tensor:
    """The columns where ``keep [B, T]`` is True, ascending per row and left-padded with ``-1``:
    int64 ``[B, width]`` (``width``: the largest row count, read from the device if not given)."""
    B, T = keep.shape
    if width is None:
        width = int(keep.sum(1).max()) if B else 0
    # a stable sort of 0/1 keys puts each row's kept columns last, in order, after the dropped ones
    order = keep.to(torch.uint8).sort(dim=1, stable=True).indices[:, T - width:]
    return torch.where(keep.gather(1, order), order, torch.full((), -1, dtype=order.dtype, device=order.device))


def _mask_of(index: torch.Tensor, T: int) -> torch.Tensor:
    """bool ``[B, T]``: True at the columns ``index [B, T']`` names (``-1``: none)."""
    idx = index.long()
    out = torch.zeros(idx.shape[0], T + 1, dtype=torch.bool, device=idx.device)
    return out.scatter(1, torch.where(idx >= 0, idx, T), True)[:, :T]  # every write is True: no race


def top_attention(scores: torch.Tensor, image_mask: torch.Tensor, keep: int, tokens_per_image: int) -> torch.Tensor:
    """FastV's rule: all text tokens and, per image, the ``keep`` highest-scoring image tokens;
    ``[B, T']`` ascending indices per row (left-padded with ``-1`` where rows keep fewer)."""
    return _left_padded(~image_mask | _top_image_tokens(scores, image_mask, keep, tokens_per_image))


@dataclass
class FastVOutput:
    """What :meth:`FastV.forward` returns.

    logits: ``[B, T', V]``, one row per kept token (the last stage's layout: left-padded).
    kept: int64 ``[B, T']``, the input column of every slot (``-1``: padding); text tokens are all
        kept, so every continuation token has its logit row.
    loss: spec 6.4's loss on the kept tokens when labels were given (else None).
    layout: the forward's :class:`~adsc_ext.layout.StagedLayout` (stage 1: the pruned tokens).
    """

    logits: torch.Tensor
    kept: torch.Tensor
    loss: Optional[torch.Tensor]
    layout: StagedLayout


class FastV(Generator):
    """FastV-style pruning on a Hugging Face ``LlavaForConditionalGeneration``.

    Args:
        model: the LLaVA model (its layers and weights are used as they are; a PEFT wrapper is
            looked through, so its adapters are part of the layers).
        layer: the first decoder layer that runs on the pruned sequence (FastV's K; 2 by default).
        keep: image tokens kept per image; None: :func:`budget_keep` for ``schedule``.
        schedule: the ADSC schedule whose token budget ``keep=None`` matches (default: the model's
            default schedule).
        select: replaces the attention-score rule (tests use it to prune ADSC's uniform subset).
    """

    def __init__(self, model, layer: int = 2, keep: Optional[int] = None, *, schedule=None,
                 select: Optional[Selector] = None):
        from ..models.llava import LlavaSpec

        model = unwrap(model)
        self.spec = spec = model_spec(model)
        if not isinstance(spec, LlavaSpec):  # one grid per image: the budget is per image
            raise AdscModelError(f"the FastV baseline runs LLaVA-1.5 (one image grid); this is {spec.name}")
        _check_layer(layer, spec.num_layers)
        self.tokens_per_image = spec.tokens_per_image
        if keep is None:
            sched, _ = spec.resolve_schedule(schedule, model.config)
            keep = budget_keep(sched, spec.num_layers, layer, spec.grid)
        if not 0 <= keep <= self.tokens_per_image:
            raise AdscInputError(f"keep must be in [0, {self.tokens_per_image}] image tokens per image, got {keep}")
        self.model, self.text = model, spec.text_model()
        self.layer, self.keep, self.grid = int(layer), int(keep), spec.grid
        self.image_token_id, self.num_layers = spec.image_token_id, spec.num_layers
        self.stage_map = StageMap([self.layer], spec.num_layers)  # one boundary: the pruning layer
        self.select = select
        self._cache_kw = _compat.cache_kwarg(self.text.layers[0])
        self.stats: Dict[str, Any] = {}
        self.last_kept: Optional[torch.Tensor] = None  # input columns kept by the last forward/prefill, [B, T'] (-1: padding)
        self._state: Optional[Dict[str, Any]] = None

    def __repr__(self) -> str:
        return f"FastV(layer={self.layer}, keep={self.keep} of {self.tokens_per_image})"

    # ---- the one forward: embeddings, layers, the pruning ------------------------------------------
    def _fast_attention(self) -> str:
        """The attention of every layer but the scoring one: the model's, where it takes FastV's
        padded 4-D masks (eager, SDPA), else SDPA."""
        impl = _compat.attn_implementation(self.text.config)
        return impl if impl in ("eager", "sdpa") else "sdpa"

    def _run_layer(self, l: int, h, cos, sin, mask, cache, capture: Optional[List] = None):
        handle = None
        if capture is not None:  # _compat item 5: under eager attention the module returns (output, weights)
            handle = self.text.layers[l].self_attn.register_forward_hook(lambda mod, args, out: capture.append(out[1]))
        try:
            out = self.text.layers[l](h, attention_mask=mask, use_cache=cache is not None,
                                      position_embeddings=(cos, sin), **{self._cache_kw: cache})
        finally:
            if handle is not None:
                handle.remove()
        return out[0] if isinstance(out, tuple) else out  # releases whose layers return a tuple

    def _run(self, ids: torch.Tensor, valid: torch.Tensor, pixel_values: Optional[torch.Tensor],
             num_image_tokens: int, last: torch.Tensor, width: Optional[int], cache=None
             ) -> Tuple[torch.Tensor, StagedLayout]:
        """FastV over a padded batch ``ids [B, T]`` (``valid``: real tokens; any padding side):
        layers ``0 .. K-1`` on every token (layer K-1 with eager attention, whose weights of each
        row's query ``last [B]`` score the keys, :func:`last_prompt_scores`), then the kept tokens
        (:meth:`_pruned_layout`, ``width`` slots per row if the caller knows it) through layers
        ``K ..``. Returns the last stage's hidden states ``[B, T', hidden]`` and the layout."""
        B, T = ids.shape
        h = self.spec.embed(ids, pixel_values, num_image_tokens=num_image_tokens)
        is_img = (ids == self.image_token_id) & valid
        layout = StagedLayout.text(self.stage_map, B, T, mask=valid)  # stage 0: the input
        positions = layout.stages[0].position_ids  # each real token's index in its row (spec 5)
        cos, sin = self.spec.rotary(h, positions)
        fast = self._fast_attention()
        scores: Optional[torch.Tensor] = None  # set by layer K-1 (layer >= 1 is checked), read at layer K
        with _compat.attention_implementation(self.text.config, fast):
            for l, s, entering in layout.layers():
                if entering:
                    if s == 1:
                        layout = self._pruned_layout(scores, is_img, valid, positions, last, width)
                        h, cos, sin = layout.enter(1, h, cos, sin)
                    allowed, masks = layout.attention_mask(s), {}
                impl = "eager" if l == self.layer - 1 else fast
                if impl not in masks:
                    masks[impl] = _compat.format_mask(impl, allowed, h.dtype)
                if l == self.layer - 1:
                    cap: List[torch.Tensor] = []
                    # not checkpointed: a backward-pass recompute would run after the eager switch ended
                    with _compat.attention_implementation(self.text.config, "eager"), \
                            _compat.checkpointing_off(self.text.layers[l]):
                        h = self._run_layer(l, h, cos, sin, masks[impl], cache, cap)
                    scores = last_prompt_scores(cap[0], last)
                    del cap  # the [B, heads, T, T] weights: only the query rows are needed
                else:
                    h = self._run_layer(l, h, cos, sin, masks[impl], cache)
        return h, layout

    def _pruned_layout(self, scores, is_img, valid, positions, last, width) -> StagedLayout:
        """The one boundary's layout: every row's text tokens, its query token ``last`` and the kept
        image tokens (the rule's, or ``select``'s), padding dropped, left-padded, as a gather index
        of the batch's flat rows. Sets :attr:`last_kept`."""
        B, T = valid.shape
        if self.select is not None:
            keep = _mask_of(self.select(scores, is_img, self.keep).to(valid.device), T)
            width = None  # a custom rule keeps what it keeps
        else:
            keep = ~is_img | _top_image_tokens(scores, is_img, self.keep, self.tokens_per_image)
        keep = keep.scatter(1, last[:, None], True) & valid  # the query token is always kept (text in any real prompt)
        cols = _left_padded(keep, width)
        self.last_kept = cols
        base = torch.arange(B, device=cols.device)[:, None] * T
        index = torch.where(cols >= 0, cols + base, -1).to(torch.int32)
        return StagedLayout.from_index(self.stage_map, valid, [index], position_ids=positions)

    def _width(self, lengths: Sequence[int], images: Sequence[int], query_is_image: Sequence[bool]) -> Optional[int]:
        """Slots per row after the pruning, from host facts: real tokens less the dropped image
        tokens, one more where the query token is an image token (kept whatever its score: an upper
        bound). None with a custom ``select``."""
        if self.select is not None or not lengths:
            return None
        drop = max(0, self.tokens_per_image - self.keep)
        return max(n - k * drop + int(q and drop > 0) for n, k, q in zip(lengths, images, query_is_image))

    # ---- teacher-forced ------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, *,
                last_prompt: Optional[Union[torch.Tensor, Sequence[int]]] = None,
                labels: Optional[torch.Tensor] = None,
                num_items: Optional[Union[int, torch.Tensor]] = None) -> FastVOutput:
        """FastV's teacher-forced forward: the prefill's code path (:meth:`_run`) over a padded
        batch of prompts with their continuations, without a cache. Differentiable (call it under
        ``torch.no_grad()`` to score only).

        Args:
            input_ids: int ``[B, T]``, left- or right-padded.
            attention_mask: ``[B, T]`` (1/True: real token); None: every token is real.
            pixel_values: the rows' images in row order (``[k, 3, S, S]``), or None.
            last_prompt: ``[B]``, each row's last prompt token: its attention at layer K-1 picks
                the kept image tokens, as at inference (and the token itself is always kept).
                None: the token before each row's first label when ``labels`` are given (a row
                without labels: its last real token), else each row's last real token -- so a
                forward over prompts alone is the prefill.
            labels: ``[B, T]`` with :data:`~adsc_ext.layout.IGNORE_INDEX` where there is no target;
                the loss is spec 6.4's: targets shifted on the input sequence, then taken with the
                kept tokens (:meth:`StagedLayout.loss_targets`), cross-entropy in float32.
            num_items: the loss is the summed cross-entropy over ``num_items`` (a gradient-
                accumulation total, as ``num_items_in_batch`` in transformers); None: the mean over
                this batch's targets.

        Returns :class:`FastVOutput` (``logits [B, T', V]``, ``kept [B, T']``, ``loss``, ``layout``).
        Bad input raises :class:`~adsc_ext.errors.AdscInputError`.
        """
        ids, valid, pix, n_img_tokens, last, width = self._check_forward(input_ids, attention_mask, pixel_values,
                                                                         last_prompt, labels)
        h, layout = self._run(ids, valid, pix, n_img_tokens, last, width)
        logits = self.spec.logits(h)
        loss = None
        if labels is not None:
            targets = layout.loss_targets(labels.to(ids.device))
            flat = logits.float().reshape(-1, logits.shape[-1])
            total = F.cross_entropy(flat, targets.reshape(-1).long(), ignore_index=IGNORE_INDEX, reduction="sum")
            denom = (targets != IGNORE_INDEX).sum() if num_items is None else num_items
            loss = total / denom
        return FastVOutput(logits, self.last_kept, loss, layout)

    def _check_forward(self, input_ids, attention_mask, pixel_values, last_prompt, labels):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise AdscInputError(f"FastV.forward: input_ids must be an integer tensor [B, T], got "
                                 f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise AdscInputError(f"FastV.forward: input_ids must be a non-empty [B, T] tensor, got shape "
                                 f"{tuple(input_ids.shape)}")
        B, T = input_ids.shape
        dev = next(self.model.parameters()).device
        if attention_mask is None:
            valid = torch.ones(B, T, dtype=torch.bool)
        else:
            if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (B, T):
                raise AdscInputError(f"FastV.forward: attention_mask must have the shape of input_ids {(B, T)}, got "
                                     f"{tuple(getattr(attention_mask, 'shape', ())) or type(attention_mask).__name__}")
            valid = attention_mask.detach().cpu() != 0
        lengths = valid.sum(1).tolist()
        if min(lengths) == 0:
            raise AdscInputError(f"FastV.forward: row {lengths.index(0)} has no real token (attention_mask all 0)")
        host_ids = input_ids.detach().cpu()
        images = [count_images(host_ids[b][valid[b]], self.spec, f"row {b}") for b in range(B)]
        got = 0 if pixel_values is None else int(pixel_values.shape[0])
        if got != sum(images):
            raise AdscInputError(f"FastV.forward: input_ids hold {sum(images)} image(s) but pixel_values has {got}")
        if labels is not None and (not isinstance(labels, torch.Tensor) or tuple(labels.shape) != (B, T)):
            raise AdscInputError(f"FastV.forward: labels must have the shape of input_ids {(B, T)}, got "
                                 f"{tuple(getattr(labels, 'shape', ())) or type(labels).__name__}")
        cols = torch.arange(T)
        last_real = torch.where(valid, cols, -1).max(1).values
        if last_prompt is None:
            last = last_real
            if labels is not None:
                has = (labels.detach().cpu() != IGNORE_INDEX) & valid
                first = torch.where(has, cols, T).min(1).values
                last = torch.where(has.any(1), (first - 1).clamp(min=0), last_real)
        else:
            last = torch.as_tensor(last_prompt).detach().cpu()
            if last.dtype.is_floating_point or last.dtype == torch.bool or tuple(last.shape) != (B,):
                raise AdscInputError(f"FastV.forward: last_prompt must be {B} integer positions (one per row), got "
                                     f"{last.dtype} of shape {tuple(last.shape)}")
            for b, p in enumerate(last.tolist()):
                if not 0 <= p < T or not valid[b, p]:
                    raise AdscInputError(f"FastV.forward: last_prompt[{b}] = {p} is not a real token of row {b}")
        ids = input_ids.to(dev, torch.long)
        pix = None if pixel_values is None or not got else pixel_values.to(dev)
        n_img_tokens = sum(images) * self.tokens_per_image
        query_is_image = [int(host_ids[b, p]) == self.image_token_id for b, p in enumerate(last.tolist())]
        return ids, valid.to(dev), pix, n_img_tokens, last.long().to(dev), self._width(lengths, images, query_is_image)

    # ---- generate: the loop's, plus the tensor shorthand --------------------------------------------
    def generate(self, requests, *args, **kwargs):
        """The generation loop's ``generate(requests, max_new_tokens, ...)``
        (:meth:`adsc_ext.generation.Generator.generate`), or the shorthand
        ``generate(input_ids [B, n], pixel_values=None, max_new_tokens=32, *, suppress_image_token=True,
        return_logits=False)``: greedy, ``[B, max_new_tokens]`` token ids (and the per-step logits
        ``[B, max_new_tokens, vocab]`` with ``return_logits=True``); ``pixel_values`` holds the
        rows' images in row order."""
        if not isinstance(requests, torch.Tensor):
            return super().generate(requests, *args, **kwargs)
        return self._generate_tensor(requests, *args, **kwargs)

    def _generate_tensor(self, input_ids, pixel_values=None, max_new_tokens: int = 32, *,
                         suppress_image_token: bool = True, return_logits: bool = False):
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise AdscInputError(f"FastV's tensor form needs input_ids as a [B, n] tensor of prompts, got shape "
                                 f"{tuple(input_ids.shape)} (give a list of requests for prompts of other lengths)")
        counts = [count_images(row, self.spec, f"row {b}") for b, row in enumerate(input_ids.tolist())]
        got = 0 if pixel_values is None else pixel_values.shape[0]
        if got != sum(counts):
            raise AdscInputError(f"input_ids hold {sum(counts)} image(s) but pixel_values has {got}")
        reqs, i = [], 0
        for row, k in zip(input_ids, counts):
            reqs.append(Request(row, pixel_values[i:i + k] if k else None))
            i += k
        out = super().generate(reqs, max_new_tokens, suppress_image_token=suppress_image_token,
                               return_logits=return_logits)
        if not return_logits:
            return torch.tensor(out, dtype=torch.long)
        return torch.tensor([t for t, _ in out], dtype=torch.long), torch.stack([lg for _, lg in out])

    # ---- the generation loop's backend --------------------------------------------------------------
    def _start(self, seqs: List[Seq]) -> None:
        self._state = None

    def _finish(self, stats: Dict[str, Any]) -> None:
        self._state = None  # the call's cache does not outlive it

    def _prefill(self, seqs: List[Seq]) -> torch.Tensor:
        from transformers import DynamicCache

        dev = next(self.model.parameters()).device
        B, T = len(seqs), max(s.n for s in seqs)
        ids = torch.zeros(B, T, dtype=torch.long)
        for b, s in enumerate(seqs):  # left padding (token 0, masked out)
            ids[b, T - s.n:] = s.ids
        ids = ids.to(dev)
        valid = (torch.arange(T) >= T - torch.tensor([s.n for s in seqs])[:, None]).to(dev)
        pix = [s.pixel_values for s in seqs if s.pixel_values is not None]
        pix = torch.cat(pix).to(dev) if pix else None
        cache = DynamicCache(config=self.text.config)
        last = torch.full((B,), T - 1, dtype=torch.long, device=dev)  # left-padded: every prompt ends at T - 1
        h, layout = self._run(ids, valid, pix, sum(g[0] * g[1] for s in seqs for g in s.grids), last,
                              self._width([s.n for s in seqs], [s.num_images for s in seqs],
                                          [int(s.ids[-1]) == self.image_token_id for s in seqs]), cache)
        self._state = {"rids": [s.rid for s in seqs], "cache": cache, "keys": [st.mask for st in layout.stages],
                       "next_pos": torch.tensor([s.n for s in seqs], device=dev)}
        return self.spec.logits(h[:, -1])

    def _decode(self, seqs: List[Seq]) -> torch.Tensor:
        state = self._state
        rows = rows_of(state["rids"], seqs)
        if rows is not None:  # finished rows leave the batch (and its cache)
            keep = torch.tensor(rows, device=state["next_pos"].device)
            state["cache"].batch_select_indices(keep)
            state.update(rids=[s.rid for s in seqs], keys=[k.index_select(0, keep) for k in state["keys"]],
                         next_pos=state["next_pos"].index_select(0, keep))
        dev = state["next_pos"].device
        tokens = torch.tensor([[s.generated[-1]] for s in seqs], device=dev)
        layout = StagedLayout.text(self.stage_map, len(seqs), 1, device=dev, next_pos=state["next_pos"],
                                   cache_valid=state["keys"])
        x = self.model.get_input_embeddings()(tokens)
        cos, sin = self.spec.rotary(x, layout.stages[0].position_ids)
        fast = self._fast_attention()
        with _compat.attention_implementation(self.text.config, fast):
            for l, s, entering in layout.layers():
                if entering:
                    mask = _compat.format_mask(fast, layout.attention_mask(s), x.dtype)
                x = self._run_layer(l, x, cos, sin, mask, state["cache"])
        state.update(keys=[st.keys for st in layout.stages], next_pos=state["next_pos"] + 1)
        return self.spec.logits(x[:, -1])
