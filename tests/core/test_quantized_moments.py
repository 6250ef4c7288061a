"""8-bit shared moments (core/quantized_moments.py): the outer step against bitsandbytes' own 8-bit AdamW, and
the engine's meta-gradient against the float64 reference run from the same dequantised moments."""
import copy
import importlib.util

import pytest
import torch

pytest.importorskip("bitsandbytes")  # a guard only: the `test` extra installs bitsandbytes==0.50.2

import bitsandbytes as bnb  # noqa: E402

from mamlen.core import MetaConfig, MetaEngine, Task  # noqa: E402
from mamlen.core.quantized_moments import BLOCK, QuantizedBuffer, chunks  # noqa: E402

_here = importlib.util.spec_from_file_location("_engine_tests", __file__.replace("test_quantized_moments",
                                                                                   "test_engine"))
E = importlib.util.module_from_spec(_here)
_here.loader.exec_module(E)  # the float64 reference of test_engine.py (tests/ has no packages)


def test_round_trip_is_blockwise_and_stable():
    gen = torch.Generator().manual_seed(0)
    n = 3 * BLOCK + 17  # a partial last block
    x = torch.randn(n, generator=gen) * torch.logspace(-6, 0, n)  # blocks of very different scales
    q = QuantizedBuffer.from_tensor(x, signed=True)
    assert q.codes.dtype == torch.uint8 and q.absmax.numel() == 4 and q.nbytes == n + 4 * 4
    y = q.dequantize()
    # the dynamic map's error is relative to each block's absmax
    for b in range(4):
        s = slice(b * BLOCK, (b + 1) * BLOCK)
        assert (y[s] - x[s]).abs().max() <= 0.06 * x[s].abs().max(), b
    # requantising is NOT a no-op (the signed map has +1 but not -1: a block whose largest |x| is negative comes
    # back with absmax·0.993) — which is why checkpoints keep the codes; it stays within the quantisation error
    y2 = QuantizedBuffer.from_tensor(y, signed=True).dequantize()
    assert (y2 - y).abs().max() <= 0.06 * y.abs().max()
    # slices on block boundaries read and write the same codes as the whole buffer
    assert torch.equal(q.dequantize(BLOCK, 2 * BLOCK + 17), y[BLOCK:])
    q2 = QuantizedBuffer(n, signed=True, device="cpu")
    for s, length in chunks(n, chunk=BLOCK):
        q2.store_(x[s:s + length], s)
    assert torch.equal(q2.codes, q.codes) and torch.equal(q2.absmax, q.absmax)
    with pytest.raises(ValueError, match="multiple of 256"):
        q.dequantize(3, 10)
    with pytest.raises(ValueError, match="negative"):
        QuantizedBuffer.from_tensor(x, signed=False)


def test_outer_step_matches_bitsandbytes_adamw8bit():
    """Five outer steps of the engine (metaicl_step: outer AdamW on the mean gradient) on a one-tensor model,
    against bnb.optim.AdamW8bit on the same gradients: same blocks (256), maps and update rule, so the only
    differences are float rounding inside the update — which can move a moment to a neighbouring code."""
    torch.manual_seed(0)
    n = 40 * BLOCK + 77
    model = torch.nn.Linear(n, 1, bias=False)  # one parameter tensor: bnb's blocks == the flat arena's blocks
    ref = copy.deepcopy(model)
    grads = [torch.randn(1, n) * (1 + 10 * torch.rand(1, n)) for _ in range(5)]
    feed = iter(grads)
    # the "loss" is ⟨w, g⟩: its gradient is exactly g
    engine = MetaEngine(model, MetaConfig(outer_lr=1e-3, outer_weight_decay=0.1, moments_bits=8),
                        loss_fn=lambda m, b: (m.weight * b["g"]).sum())
    opt = bnb.optim.AdamW8bit(ref.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1,
                              min_8bit_size=0)
    for step in range(5):
        g = next(feed)
        before = model.weight.detach().clone()
        engine.metaicl_step([{"g": g, "labels": torch.zeros(1, 2, dtype=torch.long)}])
        ref.weight.grad = g.clone()
        opt.step()
        delta = (model.weight.detach() - before).abs().max()
        err = (model.weight.detach() - ref.weight.detach()).abs().max()
        # measured: err/delta = 0.9e-6 .. 3.3e-6 over the 5 steps (float rounding of the update only)
        assert err <= 1e-4 * delta, (step, float(err), float(delta))
    # the states themselves: the same codes and block scales
    q, s = engine.optimizer_state()["quantized"], opt.state[ref.weight]
    for key, code, absmax in (("exp_avg", "state1", "absmax1"), ("exp_avg_sq", "state2", "absmax2")):
        flips = (q[f"{key}.codes.0"] != s[code].reshape(-1)).float().mean().item()
        assert flips < 1e-4, (key, flips)  # measured: 0 codes differ, absmax within 2.4e-7
        torch.testing.assert_close(q[f"{key}.absmax.0"], s[absmax], rtol=1e-6, atol=0)


def test_engine_exact_against_reference_with_dequantised_moments(tiny, gen):
    """moments_bits=8 changes only where m, v come from: G equals the float64 reference run from the
    dequantised moments to the same 1e-9 as the float32-moment engine."""
    model = tiny.gpt2()
    cfg = MetaConfig(hvp="exact", inner_steps=2, moments_bits=8, **E.BASE)
    tasks = E.make_tasks(tiny, gen, n=2, K=2)
    ref_model = copy.deepcopy(model)
    engine = MetaEngine(model, cfg)
    engine.load_optimizer_state(E.random_state(model, gen))
    state = engine.optimizer_state()  # the dequantised moments the inner steps read
    G = engine.meta_gradient(tasks)
    assert E.rel_err(G, E.ref_meta_gradient(ref_model, cfg, tasks, state)) < 1e-9
    # the 8-bit state is ~1.02 bytes per value (codes + one float32 absmax per 256), float64 moments 8
    n = sum(p.numel() for p in model.parameters())
    assert engine.opt_state.nbytes()["moments"] <= 2 * (n + 4 * (n // 256 + 1))


def test_state_round_trip_is_exact(tiny, gen):
    """optimizer_state() → load_optimizer_state() restores the very same codes (checkpoints resume exactly)."""
    tasks = E.make_tasks(tiny, gen, n=2, K=1)
    a = MetaEngine(tiny.gpt2(torch.float32), MetaConfig(hvp="first_order", moments_bits=8, **E.BASE))
    for _ in range(2):
        a.step(tasks)
    st = a.optimizer_state()
    b = MetaEngine(tiny.gpt2(torch.float32), MetaConfig(hvp="first_order", moments_bits=8, **E.BASE))
    b.load_optimizer_state(st)
    for qa, qb in zip(a.opt_state.m + a.opt_state.v, b.opt_state.m + b.opt_state.v):
        assert torch.equal(qa.codes, qb.codes) and torch.equal(qa.absmax, qb.absmax)
    # without the codes (a float32-moments checkpoint) they are requantised: close, not equal
    c = MetaEngine(tiny.gpt2(torch.float32), MetaConfig(hvp="first_order", moments_bits=8, **E.BASE))
    c.load_optimizer_state({k: v for k, v in st.items() if k != "quantized"})
    mc = c.optimizer_state()["exp_avg"]
    assert E.rel_err(mc, st["exp_avg"]) < 0.02
    with pytest.raises(ValueError, match="quantized"):
        b.load_optimizer_state({**st, "quantized": {k: v[:-1] for k, v in st["quantized"].items()}})
