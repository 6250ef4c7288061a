"""What a run reports (rank 0 only): a tqdm bar, one line per step in metrics.jsonl, TensorBoard scalars.

metrics.jsonl holds exactly one JSON object per step (step, loss, support_loss, query_loss_before, adapt_gain,
grad_norm, inner_lr, outer_lr, tokens: the target tokens, input_tokens: the non-padding tokens the model read,
step_s: wall seconds, tokens_per_s = input_tokens / step_s, peak_mem_gb, skipped); on resume the lines past the
checkpoint's step are dropped first, so a resumed run's file reads like an uninterrupted one. Evaluations go to
eval.jsonl.
"""
from __future__ import annotations

import json
import math
import os
import resource
import sys
from pathlib import Path

import torch

METRICS, EVALS = "metrics.jsonl", "eval.jsonl"


def peak_mem_gb() -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max resident set size on CPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep only the records with "step" <= step (and drop a torn last line), rewriting the file atomically."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if isinstance(rec, dict) and rec.get("step", math.inf) <= step:
            kept.append(line)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        f.write("".join(line + "\n" for line in kept))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json_value(v):
    if isinstance(v, torch.Tensor):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else (1e308 if v > 0 else -1e308)  # keep the file strict JSON
    return v


class Logger:
    """Rank 0 writes; on other ranks every method is a no-op."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, start_step: int, max_steps: int,
                 progress: bool = True, tensorboard: bool = True, log_every: int = 10):
        self.enabled, self.log_every = enabled, log_every
        self.bar = self.tb = None
        if not enabled:
            return
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS, EVALS):  # a resumed run rewrites the steps after its checkpoint
            truncate_jsonl(self.dir / name, start_step)
        self.metrics = open(self.dir / METRICS, "a")
        self.evals = open(self.dir / EVALS, "a")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step hides events a crashed run wrote past the checkpoint
            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=start_step + 1 if start_step else None)
        if progress and max_steps > start_step:
            from tqdm import tqdm
            self.bar = tqdm(total=max_steps, initial=start_step, desc="meta-train", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def write(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def step(self, m: dict) -> None:
        """Record one step's metrics (a dict with at least "step" and "loss")."""
        if not self.enabled:
            return
        rec = {k: _json_value(v) for k, v in m.items()}
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, m["step"])
            self.tb.add_scalar("train/skipped", int(bool(m.get("skipped"))), m["step"])
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m.get('tokens_per_s', 0):.0f}", refresh=False)
            self.bar.update(1)
        if m["step"] % self.log_every == 0 or m.get("skipped"):
            self.write(f"step {m['step']:6d} | loss {m['loss']:.4f} | support {m.get('support_loss', math.nan):.4f}"
                       f" | |G| {m.get('grad_norm', math.nan):.3e} | lr {m.get('outer_lr', math.nan):.2e}"
                       f" | {m.get('tokens_per_s', 0):.0f} tok/s | {m.get('peak_mem_gb', 0):.2f} GiB"
                       + (" | SKIPPED (non-finite)" if m.get("skipped") else ""))

    def eval(self, step: int, summary: dict, tag: str = "eval") -> None:
        """Record an evaluation summary {"tasks": {task: mean score}, "macro": {"mean", "worst"}} at `step`."""
        if not self.enabled:
            return
        self.evals.write(json.dumps({"step": step, "tag": tag, **summary}, default=_json_value) + "\n")
        self.evals.flush()
        macro = summary["macro"]
        if self.tb is not None:
            for k, v in macro.items():
                self.tb.add_scalar(f"eval/{k}", v, step)
        self.write(f"eval ({tag}) @ step {step}: macro mean {macro['mean']:.4f}, worst {macro['worst']:.4f} "
                   f"over {len(summary['tasks'])} tasks")

    def find_eval(self, tag: str) -> dict | None:
        """The last recorded evaluation with this tag (e.g. "before" from a run that was later resumed)."""
        found = None
        if self.enabled and (self.dir / EVALS).exists():
            for line in (self.dir / EVALS).read_text().splitlines():
                rec = json.loads(line)
                if rec.get("tag") == tag:
                    found = rec
        return found

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.metrics.close()
        self.evals.close()
