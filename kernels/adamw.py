"""AdamW stages of the meta-step: inner forward, its adjoint, and the in-place outer step.

Notation of DESIGN.md "The meta-step": τ = `step` (the bias-correction count, ≥ 1), a = 1/(1-β1^τ),
b = 1/(1-β2^τ). Parameters p and gradients g share a dtype (float32, float64 or bfloat16); moments and all
adjoint buffers have the state dtype promote(param dtype, float32) and the arithmetic runs in it. All
tensors are flat, contiguous, 1-D, of one size, on one device. `backend=None` picks by device
(`backend_for`): C++ on CPU, Triton on CUDA, else the plain-torch reference; "reference" | "cpp" |
"triton" forces one and raises if it is unavailable for that device.
"""
from mamlen.kernels import _dispatch as D


def inner_adamw_forward(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, out=None, backend=None):
    r"""One inner AdamW step, out of place (nothing is mutated).

    .. math::
        m_2 = β_1 m + (1-β_1) g,\quad v_2 = β_2 v + (1-β_2) g^2,\quad s = \sqrt{b\,v_2}

        p_2 = (1 - lr·wd)\,p - lr · a\, m_2 / (s + ε)

    Returns ``(p2, m2, v2)``: p2 in p's dtype, m2 and v2 in the state dtype. With ``out=(p2, m2, v2)`` the
    results are written there (and returned); an output may be the matching input itself (in place).
    """
    fn = "inner_adamw_forward"
    dev = D.check_vectors(fn, p=p, g=g, m=m, v=v)
    pd = D.check_param_dtype(fn, ("p", "g"), p, g)
    D.check_state_dtype(fn, pd, m=m, v=v)
    D.check_hparams(fn, lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, step=step)
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    if out is None:
        return D.call(fn, backend, dev, p, g, m, v, **hp)
    out = D.check_out(fn, out, (pd, m.dtype, m.dtype), p, dict(p=p, g=g, m=m, v=v))
    D.call(fn + "_out", backend, dev, p, g, m, v, *out, **hp)
    return out


def inner_adamw_adjoint(p_bar, m_bar, v_bar, g, m_new, v_new, *, lr, beta1, beta2, eps, weight_decay, step,
                        out=None, backend=None):
    r"""One iteration of DESIGN.md's reverse recursion without the Hessian term, out of place.

    For the inner step that produced ``m_new, v_new`` from gradient ``g`` (s = sqrt(b v_new)):

    .. math::
        \bar m \mathrel{+}= -lr\,\bar p\, a/(s+ε)

        \bar v \mathrel{+}= -lr\,\bar p\,\bigl(-a\, m_{new}/(s+ε)^2 · b/(2s)\bigr)\quad (:= 0 \text{ where } s = 0)

        \bar g = (1-β_1)\bar m + 2(1-β_2)\, g\, \bar v

    Returns ``(g_bar, p_bar_prev, m_bar_prev, v_bar_prev) = (ḡ, (1-lr·wd) p̄, β1 m̄, β2 v̄)``, all in the
    state dtype; the caller adds H·ḡ to p_bar_prev. g has the parameter dtype, every other input the state
    dtype. With ``out=(g_bar, p_bar_prev, m_bar_prev, v_bar_prev)`` (state dtype) the results are written there;
    outputs may be inputs (the engine runs ``out=(g, p_bar, m_bar, v_bar)`` for float32/float64 parameters:
    the adjoint state updated in place and ḡ written over g, which is not needed afterwards).
    """
    fn = "inner_adamw_adjoint"
    dev = D.check_vectors(fn, p_bar=p_bar, m_bar=m_bar, v_bar=v_bar, g=g, m_new=m_new, v_new=v_new)
    pd = D.check_param_dtype(fn, ("g",), g)
    D.check_state_dtype(fn, pd, p_bar=p_bar, m_bar=m_bar, v_bar=v_bar, m_new=m_new, v_new=v_new)
    D.check_hparams(fn, lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, step=step)
    hp = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    args = (p_bar, m_bar, v_bar, g, m_new, v_new)
    if out is None:
        return D.call(fn, backend, dev, *args, **hp)
    inputs = dict(p_bar=p_bar, m_bar=m_bar, v_bar=v_bar, g=g, m_new=m_new, v_new=v_new)
    out = D.check_out(fn, out, (p_bar.dtype,) * 4, g, inputs)
    D.call(fn + "_out", backend, dev, *args, *out, **hp)
    return out


def adamw_step_(p, g, m, v, *, lr, beta1, beta2, eps, weight_decay, step, backend=None):
    r"""The outer AdamW step, in place on ``p``, ``m``, ``v`` (torch.optim.AdamW semantics, decoupled wd).

    .. math::
        m ← β_1 m + (1-β_1) g,\quad v ← β_2 v + (1-β_2) g^2,\quad
        p ← (1-lr·wd)\,p - lr · a\, m / (\sqrt{b\,v} + ε)

    ``step`` is the count after this update (torch's ``state["step"]`` once incremented). Returns None.
    """
    fn = "adamw_step_"
    dev = D.check_vectors(fn, p=p, g=g, m=m, v=v)
    pd = D.check_param_dtype(fn, ("p", "g"), p, g)
    D.check_state_dtype(fn, pd, m=m, v=v)
    D.check_hparams(fn, lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, step=step)
    D.call(fn, backend, dev, p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
           weight_decay=weight_decay, step=step)
