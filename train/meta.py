"""Meta-train a causal LM with MAML-en-LLM (or the MetaICL baseline): parse, build, train, close.

    python train/meta.py --preset demo                                    # one process
    torchrun --standalone --nproc_per_node 2 train/meta.py --preset tiny  # tasks of each step split over ranks
    python train/meta.py --preset tiny --output-dir runs/t --max-steps 40 # same dir again: resumes

Each step's tasks are a function of (train.seed, step); rank r builds and adapts tasks[r::world], the engine
all-reduces the meta-gradient, and every rank applies the same outer step. Rank 0 alone logs and saves.

Reliability: rank 0 holds an exclusive lock on the output directory for the whole run (train/run_lock.py);
workers die with their launcher (train/parent_watch.py); all ranks resume from the checkpoint rank 0 chose,
falling back together past damaged ones (train/resume.py); data, config and model name are checked before
the model loads.
"""
import os
import sys

if __name__ == "__main__":  # run as a script: train/ must not shadow libraries (its evaluate.py vs HF `evaluate`)
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    if {"-h", "--help"} & set(sys.argv[1:]):  # answer at once: importing torch below takes seconds to minutes
        from mamlen.train.config import parser
        parser().parse_args()
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # a torchrun worker: ask to die with the launcher now, not after the slow imports below
        from mamlen.train import parent_watch
        parent_watch.die_with_parent()

import contextlib
import datetime
import time
from pathlib import Path

import torch
import torch.distributed as dist

from mamlen.core import FSDPMetaEngine, MetaConfig, MetaEngine
from mamlen.train import checkpoint, config, data, evaluate, models, parent_watch, ranks, resume, sharded_checkpoint
from mamlen.train.bootstrap import hierarchical_bootstrap
from mamlen.train.checkpoint import CheckpointError
from mamlen.train.logger import Logger, peak_mem_gb
from mamlen.train.run_lock import RunLock, RunLockError


def setup_distributed(fsdp: bool = False):
    """(rank, world, device) from the torchrun environment; one process without it (engine.fsdp: a
    one-rank process group, which fully_shard needs)."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if world > 1 or "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun starts workers in their own session: without this they outlive a killed launcher
        parent_watch.die_with_parent()
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        # a long timeout: the other ranks wait at the next all-reduce while rank 0 evaluates or saves
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    elif fsdp:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device


def build(cfg: config.Config, rank: int, world: int, device: torch.device):
    if cfg.engine.fsdp and cfg.train.batch_size % world:
        raise config.ConfigError(f"train.batch_size: engine.fsdp splits every batch over the ranks; "
                                 f"{cfg.train.batch_size} rows cannot be split over {world} ranks")
    if cfg.engine.fsdp and world > 1 and cfg.eval.enabled:
        raise config.ConfigError("eval: evaluation runs on rank 0 alone, but with engine.fsdp every forward needs "
                                 "all ranks; set eval.before/after=false and eval.every=0 under torchrun (evaluate "
                                 "the checkpoint afterwards)")
    if cfg.train.tasks_per_step < world and not cfg.engine.fsdp:
        raise config.ConfigError(f"train.tasks_per_step: {cfg.train.tasks_per_step} tasks cannot be split over "
                                 f"{world} ranks (need at least one task per rank)")
    # data first: a bad setting, task name or file fails before a large model is loaded
    data_dir = cfg.data.data_dir or data.DEFAULT_DATA_DIR
    e = cfg.engine
    train_tasks = data.load_train_tasks(data_dir, cfg.data.setting, seed=cfg.data.seed, fraction=cfg.data.fraction)
    data.check_pools(train_tasks, k=cfg.data.k, inner_steps=e.inner_steps, method=cfg.train.method,
                     fraction=cfg.data.fraction, warn=print if rank == 0 else lambda m: None)
    eval_tasks = cfg.eval.tasks or data.load_setting(data_dir, cfg.data.setting)[cfg.eval.split]
    missing = [t for t in eval_tasks if not (Path(data_dir) / t).is_dir()] if cfg.eval.enabled else []
    if missing or (cfg.eval.enabled and not eval_tasks):
        raise config.ConfigError(f"eval.tasks: {missing or 'none'} not found in {data_dir}")
    if cfg.eval.enabled:  # every evaluation file is read (and checked) now, not at the first evaluation
        evaluate.check_tasks(data_dir, eval_tasks, k=cfg.eval.k, seeds=cfg.eval.seeds)
    try:
        models.check_name(cfg.model.name)
    except models.UnknownModelError as err:
        raise config.ConfigError(f"model.name: {err}") from None
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    torch.manual_seed(cfg.train.seed)  # identical random init on every rank for models built from a config
    try:
        model, tok = models.load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
    except models.UnknownModelError as err:
        raise config.ConfigError(f"model.name: {err}") from None
    model.to(device).train(cfg.model.dropout)
    mcfg = MetaConfig(**{**vars(e), "autocast_dtype": e.autocast_dtype and getattr(torch, e.autocast_dtype)})
    if world > 1:  # every rank must start from rank 0's weights (before the engine copies them to master weights)
        with torch.no_grad():
            for p in model.parameters():
                dist.broadcast(p.data, 0)
    engine = (FSDPMetaEngine if mcfg.fsdp else MetaEngine)(model, mcfg)  # FSDP: shards the model in place
    sampler = data.EpisodeSampler(
        train_tasks, tok, tasks_per_step=cfg.train.tasks_per_step, k=cfg.data.k, inner_steps=e.inner_steps,
        batch_size=cfg.train.batch_size, method=cfg.data.method, max_len=cfg.data.max_len,
        max_example_len=cfg.data.max_example_len, seed=cfg.train.seed)
    # dropout masks differ per rank; rank 0 matches a single-process run
    torch.manual_seed(cfg.train.seed + 1_000_003 * rank)
    return model, tok, engine, mcfg, sampler, eval_tasks


def run_eval(cfg, model, tok, tasks, log, step, tag):
    """Evaluate the unseen tasks (rank 0) without disturbing the training RNG or mode."""
    rng = checkpoint.rng_state()
    result = evaluate.evaluate(model, tok, cfg.data.data_dir or data.DEFAULT_DATA_DIR, tasks, k=cfg.eval.k,
                               seeds=tuple(cfg.eval.seeds), method=cfg.data.method, batch_size=cfg.eval.batch_size,
                               max_len=cfg.eval.max_len or cfg.data.max_len,
                               max_example_len=cfg.data.max_example_len, max_queries=cfg.eval.max_queries,
                               per_query=True, progress=cfg.log.progress)
    model.train(cfg.model.dropout)
    checkpoint.set_rng_state(rng)
    summary = {"tasks": {t: r["mean"] for t, r in result["tasks"].items()},
               "nll": {t: r["nll_mean"] for t, r in result["tasks"].items()}, "macro": result["macro"],
               "queries": {t: {m: evaluate.seed_mean([s[m] for s in by_seed.values()]) for m in ("nll", "margin")}
                           for t, by_seed in result["per_query"].items()
                           if len({len(s["nll"]) for s in by_seed.values()}) == 1}}
    log.eval(step, summary, tag)
    return summary


def side_by_side(before: dict, after: dict) -> str:
    """Score and gold-option NLL per task, before and after; the continuous columns are the ones that can show a
    small change on a few queries (bench/results/study.md). Evaluations logged before the NLL was recorded show
    only scores."""
    nan = float("nan")
    rows = [f"{'task':40s} {'score':>8s} {'after':>8s} {'change':>8s}   {'gold NLL':>8s} {'after':>8s} {'change':>8s}"]
    for t in sorted(after["tasks"]):
        b, a = before["tasks"].get(t, nan), after["tasks"][t]
        bn, an = before.get("nll", {}).get(t, nan), after.get("nll", {}).get(t, nan)
        rows.append(f"{t:40s} {b:8.4f} {a:8.4f} {a - b:+8.4f}   {bn:8.4f} {an:8.4f} {an - bn:+8.4f}")
    bm, am = before["macro"], after["macro"]
    rows.append(f"{'macro mean':40s} {bm['mean']:8.4f} {am['mean']:8.4f} {am['mean'] - bm['mean']:+8.4f}   "
                f"{bm.get('nll', nan):8.4f} {am.get('nll', nan):8.4f} {am.get('nll', nan) - bm.get('nll', nan):+8.4f}")
    rows.append(f"{'macro worst':40s} {bm['worst']:8.4f} {am['worst']:8.4f} {am['worst'] - bm['worst']:+8.4f}")
    rows.append(f"{'macro margin (best wrong - gold)':40s} {bm.get('margin', nan):8.4f} {am.get('margin', nan):8.4f} "
                f"{am.get('margin', nan) - bm.get('margin', nan):+8.4f}")
    rows.append("(score: macro-F1 or accuracy, higher is better; gold NLL: nats/token of the gold option, lower is "
                "better; margin: higher is better)")
    rows += paired_changes(before, after)
    return "\n".join(rows)


def paired_changes(before: dict, after: dict) -> list[str]:
    """The macro changes of gold NLL and margin with a 95% bootstrap interval over tasks x queries, each query
    paired with itself before and after; nothing when either evaluation lacks per-query values (an old run)
    or they scored different queries."""
    b, a = before.get("queries"), after.get("queries")
    if (not a or not b or sorted(a) != sorted(b) or sorted(a) != sorted(after["tasks"])
            or any(len(a[t]["nll"]) != len(b[t]["nll"]) for t in a)):
        return []
    n = sum(len(a[t]["nll"]) for t in a)
    rows = [f"change after - before, 95% bootstrap interval over {len(a)} tasks x {n} queries (one training run: "
            "the spread between training seeds is not in it):"]
    for metric, better in (("nll", "lower"), ("margin", "higher")):
        diffs = [[x - y for x, y in zip(a[t][metric], b[t][metric])] for t in sorted(a)]
        ci = hierarchical_bootstrap([diffs], n_boot=2000)
        name = "gold NLL" if metric == "nll" else "margin"
        rows.append(f"  {name:9s} {ci.mean:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}]  ({better} is better)")
    return rows


def restore(ck: checkpoint.Checkpoint, cfg: config.Config, model, engine, sampler, rank: int, world: int,
            say) -> None:
    """Load `ck` into the model, the engine's moments, the sampler and this rank's RNG. Any failure raises
    CheckpointError naming the file, and resume.load falls back to the previous checkpoint (which overwrites
    all of these again)."""
    if cfg.engine.fsdp:  # each rank reads the parts of the saved shards it holds now (any world size)
        loads = ((sharded_checkpoint.SHARDS, lambda: sharded_checkpoint.load_(ck, model, engine)),)
    else:
        loads = ((checkpoint.MODEL, lambda: ck.load_model_(model)),
                 (checkpoint.OPTIMIZER, lambda: engine.load_optimizer_state(ck.optimizer_state())))
    for name, load in loads:
        try:
            load()
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 -- whatever the damage, it is this file's
            raise CheckpointError(f"{ck.path / name}: {type(e).__name__}: {e}") from None
    try:
        sampler.load_state_dict(ck.state["sampler"])
        start, rngs = ck.step, ck.state["rng"]
        int(ck.state["consecutive_skips"])
        if len(rngs) == world:
            checkpoint.set_rng_state(rngs[rank])
        else:  # a different world size: no saved state fits; reseed from (seed, step, rank)
            torch.manual_seed(cfg.train.seed + 1_000_003 * rank + 7_919 * start)
            say(f"note: checkpoint saved by {len(rngs)} ranks, resuming on {world}: dropout RNG reseeded")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{ck.path / checkpoint.STATE}: {type(e).__name__}: {e}") from None


def lock_output_dir(output_dir: str, rank: int, world: int) -> RunLock | None:
    """Rank 0 takes the output directory's lock; if it cannot, every rank stops with its message."""
    lock, err = None, None
    if rank == 0:
        try:
            lock = RunLock(output_dir).acquire()
        except RunLockError as e:
            err = str(e)
    err = ranks.from_rank0(err, world)
    if err:
        raise RunLockError(err)
    return lock


def train(cfg: config.Config, rank: int = 0, world: int = 1, device=torch.device("cpu")) -> int:
    """One run, holding the output directory's lock (rank 0) from before anything is read until it ends."""
    lock = lock_output_dir(cfg.output_dir, rank, world)
    try:
        return _train(cfg, rank, world, device)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: config.Config, rank: int, world: int, device: torch.device) -> int:
    say = print if rank == 0 else (lambda m: None)
    # engine.fsdp writes sharded (DCP) checkpoints; a directory of the other kind is refused, never pruned
    sharded_checkpoint.check_kind(cfg.output_dir, sharded=cfg.engine.fsdp)
    verify = sharded_checkpoint.verify if cfg.engine.fsdp else checkpoint.verify
    plan, first = resume.plan(cfg.output_dir, cfg.checkpoint.resume, rank=rank, world=world, warn=say,
                              verify=verify)
    if first is not None:  # rank 0: the next save needs the room the last one took; say so before the model loads
        checkpoint.check_free_space(Path(cfg.output_dir), checkpoint.size(first.path))
    model, tok, engine, mcfg, sampler, eval_tasks = build(cfg, rank, world, device)
    ck = resume.load(cfg.output_dir, plan, lambda c: restore(c, cfg, model, engine, sampler, rank, world, say),
                     world=world, first=first, warn=say, verify=verify)
    start, skips = (ck.step, int(ck.state["consecutive_skips"])) if ck is not None else (0, 0)
    known = {ck.path.name: True} if ck is not None else {}  # {checkpoint: verified?}: pruning hashes each once
    log = Logger(cfg.output_dir, enabled=rank == 0, start_step=start, max_steps=cfg.train.max_steps,
                 progress=cfg.log.progress, tensorboard=cfg.log.tensorboard, log_every=cfg.log.every)
    if ck is not None:
        log.write(f"resumed from {ck.path} at step {start}")
        changed = config.differences(ck.config_yaml(), cfg)
        if changed:
            log.write("warning: the config differs from the checkpoint's: " + "; ".join(changed))
    before = None
    if cfg.eval.before and start == 0 and rank == 0:
        before = run_eval(cfg, model, tok, eval_tasks, log, 0, "before")

    def save(step):
        rngs = [None] * world
        if world > 1:
            dist.all_gather_object(rngs, checkpoint.rng_state())
        else:
            rngs = [checkpoint.rng_state()]
        state = {"step": step, "consecutive_skips": skips, "sampler": {**sampler.state_dict(), "step": step},
                 "rng": rngs, "world_size": world}
        if cfg.engine.fsdp:  # every rank writes its own shards
            path = sharded_checkpoint.save(cfg.output_dir, step, model=model, engine=engine, state=state,
                                           config_yaml=config.to_yaml(cfg), keep=cfg.checkpoint.keep)
            log.write(f"saved {path}")
            return
        opt = engine.optimizer_state()  # every rank: with engine.shard_state it gathers the shards
        if rank == 0:
            path = checkpoint.save(cfg.output_dir, step, model=model, optimizer_state=opt, state=state,
                                   config_yaml=config.to_yaml(cfg), keep=cfg.checkpoint.keep, known=known,
                                   warn=log.write)
            log.write(f"saved {path}")

    # debugging/tests: poison the logits (hence the loss) at train.nan_steps
    poison = {"on": False}
    model.get_output_embeddings().register_forward_hook(
        lambda mod, inp, out: out * float("nan") if poison["on"] else None)
    # engine.fsdp: every rank takes every task (the engine splits each batch's rows over the ranks)
    n_tasks = cfg.train.tasks_per_step
    mine = list(range(n_tasks)) if cfg.engine.fsdp else list(range(rank, n_tasks, world))
    peak_lr, peak_inner = cfg.engine.outer_lr, cfg.engine.inner_lr
    status, step, last_eval = 0, start, (None, None)
    for step in range(start + 1, cfg.train.max_steps + 1):
        f = cfg.lr.factor(step, cfg.train.max_steps)
        mcfg.outer_lr = peak_lr * f
        mcfg.inner_lr = peak_inner * f if cfg.lr.scale_inner else peak_inner
        poison["on"] = step in cfg.train.nan_steps
        t0 = time.perf_counter()
        if cfg.train.method == "maml-en-llm":
            m = engine.step(sampler.meta_batch(step, mine))
        else:
            m = engine.metaicl_step(sampler.metaicl_batch(step, mine))
        dt = time.perf_counter() - t0
        skips = skips + 1 if m["skipped"] else 0
        log.step({"step": step, "loss": m["loss"], "support_loss": m["support_loss"],
                  "query_loss_before": m["query_loss_before"], "adapt_gain": m["adapt_gain"],
                  "grad_norm": m["grad_norm"],
                  "inner_lr": mcfg.inner_lr, "outer_lr": mcfg.outer_lr, "tokens": m["tokens"],
                  "input_tokens": m["input_tokens"], "step_s": dt, "tokens_per_s": m["input_tokens"] / dt,
                  "peak_mem_gb": peak_mem_gb(), "skipped": m["skipped"]})
        if skips >= cfg.train.max_consecutive_skips:
            log.write(f"stopping at step {step}: {skips} consecutive steps had a non-finite loss or meta-gradient "
                      f"(train.max_consecutive_skips={cfg.train.max_consecutive_skips}); parameters and moments "
                      f"are those of step {step - skips}. Lower the learning rates or check the data.")
            status = 1
            break
        if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 or step == cfg.train.max_steps:
            save(step)
        if cfg.eval.every and step % cfg.eval.every == 0 and rank == 0:
            last_eval = (step, run_eval(cfg, model, tok, eval_tasks, log, step, "periodic"))
    if status == 0 and cfg.eval.after and rank == 0:
        if last_eval[0] == step:  # the periodic evaluation of the last step is the final one
            after = last_eval[1]
        else:
            after = run_eval(cfg, model, tok, eval_tasks, log, step, "after")
        before = before or log.find_eval("before")  # a resumed run reads it back from eval.jsonl
        if before is not None:
            log.write("unseen tasks, before vs after meta-training:\n" + side_by_side(before, after))
    log.close()
    if world > 1:
        dist.barrier()  # the other ranks wait here while rank 0 evaluates
    return status


def main(argv=None) -> int:
    try:
        cfg, args = config.load(argv)
    except config.ConfigError as e:
        raise SystemExit(f"config error: {e}")
    if args.print_config:
        print(config.to_yaml(cfg), end="")
        return 0
    rank, world, device = setup_distributed(cfg.engine.fsdp)
    try:
        return train(cfg, rank, world, device)
    except (config.ConfigError, data.DataError, CheckpointError, RunLockError, models.UnknownModelError) as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
