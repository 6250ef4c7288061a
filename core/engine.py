"""MetaEngine: the MAML-en-LLM meta-step on any Hugging Face causal LM (DESIGN.md "The meta-step").

Per task i (support batches S_1..S_K, query Q), starting from φ_0 = θ and the shared moments m, v:

    forward   for j = 1..K:  g_j = ∇L_{S_j}(φ_{j-1});  (φ_j, m_j, v_j) = inner AdamW step      [kernels]
              p̄ = ∇L_Q(φ_K)                                   (first-order: no graph kept)
    reverse   for j = K..1:  (ḡ, c·p̄, m̄, v̄) = adjoint of step j                              [kernels]
                             p̄ = c·p̄ + H_{S_j}(φ_{j-1}) ḡ        (core/hvp.py, per mode)
              G_i = p̄
    G = mean_i G_i (all ranks);  outer AdamW/SGD on θ, m, v, t                                  [kernels]

Memory: per task the forward keeps, per inner step, φ_{j-1} (for j ≥ 2), g_j, and m_j, v_j for j ≥ 2 — m_1, v_1 are
recomputed in the reverse pass from m_0, v_0 (the shared moments, read in chunks: 8-bit moments are never
dequantised whole) — and no autograd graph (inner_graph="recompute"). The reverse pass runs the adjoint in place
over the tape (p̄ in place, ḡ over g_j, m̄/v̄ over m_j/v_j) and frees each buffer as soon as it is dead; every HVP
adds into p̄ parameter by parameter (core/hvp.py). At K = 1 the HVP runs with θ, m, v, p̄ (= G for the first task),
ḡ plus one transformer block's second-order graph at a time (exact: core/block_recompute.py); the step's peak is
the query gradient (θ, m, v, g_1, φ_1 and the gradient being filled; bench/memory_stages.py shows each stage).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from mamlen import kernels
from mamlen.core import activation_checkpoint, attention, forward_ad, hvp
from mamlen.core.arena import ParamArena
from mamlen.core.config import MetaConfig
from mamlen.core.loss import Objective, RngState, count_targets
from mamlen.core.quantized_moments import chunks
from mamlen.core.sharding import OuterState

# elements per chunk where m_0, v_0 are read piecewise (a multiple of the 8-bit block; 4 MiB of float32)
MOMENT_CHUNK = 1 << 20


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


@dataclass
class _InnerStep:
    """What the reverse pass needs of inner step j (DESIGN.md notation)."""
    phi: list                # φ_{j-1}, where g_j was taken and H_{S_j} is evaluated
    g: list                  # g_j = ∇L_{S_j}(φ_{j-1}); the adjoint writes ḡ over it
    m: Optional[list]        # m_j, v_j; None at j = 1 (recomputed from m_0, v_0, g_1 chunk by chunk)
    v: Optional[list]
    rng: RngState            # the dropout masks of L_{S_j}
    kept: Optional[tuple]    # inner_graph="keep": (g_j with its graph, leaves)


# the per-step sums reduced across ranks with G: [tasks, L_Q(φ_K), L_S1(θ), tokens, L_Q(θ)]
_STATS = ("tasks", "query_loss", "support_loss", "tokens", "query_loss_before")


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
        self._zero_chunk = {}  # moments="separate": m_0 = v_0 = 0, read chunk by chunk
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
        loss_sum, tokens = 0.0, 0
        for batch in batches:  # one backward per batch: peak memory of a single batch
            batch = self.obj.to_device(batch)
            loss, g = hvp.gradient(self.obj, self.arena.flats, batch, RngState(self.arena.device))
            for acc, gi in zip(G, g):
                acc.add_(gi)
            loss_sum += float(loss)
            tokens += count_targets(batch)
        # no adaptation: the "before" loss is the loss itself
        stats = torch.tensor([len(batches), loss_sum, loss_sum, tokens, loss_sum], dtype=torch.float64,
                             device=self.arena.device)
        G = self.opt_state.reduce_(G, stats)  # sync point; this rank's shard of the mean when sharded
        return self._outer(G, stats, t0)

    def optimizer_state(self) -> dict:
        """{"step": int, "exp_avg": {name: T}, "exp_avg_sq": {name: T}} (+ "master": {name: float32 T} with
        master_weights) — full-size copies (gathered, dequantised), safe to save and loadable at any world size.
        A collective when the state is sharded: every rank must call it."""
        full = self.opt_state.state_dict()
        state = {"step": self.step_count,
                 "exp_avg": {n: t.clone() for n, t in self.arena.views(full["exp_avg"]).items()},
                 "exp_avg_sq": {n: t.clone() for n, t in self.arena.views(full["exp_avg_sq"]).items()}}
        if full["master"] is not None:
            masters = [m if m is not None else f.to(kernels.state_dtype(f.dtype))
                       for m, f in zip(full["master"], self.arena.flats)]
            state["master"] = {n: t.clone() for n, t in self.arena.views(masters).items()}
        if full["quantized"] is not None:  # moments_bits=8: the exact codes ({"exp_avg.codes.<flat>": uint8, ...})
            state["quantized"] = {k: t.clone() for k, t in full["quantized"].items()}
        return state

    def load_optimizer_state(self, state: dict) -> None:
        for key in ("step", "exp_avg", "exp_avg_sq"):
            if key not in state:
                raise KeyError(f"load_optimizer_state: missing {key!r}")
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"load_optimizer_state: step must be ≥ 0, got {step}")
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
        sums = torch.zeros(len(_STATS), dtype=torch.float64)
        with self.opt_state.materialized():  # sharded shared moments: gathered in full for this step's tasks
            for i, task in enumerate(tasks):
                r = self._task_gradient_into(task, G, i)
                sums += torch.tensor([1.0, r.query_loss, r.support_loss, r.tokens, r.query_loss_before],
                                     dtype=torch.float64)  # (the default float32 would round the losses)
        # reduced with G in the same sync
        stats = sums.to(self.arena.device)
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
        b1, b2 = cfg.betas
        supports = self._support(task, i)
        query = obj.to_device(task.query)
        adamw = cfg.inner_optimizer == "adamw"
        # m_0, v_0 are read chunk by chunk (_initial_moments), never copied whole; m_1, v_1 are not stored either
        # (recomputed from m_0, v_0, g_1 in the reverse pass), so step 1 keeps only φ_0 and g_1
        m = v = None
        t0 = self.step_count if cfg.moments == "shared" else 0
        keep = cfg.hvp == "exact" and cfg.inner_graph == "keep"

        # L_Q(θ) before adaptation (no graph): the query's first evaluation, so it fixes the query's dropout masks
        # and L_Q(φ_K) below replays them (without measure_adaptation, L_Q(φ_K) is the first evaluation)
        q_rng = RngState(self.arena.device)
        q_before = math.nan
        if cfg.measure_adaptation:
            with torch.no_grad(), q_rng.replay():
                q_before = float(obj.loss(query))

        # forward: K inner steps, one _InnerStep record each on the tape. φ lives in the state
        # dtype: an inner step of bfloat16 weights would mostly round away (at lr 1e-5, most N(0, 0.02) weights
        # do not move) while the adjoint differentiates the unrounded map; the model sees φ cast to its dtype
        phi = [f if f.dtype == _sd(f.dtype) else f.to(_sd(f.dtype)) for f in self.arena.flats]
        tape = []
        s_first = None
        for j, batch in enumerate(supports, start=1):
            rng = RngState(self.arena.device)
            # exact / mixed differentiate this loss again in the reverse pass: same attention (and dropout masks)
            with attention.using(self.model, self.attention.second_order):
                if keep:
                    loss, g_graph, leaves = hvp.gradient(obj, phi, batch, rng, create_graph=True)
                    g = [x.detach() for x in g_graph]
                    kept = (g_graph, leaves)
                else:
                    loss, g = hvp.gradient(obj, phi, batch, rng)
                    kept = None
            s_first = float(loss) if s_first is None else s_first
            if adamw:
                hp = dict(lr=cfg.inner_lr, beta1=b1, beta2=b2, eps=cfg.eps, weight_decay=cfg.inner_weight_decay,
                          step=t0 + j)
                if j == 1:
                    phi_new, m, v = self._first_inner_step(phi, g, hp, keep_moments=len(supports) > 1)
                else:
                    phi_new, m, v = [list(x) for x in zip(*[kernels.inner_adamw_forward(p, gi, mi, vi, **hp)
                                                            for p, gi, mi, vi in zip(phi, g, m, v)])]
            else:
                phi_new = [kernels.inner_sgd_forward(p, gi, lr=cfg.inner_lr, weight_decay=cfg.inner_weight_decay)
                           for p, gi in zip(phi, g)]
            tape.append(_InnerStep(phi=phi, g=g, m=m if adamw and j > 1 else None, v=v if adamw and j > 1 else None,
                                   rng=rng, kept=kept))
            phi = phi_new
        # no name but the tape may keep a step's buffers: the reverse pass frees each as soon as it is dead
        del m, v, phi_new, g, kept
        g_graph = leaves = None  # noqa: F841  (inner_graph="keep": the last step's graph lives on in the tape)

        # query gradient at φ_K: first-order only
        q_loss, p_bar = hvp.gradient(obj, phi, query, q_rng)
        del phi
        p_bar = [x.to(_sd(x.dtype)) for x in p_bar]

        # reverse recursion. Every elementwise stage writes into buffers that die with it (no allocation):
        # p̄ in place; ḡ over g_j (unless g_j's storage belongs to a kept graph, or is narrower than ḡ);
        # m̄, v̄ over m_j, v_j (read lane by lane before written). m̄ = v̄ = 0 at j = K: one zero buffer.
        m_bar = v_bar = None
        for j in range(len(supports), 0, -1):
            step = tape.pop()
            phi_prev, g, m_j, v_j, rng, kept = step.phi, step.g, step.m, step.v, step.rng, step.kept
            del step  # the names below own the buffers: each is freed as soon as it is dead
            if adamw and j == 1:
                g_bar = self._first_adjoint_step(phi_prev, g, p_bar, m_bar, v_bar, kept, step=t0 + 1)
                m_bar = v_bar = None
            elif adamw:
                if m_bar is None:
                    m_bar = v_bar = [torch.zeros_like(x) for x in p_bar]
                g_bar = [gi if kept is None and gi.dtype == pb.dtype else torch.empty_like(pb)
                         for gi, pb in zip(g, p_bar)]
                for args in zip(p_bar, m_bar, v_bar, g, m_j, v_j, g_bar):  # no loop name outlives its buffer
                    kernels.inner_adamw_adjoint(*args[:6], lr=cfg.inner_lr, beta1=b1, beta2=b2, eps=cfg.eps,
                                                weight_decay=cfg.inner_weight_decay, step=t0 + j,
                                                out=(args[6], args[0], args[4], args[5]))
                del args
                # m_j, v_j now hold β1·m̄, β2·v̄ for step j-1 (unused after j = 1: freed before the HVP)
                m_bar, v_bar = (m_j, v_j) if j > 1 else (None, None)
            else:
                outs = [kernels.inner_sgd_adjoint(pb, lr=cfg.inner_lr, weight_decay=cfg.inner_weight_decay)
                        for pb in p_bar]
                g_bar, p_bar = [list(x) for x in zip(*outs)]
                del outs
            del g, m_j, v_j  # this step's tape entries are no longer needed
            batch = supports[j - 1]
            with attention.using(self.model, self.attention.second_order):  # p̄ += H_{S_j}(φ_{j-1}) ḡ
                if kept is not None:
                    hvp.kept_(obj, kept, rng, g_bar, p_bar)
                else:
                    hvp.MODES[cfg.hvp](obj, phi_prev, batch, rng, g_bar, p_bar,
                                       hvp.Options(fd_eps=cfg.fd_eps, forward_ad=self._forward_ad))
            del phi_prev, g_bar, kept
        if not G:
            G.extend(p_bar)
        else:
            for acc, gi in zip(G, p_bar):
                acc.add_(gi)
        return _TaskResult(query_loss=float(q_loss), support_loss=s_first, query_loss_before=q_before,
                           tokens=count_targets(query) + sum(count_targets(b) for b in supports))

    def _initial_moments(self, i, start, length, dtype):
        """m_0, v_0 [start, start + length) of flat buffer i: the shared moments, or zeros (moments="separate")."""
        if self.config.moments == "shared":
            return self.opt_state.moments_chunk(i, start, length)
        z = self._zero_chunk.get(dtype)
        if z is None or z.numel() < length:  # one zero chunk per dtype, read-only, reused by every call
            z = self._zero_chunk[dtype] = torch.zeros(max(length, MOMENT_CHUNK), dtype=dtype, device=self.arena.device)
        return z[:length], z[:length]

    def _first_inner_step(self, phi, g, hp, *, keep_moments):
        """φ_1 (and m_1, v_1 when a second inner step needs them) from φ_0, g_1 and m_0, v_0 read chunk by chunk."""
        out_phi, out_m, out_v = [], [], []
        for i, (p, gi) in enumerate(zip(phi, g)):
            sd = _sd(p.dtype)
            p1 = torch.empty_like(p)
            m1 = v1 = None
            if keep_moments:
                m1, v1 = p.new_empty(p.numel(), dtype=sd), p.new_empty(p.numel(), dtype=sd)
            else:
                scratch_m, scratch_v = (p.new_empty(min(p.numel(), MOMENT_CHUNK), dtype=sd) for _ in range(2))
            for s, n in chunks(p.numel(), MOMENT_CHUNK):
                m0, v0 = self._initial_moments(i, s, n, sd)
                mo, vo = (m1[s:s + n], v1[s:s + n]) if keep_moments else (scratch_m[:n], scratch_v[:n])
                kernels.inner_adamw_forward(p[s:s + n], gi[s:s + n], m0, v0, **hp, out=(p1[s:s + n], mo, vo))
            out_phi.append(p1)
            out_m.append(m1)
            out_v.append(v1)
        return out_phi, out_m, out_v

    def _first_adjoint_step(self, phi0, g, p_bar, m_bar, v_bar, kept, *, step):
        """The adjoint of inner step 1 in place (p̄ in place, ḡ over g_1 where it can), with m_1, v_1 recomputed
        chunk by chunk from m_0, v_0 and g_1 — bit-identical to the forward's. m̄ = v̄ = None means zero (K = 1).
        Returns ḡ."""
        cfg = self.config
        b1, b2 = cfg.betas
        hp = dict(lr=cfg.inner_lr, beta1=b1, beta2=b2, eps=cfg.eps, weight_decay=cfg.inner_weight_decay, step=step)
        g_bar = []
        for i, (p0, gi, pb) in enumerate(zip(phi0, g, p_bar)):
            sd = pb.dtype
            gb = gi if kept is None and gi.dtype == sd else torch.empty_like(pb)
            c = min(pb.numel(), MOMENT_CHUNK)
            sp, sm, sv = p0.new_empty(c), pb.new_empty(c), pb.new_empty(c)
            zero = pb.new_zeros(c) if m_bar is None else None
            for s, n in chunks(pb.numel(), MOMENT_CHUNK):
                m0, v0 = self._initial_moments(i, s, n, sd)
                kernels.inner_adamw_forward(p0[s:s + n], gi[s:s + n], m0, v0, **hp, out=(sp[:n], sm[:n], sv[:n]))
                mb, vb = (zero[:n], zero[:n]) if m_bar is None else (m_bar[i][s:s + n], v_bar[i][s:s + n])
                kernels.inner_adamw_adjoint(pb[s:s + n], mb, vb, gi[s:s + n], sm[:n], sv[:n], **hp,
                                            out=(gb[s:s + n], pb[s:s + n], sm[:n], sv[:n]))
            g_bar.append(gb)
        return g_bar

    # -- the outer update ---------------------------------------------------------------------------------
    def _outer(self, G, stats, t0) -> dict:
        cfg = self.config
        n_tasks, q_sum, s_sum, tokens, before_sum = stats.tolist()
        loss, support_loss = q_sum / n_tasks, s_sum / n_tasks
        norm = self.opt_state.grad_norm(G)  # over all shards: the same value on every rank
        finite = math.isfinite(loss) and math.isfinite(support_loss) and math.isfinite(norm)
        # adapt_gain > 0: the inner step lowered the query loss (L_Q(θ) - L_Q(φ_K), mean over tasks)
        metrics = {"loss": loss, "support_loss": support_loss, "query_loss_before": before_sum / n_tasks,
                   "adapt_gain": (before_sum - q_sum) / n_tasks, "grad_norm": norm, "tokens": int(tokens),
                   "skipped": not finite}
        if finite:
            if cfg.max_grad_norm is not None and norm > cfg.max_grad_norm:
                for g in G:
                    g.mul_(cfg.max_grad_norm / norm)
            self.step_count += 1
            self.opt_state.apply_(G, self.step_count)  # fused kernels on this rank's slice, then all-gather
        metrics["step"] = self.step_count
        metrics["seconds"] = time.perf_counter() - t0
        return metrics
