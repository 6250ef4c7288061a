"""Regenerate bench/RESULTS.md and bench/plots/*.png from bench/results/*.json (and *.md fragments).

    .venv/bin/python bench/report.py

Reads every bench/results/meta_step-*.json written by bench/bench_meta_step.py (one per configuration), makes a
table per axis (headline, tasks per step, sequence length, inner steps, width, processes), checks the targets of
issue 7 against the rows, plots time and peak memory per mode against T and against the tasks per step, and
appends, verbatim, the markdown fragments other benchmarks write into bench/results/ (kernels.md, attention.md,
eval_smollm2.md first, in that order, then any other *.md by name). Nothing here measures: every number comes from
a JSON row, next to its device, shape and the command that produced it.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS, PLOTS, OUT = HERE / "results", HERE / "plots", HERE / "RESULTS.md"
FRAGMENTS_FIRST = ("kernels.md", "attention.md", "eval_smollm2.md")
MODE_ORDER = ("reference", "exact", "exact+ckpt", "exact+keep", "mixed", "fd", "first_order", "metaicl")
SECOND_ORDER = ("exact", "exact+ckpt", "exact+keep", "mixed", "fd")
AXES = [  # (tag, title, the Shape field that varies)
    ("headline", "Headline: GPT-2 Medium width, T = 1024 (the targets of issue 7)", None),
    ("tasks", "Exploration states: tasks per meta-step N", "tasks"),
    ("seq", "Sequence length T", "seq"),
    ("inner_steps", "Inner steps K", "inner_steps"),
    ("width", "Model width", "width"),
    ("procs", "Processes (torchrun, gloo; tasks split over ranks; CPU s = rank 0's process, peak RSS = the largest rank's)", "procs"),
    ("smoke", "Smoke suite (tiny; checks that everything runs)", None),
    ("custom", "Other configurations (explicit --width/--seq/... runs)", None),
]


def load():
    """(shipped-engine docs, experiment docs): an experiment measured a suggested core change, never a target."""
    docs, exps = [], []
    for p in sorted(RESULTS.glob("meta_step-*.json")):
        d = json.loads(p.read_text())
        d["file"] = p.name
        (exps if d["meta"].get("experiment") else docs).append(d)
    return docs, exps


def _mode_key(m):
    return (MODE_ORDER.index(m) if m in MODE_ORDER else len(MODE_ORDER), m)


def f(x, fmt=".2f", none="–"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return none
    return format(x, fmt)


def shape_str(c):
    vocab = "GPT-2 vocab 50257" if c["vocab"] == 50257 else f"vocab {c['vocab']}"
    return (f"GPT-2 width {c['width']}, {c['heads']} heads, {c['layers']} layers, {vocab}; batch {c['batch']}, "
            f"T = {c['seq']}, N = {c['tasks']} task(s), K = {c['inner_steps']} inner step(s), "
            f"{c['procs']} process(es); fp32")


def meta_str(m):
    return (f"{m['device']} ({m['cpu']}, {m['cores']} cores, shared; load avg {m['loadavg_start']:.1f}→"
            f"{m.get('loadavg_end', float('nan')):.1f}), {m.get('threads', '?')} torch thread(s) per configuration, "
            f"launcher {m.get('launcher', '?')}; torch {m['torch']}, transformers {m['transformers']}, "
            f"git {m['git_sha']}{' (+ uncommitted core/kernels edits)' if m.get('git_dirty') else ''}; {m['date']}")


COLS = ("| mode | attention | median s [p20, p80] | CPU s | tokens/s | peak RSS GB | Δ peak GB | ×MetaICL time "
        "(CPU) | floor × | speed-up vs ref (CPU) | peak ÷ ref | Δ ÷ ref | ‖G−G_ref‖/‖G_ref‖ |")
SEP = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def row_md(r, floor, prefix=""):
    if "error" in r:
        err = r["error"].strip().splitlines()[-1][:80].replace("|", "/") if r["error"].strip() else "?"
        return f"| {prefix}{r['mode']} | | failed: {err} | | | | | | | | | | |"
    spread = "" if r.get("timed_warmup") or len(r["times_s"]) < 2 else f" [{r['p20_s']:.2f}, {r['p80_s']:.2f}]"
    warm = " (1 meta-gradient)" if r.get("timed_warmup") else ""
    err = f(r.get("rel_err_vs_reference"), ".1e")
    if r["mode"] == "first_order" and err != "–":
        err += " (FOMAML: approximation)"
    fl = f(floor, ".2f") if r["mode"] in SECOND_ORDER else ""
    return (f"| {prefix}{r['mode']} | {r.get('attention') or ''} | {r['median_s']:.2f}{spread}{warm} | "
            f"{r['cpu_median_s']:.2f} | {r['tokens_per_s']:.0f} | {r['rss_peak_gb']:.2f} | "
            f"{r['meta_step_peak_gb']:.2f} | {f(r.get('time_vs_metaicl'))} ({f(r.get('cpu_vs_metaicl'))}) | {fl} | "
            f"{f(r.get('speedup_vs_reference'))} ({f(r.get('cpu_speedup_vs_reference'))}) | "
            f"{f(r.get('mem_vs_reference'))} | {f(r.get('increment_vs_reference'))} | {err} |")


def table(docs, tag, field):
    sel = [d for d in docs if tag in d["config"].get("axes", [])]
    if not sel:
        return []
    if field:
        sel.sort(key=lambda d: d["config"][field])
    out = []
    for d in sel:
        c = d["config"]
        label = f"{field} = {c[field]}: " if field else (f"[{c['label']}] " if c.get("label") else "")
        out += [f"**{label}{shape_str(c)}**  ", f"{meta_str(d['meta'])}  ",
                f"`{d['meta']['command']}` → `bench/results/{d['file']}`", "", COLS, SEP]
        floor = d.get("floor", {}).get("ratio")
        out += [row_md(r, floor) for r in sorted(d["rows"], key=lambda r: _mode_key(r["mode"]))]
        out.append("")
    return out


# -- targets ---------------------------------------------------------------------------------------------------
def _by_mode(doc):
    return {r["mode"]: r for r in doc["rows"] if "error" not in r}


def verdict(ok):
    return "**holds**" if ok else "**does not hold**"


def targets(docs):
    out = ["## Targets of issue 7, checked against the rows", ""]
    head = [d for d in docs if "headline" in d["config"].get("axes", [])]
    if head:
        d = head[-1]
        m = _by_mode(d)
        c = d["config"]
        where = f"({shape_str(c)}; `bench/results/{d['file']}`)"
        ex, ref, fd, mi = m.get("exact"), m.get("reference"), m.get("fd"), m.get("metaicl")
        if ex and ref:
            mem = ex["rss_peak_gb"] / ref["rss_peak_gb"]
            inc = ex["meta_step_peak_gb"] / ref["meta_step_peak_gb"]
            sp, spc = ref["median_s"] / ex["median_s"], ref["cpu_median_s"] / ex["cpu_median_s"]
            out.append(f"1. exact ≤ 0.5× the reference's peak memory {where}: peak RSS {ex['rss_peak_gb']:.2f} vs "
                       f"{ref['rss_peak_gb']:.2f} GB = {mem:.2f}× — {verdict(mem <= 0.5)} (the meta-step's own increment "
                       f"over the RSS after building: {ex['meta_step_peak_gb']:.2f} vs {ref['meta_step_peak_gb']:.2f} GB = "
                       f"{inc:.2f}×).")
            out.append(f"2. exact ≥ 1.5× the reference's speed: {sp:.2f}× wall, {spc:.2f}× CPU time "
                       f"({ex['median_s']:.1f} vs {ref['median_s']:.1f} s) — {verdict(min(sp, spc) >= 1.5)}.")
        if fd and mi:
            r = fd["rss_peak_gb"] / mi["rss_peak_gb"]
            out.append(f"3. fd within 1.2× the peak memory of a MetaICL step (same tokens): {fd['rss_peak_gb']:.2f} vs "
                       f"{mi['rss_peak_gb']:.2f} GB = {r:.2f}× — {verdict(r <= 1.2)} (increments {fd['meta_step_peak_gb']:.2f}"
                       f" vs {mi['meta_step_peak_gb']:.2f} GB).")
        if mi:
            so = [(m[k]["median_s"], m[k]["cpu_median_s"], k) for k in SECOND_ORDER if k in m]
            if so:
                best = min(so, key=lambda x: x[1])
                w, c_ = best[0] / mi["median_s"], best[1] / mi["cpu_median_s"]
                v = verdict(c_ <= 2.0) if (w <= 2.0) == (c_ <= 2.0) else \
                    f"**borderline** (holds on {'CPU' if c_ <= 2.0 else 'wall'} time only)"
                out.append(f"4. best second-order mode ≤ 2.0× the time of first-order steps on the same tokens: "
                           f"{best[2]} at {w:.2f}× wall, {c_:.2f}× CPU (floor of the cost model {d['floor']['ratio']:.2f}×)"
                           f" — {v} at the headline shape.")
    # 4 at every configuration
    lines = []
    for d in docs:
        m = _by_mode(d)
        mi = m.get("metaicl")
        so = [(m[k]["cpu_median_s"] / mi["cpu_median_s"], k) for k in SECOND_ORDER if k in m] if mi else []
        fdr = m["fd"]["rss_peak_gb"] / mi["rss_peak_gb"] if mi and "fd" in m else None
        if so:
            b = min(so)
            lab = f" [{d['config']['label']}]" if d["config"].get("label") else ""
            lines.append(f"`{d['config']['name']}`{lab}: best {b[1]} {b[0]:.2f}× MetaICL (CPU){'' if b[0] <= 2 else ' ✗'}"
                         + (f", fd peak {fdr:.2f}× MetaICL{'' if fdr <= 1.2 else ' ✗'}" if fdr else ""))
    if lines:
        out += ["", "Targets 3 and 4 at every configuration (CPU-time ratio; ✗ = misses):", ""]
        out += [f"- {l}" for l in lines]
    # 5: linear time, flat memory in tasks
    tk = sorted([d for d in docs if "tasks" in d["config"].get("axes", [])], key=lambda d: d["config"]["tasks"])
    if len(tk) >= 2:
        out += ["", "5. time linear and memory flat in exploration states (tasks per step N; "
                f"{shape_str({**tk[0]['config'], 'tasks': 'N'})}):", ""]
        out += ["| mode | N | CPU s | CPU s per task | peak RSS GB | Δ peak GB |", "|---|---:|---:|---:|---:|---:|"]
        verdicts = []
        modes = sorted({r["mode"] for d in tk for r in d["rows"] if "error" not in r}, key=_mode_key)
        for mode in modes:
            pts = [(d["config"]["tasks"], _by_mode(d)[mode]) for d in tk if mode in _by_mode(d)]
            for n, r in pts:
                out.append(f"| {mode} | {n} | {r['cpu_median_s']:.2f} | {r['cpu_median_s'] / n:.2f} | "
                           f"{r['rss_peak_gb']:.2f} | {r['meta_step_peak_gb']:.2f} |")
            if len(pts) >= 3:
                xs, ys = [n for n, _ in pts], [r["cpu_median_s"] for _, r in pts]
                mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
                b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                a = my - b * mx
                resid = max(abs(y - (a + b * x)) / y for x, y in zip(xs, ys))
                memr = pts[-1][1]["rss_peak_gb"] / pts[0][1]["rss_peak_gb"]
                verdicts.append((mode, a, b, resid, memr, pts[0][0], pts[-1][0]))
        out.append("")
        for mode, a, b, resid, memr, n0, n1 in verdicts:
            out.append(f"- {mode}: CPU s ≈ {a:.2f} + {b:.2f}·N, largest deviation from that line {resid:.0%} (linear: "
                       f"≤ 20% on this noisy machine) — {verdict(resid <= 0.2)}; peak RSS at N = {n1} is {memr:.2f}× that "
                       f"at N = {n0} (flat: ≤ 1.1×) — {verdict(memr <= 1.1)}.")
    out.append("")
    return out


# -- plots -----------------------------------------------------------------------------------------------------
def plots(docs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(matplotlib not installed: no plots)"]
    PLOTS.mkdir(parents=True, exist_ok=True)
    made = []
    for tag, field, xlabel in (("seq", "seq", "sequence length T"), ("tasks", "tasks", "tasks per meta-step N"),
                               ("inner_steps", "inner_steps", "inner steps K"), ("width", "width", "model width")):
        sel = sorted([d for d in docs if tag in d["config"].get("axes", [])], key=lambda d: d["config"][field])
        if len(sel) < 2:
            continue
        modes = sorted({r["mode"] for d in sel for r in d["rows"] if "error" not in r}, key=_mode_key)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
        for mode in modes:
            xs, ts, ms = [], [], []
            for d in sel:
                r = _by_mode(d).get(mode)
                if r:
                    xs.append(d["config"][field])
                    ts.append(r["cpu_median_s"])
                    ms.append(r["rss_peak_gb"])
            style = dict(marker="o", linestyle="--" if mode in ("reference", "metaicl") else "-")
            a1.plot(xs, ts, label=mode, **style)
            a2.plot(xs, ms, label=mode, **style)
        for a in (a1, a2):
            a.set_xscale("log", base=2)
            a.set_xlabel(xlabel)
            a.grid(alpha=0.3)
        a1.set_yscale("log")
        a1.set_ylabel("CPU seconds per meta-step (median)")
        a2.set_ylabel("peak RSS GB")
        a1.legend(fontsize=8)
        c = sel[0]["config"]
        fig.suptitle(f"{xlabel}: GPT-2 width {c['width'] if field != 'width' else 'x'}, {c['layers']} layers, vocab "
                     f"{c['vocab']}, T {c['seq'] if field != 'seq' else 'x'}, N {c['tasks'] if field != 'tasks' else 'x'}, "
                     f"K {c['inner_steps'] if field != 'inner_steps' else 'x'}; {sel[0]['meta']['device']}, "
                     f"{sel[0]['meta'].get('threads', '?')} thread(s), git {sel[0]['meta']['git_sha']}", fontsize=9)
        fig.tight_layout()
        name = f"meta_step_vs_{tag}.png"
        fig.savefig(PLOTS / name, dpi=110)
        plt.close(fig)
        made.append(f"![{xlabel}](plots/{name})")
    return made


# -- fragments -------------------------------------------------------------------------------------------------
def fragments():
    files = [RESULTS / n for n in FRAGMENTS_FIRST if (RESULTS / n).exists()]
    files += sorted(p for p in RESULTS.glob("*.md") if p.name not in FRAGMENTS_FIRST)
    out = []
    for p in files:
        # a fragment's images sit next to it in results/; RESULTS.md is one level up
        text = re.sub(r"\]\((?![a-z]+:|/)([^)]+\.png)\)", r"](results/\1)", p.read_text().rstrip())
        out += [f"## From `bench/results/{p.name}` (included verbatim)", "", text, ""]
    return out


HEADER = """# Benchmark results

Generated by `bench/report.py` from `bench/results/*.json` — do not edit by hand. One command regenerates
everything (about {minutes} on the machine below):

    .venv/bin/python bench/bench_meta_step.py --suite default && .venv/bin/python bench/report.py

Each table below names the exact command that produced it; a single configuration can be re-measured with
e.g. `bench/bench_meta_step.py --suite default --only headline` (or `--only tasks`, `--only T1024`, ...), or
with explicit `--width/--heads/--layers/--seq/--tasks/--inner-steps/--procs/--vocab/--modes`.

## What is measured

One meta-step = the meta-gradient over N tasks (K inner AdamW steps on K support batches each, then the query
batch) plus the outer AdamW update; MetaICL = one first-order AdamW step on exactly the same N·(K+1) batches.
Modes: `exact` (reverse-over-reverse HVP), `mixed` (forward-over-reverse), `fd` (finite-difference HVP),
`first_order` (FOMAML through the AdamW inner step) — `mamlen.core.MetaEngine`, attention chosen by the engine
(`mamlen` = the tiled second-order attention, `sdpa` for first-order-only modes) — and `reference`
(`bench/reference.py`: the same step written the obvious way — inner AdamW unrolled with `create_graph=True` through
`torch.func.functional_call` on per-parameter tensors, eager attention, no checkpointing, then
`autograd.grad(L_Q(φ_K), θ)`; `tests/bench/test_reference_matches_engine.py` proves it computes the engine's G in
float64 to 1e-9).

- Every (configuration, mode) runs in its own process: a fork of a parent that has only imported torch and
  transformers (each child imports mamlen itself; Linux starts a forked child's `ru_maxrss` at its RSS at fork; a fresh interpreter, the
  `--exec` option, starts ~0.14 GB higher because it maps more library pages, and is ~30 s slower to start here),
  or torchrun ranks for P > 1. Random-init GPT-2 (fp32, no dropout), batch 1, random tokens, labels -100 on the
  first half (the prompt). Shared moments from a seeded mid-training state (step 10).
- Time: a warm-up meta-gradient, then R timed meta-steps; median and p20/p80 of wall seconds, and the median CPU
  seconds of the process (`time.process_time`). **This 2-core machine is shared with other jobs** (load average
  {load} over the runs below; each table gives it at the start → end of its configuration): under load, wall time
  is inflated up to ~4× by waiting for a core and varies from run to run, CPU time much less — read ratios from the
  CPU column. One torch thread per configuration (`--threads 1`): under a load of ~8, a MetaICL step of width 256,
  4 layers, T = 256 took 22.8 s wall with 2 threads and 16.6 s with 1 (a second OpenMP thread mostly spun).
  Configurations with `repeats = 0` (the headline) time the warm-up meta-gradient itself: one sample, no outer
  update (which is elementwise and small), no p20/p80.
- tokens/s = N·(K+1)·T input tokens per step / median wall seconds.
- Memory (GB = 2³⁰ bytes): peak RSS of the process (`ru_maxrss`); Δ peak = peak − RSS right after building model, optimizer state
  and batches, i.e. the meta-step's own working memory. With P > 1: per-rank maximum (the JSON has each rank).
- G check: every mode's warm-up meta-gradient against the reference's, all from the same θ, moments and batches,
  in float32 (`‖G−G_ref‖/‖G_ref‖`). For `first_order` this is how far FOMAML is from the true meta-gradient.
- **Floor** (column `floor ×`): a second-order meta-step needs at least the K support gradients, the query gradient
  and K Hessian-vector products. Counting a gradient (forward + backward) as one unit and — optimistically — an HVP
  as one unit as well, the floor is (2K+1) units against the K+1 units of first-order steps on the same tokens:
  floor = (2K+1)/(K+1) × the MetaICL time (1.5× at K = 1, 1.67× at K = 2, 1.75× at K = 3). In FLOPs an HVP is
  ≈ 2 gradients (forward-over-reverse) — the floor is a lower bound, not an expectation. `×MetaICL time` is each
  mode's median divided by the MetaICL median of the same configuration and run.
"""


def findings(docs, exps):
    """What the rows say about where time and memory go (numbers from the JSON rows named)."""
    head = next((d for d in docs if "headline" in d["config"].get("axes", [])), None)
    prof = next((d for d in docs if d["config"].get("label") == "profile"), None)
    exp = next((d for d in exps if head and d["config"]["name"] == head["config"]["name"]), None)
    if not head:
        return []
    m = _by_mode(head)
    out = ["## Where the time and the memory go (why targets 1–3 miss)", ""]
    if "metaicl" in m and "reference" in m and "exact" in m:
        g = m["metaicl"]["cpu_median_s"] / 2  # MetaICL at K = 1 = two gradients
        out.append(
            f"- **Pass count.** At the headline a MetaICL step (2 gradients) took {m['metaicl']['cpu_median_s']:.1f} CPU s, "
            f"so one gradient ≈ {g:.1f} s. The reference took {m['reference']['cpu_median_s']:.1f} s "
            f"({m['reference']['cpu_median_s'] / g:.1f} gradient-units): one support gradient with its graph, the query "
            f"forward, one backward through query and support graphs — the minimum. The engine's `exact` mode with "
            f"`inner_graph=\"recompute\"` (the default) does one more support gradient by design (the forward pass "
            f"without a graph, then again with one in the reverse pass): {m['exact']['cpu_median_s']:.1f} s "
            f"({m['exact']['cpu_median_s'] / g:.1f} units). Eager attention costs the reference little on CPU at these "
            f"shapes (causal eager QKᵀ and AV are ~5% of the forward FLOPs at width 1024, T = 1024, 2 layers; the linear "
            f"layers and the 50257-way LM head dominate), so there is no attention saving for the engine to win back.")
    if prof:
        pm = _by_mode(prof)
        if all(k in pm for k in ("exact", "exact+keep", "exact+eager", "reference")):
            out.append(f"- **Variants** (`bench/results/{prof['file']}`, {shape_str(prof['config'])}): reference "
                       f"{pm['reference']['cpu_median_s']:.2f} CPU s; exact {pm['exact']['cpu_median_s']:.2f}; exact with "
                       f"`inner_graph=keep` (no recompute) {pm['exact+keep']['cpu_median_s']:.2f}; exact with eager instead "
                       f"of tiled attention {pm['exact+eager']['cpu_median_s']:.2f}"
                       + (f"; exact with checkpointing {pm['exact+ckpt']['cpu_median_s']:.2f} s, peak "
                          f"{pm['exact+ckpt']['rss_peak_gb']:.2f} vs {pm['exact']['rss_peak_gb']:.2f} GB" if "exact+ckpt" in pm else "")
                       + ". Even without the recompute the engine was slower than the reference: the rest is the next point.")
    out.append("- **Flat-buffer views (the main engine overhead).** The engine evaluates every loss at flat weights φ through "
               "per-parameter views made by slicing the flat buffer (`core/arena.py: ParamArena.views`). Autograd's "
               "backward of each slice allocates a zero tensor the size of the whole flat buffer and adds it into the "
               "flat gradient: per backward, (number of parameter tensors) × (all parameters) of memory writes, and "
               "flat-sized temporaries that raise the peak. torch.profiler on the axis base shape (exact, keep): "
               "`aten::fill_` + `add`/`add_` under `SliceBackward0` ≈ 69% of the meta-gradient's CPU time; with the views "
               "taken from one `torch.split` (backward = one `cat`) the same meta-gradient took 0.41 instead of 1.15 CPU s "
               "(one in-process measurement, no warm-up repeats). The experiment section below measures that change "
               "at the headline shape.")
    if exp:
        em = _by_mode(exp)
        parts = [f"{k} {m[k]['cpu_median_s']:.1f} → {em[k]['cpu_median_s']:.1f} CPU s, peak {m[k]['rss_peak_gb']:.2f} → "
                 f"{em[k]['rss_peak_gb']:.2f} GB" for k in ("exact", "fd", "metaicl") if k in m and k in em]
        if parts:
            out.append(f"  Headline, shipped → split views: {'; '.join(parts)}"
                       + (f"; exact+keep {em['exact+keep']['cpu_median_s']:.1f} CPU s, {em['exact+keep']['rss_peak_gb']:.2f} GB"
                          if "exact+keep" in em else "")
                       + (f" (reference in that run: {em['reference']['cpu_median_s']:.1f} CPU s, "
                          f"{em['reference']['rss_peak_gb']:.2f} GB)" if "reference" in em else "") + ".")
    c = head["config"]
    n_params = c["vocab"] * c["width"] + max(1024, c["seq"]) * c["width"] + c["layers"] * (12 * c["width"] ** 2 + 13 * c["width"]) + 2 * c["width"]
    pb = n_params * 4 / 2**30
    logits = c["seq"] * c["vocab"] * 4 / 2**30
    if "exact" in m and "fd" in m and "metaicl" in m:
        out.append(
            f"- **Memory at the headline shape is parameter-sized buffers, not activations.** With 2 layers and the "
            f"tied 50257×1024 embedding the model has {n_params / 1e6:.1f}M parameters: each parameter-sized fp32 buffer "
            f"is {pb:.2f} GB, each T×V logits tensor {logits:.2f} GB. The meta-step increments are exact "
            f"{m['exact']['meta_step_peak_gb']:.2f} GB ≈ {m['exact']['meta_step_peak_gb'] / pb:.0f} parameter buffers, fd "
            f"{m['fd']['meta_step_peak_gb']:.2f} ≈ {m['fd']['meta_step_peak_gb'] / pb:.0f}, MetaICL "
            f"{m['metaicl']['meta_step_peak_gb']:.2f} ≈ {m['metaicl']['meta_step_peak_gb'] / pb:.0f}, reference "
            f"{m['reference']['meta_step_peak_gb']:.2f} ≈ {m['reference']['meta_step_peak_gb'] / pb:.0f}. The engine "
            f"holds per inner step g, m_j, v_j, φ_j, then p̄, G, the adjoint outputs ḡ, p̄', m̄, v̄ (m̄, v̄ are not needed "
            f"after the last reverse step), the HVP result, and — in fd — both perturbed copies φ ± rḡ at once "
            f"(`core/hvp.py: hvp_fd_into` builds them with one zip) plus ∇L at each; the slice-backward temporaries "
            f"above come on top. The reference's unrolled graph saves ~the same number of parameter-sized tensors "
            f"(the AdamW arithmetic), so exact lands near 0.9× of it instead of ≤ 0.5×. With 24 layers the "
            f"activations (and the reference's T×T eager scores) would weigh more and the ratio would move toward the "
            f"engine, but a 24-layer reference does not fit next to four other jobs in 24 GB here.")
    mal = {d["config"]["tasks"]: _by_mode(d).get("exact") for d in docs if d["config"].get("label") == "malloc-mmap1M"}
    tk = {d["config"]["tasks"]: _by_mode(d).get("exact") for d in docs if "tasks" in d["config"].get("axes", [])}
    if mal.get(1) and mal.get(8) and tk.get(1) and tk.get(8):
        out.append(f"- **exact's peak grows with N** (target 5): {tk[1]['rss_peak_gb']:.2f} GB at N = 1, {tk[8]['rss_peak_gb']:.2f} "
                   f"at N = 8 with the default glibc allocator. With a fixed mmap threshold (`MALLOC_MMAP_THRESHOLD_=1048576`, "
                   f"rows labelled malloc-mmap1M) it stays at {mal[1]['rss_peak_gb']:.2f} → {mal[8]['rss_peak_gb']:.2f} GB: the "
                   f"growth is the allocator keeping freed parameter-sized blocks in its heap (glibc raises its mmap "
                   f"threshold after the first large free), not memory the engine holds across tasks. The price of the "
                   f"fixed threshold is a fresh zeroed mapping per allocation: {mal[8]['cpu_median_s']:.1f} instead of "
                   f"{tk[8]['cpu_median_s']:.1f} CPU s at N = 8 (different runs). Reusing the tape/adjoint buffers across "
                   f"tasks in the engine would fix both.")
    out += ["", "Suggested changes to core/ (not made: core/ is not this benchmark's), biggest first:",
            "1. `ParamArena.views`: take the views from `torch.split(flat, numels)` (or give autograd per-parameter leaves "
            "and write their gradients into a flat buffer once) — removes the O(#tensors × #params) slice-backward "
            "traffic and its temporaries (experiment rows below).",
            "2. `exact`: make `inner_graph=\"keep\"` the default at K = 1 (or whenever the graph fits): saves one support "
            "gradient per inner step (recompute was measured above).",
            "3. `hvp_fd_into`: build φ + rḡ, take its gradient, free it, then φ − rḡ; combine into the accumulator as "
            "each gradient arrives (g₊ kept, g₋ subtracted in place) — two parameter buffers fewer at the peak.",
            "4. Reverse pass: skip m̄, v̄ at the last reverse step (j = 1); add the HVP into p̄ per parameter as it is "
            "produced and free it, instead of holding the whole `hv` list next to the adjoint outputs.",
            "5. Allocate the per-task parameter-sized buffers (tape, adjoints, HVP) once per meta-step and reuse them "
            "across tasks: removes the allocator growth with N and the page-zeroing cost of fresh buffers.",
            "6. Loss: a chunked cross-entropy over the vocabulary (never the full T×V fp32 logits plus their "
            "gradient and the double-backward's copies) — at T = 1024 × 50257 each copy is 0.2 GB.", ""]
    return out


def experiments(exps, docs):
    if not exps:
        return []
    out = ["## Experiment: the engine with a suggested core/ change (NOT the shipped engine)", "",
           "`--experiment split-views` monkeypatches `mamlen.core.arena.ParamArena.views` inside the measured process "
           "only: the per-parameter views of a flat buffer come from one `torch.split` instead of one slice per "
           "parameter. Values and gradients are the same (the G check below still compares with the reference), but "
           "autograd's backward of a slice (`aten::slice_backward`) allocates a zero tensor the size of the WHOLE flat "
           "buffer for every parameter and adds it up — O(#parameter tensors × #parameters) memory traffic per "
           "backward, plus flat-buffer-sized temporaries — while the backward of split is one `cat`. In torch.profiler "
           "on the axis base shape (exact, inner_graph=keep) `aten::fill_`/`add`/`add_` under `SliceBackward0` took "
           "~69% of the CPU time of a meta-gradient. Compare with the shipped rows of the same shape above.", ""]
    ship = {d["config"]["name"]: d for d in docs}
    for d in exps:
        c = d["config"]
        out += [f"**[{d['meta']['experiment']}] {shape_str(c)}**  ", f"{meta_str(d['meta'])}  ",
                f"`{d['meta']['command']}` → `bench/results/{d['file']}`", "", COLS, SEP]
        out += [row_md(r, d.get("floor", {}).get("ratio")) for r in sorted(d["rows"], key=lambda r: _mode_key(r["mode"]))]
        base = ship.get(c["name"])
        if base:
            bm, em = _by_mode(base), _by_mode(d)
            out += ["", "Same shape, shipped engine vs experiment (CPU seconds, peak RSS GB; different runs):", "",
                    "| mode | shipped CPU s | experiment CPU s | shipped peak GB | experiment peak GB |",
                    "|---|---:|---:|---:|---:|"]
            for mode in sorted(set(bm) | set(em), key=_mode_key):
                a, b = bm.get(mode), em.get(mode)
                out.append(f"| {mode} | {f(a and a['cpu_median_s'])} | {f(b and b['cpu_median_s'])} | "
                           f"{f(a and a['rss_peak_gb'])} | {f(b and b['rss_peak_gb'])} |")
        out.append("")
    return out


def main():
    docs, exps = load()
    suite = [d for d in docs if not set(d["config"].get("axes", [])) & {"custom", "smoke"}]
    total = sum(sum(sum(r.get("times_s", [])) + r.get("warmup_s", 0) for r in d["rows"]) for d in suite)
    minutes = f"{max(1, round(total * 1.3 / 60))} minutes" if suite else "?"
    loads = [x for d in docs for x in (d["meta"].get("loadavg_start"), d["meta"].get("loadavg_end")) if x is not None]
    load_range = f"{min(loads):.1f}–{max(loads):.1f}" if loads else "?"
    md = [HEADER.format(minutes=minutes, load=load_range)]
    md += targets(docs)
    md += findings(docs, exps)
    imgs = plots(docs)
    for tag, title, field in AXES:
        t = table(docs, tag, field)
        if t:
            md += [f"## {title}", ""] + t
            if tag in ("seq", "tasks", "inner_steps", "width"):
                md += [i for i in imgs if f"_vs_{tag}.png" in i] + [""]
    md += experiments(exps, docs)
    md += fragments()
    OUT.write_text("\n".join(md).rstrip() + "\n")
    print(f"wrote {OUT.relative_to(HERE.parent)} ({len(docs)} configuration(s), {len(imgs)} plot(s))")


if __name__ == "__main__":
    main()
