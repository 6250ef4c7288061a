"""Fused kernels vs unfused torch on 2^24 float32 elements (CPU: the C++ variant).

    .venv/bin/python bench/bench_kernels.py [--n 16777216] [--reps 15]    # markdown table for results/kernels.md

The same cases under pytest-benchmark (saved runs, regression checks, every backend and the torch.compile'd
reference): bench/test_kernels.py, which imports Data, BYTES and HP from here.

Every case reports bytes moved under the streaming model (each buffer read once, each output written
once; page-zeroing of fresh outputs not counted) and the GB/s that implies, next to a tensor copy
(dst.copy_(src): 8 B/element) timed in the same run, the practical bandwidth floor. Ratios are against
the unfused plain-torch reference (kernels/reference.py) or torch.optim.AdamW(fused=True), timed in the
same run, interleaved round by round so that load from other processes hits both alike.
"""
import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from mamlen import kernels

N = 1 << 24
HP = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01)
H100_BYTES_PER_S = 3.35e12
GPT2_MEDIUM_PARAMS = 355e6

# bytes per element (fp32) under the streaming model: reads + writes
BYTES = {
    "copy": 4 + 4,
    "adamw_step_": 16 + 12,
    "inner_adamw_forward": 16 + 12,
    "inner_adamw_adjoint": 24 + 16,
    "forward+adjoint": 28 + 40,
    "inner_sgd_forward": 8 + 4,
    "inner_sgd_adjoint": 4 + 8,
    "sgd_step_": 16 + 12,
    "fd_perturb": 8 + 8,
    "fd_combine_": 12 + 4,
}


class Data:
    """Flat fp32 buffers of one size: parameters, gradient, moments, adjoints."""

    def __init__(self, n):
        gen = torch.Generator().manual_seed(0)
        self.n = n
        self.p, self.g, self.m, self.p_bar, self.m_bar, self.v_bar = (torch.randn(n, generator=gen)
                                                                      for _ in range(6))
        self.v = torch.rand(n, generator=gen)
        self.m_new, self.v_new = self.m.clone(), self.v.clone() + 0.1
        self.dst = torch.empty(n)
        self.step = 1


def cases(d):
    """{op: {variant: callable}}; the first variant of each op is the baseline of its ratio."""
    hp = dict(HP, step=3)

    def fwd(backend):
        return lambda: kernels.inner_adamw_forward(d.p, d.g, d.m, d.v, **hp, backend=backend)

    def adj(backend):
        return lambda: kernels.inner_adamw_adjoint(d.p_bar, d.m_bar, d.v_bar, d.g, d.m_new, d.v_new, **hp,
                                                   backend=backend)

    def fwd_adj(backend):
        def run():
            _, m2, v2 = kernels.inner_adamw_forward(d.p, d.g, d.m, d.v, **hp, backend=backend)
            return kernels.inner_adamw_adjoint(d.p_bar, d.m_bar, d.v_bar, d.g, m2, v2, **hp, backend=backend)
        return run

    # the engine's form: forward allocates φ_j, m_j, v_j (kept on the tape); the adjoint runs in place over
    # the dead buffers (p̄ in place, ḡ over g_j, m̄/v̄ over m_j/v_j). "out=": every output into reused buffers.
    e_pb, e_g = d.p_bar.clone(), d.g.clone()
    o_p2, o_m2, o_v2, o_pb, o_g = (t.clone() for t in (d.p, d.m, d.v, d.p_bar, d.g))

    def fwd_adj_engine():
        _, m2, v2 = kernels.inner_adamw_forward(d.p, d.g, d.m, d.v, **hp)
        kernels.inner_adamw_adjoint(e_pb, d.m_bar, d.v_bar, e_g, m2, v2, **hp, out=(e_g, e_pb, m2, v2))

    def fwd_adj_out():
        kernels.inner_adamw_forward(d.p, d.g, d.m, d.v, **hp, out=(o_p2, o_m2, o_v2))
        kernels.inner_adamw_adjoint(o_pb, d.m_bar, d.v_bar, o_g, o_m2, o_v2, **hp, out=(o_g, o_pb, o_m2, o_v2))

    # the outer step mutates: each variant gets its own copies so that all see comparable values
    p1, m1, v1, p2, m2, v2 = d.p.clone(), d.m.clone(), d.v.clone(), d.p.clone(), d.m.clone(), d.v.clone()
    tp = d.p.clone().requires_grad_()
    tp.grad = d.g.clone()
    opt = torch.optim.AdamW([tp], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                            weight_decay=HP["weight_decay"], fused=True)
    counter = {"cpp": 0, "reference": 0}

    def step(backend, p, m, v):
        def run():
            counter[backend] += 1
            kernels.adamw_step_(p, d.g, m, v, **HP, step=counter[backend], backend=backend)
        return run

    acc1, acc2 = d.p_bar.clone(), d.p_bar.clone()
    s1, s2 = [t.clone() for t in (d.p, d.m, d.v)], [t.clone() for t in (d.p, d.m, d.v)]
    sgd = dict(lr=1e-3, weight_decay=0.01)
    return {
        "copy": {"torch": lambda: d.dst.copy_(d.p)},
        "adamw_step_": {"torch.optim.AdamW(fused=True)": opt.step, "cpp": step("cpp", p1, m1, v1),
                        "reference": step("reference", p2, m2, v2)},
        "inner_adamw_forward": {"reference": fwd("reference"), "cpp": fwd("cpp")},
        "inner_adamw_adjoint": {"reference": adj("reference"), "cpp": adj("cpp")},
        "forward+adjoint": {"reference": fwd_adj("reference"), "cpp": fwd_adj("cpp"),
                            "cpp, adjoint in place (engine)": fwd_adj_engine, "cpp, out= (no allocation)": fwd_adj_out},
        "inner_sgd_forward": {b: (lambda b=b: kernels.inner_sgd_forward(d.p, d.g, **sgd, backend=b))
                              for b in ("reference", "cpp")},
        "inner_sgd_adjoint": {b: (lambda b=b: kernels.inner_sgd_adjoint(d.p_bar, **sgd, backend=b))
                              for b in ("reference", "cpp")},
        "sgd_step_": {b: (lambda b=b, s=s: kernels.sgd_step_(s[0], d.g, s[1], s[2], **sgd, beta1=0.9,
                                                             beta2=0.999, backend=b))
                      for b, s in (("reference", s1), ("cpp", s2))},
        "fd_perturb": {b: (lambda b=b: kernels.fd_perturb(d.p, d.m, 1e-3, backend=b)) for b in ("reference", "cpp")},
        "fd_combine_": {b: (lambda b=b, a=a: kernels.fd_combine_(a, d.g, d.m, 0.5, backend=b))
                        for b, a in (("reference", acc1), ("cpp", acc2))},
    }


# ---- script mode ---------------------------------------------------------------------------------------

def timings(fns, reps, warmup=1):
    """Median-ready samples (s) of each callable, interleaved round by round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t0)
    return out


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def git_sha():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=N, help="elements per buffer (default 2^24)")
    ap.add_argument("--reps", type=int, default=15, help="timed rounds of the fast variants")
    ap.add_argument("--ref-reps", type=int, default=5, help="timed rounds of the slow unfused references")
    ap.add_argument("--only", nargs="*", help="ops to time (default: all)")
    args = ap.parse_args(argv)
    d = Data(args.n)
    all_cases = cases(d)
    variant = torch.ops.mamlen_info.cpu_variant() if kernels.CPP_AVAILABLE else "not built"
    print(f"device: {cpu_name()}, {torch.get_num_threads()} threads, C++ SIMD variant {variant}; "
          f"torch {torch.__version__}; git {git_sha()}; n = {args.n} float32; "
          f"load average {os.getloadavg()[0]:.1f}\n")
    copy_t = timings({"copy": all_cases["copy"]["torch"]}, reps=args.reps)["copy"]  # the copy row alone
    copy_gbps = BYTES["copy"] * args.n / statistics.median(copy_t) / 1e9
    print("| op | variant | median ms | p20 ms | p80 ms | GB/s | of copy BW (same rounds) | speed vs first row |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print(f"| copy | dst.copy_(src) | {statistics.median(copy_t) * 1e3:.2f} | {pct(copy_t, .2) * 1e3:.2f} | "
          f"{pct(copy_t, .8) * 1e3:.2f} | {copy_gbps:.1f} | 100% | |")
    for op, fns in all_cases.items():
        if op == "copy":
            continue
        if args.only and op not in args.only:
            continue
        fns = {k: f for k, f in fns.items() if not k.startswith("cpp") or kernels.CPP_AVAILABLE}
        slow = op in ("inner_adamw_forward", "inner_adamw_adjoint", "forward+adjoint")
        # the copy runs in the same rounds as the group, so its bandwidth sees the same load
        ts = timings({**fns, "copy": all_cases["copy"]["torch"]}, reps=args.ref_reps if slow else args.reps)
        group_copy_gbps = BYTES["copy"] * args.n / statistics.median(ts.pop("copy")) / 1e9
        base = statistics.median(next(iter(ts.values())))
        for k, t in ts.items():
            med = statistics.median(t)
            gbps = BYTES[op] * args.n / med / 1e9
            print(f"| {op} | {k} | {med * 1e3:.2f} | {pct(t, .2) * 1e3:.2f} | {pct(t, .8) * 1e3:.2f} | "
                  f"{gbps:.1f} | {gbps / group_copy_gbps:.0%} | {base / med:.2f}x |")
    print("\nGPU model (unmeasured): bytes moved / 3.35 TB/s (H100 SXM HBM3), fp32 state")
    print("| op | B/element | 2^24 elements | GPT-2 Medium (355M) |")
    print("|---|---:|---:|---:|")
    for op, b in BYTES.items():
        if op == "copy":
            continue
        print(f"| {op} | {b} | {b * args.n / H100_BYTES_PER_S * 1e3:.3f} ms | "
              f"{b * GPT2_MEDIUM_PARAMS / H100_BYTES_PER_S * 1e3:.2f} ms |")


if __name__ == "__main__":
    sys.exit(main())
