"""Typed settings: every YAML recipe parses, and every mistake names its key."""

from __future__ import annotations

import fnmatch
import math
import subprocess
import sys
from pathlib import Path

import pytest

from lapo.config import (
    CONFIGS,
    ConfigError,
    FinetuneConfig,
    OptimConfig,
    PolicyConfig,
    PretrainConfig,
    RLConfig,
    load_config,
    parse_overrides,
    read_yaml,
    save_config,
)

ROOT = Path(__file__).resolve().parents[1]
# configs/<dir>/*.yaml -> the dataclass it overrides; a new directory must be added here
SECTIONS = {
    "lam": PretrainConfig,
    "policy": PolicyConfig,
    "finetune": FinetuneConfig,
    "rl": RLConfig,
}
RECIPES = sorted(CONFIGS.rglob("*.yaml"))


def test_there_are_recipes():
    assert {p.relative_to(CONFIGS).as_posix() for p in RECIPES} >= {
        "lam/debug.yaml",
        "lam/procgen.yaml",
        "lam/video256.yaml",
    }


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_recipe_parses_against_its_dataclass(path, tmp_path):
    section = path.relative_to(CONFIGS).parts[0]
    assert section in SECTIONS, f"{path}: no dataclass registered for configs/{section}/"
    cfg = load_config(SECTIONS[section], path)
    # every key the file sets arrives in the dataclass unchanged
    raw = read_yaml(path)
    for name, sub in raw.items():
        if isinstance(sub, dict):
            for key, value in sub.items():
                got = getattr(getattr(cfg, name), key)
                assert got == value or (isinstance(value, str) and got == float(value)), (
                    f"{name}.{key}"
                )
        else:
            assert getattr(cfg, name) == sub
    # the resolved config written to a run directory reads back identically
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(SECTIONS[section], tmp_path / "config.yaml") == cfg


def test_every_recipe_ships_in_the_package():
    """pyproject's package-data takes every recipe, so an install has what `lapo demo` reads."""
    tomllib = pytest.importorskip("tomllib")
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["lapo"]
    package = CONFIGS.parent
    for path in RECIPES:
        rel = path.relative_to(package).as_posix()
        assert any(fnmatch.fnmatch(rel, p) for p in patterns), f"{rel} is not package data"


@pytest.mark.parametrize("path", sorted((CONFIGS / "lam").glob("*.yaml")), ids=lambda p: p.name)
def test_stage1_recipes_state_hardware_and_time(path):
    text = path.read_text()
    assert "Hardware:" in text and "Time:" in text, f"{path.name}: say what it needs and how long"


def test_procgen_recipe_matches_the_paper():
    cfg = load_config(PretrainConfig, CONFIGS / "lam/procgen.yaml")
    assert (cfg.model.image_size, cfg.model.encoder, cfg.model.impala_scale) == (64, "impala", 4)
    assert cfg.data.batch_size == 128 and cfg.trainer.max_steps == 50_000 and cfg.optim.lr == 3e-4


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["trainer.max_step=10"], "trainer.max_step"),
        (["model.bogus=1"], "model.bogus"),
        (["nonsense.x=1"], "nonsense"),
        (["trainer.max_steps=ten"], "trainer.max_steps"),
        (["trainer.max_steps=0"], "trainer.max_steps"),
        (["trainer.precision=bf17"], "trainer.precision"),
        (["trainer.devices=0"], "trainer.devices"),
        (["trainer.accelerator=tpu"], "trainer.accelerator"),
        (["trainer.loggers=[tensorboard, mlflow]"], "trainer.loggers"),
        (["trainer.compile=maybe"], "trainer.compile"),
        (["optim.lr=-1"], "optim.lr"),
        (["optim.betas=[0.9]"], "optim.betas"),
        (["optim.min_lr_ratio=2"], "optim.min_lr_ratio"),
        (["model.vq_heads=3"], "model.vq_heads"),
        (["model.fsq_levels=[8, 1]"], "model.fsq_levels"),
        (["data.context=0"], "data.context"),
        (["trainer=5"], "trainer"),
    ],
)
def test_a_wrong_key_or_value_names_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, CONFIGS / "lam/debug.yaml", overrides)
    assert str(err.value).startswith(key), str(err.value)
    assert "debug.yaml" in str(err.value)  # and the file it came through


def test_unknown_key_in_a_yaml_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  image_sise: 64\n")
    with pytest.raises(ConfigError, match=r"model\.image_sise: unknown key.*image_size.*bad\.yaml"):
        load_config(PretrainConfig, bad)


def test_overrides_parse_as_yaml_and_win_over_the_file():
    cfg = load_config(
        PretrainConfig,
        CONFIGS / "lam/debug.yaml",
        ["trainer.max_steps=7", "optim.lr=3e-4", "model.fsq_levels=[4, 4]", "trainer.devices=auto"],
    )
    assert cfg.trainer.max_steps == 7 and cfg.optim.lr == 3e-4 and cfg.model.fsq_levels == [4, 4]
    assert parse_overrides(["a.b=1", "a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["trainer.max_steps"])


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    from lapo.optim import lr_lambda

    f = lr_lambda(OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1), max_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    g = lr_lambda(OptimConfig(warmup_steps=0, schedule="constant"), max_steps=100)
    assert g(0) == g(99) == 1.0


def test_cli_rejects_a_wrong_key_before_reading_data(tmp_path):
    run = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "lapo.cli", "pretrain", "--config", "configs/lam/debug.yaml",
         "--data", str(tmp_path / "no-such-dataset"), "--out", str(run), "--set", "model.encodr=impala"],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert res.returncode == 2
    assert "model.encodr: unknown key" in res.stderr and "Traceback" not in res.stderr
    assert not run.exists(), "nothing may be written before the config is valid"


def test_cli_lists_subcommands_with_one_line_each():
    res = subprocess.run(
        [sys.executable, "-m", "lapo.cli", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert res.returncode == 0
    for name in ("pretrain", "train-policy", "finetune", "label", "evaluate", "demo"):
        assert f"\n    {name}" in res.stdout, name
    # `lapo --help` must not import torch (it is a fast, light command)
    probe = "import sys, lapo.cli; lapo.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize(
    ("argv", "shown"),
    [
        (["label"], "windows per forward pass (default: 256)"),
        (["evaluate"], "(default: 20)"),  # --episodes
        (["finetune"], f"default {FinetuneConfig.label_budget}"),  # a flag that sets a config key
    ],
)
def test_help_shows_the_defaults(capsys, argv, shown):
    import lapo.cli

    with pytest.raises(SystemExit) as e:
        lapo.cli.main([*argv, "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert e.value.code == 0 and shown in text, text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_record_help_shows_the_defaults():
    from lapo.record_command import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "number of episodes to record (default: 64)" in text, text
    assert "(default: None)" not in text


def test_data_flag_keeps_a_numeric_looking_path_a_string():
    import argparse

    from lapo.cli_args import config_from_args

    args = argparse.Namespace(config=None, data="2024", overrides=["trainer.max_steps=3"])
    cfg = config_from_args(PretrainConfig, args, {"data.path": args.data})
    assert cfg.data.path == "2024" and cfg.trainer.max_steps == 3


def test_a_missing_subcommand_module_prints_a_clear_message(monkeypatch, capsys):
    import lapo.cli

    monkeypatch.setitem(lapo.cli.SUBCOMMANDS, "teleport", ("lapo.teleport", "not written yet"))
    assert lapo.cli.main(["teleport", "--out", "x"]) == 2
    assert "lapo teleport: not available" in capsys.readouterr().err
    # the others still build and list it
    parser, _ = lapo.cli.build_parser()
    assert "teleport" in parser.format_help()


@pytest.mark.parametrize(
    ("argv", "bad"),
    [
        (["evaluate", "--episodes", "0"], "episodes: must be >= 1"),
        (["evaluate", "--set", "episodes=0"], "episodes: must be >= 1"),
        (["evaluate", "--set", "max_windows=-1"], "max_windows: must be >= 0"),
        (["evaluate", "--set", "env_view=sideways"], "env_view: 'sideways' is not allowed"),
        (["label", "--data", "d", "--batch-size", "0"], "batch_size: must be >= 1"),
        (["label", "--data", "d", "--set", "workers=two"], "workers: expected an integer"),
    ],
)
def test_evaluate_and_label_settings_fail_naming_the_key(tmp_path, capsys, argv, bad):
    import lapo.cli

    out = tmp_path / "out"
    assert lapo.cli.main([*argv, "--model", str(tmp_path / "no-run"), "--out", str(out)]) == 2
    assert f"lapo {argv[0]}: error: {bad}" in capsys.readouterr().err
    assert not out.exists()


def test_a_flag_wins_over_set_which_wins_over_the_yaml(tmp_path, capsys):
    """Defaults < --config < --set < a flag that names the setting, the same for every command."""
    import argparse

    import lapo.cli
    from lapo.cli_args import config_from_args
    from lapo.config import EvaluateConfig

    yaml_file = tmp_path / "eval.yaml"
    yaml_file.write_text("episodes: 0\nmax_steps: 7\nseed: 3\n")
    args = argparse.Namespace(config=str(yaml_file), overrides=["episodes=5", "seed=4"])
    cfg = config_from_args(EvaluateConfig, args, {"seed": 9, "device": None})
    assert (cfg.episodes, cfg.max_steps, cfg.seed, cfg.device) == (5, 7, 9, "auto")
    # through the command: --episodes overrides the YAML's invalid 0, so the settings pass
    # and the missing run is what fails
    argv = ["evaluate", "--config", str(yaml_file), "--episodes", "2", "--env", "babyai:x",
            "--model", str(tmp_path / "no-run"), "--out", str(tmp_path / "m.json")]  # fmt: skip
    assert lapo.cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "episodes" not in err and "no-run" in err, err
