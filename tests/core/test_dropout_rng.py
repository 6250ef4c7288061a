"""Dropout masks in the meta-step (DESIGN.md: recomputations of one loss see its masks; different losses draw
fresh ones and the global RNG advances as in ordinary training)."""
import copy

import pytest
import torch

from mamlen.core import MetaConfig, MetaEngine, Task

DROP = 0.2
BASE = dict(inner_lr=3e-2, outer_lr=1e-2, inner_weight_decay=0.1, eps=1e-8, fd_eps=1e-5,
            attn_implementation="eager")  # one attention for every mode: the same RNG draws per forward


def dropout_gpt2(tiny):
    return tiny.gpt2(dropout=DROP).train()


def flat(G):
    return torch.cat([g.reshape(-1) for g in G.values()])


def test_meta_step_advances_the_global_rng(tiny, gen):
    engine = MetaEngine(dropout_gpt2(tiny), MetaConfig(**BASE))
    before = torch.get_rng_state()
    engine.step([Task(support=[tiny.batch(gen)], query=tiny.batch(gen))])
    assert not torch.equal(before, torch.get_rng_state()), "a meta-step with dropout left the global RNG as it was"


def test_metaicl_step_advances_the_global_rng(tiny, gen):
    engine = MetaEngine(dropout_gpt2(tiny), MetaConfig(**BASE))
    batch = tiny.batch(gen)
    before = torch.get_rng_state()
    engine.metaicl_step([batch])
    assert not torch.equal(before, torch.get_rng_state()), "a MetaICL step with dropout left the global RNG as it was"
    # and the next step's masks differ: same θ-independent batch, different loss
    a = engine.metaicl_step([batch])["loss"]
    b = engine.metaicl_step([batch])["loss"]
    assert a != b


def test_no_dropout_leaves_the_rng_alone(tiny, gen):
    model = tiny.gpt2()  # eval mode: no random draw anywhere
    engine = MetaEngine(model, MetaConfig(**BASE))
    before = torch.get_rng_state()
    engine.meta_gradient([Task(support=[tiny.batch(gen)], query=tiny.batch(gen))])
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("attn", ["eager", "mamlen"])  # mamlen: the tiled attention draws its seed from the RNG
def test_fresh_masks_across_meta_steps_and_tasks(tiny, gen, attn):
    model = dropout_gpt2(tiny)
    engine = MetaEngine(model, MetaConfig(**{**BASE, "attn_implementation": attn}))
    task = Task(support=[tiny.batch(gen)], query=tiny.batch(gen))
    torch.manual_seed(7)
    one = flat(engine.meta_gradient([task]))
    again = flat(engine.meta_gradient([task]))  # θ unchanged: only the masks can differ
    assert (one - again).norm() > 1e-3 * one.norm(), "consecutive meta-gradients drew the same masks"
    torch.manual_seed(7)
    assert torch.equal(one, flat(engine.meta_gradient([task]))), "not reproducible from the seed"
    torch.manual_seed(7)
    two = flat(engine.meta_gradient([task, task]))  # = one if both copies drew the first copy's masks
    assert (two - one).norm() > 1e-3 * one.norm(), "two identical tasks in one meta-batch drew the same masks"


def ref_meta_gradient_same_masks(reference, model, cfg, tasks, state):
    """The float64 reference of test_engine.py, evaluated in the engine's RNG order: per task L_Q(θ) (the query's
    first evaluation: it fixes the query's masks), then S_1..S_K each once (its graph keeps its masks for the
    second order), then L_Q(φ_K) replaying the query's masks."""
    model.set_attn_implementation("eager")
    theta = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    G = {n: torch.zeros_like(x) for n, x in theta.items()}
    for task in tasks:
        q_state = torch.get_rng_state()
        with torch.no_grad():
            reference.ref_loss(model, theta, task.query)
        phi = reference.ref_adapted(model, cfg, theta, state["exp_avg"], state["exp_avg_sq"], state["step"], task,
                          create_graph=True)
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(q_state)
            q = reference.ref_loss(model, phi, task.query)
        for n, g in zip(G, torch.autograd.grad(q, list(theta.values()))):
            G[n] += g / len(tasks)
    return G


@pytest.mark.parametrize("hvp,extra", [
    ("exact", {}), ("exact", {"inner_graph": "keep"}), ("exact", {"checkpointing": True}),
    ("mixed", {}), ("fd", {}),
])
def test_every_mode_matches_the_reference_on_the_engines_masks(tiny, gen, reference, hvp, extra):
    K = 2
    model = dropout_gpt2(tiny)
    ref_model = copy.deepcopy(model)
    cfg = MetaConfig(hvp=hvp, inner_steps=K, **BASE, **extra)
    tasks = [Task(support=[tiny.batch(gen) for _ in range(K)], query=tiny.batch(gen)) for _ in range(2)]
    tasks.append(tasks[0])  # a repeated task must still draw its own masks
    engine = MetaEngine(model, cfg)
    state = reference.random_state(model, gen)
    engine.load_optimizer_state(state)
    torch.manual_seed(11)
    G = engine.meta_gradient(tasks)
    after_engine = torch.get_rng_state()
    torch.manual_seed(11)
    R = ref_meta_gradient_same_masks(reference, ref_model, cfg, tasks, state)
    err = reference.rel_err(G, R)
    assert err < (1e-4 if hvp == "fd" else 1e-9), f"{hvp} {extra}: relative error {err:.3e} on the same masks"
    assert torch.equal(after_engine, torch.get_rng_state()), "the engine drew a different number of masks"


def test_tiled_attention_recomputations_replay_its_seed(tiny, gen):
    """With the tiled attention's dropout (seed drawn from the global RNG), exact-recompute, exact-keep and mixed
    see the same masks from the same seed: every recomputation replays the seed of its loss's first evaluation."""
    tasks = [Task(support=[tiny.batch(gen) for _ in range(2)], query=tiny.batch(gen)) for _ in range(2)]
    out = []
    for kw in (dict(hvp="exact"), dict(hvp="exact", inner_graph="keep"), dict(hvp="mixed")):
        engine = MetaEngine(dropout_gpt2(tiny), MetaConfig(inner_steps=2, **{**BASE, "attn_implementation": None},
                                                            **kw))
        assert engine.attention.second_order == "mamlen"
        torch.manual_seed(5)
        out.append(flat(engine.meta_gradient(tasks)))
    for other in out[1:]:
        assert (other - out[0]).norm() < 1e-9 * out[0].norm()
