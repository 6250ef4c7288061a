"""Make a model's backward pass forward-mode differentiable, for the "mixed" HVP mode.

Forward-over-reverse runs the backward pass on dual tensors, so every backward kernel it meets needs a
forward-AD formula. A few fused activation backwards lack one in torch 2.13 (aten::silu_backward,
aten::mish_backward — SiLU is Llama's activation). We swap those activation modules for the same function
written with ops whose backwards do have formulas (x·σ(x), x·tanh(softplus(x))): equal values, equal
derivatives, a little slower. Activations called functionally inside model code cannot be swapped; the engine
falls back to the exact HVP for such models (see core/hvp.py).
"""
from __future__ import annotations

import torch
from torch import nn


class CompositeSiLU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


class CompositeMish(nn.Module):
    def forward(self, x):
        return x * torch.tanh(nn.functional.softplus(x))


def _replacement(module: nn.Module):
    if isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation":
        return CompositeSiLU()
    if isinstance(module, nn.Mish) or type(module).__name__ == "MishActivation":
        return CompositeMish()
    return None


def make_forward_differentiable(model: nn.Module) -> int:
    """Swap activation modules without forward-AD-capable backwards; returns how many were swapped."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child)
            if new is not None:
                setattr(parent, name, new)
                swapped += 1
    return swapped
