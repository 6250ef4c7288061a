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
            r3 = next((x for x in docs if x["config"].get("label") == "headline-r3"), None)
            rm = _by_mode(r3) if r3 else {}
            if "exact+keep" in rm and "reference" in rm and "exact" in rm:
                k, e, r = rm["exact+keep"], rm["exact"], rm["reference"]
                out.append(f"   Same shape, 3 timed repeats (`bench/results/{r3['file']}`): exact "
                           f"{r['cpu_median_s'] / e['cpu_median_s']:.2f}× CPU, peak {e['rss_peak_gb'] / r['rss_peak_gb']:.2f}×; "
                           f"exact with `inner_graph=\"keep\"` {r['cpu_median_s'] / k['cpu_median_s']:.2f}× CPU "
                           f"({k['cpu_median_s']:.1f} vs {r['cpu_median_s']:.1f} s), "
                           f"{r['median_s'] / k['median_s']:.2f}× wall — "
                           f"{verdict(min(r['cpu_median_s'] / k['cpu_median_s'], r['median_s'] / k['median_s']) >= 1.5)}"
                           f"; peak {k['rss_peak_gb'] / r['rss_peak_gb']:.2f}× (increment "
                           f"{k['meta_step_peak_gb'] / r['meta_step_peak_gb']:.2f}×).")
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
    """What the headline rows say about where time and memory go (numbers from the JSON rows named)."""
    head = next((d for d in docs if "headline" in d["config"].get("axes", [])), None)
    if not head:
        return []
    m = _by_mode(head)
    r3 = next((d for d in docs if d["config"].get("label") == "headline-r3"), None)
    out = ["## Where the time and the memory go", ""]
    if "metaicl" in m and "reference" in m and "exact" in m:
        g = m["metaicl"]["cpu_median_s"] / 2  # MetaICL at K = 1 = two gradients
        line = (f"- **Pass count.** At the headline a MetaICL step (2 gradients) took {m['metaicl']['cpu_median_s']:.1f} "
                f"CPU s, so one gradient ≈ {g:.1f} s. The reference took {m['reference']['cpu_median_s']:.1f} s "
                f"({m['reference']['cpu_median_s'] / g:.1f} gradient-units): one support gradient with its graph, the "
                f"query forward, one backward through query and support graphs. `exact` with `inner_graph=\"recompute\"` "
                f"(the default, memory-lean) computes the support gradient twice, without and then with a graph: "
                f"{m['exact']['cpu_median_s']:.1f} s ({m['exact']['cpu_median_s'] / g:.1f} units).")
        if r3:
            rm = _by_mode(r3)
            if all(k in rm for k in ("exact+keep", "reference")):
                line += (f" With `inner_graph=\"keep\"` the support graph of the forward pass is reused (3 timed "
                         f"repeats, `bench/results/{r3['file']}`): {rm['exact+keep']['cpu_median_s']:.1f} vs "
                         f"{rm['reference']['cpu_median_s']:.1f} CPU s for the reference, "
                         f"{rm['reference']['cpu_median_s'] / rm['exact+keep']['cpu_median_s']:.2f}× faster, peak "
                         f"{rm['exact+keep']['rss_peak_gb']:.2f} vs {rm['reference']['rss_peak_gb']:.2f} GB.")
        line += (" The loss applies the LM head only at target positions (`logits_to_keep`), which the reference "
                 "(`model(**batch).loss`) does not: at 2 layers the 50257-way head is most of a forward's FLOPs.")
        out.append(line)
    c = head["config"]
    n_params = (c["vocab"] * c["width"] + max(1024, c["seq"]) * c["width"]
                + c["layers"] * (12 * c["width"] ** 2 + 13 * c["width"]) + 2 * c["width"])
    pb = n_params * 4 / 2**30
    if all(k in m for k in ("exact", "fd", "metaicl", "reference")):
        out.append(
            f"- **Memory at the headline shape is parameter-sized buffers.** {n_params / 1e6:.1f}M parameters, "
            f"{pb:.2f} GB per fp32 buffer. Meta-step increments: exact {m['exact']['meta_step_peak_gb']:.2f} GB ≈ "
            f"{m['exact']['meta_step_peak_gb'] / pb:.0f} buffers, fd {m['fd']['meta_step_peak_gb']:.2f} ≈ "
            f"{m['fd']['meta_step_peak_gb'] / pb:.0f}, MetaICL {m['metaicl']['meta_step_peak_gb']:.2f} ≈ "
            f"{m['metaicl']['meta_step_peak_gb'] / pb:.0f}, reference {m['reference']['meta_step_peak_gb']:.2f} ≈ "
            f"{m['reference']['meta_step_peak_gb'] / pb:.0f}. At the exact HVP of a K = 1 task the engine holds θ, m, "
            f"v, p̄ and ḡ (tests/core/test_engine_memory.py) plus the HVP's graph. `bench/memory_stages.py` gives "
            f"the peak of each stage.")
    out += ["", "Done in the engine (session 2, each measured by the rows above or bench/memory_stages.py):",
            "views by one `split` (`core/arena.py`); the adjoint in place over dead tape buffers (`out=` kernels); "
            "m₁, v₁ recomputed in the reverse pass from m₀, v₀ instead of stored; the exact HVP per parameter, "
            "without flat assembly; the first task's G_i as the accumulator; logits at target positions only; no "
            "Python name outliving a dead buffer.", "",
            "Not done, next candidates: `inner_graph=\"keep\"` as the default when the graph fits; in `fd`, combining "
            "g₊ into the accumulator before computing g₋ needs care (the difference cancels catastrophically if "
            "added separately); a chunked-vocabulary cross-entropy for long targets; a fused attention kernel "
            "whose backward is differentiable on GPU (the Triton path keeps PyTorch passes for second order).", ""]
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
