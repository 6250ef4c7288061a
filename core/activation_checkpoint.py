"""Non-reentrant activation checkpointing of a model's transformer blocks, controlled by the engine.

Non-reentrant `torch.utils.checkpoint` (unlike the reentrant one) supports `autograd.grad(create_graph=True)`
and forward-mode tangents, so it composes with every HVP mode. We wrap the blocks ourselves instead of relying
on HF's `gradient_checkpointing_enable`, which only acts in training mode and lets model code decide; here it is
on whenever the engine says so. Recomputation happens during backward, so those backward passes must run
inside the same `ParamArena.bind` as the forward (core/hvp.py does) — the recomputed block reads the bound
weights. RNG state is preserved by checkpoint itself, so dropout masks match.
"""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_ATTR = "_mamlen_unwrapped_forward"


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: HF's GradientCheckpointingLayer instances, else the children of the longest ModuleList."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
        found = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if found:
            return found
    except ImportError:
        pass
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise ValueError(f"activation checkpointing: no transformer blocks found in {type(model).__name__}")
    return list(max(lists, key=len))


def _checkpointed(fn, *args, **kwargs):
    # a KV cache would be appended to twice (forward and recompute): training never needs one
    for key in ("past_key_values", "layer_past"):
        if kwargs.get(key) is not None:
            kwargs[key] = None
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return checkpoint(fn, *args, use_reentrant=False, **kwargs)


def enable(model: nn.Module) -> int:
    """Wrap every block's forward in a non-reentrant checkpoint; returns how many blocks. Idempotent."""
    wrapped = 0
    config = getattr(model, "config", None)
    if getattr(config, "use_cache", False):
        config.use_cache = False  # the model-level cache object may reach blocks positionally: never build one
    for block in blocks(model):
        if not hasattr(block, _ATTR):
            orig = block.forward
            setattr(block, _ATTR, orig)
            block.forward = functools.partial(_checkpointed, orig)
        wrapped += 1
    return wrapped


def disable(model: nn.Module) -> None:
    for block in model.modules():
        if hasattr(block, _ATTR):
            block.forward = getattr(block, _ATTR)
            delattr(block, _ATTR)


def is_enabled(model: nn.Module) -> bool:
    return any(hasattr(m, _ATTR) for m in model.modules())


def original_forward(block: nn.Module):
    """The block's forward without our checkpoint wrapper (what a per-block recomputation must call)."""
    return getattr(block, _ATTR, block.forward)


@contextlib.contextmanager
def enabled(model: nn.Module):
    """Checkpointing on for the duration (e.g. one HVP pass); left as found afterwards."""
    was = is_enabled(model)
    if not was:
        enable(model)
    try:
        yield
    finally:
        if not was:
            disable(model)
