"""Shared fixtures for the train/ data, evaluation and model tests: the tiny models and small data dirs."""
import json
import warnings

import pytest
import torch

from mamlen.train import models


@pytest.fixture(autouse=True)
def _restore_threads():
    """Training runs (the tiny preset) set torch.set_num_threads(1) in this process; later tests get it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded tiny GPT-2; the byte tokenizer makes token counts = byte counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return models.load_model("tiny-gpt2")


@pytest.fixture(scope="session")
def byte_tok():
    return models.byte_tokenizer()


def write_task(root, task, split, rows, k=16, seed=100):
    """Write rows (dicts, or raw strings written verbatim as lines) as {task}/{task}_{k}_{seed}_{split}.jsonl."""
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{task}_{k}_{seed}_{split}.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps({"task": task, **r})) + "\n")
    return path


def make_data_dir(root, seeds=(100, 13), n_test=6, k=4):
    """A small MetaICL data dir: a classification task, a multiple-choice task, a generation task, a setting."""
    labels = ["yes", "no"]
    for seed in seeds:
        demos = [{"input": f"is {i} even?", "output": labels[i % 2], "options": labels} for i in range(seed % 7, seed % 7 + k)]
        write_task(root, "parity", "train", demos, k=k, seed=seed)
        write_task(root, "parity", "test",
                   [{"input": f"is {i} even?", "output": labels[i % 2], "options": labels} for i in range(50, 50 + n_test)],
                   k=k, seed=seed)
        opts = lambda i: [str(i + 1), str(i + 2), str(i + 3)]  # noqa: E731
        write_task(root, "successor", "train",
                   [{"input": f"after {i} comes", "output": str(i + 1), "options": opts(i)} for i in range(seed % 5, seed % 5 + k)],
                   k=k, seed=seed)
        write_task(root, "successor", "test",
                   [{"input": f"after {i} comes", "output": str(i + 1), "options": opts(i)} for i in range(20, 20 + n_test)],
                   k=k, seed=seed)
    write_task(root, "parity", "train", [{"input": f"is {i} even?", "output": labels[i % 2], "options": labels}
                                         for i in range(40)], k=16384, seed=100)
    write_task(root, "echo", "train", [{"input": f"say {i}", "output": str(i), "options": []} for i in range(30)],
               k=16384, seed=100)
    (root / "settings").mkdir(exist_ok=True)
    (root / "settings" / "toy.json").write_text(json.dumps(
        {"train": ["echo", "parity"], "test": ["successor"], "unseen_domain_test": []}, indent=1))
    return root


@pytest.fixture
def data_dir(tmp_path):
    return make_data_dir(tmp_path / "data")


@pytest.fixture
def task_writer():
    """write_task(root, task, split, rows, k=16, seed=100) -> path (test files cannot import conftest)."""
    return write_task


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine two OpenMP threads can be 50x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
