"""The lmms-eval model class behind ``--model adsc``.

    lmms-eval --model adsc --model_args pretrained=DIR,method=adsc,schedule="8:2,16:2,24:2" --tasks ...

``--model_args``:

- ``pretrained``: a LLaVA-1.5 checkpoint folder (with its processor and chat template), e.g. the
  output of ``adsc train``;
- ``method``: ``adsc`` (default: the schedule below), ``none`` (the unmodified model: the empty
  schedule) or ``fastv`` (FastV pruning after ``fastv_layer`` at the token budget of ``budget``);
- ``schedule``: the ADSC schedule (default: the checkpoint's ``config.adsc_schedule``, else the
  model's default). Inside ``--model_args`` quote it or separate its stages with ``;``
  (``schedule=8:2;16:2;24:2``), since ``,`` separates the arguments;
- ``budget``: the schedule whose token budget FastV matches (default: as ``schedule``);
  ``fastv_keep`` overrides it with image tokens kept per image; ``fastv_layer`` (default 2);
- ``batch_size`` (default 8), ``device`` (default: cuda if available, else cpu), ``dtype``
  (``auto``: bfloat16 on CUDA, float32 on CPU), ``attn`` (``sdpa``), ``max_new_tokens`` (default
  for tasks that set none, 256).

``generate_until``: greedy (or sampled with the task's ``temperature`` and ``top_p``) generation of
batches of requests with the same generation arguments, left-padded: ``adsc`` / ``none`` through
transformers' ``generate`` on the ADSC model (the hooks of :func:`adsc_ext.apply_adsc`), ``fastv``
through :class:`adsc_ext.baselines.FastV`'s generation loop (the same batches: prompts of any
lengths and image counts). Stops at EOS, ``max_new_tokens`` or the first ``until`` string (cut
off). ``loglikelihood``: the summed log probability of the continuation's tokens given the context
and whether greedy decoding would produce them, one teacher-forced forward per batch (ADSC's
logits are mapped back to the input positions with :func:`adsc_ext.adsc_layout`; FastV's come
from :meth:`FastV.forward <adsc_ext.baselines.FastV.forward>` with their input positions, the
context's last token as FastV's query).

Prompts are the checkpoint's chat template over one user turn holding the request's images and
its context (``<image>`` markers in the context place the images; without markers the images come
first, as llava-hf's lmms-eval model does).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from lmms_eval import utils
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

__all__ = ["AdscLMM"]

METHODS = ("adsc", "none", "fastv")


def _schedule_arg(value) -> Optional[str]:
    if value is None:
        return None
    s = str(value).strip().strip("'\"")
    return s.replace(";", ",")


def _flatten(visuals) -> list:
    out = []
    for v in visuals:
        if v is None:
            continue
        if isinstance(v, (list, tuple)):
            out.extend(_flatten(v))
        else:
            out.append(v)
    return out


def _loglikelihood_result(logprob: float, greedy: bool):
    """``(logprob, is_greedy)`` as the evaluator keeps it. lmms-eval 0.7.3's evaluator passes every
    model result through ``unwrap_generation_output``, which turns a tuple into its ``str()`` (and
    multiple-choice scoring then fails); its ``GenerationResult`` wrapper is passed through as is."""
    try:
        from lmms_eval.api.instance import GenerationResult, unwrap_generation_output
    except ImportError:  # releases without the wrapper keep tuples
        return (logprob, greedy)
    if unwrap_generation_output((logprob, greedy))[0] == (logprob, greedy):
        return (logprob, greedy)
    return GenerationResult(text=(logprob, greedy))


class AdscLMM(lmms):
    """ADSC / unmodified / FastV LLaVA for lmms-eval (see the module docstring for the arguments)."""

    is_simple = True

    def __init__(self, pretrained: str, method: str = "adsc", schedule=None, budget=None, fastv_layer: int = 2,
                 fastv_keep: Optional[int] = None, batch_size=8, device: Optional[str] = None, dtype: str = "auto",
                 attn: str = "sdpa", max_new_tokens: int = 256, max_batch_size=None, **unknown) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"adsc: unknown model_args {sorted(unknown)}; known: pretrained, method, schedule, budget, "
                             f"fastv_layer, fastv_keep, batch_size, device, dtype, attn, max_new_tokens")
        if method not in METHODS:
            raise ValueError(f"adsc: method must be one of {', '.join(METHODS)}, got {method!r}")
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        from ... import apply_adsc
        from ...baselines.fastv import FastV
        from ...hf import adsc_setup

        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        torch_dtype = (torch.bfloat16 if self._device.type == "cuda" else torch.float32) if dtype == "auto" else getattr(torch, dtype)
        self.processor = AutoProcessor.from_pretrained(pretrained)
        self.tokenizer = self.processor.tokenizer
        self.model = LlavaForConditionalGeneration.from_pretrained(pretrained, dtype=torch_dtype,
                                                                   attn_implementation=attn).to(self._device).eval()
        self.method = method
        self.batch_size_per_gpu = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_new_tokens = int(max_new_tokens)
        schedule = _schedule_arg(schedule)
        apply_adsc(self.model, "" if method == "none" else schedule)  # resolves and checks the schedule
        self.schedule = str(adsc_setup(self.model).schedule)
        self.fastv = None
        if method == "fastv":
            budget = _schedule_arg(budget)
            if budget is None and fastv_keep is None:
                budget = self.schedule  # the schedule resolved above: the argument, the checkpoint's or the default
            apply_adsc(self.model, "")  # FastV runs the model's own layers; ADSC's hooks stay inert
            self.fastv = FastV(self.model, layer=int(fastv_layer), keep=None if fastv_keep is None else int(fastv_keep),
                               schedule=budget)
            self.schedule = ""
        self.eos_token_id = self.tokenizer.eos_token_id
        self.image_token_id = self.model.config.image_token_id

    # ---- lmms-eval's properties -------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def __repr__(self) -> str:
        what = repr(self.fastv) if self.fastv is not None else f"schedule '{self.schedule}'"
        return f"AdscLMM(method={self.method}, {what})"

    # ---- prompts ------------------------------------------------------------------------------------
    def _prompt(self, context: str, n_images: int) -> str:
        from ...train.data import chat_content

        parts = context.split("<image>")
        if len(parts) - 1 != n_images:  # no (or mismatched) markers: the images first
            parts = [""] * n_images + ["".join(parts)]
        content = chat_content(parts)
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = _flatten([doc_to_visual(self.task_dict[task][split][doc_id])]) if doc_to_visual is not None else []
        return [v.convert("RGB") if hasattr(v, "convert") else v for v in visuals]

    def _encode(self, texts: List[str], images: List[list], padding_side: str):
        flat = [im for ims in images for im in ims]
        self.tokenizer.padding_side = padding_side
        enc = self.processor(text=texts, images=flat or None, return_tensors="pt", padding=True)
        out = {k: v.to(self._device) for k, v in enc.items()}
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(self.model.dtype)
        return out

    # ---- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests: List[Instance]) -> List[str]:
        from tqdm import tqdm

        res = []
        collator = utils.Collator([r.args for r in requests], lambda x: (-len(x[0]), x[0]), grouping=True)
        bar = tqdm(total=len(requests), disable=(self.rank != 0), desc="adsc generate_until")
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            contexts, all_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            kwargs = dict(all_kwargs[0])
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = int(kwargs.get("max_new_tokens") or self.max_new_tokens)
            temperature = float(kwargs.get("temperature") or 0.0)
            images = [self._visuals(v, d, t, s) for v, d, t, s in zip(doc_to_visual, doc_ids, tasks, splits)]
            texts = [self._prompt(c, len(ims)) for c, ims in zip(contexts, images)]
            outs = self._generate(texts, images, max_new, temperature, float(kwargs.get("top_p") or 1.0))
            for ctx, text in zip(contexts, outs):
                for stop in until:
                    if stop and stop in text:
                        text = text.split(stop, 1)[0]
                res.append(text)
                self.cache_hook.add_partial("generate_until", (ctx, all_kwargs[0]), text)
            bar.update(len(chunk))
        bar.close()
        return collator.get_original(res)

    def _decode(self, rows) -> List[str]:
        out = []
        for toks in rows:
            toks = list(toks)
            if self.eos_token_id in toks:
                toks = toks[: toks.index(self.eos_token_id)]
            out.append(self.tokenizer.decode(toks, skip_special_tokens=True))
        return out

    @torch.no_grad()
    def _generate(self, texts, images, max_new: int, temperature: float, top_p: float) -> List[str]:
        enc = self._encode(texts, images, "left")
        if self.fastv is None:
            sample = temperature > 0
            out = self.model.generate(**enc, max_new_tokens=max_new, do_sample=sample,
                                      temperature=temperature if sample else None, top_p=top_p if sample else None,
                                      eos_token_id=self.eos_token_id, pad_token_id=self.eos_token_id,
                                      suppress_tokens=[self.image_token_id])
            return self._decode(out[:, enc["input_ids"].shape[1]:].tolist())
        # FastV's generation loop takes the rows as they are (it left-pads them itself)
        from ...generation import Request

        reqs, i = [], 0
        pix = enc.get("pixel_values")
        for row, valid, ims in zip(enc["input_ids"], enc["attention_mask"].bool(), images):
            k = len(ims)
            reqs.append(Request(row[valid], pix[i:i + k] if k else None))
            i += k
        out = self.fastv.generate(reqs, max_new, temperature=temperature, top_p=top_p, eos_token_id=self.eos_token_id)
        return self._decode(out)

    # ---- scoring ------------------------------------------------------------------------------------
    def loglikelihood(self, requests: List[Instance]) -> list:
        from tqdm import tqdm

        res: List[Tuple[float, bool]] = []
        bar = tqdm(total=len(requests), disable=(self.rank != 0), desc="adsc loglikelihood")
        args = [r.args for r in requests]
        for start in range(0, len(args), self.batch_size):
            batch = args[start:start + self.batch_size]
            prompts, fulls, images = [], [], []
            for context, target, doc_to_visual, doc_id, task, split in batch:
                doc = self.task_dict[task][split][doc_id]
                continuation = target if isinstance(target, str) else target(doc)
                ims = self._visuals(doc_to_visual, doc_id, task, split)
                prompt = self._prompt(context, len(ims))
                prompts.append(prompt)
                fulls.append(prompt + continuation)
                images.append(ims)
            res.extend(self._score(prompts, fulls, images))
            bar.update(len(batch))
        bar.close()
        return res

    @torch.no_grad()
    def _score(self, prompts, fulls, images) -> List[Tuple[float, bool]]:
        from ...hf import adsc_layout

        enc = self._encode(fulls, images, "right")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        B, T = ids.shape
        n_prompt = [int(self._encode([p], [ims], "right")["input_ids"].shape[1]) for p, ims in zip(prompts, images)]
        n_full = mask.sum(1).tolist()
        if self.fastv is None:
            out = self.model(**enc, use_cache=False, return_dict=True)
            logits = out.logits
            src = adsc_layout(out).source_index.long()  # [B, S_last]: input row of each logit row
            cols = src - torch.arange(B, device=src.device)[:, None] * T  # -> input position (or < 0: padding)
        else:
            last = torch.tensor([n - 1 for n in n_prompt], device=ids.device)
            logits, cols = self.fastv_logits(enc, last)
        logp = torch.log_softmax(logits.float(), dim=-1)
        # which logit row predicts each continuation token, found on the host (one read of the
        # layout), then every log-probability and argmax gathered on the device and read once
        cols_host, ids_host = cols.cpu().tolist(), ids.cpu().tolist()
        rows, picks, toks = [], [], []
        for b in range(B):
            where = {int(c): j for j, c in enumerate(cols_host[b]) if c >= 0}
            for pos in range(n_prompt[b], int(n_full[b])):
                j = where.get(pos - 1)
                if j is None:  # pragma: no cover - text tokens are never dropped
                    raise RuntimeError(f"position {pos - 1} has no logit row")
                rows.append(b)
                picks.append(j)
                toks.append(ids_host[b][pos])
        dev = logp.device
        r, j, t = (torch.tensor(x, dtype=torch.long, device=dev) for x in (rows, picks, toks))
        token_logp = logp[r, j, t].double().cpu().tolist()
        hit = (logp[r, j].argmax(-1) == t).cpu().tolist()
        totals, greedy = [0.0] * B, [True] * B
        for b, lp, h in zip(rows, token_logp, hit):
            totals[b] += lp
            greedy[b] = greedy[b] and bool(h)
        return [_loglikelihood_result(totals[b], greedy[b]) for b in range(B)]

    def fastv_logits(self, enc, last_prompt):
        """FastV's teacher-forced logits of a right-padded batch: ``(logits [B, T', V], input
        position of every logit row [B, T'] (-1: padding))``; ``last_prompt [B]``: FastV's query."""
        out = self.fastv.forward(enc["input_ids"], enc["attention_mask"], enc.get("pixel_values"),
                                 last_prompt=last_prompt)
        return out.logits, out.kept

    def generate_until_multi_round(self, requests) -> List[str]:
        raise NotImplementedError("adsc: multi-round generation is not supported")
