"""Peak memory and time of one exact second-order HVP pass, eager vs "mamlen" (tiled) attention.

The pass: loss L(θ) of a GPT-2 Medium-width model (n_embd 1024, 16 heads, 4096 MLP, GPT-2 vocabulary), batch 1,
T tokens; g = ∇L with create_graph=True; then ∇⟨g, v⟩ — what the engine's `exact` HVP mode does per inner step.
Each configuration runs in a fresh subprocess; peak memory = ru_maxrss of that process (CPU RSS), also given
as the increase over the RSS measured right after building the model and batch (weights, inputs), per token.

    .venv/bin/python bench/bench_attention.py --impl eager mamlen --T 256 512 1024 --layers 4 \
        --out bench/results/attention.md
    .venv/bin/python bench/bench_attention.py --one --impl mamlen --T 1024 --layers 24 --checkpoint

Timing on a shared 2-core CPU is noisy: compare ratios from the same run.
"""
import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time


def _rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def _current_rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def run_one(impl, T, layers, checkpoint, repeat, seed=0):
    import functools

    import torch
    import transformers
    from torch.utils.checkpoint import checkpoint as ckpt

    from mamlen.core import hf_attention

    hf_attention.register()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=1024, n_head=16, n_layer=layers, n_positions=max(1024, T),
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    model.set_attn_implementation(impl)
    if checkpoint:  # non-reentrant, per block, as core/activation_checkpoint.py does
        for block in model.transformer.h:
            block.forward = functools.partial(ckpt, block.forward, use_reentrant=False)
    params = [p for p in model.parameters()]
    ids = torch.randint(0, cfg.vocab_size, (1, T))
    vec = [torch.randn_like(p) for p in params]
    base = _current_rss_gb()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        g = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(g, params, grad_outputs=vec)
        times.append(time.perf_counter() - t0)
        del loss, g, hv  # frees the second-order graph before the next repeat
    peak = _rss_gb()
    return dict(impl=impl, T=T, layers=layers, checkpoint=checkpoint, base_gb=round(base, 3),
                peak_gb=round(peak, 3), extra_mb_per_token=round((peak - base) * 1024 / T, 3),
                time_s=round(sorted(times)[len(times) // 2], 2), times=[round(t, 2) for t in times],
                threads=torch.get_num_threads())


def run_attention_only(impl, T, repeat, heads=16, head_dim=64, layers=4):
    """Just `layers` stacked attention calls (no projections, MLP or LM head): the T-dependence in isolation."""
    import torch

    from mamlen.core.attention_ops import tiled_attention

    def eager(q, k, v):
        s = (q @ k.transpose(-1, -2)) * head_dim ** -0.5
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ v

    fn = eager if impl == "eager" else (lambda q, k, v: tiled_attention(q, k, v, is_causal=True))
    torch.manual_seed(0)
    xs = [torch.randn(1, heads, T, head_dim, requires_grad=True) for _ in range(3)]
    w = torch.randn(1, heads, T, head_dim)
    vec = [torch.randn_like(x) for x in xs]
    base = _current_rss_gb()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        q, k, v = xs
        for _ in range(layers):  # q of the next layer = output of this one, k and v shared
            q = fn(q, k, v)
        g = torch.autograd.grad((q * w).sum(), xs, create_graph=True)
        hv = torch.autograd.grad(g, xs, grad_outputs=vec)
        times.append(time.perf_counter() - t0)
        del q, g, hv
    peak = _rss_gb()
    return dict(impl=impl, T=T, layers=layers, checkpoint=False, base_gb=round(base, 3), peak_gb=round(peak, 3),
                extra_mb_per_token=round((peak - base) * 1024 / T, 3), time_s=round(sorted(times)[len(times) // 2], 2),
                times=[round(t, 2) for t in times], threads=torch.get_num_threads())


def run_dense_ab(Ts, rounds=15, heads=9, kv_heads=3, head_dim=64):
    """Per-call time of one attention's exact HVP (forward, create_graph backward, double backward) at small T:
    eager math, the tiled passes (dense=False) and the default choice, which takes the dense path up to
    DENSE_MAX_SCORES. SmolLM2's attention shape (9 query / 3 key-value heads, 64 dims); interleaved rounds,
    median ms; one thread."""
    import torch

    from mamlen.core.attention_ops import DENSE_MAX_SCORES, tiled_attention

    torch.set_num_threads(1)

    def eager(q, k, v):
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        s = (q @ k.transpose(-1, -2)) * head_dim ** -0.5
        T = s.shape[-1]
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return torch.softmax(s, -1) @ v

    fns = {"eager": eager,
           "tiled (dense=False)": lambda q, k, v: tiled_attention(q, k, v, is_causal=True, dense=False),
           "default": lambda q, k, v: tiled_attention(q, k, v, is_causal=True)}
    rows = []
    for T in Ts:
        torch.manual_seed(0)
        xs = [torch.randn(1, h, T, head_dim, requires_grad=True) for h in (heads, kv_heads, kv_heads)]
        w = torch.randn(1, heads, T, head_dim)
        vec = [torch.randn_like(x) for x in xs]
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                g = torch.autograd.grad((fn(*xs) * w).sum(), xs, create_graph=True)
                torch.autograd.grad(g, xs, grad_outputs=vec)
                times[name].append(time.perf_counter() - t0)
        med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in times.items()}
        rows.append((T, T * T <= DENSE_MAX_SCORES, med))
    md = [f"Exact HVP of one causal attention call, {heads} query / {kv_heads} key-value heads x {head_dim}, batch 1, "
          f"fp32, 1 thread, median of {rounds} interleaved rounds (ms); default = dense path when T² <= "
          f"{DENSE_MAX_SCORES}:", "",
          "| T | default path | eager | tiled (dense=False) | default | tiled ÷ default |", "|---:|---|---:|---:|---:|---:|"]
    for T, dense, med in rows:
        md.append(f"| {T} | {'dense' if dense else 'tiled'} | {med['eager']:.2f} | {med['tiled (dense=False)']:.2f} | "
                  f"{med['default']:.2f} | {med['tiled (dense=False)'] / med['default']:.2f}x |")
    return "\n".join(md) + "\n"


def _sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except OSError:
        return "?"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--impl", nargs="+", default=["eager", "mamlen"])
    ap.add_argument("--T", nargs="+", type=int, default=[256, 512, 1024])
    ap.add_argument("--layers", nargs="+", type=int, default=[4])
    ap.add_argument("--checkpoint", action="store_true", help="non-reentrant activation checkpointing per block")
    ap.add_argument("--repeat", type=int, default=1, help="timed passes per configuration (median reported)")
    ap.add_argument("--one", action="store_true", help="run the first configuration in this process, print JSON")
    ap.add_argument("--attention-only", action="store_true",
                    help="16 heads x 64 dims, `layers` chained causal attention calls, nothing else")
    ap.add_argument("--out", help="append markdown rows to this file")
    ap.add_argument("--render", help="re-render the markdown table from the JSON lines of an earlier run's log")
    ap.add_argument("--dense-ab", action="store_true",
                    help="small-T timing: eager vs tiled passes vs the default (dense below DENSE_MAX_SCORES)")
    args = ap.parse_args()
    if args.dense_ab:
        text = run_dense_ab(args.T)
        print(text)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text)
        return
    if args.one:
        if args.attention_only:
            res = run_attention_only(args.impl[0], args.T[0], args.repeat, layers=args.layers[0])
        else:
            res = run_one(args.impl[0], args.T[0], args.layers[0], args.checkpoint, args.repeat)
        print("RESULT " + json.dumps(res), flush=True)
        os._exit(0)  # skip interpreter teardown (a native extension has crashed there), the result is out
    import torch
    import transformers
    rows = []
    if args.render:
        with open(args.render) as f:
            rows = [json.loads(x) for x in f if x.startswith("{")]
    for layers in ([] if args.render else args.layers):
        for T in args.T:
            for impl in args.impl:
                cmd = [sys.executable, os.path.abspath(__file__), "--one", "--impl", impl, "--T", str(T),
                       "--layers", str(layers), "--repeat", str(args.repeat)] + (["--checkpoint"] if args.checkpoint else []) \
                    + (["--attention-only"] if args.attention_only else [])
                r = subprocess.run(cmd, capture_output=True, text=True)
                line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
                if not line:
                    res = dict(impl=impl, T=T, layers=layers, checkpoint=args.checkpoint, error=(r.stderr or "")[-300:])
                else:
                    res = json.loads(line[0][7:])
                rows.append(res)
                print(json.dumps(res), flush=True)
    head = (f"device: CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, shared), torch "
            f"{torch.__version__}, transformers {transformers.__version__}, git {_sha()}; batch 1, fp32, "
            + ("attention only: 16 heads x 64, chained causal attention calls" if args.attention_only else
               f"GPT-2 Medium width (1024/16 heads), checkpoint={args.checkpoint}"))
    md = ["", head, "", "| layers | T | attention | peak RSS GB | over base GB | MB/token over base "
          "| marginal MB/token (vs previous T) | time s |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    prev = {}
    for r in rows:
        if "error" in r:
            md.append(f"| {r['layers']} | {r['T']} | {r['impl']} | failed | | | | |")
            continue
        key = (r["impl"], r["layers"])
        marg = ""
        if key in prev:  # slope of peak memory in T: constant if memory is linear in T
            pT, pPeak = prev[key]
            marg = f"{(r['peak_gb'] - pPeak) * 1024 / (r['T'] - pT):.2f}"
        prev[key] = (r["T"], r["peak_gb"])
        md.append(f"| {r['layers']} | {r['T']} | {r['impl']} | {r['peak_gb']:.2f} | {r['peak_gb'] - r['base_gb']:.2f}"
                  f" | {r['extra_mb_per_token']:.2f} | {marg} | {r['time_s']:.1f} |")
    text = "\n".join(md) + "\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
