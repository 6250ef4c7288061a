"""Memory model of the meta-step's parameter-sized state per rank, and its check against measured RSS.

    python bench/memory_model.py                       # bytes/parameter per option; what fits on 24/80/141 GB
    python bench/memory_model.py --measure             # run the engine here (1 and 2 ranks), prediction vs RSS
    MALLOC_MMAP_THRESHOLD_=1048576 python bench/memory_model.py --measure-fsdp   # engine.fsdp on 1, 2, 4 ranks (fd)
                                                       # (fixed threshold: else glibc keeps freed FSDP buffers)

Bytes per parameter, N parameters, W ranks with shard_state (W = 1 without), fp32 state dtype:

    at rest (between steps)      weights P (4 fp32 | 2 bf16)
                                 + moments / W       (8 float32 m, v | 2·(1 + 4/256) = 2.03 for 8-bit codes)
                                 + master / W        (4 with master_weights, else 0)
    extra during a meta-step     + shared moments gathered in full when sharded (every inner step reads all of
                                   m, v): 8 - 8/W float32 (the own shard is a view of the gathered buffer),
                                   2.03 for 8-bit codes (the engine reads m_0, v_0 in 1M-element chunks,
                                   dequantised on the fly: no full-length float copy of 8-bit moments)
                                 + the task working set: G, φ, g, m_j, v_j, p̄, m̄/v̄, ḡ and the HVP's
                                   parameter-sized gradients — c_task bytes/param, measured (engine code as of
                                   this commit) — plus activations, which depend on B·T and not on N
    outer step                   touches 1/W of the state; sharded G is reduce-scattered (a padded copy of G,
                                 4 bytes, is made after the tasks' peak), parameters all-gathered

FSDP (engine.fsdp, core/fsdp_engine.py; fd or first_order) shards everything parameter-sized instead:

    at rest                      (p + p + m + master) / W: the parameters' shards (FSDP's storage), θ (the engine's
                                 copy of them, kept while φ is written into the parameters), moments, master copy
    extra during a meta-step     + c_fsdp / W: the fd task working set (K = 1: ḡ over g_1, p̄, one perturbed point,
                                   g₊, g₋, the sharded .grad being copied — 6 buffers, 24 B/param in float32)
                                 + what does not shrink with W: FSDP's all-gathered parameters and gradients of the
                                   root (embeddings, final norm) and of about two blocks, and the activations

Sharding therefore lowers what is held *between* steps (moments, master copy: ZeRO-1) and the outer step's work;
with shared moments it cannot lower the peak of the meta-gradient itself, because every task reads the full m, v.
8-bit moments lower both (8 → 2.03 bytes at rest and at the peak). `--measure` checks these predictions.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GB = 1e9
Q8 = 2 * (1 + 4 / 256)  # two 8-bit moments: codes + a float32 absmax per 256 values
C_TASK_DEFAULT = 26.0  # bytes/param of the K=1 exact task working set incl. G; overwritten by --measure's fit

MODELS = {  # (parameters, layers, width) — tied embeddings where the model ties them
    "GPT-2 Medium": 355e6, "GPT-2 Large": 774e6, "GPT-2 XL": 1.558e9,
    "Llama 1B (3.2-1B shape)": 1.236e9, "Llama 7B (2-7B shape)": 6.738e9,
}
DEVICES = (24, 80, 141)
OPTIONS = {  # name: (param bytes, moments bits, master, shard)
    "fp32": (4, 32, False, False),
    "fp32 + shard": (4, 32, False, True),
    "fp32 + 8-bit": (4, 8, False, False),
    "fp32 + 8-bit + shard": (4, 8, False, True),
    "bf16 + master + 8-bit": (2, 8, True, False),
    "bf16 + master + 8-bit + shard": (2, 8, True, True),
}
FSDP_OPTIONS = {"fp32 + fsdp": (4, 32, False, True), "bf16 + master + 8-bit + fsdp": (2, 8, True, True)}


def bytes_per_param(param_bytes, bits, master, shard, world, c_task=C_TASK_DEFAULT, param_dtype_scale=None):
    """{"rest": .., "step_state": .., "peak": ..} bytes per parameter on one rank (activations excluded)."""
    W = world if shard else 1
    mom = 8.0 if bits == 32 else Q8
    rest = param_bytes + mom / W + (4.0 if master else 0.0) / W
    gathered = (8.0 - 8.0 / W if bits == 32 else Q8) if W > 1 else 0.0
    # the task working set mixes param-dtype (φ, g) and float32 buffers; bf16 halves roughly a third of it
    task = c_task * (param_dtype_scale if param_dtype_scale is not None else (1.0 if param_bytes == 4 else 5 / 6))
    return {"rest": rest, "step_state": gathered, "peak": rest + gathered + task}


C_FSDP = 24.0  # bytes/param of the fd K=1 task working set under FSDP (6 float32 shard-sized buffers), / W


def fsdp_bytes_per_param(param_bytes, bits, master, world, c_fsdp=C_FSDP):
    """engine.fsdp: {"rest": .., "peak": ..} bytes per parameter on one rank, everything divided by W (the
    non-shrinking root/block/activation part excluded)."""
    mom = 8.0 if bits == 32 else Q8
    rest = (2 * param_bytes + mom + (4.0 if master else 0.0)) / world
    task = c_fsdp * (1.0 if param_bytes == 4 else 5 / 6) / world
    return {"rest": rest, "peak": rest + task}


def table(c_task=C_TASK_DEFAULT, worlds=(1, 8)) -> str:
    lines = [f"Bytes per parameter per rank (activations excluded; task working set c_task = {c_task:.1f} B/param "
             "for K = 1, exact HVP):", "",
             "| option | W | at rest | step peak |", "|---|---:|---:|---:|"]
    for name, (pb, bits, master, shard) in OPTIONS.items():
        for W in (worlds if shard else (1,)):
            b = bytes_per_param(pb, bits, master, shard, W, c_task)
            lines.append(f"| {name} | {W} | {b['rest']:.2f} | {b['peak']:.2f} |")
    for name, (pb, bits, master, _) in FSDP_OPTIONS.items():
        for W in worlds:
            b = fsdp_bytes_per_param(pb, bits, master, W)
            lines.append(f"| {name} (fd) | {W} | {b['rest']:.2f} | {b['peak']:.2f} |")
    lines += ["", "Step peak per rank in GB (parameter-sized state only; add activations) and whether it fits "
              f"{'/'.join(map(str, DEVICES))} GB devices (✓ fits, · does not):", "",
              "| model | " + " | ".join(f"{o}{' W=8' if OPTIONS[o][3] else ''}" for o in OPTIONS) + " | "
              + " | ".join(f"{o} W=8" for o in FSDP_OPTIONS) + " |",
              "|---|" + "---:|" * (len(OPTIONS) + len(FSDP_OPTIONS))]
    for model, n in MODELS.items():
        cells = []
        for name, (pb, bits, master, shard) in OPTIONS.items():
            gb = bytes_per_param(pb, bits, master, shard, 8, c_task)["peak"] * n / GB
            fits = "".join("✓" if gb <= d else "·" for d in DEVICES)
            cells.append(f"{gb:.1f} {fits}")
        for name, (pb, bits, master, _) in FSDP_OPTIONS.items():
            gb = fsdp_bytes_per_param(pb, bits, master, 8)["peak"] * n / GB
            cells.append(f"{gb:.1f} {''.join('✓' if gb <= d else '·' for d in DEVICES)}")
        lines.append(f"| {model} ({n / 1e9:.2f} B) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# --measure: one engine run per (config, world), RSS from /proc (peak reset before the measured step)
def _rss():
    status = Path("/proc/self/status").read_text()
    get = lambda k: int(next(x for x in status.splitlines() if x.startswith(k)).split()[1]) * 1024  # noqa: E731
    return get("VmRSS:"), get("VmHWM:")


def _worker(args):
    import torch
    import torch.distributed as dist
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from mamlen.core import MetaConfig, MetaEngine, Task

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64, vocab_size=args.vocab,
                     n_positions=args.seq, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(0, args.vocab, (1, args.seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    tasks = [Task(support=[batch()], query=batch()) for _ in range(world)]
    mine = tasks[rank::world]
    before = _rss()[0]
    engine = MetaEngine(model, MetaConfig(hvp="exact", inner_lr=1e-4, outer_lr=1e-4, moments_bits=args.bits,
                                          shard_state=args.shard))
    engine.step(mine)  # touches every state page (torch.zeros pages are not resident until written)
    rest = _rss()[0]
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the next peak is the meta-step's alone
    t0 = time.perf_counter()
    engine.step(mine)
    dt = time.perf_counter() - t0
    peak = _rss()[1]
    row = {"rank": rank, "world": world, "bits": args.bits, "shard": args.shard, "params": n,
           "rss_before_engine": before, "rest": rest, "peak": peak, "step_s": dt,
           "state_bytes": engine.opt_state.nbytes()}
    if world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
        dist.destroy_process_group()
    else:
        rows = [row]
    if rank == 0:
        print("ROWS " + json.dumps(rows))


def _fsdp_worker(args):
    """One rank of --measure-fsdp: FSDPMetaEngine (or, with --unsharded, MetaEngine in one process), hvp=fd,
    K = 1, one task of --rows rows (each rank takes rows/W of them)."""
    import torch
    import torch.distributed as dist
    from transformers.utils import logging as hf_logging

    from mamlen.core import FSDPMetaEngine, MetaConfig, MetaEngine, Task

    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if not args.unsharded:
        if world > 1:
            dist.init_process_group("gloo")
        else:
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    rank = int(os.environ.get("RANK", 0))
    torch.manual_seed(0)
    if args.arch == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM
        cfg = LlamaConfig(hidden_size=args.width, intermediate_size=args.ffn or 4 * args.width,
                          num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                          num_key_value_heads=max(1, args.width // 256), vocab_size=args.vocab,
                          max_position_embeddings=args.seq, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg).eval()
    else:
        from transformers import GPT2Config, GPT2LMHeadModel
        cfg = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.width // 64, vocab_size=args.vocab,
                         n_positions=args.seq, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
        model = GPT2LMHeadModel(cfg).eval()
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(0, args.vocab, (args.rows, args.seq), generator=gen)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    tasks = [Task(support=[batch()], query=batch())]  # every rank passes the whole task
    before = _rss()[0]
    mcfg = dict(hvp="fd", inner_lr=1e-4, outer_lr=1e-4, measure_adaptation=False)
    engine = MetaEngine(model, MetaConfig(**mcfg)) if args.unsharded else \
        FSDPMetaEngine(model, MetaConfig(**mcfg, fsdp=True))
    engine.step(tasks)  # touches every state page
    rest = _rss()[0]
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the next peak is the meta-step's alone
    t0 = time.perf_counter()
    m = engine.step(tasks)
    dt = time.perf_counter() - t0
    peak = _rss()[1]
    row = {"rank": rank, "world": world, "fsdp": not args.unsharded, "params": n, "rss_before_engine": before,
           "rest": rest, "peak": peak, "step_s": dt, "loss": m["loss"], "shard_params": engine.arena.numel}
    if not args.unsharded and world > 1:
        rows = [None] * world
        dist.all_gather_object(rows, row)
    else:
        rows = [row]
    if dist.is_initialized():
        dist.destroy_process_group()
    if rank == 0:
        print("ROWS " + json.dumps(rows))


def _shape_flags(args):
    return ["--arch", args.arch, "--width", str(args.width), "--layers", str(args.layers), "--vocab", str(args.vocab),
            "--seq", str(args.seq), "--rows", str(args.rows), "--ffn", str(args.ffn)]


def _launch_fsdp(args, world, unsharded=False):
    me = str(Path(__file__).resolve())
    flags = ["--worker-fsdp", *_shape_flags(args)] + (["--unsharded"] if unsharded else [])
    cmd = ([sys.executable, me] if world == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), me])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd + flags, capture_output=True, text=True, env=env, cwd="/tmp")
    line = next((x for x in p.stdout.splitlines() if x.startswith("ROWS ")), None)
    if line is None:
        raise SystemExit(f"{cmd + flags} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(line[5:])


def measure_fsdp(args) -> str:
    """Per-rank peak of an fd meta-step: MetaEngine in one process, then engine.fsdp on each of args.worlds."""
    results = {} if args.no_reference else {"unsharded": _launch_fsdp(args, 1, unsharded=True)}
    for W in args.worlds:
        results[f"fsdp W={W}"] = _launch_fsdp(args, W)
    n = next(iter(results.values()))[0]["params"]
    out = [f"{args.arch} width {args.width}, {args.layers} layers, vocab {args.vocab}, ffn {args.ffn or 4 * args.width}, "
           f"T = {args.seq}, one task of {args.rows} rows (split over the ranks): N = {n / 1e6:.1f} M parameters; "
           "hvp = fd, K = 1, float32, 1 thread per rank.", "",
           "| engine | W | rank | shard params | own bytes at peak, MB | B/param (of N) | model (p+θ+m+v+c_fsdp)/W, MB "
           "| excess MB (does not shrink with W) | step s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in results.items():
        for r in rows:
            W = r["world"]
            # "own": the peak minus the process without the model (the full model built before the engine is
            # counted in rss_before_engine; FSDP frees it when it moves the shards into its own storage)
            own = r["peak"] - (r["rss_before_engine"] - 4 * n)
            pred = n * (fsdp_bytes_per_param(4, 32, False, W)["peak"] if r["fsdp"] else float("nan"))
            out.append(f"| {'FSDPMetaEngine' if r['fsdp'] else 'MetaEngine'} | {W} | {r['rank']} | "
                       f"{r['shard_params'] / 1e6:.1f} M | {own / 1e6:.0f} | {own / n:.1f} | "
                       f"{pred / 1e6:.0f} | {(own - pred) / 1e6:.0f} | {r['step_s']:.1f} |")
    out += ["", "own bytes = VmHWM over the second meta-step − (RSS before building the engine − 4·N): the process's "
            "Python/torch/transformers baseline taken out, the weights counted once. Raw rows:", "", "```",
            json.dumps(results), "```"]
    return "\n".join(out)


def _launch(args, world, bits, shard):
    me = str(Path(__file__).resolve())
    flags = ["--worker", "--bits", str(bits), "--width", str(args.width), "--layers", str(args.layers),
             "--vocab", str(args.vocab), "--seq", str(args.seq)] + (["--shard"] if shard else [])
    cmd = ([sys.executable, me] if world == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world), me])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(cmd + flags, capture_output=True, text=True, env=env, cwd="/tmp")
    line = next((x for x in p.stdout.splitlines() if x.startswith("ROWS ")), None)
    if line is None:
        raise SystemExit(f"{cmd + flags} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(line[5:])


def measure(args) -> str:
    runs = [(1, 32, False), (1, 8, False), (2, 32, False), (2, 32, True), (2, 8, True)]
    results = {r: _launch(args, *r) for r in runs}
    base = results[(1, 32, False)][0]
    n = base["params"]
    # calibrate the task working set (incl. G, activations) on the plain one-process run
    c_task = (base["peak"] - base["rss_before_engine"] - n * bytes_per_param(4, 32, False, False, 1, 0)["peak"]) / n
    out = [f"GPT-2 width {args.width}, {args.layers} layers, vocab {args.vocab}, T = {args.seq}: N = {n / 1e6:.1f} M "
           f"parameters; one task per rank, K = 1, exact HVP, float32, 1 thread per rank.",
           f"Calibrated on the plain one-process run: task working set + activations = {c_task:.1f} B/param "
           f"({c_task * n / 1e6:.0f} MB).", "",
           "| W | moments | shard | rank | state at rest MB (pred / meas.) | step peak MB (pred / meas.) | err | step s |",
           "|---:|---|---|---:|---:|---:|---:|---:|"]
    for (W, bits, shard), rows in results.items():
        for r in rows:
            b = bytes_per_param(4, bits, False, shard, W, 0)  # state only; the task part is c_task
            pred_rest = (b["rest"] - 4) * n
            meas_rest = r["rest"] - r["rss_before_engine"]
            pred_peak = r["rss_before_engine"] + n * (b["peak"] + c_task)
            out.append(f"| {W} | {bits}-bit | {'yes' if shard else 'no'} | {r['rank']} | "
                       f"{pred_rest / 1e6:.0f} / {meas_rest / 1e6:.0f} | {pred_peak / 1e6:.0f} / {r['peak'] / 1e6:.0f} | "
                       f"{(r['peak'] - pred_peak) / pred_peak:+.1%} | {r['step_s']:.1f} |")
    out += ["", "state at rest = RSS after a step - RSS before building the engine (the weights move into the "
            "arena, so this is the optimizer state plus allocator slack); step peak = VmHWM over the second step "
            "(reset through /proc/self/clear_refs). Raw rows:", "", "```", json.dumps(results and
            {f"W{k[0]}-{k[1]}bit-{'shard' if k[2] else 'full'}": v for k, v in results.items()}, indent=None), "```"]
    return "\n".join(out), c_task


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--measure", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-fsdp", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--unsharded", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--measure-fsdp", action="store_true", help="engine.fsdp (fd) per-rank peaks at --worlds")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--no-reference", action="store_true", help="--measure-fsdp: skip the one-process MetaEngine run")
    p.add_argument("--arch", choices=("gpt2", "llama"), default="gpt2")
    p.add_argument("--rows", type=int, default=4, help="--measure-fsdp: rows of the task's batches")
    p.add_argument("--ffn", type=int, default=0, help="llama intermediate size (0: 4 x width)")
    p.add_argument("--bits", type=int, default=32)
    p.add_argument("--shard", action="store_true")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--seq", type=int, default=64)
    args = p.parse_args()
    if args.worker:
        return _worker(args)
    if args.worker_fsdp:
        return _fsdp_worker(args)
    if args.measure_fsdp:
        print(measure_fsdp(args), "\n")
        return
    c_task = C_TASK_DEFAULT
    if args.measure:
        text, c_task = measure(args)
        print(text, "\n")
    print(table(c_task))


if __name__ == "__main__":
    main()
