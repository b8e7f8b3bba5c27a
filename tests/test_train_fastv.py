"""FastV's teacher-forced forward (:meth:`adsc_ext.baselines.FastV.forward`: the self-compression
study's fastv_tuned arm through :func:`adsc_ext.train.fastv.fastv_forward`, the lmms-eval plugin's
FastV log-likelihoods) against FastV's own inference, the unmodified model, ADSC's loss and
gradients, and a training run."""

import json
import math
import sys

import pytest
import torch

pytest.importorskip("transformers")

from adsc_ext import stage_plan  # noqa: E402
from adsc_ext.baselines import FastV  # noqa: E402
from adsc_ext.hf import apply_adsc, enable_checkpointing  # noqa: E402
from adsc_ext.testing import TinyProcessor, tiny_llava  # noqa: E402
from adsc_ext.train.fastv import fastv_forward  # noqa: E402

# fp32 on a tiny model: the paths differ only in summation order (batch shapes, padding, SDPA vs the
# HF model's masks); measured differences are ~1e-6
ATOL = 1e-4
NEW = 4


def _batch(model, B=2, n_text=5):
    g = torch.Generator().manual_seed(0)
    img = model.config.image_token_id
    rows = [torch.cat([torch.tensor([1]), torch.full((16,), img), torch.randint(3, 250, (n_text,), generator=g)])
            for _ in range(B)]
    ids = torch.stack(rows)
    pix = torch.randn(B, 3, 16, 16, generator=g)
    return ids, pix


def _requests(model, seed=4):
    """Prompts of different lengths with 1, 0 and 2 images (the left-padded batch of the loop)."""
    proc = TinyProcessor(model.config)
    side = model.config.vision_config.image_size
    pix = proc.images(list(torch.rand(3, 3, side, side, generator=torch.Generator().manual_seed(seed))))
    return [dict(input_ids=torch.tensor(proc.encode("ab<image>cd", 1)), pixel_values=pix[:1]),
            dict(input_ids=torch.tensor(proc.encode("plain text row", 0)), pixel_values=None),
            dict(input_ids=torch.tensor(proc.encode("x<image><image>y?", 2)), pixel_values=pix[1:])]


def _padded(rows, side: str, pad: int = 0):
    """1-D rows as ``(ids [B, T], mask [B, T])`` padded on ``side``."""
    T = max(r.numel() for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for b, r in enumerate(rows):
        sl = slice(T - r.numel(), T) if side == "left" else slice(0, r.numel())
        ids[b, sl], mask[b, sl] = r, 1
    return ids, mask


@pytest.mark.parametrize("keep", [16, 4])
def test_last_prompt_logits_match_fastv_inference(keep):
    model = tiny_llava(seed=1, grid_side=4, num_layers=6)
    ids, pix = _batch(model)
    B, T = ids.shape
    fv = FastV(model, layer=2, keep=keep)
    want = fv.generate(ids, pix, max_new_tokens=1, return_logits=True)[1][:, 0]
    with torch.no_grad():
        out = fv.forward(ids, torch.ones_like(ids), pix, last_prompt=torch.full((B,), T - 1))
    assert out.kept.shape == (B, T - 16 + keep) and out.logits.shape[:2] == out.kept.shape
    assert (out.kept[:, -5:] == torch.arange(T - 5, T)).all()  # text tokens are all kept, in order
    torch.testing.assert_close(out.logits[:, -1].float(), want.float(), atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("keep", [16, 5])
def test_teacher_forced_logits_equal_generate_per_step(side, keep):
    """Prompts of different lengths and image counts with their greedy continuations, padded on
    either side, in one teacher-forced forward: every continuation token's logit row (mapped back
    through ``kept``) equals the logits FastV's generation loop picked that token from."""
    model = tiny_llava(seed=0, grid_side=4, num_layers=6)
    fv = FastV(model, layer=2, keep=keep)
    reqs = _requests(model)
    gen = fv.generate(reqs, max_new_tokens=NEW, return_logits=True)
    rows = [torch.cat([r["input_ids"], torch.tensor(t[:-1])]) for r, (t, _) in zip(reqs, gen)]
    ids, mask = _padded(rows, side)
    n = [r["input_ids"].numel() for r in reqs]
    start = [0 if side == "right" else ids.shape[1] - r.numel() for r in rows]
    last = torch.tensor([s + k - 1 for s, k in zip(start, n)])
    pix = torch.cat([r["pixel_values"] for r in reqs if r["pixel_values"] is not None])
    with torch.no_grad():
        out = fv.forward(ids, mask, pix, last_prompt=last)
    assert out.loss is None
    for b, (toks, logits) in enumerate(gen):
        where = {int(c): j for j, c in enumerate(out.kept[b].tolist()) if c >= 0}
        assert len(where) == rows[b].numel() - (16 - keep) * (1, 0, 2)[b]  # images per row: 1, 0, 2
        got = torch.stack([out.logits[b, where[start[b] + n[b] - 1 + t]] for t in range(NEW)])
        torch.testing.assert_close(got, logits, atol=ATOL, rtol=0)
        assert got.argmax(-1).tolist() == toks


def test_keeping_everything_is_the_model_and_the_loss_is_its_cross_entropy():
    model = tiny_llava(seed=2, grid_side=4, num_layers=6)
    ids, pix = _batch(model)
    labels = ids.clone()
    labels[:, :-3] = -100  # the last 3 tokens are the "answer"
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, pixel_values=pix)
        out = FastV(model, layer=2, keep=16).forward(ids, mask, pix, labels=labels)
        torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
        n = (labels[:, 1:] != -100).sum()
        loss = fastv_forward(2, 16)(model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pix,
                                            "labels": labels}, n)
        want = torch.nn.functional.cross_entropy(ref.logits[:, :-1].reshape(-1, ref.logits.shape[-1]).float(),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
    assert float(loss) == pytest.approx(float(want), abs=1e-5)
    assert float(out.loss) == pytest.approx(float(want), abs=1e-5)  # num_items=None: the mean over the targets
    assert out.layout.loss_targets(labels).tolist() == torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100).tolist()


def _uniform(ids, layer, image_token_id, grid=(4, 4)):
    """ADSC's uniform subset for the one-stage schedule ``layer:2`` as a FastV selector."""
    def select(scores, is_img, keep):
        rows = [stage_plan(f"{layer}:2", input_ids=ids[b], cu_seqlens=torch.tensor([0, ids.shape[1]]),
                           image_token_id=image_token_id, grid=grid).stages[1].index.long() for b in range(ids.shape[0])]
        return torch.stack(rows)

    return select


@pytest.mark.parametrize("layer", [1, 3])
def test_loss_and_gradients_equal_adsc_with_its_uniform_subset(layer):
    """With ADSC's uniform subset in place of the scores, FastV at layer K is ADSC with ``K:2``
    (spec section 4), so its loss and every gradient must be those of ``apply_adsc``'s model
    (transformers' own loss, spec 6.4): an oracle independent of the FastV code."""
    model = tiny_llava(seed=3, grid_side=4, num_layers=6)
    adsc = apply_adsc(tiny_llava(seed=3, grid_side=4, num_layers=6), f"{layer}:2")
    ids, pix = _batch(model, n_text=6)
    labels = ids.clone()
    labels[:, :-4] = -100
    labels[1, -1] = -100
    mask = torch.ones_like(ids)
    out = FastV(model, layer=layer, keep=8, select=_uniform(ids, layer, model.config.image_token_id)).forward(ids, mask, pix, labels=labels)
    ref = adsc(input_ids=ids, attention_mask=mask, pixel_values=pix, labels=labels)
    out.loss.backward()
    ref.loss.backward()
    assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), abs=1e-5)
    grads = dict(adsc.named_parameters())
    checked = 0
    for name, p in model.named_parameters():
        q = grads[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
            checked += int(p.grad.abs().max() > 0)
    assert checked > 50  # every layer, the projector and the vision tower got real gradients


def test_gradients_reach_lora_and_full_weights():
    """``loss.backward()`` through the adapter reaches the LoRA weights of every decoder layer (before
    and after the pruning) and, in full fine-tuning, every decoder weight; frozen weights get none."""
    peft = pytest.importorskip("peft")
    ids, pix = _batch(tiny_llava(seed=4, grid_side=4, num_layers=6))
    labels = ids.clone()
    labels[:, :-3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pix, "labels": labels}
    n = (labels[:, 1:] != -100).sum()

    base = tiny_llava(seed=4, grid_side=4, num_layers=6)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
                          target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    lora = peft.get_peft_model(base, cfg)
    lora.train()
    fastv_forward(2, 4)(lora, batch, n).backward()
    lora_grads = {k: p.grad for k, p in lora.named_parameters() if "lora_" in k}
    assert len(lora_grads) == 6 * 7 * 2
    for k, g in lora_grads.items():
        assert g is not None and g.abs().max() > 0, k
    assert all(p.grad is None for k, p in lora.named_parameters() if "lora_" not in k)  # frozen by PEFT

    full = tiny_llava(seed=4, grid_side=4, num_layers=6).train()
    fastv_forward(2, 4)(full, batch, n).backward()
    for k, p in full.named_parameters():
        if ".layers." in k and "language_model" in k:
            assert p.grad is not None and p.grad.abs().max() > 0, k


def test_gradient_checkpointing_gives_the_same_gradients():
    ids, pix = _batch(tiny_llava(seed=5, grid_side=4, num_layers=6))
    labels = ids.clone()
    labels[:, :-3] = -100
    grads, attn_calls = [], []
    for ckpt in (False, True):
        m = tiny_llava(seed=5, grid_side=4, num_layers=6).train()
        if ckpt:
            enable_checkpointing(m)
        calls = []
        for i in (1, 3):
            m.model.language_model.layers[i].self_attn.register_forward_pre_hook(lambda *a, i=i: calls.append(i))
        FastV(m, layer=2, keep=4).forward(ids, None, pix, labels=labels).loss.backward()
        grads.append({k: p.grad for k, p in m.named_parameters() if p.grad is not None})
        attn_calls.append(calls)
    # checkpointed, layer 3 runs again in the backward pass; the scoring layer K-1 = 1 is not checkpointed
    assert attn_calls == [[1, 3], [1, 3, 3]]
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], atol=1e-6, rtol=1e-5, msg=k)


def test_training_run_through_the_adapter(tmp_path):
    """``adsc_ext.train.train(forward=fastv_forward(...))`` (LoRA, gradient checkpointing on, as the
    study's fastv_tuned arm): the first logged loss is FastV.forward's loss of the whole data set on
    the starting weights (one batch of all 8 samples; LoRA starts as the identity), and the run
    writes a checkpoint that FastV serves."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from train_fixtures import env1, make_data  # noqa: E402

    from adsc_ext.testing.checkpoint import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "ckpt")
    data = make_data(tmp_path)
    out = tmp_path / "out"
    code = f"""
from adsc_ext.train import TrainConfig, train
from adsc_ext.train.fastv import fastv_forward
train(TrainConfig(model={str(ckpt)!r}, data={str(data)!r}, image_folder={str(tmp_path / 'images')!r},
                  output={str(out)!r}, schedule="", max_steps=2, per_device_batch_size=8, lr=1e-3, lora_r=4,
                  lora_alpha=8, lora_dropout=0.0, warmup_ratio=0.0, progress=False),
      log=lambda m: None, forward=fastv_forward(2, 4))
"""
    import subprocess

    r = subprocess.run([sys.executable, "-c", code], env=env1(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(math.isfinite(e["loss"]) for e in log)

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from adsc_ext.train import InstructDataset, collate, load_records

    proc = AutoProcessor.from_pretrained(ckpt)
    start = LlavaForConditionalGeneration.from_pretrained(ckpt).eval()
    fv = FastV(start, layer=2, keep=4)
    ds = InstructDataset(load_records(str(data)), str(tmp_path / "images"), proc, tokens_per_image=16,
                         image_token_id=fv.image_token_id, max_length=512)
    batch = collate([ds[i] for i in range(len(ds))], pad_token_id=proc.tokenizer.pad_token_id or 0)
    with torch.no_grad():
        want = fv.forward(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], labels=batch["labels"])
    assert log[0]["loss"] == pytest.approx(float(want.loss), rel=1e-4)
    tuned = LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert FastV(tuned, layer=2, keep=4).generate(torch.tensor([[1, 5, 6, 7]]), None, 2).shape == (1, 2)


def test_bad_input():
    model = tiny_llava(seed=0, grid_side=4, num_layers=6)
    ids, pix = _batch(model, B=2)
    fv = FastV(model, layer=2, keep=4)
    mask = torch.ones_like(ids)
    with pytest.raises(ValueError, match=r"pruning layer must be in \[1, 5\], got 6"):
        FastV(model, layer=6, keep=4)
    with pytest.raises(ValueError, match=r"non-empty \[B, T\] tensor, got shape \(0, 22\)"):
        fv.forward(ids[:0], mask[:0], None)
    with pytest.raises(ValueError, match=r"non-empty \[B, T\] tensor, got shape \(22,\)"):
        fv.forward(ids[0], mask[0], pix[:1])
    with pytest.raises(ValueError, match="input_ids must be an integer tensor"):
        fv.forward(ids.float(), mask, pix)
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 22\), got \(2, 21\)"):
        fv.forward(ids, mask[:, 1:], pix)
    with pytest.raises(ValueError, match="row 1 has no real token"):
        fv.forward(ids, torch.stack([mask[0], torch.zeros_like(mask[1])]), pix[:1])
    with pytest.raises(ValueError, match=r"input_ids hold 2 image\(s\) but pixel_values has 1"):
        fv.forward(ids, mask, pix[:1])
    stray = ids.clone()
    stray[1, -1] = model.config.image_token_id
    with pytest.raises(ValueError, match="row 1: image tokens must form whole images of 4x4 = 16 tokens"):
        fv.forward(stray, mask, pix)
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(2, 22\), got \(2, 3\)"):
        fv.forward(ids, mask, pix, labels=ids[:, :3])
    with pytest.raises(ValueError, match=r"last_prompt must be 2 integer positions"):
        fv.forward(ids, mask, pix, last_prompt=[3])
    with pytest.raises(ValueError, match=r"last_prompt\[1\] = 22 is not a real token of row 1"):
        fv.forward(ids, mask, pix, last_prompt=[3, 22])
    right = mask.clone()
    right[0, -1] = 0
    with pytest.raises(ValueError, match=r"last_prompt\[0\] = 21 is not a real token of row 0"):
        fv.forward(ids, right, pix, last_prompt=torch.tensor([21, 5]))
    with pytest.raises(ValueError, match=r"last_prompt must be 2 integer positions \(one per row\), got torch.float32"):
        fv.forward(ids, right, pix, last_prompt=torch.tensor([3.0, 5.0]))


def test_non_contiguous_and_int32_inputs_and_bool_mask():
    model = tiny_llava(seed=1, grid_side=4, num_layers=6)
    ids, pix = _batch(model)
    fv = FastV(model, layer=2, keep=4)
    with torch.no_grad():
        want = fv.forward(ids, torch.ones_like(ids), pix)
        wide = torch.stack([ids, ids], dim=-1)[..., 0]  # a strided view
        assert not wide.is_contiguous()
        got = fv.forward(wide.to(torch.int32), torch.ones(ids.shape, dtype=torch.bool).t().contiguous().t(),
                         pix.transpose(2, 3).contiguous().transpose(2, 3))
    assert torch.equal(got.kept, want.kept)
    torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
