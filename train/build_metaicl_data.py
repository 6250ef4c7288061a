"""Build MetaICL's data (MetaICL-format task files and setting files) from Hugging Face datasets.

    python train/build_metaicl_data.py --setting class_to_class --out data/metaicl
    python train/build_metaicl_data.py --setting hr_to_lr --out data/metaicl --skip-missing
    python train/build_metaicl_data.py --list                     # which tasks have converters, per setting
    python train/meta.py --preset paper --set data.data_dir=data/metaicl --set data.setting=class_to_class

What it writes follows MetaICL's preprocessing (its preprocess/_build_gym.py, --do_train and --do_test):
- a training task: its pool shuffled with seed 100, first k = 16,384 examples → {task}/{task}_16384_100_train.jsonl;
- a test task, for each seed of 100, 13, 21, 42, 87: the pool shuffled with that seed, first 16 examples →
  {task}_16_{seed}_train.jsonl (the demonstrations), the next 16 → _dev.jsonl, every test query → _test.jsonl;
- settings/{setting}.json (its train / test / unseen_domain_test lists) and tasks.json (each task's type).
Shuffles use numpy's legacy RandomState, as MetaICL does, so the same rows are drawn. Per-task converters
and the task lists are in train/metaicl_tasks.py.

Needs network access to the Hugging Face hub (or datasets already in the local cache with HF_DATASETS_OFFLINE=1).
Where the hub is unreachable it stops at once with a message saying so. Each task is written to a temporary
directory and renamed into place when complete.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: train/ must not shadow libraries (its evaluate.py vs HF `evaluate`)
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]

import argparse
import json
import shutil
import socket
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
from tqdm import tqdm

from mamlen.train import metaicl_tasks as mt

TYPES = {"classification": "classification", "multi-choice": "multiple-choice", "free-form": "generation"}


class BuildError(RuntimeError):
    """The data cannot be built; the message says which task or setting and why."""


@dataclass
class TaskLines:
    """A task's converted (input, output) pairs: the training pool and the test queries."""

    train: list[tuple[str, str]]
    test: list[tuple[str, str]]


# ---------------------------------------------------------------------------------------------------------
# loading


def check_hub(timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when the hub cannot be reached (datasets would retry for ~30 s a task)."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return  # offline mode: datasets reads its local cache
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urllib.parse.urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise BuildError(f"the Hugging Face hub ({endpoint}) is unreachable from this machine ({e}). Build the data "
                         f"where it is reachable and copy the output directory here, or set HF_DATASETS_OFFLINE=1 "
                         f"to use datasets already in the local cache.") from None


def hub_load(spec: mt.TaskSpec) -> Mapping[str, object]:
    """The task's dataset from the hub: {split name: rows}."""
    import datasets

    try:
        return datasets.load_dataset(spec.path, spec.config)
    except Exception as e:  # noqa: BLE001 - network, missing repo, script-only dataset...: name the task and say why
        first = (str(e).strip().splitlines() or [""])[0]
        raise BuildError(f"{spec.name}: cannot load dataset {spec.path!r}"
                         f"{f' (config {spec.config!r})' if spec.config else ''}: {type(e).__name__}: {first}") from None


def convert_split(spec: mt.TaskSpec, ds: Mapping[str, object], split: str) -> list[tuple[str, str]]:
    if split not in ds:
        raise BuildError(f"{spec.name}: dataset {spec.path!r} has no split {split!r} (it has {sorted(ds)})")
    out = []
    for i, row in enumerate(ds[split]):
        try:
            pair = spec.convert(row)
        except (KeyError, IndexError, TypeError, AttributeError, ValueError) as e:
            raise mt.ConversionError(f"{spec.name}: split {split!r}, row {i}: {type(e).__name__}: {e} "
                                     f"(its converter in train/metaicl_tasks.py)") from None
        if pair is not None:
            out.append(pair)
    return out


def task_lines(spec: mt.TaskSpec, ds: Mapping[str, object]) -> TaskLines:
    """The pool and the test queries, cut as MetaICL's get_train_test_lines does for this task."""
    s = spec.splits
    train = convert_split(spec, ds, s.train)
    if s.test is None:  # both from one split, after a fixed shuffle
        np.random.RandomState(mt.SPLIT_SEED).shuffle(train)
        if s.train_count is not None:
            return TaskLines(train=train[:s.train_count], test=train[s.train_count:s.train_count + s.test_count])
        cut = int(s.holdout * len(train))
        return TaskLines(train=train[:cut], test=train[cut:])
    test = convert_split(spec, ds, s.test)
    if s.test_fraction is not None:
        np.random.RandomState(mt.SPLIT_SEED).shuffle(test)
        test = test[:int(s.test_fraction * len(test))]
    return TaskLines(train=train, test=test)


def k_shot(pool: list, k: int, seed: int) -> tuple[list, list]:
    """(first k, next k) of the pool shuffled with `seed` (MetaICL's generate_k_shot_data)."""
    lines = list(pool)
    np.random.RandomState(seed).shuffle(lines)
    return lines[:k], lines[k:2 * k]


# ---------------------------------------------------------------------------------------------------------
# writing


def _write_jsonl(path: Path, task: str, pairs: list[tuple[str, str]]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(mt.preprocess(task, p)) + "\n")  # ASCII-escaped, as MetaICL writes


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.rename(final, old)
    os.rename(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_task(out: Path, task: str, lines: TaskLines, *, train: bool, test: bool) -> None:
    """{out}/{task}/: the 16,384-example pool (train) and/or the five 16-shot samples with the test queries."""
    if train and len(lines.train) < 2:
        raise BuildError(f"{task}: {len(lines.train)} training example(s) after conversion")
    if test and (len(lines.train) < mt.TEST_K or not lines.test):
        raise BuildError(f"{task}: {len(lines.train)} pool / {len(lines.test)} test examples; a test task needs "
                         f"{mt.TEST_K} demonstrations and at least one query")
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}.", suffix=".tmp", dir=out))
    try:
        if train:
            pool, _ = k_shot(lines.train, mt.TRAIN_K, mt.TRAIN_SEED)
            _write_jsonl(tmp / f"{task}_{mt.TRAIN_K}_{mt.TRAIN_SEED}_train.jsonl", task, pool)
        if test:
            for seed in mt.TEST_SEEDS:
                demos, dev = k_shot(lines.train, mt.TEST_K, seed)
                _write_jsonl(tmp / f"{task}_{mt.TEST_K}_{seed}_train.jsonl", task, demos)
                _write_jsonl(tmp / f"{task}_{mt.TEST_K}_{seed}_dev.jsonl", task, dev)
                _write_jsonl(tmp / f"{task}_{mt.TEST_K}_{seed}_test.jsonl", task, lines.test)
        _replace_dir(tmp, out / task)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(setting: str, out: str | Path, *, load: Callable[[mt.TaskSpec], Mapping] = hub_load,
          skip_missing: bool = False, progress: bool = True) -> dict[str, list[str]]:
    """Write every task of `setting` that has a converter, then its setting file; returns the setting written.

    `load(spec) -> {split: rows}` fetches a task's dataset (the hub by default; tests pass local Datasets)."""
    if setting not in mt.SETTINGS:
        raise BuildError(f"--setting {setting!r}: unknown (MetaICL's settings: {', '.join(mt.SETTINGS)})")
    absent = mt.missing(setting)
    if absent and not skip_missing:
        raise BuildError(f"{setting}: no converter yet for {len(absent)} of its tasks ({', '.join(absent)}). "
                         f"Pass --skip-missing to build the others (the setting file then lists only those), or "
                         f"add converters in train/metaicl_tasks.py")
    s = mt.SETTINGS[setting]
    keep = {k: [t for t in s[k] if t in mt.REGISTRY] for k in ("train", "test", "unseen_domain_test")}
    train_tasks, test_tasks = set(keep["train"]), set(keep["test"]) | set(keep["unseen_domain_test"])
    if load is hub_load:
        check_hub()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "tasks.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    for task in tqdm(sorted(train_tasks | test_tasks), desc=setting, unit="task", disable=not progress):
        spec = mt.REGISTRY[task]
        lines = task_lines(spec, load(spec))
        write_task(out, task, lines, train=task in train_tasks, test=task in test_tasks)
        meta[task] = {"type": TYPES[mt.TASK_INFO[task]["type"]], "domain": "metaicl",
                      "source": f"hf:{spec.path}" + (f"/{spec.config}" if spec.config else ""),
                      "train": len(lines.train), "test": len(lines.test)}
        _write_json(meta_path, meta)  # after every task: an interrupted build keeps what it finished
    (out / "settings").mkdir(exist_ok=True)
    _write_json(out / "settings" / f"{setting}.json", keep)
    return keep


def listing() -> str:
    rows = []
    for name, s in mt.SETTINGS.items():
        tasks = sorted({t for k in ("train", "test", "unseen_domain_test") for t in s[k]})
        absent = mt.missing(name)
        rows.append(f"{name}: converters for {len(tasks) - len(absent)} of {len(tasks)} tasks"
                    + (f"; missing: {', '.join(absent)}" if absent else ""))
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train/build_metaicl_data.py", description=__doc__.split("\n")[0],
                                epilog="Converters: train/metaicl_tasks.py. Train on the result with "
                                       "--set data.data_dir=OUT --set data.setting=SETTING.")
    p.add_argument("--setting", choices=list(mt.SETTINGS), help="MetaICL setting whose tasks to build")
    p.add_argument("--out", type=Path, help="data directory to write (other settings' tasks in it are kept)")
    p.add_argument("--skip-missing", action="store_true",
                   help="build the tasks that have converters and leave the others out of the setting file")
    p.add_argument("--list", action="store_true", help="show which tasks of each setting have converters, and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.list:
        print(listing())
        return 0
    if not args.setting or not args.out:
        p.error("--setting and --out are required (or --list)")
    try:
        written = build(args.setting, args.out, skip_missing=args.skip_missing, progress=not args.no_progress)
    except (BuildError, mt.ConversionError) as e:
        raise SystemExit(f"error: {e}") from None
    n = len(set(written["train"]) | set(written["test"]) | set(written["unseen_domain_test"]))
    print(f"wrote {n} tasks and settings/{args.setting}.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
