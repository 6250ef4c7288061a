"""Tiny random HF models and batches for the engine tests (float64 where exactness is proven)."""
import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

VOCAB = 61


def tiny_gpt2(dtype=torch.float64, seed=0, dropout=0.0, n_layer=2):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=n_layer, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32,
                     attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_llama(dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                      bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def make_batch(gen, B=2, T=9, vocab_used=40, pad_last=2):
    """Random batch; the second row is right-padded by `pad_last`; labels -100 on the first half (the 'prompt')
    and on pads. Tokens stay below `vocab_used`, so some embedding rows get exactly zero gradient."""
    ids = torch.randint(1, vocab_used, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.long)
    if pad_last and B > 1:
        mask[-1, T - pad_last:] = 0
        ids[-1, T - pad_last:] = 0
    labels = ids.clone()
    labels[:, : T // 2] = -100
    labels[mask == 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def tiny():
    """Factories: tiny.gpt2(...), tiny.llama(...), tiny.batch(gen, ...)."""
    from types import SimpleNamespace
    return SimpleNamespace(gpt2=tiny_gpt2, llama=tiny_llama, batch=make_batch)


@pytest.fixture(scope="session")
def reference():
    """test_engine.py as a module: its float64 plain-autograd reference (ref_loss, ref_adapted, rel_err,
    random_state) for other test files (--import-mode=importlib puts no test directory on sys.path)."""
    spec = importlib.util.spec_from_file_location("engine_reference", Path(__file__).with_name("test_engine.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
