"""One HVP contract: MODES[mode](obj, φ, batch, rng, vec, acc, opts) adds H_S(φ)·vec into acc.

Every mode against a float64 double-backward reference taken the obvious way (torch.func.functional_call on
per-parameter tensors, whole graph kept), on tiny GPT-2 (dropout on: the recomputations must replay the same
masks) and Llama (GQA, rotary); acc starts non-zero, so "adds" is checked, not "returns"."""
import pytest
import torch
from torch.func import functional_call

from mamlen.core import MetaConfig, MetaEngine, hvp
from mamlen.core.loss import RngState, causal_lm_loss


def _reference_hvp(model, params, batch, vec, rng_state):
    theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    torch.set_rng_state(rng_state)
    loss = causal_lm_loss(_Functional(model, theta), batch)
    grads = torch.autograd.grad(loss, list(theta.values()), create_graph=True)
    hv = torch.autograd.grad(grads, list(theta.values()), [vec[n] for n in theta])
    return dict(zip(theta, hv))


class _Functional(torch.nn.Module):
    """model with its parameters replaced by `params` (functional_call), usable where a model is expected."""

    def __init__(self, model, params):
        super().__init__()
        self.model, self.params = model, params
        self.forward.__func__.__signature__ = __import__("inspect").signature(model.forward)

    def forward(self, **kwargs):
        return functional_call(self.model, self.params, (), kwargs, tie_weights=True)


def _setup(tiny, gen, arch, dropout, T, mode):
    if arch == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=61, n_positions=max(T, 32),
                                           attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout,
                                           bos_token_id=0, eos_token_id=0)).double().eval()
    else:
        model = tiny.llama()
    if dropout:
        model.train()
    engine = MetaEngine(model, MetaConfig(hvp=mode))  # mixed: swaps SiLU for a forward-AD-capable twin
    batch = tiny.batch(gen, B=2, T=T)
    vec = {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}
    return model, engine, batch, vec


@pytest.mark.parametrize("mode", ["exact", "mixed", "fd", "first_order"])
@pytest.mark.parametrize("arch,dropout,T", [("gpt2", 0.1, 9), ("gpt2", 0.0, 200), ("llama", 0.0, 9)])
def test_every_mode_adds_the_float64_hvp(tiny, gen, mode, arch, dropout, T):
    if T > 9 and mode in ("fd", "first_order"):
        pytest.skip("the long case is for the tiled attention's second-order passes")
    model, engine, batch, vec = _setup(tiny, gen, arch, dropout, T, mode)
    params = dict(model.named_parameters())
    arena = engine.arena
    rng = RngState(arena.device)
    with torch.no_grad(), rng.replay():  # the loss's first evaluation: fixes its dropout masks
        engine.obj.loss(batch)
    start = arena.new(fill=0.5)
    acc = [a.clone() for a in start]
    from mamlen.core import attention
    with attention.using(model, engine.attention.second_order):
        hvp.MODES[mode](engine.obj, arena.flats, batch, rng, arena.flatten(vec), acc,
                        hvp.Options(fd_eps=1e-5 if arch == "gpt2" else 1e-3))
    got = arena.views([a - s for a, s in zip(acc, start)])
    if mode == "first_order":
        assert all(torch.equal(a, s) for a, s in zip(acc, start))
        return
    # the reference must draw the mode's dropout masks, so it runs the mode's attention where plain autograd can
    # differentiate it twice (mamlen; SDPA's math path in float64 with dropout), else eager (same function)
    impl = engine.attention.second_order if mode in ("exact", "mixed") else ("sdpa" if dropout else "eager")
    with attention.using(model, impl):
        ref = _reference_hvp(model, params, batch, vec, rng.cpu)
    num = sum(float((got[n] - ref[n]).pow(2).sum()) for n in ref) ** 0.5
    den = sum(float(ref[n].pow(2).sum()) for n in ref) ** 0.5
    # fd: O(r²) truncation + rounding of 2 gradients / 2r; Llama's RMSNorm and rotary run in float32 in HF
    tol = {"fd": 1e-5 if arch == "gpt2" else 1e-3}.get(mode, 1e-6 if arch == "llama" else 1e-11)
    assert num / den < tol, f"{mode} {arch}: relative error {num / den:.2e}"


@pytest.mark.parametrize("arch,dropout,T", [("gpt2", 0.1, 9), ("gpt2", 0.0, 200), ("llama", 0.0, 9)])
def test_kept_graph_adds_the_float64_hvp(tiny, gen, arch, dropout, T):
    """inner_graph="keep": gradient(create_graph=True) then kept_ through that graph adds the same float64 HVP,
    and the flat gradient it returns is ∇L (tied GPT-2 embeddings: both uses summed)."""
    from mamlen.core import attention
    model, engine, batch, vec = _setup(tiny, gen, arch, dropout, T, "exact")
    params = dict(model.named_parameters())
    arena = engine.arena
    rng = RngState(arena.device)
    start = arena.new(fill=0.5)
    acc = [a.clone() for a in start]
    with attention.using(model, engine.attention.second_order):
        loss, kept = hvp.gradient(engine.obj, arena.flats, batch, rng, create_graph=True)
        g_detached = arena.views([x.detach().clone() for x in kept.grads])
        hvp.kept_(engine.obj, kept, rng, arena.flatten(vec), acc)
        assert kept.grads is None  # kept_ gave up the graph
        del kept
        ref_theta = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
        torch.set_rng_state(rng.cpu)
        ref_g = torch.autograd.grad(causal_lm_loss(_Functional(model, ref_theta), batch), list(ref_theta.values()))
        ref = _reference_hvp(model, params, batch, vec, rng.cpu)
    got = arena.views([a - s for a, s in zip(acc, start)])
    tol = 1e-6 if arch == "llama" else 1e-11

    def rel(a, b):
        num = sum(float((a[n] - b[n]).pow(2).sum()) for n in b) ** 0.5
        return num / sum(float(b[n].pow(2).sum()) for n in b) ** 0.5

    assert rel(g_detached, dict(zip(ref_theta, ref_g))) < tol
    assert rel(got, ref) < tol, f"kept {arch}: relative error {rel(got, ref):.2e}"


def test_kept_graph_does_not_read_the_flat_gradient(tiny, gen):
    """The flat gradient returned with create_graph is a cat whose backward saves nothing: kept_ reads only its
    graph, so a caller may overwrite that buffer in place (e.g. write ḡ over g_j) and pass it as vec."""
    from mamlen.core import attention
    model, engine, batch, vec = _setup(tiny, gen, "llama", 0.0, 9, "exact")
    arena = engine.arena
    flat_vec = arena.flatten(vec)
    out = []
    for overwrite in (False, True):
        rng = RngState(arena.device)
        acc = arena.new()
        with attention.using(model, engine.attention.second_order):
            _, kept = hvp.gradient(engine.obj, arena.flats, batch, rng, create_graph=True)
            v = flat_vec
            if overwrite:
                v = [x.detach() for x in kept.grads]
                for x, y in zip(v, flat_vec):
                    x.copy_(y)
            hvp.kept_(engine.obj, kept, rng, v, acc)
        out.append(acc)
    assert all(torch.equal(a, b) for a, b in zip(*out))
