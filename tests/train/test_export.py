"""train/export.py: a checkpoint of the tiny preset becomes a standard HF model directory that
AutoModelForCausalLM / AutoTokenizer load with identical logits and that train/evaluate.py evaluates."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mamlen.train import checkpoint, evaluate, export, meta, models


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_export_reloads_with_identical_logits_and_evaluates(tmp_path, model_name):
    run = tmp_path / "run"
    assert meta.main(["--preset", "tiny", "--output-dir", str(run), "--max-steps", "2",
                      "--set", f"model.name={model_name}", "--set", "log.tensorboard=false"]) == 0
    ck = checkpoint.latest(run)
    assert ck.step == 2
    out = tmp_path / "hf"
    assert export.main(["--checkpoint", str(run), "--output", str(out)]) == 0
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "README.md"):
        assert (out / name).is_file(), name
    assert not list(tmp_path.glob(".hf.*"))  # no temporary directory left
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers") and f"name: {model_name}" in card

    # the trained model as the trainer holds it: the base architecture with the checkpoint's weights
    trained, tok = models.load_model(model_name)
    ck.load_model_(trained)
    assert not torch.equal(trained.get_input_embeddings().weight,
                           models.load_model(model_name)[0].get_input_embeddings().weight)  # it did train
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = ["is 7 even?\nno\n\n\nis 4 even?\n", "say hello"]
    enc, hf_enc = tok(text, return_tensors="pt", padding=True), hf_tok(text, return_tensors="pt", padding=True)
    assert torch.equal(enc["input_ids"], hf_enc["input_ids"]) and hf_tok.pad_token_id == tok.pad_token_id
    with torch.no_grad():
        assert torch.equal(trained(**enc).logits, hf(**hf_enc).logits)

    # evaluate.py takes the directory as --model
    res = evaluate.main(["--model", str(out), "--tasks", "noun_category", "--k", "2", "--seeds", "100",
                         "--max-queries", "3", "--max-len", "96", "--no-progress",
                         "--output", str(tmp_path / "eval.json")])
    assert 0.0 <= res["macro"]["mean"] <= 1.0
    assert json.loads((tmp_path / "eval.json").read_text())["config"]["model"] == str(out)


def test_export_refuses_bad_inputs_by_name(tmp_path):
    with pytest.raises(export.ExportError, match="no such directory"):
        export.export(tmp_path / "missing", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(export.ExportError, match="neither a checkpoint"):
        export.export(tmp_path / "empty", tmp_path / "out")
    ck = tmp_path / "ckpt-00000001"
    ck.mkdir()
    (ck / "model.safetensors").write_bytes(b"x")
    with pytest.raises(export.ExportError, match="no manifest.json"):
        export.export(ck, tmp_path / "out")
    assert not (tmp_path / "out").exists()
