"""MetaEngine: the MAML-en-LLM meta-step on any Hugging Face causal LM (DESIGN.md "The meta-step").

Per task i (support batches S_1..S_K, query Q), starting from φ_0 = θ and the shared moments m, v:

    forward   for j = 1..K:  g_j = ∇L_{S_j}(φ_{j-1});  (φ_j, m_j, v_j) = inner AdamW step      [kernels]
              p̄ = ∇L_Q(φ_K)                                   (first-order: no graph kept)
    reverse   for j = K..1:  (ḡ, c·p̄, m̄, v̄) = adjoint of step j                              [kernels]
                             p̄ = c·p̄ + H_{S_j}(φ_{j-1}) ḡ        (core/hvp.py, per mode)
              G_i = p̄
    G = mean_i G_i (all ranks);  outer AdamW/SGD on θ, m, v, t                                  [kernels]

Memory: per task the forward keeps, per inner step, φ_{j-1} (for j ≥ 2), g_j and, for j < K, m_j, v_j — the moments
each step starts from (core/inner_step.py: m_0, v_0 are the shared moments read in chunks, so 8-bit moments are never
dequantised whole; the adjoint recomputes m_j, v_j from them) — and no autograd graph (inner_graph="recompute"). The
reverse pass runs the adjoint in place (p̄ in place, ḡ over g_j, m̄/v̄ over m_{j-1}/v_{j-1}) and frees each buffer
as soon as it is dead; every HVP adds into p̄ parameter by parameter (core/hvp.py). At K = 1 the HVP runs with θ, m,
v, p̄ (= G for the first task), ḡ plus one transformer block's second-order graph at a time (exact:
core/block_recompute.py); the step's peak is the query gradient (θ, m, v, g_1, φ_1 and the gradient being filled;
bench/memory_stages.py shows each stage).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from mamlen import kernels
from mamlen.core import activation_checkpoint, attention, forward_ad, hvp, inner_step, outer_step
from mamlen.core.arena import ParamArena
from mamlen.core.config import MetaConfig
from mamlen.core.loss import Objective, RngState, count_inputs, count_targets
from mamlen.core.sharding import OuterState


@dataclass
class Task:
    """One task of a meta-batch: `support` holds K batches (or one, reused for all K inner steps), `query` one.
    Batches are HF dicts: input_ids, attention_mask, labels (-100 outside the target)."""
    support: list
    query: dict
    name: Optional[str] = field(default=None)


@dataclass
class _TaskResult:
    query_loss: float         # L_Q(φ_K)
    support_loss: float       # L_{S_1}(θ)
    query_loss_before: float  # L_Q(θ): the query loss without adaptation
    tokens: int               # target tokens of the query and the support batches
    input_tokens: int         # non-padding tokens of the query and the support batches


def _sd(dtype):
    return kernels.state_dtype(dtype)


class MetaEngine:
    """Meta-gradients and meta-steps for `model` with the optimizer state (step, exp_avg, exp_avg_sq) it owns.

    Building the engine packs the model's trainable parameters into flat buffers (the model stays usable as
    before: its parameters are views into them), chooses the attention implementations for `config.hvp`
    (core/attention.py: the model rests on the fastest first-order one) and applies activation checkpointing if asked.
    """

    def __init__(self, model, config: Optional[MetaConfig] = None, *, loss_fn: Optional[Callable] = None,
                 process_group=None):
        self.model = model
        self.config = config or MetaConfig()
        self.config.validate()
        if self.config.fsdp:
            raise ValueError("MetaConfig.fsdp=True: build mamlen.core.FSDPMetaEngine (MetaEngine keeps full parameters)")
        self.group = process_group
        self.attention = attention.configure(model, self.config.hvp, self.config.attn_implementation)
        if self.config.hvp == "mixed":
            forward_ad.make_forward_differentiable(model)
        if self.config.checkpointing:
            activation_checkpoint.enable(model)
        self.arena = ParamArena(model)
        self.config.check_param_dtypes(self.arena.dtypes)
        self.obj = Objective(model, self.arena, loss_fn, self.config.autocast_dtype)
        self.step_count = 0
        # m, v (full or this rank's shard, float or 8-bit), master weights, the G reduction: core/sharding.py
        self.opt_state = OuterState(self.arena, self.config, process_group)
        # m_0 = v_0 = 0 (moments="separate") and m̄ = v̄ = 0 at j = K: one read-only zero chunk per dtype
        self._zero_moments = inner_step.ZeroMoments(self.opt_state.state_dtypes, self.arena.device)
        self._forward_ad = hvp.ForwardAD()  # hvp="mixed": falls back to exact if the model lacks forward AD

    # -- public API ---------------------------------------------------------------------------------------
    def meta_gradient(self, tasks: list[Task]) -> dict[str, torch.Tensor]:
        """G = mean over tasks (over all ranks when distributed) of dL_Q(φ_K)/dθ. Mutates nothing."""
        G, stats = self._meta_gradient(tasks)
        return self.arena.views(self.opt_state.full(G))

    def step(self, tasks: list[Task]) -> dict:
        """One meta-step: the meta-gradient, then the outer update of θ and the shared moments.
        A non-finite loss or meta-gradient skips the update (θ, m, v, step untouched): metrics["skipped"]."""
        t0 = time.perf_counter()
        G, stats = self._meta_gradient(tasks)
        return self._outer(G, stats, t0)

    def metaicl_step(self, batches: list[dict]) -> dict:
        """MetaICL baseline: θ ← AdamW(θ, ∇ mean_i L_{B_i}(θ)) on the same moments object."""
        t0 = time.perf_counter()
        if not batches:
            raise ValueError("metaicl_step: no batches")
        self.arena.check_bound()
        G = self.arena.new(_sd)
        loss_sum, tokens, inputs = 0.0, 0, 0
        for batch in batches:  # one backward per batch: peak memory of a single batch
            batch = self.obj.to_device(batch)
            loss, g = hvp.gradient(self.obj, self.arena.flats, batch, RngState(self.arena.device))
            for acc, gi in zip(G, g):
                acc.add_(gi)
            loss_sum += float(loss)
            tokens += count_targets(batch)
            inputs += count_inputs(batch)
        # no adaptation: the "before" loss is the loss itself
        stats = outer_step.StepSums(tasks=len(batches), query_loss=loss_sum, support_loss=loss_sum, tokens=tokens,
                                    query_loss_before=loss_sum, input_tokens=inputs).tensor(self.arena.device)
        G = self.opt_state.reduce_(G, stats)  # sync point; this rank's shard of the mean when sharded
        return self._outer(G, stats, t0)

    def optimizer_state(self) -> dict:
        """{"step": int, "exp_avg": {name: T}, "exp_avg_sq": {name: T}} (+ "master": {name: float32 T} with
        master_weights) — full-size copies (gathered, dequantised), safe to save and loadable at any world size.
        A collective when the state is sharded: every rank must call it."""
        full = self.opt_state.state_dict()
        state = outer_step.export(full, self.arena.flats, self.step_count,
                                  lambda flats: {n: t.clone() for n, t in self.arena.views(flats).items()})
        if full["quantized"] is not None:  # moments_bits=8: the exact codes ({"exp_avg.codes.<flat>": uint8, ...})
            state["quantized"] = {k: t.clone() for k, t in full["quantized"].items()}
        return state

    def load_optimizer_state(self, state: dict) -> None:
        step = outer_step.loaded_step(state)
        m = self.arena.flatten(state["exp_avg"], _sd)
        v = self.arena.flatten(state["exp_avg_sq"], _sd)
        if any(bool((x < 0).any()) for x in v):
            raise ValueError("load_optimizer_state: exp_avg_sq has negative entries")
        # without a saved master copy (e.g. a float32 checkpoint) it restarts from the current weights
        master = self.arena.flatten(state["master"], _sd) if "master" in state else None
        self.opt_state.load_(m, v, master, state.get("quantized"))
        self.step_count = step

    # -- the meta-gradient --------------------------------------------------------------------------------
    def _meta_gradient(self, tasks):
        if not tasks:
            raise ValueError("meta_gradient: no tasks")
        self.config.validate()
        self.arena.check_bound()
        G = []  # the first task's G_i becomes the accumulator: one parameter-sized buffer fewer during it
        sums = outer_step.StepSums(tasks=0, query_loss=0.0, support_loss=0.0, tokens=0, query_loss_before=0.0)
        with self.opt_state.materialized():  # sharded shared moments: gathered in full for this step's tasks
            for i, task in enumerate(tasks):
                r = self._task_gradient_into(task, G, i)
                sums.tasks += 1
                sums.query_loss += r.query_loss
                sums.support_loss += r.support_loss
                sums.tokens += r.tokens
                sums.input_tokens += r.input_tokens
                sums.query_loss_before += r.query_loss_before
        # reduced with G in the same sync
        stats = sums.tensor(self.arena.device)
        G = self.opt_state.reduce_(G, stats)  # all-reduce, or reduce-scatter to this rank's shard when sharded
        return G, stats

    def _support(self, task, i):
        K = self.config.inner_steps
        if not isinstance(task, Task):
            raise TypeError(f"task {i}: expected mamlen.core.Task, got {type(task).__name__}")
        if len(task.support) == 1:
            return [self.obj.to_device(task.support[0])] * K
        if len(task.support) != K:
            raise ValueError(f"task {i}{' (' + task.name + ')' if task.name else ''}: {len(task.support)} "
                             f"support batches for inner_steps={K}; give {K} or 1 (reused)")
        return [self.obj.to_device(b) for b in task.support]

    def _task_gradient_into(self, task: Task, G, i) -> "_TaskResult":
        """G += G_i."""
        cfg, obj = self.config, self.obj
        rule = inner_step.InnerRule.of(cfg)
        supports = self._support(task, i)
        query = obj.to_device(task.query)
        t0 = self.step_count if cfg.moments == "shared" else 0
        keep = cfg.hvp == "exact" and cfg.inner_graph == "keep"

        # L_Q(θ) before adaptation (no graph): the query's first evaluation, so it fixes the query's dropout masks
        # and L_Q(φ_K) below replays them (without measure_adaptation, L_Q(φ_K) is the first evaluation)
        q_rng = RngState(self.arena.device)
        q_before = math.nan
        if cfg.measure_adaptation:
            with torch.no_grad(), q_rng.replay():
                q_before = float(obj.loss(query))

        # forward: K inner steps, one InnerStep record each on the tape. φ lives in the state dtype: an inner step
        # of bfloat16 weights would mostly round away (at lr 1e-5, most N(0, 0.02) weights do not move) while the
        # adjoint differentiates the unrounded map; the model sees φ cast to its dtype. m_0, v_0 are read chunk by
        # chunk from the shared moments (or zeros), m_j, v_j are kept only as the next step's source (j < K)
        phi = [f if f.dtype == _sd(f.dtype) else f.to(_sd(f.dtype)) for f in self.arena.flats]
        moments = self._initial_moments() if rule.has_moments else None
        tape = []
        s_first = None
        for j, batch in enumerate(supports, start=1):
            rng = RngState(self.arena.device)
            # exact / mixed differentiate this loss again in the reverse pass: same attention (and dropout masks)
            with attention.using(self.model, self.attention.second_order):
                if keep:
                    # the tape's `kept` holds the graph
                    loss, kept = hvp.gradient(obj, phi, batch, rng, create_graph=True)
                    g = [x.detach() for x in kept.grads]
                else:
                    loss, g = hvp.gradient(obj, phi, batch, rng)
                    kept = None
            s_first = float(loss) if s_first is None else s_first
            phi_next, moments_next = inner_step.forward(rule, phi, g, moments, step=t0 + j,
                                                        keep_moments=j < len(supports))
            tape.append(inner_step.InnerStep(phi=phi, g=g, moments=moments, step=t0 + j, rng=rng, batch=batch,
                                             kept=kept))
            phi, moments = phi_next, moments_next
        del phi_next, moments_next, moments, g, kept, rng  # the tape holds what the reverse pass needs

        # query gradient at φ_K: first-order only
        q_loss, p_bar = hvp.gradient(obj, phi, query, q_rng)
        del phi
        # reverse recursion from p̄ = ∇L_Q(φ_K), m̄ = v̄ = 0; each step's buffers are freed as soon as they are dead
        adj = inner_step.Adjoint(p_bar=[x.to(_sd(x.dtype)) for x in p_bar],
                                 moments=self._zero_moments if rule.has_moments else None)
        del p_bar
        opts = hvp.Options(fd_eps=cfg.fd_eps, forward_ad=self._forward_ad)
        while tape:
            rec = tape.pop()
            g_bar = inner_step.adjoint_(rule, rec, adj)
            rec.g = rec.moments = None  # dead (ḡ may own g_j's storage; m̄, v̄ may own m_{j-1}'s)
            with attention.using(self.model, self.attention.second_order):  # p̄ += H_{S_j}(φ_{j-1}) ḡ
                if rec.kept is not None:
                    hvp.kept_(obj, rec.kept, rec.rng, g_bar, adj.p_bar)
                else:
                    hvp.MODES[cfg.hvp](obj, rec.phi, rec.batch, rec.rng, g_bar, adj.p_bar, opts)
            del rec, g_bar
        if not G:
            G.extend(adj.p_bar)
        else:
            for acc, gi in zip(G, adj.p_bar):
                acc.add_(gi)
        return _TaskResult(query_loss=float(q_loss), support_loss=s_first, query_loss_before=q_before,
                           tokens=count_targets(query) + sum(count_targets(b) for b in supports),
                           input_tokens=count_inputs(query) + sum(count_inputs(b) for b in supports))

    def _initial_moments(self) -> inner_step.MomentSource:
        """m_0, v_0: the shared moments (full, gathered shards or 8-bit codes), or zeros (moments="separate")."""
        if self.config.moments == "shared":
            return inner_step.SharedMoments(self.opt_state)
        return self._zero_moments

    # -- the outer update ---------------------------------------------------------------------------------
    def _outer(self, G, stats, t0) -> dict:
        norm = self.opt_state.grad_norm(G)  # over all shards: the same value on every rank
        metrics, self.step_count = outer_step.update_(self.config, self.opt_state, G, outer_step.StepSums.of(stats),
                                                      norm, self.step_count)
        metrics["seconds"] = time.perf_counter() - t0
        return metrics
