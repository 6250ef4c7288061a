"""bfloat16: the inner trajectory φ stays in float32, fd is refused, and exact/mixed stay within the accuracy
bench/results/precision.md documents (against float64 at the same weights)."""
import copy

import pytest
import torch

from mamlen.core import MetaConfig, MetaEngine, Task, hvp

HP = dict(inner_lr=1e-2, inner_steps=2, eps=1e-8)


def test_fd_is_refused_with_bfloat16_compute(tiny):
    with pytest.raises(ValueError, match="MetaConfig.hvp: 'fd' under autocast"):
        MetaConfig(hvp="fd", autocast_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="'fd' with torch.bfloat16 parameters"):
        MetaEngine(tiny.gpt2(torch.bfloat16), MetaConfig(hvp="fd"))


def test_inner_steps_of_bfloat16_weights_do_not_round_away(tiny, gen, monkeypatch):
    """At inner lr 1e-5 an AdamW step moves N(0, 0.02) weights by ~1e-5, below bfloat16's spacing: φ_1 must be
    kept in float32 (the model sees it rounded, as autocast does with float32 weights)."""
    seen = []
    real = hvp.gradient
    monkeypatch.setattr(hvp, "gradient", lambda obj, flats, *a, **k: seen.append(flats) or real(obj, flats, *a, **k))
    model = tiny.gpt2(torch.bfloat16)
    engine = MetaEngine(model, MetaConfig(hvp="exact", inner_lr=1e-5, inner_steps=2, autocast_dtype=torch.bfloat16,
                                          master_weights=True))
    theta = [f.float() for f in engine.arena.flats]
    engine.meta_gradient([Task(support=[tiny.batch(gen)], query=tiny.batch(gen))])
    phi1 = seen[1]  # S_1 at φ_0, S_2 at φ_1, then the query at φ_2
    assert all(p.dtype == torch.float32 for p in phi1)
    moved = sum(int((p != t).sum()) for p, t in zip(phi1, theta)) / sum(t.numel() for t in theta)
    assert moved > 0.5, f"only {moved:.0%} of the weights moved in the first inner step"


@pytest.mark.parametrize("mode", ["exact", "mixed"])
@pytest.mark.parametrize("precision", ["bf16-autocast", "bf16-params"])
def test_bfloat16_meta_gradient_against_float64(tiny, gen, reference, mode, precision):
    """err_H = |G - G64| / |H64| well below 1: the Hessian term survives bfloat16 (first_order has err_H ≈ 1;
    measured here 0.01-0.03)."""
    base = tiny.gpt2(torch.float64)
    tasks = [Task(support=[tiny.batch(gen) for _ in range(2)], query=tiny.batch(gen)) for _ in range(2)]
    state = reference.random_state(base, gen)
    pdtype = torch.bfloat16 if precision == "bf16-params" else torch.float32
    model = copy.deepcopy(base).to(pdtype)

    def G(m, **kw):
        engine = MetaEngine(copy.deepcopy(m), MetaConfig(**HP, **kw))
        sd = torch.float64 if next(m.parameters()).dtype == torch.float64 else torch.float32
        engine.load_optimizer_state({"step": state["step"],
                                     **{k: {n: t.to(sd) for n, t in state[k].items()} for k in ("exp_avg", "exp_avg_sq")}})
        return {n: g.double() for n, g in engine.meta_gradient(tasks).items()}

    ref = copy.deepcopy(model).to(torch.float64)  # the same (rounded) weights
    G64, F64 = G(ref, hvp="exact"), G(ref, hvp="first_order")
    H64 = {n: G64[n] - F64[n] for n in G64}
    extra = {"master_weights": True} if precision == "bf16-params" else {}
    got = G(model, hvp=mode, autocast_dtype=torch.bfloat16, **extra)
    err_H = reference.rel_err(got, G64) * (sum(float(g.pow(2).sum()) for g in G64.values()) ** 0.5) / \
        (sum(float(h.pow(2).sum()) for h in H64.values()) ** 0.5)
    assert err_H < 0.1, f"{mode}/{precision}: error {err_H:.2f} of the Hessian term"
