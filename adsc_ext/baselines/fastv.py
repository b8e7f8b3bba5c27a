"""A FastV-style baseline: prune image tokens by attention score (Chen et al., 2024, "An Image is
Worth 1/2 Tokens After Layer 2").

After decoder layer ``layer - 1`` of the prefill, every image keeps the ``keep`` image tokens that
the last prompt token attends to most (the attention weights averaged over heads); layers
``layer .. L-1`` run on the text tokens plus the kept image tokens, in their original order and at
their original positions, and their KV caches hold only those tokens. Decoding continues at
position ``n + t`` (as in ADSC, spec section 5).

The scores are attention *weights*, which FlashAttention and SDPA do not return, so FastV runs the
Hugging Face layers with **eager** attention: that is the point of the comparison in spec section 8
(ADSC keeps the attention operator untouched and so keeps FlashAttention). :func:`budget_keep`
gives the ``keep`` at which FastV processes as many image tokens, summed over layers, as an ADSC
schedule ("the same token budget").

This is a benchmark baseline, not part of the ADSC runtime: greedy decoding only, and a batch
whose rows have the same length and the same number of images (no padding), which is what
``adsc bench`` feeds it. Anything else is rejected with a ``ValueError``.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import torch

from ..hf import _compat
from ..models.llava import count_images
from ..sampling import pick_tokens

__all__ = ["FastV", "budget_keep"]

#: ``select(scores [B, T], image_mask [B, T], keep) -> kept token indices [B, T']`` (ascending)
Selector = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]


def budget_keep(schedule, num_layers: int, layer: int, grid) -> int:
    """Image tokens per image that FastV keeps after ``layer`` so that the image tokens summed over
    all layers equal those of ``schedule`` (rounded to the nearest integer)."""
    from ..schedule import Schedule

    if not 0 < layer < num_layers:
        raise ValueError(f"FastV's pruning layer must be in [1, {num_layers - 1}], got {layer}")
    stages = Schedule.coerce(schedule).validate(num_layers, grid)
    n = grid[0] * grid[1]
    total = sum(st.tokens_per_image * (st.end_layer - st.first_layer) for st in stages)
    return max(0, min(n, round((total - layer * n) / (num_layers - layer))))


def top_attention(scores: torch.Tensor, image_mask: torch.Tensor, keep: int, tokens_per_image: int) -> torch.Tensor:
    """FastV's rule: all text tokens and, per image, the ``keep`` highest-scoring image tokens."""
    B, T = scores.shape
    rows = []
    for b in range(B):
        img = image_mask[b].nonzero()[:, 0]
        text = (~image_mask[b]).nonzero()[:, 0]
        kept = [text]
        for i in range(0, img.numel(), tokens_per_image):
            pos = img[i:i + tokens_per_image]
            top = scores[b, pos].topk(keep, sorted=False).indices if keep < pos.numel() else torch.arange(pos.numel(), device=pos.device)
            kept.append(pos[top])
        rows.append(torch.cat(kept).sort().values)
    return torch.stack(rows)


class FastV:
    """FastV-style pruning on a Hugging Face ``LlavaForConditionalGeneration`` (eager attention).

    Args:
        model: the LLaVA model (its layers and weights are used as they are).
        layer: the first decoder layer that runs on the pruned sequence (FastV's K; 2 by default).
        keep: image tokens kept per image; None: :func:`budget_keep` for ``schedule``.
        schedule: the ADSC schedule whose token budget ``keep=None`` matches (default: the model's
            LLaVA-1.5 default schedule).
        select: replaces the attention-score rule (tests use it to prune ADSC's uniform subset).
    """

    def __init__(self, model, layer: int = 2, keep: Optional[int] = None, *, schedule=None,
                 select: Optional[Selector] = None):
        from ..models.llava import llava_spec, resolve_schedule, unwrap

        model = unwrap(model)
        spec = llava_spec(model)
        grid, image_token_id, num_layers = spec.grid, spec.image_token_id, spec.num_layers
        if not 0 < layer < num_layers:
            raise ValueError(f"FastV's pruning layer must be in [1, {num_layers - 1}], got {layer}")
        self.tokens_per_image = grid[0] * grid[1]
        if keep is None:
            sched, _ = resolve_schedule(model.config, schedule, num_layers, grid)
            keep = budget_keep(sched, num_layers, layer, grid)
        if not 0 <= keep <= self.tokens_per_image:
            raise ValueError(f"keep must be in [0, {self.tokens_per_image}] image tokens per image, got {keep}")
        self.model, self.text = model, model.model.language_model
        self.layer, self.keep, self.grid = int(layer), int(keep), grid
        self.image_token_id, self.num_layers = image_token_id, num_layers
        self.select = select
        self._spec = spec
        self._cache_kw = _compat.cache_kwarg(self.text.layers[0])
        self.last_kept: Optional[torch.Tensor] = None  # indices kept by the last prefill, [B, T']

    def __repr__(self) -> str:
        return f"FastV(layer={self.layer}, keep={self.keep} of {self.tokens_per_image})"

    def _check(self, input_ids: torch.Tensor, pixel_values) -> None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"FastV needs input_ids as a [B, n] tensor of equal-length rows (no padding), got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
        counts = [count_images(row, self._spec, f"row {b}") for b, row in enumerate(input_ids.tolist())]
        if counts and any(c != counts[0] for c in counts):
            raise ValueError(f"FastV needs the same number of images in every row, got {counts}")
        n_img = sum(counts)
        got = 0 if pixel_values is None else pixel_values.shape[0]
        if got != n_img:
            raise ValueError(f"input_ids hold {n_img} image(s) but pixel_values has {got}")

    def _run_layer(self, l, h, cos, sin, mask, cache, capture: Optional[List] = None):
        attn = self.text.layers[l].self_attn
        handle = None
        if capture is not None:
            handle = attn.register_forward_hook(lambda mod, args, out: capture.append(out[1]))
        try:
            return self.text.layers[l](h, attention_mask=mask, use_cache=True, position_embeddings=(cos, sin),
                                       **{self._cache_kw: cache})
        finally:
            if handle is not None:
                handle.remove()

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, pixel_values: Optional[torch.Tensor] = None,
                 max_new_tokens: int = 32, *, suppress_image_token: bool = True, return_logits: bool = False):
        """Greedy generation: ``[B, max_new_tokens]`` token ids (and the per-step logits with
        ``return_logits=True``, ``[B, max_new_tokens, vocab]``). The image token is never picked
        unless ``suppress_image_token=False`` (as in :meth:`adsc_ext.runtime.Engine.generate`)."""
        from transformers import DynamicCache

        from ..models.llava import embed_with_images

        self._check(input_ids, pixel_values)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        dev = next(self.model.parameters()).device
        ids = input_ids.to(dev)
        B, T = ids.shape
        h = embed_with_images(self.model, ids, pixel_values, self.image_token_id)
        is_img = ids == self.image_token_id
        pos = torch.arange(T, device=dev).expand(B, T)
        cos, sin = self.text.rotary_emb(h, pos)
        cache = DynamicCache(config=self.text.config)
        neg = torch.finfo(h.dtype).min

        def causal(t: int):
            m = torch.full((t, t), neg, dtype=h.dtype, device=dev).triu(1)
            return m[None, None].expand(B, 1, t, t)

        logits_out = []
        scores: Optional[torch.Tensor] = None  # set by layer K-1 (layer >= 1 is checked), read at layer K
        with _compat.attention_implementation(self.text.config, "eager"):
            mask = causal(T)
            for l in range(self.num_layers):
                if l == self.layer:
                    keep_idx = self._kept(scores, is_img)
                    self.last_kept = keep_idx
                    take = keep_idx[..., None]
                    h = h.gather(1, take.expand(-1, -1, h.shape[-1]))
                    cos = cos.gather(1, take.expand(-1, -1, cos.shape[-1]))
                    sin = sin.gather(1, take.expand(-1, -1, sin.shape[-1]))
                    mask = causal(h.shape[1])
                cap = [] if l == self.layer - 1 else None
                h = self._run_layer(l, h, cos, sin, mask, cache, cap)
                if cap:
                    scores = cap[0][:, :, -1, :].float().mean(1)  # last token's attention, head mean: [B, T]
            step = self.model.lm_head(self.text.norm(h[:, -1]))
            tokens = [self._pick(step, suppress_image_token)]
            logits_out.append(step)
            for t in range(1, max_new_tokens):
                x = self.model.get_input_embeddings()(tokens[-1][:, None])
                p = torch.full((B, 1), T + t - 1, device=dev)
                cos, sin = self.text.rotary_emb(x, p)
                for l in range(self.num_layers):
                    x = self._run_layer(l, x, cos, sin, None, cache)
                step = self.model.lm_head(self.text.norm(x[:, -1]))
                tokens.append(self._pick(step, suppress_image_token))
                logits_out.append(step)
        out = torch.stack(tokens, 1)
        return (out, torch.stack(logits_out, 1)) if return_logits else out

    def _pick(self, logits: torch.Tensor, suppress: bool) -> torch.Tensor:
        return pick_tokens(logits, suppress_token_id=self.image_token_id if suppress else None)

    def _kept(self, scores: torch.Tensor, is_img: torch.Tensor) -> torch.Tensor:
        if self.select is not None:
            return self.select(scores, is_img, self.keep).to(scores.device)
        return top_attention(scores, is_img, self.keep, self.tokens_per_image)
