"""Which checkpoint a run resumes from, agreed by every rank, with a fallback on any damage.

Two phases, because the model is needed to load a checkpoint but a run with only damaged checkpoints should
stop before loading a large model:

1. `plan` (before the model loads): rank 0 lists OUTPUT_DIR's checkpoints newest first and verifies them
   (checkpoint.verify: hashes, and every file parses) until one passes; the damaged newer ones are reported.
   Rank 0 broadcasts the list from that one down, so every rank works from the same names. No checkpoint at
   all: a fresh start. Checkpoints, none usable: an error, unless checkpoint.resume is "never", which moves
   them aside and starts fresh.
2. `load` (after the model is built): for each name of the plan, every rank verifies it and loads it into its
   model, engine, sampler and RNG; the ranks exchange their errors, and unless all succeeded, all move on to
   the previous checkpoint. So all ranks resume from the same step, and any exception, on any rank, falls back
   with a message naming the file.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mamlen.train import checkpoint, ranks
from mamlen.train.checkpoint import Checkpoint, CheckpointError


@dataclass
class ResumePlan:
    """Checkpoint directory names to try, newest first (the first passed rank 0's verification), or an error."""

    names: list[str] = field(default_factory=list)
    error: str | None = None


def set_aside(output_dir: Path) -> Path | None:
    """Move every ckpt-* directory of output_dir into output_dir/discarded-<UTC time>/ (nothing is deleted)."""
    found = checkpoint.checkpoints(output_dir)
    if not found:
        return None
    dest = Path(output_dir) / time.strftime("discarded-%Y%m%d-%H%M%S", time.gmtime())
    dest.mkdir(exist_ok=True)
    for ckpt in found:
        ckpt.rename(dest / ckpt.name)
    return dest


def plan(output_dir: str | Path, mode: str, *, rank: int, world: int,
         warn: Callable[[str], None]) -> tuple[ResumePlan, Checkpoint | None]:
    """Phase 1 (see the module docstring). Returns the plan every rank shares, and on rank 0 the verified
    newest checkpoint (so phase 2 does not hash it twice). Raises CheckpointError when there is no usable
    checkpoint but there should be one ("auto" with only damaged ones, "require" with none)."""
    result, first = ResumePlan(), None
    if rank == 0:
        out = Path(output_dir)
        if mode == "never":
            moved = set_aside(out)
            if moved is not None:
                warn(f"checkpoint.resume=never: the existing checkpoints were moved to {moved}; starting at step 0")
        found = [c.name for c in reversed(checkpoint.checkpoints(out))]
        damaged = []
        for i, name in enumerate(found):
            try:
                first = checkpoint.verify(out / name)
            except CheckpointError as e:
                warn(f"checkpoint {name} is unusable: {e}; trying the previous one")
                damaged.append(str(e))
                continue
            result.names = found[i:]
            break
        if found and first is None:
            result.error = (f"no usable checkpoint in {out}: all {len(found)} are damaged "
                            f"({'; '.join(damaged)}). Repair or remove them, or start afresh with "
                            "--resume never (moves them aside)")
        elif not found and mode == "require":
            result.error = f"--resume: no usable checkpoint in {out}"
    result = ranks.from_rank0(result, world)
    if result.error:
        raise CheckpointError(result.error)
    return result, first


def load(output_dir: str | Path, resume_plan: ResumePlan, apply: Callable[[Checkpoint], None], *,
         world: int, first: Checkpoint | None = None,
         warn: Callable[[str], None]) -> Checkpoint | None:
    """Phase 2: the newest checkpoint of the plan that every rank verified and loaded through `apply`.

    `apply(ck)` loads ck into the trainer; it may raise anything (it names the file where it can). Raises
    CheckpointError when every checkpoint of a non-empty plan failed."""
    errors = []
    for i, name in enumerate(resume_plan.names):
        err = None
        try:
            ck = first if (i == 0 and first is not None) else checkpoint.verify(Path(output_dir) / name)
            apply(ck)
        except Exception as e:  # noqa: BLE001 -- any damage falls back to the previous checkpoint
            err = str(e) if isinstance(e, CheckpointError) else f"{Path(output_dir) / name}: {type(e).__name__}: {e}"
        all_errors = [e for e in ranks.gather(err, world) if e]
        if not all_errors:
            return ck
        msg = "; ".join(dict.fromkeys(all_errors))  # the same damage seen by several ranks, once
        warn(f"checkpoint {name} is unusable: {msg}; trying the previous one")
        errors.append(msg)
    if resume_plan.names:
        raise CheckpointError(f"no usable checkpoint in {output_dir}: every one failed to load ({'; '.join(errors)}). "
                              "Repair or remove them, or start afresh with --resume never (moves them aside)")
    return None
