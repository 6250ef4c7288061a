"""H_S(φ)·ḡ, the only non-elementwise term of the reverse recursion (DESIGN.md), four ways behind one contract:

    MODES[mode](obj, φ, batch, rng, vec, acc, opts)      acc += H_S(φ)·vec, parameter by parameter

φ, vec, acc are flat buffers (one per dtype; acc in the state dtype). Every mode evaluates the support loss L_S at
φ with the RNG state of its first evaluation (same dropout masks) and never assembles H·vec, or a first-order
gradient, as a whole parameter-sized buffer: each parameter's piece is added into acc as it arrives.

  exact        reverse-over-reverse, one transformer block at a time (core/block_recompute.py): each block's
               second-order graph is built, used and freed inside its own backward. Passes: 1 forward, then per
               block 3 recomputations (≈1.5x the arithmetic of a whole-graph double backward). Memory: one
               block's second-order graph + O(T·width) per block.
  mixed        forward-over-reverse: φ carries the tangent vec (torch.autograd.forward_ad), the gradient's tangent
               is H·vec; blocks are checkpointed for the pass (non-reentrant checkpointing composes with dual
               tensors), so one block's dual graph is alive at a time. Passes: 1 dual forward + 1 dual backward
               with per-block dual recomputation. A model whose backward lacks forward AD gets `exact` (warned
               once per engine).
  fd           central difference (∇L(φ + r vec) - ∇L(φ - r vec)) / 2r, r = fd_eps/‖vec‖: 2 first-order
               gradients, no second-order graph, so any first-order attention kernel works. Error O(r²‖∇³L‖).
  first_order  adds nothing (FOMAML through the AdamW inner step).

`kept_` is the HVP through a graph built in the forward pass (inner_graph="keep"): whole-model memory traded for
one forward less; not a mode. Both take derivatives against one leaf per parameter, never the flat buffer, whose
backward would concatenate every parameter's piece into a fresh parameter-sized buffer (bench/results/study_step.md).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD

from mamlen import kernels
from mamlen.core import activation_checkpoint, block_recompute
from mamlen.core.loss import Objective, RngState


@dataclass
class ForwardAD:
    """Whether the model's backward has forward-mode AD, learnt at the first mixed HVP. One per engine: a model
    (or loss) lacking it must not turn another engine's mixed mode into exact."""
    supported: bool = True


@dataclass
class Options:
    """What some modes need besides the contract's arguments."""
    fd_eps: float = 1e-3              # fd: the probe's norm in parameter units
    forward_ad: ForwardAD = None      # mixed: this engine's fallback record

    def __post_init__(self):
        self.forward_ad = self.forward_ad or ForwardAD()


def _leaves(flats):
    return [f.detach().requires_grad_(True) for f in flats]


def gradient(obj: Objective, flats, batch, rng: RngState, *, create_graph=False):
    """(loss, [∇L(φ)]) at φ = flats, as fresh flat buffers. With create_graph the graph is returned alive:
    (loss, KeptGraph), whose flat grads carry their graph, which is what `kept_` needs.

    Derivatives are taken against one leaf per parameter (views of φ, no copy), never against the flat buffer:
    that leaf's backward concatenates every parameter's gradient into a fresh parameter-sized buffer, once more
    in the HVP through a kept graph. Without create_graph, each parameter's gradient is copied into the output as
    it arrives and dropped: one parameter-sized buffer at the peak."""
    arena = obj.arena
    leaves = {n: x.detach().requires_grad_(True) for n, x in arena.views(flats).items()}
    if create_graph:
        with rng.replay(), arena.bind(leaves):
            loss = obj.loss(batch)
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, materialize_grads=True)
        by_name = dict(zip(leaves, grads))
        del grads
        # the flat gradient is a differentiable cat of the parameters' (its backward only slices the cotangent)
        flat = [torch.cat([by_name.pop(n).reshape(-1) for n in names]) for names in arena.names]
        return loss.detach(), KeptGraph(grads=flat, leaves=list(leaves.values()), names=list(leaves))
    out = [torch.empty_like(f) for f in flats]  # written by the hooks; parameters the loss does not reach get 0
    out_v = arena.views(out)
    arrived = set()

    def copy_out(p, name):
        if p.grad is not None:
            out_v[name].copy_(p.grad)
            p.grad = None
            arrived.add(name)

    hooks = [x.register_post_accumulate_grad_hook(lambda p, _n=n: copy_out(p, _n)) for n, x in leaves.items()]
    try:
        with rng.replay(), arena.bind(leaves):
            loss = obj.loss(batch)
            torch.autograd.backward(loss, inputs=list(leaves.values()))
    finally:
        for h in hooks:
            h.remove()
    for n in leaves.keys() - arrived:
        out_v[n].zero_()
    return loss.detach(), out


@dataclass
class KeptGraph:
    """A support gradient with its graph alive (inner_graph="keep"), from `gradient(create_graph=True)`: the flat
    gradient buffers carrying the graph, and what they were differentiated against: one autograd leaf per
    parameter (views of φ) and the parameters' names, in the arena's packing order (the flat gradient's layout)."""
    grads: list | None  # ∇L(φ) per flat buffer; None once kept_ has walked the graph
    leaves: list
    names: list


def _per_parameter(arena, flats, vec, acc):
    """One autograd leaf per parameter (views of φ, no copy) and the matching views of vec and acc."""
    leaves = {n: x.detach().requires_grad_(True) for n, x in arena.views(flats).items()}
    vec_v, acc_v = arena.views(vec), arena.views(acc)
    return leaves, [vec_v[n] for n in leaves], [acc_v[n] for n in leaves]


def hvp_exact_(obj, flats, batch, rng, vec, acc, opts: Options = None):
    """acc += ∇⟨∇L(φ), vec⟩, one block's second-order graph at a time (core/block_recompute.py)."""
    model = obj.model
    leaves, vec_l, acc_l = _per_parameter(obj.arena, flats, vec, acc)
    try:
        blocks = activation_checkpoint.blocks(model)
    except ValueError:  # no repeated blocks (a toy model): the whole model is one block's worth of graph
        blocks = []
    forwards = [activation_checkpoint.original_forward(b) for b in blocks]
    with rng.replay(), obj.arena.bind(leaves):
        # the tensors the model computes with (the leaves, or their casts for bf16 parameters) -> direction
        bound = dict(model.named_parameters())
        directions = {id(bound[n]): v for n, v in zip(leaves, vec_l)}
        accumulators = {id(bound[n]): a for n, a in zip(leaves, acc_l)}
        block_recompute.hvp_(lambda: obj.loss(batch), blocks, list(leaves.values()), vec_l, acc_l,
                             directions=directions, accumulators=accumulators, forwards=forwards)


def hvp_mixed_(obj, flats, batch, rng, vec, acc, opts: Options):
    """acc += tangent of ∇L at φ in direction vec (forward-over-reverse), each parameter's tangent added as its
    gradient arrives. Falls back to hvp_exact_ for a model whose backward lacks forward AD (once per engine)."""
    if opts.forward_ad.supported:
        try:
            return _hvp_mixed_(obj, flats, batch, rng, vec, acc)
        except NotImplementedError as err:
            if "forward AD" not in str(err) and "forward mode AD" not in str(err):  # (ops, custom Functions)
                raise
            opts.forward_ad.supported = False
            warnings.warn(f"hvp='mixed': {type(obj.model).__name__}'s backward uses an op without forward-mode AD "
                          f"({err}); using the exact reverse-over-reverse HVP for this engine instead", RuntimeWarning)
    hvp_exact_(obj, flats, batch, rng, vec, acc, opts)


def _hvp_mixed_(obj, flats, batch, rng, vec, acc):
    leaves, vec_l, acc_l = _per_parameter(obj.arena, flats, vec, acc)

    def arrived(grad, a):  # a parameter's gradient, complete (tied uses summed): its tangent is its H·vec piece
        t = fwAD.unpack_dual(grad).tangent
        if t is not None:
            a.add_(t.to(a.dtype))
        return grad

    def drop(p):  # the primal gradient is not needed: free it as soon as autograd stores it
        p.grad = None

    with fwAD.dual_level():
        duals = {}
        for (n, x), v, a in zip(leaves.items(), vec_l, acc_l):
            duals[n] = fwAD.make_dual(x, v.to(x.dtype))
            duals[n].register_hook(lambda g, _a=a: arrived(g, _a))
        hooks = [x.register_post_accumulate_grad_hook(drop) for x in leaves.values()]
        try:
            # checkpointed blocks: the dual backward recomputes one block at a time
            with rng.replay(), obj.arena.bind(duals), activation_checkpoint.enabled(obj.model):
                loss = obj.loss(batch)
                torch.autograd.backward(loss, inputs=list(leaves.values()))
                del loss
        finally:
            for h in hooks:
                h.remove()


def global_norm(vecs) -> float:
    # per-buffer norms in their own dtype (no float64 copy of a parameter-sized buffer), combined in float64
    return math.sqrt(sum(float(torch.linalg.vector_norm(v)) ** 2 for v in vecs))


def hvp_fd_(obj, flats, batch, rng, vec, acc, opts: Options):
    """acc += (∇L(φ + r·vec) - ∇L(φ - r·vec)) / 2r with r = fd_eps/‖vec‖ (acc unchanged if vec = 0)."""
    norm = global_norm(vec)
    if norm == 0.0:
        return
    r = opts.fd_eps / norm
    # one perturbed point alive at a time (the fused op writes both; the unused one is dropped at once)
    plus = [kernels.fd_perturb(f, v, r)[0] for f, v in zip(flats, vec)]
    _, g_plus = gradient(obj, plus, batch, rng)
    del plus
    minus = [kernels.fd_perturb(f, v, r)[1] for f, v in zip(flats, vec)]
    _, g_minus = gradient(obj, minus, batch, rng)
    del minus
    for a, gp, gm in zip(acc, g_plus, g_minus):
        kernels.fd_combine_(a, gp, gm, 1.0 / (2 * r))


def hvp_first_order_(obj, flats, batch, rng, vec, acc, opts: Options = None):
    """Adds nothing: H·vec := 0 (first-order MAML through the AdamW inner step)."""


MODES = {"exact": hvp_exact_, "mixed": hvp_mixed_, "fd": hvp_fd_, "first_order": hvp_first_order_}


def kept_(obj, kept: KeptGraph, rng, vec, acc):
    """acc += ∇⟨g, vec⟩ through the KeptGraph from `gradient(create_graph=True)` (inner_graph="keep"). The
    second-order graph is freed as the backward walks it (the record gives up its reference: the caller's must be
    the last other one); each parameter's piece of H·vec is added into acc as it is complete (tied uses summed)
    and dropped: no H·vec assembled whole, no parameter-sized concatenation."""
    grads, graph = kept.grads, kept
    kept.grads = None
    acc_v = obj.arena.views(acc)

    def add_into(p, a):
        if p.grad is not None:
            a.add_(p.grad.to(a.dtype))
            p.grad = None

    hooks = [x.register_post_accumulate_grad_hook(lambda p, _a=acc_v[n]: add_into(p, _a))
             for n, x in zip(graph.names, graph.leaves)]
    try:
        # the double backward may recompute checkpointed blocks: it must see the same weights and RNG
        with rng.replay(), obj.arena.bind(dict(zip(graph.names, graph.leaves))):
            pairs = [(g, v.to(g.dtype)) for g, v in zip(grads, vec) if g.requires_grad]  # a buffer L never reaches
            if pairs:
                torch.autograd.backward([g for g, _ in pairs], grad_tensors=[v for _, v in pairs],
                                        inputs=graph.leaves)
    finally:
        for h in hooks:
            h.remove()
