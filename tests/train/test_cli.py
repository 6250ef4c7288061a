"""The command line a new user meets: `train/meta.py --help` documents every config field (from the field
docstrings) without importing torch; a bad model name is one line naming the field and the accepted forms;
`data.max_example_len` reaches the training instances."""
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mamlen.train import config, config_help, meta, models

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_field_with_its_default_and_docstring():
    text = config.parser().format_help()
    sections = {"": config.Config, **{f"{n}.": c for n, c in config.SECTIONS.items()}}
    n = 0
    for prefix, cls in sections.items():
        docs = config_help.field_docs(cls)
        for f in dataclasses.fields(cls):
            if prefix == "" and f.name in config.SECTIONS:
                continue
            assert f.name in docs, f"{prefix}{f.name} has no docstring in train/config.py"
            default = config_help._default(f)
            assert f"  {prefix}{f.name}={default}  " in text, f"{prefix}{f.name}={default} missing from --help"
            assert config_help.first_sentence(docs[f.name]) in text
            n += 1
    assert n > 40  # every section was walked
    assert "train/config.py" in text and "mamlen/train/config.py" not in text  # the path exists in the repo
    assert (ROOT / "train" / "config.py").is_file()


def test_first_sentence_keeps_one_sentence_on_one_line():
    assert config_help.first_sentence("Keep dropout (model.train()).\n  False trains in eval mode.") == \
        "Keep dropout (model.train())."
    assert config_help.first_sentence('Model: "a", "b" or\n a path.') == 'Model: "a", "b" or a path.'


def test_help_answers_without_importing_torch():
    # run the entry point as a script, as users do; torch must not be imported to print the help
    code = ("import runpy, sys\n"
            "sys.argv = ['train/meta.py', '--help']\n"
            "try:\n    runpy.run_path('train/meta.py', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code\n"
            "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'TORCH_NOT_IMPORTED')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "engine.hvp=exact" in out.stdout
    assert out.stdout.strip().endswith("TORCH_NOT_IMPORTED")


def test_unknown_model_is_one_line_naming_the_field_and_the_accepted_forms(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the hub is unreachable in CI anyway; fail fast
    with pytest.raises(models.UnknownModelError) as e:
        models.load_model(str(tmp_path / "no-such-model"))  # a path: refused without asking the hub
    assert "no-such-model/config.json" in str(e.value) and "tiny-gpt2" in str(e.value) and "hub id" in str(e.value)
    with pytest.raises(models.UnknownModelError, match="'no-such-org/no-such-model' is not a model: use "):
        models.load_model("no-such-org/no-such-model")  # a hub id: what the hub (offline here) said is appended
    with pytest.raises(SystemExit) as e:
        meta.main(["--preset", "tiny", "--output-dir", str(tmp_path / "out"),
                   "--set", f"model.name={tmp_path / 'no-such-model'}"])
    msg = str(e.value.code)
    assert msg.startswith("error: model.name: ") and "\n" not in msg, msg
    assert '"smollm2", "tiny-gpt2", "tiny-llama"' in msg


def test_max_example_len_is_a_checked_config_field_that_reaches_the_instances(tmp_path):
    with pytest.raises(config.ConfigError, match=r"data.max_example_len: must be >= 2 .*got 1"):
        config.load(["--set", "data.max_example_len=1"])
    cfg, _ = config.load(["--preset", "tiny", "--output-dir", str(tmp_path), "--set", "data.max_example_len=12",
                          "--set", "data.k=2"])
    n = torch.get_num_threads()
    try:
        *_, sampler, _ = meta.build(cfg, 0, 1, torch.device("cpu"))
    finally:
        torch.set_num_threads(n)
    assert sampler.max_example_len == 12
    task = sampler.meta_batch(1)[0]
    labels = task.query["labels"][0]
    # byte tokenizer: the query example is at most 12 tokens, so at most 12 - 1 ("\n") target tokens
    assert 0 < int((labels != -100).sum()) <= 11
    # k = 2 demos + query, each ≤ 12 tokens, plus two 3-token separators
    assert int(task.query["attention_mask"][0].sum()) <= 3 * 12 + 2 * 3

