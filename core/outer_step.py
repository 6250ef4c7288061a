"""The outer update of a meta-step and the optimizer state's public form, for MetaEngine and FSDPMetaEngine.

    update_   G (the mean meta-gradient, this rank's part) and its global norm → skip if a loss or the norm is not
              finite (θ, m, v, t untouched) → clip to max_grad_norm → t ← t + 1 → outer AdamW/SGD on θ, m, v
              (DESIGN.md; core/sharding.py OuterState.apply_) → the step's metrics
    export    {"step", "exp_avg", "exp_avg_sq"[, "master"]}: torch's optimizer-state names, one tensor per parameter
"""
from __future__ import annotations

import math
from dataclasses import astuple, dataclass
from typing import Callable

import torch

from mamlen import kernels


@dataclass
class StepSums:
    """Sums over a step's tasks on every rank (a MetaICL step: over its batches, with no adaptation)."""
    tasks: float
    query_loss: float          # Σ L_Q(φ_K)
    support_loss: float        # Σ L_{S_1}(θ)
    tokens: float              # target tokens of the queries and support batches
    query_loss_before: float   # Σ L_Q(θ) (NaN without measure_adaptation)
    input_tokens: float = 0    # tokens the model read: every batch's non-padding tokens, once per batch

    def tensor(self, device) -> torch.Tensor:
        """float64 (the default float32 would round the losses), to be reduced across ranks with G."""
        return torch.tensor(astuple(self), dtype=torch.float64, device=device)

    @classmethod
    def of(cls, t: torch.Tensor) -> "StepSums":
        return cls(*t.tolist())


def update_(config, opt_state, G: list, sums: StepSums, norm: float, step: int) -> tuple[dict, int]:
    """The outer update unless the step is non-finite: (metrics without "seconds", the step count t after it)."""
    n = sums.tasks
    loss, support_loss = sums.query_loss / n, sums.support_loss / n
    finite = math.isfinite(loss) and math.isfinite(support_loss) and math.isfinite(norm)
    # adapt_gain > 0: the inner step lowered the query loss (L_Q(θ) - L_Q(φ_K), mean over tasks)
    metrics = {"loss": loss, "support_loss": support_loss, "query_loss_before": sums.query_loss_before / n,
               "adapt_gain": (sums.query_loss_before - sums.query_loss) / n, "grad_norm": norm,
               "tokens": int(sums.tokens), "input_tokens": int(sums.input_tokens), "skipped": not finite}
    if finite:
        if config.max_grad_norm is not None and norm > config.max_grad_norm:
            for g in G:
                g.mul_(config.max_grad_norm / norm)
        step += 1
        opt_state.apply_(G, step)  # fused kernels on this rank's part of θ, m, v (then the all-gather, if sharded)
    metrics["step"] = step
    return metrics, step


def export(full: dict, flats: list, step: int, per_parameter: Callable[[list], dict]) -> dict:
    """The public optimizer state from OuterState.state_dict() `full`: `per_parameter` turns flat buffers into
    {name: tensor} copies. Parameters without a master copy (float32 among bfloat16) export their weights."""
    state = {"step": step, "exp_avg": per_parameter(full["exp_avg"]), "exp_avg_sq": per_parameter(full["exp_avg_sq"])}
    if full["master"] is not None:
        state["master"] = per_parameter([m if m is not None else f.to(kernels.state_dtype(f.dtype))
                                         for m, f in zip(full["master"], flats)])
    return state


def loaded_step(state: dict) -> int:
    """The step count of a state to load, after checking the keys every optimizer state has."""
    for key in ("step", "exp_avg", "exp_avg_sq"):
        if key not in state:
            raise KeyError(f"load_optimizer_state: missing {key!r}")
    step = int(state["step"])
    if step < 0:
        raise ValueError(f"load_optimizer_state: step must be ≥ 0, got {step}")
    return step
