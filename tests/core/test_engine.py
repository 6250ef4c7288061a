"""MetaEngine against a plain-autograd reference: the inner loop unrolled with create_graph in float64
(torch.func.functional_call on per-parameter tensors, its own AdamW and loss code), then dL_Q/dθ."""
import copy
import math
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from mamlen.core import MetaConfig, MetaEngine, Task


# ---------------------------------------------------------------------------------------------------------
# the reference: written the obvious way, sharing no code with the engine
def ref_loss(model, params, batch):
    logits = functional_call(model, params, (), {"input_ids": batch["input_ids"],
                                                 "attention_mask": batch["attention_mask"], "use_cache": False}).logits
    logp = F.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum() / keep.sum()


def safe_sqrt(x):
    # d/dx sqrt at 0 is infinite; the contract defines the v-adjoint there as 0 (double-where keeps it finite)
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def ref_adapted(model, cfg, theta, m0, v0, t0, task, *, create_graph, drop_hessian=False):
    b1, b2 = cfg.betas
    K = cfg.inner_steps
    supports = task.support if len(task.support) == K else task.support * K
    phi, m, v = dict(theta), dict(m0), dict(v0)
    if cfg.moments == "separate":
        m = {n: torch.zeros_like(x) for n, x in theta.items()}
        v = {n: torch.zeros_like(x) for n, x in theta.items()}
        t0 = 0
    for j, batch in enumerate(supports, start=1):
        loss = ref_loss(model, phi, batch)
        grads = torch.autograd.grad(loss, list(phi.values()), create_graph=create_graph)
        new_phi = {}
        for (n, p), g in zip(phi.items(), grads):
            if drop_hessian:
                g = g.detach()
            if cfg.inner_optimizer == "sgd":
                new_phi[n] = (1 - cfg.inner_lr * cfg.inner_weight_decay) * p - cfg.inner_lr * g
                continue
            tau = t0 + j
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            a, b = 1 / (1 - b1 ** tau), 1 / (1 - b2 ** tau)
            s = safe_sqrt(b * v[n])
            new_phi[n] = (1 - cfg.inner_lr * cfg.inner_weight_decay) * p - cfg.inner_lr * a * m[n] / (s + cfg.eps)
        phi = new_phi
    return phi


def ref_meta_gradient(model, cfg, tasks, state):
    model.set_attn_implementation("eager")  # second order through attention
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    m0, v0, t0 = state["exp_avg"], state["exp_avg_sq"], state["step"]
    G = {n: torch.zeros_like(x) for n, x in theta.items()}
    for task in tasks:
        phi = ref_adapted(model, cfg, theta, m0, v0, t0, task, create_graph=True,
                          drop_hessian=cfg.hvp == "first_order")
        gi = torch.autograd.grad(ref_loss(model, phi, task.query), list(theta.values()))
        for n, g in zip(G, gi):
            G[n] += g / len(tasks)
    return G


def ref_objective(model, cfg, tasks, state, theta):
    with torch.enable_grad():
        total = 0.0
        for task in tasks:
            th = {n: x.detach().requires_grad_() for n, x in theta.items()}
            phi = ref_adapted(model, cfg, th, state["exp_avg"], state["exp_avg_sq"], state["step"], task,
                              create_graph=False)
            total += float(ref_loss(model, {n: x.detach() for n, x in phi.items()}, task.query))
    return total / len(tasks)


def rel_err(a: dict, b: dict):
    num = sum(float((a[n] - b[n]).pow(2).sum()) for n in b) ** 0.5
    den = sum(float(b[n].pow(2).sum()) for n in b) ** 0.5
    return num / den


def random_state(model, gen, step=3):
    """Non-trivial shared moments: exercises the bias correction at τ = step + j and the m, v carry-over."""
    m = {n: 1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
    v = {n: 1e-6 * torch.rand(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
    return {"step": step, "exp_avg": m, "exp_avg_sq": v}


def make_tasks(tiny, gen, n=2, K=1):
    return [Task(support=[tiny.batch(gen) for _ in range(K)], query=tiny.batch(gen)) for _ in range(n)]


BASE = dict(inner_lr=3e-2, outer_lr=1e-2, inner_weight_decay=0.1, outer_weight_decay=0.05, eps=1e-8, fd_eps=1e-5)


# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hvp,inner,moments,K", [
    (h, i, mo, k) for h, i, mo, k in itertools.product(("exact", "mixed", "fd", "first_order"), ("adamw", "sgd"),
                                                         ("shared", "separate"), (1, 2, 3))
    if not (i == "sgd" and mo == "separate")  # inner SGD never reads the moments: one moments setting suffices
])
def test_meta_gradient_matches_reference(tiny, gen, hvp, inner, moments, K):
    model = tiny.gpt2()
    cfg = MetaConfig(hvp=hvp, inner_optimizer=inner, moments=moments, inner_steps=K, **BASE)
    tasks = make_tasks(tiny, gen, n=2, K=K)
    ref_model = copy.deepcopy(model)
    engine = MetaEngine(model, cfg)
    state = random_state(model, gen)
    engine.load_optimizer_state(state)
    G = engine.meta_gradient(tasks)
    R = ref_meta_gradient(ref_model, cfg, tasks, state)
    tol = {"exact": 1e-9, "mixed": 1e-9, "fd": 1e-4, "first_order": 1e-9}[hvp]
    err = rel_err(G, R)
    assert err < tol, f"{hvp}/{inner}/{moments}/K={K}: relative error {err:.3e} ≥ {tol}"
    assert all(torch.isfinite(g).all() for g in G.values())


def test_modes_differ_where_they_should(tiny, gen):
    """Guards against a reference that is blind to the Hessian term: first_order must NOT equal exact."""
    tasks = make_tasks(tiny, gen, K=2)
    out = {}
    for hvp in ("exact", "first_order"):
        model = tiny.gpt2()
        out[hvp] = MetaEngine(model, MetaConfig(hvp=hvp, inner_steps=2, **BASE)).meta_gradient(tasks)
    assert rel_err(out["first_order"], out["exact"]) > 1e-3


def test_directional_finite_difference_of_meta_objective(tiny, gen):
    """⟨G, d⟩ equals the central difference of F(θ) = mean_i L_Q(φ_K(θ)) along a random direction d."""
    model = tiny.gpt2()
    cfg = MetaConfig(hvp="exact", inner_steps=2, **BASE)
    tasks = make_tasks(tiny, gen, n=2, K=2)
    state = random_state(model, gen)
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    ref_model = copy.deepcopy(model)
    engine = MetaEngine(model, cfg)
    engine.load_optimizer_state(state)
    G = engine.meta_gradient(tasks)
    d = {n: torch.randn(x.shape, generator=gen, dtype=x.dtype) for n, x in theta.items()}
    h = 1e-7  # the inner AdamW is strongly curved where |g| is small: error O(h²) is ~1e-8 relative here
    fp = ref_objective(ref_model, cfg, tasks, state, {n: theta[n] + h * d[n] for n in theta})
    fm = ref_objective(ref_model, cfg, tasks, state, {n: theta[n] - h * d[n] for n in theta})
    fd = (fp - fm) / (2 * h)
    dot = sum(float((G[n] * d[n]).sum()) for n in G)
    assert abs(fd - dot) < 1e-6 * max(1.0, abs(dot)), (fd, dot)


def test_meta_gradient_mutates_nothing(tiny, gen):
    model = tiny.gpt2()
    engine = MetaEngine(model, MetaConfig(hvp="exact", inner_steps=2, **BASE))
    engine.load_optimizer_state(random_state(model, gen))
    before_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before_state = engine.optimizer_state()
    engine.meta_gradient(make_tasks(tiny, gen, K=2))
    for n, p in model.named_parameters():
        assert torch.equal(p, before_params[n]), n
    after = engine.optimizer_state()
    assert after["step"] == before_state["step"]
    for key in ("exp_avg", "exp_avg_sq"):
        for n in after[key]:
            assert torch.equal(after[key][n], before_state[key][n]), (key, n)


@pytest.mark.parametrize("outer", ["adamw", "sgd"])
def test_outer_step_matches_formula(tiny, gen, outer):
    model = tiny.gpt2()
    cfg = MetaConfig(hvp="exact", outer_optimizer=outer, **BASE)
    engine = MetaEngine(model, cfg)
    state = random_state(model, gen, step=4)
    engine.load_optimizer_state(state)
    tasks = make_tasks(tiny, gen)
    G = {n: g.clone() for n, g in engine.meta_gradient(tasks).items()}
    theta = {n: p.detach().clone() for n, p in model.named_parameters()}
    metrics = engine.step(tasks)
    assert metrics["step"] == 5 and not metrics["skipped"]
    b1, b2 = cfg.betas
    after = engine.optimizer_state()
    for n, p in model.named_parameters():
        m = b1 * state["exp_avg"][n] + (1 - b1) * G[n]
        v = b2 * state["exp_avg_sq"][n] + (1 - b2) * G[n] ** 2
        if outer == "adamw":
            a, b = 1 / (1 - b1 ** 5), 1 / (1 - b2 ** 5)
            want = (1 - cfg.outer_lr * cfg.outer_weight_decay) * theta[n] - cfg.outer_lr * a * m / ((b * v).sqrt() + cfg.eps)
        else:
            want = (1 - cfg.outer_lr * cfg.outer_weight_decay) * theta[n] - cfg.outer_lr * G[n]
        torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(after["exp_avg"][n], m, rtol=1e-12, atol=1e-16)
        torch.testing.assert_close(after["exp_avg_sq"][n], v, rtol=1e-12, atol=1e-20)
    assert metrics["grad_norm"] == pytest.approx(sum(float(g.pow(2).sum()) for g in G.values()) ** 0.5, rel=1e-9)


def test_metaicl_step_is_adamw_on_mean_gradient(tiny, gen):
    model = tiny.gpt2()
    ref = copy.deepcopy(model)
    cfg = MetaConfig(**BASE)
    engine = MetaEngine(model, cfg)
    batches = [tiny.batch(gen) for _ in range(3)]
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.outer_lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.outer_weight_decay)
    for _ in range(2):
        params = dict(ref.named_parameters())
        loss = sum(ref_loss(ref, params, b) for b in batches) / len(batches)
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = engine.metaicl_step(batches)
        assert metrics["loss"] == pytest.approx(loss.item(), rel=1e-12)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-10, atol=1e-13)
    st = engine.optimizer_state()
    for n, p in ref.named_parameters():
        torch.testing.assert_close(st["exp_avg"][n], opt.state[p]["exp_avg"], rtol=1e-10, atol=1e-16)
        torch.testing.assert_close(st["exp_avg_sq"][n], opt.state[p]["exp_avg_sq"], rtol=1e-10, atol=1e-20)


@pytest.mark.parametrize("hvp", ["exact", "mixed"])
def test_llama_architecture(tiny, gen, hvp):
    model = tiny.llama()
    cfg = MetaConfig(hvp=hvp, inner_steps=2, **BASE)
    tasks = make_tasks(tiny, gen, n=2, K=2)
    ref_model = copy.deepcopy(model)
    engine = MetaEngine(model, cfg)
    state = random_state(model, gen)
    engine.load_optimizer_state(state)
    G = engine.meta_gradient(tasks)
    # LlamaRMSNorm computes in float32 even in a float64 model: the two derivative orders round differently there
    assert rel_err(G, ref_meta_gradient(ref_model, cfg, tasks, state)) < 1e-6
    if hvp == "mixed":  # SiLU's fused backward has no forward-AD formula: the engine swapped the activation
        from mamlen.core.forward_ad import CompositeSiLU
        assert isinstance(model.model.layers[0].mlp.act_fn, CompositeSiLU)


@pytest.mark.parametrize("hvp", ["exact", "mixed", "fd", "first_order"])
def test_checkpointing_composes_with_every_mode(tiny, gen, hvp):
    tasks = make_tasks(tiny, gen, K=2)
    plain = MetaEngine(tiny.gpt2(), MetaConfig(hvp=hvp, inner_steps=2, **BASE)).meta_gradient(tasks)
    model = tiny.gpt2()
    engine = MetaEngine(model, MetaConfig(hvp=hvp, inner_steps=2, checkpointing=True, **BASE))
    calls = []
    block = model.transformer.h[0]
    block.mlp.register_forward_pre_hook(lambda *a: calls.append(1))  # pre: recompute stops early
    G = engine.meta_gradient(tasks)
    assert rel_err(G, plain) < 1e-12
    # recomputation really happened: more block forwards than loss evaluations
    n_evals = {"exact": 2 * (2 + 1 + 2), "mixed": 2 * (2 + 1 + 2), "fd": 2 * (2 + 1 + 4),
               "first_order": 2 * (2 + 1)}[hvp]
    assert len(calls) > n_evals, (len(calls), n_evals)


def test_dropout_masks_replayed(tiny, gen):
    """With dropout on, every recomputation of a loss must use the forward pass's masks: exact with the graph
    kept from the forward, exact recomputed, and mixed then all agree (they would not with fresh masks)."""
    tasks = make_tasks(tiny, gen, K=2)
    out = {}
    for name, kw in {"keep": dict(hvp="exact", inner_graph="keep"), "recompute": dict(hvp="exact"),
                     "mixed": dict(hvp="mixed"), "ckpt": dict(hvp="exact", checkpointing=True)}.items():
        model = tiny.gpt2(dropout=0.2).train()
        torch.manual_seed(7)
        out[name] = MetaEngine(model, MetaConfig(inner_steps=2, **BASE, **kw)).meta_gradient(tasks)
    for name in ("recompute", "mixed", "ckpt"):
        assert rel_err(out[name], out["keep"]) < 1e-10, name
    model = tiny.gpt2(dropout=0.2).train()
    torch.manual_seed(8)  # other masks: a different meta-gradient, so the test can tell
    other = MetaEngine(model, MetaConfig(inner_steps=2, hvp="exact", **BASE)).meta_gradient(tasks)
    assert rel_err(other, out["keep"]) > 1e-4


def test_zero_gradient_lanes_are_finite(tiny, gen):
    """Separate moments start at v = 0: rows no batch touches (position embeddings past T) have g = 0, v = 0,
    s = 0 — the v-adjoint is defined as 0 there, so G stays finite and exactly 0 on those rows."""
    model = tiny.gpt2()
    engine = MetaEngine(model, MetaConfig(hvp="exact", moments="separate", inner_steps=2, **BASE))
    G = engine.meta_gradient(make_tasks(tiny, gen, K=2))
    assert all(torch.isfinite(g).all() for g in G.values())
    assert torch.count_nonzero(G["transformer.wpe.weight"][9:]) == 0


# Lower precision against float64. An AdamW inner step from near-zero moments is sign-like (m/√v ≈ ±1) and its
# derivative amplifies rounding by ~1/|g|; from running moments (v ≫ g², the shared-moments regime after a few
# steps) it is well conditioned, as SGD is. Errors are bounded in units of the Hessian term |G64 - G64(first
# order)|: fp32 1e-4 of it (an HVP off by 1e-4 fails), bf16 autocast 0.25 (measured 0.09-0.15; the bf16 accuracy
# table is bench/results/precision.md).
def running_state(model, gen):
    return {"step": 10,
            "exp_avg": {n: 1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()},
            "exp_avg_sq": {n: 1e-3 * (1 + torch.rand(p.shape, generator=gen, dtype=p.dtype))
                           for n, p in model.named_parameters()}}


@pytest.mark.parametrize("inner", ["sgd", "adamw"])
def test_lower_precision_close_to_float64(tiny, gen, inner):
    tasks = make_tasks(tiny, gen, K=2)
    state = running_state(tiny.gpt2(), gen)
    kw = dict(BASE, inner_lr=1e-3, inner_optimizer=inner, inner_steps=2)

    def run(dtype, **extra):
        engine = MetaEngine(tiny.gpt2(dtype), MetaConfig(**kw, **extra))
        engine.load_optimizer_state({"step": state["step"],
                                     **{k: {n: t.to(dtype) for n, t in state[k].items()}
                                        for k in ("exp_avg", "exp_avg_sq")}})
        return {n: g.double() for n, g in engine.meta_gradient(tasks).items()}

    G64 = run(torch.float64, hvp="exact")
    F64 = run(torch.float64, hvp="first_order")
    # errors in units of the Hessian term |G64 - F64| (a bound on |G - G64| alone let a 25%-wrong HVP pass)
    h = rel_err(F64, G64)
    assert rel_err(run(torch.float32, hvp="exact"), G64) < 1e-4 * h
    for hvp in ("exact", "mixed"):
        err = rel_err(run(torch.float32, hvp=hvp, autocast_dtype=torch.bfloat16), G64) / h
        assert err < 0.25, f"{hvp}: bf16 error {err:.2f} of the Hessian term"  # measured 0.09 (sgd), 0.15 (adamw)


def test_nonfinite_step_is_skipped(tiny, gen):
    model = tiny.gpt2()
    engine = MetaEngine(model, MetaConfig(**BASE), loss_fn=lambda m, b: m(**b).logits.sum() * float("nan"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    st = engine.optimizer_state()
    metrics = engine.step(make_tasks(tiny, gen))
    assert metrics["skipped"] and metrics["step"] == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n])
    assert engine.optimizer_state()["step"] == st["step"]


def test_bad_inputs_are_named(tiny, gen):
    with pytest.raises(ValueError, match="MetaConfig.hvp"):
        MetaConfig(hvp="exakt")
    with pytest.raises(ValueError, match="inner_steps"):
        MetaConfig(inner_steps=0)
    model = tiny.gpt2()
    engine = MetaEngine(model, MetaConfig(inner_steps=2, **BASE))
    with pytest.raises(ValueError, match="support batches"):
        engine.meta_gradient([Task(support=[tiny.batch(gen)] * 3, query=tiny.batch(gen))])
    with pytest.raises(ValueError, match="no tasks"):
        engine.meta_gradient([])
    with pytest.raises(KeyError, match="missing"):
        engine.load_optimizer_state({"step": 1, "exp_avg": {}, "exp_avg_sq": {}})
    model.transformer.wte.weight.data = model.transformer.wte.weight.data.clone()
    with pytest.raises(RuntimeError, match="no longer lives"):
        engine.meta_gradient(make_tasks(tiny, gen, K=2))


def test_attention_chosen_per_mode(tiny):
    from mamlen.core import attention
    for hvp in ("exact", "mixed", "fd", "first_order"):
        m = tiny.gpt2()
        plan = MetaEngine(m, MetaConfig(hvp=hvp)).attention
        assert m.config._attn_implementation == plan.first_order == "sdpa"  # the model rests on the fast one
        assert plan.second_order == ("mamlen" if hvp in ("exact", "mixed") else "sdpa")
        with attention.using(m, plan.second_order):
            assert m.config._attn_implementation == plan.second_order
        assert m.config._attn_implementation == "sdpa"
    assert attention.choose("exact", "cpu", forced="eager") == attention.AttentionPlan("eager", "eager")


@pytest.mark.parametrize("hvp", ["exact", "mixed", "fd", "first_order"])
def test_attention_per_pass(tiny, gen, monkeypatch, hvp):
    """Only the passes differentiated twice (exact / mixed: the support gradients and their HVPs) run the
    second-order attention; the query gradient, the "before" loss, fd's probes and the MetaICL step run SDPA."""
    from transformers import AttentionInterface
    calls = []
    for name in ("sdpa", "mamlen"):
        real = AttentionInterface._global_mapping[name]
        monkeypatch.setitem(AttentionInterface._global_mapping, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    model = tiny.gpt2(n_layer=1)
    engine = MetaEngine(model, MetaConfig(hvp=hvp, **BASE))
    task = make_tasks(tiny, gen, n=1, K=1)
    engine.step(task)
    # one layer: forwards in order L_Q(θ) (before), L_S(θ) (support gradient), L_Q(φ_1), then the HVP's own:
    # exact = the block's forward + 3 recomputations, mixed = forward + 1 checkpoint recomputation, fd = 2 probes
    expected = {"exact": ["sdpa", "mamlen", "sdpa"] + ["mamlen"] * 4, "mixed": ["sdpa", "mamlen", "sdpa"] + ["mamlen"] * 2,
                "fd": ["sdpa"] * 5, "first_order": ["sdpa"] * 3}[hvp]
    assert calls == expected, (hvp, calls)
    calls.clear()
    engine.metaicl_step([task[0].query])
    assert calls == ["sdpa"]


@pytest.mark.parametrize("inner", ["adamw", "sgd"])
def test_adapt_gain_is_query_loss_before_minus_after(tiny, gen, inner):
    """metrics["adapt_gain"] = mean_i L_Q(θ) - L_Q(φ_K), both evaluated independently with the reference."""
    model = tiny.gpt2()
    cfg = MetaConfig(hvp="first_order", inner_optimizer=inner, inner_steps=2, **BASE)
    tasks = make_tasks(tiny, gen, n=2, K=2)
    ref_model = copy.deepcopy(model)
    ref_model.set_attn_implementation("eager")
    engine = MetaEngine(model, cfg)
    state = random_state(model, gen)
    engine.load_optimizer_state(state)
    theta = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
    with torch.no_grad():
        before = sum(float(ref_loss(ref_model, theta, t.query)) for t in tasks) / len(tasks)
    after = ref_objective(ref_model, cfg, tasks, state, theta)
    m = engine.step(tasks)
    assert m["query_loss_before"] == pytest.approx(before, rel=1e-10)
    assert m["loss"] == pytest.approx(after, rel=1e-10)
    assert m["adapt_gain"] == pytest.approx(before - after, rel=1e-8, abs=1e-12)
    assert m["adapt_gain"] != 0.0  # the inner steps move the weights at this lr

    cfg_off = MetaConfig(hvp="first_order", inner_optimizer=inner, inner_steps=2, measure_adaptation=False, **BASE)
    m_off = MetaEngine(copy.deepcopy(ref_model), cfg_off).step(tasks)
    assert math.isnan(m_off["adapt_gain"])


def test_step_counts_target_and_input_tokens(tiny, gen):
    """tokens: the supervised positions; input_tokens: the non-padding tokens of every batch the step reads (a
    reused support batch once per inner step). The trainer's tokens_per_s divides the latter by the step time."""
    model = tiny.gpt2()
    engine = MetaEngine(model, MetaConfig(hvp="first_order", inner_steps=2, **BASE))
    q = [tiny.batch(gen, B=3, T=11, pad_last=4), tiny.batch(gen, B=2, T=7, pad_last=0)]
    s = [tiny.batch(gen, B=2, T=9, pad_last=3), tiny.batch(gen, B=1, T=5)]
    tasks = [Task(support=[s[0]], query=q[0]), Task(support=[s[1], s[0]], query=q[1])]
    # (labels[:, 1:] != -100) and the mask, counted by hand from make_batch's layout
    targets = {id(b): int((b["labels"][:, 1:] != -100).sum()) for b in q + s}
    m = engine.step(tasks)
    assert m["input_tokens"] == (3 * 11 - 4) + 2 * 7 + 2 * (2 * 9 - 3) + (1 * 5 + 2 * 9 - 3)
    assert m["tokens"] == sum(targets[id(b)] for b in (q[0], s[0], s[0], q[1], s[1], s[0]))
    m = engine.metaicl_step(q)
    assert m["input_tokens"] == (3 * 11 - 4) + 2 * 7 and m["tokens"] == targets[id(q[0])] + targets[id(q[1])]
    # without a mask every position counts; a custom loss_fn's batch may hold neither input_ids nor a mask
    unmasked = {k: v for k, v in q[0].items() if k != "attention_mask"}
    assert engine.metaicl_step([unmasked])["input_tokens"] == 3 * 11
    custom = MetaEngine(tiny.gpt2(), MetaConfig(**BASE), loss_fn=lambda model, b: model.lm_head.weight.sum() * 0)
    assert custom.metaicl_step([{"labels": torch.zeros(2, 5, dtype=torch.long)}])["input_tokens"] == 10


@pytest.mark.parametrize("kw, field", [
    (dict(eps=0.0), "MetaConfig.eps: must be > 0"),               # m/(√v + ε) = 0/0 on lanes with v = 0
    (dict(autocast_dtype=torch.float16), "MetaConfig.autocast_dtype"),  # no loss scaling
    (dict(hvp="fd", inner_graph="keep"), "MetaConfig.inner_graph"),     # keep would be silently ignored
    (dict(hvp="mixed", inner_graph="keep"), "MetaConfig.inner_graph"),
])
def test_config_refuses_combinations_that_would_silently_misbehave(kw, field):
    with pytest.raises(ValueError, match=field):
        MetaConfig(**kw)


class _NoJvpSquare(torch.autograd.Function):  # an op without a forward-AD formula
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    def backward(ctx, g):
        x, = ctx.saved_tensors
        return 2 * x * g


def test_mixed_fallback_to_exact_is_per_engine(tiny, gen, monkeypatch):
    """A loss without forward AD makes that engine's mixed HVP fall back to exact (warned once); it must not
    switch another engine of the same model class to exact."""
    from mamlen.core import hvp as hvp_mod
    from mamlen.core.loss import causal_lm_loss

    def no_jvp_loss(model, batch):
        return _NoJvpSquare.apply(causal_lm_loss(model, batch))

    tasks = make_tasks(tiny, gen, n=1, K=2)
    cfg = MetaConfig(hvp="mixed", inner_steps=2, **BASE)
    bad = MetaEngine(tiny.gpt2(), cfg, loss_fn=no_jvp_loss)
    with pytest.warns(RuntimeWarning, match="forward-mode AD"):
        bad.meta_gradient(tasks)
    exact = MetaEngine(tiny.gpt2(), MetaConfig(hvp="exact", inner_steps=2, **BASE), loss_fn=no_jvp_loss)
    assert rel_err(bad.meta_gradient(tasks), exact.meta_gradient(tasks)) < 1e-9

    calls = []
    real = hvp_mod._hvp_mixed_
    monkeypatch.setattr(hvp_mod, "_hvp_mixed_", lambda *a, **k: calls.append(1) or real(*a, **k))
    MetaEngine(tiny.gpt2(), cfg).meta_gradient(tasks)
    assert calls, "a fresh engine skipped forward-over-reverse because another engine's loss lacked forward AD"
