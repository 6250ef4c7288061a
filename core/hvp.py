"""The four ways to get H_S(φ)·ḡ, the only non-elementwise term of the reverse recursion (DESIGN.md).

Each function evaluates the support loss L_S at flat weights φ (a list, one buffer per dtype) with the RNG
state of the forward pass (same dropout masks) and returns H·ḡ as fresh flat buffers in the state dtype.

  exact  reverse-over-reverse: g = ∇L(φ) with create_graph, then ∇⟨g, ḡ⟩. Passes: 1 forward, 1 backward
         that records its own graph, 1 backward through both. Memory: the activations plus the first
         backward's graph, alive only inside this call (inner_graph="recompute").
  mixed  forward-over-reverse: φ carries the tangent ḡ (torch.autograd.forward_ad); the gradient's tangent is
         H·ḡ. Passes: 1 forward + 1 backward, each with tangents (≈2× the work); no second tape.
  fd     central difference (∇L(φ + rḡ) - ∇L(φ - rḡ)) / 2r, r = fd_eps/‖ḡ‖. Passes: 2 first-order gradients;
         no second-order graph at all, so any first-order attention kernel works. Error O(r²‖∇³L‖).
  first_order  H·ḡ := 0 (FOMAML through the AdamW inner step).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from mamlen import kernels
from mamlen.core.loss import Objective, RngState


def _leaves(flats):
    return [f.detach().requires_grad_(True) for f in flats]


def gradient(obj: Objective, flats, batch, rng: RngState, *, create_graph=False):
    """(loss, [∇L(φ)]) at φ = flats. With create_graph the graph is returned alive: (loss, grads, leaves)."""
    leaves = _leaves(flats)
    with rng.replay(), obj.arena.bind(leaves):
        loss = obj.loss(batch)
        grads = torch.autograd.grad(loss, leaves, create_graph=create_graph)
    if create_graph:
        return loss.detach(), list(grads), leaves
    return loss.detach(), list(grads)


def hvp_exact_into(obj, flats, batch, rng, vec, acc, *, kept=None):
    """acc += ∇⟨∇L(φ), vec⟩, per parameter: both derivatives are taken w.r.t. the parameter views (not the flat
    leaves), so neither the first gradient nor the HVP is assembled into a flat buffer (two parameter-sized
    buffers fewer at the peak of the step). `kept`: see hvp_exact."""
    if kept is not None:
        for a, h in zip(acc, hvp_exact(obj, flats, batch, rng, vec, kept=kept)):
            a.add_(h)
        return
    leaves = _leaves(flats)
    arena = obj.arena
    names = [n for group in arena.names for n in group]
    vec_views, acc_views = arena.views(vec), arena.views(acc)
    with rng.replay(), arena.bind(leaves) as views:
        inputs = [views[n] for n in names]
        loss = obj.loss(batch)
        grads = torch.autograd.grad(loss, inputs, create_graph=True, allow_unused=True)
        used = [k for k, g in enumerate(grads) if g is not None and g.requires_grad]
        hv = torch.autograd.grad([grads[k] for k in used], [inputs[k] for k in used],
                                 grad_outputs=[vec_views[names[k]].to(grads[k].dtype) for k in used],
                                 allow_unused=True)
    del loss, grads, inputs, views, leaves  # the second-order graph
    for k, h in zip(used, hv):
        if h is not None:
            acc_views[names[k]].add_(h)


def hvp_exact(obj, flats, batch, rng, vec, *, kept=None):
    """∇⟨∇L(φ), vec⟩. `kept` = (grads, leaves) of a graph built in the forward pass (inner_graph="keep")."""
    if kept is None:
        _, grads, leaves = gradient(obj, flats, batch, rng, create_graph=True)
    else:
        grads, leaves = kept
    # the double backward may recompute checkpointed blocks: it must see the same weights and RNG
    with rng.replay(), obj.arena.bind(leaves):
        hv = torch.autograd.grad(grads, leaves, grad_outputs=[v.to(g.dtype) for v, g in zip(vec, grads)],
                                 allow_unused=True)
    del grads, leaves  # frees the second-order graph before the caller continues
    return [torch.zeros_like(v) if h is None else h.to(v.dtype) for h, v in zip(hv, vec)]


@dataclass
class ForwardAD:
    """Whether the model's backward has forward-mode AD, learnt at the first mixed HVP. One per engine: a model
    (or loss) lacking it must not turn another engine's mixed mode into exact."""
    supported: bool = True


def hvp_mixed(obj, flats, batch, rng, vec, forward_ad: ForwardAD):
    """Tangent of ∇L at φ in direction vec: one dual forward + backward (forward-over-reverse).
    A model whose backward meets an op without a forward-AD formula gets the exact HVP instead (warned once per
    `forward_ad` record)."""
    if forward_ad.supported:
        try:
            return _hvp_mixed(obj, flats, batch, rng, vec)
        except NotImplementedError as err:
            if "forward AD" not in str(err) and "forward mode AD" not in str(err):  # (ops, custom Functions)
                raise
            forward_ad.supported = False
            warnings.warn(f"hvp='mixed': {type(obj.model).__name__}'s backward uses an op without forward-mode AD "
                          f"({err}); using the exact reverse-over-reverse HVP for this engine instead", RuntimeWarning)
    return hvp_exact(obj, flats, batch, rng, vec)


def _hvp_mixed(obj, flats, batch, rng, vec):
    leaves = _leaves(flats)
    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, v.to(x.dtype)) for x, v in zip(leaves, vec)]
        with rng.replay(), obj.arena.bind(duals):
            loss = obj.loss(batch)
            grads = torch.autograd.grad(loss, leaves)
        out = []
        for g, v in zip(grads, vec):
            t = fwAD.unpack_dual(g).tangent
            out.append(torch.zeros_like(v) if t is None else t.detach().to(v.dtype))
    return out


def global_norm(vecs) -> float:
    # per-buffer norms in their own dtype (no float64 copy of a parameter-sized buffer), combined in float64
    return math.sqrt(sum(float(torch.linalg.vector_norm(v)) ** 2 for v in vecs))


def hvp_fd_into(obj, flats, batch, rng, vec, acc, *, fd_eps):
    """acc += (∇L(φ + r·vec) - ∇L(φ - r·vec)) / 2r with r = fd_eps/‖vec‖ (acc unchanged if vec = 0)."""
    norm = global_norm(vec)
    if norm == 0.0:
        return
    r = fd_eps / norm
    # one perturbed point alive at a time (the fused op writes both; the unused one is dropped at once)
    plus = [kernels.fd_perturb(f, v, r)[0] for f, v in zip(flats, vec)]
    _, g_plus = gradient(obj, plus, batch, rng)
    del plus
    minus = [kernels.fd_perturb(f, v, r)[1] for f, v in zip(flats, vec)]
    _, g_minus = gradient(obj, minus, batch, rng)
    del minus
    for a, gp, gm in zip(acc, g_plus, g_minus):
        kernels.fd_combine_(a, gp, gm, 1.0 / (2 * r))
