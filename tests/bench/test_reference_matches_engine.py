"""bench/reference.py (the plain-PyTorch meta-step the benchmark measures against) computes the engine's G:
float64, tiny random GPT-2, K ∈ {1, 2}, non-trivial shared moments, exact within 1e-9 relative; and its outer
AdamW step leaves θ, m, v where the engine's does."""
import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from mamlen.core import MetaConfig, MetaEngine, Task

hf_logging.set_verbosity_error()
_spec = importlib.util.spec_from_file_location(
    "bench_reference", Path(__file__).resolve().parents[2] / "bench" / "reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

@pytest.fixture(autouse=True)
def one_thread():
    # tiny tensors: OpenMP threads only add synchronisation (10× slower on a busy 2-core machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


HP = dict(inner_lr=3e-2, outer_lr=1e-2, inner_weight_decay=0.1, outer_weight_decay=0.05, eps=1e-8)


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=61, n_positions=32, attn_pdrop=0.0,
                     resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(torch.float64).eval()


def batch(gen, B=2, T=11):
    ids = torch.randint(1, 45, (B, T), generator=gen)  # tokens < 45: some embedding rows get g = v = 0
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, T - 2:] = 0  # right padding on the last row
    labels = ids.clone()
    labels[:, : T // 2] = -100  # the prompt half
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def state(model, gen):
    return {"step": 3,
            "exp_avg": {n: 1e-3 * torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()},
            "exp_avg_sq": {n: 1e-6 * torch.rand(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}}


def rel_err(a, b):
    return sum(float((a[n] - b[n]).pow(2).sum()) for n in b) ** 0.5 / sum(float(b[n].pow(2).sum()) for n in b) ** 0.5


def build(K, hvp):
    gen = torch.Generator().manual_seed(1234)
    tasks = [Task(support=[batch(gen) for _ in range(K)], query=batch(gen)) for _ in range(2)]
    model = tiny_gpt2()
    st = state(model, gen)
    ref = reference.ReferenceMetaLearner(copy.deepcopy(model), inner_steps=K, first_order=hvp == "first_order", **HP)
    ref.load_optimizer_state(st)
    engine = MetaEngine(model, MetaConfig(hvp=hvp, inner_steps=K, **HP))
    engine.load_optimizer_state(st)
    return tasks, ref, engine


@pytest.mark.parametrize("hvp,K", [("exact", 1), ("exact", 2), ("first_order", 2)])
def test_meta_gradient_matches_engine(hvp, K):
    tasks, ref, engine = build(K, hvp)
    G, R = engine.meta_gradient(tasks), ref.meta_gradient(tasks)
    assert set(G) == set(R)
    err = rel_err(G, R)
    assert err < 1e-9, f"{hvp}, K={K}: relative error {err:.3e}"
    assert ref.model.config._attn_implementation == "eager"


def test_reference_sees_the_hessian_term():
    """A reference blind to second order would pass the test above only for first_order: it must not."""
    tasks, ref, _ = build(2, "exact")
    _, fo, _ = build(2, "first_order")
    assert rel_err(fo.meta_gradient(tasks), ref.meta_gradient(tasks)) > 1e-3


def test_outer_step_matches_engine():
    tasks, ref, engine = build(2, "exact")
    for _ in range(2):  # the second step starts from the first's θ, m, v, t
        ref.step(tasks)
        engine.step(tasks)
    st = engine.optimizer_state()
    assert st["step"] == ref.step_count == 5
    for n, p in engine.model.named_parameters():
        torch.testing.assert_close(ref.params[n].detach(), p.detach(), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(ref.exp_avg[n], st["exp_avg"][n], rtol=1e-9, atol=1e-16)
        torch.testing.assert_close(ref.exp_avg_sq[n], st["exp_avg_sq"][n], rtol=1e-9, atol=1e-20)


def test_reference_computes_logits_only_at_targets():
    """The fair reference asks for logits where a label is set, as a careful user would (and as the engine does),
    and its loss is still the mean cross-entropy over all target tokens."""
    model = tiny_gpt2()
    b = batch(torch.Generator().manual_seed(7))
    rows = []
    hook = model.lm_head.register_forward_hook(lambda mod, args, out: rows.append(tuple(out.shape)))
    loss = reference.reference_loss(model, dict(model.named_parameters()), b)
    hook.remove()
    n_targets = int((b["labels"][:, 1:] != -100).sum())
    assert rows == [(n_targets, 61)]
    full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False).logits
    expect = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, 61), b["labels"][:, 1:].reshape(-1))
    torch.testing.assert_close(loss, expect, rtol=1e-12, atol=0)
