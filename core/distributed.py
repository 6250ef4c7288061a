"""The one cross-rank reduction of a meta-step: sum the flat meta-gradient buffers and the step statistics.

Tasks of a meta-batch are split across ranks; each rank sums its G_i; one all-reduce (SUM) per flat buffer
(one buffer for a single-dtype model) plus one small statistics vector, then every rank divides by the global
task count and applies the same outer step. DDP is not used: it cannot wrap create_graph backward passes.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def active(group: Optional[object] = None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_sum_(tensors: list[torch.Tensor], group: Optional[object] = None) -> None:
    """In-place SUM over ranks (no-op when not distributed). A sync point: every rank must call it."""
    if not active(group):
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
