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
Shuffles use numpy's legacy RandomState, as MetaICL does, so the same rows are drawn. The unifiedqa:* tasks
come from UnifiedQA's TSV files and are sampled as MetaICL's preprocess/unifiedqa.py does (a permutation per
seed, no dev sample): train/metaicl_unifiedqa.py. The task lists and converters: train/metaicl_tasks.py.

Needs network access to the Hugging Face hub (or datasets already in the local cache with HF_DATASETS_OFFLINE=1)
and, for the unifiedqa:* tasks, to UnifiedQA's bucket (storage.googleapis.com). Where a server the setting needs
is unreachable it stops at once with a message saying so. Each task is written to a temporary directory and
renamed into place when complete.
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

from mamlen.train import metaicl_spec as ms
from mamlen.train import metaicl_tasks as mt
from mamlen.train import metaicl_unifiedqa as uq

TYPES = {"classification": "classification", "multi-choice": "multiple-choice", "free-form": "generation"}


class BuildError(RuntimeError):
    """The data cannot be built; the message says which task or setting and why."""


@dataclass
class TaskLines:
    """A hub task's converted (input, output) pairs: the training pool and the test queries."""

    train: list[tuple[str, str]]
    test: list[tuple[str, str]]


@dataclass
class TaskFiles:
    """What to write for one task: {file name: examples}, and the sizes of its pool and of its test queries."""

    files: dict[str, list[dict]]
    pool: int
    queries: int


# ---------------------------------------------------------------------------------------------------------
# loading


def _endpoint_ok(endpoint: str, timeout: float) -> str | None:
    url = urllib.parse.urlparse(endpoint)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return str(e)
    return None


def check_sources(specs, timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when a server the tasks need cannot be reached (datasets would retry
    for ~30 s a task). In offline mode datasets reads its local cache, downloaded files included: no check."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return
    if any(isinstance(s, ms.TaskSpec) and not s.data_files for s in specs):
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
        if (err := _endpoint_ok(endpoint, timeout)) is not None:
            raise BuildError(f"the Hugging Face hub ({endpoint}) is unreachable from this machine ({err}). Build the "
                             f"data where it is reachable and copy the output directory here, or set "
                             f"HF_DATASETS_OFFLINE=1 to use datasets (and files) already in the local cache.")
    others: dict[str, list[str]] = {}
    for s in specs:
        urls = s.urls().values() if isinstance(s, uq.UnifiedQASpec) else (s.data_files or {}).values()
        for u in urls:
            p = urllib.parse.urlparse(u)
            others.setdefault(f"{p.scheme}://{p.netloc}", []).append(s.name)
    for endpoint, tasks in others.items():
        if (err := _endpoint_ok(endpoint, timeout)) is not None:
            names = sorted(set(tasks))
            raise BuildError(f"{endpoint} is unreachable from this machine ({err}); it serves the files of "
                             f"{len(names)} task(s) of the setting ({', '.join(names[:3])}"
                             f"{', ...' if len(names) > 3 else ''}). Build the data where it is reachable and copy "
                             f"the output directory here, or set HF_DATASETS_OFFLINE=1 to use files already in "
                             f"the local cache.")


def hub_load(spec: ms.TaskSpec) -> Mapping[str, object]:
    """The task's dataset from the hub: {split name: rows}."""
    import datasets

    try:
        return datasets.load_dataset(spec.path, spec.config)
    except Exception as e:  # noqa: BLE001 - network, missing repo, script-only dataset...: name the task and say why
        first = (str(e).strip().splitlines() or [""])[0]
        raise BuildError(f"{spec.name}: cannot load dataset {spec.path!r}"
                         f"{f' (config {spec.config!r})' if spec.config else ''}: {type(e).__name__}: {first}") from None


def _download(task: str, url: str) -> str:
    """A local copy of `url`, downloaded once into the datasets cache."""
    import datasets

    try:
        return datasets.DownloadManager().download(url)
    except Exception as e:  # noqa: BLE001 - name the task and the file
        first = (str(e).strip().splitlines() or [""])[0]
        raise BuildError(f"{task}: cannot download {url}: {type(e).__name__}: {first}") from None


def files_load(spec: ms.TaskSpec) -> dict[str, list[dict]]:
    """A non-hub task's JSON-lines files: {split: rows}, each line read as MetaICL reads it (json.loads)."""
    out = {}
    for split, url in spec.data_files.items():
        with open(_download(spec.name, url), encoding="utf-8") as f:
            out[split] = [json.loads(line) for line in f]
    return out


def unifiedqa_load(spec: uq.UnifiedQASpec) -> dict[str, list[str]]:
    """The task's two TSV files: {"train": lines, "test": lines}."""
    out = {}
    for split, url in spec.urls().items():
        with open(_download(spec.name, url), encoding="utf-8") as f:  # text mode, as MetaICL reads them
            out[split] = list(f)
    return out


def load_source(spec):
    """A task's raw data: hub (or JSON-lines) rows for a `TaskSpec`, TSV lines for a `UnifiedQASpec`."""
    if isinstance(spec, uq.UnifiedQASpec):
        return unifiedqa_load(spec)
    return files_load(spec) if spec.data_files else hub_load(spec)


# ---------------------------------------------------------------------------------------------------------
# hub tasks: rows → pairs → MetaICL's samples


def convert_split(spec: ms.TaskSpec, ds: Mapping[str, object], split: str) -> list[tuple[str, str]]:
    if split not in ds:
        raise BuildError(f"{spec.name}: dataset {spec.path!r} has no split {split!r} (it has {sorted(ds)})")
    errors = (KeyError, IndexError, TypeError, AttributeError, ValueError)
    where = "(its converter: train/metaicl_*_tasks.py)"
    if spec.convert_split is not None:
        try:
            return list(spec.convert_split(ds[split]))
        except errors as e:
            raise ms.ConversionError(f"{spec.name}: split {split!r}: {type(e).__name__}: {e} {where}") from None
    out = []
    for i, row in enumerate(ds[split]):
        try:
            pair = spec.convert(row)
        except errors as e:
            raise ms.ConversionError(f"{spec.name}: split {split!r}, row {i}: {type(e).__name__}: {e} "
                                     f"{where}") from None
        if pair is not None:
            out.append(pair)
    return out


def task_lines(spec: ms.TaskSpec, ds: Mapping[str, object], need_test: bool = True) -> TaskLines:
    """The pool and the test queries, cut as MetaICL's get_train_test_lines does for this task.

    `need_test=False` (a training task): a separate test split is not converted (MetaICL does, then ignores it)."""
    s = spec.splits
    train = convert_split(spec, ds, s.train)
    if s.test is None:  # both from one split, after a fixed shuffle
        np.random.RandomState(ms.SPLIT_SEED).shuffle(train)
        if s.train_count is not None:
            return TaskLines(train=train[:s.train_count], test=train[s.train_count:s.train_count + s.test_count])
        n = len(train)
        return TaskLines(train=train[:int(s.holdout * n)], test=train[int((s.test_from or s.holdout) * n):])
    if not need_test:
        return TaskLines(train=train, test=[])
    test = convert_split(spec, ds, s.test)
    if s.test_fraction is not None:
        np.random.RandomState(ms.SPLIT_SEED).shuffle(test)
        test = test[:int(s.test_fraction * len(test))]
    return TaskLines(train=train, test=test)


def k_shot(pool: list, k: int, seed: int) -> tuple[list, list]:
    """(first k, next k) of the pool shuffled with `seed` (MetaICL's generate_k_shot_data)."""
    lines = list(pool)
    np.random.RandomState(seed).shuffle(lines)
    return lines[:k], lines[k:2 * k]


def _examples(task: str, pairs: list[tuple[str, str]]) -> list[dict]:
    # MetaICL preprocesses after sampling and leaves out the examples it drops (superglue-multirc's)
    return [e for e in (ms.preprocess(task, p) for p in pairs) if e is not None]


def _check_sizes(task: str, pool: int, queries: int, *, train: bool, test: bool) -> None:
    if train and pool < 2:
        raise BuildError(f"{task}: {pool} training example(s) after conversion")
    if test and (pool < ms.TEST_K or not queries):
        raise BuildError(f"{task}: {pool} pool / {queries} test examples; a test task needs "
                         f"{ms.TEST_K} demonstrations and at least one query")


def hub_task_files(task: str, lines: TaskLines, *, train: bool, test: bool) -> TaskFiles:
    """The 16,384-example pool (train) and/or the five 16-shot samples with the test queries (test)."""
    _check_sizes(task, len(lines.train), len(lines.test), train=train, test=test)
    files = {}
    if train:
        pool, _ = k_shot(lines.train, ms.TRAIN_K, ms.TRAIN_SEED)
        files[f"{task}_{ms.TRAIN_K}_{ms.TRAIN_SEED}_train.jsonl"] = _examples(task, pool)
    if test:
        queries = _examples(task, lines.test)
        for seed in ms.TEST_SEEDS:
            demos, dev = k_shot(lines.train, ms.TEST_K, seed)
            files[f"{task}_{ms.TEST_K}_{seed}_train.jsonl"] = _examples(task, demos)
            files[f"{task}_{ms.TEST_K}_{seed}_dev.jsonl"] = _examples(task, dev)
            files[f"{task}_{ms.TEST_K}_{seed}_test.jsonl"] = queries
    return TaskFiles(files, pool=len(lines.train), queries=len(lines.test))


# ---------------------------------------------------------------------------------------------------------
# unifiedqa:* tasks: TSV lines → MetaICL's samples (metaicl_unifiedqa.py)


def unifiedqa_task_files(spec: uq.UnifiedQASpec, raw: Mapping[str, list[str]], *, train: bool,
                         test: bool) -> TaskFiles:
    """The training pool (its own filtering and sampling) and/or the five 16-shot samples with the test queries."""
    task, files = spec.name, {}
    pool = queries = 0
    if train:
        examples = uq.train_examples(task, raw["train"], ms.TRAIN_K, np.random.RandomState(ms.TRAIN_SEED))
        _check_sizes(task, len(examples), 0, train=True, test=False)
        files[f"{task}_{ms.TRAIN_K}_{ms.TRAIN_SEED}_train.jsonl"] = examples
        pool = len(examples)
    if test:
        if "test" not in raw:
            raise BuildError(f"{task}: MetaICL uses it as a training task only; it has no test file")
        demo_pool = [uq.test_example(task, line) for line in raw["train"] if line.strip()]
        test_queries = [uq.test_example(task, line) for line in raw["test"] if line.strip()]
        _check_sizes(task, len(demo_pool), len(test_queries), train=False, test=True)
        for seed in ms.TEST_SEEDS:  # no dev sample, as in MetaICL
            files[f"{task}_{ms.TEST_K}_{seed}_train.jsonl"] = uq.test_demonstrations(demo_pool, ms.TEST_K, seed)
            files[f"{task}_{ms.TEST_K}_{seed}_test.jsonl"] = test_queries
        pool, queries = len(demo_pool), len(test_queries)
    return TaskFiles(files, pool=pool, queries=queries)


# ---------------------------------------------------------------------------------------------------------
# writing


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


def write_task(out: Path, task: str, task_files: TaskFiles) -> None:
    """{out}/{task}/ with the given files, written to a temporary directory and renamed into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{task}.", suffix=".tmp", dir=out))
    try:
        for name, examples in task_files.files.items():
            with open(tmp / name, "w", encoding="utf-8") as f:
                for e in examples:
                    f.write(json.dumps(e) + "\n")  # ASCII-escaped, as MetaICL writes
        _replace_dir(tmp, out / task)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build(setting: str, out: str | Path, *, load: Callable[[mt.Spec], Mapping] = load_source,
          skip_missing: bool = False, progress: bool = True) -> dict[str, list[str]]:
    """Write every task of `setting` that has a converter, then its setting file; returns the setting written.

    `load(spec)` fetches a task's raw data: {split: rows} for a hub task, {"train"/"test": TSV lines} for a
    unifiedqa:* task (the hub and UnifiedQA's bucket by default; tests pass local data)."""
    if setting not in ms.SETTINGS:
        raise BuildError(f"--setting {setting!r}: unknown (MetaICL's settings: {', '.join(ms.SETTINGS)})")
    absent = mt.missing(setting)
    if absent and not skip_missing:
        raise BuildError(f"{setting}: no converter yet for {len(absent)} of its tasks ({', '.join(absent)}). "
                         f"Pass --skip-missing to build the others (the setting file then lists only those), or "
                         f"add converters (train/metaicl_tasks.py says where)")
    s = ms.SETTINGS[setting]
    keep = {k: [t for t in s[k] if t in mt.REGISTRY] for k in ("train", "test", "unseen_domain_test")}
    train_tasks, test_tasks = set(keep["train"]), set(keep["test"]) | set(keep["unseen_domain_test"])
    tasks = sorted(train_tasks | test_tasks)
    if load is load_source:
        check_sources([mt.REGISTRY[t] for t in tasks])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "tasks.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    for task in tqdm(tasks, desc=setting, unit="task", disable=not progress):
        spec, is_train, is_test = mt.REGISTRY[task], task in train_tasks, task in test_tasks
        if isinstance(spec, uq.UnifiedQASpec):
            task_files = unifiedqa_task_files(spec, load(spec), train=is_train, test=is_test)
        else:
            lines = task_lines(spec, load(spec), need_test=is_test)
            task_files = hub_task_files(task, lines, train=is_train, test=is_test)
        write_task(out, task, task_files)
        meta[task] = {"type": TYPES[ms.TASK_INFO[task]["type"]], "domain": "metaicl", "source": spec.source,
                      "train": task_files.pool, "test": task_files.queries}
        _write_json(meta_path, meta)  # after every task: an interrupted build keeps what it finished
    (out / "settings").mkdir(exist_ok=True)
    _write_json(out / "settings" / f"{setting}.json", keep)
    return keep


def listing() -> str:
    rows = []
    for name in ms.SETTINGS:
        tasks = mt.setting_tasks(name)
        absent = mt.missing(name)
        rows.append(f"{name}: converters for {len(tasks) - len(absent)} of {len(tasks)} tasks"
                    + (f"; missing: {', '.join(absent)}" if absent else ""))
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train/build_metaicl_data.py", description=__doc__.split("\n")[0],
                                epilog="Converters: train/metaicl_tasks.py. Train on the result with "
                                       "--set data.data_dir=OUT --set data.setting=SETTING.")
    p.add_argument("--setting", choices=list(ms.SETTINGS), help="MetaICL setting whose tasks to build")
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
    except (BuildError, ms.ConversionError) as e:
        raise SystemExit(f"error: {e}") from None
    n = len(set(written["train"]) | set(written["test"]) | set(written["unseen_domain_test"]))
    print(f"wrote {n} tasks and settings/{args.setting}.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
