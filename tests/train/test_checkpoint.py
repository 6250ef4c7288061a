"""Checkpoints: atomic directories verified by their manifest, newest valid one loaded, weights loaded in place."""
import json
import random

import numpy as np
import pytest
import torch

from mamlen.train import checkpoint
from mamlen.train.checkpoint import CheckpointError


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 5)
        self.mid = torch.nn.Linear(5, 5)
        self.head = torch.nn.Linear(5, 7, bias=False)
        self.head.weight = self.emb.weight  # tied, as in GPT-2


def opt_state(model, step, scale=1.0):
    return {"step": step,
            "exp_avg": {n: torch.full_like(p, scale * step) for n, p in model.named_parameters()},
            "exp_avg_sq": {n: torch.full_like(p, scale * step ** 2) for n, p in model.named_parameters()}}


def save(tmp_path, model, step, keep=5):
    return checkpoint.save(tmp_path, step, model=model, optimizer_state=opt_state(model, step),
                           state={"step": step, "note": "x"}, config_yaml="train:\n  seed: 0\n", keep=keep)


def test_round_trip_in_place(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    path = save(tmp_path, model, 3)
    assert path.name == "ckpt-00000003"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        ["model.safetensors", "optimizer.safetensors", "state.json", "config.yaml", "manifest.json"])
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}

    other = Tied()
    ptrs = {n: p.data_ptr() for n, p in other.named_parameters()}
    ck = checkpoint.latest(tmp_path)
    assert ck.step == 3 and ck.state["note"] == "x" and ck.config_yaml() == "train:\n  seed: 0\n"
    ck.load_model_(other)
    for n, p in other.named_parameters():
        assert torch.equal(p, expected[n]) and p.data_ptr() == ptrs[n]  # copied into the same storage
    assert other.head.weight is other.emb.weight
    opt = ck.optimizer_state()
    want = opt_state(model, 3)
    assert opt["step"] == 3
    for kind in ("exp_avg", "exp_avg_sq"):
        assert opt[kind].keys() == want[kind].keys()
        assert all(torch.equal(opt[kind][n], want[kind][n]) for n in want[kind])


def test_keep_newest(tmp_path):
    model = Tied()
    for step in (2, 4, 6, 8):
        save(tmp_path, model, step, keep=2)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-00000006", "ckpt-00000008"]
    assert not list(tmp_path.glob(".ckpt-*"))


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest", "bad_manifest"])
def test_damaged_newest_falls_back_to_previous(tmp_path, damage):
    model = Tied()
    save(tmp_path, model, 2)
    newest = save(tmp_path, model, 4)
    f = newest / "model.safetensors"
    if damage == "truncate":
        f.write_bytes(f.read_bytes()[:-17])
    elif damage == "flip":
        b = bytearray(f.read_bytes())
        b[-3] ^= 0xFF
        f.write_bytes(bytes(b))
    elif damage == "delete":
        (newest / "state.json").unlink()
    elif damage == "no_manifest":
        (newest / "manifest.json").unlink()
    else:
        (newest / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="ckpt-00000004"):
        checkpoint.verify(newest)
    warnings = []
    ck = checkpoint.latest(tmp_path, warn=warnings.append)
    assert ck.step == 2
    assert len(warnings) == 1 and "ckpt-00000004" in warnings[0] and "previous" in warnings[0]


def test_nothing_usable(tmp_path):
    assert checkpoint.latest(tmp_path / "absent") is None
    (tmp_path / ".ckpt-00000005.tmp").mkdir()  # a crash while saving: never considered
    assert checkpoint.latest(tmp_path) is None
    save(tmp_path, Tied(), 6)
    assert not (tmp_path / ".ckpt-00000005.tmp").exists()  # cleaned by the next save


def test_resave_same_step_replaces(tmp_path):
    model = Tied()
    save(tmp_path, model, 4)
    with torch.no_grad():
        model.mid.weight.add_(1)
    save(tmp_path, model, 4)
    other = Tied()
    checkpoint.latest(tmp_path).load_model_(other)
    assert torch.equal(other.mid.weight, model.mid.weight)


def test_mismatched_model_is_refused(tmp_path):
    save(tmp_path, Tied(), 1)
    wrong = torch.nn.Linear(5, 5)
    with pytest.raises(CheckpointError, match="does not fit the model"):
        checkpoint.latest(tmp_path).load_model_(wrong)
    m64 = Tied().double()
    with pytest.raises(CheckpointError, match="torch.float32, the model has .* torch.float64"):
        checkpoint.latest(tmp_path).load_model_(m64)


def test_rng_state_round_trip_through_json():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = json.loads(json.dumps(checkpoint.rng_state()))
    a = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
