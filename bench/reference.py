"""The MAML-en-LLM meta-step written the obvious way: the yardstick bench/bench_meta_step.py measures against.

What a user would write without mamlen (DESIGN.md "The meta-step", same maths, no engine code shared):
  * θ, m, v are the model's own per-parameter tensors (no flat arena, no fused kernels);
  * the inner AdamW (shared moments, bias correction at τ = t + j, decoupled weight decay) is unrolled with
    `create_graph=True` through `torch.func.functional_call`, so autograd keeps every inner step's graph —
    forward activations, the first backward's graph and the AdamW arithmetic — until the query loss is
    differentiated: G_i = autograd.grad(L_Q(φ_K), θ);
  * eager attention (`set_attn_implementation("eager")`: T×T score matrices, differentiable twice);
  * no activation checkpointing;
  * the outer AdamW on the same per-parameter m, v (a plain loop).

The loss is the mean next-token cross-entropy over labels ≠ -100, computed in max(float32, logits dtype)
(the convention of `mamlen.core.causal_lm_loss`, written out again here). Like any careful user, the reference asks
the model for logits only where a label is set (HF `logits_to_keep` with a boolean mask): a MetaICL instance's
target is a few tokens at the end of up to 1024, and the (positions × vocabulary) head — with its second-order
graph — would otherwise dominate the reference's time and memory (at GPT-2 Medium width with 2 layers the tied
50257-way head is 51.5 M of 77.7 M parameters), making the engine look faster than it is.

    ref = ReferenceMetaLearner(model, inner_lr=1e-5, outer_lr=1e-5, inner_steps=1)
    G = ref.meta_gradient(tasks)      # {name: tensor}; tasks are mamlen.core.Task (support=[...], query=...)
    metrics = ref.step(tasks)
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.func import functional_call


def reference_loss(model, params: dict, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over labels ≠ -100 with the model's weights replaced by `params`."""
    next_labels = batch["labels"][:, 1:]                       # (B, T-1): position t predicts token t+1
    wanted = F.pad(next_labels != -100, (0, 1))                # (B, T): positions whose logits the loss reads
    out = functional_call(model, params, (), {"input_ids": batch["input_ids"],
                                              "attention_mask": batch.get("attention_mask"), "use_cache": False,
                                              "logits_to_keep": wanted})
    logits = out.logits  # (n, V): the wanted positions, row-major over (B, T)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, next_labels[next_labels != -100], reduction="mean")


def _safe_sqrt(x):
    # d√x/dx is infinite at 0, and 0·∞ = NaN would poison G on rows no token touches (g = v = 0);
    # DESIGN.md defines the v-adjoint as 0 there, which the double `where` gives.
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


class ReferenceMetaLearner:
    """θ (the model's parameters), shared AdamW moments `exp_avg`, `exp_avg_sq` and `step` per tensor."""

    def __init__(self, model, *, inner_lr=1e-5, outer_lr=1e-5, inner_steps=1, betas=(0.9, 0.999), eps=1e-8,
                 inner_weight_decay=0.0, outer_weight_decay=0.0, first_order=False, attn_implementation="eager"):
        self.model = model
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        self.inner_lr, self.outer_lr, self.K = inner_lr, outer_lr, inner_steps
        self.betas, self.eps = tuple(betas), eps
        self.inner_wd, self.outer_wd = inner_weight_decay, outer_weight_decay
        self.first_order = first_order  # FOMAML variant: g_j detached inside the unrolled loop
        self.params = dict(model.named_parameters())  # θ; tied weights appear once (functional_call re-ties)
        self.exp_avg = {n: torch.zeros_like(p, memory_format=torch.preserve_format) for n, p in self.params.items()}
        self.exp_avg_sq = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.step_count = 0

    def load_optimizer_state(self, state: dict) -> None:
        self.step_count = int(state["step"])
        for n in self.params:
            self.exp_avg[n].copy_(state["exp_avg"][n])
            self.exp_avg_sq[n].copy_(state["exp_avg_sq"][n])

    # -- the inner loop, unrolled -------------------------------------------------------------------------
    def adapted(self, task) -> dict:
        """φ_K(θ) as a differentiable function of θ (every inner step's graph is kept)."""
        b1, b2 = self.betas
        supports = list(task.support) if len(task.support) == self.K else list(task.support) * self.K
        assert len(supports) == self.K, f"{len(task.support)} support batches for inner_steps={self.K}"
        phi = dict(self.params)
        m, v = dict(self.exp_avg), dict(self.exp_avg_sq)  # m_0, v_0: constants
        for j, batch in enumerate(supports, start=1):
            loss = reference_loss(self.model, phi, batch)
            grads = torch.autograd.grad(loss, list(phi.values()), create_graph=not self.first_order)
            tau = self.step_count + j
            a, b = 1.0 / (1.0 - b1 ** tau), 1.0 / (1.0 - b2 ** tau)
            new = {}
            for (n, p), g in zip(phi.items(), grads):
                m[n] = b1 * m[n] + (1 - b1) * g
                v[n] = b2 * v[n] + (1 - b2) * g * g
                new[n] = (1 - self.inner_lr * self.inner_wd) * p - self.inner_lr * a * m[n] / (_safe_sqrt(b * v[n]) + self.eps)
            phi = new
        return phi

    def meta_gradient(self, tasks) -> dict:
        """G = mean over tasks (and over ranks when torch.distributed is initialised) of dL_Q(φ_K)/dθ."""
        names = list(self.params)
        G = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self._losses = []
        for task in tasks:
            phi = self.adapted(task)
            q_loss = reference_loss(self.model, phi, task.query)
            gi = torch.autograd.grad(q_loss, [self.params[n] for n in names])  # frees the whole unrolled graph
            for n, g in zip(names, gi):
                G[n] += g
            self._losses.append(float(q_loss.detach()))
            del phi, q_loss, gi
        n_tasks = torch.tensor([float(len(tasks))], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for g in G.values():
                dist.all_reduce(g)
            dist.all_reduce(n_tasks)
        for g in G.values():
            g.div_(n_tasks.item())
        return G

    @torch.no_grad()
    def outer_step(self, G: dict) -> None:
        """AdamW on θ with the shared m, v: m ← β1 m + (1-β1) G, v ← β2 v + (1-β2) G², t ← t+1,
        θ ← (1-βλₒ) θ - β a m / (√(b v) + ε)."""
        b1, b2 = self.betas
        self.step_count += 1
        a, b = 1.0 / (1.0 - b1 ** self.step_count), 1.0 / (1.0 - b2 ** self.step_count)
        for n, p in self.params.items():
            m, v, g = self.exp_avg[n], self.exp_avg_sq[n], G[n]
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            p.mul_(1 - self.outer_lr * self.outer_wd)
            p.addcdiv_(m, (v * b).sqrt_().add_(self.eps), value=-self.outer_lr * a)

    def step(self, tasks) -> dict:
        t0 = time.perf_counter()
        G = self.meta_gradient(tasks)
        self.outer_step(G)
        return {"loss": sum(self._losses) / len(self._losses), "step": self.step_count,
                "seconds": time.perf_counter() - t0}
