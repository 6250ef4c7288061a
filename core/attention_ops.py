"""Tiled (flash-style) attention with exact double backward and forward-mode AD, at O(T) saved memory.

Why: fused attention kernels (flash-attn, SDPA flash/efficient/CPU-flash) have no double backward and no jvp,
and eager attention keeps T x T probabilities per head and layer, several times over in a create_graph'd
graph. Here every derivative order is a custom autograd.Function whose saved tensors are O(T) per row:

    _Attn          (q, k, v)          -> o                     saves q, k, v, o, lse
    _AttnBackward  (q, k, v, do)      -> (dq, dk, dv)          saves q, k, v, o, lse, do
                   its backward = the double backward (VJP of the backward), tiled, P recomputed per tile;
    jvp of both                        = forward-mode AD (for forward-over-reverse HVPs), tiled.

Math, per (batch, head); s = scale, B = additive bias, masked entries S = -inf, Z = dropout keep/(1-p) (Z = 1
without dropout), rowsum over keys j, "o" = elementwise product, vectors indexed by query row broadcast over j:

    S = s Q K^T + B,   lse = log rowsum exp S,   P = exp(S - lse),   O = (P o Z) V
  backward (cotangent dO):
    dP = (dO V^T) o Z,   D = rowsum(P o dP) = rowsum(dO o O),   dS = P o (dP - D)
    dQ = s dS K,   dK = s dS^T Q,   dV = (P o Z)^T dO
  double backward (cotangents gQ, gK, gV of dQ, dK, dV; outputs Qb, Kb, Vb, dOb):
    G  = s (gQ K^T + Q gK^T)            cotangent of dS
    E  = (dO gV^T) o Z                  cotangent of P through dV
    c  = rowsum(P o G)                  (cotangent of D is -c)
    Pb = E + G o (dP - D) - c dP        cotangent of P;   dPb = P o (G - c)   cotangent of dP
    e  = rowsum(P o Pb) = rowsum(P o (E + G o dP)) - 2 c D
    Sb = P o (Pb - e)                   softmax VJP
    Qb = s (Sb K + dS gK),   Kb = s (Sb^T Q + dS^T gQ),
    Vb = (Z o dPb)^T dO,     dOb = (Z o dPb) V + (P o Z) gV
  forward-mode, forward (tangents Qt, Kt, Vt):
    St = s (Qt K^T + Q Kt^T),   mu = rowsum(P o St),   Pt = P o (St - mu)
    Ot = (P o St o Z) V - mu O + (P o Z) Vt                                  (one pass)
  forward-mode, backward (tangents Qt, Kt, Vt, dOt):
    dPt = (dOt V^T + dO Vt^T) o Z,   Dt = rowsum(P o St o dP) - mu D + rowsum(P o dPt)
    dSt = Pt o (dP - D) + P o (dPt - Dt)
    dQt = s (dSt K + dS Kt),   dKt = s (dSt^T Q + dS^T Qt),   dVt = (Pt o Z)^T dO + (P o Z)^T dOt
Row statistics (c, e, mu, Dt) need whole rows before the second tile pass uses them, hence two passes.

Layout: GQA is native: q is viewed (B, Hkv, R, Tq, D) with R = H / Hkv query heads per key/value head, k and v
stay (B, Hkv, Tk, D); the R rows of a group are flattened into one matmul. Accumulation is fp32 (fp64 for
fp64 inputs); outputs have the input dtype. Masks are constants (never differentiated). Fully masked rows give
o = 0 and zero gradients. Dropout masks are regenerated per tile from a seed drawn from torch's global RNG at
forward time, so every recomputation (backward, double backward, jvp, checkpoint replay) sees the same mask.

Backends: "torch" runs every pass above with torch ops (any device; the CPU path). "triton" (core/attention_triton.py,
chosen by "auto" on CUDA) runs the forward and the first-order backward as Triton kernels and keeps the PyTorch
passes for the double backward and both jvps; dropout and float64 always use "torch".

This is the op file (passes, autograd Functions, the public `tiled_attention`); core/hf_attention.py is the thin
adapter that makes it `attn_implementation="mamlen"` for Hugging Face transformers.
"""
import importlib.util
import math
import os

import torch

# Tile sizes of the CPU path. Large key tiles suit CPU matmuls; memory per tile is transient
# (B * H * BLOCK_Q * BLOCK_K floats, a handful of them alive at once), never saved.
BLOCK_Q = 128
BLOCK_K = 512

# Up to this many scores per (batch, head) the whole S fits in a few hundred KiB and the tiled passes are mostly
# Python overhead (`bench/bench_attention.py --dense-ab`, exact HVP of one SmolLM2-shaped attention on CPU, two
# runs: tiled takes 1.4-1.8x the dense time at T = 64-128, 1.1-1.3x at 192, about the same from 256). Below it
# `dense` runs the same math as plain differentiable torch ops, whose saved T x T tensors are small here.
DENSE_MAX_SCORES = 192 * 192

_SUPPORTED_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


class _Spec:
    """Non-tensor arguments and constant masks of one attention call (shared by all derivative passes)."""

    __slots__ = ("scale", "causal", "block_q", "block_k", "dropout_p", "seed", "keep", "bias", "tq", "tk", "backend")

    def __init__(self, scale, causal, block_q, block_k, dropout_p, seed, keep, bias, tq, tk, backend="torch"):
        self.scale, self.causal, self.block_q, self.block_k = scale, causal, block_q, block_k
        self.dropout_p, self.seed, self.keep, self.bias, self.tq, self.tk = dropout_p, seed, keep, bias, tq, tk
        self.backend = backend


def triton_interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton():
    from mamlen.core import attention_triton  # lazy: imports triton

    return attention_triton


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tiles(spec):
    """(i0, i1, [(j0, j1), ...]) per query block; causal (top-left aligned, as SDPA) skips tiles above the diagonal."""
    for i0 in range(0, spec.tq, spec.block_q):
        i1 = min(i0 + spec.block_q, spec.tq)
        jend = min(spec.tk, i1) if spec.causal else spec.tk
        yield i0, i1, [(j0, min(j0 + spec.block_k, jend)) for j0 in range(0, jend, spec.block_k)]


def _drop(spec, i0, j0, shape, device, dtype):
    """Dropout multiplier Z for one tile, a pure function of (seed, tile): identical in every pass."""
    if spec.dropout_p == 0.0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(hash((spec.seed, i0, j0)) & (2**62 - 1))
    keep = torch.rand(shape, generator=g, device=device, dtype=torch.float32) >= spec.dropout_p
    return keep.to(dtype) / (1.0 - spec.dropout_p)


def _scores(spec, qf, k, i0, i1, j0, j1, R):
    """Masked S tile (B, Hkv, R, bq, bk) from flattened, pre-scaled q rows qf (B, Hkv, R*bq, D)."""
    B, Hkv = qf.shape[:2]
    s = torch.matmul(qf, k[:, :, j0:j1].transpose(-1, -2)).view(B, Hkv, R, i1 - i0, j1 - j0)
    if spec.bias is not None:
        s += spec.bias[..., i0:i1, j0:j1]
    if spec.keep is not None:
        s.masked_fill_(~spec.keep[..., i0:i1, j0:j1], float("-inf"))
    if spec.causal and j1 - 1 > i0:  # some key of the tile lies after some query of the tile
        rows = torch.arange(i0, i1, device=qf.device)[:, None]
        cols = torch.arange(j0, j1, device=qf.device)[None, :]
        s.masked_fill_(cols > rows, float("-inf"))
    return s


def _probs(spec, qf, k, lse_safe, i0, i1, j0, j1, R):
    s = _scores(spec, qf, k, i0, i1, j0, j1, R)
    return s.sub_(lse_safe[..., i0:i1, None]).exp_()


def _rows(x, i0, i1):
    """Rows i0:i1 of a (B, Hkv, R, T, D) tensor as one (B, Hkv, R*bq, D) matrix."""
    return x[:, :, :, i0:i1].flatten(2, 3)


def _qmm(a, m):
    """(B, Hkv, R, bq, bk) @ (B, Hkv, bk, D) -> (B, Hkv, R, bq, D)."""
    B, Hkv, R, bq, bk = a.shape
    return torch.matmul(a.reshape(B, Hkv, R * bq, bk), m).view(B, Hkv, R, bq, m.shape[-1])


def _kmm(a, x):
    """a^T @ x summed over the R query heads of a group: (B,Hkv,R,bq,bk), (B,Hkv,R*bq,D) -> (B,Hkv,bk,D)."""
    B, Hkv, R, bq, bk = a.shape
    return torch.matmul(a.reshape(B, Hkv, R * bq, bk).transpose(-1, -2), x)


def _outer(x, m, R):
    """Rows x (B, Hkv, R*bq, D) times m^T (B, Hkv, bk, D) -> (B, Hkv, R, bq, bk)."""
    B, Hkv, n, _ = x.shape
    return torch.matmul(x, m.transpose(-1, -2)).view(B, Hkv, R, n // R, m.shape[-2])


def _safe_lse(lse):
    # Fully masked rows have lse = -inf and every S = -inf: exp(S - 0) = 0 there, no NaN.
    return torch.where(torch.isinf(lse), torch.zeros((), dtype=lse.dtype, device=lse.device), lse)


def _rowdot(a, b):
    """rowsum(a o b) over the last dim."""
    return (a * b).sum(-1)


# ----------------------------------------------------------------------------------------------------------------
# The five tiled passes. q: (B, Hkv, R, Tq, D); k: (B, Hkv, Tk, D); v: (B, Hkv, Tk, Dv); all in the acc dtype.
# Products of two row-blocks with two key-blocks (e.g. St = s (Qt K^T + Q Kt^T)) are one matmul over the
# concatenated feature dim; elementwise work on tiles is done in place where the value is not needed again.


def _fwd(spec, q, k, v):
    B, Hkv, R, Tq, _ = q.shape
    Dv = v.shape[-1]
    qs = q * spec.scale
    o = q.new_zeros(B, Hkv, R, Tq, Dv)
    lse = q.new_full((B, Hkv, R, Tq), float("-inf"))
    for i0, i1, ks in _tiles(spec):
        qf = _rows(qs, i0, i1)
        m = q.new_full((B, Hkv, R, i1 - i0), float("-inf"))  # running row max
        l = q.new_zeros(B, Hkv, R, i1 - i0)  # running sum of exp(S - m)
        acc = q.new_zeros(B, Hkv, R, i1 - i0, Dv)
        for j0, j1 in ks:
            s = _scores(spec, qf, k, i0, i1, j0, j1, R)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = _safe_lse(m_new)
            alpha = torch.exp(m - m_safe)
            p = s.sub_(m_safe[..., None]).exp_()
            l = l * alpha + p.sum(-1)
            z = _drop(spec, i0, j0, p.shape, p.device, p.dtype)
            if z is not None:
                p.mul_(z)
            acc = acc * alpha[..., None] + _qmm(p, v[:, :, j0:j1])
            m = m_new
        lse[..., i0:i1] = m + torch.log(l)
        o[..., i0:i1, :] = torch.where(l[..., None] > 0, acc / l[..., None].clamp_min(1e-300), 0.0)
    return o, lse


def _bwd(spec, q, k, v, o, lse, do):
    R = q.shape[2]
    qs = q * spec.scale
    lse_s = _safe_lse(lse)
    delta = (do * o).sum(-1)  # D = rowsum(P o dP) = rowsum(dO o O)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i0, i1, ks in _tiles(spec):
        qf, dof = _rows(qs, i0, i1), _rows(do, i0, i1)
        dqb = 0
        for j0, j1 in ks:
            p = _probs(spec, qf, k, lse_s, i0, i1, j0, j1, R)
            z = _drop(spec, i0, j0, p.shape, p.device, p.dtype)
            dp = _outer(dof, v[:, :, j0:j1], R)
            if z is not None:
                dp.mul_(z)
                dv[:, :, j0:j1] += _kmm(p * z, dof)
            else:
                dv[:, :, j0:j1] += _kmm(p, dof)
            ds = dp.sub_(delta[..., i0:i1, None]).mul_(p)
            dk[:, :, j0:j1] += _kmm(ds, qf)  # qf is pre-scaled: s dS^T Q
            dqb = dqb + _qmm(ds, k[:, :, j0:j1])
        dq[..., i0:i1, :] = dqb
    return dq * spec.scale, dk, dv


def _fwd_jvp(spec, q, k, v, o, lse, qt, kt, vt):
    R, sc = q.shape[2], spec.scale
    qs = q * sc
    lse_s = _safe_lse(lse)
    qcat = torch.cat([qt * sc, qs], -1)  # St = [s Qt, s Q] @ [K, Kt]^T
    kcat = torch.cat([k, kt], -1)
    ot = torch.zeros_like(o)
    for i0, i1, ks in _tiles(spec):
        qf, qcf = _rows(qs, i0, i1), _rows(qcat, i0, i1)
        acc, mu = 0, 0
        for j0, j1 in ks:
            p = _probs(spec, qf, k, lse_s, i0, i1, j0, j1, R)
            z = _drop(spec, i0, j0, p.shape, p.device, p.dtype)
            pst = _outer(qcf, kcat[:, :, j0:j1], R).mul_(p)
            mu = mu + pst.sum(-1)
            if z is not None:
                pst.mul_(z)
                p.mul_(z)
            acc = acc + _qmm(pst, v[:, :, j0:j1]) + _qmm(p, vt[:, :, j0:j1])
        ot[..., i0:i1, :] = acc - mu[..., None] * o[..., i0:i1, :]
    return ot


def _bwd_vjp(spec, q, k, v, o, lse, do, gq, gk, gv):
    """Double backward: cotangents (gq, gk, gv) of (dq, dk, dv) -> (qb, kb, vb, dob). See module docstring."""
    R, sc = q.shape[2], spec.scale
    qs = q * sc
    lse_s = _safe_lse(lse)
    delta = (do * o).sum(-1)
    tiles = list(_tiles(spec))
    gqs = gq * sc
    gcat_q = torch.cat([gqs, qs], -1)  # G = [s gQ, s Q] @ [K, gK]^T
    gcat_k = torch.cat([k, gk], -1)

    def tile(i0, i1, j0, j1, qf, gcf, dof):
        p = _probs(spec, qf, k, lse_s, i0, i1, j0, j1, R)
        z = _drop(spec, i0, j0, p.shape, p.device, p.dtype)
        B, Hkv = qf.shape[:2]
        bk = j1 - j0
        # [dP | E] = dO @ [V; gV]^T in one matmul
        de = torch.matmul(dof, torch.cat([v[:, :, j0:j1], gv[:, :, j0:j1]], -2).transpose(-1, -2))
        de = de.view(B, Hkv, R, i1 - i0, 2 * bk)
        dp, e = de[..., :bk], de[..., bk:]
        if z is not None:
            dp, e = dp * z, e * z
        g = _outer(gcf, gcat_k[:, :, j0:j1], R)
        return p, z, dp, e, g

    # Pass 1: row statistics c = rowsum(P o G), e1 = rowsum(P o (E + G o dP)).
    c = torch.zeros_like(delta)
    e1 = torch.zeros_like(delta)
    for i0, i1, ks in tiles:
        qf, gcf, dof = _rows(qs, i0, i1), _rows(gcat_q, i0, i1), _rows(do, i0, i1)
        for j0, j1 in ks:
            p, z, dp, e, g = tile(i0, i1, j0, j1, qf, gcf, dof)
            c[..., i0:i1] += _rowdot(p, g)
            e1[..., i0:i1] += _rowdot(p, torch.addcmul(e, g, dp))
    erow = e1 - 2 * c * delta

    # Pass 2: per tile Sb, dPb, dS; accumulate Qb, Kb, Vb, dOb.
    qb, kb, vb, dob = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(do)
    for i0, i1, ks in tiles:
        qf, gcf, dof, gqf = _rows(qs, i0, i1), _rows(gcat_q, i0, i1), _rows(do, i0, i1), _rows(gqs, i0, i1)
        cb, db, eb = c[..., i0:i1, None], delta[..., i0:i1, None], erow[..., i0:i1, None]
        qacc, doacc = 0, 0
        for j0, j1 in ks:
            p, z, dp, e, g = tile(i0, i1, j0, j1, qf, gcf, dof)
            t = dp - db
            ds = t * p
            sb = torch.addcmul(e, g, t).addcmul_(dp, cb, value=-1.0).sub_(eb).mul_(p)  # Sb = P o (Pb - e)
            w = g.sub_(cb).mul_(p)  # dPb = P o (G - c)
            if z is not None:
                w.mul_(z)
                p.mul_(z)
            kj = k[:, :, j0:j1]
            qacc = qacc + _qmm(sb, kj) + _qmm(ds, gk[:, :, j0:j1])
            kb[:, :, j0:j1] += _kmm(sb, qf) + _kmm(ds, gqf)  # both pre-scaled
            vb[:, :, j0:j1] += _kmm(w, dof)
            doacc = doacc + _qmm(w, v[:, :, j0:j1]) + _qmm(p, gv[:, :, j0:j1])
        qb[..., i0:i1, :] = qacc
        dob[..., i0:i1, :] = doacc
    return qb * sc, kb, vb, dob


def _bwd_jvp(spec, q, k, v, o, lse, do, qt, kt, vt, dot):
    """Forward-mode derivative of the backward: tangents (qt, kt, vt, dot) -> (dqt, dkt, dvt)."""
    R, sc = q.shape[2], spec.scale
    qs = q * sc
    lse_s = _safe_lse(lse)
    delta = (do * o).sum(-1)
    tiles = list(_tiles(spec))
    scat_q = torch.cat([qt * sc, qs], -1)  # St = [s Qt, s Q] @ [K, Kt]^T
    scat_k = torch.cat([k, kt], -1)
    dcat_q = torch.cat([dot, do], -1)  # dPt = [dOt, dO] @ [V, Vt]^T
    dcat_k = torch.cat([v, vt], -1)

    def tile(i0, i1, j0, j1, qf, scf, dof, dcf):
        p = _probs(spec, qf, k, lse_s, i0, i1, j0, j1, R)
        z = _drop(spec, i0, j0, p.shape, p.device, p.dtype)
        st = _outer(scf, scat_k[:, :, j0:j1], R)
        dp = _outer(dof, v[:, :, j0:j1], R)
        dpt = _outer(dcf, dcat_k[:, :, j0:j1], R)
        if z is not None:
            dp.mul_(z)
            dpt.mul_(z)
        return p, z, st, dp, dpt

    # Pass 1: mu = rowsum(P o St), r = rowsum(P o St o dP) + rowsum(P o dPt).
    mu = torch.zeros_like(delta)
    r = torch.zeros_like(delta)
    for i0, i1, ks in tiles:
        qf, scf, dof, dcf = _rows(qs, i0, i1), _rows(scat_q, i0, i1), _rows(do, i0, i1), _rows(dcat_q, i0, i1)
        for j0, j1 in ks:
            p, z, st, dp, dpt = tile(i0, i1, j0, j1, qf, scf, dof, dcf)
            mu[..., i0:i1] += _rowdot(p, st)
            r[..., i0:i1] += _rowdot(p, dpt.addcmul_(st, dp))
    deltat = r - mu * delta

    # Pass 2.
    dqt, dkt, dvt = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for i0, i1, ks in tiles:
        qf, scf, dof, dcf = _rows(qs, i0, i1), _rows(scat_q, i0, i1), _rows(do, i0, i1), _rows(dcat_q, i0, i1)
        qtf, dotf = _rows(qt, i0, i1), _rows(dot, i0, i1)
        mub, db, dtb = mu[..., i0:i1, None], delta[..., i0:i1, None], deltat[..., i0:i1, None]
        qacc = 0
        for j0, j1 in ks:
            p, z, st, dp, dpt = tile(i0, i1, j0, j1, qf, scf, dof, dcf)
            pt = st.sub_(mub).mul_(p)  # Pt = P o (St - mu)
            t = dp.sub_(db)
            ds = t * p
            dst = torch.addcmul(dpt.sub_(dtb).mul_(p), pt, t)  # dSt = Pt o (dP - D) + P o (dPt - Dt)
            qacc = qacc + _qmm(dst, k[:, :, j0:j1]) + _qmm(ds, kt[:, :, j0:j1])
            dkt[:, :, j0:j1] += _kmm(dst, qf) + _kmm(ds, qtf * sc)
            if z is not None:
                pt.mul_(z)
                p.mul_(z)
            dvt[:, :, j0:j1] += _kmm(pt, dof) + _kmm(p, dotf)
        dqt[..., i0:i1, :] = qacc
    return dqt * sc, dkt, dvt


# ----------------------------------------------------------------------------------------------------------------
# autograd.Functions. Inputs arrive in the caller's dtype; passes run in the acc dtype; results are cast back.


def _up(spec_dtype, *xs):
    return [None if x is None else x.to(spec_dtype) for x in xs]


def _zero_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


class _Attn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec):
        acc = _acc_dtype(q.dtype)
        if spec.backend == "triton":
            o, lse = _triton().fwd(spec, q, k, v)
        else:
            o, lse = _fwd(spec, *_up(acc, q, k, v))
            o = o.to(q.dtype)
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.save_for_forward(q, k, v, o, lse)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        # A Function (not inline ops) so that create_graph records O(T) tensors, and so that forward-mode AD
        # through this backward (dual saved tensors, "mixed" HVPs) uses the tiled jvp below.
        dq, dk, dv = _AttnBackward.apply(q, k, v, o.detach(), lse, do, ctx.spec)
        return dq, dk, dv, None

    @staticmethod
    def jvp(ctx, qt, kt, vt, _spec_t):
        q, k, v, o, lse = ctx.saved_tensors
        acc = _acc_dtype(q.dtype)
        qt, kt, vt = _zero_if_none(qt, q), _zero_if_none(kt, k), _zero_if_none(vt, v)
        ot = _fwd_jvp(ctx.spec, *_up(acc, q, k, v, o), lse, *_up(acc, qt, kt, vt))
        return ot.to(q.dtype)


class _AttnBackward(torch.autograd.Function):
    """(q, k, v, do) -> (dq, dk, dv); o and lse are cached functions of (q, k, v), so they get no gradient:
    the formulas below take their dependence on q, k, v into account."""

    @staticmethod
    def forward(ctx, q, k, v, o, lse, do, spec):
        acc = _acc_dtype(q.dtype)
        if spec.backend == "triton":
            dq, dk, dv = _triton().bwd(spec, q, k, v, o, lse, do)
        else:
            dq, dk, dv = _bwd(spec, *_up(acc, q, k, v, o), lse, do.to(acc))
        ctx.spec = spec
        ctx.save_for_backward(q, k, v, o, lse, do)
        ctx.save_for_forward(q, k, v, o, lse, do)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gq, gk, gv):
        q, k, v, o, lse, do = ctx.saved_tensors
        acc = _acc_dtype(q.dtype)
        gq, gk, gv = _zero_if_none(gq, q), _zero_if_none(gk, k), _zero_if_none(gv, v)
        qb, kb, vb, dob = _bwd_vjp(ctx.spec, *_up(acc, q, k, v, o), lse, *_up(acc, do, gq, gk, gv))
        return qb.to(q.dtype), kb.to(k.dtype), vb.to(v.dtype), None, None, dob.to(do.dtype), None

    @staticmethod
    def jvp(ctx, qt, kt, vt, _ot, _lset, dot, _spec_t):
        q, k, v, o, lse, do = ctx.saved_tensors
        acc = _acc_dtype(q.dtype)
        qt, kt, vt, dot = (_zero_if_none(t, x) for t, x in ((qt, q), (kt, k), (vt, v), (dot, do)))
        dqt, dkt, dvt = _bwd_jvp(ctx.spec, *_up(acc, q, k, v, o), lse, *_up(acc, do, qt, kt, vt, dot))
        return dqt.to(q.dtype), dkt.to(k.dtype), dvt.to(v.dtype)


def _dense(spec, q, k, v):
    """The same attention (masks, fully masked rows -> 0, dropout Z from spec.seed) as differentiable torch ops on
    the whole S: autograd supplies the double backward and jvp. q (B, Hkv, R, Tq, D); returns (B, Hkv, R, Tq, Dv)."""
    dtype = q.dtype
    q, k, v = _up(_acc_dtype(dtype), q, k, v)
    s = spec.scale * torch.matmul(q, k.unsqueeze(2).transpose(-1, -2))
    if spec.bias is not None:
        s = s + spec.bias
    keep = spec.keep
    if spec.causal:
        tril = torch.ones(spec.tq, spec.tk, dtype=torch.bool, device=q.device).tril()
        keep = tril if keep is None else keep & tril
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
        rows = keep.any(-1, keepdim=True)  # a row with no visible key gives 0 (torch.softmax would give NaN)
        if not bool(rows.all()):
            s = s.masked_fill(~rows, 0.0)
    p = torch.softmax(s, -1)
    if keep is not None and not bool(rows.all()):
        p = p * rows
    drop = _drop(spec, 0, 0, p.shape, p.device, p.dtype)
    if drop is not None:
        p = p * drop
    return torch.matmul(p, v.unsqueeze(2)).to(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Public API


def _normalize_mask(attn_mask, B, H, Hkv, Tq, Tk):
    """4-D (or 2-D) bool (True = attend) or additive float mask -> (keep, bias), 5-D (B', Hkv', R', Tq, Tk) views.

    Additive entries at or below half the dtype's most negative value (HF's finfo.min, or -inf) are hard masks:
    rows without any kept key give 0. Other values are kept as an additive bias (not differentiated)."""
    if attn_mask is None:
        return None, None
    m = attn_mask
    if m.dim() == 2:
        m = m[None, None]
    if m.dim() != 4:
        raise ValueError(f"attention mask must be 2-D or 4-D, got shape {tuple(attn_mask.shape)}")
    Bm, Hm, tq, tk = m.shape
    if Bm not in (1, B) or Hm not in (1, H) or tq not in (1, Tq) or tk not in (1, Tk):
        raise ValueError(
            f"attention mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, Tq, Tk) = {(B, H, Tq, Tk)}")
    m = m.expand(Bm, Hm, Tq, Tk)
    if m.dtype == torch.bool:
        keep, bias = m, None
    elif m.is_floating_point():
        m = m.detach()
        keep = m > torch.finfo(m.dtype).min / 2
        bias = torch.where(keep, m, torch.zeros((), dtype=m.dtype, device=m.device))
        if not bool(bias.any()):
            bias = None
    else:
        raise TypeError(f"attention mask must be bool or floating point, got {m.dtype}")
    if bool(keep.all()):
        keep = None

    def to5(x):
        if x is None:
            return None
        return x[:, :, None] if Hm == 1 else x.reshape(Bm, Hkv, H // Hkv, Tq, Tk)

    return to5(keep), to5(bias)


def _pick_backend(backend, query, dropout_p):
    """"torch": the PyTorch tiled passes (any device). "triton": Triton kernels for forward and backward (CUDA, or
    CPU under TRITON_INTERPRET=1); second-order pieces stay PyTorch. "auto": triton on CUDA when available."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "torch":
        return "torch"
    ok_dtype = query.dtype in (torch.float32, torch.bfloat16, torch.float16) and query.shape[-1] <= 256
    if backend == "auto":
        if query.is_cuda and dropout_p == 0.0 and ok_dtype and importlib.util.find_spec("triton") is not None:
            return "triton"
        return "torch"
    if not (query.is_cuda or triton_interpreting()):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if dropout_p != 0.0 or not ok_dtype:
        raise ValueError(f"backend='triton' supports dropout_p=0, float32/bf16/fp16 and head dim <= 256; got "
                         f"dropout_p={dropout_p}, {query.dtype}, head dim {query.shape[-1]} (use backend='torch')")
    return "triton"


def tiled_attention(query, key, value, attn_mask=None, *, is_causal=False, scale=None, dropout_p=0.0,
                    block_q=None, block_k=None, seed=None, backend="auto", dense=None):
    """softmax(scale * q k^T + mask) v with O(T) saved memory and exact first/second-order and forward-mode AD.

    query (B, H, Tq, D); key (B, Hkv, Tk, D); value (B, Hkv, Tk, Dv) with H % Hkv == 0 (GQA without repeat_kv).
    attn_mask: None, bool (True = attend) or additive float, broadcastable to (B, H, Tq, Tk); constant.
    is_causal: key j visible to query i iff j <= i (top-left aligned, like SDPA); combined with attn_mask.
    scale: default 1/sqrt(D). dropout_p: on the probabilities; the mask comes from `seed` (default: drawn from
    torch's global RNG, so RNG-state replays reproduce it). backend: see _pick_backend. dense: None = the dense
    path (plain torch ops, T x T saved) when Tq*Tk <= DENSE_MAX_SCORES on the torch backend and no block size was
    given; True / False force it on / off.
    Returns (B, H, Tq, Dv) in the input dtype.
    """
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(f"q, k, v must be 4-D (B, H, T, D); got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    B, H, Tq, D = query.shape
    Bk, Hkv, Tk, Dk = key.shape
    if (Bk, Dk) != (B, D) or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"shape mismatch: q {tuple(query.shape)}, k {tuple(key.shape)}, v {tuple(value.shape)}")
    if H % Hkv != 0:
        raise ValueError(f"num heads {H} is not a multiple of num key/value heads {Hkv}")
    if not (query.dtype == key.dtype == value.dtype) or query.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share one of {_SUPPORTED_DTYPES}; got {query.dtype}, {key.dtype}, {value.dtype}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**62, (1,)).item())
    keep, bias = _normalize_mask(attn_mask, B, H, Hkv, Tq, Tk)
    if bias is not None:
        bias = bias.to(_acc_dtype(query.dtype))
    spec = _Spec(
        scale=float(scale) if scale is not None else 1.0 / math.sqrt(D), causal=bool(is_causal),
        block_q=int(block_q or BLOCK_Q), block_k=int(block_k or BLOCK_K), dropout_p=float(dropout_p),
        seed=seed, keep=keep, bias=bias, tq=Tq, tk=Tk, backend=_pick_backend(backend, query, dropout_p))
    q5 = query.reshape(B, Hkv, H // Hkv, Tq, D)
    if dense is None:
        dense = (spec.backend == "torch" and block_q is None and block_k is None and Tq * Tk <= DENSE_MAX_SCORES)
    o = _dense(spec, q5, key, value) if dense else _Attn.apply(q5, key, value, spec)  # (B, Hkv, R, Tq, Dv)
    return o.reshape(B, H, Tq, value.shape[-1])

