"""pytest-benchmark: one meta-gradient per HVP mode on a small random GPT-2, next to the plain-PyTorch reference.

    pytest bench/test_meta_step.py --benchmark-only        width 128, 2 layers, T = 128, 2 tasks, K = 1
    pytest bench/test_meta_step.py --benchmark-disable     once each at width 32, T = 32 (what CI runs)

Rows (`benchmark.group` = "meta_gradient"): `reference` (bench/reference.py: inner AdamW unrolled with
create_graph through functional_call, eager attention) and `MetaEngine.meta_gradient` with hvp = exact,
exact + inner_graph="keep", mixed, fd and first_order. `meta_gradient` mutates nothing, so every round
computes the same G from the same state. Inputs and one engine per row are built once per module. The
large-shape suite with peak memory and one process per measurement is `python bench/bench_meta_step.py`
(bench/RESULTS.md).
"""
import copy
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from mamlen.core import MetaConfig, MetaEngine, Task

_spec = importlib.util.spec_from_file_location("bench_reference", Path(__file__).resolve().parent / "reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

HP = dict(inner_lr=1e-3, outer_lr=1e-3, inner_steps=1)
ROWS = {  # row: MetaConfig overrides (None: the reference implementation)
    "reference": None,
    "exact": dict(hvp="exact"),
    "exact+keep": dict(hvp="exact", inner_graph="keep"),
    "mixed": dict(hvp="mixed"),
    "fd": dict(hvp="fd"),
    "first_order": dict(hvp="first_order"),
}


@dataclass(frozen=True)
class Shape:
    width: int
    heads: int
    layers: int
    seq: int
    vocab: int
    tasks: int


@dataclass
class Case:
    shape: Shape
    model: torch.nn.Module
    state: dict
    tasks: list


@pytest.fixture(scope="module")
def case(timed):
    hf_logging.set_verbosity_error()
    shape = (Shape(width=128, heads=4, layers=2, seq=128, vocab=1024, tasks=2) if timed
             else Shape(width=32, heads=2, layers=2, seq=32, vocab=128, tasks=2))
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=shape.width, n_head=shape.heads, n_layer=shape.layers, vocab_size=shape.vocab,
                     n_positions=shape.seq, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(1)

    def batch():
        ids = torch.randint(0, shape.vocab, (1, shape.seq), generator=gen)  # (B=1, T)
        labels = ids.clone()
        labels[:, : shape.seq // 2] = -100  # the prompt half carries no loss
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    tasks = [Task(support=[batch()], query=batch()) for _ in range(shape.tasks)]
    sgen = torch.Generator().manual_seed(2)
    state = {"step": 10,  # non-trivial shared moments: the inner AdamW starts from them
             "exp_avg": {n: 1e-3 * torch.randn(p.shape, generator=sgen) for n, p in model.named_parameters()},
             "exp_avg_sq": {n: 1e-6 * torch.rand(p.shape, generator=sgen) for n, p in model.named_parameters()}}
    return Case(shape=shape, model=model, state=state, tasks=tasks)


@pytest.fixture(scope="module")
def one_thread():
    # small tensors on a shared 2-core machine: OpenMP threads add synchronisation, not speed
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("row", list(ROWS))
def test_meta_gradient(benchmark, timed, case, one_thread, row):
    model = copy.deepcopy(case.model)  # the engine packs parameters into its flat arena: one model per row
    if ROWS[row] is None:
        learner = reference.ReferenceMetaLearner(model, **HP)
    else:
        learner = MetaEngine(model, MetaConfig(**HP, outer_optimizer="adamw", moments="shared", **ROWS[row]))
    learner.load_optimizer_state(case.state)
    benchmark.group = "meta_gradient"
    G = benchmark.pedantic(learner.meta_gradient, args=(case.tasks,), rounds=3 if timed else 1,
                           warmup_rounds=1 if timed else 0)
    s = case.shape
    benchmark.extra_info.update({"width": s.width, "layers": s.layers, "seq": s.seq, "vocab": s.vocab,
                                 "tasks": s.tasks, "inner_steps": HP["inner_steps"],
                                 "params": sum(p.numel() for p in model.parameters())})
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in G.values()))
    assert set(G) == {n for n, _ in model.named_parameters()} and math.isfinite(norm) and norm > 0
