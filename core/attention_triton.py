"""Triton kernels for the first-order passes of core/attention_ops.py (CUDA; CPU under TRITON_INTERPRET=1).

What runs where (the autograd structure is attention_ops' _Attn / _AttnBackward):
  forward  (o, lse)            Triton `_fwd_kernel`: online softmax over key blocks, one program per
                               (query block, query head); fp32 accumulation.
  backward (dq, dk, dv)        Triton `_bwd_dkdv_kernel` (one program per key block and kv head, looping over the
                               R query heads of its group and the query blocks: no atomics) and `_bwd_dq_kernel`.
  double backward, jvp of the forward, jvp of the backward
                               the PyTorch tiled passes of attention_ops (`_bwd_vjp`, `_fwd_jvp`, `_bwd_jvp`):
                               same formulas, same O(T) saved memory, torch matmuls on the tensors' device.
Not in Triton (attention_ops falls back to the PyTorch passes): dropout > 0 (its masks come from per-tile
torch generators), float64, head dims > 256.

Launchers only: `fwd` and `bwd` take attention_ops' spec (scale, causal, keep, bias) and 5-D (B, Hkv, R, T, D)
tensors. This module imports triton and nothing of ours; attention_ops imports it lazily (backend="triton"), so
importing mamlen.core never needs triton.
"""
import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# the interpreter runs every program in Python: small tiles keep CPU tests fast
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK_M = 16 if _INTERPRETING else 64
BLOCK_N = 16 if _INTERPRETING else 64


@triton.jit
def _tile_scores(q, K, BIAS, KEEP, offs_m, offs_n, offs_d, b, hk, r, Tq, Tk, D,
                 sm_b, sm_h, sm_r, sm_i, sm_j, sb_b, sb_h, sb_r, sb_i, sb_j,
                 HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr):
    """Masked scores of one tile: q (BM, BD) pre-scaled fp32; K points at this kv head."""
    k = tl.load(K + offs_n[:, None] * D + offs_d[None, :],
                mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k))
    valid = (offs_n[None, :] < Tk) & (offs_m[:, None] < Tq)
    if HAS_BIAS:
        bptr = BIAS + b * sb_b + hk * sb_h + r * sb_r + offs_m[:, None] * sb_i + offs_n[None, :] * sb_j
        s += tl.load(bptr, mask=valid, other=0.0).to(tl.float32)
    if HAS_KEEP:
        kptr = KEEP + b * sm_b + hk * sm_h + r * sm_r + offs_m[:, None] * sm_i + offs_n[None, :] * sm_j
        valid = valid & (tl.load(kptr, mask=valid, other=0) != 0)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KEEP, BIAS, scale, Tq, Tk, D, DV, HKV, R,
                sm_b, sm_h, sm_r, sm_i, sm_j, sb_b, sb_h, sb_r, sb_i, sb_j,
                HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)  # over (B, Hkv, R) query heads
    b = pid_bh // (HKV * R)
    hk = (pid_bh // R) % HKV
    r = pid_bh % R
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    Q += pid_bh * Tq * D
    K += (pid_bh // R) * Tk * D
    V += (pid_bh // R) * Tk * DV
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D), other=0.0).to(tl.float32) * scale
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    end_n = Tk
    if CAUSAL:
        end_n = tl.minimum(Tk, (pid_m + 1) * BM)
    for start_n in range(0, end_n, BN):
        offs_n = start_n + tl.arange(0, BN)
        s = _tile_scores(q, K, BIAS, KEEP, offs_m, offs_n, offs_d, b, hk, r, Tq, Tk, D,
                         sm_b, sm_h, sm_r, sm_i, sm_j, sb_b, sb_h, sb_r, sb_i, sb_j, HAS_KEEP, HAS_BIAS, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all masked so far: exp(-inf - 0) = 0
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + offs_n[:, None] * DV + offs_dv[None, :],
                    mask=(offs_n[:, None] < Tk) & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v)
        m_i = m_new
    lse = m_i + tl.log(l_i)
    l_safe = tl.where(l_i > 0, l_i, 1.0)
    o = tl.where(l_i[:, None] > 0, acc / l_safe[:, None], 0.0)  # fully masked rows: 0
    rows = offs_m < Tq
    tl.store(O + pid_bh * Tq * DV + offs_m[:, None] * DV + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=rows[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + pid_bh * Tq + offs_m, lse, mask=rows)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV_, KEEP, BIAS, scale, Tq, Tk, D, DV, HKV, R,
                     sm_b, sm_h, sm_r, sm_i, sm_j, sb_b, sb_h, sb_r, sb_i, sb_j,
                     HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)  # over (B, Hkv)
    b = pid_bk // HKV
    hk = pid_bk % HKV
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    K += pid_bk * Tk * D
    V += pid_bk * Tk * DV
    v = tl.load(V + offs_n[:, None] * DV + offs_dv[None, :],
                mask=(offs_n[:, None] < Tk) & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    start_m0 = 0
    if CAUSAL:
        start_m0 = (pid_n * BN // BM) * BM
    for r in range(0, R):
        qh = pid_bk * R + r
        for start_m in range(start_m0, Tq, BM):
            offs_m = start_m + tl.arange(0, BM)
            rows = offs_m < Tq
            q = tl.load(Q + qh * Tq * D + offs_m[:, None] * D + offs_d[None, :],
                        mask=rows[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32) * scale
            do = tl.load(DO + qh * Tq * DV + offs_m[:, None] * DV + offs_dv[None, :],
                         mask=rows[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
            lse = tl.load(LSE + qh * Tq + offs_m, mask=rows, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(DELTA + qh * Tq + offs_m, mask=rows, other=0.0)
            s = _tile_scores(q, K, BIAS, KEEP, offs_m, offs_n, offs_d, b, hk, r, Tq, Tk, D,
                             sm_b, sm_h, sm_r, sm_i, sm_j, sb_b, sb_h, sb_r, sb_i, sb_j, HAS_KEEP, HAS_BIAS, CAUSAL)
            p = tl.exp(s - lse[:, None])
            dv += tl.dot(tl.trans(p), do)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds), q)  # q is pre-scaled: s dS^T Q
    tl.store(DK + pid_bk * Tk * D + offs_n[:, None] * D + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < D))
    tl.store(DV_ + pid_bk * Tk * DV + offs_n[:, None] * DV + offs_dv[None, :], dv.to(DV_.dtype.element_ty),
             mask=(offs_n[:, None] < Tk) & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KEEP, BIAS, scale, Tq, Tk, D, DV, HKV, R,
                   sm_b, sm_h, sm_r, sm_i, sm_j, sb_b, sb_h, sb_r, sb_i, sb_j,
                   HAS_KEEP: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // (HKV * R)
    hk = (pid_bh // R) % HKV
    r = pid_bh % R
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    rows = offs_m < Tq
    K += (pid_bh // R) * Tk * D
    V += (pid_bh // R) * Tk * DV
    q = tl.load(Q + pid_bh * Tq * D + offs_m[:, None] * D + offs_d[None, :],
                mask=rows[:, None] & (offs_d[None, :] < D), other=0.0).to(tl.float32) * scale
    do = tl.load(DO + pid_bh * Tq * DV + offs_m[:, None] * DV + offs_dv[None, :],
                 mask=rows[:, None] & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
    lse = tl.load(LSE + pid_bh * Tq + offs_m, mask=rows, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)
    delta = tl.load(DELTA + pid_bh * Tq + offs_m, mask=rows, other=0.0)
    dq = tl.zeros([BM, BD], tl.float32)
    end_n = Tk
    if CAUSAL:
        end_n = tl.minimum(Tk, (pid_m + 1) * BM)
    for start_n in range(0, end_n, BN):
        offs_n = start_n + tl.arange(0, BN)
        s = _tile_scores(q, K, BIAS, KEEP, offs_m, offs_n, offs_d, b, hk, r, Tq, Tk, D,
                         sm_b, sm_h, sm_r, sm_i, sm_j, sb_b, sb_h, sb_r, sb_i, sb_j, HAS_KEEP, HAS_BIAS, CAUSAL)
        p = tl.exp(s - lse[:, None])
        v = tl.load(V + offs_n[:, None] * DV + offs_dv[None, :],
                    mask=(offs_n[:, None] < Tk) & (offs_dv[None, :] < DV), other=0.0).to(tl.float32)
        k = tl.load(K + offs_n[:, None] * D + offs_d[None, :],
                    mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < D), other=0.0).to(tl.float32)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds, k)
    tl.store(DQ + pid_bh * Tq * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=rows[:, None] & (offs_d[None, :] < D))


def _mask_args(spec, device):
    """keep (as uint8) and bias tensors, or 1-element dummies, with their 5-D strides (0 on broadcast dims)."""
    def strides(x):
        return [0 if x.shape[i] == 1 else x.stride(i) for i in range(5)]

    keep, bias = spec.keep, spec.bias
    keep = keep.view(torch.uint8) if keep is not None else None
    sm = strides(keep) if keep is not None else [0] * 5
    sb = strides(bias) if bias is not None else [0] * 5
    kp = keep if keep is not None else torch.zeros(1, dtype=torch.uint8, device=device)
    bp = bias if bias is not None else torch.zeros(1, dtype=torch.float32, device=device)
    return kp, bp, sm, sb, dict(HAS_KEEP=keep is not None, HAS_BIAS=bias is not None, CAUSAL=spec.causal)


def _blocks(D, DV):
    bd = max(16, triton.next_power_of_2(D))
    bdv = max(16, triton.next_power_of_2(DV))
    return bd, bdv


def supported(spec, q):
    return spec.dropout_p == 0.0 and q.dtype in SUPPORTED_DTYPES and q.shape[-1] <= 256


def fwd(spec, q, k, v):
    """(o, lse) like attention_ops._fwd; q (B, Hkv, R, Tq, D), k/v (B, Hkv, Tk, D/Dv); o in q's dtype."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, Hkv, R, Tq, D = q.shape
    Tk, DV = k.shape[2], v.shape[-1]
    o = torch.empty(B, Hkv, R, Tq, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hkv, R, Tq, dtype=torch.float32, device=q.device)
    kp, bp, sm, sb, flags = _mask_args(spec, q.device)
    bd, bdv = _blocks(D, DV)
    grid = (triton.cdiv(Tq, BLOCK_M), B * Hkv * R)
    _fwd_kernel[grid](q, k, v, o, lse, kp, bp, spec.scale, Tq, Tk, D, DV, Hkv, R, *sm, *sb, **flags,
                      BM=BLOCK_M, BN=BLOCK_N, BD=bd, BDV=bdv)
    return o, lse


def bwd(spec, q, k, v, o, lse, do):
    """(dq, dk, dv) like attention_ops._bwd, in the inputs' dtypes."""
    q, k, v, do = q.contiguous(), k.contiguous(), v.contiguous(), do.contiguous()
    B, Hkv, R, Tq, D = q.shape
    Tk, DV = k.shape[2], v.shape[-1]
    delta = (do.float() * o.float()).sum(-1).contiguous()
    lse = lse.float().contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kp, bp, sm, sb, flags = _mask_args(spec, q.device)
    bd, bdv = _blocks(D, DV)
    flags.update(BM=BLOCK_M, BN=BLOCK_N, BD=bd, BDV=bdv)
    _bwd_dkdv_kernel[(triton.cdiv(Tk, BLOCK_N), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, kp, bp, spec.scale, Tq, Tk, D, DV, Hkv, R, *sm, *sb, **flags)
    _bwd_dq_kernel[(triton.cdiv(Tq, BLOCK_M), B * Hkv * R)](
        q, k, v, do, lse, delta, dq, kp, bp, spec.scale, Tq, Tk, D, DV, Hkv, R, *sm, *sb, **flags)
    return dq, dk, dv

