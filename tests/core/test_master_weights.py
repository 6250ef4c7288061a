"""bfloat16 parameters with a float32 master copy (core/master_weights.py): the outer step runs on the master
copy, the bf16 weights are its rounding, and the copy survives optimizer_state() / load_optimizer_state()."""
import copy

import pytest
import torch

from mamlen.core import MetaConfig, MetaEngine, Task

KW = dict(hvp="exact", inner_lr=1e-3, outer_lr=1e-4, outer_weight_decay=0.05, autocast_dtype=torch.bfloat16)


def tasks_for(tiny, gen, n=2):
    return [Task(support=[tiny.batch(gen)], query=tiny.batch(gen)) for _ in range(n)]


def masters(engine):
    return engine.optimizer_state()["master"]


def test_outer_step_on_master_copy(tiny, gen):
    model = tiny.gpt2(torch.bfloat16)
    engine = MetaEngine(model, MetaConfig(master_weights=True, **KW))
    tasks = tasks_for(tiny, gen)
    cfg, (b1, b2) = engine.config, engine.config.betas
    for t in (1, 2, 3):
        before = {n: x.double() for n, x in masters(engine).items()}
        st = engine.optimizer_state()
        G = {n: g.double() for n, g in engine.meta_gradient(tasks).items()}
        assert not engine.step(tasks)["skipped"]
        after = masters(engine)
        for n, p in model.named_parameters():
            assert p.dtype == torch.bfloat16 and after[n].dtype == torch.float32
            assert torch.equal(p.detach(), after[n].to(torch.bfloat16)), n  # weights = rounded master
            m = b1 * st["exp_avg"][n].double() + (1 - b1) * G[n]
            v = b2 * st["exp_avg_sq"][n].double() + (1 - b2) * G[n] ** 2
            a, b = 1 / (1 - b1 ** t), 1 / (1 - b2 ** t)
            want = (1 - cfg.outer_lr * cfg.outer_weight_decay) * before[n] - cfg.outer_lr * a * m / ((b * v).sqrt() + cfg.eps)
            torch.testing.assert_close(after[n].double(), want, rtol=1e-6, atol=1e-7, msg=f"step {t} {n}")
    # the point of the master copy: at lr = 1e-5 (~5e-4 of these weights, below bf16's 2^-8 spacing) the
    # updates of bfloat16 weights mostly round away; the master copy keeps them
    moved = {}
    for master in (True, False):
        eng = MetaEngine(tiny.gpt2(torch.bfloat16), MetaConfig(master_weights=master, **{**KW, "outer_lr": 1e-5}))
        w0 = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
        for _ in range(3):
            eng.step(tasks)
        moved[master] = sum(int((p.detach() != w0[n]).sum()) for n, p in eng.model.named_parameters())
    assert moved[True] > 1.3 * moved[False], moved  # measured: 3266 vs 1868 weights changed


def test_master_round_trip_and_resume(tiny, gen):
    """Save after 2 steps, load into a fresh engine (weights from the 'checkpoint'), one more step on both:
    torch.equal weights, master copies and moments."""
    tasks = tasks_for(tiny, gen)
    a = MetaEngine(tiny.gpt2(torch.bfloat16), MetaConfig(master_weights=True, **KW))
    for _ in range(2):
        a.step(tasks)
    state = a.optimizer_state()
    weights = {n: p.detach().clone() for n, p in a.model.named_parameters()}
    # the master copy is not the bf16 weights: it carries the sub-bf16 part of the updates
    assert any(not torch.equal(state["master"][n], weights[n].float()) for n in weights)

    b_model = tiny.gpt2(torch.bfloat16, seed=5)  # other weights, overwritten as a checkpoint load would
    b = MetaEngine(b_model, MetaConfig(master_weights=True, **KW))
    with torch.no_grad():
        for n, p in b_model.named_parameters():
            p.copy_(weights[n])
    b.load_optimizer_state(state)
    assert all(torch.equal(masters(b)[n], state["master"][n]) for n in weights)
    a.step(tasks)
    b.step(tasks)
    sa, sb = a.optimizer_state(), b.optimizer_state()
    for n, p in a.model.named_parameters():
        assert torch.equal(p, dict(b_model.named_parameters())[n]), n
        for key in ("master", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[key][n], sb[key][n]), (key, n)

    # a checkpoint without a master copy (e.g. written without the option): restarts from the weights
    c = MetaEngine(tiny.gpt2(torch.bfloat16), MetaConfig(master_weights=True, **KW))
    c.load_optimizer_state({k: v for k, v in state.items() if k != "master"})
    assert all(torch.equal(masters(c)[n], p.detach().float()) for n, p in c.model.named_parameters())


def test_master_weights_needs_bfloat16(tiny):
    with pytest.raises(ValueError, match="master_weights=True needs bfloat16"):
        MetaEngine(tiny.gpt2(torch.float32), MetaConfig(master_weights=True))
    with pytest.raises(ValueError, match="MetaConfig.master_weights"):
        MetaConfig(master_weights="yes")
    with pytest.raises(ValueError, match="MetaConfig.moments_bits"):
        MetaConfig(moments_bits=4)
