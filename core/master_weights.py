"""bfloat16 parameters with a float32 master copy (mixed-precision training, as in Micikevicius et al. 2018).

The model computes with bfloat16 weights (the arena's flat buffers: 2 bytes per parameter, half the memory
traffic of every forward/backward and of every inner-step buffer φ, g). An outer AdamW step changes weights by
~lr·1 ≈ 1e-5 relative, below bfloat16's resolution (2^-8 ≈ 4e-3): applied to the bf16 weights directly most
updates would round away. So the outer step updates a float32 copy (on this rank's shard only when the state is
sharded: 4/world bytes per parameter) and writes it back rounded to nearest-even into the bf16 buffer; moments,
meta-gradients and every adjoint stay float32 (kernels.state_dtype(bfloat16) = float32).

Invariant after every outer step and after loading: flat[lo:hi] == master.to(bfloat16) exactly.
"""
from __future__ import annotations

import torch

LOW_PRECISION = (torch.bfloat16,)  # the kernels take bfloat16 parameters with float32 state


class MasterWeights:
    """float32 copies of the slices [lo, hi) of the low-precision flat buffers (one entry per flat; None for a
    flat that is already float32/float64 and is updated in place)."""

    def __init__(self, flats: list[torch.Tensor], ranges: list[tuple[int, int]]):
        if not any(f.dtype in LOW_PRECISION for f in flats):
            raise ValueError("MetaConfig.master_weights=True needs bfloat16 parameters; the model's are "
                             f"{sorted({str(f.dtype) for f in flats})} (load it with dtype=torch.bfloat16, "
                             "trainer: model.dtype=bfloat16)")
        self.ranges = ranges
        self.master = [f[lo:hi].float() if f.dtype in LOW_PRECISION else None for f, (lo, hi) in zip(flats, ranges)]

    @property
    def nbytes(self) -> int:
        return sum(m.numel() * m.element_size() for m in self.master if m is not None)

    def target(self, i: int, flat: torch.Tensor) -> torch.Tensor:
        """The tensor the outer step updates for flat i: its master copy, or the flat's own slice."""
        lo, hi = self.ranges[i]
        return self.master[i] if self.master[i] is not None else flat[lo:hi]

    def write_back_(self, i: int, flat: torch.Tensor) -> None:
        """flat[lo:hi] ← master rounded to the flat's dtype (round to nearest even)."""
        if self.master[i] is not None:
            lo, hi = self.ranges[i]
            flat[lo:hi].copy_(self.master[i])

    def load_(self, i: int, full: torch.Tensor) -> None:
        """Set the master copy from a full-length float tensor (a checkpoint's, or the weights themselves)."""
        if self.master[i] is not None:
            lo, hi = self.ranges[i]
            self.master[i].copy_(full[lo:hi])
