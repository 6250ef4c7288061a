"""One inner step of the meta-step and its adjoint, on flat buffers, chunk by chunk (DESIGN.md "The meta-step").

    forward   (φ_j, m_j, v_j) = inner step at (φ_{j-1}, g_j, m_{j-1}, v_{j-1})            (SGD: φ_j only)
    adjoint   ḡ_j, and (p̄, m̄, v̄) = ∂L/∂(φ_j, m_j, v_j)  →  ∂L/∂(φ_{j-1}, m_{j-1}, v_{j-1}) without the H·ḡ term

The moments a step starts from are a `MomentSource`, read MOMENT_CHUNK elements at a time: the shared moments
(OuterState: views at 32 bits, dequantised chunks at 8 bits, so no whole float copy of 8-bit moments exists), zeros
(moments="separate"), or the m_{j-1}, v_{j-1} stored by the previous inner step. Step 1 is therefore the same code
as every other step. The adjoint recomputes m_j, v_j from its step's source (one fused elementwise pass per chunk,
bit-identical to the forward's) instead of keeping them, so a K-step task stores m_1..m_{K-1} (the sources of
steps 2..K) and nothing for step K's output. ∂L/∂m, ∂L/∂v are a MomentSource too: zeros at j = K, then the stored
m_{j-1}, v_{j-1} that the adjoint of step j overwrites (each chunk is read before it is written).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from mamlen import kernels
from mamlen.core.loss import RngState
from mamlen.core.quantized_moments import chunks

# elements per chunk where moments are read piecewise (a multiple of the 8-bit block; 4 MiB of float32)
MOMENT_CHUNK = 1 << 20


# -- where the moments of a step come from --------------------------------------------------------------------
class MomentSource:
    """m, v at the start of an inner step, read chunk by chunk."""

    def read(self, i: int, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, v) elements [start, start + length) of flat buffer i, in the state dtype; `start` is a multiple of
        MOMENT_CHUNK. The tensors may be views of the source's storage: read them before writing there."""
        raise NotImplementedError


class SharedMoments(MomentSource):
    """The outer optimizer's m, v (core/sharding.py OuterState: full, gathered shards, or 8-bit codes)."""

    def __init__(self, opt_state):
        self.opt_state = opt_state

    def read(self, i, start, length):
        return self.opt_state.moments_chunk(i, start, length)


class ZeroMoments(MomentSource):
    """m = v = 0: one read-only zero chunk per state dtype serves every buffer, task and step."""

    def __init__(self, state_dtypes: list[torch.dtype], device):
        self.state_dtypes, self.device = state_dtypes, device
        self._chunk: dict[torch.dtype, torch.Tensor] = {}

    def read(self, i, start, length):
        dtype = self.state_dtypes[i]
        z = self._chunk.get(dtype)
        if z is None or z.numel() < length:
            z = self._chunk[dtype] = torch.zeros(max(length, MOMENT_CHUNK), dtype=dtype, device=self.device)
        return z[:length], z[:length]

    @property
    def nbytes(self) -> int:
        return sum(z.numel() * z.element_size() for z in self._chunk.values())


@dataclass
class StoredMoments(MomentSource):
    """m, v as whole flat buffers (state dtype) that the caller owns and the adjoint may overwrite."""
    m: list
    v: list

    def read(self, i, start, length):
        return self.m[i][start:start + length], self.v[i][start:start + length]


# -- the inner optimizer ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InnerRule:
    """The inner optimizer of a MetaConfig: "adamw" or "sgd", α = lr, λᵢ = weight_decay."""
    optimizer: str
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def of(cls, config) -> "InnerRule":
        b1, b2 = config.betas
        return cls(config.inner_optimizer, config.inner_lr, b1, b2, config.eps, config.inner_weight_decay)

    @property
    def has_moments(self) -> bool:
        return self.optimizer == "adamw"

    def _adamw(self, step: int) -> dict:
        return dict(lr=self.lr, beta1=self.beta1, beta2=self.beta2, eps=self.eps, weight_decay=self.weight_decay,
                    step=step)


@dataclass
class InnerStep:
    """Inner step j of a task, as the reverse pass needs it (DESIGN.md notation)."""
    phi: list                         # φ_{j-1}: where g_j was taken and H_{S_j} is evaluated
    g: list                           # g_j = ∇L_{S_j}(φ_{j-1}); the adjoint writes ḡ over it where it can
    moments: Optional[MomentSource]   # m_{j-1}, v_{j-1} (AdamW): shared or zero at j = 1, stored after
    step: int                         # τ = t + j, the bias-correction count
    rng: RngState                     # the dropout masks of L_{S_j}
    batch: Any                        # S_j, as the HVP takes it
    kept: Optional[Any] = None        # inner_graph="keep": hvp.KeptGraph of g_j, which owns g_j's storage


@dataclass
class Adjoint:
    """The reverse recursion's state after step j: p̄ = ∂L/∂φ_j and (AdamW) m̄, v̄ = ∂L/∂m_j, ∂L/∂v_j."""
    p_bar: list                       # state dtype
    moments: Optional[MomentSource]   # ZeroMoments at j = K


def forward(rule: InnerRule, phi: list, g: list, moments: Optional[MomentSource], *, step: int,
            keep_moments: bool) -> tuple[list, Optional[StoredMoments]]:
    """(φ_j, m_j and v_j as StoredMoments if `keep_moments` — the next step starts from them — else None).
    φ_j is fresh, in φ's dtype; nothing is mutated. SGD ignores `moments`."""
    if not rule.has_moments:
        return [kernels.inner_sgd_forward(p, gi, lr=rule.lr, weight_decay=rule.weight_decay)
                for p, gi in zip(phi, g)], None
    hp = rule._adamw(step)
    phi_next, m_next, v_next = [], [], []
    for i, (p, gi) in enumerate(zip(phi, g)):
        sd = kernels.state_dtype(p.dtype)
        pj = torch.empty_like(p)
        if keep_moments:
            mj, vj = p.new_empty(p.numel(), dtype=sd), p.new_empty(p.numel(), dtype=sd)
        else:  # m_j, v_j are recomputed by the adjoint: one chunk of scratch
            c = min(p.numel(), MOMENT_CHUNK)
            mj, vj = p.new_empty(c, dtype=sd), p.new_empty(c, dtype=sd)
        for s, n in chunks(p.numel(), MOMENT_CHUNK):
            m_prev, v_prev = moments.read(i, s, n)
            mo, vo = (mj[s:s + n], vj[s:s + n]) if keep_moments else (mj[:n], vj[:n])
            kernels.inner_adamw_forward(p[s:s + n], gi[s:s + n], m_prev, v_prev, **hp, out=(pj[s:s + n], mo, vo))
        phi_next.append(pj)
        m_next.append(mj)
        v_next.append(vj)
    return phi_next, (StoredMoments(m_next, v_next) if keep_moments else None)


def adjoint_(rule: InnerRule, rec: InnerStep, adj: Adjoint) -> list:
    """One iteration of DESIGN.md's reverse recursion without the Hessian term: returns ḡ_j and moves `adj` from
    step j to step j-1 (p̄ ← c·p̄, m̄ ← β1·m̄, v̄ ← β2·v̄). The caller then adds H_{S_j}(φ_{j-1})·ḡ into adj.p_bar.

    Nothing parameter-sized is allocated (AdamW): p̄ is updated in place, ḡ is written over g_j (unless g_j is
    narrower than the state dtype; a kept graph's flat g_j is a cat whose backward never reads it), and
    ∂L/∂m_{j-1}, ∂L/∂v_{j-1} over m_{j-1}, v_{j-1} when they were stored (j ≥ 2; at j = 1 they are the shared
    moments or zeros and nothing needs their adjoint).
    """
    if not rule.has_moments:  # SGD: ḡ = -α p̄, p̄ ← c·p̄ (out of place; no moments)
        outs = [kernels.inner_sgd_adjoint(pb, lr=rule.lr, weight_decay=rule.weight_decay) for pb in adj.p_bar]
        g_bar, adj.p_bar = (list(x) for x in zip(*outs))
        return g_bar
    hp = rule._adamw(rec.step)
    src = rec.moments
    dst = src if isinstance(src, StoredMoments) else None
    g_bar = []
    for i, (p0, gi, pb) in enumerate(zip(rec.phi, rec.g, adj.p_bar)):
        gb = gi if gi.dtype == pb.dtype else torch.empty_like(pb)
        c = min(pb.numel(), MOMENT_CHUNK)
        pj, mj, vj = p0.new_empty(c), pb.new_empty(c), pb.new_empty(c)  # φ_j (unused), m_j, v_j of one chunk
        for s, n in chunks(pb.numel(), MOMENT_CHUNK):
            m_prev, v_prev = src.read(i, s, n)
            kernels.inner_adamw_forward(p0[s:s + n], gi[s:s + n], m_prev, v_prev, **hp,
                                        out=(pj[:n], mj[:n], vj[:n]))
            mb, vb = adj.moments.read(i, s, n)
            # m_{j-1}'s chunk is consumed: ∂L/∂m_{j-1} may take its place
            mo, vo = dst.read(i, s, n) if dst is not None else (mj[:n], vj[:n])
            kernels.inner_adamw_adjoint(pb[s:s + n], mb, vb, gi[s:s + n], mj[:n], vj[:n], **hp,
                                        out=(gb[s:s + n], pb[s:s + n], mo, vo))
        g_bar.append(gb)
    adj.moments = dst
    return g_bar
