"""The trainer's configuration: kw-only dataclasses, YAML files, named presets and CLI overrides.

Precedence (later wins): the dataclass defaults < `--preset NAME` (train/presets/NAME.yaml) < `--config FILE`
< `--set section.field=value` (repeatable; the value is parsed as YAML) < the shortcut flags
(`--output-dir`, `--max-steps`, `--seed`, `--resume`).

Every value is checked before any work starts; an error names the dotted field and, for YAML files, the file
and line: `engine.hvp: 'exakt' is not one of 'exact', 'mixed', 'fd', 'first_order' (run.yaml:7)`.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).resolve().parent / "presets"


class ConfigError(ValueError):
    """A bad configuration value or key; the message starts with the dotted field name."""


# ---------------------------------------------------------------------------------------------------------
# type checking shared by every section


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` converted to the annotation `tp`, or raise ConfigError naming `key`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(repr(a) for a in args)}")
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        if isinstance(value, str):  # CLI convenience: --set eval.seeds=1,2,3
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {len(value)}: {list(value)!r}")
            return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        out = [_coerce(v, elem, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected a {tp.__name__}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:  # YAML reads 1e3 as a string; accept it when integral
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not f.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:  # PyYAML reads 1e-4 (no dot) as a string
            f = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if not math.isfinite(f):
            raise ConfigError(f"{key}: must be finite, got {value!r}")
        return f
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp}")  # a bug in this file, not in the user's config


class _Section:
    """Base of the config sections: checks and converts every field's type, then `_check()` ranges."""

    _section = ""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(getattr(self, f.name), hints[f.name], self._key(f.name)))
        self._check()

    def _key(self, name: str) -> str:
        return f"{self._section}.{name}" if self._section else name

    def _require(self, ok: bool, name: str, msg: str):
        if not ok:
            raise ConfigError(f"{self._key(name)}: {msg}, got {getattr(self, name)!r}")

    def _check(self):
        pass


# ---------------------------------------------------------------------------------------------------------
# sections


@dataclass(kw_only=True)
class ModelConfig(_Section):
    _section = "model"

    name: str = "smollm2"
    """Model to meta-train: "smollm2" (offline SmolLM2-135M-Instruct), "tiny-gpt2", "tiny-llama", or any HF id/path."""
    dtype: Literal["float32", "float64", "bfloat16"] = "float32"
    """Parameter dtype (float64 is for exactness tests; bfloat16 mixed precision is `engine.autocast_dtype`)."""
    dropout: bool = True
    """Keep the model's dropout active while meta-training (model.train()). False trains in eval mode, which
    also makes a run independent of the number of ranks (dropout masks depend on each rank's RNG)."""


@dataclass(kw_only=True)
class DataConfig(_Section):
    _section = "data"

    data_dir: str | None = None
    """Directory of MetaICL-format task and setting files; null = the suite shipped with mamlen."""
    setting: str = "hr_to_lr"
    """Setting file name (without .json): its "train" tasks are meta-trained on, its test tasks evaluated."""
    fraction: float = 1.0
    """Keep this fraction of each training task's examples (low-resource runs, e.g. 0.1)."""
    seed: int = 100
    """Which k-shot sample of each training task is loaded (MetaICL's file seed)."""
    k: int = 16
    """Demonstrations per training instance."""
    max_len: int = 1024
    """Tokens per training sequence (demonstrations are left-truncated to fit)."""
    method: Literal["direct", "channel"] = "direct"
    """Instance format: direct scores P(output | input), channel P(input | output)."""

    def _check(self):
        self._require(0.0 < self.fraction <= 1.0, "fraction", "must be in (0, 1]")
        self._require(self.k >= 0, "k", "must be >= 0")
        self._require(self.max_len >= 16, "max_len", "must be >= 16")


@dataclass(kw_only=True)
class EngineConfig(_Section):
    """The engine's MetaConfig fields (mamlen.core.MetaConfig), see DESIGN.md's meta-step."""

    _section = "engine"

    inner_optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer of the inner (task adaptation) steps."""
    inner_lr: float = 1e-5
    """Inner learning rate α."""
    inner_steps: int = 1
    """Inner steps K per task (each on its own support batch)."""
    inner_weight_decay: float = 0.0
    """Inner decoupled weight decay λᵢ."""
    outer_optimizer: Literal["adamw", "sgd"] = "adamw"
    """Optimizer of the outer (meta) step."""
    outer_lr: float = 1e-5
    """Outer learning rate β (the peak of the schedule in `lr`)."""
    outer_weight_decay: float = 0.0
    """Outer decoupled weight decay λₒ."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (β1, β2), shared by the inner and outer steps."""
    eps: float = 1e-8
    """AdamW ε."""
    moments: Literal["shared", "separate"] = "shared"
    """"shared": the inner AdamW starts from the outer moments (MAML-en-LLM); "separate": from zero."""
    hvp: Literal["exact", "mixed", "fd", "first_order"] = "exact"
    """Hessian-vector products: reverse-over-reverse, forward-over-reverse, finite difference, or none (FOMAML)."""
    fd_eps: float = 1e-3
    """Finite-difference radius scale for hvp="fd"."""
    inner_graph: Literal["recompute", "keep"] = "recompute"
    """hvp="exact": recompute each support gradient's graph in the reverse pass (less memory) or keep it."""
    checkpointing: bool = False
    """Activation checkpointing inside the engine (trades compute for memory)."""
    autocast_dtype: Literal["bfloat16", "float16"] | None = None
    """Mixed-precision autocast dtype; null = compute in the parameter dtype."""
    attn_implementation: str | None = None
    """Force a transformers attention implementation; null lets the engine choose per HVP mode."""
    max_grad_norm: float | None = None
    """Clip the meta-gradient (MetaICL: the gradient) to this global L2 norm; null = no clipping."""
    measure_adaptation: bool = True
    """Log adapt_gain = L_Q(θ) - L_Q(φ_K) every step (one extra forward per task, no graph)."""
    shard_state: bool = False
    """Under torchrun: each rank keeps 1/world of the moments (and master weights) and does 1/world of the outer
    update (ZeRO-1; core/sharding.py). Checkpoints hold the full state and load at any world size."""
    moments_bits: Literal[32, 8] = 32
    """8: shared moments as bitsandbytes blockwise 8-bit codes (~1 byte per value instead of 4; needs bitsandbytes)."""
    master_weights: bool = False
    """float32 master copy of bfloat16 weights (needs model.dtype=bfloat16; set autocast_dtype=bfloat16 too)."""

    def _check(self):
        for name in ("inner_lr", "outer_lr", "eps", "fd_eps"):
            self._require(getattr(self, name) > 0, name, "must be > 0")
        for name in ("inner_weight_decay", "outer_weight_decay"):
            self._require(getattr(self, name) >= 0, name, "must be >= 0")
        self._require(self.inner_steps >= 1, "inner_steps", "must be >= 1")
        self._require(all(0.0 <= b < 1.0 for b in self.betas), "betas", "each must be in [0, 1)")
        self._require(self.max_grad_norm is None or self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        self._require(self.autocast_dtype != "float16", "autocast_dtype",
                      "float16 is refused: the meta-step has no loss scaling; use bfloat16")
        self._require(self.hvp != "fd" or self.autocast_dtype is None, "hvp",
                      "'fd' under autocast loses the Hessian term (bench/results/precision.md); use exact or mixed")
        self._require(self.inner_graph == "recompute" or self.hvp == "exact", "inner_graph",
                      f"'keep' only applies to hvp='exact' (got hvp={self.hvp!r})")
        # optional dependencies: found missing now, not after the model has loaded
        self._require(self.moments_bits != 8 or importlib.util.find_spec("bitsandbytes") is not None,
                      "moments_bits", "8-bit moments need bitsandbytes, which is not installed (pip install "
                      "bitsandbytes)")


@dataclass(kw_only=True)
class TrainConfig(_Section):
    _section = "train"

    method: Literal["maml-en-llm", "metaicl"] = "maml-en-llm"
    """maml-en-llm: the engine's second-order meta-step; metaicl: multi-task fine-tuning (the baseline)."""
    tasks_per_step: int = 4
    """Exploration states: tasks adapted per meta-step (split across ranks; must be >= the world size)."""
    batch_size: int = 1
    """Sequences per support/query batch (MetaICL: sequences per task batch)."""
    max_steps: int = 1000
    """Meta-steps to run (a resumed run continues up to this step)."""
    seed: int = 0
    """Seed of task sampling (a function of (seed, step) only) and of the RNGs (dropout)."""
    num_threads: int | None = None
    """torch intra-op threads per process; null = torch's default (torchrun sets OMP_NUM_THREADS=1 per rank).
    Tiny models run fastest on 1 thread, especially on a busy machine."""
    max_consecutive_skips: int = 10
    """Stop the run after this many consecutive steps skipped for a non-finite loss or meta-gradient."""
    nan_steps: list[int] = field(default_factory=list)
    """Debugging/tests: make the loss NaN at these steps (the logits are poisoned), to exercise skipping."""

    def _check(self):
        self._require(self.tasks_per_step >= 1, "tasks_per_step", "must be >= 1")
        self._require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._require(self.max_steps >= 0, "max_steps", "must be >= 0")
        self._require(self.num_threads is None or self.num_threads >= 1, "num_threads", "must be >= 1")
        self._require(self.max_consecutive_skips >= 1, "max_consecutive_skips", "must be >= 1")


@dataclass(kw_only=True)
class LRConfig(_Section):
    _section = "lr"

    schedule: Literal["constant", "cosine"] = "constant"
    """Outer learning-rate schedule after warmup: constant, or cosine decay to min_ratio at max_steps."""
    warmup_steps: int = 0
    """Linear warmup from outer_lr/warmup_steps to outer_lr over the first steps."""
    min_ratio: float = 0.1
    """Cosine floor as a fraction of the peak learning rate."""
    scale_inner: bool = False
    """Apply the same schedule factor to the inner learning rate."""

    def _check(self):
        self._require(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        self._require(0.0 <= self.min_ratio <= 1.0, "min_ratio", "must be in [0, 1]")

    def factor(self, step: int, max_steps: int) -> float:
        """Multiplier of the peak learning rate at 1-based `step`."""
        if step <= self.warmup_steps:
            return step / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, max_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(kw_only=True)
class CheckpointConfig(_Section):
    _section = "checkpoint"

    every: int = 100
    """Save a checkpoint every this many steps (0: only at the end)."""
    keep: int = 3
    """Keep the newest this many checkpoints."""
    resume: Literal["auto", "require", "never"] = "auto"
    """auto: continue from the newest valid checkpoint in output_dir if there is one (stop with an error if there
    are checkpoints but none is usable); require: also fail if there is none; never: start at step 0, moving any
    checkpoints of output_dir aside into output_dir/discarded-<time>/."""

    def _check(self):
        self._require(self.every >= 0, "every", "must be >= 0")
        self._require(self.keep >= 1, "keep", "must be >= 1")


@dataclass(kw_only=True)
class EvalConfig(_Section):
    _section = "eval"

    every: int = 0
    """Evaluate the unseen tasks every this many steps during training (0: never)."""
    before: bool = False
    """Evaluate once before the first step (only on a fresh run)."""
    after: bool = False
    """Evaluate once after the last step, printed side by side with `before`."""
    split: Literal["test", "unseen_domain_test"] = "test"
    """Which task list of the setting file is evaluated."""
    tasks: list[str] = field(default_factory=list)
    """Evaluate only these tasks (empty: every task of `split`)."""
    k: int = 16
    """Demonstrations per evaluation prompt."""
    seeds: list[int] = field(default_factory=lambda: [100, 13, 21, 42, 87])
    """Demonstration-sampling seeds; per-task mean and worst are reported."""
    batch_size: int = 8
    """Sequences per scoring batch."""
    max_len: int | None = None
    """Tokens per evaluation sequence; null = data.max_len."""
    max_queries: int | None = None
    """Score only the first this many test queries of each task and seed (null: all); keeps evaluation cheap."""

    def _check(self):
        self._require(self.every >= 0, "every", "must be >= 0")
        self._require(self.k >= 0, "k", "must be >= 0")
        self._require(len(self.seeds) >= 1, "seeds", "must not be empty")
        self._require(self.batch_size >= 1, "batch_size", "must be >= 1")
        self._require(self.max_len is None or self.max_len >= 16, "max_len", "must be >= 16")
        self._require(self.max_queries is None or self.max_queries >= 1, "max_queries", "must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.every > 0 or self.before or self.after


@dataclass(kw_only=True)
class LogConfig(_Section):
    _section = "log"

    every: int = 10
    """Print a log line every this many steps (metrics.jsonl and TensorBoard get every step)."""
    progress: bool = True
    """Show a tqdm progress bar (loss, tokens/s, ETA) on rank 0."""
    tensorboard: bool = True
    """Write TensorBoard scalars to output_dir/tb."""

    def _check(self):
        self._require(self.every >= 1, "every", "must be >= 1")


@dataclass(kw_only=True)
class Config(_Section):
    """A whole training run."""

    output_dir: str = "runs/meta"
    """Checkpoints, metrics.jsonl, eval.jsonl and TensorBoard logs go here."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lr: LRConfig = field(default_factory=LRConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def _check(self):
        self._require(bool(self.output_dir), "output_dir", "must not be empty")
        if self.train.method == "metaicl" and self.engine.moments == "separate":
            raise ConfigError("engine.moments: 'separate' has no meaning for train.method 'metaicl'")
        if self.engine.hvp == "fd" and self.model.dtype == "bfloat16":
            raise ConfigError("engine.hvp: 'fd' with model.dtype=bfloat16 loses the Hessian term "
                              "(bench/results/precision.md); use exact or mixed")
        if self.engine.master_weights and self.model.dtype != "bfloat16":
            raise ConfigError(f"engine.master_weights: needs model.dtype=bfloat16, got model.dtype={self.model.dtype!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, lines: dict[str, str] | None = None) -> "Config":
        """Build from nested dicts; unknown keys and bad values raise ConfigError naming the dotted key
        (and `lines[key]`, e.g. "run.yaml:7", when the value came from a file)."""
        lines = lines or {}
        _refuse_unknown(cls, d, "", lines)
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            sub = SECTIONS.get(f.name)
            if sub is not None:
                if not isinstance(d[f.name], dict):
                    raise ConfigError(_where(f"{f.name}: expected a mapping, got {d[f.name]!r}", f.name, lines))
                kwargs[f.name] = _build(sub, d[f.name], lines)
            else:
                kwargs[f.name] = d[f.name]
        try:
            return cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(_where(str(e), str(e).split(":")[0], lines)) from None


SECTIONS = {"model": ModelConfig, "data": DataConfig, "engine": EngineConfig, "train": TrainConfig,
            "lr": LRConfig, "checkpoint": CheckpointConfig, "eval": EvalConfig, "log": LogConfig}


def _where(msg: str, key: str, lines: dict[str, str]) -> str:
    key = key.split("[")[0]
    return f"{msg} ({lines[key]})" if key in lines else msg


def _refuse_unknown(cls, d: dict, prefix: str, lines: dict[str, str]):
    names = {f.name for f in dataclasses.fields(cls)}
    for k in d:
        if k not in names:
            key = f"{prefix}{k}"
            raise ConfigError(_where(f"{key}: unknown key (known: {', '.join(sorted(names))})", key, lines))


def _build(cls, d: dict, lines: dict[str, str]):
    _refuse_unknown(cls, d, cls._section + ".", lines)
    try:
        return cls(**d)
    except ConfigError as e:
        raise ConfigError(_where(str(e), str(e).split(":")[0], lines)) from None


# ---------------------------------------------------------------------------------------------------------
# YAML files, presets and the command line


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _key_lines(node, source: str, prefix: str = "", out: dict | None = None) -> dict[str, str]:
    """Map each dotted key of a composed YAML mapping to "file:line", for error messages."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = f"{prefix}{k.value}"
            out[key] = f"{source}:{k.start_mark.line + 1}"
            _key_lines(v, source, key + ".", out)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML silently keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for k, _ in node.value:
            key = self.construct_object(k, deep=deep)
            if key in seen:
                raise ConfigError(f"{k.start_mark.name}:{k.start_mark.line + 1}: duplicate key {key!r} "
                                  f"(first given on line {seen[key]})")
            seen[key] = k.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> tuple[dict, dict[str, str]]:
    """Read a config file; returns (nested dict, {dotted key: "file:line"})."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    try:
        loader = _UniqueKeyLoader(text)
        loader.name = str(path)  # marks (hence messages) name the file
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data, _key_lines(node, str(path))


def presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _dotted(key: str, value: Any) -> dict:
    d: Any = value
    for part in reversed(key.split(".")):
        d = {part: d}
    return d


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train/meta.py", description="Meta-train a causal LM with MAML-en-LLM (or the MetaICL baseline).",
        epilog="Sections and fields: see mamlen/train/config.py. Example: "
               "--preset demo --set engine.hvp=fd --set train.tasks_per_step=2")
    p.add_argument("--preset", choices=presets(), help="named preset from train/presets/")
    p.add_argument("--config", metavar="FILE", help="YAML config file (applied after the preset)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override, e.g. engine.inner_lr=1e-4 (value parsed as YAML); repeatable")
    p.add_argument("--output-dir", help="shortcut for --set output_dir=...")
    p.add_argument("--max-steps", help="shortcut for --set train.max_steps=...")
    p.add_argument("--seed", help="shortcut for --set train.seed=...")
    p.add_argument("--resume", nargs="?", const="require", choices=["auto", "require", "never"],
                   help="shortcut for --set checkpoint.resume=...; alone: require a checkpoint in output_dir "
                        "(resuming is automatic when one exists); never: start afresh, old checkpoints moved aside")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    return p


def from_args(args: argparse.Namespace) -> Config:
    """Resolve defaults < preset < --config < --set < shortcut flags into a checked Config."""
    d: dict = {}
    lines: dict[str, str] = {}
    if args.preset:
        pd, pl = load_yaml(PRESET_DIR / f"{args.preset}.yaml")
        d, lines = _merge(d, pd), {**lines, **pl}
    if args.config:
        cd, cl = load_yaml(args.config)
        d, lines = _merge(d, cd), {**lines, **cl}
    sets = list(args.overrides)
    for flag, key in (("output_dir", "output_dir"), ("max_steps", "train.max_steps"), ("seed", "train.seed")):
        if getattr(args, flag) is not None:
            sets.append(f"{key}={getattr(args, flag)}")
    if args.resume:
        sets.append(f"checkpoint.resume={args.resume}")
    for s in sets:
        key, sep, raw = s.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {s!r}: expected KEY=VALUE, e.g. engine.inner_lr=1e-4")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if (key == "output_dir" or key.endswith("data_dir") or key.endswith(".name")) and value is not None:
            value = raw  # paths and names stay strings even when they look like numbers
        d = _merge(d, _dotted(key, value))
        lines[key] = f"--set {key}"
    return Config.from_dict(d, lines)


def load(argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    args = parser().parse_args(argv)
    return from_args(args), args


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# fields a resumed run may change without changing what is computed
RESUMABLE_CHANGES = ("output_dir", "train.max_steps", "train.max_consecutive_skips", "train.nan_steps",
                     "checkpoint.", "eval.", "log.")


def differences(old_yaml: str, cfg: Config) -> list[str]:
    """Dotted fields whose value differs from a checkpoint's config, ignoring RESUMABLE_CHANGES."""
    old, new = _flatten(yaml.safe_load(old_yaml) or {}), _flatten(yaml.safe_load(to_yaml(cfg)))
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys
            if old.get(k) != new.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r))
                                                    for r in RESUMABLE_CHANGES)]


def to_yaml(cfg: Config) -> str:
    d = cfg.to_dict()
    d["engine"]["betas"] = list(d["engine"]["betas"])
    return yaml.safe_dump(d, sort_keys=False)
