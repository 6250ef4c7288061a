"""The loss of a batch, and evaluating it at arbitrary flat weights with reproducible randomness."""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from mamlen.core.arena import ParamArena


_KEEPS_LOGITS: dict = {}  # model class -> whether its forward takes `logits_to_keep`


def _takes_logits_to_keep(model) -> bool:
    kind = type(model)
    if kind not in _KEEPS_LOGITS:
        _KEEPS_LOGITS[kind] = "logits_to_keep" in inspect.signature(model.forward).parameters
    return _KEEPS_LOGITS[kind]


def causal_lm_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy over labels ≠ -100: `model(**batch).loss`'s convention (HF shifts labels
    inside the model), computed in max(float32, logits dtype) — HF always uses float32, which would make a
    float64 model's meta-gradient only float32-accurate.

    Only the positions followed by a target get logits (HF `logits_to_keep` with a boolean mask, where the model
    supports it): a MetaICL instance's target is a few tokens at the end of up to 1024, and the LM head with its
    (positions x vocabulary) logits — and their second-order graph — is otherwise a large share of the time and
    memory of every pass."""
    labels = batch["labels"]
    targets = labels[:, 1:] != -100                      # position t predicts token t+1
    if not bool(targets.any()):
        raise ValueError("batch has no target token (every label is -100): its loss is undefined")
    kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"), use_cache=False)
    if _takes_logits_to_keep(model):
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = targets
        logits = model(**kwargs, logits_to_keep=keep.to(batch["input_ids"].device)).logits  # (n, V)
        logits = logits.reshape(-1, logits.size(-1))
        target_ids = labels[:, 1:][targets].to(logits.device)
    else:
        logits = model(**kwargs).logits
        logits = logits[:, :-1, :].reshape(-1, logits.size(-1))
        target_ids = labels[:, 1:].reshape(-1).to(logits.device)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    n = targets.sum()
    return F.cross_entropy(logits, target_ids, ignore_index=-100, reduction="sum") / n


def count_targets(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def count_inputs(batch: dict) -> int:
    """Tokens the model reads in `batch`: its attention mask's ones; without a mask every position of input_ids (or
    of labels, for a custom loss_fn's batch that has neither)."""
    if batch.get("attention_mask") is not None:
        return int(batch["attention_mask"].sum())
    return (batch["input_ids"] if "input_ids" in batch else batch["labels"]).numel()


class RngState:
    """The dropout masks of one loss: every evaluation of that loss inside `replay()` draws the same ones.

    The first evaluation records the global RNG state and runs on it, so the global RNG advances as in ordinary
    training (the next loss, task or meta-step draws fresh masks). Later evaluations (checkpointing, the fd
    points, mixed, the exact HVP's re-evaluation) fork the RNG, set the recorded state and give the caller's
    state back, so they neither change the masks nor advance the RNG a second time."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = self.accel = None  # recorded at the first evaluation

    @property
    def recorded(self) -> bool:
        return self.cpu is not None

    @contextlib.contextmanager
    def replay(self):
        if not self.recorded:
            self.cpu = torch.get_rng_state()
            self.accel = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            yield
            return
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # restores the caller's state afterwards
            torch.set_rng_state(self.cpu)
            if self.accel is not None:
                torch.cuda.set_rng_state(self.accel, self.device)
            yield


class Objective:
    """L(φ) for a batch: binds flat weights φ into the model, runs it under autocast, returns the scalar loss."""

    def __init__(self, model, arena: ParamArena, loss_fn: Optional[Callable] = None,
                 autocast_dtype: Optional[torch.dtype] = None):
        self.model, self.arena = model, arena
        self.loss_fn = loss_fn or causal_lm_loss
        self.autocast_dtype = autocast_dtype

    def to_device(self, batch: dict) -> dict:
        dev = self.arena.device
        return {k: (v.to(dev, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def loss(self, batch: dict) -> torch.Tensor:
        """Loss with whatever weights are currently bound (call inside `arena.bind`)."""
        if self.autocast_dtype is None:
            return self.loss_fn(self.model, batch)
        with torch.autocast(self.arena.device.type, dtype=self.autocast_dtype):
            return self.loss_fn(self.model, batch)
