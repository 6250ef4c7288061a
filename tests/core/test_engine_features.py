"""Engine features the reference test of test_engine.py does not reach: gradient clipping, one support batch
reused K times, the outer AdamW step (with separate inner moments), left padding, the tiled attention path."""
import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mamlen.core import MetaConfig, MetaEngine, Task

BASE = dict(inner_lr=3e-2, outer_lr=1e-2, inner_weight_decay=0.1, eps=1e-8)


def engine_with_state(model, cfg, state):
    engine = MetaEngine(model, cfg)
    engine.load_optimizer_state(state)
    return engine


def test_max_grad_norm_clips_the_meta_gradient(tiny, gen, reference):
    tasks = reference.make_tasks(tiny, gen)
    model = tiny.gpt2()
    state = reference.random_state(model, gen)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    G = engine_with_state(copy.deepcopy(model), MetaConfig(outer_optimizer="sgd", **BASE), state).meta_gradient(tasks)
    norm = sum(float(g.pow(2).sum()) for g in G.values()) ** 0.5
    clip = norm / 4
    engine = engine_with_state(model, MetaConfig(outer_optimizer="sgd", max_grad_norm=clip, **BASE), state)
    metrics = engine.step(tasks)
    assert metrics["grad_norm"] == pytest.approx(norm, rel=1e-12)  # reported before clipping
    for n, p in model.named_parameters():  # outer SGD, no weight decay: θ' = θ - lr·G·clip/|G|
        torch.testing.assert_close(p.detach(), theta[n] - BASE["outer_lr"] * G[n] * (clip / norm),
                                   rtol=1e-12, atol=1e-14, msg=lambda m, n=n: f"{n}: {m}")


def test_one_support_batch_is_reused_for_every_inner_step(tiny, gen, reference):
    K = 3
    model = tiny.gpt2()
    ref_model = copy.deepcopy(model)
    cfg = MetaConfig(hvp="exact", inner_steps=K, **BASE)
    tasks = [Task(support=[tiny.batch(gen)], query=tiny.batch(gen)) for _ in range(2)]
    state = reference.random_state(model, gen)
    G = engine_with_state(model, cfg, state).meta_gradient(tasks)
    R = reference.ref_meta_gradient(ref_model, cfg, tasks, state)  # the reference repeats the batch K times
    assert reference.rel_err(G, R) < 1e-9


@pytest.mark.parametrize("moments", ["shared", "separate"])
def test_outer_adamw_step_against_float64(tiny, gen, reference, moments):
    """θ' and the saved moments after one step equal AdamW on the meta-gradient from the loaded outer moments —
    with separate inner moments too (they must not leak into the outer update)."""
    b1, b2 = 0.9, 0.999
    cfg = MetaConfig(hvp="exact", moments=moments, inner_steps=2, outer_weight_decay=0.05, betas=(b1, b2), **BASE)
    tasks = reference.make_tasks(tiny, gen, K=2)
    model = tiny.gpt2()
    state = reference.random_state(model, gen, step=4)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    G = engine_with_state(copy.deepcopy(model), cfg, state).meta_gradient(tasks)
    engine = engine_with_state(model, cfg, state)
    engine.step(tasks)
    after = engine.optimizer_state()
    t = state["step"] + 1
    lr, wd = cfg.outer_lr, cfg.outer_weight_decay
    for n, p in model.named_parameters():
        m = b1 * state["exp_avg"][n] + (1 - b1) * G[n]
        v = b2 * state["exp_avg_sq"][n] + (1 - b2) * G[n] ** 2
        want = theta[n] * (1 - lr * wd) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + cfg.eps)
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14, msg=lambda s, n=n: f"{n}: {s}")
        torch.testing.assert_close(after["exp_avg"][n], m, rtol=1e-12, atol=1e-16)
        torch.testing.assert_close(after["exp_avg_sq"][n], v, rtol=1e-12, atol=1e-18)
    assert after["step"] == t


def left_padded(batch, pad=3):
    """Move the second row's padding to the left (the tokens shift right; labels follow)."""
    out = {k: v.clone() for k, v in batch.items()}
    keep = int(batch["attention_mask"][1].sum())
    for k, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
        row = torch.full_like(out[k][1], fill)
        row[-keep:] = batch[k][1][:keep]
        out[k][1] = row
    return out


@pytest.mark.parametrize("hvp", ["exact", "mixed", "fd"])
def test_left_padding_matches_the_reference(tiny, gen, reference, hvp):
    """The engine's attention for each mode (tiled "mamlen" for exact/mixed, SDPA for fd) against the eager
    float64 reference on left-padded batches."""
    model = tiny.gpt2()
    ref_model = copy.deepcopy(model)
    cfg = MetaConfig(hvp=hvp, inner_steps=2, fd_eps=1e-5, **BASE)
    tasks = [Task(support=[left_padded(tiny.batch(gen, pad_last=3)) for _ in range(2)],
                  query=left_padded(tiny.batch(gen, pad_last=3))) for _ in range(2)]
    assert int(tasks[0].query["attention_mask"][1, 0]) == 0
    state = reference.random_state(model, gen)
    G = engine_with_state(model, cfg, state).meta_gradient(tasks)
    R = reference.ref_meta_gradient(ref_model, cfg, tasks, state)
    assert reference.rel_err(G, R) < (1e-4 if hvp == "fd" else 1e-9)


@pytest.mark.parametrize("hvp", ["exact", "mixed"])
def test_engine_through_the_tiled_attention_path(tiny, gen, reference, hvp, monkeypatch):
    """T = 200 > 192: the tiled attention's own forward/backward/double-backward, not its dense small-T path."""
    from mamlen.core import attention_ops as tiled_attention
    T = 200
    assert T * T > tiled_attention.DENSE_MAX_SCORES
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=61, n_positions=T,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                                       eos_token_id=0)).to(torch.float64).eval()
    ref_model = copy.deepcopy(model)
    cfg = MetaConfig(hvp=hvp, inner_steps=1, **BASE)
    tasks = [Task(support=[tiny.batch(gen, T=T, pad_last=17)], query=tiny.batch(gen, T=T, pad_last=5))]
    state = reference.random_state(model, gen)
    engine = engine_with_state(model, cfg, state)
    assert engine.attention.second_order == "mamlen"
    calls = []
    real = tiled_attention._Attn.apply
    monkeypatch.setattr(tiled_attention._Attn, "apply", lambda *a: calls.append(1) or real(*a))
    G = engine.meta_gradient(tasks)
    assert calls, "the tiled kernel never ran"
    R = reference.ref_meta_gradient(ref_model, cfg, tasks, state)
    assert reference.rel_err(G, R) < 1e-9
