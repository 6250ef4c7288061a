"""core/loss.py: the batch loss, computed on target positions only, against HF's own `model(**batch).loss`."""
import pytest
import torch

from mamlen.core import loss as L


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_target_positions_only_equals_hf_loss_and_its_derivatives(tiny, arch):
    """Same value, gradient and HVP as full logits (float64), and as HF's loss; LM head applied to targets only."""
    model = getattr(tiny, arch)(torch.float64)
    model.set_attn_implementation("eager")  # default CPU SDPA has no double backward
    gen = torch.Generator().manual_seed(3)
    batch = tiny.batch(gen, B=3, T=11, pad_last=3)
    batch["labels"][0, 6] = -100  # a hole inside one row's target: rows differ in their target positions
    assert L._takes_logits_to_keep(model)
    params = [p for p in model.parameters()]

    def full_loss():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                 batch["labels"][:, 1:].reshape(-1), ignore_index=-100)

    vec = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    results = []
    for fn in (lambda: L.causal_lm_loss(model, batch), full_loss):
        value = fn()
        g = torch.autograd.grad(value, params, create_graph=True)
        hv = torch.autograd.grad(g, params, grad_outputs=vec)
        results.append((value.detach(), [x.detach() for x in g], hv))
    (v1, g1, h1), (v2, g2, h2) = results
    torch.testing.assert_close(v1, v2, rtol=1e-13, atol=0)
    for a, b in zip(g1 + list(h1), g2 + list(h2)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
    hf = model(**batch).loss  # HF computes its loss in float32
    assert float(v1) == pytest.approx(hf.item(), rel=1e-6)

    seen = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    try:
        L.causal_lm_loss(model, batch)
    finally:
        handle.remove()
    n_targets = int((batch["labels"][:, 1:] != -100).sum())
    assert seen == [(n_targets, model.config.vocab_size)], "the LM head must see the target positions only"


def test_model_without_logits_to_keep_uses_full_logits(tiny):
    base = tiny.gpt2(torch.float64)

    class Plain(torch.nn.Module):  # a causal LM whose forward has no logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = base

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache)

    model = Plain()
    batch = tiny.batch(torch.Generator().manual_seed(4))
    assert not L._takes_logits_to_keep(model)
    torch.testing.assert_close(L.causal_lm_loss(model, batch), L.causal_lm_loss(base, batch), rtol=1e-13, atol=0)


def test_batch_without_targets_is_an_error(tiny):
    model = tiny.gpt2()
    batch = tiny.batch(torch.Generator().manual_seed(5))
    batch["labels"][:] = -100
    with pytest.raises(ValueError, match="no target token"):
        L.causal_lm_loss(model, batch)
