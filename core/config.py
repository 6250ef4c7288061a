"""MetaConfig: every knob of the meta-step (DESIGN.md "The meta-step" names in brackets)."""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

INNER_OPTIMIZERS = ("adamw", "sgd")
OUTER_OPTIMIZERS = ("adamw", "sgd")
MOMENTS = ("shared", "separate")
HVP_MODES = ("exact", "mixed", "fd", "first_order")
INNER_GRAPHS = ("recompute", "keep")
MOMENTS_BITS = (32, 8)


@dataclass(kw_only=True)
class MetaConfig:
    inner_optimizer: str = "adamw"
    """Optimizer of the adaptation step: "adamw" (the paper) or "sgd" (classic MAML)."""
    inner_lr: float = 1e-5
    """Inner learning rate [α]."""
    inner_steps: int = 1
    """Inner steps per task [K ≥ 1]; a task brings K support batches, or one that is reused K times."""
    inner_weight_decay: float = 0.0
    """Decoupled weight decay of the inner step [λᵢ]."""
    outer_optimizer: str = "adamw"
    """Optimizer of the meta-update: "adamw" (the paper) or "sgd" (moments are still updated, see DESIGN.md)."""
    outer_lr: float = 1e-5
    """Outer learning rate [β]."""
    outer_weight_decay: float = 0.0
    """Decoupled weight decay of the outer step [λₒ]."""
    betas: tuple = (0.9, 0.999)
    """AdamW (β1, β2), shared by the inner and the outer optimizer."""
    eps: float = 1e-8
    """AdamW ε, shared by the inner and the outer optimizer."""
    moments: str = "shared"
    """"shared": the inner AdamW starts from the outer moments m, v and step t (MAML-en-LLM);
    "separate": it starts from zero moments at t = 0 for every task."""
    hvp: str = "exact"
    """How H·ḡ is computed: "exact" (reverse-over-reverse), "mixed" (forward-over-reverse), "fd" (central
    finite difference of gradients), "first_order" (dropped). See core/hvp.py."""
    fd_eps: float = 1e-3
    """fd mode: the probe step is r = fd_eps / ‖ḡ‖ (in parameter units: the perturbation's norm is fd_eps)."""
    inner_graph: str = "recompute"
    """exact mode: "recompute" re-evaluates each support gradient with its graph during the reverse pass, so at
    most one second-order graph is alive at a time; "keep" builds it in the forward pass and holds it (one
    gradient evaluation less per inner step, more memory: every step's graph plus the query's activations)."""
    checkpointing: bool = False
    """Non-reentrant activation checkpointing of every transformer block (composes with every mode)."""
    autocast_dtype: Optional[torch.dtype] = None
    """Run the model's compute under torch.autocast with this dtype (torch.bfloat16; float16 is refused: no loss
    scaling); parameters,
    moments and all elementwise stages stay in their own dtype."""
    attn_implementation: Optional[str] = None
    """None: chosen per mode by core/attention.py (a double-backward-capable attention for exact/mixed, the
    fastest first-order kernel otherwise). A string forces a transformers attention implementation."""
    max_grad_norm: Optional[float] = None
    """If set, the meta-gradient (or MetaICL gradient) is scaled to at most this global L2 norm before the outer step."""
    measure_adaptation: bool = True
    """Also evaluate each task's query loss at θ (one forward without graph, ~5% of an exact step), so that step
    metrics report `adapt_gain` = L_Q(θ) - L_Q(φ_K): whether the inner step helps. False: adapt_gain is NaN."""
    shard_state: bool = False
    """ZeRO-1: each rank of the process group owns a contiguous 1/world slice of the moments, of the master copy
    and of the outer update; G is reduce-scattered, parameters all-gathered (core/sharding.py). No effect on one
    process. Shared moments are still gathered in full for the duration of each meta-step (every inner step
    reads them)."""
    moments_bits: int = 32
    """32: m, v in the state dtype (float32; float64 for float64 parameters). 8: bitsandbytes blockwise 8-bit
    codes (~1.02 bytes per value instead of 4; core/quantized_moments.py); needs bitsandbytes."""
    master_weights: bool = False
    """bfloat16 parameters with a float32 master copy that the outer step updates and rounds back
    (core/master_weights.py). Needs a bfloat16 model; combine with autocast_dtype=torch.bfloat16."""

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        self.validate()

    def validate(self):
        """Raise ValueError naming the field for any bad value (called on construction; call again after edits)."""
        def choice(name, allowed):
            val = getattr(self, name)
            if val not in allowed:
                raise ValueError(f"MetaConfig.{name}: {val!r} is not one of {', '.join(map(repr, allowed))}")

        choice("inner_optimizer", INNER_OPTIMIZERS)
        choice("outer_optimizer", OUTER_OPTIMIZERS)
        choice("moments", MOMENTS)
        choice("hvp", HVP_MODES)
        choice("inner_graph", INNER_GRAPHS)
        for name in ("inner_lr", "outer_lr", "inner_weight_decay", "outer_weight_decay", "eps"):
            val = getattr(self, name)
            if not isinstance(val, (int, float)) or not val >= 0 or val == float("inf"):
                raise ValueError(f"MetaConfig.{name}: must be a finite number ≥ 0, got {val!r}")
        if not self.eps > 0:  # AdamW's m/(√v + ε) is 0/0 on lanes with m = v = 0 (e.g. unused embedding rows)
            raise ValueError(f"MetaConfig.eps: must be > 0, got {self.eps!r}")
        if self.hvp == "fd" and self.autocast_dtype is not None:
            raise ValueError(f"MetaConfig.hvp: 'fd' under autocast_dtype={self.autocast_dtype} loses the Hessian term "
                             "(its perturbations are far below bfloat16's resolution; bench/results/precision.md: "
                             "error 5-15x the term itself); use hvp='exact' or 'mixed'")
        if self.inner_graph == "keep" and self.hvp != "exact":
            raise ValueError(f"MetaConfig.inner_graph: 'keep' holds the exact HVP's graph and has no effect with "
                             f"hvp={self.hvp!r}; use inner_graph='recompute' or hvp='exact'")
        if not isinstance(self.inner_steps, int) or self.inner_steps < 1:
            raise ValueError(f"MetaConfig.inner_steps: must be an integer ≥ 1, got {self.inner_steps!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"MetaConfig.betas: must be two numbers in [0, 1), got {self.betas!r}")
        if not self.fd_eps > 0:
            raise ValueError(f"MetaConfig.fd_eps: must be > 0, got {self.fd_eps!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"MetaConfig.max_grad_norm: must be > 0 or None, got {self.max_grad_norm!r}")
        for name in ("shard_state", "master_weights", "measure_adaptation"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MetaConfig.{name}: must be True or False, got {getattr(self, name)!r}")
        if isinstance(self.moments_bits, bool) or self.moments_bits not in MOMENTS_BITS:
            raise ValueError(f"MetaConfig.moments_bits: {self.moments_bits!r} is not one of "
                             f"{', '.join(map(repr, MOMENTS_BITS))}")
        if self.autocast_dtype not in (None, torch.bfloat16):
            # float16 needs loss scaling (gradients and HVPs underflow its 6e-8 floor), which the engine lacks
            raise ValueError(f"MetaConfig.autocast_dtype: must be None or torch.bfloat16 (float16 would need loss "
                             f"scaling, which the meta-step does not do), got {self.autocast_dtype!r}")

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]
