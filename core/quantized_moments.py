"""8-bit shared moments: m and v stored as bitsandbytes blockwise-quantised codes (DESIGN.md's m, v).

A flat moment buffer of n elements is kept as n uint8 codes plus one float32 absmax per block of BLOCK = 256
elements — bitsandbytes' 8-bit optimizers' layout and block size — so it costs 1 + 4/256 ≈ 1.016 bytes per
element instead of 4. Codes index bitsandbytes' dynamic map: signed for m (it changes sign), unsigned for
v (≥ 0), as `bnb.optim.AdamW8bit` does. x ≈ code_map[q] · absmax[block].

How the meta-step uses them (core/sharding.py):
  inner  every task's inner AdamW starts from the *dequantised* m, v (fresh float32 buffers, alive only
         until its first inner step has produced m_1, v_1); the adjoint is exact for those values.
  outer  dequantise a chunk, run the fused `kernels.adamw_step_` on it, requantise — chunk by chunk, so no
         parameter-sized float32 moment buffer is ever allocated. This is bitsandbytes' CPU 8-bit AdamW
         (dequantise, float32 Adam, requantise) with mamlen's fused kernel in the middle.

bitsandbytes is an optional dependency (`pip install mamlen[bnb]`); it is imported on first use and a
missing install is reported naming the config field that asked for it.
"""
from __future__ import annotations

from typing import Optional

import torch

BLOCK = 256          # bitsandbytes' blocksize for 8-bit optimizer states
CHUNK = 1 << 20      # outer-step chunk (a multiple of BLOCK: chunk blocks are the buffer's blocks)
_MAPS: dict = {}


def _bnb():
    try:
        import bitsandbytes.functional as F
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MetaConfig.moments_bits=8 needs bitsandbytes (pip install 'bitsandbytes==0.50.2' or "
                          f"mamlen[bnb]): {e}") from None
    return F


def code_map(signed: bool, device) -> torch.Tensor:
    """bitsandbytes' dynamic quantisation map (256 float32 values in [-1, 1] or [0, 1])."""
    key = (signed, str(device))
    if key not in _MAPS:
        _MAPS[key] = _bnb().create_dynamic_map(signed=signed).to(device)
    return _MAPS[key]


class QuantizedBuffer:
    """One flat float buffer stored as 8-bit blockwise codes: `codes` (uint8, n) and `absmax` (float32,
    ceil(n / BLOCK)). Slices given to `dequantize`/`store_` must start on a block boundary."""

    def __init__(self, n: int, *, signed: bool, device, codes=None, absmax=None):
        self.n, self.signed = n, signed
        nblocks = -(-n // BLOCK)
        self.codes = torch.zeros(n, dtype=torch.uint8, device=device) if codes is None else codes
        self.absmax = torch.zeros(nblocks, dtype=torch.float32, device=device) if absmax is None else absmax
        if self.codes.numel() != n or self.absmax.numel() != nblocks:
            raise ValueError(f"QuantizedBuffer: {self.codes.numel()} codes and {self.absmax.numel()} absmax for "
                             f"n={n} (expected {n} and {nblocks})")

    @classmethod
    def from_tensor(cls, x: torch.Tensor, *, signed: bool) -> "QuantizedBuffer":
        q = cls(x.numel(), signed=signed, device=x.device)
        q.store_(x)
        return q

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.absmax.numel() * self.absmax.element_size()

    def _range(self, start, length):
        length = self.n - start if length is None else length
        if start % BLOCK or start < 0 or start + length > self.n:
            raise ValueError(f"QuantizedBuffer: slice [{start}, {start + length}) of {self.n} elements must start "
                             f"on a multiple of {BLOCK} and lie inside the buffer")
        return length, slice(start, start + length), slice(start // BLOCK, -(-(start + length) // BLOCK))

    def dequantize(self, start: int = 0, length: Optional[int] = None, dtype=torch.float32) -> torch.Tensor:
        """A fresh float tensor of elements [start, start + length)."""
        length, s, b = self._range(start, length)
        if length == 0:
            return torch.zeros(0, dtype=dtype, device=self.codes.device)
        out = _bnb().dequantize_blockwise(self.codes[s], absmax=self.absmax[b],
                                          code=code_map(self.signed, self.codes.device), blocksize=BLOCK)
        return out if out.dtype == dtype else out.to(dtype)  # exact: code·absmax is a float32 value

    def store_(self, x: torch.Tensor, start: int = 0) -> None:
        """Quantise x into elements [start, start + x.numel())."""
        length, s, b = self._range(start, x.numel())
        if length == 0:
            return
        if not self.signed and bool((x < 0).any()):
            raise ValueError("QuantizedBuffer: negative values for an unsigned (v) buffer")
        codes, st = _bnb().quantize_blockwise(x.detach().reshape(-1).float().contiguous(),
                                              code=code_map(self.signed, x.device), blocksize=BLOCK)
        self.codes[s].copy_(codes)
        self.absmax[b].copy_(st.absmax)


def moments_from(m: torch.Tensor, v: torch.Tensor):
    """(QuantizedBuffer m with the signed map, QuantizedBuffer v with the unsigned map)."""
    return QuantizedBuffer.from_tensor(m, signed=True), QuantizedBuffer.from_tensor(v, signed=False)


def chunks(n: int, chunk: int = CHUNK):
    """(start, length) pieces of [0, n), each starting on a block boundary."""
    assert chunk % BLOCK == 0, chunk
    return [(s, min(chunk, n - s)) for s in range(0, n, chunk)]
