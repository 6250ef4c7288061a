"""FSDPMetaEngine: the MAML-en-LLM meta-step on FSDP2-sharded parameters (DESIGN.md "Distributed").

Every stage of the meta-step but the HVP is elementwise, so with the parameters sharded by
`torch.distributed.fsdp.fully_shard` each rank runs it on its own shards with the fused kernels. Only gradients
need the whole model, and FSDP gives them: `loss.backward()` all-gathers each block's parameters for its forward
and backward, and reduce-scatters the gradient into the sharded `.grad` (`autograd.grad` w.r.t. sharded
parameters does not work: the engine reads `.grad`). Per task (every rank runs every task, on its rows of each
batch), with W ranks and every buffer below of P/W elements:

    forward   for j = 1..K:  write φ_{j-1} into the parameters' shards; backward → g_j (this rank's shard)
                             (φ_j, m_j, v_j) = inner step on the shards                               [kernels]
              p̄ = shard of ∇L_Q(φ_K)
    reverse   for j = K..1:  (ḡ, c·p̄, m̄, v̄) = adjoint of step j                                      [kernels]
                             fd: p̄ += (∇L(φ_{j-1} + rḡ) - ∇L(φ_{j-1} - rḡ)) / 2r,   [2 backwards]
                                 r = fd_eps/‖ḡ‖ (‖ḡ‖ all-reduced over the ranks' shards)
    G = mean over tasks of the G_i shards; outer AdamW/SGD on the shards; θ written back into the parameters.

Loss normalisation. A batch's loss is the mean over all its target tokens (N of them). Rank r holds rows
[r·B/W, (r+1)·B/W) and computes Σ_{its target tokens} CE / N (every rank sees the whole batch, so N needs no
communication), and FSDP is told to sum rather than average in its reduce-scatter (gradient divide factor 1):
the shard it delivers is exactly this rank's part of ∇ of the whole batch's mean, and the meta-step equals the
single-process one up to summation order. A custom `loss_fn` must therefore be a mean over target tokens too.

Memory per rank: the parameters' shards (FSDP's storage; φ is written into them before each forward), θ, m, v and
the tape (φ_j, g_j, m_j, v_j for j < K, p̄, ḡ) — each P/W — plus FSDP's transient full parameters of about two
blocks. The inner step and its adjoint are MetaEngine's (core/inner_step.py): m_0, v_0 are read chunk by chunk, so
8-bit moments are never dequantised whole. Supported: hvp fd / first_order, MetaICL steps, shared or separate moments, K ≥ 1, adamw or sgd inner
and outer, 8-bit moments, bfloat16 + master weights, activation checkpointing. Refused: exact / mixed (no
second-order autograd through FSDP), shard_state (FSDP already shards the state).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from mamlen import kernels
from mamlen.core import activation_checkpoint, attention, inner_step, outer_step
from mamlen.core.config import MetaConfig
from mamlen.core.engine import Task
from mamlen.core.loss import Objective, RngState, count_inputs, count_targets
from mamlen.core.sharding import OuterState


def _sd(dtype):
    return kernels.state_dtype(dtype)


# ---------------------------------------------------------------------------------------------------------
# sharding the model


def shard_model(model: torch.nn.Module, mesh=None) -> torch.nn.Module:
    """`fully_shard` every transformer block and the root (unless the model is already an FSDP module), and make
    every FSDP module *sum* gradients over ranks in its reduce-scatter (the engine normalises the loss itself)."""
    from torch.distributed.fsdp import FSDPModule, fully_shard

    if not isinstance(model, FSDPModule):
        # reshard after forward everywhere, the root too: the engine writes new weights into the shards between
        # passes, and a parameter left unsharded after a no-grad forward would keep the old ones
        for block in activation_checkpoint.blocks(model):
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
        fully_shard(model, mesh=mesh, reshard_after_forward=True)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # bf16 would otherwise ask gloo for PREMUL_SUM, which it lacks
    return model


@dataclass
class _Slot:
    flat: int           # which flat buffer
    offset: int
    numel: int
    shape: torch.Size   # of this rank's shard


class ShardArena:
    """This rank's shards of the trainable parameters, packed into one flat buffer per dtype (`flats`, θ).

    The duck type of ParamArena that OuterState needs (`flats`, `device`). Unlike ParamArena the parameters are
    not views of `flats`: they are FSDP's DTensors, whose local shards live in FSDP's own storage; `install_`
    copies flat weights into those shards, `read_params_` copies them back."""

    def __init__(self, model: torch.nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # ties appear once
        if not named:
            raise ValueError("ShardArena: the model has no trainable parameters")
        plain = [n for n, p in named if not isinstance(p, DTensor)]
        if plain:
            raise ValueError(f"ShardArena: parameters {plain[:3]} are not FSDP-sharded DTensors (fully_shard the "
                             "model, e.g. with mamlen.core.fsdp_engine.shard_model)")
        self.params = dict(named)
        self.device = named[0][1].to_local().device
        self.dtypes: list[torch.dtype] = []
        self.names: list[list[str]] = []
        for n, p in named:
            if p.dtype not in self.dtypes:
                self.dtypes.append(p.dtype)
                self.names.append([])
            self.names[self.dtypes.index(p.dtype)].append(n)
        self.slots: dict[str, _Slot] = {}
        sizes = []
        for i, names in enumerate(self.names):
            off = 0
            for n in names:
                local = self.params[n].to_local()
                self.slots[n] = _Slot(i, off, local.numel(), local.shape)
                off += local.numel()
            sizes.append(off)
        self.flats = [torch.empty(s, dtype=dt, device=self.device) for s, dt in zip(sizes, self.dtypes)]
        self.read_params_()

    @property
    def numel(self) -> int:
        """Elements of this rank's shards (all dtypes)."""
        return sum(f.numel() for f in self.flats)

    def new(self, dtype_fn=None) -> list[torch.Tensor]:
        return [torch.zeros(f.numel(), dtype=dtype_fn(f.dtype) if dtype_fn else f.dtype, device=f.device)
                for f in self.flats]

    def views(self, flats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """{param name: view of `flats` shaped like this rank's shard of that parameter}."""
        out = {}
        for i, flat in enumerate(flats):
            for n, chunk in zip(self.names[i], flat.split([self.slots[n].numel for n in self.names[i]])):
                out[n] = chunk.view(self.slots[n].shape)
        return out

    @torch.no_grad()
    def read_params_(self) -> None:
        """θ ← the parameters' shards."""
        for n, view in self.views(self.flats).items():
            view.copy_(self.params[n].to_local())

    @torch.no_grad()
    def install_(self, flats: list[torch.Tensor]) -> None:
        """The parameters' shards ← `flats` (the next forward all-gathers these values)."""
        for n, view in self.views(flats).items():
            self.params[n].to_local().copy_(view)

    def take_grads(self) -> list[torch.Tensor]:
        """This rank's shard of every parameter's `.grad` (zero where a parameter got none) as fresh flat buffers
        in the parameter dtype; the `.grad`s are dropped."""
        out = self.new()
        for n, view in self.views(out).items():
            p = self.params[n]
            if p.grad is not None:
                view.copy_(p.grad.to_local())
                p.grad = None
        return out

    def dtensors(self, flats: list[torch.Tensor]) -> dict[str, DTensor]:
        """{name: DTensor} with the parameter's mesh, placements and global shape over this rank's `flats` views."""
        out = {}
        for n, view in self.views(flats).items():
            p = self.params[n]
            out[n] = DTensor.from_local(view, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())
        return out

    def flatten(self, tensors: dict[str, torch.Tensor], dtype_fn=None, what: str = "tensors") -> list[torch.Tensor]:
        """Pack {name: DTensor (this rank's shard is taken) or full tensor (this rank's dim-0 chunk is taken, as
        fully_shard splits it)} into fresh flat buffers."""
        missing = [n for n in self.slots if n not in tensors]
        extra = [n for n in tensors if n not in self.slots]
        if missing or extra:
            raise KeyError(f"{what}: missing {missing[:5]}, unexpected {extra[:5]}")
        out = self.new(dtype_fn)
        views = self.views(out)
        for n, view in views.items():
            t, p = tensors[n], self.params[n]
            if t.shape != p.shape:
                raise ValueError(f"{what}[{n!r}]: shape {tuple(t.shape)}, the parameter is {tuple(p.shape)}")
            if isinstance(t, DTensor):
                local = t.to_local()
            else:
                world, rank = p.device_mesh.size(), p.device_mesh.get_local_rank()
                pieces = t.chunk(world, 0)
                local = pieces[rank] if rank < len(pieces) else t[:0]
            if local.shape != view.shape:
                raise ValueError(f"{what}[{n!r}]: this rank's shard is {tuple(local.shape)}, expected "
                                 f"{tuple(view.shape)} (a placement other than fully_shard's Shard(0)?)")
            view.copy_(local)
        return out


# ---------------------------------------------------------------------------------------------------------
# the engine


@dataclass
class _Part:
    """This rank's rows of one batch, and how its loss is scaled to its share of the whole batch's mean."""
    batch: dict
    scale: float   # local target tokens / the whole batch's target tokens
    tokens: int    # target tokens of the whole batch
    inputs: int    # non-padding tokens of the whole batch


@dataclass
class _TaskLosses:
    query: float         # this rank's share of L_Q(φ_K)
    support: float       # this rank's share of L_{S_1}(θ)
    query_before: float  # this rank's share of L_Q(θ) (NaN unless measure_adaptation)
    tokens: int          # target tokens of the query and the support batches (whole batches)
    input_tokens: int    # their non-padding tokens (whole batches)


class FSDPMetaEngine:
    """MetaEngine's public API (meta_gradient, step, metaicl_step, optimizer_state, load_optimizer_state) on
    FSDP2-sharded parameters. Build it on every rank of an initialised process group (torchrun), with the same
    weights on every rank; every rank passes the *same* tasks (not a share of them): each batch's rows are split
    over the ranks. Tensors it returns are DTensors sharded like the parameters (`.full_tensor()` gathers one).

    Building it shards `model` in place (`shard_model`: fully_shard per block and at the root) unless it is an
    FSDP module already, after choosing the attention for `config.hvp` and applying activation checkpointing.
    Between steps the model's parameters hold θ and are the truth: each step starts by reading them."""

    def __init__(self, model, config: Optional[MetaConfig] = None, *, loss_fn: Optional[Callable] = None,
                 process_group=None):
        self.config = config or MetaConfig(hvp="fd", fsdp=True)
        cfg = self.config
        if not cfg.fsdp:
            raise ValueError("FSDPMetaEngine: MetaConfig.fsdp is False; use MetaEngine for unsharded parameters")
        cfg.validate()  # refuses exact/mixed and shard_state with fsdp
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("FSDPMetaEngine (MetaConfig.fsdp=True) needs torch.distributed initialised: run under "
                               "torchrun (one process works too, with init_process_group and world_size 1)")
        self.group = process_group
        self.world = dist.get_world_size(process_group)
        self.rank = dist.get_rank(process_group)
        self.model = model
        self.attn_implementation = attention.configure(model, cfg.hvp, cfg.attn_implementation)
        if cfg.checkpointing:
            activation_checkpoint.enable(model)
        device = next(model.parameters()).device
        mesh = None
        if process_group is not None:
            from torch.distributed.device_mesh import DeviceMesh
            mesh = DeviceMesh.from_group(process_group, device.type)
        shard_model(model, mesh)
        self.arena = ShardArena(model)
        cfg.check_param_dtypes(self.arena.dtypes)
        self.obj = Objective(model, self.arena, loss_fn, cfg.autocast_dtype)
        self.step_count = 0
        # m, v, master copy, the outer kernels — all on this rank's shards (OuterState unsharded over them)
        self.opt_state = OuterState(self.arena, cfg, group=None)
        # m_0 = v_0 = 0 (moments="separate") and m̄ = v̄ = 0 at j = K: one read-only zero chunk per dtype
        self._zero_moments = inner_step.ZeroMoments(self.opt_state.state_dtypes, self.arena.device)

    # -- public API ---------------------------------------------------------------------------------------
    def meta_gradient(self, tasks: list[Task]) -> dict[str, DTensor]:
        """G = mean over tasks of dL_Q(φ_K)/dθ, sharded like the parameters. Mutates nothing."""
        G, _ = self._meta_gradient(tasks)
        return self.arena.dtensors(G)

    def step(self, tasks: list[Task]) -> dict:
        """One meta-step (the meta-gradient, then the outer update of θ, m, v). A non-finite loss or
        meta-gradient skips the update: metrics["skipped"]."""
        t0 = time.perf_counter()
        G, stats = self._meta_gradient(tasks)
        return self._outer(G, stats, t0)

    def metaicl_step(self, batches: list[dict]) -> dict:
        """MetaICL baseline: θ ← AdamW(θ, ∇ mean_i L_{B_i}(θ)) on the same moments."""
        t0 = time.perf_counter()
        if not batches:
            raise ValueError("metaicl_step: no batches")
        theta = self._begin()
        G = self.arena.new(_sd)
        loss_sum, tokens, inputs = 0.0, 0, 0
        for b, batch in enumerate(batches):
            part = self._split(batch, f"metaicl batch {b}")
            loss, g = self._gradient(theta, part, RngState(self.arena.device))
            for acc, gi in zip(G, g):
                acc.add_(gi)
            loss_sum += loss
            tokens += part.tokens
            inputs += part.inputs
        losses = self._sum_over_ranks([loss_sum])[0]
        for acc in G:
            acc.div_(len(batches))
        # no adaptation: the "before" loss is the loss itself
        return self._outer(G, outer_step.StepSums(tasks=len(batches), query_loss=losses, support_loss=losses,
                                                  tokens=tokens, query_loss_before=losses, input_tokens=inputs),
                           t0)

    def optimizer_state(self) -> dict:
        """{"step": int, "exp_avg": {name: DTensor}, "exp_avg_sq": {name: DTensor}} (+ "master" with
        master_weights): copies sharded like the parameters — what torch.distributed.checkpoint saves shard by
        shard and reshards on load. No collective. 8-bit moments are dequantised (their codes are not saved)."""
        return outer_step.export(self.opt_state.state_dict(), self.arena.flats, self.step_count,
                                 lambda flats: self.arena.dtensors([t.clone() for t in flats]))

    def load_optimizer_state(self, state: dict) -> None:
        """Load what `optimizer_state` returned (DTensors, possibly resharded by DCP) or MetaEngine's full-size
        state ({name: full tensor}: this rank's chunk is taken). Reads θ from the parameters first (load the model
        before the optimizer state)."""
        step = outer_step.loaded_step(state)
        m = self.arena.flatten(state["exp_avg"], _sd, "load_optimizer_state: exp_avg")
        v = self.arena.flatten(state["exp_avg_sq"], _sd, "load_optimizer_state: exp_avg_sq")
        if self._sum_over_ranks([float(sum(int((x < 0).sum()) for x in v))])[0] > 0:
            raise ValueError("load_optimizer_state: exp_avg_sq has negative entries")
        master = self.arena.flatten(state["master"], _sd, "load_optimizer_state: master") if "master" in state else None
        self.arena.read_params_()
        self.opt_state.load_(m, v, master, None)
        self.step_count = step

    # -- pieces -------------------------------------------------------------------------------------------
    def _begin(self) -> list[torch.Tensor]:
        """θ for this step: the parameters' shards (the model is the truth between steps)."""
        self.arena.read_params_()
        return self.arena.flats

    def _split(self, batch: dict, where: str) -> _Part:
        """This rank's rows of `batch` (a contiguous 1/W of them) and its loss scale."""
        B = batch["input_ids"].shape[0]
        if B % self.world:
            raise ValueError(f"{where}: a batch of {B} rows cannot be split evenly over {self.world} ranks "
                             "(MetaConfig.fsdp splits every batch across ranks: make the batch size, trainer "
                             "train.batch_size, a multiple of the world size)")
        rows = slice(self.rank * B // self.world, (self.rank + 1) * B // self.world)
        local = {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == B else v)
                 for k, v in batch.items()}
        total = count_targets(batch)
        if total == 0:
            raise ValueError(f"{where}: batch has no target token (every label is -100): its loss is undefined")
        return _Part(batch=self.obj.to_device(local), scale=count_targets(local) / total, tokens=total,
                     inputs=count_inputs(batch))

    def _loss(self, part: _Part) -> torch.Tensor:
        """This rank's share of the batch's mean loss (a forward through the sharded model: a collective)."""
        if part.scale > 0:
            return self.obj.loss(part.batch) * part.scale
        # no target among this rank's rows: still run the forward (every rank must join FSDP's all-gathers),
        # contributing exactly zero
        b = part.batch
        logits = self.model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask"), use_cache=False).logits
        return logits.sum() * 0.0

    def _gradient(self, flats, part: _Part, rng: RngState):
        """(this rank's share of L(φ), this rank's shard of ∇L(φ)) at φ = flats: one backward through FSDP."""
        self.arena.install_(flats)
        for p in self.arena.params.values():
            p.grad = None
        with rng.replay():  # checkpointed blocks recompute inside backward: same RNG
            loss = self._loss(part)
            loss.backward()
        return float(loss.detach()), self.arena.take_grads()

    def _global_sq_norm(self, vecs) -> float:
        sq = sum(float(torch.linalg.vector_norm(v)) ** 2 for v in vecs)
        return self._sum_over_ranks([sq])[0]

    def _sum_over_ranks(self, values: list[float]) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.arena.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)  # sync point
        return t.tolist()

    def _initial_moments(self) -> inner_step.MomentSource:
        """m_0, v_0: the shared moments (views at 32 bits, dequantised chunk by chunk at 8), or zeros."""
        if self.config.moments == "shared":
            return inner_step.SharedMoments(self.opt_state)
        return self._zero_moments

    def _support(self, task, i):
        K = self.config.inner_steps
        if not isinstance(task, Task):
            raise TypeError(f"task {i}: expected mamlen.core.Task, got {type(task).__name__}")
        if len(task.support) not in (1, K):
            raise ValueError(f"task {i}{' (' + task.name + ')' if task.name else ''}: {len(task.support)} "
                             f"support batches for inner_steps={K}; give {K} or 1 (reused)")
        parts = [self._split(b, f"task {i} support batch {j}") for j, b in enumerate(task.support)]
        return parts * K if len(parts) == 1 else parts

    # -- the meta-gradient --------------------------------------------------------------------------------
    def _meta_gradient(self, tasks):
        if not tasks:
            raise ValueError("meta_gradient: no tasks")
        self.config.validate()
        theta = self._begin()
        G = None
        q = s = before = 0.0
        tokens = inputs = 0
        for i, task in enumerate(tasks):
            G_i, r = self._task_gradient(theta, task, i)
            if G is None:  # the first task's G_i is the accumulator
                G = G_i
            else:
                for acc, gi in zip(G, G_i):
                    acc.add_(gi)
            del G_i
            q, s, before = q + r.query, s + r.support, before + r.query_before
            tokens, inputs = tokens + r.tokens, inputs + r.input_tokens
        self.arena.install_(theta)  # the parameters hold θ again
        q, s, before = self._sum_over_ranks([q, s, before])  # each rank summed its share of every loss
        for acc in G:
            acc.div_(len(tasks))
        return G, outer_step.StepSums(tasks=len(tasks), query_loss=q, support_loss=s, tokens=tokens,
                                      query_loss_before=before, input_tokens=inputs)

    def _task_gradient(self, theta, task: Task, i: int):
        """(this rank's shard of G_i, _TaskLosses)."""
        cfg = self.config
        rule = inner_step.InnerRule.of(cfg)
        supports = self._support(task, i)
        query = self._split(task.query, f"task {i} query")
        t0 = self.step_count if cfg.moments == "shared" else 0

        # L_Q(θ) before adaptation (no graph; the query's own dropout masks, shared with L_Q(φ_K) below)
        q_rng = RngState(self.arena.device)
        q_before = math.nan
        if cfg.measure_adaptation:
            self.arena.install_(theta)
            with torch.no_grad(), q_rng.replay():
                q_before = float(self._loss(query))

        # forward: K inner steps on the shards (core/inner_step.py, as MetaEngine)
        phi, tape = theta, []
        moments = self._initial_moments() if rule.has_moments else None
        s_first = None
        for j, part in enumerate(supports, start=1):
            rng = RngState(self.arena.device)
            loss, g = self._gradient(phi, part, rng)
            s_first = loss if s_first is None else s_first
            phi_next, moments_next = inner_step.forward(rule, phi, g, moments, step=t0 + j,
                                                        keep_moments=j < len(supports))
            tape.append(inner_step.InnerStep(phi=phi, g=g, moments=moments, step=t0 + j, rng=rng, batch=part))
            phi, moments = phi_next, moments_next
        del phi_next, moments_next, moments, g, rng  # the tape holds what the reverse pass needs

        # query gradient at φ_K
        q_loss, p_bar = self._gradient(phi, query, q_rng)
        del phi
        # reverse recursion from p̄ = ∇L_Q(φ_K), m̄ = v̄ = 0, in place (core/inner_step.py)
        adj = inner_step.Adjoint(p_bar=[x.to(_sd(x.dtype)) for x in p_bar],
                                 moments=self._zero_moments if rule.has_moments else None)
        del p_bar
        while tape:
            rec = tape.pop()
            g_bar = inner_step.adjoint_(rule, rec, adj)
            rec.g = rec.moments = None  # dead (ḡ may own g_j's storage; m̄, v̄ may own m_{j-1}'s)
            if cfg.hvp == "fd":
                self._hvp_fd_into(rec.phi, rec.batch, rec.rng, g_bar, adj.p_bar)
            del rec, g_bar
        return adj.p_bar, _TaskLosses(query=q_loss, support=s_first, query_before=q_before,
                                      tokens=query.tokens + sum(p.tokens for p in supports),
                                      input_tokens=query.inputs + sum(p.inputs for p in supports))

    def _hvp_fd_into(self, phi, part, rng, vec, acc):
        """acc += (∇L(φ + r·vec) - ∇L(φ - r·vec)) / 2r on this rank's shards, r = fd_eps / ‖vec‖ (the global
        norm over all ranks' shards, so every rank takes the same r); acc unchanged if vec = 0."""
        norm = math.sqrt(self._global_sq_norm(vec))
        if norm == 0.0:  # the same on every rank: all skip the two backwards together
            return
        r = self.config.fd_eps / norm
        plus = [kernels.fd_perturb(f, d, r)[0] for f, d in zip(phi, vec)]
        _, g_plus = self._gradient(plus, part, rng)
        del plus
        minus = [kernels.fd_perturb(f, d, r)[1] for f, d in zip(phi, vec)]
        _, g_minus = self._gradient(minus, part, rng)
        del minus
        for a, gp, gm in zip(acc, g_plus, g_minus):
            kernels.fd_combine_(a, gp, gm, 1.0 / (2 * r))

    # -- the outer update ---------------------------------------------------------------------------------
    def _outer(self, G, sums: outer_step.StepSums, t0) -> dict:
        norm = math.sqrt(self._global_sq_norm(G))  # the same value on every rank
        metrics, self.step_count = outer_step.update_(self.config, self.opt_state, G, sums, norm, self.step_count)
        self.arena.install_(self.arena.flats)  # the parameters hold θ
        metrics["seconds"] = time.perf_counter() - t0
        return metrics
