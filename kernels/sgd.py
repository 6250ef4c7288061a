"""SGD stages of the meta-step: inner forward, its adjoint, and the in-place outer step (DESIGN.md).

Same conventions as `mamlen.kernels.adamw`: flat contiguous 1-D tensors of one size and device; p and g
share a dtype (float32, float64, bfloat16); moments and adjoints have the state dtype promote(dtype,
float32); `backend=None | "reference" | "cpp" | "triton"`.
"""
from mamlen.kernels import _dispatch as D


def inner_sgd_forward(p, g, *, lr, weight_decay, backend=None):
    """One inner SGD step, out of place: ``p2 = (1 - lr·wd) p - lr g`` (p's dtype)."""
    fn = "inner_sgd_forward"
    dev = D.check_vectors(fn, p=p, g=g)
    D.check_param_dtype(fn, ("p", "g"), p, g)
    D.check_hparams(fn, lr=lr, weight_decay=weight_decay)
    return D.call(fn, backend, dev, p, g, lr=lr, weight_decay=weight_decay)


def inner_sgd_adjoint(p_bar, *, lr, weight_decay, backend=None):
    """Adjoint of one inner SGD step without the Hessian term: ``(ḡ, p̄_prev) = (-lr p̄, (1-lr·wd) p̄)``.

    p_bar is a state-dtype tensor (float32 or float64); both outputs have its dtype. Nothing is mutated.
    """
    fn = "inner_sgd_adjoint"
    dev = D.check_vectors(fn, p_bar=p_bar)
    pd = D.check_param_dtype(fn, ("p_bar",), p_bar)
    D.check_state_dtype(fn, pd, p_bar=p_bar)
    D.check_hparams(fn, lr=lr, weight_decay=weight_decay)
    return D.call(fn, backend, dev, p_bar, lr=lr, weight_decay=weight_decay)


def sgd_step_(p, g, m, v, *, lr, beta1, beta2, weight_decay, backend=None):
    """The outer SGD step, in place: ``p ← (1-lr·wd) p - lr g``; ``m ← β1 m + (1-β1) g``;
    ``v ← β2 v + (1-β2) g²`` (the moments keep running so a shared inner AdamW starts from them). None.
    """
    fn = "sgd_step_"
    dev = D.check_vectors(fn, p=p, g=g, m=m, v=v)
    pd = D.check_param_dtype(fn, ("p", "g"), p, g)
    D.check_state_dtype(fn, pd, m=m, v=v)
    D.check_hparams(fn, lr=lr, weight_decay=weight_decay, beta1=beta1, beta2=beta2)
    D.call(fn, backend, dev, p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay)
