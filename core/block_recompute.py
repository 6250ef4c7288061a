"""Exact Hessian-vector products holding one transformer block's second-order graph at a time.

Why: `autograd.grad(create_graph=True)` through a whole model keeps every block's activations and first-backward
intermediates until the second backward ends — with non-reentrant checkpointing too, because the recomputed
blocks become part of the new graph (0.24 GB per GPT-2 Medium block at T = 1024; 20.5 GB for 24 layers).

How: inside `blockwise(blocks, vec)` every block y = f(x; θ_b) runs as `_Block` (saves x only). The first
backward of an HVP (create_graph) reaches each block as `_Block.backward(ȳ)`, which does not build the block's
graph either: it calls `_BlockBackward`, a Function (x, ȳ, θ_b) -> (x̄, s_b) with s_b = ⟨∂f/∂θ_b^T ȳ, v_b⟩ that
recomputes the block, takes one VJP and saves only (x, ȳ). The block's parameter gradient never leaves it: its
share of ⟨∇L, v⟩ comes out as the scalar s_b (collected by the scope), so no first-order gradient of the
blocks is ever held. The HVP is then ∇(Σ_b s_b + ⟨g_rest, v_rest⟩), where g_rest is the ordinary gradient of
the parameters outside the blocks (embeddings, final norm, head). The second backward runs, per block:

    _BlockBackward.backward   recompute f, VJP with create_graph, differentiate (x̄, s_b) again: one block's
                              second-order graph, freed on return -> cotangents of x, ȳ; θ_b's piece of H·v
    _Block.backward           (grad mode off: the second backward's pass through the forward chain) recompute
                              f, one VJP -> cotangent of x; θ_b's piece of H·v

θ_b's pieces go straight into acc (`Scope.add_`), not through autograd, which would hold them in the parameter's
input buffer until the last of its uses had run (the whole H·v at the peak).

Passes per block: the forward, plus 3 recomputations (first backward, second backward twice) — about 1.5x the
arithmetic of a whole-graph double backward, for memory O(one block) + O(T·width) per block (x, ȳ, x̄).
Every recomputation replays the RNG state and autocast state of the block's forward (same dropout masks).
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

_ATTR = "_mamlen_blockwise_forward"


@dataclass
class _Call:
    """What one block call needs to be replayed: the function, its constant arguments, where the block's
    parameters sit, and the RNG and autocast state its forward started from."""
    fn: object
    args: tuple
    kwargs: dict
    slots: list      # (module, key, index into the block's parameter list) for every parameter entry
    cpu_rng: torch.Tensor
    cuda_rng: object
    autocast: tuple  # (device type, enabled, dtype)
    tuple_out: bool = False

    @contextlib.contextmanager
    def replay(self):
        devices = [torch.cuda.current_device()] if self.cuda_rng is not None else []
        dev, enabled, dtype = self.autocast
        with torch.random.fork_rng(devices=devices), torch.autocast(dev, dtype=dtype, enabled=enabled):
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng)
            yield

    def run(self, x, params):
        """y = f(x; params) with `params` swapped into the block (the caller decides grad mode and RNG)."""
        saved = [(mod, key, mod._parameters[key]) for mod, key, _ in self.slots]
        try:
            for mod, key, i in self.slots:
                mod._parameters[key] = params[i]
            out = self.fn(x, *self.args, **self.kwargs)
        finally:
            for mod, key, p in saved:
                mod._parameters[key] = p
        if isinstance(out, tuple):  # HF blocks of some versions return (hidden_states, None, ...)
            if any(torch.is_tensor(o) for o in out[1:]):
                raise ValueError("blockwise HVP: a block returned several tensors; only blocks returning their "
                                 "hidden states are supported")
            self.tuple_out, out = True, out[0]
        return out


@dataclass
class Scope:
    """The HVP in progress, keyed by identity of the tensors the blocks compute with as parameters (absent: not
    trained): their direction v and their slice of acc; and the collected shares s_b."""
    directions: dict
    accumulators: dict
    shares: list = field(default_factory=list)

    def add_(self, params, pieces):
        """acc += H·v pieces of block parameters, directly: routed through autograd, a block's pieces from its
        second backward would wait in the parameter's input buffer until the forward chain's pass reaches the
        block again (measured: one block's parameters per block, i.e. the whole hv at the peak)."""
        for p, h in zip(params, pieces):
            a = self.accumulators.get(id(p))
            if a is not None and h is not None:
                a.add_(h.to(a.dtype))


def _slots(block):
    """The block's parameter tensors as bound now (tied entries once) and where each entry sits."""
    index, params, slots = {}, [], []
    for mod in block.modules():
        for key, p in mod._parameters.items():
            if p is None:
                continue
            if id(p) not in index:
                index[id(p)] = len(params)
                params.append(p)
            slots.append((mod, key, index[id(p)]))
    return slots, params


def _leaves(xs):
    return [x.detach().requires_grad_(True) for x in xs]


def _vjp(call, x, params, y_bar, *, create_graph, wrt_params=True):
    """Recompute y = f(x; params) with fresh leaves; returns (x leaf, param leaves, x̄, [θ̄_b]) for cotangent ȳ
    (without wrt_params only x̄ is computed: the weight-gradient half of the backward is skipped)."""
    lx = x.detach().requires_grad_(True)
    lp = _leaves(params) if wrt_params else [p.detach() for p in params]
    with torch.enable_grad(), call.replay():
        y = call.run(lx, lp)
        grads = torch.autograd.grad(y, [lx] + (lp if wrt_params else []), y_bar, create_graph=create_graph,
                                    allow_unused=True)
    return lx, lp, grads[0], list(grads[1:])


class _BlockBackward(torch.autograd.Function):
    """(x, ȳ, θ_b) -> (x̄, s_b = ⟨θ̄_b, v_b⟩): the block's first backward, itself differentiable one block at a time.

    Only the derivative of s_b is ever used (the HVP is ∇ of the sum of the shares), never its value: forward
    returns s_b = 0 and skips θ̄_b, saving the weight-gradient half of this recomputation's backward."""

    @staticmethod
    def forward(ctx, scope, call, vec, x, y_bar, *params):
        _, _, x_bar, _ = _vjp(call, x, params, y_bar, create_graph=False, wrt_params=False)
        s = x.new_zeros(())  # a stand-in value (see the class docstring); backward differentiates the true s_b
        ctx.scope, ctx.call, ctx.vec = scope, call, vec
        ctx.save_for_backward(x, y_bar, *params)
        return torch.zeros_like(x) if x_bar is None else x_bar, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, x_bar_bar, s_bar):
        x, y_bar, *params = ctx.saved_tensors
        ly_bar = y_bar.detach().requires_grad_(True)
        with torch.enable_grad():
            lx, lp, x_bar, p_bar = _vjp(ctx.call, x, params, ly_bar, create_graph=True)
            outs, cots = [], []
            if x_bar is not None and x_bar.requires_grad and x_bar_bar is not None:
                outs.append(x_bar)
                cots.append(x_bar_bar)
            for g, v in zip(p_bar, ctx.vec):
                if g is not None and v is not None and g.requires_grad and s_bar is not None:
                    outs.append(g)
                    cots.append(v.to(g.dtype) * s_bar)
            if not outs:
                return (None,) * (5 + len(params))
            # one block's second-order graph, alive only until this returns
            second = torch.autograd.grad(outs, [lx, ly_bar] + lp, cots, allow_unused=True)
        ctx.scope.add_(params, second[2:])
        return (None, None, None, second[0], second[1], *([None] * len(params)))


class _Block(torch.autograd.Function):
    """y = f(x; θ_b) saving only x. Backward: in the first backward of an HVP (grad mode on) the block's VJP as a
    `_BlockBackward` node, its s_b collected; otherwise (a plain backward) a recomputed VJP."""

    @staticmethod
    def forward(ctx, scope, call, x, *params):
        ctx.scope, ctx.call = scope, call
        ctx.save_for_backward(x, *params)
        # no replay here: the forward advances the global RNG exactly as the unwrapped block would
        return call.run(x, list(params))

    @staticmethod
    def backward(ctx, y_bar):
        x, *params = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the first backward of the HVP
            vec = [ctx.scope.directions.get(id(p)) for p in params]
            x_bar, s = _BlockBackward.apply(ctx.scope, ctx.call, vec, x, y_bar, *params)
            ctx.scope.shares.append(s)
            return (None, None, x_bar, *([None] * len(params)))
        # the second backward's pass through the forward chain: J_θ^T ȳ goes straight into acc (Scope.add_)
        _, _, x_bar, p_bar = _vjp(ctx.call, x, params, y_bar, create_graph=False)
        ctx.scope.add_(params, p_bar)
        return (None, None, x_bar, *([None] * len(params)))


def _is_cache(x):
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return False
    return isinstance(x, Cache)


def _blockwise_forward(scope, block, fn, hidden_states, *args, **kwargs):
    for what, val in list(enumerate(args)) + list(kwargs.items()):
        if torch.is_tensor(val) and val.requires_grad:
            raise ValueError(f"blockwise HVP: {type(block).__name__} argument {what!r} requires grad; only the "
                             "hidden states (first argument) may carry a gradient between blocks")
    # a KV cache (passed by keyword or position) would be appended to at every replay: training needs none
    args = tuple(None if _is_cache(a) else a for a in args)
    kwargs = {k: None if _is_cache(v) else v for k, v in kwargs.items()}
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    dev = hidden_states.device.type
    slots, params = _slots(block)
    call = _Call(fn=fn, args=args, kwargs=kwargs, slots=slots, cpu_rng=torch.get_rng_state(),
                 cuda_rng=torch.cuda.get_rng_state() if dev == "cuda" else None,
                 autocast=(dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev)))
    y = _Block.apply(scope, call, hidden_states, *params)
    return (y,) if call.tuple_out else y


@contextlib.contextmanager
def blockwise(blocks: list[nn.Module], directions: dict, accumulators: dict, forwards: list | None = None):
    """Run `blocks` as `_Block`s for the duration (one HVP). `directions` / `accumulators` map id(tensor a block
    computes with as a parameter) -> its direction / its slice of acc; `forwards` are the blocks' unwrapped
    forwards (default: their current ones)."""
    scope = Scope(directions=directions, accumulators=accumulators)
    forwards = forwards or [b.forward for b in blocks]
    try:
        for block, fn in zip(blocks, forwards):
            setattr(block, _ATTR, block.forward)
            block.forward = functools.partial(_blockwise_forward, scope, block, fn)
        yield scope
    finally:
        for block in blocks:
            if hasattr(block, _ATTR):
                block.forward = getattr(block, _ATTR)
                delattr(block, _ATTR)


def hvp_(loss_fn, blocks: list[nn.Module], leaves: list[torch.Tensor], vec: list[torch.Tensor],
         acc: list[torch.Tensor], *, directions: dict, accumulators: dict, forwards: list | None = None) -> None:
    """acc[k] += (H v)[k] for L = loss_fn(), H its Hessian w.r.t. `leaves` (one per parameter, requiring grad; the
    caller binds them, or differentiable functions of them such as dtype casts, into the model); `directions` and
    `accumulators` map id(each tensor the model computes with) -> its slice of v / of acc. `blocks` run one at a
    time (see above).

    Neither pass holds a parameter-sized gradient: the first backward turns each gradient into its share
    ⟨g_k, v_k⟩ as it arrives (blocks: inside `_BlockBackward`; other parameters: in a post-accumulate hook), the
    second adds each H·v piece into acc as it arrives and drops it."""
    state = {"create_graph": True, "shares": []}

    def arrived(p, v, a):
        if p.grad is None:  # a block's parameter in the first pass (its share went through the block)
            return
        if state["create_graph"]:
            state["shares"].append(torch.vdot(p.grad.reshape(-1), v.reshape(-1).to(p.grad.dtype)))
        else:
            a.add_(p.grad.to(a.dtype))
        p.grad = None  # the next piece of this leaf (the second pass) must not add to it; frees it now

    hooks = [x.register_post_accumulate_grad_hook(functools.partial(arrived, v=v, a=a))
             for x, v, a in zip(leaves, vec, acc)]
    try:
        with blockwise(blocks, directions, accumulators, forwards) as scope:
            loss = loss_fn()
            with warnings.catch_warnings():  # create_graph + .grad: the cycle it warns about is cut in `arrived`
                warnings.filterwarnings("ignore", message=".*create_graph=True.*reference cycle.*")
                torch.autograd.backward(loss, inputs=leaves, create_graph=True)
            if len(scope.shares) != len(blocks):
                raise RuntimeError(f"blockwise HVP: {len(scope.shares)} of {len(blocks)} blocks were reached by the "
                                   "backward pass (is a block called twice, or not on the path to the loss?)")
            del loss
            # ⟨∇L, v⟩ as a differentiable scalar (its value is not: the blocks' shares are stand-ins, only the
            # gradient of each share is right, and only the gradient is used)
            total = sum(scope.shares + state["shares"])
            scope.shares.clear()
            state["shares"].clear()
            state["create_graph"] = False
            torch.autograd.backward(total, inputs=leaves)
    finally:
        for h in hooks:
            h.remove()
