"""Agreement between ranks for the trainer's decisions: rank 0 decides and broadcasts, every rank reports back.

Small Python objects over the default process group (gloo/nccl); with one process these are identities.
"""
from __future__ import annotations

import torch.distributed as dist


def from_rank0(obj, world: int):
    """Rank 0's `obj` on every rank."""
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, world: int) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out
