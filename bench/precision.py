"""Accuracy of the meta-gradient per HVP mode x precision, against the same meta-gradient in float64.

    OMP_NUM_THREADS=1 .venv/bin/python bench/precision.py [--inner-lr 1e-4 1e-2] [--seeds 3] > bench/results/precision.md

A random GPT-2 (width 64, 2 layers, vocabulary 512, init std 0.02), 2 tasks of K = 2 inner steps, batches of
2 x 32 tokens, non-zero shared moments, dropout off. Precisions:
  float32        float32 parameters, float32 compute
  bf16-autocast  float32 parameters, compute under torch.autocast(bfloat16)
  bf16-params    bfloat16 parameters (float32 moments and master copy), compute under autocast(bfloat16)
The reference is the engine's exact mode in float64 at the *same* weights (for bf16-params: the bf16-rounded
ones), so weight rounding is not counted as an error. Reported per cell, median and max over seeds:
  err_G = |G - G64| / |G64|   the whole meta-gradient
  err_H = |G - G64| / |H64|   the same error in units of the Hessian term H64 = G64 - G64(first_order): > 1 means
                              the mode's error exceeds the second-order term it is there to add.
A combination the engine refuses prints the refusal instead of numbers.
"""
import argparse
import copy
import statistics
import subprocess

import torch
import transformers

from mamlen.core import MetaConfig, MetaEngine, Task

MODES = ("exact", "mixed", "fd", "first_order")
PRECISIONS = ("float32", "bf16-autocast", "bf16-params")


def model_and_tasks(seed):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(n_embd=64, n_head=2, n_layer=2, vocab_size=512, n_positions=64,
                                  attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(torch.float64).eval()
    gen = torch.Generator().manual_seed(seed + 1000)

    def batch():
        ids = torch.randint(1, 512, (2, 32), generator=gen)
        labels = ids.clone()
        labels[:, :16] = -100
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    tasks = [Task(support=[batch(), batch()], query=batch()) for _ in range(2)]
    names = [n for n, p in model.named_parameters()]
    shapes = {n: p.shape for n, p in model.named_parameters()}
    state = {"step": 3,
             "exp_avg": {n: 1e-3 * torch.randn(shapes[n], generator=gen, dtype=torch.float64) for n in names},
             "exp_avg_sq": {n: 1e-6 * torch.rand(shapes[n], generator=gen, dtype=torch.float64) for n in names}}
    return model, tasks, state


def flat_gradient(model, state, tasks, **cfg):
    engine = MetaEngine(model, MetaConfig(**cfg))
    sd = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    engine.load_optimizer_state({"step": state["step"],
                                 "exp_avg": {n: t.to(sd) for n, t in state["exp_avg"].items()},
                                 "exp_avg_sq": {n: t.to(sd) for n, t in state["exp_avg_sq"].items()}})
    G = engine.meta_gradient(tasks)
    return torch.cat([g.reshape(-1).to(torch.float64) for g in G.values()])


def measure(seed, inner_lr):
    base, tasks, state = model_and_tasks(seed)
    hp = dict(inner_lr=inner_lr, inner_steps=2, eps=1e-8, fd_eps=1e-3)
    out = {}
    for prec in PRECISIONS:
        pdtype = torch.bfloat16 if prec == "bf16-params" else torch.float32
        model = copy.deepcopy(base).to(pdtype)
        ref_model = copy.deepcopy(model).to(torch.float64)  # the same (possibly rounded) weights
        G64 = flat_gradient(copy.deepcopy(ref_model), state, tasks, hvp="exact", **hp)
        H64 = G64 - flat_gradient(copy.deepcopy(ref_model), state, tasks, hvp="first_order", **hp)
        extra = {} if prec == "float32" else {"autocast_dtype": torch.bfloat16}
        if prec == "bf16-params":
            extra["master_weights"] = True
        for mode in MODES:
            try:
                G = flat_gradient(copy.deepcopy(model), state, tasks, hvp=mode, **hp, **extra)
            except ValueError as err:
                out[prec, mode] = str(err)
                continue
            d = float((G - G64).norm())
            out[prec, mode] = (d / float(G64.norm()), d / float(H64.norm()))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inner-lr", type=float, nargs="+", default=[1e-4, 1e-2])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print("# Meta-gradient accuracy per HVP mode x precision (against float64)\n")
    print(f"`OMP_NUM_THREADS=1 .venv/bin/python bench/precision.py --inner-lr {' '.join(map(str, args.inner_lr))} "
          f"--seeds {args.seeds}` at commit {commit}. Setup and definitions: the docstring of bench/precision.py. "
          f"Cells: err_G / err_H, median (max) over {args.seeds} seeds.\n")
    for lr in args.inner_lr:
        runs = [measure(seed, lr) for seed in range(args.seeds)]
        print(f"## inner_lr = {lr:g}\n")
        print("| precision | " + " | ".join(MODES) + " |\n|---|" + "---|" * len(MODES))
        for prec in PRECISIONS:
            cells = []
            for mode in MODES:
                vals = [r[prec, mode] for r in runs]
                if isinstance(vals[0], str):
                    cells.append("refused")
                    continue
                g = [v[0] for v in vals]
                h = [v[1] for v in vals]
                cells.append(f"{statistics.median(g):.1e} ({max(g):.1e}) / {statistics.median(h):.2g} ({max(h):.2g})")
            print(f"| {prec} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
