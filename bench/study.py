"""Issue 13: does meta-training make SmolLM2-135M learn unseen tasks in context better? A powered study on CPU.

    OMP_NUM_THREADS=1 python bench/study.py probe-inner-lr                  # adapt_gain vs inner lr, base model
    OMP_NUM_THREADS=1 python bench/study.py probe-inner-lr --checkpoint runs/study/pilot/.../ckpt-00000100
    OMP_NUM_THREADS=1 python bench/study.py run --plan pilot                # MetaICL score vs meta-steps
    OMP_NUM_THREADS=1 python bench/study.py run --plan main                 # arms x training seeds
    python bench/study.py list --plan main                                  # runs, budgets, done or not
    python bench/study.py report                                            # bench/results/study_report.md
    python bench/study.py import-training NAME --metrics runs/study/NAME/metrics.jsonl   # per-step log of an old run

Primary metric (train/evaluate.py): per query, the gold option's mean-token NLL and the margin (best wrong
option's loss − gold's), k = 16 demonstrations, 3 demonstration seeds, every test task of the setting and its
unseen-domain tasks (<= 200 queries each). Queries are identical across models, so every comparison is a paired
difference per query; a training seed's difference is the macro mean over tasks (each task: mean over queries and
demonstration seeds). Improvements are signed so that > 0 is better: Δ NLL = NLL(reference) − NLL(arm),
Δ margin = margin(arm) − margin(reference).

A plan is a list of runs. Each run trains with train/meta.py's `train()` (preset `study` + overrides) to its
`steps`, evaluates the final weights, and writes bench/results/study/NAME.json (summary, config, compute, commit)
NAME.pq.json.gz (every query's scores) and, for trained runs, NAME.train.json.gz (every meta-step's loss and
adapt_gain). A run whose JSON exists is skipped; a killed run resumes from its
checkpoint in runs/study/ (not in git). Runs of one `track` share an output directory and continue one another
(the pilot's curve points: constant learning rate after warmup, so stopping at step 100 then going on to 200 is
the same trajectory as one run to 200). A run refuses to start from a tree with changes outside bench/results/
and records the commit it ran.
"""
from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from mamlen.train.bootstrap import Bootstrap, hierarchical_bootstrap

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import stats  # noqa: E402  (bench/stats.py)

ROOT = HERE.parent
RESULTS_DIR = HERE / "results" / "study"
WORK_DIR = ROOT / "runs" / "study"
SPLITS = ("test", "unseen_domain_test")
SPLIT_NAMES = {"test": "unseen tasks", "unseen_domain_test": "unseen domain"}


# -- the plans -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalSpec:
    """The evaluation of every run: all `splits` tasks of the setting (train/evaluate.py)."""
    splits: tuple[str, ...] = SPLITS
    k: int = 16
    seeds: tuple[int, ...] = (100, 13, 21)
    max_queries: int | None = None       # None: every test query (<= 200 per task in the shipped suite)
    max_len: int = 1024
    batch_size: int = 16
    adapt_steps: int = 0
    adapt_lr: float = 1e-5


@dataclass(frozen=True)
class Run:
    name: str
    arm: str                    # base | metaicl | metaicl-time | maml | fomaml | ... (a key of ARMS)
    seed: int = 0
    steps: int = 0              # meta-steps trained (0: the base model)
    track: str = ""             # runs of one track share a checkpoint directory and continue one another
    overrides: tuple[tuple[str, object], ...] = ()
    eval: str = "full"          # a key of the plan's evals


@dataclass
class Plan:
    name: str
    preset: str
    setting: str
    evals: dict[str, EvalSpec]
    runs: list[Run] = field(default_factory=list)
    overrides: dict = field(default_factory=dict)
    note: str = ""


# arm -> (label, what it is, config overrides)
ARMS = {
    "base": ("no meta-training", "SmolLM2-135M-Instruct as shipped", {}),
    "metaicl": ("MetaICL", "multi-task fine-tuning on the same tasks and sequences per step as MAML-en-LLM",
                {"train.method": "metaicl"}),
    "metaicl-time": ("MetaICL, equal CPU time", "MetaICL with as many more steps as MAML-en-LLM's CPU time buys",
                     {"train.method": "metaicl"}),
    "maml": ("MAML-en-LLM", "exact second-order meta-gradient, shared AdamW moments",
             {"train.method": "maml-en-llm", "engine.hvp": "exact"}),
    "fomaml": ("first-order MAML", "the same inner AdamW step, Hessian term dropped",
               {"train.method": "maml-en-llm", "engine.hvp": "first_order", "engine.inner_graph": "recompute"}),
}

INNER_STEP_ARMS = ("maml", "fomaml")  # MetaICL has no inner step: its logged adapt_gain is a placeholder 0


def build_plan(name: str, steps: int = 200, time_factor: int = 3, seeds: int = 5) -> Plan:
    """smoke: tiny random GPT-2 (tests); pilot: MetaICL score vs meta-steps; main: the arms x `seeds` training
    seeds, `steps` meta-steps each (MetaICL on equal CPU time: time_factor x steps; the pilot chooses steps, the
    measured CPU seconds per step of MAML-en-LLM over MetaICL the factor)."""
    if name == "smoke":
        spec = EvalSpec(k=2, seeds=(100, 13), max_queries=4, max_len=256, batch_size=4)
        plan = Plan("smoke", "tiny", "class_to_class", {"full": spec},
                    overrides={"checkpoint.every": 1, "log.tensorboard": False, "model.dropout": False,
                               "data.k": 2},
                    note="Smoke plan: tiny random GPT-2; checks the pipeline, measures nothing.")
        plan.runs = [Run("base", "base")]
        for seed in (0, 1):
            plan.runs += [Run(f"metaicl-s{seed}", "metaicl", seed, 2), Run(f"maml-s{seed}", "maml", seed, 2)]
        plan.runs += [Run("curve-metaicl-s0-step1", "metaicl", 0, 1, track="curve-metaicl-s0"),
                      Run("curve-metaicl-s0-step2", "metaicl", 0, 2, track="curve-metaicl-s0")]
        return plan
    # the pilot's curve uses a cheaper evaluation (1 demonstration seed, 100 queries per task): it chooses the
    # recipe; the main plan's numbers come from the full evaluation
    evals = {"full": EvalSpec(), "curve": EvalSpec(seeds=(100,), max_queries=100)}
    if name == "pilot":
        plan = Plan("pilot", "study", "class_to_class", evals, note=(
            "Pilot (issue 13, item 3): MetaICL on class_to_class, one training seed, constant outer lr after "
            "warmup, evaluated at increasing meta-steps on the curve evaluation; the base model on the same "
            "evaluation is step 0."))
        plan.runs = [Run("pilot-base", "base", eval="curve")]
        for lr in (3e-5, 1e-5):  # the larger lr first: the more likely to move the model within the budget
            track = f"pilot-metaicl-lr{lr:g}-s0"
            plan.runs += [Run(f"{track}-step{n}", "metaicl", 0, n, track=track,
                              overrides=(("engine.outer_lr", lr),), eval="curve") for n in (50, 100, 200, 400)]
        return plan
    if name == "main":
        plan = Plan("main", "study", "class_to_class", evals, note=(
            "Main plan (issue 13, item 4): every arm on class_to_class with 5 training seeds, the same "
            f"{steps} meta-steps of the preset's tasks per step (MetaICL on equal CPU time: {time_factor}x the "
            "steps), evaluated on all unseen tasks and unseen-domain tasks."))
        plan.runs = [Run("base", "base")]
        # order = priority when the budget runs out: the two methods first, seed by seed; then first-order MAML;
        # then MetaICL on equal CPU time
        for seed in range(seeds):
            plan.runs += [Run(f"metaicl-s{seed}", "metaicl", seed, steps), Run(f"maml-s{seed}", "maml", seed, steps)]
        plan.runs += [Run(f"fomaml-s{seed}", "fomaml", seed, steps) for seed in range(seeds)]
        plan.runs += [Run(f"metaicl-time-s{seed}", "metaicl-time", seed, steps * time_factor)
                      for seed in range(seeds)]
        return plan
    raise SystemExit(f"unknown plan {name!r} (smoke, pilot, main)")


def _value(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def run_config(plan: Plan, run: Run, work_dir: Path, extra: list[str] = ()):
    """The run's checked train config: preset < plan overrides < arm < run overrides < --set (extra)."""
    from mamlen.train import config

    sets = {**plan.overrides, "data.setting": plan.setting, "train.seed": run.seed,
            "output_dir": str(work_dir / (run.track or run.name))}
    sets.update(ARMS[run.arm][2])
    sets.update(dict(run.overrides))
    if run.steps:
        sets["train.max_steps"] = run.steps
    argv = ["--preset", plan.preset] + [a for k, v in sets.items() for a in ("--set", f"{k}={_value(v)}")]
    argv += [a for s in extra for a in ("--set", s)]
    return config.from_args(config.parser().parse_args(argv))


# -- provenance ------------------------------------------------------------------------------------------------
def git_state(root: Path = ROOT) -> dict:
    """{"sha", "dirty": [paths changed outside bench/results/ and runs/]}."""
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout
    st = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=root, capture_output=True,
                        text=True, check=True).stdout
    dirty = [line[3:] for line in st.splitlines()
             if line[3:] and not line[3:].startswith(("bench/results/", "runs/"))]
    return {"sha": sha.strip(), "dirty": dirty}


def require_clean(root: Path = ROOT) -> str:
    g = git_state(root)
    if g["dirty"]:
        raise SystemExit(f"refusing to run from a tree with uncommitted changes ({', '.join(g['dirty'][:5])}"
                         f"{' ...' if len(g['dirty']) > 5 else ''}): commit them, or run from a pinned worktree "
                         f"(git worktree add ../study-run-SHA SHA)")
    return g["sha"]


def _write(path: Path, obj) -> None:
    """Atomic JSON (gzip if the name ends .gz): a killed run never leaves a file that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    text = json.dumps(obj, indent=None if path.name.endswith(".gz") else 1).encode()
    tmp.write_bytes(gzip.compress(text, mtime=0) if path.name.endswith(".gz") else text)
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# -- one run ---------------------------------------------------------------------------------------------------
def evaluate_model(model, tok, cfg, spec: EvalSpec) -> tuple[dict, dict]:
    """(summary per split without per-query lists, per-query scores per split)."""
    from mamlen.train import data, evaluate

    data_dir = cfg.data.data_dir or data.DEFAULT_DATA_DIR
    setting = data.load_setting(data_dir, cfg.data.setting)
    summary, per_query = {}, {}
    for split in spec.splits:
        tasks = setting[split]
        if not tasks:
            continue
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        res = evaluate.evaluate(model, tok, data_dir, tasks, k=spec.k, seeds=spec.seeds, method=cfg.data.method,
                                batch_size=spec.batch_size, max_len=spec.max_len, adapt_steps=spec.adapt_steps,
                                adapt_lr=spec.adapt_lr, max_queries=spec.max_queries, per_query=True,
                                progress=False)
        per_query[split] = res.pop("per_query")
        res["cpu_s"], res["wall_s"] = time.process_time() - t_cpu, time.perf_counter() - t_wall
        summary[split] = res
    return summary, per_query


def execute(plan: Plan, run: Run, results_dir: Path = RESULTS_DIR, work_dir: Path = WORK_DIR,
            extra: list[str] = (), log=print, root: Path = ROOT, command: str = "") -> dict:
    """Train (unless the base model), evaluate, write NAME.json and NAME.pq.json.gz; a finished run is skipped."""
    import torch
    from mamlen.train import checkpoint, config, meta, models

    out = results_dir / f"{run.name}.json"
    if out.exists():
        done = json.loads(out.read_text())
        if done["run"] != json.loads(json.dumps(asdict(run))):
            raise SystemExit(f"{out} records a different run ({done['run']}) than the plan's ({asdict(run)}): "
                             "keep the plan's --steps/--time-factor of the finished runs, or move the JSON away")
        return done
    sha = require_clean(root)
    cfg = run_config(plan, run, work_dir, extra)
    rec = {"name": run.name, "plan": plan.name, "run": asdict(run), "arm": run.arm,
           "config": yaml.safe_load(config.to_yaml(cfg)), "eval_spec": asdict(plan.evals[run.eval]),
           "status": 0, "git": sha, "torch": torch.__version__,
           "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d %H:%M"),
           "command": command or f"python bench/study.py run --plan {plan.name}"
           + "".join(f" --set {s}" for s in extra)}
    log(f"== {run.name}: {run.arm}, seed {run.seed}, {run.steps} steps")
    torch.set_num_threads(cfg.train.num_threads or 1)  # one thread per run: the other core stays free
    trained = run.arm != "base"
    if trained:
        ck = checkpoint.latest(cfg.output_dir, warn=lambda m: None)
        start = ck.step if ck is not None else 0
        if start > run.steps:
            raise SystemExit(f"{run.name}: {cfg.output_dir} already holds step {start} > {run.steps}; runs of a "
                             "track must be executed in order of steps")
        t_cpu, t_wall = time.process_time(), time.perf_counter()
        rec["status"] = meta.train(cfg)
        steps = training_log(Path(cfg.output_dir) / "metrics.jsonl", run.steps)
        gains = [m["adapt_gain"] for m in steps if m.get("adapt_gain") is not None
                 and math.isfinite(m["adapt_gain"])]
        rec["compute"] = {"train_cpu_s_this_process": time.process_time() - t_cpu,
                          "train_wall_s_this_process": time.perf_counter() - t_wall, "resumed_from_step": start,
                          "step_wall_s": sum(step_seconds(m) for m in steps),
                          "peak_mem_gb": max((m.get("peak_mem_gb", 0) for m in steps), default=0.0)}
        rec["training"] = {"steps": len(steps), "tokens": sum(m["tokens"] for m in steps),
                           "loss_first10": _mean([m["loss"] for m in steps[:10]]),
                           "loss_last10": _mean([m["loss"] for m in steps[-10:]]),
                           "adapt_gain_mean": _mean(gains), "adapt_gain_last50": _mean(gains[-50:]),
                           "skipped": sum(bool(m.get("skipped")) for m in steps)}
        if rec["status"] == 0:
            write_training_log(results_dir, run.name, Path(cfg.output_dir) / "metrics.jsonl", run.steps)
        gc.collect()
    model, tok = models.load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
    if rec["status"] == 0:
        if trained:
            ck = checkpoint.latest(cfg.output_dir)
            if ck is None or ck.step != run.steps:
                raise RuntimeError(f"{run.name}: no checkpoint of step {run.steps} in {cfg.output_dir}")
            ck.load_model_(model)
        summary, per_query = evaluate_model(model, tok, cfg, plan.evals[run.eval])
        rec["evals"] = summary
        for split, r in summary.items():
            log(f"   {split}: gold NLL {r['macro']['nll']:.4f}, margin {r['macro']['margin']:+.4f}, "
                f"macro score {r['macro']['mean']:.4f} ({r['cpu_s']:.0f} CPU s)")
        _write(results_dir / f"{run.name}.pq.json.gz", {"name": run.name, "git": sha, "per_query": per_query})
    del model
    gc.collect()
    _write(out, rec)
    if trained and not _continued(plan, run):  # the JSONs are the record; a SmolLM2 checkpoint is ~1.5 GB
        for ck_dir in Path(cfg.output_dir).glob("ckpt-*"):
            shutil.rmtree(ck_dir, ignore_errors=True)
    return rec


# the step's numbers, then its cost (the run's compute record is summed from these)
TRAIN_FIELDS = ("step", "loss", "support_loss", "query_loss_before", "adapt_gain", "grad_norm", "tokens", "skipped",
                "input_tokens", "step_s", "tokens_per_s", "peak_mem_gb")


def step_seconds(m: dict) -> float:
    """A metrics.jsonl step's wall seconds. Logs written before step_s existed (e.g. the main plan's, 017f47b)
    give them as tokens / tokens_per_s, both counting target tokens then."""
    if "step_s" in m:
        return m["step_s"]
    return m["tokens"] / m["tokens_per_s"] if m.get("tokens_per_s") else 0.0


def training_log(metrics_path: Path, steps: int) -> list[dict]:
    """A run's first `steps` meta-steps from its metrics.jsonl, one record per step (the last one logged: a resumed
    run logs the steps after its checkpoint again), with the fields of TRAIN_FIELDS it has."""
    by_step = {}
    for m in _read_jsonl(metrics_path):
        if m["step"] <= steps:
            by_step[m["step"]] = {k: m[k] for k in TRAIN_FIELDS if k in m}
    return [by_step[s] for s in sorted(by_step)]


def write_training_log(results_dir: Path, name: str, metrics_path: Path, steps: int) -> Path:
    """NAME.train.json.gz: the per-step training record next to the run's JSON (checkpoints and metrics.jsonl stay
    out of git; this is what the report's adaptation table reads)."""
    log = training_log(Path(metrics_path), steps)
    if len(log) != steps:
        raise SystemExit(f"{metrics_path}: {len(log)} of the run's {steps} meta-steps are logged")
    path = Path(results_dir) / f"{name}.train.json.gz"
    _write(path, {"name": name, "metrics": str(metrics_path), "steps": log})
    return path


def _continued(plan: Plan, run: Run) -> bool:
    """Does a later run of the same track still need this run's checkpoint?"""
    return bool(run.track) and any(r.track == run.track and r.steps > run.steps for r in plan.runs)


def _mean(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


# -- the inner-lr probe ----------------------------------------------------------------------------------------
def probe_inner_lr(lrs=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3), steps: int = 8, checkpoint_dir: str | None = None,
                   preset: str = "study", extra: list[str] = ()) -> dict:
    """adapt_gain = L_Q(θ) − L_Q(φ_1) of the engine's own inner AdamW step, per inner lr, on the tasks of the
    preset's first `steps` meta-batches, from the base model (zero moments, as at step 1 of training) or from a
    training checkpoint (its weights and shared moments). Each measurement is an engine step with outer lr 0
    (θ unchanged) and the moments restored afterwards, so every lr sees the same θ, m, v."""
    import torch
    from mamlen.core import MetaConfig, MetaEngine
    from mamlen.train import checkpoint, config, data, models

    argv = ["--preset", preset, "--set", "engine.hvp=first_order", "--set", "engine.inner_graph=recompute"]
    cfg = config.from_args(config.parser().parse_args(argv + [a for s in extra for a in ("--set", s)]))
    torch.set_num_threads(cfg.train.num_threads or 1)
    model, tok = models.load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
    model.train(cfg.model.dropout)
    e = cfg.engine
    engine = MetaEngine(model, MetaConfig(**{**vars(e), "autocast_dtype": None, "outer_lr": 0.0}))
    ck_step = 0
    if checkpoint_dir:
        ck = checkpoint.latest(checkpoint_dir)
        if ck is None:
            raise SystemExit(f"--checkpoint {checkpoint_dir}: no usable checkpoint there (give a run's output dir)")
        ck.load_model_(model)
        engine.load_optimizer_state(ck.optimizer_state())
        ck_step = ck.step
    state = engine.optimizer_state()
    tasks = data.load_train_tasks(cfg.data.data_dir or data.DEFAULT_DATA_DIR, cfg.data.setting, seed=cfg.data.seed)
    sampler = data.EpisodeSampler(tasks, tok, tasks_per_step=cfg.train.tasks_per_step, k=cfg.data.k,
                                  inner_steps=e.inner_steps, batch_size=cfg.train.batch_size,
                                  max_len=cfg.data.max_len, seed=cfg.train.seed)
    gains = {lr: [] for lr in lrs}
    before = []
    for step in range(1, steps + 1):
        for task in sampler.meta_batch(step):
            for lr in lrs:
                engine.config.inner_lr = lr
                m = engine.step([task])
                engine.load_optimizer_state(state)  # outer lr 0 left θ alone; undo the moments' update
                gains[lr].append(m["adapt_gain"])
            before.append(m["query_loss_before"])
    return {"setting": cfg.data.setting, "k": cfg.data.k, "checkpoint": checkpoint_dir, "checkpoint_step": ck_step,
            "moments_step": state["step"], "n_tasks": len(before), "query_loss_before": _mean(before),
            "gains": {f"{lr:g}": g for lr, g in gains.items()}}


def probe_table(res: dict) -> list[str]:
    out = [f"From {'the base model (zero moments)' if not res['checkpoint'] else res['checkpoint']} "
           f"(outer step {res['moments_step']}), {res['n_tasks']} sampled tasks of `{res['setting']}` (k = "
           f"{res['k']}), query loss before adaptation {res['query_loss_before']:.3f} nats/token.", "",
           "| inner lr | mean adapt_gain (nats/token) | 95% t CI (tasks) | tasks with gain > 0 |",
           "|---:|---:|---|---:|"]
    for lr, g in res["gains"].items():
        t = stats.paired_t(g)
        out.append(f"| {lr} | {t.mean:+.4f} | [{t.low:+.4f}, {t.high:+.4f}] | {sum(x > 0 for x in g)}/{len(g)} |")
    return out


# -- analysis --------------------------------------------------------------------------------------------------
METRICS = {"nll": "gold NLL", "margin": "margin"}


def load_results(results_dir: Path = RESULTS_DIR) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("*.json"))}


def load_per_query(results_dir: Path, name: str) -> dict:
    return json.loads(gzip.decompress((Path(results_dir) / f"{name}.pq.json.gz").read_bytes()))["per_query"]


# derived per query: the NLL of the best wrong option (margin = its loss − gold's), so that for every arm and
# reference Δ gold NLL = Δ best-wrong NLL + Δ margin: how much of a gain is the label set becoming likelier and
# how much is the gold option pulling away from the others
WRONG = "wrong"


def query_values(pq: dict, split: str, metric: str) -> dict[str, list[float]]:
    """{task: per-query value averaged over demonstration seeds}; metric "nll", "margin" or WRONG."""
    from mamlen.train.evaluate import seed_mean

    return {task: seed_mean([[n + m for n, m in zip(v["nll"], v["margin"])] if metric == WRONG else v[metric]
                             for v in by_seed.values()])
            for task, by_seed in pq[split].items()}


def improvement(arm: dict[str, list[float]], ref: dict[str, list[float]], metric: str) -> list[list[float]]:
    """Per task, per query: > 0 when `arm` is better (lower NLL, larger margin; for WRONG: lower too, the sign
    that makes the decomposition add up)."""
    sign = -1.0 if metric in ("nll", WRONG) else 1.0
    if set(arm) != set(ref):
        raise ValueError(f"different tasks: {sorted(set(arm) ^ set(ref))}")
    return [[sign * (a - r) for a, r in zip(arm[t], ref[t])] for t in sorted(arm)]


@dataclass
class Comparison:
    arm: str
    ref: str
    split: str
    metric: str
    seeds: list[int]
    per_seed: list[float]           # macro improvement of each training seed
    t: stats.PairedT | None
    perm_p: float | None
    boot: Bootstrap | None
    p_holm: float | None = None
    t_simultaneous: stats.PairedT | None = None  # the t interval at level 1 − 0.05/m (Bonferroni over the table)


def runs_by_seed(results: dict, arm: str) -> dict[int, str]:
    """{training seed: run name} of the arm's finished and evaluated main-plan runs (no pilot or curve track)."""
    return {r["run"]["seed"]: name for name, r in results.items()
            if r.get("arm") == arm and r.get("status") == 0 and r.get("plan") == "main" and "evals" in r
            and not r["run"].get("track")}


def compare(results_dir: Path, results: dict, arm: str, ref: str, split: str, metric: str,
            n_boot: int = 2000) -> Comparison | None:
    """arm vs ref paired by training seed (ref "base": the same base model for every seed)."""
    arms = runs_by_seed(results, arm)
    refs = runs_by_seed(results, ref)
    seeds = sorted(arms) if ref == "base" else sorted(set(arms) & set(refs))
    if ref == "base" and not refs or not seeds:
        return None
    cache = {}

    def vals(name):
        if name not in cache:
            cache[name] = query_values(load_per_query(results_dir, name), split, metric)
        return cache[name]

    diffs = [improvement(vals(arms[s]), vals(refs[0] if ref == "base" else refs[s]), metric) for s in seeds]
    per_seed = [sum(sum(q) / len(q) for q in d) / len(d) for d in diffs]
    t = stats.paired_t(per_seed) if len(seeds) >= 2 else None
    perm = stats.sign_flip_p(per_seed) if len(seeds) >= 2 else None
    boot = hierarchical_bootstrap(diffs, n_boot=n_boot)
    return Comparison(arm, ref, split, metric, seeds, per_seed, t, perm, boot)


COMPARISONS = [("metaicl", "base"), ("metaicl-time", "base"), ("maml", "base"), ("fomaml", "base"),
               ("maml", "metaicl"), ("maml", "metaicl-time"), ("maml", "fomaml")]


def main_comparisons(results_dir: Path = RESULTS_DIR, n_boot: int = 2000) -> list[Comparison]:
    """Every comparison x split x metric that has data, with Holm-adjusted t p-values across all of them."""
    results = load_results(results_dir)
    out = [c for a, r in COMPARISONS for sp in SPLITS for m in METRICS
           if (c := compare(results_dir, results, a, r, sp, m, n_boot)) is not None]
    tested = [c for c in out if c.t is not None]
    for c, p in zip(tested, stats.holm([c.t.p for c in tested])):
        c.p_holm = p
        # simultaneous coverage of all m intervals; Holm rejects wherever this interval excludes 0, and maybe more
        c.t_simultaneous = stats.paired_t(c.per_seed, level=1 - 0.05 / len(tested))
    return out


def _fmt_cmp(c: Comparison) -> str:
    if c.t is None:
        return f"{c.per_seed[0]:+.4f} (1 seed; boot [{c.boot.low:+.4f}, {c.boot.high:+.4f}])"
    s = c.t_simultaneous
    return (f"{c.t.mean:+.4f} [{c.t.low:+.4f}, {c.t.high:+.4f}]; corrected [{s.low:+.4f}, {s.high:+.4f}]; "
            f"Holm p={c.p_holm:.3g} (boot [{c.boot.low:+.4f}, {c.boot.high:+.4f}], "
            f"{sum(x > 0 for x in c.per_seed)}/{len(c.per_seed)})")


def main_table(comps: list[Comparison]) -> list[str]:
    cols = [(sp, m) for sp in SPLITS for m in METRICS if any(c.split == sp and c.metric == m for c in comps)]
    if not cols:
        return ["(no main-plan runs evaluated yet)"]
    m_tests = sum(c.t is not None for c in comps)
    out = [f"Improvement of the row's arm over its reference, > 0 = better (Δ gold NLL = NLL(ref) − NLL(arm); "
           f"Δ margin = margin(arm) − margin(ref); nats/token), mean over training seeds with its 95% t interval "
           f"(n − 1 dof); the corrected interval: the t interval at level 1 − 0.05/{m_tests} (Bonferroni: all "
           f"{m_tests} intervals of this table cover their true values together with probability ≥ 0.95); "
           f"Holm-adjusted p over the {m_tests} tests; the hierarchical bootstrap interval (seeds x tasks x "
           "queries); the seeds with Δ > 0.", "",
           "| arm − reference | " + " | ".join(f"{SPLIT_NAMES[sp]}: Δ {METRICS[m]}" for sp, m in cols) + " |",
           "|---|" + "---|" * len(cols)]
    for a, r in COMPARISONS:
        row = {(c.split, c.metric): c for c in comps if (c.arm, c.ref) == (a, r)}
        if row:
            out.append(f"| {ARMS[a][0]} − {ARMS[r][0]} | "
                       + " | ".join(_fmt_cmp(row[k]) if k in row else "–" for k in cols) + " |")
    return out


def power_table(comps: list[Comparison]) -> list[str]:
    tested = [c for c in comps if c.t is not None and c.t.sd > 0]
    if not tested:
        return ["(needs >= 2 training seeds per arm)"]
    m = len(tested)
    out = [f"Smallest true improvement the paired t test detects with power 0.8, given the observed spread over "
           f"seeds (sd) and n seeds, at α = 0.05 and at Holm's first step α = 0.05/{m}.", "",
           "| comparison | split | metric | n | sd over seeds | MDE α=0.05 | MDE α=0.05/m |",
           "|---|---|---|---:|---:|---:|---:|"]
    for c in tested:
        out.append(f"| {ARMS[c.arm][0]} − {ARMS[c.ref][0]} | {SPLIT_NAMES[c.split]} | {METRICS[c.metric]} | "
                   f"{c.t.n} | {c.t.sd:.4f} | {stats.min_detectable_effect(c.t.n, c.t.sd):.4f} | "
                   f"{stats.min_detectable_effect(c.t.n, c.t.sd, alpha=0.05 / m):.4f} |")
    return out


def _over_seeds(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{xs[0]:.3f}"
    t = stats.paired_t(xs)
    return f"{t.mean:.3f} [{t.low:.3f}, {t.high:.3f}]"


def arms_table(results: dict) -> list[str]:
    """The paper's layout: one row per arm, its absolute scores on each split as the mean over training seeds with
    a 95% t interval over seeds (n − 1 dof), and the compute each run took (the improvements, paired, are the
    main table's)."""
    runs = {arm: [results[n] for _, n in sorted(runs_by_seed(results, arm).items())] for arm in ARMS}
    runs = {arm: rs for arm, rs in runs.items() if rs}
    if not runs:
        return ["(no main-plan runs evaluated yet)"]
    cols = [(sp, m, name) for sp in SPLITS for m, name in (("mean", "score"), ("nll", "gold NLL"),
                                                           ("margin", "margin"))]
    out = ["Macro over tasks (score: macro-F1 or accuracy; gold NLL and margin in nats/token), mean over training "
           "seeds [95% t interval over seeds]; CPU seconds of training per run (one thread; runs resumed from a "
           "checkpoint left out) and target tokens.", "",
           "| arm | seeds | meta-steps | " + " | ".join(f"{SPLIT_NAMES[sp]}: {name}" for sp, _, name in cols)
           + " | train CPU s / run | train tokens / run |", "|---|---:|---:|" + "---|" * len(cols) + "---:|---:|"]
    for arm in ARMS:
        rs = runs.get(arm)
        if not rs:
            continue
        cells = [_over_seeds([r["evals"][sp]["macro"][m] for r in rs]) for sp, m, _ in cols]
        tok = _mean([r.get("training", {}).get("tokens") for r in rs])
        out.append(f"| {ARMS[arm][0]} | {len(rs)} | {rs[0]['run']['steps']} | " + " | ".join(cells)
                   + f" | {train_cpu(rs)} | {'–' if not tok else f'{tok:.0f}'} |")
    return out


def train_cpu(runs: list[dict]) -> str:
    """CPU seconds of training per run. A resumed run's process did only the steps after its checkpoint, so the
    mean is over the runs trained from step 0; with none, the resumed ones scaled to all steps (marked ≈)."""
    whole, scaled = [], []
    for r in runs:
        c, steps = r.get("compute", {}), r["run"]["steps"]
        cpu, start = c.get("train_cpu_s_this_process"), c.get("resumed_from_step", 0)
        if not cpu or start >= steps:
            continue
        (whole if start == 0 else scaled).append(cpu * steps / (steps - start))
    if whole:
        return f"{_mean(whole):.0f}" + (f" ({len(whole)} of {len(runs)} runs)" if len(whole) < len(runs) else "")
    return f"≈ {_mean(scaled):.0f}" if scaled else "–"


def decomposition_table(results_dir: Path, results: dict, n_boot: int = 2000) -> list[str]:
    """Each arm's gold-NLL gain over the base model split into the label set's gain (the best wrong option's NLL
    falls too) and the discrimination gain (margin). Descriptive: not in the Holm family of the main table."""
    out = ["Per arm against the base model, mean over training seeds (95% t interval over seeds when n ≥ 2; "
           "one seed: the bootstrap over tasks x queries). Δ gold NLL = Δ best-wrong NLL + Δ margin exactly; a "
           "gain mostly in the best-wrong column is the model learning the label set and format, not which "
           "option is right.", "",
           "| arm | split | n | Δ gold NLL | Δ best-wrong NLL | Δ margin |", "|---|---|---:|---|---|---|"]
    for arm, ref in COMPARISONS:
        if ref != "base":
            continue
        for sp in SPLITS:
            cs = [compare(results_dir, results, arm, ref, sp, m, n_boot) for m in ("nll", WRONG, "margin")]
            if cs[0] is None:
                continue
            cells = [f"{c.t.mean:+.4f} [{c.t.low:+.4f}, {c.t.high:+.4f}]" if c.t else
                     f"{c.per_seed[0]:+.4f} (boot [{c.boot.low:+.4f}, {c.boot.high:+.4f}])" for c in cs]
            out.append(f"| {ARMS[arm][0]} | {SPLIT_NAMES[sp]} | {len(cs[0].seeds)} | " + " | ".join(cells) + " |")
    return out if len(out) > 4 else ["(no main-plan runs evaluated yet)"]


def curve_rows(results_dir: Path, results: dict, n_boot: int = 2000) -> list[dict]:
    """Pilot: per track and step, the improvement over the pilot's base model (one training seed: the intervals
    cover tasks and queries only)."""
    base = next((n for n, r in results.items() if r.get("plan") == "pilot" and r.get("arm") == "base"
                 and "evals" in r), None)
    if base is None:
        return []
    rows = []
    for name, r in results.items():
        if r.get("plan") != "pilot" or r.get("arm") == "base" or "evals" not in r:
            continue
        row = {"track": r["run"]["track"], "step": r["run"]["steps"], "name": name,
               "outer_lr": r["config"]["engine"]["outer_lr"], "adapt_gain": r["training"]["adapt_gain_last50"]}
        for sp in SPLITS:
            for m in METRICS:
                d = improvement(query_values(load_per_query(results_dir, name), sp, m),
                                query_values(load_per_query(results_dir, base), sp, m), m)
                row[(sp, m)] = hierarchical_bootstrap([d], n_boot=n_boot)
            row[(sp, "score")] = r["evals"][sp]["macro"]["mean"] - results[base]["evals"][sp]["macro"]["mean"]
        rows.append(row)
    return sorted(rows, key=lambda x: (x["track"], x["step"]))


def curve_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["(no pilot points yet)"]
    out = ["| track | outer lr | meta-step | " + " | ".join(f"{SPLIT_NAMES[sp]}: Δ {METRICS[m]} [95% boot]"
                                                         for sp in SPLITS for m in METRICS)
           + " | Δ macro score (unseen tasks) |", "|---|---:|---:|" + "---|" * (len(SPLITS) * len(METRICS)) + "---:|"]
    for r in rows:
        cells = [f"{b.mean:+.4f} [{b.low:+.4f}, {b.high:+.4f}]" for b in (r[(sp, m)] for sp in SPLITS
                                                                          for m in METRICS)]
        out.append(f"| {r['track']} | {r['outer_lr']:g} | {r['step']} | " + " | ".join(cells)
                   + f" | {r[('test', 'score')]:+.4f} |")
    return out


def plot_curve(rows: list[dict], path: Path) -> bool:
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, m in zip(axes, METRICS):
        for track in sorted({r["track"] for r in rows}):
            pts = [(0, 0.0, 0.0, 0.0)] + [(r["step"], r[("test", m)].mean, r[("test", m)].low, r[("test", m)].high)
                                          for r in rows if r["track"] == track]
            x = [p[0] for p in pts]
            ax.plot(x, [p[1] for p in pts], marker="o", label=track)
            ax.fill_between(x, [p[2] for p in pts], [p[3] for p in pts], alpha=0.2)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("meta-step")
        ax.set_ylabel(f"Δ {METRICS[m]} vs base, unseen tasks (> 0 better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("Pilot: MetaICL on class_to_class, SmolLM2-135M (one training seed; bands: tasks x queries)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_comparisons(comps: list[Comparison], path: Path) -> bool:
    """One panel per split x metric: each comparison's per-seed improvements (dots) and its 95% t interval over
    seeds (bar), so that a reader sees the seeds behind every mean."""
    rows = [(a, r) for a, r in COMPARISONS if any((c.arm, c.ref) == (a, r) for c in comps)]
    if not rows:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(sp, m) for sp in SPLITS for m in METRICS]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 0.6 * len(rows) + 1.6), sharey=True)
    for ax, (sp, m) in zip(axes, panels):
        for y, (a, r) in enumerate(rows):
            c = next((c for c in comps if (c.arm, c.ref, c.split, c.metric) == (a, r, sp, m)), None)
            if c is None:
                continue
            if c.t is not None:
                ax.plot([c.t.low, c.t.high], [y, y], color="C0", lw=2)
            ax.plot(c.per_seed, [y] * len(c.per_seed), "o", color="C1", ms=4)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_title(f"{SPLIT_NAMES[sp]}: Δ {METRICS[m]}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_yticks(range(len(rows)), [f"{ARMS[a][0]} − {ARMS[r][0]}" for a, r in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Main plan: improvement per training seed (dots) and 95% t interval over seeds (bar); > 0 better",
                 fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def compute_table(results: dict) -> list[str]:
    out = ["| run | arm | steps | train tokens | train CPU s (this process) | resumed from | eval CPU s | "
           "adapt_gain (last 50 steps) | commit |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in results.items():
        c, t = r.get("compute", {}), r.get("training", {})
        ev = sum(e["cpu_s"] for e in r.get("evals", {}).values())
        g = t.get("adapt_gain_last50") if r["arm"] in INNER_STEP_ARMS else None
        out.append(f"| {name} | {r['arm']} | {r['run']['steps']} | {t.get('tokens', 0)} | "
                   f"{c.get('train_cpu_s_this_process', 0):.0f} | {c.get('resumed_from_step', 0)} | {ev:.0f} | "
                   f"{'–' if g is None else f'{g:+.4f}'} | {r['git'][:7]} |")
    return out


def load_training_logs(results_dir: Path) -> dict[str, list[dict]]:
    return {p.name[:-len(".train.json.gz")]: json.loads(gzip.decompress(p.read_bytes()))["steps"]
            for p in sorted(Path(results_dir).glob("*.train.json.gz"))}


def adaptation_table(results: dict, logs: dict[str, list[dict]]) -> list[str]:
    """Issue 13 item 2 during training: adapt_gain = L_Q(θ) − L_Q(φ_K) at every meta-step (mean over the step's
    tasks; > 0: the inner step lowered the query loss). Per run: the mean with a t interval over steps (descriptive:
    θ moves, so steps are not identically distributed), the share of positive steps, the first and last 25 steps.
    Per arm with ≥ 2 seeds: the mean of the runs' means with a t interval over seeds (n − 1 dof)."""
    out = ["| run | arm | steps | mean adapt_gain | 95% t CI (steps) | steps > 0 | first 25 | last 25 |",
           "|---|---|---:|---:|---|---:|---:|---:|"]
    by_arm: dict[str, list[float]] = {}
    for name, log in logs.items():
        g = [m["adapt_gain"] for m in log if m.get("adapt_gain") is not None and math.isfinite(m["adapt_gain"])]
        if len(g) < 2 or name not in results or results[name]["arm"] not in INNER_STEP_ARMS:
            continue
        t = stats.paired_t(g)
        arm = results[name]["arm"]
        if results[name].get("plan") == "main":
            by_arm.setdefault(arm, []).append(t.mean)
        out.append(f"| {name} | {arm} | {len(g)} | {t.mean:+.4f} | [{t.low:+.4f}, {t.high:+.4f}] | "
                   f"{sum(x > 0 for x in g)}/{len(g)} | {_mean(g[:25]):+.4f} | {_mean(g[-25:]):+.4f} |")
    if len(out) == 2:
        return ["No run with a per-step training log that measured adaptation yet."]
    for arm, means in by_arm.items():
        if len(means) >= 2:
            t = stats.paired_t(means)
            out.append(f"| **{ARMS[arm][0]}, {len(means)} seeds** | {arm} | | {t.mean:+.4f} | "
                       f"[{t.low:+.4f}, {t.high:+.4f}] (seeds) | | | |")
    return out


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def report(results_dir: Path = RESULTS_DIR, md_path: Path | None = None, n_boot: int = 2000) -> str:
    """bench/results/study_report.md (+ study_curve.png, study_comparisons.png): generated tables;
    bench/results/study.md is the hand-written plan and reading."""
    results_dir = Path(results_dir)
    md_path = md_path or results_dir.parent / "study_report.md"
    results = load_results(results_dir)
    md = ["# Study tables (generated by `python bench/study.py report`; do not edit)", "",
          f"{len(results)} run JSON(s) in `{_shown(results_dir)}`.",
          "", "## Pilot: improvement over the base model vs meta-steps", ""]
    rows = curve_rows(results_dir, results, n_boot)
    md += curve_table(rows)
    png = md_path.with_name("study_curve.png")
    if plot_curve(rows, png):
        md += ["", f"![pilot curve]({png.name})"]
    comps = main_comparisons(results_dir, n_boot)
    md += ["", "## Main plan: the arms", ""] + arms_table(results)
    md += ["", "## Main plan: paired comparisons", ""] + main_table(comps)
    png = md_path.with_name("study_comparisons.png")
    if plot_comparisons(comps, png):
        md += ["", f"![paired comparisons]({png.name})"]
    md += ["", "### Power", ""] + power_table(comps)
    md += ["", "### Where the gold-NLL gain comes from", ""] + decomposition_table(results_dir, results, n_boot)
    md += ["", "## The inner step during training (adapt_gain, nats/token)", ""]
    md += adaptation_table(results, load_training_logs(results_dir))
    md += ["", "## Runs and compute", ""] + compute_table(results)
    text = "\n".join(md) + "\n"
    md_path.write_text(text)
    return text


# -- command line ----------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run a plan (resumable; finished runs are skipped)")
    ls = sub.add_parser("list", help="list a plan's runs and whether they are done")
    for q in (r, ls):
        q.add_argument("--plan", required=True, choices=["smoke", "pilot", "main"])
        q.add_argument("--only", help="comma-separated run names or name prefixes")
        q.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="config override for every run")
        q.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
        q.add_argument("--work-dir", type=Path, default=WORK_DIR)
        q.add_argument("--steps", type=int, default=200, help="main plan: meta-steps per run (from the pilot)")
        q.add_argument("--time-factor", type=int, default=3,
                       help="main plan: MetaICL-on-equal-CPU-time steps = this x --steps (measured CPU ratio)")
    rep = sub.add_parser("report", help="write bench/results/study_report.md from the JSONs present")
    rep.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    it = sub.add_parser("import-training", help="write NAME.train.json.gz from a finished run's metrics.jsonl "
                        "(runs made before execute() wrote it)")
    it.add_argument("name")
    it.add_argument("--metrics", type=Path, required=True, help="the run's output dir's metrics.jsonl")
    it.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    pr = sub.add_parser("probe-inner-lr", help="adapt_gain vs inner lr (written to bench/results/study_probe.md)")
    pr.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4,1e-3")
    pr.add_argument("--steps", type=int, default=8, help="meta-batches of the preset to draw tasks from")
    pr.add_argument("--checkpoint", help="a training run's output dir: probe from its latest checkpoint")
    pr.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    pr.add_argument("--output", type=Path, default=HERE / "results" / "study_probe.md")
    args = p.parse_args(argv)
    if args.cmd == "probe-inner-lr":
        sha = require_clean()
        t0 = time.process_time()
        res = probe_inner_lr(tuple(float(x) for x in args.lrs.split(",")), args.steps, args.checkpoint,
                             extra=args.sets)
        lines = ["", f"## Probe {time.strftime('%Y-%m-%d %H:%M')} UTC, commit {sha[:7]}", "",
                 f"`OMP_NUM_THREADS=1 python bench/study.py probe-inner-lr --lrs {args.lrs} --steps {args.steps}"
                 + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
                 + "".join(f" --set {s}" for s in args.sets) + f"` ({time.process_time() - t0:.0f} CPU s)", ""]
        lines += probe_table(res)
        print("\n".join(lines))
        if not args.output.exists():
            args.output.write_text("# Inner-lr probe (issue 13): does one inner AdamW step lower the query loss?\n")
        with open(args.output, "a") as f:
            f.write("\n".join(lines) + "\n")
        _write(args.output.with_suffix(f".{sha[:7]}-{res['checkpoint_step']}.json"), res)
        return 0
    if args.cmd == "import-training":
        rec = args.results_dir / f"{args.name}.json"
        if not rec.exists():
            raise SystemExit(f"{rec}: no such run JSON (import the log of a finished run)")
        steps = json.loads(rec.read_text())["run"]["steps"]
        print(f"wrote {write_training_log(args.results_dir, args.name, args.metrics, steps)}")
        return 0
    if args.cmd == "report":
        report(args.results_dir)
        print(f"wrote {args.results_dir.parent / 'study_report.md'}")
        return 0
    plan = build_plan(args.plan, args.steps, args.time_factor)
    runs = plan.runs
    if args.only:
        want = [w.strip() for w in args.only.split(",") if w.strip()]
        runs = [x for x in runs if any(x.name == w or x.name.startswith(w) for w in want)]
        if not runs:
            raise SystemExit(f"--only {args.only!r}: no run of plan {plan.name!r} matches")
    if args.cmd == "list":
        for x in runs:
            done = (args.results_dir / f"{x.name}.json").exists()
            print(f"{'done' if done else '    '} {x.name:40s} {x.arm:13s} seed {x.seed} {x.steps:5d} steps, "
                  f"eval {x.eval}")
        return 0
    for i, x in enumerate(runs, 1):
        t0 = time.time()
        rec = execute(plan, x, args.results_dir, args.work_dir, args.sets, command=" ".join(
            ["python bench/study.py"] + (sys.argv[1:] if argv is None else list(argv))))
        print(f"[{i}/{len(runs)}] {x.name}: status {rec.get('status')} ({time.time() - t0:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
