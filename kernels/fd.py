"""Finite-difference HVP support (DESIGN.md "fd" mode): H ḡ ≈ (∇L(φ + r ḡ) - ∇L(φ - r ḡ)) / 2r.

Same conventions as `mamlen.kernels.adamw` (flat contiguous 1-D tensors; state dtype = promote(param
dtype, float32); `backend=None | "reference" | "cpp" | "triton"`).
"""
from mamlen.kernels import _dispatch as D


def fd_perturb(p, d, r, *, out=None, backend=None):
    """The two evaluation points ``(p + r·d, p - r·d)``: computed in the state dtype, returned in p's dtype.

    p: parameters (float32, float64, bfloat16); d: direction in the state dtype; r: a Python float.
    ``out=(plus, minus)``: written there and returned (an output may be p itself).
    """
    fn = "fd_perturb"
    dev = D.check_vectors(fn, p=p, d=d)
    pd = D.check_param_dtype(fn, ("p",), p)
    D.check_state_dtype(fn, pd, d=d)
    D.check_floats(fn, r=r)
    if out is None:
        return D.call(fn, backend, dev, p, d, float(r))
    out = D.check_out(fn, out, (pd, pd), p, dict(p=p, d=d))
    D.call(fn + "_out", backend, dev, p, d, *out, float(r))
    return out


def fd_combine_(acc, g_plus, g_minus, scale, *, backend=None):
    """``acc += (g_plus - g_minus) · scale`` in place (acc in the state dtype of the gradients' dtype).

    With scale = 1/(2r) this adds the central-difference HVP to an adjoint buffer in one pass. None.
    """
    fn = "fd_combine_"
    dev = D.check_vectors(fn, acc=acc, g_plus=g_plus, g_minus=g_minus)
    gd = D.check_param_dtype(fn, ("g_plus", "g_minus"), g_plus, g_minus)
    D.check_state_dtype(fn, gd, acc=acc)
    D.check_floats(fn, scale=scale)
    D.call(fn, backend, dev, acc, g_plus, g_minus, float(scale))
