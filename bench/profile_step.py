"""Where an exact meta-step's time goes at the study's shape (issue 14: exact step ≤ 2× a MetaICL step).

Builds the `study` preset (SmolLM2-135M-Instruct, k = 4, 2 tasks per step, batch 1, K = 1, hvp exact,
inner_graph keep, float32, one thread) with train/meta.py's `build()`, then for each of the first `--steps` steps of
the sampler runs, on the same model, the MAML-en-LLM step on `sampler.meta_batch(step)` and the MetaICL step on
`sampler.metaicl_batch(step)` (the same tasks; both steps update θ with lr 1e-5, which does not change the cost).
Every step is timed in CPU seconds of this process (`time.process_time`), split into phases by wrapping the
functions the engine calls (nothing in the engine is changed):

    before      L_Q(θ) without a graph (measure_adaptation)        hvp.gradient(create_graph=True): support
    query/grad  hvp.gradient (first order)                         hvp.kept_: the HVP through the kept graph
    kernels     the fused inner/adjoint/outer AdamW passes         rest: Python, G accumulation, allocator ...

`--profile exact|metaicl` adds a torch.profiler table (self CPU time per op) of one extra step.

    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_step.py --steps 3
    OMP_NUM_THREADS=1 .venv/bin/python bench/profile_step.py --steps 1 --profile exact --rows 40

`--retain-freed-memory` makes glibc serve every allocation from its heap and keep freed memory for reuse
(mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 2 GiB; the same as the environment MALLOC_MMAP_MAX_=0
MALLOC_TRIM_THRESHOLD_=...). By default every buffer above 32 MiB (a parameter-sized one is 0.54 GB here) is a
fresh mmap, and its first touch page-faults 4 KiB at a time: ~0.3 s per parameter-sized buffer on this machine,
several times per step. The price: RSS stays at its high-water mark (plus fragmentation) instead of shrinking.

`--dense-max-scores N` sets core/attention_ops.DENSE_MAX_SCORES (the largest Tq·Tk per head that runs the dense
second-order attention instead of the tiled one) for the whole run: the A/B of that threshold.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class PhaseClock:
    """CPU seconds per phase; nested phases are charged to the innermost one only."""

    def __init__(self):
        self.totals = collections.defaultdict(float)
        self._stack = []

    @contextlib.contextmanager
    def phase(self, name):
        t0 = time.process_time()
        self._stack.append(0.0)  # time of inner phases, subtracted from this one
        try:
            yield
        finally:
            dt = time.process_time() - t0
            inner = self._stack.pop()
            self.totals[name] += dt - inner
            if self._stack:
                self._stack[-1] += dt

    def wrap(self, owner, attr, name_of):
        """Replace owner.attr by a wrapper charging each call to phase name_of(*args, **kwargs)."""
        fn = getattr(owner, attr)

        def timed(*args, **kwargs):
            with self.phase(name_of(*args, **kwargs)):
                return fn(*args, **kwargs)

        setattr(owner, attr, timed)


def instrument(engine, clock: PhaseClock):
    import torch

    from mamlen import kernels
    from mamlen.core import hvp

    clock.wrap(hvp, "gradient", lambda *a, create_graph=False, **k: "support grad (create_graph)" if create_graph
               else "first-order grad")
    clock.wrap(hvp, "kept_", lambda *a, **k: "HVP (kept graph)")
    for name in ("inner_adamw_forward", "inner_adamw_adjoint"):
        clock.wrap(kernels, name, lambda *a, **k: "kernels")
    clock.wrap(engine.opt_state, "apply_", lambda *a, **k: "kernels")
    clock.wrap(engine.obj, "loss", lambda *a, **k: "loss forward (inside grads)" if torch.is_grad_enabled()
               else "before: L_Q(θ) no-grad")


def retain_freed_memory():
    """glibc mallopt: no mmap'd chunks, heap trimmed only above 2 GiB free (see the module docstring)."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # malloc.h
    if not (libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)):
        raise RuntimeError("mallopt refused M_MMAP_MAX / M_TRIM_THRESHOLD (not glibc?)")


def seq_lens(batches):
    return [int(b["attention_mask"].sum(-1).max()) if "attention_mask" in b else b["input_ids"].shape[1]
            for b in batches]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="sampler steps 1..N, each run as both methods")
    ap.add_argument("--profile", choices=("exact", "metaicl"), help="torch.profiler table of one more step")
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--retain-freed-memory", action="store_true", help="glibc: reuse freed memory (see above)")
    ap.add_argument("--dense-max-scores", type=int, help="override core/attention_ops.DENSE_MAX_SCORES")
    ap.add_argument("--set", action="append", default=[], help="extra preset overrides, KEY=VALUE")
    args = ap.parse_args(argv)
    if args.retain_freed_memory:
        retain_freed_memory()

    import torch

    from mamlen.core import attention_ops
    from mamlen.train import config, meta

    if args.dense_max_scores is not None:
        attention_ops.DENSE_MAX_SCORES = args.dense_max_scores
    argv_cfg = ["--preset", "study", "--set", "output_dir=/tmp/profile_step"]
    for s in args.set:
        argv_cfg += ["--set", s]
    cfg = config.from_args(config.parser().parse_args(argv_cfg))
    torch.set_num_threads(cfg.train.num_threads or 1)
    model, tok, engine, mcfg, sampler, _ = meta.build(cfg, 0, 1, torch.device("cpu"))
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True).stdout.strip()
    print(f"# commit {sha.strip()}{' (dirty)' if dirty else ''}, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, attention {engine.attention}, DENSE_MAX_SCORES "
          f"{attention_ops.DENSE_MAX_SCORES}, retain freed memory {args.retain_freed_memory}, "
          f"load {os.getloadavg()[0]:.1f}")
    clock = PhaseClock()
    instrument(engine, clock)
    rows = []
    for step in range(1, args.steps + 1):
        tasks, batches = sampler.meta_batch(step), sampler.metaicl_batch(step)
        lens = {"exact": [seq_lens(t.support) + seq_lens([t.query]) for t in tasks],
                "metaicl": [seq_lens([b]) + [b["input_ids"].shape[0]] for b in batches]}  # (longest, rows)
        for method in ("exact", "metaicl"):
            clock.totals.clear()
            t0 = time.process_time()
            engine.step(tasks) if method == "exact" else engine.metaicl_step(batches)
            cpu = time.process_time() - t0
            phases = dict(clock.totals)
            phases["rest"] = cpu - sum(phases.values())
            rows.append((step, method, cpu, phases))
            print(f"step {step} {method:8s} {cpu:6.2f} CPU s  lens {lens[method]}  load {os.getloadavg()[0]:.1f}  " +
                  "  ".join(f"{k} {v:.2f}" for k, v in phases.items()), flush=True)
    med = {m: statistics.median(r[2] for r in rows if r[1] == m) for m in ("exact", "metaicl")}
    ratios = [e[2] / m[2] for e, m in zip(rows[0::2], rows[1::2])]
    print(f"median CPU s: exact {med['exact']:.2f}, MetaICL {med['metaicl']:.2f}; exact / MetaICL per step: "
          + ", ".join(f"{r:.2f}" for r in ratios) + f" (median {statistics.median(ratios):.2f}); peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB, load {os.getloadavg()[0]:.1f}")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        step = args.steps + 1
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if args.profile == "exact":
                engine.step(sampler.meta_batch(step))
            else:
                engine.metaicl_step(sampler.metaicl_batch(step))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
