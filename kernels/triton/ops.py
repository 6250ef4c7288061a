"""Triton kernels of the mamlen ops: one @triton.jit kernel per op and its launcher (same name and
signature as the public function, without validation or `backend=`).

Every kernel streams its buffers once in BLOCK-sized tiles (a single fixed config: autotuning with several
configs does not run under TRITON_INTERPRET=1). Arithmetic runs in the state dtype, taken from a state
buffer (bf16 loads are cast to fp32 explicitly, fp64 stays fp64). Hyper-parameters travel in a small
tensor of that dtype: Triton would pass Python floats as fp32, which loses fp64 precision.

Bytes moved per element, fp32 (read + write): forward 16 + 12, adjoint 24 + 16, adamw_step_ 16 + 12,
sgd forward 8 + 4, sgd adjoint 4 + 8, sgd_step_ 16 + 12, fd_perturb 8 + 8, fd_combine_ 12 + 4.
"""
import os

import torch
import triton
import triton.language as tl

# @triton.jit reads TRITON_INTERPRET when it decorates: these kernels run on CPU tensors only if it was set
# before this module was imported
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
BLOCK = 1024
NUM_WARPS = 4


def _hyper(like, *values):
    return torch.tensor(values, dtype=like.dtype, device=like.device)


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


def _bias(beta1, beta2, step):
    return 1.0 / (1.0 - beta1 ** step), 1.0 / (1.0 - beta2 ** step)


@triton.jit
def _sqrt(x):
    # IEEE sqrt in both state dtypes (tl.sqrt is approximate for fp32; sqrt_rn takes fp32 only)
    if x.dtype == tl.float32:
        return tl.sqrt_rn(x)
    else:
        return tl.sqrt(x)


@triton.jit
def _adamw_forward_kernel(p_ptr, g_ptr, m_ptr, v_ptr, p2_ptr, m2_ptr, v2_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lr_a, c, beta1, beta2, b, eps = (tl.load(h_ptr + 0), tl.load(h_ptr + 1), tl.load(h_ptr + 2),
                                     tl.load(h_ptr + 3), tl.load(h_ptr + 4), tl.load(h_ptr + 5))
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(m.dtype)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(m.dtype)
    m2 = beta1 * m + (1 - beta1) * g
    v2 = beta2 * v + (1 - beta2) * g * g
    p2 = c * p - lr_a * m2 / (_sqrt(b * v2) + eps)
    tl.store(p2_ptr + offs, p2.to(p2_ptr.dtype.element_ty), mask=mask)
    tl.store(m2_ptr + offs, m2, mask=mask)
    tl.store(v2_ptr + offs, v2, mask=mask)


def _adamw_forward_into(p, g, m, v, p2, m2, v2, lr, beta1, beta2, eps, weight_decay, step):
    a, b = _bias(beta1, beta2, step)
    h = _hyper(m, lr * a, 1 - lr * weight_decay, beta1, beta2, b, eps)
    if p.numel():
        _adamw_forward_kernel[_grid(p.numel())](p, g, m, v, p2, m2, v2, h, p.numel(), BLOCK=BLOCK,
                                                num_warps=NUM_WARPS)


def inner_adamw_forward(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    p2, m2, v2 = torch.empty_like(p), torch.empty_like(m), torch.empty_like(v)
    _adamw_forward_into(p, g, m, v, p2, m2, v2, lr, beta1, beta2, eps, weight_decay, step)
    return p2, m2, v2


def inner_adamw_forward_out(p, g, m, v, p_out, m_out, v_out, *, lr, beta1, beta2, eps, weight_decay, step):
    _adamw_forward_into(p, g, m, v, p_out, m_out, v_out, lr, beta1, beta2, eps, weight_decay, step)


def adamw_step_(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    # same kernel, outputs aliased to inputs: each lane is loaded before it is stored
    _adamw_forward_into(p, g, m, v, p, m, v, lr, beta1, beta2, eps, weight_decay, step)


@triton.jit
def _adamw_adjoint_kernel(pb_ptr, mb_ptr, vb_ptr, g_ptr, m_ptr, v_ptr, gb_out, pb_out, mb_out, vb_out, h_ptr, n,
                          BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lr_a, c, beta1, beta2, b, eps, half_lr_a_b = (tl.load(h_ptr + 0), tl.load(h_ptr + 1), tl.load(h_ptr + 2),
                                                  tl.load(h_ptr + 3), tl.load(h_ptr + 4), tl.load(h_ptr + 5),
                                                  tl.load(h_ptr + 6))
    pb = tl.load(pb_ptr + offs, mask=mask, other=0.0)
    mb = tl.load(mb_ptr + offs, mask=mask, other=0.0)
    vb = tl.load(vb_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(pb.dtype)
    s = _sqrt(b * v)
    inv_d = 1.0 / (s + eps)
    m_tot = mb - lr_a * pb * inv_d
    # -lr p̄ · (-a m/(s+eps)² · b/(2s)), defined as 0 where s == 0
    pos = s > 0
    dv = half_lr_a_b * pb * m * inv_d * inv_d / tl.where(pos, s, 1.0)
    v_tot = vb + tl.where(pos, dv, 0.0)
    tl.store(gb_out + offs, (1 - beta1) * m_tot + 2 * (1 - beta2) * g * v_tot, mask=mask)
    tl.store(pb_out + offs, c * pb, mask=mask)
    tl.store(mb_out + offs, beta1 * m_tot, mask=mask)
    tl.store(vb_out + offs, beta2 * v_tot, mask=mask)


def inner_adamw_adjoint_out(p_bar, m_bar, v_bar, g, m_new, v_new, g_bar_out, p_bar_out, m_bar_out, v_bar_out, *,
                            lr, beta1, beta2, eps, weight_decay, step):
    a, b = _bias(beta1, beta2, step)
    h = _hyper(p_bar, lr * a, 1 - lr * weight_decay, beta1, beta2, b, eps, 0.5 * lr * a * b)
    if g.numel():  # outputs may alias inputs: each lane is loaded before it is stored
        _adamw_adjoint_kernel[_grid(g.numel())](p_bar, m_bar, v_bar, g, m_new, v_new, g_bar_out, p_bar_out,
                                                m_bar_out, v_bar_out, h, g.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)


def inner_adamw_adjoint(p_bar, m_bar, v_bar, g, m_new, v_new, *, lr, beta1, beta2, eps, weight_decay, step):
    outs = tuple(torch.empty_like(p_bar) for _ in range(4))
    inner_adamw_adjoint_out(p_bar, m_bar, v_bar, g, m_new, v_new, *outs, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                            weight_decay=weight_decay, step=step)
    return outs


@triton.jit
def _sgd_forward_kernel(p_ptr, g_ptr, p2_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lr, c = tl.load(h_ptr + 0), tl.load(h_ptr + 1)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(lr.dtype)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(lr.dtype)
    tl.store(p2_ptr + offs, (c * p - lr * g).to(p2_ptr.dtype.element_ty), mask=mask)


def _state_like(p):
    return torch.empty(0, dtype=torch.promote_types(p.dtype, torch.float32), device=p.device)


def inner_sgd_forward(p, g, *, lr, weight_decay):
    p2 = torch.empty_like(p)
    h = _hyper(_state_like(p), lr, 1 - lr * weight_decay)
    if p.numel():
        _sgd_forward_kernel[_grid(p.numel())](p, g, p2, h, p.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)
    return p2


@triton.jit
def _sgd_adjoint_kernel(pb_ptr, gb_out, pb_out, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lr, c = tl.load(h_ptr + 0), tl.load(h_ptr + 1)
    pb = tl.load(pb_ptr + offs, mask=mask, other=0.0)
    tl.store(gb_out + offs, -lr * pb, mask=mask)
    tl.store(pb_out + offs, c * pb, mask=mask)


def inner_sgd_adjoint(p_bar, *, lr, weight_decay):
    g_bar, p_bar_prev = torch.empty_like(p_bar), torch.empty_like(p_bar)
    h = _hyper(p_bar, lr, 1 - lr * weight_decay)
    if p_bar.numel():
        _sgd_adjoint_kernel[_grid(p_bar.numel())](p_bar, g_bar, p_bar_prev, h, p_bar.numel(), BLOCK=BLOCK,
                                                  num_warps=NUM_WARPS)
    return g_bar, p_bar_prev


@triton.jit
def _sgd_step_kernel(p_ptr, g_ptr, m_ptr, v_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lr, c, beta1, beta2 = tl.load(h_ptr + 0), tl.load(h_ptr + 1), tl.load(h_ptr + 2), tl.load(h_ptr + 3)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(m.dtype)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(m.dtype)
    tl.store(p_ptr + offs, (c * p - lr * g).to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, beta1 * m + (1 - beta1) * g, mask=mask)
    tl.store(v_ptr + offs, beta2 * v + (1 - beta2) * g * g, mask=mask)


def sgd_step_(p, g, m, v, *, lr, beta1, beta2, weight_decay):
    h = _hyper(m, lr, 1 - lr * weight_decay, beta1, beta2)
    if p.numel():
        _sgd_step_kernel[_grid(p.numel())](p, g, m, v, h, p.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)


@triton.jit
def _fd_perturb_kernel(p_ptr, d_ptr, plus_ptr, minus_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r = tl.load(h_ptr + 0)
    d = tl.load(d_ptr + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(d.dtype)
    rd = r * d
    tl.store(plus_ptr + offs, (p + rd).to(plus_ptr.dtype.element_ty), mask=mask)
    tl.store(minus_ptr + offs, (p - rd).to(minus_ptr.dtype.element_ty), mask=mask)


def fd_perturb_out(p, d, plus, minus, r):
    h = _hyper(d, r)
    if p.numel():
        _fd_perturb_kernel[_grid(p.numel())](p, d, plus, minus, h, p.numel(), BLOCK=BLOCK, num_warps=NUM_WARPS)


def fd_perturb(p, d, r):
    plus, minus = torch.empty_like(p), torch.empty_like(p)
    fd_perturb_out(p, d, plus, minus, r)
    return plus, minus


@triton.jit
def _fd_combine_kernel(acc_ptr, gp_ptr, gm_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    scale = tl.load(h_ptr + 0)
    acc = tl.load(acc_ptr + offs, mask=mask, other=0.0)
    gp = tl.load(gp_ptr + offs, mask=mask, other=0.0).to(acc.dtype)
    gm = tl.load(gm_ptr + offs, mask=mask, other=0.0).to(acc.dtype)
    tl.store(acc_ptr + offs, acc + (gp - gm) * scale, mask=mask)


def fd_combine_(acc, g_plus, g_minus, scale):
    h = _hyper(acc, scale)
    if acc.numel():
        _fd_combine_kernel[_grid(acc.numel())](acc, g_plus, g_minus, h, acc.numel(), BLOCK=BLOCK,
                                               num_warps=NUM_WARPS)
