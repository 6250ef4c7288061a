"""In-context evaluation (MetaICL's protocol) of a causal LM on MetaICL-format tasks.

For each task and seed: the k demonstrations of `{task}_{k}_{seed}_train.jsonl` are put before every
query of `{task}_{k}_{seed}_test.jsonl`; each option is scored by the mean token loss of its target
(instances.py: direct scores the option, channel scores the input given the option); the lowest loss wins
(ties: first option). Score: macro-F1 for classification-like tasks (classification, NLI, paraphrase),
accuracy otherwise. Reported per task: every seed, the mean and the worst; "macro": the mean over tasks of
those. k = 0 is zero-shot. adapt_steps > 0 is the "adaptation" protocol: before scoring a (task, seed), a
few full-batch AdamW steps on the k demonstrations (each one the target, the others its context), then
in-context evaluation, then the weights are restored.

The demonstrations are the same for every query of a seed, so their keys/values are computed once and
reused (exactly the same scores as the full sequences; see tests/train/test_evaluate.py).

    python train/evaluate.py --model smollm2 --setting class_to_class --k 16 --output results.json
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from mamlen.train import data, instances, metrics

DEFAULT_SEEDS = (100, 13, 21, 42, 87)


# --- scoring ---------------------------------------------------------------------------------------
def _target_nll(logits: torch.Tensor, ids: torch.Tensor, starts: Sequence[int], ends: Sequence[int]) -> list[float]:
    """Mean NLL of ids[b, s:e] under logits[b, s-1:e-1] (the logit at t predicts token t+1)."""
    logp = F.log_softmax(logits.float(), dim=-1)  # (B, S, V)
    out = []
    for b, (s, e) in enumerate(zip(starts, ends)):
        s = max(s, 1)  # a token at position 0 has no prediction
        tok = ids[b, s:e]
        out.append(-logp[b, s - 1:e - 1].gather(-1, tok[:, None]).mean().item())
    return out


@torch.no_grad()
def score_sequences(model, items: Sequence[tuple[list[int], list[int], int]], *, pad_token_id: int,
                    max_len: int = 1024, batch_size: int = 8) -> list[float]:
    """Mean target loss of each item (context, suffix, target_start): the sequence context + suffix,
    left-truncated to max_len, whose target is suffix[target_start:].

    Items that share the same (truncated) context reuse its key/value cache; suffixes are right-padded,
    which leaves the earlier positions untouched (causal attention).
    """
    groups: dict[tuple, list[int]] = {}
    prepared = []
    for i, (ctx, suffix, tstart) in enumerate(items):
        if tstart >= len(suffix):
            raise ValueError(f"item {i}: empty target")
        cut = max(0, len(ctx) + len(suffix) - max_len)
        if cut <= len(ctx):
            ctx = ctx[cut:]
        else:  # the query example alone exceeds max_len: no context left, cut into the suffix
            drop = cut - len(ctx)
            ctx, suffix, tstart = [], suffix[drop:], tstart - drop
            if len(suffix) < 2:
                raise ValueError(f"item {i}: max_len={max_len} leaves no target token to score")
        prepared.append((suffix, tstart))
        groups.setdefault(tuple(ctx), []).append(i)

    losses = [math.nan] * len(items)
    device = next(model.parameters()).device
    for ctx, members in groups.items():
        cache = None
        if ctx:
            ctx_ids = torch.tensor([ctx], device=device)
            try:  # only the cache is needed: skip the (1, P, vocab) logits where the model allows
                out = model(input_ids=ctx_ids, use_cache=True, logits_to_keep=1)
            except TypeError:
                out = model(input_ids=ctx_ids, use_cache=True)
            cache = out.past_key_values
        members = sorted(members, key=lambda i: len(prepared[i][0]))  # similar lengths share a batch
        for lo in range(0, len(members), batch_size):
            chunk = members[lo:lo + batch_size]
            B, S = len(chunk), max(len(prepared[i][0]) for i in chunk)
            ids = torch.full((B, S), pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros((B, S), dtype=torch.long, device=device)
            for b, i in enumerate(chunk):
                suf = prepared[i][0]
                ids[b, :len(suf)] = torch.tensor(suf)
                mask[b, :len(suf)] = 1
            kwargs = {}
            if cache is not None:
                past = copy.deepcopy(cache)
                past.batch_repeat_interleave(B)
                kwargs = {"past_key_values": past, "use_cache": True}
                mask = torch.cat([torch.ones((B, len(ctx)), dtype=torch.long, device=device), mask], dim=1)
            logits = model(input_ids=ids, attention_mask=mask, **kwargs).logits  # (B, S, V)
            starts = [prepared[i][1] for i in chunk]
            ends = [len(prepared[i][0]) for i in chunk]
            if cache is None:
                starts = [max(s, 1) for s in starts]
            for i, loss in zip(chunk, _target_nll(logits, ids, starts, ends)):
                losses[i] = loss
    return losses


def score_options(model, tokenizer, demos: Sequence[dict], queries: Sequence[dict], *, method: str = "direct",
                  max_example_len: int = 256, max_len: int = 1024, batch_size: int = 8) -> list[list[float]]:
    """losses[q][o]: mean target loss of option o of query q, with `demos` in context."""
    ctx = instances.encode_context(tokenizer, demos, method=method, max_example_len=max_example_len)
    items, shape = [], []
    for q in queries:
        if not q["options"]:
            raise data.DataError(f"task {q['task']!r}: query {q['input'][:60]!r} has no options; "
                                 "evaluation scores options (generation tasks are for training only)")
        for opt in q["options"]:
            cond, tgt = instances.encode_query(tokenizer, q, method=method, max_example_len=max_example_len,
                                               target=opt)
            items.append((ctx, cond + tgt, len(cond)))
        shape.append(len(q["options"]))
    flat = score_sequences(model, items, pad_token_id=tokenizer.pad_token_id, max_len=max_len,
                           batch_size=batch_size)
    out, pos = [], 0
    for n in shape:
        out.append(flat[pos:pos + n])
        pos += n
    return out


# --- adaptation ------------------------------------------------------------------------------------
def adapt(model, tokenizer, demos: Sequence[dict], *, steps: int, lr: float, method: str = "direct",
          max_example_len: int = 256, max_len: int = 1024, batch_size: int = 8) -> None:
    """`steps` full-batch AdamW steps (weight decay 0, dropout off) on the demonstrations, in place.
    Each demonstration is a target with the other k-1 as its context, the same format as meta-training."""
    insts = [instances.build_instance(tokenizer, list(demos[:i]) + list(demos[i + 1:]), d, method=method,
                                      max_example_len=max_example_len, max_len=max_len)
             for i, d in enumerate(demos)]
    n_tok = sum(sum(t != instances.IGNORE_INDEX for t in inst["labels"]) for inst in insts)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    was_training = model.training
    model.eval()  # dropout off: the adaptation protocol is deterministic
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        for lo in range(0, len(insts), batch_size):
            batch = instances.collate(insts[lo:lo + batch_size], tokenizer.pad_token_id)
            batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != instances.IGNORE_INDEX).sum())
            # token-weighted so chunking does not change the full-batch gradient
            (model(**batch).loss * (n / max(n_tok, 1))).backward()
        opt.step()
    model.train(was_training)


# --- the protocol ----------------------------------------------------------------------------------
def _find_file(data_dir, task: str, split: str, k: int, seed: int) -> Path | None:
    """{task}_{k}_{seed}_{split}.jsonl, else the file of that seed and split with the smallest k' >= k
    (training pools, k' = 16384, excluded): MetaICL ships k = 16 files, and k < 16 uses their first k."""
    exact = data.task_file(data_dir, task, split, k, seed)
    if exact.is_file():
        return exact
    found = []
    for p in (Path(data_dir) / task).glob(f"{task}_*_{seed}_{split}.jsonl"):
        m = re.fullmatch(re.escape(task) + rf"_(\d+)_{seed}_{split}\.jsonl", p.name)
        if m and k <= int(m.group(1)) != data.TRAIN_POOL_K:
            found.append((int(m.group(1)), p))
    return min(found)[1] if found else None


def _task_files(data_dir, task: str, k: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(demos, test queries) of one seed; k = 0: no demonstrations."""
    test_path = _find_file(data_dir, task, "test", k, seed) or _find_file(data_dir, task, "test", 0, seed)
    if test_path is None:
        raise data.DataError(f"{data.task_file(data_dir, task, 'test', k, seed)}: no such task file "
                             f"(nor any {task}_*_{seed}_test.jsonl)")
    test = data.read_jsonl(test_path, task)
    if k == 0:
        return [], test
    demo_path = _find_file(data_dir, task, "train", k, seed)
    if demo_path is None:
        raise data.DataError(f"{data.task_file(data_dir, task, 'train', k, seed)}: no such task file, and no "
                             f"{task}_K_{seed}_train.jsonl with K >= k={k} to take demonstrations from")
    demos = data.read_jsonl(demo_path, task)
    if len(demos) < k:
        raise data.DataError(f"{demo_path}: {len(demos)} demonstrations, k={k} requested")
    return demos[:k], test


def evaluate(model, tokenizer, data_dir, tasks: Sequence[str], *, k: int = 16, seeds: Sequence[int] = DEFAULT_SEEDS,
             method: str = "direct", batch_size: int = 8, max_len: int = 1024, max_example_len: int = 256,
             adapt_steps: int = 0, adapt_lr: float = 1e-5, max_queries: int | None = None,
             progress: bool = True) -> dict:
    """{"tasks": {task: {"type", "metric", "seeds": {seed: score}, "mean", "worst", "n_queries"}},
        "macro": {"mean", "worst"}, "config": {...}}; scores in [0, 1]."""
    from tqdm.auto import tqdm

    if not tasks:
        raise ValueError("evaluate: no tasks")
    if not seeds:
        raise ValueError("evaluate: no seeds")
    if k < 0:
        raise ValueError(f"evaluate: k must be >= 0, got {k}")
    saved = None
    if adapt_steps > 0 and k > 0:
        saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    results, memo = {}, {}
    bar = tqdm(total=len(tasks) * len(seeds), desc="evaluate", disable=not progress, file=sys.stderr)
    try:
        for task in tasks:
            per_seed, info, n_q = {}, None, 0
            for seed in seeds:
                demos, test = _task_files(data_dir, task, k, seed)
                if max_queries is not None:
                    test = test[:max_queries]
                if info is None:
                    info = data.task_info(data_dir, task, test)
                key = json.dumps([demos, test], sort_keys=True)
                if key in memo and saved is None:  # e.g. k = 0: every seed has the same queries
                    per_seed[seed] = memo[key]
                else:
                    if saved is not None:
                        adapt(model, tokenizer, demos, steps=adapt_steps, lr=adapt_lr, method=method,
                              max_example_len=max_example_len, max_len=max_len, batch_size=batch_size)
                        model.eval()
                    losses = score_options(model, tokenizer, demos, test, method=method,
                                           max_example_len=max_example_len, max_len=max_len,
                                           batch_size=batch_size)
                    preds = [metrics.argmin_option(ls, q["options"]) for ls, q in zip(losses, test)]
                    golds = [q["output"] for q in test]
                    if info["type"] in data.CLASSIFICATION_TYPES:
                        score = metrics.macro_f1(preds, golds, sorted({o for q in test for o in q["options"]}))
                    else:
                        score = metrics.accuracy(preds, golds)
                    per_seed[seed] = memo[key] = score
                    if saved is not None:
                        with torch.no_grad():
                            for n, p in model.named_parameters():
                                p.copy_(saved[n])
                n_q = len(test)
                bar.update(1)
                bar.set_postfix(task=task)
            vals = list(per_seed.values())
            results[task] = {"type": info["type"], "domain": info.get("domain", "unknown"),
                             "metric": "macro_f1" if info["type"] in data.CLASSIFICATION_TYPES else "accuracy",
                             "seeds": {str(s): v for s, v in per_seed.items()},
                             "mean": sum(vals) / len(vals), "worst": min(vals), "n_queries": n_q}
    finally:
        bar.close()
        model.train(was_training)
    macro = {"mean": sum(r["mean"] for r in results.values()) / len(results),
             "worst": sum(r["worst"] for r in results.values()) / len(results)}
    config = {"k": k, "seeds": list(seeds), "method": method, "max_len": max_len,
              "max_example_len": max_example_len, "adapt_steps": adapt_steps, "adapt_lr": adapt_lr,
              "max_queries": max_queries, "data_dir": str(data_dir)}
    return {"tasks": results, "macro": macro, "config": config}


def summary_table(result: dict) -> str:
    """A fixed-width table: one row per task (type, metric, mean, worst, each seed), then the macro row."""
    seeds = result["config"]["seeds"]
    head = f"{'task':<32} {'type':<16} {'metric':<9} {'mean':>6} {'worst':>6} " + \
        " ".join(f"{'s' + str(s):>6}" for s in seeds)
    lines = [head, "-" * len(head)]
    for task, r in result["tasks"].items():
        lines.append(f"{task:<32} {r['type']:<16} {r['metric']:<9} {r['mean']:>6.3f} {r['worst']:>6.3f} "
                     + " ".join(f"{r['seeds'][str(s)]:>6.3f}" for s in seeds))
    lines.append("-" * len(head))
    m = result["macro"]
    lines.append(f"{'macro (' + str(len(result['tasks'])) + ' tasks)':<32} {'':<16} {'':<9} "
                 f"{m['mean']:>6.3f} {m['worst']:>6.3f}")
    return "\n".join(lines)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
        os.replace(tmp, path)  # nothing half-written
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Evaluate a causal LM in context on MetaICL-format tasks.")
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (offline default), tiny-gpt2, tiny-llama, or an HF name/path")
    p.add_argument("--data-dir", default=str(data.DEFAULT_DATA_DIR), help="MetaICL-format data directory")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--setting", help="setting name (or .json path); evaluates its --split tasks")
    which.add_argument("--tasks", help="comma-separated task names")
    p.add_argument("--split", default="test", choices=["test", "unseen_domain_test"])
    p.add_argument("--k", type=int, default=16, help="demonstrations per query (0: zero-shot)")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)))
    p.add_argument("--method", default="direct", choices=["direct", "channel"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--max-example-len", type=int, default=256)
    p.add_argument("--max-queries", type=int, default=None, help="use only the first N test queries per task")
    p.add_argument("--adapt-steps", type=int, default=0, help="adaptation protocol: AdamW steps on the demos")
    p.add_argument("--adapt-lr", type=float, default=1e-5)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    p.add_argument("--output", default=None, help="write the results as JSON here")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (on a busy shared machine 1 can be many times faster than 2)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    return args


def main(argv=None) -> dict:
    from mamlen.train import models

    args = parse_args(argv)
    if args.setting:
        tasks = data.load_setting(args.data_dir, args.setting)[args.split]
        if not tasks:
            raise SystemExit(f"setting {args.setting!r} has no {args.split} tasks")
    else:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    try:
        model, tok = models.load_model(args.model, dtype=getattr(torch, args.dtype))
    except models.UnknownModelError as e:
        raise SystemExit(f"error: --model: {e}") from None
    t_load = time.time() - t0
    res = evaluate(model, tok, args.data_dir, tasks, k=args.k, seeds=args.seeds, method=args.method,
                   batch_size=args.batch_size, max_len=args.max_len, max_example_len=args.max_example_len,
                   adapt_steps=args.adapt_steps, adapt_lr=args.adapt_lr, max_queries=args.max_queries,
                   progress=not args.no_progress)
    res["config"].update({"model": args.model, "setting": args.setting, "split": args.split,
                          "load_seconds": round(t_load, 1), "eval_seconds": round(time.time() - t0 - t_load, 1),
                          "torch": torch.__version__})
    print(summary_table(res))
    if args.output:
        _write_json(Path(args.output), res)
        print(f"wrote {args.output}")
    return res


if __name__ == "__main__":
    main()
