"""Plain-torch twins of every fused kernel: the ground truth the C++ and Triton variants are tested against.

Same names and signatures as the public functions of `mamlen.kernels` (without `backend=`). Inputs are
assumed valid (the public functions validate); any dtype works. Everything is computed in the state dtype
`promote(param dtype, float32)` and written back in the dtype the contract asks for. Notation: DESIGN.md
"The meta-step" (τ = `step`, a = 1/(1-β1^τ), b = 1/(1-β2^τ), s = sqrt(b v)).
"""
import torch


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of moments and adjoint buffers for parameters of `dtype` (float32 for bf16/fp16/fp32)."""
    return torch.promote_types(dtype, torch.float32)


def _bias(beta1, beta2, step):
    return 1.0 / (1.0 - beta1 ** step), 1.0 / (1.0 - beta2 ** step)


def inner_adamw_forward(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    """One inner AdamW step, out of place: returns (p2, m2, v2)."""
    sd = state_dtype(p.dtype)
    a, b = _bias(beta1, beta2, step)
    g_s = g.to(sd)
    m2 = beta1 * m.to(sd) + (1 - beta1) * g_s
    v2 = beta2 * v.to(sd) + (1 - beta2) * g_s * g_s
    s = torch.sqrt(b * v2)
    p2 = (1 - lr * weight_decay) * p.to(sd) - lr * a * m2 / (s + eps)
    return p2.to(p.dtype), m2, v2


def inner_adamw_adjoint(p_bar, m_bar, v_bar, g, m_new, v_new, *, lr, beta1, beta2, eps, weight_decay, step):
    """One iteration of the reverse recursion without the Hessian term: returns (ḡ, p̄_prev, m̄_prev, v̄_prev)."""
    sd = state_dtype(g.dtype)
    a, b = _bias(beta1, beta2, step)
    p_bar, m_bar, v_bar = p_bar.to(sd), m_bar.to(sd), v_bar.to(sd)
    m_new, v_new = m_new.to(sd), v_new.to(sd)
    s = torch.sqrt(b * v_new)
    d = s + eps
    m_tot = m_bar - lr * p_bar * a / d
    # ∂/∂v of m/(s+eps) is -m/(s+eps)² · b/(2s): infinite at s = 0, where the contract defines the term as 0
    dv = torch.where(s > 0, -a * m_new / (d * d) * b / (2 * torch.where(s > 0, s, 1)), 0)
    v_tot = v_bar - lr * p_bar * dv
    g_bar = (1 - beta1) * m_tot + 2 * (1 - beta2) * g.to(sd) * v_tot
    return g_bar, (1 - lr * weight_decay) * p_bar, beta1 * m_tot, beta2 * v_tot


def adamw_step_(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    """Outer AdamW step in place on p, m, v (torch.optim.AdamW semantics, decoupled weight decay)."""
    p2, m2, v2 = inner_adamw_forward(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                     weight_decay=weight_decay, step=step)
    p.copy_(p2)
    m.copy_(m2)
    v.copy_(v2)


def inner_sgd_forward(p, g, *, lr, weight_decay):
    """One inner SGD step, out of place: p2 = (1 - lr·wd) p - lr g."""
    sd = state_dtype(p.dtype)
    return ((1 - lr * weight_decay) * p.to(sd) - lr * g.to(sd)).to(p.dtype)


def inner_sgd_adjoint(p_bar, *, lr, weight_decay):
    """Adjoint of one inner SGD step without the Hessian term: returns (ḡ, p̄_prev) = (-lr p̄, (1-lr·wd) p̄)."""
    return -lr * p_bar, (1 - lr * weight_decay) * p_bar


def sgd_step_(p, g, m, v, *, lr, beta1, beta2, weight_decay):
    """Outer SGD step in place: p ← (1-lr·wd) p - lr g; m, v still take the AdamW moment update with g."""
    sd = state_dtype(p.dtype)
    g_s = g.to(sd)
    p.copy_((1 - lr * weight_decay) * p.to(sd) - lr * g_s)
    m.copy_(beta1 * m + (1 - beta1) * g_s)
    v.copy_(beta2 * v + (1 - beta2) * g_s * g_s)


def fd_perturb(p, d, r):
    """The two points of a central finite difference: (p + r d, p - r d), computed in d's dtype, cast to p's."""
    sd = state_dtype(p.dtype)
    p_s, rd = p.to(sd), r * d.to(sd)
    return (p_s + rd).to(p.dtype), (p_s - rd).to(p.dtype)


def fd_combine_(acc, g_plus, g_minus, scale):
    """acc += (g_plus - g_minus) · scale, in place, in acc's dtype."""
    acc.add_((g_plus.to(acc.dtype) - g_minus.to(acc.dtype)) * scale)


# `out=` forms: compute everything first, then copy, so outputs may be the inputs themselves
def inner_adamw_forward_out(p, g, m, v, p_out, m_out, v_out, **hp):
    for dst, src in zip((p_out, m_out, v_out), inner_adamw_forward(p, g, m, v, **hp)):
        dst.copy_(src)


def inner_adamw_adjoint_out(p_bar, m_bar, v_bar, g, m_new, v_new, g_bar_out, p_bar_out, m_bar_out, v_bar_out, **hp):
    outs = inner_adamw_adjoint(p_bar, m_bar, v_bar, g, m_new, v_new, **hp)
    for dst, src in zip((g_bar_out, p_bar_out, m_bar_out, v_bar_out), outs):
        dst.copy_(src)


def fd_perturb_out(p, d, plus_out, minus_out, r):
    for dst, src in zip((plus_out, minus_out), fd_perturb(p, d, r)):
        dst.copy_(src)
