"""The outer optimizer state, optionally sharded over ranks (ZeRO stage 1), 8-bit, with float32 master weights.

`OuterState` owns what the outer step needs besides θ: the shared moments m, v (DESIGN.md), the float32 master
copy of bfloat16 weights, and the reduction of the meta-gradient. Every option is a MetaConfig field:

    shard_state=True   rank r of W owns the contiguous slice [r·S, (r+1)·S) of every flat buffer
                       (S = ceil(n / (W·256))·256: shards start on 8-bit blocks, so quantisation does not
                       depend on W): its slice of m, v, of the master copy, and of the outer update.
    moments_bits=8     m, v as bitsandbytes blockwise 8-bit codes (core/quantized_moments.py).
    master_weights     bfloat16 parameters, float32 master copy (core/master_weights.py).

One meta-step, sharded (W ranks; every arrow is a torch.distributed collective, gloo or nccl):

    begin    shared moments: all_gather_single of the m, v shards (8-bit: of the codes and absmax) —
             every task's inner step reads the *full* m, v, so they exist in full during the task loop
    tasks    each rank accumulates its tasks' G_i into a full-length (padded) buffer
    reduce   reduce_scatter_single(G) → this rank's slice of Σ G_i (gloo on CPU has it in torch 2.13),
             all_reduce of the four statistics; the global norm = √(all_reduce Σ over slices of g²)
    outer    fused kernels.adamw_step_ on the own slices of θ (or its master copy), G, m, v
             (8-bit: dequantise → step → requantise, chunk by chunk)
    gather   all_gather_single of the updated parameter slices into every rank's flat buffer

Memory per parameter, at rest and at the peak of a step: bench/memory_model.py. Checkpoints hold the full
(gathered, dequantised) state, so they load at any world size and with or without the options.
Without any option this is exactly the engine's unsharded float32 state (same buffers, same kernel calls).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from mamlen import kernels
from mamlen.core import distributed
from mamlen.core.master_weights import MasterWeights
from mamlen.core.quantized_moments import BLOCK, QuantizedBuffer, chunks

# torch 2.13 renamed the *_tensor collectives to *_single (the old names warn)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class ShardLayout:
    """Where rank `rank` of `world` sits in a flat buffer of `numel` elements."""
    numel: int
    world: int
    rank: int

    @property
    def shard(self) -> int:
        """S, the (padded) shard length; the whole buffer when world = 1."""
        if self.world == 1:
            return self.numel
        return -(-self.numel // (self.world * BLOCK)) * BLOCK

    @property
    def padded(self) -> int:
        return self.shard * self.world

    @property
    def start(self) -> int:
        """Offset of this rank's shard in the padded buffer."""
        return self.rank * self.shard

    @property
    def lo(self) -> int:
        return min(self.start, self.numel)

    @property
    def hi(self) -> int:
        return min(self.start + self.shard, self.numel)

    @property
    def local(self) -> int:
        """Real (unpadded) elements this rank owns: hi - lo (0 for a rank past the end of a small buffer)."""
        return self.hi - self.lo


def gather_(out_padded: torch.Tensor, shard: torch.Tensor, group=None) -> torch.Tensor:
    """all_gather_single of equal-length shards into `out_padded` (world · len(shard) elements)."""
    _all_gather(out_padded, shard, group=group)
    return out_padded


def gather_flat_(flat: torch.Tensor, layout: ShardLayout, group=None) -> None:
    """Every rank's slice [lo, hi) of `flat` → all of `flat`, in place (the parameter all-gather)."""
    S = layout.shard
    if layout.padded == flat.numel():  # no padding: gather in place (the input is this rank's slice)
        _all_gather(flat, flat[layout.start:layout.start + S], group=group)
        return
    buf = flat.new_empty(layout.padded)  # transient; the padding tail of the last shard is never read
    buf[layout.start:layout.start + layout.local].copy_(flat[layout.lo:layout.hi])
    _all_gather(buf, buf[layout.start:layout.start + S], group=group)
    flat.copy_(buf[:flat.numel()])


class OuterState:
    """m, v (full or this rank's shard; float or 8-bit), master weights, and the meta-gradient reduction."""

    def __init__(self, arena, config, group=None):
        self.arena, self.config, self.group = arena, config, group
        sharded = bool(config.shard_state) and distributed.active(group)
        self.world = dist.get_world_size(group) if sharded else 1
        self.rank = dist.get_rank(group) if sharded else 0
        self.sharded = self.world > 1
        self.bits = config.moments_bits
        self.layouts = [ShardLayout(f.numel(), self.world, self.rank) for f in arena.flats]
        self.state_dtypes = [kernels.state_dtype(f.dtype) for f in arena.flats]
        dev = arena.device
        if self.bits == 32:
            self.m = [torch.zeros(L.shard, dtype=sd, device=dev) for L, sd in zip(self.layouts, self.state_dtypes)]
            self.v = [torch.zeros(L.shard, dtype=sd, device=dev) for L, sd in zip(self.layouts, self.state_dtypes)]
        else:
            self.m = [QuantizedBuffer(L.shard, signed=True, device=dev) for L in self.layouts]
            self.v = [QuantizedBuffer(L.shard, signed=False, device=dev) for L in self.layouts]
        self.master = (MasterWeights(arena.flats, [(L.lo, L.hi) for L in self.layouts])
                       if config.master_weights else None)
        self._full = None  # (m, v) gathered for the duration of one meta-step (sharded, shared moments)

    # -- sizes --------------------------------------------------------------------------------------------
    def nbytes(self) -> dict:
        """Bytes this rank holds at rest: {"moments": .., "master": ..}."""
        if self.bits == 32:
            mom = sum(t.numel() * t.element_size() for t in self.m + self.v)
        else:
            mom = sum(q.nbytes for q in self.m + self.v)
        return {"moments": mom, "master": self.master.nbytes if self.master else 0}

    # -- the moments the inner steps read -----------------------------------------------------------------
    @contextlib.contextmanager
    def materialized(self):
        """For one meta-step: make the full shared moments available to `moments_chunk` (a collective when
        sharded: every rank enters it once per meta-step, whatever its number of tasks)."""
        if not (self.sharded and self.config.moments == "shared"):
            yield
            return
        if self.bits == 32:
            full = [gather_(m.new_empty(L.padded), m, self.group) for m, L in zip(self.m, self.layouts)]
            full_v = [gather_(v.new_empty(L.padded), v, self.group) for v, L in zip(self.v, self.layouts)]
            # the own shard becomes a view of the gathered buffer: no second copy of it during the step
            self.m = [f[L.start:L.start + L.shard] for f, L in zip(full, self.layouts)]
            self.v = [f[L.start:L.start + L.shard] for f, L in zip(full_v, self.layouts)]
            self._full = (full, full_v)
        else:
            self._full = tuple([self._gather_quantized(q, L) for q, L in zip(qs, self.layouts)]
                               for qs in (self.m, self.v))
        try:
            yield
        finally:
            if self.bits == 32:  # back to shard-sized storage; the full buffers are freed with self._full
                self.m = [m.clone() for m in self.m]
                self.v = [v.clone() for v in self.v]
            self._full = None

    def _gather_quantized(self, q: QuantizedBuffer, L: ShardLayout) -> QuantizedBuffer:
        codes = gather_(q.codes.new_empty(L.padded), q.codes, self.group)
        absmax = gather_(q.absmax.new_empty(L.padded // BLOCK), q.absmax, self.group)
        return QuantizedBuffer(L.padded, signed=q.signed, device=codes.device, codes=codes, absmax=absmax)

    def moments_chunk(self, i: int, start: int, length: int):
        """Elements [start, start + length) of the shared m, v of flat buffer i, in the state dtype: views of the
        (gathered) state at 32 bits, fresh dequantised tensors at 8 bits (start on a multiple of BLOCK). The
        engine reads them chunk by chunk, so no full-length float copy of 8-bit moments ever exists."""
        if self.sharded and self._full is None:
            raise RuntimeError("OuterState.moments_chunk: sharded shared moments are only available inside "
                               "`materialized()` (MetaEngine._meta_gradient enters it)")
        ms, vs = self._full if self.sharded else (self.m, self.v)
        if self.bits == 32:
            return ms[i][start:start + length], vs[i][start:start + length]
        sd = self.state_dtypes[i]
        return ms[i].dequantize(start, length, sd), vs[i].dequantize(start, length, sd)

    # -- the meta-gradient reduction ----------------------------------------------------------------------
    def reduce_(self, G: list[torch.Tensor], stats: torch.Tensor) -> list[torch.Tensor]:
        """Σ over ranks of G and stats ([tasks, ...]); returns G / tasks — this rank's shard when sharded."""
        if not self.sharded:
            distributed.all_reduce_sum_(G + [stats], self.group)
            out = G
        else:
            out = []
            for g, L in zip(G, self.layouts):
                if g.numel() == L.padded:
                    padded = g
                else:  # the engine accumulates into the first task's G_i: pad a copy (after the tasks' peak)
                    padded = g.new_zeros(L.padded)
                    padded[:L.numel].copy_(g)
                shard = g.new_empty(L.shard)
                _reduce_scatter(shard, padded, group=self.group)
                out.append(shard)
            # the caller rebinds its G to the returned shards: the full-length accumulators die then
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=self.group)
        n = stats[0].item()
        for acc in out:
            acc.div_(n)
        return out

    def full(self, G: list[torch.Tensor]) -> list[torch.Tensor]:
        """Full-length G from what `reduce_` returned (an all-gather when sharded)."""
        if not self.sharded:
            return G
        return [gather_(g.new_empty(L.padded), g, self.group)[:L.numel] for g, L in zip(G, self.layouts)]

    def grad_norm(self, G: list[torch.Tensor]) -> float:
        """Global L2 norm of the (reduced) meta-gradient; the same value on every rank."""
        if not self.sharded:
            return math.sqrt(sum(float(torch.linalg.vector_norm(g)) ** 2 for g in G))
        sq = torch.tensor([sum(float(torch.linalg.vector_norm(g)) ** 2 for g in G)], dtype=torch.float64,
                          device=self.arena.device)
        dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.group)
        return math.sqrt(sq.item())

    # -- the outer update ---------------------------------------------------------------------------------
    def apply_(self, G: list[torch.Tensor], step: int) -> None:
        """Outer AdamW/SGD (DESIGN.md) on this rank's slices, then the parameter all-gather. `step` = t after
        the increment. G is what `reduce_` returned (possibly clipped)."""
        cfg = self.config
        b1, b2 = cfg.betas
        for i, (flat, g, L) in enumerate(zip(self.arena.flats, G, self.layouts)):
            n = L.local
            if n:
                p = self.master.target(i, flat) if self.master else flat[L.lo:L.hi]
                g = g[:n]
                if g.dtype != p.dtype:  # bfloat16 weights without master copy: a bfloat16 update (lossy)
                    g = g.to(p.dtype)

                def kernel(p, g, m, v):
                    if cfg.outer_optimizer == "adamw":
                        kernels.adamw_step_(p, g, m, v, lr=cfg.outer_lr, beta1=b1, beta2=b2, eps=cfg.eps,
                                            weight_decay=cfg.outer_weight_decay, step=step)
                    else:
                        kernels.sgd_step_(p, g, m, v, lr=cfg.outer_lr, beta1=b1, beta2=b2,
                                          weight_decay=cfg.outer_weight_decay)

                if self.bits == 32:
                    kernel(p, g, self.m[i][:n], self.v[i][:n])
                else:  # chunk by chunk: no parameter-sized float moment buffer
                    sd = self.state_dtypes[i]
                    for s, length in chunks(n):
                        m = self.m[i].dequantize(s, length, sd)
                        v = self.v[i].dequantize(s, length, sd)
                        kernel(p[s:s + length], g[s:s + length], m, v)
                        self.m[i].store_(m, s)
                        self.v[i].store_(v, s)
                if self.master:
                    self.master.write_back_(i, flat)
            if self.sharded:  # sync point: every rank receives every other rank's updated slice
                gather_flat_(flat, L, self.group)

    # -- checkpoints --------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Full-length {"exp_avg": [..], "exp_avg_sq": [..], "master": [.. | None] | None} in the state dtype
        (8-bit: dequantised). A collective when sharded: every rank must call it."""
        def full(xs):
            out = []
            for x, L, sd in zip(xs, self.layouts, self.state_dtypes):
                if self.bits == 8:
                    x = self._gather_quantized(x, L) if self.sharded else x
                    out.append(x.dequantize(0, L.numel, sd))
                else:
                    out.append(gather_(x.new_empty(L.padded), x, self.group)[:L.numel] if self.sharded else x)
            return out

        state = {"exp_avg": full(self.m), "exp_avg_sq": full(self.v), "master": None, "quantized": None}
        if self.bits == 8:
            # the codes themselves too: requantising dequantised values is not exact (the signed map has
            # +1 but not -1, so a block whose largest |m| is negative comes back with a smaller absmax)
            state["quantized"] = {}
            for key, qs in (("exp_avg", self.m), ("exp_avg_sq", self.v)):
                for i, (q, L) in enumerate(zip(qs, self.layouts)):
                    q = self._gather_quantized(q, L) if self.sharded else q
                    state["quantized"][f"{key}.codes.{i}"] = q.codes[:L.numel]
                    state["quantized"][f"{key}.absmax.{i}"] = q.absmax[:-(-L.numel // BLOCK)]
        if self.master:
            masters = []
            for mw, L in zip(self.master.master, self.layouts):
                if mw is None:
                    masters.append(None)
                elif self.sharded:
                    pad = mw.new_zeros(L.shard)
                    pad[:L.local].copy_(mw)
                    masters.append(gather_(mw.new_empty(L.padded), pad, self.group)[:L.numel])
                else:
                    masters.append(mw)
            state["master"] = masters
        return state

    def load_(self, m: list, v: list, master: Optional[list] = None, quantized: Optional[dict] = None) -> None:
        """Take this rank's slice of full-length m, v (and master copies; None: from the current weights).
        8-bit: from `quantized` (the codes `state_dict` saved: exact) when given, else by quantising m, v."""
        for i, L in enumerate(self.layouts):
            for key, dst, src in (("exp_avg", self.m, m), ("exp_avg_sq", self.v, v)):
                if self.bits == 8 and quantized is not None:
                    self._load_codes(dst[i], quantized, key, i, L)
                    continue
                shard = src[i].new_zeros(L.shard)
                shard[:L.local].copy_(src[i][L.lo:L.hi])
                if self.bits == 32:
                    dst[i].copy_(shard)
                else:
                    dst[i].store_(shard)
            if self.master:
                src = master[i] if master is not None and master[i] is not None else self.arena.flats[i]
                self.master.load_(i, src)

    def _load_codes(self, q: QuantizedBuffer, quantized: dict, key: str, i: int, L: ShardLayout) -> None:
        codes, absmax = quantized.get(f"{key}.codes.{i}"), quantized.get(f"{key}.absmax.{i}")
        nblocks = -(-L.numel // BLOCK)
        if codes is None or absmax is None or codes.numel() != L.numel or absmax.numel() != nblocks:
            raise ValueError(f"load_optimizer_state: quantized[{key!r}.codes/absmax.{i}] must hold {L.numel} codes "
                             f"and {nblocks} absmax values for flat buffer {i}, got "
                             f"{None if codes is None else codes.numel()} and {None if absmax is None else absmax.numel()}")
        q.codes.zero_()
        q.absmax.zero_()
        q.codes[:L.local].copy_(codes[L.lo:L.hi])
        b0 = L.lo // BLOCK  # shards start on block boundaries: the shard's blocks are the full buffer's
        q.absmax[:-(-L.local // BLOCK)].copy_(absmax[b0:b0 + -(-L.local // BLOCK)])
