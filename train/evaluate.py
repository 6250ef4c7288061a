"""In-context evaluation (MetaICL's protocol) of a causal LM on MetaICL-format tasks.

For each task and seed: the k demonstrations of `{task}_{k}_{seed}_train.jsonl` are put before every
query of `{task}_{k}_{seed}_test.jsonl`; each option is scored by the mean token loss of its target
(instances.py: direct scores the option, channel scores the input given the option); the lowest loss wins
(ties: first option). Score: macro-F1 for classification-like tasks (classification, NLI, paraphrase),
accuracy otherwise. Reported per task: every seed, the mean and the worst; "macro": the mean over tasks of
those. k = 0 is zero-shot. adapt_steps > 0 is the "adaptation" protocol: before scoring a (task, seed), a
few full-batch AdamW steps on the k demonstrations (each one the target, the others its context), then
in-context evaluation, then the weights are restored.

The continuous metric (issue 13), per query: the gold option's mean-token NLL, and the margin = the best wrong
option's loss minus the gold's (> 0: gold preferred). Queries are the same for every model, so these pair per
query across models; `--per-query FILE` writes them all.

The demonstrations are the same for every query of a seed and the options of a query share its condition, so
both are run once and their key/value caches reused (exactly the same scores as the full sequences; see
tests/train/test_evaluate.py).

    python train/evaluate.py --model smollm2 --setting class_to_class --k 16 --output results.json \
        --per-query per_query.json.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mamlen.train import data, instances, metrics

DEFAULT_SEEDS = (100, 13, 21, 42, 87)


# --- scoring ---------------------------------------------------------------------------------------
def _kv(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """[(keys, values)] per layer of a transformers Cache, each (B, heads, T, head_dim)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def _cache(kv: Sequence[tuple[torch.Tensor, torch.Tensor]], rows: torch.Tensor | None = None, batch: int = 1):
    """A fresh DynamicCache holding kv: the batch rows `rows`, or row 0 broadcast to `batch` rows (a view, copied
    only once, by the model's concatenation of the new keys/values)."""
    from transformers import DynamicCache

    if rows is not None:
        return DynamicCache(ddp_cache_data=[(k.index_select(0, rows), v.index_select(0, rows)) for k, v in kv])
    return DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)) for k, v in kv])


def _pad(seqs: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, mask), both (B, S)."""
    B, S = len(seqs), max(len(s) for s in seqs)
    ids = torch.full((B, S), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((B, S), dtype=torch.long, device=device)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, :len(s)] = 1
    return ids, mask


def _token_logprobs(model, hidden: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(tokens[r] | hidden[r]) under the LM head: hidden (R, d), tokens (R,) -> (R,), float32. One matmul for
    all rows (the head is a large share of scoring short options); no (R, V) log-softmax is materialised."""
    logits = model.get_output_embeddings()(hidden).float()  # (R, V)
    return logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _prepare(items, max_len: int):
    """Left-truncate each item to max_len and split it into (context, stem, tail): the model reads context + stem
    and scores tail, the target. Items that share a context share its cache; items that share context and stem
    (the options of one query, method "direct") share the stem's too. Returns {context: {stem: [(i, tail)]}}."""
    groups: dict[tuple, dict[tuple, list]] = {}
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
        if tstart <= 0:  # the first target token is predicted by the token before it
            if ctx:
                ctx, suffix, tstart = ctx[:-1], [ctx[-1]] + list(suffix[max(tstart, 0):]), 1
            else:  # a token at position 0 has no prediction: score from the second on
                suffix, tstart = suffix[max(tstart, 0):], 1
        groups.setdefault(tuple(ctx), {}).setdefault(tuple(suffix[:tstart]), []).append((i, list(suffix[tstart:])))
    return groups


@torch.no_grad()
def score_sequences(model, items: Sequence[tuple[list[int], list[int], int]], *, pad_token_id: int,
                    max_len: int = 1024, batch_size: int = 8) -> list[float]:
    """Mean target loss of each item (context, suffix, target_start): the sequence context + suffix,
    left-truncated to max_len, whose target is suffix[target_start:].

    Three passes share work without changing a score: the context (the demonstrations) is run once and its
    key/value cache reused; then up to batch_size stems (the query's condition) at once on that cache; then the
    tails (the options) on the stems' caches, with explicit position ids so a short stem's padding is skipped.
    Only the hidden states of scored positions go through the LM head.
    """
    device = next(model.parameters()).device
    body = model.base_model  # the decoder without the LM head
    losses = [math.nan] * len(items)
    for ctx, stems in _prepare(items, max_len).items():
        P = len(ctx)
        ctx_kv = None
        if P:
            ctx_kv = _kv(body(input_ids=torch.tensor([ctx], device=device), use_cache=True).cache)
        stem_list = sorted(stems, key=len)  # similar lengths share a batch
        for lo in range(0, len(stem_list), batch_size):
            chunk = stem_list[lo:lo + batch_size]
            ids, smask = _pad(chunk, pad_token_id, device)  # (Bs, Ls)
            Bs = len(chunk)
            ones = torch.ones((Bs, P), dtype=torch.long, device=device)
            out = body(input_ids=ids, attention_mask=torch.cat([ones, smask], 1),
                       cache=_cache(ctx_kv, batch=Bs) if P else None, use_cache=True)
            stem_kv = _kv(out.cache)  # (Bs, heads, P + Ls, hd)
            last = smask.sum(1) - 1  # (Bs,) position of each stem's last token
            tails = [(b, i, tail) for b, stem in enumerate(chunk) for i, tail in stems[stem]]
            rows = torch.tensor([b for b, _, _ in tails], device=device)
            first = torch.tensor([tail[0] for _, _, tail in tails], device=device)
            # tail token 0 is predicted by the stem's last position (one head row per stem, not per option);
            # a one-token option needs nothing more
            logits = model.get_output_embeddings()(out.last_hidden_state[torch.arange(Bs), last]).float()  # (Bs, V)
            lp0 = (logits[rows, first] - torch.logsumexp(logits, dim=-1)[rows]).tolist()
            del out
            for (b, i, tail), lp in zip(tails, lp0):
                losses[i] = -lp
            # tail tokens 0..n-2 predict tokens 1..n-1; the last token is never read, so it is not run
            longer = [(b, i, tail) for b, i, tail in tails if len(tail) > 1]
            for tlo in range(0, len(longer), batch_size):
                tc = longer[tlo:tlo + batch_size]
                rows = torch.tensor([b for b, _, _ in tc], device=device)
                tids, tmask = _pad([t[:-1] for _, _, t in tc], pad_token_id, device)  # (Bt, Lt)
                Bt, Lt = tids.shape
                pos = (P + last[rows] + 1)[:, None] + torch.arange(Lt, device=device)  # continue after the stem
                mask = torch.cat([torch.ones((Bt, P), dtype=torch.long, device=device), smask[rows], tmask], 1)
                hid = body(input_ids=tids, attention_mask=mask, position_ids=pos,
                           cache=_cache(stem_kv, rows=rows), use_cache=True).last_hidden_state  # (Bt, Lt, d)
                sel = tmask.bool()  # (Bt, Lt): the real tokens, whose hidden states predict tokens 1..n-1
                lp = _token_logprobs(model, hid[sel], torch.tensor([t for _, _, tail in tc for t in tail[1:]],
                                                                  device=device)).tolist()
                pos_lp = 0
                for b, i, tail in tc:
                    losses[i] -= sum(lp[pos_lp:pos_lp + len(tail) - 1])
                    pos_lp += len(tail) - 1
            for b, i, tail in tails:
                losses[i] /= len(tail)
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
    test = data.read_jsonl(test_path, task, need_options=True)
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


@dataclass(frozen=True)
class QueryScores:
    """The continuous metric of one (task, seed), per query (lists aligned with the test file's order):
    nll: the gold option's mean-token NLL; margin: the best wrong option's loss minus the gold's (> 0: the gold
    is preferred, by that many nats per token); correct: the gold option has the lowest loss."""
    nll: list[float]
    margin: list[float]
    correct: list[bool]


def seed_mean(per_seed: Sequence[Sequence[float]]) -> list[float]:
    """Each query's value averaged over the demonstration seeds (which score the same queries of a task)."""
    return [sum(v) / len(v) for v in zip(*per_seed, strict=True)]


def query_scores(losses: Sequence[Sequence[float]], queries: Sequence[dict]) -> QueryScores:
    nll, margin, correct = [], [], []
    for ls, q in zip(losses, queries):
        gold = q["options"].index(q["output"])
        wrong = [v for j, v in enumerate(ls) if j != gold]
        if not wrong:
            raise data.DataError(f"task {q['task']!r}: query {q['input'][:60]!r} has a single option: no margin")
        nll.append(ls[gold])
        margin.append(min(wrong) - ls[gold])
        correct.append(metrics.argmin_option(ls, q["options"]) == q["output"])
    return QueryScores(nll, margin, correct)


def check_tasks(data_dir, tasks: Sequence[str], *, k: int, seeds: Sequence[int]) -> None:
    """Read and check every file an evaluation of `tasks` will read (demonstrations, queries, tasks.json), so
    bad data is reported, naming file and line, before a model is loaded. Raises data.DataError."""
    if not tasks:
        raise data.DataError(f"no tasks to evaluate in {data_dir}")
    for task in tasks:
        if not (Path(data_dir) / task).is_dir():
            raise data.DataError(f"task {task!r}: no folder {Path(data_dir) / task}")
        for seed in seeds:
            _, test = _task_files(data_dir, task, k, seed)
        data.task_info(data_dir, task, test)


def evaluate(model, tokenizer, data_dir, tasks: Sequence[str], *, k: int = 16, seeds: Sequence[int] = DEFAULT_SEEDS,
             method: str = "direct", batch_size: int = 8, max_len: int = 1024, max_example_len: int = 256,
             adapt_steps: int = 0, adapt_lr: float = 1e-5, max_queries: int | None = None,
             per_query: bool = False, progress: bool = True) -> dict:
    """{"tasks": {task: {"type", "metric", "seeds": {seed: score}, "mean", "worst", "n_queries",
                         "nll": {seed: mean gold NLL}, "margin": {seed: mean margin}, "nll_mean", "margin_mean"}},
        "macro": {"mean", "worst", "nll", "margin"}, "config": {...}}; scores in [0, 1], nll/margin in nats per
    token (see QueryScores). per_query=True adds "per_query": {task: {seed: {"nll", "margin", "correct"}}}."""
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
    results, memo, pq = {}, {}, {}
    bar = tqdm(total=len(tasks) * len(seeds), desc="evaluate", disable=not progress, file=sys.stderr)
    try:
        for task in tasks:
            per_seed, qs, info, n_q = {}, {}, None, 0
            for seed in seeds:
                demos, test = _task_files(data_dir, task, k, seed)
                if max_queries is not None:
                    test = test[:max_queries]
                if info is None:
                    info = data.task_info(data_dir, task, test)
                key = json.dumps([demos, test], sort_keys=True)
                if key in memo and saved is None:  # e.g. k = 0: every seed has the same queries
                    per_seed[seed], qs[seed] = memo[key]
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
                    per_seed[seed], qs[seed] = memo[key] = score, query_scores(losses, test)
                    if saved is not None:
                        with torch.no_grad():
                            for n, p in model.named_parameters():
                                p.copy_(saved[n])
                n_q = len(test)
                bar.update(1)
                bar.set_postfix(task=task)
            vals = list(per_seed.values())
            nll = {str(s): sum(q.nll) / len(q.nll) for s, q in qs.items()}
            margin = {str(s): sum(q.margin) / len(q.margin) for s, q in qs.items()}
            results[task] = {"type": info["type"], "domain": info.get("domain", "unknown"),
                             "metric": "macro_f1" if info["type"] in data.CLASSIFICATION_TYPES else "accuracy",
                             "seeds": {str(s): v for s, v in per_seed.items()},
                             "mean": sum(vals) / len(vals), "worst": min(vals), "n_queries": n_q,
                             "nll": nll, "margin": margin, "nll_mean": sum(nll.values()) / len(nll),
                             "margin_mean": sum(margin.values()) / len(margin)}
            if per_query:
                pq[task] = {str(s): {"nll": q.nll, "margin": q.margin, "correct": q.correct} for s, q in qs.items()}
    finally:
        bar.close()
        model.train(was_training)
    n = len(results)
    macro = {"mean": sum(r["mean"] for r in results.values()) / n,
             "worst": sum(r["worst"] for r in results.values()) / n,
             "nll": sum(r["nll_mean"] for r in results.values()) / n,
             "margin": sum(r["margin_mean"] for r in results.values()) / n}
    config = {"k": k, "seeds": list(seeds), "method": method, "max_len": max_len,
              "max_example_len": max_example_len, "adapt_steps": adapt_steps, "adapt_lr": adapt_lr,
              "max_queries": max_queries, "data_dir": str(data_dir)}
    out = {"tasks": results, "macro": macro, "config": config}
    if per_query:
        out["per_query"] = pq
    return out


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
    lines.append(f"continuous (mean over tasks, seeds and queries; nats/token): gold NLL {m['nll']:.4f}, "
                 f"margin best-wrong − gold {m['margin']:+.4f}")
    return "\n".join(lines)


def _write_json(path: Path, obj, indent: int | None = 2) -> None:
    """Atomic JSON write; a name ending in .gz is gzip-compressed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as raw:
            text = json.dumps(obj, indent=indent).encode()
            if path.name.endswith(".gz"):
                with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:  # mtime 0: same scores, same bytes
                    f.write(text)
            else:
                raw.write(text)
        os.replace(tmp, path)  # nothing half-written
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return parse


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, every flag checked (argparse names the flag in one line, exit code 2)."""
    p = argparse.ArgumentParser(description="Evaluate a causal LM in context on MetaICL-format tasks.")
    p.add_argument("--model", default="smollm2",
                   help="smollm2 (offline default), tiny-gpt2, tiny-llama, or an HF name/path")
    p.add_argument("--data-dir", default=str(data.DEFAULT_DATA_DIR),
                   help="MetaICL-format data directory (default: the suite shipped with mamlen)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--setting", help="setting name (or .json path); evaluates its --split tasks")
    which.add_argument("--tasks", help="comma-separated task names")
    p.add_argument("--split", default="test", choices=["test", "unseen_domain_test"],
                   help="which task list of --setting to evaluate")
    p.add_argument("--k", type=_int_at_least(0), default=16, help="demonstrations per query (0: zero-shot)")
    p.add_argument("--seeds", default=",".join(map(str, DEFAULT_SEEDS)),
                   help="comma-separated demonstration seeds; per task the mean and the worst are reported")
    p.add_argument("--method", default="direct", choices=["direct", "channel"],
                   help="direct scores P(option | input), channel P(input | option)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=8, help="sequences per scoring batch")
    p.add_argument("--max-len", type=_int_at_least(16), default=1024,
                   help="tokens per sequence (demonstrations are left-truncated to fit)")
    p.add_argument("--max-example-len", type=_int_at_least(2), default=256,
                   help="tokens per demonstration or query (the input is cut first)")
    p.add_argument("--max-queries", type=_int_at_least(1), default=None,
                   help="use only the first N test queries per task")
    p.add_argument("--adapt-steps", type=_int_at_least(0), default=0,
                   help="adaptation protocol: AdamW steps on the demos")
    p.add_argument("--adapt-lr", type=_positive_float, default=1e-5, help="learning rate of --adapt-steps")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"],
                   help="parameter dtype of the loaded model")
    p.add_argument("--output", default=None, help="write the results as JSON here (checked before evaluating)")
    p.add_argument("--per-query", default=None, metavar="FILE",
                   help="write every query's gold NLL, margin and correctness here (JSON; gzip if FILE ends .gz)")
    p.add_argument("--threads", type=_int_at_least(1), default=None,
                   help="torch CPU threads (on a busy shared machine 1 can be many times faster than 2)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"argument --seeds: must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds:
        p.error("argument --seeds: no seed given")
    if not Path(args.data_dir).is_dir():
        p.error(f"argument --data-dir: {args.data_dir} is not a directory")
    if args.output is not None:
        try:
            check_writable(Path(args.output))
        except OSError as e:
            p.error(f"argument --output: {args.output}: cannot be written ({e.strerror or e})")
    return args


def check_writable(path: Path) -> None:
    """Raise OSError unless a file can be created at `path` (its folder is created): found before the evaluation,
    not after it."""
    if path.is_dir():
        raise IsADirectoryError(21, "is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".probe")
    os.close(fd)
    os.unlink(probe)


def main(argv=None) -> dict:
    from mamlen.train import models

    args = parse_args(argv)
    # everything that can be wrong with the input is found before the model loads
    try:
        if args.setting:
            tasks = data.load_setting(args.data_dir, args.setting)[args.split]
            if not tasks:
                raise data.DataError(f"setting {args.setting!r} has no {args.split} tasks")
        else:
            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        check_tasks(args.data_dir, tasks, k=args.k, seeds=args.seeds)
        models.check_name(args.model)
    except (data.DataError, models.UnknownModelError) as e:
        raise SystemExit(f"error: {e}") from None
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
                   per_query=args.per_query is not None, progress=not args.no_progress)
    res["config"].update({"model": args.model, "setting": args.setting, "split": args.split,
                          "load_seconds": round(t_load, 1), "eval_seconds": round(time.time() - t0 - t_load, 1),
                          "torch": torch.__version__})
    print(summary_table(res))
    if args.per_query:
        _write_json(Path(args.per_query), {"config": res["config"], "per_query": res.pop("per_query")}, indent=None)
        print(f"wrote {args.per_query}")
    if args.output:
        _write_json(Path(args.output), res)
        print(f"wrote {args.output}")
    return res


if __name__ == "__main__":
    main()
