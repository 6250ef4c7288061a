"""Config: presets load, overrides apply in order, and every bad value or key is refused naming the field."""
import math

import pytest

from mamlen.train import config
from mamlen.train.config import Config, ConfigError


def load(*argv):
    return config.load(list(argv))[0]


def test_defaults_and_presets_are_valid():
    assert isinstance(load(), Config)
    assert {"tiny", "demo", "paper"} <= set(config.presets())
    for name in config.presets():
        cfg = load("--preset", name)
        assert cfg.train.max_steps >= 1
    paper = load("--preset", "paper")
    assert (paper.data.max_len, paper.train.batch_size) == (1024, 1)


def test_precedence_preset_file_set_flags(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  max_steps: 7\n  seed: 3\nengine:\n  inner_lr: 2.0e-4\n")
    cfg = load("--preset", "tiny", "--config", str(f), "--set", "train.seed=4", "--max-steps", "9",
               "--output-dir", "out/1", "--set", "engine.inner_lr=1e-4", "--set", "eval.seeds=1,2")
    assert cfg.train.max_steps == 9 and cfg.train.seed == 4 and cfg.output_dir == "out/1"
    assert cfg.engine.inner_lr == 1e-4 and isinstance(cfg.engine.inner_lr, float)
    assert cfg.eval.seeds == [1, 2]
    assert load("--resume").checkpoint.resume == "require"


@pytest.mark.parametrize("argv, expected", [
    (["--set", "engine.hvp=exakt"], "engine.hvp: 'exakt' is not one of 'exact', 'mixed', 'fd', 'first_order'"),
    (["--set", "engine.hvpp=exact"], "engine.hvpp: unknown key"),
    (["--set", "trian.seed=1"], "trian: unknown key"),
    (["--set", "train.tasks_per_step=0"], "train.tasks_per_step: must be >= 1"),
    (["--set", "engine.inner_lr=-1"], "engine.inner_lr: must be > 0"),
    (["--set", "engine.inner_lr=fast"], "engine.inner_lr: expected a number"),
    (["--set", "engine.betas=[0.9]"], "engine.betas: expected 2 values"),
    (["--set", "engine.betas=[0.9,1.5]"], "engine.betas: each must be in [0, 1)"),
    (["--set", "lr.warmup_steps=1.5"], "lr.warmup_steps: expected an integer"),
    (["--set", "model.dropout=maybe"], "model.dropout: expected true or false"),
    (["--set", "eval.seeds=[1,x]"], "eval.seeds[1]: expected an integer"),
    (["--set", "data.fraction=0"], "data.fraction: must be in (0, 1]"),
    (["--set", "model=3"], "model: expected a mapping"),
    (["--set", "novalue"], "expected KEY=VALUE"),
    (["--max-steps", "many"], "train.max_steps: expected an integer"),
    (["--set", "engine.autocast_dtype=float16"], "engine.autocast_dtype: float16 is refused"),
    (["--set", "engine.hvp=fd", "--set", "engine.inner_graph=keep"], "engine.inner_graph: 'keep' only applies"),
    (["--set", "engine.hvp=fd", "--set", "engine.autocast_dtype=bfloat16"], "engine.hvp: 'fd' under autocast"),
    (["--set", "engine.hvp=fd", "--set", "model.dtype=bfloat16"], "engine.hvp: 'fd' with model.dtype=bfloat16"),
])
def test_bad_values_name_the_field(argv, expected):
    with pytest.raises(ConfigError) as e:
        load(*argv)
    assert expected in str(e.value)


def test_yaml_errors_carry_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  seed: 1\nengine:\n  inner_lr: 1.0e-4\n  hvp: exakt\n")
    with pytest.raises(ConfigError, match=r"engine\.hvp: 'exakt' is not one of .* \(.*bad\.yaml:5\)"):
        load("--config", str(f))
    f.write_text("log:\n  every: 1\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"log\.colour: unknown key .*bad\.yaml:3"):
        load("--config", str(f))
    f.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load("--config", str(f))
    with pytest.raises(ConfigError, match="cannot read config file"):
        load("--config", str(tmp_path / "missing.yaml"))


def test_direct_construction_checks_too():
    with pytest.raises(ConfigError, match="engine.moments: 'both' is not one of"):
        config.EngineConfig(moments="both")
    with pytest.raises(TypeError):
        config.TrainConfig(1)  # kw-only


def test_main_refuses_bad_config_before_any_work(capsys):
    from mamlen.train import meta
    with pytest.raises(SystemExit) as e:
        meta.main(["--preset", "tiny", "--set", "engine.hvp=exakt"])
    assert "engine.hvp: 'exakt' is not one of" in str(e.value.code)


def test_print_config_round_trips(tmp_path, capsys):
    from mamlen.train import meta
    assert meta.main(["--preset", "tiny", "--set", "engine.hvp=fd", "--print-config"]) == 0
    f = tmp_path / "resolved.yaml"
    f.write_text(capsys.readouterr().out)
    again = load("--config", str(f))
    assert again == load("--preset", "tiny", "--set", "engine.hvp=fd")


def test_lr_schedule():
    lr = config.LRConfig(schedule="cosine", warmup_steps=10, min_ratio=0.1)
    assert lr.factor(5, 110) == 0.5 and lr.factor(10, 110) == 1.0
    assert math.isclose(lr.factor(60, 110), 0.55) and math.isclose(lr.factor(110, 110), 0.1)
    assert config.LRConfig().factor(1, 10) == 1.0
