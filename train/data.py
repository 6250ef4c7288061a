"""MetaICL-format data: task files, setting files, the low-resource option and the episode sampler.

Layout of a data directory (MetaICL's, so its preprocessed CrossFit/UnifiedQA data works unchanged):

    {data_dir}/{task}/{task}_{k}_{seed}_{split}.jsonl   one {"task","input","output","options"} per line
    {data_dir}/{task}/{task}_16384_{seed}_train.jsonl   a training task's pool (MetaICL's k = 16384)
    {data_dir}/{task}/{task}_16_{seed}_train.jsonl      the k = 16 demonstrations of a test task, per seed
    {data_dir}/{task}/{task}_16_{seed}_test.jsonl       its test queries
    {data_dir}/settings/{setting}.json (or {data_dir}/{setting}.json, or a path)
                                                         {"train": [...], "test": [...], "unseen_domain_test": [...]}
    {data_dir}/tasks.json (optional)                    {task: {"type": ..., "domain": ...}}

Files are read with plain `json` line by line rather than `datasets`: every bad line must be reported
with its file and line number, and the files are small.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Sequence

from mamlen.train.instances import build_instance, collate

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "suite"
TRAIN_POOL_K = 16384  # MetaICL names a training task's full pool {task}_16384_{seed}_train.jsonl
SETTING_KEYS = ("train", "test", "unseen_domain_test")
TASK_TYPES = ("classification", "multiple-choice", "nli", "paraphrase", "generation")
CLASSIFICATION_TYPES = ("classification", "nli", "paraphrase")  # scored by macro-F1


class DataError(ValueError):
    """Bad data: the message names the file, the line (1-based) and the field where it can."""


def task_file(data_dir, task: str, split: str, k: int, seed: int) -> Path:
    return Path(data_dir) / task / f"{task}_{k}_{seed}_{split}.jsonl"


def _check_example(ex, where: str, task: str | None, need_options: bool = False) -> dict:
    if not isinstance(ex, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    for field in ("task", "input", "output", "options"):
        if field not in ex:
            raise DataError(f"{where}: missing field {field!r}")
    for field in ("task", "input", "output"):
        if not isinstance(ex[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got {type(ex[field]).__name__}")
    if not ex["output"]:  # an empty target: nothing to train on or score
        raise DataError(f"{where}: field 'output' is empty")
    opts = ex["options"]
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        raise DataError(f"{where}: field 'options' must be a list of strings")
    if not all(opts):
        raise DataError(f"{where}: field 'options' has an empty option: {opts!r}")
    if need_options and not opts:
        raise DataError(f"{where}: field 'options' is empty; evaluation scores the options of each query "
                        "(a task without options can only be a training task)")
    if opts and ex["output"] not in opts:
        raise DataError(f"{where}: field 'output' {ex['output']!r} is not among the options {opts}")
    if task is not None and ex["task"] != task:
        raise DataError(f"{where}: field 'task' is {ex['task']!r}, expected {task!r}")
    return {"task": ex["task"], "input": ex["input"], "output": ex["output"], "options": list(opts)}


def read_jsonl(path, task: str | None = None, need_options: bool = False) -> list[dict]:
    """Read and validate a MetaICL task file; any problem raises DataError naming file:line and field.
    need_options: every example must have options (an evaluation query)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such task file")
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not line.strip():
                continue
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg} at column {e.colno})") from None
            out.append(_check_example(ex, where, task, need_options))
    if not out:
        raise DataError(f"{path}: empty task file (no examples)")
    return out


def load_task(data_dir, task: str, split: str, k: int = 16, seed: int = 100) -> list[dict]:
    """Examples of {task}_{k}_{seed}_{split}.jsonl, each {"task","input","output","options"}."""
    return read_jsonl(task_file(data_dir, task, split, k, seed), task)


def _setting_path(data_dir, setting) -> Path:
    p = Path(setting)
    if p.suffix == ".json" and p.is_file():
        return p
    for cand in (Path(data_dir) / "settings" / f"{setting}.json", Path(data_dir) / f"{setting}.json"):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in (Path(data_dir) / "settings").glob("*.json"))
    raise DataError(f"unknown setting {setting!r}: no {Path(data_dir) / 'settings' / (str(setting) + '.json')}"
                    + (f" (known: {', '.join(known)})" if known else ""))


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror})") from None


def _read_json_object(path: Path, expected: str) -> tuple[dict, str]:
    """(the JSON object in path, its text for _line_of); malformed JSON or another top-level type names the file
    and line."""
    text = _read_text(path)
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(raw, dict):
        raise DataError(f"{path}:1: expected a JSON object {expected}")
    return raw, text


def _line_of(text: str, needle: str) -> int:
    i = text.find(json.dumps(needle))
    return text.count("\n", 0, i) + 1 if i >= 0 else 1


def load_setting(data_dir, setting: str) -> dict:
    """{"train": [...], "test": [...], "unseen_domain_test": [...]}, every task present under data_dir."""
    path = _setting_path(data_dir, setting)
    raw, text = _read_json_object(path, f"with keys {list(SETTING_KEYS)}")
    unknown = sorted(set(raw) - set(SETTING_KEYS))
    if unknown:
        raise DataError(f"{path}:{_line_of(text, unknown[0])}: unknown key {unknown[0]!r} "
                        f"(expected {list(SETTING_KEYS)})")
    out = {}
    for key in SETTING_KEYS:
        tasks = raw.get(key, [])
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise DataError(f"{path}:{_line_of(text, key)}: field {key!r} must be a list of task names")
        for t in tasks:
            if not (Path(data_dir) / t).is_dir():
                raise DataError(f"{path}:{_line_of(text, t)}: field {key!r}: unknown task {t!r} "
                                f"(no folder {Path(data_dir) / t})")
        out[key] = list(tasks)
    overlap = sorted(set(out["train"]) & (set(out["test"]) | set(out["unseen_domain_test"])))
    if overlap:
        raise DataError(f"{path}:{_line_of(text, overlap[0])}: task {overlap[0]!r} is both a train and a test task")
    return out


def subsample(examples: list[dict], fraction: float, seed: int) -> list[dict]:
    """Keep round(fraction * n) examples (at least 1), chosen by `seed`, in their original order."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return list(examples)
    n = max(1, round(fraction * len(examples)))
    keep = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in keep]


def load_train_tasks(data_dir, setting, seed: int = 100, fraction: float = 1.0) -> dict[str, list[dict]]:
    """The training tasks of a setting: {task: pool}; fraction < 1 is the low-resource variant."""
    names = setting["train"] if isinstance(setting, dict) else load_setting(data_dir, setting)["train"]
    if not names:
        raise DataError(f"setting {setting!r} has no training tasks")
    return {t: subsample(load_task(data_dir, t, "train", k=TRAIN_POOL_K, seed=seed), fraction, seed)
            for t in names}


def support_size(pool_size: int, inner_steps: int) -> int:
    """Examples of a pool of >= 2 given to the support part (K of K+1 shares); the rest form the query part."""
    return min(max(1, round(pool_size * inner_steps / (inner_steps + 1))), pool_size - 1)


def check_pools(train_tasks: dict[str, list[dict]], *, k: int, inner_steps: int, method: str = "maml-en-llm",
                fraction: float = 1.0, warn=print) -> None:
    """Refuse training pools that cannot make an instance (k distinct demonstrations + a query); warn once when
    demonstrations will repeat. Runs before the model loads.

    MAML-en-LLM splits each pool into a support part and a query part, and a query's demonstrations come from
    its own part; the query part (~ pool / (inner_steps + 1)) is the smaller one. k >= pool is refused; k
    >= the query part (but < pool) is allowed with one warning, since some demonstrations then repeat."""
    low = f" after data.fraction={fraction}" if fraction < 1 else ""
    small = []
    for name, pool in sorted(train_tasks.items()):
        n = len(pool)
        if n < 2:
            raise DataError(f"task {name!r}: {n} training example{low}; at least 2 are needed (a query and a "
                            "demonstration, or support and query). Raise data.fraction or drop the task")
        if k >= n:
            raise DataError(f"data.k={k}: task {name!r} has {n} training examples{low}, so at most k={n - 1} "
                            "distinct demonstrations besides the query; lower data.k or raise data.fraction")
        part = n if method == "metaicl" else n - support_size(n, inner_steps)
        if k >= part:
            small.append(f"{name} ({n} examples, query part {part})")
    if small:
        warn(f"warning: data.k={k}: demonstrations will repeat within an instance for {len(small)} task(s) whose "
             f"query part has fewer than k+1 examples: {', '.join(small[:5])}{' ...' if len(small) > 5 else ''}")


def task_info(data_dir, task: str, examples: Sequence[dict] | None = None) -> dict:
    """{"type": ..., "domain": ...} from {data_dir}/tasks.json; without an entry the type is inferred:
    one fixed option set across examples → classification, varying options → multiple-choice, none → generation.
    """
    meta_path = Path(data_dir) / "tasks.json"
    if meta_path.is_file():
        meta, text = _read_json_object(meta_path, '{task: {"type": ..., "domain": ...}}')
        if task in meta:
            if not isinstance(meta[task], dict):
                raise DataError(f"{meta_path}:{_line_of(text, task)}: task {task!r}: expected an object with "
                                f"\"type\" and \"domain\", got {meta[task]!r}")
            info = dict(meta[task])
            if info.get("type") not in TASK_TYPES:
                raise DataError(f"{meta_path}:{_line_of(text, task)}: task {task!r} field 'type' is {info.get('type')!r}, "
                                f"expected one of {list(TASK_TYPES)}")
            return info
    if examples is None:
        raise DataError(f"no type for task {task!r}: not in {meta_path} and no examples to infer it from")
    option_sets = {tuple(sorted(e["options"])) for e in examples}
    if option_sets == {()}:
        kind = "generation"
    elif len(option_sets) == 1:
        kind = "classification"
    else:
        kind = "multiple-choice"
    return {"type": kind, "domain": "unknown"}


class EpisodeSampler:
    """Meta-batches of `tasks_per_step` tasks, each a `Task(support=[K batches], query=batch)`.

    Every instance is k demonstrations + a query of one task (instances.build_instance). A step's batches
    are a pure function of (seed, step): resume and splitting across ranks need no shared state. Tasks
    are drawn uniformly (without replacement when there are enough). Within a task the pool is shuffled
    and split into a support part and a query part, so support and query never share an example; the
    k demonstrations of an instance never include its own query.
    """

    def __init__(self, train_tasks: dict[str, list], tokenizer, *, tasks_per_step: int, k: int, inner_steps: int,
                 batch_size: int, method: str = "direct", max_len: int = 1024, max_example_len: int = 256,
                 seed: int = 0):
        if not train_tasks:
            raise ValueError("EpisodeSampler: no training tasks")
        for name, pool in train_tasks.items():
            if len(pool) < 2:
                raise ValueError(f"EpisodeSampler: task {name!r} has {len(pool)} example(s); at least 2 are "
                                 "needed for disjoint support and query")
        for key, val in (("tasks_per_step", tasks_per_step), ("inner_steps", inner_steps),
                         ("batch_size", batch_size)):
            if val < 1:
                raise ValueError(f"EpisodeSampler: {key} must be >= 1, got {val}")
        if k < 0:
            raise ValueError(f"EpisodeSampler: k must be >= 0, got {k}")
        if tokenizer.pad_token_id is None:
            raise ValueError("EpisodeSampler: tokenizer has no pad token (models.load_model sets it to eos)")
        self.tasks = dict(sorted(train_tasks.items()))
        self.names = list(self.tasks)
        self.tokenizer = tokenizer
        self.tasks_per_step, self.k, self.inner_steps, self.batch_size = tasks_per_step, k, inner_steps, batch_size
        self.method, self.max_len, self.max_example_len = method, max_len, max_example_len
        self.seed = seed
        self.step = 0  # next step `next_meta_batch` serves; the only mutable state

    # --- sampling: pure functions of (seed, step) -------------------------------------------------
    def _rng(self, step: int, *salt) -> random.Random:
        return random.Random(":".join(map(str, ("mamlen-episode", self.seed, step, *salt))))

    def step_tasks(self, step: int) -> list[str]:
        rng = self._rng(step)
        n = self.tasks_per_step
        if n <= len(self.names):
            return rng.sample(self.names, n)
        return [rng.choice(self.names) for _ in range(n)]

    def _instances(self, rng: random.Random, pool: list[dict], idx: list[int], n: int) -> list[dict]:
        out = []
        need = n * (self.k + 1)
        if len(idx) >= need:  # enough distinct examples: no repeats at all
            picked = rng.sample(idx, need)
            groups = [(picked[i * (self.k + 1)], picked[i * (self.k + 1) + 1:(i + 1) * (self.k + 1)])
                      for i in range(n)]
        else:  # small pool: demonstrations drawn from the part's other examples, repeating if needed
            groups = []
            for _ in range(n):
                q = rng.choice(idx)
                others = [j for j in idx if j != q]
                if not others:
                    demos = []
                elif len(others) >= self.k:
                    demos = rng.sample(others, self.k)
                else:
                    demos = rng.choices(others, k=self.k)
                groups.append((q, demos))
        for q, demos in groups:
            out.append(build_instance(self.tokenizer, [pool[j] for j in demos], pool[q], method=self.method,
                                      max_example_len=self.max_example_len, max_len=self.max_len))
        return out

    def _split(self, rng: random.Random, pool: list[dict]) -> tuple[list[int], list[int]]:
        perm = list(range(len(pool)))
        rng.shuffle(perm)
        n_support = support_size(len(pool), self.inner_steps)
        return perm[:n_support], perm[n_support:]

    def _collate(self, insts: list[dict]) -> dict:
        return collate(insts, self.tokenizer.pad_token_id)

    def meta_batch(self, step: int, indices: Sequence[int] | None = None) -> list:
        """The step's tasks as engine Tasks; `indices` builds only those positions (e.g. one rank's share)."""
        from mamlen.core import Task  # here, not at the top: evaluation needs no engine (a 10 s import)

        names = self.step_tasks(step)
        chosen = range(len(names)) if indices is None else indices
        out = []
        for i in chosen:
            name = names[i]
            rng = self._rng(step, i, name)
            pool = self.tasks[name]
            support_idx, query_idx = self._split(rng, pool)
            support = [self._collate(self._instances(rng, pool, support_idx, self.batch_size))
                       for _ in range(self.inner_steps)]
            query = self._collate(self._instances(rng, pool, query_idx, self.batch_size))
            out.append(Task(support=support, query=query, name=name))
        return out

    def metaicl_batch(self, step: int, indices: Sequence[int] | None = None) -> list[dict]:
        """MetaICL baseline: one batch per task of the step, as many instances as a Task holds
        ((inner_steps + 1) * batch_size), from the same tasks as meta_batch(step)."""
        names = self.step_tasks(step)
        chosen = range(len(names)) if indices is None else indices
        out = []
        for i in chosen:
            name = names[i]
            rng = self._rng(step, i, name, "metaicl")
            pool = self.tasks[name]
            out.append(self._collate(self._instances(rng, pool, list(range(len(pool))),
                                                     (self.inner_steps + 1) * self.batch_size)))
        return out

    def next_meta_batch(self) -> list:
        batch = self.meta_batch(self.step)
        self.step += 1
        return batch

    # --- checkpointing -----------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        return {"tasks": {n: len(p) for n, p in self.tasks.items()}, "k": self.k,
                "tasks_per_step": self.tasks_per_step, "inner_steps": self.inner_steps,
                "batch_size": self.batch_size, "method": self.method, "max_len": self.max_len,
                "max_example_len": self.max_example_len}

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "config": self._fingerprint()}

    def load_state_dict(self, sd: dict) -> None:
        for key in ("seed", "step"):
            if key not in sd:
                raise KeyError(f"EpisodeSampler.load_state_dict: missing key {key!r}")
        mine = self._fingerprint()
        for key, val in sd.get("config", {}).items():
            if mine.get(key) != val:
                raise ValueError(f"EpisodeSampler.load_state_dict: config.{key} differs from the checkpoint's "
                                 f"({mine.get(key)!r} here vs {val!r}); the resumed data would not match")
        self.seed, self.step = int(sd["seed"]), int(sd["step"])
