"""Time and peak memory of one meta-step: the engine's HVP modes and the MetaICL step vs bench/reference.py.

    .venv/bin/python bench/bench_meta_step.py --suite smoke          # tiny, ~1 min: does everything run
    .venv/bin/python bench/bench_meta_step.py --suite default        # what bench/RESULTS.md shows
    .venv/bin/python bench/bench_meta_step.py --width 512 --heads 8 --layers 4 --seq 512 --tasks 2 --inner-steps 1
    .venv/bin/python bench/report.py                                 # regenerate bench/RESULTS.md + plots

Per configuration (model width/depth, sequence length T, tasks per step N = exploration states, inner steps K,
processes P) and per mode, a process of its own — a fork of this one, which has imported torch and transformers
but run no torch op (a forked child's ru_maxrss starts at its RSS at fork, so the peak is that measurement's
alone; `--exec` uses a fresh interpreter instead, ~30 s slower to start on a busy machine), or torchrun ranks
(`--standalone --nproc_per_node P`, gloo) when P > 1 — builds a random-init GPT-2 (fp32, no dropout, GPT-2
vocabulary unless --vocab), N tasks of K support batches + 1 query batch (batch 1, T random tokens, labels -100 on the first half: the prompt), shared AdamW
moments from a seeded "mid-training" state (step 10, m ~ 1e-3·N(0,1), v ~ 1e-6·U(0,1)), then:
  1. warm-up: G = meta_gradient(tasks) (MetaICL: one step). The reference runs first and saves its G; every
     later mode compares its own G with it after its measurements (all start from the same θ, state, batches);
  2. R timed meta-steps (meta-gradient + outer AdamW): median and p20/p80 wall seconds, median CPU seconds of
     the process (robust to other jobs on the machine), tokens/s; torch threads: --threads (default 1);
  3. memory: peak RSS of the process (ru_maxrss) next to the RSS right after building the model and after
     building everything (model, optimizer state, batches) — the difference is the meta-step's own peak;
     torch.cuda.max_memory_allocated on CUDA. With P > 1, per-rank maximum and sum over ranks.
Tokens per step = N·(K+1)·T input tokens (support + query; MetaICL gets exactly those N·(K+1) batches).

Modes: exact, mixed, fd, first_order (MetaEngine, attention chosen by the engine), metaicl (engine.metaicl_step
on the same N·(K+1) batches: the first-order yardstick), reference (bench/reference.py: unrolled create_graph,
eager attention). Variants: "exact+ckpt" (activation checkpointing), "exact+keep" (inner_graph="keep"),
"exact+eager" (eager attention instead of the engine's choice).

Theoretical floor (column "floor"): a second-order meta-step needs at least the K support gradients, the query
gradient and K Hessian-vector products. Counting one gradient (forward + backward) as one unit and, optimistically,
one HVP as one unit too, the floor is (2K+1) units against the K+1 of first-order steps on the same tokens:
floor = (2K+1)/(K+1) × MetaICL time (1.5× at K = 1). A forward-over-reverse HVP is ≈ 2 units in FLOPs, so the
floor is a lower bound, not a promise. Every "×MetaICL" ratio divides by the MetaICL time of the same run.

Output: bench/results/meta_step-<name>.json, one per configuration: {"meta": device, versions, git SHA, command,
load average; "config": shape; "rows": one per mode}.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
MODES = ("exact", "mixed", "fd", "first_order", "metaicl", "reference")
GPT2_VOCAB = 50257

# Engine / reference hyper-parameters (values matter for the G check's conditioning only, not for the cost).
HP = dict(inner_lr=1e-5, outer_lr=1e-5, betas=(0.9, 0.999), eps=1e-8, inner_weight_decay=0.0, outer_weight_decay=0.0)


@dataclass
class Shape:
    width: int = 256
    heads: int = 4
    layers: int = 4
    seq: int = 256
    tasks: int = 1
    inner_steps: int = 1
    procs: int = 1
    vocab: int = GPT2_VOCAB
    batch: int = 1
    repeats: int = 3
    modes: list = field(default_factory=lambda: list(MODES))
    axes: list = field(default_factory=lambda: ["custom"])  # which RESULTS.md tables this configuration belongs to

    @property
    def name(self):
        v = "" if self.vocab == GPT2_VOCAB else f"-v{self.vocab}"
        return (f"w{self.width}-h{self.heads}-l{self.layers}-T{self.seq}-n{self.tasks}-K{self.inner_steps}"
                f"-p{self.procs}{v}")


def _suite(name):
    if name == "smoke":  # seconds: every mode, both process counts, K = 2
        s = dict(width=64, heads=2, layers=2, seq=64, vocab=512, repeats=2)
        return [Shape(**s, tasks=2, inner_steps=2, axes=["smoke"]),
                Shape(**s, tasks=2, inner_steps=2, procs=2, axes=["smoke"])]
    if name != "default":
        raise SystemExit(f"unknown suite {name!r}: smoke or default")
    # base of the scaling axes: width 256 / 4 heads / 2 layers, vocabulary 8192 (so that the LM head does not
    # dominate small widths), T = 128, N = 1 task, K = 1, P = 1 process. Sized so the suite takes ~40 minutes on a
    # 2-core machine shared with other jobs.
    base = dict(width=256, heads=4, layers=2, seq=128, tasks=1, inner_steps=1, procs=1, vocab=8192, repeats=2)
    shapes = {}

    def add(axis, **kw):
        s = Shape(**{**base, **kw})
        shapes.setdefault(s.name, replace(s, axes=[]))
        shapes[s.name].axes.append(axis)

    # the targets of issue 7 first: GPT-2 Medium width (1024, 16 heads, GPT-2 vocabulary), T = 1024, 2 of its 24
    # layers (time: one exact meta-step takes minutes here); one timed meta-gradient per mode
    add("headline", width=1024, heads=16, layers=2, seq=1024, vocab=GPT2_VOCAB, repeats=0,
        modes=["reference", "exact", "fd", "metaicl", "first_order", "mixed"])
    for n in (1, 2, 4, 8):
        add("tasks", tasks=n, repeats=2 if n <= 4 else 1)
    for T in (128, 256, 512):
        add("seq", seq=T)
    for k in (1, 2, 3):
        add("inner_steps", inner_steps=k)
    for p in (1, 2):
        add("procs", tasks=2, procs=p)
    for w, h in ((128, 2), (256, 4), (512, 8)):
        add("width", width=w, heads=h)
    add("seq", seq=1024)  # the most expensive point of the axes last
    return list(shapes.values())


# -- the measured process --------------------------------------------------------------------------------------
def _rss_now_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _rss_peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _load_reference():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bench_reference", HERE / "reference.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _build(shape: Shape, device):
    """Model, optimizer state and tasks: identical in every process of a configuration (fixed seeds)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from mamlen.core import Task

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=shape.width, n_head=shape.heads, n_layer=shape.layers, vocab_size=shape.vocab,
                     n_positions=max(1024, shape.seq), attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).to(device).eval()
    gen = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), generator=gen)
        labels = ids.clone()
        labels[:, : shape.seq // 2] = -100  # the prompt half carries no loss
        return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
                "labels": labels.to(device)}

    tasks = [Task(support=[batch() for _ in range(shape.inner_steps)], query=batch()) for _ in range(shape.tasks)]
    sgen = torch.Generator().manual_seed(2)
    state = {"step": 10, "exp_avg": {}, "exp_avg_sq": {}}
    for n, p in model.named_parameters():
        state["exp_avg"][n] = (1e-3 * torch.randn(p.shape, generator=sgen)).to(device, p.dtype)
        state["exp_avg_sq"][n] = (1e-6 * torch.rand(p.shape, generator=sgen)).to(device, p.dtype)
    return model, state, tasks


def _vm_hwm_gb():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 2**20


def _rel_err(a: dict, b: dict):
    num = sum(float((a[n].double() - b[n].double()).pow(2).sum()) for n in b)
    den = sum(float(b[n].double().pow(2).sum()) for n in b)
    return (num / den) ** 0.5


def _kernels_version():
    """Which build of the C++ kernels this process loaded (path, mtime): the tree is shared with other jobs."""
    import sys as _sys
    mods = [m for n, m in _sys.modules.items() if n.startswith("mamlen.kernels")]
    for line in open("/proc/self/maps"):
        if ".so" in line and ("mamlen" in line or "kernels/_C" in line):
            path = line.split()[-1]
            try:
                return {"so": path, "mtime": time.strftime("%H:%M:%S", time.gmtime(os.path.getmtime(path)))}
            except OSError:
                return {"so": path}
    return {"so": None, "modules": len(mods)}


def _experiment_split_views():
    """EXPERIMENT (--experiment split-views), not the shipped engine: ParamArena.views via one torch.split per flat
    buffer instead of one slice per parameter. Same values and gradients; but the backward of a slice materialises
    a zero tensor of the WHOLE flat buffer per parameter (aten::slice_backward: zeros + add), while the backward of
    split is one cat. The change suggested for core/arena.py; applied here by monkeypatching the child only."""
    import torch
    from mamlen.core.arena import ParamArena

    def views(self, flats):
        out = {}
        for i, flat in enumerate(flats):
            names = self.names[i]
            for n, part in zip(names, torch.split(flat, [self.slots[n].numel for n in names])):
                out[n] = part.view(self.slots[n].shape)
        return out
    ParamArena.views = views


def worker(shape: Shape, mode: str, device: str, out: str, save_g: str | None, ref_g: str | None, threads: int,
           experiment: str = ""):
    """One measurement: runs in a forked child of a process that has only imported torch/transformers/mamlen
    (procs = 1), or as a torchrun rank (procs > 1). Writes its row as JSON to `out` (rank 0)."""
    import torch
    import torch.distributed as dist

    from mamlen.core import MetaConfig, MetaEngine

    if experiment == "split-views":
        _experiment_split_views()
    world, rank = 1, 0
    if shape.procs > 1:
        dist.init_process_group("gloo")
        world, rank = dist.get_world_size(), dist.get_rank()
        assert world == shape.procs, (world, shape.procs)
    torch.set_num_threads(max(1, threads // world))  # the machine's cores, shared by the ranks
    dev = torch.device(device)
    cuda = dev.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(dev)
        if world > 1:
            dist.barrier()

    model, state, tasks = _build(shape, dev)
    rss_model = _rss_now_gb()
    base, _, variant = mode.partition("+")
    if base == "reference":
        ref = _load_reference().ReferenceMetaLearner(model, inner_steps=shape.inner_steps, **HP)
        ref.load_optimizer_state(state)
        attn = model.config._attn_implementation
        grad_fn, step_fn = ref.meta_gradient, ref.step
    else:
        hvp = "first_order" if base == "metaicl" else base
        cfg = MetaConfig(hvp=hvp, inner_steps=shape.inner_steps, checkpointing=variant == "ckpt",
                         inner_graph="keep" if variant == "keep" else "recompute",
                         attn_implementation="eager" if variant == "eager" else None, **HP)
        engine = MetaEngine(model, cfg)
        engine.load_optimizer_state(state)
        attn = str(engine.attention)
        if base == "metaicl":
            grad_fn, step_fn = None, lambda my: engine.metaicl_step([b for t in my for b in (*t.support, t.query)])
        else:
            grad_fn, step_fn = engine.meta_gradient, engine.step
    del state
    mine = tasks[rank::world]  # this rank's share of the meta-batch
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    rss_base = _rss_now_gb()

    # warm-up: the meta-gradient at the common starting point, kept for the G check. With repeats = 0 (the
    # minutes-long GPT-2 Medium-width configurations) it is also the one timed sample (no outer update in it).
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    if grad_fn is None:
        metrics = step_fn(mine)
    else:
        G = grad_fn(mine)
        metrics = {"loss": float("nan")}
        if save_g and rank == 0:
            torch.save({n: g.detach() for n, g in G.items()}, save_g)
        del G
    sync()
    warm, warm_cpu = time.perf_counter() - t0, time.process_time() - c0

    times, cpu = [], []
    for _ in range(shape.repeats):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        metrics = step_fn(mine)
        sync()  # every rank has applied the same outer step
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)  # CPU seconds of this process, all its threads
    if not times:
        times, cpu = [warm], [warm_cpu]
    peak = _rss_peak_gb()
    row = dict(mode=mode, attention=attn, rss_model_gb=rss_model, rss_base_gb=rss_base, rss_peak_gb=peak,
               vm_hwm_gb=_vm_hwm_gb(),
               cuda_max_allocated_gb=torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
               warmup_s=warm, times_s=times, cpu_times_s=cpu, timed_warmup=shape.repeats == 0,
               loss=float(metrics["loss"]), threads=torch.get_num_threads(), kernels=_kernels_version())
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, {k: row[k] for k in ("rss_model_gb", "rss_base_gb", "rss_peak_gb", "times_s",
                                                           "cpu_times_s")})
        row["ranks"] = every
        row["rss_peak_gb"] = max(r["rss_peak_gb"] for r in every)
        row["rss_peak_sum_gb"] = sum(r["rss_peak_gb"] for r in every)
        row["rss_base_sum_gb"] = sum(r["rss_base_gb"] for r in every)
        dist.destroy_process_group()
    if rank == 0:
        # the G check, after the peak was read: this mode's warm-up G against the reference's (same θ, state, tasks)
        if save_g and ref_g and Path(save_g).exists() and Path(ref_g).exists() and save_g != ref_g:
            del model, tasks
            row["rel_err_vs_reference"] = _rel_err(torch.load(save_g), torch.load(ref_g))
        Path(out).write_text(json.dumps(row))


# -- the parent: one subprocess per (configuration, mode) ------------------------------------------------------
def _quantile(xs, q):
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _meta(device):
    import torch
    import transformers

    def git(*a):
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, cwd=HERE).stdout.strip()
        except OSError:
            return "?"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return dict(device=device, cpu=cpu, cores=os.cpu_count(), torch=torch.__version__,
                transformers=transformers.__version__, python=platform.python_version(),
                git_sha=git("rev-parse", "--short", "HEAD"), git_dirty=bool(git("status", "--porcelain", "--", "core", "kernels")),
                date=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), loadavg_start=os.getloadavg()[0])


def _launch(shape, mode, device, out, gfile, ref_g, threads, timeout, fresh, experiment=""):
    """Run one measurement in its own process; returns an error text or None."""
    if shape.procs > 1 or fresh:
        args = [str(HERE / "bench_meta_step.py"), "--worker", json.dumps(asdict(shape)), "--mode", mode,
                "--device", device, "--out", str(out), "--threads", str(threads)]
        if experiment:
            args += ["--experiment", experiment]
        if gfile:
            args += ["--save-g", str(gfile), "--ref-g", str(ref_g)]
        cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(shape.procs)]
               if shape.procs > 1 else [sys.executable]) + args
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads // shape.procs)), "PYTHONWARNINGS": "ignore",
               "TRANSFORMERS_VERBOSITY": "error"}
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return f"timeout after {timeout:.0f} s"
        return None if p.returncode == 0 and out.exists() else (p.stderr or p.stdout)[-1500:]
    # procs = 1: fork this process, which has imported torch, transformers and mamlen but run no torch op, so
    # the child starts at the RSS of those imports — as a fresh interpreter would, without its ~30 s of imports
    # on a busy machine. A forked child's ru_maxrss is its own (Linux starts it at the RSS at fork).
    errfile = out.with_suffix(".err")
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            worker(shape, mode, device, str(out), str(gfile) if gfile else None, str(ref_g) if ref_g else None, threads,
                   experiment)
        except BaseException:
            import traceback
            errfile.write_text(traceback.format_exc())
            code = 1
        finally:
            os._exit(code)
    deadline = time.time() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.time() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            return f"timeout after {timeout:.0f} s"
        time.sleep(0.2)
    if status != 0 or not out.exists():
        return errfile.read_text()[-1500:] if errfile.exists() else f"child exited with status {status}"
    return None


def run_shape(shape: Shape, device: str, timeout: float, command: str, threads: int, fresh=False, label="",
              experiment=""):
    meta = _meta(device)
    tmp = Path(tempfile.mkdtemp(prefix="mamlen-bench-"))
    rows = []
    print(f"== {shape.name}  (axes: {', '.join(shape.axes)})", flush=True)
    ref_g = tmp / "G-reference.pt"
    # the reference first: every later mode compares its warm-up G with the reference's
    modes = sorted(shape.modes, key=lambda m: m != "reference")
    for mode in modes:
        out = tmp / f"{mode}.json"
        gfile = None if mode.startswith("metaicl") else tmp / f"G-{mode}.pt"
        t0 = time.time()
        err = _launch(shape, mode, device, out, gfile, ref_g, threads, timeout, fresh, experiment)
        retried = None
        if err and not err.startswith("timeout"):  # e.g. SIGSEGV while another job rewrote a shared library
            retried = err[-300:]
            print(f"   {mode:12s} crashed ({err.strip().splitlines()[-1][-120:]}); retrying once", flush=True)
            err = _launch(shape, mode, device, out, gfile, ref_g, threads, timeout, fresh, experiment)
        if gfile and gfile.exists() and mode != "reference":
            gfile.unlink()  # checked by the child already; G files are parameter-sized
        if err:
            row = dict(mode=mode, error=err)
        else:
            row = json.loads(out.read_text())
            ts = row["times_s"]
            row.update(median_s=_quantile(ts, 0.5), p20_s=_quantile(ts, 0.2), p80_s=_quantile(ts, 0.8),
                       cpu_median_s=_quantile(row["cpu_times_s"], 0.5))
            if retried:
                row["retried_after"] = retried
            row["tokens_per_step"] = shape.tasks * (shape.inner_steps + 1) * shape.batch * shape.seq
            row["tokens_per_s"] = row["tokens_per_step"] / row["median_s"]
            row["meta_step_peak_gb"] = row["rss_peak_gb"] - row["rss_base_gb"]
        rows.append(row)
        msg = (f"FAILED: {row['error'][-400:]}" if "error" in row else
               f"median {row['median_s']:.3f} s [{row['p20_s']:.3f}, {row['p80_s']:.3f}] cpu {row['cpu_median_s']:.3f} s  "
               f"{row['tokens_per_s']:.0f} tok/s  "
               f"peak RSS {row['rss_peak_gb']:.2f} GB (base {row['rss_base_gb']:.2f})  attention {row.get('attention')}")
        if "rel_err_vs_reference" in row:
            msg += f"  |G-G_ref|/|G_ref| {row['rel_err_vs_reference']:.1e}"
        print(f"   {mode:12s} {msg}   [{time.time() - t0:.0f} s wall]", flush=True)

    by = {r["mode"]: r for r in rows if "error" not in r}
    mi = by.get("metaicl")
    K = shape.inner_steps
    for r in rows:
        if "error" in r:
            continue
        if mi:
            r["time_vs_metaicl"] = r["median_s"] / mi["median_s"]
            r["cpu_vs_metaicl"] = r["cpu_median_s"] / mi["cpu_median_s"]
            r["mem_vs_metaicl"] = r["rss_peak_gb"] / mi["rss_peak_gb"]
            r["increment_vs_metaicl"] = (r["meta_step_peak_gb"] / mi["meta_step_peak_gb"]
                                         if mi["meta_step_peak_gb"] > 0 else None)
        if "reference" in by:
            r["time_vs_reference"] = r["median_s"] / by["reference"]["median_s"]
            r["speedup_vs_reference"] = by["reference"]["median_s"] / r["median_s"]
            r["cpu_speedup_vs_reference"] = by["reference"]["cpu_median_s"] / r["cpu_median_s"]
            r["mem_vs_reference"] = r["rss_peak_gb"] / by["reference"]["rss_peak_gb"]
            ref_inc = by["reference"]["meta_step_peak_gb"]
            r["increment_vs_reference"] = r["meta_step_peak_gb"] / ref_inc if ref_inc > 0 else None
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    meta["loadavg_end"] = os.getloadavg()[0]
    meta["threads"] = threads
    meta["experiment"] = experiment or None
    meta["launcher"] = "torchrun" if shape.procs > 1 else ("exec" if fresh else "fork")
    meta["command"] = command
    floor = dict(ratio=(2 * K + 1) / (K + 1), model="(K support gradients + 1 query gradient + K HVPs at 1 gradient "
                 "each) / (K+1 gradients of a first-order step on the same tokens)")
    if mi:
        floor["seconds"] = floor["ratio"] * mi["median_s"]
    doc = dict(meta=meta, config={**asdict(shape), "name": shape.name, "label": label}, floor=floor, rows=rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"meta_step-{shape.name}{'-' + label if label else ''}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"   -> {path.relative_to(HERE.parent)}", flush=True)
    return doc


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["smoke", "default"], help="a named set of configurations")
    ap.add_argument("--only", nargs="+", help="with --suite: only the configurations whose name or axis contains one of these")
    ap.add_argument("--width", type=int, nargs="+", default=[256])
    ap.add_argument("--heads", type=int, nargs="+", default=None, help="default: width // 64")
    ap.add_argument("--layers", type=int, nargs="+", default=[4])
    ap.add_argument("--seq", type=int, nargs="+", default=[256])
    ap.add_argument("--tasks", type=int, nargs="+", default=[1])
    ap.add_argument("--inner-steps", type=int, nargs="+", default=[1])
    ap.add_argument("--procs", type=int, nargs="+", default=[1])
    ap.add_argument("--vocab", type=int, default=GPT2_VOCAB)
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed meta-steps after the warm-up (0: time the warm-up meta-gradient itself)")
    ap.add_argument("--modes", nargs="+", default=list(MODES),
                    help=f"of {', '.join(MODES)}; variants +ckpt (checkpointing), +keep (exact: inner_graph=keep), "
                         "+eager (eager attention)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per (configuration, mode) subprocess")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per configuration, split over ranks (default 1: on a 2-core machine shared "
                         "with other jobs, a second OpenMP thread mostly spins — see RESULTS.md)")
    ap.add_argument("--exec", action="store_true",
                    help="a fresh interpreter per measurement instead of a fork of this one (slower start)")
    ap.add_argument("--label", default="", help="appended to the JSON name (explicit runs that share a suite shape)")
    ap.add_argument("--experiment", default="", choices=["", "split-views"],
                    help="split-views: measure the engine with a suggested core/arena.py change monkeypatched into "
                         "the measured process (NOT the shipped engine; labelled as such in the JSON)")
    ap.add_argument("--list", action="store_true", help="print the configurations and exit")
    # internal: one measured process
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--save-g", help=argparse.SUPPRESS)
    ap.add_argument("--ref-g", help=argparse.SUPPRESS)
    args = ap.parse_args()
    threads = args.threads or 1

    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    if args.worker:
        worker(Shape(**json.loads(args.worker)), args.mode, args.device, args.out, args.save_g, args.ref_g, threads,
               args.experiment)
        return
    # the slow imports every measured child needs, done once here (no torch op runs in this process: safe to
    # fork). NOT mamlen: each child loads the kernels' shared library itself, so a library rebuilt in place while
    # the suite runs (other jobs share this tree) is picked up instead of crashing every later child (SIGSEGV).
    import transformers  # noqa: F401
    from transformers import GPT2LMHeadModel  # noqa: F401
    _load_reference()

    if args.suite:
        shapes = _suite(args.suite)
        if args.only:
            shapes = [s for s in shapes if any(o in s.name or o in s.axes for o in args.only)]
    else:
        shapes = [Shape(width=w, heads=h if args.heads else max(1, w // 64), layers=l, seq=T, tasks=n, inner_steps=k,
                        procs=p, vocab=args.vocab, repeats=args.repeats, modes=args.modes)
                  for w in args.width for h in (args.heads or [None]) for l in args.layers for T in args.seq
                  for n in args.tasks for k in args.inner_steps for p in args.procs]
    for s in shapes:
        bad = [m for m in s.modes if m.partition("+")[0] not in MODES]
        if bad:
            raise SystemExit(f"unknown mode(s) {bad}: choose from {', '.join(MODES)} (+ckpt / +keep variants)")
    if args.list:
        for s in shapes:
            print(s.name, s.axes, s.repeats, s.modes)
        return
    command = "python bench/bench_meta_step.py " + " ".join(sys.argv[1:])
    t0 = time.time()
    for s in shapes:
        label = args.label or args.experiment
        run_shape(s, args.device, args.timeout, command, threads, fresh=args.exec, label=label,
                  experiment=args.experiment)
    print(f"done: {len(shapes)} configuration(s) in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
