"""Where a meta-step's memory goes: RSS before, peak and after each stage (gradient, HVP), in parameter buffers.

    .venv/bin/python bench/memory_stages.py --layers 8 --seq 64 --hvp exact
    .venv/bin/python bench/memory_stages.py --layers 4 --seq 1024 --hvp exact --blocks   # inside the exact HVP

Builds a random GPT-2 (width 1024, 16 heads, small vocabulary so that parameter-sized buffers dominate), runs
one warm-up meta-step and then one measured step. The gradients and the HVP the engine calls are wrapped to reset
the kernel's high-water mark (/proc/self/clear_refs) before each call, so each row is that call's own peak.
With --blocks (exact), RSS is also sampled as the HVP's second backward enters and leaves each block
(core/block_recompute.py): flat rows mean one block's second-order graph at a time.
Units: one flat float32 buffer of all parameters. Linux only.
"""
import argparse
import time

import torch
import transformers

from mamlen.core import MetaConfig, MetaEngine, Task, block_recompute, hvp


def _status():
    with open("/proc/self/status") as f:
        d = dict(line.split(":", 1) for line in f)
    return int(d["VmRSS"].split()[0]) * 1024, int(d["VmHWM"].split()[0]) * 1024


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--hvp", default="exact", choices=["exact", "mixed", "fd", "first_order"])
    ap.add_argument("--moments-bits", type=int, default=32, choices=[32, 8])
    ap.add_argument("--blocks", action="store_true", help="exact: RSS entering/leaving each block's second backward")
    ap.add_argument("--checkpointing", action="store_true", help="MetaConfig.checkpointing (every pass)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-warmup", action="store_true",
                    help="measure the first step (no warm-up step): for shapes where one step takes many minutes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=args.width, n_head=args.width // 64, n_layer=args.layers,
                                  vocab_size=args.vocab, n_positions=max(128, args.seq), bos_token_id=0,
                                  eos_token_id=0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    engine = MetaEngine(model, MetaConfig(hvp=args.hvp, moments_bits=args.moments_bits,
                                          checkpointing=args.checkpointing))
    ids = torch.randint(0, args.vocab, (1, args.seq))
    labels = ids.clone()
    labels[:, : args.seq // 2] = -100
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    tasks = [Task(support=[batch], query=dict(batch))]
    unit = engine.arena.numel * 4
    print(f"GPT-2 width {args.width}, {args.layers} layers, vocab {args.vocab}, T = {args.seq}, hvp={args.hvp}"
          f"{', checkpointing' if args.checkpointing else ''}: {engine.arena.numel / 1e6:.1f} M parameters; unit = "
          f"{unit / 2**30:.3f} GiB (one float32 parameter buffer); RSS after building {_status()[0] / 2**30:.2f} GiB",
          flush=True)
    if not args.no_warmup:
        engine.step(tasks)  # warm-up: allocator and lazy initialisation
    rows, block_rows = [], []

    def measured(orig, name):
        def wrapped(*a, **k):
            before, _ = _status()
            _reset_peak()
            c0 = time.process_time()
            out = orig(*a, **k)
            after, peak = _status()
            rows.append((name, before / unit, peak / unit, after / unit))
            # as it happens (a long run may be stopped): GiB and CPU seconds too
            print(f"  {name}: RSS {before / 2**30:.2f} -> peak {peak / 2**30:.2f} -> {after / 2**30:.2f} GiB, "
                  f"{time.process_time() - c0:.0f} CPU s", flush=True)
            return out
        return wrapped

    hvp.gradient = measured(hvp.gradient, "gradient")
    hvp.MODES[args.hvp] = measured(hvp.MODES[args.hvp], f"hvp {args.hvp}")
    if args.blocks:
        second = block_recompute._BlockBackward.backward

        def sampled(ctx, *grads):
            before, _ = _status()
            out = second(ctx, *grads)
            block_rows.append((before / unit, _status()[0] / unit))
            return out
        block_recompute._BlockBackward.backward = staticmethod(sampled)
    c0 = time.process_time()
    engine.step(tasks)
    print(f"step: {time.process_time() - c0:.0f} CPU s")
    print("| call (in order) | RSS before | peak during | RSS after |\n|---|---:|---:|---:|")
    for name, b, p, a in rows:
        print(f"| {name} | {b:.2f} | {p:.2f} | {a:.2f} |")
    if block_rows:
        print("\n| second backward of the HVP: block call | RSS entering | RSS leaving |\n|---|---:|---:|")
        for i, (b, a) in enumerate(block_rows, start=1):
            print(f"| {i} | {b:.2f} | {a:.2f} |")


if __name__ == "__main__":
    main()
