"""Every op × backend (reference, cpp, triton) × dtype against float64 re-implementations written here.

The truths below are written independently of kernels/reference.py (torch.optim's bias-correction form,
explicit partial derivatives), computed in float64 from the very inputs the backend saw. The adjoint
formula itself is proven against torch.autograd through the forward step.
"""
import math

import pytest
import torch

from mamlen import kernels

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
HP = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
# relative tolerance per output dtype (error bound rtol·|t| + rtol·max|t|: normwise, robust to cancellation)
RTOL = {torch.float64: 1e-11, torch.float32: 5e-6, torch.bfloat16: 2 ** -7}
SIZES = [1, 7, 1000]  # 7 and 1000: not multiples of any SIMD width / Triton block


def close(actual, truth, what):
    assert actual.dtype in RTOL, what
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if actual.dtype == torch.bfloat16:
        return close_bf16(actual, truth, what)
    rtol = RTOL[actual.dtype]
    torch.testing.assert_close(actual.double().cpu(), truth.double().cpu(), rtol=rtol,
                               atol=rtol * float(truth.abs().max()) + 1e-300, msg=lambda m: f"{what}: {m}")


def close_bf16(actual, truth, what):
    """Each element within one bfloat16 spacing of the float64 truth (the kernel computes in float32 and rounds
    once), plus float32 noise where the truth cancels. A normwise 2^-7 tolerance would let a parameter update
    smaller than 2^-7·max|p| vanish unnoticed."""
    a, t = actual.double().cpu(), truth.double().cpu()
    spacing = torch.exp2(torch.floor(torch.log2(t.abs().clamp_min(1e-30))) - 7)  # bf16 has 8 significant bits
    bad = (a - t).abs() > spacing + 1e-6 * float(t.abs().max())
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {t.numel()} elements off the truth by more than one "
                                 f"bfloat16 spacing (worst {float(((a - t).abs() - spacing)[bad].max()):.3e} beyond)")


def test_close_sees_a_missing_bfloat16_update():
    """The check can fail: bfloat16 parameters returned unchanged by an AdamW step at lr 1e-2 are caught."""
    p, g, m, v = data(1000, torch.bfloat16, "cpu", seed=3)
    truth = truth_adamw(p, g, m, v, **HP, step=1)[0]
    close(truth.to(torch.bfloat16), truth, "rounded truth")
    with pytest.raises(AssertionError):
        close(p, truth, "unchanged p")


def data(n, dtype, device, seed, v_min=0.05):
    """Fresh p, g in dtype; m, v (v ≥ v_min) in the state dtype."""
    gen = torch.Generator().manual_seed(seed)
    sd = kernels.state_dtype(dtype)
    p = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    g = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    m = (0.1 * torch.randn(n, generator=gen, dtype=torch.float64)).to(sd)
    v = (v_min + (1 - v_min) * torch.rand(n, generator=gen, dtype=torch.float64)).to(sd)
    return [t.to(device) for t in (p, g, m, v)]


# ---- float64 truths ------------------------------------------------------------------------------------

def truth_adamw(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    p, g, m, v = (t.double().cpu() for t in (p, g, m, v))
    m2 = torch.lerp(m, g, 1 - beta1)
    v2 = v * beta2 + g * g * (1 - beta2)
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = v2.sqrt() / math.sqrt(bc2) + eps
    return p * (1 - lr * weight_decay) - (lr / bc1) * m2 / denom, m2, v2


def truth_adamw_adjoint(p_bar, m_bar, v_bar, g, m_new, v_new, *, lr, beta1, beta2, eps, weight_decay, step):
    p_bar, m_bar, v_bar, g, m, v = (t.double().cpu() for t in (p_bar, m_bar, v_bar, g, m_new, v_new))
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    s = v.sqrt() / math.sqrt(bc2)
    d = s + eps
    dp_dm = -(lr / bc1) / d                                       # ∂p2/∂m2
    ds_dv = torch.where(s > 0, 1 / (2 * bc2 * s.clamp_min(1e-300)), torch.zeros_like(s))
    dp_dv = (lr / bc1) * m / d ** 2 * ds_dv                       # ∂p2/∂v2 (0 where s = 0: the contract)
    m_tot, v_tot = m_bar + p_bar * dp_dm, v_bar + p_bar * dp_dv
    g_bar = (1 - beta1) * m_tot + 2 * (1 - beta2) * g * v_tot
    return g_bar, (1 - lr * weight_decay) * p_bar, beta1 * m_tot, beta2 * v_tot


# ---- inner AdamW ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("step", [1, 7])
def test_inner_adamw_forward(backend, device, dtype, n, step):
    p, g, m, v = data(n, dtype, device, seed=n + step)
    before = [t.clone() for t in (p, g, m, v)]
    out = kernels.inner_adamw_forward(p, g, m, v, **HP, step=step, backend=backend)
    truth = truth_adamw(p, g, m, v, **HP, step=step)
    assert [t.dtype for t in out] == [dtype, m.dtype, v.dtype]
    for name, o, t in zip(("p2", "m2", "v2"), out, truth):
        close(o, t, f"{backend} {dtype} n={n} {name}")
    for t, b in zip((p, g, m, v), before):
        assert torch.equal(t, b), "inputs of an out-of-place op were modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_inner_adamw_adjoint(backend, device, dtype, n):
    p_bar, g, m_bar, v_bar = data(n, dtype, device, seed=100 + n)
    p_bar = p_bar.to(m_bar.dtype)
    _, _, m_new, v_new = data(n, dtype, device, seed=200 + n)
    out = kernels.inner_adamw_adjoint(p_bar, m_bar, v_bar, g, m_new, v_new, **HP, step=3, backend=backend)
    truth = truth_adamw_adjoint(p_bar, m_bar, v_bar, g, m_new, v_new, **HP, step=3)
    for name, o, t in zip(("g_bar", "p_bar_prev", "m_bar_prev", "v_bar_prev"), out, truth):
        assert o.dtype == m_bar.dtype, f"{name} must have the state dtype"
        close(o, t, f"{backend} {dtype} n={n} {name}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_out_forms_write_the_same_values_into_given_buffers(backend, device, dtype):
    """`out=` into fresh buffers, and in place the way the engine runs them: bit-identical to the allocating form."""
    n = 1000
    p, g, m, v = data(n, dtype, device, seed=41)
    hp = dict(**HP, step=3, backend=backend)
    want = kernels.inner_adamw_forward(p, g, m, v, **hp)
    out = tuple(torch.full_like(t, float("nan")) for t in want)
    assert kernels.inner_adamw_forward(p, g, m, v, **hp, out=out) is not None
    for o, w in zip(out, want):
        assert torch.equal(o, w)
    p2, m2, v2 = (t.clone() for t in (p, m, v))  # in place on p, m, v: the outer step's form
    kernels.inner_adamw_forward(p2, g, m2, v2, **hp, out=(p2, m2, v2))
    for o, w in zip((p2, m2, v2), want):
        assert torch.equal(o, w)

    p_bar, m_bar, v_bar = (x.to(m.dtype) for x in data(n, dtype, device, seed=42)[:3])
    _, _, m_new, v_new = data(n, dtype, device, seed=43)
    want = kernels.inner_adamw_adjoint(p_bar, m_bar, v_bar, g, m_new, v_new, **hp)
    # the engine's form: p̄ in place, m̄ → m_new's buffer, v̄ → v_new's buffer, ḡ → g's buffer where dtypes allow
    gb = g.clone() if g.dtype == p_bar.dtype else torch.empty_like(p_bar)
    pb, mn, vn = p_bar.clone(), m_new.clone(), v_new.clone()
    gin = gb if g.dtype == p_bar.dtype else g
    kernels.inner_adamw_adjoint(pb, m_bar, v_bar, gin, mn, vn, **hp, out=(gb, pb, mn, vn))
    for name, o, w in zip(("g_bar", "p_bar", "m_bar", "v_bar"), (gb, pb, mn, vn), want):
        assert torch.equal(o, w), name

    plus, minus = kernels.fd_perturb(p, m, 0.3, backend=backend)
    out = (torch.empty_like(p), p.clone())
    kernels.fd_perturb(out[1], m, 0.3, backend=backend, out=out)  # minus written over its own input
    assert torch.equal(out[0], plus) and torch.equal(out[1], minus)


def test_out_buffers_are_checked(backend, device):
    p, g, m, v = data(10, torch.float32, device, seed=44)
    hp = dict(**HP, step=1, backend=backend)
    with pytest.raises(TypeError, match="out must be a tuple of 3 tensors"):
        kernels.inner_adamw_forward(p, g, m, v, **hp, out=(p, m))
    with pytest.raises(ValueError, match="'out\\[1\\]' has 9 elements"):
        kernels.inner_adamw_forward(p, g, m, v, **hp, out=(p.clone(), m[:9].clone(), v.clone()))
    with pytest.raises(TypeError, match="'out\\[2\\]' must have dtype torch.float32"):
        kernels.inner_adamw_forward(p, g, m, v, **hp, out=(p.clone(), m.clone(), v.double()))
    big = torch.zeros(11, device=device)
    with pytest.raises(ValueError, match="'out\\[0\\]' overlaps input 'p' without being it"):
        kernels.inner_adamw_forward(big[1:], g, m, v, **hp, out=(big[:10], m.clone(), v.clone()))
    with pytest.raises(ValueError, match="out\\[0\\] and out\\[1\\] are the same buffer"):
        o = torch.empty_like(m)
        kernels.inner_adamw_adjoint(m, m, v, g, m, v, **hp, out=(o, o, m.clone(), v.clone()))


def test_adjoint_formula_is_the_vjp_of_the_forward(backend, device):
    """(ḡ, p̄', m̄', v̄') = the vector-Jacobian product of (p2, m2, v2) = forward(p, g, m, v) with (p̄, m̄, v̄):
    torch.autograd through the reference forward in float64 proves the formula; each backend must match."""
    n = 257
    p, g, m, v = data(n, torch.float64, "cpu", seed=7)
    p_bar, m_bar, v_bar, _ = data(n, torch.float64, "cpu", seed=8)
    hp = dict(HP, step=4)
    inputs = [t.clone().requires_grad_() for t in (p, g, m, v)]
    outs = kernels.inner_adamw_forward(*inputs, **hp, backend="reference")
    dp, dg, dm, dv = torch.autograd.grad(outs, inputs, grad_outputs=(p_bar, m_bar, v_bar))
    _, m_new, v_new = kernels.inner_adamw_forward(p, g, m, v, **hp, backend="reference")
    args = [t.to(device) for t in (p_bar, m_bar, v_bar, g, m_new, v_new)]
    g_bar, p_prev, m_prev, v_prev = kernels.inner_adamw_adjoint(*args, **hp, backend=backend)
    for name, o, t in (("g_bar", g_bar, dg), ("p_bar_prev", p_prev, dp), ("m_bar_prev", m_prev, dm),
                       ("v_bar_prev", v_prev, dv)):
        close(o, t, f"{backend} {name} vs autograd")


def test_k_step_recursion_matches_autograd_through_k_steps(backend, device):
    """K = 3 inner steps forward, then the adjoint recursion backward: the ḡ_j and the final m̄, v̄ equal
    d⟨w, φ_K⟩/d(g_j, m_0, v_0) by autograd through the K float64 reference steps (consecutive steps, the
    τ count and every state tensor, fed back as the engine does)."""
    n, K = 129, 3
    hp = dict(HP, step=None)
    p, _, m, v = data(n, torch.float64, device, seed=11)
    gs = [data(n, torch.float64, device, seed=20 + j)[1] for j in range(K)]
    w = data(n, torch.float64, device, seed=30)[0]
    # autograd truth on CPU
    leaves = [t.detach().cpu().clone().requires_grad_() for t in (m, v, *gs)]
    phi, mm, vv = p.cpu(), leaves[0], leaves[1]
    for j in range(K):
        phi, mm, vv = kernels.inner_adamw_forward(phi, leaves[2 + j], mm, vv, **dict(hp, step=5 + j),
                                                  backend="reference")
    grads = torch.autograd.grad((phi * w.cpu()).sum(), leaves)
    # the backend: forward keeping m_j, v_j, then the reverse recursion (no H term)
    ms, vs, phi, mm, vv = [], [], p, m, v
    for j in range(K):
        phi, mm, vv = kernels.inner_adamw_forward(phi, gs[j], mm, vv, **dict(hp, step=5 + j), backend=backend)
        ms.append(mm)
        vs.append(vv)
    p_bar, m_bar, v_bar = w, torch.zeros_like(m), torch.zeros_like(v)
    g_bars = [None] * K
    for j in reversed(range(K)):
        g_bars[j], p_bar, m_bar, v_bar = kernels.inner_adamw_adjoint(
            p_bar, m_bar, v_bar, gs[j], ms[j], vs[j], **dict(hp, step=5 + j), backend=backend)
    close(m_bar, grads[0], "m̄ after K steps")
    close(v_bar, grads[1], "v̄ after K steps")
    for j in range(K):
        close(g_bars[j], grads[2 + j], f"ḡ_{j + 1}")
    close(p_bar, (1 - HP["lr"] * HP["weight_decay"]) ** K * w.cpu(), "p̄ after K steps (c^K w without H)")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_consecutive_steps_compare_every_state_tensor(backend, device, dtype):
    """Five forward steps, each output fed back as the next input, then five adjoint steps; at every step
    the parameters and every state tensor match the float64 truth of that step's inputs."""
    n = 333
    p, _, m, v = data(n, dtype, device, seed=41)
    stored = []
    for j in range(5):
        g = data(n, dtype, device, seed=50 + j)[1]
        out = kernels.inner_adamw_forward(p, g, m, v, **HP, step=j + 1, backend=backend)
        for name, o, t in zip(("p", "m", "v"), out, truth_adamw(p, g, m, v, **HP, step=j + 1)):
            close(o, t, f"step {j + 1} {name}")
        p, m, v = out
        stored.append((g, m, v))
    p_bar = data(n, dtype, device, seed=60)[0].to(m.dtype)
    m_bar, v_bar = torch.zeros_like(m), torch.zeros_like(v)
    for j in reversed(range(5)):
        g, m_j, v_j = stored[j]
        out = kernels.inner_adamw_adjoint(p_bar, m_bar, v_bar, g, m_j, v_j, **HP, step=j + 1, backend=backend)
        truth = truth_adamw_adjoint(p_bar, m_bar, v_bar, g, m_j, v_j, **HP, step=j + 1)
        for name, o, t in zip(("g_bar", "p_bar", "m_bar", "v_bar"), out, truth):
            close(o, t, f"adjoint step {j + 1} {name}")
        _, p_bar, m_bar, v_bar = out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_edge_lanes_are_finite_and_follow_the_s_zero_convention(backend, device, dtype):
    """Lanes with g = 0, m = 0, v = 0 (all combinations): finite forward and adjoint, and where
    v_new = 0 (s = 0) the v̄ term is exactly 0, so v̄_prev = β2 v̄ and ḡ = (1-β1) m̄_tot."""
    n = 8 * 5 + 3
    p, g, m, v = data(n, dtype, device, seed=70)
    combos = torch.arange(n, device=device) % 8
    g = torch.where((combos & 1) > 0, torch.zeros_like(g), g)
    m = torch.where((combos & 2) > 0, torch.zeros_like(m), m)
    v = torch.where((combos & 4) > 0, torch.zeros_like(v), v)
    out = kernels.inner_adamw_forward(p, g, m, v, **HP, step=2, backend=backend)
    for name, o, t in zip(("p2", "m2", "v2"), out, truth_adamw(p, g, m, v, **HP, step=2)):
        close(o, t, f"edge lanes {name}")
    _, m_new, v_new = out
    s_zero = (v_new == 0).cpu()
    assert s_zero.sum() >= 5, "the edge data must produce v_new == 0 lanes"
    p_bar, m_bar, v_bar = (data(n, dtype, device, seed=71)[k].to(m.dtype) for k in (0, 2, 3))
    g_bar, _, m_prev, v_prev = kernels.inner_adamw_adjoint(p_bar, m_bar, v_bar, g, m_new, v_new, **HP, step=2,
                                                           backend=backend)
    truth = truth_adamw_adjoint(p_bar, m_bar, v_bar, g, m_new, v_new, **HP, step=2)
    for name, o, t in zip(("g_bar", "m_bar_prev", "v_bar_prev"), (g_bar, m_prev, v_prev), truth[:1] + truth[2:]):
        close(o, t, f"edge lanes {name}")
    # the convention, checked in the backend's own dtype: v̄' = β2·v̄ (one rounding) and ḡ = (1-β1)·m̄_tot
    beta2 = HP["beta2"]
    v_exp = (beta2 * v_bar.double().cpu())[s_zero]
    torch.testing.assert_close(v_prev.double().cpu()[s_zero], v_exp, rtol=RTOL[m.dtype], atol=0)
    m_tot = m_prev.double().cpu()[s_zero] / HP["beta1"]
    torch.testing.assert_close(g_bar.double().cpu()[s_zero], (1 - HP["beta1"]) * m_tot,
                               rtol=4 * RTOL[m.dtype], atol=0)


# ---- outer AdamW ---------------------------------------------------------------------------------------

def test_adamw_step_matches_torch_optim_adamw(backend, device):
    """Five in-place steps vs torch.optim.AdamW (single tensor, float64): parameters, exp_avg, exp_avg_sq."""
    n = 1001
    p, _, _, _ = data(n, torch.float64, device, seed=80)
    ref = p.detach().cpu().clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05, foreach=False)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t in range(1, 6):
        g = data(n, torch.float64, device, seed=90 + t)[1]
        ref.grad = g.cpu().clone()
        opt.step()
        kernels.adamw_step_(p, g, m, v, lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05, step=t,
                            backend=backend)
        state = opt.state[ref]
        close(p, ref.detach(), f"step {t} param")
        close(m, state["exp_avg"], f"step {t} exp_avg")
        close(v, state["exp_avg_sq"], f"step {t} exp_avg_sq")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_adamw_step_in_place(backend, device, dtype, n):
    p, g, m, v = data(n, dtype, device, seed=300 + n)
    truth = truth_adamw(p, g, m, v, **HP, step=2)
    ids = [t.data_ptr() for t in (p, m, v)]
    assert kernels.adamw_step_(p, g, m, v, **HP, step=2, backend=backend) is None
    assert [t.data_ptr() for t in (p, m, v)] == ids
    for name, o, t in zip(("p", "m", "v"), (p, m, v), truth):
        close(o, t, f"{backend} {dtype} n={n} {name}")


def test_cpp_large_odd_size():
    """2^20 + 3 elements on the C++ variant: threads take 64 Ki-element chunks, the last has a vector tail,
    and outputs this large are written with streaming stores (float32 and bf16 here; float64 shares the
    code path and is covered at small sizes)."""
    if not kernels.CPP_AVAILABLE:
        pytest.fail(f"C++ kernels not loaded: {kernels._dispatch._CPP_ERROR}")
    n = (1 << 20) + 3
    for dtype in (torch.float32, torch.bfloat16):
        p, g, m, v = data(n, dtype, "cpu", seed=5)
        out = kernels.inner_adamw_forward(p, g, m, v, **HP, step=3, backend="cpp")
        for name, o, t in zip(("p2", "m2", "v2"), out, truth_adamw(p, g, m, v, **HP, step=3)):
            close(o, t, f"{dtype} n={n} {name}")
        if dtype == torch.bfloat16:
            continue  # the adjoint's outputs are all fp32: the float32 case covers them
        p_bar = p.to(m.dtype)
        out = kernels.inner_adamw_adjoint(p_bar, m, v, g, m, v, **HP, step=3, backend="cpp")
        for name, o, t in zip(("g_bar", "p_bar", "m_bar", "v_bar"), out,
                              truth_adamw_adjoint(p_bar, m, v, g, m, v, **HP, step=3)):
            close(o, t, f"{dtype} n={n} adjoint {name}")


# ---- SGD -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_sgd_stages(backend, device, dtype, n):
    lr, wd, c = 0.05, 0.2, 1 - 0.05 * 0.2
    p, g, m, v = data(n, dtype, device, seed=400 + n)
    p64, g64, m64, v64 = (t.double().cpu().clone() for t in (p, g, m, v))  # sgd_step_ mutates p, m, v
    close(kernels.inner_sgd_forward(p, g, lr=lr, weight_decay=wd, backend=backend), c * p64 - lr * g64,
          "sgd forward")
    p_bar = p.to(m.dtype)
    g_bar, p_prev = kernels.inner_sgd_adjoint(p_bar, lr=lr, weight_decay=wd, backend=backend)
    close(g_bar, -lr * p_bar.double().cpu(), "sgd adjoint g_bar")
    close(p_prev, c * p_bar.double().cpu(), "sgd adjoint p_bar_prev")
    kernels.sgd_step_(p, g, m, v, lr=lr, beta1=0.9, beta2=0.99, weight_decay=wd, backend=backend)
    close(p, c * p64 - lr * g64, "sgd_step_ p")
    close(m, 0.9 * m64 + 0.1 * g64, "sgd_step_ m")
    close(v, 0.99 * v64 + 0.01 * g64 * g64, "sgd_step_ v")


def test_sgd_adjoint_is_the_vjp_of_the_forward(backend, device):
    p, g, _, _ = data(65, torch.float64, device, seed=9)
    p_bar = data(65, torch.float64, device, seed=10)[0]
    leaves = [t.detach().cpu().clone().requires_grad_() for t in (p, g)]
    out = kernels.inner_sgd_forward(*leaves, lr=0.05, weight_decay=0.2, backend="reference")
    dp, dg = torch.autograd.grad(out, leaves, grad_outputs=p_bar.cpu())
    g_bar, p_prev = kernels.inner_sgd_adjoint(p_bar, lr=0.05, weight_decay=0.2, backend=backend)
    close(g_bar, dg, "ḡ vs autograd")
    close(p_prev, dp, "p̄_prev vs autograd")


# ---- finite differences --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_fd_perturb_and_combine(backend, device, dtype, n):
    p, g_plus, d, _ = data(n, dtype, device, seed=500 + n)
    g_minus = data(n, dtype, device, seed=600 + n)[1]
    r = 0.37
    plus, minus = kernels.fd_perturb(p, d, r, backend=backend)
    assert plus.dtype == minus.dtype == dtype
    close(plus, p.double().cpu() + r * d.double().cpu(), "p + r d")
    close(minus, p.double().cpu() - r * d.double().cpu(), "p - r d")
    acc = d.clone()
    kernels.fd_combine_(acc, g_plus, g_minus, 1.5, backend=backend)
    close(acc, d.double().cpu() + 1.5 * (g_plus.double().cpu() - g_minus.double().cpu()), "fd_combine_")


def test_fd_stages_give_the_hvp_of_a_quadratic(backend, device):
    """For L = ½ xᵀAx, ∇L = Ax is linear, so the central difference is exact: combine(∇L(x+rd), ∇L(x-rd),
    1/2r) accumulates A d up to rounding."""
    gen = torch.Generator().manual_seed(3)
    n = 31
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    a = (a + a.T).to(device)
    x, d = (torch.randn(n, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    r = 1e-3
    plus, minus = kernels.fd_perturb(x, d, r, backend=backend)
    acc = torch.zeros_like(x)
    kernels.fd_combine_(acc, a @ plus, a @ minus, 1 / (2 * r), backend=backend)
    torch.testing.assert_close(acc.cpu(), (a @ d).cpu(), rtol=1e-9, atol=1e-9)
