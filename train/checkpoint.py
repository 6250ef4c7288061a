"""Training checkpoints: one directory per step, written atomically, verified on load.

    output_dir/ckpt-00000120/
        model.safetensors      parameters, by model.named_parameters() name (tied weights once)
        optimizer.safetensors  "exp_avg.<name>", "exp_avg_sq.<name>"; metadata {"step": outer step count t}
        state.json             trainer step and counters, data-sampler state, the RNG states of every rank
        config.yaml            the resolved run config
        manifest.json          sha256 and size of every file above; written last

A checkpoint is written into a hidden temporary directory and renamed into place only when complete, so a
crash while saving leaves the previous checkpoints intact; a save first checks that the directory has room
for it. Loading checks the manifest; a checkpoint with a missing, truncated, altered or unreadable file is
reported and the previous one is used. Pruning counts only checkpoints that pass that check, so a damaged
newer checkpoint never pushes a good one out.

Weights are copied *into* the model's existing parameters (the engine keeps them as views of flat buffers;
replacing the parameter objects would detach them from the engine).
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
import yaml

FORMAT = 1
MODEL, OPTIMIZER, STATE, CONFIG, MANIFEST = ("model.safetensors", "optimizer.safetensors", "state.json",
                                             "config.yaml", "manifest.json")
_NAME = re.compile(r"^ckpt-(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be used; the message names the directory and the file."""


# ---------------------------------------------------------------------------------------------------------
# RNG states (each rank has its own: dropout masks differ per rank)


def rng_state() -> dict:
    """This process's python, numpy, torch CPU and CUDA generator states, as JSON-able values."""
    b64 = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
    np_state = np.random.get_state()
    return {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *[x.item() if hasattr(x, "item") else x for x in np_state[2:]]],
        "torch": b64(torch.get_rng_state()),
        "cuda": [b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(s: dict) -> None:
    unb64 = lambda x: torch.frombuffer(bytearray(base64.b64decode(x)), dtype=torch.uint8)  # noqa: E731
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    torch.set_rng_state(unb64(s["torch"]))
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(x) for x in s["cuda"]])


# ---------------------------------------------------------------------------------------------------------
# saving


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # named_parameters() lists a tied weight once; clone because every parameter is a view of one flat buffer
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters()}


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories in output_dir, oldest first (by step)."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and _NAME.match(p.name)), key=lambda p: p.name)


def save(output_dir: str | Path, step: int, *, model: torch.nn.Module, optimizer_state: dict, state: dict,
         config_yaml: str, keep: int, known: dict[str, bool] | None = None,
         warn: Callable[[str], None] = print) -> Path:
    """Write ckpt-{step:08d} atomically, then `prune` to the newest `keep` verified checkpoints. Rank 0 only.

    optimizer_state: the engine's {"step": int, "exp_avg": {name: T}, "exp_avg_sq": {name: T}};
    state: JSON-able trainer state (step, counters, sampler state, per-rank RNG states);
    known: what this process knows of the checkpoints (see `prune`). Raises CheckpointError, naming the directory and
    the bytes needed, when there is no room, and removes what it wrote when a write fails."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".ckpt-*.tmp"):  # left by a crash while saving (the run lock keeps other runs out)
        shutil.rmtree(stale, ignore_errors=True)
    model_t = model_tensors(model)
    opt = {f"exp_avg.{n}": t.detach().to("cpu", copy=True).contiguous() for n, t in optimizer_state["exp_avg"].items()}
    opt.update({f"exp_avg_sq.{n}": t.detach().to("cpu", copy=True).contiguous()
                for n, t in optimizer_state["exp_avg_sq"].items()})
    for kind in ("master", "quantized"):  # optional: float32 master weights; 8-bit moment codes (exact resume)
        opt.update({f"{kind}.{n}": t.detach().to("cpu", copy=True).contiguous()
                    for n, t in optimizer_state.get(kind, {}).items()})
    state_text = json.dumps(state)
    need = sum(t.nbytes for t in (*model_t.values(), *opt.values())) + len(state_text) + len(config_yaml) + (1 << 20)
    check_free_space(out, need)

    final = out / f"ckpt-{step:08d}"
    tmp = out / f".ckpt-{step:08d}.tmp"
    try:
        tmp.mkdir()
        save_file(model_t, str(tmp / MODEL), metadata={"format": str(FORMAT)})
        save_file(opt, str(tmp / OPTIMIZER),
                  metadata={"step": str(int(optimizer_state["step"])), "format": str(FORMAT)})
        _write_text(tmp / STATE, state_text)
        _write_text(tmp / CONFIG, config_yaml)
        for name in (MODEL, OPTIMIZER):
            _fsync(tmp / name)
        files = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
                 for name in (MODEL, OPTIMIZER, STATE, CONFIG)}
        # the manifest last: a directory without a complete manifest is never loaded
        _write_text(tmp / MANIFEST, json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1))
        _fsync(tmp)
    except Exception as e:  # disk full, quota, I/O error (safetensors raises its own error type)
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-written is left behind
        raise CheckpointError(f"{tmp}: saving checkpoint of step {step} failed ({e}); "
                              f"{_free_bytes(out)} bytes free in {out}, {need} needed") from None

    install(tmp, final)
    if known is not None:
        known[final.name] = True  # written and hashed just now
    prune(out, keep, known=known, warn=warn)
    return final


def _free_bytes(directory: Path) -> int:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return -1


def size(ckpt: Path) -> int:
    """Bytes of the files of a checkpoint directory."""
    return sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file())


def check_free_space(directory: Path, need: int) -> None:
    """Raise CheckpointError unless `directory` has `need` bytes free: a new checkpoint is written before old
    ones are pruned, so it must fit next to the ones kept; better said up front than as a torn write."""
    free = _free_bytes(directory)
    if 0 <= free < need:
        raise CheckpointError(f"{directory}: not enough free space to save a checkpoint: {need} bytes needed "
                              f"({need / 2**30:.2f} GiB), {free} free ({free / 2**30:.2f} GiB); free some space "
                              "or lower checkpoint.keep (the new checkpoint is written before old ones are pruned)")


def install(tmp: Path, final: Path) -> None:
    """Rename a complete temporary checkpoint directory into place (replacing a checkpoint of the same step,
    e.g. after falling back from a corrupted one) and fsync the parent, so a kill leaves one or the other."""
    if final.exists():
        old = final.with_name(f".{final.name}.old.tmp")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync(final.parent)


def prune(output_dir: str | Path, keep: int, *, known: dict[str, bool] | None = None,
          warn: Callable[[str], None] = print, check: Callable[[Path], "Checkpoint"] | None = None) -> None:
    """Delete all but the newest `keep` checkpoints that pass `verify`; damaged ones do not count as kept.

    Damaged checkpoints older than the oldest kept one are deleted; newer damaged ones are left (the step
    will be saved over them). `known`: {name: passed verify} learned earlier in this process (saved, loaded
    or pruned by it), so each checkpoint is hashed, and a damaged one reported, once; it is updated.
    `check`: the checkpoint kind's verify (default: this module's; train/sharded_checkpoint.py passes its own)."""
    known = {} if known is None else known
    check = check or verify
    kept = 0
    for ckpt in reversed(checkpoints(output_dir)):
        if kept >= keep:
            shutil.rmtree(ckpt, ignore_errors=True)
            continue
        if ckpt.name not in known:
            try:
                check(ckpt)
                known[ckpt.name] = True
            except CheckpointError as e:
                warn(f"checkpoint {ckpt.name} is damaged and not counted as kept: {e}")
                known[ckpt.name] = False
        kept += known[ckpt.name]


# ---------------------------------------------------------------------------------------------------------
# loading


def verify(ckpt: Path) -> "Checkpoint":
    """The checkpoint at `ckpt` if every file listed in the manifest is present with its size and sha256 and
    every file parses (state.json, config.yaml, the safetensors headers); else CheckpointError naming the file.

    Any damage, however odd (a non-UTF-8 byte, JSON of the wrong shape, ...), becomes a CheckpointError."""
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: no {MANIFEST} (incomplete save)")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
        files = manifest["files"]
        listed = {name: (int(meta["bytes"]), str(meta["sha256"])) for name, meta in files.items()}
        fmt = manifest.get("format")
    except Exception as e:  # noqa: BLE001 -- whatever is wrong with it, the manifest is unusable
        raise CheckpointError(f"{mpath}: unreadable manifest ({type(e).__name__}: {e})") from None
    if fmt != FORMAT:
        raise CheckpointError(f"{mpath}: format {fmt!r}, this code reads format {FORMAT}")
    for name in (MODEL, OPTIMIZER, STATE, CONFIG):
        if name not in listed:
            raise CheckpointError(f"{mpath}: {name} is not listed")
    for name, (size_listed, sha) in listed.items():
        path = ckpt / name
        try:
            if not path.is_file():
                raise CheckpointError(f"{path}: missing")
            size = path.stat().st_size
            if size != size_listed:
                raise CheckpointError(f"{path}: {size} bytes, the manifest says {size_listed} (truncated?)")
            if _sha256(path) != sha:
                raise CheckpointError(f"{path}: sha256 differs from the manifest (corrupted)")
        except OSError as e:
            raise CheckpointError(f"{path}: unreadable ({e.strerror})") from None
    # the hashes match, but the files may still have been written wrong: parse each one now
    try:
        state = json.loads((ckpt / STATE).read_bytes().decode("utf-8"))
        step = int(state["step"])
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{ckpt / STATE}: unreadable ({type(e).__name__}: {e})") from None
    try:
        if not isinstance(yaml.safe_load((ckpt / CONFIG).read_bytes().decode("utf-8")), dict):
            raise ValueError("not a mapping of config sections")
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{ckpt / CONFIG}: unreadable ({type(e).__name__}: {e})") from None
    for name in (MODEL, OPTIMIZER):
        try:
            with safe_open(str(ckpt / name), framework="pt") as f:
                meta = f.metadata() or {}
            if name == OPTIMIZER:
                int(meta["step"])
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{ckpt / name}: unreadable ({type(e).__name__}: {e})") from None
    return Checkpoint(path=ckpt, step=step, state=state)


@dataclass
class Checkpoint:
    path: Path
    step: int
    state: dict

    def load_model_(self, model: torch.nn.Module) -> None:
        """Copy the saved parameters into `model`'s existing parameter tensors (in place)."""
        saved = load_file(str(self.path / MODEL))
        params = dict(model.named_parameters())
        missing, unexpected = sorted(set(params) - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise CheckpointError(f"{self.path / MODEL}: does not fit the model: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}")
        for n, p in params.items():
            t = saved[n]
            if t.shape != p.shape or t.dtype != p.dtype:
                raise CheckpointError(f"{self.path / MODEL}: {n} is {tuple(t.shape)} {t.dtype}, "
                                      f"the model has {tuple(p.shape)} {p.dtype}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])

    def optimizer_state(self) -> dict:
        """{"step": int, "exp_avg": {name: T}, "exp_avg_sq": {name: T}}, as the engine takes it."""
        path = str(self.path / OPTIMIZER)
        with safe_open(path, framework="pt") as f:
            step = int(f.metadata()["step"])
        tensors = load_file(path)
        state = {"step": step, "exp_avg": {}, "exp_avg_sq": {}}
        for key, t in tensors.items():
            kind, name = key.split(".", 1)
            state.setdefault(kind, {})[name] = t  # exp_avg, exp_avg_sq; master, quantized when saved
        return state

    def config_yaml(self) -> str:
        return (self.path / CONFIG).read_text()


def latest(output_dir: str | Path, warn: Callable[[str], None] = print) -> Checkpoint | None:
    """The newest checkpoint that passes `verify`; each invalid newer one is reported through `warn`."""
    for ckpt in reversed(checkpoints(output_dir)):
        try:
            return verify(ckpt)
        except CheckpointError as e:
            warn(f"checkpoint {ckpt.name} is unusable: {e}; trying the previous one")
    return None
