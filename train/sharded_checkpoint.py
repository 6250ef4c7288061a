"""Sharded training checkpoints for engine.fsdp: torch.distributed.checkpoint (DCP), each rank writes its shards.

    output_dir/ckpt-00000120/
        dcp/              .metadata and one __<rank>_0.distcp per rank: the parameters ("model.<name>") and the
                          optimizer state ("optim.exp_avg.<name>", "optim.exp_avg_sq.<name>", "optim.master.<name>")
                          as the DTensor shards each rank holds — nothing is gathered to save them, and DCP
                          reshards them on load, so a checkpoint resumes at any world size
        state.json        trainer step and counters, the optimizer step, sampler state, every rank's RNG state
        config.yaml       the resolved run config
        manifest.json     {"format": "dcp-1", ...}: sha256 and size of every file above; written last, by rank 0

Atomic as train/checkpoint.py's: every rank writes into the hidden .ckpt-XXXXXXXX.tmp (DCP writes and fsyncs
each rank's file, rank 0 its metadata after all ranks' writes succeeded), then rank 0 writes the manifest and
renames the directory into place, so a kill during a save never touches the previous checkpoints; a directory
without a complete manifest is never loaded. The output directory must be shared by the ranks (one host, or a
shared filesystem). Checkpoints of the other kind (full, train/checkpoint.py) are refused with an error naming
engine.fsdp rather than skipped, so a resumed run never starts over and prunes them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mamlen.train.checkpoint import (CONFIG, MANIFEST, STATE, Checkpoint, CheckpointError, _fsync, _sha256,
                                     _write_text, checkpoints, install, prune)

FORMAT = "dcp-1"
SHARDS = "dcp"


def is_sharded(ckpt: Path) -> bool:
    """Whether a checkpoint directory holds DCP shards (else it is a full train/checkpoint.py checkpoint)."""
    return (Path(ckpt) / SHARDS).is_dir()


def check_kind(output_dir, sharded: bool) -> None:
    """Raise CheckpointError if the newest checkpoint in output_dir is of the other kind than the run writes."""
    found = checkpoints(output_dir)
    if found and is_sharded(found[-1]) != sharded:
        kind = "sharded (engine.fsdp=true)" if is_sharded(found[-1]) else "full (engine.fsdp=false)"
        raise CheckpointError(f"{found[-1]}: a {kind} checkpoint; this run has engine.fsdp="
                              f"{'true' if sharded else 'false'} — resume with the setting that wrote it, or use "
                              "another output_dir")


def _tree(model: torch.nn.Module, engine) -> dict:
    """What DCP saves and loads: the parameters (FSDP DTensors) and the optimizer state (DTensors sharded alike)."""
    opt = engine.optimizer_state()
    return {"model": dict(model.named_parameters()), "optim": {k: v for k, v in opt.items() if k != "step"}}


def save(output_dir, step: int, *, model: torch.nn.Module, engine, state: dict, config_yaml: str, keep: int) -> Path:
    """Write ckpt-{step:08d} atomically. A collective: every rank calls it (rank 0 also writes state.json,
    config.yaml, the manifest, renames and prunes all but the newest `keep` checkpoints)."""
    rank = dist.get_rank()
    out = Path(output_dir)
    final, tmp = out / f"ckpt-{step:08d}", out / f".ckpt-{step:08d}.tmp"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".ckpt-*.tmp"):  # left by a crash while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()  # the directory exists before any rank writes into it

    dcp.save(_tree(model, engine), storage_writer=dcp.FileSystemWriter(str(tmp / SHARDS), sync_files=True))

    if rank == 0:
        _write_text(tmp / STATE, json.dumps({**state, "optimizer_step": engine.step_count}))
        _write_text(tmp / CONFIG, config_yaml)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {"format": FORMAT, "step": step,
                    "files": {f: {"sha256": _sha256(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}}
        _fsync(tmp / SHARDS)
        # the manifest last: a directory without a complete manifest is never loaded
        _write_text(tmp / MANIFEST, json.dumps(manifest, indent=1))
        _fsync(tmp)
        install(tmp, final)
        # only checkpoints that verify count as kept (a damaged newer one never pushes a good one out)
        prune(out, keep, known={final.name: True}, check=verify)
    dist.barrier()  # no rank runs ahead (and, e.g., crashes) before the checkpoint is in place
    return final


def verify(ckpt: Path) -> Checkpoint:
    """The checkpoint at `ckpt` if the manifest is complete, every file it lists has its size and sha256 and
    state.json parses; else CheckpointError naming the file (the contract of train/checkpoint.py's verify)."""
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST} (incomplete save)")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{mpath}: unreadable manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{mpath}: format {manifest.get('format')!r}, this code reads {FORMAT!r}")
    for name in (STATE, CONFIG, f"{SHARDS}/.metadata"):
        if name not in files:
            raise CheckpointError(f"{mpath}: {name} is not listed")
    for name, meta in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if path.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, the manifest says {meta['bytes']} "
                                  "(truncated?)")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"{path}: sha256 differs from the manifest (corrupted)")
    try:
        state = json.loads((ckpt / STATE).read_bytes().decode("utf-8"))
        return Checkpoint(path=ckpt, step=int(state["step"]), state=state)
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt / STATE}: unreadable ({type(e).__name__}: {e})") from None


def latest(output_dir, warn: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest sharded checkpoint that passes `verify` (invalid newer ones are reported through `warn`)."""
    check_kind(output_dir, sharded=True)
    for ckpt in reversed(checkpoints(output_dir)):
        try:
            return verify(ckpt)
        except CheckpointError as e:
            warn(f"checkpoint {ckpt.name} is unusable: {e}; trying the previous one")
    return None


def load_(ckpt: Checkpoint, model: torch.nn.Module, engine) -> None:
    """Load the parameters and the optimizer state into the sharded model and its FSDPMetaEngine, in place,
    each rank reading the pieces of the saved shards that overlap its own (any world size). A collective."""
    tree = _tree(model, engine)
    saved = dcp.FileSystemReader(str(ckpt.path / SHARDS)).read_metadata().state_dict_metadata
    if "master" in tree["optim"] and not any(k.startswith("optim.master.") for k in saved):
        del tree["optim"]["master"]  # saved without master weights: the master copy restarts from the weights
    wanted = {f"model.{n}" for n in tree["model"]}
    missing = sorted(wanted - set(saved))
    if missing:
        raise CheckpointError(f"{ckpt.path / SHARDS}: does not fit the model: missing {missing[:5]}")
    with torch.no_grad():
        dcp.load(tree, storage_reader=dcp.FileSystemReader(str(ckpt.path / SHARDS)))
    engine.load_optimizer_state({**tree["optim"], "step": int(ckpt.state["optimizer_step"])})
