"""Which attention kernel each HVP mode runs with, and why.

Fused attention kernels (flash-attn, SDPA's flash / memory-efficient / CPU-flash backends) implement only a
first-order backward: no double backward, no forward-mode AD. So:
  exact, mixed      need an attention whose backward is itself differentiable (and, for mixed, forward-mode
                    differentiable): the tiled "mamlen" attention (O(T) memory, explicit second-order
                    formulas; core/attention_ops.py) when it is registered, else "eager" (T×T matrices, but
                    built from ordinary differentiable ops).
  fd, first_order   only ever take first-order gradients: the fastest first-order kernel — flash-attn 2 on
                    CUDA when installed, SDPA otherwise.
The choice is applied to the model once, when the engine is built, so users never meet a
"derivative ... is not implemented" error.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

from mamlen.core import hf_attention

SECOND_ORDER_MODES = ("exact", "mixed")


def choose(mode: str, device_type: str, forced: Optional[str] = None) -> str:
    if forced is not None:
        return forced
    if mode in SECOND_ORDER_MODES:
        return hf_attention.NAME if hf_attention.registered() else "eager"
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def configure(model, mode: str, forced: Optional[str] = None) -> Optional[str]:
    """Set the model's attention implementation for `mode`; returns what was chosen (None: not an HF model)."""
    if not hasattr(model, "set_attn_implementation") or getattr(model, "config", None) is None:
        return None
    device = next(model.parameters()).device
    impl = choose(mode, device.type, forced)
    if getattr(model.config, "_attn_implementation", None) != impl:
        model.set_attn_implementation(impl)
    return impl
