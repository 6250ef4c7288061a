"""Which attention kernel each pass runs with, and why.

Fused attention kernels (flash-attn, SDPA's flash / memory-efficient / CPU-flash backends) implement only a
first-order backward: no double backward, no forward-mode AD. So a meta-step uses two implementations:
  second order   the passes whose graph is differentiated again — the exact / mixed HVPs and the support
                 gradients they recompute (one loss, one attention, one dropout mask): the tiled "mamlen"
                 attention (O(T) memory, explicit second-order formulas; core/attention_ops.py) when it is
                 registered, else "eager" (T×T matrices, but built from ordinary differentiable ops).
  first order    every other pass — the query gradient, the fd probes, first_order mode, the MetaICL step, the
                 no-grad "before" loss: the fastest first-order kernel, flash-attn 2 on CUDA when installed,
                 SDPA otherwise.
The model rests on the first-order implementation; the engine switches to the second-order one for the duration
of a pass (`using`), so users never meet a "derivative ... is not implemented" error and first-order work never
pays for the second-order kernel.
"""
from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from typing import Optional

from mamlen.core import hf_attention

SECOND_ORDER_MODES = ("exact", "mixed")


@dataclass(frozen=True)
class AttentionPlan:
    """The implementation of each kind of pass (None: not an HF model, nothing to switch)."""
    first_order: Optional[str]
    second_order: Optional[str]

    def __str__(self):
        if self.first_order == self.second_order:
            return str(self.first_order)
        return f"{self.second_order} (2nd order) / {self.first_order}"


def second_order_impl() -> str:
    return hf_attention.NAME if hf_attention.registered() else "eager"


def first_order_impl(device_type: str) -> str:
    if device_type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def choose(mode: str, device_type: str, forced: Optional[str] = None) -> AttentionPlan:
    """The plan for HVP mode `mode`; `forced` (MetaConfig.attn_implementation) is used for every pass."""
    if forced is not None:
        return AttentionPlan(forced, forced)
    first = first_order_impl(device_type)
    return AttentionPlan(first, second_order_impl() if mode in SECOND_ORDER_MODES else first)


def configure(model, mode: str, forced: Optional[str] = None) -> AttentionPlan:
    """Choose the plan for `mode` and validate it through transformers (`set_attn_implementation` checks that an
    implementation exists); the model is left on the first-order one."""
    if not hasattr(model, "set_attn_implementation") or getattr(model, "config", None) is None:
        return AttentionPlan(None, None)
    plan = choose(mode, next(model.parameters()).device.type, forced)
    for impl in dict.fromkeys((plan.second_order, plan.first_order)):  # the first-order one last: the resting state
        if model.config._attn_implementation != impl:
            model.set_attn_implementation(impl)
    return plan


@contextlib.contextmanager
def using(model, impl: Optional[str]):
    """Run the model with attention `impl` inside the block (forward, backward and checkpoint recomputation alike:
    HF reads config._attn_implementation at every call); the previous one is restored on exit."""
    config = getattr(model, "config", None)
    if impl is None or config is None or config._attn_implementation == impl:
        yield
        return
    before = config._attn_implementation
    config._attn_implementation = impl  # the setter propagates to sub-configs
    try:
        yield
    finally:
        config._attn_implementation = before
